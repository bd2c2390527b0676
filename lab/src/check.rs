//! The one invariant checker: what every run of the pair is judged by, whether it ran as real
//! processes (the harness: single runs, the matrix, chaos) or inside the simulator.
//!
//! [`check`] takes the subscriber's deliveries, what was published (and, when known, which
//! messages were acknowledged) and the faults that were injected (kind and time window), and
//! returns one [`Verdict`]:
//!
//! 1. **lost**: acknowledged messages never delivered ([`Verdict::acked_lost`], a violation),
//!    and, counted apart, produced but unacknowledged messages never delivered
//!    ([`Verdict::unacked_lost`], not a violation: see below); together they are
//!    [`Verdict::missing`];
//! 2. **duplicates**: deliveries of a `(publisher, seq)` already delivered, judged against
//!    [`duplicate_bound`];
//! 3. **order**, per publisher: a first delivery with a lower sequence number than an earlier
//!    first delivery of the same publisher is out of order, a violation ([`Verdict::reordered`]);
//! 4. **epochs**: two different nodes delivering in one epoch, or a node delivering in an epoch
//!    older than one already delivered in. Such a delivery inside the window of a link fault
//!    (see [`FaultKind::excuses_split_brain`] and [`excused_until_us`]) is split brain, counted
//!    apart and not a violation; anywhere else it is an [`EpochViolation`]. Only live
//!    deliveries are judged: a replay from the log ([`Delivery::replayed`]) carries the epochs
//!    that wrote its entries, whichever node sends it.
//!
//! An unacknowledged message is the publisher's to resend, not the pair's to keep: a broker
//! promises only what it acknowledged (after replication, or in its log when it runs alone), and
//! a publisher resends everything unacknowledged after a switch. So an unacknowledged message can
//! be lost only when the publisher stops before it is acknowledged (it gave up, both brokers
//! being down for `--give-up`, or it was killed), and the publisher then says so itself (exit
//! status 1, its unacknowledged list). It is counted, not judged. When the acknowledged set is
//! not known, nothing tells the two apart, and every missing message is a violation.
//!
//! Pure: no socket, no clock; every rule is tested on hand-made deliveries at the bottom.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use edgepair::client::Delivery;

/// What a fault did, as far as judging a run is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FaultKind {
    /// A node killed (SIGKILL or SIGTERM), brought back later or not.
    Crash,
    /// A node killed and started again at once.
    Restart,
    /// A node stopped (SIGSTOP) and resumed later: it may wake up believing it is primary.
    Hang,
    /// The primary↔backup link cut.
    Partition,
    /// Everything on the primary↔backup link held back (delayed, not dropped).
    Hold,
    /// The primary↔backup link slowed down.
    Latency,
}

impl FaultKind {
    /// Whether deliveries by two nodes in one reign are excused (split brain) while this fault
    /// lasts. Only link faults: when the primary↔backup link is cut, held or slowed beyond the
    /// ping timeout, the backup takes over while the primary, alive and cut off, keeps serving.
    /// The pair chooses availability over consistency here (BACKUP_SYSTEM.md, "Failure
    /// analysis", Partitions), so both nodes may deliver until the link heals and the lower
    /// epoch steps down. A crashed, restarted or hung node gets no such excuse: a hung primary
    /// that wakes up must not deliver in its stale epoch.
    pub fn excuses_split_brain(self) -> bool {
        matches!(
            self,
            FaultKind::Partition | FaultKind::Hold | FaultKind::Latency
        )
    }
}

/// One injected fault: its kind and when it started and ended, µs since the Unix epoch (the
/// subscriber's clock, the clock of [`Delivery::received_at_us`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultSpan {
    /// What.
    pub kind: FaultKind,
    /// Start.
    pub from_us: u64,
    /// End (healed); `from_us` for an instant fault.
    pub to_us: u64,
}

/// Ping intervals after a link fault heals during which split brain is still excused: the
/// backup needs up to a ping to hear the primary again, and the lower epoch a round trip more to
/// step down and hand over. The simulator has always used 3.
pub const SPLIT_BRAIN_PINGS: u64 = 3;

/// Slack added after those ping intervals, µs: deliveries already under way (compute time, the
/// subscriber's queue) when the lower epoch stepped down.
pub const SPLIT_BRAIN_SLACK_US: u64 = 1_000_000;

/// End of the window in which a link fault excuses split brain: the fault's end, plus
/// [`SPLIT_BRAIN_PINGS`] ping intervals, plus [`SPLIT_BRAIN_SLACK_US`]. The window starts when
/// the fault starts. This is the only excuse window there is.
pub fn excused_until_us(f: &FaultSpan, ping_interval_us: u64) -> u64 {
    f.to_us + SPLIT_BRAIN_PINGS * ping_interval_us + SPLIT_BRAIN_SLACK_US
}

/// What a consumer group must show ([`check_group`]).
#[derive(Debug, Clone, Copy)]
pub struct GroupExpect<'a> {
    /// Judge only this publisher's entries.
    pub publisher: &'a str,
    /// The faults, for the windows in which an ack may be lost (split brain).
    pub faults: &'a [FaultSpan],
    /// The backup's ping interval (the split-brain window's length depends on it).
    pub ping_interval_us: u64,
    /// Times up to which an ack the consumer saw confirmed may be gone for good: the end of
    /// each outage of both nodes that may lose records they had not synced (a power loss of
    /// both under `batch` or `never`, any loss of both without a disk). The end, not the
    /// start: the consumer stamps an ack when the confirmation reaches it, and one the broker
    /// sent just before the loss can arrive after it (no node being up meanwhile, any that
    /// arrives before the nodes are back was sent before the loss).
    pub acks_lost_at: &'a [u64],
    /// Sequence numbers the topic's subscribers got more than once (duplicates the pair's
    /// at-least-once delivery allows, `check`'s bound): the log may hold such a message twice,
    /// at two offsets, and the group then has two entries of it to finish.
    pub duplicated: &'a std::collections::BTreeSet<u64>,
}

/// The consumer group's invariants over every member's rows:
///
/// 1. an entry whose ack the broker confirmed (`acked`, at `acked_at_us`) is never delivered to
///    the group again, unless the ack was confirmed inside a split-brain window (the reign
///    that confirmed it may be overwritten when the link heals) or by the end of a
///    both-nodes loss that `acks_lost_at` lists; a message the subscribers got twice
///    (`duplicated`) is two entries when it comes again at another offset. "Again" is by the
///    entry's attempt number, not only by arrival: an earlier attempt was handed out before the
///    acknowledged one was (the group's journal counts them in order), so before its ack,
///    though the network may bring it to its member after the ack;
/// 2. every entry the topic's subscribers got (`delivered`) is acknowledged by some member by
///    the end, confirmed or not (dead letters aside: none are expected where this is used).
pub fn check_group(
    rows: &[edgepair::client::Consumed],
    delivered: &std::collections::BTreeSet<u64>,
    x: &GroupExpect<'_>,
) -> Vec<String> {
    let mine: Vec<&edgepair::client::Consumed> =
        rows.iter().filter(|r| r.publisher == x.publisher).collect();
    let excused = |t: u64| {
        x.faults.iter().any(|f| {
            f.kind.excuses_split_brain()
                && f.from_us <= t
                && t <= excused_until_us(f, x.ping_interval_us)
        }) || x.acks_lost_at.iter().any(|l| *l >= t)
    };
    let mut again = Vec::new();
    for a in mine.iter().filter(|r| r.outcome == "acked") {
        if excused(a.acked_at_us) {
            continue;
        }
        if let Some(r) = mine.iter().find(|r| {
            r.seq == a.seq
                && r.received_at_us > a.acked_at_us
                && r.attempt >= a.attempt
                && (r.offset == a.offset || !x.duplicated.contains(&r.seq))
        }) {
            again.push(format!(
                "seq {} acknowledged by {} at {} µs, delivered again to {} (attempt {})",
                a.seq, a.consumer, a.acked_at_us, r.consumer, r.attempt
            ));
        }
    }
    // An ack sent and not confirmed (the node died first) may have been stored: the node that
    // serves next then never delivers the entry again, rightly. It counts as finished.
    let acked: std::collections::BTreeSet<u64> = mine
        .iter()
        .filter(|r| r.outcome == "acked" || r.outcome == "unconfirmed")
        .map(|r| r.seq)
        .collect();
    let never: Vec<u64> = delivered.difference(&acked).copied().collect();
    let mut v = Vec::new();
    if !again.is_empty() {
        v.push(format!(
            "group: {} acknowledged entr{} delivered again: {}",
            again.len(),
            if again.len() == 1 { "y" } else { "ies" },
            again.iter().take(3).cloned().collect::<Vec<_>>().join("; ")
        ));
    }
    if !never.is_empty() {
        v.push(format!(
            "group: {} delivered entr{} never acknowledged by a member: {:?}",
            never.len(),
            if never.len() == 1 { "y" } else { "ies" },
            never.iter().take(10).collect::<Vec<_>>()
        ));
    }
    v
}

/// The duplicates a run may show: `resend × (faults + 1)`.
///
/// Why: identified publishers' resends of messages a broker already holds are dropped by the
/// broker, so duplicates come only from a change of reign: messages delivered by the old reign
/// whose `CLR` had not reached the other node (replayed by it), and the publisher's window after
/// it switches (its unacknowledged messages plus the last `resend`). Each fault can cause at most
/// one such change (or one split that heals), and at the publishing rates used (10 msg/s, under
/// a second to detect a fault) what is uncleared or unacknowledged at that moment stays under the
/// resend window; the `+ 1` is the slot of the run's start and end, with no fault. Evidence:
/// the 1,000-seed reference simulation (`results/reference-sim/simulation.csv`) peaks at 2.29
/// duplicates per slot (seed 713: 16 with 6 faults), so `resend` (5) per slot leaves about twice
/// the worst case as margin and still fails a change that doubles or triples the duplicates. The
/// simulator used to allow `(resend + 20) × (faults + 1)`, ten times anything seen.
pub fn duplicate_bound(resend: u64, faults: usize) -> u64 {
    resend * (faults as u64 + 1)
}

/// What [`check`] needs besides the deliveries.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    /// Judge only this publisher's messages (`None`: every publisher). Epochs are judged over
    /// every delivery, whoever published it.
    pub publisher: Option<&'a str>,
    /// The publisher produced sequence numbers `1..=published`.
    pub published: u64,
    /// The sequence numbers the publisher had acknowledged, when known (the simulation knows it,
    /// the harness reads it from `test-publisher --acks`). Unknown: every missing message is
    /// counted as unacknowledged, and judged as lost.
    pub acked: Option<&'a BTreeSet<u64>>,
    /// The faults injected.
    pub faults: &'a [FaultSpan],
    /// The publisher's resend window (see [`duplicate_bound`]).
    pub resend: u64,
    /// The backup's ping interval, µs (see [`excused_until_us`]).
    pub ping_interval_us: u64,
}

/// Why a delivery broke the epoch rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EpochRule {
    /// Another node had already delivered in this epoch.
    TwoNodes,
    /// A higher epoch had already been delivered in.
    Stale,
}

/// A delivery that broke the epoch rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochViolation {
    /// When it arrived.
    pub received_at_us: u64,
    /// The node (connection) it came from.
    pub source: String,
    /// Its epoch.
    pub epoch: u64,
    /// Sequence number.
    pub seq: u64,
    /// The rules it broke (one or both).
    pub rules: Vec<EpochRule>,
    /// Inside a link fault's window: split brain, reported, not a violation.
    pub excused: bool,
}

/// A first delivery that came after a higher sequence number of the same publisher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderViolation {
    /// When it arrived.
    pub received_at_us: u64,
    /// The publisher.
    pub publisher: String,
    /// Its sequence number.
    pub seq: u64,
    /// The highest sequence number of that publisher first-delivered before it.
    pub after_seq: u64,
    /// The node (connection) it came from.
    pub source: String,
    /// Its epoch.
    pub epoch: u64,
    /// Inside a link fault's split-brain window ([`excused_until_us`]). Still a violation:
    /// said only to tell where it happened.
    pub during_link_fault: bool,
}

/// The verdict on a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Messages the publisher produced.
    pub published: u64,
    /// Deliveries (rows) of the judged publisher(s), duplicates included.
    pub delivered: u64,
    /// Distinct `(publisher, seq)` delivered.
    pub unique: u64,
    /// Sequence numbers in `1..=published` never delivered, ascending.
    pub missing: Vec<u64>,
    /// Acknowledged sequence numbers never delivered, ascending (empty when acks are unknown):
    /// each one a violation.
    pub acked_lost: Vec<u64>,
    /// Missing sequence numbers that were not acknowledged, ascending (all of them when acks
    /// are unknown): counted, a violation only when acks are unknown.
    pub unacked_lost: Vec<u64>,
    /// Whether the acknowledged set was known.
    pub acks_known: bool,
    /// Deliveries of a `(publisher, seq)` delivered before.
    pub duplicates: u64,
    /// The duplicates allowed ([`duplicate_bound`]).
    pub duplicate_bound: u64,
    /// First deliveries that came after a higher sequence number of the same publisher: each
    /// one a violation.
    pub reordered: u64,
    /// The same, per publisher.
    pub reordered_by_publisher: BTreeMap<String, u64>,
    /// Each of them, in arrival order.
    #[serde(default)]
    pub order_events: Vec<OrderViolation>,
    /// Deliveries that broke the epoch rule, excused or not, in arrival order.
    pub epoch_events: Vec<EpochViolation>,
    /// Of those, outside any excuse window: violations.
    pub epoch_violations: u64,
    /// Of those, inside a link fault's window: split brain.
    pub split_brain: u64,
}

impl Verdict {
    /// Every produced message was delivered at least once, and something was produced.
    pub fn all_delivered(&self) -> bool {
        self.missing.is_empty() && self.published > 0
    }

    /// Something was produced, no acknowledged message was lost (no message at all when the
    /// acknowledgements are unknown), and every publisher's first deliveries came in order: what
    /// the harness's PASS and exit status say. Epochs and duplicates are judged by
    /// [`Verdict::violations`] (the simulation) and reported by the harness.
    pub fn delivery_ok(&self) -> bool {
        self.published > 0
            && self.acked_lost.is_empty()
            && (self.acks_known || self.missing.is_empty())
            && self.reordered == 0
    }

    /// The broken invariants, in words; empty when the run is clean.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        if !self.acked_lost.is_empty() {
            v.push(format!(
                "{} acknowledged message(s) lost",
                self.acked_lost.len()
            ));
        }
        if !self.acks_known && !self.missing.is_empty() {
            v.push(format!(
                "{} produced message(s) never delivered (acknowledgements unknown)",
                self.missing.len()
            ));
        }
        if self.reordered > 0 {
            let in_link = self
                .order_events
                .iter()
                .filter(|e| e.during_link_fault)
                .count();
            v.push(if in_link > 0 {
                format!(
                    "{} out-of-order first deliveries ({in_link} during a link fault)",
                    self.reordered
                )
            } else {
                format!("{} out-of-order first deliveries", self.reordered)
            });
        }
        if self.epoch_violations > 0 {
            v.push(format!(
                "{} stale or double-epoch deliveries",
                self.epoch_violations
            ));
        }
        if self.duplicates > self.duplicate_bound {
            v.push(format!(
                "{} duplicates > bound {}",
                self.duplicates, self.duplicate_bound
            ));
        }
        if self.published == 0 {
            v.push("nothing published".into());
        }
        v
    }
}

/// Judges one run. The deliveries may come in any order; they are taken in order of arrival at
/// the subscriber (ties keep their given order).
pub fn check(deliveries: &[Delivery], x: &Expect<'_>) -> Verdict {
    let mut all: Vec<&Delivery> = deliveries.iter().collect();
    all.sort_by_key(|d| d.received_at_us);
    let judged = |d: &&&Delivery| x.publisher.is_none_or(|p| d.publisher == p);
    // Inside a link fault's split-brain window: what excuses an epoch event, and what an order
    // violation is labelled with (not excused).
    let excused = |us: u64| {
        x.faults.iter().any(|f| {
            f.kind.excuses_split_brain()
                && us >= f.from_us
                && us <= excused_until_us(f, x.ping_interval_us)
        })
    };

    // 1–3: loss, duplicates, order, over the judged publisher(s). Only first deliveries are
    // judged for order: a duplicate of an old message after newer ones is a resend, not a
    // reordering.
    let mut seen: HashSet<(&str, u64)> = HashSet::new();
    let mut highest: HashMap<&str, u64> = HashMap::new();
    let mut reordered_by_publisher: BTreeMap<String, u64> = BTreeMap::new();
    let mut order_events = Vec::new();
    let mut delivered_seqs: BTreeSet<u64> = BTreeSet::new();
    let (mut delivered, mut duplicates) = (0u64, 0u64);
    for d in all.iter().filter(judged) {
        delivered += 1;
        if !seen.insert((d.publisher.as_str(), d.seq)) {
            duplicates += 1;
            continue;
        }
        delivered_seqs.insert(d.seq);
        let h = highest.entry(d.publisher.as_str()).or_insert(0);
        if d.seq < *h {
            *reordered_by_publisher
                .entry(d.publisher.clone())
                .or_insert(0) += 1;
            order_events.push(OrderViolation {
                received_at_us: d.received_at_us,
                publisher: d.publisher.clone(),
                seq: d.seq,
                after_seq: *h,
                source: d.source.clone(),
                epoch: d.epoch,
                during_link_fault: excused(d.received_at_us),
            });
        }
        *h = (*h).max(d.seq);
    }
    let missing: Vec<u64> = (1..=x.published)
        .filter(|s| !delivered_seqs.contains(s))
        .collect();
    let acked_lost: Vec<u64> = x
        .acked
        .map(|a| {
            a.iter()
                .copied()
                .filter(|s| !delivered_seqs.contains(s))
                .collect()
        })
        .unwrap_or_default();
    let unacked_lost: Vec<u64> = missing
        .iter()
        .copied()
        .filter(|s| x.acked.is_none_or(|a| !a.contains(s)))
        .collect();

    // 4: epochs, over every live delivery (a replay sends the log's past, stamped with the
    // epochs that wrote it, from either node).
    let mut epoch_node: HashMap<u64, &str> = HashMap::new();
    let mut newest = 0u64;
    let mut epoch_events = Vec::new();
    for d in all.iter().filter(|d| !d.replayed()) {
        let mut rules = Vec::new();
        match epoch_node.get(&d.epoch) {
            Some(n) if *n != d.source.as_str() => rules.push(EpochRule::TwoNodes),
            Some(_) => {}
            None => {
                epoch_node.insert(d.epoch, d.source.as_str());
            }
        }
        if d.epoch < newest {
            rules.push(EpochRule::Stale);
        }
        newest = newest.max(d.epoch);
        if !rules.is_empty() {
            epoch_events.push(EpochViolation {
                received_at_us: d.received_at_us,
                source: d.source.clone(),
                epoch: d.epoch,
                seq: d.seq,
                rules,
                excused: excused(d.received_at_us),
            });
        }
    }
    let split_brain = epoch_events.iter().filter(|e| e.excused).count() as u64;

    Verdict {
        published: x.published,
        delivered,
        unique: seen.len() as u64,
        missing,
        acked_lost,
        unacked_lost,
        acks_known: x.acked.is_some(),
        duplicates,
        duplicate_bound: duplicate_bound(x.resend, x.faults.len()),
        reordered: reordered_by_publisher.values().sum(),
        reordered_by_publisher,
        order_events,
        epoch_violations: epoch_events.len() as u64 - split_brain,
        split_brain,
        epoch_events,
    }
}

#[cfg(test)]
mod tests;
