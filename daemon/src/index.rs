//! An index from names (clientIDs, clientGroupIDs) to the slab entries that hold them,
//! without a second copy of any name: the table keeps bare `u32` indices, and the caller
//! says where each index's name is.
//!
//! A worker keeps one entry per connection and one per client group, most of them idle. A
//! map keyed by its own copy of each name paid for every name twice, plus a 16-byte key and
//! the value in every bucket; this table's buckets are four bytes.

use std::hash::{BuildHasher, RandomState};

use hashbrown::hash_table::Entry;
use hashbrown::HashTable;

#[derive(Default)]
pub struct NameIndex {
    table: HashTable<u32>,
    /// Keyed per process, as std's maps are: the names come from clients, who must not be
    /// able to aim them all at one bucket.
    hasher: RandomState,
}

impl NameIndex {
    /// The index `name` maps to; `name_of` gives the name of any index in the table.
    pub fn find<'a>(&self, name: &str, name_of: impl Fn(u32) -> &'a str) -> Option<u32> {
        let hash = self.hasher.hash_one(name);
        self.table.find(hash, |&i| name_of(i) == name).copied()
    }

    /// Maps `name` to `index` (whose entry must already answer `name_of(index) == name`),
    /// and returns the index it mapped to before, if any.
    pub fn insert<'a>(
        &mut self,
        name: &str,
        index: u32,
        name_of: impl Fn(u32) -> &'a str,
    ) -> Option<u32> {
        let hasher = &self.hasher;
        let hash = hasher.hash_one(name);
        let entry =
            self.table.entry(hash, |&i| name_of(i) == name, |&i| hasher.hash_one(name_of(i)));
        match entry {
            Entry::Occupied(mut e) => Some(std::mem::replace(e.get_mut(), index)),
            Entry::Vacant(e) => {
                e.insert(index);
                None
            }
        }
    }

    /// Forgets `name` if it maps to `index`: an entry that was replaced under its name must
    /// not remove its successor when it goes. Returns whether it did.
    pub fn remove(&mut self, name: &str, index: u32) -> bool {
        let hash = self.hasher.hash_one(name);
        match self.table.find_entry(hash, |&i| i == index) {
            Ok(e) => {
                e.remove();
                true
            }
            Err(_) => false,
        }
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_replaces_and_removes_by_index() {
        let names = ["a", "b", "a"];
        let name_of = |i: u32| names[i as usize];
        let mut index = NameIndex::default();
        assert_eq!(index.insert("a", 0, name_of), None);
        assert_eq!(index.insert("b", 1, name_of), None);
        assert_eq!(index.find("a", name_of), Some(0));
        assert_eq!(index.find("c", name_of), None);
        // Entry 2 takes over the name "a"; entry 0 leaving then changes nothing.
        assert_eq!(index.insert("a", 2, name_of), Some(0));
        assert!(!index.remove("a", 0));
        assert_eq!(index.find("a", name_of), Some(2));
        assert!(index.remove("a", 2));
        assert_eq!(index.find("a", name_of), None);
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn survives_growth_with_names_held_elsewhere() {
        let names: Vec<String> = (0..5000).map(|i| format!("client-{i}")).collect();
        let name_of = |i: u32| names[i as usize].as_str();
        let mut index = NameIndex::default();
        for (i, name) in names.iter().enumerate() {
            assert_eq!(index.insert(name, i as u32, name_of), None);
        }
        for (i, name) in names.iter().enumerate() {
            assert_eq!(index.find(name, name_of), Some(i as u32), "{name}");
        }
        for (i, name) in names.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
            assert!(index.remove(name, i as u32));
        }
        assert_eq!(index.len(), 2500);
        assert_eq!(index.find("client-2", name_of), None);
        assert_eq!(index.find("client-3", name_of), Some(3));
    }
}
