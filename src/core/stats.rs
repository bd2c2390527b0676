//! What a node counts for its metrics (`--metrics`): plain numbers the core bumps as it goes,
//! read in one piece with [`Broker::snapshot`], together with the fields `STATUS` reports
//! (from the same function), so that the two always agree.

use super::Broker;
use crate::protocol::{Role, Stamps};

/// Upper bounds of the stage histograms' buckets, µs: from a relay's tens of microseconds to
/// the seed scenario's 150 ms of compute and a slow disk's second.
pub const STAGE_BOUNDS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000,
];

/// A histogram of one stage's durations: per-bucket counts (one more bucket than
/// [`STAGE_BOUNDS_US`], for everything above the last bound), their sum and count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StageHist {
    /// Count per bucket, not cumulative.
    pub buckets: [u64; STAGE_BOUNDS_US.len() + 1],
    /// Sum of the durations, µs.
    pub sum_us: u64,
    /// How many durations.
    pub count: u64,
}

impl StageHist {
    /// Counts one duration.
    pub fn observe(&mut self, us: u64) {
        let i = STAGE_BOUNDS_US.partition_point(|b| *b < us);
        self.buckets[i] += 1;
        self.sum_us += us;
        self.count += 1;
    }
}

/// Counters since the node started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Publishes accepted and logged as primary (a recognised resend is not counted again).
    pub published: u64,
    /// `ACK`s sent to publishers.
    pub acknowledged: u64,
    /// Messages delivered to a topic's subscribers (once per message, however many).
    pub delivered: u64,
    /// Frames answered `ERR` by choice: publishes while stopping or when the log failed,
    /// frames past a limit, peer frames from a connection that did not authenticate.
    pub refused: u64,
    /// Times this node took over as primary.
    pub takeovers: u64,
    /// Entries a consumer group moved to its topic's dead-letter topic.
    pub dead_lettered: u64,
    /// Time from receipt to the start of compute.
    pub queue_wait: StageHist,
    /// Compute.
    pub compute: StageHist,
    /// Time from the end of compute to delivery.
    pub delivery: StageHist,
}

/// The node's state and counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// As in `STATUS`.
    pub role: Role,
    /// As in `STATUS`.
    pub epoch: u64,
    /// As in `STATUS`: `up`/`down`/`none` on a primary, `armed`/`waiting` on a backup.
    pub link: String,
    /// As in `STATUS`: entries a backup holds past the delivered marks.
    pub held: u64,
    /// As in `STATUS`: messages a primary accepted and has not delivered.
    pub inflight: u64,
    /// Counters since the start.
    pub counters: Counters,
}

impl Broker {
    /// The node's state (the very fields of its `STATUS`) and counters now.
    pub fn snapshot(&self) -> Snapshot {
        let (link, held, inflight) = self.link_held_inflight();
        let mut counters = self.counters.clone();
        counters.delivered = self.delivered;
        Snapshot {
            role: self.role(),
            epoch: self.epoch,
            link: link.into(),
            held,
            inflight,
            counters,
        }
    }

    /// A delivery's stages, from its stamps and the time of delivery.
    pub(super) fn observe_stages(&mut self, stamps: &Stamps) {
        let now = self.now.wall_us;
        let c = &mut self.counters;
        if stamps.compute_start_us == 0 {
            // Delivered in place (`--compute 0`): no compute stage.
            c.delivery.observe(now.saturating_sub(stamps.received_us));
            return;
        }
        c.queue_wait
            .observe(stamps.compute_start_us.saturating_sub(stamps.received_us));
        c.compute.observe(
            stamps
                .compute_end_us
                .saturating_sub(stamps.compute_start_us),
        );
        c.delivery
            .observe(now.saturating_sub(stamps.compute_end_us));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_fall_in_the_first_bucket_whose_bound_holds_them() {
        let mut h = StageHist::default();
        for us in [0, 50, 51, 1_000_000, 1_000_001] {
            h.observe(us);
        }
        assert_eq!(h.buckets[0], 2, "0 and 50 µs");
        assert_eq!(h.buckets[1], 1, "51 µs");
        assert_eq!(h.buckets[STAGE_BOUNDS_US.len() - 1], 1, "1 s");
        assert_eq!(h.buckets[STAGE_BOUNDS_US.len()], 1, "above the last bound");
        assert_eq!((h.count, h.sum_us), (5, 2_000_102));
    }
}
