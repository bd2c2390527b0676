//! The figures themselves, measured with lean clients that write pre-formatted frames and count
//! lines, so that they measure the brokers and not the client.

use std::time::Duration;

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

use edgepair::clock::now_us;

use super::Broker;

/// The read and write halves of a connection, plain or TLS.
pub(super) type Reader = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
pub(super) type Writer = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

/// How the bench's clients reach a broker: plain TCP, or TLS checked against a CA.
#[derive(Clone, Default)]
pub(super) struct Dialer {
    pub(super) tls: Option<edgepair::tls::Client>,
}

impl Dialer {
    /// A connection to `addr`, split in halves.
    pub(super) async fn dial(&self, addr: &str) -> anyhow::Result<(Reader, Writer)> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(match &self.tls {
            None => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Some(t) => {
                let s = t.connect(Box::pin(s), addr).await?;
                let (r, w) = tokio::io::split(s);
                (Box::new(r), Box::new(w))
            }
        })
    }
}

/// A subscriber connection; the write half is kept so the broker does not see it close.
pub(super) struct SubConn {
    pub(super) r: BufReader<Reader>,
    _w: Writer,
}

/// A subscriber connection that has sent `SUB` and been registered (checked with a `PING`).
pub(super) async fn subscribe(addr: &str, topic: &str) -> anyhow::Result<SubConn> {
    subscribe_via(&Dialer::default(), addr, topic).await
}

/// [`subscribe`] through `dialer`.
pub(super) async fn subscribe_via(
    dialer: &Dialer,
    addr: &str,
    topic: &str,
) -> anyhow::Result<SubConn> {
    subscribe_line(dialer, addr, &format!("SUB|{topic}")).await
}

/// A subscriber connection that has sent `line` (`SUB|…` or the seed's `SUBSCRIBE|…`) and been
/// registered (checked with a `PING`).
async fn subscribe_line(dialer: &Dialer, addr: &str, line: &str) -> anyhow::Result<SubConn> {
    let (r, mut w) = dialer.dial(addr).await?;
    w.write_all(format!("{line}\nPING\n").as_bytes()).await?;
    let mut r = BufReader::new(r);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    if line.trim_end() != "PONG" {
        bail!("subscribe: unexpected answer {line:?}");
    }
    Ok(SubConn { r, _w: w })
}

pub(super) const PAYLOAD_LEN: usize = 64;

/// [`payload`] written onto `out` without a `String` of its own (the throughput clients write
/// millions of them on the cores the brokers run on).
pub(super) fn push_payload(out: &mut Vec<u8>, seq: u64) {
    let mut digits = itoa::Buffer::new();
    let d = digits.format(seq).as_bytes();
    out.extend(std::iter::repeat_n(b'0', 20usize.saturating_sub(d.len())));
    out.extend_from_slice(d);
    out.extend(std::iter::repeat_n(
        b'x',
        PAYLOAD_LEN.saturating_sub(20.max(d.len())),
    ));
}

/// Reads `r` until `n` deliveries of `per` lines each have arrived (or 5 s pass without a
/// byte): how many did, and when the last one did. Whole reads, newlines counted with a byte
/// search: a line-at-a-time read with a timer per line was much of the client's work.
pub(super) async fn count_lines<R: tokio::io::AsyncRead + Unpin>(
    mut r: R,
    n: u64,
    per: u64,
) -> (u64, Instant) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut lines, mut last) = (0u64, Instant::now());
    while lines / per < n {
        match tokio::time::timeout(Duration::from_secs(5), r.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(k)) => {
                lines += memchr::memchr_iter(b'\n', &buf[..k]).count() as u64;
                last = Instant::now();
            }
        }
    }
    ((lines / per).min(n), last)
}

pub(super) fn payload(seq: u64) -> String {
    let mut p = format!("{seq:020}");
    while p.len() < PAYLOAD_LEN {
        p.push('x');
    }
    p
}

/// Sends `n` messages as fast as a window of `window` unacknowledged messages allows; returns
/// delivered msg/s measured from the first send to the last delivery, and how many arrived.
///
/// `window` 0: not windowed, as NATS core's publisher (which gets no acknowledgement) and
/// `peerbench`'s: every message is written as fast as the socket takes it, and the `ACK`s are
/// read and counted meanwhile; a run that does not get all `n` of them fails.
///
/// `seed`: in the seed's dialect (`PUBLISH|bench|payload`, `SUBSCRIBE|bench`, deliveries as
/// bare payload lines), as `peerbench` speaks it; otherwise identified (`PUB` with publisher,
/// seq and send time; deliveries as `MSG` lines with their stamps).
pub(super) async fn throughput(
    dialer: &Dialer,
    addr: &str,
    n: u64,
    window: u64,
    seed: bool,
) -> anyhow::Result<(f64, u64)> {
    let sub = if seed {
        subscribe_line(dialer, addr, "SUBSCRIBE|bench").await?
    } else {
        subscribe_via(dialer, addr, "bench").await?
    };
    let counter = tokio::spawn(count_lines(sub.r, n, 1));
    let (r, mut w) = dialer.dial(addr).await?;
    let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(0u64);
    let acker = tokio::spawn(async move {
        // Whole reads, lines counted with a byte search, the count published once per read.
        // Only `ACK` lines come on this connection, or an `ERR` in place of one when the
        // broker refuses a publish: the first one ends the count and the run (an `ACK` line
        // holds no `ERR`; the last bytes of a read are kept to find one cut across two).
        use tokio::io::AsyncReadExt;
        let mut r = r;
        let mut buf = vec![0u8; 64 * 1024];
        let mut carry: Vec<u8> = Vec::new();
        let mut acked = 0u64;
        while acked < n {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    let chunk = &buf[..k];
                    carry.extend_from_slice(&chunk[..k.min(2)]);
                    let err = memchr::memmem::find(&carry, b"ERR")
                        .map(|_| 0)
                        .or_else(|| memchr::memmem::find(chunk, b"ERR"));
                    if let Some(at) = err {
                        let rest = &chunk[at.min(k)..];
                        let end = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
                        return Some(String::from_utf8_lossy(&rest[..end]).into_owned());
                    }
                    carry.clear();
                    carry.extend_from_slice(&chunk[k.saturating_sub(2)..]);
                    acked += memchr::memchr_iter(b'\n', chunk).count() as u64;
                    let _ = acked_tx.send(acked);
                }
            }
        }
        None
    });
    let start = Instant::now();
    let sent_us = now_us();
    let mut seq = 0u64;
    let mut out = Vec::with_capacity(256 * 1024);
    while seq < n {
        let acked = *acked_rx.borrow();
        let room = if window == 0 {
            // Unwindowed: 600 lines (47-60 KB) per write.
            (n - seq).min(600)
        } else {
            (acked + window).saturating_sub(seq).min(n - seq)
        };
        if room == 0 {
            if acked_rx.changed().await.is_err() {
                break;
            }
            continue;
        }
        out.clear();
        for _ in 0..room {
            seq += 1;
            if seed {
                out.extend_from_slice(b"PUBLISH|bench|");
            } else {
                out.extend_from_slice(b"PUB|bench|b|");
                out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
                out.push(b'|');
                out.extend_from_slice(itoa::Buffer::new().format(sent_us).as_bytes());
                out.push(b'|');
            }
            push_payload(&mut out, seq);
            out.push(b'\n');
        }
        w.write_all(&out).await?;
    }
    let (got, last) = counter.await?;
    // Every message acknowledged, or the figure is not one of a broker doing its job.
    let all = tokio::time::timeout(Duration::from_secs(5), acked_rx.wait_for(|a| *a >= n));
    let all = matches!(all.await, Ok(Ok(_)));
    let acked = *acked_rx.borrow();
    acker.abort();
    if let Ok(Some(refusal)) = acker.await {
        bail!("the broker refused a publish: {refusal}");
    }
    if !all {
        bail!("publisher: {acked} of {n} messages acknowledged");
    }
    let secs = last.duration_since(start).as_secs_f64().max(1e-9);
    Ok((got as f64 / secs, got))
}

/// A fixed send rate for the paced figures (latency, round trip, fan-out, ours and NATS's):
/// send `i` is due `i` periods after the start, so a late wake-up does not shift the rest.
pub(super) struct Pacer {
    start: Instant,
    period: Duration,
}

impl Pacer {
    /// Starts now, at `rate` sends a second.
    pub(super) fn new(rate: u64) -> Self {
        Pacer {
            start: Instant::now(),
            period: Duration::from_secs_f64(1.0 / rate.max(1) as f64),
        }
    }

    /// How many sends `dur` holds at `rate`.
    pub(super) fn sends(rate: u64, dur: Duration) -> u64 {
        (rate as f64 * dur.as_secs_f64()) as u64
    }

    /// Waits until send `i` (from 1) is due.
    pub(super) async fn wait(&self, i: u64) {
        tokio::time::sleep_until(self.start + self.period.mul_f64(i as f64)).await;
    }
}

/// Publishes `n` messages on `topic` at `rate` msg/s on one pipelined connection (each stamped
/// with its send time) and returns the task that reads, and ignores, the broker's `ACK`s.
pub(super) async fn publish_paced(
    dialer: &Dialer,
    addr: &str,
    topic: &str,
    rate: u64,
    n: u64,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (r, mut w) = dialer.dial(addr).await?;
    let drain = tokio::spawn(async move {
        let mut r = BufReader::new(r);
        let mut line = Vec::new();
        while r.read_until(b'\n', &mut line).await.unwrap_or(0) > 0 {
            line.clear();
        }
    });
    let pace = Pacer::new(rate);
    for seq in 1..=n {
        pace.wait(seq).await;
        let line = format!("PUB|{topic}|p|{seq}|{}|{}\n", now_us(), payload(seq));
        w.write_all(line.as_bytes()).await?;
    }
    Ok(drain)
}

/// Sends `PING` at a fixed rate for `dur` on one connection and returns the histogram of the
/// round trips to the `PONG` (µs): what one exchange with a second process costs on this
/// machine, the price the replicated pair pays before each delivery (the primary's `REPL`
/// and the backup's `STORED`), measured in the same session as the latency figures.
pub(super) async fn paced_round_trip(
    addr: &str,
    rate: u64,
    dur: Duration,
) -> anyhow::Result<Histogram<u64>> {
    let (r, mut w) = Dialer::default().dial(addr).await?;
    let n = Pacer::sends(rate, dur);
    // The `PONG`s come back in the order of the `PING`s: the reader takes send times in turn.
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let reader = tokio::spawn(async move {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
        let mut r = BufReader::new(r);
        let mut line = Vec::new();
        let mut got = 0;
        while got < n {
            line.clear();
            match tokio::time::timeout(Duration::from_secs(5), r.read_until(b'\n', &mut line)).await
            {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(_)) => {
                    let now = now_us();
                    if line.starts_with(b"PONG") {
                        got += 1;
                        let Some(sent) = sent_rx.recv().await else {
                            break;
                        };
                        if let Some(h) = h.as_mut() {
                            let _ = h.record(now.saturating_sub(sent).max(1));
                        }
                    }
                }
            }
        }
        (h, got)
    });
    let pace = Pacer::new(rate);
    for i in 1..=n {
        pace.wait(i).await;
        let _ = sent_tx.send(now_us());
        w.write_all(b"PING\n").await?;
    }
    let (h, got) = reader.await?;
    if got < n {
        bail!("round trip: {got} of {n} PINGs answered");
    }
    h.context("histogram")
}

/// Sends at a fixed rate for `dur` and returns the publish→deliver latency histogram (µs), and
/// the histogram of the same latency less the message's compute time as its `MSG` stamps say
/// (`ce - cs`): what the broker and the network added.
pub(super) async fn paced_latency(
    dialer: &Dialer,
    addr: &str,
    rate: u64,
    dur: Duration,
) -> anyhow::Result<(Histogram<u64>, Histogram<u64>)> {
    let mut sub = subscribe_via(dialer, addr, "lat").await?;
    let n = Pacer::sends(rate, dur);
    let reader = tokio::spawn(async move {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
        let mut over = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
        let mut line = String::new();
        let mut got = 0;
        while got < n {
            line.clear();
            match tokio::time::timeout(Duration::from_secs(5), sub.r.read_line(&mut line)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(_)) => {
                    got += 1;
                    let now = now_us();
                    // MSG|topic|publisher|seq|sent_us|stamps|payload
                    let mut f = line.split('|');
                    let Some(sent) = f.nth(4).and_then(|s| s.parse::<u64>().ok()) else {
                        continue;
                    };
                    let latency = now.saturating_sub(sent).max(1);
                    if let Some(h) = h.as_mut() {
                        let _ = h.record(latency);
                    }
                    let stamp = |k: &str, s: &str| {
                        s.split(',')
                            .find_map(|kv| kv.strip_prefix(k))
                            .and_then(|v| v.parse::<u64>().ok())
                    };
                    if let Some(st) = f.next() {
                        if let (Some(cs), Some(ce)) = (stamp("cs=", st), stamp("ce=", st)) {
                            if let Some(o) = over.as_mut() {
                                let _ =
                                    o.record(latency.saturating_sub(ce.saturating_sub(cs)).max(1));
                            }
                        }
                    }
                }
            }
        }
        h.zip(over)
    });
    let drain = publish_paced(dialer, addr, "lat", rate, n).await?;
    let h = reader.await?.context("histogram")?;
    drain.abort();
    Ok(h)
}

/// One message to `subs` subscribers at `rate` msg/s for `dur`: p99 over messages of the spread
/// between the first and the last subscriber to receive it, and how many deliveries were lost.
pub(super) async fn fanout(
    addr: &str,
    subs: usize,
    rate: u64,
    dur: Duration,
) -> anyhow::Result<(f64, u64)> {
    let n = Pacer::sends(rate, dur);
    let mut readers = Vec::with_capacity(subs);
    for _ in 0..subs {
        let c = subscribe(addr, "fan").await?;
        readers.push(FanConn {
            c,
            line: String::new(),
        });
    }
    let tasks = arrivals(readers, n, dur + Duration::from_secs(5));
    let drain = publish_paced(&Dialer::default(), addr, "fan", rate, n).await?;
    let spread = spread_p99(tasks, n, subs).await;
    drain.abort();
    spread
}

/// The fan-out floor of this machine, measured as [`fanout`] measures a broker but with no
/// broker at all: a process of its own ([`serve_floor`], this binary again) holds the `subs`
/// connections and writes each paced line (the 64-byte payload and a newline) to every one of
/// them, one `write` each, the least any relay must do. The p99 of the first-to-last spread
/// (ms) and how many deliveries did not arrive: what a broker's spread has above it is the
/// broker's.
pub(super) async fn fanout_floor(
    subs: usize,
    rate: u64,
    dur: Duration,
) -> anyhow::Result<(f64, u64)> {
    let n = Pacer::sends(rate, dur);
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--floor-serve")
        .arg(subs.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the fan-out floor's writer")?;
    let (Some(mut to), Some(from)) = (child.stdin.take(), child.stdout.take()) else {
        bail!("the fan-out floor's writer has no pipes");
    };
    let mut port = String::new();
    BufReader::new(from).read_line(&mut port).await?;
    let addr = format!("127.0.0.1:{}", port.trim());
    let mut readers = Vec::with_capacity(subs);
    for _ in 0..subs {
        let s = TcpStream::connect(&addr)
            .await
            .with_context(|| format!("the fan-out floor's writer on {addr}"))?;
        s.set_nodelay(true)?;
        readers.push(FloorConn {
            r: BufReader::new(s),
            line: Vec::with_capacity(PAYLOAD_LEN + 1),
        });
    }
    let tasks = arrivals(readers, n, dur + Duration::from_secs(5));
    let pace = Pacer::new(rate);
    for seq in 1..=n {
        pace.wait(seq).await;
        to.write_all(format!("{seq}\n").as_bytes()).await?;
    }
    drop(to);
    let spread = spread_p99(tasks, n, subs).await;
    let status = child.wait().await?;
    anyhow::ensure!(status.success(), "the fan-out floor's writer: {status}");
    spread
}

/// The fan-out floor's writer (`bench --floor-serve N [--floor-threads T]`): listens on a free
/// loopback port and prints it, takes `subs` connections, then writes the line of each seq read
/// from standard input to every connection, until standard input ends. The seqs that came in
/// while it was writing go out together, one `write` per connection, as a relay that batches
/// sends them. With `threads` > 1 each pass splits the connections among that many threads.
pub fn serve_floor(subs: usize, threads: usize) -> anyhow::Result<()> {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    println!("{}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    let mut socks = Vec::with_capacity(subs);
    for _ in 0..subs {
        let (s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        socks.push(s);
    }
    let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<u64>>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let seq = line.map_err(anyhow::Error::from).and_then(|l| {
                l.trim()
                    .parse()
                    .context("the fan-out floor's writer takes one seq a line")
            });
            if tx.send(seq).is_err() {
                return;
            }
        }
    });
    // A subscriber that gave up has closed its end: the others go on.
    let write_all = |socks: &mut [std::net::TcpStream], lines: &[u8]| {
        for s in socks {
            let _ = s.write_all(lines);
        }
    };
    let share = subs.div_ceil(threads.max(1)).max(1);
    let mut lines = Vec::new();
    while let Ok(first) = rx.recv() {
        lines.clear();
        for seq in std::iter::once(first).chain(rx.try_iter()) {
            push_payload(&mut lines, seq?);
            lines.push(b'\n');
        }
        if threads <= 1 {
            write_all(&mut socks, &lines);
        } else {
            std::thread::scope(|sc| {
                for part in socks.chunks_mut(share) {
                    sc.spawn(|| write_all(part, &lines));
                }
            });
        }
    }
    Ok(())
}

/// The fan-out floor with the reading side taken out (`bench --only fanout`'s "writes only"
/// rows): [`serve_floor`]'s writer, with `threads` threads, writes each line to `subs`
/// connections; every receiving socket has `SO_TIMESTAMPNS` on, so each line carries the time
/// the kernel put it in that socket, whenever this side reads it. One line at a time, the next
/// once every connection has read the last (and no sooner than 10 ms after it, the figure's 100
/// msg/s), so no read holds two lines and the spread is the writer's alone. The p99 of the first-to-last
/// spread of the kernel's stamps (ms): what the machine's TCP sends alone cost a relay, with no
/// broker and no reader on the cores.
pub(super) fn fanout_floor_stamped(
    subs: usize,
    threads: usize,
    messages: u64,
) -> anyhow::Result<f64> {
    use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};
    use std::io::{BufRead, Write};
    use std::os::fd::AsRawFd;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["--floor-serve", &subs.to_string()])
        .args(["--floor-threads", &threads.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot start the fan-out floor's writer")?;
    let result = (|| {
        let (Some(to), Some(from)) = (child.stdin.as_mut(), child.stdout.take()) else {
            bail!("the fan-out floor's writer has no pipes");
        };
        let mut port = String::new();
        std::io::BufReader::new(from).read_line(&mut port)?;
        let addr = format!("127.0.0.1:{}", port.trim());
        let mut conns = Vec::with_capacity(subs);
        for _ in 0..subs {
            let s = std::net::TcpStream::connect(&addr)
                .with_context(|| format!("the fan-out floor's writer on {addr}"))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            setsockopt(&s, sockopt::ReceiveTimestampns, &true)
                .context("SO_TIMESTAMPNS on a floor connection")?;
            conns.push(s);
        }
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let mut buf = [0u8; 256];
        let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
        for seq in 1..=messages {
            let sent = std::time::Instant::now();
            writeln!(to, "{seq}")?;
            to.flush()?;
            let (mut first, mut last) = (u64::MAX, 0u64);
            for s in &conns {
                let (mut got, mut stamp) = (0usize, None);
                while got == 0 || buf[got - 1] != b'\n' {
                    let mut iov = [std::io::IoSliceMut::new(&mut buf[got..])];
                    let r =
                        recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty())
                            .context("a floor connection's read (10 s without its line?)")?;
                    if r.bytes == 0 {
                        bail!("a floor connection closed before line {seq}");
                    }
                    for c in r.cmsgs()? {
                        if let ControlMessageOwned::ScmTimestampns(t) = c {
                            stamp = Some(t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000);
                        }
                    }
                    got += r.bytes;
                    anyhow::ensure!(
                        got < buf.len(),
                        "a floor line longer than {} bytes",
                        buf.len()
                    );
                }
                anyhow::ensure!(
                    floor_seq(&buf[..got]) == Some(seq),
                    "a floor connection read {:?} where line {seq} was due",
                    String::from_utf8_lossy(&buf[..got])
                );
                let at = stamp.context("a floor line without the kernel's receive stamp")?;
                first = first.min(at);
                last = last.max(at);
            }
            h.record((last - first).max(1))?;
            std::thread::sleep(Duration::from_millis(10).saturating_sub(sent.elapsed()));
        }
        Ok(h.value_at_quantile(0.99) as f64 / 1000.0)
    })();
    if result.is_err() {
        // It may still wait in `accept` for connections that will not come.
        let _ = child.kill();
    }
    drop(child.stdin.take());
    let status = child.wait()?;
    let spread = result?;
    anyhow::ensure!(status.success(), "the fan-out floor's writer: {status}");
    Ok(spread)
}

/// The seq a fan-out floor line starts with (20 digits), if it does.
fn floor_seq(line: &[u8]) -> Option<u64> {
    std::str::from_utf8(line.get(..20)?).ok()?.parse().ok()
}

/// A connection of the fan-out floor: bare lines, each starting with its seq (20 digits).
struct FloorConn {
    r: BufReader<TcpStream>,
    line: Vec<u8>,
}

impl FanSub for FloorConn {
    async fn next_seq(&mut self) -> Option<Option<u64>> {
        self.line.clear();
        match self.r.read_until(b'\n', &mut self.line).await {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(floor_seq(&self.line)),
        }
    }
}

/// A subscriber of a fan-out run, ours or a peer's.
pub(super) trait FanSub: Send + 'static {
    /// The seq of the next line read (`Some(None)`: a line carrying none); `None` once the
    /// connection ends.
    fn next_seq(&mut self) -> impl std::future::Future<Output = Option<Option<u64>>> + Send;
}

/// Our subscriber connection (the whole of it: dropping the write half would close the
/// subscription) with its line buffer.
struct FanConn {
    c: SubConn,
    line: String,
}

impl FanSub for FanConn {
    async fn next_seq(&mut self) -> Option<Option<u64>> {
        self.line.clear();
        match self.c.r.read_line(&mut self.line).await {
            Ok(0) | Err(_) => None,
            // `MSG|topic|publisher|seq|…`
            Ok(_) => Some(self.line.split('|').nth(3).and_then(|s| s.parse().ok())),
        }
    }
}

/// One task per subscriber noting the seq and arrival time (µs) of each delivery, up to `n` of
/// them or until `give_up`. Each keeps its own list and hands it over at the end: at 10,000
/// subscribers a timer per read and a channel send per line were the client's own bottleneck
/// (a million of each a second, on the cores the broker runs on), and its lag counted as the
/// broker's spread.
pub(super) fn arrivals<S: FanSub>(
    subs: Vec<S>,
    n: u64,
    give_up: Duration,
) -> Vec<tokio::task::JoinHandle<Vec<(u64, u64)>>> {
    subs.into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut got: Vec<(u64, u64)> = Vec::with_capacity(n as usize);
                let _ = tokio::time::timeout(give_up, async {
                    while (got.len() as u64) < n {
                        let Some(seq) = s.next_seq().await else {
                            break;
                        };
                        let at = now_us();
                        if let Some(seq) = seq {
                            got.push((seq, at));
                        }
                    }
                })
                .await;
                got
            })
        })
        .collect()
}

/// What the subscriber tasks of a fan-out run saw (each a list of `(seq, arrival µs)`): the
/// p99 of each message's first-to-last arrival spread (ms), and how many of `n` messages to
/// each of `subs` subscribers did not arrive.
pub(super) async fn spread_p99(
    tasks: Vec<tokio::task::JoinHandle<Vec<(u64, u64)>>>,
    n: u64,
    subs: usize,
) -> anyhow::Result<(f64, u64)> {
    let mut first_last: std::collections::HashMap<u64, (u64, u64, usize)> = Default::default();
    for t in tasks {
        for (seq, at) in t.await? {
            let e = first_last.entry(seq).or_insert((at, at, 0));
            e.0 = e.0.min(at);
            e.1 = e.1.max(at);
            e.2 += 1;
        }
    }
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut delivered = 0u64;
    for (_, (a, b, c)) in first_last {
        h.record((b - a).max(1))?;
        delivered += c as u64;
    }
    let lost = n * subs as u64 - delivered;
    Ok((h.value_at_quantile(0.99) as f64 / 1000.0, lost))
}

/// RSS growth of the broker per idle subscriber connection, KiB.
pub(super) async fn rss_per_subscriber(b: &Broker, subs: usize) -> anyhow::Result<f64> {
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = b.rss_kib().context("cannot read the broker's RSS")?;
    let mut keep = Vec::with_capacity(subs);
    for _ in 0..subs {
        keep.push(subscribe(&b.addr, "idle").await?);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = b.rss_kib().context("cannot read the broker's RSS")?;
    drop(keep);
    Ok((after.saturating_sub(before)) as f64 / subs as f64)
}

/// The 10 Hz scenario with compute over `dur`: p50 and p99 latency (ms), and p50 and p99 of the
/// latency less each message's own compute time (ms).
pub(super) async fn compute_scenario(addr: &str, dur: Duration) -> anyhow::Result<[f64; 4]> {
    let (h, over) = paced_latency(&Dialer::default(), addr, 10, dur).await?;
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok([ms(&h, 0.5), ms(&h, 0.99), ms(&over, 0.5), ms(&over, 0.99)])
}
