//! edgepair-lab: everything that tests, measures and judges the broker pair without being part
//! of it: the failover harness, its reports and pictures, the benchmarks, the deterministic
//! simulation and the fault-injecting proxy.
#![warn(missing_docs)]

pub mod bench;
pub mod check;
pub mod harness;
pub mod procs;
pub mod proxy;
pub mod report;
pub mod sim;
pub mod ssh;
pub mod store;
