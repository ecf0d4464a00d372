//! Per-thread encoding cache: text is split at special tokens, and each piece between two
//! special tokens is encoded once and remembered.
//!
//! Why this is exact: a Hugging Face tokenizer extracts added tokens first and encodes every
//! piece between them on its own (normalizer, pre-tokenizer and model run per piece), and the
//! built-in tokenizer does the same with its special tokens. So the ids of a text are the ids of
//! its pieces and special tokens, in order. Chat prompts are pieces between `<|im_start|>` /
//! `<|im_end|>`-like markers: a system prompt or an earlier turn is the same piece in every
//! request, so multi-turn conversations and shared system prompts are encoded once per thread.
//!
//! Only special tokens that match verbatim split (not `normalized`, no `lstrip` / `rstrip` /
//! `single_word`); pieces are never encoded with `add_special_tokens`. A tokenizer whose
//! pre-tokenizer still treats the first piece differently (Metaspace `prepend_scheme: first`)
//! fails [`Tokenizer`]'s self-check at load and is then encoded whole, uncached.
//!
//! Eviction: two generations. Hits in the old generation move to the new one; when the new one
//! holds `capacity_tokens` ids, the old one is dropped and the new one becomes old. So the cache
//! holds at most twice its capacity, and anything used since the last turnover survives it.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Pieces shorter than this (in bytes) are encoded directly: caching them costs more than it saves.
pub const MIN_CACHED_PIECE: usize = 32;

/// Keys are already xxh3-128 digests: the map's hasher just takes their low bits.
#[derive(Debug, Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes.iter().take(8) {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

type Map = HashMap<u128, Box<[u32]>, BuildHasherDefault<DigestHasher>>;

/// A bounded cache of encoded pieces; keep one per thread (it is not shared).
#[derive(Debug)]
pub struct EncodeCache {
    young: Map,
    old: Map,
    young_tokens: usize,
    capacity_tokens: usize,
    hits: u64,
    misses: u64,
}

impl Default for EncodeCache {
    /// Room for 1 M token ids per generation (4 MiB).
    fn default() -> Self {
        EncodeCache::with_capacity_tokens(1 << 20)
    }
}

impl EncodeCache {
    /// A cache keeping about `capacity_tokens` ids per generation.
    pub fn with_capacity_tokens(capacity_tokens: usize) -> Self {
        EncodeCache {
            young: Map::default(),
            old: Map::default(),
            young_tokens: 0,
            capacity_tokens: capacity_tokens.max(1),
            hits: 0,
            misses: 0,
        }
    }

    /// Pieces found, and pieces encoded, so far.
    pub fn hits_misses(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }

    /// The ids of `piece`, encoding it with `encode` on a miss.
    pub(crate) fn piece<E>(
        &mut self,
        piece: &str,
        out: &mut Vec<u32>,
        encode: impl FnOnce(&str) -> Result<Vec<u32>, E>,
    ) -> Result<(), E> {
        let key = xxhash_rust::xxh3::xxh3_128(piece.as_bytes());
        if let Some(ids) = self.young.get(&key) {
            self.hits += 1;
            out.extend_from_slice(ids);
            return Ok(());
        }
        let ids = match self.old.remove(&key) {
            Some(ids) => {
                self.hits += 1;
                ids
            }
            None => {
                self.misses += 1;
                encode(piece)?.into_boxed_slice()
            }
        };
        out.extend_from_slice(&ids);
        if self.young_tokens + ids.len() > self.capacity_tokens {
            self.old = std::mem::take(&mut self.young);
            self.young_tokens = 0;
        }
        self.young_tokens += ids.len();
        self.young.insert(key, ids);
        Ok(())
    }
}
