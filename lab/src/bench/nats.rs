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

use super::figures::payload;
use super::Broker;
use crate::procs::{free_port, Proc};

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
    let child = Command::new(server)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", server.display()))?;
    let addr = format!("127.0.0.1:{port}");
    let b = Broker {
        proc: Proc::new("nats-server", child, Vec::new()),
        addr: addr.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while connect(&addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("nats-server on {addr} did not greet a client within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(b)
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

/// Waits for the answer to a `PING` just sent, answering the server's own `PING`s.
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

/// `n` messages of 64 bytes published on one connection as fast as it writes, counted on
/// another: delivered msg/s (first send to last delivery) and how many arrived.
pub(super) async fn throughput(addr: &str, n: u64) -> anyhow::Result<(f64, u64)> {
    let (mut sr, mut sw) = connect(addr).await?;
    sw.write_all(b"SUB bench 1\r\nPING\r\n").await?;
    await_pong(&mut sr).await?;
    let counter = tokio::spawn(async move {
        let _keep = sw;
        let mut line = Vec::with_capacity(256);
        let (mut got, mut last) = (0u64, Instant::now());
        while got < n {
            line.clear();
            match tokio::time::timeout(Duration::from_secs(5), sr.read_until(b'\n', &mut line))
                .await
            {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(_)) if line.starts_with(b"MSG ") => {
                    // The payload line follows.
                    line.clear();
                    match sr.read_until(b'\n', &mut line).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            got += 1;
                            last = Instant::now();
                        }
                    }
                }
                Ok(Ok(_)) => {}
            }
        }
        (got, last)
    });
    let (_pr, mut pw) = connect(addr).await?;
    let start = Instant::now();
    let mut out = Vec::with_capacity(128 * 1024);
    let mut seq = 0u64;
    while seq < n {
        out.clear();
        while seq < n && out.len() < 64 * 1024 {
            seq += 1;
            let p = payload(seq);
            out.extend_from_slice(format!("PUB bench {}\r\n{p}\r\n", p.len()).as_bytes());
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
    let n = (rate as f64 * dur.as_secs_f64()) as u64;
    let (mut sr, mut sw) = connect(addr).await?;
    sw.write_all(b"SUB lat 1\r\nPING\r\n").await?;
    await_pong(&mut sr).await?;
    let reader = tokio::spawn(async move {
        let _keep = sw;
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
        let mut line = Vec::with_capacity(256);
        let mut got = 0u64;
        while got < n {
            line.clear();
            match tokio::time::timeout(Duration::from_secs(5), sr.read_until(b'\n', &mut line))
                .await
            {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(_)) if line.starts_with(b"MSG ") => {
                    line.clear();
                    if sr.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                        break;
                    }
                    got += 1;
                    let now = now_us();
                    let sent = std::str::from_utf8(line.get(..20).unwrap_or_default())
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok());
                    if let (Some(sent), Some(h)) = (sent, h.as_mut()) {
                        let _ = h.record(now.saturating_sub(sent).max(1));
                    }
                }
                Ok(Ok(_)) => {}
            }
        }
        h
    });
    let (_pr, mut pw) = connect(addr).await?;
    let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let start = Instant::now();
    for seq in 1..=n {
        tokio::time::sleep_until(start + period.mul_f64(seq as f64)).await;
        let mut p = format!("{:020}", now_us());
        while p.len() < super::figures::PAYLOAD_LEN {
            p.push('x');
        }
        pw.write_all(format!("PUB lat {}\r\n{p}\r\n", p.len()).as_bytes())
            .await?;
    }
    reader.await?.context("histogram")
}
