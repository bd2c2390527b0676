//! Consumer groups with the real binaries: three `consumer` processes share a topic; one
//! crashes mid-run holding an entry, then the primary is SIGKILLed. Every entry ends
//! acknowledged by exactly one member, and what the crashed one held went to another.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;
use edgepair::client::Consumed;

fn rows(csv: &Path) -> Vec<Consumed> {
    let Ok(mut r) = csv::Reader::from_path(csv) else {
        return Vec::new();
    };
    r.deserialize().filter_map(Result::ok).collect()
}

#[test]
fn a_group_shares_the_work_and_loses_nothing_to_a_crashed_member_or_a_dead_primary() {
    let (mut primary, _backup, pa, ba) = pair(&["--compute", "0"], &["--compute", "0"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = |n: &str| dir.path().join(format!("{n}.csv"));
    let consumer = |name: &str, extra: &[&str]| {
        let file = csv(name);
        let mut a = vec![
            "g",
            "jobs",
            &pa,
            &ba,
            "--name",
            name,
            "--work",
            "5..15",
            "--ack-wait",
            "1s",
            "--csv",
        ];
        let file = file.display().to_string();
        a.push(&file);
        a.extend_from_slice(extra);
        let g = spawn_bin("consumer", &a);
        g.wait_stderr(&format!("joined group 'g' on 'jobs' as {name} on primary"));
        g
    };
    let _one = consumer("one", &[]);
    let mut two = consumer("two", &["--crash-after", "5"]);
    let _three = consumer("three", &[]);
    let n = 60u64;
    let publisher = spawn_bin(
        "test-publisher",
        &["jobs", &pa, &ba, "--rate", "100", "--count", &n.to_string()],
    );
    // The crashed member's last entry was never answered: it goes to another at once.
    assert_eq!(
        two.wait_exit(Duration::from_secs(20))
            .and_then(|s| s.code()),
        Some(3),
        "--crash-after exits 3"
    );
    assert!(wait_until(Duration::from_secs(20), || {
        ["one", "three"]
            .iter()
            .flat_map(|c| rows(&csv(c)))
            .filter(|r| r.outcome == "acked")
            .count()
            >= 25
    }));
    primary.kill9();
    let mut publisher = publisher;
    assert!(
        publisher
            .wait_exit(Duration::from_secs(30))
            .is_some_and(|s| s.success()),
        "every publish acknowledged"
    );
    // Everything acknowledged by exactly one member, on whichever node served it. An ack whose
    // answer never came (the primary died first) may have been stored, and then the entry is
    // rightly never delivered again: it counts as finished, and the listing below shows the
    // group's floor past every entry.
    let mut acked: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let done = wait_until(Duration::from_secs(30), || {
        acked.clear();
        for c in ["one", "two", "three"] {
            for r in rows(&csv(c))
                .into_iter()
                .filter(|r| r.outcome == "acked" || r.outcome == "unconfirmed")
            {
                acked.entry(r.offset).or_default().push(r.outcome.clone());
            }
        }
        acked.len() as u64 == n
    });
    let missing: Vec<u64> = (0..n).filter(|o| !acked.contains_key(o)).collect();
    assert!(
        done,
        "acknowledged {} of {n}: missing {missing:?}; their rows: {:?}",
        acked.len(),
        ["one", "two", "three"]
            .iter()
            .flat_map(|c| rows(&csv(c)))
            .filter(|r| missing.contains(&r.offset))
            .collect::<Vec<_>>()
    );
    let twice: Vec<_> = acked
        .iter()
        .filter(|(_, how)| how.iter().filter(|o| *o == "acked").count() > 1)
        .collect();
    assert!(twice.is_empty(), "acknowledged twice: {twice:?}");
    let crashed = rows(&csv("two"))
        .into_iter()
        .find(|r| r.outcome == "crashed")
        .expect("the crashed entry is in two's CSV");
    let again: Vec<Consumed> = ["one", "three"]
        .iter()
        .flat_map(|c| rows(&csv(c)))
        .filter(|r| r.offset == crashed.offset)
        .collect();
    assert!(
        again.iter().any(|r| r.attempt >= 2 && r.outcome == "acked"),
        "{crashed:?} went to another member: {again:?}"
    );
    assert!(
        ["one", "three"]
            .iter()
            .flat_map(|c| rows(&csv(c)))
            .any(|r| r.source == "backup" && r.outcome == "acked"),
        "the backup served the group after the takeover"
    );
    // The new primary's listing agrees: everything done, nothing pending.
    let list = spawn_bin_capture("groups", &[&ba, "jobs"]);
    let mut list = list;
    assert!(list
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    let out = list.stdout_lines().join("\n");
    assert!(
        out.contains(&format!("jobs             g                      {n}")),
        "{out}"
    );
}

#[test]
fn a_consumer_with_bad_options_says_why_and_exits_2() {
    for (args, says) in [
        (
            vec!["g", "t", "1", "2", "--fail-rate", "2"],
            "between 0 and 1",
        ),
        (vec!["bad group", "t", "1", "2"], "bad group name"),
        (
            vec!["g", "t", "1", "2", "--start", "soon"],
            "bad group start",
        ),
        (
            vec!["g", "t", "1", "2", "--max-deliver", "0"],
            "out of range",
        ),
    ] {
        let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("consumer"))
            .args(&args)
            .output()
            .expect("run consumer");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn acknowledgements_survive_both_nodes_dying_and_are_never_delivered_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = |n: &str| dir.path().join(n).display().to_string();
    let (pp, bp) = (free_port(), free_port());
    let (pa, ba) = (addr(pp), addr(bp));
    let (dp, db) = (data("p"), data("b"));
    let start = |which: &str| {
        let (bin, port, peer, d) = if which == "primary" {
            ("primary", pp, &ba, &dp)
        } else {
            ("backup", bp, &pa, &db)
        };
        spawn_bin(
            bin,
            &[
                &port.to_string(),
                peer,
                "--compute",
                "0",
                "--data-dir",
                d,
                "--fsync",
                "always",
            ],
        )
    };
    let (mut p, mut b) = (start("primary"), start("backup"));
    wait_status(&pa, "primary", "up");
    wait_status(&ba, "backup", "armed");
    let csv1 = dir.path().join("first.csv");
    let mut c = spawn_bin(
        "consumer",
        &[
            "g",
            "jobs",
            &pa,
            &ba,
            "--name",
            "w",
            "--work",
            "20",
            "--csv",
            &csv1.display().to_string(),
        ],
    );
    c.wait_stderr("joined group 'g' on 'jobs' as w on primary");
    let mut publ = spawn_bin(
        "test-publisher",
        &["jobs", &pa, &ba, "--rate", "200", "--count", "40"],
    );
    assert!(publ
        .wait_exit(Duration::from_secs(20))
        .is_some_and(|s| s.success()));
    assert!(wait_until(Duration::from_secs(10), || {
        rows(&csv1).iter().filter(|r| r.outcome == "acked").count() >= 10
    }));
    // Power loss: both nodes and the consumer at once.
    p.kill9();
    b.kill9();
    c.kill9();
    let acked: Vec<u64> = rows(&csv1)
        .into_iter()
        .filter(|r| r.outcome == "acked")
        .map(|r| r.offset)
        .collect();
    assert!(acked.len() < 40, "some left for after the restart");
    let (_p, _b) = (start("primary"), start("backup"));
    wait_status(&pa, "primary", "up");
    let csv2 = dir.path().join("second.csv");
    let _c = spawn_bin(
        "consumer",
        &[
            "g",
            "jobs",
            &pa,
            &ba,
            "--name",
            "w",
            "--work",
            "0",
            "--csv",
            &csv2.display().to_string(),
        ],
    );
    assert!(
        wait_until(Duration::from_secs(20), || {
            let mut all: Vec<u64> = acked.clone();
            all.extend(
                rows(&csv2)
                    .iter()
                    .filter(|r| r.outcome == "acked")
                    .map(|r| r.offset),
            );
            all.sort();
            all.dedup();
            all.len() == 40
        }),
        "all 40 acknowledged across the restart"
    );
    let again: Vec<u64> = rows(&csv2)
        .iter()
        .map(|r| r.offset)
        .filter(|o| acked.contains(o))
        .collect();
    assert!(
        again.is_empty(),
        "acknowledged before the power loss, delivered again after: {again:?}"
    );
}

#[test]
fn a_lease_that_runs_out_goes_to_another_member_and_a_hopeless_entry_to_the_dead_letters() {
    let (_p, _b, pa, ba) = pair(&["--compute", "0"], &["--compute", "0"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = |n: &str| dir.path().join(format!("{n}.csv")).display().to_string();
    // A member slower than the ack-wait: its leases run out and its late acks are refused.
    let (slow_csv, quick_csv) = (csv("slow"), csv("quick"));
    let slow = spawn_bin_capture(
        "consumer",
        &[
            "lease",
            "jobs",
            &pa,
            &ba,
            "--name",
            "slow",
            "--work",
            "800",
            "--ack-wait",
            "300ms",
            "--csv",
            &slow_csv,
        ],
    );
    slow.wait_stderr("joined group 'lease' on 'jobs' as slow on primary");
    let mut publ = spawn_bin("test-publisher", &["jobs", &pa, &ba, "--count", "1"]);
    assert!(publ
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    assert!(
        wait_until(Duration::from_secs(5), || slow
            .stdout_lines()
            .iter()
            .any(|l| l.contains("offset 0 attempt 1"))),
        "the slow member got the entry first"
    );
    let quick = spawn_bin(
        "consumer",
        &[
            "lease",
            "jobs",
            &pa,
            &ba,
            "--name",
            "quick",
            "--work",
            "0",
            "--ack-wait",
            "300ms",
            "--csv",
            &quick_csv,
        ],
    );
    quick.wait_stderr("joined group 'lease' on 'jobs' as quick on primary");
    assert!(
        wait_until(Duration::from_secs(10), || {
            rows(Path::new(&quick_csv))
                .iter()
                .any(|r| r.offset == 0 && r.attempt >= 2 && r.outcome == "acked")
        }),
        "the entry went to the quick member after the slow one's lease ran out: {:?}",
        rows(Path::new(&quick_csv))
    );
    assert!(
        wait_until(Duration::from_secs(5), || {
            rows(Path::new(&slow_csv))
                .iter()
                .any(|r| r.offset == 0 && r.outcome == "refused")
        }),
        "the slow member's late ack was refused: {:?}",
        rows(Path::new(&slow_csv))
    );
    // A member that gives everything back: after --max-deliver deliveries the entry becomes a
    // dead letter, which a subscriber of `jobs.dead` gets.
    let mut dead = subscribe(&pa, "jobs.dead");
    let nacker_csv = csv("nacker");
    let _nacker = spawn_bin(
        "consumer",
        &[
            "hopeless",
            "jobs",
            &pa,
            &ba,
            "--name",
            "nacker",
            "--work",
            "0",
            "--fail-rate",
            "1",
            "--max-deliver",
            "3",
            "--csv",
            &nacker_csv,
        ],
    );
    let got = match dead.next(10 * SEC) {
        Got::Line(l) => l,
        other => panic!("no dead letter: {other:?}"),
    };
    assert!(
        got.starts_with("MSG|jobs.dead|$dead:jobs:hopeless|1|")
            && got.contains("offset=0")
            && got.contains("3 deliveries, the last: nacked"),
        "{got}"
    );
    // The member writes its third row when its nack is answered, which may be after the dead
    // letter reached the subscriber.
    let attempts = || -> Vec<u32> {
        rows(Path::new(&nacker_csv))
            .iter()
            .filter(|r| r.offset == 0 && r.outcome == "nacked")
            .map(|r| r.attempt)
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(5), || attempts() == vec![1, 2, 3]),
        "three deliveries, each nacked: {:?}",
        attempts()
    );
    let list = spawn_bin_capture("groups", &[&pa, "jobs"]);
    let mut list = list;
    assert!(list
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    let out = list.stdout_lines().join("\n");
    let hopeless = out
        .lines()
        .find(|l| l.contains("hopeless"))
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>();
    // topic group floor pending lag redelivered dead members
    assert_eq!(
        hopeless.get(2),
        Some(&"1"),
        "floor past the dead letter: {out}"
    );
    assert_eq!(hopeless.get(6), Some(&"1"), "one dead letter: {out}");
}
