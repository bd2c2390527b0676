//! Child processes, free ports, readiness and one-frame requests: the one copy of each that the
//! harness, the bench and the lab's tests use. A child is killed by its PID when its guard drops,
//! ports are probed on 127.0.0.1 only, and every wait for a peer has a timeout.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::Framed;

use edgepair::net::Net;
use edgepair::protocol::{Frame, FrameCodec, Role};

/// A doubling wait between two attempts, capped: what every poll loop of the lab sleeps on, so
/// a ready peer is seen within milliseconds and a slow one is not hammered.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `first`, doubles after each wait, never waits longer than `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff { next: first, max }
    }

    /// The wait readiness polls use: 10 ms, doubling to 100 ms.
    pub fn poll() -> Self {
        Backoff::new(Duration::from_millis(10), Duration::from_millis(100))
    }

    /// Sleeps for the current wait and doubles it.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.max);
    }
}

/// A port nothing listens on right now (bound to port 0 on 127.0.0.1, then released).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Picks the primary and backup ports: the requested pair, else the next free pair (said on
/// stdout); `0` picks any two free ports.
pub fn pick_ports(base: u16) -> anyhow::Result<(u16, u16)> {
    if base == 0 {
        return Ok((free_port()?, free_port()?));
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

/// Connects to `addr`, sends one frame and awaits one answer, giving up after `limit` for the
/// connect and again for the answer: how the lab asks a broker anything.
pub async fn request(addr: &str, frame: Frame, limit: Duration) -> Option<Frame> {
    let s = Net::Tokio.connect(addr, limit).await.ok()?;
    let mut f = Framed::new(s, FrameCodec::default());
    f.send(frame).await.ok()?;
    match tokio::time::timeout(limit, f.next()).await {
        Ok(Some(Ok(answer))) => Some(answer),
        _ => None,
    }
}

/// Like [`request`] for a question answered by several frames: collects them up to and with
/// the one `last` says ends the answer (an error if the connection ends before it).
pub async fn request_until(
    addr: &str,
    frame: Frame,
    last: impl Fn(&Frame) -> bool,
) -> anyhow::Result<Vec<Frame>> {
    let s = Net::Tokio.connect(addr, Duration::from_secs(1)).await?;
    let mut f = Framed::new(s, FrameCodec::default());
    f.send(frame).await?;
    let mut out = Vec::new();
    while let Some(answer) = f.next().await {
        let answer = answer?;
        let end = last(&answer);
        out.push(answer);
        if end {
            return Ok(out);
        }
    }
    bail!("{addr} closed the connection before the end of its answer")
}

/// What a broker says about itself in `STATUS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Its role now.
    pub role: Role,
    /// Its replication link: `up`, `down` or `degraded` on a primary, `armed` on a backup.
    pub link: String,
    /// Its epoch.
    pub epoch: u64,
}

/// Asks a broker for its `STATUS`; `None` if it does not answer within half a second.
pub async fn status(addr: &str) -> Option<Status> {
    match request(addr, Frame::StatusQuery, Duration::from_millis(500)).await? {
        Frame::Status {
            role, link, epoch, ..
        } => Some(Status { role, link, epoch }),
        _ => None,
    }
}

/// Waits until `ready` holds, polling with [`Backoff::poll`] and checking that none of `procs`
/// has exited; fails after `limit`.
pub async fn wait_until<F, Fut>(
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
    let mut backoff = Backoff::poll();
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
        backoff.wait().await;
    }
}

/// Waits (up to `limit`) until the broker at `primary` is primary with its link `up` and, if
/// given, the one at `backup` is backup and `armed`: the pair is ready to replicate.
pub async fn wait_paired(
    primary: &str,
    backup: Option<&str>,
    limit: Duration,
    procs: &mut [Proc],
) -> anyhow::Result<()> {
    wait_until(
        "the primary and backup to pair up",
        limit,
        procs,
        || async move {
            matches!(status(primary).await, Some(s) if s.role == Role::Primary && s.link == "up")
                && match backup {
                    Some(b) => matches!(status(b).await,
                        Some(s) if s.role == Role::Backup && s.link == "armed"),
                    None => true,
                }
        },
    )
    .await
}

/// A child process killed by PID when dropped (also on failure and Ctrl-C), so nothing outlives
/// the harness or the bench.
pub struct Proc {
    /// Binary name, for messages and its log file.
    pub name: &'static str,
    /// The process.
    pub child: Child,
    /// Stopped with SIGSTOP: resumed before it is stopped or killed.
    pub stopped: bool,
    /// The tasks copying its output; awaited after it exits so no last line is missed.
    pub(crate) readers: Vec<tokio::task::JoinHandle<()>>,
    /// Started on another host over ssh (`child` is the local `ssh`): signals go there, to the
    /// PID the process wrote.
    pub(crate) remote: Option<Arc<crate::ssh::Ssh>>,
}

/// Where and how a process is started.
#[derive(Debug, Clone, Default)]
pub enum Launcher {
    /// A child of this process.
    #[default]
    Local,
    /// A child of this process inside a network namespace (`ip netns exec NS`).
    Netns(String),
    /// On another host, through the OpenSSH client.
    Ssh(Arc<crate::ssh::Ssh>),
}

impl Proc {
    /// Guards `child` (started with `kill_on_drop`); `readers` are the tasks copying its output.
    pub fn new(
        name: &'static str,
        child: Child,
        readers: Vec<tokio::task::JoinHandle<()>>,
    ) -> Self {
        Proc {
            name,
            child,
            stopped: false,
            readers,
            remote: None,
        }
    }

    /// Its PID while it has not been reaped.
    pub fn pid(&self) -> Option<i32> {
        self.child.id().map(|p| p as i32)
    }

    /// Where it is, for messages: `pid N`, or the ssh host.
    pub fn whereabouts(&self) -> String {
        match &self.remote {
            Some(ssh) => format!("on {} over ssh", ssh.dest),
            None => format!("pid {}", self.pid().unwrap_or(0)),
        }
    }

    /// Sends `sig` to it by PID (over ssh, by the PID it wrote there).
    pub fn signal(&self, sig: i32) {
        if let Some(ssh) = &self.remote {
            if let Err(e) = ssh.signal(self.name, crate::ssh::signal_name(sig)) {
                tracing::warn!("{}: {e:#}", self.name);
            }
            return;
        }
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) with a PID we spawned and still own (not yet reaped).
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }

    /// Asks the process to stop (SIGTERM) and waits up to `grace`, then kills it.
    pub async fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        // One already gone (killed by a fault) is not signalled, here or over ssh.
        if let Ok(None) = self.child.try_wait() {
            if self.stopped {
                self.signal(libc::SIGCONT);
            }
            self.signal(libc::SIGTERM);
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(st)) => {
                for r in self.readers.drain(..) {
                    let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
                }
                Some(st)
            }
            _ => {
                tracing::warn!("{} did not stop within {grace:?}: killing it", self.name);
                if self.remote.is_some() {
                    self.signal(libc::SIGKILL);
                }
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
            if self.remote.is_some() {
                // Ending the local ssh would leave the process running there.
                self.signal(libc::SIGKILL);
            }
            let _ = self.child.start_kill();
        }
    }
}

impl Launcher {
    /// The command that runs binary `name` (from `bin_dir` here, from the host's own folder
    /// over ssh) with `args`. `ip netns exec NS` execs the binary in place: the PID is the
    /// binary's.
    pub fn command(
        &self,
        bin_dir: &Path,
        bin: &str,
        name: &str,
        args: &[String],
    ) -> anyhow::Result<Command> {
        let path = bin_dir.join(bin);
        let mut cmd = match self {
            Launcher::Local => Command::new(&path),
            Launcher::Netns(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&path);
                c
            }
            Launcher::Ssh(ssh) => return ssh.command(bin, name, args),
        };
        cmd.args(args);
        Ok(cmd)
    }
}

/// Spawns a binary with its stdout and stderr copied line by line to `<dir>/<name>.log`, and
/// each line also handed to `on_line` (with `true` for stdout).
pub fn spawn_logged(
    launcher: &Launcher,
    bin_dir: &Path,
    name: &'static str,
    args: &[String],
    dir: &Path,
    lines: mpsc::UnboundedSender<(&'static str, bool, String)>,
) -> anyhow::Result<Proc> {
    spawn_logged_as(launcher, bin_dir, name, name, args, dir, lines)
}

/// [`spawn_logged`] for one of several processes of binary `bin`, told apart as `name` (its
/// log file `<name>.log`, the name on its lines).
pub fn spawn_logged_as(
    launcher: &Launcher,
    bin_dir: &Path,
    bin: &str,
    name: &'static str,
    args: &[String],
    dir: &Path,
    lines: mpsc::UnboundedSender<(&'static str, bool, String)>,
) -> anyhow::Result<Proc> {
    let path = bin_dir.join(bin);
    let mut child = launcher
        .command(bin_dir, bin, name, args)?
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
    let mut p = Proc::new(name, child, readers);
    if let Launcher::Ssh(ssh) = launcher {
        p.remote = Some(ssh.clone());
    }
    Ok(p)
}
