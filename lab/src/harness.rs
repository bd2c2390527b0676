//! The failover harness: one command that runs the seed's kill test unattended and judges it.
//!
//! It starts the real binaries as child processes (primary, backup, subscriber, test publisher),
//! waits until each is ready (brokers answer `STATUS`, the subscriber says it is subscribed to
//! both), kills the primary with the chosen signal at the chosen time, keeps publishing, stops the
//! publisher (which still collects its outstanding `ACK`s), lets the subscriber drain, and then
//! analyses the subscriber's CSV with [`crate::report`]. No process outlives the harness: every
//! child is killed by its PID on success, on failure and on Ctrl-C.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::Framed;

use crate::proxy::{self, Fault};
use crate::report;
use edgepair::clock::now_us;
use edgepair::compute::{parse_duration, ComputeRange};
use edgepair::net::Net;
use edgepair::protocol::{Frame, FrameCodec, Role};

/// Signal used to fail the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KillSignal {
    /// SIGKILL: a crash. Sockets close at once.
    #[value(name = "KILL", alias = "kill")]
    Kill,
    /// SIGTERM: a clean stop.
    #[value(name = "TERM", alias = "term")]
    Term,
    /// SIGSTOP: a hang. Sockets stay open, nothing answers. The harness resumes and then kills
    /// the process at the end of the run.
    #[value(name = "STOP", alias = "stop")]
    Stop,
}

impl KillSignal {
    fn number(self) -> i32 {
        match self {
            KillSignal::Kill => libc::SIGKILL,
            KillSignal::Term => libc::SIGTERM,
            KillSignal::Stop => libc::SIGSTOP,
        }
    }

    /// Name as shown in reports.
    pub fn name(self) -> &'static str {
        match self {
            KillSignal::Kill => "SIGKILL",
            KillSignal::Term => "SIGTERM",
            KillSignal::Stop => "SIGSTOP",
        }
    }
}

/// The fault a harness run injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// SIGKILL the primary (the seed's test).
    KillPrimary,
    /// SIGTERM the primary.
    TermPrimary,
    /// SIGSTOP the primary for `--hang-for`, then SIGCONT: it must not deliver in a stale epoch.
    HangPrimary,
    /// SIGKILL the backup: the primary runs degraded and loses nothing.
    KillBackup,
    /// SIGKILL the primary, restart it after `--restart-after`: it must rejoin as backup.
    RestartPrimary,
    /// Blackhole the primary↔backup link for `--fault-for` (both may serve: reported as is).
    PartitionPeers,
    /// Add `--delay` each way on the primary↔backup link for `--fault-for`.
    SlowLink,
}

impl Scenario {
    /// Every scenario, in the order the matrix runs them.
    pub const ALL: [Scenario; 7] = [
        Scenario::KillPrimary,
        Scenario::TermPrimary,
        Scenario::HangPrimary,
        Scenario::KillBackup,
        Scenario::RestartPrimary,
        Scenario::PartitionPeers,
        Scenario::SlowLink,
    ];

    /// Name as given on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::KillPrimary => "kill-primary",
            Scenario::TermPrimary => "term-primary",
            Scenario::HangPrimary => "hang-primary",
            Scenario::KillBackup => "kill-backup",
            Scenario::RestartPrimary => "restart-primary",
            Scenario::PartitionPeers => "partition-peers",
            Scenario::SlowLink => "slow-link",
        }
    }

    fn uses_proxies(self) -> bool {
        matches!(self, Scenario::PartitionPeers | Scenario::SlowLink)
    }
}

/// Options of a harness run; defaults are the seed's scenario.
#[derive(Debug, Clone, Args)]
pub struct HarnessOpts {
    /// When to fail the primary, counted from the first message.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub kill_at: Duration,
    /// How long to keep publishing after the kill.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub after: Duration,
    /// Messages per second of the test publisher.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// What goes wrong at `--kill-at` (see README). `--signal` picks among the primary faults.
    #[arg(long, value_enum, default_value_t = Scenario::KillPrimary)]
    pub scenario: Scenario,
    /// Signal that fails the primary: KILL (crash), TERM (clean stop) or STOP (hang; resumed
    /// after `--hang-for`). Shorthand for `--scenario kill-primary|term-primary|hang-primary`.
    #[arg(long, value_enum)]
    pub signal: Option<KillSignal>,
    /// How long a hung primary stays stopped before SIGCONT.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    pub hang_for: Duration,
    /// How long after its kill a node is restarted (`restart-primary`, chaos).
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub restart_after: Duration,
    /// How long a network fault lasts (`partition-peers`, `slow-link`).
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    pub fault_for: Duration,
    /// Delay added each way by `slow-link`.
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    pub delay: Duration,
    /// Compute time per message on the brokers, ms (`MIN..MAX`, a number, or `0`).
    #[arg(long, default_value = "50..150")]
    pub compute: ComputeRange,
    /// Seed for the brokers' compute draws (the backup gets seed + 1).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Topic to publish on.
    #[arg(long, default_value = "topicC")]
    pub topic: String,
    /// Port of the primary; the backup gets the next one. If either is taken the harness moves
    /// to the next free pair and says so. 0 picks any free ports.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Folder under which `<UTC timestamp>/` and the `latest` link are made.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// Write into exactly this folder instead of `<out>/<timestamp>/`.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Folder holding the primary/backup/subscriber/test-publisher binaries (default: the
    /// harness's own folder).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// No live progress line.
    #[arg(long)]
    pub no_progress: bool,
    /// Run every scenario one after the other (each `--repeat` times) and write `matrix.csv`
    /// and `matrix.md`. Unless `--kill-at`/`--after` are given, each run uses 5 s + 6 s.
    #[arg(long)]
    pub matrix: bool,
    /// Matrix: runs per scenario.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Chaos mode: `--cycles` random self-healing faults against whichever node is active,
    /// one every `--cycle`, reproducible from `--seed`.
    #[arg(long)]
    pub chaos: bool,
    /// Chaos: number of faults.
    #[arg(long, default_value_t = 10)]
    pub cycles: usize,
    /// Chaos: time between two faults.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub cycle: Duration,
}

/// What a harness run produced.
#[derive(Debug)]
pub struct Outcome {
    /// The analysis of the subscriber's deliveries.
    pub analysis: report::Analysis,
    /// Where the files were written.
    pub dir: PathBuf,
    /// Chaos mode: what each cycle did.
    pub chaos: Vec<ChaosEvent>,
}

/// Live counters fed by the children's output.
#[derive(Debug, Default)]
struct Counters {
    acked: AtomicU64,
    by_primary: AtomicU64,
    by_backup: AtomicU64,
    duplicates: AtomicU64,
    subscribed: AtomicU64,
    published: AtomicU64,
    /// Lines in which a broker said it runs without a backup (or lost its role).
    events: std::sync::Mutex<Vec<String>>,
}

/// A child process killed by PID when dropped, so nothing outlives the harness.
struct Proc {
    name: &'static str,
    child: Child,
    stopped: bool,
    /// The tasks copying its output; awaited after it exits so no last line is missed.
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Proc {
    fn pid(&self) -> Option<i32> {
        self.child.id().map(|p| p as i32)
    }

    fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) with a PID we spawned and still own (not yet reaped).
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }

    /// Asks the process to stop (SIGTERM) and waits up to `grace`, then kills it.
    async fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        if self.stopped {
            self.signal(libc::SIGCONT);
        }
        self.signal(libc::SIGTERM);
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(st)) => {
                for r in self.readers.drain(..) {
                    let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
                }
                Some(st)
            }
            _ => {
                tracing::warn!("{} did not stop within {grace:?}: killing it", self.name);
                let _ = self.child.kill().await;
                None
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if self.stopped {
                self.signal(libc::SIGCONT);
            }
            let _ = self.child.start_kill();
        }
    }
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Picks the primary and backup ports: the requested pair, else the next free pair.
fn pick_ports(base: u16) -> anyhow::Result<(u16, u16)> {
    if base == 0 {
        let a = std::net::TcpListener::bind("127.0.0.1:0")?;
        let b = std::net::TcpListener::bind("127.0.0.1:0")?;
        return Ok((a.local_addr()?.port(), b.local_addr()?.port()));
    }
    let mut p = base;
    while p < u16::MAX - 1 {
        if port_free(p) && port_free(p + 1) {
            if p != base {
                println!(
                    "ports {base}/{} are in use: using {p}/{} instead",
                    base + 1,
                    p + 1
                );
            }
            return Ok((p, p + 1));
        }
        p += 2;
    }
    bail!("no free pair of ports at or above {base}")
}

/// UTC timestamp for folder names, e.g. `20261124T120501Z`, without a date crate.
pub fn utc_stamp(us: u64) -> String {
    let secs = (us / 1_000_000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Asks a broker for its role and link state.
async fn status(addr: &str) -> Option<(Role, String)> {
    status_full(addr).await.map(|(r, l, _)| (r, l))
}

/// Asks a broker for its `STATUS`, epoch included.
async fn status_full(addr: &str) -> Option<(Role, String, u64)> {
    let s = Net::Tokio
        .connect(addr, Duration::from_millis(300))
        .await
        .ok()?;
    let mut f = Framed::new(s, FrameCodec::default());
    f.send(Frame::StatusQuery).await.ok()?;
    match tokio::time::timeout(Duration::from_millis(500), f.next()).await {
        Ok(Some(Ok(Frame::Status {
            role, link, epoch, ..
        }))) => Some((role, link, epoch)),
        _ => None,
    }
}

/// Waits until `ready` holds, checking the children are still alive; fails after `limit`.
async fn wait_until<F, Fut>(
    what: &str,
    limit: Duration,
    procs: &mut [Proc],
    mut ready: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if ready().await {
            return Ok(());
        }
        for p in procs.iter_mut() {
            if let Ok(Some(st)) = p.child.try_wait() {
                bail!(
                    "{} exited ({st}) while waiting for {what}: see {}.log",
                    p.name,
                    p.name
                );
            }
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Spawns a binary with its stdout and stderr copied line by line to `<dir>/<name>.log`, and
/// each line also handed to `on_line` (with `true` for stdout).
fn spawn(
    bin_dir: &Path,
    name: &'static str,
    args: &[String],
    dir: &Path,
    lines: mpsc::UnboundedSender<(&'static str, bool, String)>,
) -> anyhow::Result<Proc> {
    let path = bin_dir.join(name);
    let mut child = Command::new(&path)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", path.display()))?;
    // Appended, so a restarted node's log follows its earlier life in one file.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))?;
    let log = Arc::new(std::sync::Mutex::new(std::io::BufWriter::new(log)));
    let out = child.stdout.take();
    let err = child.stderr.take();
    let mut readers = Vec::new();
    for (is_out, pipe) in [
        (
            true,
            out.map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ),
        (
            false,
            err.map(|e| Box::new(e) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ),
    ] {
        let Some(pipe) = pipe else { continue };
        let log = log.clone();
        let lines = lines.clone();
        readers.push(tokio::spawn(async move {
            let mut r = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = r.next_line().await {
                if let Ok(mut l) = log.lock() {
                    use std::io::Write;
                    let _ = writeln!(l, "{line}");
                    let _ = l.flush();
                }
                let _ = lines.send((name, is_out, line));
            }
        }));
    }
    Ok(Proc {
        name,
        child,
        stopped: false,
        readers,
    })
}

/// Counts what the children print, for the progress line and for readiness.
fn watch_lines(
    mut rx: mpsc::UnboundedReceiver<(&'static str, bool, String)>,
    c: Arc<Counters>,
    takeover_us: Arc<AtomicU64>,
) {
    tokio::spawn(async move {
        while let Some((name, is_out, line)) = rx.recv().await {
            match (name, is_out) {
                ("subscriber", true) => {
                    if line.starts_with("[PRIMARY]") {
                        c.by_primary.fetch_add(1, Ordering::Relaxed);
                    } else if line.starts_with("[BACKUP]") {
                        c.by_backup.fetch_add(1, Ordering::Relaxed);
                    }
                    if line.ends_with("(duplicate)") {
                        c.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                }
                ("subscriber", false) if line.contains("subscribed to") => {
                    c.subscribed.fetch_add(1, Ordering::Relaxed);
                }
                ("test-publisher", true) => {
                    if let Some(rest) = line.strip_prefix("ACK ") {
                        if rest
                            .split(' ')
                            .next()
                            .and_then(|n| n.parse::<u64>().ok())
                            .is_some()
                        {
                            c.acked.fetch_add(1, Ordering::Relaxed);
                        }
                    } else if let Some(rest) = line.strip_prefix("published ") {
                        if let Some(n) = rest.split(',').next().and_then(|n| n.trim().parse().ok())
                        {
                            c.published.store(n, Ordering::Relaxed);
                        }
                    }
                }
                ("primary" | "backup", false)
                    if line.contains("running degraded")
                        || line.contains("STEP DOWN")
                        || line.contains("TAKEOVER") =>
                {
                    if let Ok(mut ev) = c.events.lock() {
                        // Keep the message, not the timestamp and level prefix.
                        let msg = line
                            .split_once("  ")
                            .map_or(line.as_str(), |(_, m)| m.trim_start());
                        let msg = msg.split_once(' ').map_or(msg, |(_, m)| m);
                        ev.push(format!("{name}: {msg}"));
                    }
                    if name == "backup" && line.contains("TAKEOVER") {
                        let _ = takeover_us.compare_exchange(
                            0,
                            now_us(),
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                }
                _ => {}
            }
        }
    });
}

/// One step of a fault plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Send a signal to node 0 (started as primary) or 1 (started as backup).
    Signal(usize, KillSignal),
    /// Resume a stopped node.
    Resume(usize),
    /// Start a killed node again with its original command line.
    Restart(usize),
    /// Set the fault of both peer-link proxies.
    Link(Fault),
    /// A chaos fault, aimed when it fires at whichever node is then active (or standing by).
    Chaos(ChaosFault),
}

/// The faults chaos mode draws from. Each heals itself: a killed node is restarted after
/// `--restart-after`, a stopped one resumed after `--hang-for`, a link fault lifted after
/// `--fault-for`, so the pair must survive fault after fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChaosFault {
    /// SIGKILL the active node, restart it later.
    KillActive,
    /// SIGTERM the active node, restart it later.
    TermActive,
    /// SIGSTOP the active node, SIGCONT later.
    HangActive,
    /// SIGKILL the standby node, restart it later.
    KillStandby,
    /// Blackhole the peer link for a while.
    Partition,
    /// Delay the peer link for a while.
    SlowLink,
}

impl ChaosFault {
    const ALL: [ChaosFault; 6] = [
        ChaosFault::KillActive,
        ChaosFault::TermActive,
        ChaosFault::HangActive,
        ChaosFault::KillStandby,
        ChaosFault::Partition,
        ChaosFault::SlowLink,
    ];

    /// Name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            ChaosFault::KillActive => "kill-active",
            ChaosFault::TermActive => "term-active",
            ChaosFault::HangActive => "hang-active",
            ChaosFault::KillStandby => "kill-standby",
            ChaosFault::Partition => "partition-peers",
            ChaosFault::SlowLink => "slow-link",
        }
    }
}

/// One chaos fault as it happened, for `chaos.csv`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChaosEvent {
    /// Cycle number, from 1.
    pub cycle: usize,
    /// When, µs since the Unix epoch.
    pub at_us: u64,
    /// Seconds since the first message.
    pub at_s: f64,
    /// The fault.
    pub fault: &'static str,
    /// Port label of the node hit (`primary` = the port the primary started on), or `link`.
    pub target: &'static str,
    /// Port label of the active node when the fault hit.
    pub active_before: &'static str,
    /// Fault → first delivery from the other node, when the active node was hit.
    pub failover_gap_ms: Option<f64>,
    /// Longest silence the subscriber saw from the fault to the next fault.
    pub longest_silence_ms: f64,
    /// Deliveries in that window.
    pub delivered: u64,
}

/// A reproducible chaos plan: `cycles` faults, one per `cycle` period, drawn from `seed`.
fn chaos_plan(opts: &HarnessOpts, seed: u64) -> Vec<(Duration, Action)> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..opts.cycles)
        .map(|c| {
            let jitter = Duration::from_millis(rng.gen_range(0..500));
            let f = ChaosFault::ALL[rng.gen_range(0..ChaosFault::ALL.len())];
            (
                opts.kill_at + opts.cycle * c as u32 + jitter,
                Action::Chaos(f),
            )
        })
        .collect()
}

/// The fault plan of a scenario: what to do, when (from the first message).
fn plan(opts: &HarnessOpts, scenario: Scenario) -> Vec<(Duration, Action)> {
    let t = opts.kill_at;
    match scenario {
        Scenario::KillPrimary => vec![(t, Action::Signal(0, KillSignal::Kill))],
        Scenario::TermPrimary => vec![(t, Action::Signal(0, KillSignal::Term))],
        Scenario::HangPrimary => vec![
            (t, Action::Signal(0, KillSignal::Stop)),
            (t + opts.hang_for, Action::Resume(0)),
        ],
        Scenario::KillBackup => vec![(t, Action::Signal(1, KillSignal::Kill))],
        Scenario::RestartPrimary => vec![
            (t, Action::Signal(0, KillSignal::Kill)),
            (t + opts.restart_after, Action::Restart(0)),
        ],
        Scenario::PartitionPeers => vec![
            (t, Action::Link(Fault::Blackhole)),
            (t + opts.fault_for, Action::Link(Fault::Pass)),
        ],
        Scenario::SlowLink => vec![
            (t, Action::Link(Fault::Delay(opts.delay))),
            (t + opts.fault_for, Action::Link(Fault::Pass)),
        ],
    }
}

/// The scenario a run uses: `--signal` overrides the primary-fault scenarios.
pub fn effective_scenario(opts: &HarnessOpts) -> Scenario {
    match (opts.signal, opts.scenario) {
        (
            Some(KillSignal::Kill),
            Scenario::KillPrimary | Scenario::TermPrimary | Scenario::HangPrimary,
        ) => Scenario::KillPrimary,
        (
            Some(KillSignal::Term),
            Scenario::KillPrimary | Scenario::TermPrimary | Scenario::HangPrimary,
        ) => Scenario::TermPrimary,
        (
            Some(KillSignal::Stop),
            Scenario::KillPrimary | Scenario::TermPrimary | Scenario::HangPrimary,
        ) => Scenario::HangPrimary,
        (_, s) => s,
    }
}

/// Runs the whole scenario and writes the report. The returned analysis says whether anything
/// was missing; the caller turns that into the exit status.
pub async fn run(opts: HarnessOpts) -> anyhow::Result<Outcome> {
    if !(opts.rate.is_finite() && opts.rate > 0.0) {
        bail!("--rate must be a positive number of messages per second");
    }
    let scenario = effective_scenario(&opts);
    let bin_dir = match &opts.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("harness binary has no folder")?
            .to_path_buf(),
    };
    for b in ["primary", "backup", "subscriber", "test-publisher"] {
        if !bin_dir.join(b).exists() {
            bail!(
                "{} not found in {} (build with `cargo build --release --workspace --bins`)",
                b,
                bin_dir.display()
            );
        }
    }
    let started_us = now_us();
    let dir = match &opts.out_dir {
        Some(d) => d.clone(),
        None => opts.out.join(utc_stamp(started_us)),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if opts.out_dir.is_none() {
        let latest = opts.out.join("latest");
        let _ = std::fs::remove_file(&latest);
        #[cfg(unix)]
        if let Some(name) = dir.file_name() {
            let _ = std::os::unix::fs::symlink(name, &latest);
        }
    }
    let (pp, bp) = pick_ports(opts.port)?;
    let primary = format!("127.0.0.1:{pp}");
    let backup = format!("127.0.0.1:{bp}");
    let publisher_id = format!("harness-{}", utc_stamp(started_us));
    let chaos_seed = opts.seed.unwrap_or(started_us);
    let (total, mut faults) = if opts.chaos {
        (
            opts.kill_at + opts.cycle * opts.cycles as u32 + opts.after,
            chaos_plan(&opts, chaos_seed),
        )
    } else {
        (opts.kill_at + opts.after, plan(&opts, scenario))
    };
    let mut chaos_events: Vec<ChaosEvent> = Vec::new();
    let label = ["primary", "backup"];
    println!(
        "failover test '{}': primary {primary}, backup {backup}, topic {}, {} msg/s, fault at {:?}, {:?} after; writing {}",
        if opts.chaos { format!("chaos, {} cycles, seed {chaos_seed}", opts.cycles) } else { scenario.name().to_string() },
        opts.topic,
        opts.rate,
        opts.kill_at,
        opts.after,
        dir.display()
    );

    // Peer links go through fault proxies when the scenario needs them.
    let stop_proxies = tokio_util::sync::CancellationToken::new();
    let _stop_proxies_guard = stop_proxies.clone().drop_guard();
    let mut proxies = Vec::new();
    let (primary_sees_backup, backup_sees_primary) = if opts.chaos || scenario.uses_proxies() {
        let to_backup = proxy::start(
            Net::Tokio,
            "127.0.0.1:0",
            backup.clone(),
            stop_proxies.clone(),
        )
        .await?;
        let to_primary = proxy::start(
            Net::Tokio,
            "127.0.0.1:0",
            primary.clone(),
            stop_proxies.clone(),
        )
        .await?;
        let addrs = (to_backup.addr.clone(), to_primary.addr.clone());
        proxies.push(to_backup);
        proxies.push(to_primary);
        addrs
    } else {
        (backup.clone(), primary.clone())
    };

    let (ltx, lrx) = mpsc::unbounded_channel();
    let counters = Arc::new(Counters::default());
    let takeover_us = Arc::new(AtomicU64::new(0));
    watch_lines(lrx, counters.clone(), takeover_us.clone());

    let broker_args = |port: u16, peer: &str, seed_offset: u64| {
        let mut a = vec![
            port.to_string(),
            peer.to_string(),
            "--compute".into(),
            opts.compute.to_string(),
        ];
        if let Some(s) = opts.seed {
            a.push("--seed".into());
            a.push((s + seed_offset).to_string());
        }
        a
    };
    let node_args = [
        broker_args(pp, &primary_sees_backup, 0),
        broker_args(bp, &backup_sees_primary, 1),
    ];
    let node_bins = ["primary", "backup"];
    let mut procs: Vec<Proc> = Vec::new();
    procs.push(spawn(
        &bin_dir,
        "primary",
        &node_args[0],
        &dir,
        ltx.clone(),
    )?);
    procs.push(spawn(&bin_dir, "backup", &node_args[1], &dir, ltx.clone())?);
    let (pa, ba) = (primary.clone(), backup.clone());
    wait_until(
        "the primary and backup to pair up",
        Duration::from_secs(10),
        &mut procs,
        || {
            let (pa, ba) = (pa.clone(), ba.clone());
            async move {
                matches!(status(&pa).await, Some((Role::Primary, l)) if l == "up")
                    && matches!(status(&ba).await, Some((Role::Backup, l)) if l == "armed")
            }
        },
    )
    .await?;
    let csv_path = dir.join("deliveries.csv");
    let sargs = vec![
        opts.topic.clone(),
        primary.clone(),
        backup.clone(),
        "--csv".into(),
        csv_path.display().to_string(),
    ];
    procs.push(spawn(&bin_dir, "subscriber", &sargs, &dir, ltx.clone())?);
    let c = counters.clone();
    wait_until(
        "the subscriber to reach both brokers",
        Duration::from_secs(10),
        &mut procs,
        || {
            let n = c.subscribed.load(Ordering::Relaxed);
            async move { n >= 2 }
        },
    )
    .await?;
    let targs = vec![
        opts.topic.clone(),
        primary.clone(),
        backup.clone(),
        "--rate".into(),
        opts.rate.to_string(),
        "--id".into(),
        publisher_id.clone(),
        "--give-up".into(),
        "5s".into(),
    ];
    let run_start_us = now_us();
    let run_start = Instant::now();
    procs.push(spawn(
        &bin_dir,
        "test-publisher",
        &targs,
        &dir,
        ltx.clone(),
    )?);

    // Progress until the end of the publishing window; the faults happen on the way.
    let progress = Progress::new(total, opts.no_progress);
    let mut fault_us = None;
    let mut next = 0;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        let elapsed = run_start.elapsed();
        while next < faults.len() && elapsed >= faults[next].0 {
            let (_, mut action) = faults[next];
            next += 1;
            fault_us.get_or_insert_with(now_us);
            let mut chaos_note = String::new();
            if let Action::Chaos(kind) = action {
                // Aim at whichever node is active now, and schedule the healing step.
                let active = active_node(&primary, &backup).await;
                let standby = 1 - active;
                let heal_at = |d: Duration| elapsed + d;
                let (act, target, heal) = match kind {
                    ChaosFault::KillActive => (
                        Action::Signal(active, KillSignal::Kill),
                        label[active],
                        Some((heal_at(opts.restart_after), Action::Restart(active))),
                    ),
                    ChaosFault::TermActive => (
                        Action::Signal(active, KillSignal::Term),
                        label[active],
                        Some((heal_at(opts.restart_after), Action::Restart(active))),
                    ),
                    ChaosFault::HangActive => (
                        Action::Signal(active, KillSignal::Stop),
                        label[active],
                        Some((heal_at(opts.hang_for), Action::Resume(active))),
                    ),
                    ChaosFault::KillStandby => (
                        Action::Signal(standby, KillSignal::Kill),
                        label[standby],
                        Some((heal_at(opts.restart_after), Action::Restart(standby))),
                    ),
                    ChaosFault::Partition => (
                        Action::Link(Fault::Blackhole),
                        "link",
                        Some((heal_at(opts.fault_for), Action::Link(Fault::Pass))),
                    ),
                    ChaosFault::SlowLink => (
                        Action::Link(Fault::Delay(opts.delay)),
                        "link",
                        Some((heal_at(opts.fault_for), Action::Link(Fault::Pass))),
                    ),
                };
                if let Some(h) = heal {
                    let pos = faults[next..]
                        .iter()
                        .position(|f| f.0 > h.0)
                        .map_or(faults.len(), |p| next + p);
                    faults.insert(pos, h);
                }
                chaos_events.push(ChaosEvent {
                    cycle: chaos_events.len() + 1,
                    at_us: now_us(),
                    at_s: elapsed.as_secs_f64(),
                    fault: kind.name(),
                    target,
                    active_before: label[active],
                    failover_gap_ms: None,
                    longest_silence_ms: 0.0,
                    delivered: 0,
                });
                chaos_note = format!("chaos cycle {}: {} → ", chaos_events.len(), kind.name());
                action = act;
            }
            let what = match action {
                Action::Signal(i, sig) => {
                    procs[i].signal(sig.number());
                    procs[i].stopped = sig == KillSignal::Stop;
                    format!(
                        "{} sent to the {} (pid {})",
                        sig.name(),
                        node_bins[i],
                        procs[i].pid().unwrap_or(0)
                    )
                }
                Action::Resume(i) => {
                    procs[i].signal(libc::SIGCONT);
                    procs[i].stopped = false;
                    format!("SIGCONT sent to the {}", node_bins[i])
                }
                Action::Restart(i) => {
                    if let Ok(None) = procs[i].child.try_wait() {
                        // Still running (a TERM not yet honoured): make sure it is gone.
                        let _ = procs[i].child.kill().await;
                    }
                    let _ = procs[i].child.wait().await;
                    procs[i] = spawn(&bin_dir, node_bins[i], &node_args[i], &dir, ltx.clone())?;
                    format!(
                        "{} restarted (pid {})",
                        node_bins[i],
                        procs[i].pid().unwrap_or(0)
                    )
                }
                Action::Link(f) => {
                    for p in &proxies {
                        p.set(f);
                    }
                    format!("primary<->backup link: {f:?}")
                }
                Action::Chaos(_) => String::new(),
            };
            progress.println(&format!(
                "{:>6.2}s  {chaos_note}{what}",
                elapsed.as_secs_f64()
            ));
        }
        if elapsed >= total {
            break;
        }
        progress.update(elapsed, &counters, opts.kill_at);
        if let Ok(Some(st)) = procs[3].child.try_wait() {
            progress.finish();
            bail!("test-publisher exited early ({st}): see test-publisher.log");
        }
        let wake = faults
            .get(next)
            .map(|f| run_start + f.0)
            .unwrap_or(run_start + total);
        tokio::select! {
            _ = &mut ctrl_c => {
                progress.finish();
                for p in procs.iter_mut().rev() {
                    p.stop(Duration::from_secs(2)).await;
                }
                bail!("interrupted: all processes stopped; partial output in {}", dir.display());
            }
            _ = tick.tick() => {}
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
    progress.finish();
    drop(ltx);
    for p in &proxies {
        p.set(Fault::Pass);
    }

    // Stop publishing; the publisher still collects outstanding ACKs before it exits.
    let pub_status = procs[3].stop(Duration::from_secs(10)).await;
    // The publisher's own summary line says how many it produced; read it from its log, which
    // is complete once its output readers are done.
    let published = std::fs::read_to_string(dir.join("test-publisher.log"))
        .ok()
        .and_then(|log| {
            log.lines().rev().find_map(|l| {
                l.strip_prefix("published ")?
                    .split(',')
                    .next()?
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or_else(|| counters.published.load(Ordering::Relaxed));
    // Drain: wait until the subscriber has seen every published sequence number or has been
    // quiet for two seconds.
    let drain_deadline = Instant::now() + Duration::from_secs(10);
    let mut last_total = u64::MAX;
    let mut quiet_since = Instant::now();
    loop {
        let seen = distinct_seqs(&csv_path, &publisher_id);
        if published > 0 && seen >= published {
            break;
        }
        let delivered = counters.by_primary.load(Ordering::Relaxed)
            + counters.by_backup.load(Ordering::Relaxed);
        if delivered != last_total {
            last_total = delivered;
            quiet_since = Instant::now();
        }
        if quiet_since.elapsed() > Duration::from_secs(2) || Instant::now() > drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    procs[2].stop(Duration::from_secs(5)).await;
    let end_us = now_us();
    for i in [1, 0] {
        procs[i].stop(Duration::from_secs(3)).await;
    }
    if !pub_status.is_some_and(|s| s.success()) {
        println!(
            "note: the test publisher reported unacknowledged messages (see test-publisher.log)"
        );
    }

    let deliveries = report::read_deliveries(&csv_path)?;
    let info = report::RunInfo {
        published,
        publisher: Some(publisher_id),
        start_us: run_start_us,
        end_us,
        // A chaos run has many faults: no single failover gap, per-cycle figures instead.
        kill_at_us: if opts.chaos { None } else { fault_us },
        publish_period_us: (1e6 / opts.rate) as u64,
        scenario: if opts.chaos {
            format!("chaos ({} cycles, seed {chaos_seed})", opts.cycles)
        } else {
            scenario.name().to_string()
        },
        marks: chaos_events
            .iter()
            .map(|e| (e.at_us, e.fault.to_string()))
            .collect(),
        signal: match faults.first().map(|f| f.1) {
            Some(Action::Signal(_, s)) => s.name().to_string(),
            Some(Action::Link(f)) => format!("{f:?}"),
            _ => String::new(),
        },
    };
    let analysis = report::analyze(&deliveries, &info);
    report::write_reports(&dir, &analysis, &deliveries, &info)?;
    let mut table = report::render_table(&analysis);
    if opts.chaos {
        chaos_cycles(
            &mut chaos_events,
            &deliveries,
            info.publisher.as_deref(),
            end_us,
        );
        let mut w = csv::Writer::from_path(dir.join("chaos.csv"))?;
        for e in &chaos_events {
            w.serialize(e)?;
        }
        w.flush()?;
        table.push_str(&render_chaos(&chaos_events));
    }
    std::fs::write(dir.join("table.txt"), &table)?;
    println!("{table}");
    let takeover = takeover_us.load(Ordering::Relaxed);
    if let Ok(ev) = counters.events.lock() {
        if !ev.is_empty() {
            let mut notes =
                String::from("\nrole changes and degraded periods (from the brokers' logs):\n");
            for e in ev.iter() {
                notes.push_str(&format!("  {e}\n"));
            }
            print!("{notes}");
            let mut t = std::fs::read_to_string(dir.join("table.txt")).unwrap_or_default();
            t.push_str(&notes);
            std::fs::write(dir.join("table.txt"), t)?;
        }
    }
    if let (Some(k), true) = (fault_us, takeover > 0) {
        println!(
            "backup logged TAKEOVER {:.0} ms after the fault",
            (takeover.saturating_sub(k)) as f64 / 1000.0,
        );
    }
    println!("report: {}", dir.display());
    Ok(Outcome {
        analysis,
        dir,
        chaos: chaos_events,
    })
}

/// Index (0 = started as primary, 1 = started as backup) of the node that is primary now: the
/// one answering `STATUS` as primary in the highest epoch; 0 if neither answers.
async fn active_node(primary: &str, backup: &str) -> usize {
    let epoch = |s: Option<(Role, String, u64)>| match s {
        Some((Role::Primary, _, e)) => Some(e),
        _ => None,
    };
    let (a, b) = (
        epoch(status_full(primary).await),
        epoch(status_full(backup).await),
    );
    match (a, b) {
        (Some(x), Some(y)) if y > x => 1,
        (None, Some(_)) => 1,
        _ => 0,
    }
}

/// Fills each chaos cycle's figures from the deliveries: the failover gap when the active node
/// was hit, and the longest silence and delivery count until the next fault.
fn chaos_cycles(
    events: &mut [ChaosEvent],
    all: &[report::Delivery],
    publisher: Option<&str>,
    end_us: u64,
) {
    let mut rows: Vec<&report::Delivery> = all
        .iter()
        .filter(|d| publisher.is_none_or(|p| d.publisher == p))
        .collect();
    rows.sort_by_key(|d| d.received_at_us);
    let bounds: Vec<u64> = events.iter().map(|e| e.at_us).chain([end_us]).collect();
    for (i, e) in events.iter_mut().enumerate() {
        let (from, to) = (bounds[i], bounds[i + 1]);
        let window: Vec<&&report::Delivery> = rows
            .iter()
            .filter(|d| d.received_at_us >= from && d.received_at_us < to)
            .collect();
        e.delivered = window.len() as u64;
        let mut last = from;
        let mut longest = 0;
        for d in &window {
            longest = longest.max(d.received_at_us - last);
            last = d.received_at_us;
        }
        if i + 1 < bounds.len() - 1 {
            // Silence running into the next fault counts; after the last one the run just ends.
            longest = longest.max(to.saturating_sub(last));
        }
        e.longest_silence_ms = longest as f64 / 1000.0;
        if e.target == e.active_before {
            e.failover_gap_ms = window
                .iter()
                .find(|d| d.source != e.active_before)
                .map(|d| (d.received_at_us - from) as f64 / 1000.0);
        }
    }
}

/// The per-cycle table printed after a chaos run.
fn render_chaos(events: &[ChaosEvent]) -> String {
    let mut s = String::from(
        "\n  cycle  at (s)  fault            target   failover gap  longest silence  delivered\n",
    );
    for e in events {
        s.push_str(&format!(
            "  {:>5}  {:>6.1}  {:<16} {:<8} {:>12}  {:>12.0} ms  {:>9}\n",
            e.cycle,
            e.at_s,
            e.fault,
            e.target,
            e.failover_gap_ms
                .map_or("-".to_string(), |g| format!("{g:.0} ms")),
            e.longest_silence_ms,
            e.delivered
        ));
    }
    s
}

/// Runs every scenario (`--repeat` times each) and writes `matrix.csv` and `matrix.md` under
/// `<out>/<timestamp>/`, one sub-folder per run. Ok(true) when nothing was missing anywhere
/// except where a partition is allowed to lose (it is reported, not judged).
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
        "| scenario | run | verdict | published | missing | duplicates | failover gap (ms) | longest silence (ms) | p99 latency (ms) |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.1} |\n",
            r.scenario,
            r.run,
            r.verdict,
            r.published,
            r.missing,
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
    /// Messages missing.
    pub missing: u64,
    /// Duplicate deliveries.
    pub duplicates: u64,
    /// Fault → first backup delivery.
    pub failover_gap_ms: Option<f64>,
    /// Longest silence.
    pub longest_silence_ms: f64,
    /// p99 end-to-end latency.
    pub p99_ms: f64,
}

/// Distinct sequence numbers of `publisher` in the CSV so far (0 if it cannot be read yet).
fn distinct_seqs(path: &Path, publisher: &str) -> u64 {
    let Ok(mut r) = csv::Reader::from_path(path) else {
        return 0;
    };
    let mut seen = BTreeMap::new();
    for row in r.deserialize::<report::Delivery>().flatten() {
        if row.publisher == publisher {
            seen.insert(row.seq, ());
        }
    }
    seen.len() as u64
}

/// The live progress line: a bar on a terminal, a plain line every 5 s otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: Duration,
    last_plain: std::sync::Mutex<Duration>,
    quiet: bool,
}

impl Progress {
    fn new(total: Duration, quiet: bool) -> Self {
        use std::io::IsTerminal;
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(total.as_millis() as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:30.cyan/blue} {msg}") {
                b.set_style(style);
            }
            b
        });
        Progress {
            bar,
            total,
            last_plain: std::sync::Mutex::new(Duration::ZERO),
            quiet,
        }
    }

    fn update(&self, elapsed: Duration, c: &Counters, kill_at: Duration) {
        let msg = format!(
            "{:>5.1}/{:.0}s  acked {}  delivered {} (primary {}, backup {}, dup {})  {}",
            elapsed.as_secs_f64(),
            self.total.as_secs_f64(),
            c.acked.load(Ordering::Relaxed),
            c.by_primary.load(Ordering::Relaxed) + c.by_backup.load(Ordering::Relaxed),
            c.by_primary.load(Ordering::Relaxed),
            c.by_backup.load(Ordering::Relaxed),
            c.duplicates.load(Ordering::Relaxed),
            if elapsed < kill_at {
                format!("fault in {:.1}s", (kill_at - elapsed).as_secs_f64())
            } else {
                "fault injected".to_string()
            }
        );
        match &self.bar {
            Some(b) => {
                b.set_position(elapsed.as_millis() as u64);
                b.set_message(msg);
            }
            None if !self.quiet => {
                if let Ok(mut last) = self.last_plain.lock() {
                    if elapsed >= *last + Duration::from_secs(5) || *last == Duration::ZERO {
                        *last = elapsed.max(Duration::from_millis(1));
                        println!("{msg}");
                    }
                }
            }
            None => {}
        }
    }

    fn println(&self, s: &str) {
        match &self.bar {
            Some(b) => b.println(s),
            None => println!("{s}"),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamp_formats_known_instants() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        // 2026-11-24T12:05:01Z
        assert_eq!(utc_stamp(1_795_521_901_000_000), "20261124T120501Z");
    }
}
