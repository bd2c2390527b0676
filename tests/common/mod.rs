//! Helpers shared by the integration tests: free ports, real binaries as child processes that
//! are killed by PID when the test ends, readiness by `STATUS`/log line, and a raw line client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A port nothing listens on right now (bound to port 0, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A running binary of this crate. Its stderr is collected so tests can await log lines; the
/// process is killed (by its PID) when the guard drops.
pub struct ChildGuard {
    pub child: Child,
    pub stderr: Arc<Mutex<Vec<String>>>,
    /// Stdout lines, collected only by [`spawn_bin_capture`] (empty otherwise).
    pub stdout: Arc<Mutex<Vec<String>>>,
    pub name: String,
    /// The threads collecting stdout and stderr: they end at the pipes' end, once the process
    /// has exited (joined by [`ChildGuard::wait_exit`], so that its last lines are in).
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// Starts `target/<profile>/<name>` with `args`.
pub fn spawn_bin(name: &str, args: &[&str]) -> ChildGuard {
    spawn_inner(name, args, false)
}

/// Like [`spawn_bin`], and also collects the process's stdout lines in `stdout`.
pub fn spawn_bin_capture(name: &str, args: &[&str]) -> ChildGuard {
    spawn_inner(name, args, true)
}

/// Like [`spawn_bin_capture`], in a process whose files may not grow past `max_file_bytes`
/// (`RLIMIT_FSIZE`, with `SIGXFSZ` ignored): a write past it fails with `EFBIG`, as on a full
/// disk, without needing one.
pub fn spawn_bin_file_limit(name: &str, args: &[&str], max_file_bytes: u64) -> ChildGuard {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin(name));
    // SAFETY: between fork and exec the closure only calls signal (async-signal-safe) and
    // allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    limit_at_exec(&mut cmd, libc::RLIMIT_FSIZE, max_file_bytes, max_file_bytes);
    spawn_cmd(cmd, name, args, true)
}

/// Sets the child's `resource` limit to `soft`/`hard` between fork and exec, so the process
/// starts under it (a failed `setrlimit` fails the spawn).
pub fn limit_at_exec(cmd: &mut Command, resource: libc::__rlimit_resource_t, soft: u64, hard: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure only calls setrlimit (async-signal-safe) and
    // allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(resource, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn collect<R: std::io::Read + Send + 'static>(
    pipe: R,
    readers: &mut Vec<std::thread::JoinHandle<()>>,
) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    readers.push(std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if let Ok(mut l) = sink.lock() {
                l.push(line);
            }
        }
    }));
    lines
}

fn spawn_inner(name: &str, args: &[&str], capture_stdout: bool) -> ChildGuard {
    spawn_cmd(
        Command::new(assert_cmd::cargo::cargo_bin(name)),
        name,
        args,
        capture_stdout,
    )
}

pub fn spawn_cmd(mut cmd: Command, name: &str, args: &[&str], capture_stdout: bool) -> ChildGuard {
    let mut child = cmd
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(if capture_stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    let mut readers = Vec::new();
    let stderr = match child.stderr.take() {
        Some(err) => collect(err, &mut readers),
        None => Arc::default(),
    };
    let stdout = match child.stdout.take() {
        Some(out) => collect(out, &mut readers),
        None => Arc::default(),
    };
    ChildGuard {
        child,
        stderr,
        stdout,
        name: name.to_string(),
        readers,
    }
}

impl ChildGuard {
    /// Waits (up to 10 s) until a stderr line contains `needle`.
    pub fn wait_stderr(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self
                .stderr
                .lock()
                .map(|l| l.iter().any(|x| x.contains(needle)))
                .unwrap_or(false)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} never logged '{needle}'; log: {:?}",
                self.name,
                self.stderr.lock().map(|l| l.clone()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether a stderr line contains `needle` now.
    pub fn logged(&self, needle: &str) -> bool {
        self.stderr
            .lock()
            .map(|l| l.iter().any(|x| x.contains(needle)))
            .unwrap_or(false)
    }

    /// A copy of the stdout lines collected so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                // Its pipes are closed: the collectors end once they have read the last lines.
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one read on a [`LineConn`] gave: a line, the peer's close, silence, or an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    /// A line, without its newline.
    Line(String),
    /// The peer closed the connection (read returned 0).
    Eof,
    /// Nothing arrived within the limit; the connection is still open.
    TimedOut,
    /// The read failed otherwise (e.g. a reset).
    Failed(std::io::ErrorKind),
}

/// A raw line-protocol connection.
pub struct LineConn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl LineConn {
    /// Connects, retrying for up to 10 s while the broker starts.
    pub fn connect(addr: &str) -> LineConn {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match TcpStream::connect(addr) {
                Ok(s) => {
                    let writer = s.try_clone().expect("clone stream");
                    return LineConn {
                        reader: BufReader::new(s),
                        writer,
                    };
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot connect to {addr}: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Writes `line` and a newline.
    pub fn send_line(&mut self, line: &str) {
        self.send_bytes(format!("{line}\n").as_bytes());
    }

    /// Writes raw bytes.
    pub fn send_bytes(&mut self, b: &[u8]) {
        let _ = self.writer.write_all(b);
        let _ = self.writer.flush();
    }

    /// Reads one line and says exactly what happened: a line, EOF, a timeout or an error.
    pub fn next(&mut self, limit: Duration) -> Got {
        if let Err(e) = self.reader.get_ref().set_read_timeout(Some(limit)) {
            return Got::Failed(e.kind());
        }
        let mut s = String::new();
        match self.reader.read_line(&mut s) {
            Ok(0) => Got::Eof,
            Ok(_) => Got::Line(s.trim_end_matches(['\n', '\r']).to_string()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Got::TimedOut
            }
            Err(e) => Got::Failed(e.kind()),
        }
    }

    /// Reads one line (without its newline); `None` on timeout or EOF.
    pub fn read_line(&mut self, limit: Duration) -> Option<String> {
        self.reader.get_ref().set_read_timeout(Some(limit)).ok()?;
        let mut s = String::new();
        match self.reader.read_line(&mut s) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(s.trim_end_matches(['\n', '\r']).to_string()),
        }
    }
}

/// Waits (up to 10 s) until the broker at `addr` reports `role` and `link` in `STATUS`.
pub fn wait_status(addr: &str, role: &str, link: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let want = format!("STATUS|{role}|");
    let mut last = None;
    loop {
        if let Ok(s) = TcpStream::connect(addr) {
            let mut c = LineConn {
                reader: BufReader::new(s.try_clone().expect("clone")),
                writer: s,
            };
            c.send_line("STATUS");
            last = c.read_line(Duration::from_secs(1));
            if let Some(l) = &last {
                if l.starts_with(&want) && l.split('|').nth(3) == Some(link) {
                    return;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "{addr} never reached {role}/{link}; last STATUS: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// Brokers, subscriptions and waits shared by the promise tests.

pub const SEC: Duration = Duration::from_secs(1);

pub fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// A primary whose configured backup port has nothing listening: it runs degraded (link `down`).
pub fn solo_primary(extra: &[&str]) -> (ChildGuard, String) {
    let (pp, dead) = (free_port(), free_port());
    let dead = addr(dead);
    let mut args = vec![pp.to_string(), dead];
    args.extend(extra.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let g = spawn_bin("primary", &argv);
    wait_status(&addr(pp), "primary", "down");
    (g, addr(pp))
}

/// A paired primary and backup (primary link `up`, backup `armed`).
pub fn pair(
    primary_extra: &[&str],
    backup_extra: &[&str],
) -> (ChildGuard, ChildGuard, String, String) {
    let (pp, bp) = (free_port(), free_port());
    let (pa, ba) = (addr(pp), addr(bp));
    let mut a = vec![pp.to_string(), ba.clone()];
    a.extend(primary_extra.iter().map(|s| s.to_string()));
    let mut b = vec![bp.to_string(), pa.clone()];
    b.extend(backup_extra.iter().map(|s| s.to_string()));
    let primary = spawn_bin("primary", &a.iter().map(String::as_str).collect::<Vec<_>>());
    let backup = spawn_bin("backup", &b.iter().map(String::as_str).collect::<Vec<_>>());
    wait_status(&pa, "primary", "up");
    wait_status(&ba, "backup", "armed");
    (primary, backup, pa, ba)
}

/// An identified subscriber (`SUB`), registered: the `PONG` after `SUB` proves it.
pub fn subscribe(broker: &str, topic: &str) -> LineConn {
    let mut s = LineConn::connect(broker);
    s.send_line(&format!("SUB|{topic}"));
    s.send_line("PING");
    assert_eq!(
        s.next(5 * SEC),
        Got::Line("PONG".into()),
        "SUB not registered"
    );
    s
}

/// `(publisher, seq, epoch, payload)` of a `MSG` line.
pub fn parse_msg(line: &str) -> (String, u64, u64, String) {
    let f: Vec<&str> = line.splitn(7, '|').collect();
    assert!(f.len() == 7 && f[0] == "MSG", "not a MSG frame: {line}");
    let epoch = f[5]
        .split(',')
        .find_map(|kv| kv.strip_prefix("e="))
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("no epoch in {line}"));
    (
        f[2].to_string(),
        f[3].parse().expect("seq"),
        epoch,
        f[6].to_string(),
    )
}

pub fn status(broker: &str) -> String {
    let mut c = LineConn::connect(broker);
    c.send_line("STATUS");
    match c.next(5 * SEC) {
        Got::Line(l) => l,
        other => panic!("no STATUS from {broker}: {other:?}"),
    }
}

/// Polls `f` every 20 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The distinct sequence numbers in a subscriber CSV (`subscriber --csv`, column `seq`); empty
/// while the file is not there yet.
pub fn delivered_seqs(csv: &std::path::Path) -> std::collections::BTreeSet<u64> {
    let mut out = std::collections::BTreeSet::new();
    if let Ok(mut r) = csv::Reader::from_path(csv) {
        let headers = r.headers().cloned().unwrap_or_default();
        let Some(col) = headers.iter().position(|h| h == "seq") else {
            return out;
        };
        for rec in r.records().flatten() {
            if let Some(v) = rec.get(col).and_then(|v| v.parse().ok()) {
                out.insert(v);
            }
        }
    }
    out
}
