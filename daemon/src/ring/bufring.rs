//! The receive buffers that multishot receives fill: a connection holds no read buffer while
//! it is idle. Under io_uring the kernel picks a buffer per completion from a registered
//! ring of descriptors; under epoll the backend picks one from a free list itself. Either
//! way a completion names the buffer by id, and the process gives it back with
//! [`BufRing::recycle`] once it used the bytes.

use std::io;

use io_uring::{types, IoUring};

/// Equally sized buffers that multishot receives fill, handed out and given back by id, so a
/// connection holds no read buffer while it is idle.
pub struct BufRing {
    /// Who picks the next buffer: the kernel (io_uring) or the epoll backend.
    picker: Picker,
    /// Size of each buffer.
    size: usize,
    /// The buffers themselves, `count * size` bytes.
    memory: Box<[u8]>,
    /// The group id the io_uring receives name (0 under epoll, where nothing names it).
    pub group: u16,
}

/// Who picks the buffer of the next receive.
enum Picker {
    /// The kernel, from the ring of descriptors shared with it.
    Kernel(KernelRing),
    /// The epoll backend, from the ids not in use (a stack: the buffer used last, likely
    /// still in cache, goes out first).
    Pool(Vec<u16>),
}

/// The ring of buffer descriptors registered with an io_uring.
struct KernelRing {
    /// The shared ring of buffer descriptors (page-aligned, as the kernel requires).
    entries: *mut types::BufRingEntry,
    /// Number of descriptors, a power of two.
    count: u16,
    /// Our copy of the ring's tail (the kernel reads the shared one).
    tail: u16,
    /// Unmaps the descriptors when the ring of buffers goes; declared last so it outlives
    /// every use above.
    _mapping: Mapping,
}

/// An anonymous mapping, unmapped on drop. The kernel pins what it registered, so the
/// mapping may go before the io_uring does; the buffers themselves (`memory`) may not,
/// which is why [`super::Ring`] drops its `BufRing` after its backend.
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
    /// Buffers the kernel picks from, registered with `ring` as group `group`.
    pub(super) fn kernel(
        ring: &IoUring,
        group: u16,
        count: u16,
        size: usize,
    ) -> io::Result<BufRing> {
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
        let kernel = KernelRing {
            entries: ptr as *mut types::BufRingEntry,
            _mapping: mapping,
            count,
            tail: 0,
        };
        let mut br = BufRing {
            picker: Picker::Kernel(kernel),
            size,
            memory: vec![0u8; count as usize * size].into_boxed_slice(),
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

    /// Buffers the epoll backend picks from itself.
    pub(super) fn pool(count: u16, size: usize) -> BufRing {
        BufRing {
            // Popped from the end: buffer 0 goes first.
            picker: Picker::Pool((0..count).rev().collect()),
            size,
            memory: vec![0u8; count as usize * size].into_boxed_slice(),
            group: 0,
        }
    }

    fn push(&mut self, bid: u16) {
        let (memory, size) = (self.memory.as_ptr() as u64, self.size);
        match &mut self.picker {
            Picker::Kernel(k) => {
                let idx = (k.tail & (k.count - 1)) as usize;
                // SAFETY: idx < count, inside the mapping.
                let entry = unsafe { &mut *k.entries.add(idx) };
                entry.set_addr(memory + (bid as usize * size) as u64);
                entry.set_len(size as u32);
                entry.set_bid(bid);
                k.tail = k.tail.wrapping_add(1);
            }
            Picker::Pool(free) => free.push(bid),
        }
    }

    fn publish(&mut self) {
        if let Picker::Kernel(k) = &self.picker {
            // SAFETY: the tail field of the first entry, per the kernel ABI; a release store
            // so the kernel sees the descriptors before the new tail.
            unsafe {
                let tail =
                    types::BufRingEntry::tail(k.entries) as *const std::sync::atomic::AtomicU16;
                (*tail).store(k.tail, std::sync::atomic::Ordering::Release);
            }
        }
    }

    /// The bytes received into buffer `bid`.
    pub fn get(&mut self, bid: u16, len: usize) -> &mut [u8] {
        let start = bid as usize * self.size;
        &mut self.memory[start..start + len.min(self.size)]
    }

    /// Gives buffer `bid` back for the next receives.
    pub fn recycle(&mut self, bid: u16) {
        self.push(bid);
        self.publish();
    }

    /// Size of each buffer.
    pub(super) fn size(&self) -> usize {
        self.size
    }

    /// A free buffer for the epoll backend's next read: its id and where it starts; `None`
    /// when every buffer is in use (the receive then ends with ENOBUFS, as under io_uring).
    pub(super) fn take(&mut self) -> Option<(u16, *mut u8)> {
        let Picker::Pool(free) = &mut self.picker else {
            unreachable!("the kernel picks io_uring's buffers");
        };
        let bid = free.pop()?;
        // SAFETY: bid < count, so the offset stays inside `memory`.
        Some((bid, unsafe { self.memory.as_mut_ptr().add(bid as usize * self.size) }))
    }

    /// Gives back a buffer [`BufRing::take`] handed out that received nothing.
    pub(super) fn untake(&mut self, bid: u16) {
        self.push(bid);
    }
}
