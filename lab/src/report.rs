//! Judging a run: from the subscriber's deliveries to a verdict, CSV reports and pictures.
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
//! * `summary.json`: `{"run": RunInfo, "analysis": Analysis}`;
//! * `timeline.svg`: sequence number against time, coloured by broker, the fault marked and the
//!   failover gap shaded; `latency.svg`: end-to-end latency of every delivery against time.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, Context};
use hdrhistogram::Histogram;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

/// Columns of a delivery CSV (`subscriber --csv`, `deliveries.csv`), in order.
pub const DELIVERY_COLUMNS: [&str; 13] = [
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
    /// Deliveries of a sequence number seen before.
    pub duplicates: u64,
    /// First deliveries that came after a higher sequence number.
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
    /// Nothing missing (and something published).
    pub verdict_ok: bool,
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

/// Analyses the deliveries of one run.
pub fn analyze(all: &[Delivery], info: &RunInfo) -> Analysis {
    let mut rows: Vec<&Delivery> = all
        .iter()
        .filter(|d| info.publisher.as_ref().is_none_or(|p| &d.publisher == p))
        .collect();
    rows.sort_by_key(|d| d.received_at_us);

    let mut seen = HashSet::new();
    let mut stage_hists = [histogram(), histogram(), histogram(), histogram()];
    let mut first: BTreeMap<u64, &Delivery> = BTreeMap::new();
    let mut duplicates = 0;
    let mut reordered = 0;
    let mut highest = 0;
    let mut hist = histogram();
    let mut seconds: BTreeMap<u64, Histogram<u64>> = BTreeMap::new();
    for d in &rows {
        if !seen.insert((d.publisher.as_str(), d.seq)) {
            duplicates += 1;
            continue;
        }
        if d.seq < highest {
            reordered += 1;
        }
        highest = highest.max(d.seq);
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
    let missing: Vec<u64> = (1..=info.published)
        .filter(|s| !first.contains_key(s))
        .collect();
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
        published: info.published,
        delivered: rows.len() as u64,
        unique: first.len() as u64,
        verdict_ok: missing.is_empty() && info.published > 0,
        missing,
        duplicates,
        reordered,
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
    let verdict = if a.verdict_ok {
        "PASS: every published message was delivered at least once"
    } else if a.published == 0 {
        "FAIL: nothing was published"
    } else {
        "FAIL: messages are missing"
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

    let summary = serde_json::json!({ "run": info, "analysis": a });
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

const PRIMARY_COLOUR: RGBColor = RGBColor(31, 119, 180);
const BACKUP_COLOUR: RGBColor = RGBColor(255, 127, 14);
const DUP_COLOUR: RGBColor = RGBColor(214, 39, 40);
const FAULT_COLOUR: RGBColor = RGBColor(120, 120, 120);

fn secs(us: u64, start: u64) -> f64 {
    (us as f64 - start as f64) / 1e6
}

pub(crate) fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plotting failed: {e}")
}

pub(crate) type Chart<'a, 'b> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A chart with the house style: caption, time on x, `y_desc` on y, no minor grid.
fn new_chart<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, Shift>,
    title: String,
    xmax: f64,
    ymax: f64,
    y_desc: &str,
) -> anyhow::Result<Chart<'a, 'b>> {
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the first message")
        .y_desc(y_desc)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(plot_err)?;
    Ok(chart)
}

/// The fault of a single-fault run: a grey vertical line at `kx` seconds.
fn draw_fault(chart: &mut Chart<'_, '_>, kx: f64, ymax: f64, signal: &str) -> anyhow::Result<()> {
    chart
        .draw_series(LineSeries::new(
            vec![(kx, 0.0), (kx, ymax)],
            FAULT_COLOUR.stroke_width(2),
        ))
        .map_err(plot_err)?
        .label(format!("{signal} at {kx:.1} s"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], FAULT_COLOUR.stroke_width(2)));
    Ok(())
}

/// Draws the legend of the labelled series in the house style, at `pos`.
pub(crate) fn draw_legend<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    pos: SeriesLabelPosition,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(pos)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

/// Draws the legend and writes the file.
fn finish_chart<'a, 'b>(
    mut chart: Chart<'a, 'b>,
    root: &'a DrawingArea<SVGBackend<'b>, Shift>,
) -> anyhow::Result<()> {
    draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Draws a thin vertical line at each chaos fault, with one legend entry for all of them.
fn draw_marks<DB: DrawingBackend>(
    chart: &mut ChartContext<
        '_,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    info: &RunInfo,
    ymax: f64,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    if info.marks.is_empty() {
        return Ok(());
    }
    let n = info.marks.len();
    let lines: Vec<Vec<(f64, f64)>> = info
        .marks
        .iter()
        .map(|(at, _)| {
            let x = secs(*at, info.start_us);
            vec![(x, 0.0), (x, ymax)]
        })
        .collect();
    chart
        .draw_series(
            lines
                .into_iter()
                .map(|l| PathElement::new(l, DUP_COLOUR.mix(0.45).stroke_width(2))),
        )
        .map_err(plot_err)?
        .label(format!("faults ({n})"))
        .legend(|(x, y)| {
            PathElement::new(
                vec![(x, y), (x + 12, y)],
                DUP_COLOUR.mix(0.45).stroke_width(2),
            )
        });
    Ok(())
}

fn timeline_svg(
    path: &Path,
    a: &Analysis,
    rows: &[&Delivery],
    info: &RunInfo,
) -> anyhow::Result<()> {
    let xmax = secs(info.end_us, info.start_us).max(1.0);
    let ymax = (rows
        .iter()
        .map(|d| d.seq)
        .max()
        .unwrap_or(0)
        .max(info.published) as f64
        * 1.05)
        .max(1.0);
    let root = SVGBackend::new(path, (1000, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let title = format!(
        "{} — {}: {} published, {} missing, {} duplicates, failover gap {}",
        info.scenario,
        if a.verdict_ok { "PASS" } else { "FAIL" },
        a.published,
        a.missing.len(),
        a.duplicates,
        a.failover_gap_ms
            .map_or("-".into(), |g| format!("{g:.0} ms"))
    );
    let mut chart = new_chart(&root, title, xmax, ymax, "sequence number")?;
    if let Some(k) = info.kill_at_us {
        let kx = secs(k, info.start_us);
        if let Some(g) = a.failover_gap_ms {
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(kx, 0.0), (kx + g / 1000.0, ymax)],
                    DUP_COLOUR.mix(0.15).filled(),
                )))
                .map_err(plot_err)?
                .label(format!("failover gap ({g:.0} ms)"))
                .legend(|(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], DUP_COLOUR.mix(0.3).filled())
                });
        }
        draw_fault(&mut chart, kx, ymax, &info.signal)?;
    }
    draw_marks(&mut chart, info, ymax)?;
    for (name, colour) in [("primary", PRIMARY_COLOUR), ("backup", BACKUP_COLOUR)] {
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .filter(|d| d.source == name && !d.duplicate)
            .map(|d| (secs(d.received_at_us, info.start_us), d.seq as f64))
            .collect();
        let n = pts.len();
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 2, colour.filled())))
            .map_err(plot_err)?
            .label(format!("delivered by {name} ({n})"))
            .legend(move |(x, y)| Circle::new((x + 6, y), 3, colour.filled()));
    }
    let dups: Vec<(f64, f64)> = rows
        .iter()
        .filter(|d| d.duplicate)
        .map(|d| (secs(d.received_at_us, info.start_us), d.seq as f64))
        .collect();
    let n = dups.len();
    chart
        .draw_series(
            dups.into_iter()
                .map(|p| Cross::new(p, 4, DUP_COLOUR.stroke_width(2))),
        )
        .map_err(plot_err)?
        .label(format!("duplicate ({n})"))
        .legend(|(x, y)| Cross::new((x + 6, y), 4, DUP_COLOUR.stroke_width(2)));
    finish_chart(chart, &root)
}

fn latency_svg(path: &Path, rows: &[&Delivery], info: &RunInfo) -> anyhow::Result<()> {
    let xmax = secs(info.end_us, info.start_us).max(1.0);
    let ymax = (rows
        .iter()
        .map(|d| d.latency_us.max(0) as f64 / 1000.0)
        .fold(0.0, f64::max)
        * 1.1)
        .max(1.0);
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let title = format!("{} — end-to-end latency of every delivery", info.scenario);
    let mut chart = new_chart(&root, title, xmax, ymax, "latency, ms")?;
    if let Some(k) = info.kill_at_us {
        let kx = secs(k, info.start_us);
        draw_fault(&mut chart, kx, ymax, &info.signal)?;
    }
    draw_marks(&mut chart, info, ymax)?;
    for (name, colour) in [("primary", PRIMARY_COLOUR), ("backup", BACKUP_COLOUR)] {
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .filter(|d| d.source == name)
            .map(|d| {
                (
                    secs(d.received_at_us, info.start_us),
                    d.latency_us.max(0) as f64 / 1000.0,
                )
            })
            .collect();
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 2, colour.filled())))
            .map_err(plot_err)?
            .label(format!("from {name}"))
            .legend(move |(x, y)| Circle::new((x + 6, y), 3, colour.filled()));
    }
    finish_chart(chart, &root)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(seq: u64, at_ms: u64, source: &str, dup: bool) -> Delivery {
        Delivery {
            received_at_us: 1_000_000_000 + at_ms * 1000,
            source: source.into(),
            topic: "t".into(),
            publisher: "p".into(),
            seq,
            sent_at_us: 1_000_000_000 + at_ms * 1000 - 100_000,
            latency_us: 100_000,
            duplicate: dup,
            epoch: 1,
            broker_rx_us: 0,
            compute_start_us: 0,
            compute_end_us: 0,
            payload: seq.to_string(),
        }
    }

    fn info(published: u64, kill_ms: Option<u64>) -> RunInfo {
        RunInfo {
            published,
            publisher: Some("p".into()),
            start_us: 1_000_000_000,
            end_us: 1_000_000_000 + 10_000_000,
            kill_at_us: kill_ms.map(|k| 1_000_000_000 + k * 1000),
            publish_period_us: 100_000,
            scenario: "kill-primary".into(),
            signal: "SIGKILL".into(),
            marks: Vec::new(),
        }
    }

    #[test]
    fn missing_ranges_duplicates_and_failover_gap_are_counted() {
        let rows = vec![
            d(1, 100, "primary", false),
            d(2, 200, "primary", false),
            d(3, 300, "primary", false),
            // kill at 350 ms; 4 and 5 never arrive; backup resumes at 1000 ms
            d(3, 1000, "backup", true),
            d(6, 1100, "backup", false),
            d(8, 1200, "backup", false),
        ];
        let a = analyze(&rows, &info(8, Some(350)));
        assert_eq!(a.missing, vec![4, 5, 7]);
        assert!(!a.verdict_ok);
        assert_eq!(a.duplicates, 1);
        assert_eq!(a.unique, 5);
        assert_eq!(a.by_backup, 3);
        assert_eq!(a.failover_gap_ms, Some(650.0));
        assert_eq!(a.longest_silence_ms, 700.0);
        assert_eq!(a.longest_silence_seqs, (3, 3));
        let missing: Vec<(u64, u64)> = a
            .gaps
            .iter()
            .filter(|g| g.kind == "missing")
            .map(|g| (g.from_seq, g.to_seq))
            .collect();
        assert_eq!(missing, vec![(4, 5), (7, 7)]);
        let silence = a
            .gaps
            .iter()
            .find(|g| g.kind == "silence")
            .expect("silence");
        assert!(silence.during_failover);
        assert!(render_table(&a).contains("4-5, 7"));
    }

    #[test]
    fn reordering_is_counted_once_per_late_message() {
        let rows = vec![
            d(1, 100, "primary", false),
            d(3, 200, "primary", false),
            d(2, 300, "primary", false),
            d(4, 400, "primary", false),
        ];
        let a = analyze(&rows, &info(4, None));
        assert_eq!(a.reordered, 1);
        assert!(a.verdict_ok);
        assert_eq!(a.failover_gap_ms, None);
        assert!(render_table(&a).starts_with("PASS"));
    }

    #[test]
    fn latency_percentiles_and_seconds_come_from_first_deliveries() {
        let mut rows: Vec<Delivery> = (1..=100).map(|s| d(s, s * 20, "primary", false)).collect();
        for (i, r) in rows.iter_mut().enumerate() {
            r.latency_us = (i as i64 + 1) * 1000; // 1..=100 ms
        }
        rows.push(Delivery {
            latency_us: 999_000,
            ..d(50, 1500, "backup", true)
        });
        let a = analyze(&rows, &info(100, None));
        assert!((a.latency.p50_ms - 50.0).abs() < 0.5, "{:?}", a.latency);
        assert!((a.latency.max_ms - 100.0).abs() < 0.5, "{:?}", a.latency);
        assert_eq!(a.per_second.len(), 3);
        assert_eq!(a.per_second.iter().map(|s| s.count).sum::<u64>(), 100);
    }

    #[test]
    fn latency_is_split_into_stages_from_the_broker_stamps() {
        // Sent at t, received by the broker 1 ms later, waits 5 ms for a worker, computes 80 ms,
        // reaches the subscriber 2 ms after that: 88 ms in all.
        let rows: Vec<Delivery> = (1..=10)
            .map(|seq| {
                let mut x = d(seq, seq * 100, "primary", false);
                let sent = x.received_at_us - 88_000;
                x.sent_at_us = sent;
                x.latency_us = 88_000;
                x.broker_rx_us = sent + 1_000;
                x.compute_start_us = sent + 6_000;
                x.compute_end_us = sent + 86_000;
                x
            })
            .collect();
        let a = analyze(&rows, &info(10, None));
        let got: Vec<(&str, f64)> = a
            .stages
            .iter()
            .map(|(n, p)| (n.as_str(), p.p50_ms.round()))
            .collect();
        assert_eq!(
            got,
            [
                ("to broker", 1.0),
                ("queue wait", 5.0),
                ("compute", 80.0),
                ("delivery", 2.0)
            ]
        );
        assert!(
            render_table(&a).contains("queue wait 5.0/5.0"),
            "{}",
            render_table(&a)
        );
        // Deliveries without stamps (a seed broker) give no split rather than a wrong one.
        let plain: Vec<Delivery> = (1..=3).map(|s| d(s, s * 100, "primary", false)).collect();
        assert!(analyze(&plain, &info(3, None)).stages.is_empty());
    }

    #[test]
    fn nothing_published_is_a_failure() {
        let a = analyze(&[], &info(0, None));
        assert!(!a.verdict_ok);
        assert!(render_table(&a).starts_with("FAIL"));
    }

    #[test]
    fn reports_are_written_and_parse_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rows: Vec<Delivery> = (1..=30)
            .map(|s| d(s, s * 100, if s > 20 { "backup" } else { "primary" }, false))
            .collect();
        let i = info(30, Some(2050));
        let a = analyze(&rows, &i);
        write_reports(dir.path(), &a, &rows, &i).expect("write");
        for (f, cols) in [
            ("gaps.csv", &GAP_COLUMNS[..]),
            ("latency.csv", &LATENCY_COLUMNS[..]),
        ] {
            let mut r = csv::Reader::from_path(dir.path().join(f)).expect(f);
            let h: Vec<String> = r
                .headers()
                .expect("headers")
                .iter()
                .map(String::from)
                .collect();
            assert_eq!(h, cols);
            assert!(r.records().all(|x| x.is_ok()));
        }
        let svg = std::fs::read_to_string(dir.path().join("timeline.svg")).expect("svg");
        assert!(svg.contains("<svg") && svg.contains("sequence number") && svg.contains("PASS"));
        let svg = std::fs::read_to_string(dir.path().join("latency.svg")).expect("svg");
        assert!(svg.contains("latency, ms"));
        let j: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("summary.json")).expect("json"),
        )
        .expect("parse");
        assert_eq!(j["analysis"]["published"], 30);
    }

    #[test]
    fn a_bad_row_names_its_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("d.csv");
        let mut w = csv::Writer::from_path(&p).expect("csv");
        w.serialize(d(1, 1, "primary", false)).expect("row");
        w.flush().expect("flush");
        drop(w);
        let mut text = std::fs::read_to_string(&p).expect("read");
        text.push_str("x,primary,t,p,notanumber,1,1,false,1,0,0,0,1\n");
        std::fs::write(&p, text).expect("write");
        let err = read_deliveries(&p).expect_err("bad row").to_string();
        assert!(err.contains("line 3"), "{err}");
    }
}
