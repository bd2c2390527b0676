//! Faults beyond one kill, with real processes and real signals: a paused primary that wakes up
//! after the takeover, and a killed primary that is restarted and must rejoin as backup so the
//! pair survives a second failure.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{free_port, spawn_bin, wait_status};
use edgepair::client::Delivery;

fn rows(path: &std::path::Path) -> Vec<Delivery> {
    csv::Reader::from_path(path)
        .map(|mut r| r.deserialize().flatten().collect())
        .unwrap_or_default()
}

fn wait_rows(path: &std::path::Path, n: usize, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let seqs: BTreeSet<u64> = rows(path).iter().map(|d| d.seq).collect();
        if seqs.len() >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn status(addr: &str) -> String {
    let mut c = common::LineConn::connect(addr);
    c.send_line("STATUS");
    c.read_line(Duration::from_secs(2)).unwrap_or_default()
}

fn wait_role(addr: &str, prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(addr);
        if s.starts_with(prefix) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{addr} never became {prefix}: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn woken_primary_never_delivers_after_the_backup_took_over() {
    let (pp, bp) = (free_port(), free_port());
    let (pa, ba) = (format!("127.0.0.1:{pp}"), format!("127.0.0.1:{bp}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("d.csv");
    // Long compute, so that results are in flight on the primary while it is paused.
    let primary = spawn_bin("primary", &[&pp.to_string(), &ba, "--compute", "150..250"]);
    let _backup = spawn_bin("backup", &[&bp.to_string(), &pa, "--compute", "150..250"]);
    wait_status(&pa, "primary", "up");
    wait_status(&ba, "backup", "armed");
    let sub = spawn_bin(
        "subscriber",
        &["t", &pa, &ba, "--csv", csv.to_str().expect("path")],
    );
    sub.wait_stderr("on primary");
    sub.wait_stderr("on backup");
    let total = 80u64;
    let mut publisher = spawn_bin(
        "test-publisher",
        &["t", &pa, &ba, "--rate", "20", "--count", &total.to_string()],
    );
    assert!(wait_rows(&csv, 15, Duration::from_secs(20)));
    primary.signal(libc::SIGSTOP);
    wait_role(&ba, "STATUS|primary|2|");
    // Let the new primary deliver for a while, then wake the old one up.
    let n = rows(&csv).len();
    assert!(wait_rows(&csv, n + 10, Duration::from_secs(10)));
    primary.signal(libc::SIGCONT);
    wait_role(&pa, "STATUS|backup|2|");
    let st = publisher.wait_exit(Duration::from_secs(30));
    assert!(st.is_some_and(|s| s.success()), "unacknowledged messages");
    assert!(
        wait_rows(&csv, total as usize, Duration::from_secs(10)),
        "missing messages"
    );
    let all = rows(&csv);
    let first_new = all
        .iter()
        .filter(|d| d.epoch >= 2)
        .map(|d| d.received_at_us)
        .min()
        .expect("the backup delivered after the takeover");
    let stale: Vec<&Delivery> = all
        .iter()
        .filter(|d| d.epoch == 1 && d.received_at_us > first_new)
        .collect();
    assert!(
        stale.is_empty(),
        "the woken primary delivered after the takeover: {stale:?}"
    );
}

fn broker(name: &str, port: u16, peer: &str) -> common::ChildGuard {
    spawn_bin(name, &[&port.to_string(), peer, "--compute", "10..30"])
}

#[test]
fn restarted_primary_rejoins_as_backup_and_the_pair_survives_a_second_failure() {
    let (pp, bp) = (free_port(), free_port());
    let (pa, ba) = (format!("127.0.0.1:{pp}"), format!("127.0.0.1:{bp}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("d.csv");
    let mut primary = broker("primary", pp, &ba);
    let mut backup = broker("backup", bp, &pa);
    wait_status(&pa, "primary", "up");
    wait_status(&ba, "backup", "armed");
    let sub = spawn_bin(
        "subscriber",
        &["t", &pa, &ba, "--csv", csv.to_str().expect("path")],
    );
    sub.wait_stderr("on primary");
    sub.wait_stderr("on backup");
    let total = 120u64;
    let mut publisher = spawn_bin(
        "test-publisher",
        &["t", &pa, &ba, "--rate", "20", "--count", &total.to_string()],
    );
    assert!(wait_rows(&csv, 20, Duration::from_secs(20)));
    primary.kill9();
    wait_role(&ba, "STATUS|primary|2|");
    // Restart the old primary with its original command line: it must find out that its peer
    // reigns in a newer epoch and become that node's backup.
    let _restarted = broker("primary", pp, &ba);
    wait_role(&pa, "STATUS|backup|2|");
    wait_status(&ba, "primary", "up");
    let n = rows(&csv).len();
    assert!(wait_rows(&csv, n + 10, Duration::from_secs(10)));
    backup.kill9();
    wait_role(&pa, "STATUS|primary|3|");
    let st = publisher.wait_exit(Duration::from_secs(30));
    assert!(st.is_some_and(|s| s.success()), "unacknowledged messages");
    assert!(
        wait_rows(&csv, total as usize, Duration::from_secs(10)),
        "missing after two failures: {:?}",
        {
            let seqs: BTreeSet<u64> = rows(&csv).iter().map(|d| d.seq).collect();
            (1..=total)
                .filter(|s| !seqs.contains(s))
                .collect::<Vec<_>>()
        }
    );
}
