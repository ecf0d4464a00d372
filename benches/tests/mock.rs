//! `gantry mock` over real loopback sockets and real libzmq: HTTP surface, KV cache and
//! events, P/D, faults. Each test starts its own engines on ephemeral ports.

mod mock {
    mod api;
    mod cache;
    mod faults;
    mod index;
    mod pd;
}

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use gantry_bench::mock::{MockArgs, MockServer};
use gantry_proxy::http::client::ClientConn;
use gantry_proxy::http::sse::SseParser;
use gantry_proxy::rt::{self, Driver};
use serde_json::Value;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: MockArgs,
}

/// Starts mock engines on ephemeral ports with no delays, plus `extra` flags.
pub fn start(extra: &[&str]) -> MockServer {
    let mut argv = vec!["mock", "--port", "0"];
    if !extra.contains(&"--speedup") {
        argv.extend_from_slice(&["--speedup", "0"]);
    }
    argv.extend_from_slice(extra);
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("bad test flags {argv:?}: {e}"));
    gantry_bench::mock::spawn(&cli.args).expect("mock engines start")
}

/// Flags that turn KV events and replay on, on ephemeral ports.
pub const EVENTS: &[&str] = &["--kv-events-port", "0", "--kv-replay-port", "0"];

/// A whole HTTP response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Sends one request on a fresh connection and reads the whole response.
pub fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    rt::block_on(Driver::Legacy, async {
        let mut c = ClientConn::connect(addr, Duration::from_secs(5)).await.expect("connect");
        let hdrs: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
        c.send(method, path, &hdrs, body).await.expect("send");
        let head = c.read_head(method == "HEAD").await.expect("response head");
        let body = c.read_body().await.expect("response body");
        let headers =
            head.headers().iter().map(|(n, v)| (n.to_owned(), String::from_utf8_lossy(v).into_owned())).collect();
        Reply { status: head.status, headers, body: body.to_vec() }
    })
    .expect("client runtime")
}

pub fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    http(addr, "POST", path, &[("content-type", "application/json")], body.to_string().as_bytes())
}

pub fn get(addr: SocketAddr, path: &str) -> Reply {
    http(addr, "GET", path, &[], b"")
}

/// POSTs a streaming request; returns the status and every SSE `data` payload in order.
pub fn stream(addr: SocketAddr, path: &str, body: &Value) -> (u16, Vec<String>) {
    rt::block_on(Driver::Legacy, async {
        let mut c = ClientConn::connect(addr, Duration::from_secs(5)).await.expect("connect");
        c.send("POST", path, &[("content-type", b"application/json")], body.to_string().as_bytes())
            .await
            .expect("send");
        let head = c.read_head(false).await.expect("head");
        let mut p = SseParser::new();
        let mut events = Vec::new();
        while let Some(chunk) = c.read_chunk().await.expect("body chunk") {
            p.push(&chunk);
            while let Some(e) = p.next_event() {
                events.push(e.data);
            }
        }
        (head.status, events)
    })
    .expect("client runtime")
}

/// Waits until `cond` holds, failing after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return;
        }
        assert!(Instant::now() < end, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The engine's debug state (`GET /mock/state`).
pub fn state(addr: SocketAddr) -> Value {
    get(addr, "/mock/state").json()
}

/// Reads one sample of `name` (with optional label filter) from a Prometheus text page.
pub fn metric(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A chat request body.
pub fn chat(content: &str, max_tokens: u32) -> Value {
    serde_json::json!({"model": "mock-model", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
}

/// Text of exactly `n` built-in tokens, distinct per `salt`.
pub fn words(salt: usize, n: usize) -> String {
    gantry_tokenizer::builtin_word_text(salt * 131 % 7000, n)
}
