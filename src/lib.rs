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
pub mod named;
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

/// Turns transparent huge pages off for this process (Linux; elsewhere nothing to do).
///
/// mimalloc asks the kernel for huge pages for its arenas, and the first touch of each 2 MiB
/// page zeroes all of it however little is used: a fresh broker under a pipelining publisher
/// spent 40 % of its time in the kernel's `clear_page` and grew to 70 MiB, and the replicated
/// pair ran at 0.6-0.7 M msg/s where a node with 4 KiB pages ran at 0.85-1.1 M (31 MiB).
pub fn disable_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments and only sets a flag of this process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
