//! The optional lease (`--lease`): two reigns that never overlap, at a price.
//!
//! Without it the pair chooses availability: a backup that stops hearing from its primary takes
//! over, and a primary cut off from its backup goes on serving, so for a while both deliver (the
//! simulation counts such overlapping reigns). With a lease:
//!
//! * a **primary** acknowledges and delivers only while it holds a lease: it asks its backup
//!   (`STATUS` on the replication link) every quarter lease, and an answer to a question asked at
//!   `t` grants the lease until `t + lease`. A refused connection to the peer's port grants it
//!   too (no process listens there, so none can take over; a backup that starts waits a lease
//!   first). When the lease runs out, results and `ACK`s wait until it is granted again;
//! * a **backup** takes over only once a lease has passed since it last granted one (answered
//!   the question), so by then the primary has stopped on its own. The primary counts from when
//!   it *asked*, the backup from when it *answered*, which is later: the primary's lease always
//!   ends first (for clocks that run at the same rate). Once the backup has decided to take
//!   over it answers no more questions, so a primary that still reaches it (a link too slow to
//!   renew the lease in time, a one-way partition) cannot keep both nodes from serving.
//!
//! The price: every failover takes at least the lease, and a primary whose backup is unreachable
//! (a partition, a hung backup, a proxy that accepts for a dead node) stops serving.

use tracing::{info, warn};

/// How a backup that is about to take over answers its primary's lease question (`ERR|…`).
pub(super) const LEASE_REFUSED: &str = "lease refused";

use super::time::{Time, Timer};
use super::{Broker, RoleState};
use crate::protocol::Frame;

impl Broker {
    /// Whether this node may acknowledge and deliver now, as far as the lease goes.
    pub(super) fn lease_held(&self) -> bool {
        match (self.cfg.lease, &self.role) {
            (Some(_), RoleState::Primary(p)) if self.cfg.peer.is_some() => {
                p.lease_until > self.now.mono
            }
            _ => true,
        }
    }

    /// The lease timer: a primary asks for its lease again; a backup that waited the lease out
    /// takes over, unless its primary answered a poll meanwhile.
    pub(super) fn on_lease_timer(&mut self) {
        let Some(lease) = self.cfg.lease else {
            return;
        };
        let now = self.now.mono;
        match &mut self.role {
            RoleState::Primary(p) => {
                self.timers.set(Timer::Lease, now + lease / 4);
                if let Some((conn, false)) = p.link.up() {
                    p.lease_asks.push_back(now);
                    self.send_frame(conn, &Frame::StatusQuery);
                }
            }
            RoleState::Backup(b) => {
                let free_at = b.last_grant + lease;
                if free_at > now {
                    if b.pending_takeover.is_some() {
                        self.timers.set(Timer::Lease, free_at);
                    }
                    return;
                }
                if let Some(why) = b.pending_takeover.take() {
                    self.take_over(&format!("{why}, and the primary's lease ran out"));
                }
            }
        }
    }

    /// Primary: the backup answered the lease question asked first (on the link).
    pub(super) fn lease_answered(&mut self) {
        let asked = self.primary().and_then(|p| p.lease_asks.pop_front());
        if let Some(asked) = asked {
            self.lease_granted(asked);
        }
    }

    /// Primary: the lease holds until `asked + lease`. What waited for it goes now.
    pub(super) fn lease_granted(&mut self, asked: Time) {
        let Some(lease) = self.cfg.lease else {
            return;
        };
        let now = self.now.mono;
        let Some(p) = self.primary() else {
            return;
        };
        let was_held = p.lease_until > now;
        p.lease_until = p.lease_until.max(asked + lease);
        if was_held || p.lease_until <= now {
            return;
        }
        if p.lease_lapsed {
            info!("lease granted again: acknowledging and delivering");
            p.lease_lapsed = false;
        }
        if !p.suspect {
            let held = std::mem::take(&mut p.fenced);
            for (m, stamps) in held {
                self.release(m, stamps);
            }
        }
        self.release_ready_acks();
    }

    /// Primary: the lease ran out while there was something to deliver or acknowledge.
    pub(super) fn note_lease_lapsed(&mut self) {
        if let Some(p) = self.primary() {
            if !p.lease_lapsed {
                p.lease_lapsed = true;
                warn!("lease not granted by the backup in time: holding results and ACKs");
            }
        }
    }

    /// Backup: the primary answered a poll or a probe in time, so a takeover decided while its
    /// lease ran is called off. (Frames on the replication link do not count: a primary on a
    /// link too slow to renew its lease keeps sending them, and would keep both nodes from
    /// serving.)
    pub(super) fn primary_answers(&mut self) {
        let now = self.now.mono;
        if let RoleState::Backup(b) = &mut self.role {
            if b.pending_takeover.take().is_some() {
                info!("the primary answers again while its lease ran: not taking over");
                b.detector.call_off(now);
                self.rearm_ping();
                // What waited for the takeover goes to the primary after all.
                self.after_hand_overs();
            }
        }
    }

    /// Backup: the primary asks for its lease (`STATUS` on the link). Granted, and counted from
    /// now, unless a takeover is pending: then the answer is `ERR|lease refused…`, so the lease runs
    /// out at the latest a lease after the last grant, when this node takes over. Any other
    /// node answers as usual.
    pub(super) fn grant_lease(&mut self) -> bool {
        let now = self.now.mono;
        match &mut self.role {
            RoleState::Backup(b) if b.pending_takeover.is_some() => false,
            RoleState::Backup(b) => {
                b.last_grant = now;
                true
            }
            RoleState::Primary(_) => true,
        }
    }

    /// Backup: takes over now if no lease can still be running, or once it has run out; true
    /// if it took over now.
    pub(super) fn take_over_when_free(&mut self, why: &str) -> bool {
        let now = self.now.mono;
        let (lease, RoleState::Backup(b)) = (self.cfg.lease, &mut self.role) else {
            return false;
        };
        let Some(lease) = lease else {
            self.take_over(why);
            return true;
        };
        let free_at = b.last_grant + lease;
        if free_at <= now {
            self.take_over(why);
            return true;
        }
        if b.pending_takeover.is_none() {
            info!(
                "{why}: taking over once the primary's lease has run out, in {:?}",
                free_at - now
            );
            b.pending_takeover = Some(why.to_string());
        }
        self.timers.set(Timer::Lease, free_at);
        false
    }
}
