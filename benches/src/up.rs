//! `gantry up`: a whole local stack — mock engines behind `gantry serve` — in one process.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use gantry_proxy::config::{Config, PolicyKind};
use gantry_proxy::serve;

use crate::mock::{self, MockArgs};

/// `gantry up` flags.
#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Where the proxy listens.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Number of mock engines.
    #[arg(long, default_value_t = 4)]
    pub engines: usize,
    /// HTTP port of engine 0 (engine i uses PORT+i).
    #[arg(long, default_value_t = 8101)]
    pub engine_port: u16,
    /// KV events: engine i publishes on PORT+i (0 = no events).
    #[arg(long, default_value_t = 5557)]
    pub kv_events_port: u16,
    /// Engine choice policy: kv (KV-aware), round_robin, random, least_loaded, power_of_two, session.
    #[arg(long, default_value = "kv")]
    pub policy: String,
    /// Served model name.
    #[arg(long, default_value = "mock-model")]
    pub model: String,
    /// Mock engines' speedup (0 = no delays).
    #[arg(long, default_value_t = 1.0)]
    pub speedup: f64,
    /// Proxy worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
}

/// Why the stack could not start.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// A flag is invalid.
    #[error("invalid --{0}")]
    Flag(String),
    /// The mock engines failed to start.
    #[error("starting mock engines: {0}")]
    Mock(#[from] mock::MockError),
    /// The proxy failed to start.
    #[error("starting the proxy: {0}")]
    Serve(#[from] serve::ServeError),
    /// Signal handling could not be set up.
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

fn policy(s: &str) -> Option<PolicyKind> {
    Some(match s {
        "round_robin" => PolicyKind::RoundRobin,
        "random" => PolicyKind::Random,
        "least_loaded" => PolicyKind::LeastLoaded,
        "power_of_two" => PolicyKind::PowerOfTwo,
        "session" => PolicyKind::Session,
        "kv" => PolicyKind::Kv,
        _ => return None,
    })
}

/// Starts the stack, prints what to try, and runs until Ctrl-C or SIGTERM (then drains).
pub fn run(args: &UpArgs) -> Result<(), UpError> {
    use clap::Parser;
    #[derive(Parser)]
    struct MockCli {
        #[command(flatten)]
        args: MockArgs,
    }
    let policy = policy(&args.policy).ok_or_else(|| UpError::Flag(format!("policy: unknown `{}`", args.policy)))?;
    let (port, speedup) = (args.engine_port.to_string(), args.speedup.to_string());
    let engines = args.engines.to_string();
    let mut argv = vec!["mock", "--port", &port, "--engines", &engines, "--speedup", &speedup, "--model", &args.model];
    let events = args.kv_events_port.to_string();
    let replay = args.kv_events_port.saturating_add(1000).to_string();
    if args.kv_events_port != 0 {
        argv.extend(["--kv-events-port", &events, "--kv-replay-port", &replay]);
    }
    let mock_args = MockCli::try_parse_from(&argv).map_err(|e| UpError::Flag(e.to_string()))?.args;
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
        .map_err(UpError::Signals)?;
    let mocks = mock::spawn(&mock_args)?;
    let urls: Vec<String> = mocks.engines.iter().map(|e| e.url()).collect();
    let mut cfg = Config::single_pool(&args.model, &urls);
    cfg.server.listen = args.listen.to_string();
    cfg.server.workers = args.workers;
    cfg.pool[0].policy = policy;
    // The mocks tokenize with the built-in tokenizer; the proxy routes on the same tokens and
    // follows each engine's KV events (and replays what it missed).
    cfg.model[0].tokenizer = Some("builtin".into());
    for (e, addrs) in cfg.pool[0].engine.iter_mut().zip(&mocks.engines) {
        e.kv_events.clone_from(&addrs.kv_events);
        e.kv_replay.clone_from(&addrs.kv_replay);
    }
    let proxy = serve::spawn(cfg, None)?;
    let url = format!("http://{}", proxy.addr);
    println!(
        "gantry up: {} mock engines ({}) behind {url} ({:?}, {} driver)",
        urls.len(),
        urls.join(", "),
        policy,
        proxy.driver
    );
    if args.kv_events_port != 0 {
        println!(
            "  KV events: tcp://127.0.0.1:{}..{}",
            args.kv_events_port,
            args.kv_events_port as usize + urls.len() - 1
        );
    }
    println!("\nTry:");
    println!(
        "  curl -s {url}/v1/chat/completions -H 'content-type: application/json' \\\n    -d '{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}],\"max_tokens\":16}}'",
        args.model
    );
    println!(
        "  curl -sN {url}/v1/completions -H 'content-type: application/json' \\\n    -d '{{\"model\":\"{}\",\"prompt\":\"Once upon a time\",\"max_tokens\":16,\"stream\":true}}'",
        args.model
    );
    println!("  curl -s {url}/metrics | grep ^gantry_");
    println!("\nCtrl-C stops everything.");
    if signals.forever().next().is_some() {
        println!("\ngantry up: draining and stopping");
    }
    proxy.drain(Duration::from_secs(10));
    mocks.shutdown();
    Ok(())
}
