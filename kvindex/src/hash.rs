//! Gantry's block hash: chained xxh3-64 over each full block's token ids.
//!
//! The router never depends on vLLM's own block hash (spec §1.8): the proxy hashes a request's
//! tokens, and the index writer hashes the `token_ids` of every `BlockStored` event, with this
//! one function, so equal prefixes give equal chains on both sides.
//!
//! ```text
//! h[-1] = seed
//! h[i]  = xxh3_64_with_seed(le_bytes(tokens[i*bs .. (i+1)*bs]), h[i-1] ^ extra[i])
//! ```
//!
//! * Only full blocks are hashed; a trailing partial block has no hash (vLLM caches full blocks).
//! * `extra[i]` is 0 for a plain block. A block with extra hash inputs (LoRA name, cache salt,
//!   multimodal identifiers: vLLM's untagged `extra_keys`, spec §1.8) mixes in
//!   [`extra_hash`] of their msgpack encoding, so the same tokens under another LoRA adapter or
//!   salt hash differently. Because every hash seeds the next one, the extra key of block `i`
//!   changes every later hash too, as it does in vLLM.
//! * Tokens are hashed as little-endian `u32`s.
//!
//! Equal `(seed, tokens[..n*bs], extras[..n])` give equal `h[0..n]`; a difference in any token
//! of block `i` changes `h[i]` and every hash after it (up to xxh3's 64-bit collision rate).

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Seed of the first block's chain when none is configured (the reference router's value).
pub const DEFAULT_SEED: u64 = 1337;

/// Hash of one full block given its parent's hash (`seed` for the first block).
#[inline]
pub fn block_hash(parent: u64, tokens: &[u32], extra: u64) -> u64 {
    // Blocks are small (16 tokens typically): hash from a stack copy so no allocation happens.
    let mut buf = [0u8; 256];
    if tokens.len() * 4 <= buf.len() {
        for (dst, t) in buf.chunks_exact_mut(4).zip(tokens) {
            dst.copy_from_slice(&t.to_le_bytes());
        }
        xxh3_64_with_seed(&buf[..tokens.len() * 4], parent ^ extra)
    } else {
        let mut h = xxhash_rust::xxh3::Xxh3::with_seed(parent ^ extra);
        for chunk in tokens.chunks(64) {
            for (dst, t) in buf.chunks_exact_mut(4).zip(chunk) {
                dst.copy_from_slice(&t.to_le_bytes());
            }
            h.update(&buf[..chunk.len() * 4]);
        }
        h.digest()
    }
}

/// Hash of a block's extra keys: xxh3-64 of their msgpack encoding (exactly the bytes of the
/// event's `extra_keys[i]` array). Never 0, so "no extra keys" (0) stays distinct.
#[inline]
pub fn extra_hash(msgpack: &[u8]) -> u64 {
    xxh3_64_with_seed(msgpack, 0x6761_6e74_7279).max(1)
}

/// A block's *chain position*: where the index places it (near its parent, see
/// `index::table`, whose buckets span 4 positions). The first block of a prompt is at
/// `hash >> 8`; each next block 4–7 positions further, by its own hash:
/// `parent_pos + 4 + (hash & 3)`, so a prompt moves about one bucket per block and siblings
/// spread over neighbouring buckets. Like the hash, it depends only on the prefix, so the index
/// writer (from events) and a reader (walking a prompt) agree. Positions start below 2^56 and
/// grow by at most 7 per block, so they never wrap.
#[inline]
pub fn chain_pos(parent_pos: Option<u64>, hash: u64) -> u64 {
    match parent_pos {
        None => hash >> 8,
        Some(p) => p + 4 + (hash & 3),
    }
}

/// Appends the chain hashes of every full block of `tokens` to `out`, starting from `parent`
/// (`seed` for a prompt). `first_extra` is mixed into the first block only (a request's extra
/// keys, see [`extra_hash`]); pass 0 for none. Returns the last hash (or
/// `parent` when `tokens` holds no full block), to continue a chain.
pub fn hash_blocks(parent: u64, tokens: &[u32], block_size: usize, first_extra: u64, out: &mut Vec<u64>) -> u64 {
    hash_blocks_keyed(parent, tokens, block_size, first_extra, 0, out)
}

/// [`hash_blocks`] with `rest_extra` mixed into every block after the first (a LoRA adapter's
/// key, which vLLM puts in every block of its requests).
///
/// # Panics
/// If `block_size` is 0.
pub fn hash_blocks_keyed(
    parent: u64,
    tokens: &[u32],
    block_size: usize,
    first_extra: u64,
    rest_extra: u64,
    out: &mut Vec<u64>,
) -> u64 {
    assert!(block_size > 0, "block_size must be positive");
    let mut h = parent;
    let mut extra = first_extra;
    for block in tokens.chunks_exact(block_size) {
        h = block_hash(h, block, extra);
        extra = rest_extra;
        out.push(h);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(tokens: &[u32], bs: usize) -> Vec<u64> {
        let mut v = Vec::new();
        hash_blocks(DEFAULT_SEED, tokens, bs, 0, &mut v);
        v
    }

    #[test]
    fn equal_prefixes_give_equal_chains() {
        let a: Vec<u32> = (0..64).collect();
        let mut b = a.clone();
        b[40] = 9999; // inside block 2 (tokens 32..48) with block size 16
        let (ha, hb) = (chain(&a, 16), chain(&b, 16));
        assert_eq!(ha.len(), 4);
        assert_eq!(ha[..2], hb[..2]);
        assert_ne!(ha[2], hb[2]);
        assert_ne!(ha[3], hb[3], "a change propagates down the chain");
    }

    #[test]
    fn only_full_blocks_are_hashed() {
        let t: Vec<u32> = (0..47).collect();
        assert_eq!(chain(&t, 16).len(), 2);
        assert_eq!(chain(&t[..15], 16).len(), 0);
    }

    #[test]
    fn chain_continues_across_calls() {
        let t: Vec<u32> = (100..164).collect();
        let whole = chain(&t, 16);
        let mut parts = Vec::new();
        let mid = hash_blocks(DEFAULT_SEED, &t[..32], 16, 0, &mut parts);
        hash_blocks(mid, &t[32..], 16, 0, &mut parts);
        assert_eq!(whole, parts);
    }

    #[test]
    fn position_matters_and_seed_matters() {
        let block: Vec<u32> = (0..16).collect();
        let twice: Vec<u32> = block.iter().chain(&block).copied().collect();
        let h = chain(&twice, 16);
        assert_ne!(h[0], h[1], "the same tokens at another position hash differently");
        let mut other = Vec::new();
        hash_blocks(7, &block, 16, 0, &mut other);
        assert_ne!(other[0], h[0]);
    }

    #[test]
    fn extra_keys_change_the_first_block_and_everything_after() {
        let t: Vec<u32> = (0..32).collect();
        let plain = chain(&t, 16);
        let mut salted = Vec::new();
        hash_blocks(DEFAULT_SEED, &t, 16, extra_hash(b"\x91\xa4salt"), &mut salted);
        assert_ne!(plain[0], salted[0]);
        assert_ne!(plain[1], salted[1]);
        assert_ne!(extra_hash(b""), 0);
    }

    #[test]
    fn chain_positions_are_close_and_never_wrap() {
        let mut pos = chain_pos(None, u64::MAX);
        assert_eq!(pos, u64::MAX >> 8);
        for h in [0u64, 1, 2, 3, u64::MAX] {
            let next = chain_pos(Some(pos), h);
            assert!((4..=7).contains(&(next - pos)));
            pos = next;
        }
    }

    #[test]
    fn large_blocks_use_the_streaming_path_consistently() {
        // 64 tokens fit the stack buffer; 65 and 200 take the streaming path. Compare against a
        // direct hash of the little-endian bytes.
        for n in [16usize, 64, 65, 200] {
            let t: Vec<u32> = (0..n as u32).map(|x| x.wrapping_mul(2_654_435_761)).collect();
            let bytes: Vec<u8> = t.iter().flat_map(|x| x.to_le_bytes()).collect();
            assert_eq!(block_hash(5, &t, 3), xxh3_64_with_seed(&bytes, 5 ^ 3), "n = {n}");
        }
    }
}
