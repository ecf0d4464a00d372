//! The mock engine's paged KV cache: vLLM's block pool with prefix caching and LRU eviction.
//!
//! Mirrors vLLM's `BlockPool`: block 0 is the reserved null block; free blocks sit in one
//! queue whose head is evicted first; a freed block keeps its hash (it stays a cache hit) until
//! it is reallocated, which evicts it and emits `BlockRemoved`. Requests free their blocks in
//! reverse order, so a prefix's tail is evicted before its head. Becoming full and hashed emits
//! `BlockStored`. Two requests that compute the same block at once both keep a copy, and both
//! copies are announced and, on eviction, removed, as in vLLM.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use gantry_kvindex::events::{BlockRemoved, BlockStored, ExtraKey, KvEvent};

/// Index of a block in the pool.
pub type BlockId = u32;

const NIL: u32 = u32::MAX;

/// A full block's identity: vLLM's digest, and its 64-bit form as published in events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHash {
    /// The 32-byte digest (sha256 of the pickled or CBOR-encoded block input).
    pub digest: [u8; 32],
    /// The event form: the digest's last 8 bytes, big-endian.
    pub external: u64,
}

/// Hashes a digest key by its first 8 bytes (digests are already uniformly random).
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 ^= u64::from(*b) << (i * 8);
        }
    }
}

#[derive(Debug, Clone)]
enum Copies {
    One(BlockId),
    Many(Vec<BlockId>),
}

#[derive(Debug, Clone, Copy)]
struct Block {
    ref_cnt: u32,
    hash: Option<BlockHash>,
    prev: u32,
    next: u32,
    /// Position in its hash's `Copies::Many` list, for O(1) removal.
    copy_slot: u32,
    in_free: bool,
}

/// Why an allocation could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfBlocks;

/// The block pool.
#[derive(Debug)]
pub struct KvCache {
    block_size: usize,
    blocks: Vec<Block>,
    free_head: u32,
    free_tail: u32,
    num_free: usize,
    cached: HashMap<[u8; 32], Copies, BuildHasherDefault<DigestHasher>>,
    prefix_caching: bool,
    events: Vec<KvEvent>,
    events_enabled: bool,
}

impl KvCache {
    /// A pool of `num_blocks` blocks (block 0 reserved) of `block_size` tokens each.
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool, events_enabled: bool) -> KvCache {
        assert!(num_blocks >= 2 && block_size >= 1 && num_blocks < NIL as usize);
        let mut c = KvCache {
            block_size,
            blocks: vec![
                Block { ref_cnt: 0, hash: None, prev: NIL, next: NIL, copy_slot: 0, in_free: false };
                num_blocks
            ],
            free_head: NIL,
            free_tail: NIL,
            num_free: 0,
            cached: HashMap::default(),
            prefix_caching,
            events: Vec::new(),
            events_enabled,
        };
        c.blocks[0].ref_cnt = 1; // the null block is never free
        for id in 1..num_blocks as u32 {
            c.push_free_tail(id);
        }
        c
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Usable blocks (all but the null block).
    pub fn capacity(&self) -> usize {
        self.blocks.len() - 1
    }

    /// Blocks that can be allocated now (free, cached or not).
    pub fn num_free(&self) -> usize {
        self.num_free
    }

    /// Fraction of usable blocks held by requests, as `vllm:kv_cache_usage_perc` reports it.
    pub fn usage(&self) -> f64 {
        1.0 - self.num_free as f64 / self.capacity() as f64
    }

    /// Distinct hashes currently cached.
    pub fn num_cached_hashes(&self) -> usize {
        self.cached.len()
    }

    /// Events produced since the last call.
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.events)
    }

    /// How many leading `hashes` are cached (a prefix hit), looking at no more than `max` of them.
    pub fn longest_prefix(&self, hashes: &[BlockHash], max: usize) -> usize {
        if !self.prefix_caching {
            return 0;
        }
        hashes.iter().take(max).take_while(|h| self.cached.contains_key(&h.digest)).count()
    }

    /// How many of the cached blocks of the first `n` hashes sit in the free queue (touching
    /// them takes them out of it, so they count against the free blocks).
    pub fn free_in_prefix(&self, hashes: &[BlockHash], n: usize) -> usize {
        hashes[..n]
            .iter()
            .filter_map(|h| match self.cached.get(&h.digest) {
                Some(Copies::One(id)) => Some(*id),
                Some(Copies::Many(ids)) => ids.first().copied(),
                None => None,
            })
            .filter(|&id| self.blocks[id as usize].ref_cnt == 0)
            .count()
    }

    /// Takes a reference on the cached blocks of the first `n` hashes (which must be cached),
    /// appending them to `out`. Blocks leave the free queue while referenced.
    pub fn touch_prefix(&mut self, hashes: &[BlockHash], n: usize, out: &mut Vec<BlockId>) {
        for h in &hashes[..n] {
            let id = match self.cached.get(&h.digest) {
                Some(Copies::One(id)) => *id,
                Some(Copies::Many(ids)) => ids[0],
                None => unreachable!("touch_prefix called past the cached prefix"),
            };
            self.take_ref(id);
            out.push(id);
        }
    }

    /// Allocates `n` fresh blocks (evicting cached ones from the LRU end), appending to `out`.
    pub fn allocate(&mut self, n: usize, out: &mut Vec<BlockId>) -> Result<(), OutOfBlocks> {
        if n > self.num_free {
            return Err(OutOfBlocks);
        }
        for _ in 0..n {
            let id = self.free_head;
            self.unlink_free(id);
            self.evict_hash(id);
            self.blocks[id as usize].ref_cnt = 1;
            out.push(id);
        }
        Ok(())
    }

    /// Drops one reference on each block, last block first (so tails are evicted first).
    pub fn free(&mut self, blocks: &[BlockId]) {
        for &id in blocks.iter().rev() {
            let b = &mut self.blocks[id as usize];
            debug_assert!(b.ref_cnt > 0, "double free of block {id}");
            b.ref_cnt = b.ref_cnt.saturating_sub(1);
            if b.ref_cnt == 0 {
                self.push_free_tail(id);
            }
        }
    }

    /// Registers newly full blocks: `blocks[i]` holds the block hashed `hashes[i]`; `parent` is
    /// the hash of the block before `blocks[0]` (None at token 0) and `tokens` their tokens,
    /// concatenated; `salt` is the request's cache salt and `lora` its adapter, which vLLM
    /// reports as each block's extra keys (`[lora]` on every block, `[lora, salt]` or `[salt]` on
    /// the first) and the adapter as `lora_name`. Emits one `BlockStored` for them, as vLLM's
    /// `cache_full_blocks` does. Does nothing if prefix caching is off.
    pub fn cache_blocks(
        &mut self,
        blocks: &[BlockId],
        hashes: &[BlockHash],
        parent: Option<u64>,
        tokens: &[u32],
        salt: Option<&str>,
        lora: Option<&str>,
    ) {
        debug_assert_eq!(blocks.len(), hashes.len());
        debug_assert_eq!(tokens.len(), blocks.len() * self.block_size);
        if !self.prefix_caching || blocks.is_empty() {
            return;
        }
        for (&block, hash) in blocks.iter().zip(hashes) {
            debug_assert!(self.blocks[block as usize].hash.is_none(), "block {block} cached twice");
            self.blocks[block as usize].hash = Some(*hash);
            match self.cached.get_mut(&hash.digest) {
                None => {
                    self.cached.insert(hash.digest, Copies::One(block));
                }
                Some(Copies::One(first)) => {
                    let first = *first;
                    self.blocks[first as usize].copy_slot = 0;
                    self.blocks[block as usize].copy_slot = 1;
                    self.cached.insert(hash.digest, Copies::Many(vec![first, block]));
                }
                Some(Copies::Many(ids)) => {
                    self.blocks[block as usize].copy_slot = ids.len() as u32;
                    ids.push(block);
                }
            }
        }
        if self.events_enabled {
            self.events.push(KvEvent::BlockStored(BlockStored {
                block_hashes: hashes.iter().map(|h| h.external).collect(),
                parent_block_hash: parent,
                token_ids: tokens.to_vec(),
                block_size: self.block_size as u32,
                lora_id: None,
                medium: Some("GPU".into()),
                lora_name: lora.map(str::to_owned),
                extra_keys: Some(
                    (0..blocks.len())
                        .map(|i| {
                            let mut keys: Vec<ExtraKey> =
                                lora.map(|l| ExtraKey::Str(l.to_owned())).into_iter().collect();
                            if let (0, None, Some(salt)) = (i, parent, salt) {
                                keys.push(ExtraKey::Str(salt.to_owned()));
                            }
                            (!keys.is_empty()).then_some(keys)
                        })
                        .collect(),
                ),
                group_idx: Some(0),
                kv_cache_spec_kind: Some("full_attention".into()),
                kv_cache_spec_sliding_window: None,
            }));
        }
    }

    /// Drops every cached hash, as `POST /reset_prefix_cache` does. Fails (changing nothing)
    /// while any block is held by a request, like vLLM; on success emits `AllBlocksCleared`.
    pub fn reset(&mut self) -> Result<(), usize> {
        let used = self.capacity() - self.num_free;
        if used > 0 {
            return Err(used);
        }
        for b in &mut self.blocks {
            b.hash = None;
        }
        self.cached.clear();
        if self.events_enabled {
            self.events.push(KvEvent::AllBlocksCleared);
        }
        Ok(())
    }

    fn take_ref(&mut self, id: BlockId) {
        if self.blocks[id as usize].ref_cnt == 0 {
            self.unlink_free(id);
        }
        self.blocks[id as usize].ref_cnt += 1;
    }

    fn evict_hash(&mut self, id: BlockId) {
        let Some(hash) = self.blocks[id as usize].hash.take() else {
            return;
        };
        let remove_key = match self.cached.get_mut(&hash.digest) {
            Some(Copies::One(_)) => true,
            Some(Copies::Many(ids)) => {
                // O(1): swap the last copy into this one's slot.
                let slot = self.blocks[id as usize].copy_slot as usize;
                debug_assert_eq!(ids.get(slot), Some(&id));
                ids.swap_remove(slot);
                if let Some(&moved) = ids.get(slot) {
                    self.blocks[moved as usize].copy_slot = slot as u32;
                }
                if ids.len() == 1 {
                    let only = ids[0];
                    self.cached.insert(hash.digest, Copies::One(only));
                }
                false
            }
            None => false,
        };
        if remove_key {
            self.cached.remove(&hash.digest);
        }
        if self.events_enabled {
            self.events.push(KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![hash.external],
                medium: Some("GPU".into()),
                group_idx: Some(0),
            }));
        }
    }

    fn push_free_tail(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        debug_assert!(!b.in_free);
        b.in_free = true;
        b.prev = self.free_tail;
        b.next = NIL;
        if self.free_tail == NIL {
            self.free_head = id;
        } else {
            self.blocks[self.free_tail as usize].next = id;
        }
        self.free_tail = id;
        self.num_free += 1;
    }

    fn unlink_free(&mut self, id: BlockId) {
        let Block { prev, next, in_free, .. } = self.blocks[id as usize];
        debug_assert!(in_free, "block {id} is not free");
        if prev == NIL {
            self.free_head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.free_tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let b = &mut self.blocks[id as usize];
        b.in_free = false;
        b.prev = NIL;
        b.next = NIL;
        self.num_free -= 1;
    }
}

#[cfg(test)]
mod tests;
