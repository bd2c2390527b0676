//! Connections this node opens to its peer, and what each is for: the replication link, the
//! backup's polls and probes, forwarded publishes, hand-overs, and the check after a pause.

use foldhash::{HashMap, HashMapExt, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use super::conn::{Conn, Kind};
use super::failover::Evidence;
use super::time::Timer;
use super::{Broker, ConnId, Message};
use crate::log::Entry;
use crate::protocol::{Frame, MsgId, Role, PROTOCOL_VERSION};

/// How long a paused primary waits for its peer to say who is primary.
const FENCE_TIMEOUT: Duration = Duration::from_secs(1);

/// Attempts at a hand-over, and the wait between two.
const HAND_OVER_ATTEMPTS: u32 = 10;
const HAND_OVER_RETRY: Duration = Duration::from_millis(300);

/// Why this node opened a connection to its peer.
#[derive(Debug)]
pub(super) enum Purpose {
    /// Primary: the replication link to the backup.
    Link,
    /// Backup: the kept-open polling connection.
    Poll,
    /// Backup: a fresh connection that asks whether the primary lives.
    Probe,
    /// Backup: a client's publish, forwarded to the primary.
    Forward {
        client: ConnId,
        frame: Frame,
        attempt: u8,
    },
    /// Messages handed to the new primary (hand-over number).
    HandOver(u64),
    /// Primary after a pause: who is primary now? (Our epoch when we asked.)
    Fence { epoch: u64 },
}

/// Messages this node accepted as primary (or held for a previous life of its primary), on
/// their way to the node that is primary now, in their original order.
#[derive(Debug)]
pub(super) struct HandOver {
    msgs: Vec<Arc<Message>>,
    attempt: u32,
    acked: usize,
}

impl Broker {
    /// An outbound connection opened.
    pub(super) fn on_peer_connected(&mut self, conn: ConnId) {
        let Some(super::conn::Kind::Out(purpose)) = self.conns.get(&conn).map(|c| &c.kind) else {
            return;
        };
        let now = self.now.mono;
        match purpose {
            Purpose::Link => self.on_link_connected(conn),
            Purpose::Poll => self.poll_ask(conn),
            Purpose::Probe => self.ask(conn),
            Purpose::Forward { frame, .. } => {
                let f = frame.clone();
                self.send_frame(conn, &f);
                let t = self.cfg.forward_timeout;
                self.timers.set(Timer::Answer(conn), now + t);
            }
            Purpose::HandOver(id) => {
                let id = *id;
                if self.offer_auth(conn) {
                    // As the peer, so that a primary holding publishes (`settle.rs`) takes
                    // these first.
                    let t = self.cfg.forward_timeout;
                    self.timers.set(Timer::Answer(conn), now + t);
                } else {
                    self.send_hand_over(conn, id);
                }
            }
            Purpose::Fence { epoch } => {
                let epoch = *epoch;
                if self.offer_auth(conn) {
                    self.timers.set(Timer::Answer(conn), now + FENCE_TIMEOUT);
                } else {
                    self.fence_hello(conn, epoch);
                }
            }
        }
    }

    /// A paused primary asks its peer who is primary now, saying its own epoch.
    fn fence_hello(&mut self, conn: ConnId, epoch: u64) {
        let hello = Frame::Hello {
            version: PROTOCOL_VERSION.into(),
            incarnation: self.cfg.incarnation,
            role: Role::Primary,
            epoch,
        };
        self.send_frame(conn, &hello);
        let t = self.now.mono + FENCE_TIMEOUT;
        self.timers.set(Timer::Answer(conn), t);
    }

    /// The node at the other end of `conn` answered our handshake with something else. Only a
    /// primary started with `--seed-backup` takes a seed broker's answer to an unknown verb (an
    /// `ERR`, or the seed's bare `ACK`) for a seed backup; anything else, and anything at all
    /// on a paused primary's question, is a failed handshake: an answer from someone who did
    /// not prove the secret acts on nothing.
    fn unauthenticated_answer(&mut self, conn: ConnId, answer: Frame) {
        let is_link = matches!(
            self.conns.get(&conn).map(|c| &c.kind),
            Some(Kind::Out(Purpose::Link))
        );
        let seed_like = matches!(answer, Frame::Err { .. } | Frame::Ack { id: None });
        if is_link && self.cfg.seed_backup && seed_like {
            let peer = self.cfg.peer.clone().unwrap_or_default();
            warn!(
                "backup {peer} answered {} to the handshake: a seed backup \
                 (--seed-backup): using seed REPLICATE/CLEAR, unauthenticated",
                answer.encode().trim_end()
            );
            self.seed_link_up(conn);
            return;
        }
        let hint = if is_link && seed_like {
            " (a seed backup needs --seed-backup on this primary)"
        } else {
            ""
        };
        let why = format!(
            "{}: the peer answered {} instead of proving the secret{hint}",
            super::auth::AUTH_FAILED,
            answer.encode().trim_end()
        );
        self.auth_failed(conn, why);
    }

    /// The peer proved the secret on `conn`, which we opened: say what we opened it for.
    fn on_peer_authenticated(&mut self, conn: ConnId) {
        match self.conns.get(&conn).map(|c| &c.kind) {
            Some(Kind::Out(Purpose::Link)) => self.say_hello(conn),
            Some(Kind::Out(Purpose::Fence { epoch })) => {
                let epoch = *epoch;
                self.fence_hello(conn, epoch);
            }
            Some(Kind::Out(Purpose::HandOver(id))) => {
                let id = *id;
                self.send_hand_over(conn, id);
            }
            _ => {}
        }
    }

    /// A frame from the peer on a connection this node opened.
    pub(super) fn on_peer_frame(&mut self, conn: ConnId, frame: Frame) {
        if self.awaits_challenge(conn) {
            match self.on_challenge(conn, &frame) {
                Ok(true) => {
                    self.on_peer_authenticated(conn);
                    return;
                }
                Ok(false) => {
                    self.unauthenticated_answer(conn, frame);
                    return;
                }
                Err(why) => {
                    self.auth_failed(conn, why);
                    return;
                }
            }
        }
        let Some(super::conn::Kind::Out(purpose)) = self.conns.get(&conn).map(|c| &c.kind) else {
            return;
        };
        match purpose {
            Purpose::Link => self.on_link_frame(conn, frame),
            Purpose::Poll => self.on_poll_answer(conn, frame),
            Purpose::Probe => {
                let alive = self.answer_alive(&frame).unwrap_or(false);
                self.probe_done(alive);
            }
            Purpose::Forward { .. } => self.on_forward_answer(conn, frame),
            Purpose::HandOver(id) => {
                let id = *id;
                self.on_hand_over_answer(conn, id, frame);
            }
            Purpose::Fence { epoch } => {
                let epoch = *epoch;
                self.close(conn);
                let answer = match frame {
                    Frame::Hello { role, epoch, .. } => Some((role, epoch)),
                    _ => None,
                };
                self.fence_done(conn, answer, epoch);
            }
        }
    }

    /// An outbound connection failed (`reason`) or was closed by the peer. The connection is
    /// already forgotten.
    pub(super) fn on_peer_failed(&mut self, conn: ConnId, purpose: Purpose, reason: String) {
        match purpose {
            Purpose::Link => self.on_link_failed(conn, &reason),
            Purpose::Poll => self.poll_failed(conn, Evidence::Closed),
            Purpose::Probe => self.probe_done(false),
            Purpose::Forward {
                client,
                frame,
                attempt,
            } => self.forward_failed(client, frame, attempt, &reason),
            Purpose::HandOver(id) => self.hand_over_failed(id, &reason),
            Purpose::Fence { epoch } => self.fence_done(conn, None, epoch),
        }
    }

    /// An outbound connection did not answer in time.
    pub(super) fn on_answer_timeout(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let super::conn::Kind::Out(purpose) = &c.kind else {
            return;
        };
        if matches!(purpose, Purpose::Link) {
            self.on_link_silent(conn);
            return;
        }
        if matches!(purpose, Purpose::Poll) {
            self.poll_failed(conn, Evidence::Timeout);
            return;
        }
        let what = match purpose {
            Purpose::Forward { .. } => format!(
                "primary did not answer within {:?}",
                self.cfg.forward_timeout
            ),
            _ => "no answer in time".to_string(),
        };
        if let Some(c) = self.close(conn) {
            if let super::conn::Kind::Out(purpose) = c.kind {
                self.on_peer_failed(conn, purpose, what);
            }
        }
    }

    fn on_forward_answer(&mut self, conn: ConnId, answer: Frame) {
        let Some(c) = self.close(conn) else {
            return;
        };
        let super::conn::Kind::Out(Purpose::Forward {
            client,
            frame,
            attempt,
        }) = c.kind
        else {
            return;
        };
        match answer {
            ack @ Frame::Ack { .. } => self.finish_forward(client, ack),
            Frame::Err { reason }
                if reason.starts_with(super::STOPPING) && self.role() == Role::Backup =>
            {
                // The primary is draining: it will be gone in a moment, and this node takes
                // over; the publish waits for that (see `Backup::peer_stopping`).
                if let Some(b) = self.backup() {
                    if !b.peer_stopping {
                        info!("the primary is stopping: holding publishes until it is gone");
                    }
                    b.peer_stopping = true;
                }
                self.forwards_waiting.push((client, frame, attempt));
            }
            other => {
                let e = format!("primary answered {}", other.encode().trim_end());
                self.forward_failed(client, frame, attempt, &e);
            }
        }
    }

    /// Hands `msgs` to the peer, retrying for a few seconds; each must be acknowledged.
    pub(super) fn hand_over(&mut self, msgs: Vec<Arc<Message>>) {
        let id = self.next_handover;
        self.next_handover += 1;
        let h = HandOver {
            msgs,
            attempt: 1,
            acked: 0,
        };
        self.handovers.insert(id, h);
        self.retry_hand_over(id);
    }

    /// On a takeover: what this node was still handing to its peer (a cut tail, or what it held
    /// when it stepped down) is now this node's to deliver. Each message not in its log already
    /// (by identity) is appended, in the order it was to be handed over, before anything the
    /// new reign accepts: handed back later by the peer, it would come after the publishers'
    /// newer messages, out of their order.
    pub(super) fn take_back_hand_overs(&mut self) {
        let handovers = std::mem::take(&mut self.handovers);
        if handovers.is_empty() {
            return;
        }
        for id in handovers.keys() {
            self.timers.stop(Timer::HandOver(*id));
        }
        let msgs: Vec<Arc<Message>> = handovers.into_values().flat_map(|h| h.msgs).collect();
        let mut have: HashMap<String, HashSet<MsgId>> = HashMap::new();
        let mut taken = 0usize;
        for m in msgs {
            if !m.id.is_anonymous() {
                let ids = have
                    .entry(m.topic.clone())
                    .or_insert_with(|| self.recent_ids(&m.topic));
                if !ids.insert(m.id.clone()) {
                    continue;
                }
            }
            let entry = Entry {
                offset: self.log.next_offset(&m.topic),
                epoch: self.epoch,
                id: m.id.clone(),
                sent_us: m.sent_us,
                received_us: m.received_us,
                payload: m.payload.clone(),
            };
            if let Err(e) = self.append(&m.topic, &entry) {
                error!(
                    "topic '{}': cannot take back {}:{} from a hand-over: {e}",
                    m.topic, m.id.publisher, m.id.seq
                );
                continue;
            }
            if !m.id.is_anonymous() {
                self.seen.record(&m.id.publisher, m.id.seq);
            }
            // Behind the topic's backlog if it has one (the log's entries before it are
            // taken up a chunk at a time, `takeup.rs`), otherwise in flight at once; either
            // way taken up again, not fresh (a relay waits for subscribers to reconnect).
            let mid = self.take_mid();
            let msg = Arc::new(Message {
                mid,
                topic: m.topic.clone(),
                entry,
                quiet: false,
            });
            if !self.park(&msg) {
                self.enqueue(msg, false);
            }
            taken += 1;
        }
        info!("took back {taken} message(s) this node was handing to its peer");
    }

    /// On a takeover: publishes still on their way to the old primary are served here now, in
    /// the order they were forwarded, before anything newer from their publishers. Left to fail
    /// later (a primary out of reach answers only when the forward times out), each would be
    /// logged after the later messages its publisher sent here meanwhile.
    pub(super) fn serve_forwards_in_flight(&mut self) {
        let mut conns: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.kind, Kind::Out(Purpose::Forward { .. })))
            .map(|(id, _)| *id)
            .collect();
        conns.sort_unstable();
        for conn in conns {
            if let Some(Conn {
                kind: Kind::Out(Purpose::Forward { client, frame, .. }),
                ..
            }) = self.close(conn)
            {
                self.serve_here(client, frame);
            }
        }
    }

    /// Starts (another) attempt at hand-over `id`.
    pub(super) fn retry_hand_over(&mut self, id: u64) {
        let Some(peer) = self.cfg.peer.clone() else {
            return;
        };
        if let Some(h) = self.handovers.get_mut(&id) {
            h.acked = 0;
            let t = self.cfg.forward_timeout;
            self.open(Purpose::HandOver(id), peer, t);
        }
    }

    fn send_hand_over(&mut self, conn: ConnId, id: u64) {
        let Some(h) = self.handovers.get(&id) else {
            self.close(conn);
            return;
        };
        let mut line = String::new();
        for m in &h.msgs {
            let f = if m.quiet {
                Frame::Group(crate::protocol::GroupOp::Requeue {
                    topic: m.topic.clone(),
                    id: m.id.clone(),
                    sent_us: m.sent_us,
                    payload: m.payload.clone(),
                })
            } else if m.id.is_anonymous() {
                Frame::Publish {
                    topic: m.topic.clone(),
                    payload: m.payload.clone(),
                }
            } else {
                Frame::Pub {
                    topic: m.topic.clone(),
                    id: m.id.clone(),
                    sent_us: m.sent_us,
                    payload: m.payload.clone(),
                }
            };
            f.encode_into(&mut line);
        }
        self.out.push_back(super::Output::Send {
            conn,
            line: line.into_bytes().into(),
            delivery: false,
        });
        let t = self.cfg.forward_timeout;
        self.timers.set(Timer::Answer(conn), self.now.mono + t);
    }

    fn on_hand_over_answer(&mut self, conn: ConnId, id: u64, answer: Frame) {
        if !matches!(answer, Frame::Ack { .. }) {
            self.close(conn);
            let e = format!("answered {}", answer.encode().trim_end());
            self.hand_over_failed(id, &e);
            return;
        }
        let Some(h) = self.handovers.get_mut(&id) else {
            return;
        };
        h.acked += 1;
        if h.acked < h.msgs.len() {
            let t = self.cfg.forward_timeout;
            self.timers.set(Timer::Answer(conn), self.now.mono + t);
            return;
        }
        let n = h.msgs.len();
        self.handovers.remove(&id);
        self.close(conn);
        let peer = self.cfg.peer.clone().unwrap_or_default();
        info!("handed {n} message(s) over to the new primary {peer}");
        self.after_hand_overs();
    }

    fn hand_over_failed(&mut self, id: u64, e: &str) {
        let peer = self.cfg.peer.clone().unwrap_or_default();
        let Some(h) = self.handovers.get_mut(&id) else {
            return;
        };
        warn!(
            "handing messages over to {peer} failed (attempt {}): {e}",
            h.attempt
        );
        if h.attempt < HAND_OVER_ATTEMPTS {
            h.attempt += 1;
            let at = self.now.mono + HAND_OVER_RETRY;
            self.timers.set(Timer::HandOver(id), at);
        } else {
            let n = h.msgs.len();
            self.handovers.remove(&id);
            error!("could not hand {n} message(s) over to {peer}: they are lost unless their publishers resend them");
            self.after_hand_overs();
        }
    }

    /// After a pause: a newer primary on the peer means step down; a backup there (or no
    /// answer: running degraded) means we are still primary, so deliver what was held.
    ///
    /// Only the check this reign asked for counts: one left over from an earlier reign (the
    /// node stepped down and took over again meanwhile) is ignored.
    fn fence_done(&mut self, conn: ConnId, answer: Option<(Role, u64)>, epoch: u64) {
        if self.primary().is_none_or(|p| p.fence != Some(conn)) {
            return;
        }
        if let Some(p) = self.primary() {
            p.fence = None;
        }
        match answer {
            Some((Role::Primary, e)) if e > epoch => {
                self.step_down(e, "the peer is primary in a newer epoch");
            }
            other => {
                let said = match other {
                    Some((r, _)) => format!("is {}", r.as_str()),
                    None => "does not answer".to_string(),
                };
                self.unfence(&said);
            }
        }
    }
}
