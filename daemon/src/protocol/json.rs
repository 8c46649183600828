//! Writing rows as JSON, fast.
//!
//! A row is written several times per push: measured for the group's limits, into the
//! stored history, into every poke. Its text is mostly strings that need no escaping (a
//! 16 KiB value is one long string), and serde_json escapes byte by byte. Here a string is
//! checked a chunk at a time and, when nothing in it needs escaping, copied whole; one that
//! does is copied in runs between its escapes, which are serde_json's. Numbers, booleans and
//! null go to serde_json, so the output is always byte for byte what `serde_json::to_writer`
//! writes (the tests hold it to that).

use serde_json::{Map, Value};

/// Bytes checked per step of [`needs_escape`]: wide enough for the compiler to test a whole
/// vector register at once, short enough that a string with an early escape stops soon.
const CHUNK: usize = 64;

/// Appends `value` as JSON.
pub fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::String(s) => write_str(out, s),
        Value::Object(map) => write_object(out, map),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        // null, booleans and numbers are short: serde_json's own text.
        other => serde_json::to_writer(out, other).expect("writing to a Vec cannot fail"),
    }
}

/// Appends an object (a row) as JSON, its keys in the map's order.
pub fn write_object(out: &mut Vec<u8>, map: &Map<String, Value>) {
    write_entries(out, map, write_value);
}

/// Appends an object of `entries` in their order, each value written by `write`.
fn write_entries<'a, V: 'a>(
    out: &mut Vec<u8>,
    entries: impl IntoIterator<Item = (&'a String, &'a V)>,
    write: impl Fn(&mut Vec<u8>, &V),
) {
    out.push(b'{');
    for (i, (key, value)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, key);
        out.push(b':');
        write(out, value);
    }
    out.push(b'}');
}

/// Appends a string as JSON: quoted, and escaped where it must be, as serde_json escapes
/// (`\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`, other control characters as `\u00xx`).
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    if needs_escape(bytes) {
        // Runs between escapes are copied whole. serde_json's escaping goes a byte at a time:
        // every push's row key (`[["id","r1"]]`, four quotes) cost about 730 instructions.
        let mut run = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let escape = ESCAPES[usize::from(b)];
            if escape == 0 {
                continue;
            }
            out.extend_from_slice(&bytes[run..i]);
            match escape {
                b'u' => out.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 0xf)],
                ]),
                letter => out.extend_from_slice(&[b'\\', letter]),
            }
            run = i + 1;
        }
        out.extend_from_slice(&bytes[run..]);
    } else {
        out.extend_from_slice(bytes);
    }
    out.push(b'"');
}

/// For each byte, the letter of its two-character escape, `u` for `\u00xx`, or 0 for none.
static ESCAPES: [u8; 256] = {
    let mut table = [0; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = b'u';
        b += 1;
    }
    table[0x08] = b'b';
    table[0x0c] = b'f';
    table[b'\n' as usize] = b'n';
    table[b'\r' as usize] = b'r';
    table[b'\t' as usize] = b't';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

/// The digits of `\u00xx`, lower case as serde_json writes them.
const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends a map of strings to unsigned integers (the last mutation IDs of a patch or a
/// poke) as a JSON object, as serde_json writes it: its keys went through serde_json's
/// byte-at-a-time escaping, 870 instructions of a small push's poke.
pub fn write_u64_map<'a>(out: &mut Vec<u8>, map: impl IntoIterator<Item = (&'a String, &'a u64)>) {
    // Numbers go to serde_json (itoa), like every number here.
    write_entries(out, map, |out, n| {
        serde_json::to_writer(out, n).expect("writing to a Vec cannot fail")
    });
}

/// The length of what [`write_object`] appends, without writing it.
pub fn object_len(map: &Map<String, Value>) -> usize {
    // Braces, plus a colon per entry and the commas between entries.
    let punctuation = 2 + map.len() + map.len().saturating_sub(1);
    punctuation + map.iter().map(|(key, value)| str_len(key) + value_len(value)).sum::<usize>()
}

/// The length of what [`write_value`] appends.
fn value_len(value: &Value) -> usize {
    match value {
        Value::String(s) => str_len(s),
        Value::Object(map) => object_len(map),
        Value::Array(items) => {
            2 + items.len().saturating_sub(1) + items.iter().map(value_len).sum::<usize>()
        }
        other => {
            // A number is at most 24 characters (ryu's longest f64); no allocation to count them.
            const ROOM: usize = 32;
            let mut text = [0u8; ROOM];
            let mut rest = &mut text[..];
            serde_json::to_writer(&mut rest, other).expect("a number fits in 32 bytes");
            ROOM - rest.len()
        }
    }
}

/// The length of what [`write_str`] appends.
fn str_len(s: &str) -> usize {
    let bytes = s.as_bytes();
    if !needs_escape(bytes) {
        return bytes.len() + 2;
    }
    let escaped = bytes.iter().map(|&b| match ESCAPES[usize::from(b)] {
        0 => 1,
        b'u' => 6,
        _ => 2,
    });
    2 + escaped.sum::<usize>()
}

/// Whether JSON needs an escape for any byte: a quote, a backslash or a control character.
/// Other bytes, UTF-8 sequences included, are written as they are.
fn needs_escape(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(CHUNK);
    // No early exit inside a chunk, so that the test compiles to vector instructions.
    let found = chunks.any(|chunk| {
        chunk.iter().fold(false, |found, &b| found | (b < 0x20) | (b == b'"') | (b == b'\\'))
    });
    if found {
        return true;
    }
    // What is left (all of most keys and short values) a word at a time: the byte loop it
    // replaces was the row writer's costliest line in callgrind's count of a push.
    let mut words = chunks.remainder().chunks_exact(8);
    let found =
        words.any(|word| word_needs_escape(u64::from_le_bytes(word.try_into().expect("8 bytes"))));
    found || words.remainder().iter().any(|&b| ESCAPES[usize::from(b)] != 0)
}

/// Every byte of a word set to 1, and to 0x80.
const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);

/// Whether any byte of `word` is below 0x20, a quote or a backslash. The subtractions are
/// the classic tests for a zero byte and for a byte below a bound (at most 0x80): a byte
/// they report may be the wrong one after a borrow, but whether any byte qualifies is exact.
fn word_needs_escape(word: u64) -> bool {
    let below = |w: u64, bound: u8| w.wrapping_sub(ONES * u64::from(bound)) & !w & HIGHS;
    let control = below(word, 0x20);
    let quote = below(word ^ (ONES * u64::from(b'"')), 1);
    let backslash = below(word ^ (ONES * u64::from(b'\\')), 1);
    control | quote | backslash != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What serde_json writes, which ours must equal byte for byte.
    fn reference(value: &Value) -> Vec<u8> {
        serde_json::to_vec(value).unwrap()
    }

    /// The word test and the chunk test answer as a byte loop does, for every byte value
    /// at every place of strings of every length around the chunk and word sizes.
    #[test]
    fn needs_escape_matches_a_byte_loop() {
        let naive = |bytes: &[u8]| bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
        for len in 0..=2 * CHUNK + 9 {
            for at in 0..len {
                for byte in 0..=255u8 {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = byte;
                    assert_eq!(needs_escape(&bytes), naive(&bytes), "{byte:#x} at {at} of {len}");
                }
            }
        }
        // Words of bytes near the bounds, in random mixes, where borrows cross bytes.
        let near = [0x00, 0x01, 0x1f, 0x20, 0x21, 0x22, 0x23, 0x5b, 0x5c, 0x5d, 0x7f, 0x80, 0xff];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..200_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let word: [u8; 8] =
                std::array::from_fn(|i| near[(seed >> (i * 8)) as usize % near.len()]);
            assert_eq!(word_needs_escape(u64::from_le_bytes(word)), naive(&word), "{word:?}");
        }
    }

    /// Every ASCII character, alone and between others, is written as serde_json writes it,
    /// and measured as long as it is written.
    #[test]
    fn every_character_is_escaped_as_serde_json_escapes_it() {
        for c in (0..=0x7f_u8).map(char::from).chain(['é', '\u{2028}', '🎉']) {
            for s in [c.to_string(), format!("ab{c}cd{c}"), format!("{c}{c}x")] {
                let mut ours = Vec::new();
                write_str(&mut ours, &s);
                assert_eq!(ours, serde_json::to_vec(&s).unwrap(), "{s:?}");
                assert_eq!(str_len(&s), ours.len(), "{s:?}");
            }
        }
    }

    #[test]
    fn a_u64_map_is_what_serde_json_writes() {
        let mut map = std::collections::BTreeMap::new();
        let entries = [("", 0), ("c1", 7), ("c\"2\\", u64::MAX), ("é\n", 10)];
        for next in entries.iter().map(Some).chain([None]) {
            let mut ours = Vec::new();
            write_u64_map(&mut ours, &map);
            assert_eq!(ours, serde_json::to_vec(&map).unwrap());
            if let Some(&(key, value)) = next {
                map.insert(key.to_owned(), value);
            }
        }
    }

    #[test]
    fn output_is_what_serde_json_writes() {
        let long = "x".repeat(3 * CHUNK + 5);
        let values = [
            json!(null),
            json!(true),
            json!(-12),
            json!(18446744073709551615u64),
            json!(1.5e300),
            json!(0.1),
            json!(i64::MIN),
            // As long as ryu writes an f64: 24 characters.
            json!(-1.2345678901234567e-300),
            json!(""),
            json!("plain"),
            json!(long),
            json!(format!("{long}\"")),
            json!(format!("{long}\\{long}")),
            json!("tab\there\nnewline \u{1} \u{1f} \u{7f} é 漢字 🎉"),
            json!([]),
            json!({}),
            json!([1, "a", [null, {"k": "v\"w"}], {}]),
            json!({"id": "r1", "v": long, "n": 2.25, "nested": {"a": [true, false]}, "q\"k": 1}),
        ];
        for value in &values {
            let mut ours = Vec::new();
            write_value(&mut ours, value);
            assert_eq!(
                String::from_utf8(ours.clone()).unwrap(),
                String::from_utf8(reference(value)).unwrap()
            );
            assert_eq!(value_len(value), ours.len(), "{value}");
            if let Value::Object(map) = value {
                let mut object = Vec::new();
                write_object(&mut object, map);
                assert_eq!(object, ours);
                assert_eq!(object_len(map), ours.len());
            }
        }
    }

    #[test]
    fn every_byte_that_needs_an_escape_is_found_at_any_offset() {
        // Each special byte at each position of a string spanning several chunks.
        for special in [0u8, 0x1f, b'"', b'\\', b'\n'] {
            for at in [0, 1, CHUNK - 1, CHUNK, 2 * CHUNK + 7, 3 * CHUNK - 1] {
                let mut bytes = vec![b'a'; 3 * CHUNK];
                bytes[at] = special;
                assert!(needs_escape(&bytes), "{special:#x} at {at}");
                let text = String::from_utf8(bytes).unwrap();
                let mut ours = Vec::new();
                write_str(&mut ours, &text);
                assert_eq!(ours, serde_json::to_vec(&text).unwrap());
            }
        }
        assert!(!needs_escape("no escapes, only text: é and 0x7f \u{7f}".as_bytes()));
    }
}
