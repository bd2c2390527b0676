//! [`Named`]: a map by topic name that finds the name it found last with one comparison.
//!
//! A publish looks its topic up by name in the log (to append, then to move the delivered
//! mark) and in the subscriber table, and the next publish is most often on the same topic.
//! Hashing the name and probing a table cost ~100 instructions a lookup on the relay path
//! (callgrind, `bench --only core`); comparing it with the last name found costs a fifth of
//! that. Any other name goes through the hash table as before.

use std::cell::Cell;

use foldhash::{HashMap, HashMapExt};

/// A map from names to `T`, in insertion order (removal moves the last one into the gap).
#[derive(Debug, Clone)]
pub struct Named<T> {
    slots: Vec<(String, T)>,
    index: HashMap<String, usize>,
    /// The slot of the name found last (may be past the end after a removal).
    last: Cell<usize>,
}

impl<T> Default for Named<T> {
    fn default() -> Self {
        Named {
            slots: Vec::new(),
            index: HashMap::new(),
            last: Cell::new(0),
        }
    }
}

impl<T> Named<T> {
    /// An empty map.
    pub fn new() -> Named<T> {
        Named::default()
    }

    /// The slot of `name`, if it is in the map.
    #[inline]
    fn find(&self, name: &str) -> Option<usize> {
        let last = self.last.get();
        if let Some((n, _)) = self.slots.get(last) {
            if n == name {
                return Some(last);
            }
        }
        let i = *self.index.get(name)?;
        self.last.set(i);
        Some(i)
    }

    /// The value of `name`.
    #[inline]
    pub fn get(&self, name: &str) -> Option<&T> {
        let i = self.find(name)?;
        self.slots.get(i).map(|(_, v)| v)
    }

    /// The value of `name`, to change.
    #[inline]
    pub fn get_mut(&mut self, name: &str) -> Option<&mut T> {
        let i = self.find(name)?;
        self.slots.get_mut(i).map(|(_, v)| v)
    }

    /// Whether `name` is in the map.
    pub fn contains_key(&self, name: &str) -> bool {
        self.find(name).is_some()
    }

    /// The value of `name`, inserted as `T::default()` if it was not there (the name is copied
    /// only then).
    pub fn get_or_default(&mut self, name: &str) -> &mut T
    where
        T: Default,
    {
        let i = match self.find(name) {
            Some(i) => i,
            None => {
                let i = self.slots.len();
                self.slots.push((name.to_string(), T::default()));
                self.index.insert(name.to_string(), i);
                self.last.set(i);
                i
            }
        };
        &mut self.slots[i].1
    }

    /// Removes `name`; returns its value.
    pub fn remove(&mut self, name: &str) -> Option<T> {
        let i = self.index.remove(name)?;
        let (_, v) = self.slots.swap_remove(i);
        if let Some((moved, _)) = self.slots.get(i) {
            // The last slot moved into the gap.
            if let Some(at) = self.index.get_mut(moved.as_str()) {
                *at = i;
            }
        }
        self.last.set(i);
        Some(v)
    }

    /// Every name with its value.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &T)> {
        self.slots.iter().map(|(n, v)| (n, v))
    }

    /// Every value, to change.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.slots.iter_mut().map(|(_, v)| v)
    }

    /// How many names.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use std::collections::HashMap as Model;

    /// A long random mix of inserts, changes, removals and lookups (the same name in a row
    /// often, as the relay path does) agrees with a plain hash map at every step.
    #[test]
    fn behaves_as_a_plain_map() {
        let mut rng = StdRng::seed_from_u64(0x2545_f491_4f6c_dd1du64);
        let mut next = move |n: u64| rng.gen_range(0..n);
        let mut named: Named<u64> = Named::new();
        let mut model: Model<String, u64> = Model::new();
        for step in 0..20_000u64 {
            let name = format!("t{}", next(12));
            match next(6) {
                0 => {
                    *named.get_or_default(&name) += step;
                    *model.entry(name.clone()).or_default() += step;
                }
                1 => assert_eq!(named.remove(&name), model.remove(&name), "remove {name}"),
                2 => {
                    if let Some(v) = named.get_mut(&name) {
                        *v += 1;
                    }
                    if let Some(v) = model.get_mut(&name) {
                        *v += 1;
                    }
                }
                _ => {
                    for _ in 0..3 {
                        assert_eq!(named.get(&name), model.get(&name), "get {name}");
                    }
                    assert_eq!(named.contains_key(&name), model.contains_key(&name));
                }
            }
            assert_eq!(named.len(), model.len());
        }
        let mut all: Vec<(String, u64)> = named.iter().map(|(n, v)| (n.clone(), *v)).collect();
        let mut want: Vec<(String, u64)> = model.into_iter().collect();
        all.sort();
        want.sort();
        assert_eq!(all, want);
        for v in named.values_mut() {
            *v = 0;
        }
        assert!(named.iter().all(|(_, v)| *v == 0));
    }

    /// A removal that moves another name into the gap leaves both findable, including the one
    /// found last before it.
    #[test]
    fn removal_keeps_the_others_findable() {
        let mut named: Named<u32> = Named::new();
        for (i, n) in ["a", "b", "c"].iter().enumerate() {
            *named.get_or_default(n) = i as u32;
        }
        assert_eq!(named.get("c"), Some(&2));
        assert_eq!(named.remove("a"), Some(0));
        assert_eq!(named.get("c"), Some(&2));
        assert_eq!(named.get("b"), Some(&1));
        assert_eq!(named.get("a"), None);
        assert_eq!(named.remove("c"), Some(2));
        assert_eq!(named.get("c"), None);
        assert_eq!(named.get("b"), Some(&1));
        assert!(!named.is_empty());
    }
}
