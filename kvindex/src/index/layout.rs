//! The segment's byte layout: a one-page header, the engine table, the exact table and the
//! approximate table, every section 64-byte aligned. All fields are little-endian `u64` words
//! accessed atomically.
//!
//! ```text
//! 0      header (4,096 bytes, 512 words; see the `H_*` constants)
//! 4096   engine table: engine_slots × 128 bytes (seqlock version + used flag, blocks held,
//!        name length, 104 name bytes)
//! ...    exact table: table_slots × (2 + bit_words) words   (see `table.rs`; its ticks are
//!        the writer's, in its own memory)
//! ...    approximate table: approx_slots × (2 + bit_words) words, then its ticks,
//!        approx_slots / 2 words (absent when capacity 0)
//! ```
//!
//! A reader refuses a segment whose magic, layout version or shape words disagree with this
//! build, or whose file is shorter than the header says.

use super::table::{Table, BUCKET, MAX_BIT_WORDS};

/// `"GANTRYKV"`, little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"GANTRYKV");
/// Bumped on any incompatible change of this layout.
pub const LAYOUT_VERSION: u64 = 4;
/// Most engine slots per index.
pub const MAX_ENGINE_SLOTS: usize = MAX_BIT_WORDS * 64;
/// Longest engine name (an engine's URL) the engine table holds.
pub const MAX_ENGINE_NAME: usize = 104;

pub(crate) const HEADER_WORDS: usize = 512;
pub(crate) const ENGINE_WORDS: usize = 16;

// Static shape, written once before the magic.
pub(crate) const H_MAGIC: usize = 0;
pub(crate) const H_VERSION: usize = 1;
pub(crate) const H_ENGINE_SLOTS: usize = 2;
pub(crate) const H_BIT_WORDS: usize = 3;
pub(crate) const H_CAPACITY: usize = 4;
pub(crate) const H_TABLE_SLOTS: usize = 5;
pub(crate) const H_APPROX_CAPACITY: usize = 6;
pub(crate) const H_APPROX_SLOTS: usize = 7;
pub(crate) const H_TOTAL_BYTES: usize = 8;
pub(crate) const H_CREATED_UNIX_MS: usize = 9;
// Writer state (own cache line).
pub(crate) const H_GENERATION: usize = 16;
pub(crate) const H_WRITER_PID: usize = 17;
pub(crate) const H_NOW_SECS: usize = 18;
pub(crate) const H_HEARTBEAT_UNIX_MS: usize = 19;
pub(crate) const H_APPROX_TTL_SECS: usize = 20;
pub(crate) const H_STATE: usize = 21;
// Writer counters: the index's own, then the subscriber's.
pub(crate) const H_WRITER_COUNTERS: usize = 40;
pub(crate) const H_SINK_COUNTERS: usize = 56;
// Reader counters (flushed in batches by each reader), own cache lines.
pub(crate) const H_READER_COUNTERS: usize = 72;

/// `H_STATE`: the writer serves this segment.
pub(crate) const STATE_LIVE: u64 = 1;
/// `H_STATE`: a newer segment replaced this one at the same path; readers should reopen.
pub(crate) const STATE_RETIRED: u64 = 2;

/// The index's own counters, in header order from `H_WRITER_COUNTERS`. The subscriber's
/// ([`crate::sink::Counter`]) follow from `H_SINK_COUNTERS`, in that enum's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum WriterCounter {
    /// Entries in the exact table.
    Live,
    /// Entries in the approximate table.
    ApproxLive,
    /// (engine, block) pairs added.
    BlocksStored,
    /// (engine, block) pairs removed.
    BlocksRemoved,
    /// Entries evicted because the table was full.
    Evictions,
    /// Predicted (engine, block) pairs added to the approximate tier.
    ApproxInserted,
    /// Approximate entries that expired.
    ApproxExpired,
    /// Predictions dropped (queue full, or approximate mode off).
    ApproxDropped,
}

impl WriterCounter {
    /// Every counter, in header order.
    pub const ALL: [WriterCounter; 8] = [
        Self::Live,
        Self::ApproxLive,
        Self::BlocksStored,
        Self::BlocksRemoved,
        Self::Evictions,
        Self::ApproxInserted,
        Self::ApproxExpired,
        Self::ApproxDropped,
    ];

    /// snake_case name, as `gantry index inspect` and metrics print it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Live => "entries",
            Self::ApproxLive => "approx_entries",
            Self::BlocksStored => "blocks_stored",
            Self::BlocksRemoved => "blocks_removed",
            Self::Evictions => "evictions",
            Self::ApproxInserted => "approx_inserted",
            Self::ApproxExpired => "approx_expired",
            Self::ApproxDropped => "approx_dropped",
        }
    }

    pub(crate) fn word(self) -> usize {
        H_WRITER_COUNTERS + self as usize
    }
}

/// Header word of a subscriber counter.
pub(crate) fn sink_counter_word(c: crate::sink::Counter) -> usize {
    H_SINK_COUNTERS + c.index()
}

// The subscriber's counters must end before the readers' (a new one takes a word that was zero).
const _: () = assert!(H_SINK_COUNTERS + crate::sink::Counter::ALL.len() <= H_READER_COUNTERS);

/// Counters kept by readers, in header order from `H_READER_COUNTERS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum ReaderCounter {
    /// Overlap lookups.
    Lookups,
    /// Block hashes looked up.
    LookupBlocks,
    /// Block hashes found (held by at least one engine).
    HitBlocks,
    /// Probes that found no stable entry within the retry budget (counted as misses).
    UnstableProbes,
}

impl ReaderCounter {
    /// Every counter, in header order.
    pub const ALL: [ReaderCounter; 4] = [Self::Lookups, Self::LookupBlocks, Self::HitBlocks, Self::UnstableProbes];

    /// snake_case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lookups => "lookups",
            Self::LookupBlocks => "lookup_blocks",
            Self::HitBlocks => "hit_blocks",
            Self::UnstableProbes => "unstable_probes",
        }
    }

    pub(crate) fn word(self) -> usize {
        H_READER_COUNTERS + 8 * self as usize // one cache line each: many cores flush them
    }
}

/// The shape of a segment, fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    pub engine_slots: usize,
    pub bit_words: usize,
    pub capacity: usize,
    pub table_slots: usize,
    pub approx_capacity: usize,
    pub approx_slots: usize,
}

impl Shape {
    /// Table slots for `capacity` entries: at most 80% full, whole buckets, at least two.
    fn slots_for(capacity: usize) -> usize {
        if capacity == 0 {
            0
        } else {
            (capacity + capacity.div_ceil(4)).div_ceil(BUCKET).max(2) * BUCKET
        }
    }

    pub fn new(engine_slots: usize, capacity: usize, approx_capacity: usize) -> Shape {
        Shape {
            engine_slots,
            bit_words: engine_slots.div_ceil(64),
            capacity,
            table_slots: Self::slots_for(capacity),
            approx_capacity,
            approx_slots: Self::slots_for(approx_capacity),
        }
    }

    pub fn engines_word(&self) -> usize {
        HEADER_WORDS
    }

    pub fn table_word(&self) -> usize {
        align8(HEADER_WORDS + self.engine_slots * ENGINE_WORDS)
    }

    pub fn approx_word(&self) -> usize {
        align8(self.table_word() + Table::words_for(self.table_slots, self.bit_words, false))
    }

    pub fn total_words(&self) -> usize {
        align8(self.approx_word() + Table::words_for(self.approx_slots, self.bit_words, true))
    }

    pub fn total_bytes(&self) -> usize {
        self.total_words() * 8
    }
}

fn align8(words: usize) -> usize {
    words.div_ceil(8) * 8
}
