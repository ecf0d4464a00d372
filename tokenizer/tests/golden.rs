//! Golden vectors from Python transformers: rendered chat prompts and token ids must match exactly.

use std::path::{Path, PathBuf};

use gantry_tokenizer::{ChatTemplateInput, Tokenizer};
use serde_json::Value;

const DIRS: [&str; 2] = ["tiny-chatml", "tiny-llama3"];

fn testdata(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata").join(dir)
}

fn golden(dir: &str) -> Value {
    let text = std::fs::read_to_string(testdata(dir).join("golden.json")).expect("golden.json");
    serde_json::from_str(&text).expect("golden.json parses")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("ids array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

#[test]
fn chat_cases_match_transformers() {
    for dir in DIRS {
        let tok = Tokenizer::from_dir(&testdata(dir)).expect("load");
        let g = golden(dir);
        let cases = g["chat"].as_array().expect("chat cases");
        assert!(cases.len() >= 6, "{dir}: too few chat cases");
        for case in cases {
            let name = case["name"].as_str().unwrap_or("?");
            let req = ChatTemplateInput {
                messages: &case["messages"],
                add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap_or(true),
                continue_final_message: case["continue_final_message"].as_bool().unwrap_or(false),
                tools: case.get("tools").filter(|t| !t.is_null()),
                chat_template_kwargs: case.get("chat_template_kwargs").and_then(Value::as_object),
            };
            let rendered = tok.apply_chat_template(&req).unwrap_or_else(|e| panic!("{dir}/{name}: {e}"));
            assert_eq!(rendered, case["rendered"].as_str().unwrap_or_default(), "{dir}/{name}: rendered");
            let got = tok.encode(&rendered, false).expect("encode");
            assert_eq!(got, ids(&case["ids"]), "{dir}/{name}: ids");
            assert_eq!(tok.encode_chat(&req).expect("encode_chat"), got, "{dir}/{name}");
        }
    }
}

#[test]
fn completion_cases_match_transformers() {
    for dir in DIRS {
        let tok = Tokenizer::from_dir(&testdata(dir)).expect("load");
        for case in golden(dir)["completion"].as_array().expect("completion cases") {
            let prompt = case["prompt"].as_str().expect("prompt");
            let want = ids(&case["ids"]);
            assert_eq!(tok.encode(prompt, true).expect("encode"), want, "{dir}: {prompt:?}");
            assert_eq!(
                tok.decode(&want, false).expect("decode"),
                case["decoded"].as_str().unwrap_or_default(),
                "{dir}: decode {prompt:?}"
            );
            assert_eq!(
                tok.decode(&want, true).expect("decode"),
                case["decoded_skip"].as_str().unwrap_or_default(),
                "{dir}: decode skip {prompt:?}"
            );
        }
    }
}

#[test]
fn llama3_bos_comes_from_post_processor_or_template_never_both() {
    let tok = Tokenizer::from_dir(&testdata("tiny-llama3")).expect("load");
    let bos = tok.bos_token_id().expect("bos");
    assert_eq!(tok.encode("hello", true).expect("encode")[0], bos);
    assert_ne!(tok.encode("hello", false).expect("encode").first(), Some(&bos));
    let msgs = serde_json::json!([{"role": "user", "content": "hi"}]);
    let chat = tok.encode_chat(&ChatTemplateInput::new(&msgs)).expect("chat");
    assert_eq!(chat[0], bos);
    assert_ne!(chat[1], bos);
    assert_eq!(tok.eos_token_id(), tok.encode("<|eot_id|>", false).expect("eot").first().copied());
}

#[test]
fn metadata() {
    let chatml = Tokenizer::from_dir(&testdata("tiny-chatml")).expect("load");
    assert_eq!(chatml.bos_token_id(), None);
    assert_eq!(chatml.eos_token_id(), Some(2));
    assert!(chatml.name().ends_with("tiny-chatml"));
    let v = chatml.vocab_size();
    assert!((900..=4096).contains(&v), "vocab {v}");
    let builtin = Tokenizer::load(None).expect("builtin");
    assert_eq!(builtin.name(), "builtin");
}

/// xorshift64*: a tiny seeded PRNG for property tests.
fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed >> 12;
    *seed ^= *seed << 25;
    *seed ^= *seed >> 27;
    seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

#[test]
fn output_tokens_concatenate() {
    let tokenizers = [
        Tokenizer::builtin(),
        Tokenizer::from_dir(&testdata("tiny-chatml")).expect("load"),
        Tokenizer::from_dir(&testdata("tiny-llama3")).expect("load"),
    ];
    for tok in &tokenizers {
        let out = tok.output_tokens();
        assert!(out.len() >= 64, "{}: only {} output tokens", tok.name(), out.len());
        for &id in out {
            let p = tok.piece(id);
            assert!(!p.is_empty());
            assert_eq!(tok.decode(&[id], false).expect("decode"), p);
        }
        let mut seed = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..200 {
            let n = (rng(&mut seed) % 40) as usize;
            let seq: Vec<u32> = (0..n).map(|_| out[(rng(&mut seed) % out.len() as u64) as usize]).collect();
            let concat: String = seq.iter().map(|&id| tok.piece(id)).collect();
            assert_eq!(tok.decode(&seq, false).expect("decode"), concat, "{}: {seq:?}", tok.name());
        }
    }
}

#[test]
fn hf_roundtrip_random_text() {
    let tok = Tokenizer::from_dir(&testdata("tiny-llama3")).expect("load");
    let alphabet: Vec<char> = "ab cé日😀\n\t.,!'<|>".chars().collect();
    let mut seed = 42;
    for _ in 0..300 {
        let n = (rng(&mut seed) % 30) as usize;
        let s: String = (0..n).map(|_| alphabet[(rng(&mut seed) % alphabet.len() as u64) as usize]).collect();
        let ids = tok.encode(&s, false).expect("encode");
        assert_eq!(tok.decode(&ids, false).expect("decode"), s);
    }
}

/// The per-thread cache gives exactly the plain encoder's ids: for every golden chat prompt
/// (twice, so the second pass is served from the cache) and for random text around special tokens.
#[test]
fn cached_encoding_matches_plain_encoding() {
    let mut tokenizers: Vec<(String, Tokenizer)> = vec![("builtin".into(), Tokenizer::builtin())];
    for dir in DIRS {
        tokenizers.push((dir.into(), Tokenizer::from_dir(&testdata(dir)).expect("load")));
    }
    for (name, tok) in &tokenizers {
        assert!(tok.splits_for_cache(), "{name}: expected the split self-check to pass");
        let mut texts: Vec<String> = Vec::new();
        if name != "builtin" {
            for case in golden(name)["chat"].as_array().expect("chat cases") {
                texts.push(case["rendered"].as_str().unwrap_or_default().to_owned());
            }
        }
        let specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|begin_of_text|>"];
        let mut seed = 7u64;
        for _ in 0..200 {
            let mut t = String::new();
            for _ in 0..(rng(&mut seed) % 8) {
                let words = gantry_tokenizer::builtin_word_text(
                    (rng(&mut seed) % 500) as usize,
                    (rng(&mut seed) % 40) as usize,
                );
                t.push_str(&words);
                t.push_str(["\n", "  ", "", "x.", " "][(rng(&mut seed) % 5) as usize]);
                t.push_str(specials[(rng(&mut seed) % specials.len() as u64) as usize]);
            }
            texts.push(t);
        }
        // A tiny cache turns over constantly (the eviction path); a large one serves pass 2.
        for capacity in [64, 1 << 20] {
            let mut cache = gantry_tokenizer::EncodeCache::with_capacity_tokens(capacity);
            for pass in 0..2 {
                for t in &texts {
                    let plain = tok.encode(t, false).expect("encode");
                    let cached = tok.encode_cached(t, false, &mut cache).expect("encode_cached");
                    assert_eq!(cached, plain, "{name} capacity {capacity} pass {pass}: {t:?}");
                }
            }
            let (hits, misses) = cache.hits_misses();
            assert!(misses > 0, "{name}: nothing was encoded");
            if capacity > 64 {
                assert!(hits >= misses, "{name}: pass 2 should hit ({hits} hits, {misses} misses)");
            }
        }
    }
}
