//! The `gantry` binary: parses the command line and calls into the library crates.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gantry_bench::mock::{self, MockArgs};

/// Gantry: a data plane for LLM inference fleets.
#[derive(Debug, Parser)]
#[command(name = "gantry", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run vLLM-faithful mock engines (HTTP, metrics, KV events, P/D) for tests and benchmarks.
    Mock(MockArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GANTRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {
        Command::Mock(args) => mock::run(&args).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gantry: {e:#}");
            ExitCode::from(2)
        }
    }
}
