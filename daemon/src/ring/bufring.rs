//! The provided-buffer ring that multishot receives fill: the kernel picks the buffers per
//! completion, so a connection holds no read buffer while it is idle.
//!
//! A completion may fill several buffers (a receive *bundle*, Linux 6.10): the kernel takes
//! them from the ring's head in order, and the completion names the first. The ring keeps
//! its own copy of which buffer sits at each position, so it knows the others; and since
//! buffers go back in the order they were taken, consecutive positions hold consecutive
//! buffers, which lie side by side in memory: a large message usually arrives as one slice.

use std::io;

use io_uring::{types, IoUring};

/// A ring of equally sized buffers that the kernel picks from for multishot receives, so a
/// connection holds no read buffer while it is idle.
pub struct BufRing {
    /// The shared ring of buffer descriptors (page-aligned, as the kernel requires).
    entries: *mut types::BufRingEntry,
    /// Number of descriptors, a power of two.
    count: u16,
    /// Size of each buffer.
    size: usize,
    /// The buffers themselves, `count * size` bytes.
    memory: Box<[u8]>,
    /// Our copy of the ring's tail (the kernel reads the shared one).
    tail: u16,
    /// The kernel's head as far as completions have shown it: the position of the next
    /// buffer a receive will take.
    head: u16,
    /// Which buffer sits at each position, as we put it there (the kernel reads the shared
    /// descriptors; this copy says which buffers a bundle took after its first).
    order: Box<[u16]>,
    /// The group id the receives name.
    pub group: u16,
    /// Unmaps the descriptors when the ring of buffers goes; declared last so it outlives
    /// every use above.
    _mapping: Mapping,
}

/// An anonymous mapping, unmapped on drop. The kernel pins what it registered, so the
/// mapping may go before the io_uring does; the buffers themselves (`memory`) may not,
/// which is why [`super::Ring`] drops its `BufRing` after its `IoUring`.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: a mapping of `len` bytes made by mmap, unmapped once.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

impl BufRing {
    pub(super) fn new(ring: &IoUring, group: u16, count: u16, size: usize) -> io::Result<BufRing> {
        assert!(count.is_power_of_two());
        let ring_bytes = count as usize * std::mem::size_of::<types::BufRingEntry>();
        // SAFETY: an anonymous private mapping, page-aligned by construction.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mapping = Mapping { ptr, len: ring_bytes };
        let mut br = BufRing {
            entries: ptr as *mut types::BufRingEntry,
            _mapping: mapping,
            count,
            size,
            memory: vec![0u8; count as usize * size].into_boxed_slice(),
            tail: 0,
            head: 0,
            order: vec![0; count as usize].into_boxed_slice(),
            group,
        };
        // SAFETY: the mapping lives as long as `br`, which lives as long as the ring.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(ptr as u64, count, group, 0)?;
        }
        for bid in 0..count {
            br.push(bid);
        }
        br.publish();
        Ok(br)
    }

    fn push(&mut self, bid: u16) {
        let idx = (self.tail & (self.count - 1)) as usize;
        self.order[idx] = bid;
        // SAFETY: idx < count, inside the mapping.
        let entry = unsafe { &mut *self.entries.add(idx) };
        entry.set_addr(self.memory.as_ptr() as u64 + (bid as usize * self.size) as u64);
        entry.set_len(self.size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&mut self) {
        // SAFETY: the tail field of the first entry, per the kernel ABI; a release store so
        // the kernel sees the descriptors before the new tail.
        unsafe {
            let tail =
                types::BufRingEntry::tail(self.entries) as *const std::sync::atomic::AtomicU16;
            (*tail).store(self.tail, std::sync::atomic::Ordering::Release);
        }
    }

    /// The buffers a receive's completion filled with `len` bytes (> 0), `bid` first: as
    /// many as `len` needs, from the ring's head. Panics if `bid` is not at the head, which
    /// would mean a completion was missed or taken twice: the bytes could not be trusted.
    pub fn take(&mut self, bid: u16, len: usize) -> Taken {
        assert!(len > 0, "a completion without bytes takes no buffer");
        let at = self.head;
        let first = self.order[(at & (self.count - 1)) as usize];
        assert_eq!(first, bid, "a receive's first buffer is the one at the ring's head");
        let buffers = len.div_ceil(self.size) as u16;
        self.head = self.head.wrapping_add(buffers);
        Taken { at, next: at, buffers, left: len }
    }

    /// The next run of `taken`'s bytes that lie side by side in memory (consecutive
    /// buffers); `None` once all were handed out.
    pub fn next_run(&mut self, taken: &mut Taken) -> Option<&mut [u8]> {
        if taken.left == 0 {
            return None;
        }
        let mask = self.count - 1;
        let end = taken.at.wrapping_add(taken.buffers);
        let first = self.order[(taken.next & mask) as usize];
        let mut len = taken.left.min(self.size);
        taken.next = taken.next.wrapping_add(1);
        while taken.next != end
            && self.order[(taken.next & mask) as usize] == first + (len / self.size) as u16
        {
            len += (taken.left - len).min(self.size);
            taken.next = taken.next.wrapping_add(1);
        }
        taken.left -= len;
        let start = first as usize * self.size;
        Some(&mut self.memory[start..start + len])
    }

    /// Gives the buffers of `taken` back to the kernel, in the order they were taken.
    pub fn give_back(&mut self, taken: Taken) {
        let mask = self.count - 1;
        for i in 0..taken.buffers {
            // Read before any push: a push may write the position of the one it gives back.
            let bid = self.order[(taken.at.wrapping_add(i) & mask) as usize];
            self.push(bid);
        }
        self.publish();
    }
}

/// The buffers one receive completion filled, from [`BufRing::take`]: read them with
/// [`BufRing::next_run`], then hand them back with [`BufRing::give_back`].
#[derive(Debug)]
#[must_use = "the buffers must be given back"]
pub struct Taken {
    /// The ring position of the first buffer.
    at: u16,
    /// The position of the next buffer [`BufRing::next_run`] hands out.
    next: u16,
    /// How many buffers the completion filled.
    buffers: u16,
    /// Bytes not handed out yet.
    left: usize,
}
