//! A new reign waits a moment for a publisher's missing message.
//!
//! Right after a takeover, a publisher's message *n* may still be on its way: handed over by the
//! node that reigned before (it acknowledged *n* alone, then stepped down), or delivered by that
//! node to the subscribers a moment late (two reigns overlapped in a link fault). The publisher,
//! which had its `ACK`, has already sent *n + 1* here. Logged at once, *n + 1* would reach the
//! subscribers first. So, during the first [`GAP_WINDOW`] of a reign, a publish whose sequence
//! number skips past the next one this node expects from a publisher it knows is held for at
//! most [`GAP_WAIT`]: it goes as soon as the missing one has been accepted (both then in order),
//! or when the wait is over (then anyway: the missing one may never come, e.g. taken by a power
//! loss). The connection's later frames wait behind it, and its `ACK` comes after, well within
//! a publisher's `ACK` timeout. Outside that window nothing is held, so a client whose sequence
//! numbers have holes of their own never waits in normal operation.

use std::time::Duration;

use super::conn::Reply;
use super::time::{Time, Timer};
use super::{Broker, ConnId, RoleState};
use crate::protocol::Frame;

/// How long after a takeover a publish may be held for a missing predecessor.
pub(super) const GAP_WINDOW: Duration = Duration::from_secs(2);
/// How long one publish is held at most.
pub(super) const GAP_WAIT: Duration = Duration::from_millis(250);

/// A publish held until its publisher's earlier message arrives (or the wait ends).
#[derive(Debug)]
pub(super) struct Held {
    conn: ConnId,
    frame: Frame,
    publisher: String,
    seq: u64,
    until: Time,
}

impl Broker {
    /// Holds `frame` if it skips a message of its publisher early in this reign; true if held.
    pub(super) fn hold_for_gap(&mut self, conn: ConnId, frame: &Frame) -> bool {
        let Frame::Pub { id, .. } = frame else {
            return false;
        };
        let now = self.now.mono;
        let missing = match self.expected(&id.publisher) {
            Some(next) => id.seq > next && !self.seen.contains(&id.publisher, id.seq),
            None => false,
        };
        let RoleState::Primary(p) = &mut self.role else {
            return false;
        };
        if id.is_anonymous() || !missing || now >= p.reign_start + GAP_WINDOW {
            return false;
        }
        let until = now + GAP_WAIT;
        p.gap_held.push(Held {
            conn,
            frame: frame.clone(),
            publisher: id.publisher.clone(),
            seq: id.seq,
            until,
        });
        if let Some(c) = self.conns.get_mut(&conn) {
            c.busy = true;
            c.replies.push_back(Reply::Forward);
        }
        let first = p.gap_held.iter().map(|h| h.until).min().unwrap_or(until);
        self.timers.set(Timer::Gap, first);
        true
    }

    /// The sequence number this primary waits for next from `publisher`: the first it has not
    /// accepted, or past the last one it stopped waiting for. `None` for one it does not know.
    fn expected(&self, publisher: &str) -> Option<u64> {
        let next = self.seen.next_expected(publisher)?;
        let gave_up = match &self.role {
            RoleState::Primary(p) => p.gap_gave_up.get(publisher).copied().unwrap_or(0),
            RoleState::Backup(_) => 0,
        };
        Some(next.max(gave_up.saturating_add(1)))
    }

    /// Accepts every held publish whose predecessor has arrived, or whose wait is over (all of
    /// them with `all`), lowest sequence number first. A publish released because its wait was
    /// over gives up on what it skipped: its publisher's later ones are not held for it again.
    pub(super) fn release_gaps(&mut self, all: bool) {
        loop {
            let now = self.now.mono;
            let RoleState::Primary(p) = &self.role else {
                return;
            };
            if p.gap_held.is_empty() {
                return;
            }
            let ready = p
                .gap_held
                .iter()
                .enumerate()
                .filter(|(_, h)| {
                    all || h.until <= now
                        || self.expected(&h.publisher).is_none_or(|next| h.seq <= next)
                })
                .min_by_key(|(_, h)| (h.seq, h.until))
                .map(|(i, _)| i);
            let RoleState::Primary(p) = &mut self.role else {
                return;
            };
            let Some(i) = ready else {
                if let Some(first) = p.gap_held.iter().map(|h| h.until).min() {
                    self.timers.set(Timer::Gap, first);
                }
                return;
            };
            let h = p.gap_held.remove(i);
            let gave_up = p.gap_gave_up.entry(h.publisher.clone()).or_default();
            *gave_up = (*gave_up).max(h.seq);
            if let Some(c) = self.conns.get_mut(&h.conn) {
                c.replies.retain(|r| !matches!(r, Reply::Forward));
            }
            self.accept_publish_now(h.conn, h.frame);
            self.resume(h.conn);
        }
    }

    /// On a step-down: what was held goes to the new primary, as any publish at a backup.
    pub(super) fn gap_held_to_backup(&mut self, held: Vec<Held>) {
        for h in held {
            self.decide_publish(h.conn, h.frame, 0);
        }
    }
}
