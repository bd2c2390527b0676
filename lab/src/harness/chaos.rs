//! Chaos runs: aiming a fault at the active node, and the per-cycle figures of `chaos.csv`.

use crate::report;

use crate::procs::*;
use edgepair::protocol::Role;

/// One chaos fault as it happened, for `chaos.csv`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChaosEvent {
    /// Cycle number, from 1.
    pub cycle: usize,
    /// When, µs since the Unix epoch.
    pub at_us: u64,
    /// Seconds since the first message.
    pub at_s: f64,
    /// The fault.
    pub fault: &'static str,
    /// Port label of the node hit (`primary` = the port the primary started on), or `link`.
    pub target: &'static str,
    /// Port label of the active node when the fault hit.
    pub active_before: &'static str,
    /// Fault → first delivery from the other node, when the active node was hit.
    pub failover_gap_ms: Option<f64>,
    /// Longest silence the subscriber saw from the fault to the next fault.
    pub longest_silence_ms: f64,
    /// Deliveries in that window.
    pub delivered: u64,
}

/// Index (0 = started as primary, 1 = started as backup) of the node that is primary now: the
/// one answering `STATUS` as primary in the highest epoch; 0 if neither answers.
pub(crate) async fn active_node(primary: &str, backup: &str) -> usize {
    let epoch = |s: Option<Status>| s.filter(|s| s.role == Role::Primary).map(|s| s.epoch);
    let (a, b) = (epoch(status(primary).await), epoch(status(backup).await));
    match (a, b) {
        (Some(x), Some(y)) if y > x => 1,
        (None, Some(_)) => 1,
        _ => 0,
    }
}

/// Fills each chaos cycle's figures from the deliveries: the failover gap when the active node
/// was hit, and the longest silence and delivery count until the next fault.
pub(crate) fn chaos_cycles(
    events: &mut [ChaosEvent],
    all: &[report::Delivery],
    publisher: Option<&str>,
    end_us: u64,
) {
    let mut rows: Vec<&report::Delivery> = all
        .iter()
        .filter(|d| publisher.is_none_or(|p| d.publisher == p))
        .collect();
    rows.sort_by_key(|d| d.received_at_us);
    let bounds: Vec<u64> = events.iter().map(|e| e.at_us).chain([end_us]).collect();
    for (i, e) in events.iter_mut().enumerate() {
        let (from, to) = (bounds[i], bounds[i + 1]);
        let window: Vec<&&report::Delivery> = rows
            .iter()
            .filter(|d| d.received_at_us >= from && d.received_at_us < to)
            .collect();
        e.delivered = window.len() as u64;
        let mut last = from;
        let mut longest = 0;
        for d in &window {
            longest = longest.max(d.received_at_us - last);
            last = d.received_at_us;
        }
        if i + 1 < bounds.len() - 1 {
            // Silence running into the next fault counts; after the last one the run just ends.
            longest = longest.max(to.saturating_sub(last));
        }
        e.longest_silence_ms = longest as f64 / 1000.0;
        if e.target == e.active_before {
            e.failover_gap_ms = window
                .iter()
                .find(|d| d.source != e.active_before)
                .map(|d| (d.received_at_us - from) as f64 / 1000.0);
        }
    }
}

/// The per-cycle table printed after a chaos run.
pub(crate) fn render_chaos(events: &[ChaosEvent]) -> String {
    let mut s = String::from(
        "\n  cycle  at (s)  fault            target   failover gap  longest silence  delivered\n",
    );
    for e in events {
        s.push_str(&format!(
            "  {:>5}  {:>6.1}  {:<16} {:<8} {:>12}  {:>12.0} ms  {:>9}\n",
            e.cycle,
            e.at_s,
            e.fault,
            e.target,
            e.failover_gap_ms
                .map_or("-".to_string(), |g| format!("{g:.0} ms")),
            e.longest_silence_ms,
            e.delivered
        ));
    }
    s
}
