//! `simulate`: many seeded fault schedules against the real node code in turmoil.
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use edgepair::compute::parse_duration;
use edgepair_lab::sim::report::{self as simreport, Axis};
use edgepair_lab::sim::{run_seed_traced, FaultKind, SimConfig, SimResult};

/// Runs seeded fault schedules in simulated time and checks the delivery invariants.
#[derive(Parser)]
#[command(name = "simulate", version)]
struct Cli {
    /// How many seeds to run (from `--first`).
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// First seed of the range.
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// Run only this seed and print its deliveries around any violation (a replay).
    #[arg(long)]
    seed: Option<u64>,
    /// Simulated publishing time per seed.
    #[arg(long, value_parser = parse_duration, default_value = "40s")]
    duration: Duration,
    /// Faults to draw from.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "crash,restart,partition,hold,latency,power,power-both"
    )]
    faults: Vec<FaultKind>,
    /// Both nodes' fsync policy (`always`, `batch`, `never`): what a power loss may take.
    #[arg(long, default_value_t = edgepair::log::Fsync::default())]
    fsync: edgepair::log::Fsync,
    /// Nodes without a disk (as without `--data-dir`): a crash loses a node's whole log.
    #[arg(long)]
    memory_only: bool,
    /// Both nodes' lease (`--lease`): no overlapping reigns, at a price in failover time.
    #[arg(long, value_parser = edgepair::cli::parse_lease)]
    lease: Option<Duration>,
    /// Three consumers share the topic in a group: no entry whose ack was confirmed is
    /// delivered to the group again, and every entry delivered is acknowledged.
    #[arg(long)]
    group: bool,
    /// Journal entries between snapshots of the groups (the journal before each is removed).
    #[arg(long, default_value_t = edgepair_lab::sim::SIM_JOURNAL_COMPACT)]
    journal_compact: u64,
    /// Backup's ping interval.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    ping_interval: Duration,
    /// How long a ping may go unanswered before the backup takes over.
    #[arg(long, value_parser = parse_duration, default_value = "300ms")]
    ping_timeout: Duration,
    /// Publisher's ack timeout before it switches brokers.
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    ack_timeout: Duration,
    /// Messages a publisher resends when it switches.
    #[arg(long, default_value_t = 5)]
    resend: usize,
    /// Vary a parameter: `ping-interval=250ms,500ms,1s`, `ping-timeout=…`, `ack-timeout=…` or
    /// `resend=…`. Repeat for more axes; every combination runs the same seeds.
    #[arg(long)]
    sweep: Vec<Axis>,
    /// Seeds run at once (each is its own single-threaded simulation).
    #[arg(long, default_value_t = default_jobs())]
    jobs: usize,
    /// Where `<timestamp>-sim/` goes.
    #[arg(long, default_value = "results")]
    out: std::path::PathBuf,
}

fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn row(r: &SimResult) {
    println!(
        "{:>6} {:>5} {:>4} {:>6} {:>5} {:>4} {:>5} {:>6} {:>8.0}  {}",
        r.seed,
        r.published,
        r.lost,
        r.lost_by_policy,
        r.duplicates,
        r.reordered,
        r.split_brain,
        r.stale,
        r.longest_gap_ms,
        r.faults
    );
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Node logs only when asked (RUST_LOG=info), e.g. to read the events around a violation.
    if let Ok(filter) = std::env::var("RUST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_timer(edgepair_lab::sim::SimTime)
            .try_init();
    }
    if cli.resend > edgepair::client::MAX_WINDOW {
        eprintln!(
            "simulate: --resend {} is more than the {} messages a publisher keeps",
            cli.resend,
            edgepair::client::MAX_WINDOW
        );
        return ExitCode::from(2);
    }
    if cli.memory_only
        && cli
            .faults
            .iter()
            .any(|f| matches!(f, FaultKind::Power | FaultKind::PowerBoth))
    {
        eprintln!(
            "simulate: --memory-only nodes have no disk to lose power on; give --faults without power and power-both"
        );
        return ExitCode::from(2);
    }
    let cfg = SimConfig {
        duration: cli.duration,
        faults: cli.faults.clone(),
        ping_interval: cli.ping_interval,
        ping_timeout: cli.ping_timeout,
        ack_timeout: cli.ack_timeout,
        resend: cli.resend,
        fsync: cli.fsync,
        memory_only: cli.memory_only,
        lease: cli.lease,
        group: cli.group,
        journal_compact: cli.journal_compact,
        ..SimConfig::default()
    };
    let dir = cli.out.join(format!(
        "{}-sim",
        edgepair_lab::harness::utc_stamp(edgepair::clock::now_us())
    ));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("simulate: cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    let code = if let Some(seed) = cli.seed {
        replay(&cfg, seed)
    } else if cli.sweep.is_empty() {
        batch(&cli, &cfg, &dir)
    } else {
        sweep(&cli, &cfg, &dir)
    };
    println!("written to {}", dir.display());
    code
}

fn header() {
    println!(
        "{:>6} {:>5} {:>4} {:>6} {:>5} {:>4} {:>5} {:>6} {:>8}  faults",
        "seed", "pub", "lost", "policy", "dups", "reord", "split", "stale", "gap ms"
    );
}

fn replay_command(cfg: &SimConfig, seed: u64) -> String {
    format!(
        "cargo run --release --bin simulate -- --seed {seed} --duration {}ms --faults {} --ping-interval {}ms --ping-timeout {}ms --ack-timeout {}ms --resend {} --fsync {}{}{}{}{}",
        cfg.duration.as_millis(),
        cfg.faults
            .iter()
            .filter_map(|f| f.to_possible_value().map(|v| v.get_name().to_string()))
            .collect::<Vec<_>>()
            .join(","),
        cfg.ping_interval.as_millis(),
        cfg.ping_timeout.as_millis(),
        cfg.ack_timeout.as_millis(),
        cfg.resend,
        cfg.fsync,
        if cfg.memory_only {
            " --memory-only"
        } else {
            ""
        },
        cfg.lease
            .map(|l| format!(" --lease {}ms", l.as_millis()))
            .unwrap_or_default(),
        if cfg.group { " --group" } else { "" },
        if cfg.journal_compact == edgepair_lab::sim::SIM_JOURNAL_COMPACT {
            String::new()
        } else {
            format!(" --journal-compact {}", cfg.journal_compact)
        }
    )
}

/// One seed, with every delivery listed when it violates an invariant.
fn replay(cfg: &SimConfig, seed: u64) -> ExitCode {
    header();
    let (r, deliveries, group) = run_seed_traced(seed, cfg);
    row(&r);
    if r.violations.is_empty() {
        return ExitCode::SUCCESS;
    }
    println!("        VIOLATION: {}", r.violations);
    println!("        replay: {}", replay_command(cfg, seed));
    for d in &deliveries {
        println!(
            "          t={:>9.3}s {:<7} seq {:>4} epoch {} {}",
            (d.received_at_us
                .saturating_sub(edgepair::clock::SIM_EPOCH_US)) as f64
                / 1e6,
            d.source,
            d.seq,
            d.epoch,
            if d.duplicate { "dup" } else { "" }
        );
    }
    for c in &group {
        println!(
            "          t={:>9.3}s group {:<7} seq {:>4} offset {:>4} attempt {} {} {}{}",
            (c.received_at_us
                .saturating_sub(edgepair::clock::SIM_EPOCH_US)) as f64
                / 1e6,
            c.source,
            c.seq,
            c.offset,
            c.attempt,
            c.consumer,
            c.outcome,
            if c.acked_at_us > 0 {
                format!(
                    " at {:.3}s",
                    c.acked_at_us.saturating_sub(edgepair::clock::SIM_EPOCH_US) as f64 / 1e6
                )
            } else {
                String::new()
            }
        );
    }
    ExitCode::FAILURE
}

fn seed_range(cli: &Cli) -> Vec<u64> {
    (cli.first..cli.first.saturating_add(cli.seeds)).collect()
}

/// A range of seeds: table, CSV, distributions.
fn batch(cli: &Cli, cfg: &SimConfig, dir: &std::path::Path) -> ExitCode {
    let seeds = seed_range(cli);
    let started = std::time::Instant::now();
    header();
    let mut bad = Vec::new();
    let results = simreport::run_seeds(&seeds, cfg, cli.jobs, |r| {
        row(r);
        if !r.violations.is_empty() {
            println!("        VIOLATION: {}", r.violations);
            println!("        replay: {}", replay_command(cfg, r.seed));
            bad.push(r.seed);
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let simulated = cli.duration.as_secs_f64() * seeds.len() as f64;
    let s = simreport::summarize_as("this run", &results);
    println!(
        "{} seed(s) in {secs:.1} s on {} thread(s) ({:.0}x real time); {} with violations{}",
        seeds.len(),
        cli.jobs,
        simulated / secs.max(1e-9),
        bad.len(),
        if bad.is_empty() {
            String::new()
        } else {
            format!(": {bad:?}")
        }
    );
    let power: usize = results
        .iter()
        .map(|r| r.faults.matches("power").count())
        .sum();
    println!(
        "fsync {}: {power} power loss(es); {} entries dropped unsynced (oldest {:.1} ms); acknowledged lost by policy {} in {} seed(s); acknowledged lost against the policy {}",
        cfg.fsync,
        results.iter().map(|r| r.power_dropped).sum::<u64>(),
        results
            .iter()
            .map(|r| r.power_oldest_unsynced_ms)
            .fold(0.0, f64::max),
        results.iter().map(|r| r.lost_by_policy).sum::<u64>(),
        results.iter().filter(|r| r.lost_by_policy > 0).count(),
        results
            .iter()
            .map(|r| r.lost_acked - r.lost_by_policy)
            .sum::<u64>(),
    );
    println!(
        "lost {}; failovers/seed {:.2}; failover gap p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; duplicates/seed {:.1}, max {}",
        s.lost, s.failovers_per_seed, s.gap_p50_ms, s.gap_p99_ms, s.gap_max_ms, s.duplicates_per_seed, s.duplicates_max
    );
    if let Err(e) = write_csv(&dir.join("simulation.csv"), &results) {
        eprintln!("simulate: {e}");
    }
    if let Err(e) = simreport::write_distributions(dir, &results) {
        eprintln!("simulate: {e}");
    }
    if bad.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Every combination of the swept values over the same seeds: table, CSV, plot.
fn sweep(cli: &Cli, cfg: &SimConfig, dir: &std::path::Path) -> ExitCode {
    let settings = match simreport::settings(cfg, &cli.sweep) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("simulate: {e}");
            return ExitCode::from(2);
        }
    };
    let seeds = seed_range(cli);
    let started = std::time::Instant::now();
    let mut rows = Vec::new();
    let mut all = Vec::new();
    for (i, setting) in settings.iter().enumerate() {
        let label = &setting.label;
        eprintln!(
            "[{}/{}] {label}: {} seed(s)…",
            i + 1,
            settings.len(),
            seeds.len()
        );
        let results = simreport::run_seeds(&seeds, &setting.cfg, cli.jobs, |r| {
            if !r.violations.is_empty() {
                eprintln!(
                    "      seed {}: {}\n      replay: {}",
                    r.seed,
                    r.violations,
                    replay_command(&setting.cfg, r.seed)
                );
            }
        });
        let s = simreport::summarize(setting, &results);
        eprintln!(
            "[{}/{}] {label}: gap p50 {:.0} ms, p99 {:.0} ms; {:.2} failovers/seed; {:.1} duplicates/seed; {} violating seed(s)",
            i + 1,
            settings.len(),
            s.gap_p50_ms,
            s.gap_p99_ms,
            s.failovers_per_seed,
            s.duplicates_per_seed,
            s.violating_seeds
        );
        rows.push(s);
        all.extend(results);
    }
    print!("{}", simreport::render_sweep_table(&rows));
    println!(
        "{} setting(s) × {} seed(s) in {:.1} s",
        settings.len(),
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
    let mut ok = true;
    if let Err(e) = write_csv(&dir.join("sweep.csv"), &rows) {
        eprintln!("simulate: {e}");
        ok = false;
    }
    let x_name = cli.sweep.last().map_or("", |a| a.param.name());
    if let Err(e) = simreport::sweep_svg(&dir.join("sweep.svg"), x_name, &rows) {
        eprintln!("simulate: {e}");
        ok = false;
    }
    if let Err(e) = std::fs::write(dir.join("sweep.md"), simreport::render_sweep_table(&rows)) {
        eprintln!("simulate: {e}");
        ok = false;
    }
    let violating: u64 = rows.iter().map(|r| r.violating_seeds).sum();
    if ok && violating == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn write_csv<T: serde::Serialize>(path: &std::path::Path, rows: &[T]) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_path(path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    for r in rows {
        w.serialize(r)?;
    }
    w.flush()?;
    Ok(())
}
