//! `edgepair-clock`: see [`edgepair::cli::ClockCli`].
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    edgepair::cli::clock(edgepair::cli::ClockCli::parse())
}
