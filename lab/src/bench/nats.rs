//! NATS core as the yardstick of the relay figures: `nats-server` started on a free loopback
//! port for each run, and a lean client of its text protocol doing what our throughput client
//! does (one publisher writing 64-byte payloads as fast as it can, one subscriber counting
//! deliveries), so that our figures can be printed as ratios to it from the same session.
//!
//! NATS core does not acknowledge a publish, so its publisher is not windowed: its figure is
//! delivered messages per second, from the first send to the last delivery, like ours.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::time::Instant;

use edgepair::clock::now_us;

use super::figures::{
    arrivals, count_lines, payload, push_payload, spread_p99, FanSub, Pacer, PAYLOAD_LEN,
};
use super::Broker;
use crate::procs::free_port;

/// True when `server --version` runs.
pub(super) async fn available(server: &Path) -> bool {
    Command::new(server)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// Starts `nats-server` on a free loopback port and waits until it greets a client.
pub(super) async fn start(server: &Path) -> anyhow::Result<Broker> {
    let port = free_port()?;
    let args = ["-a", "127.0.0.1", "-p", &port.to_string()].map(std::ffi::OsString::from);
    super::start_peer(
        "nats-server",
        server,
        &args,
        format!("127.0.0.1:{port}"),
        |addr| async move { connect(&addr).await.is_ok() },
    )
    .await
}

type Halves = (
    BufReader<tokio::net::tcp::OwnedReadHalf>,
    tokio::net::tcp::OwnedWriteHalf,
);

/// A client connection past the server's `INFO`, with `CONNECT` sent (no `+OK` echoes).
async fn connect(addr: &str) -> anyhow::Result<Halves> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    if !line.starts_with("INFO") {
        bail!("nats: expected INFO, got {line:?}");
    }
    w.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n")
        .await?;
    Ok((r, w))
}

/// Waits for the answer to a `PING` just sent (other lines are skipped).
async fn await_pong(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> anyhow::Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            bail!("nats: connection closed before PONG");
        }
        match line.trim_end() {
            "PONG" => return Ok(()),
            l if l.starts_with("-ERR") => bail!("nats: {l}"),
            _ => {}
        }
    }
}

/// A subscription on its own connection, registered (its `PING` answered).
struct Sub {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    /// Kept so the server does not see the connection close.
    _w: tokio::net::tcp::OwnedWriteHalf,
    /// The payload of the last delivery, newline included.
    line: Vec<u8>,
}

async fn subscribe(addr: &str, subject: &str) -> anyhow::Result<Sub> {
    let (mut r, mut w) = connect(addr).await?;
    w.write_all(format!("SUB {subject} 1\r\nPING\r\n").as_bytes())
        .await?;
    await_pong(&mut r).await?;
    Ok(Sub {
        r,
        _w: w,
        line: Vec::with_capacity(256),
    })
}

impl Sub {
    /// Reads up to the next delivery and puts its payload line in `line` (other lines are
    /// skipped); false when the connection ends or 5 s pass without a line.
    async fn next_payload(&mut self) -> bool {
        loop {
            self.line.clear();
            let read = self.r.read_until(b'\n', &mut self.line);
            match tokio::time::timeout(Duration::from_secs(5), read).await {
                Ok(Ok(n)) if n > 0 && self.line.starts_with(b"MSG ") => {
                    // The payload line follows.
                    self.line.clear();
                    return matches!(self.r.read_until(b'\n', &mut self.line).await, Ok(n) if n > 0);
                }
                Ok(Ok(n)) if n > 0 => {}
                _ => return false,
            }
        }
    }
}

impl FanSub for Sub {
    async fn next_seq(&mut self) -> Option<Option<u64>> {
        if !self.next_payload().await {
            return None;
        }
        // The payload starts with the seq, 20 digits.
        let seq = std::str::from_utf8(self.line.get(..20).unwrap_or_default()).ok();
        Some(seq.and_then(|s| s.parse().ok()))
    }
}

/// `n` messages of 64 bytes published on one connection as fast as it writes, counted on
/// another: delivered msg/s (first send to last delivery) and how many arrived.
pub(super) async fn throughput(addr: &str, n: u64) -> anyhow::Result<(f64, u64)> {
    let sub = subscribe(addr, "bench").await?;
    let (r, _keep) = (sub.r, sub._w);
    // Two lines a delivery: `MSG bench 1 64` and the payload.
    let counter = tokio::spawn(count_lines(r, n, 2));
    let (_pr, mut pw) = connect(addr).await?;
    let start = Instant::now();
    let mut out = Vec::with_capacity(128 * 1024);
    let mut seq = 0u64;
    let head = format!("PUB bench {PAYLOAD_LEN}\r\n");
    while seq < n {
        out.clear();
        while seq < n && out.len() < 64 * 1024 {
            seq += 1;
            out.extend_from_slice(head.as_bytes());
            push_payload(&mut out, seq);
            out.extend_from_slice(b"\r\n");
        }
        pw.write_all(&out).await?;
    }
    let (got, last) = counter.await?;
    let secs = last.duration_since(start).as_secs_f64().max(1e-9);
    Ok((got as f64 / secs, got))
}

/// A paced `rate` msg/s for `dur` on one connection, each payload starting with its send time
/// (µs, 20 digits); another connection receives them: the publish→deliver histogram (µs).
pub(super) async fn paced_latency(
    addr: &str,
    rate: u64,
    dur: Duration,
) -> anyhow::Result<hdrhistogram::Histogram<u64>> {
    let n = Pacer::sends(rate, dur);
    let mut sub = subscribe(addr, "lat").await?;
    let reader = tokio::spawn(async move {
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
        let mut got = 0u64;
        while got < n && sub.next_payload().await {
            got += 1;
            let now = now_us();
            let sent = std::str::from_utf8(sub.line.get(..20).unwrap_or_default())
                .ok()
                .and_then(|s| s.parse::<u64>().ok());
            if let (Some(sent), Some(h)) = (sent, h.as_mut()) {
                let _ = h.record(now.saturating_sub(sent).max(1));
            }
        }
        h
    });
    let (_pr, mut pw) = connect(addr).await?;
    let pace = Pacer::new(rate);
    for seq in 1..=n {
        pace.wait(seq).await;
        let p = payload(now_us());
        pw.write_all(format!("PUB lat {}\r\n{p}\r\n", p.len()).as_bytes())
            .await?;
    }
    reader.await?.context("histogram")
}

/// The fan-out figure against NATS core, as [`super::figures::fanout`] measures ours: `subs`
/// subscribers on their own connections, `rate` msg/s published for `dur`, each subscriber
/// noting when each message arrived; the p99 of the first-to-last spread (ms) and how many
/// deliveries did not arrive.
pub(super) async fn fanout(
    addr: &str,
    subs: usize,
    rate: u64,
    dur: Duration,
) -> anyhow::Result<(f64, u64)> {
    let n = Pacer::sends(rate, dur);
    let mut readers = Vec::with_capacity(subs);
    for _ in 0..subs {
        readers.push(subscribe(addr, "fan").await?);
    }
    let tasks = arrivals(readers, n, dur + Duration::from_secs(5));
    let (_pr, mut pw) = connect(addr).await?;
    let pace = Pacer::new(rate);
    for seq in 1..=n {
        pace.wait(seq).await;
        let p = payload(seq);
        pw.write_all(format!("PUB fan {}\r\n{p}\r\n", p.len()).as_bytes())
            .await?;
    }
    spread_p99(tasks, n, subs).await
}
