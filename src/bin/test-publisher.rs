//! `test-publisher`: see [`edgepair::cli::TestPublisherCli`].
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    edgepair::cli::test_publisher(edgepair::cli::TestPublisherCli::parse())
}
