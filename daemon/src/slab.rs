//! A slab: values at stable `u32` indices that go into io_uring `user_data`, with freed
//! indices reused, so a loop can find the state of a completion in O(1).
//!
//! The loops keep one rule on top of it: an entry is removed only when none of its
//! operations is in flight, so a completion never reaches an index that was reused.

pub struct Slab<T> {
    entries: Vec<Option<T>>,
    /// Freed indices, reused first so the vector stays as small as the peak load.
    free: Vec<u32>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab { entries: Vec::new(), free: Vec::new() }
    }
}

impl<T> Slab<T> {
    pub fn insert(&mut self, value: T) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.entries[i as usize] = Some(value);
                i
            }
            None => {
                self.entries.push(Some(value));
                (self.entries.len() - 1) as u32
            }
        }
    }

    pub fn remove(&mut self, index: u32) -> Option<T> {
        let value = self.entries.get_mut(index as usize)?.take();
        if value.is_some() {
            self.free.push(index);
        }
        value
    }

    pub fn get(&self, index: u32) -> Option<&T> {
        self.entries.get(index as usize)?.as_ref()
    }

    pub fn get_mut(&mut self, index: u32) -> Option<&mut T> {
        self.entries.get_mut(index as usize)?.as_mut()
    }

    /// Entries in use.
    pub fn len(&self) -> usize {
        self.entries.len() - self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every index that may hold an entry (some may be free), for loops that call back into
    /// the owner for each one.
    pub fn indices(&self) -> std::ops::Range<u32> {
        0..self.entries.len() as u32
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (u32, &mut T)> {
        self.entries.iter_mut().enumerate().filter_map(|(i, e)| Some((i as u32, e.as_mut()?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_stable_and_reused() {
        let mut s = Slab::default();
        let a = s.insert("a");
        let b = s.insert("b");
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.remove(a), None, "a second remove is a no-op");
        assert_eq!(s.get(b), Some(&"b"));
        let c = s.insert("c");
        assert_eq!(c, a, "freed index reused");
        assert_eq!(s.len(), 2);
        assert_eq!(s.iter_mut().map(|(i, _)| i).collect::<Vec<_>>(), vec![a, b]);
        assert!(s.get(99).is_none());
    }
}
