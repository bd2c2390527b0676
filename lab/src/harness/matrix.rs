//! The scenario matrix: every scenario, `--repeat` times, summed up in `matrix.csv`/`matrix.md`.

use std::time::Duration;

use tokio::time::Instant;

use super::*;
use edgepair::clock::now_us;
/// Runs every scenario (`--repeat` times each) and writes `matrix.csv` and `matrix.md` under
/// `<out>/<timestamp>/`, one sub-folder per run. Ok(true) when every run passed (no
/// acknowledged message lost, first deliveries in order), `partition-peers` aside (it is
/// reported, not judged).
pub async fn run_matrix(mut opts: HarnessOpts) -> anyhow::Result<bool> {
    if opts.kill_at == Duration::from_secs(30) && opts.after == Duration::from_secs(10) {
        opts.kill_at = Duration::from_secs(5);
        opts.after = Duration::from_secs(6);
    }
    let base = match &opts.out_dir {
        Some(d) => d.clone(),
        None => opts.out.join(format!("{}-matrix", utc_stamp(now_us()))),
    };
    std::fs::create_dir_all(&base)?;
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut all_ok = true;
    for sc in Scenario::ALL {
        for r in 1..=opts.repeat.max(1) {
            let mut o = opts.clone();
            o.scenario = sc;
            o.signal = None;
            o.port = 0;
            o.no_progress = true;
            o.out_dir = Some(base.join(if opts.repeat > 1 {
                format!("{}-{r}", sc.name())
            } else {
                sc.name().to_string()
            }));
            let out = run(o).await?;
            let a = &out.analysis;
            if sc != Scenario::PartitionPeers && !a.verdict_ok {
                all_ok = false;
            }
            rows.push(MatrixRow {
                scenario: sc.name().to_string(),
                run: r,
                verdict: if a.verdict_ok { "PASS" } else { "FAIL" }.to_string(),
                published: a.published,
                missing: a.missing.len() as u64,
                acked_lost: a.acked_lost.len() as u64,
                unacked_lost: a.unacked_lost.len() as u64,
                reordered: a.reordered,
                duplicates: a.duplicates,
                failover_gap_ms: a.failover_gap_ms,
                longest_silence_ms: a.longest_silence_ms,
                p99_ms: a.latency.p99_ms,
            });
        }
    }
    let mut w = csv::Writer::from_path(base.join("matrix.csv"))?;
    for r in &rows {
        w.serialize(r)?;
    }
    w.flush()?;
    let mut md = String::from(
        "| scenario | run | verdict | published | acked lost | unacked lost | reordered | duplicates | failover gap (ms) | longest silence (ms) | p99 latency (ms) |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.1} |\n",
            r.scenario,
            r.run,
            r.verdict,
            r.published,
            r.acked_lost,
            r.unacked_lost,
            r.reordered,
            r.duplicates,
            r.failover_gap_ms
                .map_or("-".to_string(), |g| format!("{g:.0}")),
            r.longest_silence_ms,
            r.p99_ms
        ));
    }
    std::fs::write(base.join("matrix.md"), &md)?;
    println!("\n{md}");
    println!(
        "matrix: {} runs in {:.0} s; written to {}",
        rows.len(),
        started.elapsed().as_secs_f64(),
        base.display()
    );
    Ok(all_ok)
}

/// One row of `matrix.csv`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MatrixRow {
    /// Scenario name.
    pub scenario: String,
    /// Run number within the scenario.
    pub run: usize,
    /// PASS or FAIL.
    pub verdict: String,
    /// Messages published.
    pub published: u64,
    /// Messages missing (acknowledged or not).
    pub missing: u64,
    /// Acknowledged messages never delivered (must be 0).
    pub acked_lost: u64,
    /// Unacknowledged messages never delivered (counted, not judged).
    pub unacked_lost: u64,
    /// Out-of-order first deliveries (must be 0).
    pub reordered: u64,
    /// Duplicate deliveries.
    pub duplicates: u64,
    /// Fault → first backup delivery.
    pub failover_gap_ms: Option<f64>,
    /// Longest silence.
    pub longest_silence_ms: f64,
    /// p99 end-to-end latency.
    pub p99_ms: f64,
}
