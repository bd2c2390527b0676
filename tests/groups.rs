//! Consumer groups in the core, two nodes wired in memory (`support/pair.rs`): entries shared
//! among members, leases that run out, members that go away, dead letters, bad input, and a
//! failover after which nothing acknowledged is delivered again.

#[path = "support/pair.rs"]
mod pair;

use std::time::Duration;

use edgepair::protocol::{Frame, GroupOp, Role};
use pair::{Pair, B, P};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn quick(_mid: u64) -> Duration {
    ms(5)
}

/// A linked pair with group `g` on topic `t` (ack-wait 500 ms, 3 deliveries, one at a time).
fn pair_with_group() -> (Pair, usize) {
    let mut p = Pair::new(quick);
    p.run_until(ms(2_000), |p| {
        matches!(p.core(P).status(), Frame::Status { ref link, .. } if link == "up")
            && matches!(p.core(B).status(), Frame::Status { ref link, .. } if link == "armed")
    });
    // Past the startup grace, during which a node holds its first results.
    p.run_for(edgepair::core::STARTUP_GRACE);
    let admin = p.client(P);
    p.send(
        admin,
        "GROUP|create|t|g|first|ack_wait=500,max_deliver=3,max_in_flight=1",
    );
    p.run_until(ms(100), |p| p.count(admin, "GROUP|created|t|g") == 1);
    (p, admin)
}

/// (offset, attempt) of every entry delivered to `client`.
fn got(p: &Pair, client: usize) -> Vec<(u64, u32)> {
    p.clients[client]
        .lines
        .iter()
        .filter_map(|l| match Frame::parse(l.as_bytes()) {
            Ok(Frame::Group(GroupOp::Msg {
                offset, attempt, ..
            })) => Some((offset, attempt)),
            _ => None,
        })
        .collect()
}

fn publish(p: &mut Pair, n: u64) {
    let publ = p.client(P);
    for seq in 1..=n {
        p.send(publ, &format!("PUB|t|pub|{seq}|1|job{seq}"));
    }
    p.run_until(ms(200), |p| p.count(publ, "ACK|pub|") == n as usize);
}

fn info(p: &mut Pair, node: usize) -> edgepair::protocol::GroupInfo {
    let c = p.client(node);
    p.send(c, "GROUP|list|t");
    p.run_until(ms(50), |p| p.count(c, "GROUP|end") == 1);
    p.clients[c]
        .lines
        .iter()
        .find_map(|l| match Frame::parse(l.as_bytes()) {
            Ok(Frame::Group(GroupOp::Info { info, .. })) => Some(info),
            _ => None,
        })
        .expect("the group is listed")
}

/// Acknowledges every entry `client` holds and has not acknowledged yet.
fn ack_all(p: &mut Pair, client: usize, acked: &mut Vec<u64>) {
    for (o, _) in got(p, client) {
        if !acked.contains(&o) {
            acked.push(o);
            p.send(client, &format!("GROUP|ack|t|g|{o}"));
        }
    }
}

#[test]
fn entries_are_shared_one_at_a_time_and_each_is_acknowledged_once() {
    let (mut p, _) = pair_with_group();
    let (c1, c2) = (p.client(P), p.client(P));
    p.send(c1, "GROUP|join|t|g|one");
    p.send(c2, "GROUP|join|t|g|two");
    publish(&mut p, 6);
    let mut acked = Vec::new();
    p.run_until(ms(200), |p| got(p, c1).len() + got(p, c2).len() == 2);
    // One entry each at a time: acking lets the next come.
    for _ in 0..10 {
        ack_all(&mut p, c1, &mut acked);
        ack_all(&mut p, c2, &mut acked);
        p.run_for(ms(20));
    }
    let (a, b) = (got(&p, c1), got(&p, c2));
    assert_eq!(a.len() + b.len(), 6, "{a:?} {b:?}");
    assert!(a.len() >= 2 && b.len() >= 2, "shared: {a:?} {b:?}");
    let mut all: Vec<u64> = a.iter().chain(&b).map(|x| x.0).collect();
    all.sort();
    assert_eq!(
        all,
        vec![0, 1, 2, 3, 4, 5],
        "each entry to one member, once"
    );
    assert!(a.iter().chain(&b).all(|x| x.1 == 1), "first attempts only");
    assert_eq!(p.count(c1, "GROUP|acked|") + p.count(c2, "GROUP|acked|"), 6);
    let i = info(&mut p, P);
    assert_eq!((i.floor, i.lag, i.pending), (6, 0, 0), "{i:?}");
    // The backup holds the same floor, from the replicated journal.
    let ib = info(&mut p, B);
    assert_eq!(ib.floor, 6, "{ib:?}");
}

#[test]
fn a_lease_that_runs_out_goes_to_another_member_with_its_attempt_raised() {
    let (mut p, _) = pair_with_group();
    let slow = p.client(P);
    p.send(slow, "GROUP|join|t|g|slow");
    publish(&mut p, 1);
    p.run_until(ms(200), |p| got(p, slow).len() == 1);
    let quick = p.client(P);
    p.send(quick, "GROUP|join|t|g|quick");
    p.run_for(ms(300));
    assert!(got(&p, quick).is_empty(), "leased to slow until ack-wait");
    p.run_until(ms(400), |p| got(p, quick).len() == 1);
    assert_eq!(
        got(&p, quick),
        vec![(0, 2)],
        "attempt 2 after the lease ran out"
    );
    // The late ack of the first member is refused, saying why.
    p.send(slow, "GROUP|ack|t|g|0");
    p.run_until(ms(50), |p| p.count(slow, "ERR|") == 1);
    assert!(
        p.clients[slow]
            .lines
            .iter()
            .any(|l| l.contains("leased to quick")),
        "{:?}",
        p.clients[slow].lines
    );
    p.send(quick, "GROUP|ack|t|g|0");
    p.run_until(ms(100), |p| p.count(quick, "GROUP|acked|t|g|0") == 1);
    assert_eq!(info(&mut p, P).redelivered, 1);
}

#[test]
fn an_entry_whose_lease_ran_out_waits_for_another_member_not_the_slow_one() {
    let (mut p, _) = pair_with_group();
    let slow = p.client(P);
    p.send(slow, "GROUP|join|t|g|slow");
    publish(&mut p, 1);
    p.run_until(ms(200), |p| got(p, slow).len() == 1);
    // The other member is busy with an entry of its own when the slow one's lease (500 ms)
    // runs out, and stays so (its own lease runs out 300 ms later).
    let busy = p.client(P);
    p.send(busy, "GROUP|join|t|g|busy");
    p.run_for(ms(300));
    publish_as(&mut p, "pub2", 1);
    p.run_until(ms(200), |p| got(p, busy).len() == 1);
    p.run_for(ms(300));
    assert_eq!(
        got(&p, slow),
        vec![(0, 1)],
        "not handed back to the member whose lease ran out, while another member is there"
    );
    // A new entry still goes to the slow member (it has room): the waiting one holds up nothing.
    publish_as(&mut p, "pub3", 1);
    p.run_until(ms(200), |p| got(p, slow).len() == 2);
    assert_eq!(got(&p, slow)[1], (2, 1), "{:?}", got(&p, slow));
    // Once the busy member is done, the entry goes to it, its attempt raised.
    p.send(busy, "GROUP|ack|t|g|1");
    p.run_until(ms(200), |p| got(p, busy).len() == 2);
    assert_eq!(got(&p, busy)[1], (0, 2));
}

#[test]
fn retention_keeps_what_a_group_has_not_finished() {
    // Logs that keep only the last 3 delivered entries of a topic.
    let logs: [Option<Box<dyn edgepair::log::Storage>>; 2] = [
        Some(Box::new(edgepair::log::MemLog::new(3))),
        Some(Box::new(edgepair::log::MemLog::new(3))),
    ];
    let mut p = Pair::with_logs(quick, pair::config(), logs);
    p.run_until(
        ms(2_000),
        |p| matches!(p.core(P).status(), Frame::Status { ref link, .. } if link == "up"),
    );
    p.run_for(edgepair::core::STARTUP_GRACE);
    let admin = p.client(P);
    p.send(admin, "GROUP|create|t|g|first|max_in_flight=20");
    p.run_until(ms(100), |p| p.count(admin, "GROUP|created|t|g") == 1);
    // Ten entries, each delivered to the topic before the next is appended (the log trims at
    // an append), while the group has no member.
    for seq in 1..=10 {
        publish_as(&mut p, &format!("one{seq}"), 1);
        p.run_for(ms(50));
    }
    let late = p.client(P);
    p.send(late, "GROUP|join|t|g|late");
    p.run_until(ms(200), |p| got(p, late).len() == 10);
    let offsets: Vec<u64> = got(&p, late).iter().map(|x| x.0).collect();
    assert_eq!(
        offsets,
        (0..10).collect::<Vec<_>>(),
        "none cut before the group had it"
    );
}

/// One message from publisher `who`, acknowledged.
fn publish_as(p: &mut Pair, who: &str, seq: u64) {
    let publ = p.client(P);
    p.send(publ, &format!("PUB|t|{who}|{seq}|1|job"));
    p.run_until(ms(200), |p| p.count(publ, "ACK|") == 1);
}

#[test]
fn a_member_that_goes_away_gives_back_what_it_held() {
    let (mut p, _) = pair_with_group();
    let gone = p.client(P);
    p.send(gone, "GROUP|join|t|g|gone");
    publish(&mut p, 1);
    p.run_until(ms(200), |p| got(p, gone).len() == 1);
    let stays = p.client(P);
    p.send(stays, "GROUP|join|t|g|stays");
    p.hang_up_client(gone);
    p.run_until(ms(100), |p| got(p, stays).len() == 1);
    assert_eq!(got(&p, stays), vec![(0, 2)], "at once, not after ack-wait");
}

#[test]
fn an_entry_nobody_acknowledges_goes_to_the_dead_letter_topic() {
    let (mut p, _) = pair_with_group();
    let dead = p.client(P);
    p.send(dead, "SUB|t.dead");
    let c = p.client(P);
    p.send(c, "GROUP|join|t|g|nacker");
    publish(&mut p, 2);
    // Nack every delivery of offset 0; ack offset 1.
    for _ in 0..40 {
        let mine = got(&p, c);
        let nacked = p.count(c, "GROUP|nacked|");
        let zeros = mine.iter().filter(|m| m.0 == 0).count();
        if zeros > nacked {
            p.send(c, "GROUP|nack|t|g|0");
        }
        if mine.iter().any(|m| m.0 == 1) && p.count(c, "GROUP|ack") == 0 {
            p.send(c, "GROUP|ack|t|g|1");
        }
        p.run_for(ms(20));
    }
    let zeros: Vec<u32> = got(&p, c)
        .iter()
        .filter(|m| m.0 == 0)
        .map(|m| m.1)
        .collect();
    assert_eq!(
        zeros,
        vec![1, 2, 3],
        "max_deliver=3 deliveries, then no more"
    );
    p.run_until(ms(500), |p| p.msgs(dead).len() == 1);
    let line = p.clients[dead]
        .lines
        .iter()
        .find(|l| l.starts_with("MSG|t.dead|"))
        .cloned()
        .unwrap_or_default();
    assert!(
        line.contains("offset=0") && line.contains("3 deliveries") && line.contains("job1"),
        "{line}"
    );
    let i = info(&mut p, P);
    assert_eq!((i.floor, i.dead, i.lag), (2, 1, 0), "{i:?}");
}

#[test]
fn bad_group_frames_get_a_clear_error_and_change_nothing() {
    let (mut p, admin) = pair_with_group();
    let c = p.client(P);
    p.send(c, "GROUP|join|t|g|one");
    let other = p.client(P);
    for (who, line, says) in [
        (c, "GROUP|ack|t|g|7", "never delivered"),
        (c, "GROUP|ack|t|nosuch|0", "no group 'nosuch'"),
        (other, "GROUP|join|t|g|one", "already a member"),
        (c, "GROUP|join|t|nosuch|x", "no group"),
        (
            admin,
            "GROUP|create|t|g|first|max_deliver=9",
            "other settings",
        ),
        (
            admin,
            "GROUP|create|t|h|first|max_in_flight=0",
            "out of range",
        ),
        (admin, "GROUP|create|t|h|soon", "bad group start"),
        (admin, "PUB|$groups|x|1|1|forged", "reserved"),
    ] {
        let before = p.count(who, "ERR|");
        p.send(who, line);
        p.run_until(ms(50), |p| p.count(who, "ERR|") == before + 1);
        let last = p.clients[who].lines.last().cloned().unwrap_or_default();
        assert!(last.contains(says), "{line}: {last}");
    }
    let i = info(&mut p, P);
    assert_eq!((i.floor, i.pending, i.members.len()), (0, 0, 1), "{i:?}");
}

#[test]
fn after_a_failover_nothing_acknowledged_is_delivered_again() {
    let (mut p, _) = pair_with_group();
    let c = p.client(P);
    p.send(c, "GROUP|join|t|g|worker");
    // The same member also waits on the backup, as the consumer binary does.
    let cb = p.client(B);
    p.send(cb, "GROUP|join|t|g|worker");
    p.run_until(ms(50), |p| p.count(cb, "GROUP|joined|") == 1);
    publish(&mut p, 5);
    let mut acked = Vec::new();
    for _ in 0..3 {
        p.run_until(ms(200), |p| got(p, c).len() > acked.len());
        ack_all(&mut p, c, &mut acked);
        let n = acked.len();
        p.run_until(ms(200), |p| p.count(c, "GROUP|acked|") == n);
    }
    // Offset 3 is leased now and not acknowledged when the primary dies.
    p.run_until(ms(200), |p| got(p, c).len() == 4);
    p.crash(P);
    p.run_until(ms(2_000), |p| p.role(B) == Role::Primary);
    p.run_until(ms(1_000), |p| !got(p, cb).is_empty());
    let first = got(&p, cb)[0];
    p.send(cb, &format!("GROUP|ack|t|g|{}", first.0));
    p.run_until(ms(1_000), |p| got(p, cb).len() >= 2);
    let after = got(&p, cb);
    assert!(
        after.iter().all(|(o, _)| !acked.contains(o)),
        "acknowledged {acked:?}, delivered again {after:?}"
    );
    assert_eq!(
        after[0],
        (3, 2),
        "the entry in flight comes again, counted: {after:?}"
    );
    assert_eq!(after[1].0, 4);
}

#[test]
fn the_same_group_made_again_is_no_error_and_a_leaving_member_gives_back_what_it_held() {
    let (mut p, admin) = pair_with_group();
    p.send(
        admin,
        "GROUP|create|t|g|first|ack_wait=500,max_deliver=3,max_in_flight=1",
    );
    p.run_until(ms(100), |p| p.count(admin, "GROUP|created|t|g") == 2);
    let leaver = p.client(P);
    p.send(leaver, "GROUP|join|t|g|leaver");
    publish(&mut p, 1);
    p.run_until(ms(200), |p| got(p, leaver).len() == 1);
    let stays = p.client(P);
    p.send(stays, "GROUP|join|t|g|stays");
    p.send(leaver, "GROUP|leave|t|g");
    p.run_until(ms(100), |p| got(p, stays).len() == 1);
    assert_eq!(p.count(leaver, "GROUP|left|t|g"), 1);
    assert_eq!(got(&p, stays), vec![(0, 2)], "at once, not after ack-wait");
    assert_eq!(info(&mut p, P).members, vec!["stays".to_string()]);
}

#[test]
fn a_nack_with_a_delay_holds_the_entry_back_that_long() {
    let (mut p, _) = pair_with_group();
    let c = p.client(P);
    p.send(c, "GROUP|join|t|g|one");
    publish(&mut p, 1);
    p.run_until(ms(200), |p| got(p, c).len() == 1);
    p.send(c, "GROUP|nack|t|g|0|300");
    p.run_until(ms(50), |p| p.count(c, "GROUP|nacked|t|g|0") == 1);
    p.run_for(ms(250));
    assert_eq!(got(&p, c).len(), 1, "held back for the delay");
    p.run_until(ms(100), |p| got(p, c).len() == 2);
    assert_eq!(got(&p, c)[1], (0, 2));
}

/// A backup away while its primary's retention removed what it lacks (logs keeping 3
/// delivered entries) starts its copy again at the primary's oldest entry, and the link comes
/// up; the group's state follows through the journal, so after a failover nothing the group
/// finished is delivered again. Before, the catch-up's first entry was past the backup's end,
/// refused, and the link never came up: the primary ran degraded for good.
#[test]
fn a_backup_behind_the_primarys_retention_starts_again_at_its_oldest_entry() {
    let logs: [Option<Box<dyn edgepair::log::Storage>>; 2] = [
        Some(Box::new(edgepair::log::MemLog::new(3))),
        Some(Box::new(edgepair::log::MemLog::new(3))),
    ];
    let mut p = Pair::with_logs(quick, pair::config(), logs);
    let up =
        |p: &Pair| matches!(p.core(P).status(), Frame::Status { ref link, .. } if link == "up");
    p.run_until(ms(2_000), up);
    p.run_for(edgepair::core::STARTUP_GRACE);
    let admin = p.client(P);
    p.send(admin, "GROUP|create|t|g|first|max_in_flight=20");
    p.run_until(ms(100), |p| p.count(admin, "GROUP|created|t|g") == 1);
    let c = p.client(P);
    p.send(c, "GROUP|join|t|g|worker");
    let mut acked = Vec::new();
    let work = |p: &mut Pair, acked: &mut Vec<u64>, seq: u64| {
        publish_as(p, "a", seq);
        p.run_until(ms(200), |p| got(p, c).len() as u64 == seq);
        ack_all(p, c, acked);
        p.run_until(ms(200), |p| p.count(c, "GROUP|acked|") == acked.len());
        p.run_for(ms(50));
    };
    work(&mut p, &mut acked, 1);
    p.crash_keeping_log(B);
    for seq in 2..=10 {
        work(&mut p, &mut acked, seq);
    }
    let tp = p.core(P).log().topic("t");
    assert!(
        tp.first > 1,
        "the primary's retention removed entries: {tp:?}"
    );
    p.start(B);
    p.run_until(ms(3_000), up);
    assert!(up(&p), "the link comes up");
    work(&mut p, &mut acked, 11);
    let (tp, tb) = (p.core(P).log().topic("t"), p.core(B).log().topic("t"));
    assert_eq!((tb.first, tb.next), (tp.first, tp.next), "{tp:?} {tb:?}");
    // The member waits on the backup too; the primary dies; the backup serves the group.
    let cb = p.client(B);
    p.send(cb, "GROUP|join|t|g|worker");
    p.run_until(ms(50), |p| p.count(cb, "GROUP|joined|") == 1);
    p.crash(P);
    p.run_until(ms(2_000), |p| p.role(B) == Role::Primary);
    let pb = p.client(B);
    p.send(pb, "PUB|t|a|12|1|job12");
    p.run_until(ms(500), |p| !got(p, cb).is_empty());
    p.run_for(ms(200));
    assert_eq!(got(&p, cb), vec![(11, 1)], "only the new entry, once");
}

/// With a snapshot every 4 journal entries, the journal is cut on both nodes as the group
/// works, and the group's state lives on in the snapshots: after a failover the backup
/// delivers nothing the group finished, and a node restarted on its cut journal reads the
/// group back whole (its floor, its redelivery count).
#[test]
fn a_compacted_journal_keeps_the_groups_state_through_a_failover_and_a_restart() {
    let logs: [Option<Box<dyn edgepair::log::Storage>>; 2] = [
        Some(Box::new(edgepair::log::MemLog::new(1_000))),
        Some(Box::new(edgepair::log::MemLog::new(1_000))),
    ];
    let mut cfg = pair::config();
    cfg.journal_compact = 4;
    let mut p = Pair::with_logs(quick, cfg, logs);
    let up =
        |p: &Pair| matches!(p.core(P).status(), Frame::Status { ref link, .. } if link == "up");
    p.run_until(ms(2_000), up);
    p.run_for(edgepair::core::STARTUP_GRACE);
    let admin = p.client(P);
    p.send(
        admin,
        "GROUP|create|t|g|first|ack_wait=500,max_deliver=5,max_in_flight=1",
    );
    p.run_until(ms(100), |p| p.count(admin, "GROUP|created|t|g") == 1);
    let c = p.client(P);
    p.send(c, "GROUP|join|t|g|worker");
    let cb = p.client(B);
    p.send(cb, "GROUP|join|t|g|worker");
    publish(&mut p, 30);
    // The first entry's lease runs out once (a redelivery the snapshots must count).
    p.run_until(ms(200), |p| !got(p, c).is_empty());
    p.run_until(ms(1_000), |p| got(p, c).len() == 2);
    let mut acked = vec![0];
    p.send(c, "GROUP|ack|t|g|0");
    for _ in 0..20 {
        p.run_until(ms(200), |p| got(p, c).len() > acked.len() + 1);
        ack_all(&mut p, c, &mut acked);
        let n = acked.len();
        p.run_until(ms(200), |p| p.count(c, "GROUP|acked|") == n);
    }
    assert_eq!(acked.len(), 21);
    let (jp, jb) = (
        p.core(P).log().topic(edgepair::core::JOURNAL),
        p.core(B).log().topic(edgepair::core::JOURNAL),
    );
    assert!(
        jp.first > 0 && jb.first > 0,
        "both journals were cut: {jp:?} {jb:?}"
    );
    let before = info(&mut p, P);
    assert_eq!((before.floor, before.redelivered), (21, 1), "{before:?}");
    // The primary dies: the backup, on its cut journal, carries on from entry 21.
    p.crash(P);
    p.run_until(ms(2_000), |p| p.role(B) == Role::Primary);
    p.run_until(ms(1_000), |p| !got(p, cb).is_empty());
    let after = got(&p, cb);
    assert!(
        after.iter().all(|(o, _)| !acked.contains(o)),
        "acknowledged {acked:?}, delivered again {after:?}"
    );
    assert_eq!(after[0].0, 21, "{after:?}");
    // Its count: the lease that ran out, and entry 21, in flight at the failover.
    let on_b = info(&mut p, B);
    assert_eq!((on_b.floor, on_b.redelivered), (21, 2), "{on_b:?}");
    // Restarted on its cut journal, the node reads the group back whole.
    p.crash_keeping_log(B);
    p.start(B);
    p.run_for(ms(100));
    let again = info(&mut p, B);
    assert!(
        again.floor == 21 && again.redelivered >= 2,
        "the floor and the count read back: {again:?}"
    );
}
