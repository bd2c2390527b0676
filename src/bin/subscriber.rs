//! `subscriber`: see [`edgepair::cli::SubscriberCli`].
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    edgepair::cli::subscriber(edgepair::cli::SubscriberCli::parse())
}
