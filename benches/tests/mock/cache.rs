//! Prefix caching seen from outside: cached_tokens, metrics, and the KV event stream on ZMQ,
//! decoded with an independent msgpack decoder (rmpv) in both wire forms.

use std::time::{Duration, Instant};

use rmpv::Value as Mp;
use serde_json::json;

use crate::{get, metric, post, start, words, EVENTS};

/// An event as decoded from the wire, whichever form it came in.
#[derive(Debug, Clone, PartialEq)]
enum Ev {
    Stored { hashes: Vec<u64>, parent: Option<u64>, tokens: Vec<u64>, block_size: u64, medium: String },
    Removed { hashes: Vec<u64> },
    Cleared,
}

fn as_u64(v: &Mp) -> u64 {
    v.as_u64().or_else(|| v.as_i64().map(|i| i as u64)).unwrap_or_else(|| panic!("not an int: {v}"))
}

fn field<'a>(ev: &'a Mp, name: &str, index: usize) -> &'a Mp {
    match ev {
        Mp::Map(kv) => kv.iter().find(|(k, _)| k.as_str() == Some(name)).map(|(_, v)| v).unwrap_or(&Mp::Nil),
        Mp::Array(a) => a.get(index).unwrap_or(&Mp::Nil),
        other => panic!("event is neither map nor array: {other}"),
    }
}

/// Decodes a batch payload `[ts, events, dp_rank]`.
fn decode(payload: &[u8]) -> (f64, Vec<Ev>, Mp) {
    let v = rmpv::decode::read_value(&mut &payload[..]).expect("valid msgpack");
    let Mp::Array(batch) = v else { panic!("batch is not an array") };
    assert_eq!(batch.len(), 3);
    let ts = batch[0].as_f64().expect("float ts");
    let events = batch[1]
        .as_array()
        .expect("events array")
        .iter()
        .map(|e| {
            let tag = match e {
                Mp::Map(_) => field(e, "type", 0).as_str().map(str::to_owned),
                Mp::Array(a) => a[0].as_str().map(str::to_owned),
                _ => None,
            };
            match tag.as_deref() {
                Some("BlockStored") => Ev::Stored {
                    hashes: field(e, "block_hashes", 1).as_array().unwrap().iter().map(as_u64).collect(),
                    parent: match field(e, "parent_block_hash", 2) {
                        Mp::Nil => None,
                        v => Some(as_u64(v)),
                    },
                    tokens: field(e, "token_ids", 3).as_array().unwrap().iter().map(as_u64).collect(),
                    block_size: as_u64(field(e, "block_size", 4)),
                    medium: field(e, "medium", 6).as_str().unwrap_or_default().to_owned(),
                },
                Some("BlockRemoved") => {
                    Ev::Removed { hashes: field(e, "block_hashes", 1).as_array().unwrap().iter().map(as_u64).collect() }
                }
                Some("AllBlocksCleared") => Ev::Cleared,
                other => panic!("unknown event tag {other:?}"),
            }
        })
        .collect();
    (ts, events, batch[2].clone())
}

/// A SUB socket that has provably joined (it received a batch), with a deadline on every read.
struct Sub {
    sock: zmq::Socket,
    last_seq: Option<u64>,
}

impl Sub {
    /// Subscribes and primes: resets the (idle) engine's prefix cache until an
    /// `AllBlocksCleared` arrives, which proves the subscription is live.
    fn join(ctx: &zmq::Context, endpoint: &str, http: std::net::SocketAddr) -> Sub {
        let sock = ctx.socket(zmq::SUB).unwrap();
        sock.set_subscribe(b"kv-events").unwrap();
        sock.set_rcvtimeo(100).unwrap();
        sock.connect(endpoint).unwrap();
        let mut s = Sub { sock, last_seq: None };
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            assert_eq!(post(http, "/reset_prefix_cache", &json!({})).status, 200);
            if let Some((_, evs)) = s.recv() {
                assert_eq!(evs, [Ev::Cleared]);
                return s;
            }
            assert!(Instant::now() < end, "SUB never joined {endpoint}");
        }
    }

    /// One batch `(seq, events)`, or None after the socket's short timeout.
    fn recv(&mut self) -> Option<(u64, Vec<Ev>)> {
        let frames = self.sock.recv_multipart(0).ok()?;
        assert_eq!(frames.len(), 3, "topic, seq, payload");
        assert_eq!(frames[0], b"kv-events");
        let seq = u64::from_be_bytes(frames[1][..].try_into().expect("8-byte sequence"));
        if let Some(last) = self.last_seq {
            assert_eq!(seq, last + 1, "sequence numbers are consecutive");
        }
        self.last_seq = Some(seq);
        let (ts, evs, dp) = decode(&frames[2]);
        assert!(ts > 1.6e9, "ts is a unix time");
        assert_eq!(dp, Mp::from(0));
        Some((seq, evs))
    }

    /// Collects events until `done` says enough, failing after a deadline.
    fn until(&mut self, limit: Duration, mut done: impl FnMut(&[Ev]) -> bool) -> Vec<Ev> {
        let end = Instant::now() + limit;
        let mut all = Vec::new();
        while !done(&all) {
            assert!(Instant::now() < end, "events so far: {all:?}");
            if let Some((_, evs)) = self.recv() {
                all.extend(evs);
            }
        }
        all
    }
}

#[test]
fn prefix_hits_show_in_cached_tokens_and_metrics() {
    let m = start(&[]);
    let addr = m.engines[0].http;
    let prompt = words(5, 100);
    let body = json!({"model": "mock-model", "prompt": prompt, "max_tokens": 2});
    let first = post(addr, "/v1/completions", &body).json();
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let second = post(addr, "/v1/completions", &body).json();
    assert_eq!(
        second["usage"]["prompt_tokens_details"]["cached_tokens"], 96,
        "6 full blocks of 16 (the last token is never a hit)"
    );
    let other = post(
        addr,
        "/v1/completions",
        &json!({"model": "mock-model", "prompt": format!("{prompt}{}", words(9, 40)), "max_tokens": 1}),
    )
    .json();
    assert_eq!(other["usage"]["prompt_tokens_details"]["cached_tokens"], 96, "a longer prompt shares the prefix");
    let text = get(addr, "/metrics").text();
    assert_eq!(metric(&text, "vllm:prefix_cache_queries_total", ""), Some(340.0));
    assert_eq!(metric(&text, "vllm:prefix_cache_hits_total", ""), Some(192.0));
}

fn evictions_and_events(format: &str) {
    let mut flags = vec!["--num-gpu-blocks", "9", "--block-size", "4", "--kv-events-format", format];
    flags.extend_from_slice(EVENTS);
    let m = start(&flags);
    let e = &m.engines[0];
    let ctx = zmq::Context::new();
    let mut sub = Sub::join(&ctx, e.kv_events.as_deref().unwrap(), e.http);
    // 13 prompt tokens + 3 output = 4 full blocks of 4 (one still holds the last sampled token).
    let a = json!({"model": "mock-model", "prompt": [10,11,12,13,14,15,16,17,18,19,20,21,22], "max_tokens": 4, "ignore_eos": true});
    assert_eq!(post(e.http, "/v1/completions", &a).status, 200);
    let evs = sub.until(Duration::from_secs(10), |evs| {
        evs.iter().map(|e| if let Ev::Stored { hashes, .. } = e { hashes.len() } else { 0 }).sum::<usize>() >= 4
    });
    let mut chain = Vec::new();
    let mut parent = None;
    let mut tokens = Vec::new();
    for ev in &evs {
        let Ev::Stored { hashes, parent: p, tokens: t, block_size, medium } = ev else { panic!("unexpected {ev:?}") };
        assert_eq!(*block_size, 4);
        assert_eq!(medium, "GPU");
        assert_eq!(t.len(), hashes.len() * 4, "token_ids cover exactly the stored blocks");
        assert_eq!(*p, parent, "each store continues the chain");
        parent = hashes.last().copied();
        chain.extend(hashes.iter().copied());
        tokens.extend(t.iter().copied());
    }
    assert_eq!(&tokens[..13], &[10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]);
    // The chain is vLLM's sha256 block hash of those tokens.
    let toks: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
    let want: Vec<u64> = gantry_kvindex::vllm_hash::hash_blocks(gantry_kvindex::VllmHashAlgo::Sha256, &toks, 4)
        .iter()
        .map(gantry_kvindex::digest_to_u64)
        .collect();
    assert_eq!(chain, want);
    // A different 30-token prompt needs all 8 blocks: it evicts the cached ones, tail first.
    let b = json!({"model": "mock-model", "prompt": (100..130).collect::<Vec<u32>>(), "max_tokens": 1});
    assert_eq!(post(e.http, "/v1/completions", &b).status, 200);
    let evs =
        sub.until(Duration::from_secs(10), |evs| evs.iter().filter(|e| matches!(e, Ev::Removed { .. })).count() >= 4);
    let removed: Vec<u64> =
        evs.iter().filter_map(|e| if let Ev::Removed { hashes } = e { Some(hashes[0]) } else { None }).collect();
    let mut tail_first = chain.clone();
    tail_first.reverse();
    assert_eq!(removed, tail_first, "eviction takes a prefix's tail first");
    // Reset: AllBlocksCleared.
    assert_eq!(post(e.http, "/reset_prefix_cache", &json!({})).status, 200);
    let evs = sub.until(Duration::from_secs(10), |evs| evs.contains(&Ev::Cleared));
    assert_eq!(evs.last(), Some(&Ev::Cleared));
}

#[test]
fn small_cache_evicts_and_publishes_map_form() {
    evictions_and_events("map");
}

#[test]
fn small_cache_evicts_and_publishes_array_form() {
    evictions_and_events("array");
}

#[test]
fn the_test_decoder_reads_the_spec_worked_example() {
    // vllm-protocols.md §1.9: the same batch in both forms must decode to the same events.
    let map = "93cb41d954fc4020000093de000ba474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657391cf1a1eb4e3edd9361ab1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f6964739401020304aa626c6f636b5f73697a6504a76c6f72615f6964c0a66d656469756da3475055a96c6f72615f6e616d65c0aa65787472615f6b65797391c0a967726f75705f69647800b26b765f63616368655f737065635f6b696e64ae66756c6c5f617474656e74696f6e84a474797065ac426c6f636b52656d6f766564ac626c6f636b5f68617368657391cf1a1eb4e3edd9361aa66d656469756da3475055a967726f75705f6964780081a474797065b0416c6c426c6f636b73436c656172656400";
    let arr = "93cb41d954fc40200000939cab426c6f636b53746f72656491cf1a1eb4e3edd9361ac0940102030404c0a3475055c091c000ae66756c6c5f617474656e74696f6ec094ac426c6f636b52656d6f76656491cf1a1eb4e3edd9361aa34750550091b0416c6c426c6f636b73436c656172656400";
    let unhex =
        |s: &str| (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect::<Vec<u8>>();
    let want = vec![
        Ev::Stored {
            hashes: vec![1882140585328457242],
            parent: None,
            tokens: vec![1, 2, 3, 4],
            block_size: 4,
            medium: "GPU".into(),
        },
        Ev::Removed { hashes: vec![1882140585328457242] },
        Ev::Cleared,
    ];
    for hex in [map, arr] {
        let (ts, evs, dp) = decode(&unhex(hex));
        assert_eq!(ts, 1700000000.5);
        assert_eq!(evs, want);
        assert_eq!(dp, Mp::from(0));
    }
    // And the encoder the mock uses produces exactly these bytes.
    let batch = gantry_kvindex::KvEventBatch {
        ts: 1700000000.5,
        events: vec![
            gantry_kvindex::KvEvent::BlockStored(gantry_kvindex::events::BlockStored {
                block_hashes: vec![1882140585328457242],
                token_ids: vec![1, 2, 3, 4],
                block_size: 4,
                medium: Some("GPU".into()),
                extra_keys: Some(vec![None]),
                group_idx: Some(0),
                kv_cache_spec_kind: Some("full_attention".into()),
                ..Default::default()
            }),
            gantry_kvindex::KvEvent::BlockRemoved(gantry_kvindex::events::BlockRemoved {
                block_hashes: vec![1882140585328457242],
                medium: Some("GPU".into()),
                group_idx: Some(0),
            }),
            gantry_kvindex::KvEvent::AllBlocksCleared,
        ],
        data_parallel_rank: Some(0),
    };
    let mut out = Vec::new();
    gantry_kvindex::encode_batch(&batch, gantry_kvindex::WireFormat::Map, &mut out);
    assert_eq!(out, unhex(map));
}

/// DEALER replay client: `[<empty>, start_seq]` out; `[<empty>, topic, seq, payload]` back.
fn replay(ctx: &zmq::Context, endpoint: &str, from: u64) -> Vec<(u64, Vec<Ev>)> {
    let d = ctx.socket(zmq::DEALER).unwrap();
    d.set_rcvtimeo(5000).unwrap();
    d.connect(endpoint).unwrap();
    d.send_multipart([&b""[..], &from.to_be_bytes()[..]], 0).unwrap();
    let mut out = Vec::new();
    loop {
        let frames = d.recv_multipart(0).expect("replay reply before the timeout");
        assert_eq!(frames.len(), 4, "0.33 framing: empty, topic, seq, payload");
        assert!(frames[0].is_empty());
        let seq = u64::from_be_bytes(frames[2][..].try_into().unwrap());
        if seq == u64::MAX {
            assert!(frames[3].is_empty());
            return out;
        }
        out.push((seq, decode(&frames[3]).1));
    }
}

#[test]
fn replay_fills_a_gap() {
    let m = start(EVENTS);
    let e = &m.engines[0];
    let ctx = zmq::Context::new();
    // Traffic before anyone subscribes: these batches are missed live.
    for i in 0..5 {
        let body = json!({"model": "mock-model", "prompt": words(20 + i, 40), "max_tokens": 1});
        assert_eq!(post(e.http, "/v1/completions", &body).status, 200);
    }
    let sub = Sub::join(&ctx, e.kv_events.as_deref().unwrap(), e.http);
    let joined_at = sub.last_seq.unwrap();
    assert!(joined_at >= 5, "the joining batch came after the missed ones (seq {joined_at})");
    let replayed = replay(&ctx, e.kv_replay.as_deref().unwrap(), 0);
    let seqs: Vec<u64> = replayed.iter().map(|(s, _)| *s).collect();
    assert!(seqs.len() as u64 > joined_at, "{seqs:?}");
    assert_eq!(seqs[..=joined_at as usize], (0..=joined_at).collect::<Vec<u64>>()[..], "every batch from 0, in order");
    let stored: usize = replayed
        .iter()
        .flat_map(|(_, evs)| evs)
        .map(|e| if let Ev::Stored { hashes, .. } = e { hashes.len() } else { 0 })
        .sum();
    assert_eq!(stored, 5 * 2, "each 40-token prompt stored 2 blocks of 16");
    let tail = replay(&ctx, e.kv_replay.as_deref().unwrap(), joined_at);
    assert_eq!(tail.first().map(|(s, _)| *s), Some(joined_at), "replay starts at the asked sequence");
}

#[test]
fn several_engines_publish_independently() {
    let mut flags = vec!["--engines", "3"];
    flags.extend_from_slice(EVENTS);
    let m = start(&flags);
    assert_eq!(m.engines.len(), 3);
    let ports: std::collections::HashSet<u16> = m.engines.iter().map(|e| e.http.port()).collect();
    assert_eq!(ports.len(), 3);
    let eps: std::collections::HashSet<&str> = m.engines.iter().map(|e| e.kv_events.as_deref().unwrap()).collect();
    assert_eq!(eps.len(), 3);
    let body = json!({"model": "mock-model", "prompt": words(7, 50), "max_tokens": 1});
    assert_eq!(post(m.engines[1].http, "/v1/completions", &body).status, 200);
    assert_eq!(
        post(m.engines[1].http, "/v1/completions", &body).json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        48
    );
    assert_eq!(
        post(m.engines[2].http, "/v1/completions", &body).json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        0
    );
    let ctx = zmq::Context::new();
    for (i, e) in m.engines.iter().enumerate() {
        let replayed = replay(&ctx, e.kv_replay.as_deref().unwrap(), 0);
        let want = match i {
            1 => 1,
            2 => 1,
            _ => 0,
        };
        assert_eq!(replayed.len(), want, "engine {i} published only its own batches");
        let gen = metric(&get(e.http, "/metrics").text(), "vllm:generation_tokens_total", "").unwrap();
        assert_eq!(gen, [0.0, 2.0, 1.0][i]);
    }
}
