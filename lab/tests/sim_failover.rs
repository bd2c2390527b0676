//! The very node and client code of the binaries inside turmoil's deterministic network
//! simulator: crashes lose nothing, and a seed replays bit for bit.

use std::time::Duration;

use edgepair::log::Fsync;
use edgepair_lab::sim::{run_seed, FaultKind, SimConfig, SimResult};

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

/// Nothing lost, acknowledged or not, nothing excused by the policy, and no violation at all.
fn assert_lost_nothing(seed: u64, r: &SimResult) {
    assert_eq!(
        (r.lost, r.lost_acked, r.lost_by_policy),
        (0, 0, 0),
        "seed {seed}: {} [{}]",
        r.violations,
        r.faults
    );
    assert!(r.violations.is_empty(), "seed {seed}: {}", r.violations);
}

fn power(faults: Vec<FaultKind>, fsync: Fsync) -> SimConfig {
    SimConfig {
        duration: Duration::from_secs(20),
        faults,
        fsync,
        ..SimConfig::default()
    }
}

#[test]
fn a_power_loss_of_one_node_loses_nothing_acknowledged_under_batch() {
    // The node that lost power drops its unsynced window; the other node holds what was
    // acknowledged and catches it up. Nothing is excused: a loss would be a violation.
    let cfg = power(vec![FaultKind::Power], Fsync::Batch);
    for seed in [1, 3, 5] {
        let (r, _) = run_seed(seed, &cfg);
        assert!(r.faults.contains("power "), "{}", r.faults);
        assert!(r.failovers >= 1, "seed {seed}: the primary lost power once");
        assert_lost_nothing(seed, &r);
        assert!(r.power_oldest_unsynced_ms <= 6.0, "seed {seed}: {r:?}");
    }
}

#[test]
fn a_power_loss_of_both_nodes_loses_nothing_acknowledged_under_always() {
    let cfg = power(vec![FaultKind::PowerBoth], Fsync::Always);
    for seed in [1, 2, 3] {
        let (r, _) = run_seed(seed, &cfg);
        assert_eq!(r.faults.matches("power both").count(), 3, "{}", r.faults);
        assert_lost_nothing(seed, &r);
    }
}

#[test]
fn a_power_loss_of_both_nodes_under_never_loses_acknowledged_messages_by_policy_only() {
    // Nothing is ever synced under `never` (the model's OS never writes back): each power loss
    // of both nodes wipes both logs, and what was acknowledged but not yet delivered is gone.
    // That is what `never` allows, counted apart; the checker's verdict excludes exactly it.
    let cfg = power(vec![FaultKind::PowerBoth], Fsync::Never);
    let mut excused = 0;
    for seed in [1, 2, 3] {
        let (r, _) = run_seed(seed, &cfg);
        assert!(r.power_dropped > 0, "seed {seed}: nothing dropped");
        assert_eq!(r.lost_acked, r.lost_by_policy, "seed {seed}: {r:?}");
        assert_eq!(r.lost, r.lost_by_policy, "seed {seed}: {r:?}");
        assert!(r.violations.is_empty(), "seed {seed}: {}", r.violations);
        excused += r.lost_by_policy;
    }
    assert!(excused > 0, "the model of the disk lost nothing");
    // The same schedules under `always` lose nothing: the loss comes from the policy.
    let cfg = power(vec![FaultKind::PowerBoth], Fsync::Always);
    for seed in [1, 2, 3] {
        let (r, _) = run_seed(seed, &cfg);
        assert_eq!((r.lost, r.power_dropped), (0, 0), "seed {seed}: {r:?}");
    }
}

/// A node restarted on its log takes its epoch up from it. Before it did, after a takeover
/// (epoch 2) and a power loss of both nodes, the node born primary reigned in epoch 1 again
/// and the subscriber saw a stale epoch: seed 4 under `--faults crash,power-both --fsync
/// always --duration 20s` (crash primary@2.1s, crash backup@8.5s, power both@13.5s) showed 67
/// deliveries in epoch 1 after epoch 2.
#[test]
fn a_power_loss_of_both_nodes_after_a_takeover_keeps_epochs_monotonic() {
    let cfg = power(vec![FaultKind::Crash, FaultKind::PowerBoth], Fsync::Always);
    for seed in [4, 6, 7] {
        let (r, _) = run_seed(seed, &cfg);
        assert!(r.faults.contains("power both"), "{}", r.faults);
        assert_eq!(r.stale, 0, "seed {seed}: {} [{}]", r.violations, r.faults);
    }
}

/// Under `never` a power loss takes the entries that told the log its epoch; the epoch kept
/// apart (the data directory's `EPOCH`, fsync'd at each change) still does. Before it was kept,
/// 558 of 1,000 seeds under `never` showed a stale epoch.
#[test]
fn a_power_loss_of_both_nodes_keeps_epochs_monotonic_even_under_never() {
    let cfg = power(vec![FaultKind::Crash, FaultKind::PowerBoth], Fsync::Never);
    let mut dropped = 0;
    for seed in [4, 6, 7] {
        let (r, _) = run_seed(seed, &cfg);
        assert!(r.faults.contains("power both"), "{}", r.faults);
        assert_eq!(r.stale, 0, "seed {seed}: {} [{}]", r.violations, r.faults);
        dropped += r.power_dropped;
    }
    assert!(
        dropped > 0,
        "the power losses took entries, epochs among them"
    );
}
