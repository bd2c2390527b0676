//! Each node's metrics over a run: scraped from its `--metrics` endpoint while the run goes
//! (`harness::scrape`), kept as `metrics.csv` and drawn as `metrics.svg` beside the timeline.

use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::plot::{draw_fault, draw_marks, new_chart_from, plot_err, secs};
use super::RunInfo;

/// One scrape of one node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MetricsRow {
    /// When, µs since the Unix epoch.
    pub at_us: u64,
    /// `primary` or `backup`: the node by the role it was started in.
    pub node: String,
    /// 1 while the node is primary.
    pub primary: u64,
    /// Its epoch.
    pub epoch: u64,
    /// Its link (primary) or its having seen its primary (backup).
    pub link_up: u64,
    /// Messages in flight (primary).
    pub inflight: u64,
    /// Entries held (backup).
    pub held: u64,
    /// Counters since the node's (last) start.
    pub published: u64,
    /// `ACK`s sent.
    pub acknowledged: u64,
    /// Messages delivered.
    pub delivered: u64,
    /// Frames refused.
    pub refused: u64,
    /// Takeovers.
    pub takeovers: u64,
}

impl MetricsRow {
    /// A row from a scrape's text (`None` if it is not our metrics).
    pub fn parse(at_us: u64, node: &str, text: &str) -> Option<MetricsRow> {
        let v = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok())
        };
        Some(MetricsRow {
            at_us,
            node: node.to_string(),
            primary: v("edgepair_primary")?,
            epoch: v("edgepair_epoch")?,
            link_up: v("edgepair_link_up")?,
            inflight: v("edgepair_inflight")?,
            held: v("edgepair_held")?,
            published: v("edgepair_published_total")?,
            acknowledged: v("edgepair_acknowledged_total")?,
            delivered: v("edgepair_delivered_total")?,
            refused: v("edgepair_refused_total")?,
            takeovers: v("edgepair_takeovers_total")?,
        })
    }
}

const NODE_COLOURS: [RGBColor; 2] = [RGBColor(31, 119, 180), RGBColor(255, 127, 14)];

/// Writes `metrics.csv` and `metrics.svg` (when there is anything) into `dir`.
pub fn write_metrics(dir: &Path, rows: &[MetricsRow], info: &RunInfo) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_path(dir.join("metrics.csv"))?;
    for r in rows {
        w.serialize(r)?;
    }
    w.flush()?;
    // The picture covers the run (scrapes during the drain after it are in the CSV only).
    let shown: Vec<MetricsRow> = rows
        .iter()
        .filter(|r| r.at_us <= info.end_us)
        .cloned()
        .collect();
    if !shown.is_empty() {
        metrics_svg(&dir.join("metrics.svg"), &shown, info)?;
    }
    Ok(())
}

/// `pts` cut where two scrapes are further apart than a missed scrape or two.
pub(super) fn segments(pts: Vec<(f64, f64)>) -> Vec<Vec<(f64, f64)>> {
    let gap = 3.0 * crate::harness::SCRAPE_EVERY.as_secs_f64();
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    for p in pts {
        match out.last_mut() {
            Some(seg) if seg.last().is_some_and(|q| p.0 - q.0 <= gap) => seg.push(p),
            _ => out.push(vec![p]),
        }
    }
    out
}

/// Three panels over the run's time: each node's role (and epoch), its deliveries per second,
/// and what it has in flight or holds; faults as vertical lines.
fn metrics_svg(path: &Path, rows: &[MetricsRow], info: &RunInfo) -> anyhow::Result<()> {
    let xmax = secs(info.end_us, info.start_us).max(1.0);
    let xmin = rows
        .iter()
        .map(|r| secs(r.at_us, info.start_us))
        .fold(0.0f64, f64::min);
    let root = SVGBackend::new(path, (1000, 760)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let panels = root.split_evenly((3, 1));
    let nodes = ["primary", "backup"];
    let series = |node: &str, f: &dyn Fn(&MetricsRow) -> f64| -> Vec<(f64, f64)> {
        rows.iter()
            .filter(|r| r.node == node)
            .map(|r| (secs(r.at_us, info.start_us), f(r)))
            .collect()
    };
    // Deliveries per second between two scrapes of the same life (a restart starts again at 0).
    let rate = |node: &str| -> Vec<(f64, f64)> {
        let mine: Vec<&MetricsRow> = rows.iter().filter(|r| r.node == node).collect();
        mine.windows(2)
            .filter(|w| w[1].delivered >= w[0].delivered && w[1].at_us > w[0].at_us)
            .map(|w| {
                let dt = (w[1].at_us - w[0].at_us) as f64 / 1e6;
                (
                    secs(w[1].at_us, info.start_us),
                    (w[1].delivered - w[0].delivered) as f64 / dt,
                )
            })
            .collect()
    };
    let max_of =
        |pts: &[Vec<(f64, f64)>]| pts.iter().flatten().map(|p| p.1).fold(1.0f64, f64::max) * 1.15;
    type Panel<'x> = (&'x str, &'x str, Vec<Vec<(f64, f64)>>);
    let role: Vec<Vec<(f64, f64)>> = nodes
        .iter()
        .map(|n| series(n, &|r| r.epoch as f64 * r.primary as f64))
        .collect();
    let rates: Vec<Vec<(f64, f64)>> = nodes.iter().map(|n| rate(n)).collect();
    let work: Vec<Vec<(f64, f64)>> = nodes
        .iter()
        .map(|n| series(n, &|r| (r.inflight + r.held) as f64))
        .collect();
    let panel_data: [Panel<'_>; 3] = [
        (
            "reigns: the epoch while a node is primary (0 while backup)",
            "epoch",
            role,
        ),
        ("deliveries per second, per node", "msg/s", rates),
        (
            "in flight (primary) and held (backup), per node",
            "messages",
            work,
        ),
    ];
    for (area, (title, y_desc, data)) in panels.iter().zip(panel_data) {
        let ymax = max_of(&data);
        let mut chart = new_chart_from(area, title.to_string(), xmin, xmax, ymax, y_desc)?;
        if let Some(k) = info.kill_at_us {
            draw_fault(&mut chart, secs(k, info.start_us), ymax, &info.signal)?;
        }
        draw_marks(&mut chart, info, ymax)?;
        for (i, pts) in data.into_iter().enumerate() {
            let c = NODE_COLOURS[i];
            // A node that was down (killed, stopped) has no scrapes then: its line breaks.
            chart
                .draw_series(
                    segments(pts)
                        .into_iter()
                        .map(|seg| PathElement::new(seg, c.stroke_width(2))),
                )
                .map_err(plot_err)?
                .label(format!("node started as {}", nodes[i]))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 12, y)], c.stroke_width(2))
                });
        }
        super::plot::draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_reads_into_a_row_and_other_text_does_not() {
        let text = "edgepair_primary 1\nedgepair_epoch 2\nedgepair_link_up 0\n\
                    edgepair_inflight 3\nedgepair_held 0\nedgepair_published_total 10\n\
                    edgepair_acknowledged_total 9\nedgepair_delivered_total 7\n\
                    edgepair_refused_total 0\nedgepair_takeovers_total 1\n";
        let r = MetricsRow::parse(5, "backup", text).expect("row");
        assert_eq!(
            (r.primary, r.epoch, r.inflight, r.delivered, r.takeovers),
            (1, 2, 3, 7, 1)
        );
        assert!(MetricsRow::parse(5, "backup", "<html>").is_none());
    }
}
