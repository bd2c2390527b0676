//! The consumer-group figures (issue #13): how many entries a group of members acknowledges per
//! second, against Redis Streams (`XREADGROUP` + one `XACK` per entry) in alternating rounds of
//! one run; how late an entry comes back after its lease ends (lease expiry, and a member's
//! process killed); and how long an entry waits for a member while one is idle.
//!
//! The members here are lean clients of the bench (they answer every `GROUP|msg` with a
//! `GROUP|ack` and count the `GROUP|acked` answers), so the figures measure the brokers; the
//! killed member is a real `consumer` process.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::time::Instant;

use edgepair::clock::now_us;

use super::durable::{connect, start_redis, windowed, Proto};
use super::start_nodes;
use crate::procs::Proc;

/// What the group section measures, from the bench's options.
pub(super) struct GroupOpts {
    pub runs: usize,
    /// Entries the group works through in the throughput figure.
    pub entries: u64,
    pub members: usize,
    /// Entries one member may hold (ours: `max_in_flight`; Redis: `XREADGROUP COUNT`).
    pub in_flight: u32,
    pub redis: std::path::PathBuf,
    pub threads: Option<usize>,
    /// Length of the queue-wait figure (4 members working 50..150 ms at 30 entries/s).
    pub queue_for: Duration,
}

/// One line of the table: (figure, setup, runs, unit, target).
type Line = super::durable::Line;

/// The figures, each over `runs` rounds.
pub(super) async fn groups(bin_dir: &Path, o: &GroupOpts) -> anyhow::Result<Vec<Line>> {
    let redis_ok = Command::new(&o.redis)
        .arg("--version")
        .output()
        .await
        .map(|out| out.status.success())
        .unwrap_or(false);
    if !redis_ok {
        println!(
            "  ({} not found: Redis Streams left out; apt-get install -y redis-server)",
            o.redis.display()
        );
    }
    let (mut ours, mut redis) = (Vec::new(), Vec::new());
    for _ in 0..o.runs {
        let b = start_nodes(bin_dir, true, "0", None, o.threads, &[]).await?;
        ours.push(ours_rate(&b[0].addr, o).await?);
        drop(b);
        if redis_ok {
            // No persistence: our pair's log is in memory in this figure.
            let r = start_redis(&o.redis, None).await?;
            redis.push(redis_rate(&r.addr, o).await?);
        }
    }
    let mut lines: Vec<Line> = Vec::new();
    let name = format!("group of {} acks/s", o.members);
    let (mo, mr) = (super::median(ours.clone()), super::median(redis.clone()));
    lines.push((
        name.clone(),
        "replicated".into(),
        ours,
        "entries/s",
        ">= 200,000".into(),
    ));
    if redis_ok {
        lines.push((name, "redis streams".into(), redis, "entries/s", "-".into()));
        println!(
            "  group acks, ours / Redis Streams (medians, same rounds): {:.2}x",
            mo / mr.max(1e-9)
        );
    }
    let (mut expiry, mut killed) = (Vec::new(), Vec::new());
    for _ in 0..o.runs {
        let b = start_nodes(bin_dir, true, "0", None, o.threads, &[]).await?;
        expiry.push(lease_expiry_lateness(&b[0].addr).await?);
        drop(b);
        let b = start_nodes(bin_dir, true, "0", None, o.threads, &[]).await?;
        killed.push(kill_to_redelivery(bin_dir, &b[0].addr, &b[1].addr).await?);
    }
    lines.push((
        "redelivery after lease end, median".into(),
        "lease expired".into(),
        expiry,
        "ms",
        "<= 10".into(),
    ));
    lines.push((
        "redelivery after SIGKILL, median".into(),
        "member killed".into(),
        killed,
        "ms",
        "<= 10".into(),
    ));
    let (mut p50, mut p99) = (Vec::new(), Vec::new());
    for _ in 0..o.runs {
        let b = start_nodes(bin_dir, true, "0", None, o.threads, &[]).await?;
        let (a, z) = queue_wait(&b[0].addr, o.queue_for).await?;
        p50.push(a);
        p99.push(z);
    }
    lines.push((
        "queue wait, a member idle, p50".into(),
        "4 x 50..150 ms".into(),
        p50,
        "ms",
        "-".into(),
    ));
    lines.push((
        "queue wait, a member idle, p99".into(),
        "4 x 50..150 ms".into(),
        p99,
        "ms",
        "<= 2".into(),
    ));
    Ok(lines)
}

/// Sends `line` and reads lines until one starts with `want`; an `ERR` is an error.
async fn ask<R: AsyncBufReadExt + Unpin, W: AsyncWriteExt + Unpin>(
    r: &mut R,
    w: &mut W,
    line: &str,
    want: &str,
) -> anyhow::Result<()> {
    w.write_all(line.as_bytes()).await?;
    let mut got = String::new();
    loop {
        got.clear();
        if r.read_line(&mut got).await? == 0 {
            bail!("connection closed waiting for {want}");
        }
        if got.starts_with(want) {
            return Ok(());
        }
        if got.starts_with("ERR") {
            bail!("{line:?} answered {got:?}");
        }
    }
}

/// Our pair: a group from `first`, `entries` published, then the group worked through by the
/// members, each `GROUP|msg` answered by its `GROUP|ack`: acknowledged entries per second,
/// from the joins to the last `GROUP|acked`.
async fn ours_rate(addr: &str, o: &GroupOpts) -> anyhow::Result<f64> {
    // The group first: it holds the topic from its start, past the in-memory bound.
    let (mut r, mut w) = connect(addr).await?;
    ask(
        &mut r,
        &mut w,
        &format!(
            "GROUP|create|bench|g|first|ack_wait=60000,max_in_flight={}\n",
            o.in_flight
        ),
        "GROUP|created",
    )
    .await?;
    windowed(addr, Proto::Ours, o.entries, 1000).await?;
    let acked = Arc::new(AtomicU64::new(0));
    // When the last `GROUP|acked` came, µs after the start (the other members may be waiting
    // on a read then).
    let end_us = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for m in 0..o.members {
        let (addr, acked, n) = (addr.to_string(), acked.clone(), o.entries);
        let end_us = end_us.clone();
        tasks.push(tokio::spawn(async move {
            let (mut r, mut w) = connect(&addr).await?;
            w.write_all(format!("GROUP|join|bench|g|m{m}\n").as_bytes())
                .await?;
            let (mut line, mut out) = (Vec::new(), Vec::with_capacity(64 * 1024));
            while acked.load(Ordering::Relaxed) < n {
                // A read cut short by the timeout keeps what it got in `line`: cleared only
                // once a whole line was handled.
                if line.ends_with(b"\n") {
                    line.clear();
                }
                let read = tokio::time::timeout(Duration::from_millis(200), async {
                    r.read_until(b'\n', &mut line).await
                })
                .await;
                match read {
                    Err(_) => continue,
                    Ok(Ok(0)) => bail!("member m{m}: connection closed"),
                    Ok(Err(e)) => return Err(e.into()),
                    Ok(Ok(_)) => {}
                }
                if line.starts_with(b"GROUP|msg|") {
                    let offset = line
                        .split(|b| *b == b'|')
                        .nth(4)
                        .context("a GROUP|msg without an offset")?;
                    out.extend_from_slice(b"GROUP|ack|bench|g|");
                    out.extend_from_slice(offset);
                    out.push(b'\n');
                } else if line.starts_with(b"GROUP|acked|") {
                    if acked.fetch_add(1, Ordering::Relaxed) + 1 == n {
                        end_us.store(start.elapsed().as_micros() as u64, Ordering::Relaxed);
                    }
                } else if line.starts_with(b"ERR") {
                    bail!("member m{m}: {}", String::from_utf8_lossy(&line));
                }
                // Answer in one write what one read brought.
                if !out.is_empty() && !r.buffer().contains(&b'\n') {
                    w.write_all(&out).await?;
                    out.clear();
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await.context("a member task failed")??;
    }
    let secs = end_us.load(Ordering::Relaxed) as f64 / 1e6;
    Ok(o.entries as f64 / secs.max(1e-9))
}

/// A RESP command of bulk strings.
fn resp(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// One line of a RESP answer, without its `\r\n`.
async fn resp_line<R: AsyncBufReadExt + Unpin>(r: &mut R) -> anyhow::Result<Vec<u8>> {
    let mut l = Vec::new();
    if r.read_until(b'\n', &mut l).await? == 0 {
        bail!("redis closed the connection");
    }
    while l.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        l.pop();
    }
    if l.first() == Some(&b'-') {
        bail!("redis: {}", String::from_utf8_lossy(&l));
    }
    Ok(l)
}

/// The count of a RESP header line (`*N`, `$N`); -1 for a nil.
fn resp_len(l: &[u8]) -> anyhow::Result<i64> {
    std::str::from_utf8(l.get(1..).unwrap_or_default())
        .ok()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("unexpected redis answer {:?}", String::from_utf8_lossy(l)))
}

/// A bulk string's content.
async fn resp_bulk<R: AsyncBufReadExt + Unpin>(r: &mut R) -> anyhow::Result<Vec<u8>> {
    let h = resp_line(r).await?;
    if resp_len(&h)? < 0 {
        return Ok(Vec::new());
    }
    resp_line(r).await
}

/// Redis Streams measured as ours: a group from `0`, `entries` added (`XADD`), then each member
/// reading up to `in_flight` entries at a time with `XREADGROUP … >` and acknowledging each
/// with its own `XACK` (pipelined, every answer read).
async fn redis_rate(addr: &str, o: &GroupOpts) -> anyhow::Result<f64> {
    let (mut r, mut w) = connect(addr).await?;
    let mut out = Vec::new();
    resp(
        &mut out,
        &[b"XGROUP", b"CREATE", b"bench", b"g", b"0", b"MKSTREAM"],
    );
    w.write_all(&out).await?;
    resp_line(&mut r).await?;
    windowed(addr, Proto::Redis, o.entries, 1000).await?;
    let acked = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for m in 0..o.members {
        let (addr, acked, count) = (addr.to_string(), acked.clone(), o.in_flight.to_string());
        tasks.push(tokio::spawn(async move {
            let (mut r, mut w) = connect(&addr).await?;
            let name = format!("m{m}");
            let mut out = Vec::with_capacity(64 * 1024);
            loop {
                out.clear();
                resp(
                    &mut out,
                    &[
                        b"XREADGROUP",
                        b"GROUP",
                        b"g",
                        name.as_bytes(),
                        b"COUNT",
                        count.as_bytes(),
                        b"STREAMS",
                        b"bench",
                        b">",
                    ],
                );
                w.write_all(&out).await?;
                // *1 (streams) / *2 (name, entries) / $name / *K entries.
                let h = resp_line(&mut r).await?;
                if resp_len(&h)? <= 0 {
                    return anyhow::Ok(());
                }
                resp_line(&mut r).await?;
                resp_bulk(&mut r).await?;
                let k = resp_len(&resp_line(&mut r).await?)?;
                if k <= 0 {
                    return anyhow::Ok(());
                }
                out.clear();
                for _ in 0..k {
                    // *2 / $id / *2 / $f / $payload
                    resp_line(&mut r).await?;
                    let id = resp_bulk(&mut r).await?;
                    let fields = resp_len(&resp_line(&mut r).await?)?;
                    for _ in 0..fields.max(0) {
                        resp_bulk(&mut r).await?;
                    }
                    resp(&mut out, &[b"XACK", b"bench", b"g", &id]);
                }
                w.write_all(&out).await?;
                for _ in 0..k {
                    let a = resp_line(&mut r).await?;
                    if a != b":1" {
                        bail!("XACK answered {:?}", String::from_utf8_lossy(&a));
                    }
                }
                acked.fetch_add(k as u64, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.context("a Redis member task failed")??;
    }
    let n = acked.load(Ordering::Relaxed);
    if n < o.entries {
        bail!("Redis acknowledged {n} of {}", o.entries);
    }
    Ok(n as f64 / start.elapsed().as_secs_f64().max(1e-9))
}

/// Lease expiry: a member takes `n` entries and never answers; each comes back to a second
/// member when its lease (`ack_wait`) runs out. Median lateness past the lease's end, ms.
async fn lease_expiry_lateness(addr: &str) -> anyhow::Result<f64> {
    const N: u64 = 20;
    const ACK_WAIT_MS: u64 = 200;
    let (mut r, mut w) = connect(addr).await?;
    ask(
        &mut r,
        &mut w,
        &format!("GROUP|create|bench|lease|new|ack_wait={ACK_WAIT_MS},max_in_flight={N}\n"),
        "GROUP|created",
    )
    .await?;
    // The member that holds on: joins first and alone, so it gets every entry.
    let (mut hr, mut hw) = connect(addr).await?;
    ask(
        &mut hr,
        &mut hw,
        "GROUP|join|bench|lease|holder\n",
        "GROUP|joined",
    )
    .await?;
    windowed(addr, Proto::Ours, N, N).await?;
    let mut first: Vec<(u64, Instant)> = Vec::new();
    let mut line = Vec::new();
    while (first.len() as u64) < N {
        line.clear();
        if hr.read_until(b'\n', &mut line).await? == 0 {
            bail!("the holding member's connection closed");
        }
        if let Some(o) = msg_offset(&line) {
            first.push((o, Instant::now()));
        }
    }
    // The member they come back to.
    let (mut tr, mut tw) = connect(addr).await?;
    ask(
        &mut tr,
        &mut tw,
        "GROUP|join|bench|lease|taker\n",
        "GROUP|joined",
    )
    .await?;
    let mut late = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while (late.len() as u64) < N {
        line.clear();
        match tokio::time::timeout_at(deadline, tr.read_until(b'\n', &mut line)).await {
            Err(_) => bail!("only {} of {N} entries came back within 10 s", late.len()),
            Ok(Ok(0)) => bail!("the taking member's connection closed"),
            Ok(r) => {
                r?;
            }
        }
        let now = Instant::now();
        if let Some(o) = msg_offset(&line) {
            if let Some((_, t)) = first.iter().find(|(f, _)| *f == o) {
                let end = *t + Duration::from_millis(ACK_WAIT_MS);
                late.push(now.saturating_duration_since(end).as_secs_f64() * 1000.0);
            }
        }
    }
    drop((hr, hw));
    Ok(super::median(late))
}

/// The offset of a `GROUP|msg` line.
fn msg_offset(line: &[u8]) -> Option<u64> {
    if !line.starts_with(b"GROUP|msg|") {
        return None;
    }
    let f = line.split(|b| *b == b'|').nth(4)?;
    std::str::from_utf8(f).ok()?.parse().ok()
}

/// A member's process killed holding an entry: the time from the SIGKILL until another member
/// has the entry, ms (the lease ends with the connection). Median of a few kills.
async fn kill_to_redelivery(bin_dir: &Path, primary: &str, backup: &str) -> anyhow::Result<f64> {
    const KILLS: u64 = 5;
    let (mut r, mut w) = connect(primary).await?;
    ask(
        &mut r,
        &mut w,
        "GROUP|create|bench|kill|new|ack_wait=60000,max_in_flight=1\n",
        "GROUP|created",
    )
    .await?;
    let mut took = Vec::new();
    for k in 0..KILLS {
        // One entry waits in the group (no member yet); the victim, alone, gets it and works
        // on it for a minute: it holds it when it dies.
        publish_one(primary, &format!("k{k}")).await?;
        let mut child = Command::new(bin_dir.join("consumer"))
            .args(["kill", "bench", primary, backup, "--no-create", "--work"])
            .arg("60000")
            .args(["--name", &format!("victim{k}")])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the consumer binary")?;
        let stdout = child.stdout.take().context("no stdout of the consumer")?;
        let victim = Proc::new("consumer", child, Vec::new());
        let mut out = tokio::io::BufReader::new(stdout);
        // It prints a line per entry it gets.
        let mut l = String::new();
        tokio::time::timeout(Duration::from_secs(10), out.read_line(&mut l))
            .await
            .context("the consumer got no entry within 10 s")??;
        let (mut tr, mut tw) = connect(primary).await?;
        ask(
            &mut tr,
            &mut tw,
            &format!("GROUP|join|bench|kill|taker{k}\n"),
            "GROUP|joined",
        )
        .await?;
        let t = Instant::now();
        victim.signal(libc::SIGKILL);
        let mut line = Vec::new();
        loop {
            line.clear();
            tokio::time::timeout(Duration::from_secs(10), tr.read_until(b'\n', &mut line))
                .await
                .context("the killed member's entry did not come back within 10 s")??;
            if line.starts_with(b"GROUP|msg|") {
                took.push(t.elapsed().as_secs_f64() * 1000.0);
                break;
            }
        }
        // The taker acknowledges it and leaves, so the next round starts alike.
        if let Some(o) = msg_offset(&line) {
            ask(
                &mut tr,
                &mut tw,
                &format!("GROUP|ack|bench|kill|{o}\n"),
                "GROUP|acked",
            )
            .await?;
        }
        drop(victim);
    }
    Ok(super::median(took))
}

/// One `PUB` from publisher `who`, answered.
async fn publish_one(addr: &str, who: &str) -> anyhow::Result<()> {
    let (mut r, mut w) = connect(addr).await?;
    ask(
        &mut r,
        &mut w,
        &format!("PUB|bench|{who}|1|{}|x\n", now_us()),
        "ACK",
    )
    .await
}

/// Four members working 50..150 ms per entry at 30 entries/s: for each delivery, how long the
/// entry waited while some member was idle (from the later of its publishing and the earliest
/// moment a member still idle at the delivery became idle). p50 and p99, ms.
async fn queue_wait(addr: &str, dur: Duration) -> anyhow::Result<(f64, f64)> {
    const MEMBERS: usize = 4;
    let (mut r, mut w) = connect(addr).await?;
    ask(
        &mut r,
        &mut w,
        "GROUP|create|bench|work|new|ack_wait=60000,max_in_flight=1\n",
        "GROUP|created",
    )
    .await?;
    // Events on one clock (µs since the Unix epoch): (time, member, kind, sent_us).
    #[derive(Clone, Copy)]
    enum Ev {
        Idle,
        Got { sent_us: u64 },
    }
    let events = Arc::new(std::sync::Mutex::new(Vec::<(u64, usize, Ev)>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for m in 0..MEMBERS {
        let (addr, events, stop) = (addr.to_string(), events.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let (mut r, mut w) = connect(&addr).await?;
            ask(
                &mut r,
                &mut w,
                &format!("GROUP|join|bench|work|w{m}\n"),
                "GROUP|joined",
            )
            .await?;
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(m as u64 + 1);
            push_ev(&events, now_us(), m, Ev::Idle);
            let mut line = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if line.ends_with(b"\n") {
                    line.clear();
                }
                match tokio::time::timeout(
                    Duration::from_millis(200),
                    r.read_until(b'\n', &mut line),
                )
                .await
                {
                    Err(_) => continue,
                    Ok(Ok(0)) => bail!("member w{m}: connection closed"),
                    Ok(r) => {
                        r?;
                    }
                }
                let t = now_us();
                let Some(o) = msg_offset(&line) else { continue };
                let sent_us = line
                    .split(|b| *b == b'|')
                    .nth(8)
                    .and_then(|f| std::str::from_utf8(f).ok()?.parse().ok())
                    .context("a GROUP|msg without its sent time")?;
                push_ev(&events, t, m, Ev::Got { sent_us });
                tokio::time::sleep(Duration::from_millis(rand::Rng::gen_range(
                    &mut rng,
                    50..=150,
                )))
                .await;
                w.write_all(format!("GROUP|ack|bench|work|{o}\n").as_bytes())
                    .await?;
                push_ev(&events, now_us(), m, Ev::Idle);
            }
            anyhow::Ok(())
        }));
    }
    // The publisher, paced at 30 entries/s.
    let (mut pr, mut pw) = connect(addr).await?;
    let n = (dur.as_secs_f64() * 30.0) as u64;
    let t0 = Instant::now();
    let reader = tokio::spawn(async move {
        let mut l = Vec::new();
        for _ in 0..n {
            l.clear();
            if pr.read_until(b'\n', &mut l).await? == 0 {
                bail!("the publisher's connection closed");
            }
        }
        anyhow::Ok(())
    });
    for seq in 1..=n {
        tokio::time::sleep_until(t0 + Duration::from_micros(seq * 1_000_000 / 30)).await;
        pw.write_all(format!("PUB|bench|q|{seq}|{}|work\n", now_us()).as_bytes())
            .await?;
    }
    reader.await.context("the publisher's reader failed")??;
    // Let the members finish what they hold.
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.context("a working member failed")??;
    }
    let mut ev = events
        .lock()
        .map_err(|_| anyhow::anyhow!("events poisoned"))?
        .clone();
    ev.sort_by_key(|e| e.0);
    // Replay: who is idle since when; at each delivery, the wait while a member was idle.
    let mut idle_since: [Option<u64>; MEMBERS] = [None; MEMBERS];
    let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut got = 0u64;
    for (t, m, e) in ev {
        match e {
            Ev::Idle => idle_since[m] = Some(t),
            Ev::Got { sent_us } => {
                let earliest = idle_since.iter().flatten().min().copied().unwrap_or(t);
                let from = sent_us.max(earliest);
                h.record(t.saturating_sub(from).max(1))?;
                idle_since[m] = None;
                got += 1;
            }
        }
    }
    if got < n {
        bail!("only {got} of {n} entries reached a member");
    }
    Ok((
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
    ))
}

fn push_ev<E>(events: &std::sync::Mutex<Vec<(u64, usize, E)>>, t: u64, m: usize, e: E) {
    if let Ok(mut v) = events.lock() {
        v.push((t, m, e));
    }
}
