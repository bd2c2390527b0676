//! [`Inflight`]: the primary's messages accepted and not yet delivered, by `mid`.
//!
//! `mid`s are handed out one after another and a message leaves soon after it came, nearly
//! always in the order it came, so the map is a window of slots from the oldest `mid` still in
//! flight to the newest: a lookup is an index, an insert a push at the back, a removal clears a
//! slot and drops the empty ones at the front. A `BTreeMap` did the same work with a search
//! and a node rebalance on each insert and each removal (~400 instructions a message through a
//! replicated pair, callgrind, `bench --only core`). The window spans from the oldest message
//! in flight to the newest, empty slots between included (a pointer each).

use std::collections::VecDeque;

/// Values by `u64` key, meant for keys that come nearly in order and stay a short while.
#[derive(Debug)]
pub struct Inflight<T> {
    /// The key of `slots[0]`.
    base: u64,
    slots: VecDeque<Option<T>>,
    len: usize,
}

impl<T> Default for Inflight<T> {
    fn default() -> Self {
        Inflight {
            base: 0,
            slots: VecDeque::new(),
            len: 0,
        }
    }
}

impl<T> Inflight<T> {
    /// Where `key`'s slot is, if it is inside the window.
    fn at(&self, key: u64) -> Option<usize> {
        let i = usize::try_from(key.checked_sub(self.base)?).ok()?;
        (i < self.slots.len()).then_some(i)
    }

    /// Puts `value` at `key`; returns what was there.
    pub fn insert(&mut self, key: u64, value: T) -> Option<T> {
        if self.slots.is_empty() {
            self.base = key;
        }
        if key < self.base {
            // Older than anything held: the window grows at the front.
            for _ in key..self.base {
                self.slots.push_front(None);
            }
            self.base = key;
        }
        let i = (key - self.base) as usize;
        while self.slots.len() <= i {
            self.slots.push_back(None);
        }
        let old = self.slots[i].replace(value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Puts `value()` at `key` unless something is there already.
    pub fn insert_if_absent(&mut self, key: u64, value: impl FnOnce() -> T) {
        if !self.contains(key) {
            self.insert(key, value());
        }
    }

    /// The value at `key`.
    pub fn get(&self, key: u64) -> Option<&T> {
        self.slots.get(self.at(key)?)?.as_ref()
    }

    /// Whether `key` holds a value.
    pub fn contains(&self, key: u64) -> bool {
        self.get(key).is_some()
    }

    /// Takes the value at `key` out.
    pub fn remove(&mut self, key: u64) -> Option<T> {
        let i = self.at(key)?;
        let old = self.slots[i].take()?;
        self.len -= 1;
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.base += 1;
        }
        while matches!(self.slots.back(), Some(None)) {
            self.slots.pop_back();
        }
        Some(old)
    }

    /// The smallest key holding a value.
    pub fn first_key(&self) -> Option<u64> {
        // The front slot is never empty while anything is held.
        (self.len > 0).then_some(self.base)
    }

    /// How many values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Every value, in key order.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().flatten()
    }

    /// Every value, in key order, taken out.
    pub fn into_values(self) -> impl Iterator<Item = T> {
        self.slots.into_iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A long random mix of inserts (mostly the next key, some older or far ahead), removals
    /// (mostly the oldest) and lookups agrees with a `BTreeMap` at every step, including the
    /// order values come out in.
    #[test]
    fn behaves_as_an_ordered_map() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let mut map: Inflight<u64> = Inflight::default();
        let mut model: BTreeMap<u64, u64> = BTreeMap::new();
        let mut mid = 1_000u64;
        for step in 0..50_000u64 {
            match next(10) {
                0..=3 => {
                    mid += 1;
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
                6..=7 => {
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
            if step % 1_000 == 0 {
                assert!(map.values().eq(model.values()));
            }
        }
        assert!(map.into_values().eq(model.into_values()));
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
