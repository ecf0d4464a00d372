//! The subscriber thread: owns the SUB/DEALER sockets, polls them, and drives trackers and the applier.

use std::fmt::Display;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use tracing::{debug, error};

use super::apply::{EventApplier, SharedCounters};
use super::sequence::{ReplayLimits, SeqTracker, StreamIo};
use super::{offset_endpoint, EngineSource, SubscriberError, SubscriberOptions, READ_BUDGET};
use crate::sink::{BlockSink, Counter, EngineSlot};

/// At most one warning per engine and kind of trouble per this interval; the rest go to debug.
/// (The applier's warnings, `subscriber/apply.rs`, use the same limit.)
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A request from the [`super::Subscriber`] handle, answered on the enclosed channel.
pub(crate) enum Command {
    Add(EngineSource, Sender<Result<Arc<SharedCounters>, SubscriberError>>),
    Remove(EngineSlot, Sender<bool>),
    Register(String, Sender<Result<EngineSlot, SubscriberError>>),
    Release(EngineSlot, Sender<()>),
    SetMaxIndexBlocks(EngineSlot, usize, Sender<bool>),
    Shutdown,
}

#[derive(Clone, Copy)]
enum Source {
    Live,
    Replay,
}

/// One engine's sockets and stream state.
struct EngineConn {
    slot: EngineSlot,
    name: String,
    ranks: Vec<RankConn>,
    log: Logs,
}

/// One DP rank of an engine: its SUB socket, its DEALER (while one is needed) and its tracker.
struct RankConn {
    rank: u32,
    sub: zmq::Socket,
    replay: Option<String>,
    dealer: Option<zmq::Socket>,
    tracker: SeqTracker,
}

/// Rate limits of one engine's warnings.
#[derive(Default)]
struct Logs {
    decode: LogLimiter,
    stream: LogLimiter,
}

/// Lets one message through per [`LOG_INTERVAL`] and counts the ones held back.
#[derive(Default)]
pub(super) struct LogLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

/// Logs through a [`LogLimiter`]: `limited_warn!(limiter, now; field, ...; "message", args)` is a
/// warning (with the count of those it held back) when the limiter allows one, else a debug line,
/// with the same fields (given as variables).
macro_rules! limited_warn {
    ($limiter:expr, $now:expr; $($field:ident),*; $($msg:tt)+) => {
        match $limiter.allow($now) {
            Some(suppressed) => tracing::warn!($($field,)* suppressed, $($msg)+),
            None => tracing::debug!($($field,)* $($msg)+),
        }
    };
}
pub(super) use limited_warn;

impl LogLimiter {
    /// `Some(suppressed since the last one)` when this one may be a warning.
    pub(super) fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_none_or(|t| now.duration_since(t) >= LOG_INTERVAL) {
            self.last = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

pub(crate) struct Worker<S> {
    ctx: zmq::Context,
    options: SubscriberOptions,
    limits: ReplayLimits,
    applier: EventApplier<S>,
    commands: Receiver<Command>,
    wake: zmq::Socket,
    engines: Vec<EngineConn>,
    /// Frames of the message being handled (the rest of a longer message go to `spare`).
    frames: [zmq::Message; 4],
    spare: zmq::Message,
    /// Sockets that polled readable: (engine index, rank index, which socket).
    ready: Vec<(usize, usize, Source)>,
    next_maintain: Instant,
}

impl<S: BlockSink> Worker<S> {
    pub(crate) fn new(
        ctx: zmq::Context,
        options: SubscriberOptions,
        applier: EventApplier<S>,
        commands: Receiver<Command>,
        wake: zmq::Socket,
    ) -> Self {
        let limits = ReplayLimits {
            timeout: options.replay_timeout,
            max_buffered: options.max_replay_buffer,
            max_buffered_bytes: options.max_replay_buffer_bytes,
        };
        Worker {
            ctx,
            next_maintain: Instant::now() + options.maintain_interval,
            options,
            limits,
            applier,
            commands,
            wake,
            engines: Vec::new(),
            frames: std::array::from_fn(|_| zmq::Message::new()),
            spare: zmq::Message::new(),
            ready: Vec::new(),
        }
    }

    pub(crate) fn totals(&self) -> Arc<SharedCounters> {
        self.applier.shared_totals()
    }

    /// Connects an engine's sockets, registers it with the applier and asks for a replay.
    pub(crate) fn add_engine(&mut self, source: EngineSource) -> Result<Arc<SharedCounters>, SubscriberError> {
        source.validate()?;
        if self.engines.iter().any(|e| e.slot == source.slot) {
            return Err(SubscriberError::SlotInUse { slot: source.slot });
        }
        let invalid = |key, problem| SubscriberError::InvalidConfig { engine: source.name.clone(), key, problem };
        let mut ranks = Vec::with_capacity(source.dp_ranks as usize);
        for rank in 0..source.dp_ranks {
            let events = offset_endpoint(&source.events, rank).map_err(|p| invalid("events", p))?;
            let replay = match &source.replay {
                Some(ep) => Some(offset_endpoint(ep, rank).map_err(|p| invalid("replay", p))?),
                None => None,
            };
            let sub = new_socket(&self.ctx, &self.options, zmq::SUB, "SUB", &source.name, &events)?;
            sub.set_subscribe(source.topic.as_bytes())
                .map_err(|e| sock_err("subscribe", "SUB", &source.name, &events, e))?;
            sub.connect(&events).map_err(|e| sock_err("connect", "SUB", &source.name, &events, e))?;
            let dealer = match &replay {
                Some(ep) => Some(new_dealer(&self.ctx, &self.options, &source.name, ep)?),
                None => None,
            };
            ranks.push(RankConn { rank, sub, replay, dealer, tracker: SeqTracker::new(self.limits) });
        }
        self.applier.add_engine(&source)?;
        let counters = self.applier.shared_counters(source.slot).unwrap_or_default();
        debug!(engine = %source.name, slot = source.slot, events = %source.events, replay = ?source.replay, "kv-events: following engine");
        self.engines.push(EngineConn { slot: source.slot, name: source.name, ranks, log: Logs::default() });
        let ei = self.engines.len() - 1;
        let now = Instant::now();
        for ri in 0..self.engines[ei].ranks.len() {
            self.with_stream(ei, ri, now, |tracker, io| tracker.start(now, io));
        }
        Ok(counters)
    }

    fn remove_engine(&mut self, slot: EngineSlot) -> bool {
        let Some(i) = self.engines.iter().position(|e| e.slot == slot) else { return false };
        let engine = self.engines.remove(i);
        debug!(engine = %engine.name, slot, "kv-events: engine removed");
        self.applier.remove_engine(slot)
    }

    pub(crate) fn run(mut self) {
        loop {
            let now = Instant::now();
            let timeout_ms = self.poll_timeout(now);
            let woken = {
                let mut items = Vec::with_capacity(1 + 2 * self.engines.len());
                let mut index = Vec::with_capacity(2 * self.engines.len());
                items.push(self.wake.as_poll_item(zmq::POLLIN));
                for (ei, e) in self.engines.iter().enumerate() {
                    for (ri, r) in e.ranks.iter().enumerate() {
                        items.push(r.sub.as_poll_item(zmq::POLLIN));
                        index.push((ei, ri, Source::Live));
                        if let Some(d) = &r.dealer {
                            items.push(d.as_poll_item(zmq::POLLIN));
                            index.push((ei, ri, Source::Replay));
                        }
                    }
                }
                match zmq::poll(&mut items, timeout_ms) {
                    Ok(_) | Err(zmq::Error::EINTR) => {}
                    Err(e) => {
                        error!(error = %e, "kv-events subscriber: poll failed; stopping");
                        return;
                    }
                }
                self.ready.clear();
                self.ready.extend(items[1..].iter().zip(&index).filter(|(it, _)| it.is_readable()).map(|(_, &i)| i));
                items[0].is_readable()
            };
            let ready = std::mem::take(&mut self.ready);
            for &(ei, ri, source) in &ready {
                self.read_socket(ei, ri, source);
                // Keeps the upkeep on time while many busy sockets are read in one turn.
                self.maintain_if_due(Instant::now());
            }
            self.ready = ready;
            if woken {
                while self.wake.recv_bytes(zmq::DONTWAIT).is_ok() {}
            }
            // Read the channel on every turn: a wake-up may have been coalesced with an earlier one.
            if !self.handle_commands() {
                debug!("kv-events subscriber stopping");
                return;
            }
            let now = Instant::now();
            self.expire_replays(now);
            self.maintain_if_due(now);
        }
    }

    fn maintain_if_due(&mut self, now: Instant) {
        if now >= self.next_maintain {
            self.applier.sink_mut().maintain();
            self.next_maintain = now + self.options.maintain_interval;
        }
    }

    /// Milliseconds until the next upkeep or replay deadline (rounded up, so no busy loop).
    fn poll_timeout(&self, now: Instant) -> i64 {
        let mut until = self.next_maintain;
        for r in self.engines.iter().flat_map(|e| &e.ranks) {
            if let Some(d) = r.tracker.deadline() {
                until = until.min(d);
            }
        }
        let micros = until.saturating_duration_since(now).as_micros();
        i64::try_from(micros.div_ceil(1000)).unwrap_or(i64::MAX)
    }

    /// Handles queued commands; `false` when the thread must stop.
    fn handle_commands(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(Command::Add(source, reply)) => {
                    let _ = reply.send(self.add_engine(source));
                }
                Ok(Command::Remove(slot, reply)) => {
                    let _ = reply.send(self.remove_engine(slot));
                }
                Ok(Command::Register(name, reply)) => {
                    let slot = self.applier.sink_mut().register(&name);
                    let _ = reply.send(slot.map_err(|problem| SubscriberError::Register { engine: name, problem }));
                }
                Ok(Command::Release(slot, reply)) => {
                    self.remove_engine(slot);
                    self.applier.sink_mut().release(slot);
                    let _ = reply.send(());
                }
                Ok(Command::SetMaxIndexBlocks(slot, blocks, reply)) => {
                    let _ = reply.send(self.applier.set_max_index_blocks(slot, blocks));
                }
                Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => return false,
                Err(TryRecvError::Empty) => return true,
            }
        }
    }

    fn expire_replays(&mut self, now: Instant) {
        for ei in 0..self.engines.len() {
            for ri in 0..self.engines[ei].ranks.len() {
                if self.engines[ei].ranks[ri].tracker.deadline().is_some_and(|d| now >= d) {
                    self.with_stream(ei, ri, now, |tracker, io| tracker.on_tick(now, io));
                }
            }
        }
    }

    /// Runs `f` on one stream's tracker with the I/O it needs.
    fn with_stream(&mut self, ei: usize, ri: usize, now: Instant, f: impl FnOnce(&mut SeqTracker, &mut Io<'_, S>)) {
        let Worker { ctx, options, applier, engines, .. } = self;
        let EngineConn { slot, name, ranks, log } = &mut engines[ei];
        let RankConn { rank, replay, dealer, tracker, .. } = &mut ranks[ri];
        let mut io =
            Io { ctx, options, applier, slot: *slot, rank: *rank, name, log, dealer, replay: replay.as_deref(), now };
        f(tracker, &mut io);
    }

    /// Reads up to [`READ_BUDGET`] messages from one socket and hands them to the tracker.
    fn read_socket(&mut self, ei: usize, ri: usize, source: Source) {
        let Worker { ctx, options, applier, engines, frames, spare, .. } = self;
        let EngineConn { slot, name, ranks, log } = &mut engines[ei];
        let RankConn { rank, sub, replay, dealer, tracker } = &mut ranks[ri];
        for _ in 0..READ_BUDGET {
            let sock = match source {
                Source::Live => &*sub,
                Source::Replay => match dealer {
                    Some(d) => &*d,
                    None => return, // abandoned while reading
                },
            };
            let n = match recv_message(sock, frames, spare) {
                Ok(n) => n,
                Err(zmq::Error::EAGAIN) => return,
                Err(e) => {
                    debug!(engine = %name, rank = *rank, error = %e, "kv-events: receive failed");
                    return;
                }
            };
            let now = Instant::now();
            let mut io = Io {
                ctx: &*ctx,
                options: &*options,
                applier: &mut *applier,
                slot: *slot,
                rank: *rank,
                name: name.as_str(),
                log: &mut *log,
                dealer: &mut *dealer,
                replay: replay.as_deref(),
                now,
            };
            match source {
                Source::Live => {
                    if n != 3 {
                        io.bad_message(format_args!("live message of {n} frames (want 3)"));
                        continue;
                    }
                    let Some(seq) = seq_of(&frames[1]) else {
                        io.bad_message(format_args!("sequence frame of {} bytes (want 8)", frames[1].len()));
                        continue;
                    };
                    tracker.on_live(seq, &frames[2], now, &mut io);
                }
                Source::Replay => {
                    // After the DEALER's empty delimiter: [topic, seq, payload] (0.33) or
                    // [seq, payload] (<= 0.24).
                    let (seq_frame, payload) = match n {
                        4 => (&frames[2], &frames[3]),
                        3 => (&frames[1], &frames[2]),
                        _ => {
                            io.bad_message(format_args!("replay message of {n} frames (want 3 or 4)"));
                            continue;
                        }
                    };
                    if !frames[0].is_empty() {
                        io.bad_message(format_args!("replay message without the empty delimiter"));
                        continue;
                    }
                    let Some(seq) = seq_of(seq_frame) else {
                        io.bad_message(format_args!("replay sequence frame of {} bytes (want 8)", seq_frame.len()));
                        continue;
                    };
                    tracker.on_replay(seq, payload, now, &mut io);
                }
            }
        }
    }
}

/// The I/O of one stream, lent to its tracker.
struct Io<'a, S> {
    ctx: &'a zmq::Context,
    options: &'a SubscriberOptions,
    applier: &'a mut EventApplier<S>,
    slot: EngineSlot,
    rank: u32,
    name: &'a str,
    log: &'a mut Logs,
    dealer: &'a mut Option<zmq::Socket>,
    replay: Option<&'a str>,
    now: Instant,
}

impl<S: BlockSink> Io<'_, S> {
    /// A message that cannot be a KV-event message: counted, logged (rate-limited), dropped.
    fn bad_message(&mut self, what: impl Display) {
        self.applier.count(self.slot, Counter::DecodeErrors, 1);
        self.decode_log(what);
    }

    fn decode_log(&mut self, what: impl Display) {
        let (engine, rank) = (self.name, self.rank);
        limited_warn!(self.log.decode, self.now; engine, rank; "kv-events: dropping undecodable message: {what}");
    }

    fn stream_log(&mut self, what: &str) {
        let (engine, rank) = (self.name, self.rank);
        limited_warn!(self.log.stream, self.now; engine, rank; "kv-events: {what}");
    }
}

impl<S: BlockSink> StreamIo for Io<'_, S> {
    fn has_replay(&self) -> bool {
        self.replay.is_some()
    }

    fn apply(&mut self, seq: u64, payload: &[u8]) {
        if let Err(e) = self.applier.apply_payload(self.slot, self.rank, payload) {
            self.decode_log(format_args!("seq {seq}: {e}"));
        }
    }

    fn clear(&mut self, why: &'static str) {
        self.applier.clear_rank(self.slot, self.rank);
        self.stream_log(&format!("cleared the rank's blocks: {why}"));
    }

    fn request_replay(&mut self, start: u64) -> bool {
        let Some(ep) = self.replay else { return false };
        if self.dealer.is_none() {
            match new_dealer(self.ctx, self.options, self.name, ep) {
                Ok(d) => *self.dealer = Some(d),
                Err(e) => {
                    self.stream_log(&format!("cannot open the replay socket: {e}"));
                    return false;
                }
            }
        }
        let Some(dealer) = self.dealer.as_ref() else { return false };
        match dealer.send_multipart([&[][..], &start.to_be_bytes()[..]], zmq::DONTWAIT) {
            Ok(()) => {
                debug!(engine = self.name, rank = self.rank, start, "kv-events: replay requested");
                true
            }
            Err(e) => {
                self.stream_log(&format!("cannot send a replay request: {e}"));
                false
            }
        }
    }

    fn cancel_replay(&mut self, why: &'static str) {
        // Closing the DEALER (linger 0) discards any reply still on its way; the next request
        // opens a new one with a new identity.
        *self.dealer = None;
        self.stream_log(&format!("replay abandoned: {why}"));
    }

    fn count(&mut self, counter: Counter) {
        self.applier.count(self.slot, counter, 1);
    }
}

fn seq_of(frame: &[u8]) -> Option<u64> {
    frame.try_into().ok().map(u64::from_be_bytes)
}

/// Receives one multipart message: the first frames into `frames`, any beyond into `spare`.
/// Returns the frame count; `EAGAIN` when nothing is waiting.
fn recv_message(sock: &zmq::Socket, frames: &mut [zmq::Message; 4], spare: &mut zmq::Message) -> zmq::Result<usize> {
    sock.recv(&mut frames[0], zmq::DONTWAIT)?;
    let mut more = frames[0].get_more();
    let mut n = 1;
    while more {
        // The parts of a message arrive together, so these never wait.
        let msg = if n < frames.len() { &mut frames[n] } else { &mut *spare };
        sock.recv(msg, zmq::DONTWAIT)?;
        more = msg.get_more();
        n += 1;
    }
    Ok(n)
}

fn sock_err(
    op: &'static str,
    socket: &'static str,
    engine: &str,
    endpoint: &str,
    source: zmq::Error,
) -> SubscriberError {
    SubscriberError::Socket { op, socket, engine: engine.to_owned(), endpoint: endpoint.to_owned(), source }
}

fn new_socket(
    ctx: &zmq::Context,
    options: &SubscriberOptions,
    kind: zmq::SocketType,
    socket: &'static str,
    engine: &str,
    endpoint: &str,
) -> Result<zmq::Socket, SubscriberError> {
    let err = |op| move |e| sock_err(op, socket, engine, endpoint, e);
    let s = ctx.socket(kind).map_err(err("create"))?;
    s.set_linger(0).map_err(err("set ZMQ_LINGER"))?;
    s.set_rcvhwm(options.rcvhwm).map_err(err("set ZMQ_RCVHWM"))?;
    s.set_maxmsgsize(options.max_message_bytes).map_err(err("set ZMQ_MAXMSGSIZE"))?;
    Ok(s)
}

fn new_dealer(
    ctx: &zmq::Context,
    options: &SubscriberOptions,
    engine: &str,
    endpoint: &str,
) -> Result<zmq::Socket, SubscriberError> {
    let d = new_socket(ctx, options, zmq::DEALER, "DEALER", engine, endpoint)?;
    d.connect(endpoint).map_err(|e| sock_err("connect", "DEALER", engine, endpoint, e))?;
    Ok(d)
}
