//! `consumer`: see [`edgepair::cli::ConsumerCli`].
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    edgepair::cli::consumer(edgepair::cli::ConsumerCli::parse())
}
