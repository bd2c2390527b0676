//! edgepair: a primary–backup edge-computing simulator (the broker crate: wire protocol, the
//! sans-IO broker core and the driver that runs it, clients, and their command lines). The failover harness, reports,
//! benchmarks, simulation and fault proxy live in the `edgepair-lab` crate (`lab/`).
#![warn(missing_docs)]

pub mod cli;
pub mod client;
pub mod clock;
pub mod compute;
pub mod core;
pub mod driver;
pub mod log;
pub mod metrics;
pub mod net;
pub mod protocol;
pub mod secret;
pub mod tls;

/// Every binary of the crate allocates through mimalloc. The relay path allocates a few small
/// buffers per message on several threads at once; glibc's allocator spent about a sixth of the
/// relay's CPU time there, much of it waiting on its arena lock (see the Performance section of
/// the README).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
