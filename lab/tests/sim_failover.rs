//! The very node and client code of the binaries inside turmoil's deterministic network
//! simulator: crashes lose nothing, and a seed replays bit for bit.

use std::time::Duration;

use edgepair_lab::sim::{run_seed, FaultKind, SimConfig};

fn crashes_only() -> SimConfig {
    SimConfig {
        duration: Duration::from_secs(20),
        faults: vec![FaultKind::Crash, FaultKind::Restart],
        ..SimConfig::default()
    }
}

#[test]
fn simulated_crashes_lose_nothing_and_the_backup_takes_over() {
    for seed in [3, 4, 5] {
        let (r, deliveries) = run_seed(seed, &crashes_only());
        assert!(
            r.faults.contains("crash") || r.faults.contains("restart"),
            "{}",
            r.faults
        );
        assert!(r.published >= 190, "seed {seed}: published {}", r.published);
        assert_eq!(
            (r.lost, r.lost_acked),
            (0, 0),
            "seed {seed}: {}",
            r.violations
        );
        assert!(
            deliveries.iter().any(|d| d.epoch >= 2),
            "seed {seed}: no takeover happened"
        );
        assert!(
            r.violations.is_empty(),
            "seed {seed}: {} [{}]",
            r.violations,
            r.faults
        );
    }
}

#[test]
fn simulation_is_reproducible_from_its_seed() {
    let (ra, a) = run_seed(12, &crashes_only());
    let (rb, b) = run_seed(12, &crashes_only());
    assert!(!a.is_empty());
    assert!(
        a.iter().any(|d| d.epoch >= 2),
        "the schedule should include a takeover"
    );
    assert_eq!(ra.faults, rb.faults);
    // Every field of every delivery, receive times included, is the same.
    assert_eq!(a, b);
}

#[test]
fn seeds_run_in_parallel_report_in_seed_order_with_the_same_results() {
    let cfg = SimConfig {
        duration: Duration::from_secs(10),
        ..SimConfig::default()
    };
    let seeds = [7, 3, 9, 1];
    let mut order = Vec::new();
    let parallel = edgepair_lab::sim::report::run_seeds(&seeds, &cfg, 3, |r| order.push(r.seed));
    assert_eq!(order, seeds, "reported in the order asked");
    for (r, seed) in parallel.iter().zip(seeds) {
        let (alone, _) = run_seed(seed, &cfg);
        assert_eq!(r.seed, seed);
        assert_eq!(
            (&r.faults, r.published, r.duplicates, r.longest_gap_ms),
            (
                &alone.faults,
                alone.published,
                alone.duplicates,
                alone.longest_gap_ms
            ),
            "seed {seed} differs when run beside others"
        );
        assert_eq!(r.failover_gaps_ms, alone.failover_gaps_ms);
    }
}
