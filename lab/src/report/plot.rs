//! The pictures of a harness run (`timeline.svg`, `latency.svg`) and the house style of every
//! chart the lab draws (legend, fault marks, plot errors).

use std::path::Path;

use anyhow::anyhow;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::{Analysis, Delivery, RunInfo};

const PRIMARY_COLOUR: RGBColor = RGBColor(31, 119, 180);
const BACKUP_COLOUR: RGBColor = RGBColor(255, 127, 14);
const DUP_COLOUR: RGBColor = RGBColor(214, 39, 40);
const FAULT_COLOUR: RGBColor = RGBColor(120, 120, 120);

pub(super) fn secs(us: u64, start: u64) -> f64 {
    (us as f64 - start as f64) / 1e6
}

pub(crate) fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plotting failed: {e}")
}

pub(crate) type Chart<'a, 'b> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A chart with the house style: caption, time on x (from 0), `y_desc` on y, no minor grid.
fn new_chart<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, Shift>,
    title: String,
    xmax: f64,
    ymax: f64,
    y_desc: &str,
) -> anyhow::Result<Chart<'a, 'b>> {
    new_chart_from(root, title, 0.0, xmax, ymax, y_desc)
}

/// [`new_chart`] with time on x from `xmin` (the metrics start before the first message).
pub(super) fn new_chart_from<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, Shift>,
    title: String,
    xmin: f64,
    xmax: f64,
    ymax: f64,
    y_desc: &str,
) -> anyhow::Result<Chart<'a, 'b>> {
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(xmin..xmax, 0f64..ymax)
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
pub(super) fn draw_fault(
    chart: &mut Chart<'_, '_>,
    kx: f64,
    ymax: f64,
    signal: &str,
) -> anyhow::Result<()> {
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
pub(super) fn draw_marks<DB: DrawingBackend>(
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
        .label(match info.marks.as_slice() {
            [(at, what)] => format!("{what} at {:.1} s", secs(*at, info.start_us)),
            _ => format!("faults ({n})"),
        })
        .legend(|(x, y)| {
            PathElement::new(
                vec![(x, y), (x + 12, y)],
                DUP_COLOUR.mix(0.45).stroke_width(2),
            )
        });
    Ok(())
}

pub(super) fn timeline_svg(
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
        "{} — {}: {} published, {} missing ({} acknowledged), {} duplicates, failover gap {}",
        info.scenario,
        if a.verdict_ok { "PASS" } else { "FAIL" },
        a.published,
        a.missing.len(),
        a.acked_lost.len(),
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

pub(super) fn latency_svg(path: &Path, rows: &[&Delivery], info: &RunInfo) -> anyhow::Result<()> {
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
