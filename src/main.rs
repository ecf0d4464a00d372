//! The `gantry` binary: parses the command line and calls into the library crates.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use gantry_bench::bench::{self, BenchCommand};
use gantry_bench::mock::{self, MockArgs};
use gantry_bench::up::{self, UpArgs};
use gantry_proxy::config::{Config, Overrides};
use gantry_proxy::serve;

/// mimalloc: the request paths allocate small, short-lived buffers on every worker thread,
/// which glibc's allocator serves measurably slower (see the benchmark notes); freed memory stays
/// committed (`gantry_proxy::alloc`).
#[global_allocator]
static GLOBAL: gantry_proxy::alloc::MiMalloc = gantry_proxy::alloc::MiMalloc;

/// Gantry: a data plane for LLM inference fleets.
#[derive(Debug, Parser)]
#[command(name = "gantry", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A whole local stack: mock engines behind the proxy. Ctrl-C stops it.
    Up(UpArgs),
    /// The OpenAI-compatible proxy in front of vLLM engines.
    Serve(ServeArgs),
    /// Run vLLM-faithful mock engines (HTTP, metrics, KV events, P/D) for tests and benchmarks.
    Mock(Box<MockArgs>),
    /// Load generator, trace replay and endpoint comparison, with reports and plots.
    #[command(subcommand)]
    Bench(Box<BenchCommand>),
    /// Operate on the shared-memory KV prefix index.
    #[command(subcommand)]
    Index(IndexCommand),
}

#[derive(Debug, Subcommand)]
enum IndexCommand {
    /// Print a live segment's header, sizes, counters, engines and pages (read-only; any process).
    Inspect {
        /// Segment file.
        #[arg(default_value = gantry_kvindex::index::DEFAULT_PATH)]
        path: PathBuf,
    },
}

fn index_cmd(c: IndexCommand) -> anyhow::Result<()> {
    match c {
        IndexCommand::Inspect { path } => {
            let reader = gantry_kvindex::index::IndexReader::open_read_only(&path)?;
            println!("segment          {}", path.display());
            print!("{}", reader.stats());
            match reader.writer_pages() {
                Some(pages) => println!("pages            {pages}"),
                None => println!("pages            unknown (no live writer whose mappings this user can read)"),
            }
            Ok(())
        }
    }
}

/// `gantry serve` flags; they override the config file's values.
#[derive(Debug, Args)]
struct ServeArgs {
    /// TOML config file (see `proxy/src/config.rs` for every key). SIGHUP re-reads it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Client listener address [default: 127.0.0.1:8000].
    #[arg(long)]
    listen: Option<String>,
    /// Shortcut without a config file: one aggregated pool of these engines.
    #[arg(long = "engine", value_name = "URL")]
    engines: Vec<String>,
    /// Model served by the --engine engines.
    #[arg(long, default_value = "mock-model")]
    model: String,
    /// Worker threads [default: one per core].
    #[arg(long)]
    workers: Option<usize>,
    /// I/O driver: auto, io_uring, legacy.
    #[arg(long)]
    driver: Option<String>,
    /// Policy of the --engine pool: round_robin, random, least_loaded, power_of_two, session, kv.
    #[arg(long)]
    policy: Option<String>,
    /// Dynamo global-router JSON config (pool choice; used by KV-aware routing).
    #[arg(long)]
    global_router_config: Option<PathBuf>,
    /// Seconds SIGTERM waits for in-flight requests.
    #[arg(long, default_value_t = 30)]
    drain_timeout_secs: u64,
}

fn serve_cmd(a: ServeArgs) -> anyhow::Result<()> {
    let mut cfg = match &a.config {
        Some(path) => Config::load(path)?,
        None if !a.engines.is_empty() => Config::single_pool(&a.model, &a.engines),
        None => anyhow::bail!("give --config FILE, or --engine URL (one or more)"),
    };
    if a.config.is_some() && !a.engines.is_empty() {
        anyhow::bail!("--engine and --config are exclusive: list engines in the config file");
    }
    let policy = match a.policy {
        Some(p) => Some(
            serde_json::from_value(serde_json::Value::String(p.clone()))
                .with_context(|| format!("invalid --policy `{p}`"))?,
        ),
        None => None,
    };
    let overrides = Overrides {
        listen: a.listen,
        workers: a.workers,
        driver: a.driver,
        global_router: a.global_router_config,
        policy,
    };
    overrides.apply(&mut cfg);
    cfg.validate()?;
    serve::run(cfg, a.config, overrides, Duration::from_secs(a.drain_timeout_secs))?;
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: the first statement of `main`: no other thread exists yet.
    unsafe { gantry_proxy::alloc::keep_freed_memory() };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GANTRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {
        Command::Up(args) => up::run(&args).map_err(Into::into),
        Command::Serve(args) => serve_cmd(args),
        Command::Mock(args) => mock::run(&args).map_err(Into::into),
        Command::Bench(c) => bench::run(&c).map(drop).map_err(Into::into),
        Command::Index(c) => index_cmd(c),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gantry: {e:#}");
            ExitCode::from(2)
        }
    }
}
