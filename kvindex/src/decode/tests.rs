//! Decoder tests: spec §1.9 bytes in both forms, round trips through `encode_batch`, odd hash
//! encodings, unknown tags and keys, errors, and truncated or random input (never a panic).

use super::*;
use crate::events::{encode_batch, BlockRemoved, BlockStored, ExtraKey, KvEvent, KvEventBatch, WireFormat};
use rmpv::Value;

/// Block-0 hash of the spec §1.8 test vector (sha256/pickle, tokens `[1,2,3,4]`).
const HASH: u64 = 1882140585328457242;
/// The full digest of that block; its last 8 bytes are `HASH`.
const DIGEST_HEX: &str = "52a7f141c60918f65779927090482b5a24adbe68c8613a211a1eb4e3edd9361a";

const MAP_HEX: &str = "93cb41d954fc4020000093de000ba474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657391cf1a1eb4e3edd9361ab1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f6964739401020304aa626c6f636b5f73697a6504a76c6f72615f6964c0a66d656469756da3475055a96c6f72615f6e616d65c0aa65787472615f6b65797391c0a967726f75705f69647800b26b765f63616368655f737065635f6b696e64ae66756c6c5f617474656e74696f6e84a474797065ac426c6f636b52656d6f766564ac626c6f636b5f68617368657391cf1a1eb4e3edd9361aa66d656469756da3475055a967726f75705f6964780081a474797065b0416c6c426c6f636b73436c656172656400";

const ARRAY_HEX: &str = "93cb41d954fc40200000939cab426c6f636b53746f72656491cf1a1eb4e3edd9361ac0940102030404c0a3475055c091c000ae66756c6c5f617474656e74696f6ec094ac426c6f636b52656d6f76656491cf1a1eb4e3edd9361aa34750550091b0416c6c426c6f636b73436c656172656400";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// What both §1.9 payloads decode to.
fn worked_example() -> DecodedBatch<'static> {
    DecodedBatch {
        ts: 1700000000.5,
        events: vec![
            DecodedEvent::BlockStored(StoredEvent {
                block_hashes: vec![HASH],
                parent_block_hash: None,
                token_ids: vec![1, 2, 3, 4],
                block_size: Some(4),
                lora_id: None,
                medium: Some("GPU"),
                lora_name: None,
                extra_keys: Some(vec![None]),
                group_idx: Some(0),
                kv_cache_spec_kind: Some("full_attention"),
                kv_cache_spec_sliding_window: None,
            }),
            DecodedEvent::BlockRemoved(RemovedEvent {
                block_hashes: vec![HASH],
                medium: Some("GPU"),
                group_idx: Some(0),
            }),
            DecodedEvent::AllBlocksCleared,
        ],
        data_parallel_rank: Some(0),
        unknown_events: 0,
        unknown_fields: 0,
    }
}

#[test]
fn worked_example_map_form() {
    let bytes = unhex(MAP_HEX);
    assert_eq!(bytes.len(), 277);
    assert_eq!(decode_batch(&bytes).unwrap(), worked_example());
}

#[test]
fn worked_example_array_form() {
    let bytes = unhex(ARRAY_HEX);
    assert_eq!(bytes.len(), 114);
    assert_eq!(decode_batch(&bytes).unwrap(), worked_example());
}

/// msgpack writer for hand-built inputs (the encoder's own writer is private to `events`).
#[derive(Default)]
struct W(Vec<u8>);

impl W {
    fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    fn s(self, s: &str) -> Self {
        assert!(s.len() < 32);
        self.raw(&[0xa0 | s.len() as u8]).raw(s.as_bytes())
    }
    fn arr(self, n: usize) -> Self {
        assert!(n < 16);
        self.raw(&[0x90 | n as u8])
    }
    fn map(self, n: usize) -> Self {
        assert!(n < 16);
        self.raw(&[0x80 | n as u8])
    }
    /// `[1.5, <n events follow>` for a batch of `len` (2 or 3) elements.
    fn batch(len: usize, events: usize) -> Self {
        W::default().arr(len).raw(&[0xcb]).raw(&1.5f64.to_be_bytes()).arr(events)
    }
}

#[test]
fn round_trips_random_batches_in_both_forms() {
    let mut rng = fastrand::Rng::with_seed(0x6b76_6576);
    for i in 0..400 {
        let batch = random_batch(&mut rng);
        for format in [WireFormat::Map, WireFormat::Array] {
            let mut bytes = Vec::new();
            encode_batch(&batch, format, &mut bytes);
            let decoded = decode_batch(&bytes).unwrap_or_else(|e| panic!("batch {i} ({format:?}): {e}"));
            assert_same(&batch, &decoded, &format!("batch {i} ({format:?})"));
        }
    }
}

#[test]
fn negative_int_hashes_are_reinterpreted() {
    // Legacy array BlockStored with hashes -1 (fixint), -33 (int8), i64::MIN (int64), a negative
    // parent (int16) and a large positive uint64.
    let mut i64min = vec![0xd3];
    i64min.extend_from_slice(&i64::MIN.to_be_bytes());
    let bytes = W::batch(3, 1)
        .arr(5)
        .s("BlockStored")
        .arr(4)
        .raw(&[0xff, 0xd0, 0xdf])
        .raw(&i64min)
        .raw(&[0xcf, 0xff, 0, 0, 0, 0, 0, 0, 1])
        .raw(&[0xd1, 0xff, 0x7f]) // -129
        .arr(0)
        .raw(&[4])
        .raw(&[0xc0])
        .0;
    let batch = decode_batch(&bytes).unwrap();
    let DecodedEvent::BlockStored(e) = &batch.events[0] else { panic!("{batch:?}") };
    assert_eq!(e.block_hashes, [u64::MAX, (-33i64) as u64, 1 << 63, 0xff00_0000_0000_0001]);
    assert_eq!(e.parent_block_hash, Some((-129i64) as u64));
    assert_eq!(e.block_size, Some(4));
    assert_eq!(e.medium, None, "position 6 not reached");
}

#[test]
fn bin_hashes_fold_to_their_last_eight_bytes() {
    let digest = unhex(DIGEST_HEX);
    let mut w = W::batch(3, 1).map(3).s("type").s("BlockRemoved").s("block_hashes").arr(3);
    w = w.raw(&[0xc4, 32]).raw(&digest); // bin8, 32 bytes: vLLM's int-mode value
    w = w.raw(&[0xc5, 0, 3, 0x01, 0x02, 0x03]); // bin16, 3 bytes: zero-extended
    w = w.raw(&[0xc6, 0, 0, 0, 0]); // bin32, empty
    let bytes = w.s("medium").s("CPU").raw(&[0xc0]).0;
    let batch = decode_batch(&bytes).unwrap();
    assert_eq!(
        batch.events,
        [DecodedEvent::BlockRemoved(RemovedEvent {
            block_hashes: vec![HASH, 0x010203, 0],
            medium: Some("CPU"),
            group_idx: None
        })]
    );
    assert_eq!(batch.data_parallel_rank, None);
    assert_eq!(crate::vllm_hash::digest_to_u64(&digest.try_into().unwrap()), HASH, "same fold as int mode");
}

#[test]
fn batch_of_two_elements_and_integer_or_float32_ts() {
    let bytes = W::default().arr(2).raw(&[0x05]).arr(1).arr(1).s("AllBlocksCleared").0;
    let batch = decode_batch(&bytes).unwrap();
    assert_eq!((batch.ts, batch.data_parallel_rank), (5.0, None));
    assert_eq!(batch.events, [DecodedEvent::AllBlocksCleared]);

    let mut w = W::default().arr(3).raw(&[0xca]).raw(&2.5f32.to_be_bytes()).arr(0);
    w = w.raw(&[0xd0, 0xfe]); // rank -2
    let batch = decode_batch(&w.0).unwrap();
    assert_eq!((batch.ts, batch.data_parallel_rank, batch.events.len()), (2.5, Some(-2), 0));
}

#[test]
fn unknown_tags_and_keys_are_skipped_and_counted() {
    let mut w = W::batch(3, 6);
    // 1. Unknown tag, map form, with nested values and "type" not first.
    w = w.map(2).s("payload").map(1).s("x").arr(2).raw(&[0xc3, 0xd4, 7, 7]).s("type").s("BlockMoved");
    // 2. BlockStored map with "type" last and 0.33 fields this decoder does not read.
    w = w.map(6).s("block_hashes").arr(1).raw(&[9]);
    w = w.s("token_ids").arr(2).raw(&[1, 2]).s("block_size").raw(&[2]);
    w = w.s("locality").s("LOCAL").s("lookahead_token_ids").arr(1).arr(2).raw(&[3, 4]);
    w = w.s("type").s("BlockStored");
    // 3. Unknown tag, array form.
    w = w.arr(3).s("Future").raw(&[0x01]).raw(&[0xc7, 2, 5, 0xaa, 0xbb]);
    // 4. Legacy BlockStored array with only its tag.
    w = w.arr(1).s("BlockStored");
    // 5. BlockRemoved array with one position beyond the known ones; AllBlocksCleared with a key.
    w = w.arr(5).s("BlockRemoved").arr(1).raw(&[7]).raw(&[0xc0, 0xc0]).raw(&[0xc2]);
    w = w.map(2).s("type").s("AllBlocksCleared").s("session_id").s("abc");
    let bytes = w.raw(&[0x01]).0;
    let batch = decode_batch(&bytes).unwrap();
    assert_eq!(batch.unknown_events, 2);
    assert_eq!(batch.unknown_fields, 4, "locality, lookahead_token_ids, BlockRemoved[4], session_id");
    assert_eq!(
        batch.events,
        [
            DecodedEvent::BlockStored(StoredEvent {
                block_hashes: vec![9],
                token_ids: vec![1, 2],
                block_size: Some(2),
                ..StoredEvent::default()
            }),
            DecodedEvent::BlockStored(StoredEvent::default()),
            DecodedEvent::BlockRemoved(RemovedEvent { block_hashes: vec![7], medium: None, group_idx: None }),
            DecodedEvent::AllBlocksCleared,
        ]
    );
    assert_eq!(batch.data_parallel_rank, Some(1));
}

#[test]
fn extra_keys_keep_each_entry_as_raw_msgpack() {
    let entry = W::default().arr(2).s("lora-a").arr(2).s("mm-hash").raw(&[0xcd, 1, 0]).0;
    let bytes = W::batch(2, 1)
        .arr(9)
        .s("BlockStored")
        .arr(2)
        .raw(&[1, 2])
        .raw(&[0xc0])
        .arr(2)
        .raw(&[5, 6])
        .raw(&[1])
        .raw(&[0xc0, 0xc0, 0xc0])
        .arr(2)
        .raw(&entry)
        .raw(&[0xc0])
        .0;
    let batch = decode_batch(&bytes).unwrap();
    let DecodedEvent::BlockStored(e) = &batch.events[0] else { panic!() };
    assert_eq!(e.extra_keys, Some(vec![Some(entry.as_slice()), None]));
}

#[test]
fn malformed_input_is_an_error() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("not an array", vec![0x80]),
        ("batch of 4", W::default().arr(4).raw(&[0, 0x90, 0, 0]).0),
        ("batch of 1", W::default().arr(1).raw(&[0]).0),
        ("string ts", W::default().arr(2).s("now").arr(0).0),
        ("events not an array", W::default().arr(2).raw(&[0]).map(0).0),
        ("event is an int", W::batch(2, 1).raw(&[7]).0),
        ("empty event array", W::batch(2, 1).arr(0).0),
        ("tag not a string", W::batch(2, 1).arr(1).raw(&[1]).0),
        ("map without type", W::batch(2, 1).map(1).s("block_hashes").arr(0).0),
        ("non-string key", W::batch(2, 1).map(1).raw(&[1]).raw(&[2]).0),
        ("negative token", W::batch(2, 1).arr(4).s("BlockStored").arr(0).raw(&[0xc0]).arr(1).raw(&[0xff]).0),
        (
            "token >= 2^32",
            W::batch(2, 1).arr(4).s("BlockStored").arr(0).raw(&[0xc0]).arr(1).raw(&[0xcf, 0, 0, 0, 1, 0, 0, 0, 0]).0,
        ),
        ("string hash", W::batch(2, 1).arr(2).s("BlockRemoved").arr(1).s("h").0),
        ("bad utf-8 medium", W::batch(2, 1).arr(3).s("BlockRemoved").arr(0).raw(&[0xa2, 0xff, 0xfe]).0),
        ("rank out of i64", W::default().arr(3).raw(&[0]).arr(0).raw(&[0xcf, 0xff, 0, 0, 0, 0, 0, 0, 0]).0),
        ("trailing bytes", W::default().arr(2).raw(&[0]).arr(0).raw(&[0xc0]).0),
        ("reserved marker", W::batch(2, 1).arr(2).s("Unknown").raw(&[0xc1]).0),
        ("array32 of 2^32-1 events", W::default().arr(2).raw(&[0, 0xdd, 0xff, 0xff, 0xff, 0xff, 0xc0]).0),
        ("str32 of 2^32-1 bytes", W::batch(2, 1).arr(1).raw(&[0xdb, 0xff, 0xff, 0xff, 0xff, b'x']).0),
        ("map32 of 2^31 entries", W::batch(2, 1).raw(&[0xdf, 0x80, 0, 0, 0, 0xa0, 0xc0]).0),
    ];
    for (what, bytes) in cases {
        assert!(decode_batch(&bytes).is_err(), "{what}: {bytes:02x?} decoded");
    }
    let overrun = W::default().arr(2).raw(&[0, 0xdd, 0xff, 0xff, 0xff, 0xff, 0xc0]).0;
    assert!(matches!(decode_batch(&overrun), Err(DecodeError::LengthOverrun { at: 2, len: 0xffff_ffff, .. })));
    assert!(matches!(decode_batch(&[]), Err(DecodeError::Truncated { at: 0 })));
}

#[test]
fn nesting_is_bounded() {
    let nested = |depth: usize| {
        let mut w = W::batch(2, 1).arr(2).s("Deep");
        for _ in 0..depth {
            w = w.arr(1);
        }
        w.raw(&[0]).0
    };
    assert!(decode_batch(&nested(20)).is_ok());
    assert!(matches!(decode_batch(&nested(MAX_DEPTH + 5)), Err(DecodeError::TooDeep { .. })));
    // Deep enough to overflow the stack without the bound.
    assert!(decode_batch(&nested(1_000_000)).is_err());
}

#[test]
fn every_truncation_of_the_worked_examples_fails_cleanly() {
    for hex in [MAP_HEX, ARRAY_HEX] {
        let bytes = unhex(hex);
        for end in 0..bytes.len() {
            assert!(decode_batch(&bytes[..end]).is_err(), "prefix of {end} bytes decoded");
        }
    }
}

#[test]
fn random_and_mutated_input_never_panics() {
    let mut rng = fastrand::Rng::with_seed(42);
    let seeds = [unhex(MAP_HEX), unhex(ARRAY_HEX)];
    // Bytes that steer a random walk into msgpack structure.
    const MARKERS: [u8; 16] =
        [0x91, 0x93, 0x9f, 0x81, 0xde, 0xdc, 0xdd, 0xdf, 0xc0, 0xc4, 0xcf, 0xd3, 0xa4, 0xdb, 0xc9, 0xd8];
    let mut ok = 0;
    for i in 0..20_000 {
        let bytes: Vec<u8> = if i % 2 == 0 {
            let mut b = seeds[i % 4 / 2].clone();
            for _ in 0..rng.usize(1..4) {
                let at = rng.usize(..b.len());
                b[at] = if rng.bool() { rng.u8(..) } else { MARKERS[rng.usize(..MARKERS.len())] };
            }
            b.truncate(rng.usize(b.len() / 2..=b.len()));
            b
        } else {
            let mut b = vec![0x93, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0];
            for _ in 0..rng.usize(0..64) {
                b.push(if rng.bool() { MARKERS[rng.usize(..MARKERS.len())] } else { rng.u8(..) });
            }
            b
        };
        if let Ok(batch) = decode_batch(&bytes) {
            ok += 1;
            for e in &batch.events {
                if let DecodedEvent::BlockStored(s) = e {
                    for k in s.extra_keys.iter().flatten().flatten() {
                        assert!(!k.is_empty());
                    }
                }
            }
        }
    }
    assert!(ok > 0, "some mutations should still decode");
}

// ---------------------------------------------------------------------------------------------
// Random batches and the comparison with what was encoded.

fn random_batch(rng: &mut fastrand::Rng) -> KvEventBatch {
    let events = (0..rng.usize(0..6)).map(|_| random_event(rng)).collect();
    let ts = if rng.bool() { 1_700_000_000.25 } else { rng.f64() * 1e9 };
    KvEventBatch { ts, events, data_parallel_rank: rng.bool().then(|| rng.i64(-3..100)) }
}

fn random_u64(rng: &mut fastrand::Rng) -> u64 {
    const EDGES: [u64; 8] = [0, 127, 128, 255, 65536, u32::MAX as u64, u64::MAX, HASH];
    if rng.bool() {
        EDGES[rng.usize(..EDGES.len())]
    } else {
        rng.u64(..) >> rng.u32(0..64)
    }
}

fn random_str(rng: &mut fastrand::Rng) -> Option<String> {
    const S: [&str; 5] = ["GPU", "CPU", "full_attention", "", "a string longer than thirty-one bytes, é"];
    rng.bool().then(|| S[rng.usize(..S.len())].to_owned())
}

fn random_extra(rng: &mut fastrand::Rng, depth: u32) -> ExtraKey {
    match rng.u32(0..if depth > 2 { 4 } else { 5 }) {
        0 => ExtraKey::Nil,
        1 => ExtraKey::Int(rng.i64(..) >> rng.u32(0..64)),
        2 => ExtraKey::Str(random_str(rng).unwrap_or_default()),
        3 => ExtraKey::Bin((0..rng.u8(0..40)).collect()),
        _ => ExtraKey::Array((0..rng.usize(0..3)).map(|_| random_extra(rng, depth + 1)).collect()),
    }
}

fn random_event(rng: &mut fastrand::Rng) -> KvEvent {
    match rng.u32(0..3) {
        0 => {
            let n = rng.usize(0..20);
            let bs = rng.u32(1..20);
            KvEvent::BlockStored(BlockStored {
                block_hashes: (0..n).map(|_| random_u64(rng)).collect(),
                parent_block_hash: rng.bool().then(|| random_u64(rng)),
                token_ids: (0..n * bs as usize).map(|_| random_u64(rng) as u32).collect(),
                block_size: bs,
                lora_id: rng.bool().then(|| rng.i64(..)),
                medium: random_str(rng),
                lora_name: random_str(rng),
                extra_keys: rng.bool().then(|| {
                    (0..n)
                        .map(|_| rng.bool().then(|| (0..rng.usize(0..3)).map(|_| random_extra(rng, 0)).collect()))
                        .collect()
                }),
                group_idx: rng.bool().then(|| rng.u32(..)),
                kv_cache_spec_kind: random_str(rng),
                kv_cache_spec_sliding_window: rng.bool().then(|| rng.u32(..)),
            })
        }
        1 => KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: (0..rng.usize(0..4)).map(|_| random_u64(rng)).collect(),
            medium: random_str(rng),
            group_idx: rng.bool().then(|| rng.u32(..)),
        }),
        _ => KvEvent::AllBlocksCleared,
    }
}

fn extra_value(key: &ExtraKey) -> Value {
    match key {
        ExtraKey::Nil => Value::Nil,
        ExtraKey::Int(i) => Value::from(*i),
        ExtraKey::Str(s) => Value::from(s.as_str()),
        ExtraKey::Bin(b) => Value::Binary(b.clone()),
        ExtraKey::Array(items) => Value::Array(items.iter().map(extra_value).collect()),
    }
}

fn assert_same(want: &KvEventBatch, got: &DecodedBatch<'_>, ctx: &str) {
    assert_eq!(got.ts, want.ts, "{ctx}: ts");
    assert_eq!(got.data_parallel_rank, want.data_parallel_rank, "{ctx}: rank");
    assert_eq!((got.unknown_events, got.unknown_fields), (0, 0), "{ctx}");
    assert_eq!(got.events.len(), want.events.len(), "{ctx}: event count");
    for (i, (w, g)) in want.events.iter().zip(&got.events).enumerate() {
        let ctx = format!("{ctx} event {i}");
        match (w, g) {
            (KvEvent::BlockStored(w), DecodedEvent::BlockStored(g)) => {
                assert_eq!(g.block_hashes, w.block_hashes, "{ctx}");
                assert_eq!(g.parent_block_hash, w.parent_block_hash, "{ctx}");
                assert_eq!(g.token_ids, w.token_ids, "{ctx}");
                assert_eq!(g.block_size, Some(w.block_size), "{ctx}");
                assert_eq!(g.lora_id, w.lora_id, "{ctx}");
                assert_eq!(g.medium, w.medium.as_deref(), "{ctx}");
                assert_eq!(g.lora_name, w.lora_name.as_deref(), "{ctx}");
                assert_eq!(g.group_idx, w.group_idx.map(i64::from), "{ctx}");
                assert_eq!(g.kv_cache_spec_kind, w.kv_cache_spec_kind.as_deref(), "{ctx}");
                assert_eq!(g.kv_cache_spec_sliding_window, w.kv_cache_spec_sliding_window.map(i64::from), "{ctx}");
                let got_keys = g.extra_keys.as_ref().map(|keys| {
                    keys.iter()
                        .map(|k| k.map(|mut raw| rmpv::decode::read_value(&mut raw).expect("raw entry is msgpack")))
                        .collect::<Vec<_>>()
                });
                let want_keys = w.extra_keys.as_ref().map(|keys| {
                    keys.iter()
                        .map(|k| k.as_ref().map(|vals| Value::Array(vals.iter().map(extra_value).collect())))
                        .collect::<Vec<_>>()
                });
                assert_eq!(got_keys, want_keys, "{ctx}: extra_keys");
            }
            (KvEvent::BlockRemoved(w), DecodedEvent::BlockRemoved(g)) => {
                assert_eq!(g.block_hashes, w.block_hashes, "{ctx}");
                assert_eq!(g.medium, w.medium.as_deref(), "{ctx}");
                assert_eq!(g.group_idx, w.group_idx.map(i64::from), "{ctx}");
            }
            (KvEvent::AllBlocksCleared, DecodedEvent::AllBlocksCleared) => {}
            _ => panic!("{ctx}: {w:?} decoded as {g:?}"),
        }
    }
}
