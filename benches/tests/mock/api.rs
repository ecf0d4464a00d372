//! Response shapes, errors, tokenization and the informational endpoints.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::{chat, get, http, metric, post, start, state, stream, wait_until, words};

#[test]
fn chat_and_completion_shapes() {
    let m = start(&[]);
    let addr = m.engines[0].http;

    let r = post(addr, "/v1/chat/completions", &chat("hello there", 7));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "mock-model");
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(!choice["message"]["content"].as_str().unwrap().is_empty());
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 7);
    let tok = post(addr, "/tokenize", &json!({"messages": [{"role": "user", "content": "hello there"}]})).json();
    assert_eq!(v["usage"]["prompt_tokens"], tok["count"], "usage counts the chat template's tokens");
    assert_eq!(v["usage"]["total_tokens"], v["usage"]["prompt_tokens"].as_u64().unwrap() + 7);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(v["kv_transfer_params"], Value::Null);

    let r = post(addr, "/v1/completions", &json!({"model": "mock-model", "prompt": "hi", "max_tokens": 3}));
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["object"], "text_completion");
    assert!(v["choices"][0]["text"].is_string());
    assert_eq!(v["usage"]["completion_tokens"], 3);
    // Prompt as token ids, and a one-element batch.
    for prompt in [json!([5, 6, 7]), json!(["hi"]), json!([[5, 6, 7]])] {
        let r = post(addr, "/v1/completions", &json!({"model": "mock-model", "prompt": prompt, "max_tokens": 2}));
        assert_eq!(r.status, 200, "{prompt}: {}", r.text());
    }
}

#[test]
fn streams_match_the_whole_response() {
    let m = start(&[]);
    let addr = m.engines[0].http;
    let whole = post(addr, "/v1/chat/completions", &chat("same prompt", 6)).json();
    let mut body = chat("same prompt", 6);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, events) = stream(addr, "/v1/chat/completions", &body);
    assert_eq!(status, 200);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant", "the first chunk carries the role");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    let content: Vec<&Value> = chunks[1..chunks.len() - 1].iter().map(|c| &c["choices"][0]).collect();
    assert_eq!(content.len(), 6, "one chunk per token");
    assert!(content[..5].iter().all(|c| c["finish_reason"].is_null()));
    assert_eq!(content[5]["finish_reason"], "length");
    let text: String = content.iter().map(|c| c["delta"]["content"].as_str().unwrap()).collect();
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap(), "output is deterministic");

    let (status, events) = stream(
        addr,
        "/v1/completions",
        &json!({"model": "mock-model", "prompt": "x", "max_tokens": 4, "stream": true}),
    );
    assert_eq!(status, 200);
    assert_eq!(events.len(), 5, "4 token events and [DONE], no usage unless asked");
    let last: Value = serde_json::from_str(&events[3]).unwrap();
    assert_eq!(last["object"], "text_completion");
    assert_eq!(last["choices"][0]["finish_reason"], "length");
}

#[test]
fn bad_requests_get_vllm_errors_and_the_engine_keeps_serving() {
    let m = start(&["--max-body-bytes", "4096", "--max-model-len", "64"]);
    let addr = m.engines[0].http;
    let long = words(1, 70);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("/v1/chat/completions", b"{not json".to_vec(), 400, "BadRequestError"),
        ("/v1/chat/completions", b"[1,2]".to_vec(), 400, "BadRequestError"),
        ("/v1/chat/completions", br#"{"model":"mock-model","messages":[{"role":"user","content":"\xff\xfe"}]}"#.to_vec(), 400, "BadRequestError"),
        ("/v1/chat/completions", br#"{"model":"mock-model","messages":"hi"}"#.to_vec(), 400, "BadRequestError"),
        ("/v1/chat/completions", br#"{"model":"mock-model","messages":[]}"#.to_vec(), 400, "BadRequestError"),
        ("/v1/chat/completions", br#"{"messages":[{"role":"user","content":"x"}]}"#.to_vec(), 400, "BadRequestError"),
        ("/v1/chat/completions", br#"{"model":"other","messages":[{"role":"user","content":"x"}]}"#.to_vec(), 404, "NotFoundError"),
        ("/v1/chat/completions", br#"{"model":"mock-model","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#.to_vec(), 400, "BadRequestError"),
        ("/v1/chat/completions", br#"{"model":"mock-model","messages":[{"role":"user","content":"x"}],"max_tokens":-3}"#.to_vec(), 400, "BadRequestError"),
        ("/v1/chat/completions", br#"{"model":"mock-model","messages":[{"role":"user","content":"x"}],"max_tokens":"many"}"#.to_vec(), 400, "BadRequestError"),
        ("/v1/chat/completions", br#"{"model":"mock-model","messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}"#.to_vec(), 400, "BadRequestError"),
        ("/v1/chat/completions", br#"{"model":"mock-model","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#.to_vec(), 400, "BadRequestError"),
        ("/v1/completions", format!(r#"{{"model":"mock-model","prompt":"{long}"}}"#).into_bytes(), 400, "BadRequestError"),
        ("/v1/completions", br#"{"model":"mock-model","prompt":"x","max_tokens":100}"#.to_vec(), 400, "BadRequestError"),
        ("/v1/completions", br#"{"model":"mock-model","prompt":[1,99999999]}"#.to_vec(), 400, "BadRequestError"),
        ("/v1/completions", br#"{"model":"mock-model","prompt":""}"#.to_vec(), 400, "BadRequestError"),
        ("/v1/completions", br#"{"model":"mock-model","prompt":{"a":1}}"#.to_vec(), 400, "BadRequestError"),
        ("/v1/completions", vec![b'x'; 5000], 413, "PayloadTooLargeError"),
        ("/v1/nope", b"{}".to_vec(), 404, "NotFoundError"),
    ];
    for (path, body, status, kind) in &cases {
        let r = http(addr, "POST", path, &[("content-type", "application/json")], body);
        assert_eq!(r.status, *status, "{path} {}: {}", String::from_utf8_lossy(body), r.text());
        let v = r.json();
        assert_eq!(v["error"]["type"], *kind, "{}", r.text());
        assert_eq!(v["error"]["code"], *status);
        assert!(v["error"]["message"].as_str().is_some_and(|s| !s.is_empty()));
    }
    let r = get(addr, "/v1/chat/completions");
    assert_eq!(r.status, 405);
    assert_eq!(r.json()["error"]["code"], 405);
    // Everyone else is still served.
    let r = post(addr, "/v1/completions", &json!({"model": "mock-model", "prompt": "fine", "max_tokens": 2}));
    assert_eq!(r.status, 200);
    assert_eq!(state(addr)["running"], 0);
}

#[test]
fn informational_endpoints() {
    let m = start(&["--model", "m1", "--max-model-len", "1000", "--block-size", "32", "--num-gpu-blocks", "100"]);
    let addr = m.engines[0].http;
    let models = get(addr, "/v1/models").json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "m1");
    assert_eq!(models["data"][0]["owned_by"], "vllm");
    assert_eq!(models["data"][0]["max_model_len"], 1000);
    assert_eq!(get(addr, "/health").status, 200);
    assert_eq!(get(addr, "/version").json()["version"], "0.33.0");
    assert_eq!(get(addr, "/kv_event_sources").json(), json!({}), "no events configured");
    assert_eq!(get(addr, "/load").json()["server_load"], 0);
    post(addr, "/v1/completions", &json!({"model": "m1", "prompt": "abc", "max_tokens": 3}));
    let text = get(addr, "/metrics").text();
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_sum",
    ] {
        assert!(metric(&text, name, "model_name=\"m1\"").is_some(), "{name} missing:\n{text}");
    }
    assert_eq!(metric(&text, "vllm:generation_tokens_total", "engine=\"0\""), Some(3.0));
    assert_eq!(metric(&text, "vllm:request_success_total", "finished_reason=\"length\""), Some(1.0));
    assert_eq!(metric(&text, "vllm:time_to_first_token_seconds_count", ""), Some(1.0));
    assert_eq!(metric(&text, "vllm:cache_config_info", "block_size=\"32\""), Some(1.0));
    assert!(text.contains("num_gpu_blocks=\"100\""));
}

#[test]
fn lora_modules_are_models_of_their_own() {
    let m = start(&["--model", "m1", "--lora-modules", "sql-lora=/adapters/sql", "chat-lora=/adapters/chat"]);
    let addr = m.engines[0].http;
    let models = get(addr, "/v1/models").json();
    let ids: Vec<(&str, &str, Value)> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["id"].as_str().unwrap(), d["root"].as_str().unwrap(), d["parent"].clone()))
        .collect();
    assert_eq!(
        ids,
        [
            ("m1", "m1", Value::Null),
            ("sql-lora", "/adapters/sql", json!("m1")),
            ("chat-lora", "/adapters/chat", json!("m1"))
        ]
    );
    let r = post(addr, "/v1/completions", &json!({"model": "sql-lora", "prompt": "abc", "max_tokens": 2}));
    assert_eq!((r.status, r.json()["model"].clone()), (200, json!("sql-lora")), "answers as the adapter");
    assert_eq!(post(addr, "/v1/completions", &json!({"model": "nope", "prompt": "abc"})).status, 404);
    // An adapter may not take a served name.
    for clash in [["--lora-modules", "mock-model=/x"], ["--lora-modules", "a=/x a=/y"]] {
        let mut argv = vec!["mock", "--port", "0"];
        argv.extend(clash.iter().flat_map(|a| a.split(' ')));
        let cli = <crate::Cli as clap::Parser>::try_parse_from(&argv).expect("flags parse");
        let Err(err) = gantry_bench::mock::spawn(&cli.args) else { panic!("{argv:?} was accepted") };
        assert!(err.to_string().contains("lora-modules"), "{err}");
    }
}

#[test]
fn tokenize_and_detokenize_both_forms() {
    let m = start(&[]);
    let addr = m.engines[0].http;
    let text = words(3, 12);
    let t = post(addr, "/tokenize", &json!({"prompt": text})).json();
    assert_eq!(t["count"], 12, "built-in words are one token each");
    assert_eq!(t["max_model_len"], 32768);
    let d = post(addr, "/detokenize", &json!({"tokens": t["tokens"]})).json();
    assert_eq!(d["prompt"], text);
    let c =
        post(addr, "/tokenize", &json!({"messages": [{"role": "user", "content": text}], "return_token_strs": true}))
            .json();
    assert_eq!(c["count"].as_u64().unwrap() as usize, c["token_strs"].as_array().unwrap().len());
    let d = post(addr, "/detokenize", &json!({"tokens": c["tokens"]})).json();
    assert_eq!(d["prompt"], format!("<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"));
    assert_eq!(post(addr, "/detokenize", &json!({"tokens": [1, 99999999]})).status, 400);
    assert_eq!(post(addr, "/tokenize", &json!({"model": "other", "prompt": "x"})).status, 404);
}

#[test]
fn a_real_tokenizer_directory_tokenizes_like_the_tokenizer_crate() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tokenizer/testdata/tiny-llama3");
    let m = start(&["--tokenizer", dir.to_str().unwrap()]);
    let addr = m.engines[0].http;
    let tok = gantry_tokenizer::Tokenizer::from_dir(&dir).unwrap();
    let messages =
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a KV cache?"}]);
    let want = tok.encode_chat(&gantry_tokenizer::ChatTemplateInput::new(&messages)).unwrap();
    let got = post(addr, "/tokenize", &json!({"messages": messages})).json();
    assert_eq!(got["tokens"], json!(want));
    let r = post(addr, "/v1/chat/completions", &json!({"model": "mock-model", "messages": messages, "max_tokens": 4}))
        .json();
    assert_eq!(r["usage"]["prompt_tokens"], want.len());
    let want = tok.encode("The quick brown fox", true).unwrap();
    assert_eq!(want.first().copied(), tok.bos_token_id(), "completions get BOS from the post-processor");
    assert_eq!(post(addr, "/tokenize", &json!({"prompt": "The quick brown fox"})).json()["tokens"], json!(want));
}

#[test]
fn api_key_guards_v1_only() {
    let m = start(&["--api-key", "sekret"]);
    let addr = m.engines[0].http;
    let body = chat("x", 1).to_string();
    let r = http(addr, "POST", "/v1/chat/completions", &[], body.as_bytes());
    assert_eq!(r.status, 401);
    assert_eq!(r.json(), json!({"error": "Unauthorized"}));
    let r = http(addr, "POST", "/v1/chat/completions", &[("authorization", "Bearer sekret")], body.as_bytes());
    assert_eq!(r.status, 200);
    assert_eq!(get(addr, "/health").status, 200, "/health is not guarded");
}

#[test]
fn full_queue_answers_503() {
    // One request runs (slowly), one waits; the next finds the queue full.
    let m = start(&[
        "--max-num-seqs",
        "1",
        "--max-num-queued-reqs",
        "1",
        "--speedup",
        "1",
        "--prefill-ms-coeffs",
        "0,0,400",
    ]);
    let addr = m.engines[0].http;
    let first = std::thread::spawn(move || {
        post(addr, "/v1/completions", &json!({"model": "mock-model", "prompt": "a", "max_tokens": 1}))
    });
    wait_until("the first request to run", Duration::from_secs(10), || state(addr)["running"] == 1);
    let second = std::thread::spawn(move || {
        post(addr, "/v1/completions", &json!({"model": "mock-model", "prompt": "b", "max_tokens": 1}))
    });
    wait_until("the second request to wait", Duration::from_secs(10), || state(addr)["waiting"] == 1);
    let r = post(addr, "/v1/completions", &json!({"model": "mock-model", "prompt": "c", "max_tokens": 1}));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "ServiceUnavailableError");
    assert_eq!(first.join().unwrap().status, 200);
    assert_eq!(second.join().unwrap().status, 200);
}

#[test]
fn ttft_follows_the_timing_model() {
    let m = start(&["--speedup", "1", "--prefill-ms-coeffs", "0,0,120", "--decode-ms-coeffs", "0,0,5"]);
    let addr = m.engines[0].http;
    let mut body = chat("timing", 3);
    body["stream"] = json!(true);
    let t0 = std::time::Instant::now();
    let (_, events) = stream(addr, "/v1/chat/completions", &body);
    assert_eq!(events.len(), 5);
    assert!(t0.elapsed() >= Duration::from_millis(120 + 2 * 5), "one 120 ms prefill step and two 5 ms decode steps");
    let text = get(addr, "/metrics").text();
    let ttft = metric(&text, "vllm:time_to_first_token_seconds_sum", "").unwrap();
    assert!(ttft >= 0.120, "engine-side TTFT {ttft}");
    assert_eq!(metric(&text, "vllm:time_to_first_token_seconds_bucket", "le=\"0.1\""), Some(0.0));
}
