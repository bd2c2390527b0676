//! `harness`: runs the failover test unattended (what `./scripts/test_backup.sh` calls).
use std::process::ExitCode;

use clap::Parser;
use edgepair_lab::harness::{run, run_matrix, HarnessOpts};

/// Runs primary, backup, subscriber and a test publisher, fails the primary, and reports.
#[derive(Parser)]
#[command(name = "harness", version)]
struct Cli {
    #[command(flatten)]
    opts: HarnessOpts,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    edgepair::cli::init_tracing();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("harness: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.opts.matrix {
        return match rt.block_on(run_matrix(cli.opts)) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("harness: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    match rt.block_on(run(cli.opts)) {
        Ok(o) if o.analysis.verdict_ok => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("harness: {e:#}");
            ExitCode::from(2)
        }
    }
}
