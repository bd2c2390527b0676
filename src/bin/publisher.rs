//! `publisher`: see [`edgepair::cli::PublisherCli`].
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    edgepair::cli::publisher(edgepair::cli::PublisherCli::parse())
}
