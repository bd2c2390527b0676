//! Clean stops with real processes and real signals: a primary stopped with SIGTERM refuses new
//! publishes, finishes and delivers what it acknowledged, then exits (`core/stop.rs`).

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{addr, free_port, parse_msg, solo_primary, spawn_bin_capture, wait_status, Got, SEC};

/// What a publisher's connection was answered: `ACK`ed seqs, and `ERR` lines.
#[derive(Default)]
struct Answers {
    acked: BTreeSet<u64>,
    errors: Vec<String>,
}

/// Publishes `PUB|t|p|seq|…` every `every`, from seq 1, until `stop`; a thread reads the
/// answers into the returned record.
fn stream(
    broker: &str,
    every: Duration,
    stop: Arc<Mutex<bool>>,
) -> (Arc<Mutex<Answers>>, std::thread::JoinHandle<u64>) {
    let conn = TcpStream::connect(broker).expect("connect");
    let reader = conn.try_clone().expect("clone");
    let answers = Arc::new(Mutex::new(Answers::default()));
    let record = answers.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            let mut a = record.lock().expect("lock");
            if let Some(seq) = line.strip_prefix("ACK|p|") {
                a.acked.insert(seq.parse().expect("seq"));
            } else if line.starts_with("ERR|") {
                a.errors.push(line);
            }
        }
    });
    let sender = std::thread::spawn(move || {
        let mut conn = conn;
        let start = Instant::now();
        let mut seq = 0u64;
        while !*stop.lock().expect("lock") {
            seq += 1;
            let line = format!("PUB|t|p|{seq}|1|m{seq}\n");
            if conn.write_all(line.as_bytes()).is_err() {
                break;
            }
            let next = start + every * (seq as u32);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        seq
    });
    (answers, sender)
}

#[test]
fn a_degraded_primary_stopped_with_sigterm_delivers_every_message_it_acknowledged() {
    // No backup (its port is dead) and no data directory: nothing survives the process, so
    // what it acknowledged reaches subscribers only if it delivers it before it exits.
    let (mut primary, pa) = solo_primary(&["--compute", "50..150", "--seed", "7"]);
    let mut sub = common::subscribe(&pa, "t");
    let stop = Arc::new(Mutex::new(false));
    let (answers, sender) = stream(&pa, Duration::from_millis(20), stop.clone());
    // 50 msg/s for a second: with 50–150 ms of compute, a handful are in compute at any time.
    std::thread::sleep(SEC);
    let acked_before = answers.lock().expect("lock").acked.len();
    assert!(acked_before >= 30, "only {acked_before} acknowledged");
    primary.signal(libc::SIGTERM);
    let status = primary
        .wait_exit(10 * SEC)
        .expect("the primary did not stop");
    *stop.lock().expect("lock") = true;
    let sent = sender.join().expect("sender");
    assert!(status.success(), "exit status {status:?}");

    // Everything the subscriber got before the connection closed.
    let mut delivered = BTreeSet::new();
    loop {
        match sub.next(5 * SEC) {
            Got::Line(l) if l.starts_with("MSG|") => {
                delivered.insert(parse_msg(&l).1);
            }
            Got::Line(_) => {}
            Got::Eof | Got::Failed(_) => break,
            Got::TimedOut => panic!("the subscriber's connection was left open"),
        }
    }
    let a = answers.lock().expect("lock");
    let lost: Vec<&u64> = a.acked.difference(&delivered).collect();
    assert!(
        lost.is_empty(),
        "acknowledged and never delivered: {lost:?} ({} acknowledged of {sent} sent)",
        a.acked.len()
    );
    // Publishes that came during the drain were refused, so their publisher resends them
    // elsewhere; none of them was acknowledged.
    assert!(
        a.errors.iter().any(|e| e.contains("stopping")),
        "no publish refused while draining: {:?}",
        a.errors
    );
    primary.wait_stderr("everything in flight was finished");
}

#[test]
fn a_stop_that_runs_out_of_drain_time_names_what_it_leaves() {
    let (mut primary, pa) = solo_primary(&["--compute", "5000", "--drain-timeout", "300ms"]);
    let mut publisher = common::LineConn::connect(&pa);
    publisher.send_line("PUB|t|slow|1|1|m1");
    assert_eq!(publisher.next(5 * SEC), Got::Line("ACK|slow|1".into()));
    let t = Instant::now();
    primary.signal(libc::SIGTERM);
    let status = primary
        .wait_exit(10 * SEC)
        .expect("the primary did not stop");
    let took = t.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(4),
        "stopped after {took:?} with a 300 ms drain timeout and 5 s of compute left"
    );
    assert!(
        primary.logged("work left: 1 message(s) in flight (slow:1)"),
        "the log does not name what was left"
    );
}

/// Deliveries from `sub` (seq of each `MSG`, in arrival order) until nothing came for `quiet`.
fn deliveries_until_quiet(sub: &mut common::LineConn, quiet: Duration) -> Vec<u64> {
    let mut got = Vec::new();
    while let Got::Line(l) = sub.next(quiet) {
        if l.starts_with("MSG|") {
            got.push(parse_msg(&l).1);
        }
    }
    got
}

#[test]
fn a_primary_stopped_with_sigterm_hands_its_publishers_to_the_backup_in_order() {
    let (pp, bp) = (free_port(), free_port());
    let (pa, ba) = (addr(pp), addr(bp));
    let (pport, bport) = (pp.to_string(), bp.to_string());
    let mut primary = spawn_bin_capture("primary", &[&pport, &ba, "--compute", "200"]);
    let backup = spawn_bin_capture("backup", &[&bport, &pa, "--compute", "200"]);
    wait_status(&pa, "primary", "up");
    wait_status(&ba, "backup", "armed");
    let mut on_primary = common::subscribe(&pa, "t");
    let mut on_backup = common::subscribe(&ba, "t");
    let mut publisher = spawn_bin_capture(
        "test-publisher",
        &[
            "t", &pa, &ba, "--rate", "50", "--count", "100", "--id", "p", "-q",
        ],
    );
    // A second in, with about ten messages in compute, the primary is told to stop.
    std::thread::sleep(SEC);
    primary.signal(libc::SIGTERM);
    assert!(primary.wait_exit(10 * SEC).is_some_and(|s| s.success()));
    let status = publisher
        .wait_exit(30 * SEC)
        .expect("the publisher did not finish");
    assert!(status.success(), "not every message was acknowledged");
    let mut got = deliveries_until_quiet(&mut on_primary, Duration::from_millis(100));
    got.extend(deliveries_until_quiet(&mut on_backup, 2 * SEC));
    // First deliveries in the publisher's order, all of them, none twice.
    let mut first = Vec::new();
    for s in &got {
        if !first.contains(s) {
            first.push(*s);
        }
    }
    assert_eq!(first, (1..=100).collect::<Vec<u64>>(), "got {got:?}");
    assert_eq!(got.len(), 100, "duplicates: {got:?}");
    primary.wait_stderr("everything in flight was finished");
    // The backup took over after the stop.
    backup.wait_stderr("TAKEOVER");
    // The publisher went to the backup on the primary's `ERR|stopping`, and the backup held its
    // publishes until it took over: it did not send them back (which is how a publisher's
    // messages came out of order in a chaos run).
    backup.wait_stderr("the primary is stopping: holding publishes");
    assert!(
        !publisher.logged("backup refused"),
        "the backup bounced publishes back to the stopping primary"
    );
}
