//! Block-hash tests against the spec §1.8 vectors (verified with CPython 3.11 and cbor2 6.3).

use super::*;

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn digest(s: &str) -> [u8; 32] {
    unhex(s).try_into().unwrap()
}

struct Vector {
    algo: VllmHashAlgo,
    none_hash: &'static str,
    block0: &'static str,
    block1: &'static str,
    block0_u64: u64,
    block1_u64: u64,
}

const VECTORS: [Vector; 2] = [
    Vector {
        algo: VllmHashAlgo::Sha256Cbor,
        none_hash: "9bd96a485ad84efdafb72ee48a1d7a69bcead0f8f0433173941b276b9581eef0",
        block0: "58d0879dff3800f65f8c5fd449d73048c0f7699dd238a03b84b146b151d55111",
        block1: "e1bc29393a2da9fd798f35ff04d215f846aee6df4b803ce3d43b57df56b58fb1",
        block0_u64: 9561501211280363793,
        block1_u64: 15292913576410714033,
    },
    Vector {
        algo: VllmHashAlgo::Sha256,
        none_hash: "066b1e8987e027138e98701c46128929378935f9b6cd1549105ae6b4f0d71198",
        block0: "52a7f141c60918f65779927090482b5a24adbe68c8613a211a1eb4e3edd9361a",
        block1: "bee96bce54f5fcaba04c4a3fc2491b30b48e29dbbd38a327d41bc1f76b956dde",
        block0_u64: 1882140585328457242,
        block1_u64: 15284023028817948126,
    },
];

#[test]
fn spec_test_vectors() {
    let tokens = [1, 2, 3, 4, 5, 6, 7, 8];
    for v in &VECTORS {
        let none = none_hash(v.algo);
        assert_eq!(none, digest(v.none_hash), "{:?} NONE_HASH", v.algo);
        let b0 = hash_block(v.algo, &none, &tokens[..4]);
        let b1 = hash_block(v.algo, &b0, &tokens[4..]);
        assert_eq!(b0, digest(v.block0), "{:?} block 0", v.algo);
        assert_eq!(b1, digest(v.block1), "{:?} block 1", v.algo);
        assert_eq!(digest_to_u64(&b0), v.block0_u64);
        assert_eq!(digest_to_u64(&b1), v.block1_u64);
        assert_eq!(hash_blocks(v.algo, &tokens, 4), vec![b0, b1]);
        // A trailing partial block is not hashed.
        assert_eq!(hash_blocks(v.algo, &tokens[..7], 4), vec![b0]);
    }
}

#[test]
fn cbor_serialization_bytes() {
    assert_eq!(cbor::dumps_str(NONE_HASH_SEED), unhex("6e 766c6c6d2d6e6f6e652d68617368"));
    let none = none_hash(VllmHashAlgo::Sha256Cbor);
    let mut want = unhex("83 58 20");
    want.extend_from_slice(&none);
    want.extend_from_slice(&unhex("84 01 02 03 04 f6"));
    assert_eq!(serialize_block(VllmHashAlgo::Sha256Cbor, &none, &[1, 2, 3, 4]), want);

    let big = serialize_block(VllmHashAlgo::Sha256Cbor, &none, &[1, 300, 70000, 1 << 31, 151644]);
    assert_eq!(&big[35..big.len() - 1], unhex("85 01 19012c 1a00011170 1a80000000 1a0002505c").as_slice());
    // Width boundaries: 23/24 and 255/256 and 65535/65536, u32::MAX.
    let edges = serialize_block(VllmHashAlgo::Sha256Cbor, &none, &[23, 24, 255, 256, 65535, 65536, u32::MAX]);
    assert_eq!(&edges[35..edges.len() - 1], unhex("87 17 1818 18ff 190100 19ffff 1a00010000 1affffffff").as_slice());
    let empty = serialize_block(VllmHashAlgo::Sha256Cbor, &none, &[]);
    assert_eq!(&empty[35..], &[0x80, 0xf6]);
}

#[test]
fn pickle_serialization_bytes() {
    let mut seed = unhex("80 05 95 12 00 00 00 00 00 00 00 8c 0e");
    seed.extend_from_slice(NONE_HASH_SEED.as_bytes());
    seed.extend_from_slice(&[0x94, 0x2e]);
    assert_eq!(pickle::dumps_str(NONE_HASH_SEED), seed);

    let none = none_hash(VllmHashAlgo::Sha256);
    let mut want = unhex("80 05 95 32 00 00 00 00 00 00 00 43 20");
    want.extend_from_slice(&none);
    want.extend_from_slice(&unhex("94 28 4b 01 4b 02 4b 03 4b 04 74 94 4e 87 94 2e"));
    assert_eq!(serialize_block(VllmHashAlgo::Sha256, &none, &[1, 2, 3, 4]), want);
}

/// Frame length = everything after the 11-byte PROTO+FRAME header; body after `43 20 <32> 94`.
fn pickle_body(tokens: &[u32]) -> Vec<u8> {
    let bytes = serialize_block(VllmHashAlgo::Sha256, &[7; 32], tokens);
    assert_eq!(&bytes[..3], &[0x80, 0x05, 0x95]);
    let frame_len = u64::from_le_bytes(bytes[3..11].try_into().unwrap());
    assert_eq!(frame_len as usize, bytes.len() - 11, "frame length for {tokens:?}");
    assert_eq!(&bytes[11..13], &[0x43, 0x20]);
    assert_eq!(bytes[45], 0x94);
    bytes[46..].to_vec()
}

#[test]
fn pickle_tuple_shapes_and_int_widths() {
    // Empty tuple: EMPTY_TUPLE, not memoized.
    assert_eq!(pickle_body(&[]), unhex("29 4e 87 94 2e"));
    // 1-3 elements: TUPLE1/2/3 without MARK, then MEMOIZE.
    assert_eq!(pickle_body(&[9]), unhex("4b 09 85 94 4e 87 94 2e"));
    assert_eq!(pickle_body(&[9, 10]), unhex("4b 09 4b 0a 86 94 4e 87 94 2e"));
    assert_eq!(pickle_body(&[9, 10, 11]), unhex("4b 09 4b 0a 4b 0b 87 94 4e 87 94 2e"));
    // > 3 elements and every int width: BININT1, BININT2, BININT (signed 32-bit), LONG1.
    assert_eq!(
        pickle_body(&[255, 256, 65535, 65536, 0x7fff_ffff, 0x8000_0000, u32::MAX]),
        unhex(
            "28 4b ff 4d 00 01 4d ff ff 4a 00 00 01 00 4a ff ff ff 7f
             8a 05 00 00 00 80 00 8a 05 ff ff ff ff 00 74 94 4e 87 94 2e"
        )
    );
    // A typical 16-token block stays one frame.
    let block: Vec<u32> = (0..16).map(|i| 151_000 + i).collect();
    let body = pickle_body(&block);
    assert_eq!(body.len(), 1 + 16 * 5 + 6);
}

#[test]
fn pickle_huge_block_splits_frames() {
    // 20k tokens of 5 bytes each: the first frame closes at the first save() once >= 64 KiB.
    let tokens = vec![70_000u32; 20_000];
    let bytes = serialize_block(VllmHashAlgo::Sha256, &[1; 32], &tokens);
    let first = u64::from_le_bytes(bytes[3..11].try_into().unwrap()) as usize;
    // 34 (SHORT_BINBYTES) + 1 (MEMOIZE) + 1 (MARK) + 5*k >= 65536 first at k = 13100.
    assert_eq!(first, 36 + 5 * 13_100);
    let second = 11 + first;
    assert_eq!(bytes[second], 0x95);
    let rest = u64::from_le_bytes(bytes[second + 1..second + 9].try_into().unwrap()) as usize;
    assert_eq!(second + 9 + rest, bytes.len());
    assert_eq!(rest, 5 * 6_900 + 6);
}

#[test]
fn digest_to_u64_reads_last_eight_bytes_big_endian() {
    let mut d = [0xaa; 32];
    d[24..].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(digest_to_u64(&d), 0x0102_0304_0506_0708);
}

/// A first block keyed by a cache salt, against CPython 3.11.7's `pickle.dumps(.., protocol=5)`
/// and cbor2 5.x `dumps(.., canonical=True)` of `(bytes(range(32)), (1, 2, 3, 4),
/// (("cache_salt", salt),))`, SHA-256: a short salt, one over 255 bytes (`BINUNICODE`) and one
/// over 64 KiB (written outside the pickle frame).
#[test]
fn salted_blocks_match_cpython_and_cbor2() {
    let parent: [u8; 32] = std::array::from_fn(|i| i as u8);
    let cases = [
        (
            "tenant-a".to_owned(),
            "a1bec86cf7c39b2cc4ff28c4cd642331b7523ad41e1d9c98474ac134be828242",
            "1e59f777432caf9d833962b74ad37f7ba9b6b9b69eb487030e3bd0de12414082",
        ),
        (
            "x".repeat(300),
            "145c7729fe486a10490274d8accbf8f91931f782c0c31042fbda43b15346bef8",
            "e84458a23efeda36837d1b1f55f9c584dbfdb47f1a22a2555346acbd2523d555",
        ),
        (
            "y".repeat(70_000),
            "9264557474303e9ab32c07b4c4f685c3d2bcb97c113a5bbb89d37553beb88d82",
            "615777aee776187f837db9735c7dcc7540051fc9a1ed7b5639516091ba588a29",
        ),
    ];
    for (salt, pickled, cbor) in cases {
        let n = salt.len();
        assert_eq!(
            hash_block_salted(VllmHashAlgo::Sha256, &parent, &[1, 2, 3, 4], Some(&salt)),
            digest(pickled),
            "pickle, {n}-byte salt"
        );
        assert_eq!(
            hash_block_salted(VllmHashAlgo::Sha256Cbor, &parent, &[1, 2, 3, 4], Some(&salt)),
            digest(cbor),
            "cbor, {n}-byte salt"
        );
    }
    assert_eq!(
        cbor::dumps_block(&parent, &[1, 2, 3, 4], &[VllmExtraKey::CacheSalt("tenant-a")]),
        unhex("835820 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f 8401020304 81826a63616368655f73616c746874656e616e742d61")
    );
    assert_eq!(
        hash_block_salted(VllmHashAlgo::Sha256, &parent, &[1, 2, 3, 4], None),
        hash_block(VllmHashAlgo::Sha256, &parent, &[1, 2, 3, 4])
    );
}

#[test]
fn lora_blocks_match_cpython_and_cbor2() {
    // Digests from CPython 3.11 pickle (protocol 5) and cbor2 (canonical) of
    // (bytes(range(32)), (1, 2, 3, 4), extra), the strings distinct objects as in vLLM.
    let parent: [u8; 32] = std::array::from_fn(|i| i as u8);
    let lora = VllmExtraKey::Lora { name: "sql-lora", path: "/adapters/sql" };
    let salt = VllmExtraKey::CacheSalt("tenant-a");
    let cases: [(&[VllmExtraKey<'_>], &str, &str); 2] = [
        (
            &[lora],
            "dfb94b112590d8fbd767cc4642e366d142b65267f1b0c06cc6406a6a9a3743d8",
            "fa7474ecc0dc79773e99c83ad0026d856135b5ad0f3606f82c5060395ec11121",
        ),
        (
            &[lora, salt],
            "7c889d556d144af64943cfe781a6c9a565e3b64aecbbb69438ea67fa001a8533",
            "bd98bfb6833792294ebbf3697349e54929419bc3eaf5726171140ae62a84bc6f",
        ),
    ];
    for (keys, pickled, cbor) in cases {
        assert_eq!(hash_block_keyed(VllmHashAlgo::Sha256, &parent, &[1, 2, 3, 4], keys), digest(pickled), "{keys:?}");
        assert_eq!(hash_block_keyed(VllmHashAlgo::Sha256Cbor, &parent, &[1, 2, 3, 4], keys), digest(cbor), "{keys:?}");
    }
    assert_eq!(
        pickle::dumps_block(&parent, &[1, 2, 3, 4], &[lora, salt]),
        unhex(
            "80059571000000000000004320000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f94284b014b024b034b0474948c046c6f7261948c0873716c2d6c6f7261948c0d2f61646170746572732f73716c9487948c0a63616368655f73616c74948c0874656e616e742d61948694869487942e"
        )
    );
    assert_eq!(
        cbor::dumps_block(&parent, &[1, 2, 3, 4], &[lora, salt]),
        unhex("835820 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f 8401020304 82 83646c6f72616873716c2d6c6f72616d2f61646170746572732f73716c 826a63616368655f73616c746874656e616e742d61")
    );
}
