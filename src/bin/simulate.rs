//! `simulate`: many seeded fault schedules against the real node code in turmoil.
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use edgepair::compute::parse_duration;
use edgepair::sim::{run_seed, FaultKind, SimConfig};

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
        default_value = "crash,restart,partition,hold,latency"
    )]
    faults: Vec<FaultKind>,
    /// Where `<timestamp>-sim/simulation.csv` goes.
    #[arg(long, default_value = "results")]
    out: std::path::PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Node logs only when asked (RUST_LOG=info), e.g. to read the events around a violation.
    if let Ok(filter) = std::env::var("RUST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_timer(edgepair::sim::SimTime)
            .try_init();
    }
    let cfg = SimConfig {
        duration: cli.duration,
        faults: cli.faults.clone(),
        ..SimConfig::default()
    };
    let seeds: Vec<u64> = match cli.seed {
        Some(s) => vec![s],
        None => (cli.first..cli.first + cli.seeds).collect(),
    };
    let started = std::time::Instant::now();
    let mut results = Vec::new();
    let mut bad = Vec::new();
    println!(
        "{:>6} {:>5} {:>4} {:>5} {:>4} {:>5} {:>6} {:>8}  faults",
        "seed", "pub", "lost", "dups", "reord", "split", "stale", "gap ms"
    );
    for s in &seeds {
        let (r, deliveries) = run_seed(*s, &cfg);
        println!(
            "{:>6} {:>5} {:>4} {:>5} {:>4} {:>5} {:>6} {:>8.0}  {}",
            r.seed,
            r.published,
            r.lost,
            r.duplicates,
            r.reordered,
            r.split_brain,
            r.stale,
            r.longest_gap_ms,
            r.faults
        );
        if !r.violations.is_empty() {
            println!("        VIOLATION: {}", r.violations);
            println!(
                "        replay: cargo run --release --bin simulate -- --seed {} --duration {}s --faults {}",
                r.seed,
                cli.duration.as_secs(),
                cli.faults.iter().map(|f| format!("{f:?}").to_lowercase()).collect::<Vec<_>>().join(",")
            );
            if cli.seed.is_some() {
                for d in &deliveries {
                    println!(
                        "          t={:>9.3}s {:<7} seq {:>4} epoch {} {}",
                        (d.received_at_us - edgepair::clock::SIM_EPOCH_US) as f64 / 1e6,
                        d.source,
                        d.seq,
                        d.epoch,
                        if d.duplicate { "dup" } else { "" }
                    );
                }
            }
            bad.push(r.seed);
        }
        results.push(r);
    }
    let secs = started.elapsed().as_secs_f64();
    let simulated = cli.duration.as_secs_f64() * seeds.len() as f64;
    println!(
        "{} seed(s) in {secs:.1} s ({:.0}x real time); {} with violations{}",
        seeds.len(),
        simulated / secs.max(1e-9),
        bad.len(),
        if bad.is_empty() {
            String::new()
        } else {
            format!(": {bad:?}")
        }
    );
    let dir = cli.out.join(format!(
        "{}-sim",
        edgepair::harness::utc_stamp(edgepair::clock::now_us())
    ));
    if std::fs::create_dir_all(&dir).is_ok() {
        if let Ok(mut w) = csv::Writer::from_path(dir.join("simulation.csv")) {
            for r in &results {
                let _ = w.serialize(r);
            }
            let _ = w.flush();
            println!("written to {}", dir.join("simulation.csv").display());
        }
    }
    if bad.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
