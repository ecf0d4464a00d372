//! The load driver: one monoio runtime per thread, keep-alive connections, and a record per
//! request (send time, first token, token gaps, end, outcome, serving engine).
//!
//! Closed loop: `concurrency` user tasks spread over the threads, each sending its next request
//! as soon as the previous one ends; the next request index comes from one shared atomic
//! counter. Open loop: thread `t` of `T` owns requests `t, t+T, …` and sends each at its arrival
//! time (a Poisson or constant process at `rate/T` per thread, or the trace's timestamps divided
//! by `--speed`), on a pooled idle connection or a new one; a late send records its lag.
//! Streaming responses are scanned without parsing JSON: an SSE event whose `content`/`text`
//! is non-empty is a token event; TTFT is the first, ITL the gaps between the rest; output tokens
//! come from the final `usage` (or the token-event count without one).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_proxy::http::client::ClientConn;
use gantry_proxy::http::sse::{is_token_event, json_uint_after, SseScanner};
use gantry_proxy::http::HttpError;
use gantry_proxy::rt::{self, Driver};
use memchr::memmem;

use super::workload::{warmup_job, Job, Workload};

/// Which OpenAI API is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `POST /v1/chat/completions` with one user message.
    Chat,
    /// `POST /v1/completions` with a prompt.
    Completions,
}

/// A parsed `http://host:port[/prefix]` URL.
#[derive(Debug, Clone)]
pub struct Url {
    /// As given.
    pub url: String,
    /// The resolved address.
    pub addr: SocketAddr,
    /// `host[:port]` for the Host header.
    pub authority: String,
    /// Path prefix without a trailing slash (`""` or e.g. `/v1`).
    pub prefix: String,
}

impl Url {
    /// Parses and resolves `url` (plain `http://` only).
    pub fn parse(url: &str) -> Result<Url, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("`{url}`: only http:// URLs are supported (no TLS), e.g. http://127.0.0.1:8000"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(format!("`{url}`: no host"));
        }
        let addr = gantry_proxy::config::resolve_authority(authority).map_err(|e| format!("`{url}`: {e}"))?;
        Ok(Url {
            url: url.to_owned(),
            addr,
            authority: authority.to_owned(),
            prefix: path.trim_end_matches('/').into(),
        })
    }

    /// The request path of `api` under this URL (a prefix ending in `/v1` is not doubled).
    pub fn api_path(&self, api: Api) -> String {
        let tail = match api {
            Api::Chat => "chat/completions",
            Api::Completions => "completions",
        };
        if self.prefix.ends_with("/v1") {
            format!("{}/{tail}", self.prefix)
        } else {
            format!("{}/v1/{tail}", self.prefix)
        }
    }
}

/// How a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// The TCP connection could not be made.
    Connect,
    /// No complete answer within `--timeout`.
    Timeout,
    /// A non-200 status.
    Http(u16),
    /// Not HTTP, not JSON, or not a completion.
    BadResponse,
    /// The connection ended before the response did (no `[DONE]`, short body).
    Cut,
    /// The stream carried an error event.
    StreamError,
}

impl ErrorKind {
    /// The report's key: `connect`, `timeout`, `http_503`, `bad_response`, `cut`, `stream_error`.
    pub fn name(self) -> String {
        match self {
            ErrorKind::Connect => "connect".into(),
            ErrorKind::Timeout => "timeout".into(),
            ErrorKind::Http(s) => format!("http_{s}"),
            ErrorKind::BadResponse => "bad_response".into(),
            ErrorKind::Cut => "cut".into(),
            ErrorKind::StreamError => "stream_error".into(),
        }
    }
}

/// One request's measurements; times are µs from the run start.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Workload index.
    pub index: u64,
    /// When it was due (open loop) or sent (closed loop).
    pub scheduled_us: u64,
    /// When its first byte was written.
    pub start_us: u64,
    /// When its first token arrived (streaming only).
    pub ttft_us: Option<u64>,
    /// When it ended (last byte, or the failure).
    pub end_us: u64,
    /// Prompt tokens (built-in tokenizer count).
    pub input_tokens: u32,
    /// Generated tokens (from `usage`, else counted token events).
    pub output_tokens: u32,
    /// Why it failed, if it did.
    pub error: Option<ErrorKind>,
    /// Index into [`Records::engines`] (from `x-gantry-engine`).
    pub engine: Option<u16>,
}

/// What a run measured.
#[derive(Debug, Default)]
pub struct Records {
    /// One per request sent, in no particular order.
    pub records: Vec<Record>,
    /// Every inter-token gap, ms.
    pub itl_ms: Vec<f64>,
    /// Engine names seen in `x-gantry-engine`.
    pub engines: Vec<String>,
    /// The first message of each error kind.
    pub error_samples: BTreeMap<String, String>,
    /// Wall time of the run.
    pub wall: Duration,
}

impl Records {
    /// Adds `more`'s records, shifting their times by `offset_us` and their engine indices
    /// into this table; adds its wall time.
    pub fn append(&mut self, more: Records, offset_us: u64) {
        let remap: Vec<u16> = more
            .engines
            .iter()
            .map(|name| match self.engines.iter().position(|n| n == name) {
                Some(i) => i as u16,
                None => {
                    self.engines.push(name.clone());
                    (self.engines.len() - 1) as u16
                }
            })
            .collect();
        self.records.extend(more.records.into_iter().map(|mut r| {
            r.scheduled_us += offset_us;
            r.start_us += offset_us;
            r.end_us += offset_us;
            r.ttft_us = r.ttft_us.map(|t| t + offset_us);
            r.engine = r.engine.map(|e| remap[usize::from(e)]);
            r
        }));
        self.itl_ms.extend(more.itl_ms);
        for (k, v) in more.error_samples {
            self.error_samples.entry(k).or_insert(v);
        }
        self.wall += more.wall;
    }
}

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pacing {
    /// This many requests in flight at all times.
    Closed {
        /// In-flight requests.
        concurrency: usize,
    },
    /// Arrivals at `rate` per second, exponential gaps when `poisson`, else constant.
    Open {
        /// Requests per second.
        rate: f64,
        /// Poisson (true) or evenly spaced (false).
        poisson: bool,
    },
    /// The trace's own arrival times divided by `speed`.
    Trace {
        /// Time compression.
        speed: f64,
    },
}

/// Everything about how to talk to the target.
#[derive(Debug, Clone)]
pub struct DriveConfig {
    /// Where to send.
    pub url: Url,
    /// `model` field.
    pub model: String,
    /// Which API.
    pub api: Api,
    /// `stream: true` (with `include_usage`).
    pub stream: bool,
    /// `Authorization: Bearer` value.
    pub api_key: Option<String>,
    /// Per-request limit (connect to last byte).
    pub timeout: Duration,
    /// Generator threads (one runtime each).
    pub threads: usize,
    /// I/O driver of those runtimes.
    pub driver: Driver,
}

/// Which requests a run sends: indices `start..end` of the workload, for at most `duration`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slice {
    /// First index.
    pub start: u64,
    /// One past the last index (`u64::MAX`: until `duration`).
    pub end: u64,
    /// Stop sending new requests after this long.
    pub duration: Option<Duration>,
}

/// Set to stop sending new requests (Ctrl-C); those in flight still finish and are reported.
pub type StopFlag = Arc<std::sync::atomic::AtomicBool>;

struct Shared {
    cfg: DriveConfig,
    path: String,
    model_json: String,
    auth: Option<String>,
    workload: Option<Workload>,
    pacing: Pacing,
    slice: Slice,
    next: AtomicU64,
    progress: Arc<AtomicU64>,
    stop: StopFlag,
    start: Instant,
}

impl Shared {
    fn job(&self, i: u64) -> Job {
        match &self.workload {
            Some(w) => w.job(i),
            None => warmup_job(i),
        }
    }

    fn expired(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.slice.duration.is_some_and(|d| self.start.elapsed() >= d)
    }

    fn us(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.start).as_micros() as u64
    }

    fn body(&self, job: &Job) -> Vec<u8> {
        let mut b = Vec::with_capacity(job.prompt.len() + 200);
        b.extend_from_slice(b"{\"model\":");
        b.extend_from_slice(self.model_json.as_bytes());
        match self.cfg.api {
            Api::Chat => b.extend_from_slice(b",\"messages\":[{\"role\":\"user\",\"content\":"),
            Api::Completions => b.extend_from_slice(b",\"prompt\":"),
        }
        // Writing into a Vec cannot fail, and a String always serialises.
        let _ = serde_json::to_writer(&mut b, &job.prompt);
        if self.cfg.api == Api::Chat {
            b.extend_from_slice(b"}]");
        }
        b.extend_from_slice(b",\"max_tokens\":");
        b.extend_from_slice(job.max_tokens.to_string().as_bytes());
        b.extend_from_slice(b",\"ignore_eos\":true");
        if self.cfg.stream {
            b.extend_from_slice(b",\"stream\":true,\"stream_options\":{\"include_usage\":true}");
        }
        b.push(b'}');
        b
    }
}

/// Per-thread results, owned by that thread's tasks.
#[derive(Default)]
struct Local {
    records: RefCell<Vec<Record>>,
    itl_ms: RefCell<Vec<f64>>,
    engines: RefCell<Vec<String>>,
    errors: RefCell<BTreeMap<String, String>>,
    idle: RefCell<Vec<ClientConn>>,
}

impl Local {
    fn engine_id(&self, name: &[u8]) -> Option<u16> {
        let name = std::str::from_utf8(name).ok()?;
        let mut e = self.engines.borrow_mut();
        if let Some(i) = e.iter().position(|n| n == name) {
            return Some(i as u16);
        }
        if e.len() >= usize::from(u16::MAX) {
            return None;
        }
        e.push(name.to_owned());
        Some((e.len() - 1) as u16)
    }
}

/// Runs `slice` of `workload` (or warm-up requests when `None`) against `cfg.url`, paced by
/// `pacing`; counts finished requests into `progress`; sends nothing new once `stop` is set.
/// Fails only if a runtime cannot start.
pub fn drive(
    cfg: &DriveConfig,
    workload: Option<&Workload>,
    pacing: Pacing,
    slice: Slice,
    progress: Arc<AtomicU64>,
    stop: StopFlag,
) -> std::io::Result<Records> {
    let threads = cfg.threads.max(1);
    let shared = Arc::new(Shared {
        path: cfg.url.api_path(cfg.api),
        model_json: serde_json::to_string(&cfg.model).unwrap_or_else(|_| "\"\"".into()),
        auth: cfg.api_key.as_ref().map(|k| format!("Bearer {k}")),
        cfg: cfg.clone(),
        workload: workload.cloned(),
        pacing,
        slice,
        next: AtomicU64::new(slice.start),
        progress,
        stop,
        start: Instant::now(),
    });
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let sh = shared.clone();
            std::thread::Builder::new().name(format!("gantry-bench-{t}")).spawn(move || {
                let driver = sh.cfg.driver;
                rt::block_on(driver, run_thread(sh, t, threads))
            })
        })
        .collect::<Result<_, _>>()?;
    let mut out = Records::default();
    for h in handles {
        let t = h.join().map_err(|_| std::io::Error::other("a generator thread panicked"))??;
        let part = Records {
            records: t.records,
            itl_ms: t.itl_ms,
            engines: t.engines,
            error_samples: t.errors,
            wall: Duration::ZERO,
        };
        out.append(part, 0);
    }
    out.wall = shared.start.elapsed();
    Ok(out)
}

async fn run_thread(sh: Arc<Shared>, t: usize, threads: usize) -> ThreadOut {
    let local = Rc::new(Local::default());
    match sh.pacing {
        Pacing::Closed { concurrency } => {
            let users = concurrency / threads + usize::from(t < concurrency % threads);
            let tasks: Vec<_> = (0..users).map(|_| monoio::spawn(user(sh.clone(), local.clone()))).collect();
            for task in tasks {
                task.await;
            }
        }
        Pacing::Open { .. } | Pacing::Trace { .. } => open_loop(&sh, &local, t, threads).await,
    }
    drop(local.idle.take());
    ThreadOut {
        records: local.records.take(),
        itl_ms: local.itl_ms.take(),
        engines: local.engines.take(),
        errors: local.errors.take(),
    }
}

/// What a thread hands back when its runtime ends.
struct ThreadOut {
    records: Vec<Record>,
    itl_ms: Vec<f64>,
    engines: Vec<String>,
    errors: BTreeMap<String, String>,
}

async fn user(sh: Arc<Shared>, local: Rc<Local>) {
    let mut conn = None;
    loop {
        let i = sh.next.fetch_add(1, Ordering::Relaxed);
        if i >= sh.slice.end || sh.expired() {
            return;
        }
        let job = sh.job(i);
        let rec = exchange(&sh, &local, &mut conn, i, &job, Instant::now()).await;
        local.records.borrow_mut().push(rec);
        sh.progress.fetch_add(1, Ordering::Relaxed);
    }
}

async fn open_loop(sh: &Arc<Shared>, local: &Rc<Local>, t: usize, threads: usize) {
    let mut rng = fastrand::Rng::with_seed(0x0A55_1BA1 ^ t as u64);
    let mut due_s = 0.0f64;
    let trace_t0 = sh.workload.as_ref().and_then(|w| w.arrival_ms(sh.slice.start)).unwrap_or(0.0);
    let mut tasks = Vec::new();
    let mut i = sh.slice.start + t as u64;
    while i < sh.slice.end {
        due_s = match sh.pacing {
            Pacing::Open { rate, poisson: true } => due_s - (1.0 - rng.f64()).ln() / (rate / threads as f64),
            Pacing::Open { rate, poisson: false } => (i - sh.slice.start) as f64 / rate,
            Pacing::Trace { speed } => {
                let Some(ms) = sh.workload.as_ref().and_then(|w| w.arrival_ms(i)) else { break };
                (ms - trace_t0) / 1000.0 / speed
            }
            Pacing::Closed { .. } => unreachable!("closed loops have their own driver"),
        };
        let due = Duration::from_secs_f64(due_s.max(0.0));
        if sh.slice.duration.is_some_and(|d| due >= d) {
            break;
        }
        // Sleep in short steps so a stop is seen during long gaps in a trace.
        loop {
            let wait = due.saturating_sub(sh.start.elapsed());
            if wait.is_zero() || sh.stop.load(Ordering::Relaxed) {
                break;
            }
            monoio::time::sleep(wait.min(Duration::from_millis(100))).await;
        }
        if sh.stop.load(Ordering::Relaxed) {
            break;
        }
        let (sh2, local2) = (sh.clone(), local.clone());
        let scheduled = sh.start + due;
        tasks.push(monoio::spawn(async move {
            let mut conn = local2.idle.borrow_mut().pop();
            let job = sh2.job(i);
            let rec = exchange(&sh2, &local2, &mut conn, i, &job, scheduled).await;
            if let Some(c) = conn.filter(ClientConn::reusable) {
                local2.idle.borrow_mut().push(c);
            }
            local2.records.borrow_mut().push(rec);
            sh2.progress.fetch_add(1, Ordering::Relaxed);
        }));
        i += threads as u64;
    }
    for task in tasks {
        task.await;
    }
}

/// What one exchange gave, before it becomes a [`Record`].
struct Outcome {
    first_token: Option<Instant>,
    output_tokens: u32,
    engine: Option<u16>,
}

type Failure = (ErrorKind, String);

async fn exchange(
    sh: &Shared,
    local: &Local,
    conn: &mut Option<ClientConn>,
    index: u64,
    job: &Job,
    scheduled: Instant,
) -> Record {
    let body = sh.body(job);
    let start = Instant::now();
    let res = match monoio::time::timeout(sh.cfg.timeout, attempt(sh, local, conn, &body)).await {
        Ok(r) => r,
        Err(_) => {
            *conn = None;
            Err((ErrorKind::Timeout, format!("{}: no complete answer within {:?}", sh.cfg.url.url, sh.cfg.timeout)))
        }
    };
    let end = Instant::now();
    let mut rec = Record {
        index,
        scheduled_us: sh.us(scheduled.min(start)),
        start_us: sh.us(start),
        ttft_us: None,
        end_us: sh.us(end),
        input_tokens: job.input_tokens,
        output_tokens: 0,
        error: None,
        engine: None,
    };
    match res {
        Ok(o) => {
            rec.ttft_us = o.first_token.map(|t| sh.us(t));
            rec.output_tokens = o.output_tokens;
            rec.engine = o.engine;
        }
        Err((kind, msg)) => {
            rec.error = Some(kind);
            local.errors.borrow_mut().entry(kind.name()).or_insert(msg);
        }
    }
    rec
}

/// Sends `body` and reads the answer; a reused connection that turns out closed is replaced once.
async fn attempt(sh: &Shared, local: &Local, conn: &mut Option<ClientConn>, body: &[u8]) -> Result<Outcome, Failure> {
    let url = &sh.cfg.url;
    let mut headers: Vec<(&str, &[u8])> =
        vec![("host", url.authority.as_bytes()), ("content-type", b"application/json")];
    if let Some(a) = &sh.auth {
        headers.push(("authorization", a.as_bytes()));
    }
    let mut fresh_tries = 0;
    let (c, head) = loop {
        let reused = conn.is_some();
        if conn.is_none() {
            fresh_tries += 1;
            let c = ClientConn::connect(url.addr, sh.cfg.timeout.min(Duration::from_secs(10)))
                .await
                .map_err(|e| (ErrorKind::Connect, format!("connecting to {} ({}): {e}", url.url, url.addr)))?;
            *conn = Some(c);
        }
        let Some(c) = conn.as_mut() else { unreachable!("set above") };
        let res = match c.send("POST", &sh.path, &headers, body).await {
            Ok(()) => c.read_head(false).await,
            Err(e) => Err(e),
        };
        match res {
            Ok(head) => break (c, head),
            Err(HttpError::Io(_) | HttpError::UnexpectedEof(_)) if reused && fresh_tries == 0 => *conn = None,
            Err(e) => {
                *conn = None;
                let kind = match e {
                    HttpError::Io(_) | HttpError::UnexpectedEof(_) => ErrorKind::Cut,
                    _ => ErrorKind::BadResponse,
                };
                return Err((kind, format!("{}: {e}", url.url)));
            }
        }
    };
    let engine = head.headers().get("x-gantry-engine").and_then(|v| local.engine_id(v));
    let cut = |e: HttpError| (ErrorKind::Cut, format!("{}: response cut: {e}", url.url));
    if head.status != 200 {
        let body = c.read_body().await.unwrap_or_default();
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        return Err((ErrorKind::Http(head.status), format!("{} answered {}: {text}", url.url, head.status)));
    }
    if !sh.cfg.stream {
        let body = c.read_body().await.map_err(cut)?;
        if !body.starts_with(b"{") || memmem::find(&body, b"\"choices\"").is_none() {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return Err((ErrorKind::BadResponse, format!("{}: not a completion: {text}", url.url)));
        }
        let output_tokens = completion_tokens(&body).unwrap_or(0);
        return Ok(Outcome { first_token: None, output_tokens, engine });
    }
    let ctype = head.headers().get("content-type").unwrap_or_default();
    if memmem::find(ctype, b"event-stream").is_none() {
        let body = c.read_body().await.unwrap_or_default();
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        return Err((ErrorKind::BadResponse, format!("{}: expected text/event-stream, got: {text}", url.url)));
    }
    let mut scan = SseScanner::new();
    let mut st = StreamState::default();
    let mut gaps = Vec::new();
    loop {
        let chunk = match c.read_chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => return Err(cut(e)),
        };
        let now = Instant::now();
        scan.feed(&chunk, |ev| st.event(ev, now, &mut gaps));
        if let Some(msg) = st.error.take() {
            return Err((ErrorKind::StreamError, format!("{}: error event: {msg}", url.url)));
        }
    }
    if !st.done {
        return Err((ErrorKind::Cut, format!("{}: stream ended without [DONE]", url.url)));
    }
    local.itl_ms.borrow_mut().extend_from_slice(&gaps);
    Ok(Outcome { first_token: st.first, output_tokens: st.usage.unwrap_or(st.events), engine })
}

#[derive(Default)]
struct StreamState {
    first: Option<Instant>,
    last: Option<Instant>,
    events: u32,
    usage: Option<u32>,
    done: bool,
    error: Option<String>,
}

impl StreamState {
    fn event(&mut self, ev: &[u8], now: Instant, gaps: &mut Vec<f64>) {
        let Some(data) = ev.strip_prefix(b"data:") else { return };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        let data = data.strip_suffix(b"\r").unwrap_or(data);
        if data == b"[DONE]" {
            self.done = true;
            return;
        }
        if data.starts_with(b"{\"error\"") || memmem::find(data, b"\"object\":\"error\"").is_some() {
            self.error = Some(String::from_utf8_lossy(&data[..data.len().min(300)]).into_owned());
            return;
        }
        if is_token_event(data) {
            self.events += 1;
            if let Some(last) = self.last {
                gaps.push(now.saturating_duration_since(last).as_secs_f64() * 1000.0);
            } else {
                self.first = Some(now);
            }
            self.last = Some(now);
        }
        if let Some(n) = completion_tokens(data) {
            self.usage = Some(n);
        }
    }
}

/// `usage.completion_tokens` of a JSON payload, found by scanning.
pub fn completion_tokens(data: &[u8]) -> Option<u32> {
    json_uint_after(data, b"\"completion_tokens\":").and_then(|n| u32::try_from(n).ok())
}
