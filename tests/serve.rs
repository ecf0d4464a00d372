//! `gantry serve` in front of `gantry mock` engines, over loopback, on both I/O drivers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use clap::Parser;
use gantry_bench::mock::{MockArgs, MockServer};
use gantry_proxy::config::{Config, Overrides, PolicyKind};
use gantry_proxy::http::client::ClientConn;
use gantry_proxy::http::sse::SseParser;
use gantry_proxy::rt::{self, Driver};
use gantry_proxy::serve::{self, ProxyServer};
use serde_json::{json, Value};

#[derive(Parser)]
struct MockCli {
    #[command(flatten)]
    args: MockArgs,
}

fn mock(extra: &[&str]) -> MockServer {
    let mut argv = vec!["mock", "--port", "0"];
    if !extra.contains(&"--speedup") {
        argv.extend(["--speedup", "0"]);
    }
    argv.extend_from_slice(extra);
    gantry_bench::mock::spawn(&MockCli::try_parse_from(&argv).unwrap().args).unwrap()
}

fn drivers() -> Vec<&'static str> {
    if rt::uring_available() {
        vec!["legacy", "io_uring"]
    } else {
        eprintln!("io_uring unavailable here: testing the epoll driver only");
        vec!["legacy"]
    }
}

fn proxy(urls: &[String], driver: &str, edit: impl FnOnce(&mut Config)) -> ProxyServer {
    let mut cfg = Config::single_pool("mock-model", urls);
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.server.workers = 2;
    cfg.server.driver = driver.into();
    cfg.health.interval_ms = 0;
    edit(&mut cfg);
    serve::spawn(cfg, None).expect("proxy starts")
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }
    fn header(&self, n: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.as_str())
    }
}

/// One request on an open connection (which must live in the calling runtime).
async fn post_on(c: &mut ClientConn, path: &str, body: &Value) -> Reply {
    c.send("POST", path, &[("content-type", b"application/json")], body.to_string().as_bytes()).await.unwrap();
    let head = c.read_head(false).await.unwrap();
    let body = c.read_body().await.unwrap().to_vec();
    let headers = head.headers().iter().map(|(n, v)| (n.to_owned(), String::from_utf8_lossy(v).into_owned())).collect();
    Reply { status: head.status, headers, body }
}

/// One admin API call with a bearer token: status and JSON body (null if not JSON).
fn admin_call(admin: SocketAddr, method: &str, path: &str, token: &str, body: Value) -> (u16, Value) {
    rt::block_on(Driver::Legacy, async {
        let mut c = ClientConn::connect(admin, Duration::from_secs(5)).await.unwrap();
        let auth = format!("Bearer {token}");
        let (h, b) =
            c.request(method, path, &[("authorization", auth.as_bytes())], body.to_string().as_bytes()).await.unwrap();
        (h.status, serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null))
    })
    .unwrap()
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    // A fresh runtime per request: the connection must live inside one runtime.
    rt::block_on(Driver::Legacy, async {
        let mut c = ClientConn::connect(addr, Duration::from_secs(5)).await.unwrap();
        c.send("POST", path, &[("content-type", b"application/json")], body.to_string().as_bytes()).await.unwrap();
        let head = c.read_head(false).await.unwrap();
        let body = c.read_body().await.unwrap().to_vec();
        let headers =
            head.headers().iter().map(|(n, v)| (n.to_owned(), String::from_utf8_lossy(v).into_owned())).collect();
        Reply { status: head.status, headers, body }
    })
    .unwrap()
}

fn get(addr: SocketAddr, path: &str) -> Reply {
    rt::block_on(Driver::Legacy, async {
        let mut c = ClientConn::connect(addr, Duration::from_secs(5)).await.unwrap();
        let (head, body) = c.request("GET", path, &[], b"").await.unwrap();
        Reply { status: head.status, headers: vec![], body: body.to_vec() }
    })
    .unwrap()
}

fn stream(addr: SocketAddr, body: &Value) -> (u16, Vec<String>) {
    rt::block_on(Driver::Legacy, async {
        let mut c = ClientConn::connect(addr, Duration::from_secs(5)).await.unwrap();
        c.send("POST", "/v1/chat/completions", &[], body.to_string().as_bytes()).await.unwrap();
        let head = c.read_head(false).await.unwrap();
        let mut p = SseParser::new();
        let mut events = Vec::new();
        while let Some(chunk) = c.read_chunk().await.unwrap() {
            p.push(&chunk);
            while let Some(e) = p.next_event() {
                events.push(e.data);
            }
        }
        (head.status, events)
    })
    .unwrap()
}

fn chat(n: u32) -> Value {
    json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": n})
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[test]
fn proxies_whole_and_streamed_responses_with_keep_alive() {
    let m = mock(&["--engines", "2"]);
    let urls: Vec<String> = m.engines.iter().map(|e| e.url()).collect();
    for driver in drivers() {
        let p = proxy(&urls, driver, |_| {});
        let open = rt::block_on(Driver::Legacy, async {
            let mut c = ClientConn::connect(p.addr, Duration::from_secs(5)).await.unwrap();
            let mut seen = std::collections::HashSet::new();
            for _ in 0..10 {
                let r = post_on(&mut c, "/v1/chat/completions", &chat(4)).await;
                assert_eq!(r.status, 200, "{driver}");
                assert_eq!(r.header("x-gantry-pool"), Some("agg-0"));
                seen.insert(r.header("x-gantry-engine").unwrap().to_owned());
                assert_eq!(r.json()["usage"]["completion_tokens"], 4);
            }
            assert_eq!(seen.len(), 2, "round robin used both engines");
            p.metrics.open_connections.load(std::sync::atomic::Ordering::Relaxed)
        })
        .unwrap();
        assert_eq!(open, 1, "one client connection served all");
        let mut body = chat(6);
        body["stream"] = json!(true);
        let (status, events) = stream(p.addr, &body);
        assert_eq!(status, 200);
        assert_eq!(events.len(), 8, "role chunk, 6 tokens, [DONE]");
        assert_eq!(events.last().unwrap(), "[DONE]");
        // A chunked request body is forwarded as a whole.
        let mut s = TcpStream::connect(p.addr).unwrap();
        let payload = chat(2).to_string();
        let (a, b) = payload.split_at(10);
        write!(s, "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n", a.len(), b.len()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let text = get(p.addr, "/metrics");
        let metrics = String::from_utf8(text.body).unwrap();
        assert!(metric(&metrics, "gantry_requests_total{model=\"mock-model\"") >= 12.0, "{metrics}");
        assert!(metric(&metrics, "gantry_ttft_seconds_count") >= 12.0);
        assert!(metric(&metrics, "gantry_itl_seconds_count") >= 5.0);
        assert!(metric(&metrics, "gantry_output_tokens_sum") >= 46.0);
    }
}

#[test]
fn upstream_connections_are_reused() {
    for driver in drivers() {
        // An upstream that counts its connections.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let acc = accepted.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { break };
                acc.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    let mut pending = Vec::new();
                    loop {
                        let n = match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        pending.extend_from_slice(&buf[..n]);
                        // Each request here has a JSON body ending in '}' after the blank line.
                        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&pending[..end]).to_lowercase();
                            let len: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length: "))
                                .and_then(|v| v.trim().parse().ok())
                                .unwrap_or(0);
                            if pending.len() < end + 4 + len {
                                break;
                            }
                            pending.drain(..end + 4 + len);
                            let body = r#"{"ok":true}"#;
                            let _ = write!(
                                s,
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                        }
                    }
                });
            }
        });
        let p = proxy(&[format!("http://{addr}")], driver, |c| c.server.workers = 1);
        for _ in 0..20 {
            assert_eq!(post(p.addr, "/v1/completions", &json!({"model": "mock-model", "prompt": "x"})).status, 200);
        }
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "{driver}: 20 requests over one pooled upstream connection"
        );
    }
}

#[test]
fn retries_before_the_first_byte() {
    for driver in drivers() {
        let good = mock(&[]);
        let busy = mock(&["--fail-rate", "1", "--fail-status", "503"]);
        // A port nobody listens on: connections are refused.
        let refused = format!("http://{}", TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap());
        let urls = vec![refused, busy.engines[0].url(), good.engines[0].url()];
        let p = proxy(&urls, driver, |c| {
            c.retry.attempts = 3;
            c.health.passive_failures = 1000;
        });
        for _ in 0..9 {
            let r = post(p.addr, "/v1/chat/completions", &chat(2));
            assert_eq!(r.status, 200);
            assert_eq!(r.header("x-gantry-engine"), Some(good.engines[0].url().as_str()));
        }
        let text = String::from_utf8(get(p.addr, "/metrics").body).unwrap();
        assert!(metric(&text, "gantry_retries_total") >= 6.0, "{text}");
        // With one attempt the refused engine's error reaches the client as a 502.
        let p1 = proxy(&urls[..1], driver, |c| c.retry.attempts = 1);
        let r = post(p1.addr, "/v1/chat/completions", &chat(2));
        assert_eq!(r.status, 502);
        assert_eq!(r.json()["error"]["code"], 502);
    }
}

#[test]
fn passive_ejection_moves_traffic_off_a_failing_engine() {
    let good = mock(&[]);
    let refused = format!("http://{}", TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap());
    for driver in drivers() {
        let p = proxy(&[refused.clone(), good.engines[0].url()], driver, |c| {
            c.health.passive_failures = 2;
            c.health.eject_ms = 60_000;
        });
        for _ in 0..8 {
            assert_eq!(post(p.addr, "/v1/chat/completions", &chat(1)).status, 200, "{driver}");
        }
        let fleet = p.fleet.load();
        let bad = &fleet.pools[0].engines[0];
        assert!(!bad.healthy(gantry_proxy::fleet::now_ms()), "the refusing engine is ejected");
        assert_eq!(bad.counters.ejections.load(std::sync::atomic::Ordering::Relaxed), 1);
        let retries_after_eject = bad.counters.retries.load(std::sync::atomic::Ordering::Relaxed);
        for _ in 0..8 {
            post(p.addr, "/v1/chat/completions", &chat(1));
        }
        assert_eq!(
            bad.counters.retries.load(std::sync::atomic::Ordering::Relaxed),
            retries_after_eject,
            "an ejected engine gets no traffic while a healthy one is left"
        );
    }
}

#[test]
fn other_endpoints_pass_through_to_an_engine_of_the_model() {
    for driver in drivers() {
        let m = mock(&[]);
        let p = proxy(&[m.engines[0].url()], driver, |_| {});
        let direct =
            post(m.engines[0].http, "/tokenize", &json!({"model": "mock-model", "prompt": "bado kema"})).json();
        let r = post(p.addr, "/tokenize", &json!({"model": "mock-model", "prompt": "bado kema"}));
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["tokens"], direct["tokens"]);
        assert_eq!(r.header("x-gantry-engine"), Some(m.engines[0].url().as_str()));
        let r = post(p.addr, "/detokenize", &json!({"tokens": direct["tokens"]}));
        assert_eq!(r.json()["prompt"], "bado kema", "no model in the body: the first configured model's engines");
    }
}

#[test]
fn engine_death_mid_stream_ends_with_an_error_event() {
    let m = mock(&["--cut-after", "3"]);
    for driver in drivers() {
        let p = proxy(&[m.engines[0].url()], driver, |_| {});
        let mut body = chat(10);
        body["stream"] = json!(true);
        let (status, events) = stream(p.addr, &body);
        assert_eq!(status, 200);
        let n = events.len();
        assert!(n >= 3, "{events:?}");
        assert_eq!(events[n - 1], "[DONE]");
        let err: Value = serde_json::from_str(&events[n - 2]).unwrap();
        assert_eq!(err["error"]["code"], 502, "{events:?}");
        wait_until("the in-flight count to return to 0", Duration::from_secs(5), || p.in_flight() == 0);
    }
}

#[test]
fn client_disconnect_aborts_upstream_and_releases_the_charge() {
    let m = mock(&["--speedup", "1", "--decode-ms-coeffs", "0,0,20"]);
    let engine = m.engines[0].http;
    for driver in drivers() {
        let p = proxy(&[m.engines[0].url()], driver, |_| {});
        let addr = p.addr;
        rt::block_on(Driver::Legacy, async move {
            let mut c = ClientConn::connect(addr, Duration::from_secs(5)).await.unwrap();
            let mut body = chat(10_000);
            body["stream"] = json!(true);
            c.send("POST", "/v1/chat/completions", &[], body.to_string().as_bytes()).await.unwrap();
            assert_eq!(c.read_head(false).await.unwrap().status, 200);
            assert!(c.read_chunk().await.unwrap().is_some());
        })
        .unwrap();
        wait_until("the proxy to release the request", Duration::from_secs(10), || p.in_flight() == 0);
        wait_until("the engine to abort it", Duration::from_secs(10), || {
            let s = get(engine, "/mock/state").body;
            let s: Value = serde_json::from_slice(&s).unwrap();
            s["running"] == 0 && s["kv_usage"] == 0.0
        });
    }
}

#[test]
fn health_probes_eject_and_restore_engines() {
    for driver in drivers() {
        let a = mock(&[]);
        let b = mock(&[]);
        let urls = vec![a.engines[0].url(), b.engines[0].url()];
        let p = proxy(&urls, driver, |c| {
            c.health.interval_ms = 50;
            c.health.timeout_ms = 500;
        });
        assert_eq!(get(p.addr, "/health").status, 200);
        post(a.engines[0].http, "/mock/faults", &json!({"dead": true}));
        wait_until("engine a to be ejected", Duration::from_secs(10), || {
            p.fleet.load().pools[0].engines[0].probe_down.load(std::sync::atomic::Ordering::Relaxed)
        });
        for _ in 0..6 {
            let r = post(p.addr, "/v1/chat/completions", &chat(1));
            assert_eq!(r.header("x-gantry-engine"), Some(urls[1].as_str()), "traffic avoids the ejected engine");
        }
        post(b.engines[0].http, "/mock/faults", &json!({"dead": true}));
        wait_until("the proxy to report no healthy engine", Duration::from_secs(10), || {
            get(p.addr, "/health").status == 503
        });
        post(a.engines[0].http, "/mock/faults", &json!({"dead": false}));
        post(b.engines[0].http, "/mock/faults", &json!({"dead": false}));
        wait_until("both engines to recover", Duration::from_secs(10), || {
            get(p.addr, "/health").status == 200 && {
                let f = p.fleet.load();
                f.pools[0].engines.iter().all(|e| !e.probe_down.load(std::sync::atomic::Ordering::Relaxed))
            }
        });
    }
}

#[test]
fn reload_swaps_engines_without_dropping_connections() {
    for driver in drivers() {
        let a = mock(&[]);
        let b = mock(&[]);
        let dir = std::env::temp_dir().join(format!("gantry-reload-{driver}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gantry.toml");
        let write = |url: &str| {
            std::fs::write(
                &path,
                format!("[server]\nlisten = \"127.0.0.1:0\"\nworkers = 1\ndriver = \"{driver}\"\n[health]\ninterval_ms = 0\n[[model]]\nname = \"mock-model\"\n[[pool]]\nname = \"agg-0\"\n[[pool.engine]]\nurl = \"{url}\"\nmodel = \"mock-model\"\n"),
            )
            .unwrap()
        };
        write(&a.engines[0].url());
        let mut p = serve::spawn(Config::load(&path).unwrap(), Some(path.clone())).unwrap();
        let addr = p.addr;
        rt::block_on(Driver::Legacy, async {
            let mut c = ClientConn::connect(addr, Duration::from_secs(5)).await.unwrap();
            let r = post_on(&mut c, "/v1/chat/completions", &chat(1)).await;
            assert_eq!(r.header("x-gantry-engine"), Some(a.engines[0].url().as_str()));
            write(&b.engines[0].url());
            p.reload().unwrap();
            let r = post_on(&mut c, "/v1/chat/completions", &chat(1)).await;
            assert_eq!(r.status, 200, "the same client connection keeps working");
            assert_eq!(r.header("x-gantry-engine"), Some(b.engines[0].url().as_str()));
            std::fs::write(&path, "[[pool]]\nname = 3\n").unwrap();
            assert!(p.reload().is_err(), "a broken file is rejected");
            assert_eq!(post_on(&mut c, "/v1/chat/completions", &chat(1)).await.status, 200, "and the old fleet stays");
        })
        .unwrap();
        let text = String::from_utf8(get(addr, "/metrics").body).unwrap();
        let served = "gantry_model_requests_total{model=\"mock-model\",base=\"mock-model\",status=\"200\"}";
        assert_eq!(metric(&text, served), 3.0, "a model's counts outlive reloads: {text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn reload_keeps_command_line_overrides() {
    let a = mock(&[]);
    let dir = std::env::temp_dir().join(format!("gantry-reload-overrides-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gantry.toml");
    let url = a.engines[0].url();
    std::fs::write(
        &path,
        format!("[server]\nlisten = \"127.0.0.1:0\"\nworkers = 1\n[health]\ninterval_ms = 0\n[[model]]\nname = \"mock-model\"\n[[pool]]\nname = \"agg-0\"\npolicy = \"round_robin\"\n[[pool.engine]]\nurl = \"{url}\"\nmodel = \"mock-model\"\n"),
    )
    .unwrap();
    let overrides = Overrides { policy: Some(PolicyKind::LeastLoaded), ..Overrides::default() };
    let mut cfg = Config::load(&path).unwrap();
    overrides.apply(&mut cfg);
    let mut p = serve::spawn_with(cfg, Some(path.clone()), overrides).unwrap();
    assert_eq!(p.fleet.load().pools[0].policy, PolicyKind::LeastLoaded);
    p.reload().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(p.fleet.load().pools[0].policy, PolicyKind::LeastLoaded, "--policy outlives a reload");
}

#[test]
fn bad_requests_get_openai_errors() {
    for driver in drivers() {
        bad_requests_on(driver);
    }
}

fn bad_requests_on(driver: &str) {
    let m = mock(&[]);
    let p = proxy(&[m.engines[0].url()], driver, |c| {
        c.server.max_body_bytes = 1000;
        c.server.header_timeout_ms = 300;
    });
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("/v1/chat/completions", b"{nope".to_vec(), 400),
        ("/v1/chat/completions", b"{\"messages\":[]}".to_vec(), 400),
        ("/v1/chat/completions", b"{\"model\":\"\xff\"}".to_vec(), 400),
        ("/v1/chat/completions", br#"{"model":"other","messages":[]}"#.to_vec(), 404),
        ("/v1/chat/completions", vec![b'x'; 2000], 413),
        ("/v2/unknown", b"{}".to_vec(), 404),
        // Fleet-wide changes that one engine must not get alone.
        ("/v1/load_lora_adapter", br#"{"lora_name":"a","lora_path":"/x"}"#.to_vec(), 501),
        ("/v1/unload_lora_adapter", br#"{"lora_name":"a"}"#.to_vec(), 501),
    ];
    for (path, body, status) in cases {
        let r = rt::block_on(Driver::Legacy, async {
            let mut c = ClientConn::connect(p.addr, Duration::from_secs(5)).await.unwrap();
            c.request("POST", path, &[], &body).await.unwrap()
        })
        .unwrap();
        assert_eq!(r.0.status, status, "{path}: {}", String::from_utf8_lossy(&r.1));
        let v: Value = serde_json::from_slice(&r.1).unwrap();
        assert_eq!(v["error"]["code"], status);
    }
    assert_eq!(get(p.addr, "/v1/chat/completions").status, 405);
    // Slowloris: half a head, then nothing; others are unaffected.
    let mut slow = TcpStream::connect(p.addr).unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\n").unwrap();
    assert_eq!(post(p.addr, "/v1/chat/completions", &chat(1)).status, 200);
    slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = String::new();
    let _ = slow.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(out.contains("\"code\":408"), "{out}");
    // A garbage engine gives a 502, not a hang or a crash.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().take(3) {
            let mut s = s.unwrap();
            let mut b = [0u8; 4096];
            let _ = s.read(&mut b);
            let _ = s.write_all(b"garbage\r\n\r\n");
        }
    });
    let p2 = proxy(&[format!("http://{addr}")], driver, |c| c.retry.attempts = 1);
    assert_eq!(post(p2.addr, "/v1/chat/completions", &chat(1)).status, 502);
}

#[test]
fn models_health_and_admin_api() {
    for driver in drivers() {
        let m = mock(&["--engines", "2"]);
        let urls: Vec<String> = m.engines.iter().map(|e| e.url()).collect();
        let p = proxy(&urls[..1], driver, |c| {
            c.admin =
                Some(gantry_proxy::config::AdminConf { listen: "127.0.0.1:0".into(), token: "admin-secret".into() });
            c.model.push(gantry_proxy::config::ModelConf {
                name: "sql-lora".into(),
                tokenizer: None,
                max_model_len: None,
                base: Some("mock-model".into()),
            });
        });
        let models: Value = serde_json::from_slice(&get(p.addr, "/v1/models").body).unwrap();
        assert_eq!(models["data"][0]["id"], "mock-model");
        assert_eq!(models["data"][0]["parent"], Value::Null);
        assert_eq!(
            (&models["data"][1]["id"], &models["data"][1]["parent"]),
            (&json!("sql-lora"), &json!("mock-model"))
        );
        let admin = p.admin.unwrap();
        let call = |method: &str, path: &str, token: &str, body: Value| admin_call(admin, method, path, token, body);
        assert_eq!(call("GET", "/admin/engines", "wrong-token", json!({})).0, 401);
        let (s, list) = call("GET", "/admin/engines", "admin-secret", Value::Null);
        assert_eq!(s, 200);
        assert_eq!(list["engines"].as_array().unwrap().len(), 1);
        let (s, e) = call("POST", "/admin/engines", "admin-secret", json!({"url": urls[1], "model": "sql-lora"}));
        assert_eq!(s, 400, "an engine serves an adapter through its base model: {e}");
        let (s, _) = call("POST", "/admin/engines", "admin-secret", json!({"url": urls[1], "model": "mock-model"}));
        assert_eq!(s, 201);
        assert_eq!(
            call("POST", "/admin/engines", "admin-secret", json!({"url": urls[1], "model": "mock-model"})).0,
            409
        );
        let engines: std::collections::HashSet<String> = (0..6)
            .map(|_| post(p.addr, "/v1/chat/completions", &chat(1)).header("x-gantry-engine").unwrap().to_owned())
            .collect();
        assert_eq!(engines.len(), 2, "the added engine takes traffic");
        assert_eq!(call("POST", "/admin/engines/drain", "admin-secret", json!({"url": urls[0]})).0, 200);
        for _ in 0..4 {
            assert_eq!(
                post(p.addr, "/v1/chat/completions", &chat(1)).header("x-gantry-engine"),
                Some(urls[1].as_str())
            );
        }
        assert_eq!(call("DELETE", "/admin/engines", "admin-secret", json!({"url": urls[0]})).0, 200);
        assert_eq!(call("DELETE", "/admin/engines", "admin-secret", json!({"url": urls[0]})).0, 404);
        let (_, list) = call("GET", "/admin/engines", "admin-secret", Value::Null);
        assert_eq!(list["engines"].as_array().unwrap().len(), 1);
    }
}

#[path = "serve/route.rs"]
mod route;
