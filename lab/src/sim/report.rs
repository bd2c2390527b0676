//! What a simulation run tells its reader: seeds run in parallel and reported in seed order,
//! distributions of failover gaps and duplicates as pictures, and the parameter sweep that
//! answers the question users of an edge simulator ask: how fast can I fail over without
//! flapping?
//!
//! A sweep is a list of axes (`ping-interval=250ms,500ms,1s`, `ack-timeout=200ms,500ms`); every
//! combination of their values is one *setting*, and every setting runs the same seeds, so the
//! settings differ only in the parameters swept.

use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use plotters::prelude::*;

use super::{run_seed, SimConfig, SimResult};
use crate::report::{draw_legend, plot_err};
use edgepair::compute::parse_duration;

/// Runs `seeds` on `jobs` threads (each seed is its own single-threaded simulation, so they
/// share nothing) and hands every result to `each` in seed order, as soon as it and all the
/// seeds before it are done: the table reads the same whatever the thread count.
pub fn run_seeds(
    seeds: &[u64],
    cfg: &SimConfig,
    jobs: usize,
    mut each: impl FnMut(&SimResult),
) -> Vec<SimResult> {
    let next = AtomicUsize::new(0);
    let (tx, rx) = mpsc::channel::<(usize, SimResult)>();
    let mut out: Vec<Option<SimResult>> = vec![None; seeds.len()];
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, seeds.len().max(1)) {
            let tx = tx.clone();
            let next = &next;
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(seed) = seeds.get(i) else { break };
                let (r, _) = run_seed(*seed, cfg);
                if tx.send((i, r)).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let mut shown = 0;
        for (i, r) in rx {
            out[i] = Some(r);
            while let Some(Some(r)) = out.get(shown) {
                each(r);
                shown += 1;
            }
        }
    });
    out.into_iter().flatten().collect()
}

/// A parameter the sweep can vary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// The backup's `PING` interval.
    PingInterval,
    /// How long a `PING` may go unanswered.
    PingTimeout,
    /// How long a publisher waits for an `ACK` before it switches brokers.
    AckTimeout,
    /// How many recent messages a publisher resends when it switches.
    Resend,
    /// Both nodes' `--lease` (`off` for none).
    Lease,
}

impl Param {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Param::PingInterval => "ping-interval",
            Param::PingTimeout => "ping-timeout",
            Param::AckTimeout => "ack-timeout",
            Param::Resend => "resend",
            Param::Lease => "lease",
        }
    }

    fn apply(self, cfg: &mut SimConfig, value: &str) -> anyhow::Result<()> {
        let dur = |v: &str| -> anyhow::Result<Duration> {
            let d = parse_duration(v).map_err(|e| anyhow!("{}={v}: {e}", self.name()))?;
            if d.is_zero() {
                bail!("{}={v}: must be more than zero", self.name());
            }
            Ok(d)
        };
        match self {
            Param::PingInterval => cfg.ping_interval = dur(value)?,
            Param::PingTimeout => cfg.ping_timeout = dur(value)?,
            Param::AckTimeout => cfg.ack_timeout = dur(value)?,
            Param::Lease => {
                cfg.lease = match value {
                    "off" | "0" => None,
                    v => {
                        Some(edgepair::cli::parse_lease(v).map_err(|e| anyhow!("lease={v}: {e}"))?)
                    }
                }
            }
            Param::Resend => {
                cfg.resend = value
                    .parse()
                    .with_context(|| format!("resend={value}: not a whole number"))?;
                if cfg.resend > edgepair::client::MAX_WINDOW {
                    bail!(
                        "resend={value}: at most {} messages are kept for resending",
                        edgepair::client::MAX_WINDOW
                    );
                }
            }
        }
        Ok(())
    }
}

impl FromStr for Param {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        [
            Param::PingInterval,
            Param::PingTimeout,
            Param::AckTimeout,
            Param::Resend,
            Param::Lease,
        ]
        .into_iter()
        .find(|p| p.name() == s)
        .ok_or_else(|| {
            anyhow!("unknown sweep parameter {s:?}: use ping-interval, ping-timeout, ack-timeout, resend or lease")
        })
    }
}

/// One swept parameter and its values, as given: `ping-interval=250ms,500ms,1s`.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    /// The parameter.
    pub param: Param,
    /// Its values, checked when parsed.
    pub values: Vec<String>,
}

impl FromStr for Axis {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (name, values) = s.split_once('=').ok_or_else(|| {
            anyhow!("sweep {s:?}: expected NAME=V1,V2,… (e.g. ping-interval=250ms,500ms,1s)")
        })?;
        let param: Param = name.trim().parse()?;
        let values: Vec<String> = values
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        if values.is_empty() {
            bail!("sweep {s:?}: no values");
        }
        let mut probe = SimConfig::default();
        for v in &values {
            param.apply(&mut probe, v)?;
        }
        Ok(Axis { param, values })
    }
}

/// One combination of swept values.
#[derive(Debug, Clone)]
pub struct Setting {
    /// All its values, e.g. `ping-interval=250ms ping-timeout=300ms`.
    pub label: String,
    /// The values of every axis but the last (empty with one axis): one line in the plot.
    pub group: String,
    /// The value of the last axis, e.g. `300ms`: the position on the plot's x axis.
    pub x: String,
    /// The configuration it runs.
    pub cfg: SimConfig,
}

/// Every combination of the axes' values applied to `base`, the last axis varying fastest.
pub fn settings(base: &SimConfig, axes: &[Axis]) -> anyhow::Result<Vec<Setting>> {
    let mut out = vec![Setting {
        label: String::new(),
        group: String::new(),
        x: String::new(),
        cfg: base.clone(),
    }];
    for axis in axes {
        let mut next = Vec::new();
        for s in &out {
            for v in &axis.values {
                let mut cfg = s.cfg.clone();
                axis.param.apply(&mut cfg, v)?;
                let part = format!("{}={v}", axis.param.name());
                let join = |a: &str, b: &str| {
                    if a.is_empty() {
                        b.to_string()
                    } else {
                        format!("{a} {b}")
                    }
                };
                next.push(Setting {
                    label: join(&s.label, &part),
                    group: s.label.clone(),
                    x: v.clone(),
                    cfg,
                });
            }
        }
        out = next;
    }
    Ok(out)
}

/// What one setting of a sweep did over its seeds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SettingSummary {
    /// The setting, e.g. `ping-interval=250ms`.
    pub setting: String,
    /// Its line in the plot (see [`Setting::group`]).
    #[serde(skip)]
    pub group: String,
    /// Its place on the plot's x axis (see [`Setting::x`]).
    #[serde(skip)]
    pub x: String,
    /// Seeds run.
    pub seeds: u64,
    /// Seeds with an invariant violation.
    pub violating_seeds: u64,
    /// Produced messages never delivered, over all seeds.
    pub lost: u64,
    /// Changes of reign per seed (more than the crash faults cause means flapping).
    pub failovers_per_seed: f64,
    /// Failover gap, median over every failover of every seed, ms.
    pub gap_p50_ms: f64,
    /// Failover gap, 99th percentile, ms.
    pub gap_p99_ms: f64,
    /// Longest failover gap, ms.
    pub gap_max_ms: f64,
    /// Duplicate deliveries per seed.
    pub duplicates_per_seed: f64,
    /// Most duplicates in one seed.
    pub duplicates_max: u64,
    /// Deliveries by two reigning nodes during partitions and holds, per seed.
    pub split_brain_per_seed: f64,
    /// Out-of-order first deliveries, over all seeds.
    pub reordered: u64,
}

/// The `q` quantile (0..=1) of `v` by the nearest-rank rule; 0 for an empty slice.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// Sums up one setting's results.
pub fn summarize(setting: &Setting, results: &[SimResult]) -> SettingSummary {
    SettingSummary {
        group: setting.group.clone(),
        x: setting.x.clone(),
        ..summarize_as(&setting.label, results)
    }
}

/// Sums up results under a plain label.
pub fn summarize_as(setting: &str, results: &[SimResult]) -> SettingSummary {
    let n = results.len().max(1) as f64;
    let gaps: Vec<f64> = results
        .iter()
        .flat_map(|r| r.failover_gaps_ms.iter().copied())
        .collect();
    SettingSummary {
        setting: setting.to_string(),
        group: String::new(),
        x: String::new(),
        seeds: results.len() as u64,
        violating_seeds: results.iter().filter(|r| !r.violations.is_empty()).count() as u64,
        lost: results.iter().map(|r| r.lost).sum(),
        failovers_per_seed: results.iter().map(|r| r.failovers as f64).sum::<f64>() / n,
        gap_p50_ms: quantile(&gaps, 0.5),
        gap_p99_ms: quantile(&gaps, 0.99),
        gap_max_ms: gaps.iter().copied().fold(0.0, f64::max),
        duplicates_per_seed: results.iter().map(|r| r.duplicates as f64).sum::<f64>() / n,
        duplicates_max: results.iter().map(|r| r.duplicates).max().unwrap_or(0),
        split_brain_per_seed: results.iter().map(|r| r.split_brain as f64).sum::<f64>() / n,
        reordered: results.iter().map(|r| r.reordered).sum(),
    }
}

/// The sweep as a Markdown table (it reads as plain text too).
pub fn render_sweep_table(rows: &[SettingSummary]) -> String {
    let mut s = String::from(
        "| setting | seeds | violating | lost | failovers/seed | gap p50 ms | gap p99 ms | gap max ms | dups/seed | dups max | split-brain/seed | reordered |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} | {:.0} | {:.0} | {:.0} | {:.1} | {} | {:.1} | {} |\n",
            r.setting,
            r.seeds,
            r.violating_seeds,
            r.lost,
            r.failovers_per_seed,
            r.gap_p50_ms,
            r.gap_p99_ms,
            r.gap_max_ms,
            r.duplicates_per_seed,
            r.duplicates_max,
            r.split_brain_per_seed,
            r.reordered
        ));
    }
    s
}

const BAR: RGBColor = RGBColor(31, 119, 180);
const SECOND: RGBColor = RGBColor(255, 127, 14);
const THIRD: RGBColor = RGBColor(214, 39, 40);

/// A histogram of `values` in bins of `width` starting at 0, as an SVG.
pub fn histogram_svg(
    path: &Path,
    title: &str,
    x_desc: &str,
    values: &[f64],
    width: f64,
) -> anyhow::Result<()> {
    let width = if width > 0.0 { width } else { 1.0 };
    let max = values.iter().copied().fold(0.0, f64::max);
    let bins = ((max / width).floor() as usize + 1).min(10_000);
    let mut counts = vec![0u64; bins];
    for v in values {
        let i = ((v / width) as usize).min(bins - 1);
        counts[i] += 1;
    }
    let ymax = counts.iter().copied().max().unwrap_or(0).max(1) as f64 * 1.1;
    let root = SVGBackend::new(path, (900, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{title} (n = {}, p50 {:.0}, p99 {:.0}, max {:.0})",
                values.len(),
                quantile(values, 0.5),
                quantile(values, 0.99),
                max
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..width * bins as f64, 0f64..ymax)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("count")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(counts.iter().enumerate().map(|(i, c)| {
            let x0 = i as f64 * width;
            Rectangle::new([(x0, 0.0), (x0 + width * 0.9, *c as f64)], BAR.filled())
        }))
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

const LINES: [RGBColor; 6] = [
    BAR,
    SECOND,
    THIRD,
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// The sweep as a picture, three panels side by side: failover gap p99, failovers per seed,
/// duplicates per seed. The last swept parameter is on the x axis; every combination of the
/// others is one line.
pub fn sweep_svg(path: &Path, x_name: &str, rows: &[SettingSummary]) -> anyhow::Result<()> {
    let mut xs: Vec<String> = Vec::new();
    let mut groups: Vec<String> = Vec::new();
    for r in rows {
        if !xs.contains(&r.x) {
            xs.push(r.x.clone());
        }
        if !groups.contains(&r.group) {
            groups.push(r.group.clone());
        }
    }
    let root = SVGBackend::new(path, (1500, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let panels = root.split_evenly((1, 3));
    type Get = fn(&SettingSummary) -> f64;
    let metrics: [(&str, &str, Get); 3] = [
        ("failover gap p99", "ms", |r| r.gap_p99_ms),
        ("failovers per seed", "failovers", |r| r.failovers_per_seed),
        ("duplicates per seed", "duplicates", |r| {
            r.duplicates_per_seed
        }),
    ];
    for (panel, (title, y_desc, get)) in panels.iter().zip(metrics) {
        let ymax = rows.iter().map(get).fold(0.0, f64::max).max(1.0) * 1.2;
        let labels = xs.clone();
        let label = move |x: &f64| -> String {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 18))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(-0.3f64..(xs.len() as f64 - 0.7), 0f64..ymax)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_labels(xs.len().max(2))
            .x_label_formatter(&label)
            .x_desc(x_name)
            .y_desc(y_desc)
            .y_label_formatter(&|v| {
                if ymax < 10.0 {
                    format!("{v:.1}")
                } else {
                    format!("{v:.0}")
                }
            })
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(plot_err)?;
        for (gi, g) in groups.iter().enumerate() {
            let colour = LINES[gi % LINES.len()];
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| &r.group == g)
                .filter_map(|r| {
                    xs.iter()
                        .position(|x| x == &r.x)
                        .map(|i| (i as f64, get(r)))
                })
                .collect();
            let series = chart
                .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))
                .map_err(plot_err)?;
            if !g.is_empty() {
                series.label(g.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 12, y)], colour.stroke_width(2))
                });
            }
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, colour.filled())))
                .map_err(plot_err)?;
        }
        if groups.iter().any(|g| !g.is_empty()) {
            draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        }
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Writes the distributions of one batch of seeds: `failover-gaps.svg` and `duplicates.svg`.
pub fn write_distributions(dir: &Path, results: &[SimResult]) -> anyhow::Result<()> {
    let gaps: Vec<f64> = results
        .iter()
        .flat_map(|r| r.failover_gaps_ms.iter().copied())
        .collect();
    histogram_svg(
        &dir.join("failover-gaps.svg"),
        "failover gap at the subscriber, every failover of every seed",
        "ms from the last delivery of one reign to the first of the next",
        &gaps,
        20.0,
    )?;
    let dups: Vec<f64> = results.iter().map(|r| r.duplicates as f64).collect();
    let most = dups.iter().copied().fold(0.0, f64::max);
    histogram_svg(
        &dir.join("duplicates.svg"),
        "duplicate deliveries per seed",
        "duplicates in one seed",
        &dups,
        (most / 60.0).ceil().max(1.0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_parse_and_multiply_into_settings() {
        let a: Axis = "ping-interval=250ms,1s".parse().unwrap();
        let b: Axis = "ack-timeout= 200ms , 500ms".parse().unwrap();
        let s = settings(&SimConfig::default(), &[a, b]).unwrap();
        let labels: Vec<&str> = s.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "ping-interval=250ms ack-timeout=200ms",
                "ping-interval=250ms ack-timeout=500ms",
                "ping-interval=1s ack-timeout=200ms",
                "ping-interval=1s ack-timeout=500ms"
            ]
        );
        assert_eq!(s[1].cfg.ping_interval, Duration::from_millis(250));
        assert_eq!(s[1].cfg.ack_timeout, Duration::from_millis(500));
        assert_eq!(s[2].cfg.ping_interval, Duration::from_secs(1));
        assert_eq!(
            (s[2].group.as_str(), s[2].x.as_str()),
            ("ping-interval=1s", "200ms")
        );
    }

    #[test]
    fn bad_sweeps_say_what_is_wrong() {
        let err = |s: &str| s.parse::<Axis>().unwrap_err().to_string();
        assert!(err("ping-interval").contains("NAME=V1,V2"));
        assert!(err("pong=1s").contains("unknown sweep parameter"));
        assert!(err("ping-interval=").contains("no values"));
        assert!(err("ping-interval=fast").contains("ping-interval=fast"));
        assert!(err("ack-timeout=0ms").contains("more than zero"));
        assert!(err("resend=many").contains("whole number"));
    }

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }

    #[test]
    fn a_summary_counts_gaps_duplicates_and_violations() {
        let r = |dups, gaps: Vec<f64>, v: &str| SimResult {
            duplicates: dups,
            failovers: gaps.len() as u64,
            failover_gaps_ms: gaps,
            violations: v.into(),
            ..SimResult::default()
        };
        let s = summarize_as(
            "x",
            &[r(2, vec![100.0, 300.0], ""), r(6, vec![200.0], "lost 1")],
        );
        assert_eq!(s.seeds, 2);
        assert_eq!(s.violating_seeds, 1);
        assert_eq!(s.duplicates_per_seed, 4.0);
        assert_eq!(s.duplicates_max, 6);
        assert_eq!(s.failovers_per_seed, 1.5);
        assert_eq!(s.gap_p50_ms, 200.0);
        assert_eq!(s.gap_max_ms, 300.0);
        let t = render_sweep_table(&[s]);
        assert!(t.contains("| x | 2 | 1 | 0 | 1.50 | 200 |"), "{t}");
    }

    #[test]
    fn pictures_are_written() {
        let dir = std::env::temp_dir().join(format!("simreport-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let r = SimResult {
            duplicates: 3,
            failover_gaps_ms: vec![120.0, 480.0, 510.0],
            ..SimResult::default()
        };
        write_distributions(&dir, &[r.clone(), r]).unwrap();
        let axis: Axis = "resend=1,5".parse().unwrap();
        let rows: Vec<SettingSummary> = settings(&SimConfig::default(), &[axis])
            .unwrap()
            .iter()
            .map(|s| summarize(s, &[]))
            .collect();
        sweep_svg(&dir.join("sweep.svg"), "resend", &rows).unwrap();
        for f in ["failover-gaps.svg", "duplicates.svg", "sweep.svg"] {
            let text = std::fs::read_to_string(dir.join(f)).unwrap();
            assert!(text.starts_with("<svg"), "{f}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
