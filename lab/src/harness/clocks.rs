//! Each node's clock against the harness's, measured NTP-style over the nodes' own protocol
//! (`TIME`): four timestamps per exchange (harness sends t1, node receives t2 and answers t3,
//! harness receives t4); offset = ((t2 − t1) + (t3 − t4)) / 2, round trip = (t4 − t1) −
//! (t3 − t2); of several exchanges the one with the smallest round trip is kept, and half its
//! round trip bounds the error. On one host (or in namespaces of one host) the offset is ~0:
//! what it shows there is the method's own uncertainty.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use edgepair::net::Net;

/// Exchanges per measurement.
const EXCHANGES: usize = 8;

/// One node's clock offset at one moment of the run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClockReading {
    /// `primary` or `backup` (the role it was started in).
    pub node: String,
    /// `before` or `after` the run.
    pub when: String,
    /// Node clock minus harness clock, µs.
    pub offset_us: i64,
    /// Half the smallest round trip: the offset is right within this, µs.
    pub uncertainty_us: u64,
}

/// Measures the clock of the node at `addr`; `None` if it does not answer.
pub async fn measure(node: &str, when: &str, addr: &str) -> Option<ClockReading> {
    let c = edgepair::client::clock_offset(Net::Tokio, addr, EXCHANGES, Duration::from_secs(1))
        .await
        .ok()?;
    Some(ClockReading {
        node: node.to_string(),
        when: when.to_string(),
        offset_us: c.offset_us,
        uncertainty_us: c.uncertainty_us(),
    })
}

/// Measures the clock of the host a client role runs on: `edgepair-clock` run there against
/// the node at `node_addr`, chained with `node` (that node's reading from here). The node's
/// clock minus the client's, subtracted from the node's minus ours, is the client's minus
/// ours; the two uncertainties add.
pub async fn measure_client(
    role: &str,
    when: &str,
    launcher: &crate::procs::Launcher,
    bin_dir: &std::path::Path,
    node_addr: &str,
    node: &ClockReading,
) -> anyhow::Result<ClockReading> {
    use anyhow::Context;
    let mut cmd = launcher.command(
        bin_dir,
        "edgepair-clock",
        "edgepair-clock",
        &[node_addr.to_string()],
    )?;
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .context("edgepair-clock did not finish within 20 s")?
        .context("cannot run edgepair-clock")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.parse::<i64>().ok())
    };
    let (Some(off), Some(unc)) = (field("offset_us="), field("uncertainty_us=")) else {
        anyhow::bail!(
            "edgepair-clock on the {role}'s host said nothing usable ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    };
    Ok(ClockReading {
        node: role.to_string(),
        when: when.to_string(),
        offset_us: node.offset_us - off,
        uncertainty_us: node.uncertainty_us + unc.max(0) as u64,
    })
}

/// The mean offset of `role`'s host over its readings (µs) and the largest uncertainty.
pub fn offset_of(readings: &[ClockReading], role: &str) -> Option<(i64, u64)> {
    let r: Vec<&ClockReading> = readings.iter().filter(|r| r.node == role).collect();
    if r.is_empty() {
        return None;
    }
    let mean = r.iter().map(|r| r.offset_us).sum::<i64>() / r.len() as i64;
    Some((mean, r.iter().map(|r| r.uncertainty_us).max().unwrap_or(0)))
}

/// Puts every timestamp of `deliveries` on the harness's clock: the subscriber's receive times
/// less its host's offset, the publisher's send times less its, the brokers' stamps less the
/// delivering node's; latencies are computed again from them. Returns the correction applied
/// to the end-to-end latency (subscriber's offset minus publisher's) and its uncertainty.
pub fn correct(
    deliveries: &mut [edgepair::client::Delivery],
    readings: &[ClockReading],
) -> (i64, u64) {
    let get = |role| offset_of(readings, role).unwrap_or((0, 0));
    let (sub, sub_u) = get("subscriber");
    let (publ, pub_u) = get("publisher");
    let nodes = [get("primary").0, get("backup").0];
    let shift = |t: u64, by: i64| {
        if t == 0 {
            0
        } else {
            (t as i64 - by).max(0) as u64
        }
    };
    for d in deliveries.iter_mut() {
        let node = nodes[usize::from(d.source == "backup")];
        d.received_at_us = shift(d.received_at_us, sub);
        d.sent_at_us = shift(d.sent_at_us, publ);
        d.latency_us = d.received_at_us as i64 - d.sent_at_us as i64;
        d.broker_rx_us = shift(d.broker_rx_us, node);
        d.compute_start_us = shift(d.compute_start_us, node);
        d.compute_end_us = shift(d.compute_end_us, node);
    }
    (sub - publ, sub_u + pub_u)
}

/// The table line for the readings.
pub fn describe(readings: &[ClockReading]) -> String {
    readings
        .iter()
        .map(|r| {
            format!(
                "{} {:+.3} ± {:.3} ms ({})",
                r.node,
                r.offset_us as f64 / 1000.0,
                r.uncertainty_us as f64 / 1000.0,
                r.when
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
