//! The single writer: applies block operations, predictions and expiry to the segment.

use super::layout::*;
use super::reader::IndexReader;
use super::segment::{unix_ms, Segment};
use super::table::{Table, TICK_MASK};
use super::IndexError;
use crate::sink::{BlockSink, Counter, EngineSlot};
use crossbeam_queue::ArrayQueue;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{Relaxed, Release};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a writer creates its segment.
#[derive(Debug, Clone)]
pub struct IndexOptions {
    /// Engine slots (1..=1,024); entries take `16 + 8·ceil(slots/64)` bytes.
    pub engine_slots: usize,
    /// Most blocks in the exact table.
    pub capacity: usize,
    /// Most blocks in the approximate table (0 = approximate mode off).
    pub approx_capacity: usize,
    /// How long a prediction stays (rounded up to whole seconds).
    pub approx_ttl: Duration,
    /// Predictions the cores may queue between two `maintain` calls before new ones are dropped.
    pub approx_queue: usize,
}

impl Default for IndexOptions {
    fn default() -> Self {
        IndexOptions {
            engine_slots: 256,
            capacity: 1 << 20,
            approx_capacity: 0,
            approx_ttl: Duration::from_secs(120),
            approx_queue: 1 << 16,
        }
    }
}

/// Entries sampled per eviction.
const EVICTION_SAMPLE: usize = 8;
/// Predictions applied per `maintain` call (bounds its latency).
const PREDICTIONS_PER_MAINTAIN: usize = 1 << 16;
/// Approximate-table slots checked for expiry per `maintain` call.
const EXPIRY_SCAN_PER_MAINTAIN: usize = 1 << 13;

/// The index's only writer (see the module docs). Not `Clone`: exactly one per segment, enforced
/// across processes by an exclusive lock on `PATH.lock`.
pub struct IndexWriter {
    seg: Arc<Segment>,
    _lock: File,
    /// Store clock: increments per stored block; entries keep the tick of their last store.
    tick: u32,
    hand: usize,
    approx_hand: usize,
    queue: Arc<ArrayQueue<(EngineSlot, u64)>>,
    ttl_secs: u32,
    started: Instant,
}

impl IndexWriter {
    /// Becomes the writer of the segment at `path`: takes `PATH.lock`, then reuses the segment
    /// in place when it has this shape (clearing it and bumping its generation), or creates a
    /// new one (replacing a segment of another shape or layout version, which is marked retired
    /// so its readers know to reopen).
    pub fn create(path: impl AsRef<Path>, opts: &IndexOptions) -> Result<IndexWriter, IndexError> {
        let path = path.as_ref();
        if opts.engine_slots == 0 || opts.engine_slots > MAX_ENGINE_SLOTS {
            return Err(IndexError::Options(format!(
                "engine_slots {} outside 1..={MAX_ENGINE_SLOTS}",
                opts.engine_slots
            )));
        }
        if opts.capacity == 0 || opts.capacity > 1 << 40 || opts.approx_capacity > 1 << 40 {
            return Err(IndexError::Options(format!(
                "capacity {} must be in 1..=2^40 and approx_capacity {} at most 2^40",
                opts.capacity, opts.approx_capacity
            )));
        }
        let lock = lock(path)?;
        let shape = Shape::new(opts.engine_slots, opts.capacity, opts.approx_capacity);
        let seg = match Segment::open(path, true) {
            Ok(old) if *old.shape() == shape => {
                reset(&old);
                old
            }
            Ok(old) => {
                tracing::info!(path = %path.display(), "kvindex: replacing a segment of another shape");
                let new = Segment::create(path, shape)?;
                old.word(H_STATE).store(STATE_RETIRED, Release);
                new
            }
            Err(IndexError::Io { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => {
                Segment::create(path, shape)?
            }
            Err(e @ IndexError::Invalid { .. }) => {
                tracing::warn!("{e}; creating a new segment");
                Segment::create(path, shape)?
            }
            Err(e) => return Err(e),
        };
        seg.word(H_GENERATION).fetch_add(1, Release);
        seg.word(H_WRITER_PID).store(u64::from(std::process::id()), Relaxed);
        let ttl_secs = opts.approx_ttl.as_secs_f64().ceil().clamp(1.0, f64::from(u32::MAX / 2)) as u32;
        seg.word(H_APPROX_TTL_SECS).store(u64::from(ttl_secs), Relaxed);
        let mut w = IndexWriter {
            seg: Arc::new(seg),
            _lock: lock,
            tick: 0,
            hand: 0,
            approx_hand: 0,
            queue: Arc::new(ArrayQueue::new(opts.approx_queue.max(1))),
            ttl_secs,
            started: Instant::now(),
        };
        w.update_clock();
        Ok(w)
    }

    /// A reader of this segment for another core of this process.
    pub fn reader(&self) -> IndexReader {
        IndexReader::from_segment(self.seg.clone())
    }

    /// A handle the routing cores use to send predictions (approximate mode).
    pub fn predictor(&self) -> Predictor {
        Predictor { queue: self.queue.clone(), seg: self.seg.clone() }
    }

    /// The segment's path.
    pub fn path(&self) -> &Path {
        self.seg.path()
    }

    /// The slot of the engine called `name` (its URL), taking a free slot for a new name.
    pub fn register_engine(&mut self, name: &str) -> Result<EngineSlot, IndexError> {
        if name.len() > MAX_ENGINE_NAME {
            return Err(IndexError::Options(format!(
                "engine name {name:?} is {} bytes, longer than {MAX_ENGINE_NAME}",
                name.len()
            )));
        }
        let reader = self.reader();
        if let Some(slot) = reader.engine_slot(name) {
            return Ok(slot);
        }
        let slots = self.seg.shape().engine_slots;
        let free = (0..slots).find(|&s| self.seg.engine(s)[0].load(Relaxed) & USED == 0);
        let Some(slot) = free else {
            return Err(IndexError::NoEngineSlot { name: name.into(), slots });
        };
        self.write_engine(slot, Some(name));
        Ok(slot as EngineSlot)
    }

    /// Frees `slot` after removing every block it holds (both tiers). Returns the entries it held.
    pub fn release_engine(&mut self, slot: EngineSlot) -> usize {
        let n = self.clear_engine(slot);
        self.write_engine(slot as usize, None);
        n
    }

    /// Removes every block `slot` holds, in both tiers (a full scan: for engine restarts and
    /// removals, not for the event path). Returns how many exact entries it held.
    pub fn clear_engine(&mut self, slot: EngineSlot) -> usize {
        let n = clear_bit(&self.seg.exact(), slot as usize);
        let live = self.seg.word(WriterCounter::Live.word());
        live.store(live.load(Relaxed).saturating_sub(n.1 as u64), Relaxed);
        if let Some(approx) = self.seg.approx() {
            let a = clear_bit(&approx, slot as usize);
            let live = self.seg.word(WriterCounter::ApproxLive.word());
            live.store(live.load(Relaxed).saturating_sub(a.1 as u64), Relaxed);
        }
        self.seg.engine(slot as usize)[1].store(0, Relaxed);
        n.0
    }

    /// Stores many blocks of one engine, prefetching ahead (the event path's bulk form).
    pub fn store_blocks(&mut self, engine: EngineSlot, hashes: &[u64]) {
        const AHEAD: usize = 4;
        let seg = self.seg.clone();
        let exact = seg.exact();
        for h in hashes.iter().take(AHEAD) {
            exact.prefetch(*h);
        }
        for (i, &h) in hashes.iter().enumerate() {
            if let Some(&next) = hashes.get(i + AHEAD) {
                exact.prefetch(next);
            }
            self.store(engine, h);
        }
    }

    /// Applies queued predictions (at most `max`). Returns how many were applied.
    pub fn apply_predictions(&mut self, max: usize) -> usize {
        let Some(approx) = self.seg.approx() else {
            return 0;
        };
        let exact = self.seg.exact();
        let expiry = self.now_secs().wrapping_add(self.ttl_secs) & TICK_MASK;
        let mut n = 0;
        while n < max {
            let Some((engine, hash)) = self.queue.pop() else { break };
            n += 1;
            let e = engine as usize;
            if e >= self.seg.shape().engine_slots {
                continue;
            }
            // Already known for real: nothing to predict.
            if let Ok(i) = exact.find(hash) {
                if exact.bits_at(i, e / 64) & (1 << (e % 64)) != 0 {
                    continue;
                }
            }
            match approx.find(hash) {
                Ok(i) => {
                    approx.set_bit(i, e, true, expiry);
                }
                Err(_) => {
                    let cap = self.seg.shape().approx_capacity as u64;
                    if self.counter(WriterCounter::ApproxLive) >= cap {
                        let mut hand = self.approx_hand;
                        self.evict(&approx, &mut hand, true);
                        self.approx_hand = hand;
                    }
                    let free = approx.find(hash).expect_err("absent key stays absent across an eviction");
                    approx.insert_at(free, hash, e, expiry);
                    self.add(WriterCounter::ApproxLive, 1);
                }
            }
            self.add(WriterCounter::ApproxInserted, 1);
        }
        n
    }

    /// Deletes expired predictions among the next `budget` slots of the approximate table.
    pub fn expire_predictions(&mut self, budget: usize) -> usize {
        let Some(approx) = self.seg.approx() else {
            return 0;
        };
        let now = self.now_secs();
        let mut expired = 0;
        let mut i = self.approx_hand % approx.slots();
        for _ in 0..budget.min(approx.slots()) {
            // A deletion may shift a later entry into slot i: look at i again before moving on.
            while approx.occupied(i) && !alive(approx.tick_at(i), now) {
                approx.delete_at(i);
                expired += 1;
            }
            i = if i + 1 == approx.slots() { 0 } else { i + 1 };
        }
        self.approx_hand = i;
        self.sub(WriterCounter::ApproxLive, expired as u64);
        self.add(WriterCounter::ApproxExpired, expired as u64);
        expired
    }

    /// Seconds since this writer started, plus one (so 0 is always in the past).
    fn now_secs(&self) -> u32 {
        self.seg.word(H_NOW_SECS).load(Relaxed) as u32
    }

    fn update_clock(&mut self) {
        let now = self.started.elapsed().as_secs() as u32 + 1;
        self.seg.word(H_NOW_SECS).store(u64::from(now), Relaxed);
        self.seg.word(H_HEARTBEAT_UNIX_MS).store(unix_ms(), Relaxed);
    }

    fn counter(&self, c: WriterCounter) -> u64 {
        self.seg.word(c.word()).load(Relaxed)
    }

    fn add(&self, c: WriterCounter, n: u64) {
        let w = self.seg.word(c.word());
        w.store(w.load(Relaxed).wrapping_add(n), Relaxed);
    }

    fn sub(&self, c: WriterCounter, n: u64) {
        let w = self.seg.word(c.word());
        w.store(w.load(Relaxed).saturating_sub(n), Relaxed);
    }

    fn engine_blocks_add(&self, slot: usize, delta: i64) {
        let w = &self.seg.engine(slot)[1];
        w.store(w.load(Relaxed).saturating_add_signed(delta), Relaxed);
    }

    /// Evicts one entry of `t` (sampled LRU by tick, or earliest expiry for the approximate tier).
    fn evict(&self, t: &Table<'_>, hand: &mut usize, approx: bool) {
        let mut pos = *hand % t.slots();
        let mut best: Option<(usize, u32)> = None;
        let mut seen = 0;
        for _ in 0..t.slots() {
            if t.occupied(pos) {
                // Exact: the oldest store has the largest age. Approximate: the earliest expiry.
                let score = if approx {
                    TICK_MASK - t.tick_at(pos)
                } else {
                    self.tick.wrapping_sub(t.tick_at(pos)) & TICK_MASK
                };
                if best.is_none_or(|(_, s)| score > s) {
                    best = Some((pos, score));
                }
                seen += 1;
            }
            pos = if pos + 1 == t.slots() { 0 } else { pos + 1 };
            if seen == EVICTION_SAMPLE {
                break;
            }
        }
        *hand = pos;
        let Some((victim, _)) = best else { return };
        if approx {
            self.sub(WriterCounter::ApproxLive, 1);
        } else {
            for w in 0..t.bit_words() {
                let mut bits = t.bits_at(victim, w);
                while bits != 0 {
                    self.engine_blocks_add(w * 64 + bits.trailing_zeros() as usize, -1);
                    bits &= bits - 1;
                }
            }
            self.sub(WriterCounter::Live, 1);
            self.add(WriterCounter::Evictions, 1);
        }
        t.delete_at(victim);
    }

    /// Clears `engine`'s bit of `hash` in the approximate tier (a real event overrides it).
    fn unpredict(&self, engine: usize, hash: u64) {
        if let Some(approx) = self.seg.approx() {
            if let Ok(i) = approx.find(hash) {
                let tick = approx.tick_at(i);
                if approx.set_bit(i, engine, false, tick) && approx.is_unheld(i) {
                    approx.delete_at(i);
                    self.sub(WriterCounter::ApproxLive, 1);
                }
            }
        }
    }

    fn write_engine(&mut self, slot: usize, name: Option<&str>) {
        let e = self.seg.engine(slot);
        let v = e[0].load(Relaxed) as u32;
        e[0].store(u64::from(v.wrapping_add(1)), Relaxed);
        std::sync::atomic::fence(Release);
        let bytes = name.unwrap_or("").as_bytes();
        e[1].store(0, Relaxed);
        e[2].store(bytes.len() as u64, Relaxed);
        let mut padded = [0u8; MAX_ENGINE_NAME];
        padded[..bytes.len()].copy_from_slice(bytes);
        for (w, chunk) in e[3..].iter().zip(padded.chunks_exact(8)) {
            w.store(u64::from_le_bytes(chunk.try_into().expect("8-byte chunk")), Relaxed);
        }
        let used = if name.is_some() { USED } else { 0 };
        e[0].store(used | u64::from(v.wrapping_add(2)), Release);
    }
}

/// Engine-table word 0: bit 32 marks a used slot; the low 32 bits are a seqlock version.
pub(crate) const USED: u64 = 1 << 32;

/// Whether an approximate entry with expiry `tick` is still valid at `now`.
#[inline]
pub(crate) fn alive(expiry: u32, now: u32) -> bool {
    // Wrapping comparison in 31 bits: valid while `expiry` is ahead of `now` by less than half
    // the tick range.
    let ahead = expiry.wrapping_sub(now) & TICK_MASK;
    ahead != 0 && ahead < TICK_MASK / 2
}

impl BlockSink for IndexWriter {
    fn store(&mut self, engine: EngineSlot, hash: u64) {
        let e = engine as usize;
        if e >= self.seg.shape().engine_slots {
            return;
        }
        self.tick = self.tick.wrapping_add(1) & TICK_MASK;
        let exact = self.seg.exact();
        match exact.find(hash) {
            Ok(i) => {
                if exact.set_bit(i, e, true, self.tick) {
                    self.engine_blocks_add(e, 1);
                    self.add(WriterCounter::BlocksStored, 1);
                }
            }
            Err(_) => {
                if self.counter(WriterCounter::Live) >= self.seg.shape().capacity as u64 {
                    let mut hand = self.hand;
                    self.evict(&exact, &mut hand, false);
                    self.hand = hand;
                }
                let free = exact.find(hash).expect_err("absent key stays absent across an eviction");
                exact.insert_at(free, hash, e, self.tick);
                self.add(WriterCounter::Live, 1);
                self.engine_blocks_add(e, 1);
                self.add(WriterCounter::BlocksStored, 1);
            }
        }
        self.unpredict(e, hash);
    }

    fn remove(&mut self, engine: EngineSlot, hash: u64) {
        let e = engine as usize;
        if e >= self.seg.shape().engine_slots {
            return;
        }
        let exact = self.seg.exact();
        if let Ok(i) = exact.find(hash) {
            if exact.set_bit(i, e, false, exact.tick_at(i)) {
                self.engine_blocks_add(e, -1);
                self.add(WriterCounter::BlocksRemoved, 1);
                if exact.is_unheld(i) {
                    exact.delete_at(i);
                    self.sub(WriterCounter::Live, 1);
                }
            }
        }
        self.unpredict(e, hash);
    }

    fn count(&mut self, counter: Counter, n: u64) {
        let c = match counter {
            Counter::EventsApplied => WriterCounter::EventsApplied,
            Counter::EventsSkipped => WriterCounter::EventsSkipped,
            Counter::UnknownFields => WriterCounter::UnknownFields,
            Counter::DecodeErrors => WriterCounter::DecodeErrors,
            Counter::Gaps => WriterCounter::Gaps,
            Counter::Replays => WriterCounter::Replays,
            Counter::Resyncs => WriterCounter::Resyncs,
            Counter::OverCapacity => WriterCounter::EngineCapDrops,
        };
        self.add(c, n);
    }

    fn maintain(&mut self) {
        self.update_clock();
        self.apply_predictions(PREDICTIONS_PER_MAINTAIN);
        self.expire_predictions(EXPIRY_SCAN_PER_MAINTAIN);
    }
}

impl Drop for IndexWriter {
    fn drop(&mut self) {
        self.seg.word(H_WRITER_PID).store(0, Relaxed);
    }
}

/// Sends predicted (engine, block) pairs from routing cores to the writer (approximate mode).
/// Cheap to clone; never blocks; drops (and counts) what does not fit the queue.
#[derive(Clone)]
pub struct Predictor {
    queue: Arc<ArrayQueue<(EngineSlot, u64)>>,
    seg: Arc<Segment>,
}

impl Predictor {
    /// Predicts that `engine` will hold `hashes` (a request just routed there). Returns how many
    /// were queued.
    pub fn predict(&self, engine: EngineSlot, hashes: &[u64]) -> usize {
        if self.seg.approx().is_none() {
            return 0;
        }
        for (n, &h) in hashes.iter().enumerate() {
            if self.queue.push((engine, h)).is_err() {
                let dropped = (hashes.len() - n) as u64;
                self.seg.word(WriterCounter::ApproxDropped.word()).fetch_add(dropped, Relaxed);
                return n;
            }
        }
        hashes.len()
    }
}

/// Clears `engine`'s bit in every entry of `t`, deleting entries left unheld. Returns (entries
/// that held the bit, entries deleted).
fn clear_bit(t: &Table<'_>, engine: usize) -> (usize, usize) {
    let (word, bit) = (engine / 64, 1u64 << (engine % 64));
    let (mut held, mut deleted) = (0, 0);
    let mut i = 0;
    while i < t.slots() {
        if t.occupied(i) && t.bits_at(i, word) & bit != 0 {
            held += 1;
            t.set_bit(i, engine, false, t.tick_at(i));
            if t.is_unheld(i) {
                t.delete_at(i);
                deleted += 1;
                continue; // a later entry may have shifted into slot i
            }
        }
        i += 1;
    }
    (held, deleted)
}

/// Prepares a segment of the right shape for a new writer.
fn reset(seg: &Segment) {
    let exact = seg.exact();
    exact.repair();
    exact.clear_all();
    if let Some(approx) = seg.approx() {
        approx.repair();
        approx.clear_all();
    }
    for slot in 0..seg.shape().engine_slots {
        let e = seg.engine(slot);
        let v = e[0].load(Relaxed) as u32;
        let v = if v & 1 == 1 { v.wrapping_add(1) } else { v };
        e[0].store(u64::from(v.wrapping_add(1)), Relaxed);
        std::sync::atomic::fence(Release);
        for w in &e[1..] {
            w.store(0, Relaxed);
        }
        e[0].store(u64::from(v.wrapping_add(2)), Release);
    }
    for c in WriterCounter::ALL {
        seg.word(c.word()).store(0, Relaxed);
    }
    for c in ReaderCounter::ALL {
        seg.word(c.word()).store(0, Relaxed);
    }
    seg.word(H_STATE).store(STATE_LIVE, Release);
}

fn lock(path: &Path) -> Result<File, IndexError> {
    let mut lock_path = PathBuf::from(path).into_os_string();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| IndexError::io(&lock_path, "open the lock file", e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            let pid = Segment::open(path, false).map(|s| s.word(H_WRITER_PID).load(Relaxed)).unwrap_or(0);
            Err(IndexError::Locked { path: lock_path, pid })
        }
        Err(std::fs::TryLockError::Error(e)) => Err(IndexError::io(&lock_path, "lock", e)),
    }
}
