//! Child processes, free ports and readiness: starting the real binaries, killing them by PID
//! when dropped, picking ports, and waiting until a broker answers `STATUS`.

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
/// A child process killed by PID when dropped, so nothing outlives the harness.
pub(crate) struct Proc {
    pub(crate) name: &'static str,
    pub(crate) child: Child,
    pub(crate) stopped: bool,
    /// The tasks copying its output; awaited after it exits so no last line is missed.
    pub(crate) readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Proc {
    pub(crate) fn pid(&self) -> Option<i32> {
        self.child.id().map(|p| p as i32)
    }

    pub(crate) fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) with a PID we spawned and still own (not yet reaped).
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }

    /// Asks the process to stop (SIGTERM) and waits up to `grace`, then kills it.
    pub(crate) async fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
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

pub(crate) fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Picks the primary and backup ports: the requested pair, else the next free pair.
pub(crate) fn pick_ports(base: u16) -> anyhow::Result<(u16, u16)> {
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

/// Asks a broker for its role and link state.
pub(crate) async fn status(addr: &str) -> Option<(Role, String)> {
    status_full(addr).await.map(|(r, l, _)| (r, l))
}

/// Asks a broker for its `STATUS`, epoch included.
pub(crate) async fn status_full(addr: &str) -> Option<(Role, String, u64)> {
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
pub(crate) async fn wait_until<F, Fut>(
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
pub(crate) fn spawn(
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
