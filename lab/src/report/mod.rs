//! Judging a run: from the subscriber's deliveries to a verdict, CSV reports and pictures.
//!
//! What is missing, duplicated and reordered, and the epoch rule, are judged by
//! [`crate::check::check`], the same checker the simulation uses; this module adds the figures.
//!
//! Pure: it reads a CSV and writes files, never touches a socket or the clock, so every number
//! it prints can be checked on hand-made deliveries (see the tests at the bottom).
//!
//! Files written by [`write_reports`]:
//!
//! * `gaps.csv` ([`GAP_COLUMNS`]): every silence between two consecutive deliveries longer than
//!   two publish periods (`kind=silence`) and every maximal range of missing sequence numbers
//!   (`kind=missing`), with whether it overlaps the failover window: from the fault to one
//!   second after the first delivery by the backup (or one second after the fault, if none);
//! * `latency.csv` ([`LATENCY_COLUMNS`]): `section=percentile` rows (key `p50`, `p90`, `p99`,
//!   `p99.9`, `max`; `value_ms`) over first deliveries, then `section=second` rows (key = whole
//!   seconds since the first message; `count`, `p50_ms`, `p99_ms`) so the failover shows up, then
//!   `section=stage` rows (key `to broker`, `queue wait`, `compute`, `delivery`; `count`,
//!   `p50_ms`, `p99_ms`): where the time went, from the broker-side stamps of each delivery;
//! * `summary.json`: `{"run": RunInfo, "analysis": Analysis, "check": Verdict}`, the last
//!   being the whole verdict of [`crate::check::check`] (epochs and duplicate bound included);
//! * `timeline.svg`: sequence number against time, coloured by broker, the fault marked and the
//!   failover gap shaded; `latency.svg`: end-to-end latency of every delivery against time.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

mod group;
mod metrics;
mod plot;

pub use group::{
    judge_group, render_group, write_group, GroupFaults, GroupRow, GroupVerdict, Redelivery,
};
pub use metrics::{write_metrics, MetricsRow};

pub(crate) use plot::{draw_legend, plot_err};
use plot::{latency_svg, timeline_svg};

use crate::check::{self, FaultSpan, Verdict};

/// Columns of a delivery CSV (`subscriber --csv`, `deliveries.csv`), in order.
pub const DELIVERY_COLUMNS: [&str; 14] = [
    "received_at_us",
    "source",
    "topic",
    "publisher",
    "seq",
    "sent_at_us",
    "latency_us",
    "duplicate",
    "epoch",
    "broker_rx_us",
    "compute_start_us",
    "compute_end_us",
    "payload",
    "offset",
];

/// Columns of `gaps.csv`.
pub const GAP_COLUMNS: [&str; 7] = [
    "kind",
    "from_seq",
    "to_seq",
    "from_us",
    "to_us",
    "duration_ms",
    "during_failover",
];

/// The stages of [`Analysis::stages`], in path order.
pub const STAGES: [&str; 4] = ["to broker", "queue wait", "compute", "delivery"];

/// Columns of `latency.csv`.
pub const LATENCY_COLUMNS: [&str; 6] = ["section", "key", "count", "p50_ms", "p99_ms", "value_ms"];

pub use edgepair::client::Delivery;

/// Reads a delivery CSV; a bad row is an error naming its line.
pub fn read_deliveries(path: &Path) -> anyhow::Result<Vec<Delivery>> {
    let mut r =
        csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (i, row) in r.deserialize::<Delivery>().enumerate() {
        out.push(row.with_context(|| format!("{}: bad row at line {}", path.display(), i + 2))?);
    }
    Ok(out)
}

/// What the analysis needs to know about the run besides the deliveries.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunInfo {
    /// The test publisher produced sequence numbers `1..=published`.
    pub published: u64,
    /// Count only this publisher's messages (`None`: all).
    pub publisher: Option<String>,
    /// When the first message was due, µs since the Unix epoch.
    pub start_us: u64,
    /// When the run ended.
    pub end_us: u64,
    /// When the fault was injected, if there was one.
    pub kill_at_us: Option<u64>,
    /// Time between two messages of the test publisher.
    pub publish_period_us: u64,
    /// Scenario name.
    pub scenario: String,
    /// The fault (`SIGKILL`, …).
    pub signal: String,
    /// Faults of a chaos run (µs since the Unix epoch, name), drawn as lines on the pictures.
    #[serde(default)]
    pub marks: Vec<(u64, String)>,
    /// Where each process ran (`--hosts`), and the addresses; empty when all ran locally.
    #[serde(default)]
    pub hosts: String,
    /// Each host's clock offset against the harness's, before and after the run (the nodes',
    /// and the clients' where they run elsewhere).
    #[serde(default)]
    pub clocks: Vec<crate::harness::clocks::ClockReading>,
    /// What was subtracted from every end-to-end latency to put it on one clock (the
    /// subscriber's host's offset minus the publisher's), and its uncertainty, µs: `None` when
    /// every process ran on this host's clock.
    #[serde(default)]
    pub latency_correction_us: Option<(i64, u64)>,
    /// Every fault injected, with its window: what the checker derives the duplicate bound and
    /// the split-brain excuse from.
    #[serde(default)]
    pub faults: Vec<FaultSpan>,
    /// The test publisher's resend window (`--resend`, default 5).
    #[serde(default = "default_resend")]
    pub resend: u64,
    /// The backup's ping interval, µs (`--ping-interval`, default 1 s).
    #[serde(default = "default_ping_interval_us")]
    pub ping_interval_us: u64,
    /// The sequence numbers the test publisher got acknowledged (`test-publisher --acks`), when
    /// known. Not written out: the verdict lists what of it was lost.
    #[serde(skip)]
    pub acked: Option<BTreeSet<u64>>,
}

/// Reads an acknowledgement CSV (`test-publisher --acks FILE`) into the acknowledged sequence
/// numbers; a bad row is an error naming its line.
pub fn read_acks(path: &Path) -> anyhow::Result<BTreeSet<u64>> {
    let mut r =
        csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = BTreeSet::new();
    for (i, row) in r.deserialize::<edgepair::client::AckRecord>().enumerate() {
        let row = row.with_context(|| format!("{}: bad row at line {}", path.display(), i + 2))?;
        out.insert(row.seq);
    }
    Ok(out)
}

fn default_resend() -> u64 {
    5
}

fn default_ping_interval_us() -> u64 {
    1_000_000
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

/// A silence or a missing range (one row of `gaps.csv`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Gap {
    /// `silence` or `missing`.
    pub kind: String,
    /// First sequence number concerned (the one before a silence).
    pub from_seq: u64,
    /// Last sequence number concerned (the one after a silence).
    pub to_seq: u64,
    /// Start, µs since the Unix epoch.
    pub from_us: u64,
    /// End.
    pub to_us: u64,
    /// `to_us - from_us` in ms.
    pub duration_ms: f64,
    /// Overlaps the failover window.
    pub during_failover: bool,
}

/// Latency of one second of the run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SecondStat {
    /// Whole seconds since the first message.
    pub second: u64,
    /// First deliveries in that second.
    pub count: u64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
}

/// Everything a run is judged by.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Analysis {
    /// Messages the publisher produced.
    pub published: u64,
    /// Deliveries (rows), duplicates included.
    pub delivered: u64,
    /// Distinct sequence numbers delivered.
    pub unique: u64,
    /// Sequence numbers in `1..=published` never delivered.
    pub missing: Vec<u64>,
    /// Of those, the acknowledged ones: each one fails the run.
    #[serde(default)]
    pub acked_lost: Vec<u64>,
    /// Of those, the unacknowledged ones (all of them when the acknowledgements are unknown).
    #[serde(default)]
    pub unacked_lost: Vec<u64>,
    /// Whether the publisher's acknowledgements were known (read from its `--acks` file).
    #[serde(default)]
    pub acks_known: bool,
    /// Deliveries of a sequence number seen before.
    pub duplicates: u64,
    /// First deliveries that came after a higher sequence number: each one fails the run.
    pub reordered: u64,
    /// Deliveries that arrived from the primary.
    pub by_primary: u64,
    /// Deliveries that arrived from the backup.
    pub by_backup: u64,
    /// Fault → first delivery by the backup, ms.
    pub failover_gap_ms: Option<f64>,
    /// Longest interval between two consecutive deliveries, ms.
    pub longest_silence_ms: f64,
    /// Sequence numbers around the longest silence.
    pub longest_silence_seqs: (u64, u64),
    /// End-to-end latency over first deliveries.
    pub latency: Percentiles,
    /// Latency per second of the run.
    pub per_second: Vec<SecondStat>,
    /// The latency split into stages, from the stamps of first deliveries that carry them:
    /// `to broker` (publisher's send → broker's receipt: network, and clock skew across hosts),
    /// `queue wait` (receipt → a compute worker free), `compute`, `delivery` (compute end →
    /// subscriber). Replication runs beside compute, not before it, so it is in none of them;
    /// it holds back only the publisher's `ACK`.
    pub stages: Vec<(String, Percentiles)>,
    /// Silences and missing ranges.
    pub gaps: Vec<Gap>,
    /// Something published, no acknowledged message lost (nothing missing at all when the
    /// acknowledgements are unknown), first deliveries in order ([`Verdict::delivery_ok`]).
    pub verdict_ok: bool,
    /// The checker's whole verdict ([`crate::check`]): the figures above that judge the run come
    /// from it; written to `summary.json` as `check`, beside `analysis`.
    #[serde(skip)]
    pub check: Verdict,
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    let ms = |v: u64| v as f64 / 1000.0;
    Percentiles {
        count: h.len(),
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 1 hour at 3 significant digits; the bounds are constants, so this cannot fail.
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// Analyses the deliveries of one run. What is missing, duplicated or reordered, and the epoch
/// rule, are judged by [`check::check`]; this adds the figures (latency, silences, gaps).
pub fn analyze(all: &[Delivery], info: &RunInfo) -> Analysis {
    let verdict = check::check(
        all,
        &check::Expect {
            publisher: info.publisher.as_deref(),
            published: info.published,
            acked: info.acked.as_ref(),
            faults: &info.faults,
            resend: info.resend,
            ping_interval_us: info.ping_interval_us,
        },
    );
    let mut rows: Vec<&Delivery> = all
        .iter()
        .filter(|d| info.publisher.as_ref().is_none_or(|p| &d.publisher == p))
        .collect();
    rows.sort_by_key(|d| d.received_at_us);

    let mut seen = HashSet::new();
    let mut stage_hists = [histogram(), histogram(), histogram(), histogram()];
    let mut first: BTreeMap<u64, &Delivery> = BTreeMap::new();
    let mut hist = histogram();
    let mut seconds: BTreeMap<u64, Histogram<u64>> = BTreeMap::new();
    for d in &rows {
        if !seen.insert((d.publisher.as_str(), d.seq)) {
            continue;
        }
        first.insert(d.seq, d);
        let lat = d.latency_us.max(1) as u64;
        let _ = hist.record(lat.min(3_600_000_000));
        if d.broker_rx_us > 0
            && d.compute_start_us >= d.broker_rx_us
            && d.compute_end_us >= d.compute_start_us
        {
            let parts = [
                d.broker_rx_us.saturating_sub(d.sent_at_us),
                d.compute_start_us - d.broker_rx_us,
                d.compute_end_us - d.compute_start_us,
                d.received_at_us.saturating_sub(d.compute_end_us),
            ];
            for (h, v) in stage_hists.iter_mut().zip(parts) {
                let _ = h.record(v.clamp(1, 3_600_000_000));
            }
        }
        let sec = d.received_at_us.saturating_sub(info.start_us) / 1_000_000;
        let _ = seconds
            .entry(sec)
            .or_insert_with(histogram)
            .record(lat.min(3_600_000_000));
    }
    let missing = &verdict.missing;
    let by_backup = rows.iter().filter(|d| d.source == "backup").count() as u64;
    let failover_first = info.kill_at_us.and_then(|k| {
        rows.iter()
            .find(|d| d.source == "backup" && d.received_at_us >= k)
            .map(|d| d.received_at_us)
    });
    let failover_gap_ms = match (info.kill_at_us, failover_first) {
        (Some(k), Some(f)) => Some((f - k) as f64 / 1000.0),
        _ => None,
    };
    let window = info
        .kill_at_us
        .map(|k| (k, failover_first.unwrap_or(k) + 1_000_000));
    let during = |a: u64, b: u64| window.is_some_and(|(ws, we)| a <= we && b >= ws);

    let mut gaps = Vec::new();
    let mut longest = (0u64, (0u64, 0u64));
    for w in rows.windows(2) {
        let (a, b) = (w[0], w[1]);
        let d = b.received_at_us - a.received_at_us;
        if d > longest.0 {
            longest = (d, (a.seq, b.seq));
        }
        if d > 2 * info.publish_period_us {
            gaps.push(Gap {
                kind: "silence".into(),
                from_seq: a.seq,
                to_seq: b.seq,
                from_us: a.received_at_us,
                to_us: b.received_at_us,
                duration_ms: d as f64 / 1000.0,
                during_failover: during(a.received_at_us, b.received_at_us),
            });
        }
    }
    let mut i = 0;
    while i < missing.len() {
        let mut j = i;
        while j + 1 < missing.len() && missing[j + 1] == missing[j] + 1 {
            j += 1;
        }
        let (lo, hi) = (missing[i], missing[j]);
        let from_us = first
            .range(..lo)
            .next_back()
            .map(|(_, d)| d.received_at_us)
            .unwrap_or(info.start_us);
        let to_us = first
            .range(hi + 1..)
            .next()
            .map(|(_, d)| d.received_at_us)
            .unwrap_or(info.end_us)
            .max(from_us);
        gaps.push(Gap {
            kind: "missing".into(),
            from_seq: lo,
            to_seq: hi,
            from_us,
            to_us,
            duration_ms: (to_us - from_us) as f64 / 1000.0,
            during_failover: during(from_us, to_us),
        });
        i = j + 1;
    }

    Analysis {
        published: verdict.published,
        delivered: verdict.delivered,
        unique: verdict.unique,
        verdict_ok: verdict.delivery_ok(),
        missing: verdict.missing.clone(),
        acked_lost: verdict.acked_lost.clone(),
        unacked_lost: verdict.unacked_lost.clone(),
        acks_known: verdict.acks_known,
        duplicates: verdict.duplicates,
        reordered: verdict.reordered,
        by_primary: rows.len() as u64 - by_backup,
        by_backup,
        failover_gap_ms,
        longest_silence_ms: longest.0 as f64 / 1000.0,
        longest_silence_seqs: longest.1,
        latency: percentiles(&hist),
        stages: STAGES
            .iter()
            .zip(&stage_hists)
            .filter(|(_, h)| !h.is_empty())
            .map(|(n, h)| (n.to_string(), percentiles(h)))
            .collect(),
        per_second: seconds
            .iter()
            .map(|(s, h)| SecondStat {
                second: *s,
                count: h.len(),
                p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
                p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
            })
            .collect(),
        gaps,
        check: verdict,
    }
}

/// Compresses a sorted list of numbers into ranges: `3-5, 9`.
fn ranges(v: &[u64]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        if !out.is_empty() {
            out.push_str(", ");
        }
        if i == j {
            let _ = write!(out, "{}", v[i]);
        } else {
            let _ = write!(out, "{}-{}", v[i], v[j]);
        }
        i = j + 1;
    }
    out
}

/// The verdict and the table printed at the end of a run.
pub fn render_table(a: &Analysis) -> String {
    let mut s = String::new();
    let verdict = if a.published == 0 {
        "FAIL: nothing was published".to_string()
    } else if a.verdict_ok && a.missing.is_empty() {
        "PASS: every published message was delivered at least once, in order".to_string()
    } else if a.verdict_ok {
        format!(
            "PASS: every acknowledged message was delivered, in order ({} unacknowledged never delivered)",
            a.unacked_lost.len()
        )
    } else {
        let mut why = Vec::new();
        if !a.acked_lost.is_empty() {
            why.push(format!(
                "{} acknowledged message(s) lost",
                a.acked_lost.len()
            ));
        }
        if !a.acks_known && !a.missing.is_empty() {
            why.push(format!(
                "{} message(s) missing (acknowledgements unknown)",
                a.missing.len()
            ));
        }
        if a.reordered > 0 {
            why.push(format!("{} out-of-order first deliveries", a.reordered));
        }
        format!("FAIL: {}", why.join(", "))
    };
    let list = |v: &[u64]| {
        if v.is_empty() {
            "0".to_string()
        } else {
            format!("{} ({})", v.len(), ranges(v))
        }
    };
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0} ms"));
    let _ = writeln!(s, "{verdict}");
    let rows: Vec<(&str, String)> = vec![
        ("published", a.published.to_string()),
        (
            "delivered",
            format!(
                "{} (primary {}, backup {})",
                a.delivered, a.by_primary, a.by_backup
            ),
        ),
        ("unique", a.unique.to_string()),
        (
            "missing",
            if a.missing.is_empty() {
                "0".to_string()
            } else {
                format!("{} ({})", a.missing.len(), ranges(&a.missing))
            },
        ),
        (
            "acked lost",
            if a.acks_known {
                list(&a.acked_lost)
            } else {
                "? (acknowledgements unknown)".to_string()
            },
        ),
        ("unacked lost", list(&a.unacked_lost)),
        ("duplicates", a.duplicates.to_string()),
        ("reordered", a.reordered.to_string()),
        (
            "failover gap",
            format!("{} (fault → first backup delivery)", opt(a.failover_gap_ms)),
        ),
        (
            "longest silence",
            format!(
                "{:.0} ms (between seq {} and {})",
                a.longest_silence_ms, a.longest_silence_seqs.0, a.longest_silence_seqs.1
            ),
        ),
        (
            "latency",
            format!(
                "p50 {:.1} · p90 {:.1} · p99 {:.1} · p99.9 {:.1} · max {:.1} ms",
                a.latency.p50_ms,
                a.latency.p90_ms,
                a.latency.p99_ms,
                a.latency.p999_ms,
                a.latency.max_ms
            ),
        ),
    ];
    for (k, v) in rows {
        let _ = writeln!(s, "  {k:<16} {v}");
    }
    if !a.stages.is_empty() {
        let parts: Vec<String> = a
            .stages
            .iter()
            .map(|(n, p)| format!("{n} {:.1}/{:.1}", p.p50_ms, p.p99_ms))
            .collect();
        let _ = writeln!(
            s,
            "  {:<16} {} ms (p50/p99)",
            "where it went",
            parts.join(" · ")
        );
    }
    s
}

/// Writes `gaps.csv`, `latency.csv`, `summary.json`, `timeline.svg` and `latency.svg` into `dir`.
pub fn write_reports(
    dir: &Path,
    a: &Analysis,
    deliveries: &[Delivery],
    info: &RunInfo,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut w = csv::Writer::from_path(dir.join("gaps.csv"))?;
    w.write_record(GAP_COLUMNS)?;
    for g in &a.gaps {
        w.serialize(g)?;
    }
    w.flush()?;

    let mut w = csv::Writer::from_path(dir.join("latency.csv"))?;
    w.write_record(LATENCY_COLUMNS)?;
    let l = &a.latency;
    for (k, v) in [
        ("p50", l.p50_ms),
        ("p90", l.p90_ms),
        ("p99", l.p99_ms),
        ("p99.9", l.p999_ms),
        ("max", l.max_ms),
    ] {
        w.write_record([
            "percentile",
            k,
            &l.count.to_string(),
            "",
            "",
            &format!("{v:.3}"),
        ])?;
    }
    for s in &a.per_second {
        w.write_record([
            "second",
            &s.second.to_string(),
            &s.count.to_string(),
            &format!("{:.3}", s.p50_ms),
            &format!("{:.3}", s.p99_ms),
            "",
        ])?;
    }
    for (name, p) in &a.stages {
        w.write_record([
            "stage",
            name,
            &p.count.to_string(),
            &format!("{:.3}", p.p50_ms),
            &format!("{:.3}", p.p99_ms),
            "",
        ])?;
    }
    w.flush()?;

    let summary = serde_json::json!({ "run": info, "analysis": a, "check": a.check });
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;

    let rows: Vec<&Delivery> = deliveries
        .iter()
        .filter(|d| info.publisher.as_ref().is_none_or(|p| &d.publisher == p))
        .collect();
    timeline_svg(&dir.join("timeline.svg"), a, &rows, info)?;
    latency_svg(&dir.join("latency.svg"), &rows, info)?;
    Ok(())
}

#[cfg(test)]
mod tests;
