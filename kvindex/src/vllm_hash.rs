//! vLLM's prefix-cache block hash (`hash_block_tokens`), reproduced byte-for-byte (spec §1.8).
//!
//! `hash(block_i) = SHA-256(serialize((parent_digest, tuple(token_ids), None)))`, where the parent
//! of the first block is `NONE_HASH = SHA-256(serialize("vllm-none-hash"))` and `serialize` is
//! Python's `pickle.dumps(.., protocol=5)` ([`VllmHashAlgo::Sha256`], vLLM's default) or
//! `cbor2.dumps(.., canonical=True)` ([`VllmHashAlgo::Sha256Cbor`]). Events carry
//! [`digest_to_u64`] of each digest. Of the extra keys, a LoRA adapter (`("lora", name, path)`,
//! every block) and a request's `cache_salt` (`("cache_salt", salt)`, first block only) are
//! covered, in vLLM's order ([`hash_block_keyed`]); multimodal and prompt-embeds blocks are not,
//! and the seed assumes `PYTHONHASHSEED` is unset on vLLM >= 0.33.

mod cbor;
mod pickle;

use sha2::{Digest, Sha256};

/// vLLM's seed for `NONE_HASH` when `PYTHONHASHSEED` is unset (vLLM >= PR #51875).
pub const NONE_HASH_SEED: &str = "vllm-none-hash";

/// `--prefix-caching-hash-algo` values with a SHA-256 digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VllmHashAlgo {
    /// `sha256`: pickle protocol 5, then SHA-256 (vLLM's default).
    #[default]
    Sha256,
    /// `sha256_cbor`: canonical CBOR, then SHA-256.
    Sha256Cbor,
}

/// One of a block's extra hash keys, as vLLM's `generate_block_hash_extra_keys` builds them (a
/// block's keys go in this order: the adapter, then the salt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VllmExtraKey<'a> {
    /// `("lora", lora_name, lora_path)`: every block of a LoRA request.
    Lora {
        /// The adapter's name (`--lora-modules NAME=PATH`).
        name: &'a str,
        /// Its path.
        path: &'a str,
    },
    /// `("cache_salt", salt)`: a salted request's first block.
    CacheSalt(&'a str),
}

/// `NONE_HASH`: the digest used as parent of a sequence's first block.
pub fn none_hash(algo: VllmHashAlgo) -> [u8; 32] {
    let input = match algo {
        VllmHashAlgo::Sha256 => pickle::dumps_str(NONE_HASH_SEED),
        VllmHashAlgo::Sha256Cbor => cbor::dumps_str(NONE_HASH_SEED),
    };
    Sha256::digest(&input).into()
}

/// Digest of one full block: `H((parent, tuple(token_ids), None))` (no extra keys).
pub fn hash_block(algo: VllmHashAlgo, parent: &[u8; 32], token_ids: &[u32]) -> [u8; 32] {
    hash_block_salted(algo, parent, token_ids, None)
}

/// Digest of one full block with the request's cache salt as its extra keys (vLLM passes the salt
/// for a request's first block only): `H((parent, tuple(token_ids), (("cache_salt", salt),)))`.
/// `None` is [`hash_block`].
pub fn hash_block_salted(algo: VllmHashAlgo, parent: &[u8; 32], token_ids: &[u32], salt: Option<&str>) -> [u8; 32] {
    match salt {
        Some(salt) => hash_block_keyed(algo, parent, token_ids, &[VllmExtraKey::CacheSalt(salt)]),
        None => hash_block_keyed(algo, parent, token_ids, &[]),
    }
}

/// Digest of one full block with its extra keys: `H((parent, tuple(token_ids), tuple(keys)))`,
/// or `H((parent, tuple(token_ids), None))` without any. `keys` has vLLM's shape: at most one
/// adapter, then at most one salt. (The pickle writes every string out; CPython would refer back
/// to a string object it already wrote, as for a one-character adapter name equal to its path.)
pub fn hash_block_keyed(
    algo: VllmHashAlgo,
    parent: &[u8; 32],
    token_ids: &[u32],
    keys: &[VllmExtraKey<'_>],
) -> [u8; 32] {
    debug_assert!(
        matches!(
            keys,
            [] | [VllmExtraKey::Lora { .. }]
                | [VllmExtraKey::CacheSalt(_)]
                | [VllmExtraKey::Lora { .. }, VllmExtraKey::CacheSalt(_)]
        ),
        "hash_block_keyed: keys are at most an adapter then a salt, got {keys:?}"
    );
    Sha256::digest(serialize(algo, parent, token_ids, keys)).into()
}

/// Chained digests of every *full* block of `token_ids` (a trailing partial block is not hashed,
/// as in vLLM), starting from [`none_hash`].
///
/// # Panics
/// If `block_size` is 0.
pub fn hash_blocks(algo: VllmHashAlgo, token_ids: &[u32], block_size: usize) -> Vec<[u8; 32]> {
    assert!(block_size > 0, "vllm_hash::hash_blocks: block_size must be > 0");
    let mut parent = none_hash(algo);
    token_ids
        .chunks_exact(block_size)
        .map(|block| {
            parent = hash_block(algo, &parent, block);
            parent
        })
        .collect()
}

/// The event form of a digest: its last 8 bytes, big-endian (`int.from_bytes(d, "big") & (2**64-1)`).
pub fn digest_to_u64(d: &[u8; 32]) -> u64 {
    let mut tail = [0u8; 8];
    tail.copy_from_slice(&d[24..]);
    u64::from_be_bytes(tail)
}

/// The exact bytes vLLM hashes for a block (exposed for tests and debugging).
pub fn serialize_block(algo: VllmHashAlgo, parent: &[u8; 32], token_ids: &[u32]) -> Vec<u8> {
    serialize(algo, parent, token_ids, &[])
}

fn serialize(algo: VllmHashAlgo, parent: &[u8; 32], token_ids: &[u32], keys: &[VllmExtraKey<'_>]) -> Vec<u8> {
    match algo {
        VllmHashAlgo::Sha256 => pickle::dumps_block(parent, token_ids, keys),
        VllmHashAlgo::Sha256Cbor => cbor::dumps_block(parent, token_ids, keys),
    }
}

#[cfg(test)]
mod tests;
