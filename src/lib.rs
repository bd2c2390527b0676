//! edgepair: a primary–backup edge-computing simulator with a failover test harness.
#![warn(missing_docs)]

pub mod protocol;
