//! WebSocket payload masking (RFC 6455 section 5.3).
//!
//! Every client-to-server frame is XORed with a 4-byte key. The server unmasks each inbound
//! payload in place, and the test and load clients mask what they send, so this runs over
//! every byte that crosses a connection. It therefore works a machine word at a time: the
//! payload is XORed 8 bytes at a time with the key repeated into a `u64`, and the last
//! bytes one at a time.

/// XORs `buf` with the repeating `key`, starting at `key[0]`. Masking and unmasking are the
/// same operation.
///
/// To continue a payload that was cut after `n` bytes, rotate the key left by `n % 4` first.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    if key == [0; 4] {
        // XOR with zero changes nothing: frames from a server (a relay's upstream) carry none.
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if buf.len() >= AVX2_FROM && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above (the answer is cached after the first
        // call).
        return unsafe { mask_words_avx2(buf, key) };
    }
    mask_words(buf, key)
}

/// Payloads from this size on are masked with 32-byte registers where the CPU has them. The
/// baseline x86-64 build has 16-byte ones only, and unmasking was 9% of the worker's time
/// echoing 64 KiB messages (bench/RESULTS.md); below a few words the check costs more than
/// it saves.
#[cfg(target_arch = "x86_64")]
const AVX2_FROM: usize = 128;

/// [`mask_words`] compiled for AVX2, so that its word loop is vectorised 32 bytes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn mask_words_avx2(buf: &mut [u8], key: [u8; 4]) {
    mask_words(buf, key)
}

/// The loop behind [`apply_mask`]; inlined so that each caller's target features apply.
/// Words are read and written unaligned: on x86-64 that costs nothing, and an aligned
/// middle (`align_to_mut`) cost a 20-byte payload two byte loops around one word, about
/// 135 instructions where this takes about 45.
#[inline(always)]
fn mask_words(buf: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3]]);
    let mut words = buf.chunks_exact_mut(8);
    for word in &mut words {
        let masked = u64::from_ne_bytes((&*word).try_into().expect("8 bytes")) ^ wide;
        word.copy_from_slice(&masked.to_ne_bytes());
    }
    // A word is two whole key lengths, so the tail starts at key[0].
    mask_bytes(words.into_remainder(), key);
}

/// Appends `src` XORed with the repeating `key` (from `key[0]`) to `dst`: the copy and the
/// unmasking in one pass, for payload bytes that must be kept (a frame cut by the end of a
/// read), where copying and then unmasking in place would go over them twice.
pub fn extend_masked(dst: &mut Vec<u8>, src: &[u8], key: [u8; 4]) {
    if key == [0; 4] {
        return dst.extend_from_slice(src);
    }
    dst.reserve(src.len());
    #[cfg(target_arch = "x86_64")]
    if src.len() >= AVX2_FROM && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked), and `dst` has room for `src` (reserved).
        return unsafe { copy_masked_avx2(dst, src, key) };
    }
    // SAFETY: `dst` has room for `src` (reserved above).
    unsafe { copy_masked(dst, src, key) }
}

/// [`copy_masked`] compiled for AVX2.
///
/// # Safety
/// The CPU has AVX2, and `dst` has spare capacity for `src.len()` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn copy_masked_avx2(dst: &mut Vec<u8>, src: &[u8], key: [u8; 4]) {
    copy_masked(dst, src, key)
}

/// The loop behind [`extend_masked`], a word at a time.
///
/// # Safety
/// `dst` has spare capacity for `src.len()` bytes.
#[inline(always)]
unsafe fn copy_masked(dst: &mut Vec<u8>, src: &[u8], key: [u8; 4]) {
    let len = dst.len();
    let n = src.len();
    debug_assert!(dst.capacity() - len >= n);
    let wide = u64::from_ne_bytes([key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3]]);
    // SAFETY (for the block): `out` points at `n` bytes of spare capacity, and every read and
    // write below stays within `src[..n]` and `out[..n]`; unaligned word accesses are allowed.
    unsafe {
        let out = dst.as_mut_ptr().add(len);
        let mut i = 0;
        while i + 8 <= n {
            let word = src.as_ptr().add(i).cast::<u64>().read_unaligned();
            out.add(i).cast::<u64>().write_unaligned(word ^ wide);
            i += 8;
        }
        // `i` is a multiple of 8, so the key starts over at key[0].
        while i < n {
            *out.add(i) = src[i] ^ key[i % 4];
            i += 1;
        }
        dst.set_len(len + n);
    }
}

/// A fresh masking key for a frame this process sends as a client (the upstream hop of a
/// relay). RFC 6455 asks for keys a script in a browser cannot predict; a relay's upstream
/// hop carries no script's bytes it chose for the purpose, but the keys are random anyway:
/// a xorshift generator per thread, seeded from the standard library's random hash keys.
pub fn new_key() -> [u8; 4] {
    (random_u64() as u32).to_ne_bytes()
}

/// 64 random bits from the thread's generator (also the upgrade request's nonce).
pub fn random_u64() -> u64 {
    use std::cell::Cell;
    use std::hash::{BuildHasher, Hasher};
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(std::process::id().into());
            h.finish() | 1
        });
    }
    STATE.with(|s| {
        // xorshift64* (Vigna): fast, full period over non-zero states.
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

/// The byte-at-a-time loop for the unaligned ends.
fn mask_bytes(bytes: &mut [u8], key: [u8; 4]) {
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte ^= key[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(buf: &mut [u8], key: [u8; 4]) {
        for (i, byte) in buf.iter_mut().enumerate() {
            *byte ^= key[i % 4];
        }
    }

    #[test]
    fn matches_naive_loop_for_all_lengths_and_alignments() {
        let keys = [[0x37, 0xfa, 0x21, 0x3d], [0xff, 0x00, 0x80, 0x01]];
        // Past AVX2_FROM, so both the 32-byte path (where the CPU has it) and the portable
        // one are compared with the naive loop.
        let source: Vec<u8> = (0..400u32).map(|i| (i * 7 + 3) as u8).collect();
        for key in keys {
            // Starting at offsets 0..32 within the buffer puts the slice at every alignment.
            for offset in 0..32 {
                for len in 0..(source.len() - offset) {
                    let range = offset..offset + len;
                    let mut slow = source.clone();
                    naive(&mut slow[range.clone()], key);
                    let mut fast = source.clone();
                    apply_mask(&mut fast[range.clone()], key);
                    assert_eq!(fast, slow, "offset {offset} len {len}");
                    let mut portable = source.clone();
                    mask_words(&mut portable[range], key);
                    assert_eq!(portable, slow, "portable, offset {offset} len {len}");
                }
            }
        }
    }

    #[test]
    fn extend_masked_copies_and_unmasks_in_one_pass() {
        let source: Vec<u8> = (0..400u32).map(|i| (i * 13 + 1) as u8).collect();
        for key in [[0x37, 0xfa, 0x21, 0x3d], [0; 4]] {
            for offset in 0..16 {
                for len in 0..(source.len() - offset) {
                    let src = &source[offset..offset + len];
                    let mut expected = b"kept".to_vec();
                    let mut masked = src.to_vec();
                    naive(&mut masked, key);
                    expected.extend_from_slice(&masked);
                    let mut dst = b"kept".to_vec();
                    extend_masked(&mut dst, src, key);
                    assert_eq!(dst, expected, "offset {offset} len {len}");
                    let mut portable = b"kept".to_vec();
                    portable.reserve(len);
                    // SAFETY: room for `len` bytes was reserved just above.
                    unsafe { copy_masked(&mut portable, src, key) };
                    assert_eq!(portable, expected, "portable, offset {offset} len {len}");
                }
            }
        }
    }

    #[test]
    fn masking_twice_restores_and_once_changes() {
        let original: Vec<u8> = (0..=255).collect();
        let mut buf = original.clone();
        let key = [1, 2, 3, 4];
        apply_mask(&mut buf, key);
        assert_ne!(buf, original);
        apply_mask(&mut buf, key);
        assert_eq!(buf, original);
    }

    #[test]
    fn rotated_key_continues_a_cut_payload() {
        let original: Vec<u8> = (0..100).collect();
        let key = [9, 8, 7, 6];
        let mut whole = original.clone();
        apply_mask(&mut whole, key);
        for cut in 0..original.len() {
            let mut pieces = original.clone();
            let (first, second) = pieces.split_at_mut(cut);
            apply_mask(first, key);
            let mut rest_key = key;
            rest_key.rotate_left(cut % 4);
            apply_mask(second, rest_key);
            assert_eq!(pieces, whole, "cut {cut}");
        }
    }
}
