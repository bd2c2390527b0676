//! `backup [PORT] [PRIMARY_ADDR]`: holds replicated messages and takes over when the primary dies.
use std::process::ExitCode;

use clap::Parser;
use edgepair::cli::{run_broker, BrokerOpts};
use edgepair::protocol::Role;

/// Backup broker: stores what the primary replicates, pings it, takes over when it stops answering.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Port to listen on.
    #[arg(default_value_t = 8081)]
    port: u16,
    /// Address of the primary (HOST:PORT or PORT).
    #[arg(default_value = "localhost:8080")]
    primary: String,
    #[command(flatten)]
    opts: BrokerOpts,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run_broker(Role::Backup, cli.port, &cli.primary, cli.opts)
}
