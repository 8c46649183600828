//! WebSocket payload masking (RFC 6455 section 5.3).
//!
//! Every client-to-server frame is XORed with a 4-byte key. The server unmasks each inbound
//! payload in place, and the test and load clients mask what they send, so this runs over
//! every byte that crosses a connection. It therefore works a machine word at a time: the
//! bytes before the first 8-byte boundary and after the last one go through a byte loop, the
//! aligned middle is XORed with the key repeated into a `u64`.

/// XORs `buf` with the repeating `key`, starting at `key[0]`. Masking and unmasking are the
/// same operation.
///
/// To continue a payload that was cut after `n` bytes, rotate the key left by `n % 4` first.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    if key == [0; 4] {
        // XOR with zero changes nothing: frames from a server (a relay's upstream) carry none.
        return;
    }
    // SAFETY: every bit pattern is a valid `u64`, and `align_to_mut` only hands out the middle
    // part at `u64` alignment, so viewing those bytes as words is sound.
    let (head, words, tail) = unsafe { buf.align_to_mut::<u64>() };
    mask_bytes(head, key);

    // The words start `head.len()` bytes into the payload, so the key continues from there.
    let mut key = key;
    key.rotate_left(head.len() % 4);
    let wide = u64::from_ne_bytes([key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3]]);
    for word in words {
        *word ^= wide;
    }

    // A word is two whole key lengths, so the tail starts at the same key position.
    mask_bytes(tail, key);
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
        let source: Vec<u8> = (0..200u32).map(|i| (i * 7 + 3) as u8).collect();
        for key in keys {
            // Starting at offsets 0..8 within the buffer puts the slice at every alignment.
            for offset in 0..8 {
                for len in 0..(source.len() - offset) {
                    let mut fast = source.clone();
                    let mut slow = source.clone();
                    apply_mask(&mut fast[offset..offset + len], key);
                    naive(&mut slow[offset..offset + len], key);
                    assert_eq!(fast, slow, "offset {offset} len {len}");
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
