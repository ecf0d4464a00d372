//! Unit tests for the built-in tokenizer: vocabulary layout, exact counts, roundtrips.

use crate::{builtin_word_text, builtin_words, Tokenizer, BUILTIN_VOCAB_SIZE, BUILTIN_WORD_COUNT};

#[test]
fn vocabulary_layout() {
    let words = builtin_words();
    assert_eq!(words.len(), BUILTIN_WORD_COUNT);
    assert_eq!(BUILTIN_WORD_COUNT, 8190);
    assert_eq!(BUILTIN_VOCAB_SIZE, 16_639);
    assert_eq!(&words[..6], ["ba", "be", "bi", "bo", "bu", "ca"]);
    assert_eq!(words[89], "zu");
    assert_eq!(&words[90..92], ["baba", "babe"]);
    assert_eq!(words[BUILTIN_WORD_COUNT - 1], "zuzu");
    let tok = Tokenizer::builtin();
    assert_eq!(tok.decode(&[259, 260, 261], false).expect("decode"), " baba be");
    assert_eq!(tok.decode(&[259], false).expect("decode"), " ba");
    assert_eq!(tok.decode(&[260], false).expect("decode"), "ba");
    assert_eq!(tok.decode(&[3 + b'A' as u32], false).expect("decode"), "A");
    assert_eq!(tok.eos_token_id(), Some(2));
    assert_eq!(tok.bos_token_id(), None);
}

#[test]
fn token_counts() {
    let tok = Tokenizer::builtin();
    // (text, expected ids)
    let cases: &[(&str, &[u32])] = &[
        ("", &[]),
        // "bado" = word 90 + 0*90 + 13 (d=2, o=3); "kema" = 90 + 36*90 + 45 (k=7, e=1; m=9, a=0)
        (" bado kema", &[259 + 2 * 103, 259 + 2 * 3375]),
        ("ba", &[260]),
        (" ba", &[259]),
        ("  ba", &[3 + 32, 259]),
        ("x", &[3 + b'x' as u32]),
        (" xyz", &[3 + 32, 3 + b'x' as u32, 3 + b'y' as u32, 3 + b'z' as u32]),
        ("ba!", &[260, 3 + b'!' as u32]),
        ("<|im_start|>ba<|im_end|>", &[1, 260, 2]),
        ("<|endoftext|>", &[0]),
        (
            "<|im_sta",
            &[
                3 + b'<' as u32,
                3 + b'|' as u32,
                3 + b'i' as u32,
                3 + b'm' as u32,
                3 + b'_' as u32,
                3 + b's' as u32,
                3 + b't' as u32,
                3 + b'a' as u32,
            ],
        ),
        // 6 letters: not a word, so every byte is a byte token
        ("badoke", &[3 + 98, 3 + 97, 3 + 100, 3 + 111, 3 + 107, 3 + 101]),
    ];
    for (text, want) in cases {
        let got = tok.encode(text, true).expect("encode");
        assert_eq!(&got, want, "{text:?}");
        assert_eq!(tok.decode(&got, false).expect("decode"), *text);
    }
    for n in [0, 1, 7, 100, 2048, 10_000] {
        let text = builtin_word_text(n, n);
        assert_eq!(tok.encode(&text, false).expect("encode").len(), n, "{n} words");
    }
    let all: String = builtin_words().iter().map(|w| format!(" {w}")).collect();
    let ids = tok.encode(&all, false).expect("encode");
    assert_eq!(ids, (0..BUILTIN_WORD_COUNT as u32).map(|w| 259 + 2 * w).collect::<Vec<_>>());
}

/// xorshift64*: a tiny seeded PRNG.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed >> 12;
    *seed ^= *seed << 25;
    *seed ^= *seed >> 27;
    seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

#[test]
fn roundtrip() {
    let tok = Tokenizer::builtin();
    for s in [
        "Hello, World!\n",
        "naïve café 日本語 😀",
        " bado  kema\tfitu ",
        "<|im_start|>user\nhi<|im_end|>",
        "\u{0}\u{7f}",
    ] {
        let ids = tok.encode(s, false).expect("encode");
        assert_eq!(tok.decode(&ids, false).expect("decode"), s);
        assert!(ids.iter().all(|&id| id < tok.vocab_size()));
    }
    let pieces = ["ba", "do", " ", "ke", "x", "<|", "im_end|>", "é", "😀", "\n", "Z", "zuzu"];
    let mut seed = 7;
    for _ in 0..2000 {
        let n = (next(&mut seed) % 20) as usize;
        let s: String = (0..n).map(|_| pieces[(next(&mut seed) % pieces.len() as u64) as usize]).collect();
        let ids = tok.encode(&s, false).expect("encode");
        assert_eq!(tok.decode(&ids, false).expect("decode"), s);
    }
    // Random bytes: any valid UTF-8 string roundtrips; invalid byte tokens decode lossily.
    for _ in 0..2000 {
        let n = (next(&mut seed) % 24) as usize;
        let bytes: Vec<u8> = (0..n).map(|_| next(&mut seed) as u8).collect();
        let s = String::from_utf8_lossy(&bytes);
        let ids = tok.encode(&s, false).expect("encode");
        assert_eq!(tok.decode(&ids, false).expect("decode"), s);
        let byte_ids: Vec<u32> = bytes.iter().map(|&b| 3 + b as u32).collect();
        assert_eq!(tok.decode(&byte_ids, false).expect("decode"), s);
    }
}

#[test]
fn skip_special_tokens() {
    let tok = Tokenizer::builtin();
    let ids = tok.encode("<|im_start|> ba<|im_end|>", false).expect("encode");
    assert_eq!(ids, [1, 259, 2]);
    assert_eq!(tok.decode(&ids, true).expect("decode"), " ba");
}

#[test]
fn output_tokens_are_leading_space_words() {
    let tok = Tokenizer::builtin();
    let out = tok.output_tokens();
    assert_eq!(out.len(), crate::BUILTIN_OUTPUT_TOKENS);
    assert_eq!(tok.piece(out[0]), " ba");
    assert_eq!(tok.piece(out[1]), " be");
    assert_eq!(tok.piece(0), "");
    let text: String = out.iter().map(|&id| tok.piece(id)).collect();
    assert_eq!(tok.encode(&text, false).expect("encode"), out);
}

#[test]
fn encode_2k_tokens_is_fast() {
    let tok = Tokenizer::builtin();
    let text = builtin_word_text(0, 2048);
    let start = std::time::Instant::now();
    let mut total = 0;
    for _ in 0..100 {
        total += tok.encode(&text, false).expect("encode").len();
    }
    assert_eq!(total, 204_800);
    // Generous bound for unoptimised debug builds on a loaded machine; release is ~µs.
    assert!(start.elapsed().as_millis() < 2000, "{:?}", start.elapsed());
}
