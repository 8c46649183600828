//! Writing rows as JSON, fast.
//!
//! A row is written several times per push: measured for the group's limits, into the
//! stored history, into every poke. Its text is mostly strings that need no escaping (a
//! 16 KiB value is one long string), and serde_json escapes byte by byte. Here a string is
//! checked a chunk at a time and, when nothing in it needs escaping, copied whole: exactly
//! the bytes serde_json would write between the quotes. Anything else (strings that do need
//! escapes, numbers) goes to serde_json, so the output is always byte for byte what
//! `serde_json::to_writer` writes.

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
    out.push(b'{');
    for (i, (key, value)) in map.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, key);
        out.push(b':');
        write_value(out, value);
    }
    out.push(b'}');
}

/// Appends a string as JSON: quoted, and escaped where it must be.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    if needs_escape(s.as_bytes()) {
        serde_json::to_writer(out, s).expect("writing to a Vec cannot fail");
    } else {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
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
            let mut text = Vec::new();
            write_value(&mut text, other);
            text.len()
        }
    }
}

/// The length of what [`write_str`] appends.
fn str_len(s: &str) -> usize {
    if needs_escape(s.as_bytes()) {
        let mut text = Vec::new();
        write_str(&mut text, s);
        text.len()
    } else {
        s.len() + 2
    }
}

/// Whether JSON needs an escape for any byte: a quote, a backslash or a control character.
/// Other bytes, UTF-8 sequences included, are written as they are.
fn needs_escape(bytes: &[u8]) -> bool {
    // No early exit inside a chunk, so that the test compiles to vector instructions.
    bytes.chunks(CHUNK).any(|chunk| {
        chunk.iter().fold(false, |found, &b| found | (b < 0x20) | (b == b'"') | (b == b'\\'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What serde_json writes, which ours must equal byte for byte.
    fn reference(value: &Value) -> Vec<u8> {
        serde_json::to_vec(value).unwrap()
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
