//! `gantry bench` against `gantry mock` over real loopback sockets: measured latency against
//! configured delays, trace prefix structure under the mock's tokenizer, report files and
//! plots, and every way a run can lose requests (refused, garbage, cut, HTTP errors).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use gantry_bench::bench::client::Api;
use gantry_bench::bench::trace::{self, TraceFormat, TraceRecord};
use gantry_bench::bench::workload::{block_text, TraceScale};
use gantry_bench::bench::{self, CompareArgs, LoadArgs, ReplayArgs, RunArgs, SynthArgs, TraceArgs};
use gantry_bench::mock::{MockArgs, MockServer};
use gantry_proxy::http::client::ClientConn;
use gantry_proxy::rt::{self, Driver};
use serde_json::{json, Value};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: MockArgs,
}

/// Starts mock engines on ephemeral ports with `extra` flags (no delays unless they set some).
fn mock(extra: &[&str]) -> MockServer {
    let mut argv = vec!["mock", "--port", "0"];
    if !extra.iter().any(|f| f.ends_with("-coeffs") || *f == "--speedup") {
        argv.extend_from_slice(&["--speedup", "0"]);
    }
    argv.extend_from_slice(extra);
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("bad mock flags {argv:?}: {e}"));
    gantry_bench::mock::spawn(&cli.args).expect("mock engines start")
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn run_args(requests: u64, concurrency: usize) -> RunArgs {
    RunArgs { requests: Some(requests), concurrency: Some(concurrency), timeout: 20.0, ..RunArgs::new("mock-model") }
}

fn load(url: &str, run: RunArgs, synth: SynthArgs) -> bench::Report {
    bench::load(&LoadArgs { url: url.to_owned(), run, synth }).expect("the run completes")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gantry-bench-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// POSTs JSON on a fresh connection; returns the parsed JSON answer.
fn post(addr: SocketAddr, path: &str, body: &Value) -> Value {
    rt::block_on(Driver::Legacy, async {
        let mut c = ClientConn::connect(addr, Duration::from_secs(5)).await.expect("connect");
        let headers = [("content-type", &b"application/json"[..])];
        let (head, body) = c.request("POST", path, &headers, body.to_string().as_bytes()).await.expect("answer");
        assert_eq!(head.status, 200, "{path}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).expect("JSON answer")
    })
    .expect("client runtime")
}

fn tokenize_chat(addr: SocketAddr, content: &str) -> Vec<u64> {
    let v =
        post(addr, "/tokenize", &json!({"model": "mock-model", "messages": [{"role": "user", "content": content}]}));
    v["tokens"].as_array().expect("tokens").iter().map(|t| t.as_u64().expect("id")).collect()
}

fn common_prefix(a: &[u64], b: &[u64]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The mock's step model is prefill `c` ms per step with prefill work and decode `d` ms per step
/// with decode work; with one request in flight, TTFT is one prefill step and the token gaps are
/// decode steps. Tolerance: the measured p50 lies in [delay - 1 ms, delay + 20 ms] (1 ms of
/// timer granularity below; loopback and a loaded 2-core CI machine above).
#[test]
fn measured_ttft_and_itl_match_the_configured_delays() {
    const PREFILL_MS: f64 = 40.0;
    const DECODE_MS: f64 = 10.0;
    const TOLERANCE_MS: f64 = 20.0;
    let m = mock(&["--prefill-ms-coeffs", "0,0,40", "--decode-ms-coeffs", "0,0,10", "--decode-min-ms", "0"]);
    let synth = SynthArgs { isl: 32, osl: 4, ..SynthArgs::default() };
    let r = load(&m.engines[0].url(), run_args(10, 1), synth);
    let s = r.summary();
    assert_eq!((s.sent, s.completed, s.failed), (10, 10, 0), "{:?}", s.error_samples);
    assert!(
        (PREFILL_MS - 1.0..PREFILL_MS + TOLERANCE_MS).contains(&s.ttft_ms.p50),
        "TTFT p50 {} ms, configured {PREFILL_MS} ms",
        s.ttft_ms.p50
    );
    assert!(s.ttft_ms.min >= PREFILL_MS - 1.0, "TTFT min {} below the configured delay", s.ttft_ms.min);
    assert!(
        (DECODE_MS - 1.0..DECODE_MS + TOLERANCE_MS).contains(&s.itl_ms.p50),
        "ITL p50 {} ms, configured {DECODE_MS} ms",
        s.itl_ms.p50
    );
    assert_eq!(s.itl_ms.count, 10 * 3, "three gaps per 4-token stream");
    let e2e = PREFILL_MS + 3.0 * DECODE_MS;
    assert!(
        (e2e - 1.0..e2e + 2.0 * TOLERANCE_MS).contains(&s.e2e_ms.p50),
        "e2e p50 {} ms, expected ~{e2e}",
        s.e2e_ms.p50
    );
    assert_eq!(s.output_tokens, 40);
    assert_eq!(s.input_tokens, 320);
}

/// Non-streaming completions: no TTFT, e2e still measured, usage counted.
#[test]
fn non_streaming_completions_are_measured() {
    let m = mock(&[]);
    let run = RunArgs { no_stream: true, endpoint: Api::Completions, ..run_args(20, 4) };
    let r = load(&m.engines[0].url(), run, SynthArgs { isl: 16, osl: 3, ..SynthArgs::default() });
    let s = r.summary();
    assert_eq!((s.completed, s.failed), (20, 0), "{:?}", s.error_samples);
    assert_eq!(s.ttft_ms.count, 0);
    assert_eq!(s.e2e_ms.count, 20);
    assert_eq!(s.output_tokens, 60);
}

/// Equal hash ids give identical prompt text, so requests sharing their first k blocks share
/// exactly `header + k × block` prompt tokens under the mock's tokenizer (ids from /tokenize),
/// and the next token differs; each block is exactly `block_words()` tokens.
#[test]
fn replay_preserves_the_trace_prefix_structure() {
    let m = mock(&[]);
    let addr = m.engines[0].http;
    let records = trace::load(&data("mooncake_small.jsonl"), TraceFormat::Auto, None).expect("fixture parses");
    let scale = TraceScale { block_tokens: 512, token_scale: 0.125 };
    let block = scale.block_words() as usize;
    assert_eq!(block, 64);
    // The chat template's tokens before the content ("<|im_start|>user\n").
    let header = gantry_tokenizer::Tokenizer::builtin().encode("<|im_start|>user\n", false).expect("encodes").len();
    let jobs: Vec<_> = records.iter().enumerate().map(|(i, r)| scale.job(i as u64, r)).collect();
    let ids: Vec<Vec<u64>> = jobs.iter().map(|j| tokenize_chat(addr, &j.prompt)).collect();
    for (i, j) in jobs.iter().enumerate() {
        let completion = post(addr, "/tokenize", &json!({"model": "mock-model", "prompt": j.prompt}));
        assert_eq!(completion["count"], json!(j.input_tokens), "request {i}: one word is one token");
    }
    let shared =
        |a: &TraceRecord, b: &TraceRecord| a.hash_ids.iter().zip(&b.hash_ids).take_while(|(x, y)| x == y).count();
    let mut checked = 0;
    for a in 0..records.len() {
        for b in a + 1..records.len() {
            let k = shared(&records[a], &records[b]);
            let (la, lb) = (jobs[a].input_tokens as usize, jobs[b].input_tokens as usize);
            let expect = header + (k * block).min(la).min(lb);
            let got = common_prefix(&ids[a], &ids[b]);
            if k * block < la.min(lb) {
                assert_eq!(got, expect, "requests {a} and {b} share {k} blocks");
                checked += 1;
            } else {
                assert!(got >= expect, "requests {a} and {b}: {got} < {expect}");
            }
        }
    }
    assert!(checked >= 10, "the fixture exercises shared and unshared pairs");
    // Block text depends on the hash id only.
    assert_eq!(block_text(1, block), block_text(1, block));
    assert_ne!(block_text(1, block), block_text(2, block));
}

fn png_ok(path: &Path) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: not a PNG: {e}", path.display())).to_rgb8();
    assert!(img.width() >= 400 && img.height() >= 300, "{}: {}x{}", path.display(), img.width(), img.height());
    let mut colors: Vec<[u8; 3]> = img.pixels().step_by(7).map(|p| p.0).collect();
    colors.sort_unstable();
    colors.dedup();
    assert!(colors.len() > 8, "{}: only {} colours: an empty picture", path.display(), colors.len());
    let dark = img.pixels().filter(|p| p.0.iter().all(|&c| c < 100)).count();
    assert!(dark > 500, "{}: no text or axes drawn", path.display());
}

/// A replay with engine metrics: every record sent and answered, a prefix hit rate from the
/// engines' counters, and the report files with their keys and non-empty plots.
#[test]
fn replay_reports_prefix_hits_and_writes_every_file() {
    let m = mock(&["--engines", "2", "--speedup", "10"]);
    let dir = tmpdir("replay");
    let run = RunArgs {
        engine_metrics: m.engines.iter().map(|e| e.url()).collect(),
        report: Some(dir.clone()),
        timeout: 20.0,
        ..RunArgs::new("mock-model")
    };
    let trace_args = TraceArgs { speed: 20.0, token_scale: 0.125, ..TraceArgs::default() };
    let args = ReplayArgs { trace: data("mooncake_small.jsonl"), url: m.engines[0].url(), run, trace_args };
    let r = bench::replay(&args).expect("replay runs");
    let s = r.summary();
    assert_eq!((s.sent, s.completed, s.failed), (6, 6, 0), "{:?}", s.error_samples);
    assert!(s.duration_s >= 3.0 / 20.0, "the trace spans 3 s, replayed at 20x: {} s", s.duration_s);
    let hit = s.prefix_hit_rate.expect("engine metrics give a hit rate");
    assert!(hit > 0.2 && hit < 1.0, "hit rate {hit}");
    assert_eq!(s.engine_metrics[0].requests, 6.0);
    assert_eq!(s.engine_metrics[1].requests, 0.0);

    let v: Value = serde_json::from_slice(&std::fs::read(dir.join("report.json")).expect("report.json")).expect("JSON");
    for key in ["requests", "errors", "throughput_rps", "sent", "completed", "failed", "prefix_hit_rate", "run"] {
        assert!(v.get(key).is_some(), "report.json lacks `{key}`");
    }
    for dist in ["ttft_ms", "itl_ms", "e2e_ms"] {
        for p in ["p50", "p90", "p99", "mean"] {
            assert!(v[dist][p].as_f64().is_some_and(|x| x > 0.0), "report.json {dist}.{p}: {}", v[dist][p]);
        }
    }
    assert_eq!(v["requests"], json!(6));
    let lines = std::fs::read_to_string(dir.join("requests.jsonl")).expect("requests.jsonl");
    let rows: Vec<Value> = lines.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(rows.len(), 6, "one line per request: {lines}");
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["index"], json!(i), "workload order");
        let (start, ttft, end) =
            (r["start_ms"].as_f64().unwrap(), r["ttft_ms"].as_f64().unwrap(), r["end_ms"].as_f64().unwrap());
        assert!(ttft > 0.0 && start + ttft <= end, "{r}");
        assert!(r["input_tokens"].as_u64().unwrap() > 0 && r["error"].is_null(), "{r}");
    }
    let md = std::fs::read_to_string(dir.join("report.md")).expect("report.md");
    assert!(md.contains("| TTFT p99 (ms) |") && md.contains("| prefix-cache hit rate |"), "{md}");
    for p in bench::plot::PLOTS {
        png_ok(&dir.join(p));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Shared-prefix groups reach the engine's prefix cache; the open loop sends every request.
#[test]
fn open_loop_with_prefix_groups_hits_the_cache() {
    let m = mock(&[]);
    let run = RunArgs {
        concurrency: None,
        rate: Some(400.0),
        arrival: bench::Arrival::Constant,
        engine_metrics: vec![m.engines[0].url()],
        ..run_args(40, 1)
    };
    let synth = SynthArgs { isl: 96, osl: 2, prefix_groups: 2, prefix_len: 64, ..SynthArgs::default() };
    let r = load(&m.engines[0].url(), run, synth);
    let s = r.summary();
    assert_eq!((s.sent, s.completed), (40, 40), "{:?}", s.error_samples);
    assert!(s.duration_s >= 39.0 / 400.0, "40 arrivals at 400/s span 97.5 ms: {} s", s.duration_s);
    // 38 of 40 requests find their group's 64-token prefix (4 full 16-token blocks) cached.
    let hit = s.prefix_hit_rate.expect("hit rate");
    assert!(hit > 0.5, "hit rate {hit}");
}

/// Two endpoints, alternating slices: one summary each and ratios against the first.
#[test]
fn compare_reports_each_target_and_ratios() {
    let m = mock(&["--engines", "2"]);
    let dir = tmpdir("compare");
    let args = CompareArgs {
        targets: vec![format!("a={}", m.engines[0].url()), format!("b={}", m.engines[1].url())],
        trace: None,
        rounds: 2,
        run: RunArgs { report: Some(dir.clone()), ..run_args(16, 2) },
        synth: SynthArgs { isl: 16, osl: 2, ..SynthArgs::default() },
        trace_args: TraceArgs::default(),
    };
    let r = bench::compare(&args).expect("compare runs");
    assert_eq!(r.targets.len(), 2);
    for t in &r.targets {
        assert_eq!((t.sent, t.completed), (16, 16), "{}: {:?}", t.target, t.error_samples);
    }
    assert_eq!(r.ratios.len(), 1);
    assert!(r.ratios[0].ratios.get("throughput_rps").is_some_and(|x| *x > 0.0));
    let v: Value = serde_json::from_slice(&std::fs::read(dir.join("report.json")).expect("report.json")).expect("JSON");
    assert_eq!(v["targets"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["ratios"][0]["baseline"], json!("a"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A refused endpoint: every request is sent, fails as `connect`, and the report says so
/// with the URL.
#[test]
fn refused_endpoint_counts_connect_errors() {
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let url = format!("http://127.0.0.1:{port}");
    let dir = tmpdir("refused");
    let r = load(&url, RunArgs { report: Some(dir.clone()), ..run_args(5, 2) }, SynthArgs::default());
    let s = r.summary();
    assert_eq!((s.sent, s.completed, s.failed), (5, 0, 5));
    assert_eq!(s.errors_by_kind.get("connect"), Some(&5));
    assert!(s.error_samples["connect"].contains(&url), "{}", s.error_samples["connect"]);
    let md = std::fs::read_to_string(dir.join("report.md")).expect("report.md");
    assert!(md.contains("| errors: connect | 5 |"), "{md}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A server that answers every request with bytes that are not HTTP.
fn garbage_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut s in l.incoming().map_while(Result::ok) {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2 garbage\r\n\r\n");
        }
    });
    addr
}

#[test]
fn garbage_answers_and_http_errors_are_counted_by_kind() {
    let addr = garbage_server();
    let r = load(&format!("http://{addr}"), run_args(3, 1), SynthArgs::default());
    assert_eq!(r.summary().errors_by_kind.get("bad_response"), Some(&3), "{:?}", r.summary().error_samples);

    let m = mock(&[]);
    let wrong_model = RunArgs { model: "no-such-model".into(), ..run_args(4, 2) };
    let r = load(&m.engines[0].url(), wrong_model, SynthArgs::default());
    assert_eq!(r.summary().errors_by_kind.get("http_404"), Some(&4), "{:?}", r.summary().error_samples);
    assert!(r.summary().error_samples["http_404"].contains("no-such-model"));
}

#[test]
fn cut_streams_are_counted_never_hidden() {
    let m = mock(&["--cut-after", "2"]);
    let r = load(&m.engines[0].url(), run_args(6, 2), SynthArgs { isl: 8, osl: 5, ..SynthArgs::default() });
    let s = r.summary();
    assert_eq!((s.sent, s.completed, s.failed), (6, 0, 6));
    assert_eq!(s.errors_by_kind.get("cut"), Some(&6), "{:?}", s.error_samples);
}

#[test]
fn bad_traces_name_the_file_and_line() {
    let dir = tmpdir("badtrace");
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [0]}\n\n{\"timestamp\": 5, \"input_length\": \"x\"}\n")
        .expect("write");
    let e = trace::load(&bad, TraceFormat::Auto, None).expect_err("malformed").to_string();
    assert!(e.starts_with(&format!("{}:3: ", bad.display())), "{e}");

    let missing = dir.join("missing.jsonl");
    let args = ReplayArgs {
        trace: missing.clone(),
        url: "http://127.0.0.1:9".into(),
        run: RunArgs::new("m"),
        trace_args: TraceArgs::default(),
    };
    let e = bench::replay(&args).expect_err("missing file").to_string();
    assert!(e.contains(&missing.display().to_string()) && e.contains("reading trace"), "{e}");

    let csv = dir.join("bad.csv");
    std::fs::write(
        &csv,
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,10,2\n2023-11-16 25:00:00,1,1\n",
    )
    .expect("write");
    let e = trace::load(&csv, TraceFormat::Auto, None).expect_err("bad hour").to_string();
    assert!(e.contains("bad.csv:3: bad TIMESTAMP"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn azure_csv_gives_arrival_times_and_lengths() {
    let r = trace::load(&data("azure_small.csv"), TraceFormat::Auto, None).expect("fixture parses");
    assert_eq!(r.len(), 4);
    assert_eq!(r[0].timestamp_ms, 0.0);
    assert!((r[1].timestamp_ms - 4314.5790).abs() < 1e-3, "{}", r[1].timestamp_ms);
    assert!((r[3].timestamp_ms - 15819.4100).abs() < 1e-3, "{}", r[3].timestamp_ms);
    assert_eq!((r[2].input_length, r[2].output_length), (879, 4));
    assert!(r.iter().all(|x| x.hash_ids.is_empty()));
    let limited = trace::load(&data("azure_small.csv"), TraceFormat::Azure, Some(2)).expect("parses");
    assert_eq!(limited.len(), 2);
}

/// Through `gantry serve` (round robin over two engines): requests per engine from the
/// `x-gantry-engine` header agree with the engines' own counters.
#[test]
fn through_the_proxy_requests_are_counted_per_engine() {
    let m = mock(&["--engines", "2"]);
    let urls: Vec<String> = m.engines.iter().map(|e| e.url()).collect();
    let mut cfg = gantry_proxy::config::Config::single_pool("mock-model", &urls);
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.server.workers = 1;
    cfg.health.interval_ms = 0;
    let proxy = gantry_proxy::serve::spawn(cfg, None).expect("proxy starts");
    let run = RunArgs { engine_metrics: urls.clone(), ..run_args(20, 1) };
    let r = load(&format!("http://{}", proxy.addr), run, SynthArgs { isl: 16, osl: 2, ..SynthArgs::default() });
    let s = r.summary();
    assert_eq!(s.completed, 20, "{:?}", s.error_samples);
    let counts: Vec<u64> = s.requests_per_engine.values().copied().collect();
    assert_eq!(counts, vec![10, 10], "{:?}", s.requests_per_engine);
    let scraped: f64 = s.engine_metrics.iter().map(|e| e.requests).sum();
    assert_eq!(scraped, 20.0);
}
