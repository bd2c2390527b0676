//! Behaviours README.md and BACKUP_SYSTEM.md promise, pinned against the real binaries over
//! loopback TCP: resends are acknowledged but delivered once, pipelined ACKs come back in order,
//! a slow subscriber is cut off at `--max-pending` without hurting the others, a primary whose
//! backup died runs degraded and replays what is in flight when it comes back, and a publisher
//! that never reads its answers is paced. (Seed backups: `seed_backup.rs`; stopped publishers:
//! `publisher_stops.rs`.)

mod common;

use std::io::{BufRead, BufReader, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

// ---------------------------------------------------------------------------------------------
// 1. A resent identified PUB is acknowledged again but delivered once.
// ---------------------------------------------------------------------------------------------

fn resent_pub_is_acked_and_delivered_once(broker: &str) {
    let mut sub = subscribe(broker, "dup");
    let mut first = LineConn::connect(broker);
    first.send_line("PUB|dup|pz|1|1000|once");
    assert_eq!(first.next(5 * SEC), Got::Line("ACK|pz|1".into()));
    drop(first);
    // The same identity again on a new connection, as a publisher does after a switch.
    let mut again = LineConn::connect(broker);
    again.send_line("PUB|dup|pz|1|1000|once");
    assert_eq!(
        again.next(5 * SEC),
        Got::Line("ACK|pz|1".into()),
        "a resend must be acknowledged again"
    );
    // A marker after it: per-publisher order means a second delivery of seq 1 would come first.
    again.send_line("PUB|dup|pz|2|1001|marker");
    assert_eq!(again.next(5 * SEC), Got::Line("ACK|pz|2".into()));
    let mut got = Vec::new();
    loop {
        match sub.next(5 * SEC) {
            Got::Line(l) => {
                let (p, seq, _, payload) = parse_msg(&l);
                got.push((p, seq, payload));
                if seq == 2 {
                    break;
                }
            }
            other => panic!("subscriber got {other:?} before the marker; so far {got:?}"),
        }
    }
    assert_eq!(
        got,
        vec![
            ("pz".to_string(), 1, "once".to_string()),
            ("pz".to_string(), 2, "marker".to_string())
        ],
        "the resend was delivered a second time"
    );
}

#[test]
fn resent_pub_is_acked_again_and_delivered_once_on_a_solo_primary() {
    let (_p, pa) = solo_primary(&["--compute", "0"]);
    resent_pub_is_acked_and_delivered_once(&pa);
}

#[test]
fn resent_pub_is_acked_again_and_delivered_once_on_a_replicated_pair() {
    let (_p, _b, pa, _ba) = pair(&["--compute", "0..5"], &["--compute", "0"]);
    resent_pub_is_acked_and_delivered_once(&pa);
}

// ---------------------------------------------------------------------------------------------
// 2. Pipelined ACKs come back in send order.
// ---------------------------------------------------------------------------------------------

fn pipelined_acks_in_order(broker: &str, n: u64) {
    let mut c = LineConn::connect(broker);
    let mut burst = String::new();
    for seq in 1..=n {
        burst.push_str(&format!("PUB|order|pp|{seq}|{seq}|m{seq}\n"));
    }
    // All of them before reading a single answer.
    c.send_bytes(burst.as_bytes());
    let mut acks = Vec::new();
    while (acks.len() as u64) < n {
        match c.next(10 * SEC) {
            Got::Line(l) => acks.push(l),
            other => panic!("after {} ACKs: {other:?}", acks.len()),
        }
    }
    let want: Vec<String> = (1..=n).map(|s| format!("ACK|pp|{s}")).collect();
    if acks != want {
        let first_bad = acks
            .iter()
            .zip(&want)
            .position(|(a, w)| a != w)
            .unwrap_or(0);
        panic!(
            "ACKs out of order from index {first_bad}: got {:?}, want {:?}",
            &acks[first_bad..(first_bad + 5).min(acks.len())],
            &want[first_bad..(first_bad + 5).min(want.len())]
        );
    }
}

#[test]
fn pipelined_acks_come_back_in_send_order_with_a_backup() {
    // ACKs wait for the backup's STORED here (link up).
    let (_p, _b, pa, _ba) = pair(&["--compute", "0"], &["--compute", "0"]);
    pipelined_acks_in_order(&pa, 1000);
    assert!(
        status(&pa).starts_with("STATUS|primary|1|up|"),
        "the link must have stayed up (ACKs after STORED, not degraded)"
    );
}

#[test]
fn pipelined_acks_come_back_in_send_order_when_degraded() {
    let (_p, pa) = solo_primary(&["--compute", "0"]);
    pipelined_acks_in_order(&pa, 1000);
}

#[test]
fn pipelined_acks_come_back_in_send_order_with_compute() {
    // With compute on, results finish out of order; ACKs must not.
    let (_p, _b, pa, _ba) = pair(&["--compute", "0..20"], &["--compute", "0"]);
    pipelined_acks_in_order(&pa, 500);
}

// ---------------------------------------------------------------------------------------------
// 3. A slow subscriber is disconnected past --max-pending; the others get everything.
// ---------------------------------------------------------------------------------------------

/// The bound this test runs with (`--max-pending 1M`; the default is 64 MiB, as documented).
const MAX_PENDING: u64 = 1 << 20;
const KICK_LINE: &str = "not read (--max-pending 1048576): disconnecting it";

#[test]
fn slow_subscriber_is_disconnected_past_the_queue_bound_while_a_normal_one_gets_everything() {
    assert_eq!(edgepair::driver::MAX_PENDING, 64 << 20);
    let (broker, pa) = solo_primary(&["--compute", "0", "--max-pending", "1M"]);
    // The slow one: registers, then never reads.
    let mut slow = subscribe(&pa, "flood");
    // The normal one reads on its own thread and counts what it gets, in order.
    let mut normal = subscribe(&pa, "flood");
    // (last seq, in order so far, longest line: the slow one is sent the same lines)
    let received = Arc::new(Mutex::new((0u64, true, 0u64)));
    let r2 = received.clone();
    std::thread::spawn(move || loop {
        match normal.next(30 * SEC) {
            Got::Line(l) => {
                let (_, seq, _, _) = parse_msg(&l);
                if let Ok(mut g) = r2.lock() {
                    g.1 &= seq == g.0 + 1;
                    g.0 = seq;
                    g.2 = g.2.max(l.len() as u64 + 1);
                }
            }
            _ => return,
        }
    });
    let longest = || received.lock().map(|g| g.2).unwrap_or(0);
    let mut publisher = LineConn::connect(&pa);
    let batch = 1024u64;
    let mut published = 0u64;
    let mut kicked_after = None;
    // A payload of some size so the kernel buffers (loopback, autotuned) fill in fewer messages.
    let pad = "x".repeat(200);
    let limit = Instant::now() + Duration::from_secs(15);
    while kicked_after.is_none() && Instant::now() < limit {
        let mut burst = String::new();
        for seq in published + 1..=published + batch {
            burst.push_str(&format!("PUB|flood|pf|{seq}|{seq}|{pad}\n"));
        }
        publisher.send_bytes(burst.as_bytes());
        for seq in published + 1..=published + batch {
            assert_eq!(publisher.next(10 * SEC), Got::Line(format!("ACK|pf|{seq}")));
        }
        published += batch;
        // Keep the normal subscriber's queue short: wait until it has caught up.
        assert!(
            wait_until(10 * SEC, || received.lock().map(|g| g.0).unwrap_or(0)
                == published),
            "the normal subscriber fell behind: {:?} of {published}",
            received.lock().map(|g| *g)
        );
        if published * longest() < MAX_PENDING {
            // The bound cannot have been passed yet. The log line would have been written before
            // the normal subscriber got the message that caused it; give the reader of the
            // broker's stderr a moment to catch it.
            assert!(
                !wait_until(Duration::from_millis(300), || broker.logged(KICK_LINE)),
                "slow subscriber disconnected with only {published} messages published \
                 (bound {MAX_PENDING} bytes)"
            );
        } else if broker.logged(KICK_LINE) {
            kicked_after = Some(published);
        }
    }
    let kicked_after = kicked_after.unwrap_or_else(|| {
        panic!("no disconnect after {published} messages to a subscriber that never reads")
    });
    assert!(
        kicked_after * longest() >= MAX_PENDING,
        "disconnected after only {kicked_after} messages (bound {MAX_PENDING} bytes)"
    );
    let (last, in_order, _) = received.lock().map(|g| *g).expect("lock");
    assert_eq!(
        last, published,
        "the normal subscriber must get every message"
    );
    assert!(in_order, "the normal subscriber saw a gap or reorder");
    // The broker closes the slow connection: after draining what it had queued, EOF (not a
    // timeout, which would mean the connection was left open).
    let mut drained = 0u64;
    let mut last_seq = 0u64;
    let end = loop {
        match slow.next(5 * SEC) {
            Got::Line(l) => {
                let (_, seq, _, _) = parse_msg(&l);
                assert_eq!(seq, last_seq + 1, "the slow subscriber's stream has a hole");
                last_seq = seq;
                drained += 1;
            }
            other => break other,
        }
    };
    assert!(
        matches!(end, Got::Eof | Got::Failed(_)),
        "slow connection not closed by the broker: {end:?} after {drained} messages"
    );
    eprintln!("slow subscriber: cut off after {kicked_after} published, drained {drained}");
    assert!(
        drained * longest() >= MAX_PENDING && drained < published,
        "the slow subscriber got {drained} of {published}: it should have been cut off after \
         at least {MAX_PENDING} bytes"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Backup dies: degraded, ACKs go on; backup returns: what is in flight is replayed to it.
// ---------------------------------------------------------------------------------------------

#[test]
fn primary_runs_degraded_without_its_backup_and_replays_in_flight_messages_when_it_returns() {
    let (pp, bp) = (free_port(), free_port());
    let (pa, ba) = (addr(pp), addr(bp));
    // Long compute on the primary keeps messages in flight; the backup's own compute (used if it
    // takes over) is short so its replay shows quickly.
    let mut primary = spawn_bin(
        "primary",
        &[&pp.to_string(), &ba, "--compute", "8000", "--seed", "1"],
    );
    let backup_args = [
        bp.to_string(),
        pa.clone(),
        "--compute".into(),
        "0..20".into(),
    ];
    let backup_argv: Vec<&str> = backup_args.iter().map(String::as_str).collect();
    let mut backup = spawn_bin("backup", &backup_argv);
    wait_status(&pa, "primary", "up");
    wait_status(&ba, "backup", "armed");

    backup.kill9();
    wait_status(&pa, "primary", "down");
    // Degraded: publishes are still acknowledged, at once (no STORED to wait for).
    let mut p = LineConn::connect(&pa);
    for seq in 1..=3 {
        let t = Instant::now();
        p.send_line(&format!("PUB|deg|pd|{seq}|{seq}|m{seq}"));
        assert_eq!(p.next(5 * SEC), Got::Line(format!("ACK|pd|{seq}")));
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "degraded ACK took {:?}",
            t.elapsed()
        );
    }
    let st = status(&pa);
    assert!(st.starts_with("STATUS|primary|1|down|0|3"), "{st}");

    // The backup comes back on the same port: the primary sends it what is in flight.
    let backup = spawn_bin("backup", &backup_argv);
    wait_status(&pa, "primary", "up");
    primary.wait_stderr("3 message(s) in flight sent");
    assert!(
        wait_until(3 * SEC, || status(&ba)
            .starts_with("STATUS|backup|1|armed|3|")),
        "the returning backup does not hold the 3 in-flight messages: {}",
        status(&ba)
    );
    // And it can deliver them: kill the primary before its compute ends; the backup takes over
    // and delivers all three, in order, in epoch 2.
    let mut sub = subscribe(&ba, "deg");
    primary.kill9();
    let mut got = Vec::new();
    while got.len() < 3 {
        match sub.next(5 * SEC) {
            Got::Line(l) => {
                let (p, seq, epoch, payload) = parse_msg(&l);
                got.push((p, seq, epoch, payload));
            }
            other => panic!("after {got:?}: {other:?}; backup log {:?}", backup.stderr),
        }
    }
    let want: Vec<(String, u64, u64, String)> = (1..=3)
        .map(|s| ("pd".to_string(), s, 2, format!("m{s}")))
        .collect();
    assert_eq!(got, want);
}

// ---------------------------------------------------------------------------------------------
// A client that pipelines without reading its answers is paced, not buffered without bound.
// ---------------------------------------------------------------------------------------------

/// Writes `data` without blocking until it is all written or `limit` passes; returns how much
/// was written.
fn write_for(s: &mut std::net::TcpStream, data: &[u8], limit: Duration) -> usize {
    let end = Instant::now() + limit;
    let mut done = 0;
    while done < data.len() && Instant::now() < end {
        match s.write(&data[done..]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("write failed: {e}"),
        }
    }
    done
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_publisher_that_never_reads_its_acks_is_paced_and_resumes_when_it_reads() {
    let (pp, dead) = (free_port(), free_port());
    let pa = addr(pp);
    let primary = spawn_bin("primary", &[&pp.to_string(), &addr(dead), "--compute", "0"]);
    wait_status(&pa, "primary", "down");
    let pid = primary.child.id();
    let before = rss_kib(pid);
    // 1,000,000 publishes (25 MB) answered by 14 MB of ACKs: more than the socket buffers on
    // both sides hold (a few MB each way on loopback).
    let n = 1_000_000u64;
    let mut data = Vec::new();
    for seq in 1..=n {
        data.extend_from_slice(format!("PUB|pace|pq|{seq}|1|x\n").as_bytes());
    }
    let mut s = std::net::TcpStream::connect(&pa).expect("connect");
    s.set_nonblocking(true).expect("nonblocking");
    let first = write_for(&mut s, &data, 5 * SEC);
    assert!(
        first < data.len(),
        "all {} bytes taken while no answer was read",
        data.len()
    );
    // A broker that kept reading would hold every answer it could not write: hundreds of
    // thousands of lines (each a buffer of its own) in 5 s. A paced one holds 8,192.
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(
        grown < 32 * 1024,
        "the broker grew by {grown} KiB while its client did not read"
    );
    // Read the answers (in order) while writing the rest: everything goes through.
    let reader = s.try_clone().expect("clone");
    reader.set_nonblocking(false).expect("blocking");
    reader
        .set_read_timeout(Some(10 * SEC))
        .expect("read timeout");
    let acks = std::thread::spawn(move || {
        let mut next = 1u64;
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            assert_eq!(line, format!("ACK|pq|{next}"), "ACKs in order");
            next += 1;
            if next > n {
                break;
            }
        }
        next - 1
    });
    let rest = write_for(&mut s, &data[first..], 60 * SEC);
    assert_eq!(first + rest, data.len(), "writing did not resume");
    assert_eq!(acks.join().expect("reader"), n);
}

/// Open file descriptors of a process (its sockets among them).
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// BACKUP_SYSTEM.md: a subscriber cut off for being too far behind that does not read at all
/// is cut after `KICK_GRACE` (2 s); it does not keep its connection for ever.
#[test]
fn a_kicked_subscriber_that_never_reads_loses_its_connection_after_the_grace() {
    let (broker, pa) = solo_primary(&["--compute", "0", "--max-pending", "1M"]);
    let pid = broker.child.id();
    let _slow = subscribe(&pa, "cut");
    let mut publisher = LineConn::connect(&pa);
    let pad = "x".repeat(200);
    let mut published = 0u64;
    let limit = Instant::now() + Duration::from_secs(15);
    while !broker.logged(KICK_LINE) && Instant::now() < limit {
        let mut burst = String::new();
        for seq in published + 1..=published + 1024 {
            burst.push_str(&format!("PUB|cut|pc|{seq}|{seq}|{pad}\n"));
        }
        publisher.send_bytes(burst.as_bytes());
        for seq in published + 1..=published + 1024 {
            assert_eq!(publisher.next(10 * SEC), Got::Line(format!("ACK|pc|{seq}")));
        }
        published += 1024;
    }
    // It was disconnected (its log says so, a moment after the close perhaps).
    broker.wait_stderr(KICK_LINE);
    let kicked = open_fds(pid);
    // The slow subscriber still does not read: its socket must go within the grace (2 s).
    assert!(
        wait_until(5 * SEC, || open_fds(pid) < kicked),
        "the broker still holds the kicked subscriber's connection ({kicked} fds)"
    );
}
