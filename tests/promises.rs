//! Behaviours README.md and BACKUP_SYSTEM.md promise, pinned against the real binaries over
//! loopback TCP: resends are acknowledged but delivered once, pipelined ACKs come back in order,
//! a slow subscriber is cut off at `CONNECTION_QUEUE` without hurting the others, a seed backup
//! is driven with `REPLICATE`/`CLEAR`, a primary whose backup died runs degraded and replays what
//! is in flight when it comes back, and a stopped publisher waits for its outstanding ACKs.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, spawn_bin, spawn_bin_capture, wait_status, ChildGuard, Got, LineConn};

const SEC: Duration = Duration::from_secs(1);

fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// A primary whose configured backup port has nothing listening: it runs degraded (link `down`).
fn solo_primary(extra: &[&str]) -> (ChildGuard, String) {
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
fn pair(primary_extra: &[&str], backup_extra: &[&str]) -> (ChildGuard, ChildGuard, String, String) {
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
fn subscribe(broker: &str, topic: &str) -> LineConn {
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
fn parse_msg(line: &str) -> (String, u64, u64, String) {
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

fn status(broker: &str) -> String {
    let mut c = LineConn::connect(broker);
    c.send_line("STATUS");
    match c.next(5 * SEC) {
        Got::Line(l) => l,
        other => panic!("no STATUS from {broker}: {other:?}"),
    }
}

/// Polls `f` every 20 ms until it holds or `limit` passes.
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
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
// 3. A slow subscriber is disconnected past CONNECTION_QUEUE; the others get everything.
// ---------------------------------------------------------------------------------------------

const CONNECTION_QUEUE: u64 = 8192; // edgepair::driver::CONNECTION_QUEUE, as documented
const KICK_LINE: &str = "frames behind: disconnecting it";

#[test]
fn slow_subscriber_is_disconnected_past_the_queue_bound_while_a_normal_one_gets_everything() {
    assert_eq!(edgepair::driver::CONNECTION_QUEUE as u64, CONNECTION_QUEUE);
    let (broker, pa) = solo_primary(&["--compute", "0"]);
    // The slow one: registers, then never reads.
    let mut slow = subscribe(&pa, "flood");
    // The normal one reads on its own thread and counts what it gets, in order.
    let mut normal = subscribe(&pa, "flood");
    let received = Arc::new(Mutex::new((0u64, true))); // (last seq, in order so far)
    let r2 = received.clone();
    std::thread::spawn(move || loop {
        match normal.next(30 * SEC) {
            Got::Line(l) => {
                let (_, seq, _, _) = parse_msg(&l);
                if let Ok(mut g) = r2.lock() {
                    g.1 &= seq == g.0 + 1;
                    g.0 = seq;
                }
            }
            _ => return,
        }
    });
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
        if published <= CONNECTION_QUEUE {
            // The bound cannot have been passed yet. The log line would have been written before
            // the normal subscriber got the message that caused it; give the reader of the
            // broker's stderr a moment to catch it.
            assert!(
                !wait_until(Duration::from_millis(300), || broker.logged(KICK_LINE)),
                "slow subscriber disconnected with only {published} messages published \
                 (bound {CONNECTION_QUEUE})"
            );
        } else if broker.logged(KICK_LINE) {
            kicked_after = Some(published);
        }
    }
    let kicked_after = kicked_after.unwrap_or_else(|| {
        panic!("no disconnect after {published} messages to a subscriber that never reads")
    });
    assert!(
        kicked_after > CONNECTION_QUEUE,
        "disconnected after only {kicked_after} messages (bound {CONNECTION_QUEUE})"
    );
    let (last, in_order) = received.lock().map(|g| *g).expect("lock");
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
        drained >= CONNECTION_QUEUE && drained < published,
        "the slow subscriber got {drained} of {published}: it should have been cut off after \
         at least {CONNECTION_QUEUE}"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. A seed backup (answers HELLO with anything but HELLO) is driven with REPLICATE/CLEAR.
// ---------------------------------------------------------------------------------------------

/// A fake seed backup: logs every line it receives; answers `REPLICATE` with `ACK`, `PING` with
/// `PONG`, and `HELLO` (a verb the seed does not know) with `hello_answer`, or closes on it when
/// that is `None`.
fn fake_seed_backup(hello_answer: Option<&'static str>) -> (String, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr").to_string();
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let log = log2.clone();
            std::thread::spawn(move || {
                let Ok(mut w) = s.try_clone() else { return };
                for line in BufReader::new(s).lines().map_while(Result::ok) {
                    if let Ok(mut g) = log.lock() {
                        g.push(line.clone());
                    }
                    let answer = if line.starts_with("HELLO") {
                        match hello_answer {
                            Some(a) => a,
                            None => return,
                        }
                    } else if line.starts_with("REPLICATE|") {
                        "ACK"
                    } else if line.starts_with("PING") {
                        "PONG"
                    } else if line.starts_with("CLEAR|") {
                        continue;
                    } else {
                        "ERR|unknown verb"
                    };
                    if w.write_all(format!("{answer}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (a, log)
}

fn seed_backup_gets_replicate_and_clear(hello_answer: &'static str) {
    let (fake, log) = fake_seed_backup(Some(hello_answer));
    let pp = free_port();
    let pa = addr(pp);
    let primary = spawn_bin("primary", &[&pp.to_string(), &fake, "--compute", "0..5"]);
    wait_status(&pa, "primary", "up");
    primary.wait_stderr("using seed REPLICATE/CLEAR");
    let mut sub = subscribe(&pa, "s");
    let mut p = LineConn::connect(&pa);
    for (i, payload) in ["a", "b|with pipe", "a"].iter().enumerate() {
        p.send_line(&format!("PUB|s|ps|{}|1|{payload}", i + 1));
        assert_eq!(p.next(5 * SEC), Got::Line(format!("ACK|ps|{}", i + 1)));
        match sub.next(5 * SEC) {
            Got::Line(l) => assert_eq!(parse_msg(&l).3, *payload),
            other => panic!("no delivery of {payload}: {other:?}"),
        }
    }
    let want = [
        "REPLICATE|s|a",
        "CLEAR|s|a",
        "REPLICATE|s|b|with pipe",
        "CLEAR|s|b|with pipe",
        "REPLICATE|s|a",
        "CLEAR|s|a",
    ];
    let ok = wait_until(5 * SEC, || {
        log.lock()
            .map(|g| {
                g.iter()
                    .filter(|l| l.starts_with("REPLICATE|") || l.starts_with("CLEAR|"))
                    .count()
                    >= want.len()
            })
            .unwrap_or(false)
    });
    let lines = log.lock().map(|g| g.clone()).expect("lock");
    assert!(ok, "the seed backup did not get every frame: {lines:?}");
    let data: Vec<&str> = lines
        .iter()
        .map(String::as_str)
        .filter(|l| l.starts_with("REPLICATE|") || l.starts_with("CLEAR|"))
        .collect();
    assert_eq!(data, want, "all lines: {lines:?}");
    // After the first HELLO it is never sent the identified dialect.
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("HELLO|")).count(),
        1,
        "{lines:?}"
    );
    let identified: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("REPL|") || l.starts_with("CLR|") || l.starts_with("STATUS"))
        .collect();
    assert!(
        identified.is_empty(),
        "identified frames sent to a seed backup: {identified:?}"
    );
}

#[test]
fn primary_drives_a_seed_backup_that_answers_err_to_hello_with_replicate_and_clear() {
    seed_backup_gets_replicate_and_clear("ERR|unknown verb 'HELLO'");
}

#[test]
fn primary_drives_a_seed_backup_that_answers_ack_to_hello_with_replicate_and_clear() {
    seed_backup_gets_replicate_and_clear("ACK");
}

/// BACKUP_SYSTEM.md: a `HELLO` answered by a close is "not there yet" (a backup behind a proxy
/// whose node is down looks like that), so the primary says `HELLO` again later and never
/// falls back to the seed dialect on a close alone.
#[test]
fn primary_retries_hello_on_a_backup_that_closes_without_a_word() {
    let (fake, log) = fake_seed_backup(None);
    let pp = free_port();
    let pa = addr(pp);
    let _primary = spawn_bin("primary", &[&pp.to_string(), &fake, "--compute", "0"]);
    wait_status(&pa, "primary", "down");
    let mut p = LineConn::connect(&pa);
    p.send_line("PUB|s|ps|1|1|a");
    assert_eq!(p.next(5 * SEC), Got::Line("ACK|ps|1".into()));
    let hellos = || {
        log.lock()
            .map(|g| g.iter().filter(|l| l.starts_with("HELLO|")).count())
            .unwrap_or(0)
    };
    assert!(
        wait_until(5 * SEC, || hellos() >= 3),
        "{:?}",
        log.lock().map(|g| g.clone())
    );
    let lines = log.lock().map(|g| g.clone()).unwrap_or_default();
    assert!(
        lines.iter().all(|l| l.starts_with("HELLO|")),
        "only HELLOs, never the seed dialect: {lines:?}"
    );
    wait_status(&pa, "primary", "down");
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
// 6. A stopped publisher waits for its outstanding ACKs (README: "A publisher stopped with
//    Ctrl-C still waits for its outstanding ACKs and prints published N, acknowledged N,
//    unacknowledged 0"), and reports those that never came.
// ---------------------------------------------------------------------------------------------

fn acked_seqs(lines: &[String]) -> BTreeSet<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("ACK ")?.split(' ').next()?.parse().ok())
        .collect()
}

/// `(published, acknowledged, unacknowledged seqs)` from the publisher's final line.
fn summary(lines: &[String]) -> Option<(u64, u64, Vec<u64>)> {
    let l = lines.iter().rev().find(|l| l.starts_with("published "))?;
    let nums: Vec<u64> = l
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect();
    let (published, acked, unacked) = (nums[0], nums[1], nums[2]);
    let list = nums[3..].to_vec();
    assert_eq!(list.len() as u64, unacked, "{l}");
    Some((published, acked, list))
}

#[test]
fn publisher_stopped_with_ctrl_c_waits_for_its_outstanding_acks() {
    // STORED is made late by pausing the backup; the primary would go degraded only after 5 s.
    let (_primary, backup, pa, ba) = pair(
        &["--compute", "0", "--repl-timeout", "5s"],
        &["--compute", "0", "--ping-interval", "10s"],
    );
    let mut sub = subscribe(&pa, "stop");
    let mut publisher = spawn_bin_capture(
        "test-publisher",
        &[
            "stop",
            &pa,
            &ba,
            "--rate",
            "50",
            "--ack-timeout",
            "10s",
            "--id",
            "pstop",
        ],
    );
    assert!(
        wait_until(10 * SEC, || acked_seqs(&publisher.stdout_lines()).len()
            >= 5),
        "no ACKs: {:?}",
        publisher.stdout_lines()
    );
    backup.signal(libc::SIGSTOP);
    // Outstanding ACKs: the primary delivers (compute 0 relays before STORED) messages the
    // publisher has not had acknowledged.
    let mut delivered = 0;
    let outstanding = loop {
        match sub.next(5 * SEC) {
            Got::Line(l) => delivered = delivered.max(parse_msg(&l).1),
            other => panic!("subscriber: {other:?}"),
        }
        let acked = acked_seqs(&publisher.stdout_lines());
        let top = acked.iter().max().copied().unwrap_or(0);
        if delivered >= top + 5 {
            break delivered - top;
        }
    };
    publisher.signal(libc::SIGINT);
    let at_stop = acked_seqs(&publisher.stdout_lines()).len() as u64;
    // It waits: still running a second later, with the backup still paused.
    let early = publisher.wait_exit(SEC);
    assert!(
        early.is_none(),
        "the publisher exited ({early:?}) with {outstanding}+ ACKs outstanding: {:?}",
        publisher.stdout_lines()
    );
    backup.signal(libc::SIGCONT);
    let st = publisher.wait_exit(10 * SEC);
    let out = publisher.stdout_lines();
    assert!(st.is_some_and(|s| s.success()), "{st:?}: {out:?}");
    let (published, acked, unacked) = summary(&out).expect("summary line");
    assert_eq!(
        (acked, unacked.len()),
        (published, 0),
        "every outstanding ACK must have been collected: {out:?}"
    );
    assert!(
        published > at_stop && published >= delivered,
        "published {published}, acknowledged at the stop {at_stop}, delivered {delivered}"
    );
    assert_eq!(acked_seqs(&out), (1..=published).collect::<BTreeSet<u64>>());
}

#[test]
fn publisher_stopped_while_both_brokers_are_gone_reports_the_unacknowledged_ones() {
    let (mut primary, mut backup, pa, ba) = pair(&["--compute", "0"], &["--compute", "0"]);
    let mut publisher = spawn_bin_capture(
        "test-publisher",
        &[
            "gone",
            &pa,
            &ba,
            "--rate",
            "50",
            "--give-up",
            "1s",
            "--id",
            "pgone",
        ],
    );
    assert!(
        wait_until(10 * SEC, || acked_seqs(&publisher.stdout_lines()).len()
            >= 5),
        "no ACKs: {:?}",
        publisher.stdout_lines()
    );
    primary.kill9();
    backup.kill9();
    // Let messages pile up unacknowledged: the publisher switches back and forth, refused,
    // backing off 100 ms more after each refusal past the first two, so five switches take at
    // least 600 ms: some 30 messages at 50/s, none of which can be acknowledged.
    assert!(wait_until(10 * SEC, || publisher
        .stdout_lines()
        .iter()
        .filter(|l| l.starts_with("SWITCH"))
        .count()
        >= 5));
    publisher.signal(libc::SIGINT);
    let st = publisher.wait_exit(10 * SEC);
    let out = publisher.stdout_lines();
    assert!(st.is_some_and(|s| s.code() == Some(1)), "{st:?}: {out:?}");
    let (published, acked, unacked) = summary(&out).expect("summary line");
    let acked_set = acked_seqs(&out);
    assert_eq!(acked, acked_set.len() as u64);
    assert!(!unacked.is_empty(), "{out:?}");
    let expected: Vec<u64> = (1..=published).filter(|s| !acked_set.contains(s)).collect();
    assert_eq!(
        unacked, expected,
        "the summary must list exactly the unacknowledged"
    );
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
