//! Reading a topic's past over real sockets: `SUB|topic|from` (an offset, `last:N`, `time:`,
//! `new`), `HISTORY|topic|N`, a bad start, and the subscriber binary's `--history`.

mod common;

use common::{addr, free_port, solo_primary, spawn_bin_capture, wait_until, Got, LineConn, SEC};

/// `(offset, seq, rx)` of a `MSG` line.
fn msg(line: &str) -> Option<(u64, u64, u64)> {
    let f: Vec<&str> = line.splitn(7, '|').collect();
    if f.len() != 7 || f[0] != "MSG" {
        return None;
    }
    let stamp = |k: &str| {
        f[5].split(',')
            .find_map(|kv| kv.strip_prefix(k))
            .and_then(|v| v.parse().ok())
    };
    Some((stamp("o=")?, f[3].parse().ok()?, stamp("rx=")?))
}

/// Publishes seqs `from..=to` on topic `t` and waits for every `ACK`.
fn publish(broker: &str, from: u64, to: u64) {
    let mut c = LineConn::connect(broker);
    let mut batch = String::new();
    for seq in from..=to {
        batch.push_str(&format!("PUB|t|pub|{seq}|1|m{seq}\n"));
    }
    c.send_bytes(batch.as_bytes());
    for seq in from..=to {
        assert_eq!(
            c.next(5 * SEC),
            Got::Line(format!("ACK|pub|{seq}")),
            "publish {seq}"
        );
    }
}

/// Reads lines until `REPLAYED|t|…`; returns the `MSG`s before it and its offset. Other
/// answers (`PONG`) may come between chunks and are skipped.
fn replay(c: &mut LineConn) -> (Vec<(u64, u64, u64)>, u64) {
    let mut msgs = Vec::new();
    loop {
        match c.next(5 * SEC) {
            Got::Line(l) if l.starts_with("REPLAYED|t|") => {
                let next = l["REPLAYED|t|".len()..].parse().expect("offset");
                return (msgs, next);
            }
            Got::Line(l) if l == "PONG" => {}
            Got::Line(l) => msgs.push(msg(&l).unwrap_or_else(|| panic!("not a MSG: {l}"))),
            other => panic!(
                "replay ended without REPLAYED after {} MSGs: {other:?}",
                msgs.len()
            ),
        }
    }
}

/// The next `MSG`; the `PONG` to a `PING` sent with the `SUB` may come before it (after the
/// replay's last chunk) and is skipped.
fn next_msg(c: &mut LineConn) -> (u64, u64, u64) {
    loop {
        match c.next(5 * SEC) {
            Got::Line(l) if l == "PONG" => {}
            Got::Line(l) => return msg(&l).unwrap_or_else(|| panic!("not a MSG: {l}")),
            other => panic!("no MSG: {other:?}"),
        }
    }
}

/// More than two chunks of log, so the replay is paced by the writer draining.
const N: u64 = 2500;

#[test]
fn sub_from_an_offset_replays_every_entry_in_order_then_goes_live() {
    let (_p, pa) = solo_primary(&["--compute", "0"]);
    publish(&pa, 1, N);
    let mut s = LineConn::connect(&pa);
    s.send_line("SUB|t|0");
    s.send_line("PING");
    let (msgs, next) = replay(&mut s);
    assert_eq!(next, N);
    let want: Vec<(u64, u64)> = (0..N).map(|o| (o, o + 1)).collect();
    let got: Vec<(u64, u64)> = msgs.iter().map(|m| (m.0, m.1)).collect();
    assert_eq!(got, want, "offsets 0..{N} exactly once, in order");
    publish(&pa, N + 1, N + 2);
    let live: Vec<(u64, u64)> = (0..2)
        .map(|_| next_msg(&mut s))
        .map(|m| (m.0, m.1))
        .collect();
    assert_eq!(
        live,
        vec![(N, N + 1), (N + 1, N + 2)],
        "live after the replay"
    );

    // `time:` starts at the first entry received at or after that time.
    let t = msgs[1234].2;
    let first = msgs.iter().position(|m| m.2 >= t).expect("one") as u64;
    let mut s = LineConn::connect(&pa);
    s.send_line(&format!("SUB|t|time:{t}"));
    let (from_time, next) = replay(&mut s);
    assert_eq!(from_time.first().map(|m| m.0), Some(first));
    assert_eq!(from_time.len() as u64, N + 2 - first);
    assert_eq!(next, N + 2);
    // A time after every entry replays nothing.
    let mut s = LineConn::connect(&pa);
    s.send_line(&format!("SUB|t|time:{}", u64::MAX / 2));
    assert_eq!(replay(&mut s), (vec![], N + 2));
}

#[test]
fn last_history_new_and_a_bad_start() {
    let (_p, pa) = solo_primary(&["--compute", "0"]);
    publish(&pa, 1, 20);

    let mut last = LineConn::connect(&pa);
    last.send_line("SUB|t|last:3");
    let (msgs, next) = replay(&mut last);
    assert_eq!(msgs.iter().map(|m| m.0).collect::<Vec<_>>(), [17, 18, 19]);
    assert_eq!(next, 20);

    let mut h = LineConn::connect(&pa);
    h.send_line("HISTORY|t|5");
    let (msgs, next) = replay(&mut h);
    assert_eq!(
        msgs.iter().map(|m| m.1).collect::<Vec<_>>(),
        [16, 17, 18, 19, 20]
    );
    assert_eq!(next, 20);
    // More than the log holds: all of it.
    h.send_line("HISTORY|t|1000");
    assert_eq!(replay(&mut h).0.len(), 20);

    let mut new = LineConn::connect(&pa);
    new.send_line("SUB|t|new");
    assert_eq!(new.next(5 * SEC), Got::Line("REPLAYED|t|20".into()));

    let mut bad = LineConn::connect(&pa);
    bad.send_line("SUB|t|soon");
    match bad.next(5 * SEC) {
        Got::Line(l) => assert!(
            l.starts_with("ERR|bad SUB start 'soon'") && l.contains("last:N"),
            "{l}"
        ),
        other => panic!("{other:?}"),
    }
    bad.send_line("HISTORY|t|lots");
    match bad.next(5 * SEC) {
        Got::Line(l) => assert!(l.starts_with("ERR|bad HISTORY count 'lots'"), "{l}"),
        other => panic!("{other:?}"),
    }
    // Still usable, and not subscribed by the bad frame.
    bad.send_line("PING");
    assert_eq!(bad.next(5 * SEC), Got::Line("PONG".into()));
    bad.send_line("SUB|t|last:1");
    let (msgs, _) = replay(&mut bad);
    assert_eq!(msgs.iter().map(|m| m.0).collect::<Vec<_>>(), [19]);

    // Live deliveries reach `last:`, `new` and the recovered connection; HISTORY is no
    // subscription.
    publish(&pa, 21, 21);
    for c in [&mut last, &mut new, &mut bad] {
        assert_eq!(next_msg(c).0, 20);
    }
    h.send_line("PING");
    assert_eq!(h.next(5 * SEC), Got::Line("PONG".into()));
}

#[test]
fn the_subscriber_binary_starts_with_history() {
    let (_p, pa) = solo_primary(&["--compute", "0"]);
    publish(&pa, 1, 10);
    let backup = addr(free_port());
    let sub = spawn_bin_capture("subscriber", &["t", &pa, &backup, "--history", "3"]);
    assert!(
        wait_until(10 * SEC, || sub.stdout_lines().len() >= 3),
        "{:?}",
        sub.stdout_lines()
    );
    sub.wait_stderr("replayed up to offset 10");
    publish(&pa, 11, 11);
    assert!(wait_until(10 * SEC, || sub.stdout_lines().len() >= 4));
    assert_eq!(
        sub.stdout_lines(),
        [
            "[PRIMARY] m8",
            "[PRIMARY] m9",
            "[PRIMARY] m10",
            "[PRIMARY] m11"
        ]
    );
}

/// The segment files of every topic in a node's data directory.
fn segments(dir: &std::path::Path) -> usize {
    let Ok(topics) = std::fs::read_dir(dir.join("topics")) else {
        return 0;
    };
    topics
        .flatten()
        .filter_map(|t| std::fs::read_dir(t.path()).ok())
        .flat_map(|files| files.flatten())
        .filter(|f| f.path().extension().is_some_and(|e| e == "log"))
        .count()
}

#[test]
fn retention_removes_old_segments_and_a_subscriber_from_before_them_starts_at_the_oldest_kept() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path().display().to_string();
    let (_p, a) = solo_primary(&[
        "--compute",
        "0",
        "--data-dir",
        &d,
        "--segment-bytes",
        "4K",
        "--retain-bytes",
        "8K",
    ]);
    // Some 60 bytes an entry: 400 of them fill several 4 KiB segments.
    publish(&a, 1, 400);
    // Retention runs every second and removes delivered segments past the bound (the oldest
    // kept entry, below, shows that some were removed).
    assert!(
        wait_until(10 * SEC, || segments(dir.path()) <= 4),
        "old segments were not removed: {} left",
        segments(dir.path())
    );
    let mut c = LineConn::connect(&a);
    c.send_line("SUB|t|0");
    let first = match c.next(5 * SEC) {
        Got::Line(l) => l,
        other => panic!("no answer to SUB|t|0: {other:?}"),
    };
    let oldest: u64 = first
        .strip_prefix("ERR|offset 0 is before the oldest kept entry ")
        .and_then(|r| r.split(';').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("expected the oldest kept entry, got {first}"));
    assert!(oldest > 0 && oldest < 400, "oldest kept entry {oldest}");
    let (msgs, next) = replay(&mut c);
    assert_eq!(next, 400, "replayed to the end");
    let offsets: Vec<u64> = msgs.iter().map(|m| m.0).collect();
    assert_eq!(
        offsets,
        (oldest..400).collect::<Vec<_>>(),
        "every kept entry, from the oldest"
    );
}
