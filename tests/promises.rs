//! Behaviours README.md and BACKUP_SYSTEM.md promise, pinned against the real binaries over
//! loopback TCP: resends are acknowledged but delivered once, pipelined ACKs come back in order,
//! a slow subscriber is cut off at `CONNECTION_QUEUE` without hurting the others, a seed backup
//! is driven with `REPLICATE`/`CLEAR`, a primary whose backup died runs degraded and replays what
//! is in flight when it comes back, and a stopped publisher waits for its outstanding ACKs.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, spawn_bin, wait_status, ChildGuard, Got, LineConn};

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

const CONNECTION_QUEUE: u64 = 8192; // edgepair::node::CONNECTION_QUEUE, as documented
const KICK_LINE: &str = "frames behind: disconnecting it";

#[test]
fn slow_subscriber_is_disconnected_past_the_queue_bound_while_a_normal_one_gets_everything() {
    assert_eq!(edgepair::node::CONNECTION_QUEUE as u64, CONNECTION_QUEUE);
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
