//! Time as the core sees it: a monotonic instant passed in by the caller, one deadline table
//! for every timer, and the one doubling backoff.

use std::collections::BTreeMap;
use std::ops::{Add, Sub};
use std::time::Duration;

/// A point on the caller's monotonic clock, in microseconds since an origin the caller picks
/// (the driver: its start; a test: zero). A plain number rather than `std::time::Instant`, so
/// that tests can name any moment without reading a clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Time(pub u64);

impl Time {
    /// The time `d` after the origin.
    pub fn from_duration(d: Duration) -> Time {
        Time(d.as_micros() as u64)
    }

    /// Time since the origin.
    pub fn as_duration(self) -> Duration {
        Duration::from_micros(self.0)
    }
}

impl Add<Duration> for Time {
    type Output = Time;
    fn add(self, d: Duration) -> Time {
        Time(self.0.saturating_add(d.as_micros() as u64))
    }
}

impl Sub for Time {
    type Output = Duration;
    /// Time elapsed from `rhs` to `self`; zero if `rhs` is later.
    fn sub(self, rhs: Time) -> Duration {
        Duration::from_micros(self.0.saturating_sub(rhs.0))
    }
}

/// Both clocks at one moment: `mono` for deadlines, `wall_us` (µs since the Unix epoch) for the
/// stamps a message carries, since latency is measured across processes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time, for timers.
    pub mono: Time,
    /// Wall-clock time in µs since the Unix epoch, for message stamps.
    pub wall_us: u64,
}

/// Every timer of a node. One table replaces the watchdog, ping, ack, grace and retry timers
/// that used to be separate tasks; the order of the variants is the order in which timers due
/// at the same moment fire (the watchdog first, so a pause is noticed before anything else).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timer {
    /// Primary: the stall watchdog ticks (see [`super::STALL`]) and the oldest pending `ACK`
    /// is checked against the replication timeout.
    Watchdog,
    /// Results computed during the startup grace are released.
    Grace,
    /// Primary: reconnect the replication link.
    Link,
    /// Backup: the next `PING`/`STATUS` to the primary is due.
    Ping,
    /// An outbound connection waits for an answer (or for its connect).
    Answer(u64),
    /// A hand-over waits before its next attempt.
    HandOver(u64),
    /// Under `--fsync batch`: the log is fsync'd at the latest this long after an append.
    Sync,
    /// Old segments past the retention bounds are removed.
    Retain,
    /// Primary: ask for the lease again. Backup: the primary's lease has run out.
    Lease,
    /// Primary: the next chunk of undelivered entries from the log is due (`takeup.rs`).
    TakeUp,
    /// A connection that was at `--max-unacked` may be read again (`limits.rs`).
    Unpause(u64),
    /// A consumer group's lease ran out, or a delay of a given-back entry ended (`groups.rs`).
    AckWait,
    /// Primary: fresh publishes are held no longer than this (`settle.rs`).
    Settle,
}

/// The deadline table.
#[derive(Debug, Default)]
pub struct Timers {
    due: BTreeMap<Timer, Time>,
}

impl Timers {
    /// Arms `t` at `at`, replacing an earlier setting.
    pub fn set(&mut self, t: Timer, at: Time) {
        self.due.insert(t, at);
    }

    /// Disarms `t`.
    pub fn stop(&mut self, t: Timer) {
        self.due.remove(&t);
    }

    /// Whether `t` is armed.
    pub fn is_set(&self, t: Timer) -> bool {
        self.due.contains_key(&t)
    }

    /// When `t` is due, if armed.
    pub fn due(&self, t: Timer) -> Option<Time> {
        self.due.get(&t).copied()
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<Time> {
        self.due.values().min().copied()
    }

    /// Disarms and returns every timer due at `now`, earliest first (ties in [`Timer`] order),
    /// so that a run is the same on every replay.
    pub fn expired(&mut self, now: Time) -> Vec<Timer> {
        let mut due: Vec<(Time, Timer)> = self
            .due
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(t, at)| (*at, *t))
            .collect();
        due.sort();
        for (_, t) in &due {
            self.due.remove(t);
        }
        due.into_iter().map(|(_, t)| t).collect()
    }
}

/// A doubling wait between retries, capped. Pure: it says how long; the caller waits.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `first`, doubling up to `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            next: first,
            max,
        }
    }

    /// Back to the shortest wait, after a success.
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// The wait before the next attempt; the one after it is twice as long (up to the cap).
    pub fn next_wait(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_due_together_fire_earliest_first_then_in_declared_order() {
        let mut t = Timers::default();
        t.set(Timer::Ping, Time(30));
        t.set(Timer::Answer(2), Time(10));
        t.set(Timer::Watchdog, Time(10));
        t.set(Timer::Link, Time(99));
        assert_eq!(t.next(), Some(Time(10)));
        assert_eq!(
            t.expired(Time(30)),
            [Timer::Watchdog, Timer::Answer(2), Timer::Ping]
        );
        assert_eq!(t.next(), Some(Time(99)));
        t.stop(Timer::Link);
        assert_eq!(t.next(), None);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let waits: Vec<u128> = (0..4).map(|_| b.next_wait().as_millis()).collect();
        assert_eq!(waits, [100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next_wait(), Duration::from_millis(100));
    }

    #[test]
    fn time_arithmetic_saturates() {
        assert_eq!(Time(5) - Time(9), Duration::ZERO);
        assert_eq!(Time(5) + Duration::from_micros(3), Time(8));
    }
}
