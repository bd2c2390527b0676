//! The backup's work: hold what the primary replicates, poll the primary, and decide, with the
//! failure detector, when to take over; forward publishes that reach it while the primary lives.

use foldhash::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::conn::{Kind, Reply};
use super::failover::{outranks, Detector, Evidence, Verdict};
use super::peer::Purpose;
use super::time::{Time, Timer};
use super::{Broker, ConnId, Message, RoleState};
use crate::protocol::{Frame, Role, PROTOCOL_VERSION};

/// State only a backup has.
#[derive(Debug)]
pub(super) struct Backup {
    pub detector: Detector,
    /// Replication links from the primary, closed at takeover so that a primary that was
    /// merely paused learns at once, when it wakes, that it lost its role.
    pub link_conns: Vec<ConnId>,
    /// The kept-open polling connection.
    poll: Poll,
    /// A probe in flight, and what waits for its verdict.
    pub probe: Option<Probe>,
    logged_waiting: bool,
    /// The primary answered a forwarded publish `ERR|stopping` (a clean stop, `stop.rs`):
    /// publishes wait here until it is gone and this node takes over, rather than bounce
    /// between the two nodes and come back out of their publishers' order.
    pub peer_stopping: bool,
    /// When this backup last granted its primary the lease (answered its question on the link,
    /// or started): with `--lease`, no takeover before a lease after it.
    pub last_grant: Time,
    /// A takeover decided while the primary's lease may still run (why).
    pub pending_takeover: Option<String>,
    /// The link whose catch-up ended with each topic's `MARK`, and where each topic's log ended
    /// then: below it, our log is the primary's, so a `REPL` of an entry there on that link (a
    /// message in flight sent again at link-up, an entry of the log taken up again) is one we
    /// have, stored without reading it back.
    pub caught_up: Option<(ConnId, HashMap<String, u64>)>,
    /// When the `PING` in flight on the polling connection was sent.
    asked_at: Time,
    /// When the primary last sent something on its replication link into us.
    pub heard_at: Time,
}

/// The polling connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Poll {
    Idle,
    Connecting(ConnId),
    Open(ConnId),
    Asking(ConnId),
}

/// A fresh connection that asks the primary whether it lives; decisions wait for it, one at a
/// time, so that a burst of publishes probes once.
#[derive(Debug)]
pub(super) struct Probe {
    pub conn: ConnId,
    /// What made us probe.
    cause: Evidence,
    /// Publishes (connection, frame, attempt) to forward, or serve, once the verdict is in.
    pub publishes: Vec<(ConnId, Frame, u8)>,
    /// Evidence that came in meanwhile, decided on after the verdict.
    queued: Vec<Evidence>,
}

impl Backup {
    /// A backup whose detector sends its first `PING` at `now`.
    pub fn new(interval: Duration, now: Time) -> Backup {
        Backup {
            detector: Detector::new(interval, now),
            link_conns: Vec::new(),
            poll: Poll::Idle,
            probe: None,
            logged_waiting: false,
            peer_stopping: false,
            last_grant: now,
            pending_takeover: None,
            caught_up: None,
            asked_at: now,
            heard_at: now,
        }
    }

    /// A primary that steps down becomes a backup that knows its primary is alive.
    pub fn stepped_down(interval: Duration, now: Time) -> Backup {
        let mut b = Backup::new(interval, now);
        b.detector.on_pong();
        b
    }

    /// The connections this backup opened (closed when it takes over).
    pub fn own_conns(&self) -> Vec<ConnId> {
        let poll = match self.poll {
            Poll::Connecting(c) | Poll::Open(c) | Poll::Asking(c) => Some(c),
            Poll::Idle => None,
        };
        poll.into_iter()
            .chain(self.probe.as_ref().map(|p| p.conn))
            .collect()
    }
}

impl Broker {
    pub(super) fn backup(&mut self) -> Option<&mut Backup> {
        match &mut self.role {
            RoleState::Backup(b) => Some(b),
            RoleState::Primary(_) => None,
        }
    }

    /// `HELLO` from a peer: a primary of a newer epoch makes a primary step down; a backup
    /// follows the primary that says it. Answered with our own `HELLO`.
    pub(super) fn on_hello(
        &mut self,
        conn: ConnId,
        version: &str,
        role: Role,
        epoch: u64,
        incarnation: u64,
    ) {
        info!("peer says hello: {version} {} epoch {epoch}", role.as_str());
        let born_primary = self.cfg.born == Role::Primary;
        if role == Role::Primary {
            if self.role() == Role::Primary
                && super::failover::yields_to(self.epoch, born_primary, epoch)
            {
                self.step_down(
                    epoch,
                    "a primary of a newer (or equal, born-primary) epoch says hello",
                );
            }
            if self.role() == Role::Backup {
                self.follow(conn, epoch, incarnation);
            }
        }
        let hello = Frame::Hello {
            version: PROTOCOL_VERSION.into(),
            incarnation: self.cfg.incarnation,
            role: self.role(),
            epoch: self.epoch,
        };
        self.reply(conn, hello);
        if role == Role::Primary && self.role() == Role::Backup {
            self.send_tails(conn);
        }
    }

    /// Our primary opened its replication link on `conn`.
    fn follow(&mut self, conn: ConnId, epoch: u64, incarnation: u64) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.kind = Kind::InLink;
        }
        self.peer_speaks_status = true;
        // Follow the primary's epoch, so that our own takeover, if it comes, starts a newer
        // one than any it has seen (a restarted node starts at 1).
        self.epoch = self.epoch.max(epoch);
        self.save_epoch();
        let following = self.following;
        self.following = incarnation;
        let now = self.now.mono;
        let Some(b) = self.backup() else {
            return;
        };
        // A primary that opens its replication link is alive: as good as a PONG.
        b.heard_at = now;
        if !b.detector.is_armed() {
            info!("primary says hello: following it");
        }
        b.detector.on_pong();
        b.link_conns.push(conn);
        if following == incarnation {
            return;
        }
        // A new life of the primary is not the one that was stopping.
        b.peer_stopping = false;
        // A new life of our primary: what we hold from its previous life it may no longer know
        // about (its log may have been in memory). Hand it over rather than keep it forever:
        // it drops, by identity, what it still has.
        if following == 0 {
            return;
        }
        let orphans: Vec<Arc<Message>> = self
            .held_entries()
            .into_iter()
            .map(|(topic, entry)| {
                Arc::new(Message {
                    mid: 0,
                    topic,
                    entry: Arc::unwrap_or_clone(entry),
                    quiet: false,
                })
            })
            .collect();
        if !orphans.is_empty() {
            warn!(
                "primary restarted: handing {} message(s) it replicated before to its new life",
                orphans.len()
            );
            self.hand_over(orphans);
        }
    }

    /// A publish reached this backup. Either the primary is alive (forward the message to it
    /// and relay its answer) or it is not (take over and serve it). The connection's later
    /// frames wait until this one is answered.
    pub(super) fn publish_at_backup(&mut self, conn: ConnId, frame: Frame) {
        if self.cfg.peer.is_none() {
            let reason = "backup has no primary to forward to".into();
            self.reply(conn, Frame::Err { reason });
            return;
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.busy = true;
            c.replies.push_back(Reply::Forward);
        }
        self.decide_publish(conn, frame, 0);
    }

    /// The hand-overs ended: forward (or serve, if this node took over meanwhile) what waited.
    pub(super) fn after_hand_overs(&mut self) {
        if !self.handovers.is_empty() {
            return;
        }
        self.answer_settle();
        for (conn, frame, attempt) in std::mem::take(&mut self.forwards_waiting) {
            if self.role() == Role::Primary {
                self.serve_here(conn, frame);
            } else {
                self.forward(conn, frame, attempt);
            }
        }
    }

    /// Decides what to do with a publish at this backup (attempt `attempt`).
    pub(super) fn decide_publish(&mut self, conn: ConnId, frame: Frame, attempt: u8) {
        let Some(b) = self.backup() else {
            self.serve_here(conn, frame);
            return;
        };
        if let Some(p) = &mut b.probe {
            p.publishes.push((conn, frame, attempt));
            return;
        }
        if b.pending_takeover.is_some() {
            // Served once the primary's lease has run out and this node took over (or
            // forwarded, if the primary answers first), in the order they came: refused now,
            // a publish would leave a hole that the publisher's next message overtakes.
            self.forwards_waiting.push((conn, frame, attempt));
            return;
        }
        match b.detector.on_evidence(Evidence::Publish) {
            Verdict::Probe => self.start_probe(Evidence::Publish, vec![(conn, frame, attempt)]),
            Verdict::TakeOver => {
                if self.take_over_when_free("a publish arrived and the primary does not answer") {
                    self.serve_here(conn, frame);
                } else {
                    self.forwards_waiting.push((conn, frame, attempt));
                }
            }
            Verdict::Wait => self.forward(conn, frame, attempt),
        }
    }

    /// Sends a publish to the primary on a fresh connection. While messages this node
    /// accepted as primary are being handed over, it waits for them: they are older than
    /// anything their publishers sent since, and the primary logs in arrival order.
    fn forward(&mut self, client: ConnId, frame: Frame, attempt: u8) {
        let stopping = self.backup().is_some_and(|b| b.peer_stopping);
        if stopping || !self.handovers.is_empty() {
            self.forwards_waiting.push((client, frame, attempt));
            return;
        }
        let Some(peer) = self.cfg.peer.clone() else {
            return;
        };
        let t = self.cfg.forward_timeout;
        self.open(
            Purpose::Forward {
                client,
                frame,
                attempt,
            },
            peer,
            t,
        );
    }

    /// A forward failed: try once more (a fresh decision), then tell the client to retry.
    pub(super) fn forward_failed(&mut self, client: ConnId, frame: Frame, attempt: u8, e: &str) {
        warn!("forwarding a publish to the primary failed: {e}");
        if self.role() == Role::Primary {
            // We took over while it was out: serve it here.
            self.serve_here(client, frame);
        } else if attempt == 0 {
            self.decide_publish(client, frame, 1);
        } else {
            let reason = "primary alive but not accepting; retry".into();
            self.finish_forward(client, Frame::Err { reason });
        }
    }

    /// Serves a publish that waited for a forward here, as the primary this node now is.
    pub(super) fn serve_here(&mut self, conn: ConnId, frame: Frame) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.replies.retain(|r| !matches!(r, Reply::Forward));
        }
        self.accept_publish(conn, frame);
        self.resume(conn);
    }

    /// Something suggests the primary is gone: consult the detector.
    pub(super) fn decide(&mut self, e: Evidence) {
        let Some(b) = self.backup() else {
            return;
        };
        if let Some(p) = &mut b.probe {
            p.queued.push(e);
            return;
        }
        match b.detector.on_evidence(e) {
            Verdict::Probe => self.start_probe(e, Vec::new()),
            Verdict::TakeOver => {
                let why = self.why(e);
                self.take_over_when_free(&why);
            }
            Verdict::Wait => {
                if !b.detector.is_armed() && !b.logged_waiting {
                    b.logged_waiting = true;
                    let primary = self.cfg.peer.clone().unwrap_or_default();
                    info!("waiting for primary {primary} to come up");
                }
            }
        }
    }

    fn why(&self, e: Evidence) -> String {
        match e {
            Evidence::Timeout => format!(
                "primary did not answer PING within {:?}",
                self.cfg.ping_timeout
            ),
            Evidence::NoPrimary => "the peer is a backup too and we outrank it".into(),
            Evidence::Publish => "a publish arrived and the primary does not answer".into(),
            Evidence::Closed => "primary connection closed and probe failed".into(),
        }
    }

    fn start_probe(&mut self, cause: Evidence, publishes: Vec<(ConnId, Frame, u8)>) {
        let Some(peer) = self.cfg.peer.clone() else {
            return;
        };
        if cause == Evidence::Closed {
            info!("primary link closed or refused: probing {peer}");
        }
        let t = self.cfg.ping_timeout;
        let conn = self.open(Purpose::Probe, peer, t);
        // The whole probe, connect and answer, must fit in the ping timeout.
        self.timers.set(Timer::Answer(conn), self.now.mono + t);
        if let Some(b) = self.backup() {
            b.probe = Some(Probe {
                conn,
                cause,
                publishes,
                queued: Vec::new(),
            });
        }
    }

    /// The question a backup asks its primary: `STATUS` to a peer of ours (we then also learn
    /// whether it is primary), `PING` to a seed primary.
    pub(super) fn ask(&mut self, conn: ConnId) {
        let q = if self.peer_speaks_status {
            Frame::StatusQuery
        } else {
            Frame::Ping
        };
        self.send_frame(conn, &q);
    }

    /// Whether an answer to [`Broker::ask`] shows a live primary: `PONG`, or a `STATUS` that is
    /// not a backup this node outranks (then nobody serves, and this node must take over).
    pub(super) fn answer_alive(&self, answer: &Frame) -> Option<bool> {
        match answer {
            Frame::Pong => Some(true),
            Frame::Status {
                role: Role::Backup,
                epoch,
                ..
            } => {
                let born_primary = self.cfg.born == Role::Primary;
                let nobody = outranks(self.epoch, born_primary, *epoch);
                if nobody {
                    warn!(
                        "the peer is a backup too (epoch {epoch}, ours {}): nobody serves",
                        self.epoch
                    );
                }
                Some(!nobody)
            }
            Frame::Status { .. } => Some(true),
            _ => None,
        }
    }

    /// The probe's verdict: alive or not. Then what waited for it.
    pub(super) fn probe_done(&mut self, alive: bool) {
        let Some(b) = self.backup() else {
            return;
        };
        let Some(probe) = b.probe.take() else {
            return;
        };
        let verdict = b.detector.on_probe(alive);
        self.close(probe.conn);
        if alive {
            self.primary_answers();
        }
        if verdict == Verdict::TakeOver {
            let why = self.why(probe.cause);
            self.take_over_when_free(&why);
        }
        let pending = self.backup().is_some_and(|b| b.pending_takeover.is_some());
        for (conn, frame, attempt) in probe.publishes {
            if self.role() == Role::Primary {
                self.serve_here(conn, frame);
            } else if pending {
                self.forwards_waiting.push((conn, frame, attempt));
            } else {
                self.forward(conn, frame, attempt);
            }
        }
        for e in probe.queued {
            self.decide(e);
        }
    }

    /// The next poll of the primary is due.
    pub(super) fn on_ping_due(&mut self) {
        let now = self.now.mono;
        let t = self.cfg.ping_timeout;
        let Some(peer) = self.cfg.peer.clone() else {
            return;
        };
        let Some(b) = self.backup() else {
            return;
        };
        b.detector.on_ping_sent(now);
        match b.poll {
            Poll::Idle => {
                let conn = self.open(Purpose::Poll, peer, t);
                if let Some(b) = self.backup() {
                    b.poll = Poll::Connecting(conn);
                }
            }
            Poll::Open(conn) => self.poll_ask(conn),
            Poll::Connecting(_) | Poll::Asking(_) => {}
        }
    }

    /// Asks the question on the polling connection.
    pub(super) fn poll_ask(&mut self, conn: ConnId) {
        let now = self.now.mono;
        let deadline = now + self.cfg.ping_timeout;
        if let Some(b) = self.backup() {
            b.poll = Poll::Asking(conn);
            b.asked_at = now;
        }
        self.ask(conn);
        self.timers.set(Timer::Answer(conn), deadline);
    }

    /// The polling connection's answer.
    pub(super) fn on_poll_answer(&mut self, conn: ConnId, answer: Frame) {
        match self.answer_alive(&answer) {
            Some(true) => {
                self.primary_answers();
                self.timers.stop(Timer::Answer(conn));
                let primary = self.cfg.peer.clone().unwrap_or_default();
                if let Some(b) = self.backup() {
                    b.poll = Poll::Open(conn);
                    if !b.detector.is_armed() {
                        info!("primary {primary} answers: following it");
                    }
                    b.detector.on_pong();
                    b.logged_waiting = false;
                }
                self.rearm_ping();
            }
            Some(false) => self.poll_failed(conn, Evidence::NoPrimary),
            None => self.poll_failed(conn, Evidence::Closed),
        }
    }

    /// The poll failed with evidence `e` (the connection is dropped and remade next time).
    pub(super) fn poll_failed(&mut self, conn: ConnId, e: Evidence) {
        self.close(conn);
        let Some(b) = self.backup() else {
            return;
        };
        let idle_between_pings = b.poll == Poll::Open(conn);
        // A `PING` unanswered while the primary went on sending on its link (the polling
        // connection died in a partition that has healed since): no hang. Ask again at once,
        // on a fresh connection.
        let spoke_since = e == Evidence::Timeout && b.heard_at > b.asked_at;
        b.poll = Poll::Idle;
        if spoke_since {
            let now = self.now.mono;
            info!("a PING went unanswered, yet the primary spoke on its link since: asking again");
            self.timers.set(Timer::Ping, now);
            return;
        }
        self.rearm_ping();
        // A kept-open connection that closes between pings says nothing yet: the next ping
        // reconnects and finds out.
        if !idle_between_pings {
            self.decide(e);
        }
    }

    pub(super) fn rearm_ping(&mut self) {
        if let Some(at) = self.backup().and_then(|b| b.detector.next_ping()) {
            self.timers.set(Timer::Ping, at);
        }
    }

    /// The primary's replication link into this backup closed: probe it at once.
    pub(super) fn on_in_link_closed(&mut self, conn: ConnId) {
        info!("replication link from the primary closed");
        if let Some(b) = self.backup() {
            b.link_conns.retain(|c| *c != conn);
            self.decide(Evidence::Closed);
        }
    }
}
