//! The `gantry` binary itself: flags, startup errors, process-level faults, the openai client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn gantry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gantry"))
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Kills the child on drop (by PID), so a failing test leaves nothing running.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `gantry mock ARGS` and waits until its log line says engine `engines - 1` serves.
fn start_mock(args: &[&str], engines: usize) -> Running {
    let mut child = gantry()
        .arg("mock")
        .args(args)
        .env("GANTRY_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gantry mock");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let want = format!("engine={}", engines - 1);
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("serving") && line.contains(&want) => return Running(child),
            Ok(_) => {}
            Err(_) => panic!("gantry mock did not report readiness"),
        }
    }
}

fn http(addr: SocketAddr, req: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn post_completion(addr: SocketAddr) -> String {
    let body = r#"{"model":"mock-model","prompt":"hi","max_tokens":2}"#;
    http(
        addr,
        &format!(
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

#[test]
fn mock_help_documents_every_flag_with_its_default() {
    let out = gantry().args(["mock", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--port",
        "--engines",
        "--model",
        "--tokenizer",
        "--block-size",
        "--num-gpu-blocks",
        "--speedup",
        "--kv-events-port",
        "--kv-replay-port",
        "--kv-events-format",
        "--role",
        "--host",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--fail-rate",
        "--stall-after",
        "--cut-after",
        "--exit-after",
        "--flap-health",
    ] {
        assert!(help.contains(flag), "{flag} is not documented:\n{help}");
    }
    for default in [
        "[default: 8000]",
        "[default: 16]",
        "[default: 16384]",
        "[default: mock-model]",
        "[default: agg]",
        "[default: map]",
        "[default: 127.0.0.1]",
    ] {
        assert!(help.contains(default), "{default} missing:\n{help}");
    }
}

#[test]
fn bad_flags_and_busy_ports_fail_with_a_clear_message() {
    let out = gantry().args(["mock", "--engines", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid --engines"));
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let out = gantry().args(["mock", "--port", &port]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("binding engine 0 HTTP") && err.contains(&port), "{err}");
}

#[test]
fn several_engines_and_exit_after() {
    let port = free_port();
    let p = port.to_string();
    let mut mock = start_mock(&["--port", &p, "--engines", "2", "--speedup", "0", "--exit-after", "3"], 2);
    let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let b: SocketAddr = format!("127.0.0.1:{}", port + 1).parse().unwrap();
    assert!(post_completion(a).starts_with("HTTP/1.1 200"));
    assert!(post_completion(b).starts_with("HTTP/1.1 200"));
    let _ = post_completion(a);
    let end = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = mock.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "the mock did not exit after 3 requests");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(3));
}

/// Finds a Python with the `openai` package: `GANTRY_TEST_PYTHON`, else `.venv/bin/python`.
fn openai_python() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let candidates = [std::env::var_os("GANTRY_TEST_PYTHON").map(PathBuf::from), Some(root.join(".venv/bin/python"))];
    candidates.into_iter().flatten().find(|p| {
        p.exists() && Command::new(p).args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success())
    })
}

fn require_python(test: &str) -> Option<PathBuf> {
    let python = openai_python();
    if python.is_none() {
        assert!(
            std::env::var_os("GANTRY_REQUIRE_PYTHON").is_none(),
            "GANTRY_REQUIRE_PYTHON is set but no Python with `openai` was found (.venv/bin/python or GANTRY_TEST_PYTHON)"
        );
        eprintln!("SKIPPED {test}: no Python with the `openai` package (run .ci/run, or set GANTRY_TEST_PYTHON)");
    }
    python
}

fn run_openai_script(python: &PathBuf, base: &str) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/tests/python/openai_client.py");
    let out = Command::new(python).arg(script).arg(base).output().unwrap();
    let (o, e) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "openai client failed:\n{o}\n{e}");
    assert!(o.contains("6 calls ok"), "{o}");
}

#[test]
fn official_openai_client_through_the_proxy() {
    let Some(python) = require_python("official_openai_client_through_the_proxy") else { return };
    let engine_port = free_port();
    let _mock = start_mock(&["--port", &engine_port.to_string(), "--speedup", "0"], 1);
    let port = free_port();
    let proxy = gantry()
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--engine",
            &format!("http://127.0.0.1:{engine_port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Guard first, so a failure below still stops the child.
    let mut proxy = Running(proxy);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    let healthy = || {
        TcpStream::connect(addr).is_ok_and(|mut s| {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out.starts_with("HTTP/1.1 200")
        })
    };
    while !healthy() {
        assert!(Instant::now() < end, "gantry serve did not become healthy");
        assert!(proxy.0.try_wait().unwrap().is_none(), "gantry serve exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    run_openai_script(&python, &format!("http://127.0.0.1:{port}/v1"));
}

#[test]
fn official_openai_client_against_the_mock() {
    let Some(python) = require_python("official_openai_client_against_the_mock") else { return };
    let port = free_port();
    let _mock = start_mock(&["--port", &port.to_string(), "--speedup", "0"], 1);
    run_openai_script(&python, &format!("http://127.0.0.1:{port}/v1"));
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig} {pid} failed");
}

fn engine_of(reply: &str) -> Option<String> {
    reply.lines().find_map(|l| l.strip_prefix("x-gantry-engine: ")).map(|s| s.trim().to_owned())
}

fn chat_request(max_tokens: u32, stream: bool) -> String {
    let body = format!(
        r#"{{"model":"mock-model","messages":[{{"role":"user","content":"hi"}}],"max_tokens":{max_tokens},"stream":{stream}}}"#
    );
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn sighup_reloads_and_sigterm_drains() {
    let (a_port, b_port) = (free_port(), free_port());
    let _a = start_mock(&["--port", &a_port.to_string(), "--speedup", "0"], 1);
    let _b = start_mock(
        &[
            "--port",
            &b_port.to_string(),
            "--speedup",
            "1",
            "--prefill-ms-coeffs",
            "0,0,1",
            "--decode-ms-coeffs",
            "0,0,20",
        ],
        1,
    );
    let dir = std::env::temp_dir().join(format!("gantry-signals-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gantry.toml");
    let port = free_port();
    let write = |engine: u16| {
        std::fs::write(
            &path,
            format!("[server]\nlisten = \"127.0.0.1:{port}\"\nworkers = 2\n[[model]]\nname = \"mock-model\"\n[[pool]]\nname = \"agg-0\"\n[[pool.engine]]\nurl = \"http://127.0.0.1:{engine}\"\nmodel = \"mock-model\"\n"),
        )
        .unwrap();
    };
    write(a_port);
    let child = gantry()
        .args(["serve", "--config", path.to_str().unwrap(), "--drain-timeout-secs", "20"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut proxy = Running(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < end, "gantry serve did not start");
        assert!(proxy.0.try_wait().unwrap().is_none(), "gantry serve exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(engine_of(&http(addr, &chat_request(1, false))), Some(format!("http://127.0.0.1:{a_port}")));

    // SIGHUP: the edited file takes effect.
    write(b_port);
    signal(pid, "-HUP");
    let want = format!("http://127.0.0.1:{b_port}");
    let end = Instant::now() + Duration::from_secs(10);
    while engine_of(&http(addr, &chat_request(1, false))).as_deref() != Some(&want) {
        assert!(Instant::now() < end, "SIGHUP did not switch engines");
        std::thread::sleep(Duration::from_millis(20));
    }

    // SIGTERM during a ~1 s stream: the stream finishes, then the process exits 0.
    let streaming = std::thread::spawn(move || http(addr, &chat_request(50, true)));
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let m = http(addr, "GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        let in_flight: f64 = m
            .lines()
            .filter(|l| l.starts_with("gantry_engine_in_flight{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if in_flight >= 1.0 {
            break;
        }
        assert!(Instant::now() < end, "the stream never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(pid, "-TERM");
    let reply = streaming.join().unwrap();
    assert!(reply.contains("data: [DONE]"), "the in-flight stream was cut: {reply}");
    let end = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = proxy.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "gantry serve did not exit after draining");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(TcpStream::connect(addr).is_err(), "nothing listens after the drain");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `gantry index inspect` prints a live segment written by another process (this one), and
/// names the file when it cannot read it.
#[test]
fn index_inspect_prints_a_live_segment_and_names_bad_files() {
    use gantry_kvindex::hash::chain_pos;
    use gantry_kvindex::index::{IndexOptions, IndexWriter};
    use gantry_kvindex::sink::BlockSink;

    let dir = std::env::temp_dir().join(format!("gantry-cli-index-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("segment");
    let opts = IndexOptions { engine_slots: 64, capacity: 1024, ..IndexOptions::default() };
    let mut w = IndexWriter::create(&path, &opts).unwrap();
    let slot = w.register_engine("http://127.0.0.1:8101").unwrap();
    w.store(slot, 42, chain_pos(None, 42));
    let out = gantry().args(["index", "inspect"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    for want in ["engine slots     64", "capacity         1024 blocks", "blocks_stored      1", "http://127.0.0.1:8101"]
    {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert!(text.contains(&format!("pid {}", std::process::id())), "{text}");
    // The writer (this process) maps the segment, so its pages are known, whatever they are,
    // wherever /proc shows a process its own mappings.
    if std::fs::metadata("/proc/self/smaps").is_ok() {
        assert!(
            text.contains("pages            4 KiB only") || text.contains("pages            2 MiB pages"),
            "{text}"
        );
    } else {
        eprintln!("skipped the pages line: this system has no /proc/self/smaps");
    }
    drop(w);

    std::fs::write(&path, b"not a segment").unwrap();
    let out = gantry().args(["index", "inspect"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&*path.to_string_lossy()) && err.contains("too short"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_load_prints_a_table_and_writes_the_report() {
    let port = free_port();
    let _mock = start_mock(&["--port", &port.to_string(), "--speedup", "0"], 1);
    let dir = std::env::temp_dir().join(format!("gantry-cli-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let url = format!("http://127.0.0.1:{port}");
    let out = gantry()
        .args(["bench", "load", "--url", &url, "--requests", "20", "--concurrency", "2", "--isl", "16", "--osl", "2"])
        .args(["--quiet", "--report"])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("| completed | 20 |") && stdout.contains("| failed | 0 |"), "{stdout}");
    for f in ["report.json", "report.md", "ttft_cdf.png"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_replay_names_a_bad_trace_line_and_a_missing_file() {
    let dir = std::env::temp_dir().join(format!("gantry-cli-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 1}\nnot json\n").unwrap();
    let out = gantry().args(["bench", "replay"]).arg(&bad).args(["--url", "http://127.0.0.1:9"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("{}:2: not a Mooncake record", bad.display())), "{stderr}");
    let missing = dir.join("missing.jsonl");
    let out = gantry().args(["bench", "replay"]).arg(&missing).args(["--url", "http://127.0.0.1:9"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("reading trace {}", missing.display())), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_help_documents_its_flags() {
    for (sub, flags) in [
        (
            "load",
            &[
                "--url",
                "--model",
                "--concurrency",
                "--rate",
                "--arrival",
                "--endpoint",
                "--isl",
                "--osl",
                "--isl-dist",
                "--prefix-groups",
                "--prefix-len",
                "--requests",
                "--duration",
                "--warmup",
                "--engine-metrics",
                "--report",
            ][..],
        ),
        ("replay", &["--speed", "--token-scale", "--max-requests", "--format", "--block-tokens"][..]),
        ("compare", &["--target", "--trace", "--rounds"][..]),
    ] {
        let out = gantry().args(["bench", sub, "--help"]).output().unwrap();
        assert!(out.status.success());
        let help = String::from_utf8(out.stdout).unwrap();
        for flag in flags {
            assert!(help.contains(flag), "bench {sub}: {flag} is not documented:\n{help}");
        }
    }
}
