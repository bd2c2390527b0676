//! Failover with the real binaries over loopback TCP: at-least-once delivery when the primary is
//! SIGKILLed mid-stream, and a publish that reaches a live primary's backup is forwarded, not
//! served twice.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{free_port, spawn_bin, wait_status, LineConn};

/// Sequence numbers in a subscriber CSV (column `seq`), and how many rows came from the backup.
fn read_csv(path: &std::path::Path) -> (BTreeSet<u64>, usize) {
    let mut seqs = BTreeSet::new();
    let mut from_backup = 0;
    if let Ok(mut r) = csv::Reader::from_path(path) {
        let headers = r.headers().cloned().unwrap_or_default();
        let col = |name: &str| headers.iter().position(|h| h == name);
        let (Some(seq), Some(source)) = (col("seq"), col("source")) else {
            return (seqs, 0);
        };
        for rec in r.records().flatten() {
            if let Some(s) = rec.get(seq).and_then(|s| s.parse().ok()) {
                seqs.insert(s);
            }
            if rec.get(source) == Some("backup") {
                from_backup += 1;
            }
        }
    }
    (seqs, from_backup)
}

fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_message_is_delivered_when_the_primary_is_killed_mid_stream() {
    let (pp, bp) = (free_port(), free_port());
    let (pa, ba) = (format!("127.0.0.1:{pp}"), format!("127.0.0.1:{bp}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("deliveries.csv");
    let mut primary = spawn_bin("primary", &[&pp.to_string(), &ba, "--compute", "20..60"]);
    let _backup = spawn_bin("backup", &[&bp.to_string(), &pa, "--compute", "20..60"]);
    wait_status(&pa, "primary", "up");
    wait_status(&ba, "backup", "armed");
    let sub = spawn_bin(
        "subscriber",
        &["t", &pa, &ba, "--csv", csv.to_str().expect("utf-8 path")],
    );
    sub.wait_stderr("subscribed to 't' on primary");
    sub.wait_stderr("subscribed to 't' on backup");

    let total = 60u64;
    let mut publisher = spawn_bin(
        "test-publisher",
        &["t", &pa, &ba, "--rate", "40", "--count", &total.to_string()],
    );
    // Kill the primary mid-stream: once a third of the messages has been delivered.
    let seen = wait_for(Duration::from_secs(20), || {
        let (s, _) = read_csv(&csv);
        (s.len() as u64 >= total / 3).then_some(s.len())
    });
    assert!(seen.is_some(), "no deliveries before the kill");
    primary.kill9();

    let status = publisher.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "test-publisher did not get every message acknowledged"
    );
    let all = wait_for(Duration::from_secs(10), || {
        let (s, b) = read_csv(&csv);
        (s.len() as u64 == total).then_some((s, b))
    });
    let (seqs, _) = read_csv(&csv);
    let missing: Vec<u64> = (1..=total).filter(|s| !seqs.contains(s)).collect();
    assert!(all.is_some(), "missing after failover: {missing:?}");
    let (_, from_backup) = all.unwrap_or_default();
    assert!(
        from_backup > 0,
        "the backup delivered nothing after the kill"
    );
}

#[test]
fn publish_at_backup_of_a_live_primary_is_forwarded_not_taken_over() {
    let (pp, bp) = (free_port(), free_port());
    let (pa, ba) = (format!("127.0.0.1:{pp}"), format!("127.0.0.1:{bp}"));
    let _primary = spawn_bin("primary", &[&pp.to_string(), &ba, "--compute", "0"]);
    let _backup = spawn_bin("backup", &[&bp.to_string(), &pa, "--compute", "0"]);
    wait_status(&pa, "primary", "up");
    wait_status(&ba, "backup", "armed");
    let mut sub = LineConn::connect(&pa);
    sub.send_line("SUBSCRIBE|fw");
    // Subscription is registered before the next frame on another connection is handled only
    // if we wait for it: a PING on the same connection is answered after SUBSCRIBE is processed.
    sub.send_line("PING");
    assert_eq!(
        sub.read_line(Duration::from_secs(5)).as_deref(),
        Some("PONG")
    );

    let mut p = LineConn::connect(&ba);
    p.send_line("PUBLISH|fw|via-backup");
    assert_eq!(p.read_line(Duration::from_secs(5)).as_deref(), Some("ACK"));
    assert_eq!(
        sub.read_line(Duration::from_secs(5)).as_deref(),
        Some("via-backup"),
        "the primary should deliver a message forwarded by its backup"
    );
    let mut s = LineConn::connect(&ba);
    s.send_line("STATUS");
    let st = s.read_line(Duration::from_secs(5)).unwrap_or_default();
    assert!(st.starts_with("STATUS|backup|1|"), "backup took over: {st}");
}

#[test]
fn seed_publisher_resending_to_the_backup_loses_nothing() {
    // The seed's publisher, on a missing ACK, fires its last messages at the backup and does not
    // wait for answers. Model that: after the primary dies, write 5 PUBLISH frames on fresh
    // connections and close them at once.
    let (pp, bp) = (free_port(), free_port());
    let (pa, ba) = (format!("127.0.0.1:{pp}"), format!("127.0.0.1:{bp}"));
    let mut primary = spawn_bin("primary", &[&pp.to_string(), &ba, "--compute", "0"]);
    let _backup = spawn_bin(
        "backup",
        &[
            &bp.to_string(),
            &pa,
            "--compute",
            "0",
            "--ping-interval",
            "10s",
        ],
    );
    wait_status(&pa, "primary", "up");
    wait_status(&ba, "backup", "armed");
    let mut sub = LineConn::connect(&ba);
    sub.send_line("SUBSCRIBE|legacy");
    sub.send_line("PING");
    assert_eq!(
        sub.read_line(Duration::from_secs(5)).as_deref(),
        Some("PONG")
    );
    primary.kill9();
    for i in 1..=5 {
        let mut c = LineConn::connect(&ba);
        c.send_line(&format!("PUBLISH|legacy|m{i}"));
        // dropped at once: fire and forget
    }
    let mut got = Vec::new();
    while got.len() < 5 {
        match sub.read_line(Duration::from_secs(10)) {
            Some(l) => got.push(l),
            None => break,
        }
    }
    got.sort();
    assert_eq!(got, vec!["m1", "m2", "m3", "m4", "m5"]);
}
