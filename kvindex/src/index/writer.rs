//! The single writer: applies block operations, predictions and expiry to the segment.

use super::engines;
use super::layout::*;
use super::reader::IndexReader;
use super::segment::{unix_ms, Segment};
use super::table::{Table, TICK_MASK};
use super::IndexError;
use crate::hash::chain_pos;
use crate::sink::{BlockSink, Counter, EngineSlot};
use crossbeam_queue::ArrayQueue;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a writer creates its segment.
#[derive(Debug, Clone)]
pub struct IndexOptions {
    /// Engine slots (1..=1,024); exact-table entries take `16 + 8·ceil(slots/64)` bytes of the
    /// segment (and 4 of the writer's memory for their ticks), approximate ones 4 more.
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
    core: Core,
    queue: Arc<ArrayQueue<Prediction>>,
    started: Instant,
    /// Where [`IndexWriter::register_engine`] looks for a free slot next: slots are handed out
    /// round the table, so a slot just released is taken again only after every other free one
    /// (predictions made for its old engine, still in flight, then find it unused).
    slot_hand: usize,
}

/// A prediction: engine, its lifetime in seconds (0: the segment's), block hash, chain position.
type Prediction = (EngineSlot, u32, u64, u64);

/// The writer's private state; its methods take the segment separately so a table view and this
/// state can be borrowed together.
struct Core {
    /// Store clock: increments per stored block; entries keep the tick of their last store.
    tick: u32,
    hand: usize,
    approx_hand: usize,
    ttl_secs: u32,
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
        let mut reused = false;
        let mut seg = match Segment::open(path, true) {
            Ok(old) if *old.shape() == shape => {
                reset(&old);
                reused = true;
                old
            }
            Ok(old) => {
                tracing::info!(path = %path.display(), "kvindex: replacing a segment of another shape");
                let new = Segment::create(path, shape)?;
                // Generations keep rising at a path, so a reader can tell a replacement apart.
                new.word(H_GENERATION).store(old.word(H_GENERATION).load(Acquire), Relaxed);
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
        seg.keep_exact_ticks();
        super::segment::log_page_advice(path, reused);
        seg.word(H_GENERATION).fetch_add(1, Release);
        seg.word(H_WRITER_PID).store(u64::from(std::process::id()), Relaxed);
        let ttl_secs = ttl_secs(opts.approx_ttl);
        seg.word(H_APPROX_TTL_SECS).store(u64::from(ttl_secs), Relaxed);
        let core = Core { tick: 0, hand: 0, approx_hand: 0, ttl_secs };
        let mut w = IndexWriter {
            seg: Arc::new(seg),
            _lock: lock,
            core,
            queue: Arc::new(ArrayQueue::new(opts.approx_queue.max(1))),
            started: Instant::now(),
            slot_hand: 0,
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
        let free = (0..slots).map(|k| (self.slot_hand + k) % slots).find(|&s| !engines::used(self.seg.engine(s)));
        let Some(slot) = free else {
            return Err(IndexError::NoEngineSlot { name: name.into(), slots });
        };
        self.slot_hand = slot + 1;
        self.write_engine(slot, Some(name));
        Ok(slot as EngineSlot)
    }

    /// Frees `slot` after removing every block it holds (both tiers). Returns the entries it held.
    /// Predictions already queued for it are applied first (so they are removed too); later
    /// ones for a free slot are dropped.
    pub fn release_engine(&mut self, slot: EngineSlot) -> usize {
        if usize::from(slot) >= self.seg.shape().engine_slots {
            return 0;
        }
        // What is queued now, not what the cores keep adding meanwhile.
        self.apply_predictions(self.queue.len());
        let n = self.clear_engine(slot);
        self.write_engine(slot as usize, None);
        n
    }

    /// Removes every block `slot` holds, in both tiers (a full scan: for engine restarts and
    /// removals, not for the event path). Returns how many exact entries it held.
    pub fn clear_engine(&mut self, slot: EngineSlot) -> usize {
        if usize::from(slot) >= self.seg.shape().engine_slots {
            return 0;
        }
        let seg = &*self.seg;
        let (held, deleted) = clear_bit(&seg.writer_exact(), slot as usize);
        sub(seg, WriterCounter::Live, deleted as u64);
        if let Some(approx) = seg.approx() {
            let (_, deleted) = clear_bit(&approx, slot as usize);
            sub(seg, WriterCounter::ApproxLive, deleted as u64);
        }
        seg.engine(slot as usize)[1].store(0, Relaxed);
        held
    }

    /// Stores a chain of blocks of one engine (`hashes[0]`'s parent at chain position
    /// `parent_pos`, None for a prompt's first block), prefetching ahead: the bulk form of
    /// [`BlockSink::store`].
    pub fn store_chain(&mut self, engine: EngineSlot, parent_pos: Option<u64>, hashes: &[u64]) {
        const AHEAD: usize = 4;
        let seg = &*self.seg;
        let exact = seg.writer_exact();
        let mut ahead_pos = parent_pos;
        let mut ahead = hashes.iter();
        // An insert checks every candidate bucket (a block is stored once): prefetch them all.
        for &h in ahead.by_ref().take(AHEAD) {
            let p = chain_pos(ahead_pos, h);
            exact.prefetch_keys(exact.local_bucket(p));
            exact.prefetch_global(h);
            ahead_pos = Some(p);
        }
        let mut pos = parent_pos;
        for &h in hashes {
            if let Some(&n) = ahead.next() {
                let p = chain_pos(ahead_pos, n);
                exact.prefetch_keys(exact.local_bucket(p));
                exact.prefetch_global(n);
                ahead_pos = Some(p);
            }
            let p = chain_pos(pos, h);
            self.core.store(seg, engine, h, p);
            pos = Some(p);
        }
    }

    /// Applies queued predictions (at most `max`). Returns how many were applied.
    pub fn apply_predictions(&mut self, max: usize) -> usize {
        let seg = &*self.seg;
        let Some(approx) = seg.approx() else {
            return 0;
        };
        let exact = seg.writer_exact();
        let core = &mut self.core;
        let now = now_secs(seg);
        let mut n = 0;
        while n < max {
            let Some((engine, ttl_secs, hash, pos)) = self.queue.pop() else { break };
            n += 1;
            let ttl_secs = if ttl_secs == 0 { core.ttl_secs } else { ttl_secs };
            let expiry = now.wrapping_add(ttl_secs) & TICK_MASK;
            let e = engine as usize;
            // Out of range, or a slot no engine holds (released after the prediction was made).
            if e >= seg.shape().engine_slots || !engines::used(seg.engine(e)) {
                continue;
            }
            // Already known for real: nothing to predict.
            let local = Some(exact.local_bucket(pos));
            if let Ok(i) = exact.find(hash, local) {
                if exact.holds(i, e) {
                    continue;
                }
            }
            // The approximate tier is small and short-lived: blocks go by hash alone.
            let local = None;
            match approx.find(hash, local) {
                Ok(i) if !alive(approx.tick_at(i), now) => {
                    // Expired but not swept yet: its other engines' bits must not come back.
                    approx.delete_at(i);
                    approx.insert_at(i, hash, e, expiry);
                }
                Ok(i) => {
                    // One expiry per entry: the later of the two, so a short-lived prediction
                    // does not cut another engine's longer one short (a long one then keeps a
                    // short one's bit as long: predictions are hints, and real removals still
                    // clear them).
                    let held = approx.tick_at(i);
                    let later = if alive(held, expiry) { held } else { expiry };
                    approx.add_holder(i, e, later);
                }
                Err(free) => {
                    let slot = core.make_room(seg, &approx, hash, local, free, true);
                    approx.insert_at(slot, hash, e, expiry);
                    add(seg, WriterCounter::ApproxLive, 1);
                }
            }
            add(seg, WriterCounter::ApproxInserted, 1);
        }
        n
    }

    /// Deletes expired predictions among the next `budget` slots of the approximate table.
    pub fn expire_predictions(&mut self, budget: usize) -> usize {
        let seg = &*self.seg;
        let Some(approx) = seg.approx() else {
            return 0;
        };
        let now = now_secs(seg);
        let core = &mut self.core;
        let mut expired = 0;
        let mut i = core.approx_hand % approx.slots();
        for _ in 0..budget.min(approx.slots()) {
            // A deletion may shift a later entry into slot i: look at i again before moving on.
            if approx.occupied(i) && !alive(approx.tick_at(i), now) {
                approx.delete_at(i);
                expired += 1;
            }
            i = if i + 1 == approx.slots() { 0 } else { i + 1 };
        }
        core.approx_hand = i;
        sub(seg, WriterCounter::ApproxLive, expired as u64);
        add(seg, WriterCounter::ApproxExpired, expired as u64);
        expired
    }

    fn update_clock(&mut self) {
        let now = self.started.elapsed().as_secs() as u32 + 1;
        self.seg.word(H_NOW_SECS).store(u64::from(now), Relaxed);
        self.seg.word(H_HEARTBEAT_UNIX_MS).store(unix_ms(), Relaxed);
    }

    fn write_engine(&mut self, slot: usize, name: Option<&str>) {
        super::engines::write(self.seg.engine(slot), name);
    }
}

impl Core {
    fn store(&mut self, seg: &Segment, engine: EngineSlot, hash: u64, pos: u64) {
        let e = engine as usize;
        if e >= seg.shape().engine_slots {
            return;
        }
        self.tick = self.tick.wrapping_add(1) & TICK_MASK;
        let exact = seg.writer_exact();
        let local = Some(exact.local_bucket(pos));
        match exact.find(hash, local) {
            Ok(i) => {
                if exact.add_holder(i, e, self.tick) {
                    engine_blocks_add(seg, e, 1);
                    add(seg, WriterCounter::BlocksStored, 1);
                }
            }
            Err(free) => {
                let slot = self.make_room(seg, &exact, hash, local, free, false);
                exact.insert_at(slot, hash, e, self.tick);
                add(seg, WriterCounter::Live, 1);
                engine_blocks_add(seg, e, 1);
                add(seg, WriterCounter::BlocksStored, 1);
            }
        }
        self.unpredict(seg, e, hash);
    }

    fn remove(&mut self, seg: &Segment, engine: EngineSlot, hash: u64, pos: u64) {
        let e = engine as usize;
        if e >= seg.shape().engine_slots {
            return;
        }
        let exact = seg.writer_exact();
        if let Ok(i) = exact.find(hash, Some(exact.local_bucket(pos))) {
            if let Some(freed) = exact.remove_holder(i, e) {
                engine_blocks_add(seg, e, -1);
                add(seg, WriterCounter::BlocksRemoved, 1);
                if freed {
                    sub(seg, WriterCounter::Live, 1);
                }
            }
        }
        self.unpredict(seg, e, hash);
    }

    /// Clears `engine`'s bit of `hash` in the approximate tier (a real event overrides it).
    fn unpredict(&mut self, seg: &Segment, engine: usize, hash: u64) {
        if let Some(approx) = seg.approx() {
            if let Ok(i) = approx.find(hash, None) {
                if approx.remove_holder(i, engine) == Some(true) {
                    sub(seg, WriterCounter::ApproxLive, 1);
                }
            }
        }
    }

    /// Where a new block goes: a free candidate while the table is below capacity, else the
    /// slot of the entry evicted for it: the least recently stored (exact) or soonest expiring
    /// (approximate) of its candidates, or, if all candidates are free but the table is at
    /// capacity, a sampled entry elsewhere.
    fn make_room(
        &mut self,
        seg: &Segment,
        t: &Table<'_>,
        hash: u64,
        local: Option<usize>,
        free: Option<usize>,
        approx: bool,
    ) -> usize {
        let (live, cap) = if approx {
            (counter(seg, WriterCounter::ApproxLive), seg.shape().approx_capacity)
        } else {
            (counter(seg, WriterCounter::Live), seg.shape().capacity)
        };
        if let Some(f) = free {
            if live < cap as u64 {
                return f;
            }
        }
        let score = |t: &Table<'_>, i: usize, tick: u32| {
            if approx {
                TICK_MASK - t.tick_at(i)
            } else {
                tick.wrapping_sub(t.tick_at(i)) & TICK_MASK
            }
        };
        let victim = t.candidate_slots(hash, local).filter(|&i| t.occupied(i)).max_by_key(|&i| score(t, i, self.tick));
        match (victim, free) {
            (Some(v), _) => {
                self.evict(seg, t, v, approx);
                v
            }
            (None, Some(f)) => {
                // Over capacity with all candidates free: evict a sampled entry elsewhere.
                let hand = if approx { &mut self.approx_hand } else { &mut self.hand };
                let mut i = *hand % t.slots();
                let mut best: Option<usize> = None;
                let mut seen = 0;
                for _ in 0..t.slots() {
                    if t.occupied(i) {
                        if best.is_none_or(|b| score(t, i, self.tick) > score(t, b, self.tick)) {
                            best = Some(i);
                        }
                        seen += 1;
                        if seen == EVICTION_SAMPLE {
                            break;
                        }
                    }
                    i = if i + 1 == t.slots() { 0 } else { i + 1 };
                }
                *hand = i;
                if let Some(b) = best {
                    self.evict(seg, t, b, approx);
                }
                f
            }
            (None, None) => unreachable!("a candidate set with no free entry has occupied ones"),
        }
    }

    /// Evicts entry `victim` of `t`, keeping the counters right.
    fn evict(&mut self, seg: &Segment, t: &Table<'_>, victim: usize, approx: bool) {
        if approx {
            sub(seg, WriterCounter::ApproxLive, 1);
        } else {
            t.for_each_holder(victim, |e| engine_blocks_add(seg, e, -1));
            sub(seg, WriterCounter::Live, 1);
            add(seg, WriterCounter::Evictions, 1);
        }
        t.delete_at(victim);
    }
}

/// Seconds since the writer started, plus one (so 0 is always in the past).
fn now_secs(seg: &Segment) -> u32 {
    seg.word(H_NOW_SECS).load(Relaxed) as u32
}

fn counter(seg: &Segment, c: WriterCounter) -> u64 {
    seg.word(c.word()).load(Relaxed)
}

fn add(seg: &Segment, c: WriterCounter, n: u64) {
    let w = seg.word(c.word());
    w.store(w.load(Relaxed).wrapping_add(n), Relaxed);
}

fn sub(seg: &Segment, c: WriterCounter, n: u64) {
    let w = seg.word(c.word());
    w.store(w.load(Relaxed).saturating_sub(n), Relaxed);
}

fn engine_blocks_add(seg: &Segment, slot: usize, delta: i64) {
    let w = &seg.engine(slot)[1];
    w.store(w.load(Relaxed).saturating_add_signed(delta), Relaxed);
}

/// A prediction lifetime in whole seconds: at least one, and well inside the range [`alive`]
/// compares expiries in.
fn ttl_secs(ttl: Duration) -> u32 {
    ttl.as_secs_f64().ceil().clamp(1.0, f64::from(TICK_MASK / 4)) as u32
}

/// Whether an approximate entry with expiry `tick` is still valid at `now`.
#[inline]
pub(crate) fn alive(expiry: u32, now: u32) -> bool {
    // Wrapping comparison in 31 bits: valid while `expiry` is ahead of `now` by less than half
    // the tick range.
    let ahead = expiry.wrapping_sub(now) & TICK_MASK;
    ahead != 0 && ahead < TICK_MASK / 2
}

impl BlockSink for IndexWriter {
    fn store(&mut self, engine: EngineSlot, hash: u64, pos: u64) {
        self.core.store(&self.seg, engine, hash, pos);
    }

    fn remove(&mut self, engine: EngineSlot, hash: u64, pos: u64) {
        self.core.remove(&self.seg, engine, hash, pos);
    }

    fn count(&mut self, counter: Counter, n: u64) {
        let w = self.seg.word(sink_counter_word(counter));
        w.store(w.load(Relaxed).wrapping_add(n), Relaxed);
    }

    fn maintain(&mut self) {
        self.update_clock();
        self.apply_predictions(PREDICTIONS_PER_MAINTAIN);
        self.expire_predictions(EXPIRY_SCAN_PER_MAINTAIN);
    }

    fn register(&mut self, name: &str) -> Result<EngineSlot, String> {
        self.register_engine(name).map_err(|e| e.to_string())
    }

    fn release(&mut self, slot: EngineSlot) {
        self.release_engine(slot);
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
    queue: Arc<ArrayQueue<Prediction>>,
    seg: Arc<Segment>,
}

impl Predictor {
    /// Predicts that `engine` will hold the prompt whose chained block hashes are `hashes`
    /// (first block first; a request just routed there), for the segment's prediction lifetime
    /// ([`IndexOptions::approx_ttl`]). Returns how many were queued.
    pub fn predict(&self, engine: EngineSlot, hashes: &[u64]) -> usize {
        self.push(engine, 0, hashes)
    }

    /// [`Predictor::predict`] for `ttl` instead (at least a second): an engine whose events will
    /// soon confirm the blocks needs predictions only until then; one without events needs
    /// them for as long as its cache likely keeps the blocks.
    pub fn predict_for(&self, engine: EngineSlot, hashes: &[u64], ttl: Duration) -> usize {
        self.push(engine, ttl_secs(ttl), hashes)
    }

    fn push(&self, engine: EngineSlot, ttl_secs: u32, hashes: &[u64]) -> usize {
        if self.seg.approx().is_none() {
            return 0;
        }
        let mut pos = None;
        for (n, &h) in hashes.iter().enumerate() {
            let p = chain_pos(pos, h);
            pos = Some(p);
            if self.queue.push((engine, ttl_secs, h, p)).is_err() {
                let dropped = (hashes.len() - n) as u64;
                self.seg.word(WriterCounter::ApproxDropped.word()).fetch_add(dropped, Relaxed);
                return n;
            }
        }
        hashes.len()
    }
}

/// Removes `engine` from every entry of `t`, freeing entries left unheld. Returns (entries it
/// held, entries freed).
fn clear_bit(t: &Table<'_>, engine: usize) -> (usize, usize) {
    let (mut held, mut deleted) = (0, 0);
    for i in 0..t.slots() {
        if t.occupied(i) {
            if let Some(freed) = t.remove_holder(i, engine) {
                held += 1;
                deleted += usize::from(freed);
            }
        }
    }
    (held, deleted)
}

/// Prepares a segment of the right shape for a new writer.
fn reset(seg: &Segment) {
    let exact = seg.writer_exact();
    exact.repair();
    exact.clear_all();
    if let Some(approx) = seg.approx() {
        approx.repair();
        approx.clear_all();
    }
    for slot in 0..seg.shape().engine_slots {
        engines::write(seg.engine(slot), None);
    }
    for c in WriterCounter::ALL {
        seg.word(c.word()).store(0, Relaxed);
    }
    for c in Counter::ALL {
        seg.word(sink_counter_word(c)).store(0, Relaxed);
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
