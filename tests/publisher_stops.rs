//! A publisher stopped with Ctrl-C waits for its outstanding ACKs, and one whose brokers are
//! both gone lists the messages never acknowledged. Real processes and signals.

mod common;

use std::collections::BTreeSet;

#[allow(unused_imports)]
use common::*;

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
    // Outstanding ACKs: the primary holds what it accepted and the paused backup has not
    // stored (not acknowledged, not delivered either: it delivers only what the backup stored).
    let inflight = |s: &str| {
        s.split('|')
            .nth(5)
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(
        wait_until(10 * SEC, || inflight(&common::status(&pa)) >= 5),
        "the primary never held 5 unstored messages: {}",
        common::status(&pa)
    );
    let outstanding = inflight(&common::status(&pa));
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
    // The process has exited; its last lines may still be on their way through the pipe to
    // the thread that collects them.
    wait_until(5 * SEC, || summary(&publisher.stdout_lines()).is_some());
    let out = publisher.stdout_lines();
    assert!(st.is_some_and(|s| s.success()), "{st:?}: {out:?}");
    let (published, acked, unacked) = summary(&out).expect("summary line");
    assert_eq!(
        (acked, unacked.len()),
        (published, 0),
        "every outstanding ACK must have been collected: {out:?}"
    );
    assert!(
        published >= at_stop + outstanding,
        "published {published}, acknowledged at the stop {at_stop}, outstanding {outstanding}"
    );
    // Once the backup stored them, the primary delivered them, in order.
    let mut delivered = Vec::new();
    while (delivered.len() as u64) < published {
        match sub.next(5 * SEC) {
            Got::Line(l) => delivered.push(parse_msg(&l).1),
            other => panic!("subscriber after {delivered:?}: {other:?}"),
        }
    }
    assert_eq!(delivered, (1..=published).collect::<Vec<u64>>());
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
    wait_until(5 * SEC, || summary(&publisher.stdout_lines()).is_some());
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
