//! `storebench`: measures storage candidates for the durable per-topic log on this machine
//! (see [`edgepair_lab::store::bench`]).
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edgepair_lab::store::bench::{child_write, run, StoreBenchOpts};

/// Append with group commit, read from an offset, recovery after SIGKILL and size on disk, for
/// segment files, redb, fjall and SQLite.
#[derive(Parser)]
#[command(name = "storebench", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    opts: StoreBenchOpts,
}

#[derive(Subcommand)]
enum Cmd {
    /// The child writer of the recovery figure (killed by the parent).
    #[command(hide = true)]
    ChildWrite {
        #[arg(long)]
        candidate: String,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        batch: usize,
        #[arg(long)]
        payload: usize,
        #[arg(long)]
        count: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Warnings only by default: fjall logs every open at info level.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
    let r = match cli.cmd {
        Some(Cmd::ChildWrite {
            candidate,
            dir,
            batch,
            payload,
            count,
        }) => child_write(&candidate, &dir, batch, payload, count),
        None => run(cli.opts).map(|_| ()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("storebench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
