//! The prefix index: which engine holds which block, in a shared-memory segment.
//!
//! One [`IndexWriter`] (holding an exclusive lock on `PATH.lock`) applies block operations, as
//! the [`BlockSink`](crate::sink::BlockSink) the event subscriber feeds. Any number of
//! [`IndexReader`]s, on every core of the writer's process and in other processes, look up how
//! many leading blocks of a prompt each engine holds ([`IndexReader::overlaps`]) without locks,
//! allocation or blocking, and never see a torn entry.
//!
//! # Structure
//! * [`layout`]: the segment's byte layout and header words.
//! * `engines`: one engine-table entry, a seqlock over the engine's name.
//! * `segment`: creating, validating and mapping the file (`/dev/shm/...` by default, mode 0600).
//! * `table`: the bucketed table and its seqlock protocol (read its docs).
//! * `writer` and `reader`: the two roles.
//!
//! # Tiers
//! The *exact* table holds what the engines' own KV events say they hold in device memory. The
//! optional *approximate* table holds predictions ([`Predictor::predict`], sent by the routing
//! cores over a lock-free queue) with a TTL; a real event for the same (engine, block) overrides
//! the prediction. Lookups see the union.
//!
//! # Capacity and eviction
//! The exact table holds at most `capacity` blocks in `capacity · 1.25` entries. A block may sit
//! in 24 candidate entries (four buckets near its parent, two chosen by its hash; see `table.rs`).
//! When they are all taken, or the table already holds `capacity` blocks, the new block evicts
//! the least recently stored of its candidates (if all its candidates are free at capacity: the
//! least recently stored of 8 entries sampled after a rotating hand), and an eviction is
//! counted. Engines report their own evictions, so the table fills only when `capacity` is
//! below the fleet's total prefix-cache blocks; size it above that. Measured: filled to exactly
//! `capacity` with random chains, about 2 % of blocks are evicted because all their candidates
//! were taken, which cuts 15–30 % of 32- to 1,024-block prompts short (see `benches/index.rs`);
//! at half full, with thousands of conversations under one system prompt, 0.15 %
//! (`proxy/benches/route.rs`). The approximate table evicts the same way, soonest expiry first.
//!
//! # A writer that dies
//! Readers keep reading the last state (a stale index costs cache hits, never wrong answers). An
//! entry left mid-write has an odd version; readers give up on it after a bounded number of
//! retries and count an unstable probe. The next writer repairs such entries, clears the
//! tables (its event state starts empty) and bumps the header's generation.
//!
//! Read first: `tests/index.rs` (the index against a `HashMap` model under random operations),
//! then the loom tests at the end of `table.rs`.

mod engines;
pub mod layout;
mod reader;
mod segment;
pub(crate) mod table;
mod writer;

pub use layout::{ReaderCounter, WriterCounter, LAYOUT_VERSION, MAX_ENGINE_NAME, MAX_ENGINE_SLOTS};
pub use reader::{EngineInfo, IndexReader, IndexStats, Overlap, Overlaps};
pub use segment::PageUse;
pub use writer::{IndexOptions, IndexWriter, Predictor};

use std::path::{Path, PathBuf};

/// Default segment path.
pub const DEFAULT_PATH: &str = "/dev/shm/gantry-kvindex";

/// Why an index could not be opened or changed. Every variant names the path or the value.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// A filesystem call failed.
    #[error("kvindex: cannot {op} {path}: {error}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error (in the message, so not also a `source`).
        error: std::io::Error,
    },
    /// The file is not a segment this build can read.
    #[error("kvindex: {path} is not a usable segment: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// Another process is the writer.
    #[error("kvindex: {path} is locked by another writer (pid {pid})")]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// The writer's pid as its segment header records it (0 if unknown).
        pid: u64,
    },
    /// A bad option.
    #[error("kvindex: {0}")]
    Options(String),
    /// Every engine slot is taken.
    #[error("kvindex: no free engine slot for {name} (all {slots} in use)")]
    NoEngineSlot {
        /// The engine being registered.
        name: String,
        /// The segment's slot count.
        slots: usize,
    },
}

impl IndexError {
    pub(crate) fn io(path: &Path, op: &'static str, error: std::io::Error) -> Self {
        IndexError::Io { op, path: path.into(), error }
    }
}
