//! Consumer groups: named readers of a topic that share its entries among their members, each
//! entry leased to one member until it acknowledges it (see BACKUP_SYSTEM.md, *Consumer
//! groups*).
//!
//! # The state is data
//!
//! What must outlive a node (a group's settings, which entries were delivered how often, and
//! which are done: acknowledged or dead-lettered) is written as records to a log topic of the
//! node's own, [`JOURNAL`], through the same path as a published entry: appended under the
//! `--fsync` policy, replicated to the backup with `REPL` (so `STORED`, the catch-up of a
//! backup that was away, and a backup's divergent tail all work as for any topic), read back at
//! a start. Both nodes apply each record to their [`Groups`] as they log it, so a backup that
//! takes over already knows every group. A member's `ack` is answered once its record is as
//! safe as a publish is before its `ACK`: nothing a member was told is acknowledged is ever
//! delivered to the group again, on either node.
//!
//! What lives only on the serving node: the members (connections) and the deadlines of their
//! leases. After a failover the members join the new primary, and every entry that was leased
//! and not done is delivered again, as a counted redelivery.
//!
//! # Which entries a group sees
//!
//! An entry is dispatched to a group once the primary has delivered it to the topic's
//! subscribers (its delivered mark passed it): stored on both nodes and through the compute
//! stage, in offset order.

use foldhash::{HashMap, HashMapExt};
use std::collections::{BTreeMap, BTreeSet};

use tracing::{info, warn};

use super::conn::Reply;
use super::primary::PendingAck;
use super::time::{Time, Timer};
use super::{Broker, ConnId, Message};
use crate::log::{Entry, LogError};
use crate::protocol::{Frame, GroupInfo, GroupOp, GroupOptions, GroupStart, MsgId, Role};

/// The log topic holding every group's records. Topics starting with `$` are the node's own:
/// clients may read them, not publish to them.
pub const JOURNAL: &str = "$groups";

/// Journal entries after which a primary writes a snapshot of the groups and removes the
/// journal before it (`Config::journal_compact`): a record per delivery and per ack would
/// otherwise grow it without end.
pub const JOURNAL_COMPACT: u64 = 100_000;

/// Entries read from the log per step of a dispatch.
const READ_CHUNK: usize = 256;

/// Every group of every topic, as this node knows them.
#[derive(Debug, Default)]
pub(super) struct Groups {
    by_topic: BTreeMap<String, BTreeMap<String, Group>>,
    /// A primary that may lack records of a reign it did not see (it started again as
    /// primary, and its backup may have served meanwhile) hands out nothing until its backup
    /// has sent them (`GROUP|merged`), or the link fails and it serves alone.
    pub hold: bool,
    /// Backup: journal records cut during a catch-up, to send back at the journal's `MARK`.
    pub to_merge: Vec<String>,
    /// Records applied and not yet in the log: they go in as one journal entry when the
    /// batch closes ([`Broker::journal_flush`]).
    batch: Vec<String>,
    /// The batch's `mid` (taken when it opened), and whether what depends on it must wait
    /// for it (the link was up, or the log is on a disk).
    batch_mid: Option<(u64, bool)>,
    /// Where the last snapshot of the groups went in the journal.
    snapshot_at: u64,
    /// A snapshot written and not yet stored by the backup: its `mid` and offset. The journal
    /// before it goes once the backup has it.
    compacting: Option<(u64, u64)>,
    /// Members of groups the journal no longer made when it was read again (it was cut, or
    /// started again from the primary's snapshot): they join the group when a record makes it.
    orphans: Vec<(String, String, Vec<Member>)>,
}

impl Groups {
    fn get_mut(&mut self, topic: &str, group: &str) -> Option<&mut Group> {
        self.by_topic.get_mut(topic)?.get_mut(group)
    }

    /// Group `group` of `topic`, made from `options` and `start` if it is not there yet, with
    /// the members that waited for it to be made again (see `orphans`).
    fn make(&mut self, topic: &str, group: &str, options: GroupOptions, start: u64) -> &mut Group {
        let mut members = Vec::new();
        self.orphans.retain_mut(|(t, g, ms)| {
            let mine = t == topic && g == group;
            if mine {
                members.append(ms);
            }
            !mine
        });
        let g = self
            .by_topic
            .entry(topic.to_string())
            .or_default()
            .entry(group.to_string())
            .or_insert_with(|| Group::new(options, start));
        g.members.extend(members);
        g
    }

    /// Whether `topic` has any group (checked on every delivery: cheap).
    pub fn on_topic(&self, topic: &str) -> bool {
        self.by_topic.contains_key(topic)
    }
}

/// One group.
#[derive(Debug)]
struct Group {
    options: GroupOptions,
    /// Every entry below this offset is done (acknowledged or dead-lettered).
    floor: u64,
    /// Done entries at or above the floor.
    done: BTreeSet<u64>,
    /// The next offset never dispatched to this group.
    next: u64,
    /// Deliveries so far of each entry dispatched and not done.
    attempts: HashMap<u64, u32>,
    /// Why an entry came back (for a dead letter's reason).
    why: HashMap<u64, &'static str>,
    /// Who had an entry that came back: it goes to another member if one has room.
    had: HashMap<u64, ConnId>,
    /// Entries leased to a member now (serving node only).
    leases: BTreeMap<u64, Lease>,
    /// Entries to deliver again, as soon as a member has room.
    ready: BTreeSet<u64>,
    /// Entries given back with a delay, and when they may go again.
    delayed: BTreeMap<u64, Time>,
    /// Members connected to this node, in joining order (round-robin).
    members: Vec<Member>,
    /// Where the round-robin goes on from.
    turn: usize,
    redelivered: u64,
    dead: u64,
}

#[derive(Debug)]
struct Lease {
    conn: ConnId,
    deadline: Time,
    /// The entry's identity (what its ack record names).
    id: MsgId,
}

#[derive(Debug)]
struct Member {
    name: String,
    conn: ConnId,
    /// Entries it holds.
    held: u32,
}

impl Group {
    fn new(options: GroupOptions, start: u64) -> Group {
        Group {
            options,
            floor: start,
            done: BTreeSet::new(),
            next: start,
            attempts: HashMap::new(),
            why: HashMap::new(),
            had: HashMap::new(),
            leases: BTreeMap::new(),
            ready: BTreeSet::new(),
            delayed: BTreeMap::new(),
            members: Vec::new(),
            turn: 0,
            redelivered: 0,
            dead: 0,
        }
    }

    fn is_done(&self, offset: u64) -> bool {
        offset < self.floor || self.done.contains(&offset)
    }

    /// Marks an entry done; false if it already was.
    fn finish(&mut self, offset: u64) -> bool {
        if self.is_done(offset) {
            return false;
        }
        self.done.insert(offset);
        while self.done.remove(&self.floor) {
            self.floor += 1;
        }
        self.attempts.remove(&offset);
        self.why.remove(&offset);
        self.had.remove(&offset);
        self.ready.remove(&offset);
        self.delayed.remove(&offset);
        if let Some(l) = self.leases.remove(&offset) {
            if let Some(m) = self.members.iter_mut().find(|m| m.conn == l.conn) {
                m.held = m.held.saturating_sub(1);
            }
        }
        true
    }

    /// Takes the lease of `offset` back (it goes to a member again), saying why.
    fn give_back(&mut self, offset: u64, why: &'static str) {
        if let Some(l) = self.leases.remove(&offset) {
            self.had.insert(offset, l.conn);
            if let Some(m) = self.members.iter_mut().find(|m| m.conn == l.conn) {
                m.held = m.held.saturating_sub(1);
            }
        }
        if !self.is_done(offset) {
            self.why.insert(offset, why);
            self.ready.insert(offset);
        }
    }

    /// Ends `conn`'s membership, if it has one: what it held goes to others. True if it had.
    fn drop_member(&mut self, conn: ConnId, why: &'static str) -> bool {
        let before = self.members.len();
        self.members.retain(|m| m.conn != conn);
        let held: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.conn == conn)
            .map(|(o, _)| *o)
            .collect();
        for o in held {
            self.give_back(o, why);
        }
        self.members.len() < before
    }

    /// Whether member `i` may take an entry that `avoid` had before: it has room, and it is
    /// another member, unless it is the only one. An entry whose lease ran out (a member too
    /// slow for `ack_wait`) waits for another member rather than going back to the same one,
    /// which would only run out again (a chaos run here: one entry delivered 5 times to its
    /// slow member and dead-lettered while two fast ones were busy for a moment).
    fn may_take(&self, i: usize, avoid: Option<ConnId>) -> bool {
        let m = &self.members[i];
        m.held < self.options.max_in_flight && (Some(m.conn) != avoid || self.members.len() == 1)
    }

    /// The next member that may take an entry `avoid` had before ([`Group::may_take`]),
    /// round-robin.
    fn next_member(&mut self, avoid: Option<ConnId>) -> Option<usize> {
        let n = self.members.len();
        let i = (0..n)
            .map(|k| (self.turn + k) % n)
            .find(|i| self.may_take(*i, avoid))?;
        self.turn = (i + 1) % n;
        Some(i)
    }

    /// The first entry given back that can go now: done (to drop), out of deliveries (to
    /// dead-letter), or wanted by a member that may take it. Entries waiting for another
    /// member than the one that had them do not hold up the rest.
    fn next_ready(&self) -> Option<u64> {
        self.ready.iter().copied().find(|o| {
            self.is_done(*o)
                || self.attempts.get(o).copied().unwrap_or(0) >= self.options.max_deliver
                || (0..self.members.len()).any(|i| self.may_take(i, self.had.get(o).copied()))
        })
    }

    fn info(&self, end: u64) -> GroupInfo {
        let done_above = self.done.len() as u64;
        GroupInfo {
            floor: self.floor,
            end,
            pending: self.leases.len() as u64,
            lag: end.saturating_sub(self.floor).saturating_sub(done_above),
            redelivered: self.redelivered,
            dead: self.dead,
            members: self.members.iter().map(|m| m.name.clone()).collect(),
        }
    }
}

/// One record of the journal (the payload of a [`JOURNAL`] entry). Records about an entry
/// carry its identity as well as its offset: a record handed over from a reign whose log went
/// apart from ours (`GROUP|merge`) is taken only where our entry at that offset is the same.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Record {
    /// `create|TOPIC|GROUP|START|OPTIONS`.
    Create {
        topic: String,
        group: String,
        start: u64,
        options: GroupOptions,
    },
    /// `deliver|TOPIC|GROUP|OFFSET|PUBLISHER|SEQ|ATTEMPT|CONSUMER`.
    Deliver {
        topic: String,
        group: String,
        offset: u64,
        id: MsgId,
        attempt: u32,
        consumer: String,
    },
    /// `ack|TOPIC|GROUP|OFFSET|PUBLISHER|SEQ`.
    Ack {
        topic: String,
        group: String,
        offset: u64,
        id: MsgId,
    },
    /// `dead|TOPIC|GROUP|OFFSET|PUBLISHER|SEQ|REASON`.
    Dead {
        topic: String,
        group: String,
        offset: u64,
        id: MsgId,
        reason: String,
    },
    /// `state|TOPIC|GROUP|FLOOR|NEXT|REDELIVERED|DEAD|OPTIONS|DONE,…|OFFSET:ATTEMPT,…`: the
    /// whole of a group, as a snapshot of the journal writes it (see
    /// [`Broker::compact_journal`]); it replaces what the records before it made.
    State {
        topic: String,
        group: String,
        floor: u64,
        next: u64,
        redelivered: u64,
        dead: u64,
        options: GroupOptions,
        /// Done entries at or above the floor.
        done: Vec<u64>,
        /// Deliveries so far of each entry dispatched and not done.
        tries: Vec<(u64, u32)>,
    },
}

impl Record {
    fn encode(&self) -> String {
        match self {
            Record::Create {
                topic,
                group,
                start,
                options,
            } => format!("create|{topic}|{group}|{start}|{options}"),
            Record::Deliver {
                topic,
                group,
                offset,
                id,
                attempt,
                consumer,
            } => format!(
                "deliver|{topic}|{group}|{offset}|{}|{}|{attempt}|{consumer}",
                id.publisher, id.seq
            ),
            Record::Ack {
                topic,
                group,
                offset,
                id,
            } => format!("ack|{topic}|{group}|{offset}|{}|{}", id.publisher, id.seq),
            Record::Dead {
                topic,
                group,
                offset,
                id,
                reason,
            } => format!(
                "dead|{topic}|{group}|{offset}|{}|{}|{reason}",
                id.publisher, id.seq
            ),
            Record::State {
                topic,
                group,
                floor,
                next,
                redelivered,
                dead,
                options,
                done,
                tries,
            } => {
                let done: Vec<String> = done.iter().map(u64::to_string).collect();
                let tries: Vec<String> = tries.iter().map(|(o, a)| format!("{o}:{a}")).collect();
                format!(
                    "state|{topic}|{group}|{floor}|{next}|{redelivered}|{dead}|{options}|{}|{}",
                    done.join(","),
                    tries.join(",")
                )
            }
        }
    }

    /// Reads a record back; `None` for one this version does not know (skipped, said).
    fn decode(s: &str) -> Option<Record> {
        if s.starts_with("state|") {
            return Record::decode_state(s);
        }
        let f: Vec<&str> = s.splitn(8, '|').collect();
        let (topic, group) = (f.get(1)?.to_string(), f.get(2)?.to_string());
        let num = |i: usize| f.get(i)?.parse::<u64>().ok();
        let id = || {
            Some(MsgId {
                publisher: MsgId::publisher_of(f.get(4)?),
                seq: num(5)?,
            })
        };
        Some(match *f.first()? {
            "create" => Record::Create {
                topic,
                group,
                start: num(3)?,
                // The options as `GROUP|create` writes them.
                options: GroupOptions::parse(f.get(4)?).ok()?,
            },
            "deliver" => Record::Deliver {
                topic,
                group,
                offset: num(3)?,
                id: id()?,
                attempt: num(6)?.min(u32::MAX as u64) as u32,
                consumer: f.get(7)?.to_string(),
            },
            "ack" if f.len() == 6 => Record::Ack {
                topic,
                group,
                offset: num(3)?,
                id: id()?,
            },
            "dead" => {
                let rest: Vec<&str> = s.splitn(7, '|').collect();
                Record::Dead {
                    topic,
                    group,
                    offset: num(3)?,
                    id: id()?,
                    reason: rest.get(6)?.to_string(),
                }
            }
            _ => return None,
        })
    }

    fn decode_state(s: &str) -> Option<Record> {
        let f: Vec<&str> = s.split('|').collect();
        if f.len() != 10 {
            return None;
        }
        let num = |i: usize| f.get(i)?.parse::<u64>().ok();
        let list = |i: usize| f.get(i).map(|l| l.split(',').filter(|x| !x.is_empty()));
        let done = list(8)?
            .map(|o| o.parse().ok())
            .collect::<Option<Vec<u64>>>()?;
        let tries = list(9)?
            .map(|t| {
                let (o, a) = t.split_once(':')?;
                Some((o.parse().ok()?, a.parse().ok()?))
            })
            .collect::<Option<Vec<(u64, u32)>>>()?;
        Some(Record::State {
            topic: f[1].to_string(),
            group: f[2].to_string(),
            floor: num(3)?,
            next: num(4)?,
            redelivered: num(5)?,
            dead: num(6)?,
            options: GroupOptions::parse(f[7]).ok()?,
            done,
            tries,
        })
    }

    /// The topic whose groups' floors a record may move (a new group, an entry done).
    fn floor_topic(&self) -> Option<&str> {
        match self {
            Record::Create { topic, .. }
            | Record::Ack { topic, .. }
            | Record::Dead { topic, .. }
            | Record::State { topic, .. } => Some(topic),
            Record::Deliver { .. } => None,
        }
    }

    /// The entry a record is about, if it is about one: (topic, offset, identity).
    fn entry(&self) -> Option<(&str, u64, &MsgId)> {
        match self {
            Record::Create { .. } | Record::State { .. } => None,
            Record::Deliver {
                topic, offset, id, ..
            }
            | Record::Ack {
                topic, offset, id, ..
            }
            | Record::Dead {
                topic, offset, id, ..
            } => Some((topic, *offset, id)),
        }
    }
}

fn err(reason: String) -> Frame {
    Frame::Err { reason }
}

impl Broker {
    /// A `GROUP|…` frame from a client.
    pub(super) fn on_group(&mut self, conn: ConnId, op: GroupOp) {
        match op {
            GroupOp::Create {
                topic,
                group,
                start,
                options,
            } => self.group_create(conn, topic, group, start, options),
            GroupOp::Join {
                topic,
                group,
                consumer,
            } => self.group_join(conn, &topic, &group, consumer),
            GroupOp::Leave { topic, group } => {
                let Some(g) = self.groups.get_mut(&topic, &group) else {
                    return self.reply(conn, no_group(&topic, &group));
                };
                if g.drop_member(conn, "its consumer left") {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.groups.retain(|(t, n)| !(t == &topic && n == &group));
                    }
                }
                self.reply(
                    conn,
                    Frame::Group(GroupOp::Left {
                        topic: topic.clone(),
                        group,
                    }),
                );
                self.pump_topic(&topic);
            }
            GroupOp::Ack {
                topic,
                group,
                offset,
            } => self.group_ack(conn, topic, group, offset),
            GroupOp::Nack {
                topic,
                group,
                offset,
                delay_ms,
            } => self.group_nack(conn, topic, group, offset, delay_ms),
            GroupOp::List { topic } => self.group_list(conn, topic.as_deref()),
            GroupOp::Requeue {
                topic,
                id,
                sent_us,
                payload,
            } => {
                let f = Frame::Pub {
                    topic,
                    id,
                    sent_us,
                    payload,
                };
                match self.role() {
                    Role::Primary => self.accept_publish_as(conn, f, true),
                    // Handed over to a node that is not primary (any more): the sender tries
                    // again, as for a hand-over of `PUB`s.
                    Role::Backup => {
                        self.reply(conn, err("not primary; hand it to the other broker".into()))
                    }
                }
            }
            other => {
                let reason = format!("unexpected GROUP|{} from a client", verb_of(&other));
                self.reply(conn, err(reason));
            }
        }
    }

    fn group_create(
        &mut self,
        conn: ConnId,
        topic: String,
        group: String,
        start: GroupStart,
        options: GroupOptions,
    ) {
        if let Some(g) = self.groups.get_mut(&topic, &group) {
            let answer = if g.options == options {
                Frame::Group(GroupOp::Created { topic, group })
            } else {
                err(format!(
                    "group '{group}' on '{topic}' exists with other settings ({})",
                    g.options
                ))
            };
            return self.reply(conn, answer);
        }
        if self.role() != Role::Primary {
            return self.reply(
                conn,
                err("groups are made on the primary; this node is the backup".into()),
            );
        }
        let st = self.log.topic(&topic);
        let first = st.first;
        let start = match start {
            GroupStart::First => first,
            GroupStart::New => self.log.next_offset(&topic),
            GroupStart::Offset(o) if o < first => {
                return self.reply(
                    conn,
                    err(format!(
                        "offset {o} is before the oldest kept entry {first}"
                    )),
                )
            }
            GroupStart::Offset(o) => o,
            GroupStart::Time(t) => {
                self.resolve_start(conn, &topic, crate::protocol::Start::Time(t))
            }
        };
        info!("group '{group}' on '{topic}' made, from offset {start} ({options})");
        let answer = Frame::Group(GroupOp::Created {
            topic: topic.clone(),
            group: group.clone(),
        });
        let rec = Record::Create {
            topic: topic.clone(),
            group,
            start,
            options,
        };
        self.journal_then_reply(conn, rec, answer);
        self.pump_topic(&topic);
    }

    fn group_join(&mut self, conn: ConnId, topic: &str, group: &str, consumer: String) {
        let Some(g) = self.groups.get_mut(topic, group) else {
            return self.reply(conn, no_group(topic, group));
        };
        if let Some(m) = g.members.iter().find(|m| m.name == consumer) {
            if m.conn != conn {
                return self.reply(
                    conn,
                    err(format!(
                        "consumer '{consumer}' is already a member of '{group}' on another connection"
                    )),
                );
            }
        } else if g.members.iter().any(|m| m.conn == conn) {
            return self.reply(
                conn,
                err(format!("this connection is already a member of '{group}'")),
            );
        } else {
            g.members.push(Member {
                name: consumer.clone(),
                conn,
                held: 0,
            });
            if let Some(c) = self.conns.get_mut(&conn) {
                c.groups.push((topic.to_string(), group.to_string()));
            }
        }
        self.reply(
            conn,
            Frame::Group(GroupOp::Joined {
                topic: topic.to_string(),
                group: group.to_string(),
                consumer,
            }),
        );
        self.pump_topic(topic);
    }

    fn group_ack(&mut self, conn: ConnId, topic: String, group: String, offset: u64) {
        if let Some(reason) = self.check_lease(conn, &topic, &group, offset, "ack") {
            return self.reply(conn, err(reason));
        }
        let answer = Frame::Group(GroupOp::Acked {
            topic: topic.clone(),
            group: group.clone(),
            offset,
        });
        let id = self
            .groups
            .get_mut(&topic, &group)
            .and_then(|g| g.leases.get(&offset))
            .map(|l| l.id.clone())
            .unwrap_or_else(MsgId::anonymous);
        let rec = Record::Ack {
            topic: topic.clone(),
            group,
            offset,
            id,
        };
        self.journal_then_reply(conn, rec, answer);
        self.pump_topic(&topic);
    }

    fn group_nack(&mut self, conn: ConnId, topic: String, group: String, offset: u64, delay: u64) {
        if let Some(reason) = self.check_lease(conn, &topic, &group, offset, "nack") {
            return self.reply(conn, err(reason));
        }
        let until = self.now.mono + std::time::Duration::from_millis(delay);
        if let Some(g) = self.groups.get_mut(&topic, &group) {
            g.give_back(offset, "nacked");
            if delay > 0 {
                g.ready.remove(&offset);
                g.delayed.insert(offset, until);
            }
        }
        if delay > 0 {
            self.arm_ack_wait_by(until);
        }
        self.reply(
            conn,
            Frame::Group(GroupOp::Nacked {
                topic: topic.clone(),
                group,
                offset,
            }),
        );
        self.pump_topic(&topic);
    }

    /// Why `conn` may not ack (or nack) `offset`, if it may not.
    fn check_lease(
        &mut self,
        conn: ConnId,
        topic: &str,
        group: &str,
        offset: u64,
        what: &str,
    ) -> Option<String> {
        if self.role() != Role::Primary {
            return Some(format!(
                "this node is the backup: {what} on the primary that delivered the entry"
            ));
        }
        let Some(g) = self.groups.get_mut(topic, group) else {
            return Some(no_group_reason(topic, group));
        };
        if g.is_done(offset) {
            return Some(format!("offset {offset} of '{group}' is already done"));
        }
        match g.leases.get(&offset) {
            Some(l) if l.conn == conn => None,
            Some(l) => {
                let owner = g
                    .members
                    .iter()
                    .find(|m| m.conn == l.conn)
                    .map_or("another member", |m| m.name.as_str());
                Some(format!("offset {offset} of '{group}' is leased to {owner}"))
            }
            None if offset >= g.next => Some(format!(
                "offset {offset} of '{group}' was never delivered"
            )),
            None => Some(format!(
                "offset {offset} of '{group}' is not leased to you (its lease ran out, or it was given back)"
            )),
        }
    }

    fn group_list(&mut self, conn: ConnId, topic: Option<&str>) {
        let mut lines = Vec::new();
        for (t, groups) in &self.groups.by_topic {
            if topic.is_some_and(|w| w != t) {
                continue;
            }
            let end = self.log.next_offset(t);
            for (name, g) in groups {
                lines.push(Frame::Group(GroupOp::Info {
                    topic: t.clone(),
                    group: name.clone(),
                    info: g.info(end),
                }));
            }
        }
        for f in lines {
            self.reply(conn, f);
        }
        self.reply(conn, Frame::Group(GroupOp::End));
    }

    /// Logs `rec` (and applies it), then answers `conn` with `answer` once the record is as
    /// safe as a publish before its `ACK`.
    fn journal_then_reply(&mut self, conn: ConnId, rec: Record, answer: Frame) {
        match self.journal(&rec) {
            Err(reason) => self.reply(conn, err(reason)),
            Ok(None) => self.reply(conn, answer),
            Ok(Some(mid)) => {
                let deadline = self.now.mono + self.cfg.repl_timeout;
                if let Some(p) = self.primary() {
                    p.acks.push_back(PendingAck::new(mid, conn, deadline));
                }
                let line = self.lines.line(|b| answer.encode_into_bytes(b));
                self.push_reply(conn, Reply::Ack { wait: mid, line });
                self.count_unacked(conn);
            }
        }
    }

    /// Applies `rec` here and adds it to the open batch of records (opening one if none is),
    /// which goes into the journal, and down the link, as one entry when it closes; the `mid`
    /// to wait for before what depends on the record is said, if any.
    ///
    /// Why a batch: a member acknowledging at full speed sends dozens of acks per read, each
    /// making two records (its ack, and the delivery of the entry that takes its place). One
    /// journal entry and one `REPL` for all of them, instead of one each, is most of what a
    /// group costs the pair. The batch stays open only while nothing else can happen in
    /// between: see [`Broker::journal_flush`] for where it closes.
    fn journal(&mut self, rec: &Record) -> Result<Option<u64>, String> {
        if let Err(e) = self.log.writable() {
            warn!("group record not stored: {e}");
            return Err(format!("not stored: {e}"));
        }
        self.groups_apply(rec);
        self.groups.batch.push(rec.encode());
        let (mid, wait) = match self.groups.batch_mid {
            Some(b) => b,
            None => {
                let mid = self.next_mid;
                self.next_mid += 1;
                let link_up = self.primary().is_some_and(|p| p.link.up().is_some());
                let b = (mid, link_up || self.log.is_durable());
                self.groups.batch_mid = Some(b);
                b
            }
        };
        Ok(wait.then_some(mid))
    }

    /// Closes the open batch of records: appends it to the journal as one entry, under the
    /// `mid` it opened with, and replicates it. The core calls this before anything that could
    /// tell another `mid` from this one or change where it goes: at the end of every event but
    /// a member's `ack` or `nack` (so the acks of one read share a batch), before it takes
    /// another `mid`, before the link comes up, and before it hands out its outputs.
    ///
    /// Called several times per frame, nearly always with no batch open: the check is inlined
    /// and only the flush is a call (as one call it cost ~100 instructions per relayed
    /// message, 3 % of the in-process relay path, `bench --only core` under callgrind).
    #[inline]
    pub(super) fn journal_flush(&mut self) {
        if self.groups.batch_mid.is_some() {
            self.journal_flush_batch();
        }
    }

    /// [`Broker::journal_flush`] with a batch open.
    #[inline(never)]
    fn journal_flush_batch(&mut self) {
        let Some((mid, _)) = self.groups.batch_mid.take() else {
            return;
        };
        let mut records = std::mem::take(&mut self.groups.batch);
        let payload = if records.len() == 1 {
            records.pop().unwrap_or_default()
        } else {
            encode_batch(&records)
        };
        if let Err(e) = self.log_journal_entry(mid, payload) {
            // Applied here, not kept: what waited for these records is refused.
            warn!(
                "{} group record(s) not stored: {e}; what waited for them is refused",
                records.len().max(1)
            );
            if let Some(p) = self.primary() {
                let (refused, kept): (std::collections::VecDeque<_>, _) =
                    std::mem::take(&mut p.acks)
                        .into_iter()
                        .partition(|a| a.mid == mid);
                p.acks = kept;
                self.refuse_acks(&refused, &format!("not stored: {e}"));
            }
            return;
        }
        self.maybe_compact_journal();
    }

    /// Appends `payload` to the journal as one entry under `mid` and replicates it; returns
    /// its offset.
    fn log_journal_entry(&mut self, mid: u64, payload: String) -> Result<u64, LogError> {
        let offset = self.log.next_offset(JOURNAL);
        let entry = Entry {
            offset,
            epoch: self.epoch,
            id: MsgId {
                publisher: JOURNAL.into(),
                seq: offset + 1,
            },
            sent_us: self.now.wall_us,
            received_us: self.now.wall_us,
            payload,
        };
        self.append(JOURNAL, &entry)?;
        self.log.set_delivered(JOURNAL, offset + 1);
        let msg = Message {
            mid,
            topic: JOURNAL.to_string(),
            entry,
            quiet: false,
        };
        self.replicate(&msg);
        Ok(offset)
    }

    /// Primary, after a journal entry: once `journal_compact` entries came after the last
    /// snapshot, writes a new one (one `state` record per group, in one entry) and replicates
    /// it. Only while the link is up: a journal is cut at a snapshot only when both nodes have
    /// it, so two journals that part (overlapping reigns) part above their last common
    /// snapshot, where the records a catch-up merges are all still there.
    fn maybe_compact_journal(&mut self) {
        if self.groups.compacting.is_some() || self.role() != Role::Primary {
            return;
        }
        let t = self.log.topic(JOURNAL);
        let since = t.next - t.first.max(self.groups.snapshot_at);
        if since < self.cfg.journal_compact.max(1)
            || self.primary().is_none_or(|p| p.link.up().is_none())
        {
            return;
        }
        let mut records = Vec::new();
        for (topic, groups) in &self.groups.by_topic {
            for (name, g) in groups {
                let mut tries: Vec<(u64, u32)> = g
                    .attempts
                    .iter()
                    .filter(|(o, _)| !g.is_done(**o))
                    .map(|(o, a)| (*o, *a))
                    .collect();
                tries.sort_unstable();
                let state = Record::State {
                    topic: topic.clone(),
                    group: name.clone(),
                    floor: g.floor,
                    next: g.next,
                    redelivered: g.redelivered,
                    dead: g.dead,
                    options: g.options,
                    done: g.done.iter().copied().collect(),
                    tries,
                };
                records.push(state.encode());
            }
        }
        if records.is_empty() {
            return;
        }
        let mid = self.next_mid;
        self.next_mid += 1;
        match self.log_journal_entry(mid, encode_batch(&records)) {
            Ok(offset) => {
                self.groups.snapshot_at = offset;
                self.groups.compacting = Some((mid, offset));
            }
            Err(e) => warn!("snapshot of the groups not stored: {e}"),
        }
    }

    /// Primary: the backup stored up to `confirmed`; once that covers the snapshot, the
    /// journal before it goes (the log makes the snapshot durable first).
    pub(super) fn journal_snapshot_stored(&mut self, confirmed: u64) {
        let Some((mid, offset)) = self.groups.compacting else {
            return;
        };
        if confirmed < mid {
            return;
        }
        self.groups.compacting = None;
        self.trim_journal(offset);
    }

    /// Removes the journal before the snapshot at `offset` (a backup does when it stores one).
    pub(super) fn trim_journal(&mut self, offset: u64) {
        let first = self.log.topic(JOURNAL).first;
        match self.log.trim_front(JOURNAL, offset) {
            Ok(()) => {
                let now = self.log.topic(JOURNAL).first;
                if now > first {
                    info!(
                        "groups' journal: {} entries before the snapshot at {offset} removed",
                        now - first
                    );
                }
            }
            Err(e) => warn!(
                "groups' journal: cannot remove what came before the snapshot at {offset}: {e}"
            ),
        }
    }

    /// A journal entry stored on this node (a backup's `REPL`, or read back at a start).
    pub(super) fn journal_stored(&mut self, entry: &Entry) {
        self.log.set_delivered(JOURNAL, entry.offset + 1);
        let Some(records) = split_batch(&entry.payload) else {
            warn!(
                "journal entry {} is a batch that does not parse: skipped",
                entry.offset
            );
            return;
        };
        for r in records {
            match Record::decode(r) {
                Some(rec) => self.groups_apply(&rec),
                None => warn!(
                    "group record in journal entry {} not understood (a newer version wrote it?): skipped",
                    entry.offset
                ),
            }
        }
    }

    /// Tells the log to keep `topic` from its groups' lowest floor on: retention (the
    /// in-memory bound of a node without a disk, `--retain-bytes`, `--retain-age`) never
    /// removes an entry a group has not finished.
    fn groups_keep(&mut self, topic: &str) {
        let floor = self
            .groups
            .by_topic
            .get(topic)
            .and_then(|gs| gs.values().map(|g| g.floor).min());
        self.log.hold(topic, floor);
    }

    /// Applies a record to the groups; the same record twice changes nothing more.
    fn groups_apply(&mut self, rec: &Record) {
        self.groups_apply_record(rec);
        if let Some(topic) = rec.floor_topic() {
            self.groups_keep(topic);
        }
    }

    fn groups_apply_record(&mut self, rec: &Record) {
        match rec {
            Record::Create {
                topic,
                group,
                start,
                options,
            } => {
                self.groups.make(topic, group, *options, *start);
            }
            Record::Deliver {
                topic,
                group,
                offset,
                attempt,
                ..
            } => {
                if let Some(g) = self.groups.get_mut(topic, group) {
                    if g.is_done(*offset) {
                        return;
                    }
                    let before = g.attempts.insert(*offset, *attempt).unwrap_or(0);
                    if *attempt > 1 && *attempt > before {
                        g.redelivered += 1;
                    }
                    g.next = g.next.max(offset + 1);
                    g.ready.remove(offset);
                    g.delayed.remove(offset);
                }
            }
            Record::Ack {
                topic,
                group,
                offset,
                ..
            } => {
                if let Some(g) = self.groups.get_mut(topic, group) {
                    g.finish(*offset);
                }
            }
            Record::Dead {
                topic,
                group,
                offset,
                ..
            } => {
                if let Some(g) = self.groups.get_mut(topic, group) {
                    if g.finish(*offset) {
                        g.dead += 1;
                    }
                }
            }
            Record::State {
                topic,
                group,
                floor,
                next,
                redelivered,
                dead,
                options,
                done,
                tries,
            } => {
                let g = self.groups.make(topic, group, *options, *floor);
                g.options = *options;
                (g.floor, g.next) = (*floor, (*next).max(*floor));
                (g.redelivered, g.dead) = (*redelivered, *dead);
                g.done = done.iter().copied().filter(|o| o >= floor).collect();
                g.attempts = tries.iter().copied().collect();
                let (floor, done) = (g.floor, &g.done);
                let open = |o: &u64| *o >= floor && !done.contains(o);
                g.ready.retain(open);
                g.delayed.retain(|o, _| open(o));
                g.why.retain(|o, _| open(o));
                g.had.retain(|o, _| open(o));
                // Members and their leases stay: a snapshot is written by the node they are
                // on, of the state they made.
            }
        }
    }

    /// At a start: reads the journal back into the groups.
    pub(super) fn groups_recover(&mut self) {
        let st = self.log.topic(JOURNAL);
        let mut at = st.first;
        while at < st.next {
            let chunk = match self.log.read(JOURNAL, at, READ_CHUNK) {
                Ok(c) if !c.is_empty() => c,
                Ok(_) => break,
                Err(e) => {
                    warn!("reading the groups' journal at {at}: {e}");
                    break;
                }
            };
            for e in &chunk {
                self.journal_stored(e);
                at = e.offset + 1;
            }
        }
        self.log.set_delivered(JOURNAL, st.next);
        self.groups.snapshot_at = st.first;
        let n: usize = self.groups.by_topic.values().map(BTreeMap::len).sum();
        if n > 0 {
            info!(
                "groups: {n} read back from the journal ({} records)",
                st.next - st.first
            );
        }
    }

    /// Becoming primary (a takeover or a start): every entry dispatched and not done goes out
    /// again (its member's lease, if any, was on the other node or an earlier life).
    pub(super) fn groups_take_over(&mut self) {
        for groups in self.groups.by_topic.values_mut() {
            for g in groups.values_mut() {
                g.leases.clear();
                for m in &mut g.members {
                    m.held = 0;
                }
                let back: Vec<u64> = (g.floor..g.next).filter(|o| !g.done.contains(o)).collect();
                for o in back {
                    g.why.entry(o).or_insert("delivered by an earlier primary");
                    g.ready.insert(o);
                }
            }
        }
        let topics: Vec<String> = self.groups.by_topic.keys().cloned().collect();
        for t in topics {
            self.pump_topic(&t);
        }
    }

    /// Offsets of `topic` in `from..upto` that some group of it has not finished (acknowledged
    /// or dead-lettered).
    pub(super) fn groups_unfinished(&self, topic: &str, from: u64, upto: u64) -> Vec<u64> {
        let Some(groups) = self.groups.by_topic.get(topic) else {
            return Vec::new();
        };
        (from..upto)
            .filter(|o| groups.values().any(|g| !g.is_done(*o)))
            .collect()
    }

    /// Holds (or stops holding) what the groups hand out; see [`Groups::hold`].
    pub(super) fn groups_hold(&mut self, hold: bool) {
        if self.groups.hold == hold {
            return;
        }
        self.groups.hold = hold;
        if !hold {
            let topics: Vec<String> = self.groups.by_topic.keys().cloned().collect();
            for t in topics {
                self.pump_topic(&t);
            }
        }
    }

    /// Backup, at a `MARK` of the journal from `next` on: the records about to be cut, for the
    /// primary to take what it lacks.
    pub(super) fn journal_cut(&self, next: u64) -> Vec<String> {
        let end = self.log.next_offset(JOURNAL);
        if next >= end {
            return Vec::new();
        }
        self.log
            .read(JOURNAL, next, (end - next) as usize)
            .map(|es| {
                es.iter()
                    .flat_map(|e| split_batch(&e.payload).unwrap_or_default())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Primary: a record the backup's log had and ours did not (`GROUP|merge`). A group we lack
    /// is made; a record about an entry is taken only if our entry at that offset is the same
    /// one (the two logs may have gone apart there), and then logged anew.
    pub(super) fn merge_record(&mut self, record: &str) {
        let Some(rec) = Record::decode(record) else {
            warn!("group record from the backup not understood: skipped");
            return;
        };
        if matches!(rec, Record::State { .. }) {
            // Snapshots are written only while the link is up, so both journals have them
            // below where they may part: one in a cut tail says nothing ours lacks.
            return;
        }
        if let Some((topic, offset, id)) = rec.entry() {
            let same = self
                .log
                .read(topic, offset, 1)
                .ok()
                .and_then(|e| e.first().map(|e| &e.id == id))
                .unwrap_or(false);
            if !same {
                return;
            }
        }
        if let Err(e) = self.journal(&rec) {
            warn!("group record from the backup not stored: {e}");
            return;
        }
        if let Record::Deliver {
            topic,
            group,
            offset,
            ..
        } = &rec
        {
            // Delivered by a reign we did not see, and not done: its lease was there, so it
            // goes out again from here, as at a takeover (applying the record took it out of
            // what goes out, and moved the group's next offset past it).
            if let Some(g) = self.groups.get_mut(topic, group) {
                if !g.is_done(*offset) && !g.leases.contains_key(offset) {
                    g.why
                        .entry(*offset)
                        .or_insert("delivered by an earlier primary");
                    g.ready.insert(*offset);
                }
            }
            self.pump_topic(topic);
        }
    }

    /// A tail of `topic` from `from` on was cut (our log diverged from the primary's): those
    /// offsets will name other entries. For the journal itself, the groups are read back from
    /// what is left of it (the members stay).
    pub(super) fn groups_offsets_reused(&mut self, topic: &str, from: u64) {
        if topic == JOURNAL {
            let mut members: Vec<(String, String, Vec<Member>)> = Vec::new();
            for (t, groups) in &mut self.groups.by_topic {
                for (name, g) in groups {
                    members.push((t.clone(), name.clone(), std::mem::take(&mut g.members)));
                }
            }
            // What is kept across the reading back: the records cut so far, for the `MARK`,
            // and the members of groups not made again yet.
            let to_merge = std::mem::take(&mut self.groups.to_merge);
            let mut orphans = std::mem::take(&mut self.groups.orphans);
            self.groups = Groups::default();
            self.groups_recover();
            self.groups.to_merge = to_merge;
            for (t, name, mut ms) in members {
                for m in &mut ms {
                    m.held = 0;
                }
                match self.groups.get_mut(&t, &name) {
                    Some(g) => g.members = ms,
                    None if !ms.is_empty() => orphans.push((t, name, ms)),
                    None => {}
                }
            }
            self.groups.orphans = orphans;
            return;
        }
        if let Some(groups) = self.groups.by_topic.get_mut(topic) {
            for g in groups.values_mut() {
                g.done.retain(|o| *o < from);
                g.attempts.retain(|o, _| *o < from);
                g.why.retain(|o, _| *o < from);
                g.had.retain(|o, _| *o < from);
                g.ready.retain(|o| *o < from);
                g.delayed.retain(|o, _| *o < from);
                g.leases.retain(|o, _| *o < from);
                g.next = g.next.min(from);
                g.floor = g.floor.min(from);
            }
        }
    }

    /// Stepping down: leases end (the new primary delivers those entries again).
    pub(super) fn groups_step_down(&mut self) {
        for groups in self.groups.by_topic.values_mut() {
            for g in groups.values_mut() {
                g.leases.clear();
                for m in &mut g.members {
                    m.held = 0;
                }
            }
        }
        self.timers.stop(Timer::AckWait);
    }

    /// A connection is gone: its memberships end and its leases go to other members.
    pub(super) fn groups_forget(&mut self, conn: ConnId, memberships: &[(String, String)]) {
        for (_, _, ms) in &mut self.groups.orphans {
            ms.retain(|m| m.conn != conn);
        }
        self.groups.orphans.retain(|(_, _, ms)| !ms.is_empty());
        for (topic, group) in memberships {
            if let Some(g) = self.groups.get_mut(topic, group) {
                g.drop_member(conn, "its consumer went away");
            }
        }
        for (topic, _) in memberships {
            self.pump_topic(topic);
        }
    }

    /// Leases that ran out, and delays that ended.
    pub(super) fn on_ack_wait(&mut self) {
        let now = self.now.mono;
        let mut topics = Vec::new();
        for (t, groups) in &mut self.groups.by_topic {
            for g in groups.values_mut() {
                let late: Vec<u64> = g
                    .leases
                    .iter()
                    .filter(|(_, l)| l.deadline <= now)
                    .map(|(o, _)| *o)
                    .collect();
                let due: Vec<u64> = g
                    .delayed
                    .iter()
                    .filter(|(_, at)| **at <= now)
                    .map(|(o, _)| *o)
                    .collect();
                if late.is_empty() && due.is_empty() {
                    continue;
                }
                for o in late {
                    g.give_back(o, "its lease ran out");
                }
                for o in due {
                    g.delayed.remove(&o);
                    g.ready.insert(o);
                }
                topics.push(t.clone());
            }
        }
        for t in topics {
            self.pump_topic(&t);
        }
        self.arm_ack_wait();
    }

    /// Makes the ack-wait timer go off by `at` (a lease or a delay was just made). Leases that
    /// end early (acks) leave it as it is: going off early costs one scan, in
    /// [`Broker::on_ack_wait`], which sets it right; scanning every lease at every delivery
    /// would cost more than the delivery.
    fn arm_ack_wait_by(&mut self, at: Time) {
        if self.timers.due(Timer::AckWait).is_none_or(|t| at < t) {
            self.timers.set(Timer::AckWait, at);
        }
    }

    /// Sets the ack-wait timer to the earliest lease or delay end of every group.
    fn arm_ack_wait(&mut self) {
        let next = self
            .groups
            .by_topic
            .values()
            .flat_map(|gs| gs.values())
            .flat_map(|g| {
                g.leases
                    .values()
                    .map(|l| l.deadline)
                    .chain(g.delayed.values().copied())
            })
            .min();
        match next {
            Some(t) => self.timers.set(Timer::AckWait, t),
            None => self.timers.stop(Timer::AckWait),
        }
    }

    /// Hands out what each group of `topic` may have now: entries to deliver again first, then
    /// new ones up to the topic's delivered mark, each to the next member with room.
    pub(super) fn pump_topic(&mut self, topic: &str) {
        if self.role() != Role::Primary || !self.groups.on_topic(topic) || self.groups.hold {
            return;
        }
        let names: Vec<String> = self
            .groups
            .by_topic
            .get(topic)
            .map(|gs| gs.keys().cloned().collect())
            .unwrap_or_default();
        for name in names {
            self.pump(topic, &name);
        }
    }

    fn pump(&mut self, topic: &str, name: &str) {
        let st = self.log.topic(topic);
        let limit = st.delivered.min(st.next);
        loop {
            let Some(g) = self.groups.get_mut(topic, name) else {
                return;
            };
            if g.members.is_empty() {
                return;
            }
            // Entries removed by retention before the group got to them are skipped.
            if g.next < st.first {
                g.next = st.first;
            }
            if g.floor < st.first {
                g.floor = st.first;
                g.done.retain(|o| *o >= st.first);
            }
            let offset = match g.next_ready() {
                Some(o) => o,
                None if g.next < limit => g.next,
                None => return,
            };
            if g.is_done(offset) {
                g.ready.remove(&offset);
                if offset == g.next {
                    g.next += 1;
                }
                continue;
            }
            let attempt = g.attempts.get(&offset).copied().unwrap_or(0) + 1;
            if attempt > g.options.max_deliver {
                let why = g.why.get(&offset).copied().unwrap_or("not acknowledged");
                let reason = format!("{} deliveries, the last: {why}", attempt - 1);
                g.ready.remove(&offset);
                self.dead_letter(topic, name, offset, reason);
                continue;
            }
            let avoid = g.had.get(&offset).copied();
            let Some(i) = g.next_member(avoid) else {
                return;
            };
            let (conn, consumer) = (g.members[i].conn, g.members[i].name.clone());
            let entry = match self.log.read(topic, offset, 1) {
                Ok(mut e) if !e.is_empty() => e.swap_remove(0),
                Ok(_) => return,
                Err(e) => {
                    warn!("group '{name}' on '{topic}': cannot read offset {offset}: {e}");
                    return;
                }
            };
            let rec = Record::Deliver {
                topic: topic.to_string(),
                group: name.to_string(),
                offset,
                id: entry.id.clone(),
                attempt,
                consumer,
            };
            if let Err(e) = self.journal(&rec) {
                warn!("group '{name}' on '{topic}': {e}");
                return;
            }
            let deadline =
                self.now.mono + std::time::Duration::from_millis(self.groups_ack_wait(topic, name));
            let Some(g) = self.groups.get_mut(topic, name) else {
                return;
            };
            g.leases.insert(
                offset,
                Lease {
                    conn,
                    deadline,
                    id: entry.id.clone(),
                },
            );
            g.members[i].held += 1;
            self.arm_ack_wait_by(deadline);
            let f = Frame::Group(GroupOp::Msg {
                topic: topic.to_string(),
                group: name.to_string(),
                offset,
                attempt,
                id: entry.id.clone(),
                sent_us: entry.sent_us,
                payload: entry.payload.clone(),
            });
            self.reply(conn, f);
        }
    }

    fn groups_ack_wait(&mut self, topic: &str, name: &str) -> u64 {
        self.groups
            .get_mut(topic, name)
            .map_or(0, |g| g.options.ack_wait_ms)
    }

    /// Moves an entry a group could not get acknowledged to `<topic>.dead`, as a new entry of
    /// that topic (its subscribers get it as any other), and records it done.
    fn dead_letter(&mut self, topic: &str, group: &str, offset: u64, reason: String) {
        let dead_topic = format!("{topic}.dead");
        let original = self
            .log
            .read(topic, offset, 1)
            .ok()
            .and_then(|mut e| (!e.is_empty()).then(|| e.swap_remove(0)));
        let (dead_count, publisher) = match self.groups.get_mut(topic, group) {
            Some(g) => (g.dead, format!("$dead:{topic}:{group}")),
            None => return,
        };
        let orig_id = original
            .as_ref()
            .map(|o| o.id.clone())
            .unwrap_or_else(MsgId::anonymous);
        if let Some(orig) = original {
            let entry = Entry {
                offset: self.log.next_offset(&dead_topic),
                epoch: self.epoch,
                id: MsgId {
                    publisher: publisher.into(),
                    seq: dead_count + 1,
                },
                sent_us: orig.sent_us,
                received_us: self.now.wall_us,
                payload: format!(
                    "group={group} offset={offset} publisher={} seq={} reason={reason}: {}",
                    orig.id.publisher, orig.id.seq, orig.payload
                ),
            };
            if let Err(e) = self.append(&dead_topic, &entry) {
                warn!("dead letter of '{topic}'@{offset} not stored: {e}");
                return;
            }
            self.seen.record(&entry.id.publisher, entry.id.seq);
            let mid = self.take_mid();
            let msg = Message {
                mid,
                topic: dead_topic.clone(),
                entry,
                quiet: false,
            };
            self.replicate(&msg);
            self.enqueue(msg, true);
        }
        warn!("group '{group}' on '{topic}': offset {offset} dead-lettered to '{dead_topic}' ({reason})");
        self.counters.dead_lettered += 1;
        let rec = Record::Dead {
            topic: topic.to_string(),
            group: group.to_string(),
            offset,
            id: orig_id,
            reason,
        };
        if let Err(e) = self.journal(&rec) {
            warn!("{e}");
        }
    }
}

/// What starts a journal entry holding several records: `records|` then each record as
/// `LEN|RECORD` (LEN in bytes), one after the other. An entry without it is one record (as
/// every entry was before batches).
const BATCH: &str = "records|";

fn encode_batch(records: &[String]) -> String {
    let mut s =
        String::with_capacity(BATCH.len() + records.iter().map(|r| r.len() + 4).sum::<usize>());
    s.push_str(BATCH);
    for r in records {
        s.push_str(&r.len().to_string());
        s.push('|');
        s.push_str(r);
    }
    s
}

/// The records of a journal entry; `None` if it is a batch that does not parse.
/// True when a journal entry is a snapshot of the groups (its records are `state` records).
pub(super) fn is_snapshot(payload: &str) -> bool {
    split_batch(payload).is_some_and(|r| r.first().is_some_and(|x| x.starts_with("state|")))
}

fn split_batch(payload: &str) -> Option<Vec<&str>> {
    let Some(mut rest) = payload.strip_prefix(BATCH) else {
        return Some(vec![payload]);
    };
    let mut v = Vec::new();
    while !rest.is_empty() {
        let (len, tail) = rest.split_once('|')?;
        let len: usize = len.parse().ok()?;
        v.push(tail.get(..len)?);
        rest = tail.get(len..)?;
    }
    Some(v)
}

fn no_group_reason(topic: &str, group: &str) -> String {
    format!("no group '{group}' on '{topic}' (make it with GROUP|create)")
}

fn no_group(topic: &str, group: &str) -> Frame {
    err(no_group_reason(topic, group))
}

fn verb_of(op: &GroupOp) -> String {
    op.to_string().split('|').next().unwrap_or("?").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_records_read_back_as_written() {
        for r in [
            Record::Create {
                topic: "t".into(),
                group: "g".into(),
                start: 3,
                options: GroupOptions::default(),
            },
            Record::Deliver {
                topic: "t".into(),
                group: "g".into(),
                offset: 4,
                id: MsgId {
                    publisher: "p".into(),
                    seq: 9,
                },
                attempt: 2,
                consumer: "c1".into(),
            },
            Record::Ack {
                topic: "t".into(),
                group: "g".into(),
                offset: 4,
                id: MsgId {
                    publisher: "p".into(),
                    seq: 9,
                },
            },
            Record::Dead {
                topic: "t".into(),
                group: "g".into(),
                offset: 5,
                id: MsgId::anonymous(),
                reason: "5 deliveries, the last: nacked | twice".into(),
            },
            Record::State {
                topic: "t".into(),
                group: "g".into(),
                floor: 10,
                next: 17,
                redelivered: 4,
                dead: 1,
                options: GroupOptions::default(),
                done: vec![12, 15],
                tries: vec![(10, 2), (11, 1), (13, 1)],
            },
            Record::State {
                topic: "t".into(),
                group: "idle".into(),
                floor: 0,
                next: 0,
                redelivered: 0,
                dead: 0,
                options: GroupOptions::default(),
                done: Vec::new(),
                tries: Vec::new(),
            },
        ] {
            assert_eq!(Record::decode(&r.encode()), Some(r.clone()), "{r:?}");
        }
        assert_eq!(Record::decode("rename|t|g"), None);
    }

    #[test]
    fn a_batch_of_records_splits_back_into_them() {
        let records = vec![
            "ack|t|g|3|p|4".to_string(),
            "deliver|t|g|5|p|6|1|c:1".to_string(),
            "dead|t|g|7|p|8|2 deliveries, the last: nacked".to_string(),
        ];
        let payload = encode_batch(&records);
        let back = split_batch(&payload).expect("a batch we wrote parses");
        assert_eq!(back, records.iter().map(String::as_str).collect::<Vec<_>>());
        // One record without the prefix is itself (entries written before batches).
        assert_eq!(split_batch("ack|t|g|3|p|4"), Some(vec!["ack|t|g|3|p|4"]));
        // A damaged batch is refused, not misread or a panic.
        for bad in [
            "records|99|ack",
            "records|x|ack",
            "records|3",
            "records|1|é",
        ] {
            assert_eq!(split_batch(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_group_floor_moves_over_done_entries_only() {
        let mut g = Group::new(GroupOptions::default(), 10);
        assert!(g.finish(11) && g.floor == 10);
        assert!(g.finish(10) && g.floor == 12);
        assert!(!g.finish(10) && !g.finish(11));
        assert!(g.is_done(9) && !g.is_done(12));
    }
}
