//! Applies decoded events to a [`BlockSink`]: Gantry hashes, per-engine private maps, DP-rank refcounts, caps.
//!
//! [`EventApplier`] is plain data (no sockets, no threads): the subscriber thread owns one and
//! feeds it the payloads its sequence tracking accepted; unit tests drive it directly with a map
//! sink (`subscriber/tests.rs`).
//!
//! # State per engine
//!
//! * The **private map** `(dp_rank, KV-cache group, vLLM hash) -> (Gantry hash, tiers, stamp)`.
//!   `BlockRemoved` carries only vLLM hashes, so this is how removals find the Gantry hash;
//!   `parent_block_hash` is resolved through it too. `tiers` is a bit set of the media (`"GPU"`,
//!   `"CPU"`, ...) that hold the block: bit 0 is the GPU (medium absent or `"GPU"`), bits 1..=14
//!   are other media names in the order they are first seen (shared by all engines), bit 15
//!   every further name.
//! * The **group** is the event's `group_idx` (spec §1.5, on both `BlockStored` and
//!   `BlockRemoved`); absent or nil (engines from before vLLM PR #37688) is a group of its own.
//!   A hybrid model's groups share vLLM hashes (they hash the same tokens), and the stores of
//!   groups that are not indexed (sliding window, Mamba, ...) are skipped, so a removal only
//!   touches what its own group stored: a sliding-window group's frequent evictions leave the
//!   full-attention entries alone.
//! * **GPU refcounts** `Gantry hash -> number of private-map entries with the GPU bit` (across
//!   all DP ranks and groups of the engine). [`BlockSink::store`] is called on every GPU store,
//!   also of a block already counted (the sink is idempotent: a repeat refreshes the block, and
//!   brings it back if the index evicted it for room), and [`BlockSink::remove`] only when a
//!   count goes 1 -> 0, so a block held by two ranks stays in the index until both evicted it.
//!   Only the GPU tier reaches the sink.
//! * A FIFO of `(key, stamp)` in insertion order with lazy deletion (an entry is live when its
//!   stamp matches the map's), compacted when dead entries outnumber live ones.
//!
//! # The bound
//!
//! An engine holds at most `max_blocks` private-map entries (all ranks and tiers together,
//! [`super::DEFAULT_MAX_BLOCKS`] by default). After each event that leaves more, the oldest
//! entries (by last store) are dropped, removed from the sink when no other entry holds their
//! Gantry hash, and counted in [`Counter::OverCapacity`]. Memory is about 100 bytes per entry
//! (map, FIFO, refcount), so the default cap bounds an engine at roughly 100 MiB; a healthy engine
//! stays far below it because vLLM reports every eviction. The same happens while the sink holds
//! more than `max_index_blocks` of the engine's distinct GPU blocks (unbounded by default; the
//! proxy sets each engine's equal share of its pool's index): one engine's flood then costs only
//! its own oldest entries, never another engine's blocks in a shared index. Entries of other
//! media, ranks and groups count toward `max_blocks` only.
//!
//! # Warnings
//!
//! Trouble that points at a misconfiguration or a broken publisher is logged as a warning naming
//! the engine and the reason, at most one per engine and kind (skipped events, cap drops, hash
//! collisions) per 10 s, the rest at debug (the worker's `LogLimiter`): a `BlockStored` whose
//! block size (other than a smaller, partial-block one: debug), token count, `extra_keys` length
//! or `group_idx` cannot be indexed, events of an
//! unknown type, entries dropped by the cap, a vLLM hash re-stored with other content
//! ([`Counter::HashCollisions`]). Skips that are expected stay at trace/debug: the KV-cache kinds
//! not indexed (every store of a hybrid model's sliding-window groups) and unknown parents (the
//! normal state after a late join). Unknown map keys are only counted: vLLM adds fields often.

use hashbrown::hash_map::Entry as MapEntry;
use hashbrown::HashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, trace};

use super::worker::{limited_warn, LogLimiter};
use super::{EngineSource, SubscriberError};
use crate::decode::{decode_batch, DecodeError, DecodedBatch, DecodedEvent, RemovedEvent, StoredEvent};
use crate::hash::{block_hash, chain_pos, extra_hash};
use crate::sink::{BlockSink, Counter, EngineSlot};

/// A snapshot of counter values, indexable by [`Counter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CounterValues([u64; Counter::ALL.len()]);

impl CounterValues {
    /// The value of one counter.
    pub fn get(&self, counter: Counter) -> u64 {
        self.0[counter.index()]
    }
}

impl std::ops::Index<Counter> for CounterValues {
    type Output = u64;
    fn index(&self, counter: Counter) -> &u64 {
        &self.0[counter.index()]
    }
}

/// Counters shared between the thread that applies events and handles that read statistics.
/// Plain statistics: `Relaxed` everywhere, nothing else is published through them.
#[derive(Default)]
pub(crate) struct SharedCounters {
    counters: [AtomicU64; Counter::ALL.len()],
    blocks: AtomicU64,
}

impl SharedCounters {
    pub(crate) fn add(&self, counter: Counter, n: u64) {
        self.counters[counter.index()].fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn values(&self) -> CounterValues {
        CounterValues(std::array::from_fn(|i| self.counters[i].load(Ordering::Relaxed)))
    }

    pub(crate) fn blocks(&self) -> u64 {
        self.blocks.load(Ordering::Relaxed)
    }
}

/// Turns decoded KV events of many engines into [`BlockSink`] calls (see the module doc).
pub struct EventApplier<S> {
    sink: S,
    engines: HashMap<EngineSlot, EngineState>,
    tiers: Tiers,
    totals: Arc<SharedCounters>,
}

impl<S: BlockSink> EventApplier<S> {
    /// An applier with no engines, feeding `sink`.
    pub fn new(sink: S) -> Self {
        EventApplier { sink, engines: HashMap::new(), tiers: Tiers::default(), totals: Arc::default() }
    }

    /// Starts tracking an engine (its block size, seed, DP ranks and cap; the endpoints are not
    /// used here). Fails when the source is invalid or the slot is taken.
    pub fn add_engine(&mut self, source: &EngineSource) -> Result<(), SubscriberError> {
        source.validate()?;
        match self.engines.entry(source.slot) {
            MapEntry::Occupied(_) => Err(SubscriberError::SlotInUse { slot: source.slot }),
            MapEntry::Vacant(v) => {
                v.insert(EngineState::new(source));
                Ok(())
            }
        }
    }

    /// Stops tracking an engine and removes every block it had in the sink (counted as a
    /// resync). Returns `false` when the slot was not tracked.
    pub fn remove_engine(&mut self, slot: EngineSlot) -> bool {
        let Some(engine) = self.engines.remove(&slot) else { return false };
        for b in engine.gpu_refs.keys() {
            self.sink.remove(slot, b.hash, b.pos);
        }
        engine.counters.blocks.store(0, Ordering::Relaxed);
        self.count_for(&engine.counters, Counter::Resyncs, 1);
        true
    }

    /// Sets how many GPU blocks of engine `slot` the sink may hold, dropping its oldest entries
    /// now if it holds more; `false` when the slot is not followed.
    pub fn set_max_index_blocks(&mut self, slot: EngineSlot, blocks: usize) -> bool {
        let EventApplier { sink, engines, totals, .. } = self;
        let Some(engine) = engines.get_mut(&slot) else { return false };
        engine.max_index_blocks = blocks.max(1);
        let counters = Arc::clone(&engine.counters);
        let mut out = Out { sink, totals, counters: &counters, slot };
        engine.enforce_cap(&mut out);
        engine.publish_len();
        true
    }

    /// Decodes one payload and applies it as DP rank `rank` of engine `slot`. A payload that does
    /// not decode is counted in [`Counter::DecodeErrors`] and returned; nothing of it is applied.
    /// Unknown slots and ranks are ignored.
    pub fn apply_payload(&mut self, slot: EngineSlot, rank: u32, payload: &[u8]) -> Result<(), DecodeError> {
        match decode_batch(payload) {
            Ok(batch) => {
                self.apply_batch(slot, rank, &batch);
                Ok(())
            }
            Err(e) => {
                self.count(slot, Counter::DecodeErrors, 1);
                Err(e)
            }
        }
    }

    /// Applies a decoded batch as DP rank `rank` of engine `slot` (ignored when unknown).
    pub fn apply_batch(&mut self, slot: EngineSlot, rank: u32, batch: &DecodedBatch<'_>) {
        let EventApplier { sink, engines, tiers, totals } = self;
        let Some(engine) = engines.get_mut(&slot) else { return };
        if rank >= engine.dp_ranks {
            return;
        }
        let counters = Arc::clone(&engine.counters);
        let mut out = Out { sink, totals, counters: &counters, slot };
        let unknown = u64::from(batch.unknown_events) + u64::from(batch.unknown_fields);
        if unknown > 0 {
            out.count(Counter::UnknownFields, unknown);
        }
        if batch.unknown_events > 0 {
            let n = batch.unknown_events;
            engine.warn_skipped(rank, format_args!("{n} event(s) of an unknown type ignored"));
        }
        for event in &batch.events {
            match event {
                DecodedEvent::BlockStored(e) => engine.stored(&mut out, tiers, rank, e),
                DecodedEvent::BlockRemoved(e) => engine.removed(&mut out, tiers, rank, e),
                DecodedEvent::AllBlocksCleared => {
                    engine.clear_rank(&mut out, rank);
                    out.count(Counter::Resyncs, 1);
                    out.count(Counter::EventsApplied, 1);
                }
            }
        }
        engine.publish_len();
    }

    /// Forgets everything DP rank `rank` of engine `slot` reported (a restart, a gap that could
    /// not be replayed), removing from the sink what no other rank holds; counted as a resync.
    pub fn clear_rank(&mut self, slot: EngineSlot, rank: u32) {
        let EventApplier { sink, engines, totals, .. } = self;
        let Some(engine) = engines.get_mut(&slot) else { return };
        let counters = Arc::clone(&engine.counters);
        let mut out = Out { sink, totals, counters: &counters, slot };
        engine.clear_rank(&mut out, rank);
        out.count(Counter::Resyncs, 1);
        engine.publish_len();
    }

    /// Adds `n` to `counter` for engine `slot` (and the totals and the sink); ignored when the
    /// slot is unknown.
    pub fn count(&mut self, slot: EngineSlot, counter: Counter, n: u64) {
        if let Some(engine) = self.engines.get(&slot) {
            let counters = Arc::clone(&engine.counters);
            self.count_for(&counters, counter, n);
        }
    }

    fn count_for(&mut self, counters: &SharedCounters, counter: Counter, n: u64) {
        counters.add(counter, n);
        self.totals.add(counter, n);
        self.sink.count(counter, n);
    }

    /// Counter values of engine `slot` and its private-map size, or `None` when not tracked.
    pub fn engine_stats(&self, slot: EngineSlot) -> Option<(CounterValues, u64)> {
        self.engines.get(&slot).map(|e| (e.counters.values(), e.counters.blocks()))
    }

    /// Counter totals over every engine this applier has tracked.
    pub fn totals(&self) -> CounterValues {
        self.totals.values()
    }

    /// The sink.
    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// The sink, mutably (for [`BlockSink::maintain`]).
    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }

    /// The counters behind [`EventApplier::engine_stats`], for handles on other threads.
    pub(crate) fn shared_counters(&self, slot: EngineSlot) -> Option<Arc<SharedCounters>> {
        self.engines.get(&slot).map(|e| Arc::clone(&e.counters))
    }

    /// `(FIFO length, private-map length)` of an engine, to check the FIFO stays compact.
    #[cfg(test)]
    pub(crate) fn fifo_len(&self, slot: EngineSlot) -> Option<(usize, usize)> {
        self.engines.get(&slot).map(|e| (e.order.len(), e.map.len()))
    }

    /// The counters behind [`EventApplier::totals`].
    pub(crate) fn shared_totals(&self) -> Arc<SharedCounters> {
        Arc::clone(&self.totals)
    }
}

/// Where one engine's operations go: the sink plus the engine's and the global counters.
struct Out<'a, S> {
    sink: &'a mut S,
    totals: &'a SharedCounters,
    counters: &'a SharedCounters,
    slot: EngineSlot,
}

impl<S: BlockSink> Out<'_, S> {
    fn count(&mut self, counter: Counter, n: u64) {
        self.counters.add(counter, n);
        self.totals.add(counter, n);
        self.sink.count(counter, n);
    }
}

/// Bit 0 of [`Entry::tiers`]: the engine's device memory, the only tier the sink sees.
const GPU: u16 = 1;
/// Bit for every medium beyond the first [`NAMED_TIERS`] non-GPU names.
const OTHER: u16 = 1 << 15;
/// Non-GPU media names that get their own bit (bits 1..=14).
const NAMED_TIERS: usize = 14;

/// Non-GPU media names seen so far, in order (`names[i]` is bit `i + 1`).
#[derive(Default)]
struct Tiers {
    names: Vec<Box<str>>,
}

impl Tiers {
    /// The bit for a store's medium, naming a new medium if there is room.
    fn bit_for_store(&mut self, medium: Option<&str>) -> u16 {
        match medium {
            None | Some("GPU") => GPU,
            Some(m) => match self.names.iter().position(|n| &**n == m) {
                Some(i) => 2 << i,
                None if self.names.len() < NAMED_TIERS => {
                    self.names.push(m.into());
                    2 << (self.names.len() - 1)
                }
                None => OTHER,
            },
        }
    }

    /// The bit for a removal's medium; `None` when no store ever used it (nothing to remove).
    fn bit_for_remove(&self, medium: Option<&str>) -> Option<u16> {
        match medium {
            None | Some("GPU") => Some(GPU),
            Some(m) => match self.names.iter().position(|n| &**n == m) {
                Some(i) => Some(2 << i),
                None if self.names.len() == NAMED_TIERS => Some(OTHER),
                None => None,
            },
        }
    }
}

/// A private-map key. 16 bytes: the group is a `u32` with [`NO_GROUP`] for an absent one.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    vllm: u64,
    rank: u32,
    group: u32,
}

/// [`Key::group`] of events without `group_idx` (absent or nil).
const NO_GROUP: u32 = u32::MAX;

/// The key group of an event's `group_idx`; `None` when it is out of range (no real engine has
/// that many groups).
fn group_of(group_idx: Option<i64>) -> Option<u32> {
    match group_idx {
        None => Some(NO_GROUP),
        Some(g) => u32::try_from(g).ok().filter(|&g| g != NO_GROUP),
    }
}

/// A block as the index knows it: Gantry's hash and its chain position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Block {
    hash: u64,
    pos: u64,
}

struct Entry {
    gantry: Block,
    tiers: u16,
    /// Position in insertion order; matches the FIFO entry that is this entry's live one.
    stamp: u64,
}

struct EngineState {
    name: Box<str>,
    dp_ranks: u32,
    block_size: u32,
    seed: u64,
    max_blocks: usize,
    max_index_blocks: usize,
    map: HashMap<Key, Entry>,
    order: VecDeque<(Key, u64)>,
    next_stamp: u64,
    gpu_refs: HashMap<Block, u32>,
    counters: Arc<SharedCounters>,
    logs: Logs,
}

/// Rate limits of one engine's warnings (see the module doc).
#[derive(Default)]
struct Logs {
    skipped: LogLimiter,
    over_capacity: LogLimiter,
    collisions: LogLimiter,
}

impl EngineState {
    fn new(source: &EngineSource) -> Self {
        EngineState {
            name: source.name.as_str().into(),
            dp_ranks: source.dp_ranks,
            block_size: source.block_size,
            seed: source.seed,
            max_blocks: source.max_blocks,
            max_index_blocks: source.max_index_blocks,
            map: HashMap::new(),
            order: VecDeque::new(),
            next_stamp: 0,
            gpu_refs: HashMap::new(),
            counters: Arc::default(),
            logs: Logs::default(),
        }
    }

    fn publish_len(&self) {
        self.counters.blocks.store(self.map.len() as u64, Ordering::Relaxed);
    }

    fn stored<S: BlockSink>(&mut self, out: &mut Out<'_, S>, tiers: &mut Tiers, rank: u32, e: &StoredEvent<'_>) {
        if !matches!(e.kv_cache_spec_kind, None | Some("full_attention") | Some("mla_attention")) {
            // Expected on every store of a hybrid model's other groups: not worth a warning.
            let kind = e.kv_cache_spec_kind;
            trace!(engine = %self.name, rank, kind, "kv-events: BlockStored of a KV-cache kind not indexed skipped");
            return out.count(Counter::EventsSkipped, 1);
        }
        if e.block_size != Some(self.block_size) {
            let (got, want) = (e.block_size, self.block_size);
            if got.is_some_and(|g| g < want) {
                // A "partial block" store (spec §1.7: hash units finer than the block): normal.
                debug!(engine = %self.name, rank, got, want, "kv-events: partial-block BlockStored skipped");
                return out.count(Counter::EventsSkipped, 1);
            }
            return self.skip(out, rank, format_args!("block_size {got:?} differs from the engine's {want}"));
        }
        let bs = self.block_size as usize;
        if e.block_hashes.len().checked_mul(bs) != Some(e.token_ids.len()) {
            let (tokens, blocks) = (e.token_ids.len(), e.block_hashes.len());
            return self.skip(out, rank, format_args!("{tokens} tokens for {blocks} blocks of {bs}"));
        }
        if e.extra_keys.as_ref().is_some_and(|k| k.len() != e.block_hashes.len()) {
            return self.skip(out, rank, format_args!("extra_keys length differs from block_hashes"));
        }
        let Some(group) = group_of(e.group_idx) else {
            return self.skip(out, rank, format_args!("group_idx {:?} out of range", e.group_idx));
        };
        let (mut parent, mut parent_pos) = match e.parent_block_hash {
            None => (self.seed, None),
            Some(p) => match self.map.get(&Key { vllm: p, rank, group }) {
                Some(entry) => (entry.gantry.hash, Some(entry.gantry.pos)),
                None => {
                    // Normal after a late join (the parent was stored before the replay window).
                    let engine = &*self.name;
                    debug!(engine, rank, parent = p, "kv-events: BlockStored with an unknown parent skipped");
                    return out.count(Counter::EventsSkipped, 1);
                }
            },
        };
        let bit = tiers.bit_for_store(e.medium);
        // Engines from before `extra_keys` (vLLM PR #33304) name a LoRA adapter only in
        // `lora_name`; every block of it carried `[lora_name]` in its hash, as later events say.
        let lora_extra = match (&e.extra_keys, e.lora_name) {
            (None, Some(name)) => crate::events::extra_keys_hash(&[crate::events::ExtraKey::Str(name.to_owned())]),
            _ => 0,
        };
        for (i, (&vllm, tokens)) in e.block_hashes.iter().zip(e.token_ids.chunks_exact(bs)).enumerate() {
            let extra = e.extra_keys.as_ref().and_then(|k| k[i]).map_or(lora_extra, extra_hash);
            let hash = block_hash(parent, tokens, extra);
            let pos = chain_pos(parent_pos, hash);
            self.insert(out, Key { vllm, rank, group }, Block { hash, pos }, bit);
            (parent, parent_pos) = (hash, Some(pos));
        }
        self.enforce_cap(out);
        out.count(Counter::EventsApplied, 1);
    }

    /// Counts a `BlockStored` that cannot be indexed and warns about it (rate-limited).
    fn skip<S: BlockSink>(&mut self, out: &mut Out<'_, S>, rank: u32, why: std::fmt::Arguments<'_>) {
        out.count(Counter::EventsSkipped, 1);
        self.warn_skipped(rank, format_args!("BlockStored skipped: {why}"));
    }

    /// A warning about events that were not applied, at most one per [`LogLimiter`] interval.
    fn warn_skipped(&mut self, rank: u32, what: std::fmt::Arguments<'_>) {
        let engine = &*self.name;
        limited_warn!(self.logs.skipped, Instant::now(); engine, rank; "kv-events: {what}");
    }

    fn insert<S: BlockSink>(&mut self, out: &mut Out<'_, S>, key: Key, gantry: Block, bit: u16) {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let EngineState { name, map, order, gpu_refs, logs, .. } = self;
        match map.entry(key) {
            MapEntry::Occupied(mut o) => {
                let entry = o.get_mut();
                // Whether this entry now takes a GPU reference on `gantry`.
                let mut take_ref = false;
                if entry.gantry != gantry {
                    // Same vLLM hash, other content (a collision or a reused hash): re-point it.
                    out.count(Counter::HashCollisions, 1);
                    let (engine, rank, vllm) = (&**name, key.rank, key.vllm);
                    let what = "kv-events: a stored vLLM hash came back with other tokens (a hash collision, \
                                or events were lost); the entry follows the new tokens";
                    limited_warn!(logs.collisions, Instant::now(); engine, rank, vllm; "{what}");
                    if entry.tiers & GPU != 0 {
                        unref(gpu_refs, out, entry.gantry);
                        take_ref = true;
                    }
                    entry.gantry = gantry;
                }
                if entry.tiers & bit == 0 {
                    entry.tiers |= bit;
                    take_ref |= bit == GPU;
                }
                if take_ref {
                    add_ref(gpu_refs, out, gantry);
                } else if bit == GPU {
                    // Already counted: refresh it in the sink, which may have evicted it.
                    out.sink.store(out.slot, gantry.hash, gantry.pos);
                }
                entry.stamp = stamp;
            }
            MapEntry::Vacant(v) => {
                v.insert(Entry { gantry, tiers: bit, stamp });
                if bit == GPU {
                    add_ref(gpu_refs, out, gantry);
                }
            }
        }
        order.push_back((key, stamp));
    }

    fn removed<S: BlockSink>(&mut self, out: &mut Out<'_, S>, tiers: &Tiers, rank: u32, e: &RemovedEvent<'_>) {
        out.count(Counter::EventsApplied, 1);
        // Removals of hashes (or media, or groups) never stored are expected after a late join,
        // and for the groups that are not indexed: ignored.
        let Some(bit) = tiers.bit_for_remove(e.medium) else { return };
        let Some(group) = group_of(e.group_idx) else { return };
        let EngineState { map, gpu_refs, .. } = self;
        for &vllm in &e.block_hashes {
            let MapEntry::Occupied(mut o) = map.entry(Key { vllm, rank, group }) else { continue };
            let entry = o.get_mut();
            if entry.tiers & bit == 0 {
                continue;
            }
            entry.tiers &= !bit;
            if bit == GPU {
                unref(gpu_refs, out, entry.gantry);
            }
            if entry.tiers == 0 {
                o.remove();
            }
        }
        self.compact();
    }

    fn clear_rank<S: BlockSink>(&mut self, out: &mut Out<'_, S>, rank: u32) {
        let EngineState { map, gpu_refs, .. } = self;
        map.retain(|key, entry| {
            if key.rank != rank {
                return true;
            }
            if entry.tiers & GPU != 0 {
                unref(gpu_refs, out, entry.gantry);
            }
            false
        });
        self.compact();
    }

    /// Drops the oldest entries beyond `max_blocks`, or while the sink holds more than
    /// `max_index_blocks` of the engine's GPU blocks (see the module doc).
    fn enforce_cap<S: BlockSink>(&mut self, out: &mut Out<'_, S>) {
        let mut dropped = 0;
        while self.map.len() > self.max_blocks || self.gpu_refs.len() > self.max_index_blocks {
            let Some((key, stamp)) = self.order.pop_front() else { break };
            if let MapEntry::Occupied(o) = self.map.entry(key) {
                if o.get().stamp == stamp {
                    let entry = o.remove();
                    if entry.tiers & GPU != 0 {
                        unref(&mut self.gpu_refs, out, entry.gantry);
                    }
                    dropped += 1;
                }
            }
        }
        if dropped > 0 {
            out.count(Counter::OverCapacity, dropped);
            let (engine, max_blocks, max_index_blocks) = (&*self.name, self.max_blocks, self.max_index_blocks);
            let what = "kv-events: engine holds more blocks than its max_blocks / max_index_blocks cap; dropped its oldest entries";
            limited_warn!(self.logs.over_capacity, Instant::now(); engine, dropped, max_blocks, max_index_blocks; "{what}");
        }
        self.compact();
    }

    /// Rebuilds the FIFO without dead entries once they outnumber the live ones (amortised O(1)
    /// per operation).
    fn compact(&mut self) {
        if self.map.is_empty() {
            self.order.clear();
        } else if self.order.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.order.retain(|(key, stamp)| map.get(key).is_some_and(|e| e.stamp == *stamp));
        }
    }
}

/// Takes a GPU reference on `gantry` and stores it in the sink (always: see the module doc).
fn add_ref<S: BlockSink>(refs: &mut HashMap<Block, u32>, out: &mut Out<'_, S>, gantry: Block) {
    *refs.entry(gantry).or_insert(0) += 1;
    out.sink.store(out.slot, gantry.hash, gantry.pos);
}

fn unref<S: BlockSink>(refs: &mut HashMap<Block, u32>, out: &mut Out<'_, S>, gantry: Block) {
    if let MapEntry::Occupied(mut o) = refs.entry(gantry) {
        *o.get_mut() -= 1;
        if *o.get() == 0 {
            o.remove();
            out.sink.remove(out.slot, gantry.hash, gantry.pos);
        }
    }
}
