//! Wall-clock access, kept in one place.
//!
//! Latency is measured across processes (publisher send time against subscriber receive time), so
//! it needs the wall clock, not a monotonic one. Everything that stamps a message goes through
//! [`now_us`], which a simulated run can later replace with simulated time.

use std::time::{SystemTime, UNIX_EPOCH};

/// Where simulated wall time starts (2025-01-01T00:00:00Z): fixed, so that a simulation's trace
/// is the same bit for bit on every run of the same seed.
pub const SIM_EPOCH_US: u64 = 1_735_689_600_000_000;

/// Microseconds since the Unix epoch on the wall clock; inside a turmoil simulation, the
/// simulation's own clock, so that simulated runs are reproducible.
pub fn now_us() -> u64 {
    #[cfg(feature = "sim")]
    if let Some(d) = turmoil::sim_elapsed() {
        return SIM_EPOCH_US + d.as_micros() as u64;
    }
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
