//! The `storebench` measurements: for each candidate, in rounds (A B C D, A B C D, ...):
//!
//! 1. recovery: a child process (this binary, hidden `child-write` subcommand) appends
//!    batches and prints the log length after each durable batch; once `entries` are
//!    acknowledged the parent SIGKILLs it by PID while it is still writing, then times
//!    `open()` plus reading back the last acknowledged entry, and checks (untimed) that every
//!    acknowledged entry is present and intact;
//! 2. size on disk of that log, closed after recovery (allocated blocks / entries);
//! 3. read: 100,000 entries from the middle offset, in reads of 1,000 (page cache warm);
//! 4. append with group commit on a fresh log: batches of 1, 64 and 1024, each durable
//!    before the next, for a fixed time each (only the time inside `append_batch` counts).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::fjall_log::FjallLog;
use super::redb_log::RedbLog;
use super::segment::SegmentLog;
use super::sqlite_log::SqliteLog;
use super::{make_batch, make_entry, Candidate, CANDIDATES};

/// Batch sizes for the group-commit append figure.
pub const BATCH_SIZES: [usize; 3] = [1, 64, 1024];
/// Entries read in the read figure.
pub const READ_COUNT: u64 = 100_000;
/// Entries per `read_from` call in the read figure.
const READ_CHUNK: usize = 1_000;

/// Options of the storage benchmark.
#[derive(clap::Args, Clone, Debug)]
pub struct StoreBenchOpts {
    /// A short run: 1 round, 200,000 entries for recovery, 1 s per append figure.
    #[arg(long)]
    pub quick: bool,
    /// Rounds; each runs every candidate once, in turn (default 3, quick 1).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Candidates to run, comma-separated (default: segment,redb,fjall,sqlite).
    #[arg(long, value_delimiter = ',')]
    pub candidates: Option<Vec<String>>,
    /// Entries acknowledged before the SIGKILL (default 1,000,000, quick 200,000).
    #[arg(long)]
    pub entries: Option<u64>,
    /// Seconds of appending per batch size (default 2, quick 1).
    #[arg(long)]
    pub append_secs: Option<f64>,
    /// Entries per batch written by the child in the recovery figure.
    #[arg(long, default_value_t = 1024)]
    pub child_batch: usize,
    /// Payload bytes per entry.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Where the logs are made (a fresh temporary folder inside it; default: the system's).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Folder for the CSV of every figure (`<UTC timestamp>.csv`).
    #[arg(long, default_value = "results/storebench")]
    pub out: PathBuf,
    /// Write no CSV.
    #[arg(long)]
    pub no_csv: bool,
}

/// Figures of one candidate in one round.
#[derive(Clone, Debug)]
pub struct Figures {
    /// Candidate name.
    pub candidate: String,
    /// Round, from 1.
    pub round: usize,
    /// Entries/s for each of [`BATCH_SIZES`].
    pub append: Vec<f64>,
    /// Entries/s reading from the middle offset.
    pub read: f64,
    /// Milliseconds of `open()` + reading back the last acknowledged entry.
    pub recovery_ms: f64,
    /// Entries acknowledged by the child before the kill.
    pub acked: u64,
    /// Entries found after recovery (acknowledged or not).
    pub recovered: u64,
    /// Every acknowledged entry is present and equal to what was written.
    pub all_acked_present: bool,
    /// Allocated bytes on disk per entry, closed after recovery.
    pub bytes_per_entry: f64,
}

/// Calls `$f::<C>(args)` for the candidate named `$name`.
macro_rules! dispatch {
    ($name:expr, $f:ident($($arg:expr),*)) => {
        match $name {
            n if n == SegmentLog::NAME => $f::<SegmentLog>($($arg),*),
            n if n == RedbLog::NAME => $f::<RedbLog>($($arg),*),
            n if n == FjallLog::NAME => $f::<FjallLog>($($arg),*),
            n if n == SqliteLog::NAME => $f::<SqliteLog>($($arg),*),
            other => bail!("unknown candidate {other:?} (known: {})", CANDIDATES.join(", ")),
        }
    };
}

/// Entry point of the hidden `child-write` subcommand: appends `batch`-sized batches until
/// the log holds `count` entries, printing the length after each durable batch.
pub fn child_write(
    candidate: &str,
    dir: &Path,
    batch: usize,
    payload: usize,
    count: u64,
) -> Result<()> {
    fn go<C: Candidate>(dir: &Path, batch: usize, payload: usize, count: u64) -> Result<()> {
        let mut log = C::open(dir)?;
        let mut out = std::io::stdout().lock();
        while log.len() < count {
            let n = batch.min((count - log.len()) as usize);
            log.append_batch(&make_batch(log.len(), n, payload))?;
            writeln!(out, "{}", log.len())?;
            out.flush()?;
        }
        Ok(())
    }
    dispatch!(candidate, go(dir, batch, payload, count))
}

struct Plan {
    entries: u64,
    append: Duration,
    child_batch: usize,
    payload: usize,
    exe: PathBuf,
}

/// Runs the benchmark and prints the table; returns every figure.
pub fn run(opts: StoreBenchOpts) -> Result<Vec<Figures>> {
    let rounds = opts.rounds.unwrap_or(if opts.quick { 1 } else { 3 });
    let entries = opts
        .entries
        .unwrap_or(if opts.quick { 200_000 } else { 1_000_000 });
    let append_secs = opts
        .append_secs
        .unwrap_or(if opts.quick { 1.0 } else { 2.0 });
    ensure!(entries >= 2, "--entries must be at least 2");
    let names: Vec<String> = opts
        .candidates
        .clone()
        .unwrap_or_else(|| CANDIDATES.iter().map(|s| s.to_string()).collect());
    for n in &names {
        ensure!(CANDIDATES.contains(&n.as_str()), "unknown candidate {n:?}");
    }
    let plan = Plan {
        entries,
        append: Duration::from_secs_f64(append_secs),
        child_batch: opts.child_batch.max(1),
        payload: opts.payload,
        exe: std::env::current_exe().context("find the storebench binary")?,
    };
    let parent = opts.dir.clone().unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new()
        .prefix("storebench-")
        .tempdir_in(&parent)
        .with_context(|| format!("temporary folder in {}", parent.display()))?;
    eprintln!(
        "storebench: {rounds} round(s) of {}, {entries} entries acknowledged before the kill, \
         {append_secs} s per append figure, payload {} B, logs in {}",
        names.join(" "),
        opts.payload,
        tmp.path().display()
    );
    let mut all = Vec::new();
    for round in 1..=rounds {
        for name in &names {
            let dir = tmp.path().join(format!("r{round}-{name}"));
            let f = dispatch!(name.as_str(), measure(&plan, &dir, name, round))?;
            eprintln!(
                "  round {round} {name:<8} append {:>9.0} {:>9.0} {:>9.0}/s  read {:>9.0}/s  \
                 recovery {:>7.1} ms ({}/{} acked present: {})  {:.1} B/entry",
                f.append[0],
                f.append[1],
                f.append[2],
                f.read,
                f.recovery_ms,
                f.recovered,
                f.acked,
                f.all_acked_present,
                f.bytes_per_entry
            );
            fs::remove_dir_all(&dir).ok();
            all.push(f);
        }
    }
    print!("{}", table(&names, &all, &opts, entries, append_secs));
    if !opts.no_csv {
        let path = write_csv(&opts.out, &all)?;
        eprintln!("storebench: figures in {}", path.display());
    }
    Ok(all)
}

fn measure<C: Candidate>(plan: &Plan, dir: &Path, name: &str, round: usize) -> Result<Figures> {
    // 1. Recovery after SIGKILL in the middle of a stream of batches.
    let logdir = dir.join("killed");
    let acked = write_and_kill(plan, &logdir, name)?;
    let t0 = Instant::now();
    let log = C::open(&logdir)?;
    let recovered = log.len();
    let last = log.read_from(acked - 1, 1)?;
    let recovery_ms = t0.elapsed().as_secs_f64() * 1e3;
    ensure!(
        last.first() == Some(&make_entry(acked - 1, plan.payload)),
        "{name}: last acknowledged entry {} missing or different after recovery",
        acked - 1
    );
    let mut all_acked_present = recovered >= acked;
    let mut at = 0u64;
    while all_acked_present && at < acked {
        let got = log.read_from(at, 4096)?;
        if got.is_empty() {
            all_acked_present = false;
        }
        for e in got {
            if e.offset >= acked {
                break;
            }
            if e != make_entry(at, plan.payload) {
                all_acked_present = false;
                break;
            }
            at += 1;
        }
    }
    // 3. Read from the middle offset (before closing, so the cache state is the same for all).
    let from = recovered / 2;
    let count = READ_COUNT.min(recovered - from);
    let t0 = Instant::now();
    let mut next = from;
    while next < from + count {
        let want = READ_CHUNK.min((from + count - next) as usize);
        let got = log.read_from(next, want)?;
        ensure!(
            got.len() == want && got.first().map(|e| e.offset) == Some(next),
            "{name}: short or misplaced read at {next}"
        );
        next += want as u64;
    }
    let read = count as f64 / t0.elapsed().as_secs_f64();
    // 2. Size on disk, closed after recovery.
    drop(log);
    let bytes_per_entry = du(&logdir)? as f64 / recovered as f64;
    fs::remove_dir_all(&logdir).ok();
    // 4. Group-commit appends on a fresh log.
    let mut log = C::open(&dir.join("append"))?;
    let mut append = Vec::new();
    for &b in &BATCH_SIZES {
        let (mut n, mut busy) = (0u64, Duration::ZERO);
        let wall = Instant::now();
        while wall.elapsed() < plan.append {
            let batch = make_batch(log.len(), b, plan.payload);
            let t = Instant::now();
            log.append_batch(&batch)?;
            busy += t.elapsed();
            n += b as u64;
        }
        append.push(n as f64 / busy.as_secs_f64());
    }
    Ok(Figures {
        candidate: name.to_string(),
        round,
        append,
        read,
        recovery_ms,
        acked,
        recovered,
        all_acked_present,
        bytes_per_entry,
    })
}

/// Starts the child writer, SIGKILLs it once `plan.entries` are acknowledged, returns the
/// last acknowledged length.
fn write_and_kill(plan: &Plan, dir: &Path, name: &str) -> Result<u64> {
    let mut child = Command::new(&plan.exe)
        .arg("child-write")
        .args(["--candidate", name, "--batch"])
        .arg(plan.child_batch.to_string())
        .arg("--payload")
        .arg(plan.payload.to_string())
        .arg("--count")
        // Room to go on writing after the target, so the kill lands mid-stream.
        .arg((plan.entries * 2).to_string())
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .context("start the child writer")?;
    let pid = child.id();
    let Some(stdout) = child.stdout.take() else {
        bail!("child writer has no stdout");
    };
    let mut lines = BufReader::new(stdout).lines();
    let mut acked = 0u64;
    let mut killed = false;
    for line in lines.by_ref() {
        acked = line?
            .trim()
            .parse()
            .context("child writer printed a non-number")?;
        if acked >= plan.entries {
            // SAFETY: kill(2) on the PID of our own child, which has not been waited for.
            let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            ensure!(rc == 0, "kill {pid}: {}", std::io::Error::last_os_error());
            killed = true;
            break;
        }
    }
    let status = child.wait()?;
    // Batches acknowledged between our read and the kill are still in the pipe.
    for line in lines {
        match line {
            Ok(l) => acked = acked.max(l.trim().parse().unwrap_or(acked)),
            Err(_) => break,
        }
    }
    ensure!(
        killed,
        "child writer ended ({status}) after {acked} entries, before the kill"
    );
    Ok(acked)
}

/// Allocated bytes of every file under `dir`.
fn du(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for de in fs::read_dir(dir)? {
        let de = de?;
        let md = de.metadata()?;
        if md.is_dir() {
            total += du(&de.path())?;
        } else {
            total += md.blocks() * 512;
        }
    }
    Ok(total)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn cell(v: &[f64], decimals: usize) -> String {
    let m = median(v.to_vec());
    if v.len() < 2 {
        return format!("{m:.decimals$}");
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{m:.decimals$} ({lo:.decimals$}–{hi:.decimals$})")
}

fn table(
    names: &[String],
    all: &[Figures],
    opts: &StoreBenchOpts,
    entries: u64,
    secs: f64,
) -> String {
    let rounds = all.iter().map(|f| f.round).max().unwrap_or(0);
    let mut s = format!(
        "\nstorebench: {rounds} round(s), median (min–max) over rounds; payload {} B; \
         recovery after SIGKILL at ≥{entries} acknowledged entries (child batches of {}); \
         append {secs} s per batch size\n\n",
        opts.payload, opts.child_batch
    );
    s += "| candidate | append b=1 (entries/s) | append b=64 | append b=1024 | read 100k from middle (entries/s) | recovery (ms) | acked entries present | bytes/entry on disk |\n";
    s += "|---|---|---|---|---|---|---|---|\n";
    let mut medians = Vec::new();
    for n in names {
        let fs_: Vec<&Figures> = all.iter().filter(|f| &f.candidate == n).collect();
        let col = |g: &dyn Fn(&Figures) -> f64| fs_.iter().map(|f| g(f)).collect::<Vec<f64>>();
        let app: Vec<Vec<f64>> = (0..BATCH_SIZES.len())
            .map(|i| col(&|f| f.append[i]))
            .collect();
        let present = fs_.iter().filter(|f| f.all_acked_present).count();
        s += &format!(
            "| {n} | {} | {} | {} | {} | {} | {present}/{} runs | {} |\n",
            cell(&app[0], 0),
            cell(&app[1], 0),
            cell(&app[2], 0),
            cell(&col(&|f| f.read), 0),
            cell(&col(&|f| f.recovery_ms), 1),
            fs_.len(),
            cell(&col(&|f| f.bytes_per_entry), 1),
        );
        medians.push((
            n.clone(),
            [
                median(app[0].clone()),
                median(app[1].clone()),
                median(app[2].clone()),
                median(col(&|f| f.read)),
                median(col(&|f| f.recovery_ms)),
                median(col(&|f| f.bytes_per_entry)),
            ],
        ));
    }
    if let Some((base, b)) = medians.first().cloned() {
        s += &format!(
            "\nRatios to {base} (medians; >1 means more throughput, more ms, more bytes):\n\n"
        );
        s += "| candidate | append b=1 | b=64 | b=1024 | read | recovery ms | bytes/entry |\n";
        s += "|---|---|---|---|---|---|---|\n";
        for (n, m) in &medians {
            let r: Vec<String> = m
                .iter()
                .zip(b.iter())
                .map(|(x, y)| format!("{:.2}", x / y))
                .collect();
            s += &format!("| {n} | {} |\n", r.join(" | "));
        }
    }
    s
}

fn write_csv(out: &Path, all: &[Figures]) -> Result<PathBuf> {
    fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let path = out.join(format!(
        "{}.csv",
        crate::harness::utc_stamp(edgepair::clock::now_us())
    ));
    let mut w = csv::Writer::from_path(&path)?;
    w.write_record(["round", "candidate", "metric", "value"])?;
    for f in all {
        let mut rows: Vec<(String, f64)> = BATCH_SIZES
            .iter()
            .zip(&f.append)
            .map(|(b, v)| (format!("append_b{b}_entries_per_s"), *v))
            .collect();
        rows.extend([
            ("read_entries_per_s".to_string(), f.read),
            ("recovery_ms".to_string(), f.recovery_ms),
            ("acked".to_string(), f.acked as f64),
            ("recovered".to_string(), f.recovered as f64),
            (
                "all_acked_present".to_string(),
                f64::from(u8::from(f.all_acked_present)),
            ),
            ("bytes_per_entry".to_string(), f.bytes_per_entry),
        ]);
        for (metric, v) in rows {
            w.write_record([
                f.round.to_string(),
                f.candidate.clone(),
                metric,
                v.to_string(),
            ])?;
        }
    }
    w.flush()?;
    Ok(path)
}
