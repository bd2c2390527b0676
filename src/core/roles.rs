//! Role changes. Each is one function that only changes state and queues outputs.

use tracing::{info, warn};

use super::backup::Backup;
use super::failover::next_epoch;
use super::link::LinkState;
use super::primary::Primary;
use super::time::Timer;
use super::{Broker, RoleState};
use crate::protocol::Role;

impl Broker {
    /// Becomes the primary: a new epoch of our own, then every held message replayed in its
    /// original order through the compute stage and on to subscribers.
    pub(super) fn take_over(&mut self, why: &str) {
        if self.role() != Role::Backup {
            return;
        }
        let now = self.now.mono;
        let primary = Primary::new(self.cfg.peer.is_some(), now);
        let RoleState::Backup(b) = std::mem::replace(&mut self.role, RoleState::Primary(primary))
        else {
            return;
        };
        self.epoch = next_epoch(self.epoch, self.cfg.born == Role::Primary);
        self.save_epoch();
        self.counters.takeovers += 1;
        self.timers.stop(Timer::Ping);
        warn!(
            "TAKEOVER: {why}; now primary in epoch {}, replaying {} held message(s) in order",
            self.epoch,
            self.held_count()
        );
        for conn in b.own_conns() {
            self.close(conn);
        }
        // Ours to deliver now: a resend of what the log holds (or a hand-over of it coming
        // back) is no new message. (A node that stepped down forgot the identities it had
        // accepted.)
        for t in self.log.topics() {
            self.relearn_seen(&t.topic, t.first, t.next);
        }
        // A chunk now, the rest as deliveries go (`takeup.rs`).
        let cleared = std::mem::take(&mut self.cleared);
        self.begin_take_up(cleared);
        // Ours is the newest journal there is now.
        self.groups.hold = false;
        self.groups_take_over();
        self.synced_mid = self.next_mid - 1;
        self.written_mid = self.synced_mid;
        self.take_back_hand_overs();
        self.settle_asked = None;
        self.serve_forwards_in_flight();
        for conn in b.link_conns {
            self.close(conn);
        }
        if let Some(probe) = b.probe {
            for (conn, frame, _) in probe.publishes {
                self.decide_publish(conn, frame, 0);
            }
        }
        for (conn, frame, _) in std::mem::take(&mut self.forwards_waiting) {
            self.serve_here(conn, frame);
        }
        if self.cfg.lease.is_some() {
            self.timers.set(Timer::Lease, now);
        }
        match self.cfg.peer.clone() {
            Some(peer) => {
                warn!("running degraded until {peer} comes back as our backup");
                self.connect_link();
            }
            None => warn!("running degraded: no backup after takeover"),
        }
    }

    /// Gives up the primary role to a node of a newer epoch and becomes its backup. Messages
    /// accepted here and not yet delivered are handed to the new primary, which drops those it
    /// already holds (by identity): a message this node acknowledged while it ran degraded (in
    /// a partition, say) is thus not lost when it steps down.
    pub(super) fn step_down(&mut self, epoch: u64, why: &str) {
        if self.role() != Role::Primary {
            return;
        }
        let now = self.now.mono;
        let backup = Backup::stepped_down(self.cfg.ping_interval, now);
        let RoleState::Primary(p) = std::mem::replace(&mut self.role, RoleState::Backup(backup))
        else {
            return;
        };
        warn!(
            "STEP DOWN: {why}; epoch {} → {epoch}, now backup; handing {} undelivered message(s) to the new primary",
            self.epoch,
            p.in_flight()
        );
        self.epoch = self.epoch.max(epoch);
        self.save_epoch();
        self.timers.stop(Timer::Settle);
        let settle_waiting = p.settle.map(|s| s.waiting).unwrap_or_default();
        self.release_acks(p.acks, false);
        self.groups_step_down();
        // Forget which identities we accepted: the undelivered ones are about to come back to
        // us as forwarded publishes if the peer steps down in turn, and must not be taken for
        // resends. As a backup we relearn identities from what the new primary replicates.
        self.seen.clear();
        self.timers.stop(Timer::Link);
        if let LinkState::Connecting(c)
        | LinkState::Hello(c)
        | LinkState::Tails(c)
        | LinkState::CatchUp(c)
        | LinkState::Up { conn: c, .. } = p.link.state
        {
            self.close(c);
        }
        // What was in flight, and what of the log was not taken up yet, each topic in offset
        // order (a message parked behind a backlog has an older `mid` than the backlog's rest).
        let mut undelivered = self.untaken_entries(&p.backlogs);
        undelivered.extend(p.inflight.into_values());
        undelivered.sort_by(|a, b| a.topic.cmp(&b.topic).then(a.offset.cmp(&b.offset)));
        if self.cfg.peer.is_some() {
            if !undelivered.is_empty() {
                self.hand_over(undelivered);
            }
            self.timers.set(Timer::Ping, now);
        }
        // Publishes held for the reconciliation go to the new primary, in their order.
        self.resume_settled(settle_waiting);
    }

    /// The peer confirmed (or could not deny) that we are still primary after a pause: deliver
    /// and acknowledge what was held back meanwhile.
    pub(super) fn unfence(&mut self, peer_said: &str) {
        let RoleState::Primary(p) = &mut self.role else {
            return;
        };
        info!(
            "the peer {peer_said}: still primary, delivering {} held result(s)",
            p.fenced.len()
        );
        p.suspect = false;
        for (m, stamps) in std::mem::take(&mut p.fenced) {
            self.release(m, stamps);
        }
        self.release_stored();
        self.release_ready_acks();
    }
}
