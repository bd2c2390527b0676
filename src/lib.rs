//! edgepair: a primary–backup edge-computing simulator with a failover test harness.
#![warn(missing_docs)]

pub mod bench;
pub mod cli;
pub mod client;
pub mod clock;
pub mod compute;
pub mod failover;
pub mod harness;
pub mod net;
pub mod node;
pub mod protocol;
pub mod proxy;
pub mod report;
pub mod sim;
pub mod simreport;
