//! The provided-buffer ring that multishot receives fill: the kernel picks a buffer per
//! completion, so a connection holds no read buffer while it is idle.

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

    /// The bytes the kernel put in buffer `bid`.
    pub fn get(&mut self, bid: u16, len: usize) -> &mut [u8] {
        let start = bid as usize * self.size;
        &mut self.memory[start..start + len.min(self.size)]
    }

    /// Gives buffer `bid` back to the kernel.
    pub fn recycle(&mut self, bid: u16) {
        self.push(bid);
        self.publish();
    }
}
