//! Per-publisher sequence tracking (spec §1.10): in-order apply, gaps, replays, restarts.
//!
//! [`SeqTracker`] holds the state of one `(engine, dp_rank)` stream and decides, for each live
//! or replayed message, whether to apply it, buffer it, ask for a replay or clear the rank. It
//! does no I/O itself: it calls a [`StreamIo`] (the subscriber thread's sockets and applier, or
//! a recording fake in `subscriber/tests.rs`), and it takes the time as an argument, so every
//! transition is unit-testable.
//!
//! `l` is the last sequence number applied, `v` the last one received on the live stream.
//!
//! | situation                                | action                                                     |
//! |------------------------------------------|------------------------------------------------------------|
//! | engine added, replay configured          | replay from 0 (catches up an idle engine too)              |
//! | live `s <= v` (engine restarted)         | drop any replay, clear the rank, handle `s` as a first one |
//! | first live `s` (no `l`)                  | `s == 0` or no replay: apply (baseline); else replay from 0 |
//! | live `s == l + 1`                        | apply                                                      |
//! | live `v < s <= l`                        | skip: a replay already applied it (the live stream lags)   |
//! | live `s > l + 1` (gap)                   | replay from `l + 1`; without replay: clear, apply `s`      |
//! | replayed `r <= l`                        | skip (already applied)                                     |
//! | replayed `r > l + 1` (buffer too short)  | clear the rank, apply `r`                                  |
//! | replay end marker                        | handle the buffered live messages as live ones             |
//! | no reply within the timeout, buffer full | drop the DEALER (late replies cannot arrive), apply the    |
//! |                                          | buffered messages (a remaining gap clears the rank)        |
//!
//! Restarts are recognised on the live stream alone: its messages arrive in order, so a
//! sequence number at or below the previous live one means a new publisher process. Comparing
//! with `l` instead would mistake a live message that was overtaken by the replay (they travel
//! on different connections) for a restart. A restart the live stream does not show (the old
//! process was only known through a replay, or the new one published past `l` before its first
//! message reached us) cannot be told from sequence numbers; spec §1.10's health check is the
//! remedy and lives outside this module.
//!
//! Live messages that arrive while a replay is in flight are buffered (at most `max_buffered`
//! messages and `max_buffered_bytes` payload bytes). A gap between the end of a replay and the
//! buffered messages (batches published after the engine answered and before the SUB socket
//! joined) starts another replay only if the last one returned data; after an empty or abandoned
//! replay it clears the rank, so a replay that cannot fill a gap ends in a clear, not a loop. The
//! timeout is re-armed by every replayed message, so a long replay is not cut off while it makes
//! progress.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::publisher::END_SEQ;
use crate::sink::Counter;

/// What the tracker needs from its surroundings.
pub(crate) trait StreamIo {
    /// Whether this stream has a replay endpoint.
    fn has_replay(&self) -> bool;
    /// Decodes and applies one payload (decode errors are the implementation's to count).
    fn apply(&mut self, seq: u64, payload: &[u8]);
    /// Forgets the stream's state (counts a resync).
    fn clear(&mut self, why: &'static str);
    /// Sends a replay request from `start`; `false` when it could not be sent.
    fn request_replay(&mut self, start: u64) -> bool;
    /// Abandons the replay in flight so that none of its replies can arrive any more.
    fn cancel_replay(&mut self, why: &'static str);
    /// Adds one to a counter.
    fn count(&mut self, counter: Counter);
}

/// Bounds of the replay machinery.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReplayLimits {
    /// How long to wait for the next replay message.
    pub timeout: Duration,
    /// Live messages buffered while a replay is in flight.
    pub max_buffered: usize,
    /// Payload bytes buffered while a replay is in flight.
    pub max_buffered_bytes: usize,
}

/// Sequence state of one `(engine, dp_rank)` stream.
pub(crate) struct SeqTracker {
    /// Last sequence number applied (live or replayed).
    last: Option<u64>,
    /// Last sequence number received on the live stream.
    last_live: Option<u64>,
    replay: Option<Replay>,
    limits: ReplayLimits,
}

struct Replay {
    deadline: Instant,
    /// Whether any batch came back (an empty replay cannot fill a gap; do not repeat it).
    returned_data: bool,
    buffered: VecDeque<(u64, Vec<u8>)>,
    bytes: usize,
}

impl SeqTracker {
    pub(crate) fn new(limits: ReplayLimits) -> Self {
        SeqTracker { last: None, last_live: None, replay: None, limits }
    }

    /// The last sequence number applied.
    #[cfg(test)]
    pub(crate) fn last(&self) -> Option<u64> {
        self.last
    }

    /// When the replay in flight times out, if there is one.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.replay.as_ref().map(|r| r.deadline)
    }

    /// The stream was just connected: fetch what the engine already published.
    pub(crate) fn start(&mut self, now: Instant, io: &mut impl StreamIo) {
        if self.replay.is_none() && self.last.is_none() {
            self.begin_replay(0, now, io);
        }
    }

    /// A live message.
    pub(crate) fn on_live(&mut self, seq: u64, payload: &[u8], now: Instant, io: &mut impl StreamIo) {
        let restarted = self.last_live.is_some_and(|v| seq <= v);
        self.last_live = Some(seq);
        if restarted {
            // What was buffered belongs to the old process: dropped with its replay.
            if self.replay.take().is_some() {
                io.cancel_replay("engine restarted during replay");
            }
            io.clear("sequence went backwards (engine restarted)");
            self.last = None;
        } else if let Some(r) = &mut self.replay {
            let full = r.buffered.len() >= self.limits.max_buffered
                || r.bytes.saturating_add(payload.len()) > self.limits.max_buffered_bytes;
            if !full {
                r.bytes += payload.len();
                r.buffered.push_back((seq, payload.to_vec()));
                return;
            }
            self.abandon("replay buffer full", now, io);
        }
        self.live(seq, payload, now, io, true);
    }

    /// A replayed message, or the end marker (`seq == END_SEQ`). Ignored when no replay is in
    /// flight.
    pub(crate) fn on_replay(&mut self, seq: u64, payload: &[u8], now: Instant, io: &mut impl StreamIo) {
        let Some(r) = &mut self.replay else { return };
        if seq == END_SEQ {
            let (buffered, may_replay) = (std::mem::take(&mut r.buffered), r.returned_data);
            self.replay = None;
            self.drain(buffered, may_replay, now, io);
            return;
        }
        r.deadline = now + self.limits.timeout;
        r.returned_data = true;
        match self.last {
            Some(l) if seq <= l => {} // covered already
            Some(l) if l.checked_add(1) == Some(seq) => self.apply(seq, payload, io),
            Some(_) => {
                io.clear("replay does not reach back to the gap");
                self.apply(seq, payload, io);
            }
            None => self.apply(seq, payload, io),
        }
    }

    /// Gives up a replay whose deadline has passed.
    pub(crate) fn on_tick(&mut self, now: Instant, io: &mut impl StreamIo) {
        if self.replay.as_ref().is_some_and(|r| now >= r.deadline) {
            self.abandon("replay timed out", now, io);
        }
    }

    fn live(&mut self, seq: u64, payload: &[u8], now: Instant, io: &mut impl StreamIo, may_replay: bool) {
        match self.last {
            Some(l) if l.checked_add(1) == Some(seq) => {}
            Some(l) if seq <= l => return, // applied already, from a replay
            Some(l) => {
                // Counted when first seen; a gap met again after a failed replay is the same one.
                if may_replay {
                    io.count(Counter::Gaps);
                    if self.begin_replay(l + 1, now, io) {
                        return self.buffer(seq, payload);
                    }
                }
                io.clear("sequence gap that replay cannot fill");
            }
            None => {
                if seq > 0 && may_replay && self.begin_replay(0, now, io) {
                    return self.buffer(seq, payload);
                }
            }
        }
        self.apply(seq, payload, io);
    }

    fn apply(&mut self, seq: u64, payload: &[u8], io: &mut impl StreamIo) {
        io.apply(seq, payload);
        self.last = Some(seq);
    }

    fn begin_replay(&mut self, start: u64, now: Instant, io: &mut impl StreamIo) -> bool {
        if !io.has_replay() || !io.request_replay(start) {
            return false;
        }
        io.count(Counter::Replays);
        self.replay = Some(Replay {
            deadline: now + self.limits.timeout,
            returned_data: false,
            buffered: VecDeque::new(),
            bytes: 0,
        });
        true
    }

    fn buffer(&mut self, seq: u64, payload: &[u8]) {
        if let Some(r) = &mut self.replay {
            r.bytes += payload.len();
            r.buffered.push_back((seq, payload.to_vec()));
        }
    }

    fn abandon(&mut self, why: &'static str, now: Instant, io: &mut impl StreamIo) {
        let Some(r) = self.replay.take() else { return };
        io.cancel_replay(why);
        self.drain(r.buffered, false, now, io);
    }

    /// Handles live messages buffered during a replay, skipping what the replay covered. When
    /// one of them starts a new replay, the rest move to its buffer.
    fn drain(&mut self, buffered: VecDeque<(u64, Vec<u8>)>, may_replay: bool, now: Instant, io: &mut impl StreamIo) {
        for (seq, payload) in buffered {
            if let Some(r) = &mut self.replay {
                r.bytes += payload.len();
                r.buffered.push_back((seq, payload));
            } else {
                self.live(seq, &payload, now, io, may_replay);
            }
        }
    }
}
