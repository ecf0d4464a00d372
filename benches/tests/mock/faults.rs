//! Fault injection: each flag, and the runtime switch `POST /mock/faults`.

use std::time::Duration;

use gantry_proxy::http::client::ClientConn;
use gantry_proxy::rt::{self, Driver};
use serde_json::json;

use crate::{chat, get, post, start, state, wait_until};

#[test]
fn fail_rate_and_runtime_switch() {
    let m = start(&["--fail-rate", "1", "--fail-status", "503"]);
    let addr = m.engines[0].http;
    for _ in 0..5 {
        let r = post(addr, "/v1/chat/completions", &chat("x", 1));
        assert_eq!(r.status, 503);
        assert_eq!(r.json()["error"]["type"], "ServiceUnavailableError");
    }
    let r = post(addr, "/mock/faults", &json!({"fail_rate": 0.0}));
    assert_eq!(r.status, 200);
    assert_eq!(post(addr, "/v1/chat/completions", &chat("x", 1)).status, 200);
    let r = post(addr, "/mock/faults", &json!({"fail_rate": 0.5}));
    assert_eq!(r.status, 200);
    let failed = (0..200).filter(|_| post(addr, "/v1/chat/completions", &chat("x", 1)).status != 200).count();
    assert!((50..=150).contains(&failed), "about half fail: {failed}/200");
    assert_eq!(post(addr, "/mock/faults", &json!({"fail_rate": 2.0})).status, 400);
    assert_eq!(post(addr, "/mock/faults", &json!({"bogus": 1})).status, 400);
}

#[test]
fn dead_engine_and_flapping_health() {
    let m = start(&["--flap-health", "2"]);
    let addr = m.engines[0].http;
    let seen: Vec<u16> = (0..6).map(|_| get(addr, "/health").status).collect();
    assert_eq!(seen, [200, 200, 503, 503, 200, 200]);
    post(addr, "/mock/faults", &json!({"flap_health": null, "dead": true}));
    assert_eq!(get(addr, "/health").status, 503);
    let r = post(addr, "/v1/chat/completions", &chat("x", 1));
    assert_eq!(r.status, 500);
    assert_eq!(r.json()["error"]["type"], "InternalServerError");
    post(addr, "/mock/faults", &json!({"dead": false}));
    assert_eq!(get(addr, "/health").status, 200);
    assert_eq!(post(addr, "/v1/chat/completions", &chat("x", 1)).status, 200);
}

/// Streams a chat request, returning the token events seen and how the stream ended.
fn stream_until_end(addr: std::net::SocketAddr, tokens: u32, wait: Duration) -> (usize, Result<(), String>) {
    rt::block_on(Driver::Legacy, async move {
        let mut c = ClientConn::connect(addr, Duration::from_secs(5)).await.unwrap();
        let mut body = chat("fault", tokens);
        body["stream"] = json!(true);
        c.send("POST", "/v1/chat/completions", &[], body.to_string().as_bytes()).await.unwrap();
        assert_eq!(c.read_head(false).await.unwrap().status, 200);
        let mut text = String::new();
        let res = loop {
            match monoio::time::timeout(wait, c.read_chunk()).await {
                Err(_) => break Err("stalled".to_owned()),
                Ok(Err(e)) => break Err(e.to_string()),
                Ok(Ok(None)) => break Ok(()),
                Ok(Ok(Some(b))) => text.push_str(&String::from_utf8_lossy(&b)),
            }
        };
        (text.matches("\"content\":\"").count() - 1, res)
    })
    .unwrap()
}

#[test]
fn stall_and_cut_streams() {
    let m = start(&["--cut-after", "3"]);
    let (tokens, end) = stream_until_end(m.engines[0].http, 10, Duration::from_secs(10));
    assert_eq!(tokens, 3);
    let err = end.unwrap_err();
    assert!(err.contains("closed before"), "the connection is cut mid-body: {err}");
    let addr = m.engines[0].http;
    wait_until("the cut request to be released", Duration::from_secs(10), || state(addr)["running"] == 0);

    post(addr, "/mock/faults", &json!({"cut_after": null, "stall_after": 2}));
    // A stalled stream sends nothing more; waiting 300 ms is enough to see it is not finishing.
    let (tokens, end) = stream_until_end(addr, 10, Duration::from_millis(300));
    assert_eq!(tokens, 2);
    assert_eq!(end.unwrap_err(), "stalled");
    post(addr, "/mock/faults", &json!({"stall_after": null}));
    let (tokens, end) = stream_until_end(addr, 10, Duration::from_secs(10));
    assert_eq!((tokens, end), (10, Ok(())));
}

#[test]
fn client_disconnect_aborts_the_engine_request() {
    let m = start(&["--speedup", "1", "--decode-ms-coeffs", "0,0,20"]);
    let addr = m.engines[0].http;
    rt::block_on(Driver::Legacy, async move {
        let mut c = ClientConn::connect(addr, Duration::from_secs(5)).await.unwrap();
        let mut body = chat("long", 10_000);
        body["stream"] = json!(true);
        c.send("POST", "/v1/chat/completions", &[], body.to_string().as_bytes()).await.unwrap();
        assert_eq!(c.read_head(false).await.unwrap().status, 200);
        assert!(c.read_chunk().await.unwrap().is_some());
        drop(c);
    })
    .unwrap();
    wait_until("the engine to abort the request", Duration::from_secs(10), || {
        let s = state(addr);
        s["running"] == 0 && s["aborted"] == 1 && s["kv_usage"] == 0.0
    });
}
