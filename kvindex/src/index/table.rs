//! One hash table of `block hash → engines holding it`, laid out in a slice of `AtomicU64` words
//! that may live in shared memory.
//!
//! # Layout
//! `slots` entries (a multiple of [`BUCKET`]) in buckets of [`BUCKET`] entries. First come the
//! buckets' *heads*, `2 · BUCKET` words (one cache line) each: the keys, so a lookup scans a
//! bucket's keys in one line, then the entries' *meta* words, which hold the seqlock version
//! and, for a block held by up to [`FEW`] engines (nearly every block), the engines themselves.
//! So a lookup reads one line per bucket of a prompt's blocks, however many engine slots the
//! index has. A block held by more engines keeps them in its *bit set*: the bit sets of all
//! entries follow the heads, `bit_words` words each, in slot order. Last, in a table whose
//! readers need them (the approximate tier's expiries), come the entries' *ticks*, two 32-bit
//! ticks per word; a table without them (the exact tier) keeps its ticks in the writer's memory.
//!
//! | words | content, for entry `k` of bucket `b` (slot `i = b·BUCKET + k`) |
//! |---|---|
//! | `b·2·BUCKET + k` | key: the block hash (any `u64`) |
//! | `b·2·BUCKET + BUCKET + k` | meta: bits 0–29 seqlock version (odd while the writer changes the entry); bits 30–31 state (0 free, 1 *few*: the holders are inline, 2 *set*: they are in the bit set); bits 32–61, in state *few*, three 10-bit engine slots (one to three engines: a slot repeated counts once) |
//! | `2·slots + i·bit_words ..` | bit set (state *set* only, else zero): bit `e % 64` of word `e / 64` = engine slot `e` holds the block |
//! | `(2 + bit_words)·slots + i/2` | tick (when the table has them): bits `32·(i % 2) ..` |
//!
//! # Placement: near the parent, with bounded alternatives
//! A block may sit in any entry of six *candidate buckets*: [`LOCAL_BUCKETS`] *local* ones, the
//! bucket of its chain position ([`crate::hash::chain_pos`]: `(pos / 4) mod buckets`) and the
//! next three, then two *global* ones chosen by its hash. The writer takes the first free entry
//! of the local buckets, else a free entry of the global bucket with more room (two balanced
//! choices, so one rarely fills while the other has room). A prompt's blocks have positions 4–7
//! apart, so each lands about one bucket after its parent: a lookup walks memory almost
//! sequentially instead of taking a cache and TLB miss per block. A popular parent with
//! thousands of children (one system prompt, many conversations) fills its local buckets and
//! the rest of the children go to their global buckets, so nothing clusters without bound: a
//! lookup or insert looks at 24 entries at most.
//! When all of them are taken, the writer evicts one (see `writer.rs`).
//!
//! # Concurrency protocol (one writer, any number of readers)
//! * Every entry is a seqlock: the writer makes the version odd, writes the key, bit set and
//!   tick, then stores the meta word with the new state and holders and an even version
//!   (release). A reader loads the meta word (acquire), the key (and the bit words and tick it
//!   needs), then checks the meta word again after an acquire fence; a changed or odd version
//!   means retry. So a reader never returns a torn entry; inline holders, in the meta word
//!   itself, are read whole.
//! * Entries never move: an insert fills a free entry, a delete frees one. A block present for
//!   the whole of a lookup stays in one entry whose version does not change, so the lookup finds
//!   it; blocks inserted or deleted during the lookup may or may not be seen.
//! * Retries are bounded. A reader that cannot get a stable view (a writer that died in the
//!   middle of a write leaves an odd version forever) reports [`Probe::Unknown`], which lookups
//!   treat as a miss: the index is a hint, and a miss only costs a cache hit.
//!
//! The loom tests at the end of this file model-check the protocol.

use crate::sync::{fence, spin, AtomicU64};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

/// Meta word: the seqlock version (bit 0 odd while the writer changes the entry).
const VERSION_MASK: u64 = (1 << 30) - 1;
/// Meta word: the entry's state.
const STATE_MASK: u64 = 3 << 30;
/// State: one to [`FEW`] holders, inline in the meta word.
const STATE_FEW: u64 = 1 << 30;
/// State: the holders are in the entry's bit set.
const STATE_SET: u64 = 2 << 30;
/// Meta word: where the inline holders start, and each one's width.
const HOLDER_SHIFT: u32 = 32;
const HOLDER_BITS: u32 = 10;
const HOLDER_MASK: u64 = (1 << HOLDER_BITS) - 1;
/// Most holders an entry keeps inline.
pub(crate) const FEW: usize = 3;
/// Ticks are 31 bits wide; compare them with wrapping arithmetic.
pub(crate) const TICK_MASK: u32 = 0x7fff_ffff;
/// Most engine-bit words per entry (1,024 engine slots).
pub(crate) const MAX_BIT_WORDS: usize = 16;
const _: () = assert!(MAX_BIT_WORDS * 64 <= 1 << HOLDER_BITS && HOLDER_SHIFT + FEW as u32 * HOLDER_BITS <= 64);
/// Entries per bucket.
pub(crate) const BUCKET: usize = 4;
/// log2 of [`BUCKET`]: a chain position's local bucket is `pos >> BUCKET_SHIFT`.
const BUCKET_SHIFT: u32 = BUCKET.trailing_zeros();
/// Consecutive local buckets a block may use.
pub(crate) const LOCAL_BUCKETS: usize = 4;
/// A word mask selecting every bit word of an entry (see [`Table::read_at`]).
pub(crate) const ALL_WORDS: u32 = u32::MAX;
/// Attempts a reader makes before giving up on a probe.
const MAX_ATTEMPTS: usize = 64;

/// The engines holding a block, as a reader found them: the state and inline holders of its
/// meta word (a plain word, so a lookup keeps it in a register).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Held(u64);

impl Held {
    /// No holders: equal to no block's.
    pub(crate) const NONE: Held = Held(0);

    /// Whether the holders are inline (one to [`FEW`] engine slots); if not, they were copied
    /// into the caller's bit words (those it asked for).
    #[inline(always)]
    pub(crate) fn is_inline(self) -> bool {
        self.0 & STATE_MASK == STATE_FEW
    }

    /// Writes inline holders into `bits` on the words in `words` (the others are left as they
    /// were): a no-op for holders in a bit set, whose bits are there already.
    #[inline(always)]
    pub(crate) fn spread(self, bits: &mut [u64], words: u32) {
        if !self.is_inline() {
            return;
        }
        if words == ALL_WORDS {
            bits.fill(0);
        } else {
            let mut m = words;
            while m != 0 {
                bits[m.trailing_zeros() as usize] = 0;
                m &= m - 1;
            }
        }
        for id in few_ids(self.0) {
            let w = usize::from(id) / 64;
            if words >> w & 1 == 1 {
                bits[w] |= 1 << (id % 64);
            }
        }
    }
}

/// Outcome of a reader's probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// Found: its holders, and its tick (0 in a table without ticks).
    Hit { tick: u32, held: Held },
    /// Not in the table.
    Miss,
    /// No stable view within the retry budget (treated as a miss).
    Unknown,
}

/// What a scan of one bucket found.
enum Scan {
    Hit(u32, Held),
    Absent,
    Retry,
}

/// The meta-word bits (state and holders) of an entry held by `ids` (one to [`FEW`] distinct
/// slots; the first is repeated into the unused places).
fn few_meta(ids: &[usize]) -> u64 {
    debug_assert!((1..=FEW).contains(&ids.len()));
    (0..FEW).fold(STATE_FEW, |m, k| {
        let id = ids.get(k).unwrap_or(&ids[0]);
        m | (*id as u64 & HOLDER_MASK) << (HOLDER_SHIFT + k as u32 * HOLDER_BITS)
    })
}

/// The inline holders of meta word `m` (state *few*).
#[inline(always)]
fn few_ids(m: u64) -> [u16; FEW] {
    std::array::from_fn(|k| ((m >> (HOLDER_SHIFT + k as u32 * HOLDER_BITS)) & HOLDER_MASK) as u16)
}

/// The local bucket of consecutive blocks of a prompt, advanced block by block without a
/// division: always `(pos / 4) mod buckets` of the block's chain position.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LocalCursor {
    bucket: usize,
    sub: u64,
}

impl LocalCursor {
    /// The local bucket of the block the cursor is at.
    #[inline(always)]
    pub(crate) fn bucket(&self) -> usize {
        self.bucket
    }
}

/// A view of one table. Cheap to copy; all methods take `&self` because the memory is shared.
#[derive(Clone, Copy)]
pub(crate) struct Table<'a> {
    words: &'a [AtomicU64],
    /// Two ticks per word, or empty (ticks read as 0 and are not kept).
    ticks: &'a [AtomicU64],
    slots: usize,
    bit_words: usize,
}

impl<'a> Table<'a> {
    /// Words needed for `slots` entries of `bit_words` bit words, with the ticks when `ticks`.
    pub(crate) fn words_for(slots: usize, bit_words: usize, ticks: bool) -> usize {
        slots * (2 + bit_words) + if ticks { Self::tick_words(slots) } else { 0 }
    }

    /// Words holding the ticks of `slots` entries.
    pub(crate) fn tick_words(slots: usize) -> usize {
        slots.div_ceil(2)
    }

    /// A table over `words`, which end with its ticks when `ticks` (see [`Table::words_for`]).
    pub(crate) fn new(words: &'a [AtomicU64], slots: usize, bit_words: usize, ticks: bool) -> Self {
        assert!(slots >= BUCKET && slots.is_multiple_of(BUCKET) && (1..=MAX_BIT_WORDS).contains(&bit_words));
        assert_eq!(words.len(), Self::words_for(slots, bit_words, ticks), "table words do not match its shape");
        let (words, ticks) = words.split_at(slots * (2 + bit_words));
        Table { words, ticks, slots, bit_words }
    }

    /// This view keeping its ticks in `ticks` ([`Table::tick_words`] words), for a table whose
    /// ticks only its writer reads.
    pub(crate) fn with_ticks(self, ticks: &'a [AtomicU64]) -> Self {
        assert!(self.ticks.is_empty() && ticks.len() == Self::tick_words(self.slots));
        Table { ticks, ..self }
    }

    /// This view with its bit-word count spelled out as `bit_words` (which must equal it): a
    /// constant there lets the compiler specialise the strides of an inlined lookup.
    #[inline(always)]
    pub(crate) fn with_bit_words(self, bit_words: usize) -> Self {
        debug_assert_eq!(bit_words, self.bit_words);
        Table { bit_words, ..self }
    }

    pub(crate) fn slots(&self) -> usize {
        self.slots
    }

    pub(crate) fn bit_words(&self) -> usize {
        self.bit_words
    }

    #[inline(always)]
    fn buckets(&self) -> usize {
        self.slots / BUCKET
    }

    /// The head of bucket `b`: its keys, then its meta words.
    #[inline(always)]
    fn bucket(&self, b: usize) -> &'a [AtomicU64] {
        debug_assert!(b < self.buckets(), "bucket {b} beyond the table's {}", self.buckets());
        &self.words[b * 2 * BUCKET..(b + 1) * 2 * BUCKET]
    }

    #[inline(always)]
    fn key_word(&self, i: usize) -> &'a AtomicU64 {
        &self.bucket(i / BUCKET)[i % BUCKET]
    }

    #[inline(always)]
    fn meta(&self, i: usize) -> &'a AtomicU64 {
        &self.bucket(i / BUCKET)[BUCKET + i % BUCKET]
    }

    /// Entry `i`'s bit set, in the region after the heads.
    #[inline(always)]
    fn bit_set(&self, i: usize) -> &'a [AtomicU64] {
        debug_assert!(i < self.slots, "slot {i} beyond the table's {}", self.slots);
        let start = 2 * self.slots + i * self.bit_words;
        &self.words[start..start + self.bit_words]
    }

    /// Entry `i`'s tick (0 without ticks).
    #[inline(always)]
    pub(crate) fn tick_at(&self, i: usize) -> u32 {
        match self.ticks.get(i / 2) {
            Some(w) => (w.load(Relaxed) >> (32 * (i % 2))) as u32 & TICK_MASK,
            None => 0,
        }
    }

    /// Sets entry `i`'s tick (writer only; inside the entry's write section when readers read it).
    fn set_tick(&self, i: usize, tick: u32) {
        if let Some(w) = self.ticks.get(i / 2) {
            let shift = 32 * (i % 2);
            let old = w.load(Relaxed);
            w.store((old & !(0xffff_ffff << shift)) | u64::from(tick & TICK_MASK) << shift, Relaxed);
        }
    }

    /// The local bucket of a block at chain position `pos`.
    #[inline(always)]
    pub(crate) fn local_bucket(&self, pos: u64) -> usize {
        ((pos >> BUCKET_SHIFT) % self.buckets() as u64) as usize
    }

    /// The cursor of a prompt whose first block is `hash` (see [`LocalCursor::bucket`]).
    #[inline(always)]
    pub(crate) fn first_local(&self, hash: u64) -> LocalCursor {
        let pos = crate::hash::chain_pos(None, hash);
        LocalCursor { bucket: self.local_bucket(pos), sub: pos & (BUCKET as u64 - 1) }
    }

    /// Moves `c` to the prompt's next block, `hash`, and returns that block's local bucket.
    #[inline(always)]
    pub(crate) fn next_local(&self, c: &mut LocalCursor, hash: u64) -> usize {
        let s = c.sub + 4 + (hash & 3);
        c.sub = s & (BUCKET as u64 - 1);
        // One or two buckets on, so two conditional subtractions wrap it even in a table of one
        // bucket (they compile to selects, not branches).
        let nb = self.buckets();
        let b = c.bucket + (s >> BUCKET_SHIFT) as usize;
        let b = if b >= nb { b - nb } else { b };
        c.bucket = if b >= nb { b - nb } else { b };
        c.bucket
    }

    /// The first global bucket of `hash`.
    #[inline(always)]
    fn global_bucket(&self, hash: u64) -> usize {
        ((hash as u128 * self.buckets() as u128) >> 64) as usize
    }

    /// The candidate buckets of `hash`: [`LOCAL_BUCKETS`] consecutive ones from its local bucket
    /// when that is known, then two chosen by its hash.
    #[inline]
    fn candidates(&self, hash: u64, local: Option<usize>) -> ([usize; LOCAL_BUCKETS + 2], usize) {
        let nb = self.buckets();
        let g1 = self.global_bucket(hash);
        let mixed = hash.rotate_left(29).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let g2 = ((mixed as u128 * nb as u128) >> 64) as usize;
        let mut out = [g1; LOCAL_BUCKETS + 2];
        match local {
            Some(l) => {
                for (k, b) in out[..LOCAL_BUCKETS].iter_mut().enumerate() {
                    *b = (l + k) % nb;
                }
                out[LOCAL_BUCKETS] = g1;
                out[LOCAL_BUCKETS + 1] = g2;
                (out, LOCAL_BUCKETS + 2)
            }
            None => {
                out[1] = g2;
                (out, 2)
            }
        }
    }

    /// The entries `hash` may occupy, in the order lookups try them (inserts take a free local
    /// entry first, then one of the emptier global bucket: see [`Table::find`]).
    pub(crate) fn candidate_slots(&self, hash: u64, local: Option<usize>) -> impl Iterator<Item = usize> {
        let (buckets, n) = self.candidates(hash, local);
        buckets.into_iter().take(n).flat_map(|b| b * BUCKET..(b + 1) * BUCKET)
    }

    /// Hints the CPU to load the keys and meta words of `hash`'s global buckets (where a block
    /// goes when its local buckets are full: about one block in ten in a full table).
    #[inline(always)]
    pub(crate) fn prefetch_global(&self, hash: u64) {
        let (g, _) = self.candidates(hash, None);
        for b in &g[..2] {
            prefetch_read(self.bucket(*b).as_ptr().cast::<i8>());
        }
    }

    // ---- reader side ----

    /// Looks `hash` up (its local buckets first when `local` is its local bucket), copying its
    /// engine bits into `bits[..bit_words]` when they are in its bit set.
    ///
    /// Keys are compared first, without the seqlock (a mismatch needs no consistent view: an
    /// entry that holds `hash` throughout the lookup always shows it); only a matching entry is
    /// read under its seqlock.
    pub(crate) fn read(&self, hash: u64, local: Option<usize>, bits: &mut [u64]) -> Probe {
        self.read_from(hash, local, 0, bits)
    }

    /// [`Table::read`] of a block [`Table::locate_local`] did not find in its local buckets: the
    /// same probe, its first attempt skipping them (a retry starts over).
    pub(crate) fn read_beyond_local(&self, hash: u64, local: usize, bits: &mut [u64]) -> Probe {
        self.read_from(hash, Some(local), LOCAL_BUCKETS, bits)
    }

    /// [`Table::read`], its first attempt skipping the first `skip` local buckets.
    fn read_from(&self, hash: u64, local: Option<usize>, mut skip: usize, bits: &mut [u64]) -> Probe {
        'attempt: for _ in 0..MAX_ATTEMPTS {
            // Only the first attempt skips; a retry starts over.
            let from = std::mem::take(&mut skip);
            // Local buckets first; the global ones (computed only when needed) after.
            if let Some(l) = local {
                let nb = self.buckets();
                let mut b = (l + from) % nb;
                for _ in from..LOCAL_BUCKETS {
                    match self.scan(b, hash, bits) {
                        Scan::Hit(tick, held) => return Probe::Hit { tick, held },
                        Scan::Retry => continue 'attempt,
                        Scan::Absent => {}
                    }
                    b += 1;
                    if b == nb {
                        b = 0;
                    }
                }
            }
            let (g, _) = self.candidates(hash, None);
            for &b in &g[..2] {
                match self.scan(b, hash, bits) {
                    Scan::Hit(tick, held) => return Probe::Hit { tick, held },
                    Scan::Retry => continue 'attempt,
                    Scan::Absent => {}
                }
            }
            return Probe::Miss;
        }
        Probe::Unknown
    }

    /// Looks for `hash` in bucket `b`: keys first, then the seqlock of a matching entry.
    #[inline(always)]
    fn scan(&self, b: usize, hash: u64, bits: &mut [u64]) -> Scan {
        let keys = &self.bucket(b)[..BUCKET];
        for (k, key) in keys.iter().enumerate() {
            if key.load(Relaxed) != hash {
                continue;
            }
            match self.read_entry(b * BUCKET + k, hash, bits, ALL_WORDS) {
                Scan::Absent => {}
                found => return found,
            }
        }
        Scan::Absent
    }

    /// Reads entry `i`, whose key was just seen equal to `hash`, under its seqlock, copying
    /// only the bit words in `words` (bit `w` = word `w`; the others are left as they were) when
    /// its holders are in its bit set. A subset of the words read under the seqlock is as
    /// consistent as all of them.
    #[inline(always)]
    fn read_entry(&self, i: usize, hash: u64, bits: &mut [u64], words: u32) -> Scan {
        let (key, meta) = (self.key_word(i), self.meta(i));
        let m1 = meta.load(Acquire);
        if m1 & 1 == 1 {
            spin();
            return Scan::Retry;
        }
        let state = m1 & STATE_MASK;
        if state == 0 || key.load(Relaxed) != hash {
            return Scan::Absent;
        }
        if state == STATE_SET {
            let set = self.bit_set(i);
            debug_assert!(words == ALL_WORDS || words >> set.len() == 0, "word mask {words:#x} beyond the bit set");
            if words == ALL_WORDS {
                for (dst, w) in bits.iter_mut().zip(set) {
                    *dst = w.load(Relaxed);
                }
            } else {
                let mut m = words;
                while m != 0 {
                    let w = m.trailing_zeros() as usize;
                    bits[w] = set[w].load(Relaxed);
                    m &= m - 1;
                }
            }
        }
        let held = Held(m1 & !VERSION_MASK);
        let tick = self.tick_at(i);
        fence(Acquire);
        if meta.load(Relaxed) == m1 {
            return Scan::Hit(tick, held);
        }
        Scan::Retry
    }

    // ---- the pipelined lookup of a prompt (see `IndexReader::overlaps`) ----

    /// Hints the CPU to load the heads (keys and meta words) of bucket `b` and of the next (a
    /// prompt's blocks spill into it): stage 1 of a lookup, and the writer's look ahead.
    #[inline(always)]
    pub(crate) fn prefetch_keys(&self, b: usize) {
        // The next bucket of the last is past the heads: a harmless hint (prefetches never fault).
        let base = self.words.as_ptr().cast::<i8>();
        prefetch_read(base.wrapping_add(b * 2 * BUCKET * 8));
        prefetch_read(base.wrapping_add((b + 1) * 2 * BUCKET * 8));
    }

    /// Stage 2: the entry of `hash` among the keys of its local buckets from `local`, found
    /// without the seqlock, so only a hint that [`Table::read_at`] confirms. When found with its
    /// holders in its bit set, the bit words in `words` (those stage 3 will read: see
    /// [`Table::read_at`]) are prefetched; when not found, the keys of its global buckets are
    /// (where a block goes when its local buckets are full) for [`Table::locate_global`], so
    /// only the blocks that need a random access pay for one.
    #[inline(always)]
    pub(crate) fn locate_local(&self, hash: u64, local: usize, words: u32) -> Option<usize> {
        let nb = self.buckets();
        let mut b = local;
        for _ in 0..LOCAL_BUCKETS {
            if let Some(i) = self.locate_in(b, hash, words) {
                return Some(i);
            }
            b += 1;
            if b == nb {
                b = 0;
            }
        }
        self.prefetch_global(hash);
        None
    }

    /// Stage 2b, for a block [`Table::locate_local`] did not find: its entry among the keys of
    /// its global buckets (which that stage prefetched), again only a hint, prefetched as there.
    #[inline(always)]
    pub(crate) fn locate_global(&self, hash: u64, words: u32) -> Option<usize> {
        let (g, _) = self.candidates(hash, None);
        match self.locate_in(g[0], hash, words) {
            None => self.locate_in(g[1], hash, words),
            found => found,
        }
    }

    /// The entry of bucket `b` whose key is `hash`, if any, prefetching its bit words in `words`
    /// when its holders are in its bit set.
    #[inline(always)]
    fn locate_in(&self, b: usize, hash: u64, words: u32) -> Option<usize> {
        let bucket = self.bucket(b);
        // Every key compared, without a branch per key: which one matches is random.
        let hits = (0..BUCKET).fold(0u32, |m, k| m | u32::from(bucket[k].load(Relaxed) == hash) << k);
        if hits == 0 {
            return None;
        }
        let k = hits.trailing_zeros() as usize;
        let i = b * BUCKET + k;
        if bucket[BUCKET + k].load(Relaxed) & STATE_MASK == STATE_SET {
            self.prefetch_bits(i, words);
        }
        Some(i)
    }

    /// Hints the CPU to load the bit words in `words` of entry `i`.
    #[inline(always)]
    fn prefetch_bits(&self, i: usize, words: u32) {
        let set = self.bit_set(i);
        let start = set.as_ptr().cast::<i8>();
        if words == ALL_WORDS {
            // Each line from the set's first byte, then its last byte's line if that is another
            // (a set of a power-of-two width never straddles lines: no second hint).
            let (first, last) = (start as usize, start as usize + set.len() * 8 - 1);
            let mut off = 0;
            while off < set.len() * 8 {
                prefetch_read(start.wrapping_add(off));
                off += 64;
            }
            if last / 64 >= first / 64 + (set.len() * 8).div_ceil(64) {
                prefetch_read(start.wrapping_add(set.len() * 8 - 1));
            }
        } else {
            let mut m = words;
            while m != 0 {
                prefetch_read(start.wrapping_add(8 * m.trailing_zeros() as usize));
                m &= m - 1;
            }
        }
    }

    /// Stage 3: reads `hash` at entry `i` (from [`Table::locate_local`] or
    /// [`Table::locate_global`]) under its seqlock, or, when it is no longer there or a write is
    /// in progress, looks it up everywhere ([`Table::read`] from local bucket `local`).
    ///
    /// Only the bit words in `words` are copied on the fast path (the fallback copies all):
    /// a lookup reads just the words of the engines that still hold every block so far.
    #[inline(always)]
    pub(crate) fn read_at(&self, i: usize, hash: u64, local: usize, bits: &mut [u64], words: u32) -> Probe {
        if let Scan::Hit(tick, held) = self.read_entry(i, hash, bits, words) {
            return Probe::Hit { tick, held };
        }
        self.read(hash, Some(local), bits)
    }

    // ---- writer side (one writer at a time; it owns every odd version it creates) ----

    /// Whether slot `i` holds an entry.
    #[inline]
    pub(crate) fn occupied(&self, i: usize) -> bool {
        self.meta(i).load(Relaxed) & STATE_MASK != 0
    }

    /// Whether `engine` holds entry `i` (the writer's view: it is the only one changing entries).
    pub(crate) fn holds(&self, i: usize, engine: usize) -> bool {
        let m = self.meta(i).load(Relaxed);
        match m & STATE_MASK {
            STATE_FEW => few_ids(m).contains(&(engine as u16)),
            STATE_SET => self.bit_set(i)[engine / 64].load(Relaxed) >> (engine % 64) & 1 == 1,
            _ => false,
        }
    }

    /// Calls `f` with each engine holding entry `i`, once each (the writer's view).
    pub(crate) fn for_each_holder(&self, i: usize, mut f: impl FnMut(usize)) {
        let m = self.meta(i).load(Relaxed);
        match m & STATE_MASK {
            STATE_FEW => {
                let ids = few_ids(m);
                for (k, &id) in ids.iter().enumerate() {
                    if !ids[..k].contains(&id) {
                        f(usize::from(id));
                    }
                }
            }
            STATE_SET => {
                for (w, word) in self.bit_set(i).iter().enumerate() {
                    let mut bits = word.load(Relaxed);
                    while bits != 0 {
                        f(w * 64 + bits.trailing_zeros() as usize);
                        bits &= bits - 1;
                    }
                }
            }
            _ => {}
        }
    }

    /// Finds `hash`: `Ok(slot)` when present, else `Err(a free candidate, if any)`.
    ///
    /// The free entry is the first one of the local buckets; failing that, one of the global
    /// bucket with more free entries (the first on a tie): balancing the two keeps either from
    /// filling up while the other has room, so an insert rarely finds both full.
    pub(crate) fn find(&self, hash: u64, local: Option<usize>) -> Result<usize, Option<usize>> {
        let (buckets, n) = self.candidates(hash, local);
        let mut free = None;
        // Free entries of each global bucket, and its first.
        let mut global = [(0usize, None); 2];
        for (j, &b) in buckets[..n].iter().enumerate() {
            let bucket = self.bucket(b);
            for k in 0..BUCKET {
                let occupied = bucket[BUCKET + k].load(Relaxed) & STATE_MASK != 0;
                if !occupied {
                    if let Some(g) = (j + 2).checked_sub(n) {
                        global[g].0 += 1;
                        global[g].1 = global[g].1.or(Some(b * BUCKET + k));
                    } else {
                        free = free.or(Some(b * BUCKET + k));
                    }
                } else if bucket[k].load(Relaxed) == hash {
                    return Ok(b * BUCKET + k);
                }
            }
        }
        let [g1, g2] = global;
        Err(free.or(if g2.0 > g1.0 { g2.1 } else { g1.1 }))
    }

    /// Runs `f` on entry `i`'s key and bit set inside its seqlock write section, and sets its
    /// tick; afterwards the entry's state and holders are `state` (meta bits 30–63).
    #[inline]
    fn write_with(&self, i: usize, tick: u32, state: u64, f: impl FnOnce(&AtomicU64, &[AtomicU64])) {
        debug_assert_eq!(state & VERSION_MASK, 0);
        let meta = self.meta(i);
        let old = meta.load(Relaxed);
        let v = old & VERSION_MASK;
        debug_assert!(v & 1 == 0, "entry {i} already being written");
        meta.store((old & !VERSION_MASK) | ((v + 1) & VERSION_MASK), Relaxed);
        fence(Release);
        f(self.key_word(i), self.bit_set(i));
        self.set_tick(i, tick);
        meta.store(state | ((v + 2) & VERSION_MASK), Release);
    }

    /// Frees slot `i`.
    pub(crate) fn delete_at(&self, i: usize) {
        let was_set = self.meta(i).load(Relaxed) & STATE_MASK == STATE_SET;
        self.write_with(i, 0, 0, |k, set| {
            k.store(0, Relaxed);
            if was_set {
                set.iter().for_each(|w| w.store(0, Relaxed));
            }
        });
    }

    /// Inserts `hash` held by `engine` alone at free slot `free` (from [`Table::find`]).
    pub(crate) fn insert_at(&self, free: usize, hash: u64, engine: usize, tick: u32) {
        debug_assert!(!self.occupied(free));
        self.write_with(free, tick, few_meta(&[engine]), |k, _| k.store(hash, Relaxed));
    }

    /// Writes entry `i` (free or not) as `key` held by the engines in `bits` (at least one),
    /// inline when they are few.
    #[cfg(all(test, loom))]
    fn write_entry(&self, i: usize, key: u64, tick: u32, bits: &[u64]) {
        let ids: Vec<usize> =
            (0..self.bit_words * 64).filter(|&e| bits.get(e / 64).is_some_and(|w| w >> (e % 64) & 1 == 1)).collect();
        let was_set = self.meta(i).load(Relaxed) & STATE_MASK == STATE_SET;
        let (state, set_bits) = if ids.len() <= FEW { (few_meta(&ids), false) } else { (STATE_SET, true) };
        self.write_with(i, tick, state, |k, set| {
            k.store(key, Relaxed);
            if set_bits || was_set {
                for (w, word) in set.iter().enumerate() {
                    word.store(if set_bits { bits[w] } else { 0 }, Relaxed);
                }
            }
        });
    }

    /// Up to `FEW + 1` of entry `i`'s holders other than `except`, and how many (`FEW + 1`
    /// standing for "more than `FEW`"); the writer's view.
    fn holders_but(&self, i: usize, except: usize) -> ([usize; FEW + 1], usize) {
        let mut ids = [0usize; FEW + 1];
        let mut n = 0;
        self.for_each_holder(i, |e| {
            if e != except && n < ids.len() {
                ids[n] = e;
                n += 1;
            }
        });
        (ids, n)
    }

    /// Adds `engine` to the holders of entry `i` and sets its tick. Returns whether the engine
    /// was new there.
    pub(crate) fn add_holder(&self, i: usize, engine: usize, tick: u32) -> bool {
        let m = self.meta(i).load(Relaxed);
        debug_assert!(m & STATE_MASK != 0, "entry {i} is free");
        if self.holds(i, engine) {
            if self.tick_at(i) != tick & TICK_MASK {
                self.write_with(i, tick, m & !VERSION_MASK, |_, _| {});
            }
            return false;
        }
        let (word, bit) = (engine / 64, 1u64 << (engine % 64));
        if m & STATE_MASK == STATE_SET {
            let old = self.bit_set(i)[word].load(Relaxed);
            self.write_with(i, tick, STATE_SET, |_, set| set[word].store(old | bit, Relaxed));
            return true;
        }
        let (mut ids, mut n) = self.holders_but(i, engine);
        ids[n] = engine;
        n += 1;
        if n <= FEW {
            self.write_with(i, tick, few_meta(&ids[..n]), |_, _| {});
        } else {
            // Too many to keep inline: into the bit set (all zero while the state was few).
            self.write_with(i, tick, STATE_SET, |_, set| {
                for &e in &ids[..n] {
                    let w = &set[e / 64];
                    w.store(w.load(Relaxed) | 1 << (e % 64), Relaxed);
                }
            });
        }
        true
    }

    /// Removes `engine` from the holders of entry `i`, freeing the entry when none is left.
    /// Returns None when the engine did not hold it, else whether the entry was freed.
    pub(crate) fn remove_holder(&self, i: usize, engine: usize) -> Option<bool> {
        if !self.holds(i, engine) {
            return None;
        }
        let tick = self.tick_at(i);
        let (ids, n) = self.holders_but(i, engine);
        if n == 0 {
            self.delete_at(i);
            return Some(true);
        }
        let was_set = self.meta(i).load(Relaxed) & STATE_MASK == STATE_SET;
        if n <= FEW {
            // Few enough to keep inline again: the bit set goes back to zero.
            self.write_with(i, tick, few_meta(&ids[..n]), |_, set| {
                if was_set {
                    set.iter().for_each(|w| w.store(0, Relaxed));
                }
            });
        } else {
            let (word, bit) = (engine / 64, 1u64 << (engine % 64));
            let old = self.bit_set(i)[word].load(Relaxed);
            self.write_with(i, tick, STATE_SET, |_, set| set[word].store(old & !bit, Relaxed));
        }
        Some(false)
    }

    /// Clears every entry (for a fresh writer). Entries become free one by one; readers see a
    /// mix of old and empty entries meanwhile, never torn ones.
    pub(crate) fn clear_all(&self) {
        for i in 0..self.slots {
            if self.occupied(i) {
                self.delete_at(i);
            }
        }
    }

    /// Repairs entries left mid-write by a writer that died (odd version): they become free.
    /// Call before [`Table::clear_all`] when taking over a segment.
    pub(crate) fn repair(&self) {
        for i in 0..self.slots {
            let meta = self.meta(i);
            let m = meta.load(Relaxed);
            if m & 1 == 1 {
                self.key_word(i).store(0, Relaxed);
                for w in self.bit_set(i) {
                    w.store(0, Relaxed);
                }
                meta.store((m + 1) & VERSION_MASK, Release);
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

    /// Key `k` of a well-spread sequence (so tests pick keys whose global buckets differ).
    fn spread(k: u64) -> u64 {
        k.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    /// The engines a probe found (sorted), its bits read on all words.
    fn holders(p: Probe, bits: &[u64]) -> Option<Vec<usize>> {
        let Probe::Hit { held, .. } = p else { return None };
        let mut b = bits.to_vec();
        held.spread(&mut b, ALL_WORDS);
        Some((0..b.len() * 64).filter(|&e| b[e / 64] >> (e % 64) & 1 == 1).collect())
    }

    /// The engines holding entry `i` in the writer's view (sorted).
    fn writer_view(t: &Table<'_>, i: usize) -> Vec<usize> {
        let mut v = Vec::new();
        t.for_each_holder(i, |e| v.push(e));
        v.sort_unstable();
        v
    }

    #[test]
    fn insert_find_delete_across_local_and_global_buckets() {
        let slots = 64;
        let w = words(Table::words_for(slots, 1, false));
        let t = Table::new(&w, slots, 1, false);
        let mut bits = [0u64; 1];
        // 12 keys all with local bucket 3: they fit its local buckets, or go global.
        let keys: Vec<u64> = (1..=12u64).map(spread).collect();
        let mut local = 0;
        for (n, &k) in keys.iter().enumerate() {
            let free = t.find(k, Some(3)).unwrap_err().expect("a free candidate");
            if (3 * BUCKET..5 * BUCKET).contains(&free) {
                local += 1;
            }
            t.insert_at(free, k, n % 64, 0);
        }
        assert!(local >= BUCKET, "{local} keys placed locally");
        for (n, &k) in keys.iter().enumerate() {
            assert_eq!(holders(t.read(k, Some(3), &mut bits), &bits), Some(vec![n % 64]), "key {k:#x}");
        }
        for &k in keys.iter().step_by(3) {
            t.delete_at(t.find(k, Some(3)).unwrap());
        }
        for (n, &k) in keys.iter().enumerate() {
            let r = t.read(k, Some(3), &mut bits);
            assert_eq!(r == Probe::Miss, n % 3 == 0, "key {k:#x}: {r:?}");
        }
    }

    /// Up to three holders stay inline in the meta word with the bit set untouched; a fourth
    /// moves them all to the bit set; removals bring them back inline (the bit set zeroed again),
    /// and removing the last frees the entry. Readers and the writer see the same holders
    /// throughout.
    #[test]
    fn holders_move_between_the_meta_word_and_the_bit_set() {
        let slots = 8;
        let w = words(Table::words_for(slots, 4, false));
        let t = Table::new(&w, slots, 4, false);
        let i = t.find(9, None).unwrap_err().unwrap();
        t.insert_at(i, 9, 200, 0);
        let mut bits = [0u64; 4];
        let mut expect = vec![200];
        let check = |expect: &[usize], inline: bool| {
            let mut bits = [0u64; 4];
            let p = t.read(9, None, &mut bits);
            assert_eq!(holders(p, &bits).as_deref(), Some(expect));
            assert_eq!(writer_view(&t, i), expect);
            assert_eq!(matches!(p, Probe::Hit { held, .. } if held.is_inline()), inline, "{p:?} holding {expect:?}");
            assert_eq!(t.bit_set(i).iter().all(|w| w.load(Relaxed) == 0), inline, "bit set of {expect:?}");
            for e in 0..256 {
                assert_eq!(t.holds(i, e), expect.contains(&e), "engine {e}");
            }
        };
        check(&expect, true);
        assert!(!t.add_holder(i, 200, 0), "already held");
        for e in [3, 64, 255, 7] {
            assert!(t.add_holder(i, e, 0));
            expect.push(e);
            expect.sort_unstable();
            check(&expect, expect.len() <= FEW);
        }
        assert_eq!(t.remove_holder(i, 100), None, "never held");
        for e in [64, 3, 255, 7] {
            assert_eq!(t.remove_holder(i, e), Some(false));
            expect.retain(|&x| x != e);
            check(&expect, expect.len() <= FEW);
        }
        assert_eq!(t.remove_holder(i, 200), Some(true), "the last holder frees the entry");
        assert!(!t.occupied(i));
        assert_eq!(t.read(9, None, &mut bits), Probe::Miss);
    }

    /// The lookup pipeline's probe: a block in its local buckets is located there and read at
    /// that entry; one that went global is not located, and is read beyond the local buckets;
    /// a located entry that changed since is not trusted.
    #[test]
    fn the_pipelined_probe_finds_local_and_global_blocks() {
        let slots = 64;
        let w = words(Table::words_for(slots, 1, false));
        let t = Table::new(&w, slots, 1, false);
        let mut bits = [0u64; 1];
        // 20 keys all with local bucket 3: 16 fit its local buckets, 4 go global.
        let keys: Vec<u64> = (1..=20u64).map(spread).collect();
        let local_slots = 3 * BUCKET..(3 + LOCAL_BUCKETS) * BUCKET;
        for (n, &k) in keys.iter().enumerate() {
            t.insert_at(t.find(k, Some(3)).unwrap_err().expect("a free candidate"), k, n, 0);
        }
        let mut global = 0;
        for (n, &k) in keys.iter().enumerate() {
            let slot = t.find(k, Some(3)).unwrap();
            let probe = match t.locate_local(k, 3, ALL_WORDS) {
                Some(at) => {
                    assert_eq!(at, slot, "key {k:#x} located at another entry");
                    t.read_at(at, k, 3, &mut bits, ALL_WORDS)
                }
                None => {
                    assert!(!local_slots.contains(&slot), "key {k:#x} at local slot {slot} not located");
                    global += 1;
                    assert_eq!(holders(t.read_beyond_local(k, 3, &mut bits), &bits), Some(vec![n]));
                    let at = t.locate_global(k, ALL_WORDS).expect("located among its global keys");
                    assert_eq!(at, slot, "key {k:#x} located at another global entry");
                    t.read_at(at, k, 3, &mut bits, ALL_WORDS)
                }
            };
            assert_eq!(holders(probe, &bits), Some(vec![n]), "key {k:#x}");
        }
        assert_eq!(global, keys.len() - LOCAL_BUCKETS * BUCKET);
        let absent = 0x1234_5678;
        assert_eq!((t.locate_local(absent, 3, ALL_WORDS), t.locate_global(absent, ALL_WORDS)), (None, None));
        // A stale location: the entry now holds another key, so the probe looks everywhere.
        let (a, b) = (keys[0], keys[1]);
        let at = t.locate_local(a, 3, ALL_WORDS).unwrap();
        t.delete_at(at);
        assert_eq!(t.read_at(at, a, 3, &mut bits, ALL_WORDS), Probe::Miss);
        t.insert_at(at, 0xdead, 40, 0);
        assert_eq!(t.read_at(at, a, 3, &mut bits, ALL_WORDS), Probe::Miss);
        let at_b = t.locate_local(b, 3, ALL_WORDS).unwrap();
        assert_eq!(
            holders(t.read_at(at, b, 3, &mut bits, ALL_WORDS), &bits),
            Some(vec![1]),
            "found through the full probe"
        );
        assert_eq!(holders(t.read_at(at_b, b, 3, &mut bits, ALL_WORDS), &bits), Some(vec![1]));
    }

    /// A read of some bit words of an entry held by many copies those and leaves the others as
    /// they were.
    #[test]
    fn a_sparse_read_copies_only_the_words_asked_for() {
        let slots = 16;
        let w = words(Table::words_for(slots, 4, false));
        let t = Table::new(&w, slots, 4, false);
        let free = t.find(7, Some(0)).unwrap_err().unwrap();
        t.insert_at(free, 7, 3, 0);
        for e in [5, 70, 200] {
            assert!(t.add_holder(free, e, 0));
        }
        let at = t.locate_local(7, 0, 1 << 3).unwrap();
        let mut bits = [u64::MAX; 4];
        assert!(matches!(t.read_at(at, 7, 0, &mut bits, 1 << 3), Probe::Hit { held, .. } if !held.is_inline()));
        assert_eq!(bits, [u64::MAX, u64::MAX, u64::MAX, 1 << (200 - 192)]);
        assert!(matches!(t.read_at(at, 7, 0, &mut bits, ALL_WORDS), Probe::Hit { held, .. } if !held.is_inline()));
        assert_eq!(bits, [1 << 3 | 1 << 5, 1 << 6, 0, 1 << (200 - 192)]);
    }

    /// Ticks: kept in the table's own words (read under the seqlock) or in words of the
    /// writer's, or not at all.
    #[test]
    fn ticks_live_in_the_table_or_with_the_writer() {
        let slots = 8;
        let mut bits = [0u64; 1];
        let shared = words(Table::words_for(slots, 1, true));
        let plain = words(Table::words_for(slots, 1, false));
        let private = words(Table::tick_words(slots));
        for (t, kept) in [
            (Table::new(&shared, slots, 1, true), true),
            (Table::new(&plain, slots, 1, false).with_ticks(&private), true),
            (Table::new(&plain, slots, 1, false), false),
        ] {
            t.clear_all();
            for (k, tick) in [(1u64, 5u32), (2, 6), (3, TICK_MASK)] {
                let i = t.find(k, None).unwrap_err().unwrap();
                t.insert_at(i, k, 0, tick);
            }
            let i = t.find(2, None).unwrap();
            assert!(!t.add_holder(i, 0, 9), "the same holder at a new tick");
            for (k, tick) in [(1u64, 5u32), (2, 9), (3, TICK_MASK)] {
                let want = if kept { tick } else { 0 };
                assert!(matches!(t.read(k, None, &mut bits), Probe::Hit { tick, .. } if tick == want), "key {k}");
            }
        }
    }

    /// With its local buckets full, a block goes to the global bucket with more room.
    #[test]
    fn a_spilled_block_goes_to_the_emptier_global_bucket() {
        let slots = 4 * 64;
        let w = words(Table::words_for(slots, 1, false));
        let t = Table::new(&w, slots, 1, false);
        let key = (1..).map(spread).find(|&k| {
            let (g, _) = t.candidates(k, None);
            g[0] != g[1] && (0..LOCAL_BUCKETS).all(|l| ![g[0], g[1]].contains(&(10 + l)))
        });
        let key = key.unwrap();
        let (g, _) = t.candidates(key, None);
        let bucket_of = |r: Result<usize, Option<usize>>| r.unwrap_err().map(|i| i / BUCKET);
        for i in 10 * BUCKET..(10 + LOCAL_BUCKETS) * BUCKET {
            t.insert_at(i, 1000 + i as u64, 0, 0);
        }
        t.insert_at(g[1] * BUCKET, 1, 0, 0);
        assert_eq!(bucket_of(t.find(key, Some(10))), Some(g[0]), "the first global bucket has more room");
        for k in 0..3 {
            t.insert_at(g[0] * BUCKET + k, 2 + k as u64, 0, 0);
        }
        assert_eq!(bucket_of(t.find(key, Some(10))), Some(g[1]), "the second global bucket has more room");
        t.delete_at(10 * BUCKET + 2);
        assert_eq!(t.find(key, Some(10)), Err(Some(10 * BUCKET + 2)), "a free local entry comes first");
    }

    #[test]
    fn a_full_candidate_set_has_no_free_entry() {
        let slots = 8; // 2 buckets: every key's candidates are the whole table
        let w = words(Table::words_for(slots, 1, false));
        let t = Table::new(&w, slots, 1, false);
        for k in 0..8u64 {
            let free = t.find(k, Some(0)).unwrap_err().unwrap();
            t.insert_at(free, k, 0, 0);
        }
        assert_eq!(t.find(99, Some(0)), Err(None));
        assert!(t.find(5, Some(1)).is_ok());
    }

    #[test]
    fn cursors_follow_chain_positions() {
        // 37 buckets, and one (a cursor then wraps more than once per block).
        for slots in [4 * 37, 4] {
            let w = words(Table::words_for(slots, 1, false));
            let t = Table::new(&w, slots, 1, false);
            let chain: Vec<u64> = (0..500u64).map(|i| i.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0xdead).collect();
            let mut pos = None;
            let mut c: Option<LocalCursor> = None;
            for &h in &chain {
                let p = crate::hash::chain_pos(pos, h);
                pos = Some(p);
                let local = match &mut c {
                    None => c.insert(t.first_local(h)).bucket(),
                    Some(c) => t.next_local(c, h),
                };
                assert_eq!(local, t.local_bucket(p), "{slots} slots");
            }
        }
    }

    #[test]
    fn odd_version_is_unknown_and_repair_frees_it() {
        let w = words(Table::words_for(4, 1, false));
        let t = Table::new(&w, 4, 1, false);
        let free = t.find(42, None).unwrap_err().unwrap();
        t.insert_at(free, 42, 3, 0);
        // Simulate a writer that died inside the write section.
        let e = t.meta(free);
        e.store(e.load(Relaxed) + 1, Relaxed);
        let mut bits = [0u64; 1];
        assert_eq!(t.read(42, None, &mut bits), Probe::Unknown);
        t.repair();
        assert_eq!(t.read(42, None, &mut bits), Probe::Miss);
        assert!(!t.occupied(free));
    }

    #[test]
    fn every_key_is_distinct_including_zero() {
        let w = words(Table::words_for(8, 1, false));
        let t = Table::new(&w, 8, 1, false);
        let mut bits = [0u64; 1];
        t.insert_at(t.find(0, None).unwrap_err().unwrap(), 0, 0, 0);
        assert!(matches!(t.read(0, None, &mut bits), Probe::Hit { .. }));
        assert_eq!(t.read(1, None, &mut bits), Probe::Miss);
        t.insert_at(t.find(1, None).unwrap_err().unwrap(), 1, 1, 0);
        assert_eq!(holders(t.read(1, None, &mut bits), &bits), Some(vec![1]));
        t.delete_at(t.find(0, None).unwrap());
        assert_eq!(t.read(0, None, &mut bits), Probe::Miss);
        assert!(matches!(t.read(1, None, &mut bits), Probe::Hit { .. }));
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    const SLOTS: usize = 4; // one bucket
    const BIT_WORDS: usize = 2;

    struct Shared {
        words: Vec<AtomicU64>,
    }

    impl Shared {
        fn new() -> Arc<Shared> {
            let words = (0..Table::words_for(SLOTS, BIT_WORDS, true)).map(|_| AtomicU64::new(0)).collect();
            Arc::new(Shared { words })
        }
        fn table(&self) -> Table<'_> {
            Table::new(&self.words, SLOTS, BIT_WORDS, true)
        }
        /// A table holding key 7 at tick 1, held by the engines in `bits`, and its entry.
        fn with_seven(bits: &[u64; BIT_WORDS]) -> (Arc<Shared>, usize) {
            let s = Shared::new();
            let t = s.table();
            let i = t.find(7, None).unwrap_err().unwrap();
            t.write_entry(i, 7, 1, bits);
            (s, i)
        }
    }

    fn model(f: impl Fn() + Sync + Send + 'static) {
        loom::model(f);
    }

    /// The bits a probe found, its inline holders spread over them.
    fn found(held: Held, bits: &mut [u64; BIT_WORDS]) -> [u64; BIT_WORDS] {
        held.spread(bits, ALL_WORDS);
        *bits
    }

    /// While the writer deletes one key and inserts another into the freed entry, a reader of a
    /// third key that stays in place always finds it with its holders.
    #[test]
    fn a_key_that_stays_is_never_missed() {
        model(|| {
            let s = Shared::new();
            let t = s.table();
            t.insert_at(t.find(1, None).unwrap_err().unwrap(), 1, 0, 0);
            t.insert_at(t.find(2, None).unwrap_err().unwrap(), 2, 65, 0);
            let slot = t.find(1, None).unwrap();
            let w = s.clone();
            let writer = loom::thread::spawn(move || {
                let t = w.table();
                t.delete_at(slot);
                t.insert_at(slot, 3, 64, 0);
            });
            let mut bits = [0u64; BIT_WORDS];
            match t.read(2, None, &mut bits) {
                Probe::Hit { held, .. } => assert_eq!(found(held, &mut bits), [0, 2]),
                Probe::Unknown => {}
                Probe::Miss => panic!("key 2 missed while another entry changed"),
            }
            match t.read(3, None, &mut bits) {
                Probe::Hit { held, .. } => {
                    assert_eq!(found(held, &mut bits), [0, 1], "key 3 seen with another key's holders")
                }
                Probe::Miss | Probe::Unknown => {}
            }
            writer.join().unwrap();
            assert!(matches!(t.read(3, None, &mut bits), Probe::Hit { .. }));
            assert_eq!(t.read(1, None, &mut bits), Probe::Miss);
        });
    }

    /// A lookup's pipelined probe (locate by key, later read that entry) while the writer
    /// rewrites the located entry with another key: the stale location never yields the other
    /// key's holders. (A key that stays is found through its location as through `read`: see
    /// `a_key_that_stays_is_never_missed`; `read_at` only adds a first look at one entry.)
    #[test]
    fn a_stale_location_is_never_trusted() {
        model(|| {
            let s = Shared::new();
            let t = s.table();
            t.insert_at(t.find(1, Some(0)).unwrap_err().unwrap(), 1, 0, 0);
            let at = t.locate_local(1, 0, ALL_WORDS).expect("key 1 located");
            let w = s.clone();
            let writer = loom::thread::spawn(move || w.table().write_entry(at, 3, 0, &[0, 1]));
            let mut bits = [0u64; BIT_WORDS];
            match t.read_at(at, 1, 0, &mut bits, ALL_WORDS) {
                Probe::Hit { held, .. } => {
                    assert_eq!(found(held, &mut bits), [1, 0], "key 1 read with another key's holders")
                }
                Probe::Miss | Probe::Unknown => {}
            }
            writer.join().unwrap();
            assert_eq!(t.read_at(at, 1, 0, &mut bits, ALL_WORDS), Probe::Miss);
        });
    }

    /// An entry rewritten in place is seen whole, before or after, never mixed: its holders in
    /// the bit set (both words), and its tick with them.
    #[test]
    fn an_entry_is_never_torn() {
        model(|| {
            let (s, i) = Shared::with_seven(&[0b11, 0b11]);
            let t = s.table();
            let w = s.clone();
            let writer = loom::thread::spawn(move || w.table().write_entry(i, 7, 2, &[0b1100, 0b1100]));
            let mut bits = [0u64; BIT_WORDS];
            match t.read(7, None, &mut bits) {
                Probe::Hit { tick: 1, held } if !held.is_inline() => assert_eq!(bits, [0b11, 0b11]),
                Probe::Hit { tick: 2, held } if !held.is_inline() => assert_eq!(bits, [0b1100, 0b1100]),
                Probe::Unknown => {}
                other => panic!("{other:?} with bits {bits:?}"),
            }
            writer.join().unwrap();
        });
    }

    /// A fourth holder moves an entry's holders from its meta word to its bit set: a reader
    /// sees the three before or the four after, never a mix or none.
    #[test]
    fn holders_moving_to_the_bit_set_are_seen_whole() {
        model(|| {
            let (s, i) = Shared::with_seven(&[0b111, 0]);
            let t = s.table();
            let w = s.clone();
            let writer = loom::thread::spawn(move || {
                assert!(w.table().add_holder(i, 64, 1));
            });
            let mut bits = [0u64; BIT_WORDS];
            match t.read(7, None, &mut bits) {
                Probe::Hit { held, .. } if held.is_inline() => assert_eq!(found(held, &mut bits), [0b111, 0]),
                Probe::Hit { .. } => assert_eq!(bits, [0b111, 1]),
                Probe::Unknown => {}
                Probe::Miss => panic!("key 7 missed while its holders moved"),
            }
            writer.join().unwrap();
        });
    }
}
