//! The KV-event subscriber: one thread that follows every engine's ZMQ event stream and feeds a [`BlockSink`].
//!
//! # What it does
//!
//! For each engine ([`EngineSource`]) and each of its data-parallel ranks `r` it connects a `SUB`
//! socket (subscribed to the engine's topic) to the event endpoint and, when the engine has one,
//! a `DEALER` socket to the replay endpoint; rank `r > 0` uses port + `r` (spec §1.2,
//! [`offset_endpoint`]). Each live message `[topic, seq (8 bytes BE), payload]` goes through the
//! rank's sequence tracker (`subscriber/sequence.rs`: in order, gap, restart, replay, spec
//! §1.10) and then through the [`EventApplier`] (`subscriber/apply.rs`), which decodes the batch
//! ([`crate::decode`]), computes Gantry's chained hash of every stored block from its tokens
//! ([`crate::hash`]), keeps the private map `(rank, KV-cache group, vLLM hash) -> Gantry hash`
//! that removals and parents are resolved through, and calls
//! [`BlockSink::store`]/[`BlockSink::remove`].
//!
//! Replay requests are `[<empty>, start_seq (8 bytes BE)]`; replies are accepted in both shapes
//! of spec §1.4 (0.33: `[<empty>, topic, seq, payload]`, <= 0.24: `[<empty>, seq, payload]`)
//! and end with `seq = u64::MAX`.
//!
//! # Threading
//!
//! [`Subscriber::spawn`] creates the sockets of the initial engines on the caller's thread (so
//! a bad endpoint is an error there) and moves them, the applier and the sink to one OS thread.
//! That thread blocks in `zmq::poll` on every SUB and DEALER socket plus an inproc `PAIR` wake
//! socket; the timeout is the next of: the sink's upkeep (`maintain_interval`, 10 ms) and the
//! earliest replay deadline. Commands ([`Subscriber::add_engine`], [`Subscriber::remove_engine`],
//! shutdown) travel on a crossbeam channel followed by a wake message, and each is answered
//! before the call returns. A socket is read at most [`READ_BUDGET`] messages per wake-up so a
//! flooding engine cannot starve the others or the upkeep.
//!
//! # Bad input
//!
//! A payload that does not decode, a message with the wrong frame count or a sequence frame
//! that is not 8 bytes is counted for its engine
//! ([`Counter::DecodeErrors`](crate::sink::Counter::DecodeErrors)) and logged (one warning per
//! engine per 10 s, the rest at debug), and the stream goes on: an undecodable batch still
//! takes its sequence number (replaying it would return the same bytes), and the rank is not
//! cleared for it, because its lost removals only leave stale hints while a clear would drop
//! every good entry. An event that decodes but cannot be indexed (block size, token count, KV
//! kind, group index, unknown parent) is counted in
//! [`Counter::EventsSkipped`](crate::sink::Counter::EventsSkipped), and logged at the same rate
//! when it points at a misconfiguration or a broken publisher (not for the KV kinds that are
//! not indexed, nor for unknown parents: both are expected); so are events of an unknown type,
//! blocks dropped by the per-engine cap and vLLM hashes re-stored with other content
//! ([`Counter::HashCollisions`](crate::sink::Counter::HashCollisions)). Nothing an engine sends
//! affects another engine's state; every buffer is bounded (see [`SubscriberOptions`] and
//! `subscriber/apply.rs` for the per-engine block cap).
//!
//! Read first: `gap_is_filled_by_replay` in `tests/subscriber.rs` (real sockets, exact
//! sequence numbers), then the state-machine tests in `subscriber/tests.rs`.

#![forbid(unsafe_code)]

mod apply;
mod sequence;
mod worker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;
use tracing::error;

pub use apply::{CounterValues, EventApplier};

use crate::hash::DEFAULT_SEED;
use crate::sink::{BlockSink, EngineSlot};
use apply::SharedCounters;
use worker::{Command, Worker};

/// vLLM's default KV-cache block size.
pub const DEFAULT_BLOCK_SIZE: u32 = 16;
/// Default cap of one engine's private map (all ranks and tiers), see `subscriber/apply.rs`.
pub const DEFAULT_MAX_BLOCKS: usize = 1 << 20;
/// Most data-parallel ranks one engine may have.
pub const MAX_DP_RANKS: u32 = 1024;
/// How long a replay may stay silent before it is abandoned (and the rank resynced).
pub const DEFAULT_REPLAY_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the thread calls [`BlockSink::maintain`].
pub const DEFAULT_MAINTAIN_INTERVAL: Duration = Duration::from_millis(10);
/// Live messages buffered per stream while its replay is in flight.
pub const DEFAULT_MAX_REPLAY_BUFFER: usize = 4096;
/// Payload bytes buffered per stream while its replay is in flight.
pub const DEFAULT_MAX_REPLAY_BUFFER_BYTES: usize = 64 << 20;
/// Largest message frame accepted (`ZMQ_MAXMSGSIZE`); a larger one drops the connection (libzmq
/// reconnects), and the batch lost with it shows as a sequence gap: counted, then replayed, or the
/// engine resynced if the replay cannot deliver it either.
pub const DEFAULT_MAX_MESSAGE_BYTES: i64 = 64 << 20;
/// Receive high-water mark of every SUB and DEALER socket (vLLM's PUB default).
pub const DEFAULT_RCVHWM: i32 = 100_000;
/// Messages read from one socket per wake-up before the others get a turn.
pub const READ_BUDGET: usize = 1024;

/// One engine to follow.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineSource {
    /// The engine's slot in the index.
    pub slot: EngineSlot,
    /// A name for logs and statistics (e.g. its base URL).
    pub name: String,
    /// Event (PUB) endpoint of DP rank 0, e.g. `tcp://10.0.0.5:5557`.
    pub events: String,
    /// Replay (ROUTER) endpoint of DP rank 0, if the engine has one.
    pub replay: Option<String>,
    /// Topic to subscribe to (vLLM's `topic`; empty = everything).
    pub topic: String,
    /// Data-parallel ranks (each publishes on port + rank).
    pub dp_ranks: u32,
    /// The engine's KV-cache block size; stores of another size are skipped.
    pub block_size: u32,
    /// Seed of Gantry's hash chain (must match the proxy's).
    pub seed: u64,
    /// Cap of the engine's private map ([`DEFAULT_MAX_BLOCKS`]).
    pub max_blocks: usize,
    /// Most distinct GPU blocks of the engine the sink holds (unbounded by default): beyond it
    /// its oldest entries go, so one engine cannot fill a shared index. Changed while it runs
    /// with [`Subscriber::set_max_index_blocks`].
    pub max_index_blocks: usize,
}

impl Default for EngineSource {
    fn default() -> Self {
        EngineSource {
            slot: 0,
            name: String::new(),
            events: "tcp://127.0.0.1:5557".to_owned(),
            replay: None,
            topic: String::new(),
            dp_ranks: 1,
            block_size: DEFAULT_BLOCK_SIZE,
            seed: DEFAULT_SEED,
            max_blocks: DEFAULT_MAX_BLOCKS,
            max_index_blocks: usize::MAX,
        }
    }
}

impl EngineSource {
    /// Checks the values that would fail later, naming the bad key.
    pub fn validate(&self) -> Result<(), SubscriberError> {
        let bad = |key: &'static str, problem: String| {
            Err(SubscriberError::InvalidConfig { engine: self.name.clone(), key, problem })
        };
        for (key, ep) in [("events", Some(&self.events)), ("replay", self.replay.as_ref())] {
            let Some(ep) = ep else { continue };
            if !ep.contains("://") || ep.contains('\0') {
                return bad(key, format!("must be a ZMQ endpoint such as tcp://127.0.0.1:5557 (got {ep:?})"));
            }
            if self.dp_ranks > 1 {
                if let Err(problem) = offset_endpoint(ep, self.dp_ranks - 1) {
                    return bad(key, problem);
                }
            }
        }
        if self.dp_ranks == 0 || self.dp_ranks > MAX_DP_RANKS {
            return bad("dp_ranks", format!("must be in 1..={MAX_DP_RANKS} (got {})", self.dp_ranks));
        }
        if self.block_size == 0 {
            return bad("block_size", "must be at least 1".into());
        }
        if self.max_blocks == 0 {
            return bad("max_blocks", "must be at least 1".into());
        }
        if self.max_index_blocks == 0 {
            return bad("max_index_blocks", "must be at least 1".into());
        }
        Ok(())
    }
}

/// The endpoint DP rank `rank` of an engine uses (vLLM's `offset_endpoint_port`, spec §1.2):
/// `tcp://host:P` becomes `tcp://host:P+rank` (port 0 stays 0), `inproc://x` becomes
/// `inproc://x_dp<rank>`; any other scheme has no per-rank form.
pub fn offset_endpoint(endpoint: &str, rank: u32) -> Result<String, String> {
    if rank == 0 {
        return Ok(endpoint.to_owned());
    }
    if let Some(rest) = endpoint.strip_prefix("tcp://") {
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| format!("{endpoint:?} has no port"))?;
        let port: u32 = port.parse().map_err(|_| format!("{endpoint:?} has no numeric port"))?;
        if port == 0 {
            return Ok(endpoint.to_owned());
        }
        let port = port.checked_add(rank).filter(|&p| p <= 65535);
        let port = port.ok_or_else(|| format!("{endpoint:?} + rank {rank} is beyond port 65535"))?;
        Ok(format!("tcp://{host}:{port}"))
    } else if endpoint.starts_with("inproc://") {
        Ok(format!("{endpoint}_dp{rank}"))
    } else {
        Err(format!("{endpoint:?}: only tcp:// and inproc:// endpoints have per-rank forms"))
    }
}

/// Tunables of the subscriber thread (all engines).
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriberOptions {
    /// How long a replay may stay silent ([`DEFAULT_REPLAY_TIMEOUT`]).
    pub replay_timeout: Duration,
    /// Upkeep period ([`DEFAULT_MAINTAIN_INTERVAL`]).
    pub maintain_interval: Duration,
    /// Live messages buffered per stream during a replay ([`DEFAULT_MAX_REPLAY_BUFFER`]).
    pub max_replay_buffer: usize,
    /// Payload bytes buffered per stream during a replay ([`DEFAULT_MAX_REPLAY_BUFFER_BYTES`]).
    pub max_replay_buffer_bytes: usize,
    /// `ZMQ_MAXMSGSIZE` of every socket ([`DEFAULT_MAX_MESSAGE_BYTES`]).
    pub max_message_bytes: i64,
    /// `ZMQ_RCVHWM` of every socket ([`DEFAULT_RCVHWM`]).
    pub rcvhwm: i32,
}

impl Default for SubscriberOptions {
    fn default() -> Self {
        SubscriberOptions {
            replay_timeout: DEFAULT_REPLAY_TIMEOUT,
            maintain_interval: DEFAULT_MAINTAIN_INTERVAL,
            max_replay_buffer: DEFAULT_MAX_REPLAY_BUFFER,
            max_replay_buffer_bytes: DEFAULT_MAX_REPLAY_BUFFER_BYTES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            rcvhwm: DEFAULT_RCVHWM,
        }
    }
}

/// Errors of the subscriber and its configuration.
#[derive(Debug, thiserror::Error)]
pub enum SubscriberError {
    /// A configuration value is unusable.
    #[error("kv-events subscriber: engine {engine:?}: `{key}` {problem}")]
    InvalidConfig {
        /// The engine's name.
        engine: String,
        /// The config key.
        key: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// Another engine already has this slot.
    #[error("kv-events subscriber: engine slot {slot} is already in use")]
    SlotInUse {
        /// The slot.
        slot: EngineSlot,
    },
    /// Creating, configuring or connecting a socket failed.
    #[error("kv-events subscriber: {op} failed for {socket} socket of engine {engine:?} ({endpoint}): {source}")]
    Socket {
        /// The failing operation.
        op: &'static str,
        /// `"SUB"`, `"DEALER"` or `"wake PAIR"`.
        socket: &'static str,
        /// The engine's name (empty for the wake socket).
        engine: String,
        /// The endpoint.
        endpoint: String,
        /// libzmq's error.
        source: zmq::Error,
    },
    /// The OS refused to start the thread.
    #[error("kv-events subscriber: cannot spawn the subscriber thread: {0}")]
    Spawn(std::io::Error),
    /// The sink refused to register an engine (e.g. every slot is taken).
    #[error("kv-events subscriber: cannot register engine {engine:?}: {problem}")]
    Register {
        /// The engine's name.
        engine: String,
        /// Why.
        problem: String,
    },
    /// The subscriber thread is gone (it panicked or stopped).
    #[error("kv-events subscriber: the subscriber thread is not running")]
    Stopped,
}

/// Statistics of one engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineStats {
    /// The engine's slot.
    pub slot: EngineSlot,
    /// Its name.
    pub name: String,
    /// Its counters since it was added.
    pub counters: CounterValues,
    /// Entries in its private map (all ranks and tiers).
    pub blocks: u64,
}

/// Statistics of a [`Subscriber`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberStats {
    /// Counter totals over every engine ever followed.
    pub totals: CounterValues,
    /// The engines followed now, by slot.
    pub engines: Vec<EngineStats>,
}

impl SubscriberStats {
    /// The statistics of one engine.
    pub fn engine(&self, slot: EngineSlot) -> Option<&EngineStats> {
        self.engines.iter().find(|e| e.slot == slot)
    }
}

/// A running subscriber: the handle of the thread that owns the sockets and the sink. `Send` and
/// `Sync`; dropping it stops and joins the thread (as [`Subscriber::shutdown`] and
/// [`Subscriber::close`] do).
pub struct Subscriber {
    tx: Sender<Command>,
    wake: Mutex<zmq::Socket>,
    thread: Mutex<Option<JoinHandle<()>>>,
    totals: Arc<SharedCounters>,
    engines: Mutex<Vec<(EngineSlot, String, Arc<SharedCounters>)>>,
}

/// Makes inproc wake endpoint names unique within the process.
static WAKE_ID: AtomicU64 = AtomicU64::new(0);

impl Subscriber {
    /// Starts following `sources`, feeding `sink`, on a new ZMQ context with default options.
    pub fn spawn(
        sources: impl IntoIterator<Item = EngineSource>,
        sink: impl BlockSink + Send + 'static,
    ) -> Result<Subscriber, SubscriberError> {
        Subscriber::spawn_with(&zmq::Context::new(), SubscriberOptions::default(), sources, sink)
    }

    /// Like [`Subscriber::spawn`] on the caller's context (needed for `inproc://` engines) with
    /// explicit options.
    pub fn spawn_with(
        ctx: &zmq::Context,
        options: SubscriberOptions,
        sources: impl IntoIterator<Item = EngineSource>,
        sink: impl BlockSink + Send + 'static,
    ) -> Result<Subscriber, SubscriberError> {
        let wake_ep = format!("inproc://gantry-kvindex-subscriber-wake-{}", WAKE_ID.fetch_add(1, Ordering::Relaxed));
        let wake_err = |op, source| SubscriberError::Socket {
            op,
            socket: "wake PAIR",
            engine: String::new(),
            endpoint: wake_ep.clone(),
            source,
        };
        let wake_rx = ctx.socket(zmq::PAIR).map_err(|e| wake_err("create", e))?;
        wake_rx.set_linger(0).map_err(|e| wake_err("set ZMQ_LINGER", e))?;
        wake_rx.bind(&wake_ep).map_err(|e| wake_err("bind", e))?;
        let wake = ctx.socket(zmq::PAIR).map_err(|e| wake_err("create", e))?;
        wake.set_linger(0).map_err(|e| wake_err("set ZMQ_LINGER", e))?;
        wake.connect(&wake_ep).map_err(|e| wake_err("connect", e))?;

        let (tx, rx) = crossbeam_channel::unbounded();
        let mut worker = Worker::new(ctx.clone(), options, EventApplier::new(sink), rx, wake_rx);
        let mut engines = Vec::new();
        for source in sources {
            let counters = worker.add_engine(source.clone())?;
            engines.push((source.slot, source.name, counters));
        }
        let totals = worker.totals();
        let thread = std::thread::Builder::new()
            .name("kv-events-sub".into())
            .spawn(move || worker.run())
            .map_err(SubscriberError::Spawn)?;
        Ok(Subscriber {
            tx,
            wake: Mutex::new(wake),
            thread: Mutex::new(Some(thread)),
            totals,
            engines: Mutex::new(engines),
        })
    }

    /// Starts following another engine. Returns once its sockets are connected (the engine need
    /// not be up yet: libzmq keeps reconnecting).
    pub fn add_engine(&self, source: EngineSource) -> Result<(), SubscriberError> {
        let (slot, name) = (source.slot, source.name.clone());
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.command(Command::Add(source, reply))?;
        let counters = rx.recv().map_err(|_| SubscriberError::Stopped)??;
        self.engines.lock().unwrap_or_else(|p| p.into_inner()).push((slot, name, counters));
        Ok(())
    }

    /// Stops following an engine and removes all its blocks from the sink (counted as a resync)
    /// before returning. `Ok(false)` when no engine had this slot.
    pub fn remove_engine(&self, slot: EngineSlot) -> Result<bool, SubscriberError> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.command(Command::Remove(slot, reply))?;
        let removed = rx.recv().map_err(|_| SubscriberError::Stopped)?;
        self.engines.lock().unwrap_or_else(|p| p.into_inner()).retain(|(s, _, _)| *s != slot);
        Ok(removed)
    }

    /// Sets how many GPU blocks of the engine in `slot` the sink may hold
    /// ([`EngineSource::max_index_blocks`]), dropping its oldest entries now if it holds more.
    /// `Ok(false)` when no engine is followed in that slot.
    pub fn set_max_index_blocks(&self, slot: EngineSlot, blocks: usize) -> Result<bool, SubscriberError> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.command(Command::SetMaxIndexBlocks(slot, blocks.max(1), reply))?;
        rx.recv().map_err(|_| SubscriberError::Stopped)
    }

    /// Asks the sink, on the subscriber's thread (which owns it), for the slot of the engine
    /// called `name` ([`BlockSink::register`]): how engines join while the subscriber runs.
    /// Follow its events with [`Subscriber::add_engine`].
    pub fn register(&self, name: &str) -> Result<EngineSlot, SubscriberError> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.command(Command::Register(name.to_owned(), reply))?;
        rx.recv().map_err(|_| SubscriberError::Stopped)?
    }

    /// Stops following the engine in `slot` (if it was followed), then has the sink drop its
    /// blocks and free the slot ([`BlockSink::release`]) before returning.
    pub fn release(&self, slot: EngineSlot) -> Result<(), SubscriberError> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.command(Command::Release(slot, reply))?;
        rx.recv().map_err(|_| SubscriberError::Stopped)?;
        self.engines.lock().unwrap_or_else(|p| p.into_inner()).retain(|(s, _, _)| *s != slot);
        Ok(())
    }

    /// Current counters (lock-free reads of the thread's statistics).
    pub fn stats(&self) -> SubscriberStats {
        let engines = self.engines.lock().unwrap_or_else(|p| p.into_inner());
        let mut engines: Vec<EngineStats> = engines
            .iter()
            .map(|(slot, name, c)| EngineStats {
                slot: *slot,
                name: name.clone(),
                counters: c.values(),
                blocks: c.blocks(),
            })
            .collect();
        engines.sort_by_key(|e| e.slot);
        SubscriberStats { totals: self.totals.values(), engines }
    }

    /// Stops the thread and waits for it. Blocks already in the sink stay there.
    pub fn shutdown(self) {
        self.close();
    }

    /// [`Subscriber::shutdown`] through a shared reference: the thread stops and drops the sink
    /// (an index writer releases its segment's lock) before this returns. Later calls, and
    /// commands, find it stopped ([`SubscriberError::Stopped`]).
    pub fn close(&self) {
        let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
        let _ = self.command(Command::Shutdown);
        if thread.join().is_err() {
            error!("kv-events subscriber thread panicked");
        }
    }

    fn command(&self, cmd: Command) -> Result<(), SubscriberError> {
        self.tx.send(cmd).map_err(|_| SubscriberError::Stopped)?;
        // EAGAIN means wake-ups are already queued; the thread reads the channel on each one.
        let _ = self.wake.lock().unwrap_or_else(|p| p.into_inner()).send(&[][..], zmq::DONTWAIT);
        Ok(())
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests;
