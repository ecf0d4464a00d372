//! One open-addressing hash table of `block hash → engine bit set`, laid out in a slice of
//! `AtomicU64` words that may live in shared memory.
//!
//! # Layout
//! `slots` entries of `stride = 2 + bit_words` words each:
//!
//! | word | content |
//! |---|---|
//! | 0 | bits 0–31: seqlock version (odd while the writer changes the entry); bits 32–62: the entry's tick (store time for eviction, or expiry second in the approximate tier); bit 63: occupied |
//! | 1 | key: the block hash (any `u64`) |
//! | 2.. | engine bit set, bit `e % 64` of word `e / 64` = engine slot `e` holds the block |
//!
//! A key's home slot is `(key · slots) >> 64`; collisions probe linearly, wrapping around.
//!
//! # Concurrency protocol (one writer, any number of readers)
//! * Every entry is a seqlock: the writer makes the version odd, writes key and bits, then makes
//!   it even (release). A reader loads the version (acquire), the key and bits, then checks the
//!   version again after an acquire fence; a changed or odd version means retry. So a reader
//!   never returns a torn entry.
//! * Inserts never move entries. Deletes use backward-shift deletion (no tombstones, so probe
//!   chains never rot): entries after the hole move back one at a time, each copied to its new
//!   slot before its old slot is overwritten, so an entry is never absent from the table, but a
//!   reader scanning past its new slot before the copy could still miss it. Such a sequence of
//!   moves is bracketed by the table's *move epoch* (odd while moving), and a reader accepts a
//!   miss only if the epoch was even and unchanged across its probe.
//! * Retries are bounded. A reader that cannot get a stable view (a writer that died in the
//!   middle of a write leaves an odd version forever) reports [`Probe::Unknown`], which lookups
//!   treat as a miss: the index is a hint, and a miss only costs a cache hit.
//!
//! The loom tests in `tests/loom.rs` model-check this protocol.

use crate::sync::{fence, spin, AtomicU64};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

/// Bit 63 of word 0: the slot holds an entry.
const OCCUPIED: u64 = 1 << 63;
/// Ticks are 31 bits wide (bits 32–62 of word 0); compare them with wrapping arithmetic.
pub(crate) const TICK_MASK: u32 = 0x7fff_ffff;
/// Most engine-bit words per entry (1,024 engine slots).
pub(crate) const MAX_BIT_WORDS: usize = 16;
/// Attempts a reader makes before giving up on a probe.
const MAX_ATTEMPTS: usize = 64;

/// Outcome of a reader's probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// Found; the bits and tick were copied out.
    Hit { tick: u32 },
    /// Not in the table.
    Miss,
    /// No stable view within the retry budget (treated as a miss).
    Unknown,
}

/// A view of one table. Cheap to copy; all methods take `&self` because the memory is shared.
#[derive(Clone, Copy)]
pub(crate) struct Table<'a> {
    words: &'a [AtomicU64],
    moves: &'a AtomicU64,
    slots: usize,
    bit_words: usize,
}

impl<'a> Table<'a> {
    /// Words needed for `slots` entries of `bit_words` bit words.
    pub(crate) fn words_for(slots: usize, bit_words: usize) -> usize {
        slots * (2 + bit_words)
    }

    pub(crate) fn new(words: &'a [AtomicU64], moves: &'a AtomicU64, slots: usize, bit_words: usize) -> Self {
        assert!(slots > 0 && (1..=MAX_BIT_WORDS).contains(&bit_words));
        assert_eq!(words.len(), Self::words_for(slots, bit_words), "table words do not match its shape");
        Table { words, moves, slots, bit_words }
    }

    pub(crate) fn slots(&self) -> usize {
        self.slots
    }

    pub(crate) fn bit_words(&self) -> usize {
        self.bit_words
    }

    #[inline]
    fn stride(&self) -> usize {
        2 + self.bit_words
    }

    #[inline]
    fn entry(&self, i: usize) -> &'a [AtomicU64] {
        let s = self.stride();
        &self.words[i * s..(i + 1) * s]
    }

    #[inline]
    pub(crate) fn home(&self, key: u64) -> usize {
        ((key as u128 * self.slots as u128) >> 64) as usize
    }

    #[inline]
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots {
            0
        } else {
            i + 1
        }
    }

    /// Hints the CPU to load `hash`'s home entry; used to overlap the memory latency of the next
    /// blocks of a prompt with the current one.
    #[inline]
    pub(crate) fn prefetch(&self, hash: u64) {
        let i = self.home(hash);
        let p = self.words[i * self.stride()..].as_ptr();
        prefetch_read(p.cast());
    }

    // ---- reader side ----

    /// Looks `hash` up, copying its engine bits into `bits[..bit_words]` on a hit.
    pub(crate) fn read(&self, hash: u64, bits: &mut [u64]) -> Probe {
        let key = hash;
        'attempt: for _ in 0..MAX_ATTEMPTS {
            let epoch = self.moves.load(Acquire);
            if epoch & 1 == 1 {
                spin();
                continue;
            }
            let mut i = self.home(key);
            for _ in 0..self.slots {
                let e = self.entry(i);
                let v1 = e[0].load(Acquire);
                if v1 & 1 == 1 {
                    spin();
                    continue 'attempt;
                }
                if v1 & OCCUPIED == 0 {
                    fence(Acquire);
                    if self.moves.load(Relaxed) == epoch && e[0].load(Relaxed) == v1 {
                        return Probe::Miss;
                    }
                    continue 'attempt;
                }
                if e[1].load(Relaxed) == key {
                    for (dst, w) in bits[..self.bit_words].iter_mut().zip(&e[2..]) {
                        *dst = w.load(Relaxed);
                    }
                    fence(Acquire);
                    if e[0].load(Relaxed) == v1 {
                        return Probe::Hit { tick: (v1 >> 32) as u32 & TICK_MASK };
                    }
                    continue 'attempt;
                }
                i = self.next(i);
            }
            // A full table without a free slot cannot happen (capacity < slots); be safe anyway.
            fence(Acquire);
            if self.moves.load(Relaxed) == epoch {
                return Probe::Miss;
            }
        }
        Probe::Unknown
    }

    // ---- writer side (one writer at a time; it owns every odd version it creates) ----

    /// Whether slot `i` holds an entry; with `key_at`, `tick_at` and `bits_at`, the writer's view
    /// (it is the only one changing entries).
    #[inline]
    pub(crate) fn occupied(&self, i: usize) -> bool {
        self.entry(i)[0].load(Relaxed) & OCCUPIED != 0
    }

    #[inline]
    pub(crate) fn key_at(&self, i: usize) -> u64 {
        self.entry(i)[1].load(Relaxed)
    }

    #[inline]
    pub(crate) fn tick_at(&self, i: usize) -> u32 {
        (self.entry(i)[0].load(Relaxed) >> 32) as u32 & TICK_MASK
    }

    #[inline]
    pub(crate) fn bits_at(&self, i: usize, w: usize) -> u64 {
        self.entry(i)[2 + w].load(Relaxed)
    }

    /// Finds `hash`: `Ok(slot)` when present, `Err(free slot ending its probe chain)` when not.
    pub(crate) fn find(&self, hash: u64) -> Result<usize, usize> {
        let mut i = self.home(hash);
        loop {
            if !self.occupied(i) {
                return Err(i);
            }
            if self.key_at(i) == hash {
                return Ok(i);
            }
            i = self.next(i);
        }
    }

    /// Runs `f` on entry `i`'s words inside its seqlock write section; afterwards the entry has
    /// `tick` and is occupied or not.
    #[inline]
    fn write_with(&self, i: usize, tick: u32, occupied: bool, f: impl FnOnce(&[AtomicU64])) {
        let e = self.entry(i);
        let old = e[0].load(Relaxed);
        let v = old as u32;
        debug_assert!(v & 1 == 0, "entry {i} already being written");
        e[0].store((old & !0xffff_ffff) | u64::from(v.wrapping_add(1)), Relaxed);
        fence(Release);
        f(e);
        let occ = if occupied { OCCUPIED } else { 0 };
        e[0].store(occ | (u64::from(tick & TICK_MASK) << 32) | u64::from(v.wrapping_add(2)), Release);
    }

    /// Writes a whole occupied entry (a new key, or a moved one).
    fn write_entry(&self, i: usize, key: u64, tick: u32, bits: impl Fn(usize) -> u64) {
        self.write_with(i, tick, true, |e| {
            e[1].store(key, Relaxed);
            for (w, word) in e[2..].iter().enumerate() {
                word.store(bits(w), Relaxed);
            }
        });
    }

    /// Frees slot `i`.
    fn clear_entry(&self, i: usize) {
        self.write_with(i, 0, false, |e| {
            for word in &e[1..] {
                word.store(0, Relaxed);
            }
        });
    }

    /// Inserts `hash` with only `engine`'s bit at free slot `free` (from [`Table::find`]).
    pub(crate) fn insert_at(&self, free: usize, hash: u64, engine: usize, tick: u32) {
        debug_assert!(!self.occupied(free));
        let (word, bit) = (engine / 64, 1u64 << (engine % 64));
        self.write_entry(free, hash, tick, |w| if w == word { bit } else { 0 });
    }

    /// Sets (`true`) or clears `engine`'s bit of entry `i`, and sets its tick. Returns whether
    /// the bit changed.
    pub(crate) fn set_bit(&self, i: usize, engine: usize, on: bool, tick: u32) -> bool {
        let (word, bit) = (engine / 64, 1u64 << (engine % 64));
        let old = self.bits_at(i, word);
        let new = if on { old | bit } else { old & !bit };
        if new == old && self.tick_at(i) == tick & TICK_MASK {
            return false;
        }
        self.write_with(i, tick, true, |e| e[2 + word].store(new, Relaxed));
        new != old
    }

    /// Whether entry `i` has no engine bit left.
    pub(crate) fn is_unheld(&self, i: usize) -> bool {
        (0..self.bit_words).all(|w| self.bits_at(i, w) == 0)
    }

    /// Deletes entry `i` by backward shift (see the module docs).
    pub(crate) fn delete_at(&self, i: usize) {
        let mut hole = i;
        let mut j = i;
        let mut moved = false;
        let epoch = self.moves.load(Relaxed);
        loop {
            j = self.next(j);
            if !self.occupied(j) {
                break;
            }
            let k = self.key_at(j);
            let h = self.home(k);
            // The entry at j may fill the hole unless its home lies cyclically in (hole, j].
            let stays = if hole <= j { hole < h && h <= j } else { hole < h || h <= j };
            if stays {
                continue;
            }
            if !moved {
                moved = true;
                self.moves.store(epoch.wrapping_add(1), Relaxed);
                fence(Release);
            }
            let tick = self.tick_at(j);
            self.write_entry(hole, k, tick, |w| self.bits_at(j, w));
            hole = j;
        }
        self.clear_entry(hole);
        if moved {
            self.moves.store(epoch.wrapping_add(2), Release);
        }
    }

    /// Clears every entry (for a fresh writer). Entries become free one by one; readers see a
    /// mix of old and empty entries meanwhile, never torn ones.
    pub(crate) fn clear_all(&self) {
        for i in 0..self.slots {
            if self.occupied(i) {
                self.clear_entry(i);
            }
        }
    }

    /// Repairs entries left mid-write by a writer that died (odd version): they become free.
    /// Call before [`Table::clear_all`] when taking over a segment.
    pub(crate) fn repair(&self) {
        let epoch = self.moves.load(Relaxed);
        if epoch & 1 == 1 {
            self.moves.store(epoch.wrapping_add(1), Release);
        }
        for i in 0..self.slots {
            let e = self.entry(i);
            let v = e[0].load(Relaxed);
            if v & 1 == 1 {
                for w in &e[1..] {
                    w.store(0, Relaxed);
                }
                e[0].store(v.wrapping_add(1) & 0xffff_ffff, Release);
            }
        }
    }
}

#[inline(always)]
#[allow(unsafe_code)]
fn prefetch_read(p: *const i8) {
    #[cfg(all(target_arch = "x86_64", not(loom)))]
    // SAFETY: prefetching is a hint that never faults, whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch(p, core::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(all(target_arch = "x86_64", not(loom))))]
    let _ = p;
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn words(n: usize) -> Vec<AtomicU64> {
        (0..n).map(|_| AtomicU64::new(0)).collect()
    }

    /// Keys chosen so they all share home slot 0 of an 8-slot table (high bits zero).
    fn colliding(n: u64) -> Vec<u64> {
        (1..=n).collect()
    }

    #[test]
    fn insert_find_delete_with_collisions_and_wrap() {
        let slots = 8;
        let w = words(Table::words_for(slots, 1));
        let moves = AtomicU64::new(0);
        let t = Table::new(&w, &moves, slots, 1);
        // Home of a key near u64::MAX is the last slot: its chain wraps to slot 0.
        let high = [u64::MAX - 1, u64::MAX - 2, u64::MAX - 3];
        for (n, &k) in high.iter().chain(&colliding(3)).enumerate() {
            let free = t.find(k).unwrap_err();
            t.insert_at(free, k, n, 7);
        }
        let mut bits = [0u64; 1];
        for (n, &k) in high.iter().chain(&colliding(3)).enumerate() {
            assert_eq!(t.read(k, &mut bits), Probe::Hit { tick: 7 }, "key {k:#x}");
            assert_eq!(bits[0], 1 << n);
        }
        // Delete the first wrapped key: every other key must stay findable after the shift.
        let i = t.find(high[0]).unwrap();
        t.delete_at(i);
        assert_eq!(t.read(high[0], &mut bits), Probe::Miss);
        for &k in high[1..].iter().chain(&colliding(3)) {
            assert!(matches!(t.read(k, &mut bits), Probe::Hit { .. }), "key {k:#x} lost by the shift");
        }
        assert_eq!(moves.load(Relaxed) % 2, 0, "move epoch left odd");
        assert!(moves.load(Relaxed) > 0, "a shift happened, so the epoch moved");
    }

    #[test]
    fn odd_version_is_unknown_and_repair_frees_it() {
        let w = words(Table::words_for(4, 1));
        let moves = AtomicU64::new(0);
        let t = Table::new(&w, &moves, 4, 1);
        let free = t.find(42).unwrap_err();
        t.insert_at(free, 42, 3, 0);
        // Simulate a writer that died inside the write section.
        let e = &w[free * 3];
        e.store(e.load(Relaxed) + 1, Relaxed);
        let mut bits = [0u64; 1];
        assert_eq!(t.read(42, &mut bits), Probe::Unknown);
        t.repair();
        assert_eq!(t.read(42, &mut bits), Probe::Miss);
    }

    #[test]
    fn every_key_is_distinct_including_zero() {
        let w = words(Table::words_for(4, 1));
        let moves = AtomicU64::new(0);
        let t = Table::new(&w, &moves, 4, 1);
        let free = t.find(0).unwrap_err();
        t.insert_at(free, 0, 0, 0);
        let mut bits = [0u64; 1];
        assert!(matches!(t.read(0, &mut bits), Probe::Hit { .. }));
        assert_eq!(t.read(1, &mut bits), Probe::Miss);
        let free = t.find(1).unwrap_err();
        t.insert_at(free, 1, 1, 0);
        assert!(matches!(t.read(1, &mut bits), Probe::Hit { .. }));
        assert_eq!(bits[0], 2);
        t.delete_at(t.find(0).unwrap());
        assert_eq!(t.read(0, &mut bits), Probe::Miss);
        assert!(matches!(t.read(1, &mut bits), Probe::Hit { .. }));
    }
}

/// Model-checked tests of the reader/writer protocol (`RUSTFLAGS="--cfg loom" cargo test -p
/// gantry-kvindex --lib --release loom`; `.ci/run` runs them as their own step). Each model has
/// a writer thread change the table while the main thread reads; loom runs every interleaving
/// (within a preemption bound) and the asserts hold in all of them.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    const SLOTS: usize = 4;
    const BIT_WORDS: usize = 2;

    struct Shared {
        words: Vec<AtomicU64>,
        moves: AtomicU64,
    }

    impl Shared {
        fn new() -> Arc<Shared> {
            let words = (0..Table::words_for(SLOTS, BIT_WORDS)).map(|_| AtomicU64::new(0)).collect();
            Arc::new(Shared { words, moves: AtomicU64::new(0) })
        }
        fn table(&self) -> Table<'_> {
            Table::new(&self.words, &self.moves, SLOTS, BIT_WORDS)
        }
    }

    fn model(f: impl Fn() + Sync + Send + 'static) {
        loom::model(f);
    }

    /// Keys 1 and 2 share home slot 0 (their high bits are zero), so 2 sits in slot 1. Deleting 1
    /// moves 2 back to slot 0 while the reader looks for 2: it must find it, with its bits.
    #[test]
    fn a_shifted_entry_is_never_missed() {
        model(|| {
            let s = Shared::new();
            let t = s.table();
            t.insert_at(t.find(1).unwrap_err(), 1, 0, 0);
            t.insert_at(t.find(2).unwrap_err(), 2, 65, 0);
            assert_eq!(t.find(2), Ok(1));
            let slot = t.find(1).unwrap();
            let w = s.clone();
            let writer = loom::thread::spawn(move || w.table().delete_at(slot));
            let mut bits = [0u64; BIT_WORDS];
            match t.read(2, &mut bits) {
                Probe::Hit { .. } => assert_eq!(bits, [0, 2]),
                Probe::Unknown => {}
                Probe::Miss => panic!("key 2 missed while it moved"),
            }
            writer.join().unwrap();
            assert_eq!(t.read(2, &mut bits), Probe::Hit { tick: 0 });
            assert_eq!(t.read(1, &mut bits), Probe::Miss);
        });
    }

    /// A two-word entry rewritten in place is seen whole, before or after, never mixed.
    #[test]
    fn an_entry_is_never_torn() {
        model(|| {
            let s = Shared::new();
            let t = s.table();
            let i = t.find(7).unwrap_err();
            t.write_entry(i, 7, 1, |_| 1);
            let w = s.clone();
            let writer = loom::thread::spawn(move || w.table().write_entry(i, 7, 2, |_| 3));
            let mut bits = [0u64; BIT_WORDS];
            match t.read(7, &mut bits) {
                Probe::Hit { tick: 1 } => assert_eq!(bits, [1, 1]),
                Probe::Hit { tick: 2 } => assert_eq!(bits, [3, 3]),
                Probe::Unknown => {}
                other => panic!("{other:?} with bits {bits:?}"),
            }
            writer.join().unwrap();
        });
    }
}
