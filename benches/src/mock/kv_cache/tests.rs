//! Block pool: LRU order, prefix hits, eviction events, duplicates, reset.

use gantry_kvindex::events::KvEvent;

use super::*;

fn h(n: u8) -> BlockHash {
    BlockHash { digest: [n; 32], external: u64::from(n) }
}

fn stored(ev: &[KvEvent]) -> Vec<u64> {
    ev.iter()
        .filter_map(|e| match e {
            KvEvent::BlockStored(s) => Some(s.block_hashes.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn removed(ev: &[KvEvent]) -> Vec<u64> {
    ev.iter()
        .filter_map(|e| match e {
            KvEvent::BlockRemoved(r) => Some(r.block_hashes.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn allocate_free_and_usage() {
    let mut c = KvCache::new(5, 2, true, true);
    assert_eq!(c.capacity(), 4);
    let mut a = Vec::new();
    c.allocate(3, &mut a).unwrap();
    assert_eq!(c.num_free(), 1);
    assert!((c.usage() - 0.75).abs() < 1e-9);
    assert_eq!(c.allocate(2, &mut a), Err(OutOfBlocks));
    assert_eq!(a.len(), 3, "a failed allocation takes nothing");
    c.free(&a);
    assert_eq!(c.num_free(), 4);
    assert!(!a.contains(&0), "the null block is never handed out");
}

#[test]
fn cached_blocks_hit_until_evicted_tail_first() {
    let mut c = KvCache::new(5, 2, true, true);
    let mut a = Vec::new();
    c.allocate(3, &mut a).unwrap();
    c.cache_blocks(&a, &[h(1), h(2), h(3)], None, &[1, 2, 3, 4, 5, 6], None, None);
    let ev = c.take_events();
    assert_eq!(ev.len(), 1, "one BlockStored per cache call");
    assert_eq!(stored(&ev), [1, 2, 3]);
    c.free(&a);
    assert_eq!(c.longest_prefix(&[h(1), h(2), h(3), h(4)], 10), 3);
    assert_eq!(c.longest_prefix(&[h(1), h(2), h(3)], 2), 2, "max caps the hit");
    // One free uncached block exists; allocating 2 evicts one cached block: the tail (h3).
    let mut b = Vec::new();
    c.allocate(2, &mut b).unwrap();
    assert_eq!(removed(&c.take_events()), [3]);
    assert_eq!(c.longest_prefix(&[h(1), h(2), h(3)], 10), 2);
    // Touching a free cached block takes it off the free queue.
    let mut t = Vec::new();
    c.touch_prefix(&[h(1)], 1, &mut t);
    assert_eq!(c.num_free(), 1);
    c.free(&t);
    c.free(&b);
    assert_eq!(c.num_free(), 4);
}

#[test]
fn duplicates_are_announced_and_removed_per_copy() {
    let mut c = KvCache::new(3, 1, true, true);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    c.allocate(1, &mut a).unwrap();
    c.allocate(1, &mut b).unwrap();
    c.cache_blocks(&a, &[h(7)], None, &[1], None, None);
    c.cache_blocks(&b, &[h(7)], None, &[1], None, None);
    assert_eq!(stored(&c.take_events()), [7, 7]);
    c.free(&a);
    c.free(&b);
    let mut x = Vec::new();
    c.allocate(1, &mut x).unwrap();
    assert_eq!(removed(&c.take_events()), [7]);
    assert_eq!(c.longest_prefix(&[h(7)], 1), 1, "the other copy still hits");
    c.allocate(1, &mut x).unwrap();
    assert_eq!(removed(&c.take_events()), [7]);
    assert_eq!(c.longest_prefix(&[h(7)], 1), 0);
}

#[test]
fn reset_needs_every_block_free() {
    let mut c = KvCache::new(4, 1, true, true);
    let mut a = Vec::new();
    c.allocate(1, &mut a).unwrap();
    c.cache_blocks(&a, &[h(1)], None, &[9], None, None);
    let _ = c.take_events();
    assert_eq!(c.reset(), Err(1));
    assert!(c.take_events().is_empty());
    c.free(&a);
    assert_eq!(c.reset(), Ok(()));
    assert!(matches!(c.take_events()[..], [KvEvent::AllBlocksCleared]));
    assert_eq!(c.longest_prefix(&[h(1)], 1), 0);
}

#[test]
fn prefix_caching_off_never_hits_or_announces() {
    let mut c = KvCache::new(4, 1, false, true);
    let mut a = Vec::new();
    c.allocate(1, &mut a).unwrap();
    c.cache_blocks(&a, &[h(1)], None, &[9], None, None);
    assert!(c.take_events().is_empty());
    assert_eq!(c.longest_prefix(&[h(1)], 1), 0);
}

/// Random operations against a plain model: free-block accounting and the cached set agree.
#[test]
fn random_operations_keep_accounting_consistent() {
    let mut rng = fastrand::Rng::with_seed(7);
    let mut c = KvCache::new(33, 1, true, true);
    let mut held: Vec<Vec<BlockId>> = Vec::new();
    let mut next_hash = 1u8;
    for _ in 0..5000 {
        if rng.bool() && !held.is_empty() {
            let i = rng.usize(..held.len());
            c.free(&held.swap_remove(i));
        } else {
            let n = rng.usize(1..4);
            let mut b = Vec::new();
            if c.allocate(n, &mut b).is_ok() {
                let hashes: Vec<BlockHash> = (0..n)
                    .map(|_| {
                        next_hash = next_hash.wrapping_add(1).max(1);
                        h(next_hash)
                    })
                    .collect();
                let tokens = vec![0u32; n];
                c.cache_blocks(&b, &hashes, None, &tokens, None, None);
                held.push(b);
            }
        }
        let used: usize = held.iter().map(Vec::len).sum();
        assert_eq!(c.num_free() + used, c.capacity());
        let _ = c.take_events();
    }
}

#[test]
fn many_copies_of_one_hash_are_removed_in_any_order() {
    let mut c = KvCache::new(9, 1, true, false);
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut b = Vec::new();
        c.allocate(1, &mut b).unwrap();
        c.cache_blocks(&b, &[h(9)], None, &[1], None, None);
        held.push(b);
    }
    // Free in a scrambled order; the free queue then evicts them in that order.
    for i in [3, 0, 7, 5, 1, 6, 2, 4] {
        c.free(&held[i]);
    }
    for left in (0..8).rev() {
        let mut x = Vec::new();
        c.allocate(1, &mut x).unwrap();
        assert_eq!(c.longest_prefix(&[h(9)], 1), usize::from(left > 0), "{left} copies left");
    }
}
