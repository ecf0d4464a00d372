//! `gantry bench`: a load generator, trace replayer and A/B comparer for any OpenAI-compatible
//! endpoint (Gantry, a peer router, or an engine directly).
//!
//! A run is a [`Workload`] (synthetic prompts from [`workload::Synthetic`], or a trace's
//! records from [`trace::load`]) sent to one or more [`Target`]s by [`client::drive`] at a
//! [`client::Pacing`] (closed loop, open loop, or the trace's timestamps). Every request leaves a
//! [`client::Record`]; [`report::Summary`] turns them into exact percentiles, error counts by
//! kind and a timeline, [`scrape`] adds the engines' own prefix-cache hit rates, and
//! [`report::Report::write`] writes `report.json`, `report.md` and the [`plot`]s, and
//! [`report::write_requests`] one line per request (`requests.jsonl`).
//!
//! `compare` splits the workload into `--rounds` slices and sends each slice to every target in
//! turn (A, B, A, B, …), so drift over time hits every target alike; ratios are against the first.
//!
//! Library entry points: [`load`], [`replay`], [`compare`] (each returns the [`Report`]), and
//! [`run_workload`] underneath them (build its workload with [`trace_workload`] or
//! [`synthetic`]). Read `benches/tests/bench.rs` first.

pub mod client;
pub mod plot;
pub mod report;
pub mod scrape;
pub mod stats;
pub mod trace;
pub mod workload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use gantry_proxy::rt::Driver;
use serde_json::json;

use client::{Api, DriveConfig, Pacing, Records, Slice, Url};
pub use report::{Report, Summary};
use trace::TraceFormat;
use workload::{LengthDist, Synthetic, TraceScale, Workload, DEFAULT_BLOCK_TOKENS};

/// Requests a synthetic run sends when neither `--requests` nor `--duration` is given.
pub const DEFAULT_REQUESTS: u64 = 1000;
/// Closed-loop concurrency when neither `--concurrency` nor `--rate` is given.
pub const DEFAULT_CONCURRENCY: usize = 8;

/// Why a benchmark could not run (lost requests are not errors: they are in the report).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A flag is invalid.
    #[error("invalid --{flag}: {problem}")]
    Flag {
        /// The flag, without dashes.
        flag: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The trace could not be read.
    #[error(transparent)]
    Trace(#[from] trace::TraceError),
    /// An `--engine-metrics` URL could not be scraped.
    #[error("--engine-metrics: {0}")]
    Metrics(String),
    /// The report could not be written.
    #[error("report: {0}")]
    Report(String),
    /// A generator thread could not start.
    #[error("starting the generator: {0}")]
    Runtime(#[from] std::io::Error),
}

fn flag(flag: &'static str, problem: impl Into<String>) -> BenchError {
    BenchError::Flag { flag, problem: problem.into() }
}

/// `gantry bench` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum BenchCommand {
    /// Synthetic load: closed loop (--concurrency) or open loop (--rate).
    Load(LoadArgs),
    /// Replay a Mooncake JSONL or Azure CSV trace at its own pace (or --speed X).
    Replay(ReplayArgs),
    /// The same workload against several endpoints, alternating, with ratios against the first.
    Compare(CompareArgs),
}

/// Open-loop arrival process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Arrival {
    /// Exponential gaps (a Poisson process).
    Poisson,
    /// Evenly spaced.
    Constant,
}

/// Flags every mode shares: how to send, how much, and where the report goes.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// `model` of every request.
    #[arg(long, default_value = "mock-model")]
    pub model: String,
    /// API: chat (/v1/chat/completions) or completions (/v1/completions).
    #[arg(long, value_enum, default_value = "chat")]
    pub endpoint: Api,
    /// Non-streaming requests (no TTFT/ITL then).
    #[arg(long)]
    pub no_stream: bool,
    /// Closed loop: this many requests in flight [default: 8 unless --rate; replay: the trace's times].
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Open loop: requests per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Open-loop arrivals: poisson or constant.
    #[arg(long, value_enum, default_value = "poisson")]
    pub arrival: Arrival,
    /// Requests to send (load default 1000 unless --duration; replay: the whole trace).
    #[arg(long)]
    pub requests: Option<u64>,
    /// Stop sending after this many seconds (in-flight requests still finish).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Warm-up requests sent first (closed loop, own short prompts) and left out of the figures.
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Generator threads (one monoio runtime each).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// I/O driver of the generator threads: auto (io_uring, else epoll), io_uring, or legacy
    /// (epoll); both drive well over 20 k req/s per core (bench-results/bench-generator.md).
    #[arg(long, default_value = "auto")]
    pub driver: String,
    /// Per-request limit, seconds (connect to last byte).
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
    /// Bearer token sent as `Authorization`.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Engines whose /metrics are scraped before and after (prefix-cache hit rate, requests).
    #[arg(long, num_args = 1.., value_name = "URL")]
    pub engine_metrics: Vec<String>,
    /// Write report.json, report.md, PNG plots and requests.jsonl (one line per request; with
    /// several targets requests-TARGET.jsonl each) into this directory.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// Seed of synthetic prompts and lengths.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Set it to stop sending (the CLI sets it on Ctrl-C); in-flight requests finish and the
    /// report is still written.
    #[arg(skip)]
    pub stop: client::StopFlag,
}

impl RunArgs {
    /// Defaults for library callers: model `mock-model`, chat, streaming, closed loop of 8.
    pub fn new(model: &str) -> RunArgs {
        RunArgs {
            model: model.to_owned(),
            endpoint: Api::Chat,
            no_stream: false,
            concurrency: None,
            rate: None,
            arrival: Arrival::Poisson,
            requests: None,
            duration: None,
            warmup: 0,
            threads: 1,
            driver: "auto".into(),
            timeout: 600.0,
            api_key: None,
            engine_metrics: Vec::new(),
            report: None,
            seed: 0,
            quiet: true,
            stop: client::StopFlag::default(),
        }
    }
}

/// Synthetic prompt shape.
#[derive(Debug, Clone, Args)]
pub struct SynthArgs {
    /// Mean input length, tokens (built-in words).
    #[arg(long, default_value_t = 128)]
    pub isl: u32,
    /// Mean output length (max_tokens, with ignore_eos).
    #[arg(long, default_value_t = 32)]
    pub osl: u32,
    /// Input length distribution.
    #[arg(long, value_enum, default_value = "fixed")]
    pub isl_dist: LengthDist,
    /// Output length distribution.
    #[arg(long, value_enum, default_value = "fixed")]
    pub osl_dist: LengthDist,
    /// Shared-prefix groups: request i starts with group (i mod G)'s prefix.
    #[arg(long, default_value_t = 0)]
    pub prefix_groups: u32,
    /// Tokens of each group's shared prefix.
    #[arg(long, default_value_t = 0)]
    pub prefix_len: u32,
}

impl Default for SynthArgs {
    fn default() -> Self {
        SynthArgs {
            isl: 128,
            osl: 32,
            isl_dist: LengthDist::Fixed,
            osl_dist: LengthDist::Fixed,
            prefix_groups: 0,
            prefix_len: 0,
        }
    }
}

/// How a trace is read and expanded.
#[derive(Debug, Clone, Args)]
pub struct TraceArgs {
    /// Trace format (auto: `.csv` is Azure, else Mooncake).
    #[arg(long, value_enum, default_value = "auto")]
    pub format: TraceFormat,
    /// Time compression: arrivals at timestamp / X.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Multiplies every block, input and output length (keeps the sharing pattern).
    #[arg(long, default_value_t = 1.0)]
    pub token_scale: f64,
    /// Read only the first N records.
    #[arg(long, value_name = "N")]
    pub max_requests: Option<usize>,
    /// Tokens of one trace block before scaling (Mooncake: 512).
    #[arg(long, default_value_t = DEFAULT_BLOCK_TOKENS as u32)]
    pub block_tokens: u32,
}

impl Default for TraceArgs {
    fn default() -> Self {
        TraceArgs {
            format: TraceFormat::Auto,
            speed: 1.0,
            token_scale: 1.0,
            max_requests: None,
            block_tokens: DEFAULT_BLOCK_TOKENS as u32,
        }
    }
}

/// `gantry bench load`.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Endpoint base URL, e.g. http://127.0.0.1:8000.
    #[arg(long)]
    pub url: String,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub synth: SynthArgs,
}

/// `gantry bench replay`.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// Trace file: Mooncake JSONL (timestamp, input_length, output_length, hash_ids) or Azure CSV.
    pub trace: PathBuf,
    /// Endpoint base URL.
    #[arg(long)]
    pub url: String,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub trace_args: TraceArgs,
}

/// `gantry bench compare`.
#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// NAME=URL, two or more; ratios are against the first.
    #[arg(long = "target", required = true, value_name = "NAME=URL")]
    pub targets: Vec<String>,
    /// Replay this trace instead of synthetic load.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Slices of the workload; each goes to every target in turn.
    #[arg(long, default_value_t = 2)]
    pub rounds: u32,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub synth: SynthArgs,
    #[command(flatten)]
    pub trace_args: TraceArgs,
}

/// One endpoint under test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Name in reports.
    pub name: String,
    /// Base URL.
    pub url: String,
}

impl Target {
    /// Parses `NAME=URL`.
    pub fn parse(s: &str) -> Result<Target, BenchError> {
        match s.split_once('=') {
            Some((n, u)) if !n.is_empty() && !u.is_empty() => Ok(Target { name: n.into(), url: u.into() }),
            _ => Err(flag("target", format!("`{s}` is not NAME=URL"))),
        }
    }
}

/// Runs a subcommand, prints its table, writes the report if asked. The first Ctrl-C stops
/// sending (what is in flight finishes and is reported); a second one exits at once.
pub fn run(cmd: &BenchCommand) -> Result<Report, BenchError> {
    let mut cmd = cmd.clone();
    let run = match &mut cmd {
        BenchCommand::Load(a) => &mut a.run,
        BenchCommand::Replay(a) => &mut a.run,
        BenchCommand::Compare(a) => &mut a.run,
    };
    let stop = run.stop.clone();
    let sigint = signal_hook::consts::SIGINT;
    signal_hook::flag::register_conditional_shutdown(sigint, 130, stop.clone())?;
    signal_hook::flag::register(sigint, stop)?;
    let report = match &cmd {
        BenchCommand::Load(a) => load(a)?,
        BenchCommand::Replay(a) => replay(a)?,
        BenchCommand::Compare(a) => compare(a)?,
    };
    print!("{}", report.to_markdown());
    for s in &report.targets {
        if s.failed > 0 {
            eprintln!("gantry bench: {}: {} of {} requests failed {:?}", s.target, s.failed, s.sent, s.errors_by_kind);
        }
    }
    Ok(report)
}

/// The synthetic workload these flags describe.
pub fn synthetic(s: &SynthArgs, seed: u64) -> Workload {
    Workload::Synthetic(Synthetic {
        isl: s.isl,
        osl: s.osl,
        isl_dist: s.isl_dist,
        osl_dist: s.osl_dist,
        prefix_groups: s.prefix_groups,
        prefix_len: s.prefix_len,
        seed,
    })
}

/// Reads a trace into a workload (checks `--token-scale` and `--block-tokens`, applies
/// `--max-requests`).
pub fn trace_workload(path: &std::path::Path, t: &TraceArgs) -> Result<Workload, BenchError> {
    if !(t.token_scale > 0.0 && t.token_scale.is_finite()) {
        return Err(flag("token-scale", "must be a positive number"));
    }
    if t.block_tokens == 0 {
        return Err(flag("block-tokens", "must be at least 1"));
    }
    let records = trace::load(path, t.format, t.max_requests)?;
    Ok(Workload::Trace {
        records: Arc::new(records),
        scale: TraceScale { block_tokens: t.block_tokens, token_scale: t.token_scale },
    })
}

/// `gantry bench load`: synthetic load against one URL.
pub fn load(a: &LoadArgs) -> Result<Report, BenchError> {
    let w = synthetic(&a.synth, a.run.seed);
    run_workload(&w, &[Target { name: "default".into(), url: a.url.clone() }], &a.run, 1, 1.0)
}

/// `gantry bench replay`: a trace against one URL.
pub fn replay(a: &ReplayArgs) -> Result<Report, BenchError> {
    let w = trace_workload(&a.trace, &a.trace_args)?;
    run_workload(&w, &[Target { name: "default".into(), url: a.url.clone() }], &a.run, 1, a.trace_args.speed)
}

/// `gantry bench compare`: one workload, several targets, alternating slices.
pub fn compare(a: &CompareArgs) -> Result<Report, BenchError> {
    let targets = a.targets.iter().map(|t| Target::parse(t)).collect::<Result<Vec<_>, _>>()?;
    let w = match &a.trace {
        Some(p) => trace_workload(p, &a.trace_args)?,
        None => synthetic(&a.synth, a.run.seed),
    };
    run_workload(&w, &targets, &a.run, a.rounds, a.trace_args.speed)
}

/// Runs `workload` against every target: warm-up, then `rounds` slices, each sent to every
/// target in turn, scraping `--engine-metrics` around each; writes the report when asked.
/// `speed` divides trace timestamps (ignored for synthetic workloads).
pub fn run_workload(
    workload: &Workload,
    targets: &[Target],
    run: &RunArgs,
    rounds: u32,
    speed: f64,
) -> Result<Report, BenchError> {
    if targets.is_empty() {
        return Err(flag("target", "give at least one target"));
    }
    if workload.is_empty() {
        return Err(flag("requests", "the workload holds no requests"));
    }
    let pacing = pacing(workload, run, speed)?;
    let driver = Driver::parse(&run.driver)
        .ok_or_else(|| flag("driver", format!("unknown driver `{}` (auto, io_uring, legacy)", run.driver)))?;
    if !(run.timeout > 0.0 && run.timeout.is_finite()) {
        return Err(flag("timeout", "must be a positive number of seconds"));
    }
    if run.threads == 0 || run.threads > 1024 {
        return Err(flag("threads", "must be in 1..=1024"));
    }
    let rounds = u64::from(rounds.max(1));
    let total = match (workload.len(), run.requests, run.duration) {
        (Some(n), Some(r), _) => n.min(r),
        (Some(n), None, _) => n,
        (None, Some(r), _) => r,
        (None, None, Some(_)) => u64::MAX,
        (None, None, None) => DEFAULT_REQUESTS,
    };
    if let Some(d) = run.duration {
        if !(d > 0.0 && d.is_finite()) {
            return Err(flag("duration", "must be a positive number of seconds"));
        }
    }
    let slice_duration = run.duration.map(|d| Duration::from_secs_f64(d / rounds as f64));
    let configs = targets
        .iter()
        .map(|t| {
            let url = Url::parse(&t.url).map_err(|e| flag("url", e))?;
            Ok(DriveConfig {
                url,
                model: run.model.clone(),
                api: run.endpoint,
                stream: !run.no_stream,
                api_key: run.api_key.clone(),
                timeout: Duration::from_secs_f64(run.timeout),
                threads: run.threads,
                driver,
            })
        })
        .collect::<Result<Vec<_>, BenchError>>()?;
    let warmup_pacing = Pacing::Closed {
        concurrency: match pacing {
            Pacing::Closed { concurrency } => concurrency,
            _ => DEFAULT_CONCURRENCY,
        },
    };
    let progress = Progress::start(run.quiet, (total != u64::MAX).then_some(total * targets.len() as u64));
    let mut merged: Vec<Records> = targets.iter().map(|_| Records::default()).collect();
    let mut deltas: Vec<Vec<scrape::Counters>> =
        targets.iter().map(|_| vec![scrape::Counters::default(); run.engine_metrics.len()]).collect();
    for cfg in &configs {
        if run.warmup > 0 {
            let s = Slice { start: 0, end: run.warmup, duration: None };
            client::drive(cfg, None, warmup_pacing, s, Arc::new(AtomicU64::new(0)), run.stop.clone())?;
        }
    }
    for r in 0..rounds {
        let (lo, hi) = if total == u64::MAX {
            (r * (u64::MAX / rounds), (r + 1) * (u64::MAX / rounds))
        } else {
            (total * r / rounds, total * (r + 1) / rounds)
        };
        if lo == hi {
            continue;
        }
        for (t, cfg) in configs.iter().enumerate() {
            if run.stop.load(Ordering::Relaxed) {
                break;
            }
            let before = scrape::scrape_all(&run.engine_metrics).map_err(BenchError::Metrics)?;
            let slice = Slice { start: lo, end: hi, duration: slice_duration };
            let recs = client::drive(cfg, Some(workload), pacing, slice, progress.counter.clone(), run.stop.clone())?;
            let after = scrape::scrape_all(&run.engine_metrics).map_err(BenchError::Metrics)?;
            for (d, (a, b)) in deltas[t].iter_mut().zip(after.iter().zip(&before)) {
                let x = a.since(b);
                d.prefix_hits += x.prefix_hits;
                d.prefix_queries += x.prefix_queries;
                d.requests += x.requests;
            }
            let offset = merged[t].wall.as_micros() as u64;
            merged[t].append(recs, offset);
        }
    }
    progress.finish();
    let summaries = targets
        .iter()
        .zip(&merged)
        .zip(&deltas)
        .map(|((t, recs), d)| {
            let engines: Vec<(String, scrape::Counters)> =
                run.engine_metrics.iter().cloned().zip(d.iter().copied()).collect();
            Summary::new(&t.name, &t.url, recs, &engines)
        })
        .collect();
    let mode = match workload {
        Workload::Synthetic(_) => "load",
        Workload::Trace { .. } => "replay",
    };
    let info = json!({
        "mode": if targets.len() > 1 { "compare" } else { mode },
        "workload": match workload {
            Workload::Synthetic(s) => serde_json::to_value(s).unwrap_or_default(),
            Workload::Trace { records, scale } => json!({"trace_records": records.len(), "block_tokens": scale.block_tokens,
                "token_scale": scale.token_scale, "block_words": scale.block_words(), "speed": speed}),
        },
        "model": run.model,
        "endpoint": run.endpoint,
        "stream": !run.no_stream,
        "pacing": pacing,
        "requests_limit": (total != u64::MAX).then_some(total),
        "duration_limit_s": run.duration,
        "warmup": run.warmup,
        "threads": run.threads,
        "rounds": rounds,
        "targets": targets.iter().map(|t| json!({"name": t.name, "url": t.url})).collect::<Vec<_>>(),
        "engine_metrics": run.engine_metrics,
    });
    let report = Report::new(info, summaries);
    if let Some(dir) = &run.report {
        report.write(dir).map_err(BenchError::Report)?;
        for (t, recs) in targets.iter().zip(&merged) {
            let name = if targets.len() == 1 {
                "requests.jsonl".to_owned()
            } else {
                let safe: String =
                    t.name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
                format!("requests-{safe}.jsonl")
            };
            report::write_requests(&dir.join(name), recs).map_err(BenchError::Report)?;
        }
    }
    Ok(report)
}

fn pacing(workload: &Workload, run: &RunArgs, speed: f64) -> Result<Pacing, BenchError> {
    if run.concurrency.is_some() && run.rate.is_some() {
        return Err(flag("rate", "give --concurrency (closed loop) or --rate (open loop), not both"));
    }
    if let Some(c) = run.concurrency {
        if c == 0 {
            return Err(flag("concurrency", "must be at least 1"));
        }
        return Ok(Pacing::Closed { concurrency: c });
    }
    if let Some(rate) = run.rate {
        if !(rate > 0.0 && rate.is_finite()) {
            return Err(flag("rate", "must be a positive number of requests per second"));
        }
        return Ok(Pacing::Open { rate, poisson: run.arrival == Arrival::Poisson });
    }
    match workload {
        Workload::Trace { .. } if !(speed > 0.0 && speed.is_finite()) => {
            Err(flag("speed", "must be a positive number"))
        }
        Workload::Trace { .. } => Ok(Pacing::Trace { speed }),
        Workload::Synthetic(_) => Ok(Pacing::Closed { concurrency: DEFAULT_CONCURRENCY }),
    }
}

/// A progress bar on stderr (hidden when stderr is not a terminal or with `--quiet`), fed by a
/// counter the generator threads bump.
struct Progress {
    counter: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    fn start(quiet: bool, total: Option<u64>) -> Progress {
        let counter = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = (!quiet && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
            let (counter, stop) = (counter.clone(), stop.clone());
            std::thread::spawn(move || {
                let bar = match total {
                    Some(n) => indicatif::ProgressBar::new(n),
                    None => indicatif::ProgressBar::new_spinner(),
                };
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{elapsed_precise} [{bar:40}] {pos}/{len} requests ({per_sec})",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                while !stop.load(Ordering::Relaxed) {
                    bar.set_position(counter.load(Ordering::Relaxed));
                    std::thread::park_timeout(Duration::from_millis(200));
                }
                bar.set_position(counter.load(Ordering::Relaxed));
                bar.finish();
            })
        });
        Progress { counter, stop, thread }
    }

    fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests;
