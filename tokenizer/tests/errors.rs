//! Loading and decoding failures are specific errors, never panics.

use std::path::{Path, PathBuf};

use gantry_tokenizer::{ChatTemplateInput, Tokenizer, TokenizerError};

/// A fresh scratch directory under the system temp dir, filled with `files`.
fn scratch(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gantry-tokenizer-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let tokenizer_json = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/tiny-chatml/tokenizer.json");
    for (file, body) in files {
        if *body == "@tokenizer.json" {
            std::fs::copy(&tokenizer_json, dir.join(file)).expect("copy");
        } else {
            std::fs::write(dir.join(file), body).expect("write");
        }
    }
    dir
}

/// `(file name, contents)` pairs; `@tokenizer.json` copies tiny-chatml's.
type Files<'a> = &'a [(&'a str, &'a str)];

#[test]
fn load_errors() {
    // (name, files, expected substring of the error)
    let cases: &[(&str, Files, &str)] = &[
        ("no-tokenizer", &[("tokenizer_config.json", "{}")], "tokenizer.json: file not found"),
        ("bad-tokenizer", &[("tokenizer.json", "{\"model\": 3}")], "invalid tokenizer.json"),
        (
            "bad-config",
            &[("tokenizer.json", "@tokenizer.json"), ("tokenizer_config.json", "{oops")],
            "tokenizer_config.json: invalid JSON",
        ),
        (
            "bad-eos",
            &[("tokenizer.json", "@tokenizer.json"), ("tokenizer_config.json", "{\"eos_token\": 5}")],
            "key `eos_token`",
        ),
        (
            "bad-template-type",
            &[("tokenizer.json", "@tokenizer.json"), ("tokenizer_config.json", "{\"chat_template\": 5}")],
            "key `chat_template`",
        ),
        (
            "bad-template-list",
            &[
                ("tokenizer.json", "@tokenizer.json"),
                ("tokenizer_config.json", "{\"chat_template\": [{\"name\": \"x\"}]}"),
            ],
            "key `chat_template[0].template`",
        ),
        (
            "bad-template-syntax",
            &[("tokenizer.json", "@tokenizer.json"), ("chat_template.jinja", "{% for %}")],
            "template error: ",
        ),
    ];
    for (name, files, want) in cases {
        let dir = scratch(name, files);
        let err = Tokenizer::from_dir(&dir).expect_err(name);
        assert!(err.to_string().contains(want), "{name}: {err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
    let err = Tokenizer::load(Some(Path::new("/nonexistent/model"))).expect_err("missing dir");
    assert!(matches!(err, TokenizerError::NotADirectory { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/model"));
}

#[test]
fn template_sources() {
    let msgs = serde_json::json!([{"role": "user", "content": "hi"}]);
    let req = ChatTemplateInput::new(&msgs);
    // No template at all: chat requests fail clearly, completions work.
    let dir = scratch("no-template", &[("tokenizer.json", "@tokenizer.json")]);
    let tok = Tokenizer::from_dir(&dir).expect("load");
    assert!(tok.encode("hi", true).is_ok());
    let err = tok.apply_chat_template(&req).expect_err("no template");
    assert!(matches!(err, TokenizerError::NoChatTemplate { .. }), "{err}");
    assert!(err.to_string().contains("no chat template"));
    // chat_template.jinja wins over tokenizer_config.json.
    let dir2 = scratch(
        "jinja-file",
        &[
            ("tokenizer.json", "@tokenizer.json"),
            ("chat_template.jinja", "{{ bos_token }}J:{{ messages[0].content }}\n"),
            ("tokenizer_config.json", "{\"chat_template\": \"C\", \"bos_token\": {\"content\": \"<|endoftext|>\"}}"),
        ],
    );
    let tok = Tokenizer::from_dir(&dir2).expect("load");
    assert_eq!(tok.apply_chat_template(&req).expect("render"), "<|endoftext|>J:hi");
    assert_eq!(tok.bos_token_id(), Some(0));
    // A list without "default" uses the first entry.
    let dir3 = scratch(
        "template-list",
        &[
            ("tokenizer.json", "@tokenizer.json"),
            ("tokenizer_config.json", "{\"chat_template\": [{\"name\": \"tool_use\", \"template\": \"first\"}, {\"name\": \"rag\", \"template\": \"second\"}]}"),
        ],
    );
    let tok = Tokenizer::from_dir(&dir3).expect("load");
    assert_eq!(tok.apply_chat_template(&req).expect("render"), "first");
    for d in [dir, dir2, dir3] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn out_of_range_ids() {
    let builtin = Tokenizer::builtin();
    let err = builtin.decode(&[5, 99_999], false).expect_err("range");
    assert_eq!(err.to_string(), "token id 99999 out of range (vocab size 16639)");
    assert!(builtin.decode(&[u32::MAX], true).is_err());
    let hf = Tokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/tiny-chatml")).expect("load");
    let v = hf.vocab_size();
    assert!(hf.decode(&[v - 1], false).is_ok());
    let err = hf.decode(&[v], false).expect_err("range");
    assert_eq!(err.to_string(), format!("token id {v} out of range (vocab size {v})"));
}

#[test]
fn shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    let tok = std::sync::Arc::new(Tokenizer::builtin());
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let tok = tok.clone();
            std::thread::spawn(move || {
                tok.encode(&gantry_tokenizer::builtin_word_text(i, 100), false).map(|ids| ids.len())
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().expect("thread").expect("encode"), 100);
    }
}
