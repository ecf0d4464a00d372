//! The whole KV path against `gantry mock`: engines publish real events over ZMQ, the
//! subscriber feeds the shared-memory index, and lookups of a prompt's own token hashes find
//! exactly the engines that cached it.

use std::time::{Duration, Instant};

use gantry_kvindex::hash::{hash_blocks, DEFAULT_SEED};
use gantry_kvindex::index::{IndexOptions, IndexReader, IndexWriter, Overlaps};
use gantry_kvindex::subscriber::{EngineSource, Subscriber};
use serde_json::json;

use crate::{post, start, EVENTS};

/// Waits until `reader` reports `want` (engine slot, overlap) pairs for `hashes`.
fn wait_overlaps(reader: &IndexReader, hashes: &[u64], want: &[(u16, u32)], what: &str) {
    let mut out: Overlaps = reader.new_overlaps();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        reader.overlaps(hashes, &mut out);
        if want.iter().all(|&(e, n)| out.get(e) == n) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: got {:?}, want {want:?}", out.as_slice());
        std::thread::yield_now();
    }
}

fn prompt_hashes(http: std::net::SocketAddr, prompt: &str) -> Vec<u64> {
    let r = post(http, "/tokenize", &json!({"model": "mock-model", "prompt": prompt}));
    let tokens: Vec<u32> = r.json()["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    let mut hashes = Vec::new();
    hash_blocks(DEFAULT_SEED, &tokens, 16, 0, &mut hashes);
    hashes
}

#[test]
fn engine_events_reach_the_index_and_lookups_find_the_prompt() {
    let mut flags = vec!["--engines", "2"];
    flags.extend_from_slice(EVENTS);
    let m = start(&flags);
    let dir = std::env::temp_dir().join(format!("gantry-mock-index-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let opts = IndexOptions { engine_slots: 8, capacity: 1 << 14, ..IndexOptions::default() };
    let mut writer = IndexWriter::create(dir.join("segment"), &opts).unwrap();
    let reader = writer.reader();
    let mut sources = Vec::new();
    for e in &m.engines {
        let slot = writer.register_engine(&e.url()).unwrap();
        sources.push(EngineSource {
            slot,
            name: e.url(),
            events: e.kv_events.clone().unwrap(),
            replay: e.kv_replay.clone(),
            topic: "kv-events".into(),
            block_size: 16,
            seed: DEFAULT_SEED,
            ..EngineSource::default()
        });
    }
    let (a, b) = (sources[0].slot, sources[1].slot);
    let sub = Subscriber::spawn(sources, writer).unwrap();

    // 100 built-in words = 100 tokens: 6 full blocks.
    let vocab = gantry_tokenizer::builtin_words();
    let words: Vec<&str> = vocab[..100].to_vec();
    let text = |words: &[&str]| words.iter().map(|w| format!(" {w}")).collect::<String>();
    let prompt = text(&words);
    let hashes = prompt_hashes(m.engines[0].http, &prompt);
    assert_eq!(hashes.len(), 6);
    let body = json!({"model": "mock-model", "prompt": prompt, "max_tokens": 1});
    assert_eq!(post(m.engines[0].http, "/v1/completions", &body).status, 200);
    wait_overlaps(&reader, &hashes, &[(a, 6), (b, 0)], "engine a cached the prompt");

    assert_eq!(post(m.engines[1].http, "/v1/completions", &body).status, 200);
    wait_overlaps(&reader, &hashes, &[(a, 6), (b, 6)], "both engines cached it");

    // A prompt sharing the first 64 tokens: 4 blocks in common.
    let mut other = words.clone();
    other[70] = vocab[500];
    let other_hashes = prompt_hashes(m.engines[0].http, &text(&other));
    assert_eq!(other_hashes[..4], hashes[..4]);
    wait_overlaps(&reader, &other_hashes, &[(a, 4), (b, 4)], "a shared 4-block prefix");

    // Resetting engine a's prefix cache publishes AllBlocksCleared: only b holds it now.
    assert_eq!(post(m.engines[0].http, "/reset_prefix_cache", &json!({})).status, 200);
    wait_overlaps(&reader, &hashes, &[(a, 0), (b, 6)], "engine a cleared");
    let deadline = Instant::now() + Duration::from_secs(10);
    while reader.engine_blocks(a) != 0 {
        assert!(Instant::now() < deadline, "engine a still holds {} blocks", reader.engine_blocks(a));
        std::thread::yield_now();
    }
    assert_eq!(reader.engine_blocks(b), 6);
    let stats = reader.stats();
    let applied = stats.writer.iter().find(|(n, _)| *n == "events_applied").unwrap().1;
    assert!(applied >= 3, "{stats}");
    sub.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
