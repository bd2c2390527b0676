//! `primary [PORT] [BACKUP_ADDR]`: the broker that serves publishers and subscribers.
use std::process::ExitCode;

use clap::Parser;
use edgepair::cli::{run_broker, BrokerOpts};
use edgepair::protocol::Role;

/// Primary broker: replicates each message to the backup, acknowledges, computes, delivers.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Port to listen on.
    #[arg(default_value_t = 8080)]
    port: u16,
    /// Address of the backup (HOST:PORT or PORT).
    #[arg(default_value = "localhost:8081")]
    backup: String,
    #[command(flatten)]
    opts: BrokerOpts,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run_broker(Role::Primary, cli.port, &cli.backup, cli.opts)
}
