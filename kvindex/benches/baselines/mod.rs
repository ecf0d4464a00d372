//! The baselines the index is measured against, in the same run:
//!
//! * [`LockedMap`]: `RwLock<HashMap<block, engine set>>` (hashbrown's default hasher, engine
//!   sets as fixed bit sets), the obvious shared-memory-free design;
//! * [`RadixTree`]: a prefix tree of the reference router's shape (Dynamo's `RadixTree`: nodes
//!   with a child map keyed by block hash and a set of engines, plus a per-engine lookup table
//!   from block hash to node for removals), behind an `RwLock` when shared.
//!
//! Both compute the same answer as `IndexReader::overlaps`: per engine, the number of leading
//! blocks it holds.

#![allow(dead_code)] // each bench binary uses a subset

use hashbrown::{HashMap, HashSet};

/// `HashMap<block, engine bit set>`; callers wrap it in an `RwLock` to share it.
pub struct LockedMap {
    map: HashMap<u64, Box<[u64]>>,
    words: usize,
}

impl LockedMap {
    pub fn new(engine_slots: usize) -> Self {
        LockedMap { map: HashMap::new(), words: engine_slots.div_ceil(64) }
    }

    pub fn store(&mut self, engine: u16, hash: u64) {
        let words = self.words;
        let set = self.map.entry(hash).or_insert_with(|| vec![0; words].into_boxed_slice());
        set[engine as usize / 64] |= 1 << (engine % 64);
    }

    pub fn remove(&mut self, engine: u16, hash: u64) {
        if let Some(set) = self.map.get_mut(&hash) {
            set[engine as usize / 64] &= !(1 << (engine % 64));
            if set.iter().all(|&w| w == 0) {
                self.map.remove(&hash);
            }
        }
    }

    /// Per-engine overlap depths, written as (engine, depth) pairs into `out`.
    pub fn overlaps(&self, hashes: &[u64], out: &mut Vec<(u16, u32)>) -> u32 {
        out.clear();
        let mut active: Vec<u64> = Vec::new();
        let mut depth = 0;
        for (i, h) in hashes.iter().enumerate() {
            let Some(set) = self.map.get(h) else { break };
            if i == 0 {
                active.extend_from_slice(set);
            } else {
                for (w, (a, s)) in active.iter_mut().zip(set.iter()).enumerate() {
                    let mut gone = *a & !s;
                    while gone != 0 {
                        out.push(((w * 64) as u16 + gone.trailing_zeros() as u16, i as u32));
                        gone &= gone - 1;
                    }
                    *a &= s;
                }
            }
            if active.iter().all(|&w| w == 0) {
                break;
            }
            depth = i + 1;
        }
        for (w, &a) in active.iter().enumerate() {
            let mut a = a;
            while a != 0 {
                out.push(((w * 64) as u16 + a.trailing_zeros() as u16, depth as u32));
                a &= a - 1;
            }
        }
        depth as u32
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }
}

struct Node {
    children: HashMap<u64, u32>,
    engines: HashSet<u16>,
}

/// A radix tree of the reference's shape (see the module docs).
pub struct RadixTree {
    nodes: Vec<Node>,
    free: Vec<u32>,
    /// engine → block hash → node, as the reference keeps for removals.
    lookup: HashMap<u16, HashMap<u64, u32>>,
    parent: Vec<(u32, u64)>,
}

impl Default for RadixTree {
    fn default() -> Self {
        Self::new()
    }
}

impl RadixTree {
    pub fn new() -> Self {
        RadixTree {
            nodes: vec![Node { children: HashMap::new(), engines: HashSet::new() }],
            free: Vec::new(),
            lookup: HashMap::new(),
            parent: vec![(0, 0)],
        }
    }

    /// Stores a chain of blocks for `engine`, starting under `parent_hash` (None = root).
    pub fn store_chain(&mut self, engine: u16, parent_hash: Option<u64>, hashes: &[u64]) {
        let mut node = match parent_hash {
            None => 0,
            Some(p) => match self.lookup.get(&engine).and_then(|m| m.get(&p)) {
                Some(&n) => n,
                None => return, // unknown parent: the reference drops the event
            },
        };
        for &h in hashes {
            let child = match self.nodes[node as usize].children.get(&h) {
                Some(&c) => c,
                None => {
                    let n = Node { children: HashMap::new(), engines: HashSet::new() };
                    let id = match self.free.pop() {
                        Some(id) => {
                            self.nodes[id as usize] = n;
                            self.parent[id as usize] = (node, h);
                            id
                        }
                        None => {
                            self.nodes.push(n);
                            self.parent.push((node, h));
                            (self.nodes.len() - 1) as u32
                        }
                    };
                    self.nodes[node as usize].children.insert(h, id);
                    id
                }
            };
            self.nodes[child as usize].engines.insert(engine);
            self.lookup.entry(engine).or_default().insert(h, child);
            node = child;
        }
    }

    pub fn remove(&mut self, engine: u16, hash: u64) {
        let Some(node) = self.lookup.get_mut(&engine).and_then(|m| m.remove(&hash)) else { return };
        let n = &mut self.nodes[node as usize];
        n.engines.remove(&engine);
        if n.engines.is_empty() && n.children.is_empty() {
            let (parent, h) = self.parent[node as usize];
            self.nodes[parent as usize].children.remove(&h);
            self.free.push(node);
        }
    }

    /// Per-engine overlap depths, as the reference's `find_matches` computes them: walk the tree
    /// along the prompt, counting for each engine the consecutive nodes holding it.
    pub fn overlaps(&self, hashes: &[u64]) -> HashMap<u16, u32> {
        let mut scores: HashMap<u16, u32> = HashMap::new();
        let mut node = 0u32;
        for (depth, h) in hashes.iter().enumerate() {
            let Some(&child) = self.nodes[node as usize].children.get(h) else { break };
            let n = &self.nodes[child as usize];
            if n.engines.is_empty() {
                break;
            }
            for &e in &n.engines {
                let s = scores.entry(e).or_insert(0);
                if *s == depth as u32 {
                    *s += 1;
                }
            }
            node = child;
        }
        scores.retain(|_, s| *s > 0);
        scores
    }
}
