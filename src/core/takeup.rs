//! Taking a log's undelivered entries up again, a chunk at a time: at a start (what an earlier
//! life did not deliver) and at a takeover (what the backup held).
//!
//! Each topic with undelivered entries gets a [`Backlog`]: the offsets `next..end` still in the
//! log and not yet in flight. [`TAKE_UP_CHUNK`] of them are put in flight at once (each with a
//! new `mid`, replicated to a linked backup like any message in flight); when no more than half
//! a chunk of them is left undelivered, the next chunk is read, once every subscriber of the
//! topic has written out what it was sent ([`Output::Writable`]), so a node with a million
//! undelivered entries answers at once and reads its log as deliveries go, and a subscriber is
//! never sent more than about a chunk and a half ahead of what it read. A subscriber that has
//! not written out its chunk within [`TAKE_UP_WAIT`] holds the others up no longer: the next
//! chunk goes anyway (and one that keeps not reading ends up disconnected by the caller's bound
//! on its queue, as any slow subscriber).
//!
//! A publish on a topic whose backlog is not taken up yet is logged, replicated and acknowledged
//! as usual, and is in flight, but is *parked*: it enters the compute stage only after the last
//! chunk, so the topic is still delivered in offset order. The next chunk goes through a timer
//! due at once rather than from inside a delivery, so a long backlog never nests calls and the
//! caller serves its other connections between chunks.

use foldhash::HashMap;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use tracing::{error, warn};

use super::time::{Time, Timer};
use super::{Broker, ConnId, Message, Output, RoleState};

/// Undelivered entries of one topic put in flight at a time.
pub const TAKE_UP_CHUNK: usize = 2048;

/// The next chunk is read once no more than this many of a topic's taken-up entries are left
/// undelivered.
const TAKE_UP_LOW: usize = TAKE_UP_CHUNK / 2;

/// How long the next chunk waits for the topic's subscribers to write out the last one.
pub const TAKE_UP_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The undelivered entries of one topic not yet put in flight.
#[derive(Debug, Default)]
pub(super) struct Backlog {
    /// The next offset to take up.
    next: u64,
    /// Where the backlog ends: the end of the topic's log when it began. Entries from here on
    /// were accepted since, and are `parked`.
    end: u64,
    /// Offsets in `next..end` delivered already (cleared out of order while a backup): skipped.
    skip: BTreeSet<u64>,
    /// Taken up and not yet delivered.
    out: usize,
    /// Accepted on the topic while the backlog lasts: in flight, delivered after it.
    parked: VecDeque<Arc<Message>>,
    /// Subscribers asked to say when they have written out what they were sent.
    awaiting: BTreeSet<ConnId>,
    /// When they were asked.
    asked_at: Time,
    /// Every subscriber asked has answered: the next chunk may go.
    ready: bool,
}

impl Backlog {
    /// Entries still to take up.
    fn left(&self) -> u64 {
        let skipped = self.skip.range(self.next..self.end).count() as u64;
        (self.end - self.next).saturating_sub(skipped)
    }
}

/// The backlogs of a primary, by topic.
pub(super) type Backlogs = BTreeMap<String, Backlog>;

/// Messages not in flight yet that a primary still has to deliver.
pub(super) fn untaken(backlogs: &Backlogs) -> u64 {
    backlogs.values().map(Backlog::left).sum()
}

impl Broker {
    fn backlogs(&mut self) -> Option<&mut Backlogs> {
        match &mut self.role {
            RoleState::Primary(p) => Some(&mut p.backlogs),
            RoleState::Backup(_) => None,
        }
    }

    /// A new primary (a start, a takeover) begins taking up the undelivered entries of every
    /// topic: the first chunk of each now, the rest as deliveries go. `cleared`: offsets above
    /// a topic's delivered mark already delivered. Returns how many entries there are.
    pub(super) fn begin_take_up(&mut self, mut cleared: HashMap<String, BTreeSet<u64>>) -> u64 {
        let mut total = 0;
        let mut topics = Vec::new();
        for t in self.log.topics() {
            let from = t.delivered.max(t.first);
            if from >= t.next {
                continue;
            }
            let mut skip = cleared.remove(&t.topic).unwrap_or_default();
            skip.retain(|o| (from..t.next).contains(o));
            let bl = Backlog {
                next: from,
                end: t.next,
                skip,
                ..Backlog::default()
            };
            total += bl.left();
            if let Some(b) = self.backlogs() {
                b.insert(t.topic.clone(), bl);
                topics.push(t.topic);
            }
        }
        for topic in topics {
            self.take_up_chunk(&topic);
        }
        total
    }

    /// Puts the next chunk of `topic`'s backlog in flight; after the last one, the messages
    /// parked behind it.
    fn take_up_chunk(&mut self, topic: &str) {
        // The mids below are counted from the next one: none may be taken meanwhile.
        self.journal_flush();
        let Some(bl) = self.backlogs().and_then(|b| b.get_mut(topic)) else {
            return;
        };
        bl.ready = false;
        let (next, end) = (bl.next, bl.end);
        let want = (end - next).min(TAKE_UP_CHUNK as u64) as usize;
        let entries = match self.log.read(topic, next, want) {
            Ok(e) => e,
            Err(e) => {
                error!("topic '{topic}': cannot read undelivered entries from offset {next}: {e}; skipping them");
                Vec::new()
            }
        };
        let read_to = entries
            .last()
            .map_or(end, |e| e.offset + 1)
            .clamp(next, end);
        let Some(bl) = self.backlogs().and_then(|b| b.get_mut(topic)) else {
            return;
        };
        let taken: Vec<_> = entries
            .into_iter()
            .filter(|e| e.offset < read_to && !bl.skip.contains(&e.offset))
            .collect();
        bl.next = read_to;
        bl.skip = bl.skip.split_off(&read_to);
        bl.out += taken.len();
        let parked = if read_to >= end {
            self.backlogs()
                .and_then(|b| b.remove(topic))
                .map(|bl| bl.parked)
                .unwrap_or_default()
        } else {
            VecDeque::new()
        };
        // The entries are on the disk already: if all before them was written (synced), so
        // are they. Said before they go in flight, as a relay delivers each at once.
        let last = self.next_mid - 1;
        let taken_last = last + taken.len() as u64;
        if self.written_mid == last {
            self.written_mid = taken_last;
        }
        if self.synced_mid == last {
            self.synced_mid = taken_last;
        }
        for entry in taken {
            let mid = self.next_mid;
            self.next_mid += 1;
            let msg = Arc::new(Message {
                mid,
                topic: topic.to_string(),
                entry: Arc::unwrap_or_clone(entry),
                quiet: false,
            });
            self.replicate(&msg);
            self.enqueue(msg, false);
        }
        for m in parked {
            self.enqueue(m, false);
        }
    }

    /// Whether `topic` has a backlog not all taken up, which a fresh message waits behind.
    pub(super) fn backlogged(&self, topic: &str) -> bool {
        matches!(&self.role, RoleState::Primary(p) if p.backlogs.contains_key(topic))
    }

    /// A fresh message on a topic whose backlog is not all taken up waits behind it; true if
    /// it was parked (it is in flight, and enters the compute stage after the backlog).
    pub(super) fn park(&mut self, msg: &Arc<Message>) -> bool {
        let RoleState::Primary(p) = &mut self.role else {
            return false;
        };
        let Some(bl) = p.backlogs.get_mut(&msg.topic) else {
            return false;
        };
        bl.parked.push_back(msg.clone());
        p.inflight.insert(msg.mid, msg.clone());
        true
    }

    /// Drops the parked messages whose `mid` is past `written` (their write failed: they are
    /// refused, and must not be delivered either).
    pub(super) fn unpark_unwritten(&mut self, written: u64) {
        let RoleState::Primary(p) = &mut self.role else {
            return;
        };
        for bl in p.backlogs.values_mut() {
            for m in bl.parked.iter().filter(|m| m.mid > written) {
                p.inflight.remove(m.mid);
            }
            bl.parked.retain(|m| m.mid <= written);
        }
    }

    /// A taken-up message of `topic` was delivered: when few are left, the next chunk is due.
    pub(super) fn taken_delivered(&mut self, topic: &str) {
        let now = self.now.mono;
        let Some(bl) = self.backlogs().and_then(|b| b.get_mut(topic)) else {
            return;
        };
        bl.out = bl.out.saturating_sub(1);
        if bl.out <= TAKE_UP_LOW && bl.awaiting.is_empty() {
            self.arm_take_up(now);
        }
    }

    /// Arms [`Timer::TakeUp`] at `at`, unless it is due earlier already.
    fn arm_take_up(&mut self, at: Time) {
        if self.timers.due(Timer::TakeUp).is_none_or(|t| t > at) {
            self.timers.set(Timer::TakeUp, at);
        }
    }

    /// [`Timer::TakeUp`]: every backlog with few entries left in flight takes up its next
    /// chunk, or first asks its subscribers to say when they have written out what they got
    /// (and goes on without those that have not within [`TAKE_UP_WAIT`]).
    pub(super) fn on_take_up_timer(&mut self) {
        let now = self.now.mono;
        let due: Vec<(String, bool)> = match &mut self.role {
            RoleState::Primary(p) => p
                .backlogs
                .iter_mut()
                .filter(|(_, b)| b.out <= TAKE_UP_LOW)
                .filter_map(|(t, b)| {
                    if b.awaiting.is_empty() {
                        return Some((t.clone(), b.ready));
                    }
                    if now < b.asked_at + TAKE_UP_WAIT {
                        return None;
                    }
                    warn!(
                        "topic '{t}': subscriber(s) {:?} did not write out the last {TAKE_UP_CHUNK} entries from the log within {TAKE_UP_WAIT:?}; going on without them",
                        b.awaiting
                    );
                    b.awaiting.clear();
                    Some((t.clone(), true))
                })
                .collect(),
            RoleState::Backup(_) => return,
        };
        for (topic, ready) in due {
            let subs: BTreeSet<ConnId> = self
                .topics
                .get(&topic)
                .map(|subs| {
                    subs.iter()
                        .filter(|s| !s.replaying)
                        .map(|s| s.conn)
                        .collect()
                })
                .unwrap_or_default();
            if ready || subs.is_empty() {
                self.take_up_chunk(&topic);
                continue;
            }
            for &conn in &subs {
                self.out.push_back(Output::Writable { conn });
            }
            if let Some(bl) = self.backlogs().and_then(|b| b.get_mut(&topic)) {
                bl.awaiting = subs;
                bl.asked_at = now;
            }
        }
        // The timer again when the first of the waits still going runs out.
        let waits: Vec<Time> = self
            .backlogs()
            .map(|b| {
                b.values()
                    .filter(|b| !b.awaiting.is_empty())
                    .map(|b| b.asked_at + TAKE_UP_WAIT)
                    .collect()
            })
            .unwrap_or_default();
        if let Some(at) = waits.into_iter().min() {
            self.arm_take_up(at);
        }
    }

    /// `conn` wrote out what it was sent, or is gone: a backlog waiting for it may go on.
    pub(super) fn take_up_answered(&mut self, conn: ConnId) {
        let now = self.now.mono;
        let Some(backlogs) = self.backlogs() else {
            return;
        };
        let mut go = false;
        for bl in backlogs.values_mut() {
            if bl.awaiting.remove(&conn) && bl.awaiting.is_empty() {
                bl.ready = true;
                go = true;
            }
        }
        if go {
            self.arm_take_up(now);
        }
    }

    /// A primary stepping down: the entries of its backlogs, which it hands to the new primary
    /// with what it had in flight.
    pub(super) fn untaken_entries(&self, backlogs: &Backlogs) -> Vec<Arc<Message>> {
        let mut out = Vec::new();
        for (topic, bl) in backlogs {
            let want = (bl.end - bl.next) as usize;
            match self.log.read(topic, bl.next, want) {
                Ok(entries) => out.extend(
                    entries
                        .into_iter()
                        .filter(|e| e.offset < bl.end && !bl.skip.contains(&e.offset))
                        .map(|entry| {
                            Arc::new(Message {
                                mid: 0,
                                topic: topic.clone(),
                                entry: Arc::unwrap_or_clone(entry),
                                quiet: false,
                            })
                        }),
                ),
                Err(e) => error!("topic '{topic}': cannot read undelivered entries: {e}"),
            }
        }
        out
    }
}
