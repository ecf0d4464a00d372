//! Readers: lock-free overlap lookups, engine names and statistics.

use super::layout::*;
use super::segment::{PageUse, Segment};
use super::table::{Held, Probe, Table, ALL_WORDS, MAX_BIT_WORDS};
use super::writer::alive;
use super::IndexError;
use crate::sink::{Counter, EngineSlot};
use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::Ordering::{Acquire, Relaxed};
use std::sync::Arc;

/// How far ahead of the block it reads a lookup prefetches a block's local keys (stage 1),
/// locates it among them (stage 2), and locates a block stage 2 did not find among its global
/// keys (stage 2b; see `IndexReader::overlaps_with`). Each stage runs far enough ahead of the
/// next to cover a DRAM miss. `KEYS_AHEAD` is also the size of the ring of local buckets stage 1
/// fills for stage 2, and `LOCATE_AHEAD` that of the ring stage 2 fills, so each stage must run
/// behind the one before it (checked below).
const KEYS_AHEAD: usize = 32;
const LOCATE_AHEAD: usize = 16;
const GLOBAL_AHEAD: usize = 8;
const _: () = assert!(
    GLOBAL_AHEAD < LOCATE_AHEAD
        && LOCATE_AHEAD < KEYS_AHEAD
        && LOCATE_AHEAD.is_power_of_two()
        && KEYS_AHEAD.is_power_of_two()
);
/// Lookups between two flushes of a reader's counters into the header.
const FLUSH_EVERY: u32 = 256;

/// Stage 2's result for a block it did not find among its local keys (nor, once stage 2b has
/// run, its global ones).
const NOT_FOUND: usize = usize::MAX;

/// Stage 1 for block `j`, whose local bucket is `local`: notes it in `locals` and prefetches the
/// keys there (and those of the block's approximate-tier buckets).
#[inline(always)]
fn find_keys(
    exact: &Table<'_>,
    approx: Option<&Table<'_>>,
    hashes: &[u64],
    j: usize,
    local: usize,
    locals: &mut [usize; KEYS_AHEAD],
) {
    locals[j % KEYS_AHEAD] = local;
    exact.prefetch_keys(local);
    if let Some(a) = approx {
        a.prefetch_global(hashes[j]);
    }
}

/// Stage 2 for block `j` (which stage 1 has passed): finds it among its local keys, noting its
/// local bucket and entry (or [`NOT_FOUND`]) in `hints`, and prefetches the bit words in `words`
/// (see [`Table::locate_local`]).
#[inline(always)]
fn locate(
    exact: &Table<'_>,
    hashes: &[u64],
    j: usize,
    words: u32,
    locals: &[usize; KEYS_AHEAD],
    hints: &mut [(usize, usize); LOCATE_AHEAD],
) {
    let local = locals[j % KEYS_AHEAD];
    hints[j % LOCATE_AHEAD] = (local, exact.locate_local(hashes[j], local, words).unwrap_or(NOT_FOUND));
}

/// Stage 2b for block `j` (which stage 2 has passed): finds a block stage 2 did not find among the
/// keys of its global buckets, and prefetches the bit words in `words` of the entry found.
#[inline(always)]
fn locate_global(exact: &Table<'_>, hashes: &[u64], j: usize, words: u32, hints: &mut [(usize, usize); LOCATE_AHEAD]) {
    let f = &mut hints[j % LOCATE_AHEAD];
    if f.1 == NOT_FOUND {
        if let Some(slot) = exact.locate_global(hashes[j], words) {
            f.1 = slot;
        }
    }
}

/// One engine's overlap: how many leading blocks of the prompt it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Overlap {
    /// The engine's slot.
    pub engine: EngineSlot,
    /// Consecutive blocks from the first that the engine holds (≥ 1).
    pub blocks: u32,
}

/// Caller-owned storage for [`IndexReader::overlaps`]: sized once for the segment's engine
/// slots, reused for every lookup, so lookups never allocate.
#[derive(Debug, Clone)]
pub struct Overlaps {
    items: Box<[Overlap]>,
    len: usize,
}

impl Overlaps {
    /// Storage for an index of `engine_slots` slots.
    pub fn with_engine_slots(engine_slots: usize) -> Self {
        Overlaps { items: vec![Overlap::default(); engine_slots].into_boxed_slice(), len: 0 }
    }

    /// Engines holding at least the first block, in no particular order.
    pub fn as_slice(&self) -> &[Overlap] {
        &self.items[..self.len]
    }

    /// `engine`'s overlap (0 when it holds not even the first block).
    pub fn get(&self, engine: EngineSlot) -> u32 {
        self.as_slice().iter().find(|o| o.engine == engine).map_or(0, |o| o.blocks)
    }

    fn clear(&mut self) {
        self.len = 0;
    }

    #[inline]
    fn record(&mut self, word: usize, mut bits: u64, blocks: u32) {
        while bits != 0 {
            if self.len < self.items.len() {
                let engine = (word * 64 + bits.trailing_zeros() as usize) as EngineSlot;
                self.items[self.len] = Overlap { engine, blocks };
                self.len += 1;
            }
            bits &= bits - 1;
        }
    }
}

/// One engine slot as [`IndexReader::engines`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineInfo {
    /// Slot.
    pub slot: EngineSlot,
    /// Name (the engine's URL).
    pub name: String,
    /// Exact-table blocks it holds.
    pub blocks: u64,
}

/// Everything `gantry index inspect` prints.
#[derive(Debug, Clone)]
pub struct IndexStats {
    /// Layout version.
    pub layout_version: u64,
    /// Bumped by every new writer.
    pub generation: u64,
    /// Writer's pid (0 when it exited cleanly).
    pub writer_pid: u64,
    /// Whether a newer segment replaced this one.
    pub retired: bool,
    /// When the segment was created, and the writer's last heartbeat (Unix ms).
    pub created_unix_ms: u64,
    /// See `created_unix_ms`.
    pub heartbeat_unix_ms: u64,
    /// Engine slots.
    pub engine_slots: usize,
    /// Exact-table capacity (blocks) and slots.
    pub capacity: usize,
    /// See `capacity`.
    pub table_slots: usize,
    /// Approximate-table capacity (0 = off) and TTL.
    pub approx_capacity: usize,
    /// See `approx_capacity`.
    pub approx_ttl_secs: u64,
    /// Segment size.
    pub total_bytes: usize,
    /// Writer counters (the index's, then the subscriber's), by name.
    pub writer: Vec<(&'static str, u64)>,
    /// Reader counters (all readers, flushed in batches), by name.
    pub readers: Vec<(&'static str, u64)>,
    /// Engines with a slot.
    pub engines: Vec<EngineInfo>,
}

/// A reader of the index. Clone one per core: clones share the mapping; each keeps its own
/// counters (flushed to the header every 256 lookups and on drop). Not `Sync`.
pub struct IndexReader {
    seg: Arc<Segment>,
    lookups: Cell<u64>,
    blocks: Cell<u64>,
    hits: Cell<u64>,
    unstable: Cell<u64>,
    pending: Cell<u32>,
}

impl Clone for IndexReader {
    fn clone(&self) -> Self {
        IndexReader::from_segment(self.seg.clone())
    }
}

impl Drop for IndexReader {
    fn drop(&mut self) {
        self.flush();
    }
}

impl IndexReader {
    /// Maps the segment at `path`, refusing one of another layout or a truncated file. The
    /// mapping is read-write when the file permits it (so this reader's counters reach the
    /// header), read-only otherwise. Lookups only ever load.
    pub fn open(path: impl AsRef<Path>) -> Result<IndexReader, IndexError> {
        let path = path.as_ref();
        let seg = match Segment::open(path, true) {
            Err(IndexError::Io { error, .. }) if error.kind() == std::io::ErrorKind::PermissionDenied => {
                Segment::open(path, false)?
            }
            other => other?,
        };
        Ok(IndexReader::from_segment(Arc::new(seg)))
    }

    /// Maps the segment at `path` read-only (as `gantry index inspect` does): this reader
    /// changes nothing, not even the header's reader counters.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<IndexReader, IndexError> {
        Ok(IndexReader::from_segment(Arc::new(Segment::open(path.as_ref(), false)?)))
    }

    pub(crate) fn from_segment(seg: Arc<Segment>) -> Self {
        IndexReader {
            seg,
            lookups: Cell::new(0),
            blocks: Cell::new(0),
            hits: Cell::new(0),
            unstable: Cell::new(0),
            pending: Cell::new(0),
        }
    }

    /// Engine slots of the segment (size [`Overlaps`] with it).
    pub fn engine_slots(&self) -> usize {
        self.seg.shape().engine_slots
    }

    /// Storage for [`IndexReader::overlaps`].
    pub fn new_overlaps(&self) -> Overlaps {
        Overlaps::with_engine_slots(self.engine_slots())
    }

    /// The writer generation; it changes when a new writer takes the segment over.
    pub fn generation(&self) -> u64 {
        self.seg.word(H_GENERATION).load(Acquire)
    }

    /// Whether a newer segment replaced this one at its path (reopen to follow it).
    pub fn is_retired(&self) -> bool {
        self.seg.word(H_STATE).load(Acquire) == STATE_RETIRED
    }

    /// For each engine, how many consecutive blocks of `hashes` (a prompt's chained block
    /// hashes from its first block: a block is found through its chain position, which this
    /// derives from the blocks before it) it holds, written into `out`; engines holding not even the
    /// first block are left out. Returns the deepest overlap. Stops at the first block no engine
    /// holds, or as soon as no engine holds every block so far. Never allocates or blocks.
    pub fn overlaps(&self, hashes: &[u64], out: &mut Overlaps) -> u32 {
        // The per-block loops run over the bit set's words: one copy of the lookup for each
        // width of a power-of-two number of engine slots (64 to 1,024) has them unrolled.
        match self.seg.exact().bit_words() {
            1 => self.overlaps_with::<1>(hashes, out),
            2 => self.overlaps_with::<2>(hashes, out),
            4 => self.overlaps_with::<4>(hashes, out),
            8 => self.overlaps_with::<8>(hashes, out),
            16 => self.overlaps_with::<16>(hashes, out),
            _ => self.overlaps_with::<0>(hashes, out),
        }
    }

    /// [`IndexReader::overlaps`] for a segment of `BW` bit words per entry (0: any).
    fn overlaps_with<const BW: usize>(&self, hashes: &[u64], out: &mut Overlaps) -> u32 {
        out.clear();
        let exact = self.seg.exact();
        let bw = if BW == 0 { exact.bit_words() } else { BW };
        let exact = exact.with_bit_words(bw);
        let approx = self.seg.approx();
        let now = if approx.is_some() { self.seg.word(H_NOW_SECS).load(Relaxed) as u32 } else { 0 };
        // Blocks held by a few engines keep them inline (see `table.rs`); the others' bit sets
        // are read whole for up to 512 engine slots, or, wider, sparsely: after the first block,
        // only the words where some engine still holds every block so far (`live`); with a
        // prompt held by a few engines that is one word of sixteen. Either way a block's holders
        // are combined as bits on those words.
        let sparse = bw > 8;
        let mut live = ALL_WORDS;
        let mut active = [0u64; MAX_BIT_WORDS];
        let mut bits = [0u64; MAX_BIT_WORDS];
        let mut predicted = [0u64; MAX_BIT_WORDS];
        let mut unstable = 0;
        // A software pipeline over the prompt's blocks. A prompt's blocks sit in nearby local
        // buckets (see `table.rs`), so memory is walked almost sequentially: stage 1 finds the
        // local bucket of block `i + KEYS_AHEAD` and prefetches the keys of it and the next
        // (most blocks sit in one of those two); stage 2 finds block
        // `i + LOCATE_AHEAD` among them and, when its holders are in its bit set, prefetches the
        // words wanted (or, when absent, the keys of its global buckets); stage 2b finds such a
        // block among those, `GLOBAL_AHEAD` ahead; stage 3 reads block `i` under its seqlock.
        // Stages 2 and 2b are only hints: stage 3 checks them and falls back to a full probe.
        let n = hashes.len();
        if n == 0 {
            self.note(0, 0, 0);
            return 0;
        }
        // Stage 1's cursor and the local buckets it found (block `j` at `j % KEYS_AHEAD`), and
        // the entries stages 2 and 2b found (`hints`, block `j` at `j % LOCATE_AHEAD`): each
        // stage reads a block's place before the stage ahead of it reuses it.
        let mut cursor = exact.first_local(hashes[0]);
        let mut locals = [0usize; KEYS_AHEAD];
        let mut hints = [(0usize, NOT_FOUND); LOCATE_AHEAD];
        find_keys(&exact, approx.as_ref(), hashes, 0, cursor.bucket(), &mut locals);
        for j in 1..n.min(KEYS_AHEAD) {
            let local = exact.next_local(&mut cursor, hashes[j]);
            find_keys(&exact, approx.as_ref(), hashes, j, local, &mut locals);
        }
        for j in 0..n.min(LOCATE_AHEAD) {
            locate(&exact, hashes, j, live, &locals, &mut hints);
        }
        for j in 0..n.min(GLOBAL_AHEAD) {
            locate_global(&exact, hashes, j, live, &mut hints);
        }
        let mut depth = 0usize;
        // The inline holders of the last block read, which a block held by exactly the same
        // engines (a prompt's blocks nearly always are) shows word for word.
        let mut same = Held::NONE;
        for (i, &h) in hashes.iter().enumerate() {
            if i + KEYS_AHEAD < n {
                let local = exact.next_local(&mut cursor, hashes[i + KEYS_AHEAD]);
                find_keys(&exact, approx.as_ref(), hashes, i + KEYS_AHEAD, local, &mut locals);
            }
            let (local, slot) = hints[i % LOCATE_AHEAD];
            if i + LOCATE_AHEAD < n {
                locate(&exact, hashes, i + LOCATE_AHEAD, live, &locals, &mut hints);
            }
            if i + GLOBAL_AHEAD < n {
                locate_global(&exact, hashes, i + GLOBAL_AHEAD, live, &mut hints);
            }
            let probe = if slot == NOT_FOUND {
                exact.read_beyond_local(h, local, &mut bits[..bw])
            } else {
                exact.read_at(slot, h, local, &mut bits[..bw], live)
            };
            let mut found = match probe {
                // The same inline holders as the block before: no engine drops out.
                Probe::Hit { held, .. } if held == same && approx.is_none() => {
                    depth = i + 1;
                    continue;
                }
                Probe::Hit { held, .. } => {
                    same = if held.is_inline() { held } else { Held::NONE };
                    // A few holders, inline in the entry: as bits on the words this lookup reads.
                    held.spread(&mut bits[..bw], live);
                    true
                }
                Probe::Miss => false,
                Probe::Unknown => {
                    unstable += 1;
                    false
                }
            };
            if let Some(a) = &approx {
                match a.read(h, None, &mut predicted[..bw]) {
                    Probe::Hit { tick, held } if alive(tick, now) => {
                        held.spread(&mut predicted[..bw], ALL_WORDS);
                        for w in 0..bw {
                            bits[w] = if found { bits[w] | predicted[w] } else { predicted[w] };
                        }
                        found = true;
                    }
                    Probe::Unknown => unstable += 1,
                    _ => {}
                }
            }
            if !found {
                break;
            }
            let mut any = 0;
            if i == 0 {
                active[..bw].copy_from_slice(&bits[..bw]);
                any = active[..bw].iter().fold(0, |a, w| a | w);
                if sparse {
                    live = (0..bw).filter(|&w| active[w] != 0).fold(0, |m, w| m | 1 << w);
                }
            } else {
                // Drops from word `w` the engines that do not hold block `i`, recording their
                // overlap; returns those left.
                let mut narrow = |w: usize| {
                    let gone = active[w] & !bits[w];
                    if gone != 0 {
                        out.record(w, gone, i as u32);
                    }
                    active[w] &= bits[w];
                    active[w]
                };
                if sparse {
                    // Only the live words: engines still holding every block so far.
                    debug_assert!(live >> bw == 0, "live words {live:#x} beyond the bit set");
                    let mut m = live;
                    while m != 0 {
                        let w = m.trailing_zeros() as usize;
                        m &= m - 1;
                        let left = narrow(w);
                        if left == 0 {
                            live &= !(1 << w);
                        }
                        any |= left;
                    }
                } else {
                    for w in 0..bw {
                        any |= narrow(w);
                    }
                }
            }
            if any == 0 {
                break;
            }
            depth = i + 1;
        }
        for (w, &a) in active[..bw].iter().enumerate() {
            if a != 0 {
                out.record(w, a, depth as u32);
            }
        }
        self.note(hashes.len() as u64, depth as u64, unstable);
        depth as u32
    }

    #[inline]
    fn note(&self, blocks: u64, hits: u64, unstable: u64) {
        self.lookups.set(self.lookups.get() + 1);
        self.blocks.set(self.blocks.get() + blocks);
        self.hits.set(self.hits.get() + hits);
        self.unstable.set(self.unstable.get() + unstable);
        let p = self.pending.get() + 1;
        if p >= FLUSH_EVERY {
            self.flush();
        } else {
            self.pending.set(p);
        }
    }

    /// Adds this reader's counters to the header now (otherwise every 256 lookups).
    pub fn flush(&self) {
        if !self.seg.writable() {
            return;
        }
        for (c, cell) in [
            (ReaderCounter::Lookups, &self.lookups),
            (ReaderCounter::LookupBlocks, &self.blocks),
            (ReaderCounter::HitBlocks, &self.hits),
            (ReaderCounter::UnstableProbes, &self.unstable),
        ] {
            let n = cell.replace(0);
            if n != 0 {
                self.seg.word(c.word()).fetch_add(n, Relaxed);
            }
        }
        self.pending.set(0);
    }

    /// How the live writer maps the segment (resident bytes, and those in 2 MiB pages), read
    /// from its `/proc/PID/smaps`: None without a live writer or when that cannot be read.
    pub fn writer_pages(&self) -> Option<PageUse> {
        match self.seg.word(H_WRITER_PID).load(Relaxed) {
            0 => None,
            pid => super::segment::page_use(pid, self.seg.path()),
        }
    }

    /// Exact-table blocks `slot` holds.
    pub fn engine_blocks(&self, slot: EngineSlot) -> u64 {
        if (slot as usize) < self.engine_slots() {
            self.seg.engine(slot as usize)[1].load(Relaxed)
        } else {
            0
        }
    }

    /// The slot of the engine called `name`, if it has one (a scan of the engine table: cache it).
    pub fn engine_slot(&self, name: &str) -> Option<EngineSlot> {
        let mut buf = [0u8; MAX_ENGINE_NAME];
        (0..self.engine_slots())
            .find(|&s| self.read_name(s, &mut buf).is_some_and(|n| n == name.as_bytes()))
            .map(|s| s as EngineSlot)
    }

    /// The name of the engine in `slot`, if the slot is in use.
    pub fn engine_name(&self, slot: EngineSlot) -> Option<String> {
        let mut buf = [0u8; MAX_ENGINE_NAME];
        if (slot as usize) >= self.engine_slots() {
            return None;
        }
        self.read_name(slot as usize, &mut buf).map(|b| String::from_utf8_lossy(b).into_owned())
    }

    /// Every engine with a slot.
    pub fn engines(&self) -> Vec<EngineInfo> {
        let mut buf = [0u8; MAX_ENGINE_NAME];
        (0..self.engine_slots())
            .filter_map(|s| {
                let name = String::from_utf8_lossy(self.read_name(s, &mut buf)?).into_owned();
                Some(EngineInfo { slot: s as EngineSlot, name, blocks: self.engine_blocks(s as EngineSlot) })
            })
            .collect()
    }

    /// Reads `slot`'s name under its seqlock (bounded retries; `None` if free or never stable).
    fn read_name<'b>(&self, slot: usize, buf: &'b mut [u8; MAX_ENGINE_NAME]) -> Option<&'b [u8]> {
        super::engines::read_name(self.seg.engine(slot), buf)
    }

    /// Header, sizes, counters and engines.
    pub fn stats(&self) -> IndexStats {
        let h = |w: usize| self.seg.word(w).load(Relaxed);
        let s = self.seg.shape();
        IndexStats {
            layout_version: h(H_VERSION),
            generation: h(H_GENERATION),
            writer_pid: h(H_WRITER_PID),
            retired: h(H_STATE) == STATE_RETIRED,
            created_unix_ms: h(H_CREATED_UNIX_MS),
            heartbeat_unix_ms: h(H_HEARTBEAT_UNIX_MS),
            engine_slots: s.engine_slots,
            capacity: s.capacity,
            table_slots: s.table_slots,
            approx_capacity: s.approx_capacity,
            approx_ttl_secs: h(H_APPROX_TTL_SECS),
            total_bytes: s.total_bytes(),
            writer: WriterCounter::ALL
                .iter()
                .map(|c| (c.name(), h(c.word())))
                .chain(Counter::ALL.iter().map(|&c| (c.name(), h(sink_counter_word(c)))))
                .collect(),
            readers: ReaderCounter::ALL.iter().map(|c| (c.name(), h(c.word()))).collect(),
            engines: self.engines(),
        }
    }
}

impl std::fmt::Display for IndexStats {
    /// The operator's view `gantry index inspect` prints.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let now = super::segment::unix_ms();
        let ago = |ms: u64| {
            if ms == 0 {
                "never".to_string()
            } else {
                format!("{:.1} s ago", now.saturating_sub(ms) as f64 / 1e3)
            }
        };
        let writer =
            if self.writer_pid == 0 { "none (exited)".to_string() } else { format!("pid {}", self.writer_pid) };
        writeln!(f, "layout version   {}", self.layout_version)?;
        writeln!(
            f,
            "generation       {}{}",
            self.generation,
            if self.retired { " (retired: reopen the path)" } else { "" }
        )?;
        writeln!(f, "writer           {writer}, heartbeat {}", ago(self.heartbeat_unix_ms))?;
        writeln!(f, "created          {}", ago(self.created_unix_ms))?;
        writeln!(
            f,
            "size             {} bytes ({:.1} MiB, {:.1} bytes per block)",
            self.total_bytes,
            self.total_bytes as f64 / (1 << 20) as f64,
            self.total_bytes as f64 / self.capacity as f64
        )?;
        writeln!(f, "engine slots     {}", self.engine_slots)?;
        writeln!(f, "capacity         {} blocks in {} slots", self.capacity, self.table_slots)?;
        if self.approx_capacity > 0 {
            writeln!(f, "approximate      {} blocks, ttl {} s", self.approx_capacity, self.approx_ttl_secs)?;
        } else {
            writeln!(f, "approximate      off")?;
        }
        writeln!(f, "\ncounters")?;
        for (name, v) in self.writer.iter().chain(&self.readers) {
            writeln!(f, "  {name:<18} {v}")?;
        }
        writeln!(f, "\nengines ({} in use)", self.engines.len())?;
        for e in &self.engines {
            writeln!(f, "  {:>4}  {:>10} blocks  {}", e.slot, e.blocks, e.name)?;
        }
        Ok(())
    }
}
