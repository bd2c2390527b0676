//! The durable figures: our pair with a `--data-dir` on each node under every `--fsync` policy,
//! against `redis-server` with an append-only file (`XADD` of a 64-byte field), in alternating
//! rounds of one run; the time a primary takes to serve again on a log of many entries, and how
//! fast the log reads back.
//!
//! Both brokers are driven by the same client loop: `depth` requests written at once, then
//! every answer read before the next `depth` go (what `redis-benchmark -P depth` does), or one
//! request at a time for the latency figure.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::time::Instant;

use edgepair::clock::now_us;
use edgepair::log::{FileLog, Storage};

use super::figures::payload;
use super::{start_nodes, Broker};
use crate::procs::{free_port, status};
use edgepair::protocol::Role;

/// Who answers the requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Proto {
    /// Our line protocol: `PUB|…` answered by one `ACK|…` line.
    Ours,
    /// Redis: `XADD bench * f <payload>` answered by a bulk string (two lines).
    Redis,
}

impl Proto {
    /// Request `seq` of publisher `who` (each phase publishes as its own publisher: a sequence
    /// number seen before would be taken for a resend and acknowledged without being logged).
    fn request(self, who: &str, seq: u64, out: &mut Vec<u8>) {
        let p = payload(seq);
        match self {
            Proto::Ours => out
                .extend_from_slice(format!("PUB|bench|{who}|{seq}|{}|{p}\n", now_us()).as_bytes()),
            Proto::Redis => out.extend_from_slice(
                format!(
                    "*5\r\n$4\r\nXADD\r\n$5\r\nbench\r\n$1\r\n*\r\n$1\r\nf\r\n${}\r\n{p}\r\n",
                    p.len()
                )
                .as_bytes(),
            ),
        }
    }
}

/// Reads one answer; an error answer (or a closed connection) is an error.
async fn read_reply<R: AsyncBufReadExt + Unpin>(
    proto: Proto,
    r: &mut R,
    line: &mut Vec<u8>,
) -> anyhow::Result<()> {
    line.clear();
    if r.read_until(b'\n', line).await? == 0 {
        bail!("connection closed");
    }
    match proto {
        Proto::Ours if line.starts_with(b"ACK") => Ok(()),
        Proto::Redis if line.starts_with(b"$") => {
            line.clear();
            if r.read_until(b'\n', line).await? == 0 {
                bail!("connection closed");
            }
            Ok(())
        }
        _ => bail!("unexpected answer {:?}", String::from_utf8_lossy(line)),
    }
}

pub(super) async fn connect(
    addr: &str,
) -> anyhow::Result<(
    BufReader<tokio::net::tcp::OwnedReadHalf>,
    tokio::net::tcp::OwnedWriteHalf,
)> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (r, w) = s.into_split();
    Ok((BufReader::with_capacity(64 * 1024, r), w))
}

/// `n` requests, `depth` at a time (all answered before the next go): answers per second.
async fn pipelined(addr: &str, proto: Proto, n: u64, depth: u64) -> anyhow::Result<f64> {
    let (mut r, mut w) = connect(addr).await?;
    let mut out = Vec::with_capacity(256 * depth as usize);
    let mut line = Vec::new();
    let start = Instant::now();
    let mut seq = 0;
    while seq < n {
        let k = depth.min(n - seq);
        out.clear();
        for _ in 0..k {
            seq += 1;
            proto.request("deep", seq, &mut out);
        }
        w.write_all(&out).await?;
        for _ in 0..k {
            read_reply(proto, &mut r, &mut line).await?;
        }
    }
    Ok(n as f64 / start.elapsed().as_secs_f64().max(1e-9))
}

/// `n` requests with up to `window` unanswered at any time (a pipelining publisher: the next
/// requests go as soon as answers come back, without waiting for a whole batch): answers per
/// second.
pub(super) async fn windowed(addr: &str, proto: Proto, n: u64, window: u64) -> anyhow::Result<f64> {
    let (mut r, mut w) = connect(addr).await?;
    let window = window.max(1);
    // The reader counts answers and hands their credit back to the writer.
    let (credit_tx, mut credit_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let reader = tokio::spawn(async move {
        let mut line = Vec::new();
        let mut got = 0u64;
        while got < n {
            read_reply(proto, &mut r, &mut line).await?;
            got += 1;
            // One credit message per answer read in a burst would cost as much as the
            // answer; batch what is already buffered.
            let mut k = 1;
            while got < n && r.buffer().contains(&b'\n') {
                read_reply(proto, &mut r, &mut line).await?;
                got += 1;
                k += 1;
            }
            let _ = credit_tx.send(k);
        }
        anyhow::Ok(())
    });
    let start = Instant::now();
    let mut out = Vec::with_capacity(256 * 1024);
    let (mut sent, mut answered) = (0u64, 0u64);
    while sent < n {
        while sent < n && sent - answered < window && out.len() < 64 * 1024 {
            sent += 1;
            proto.request("window", sent, &mut out);
        }
        if !out.is_empty() {
            w.write_all(&out).await?;
            out.clear();
        }
        if sent - answered >= window || sent == n {
            match credit_rx.recv().await {
                Some(k) => answered += k,
                None => break,
            }
        }
        while let Ok(k) = credit_rx.try_recv() {
            answered += k;
        }
    }
    reader.await.context("the reader task failed")??;
    Ok(n as f64 / start.elapsed().as_secs_f64().max(1e-9))
}

/// `n` requests one at a time: the request→answer histogram (µs).
async fn one_at_a_time(addr: &str, proto: Proto, n: u64) -> anyhow::Result<Histogram<u64>> {
    let (mut r, mut w) = connect(addr).await?;
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut out, mut line) = (Vec::new(), Vec::new());
    for seq in 1..=n {
        out.clear();
        proto.request("single", seq, &mut out);
        let t = Instant::now();
        w.write_all(&out).await?;
        read_reply(proto, &mut r, &mut line).await?;
        h.record((t.elapsed().as_micros() as u64).max(1))?;
    }
    Ok(h)
}

/// What the durable section measures, from the bench's options.
pub(super) struct DurableOpts {
    pub runs: usize,
    pub messages: u64,
    pub depth: u64,
    pub window: u64,
    /// Only these settings (`always`, `batch`, `never`, `memory`, `redis`); empty: all.
    pub settings: Vec<String>,
    pub single: u64,
    pub redis: PathBuf,
    pub data_root: PathBuf,
    pub threads: Option<usize>,
}

/// A setting of one broker: ours under an `--fsync` policy, or Redis under an `appendfsync` one.
#[derive(Debug, Clone, Copy)]
enum Setting {
    /// Under an `--fsync` policy; `"memory"`: no `--data-dir` (the log in memory).
    Ours(&'static str),
    Redis(&'static str),
}

impl Setting {
    fn name(self) -> String {
        match self {
            Setting::Ours("memory") => "pair no data dir".into(),
            Setting::Ours(p) => format!("pair fsync {p}"),
            Setting::Redis(p) => format!("redis {p}"),
        }
    }
}

/// A running broker of one setting, with its data directories (removed when dropped, after
/// the processes are stopped).
struct Running {
    procs: Vec<Broker>,
    addr: String,
    proto: Proto,
    _dirs: Vec<tempfile::TempDir>,
}

impl Running {
    /// Stops the backup before the primary (so it does not take over meanwhile).
    async fn stop(mut self) {
        for b in self.procs.iter_mut().rev() {
            b.proc.stop(Duration::from_secs(5)).await;
        }
    }
}

async fn start_setting(bin_dir: &Path, o: &DurableOpts, s: Setting) -> anyhow::Result<Running> {
    match s {
        Setting::Ours("memory") => {
            let procs = start_nodes(bin_dir, true, "0", None, o.threads, &[]).await?;
            Ok(Running {
                addr: procs[0].addr.clone(),
                procs,
                proto: Proto::Ours,
                _dirs: Vec::new(),
            })
        }
        Setting::Ours(fsync) => {
            let dirs = [
                tempfile::tempdir_in(&o.data_root)?,
                tempfile::tempdir_in(&o.data_root)?,
            ];
            let extra: Vec<Vec<String>> = dirs
                .iter()
                .map(|d| {
                    vec![
                        "--data-dir".to_string(),
                        d.path().display().to_string(),
                        "--fsync".to_string(),
                        fsync.to_string(),
                    ]
                })
                .collect();
            let procs = start_nodes(bin_dir, true, "0", None, o.threads, &extra).await?;
            Ok(Running {
                addr: procs[0].addr.clone(),
                procs,
                proto: Proto::Ours,
                _dirs: dirs.into(),
            })
        }
        Setting::Redis(policy) => {
            let dir = tempfile::tempdir_in(&o.data_root)?;
            let b = start_redis(&o.redis, Some((policy, dir.path()))).await?;
            Ok(Running {
                addr: b.addr.clone(),
                procs: vec![b],
                proto: Proto::Redis,
                _dirs: vec![dir],
            })
        }
    }
}

/// `redis-server` on a free loopback port, without snapshots: with an append-only file under
/// `appendfsync` policy in `dir` (`aof`), or with no persistence at all (`None`).
pub(super) async fn start_redis(
    server: &Path,
    aof: Option<(&str, &Path)>,
) -> anyhow::Result<Broker> {
    let port = free_port()?;
    let mut args: Vec<std::ffi::OsString> = [
        "--bind",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--save",
        "",
        "--daemonize",
        "no",
        "--appendonly",
    ]
    .map(std::ffi::OsString::from)
    .into();
    match aof {
        Some((policy, dir)) => {
            args.extend(["yes", "--appendfsync", policy, "--dir"].map(Into::into));
            args.push(dir.into());
        }
        None => args.push("no".into()),
    }
    let addr = format!("127.0.0.1:{port}");
    super::start_peer("redis-server", server, &args, addr, |a| async move {
        redis_ping(&a).await
    })
    .await
}

async fn redis_ping(addr: &str) -> bool {
    let Ok(Ok((mut r, mut w))) =
        tokio::time::timeout(Duration::from_millis(500), connect(addr)).await
    else {
        return false;
    };
    if w.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut line = String::new();
    matches!(
        tokio::time::timeout(Duration::from_millis(500), r.read_line(&mut line)).await,
        Ok(Ok(_)) if line.starts_with("+PONG")
    )
}

/// Synced writes the floor measures per writer.
const FLOOR_WRITES: u64 = 300;
/// Bytes per synced write of the floor: about one entry of a 64-byte payload.
const FLOOR_WRITE: usize = 110;

/// The disk's own floor for an answer that waits for it: the p50 of a `FLOOR_WRITE`-byte
/// write and `fdatasync` into a preallocated file (what the log does under `--fsync always`),
/// with one writer and with two at once. Two at once is the pair's case on one machine: the
/// primary and the backup each sync their own log, on the same disk. No answer under `always`
/// can come sooner than its node's synced write, so this is what the one-at-a-time p50 and the
/// sync-bound throughput are to be read against when the disk's pace moves between runs.
fn disk_floor(root: &Path, writers: usize) -> anyhow::Result<f64> {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir_in(root)
        .with_context(|| format!("disk floor: a folder in {}", root.display()))?;
    let len = FLOOR_WRITES * FLOOR_WRITE as u64;
    let mut files = Vec::new();
    for i in 0..writers {
        let path = dir.path().join(format!("floor-{i}"));
        let f = std::fs::File::create(&path)
            .with_context(|| format!("disk floor: {}", path.display()))?;
        // Written and synced ahead, as the log's preallocated runway is: each timed sync then
        // carries data only, not the file's growth.
        f.write_all_at(&vec![0u8; len as usize], 0)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("disk floor: {}", path.display()))?;
        files.push(f);
    }
    let each = std::thread::scope(|sc| {
        let handles: Vec<_> = files
            .iter()
            .map(|f| {
                sc.spawn(move || -> std::io::Result<Vec<u64>> {
                    let buf = [b'x'; FLOOR_WRITE];
                    let mut took = Vec::with_capacity(FLOOR_WRITES as usize);
                    for n in 0..FLOOR_WRITES {
                        let t = std::time::Instant::now();
                        f.write_all_at(&buf, n * FLOOR_WRITE as u64)?;
                        f.sync_data()?;
                        took.push(t.elapsed().as_micros() as u64);
                    }
                    Ok(took)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("a floor writer panicked")))
            })
            .collect::<std::io::Result<Vec<_>>>()
    })
    .context("disk floor: a synced write")?;
    let all: Vec<f64> = each.into_iter().flatten().map(|us| us as f64).collect();
    Ok(super::median(all))
}

/// Figures of one setting over the runs.
#[derive(Default)]
struct Series {
    rate: Vec<f64>,
    window_rate: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    single_rate: Vec<f64>,
}

/// One line of the durable table: (figure, setup, runs, unit, target).
pub(super) type Line = (String, String, Vec<f64>, &'static str, String);

/// Our pair under always / batch / never and Redis under always / everysec / no, in
/// alternating rounds; returns the figures and prints the ratios.
pub(super) async fn durable(bin_dir: &Path, o: &DurableOpts) -> anyhow::Result<Vec<Line>> {
    let redis_ok = Command::new(&o.redis)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !redis_ok {
        println!(
            "  ({} not found: Redis figures left out; apt-get install -y redis-server)",
            o.redis.display()
        );
    }
    let pairs = [
        (Setting::Ours("always"), Setting::Redis("always")),
        (Setting::Ours("batch"), Setting::Redis("everysec")),
        (Setting::Ours("never"), Setting::Redis("no")),
    ];
    let wanted = |s: Setting| {
        let key = match s {
            Setting::Ours(p) => p,
            Setting::Redis(_) => "redis",
        };
        o.settings.is_empty() || o.settings.iter().any(|x| x == key)
    };
    let mut series: Vec<(Setting, Series)> = Vec::new();
    for (a, b) in pairs {
        if wanted(a) {
            series.push((a, Series::default()));
        }
        if redis_ok && wanted(b) {
            series.push((b, Series::default()));
        }
    }
    if wanted(Setting::Ours("memory")) {
        series.push((Setting::Ours("memory"), Series::default()));
    }
    let floor_wanted = !series.is_empty();
    let (mut floor_one, mut floor_two) = (Vec::new(), Vec::new());
    for _ in 0..o.runs {
        if floor_wanted {
            let root = o.data_root.clone();
            let (one, two) = tokio::task::spawn_blocking(move || {
                anyhow::Ok((disk_floor(&root, 1)?, disk_floor(&root, 2)?))
            })
            .await
            .context("disk floor")??;
            floor_one.push(one);
            floor_two.push(two);
        }
        for (s, fig) in series.iter_mut() {
            let run = start_setting(bin_dir, o, *s).await?;
            let rate = pipelined(&run.addr, run.proto, o.messages, o.depth).await;
            let window_rate = windowed(&run.addr, run.proto, o.messages, o.window).await;
            let t = Instant::now();
            let h = one_at_a_time(&run.addr, run.proto, o.single).await;
            let secs = t.elapsed().as_secs_f64();
            run.stop().await;
            let (rate, window_rate, h) = (
                rate.with_context(|| format!("{}: pipelined", s.name()))?,
                window_rate.with_context(|| format!("{}: window", s.name()))?,
                h.with_context(|| format!("{}: one at a time", s.name()))?,
            );
            fig.rate.push(rate);
            fig.window_rate.push(window_rate);
            fig.p50.push(h.value_at_quantile(0.5) as f64);
            fig.p99.push(h.value_at_quantile(0.99) as f64);
            fig.single_rate.push(o.single as f64 / secs.max(1e-9));
        }
    }
    let mut lines: Vec<Line> = Vec::new();
    let (depth, window) = (o.depth, o.window);
    for (s, fig) in &series {
        let (t_rate, t_p50) = match s {
            Setting::Ours("always") => (">= 1.0x redis always", "<= 250"),
            Setting::Ours("batch") => (">= 500,000; >= 0.9x never", "-"),
            _ => ("-", "-"),
        };
        let setup = s.name();
        lines.push((
            format!("durable {depth}-deep"),
            setup.clone(),
            fig.rate.clone(),
            "msg/s",
            t_rate.into(),
        ));
        lines.push((
            format!("durable window {window}"),
            setup.clone(),
            fig.window_rate.clone(),
            "msg/s",
            t_rate.into(),
        ));
        lines.push((
            "durable 1-at-a-time".into(),
            setup.clone(),
            fig.single_rate.clone(),
            "msg/s",
            "-".into(),
        ));
        lines.push((
            "durable 1-at-a-time p50".into(),
            setup.clone(),
            fig.p50.clone(),
            "us",
            t_p50.into(),
        ));
        lines.push((
            "durable 1-at-a-time p99".into(),
            setup,
            fig.p99.clone(),
            "us",
            "-".into(),
        ));
    }
    if floor_wanted {
        for (setup, runs) in [
            ("disk, 1 writer", &floor_one),
            ("disk, 2 writers at once", &floor_two),
        ] {
            lines.push((
                "durable synced write p50".into(),
                setup.into(),
                runs.clone(),
                "us",
                "-".into(),
            ));
        }
    }
    // Ratios of the medians, ours over Redis's counterpart, and batch over never.
    let med = |name: &str| {
        series.iter().find(|(s, _)| s.name() == name).map(|(_, f)| {
            (
                super::median(f.rate.clone()),
                super::median(f.p50.clone()),
                super::median(f.window_rate.clone()),
            )
        })
    };
    println!("  ratios (medians, same run):");
    for (a, b) in pairs {
        if let (Some((ra, la, wa)), Some((rb, lb, wb))) = (med(&a.name()), med(&b.name())) {
            println!(
                "    {:<18} / {:<15} {depth}-deep {:>5.2}x   window {window} {:>5.2}x   1-at-a-time p50 {:>5.2}x",
                a.name(),
                b.name(),
                ra / rb,
                wa / wb,
                la / lb
            );
        }
    }
    if floor_wanted {
        let (one, two) = (
            super::median(floor_one.clone()),
            super::median(floor_two.clone()),
        );
        println!(
            "    the disk's synced write p50: {one:.0} us alone, {two:.0} us with two at once"
        );
        // An `ACK` under `always` waits for the relay's round trips and, on the way, for the
        // backup's synced write while the primary makes its own: no sooner than the pair
        // without a disk plus two writers' synced write.
        if let (Some((_, p50, _)), Some((_, relay, _))) =
            (med("pair fsync always"), med("pair no data dir"))
        {
            println!(
                "    pair fsync always 1-at-a-time p50 {p50:.0} us; its parts here: pair no data dir {relay:.0} + two writers' synced write {two:.0} = {:.0} us ({:.2}x)",
                relay + two,
                p50 / (relay + two)
            );
        }
    }
    if let (Some((rb, _, wb)), Some((rn, _, wn))) =
        (med("pair fsync batch"), med("pair fsync never"))
    {
        println!(
            "    pair fsync batch / pair fsync never  {depth}-deep {:>5.2}x   window {window} {:>5.2}x",
            rb / rn,
            wb / wn
        );
    }
    Ok(lines)
}

/// Fills a fresh log with `entries` entries (`edgepair-log fill`), every one marked delivered
/// or none.
async fn fill(bin_dir: &Path, data: &Path, entries: u64, delivered: bool) -> anyhow::Result<()> {
    let mut cmd = Command::new(bin_dir.join("edgepair-log"));
    cmd.arg("fill").arg(data).args([
        "bench",
        "--count",
        &entries.to_string(),
        "--sync-every",
        "100000",
    ]);
    if delivered {
        cmd.arg("--delivered");
    }
    let st = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .context("cannot run edgepair-log fill")?;
    if !st.success() {
        bail!("edgepair-log fill failed: {st}");
    }
    Ok(())
}

/// Starts a solo primary (`--compute 0`) on `data`.
fn spawn_on(bin_dir: &Path, o: &DurableOpts, data: &Path) -> anyhow::Result<Broker> {
    spawn_as(bin_dir, o, "primary", (free_port()?, free_port()?), data)
}

/// Starts the node `name` (`primary` or `backup`) on `port`, its peer on `peer`, with
/// `--compute 0` and `data` as its data directory.
fn spawn_as(
    bin_dir: &Path,
    o: &DurableOpts,
    name: &'static str,
    (port, peer): (u16, u16),
    data: &Path,
) -> anyhow::Result<Broker> {
    let extra = ["--data-dir".to_string(), data.display().to_string()];
    super::spawn_node(bin_dir, name, port, peer, "0", None, o.threads, &extra)
}

/// Waits (up to 60 s after `t`) until the node at `addr` answers `STATUS`.
async fn wait_status(addr: &str, t: Instant) -> anyhow::Result<()> {
    let deadline = t + Duration::from_secs(60);
    while status(addr).await.is_none() {
        if Instant::now() > deadline {
            bail!("the primary did not answer STATUS within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// Starts a pair on logs of its own each, as after a power loss (the backup first, then the
/// primary): seconds from the spawns until the primary has acknowledged a `PUB` (on a topic of
/// its own: the log's topic may still be delivering). A primary restarted on a log holds
/// publishes until its backup's log is compared with its own (see `core/settle.rs`), so this
/// is the time to serve again with both logs reconciled. Fails if the backup took over
/// meanwhile: comparing the logs must not stall the primary past the backup's ping timeout.
async fn time_to_serve(
    bin_dir: &Path,
    o: &DurableOpts,
    primary: &Path,
    backup: &Path,
) -> anyhow::Result<f64> {
    let (pp, bp) = (free_port()?, free_port()?);
    let t = Instant::now();
    let mut b = spawn_as(bin_dir, o, "backup", (bp, pp), backup)?;
    let mut p = spawn_as(bin_dir, o, "primary", (pp, bp), primary)?;
    let served = async {
        wait_status(&p.addr, t).await?;
        let (mut r, mut w) = connect(&p.addr).await?;
        let mut line = Vec::new();
        w.write_all(format!("PUB|probe|restart|1|{}|x\n", now_us()).as_bytes())
            .await?;
        tokio::time::timeout(
            Duration::from_secs(60),
            read_reply(Proto::Ours, &mut r, &mut line),
        )
        .await
        .context("no ACK within 60 s")??;
        let secs = t.elapsed().as_secs_f64();
        match status(&b.addr).await {
            Some(st) if st.role == Role::Backup => anyhow::Ok(secs),
            other => bail!("the backup did not stay backup while the pair restarted: {other:?}"),
        }
    }
    .await;
    p.proc.stop(Duration::from_secs(10)).await;
    b.proc.stop(Duration::from_secs(10)).await;
    served
}

/// Starts a solo primary on `data`, whose topic `bench` holds `entries` undelivered entries,
/// with a subscriber registered as soon as it listens: seconds from the spawn until the last
/// entry reached the subscriber (the startup grace, 300 ms, included).
async fn time_to_drain(
    bin_dir: &Path,
    o: &DurableOpts,
    data: &Path,
    entries: u64,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut b = spawn_on(bin_dir, o, data)?;
    let drained = async {
        let s = loop {
            match TcpStream::connect(&b.addr).await {
                Ok(s) => break s,
                Err(_) if t.elapsed() < Duration::from_secs(60) => {
                    tokio::time::sleep(Duration::from_millis(1)).await
                }
                Err(e) => return Err(e).context("cannot connect within 60 s"),
            }
        };
        let (r, mut w) = s.into_split();
        w.write_all(b"SUB|bench\n").await?;
        let last = format!("|fill|{entries}|");
        let got = read_msgs(r, entries, |line| {
            line.windows(last.len()).any(|x| x == last.as_bytes())
        })
        .await?;
        if got != entries {
            bail!("the subscriber got {got} of {entries} entries");
        }
        anyhow::Ok(t.elapsed().as_secs_f64())
    }
    .await;
    b.proc.stop(Duration::from_secs(10)).await;
    drained
}

/// Reads `MSG` lines from `r` until `is_last` holds for one (a `REPLAYED` line or the end of
/// the connection ends it too, early): how many came. Reads 256 KiB at a time and looks at
/// each line only as far as it must (a lean client: the figure is the broker's).
async fn read_msgs(
    mut r: tokio::net::tcp::OwnedReadHalf,
    limit: u64,
    is_last: impl Fn(&[u8]) -> bool,
) -> anyhow::Result<u64> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 256 * 1024];
    let (mut have, mut got) = (0usize, 0u64);
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), r.read(&mut buf[have..]))
            .await
            .with_context(|| format!("nothing read for 30 s after {got} MSGs"))??;
        if n == 0 {
            bail!("connection closed after {got} MSGs");
        }
        have += n;
        let mut start = 0;
        while let Some(i) = buf[start..have].iter().position(|b| *b == b'\n') {
            let line = &buf[start..start + i];
            start += i + 1;
            if line.starts_with(b"MSG|") {
                got += 1;
                if got >= limit && is_last(line) {
                    return Ok(got);
                }
            } else if line.starts_with(b"REPLAYED|") {
                return Ok(got);
            } else if line.starts_with(b"ERR|") {
                bail!("{}", String::from_utf8_lossy(line));
            }
        }
        buf.copy_within(start..have, 0);
        have -= start;
        if have == buf.len() {
            bail!("a line longer than {} bytes", buf.len());
        }
    }
}

/// On logs of `entries` entries in a thousand epochs (written by `edgepair-log fill`, one
/// copy per node): seconds until a pair restarted on them serves a publish, when every entry
/// was delivered and when none was (the primary takes them up again, a chunk at a time);
/// seconds until a subscriber
/// of a node started on the undelivered log has all of it (`None` if that failed: a node that
/// sends faster than the subscriber reads disconnects it); and the entries read back from the
/// log per second (from offset 0, in chunks of 4,096, page cache warm), as a catching-up reader
/// would.
pub(super) async fn restart(
    bin_dir: &Path,
    o: &DurableOpts,
    entries: u64,
) -> anyhow::Result<([f64; 3], Option<f64>)> {
    let dir = tempfile::tempdir_in(&o.data_root)?;
    let (done, undone) = (dir.path().join("delivered"), dir.path().join("undelivered"));
    let (done_b, undone_b) = (
        dir.path().join("delivered-b"),
        dir.path().join("undelivered-b"),
    );
    for (data, delivered) in [
        (&done, true),
        (&undone, false),
        (&done_b, true),
        (&undone_b, false),
    ] {
        fill(bin_dir, data, entries, delivered).await?;
    }
    let t = Instant::now();
    let (log, _) = FileLog::inspect(&done)?;
    let mut from = 0;
    let mut read = 0u64;
    loop {
        let chunk = log.read("bench", from, 4096)?;
        let Some(last) = chunk.last() else {
            break;
        };
        from = last.offset + 1;
        read += chunk.len() as u64;
    }
    let read_rate = read as f64 / t.elapsed().as_secs_f64().max(1e-9);
    if read != entries {
        bail!("read back {read} of {entries} entries");
    }
    drop(log);
    let up_done = time_to_serve(bin_dir, o, &done, &done_b).await?;
    let up_undone = time_to_serve(bin_dir, o, &undone, &undone_b).await?;
    // The first node acknowledged a publish on a topic of its own and may have delivered part
    // of the log: a fresh copy for the drain.
    let again = dir.path().join("undelivered-again");
    fill(bin_dir, &again, entries, false).await?;
    let drain = match time_to_drain(bin_dir, o, &again, entries).await {
        Ok(secs) => Some(secs),
        Err(e) => {
            println!("  (restart on {entries} undelivered entries, drain to a subscriber: {e:#})");
            None
        }
    };
    Ok(([up_done, up_undone, read_rate], drain))
}

/// A subscriber's catch-up: on a log of `entries` delivered entries (written by
/// `edgepair-log fill --delivered`), a solo primary is started; a lean client sends
/// `SUB|bench|0` and reads until the last entry arrives: entries per second from the `SUB`
/// to the last one.
pub(super) async fn catch_up(bin_dir: &Path, o: &DurableOpts, entries: u64) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir_in(&o.data_root)?;
    let data = dir.path().join("log");
    fill(bin_dir, &data, entries, true).await?;
    let t = Instant::now();
    let mut b = spawn_on(bin_dir, o, &data)?;
    let rate = async {
        wait_status(&b.addr, t).await?;
        let s = TcpStream::connect(&b.addr).await?;
        let (r, mut w) = s.into_split();
        let t = Instant::now();
        w.write_all(b"SUB|bench|0\n").await?;
        let last = format!("|fill|{entries}|");
        let got = read_msgs(r, entries, |line| {
            line.windows(last.len()).any(|x| x == last.as_bytes())
        })
        .await?;
        let secs = t.elapsed().as_secs_f64();
        if got != entries {
            bail!("the catch-up sent {got} of {entries} entries");
        }
        anyhow::Ok(entries as f64 / secs.max(1e-9))
    }
    .await;
    b.proc.stop(Duration::from_secs(10)).await;
    rate
}
