//! Which message identities a node has already accepted, to recognise resends.

use foldhash::HashMap;
use std::collections::BTreeSet;

/// Identities already accepted from one publisher, to recognise resends after a failover.
///
/// Everything at or below `floor` was seen; `above` holds seen sequence numbers past a hole.
/// Memory stays bounded by [`Seen::MAX_ABOVE`].
#[derive(Debug, Default)]
pub struct Seen {
    floor: u64,
    above: BTreeSet<u64>,
}

impl Seen {
    const MAX_ABOVE: usize = 4096;

    /// Whether `seq` was recorded (or is below the floor).
    pub fn contains(&self, seq: u64) -> bool {
        seq <= self.floor || self.above.contains(&seq)
    }

    /// Records `seq`; false if it was seen before.
    pub fn insert(&mut self, seq: u64) -> bool {
        if Some(seq) == self.floor.checked_add(1) && self.above.is_empty() {
            // The common case: the next message of a publisher, no hole.
            self.floor = seq;
            return true;
        }
        if seq <= self.floor || !self.above.insert(seq) {
            return false;
        }
        while let Some(next) = self.floor.checked_add(1).filter(|n| self.above.remove(n)) {
            self.floor = next;
        }
        while self.above.len() > Self::MAX_ABOVE {
            if let Some(first) = self.above.pop_first() {
                self.floor = first;
            }
        }
        true
    }
}

/// Identities seen, per publisher.
///
/// The publisher met last is kept out of the map, so that a stream of one publisher's messages
/// (the common case: a pipelining publisher fills whole batches) finds its entry by comparing
/// names rather than hashing one: the lookup was ~11 % of a solo primary's profile under such a
/// publisher.
#[derive(Debug, Default)]
pub struct SeenMap {
    map: HashMap<String, Seen>,
    last: Option<(String, Seen)>,
}

impl SeenMap {
    /// The entry of `publisher`, made the last one met (made if new). Allocates the publisher's
    /// key only the first time it is met (this runs once per message on the relay path).
    fn entry(&mut self, publisher: &str) -> &mut Seen {
        if self.last.as_ref().is_none_or(|(p, _)| p != publisher) {
            let next = match self.map.remove_entry(publisher) {
                Some(e) => e,
                None => (publisher.to_string(), Seen::default()),
            };
            if let Some((p, s)) = self.last.replace(next) {
                self.map.insert(p, s);
            }
        }
        match &mut self.last {
            Some((_, s)) => s,
            None => unreachable!("set just above"),
        }
    }

    /// Records `seq` of `publisher`; false if it was seen before.
    pub fn record(&mut self, publisher: &str, seq: u64) -> bool {
        self.entry(publisher).insert(seq)
    }

    /// Whether `seq` of `publisher` was recorded.
    pub fn contains(&self, publisher: &str, seq: u64) -> bool {
        match &self.last {
            Some((p, s)) if p == publisher => s.contains(seq),
            _ => self.map.get(publisher).is_some_and(|s| s.contains(seq)),
        }
    }

    /// Forgets everything (a node that steps down relearns identities from its new primary).
    pub fn clear(&mut self) {
        self.map.clear();
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_knows_every_sequence_number_it_recorded_in_any_order() {
        let mut s = Seen::default();
        for seq in 1..=100 {
            assert!(s.insert(seq), "{seq} is new");
        }
        assert_eq!(
            (s.floor, s.above.len()),
            (100, 0),
            "in order: no set at all"
        );
        assert!(!s.insert(57), "a resend is recognised");
        assert!(s.insert(103));
        assert!(s.insert(102));
        assert!(!s.insert(103));
        assert!(s.insert(101));
        assert_eq!((s.floor, s.above.len()), (103, 0), "the hole closed");
        for seq in 1..=103 {
            assert!(!s.insert(seq));
        }
    }

    #[test]
    fn seen_allocates_a_publisher_key_once() {
        let mut seen = SeenMap::default();
        assert!(seen.record("p", 1));
        assert!(seen.record("p", 2));
        assert!(!seen.record("p", 1));
        assert!(seen.record("q", 1));
        assert_eq!(seen.map.len() + usize::from(seen.last.is_some()), 2);
    }

    #[test]
    fn publishers_taking_turns_keep_their_own_sequence_numbers() {
        let mut seen = SeenMap::default();
        for seq in 1..=3 {
            assert!(seen.record("p", seq));
            assert!(seen.record("q", seq * 10));
            assert!(seen.record("r", seq));
        }
        for (publisher, seq, was) in [
            ("p", 3, true),
            ("p", 4, false),
            ("q", 20, true),
            ("q", 21, false),
            ("r", 1, true),
            ("s", 1, false),
        ] {
            assert_eq!(seen.contains(publisher, seq), was, "{publisher}:{seq}");
        }
        assert!(!seen.record("q", 30), "q's 30 is q's, whoever came between");
        assert!(seen.record("p", 4));
        seen.clear();
        assert!(!seen.contains("p", 1) && !seen.contains("q", 10));
    }
}
