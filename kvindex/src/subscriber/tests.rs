//! Unit tests without sockets: the applier against a model sink, the sequence state machine
//! against a recording fake, endpoint offsets and config checks (sockets: `tests/subscriber.rs`).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::sequence::{ReplayLimits, SeqTracker, StreamIo};
use super::*;
use crate::events::{encode_batch, BlockRemoved, BlockStored, ExtraKey, KvEvent, KvEventBatch, WireFormat};
use crate::hash::{block_hash, extra_hash, hash_blocks};
use crate::publisher::END_SEQ;
use crate::sink::Counter;

// ---------------------------------------------------------------------------------------------
// The applier.

/// The sink as a set per engine. `store` is idempotent, as the contract says (every GPU store
/// reaches the sink); `remove` of an absent hash fails the test, which checks that the refcounts
/// only remove on the last reference.
#[derive(Default)]
struct Model {
    blocks: HashMap<EngineSlot, HashSet<u64>>,
    counters: HashMap<Counter, u64>,
}

impl BlockSink for Model {
    fn store(&mut self, engine: EngineSlot, hash: u64, _pos: u64) {
        self.blocks.entry(engine).or_default().insert(hash);
    }
    fn remove(&mut self, engine: EngineSlot, hash: u64, _pos: u64) {
        assert!(self.blocks.entry(engine).or_default().remove(&hash), "remove of absent {hash:x}");
    }
    fn count(&mut self, counter: Counter, n: u64) {
        *self.counters.entry(counter).or_default() += n;
    }
}

impl Model {
    /// What the index does when it needs room: drops a block behind the subscriber's back.
    fn evict(&mut self, engine: EngineSlot, hash: u64) {
        assert!(self.blocks.entry(engine).or_default().remove(&hash), "evict of absent {hash:x}");
    }
    fn of(&self, engine: EngineSlot) -> HashSet<u64> {
        self.blocks.get(&engine).cloned().unwrap_or_default()
    }
    fn counter(&self, c: Counter) -> u64 {
        self.counters.get(&c).copied().unwrap_or(0)
    }
}

const BS: u32 = 4;

fn source(slot: EngineSlot) -> EngineSource {
    EngineSource { slot, name: format!("engine-{slot}"), block_size: BS, ..EngineSource::default() }
}

fn applier(sources: &[EngineSource]) -> EventApplier<Model> {
    let mut a = EventApplier::new(Model::default());
    for s in sources {
        a.add_engine(s).unwrap();
    }
    a
}

/// A BlockStored of `hashes.len()` blocks whose tokens are `first_token..`.
fn stored(hashes: &[u64], parent: Option<u64>, first_token: u32) -> BlockStored {
    let n = hashes.len() as u32 * BS;
    BlockStored {
        block_hashes: hashes.to_vec(),
        parent_block_hash: parent,
        token_ids: (first_token..first_token + n).collect(),
        block_size: BS,
        medium: Some("GPU".into()),
        ..BlockStored::default()
    }
}

fn removed(hashes: &[u64], medium: &str) -> KvEvent {
    KvEvent::BlockRemoved(BlockRemoved { block_hashes: hashes.to_vec(), medium: Some(medium.into()), group_idx: None })
}

/// A GPU BlockStored starting a prompt at `first_token`, of KV-cache group `group` (of kind
/// `kind`), as a hybrid model sends them.
fn stored_in(hashes: &[u64], first_token: u32, group: u32, kind: &str) -> KvEvent {
    let mut e = stored(hashes, None, first_token);
    (e.group_idx, e.kv_cache_spec_kind) = (Some(group), Some(kind.into()));
    KvEvent::BlockStored(e)
}

/// A GPU BlockRemoved of KV-cache group `group` (`None`: the field absent).
fn removed_in(hashes: &[u64], group: Option<u32>) -> KvEvent {
    KvEvent::BlockRemoved(BlockRemoved { block_hashes: hashes.to_vec(), medium: Some("GPU".into()), group_idx: group })
}

fn payload(events: Vec<KvEvent>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_batch(&KvEventBatch { ts: 1.0, events, data_parallel_rank: Some(0) }, WireFormat::Map, &mut out);
    out
}

fn apply(a: &mut EventApplier<Model>, slot: EngineSlot, rank: u32, events: Vec<KvEvent>) {
    a.apply_payload(slot, rank, &payload(events)).unwrap();
}

/// Gantry's hashes of the blocks of tokens `first..first + n * BS` starting a prompt.
fn chain(first: u32, n: u32) -> Vec<u64> {
    let tokens: Vec<u32> = (first..first + n * BS).collect();
    let mut out = Vec::new();
    hash_blocks(DEFAULT_SEED, &tokens, BS as usize, 0, &mut out);
    out
}

fn set(hashes: &[u64]) -> HashSet<u64> {
    hashes.iter().copied().collect()
}

#[test]
fn stores_chain_gantry_hashes_across_events() {
    let mut a = applier(&[source(0)]);
    apply(&mut a, 0, 0, vec![KvEvent::BlockStored(stored(&[11, 12], None, 0))]);
    // The child names its parent by vLLM hash; its Gantry hash continues the chain.
    apply(&mut a, 0, 0, vec![KvEvent::BlockStored(stored(&[13], Some(12), 8))]);
    assert_eq!(a.sink().of(0), set(&chain(0, 3)));
    let (counters, blocks) = a.engine_stats(0).unwrap();
    assert_eq!((counters[Counter::EventsApplied], blocks), (2, 3));
    assert_eq!(a.sink().counter(Counter::EventsApplied), 2, "counters reach the sink");
}

#[test]
fn extra_keys_are_hashed_from_their_msgpack_bytes() {
    let mut a = applier(&[source(0)]);
    let mut e = stored(&[1, 2], None, 0);
    e.extra_keys = Some(vec![Some(vec![ExtraKey::Str("lora".into())]), None]);
    apply(&mut a, 0, 0, vec![KvEvent::BlockStored(e)]);
    let b0 = block_hash(DEFAULT_SEED, &[0, 1, 2, 3], extra_hash(b"\x91\xa4lora"));
    let b1 = block_hash(b0, &[4, 5, 6, 7], 0);
    assert_eq!(a.sink().of(0), set(&[b0, b1]));
    assert!(!a.sink().of(0).contains(&chain(0, 1)[0]), "an extra key changes the hash");
    // What a router computes for a request's own extra keys matches, for short and long strings.
    assert_eq!(crate::extra_keys_hash(&[ExtraKey::Str("lora".into())]), extra_hash(b"\x91\xa4lora"));
    let salt = "s".repeat(40);
    let mut bytes = vec![0x91, 0xd9, 40];
    bytes.extend_from_slice(salt.as_bytes());
    assert_eq!(crate::extra_keys_hash(&[ExtraKey::Str(salt)]), extra_hash(&bytes));
}

#[test]
fn a_lora_name_without_extra_keys_keys_every_block() {
    // Events from before `extra_keys`: the adapter is named once, and keyed every block.
    let mut a = applier(&[source(0)]);
    let mut e = stored(&[1, 2], None, 0);
    e.lora_name = Some("sql-lora".into());
    apply(&mut a, 0, 0, vec![KvEvent::BlockStored(e)]);
    let lora = crate::extra_keys_hash(&[ExtraKey::Str("sql-lora".into())]);
    let b0 = block_hash(DEFAULT_SEED, &[0, 1, 2, 3], lora);
    let b1 = block_hash(b0, &[4, 5, 6, 7], lora);
    assert_eq!(a.sink().of(0), set(&[b0, b1]));
    // With `extra_keys` present they alone count, as the engine computed them.
    let mut e = stored(&[3, 4], None, 0);
    e.lora_name = Some("sql-lora".into());
    e.extra_keys = Some(vec![Some(vec![ExtraKey::Str("sql-lora".into())]), None]);
    apply(&mut a, 0, 0, vec![KvEvent::BlockStored(e)]);
    let c0 = block_hash(DEFAULT_SEED, &[0, 1, 2, 3], lora);
    let c1 = block_hash(c0, &[4, 5, 6, 7], 0);
    assert_eq!(c0, b0, "same tokens, same adapter, same first block");
    assert!(a.sink().of(0).contains(&c1) && a.sink().of(0).len() == 3);
}

#[test]
fn skips_what_cannot_be_indexed() {
    let mut a = applier(&[source(0)]);
    let mut wrong_size = stored(&[1], None, 0);
    wrong_size.block_size = 8;
    wrong_size.token_ids = (0..8).collect();
    let mut short = stored(&[2], None, 0);
    short.token_ids.pop();
    let mut sliding = stored(&[3], None, 0);
    sliding.kv_cache_spec_kind = Some("sliding_window".into());
    let orphan = stored(&[4], Some(999), 0);
    let mut bad_extra = stored(&[5], None, 0);
    bad_extra.extra_keys = Some(vec![None, None]);
    let mut bad_group = stored(&[8], None, 0);
    bad_group.group_idx = Some(u32::MAX);
    let events =
        [wrong_size, short, sliding, orphan, bad_extra, bad_group].into_iter().map(KvEvent::BlockStored).collect();
    apply(&mut a, 0, 0, events);
    assert!(a.sink().of(0).is_empty());
    assert_eq!(a.sink().counter(Counter::EventsSkipped), 6);
    assert_eq!(a.engine_stats(0).unwrap().0[Counter::EventsSkipped], 6);
    assert_eq!(a.sink().counter(Counter::EventsApplied), 0);

    let mut mla = stored(&[6], None, 0);
    mla.kv_cache_spec_kind = Some("mla_attention".into());
    let mut full = stored(&[7], Some(6), 4);
    full.kv_cache_spec_kind = Some("full_attention".into());
    apply(&mut a, 0, 0, vec![KvEvent::BlockStored(mla), KvEvent::BlockStored(full)]);
    assert_eq!(a.sink().of(0), set(&chain(0, 2)));
}

#[test]
fn removals_find_blocks_by_vllm_hash_and_ignore_unknown_ones() {
    let mut a = applier(&[source(0)]);
    apply(&mut a, 0, 0, vec![KvEvent::BlockStored(stored(&[1, 2], None, 0))]);
    apply(&mut a, 0, 0, vec![removed(&[77], "GPU"), removed(&[2], "GPU")]);
    assert_eq!(a.sink().of(0), set(&chain(0, 1)));
    // The removal arrives before the store in the same batch: both apply in order.
    apply(&mut a, 0, 0, vec![removed(&[1], "GPU"), KvEvent::BlockStored(stored(&[1], None, 0))]);
    assert_eq!(a.sink().of(0), set(&chain(0, 1)));
    apply(&mut a, 0, 0, vec![removed(&[1], "GPU")]);
    assert!(a.sink().of(0).is_empty());
    assert_eq!(a.engine_stats(0).unwrap().1, 0);
}

#[test]
fn removals_only_touch_what_their_kv_cache_group_stored() {
    // A hybrid model: group 0 is full attention, group 1 a sliding window over the same tokens,
    // hence the same vLLM hashes; group 1's stores are skipped.
    let mut a = applier(&[source(0)]);
    let h = chain(0, 2);
    apply(&mut a, 0, 0, vec![stored_in(&[1, 2], 0, 0, "full_attention"), stored_in(&[1, 2], 0, 1, "sliding_window")]);
    assert_eq!(a.sink().of(0), set(&h));
    // The window slides: group 1 evicts its blocks, often. Group 0 still holds them.
    apply(&mut a, 0, 0, vec![removed_in(&[1], Some(1)), removed_in(&[2], Some(1))]);
    assert_eq!(a.sink().of(0), set(&h), "a sliding-window removal leaves full-attention blocks alone");
    // `group_idx` absent is a group of its own (spec §1.5: optional, no default but nil).
    apply(&mut a, 0, 0, vec![removed_in(&[1, 2], None)]);
    assert_eq!(a.sink().of(0), set(&h));
    // A child of group 0 finds its parent in group 0 only.
    let mut child = stored(&[3], Some(2), 8);
    child.group_idx = Some(0);
    apply(&mut a, 0, 0, vec![KvEvent::BlockStored(child)]);
    assert_eq!(a.sink().of(0), set(&chain(0, 3)));
    apply(&mut a, 0, 0, vec![removed_in(&[2], Some(0))]);
    assert_eq!(a.sink().of(0), set(&[h[0], chain(0, 3)[2]]));

    // Two indexed groups holding the same block are two references, like two DP ranks.
    let g = chain(500, 1)[0];
    apply(&mut a, 0, 0, vec![stored_in(&[9], 500, 0, "full_attention"), stored_in(&[9], 500, 2, "mla_attention")]);
    apply(&mut a, 0, 0, vec![removed_in(&[9], Some(2))]);
    assert!(a.sink().of(0).contains(&g), "group 0 still holds it");
    apply(&mut a, 0, 0, vec![removed_in(&[9], Some(0))]);
    assert!(!a.sink().of(0).contains(&g));
}

#[test]
fn a_vllm_hash_stored_again_with_other_tokens_is_a_counted_collision() {
    let mut a = applier(&[source(0), source(1)]);
    apply(&mut a, 0, 0, vec![KvEvent::BlockStored(stored(&[1], None, 0))]);
    // The same content again (a reuse report) is no collision.
    apply(&mut a, 0, 0, vec![KvEvent::BlockStored(stored(&[1], None, 0))]);
    assert_eq!(a.engine_stats(0).unwrap().0[Counter::HashCollisions], 0);
    // Other tokens under the same vLLM hash: the entry follows the new content, and it counts.
    apply(&mut a, 0, 0, vec![KvEvent::BlockStored(stored(&[1], None, 100))]);
    assert_eq!(a.sink().of(0), set(&chain(100, 1)), "the old content left the index");
    assert_eq!(a.engine_stats(0).unwrap().0[Counter::HashCollisions], 1);
    assert_eq!(a.totals()[Counter::HashCollisions], 1);
    assert_eq!(a.sink().counter(Counter::HashCollisions), 1, "the counter reaches the sink");
    assert_eq!(a.engine_stats(0).unwrap().1, 1, "still one entry");
    // The removal finds the new content.
    apply(&mut a, 0, 0, vec![removed(&[1], "GPU")]);
    assert!(a.sink().of(0).is_empty());
    assert_eq!(a.engine_stats(1).unwrap().0[Counter::HashCollisions], 0, "per engine");
}

#[test]
fn an_evicted_block_stored_again_comes_back() {
    let mut a = applier(&[EngineSource { dp_ranks: 2, ..source(0) }]);
    let h = chain(0, 2);
    apply(&mut a, 0, 0, vec![KvEvent::BlockStored(stored(&[1, 2], None, 0))]);
    // The index needs room and evicts block 0; the engine still holds it and reports it again.
    a.sink_mut().evict(0, h[0]);
    assert_eq!(a.sink().of(0), set(&h[1..]));
    apply(&mut a, 0, 0, vec![KvEvent::BlockStored(stored(&[1], None, 0))]);
    assert_eq!(a.sink().of(0), set(&h), "a re-store reaches the sink");
    // Also when another rank stores it (its reference is not the first).
    a.sink_mut().evict(0, h[0]);
    apply(&mut a, 0, 1, vec![KvEvent::BlockStored(stored(&[7], None, 0))]);
    assert_eq!(a.sink().of(0), set(&h));
    // Removal still waits for the last reference.
    apply(&mut a, 0, 0, vec![removed(&[1], "GPU")]);
    assert_eq!(a.sink().of(0), set(&h), "rank 1 still holds it");
    apply(&mut a, 0, 1, vec![removed(&[7], "GPU")]);
    assert_eq!(a.sink().of(0), set(&h[1..]));
}

#[test]
fn other_media_are_tracked_but_not_stored() {
    let mut a = applier(&[source(0)]);
    let mut cpu = stored(&[1], None, 0);
    cpu.medium = Some("CPU".into());
    apply(&mut a, 0, 0, vec![KvEvent::BlockStored(cpu.clone())]);
    assert!(a.sink().of(0).is_empty());
    assert_eq!(a.engine_stats(0).unwrap().1, 1);
    // A GPU child resolves its parent through the CPU entry.
    apply(&mut a, 0, 0, vec![KvEvent::BlockStored(stored(&[2], Some(1), 4))]);
    let hashes = chain(0, 2);
    assert_eq!(a.sink().of(0), set(&hashes[1..]));
    // The same block on the GPU too; a CPU removal leaves the GPU copy in the index.
    apply(&mut a, 0, 0, vec![KvEvent::BlockStored(stored(&[1], None, 0)), removed(&[1], "CPU")]);
    assert_eq!(a.sink().of(0), set(&hashes));
    apply(&mut a, 0, 0, vec![removed(&[1], "GPU"), removed(&[2], "CPU"), removed(&[2], "DISK")]);
    assert_eq!(a.sink().of(0), set(&hashes[1..]), "removals for media that do not hold the block change nothing");
    apply(&mut a, 0, 0, vec![KvEvent::BlockStored(cpu), removed(&[1], "CPU"), removed(&[2], "GPU")]);
    assert!(a.sink().of(0).is_empty());
    assert_eq!(a.engine_stats(0).unwrap().1, 0);
}

#[test]
fn dp_ranks_share_blocks_by_refcount() {
    let mut a = applier(&[EngineSource { dp_ranks: 2, ..source(3) }]);
    let h = chain(0, 1)[0];
    // Both ranks cache the same prefix under different vLLM hashes.
    apply(&mut a, 3, 0, vec![KvEvent::BlockStored(stored(&[100], None, 0))]);
    apply(&mut a, 3, 1, vec![KvEvent::BlockStored(stored(&[200], None, 0))]);
    assert_eq!(a.sink().of(3), set(&[h]));
    apply(&mut a, 3, 0, vec![removed(&[100], "GPU")]);
    assert_eq!(a.sink().of(3), set(&[h]), "rank 1 still holds it");
    apply(&mut a, 3, 1, vec![removed(&[100], "GPU")]);
    assert_eq!(a.sink().of(3), set(&[h]), "rank 1 knows the block by its own vLLM hash only");
    apply(&mut a, 3, 1, vec![removed(&[200], "GPU")]);
    assert!(a.sink().of(3).is_empty());

    // Clearing one rank (restart, AllBlocksCleared) keeps what the other holds.
    apply(&mut a, 3, 0, vec![KvEvent::BlockStored(stored(&[100], None, 0))]);
    apply(&mut a, 3, 1, vec![KvEvent::BlockStored(stored(&[200, 201], None, 0))]);
    a.clear_rank(3, 1);
    assert_eq!(a.sink().of(3), set(&[h]));
    apply(&mut a, 3, 0, vec![KvEvent::AllBlocksCleared]);
    assert!(a.sink().of(3).is_empty());
    assert_eq!(a.sink().counter(Counter::Resyncs), 2);
    // Ranks beyond dp_ranks are ignored.
    apply(&mut a, 3, 2, vec![KvEvent::BlockStored(stored(&[1], None, 0))]);
    assert!(a.sink().of(3).is_empty());
}

#[test]
fn the_cap_drops_the_oldest_blocks_of_that_engine_only() {
    let mut a = applier(&[EngineSource { max_blocks: 4, ..source(0) }, source(1)]);
    apply(&mut a, 1, 0, vec![KvEvent::BlockStored(stored(&[1, 2], None, 0))]);
    for i in 0..9u32 {
        apply(&mut a, 0, 0, vec![KvEvent::BlockStored(stored(&[u64::from(i)], None, i * 100))]);
        if i == 5 {
            // Re-storing block 3 makes it newer than 4 and 5.
            apply(&mut a, 0, 0, vec![KvEvent::BlockStored(stored(&[3], None, 300))]);
        }
    }
    let want: HashSet<u64> = [3u32, 6, 7, 8].iter().map(|&i| chain(i * 100, 1)[0]).collect();
    assert_eq!(a.sink().of(0), want);
    assert_eq!(a.engine_stats(0).unwrap().1, 4);
    assert_eq!(a.engine_stats(0).unwrap().0[Counter::OverCapacity], 5, "0, 1, 2, 4, 5");
    assert_eq!(a.sink().of(1), set(&chain(0, 2)), "the other engine is untouched");
    assert_eq!(a.engine_stats(1).unwrap().0[Counter::OverCapacity], 0);

    // Churn far beyond the cap keeps the FIFO bounded (dead entries are compacted away).
    for i in 0..10_000u64 {
        apply(&mut a, 0, 0, vec![KvEvent::BlockStored(stored(&[1000 + i], None, 7)), removed(&[1000 + i], "GPU")]);
    }
    let (fifo, map) = a.fifo_len(0).unwrap();
    assert!(fifo <= 2 * map + 65, "FIFO holds {fifo} entries for {map} blocks");
}

#[test]
fn the_index_share_bounds_gpu_blocks_only_and_can_change_while_running() {
    let mut a = applier(&[EngineSource { max_index_blocks: 3, ..source(0) }, source(1)]);
    apply(&mut a, 1, 0, vec![KvEvent::BlockStored(stored(&[1, 2], None, 0))]);
    // CPU copies are in the private map but not in the index: they do not count.
    for i in 0..5u32 {
        let mut cpu = stored(&[500 + u64::from(i)], None, 5000 + i * 100);
        cpu.medium = Some("CPU".into());
        apply(&mut a, 0, 0, vec![KvEvent::BlockStored(cpu)]);
    }
    assert!(a.sink().of(0).is_empty());
    assert_eq!(a.engine_stats(0).unwrap().0[Counter::OverCapacity], 0, "5 CPU entries under a share of 3");
    for i in 0..5u32 {
        apply(&mut a, 0, 0, vec![KvEvent::BlockStored(stored(&[u64::from(i)], None, i * 100))]);
    }
    let gpu = |ids: &[u32]| -> HashSet<u64> { ids.iter().map(|&i| chain(i * 100, 1)[0]).collect() };
    assert_eq!(a.sink().of(0), gpu(&[2, 3, 4]), "the three newest GPU blocks");
    // The pool grew: a smaller share drops the oldest at once; the other engine keeps its blocks.
    assert!(a.set_max_index_blocks(0, 1));
    assert_eq!(a.sink().of(0), gpu(&[4]));
    assert!(!a.set_max_index_blocks(9, 1), "no engine in slot 9");
    assert_eq!(a.sink().of(1), set(&chain(0, 2)), "the other engine is untouched");
    // A larger share lets new blocks in without dropping.
    assert!(a.set_max_index_blocks(0, 10));
    apply(&mut a, 0, 0, vec![KvEvent::BlockStored(stored(&[7], None, 700))]);
    assert_eq!(a.sink().of(0), gpu(&[4, 7]));
}

#[test]
fn remove_engine_removes_all_its_blocks() {
    let mut a = applier(&[source(0), source(1)]);
    apply(&mut a, 0, 0, vec![KvEvent::BlockStored(stored(&[1, 2], None, 0))]);
    apply(&mut a, 1, 0, vec![KvEvent::BlockStored(stored(&[1], None, 0))]);
    assert!(a.remove_engine(0));
    assert!(!a.remove_engine(0));
    assert!(a.sink().of(0).is_empty());
    assert_eq!(a.sink().of(1).len(), 1);
    assert_eq!(a.totals()[Counter::Resyncs], 1);
    assert!(a.engine_stats(0).is_none());
    assert!(matches!(a.add_engine(&source(1)), Err(SubscriberError::SlotInUse { slot: 1 })));
}

#[test]
fn undecodable_payloads_and_unknown_fields_are_counted() {
    let mut a = applier(&[source(0)]);
    assert!(a.apply_payload(0, 0, b"\x93garbage").is_err());
    assert!(a.apply_payload(0, 0, &[]).is_err());
    // [1.0, [{"type": "Future"}, ["BlockRemoved", [], nil, nil, "extra"]]]
    let mut p = vec![0x92, 0xcb];
    p.extend_from_slice(&1.0f64.to_be_bytes());
    p.extend_from_slice(&[0x92, 0x81, 0xa4, b't', b'y', b'p', b'e', 0xa6]);
    p.extend_from_slice(b"Future");
    p.extend_from_slice(&[0x95, 0xac]);
    p.extend_from_slice(b"BlockRemoved");
    p.extend_from_slice(&[0x90, 0xc0, 0xc0, 0xa1, b'x']);
    a.apply_payload(0, 0, &p).unwrap();
    let (c, _) = a.engine_stats(0).unwrap();
    assert_eq!((c[Counter::DecodeErrors], c[Counter::UnknownFields], c[Counter::EventsApplied]), (2, 2, 1));
    // Unknown engines are ignored, not counted anywhere.
    assert!(a.apply_payload(9, 0, b"garbage").is_err());
    assert_eq!(a.totals()[Counter::DecodeErrors], 2);
}

#[test]
fn counter_indices_follow_all() {
    for (i, c) in Counter::ALL.iter().enumerate() {
        assert_eq!(c.index(), i);
    }
    let names: HashSet<_> = Counter::ALL.iter().map(|c| c.name()).collect();
    assert_eq!(names.len(), Counter::ALL.len());
}

// ---------------------------------------------------------------------------------------------
// The applier against a model of its rules, on random event sequences.

/// One engine as the module doc of `apply.rs` describes it, written as plainly as possible: a
/// list of private-map entries, scanned linearly. The sink must hold exactly the Gantry hashes
/// of the entries on the GPU; no refcounts, bit sets or FIFO here.
struct RefEngine {
    source: EngineSource,
    entries: Vec<RefEntry>,
    next_stamp: u64,
}

struct RefEntry {
    rank: u32,
    /// `group_idx` as sent; `None` (absent) is a group of its own.
    group: Option<u32>,
    vllm: u64,
    gantry: u64,
    /// Media names, `"GPU"` for an absent medium.
    media: HashSet<String>,
    /// When it was last stored: the cap drops the smallest first.
    stamp: u64,
}

impl RefEngine {
    fn new(source: EngineSource) -> Self {
        RefEngine { source, entries: Vec::new(), next_stamp: 0 }
    }

    fn find(&self, rank: u32, group: Option<u32>, vllm: u64) -> Option<usize> {
        self.entries.iter().position(|e| (e.rank, e.group, e.vllm) == (rank, group, vllm))
    }

    fn apply(&mut self, rank: u32, event: &KvEvent) {
        if rank >= self.source.dp_ranks {
            return;
        }
        match event {
            KvEvent::BlockStored(e) => self.stored(rank, e),
            KvEvent::BlockRemoved(e) => {
                let medium = e.medium.as_deref().unwrap_or("GPU");
                for &vllm in &e.block_hashes {
                    if let Some(i) = self.find(rank, e.group_idx, vllm) {
                        self.entries[i].media.remove(medium);
                        if self.entries[i].media.is_empty() {
                            self.entries.remove(i);
                        }
                    }
                }
            }
            KvEvent::AllBlocksCleared => self.entries.retain(|e| e.rank != rank),
        }
    }

    fn stored(&mut self, rank: u32, e: &BlockStored) {
        let bs = self.source.block_size as usize;
        let indexed = matches!(e.kv_cache_spec_kind.as_deref(), None | Some("full_attention" | "mla_attention"));
        if !indexed
            || e.block_size != self.source.block_size
            || e.token_ids.len() != e.block_hashes.len() * bs
            || e.extra_keys.as_ref().is_some_and(|k| k.len() != e.block_hashes.len())
            || e.group_idx == Some(u32::MAX)
        {
            return;
        }
        let mut parent = match e.parent_block_hash {
            None => self.source.seed,
            Some(p) => match self.find(rank, e.group_idx, p) {
                Some(i) => self.entries[i].gantry,
                None => return,
            },
        };
        let medium = e.medium.clone().unwrap_or_else(|| "GPU".into());
        for (i, (&vllm, tokens)) in e.block_hashes.iter().zip(e.token_ids.chunks(bs)).enumerate() {
            let extra = match (&e.extra_keys, &e.lora_name) {
                (Some(keys), _) => keys[i].as_deref().map_or(0, crate::extra_keys_hash),
                (None, Some(lora)) => crate::extra_keys_hash(&[ExtraKey::Str(lora.clone())]),
                (None, None) => 0,
            };
            let gantry = block_hash(parent, tokens, extra);
            let stamp = self.next_stamp;
            self.next_stamp += 1;
            match self.find(rank, e.group_idx, vllm) {
                Some(i) => {
                    let entry = &mut self.entries[i];
                    entry.gantry = gantry;
                    entry.media.insert(medium.clone());
                    entry.stamp = stamp;
                }
                None => self.entries.push(RefEntry {
                    rank,
                    group: e.group_idx,
                    vllm,
                    gantry,
                    media: HashSet::from([medium.clone()]),
                    stamp,
                }),
            }
            parent = gantry;
        }
        while self.entries.len() > self.source.max_blocks {
            let oldest = (0..self.entries.len()).min_by_key(|&i| self.entries[i].stamp).unwrap();
            self.entries.remove(oldest);
        }
    }

    fn held(&self) -> HashSet<u64> {
        self.entries.iter().filter(|e| e.media.contains("GPU")).map(|e| e.gantry).collect()
    }
}

/// A random event for one engine. vLLM hashes come from a small pool so that stores repeat
/// (refreshes, collisions), removals hit, and parents resolve; token chunks come from a small
/// pool so that different vLLM hashes, ranks and groups share Gantry blocks (refcounts).
fn random_event(rng: &mut fastrand::Rng, history: &mut Vec<u64>) -> KvEvent {
    // (group_idx, kv_cache_spec_kind), repeated by weight: sliding-window stores are skipped,
    // u32::MAX is out of range.
    const GROUPS: [(Option<u32>, Option<&str>); 9] = [
        (None, None),
        (None, None),
        (Some(0), None),
        (Some(0), Some("full_attention")),
        (Some(0), Some("full_attention")),
        (Some(1), Some("sliding_window")),
        (Some(1), Some("sliding_window")),
        (Some(2), Some("mla_attention")),
        (Some(u32::MAX), None),
    ];
    let pick = |rng: &mut fastrand::Rng| GROUPS[rng.usize(..GROUPS.len())];
    match rng.u32(..20) {
        0..=11 => {
            let (group_idx, kind) = pick(rng);
            let n = rng.usize(1..=3);
            let block_hashes: Vec<u64> = (0..n).map(|_| rng.u64(1..=10)).collect();
            let parent_block_hash = match rng.u32(..20) {
                0..=5 => None,
                6..=16 if !history.is_empty() => Some(history[rng.usize(..history.len())]),
                _ => Some(1000 + rng.u64(..100)),
            };
            let mut token_ids: Vec<u32> = (0..n)
                .flat_map(|_| {
                    let first = rng.u32(..3) * 10;
                    first..first + BS
                })
                .collect();
            let mut block_size = BS;
            match rng.u32(..40) {
                0 => block_size = 2 * BS,
                1 => {
                    token_ids.pop();
                }
                _ => {}
            }
            let medium = match rng.u32(..10) {
                0 => None,
                1 | 2 => Some("CPU".into()),
                _ => Some("GPU".into()),
            };
            let (lora_name, extra_keys) = match rng.u32(..10) {
                0 => (Some("lora".into()), None),
                1 => (
                    rng.bool().then(|| "lora".into()),
                    Some((0..n).map(|_| rng.bool().then(|| vec![ExtraKey::Str("salt".into())])).collect()),
                ),
                2 if n > 1 => (None, Some(vec![None])),
                _ => (None, None),
            };
            history.extend(&block_hashes);
            KvEvent::BlockStored(BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                medium,
                lora_name,
                extra_keys,
                group_idx,
                kv_cache_spec_kind: kind.map(Into::into),
                ..BlockStored::default()
            })
        }
        12..=18 => {
            let n = rng.usize(1..=2);
            let block_hashes = (0..n).map(|_| if rng.u32(..8) == 0 { 900 } else { rng.u64(1..=10) }).collect();
            let medium = [None, Some("GPU"), Some("GPU"), Some("GPU"), Some("CPU"), Some("DISK")][rng.usize(..6)];
            let group_idx = pick(rng).0;
            KvEvent::BlockRemoved(BlockRemoved { block_hashes, medium: medium.map(Into::into), group_idx })
        }
        _ => KvEvent::AllBlocksCleared,
    }
}

/// Random batches for three engines (two DP ranks, a cap, another seed), decoded from msgpack,
/// checked after each batch against [`RefEngine`]. `log` gets every batch, for the report.
fn check_random_sequence(seed: u64, log: &mut Vec<String>) {
    let sources = [
        EngineSource { dp_ranks: 2, ..source(0) },
        EngineSource { max_blocks: 5, ..source(1) },
        EngineSource { dp_ranks: 2, max_blocks: 9, seed: 42, ..source(2) },
    ];
    let mut a = applier(&sources);
    let mut models: Vec<RefEngine> = sources.iter().cloned().map(RefEngine::new).collect();
    let mut histories = vec![Vec::new(); sources.len()];
    let mut rng = fastrand::Rng::with_seed(seed);
    for batch in 0..60 {
        let slot = rng.usize(..sources.len());
        let rank = rng.u32(..2);
        let events: Vec<KvEvent> =
            (0..rng.usize(1..=4)).map(|_| random_event(&mut rng, &mut histories[slot])).collect();
        log.push(format!("batch {batch}: engine {slot} rank {rank}: {events:?}"));
        for e in &events {
            models[slot].apply(rank, e);
        }
        apply(&mut a, slot as EngineSlot, rank, events);
        for (m, s) in models.iter().zip(&sources) {
            assert_eq!(a.sink().of(s.slot), m.held(), "engine {} after batch {batch}", s.slot);
            assert_eq!(a.engine_stats(s.slot).unwrap().1, m.entries.len() as u64, "private map of engine {}", s.slot);
        }
    }
}

#[test]
fn random_event_sequences_match_a_model_of_the_rules() {
    for seed in 0..300 {
        let mut log = Vec::new();
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check_random_sequence(seed, &mut log)));
        if run.is_err() {
            panic!("seed {seed} failed (message above) after these batches:\n{}", log.join("\n"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The sequence state machine.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Act {
    Apply(u64),
    Clear,
    Request(u64),
    Cancel,
    Count(Counter),
}

struct FakeIo {
    replay: bool,
    send_ok: bool,
    acts: Vec<Act>,
}

impl FakeIo {
    fn new(replay: bool) -> Self {
        FakeIo { replay, send_ok: true, acts: Vec::new() }
    }
    fn take(&mut self) -> Vec<Act> {
        std::mem::take(&mut self.acts)
    }
}

impl StreamIo for FakeIo {
    fn has_replay(&self) -> bool {
        self.replay
    }
    fn apply(&mut self, seq: u64, payload: &[u8]) {
        assert_eq!(payload, seq.to_le_bytes(), "payload travels with its seq");
        self.acts.push(Act::Apply(seq));
    }
    fn clear(&mut self, _why: &'static str) {
        self.acts.push(Act::Clear);
    }
    fn request_replay(&mut self, start: u64) -> bool {
        self.acts.push(Act::Request(start));
        self.send_ok
    }
    fn cancel_replay(&mut self, _why: &'static str) {
        self.acts.push(Act::Cancel);
    }
    fn count(&mut self, counter: Counter) {
        self.acts.push(Act::Count(counter));
    }
}

const TIMEOUT: Duration = Duration::from_secs(1);

fn tracker() -> SeqTracker {
    SeqTracker::new(ReplayLimits { timeout: TIMEOUT, max_buffered: 4, max_buffered_bytes: 1 << 20 })
}

/// Feeds live messages (payload = seq as little-endian bytes, checked by the fake).
fn live(t: &mut SeqTracker, io: &mut FakeIo, now: Instant, seqs: &[u64]) {
    for &s in seqs {
        t.on_live(s, &s.to_le_bytes(), now, io);
    }
}

fn replay(t: &mut SeqTracker, io: &mut FakeIo, now: Instant, seqs: &[u64]) {
    for &s in seqs {
        t.on_replay(s, &s.to_le_bytes(), now, io);
    }
}

fn applied(seqs: impl IntoIterator<Item = u64>) -> Vec<Act> {
    seqs.into_iter().map(Act::Apply).collect()
}

use Act::{Cancel, Clear, Count, Request};
const GAP: Act = Count(Counter::Gaps);
const REPLAY: Act = Count(Counter::Replays);

#[test]
fn without_replay_the_first_message_is_the_baseline() {
    let (mut t, mut io, now) = (tracker(), FakeIo::new(false), Instant::now());
    t.start(now, &mut io);
    live(&mut t, &mut io, now, &[5, 6, 7]);
    assert_eq!(io.take(), applied(5..=7));
    assert_eq!(t.last(), Some(7));
    // A gap without replay: clear, continue from the live stream.
    live(&mut t, &mut io, now, &[10, 11]);
    assert_eq!(io.take(), [GAP, Clear, Act::Apply(10), Act::Apply(11)]);
}

#[test]
fn start_replays_from_zero_and_buffers_live_messages() {
    let (mut t, mut io, now) = (tracker(), FakeIo::new(true), Instant::now());
    t.start(now, &mut io);
    assert_eq!(io.take(), [Request(0), REPLAY]);
    live(&mut t, &mut io, now, &[3, 4]);
    assert!(io.take().is_empty(), "buffered while the replay runs");
    replay(&mut t, &mut io, now, &[0, 1, 2, 3, END_SEQ]);
    assert_eq!(io.take(), applied(0..=4), "3 came from the replay, 4 from the buffer");
    live(&mut t, &mut io, now, &[5]);
    assert_eq!(io.take(), applied([5]));
    assert_eq!(t.deadline(), None);
}

#[test]
fn first_live_message_replays_unless_it_is_seq_zero() {
    let (mut t, mut io, now) = (tracker(), FakeIo::new(true), Instant::now());
    live(&mut t, &mut io, now, &[0, 1]);
    assert_eq!(io.take(), applied(0..=1));

    let mut t = tracker();
    live(&mut t, &mut io, now, &[7]);
    assert_eq!(io.take(), [Request(0), REPLAY]);
    // The replay buffer no longer reaches seq 0: start from what it has, nothing to clear.
    replay(&mut t, &mut io, now, &[5, 6, 7, END_SEQ]);
    assert_eq!(io.take(), applied(5..=7));
}

#[test]
fn gap_is_filled_by_replay_and_covered_seqs_are_skipped() {
    let (mut t, mut io, now) = (tracker(), FakeIo::new(true), Instant::now());
    live(&mut t, &mut io, now, &[0, 1, 4, 5]);
    assert_eq!(io.take(), [Act::Apply(0), Act::Apply(1), GAP, Request(2), REPLAY]);
    replay(&mut t, &mut io, now, &[2, 3, 4, END_SEQ]);
    assert_eq!(io.take(), applied(2..=5));
}

#[test]
fn replay_that_does_not_reach_back_clears_then_applies() {
    let (mut t, mut io, now) = (tracker(), FakeIo::new(true), Instant::now());
    live(&mut t, &mut io, now, &[0, 1, 9]);
    assert_eq!(io.take(), [Act::Apply(0), Act::Apply(1), GAP, Request(2), REPLAY]);
    replay(&mut t, &mut io, now, &[6, 7, 8, 9, END_SEQ]);
    assert_eq!(io.take(), [vec![Clear], applied(6..=9)].concat());
    // An empty replay (nothing buffered from the gap on): the buffered message shows the gap
    // again, and it is resolved by a clear instead of another replay.
    live(&mut t, &mut io, now, &[12]);
    assert_eq!(io.take(), [GAP, Request(10), REPLAY]);
    replay(&mut t, &mut io, now, &[END_SEQ]);
    assert_eq!(io.take(), [Clear, Act::Apply(12)]);
}

#[test]
fn live_messages_overtaken_by_the_replay_are_skipped_not_taken_for_a_restart() {
    let (mut t, mut io, now) = (tracker(), FakeIo::new(true), Instant::now());
    t.start(now, &mut io);
    replay(&mut t, &mut io, now, &[0, 1, 2, 3, 4, 5, END_SEQ]);
    assert_eq!(io.take(), [vec![Request(0), REPLAY], applied(0..=5)].concat());
    // The live copies of 3..=5 arrive after the replay delivered them.
    live(&mut t, &mut io, now, &[3, 4, 5, 6]);
    assert_eq!(io.take(), applied([6]));
    // Going below the last *live* seq is a restart.
    live(&mut t, &mut io, now, &[2]);
    assert_eq!(io.take(), [Clear, Request(0), REPLAY]);
}

#[test]
fn a_new_gap_after_a_replay_is_replayed_again() {
    // The engine answered the first replay up to seq 4; seqs 5 and 6 were published before the
    // SUB socket joined, so the buffered live messages start at 7.
    let (mut t, mut io, now) = (tracker(), FakeIo::new(true), Instant::now());
    t.start(now, &mut io);
    live(&mut t, &mut io, now, &[7, 8]);
    replay(&mut t, &mut io, now, &[0, 1, 2, 3, 4, END_SEQ]);
    assert_eq!(io.take(), [vec![Request(0), REPLAY], applied(0..=4), vec![GAP, Request(5), REPLAY]].concat());
    replay(&mut t, &mut io, now, &[5, 6, 7, END_SEQ]);
    assert_eq!(io.take(), applied(5..=8), "8 moved to the second replay's buffer");
}

#[test]
fn restart_clears_and_replays_the_new_process_from_zero() {
    let (mut t, mut io, now) = (tracker(), FakeIo::new(true), Instant::now());
    live(&mut t, &mut io, now, &[0, 1, 2]);
    io.take();
    live(&mut t, &mut io, now, &[0]);
    assert_eq!(io.take(), [Clear, Act::Apply(0)], "seq 0: nothing earlier to fetch");
    live(&mut t, &mut io, now, &[1, 2, 3]);
    io.take();
    live(&mut t, &mut io, now, &[2]);
    assert_eq!(io.take(), [Clear, Request(0), REPLAY]);
    replay(&mut t, &mut io, now, &[0, 1, 2, END_SEQ]);
    assert_eq!(io.take(), applied(0..=2));

    let (mut t, mut io) = (tracker(), FakeIo::new(false));
    live(&mut t, &mut io, now, &[4, 5, 1]);
    assert_eq!(io.take(), [Act::Apply(4), Act::Apply(5), Clear, Act::Apply(1)]);
}

#[test]
fn silent_replay_times_out_into_a_resync() {
    let (mut t, mut io, now) = (tracker(), FakeIo::new(true), Instant::now());
    live(&mut t, &mut io, now, &[0, 3, 4]);
    assert_eq!(io.take(), [Act::Apply(0), GAP, Request(1), REPLAY]);
    t.on_tick(now + TIMEOUT / 2, &mut io);
    assert!(io.take().is_empty());
    assert_eq!(t.deadline(), Some(now + TIMEOUT));
    t.on_tick(now + TIMEOUT, &mut io);
    assert_eq!(io.take(), [Cancel, Clear, Act::Apply(3), Act::Apply(4)]);
    // Late replies of the abandoned replay are ignored.
    replay(&mut t, &mut io, now, &[1, 2, END_SEQ]);
    assert!(io.take().is_empty());
    // Each replayed message re-arms the deadline.
    live(&mut t, &mut io, now, &[9]);
    io.take();
    let later = now + TIMEOUT * 3 / 4;
    replay(&mut t, &mut io, later, &[5]);
    t.on_tick(now + TIMEOUT, &mut io);
    assert_eq!(io.take(), [Act::Apply(5)], "not timed out: the deadline moved");
    assert_eq!(t.deadline(), Some(later + TIMEOUT));
}

#[test]
fn full_buffer_abandons_the_replay() {
    let (mut t, mut io, now) = (tracker(), FakeIo::new(true), Instant::now());
    live(&mut t, &mut io, now, &[0, 2, 3, 4, 5]);
    assert_eq!(io.take(), [Act::Apply(0), GAP, Request(1), REPLAY], "2..=5 buffered (limit 4)");
    live(&mut t, &mut io, now, &[6]);
    assert_eq!(io.take(), [vec![Cancel, Clear], applied(2..=6)].concat());
}

#[test]
fn restart_during_a_replay_abandons_it() {
    let (mut t, mut io, now) = (tracker(), FakeIo::new(true), Instant::now());
    live(&mut t, &mut io, now, &[0, 5, 6]);
    io.take();
    live(&mut t, &mut io, now, &[0]);
    assert_eq!(io.take(), [Cancel, Clear, Act::Apply(0)], "the buffered 5 and 6 belonged to the old process");
    replay(&mut t, &mut io, now, &[1, 2, END_SEQ]);
    assert!(io.take().is_empty(), "replies of the dropped replay are ignored");
}

#[test]
fn unsent_replay_request_falls_back_to_the_live_stream() {
    let (mut t, mut io, now) = (tracker(), FakeIo::new(true), Instant::now());
    io.send_ok = false;
    live(&mut t, &mut io, now, &[4, 6]);
    assert_eq!(io.take(), [Request(0), Act::Apply(4), GAP, Request(5), Clear, Act::Apply(6)]);
    assert_eq!(t.deadline(), None);
}

// ---------------------------------------------------------------------------------------------
// Configuration.

#[test]
fn dp_rank_endpoints_follow_vllm() {
    assert_eq!(offset_endpoint("tcp://10.0.0.1:5557", 0).unwrap(), "tcp://10.0.0.1:5557");
    assert_eq!(offset_endpoint("tcp://10.0.0.1:5557", 3).unwrap(), "tcp://10.0.0.1:5560");
    assert_eq!(offset_endpoint("tcp://[::1]:5557", 1).unwrap(), "tcp://[::1]:5558");
    assert_eq!(offset_endpoint("tcp://host:0", 2).unwrap(), "tcp://host:0");
    assert_eq!(offset_endpoint("inproc://ev", 2).unwrap(), "inproc://ev_dp2");
    assert_eq!(offset_endpoint("ipc:///tmp/ev", 0).unwrap(), "ipc:///tmp/ev");
    for bad in ["ipc:///tmp/ev", "tcp://host", "tcp://host:abc", "tcp://host:65535"] {
        assert!(offset_endpoint(bad, 1).is_err(), "{bad}");
    }
}

#[test]
fn validate_names_the_bad_key() {
    type Mutate = fn(&mut EngineSource);
    let cases: [(&str, Mutate); 7] = [
        ("events", |s| s.events = "127.0.0.1:5557".into()),
        ("replay", |s| s.replay = Some("tcp://a\0b:1".into())),
        ("events", |s| {
            s.events = "ipc:///tmp/x".into();
            s.dp_ranks = 2;
        }),
        ("dp_ranks", |s| s.dp_ranks = 0),
        ("dp_ranks", |s| s.dp_ranks = MAX_DP_RANKS + 1),
        ("block_size", |s| s.block_size = 0),
        ("max_blocks", |s| s.max_blocks = 0),
    ];
    assert!(EngineSource::default().validate().is_ok());
    for (key, mutate) in cases {
        let mut s = EngineSource { name: "e1".into(), ..EngineSource::default() };
        mutate(&mut s);
        match s.validate() {
            Err(SubscriberError::InvalidConfig { key: k, engine, .. }) => {
                assert_eq!((k, engine.as_str()), (key, "e1"));
            }
            other => panic!("{key}: {other:?}"),
        }
    }
}

#[test]
fn public_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Subscriber>();
    send_sync::<SubscriberStats>();
    send_sync::<SubscriberError>();
    fn send<T: Send>() {}
    send::<EventApplier<Model>>();
}
