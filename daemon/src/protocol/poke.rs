//! Pokes on the wire: what a poke carries ([`Poke`], [`Patch`]) and how it is written for
//! a client, as `pokeStart`, `pokePart`s and `pokeEnd` (text, protocol 51 and below) or as
//! binary chunks of the parts (protocol 52). Sans-IO: payloads in, payloads out; the caller
//! frames them. Shapes follow zero-protocol's `poke.ts` in rocicorp/mono (docs/PROTOCOL.md,
//! "Pokes").

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::protocol::cookie::key_columns;
use crate::protocol::json;
use crate::protocol::messages::write_json;

/// A row: column name to value, as the client sent it.
pub type Row = Map<String, Value>;

/// Row changes: table name, then row key (see [`row_key`](crate::protocol::cookie::row_key)), then
/// the new row or `None` for a deleted row. Keyed maps make "the later write of a row wins" the
/// natural way to merge changes.
pub type RowsPatch = BTreeMap<String, BTreeMap<String, Option<Row>>>;

/// The first sync protocol version that receives poke parts as binary frames
/// (zero-protocol's `POKE_CHUNK_PROTOCOL_VERSION`).
pub const POKE_CHUNK_PROTOCOL_VERSION: u32 = 52;

/// The first byte of every binary poke message (zero-protocol's
/// `POKE_CHUNK_MESSAGE_TYPE`); text payloads start with `[` instead.
pub const POKE_CHUNK_MESSAGE_TYPE: u8 = 0x00;

/// Largest binary poke message, type byte included: zero-cache's encoder
/// fills a buffer of `POKE_CHUNK_BYTES` (1 MiB) whose first byte is the type.
pub const MAX_POKE_CHUNK_BYTES: usize = 1 << 20;

/// A poke part is closed once its JSON reaches this size, so that a large
/// poke travels (for protocol 51 and below) as several messages the client
/// can parse one at a time instead of one message of many megabytes.
pub(crate) const POKE_PART_TARGET_BYTES: usize = 256 << 10;

/// The room a patch's JSON or a poke part starts with. Grown from empty, the text of a small
/// push (a row of a few hundred bytes) took seven reallocations on the way to its size, each
/// of them a copy: most of a poke's allocator time (callgrind, bench/RESULTS.md "a push
/// parsed off simd-json's tape"). 1 KiB holds such a text whole; the buffer is short-lived
/// (copied into the history's `Arc<str>` or into frames), and a larger one grows from here.
const FIRST_TEXT_CAPACITY: usize = 1024;

/// The room for `pokeStart` and `pokeEnd` besides their two strings (the tag, the keys,
/// the punctuation): each message is then written without growing.
const POKE_FRAME_MESSAGE_OVERHEAD: usize = 48;

/// A query a client wants synced, as the server remembers it: only what the
/// downstream `desiredQueriesPatches` echoes back (the AST stays with the
/// client, which matches it to its own queries by hash).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DesiredQuery {
    /// The client's time-to-live for the query, in milliseconds, echoed back.
    pub ttl: Option<f64>,
}

/// What changed between two versions of a group. It is the content of a
/// poke, an entry of the history, and what the store writes.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Patch {
    /// Rows written or deleted.
    pub rows: RowsPatch,
    /// New last mutation IDs, by client.
    pub last_mutation_ids: BTreeMap<String, u64>,
    /// Desired queries added (`Some`) or dropped (`None`), by client, then
    /// query hash.
    pub desired_queries: BTreeMap<String, BTreeMap<String, Option<DesiredQuery>>>,
    /// Queries the group now has complete (`true`) or no longer syncs
    /// (`false`), by hash.
    pub got_queries: BTreeMap<String, bool>,
}

impl Patch {
    /// Whether the patch changes nothing a client can see.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
            && self.last_mutation_ids.is_empty()
            && self.desired_queries.is_empty()
            && self.got_queries.is_empty()
    }

    /// Folds a later patch into this one: for every row, query and client,
    /// the later value wins.
    pub fn merge(&mut self, later: &Patch) {
        for (table, rows) in &later.rows {
            let target = self.rows.entry(table.clone()).or_default();
            for (key, row) in rows {
                target.insert(key.clone(), row.clone());
            }
        }
        for (client, id) in &later.last_mutation_ids {
            self.last_mutation_ids.insert(client.clone(), *id);
        }
        for (client, queries) in &later.desired_queries {
            let target = self.desired_queries.entry(client.clone()).or_default();
            for (hash, query) in queries {
                target.insert(hash.clone(), query.clone());
            }
        }
        for (hash, got) in &later.got_queries {
            self.got_queries.insert(hash.clone(), *got);
        }
    }

    /// The patch as JSON, exactly as its `Serialize` writes it (the store keeps this in the
    /// history and `Deserialize` reads it back), with the rows written by [`json`].
    pub fn to_json(&self) -> String {
        let mut out = Vec::with_capacity(FIRST_TEXT_CAPACITY);
        out.extend_from_slice(b"{\"rows\":{");
        for (i, (table, rows)) in self.rows.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json::write_str(&mut out, table);
            out.extend_from_slice(b":{");
            for (j, (key, row)) in rows.iter().enumerate() {
                if j > 0 {
                    out.push(b',');
                }
                json::write_str(&mut out, key);
                out.push(b':');
                match row {
                    Some(row) => json::write_object(&mut out, row),
                    None => out.extend_from_slice(b"null"),
                }
            }
            out.push(b'}');
        }
        out.extend_from_slice(b"},\"last_mutation_ids\":");
        json::write_u64_map(&mut out, &self.last_mutation_ids);
        out.extend_from_slice(b",\"desired_queries\":");
        write_json(&mut out, &self.desired_queries);
        out.extend_from_slice(b",\"got_queries\":");
        write_json(&mut out, &self.got_queries);
        out.push(b'}');
        String::from_utf8(out).expect("JSON written from strings is UTF-8")
    }
}

/// A poke: moves a client from `base_cookie` to `cookie` by applying `patch`.
#[derive(Debug, Clone, PartialEq)]
pub struct Poke {
    /// Unique within a connection; we use the target cookie, since a
    /// connection never receives two pokes to the same version.
    pub poke_id: String,
    /// The cookie the client must hold (`None`: a client with no data yet).
    pub base_cookie: Option<String>,
    /// The cookie the client holds afterwards.
    pub cookie: String,
    /// The content.
    pub patch: Arc<Patch>,
}

/// How a connection receives poke parts, by its sync protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PokeFormat {
    /// Protocol 51 and below: one `["pokePart", {...}]` text message per part.
    Json,
    /// Protocol 52 and up: the JSON array of parts, in binary messages of at
    /// most [`MAX_POKE_CHUNK_BYTES`], each starting with
    /// [`POKE_CHUNK_MESSAGE_TYPE`].
    Binary,
}

impl PokeFormat {
    /// The format a client speaking `protocol_version` understands; a client
    /// below 52 must never get a binary message.
    pub fn for_protocol(protocol_version: u32) -> PokeFormat {
        if protocol_version >= POKE_CHUNK_PROTOCOL_VERSION {
            PokeFormat::Binary
        } else {
            PokeFormat::Json
        }
    }
}

/// The payloads of the messages that deliver `poke` to a client speaking
/// `protocol_version`, in order: `pokeStart` (text), the parts, `pokeEnd`
/// (text). See [`encode_poke_as`].
pub fn encode_poke(poke: &Poke, protocol_version: u32) -> Vec<Vec<u8>> {
    encode_poke_as(poke, PokeFormat::for_protocol(protocol_version))
}

/// The payloads of the messages that deliver `poke` in `format`, in order.
///
/// A payload is a text message unless [`is_binary_payload`] says otherwise;
/// the caller frames them. The result depends only on the poke and the
/// format, so one encoding serves every recipient of that format.
pub fn encode_poke_as(poke: &Poke, format: PokeFormat) -> Vec<Vec<u8>> {
    let parts = poke_parts(poke);
    let mut messages = Vec::with_capacity(parts.len() + 2);
    let base_cookie = poke.base_cookie.as_deref();
    messages.push(poke_edge("pokeStart", &poke.poke_id, "baseCookie", base_cookie));
    match format {
        PokeFormat::Json => {
            for part in parts {
                let mut message = Vec::with_capacity(part.len() + 12);
                message.extend_from_slice(b"[\"pokePart\",");
                message.extend_from_slice(&part);
                message.push(b']');
                messages.push(message);
            }
        }
        PokeFormat::Binary => {
            // Parts are dropped as they are copied, so a large poke is held
            // about once, not twice.
            let mut chunks = ChunkBuilder::default();
            chunks.push(b"[");
            for (i, part) in parts.into_iter().enumerate() {
                if i > 0 {
                    chunks.push(b",");
                }
                chunks.push(&part);
            }
            chunks.push(b"]");
            messages.extend(chunks.finish());
        }
    }
    messages.push(poke_edge("pokeEnd", &poke.poke_id, "cookie", Some(&poke.cookie)));
    messages
}

/// `["pokeStart",{"pokeID":…,"baseCookie":…}]` or `["pokeEnd",{"pokeID":…,"cookie":…}]`:
/// the message `tag`, then `cookie` under `cookie_key` (`null` for none, a client with no
/// data yet); the tag and the key are our literals, written as they are. Written by hand
/// with [`json::write_str`], byte for byte what serde_json writes: serde_json escapes its
/// strings a byte at a time, which was a tenth of a small push's poke.
fn poke_edge(tag: &str, poke_id: &str, cookie_key: &str, cookie: Option<&str>) -> Vec<u8> {
    let cookie_len = cookie.map_or(4, str::len);
    let mut out = Vec::with_capacity(POKE_FRAME_MESSAGE_OVERHEAD + poke_id.len() + cookie_len);
    out.extend_from_slice(b"[\"");
    out.extend_from_slice(tag.as_bytes());
    out.extend_from_slice(b"\",{\"pokeID\":");
    json::write_str(&mut out, poke_id);
    out.extend_from_slice(b",\"");
    out.extend_from_slice(cookie_key.as_bytes());
    out.extend_from_slice(b"\":");
    match cookie {
        Some(cookie) => json::write_str(&mut out, cookie),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b"}]");
    out
}

/// Whether a payload from [`encode_poke`] goes in a binary message.
pub fn is_binary_payload(payload: &[u8]) -> bool {
    payload.first() == Some(&POKE_CHUNK_MESSAGE_TYPE)
}

/// Cuts the JSON array of parts into binary messages: the type byte, then
/// at most `MAX_POKE_CHUNK_BYTES - 1` bytes, cut between UTF-8 characters as
/// zero-cache's encoder does (its `TextEncoder` never splits one).
#[derive(Default)]
struct ChunkBuilder {
    /// Full chunks.
    chunks: Vec<Vec<u8>>,
    /// The chunk being filled; empty until the first byte arrives.
    current: Vec<u8>,
}

impl ChunkBuilder {
    /// Appends valid UTF-8 (whole JSON texts or ASCII punctuation).
    fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.current.is_empty() {
                self.current.reserve_exact(MAX_POKE_CHUNK_BYTES.min(bytes.len() + 1));
                self.current.push(POKE_CHUNK_MESSAGE_TYPE);
            }
            let room = MAX_POKE_CHUNK_BYTES - self.current.len();
            let mut cut = bytes.len().min(room);
            // A continuation byte (10xxxxxx) never starts a character.
            while cut < bytes.len() && bytes[cut] & 0xC0 == 0x80 {
                cut -= 1;
            }
            self.current.extend_from_slice(&bytes[..cut]);
            bytes = &bytes[cut..];
            if !bytes.is_empty() {
                self.chunks.push(std::mem::take(&mut self.current));
            }
        }
    }

    /// The chunks, the last one included.
    fn finish(mut self) -> Vec<Vec<u8>> {
        if !self.current.is_empty() {
            self.chunks.push(self.current);
        }
        self.chunks
    }
}

/// The JSON objects of the poke's parts. The first part carries the last
/// mutation IDs and the queries; rows fill it and further parts up to
/// [`POKE_PART_TARGET_BYTES`] each. There is always at least one part, as in
/// zero-cache's pokes (the capture's first poke has an empty one).
fn poke_parts(poke: &Poke) -> Vec<Vec<u8>> {
    let patch = &poke.patch;
    let mut parts = Vec::new();
    let mut part = open_part(&poke.poke_id);
    if !patch.last_mutation_ids.is_empty() {
        part.extend_from_slice(b",\"lastMutationIDChanges\":");
        json::write_u64_map(&mut part, &patch.last_mutation_ids);
    }
    if !patch.desired_queries.is_empty() {
        let desired: BTreeMap<&str, Vec<QueryOpWire>> = patch
            .desired_queries
            .iter()
            .map(|(client, queries)| {
                let ops = queries.iter().map(|(hash, query)| QueryOpWire::desired(hash, query));
                (client.as_str(), ops.collect())
            })
            .collect();
        part.extend_from_slice(b",\"desiredQueriesPatches\":");
        write_json(&mut part, &desired);
    }
    if !patch.got_queries.is_empty() {
        let got: Vec<QueryOpWire> =
            patch.got_queries.iter().map(|(hash, &got)| QueryOpWire::got(hash, got)).collect();
        part.extend_from_slice(b",\"gotQueriesPatch\":");
        write_json(&mut part, &got);
    }
    let mut rows_in_part = 0;
    for (table_name, rows) in &patch.rows {
        for (key, row) in rows {
            part.extend_from_slice(if rows_in_part == 0 { b",\"rowsPatch\":[" } else { b"," });
            match row {
                // serde's form of the tagged op, with the row written by `json` (the row is
                // most of a poke).
                Some(value) => {
                    part.extend_from_slice(b"{\"op\":\"put\",\"tableName\":");
                    json::write_str(&mut part, table_name);
                    part.extend_from_slice(b",\"value\":");
                    json::write_object(&mut part, value);
                    part.push(b'}');
                }
                None => {
                    // Keys are built by `row_key` or checked on load, so
                    // they parse.
                    let id = key_columns(key).unwrap_or_default().into_iter().collect();
                    write_json(&mut part, &RowOpWire::Del { table_name, id });
                }
            }
            rows_in_part += 1;
            if part.len() >= POKE_PART_TARGET_BYTES {
                part.extend_from_slice(b"]}");
                parts.push(std::mem::replace(&mut part, open_part(&poke.poke_id)));
                rows_in_part = 0;
            }
        }
    }
    if rows_in_part > 0 {
        part.push(b']');
    }
    part.push(b'}');
    if rows_in_part > 0 || parts.is_empty() {
        parts.push(part);
    }
    parts
}

/// A part object opened with its `pokeID`, ready for more fields.
fn open_part(poke_id: &str) -> Vec<u8> {
    let mut part = Vec::with_capacity(FIRST_TEXT_CAPACITY);
    part.extend_from_slice(b"{\"pokeID\":");
    json::write_str(&mut part, poke_id);
    part
}

/// A deleting op of `rowsPatch`, as zero-protocol's `row-patch.ts` defines it (`poke_parts`
/// writes the `put` ops itself).
#[derive(Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum RowOpWire<'a> {
    /// Deletes the row with this primary key.
    Del {
        /// The table.
        #[serde(rename = "tableName")]
        table_name: &'a str,
        /// The primary key columns and their values.
        id: Row,
    },
}

/// One op of `desiredQueriesPatches` or `gotQueriesPatch`.
#[derive(Serialize)]
struct QueryOpWire<'a> {
    /// `"put"` or `"del"`.
    op: &'static str,
    /// The query's hash.
    hash: &'a str,
    /// Desired puts only: the client's TTL, echoed back as zero-cache does.
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl: Option<Value>,
}

impl<'a> QueryOpWire<'a> {
    /// A desired-query op: a put with its TTL, or a del.
    fn desired(hash: &'a str, query: &Option<DesiredQuery>) -> Self {
        match query {
            Some(query) => QueryOpWire { op: "put", hash, ttl: query.ttl.map(number) },
            None => QueryOpWire { op: "del", hash, ttl: None },
        }
    }

    /// A got-query op.
    fn got(hash: &'a str, got: bool) -> Self {
        QueryOpWire { op: if got { "put" } else { "del" }, hash, ttl: None }
    }
}

/// A JSON number, integral values written without a fraction (as the
/// JavaScript client writes them: `300000`, not `300000.0`).
fn number(value: f64) -> Value {
    /// Beyond 2^53 an f64 no longer holds every integer.
    const MAX_EXACT: f64 = 9_007_199_254_740_992.0;
    if value.fract() == 0.0 && value.abs() <= MAX_EXACT {
        Value::from(value as i64)
    } else {
        Value::from(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_never_split_a_character() {
        // A 4-byte character straddling the cut is moved whole.
        let mut text = vec![b'a'; MAX_POKE_CHUNK_BYTES - 3];
        text.extend_from_slice("😀".as_bytes());
        text.extend_from_slice(b"bc");
        let mut builder = ChunkBuilder::default();
        builder.push(&text);
        let chunks = builder.finish();
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].len(), MAX_POKE_CHUNK_BYTES - 2);
        assert_eq!(&chunks[1][1..], "😀bc".as_bytes());
        // Many small pieces fill chunks exactly.
        let mut builder = ChunkBuilder::default();
        for _ in 0..MAX_POKE_CHUNK_BYTES {
            builder.push(b"xy");
        }
        let chunks = builder.finish();
        assert_eq!(
            chunks.iter().map(Vec::len).collect::<Vec<_>>(),
            [MAX_POKE_CHUNK_BYTES, MAX_POKE_CHUNK_BYTES, 3]
        );
        assert!(ChunkBuilder::default().finish().is_empty());
    }

    #[test]
    fn poke_start_and_end_are_what_serde_json_writes() {
        // serde's structs in the field order of the wire (a json! map would sort the keys).
        #[derive(Serialize)]
        struct Start<'a> {
            #[serde(rename = "pokeID")]
            poke_id: &'a str,
            #[serde(rename = "baseCookie")]
            base_cookie: Option<&'a str>,
        }
        #[derive(Serialize)]
        struct End<'a> {
            #[serde(rename = "pokeID")]
            poke_id: &'a str,
            cookie: &'a str,
        }
        for (poke_id, base_cookie) in
            [("01", Some("00")), ("00", None), ("a\"b\\c\u{1}é", Some("x\ny"))]
        {
            let start = ("pokeStart", Start { poke_id, base_cookie });
            assert_eq!(
                poke_edge("pokeStart", poke_id, "baseCookie", base_cookie),
                serde_json::to_vec(&start).unwrap()
            );
            let cookie = base_cookie.unwrap_or("");
            let end = ("pokeEnd", End { poke_id, cookie });
            assert_eq!(
                poke_edge("pokeEnd", poke_id, "cookie", Some(cookie)),
                serde_json::to_vec(&end).unwrap()
            );
        }
    }
}
