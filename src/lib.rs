//! edgepair: a primary–backup edge-computing simulator with a failover test harness.
#![warn(missing_docs)]

pub mod bench;
pub mod cli;
pub mod client;
pub mod clock;
pub mod compute;
pub mod core;
pub mod driver;
pub mod harness;
pub mod net;
/// The broker node as the binaries and the simulation start it: [`driver::run`] on a
/// [`core::Broker`].
pub use driver as node;
pub mod protocol;
pub mod proxy;
pub mod report;
pub mod sim;
pub mod simreport;

/// Every binary of the crate allocates through mimalloc. The relay path allocates a few small
/// buffers per message on several threads at once; glibc's allocator spent about a sixth of the
/// relay's CPU time there, much of it waiting on its arena lock (see the Performance section of
/// the README).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
