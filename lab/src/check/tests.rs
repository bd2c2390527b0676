//! Every rule of the checker on hand-made deliveries. Each test states the clean case next to
//! the broken one, so that it fails if the rule stops counting (or starts counting everything).

use super::*;

const T0: u64 = 1_000_000_000;
const PING_US: u64 = 1_000_000;

fn d(seq: u64, at_ms: u64, source: &str, epoch: u64) -> Delivery {
    Delivery {
        received_at_us: T0 + at_ms * 1000,
        source: source.into(),
        topic: "t".into(),
        publisher: "p".into(),
        seq,
        sent_at_us: T0 + at_ms * 1000 - 100_000,
        latency_us: 100_000,
        duplicate: false,
        epoch,
        broker_rx_us: 0,
        // Live: computed just before it was sent (a replay has no compute times).
        compute_start_us: T0 + at_ms * 1000 - 60_000,
        compute_end_us: T0 + at_ms * 1000 - 10_000,
        payload: seq.to_string(),
        offset: seq,
    }
}

/// `d`, sent from the log by a replay.
fn replayed(seq: u64, at_ms: u64, source: &str, epoch: u64) -> Delivery {
    Delivery {
        compute_start_us: 0,
        compute_end_us: 0,
        ..d(seq, at_ms, source, epoch)
    }
}

/// `n` messages from the primary in epoch 1, one every 100 ms.
fn clean(n: u64) -> Vec<Delivery> {
    (1..=n).map(|s| d(s, s * 100, "primary", 1)).collect()
}

fn expect<'a>(
    published: u64,
    faults: &'a [FaultSpan],
    acked: Option<&'a BTreeSet<u64>>,
) -> Expect<'a> {
    Expect {
        publisher: Some("p"),
        published,
        acked,
        faults,
        resend: 5,
        ping_interval_us: PING_US,
    }
}

fn fault(kind: FaultKind, from_ms: u64, to_ms: u64) -> FaultSpan {
    FaultSpan {
        kind,
        from_us: T0 + from_ms * 1000,
        to_us: T0 + to_ms * 1000,
    }
}

#[test]
fn a_clean_run_has_no_violation() {
    let v = check(&clean(10), &expect(10, &[], None));
    assert!(v.all_delivered());
    assert!(v.delivery_ok());
    assert!(v.violations().is_empty(), "{:?}", v.violations());
    assert_eq!(
        (v.delivered, v.unique, v.duplicates, v.reordered),
        (10, 10, 0, 0)
    );
    assert!(v.epoch_events.is_empty());
}

#[test]
fn an_acknowledged_message_lost_is_a_violation_an_unacknowledged_one_is_counted() {
    let mut rows = clean(10);
    rows.retain(|r| r.seq != 4 && r.seq != 9);
    // 9 was never acknowledged (the publisher stopped first): counted, not a violation.
    let acked: BTreeSet<u64> = (1..=8).chain([10]).collect();
    let v = check(&rows, &expect(10, &[], Some(&acked)));
    assert_eq!(v.missing, vec![4, 9]);
    assert_eq!(v.acked_lost, vec![4]);
    assert_eq!(v.unacked_lost, vec![9]);
    assert!(!v.all_delivered());
    assert!(!v.delivery_ok());
    assert_eq!(
        v.violations(),
        vec!["1 acknowledged message(s) lost".to_string()]
    );
    // Only the unacknowledged one missing: counted, and the run passes.
    let rows: Vec<Delivery> = clean(10).into_iter().filter(|r| r.seq != 9).collect();
    let v = check(&rows, &expect(10, &[], Some(&acked)));
    assert_eq!(
        (v.acked_lost.clone(), v.unacked_lost.clone()),
        (vec![], vec![9])
    );
    assert!(v.delivery_ok());
    assert!(v.violations().is_empty(), "{:?}", v.violations());
    // Acks unknown: nothing tells the two apart, so every missing message is a violation.
    let v = check(&rows, &expect(10, &[], None));
    assert_eq!(
        (v.acked_lost.clone(), v.unacked_lost.clone()),
        (vec![], vec![9])
    );
    assert!(!v.acks_known);
    assert!(!v.delivery_ok());
    assert_eq!(
        v.violations(),
        vec!["1 produced message(s) never delivered (acknowledgements unknown)".to_string()]
    );
    // Nothing published is a failure, not a pass.
    let v = check(&[], &expect(0, &[], None));
    assert!(!v.all_delivered());
    assert!(!v.delivery_ok());
    assert_eq!(v.violations(), vec!["nothing published".to_string()]);
}

#[test]
fn another_publishers_messages_are_not_judged_for_loss_or_duplicates() {
    let mut rows = clean(3);
    let mut other = d(1, 50, "primary", 1);
    other.publisher = "q".into();
    rows.push(other.clone());
    rows.push(Delivery {
        received_at_us: other.received_at_us + 1,
        ..other
    });
    let v = check(&rows, &expect(3, &[], None));
    assert_eq!((v.delivered, v.duplicates), (3, 0));
    let all = Expect {
        publisher: None,
        ..expect(3, &[], None)
    };
    assert_eq!(check(&rows, &all).duplicates, 1);
}

#[test]
fn duplicates_are_judged_against_a_bound_from_the_faults() {
    // One fault, resend 5: bound 5 × (1 + 1) = 10.
    let faults = [fault(FaultKind::Crash, 500, 500)];
    assert_eq!(duplicate_bound(5, faults.len()), 10);
    let with_dups = |n: u64| {
        let mut rows = clean(20);
        for i in 0..n {
            // The backup replays 1..=n after the crash, in its own epoch.
            rows.push(d(i + 1, 3000 + i * 10, "backup", 2));
        }
        rows
    };
    let v = check(&with_dups(10), &expect(20, &faults, None));
    assert_eq!((v.duplicates, v.duplicate_bound), (10, 10));
    assert!(v.violations().is_empty(), "{:?}", v.violations());
    let v = check(&with_dups(11), &expect(20, &faults, None));
    assert_eq!(v.duplicates, 11);
    assert_eq!(v.violations(), vec!["11 duplicates > bound 10".to_string()]);
    // The duplicates are counted from the deliveries, not from the subscriber's flag.
    let mut rows = with_dups(3);
    for r in &mut rows {
        r.duplicate = false;
    }
    assert_eq!(check(&rows, &expect(20, &faults, None)).duplicates, 3);
}

#[test]
fn an_out_of_order_first_delivery_is_a_violation_per_publisher() {
    let mut rows = vec![
        d(1, 100, "primary", 1),
        d(3, 200, "primary", 1),
        d(2, 300, "primary", 1),
        d(4, 400, "primary", 1),
    ];
    let v = check(&rows, &expect(4, &[], None));
    assert_eq!(v.reordered, 1);
    assert_eq!(v.reordered_by_publisher.get("p"), Some(&1));
    assert!(!v.delivery_ok());
    assert_eq!(
        v.violations(),
        vec!["1 out-of-order first deliveries".to_string()]
    );
    assert_eq!((v.order_events[0].seq, v.order_events[0].after_seq), (2, 3));
    // Inside a link fault's window it is still a violation, labelled as such.
    let f = [fault(FaultKind::Partition, 250, 260)];
    let v = check(&rows, &expect(4, &f, None));
    assert!(v.order_events[0].during_link_fault);
    assert!(!v.delivery_ok());
    assert_eq!(
        v.violations(),
        vec!["1 out-of-order first deliveries (1 during a link fault)".to_string()]
    );
    // The same messages in order are clean; a duplicate of an old one after newer ones (a
    // resend) is a duplicate, not a reordering.
    let mut in_order = clean(4);
    in_order.push(d(2, 500, "backup", 2));
    let faults = [fault(FaultKind::Crash, 450, 450)];
    let v = check(&in_order, &expect(4, &faults, None));
    assert_eq!((v.reordered, v.duplicates), (0, 1));
    assert!(v.delivery_ok());
    assert!(v.violations().is_empty(), "{:?}", v.violations());
    // Another publisher's low numbers after p's high ones are not a reordering of either.
    for (i, s) in [1u64, 2].into_iter().enumerate() {
        let mut q = d(s, 500 + i as u64 * 100, "primary", 1);
        q.publisher = "q".into();
        rows.push(q);
    }
    let all = Expect {
        publisher: None,
        ..expect(4, &[], None)
    };
    let v = check(&rows, &all);
    assert_eq!(v.reordered, 1);
    assert_eq!(v.reordered_by_publisher.get("q"), None);
    // Arrival order is what counts, whatever order the rows come in.
    let mut shuffled = clean(5);
    shuffled.reverse();
    assert_eq!(check(&shuffled, &expect(5, &[], None)).reordered, 0);
}

#[test]
fn two_nodes_in_one_epoch_is_a_violation_outside_a_link_fault() {
    // The backup delivers in the primary's epoch 1 at 1.5 s.
    let mut rows = clean(10);
    rows.push(d(11, 1500, "backup", 1));
    let v = check(&rows, &expect(11, &[], None));
    assert_eq!((v.epoch_violations, v.split_brain), (1, 0));
    assert_eq!(v.epoch_events[0].rules, vec![EpochRule::TwoNodes]);
    assert_eq!(
        v.violations(),
        vec!["1 stale or double-epoch deliveries".to_string()]
    );
    // A crash is no excuse.
    let crash = [fault(FaultKind::Crash, 1000, 1200)];
    assert_eq!(check(&rows, &expect(11, &crash, None)).epoch_violations, 1);
}

#[test]
fn two_nodes_in_one_epoch_during_a_link_fault_is_split_brain() {
    let mut rows = clean(10);
    rows.push(d(11, 1500, "backup", 1));
    for kind in [FaultKind::Partition, FaultKind::Hold, FaultKind::Latency] {
        let f = [fault(kind, 1000, 1200)];
        let v = check(&rows, &expect(11, &f, None));
        assert_eq!((v.epoch_violations, v.split_brain), (0, 1), "{kind:?}");
        assert!(v.violations().is_empty());
    }
    // The window: from the fault's start to its end + 3 pings + 1 s (here 1.2 + 3 + 1 = 5.2 s).
    let f = [fault(FaultKind::Partition, 1000, 1200)];
    assert_eq!(excused_until_us(&f[0], PING_US), T0 + 5_200_000);
    let at = |ms: u64| {
        let mut rows = clean(10);
        rows.push(d(11, ms, "backup", 1));
        let v = check(&rows, &expect(11, &f, None));
        (v.epoch_violations, v.split_brain)
    };
    assert_eq!(at(5200), (0, 1), "last excused instant");
    assert_eq!(at(5201), (1, 0), "just after the window");
    // Before the fault started there is nothing to excuse (the 999 ms row comes after seq 9).
    assert_eq!(at(999), (1, 0));
}

#[test]
fn a_delivery_in_an_epoch_older_than_one_seen_is_stale() {
    // The backup took over in epoch 2; then the old primary delivers in epoch 1.
    let mut rows = clean(5);
    rows.push(d(6, 600, "backup", 2));
    rows.push(d(7, 700, "primary", 1));
    let v = check(&rows, &expect(7, &[], None));
    assert_eq!(v.epoch_violations, 1);
    assert_eq!(v.epoch_events[0].rules, vec![EpochRule::Stale]);
    assert_eq!((v.epoch_events[0].seq, v.epoch_events[0].epoch), (7, 1));
    // Handing over properly (the backup goes on in epoch 2) is clean.
    rows.pop();
    rows.push(d(7, 700, "backup", 2));
    assert_eq!(check(&rows, &expect(7, &[], None)).epoch_violations, 0);
    // A node that goes back to an older epoch of its own is stale too.
    let rows = vec![
        d(1, 100, "primary", 1),
        d(2, 200, "primary", 3),
        d(3, 300, "primary", 1),
    ];
    let v = check(&rows, &expect(3, &[], None));
    assert_eq!(v.epoch_violations, 1);
    assert_eq!(v.epoch_events[0].rules, vec![EpochRule::Stale]);
}

#[test]
fn a_replay_from_the_log_is_judged_for_loss_and_order_but_not_for_epochs() {
    // Live in epoch 3 from the backup; then the primary replays entries written in epoch 1
    // (a subscriber resuming there): neither stale nor two nodes in one epoch.
    let mut rows = vec![d(1, 100, "backup", 3), d(2, 200, "backup", 3)];
    rows.push(replayed(3, 300, "primary", 1));
    rows.push(replayed(2, 350, "primary", 3));
    rows.push(d(4, 400, "backup", 3));
    let v = check(&rows, &expect(4, &[], None));
    assert_eq!((v.epoch_violations, v.split_brain), (0, 0));
    assert_eq!((v.duplicates, v.reordered), (1, 0));
    assert!(v.delivery_ok(), "{:?}", v.violations());
    // Delivered live in the same way, the first is stale and the second is two nodes in
    // epoch 3.
    rows[2] = d(3, 300, "primary", 1);
    rows[3] = d(2, 350, "primary", 3);
    let v = check(&rows, &expect(4, &[], None));
    assert_eq!(v.epoch_violations, 2);
    // A replay still counts for loss and order.
    let rows = vec![
        replayed(2, 100, "primary", 1),
        replayed(1, 200, "primary", 1),
    ];
    let v = check(&rows, &expect(3, &[], None));
    assert_eq!((v.missing.clone(), v.reordered), (vec![3], 1));
}

fn g(seq: u64, at_ms: u64, acked_ms: Option<u64>, who: &str) -> edgepair::client::Consumed {
    edgepair::client::Consumed {
        received_at_us: T0 + at_ms * 1000,
        source: "primary".into(),
        consumer: who.into(),
        group: "g".into(),
        offset: seq - 1,
        attempt: 1,
        publisher: "p".into(),
        seq,
        sent_at_us: T0,
        acked_at_us: acked_ms.map_or(0, |a| T0 + a * 1000),
        outcome: if acked_ms.is_some() {
            "acked"
        } else {
            "dropped"
        }
        .into(),
    }
}

#[test]
fn a_group_must_never_deliver_a_confirmed_ack_again_and_must_ack_everything() {
    let delivered: std::collections::BTreeSet<u64> = [1, 2].into_iter().collect();
    let none = std::collections::BTreeSet::new();
    let x = GroupExpect {
        publisher: "p",
        faults: &[],
        ping_interval_us: PING_US,
        acks_lost_at: &[],
        duplicated: &none,
    };
    let clean = vec![
        g(1, 10, Some(20), "a"),
        g(2, 30, None, "b"),
        g(2, 40, Some(50), "a"),
    ];
    assert!(check_group(&clean, &delivered, &x).is_empty());
    // Acknowledged at 20 ms, delivered again at 60 ms.
    let mut again = clean.clone();
    again.push(g(1, 60, Some(70), "b"));
    let v = check_group(&again, &delivered, &x);
    assert!(v.len() == 1 && v[0].contains("delivered again"), "{v:?}");
    // Inside a partition's split-brain window the same is excused.
    let faults = [FaultSpan {
        kind: FaultKind::Partition,
        from_us: T0,
        to_us: T0 + 30_000,
    }];
    let x2 = GroupExpect {
        faults: &faults,
        ..x
    };
    assert!(check_group(&again, &delivered, &x2).is_empty());
    // A message the log holds twice (the subscribers got it twice) is two entries: the other
    // offset's delivery is no redelivery of the acknowledged one; the same offset still is.
    let dup: std::collections::BTreeSet<u64> = [1].into_iter().collect();
    let x3 = GroupExpect {
        duplicated: &dup,
        ..x
    };
    let mut twice = clean.clone();
    let mut other = g(1, 60, Some(70), "b");
    other.offset = 7;
    twice.push(other);
    assert!(check_group(&twice, &delivered, &x3).is_empty());
    let v = check_group(&again, &delivered, &x3);
    assert!(v.len() == 1 && v[0].contains("delivered again"), "{v:?}");
    // An earlier attempt that the network brings after the ack (handed out before the
    // acknowledged attempt was) is no redelivery; a later attempt is.
    let mut late = clean.clone();
    late[0].attempt = 3;
    let mut earlier = g(1, 60, None, "b");
    earlier.attempt = 2;
    late.push(earlier);
    assert!(check_group(&late, &delivered, &x).is_empty());
    let mut after = g(1, 60, None, "b");
    after.attempt = 4;
    late.push(after);
    let v = check_group(&late, &delivered, &x);
    assert!(v.len() == 1 && v[0].contains("attempt 4"), "{v:?}");
    // An entry the subscribers got that no member acknowledged.
    let v = check_group(&clean[..2], &delivered, &x);
    assert!(v.len() == 1 && v[0].contains("never acknowledged"), "{v:?}");
}
