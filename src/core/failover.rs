//! When should a backup take over, and who outranks whom: the sans-IO failure detector.
//!
//! The backup polls the primary with `PING` every `ping_interval`. The detector never touches a
//! socket or reads the clock: the node tells it what it saw (`now` included) and it answers what
//! to do next, so every rule below is tested without a network (see the tests at the bottom).
//!
//! The rules:
//! * a `PONG` (or the primary's `HELLO` on its replication link) arms the detector: a backup
//!   that has never seen its primary does not take over on its own just because it was started
//!   first. Until then it looks for the primary more often than once per interval;
//! * a `PING` that gets no answer within `ping_timeout` is a hang (SIGSTOP, overload): take over;
//! * a refused connection or a link closed by the peer is *evidence* of a crash, but also what a
//!   flaky link looks like, so it triggers an immediate probe (a fresh connection and a `PING`);
//!   the backup takes over only when the probe fails too. A crash thus costs one round trip
//!   instead of up to a whole polling interval;
//! * a publish that reaches a backup is probed the same way, armed or not: either the primary is
//!   alive (the backup forwards the message to it) or the backup takes over and serves it.

use std::time::Duration;

use super::time::Time;

/// First retry of a backup whose primary has not answered yet (see [`Detector::on_ping_sent`]).
pub const UNARMED_FIRST_RETRY: Duration = Duration::from_millis(100);

/// What the node observed about the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// A `PING` went unanswered for `ping_timeout`.
    Timeout,
    /// The connection was refused, reset or closed by the primary.
    Closed,
    /// A publisher sent a message to this backup (it could not reach the primary, or chose not to).
    Publish,
    /// The peer answers but is a backup too, and this node [`outranks`] it: nobody serves.
    NoPrimary,
}

/// Whether this node should be the one to take over when both nodes are backups (say, after
/// the primary was restarted and came back in its binary's backup role): the newer epoch wins,
/// and on a tie the node started as primary.
pub fn outranks(my_epoch: u64, started_as_primary: bool, peer_epoch: u64) -> bool {
    my_epoch > peer_epoch || (my_epoch == peer_epoch && started_as_primary)
}

/// Whether a primary of epoch `mine` must give way to a primary of epoch `theirs` that has just
/// spoken to it: the same rule as [`outranks`], seen from the loser's side. Used wherever two
/// primaries meet (a `HELLO`, the answer to our own `HELLO`), so the rule is written once.
pub fn yields_to(mine: u64, started_as_primary: bool, theirs: u64) -> bool {
    !outranks(mine, started_as_primary, theirs)
}

/// The epoch a node reigns in when it becomes primary after `current`.
///
/// Epochs are owned: a node started as primary only ever reigns in odd epochs, one started as
/// backup only in even ones. Two nodes that take over at the same moment (a slow link makes
/// each think the other is gone) thus never share an epoch: the higher one wins and the other
/// steps down as soon as they speak, and a subscriber can always tell the reigns apart.
pub fn next_epoch(current: u64, started_as_primary: bool) -> u64 {
    let want = u64::from(started_as_primary);
    // Saturating: an epoch near the top (a misbehaving peer) must not wrap back to 0.
    let e = current.saturating_add(1);
    if e % 2 == want {
        e
    } else {
        e.saturating_add(1)
    }
}

/// What the node should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing: keep polling.
    Wait,
    /// Open a fresh connection to the primary and `PING` it now, then report with
    /// [`Detector::on_probe`].
    Probe,
    /// The primary is gone: become the primary.
    TakeOver,
}

/// Failure detector state for one backup.
#[derive(Debug, Clone)]
pub struct Detector {
    interval: Duration,
    /// Set by the first `PONG`; until then only a publish can trigger a takeover.
    armed: bool,
    /// Until armed, the wait before the next `PING`: starts short and doubles up to `interval`,
    /// so a backup started just before its primary follows it within ~100 ms, not a whole
    /// (possibly long) interval later.
    unarmed_wait: Duration,
    /// Once taken over, every later observation is moot.
    taken_over: bool,
    next_ping: Time,
}

impl Detector {
    /// A detector that sends its first `PING` at `now`.
    pub fn new(interval: Duration, now: Time) -> Self {
        Detector {
            interval,
            armed: false,
            unarmed_wait: UNARMED_FIRST_RETRY.min(interval),
            taken_over: false,
            next_ping: now,
        }
    }

    /// When the next `PING` is due, or `None` once this node has taken over.
    pub fn next_ping(&self) -> Option<Time> {
        (!self.taken_over).then_some(self.next_ping)
    }

    /// Whether the primary has answered at least once.
    pub fn is_armed(&self) -> bool {
        self.armed
    }

    /// Whether this node has decided to take over.
    pub fn has_taken_over(&self) -> bool {
        self.taken_over
    }

    /// A `PING` was sent at `now`: schedule the next one a full interval later (drift-free
    /// polling is not needed; the interval bounds detection time either way). Until the primary
    /// has answered once, sooner: see `unarmed_wait`.
    pub fn on_ping_sent(&mut self, now: Time) {
        if self.armed {
            self.next_ping = now + self.interval;
        } else {
            self.next_ping = now + self.unarmed_wait;
            self.unarmed_wait = (self.unarmed_wait * 2).min(self.interval);
        }
    }

    /// The primary answered.
    pub fn on_pong(&mut self) {
        self.armed = true;
    }

    /// Something suggests the primary is gone.
    pub fn on_evidence(&mut self, e: Evidence) -> Verdict {
        if self.taken_over {
            return Verdict::Wait;
        }
        match e {
            Evidence::Timeout if self.armed => self.take_over(),
            Evidence::Timeout => Verdict::Wait,
            Evidence::Closed if self.armed => Verdict::Probe,
            Evidence::Closed => Verdict::Wait,
            Evidence::Publish => Verdict::Probe,
            Evidence::NoPrimary => self.take_over(),
        }
    }

    /// Result of a probe requested by [`Verdict::Probe`]: `alive` if the primary answered `PONG`.
    pub fn on_probe(&mut self, alive: bool) -> Verdict {
        if self.taken_over {
            return Verdict::Wait;
        }
        if alive {
            self.armed = true;
            Verdict::Wait
        } else {
            self.take_over()
        }
    }

    /// A takeover decided while the primary's lease ran is called off (the primary answered
    /// meanwhile): poll again from `now` on, as a detector that has seen its primary.
    pub fn call_off(&mut self, now: Time) {
        self.taken_over = false;
        self.armed = true;
        self.next_ping = now + self.interval;
    }

    fn take_over(&mut self) -> Verdict {
        self.taken_over = true;
        Verdict::TakeOver
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det() -> (Detector, Time) {
        let t0 = Time(1_000_000);
        (Detector::new(Duration::from_secs(1), t0), t0)
    }

    #[test]
    fn a_called_off_takeover_polls_and_judges_again() {
        let (mut d, t0) = det();
        d.on_pong();
        assert_eq!(d.on_evidence(Evidence::Timeout), Verdict::TakeOver);
        d.call_off(t0);
        assert_eq!(d.next_ping(), Some(t0 + Duration::from_secs(1)));
        assert!(!d.has_taken_over());
        assert_eq!(d.on_evidence(Evidence::Timeout), Verdict::TakeOver);
    }

    #[test]
    fn backup_waits_for_a_primary_it_has_never_seen() {
        let (mut d, _) = det();
        assert_eq!(d.on_evidence(Evidence::Timeout), Verdict::Wait);
        assert_eq!(d.on_evidence(Evidence::Closed), Verdict::Wait);
        assert!(!d.has_taken_over());
    }

    #[test]
    fn backup_takes_over_after_an_unanswered_ping() {
        let (mut d, _) = det();
        d.on_pong();
        assert_eq!(d.on_evidence(Evidence::Timeout), Verdict::TakeOver);
        assert!(d.has_taken_over());
        assert_eq!(d.next_ping(), None);
        assert_eq!(d.on_evidence(Evidence::Timeout), Verdict::Wait);
    }

    #[test]
    fn closed_link_is_confirmed_by_a_probe_before_takeover() {
        let (mut d, _) = det();
        d.on_pong();
        assert_eq!(d.on_evidence(Evidence::Closed), Verdict::Probe);
        assert_eq!(d.on_probe(true), Verdict::Wait);
        assert!(!d.has_taken_over());
        assert_eq!(d.on_evidence(Evidence::Closed), Verdict::Probe);
        assert_eq!(d.on_probe(false), Verdict::TakeOver);
    }

    #[test]
    fn publish_at_backup_probes_even_when_unarmed() {
        let (mut d, _) = det();
        assert_eq!(d.on_evidence(Evidence::Publish), Verdict::Probe);
        assert_eq!(d.on_probe(false), Verdict::TakeOver);
    }

    #[test]
    fn when_both_are_backups_the_newer_epoch_then_the_born_primary_takes_over() {
        assert!(outranks(4, false, 1));
        assert!(!outranks(1, true, 4));
        assert!(outranks(2, true, 2));
        assert!(!outranks(2, false, 2));
        let (mut d, _) = det();
        assert_eq!(d.on_evidence(Evidence::NoPrimary), Verdict::TakeOver);
    }

    #[test]
    fn two_nodes_taking_over_at_once_never_share_an_epoch() {
        for current in 0..20 {
            let p = next_epoch(current, true);
            let b = next_epoch(current, false);
            assert_ne!(p, b);
            assert!(p > current && p <= current + 2 && p % 2 == 1);
            assert!(b > current && b <= current + 2 && b.is_multiple_of(2));
        }
        // The usual story keeps small numbers: primary in 1, backup takes over in 2.
        assert_eq!(next_epoch(1, false), 2);
        assert_eq!(next_epoch(2, true), 3);
    }

    #[test]
    fn pings_are_spaced_by_the_interval() {
        let (mut d, t0) = det();
        assert_eq!(d.next_ping(), Some(t0));
        d.on_pong();
        d.on_ping_sent(t0);
        assert_eq!(d.next_ping(), Some(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn a_backup_looks_for_its_primary_sooner_until_it_answers() {
        let t0 = Time(0);
        let mut d = Detector::new(Duration::from_secs(10), t0);
        let mut waits = Vec::new();
        let mut t = t0;
        for _ in 0..9 {
            d.on_ping_sent(t);
            let next = d.next_ping().unwrap();
            waits.push((next - t).as_millis());
            t = next;
        }
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 6400, 10000, 10000]);
        d.on_pong();
        d.on_ping_sent(t);
        assert_eq!(d.next_ping(), Some(t + Duration::from_secs(10)));
    }
}
