//! The log in memory: for nodes run without a data directory, the pair tests and the
//! simulation, which uses it as a model of a disk (what was not synced is lost in a crash).

use foldhash::{HashMap, HashMapExt};
use std::collections::VecDeque;
use std::sync::Arc;

use super::{Entry, Holds, LogError, Storage, TopicState};

/// Entries kept per topic by default when there is no disk to keep them on: enough for
/// history and catch-up, bounded so a long run does not grow without end. Entries not yet
/// delivered are always kept.
pub const DEFAULT_RETAIN_ENTRIES: usize = 100_000;

#[derive(Debug, Default)]
struct Topic {
    first: u64,
    entries: VecDeque<Arc<Entry>>,
    delivered: u64,
    /// Entries below this offset survive a crash of a simulated disk.
    synced: u64,
}

impl Topic {
    fn next(&self) -> u64 {
        self.first + self.entries.len() as u64
    }
}

/// Every topic's log in memory.
#[derive(Debug)]
pub struct MemLog {
    topics: HashMap<String, Topic>,
    retain: usize,
    /// Behaves as a disk: `sync` is what makes entries survive [`MemLog::crash`].
    disk: bool,
    unsynced: u64,
    /// The saved epoch (on a simulated disk it survives a crash, as an fsync'd file would).
    epoch: u64,
    /// Where retention must stop, per topic ([`Storage::hold`]).
    holds: Holds,
}

impl MemLog {
    /// A memory-only log keeping at most `retain` delivered entries per topic.
    pub fn new(retain: usize) -> MemLog {
        MemLog {
            topics: HashMap::new(),
            retain: retain.max(1),
            disk: false,
            unsynced: 0,
            epoch: 0,
            holds: Holds::default(),
        }
    }

    /// A model of a disk for the simulation: [`MemLog::crash`] loses what was not synced.
    pub fn simulated_disk() -> MemLog {
        MemLog {
            disk: true,
            ..MemLog::new(usize::MAX)
        }
    }

    /// What survives a power loss: entries appended since the last sync are gone.
    pub fn crash(&mut self) {
        for t in self.topics.values_mut() {
            let keep = t.synced.saturating_sub(t.first) as usize;
            t.entries.truncate(keep);
            t.delivered = t.delivered.min(t.next());
        }
        self.unsynced = 0;
    }

    fn state(name: &str, t: &Topic) -> TopicState {
        TopicState {
            topic: name.to_string(),
            first: t.first,
            next: t.next(),
            delivered: t.delivered,
        }
    }
}

impl Storage for MemLog {
    fn topics(&self) -> Vec<TopicState> {
        let mut v: Vec<TopicState> = self.topics.iter().map(|(n, t)| Self::state(n, t)).collect();
        v.sort_by(|a, b| a.topic.cmp(&b.topic));
        v
    }

    fn topic(&self, topic: &str) -> TopicState {
        match self.topics.get(topic) {
            Some(t) => Self::state(topic, t),
            None => Self::state(topic, &Topic::default()),
        }
    }

    fn next_offset(&self, topic: &str) -> u64 {
        self.topics.get(topic).map_or(0, Topic::next)
    }

    fn delivered(&self, topic: &str) -> u64 {
        self.topics.get(topic).map_or(0, |t| t.delivered)
    }

    fn append(&mut self, topic: &str, e: &Arc<Entry>) -> Result<(), LogError> {
        let t = match self.topics.get_mut(topic) {
            Some(t) => t,
            None => self.topics.entry(topic.to_string()).or_default(),
        };
        if e.offset != t.next() {
            return Err(LogError::NotDense {
                topic: topic.to_string(),
                want: t.next(),
                got: e.offset,
            });
        }
        t.entries.push_back(e.clone());
        // Retention: only entries already delivered (and synced, for a disk) may go.
        let floor = if self.disk {
            t.delivered.min(t.synced)
        } else {
            t.delivered
        };
        // Nor what a group has not finished, nor the node's own topics (the groups' journal
        // is their state).
        let floor = if topic.starts_with('$') {
            0
        } else {
            floor.min(self.holds.from(topic))
        };
        while t.entries.len() > self.retain && t.first < floor {
            t.entries.pop_front();
            t.first += 1;
        }
        if self.disk {
            self.unsynced += 1;
        } else {
            t.synced = t.next();
        }
        Ok(())
    }

    fn truncate(&mut self, topic: &str, from: u64) -> Result<u64, LogError> {
        let Some(t) = self.topics.get_mut(topic) else {
            return Ok(0);
        };
        let keep = from.saturating_sub(t.first) as usize;
        let cut = t.entries.len().saturating_sub(keep) as u64;
        t.entries.truncate(keep);
        let next = t.next();
        t.synced = t.synced.min(next);
        t.delivered = t.delivered.min(next);
        Ok(cut)
    }

    fn trim_front(&mut self, topic: &str, before: u64) -> Result<(), LogError> {
        if let Some(t) = self.topics.get_mut(topic) {
            // What replaces the removed entries is made durable first, as a disk's fsync.
            if self.disk {
                self.unsynced = self
                    .unsynced
                    .saturating_sub(t.next() - t.synced.min(t.next()));
                t.synced = t.next();
            }
            while t.first < before && !t.entries.is_empty() {
                t.entries.pop_front();
                t.first += 1;
            }
            t.delivered = t.delivered.max(t.first);
            t.synced = t.synced.max(t.first);
        }
        Ok(())
    }

    fn restart_at(&mut self, topic: &str, at: u64) -> Result<u64, LogError> {
        let t = self.topics.entry(topic.to_string()).or_default();
        let gone = t.entries.len() as u64;
        if self.disk {
            self.unsynced = self
                .unsynced
                .saturating_sub(t.next().saturating_sub(t.synced));
        }
        t.entries.clear();
        t.first = at;
        (t.delivered, t.synced) = (t.first, t.first);
        Ok(gone)
    }

    fn read(&self, topic: &str, from: u64, max: usize) -> Result<Vec<Arc<Entry>>, LogError> {
        let Some(t) = self.topics.get(topic) else {
            return Ok(Vec::new());
        };
        let skip = from.saturating_sub(t.first) as usize;
        Ok(t.entries.iter().skip(skip).take(max).cloned().collect())
    }

    fn hold(&mut self, topic: &str, from: Option<u64>) {
        self.holds.set(topic, from);
    }

    fn set_delivered(&mut self, topic: &str, upto: u64) {
        if let Some(t) = self.topics.get_mut(topic) {
            t.delivered = t.delivered.max(upto.min(t.next()));
        }
    }

    fn sync(&mut self) -> Result<(), LogError> {
        for t in self.topics.values_mut() {
            t.synced = t.next();
        }
        self.unsynced = 0;
        Ok(())
    }

    fn unsynced(&self) -> u64 {
        self.unsynced
    }

    fn saved_epoch(&self) -> u64 {
        self.epoch
    }

    fn save_epoch(&mut self, epoch: u64) -> Result<(), LogError> {
        self.epoch = self.epoch.max(epoch);
        Ok(())
    }

    fn is_durable(&self) -> bool {
        self.disk
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::inspect::fill_entry;

    /// The entry at `offset` that `edgepair-log fill` writes (seq = offset + 1).
    fn entry(offset: u64) -> Arc<Entry> {
        Arc::new(fill_entry(offset, 8))
    }

    #[test]
    fn offsets_are_dense_and_reads_start_where_asked() {
        let mut log = MemLog::new(100);
        for o in 0..5 {
            log.append("t", &entry(o)).expect("dense append");
        }
        let err = log.append("t", &entry(7)).expect_err("a gap is refused");
        assert!(err.to_string().contains("expects 5"), "{err}");
        let got: Vec<u64> = log
            .read("t", 2, 10)
            .unwrap()
            .iter()
            .map(|e| e.offset)
            .collect();
        assert_eq!(got, vec![2, 3, 4]);
        assert_eq!(log.topic("t").next, 5);
        assert_eq!(log.topic("other").next, 0);
    }

    #[test]
    fn retention_keeps_what_is_not_delivered() {
        let mut log = MemLog::new(2);
        for o in 0..5 {
            log.append("t", &entry(o)).unwrap();
        }
        assert_eq!(
            log.topic("t").first,
            0,
            "nothing delivered: nothing dropped"
        );
        log.set_delivered("t", 4);
        log.append("t", &entry(5)).unwrap();
        let s = log.topic("t");
        assert_eq!((s.first, s.next, s.delivered), (4, 6, 4));
        assert_eq!(log.read("t", 0, 10).unwrap()[0].offset, 4);
    }

    #[test]
    fn retention_keeps_what_a_group_holds_and_the_nodes_own_topics() {
        let mut log = MemLog::new(2);
        // Held before it has an entry (a group made on a topic nobody published to yet).
        log.hold("t", Some(1));
        log.append("t", &entry(0)).unwrap();
        for o in 1..10 {
            log.append("t", &entry(o)).unwrap();
            log.set_delivered("t", o + 1);
        }
        assert_eq!(log.topic("t").first, 1, "kept from the group's floor on");
        log.hold("t", None);
        log.append("t", &entry(10)).unwrap();
        assert_eq!(
            log.topic("t").first,
            9,
            "the bound again once the hold is lifted"
        );
        for o in 0..10 {
            log.append("$groups", &entry(o)).unwrap();
            log.set_delivered("$groups", o + 1);
        }
        assert_eq!(
            log.topic("$groups").first,
            0,
            "the node's own topics are kept whole"
        );
    }

    #[test]
    fn a_crash_of_a_simulated_disk_loses_only_what_was_not_synced() {
        let mut log = MemLog::simulated_disk();
        log.append("t", &entry(0)).unwrap();
        log.append("t", &entry(1)).unwrap();
        log.sync().unwrap();
        log.append("t", &entry(2)).unwrap();
        assert_eq!(log.unsynced(), 1);
        log.crash();
        assert_eq!(log.topic("t").next, 2);
        assert_eq!(log.truncate("t", 1).unwrap(), 1);
        assert_eq!(log.topic("t").next, 1);
    }
}
