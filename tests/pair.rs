//! The broker core without sockets: two cores wired in memory (see `pair/mod.rs`), time jumping
//! from one deadline to the next. Each test covers seconds of simulated failover in
//! milliseconds, and fails when the behaviour the documents promise does not hold.

#[path = "support/pair.rs"]
mod pair;

use std::time::{Duration, Instant};

use edgepair::protocol::{Frame, Role};
use pair::{Pair, B, P};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// 100 ms of compute for every message.
fn steady(_mid: u64) -> Duration {
    ms(100)
}

/// Later messages compute faster than earlier ones, so only the reorder stage keeps order.
fn shrinking(mid: u64) -> Duration {
    ms(300 - (mid % 5) * 50)
}

/// A pair whose backup follows its primary, and a subscriber on each node.
fn linked(compute: fn(u64) -> Duration) -> (Pair, usize, usize) {
    let mut p = Pair::new(compute);
    p.run_until(ms(2_000), |p| {
        matches!(p.core(P).status(), Frame::Status { ref link, .. } if link == "up")
            && matches!(p.core(B).status(), Frame::Status { ref link, .. } if link == "armed")
    });
    let (sp, sb) = (p.client(P), p.client(B));
    p.send(sp, "SUB|t");
    p.send(sb, "SUB|t");
    (p, sp, sb)
}

fn publish(p: &mut Pair, client: usize, seqs: std::ops::RangeInclusive<u64>) {
    for seq in seqs {
        p.send(client, &format!("PUB|t|pub|{seq}|1|m{seq}"));
    }
}

fn seqs(p: &Pair, client: usize) -> Vec<u64> {
    p.msgs(client).iter().map(|m| m.1).collect()
}

fn held(p: &Pair, n: usize) -> u64 {
    match p.core(n).status() {
        Frame::Status { held, .. } => held,
        _ => 0,
    }
}

fn link(p: &Pair, n: usize) -> String {
    match p.core(n).status() {
        Frame::Status { link, .. } => link,
        _ => String::new(),
    }
}

#[test]
fn backup_takes_over_when_the_primary_crashes_and_delivers_what_it_held() {
    let wall = Instant::now();
    let (mut p, _, sb) = linked(steady);
    let publ = p.client(P);
    publish(&mut p, publ, 1..=3);
    p.run_until(ms(50), |p| p.count(publ, "ACK|pub|") == 3);
    assert_eq!(held(&p, B), 3, "an ACK means the backup holds the message");
    p.crash(P);
    let crashed = p.now;
    p.run_until(ms(50), |p| p.role(B) == Role::Primary);
    assert!(
        p.now - crashed < ms(5),
        "a crash is seen through the closed link at once"
    );
    assert_eq!(p.core(B).epoch(), 2);
    p.run_until(ms(1_000), |p| p.msgs(sb).len() == 3);
    assert_eq!(seqs(&p, sb), [1, 2, 3]);
    assert!(p.msgs(sb).iter().all(|m| m.2.epoch == 2));
    assert!(wall.elapsed() < Duration::from_secs(1));
}

#[test]
fn backup_takes_over_when_the_primary_falls_silent() {
    let (mut p, ..) = linked(steady);
    p.pause(P);
    let paused = p.now;
    p.run_until(ms(3_000), |p| p.role(B) == Role::Primary);
    let took = p.now - paused;
    // One ping interval at most before the unanswered PING, plus its timeout.
    assert!(took <= ms(1_000 + 300 + 10), "took over after {took:?}");
    assert!(
        took >= ms(300),
        "took over before any ping could time out: {took:?}"
    );
    assert_eq!(p.core(B).epoch(), 2);
    assert_eq!(
        p.role(P),
        Role::Primary,
        "the paused node has not noticed yet"
    );
}

#[test]
fn takeover_replays_held_messages_in_publisher_order() {
    let (mut p, _, sb) = linked(shrinking);
    let publ = p.client(P);
    publish(&mut p, publ, 1..=5);
    p.run_until(ms(50), |p| p.count(publ, "ACK|pub|") == 5);
    p.crash(P);
    p.run_until(ms(2_000), |p| p.msgs(sb).len() == 5);
    assert_eq!(seqs(&p, sb), [1, 2, 3, 4, 5]);
}

#[test]
fn a_resent_publish_is_acknowledged_and_delivered_once() {
    let (mut p, sp, sb) = linked(steady);
    let publ = p.client(P);
    publish(&mut p, publ, 1..=2);
    publish(&mut p, publ, 1..=2);
    p.run_until(ms(50), |p| p.count(publ, "ACK|pub|") == 4);
    p.run_for(ms(500));
    assert_eq!(seqs(&p, sp), [1, 2], "resends are not delivered again");
    // Across a failover: the backup held 3 and 4; their resends to it are recognised.
    publish(&mut p, publ, 3..=4);
    p.run_until(ms(50), |p| p.count(publ, "ACK|pub|") == 6);
    p.crash(P);
    let again = p.client(B);
    publish(&mut p, again, 3..=5);
    p.run_until(ms(3_000), |p| p.count(again, "ACK|pub|") == 3);
    p.run_for(ms(500));
    assert_eq!(seqs(&p, sb), [3, 4, 5], "each message once, in order");
}

#[test]
fn pipelined_acks_come_back_in_order_with_and_without_a_backup() {
    let (mut p, ..) = linked(steady);
    let publ = p.client(P);
    publish(&mut p, publ, 1..=200);
    p.run_until(ms(100), |p| p.count(publ, "ACK|") == 200);
    p.crash(B);
    publish(&mut p, publ, 201..=400);
    p.run_until(ms(2_000), |p| p.count(publ, "ACK|") == 400);
    let acks: Vec<String> = p.clients[publ].lines.clone();
    let want: Vec<String> = (1..=400).map(|s| format!("ACK|pub|{s}")).collect();
    assert_eq!(acks, want);
}

#[test]
fn a_primary_whose_backup_dies_runs_degraded_and_replays_to_the_returning_backup() {
    let (mut p, ..) = linked(|_| ms(5_000));
    p.crash(B);
    let publ = p.client(P);
    publish(&mut p, publ, 1..=3);
    p.run_until(ms(1_000), |p| p.count(publ, "ACK|pub|") == 3);
    assert_eq!(link(&p, P), "down");
    p.start(B);
    p.run_until(ms(2_000), |p| held(p, B) == 3);
    assert_eq!(link(&p, P), "up");
}

#[test]
fn a_woken_primary_is_fenced_then_steps_down_and_serves_as_backup_at_once() {
    let (mut p, sp, sb) = linked(steady);
    let publ = p.client(P);
    publish(&mut p, publ, 1..=2);
    p.run_until(ms(50), |p| p.count(publ, "ACK|pub|") == 2);
    // Paused with both messages still in compute.
    p.pause(P);
    p.run_until(ms(3_000), |p| p.msgs(sb).len() == 2);
    assert_eq!(p.role(B), Role::Primary);
    p.resume(P);
    let woke = p.now;
    p.run_until(ms(2_000), |p| {
        p.role(P) == Role::Backup && link(p, B) == "up"
    });
    assert!(
        p.now - woke < ms(1_200),
        "back as a backup after {:?}",
        p.now - woke
    );
    assert!(
        p.msgs(sp).is_empty(),
        "the woken primary delivered: {:?}",
        p.msgs(sp)
    );
    // It stores what the new primary replicates, at once, and the link stays up.
    let publ2 = p.client(B);
    publish(&mut p, publ2, 3..=5);
    p.run_until(ms(100), |p| p.count(publ2, "ACK|pub|") == 3);
    assert_eq!(held(&p, P), 3);
    p.run_for(ms(1_000));
    assert_eq!(link(&p, B), "up");
    assert_eq!(seqs(&p, sb), [1, 2, 3, 4, 5]);
}

#[test]
fn a_restarted_primary_fails_back_as_backup_and_covers_the_next_crash() {
    let (mut p, _, sb) = linked(steady);
    p.crash(P);
    p.run_until(ms(100), |p| p.role(B) == Role::Primary);
    p.start(P);
    p.run_until(ms(3_000), |p| {
        p.role(P) == Role::Backup && link(p, B) == "up"
    });
    assert_eq!(p.core(P).epoch(), 2, "it adopted the new primary's epoch");
    let publ = p.client(B);
    publish(&mut p, publ, 1..=3);
    p.run_until(ms(100), |p| p.count(publ, "ACK|pub|") == 3);
    p.crash(B);
    p.run_until(ms(100), |p| p.role(P) == Role::Primary);
    assert_eq!(p.core(P).epoch(), 3);
    let sp = p.client(P);
    p.send(sp, "SUB|t");
    p.run_until(ms(1_000), |p| p.msgs(sp).len() == 3);
    assert!(p.msgs(sb).is_empty() || seqs(&p, sb).len() < 3);
}

#[test]
fn a_deposed_primary_hands_over_what_it_acknowledged_alone() {
    let (mut p, _, sb) = linked(|_| ms(3_000));
    p.partitioned = true;
    p.run_until(ms(3_000), |p| p.role(B) == Role::Primary);
    let publ = p.client(P);
    publish(&mut p, publ, 1..=2);
    p.run_until(ms(1_000), |p| p.count(publ, "ACK|pub|") == 2);
    assert_eq!(
        link(&p, P),
        "down",
        "acknowledged degraded, held by nobody else"
    );
    p.partitioned = false;
    p.run_until(ms(3_000), |p| p.role(P) == Role::Backup);
    p.run_until(ms(5_000), |p| p.msgs(sb).len() == 2);
    assert_eq!(seqs(&p, sb), [1, 2]);
    assert!(p.msgs(sb).iter().all(|m| m.2.epoch == 2));
}

#[test]
fn a_publish_at_the_backup_is_forwarded_while_the_primary_lives() {
    let (mut p, sp, _) = linked(steady);
    let publ = p.client(B);
    publish(&mut p, publ, 1..=3);
    p.run_until(ms(500), |p| p.count(publ, "ACK|pub|") == 3);
    assert_eq!(p.role(B), Role::Backup);
    p.run_until(ms(1_000), |p| p.msgs(sp).len() == 3);
    assert_eq!(seqs(&p, sp), [1, 2, 3]);
}

#[test]
fn publishes_from_a_client_that_hung_up_during_the_takeover_are_still_served() {
    let (mut p, _, sb) = linked(steady);
    p.crash(P);
    // Like the seed's publisher: fire at the backup and close without waiting for answers.
    let publ = p.client(B);
    publish(&mut p, publ, 1..=3);
    p.hang_up_client(publ);
    p.run_until(ms(1_000), |p| p.msgs(sb).len() == 3);
    assert_eq!(p.role(B), Role::Primary);
    assert_eq!(seqs(&p, sb), [1, 2, 3]);
}

#[test]
fn frames_behind_a_forwarded_publish_are_answered_in_order_and_reading_is_held_meanwhile() {
    let (mut p, ..) = linked(steady);
    p.pause(P);
    // The backup must probe before it can answer the publish: everything after it waits, in
    // order, and past the backlog bound the node asks not to be given more.
    let c = p.client(B);
    let n = edgepair::core::BACKLOG_HOLD;
    p.send(c, "PUB|t|pub|1|1|m1");
    for _ in 0..n {
        p.send(c, "PING");
    }
    p.send(c, "FROBNICATE|x");
    p.send(c, "PING");
    p.run_until(ms(2_000), |p| p.clients[c].lines.len() == n + 3);
    let lines = &p.clients[c].lines;
    assert_eq!(
        lines[0],
        "ACK|pub|1",
        "answered in order: {:?}",
        &lines[..3]
    );
    assert!(lines[1..=n].iter().all(|l| l == "PONG"), "then the PINGs");
    assert!(
        lines[n + 1].starts_with("ERR|unknown verb"),
        "then the bad line"
    );
    assert_eq!(lines[n + 2], "PONG");
    assert_eq!(
        p.clients[c].holds,
        [true, false],
        "held while busy, released after"
    );
    assert_eq!(p.role(B), Role::Primary);
}

#[test]
fn both_nodes_crash_and_every_acknowledged_message_is_delivered_from_their_logs() {
    let (mut p, ..) = linked(steady);
    let publ = p.client(P);
    publish(&mut p, publ, 1..=5);
    p.run_until(ms(50), |p| p.count(publ, "ACK|pub|") == 5);
    assert!(
        p.msgs(publ).is_empty(),
        "acknowledged while still in compute"
    );
    p.crash_keeping_log(P);
    p.crash_keeping_log(B);
    p.run_for(ms(500));
    p.start(B);
    p.start(P);
    let sp = p.client(P);
    p.send(sp, "SUB|t");
    p.run_until(ms(2_000), |p| p.msgs(sp).len() == 5);
    assert_eq!(seqs(&p, sp), [1, 2, 3, 4, 5], "every one, in order");
    let offsets: Vec<u64> = p.msgs(sp).iter().map(|m| m.2.offset).collect();
    assert_eq!(
        offsets,
        [0, 1, 2, 3, 4],
        "at the offsets they were logged at"
    );
    assert!(
        p.msgs(sp).iter().all(|m| m.2.epoch == 3),
        "a new reign after the one its log remembers (1), of its own parity"
    );
    p.run_until(ms(2_000), |p| link(p, P) == "up" && held(p, B) == 0);
    // A resend of an acknowledged message after the restart is recognised from the log.
    let again = p.client(P);
    publish(&mut p, again, 3..=3);
    p.run_for(ms(500));
    assert_eq!(
        seqs(&p, sp),
        [1, 2, 3, 4, 5],
        "the resend is not logged twice"
    );
    let sp2 = p.client(P);
    p.send(sp2, "SUB|t");
    publish(&mut p, again, 6..=6);
    p.run_until(ms(1_000), |p| p.msgs(sp2).len() == 1);
    assert_eq!(
        p.msgs(sp2)[0].2.offset,
        5,
        "new entries go after the old ones"
    );
}

#[test]
fn a_backup_that_lost_its_log_is_caught_up_from_the_primarys_log() {
    let (mut p, sp, _) = linked(|_| ms(1));
    let publ = p.client(P);
    publish(&mut p, publ, 1..=4);
    p.run_until(ms(500), |p| p.count(publ, "ACK|pub|") == 4);
    p.crash(B);
    publish(&mut p, publ, 5..=8);
    p.run_until(ms(500), |p| p.count(publ, "ACK|pub|") == 8);
    p.start(B);
    p.run_until(ms(3_000), |p| link(p, P) == "up");
    publish(&mut p, publ, 9..=9);
    p.run_until(ms(500), |p| p.count(publ, "ACK|pub|") == 9);
    p.run_until(ms(2_000), |p| p.msgs(sp).len() == 9);
    p.run_until(ms(500), |p| held(p, B) == 0);
    assert_eq!(held(&p, B), 0, "everything caught up is marked delivered");
    // The backup's copy is the primary's: it takes over with offsets continuing after 8.
    p.crash(P);
    p.run_until(ms(500), |p| p.role(B) == Role::Primary);
    let sb2 = p.client(B);
    p.send(sb2, "SUB|t");
    let publ2 = p.client(B);
    publish(&mut p, publ2, 10..=10);
    p.run_until(ms(1_000), |p| p.msgs(sb2).len() == 1);
    assert_eq!(p.msgs(sb2)[0].2.offset, 9);
}

#[test]
fn a_divergent_tail_is_cut_and_its_undelivered_entries_handed_over() {
    // The primary runs degraded in a partition and logs 1..=2 (compute long, so undelivered);
    // the backup takes over and logs 3 at the same offsets. When the partition heals the
    // deposed primary's log diverges from the new primary's: its entries are cut and handed
    // over, so nothing acknowledged is lost and both logs agree.
    let (mut p, _, sb) = linked(|_| ms(2_000));
    p.partitioned = true;
    p.run_until(ms(3_000), |p| p.role(B) == Role::Primary);
    let publ = p.client(P);
    publish(&mut p, publ, 1..=2);
    p.run_until(ms(1_000), |p| p.count(publ, "ACK|pub|") == 2);
    let publ_b = p.client(B);
    p.send(publ_b, "PUB|t|other|1|1|x");
    p.run_until(ms(1_000), |p| p.count(publ_b, "ACK|other|") == 1);
    p.partitioned = false;
    p.run_until(ms(5_000), |p| p.role(P) == Role::Backup);
    p.run_until(ms(10_000), |p| p.msgs(sb).len() == 3);
    let mut got: Vec<(String, u64)> = p.msgs(sb).iter().map(|m| (m.0.clone(), m.1)).collect();
    got.sort();
    assert_eq!(
        got,
        [("other".into(), 1), ("pub".into(), 1), ("pub".into(), 2)]
    );
    let offsets: Vec<u64> = p.msgs(sb).iter().map(|m| m.2.offset).collect();
    assert_eq!(offsets, [0, 1, 2], "one log, dense, in delivery order");
    p.run_until(ms(3_000), |p| held(p, P) == 0);
    assert_eq!(
        held(&p, P),
        0,
        "the deposed node's copy agrees with the log"
    );
}

/// `(offset, seq)` of every `MSG` a client got.
fn offsets(p: &Pair, client: usize) -> Vec<(u64, u64)> {
    p.msgs(client).iter().map(|m| (m.2.offset, m.1)).collect()
}

#[test]
fn a_replay_chases_live_deliveries_and_hands_over_without_gap_or_duplicate() {
    let (mut p, sp, _) = linked(|_| ms(1));
    let publ = p.client(P);
    publish(&mut p, publ, 1..=3000);
    p.run_until(ms(5_000), |p| p.msgs(sp).len() == 3000);
    // A subscriber from offset 0 that does not read: one chunk, then the replay waits.
    let s = p.client(P);
    p.clients[s].stalled = true;
    p.send(s, "SUB|t|0");
    p.run_for(ms(10));
    assert_eq!(
        p.msgs(s).len(),
        edgepair::core::REPLAY_CHUNK,
        "the next chunk waits for the writer to drain"
    );
    // Live traffic meanwhile: it must not reach the subscriber ahead of its replay.
    publish(&mut p, publ, 3001..=3100);
    p.run_until(ms(5_000), |p| p.msgs(sp).len() == 3100);
    assert_eq!(p.msgs(s).len(), edgepair::core::REPLAY_CHUNK);
    p.unstall(s);
    publish(&mut p, publ, 3101..=3200);
    p.run_until(ms(5_000), |p| p.msgs(s).len() >= 3200);
    p.run_for(ms(100));
    let got = offsets(&p, s);
    let want: Vec<(u64, u64)> = (0..3200).map(|o| (o, o + 1)).collect();
    assert_eq!(got.len(), want.len(), "no duplicate, nothing missing");
    assert_eq!(got, want, "offsets 0.. in order, each once");
    // The end of the replay is marked once, between replayed and live deliveries.
    let lines = &p.clients[s].lines;
    let at = lines
        .iter()
        .position(|l| l.starts_with("REPLAYED|t|"))
        .expect("REPLAYED sent");
    assert_eq!(p.count(s, "REPLAYED|"), 1);
    let next: u64 = lines[at]["REPLAYED|t|".len()..].parse().expect("offset");
    assert!((3100..=3200).contains(&next), "replay ended at {next}");
    assert_eq!(at as u64, next, "every line before it is a replayed MSG");
}

#[test]
fn history_sends_the_last_entries_and_subscribes_nobody() {
    let (mut p, sp, _) = linked(|_| ms(1));
    let publ = p.client(P);
    publish(&mut p, publ, 1..=10);
    p.run_until(ms(2_000), |p| p.msgs(sp).len() == 10);
    let h = p.client(P);
    p.send(h, "HISTORY|t|3");
    p.send(h, "SUB|t|time:0");
    p.run_for(ms(10));
    let lines = p.clients[h].lines.clone();
    assert_eq!(lines.len(), 3 + 1 + 10 + 1, "{lines:?}");
    assert_eq!(lines[3], "REPLAYED|t|10");
    assert_eq!(seqs(&p, h)[..3], [8, 9, 10]);
    assert_eq!(lines[14], "REPLAYED|t|10");
    // A start past the end of this node's log (a subscriber that saw more on the other
    // node) is taken as the end of the log: what lands there next is not skipped.
    let r = p.client(P);
    p.send(r, "SUB|t|12");
    publish(&mut p, publ, 11..=14);
    p.run_until(ms(2_000), |p| p.msgs(h).len() == 3 + 14);
    p.run_for(ms(50));
    assert_eq!(p.clients[r].lines[0], "REPLAYED|t|10");
    assert_eq!(offsets(&p, r), vec![(10, 11), (11, 12), (12, 13), (13, 14)]);
}

/// A linked pair whose nodes run with a 2 s lease.
fn leased(compute: fn(u64) -> Duration) -> (Pair, usize, usize) {
    let mut cfg = pair::config();
    cfg.lease = Some(ms(2_000));
    let mut p = Pair::with_config(compute, cfg);
    p.run_until(ms(2_000), |p| link(p, P) == "up" && link(p, B) == "armed");
    let (sp, sb) = (p.client(P), p.client(B));
    p.send(sp, "SUB|t");
    p.send(sb, "SUB|t");
    (p, sp, sb)
}

#[test]
fn with_a_lease_a_crashed_primary_is_replaced_once_its_lease_has_run_out() {
    let (mut p, _, sb) = leased(steady);
    let publ = p.client(P);
    publish(&mut p, publ, 1..=3);
    p.run_until(ms(100), |p| p.count(publ, "ACK|pub|") == 3);
    assert_eq!(p.count(publ, "ACK|pub|"), 3, "a granted lease acknowledges");
    p.crash(P);
    let crashed = p.now;
    p.run_until(ms(5_000), |p| p.role(B) == Role::Primary);
    let took = p.now - crashed;
    assert!(
        took >= ms(1_400) && took <= ms(2_100),
        "waited out the lease (2 s from the last contact, at most 0.5 s before the crash): {took:?}"
    );
    p.run_until(ms(1_000), |p| p.msgs(sb).len() == 3);
    assert_eq!(
        seqs(&p, sb),
        [1, 2, 3],
        "a refused connect to the dead node's port grants the new primary its lease"
    );
}

#[test]
fn with_a_lease_a_primary_whose_backup_is_down_acknowledges_alone() {
    let (mut p, sp, _) = leased(steady);
    let publ = p.client(P);
    publish(&mut p, publ, 1..=2);
    p.run_until(ms(100), |p| p.count(publ, "ACK|pub|") == 2);
    p.crash(B);
    // Nobody listens on the backup's port: its connect is refused, which both grants the
    // lease and shows that no node there can take over, so the primary runs degraded.
    publish(&mut p, publ, 3..=4);
    p.run_until(ms(5_000), |p| p.count(publ, "ACK|pub|") == 4);
    p.run_until(ms(1_000), |p| p.msgs(sp).len() == 4);
    assert_eq!(seqs(&p, sp), [1, 2, 3, 4]);
}

#[test]
fn with_a_lease_reigns_never_overlap_in_a_partition() {
    // Long compute: the primary has results to deliver throughout the partition.
    let (mut p, sp, sb) = leased(|_| ms(1_000));
    let publ = p.client(P);
    publish(&mut p, publ, 1..=2);
    p.run_until(ms(100), |p| p.count(publ, "ACK|pub|") == 2);
    p.partitioned = true;
    let cut = p.now;
    // The cut-off primary does not acknowledge without its backup, even within its lease: the
    // backup may be taking over, and a message acknowledged here alone would reach it only
    // when this node hands it over, after the publisher's later ones.
    publish(&mut p, publ, 3..=3);
    p.run_until(ms(10_000), |p| p.role(B) == Role::Primary);
    assert_eq!(
        p.count(publ, "ACK|pub|3"),
        0,
        "acknowledged without the backup, which was only out of reach"
    );
    assert!(p.now - cut >= ms(2_000), "no takeover within the lease");
    let by_old = p.msgs(sp).len();
    // Past its lease the old primary acknowledges and delivers nothing more.
    publish(&mut p, publ, 4..=4);
    p.run_for(ms(5_000));
    assert_eq!(
        p.count(publ, "ACK|pub|4"),
        0,
        "published after the lease ran out: not acknowledged"
    );
    assert_eq!(
        p.msgs(sp).len(),
        by_old,
        "the old primary delivered nothing once the new one reigned"
    );
    assert!(
        p.msgs(sb).is_empty(),
        "the new primary has no lease either while the old one is cut off"
    );
    p.partitioned = false;
    p.run_until(ms(10_000), |p| p.role(P) == Role::Backup);
    let all = |p: &Pair| {
        let mut got: Vec<u64> = seqs(p, sp).into_iter().chain(seqs(p, sb)).collect();
        got.sort();
        got.dedup();
        got
    };
    p.run_until(ms(10_000), |p| all(p).starts_with(&[1, 2, 3]));
    assert_eq!(
        p.msgs(sp).len(),
        by_old,
        "still nothing from the old primary"
    );
    assert!(p.msgs(sb).iter().all(|m| m.2.epoch == 2));
}

#[test]
fn a_resume_starts_where_the_log_holds_a_newer_reigns_entries() {
    let (mut p, sp, _) = linked(|_| ms(1));
    let publ = p.client(P);
    publish(&mut p, publ, 1..=5);
    p.run_until(ms(2_000), |p| p.msgs(sp).len() == 5 && held(p, B) == 0);
    // A backup replays what a subscriber asks from an offset, but not on a resume: the primary
    // delivered those entries (sent from here too they race its live ones).
    let (asked, resumed) = (p.client(B), p.client(B));
    p.send(asked, "SUB|t|2");
    p.send(resumed, "SUB|t|2@1");
    p.run_for(ms(10));
    assert_eq!(offsets(&p, asked), vec![(2, 3), (3, 4), (4, 5)]);
    assert_eq!(p.clients[resumed].lines, ["REPLAYED|t|5"]);
    // The backup goes down: the primary runs degraded and delivers offsets 5..7 that only its
    // own log has, in epoch 1; then it dies, and the backup comes back on its log.
    p.crash_keeping_log(B);
    publish(&mut p, publ, 6..=8);
    p.run_until(ms(5_000), |p| p.msgs(sp).len() == 8);
    let last = p.msgs(sp)[7].2;
    assert_eq!((last.offset, last.epoch), (7, 1));
    p.crash(P);
    p.start(B);
    // A publish to it finds the primary gone: it takes over, and the new reign writes other
    // entries at offsets 5..7.
    let live = p.client(B);
    p.send(live, "SUB|t");
    let again = p.client(B);
    publish(&mut p, again, 11..=13);
    p.run_until(ms(3_000), |p| p.role(B) == Role::Primary);
    // (It delivers what its log held first: the backup's delivered mark was not saved.)
    p.run_until(ms(5_000), |p| seqs(p, live).last() == Some(&13));
    // Resuming after offset 7 seen in epoch 1 starts at the first entry of the newer reign;
    // a plain offset would have skipped the three.
    let resumed = p.client(B);
    p.send(resumed, "SUB|t|8@1");
    let plain = p.client(B);
    p.send(plain, "SUB|t|8");
    // The same resume after an entry delivered in epoch 2 has nothing to take back.
    let current = p.client(B);
    p.send(current, "SUB|t|8@2");
    p.run_for(ms(100));
    assert_eq!(p.clients[resumed].lines[3], "REPLAYED|t|8");
    assert_eq!(offsets(&p, resumed), vec![(5, 11), (6, 12), (7, 13)]);
    assert_eq!(p.clients[plain].lines, ["REPLAYED|t|8"]);
    assert_eq!(p.clients[current].lines, ["REPLAYED|t|8"]);
    // A log in memory behind the resume point has most likely started over: all of it.
    let ahead = p.client(B);
    p.send(ahead, "SUB|t|20@2");
    p.run_for(ms(100));
    assert_eq!(offsets(&p, ahead).first(), Some(&(0, 1)));
    assert_eq!(offsets(&p, ahead).len(), 8);
}

#[test]
fn a_primary_restarted_on_its_log_takes_the_backups_newer_entries_before_fresh_publishes() {
    // Both nodes lose power while the backup reigns (it took over in a partition) with an
    // acknowledged entry, seq 3, that never reached the primary, still in compute. The primary
    // comes back on its log and its publisher resends seq 4 at once: seq 4 must wait until the
    // backup has cut its tail and handed seq 3 over, or the subscribers get 4 before 3.
    let (mut p, sp, _) = linked(steady);
    let publ = p.client(P);
    publish(&mut p, publ, 1..=2);
    p.run_until(ms(2_000), |p| p.msgs(sp).len() == 2 && held(p, B) == 0);
    p.partitioned = true;
    p.run_until(ms(3_000), |p| p.role(B) == Role::Primary);
    let publ_b = p.client(B);
    publish(&mut p, publ_b, 3..=3);
    p.run_until(ms(1_000), |p| p.count(publ_b, "ACK|pub|3") == 1);
    // Power loss before seq 3's compute ends: undelivered in the backup's log only.
    p.crash_keeping_log(P);
    p.crash_keeping_log(B);
    p.partitioned = false;
    p.run_for(ms(500));
    p.start(B);
    p.start(P);
    let live = p.client(P);
    p.send(live, "SUB|t|2");
    let again = p.client(P);
    publish(&mut p, again, 4..=4);
    p.run_until(ms(5_000), |p| p.msgs(live).len() == 2);
    assert_eq!(
        seqs(&p, live),
        [3, 4],
        "the older entry first, in publish order"
    );
    assert_eq!(offsets(&p, live), [(2, 3), (3, 4)]);
    assert_eq!(p.count(again, "ACK|pub|4"), 1);
}

#[test]
fn a_lost_ping_is_no_hang_while_the_primary_goes_on_replicating() {
    // A 10 ms partition swallows whatever crosses it; slid over one ping interval, it swallows
    // a PING in some window. The primary replicates a publish just after: the backup heard from
    // it after that PING went out, so the PING's silence is a lost frame, not a hung primary.
    for window in 0..100 {
        let (mut p, ..) = linked(|_| ms(1));
        let publ = p.client(P);
        p.run_for(ms(window * 10));
        p.partitioned = true;
        p.run_for(ms(10));
        p.partitioned = false;
        publish(&mut p, publ, 1..=1);
        p.run_for(ms(1_500));
        assert_eq!(
            p.role(B),
            Role::Backup,
            "took over after a partition at {} ms",
            window * 10
        );
        assert_eq!(p.role(P), Role::Primary);
    }
}

/// A topic with many subscribers of both dialects (its deliveries go out as one batch per
/// dialect, `Output::Deliver`): each gets every message once, in order, in its own dialect; a
/// subscriber that also publishes, whose `ACK`s are still owed when the deliveries go, gets
/// each `ACK` before the delivery of the same message, as with a few subscribers.
#[test]
fn many_subscribers_of_both_dialects_each_get_every_message_in_order() {
    let (mut p, sp, _) = linked(steady);
    let ids: Vec<usize> = (0..12).map(|_| p.client(P)).collect();
    let seeds: Vec<usize> = (0..12).map(|_| p.client(P)).collect();
    for &c in &ids {
        p.send(c, "SUB|t");
    }
    for &c in &seeds {
        p.send(c, "SUBSCRIBE|t");
    }
    let both = p.client(P);
    p.send(both, "SUB|t");
    publish(&mut p, both, 1..=5);
    p.run_until(ms(2_000), |p| {
        seeds.iter().all(|&c| p.count(c, "m") == 5) && seqs(p, both).len() == 5
    });
    p.run_for(ms(500));
    for c in ids.iter().copied().chain([sp, both]) {
        assert_eq!(seqs(&p, c), [1, 2, 3, 4, 5], "client {c}");
    }
    let want: Vec<String> = (1..=5).map(|s| format!("m{s}")).collect();
    for &c in &seeds {
        assert_eq!(p.clients[c].lines, want, "seed subscriber {c}");
    }
    // Each ACK comes before the MSG of its message.
    let order: Vec<String> = p.clients[both]
        .lines
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            match f[..] {
                ["ACK", _, seq] => Some(format!("a{seq}")),
                ["MSG", _, _, seq, ..] => Some(format!("m{seq}")),
                _ => None,
            }
        })
        .collect();
    for s in 1..=5 {
        let a = order.iter().position(|x| *x == format!("a{s}"));
        let m = order.iter().position(|x| *x == format!("m{s}"));
        assert!(a.is_some() && a < m, "ACK {s} before MSG {s}: {order:?}");
    }
}
