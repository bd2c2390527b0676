//! The report's figures checked on hand-made deliveries.

use super::*;

fn d(seq: u64, at_ms: u64, source: &str, dup: bool) -> Delivery {
    Delivery {
        received_at_us: 1_000_000_000 + at_ms * 1000,
        source: source.into(),
        topic: "t".into(),
        publisher: "p".into(),
        seq,
        sent_at_us: 1_000_000_000 + at_ms * 1000 - 100_000,
        latency_us: 100_000,
        duplicate: dup,
        epoch: 1,
        broker_rx_us: 0,
        compute_start_us: 0,
        compute_end_us: 0,
        payload: seq.to_string(),
        offset: seq,
    }
}

fn info(published: u64, kill_ms: Option<u64>) -> RunInfo {
    RunInfo {
        hosts: String::new(),
        clocks: Vec::new(),
        latency_correction_us: None,
        published,
        publisher: Some("p".into()),
        start_us: 1_000_000_000,
        end_us: 1_000_000_000 + 10_000_000,
        kill_at_us: kill_ms.map(|k| 1_000_000_000 + k * 1000),
        publish_period_us: 100_000,
        scenario: "kill-primary".into(),
        signal: "SIGKILL".into(),
        marks: Vec::new(),
        faults: Vec::new(),
        resend: 5,
        ping_interval_us: 1_000_000,
        acked: None,
    }
}

#[test]
fn missing_ranges_duplicates_and_failover_gap_are_counted() {
    let rows = vec![
        d(1, 100, "primary", false),
        d(2, 200, "primary", false),
        d(3, 300, "primary", false),
        // kill at 350 ms; 4 and 5 never arrive; backup resumes at 1000 ms
        d(3, 1000, "backup", true),
        d(6, 1100, "backup", false),
        d(8, 1200, "backup", false),
    ];
    let a = analyze(&rows, &info(8, Some(350)));
    assert_eq!(a.missing, vec![4, 5, 7]);
    assert!(!a.verdict_ok);
    assert_eq!(a.duplicates, 1);
    assert_eq!(a.unique, 5);
    assert_eq!(a.by_backup, 3);
    assert_eq!(a.failover_gap_ms, Some(650.0));
    assert_eq!(a.longest_silence_ms, 700.0);
    assert_eq!(a.longest_silence_seqs, (3, 3));
    let missing: Vec<(u64, u64)> = a
        .gaps
        .iter()
        .filter(|g| g.kind == "missing")
        .map(|g| (g.from_seq, g.to_seq))
        .collect();
    assert_eq!(missing, vec![(4, 5), (7, 7)]);
    let silence = a
        .gaps
        .iter()
        .find(|g| g.kind == "silence")
        .expect("silence");
    assert!(silence.during_failover);
    assert!(render_table(&a).contains("4-5, 7"));
}

#[test]
fn reordering_is_counted_once_per_late_message() {
    let rows = vec![
        d(1, 100, "primary", false),
        d(3, 200, "primary", false),
        d(2, 300, "primary", false),
        d(4, 400, "primary", false),
    ];
    let a = analyze(&rows, &info(4, None));
    assert_eq!(a.reordered, 1);
    assert!(
        !a.verdict_ok,
        "an out-of-order first delivery fails the run"
    );
    assert_eq!(a.failover_gap_ms, None);
    assert!(
        render_table(&a).starts_with("FAIL: 1 out-of-order first deliveries"),
        "{}",
        render_table(&a)
    );
}

#[test]
fn acknowledged_and_unacknowledged_losses_are_shown_apart() {
    // 4 (acknowledged) and 7 (never acknowledged) are missing.
    let rows: Vec<Delivery> = (1..=8)
        .filter(|s| *s != 4 && *s != 7)
        .map(|s| d(s, s * 100, "primary", false))
        .collect();
    let mut i = info(8, None);
    i.acked = Some((1..=8).filter(|s| *s != 7).collect());
    let a = analyze(&rows, &i);
    assert_eq!(
        (a.acked_lost.clone(), a.unacked_lost.clone()),
        (vec![4], vec![7])
    );
    assert!(!a.verdict_ok);
    let t = render_table(&a);
    assert!(t.starts_with("FAIL: 1 acknowledged message(s) lost"), "{t}");
    assert!(t.contains("acked lost       1 (4)"), "{t}");
    assert!(t.contains("unacked lost     1 (7)"), "{t}");
    // Only the unacknowledged one missing: the run passes and says what it did not deliver.
    let rows: Vec<Delivery> = (1..=8)
        .filter(|s| *s != 7)
        .map(|s| d(s, s * 100, "primary", false))
        .collect();
    let a = analyze(&rows, &i);
    assert!(a.verdict_ok);
    assert!(
        render_table(&a).starts_with("PASS: every acknowledged message was delivered, in order (1 unacknowledged never delivered)"),
        "{}",
        render_table(&a)
    );
    // Unknown acknowledgements: the same run fails, every missing message judged.
    i.acked = None;
    let a = analyze(&rows, &i);
    assert!(!a.verdict_ok);
    assert!(render_table(&a).contains("acked lost       ? (acknowledgements unknown)"));
}

#[test]
fn an_acknowledgement_file_is_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("acks.csv");
    let mut log = edgepair::client::AckLog::new(std::fs::File::create(&p).expect("create"));
    for seq in [1, 2, 4] {
        log.event(&edgepair::client::PubEvent::Acked {
            seq,
            broker: 0,
            rtt_us: 1,
        })
        .expect("write");
    }
    log.event(&edgepair::client::PubEvent::Resent { seqs: vec![3] })
        .expect("ignored");
    drop(log);
    let text = std::fs::read_to_string(&p).expect("read");
    assert!(
        text.starts_with(&edgepair::client::ACK_COLUMNS.join(",")),
        "{text}"
    );
    assert_eq!(
        read_acks(&p).expect("acks"),
        [1, 2, 4].into_iter().collect()
    );
    std::fs::write(&p, format!("{text}x,1,primary\n")).expect("write");
    let err = read_acks(&p).expect_err("bad row").to_string();
    assert!(err.contains("line 5"), "{err}");
}

#[test]
fn latency_percentiles_and_seconds_come_from_first_deliveries() {
    let mut rows: Vec<Delivery> = (1..=100).map(|s| d(s, s * 20, "primary", false)).collect();
    for (i, r) in rows.iter_mut().enumerate() {
        r.latency_us = (i as i64 + 1) * 1000; // 1..=100 ms
    }
    rows.push(Delivery {
        latency_us: 999_000,
        ..d(50, 1500, "backup", true)
    });
    let a = analyze(&rows, &info(100, None));
    assert!((a.latency.p50_ms - 50.0).abs() < 0.5, "{:?}", a.latency);
    assert!((a.latency.max_ms - 100.0).abs() < 0.5, "{:?}", a.latency);
    assert_eq!(a.per_second.len(), 3);
    assert_eq!(a.per_second.iter().map(|s| s.count).sum::<u64>(), 100);
}

#[test]
fn latency_is_split_into_stages_from_the_broker_stamps() {
    // Sent at t, received by the broker 1 ms later, waits 5 ms for a worker, computes 80 ms,
    // reaches the subscriber 2 ms after that: 88 ms in all.
    let rows: Vec<Delivery> = (1..=10)
        .map(|seq| {
            let mut x = d(seq, seq * 100, "primary", false);
            let sent = x.received_at_us - 88_000;
            x.sent_at_us = sent;
            x.latency_us = 88_000;
            x.broker_rx_us = sent + 1_000;
            x.compute_start_us = sent + 6_000;
            x.compute_end_us = sent + 86_000;
            x
        })
        .collect();
    let a = analyze(&rows, &info(10, None));
    let got: Vec<(&str, f64)> = a
        .stages
        .iter()
        .map(|(n, p)| (n.as_str(), p.p50_ms.round()))
        .collect();
    assert_eq!(
        got,
        [
            ("to broker", 1.0),
            ("queue wait", 5.0),
            ("compute", 80.0),
            ("delivery", 2.0)
        ]
    );
    assert!(
        render_table(&a).contains("queue wait 5.0/5.0"),
        "{}",
        render_table(&a)
    );
    // Deliveries without stamps (a seed broker) give no split rather than a wrong one.
    let plain: Vec<Delivery> = (1..=3).map(|s| d(s, s * 100, "primary", false)).collect();
    assert!(analyze(&plain, &info(3, None)).stages.is_empty());
}

#[test]
fn nothing_published_is_a_failure() {
    let a = analyze(&[], &info(0, None));
    assert!(!a.verdict_ok);
    assert!(render_table(&a).starts_with("FAIL"));
}

#[test]
fn reports_are_written_and_parse_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rows: Vec<Delivery> = (1..=30)
        .map(|s| d(s, s * 100, if s > 20 { "backup" } else { "primary" }, false))
        .collect();
    let i = info(30, Some(2050));
    let a = analyze(&rows, &i);
    write_reports(dir.path(), &a, &rows, &i).expect("write");
    for (f, cols) in [
        ("gaps.csv", &GAP_COLUMNS[..]),
        ("latency.csv", &LATENCY_COLUMNS[..]),
    ] {
        let mut r = csv::Reader::from_path(dir.path().join(f)).expect(f);
        let h: Vec<String> = r
            .headers()
            .expect("headers")
            .iter()
            .map(String::from)
            .collect();
        assert_eq!(h, cols);
        assert!(r.records().all(|x| x.is_ok()));
    }
    let svg = std::fs::read_to_string(dir.path().join("timeline.svg")).expect("svg");
    assert!(svg.contains("<svg") && svg.contains("sequence number") && svg.contains("PASS"));
    let svg = std::fs::read_to_string(dir.path().join("latency.svg")).expect("svg");
    assert!(svg.contains("latency, ms"));
    let j: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("summary.json")).expect("json"),
    )
    .expect("parse");
    assert_eq!(j["analysis"]["published"], 30);
}

#[test]
fn a_bad_row_names_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("d.csv");
    let mut w = csv::Writer::from_path(&p).expect("csv");
    w.serialize(d(1, 1, "primary", false)).expect("row");
    w.flush().expect("flush");
    drop(w);
    let mut text = std::fs::read_to_string(&p).expect("read");
    text.push_str("x,primary,t,p,notanumber,1,1,false,1,0,0,0,1\n");
    std::fs::write(&p, text).expect("write");
    let err = read_deliveries(&p).expect_err("bad row").to_string();
    assert!(err.contains("line 3"), "{err}");
}

#[test]
fn the_run_is_judged_by_the_checker_with_its_faults() {
    // The backup delivers in epoch 2 from 1 s on; the hung primary wakes up and delivers once
    // more in epoch 1 at 1.5 s.
    let mut rows: Vec<Delivery> = (1..=9).map(|s| d(s, s * 100, "primary", false)).collect();
    for s in 10..=14 {
        rows.push(Delivery {
            epoch: 2,
            ..d(s, s * 100, "backup", false)
        });
    }
    rows.push(d(15, 1500, "primary", false));
    for r in &mut rows {
        // Delivered live (a replay has no compute times, and its epochs are not judged).
        (r.compute_start_us, r.compute_end_us) = (r.sent_at_us + 1_000, r.sent_at_us + 2_000);
    }
    let at = |ms: u64| 1_000_000_000 + ms * 1000;
    let mut i = info(15, Some(900));
    i.faults = vec![FaultSpan {
        kind: check::FaultKind::Hang,
        from_us: at(900),
        to_us: at(1400),
    }];
    let a = analyze(&rows, &i);
    assert!(a.verdict_ok, "nothing is missing: the exit status stays 0");
    assert_eq!((a.check.epoch_violations, a.check.split_brain), (1, 0));
    assert_eq!(a.check.duplicate_bound, 10);
    assert_eq!(a.check.missing, a.missing);
    // Had the fault been a partition, the same delivery would be split brain.
    i.faults[0].kind = check::FaultKind::Partition;
    let a = analyze(&rows, &i);
    assert_eq!((a.check.epoch_violations, a.check.split_brain), (0, 1));
    // summary.json carries the verdict beside the analysis, whose fields are unchanged.
    let dir = tempfile::tempdir().expect("tempdir");
    write_reports(dir.path(), &a, &rows, &i).expect("write");
    let j: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("summary.json")).expect("json"),
    )
    .expect("parse");
    assert_eq!(j["check"]["split_brain"], 1);
    assert_eq!(j["run"]["faults"][0]["kind"], "Partition");
    assert!(j["analysis"].get("check").is_none());
    assert_eq!(j["analysis"]["missing"], serde_json::json!([]));
}
