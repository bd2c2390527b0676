//! [`Inflight`]: the primary's messages accepted and not yet delivered, by `mid`.
//!
//! `mid`s are handed out one after another and a message leaves soon after it came, nearly
//! always in the order it came, so the map is a window of slots from the oldest `mid` still in
//! flight to the newest: a lookup is an index, an insert a push at the back, a removal clears a
//! slot and drops the empty ones at the front. A `BTreeMap` did the same work with a search
//! and a node rebalance on each insert and each removal (~400 instructions a message through a
//! replicated pair, callgrind, `bench --only core`).
//!
//! A message can stay much longer than the rest (parked behind a topic's backlog while the log
//! is taken up after a takeover, say) while other topics go on. So the window spans at most
//! [`SPAN`] `mid`s: older values leave it for a `BTreeMap` of stragglers, and the window's
//! memory stays bounded (a pointer a slot) however long one message stays.

use std::collections::{BTreeMap, VecDeque};

/// Most `mid`s the window of slots spans (512 KiB of slots at most).
pub const SPAN: u64 = 1 << 16;

/// Values by `u64` key, meant for keys that come nearly in order and stay a short while.
#[derive(Debug)]
pub struct Inflight<T> {
    /// The key of `slots[0]`.
    base: u64,
    slots: VecDeque<Option<T>>,
    /// Values in the window.
    in_window: usize,
    /// Values older than the window (keys below `base`).
    old: BTreeMap<u64, T>,
    span: u64,
}

impl<T> Default for Inflight<T> {
    fn default() -> Self {
        Inflight::with_span(SPAN)
    }
}

impl<T> Inflight<T> {
    /// A map whose window spans at most `span` keys (at least 1).
    pub fn with_span(span: u64) -> Inflight<T> {
        Inflight {
            base: 0,
            slots: VecDeque::new(),
            in_window: 0,
            old: BTreeMap::new(),
            span: span.max(1),
        }
    }

    /// Where `key`'s slot is, if it is inside the window.
    fn at(&self, key: u64) -> Option<usize> {
        let i = usize::try_from(key.checked_sub(self.base)?).ok()?;
        (i < self.slots.len()).then_some(i)
    }

    /// Puts `value` at `key`; returns what was there.
    pub fn insert(&mut self, key: u64, value: T) -> Option<T> {
        // Every straggler's key is below `base`, every key in the window at or above it.
        if self.slots.is_empty() {
            if self.old.keys().next_back().is_some_and(|&top| key <= top) {
                return self.old.insert(key, value);
            }
            self.base = key;
        }
        if key < self.base {
            // Older than the window: a straggler.
            return self.old.insert(key, value);
        }
        if key - self.base >= self.span {
            // Far ahead: what the window can no longer span moves out of it first.
            self.slide_to(key - self.span + 1);
            if self.slots.is_empty() {
                self.base = key;
            }
        }
        let i = (key - self.base) as usize;
        while self.slots.len() <= i {
            self.slots.push_back(None);
        }
        let old = self.slots[i].replace(value);
        if old.is_none() {
            self.in_window += 1;
        }
        old
    }

    /// Moves the window's start up to `base`: the values below it go to the stragglers.
    fn slide_to(&mut self, base: u64) {
        while self.base < base {
            let Some(slot) = self.slots.pop_front() else {
                break;
            };
            if let Some(v) = slot {
                self.in_window -= 1;
                self.old.insert(self.base, v);
            }
            self.base += 1;
        }
        self.trim();
    }

    /// Drops empty slots at both ends, so the first and last slots hold values.
    fn trim(&mut self) {
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.base += 1;
        }
        while matches!(self.slots.back(), Some(None)) {
            self.slots.pop_back();
        }
    }

    /// Puts `value()` at `key` unless something is there already.
    pub fn insert_if_absent(&mut self, key: u64, value: impl FnOnce() -> T) {
        if !self.contains(key) {
            self.insert(key, value());
        }
    }

    /// The value at `key`.
    pub fn get(&self, key: u64) -> Option<&T> {
        match self.at(key) {
            Some(i) => self.slots.get(i)?.as_ref(),
            None => self.old.get(&key),
        }
    }

    /// Whether `key` holds a value.
    pub fn contains(&self, key: u64) -> bool {
        self.get(key).is_some()
    }

    /// Takes the value at `key` out.
    pub fn remove(&mut self, key: u64) -> Option<T> {
        let Some(i) = self.at(key) else {
            return self.old.remove(&key);
        };
        let old = self.slots[i].take()?;
        self.in_window -= 1;
        self.trim();
        Some(old)
    }

    /// The smallest key holding a value.
    pub fn first_key(&self) -> Option<u64> {
        // The window's first slot is never empty while it holds anything.
        let window = (self.in_window > 0).then_some(self.base);
        self.old.keys().next().copied().or(window)
    }

    /// How many values.
    pub fn len(&self) -> usize {
        self.in_window + self.old.len()
    }

    /// Every value, in key order.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.old.values().chain(self.slots.iter().flatten())
    }

    /// Every value, in key order, taken out.
    pub fn into_values(self) -> impl Iterator<Item = T> {
        self.old
            .into_values()
            .chain(self.slots.into_iter().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// A long random mix of inserts (mostly the next key, some older or far ahead), removals
    /// (mostly the oldest) and lookups agrees with a `BTreeMap` at every step, including the
    /// order values come out in; with a window of 16 keys, values often leave it as stragglers.
    #[test]
    fn behaves_as_an_ordered_map() {
        for span in [16, SPAN] {
            let mut rng = StdRng::seed_from_u64(0x9e37_79b9_7f4a_7c15u64);
            let mut next = move |n: u64| rng.gen_range(0..n);
            let mut map: Inflight<u64> = Inflight::with_span(span);
            let mut model: BTreeMap<u64, u64> = BTreeMap::new();
            let mut mid = 1_000u64;
            for step in 0..50_000u64 {
                match next(10) {
                    0..=3 => {
                        mid += 1 + next(3);
                        assert_eq!(map.insert(mid, step), model.insert(mid, step));
                    }
                    4 => {
                        let k = mid.saturating_sub(next(50)) + next(5);
                        assert_eq!(map.insert(k, step), model.insert(k, step), "insert {k}");
                    }
                    5 => {
                        let k = mid.saturating_sub(next(50));
                        map.insert_if_absent(k, || step);
                        model.entry(k).or_insert(step);
                    }
                    6 => {
                        let k = model.keys().next().copied().unwrap_or(mid);
                        assert_eq!(map.remove(k), model.remove(&k));
                    }
                    _ => {
                        let k = mid.saturating_sub(next(60));
                        assert_eq!(map.remove(k), model.remove(&k), "remove {k}");
                    }
                }
                let k = mid.saturating_sub(next(70));
                assert_eq!(map.get(k), model.get(&k));
                assert_eq!(map.contains(k), model.contains_key(&k));
                assert_eq!(map.len(), model.len());
                assert_eq!(map.first_key(), model.keys().next().copied());
                assert!(map.slots.len() as u64 <= span, "window {}", map.slots.len());
                if step % 1_000 == 0 {
                    assert!(map.values().eq(model.values()));
                }
            }
            assert!(map.into_values().eq(model.into_values()));
        }
    }

    /// One value that stays while a million others come and go leaves the window's memory
    /// bounded: it moves to the stragglers, and is still found, first, and removable.
    #[test]
    fn a_value_that_stays_does_not_stretch_the_window() {
        let mut map: Inflight<u64> = Inflight::with_span(1024);
        map.insert(1, 1);
        for k in 2..1_000_000u64 {
            map.insert(k, k);
            assert_eq!(map.remove(k), Some(k));
        }
        assert!(map.slots.capacity() <= 2048, "{}", map.slots.capacity());
        assert_eq!(map.first_key(), Some(1));
        assert_eq!(map.get(1), Some(&1));
        assert_eq!(map.len(), 1);
        assert_eq!(map.remove(1), Some(1));
        assert_eq!(map.len(), 0);
    }

    /// Removing everything leaves nothing behind, and the window starts again anywhere.
    #[test]
    fn an_emptied_map_starts_again_at_any_key() {
        let mut map: Inflight<&str> = Inflight::default();
        map.insert(10, "a");
        map.insert(12, "c");
        assert_eq!(map.remove(10), Some("a"));
        assert_eq!(map.first_key(), Some(12));
        assert_eq!(map.remove(12), Some("c"));
        assert_eq!(map.len(), 0);
        assert_eq!(map.first_key(), None);
        map.insert(5, "x");
        assert_eq!(map.get(5), Some(&"x"));
        assert_eq!(map.first_key(), Some(5));
        assert_eq!(map.remove(4), None);
        assert_eq!(map.remove(u64::MAX), None);
    }
}
