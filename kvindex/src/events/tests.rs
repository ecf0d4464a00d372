//! Encoder tests: spec §1.9 bytes, edge widths, and random batches cross-checked with `rmpv`.

use super::*;
use rmpv::Value;

/// Block-0 hash of the spec §1.8 test vector (sha256/pickle, tokens `[1,2,3,4]`).
const HASH: u64 = 1882140585328457242;

const MAP_HEX: &str = "93cb41d954fc4020000093de000ba474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657391cf1a1eb4e3edd9361ab1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f6964739401020304aa626c6f636b5f73697a6504a76c6f72615f6964c0a66d656469756da3475055a96c6f72615f6e616d65c0aa65787472615f6b65797391c0a967726f75705f69647800b26b765f63616368655f737065635f6b696e64ae66756c6c5f617474656e74696f6e84a474797065ac426c6f636b52656d6f766564ac626c6f636b5f68617368657391cf1a1eb4e3edd9361aa66d656469756da3475055a967726f75705f6964780081a474797065b0416c6c426c6f636b73436c656172656400";

const ARRAY_HEX: &str = "93cb41d954fc40200000939cab426c6f636b53746f72656491cf1a1eb4e3edd9361ac0940102030404c0a3475055c091c000ae66756c6c5f617474656e74696f6ec094ac426c6f636b52656d6f76656491cf1a1eb4e3edd9361aa34750550091b0416c6c426c6f636b73436c656172656400";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn worked_example() -> KvEventBatch {
    KvEventBatch {
        ts: 1700000000.5,
        events: vec![
            KvEvent::BlockStored(BlockStored {
                block_hashes: vec![HASH],
                parent_block_hash: None,
                token_ids: vec![1, 2, 3, 4],
                block_size: 4,
                lora_id: None,
                medium: Some("GPU".into()),
                lora_name: None,
                extra_keys: Some(vec![None]),
                group_idx: Some(0),
                kv_cache_spec_kind: Some("full_attention".into()),
                kv_cache_spec_sliding_window: None,
            }),
            KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![HASH],
                medium: Some("GPU".into()),
                group_idx: Some(0),
            }),
            KvEvent::AllBlocksCleared,
        ],
        data_parallel_rank: Some(0),
    }
}

fn encode(batch: &KvEventBatch, format: WireFormat) -> Vec<u8> {
    let mut out = Vec::new();
    encode_batch(batch, format, &mut out);
    out
}

#[test]
fn worked_example_map_form() {
    let bytes = encode(&worked_example(), WireFormat::Map);
    assert_eq!(bytes.len(), 277);
    assert_eq!(bytes, unhex(MAP_HEX));
}

#[test]
fn worked_example_array_form() {
    let bytes = encode(&worked_example(), WireFormat::Array);
    assert_eq!(bytes.len(), 114);
    assert_eq!(bytes, unhex(ARRAY_HEX));
}

#[test]
fn default_format_is_map() {
    assert_eq!(WireFormat::default(), WireFormat::Map);
    const { assert!(BLOCK_STORED_DECLARED_FIELDS > 15) };
}

#[test]
fn encode_appends() {
    let mut out = vec![0xaa];
    encode_batch(&worked_example(), WireFormat::Map, &mut out);
    assert_eq!(out[0], 0xaa);
    assert_eq!(&out[1..], unhex(MAP_HEX).as_slice());
}

#[test]
fn nil_rank_and_minimal_block_stored() {
    let batch =
        KvEventBatch { ts: 0.0, events: vec![KvEvent::BlockStored(BlockStored::default())], data_parallel_rank: None };
    let bytes = encode(&batch, WireFormat::Map);
    // array(3), float64 0.0, array(1), map16(8) ..., nil rank.
    assert_eq!(&bytes[..14], &[0x93, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0x91, 0xde, 0x00, 0x08]);
    assert_eq!(*bytes.last().unwrap(), 0xc0);
    let mut arr = encode(&batch, WireFormat::Array);
    assert_eq!(arr.pop(), Some(0xc0));
    // Array form: every field present, trailing nils included.
    assert!(arr.ends_with(&[0x90, 0xc0, 0x90, 0x00, 0xc0, 0xc0, 0xc0, 0xc0, 0xc0, 0xc0, 0xc0]));
}

#[test]
fn integer_and_string_widths() {
    // (value, expected msgpack bytes) for the unsigned and signed forms msgspec picks.
    let uints: &[(u64, &[u8])] = &[
        (0, &[0x00]),
        (127, &[0x7f]),
        (128, &[0xcc, 0x80]),
        (255, &[0xcc, 0xff]),
        (256, &[0xcd, 0x01, 0x00]),
        (65535, &[0xcd, 0xff, 0xff]),
        (65536, &[0xce, 0x00, 0x01, 0x00, 0x00]),
        (u64::from(u32::MAX), &[0xce, 0xff, 0xff, 0xff, 0xff]),
        (1 << 32, &[0xcf, 0, 0, 0, 1, 0, 0, 0, 0]),
    ];
    for &(v, want) in uints {
        let mut out = Vec::new();
        msgpack::write_uint(&mut out, v);
        assert_eq!(out, want, "uint {v}");
    }
    let ints: &[(i64, &[u8])] = &[
        (5, &[0x05]),
        (-1, &[0xff]),
        (-32, &[0xe0]),
        (-33, &[0xd0, 0xdf]),
        (-128, &[0xd0, 0x80]),
        (-129, &[0xd1, 0xff, 0x7f]),
        (-32769, &[0xd2, 0xff, 0xff, 0x7f, 0xff]),
        (i64::MIN, &[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0]),
        (200, &[0xcc, 200]),
    ];
    for &(v, want) in ints {
        let mut out = Vec::new();
        msgpack::write_int(&mut out, v);
        assert_eq!(out, want, "int {v}");
    }
    for (len, header) in [
        (31usize, vec![0xbf]),
        (32, vec![0xd9, 32]),
        (255, vec![0xd9, 255]),
        (256, vec![0xda, 1, 0]),
        (65536, vec![0xdb, 0, 1, 0, 0]),
    ] {
        let s = "x".repeat(len);
        let mut out = Vec::new();
        msgpack::write_str(&mut out, &s);
        assert_eq!(&out[..header.len()], header.as_slice(), "str len {len}");
        assert_eq!(out.len(), header.len() + len);
    }
}

/// splitmix64: a tiny deterministic generator so the random test needs no extra dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self) -> bool {
        self.next() & 1 == 1
    }
    /// Values clustered on msgpack width boundaries.
    fn u64_edge(&mut self) -> u64 {
        const EDGES: [u64; 11] =
            [0, 127, 128, 255, 256, 65535, 65536, u32::MAX as u64, 1 << 32, u64::MAX, 1882140585328457242];
        if self.chance() {
            EDGES[self.below(EDGES.len() as u64) as usize]
        } else {
            self.next() >> self.below(64)
        }
    }
    fn u32_edge(&mut self) -> u32 {
        (self.u64_edge() & u64::from(u32::MAX)) as u32
    }
    fn i64_edge(&mut self) -> i64 {
        const EDGES: [i64; 10] = [-1, -32, -33, -128, -129, -32768, -32769, i64::MIN, 0, 300];
        if self.chance() {
            EDGES[self.below(EDGES.len() as u64) as usize]
        } else {
            self.next() as i64 >> self.below(64)
        }
    }
    fn string(&mut self) -> String {
        const LENS: [usize; 7] = [0, 3, 31, 32, 255, 256, 70000];
        let len = LENS[self.below(LENS.len() as u64) as usize];
        // Mix in a multi-byte char so byte length (not char count) drives the header.
        (0..len).map(|i| if i % 7 == 3 { 'é' } else { 'a' }).collect::<String>()
    }
    fn opt_string(&mut self) -> Option<String> {
        self.chance().then(|| self.string())
    }
    fn len(&mut self) -> usize {
        const LENS: [usize; 6] = [0, 1, 4, 15, 16, 300];
        LENS[self.below(LENS.len() as u64) as usize]
    }
    fn extra_key(&mut self, depth: u32) -> ExtraKey {
        match self.below(if depth > 1 { 4 } else { 5 }) {
            0 => ExtraKey::Nil,
            1 => ExtraKey::Int(self.i64_edge()),
            2 => ExtraKey::Str(self.string()),
            3 => ExtraKey::Bin((0..self.below(40)).map(|i| i as u8).collect()),
            _ => ExtraKey::Array((0..self.below(3)).map(|_| self.extra_key(depth + 1)).collect()),
        }
    }
    fn event(&mut self) -> KvEvent {
        match self.below(3) {
            0 => {
                let n = self.len();
                KvEvent::BlockStored(BlockStored {
                    block_hashes: (0..n).map(|_| self.u64_edge()).collect(),
                    parent_block_hash: self.chance().then(|| self.u64_edge()),
                    token_ids: (0..self.len()).map(|_| self.u32_edge()).collect(),
                    block_size: self.u32_edge(),
                    lora_id: self.chance().then(|| self.i64_edge()),
                    medium: self.opt_string(),
                    lora_name: self.opt_string(),
                    extra_keys: self.chance().then(|| {
                        (0..n)
                            .map(|_| self.chance().then(|| (0..self.below(3)).map(|_| self.extra_key(0)).collect()))
                            .collect()
                    }),
                    group_idx: self.chance().then(|| self.u32_edge()),
                    kv_cache_spec_kind: self.opt_string(),
                    kv_cache_spec_sliding_window: self.chance().then(|| self.u32_edge()),
                })
            }
            1 => KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: (0..self.len()).map(|_| self.u64_edge()).collect(),
                medium: self.opt_string(),
                group_idx: self.chance().then(|| self.u32_edge()),
            }),
            _ => KvEvent::AllBlocksCleared,
        }
    }
    fn batch(&mut self) -> KvEventBatch {
        KvEventBatch {
            ts: f64::from_bits(self.next() >> 2),
            events: (0..self.len().min(20)).map(|_| self.event()).collect(),
            data_parallel_rank: self.chance().then(|| self.i64_edge()),
        }
    }
}

// Expected structure, built independently of the encoder as `rmpv` values.

fn v_str(s: &str) -> Value {
    Value::from(s)
}
fn v_opt<T: Into<Value>>(v: Option<T>) -> Value {
    v.map_or(Value::Nil, Into::into)
}
fn v_u64s(v: &[u64]) -> Value {
    Value::Array(v.iter().map(|&x| Value::from(x)).collect())
}
fn v_key(k: &ExtraKey) -> Value {
    match k {
        ExtraKey::Nil => Value::Nil,
        ExtraKey::Int(i) => Value::from(*i),
        ExtraKey::Str(s) => v_str(s),
        ExtraKey::Bin(b) => Value::Binary(b.clone()),
        ExtraKey::Array(a) => Value::Array(a.iter().map(v_key).collect()),
    }
}
fn v_extra(keys: &[Option<Vec<ExtraKey>>]) -> Value {
    Value::Array(
        keys.iter().map(|b| b.as_ref().map_or(Value::Nil, |ks| Value::Array(ks.iter().map(v_key).collect()))).collect(),
    )
}

fn expected(batch: &KvEventBatch, format: WireFormat) -> Value {
    let events = batch
        .events
        .iter()
        .map(|e| {
            let (tag, fields): (&str, Vec<(&str, Option<Value>)>) = match e {
                KvEvent::BlockStored(b) => (
                    "BlockStored",
                    vec![
                        ("block_hashes", Some(v_u64s(&b.block_hashes))),
                        ("parent_block_hash", Some(v_opt(b.parent_block_hash))),
                        ("token_ids", Some(Value::Array(b.token_ids.iter().map(|&t| Value::from(t)).collect()))),
                        ("block_size", Some(Value::from(b.block_size))),
                        ("lora_id", Some(v_opt(b.lora_id))),
                        ("medium", Some(v_opt(b.medium.as_deref()))),
                        ("lora_name", Some(v_opt(b.lora_name.as_deref()))),
                        ("extra_keys", b.extra_keys.as_deref().map(v_extra)),
                        ("group_idx", b.group_idx.map(Value::from)),
                        ("kv_cache_spec_kind", b.kv_cache_spec_kind.as_deref().map(v_str)),
                        ("kv_cache_spec_sliding_window", b.kv_cache_spec_sliding_window.map(Value::from)),
                    ],
                ),
                KvEvent::BlockRemoved(b) => (
                    "BlockRemoved",
                    vec![
                        ("block_hashes", Some(v_u64s(&b.block_hashes))),
                        ("medium", Some(v_opt(b.medium.as_deref()))),
                        ("group_idx", b.group_idx.map(Value::from)),
                    ],
                ),
                KvEvent::AllBlocksCleared => ("AllBlocksCleared", vec![]),
            };
            match format {
                WireFormat::Map => Value::Map(
                    std::iter::once((v_str("type"), v_str(tag)))
                        .chain(fields.into_iter().filter_map(|(k, v)| v.map(|v| (v_str(k), v))))
                        .collect(),
                ),
                WireFormat::Array => Value::Array(
                    std::iter::once(v_str(tag))
                        .chain(fields.into_iter().map(|(_, v)| v.unwrap_or(Value::Nil)))
                        .collect(),
                ),
            }
        })
        .collect();
    Value::Array(vec![Value::F64(batch.ts), Value::Array(events), v_opt(batch.data_parallel_rank)])
}

/// Re-encodes a decoded value with `rmp`/`rmpv` (compact forms), except that a `BlockStored` map
/// gets msgspec's map16 header.
fn reencode(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Map(entries) => {
            if entries.first().is_some_and(|(k, v)| k.as_str() == Some("type") && v.as_str() == Some("BlockStored")) {
                out.push(0xde);
                out.extend_from_slice(&(entries.len() as u16).to_be_bytes());
            } else {
                rmp::encode::write_map_len(out, entries.len() as u32).unwrap();
            }
            for (k, v) in entries {
                reencode(k, out);
                reencode(v, out);
            }
        }
        Value::Array(items) => {
            rmp::encode::write_array_len(out, items.len() as u32).unwrap();
            items.iter().for_each(|v| reencode(v, out));
        }
        other => rmpv::encode::write_value(out, other).unwrap(),
    }
}

#[test]
fn random_batches_decode_with_rmpv() {
    let mut rng = Rng(0x6761_6e74_7279);
    for i in 0..300 {
        let batch = rng.batch();
        for format in [WireFormat::Map, WireFormat::Array] {
            let bytes = encode(&batch, format);
            let mut rd = bytes.as_slice();
            let decoded = rmpv::decode::read_value(&mut rd)
                .unwrap_or_else(|e| panic!("batch {i} {format:?}: rmpv cannot decode: {e}"));
            assert!(rd.is_empty(), "batch {i} {format:?}: trailing bytes");
            let want = expected(&batch, format);
            // ts is never NaN (top exponent bit cleared); compare bits anyway.
            let (Value::Array(got), Value::Array(exp)) = (&decoded, &want) else {
                panic!("batch {i}: outer not an array");
            };
            assert_eq!(got[0].as_f64().map(f64::to_bits), Some(batch.ts.to_bits()), "batch {i} ts");
            assert_eq!(got[1..], exp[1..], "batch {i} {format:?}: structure differs");
            let mut again = Vec::new();
            reencode(&decoded, &mut again);
            assert_eq!(again, bytes, "batch {i} {format:?}: not the compact encoding");
        }
    }
}
