//! Each simulated node's disk: a [`MemLog::simulated_disk`] that lives outside the node, so
//! that it outlives the node's crash and restart, and loses what was not synced when the sim
//! cuts its power.
//!
//! The node reaches it through [`Storage`] like any log. The simulation keeps the other handle:
//! a process crash (`crash`, `restart` faults) leaves the disk whole, as the page cache
//! outlives a killed process; a power loss (`power`, `power-both`) calls [`SimDisk::power_loss`],
//! which drops every entry appended since the last sync and says which ones, and how long each
//! had been waiting for its sync.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use edgepair::log::{Entry, LogError, MemLog, Storage, TopicState};
use edgepair::protocol::MsgId;

#[derive(Debug)]
struct Inner {
    log: MemLog,
    /// Entries appended since the last sync, by (topic, offset), with the simulated time of
    /// their append: what a power loss drops.
    unsynced: BTreeMap<(String, u64), (MsgId, Duration)>,
}

/// A node's simulated disk, shared by the node (as its [`Storage`]) and the simulation.
#[derive(Debug, Clone)]
pub struct SimDisk {
    inner: Arc<Mutex<Inner>>,
}

/// What a power loss took off one disk.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PowerLoss {
    /// The identities of the entries dropped.
    pub dropped: Vec<MsgId>,
    /// How long the oldest of them had been appended without a sync.
    pub oldest_unsynced: Duration,
}

impl Default for SimDisk {
    fn default() -> Self {
        SimDisk::new()
    }
}

fn sim_now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> SimDisk {
        SimDisk {
            inner: Arc::new(Mutex::new(Inner {
                log: MemLog::simulated_disk(),
                unsynced: BTreeMap::new(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A node task that panicked while holding the lock leaves a log that is still whole
        // (every operation below completes or leaves it unchanged).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A handle for a node to run on.
    pub fn storage(&self) -> Box<dyn Storage> {
        Box::new(self.clone())
    }

    /// Cuts the power at simulated time `now`: every entry not synced is gone.
    pub fn power_loss(&self, now: Duration) -> PowerLoss {
        let mut g = self.lock();
        g.log.crash();
        let unsynced = std::mem::take(&mut g.unsynced);
        let mut loss = PowerLoss::default();
        for ((topic, offset), (id, at)) in unsynced {
            // What the crash kept was synced after all (a truncate can leave such entries).
            if offset < g.log.topic(&topic).next {
                continue;
            }
            loss.dropped.push(id);
            loss.oldest_unsynced = loss.oldest_unsynced.max(now.saturating_sub(at));
        }
        loss
    }

    /// Whether the disk holds an entry of this identity.
    pub fn holds(&self, id: &MsgId) -> bool {
        let g = self.lock();
        g.log.topics().iter().any(|t| {
            g.log
                .read(&t.topic, t.first, usize::MAX)
                .is_ok_and(|es| es.iter().any(|e| &e.id == id))
        })
    }

    /// Entries appended and not yet synced.
    pub fn unsynced_entries(&self) -> u64 {
        self.lock().log.unsynced()
    }
}

impl Storage for SimDisk {
    fn topics(&self) -> Vec<TopicState> {
        self.lock().log.topics()
    }

    fn topic(&self, topic: &str) -> TopicState {
        self.lock().log.topic(topic)
    }

    fn delivered(&self, topic: &str) -> u64 {
        self.lock().log.delivered(topic)
    }

    fn next_offset(&self, topic: &str) -> u64 {
        self.lock().log.next_offset(topic)
    }

    fn append(&mut self, topic: &str, e: &Entry) -> Result<(), LogError> {
        let mut g = self.lock();
        g.log.append(topic, e)?;
        g.unsynced
            .insert((topic.to_string(), e.offset), (e.id.clone(), sim_now()));
        Ok(())
    }

    fn truncate(&mut self, topic: &str, from: u64) -> Result<u64, LogError> {
        let mut g = self.lock();
        let cut = g.log.truncate(topic, from)?;
        g.unsynced.retain(|(t, o), _| t != topic || *o < from);
        Ok(cut)
    }

    fn trim_front(&mut self, topic: &str, before: u64) -> Result<(), LogError> {
        let mut g = self.lock();
        g.log.trim_front(topic, before)?;
        // The topic was made durable first.
        g.unsynced.retain(|(t, _), _| t != topic);
        Ok(())
    }

    fn restart_at(&mut self, topic: &str, at: u64) -> Result<u64, LogError> {
        let mut g = self.lock();
        let gone = g.log.restart_at(topic, at)?;
        g.unsynced.retain(|(t, _), _| t != topic);
        Ok(gone)
    }

    fn read(&self, topic: &str, from: u64, max: usize) -> Result<Vec<Arc<Entry>>, LogError> {
        self.lock().log.read(topic, from, max)
    }

    fn set_delivered(&mut self, topic: &str, upto: u64) {
        self.lock().log.set_delivered(topic, upto);
    }

    fn sync(&mut self) -> Result<(), LogError> {
        let mut g = self.lock();
        g.log.sync()?;
        g.unsynced.clear();
        Ok(())
    }

    fn unsynced(&self) -> u64 {
        self.lock().log.unsynced()
    }

    fn is_durable(&self) -> bool {
        self.lock().log.is_durable()
    }

    fn saved_epoch(&self) -> u64 {
        self.lock().log.saved_epoch()
    }

    fn save_epoch(&mut self, epoch: u64) -> Result<(), LogError> {
        self.lock().log.save_epoch(epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgepair::log::inspect::fill_entry;

    /// The entry at `offset` that `edgepair-log fill` writes (seq = offset + 1).
    fn entry(offset: u64) -> Arc<Entry> {
        Arc::new(fill_entry(offset, 8))
    }

    #[test]
    fn a_power_loss_drops_what_was_not_synced_and_says_what() {
        let disk = SimDisk::new();
        let mut node = disk.storage();
        node.append("t", &entry(0)).expect("append");
        node.sync().expect("sync");
        node.append("t", &entry(1)).expect("append");
        node.append("t", &entry(2)).expect("append");
        assert_eq!(disk.unsynced_entries(), 2);
        // The node is gone; the disk stays with the simulation.
        drop(node);
        let loss = disk.power_loss(Duration::from_millis(3));
        let seqs: Vec<u64> = loss.dropped.iter().map(|id| id.seq).collect();
        assert_eq!(seqs, vec![2, 3]);
        assert_eq!(loss.oldest_unsynced, Duration::from_millis(3));
        let node = disk.storage();
        assert_eq!(
            node.topic("t").next,
            1,
            "a restarted node sees what was synced"
        );
        assert!(disk.holds(&entry(0).id));
        assert!(!disk.holds(&entry(1).id));
        assert_eq!(disk.power_loss(Duration::ZERO), PowerLoss::default());
    }

    #[test]
    fn a_truncated_entry_is_not_counted_as_lost_by_power() {
        let disk = SimDisk::new();
        let mut node = disk.storage();
        node.append("t", &entry(0)).expect("append");
        node.append("t", &entry(1)).expect("append");
        assert_eq!(node.truncate("t", 1).expect("truncate"), 1);
        let loss = disk.power_loss(Duration::ZERO);
        assert_eq!(loss.dropped.len(), 1, "{loss:?}");
        assert_eq!(loss.dropped[0].seq, 1);
    }
}
