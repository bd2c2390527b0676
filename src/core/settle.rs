//! A primary that may lack entries its backup has holds fresh publishes until the two logs are
//! reconciled, so that what the backup hands over comes first in the log, in its order.
//!
//! Two moments call for it:
//! - **A restart on a log.** Both nodes lost power; the other one may have reigned last and
//!   acknowledged entries that never reached this node. Until the link is up (or
//!   [`SETTLE_GRACE`] passes: the peer is gone, run degraded), a publish waits.
//! - **A catch-up that finds the backup's log going further than ours** (a reign or a degraded
//!   run we never saw). The backup cuts that tail at the `MARK`s and hands its undelivered
//!   entries to us over connections of its own; after the `MARK`s we send `SETTLE`, and it
//!   answers `SETTLED` once those hand-overs are done. Until then (or [`SETTLE_TIMEOUT`]), a
//!   publish waits.
//!
//! Without the hold, a publisher's resends taken in that window are logged ahead of the older
//! entries handed over after them: a subscriber gets the topic out of publish order.
//!
//! A held publish makes its connection busy, so its later frames wait behind it and every
//! answer keeps its order. The peer's own connections (authenticated: its hand-overs) are not
//! held; a backup's forwards of its clients' publishes are.

use std::time::Duration;

use tracing::{info, warn};

use super::link::LinkState;
use super::time::{Time, Timer};
use super::{Broker, ConnId, RoleState};
use crate::protocol::Frame;

/// How long a primary restarted on a log waits for its backup before it takes publishes
/// without it.
pub(super) const SETTLE_GRACE: Duration = Duration::from_secs(1);

/// How long a primary waits for its backup's `SETTLED` (and how much longer each time a
/// catch-up is still sending).
pub(super) const SETTLE_TIMEOUT: Duration = Duration::from_secs(1);

/// Fresh publishes are being held.
#[derive(Debug, Default)]
pub(super) struct Settle {
    /// Held until then at the latest.
    pub until: Time,
    /// Connections with a held publish, in the order they were held.
    pub waiting: Vec<ConnId>,
    /// The catch-up found the backup's log going past ours: `SETTLE` follows the `MARK`s.
    pub expect_hand_over: bool,
}

impl Broker {
    /// At start: a primary with a backup, on a log with entries, waits for it first.
    pub(super) fn settle_at_start(&mut self) {
        let Some(peer) = self.cfg.peer.clone() else {
            return;
        };
        let primary = matches!(self.role, RoleState::Primary(_));
        if !primary || self.cfg.seed_backup || !self.log.topics().iter().any(|t| t.next > 0) {
            return;
        }
        info!(
            "restarted on a log: publishes wait until the backup {peer} is caught up (at most {SETTLE_GRACE:?}); it may hold entries this node never got"
        );
        self.settle_until(SETTLE_GRACE);
    }

    /// Holds fresh publishes for `d` from now at least.
    fn settle_until(&mut self, d: Duration) {
        let until = self.now.mono + d;
        let Some(p) = self.primary() else {
            return;
        };
        let s = p.settle.get_or_insert_with(Settle::default);
        s.until = s.until.max(until);
        let at = s.until;
        self.timers.set(Timer::Settle, at);
    }

    /// The catch-up begins: `ahead` when the backup's log goes past ours (or apart from it) on
    /// some topic, and what it cuts will be handed over; otherwise it has nothing we lack, and
    /// publishes taken from now on follow our log to it with the rest of the catch-up.
    pub(super) fn settle_catch_up(&mut self, ahead: bool) {
        if !ahead {
            self.settle_end("the backup's log goes no further than ours");
            return;
        }
        self.settle_until(SETTLE_TIMEOUT);
        if let Some(s) = self.primary().and_then(|p| p.settle.as_mut()) {
            s.expect_hand_over = true;
        }
    }

    /// A publish on `conn` while publishes are held: kept, with the connection's later frames
    /// behind it. Returns false (handle it now) when nothing is held or it is the peer's.
    pub(super) fn settle_holds(&mut self, conn: ConnId, frame: &Frame) -> bool {
        let held = self.primary().is_some_and(|p| p.settle.is_some());
        if !held || self.is_peer(conn) {
            return false;
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.busy = true;
        }
        self.hold_back(conn, Ok(frame.clone()));
        if let Some(s) = self.primary().and_then(|p| p.settle.as_mut()) {
            if !s.waiting.contains(&conn) {
                s.waiting.push(conn);
            }
        }
        true
    }

    /// The link is up after its catch-up (or a seed backup's, which has no log to compare): ask
    /// the backup to settle, or stop holding.
    pub(super) fn settle_link_up(&mut self, conn: ConnId) {
        let expect = match self.primary().and_then(|p| p.settle.as_ref()) {
            None => return,
            Some(s) => s.expect_hand_over,
        };
        if expect {
            self.send_frame(conn, &Frame::Settle);
            self.settle_until(SETTLE_TIMEOUT);
        } else {
            self.settle_end("the backup is caught up");
        }
    }

    /// The hold's deadline came: a catch-up still sending gets more time; otherwise publishes
    /// go on without the backup's word.
    pub(super) fn on_settle_timer(&mut self) {
        let now = self.now.mono;
        let Some(p) = self.primary() else {
            return;
        };
        let Some(s) = &p.settle else {
            return;
        };
        if now < s.until {
            let at = s.until;
            self.timers.set(Timer::Settle, at);
            return;
        }
        if s.expect_hand_over && matches!(p.link.state, LinkState::CatchUp(_)) {
            self.settle_until(SETTLE_TIMEOUT);
            return;
        }
        warn!("the backup did not settle in time: taking publishes without it");
        self.settle_end("waited long enough");
    }

    /// Publishes are no longer held: the held ones are handled, each connection's in order.
    pub(super) fn settle_end(&mut self, why: &str) {
        let Some(s) = self.primary().and_then(|p| p.settle.take()) else {
            return;
        };
        self.timers.stop(Timer::Settle);
        if !s.waiting.is_empty() {
            info!(
                "{why}: handling the publishes of {} connection(s) that waited",
                s.waiting.len()
            );
        }
        self.resume_settled(s.waiting);
    }

    /// Handles what waited on `waiting` (after the hold ended, or in a new role).
    pub(super) fn resume_settled(&mut self, waiting: Vec<ConnId>) {
        for conn in waiting {
            self.resume(conn);
        }
    }

    /// Backup: the primary's `SETTLE` on its link, answered once our hand-overs are done.
    pub(super) fn on_settle(&mut self, conn: ConnId) {
        if !matches!(self.role, RoleState::Backup(_)) {
            self.reply(conn, super::durable::not_a_backup());
            return;
        }
        self.settle_asked = Some(conn);
        self.answer_settle();
    }

    /// Backup: says `SETTLED` to a primary that asked, once no hand-over is under way.
    pub(super) fn answer_settle(&mut self) {
        if !self.handovers.is_empty() {
            return;
        }
        if let Some(conn) = self.settle_asked.take() {
            if self.conns.contains_key(&conn) {
                self.reply(conn, Frame::Settled);
            }
        }
    }
}
