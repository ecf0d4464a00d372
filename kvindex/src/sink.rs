//! The interface between the event subscriber and whatever holds the index.
//!
//! The subscriber turns each engine's event stream into per-engine block operations keyed by
//! Gantry's hash ([`crate::hash`]); a [`BlockSink`] applies them. The shared-memory index writer
//! is the production sink; tests use a plain map.

/// An engine's slot in the index (0-based, below the index's engine-slot count).
pub type EngineSlot = u16;

/// Counters the subscriber reports to its sink (the index keeps them in its segment header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counter {
    /// Events applied (all kinds).
    EventsApplied,
    /// Events skipped: block size or token count mismatch, a KV-cache kind the index does not
    /// track, an out-of-range `group_idx`, an unknown parent hash.
    EventsSkipped,
    /// Unknown event tags or map keys that were ignored.
    UnknownFields,
    /// Messages that could not be decoded (bad msgpack, wrong frame count, bad sequence frame).
    DecodeErrors,
    /// Sequence gaps detected.
    Gaps,
    /// Replay requests sent.
    Replays,
    /// Times an engine's entries were cleared because its state could not be trusted (restart,
    /// replay that could not reach back, engine removed, AllBlocksCleared).
    Resyncs,
    /// Blocks the subscriber dropped from an engine's private map (and from the sink) because the
    /// engine exceeded its block cap (`EngineSource::max_blocks`), oldest first.
    OverCapacity,
    /// Stored blocks whose vLLM hash (same engine, DP rank and KV-cache group) was already mapped
    /// to other content: a 64-bit hash collision, or a hash reused after events were lost. The
    /// entry then follows the new content.
    HashCollisions,
}

impl Counter {
    /// Every counter, in declaration order (`Counter::ALL[c.index()] == c`).
    pub const ALL: [Counter; 9] = [
        Counter::EventsApplied,
        Counter::EventsSkipped,
        Counter::UnknownFields,
        Counter::DecodeErrors,
        Counter::Gaps,
        Counter::Replays,
        Counter::Resyncs,
        Counter::OverCapacity,
        Counter::HashCollisions,
    ];

    /// Position in [`Counter::ALL`], for counter arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// A snake_case name for logs and metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::EventsApplied => "events_applied",
            Counter::EventsSkipped => "events_skipped",
            Counter::UnknownFields => "unknown_fields",
            Counter::DecodeErrors => "decode_errors",
            Counter::Gaps => "gaps",
            Counter::Replays => "replays",
            Counter::Resyncs => "resyncs",
            Counter::OverCapacity => "over_capacity",
            Counter::HashCollisions => "hash_collisions",
        }
    }
}

/// Receives block operations. Calls for one engine arrive in the engine's event order.
pub trait BlockSink {
    /// `engine` now holds the block `hash` in device memory. `pos` is the block's chain position
    /// ([`crate::hash::chain_pos`]), which the index places it by. Called for every store the
    /// engine reports, including blocks the sink already holds: it must be idempotent (a repeat
    /// refreshes the block, and brings it back if the sink evicted it meanwhile).
    fn store(&mut self, engine: EngineSlot, hash: u64, pos: u64);
    /// `engine` no longer holds `hash` at chain position `pos` (a no-op when it did not).
    fn remove(&mut self, engine: EngineSlot, hash: u64, pos: u64);
    /// Adds `n` to a counter.
    fn count(&mut self, counter: Counter, n: u64);
    /// Called by the subscriber's thread at least every few milliseconds while it runs, for
    /// the sink's own upkeep (approximate-mode queue, TTL expiry).
    fn maintain(&mut self) {}
    /// The slot of the engine called `name`, taking a free one for a new name (engines added
    /// while the subscriber runs). A sink without an engine table refuses, saying why.
    fn register(&mut self, name: &str) -> Result<EngineSlot, String> {
        Err(format!("this sink cannot register engine {name:?}: it has no engine table"))
    }
    /// Frees `slot` after dropping every block it holds (an engine that left the fleet).
    fn release(&mut self, _slot: EngineSlot) {}
}
