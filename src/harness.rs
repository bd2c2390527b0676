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

use crate::clock::now_us;
use crate::compute::{parse_duration, ComputeRange};
use crate::net::Net;
use crate::protocol::{Frame, FrameCodec, Role};
use crate::proxy::{self, Fault};
use crate::report;

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
}

/// What a harness run produced.
#[derive(Debug)]
pub struct Outcome {
    /// The analysis of the subscriber's deliveries.
    pub analysis: report::Analysis,
    /// Where the files were written.
    pub dir: PathBuf,
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
}

/// A child process killed by PID when dropped, so nothing outlives the harness.
struct Proc {
    name: &'static str,
    child: Child,
    stopped: bool,
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
            Ok(Ok(st)) => Some(st),
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
fn utc_stamp(us: u64) -> String {
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

/// Asks a broker for its `STATUS`.
async fn status(addr: &str) -> Option<(Role, String)> {
    let s = Net::Tokio
        .connect(addr, Duration::from_millis(300))
        .await
        .ok()?;
    let mut f = Framed::new(s, FrameCodec::default());
    f.send(Frame::StatusQuery).await.ok()?;
    match tokio::time::timeout(Duration::from_millis(500), f.next()).await {
        Ok(Some(Ok(Frame::Status { role, link, .. }))) => Some((role, link)),
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
        tokio::spawn(async move {
            let mut r = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = r.next_line().await {
                if let Ok(mut l) = log.lock() {
                    use std::io::Write;
                    let _ = writeln!(l, "{line}");
                    let _ = l.flush();
                }
                let _ = lines.send((name, is_out, line));
            }
        });
    }
    Ok(Proc {
        name,
        child,
        stopped: false,
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
                ("backup", false) if line.contains("TAKEOVER") => {
                    let _ = takeover_us.compare_exchange(
                        0,
                        now_us(),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
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
                "{} not found in {} (build with `cargo build --release --bins`)",
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
    let total = opts.kill_at + opts.after;
    let faults = plan(&opts, scenario);
    println!(
        "failover test '{}': primary {primary}, backup {backup}, topic {}, {} msg/s, fault at {:?}, {:?} after; writing {}",
        scenario.name(),
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
    let (primary_sees_backup, backup_sees_primary) = if scenario.uses_proxies() {
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
            let (_, action) = faults[next];
            next += 1;
            fault_us.get_or_insert_with(now_us);
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
            };
            progress.println(&format!("{:>6.2}s  {what}", elapsed.as_secs_f64()));
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
    let published = counters.published.load(Ordering::Relaxed);
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
        kill_at_us: fault_us,
        publish_period_us: (1e6 / opts.rate) as u64,
        scenario: scenario.name().to_string(),
        signal: match faults.first().map(|f| f.1) {
            Some(Action::Signal(_, s)) => s.name().to_string(),
            Some(Action::Link(f)) => format!("{f:?}"),
            _ => String::new(),
        },
    };
    let analysis = report::analyze(&deliveries, &info);
    report::write_reports(&dir, &analysis, &deliveries, &info)?;
    let table = report::render_table(&analysis);
    std::fs::write(dir.join("table.txt"), &table)?;
    println!("{table}");
    let takeover = takeover_us.load(Ordering::Relaxed);
    if let (Some(k), true) = (fault_us, takeover > 0) {
        println!(
            "backup logged TAKEOVER {:.0} ms after the fault",
            (takeover.saturating_sub(k)) as f64 / 1000.0,
        );
    }
    println!("report: {}", dir.display());
    Ok(Outcome { analysis, dir })
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
                format!("kill in {:.1}s", (kill_at - elapsed).as_secs_f64())
            } else {
                "primary down".to_string()
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
