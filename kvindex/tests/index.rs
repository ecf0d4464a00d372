//! The shared-memory index against a plain `HashMap` model, plus segment handling: reopening,
//! refusing foreign or truncated files, the writer lock, and a writer in another process (idle, and
//! churning under a concurrent reader).

use gantry_kvindex::hash::chain_pos;
use gantry_kvindex::index::{IndexError, IndexOptions, IndexReader, IndexWriter, Overlaps};
use gantry_kvindex::sink::{BlockSink, EngineSlot};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A fresh directory for one test's segment files (removed on drop).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("gantry-kvindex-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self) -> PathBuf {
        self.0.join("segment")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Chain positions of a prompt's blocks.
fn positions(chain: &[u64]) -> Vec<u64> {
    let mut pos = None;
    chain
        .iter()
        .map(|&h| {
            let p = chain_pos(pos, h);
            pos = Some(p);
            p
        })
        .collect()
}

/// The chain position of a block that starts a prompt.
fn root(h: u64) -> u64 {
    chain_pos(None, h)
}

fn opts(engine_slots: usize, capacity: usize) -> IndexOptions {
    IndexOptions { engine_slots, capacity, ..IndexOptions::default() }
}

/// The model: block → engines holding it.
#[derive(Default)]
struct Model(HashMap<u64, HashSet<EngineSlot>>);

impl Model {
    /// Per engine, the number of leading `hashes` it holds (the definition, block by block).
    fn overlaps(&self, hashes: &[u64], engines: usize) -> Vec<u32> {
        let mut depth = vec![0u32; engines];
        for (i, h) in hashes.iter().enumerate() {
            let Some(holders) = self.0.get(h) else { break };
            for &e in holders {
                if depth[e as usize] == i as u32 {
                    depth[e as usize] += 1;
                }
            }
        }
        depth
    }
    fn blocks(&self, e: EngineSlot) -> u64 {
        self.0.values().filter(|s| s.contains(&e)).count() as u64
    }
}

fn assert_overlaps(reader: &IndexReader, model: &Model, hashes: &[u64], out: &mut Overlaps, engines: usize) {
    let deepest = reader.overlaps(hashes, out);
    let want = model.overlaps(hashes, engines);
    for (e, &w) in want.iter().enumerate() {
        assert_eq!(out.get(e as EngineSlot), w, "engine {e}, prompt {hashes:x?}");
    }
    assert_eq!(deepest, want.iter().copied().max().unwrap_or(0));
    assert!(out.as_slice().iter().all(|o| o.blocks > 0));
}

/// Random stores, removals and engine clears on a few chains that share prefixes; after every
/// step the index answers every prompt exactly as the model does. Engine slots span several bit
/// words; prompts share prefixes and diverge.
#[test]
fn random_operations_match_a_hashmap_model() {
    // Widths of 1, 2, 3, 4 and 16 bit words: the lookup has a copy for each power of two. The
    // last two draw from 5 engines in different bit words, so blocks keep crossing between a
    // few holders (inline in an entry) and more (in its bit set), and prompts between both.
    let spread: &[usize] = &[3, 64, 130, 640, 999];
    for (seed, engines, pool) in [
        (1u64, 3usize, None),
        (2, 70, None),
        (3, 130, None),
        (4, 250, None),
        (5, 1000, None),
        (6, 1000, Some(spread)),
        (7, 1000, Some(spread)),
    ] {
        let dir = TempDir::new(&format!("model-{seed}"));
        let mut w = IndexWriter::create(dir.path(), &opts(engines, 2048)).unwrap();
        let reader = w.reader();
        let mut out = reader.new_overlaps();
        let mut model = Model::default();
        let mut rng = fastrand::Rng::with_seed(seed);
        // 12 chains of 40 blocks (longer than a lookup's pipeline, which reads 32 blocks ahead:
        // prompts and their prefixes run it full and short); chains 2k and 2k+1 share their first 8.
        const LEN: usize = 40;
        let ids: Vec<u64> = (0..12 * LEN).map(|_| rng.u64(..)).collect();
        let chains: Vec<Vec<u64>> = (0..12)
            .map(|c| (0..LEN).map(|b| if b < 8 { ids[(c / 2) * LEN + b] } else { ids[c * LEN + b] }).collect())
            .collect();
        let pos: Vec<Vec<u64>> = chains.iter().map(|c| positions(c)).collect();
        let engine = |rng: &mut fastrand::Rng| match pool {
            Some(p) => p[rng.usize(..p.len())] as EngineSlot,
            None => rng.usize(..engines) as EngineSlot,
        };
        for step in 0..3000 {
            match rng.u8(..100) {
                0..=54 => {
                    let (e, c) = (engine(&mut rng), rng.usize(..chains.len()));
                    let n = rng.usize(1..=LEN);
                    w.store_chain(e, None, &chains[c][..n]);
                    for &h in &chains[c][..n] {
                        model.0.entry(h).or_default().insert(e);
                    }
                }
                55..=94 => {
                    let (e, c) = (engine(&mut rng), rng.usize(..chains.len()));
                    let b = rng.usize(..LEN);
                    let h = chains[c][b];
                    w.remove(e, h, pos[c][b]);
                    if let Some(s) = model.0.get_mut(&h) {
                        s.remove(&e);
                        if s.is_empty() {
                            model.0.remove(&h);
                        }
                    }
                }
                _ => {
                    let e = engine(&mut rng);
                    w.clear_engine(e);
                    model.0.values_mut().for_each(|s| {
                        s.remove(&e);
                    });
                    model.0.retain(|_, s| !s.is_empty());
                }
            }
            if step % 7 == 0 {
                assert_eq!(reader.overlaps(&[], &mut out), 0, "an empty prompt");
                assert!(out.as_slice().is_empty());
                for c in &chains {
                    assert_overlaps(&reader, &model, c, &mut out, engines);
                    if step % 91 == 0 {
                        for k in 1..c.len() {
                            assert_overlaps(&reader, &model, &c[..k], &mut out, engines);
                        }
                    }
                }
            }
        }
        for e in 0..engines as EngineSlot {
            assert_eq!(reader.engine_blocks(e), model.blocks(e), "engine {e} block count");
        }
        let stats = reader.stats();
        let get = |name: &str| stats.writer.iter().find(|(n, _)| *n == name).unwrap().1;
        assert_eq!(get("entries"), model.0.len() as u64);
        assert_eq!(get("evictions"), 0, "the table has room: the model does not evict");
    }
}

/// A full table evicts instead of failing, never holds more than its capacity, and never claims a
/// block an engine does not hold (eviction only forgets).
#[test]
fn full_table_evicts_and_never_invents_blocks() {
    let dir = TempDir::new("evict");
    let mut w = IndexWriter::create(dir.path(), &opts(8, 100)).unwrap();
    let reader = w.reader();
    let mut model = Model::default();
    let mut rng = fastrand::Rng::with_seed(9);
    for i in 0..2000u64 {
        let e = rng.u16(..8);
        let h = rng.u64(..400);
        w.store(e, h, root(h));
        model.0.entry(h).or_default().insert(e);
        if i % 3 == 0 {
            let (e, h) = (rng.u16(..8), rng.u64(..400));
            w.remove(e, h, root(h));
            if let Some(s) = model.0.get_mut(&h) {
                s.remove(&e);
            }
        }
    }
    let stats = reader.stats();
    let get = |name: &str| stats.writer.iter().find(|(n, _)| *n == name).unwrap().1;
    assert!(get("entries") <= 100, "{} entries in a table of capacity 100", get("entries"));
    assert!(get("evictions") > 0);
    let mut out = reader.new_overlaps();
    let mut held = 0;
    for h in 0..400u64 {
        reader.overlaps(&[h], &mut out);
        for o in out.as_slice() {
            held += 1;
            assert!(model.0[&h].contains(&o.engine), "index claims engine {} holds {h}", o.engine);
        }
    }
    assert!(held > 0);
    let per_engine: u64 = (0..8).map(|e| reader.engine_blocks(e)).sum();
    assert_eq!(per_engine, held, "per-engine counts follow evictions");
}

#[test]
fn engines_get_stable_slots_and_names() {
    let dir = TempDir::new("engines");
    let mut w = IndexWriter::create(dir.path(), &opts(2, 16)).unwrap();
    let a = w.register_engine("http://127.0.0.1:8101").unwrap();
    let b = w.register_engine("http://127.0.0.1:8102").unwrap();
    assert_ne!(a, b);
    assert_eq!(w.register_engine("http://127.0.0.1:8101").unwrap(), a);
    let err = w.register_engine("http://127.0.0.1:8103").unwrap_err();
    assert!(matches!(err, IndexError::NoEngineSlot { slots: 2, .. }), "{err}");
    let long = format!("http://{}", "x".repeat(200));
    assert!(w.register_engine(&long).unwrap_err().to_string().contains("longer than"));

    w.store(b, 7, root(7));
    let reader = IndexReader::open(dir.path()).unwrap();
    assert_eq!(reader.engine_slot("http://127.0.0.1:8102"), Some(b));
    assert_eq!(reader.engine_name(a).as_deref(), Some("http://127.0.0.1:8101"));
    assert_eq!(reader.engine_blocks(b), 1);
    assert_eq!(w.release_engine(b), 1);
    assert_eq!(reader.engine_slot("http://127.0.0.1:8102"), None);
    assert_eq!(reader.engine_blocks(b), 0);
    let mut out = reader.new_overlaps();
    assert_eq!(reader.overlaps(&[7], &mut out), 0, "a released engine's blocks are gone");
    assert_eq!(w.register_engine("http://127.0.0.1:8103").unwrap(), b, "the freed slot is reused");
}

#[test]
fn a_released_slot_is_taken_again_only_after_the_other_free_ones() {
    let dir = TempDir::new("slot-hand");
    let mut w = IndexWriter::create(dir.path(), &opts(4, 16)).unwrap();
    let [a, b] = ["a", "b"].map(|n| w.register_engine(n).unwrap());
    assert_eq!((a, b), (0, 1));
    w.release_engine(a);
    // Predictions for `a` still in flight then find slot 0 unused rather than a newcomer's.
    let [c, d, e] = ["c", "d", "e"].map(|n| w.register_engine(n).unwrap());
    assert_eq!((c, d, e), (2, 3, 0), "round the table, slot 0 last");
    assert_eq!(w.release_engine(200), 0, "an out-of-range slot is refused, not a panic");
}

#[test]
fn one_writer_at_a_time_and_a_new_writer_resets_the_segment() {
    let dir = TempDir::new("lock");
    let mut w = IndexWriter::create(dir.path(), &opts(4, 64)).unwrap();
    w.store(1, 42, root(42));
    let err = IndexWriter::create(dir.path(), &opts(4, 64)).err().expect("second writer must be refused");
    assert!(matches!(err, IndexError::Locked { pid, .. } if pid == u64::from(std::process::id())), "{err}");
    let reader = IndexReader::open(dir.path()).unwrap();
    let gen = reader.generation();
    drop(w);
    // Same shape: reused in place, cleared, generation bumped; the old reader sees it.
    let _w2 = IndexWriter::create(dir.path(), &opts(4, 64)).unwrap();
    assert_eq!(reader.generation(), gen + 1);
    let mut out = reader.new_overlaps();
    assert_eq!(reader.overlaps(&[42], &mut out), 0);
    assert!(!reader.is_retired());
    drop(_w2);
    // Another shape: a new file replaces it and the old one is marked retired; the generation
    // at the path still rises, so a reader can tell the new file from the old.
    let w3 = IndexWriter::create(dir.path(), &opts(8, 64)).unwrap();
    assert!(reader.is_retired());
    let replacement = IndexReader::open(dir.path()).unwrap();
    assert_eq!((replacement.engine_slots(), replacement.generation()), (8, gen + 2));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir.path()).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    drop(w3);
}

#[test]
fn foreign_truncated_and_other_version_files_are_refused() {
    let dir = TempDir::new("refuse");
    let path = dir.path();
    std::fs::write(&path, b"hello").unwrap();
    let err = IndexReader::open(&path).err().unwrap().to_string();
    assert!(err.contains("too short"), "{err}");
    std::fs::write(&path, vec![7u8; 8192]).unwrap();
    let err = IndexReader::open(&path).err().unwrap().to_string();
    assert!(err.contains("not a gantry kvindex segment"), "{err}");

    drop(IndexWriter::create(&path, &opts(4, 64)).unwrap());
    let mut bytes = std::fs::read(&path).unwrap();
    let full = bytes.len();
    std::fs::write(&path, &bytes[..full - 8]).unwrap();
    let err = IndexReader::open(&path).err().unwrap().to_string();
    assert!(err.contains("truncated"), "{err}");
    bytes[8..16].copy_from_slice(&99u64.to_le_bytes()); // layout version word
    std::fs::write(&path, &bytes).unwrap();
    let err = IndexReader::open(&path).err().unwrap().to_string();
    assert!(err.contains("layout version 99"), "{err}");
    // A writer replaces what it cannot use.
    let w = IndexWriter::create(&path, &opts(4, 64)).unwrap();
    assert!(IndexReader::open(&path).is_ok());
    drop(w);
    let missing = dir.0.join("nope");
    assert!(IndexReader::open(&missing).err().unwrap().to_string().contains("nope"));
}

#[test]
fn predictions_show_up_expire_and_yield_to_real_events() {
    let dir = TempDir::new("approx");
    let o = IndexOptions { approx_capacity: 64, approx_ttl: Duration::from_secs(1), ..opts(4, 64) };
    let mut w = IndexWriter::create(dir.path(), &o).unwrap();
    for (slot, name) in ["e0", "e1", "e2"].iter().enumerate() {
        assert_eq!(usize::from(w.register_engine(name).unwrap()), slot);
    }
    let reader = w.reader();
    let predictor = w.predictor();
    let mut out = reader.new_overlaps();
    // A slot no engine holds gets nothing, even if queued.
    assert_eq!(predictor.predict(3, &[10, 11, 12]), 3);
    w.maintain();
    assert_eq!(reader.overlaps(&[10, 11, 12], &mut out), 0, "slot 3 is not registered");
    assert_eq!(predictor.predict(2, &[10, 11, 12]), 3);
    assert_eq!(reader.overlaps(&[10, 11, 12], &mut out), 0, "not applied before maintain");
    w.maintain();
    assert_eq!(reader.overlaps(&[10, 11, 12], &mut out), 3);
    assert_eq!(out.get(2), 3);
    // Exact entries of another engine and predictions combine per engine.
    w.store(1, 10, root(10));
    reader.overlaps(&[10, 11, 12], &mut out);
    assert_eq!((out.get(1), out.get(2)), (1, 3));
    // A real removal overrides the prediction.
    w.remove(2, 11, positions(&[10, 11])[1]);
    reader.overlaps(&[10, 11, 12], &mut out);
    assert_eq!(out.get(2), 1);
    // The rest expires.
    let deadline = Instant::now() + Duration::from_secs(10);
    while reader.overlaps(&[10], &mut out) > 0 && out.get(2) > 0 {
        assert!(Instant::now() < deadline, "prediction did not expire");
        std::thread::yield_now();
        w.maintain();
    }
    assert_eq!(out.get(1), 1, "the exact entry stays");
    // Releasing a slot removes the predictions still queued for it as well.
    assert_eq!(predictor.predict(0, &[20, 21]), 2);
    w.release_engine(0);
    w.maintain();
    assert_eq!(reader.overlaps(&[20, 21], &mut out), 0, "queued before the release, dropped with it");
}

/// With 1,024 engine slots a lookup reads only the bit words where engines still hold every
/// block so far; exact holders and predicted ones in different words still combine exactly.
#[test]
fn wide_bit_sets_combine_exact_and_predicted_holders() {
    let dir = TempDir::new("wide");
    let o = IndexOptions { approx_capacity: 256, ..opts(1024, 256) };
    let mut w = IndexWriter::create(dir.path(), &o).unwrap();
    for n in 0..=900 {
        assert_eq!(usize::from(w.register_engine(&format!("e{n}")).unwrap()), n);
    }
    let (reader, predictor) = (w.reader(), w.predictor());
    let chain = [10u64, 11, 12, 13];
    w.store_chain(900, None, &chain);
    w.store_chain(64, None, &chain[..1]);
    assert_eq!(predictor.predict(3, &chain[..2]), 2);
    assert_eq!(predictor.predict(700, &chain[..3]), 3);
    w.maintain();
    let mut out = reader.new_overlaps();
    assert_eq!(reader.overlaps(&chain, &mut out), 4);
    let got = [3, 64, 700, 900].map(|e| out.get(e));
    assert_eq!(got, [2, 1, 3, 4], "engines 3, 64, 700 and 900 (bit words 0, 1, 10 and 14)");
    assert_eq!(out.as_slice().len(), 4);
}

/// Each prediction lives as long as it asks (`predict_for`), the segment's lifetime otherwise;
/// an entry two engines predicted lives as long as the longer asked.
#[test]
fn a_prediction_lives_as_long_as_it_asks() {
    let dir = TempDir::new("approx-ttl");
    let o = IndexOptions { approx_capacity: 64, approx_ttl: Duration::from_secs(1), ..opts(4, 64) };
    let mut w = IndexWriter::create(dir.path(), &o).unwrap();
    for name in ["e0", "e1"] {
        w.register_engine(name).unwrap();
    }
    let (reader, predictor) = (w.reader(), w.predictor());
    let mut out = reader.new_overlaps();
    let hour = Duration::from_secs(3600);
    assert_eq!(predictor.predict_for(1, &[40, 41], hour), 2);
    assert_eq!(predictor.predict_for(1, &[30], hour), 1);
    // Engine 0, for the segment's second, on block 30 (which engine 1 holds for an hour) and 31.
    assert_eq!(predictor.predict(0, &[30, 31]), 2);
    w.maintain();
    reader.overlaps(&[30, 31], &mut out);
    assert_eq!((out.get(0), out.get(1)), (2, 1));
    let deadline = Instant::now() + Duration::from_secs(10);
    while reader.overlaps(&[30, 31], &mut out) > 1 {
        assert!(Instant::now() < deadline, "engine 0's block 31 did not expire");
        std::thread::yield_now();
        w.maintain();
    }
    assert_eq!((out.get(0), out.get(1)), (1, 1), "block 30 keeps the hour it was predicted for");
    assert_eq!(reader.overlaps(&[40, 41], &mut out), 2, "engine 1's own prompt lives on");
}

#[test]
fn predictions_are_dropped_when_approximate_mode_is_off() {
    let dir = TempDir::new("noapprox");
    let w = IndexWriter::create(dir.path(), &opts(4, 64)).unwrap();
    assert_eq!(w.predictor().predict(0, &[1, 2]), 0);
}

#[test]
fn bytes_per_block_fit_the_budget() {
    let dir = TempDir::new("size");
    for (slots, max) in [(64usize, 64usize), (256, 64), (1024, 200)] {
        let w = IndexWriter::create(dir.path(), &opts(slots, 1 << 16)).unwrap();
        let stats = w.reader().stats();
        let per_block = stats.total_bytes as f64 / stats.capacity as f64;
        assert!(per_block <= max as f64, "{slots} slots: {per_block:.1} bytes per block");
        drop(w);
    }
}

/// A writer in another process (this test binary re-run as a child) fills the segment; this
/// process reads it while the writer lives and after it is killed (SIGKILL: no cleanup at all).
/// Runs this test binary's test `test` alone in a child process, with `env` set to the segment
/// `path` (the child half of a two-process test); its stdin is a pipe, so it can see the parent
/// go away.
fn spawn_child(test: &str, env: &str, path: &std::path::Path) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(env, path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn a_reader_process_sees_a_writer_process_and_survives_its_death() {
    if std::env::var_os("GANTRY_KVINDEX_CHILD_WRITER").is_some() {
        return; // the child runs `child_writer` only
    }
    let dir = TempDir::new("xproc");
    let path = dir.path();
    let mut child = spawn_child("child_writer", "GANTRY_KVINDEX_CHILD_WRITER", &path);
    let deadline = Instant::now() + Duration::from_secs(30);
    let reader = loop {
        if let Ok(r) = IndexReader::open(&path) {
            if r.engine_blocks(3) == 100 {
                break r;
            }
        }
        assert!(Instant::now() < deadline, "child writer never filled the segment");
        std::thread::yield_now();
    };
    let chain: Vec<u64> = (0..100).collect();
    let mut out = reader.new_overlaps();
    assert_eq!(reader.overlaps(&chain, &mut out), 100);
    assert_eq!(reader.engine_name(3).as_deref(), Some("http://child:1"));
    let pid = reader.stats().writer_pid;
    assert_eq!(pid, u64::from(child.id()));
    // SIGKILL (by PID, our own child) leaves the writer no chance to clean up.
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(reader.overlaps(&chain, &mut out), 100, "a dead writer leaves a readable segment");
    assert_eq!(IndexReader::open(&path).unwrap().overlaps(&chain, &mut out), 100);
    // Its lock died with it: a new writer takes over and resets.
    let _w = IndexWriter::create(&path, &opts(8, 1024)).unwrap();
    assert_eq!(reader.overlaps(&chain, &mut out), 0);
}

/// The child half of the test above (does nothing unless run as that child).
#[test]
fn child_writer() {
    let Some(path) = std::env::var_os("GANTRY_KVINDEX_CHILD_WRITER") else { return };
    let mut w = IndexWriter::create(PathBuf::from(path), &opts(8, 1024)).unwrap();
    for name in ["x", "y", "z"] {
        w.register_engine(name).unwrap();
    }
    let slot = w.register_engine("http://child:1").unwrap();
    assert_eq!(slot, 3);
    let chain: Vec<u64> = (0..100).collect();
    w.store_chain(slot, None, &chain);
    // Wait for the parent to kill us (stdin stays open until then).
    let mut buf = String::new();
    let _ = std::io::stdin().read_line(&mut buf);
}

/// The churn schedule shared by the two halves of the next test: engines `0..CHURN_ENGINES`,
/// `CHURN_CHAINS` disjoint chains of `CHURN_LEN` blocks, and `CHURN_DECOYS` more that no engine
/// ever stores.
const CHURN_ENGINES: EngineSlot = 4;
const CHURN_CHAINS: usize = 8;
const CHURN_DECOYS: usize = 2;
const CHURN_LEN: usize = 16;

fn churn_chains() -> Vec<Vec<u64>> {
    let mut rng = fastrand::Rng::with_seed(0xc4a1);
    (0..CHURN_CHAINS + CHURN_DECOYS).map(|_| (0..CHURN_LEN).map(|_| rng.u64(..)).collect()).collect()
}

/// Whether engine `e` ever stores chain `c`: two engines per chain, no engine for a decoy.
fn churn_allowed(e: EngineSlot, c: usize) -> bool {
    c < CHURN_CHAINS && (c % 4 == usize::from(e) || (c + 1) % 4 == usize::from(e))
}

/// The most leading blocks of chain `c` engine `e` ever stores (2 to 16, varying per pair).
fn churn_max_len(e: EngineSlot, c: usize) -> usize {
    2 + (3 * usize::from(e) + 5 * c) % (CHURN_LEN - 1)
}

/// Kills (SIGKILL, by PID) and reaps the child when dropped, on a failed assertion too.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Checks one lookup of chain `c` against the churn schedule; returns the result as
/// `(engine, blocks)` pairs, sorted.
fn check_churn_lookup(reader: &IndexReader, chains: &[Vec<u64>], c: usize, out: &mut Overlaps) -> Vec<(u16, u32)> {
    let deepest = reader.overlaps(&chains[c], out);
    let mut got: Vec<(u16, u32)> = out.as_slice().iter().map(|o| (o.engine, o.blocks)).collect();
    got.sort_unstable();
    for &(e, blocks) in &got {
        assert!(churn_allowed(e, c), "chain {c}: engine {e} never stores it, yet holds {blocks} blocks ({got:?})");
        assert!(
            (1..=churn_max_len(e, c) as u32).contains(&blocks),
            "chain {c}: engine {e} holds {blocks} blocks, beyond the {} it ever stores",
            churn_max_len(e, c)
        );
    }
    assert_eq!(deepest, got.iter().map(|&(_, b)| b).max().unwrap_or(0), "chain {c}: deepest of {got:?}");
    got
}

/// A writer process stores and removes blocks without pause (`child_churner`) while this
/// process looks prompts up: every answer must be one the writer's schedule could have produced
/// (the right engines, never deeper than they store, nothing for prompts nobody stores), and the
/// answers must change while we watch (the reader really follows the writer).
#[test]
fn a_reader_process_never_sees_invented_blocks_while_a_writer_process_churns() {
    /// Lookups at least; then on until `MIN_CHANGES` answers differed from the previous one.
    const LOOKUPS: usize = 100_000;
    const MIN_CHANGES: usize = 1_000;
    let dir = TempDir::new("xproc-churn");
    let path = dir.path();
    let mut child = ChildGuard(spawn_child("child_churner", "GANTRY_KVINDEX_CHILD_CHURNER", &path));
    let deadline = Instant::now() + Duration::from_secs(30);
    // The child registers its engines, then churns.
    let reader = loop {
        if let Ok(r) = IndexReader::open(&path) {
            if r.engine_slot(&format!("churn-{}", CHURN_ENGINES - 1)).is_some() {
                break r;
            }
        }
        assert!(Instant::now() < deadline, "the child writer never registered its engines");
        std::thread::yield_now();
    };
    assert_eq!(reader.stats().writer_pid, u64::from(child.0.id()), "reading the child's segment");
    let chains = churn_chains();
    let mut out = reader.new_overlaps();
    let mut last = vec![Vec::new(); chains.len()];
    let mut seen = HashSet::new();
    let (mut lookups, mut changes) = (0, 0);
    while lookups < LOOKUPS || changes < MIN_CHANGES {
        assert!(
            Instant::now() < deadline,
            "{changes} changes in {lookups} lookups: the reader does not follow the writer"
        );
        let c = lookups % chains.len();
        let got = check_churn_lookup(&reader, &chains, c, &mut out);
        seen.extend(got.iter().map(|&(e, _)| e));
        if got != last[c] {
            changes += 1;
            last[c] = got;
        }
        lookups += 1;
    }
    assert_eq!(seen.len(), usize::from(CHURN_ENGINES), "every engine seen holding blocks: {seen:?}");
    assert!(child.0.try_wait().unwrap().is_none(), "the child was still writing");
    drop(child); // SIGKILL by PID, mid-write perhaps
    for c in 0..chains.len() {
        check_churn_lookup(&reader, &chains, c, &mut out);
    }
}

/// The child half of the test above (does nothing unless run as that child): stores and
/// removes blocks in a loop until killed (or until its stdin closes: the parent is gone).
#[test]
fn child_churner() {
    let Some(path) = std::env::var_os("GANTRY_KVINDEX_CHILD_CHURNER") else { return };
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let mut w = IndexWriter::create(PathBuf::from(path), &opts(8, 1024)).unwrap();
    for e in 0..CHURN_ENGINES {
        assert_eq!(w.register_engine(&format!("churn-{e}")).unwrap(), e);
    }
    let chains = churn_chains();
    let pos: Vec<Vec<u64>> = chains.iter().map(|c| positions(c)).collect();
    let mut rng = fastrand::Rng::with_seed(77);
    let started = Instant::now();
    for step in 0u64.. {
        let e = rng.u16(..CHURN_ENGINES);
        // A chain this engine stores: c % 4 is e or e - 1.
        let c = 4 * rng.usize(..CHURN_CHAINS / 4) + (usize::from(e) + 4 - rng.usize(..2)) % 4;
        assert!(churn_allowed(e, c));
        match rng.u8(..100) {
            0..=59 => w.store_chain(e, None, &chains[c][..rng.usize(1..=churn_max_len(e, c))]),
            60..=98 => {
                let b = rng.usize(..churn_max_len(e, c));
                w.remove(e, chains[c][b], pos[c][b]);
            }
            _ => {
                w.clear_engine(e);
            }
        }
        if step % 256 == 0 {
            w.maintain();
            assert!(started.elapsed() < Duration::from_secs(120), "never killed");
        }
    }
}
