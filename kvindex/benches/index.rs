//! criterion benches of the prefix index against its baselines, in the same run:
//!
//! * `lookup/*`: overlap lookups of 32-, 128- and 1,024-block prompts (all hits, each prompt held
//!   by 2 of the engines) in an index of 1 M blocks with 64, 256 and 1,024 engine slots;
//!   throughput in looked-up blocks. The prompts' hashes lie one after another in one buffer
//!   (`Queries`), as a router's freshly computed hashes sit in its cache;
//! * `apply/*`: the writer storing then removing 64-block chains in an index holding 1 M blocks
//!   (capacity 2 M: sized above the fleet's blocks, as the docs advise, so no evictions);
//!   throughput in applied block operations;
//! * `concurrent/*`: 128-block lookups in that index while another thread applies events at full
//!   speed;
//! * `trace/*`: lookups of the Mooncake conversation trace's requests (shared prefixes) in an
//!   index holding them all (needs `../shared/traces` or `$GANTRY_TRACES`; skipped without).
//!
//! Baselines (see `baselines/mod.rs`): `RwLock<HashMap<block, engine set>>` and a radix tree of the
//! reference router's shape. Run: `cargo bench -p gantry-kvindex --bench index` (about 6
//! minutes); `-- lookup` etc. to pick a group. The segment lives in /dev/shm.

mod baselines;

use baselines::{LockedMap, RadixTree};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gantry_kvindex::hash::chain_pos;
use gantry_kvindex::index::{IndexOptions, IndexWriter};
use gantry_kvindex::sink::BlockSink;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

const BLOCKS: usize = 1 << 20;

fn segment_path(name: &str) -> PathBuf {
    let dir = if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    dir.join(format!("gantry-kvindex-bench-{name}-{}", std::process::id()))
}

fn remove_segment(path: &PathBuf) {
    let _ = std::fs::remove_file(path);
    let mut lock = path.clone().into_os_string();
    lock.push(".lock");
    let _ = std::fs::remove_file(lock);
}

/// `BLOCKS` blocks as chains of `len` random hashes, each chain held by two engines.
struct Data {
    chains: Vec<Vec<u64>>,
    holders: Vec<[u16; 2]>,
    order: Vec<usize>,
}

impl Data {
    fn new(len: usize, engines: usize, seed: u64) -> Data {
        let mut rng = fastrand::Rng::with_seed(seed);
        let n = BLOCKS / len;
        let chains = (0..n).map(|_| (0..len).map(|_| rng.u64(..)).collect()).collect();
        let holders = (0..n)
            .map(|_| {
                let a = rng.u16(..engines as u16);
                let b = (a + 1 + rng.u16(..engines as u16 - 1)) % engines as u16;
                [a, b]
            })
            .collect();
        let order = (0..8192).map(|_| rng.usize(..n)).collect();
        Data { chains, holders, order }
    }
}

/// The prompts a lookup bench asks for, one after another in one buffer: a router looks up the
/// hashes it has just computed, which are in its cache, so the bench streams its queries rather
/// than chasing a pointer to each (a cache miss before the lookup starts, the same for every
/// index measured).
struct Queries {
    hashes: Vec<u64>,
    len: usize,
}

impl Queries {
    fn new(data: &Data, order: &[usize], len: usize) -> Queries {
        Queries { hashes: order.iter().flat_map(|&c| data.chains[c].iter().copied()).collect(), len }
    }

    /// Endless prompts, in order, from the first.
    fn cycle(&self) -> QueryCycle<'_> {
        QueryCycle { q: self, at: 0 }
    }
}

struct QueryCycle<'a> {
    q: &'a Queries,
    at: usize,
}

impl<'a> QueryCycle<'a> {
    fn next_prompt(&mut self) -> &'a [u64] {
        if self.at == self.q.hashes.len() {
            self.at = 0;
        }
        let p = &self.q.hashes[self.at..self.at + self.q.len];
        self.at += self.q.len;
        p
    }
}

/// A writer holding `data` (1 M blocks) in a segment of capacity `capacity`.
fn writer(path: &PathBuf, engines: usize, data: &Data, capacity: usize) -> IndexWriter {
    let opts = IndexOptions { engine_slots: engines, capacity, ..IndexOptions::default() };
    let mut w = IndexWriter::create(path, &opts).expect("create segment");
    for (chain, holders) in data.chains.iter().zip(&data.holders) {
        for &e in holders {
            w.store_chain(e, None, chain);
        }
    }
    w
}

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup");
    g.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(30);
    for engines in [64usize, 256, 1024] {
        for len in [32usize, 128, 1024] {
            let data = Data::new(len, engines, (engines * len) as u64);
            g.throughput(Throughput::Elements(len as u64));
            let path = segment_path("lookup");
            // Lookups on hits only: a full table evicts a few blocks (see `table.rs`), and a
            // prompt missing one would stop early; every bench below looks up the same prompts.
            let order: Vec<usize>;
            let queries: Queries;
            {
                let w = writer(&path, engines, &data, BLOCKS);
                let r = w.reader();
                let stats = r.stats();
                let mut out = r.new_overlaps();
                order = data
                    .order
                    .iter()
                    .copied()
                    .filter(|&c| r.overlaps(&data.chains[c], &mut out) as usize == len)
                    .collect();
                eprintln!(
                    "lookup: {engines} engines: segment {} MiB, {:.1} bytes per block; {:.1}% of sampled prompts lost a block to eviction and are left out",
                    stats.total_bytes >> 20,
                    stats.total_bytes as f64 / stats.capacity as f64,
                    100.0 * (1.0 - order.len() as f64 / data.order.len() as f64)
                );
                queries = Queries::new(&data, &order, len);
                let mut q = queries.cycle();
                g.bench_function(BenchmarkId::new(format!("gantry/{engines}e"), len), |b| {
                    b.iter(|| {
                        let d = r.overlaps(q.next_prompt(), &mut out);
                        debug_assert_eq!(d as usize, len);
                        black_box(d)
                    })
                });
            }
            remove_segment(&path);
            {
                let m = locked_map(engines, &data);
                let m = RwLock::new(m);
                let mut out = Vec::with_capacity(engines);
                let mut q = queries.cycle();
                g.bench_function(BenchmarkId::new(format!("rwlock_hashmap/{engines}e"), len), |b| {
                    b.iter(|| black_box(m.read().unwrap().overlaps(q.next_prompt(), &mut out)))
                });
            }
            {
                let mut t = RadixTree::new();
                for (chain, holders) in data.chains.iter().zip(&data.holders) {
                    for &e in holders {
                        t.store_chain(e, None, chain);
                    }
                }
                let t = RwLock::new(t);
                let mut q = queries.cycle();
                g.bench_function(BenchmarkId::new(format!("radix_tree/{engines}e"), len), |b| {
                    b.iter(|| black_box(t.read().unwrap().overlaps(q.next_prompt()).len()))
                });
            }
        }
    }
    g.finish();
}

/// The RwLock baseline holding `data`.
fn locked_map(engines: usize, data: &Data) -> LockedMap {
    let mut m = LockedMap::new(engines);
    for (chain, holders) in data.chains.iter().zip(&data.holders) {
        for &e in holders {
            chain.iter().for_each(|&h| m.store(e, h));
        }
    }
    m
}

/// Stores then removes `chain` for engine `e` in the RwLock baseline, one write lock per event
/// batch of 16 blocks, as a subscriber would take it.
fn churn_locked(m: &RwLock<LockedMap>, e: u16, chain: &[u64]) {
    for part in chain.chunks(16) {
        let mut m = m.write().unwrap();
        part.iter().for_each(|&h| m.store(e, h));
    }
    for part in chain.chunks(16) {
        let mut m = m.write().unwrap();
        part.iter().for_each(|&h| m.remove(e, h));
    }
}

/// Fresh 64-block chains to store then remove, so the index stays full and steady.
fn churn_chains(n: usize, seed: u64) -> Vec<Vec<u64>> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n).map(|_| (0..64).map(|_| rng.u64(..)).collect()).collect()
}

/// Chain positions of each chain's blocks.
fn chain_positions(chains: &[Vec<u64>]) -> Vec<Vec<u64>> {
    chains
        .iter()
        .map(|c| {
            let mut pos = None;
            c.iter()
                .map(|&h| {
                    let p = chain_pos(pos, h);
                    pos = Some(p);
                    p
                })
                .collect()
        })
        .collect()
}

fn apply(c: &mut Criterion) {
    let mut g = c.benchmark_group("apply");
    g.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3)).sample_size(30);
    let engines = 256;
    let data = Data::new(128, engines, 7);
    let churn = churn_chains(4096, 8);
    let churn_pos = chain_positions(&churn);
    g.throughput(Throughput::Elements(128)); // 64 stores + 64 removals per iteration
    let path = segment_path("apply");
    {
        let mut w = writer(&path, engines, &data, 2 * BLOCKS);
        let mut i = 0;
        g.bench_function("gantry/256e", |b| {
            b.iter(|| {
                i = (i + 1) % churn.len();
                let e = (i % engines) as u16;
                w.store_chain(e, None, &churn[i]);
                for (&h, &p) in churn[i].iter().zip(&churn_pos[i]) {
                    w.remove(e, h, p);
                }
            })
        });
    }
    remove_segment(&path);
    {
        let m = locked_map(engines, &data);
        let m = RwLock::new(m);
        let mut i = 0;
        g.bench_function("rwlock_hashmap/256e", |b| {
            b.iter(|| {
                i = (i + 1) % churn.len();
                let e = (i % engines) as u16;
                churn_locked(&m, e, &churn[i]);
            })
        });
    }
    {
        let mut t = RadixTree::new();
        for (chain, holders) in data.chains.iter().zip(&data.holders) {
            for &e in holders {
                t.store_chain(e, None, chain);
            }
        }
        let mut i = 0;
        g.bench_function("radix_tree/256e", |b| {
            b.iter(|| {
                i = (i + 1) % churn.len();
                let e = (i % engines) as u16;
                t.store_chain(e, None, &churn[i]);
                for &h in churn[i].iter().rev() {
                    t.remove(e, h);
                }
            })
        });
    }
    g.finish();
}

/// Reader throughput while a writer thread stores and removes churn chains as fast as it can.
fn concurrent(c: &mut Criterion) {
    let mut g = c.benchmark_group("concurrent");
    g.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3)).sample_size(30);
    let engines = 256;
    let len = 128;
    let data = Data::new(len, engines, 11);
    let queries = Queries::new(&data, &data.order, len);
    let churn = churn_chains(4096, 12);
    let churn_pos = chain_positions(&churn);
    g.throughput(Throughput::Elements(len as u64));
    let stop = Arc::new(AtomicBool::new(false));
    let path = segment_path("concurrent");
    {
        let w = writer(&path, engines, &data, 2 * BLOCKS);
        let r = w.reader();
        let (stop2, churn2, pos2) = (stop.clone(), churn.clone(), churn_pos.clone());
        let bg = std::thread::spawn(move || {
            let mut w = w;
            let mut ops = 0u64;
            let mut i = 0;
            while !stop2.load(Ordering::Relaxed) {
                i = (i + 1) % churn2.len();
                let e = (i % engines) as u16;
                // As events arrive: 16-block batches, each continuing the chain.
                for (k, part) in churn2[i].chunks(16).enumerate() {
                    w.store_chain(e, (k > 0).then(|| pos2[i][k * 16 - 1]), part);
                }
                for (&h, &p) in churn2[i].iter().zip(&pos2[i]) {
                    w.remove(e, h, p);
                }
                ops += 128;
            }
            ops
        });
        let mut out = r.new_overlaps();
        let mut q = queries.cycle();
        let t0 = std::time::Instant::now();
        g.bench_function("gantry/256e", |b| b.iter(|| black_box(r.overlaps(q.next_prompt(), &mut out))));
        stop.store(true, Ordering::Relaxed);
        let ops = bg.join().unwrap();
        eprintln!(
            "concurrent: gantry writer applied {:.1} M block ops/s meanwhile",
            ops as f64 / t0.elapsed().as_secs_f64() / 1e6
        );
    }
    remove_segment(&path);
    stop.store(false, Ordering::Relaxed);
    {
        let m = locked_map(engines, &data);
        let m = Arc::new(RwLock::new(m));
        let (stop2, churn2, m2) = (stop.clone(), churn.clone(), m.clone());
        let bg = std::thread::spawn(move || {
            let mut ops = 0u64;
            let mut i = 0;
            while !stop2.load(Ordering::Relaxed) {
                i = (i + 1) % churn2.len();
                let e = (i % engines) as u16;
                churn_locked(&m2, e, &churn2[i]);
                ops += 128;
            }
            ops
        });
        let mut out = Vec::with_capacity(engines);
        let mut q = queries.cycle();
        let t0 = std::time::Instant::now();
        g.bench_function("rwlock_hashmap/256e", |b| {
            b.iter(|| black_box(m.read().unwrap().overlaps(q.next_prompt(), &mut out)))
        });
        stop.store(true, Ordering::Relaxed);
        let ops = bg.join().unwrap();
        eprintln!(
            "concurrent: rwlock writer applied {:.1} M block ops/s meanwhile",
            ops as f64 / t0.elapsed().as_secs_f64() / 1e6
        );
    }
    g.finish();
}

/// The Mooncake conversation trace (`../shared/traces`, or `$GANTRY_TRACES`) as chains of
/// 16-token blocks: each of its 512-token blocks becomes 32, hashed from stand-in token ids that
/// are equal exactly when the trace's block ids are. `None` (and a message) without the trace.
fn mooncake_chains() -> Option<Vec<Vec<u64>>> {
    let dir = std::env::var_os("GANTRY_TRACES")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces"), PathBuf::from);
    let path = dir.join("mooncake_conversation_trace.jsonl");
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!("trace: {} not found (set GANTRY_TRACES): the trace group is skipped", path.display());
        return None;
    };
    let mut tokens = Vec::new();
    let chains = text
        .lines()
        .filter_map(|line| {
            let ids = line.split_once("\"hash_ids\":")?.1.split_once('[')?.1.split_once(']')?.0;
            tokens.clear();
            for id in ids.split(',').filter_map(|s| s.trim().parse::<u32>().ok()) {
                tokens.extend((0..512).map(|j| id.wrapping_mul(512).wrapping_add(j)));
            }
            let mut chain = Vec::with_capacity(tokens.len() / 16);
            gantry_kvindex::hash::hash_blocks(gantry_kvindex::hash::DEFAULT_SEED, &tokens, 16, 0, &mut chain);
            Some(chain)
        })
        .collect();
    Some(chains)
}

/// `trace/*`: the index on real shared-prefix traffic. Every Mooncake conversation starts with
/// the same system prompt, so thousands of chains share a parent and diverge at once, unlike
/// the independent chains above. Each request's chain is stored for one of 8 engines (round
/// robin) in an index sized at twice the trace's distinct blocks (64 engine slots); lookups of
/// the requests' chains, in throughput of looked-up blocks, against the RwLock baseline.
fn trace(c: &mut Criterion) {
    let Some(chains) = mooncake_chains() else { return };
    let unique: std::collections::HashSet<u64> = chains.iter().flatten().copied().collect();
    let engines = 64;
    let path = segment_path("trace");
    let opts = IndexOptions { engine_slots: engines, capacity: 2 * unique.len(), ..IndexOptions::default() };
    let mut w = IndexWriter::create(&path, &opts).expect("create segment");
    let mut m = LockedMap::new(engines);
    for (n, chain) in chains.iter().enumerate() {
        w.store_chain((n % 8) as u16, None, chain);
        chain.iter().for_each(|&h| m.store((n % 8) as u16, h));
    }
    let r = w.reader();
    let mut out = r.new_overlaps();
    let whole = chains
        .iter()
        .enumerate()
        .filter(|(n, chain)| {
            r.overlaps(chain, &mut out);
            out.get((n % 8) as u16) as usize == chain.len()
        })
        .count();
    let stats = r.stats();
    let evictions = stats.writer.iter().find(|(k, _)| *k == "evictions").map_or(0, |(_, v)| *v);
    eprintln!(
        "trace: {} requests, {} blocks ({} distinct), index capacity {}: {evictions} evictions; {:.1}% of requests found whole on their engine",
        chains.len(),
        chains.iter().map(Vec::len).sum::<usize>(),
        unique.len(),
        stats.capacity,
        100.0 * whole as f64 / chains.len() as f64
    );
    let mut g = c.benchmark_group("trace");
    g.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3)).sample_size(20);
    let mut rng = fastrand::Rng::with_seed(5);
    let order: Vec<usize> = (0..4096).map(|_| rng.usize(..chains.len())).collect();
    let blocks: usize = order.iter().map(|&i| chains[i].len()).sum();
    g.throughput(Throughput::Elements(blocks as u64));
    g.bench_function(BenchmarkId::new("gantry", format!("{engines}e")), |b| {
        b.iter(|| order.iter().map(|&i| r.overlaps(&chains[i], &mut out)).sum::<u32>())
    });
    let m = RwLock::new(m);
    let mut out = Vec::with_capacity(engines);
    g.bench_function(BenchmarkId::new("rwlock_hashmap", format!("{engines}e")), |b| {
        b.iter(|| order.iter().map(|&i| m.read().unwrap().overlaps(&chains[i], &mut out)).sum::<u32>())
    });
    g.finish();
    drop(r);
    drop(w);
    remove_segment(&path);
}

criterion_group!(benches, lookup, apply, concurrent, trace);
criterion_main!(benches);
