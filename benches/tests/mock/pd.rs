//! The NixlConnector P/D protocol between a prefill mock and a decode mock.

use std::time::Duration;

use serde_json::{json, Value};

use crate::{post, start, state, stream, wait_until, words};

/// Leg 1 exactly as vLLM's toy proxy sends it.
fn prefill_leg(prompt: &str) -> Value {
    json!({
        "model": "mock-model", "prompt": prompt, "max_tokens": 1, "stream": false,
        "kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
            "remote_block_ids": null, "remote_host": null, "remote_port": null}
    })
}

#[test]
fn prefill_then_decode() {
    let p = start(&["--role", "prefill", "--kv-side-channel-port", "0"]);
    let d = start(&["--role", "decode"]);
    let (p_addr, d_addr) = (p.engines[0].http, d.engines[0].http);
    let prompt = words(2, 200);

    let leg1 = post(p_addr, "/v1/completions", &prefill_leg(&prompt)).json();
    assert_eq!(leg1["usage"]["completion_tokens"], 1);
    let kv = leg1["kv_transfer_params"].clone();
    assert_eq!(kv["do_remote_prefill"], true);
    assert_eq!(kv["do_remote_decode"], false);
    assert_eq!(kv["remote_num_tokens"], 200);
    assert_eq!(kv["transfer_mode"], "pull");
    assert_eq!(kv["remote_port"], p.engines[0].side_channel.unwrap().port());
    assert_eq!(kv["remote_host"], "127.0.0.1");
    let groups = kv["remote_block_ids"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "one list per KV-cache group (0.33)");
    assert_eq!(groups[0].as_array().unwrap().len(), 13, "200 tokens in 16-token blocks");
    for key in
        ["remote_engine_id", "remote_request_id", "tp_size", "dcp_size", "pp_size", "remote_registration_generation"]
    {
        assert!(!kv[key].is_null(), "{key} missing");
    }
    assert!(kv.as_object().unwrap().contains_key("remote_blocks_expiry_time"));
    assert_eq!(state(p_addr)["leases"], 1, "the prefill engine holds the blocks");

    // Leg 2: the client's request with P's params verbatim.
    let mut leg2 = json!({"model": "mock-model", "prompt": prompt, "max_tokens": 5});
    leg2["kv_transfer_params"] = kv.clone();
    let r = post(d_addr, "/v1/completions", &leg2);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 5);
    assert_eq!(r.json()["kv_transfer_params"], Value::Null);
    assert_eq!(state(p_addr)["leases"], 0, "the pull ended the lease");
    assert_eq!(state(p_addr)["kv_usage"], 0.0);

    // The decode engine now caches the prompt itself: the same request needs no pull.
    assert_eq!(post(d_addr, "/v1/completions", &leg2).status, 200);
    // Without that cache, the same params point at blocks that are gone: a failed KV load.
    assert_eq!(post(d_addr, "/reset_prefix_cache", &json!({})).status, 200);
    let r = post(d_addr, "/v1/completions", &leg2);
    assert_eq!(r.status, 500);
    assert_eq!(r.json()["error"]["type"], "InternalServerError");
    // Streaming: an error event, then [DONE].
    leg2["stream"] = json!(true);
    assert_eq!(post(d_addr, "/reset_prefix_cache", &json!({})).status, 200);
    let (status, events) = stream(d_addr, "/v1/completions", &leg2);
    assert_eq!(status, 200);
    assert_eq!(events.len(), 2, "{events:?}");
    let err: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(err["error"]["code"], 500);
    assert_eq!(events[1], "[DONE]");
    assert_eq!(state(d_addr)["running"], 0);
}

#[test]
fn expired_lease_fails_the_decode_leg() {
    let p = start(&["--role", "prefill", "--kv-side-channel-port", "0", "--kv-lease-secs", "1"]);
    let d = start(&["--role", "decode"]);
    let prompt = words(4, 100);
    let leg1 = post(
        p.engines[0].http,
        "/v1/chat/completions",
        &json!({
            "model": "mock-model", "messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "stream": false,
            "kv_transfer_params": {"do_remote_decode": true}
        }),
    )
    .json();
    assert_eq!(leg1["object"], "chat.completion");
    let kv = leg1["kv_transfer_params"].clone();
    assert!(kv["remote_request_id"].as_str().unwrap().starts_with("chatcmpl-"));
    wait_until("the lease to expire", Duration::from_secs(10), || state(p.engines[0].http)["leases"] == 0);
    let r = post(
        d.engines[0].http,
        "/v1/chat/completions",
        &json!({
            "model": "mock-model", "messages": [{"role": "user", "content": prompt}], "max_tokens": 3, "kv_transfer_params": kv
        }),
    );
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("no live KV lease"));
}

#[test]
fn roles_ignore_what_they_do_not_speak() {
    let agg = start(&[]);
    let r = post(agg.engines[0].http, "/v1/completions", &prefill_leg("plain"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["kv_transfer_params"], Value::Null, "no KV connector: null params");
    assert_eq!(state(agg.engines[0].http)["leases"], 0);
    let d = start(&["--role", "decode"]);
    let bad = json!({"model": "mock-model", "prompt": "x", "kv_transfer_params": {"do_remote_prefill": true}});
    let r = post(d.engines[0].http, "/v1/completions", &bad);
    assert_eq!(r.status, 400, "{}", r.text());
}
