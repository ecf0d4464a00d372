//! vLLM KV-event wire types and a byte-exact msgpack encoder (msgspec's output for vLLM's structs).
//!
//! # Wire shape (spec §1.5)
//!
//! A [`KvEventBatch`] is always a positional msgpack array `[ts, events, data_parallel_rank]`
//! (`ts` as float64, a `None` rank as `nil`). Each event is a msgspec tagged union member, written
//! in one of two forms ([`WireFormat`]):
//!
//! * [`WireFormat::Map`] (vLLM >= 0.24, default): a map with `"type"` first and the fields in
//!   declaration order. Fields whose declared default is `None` are omitted when `None`; required
//!   fields are always written (`nil` when `None`). msgspec reserves the map header for the
//!   struct's *declared* field count and patches the count afterwards, so `BlockStored` (16
//!   declared fields in vLLM 0.33, tag included) always gets a map16 header (`de 00 0b` for 11
//!   entries) while `BlockRemoved` (6) and `AllBlocksCleared` (1) get a fixmap.
//! * [`WireFormat::Array`] (vLLM <= 0.23): a tagged array `[tag, field, ...]` with the 0.23 field
//!   set, every field present (`nil` when `None`).
//!
//! Integers use the smallest msgpack encoding, strings fixstr/str8/str16/str32. The test to read
//! first is `worked_example_map_form` in `events/tests.rs` (the spec §1.9 bytes).

mod msgpack;

use msgpack::{
    write_array_len, write_bin, write_f64, write_int, write_map16_len, write_map_len, write_nil, write_str, write_uint,
};

/// Which event encoding to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireFormat {
    /// vLLM >= 0.24: events as tagged maps (`{"type": "BlockStored", ...}`).
    #[default]
    Map,
    /// vLLM <= 0.23: events as tagged arrays (`["BlockStored", ...]`, 0.23 field set).
    Array,
}

/// One value inside a block's untagged extra keys (LoRA name, `[mm_identifier, offset]`,
/// cache salt, prompt-embeds digest; spec §1.8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtraKey {
    /// msgpack `nil`.
    Nil,
    /// Integer (e.g. a multimodal offset).
    Int(i64),
    /// String (LoRA name, multimodal identifier, cache salt).
    Str(String),
    /// Binary (prompt-embeds digest).
    Bin(Vec<u8>),
    /// Nested array (e.g. `[mm_identifier, offset]`).
    Array(Vec<ExtraKey>),
}

/// `BlockStored`: full blocks became prefix-cached (spec §1.5, §1.7).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockStored {
    /// One hash per stored block, in token order (vLLM's digest as u64, spec §1.8).
    pub block_hashes: Vec<u64>,
    /// Hash of the block before `block_hashes[0]`; `None` when the first block starts at token 0.
    pub parent_block_hash: Option<u64>,
    /// Tokens covered by the event, concatenated.
    pub token_ids: Vec<u32>,
    /// Tokens per block.
    pub block_size: u32,
    /// Deprecated LoRA int id.
    pub lora_id: Option<i64>,
    /// Storage tier, `"GPU"` for the engine's own KV cache.
    pub medium: Option<String>,
    /// LoRA adapter name.
    pub lora_name: Option<String>,
    /// Per-block extra hash inputs, untagged: one entry per block, each `nil` or an array.
    /// Omitted from the map form when `None`.
    pub extra_keys: Option<Vec<Option<Vec<ExtraKey>>>>,
    /// KV-cache group index. Omitted from the map form when `None`.
    pub group_idx: Option<u32>,
    /// KV-cache spec kind (`"full_attention"`, ...). Omitted from the map form when `None`.
    pub kv_cache_spec_kind: Option<String>,
    /// Sliding-window size. Omitted from the map form when `None`.
    pub kv_cache_spec_sliding_window: Option<u32>,
}

/// `BlockRemoved`: blocks evicted from the prefix cache.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockRemoved {
    /// Evicted hashes (vLLM sends one per event).
    pub block_hashes: Vec<u64>,
    /// Storage tier.
    pub medium: Option<String>,
    /// KV-cache group index. Omitted from the map form when `None`.
    pub group_idx: Option<u32>,
}

/// One KV-cache event (msgspec tagged union, tag field `"type"` = class name).
#[derive(Debug, Clone, PartialEq)]
pub enum KvEvent {
    /// See [`BlockStored`].
    BlockStored(BlockStored),
    /// See [`BlockRemoved`].
    BlockRemoved(BlockRemoved),
    /// The whole prefix cache was reset.
    AllBlocksCleared,
}

/// One published batch (`KVEventBatch`, array-like): the payload frame of a ZMQ message.
#[derive(Debug, Clone, PartialEq)]
pub struct KvEventBatch {
    /// Seconds since the Unix epoch at publish.
    pub ts: f64,
    /// Events in scheduler order.
    pub events: Vec<KvEvent>,
    /// Publisher's data-parallel rank (vLLM always fills it; `None` is written as `nil`).
    pub data_parallel_rank: Option<i64>,
}

/// Declared field count (tag included) of vLLM 0.33's `BlockStored`: type, block_hashes,
/// parent_block_hash, token_ids, block_size, lora_id, medium, lora_name, extra_keys, group_idx,
/// kv_cache_spec_kind, kv_cache_spec_sliding_window, locality, ownership, session_id,
/// lookahead_token_ids. Above 15, so msgspec always uses a map16 header.
#[cfg_attr(not(test), allow(dead_code))] // documents the map16 choice; asserted in tests
const BLOCK_STORED_DECLARED_FIELDS: usize = 16;

/// Appends the msgpack encoding of `batch` to `out`, byte-identical to msgspec's encoding of the
/// same vLLM structs (0.33 for [`WireFormat::Map`], 0.23 for [`WireFormat::Array`]).
pub fn encode_batch(batch: &KvEventBatch, format: WireFormat, out: &mut Vec<u8>) {
    write_array_len(out, 3);
    write_f64(out, batch.ts);
    write_array_len(out, batch.events.len());
    for event in &batch.events {
        match format {
            WireFormat::Map => encode_event_map(event, out),
            WireFormat::Array => encode_event_array(event, out),
        }
    }
    write_opt(out, batch.data_parallel_rank, write_int);
}

fn encode_event_map(event: &KvEvent, out: &mut Vec<u8>) {
    match event {
        KvEvent::BlockStored(e) => {
            let optional = usize::from(e.extra_keys.is_some())
                + usize::from(e.group_idx.is_some())
                + usize::from(e.kv_cache_spec_kind.is_some())
                + usize::from(e.kv_cache_spec_sliding_window.is_some());
            let n = 8 + optional;
            // msgspec sizes the header for BLOCK_STORED_DECLARED_FIELDS (> 15): always map16.
            write_map16_len(out, n);
            tag(out, "BlockStored");
            write_str(out, "block_hashes");
            write_hashes(out, &e.block_hashes);
            write_str(out, "parent_block_hash");
            write_opt(out, e.parent_block_hash, write_uint);
            write_str(out, "token_ids");
            write_tokens(out, &e.token_ids);
            write_str(out, "block_size");
            write_uint(out, u64::from(e.block_size));
            write_str(out, "lora_id");
            write_opt(out, e.lora_id, write_int);
            write_str(out, "medium");
            write_opt_str(out, e.medium.as_deref());
            write_str(out, "lora_name");
            write_opt_str(out, e.lora_name.as_deref());
            if let Some(keys) = &e.extra_keys {
                write_str(out, "extra_keys");
                write_extra_keys(out, keys);
            }
            if let Some(g) = e.group_idx {
                write_str(out, "group_idx");
                write_uint(out, u64::from(g));
            }
            if let Some(kind) = &e.kv_cache_spec_kind {
                write_str(out, "kv_cache_spec_kind");
                write_str(out, kind);
            }
            if let Some(w) = e.kv_cache_spec_sliding_window {
                write_str(out, "kv_cache_spec_sliding_window");
                write_uint(out, u64::from(w));
            }
        }
        KvEvent::BlockRemoved(e) => {
            write_map_len(out, 3 + usize::from(e.group_idx.is_some()));
            tag(out, "BlockRemoved");
            write_str(out, "block_hashes");
            write_hashes(out, &e.block_hashes);
            write_str(out, "medium");
            write_opt_str(out, e.medium.as_deref());
            if let Some(g) = e.group_idx {
                write_str(out, "group_idx");
                write_uint(out, u64::from(g));
            }
        }
        KvEvent::AllBlocksCleared => {
            write_map_len(out, 1);
            tag(out, "AllBlocksCleared");
        }
    }
}

fn encode_event_array(event: &KvEvent, out: &mut Vec<u8>) {
    match event {
        KvEvent::BlockStored(e) => {
            write_array_len(out, 12);
            write_str(out, "BlockStored");
            write_hashes(out, &e.block_hashes);
            write_opt(out, e.parent_block_hash, write_uint);
            write_tokens(out, &e.token_ids);
            write_uint(out, u64::from(e.block_size));
            write_opt(out, e.lora_id, write_int);
            write_opt_str(out, e.medium.as_deref());
            write_opt_str(out, e.lora_name.as_deref());
            match &e.extra_keys {
                Some(keys) => write_extra_keys(out, keys),
                None => write_nil(out),
            }
            write_opt(out, e.group_idx.map(u64::from), write_uint);
            write_opt_str(out, e.kv_cache_spec_kind.as_deref());
            write_opt(out, e.kv_cache_spec_sliding_window.map(u64::from), write_uint);
        }
        KvEvent::BlockRemoved(e) => {
            write_array_len(out, 4);
            write_str(out, "BlockRemoved");
            write_hashes(out, &e.block_hashes);
            write_opt_str(out, e.medium.as_deref());
            write_opt(out, e.group_idx.map(u64::from), write_uint);
        }
        KvEvent::AllBlocksCleared => {
            write_array_len(out, 1);
            write_str(out, "AllBlocksCleared");
        }
    }
}

fn tag(out: &mut Vec<u8>, name: &str) {
    write_str(out, "type");
    write_str(out, name);
}

fn write_hashes(out: &mut Vec<u8>, hashes: &[u64]) {
    write_array_len(out, hashes.len());
    for &h in hashes {
        write_uint(out, h);
    }
}

fn write_tokens(out: &mut Vec<u8>, tokens: &[u32]) {
    write_array_len(out, tokens.len());
    for &t in tokens {
        write_uint(out, u64::from(t));
    }
}

fn write_opt<T>(out: &mut Vec<u8>, v: Option<T>, write: fn(&mut Vec<u8>, T)) {
    match v {
        Some(v) => write(out, v),
        None => write_nil(out),
    }
}

fn write_opt_str(out: &mut Vec<u8>, v: Option<&str>) {
    match v {
        Some(s) => write_str(out, s),
        None => write_nil(out),
    }
}

/// The extra hash ([`crate::hash::extra_hash`]) of one block's extra keys, from the msgpack bytes
/// an engine's event carries for them (`extra_keys[i]`). A router computes a request's own:
/// vLLM keys a request's first block by its `cache_salt` as `[salt]` (after a LoRA name, if
/// any), so `extra_keys_hash(&[ExtraKey::Str(salt)])` is what the subscriber derives from that
/// block's event.
pub fn extra_keys_hash(keys: &[ExtraKey]) -> u64 {
    let mut out = Vec::with_capacity(16);
    write_array_len(&mut out, keys.len());
    keys.iter().for_each(|k| write_extra_key(&mut out, k));
    crate::hash::extra_hash(&out)
}

fn write_extra_keys(out: &mut Vec<u8>, keys: &[Option<Vec<ExtraKey>>]) {
    write_array_len(out, keys.len());
    for block in keys {
        match block {
            Some(values) => {
                write_array_len(out, values.len());
                values.iter().for_each(|v| write_extra_key(out, v));
            }
            None => write_nil(out),
        }
    }
}

fn write_extra_key(out: &mut Vec<u8>, key: &ExtraKey) {
    match key {
        ExtraKey::Nil => write_nil(out),
        ExtraKey::Int(i) => write_int(out, *i),
        ExtraKey::Str(s) => write_str(out, s),
        ExtraKey::Bin(b) => write_bin(out, b),
        ExtraKey::Array(items) => {
            write_array_len(out, items.len());
            items.iter().for_each(|v| write_extra_key(out, v));
        }
    }
}

#[cfg(test)]
mod tests;
