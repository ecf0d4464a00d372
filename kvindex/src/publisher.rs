//! ZMQ KV-event publisher with a replay socket, behaving like vLLM 0.33's `ZmqEventPublisher`.
//!
//! # Threading and wake-up
//!
//! [`Publisher::start`] creates and binds every socket on the caller's thread (so a port conflict
//! is returned as an error), then hands them to one dedicated OS thread:
//!
//! * a bounded crossbeam channel (`max_queue_size`) carries batches from [`Publisher::publish`]
//!   to the thread; `publish` uses `try_send` and drops the batch when it is full;
//! * after each enqueue, `publish` sends an empty message on an inproc `PAIR` socket (the *wake
//!   socket*, non-blocking; a full wake queue means wake-ups are already pending);
//! * the thread blocks in `zmq::poll` (no timeout) on the wake socket and the replay `ROUTER`. On
//!   wake it drains all wake messages and then the whole channel, so no wake-up is lost: an item
//!   enqueued after the drain is followed by a fresh wake message. Replay requests are therefore
//!   answered as soon as they arrive (vLLM polls every 100 ms), and an idle publisher never
//!   wakes.
//!
//! Shutdown ([`Drop`]): drop the channel sender, wake the thread, which publishes what is still
//! queued (as vLLM does), sees the channel disconnected, and closes its sockets (linger 0).
//!
//! # Wire behaviour
//!
//! Live messages are `[topic, seq (u64 BE, from 0), payload]` (spec §1.3); the last
//! `buffer_steps` `(seq, payload)` pairs are kept for replay (§1.4). Replay requests are
//! `[identity, <delimiter>, start_seq]` on the `ROUTER`; any other frame count is logged and
//! ignored. As in vLLM, the delimiter's content is not checked and `start_seq` is read as an
//! unsigned big-endian integer of any length (`int.from_bytes(.., "big")`).

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use tracing::{debug, error, warn};

use crate::events::{encode_batch, KvEvent, KvEventBatch, WireFormat};

/// vLLM's default PUB endpoint.
pub const DEFAULT_ENDPOINT: &str = "tcp://*:5557";
/// vLLM's default number of batches kept for replay.
pub const DEFAULT_BUFFER_STEPS: usize = 10_000;
/// vLLM's default PUB send high-water mark.
pub const DEFAULT_HWM: i32 = 100_000;
/// vLLM's default bound of the queue between the engine and the publisher thread.
pub const DEFAULT_MAX_QUEUE_SIZE: usize = 100_000;
/// Sequence number of the replay end marker (`-1` as signed 64-bit).
pub const END_SEQ: u64 = u64::MAX;
/// At most one "queue full" warning per this interval; the rest are counted in
/// [`PublisherStats::dropped`].
const DROP_WARN_INTERVAL: Duration = Duration::from_secs(1);

/// Replay reply framing, which changed between vLLM 0.24 and 0.33 (spec §1.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplayFraming {
    /// 0.33: `[id, <empty>, topic, seq, payload]`, end `[id, <empty>, <empty>, FF×8, <empty>]`.
    #[default]
    V033,
    /// <= 0.24: `[id, <empty>, seq, payload]`, end `[id, <empty>, FF×8, <empty>]`.
    Legacy,
}

/// Configuration of one publisher (vLLM's `KVEventsConfig` subset, spec §1.1).
#[derive(Debug, Clone, PartialEq)]
pub struct PublisherConfig {
    /// PUB endpoint. With `bind`, a `tcp://host:0` or `tcp://host:*` endpoint binds an ephemeral
    /// port; [`Publisher::endpoint`] reports the resolved address.
    pub endpoint: String,
    /// Replay ROUTER endpoint (always bound, as in vLLM); `None` disables replay.
    pub replay_endpoint: Option<String>,
    /// First frame of every message; may be empty.
    pub topic: String,
    /// Number of most recent batches kept for replay ([`DEFAULT_BUFFER_STEPS`]).
    pub buffer_steps: usize,
    /// PUB `ZMQ_SNDHWM` ([`DEFAULT_HWM`]).
    pub hwm: i32,
    /// Bound of the queue between [`Publisher::publish`] and the thread ([`DEFAULT_MAX_QUEUE_SIZE`]).
    pub max_queue_size: usize,
    /// Event encoding (map: vLLM >= 0.24; array: <= 0.23).
    pub format: WireFormat,
    /// Replay reply framing.
    pub replay_framing: ReplayFraming,
    /// `true`: bind the PUB endpoint; `false`: connect it (to a SUB that binds).
    pub bind: bool,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        PublisherConfig {
            endpoint: DEFAULT_ENDPOINT.to_owned(),
            replay_endpoint: None,
            topic: String::new(),
            buffer_steps: DEFAULT_BUFFER_STEPS,
            hwm: DEFAULT_HWM,
            max_queue_size: DEFAULT_MAX_QUEUE_SIZE,
            format: WireFormat::Map,
            replay_framing: ReplayFraming::V033,
            bind: true,
        }
    }
}

impl PublisherConfig {
    /// Checks the values that would otherwise fail later or panic, naming the bad key.
    pub fn validate(&self) -> Result<(), PublisherError> {
        let bad = |key: &'static str, problem: String| Err(PublisherError::InvalidConfig { key, problem });
        check_endpoint("endpoint", &self.endpoint)?;
        if let Some(replay) = &self.replay_endpoint {
            check_endpoint("replay_endpoint", replay)?;
        }
        if self.max_queue_size == 0 {
            return bad("max_queue_size", "must be at least 1".into());
        }
        if self.hwm < 0 {
            return bad("hwm", format!("must be >= 0 (0 = unlimited), got {}", self.hwm));
        }
        if replay_hwm(self.buffer_steps).is_none() {
            return bad(
                "buffer_steps",
                format!("{} is too large: 2*(buffer_steps+1) must fit in i32", self.buffer_steps),
            );
        }
        Ok(())
    }
}

/// Counters of one publisher (monotonic since start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PublisherStats {
    /// Batches given a sequence number and sent on the PUB socket.
    pub published: u64,
    /// Batches dropped by [`Publisher::publish`] because the queue was full (or the thread gone).
    pub dropped: u64,
    /// Well-formed replay requests answered.
    pub replay_requests: u64,
    /// Malformed replay requests (wrong frame count) ignored.
    pub replay_requests_ignored: u64,
}

/// Errors of [`Publisher::start`] and [`PublisherConfig::validate`].
#[derive(Debug, thiserror::Error)]
pub enum PublisherError {
    /// A configuration value is unusable.
    #[error("kv-events publisher config: `{key}` {problem}")]
    InvalidConfig {
        /// The config key.
        key: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// Binding a socket failed (e.g. address in use).
    #[error("kv-events publisher: cannot bind {socket} socket to {endpoint}: {source}")]
    Bind {
        /// `"PUB"`, `"replay ROUTER"` or `"wake PAIR"`.
        socket: &'static str,
        /// The endpoint as configured.
        endpoint: String,
        /// libzmq's error.
        source: zmq::Error,
    },
    /// Connecting a socket failed (e.g. malformed endpoint).
    #[error("kv-events publisher: cannot connect {socket} socket to {endpoint}: {source}")]
    Connect {
        /// `"PUB"` or `"wake PAIR"`.
        socket: &'static str,
        /// The endpoint as configured.
        endpoint: String,
        /// libzmq's error.
        source: zmq::Error,
    },
    /// Creating or configuring a socket failed.
    #[error("kv-events publisher: {op} failed on {socket} socket for {endpoint}: {source}")]
    Socket {
        /// The failing operation.
        op: &'static str,
        /// Which socket.
        socket: &'static str,
        /// The endpoint it serves.
        endpoint: String,
        /// libzmq's error.
        source: zmq::Error,
    },
    /// The OS refused to start the publisher thread.
    #[error("kv-events publisher: cannot spawn the publisher thread for {endpoint}: {source}")]
    Spawn {
        /// The PUB endpoint.
        endpoint: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A running publisher: one PUB socket, an optional replay ROUTER and the thread that owns them.
///
/// `Send` but not `Sync`: it is owned by one engine thread, like vLLM's per-engine-core publisher.
pub struct Publisher {
    tx: Option<Sender<KvEventBatch>>,
    wake: zmq::Socket,
    thread: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
    endpoint: String,
    replay_endpoint: Option<String>,
    max_queue_size: usize,
    last_drop_warn: Cell<Option<Instant>>,
}

impl Publisher {
    /// Validates `cfg`, creates and binds (or connects) the sockets, and starts the thread.
    pub fn start(ctx: &zmq::Context, cfg: PublisherConfig) -> Result<Publisher, PublisherError> {
        cfg.validate()?;

        let pub_sock = new_socket(ctx, zmq::PUB, "PUB", &cfg.endpoint)?;
        set_opt("set ZMQ_SNDHWM", "PUB", &cfg.endpoint, pub_sock.set_sndhwm(cfg.hwm))?;
        let endpoint = if cfg.bind {
            bind_resolved(&pub_sock, "PUB", &cfg.endpoint)?
        } else {
            pub_sock.connect(&cfg.endpoint).map_err(|source| PublisherError::Connect {
                socket: "PUB",
                endpoint: cfg.endpoint.clone(),
                source,
            })?;
            cfg.endpoint.clone()
        };

        let (router, replay_endpoint) = match &cfg.replay_endpoint {
            Some(ep) => {
                let router = new_socket(ctx, zmq::ROUTER, "replay ROUTER", ep)?;
                // validate() guarantees this fits.
                let hwm = replay_hwm(cfg.buffer_steps).unwrap_or(i32::MAX);
                set_opt("set ZMQ_SNDHWM", "replay ROUTER", ep, router.set_sndhwm(hwm))?;
                let resolved = bind_resolved(&router, "replay ROUTER", ep)?;
                (Some(router), Some(resolved))
            }
            None => (None, None),
        };

        let wake_ep = format!("inproc://gantry-kvindex-publisher-wake-{}", WAKE_ID.fetch_add(1, Ordering::Relaxed));
        let wake_rx = new_socket(ctx, zmq::PAIR, "wake PAIR", &wake_ep)?;
        wake_rx.bind(&wake_ep).map_err(|source| PublisherError::Bind {
            socket: "wake PAIR",
            endpoint: wake_ep.clone(),
            source,
        })?;
        let wake = new_socket(ctx, zmq::PAIR, "wake PAIR", &wake_ep)?;
        wake.connect(&wake_ep).map_err(|source| PublisherError::Connect {
            socket: "wake PAIR",
            endpoint: wake_ep.clone(),
            source,
        })?;

        let (tx, rx) = crossbeam_channel::bounded(cfg.max_queue_size);
        let counters = Arc::new(Counters::default());
        let worker = Worker {
            rx,
            wake: wake_rx,
            pub_sock,
            router,
            topic: cfg.topic.into_bytes(),
            format: cfg.format,
            framing: cfg.replay_framing,
            buffer_steps: cfg.buffer_steps,
            buffer: VecDeque::with_capacity(cfg.buffer_steps.min(1024)),
            next_seq: 0,
            counters: Arc::clone(&counters),
            endpoint: endpoint.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("kv-events-pub".into())
            .spawn(move || worker.run())
            .map_err(|source| PublisherError::Spawn { endpoint: endpoint.clone(), source })?;
        debug!(%endpoint, replay_endpoint = ?replay_endpoint, "kv-events publisher started");

        Ok(Publisher {
            tx: Some(tx),
            wake,
            thread: Some(thread),
            counters,
            endpoint,
            replay_endpoint,
            max_queue_size: cfg.max_queue_size,
            last_drop_warn: Cell::new(None),
        })
    }

    /// Queues one batch; `ts` is stamped now (as vLLM's scheduler does when it builds the batch),
    /// the thread adds the sequence number and `data_parallel_rank = 0`. Never blocks: when the
    /// queue is full the batch is dropped, counted and warned about (at most once a second).
    pub fn publish(&self, events: Vec<KvEvent>) {
        let batch = KvEventBatch {
            ts: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
            events,
            data_parallel_rank: None,
        };
        let Some(tx) = &self.tx else { return };
        match tx.try_send(batch) {
            Ok(()) => {
                // EAGAIN means wake messages are already queued; the thread will drain the channel.
                let _ = self.wake.send(&[][..], zmq::DONTWAIT);
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                let dropped = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                let now = Instant::now();
                if self.last_drop_warn.get().is_none_or(|t| now.duration_since(t) >= DROP_WARN_INTERVAL) {
                    self.last_drop_warn.set(Some(now));
                    warn!(
                        endpoint = %self.endpoint,
                        dropped_total = dropped,
                        max_queue_size = self.max_queue_size,
                        "kv-events publisher queue full (or publisher thread gone); dropping batch"
                    );
                }
            }
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> PublisherStats {
        let c = &self.counters;
        PublisherStats {
            published: c.published.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            replay_requests: c.replay_requests.load(Ordering::Relaxed),
            replay_requests_ignored: c.replay_ignored.load(Ordering::Relaxed),
        }
    }

    /// The PUB endpoint: the address actually bound (ephemeral port resolved, `*` expanded to
    /// `0.0.0.0`) or, when connecting, the configured one.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The bound replay endpoint, if replay is enabled.
    pub fn replay_endpoint(&self) -> Option<&str> {
        self.replay_endpoint.as_deref()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        drop(self.tx.take());
        let _ = self.wake.send(&[][..], zmq::DONTWAIT);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!(endpoint = %self.endpoint, "kv-events publisher thread panicked");
            }
        }
    }
}

/// Counters shared by the handle and the thread. Plain statistics: `Relaxed` everywhere, nothing
/// else is published through them.
#[derive(Default)]
struct Counters {
    published: AtomicU64,
    dropped: AtomicU64,
    replay_requests: AtomicU64,
    replay_ignored: AtomicU64,
}

/// Makes inproc wake endpoint names unique within the process.
static WAKE_ID: AtomicU64 = AtomicU64::new(0);

/// State owned by the publisher thread.
struct Worker {
    rx: Receiver<KvEventBatch>,
    wake: zmq::Socket,
    pub_sock: zmq::Socket,
    router: Option<zmq::Socket>,
    topic: Vec<u8>,
    format: WireFormat,
    framing: ReplayFraming,
    buffer_steps: usize,
    buffer: VecDeque<(u64, Vec<u8>)>,
    next_seq: u64,
    counters: Arc<Counters>,
    endpoint: String,
}

impl Worker {
    fn run(mut self) {
        loop {
            let (woken, replay_ready) = {
                let mut items = Vec::with_capacity(2);
                items.push(self.wake.as_poll_item(zmq::POLLIN));
                if let Some(router) = &self.router {
                    items.push(router.as_poll_item(zmq::POLLIN));
                }
                match zmq::poll(&mut items, -1) {
                    Ok(_) => {}
                    Err(zmq::Error::EINTR) => continue,
                    Err(e) => {
                        error!(endpoint = %self.endpoint, error = %e, "kv-events publisher: poll failed; stopping");
                        return;
                    }
                }
                (items[0].is_readable(), items.get(1).is_some_and(|i| i.is_readable()))
            };
            if woken {
                while self.wake.recv_bytes(zmq::DONTWAIT).is_ok() {}
                loop {
                    match self.rx.try_recv() {
                        Ok(batch) => self.publish(batch),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            debug!(endpoint = %self.endpoint, "kv-events publisher stopping");
                            return; // sockets close on drop with linger 0
                        }
                    }
                }
            }
            if replay_ready {
                self.serve_replays();
            }
        }
    }

    fn publish(&mut self, mut batch: KvEventBatch) {
        batch.data_parallel_rank = Some(0);
        let mut payload = Vec::with_capacity(256);
        encode_batch(&batch, self.format, &mut payload);
        let seq = self.next_seq;
        self.next_seq += 1;
        let frames: [&[u8]; 3] = [&self.topic, &seq.to_be_bytes(), &payload];
        if let Err(e) = self.pub_sock.send_multipart(frames, zmq::DONTWAIT) {
            debug!(endpoint = %self.endpoint, seq, error = %e, "kv-events PUB send failed");
        }
        self.counters.published.fetch_add(1, Ordering::Relaxed);
        if self.buffer_steps > 0 {
            if self.buffer.len() == self.buffer_steps {
                self.buffer.pop_front();
            }
            self.buffer.push_back((seq, payload));
        }
    }

    fn serve_replays(&mut self) {
        let Some(router) = &self.router else { return };
        loop {
            let frames = match router.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => frames,
                Err(zmq::Error::EAGAIN) => return,
                Err(e) => {
                    warn!(endpoint = %self.endpoint, error = %e, "kv-events replay receive failed");
                    return;
                }
            };
            let [identity, _delimiter, start] = frames.as_slice() else {
                self.counters.replay_ignored.fetch_add(1, Ordering::Relaxed);
                warn!(
                    endpoint = %self.endpoint,
                    frames = frames.len(),
                    "kv-events replay: invalid request (want [identity, <empty>, start_seq]); ignored"
                );
                continue;
            };
            let start = parse_start_seq(start);
            let sent = self.replay_from(router, identity, start);
            self.counters.replay_requests.fetch_add(1, Ordering::Relaxed);
            debug!(endpoint = %self.endpoint, start, sent, "kv-events replay served");
        }
    }

    /// Sends every buffered batch with `seq >= start`, then the end marker; returns the count.
    fn replay_from(&self, router: &zmq::Socket, identity: &[u8], start: u64) -> usize {
        let mut sent = 0;
        for (seq, payload) in self.buffer.iter().filter(|(seq, _)| *seq >= start) {
            let seq = seq.to_be_bytes();
            let res = match self.framing {
                ReplayFraming::V033 => {
                    router.send_multipart([identity, &[], &self.topic, &seq, payload], zmq::DONTWAIT)
                }
                ReplayFraming::Legacy => router.send_multipart([identity, &[], &seq, payload], zmq::DONTWAIT),
            };
            if let Err(e) = res {
                warn!(endpoint = %self.endpoint, error = %e, "kv-events replay send failed");
                return sent;
            }
            sent += 1;
        }
        let end = END_SEQ.to_be_bytes();
        let res = match self.framing {
            ReplayFraming::V033 => router.send_multipart([identity, &[], &[], &end, &[]], zmq::DONTWAIT),
            ReplayFraming::Legacy => router.send_multipart([identity, &[], &end, &[]], zmq::DONTWAIT),
        };
        if let Err(e) = res {
            warn!(endpoint = %self.endpoint, error = %e, "kv-events replay end marker send failed");
        }
        sent
    }
}

/// `int.from_bytes(b, "big")`, saturated at `u64::MAX` (nothing is replayed then).
fn parse_start_seq(b: &[u8]) -> u64 {
    b.iter().try_fold(0u64, |acc, &x| acc.checked_mul(256).map(|v| v | u64::from(x))).unwrap_or(u64::MAX)
}

/// ROUTER SNDHWM as in vLLM 0.33: `2 * (buffer_steps + 1)`.
fn replay_hwm(buffer_steps: usize) -> Option<i32> {
    buffer_steps.checked_add(1).and_then(|n| n.checked_mul(2)).and_then(|n| i32::try_from(n).ok())
}

fn check_endpoint(key: &'static str, ep: &str) -> Result<(), PublisherError> {
    let problem = if ep.is_empty() {
        "must not be empty"
    } else if ep.contains('\0') {
        "must not contain NUL"
    } else if !ep.contains("://") {
        "must be a ZMQ endpoint such as tcp://127.0.0.1:5557"
    } else {
        return Ok(());
    };
    Err(PublisherError::InvalidConfig { key, problem: format!("{problem} (got {ep:?})") })
}

/// `tcp://host:0` -> `tcp://host:*` (libzmq's spelling of an ephemeral port).
fn bind_address(ep: &str) -> String {
    match ep.strip_suffix(":0") {
        Some(base) if ep.starts_with("tcp://") => format!("{base}:*"),
        _ => ep.to_owned(),
    }
}

/// Binds `sock` and returns `ZMQ_LAST_ENDPOINT` (the resolved address).
fn bind_resolved(sock: &zmq::Socket, socket: &'static str, ep: &str) -> Result<String, PublisherError> {
    sock.bind(&bind_address(ep)).map_err(|source| PublisherError::Bind { socket, endpoint: ep.to_owned(), source })?;
    match sock.get_last_endpoint() {
        Ok(Ok(resolved)) => Ok(resolved),
        Ok(Err(_)) => Ok(ep.to_owned()),
        Err(source) => {
            Err(PublisherError::Socket { op: "get ZMQ_LAST_ENDPOINT", socket, endpoint: ep.to_owned(), source })
        }
    }
}

fn new_socket(
    ctx: &zmq::Context,
    kind: zmq::SocketType,
    socket: &'static str,
    ep: &str,
) -> Result<zmq::Socket, PublisherError> {
    let s = ctx.socket(kind).map_err(|source| PublisherError::Socket {
        op: "create",
        socket,
        endpoint: ep.to_owned(),
        source,
    })?;
    set_opt("set ZMQ_LINGER", socket, ep, s.set_linger(0))?;
    Ok(s)
}

fn set_opt(op: &'static str, socket: &'static str, ep: &str, res: zmq::Result<()>) -> Result<(), PublisherError> {
    res.map_err(|source| PublisherError::Socket { op, socket, endpoint: ep.to_owned(), source })
}

#[cfg(test)]
mod tests;
