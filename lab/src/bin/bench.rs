//! `bench`: prints the performance figures (see [`edgepair_lab::bench`]).
use std::process::ExitCode;

use clap::Parser;
use edgepair_lab::bench::{run, BenchOpts};

/// Relay throughput and latency, fan-out, memory per subscriber, 10 Hz compute latency.
#[derive(Parser)]
#[command(name = "bench", version)]
struct Cli {
    #[command(flatten)]
    opts: BenchOpts,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    edgepair::cli::init_tracing();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.opts)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
