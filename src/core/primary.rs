//! The primary's work: accept, replicate, compute, deliver in order, and keep the link to the
//! backup up.

use foldhash::{HashMap, HashMapExt};
use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use tracing::{debug, warn};

use super::conn::Reply;
use super::inflight::Inflight;
use super::link::{Link, LinkState, LINK_TIMEOUT};
use super::peer::Purpose;
use super::time::Time;
use super::{Broker, ConnId, Message, Msg, Output, RoleState, STALL};
use crate::log::Entry;
use crate::protocol::{Frame, MsgId, Stamps};

/// From this many subscribers on a topic, a message's deliveries go out as one
/// [`Output::Deliver`] per dialect rather than an [`Output::Send`] each. Below it the vector
/// of connections would cost more than it saves (the relay's usual case is one subscriber).
const DELIVER_BATCH: usize = 16;

/// State only a primary has.
#[derive(Debug)]
pub(super) struct Primary {
    pub link: Link,
    /// Accepted and not yet delivered; replayed to a backup that (re)connects.
    pub inflight: Inflight<Arc<Message>>,
    /// Delivery queues per publisher: the reorder stage.
    order: HashMap<String, VecDeque<Slot>>,
    /// Publishes whose `ACK` waits for the backup's `STORED`, in `mid` order.
    pub acks: VecDeque<PendingAck>,
    /// Every `mid` up to this one is stored by the backup or already delivered.
    pub confirmed: u64,
    /// Last tick of the stall watchdog.
    pub last_tick: Time,
    /// This process was paused; deliveries wait until the peer confirms our role.
    pub suspect: bool,
    /// Results held back while `suspect`.
    pub fenced: Vec<(Arc<Message>, Stamps)>,
    /// Results waiting for the backup to store their message, in the order they were ready.
    pub unstored: VecDeque<(Arc<Message>, Stamps)>,
    /// With `--lease`: acknowledging and delivering is allowed until then.
    pub lease_until: Time,
    /// When each lease question still unanswered on the link was asked.
    pub lease_asks: VecDeque<Time>,
    /// The lease ran out (logged once).
    pub lease_lapsed: bool,
    /// The connection asking the peer who is primary, after a pause.
    pub fence: Option<ConnId>,
    /// Undelivered entries of the log not yet in flight, by topic (`takeup.rs`).
    pub backlogs: super::takeup::Backlogs,
    /// Fresh publishes wait until the backup's log is reconciled with ours (`settle.rs`).
    pub settle: Option<super::settle::Settle>,
}

/// A place in a publisher's delivery queue: filled when the message's compute task ends.
#[derive(Debug)]
struct Slot {
    mid: u64,
    done: Option<(Arc<Message>, Stamps)>,
}

/// A publish on `conn` whose `ACK` waits for the backup to store message `mid`.
#[derive(Debug)]
pub(super) struct PendingAck {
    pub mid: u64,
    pub conn: ConnId,
    /// When to give up on the backup and run degraded.
    deadline: Time,
}

impl PendingAck {
    /// An answer on `conn` that waits for `mid` to be stored, until `deadline` (then the link
    /// is dropped and the node runs degraded).
    pub fn new(mid: u64, conn: ConnId, deadline: Time) -> PendingAck {
        PendingAck {
            mid,
            conn,
            deadline,
        }
    }
}

impl Primary {
    /// A primary from `now` on (the stall watchdog counts from then).
    pub fn new(has_peer: bool, now: Time) -> Primary {
        Primary {
            link: Link::new(has_peer),
            inflight: Inflight::default(),
            order: HashMap::new(),
            acks: VecDeque::new(),
            confirmed: 0,
            last_tick: now,
            suspect: false,
            fenced: Vec::new(),
            unstored: VecDeque::new(),
            lease_until: Time::default(),
            lease_asks: VecDeque::new(),
            lease_lapsed: false,
            fence: None,
            backlogs: Default::default(),
            settle: None,
        }
    }

    /// Messages accepted (or taken up from the log) and not yet delivered, with the log's
    /// undelivered entries not yet taken up.
    pub fn in_flight(&self) -> u64 {
        self.inflight.len() as u64 + super::takeup::untaken(&self.backlogs)
    }
}

impl Broker {
    pub(super) fn primary(&mut self) -> Option<&mut Primary> {
        match &mut self.role {
            RoleState::Primary(p) => Some(p),
            RoleState::Backup(_) => None,
        }
    }

    /// Accepts a publish on the primary. The `ACK` goes at once when running degraded (or for
    /// a resend of a message already safe), otherwise when the backup has stored the message.
    pub(super) fn accept_publish(&mut self, conn: ConnId, frame: Frame) {
        self.accept_publish_as(conn, frame, false);
    }

    /// [`Broker::accept_publish`]; a `quiet` one goes to the topic's consumer groups only (a
    /// group-only hand-over, `GROUP|requeue`).
    pub(super) fn accept_publish_as(&mut self, conn: ConnId, frame: Frame, quiet: bool) {
        let (topic, id, sent_us, payload, legacy) = match frame {
            Frame::Pub {
                topic,
                id,
                sent_us,
                payload,
            } => (topic, id, sent_us, payload, false),
            Frame::Publish { topic, payload } => {
                (topic, MsgId::anonymous(), self.now.wall_us, payload, true)
            }
            _ => return,
        };
        // Encoded now, while the identity is at hand (it moves into the entry below); the
        // seed's bare `ACK` is one static line, with no copy or count per message.
        let ack = if legacy {
            Bytes::from_static(b"ACK\n")
        } else {
            self.lines
                .line(|b| crate::protocol::write_ack(Some(&id), b))
        };
        let resend = !id.is_anonymous() && self.seen.contains(&id.publisher, id.seq);
        let wait = if resend {
            // Every earlier message went down the link (and into the log) before this point, so
            // once the last one is safe, so is this one.
            debug!("resend of {}:{} recognised", id.publisher, id.seq);
            let last = self.next_mid - 1;
            (last > self.ack_floor()).then_some(last)
        } else {
            let mut entry = Entry {
                // Set by `append_next`.
                offset: 0,
                epoch: self.epoch,
                id,
                sent_us,
                received_us: self.now.wall_us,
                payload,
            };
            if let Err(e) = self.append_next(&topic, &mut entry) {
                warn!("publish on '{topic}' refused: the log failed: {e}");
                let reason = format!("not stored: {e}");
                self.counters.refused += 1;
                self.reply(conn, Frame::Err { reason });
                return;
            }
            self.counters.published += 1;
            if !entry.id.is_anonymous() {
                self.seen.record(&entry.id.publisher, entry.id.seq);
            }
            debug!(
                "accepted {}:{} at {topic}@{} (conn {conn})",
                entry.id.publisher, entry.id.seq, entry.offset
            );
            let mid = self.take_mid();
            let msg = Message {
                mid,
                topic,
                entry,
                quiet,
            };
            let repl = self.replicate(&msg);
            self.enqueue(msg, true);
            let local = self.log.is_durable();
            (repl.is_some() || local || !self.lease_held()).then_some(mid)
        };
        match wait {
            None => {
                self.counters.acknowledged += 1;
                self.reply_line(conn, ack);
            }
            Some(mid) => {
                let deadline = self.now.mono + self.cfg.repl_timeout;
                if let Some(p) = self.primary() {
                    p.acks.push_back(PendingAck {
                        mid,
                        conn,
                        deadline,
                    });
                }
                self.push_reply(
                    conn,
                    Reply::Ack {
                        wait: mid,
                        line: ack,
                    },
                );
                self.count_unacked(conn);
            }
        }
    }

    /// Sends a message down the link if it is up; returns the `mid` whose `STORED` to wait
    /// for (none from a seed backup, which never confirms: a written frame is all we know).
    pub(super) fn replicate(&mut self, m: &Message) -> Option<u64> {
        let (conn, legacy) = self.primary()?.link.up()?;
        if legacy {
            let f = Frame::Replicate {
                topic: m.topic.clone(),
                payload: m.payload.clone(),
            };
            self.send_frame(conn, &f);
            self.stored(m.mid);
            return None;
        }
        let line = self
            .lines
            .line(|b| crate::protocol::repl_line_into(b, m.mid, &m.topic, &m.entry));
        self.out.push_back(Output::Send {
            conn,
            line,
            delivery: false,
        });
        Some(m.mid)
    }

    /// Puts a message into the compute stage and its topic's delivery queue. `fresh`: just
    /// accepted (rather than taken up again from the log at a start or a takeover, which a
    /// relay must not deliver before subscribers had time to reconnect).
    pub(super) fn enqueue<M: Msg>(&mut self, msg: M, fresh: bool) {
        if fresh && self.backlogged(&msg.borrow().topic) {
            // Behind the topic's entries still in the log from before (`takeup.rs`).
            let parked = self.park(&msg.into());
            debug_assert!(parked, "a backlogged topic parks");
            return;
        }
        let compute_off = self.cfg.compute_off;
        let queued = self
            .primary()
            .is_none_or(|p| p.order.contains_key(&msg.borrow().topic));
        if compute_off && fresh && !queued && !self.stalled() && self.lease_held() {
            // Pure relay, nothing of this publisher waiting ahead of it, free to deliver: the
            // reorder stage and the in-flight map would hold it for no time at all.
            let now = self.now.wall_us;
            let stamps = self.stamps(msg.borrow(), now, now);
            self.release(msg, stamps);
            return;
        }
        let msg: Arc<Message> = msg.into();
        let Some(p) = self.primary() else {
            return;
        };
        p.inflight.insert(msg.mid, msg.clone());
        p.order
            .entry(msg.topic.clone())
            .or_default()
            .push_back(Slot {
                mid: msg.mid,
                done: None,
            });
        if compute_off {
            // Still through the reorder stage, so a message never overtakes an earlier one.
            let now = self.now.wall_us;
            if fresh {
                self.finish(msg, now, now);
            } else {
                self.handle_computed(msg.mid, now, now, self.now);
            }
        } else {
            self.out.push_back(Output::Compute { mid: msg.mid });
        }
    }

    fn stamps(&self, m: &Message, cs: u64, ce: u64) -> Stamps {
        Stamps {
            epoch: self.epoch,
            received_us: m.received_us,
            compute_start_us: cs,
            compute_end_us: ce,
            offset: m.offset,
        }
    }

    /// A compute task ended (a node that stepped down meanwhile has forgotten it).
    pub(super) fn computed(&mut self, mid: u64, cs: u64, ce: u64) {
        let msg = self.primary().and_then(|p| p.inflight.get(mid).cloned());
        if let Some(msg) = msg {
            self.finish(msg, cs, ce);
        }
    }

    /// Marks `msg` done and delivers everything of its topic that is now ready, in offset order.
    fn finish(&mut self, msg: Arc<Message>, cs: u64, ce: u64) {
        let stamps = self.stamps(&msg, cs, ce);
        let Some(p) = self.primary() else {
            return;
        };
        let key = &msg.topic;
        let Some(queue) = p.order.get_mut(key) else {
            return;
        };
        if let Some(slot) = queue.iter_mut().find(|s| s.mid == msg.mid) {
            slot.done = Some((msg.clone(), stamps));
        }
        let mut ready = Vec::new();
        while queue.front().is_some_and(|s| s.done.is_some()) {
            if let Some(Slot { done: Some(d), .. }) = queue.pop_front() {
                ready.push(d);
            }
        }
        if queue.is_empty() {
            p.order.remove(key);
        }
        if self.stalled() {
            if let Some(p) = self.primary() {
                p.fenced.extend(ready);
            }
            return;
        }
        for (m, stamps) in ready {
            self.release(m, stamps);
        }
    }

    /// Delivers a finished message, forgets it as in flight and tells the backup to drop it.
    ///
    /// While the backup is linked, a result waits until the backup has stored its message: an
    /// entry is delivered only once two logs hold it at that offset, so the offset a subscriber
    /// saw names the same entry on whichever node serves it next (the rule Kafka calls the high
    /// watermark), and a message the backup never got is never delivered by a primary about to
    /// die (its publisher, not acknowledged, resends it to the other node).
    pub(super) fn release<M: Msg>(&mut self, m: M, stamps: Stamps) {
        if !self.lease_held() {
            self.note_lease_lapsed();
            if let Some(p) = self.primary() {
                let m: Arc<Message> = m.into();
                p.inflight.insert_if_absent(m.mid, || m.clone());
                p.fenced.push((m, stamps));
            }
            return;
        }
        let written = self.written_floor();
        let mid = m.borrow().mid;
        if let Some(p) = self.primary() {
            let waiting = !p.unstored.is_empty()
                || matches!(p.link.up(), Some((_, false))) && mid > p.confirmed
                || mid > written;
            if waiting {
                // In flight until delivered (the relay's fast path skipped that): replayed to a
                // backup that reconnects, handed over on a step-down.
                let m: Arc<Message> = m.into();
                p.inflight.insert_if_absent(mid, || m.clone());
                p.unstored.push_back((m, stamps));
                return;
            }
        }
        self.deliver_now(m.borrow(), stamps);
    }

    /// Every `mid` up to this one is written to this node's log (all of them for a log in
    /// memory): a result is delivered only once its entry is written here too, so a write that
    /// fails (a full disk) refuses a message that nobody has seen.
    fn written_floor(&self) -> u64 {
        if self.log.is_durable() {
            self.written_mid
        } else {
            u64::MAX
        }
    }

    /// Delivers the results that waited for the backup (and for the local write), up to the
    /// first whose message is not stored yet (with no backup to wait for, only the write).
    pub(super) fn release_stored(&mut self) {
        loop {
            let written = self.written_floor();
            let Some(p) = self.primary() else {
                return;
            };
            if p.suspect {
                // Until the peer says who is primary (`unfence` comes back here).
                return;
            }
            let linked = matches!(p.link.up(), Some((_, false)));
            let ready = p
                .unstored
                .front()
                .is_some_and(|(m, _)| (!linked || m.mid <= p.confirmed) && m.mid <= written);
            if !ready {
                return;
            }
            if let Some((m, stamps)) = p.unstored.pop_front() {
                self.deliver_now(&m, stamps);
            }
        }
    }

    fn deliver_now(&mut self, m: &Message, stamps: Stamps) {
        self.deliver(m, stamps);
        self.log.set_delivered(&m.topic, m.offset + 1);
        self.taken_delivered(&m.topic);
        if self.groups.on_topic(&m.topic) {
            self.pump_topic(&m.topic);
        }
        let Some(p) = self.primary() else {
            return;
        };
        p.inflight.remove(m.mid);
        match p.link.up() {
            Some((conn, true)) => {
                // A seed backup clears by topic and payload, one message at a time.
                let f = Frame::Clear {
                    topic: m.topic.clone(),
                    payload: m.payload.clone(),
                };
                self.send_frame(conn, &f);
            }
            Some((_, false)) if !self.delivered_due.contains(m.topic.as_str()) => {
                self.delivered_due.insert(m.topic.clone());
            }
            _ => {}
        }
    }

    /// Tells the backup where the delivered mark of each topic delivered to since the last
    /// call now is: one cumulative `CLR` per topic for a batch of deliveries (a `CLR` per
    /// message was a line to encode, send, parse and look up on each side of the link).
    pub(super) fn send_delivered_marks(&mut self) {
        if self.delivered_due.is_empty() {
            return;
        }
        let mut due = std::mem::take(&mut self.delivered_due);
        if let Some((conn, false)) = self.primary().and_then(|p| p.link.up()) {
            for topic in due.drain() {
                let upto = self.log.delivered(&topic);
                self.send_frame(conn, &Frame::Clr { topic, upto });
            }
        }
        due.clear();
        // Its room kept for the next batch.
        self.delivered_due = due;
    }

    /// Sends one message to every subscriber of its topic, encoded once per dialect.
    fn deliver(&mut self, m: &Message, stamps: Stamps) {
        if m.quiet {
            // Its subscribers had it already; its groups take it from the log.
            return;
        }
        self.delivered += 1;
        self.observe_stages(&stamps);
        let Some(subs) = self.topics.get(&m.topic) else {
            return;
        };
        let mut msg_line: Option<Bytes> = None;
        let mut bare_line: Option<Bytes> = None;
        let count = subs.len();
        // Many subscribers: one `Output::Deliver` per dialect for those with no reply waiting.
        let batch = count >= DELIVER_BATCH;
        let (mut msg_conns, mut bare_conns) = (Vec::new(), Vec::new());
        for (i, s) in subs.iter().enumerate() {
            if s.replaying || m.offset < s.from {
                // Its replay sends this one (or it had it already).
                continue;
            }
            let (slot, conns) = if s.legacy {
                (&mut bare_line, &mut bare_conns)
            } else {
                (&mut msg_line, &mut msg_conns)
            };
            if slot.is_none() {
                *slot = Some(if s.legacy {
                    self.lines.join(&[m.payload.as_bytes(), b"\n"])
                } else {
                    self.lines.line(|b| {
                        crate::protocol::msg_line_into(
                            b, &m.topic, &m.id, m.sent_us, &stamps, &m.payload,
                        )
                    })
                });
            }
            let Some(c) = self.conns.get_mut(&s.conn) else {
                continue;
            };
            if batch && c.replies.is_empty() {
                if conns.capacity() == 0 {
                    conns.reserve_exact(count - i);
                }
                conns.push(s.conn);
                continue;
            }
            // The last subscriber takes the line itself: no reference count raised and
            // dropped again (with one subscriber, two atomic operations per message).
            let line = if i + 1 == count && !batch {
                slot.take()
            } else {
                slot.clone()
            };
            let Some(line) = line else {
                continue;
            };
            if c.replies.is_empty() {
                self.out.push_back(Output::Send {
                    conn: s.conn,
                    line,
                    delivery: true,
                });
            } else {
                c.replies.push_back(Reply::Ready(line));
            }
        }
        for (conns, line) in [(msg_conns, msg_line), (bare_conns, bare_line)] {
            if let (false, Some(line)) = (conns.is_empty(), line) {
                self.out.push_back(Output::Deliver { conns, line });
            }
        }
    }

    /// The backup confirmed everything up to `mid`: answer the publishes waiting for it.
    pub(super) fn stored(&mut self, mid: u64) {
        let Some(p) = self.primary() else {
            return;
        };
        p.confirmed = p.confirmed.max(mid);
        let confirmed = p.confirmed;
        self.journal_snapshot_stored(confirmed);
        self.release_ready_acks();
        self.release_stored();
    }

    /// Answers every publish still waiting for `STORED`: with its `ACK` when this node is still
    /// primary (the link is gone, so it runs degraded), with `ERR` when it lost its role or may
    /// have (paused), so that the publisher resends to the other broker.
    pub(super) fn release_acks(&mut self, acks: VecDeque<PendingAck>, keep_role: bool) {
        if keep_role {
            // Degraded: each goes once the local log has its message (at once unless the
            // policy waits for the disk).
            if let Some(p) = self.primary() {
                let newer = std::mem::replace(&mut p.acks, acks);
                p.acks.extend(newer);
            }
            self.release_ready_acks();
            return;
        }
        self.refuse_acks(&acks, "not primary any more; resend to the other broker");
    }

    /// Answers each of `acks` with `ERR|reason` instead of its `ACK`, in its connection's
    /// order, so that the publisher resends it to the other broker.
    pub(super) fn refuse_acks(&mut self, acks: &VecDeque<PendingAck>, reason: &str) {
        let err = Frame::Err {
            reason: reason.to_string(),
        };
        let mut conns: Vec<ConnId> = acks.iter().map(|a| a.conn).collect();
        conns.dedup();
        for conn in conns {
            self.flush_replies(conn, Some(u64::MAX), Some(&err));
        }
    }

    /// True if this primary must not deliver now because the process was paused (SIGSTOP, a VM
    /// freeze): while it slept, the backup may have taken over. Starts a check with the peer.
    pub(super) fn stalled(&mut self) -> bool {
        let now = self.now.mono;
        if self.cfg.peer.is_none() {
            return false;
        }
        let Some(p) = self.primary() else {
            return false;
        };
        let paused = Some(now - p.last_tick).filter(|gap| *gap > STALL);
        if let (Some(gap), false) = (paused, p.suspect) {
            warn!("this process was paused for {gap:?}: holding deliveries until the peer confirms our role");
            self.ask_peer_for_role();
        }
        self.primary().is_some_and(|p| p.suspect)
    }

    /// Holds deliveries and ACKs (`suspect`) and asks the peer who is primary;
    /// [`Broker::unfence`] or a step-down ends the hold.
    pub(super) fn ask_peer_for_role(&mut self) {
        let Some(peer) = self.cfg.peer.clone() else {
            return;
        };
        let epoch = self.epoch;
        let Some(p) = self.primary() else {
            return;
        };
        if p.suspect {
            return;
        }
        p.suspect = true;
        let conn = self.open(Purpose::Fence { epoch }, peer, LINK_TIMEOUT);
        if let Some(p) = self.primary() {
            p.fence = Some(conn);
        }
    }

    /// Drops the link if the oldest `ACK` waiting for the backup's `STORED` has waited longer
    /// than the replication timeout on this link. `ACK`s that wait for something else (the local
    /// disk, the lease) are not the backup's fault, and one left over from a link that dropped
    /// counts from when the new link came up, plus a replication timeout per `CATCH_UP_CHUNK`
    /// entries its catch-up sent ahead of it (20,000 entries to store before the first
    /// `STORED` took a loaded backup longer than the timeout: the link dropped, and the next
    /// catch-up resent what the backup was still storing).
    pub(super) fn check_repl_timeout(&mut self) {
        let now = self.now.mono;
        let t = self.cfg.repl_timeout;
        let Some(p) = self.primary() else {
            return;
        };
        let LinkState::Up { since, .. } = p.link.state else {
            return;
        };
        let grace = p.link.catch_up_grace;
        let late = p
            .acks
            .iter()
            .find(|a| a.mid > p.confirmed)
            .filter(|a| a.deadline.max(since + t + grace) <= now);
        if let Some(a) = late {
            warn!(
                "backup did not store message {} within {t:?}: dropping the link, running degraded",
                a.mid
            );
            self.link_lost("no STORED in time");
        }
    }
}
