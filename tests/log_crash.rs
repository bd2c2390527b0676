//! The on-disk log survives SIGKILL: a real child process (`edgepair-log fill`) appends and
//! syncs in a loop and prints `synced <next>` after each sync; the test kills it by PID at
//! different moments, reopens the directory with `FileLog::open`, and checks that every entry
//! below the last printed offset is there and intact, and that the log goes on at `next`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::spawn_bin_capture;
use edgepair::log::inspect::fill_entry;
use edgepair::log::{FileLog, Storage};

const TOPIC: &str = "crash/test";
const PAYLOAD: usize = 64;

/// The offset of the last `synced N` line printed so far.
fn last_synced(lines: &[String]) -> Option<u64> {
    lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("synced ")?.trim().parse().ok())
}

#[test]
fn sigkill_loses_nothing_that_was_synced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data_s = data.to_str().expect("UTF-8 temp path");
    let mut before = 0u64;
    // (entries per sync, `synced` lines to wait for before the kill)
    for (round, (sync_every, lines)) in [(1u64, 5usize), (7, 40), (100, 3), (1000, 2), (13, 60)]
        .into_iter()
        .enumerate()
    {
        let every = sync_every.to_string();
        let mut child = spawn_bin_capture(
            "edgepair-log",
            &[
                "fill",
                data_s,
                TOPIC,
                "--count",
                "100000000",
                "--sync-every",
                &every,
                "--payload",
                &PAYLOAD.to_string(),
                "--segment-bytes",
                "65536",
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.stdout_lines().len() < lines {
            assert!(
                child.alive(),
                "round {round}: the writer ended early: {:?}",
                child.stderr.lock().map(|l| l.clone()).unwrap_or_default()
            );
            assert!(
                Instant::now() < deadline,
                "round {round}: too few syncs printed"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        // SIGKILL (std's Child::kill), by the child's PID, while it is still writing.
        child.kill9();
        // Let the stdout collector drain the pipe.
        std::thread::sleep(Duration::from_millis(100));
        let synced = last_synced(&child.stdout_lines()).expect("a synced line");
        assert!(
            synced > before,
            "round {round}: the writer went on from {before}"
        );

        let (mut log, rec) = FileLog::open(&data).expect("reopen after the kill");
        for l in rec.lines() {
            eprintln!("round {round}: recovery: {l}");
        }
        let state = log.topic(TOPIC);
        assert!(
            state.next >= synced,
            "round {round}: next {} below the synced {synced}",
            state.next
        );
        // Every entry, synced or not, that survived is intact and in place.
        let mut at = 0;
        while at < state.next {
            let got = log.read(TOPIC, at, 4096).expect("read after recovery");
            assert!(!got.is_empty(), "round {round}: nothing at {at}");
            for e in got {
                assert_eq!(*e, fill_entry(at, PAYLOAD), "round {round}: entry {at}");
                at += 1;
            }
        }
        assert_eq!(at, state.next);
        // The log is usable: appends continue at `next`.
        log.append(TOPIC, &Arc::new(fill_entry(state.next, PAYLOAD)))
            .expect("append after recovery");
        log.sync().expect("sync after recovery");
        assert_eq!(log.topic(TOPIC).next, state.next + 1);
        before = state.next + 1;
    }
}

#[test]
fn the_inspection_tool_reads_a_log_and_fails_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data_s = data.to_str().expect("UTF-8 temp path");
    let run = |args: &[&str]| {
        std::process::Command::new(assert_cmd::cargo::cargo_bin("edgepair-log"))
            .args(args)
            .output()
            .expect("run edgepair-log")
    };
    let out = run(&[
        "fill",
        data_s,
        "x y",
        "--count",
        "25",
        "--sync-every",
        "10",
        "--segment-bytes",
        "1024",
    ]);
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        printed.lines().collect::<Vec<_>>(),
        ["synced 10", "synced 20", "synced 25"]
    );

    let out = run(&["topics", data_s]);
    assert!(out.status.success());
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.starts_with("topic=\"x y\" first=0 next=25 last=24 entries=25 bytes="),
        "{listing}"
    );

    let out = run(&["dump", data_s, "x y", "--from", "20", "--count", "2"]);
    assert!(out.status.success());
    let dump = String::from_utf8_lossy(&out.stdout);
    let e = fill_entry(20, PAYLOAD);
    assert_eq!(
        dump.lines().next(),
        Some(
            format!(
                "20 epoch={} id=fill:21 sent_us={} received_us={} {}",
                e.epoch, e.sent_us, e.received_us, e.payload
            )
            .as_str()
        )
    );
    assert_eq!(dump.lines().count(), 2);

    let out = run(&["dump", data_s, "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no topic 'nope'"));
    let missing = dir.path().join("missing");
    let out = run(&["topics", missing.to_str().expect("UTF-8")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a log directory"));

    // A flipped byte, in a sealed segment and in the active one: dump fails with a non-zero
    // code and says where.
    let topic_dir = data.join("topics").join(edgepair::log::encode_topic("x y"));
    let mut segs: Vec<_> = std::fs::read_dir(&topic_dir)
        .expect("list")
        .map(|d| d.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segs.sort();
    assert!(segs.len() >= 2, "{segs:?}");
    for seg in [&segs[segs.len() - 1], &segs[0]] {
        let mut bytes = std::fs::read(seg).expect("read segment");
        bytes[30] ^= 1;
        std::fs::write(seg, &bytes).expect("write segment");
        let out = run(&["dump", data_s, "x y"]);
        assert!(!out.status.success(), "{}", seg.display());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("checksum"), "{err}");
    }
}
