//! `edgepair-log`: see [`edgepair::log::inspect::LogCli`].
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    edgepair::log::inspect::main(edgepair::log::inspect::LogCli::parse())
}
