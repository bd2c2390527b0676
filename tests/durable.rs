//! The log on disk with real processes, real SIGKILL and SIGTERM, and real files: what was
//! acknowledged survives both nodes going down, a degraded primary's clean stop, and a second
//! node is refused a data directory in use.

mod common;

use std::time::Duration;

use common::{addr, free_port, parse_msg, spawn_bin, spawn_bin_capture, wait_status, Got, SEC};

/// Publishes `seqs` on topic `t` over one connection (pipelined) and waits for every `ACK`.
fn publish_acked(broker: &str, publisher: &str, seqs: std::ops::RangeInclusive<u64>) {
    let mut c = common::LineConn::connect(broker);
    let n = seqs.clone().count();
    for seq in seqs {
        c.send_line(&format!("PUB|t|{publisher}|{seq}|1|m{seq}"));
    }
    for _ in 0..n {
        match c.next(5 * SEC) {
            Got::Line(l) if l.starts_with("ACK|") => {}
            other => panic!("expected an ACK, got {other:?}"),
        }
    }
}

/// Collects the seqs of `MSG`s from `sub` until `n` arrived (or 10 s passed).
fn collect(sub: &mut common::LineConn, n: usize) -> Vec<u64> {
    let mut got = Vec::new();
    while got.len() < n {
        match sub.next(10 * SEC) {
            Got::Line(l) if l.starts_with("MSG|") => got.push(parse_msg(&l).1),
            Got::Line(_) => {}
            other => panic!("after {got:?}: {other:?}"),
        }
    }
    got
}

fn node_args(port: u16, peer: &str, dir: &std::path::Path, compute: &str) -> Vec<String> {
    node_args_fsync(port, peer, dir, compute, "always")
}

fn node_args_fsync(
    port: u16,
    peer: &str,
    dir: &std::path::Path,
    compute: &str,
    fsync: &str,
) -> Vec<String> {
    vec![
        port.to_string(),
        peer.to_string(),
        "--compute".into(),
        compute.into(),
        "--data-dir".into(),
        dir.display().to_string(),
        "--fsync".into(),
        fsync.into(),
    ]
}

fn spawn_node(bin: &str, args: &[String]) -> common::ChildGuard {
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn_bin(bin, &argv)
}

#[test]
fn both_nodes_killed_then_restarted_deliver_every_acknowledged_message_in_order() {
    let (pp, bp) = (free_port(), free_port());
    let (pa, ba) = (addr(pp), addr(bp));
    let (pdir, bdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Long compute: everything acknowledged is still in compute when both die.
    let pargs = node_args(pp, &ba, pdir.path(), "700..800");
    let bargs = node_args(bp, &pa, bdir.path(), "700..800");
    let mut primary = spawn_node("primary", &pargs);
    let mut backup = spawn_node("backup", &bargs);
    wait_status(&pa, "primary", "up");
    wait_status(&ba, "backup", "armed");
    publish_acked(&pa, "pub", 1..=20);
    primary.kill9();
    backup.kill9();

    let _backup = spawn_node("backup", &bargs);
    let _primary = spawn_node("primary", &pargs);
    let mut sub = common::subscribe(&pa, "t");
    let got = collect(&mut sub, 20);
    assert_eq!(got, (1..=20).collect::<Vec<_>>(), "every one, in order");
    wait_status(&pa, "primary", "up");
    // A resend after the restart is recognised from the log: acknowledged, not delivered again.
    publish_acked(&pa, "pub", 20..=21);
    let next = collect(&mut sub, 1);
    assert_eq!(next, [21]);
    assert!(
        matches!(sub.next(Duration::from_millis(1500)), Got::TimedOut),
        "nothing more: the resend of 20 was not logged twice"
    );
}

#[test]
fn a_degraded_primary_stopped_with_sigterm_delivers_what_it_acknowledged_when_restarted() {
    let (pp, dead) = (free_port(), free_port());
    let pa = addr(pp);
    let dir = tempfile::tempdir().unwrap();
    // A drain shorter than the compute: the stop leaves all five in compute (`stops.rs` has the
    // drain that finishes them), and the log delivers them after the restart.
    let mut args = node_args(pp, &addr(dead), dir.path(), "1500..1600");
    args.extend(["--drain-timeout".to_string(), "100ms".to_string()]);
    let primary = spawn_node("primary", &args);
    wait_status(&pa, "primary", "down");
    publish_acked(&pa, "solo", 1..=5);
    let mut primary = primary;
    primary.signal(libc::SIGTERM);
    assert!(
        primary.wait_exit(10 * SEC).is_some(),
        "the primary did not stop on SIGTERM"
    );
    let _primary = spawn_node("primary", &args);
    let mut sub = common::subscribe(&pa, "t");
    assert_eq!(collect(&mut sub, 5), [1, 2, 3, 4, 5]);
}

#[test]
fn a_data_directory_in_use_is_refused_with_a_clear_error() {
    let (p1, p2, dead) = (free_port(), free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let _first = spawn_node("primary", &node_args(p1, &addr(dead), dir.path(), "0"));
    wait_status(&addr(p1), "primary", "down");
    let args = node_args(p2, &addr(dead), dir.path(), "0");
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut second = spawn_bin_capture("primary", &argv);
    let status = second
        .wait_exit(10 * SEC)
        .expect("the second node must not start");
    assert!(!status.success());
    assert!(
        second.logged("in use by process"),
        "the error names the holder"
    );
}

#[test]
fn a_full_disk_refuses_publishes_with_an_error_and_loses_nothing_acknowledged() {
    let (pp, dead) = (free_port(), free_port());
    let pa = addr(pp);
    let dir = tempfile::tempdir().unwrap();
    let args = node_args(pp, &addr(dead), dir.path(), "0");
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    // The segment file may not grow past 64 KiB: the disk is "full" after ~60 messages of 1 KiB.
    let _primary = common::spawn_bin_file_limit("primary", &argv, 64 * 1024);
    wait_status(&pa, "primary", "down");
    let mut sub = common::subscribe(&pa, "t");
    let mut c = common::LineConn::connect(&pa);
    let body = "x".repeat(1000);
    let (mut acked, mut refused) = (Vec::new(), 0);
    for seq in 1..=200u64 {
        c.send_line(&format!("PUB|t|full|{seq}|1|{body}"));
        match c.next(5 * SEC) {
            Got::Line(l) if l.starts_with("ACK|") => acked.push(seq),
            Got::Line(l) if l.starts_with("ERR|not stored") => refused += 1,
            other => panic!("publish {seq}: {other:?}"),
        }
    }
    assert!(
        !acked.is_empty() && refused > 0,
        "acked {} refused {refused}",
        acked.len()
    );
    assert_eq!(
        acked,
        (1..=acked.len() as u64).collect::<Vec<_>>(),
        "once the log fails, nothing more is acknowledged"
    );
    assert_eq!(
        collect(&mut sub, acked.len()),
        acked,
        "every acknowledged one is delivered"
    );
    assert!(
        matches!(sub.next(Duration::from_millis(500)), Got::TimedOut),
        "and no refused one"
    );
    assert!(
        common::status(&pa).starts_with("STATUS|primary"),
        "still serving"
    );
}

/// Entries of `payload` bytes `edgepair-log fill` writes to topic `t` of `dir`, none of them
/// delivered.
fn fill_undelivered(dir: &std::path::Path, count: u64, payload: usize) {
    let st = std::process::Command::new(assert_cmd::cargo::cargo_bin("edgepair-log"))
        .arg("fill")
        .arg(dir)
        .args(["t", "--count", &count.to_string(), "--sync-every"])
        .arg(count.to_string())
        .args(["--payload", &payload.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run edgepair-log fill");
    assert!(st.success(), "edgepair-log fill failed: {st}");
}

/// The `inflight` field of a node's `STATUS`.
fn in_flight(broker: &str) -> u64 {
    let s = common::status(broker);
    s.split('|')
        .nth(5)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no inflight count in {s}"))
}

/// A subscriber that connects while `broker` is starting (it retries until the node listens),
/// so that it is registered before the startup grace and the compute time have passed.
fn subscribe_early(broker: &str) -> common::LineConn {
    common::subscribe(broker, "t")
}

/// Reads `n` `MSG`s from `sub` as (publisher, seq), each within 10 s.
fn collect_ids(sub: &mut common::LineConn, n: usize) -> Vec<(String, u64)> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match sub.next(10 * SEC) {
            Got::Line(l) if l.starts_with("MSG|") => {
                let (p, seq, _, _) = parse_msg(&l);
                got.push((p, seq));
            }
            Got::Line(_) => {}
            other => panic!("after {} MSGs: {other:?}", got.len()),
        }
    }
    got
}

/// What a subscriber should get from a log of `n` filled entries (`fill` entry N has publisher
/// `fill` and seq N + 1) followed by `late` publishes of publisher `late`.
fn filled_then(n: u64, late: u64) -> Vec<(String, u64)> {
    let mut want: Vec<(String, u64)> = (1..=n).map(|s| ("fill".to_string(), s)).collect();
    want.extend((1..=late).map(|s| ("late".to_string(), s)));
    want
}

/// Checks `got` against `want` and names the first difference (20,000 lines are too many to
/// print).
fn assert_same_order(got: &[(String, u64)], want: &[(String, u64)]) {
    if let Some(i) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
        panic!(
            "delivery {i} of {}: got {:?}, want {:?} (offset order, then the new publishes)",
            want.len(),
            got.get(i),
            want.get(i)
        );
    }
}

const LONG_LOG: u64 = 20_000;

#[test]
fn a_node_restarted_on_a_long_undelivered_log_answers_at_once_and_delivers_it_all_in_order() {
    let (pp, dead) = (free_port(), free_port());
    let pa = addr(pp);
    let dir = tempfile::tempdir().unwrap();
    // 1 KB entries: 20 MB, more than the socket buffers take in while the subscriber does not
    // read, so most of the log is surely still to deliver when the publish is acknowledged.
    fill_undelivered(dir.path(), LONG_LOG, 1000);
    // A relay (no compute): each chunk taken up from the log is delivered at once. The startup
    // grace (300 ms) holds the first results until the subscriber is registered.
    let _primary = spawn_node("primary", &node_args(pp, &addr(dead), dir.path(), "0"));
    let mut sub = subscribe_early(&pa);
    // It accepts (and acknowledges) a publish while most of the log is still to deliver.
    publish_acked(&pa, "late", 1..=3);
    let left = in_flight(&pa);
    assert!(
        left > LONG_LOG / 2,
        "most of the log should still be to deliver when the publish is acknowledged ({left} left)"
    );
    let got = collect_ids(&mut sub, LONG_LOG as usize + 3);
    assert_same_order(&got, &filled_then(LONG_LOG, 3));
    assert!(
        common::wait_until(5 * SEC, || in_flight(&pa) == 0),
        "nothing left in flight"
    );
    assert!(
        matches!(sub.next(Duration::from_millis(500)), Got::TimedOut),
        "nothing delivered twice"
    );
}

#[test]
fn a_restarted_primary_with_a_backup_replicates_its_long_undelivered_log_and_clears_it() {
    restarted_primary_with_a_backup_clears_its_long_log("always");
}

/// Under `--fsync batch` (the default) a backup answers a `REPL` once its entry is written;
/// the entries of a taken-up chunk it has already (from the catch-up), so no write follows
/// them: on the binaries before, their `STORED` waited for the next publish, and so did every
/// delivery of the chunk (the subscriber timed out after its first 18-181 `MSG`s).
#[test]
fn a_restarted_primary_with_a_backup_clears_its_long_log_under_fsync_batch() {
    restarted_primary_with_a_backup_clears_its_long_log("batch");
}

fn restarted_primary_with_a_backup_clears_its_long_log(fsync: &str) {
    let (pp, bp) = (free_port(), free_port());
    let (pa, ba) = (addr(pp), addr(bp));
    let (pdir, bdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    fill_undelivered(pdir.path(), LONG_LOG, 64);
    // Through the compute stage this time: each chunk computed in parallel, 200-300 ms.
    let bargs = node_args_fsync(bp, &pa, bdir.path(), "200..300", fsync);
    let pargs = node_args_fsync(pp, &ba, pdir.path(), "200..300", fsync);
    let _backup = spawn_node("backup", &bargs);
    let _primary = spawn_node("primary", &pargs);
    let mut sub = subscribe_early(&pa);
    publish_acked(&pa, "late", 1..=3);
    let got = collect_ids(&mut sub, LONG_LOG as usize + 3);
    assert_same_order(&got, &filled_then(LONG_LOG, 3));
    // The backup got the log (caught up), then each taken-up entry's `CLR`: it holds nothing.
    wait_held_nothing(&ba);
    assert_eq!(in_flight(&pa), 0);
}

/// Waits until a node's `STATUS` says it holds no undelivered entry (a backup: every `CLR`
/// of what it stored has come).
fn wait_held_nothing(node: &str) {
    let held = |s: String| s.split('|').nth(4).and_then(|n| n.parse::<u64>().ok());
    assert!(
        common::wait_until(10 * SEC, || held(common::status(node)) == Some(0)),
        "{node} still holds entries: {}",
        common::status(node)
    );
}

#[test]
fn a_subscriber_that_does_not_read_holds_up_a_long_undelivered_log_only_for_a_while() {
    let (pp, dead) = (free_port(), free_port());
    let pa = addr(pp);
    let dir = tempfile::tempdir().unwrap();
    fill_undelivered(dir.path(), LONG_LOG, 1000);
    let primary = spawn_node("primary", &node_args(pp, &addr(dead), dir.path(), "0"));
    // Registered, then never read again: its socket fills up, its writer never drains.
    let _stuck = subscribe_early(&pa);
    let mut reader = subscribe_early(&pa);
    publish_acked(&pa, "late", 1..=3);
    let got = collect_ids(&mut reader, LONG_LOG as usize + 3);
    assert_same_order(&got, &filled_then(LONG_LOG, 3));
    // The stuck subscriber was waited for, then left behind.
    primary.wait_stderr("going on without them");
}

#[test]
fn a_backup_that_takes_over_a_long_held_log_delivers_it_all_in_order() {
    let (bp, dead) = (free_port(), free_port());
    let ba = addr(bp);
    let dir = tempfile::tempdir().unwrap();
    // What a backup holds after its primary replicated 20,000 entries and died before
    // delivering any (`fill` writes the same entries a primary would have replicated).
    fill_undelivered(dir.path(), LONG_LOG, 64);
    let _backup = spawn_node("backup", &node_args(bp, &addr(dead), dir.path(), "0"));
    let mut sub = subscribe_early(&ba);
    // A publish at a backup whose primary does not answer makes it take over (and is served
    // there, behind what it held).
    publish_acked(&ba, "late", 1..=3);
    assert!(common::status(&ba).starts_with("STATUS|primary|"));
    let got = collect_ids(&mut sub, LONG_LOG as usize + 3);
    assert_same_order(&got, &filled_then(LONG_LOG, 3));
    assert!(
        common::wait_until(5 * SEC, || in_flight(&ba) == 0),
        "nothing left in flight"
    );
}

/// A pair's addresses, data directories and command lines (`--compute 0`), not started.
struct DiskPair {
    pa: String,
    ba: String,
    pdir: tempfile::TempDir,
    bdir: tempfile::TempDir,
    pargs: Vec<String>,
    bargs: Vec<String>,
}

/// A [`DiskPair`] under `fsync`, each node with the options `extra` too.
fn disk_pair(fsync: &str, extra: &[&str]) -> DiskPair {
    let (pp, bp) = (free_port(), free_port());
    let (pa, ba) = (addr(pp), addr(bp));
    let (pdir, bdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let args = |port, peer: &str, dir: &std::path::Path| {
        let mut a = node_args_fsync(port, peer, dir, "0", fsync);
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let (pargs, bargs) = (args(pp, &ba, pdir.path()), args(bp, &pa, bdir.path()));
    DiskPair {
        pa,
        ba,
        pdir,
        bdir,
        pargs,
        bargs,
    }
}

/// Base offsets of the segments of topic `t` in a data directory, oldest first.
fn segment_bases(dir: &std::path::Path) -> Vec<u64> {
    topic_segment_bases(dir, "t")
}

/// Base offsets of the segments of a topic (its folder's name) in a data directory.
fn topic_segment_bases(dir: &std::path::Path, folder: &str) -> Vec<u64> {
    let mut bases: Vec<u64> = std::fs::read_dir(dir.join("topics").join(folder))
        .map(|files| {
            files
                .flatten()
                .filter_map(|f| {
                    let p = f.path();
                    let is_log = p.extension().is_some_and(|e| e == "log");
                    is_log
                        .then(|| p.file_stem()?.to_str()?.parse().ok())
                        .flatten()
                })
                .collect()
        })
        .unwrap_or_default();
    bases.sort_unstable();
    bases
}

/// A backup SIGKILLed while its primary's retention (`--retain-bytes`) removed the segments
/// it lacks starts its copy again at the primary's oldest kept entry when it comes back, and
/// the link comes up; after a failover it serves every kept entry from there. Before, the
/// catch-up's first entry lay past the backup's end and was refused, and the link never came
/// up: the primary acknowledged with no backup for good.
#[test]
fn a_backup_behind_the_primarys_retention_catches_up_from_its_oldest_kept_entry() {
    let DiskPair {
        pa,
        ba,
        pdir,
        bdir,
        pargs,
        bargs,
    } = disk_pair("batch", &["--segment-bytes", "4K", "--retain-bytes", "8K"]);
    let _primary = spawn_node("primary", &pargs);
    let mut backup = spawn_node("backup", &bargs);
    wait_status(&pa, "primary", "up");
    wait_status(&ba, "backup", "armed");
    publish_acked(&pa, "pub", 1..=10);
    // Delivered, and the backup told so: it has nothing to hand back when it returns (that a
    // hand-over still under way when the primary dies brings duplicates is at-least-once).
    wait_held_nothing(&ba);
    backup.kill9();
    // Some 60 bytes an entry: 400 more fill several 4 KiB segments, and retention (every
    // second) removes the oldest, delivered ones, among them all the backup has.
    publish_acked(&pa, "pub", 11..=410);
    assert!(
        common::wait_until(10 * SEC, || segment_bases(pdir.path())
            .first()
            .is_some_and(|b| *b > 10)),
        "the primary's retention removed nothing: {:?}",
        segment_bases(pdir.path())
    );
    let oldest = segment_bases(pdir.path())[0];
    let _backup = spawn_node("backup", &bargs);
    wait_status(&pa, "primary", "up");
    publish_acked(&pa, "pub", 411..=411);
    let bases = segment_bases(bdir.path());
    assert!(
        bases.first().is_some_and(|b| *b >= oldest),
        "the backup's copy starts at the primary's oldest kept entry {oldest} or later: {bases:?}"
    );
    // The backup has every entry the primary kept: a subscriber reading it from there after a
    // failover gets them all.
    drop(_primary);
    wait_status(&ba, "primary", "down");
    let mut c = common::LineConn::connect(&ba);
    c.send_line(&format!("SUB|t|{oldest}"));
    let mut offsets = Vec::new();
    loop {
        match c.next(5 * SEC) {
            Got::Line(l) if l.starts_with("REPLAYED|t|") => break,
            Got::Line(l) if l.starts_with("MSG|") => {
                let stamps = l.split('|').nth(5).unwrap_or_default().to_string();
                let o = stamps
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("o="))
                    .and_then(|o| o.parse::<u64>().ok());
                offsets.push(o.unwrap_or_else(|| panic!("no offset in {l}")));
            }
            Got::Line(_) => {}
            other => panic!("replay ended after {} MSGs: {other:?}", offsets.len()),
        }
    }
    // Every entry from where its copy starts (the primary's oldest kept entry when it came
    // back, or later: retention goes on meanwhile) to the last, in order. After them may come
    // the first ten messages again: the backup's own old copies of them, handed to the primary
    // when it started again and taken back at the takeover if the primary died before it
    // answered (at-least-once; their offsets lie below the retention, where no identity is
    // kept to recognise them).
    let first = *offsets.first().expect("the replay sent nothing");
    assert!(first >= oldest, "replay from {first}, oldest kept {oldest}");
    let all: Vec<u64> = (first..411).collect();
    assert_eq!(offsets[..all.len().min(offsets.len())], all[..]);
    assert!(
        offsets.len() <= all.len() + 10,
        "more than the ten handed back: {:?}",
        &offsets[all.len()..]
    );
}

/// A consumer group's journal, compacted every 5 entries (`--journal-compact 5`, 4 KiB
/// segments), is cut on both nodes' disks as the group works; after SIGKILL of both, the nodes
/// read the group back from the snapshots whole: its floor past every acknowledged entry, and
/// only the entry published after comes to the member.
#[test]
fn a_compacted_journal_on_disk_keeps_the_group_through_both_nodes_killed() {
    let DiskPair {
        pa,
        ba,
        pdir,
        bdir,
        pargs,
        bargs,
    } = disk_pair(
        "always",
        &["--segment-bytes", "4K", "--journal-compact", "5"],
    );
    let mut primary = spawn_node("primary", &pargs);
    let mut backup = spawn_node("backup", &bargs);
    wait_status(&pa, "primary", "up");
    wait_status(&ba, "backup", "armed");
    let mut admin = common::LineConn::connect(&pa);
    admin.send_line("GROUP|create|t|g|first|max_in_flight=50");
    assert_eq!(
        admin.read_line(5 * SEC).as_deref(),
        Some("GROUP|created|t|g")
    );
    let mut member = common::LineConn::connect(&pa);
    member.send_line("GROUP|join|t|g|worker");
    assert_eq!(
        member.read_line(5 * SEC).as_deref(),
        Some("GROUP|joined|t|g|worker")
    );
    publish_acked(&pa, "pub", 1..=200);
    let mut acked = 0;
    while acked < 200 {
        match member.next(5 * SEC) {
            Got::Line(l) if l.starts_with("GROUP|msg|t|g|") => {
                let offset = l.split('|').nth(4).unwrap_or_default().to_string();
                member.send_line(&format!("GROUP|ack|t|g|{offset}"));
            }
            Got::Line(l) if l.starts_with("GROUP|acked|") => acked += 1,
            other => panic!("after {acked} acks: {other:?}"),
        }
    }
    let journal = "%24groups";
    for dir in [pdir.path(), bdir.path()] {
        let bases = topic_segment_bases(dir, journal);
        assert!(
            bases.first().is_some_and(|b| *b > 0),
            "the journal's first segments were removed in {}: {bases:?}",
            dir.display()
        );
    }
    primary.kill9();
    backup.kill9();
    let _backup = spawn_node("backup", &bargs);
    let _primary = spawn_node("primary", &pargs);
    wait_status(&pa, "primary", "up");
    let mut admin = common::LineConn::connect(&pa);
    admin.send_line("GROUP|list|t");
    let info = admin.read_line(5 * SEC).unwrap_or_default();
    // GROUP|info|topic|group|floor|end|pending|lag|...
    let f: Vec<&str> = info.split('|').collect();
    assert_eq!(
        f.get(2..8),
        Some(&["t", "g", "200", "200", "0", "0"][..]),
        "{info}"
    );
    let mut member = common::LineConn::connect(&pa);
    member.send_line("GROUP|join|t|g|worker");
    publish_acked(&pa, "pub", 201..=201);
    let mut got = Vec::new();
    while let Got::Line(l) = member.next(Duration::from_millis(1500)) {
        if l.starts_with("GROUP|msg|") {
            got.push(l.split('|').nth(4).unwrap_or_default().to_string());
        }
    }
    assert_eq!(got, ["200"], "only the new entry");
}
