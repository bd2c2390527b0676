//! The log in memory: for nodes run without a data directory, the pair tests and the
//! simulation, which uses it as a model of a disk (what was not synced is lost in a crash).

use crate::named::Named;
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
    entries: Packed,
    delivered: u64,
    /// Entries below this offset survive a crash of a simulated disk.
    synced: u64,
}

impl Topic {
    fn next(&self) -> u64 {
        self.first + self.entries.len() as u64
    }
}

/// Bytes of each chunk of a [`Packed`] log (an entry bigger than that has a chunk of its own).
const CHUNK: usize = 64 * 1024;

/// Bytes of an entry's record before its publisher id: epoch, seq, sent and received times,
/// and the publisher id's length.
const HEAD: usize = 8 * 4 + 4;

/// A topic's entries packed back to back into large chunks, rather than one allocation per
/// entry kept: a node without a data directory keeps 100,000 entries per topic, and with each
/// in its own `Arc<Entry>` every new message was written into memory freed by an entry long
/// out of the cache (the solo relay ~8 % slower than with 1,000 kept). Appending writes one
/// chunk front to back; reading decodes entries back (catch-up and replay, not the relay path).
#[derive(Debug, Default)]
struct Packed {
    chunks: VecDeque<Chunk>,
    /// Entries removed from the front of the first chunk.
    skip: usize,
    /// Entries kept.
    len: usize,
    /// A chunk emptied at the front, kept for the next one at the back.
    spare: Option<Chunk>,
}

/// Records back to back, and where each one ends.
#[derive(Debug, Default)]
struct Chunk {
    data: Vec<u8>,
    ends: Vec<u32>,
}

impl Chunk {
    fn start(&self, i: usize) -> usize {
        if i == 0 {
            0
        } else {
            self.ends[i - 1] as usize
        }
    }
}

impl Packed {
    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push_back(&mut self, e: &Entry) {
        let size = HEAD + e.id.publisher.len() + e.payload.len();
        let fits = self
            .chunks
            .back()
            .is_some_and(|c| c.data.len() + size <= CHUNK.max(c.data.capacity()));
        if !fits {
            let mut c = self.spare.take().unwrap_or_default();
            c.data.clear();
            c.ends.clear();
            c.data.reserve(CHUNK.max(size));
            self.chunks.push_back(c);
        }
        let Some(c) = self.chunks.back_mut() else {
            return;
        };
        for v in [e.epoch, e.id.seq, e.sent_us, e.received_us] {
            c.data.extend_from_slice(&v.to_le_bytes());
        }
        c.data
            .extend_from_slice(&(e.id.publisher.len() as u32).to_le_bytes());
        c.data.extend_from_slice(e.id.publisher.as_bytes());
        c.data.extend_from_slice(e.payload.as_bytes());
        c.ends.push(c.data.len() as u32);
        self.len += 1;
    }

    fn pop_front(&mut self) {
        let Some(front) = self.chunks.front() else {
            return;
        };
        self.skip += 1;
        self.len -= 1;
        if self.skip == front.ends.len() {
            self.skip = 0;
            self.spare = self.chunks.pop_front();
        }
    }

    /// Keeps the first `keep` entries.
    fn truncate(&mut self, keep: usize) {
        while self.len > keep {
            let first = if self.chunks.len() == 1 { self.skip } else { 0 };
            let Some(back) = self.chunks.back_mut() else {
                break;
            };
            let here = back.ends.len() - first;
            let cut = self.len - keep;
            if cut >= here {
                self.chunks.pop_back();
                self.len -= here;
                if self.chunks.is_empty() {
                    self.skip = 0;
                }
            } else {
                let left = back.ends.len() - cut;
                back.data.truncate(back.start(left));
                back.ends.truncate(left);
                self.len -= cut;
            }
        }
    }

    fn clear(&mut self) {
        self.truncate(0);
    }

    /// Up to `max` entries from the `skip`-th kept one on, whose offset is `offset`.
    fn read(&self, skip: usize, max: usize, mut offset: u64) -> Vec<Arc<Entry>> {
        let mut out = Vec::new();
        let mut at = skip + self.skip;
        for c in &self.chunks {
            if out.len() >= max {
                break;
            }
            if at >= c.ends.len() {
                at -= c.ends.len();
                continue;
            }
            for i in at..c.ends.len() {
                if out.len() >= max {
                    break;
                }
                out.push(Arc::new(decode(
                    &c.data[c.start(i)..c.ends[i] as usize],
                    offset,
                )));
                offset += 1;
            }
            at = 0;
        }
        out
    }
}

/// An entry back from the record [`Packed::push_back`] wrote (ours, so whole: the text in it
/// was a `String`'s).
fn decode(r: &[u8], offset: u64) -> Entry {
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&r[i * 8..i * 8 + 8]);
        u64::from_le_bytes(w)
    };
    let mut n = [0u8; 4];
    n.copy_from_slice(&r[32..HEAD]);
    let publisher_end = HEAD + u32::from_le_bytes(n) as usize;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Entry {
        offset,
        epoch: word(0),
        id: crate::protocol::MsgId {
            publisher: text(&r[HEAD..publisher_end]).into(),
            seq: word(1),
        },
        sent_us: word(2),
        received_us: word(3),
        payload: text(&r[publisher_end..]),
    }
}

/// Every topic's log in memory.
#[derive(Debug)]
pub struct MemLog {
    topics: Named<Topic>,
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
            topics: Named::new(),
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

    /// Appends `e` at the end of `topic` and applies retention; returns the offset it got.
    /// `dense`: `e.offset` must be that offset (else it is ignored: the caller sets it).
    fn push(&mut self, topic: &str, e: &Entry, dense: bool) -> Result<u64, LogError> {
        let held = if topic.starts_with('$') {
            // Nor the node's own topics (the groups' journal is their state).
            0
        } else {
            self.holds.from(topic)
        };
        let t = self.topics.get_or_default(topic);
        let offset = t.next();
        if dense && e.offset != offset {
            return Err(LogError::NotDense {
                topic: topic.to_string(),
                want: offset,
                got: e.offset,
            });
        }
        t.entries.push_back(e);
        // Retention: only entries already delivered (and synced, for a disk) may go, nor what
        // a group has not finished.
        let floor = if self.disk {
            t.delivered.min(t.synced)
        } else {
            t.delivered
        };
        let floor = floor.min(held);
        while t.entries.len() > self.retain && t.first < floor {
            t.entries.pop_front();
            t.first += 1;
        }
        if self.disk {
            self.unsynced += 1;
        } else {
            t.synced = t.next();
        }
        Ok(offset)
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

    fn append(&mut self, topic: &str, e: &Entry) -> Result<(), LogError> {
        self.push(topic, e, true).map(|_| ())
    }

    fn append_next(&mut self, topic: &str, e: &mut Entry) -> Result<(), LogError> {
        e.offset = self.push(topic, e, false)?;
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
        let t = self.topics.get_or_default(topic);
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
        Ok(t.entries.read(skip, max, t.first + skip as u64))
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
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// The entry at `offset` that `edgepair-log fill` writes (seq = offset + 1).
    fn entry(offset: u64) -> Arc<Entry> {
        Arc::new(fill_entry(offset, 8))
    }

    /// The packed entries behave as a queue of whole entries would, under a long random mix
    /// of appends (small, empty and bigger than a chunk), removals from the front, cuts from
    /// the back and reads from anywhere.
    #[test]
    fn packed_entries_read_back_as_a_plain_queue_would() {
        let mut rng = StdRng::seed_from_u64(0x9e37_79b9_7f4a_7c15u64);
        let mut next = move |n: u64| rng.gen_range(0..n);
        let mut packed = Packed::default();
        let mut model: VecDeque<Entry> = VecDeque::new();
        let mut first = 0u64;
        for step in 0..20_000u64 {
            match next(100) {
                0..=59 => {
                    let size = match next(50) {
                        0 => CHUNK + 10,
                        1 => 0,
                        _ => next(300) as usize,
                    };
                    let e = Entry {
                        offset: first + model.len() as u64,
                        epoch: next(5),
                        id: crate::protocol::MsgId {
                            publisher: "p".repeat(next(3) as usize * 7).into(),
                            seq: step,
                        },
                        sent_us: next(u64::MAX),
                        received_us: step * 3,
                        payload: "é".repeat(size / 2),
                    };
                    packed.push_back(&e);
                    model.push_back(e);
                }
                60..=84 => {
                    if !model.is_empty() {
                        packed.pop_front();
                        model.pop_front();
                        first += 1;
                    }
                }
                85..=89 => {
                    let keep = next(model.len() as u64 + 1) as usize;
                    packed.truncate(keep);
                    model.truncate(keep);
                }
                90 => {
                    packed.clear();
                    first += model.len() as u64;
                    model.clear();
                }
                _ => {
                    let skip = next(model.len() as u64 + 2) as usize;
                    let max = next(40) as usize;
                    let got: Vec<Entry> = packed
                        .read(skip, max, first + skip as u64)
                        .into_iter()
                        .map(|e| (*e).clone())
                        .collect();
                    let want: Vec<Entry> = model.iter().skip(skip).take(max).cloned().collect();
                    assert_eq!(got, want, "step {step}");
                }
            }
            assert_eq!(packed.len(), model.len(), "step {step}");
            assert_eq!(packed.is_empty(), model.is_empty());
        }
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
