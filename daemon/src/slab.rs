//! A slab: values at stable `u32` indices that go into io_uring `user_data`, with freed
//! indices reused, so a loop can find the state of a completion in O(1).
//!
//! The loops keep one rule on top of it: an entry is removed only when none of its
//! operations is in flight, so a completion never reaches an index that was reused.

pub struct Slab<T> {
    /// The entries, in chunks of [`Slab::PER_CHUNK`] allocated as the slab grows and never
    /// moved. One
    /// vector would double and copy itself as connections arrive, each time leaving its old
    /// buffer (as large as all the entries so far) with the allocator, where at many
    /// thousands of connections megabytes of it stayed resident.
    chunks: Vec<Box<[Option<T>]>>,
    /// Indices handed out so far: every index below it is in a chunk; the next new one is
    /// this.
    used: u32,
    /// Freed indices, reused first so the slab stays as small as the peak load.
    free: Vec<u32>,
}

/// Bytes per chunk: small next to a worker's fixed memory, so the last chunk's unused part
/// is too, and large enough that the chunk list stays short. A chunk is sized in bytes, not
/// entries, so that it is exactly one of the allocator's size classes (16 KiB is): a chunk of
/// 256 entries of 56 bytes would be rounded up by an eighth.
const CHUNK_BYTES: usize = 16 * 1024;

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab { chunks: Vec::new(), used: 0, free: Vec::new() }
    }
}

impl<T> Slab<T> {
    /// Entries per chunk (at least one, for entries larger than a chunk).
    const PER_CHUNK: usize = match CHUNK_BYTES / std::mem::size_of::<Option<T>>() {
        0 => 1,
        n => n,
    };

    pub fn insert(&mut self, value: T) -> u32 {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                if self.used as usize == self.chunks.len() * Self::PER_CHUNK {
                    self.chunks.push((0..Self::PER_CHUNK).map(|_| None).collect());
                }
                self.used += 1;
                self.used - 1
            }
        };
        *self.entry_mut(index).expect("an index below `used`") = Some(value);
        index
    }

    pub fn remove(&mut self, index: u32) -> Option<T> {
        let value = self.entry_mut(index)?.take();
        if value.is_some() {
            self.free.push(index);
        }
        value
    }

    pub fn get(&self, index: u32) -> Option<&T> {
        if index >= self.used {
            return None;
        }
        let i = index as usize;
        self.chunks[i / Self::PER_CHUNK][i % Self::PER_CHUNK].as_ref()
    }

    pub fn get_mut(&mut self, index: u32) -> Option<&mut T> {
        self.entry_mut(index)?.as_mut()
    }

    fn entry_mut(&mut self, index: u32) -> Option<&mut Option<T>> {
        if index >= self.used {
            return None;
        }
        let i = index as usize;
        Some(&mut self.chunks[i / Self::PER_CHUNK][i % Self::PER_CHUNK])
    }

    /// Entries in use.
    pub fn len(&self) -> usize {
        self.used as usize - self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every index that may hold an entry (some may be free), for loops that call back into
    /// the owner for each one.
    pub fn indices(&self) -> std::ops::Range<u32> {
        0..self.used
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (u32, &mut T)> {
        let used = self.used as usize;
        let entries = self.chunks.iter_mut().flat_map(|c| c.iter_mut()).take(used);
        entries.enumerate().filter_map(|(i, e)| Some((i as u32, e.as_mut()?)))
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

    #[test]
    fn grows_past_a_chunk() {
        const CHUNK: usize = Slab::<u32>::PER_CHUNK;
        assert_eq!(CHUNK, 16 * 1024 / 8, "Option<u32> is 8 bytes");
        let mut s = Slab::default();
        for i in 0..(CHUNK as u32 * 2 + 3) {
            assert_eq!(s.insert(i), i);
        }
        assert_eq!(s.get(CHUNK as u32 + 1), Some(&(CHUNK as u32 + 1)));
        assert_eq!(s.remove(CHUNK as u32), Some(CHUNK as u32));
        assert_eq!(s.iter_mut().count(), CHUNK * 2 + 2);
        assert_eq!(s.insert(7), CHUNK as u32, "freed index reused");
        assert!(s.get(CHUNK as u32 * 2 + 3).is_none(), "past the last index handed out");
    }
}
