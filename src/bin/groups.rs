//! `groups`: see [`edgepair::cli::GroupsCli`].
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    edgepair::cli::groups(edgepair::cli::GroupsCli::parse())
}
