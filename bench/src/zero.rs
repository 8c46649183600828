//! The client side of the slice of Zero's sync protocol the scenarios use
//! (docs/PROTOCOL.md): the connect request, the `connected` check, ping/pong, a
//! CRUD push of a fixed size, and the check of the poke that answers it.
//!
//! Checks compare bytes rather than parse JSON: the load client must stay cheaper than
//! the servers it measures. They rely on compact JSON (no spaces), which every server in
//! the comparison emits, and fail loudly if that ever changes.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use memchr::memmem;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use std::sync::OnceLock;

use crate::wsframe::{self, OP_TEXT};

/// A byte string searched for in many messages, prepared once: preparing a `Finder` costs
/// about as much as a search, and for a row payload of hundreds of bytes more (building one
/// per message took a sixth of the load client's time in the fan-out scenario).
pub type Needle = memmem::Finder<'static>;

/// Prepares `bytes` for searching.
pub fn needle(bytes: &[u8]) -> Needle {
    memmem::Finder::new(bytes).into_owned()
}

/// A needle no server message contains (none holds a NUL byte).
pub fn no_needle() -> &'static Needle {
    static NONE: OnceLock<Needle> = OnceLock::new();
    NONE.get_or_init(|| needle(b"\x00"))
}

/// The client's keepalive message.
pub const PING: &[u8] = br#"["ping",{}]"#;
/// The server's answer to [`PING`] (also sent unsolicited as a keepalive).
pub const PONG: &[u8] = br#"["pong",{}]"#;

/// The sync protocol version in the connect path; release 1.9.0 of the Zero client speaks
/// 51, the last version whose pokes travel as text frames.
pub const PROTOCOL_VERSION: u32 = 51;

/// The app a run speaks: which table a push writes and what the connect header declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum App {
    /// The peers' and syncgate's embedded workload: rows `{"id":"r1","v":<payload>}` of a
    /// table `bench` no server looks at, no queries.
    #[default]
    Bench,
    /// A real zero-cache's app (tests/clients/zero-cache/schema.js): rows
    /// `{"id":<clientID>,"owner":"public","title":<payload>}` of table `item`. The connect
    /// header carries the `clientSchema` zero-cache requires of a new client group and a
    /// desired query for the connection's own row, so the poke that acknowledges a push
    /// also carries the row, as it does for the peers.
    ZeroCache,
}

/// The `clientSchema` of [`App::ZeroCache`]: every column of `item` (schema.js).
const ITEM_SCHEMA: &str = r#"{"tables":{"item":{"columns":{"id":{"type":"string"},"owner":{"type":"string"},"title":{"type":"string"}},"primaryKey":["id"]}}}"#;

/// The fixed `timestamp` of every push (the messages must not change between sends).
const TIMESTAMP: &str = "1795804857593";

/// What JavaScript's `encodeURIComponent` leaves alone; the Zero client percent-encodes
/// the base64 protocol header with it, so `+`, `/` and `=` come out as `%2B`, `%2F`, `%3D`.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// Who a connection claims to be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// `clientID`: unique per connection in every scenario.
    pub client_id: String,
    /// `clientGroupID`: the group whose members receive each other's pokes.
    pub group_id: String,
    /// `userID`: must equal the token's `sub` when a token is sent.
    pub user_id: String,
    /// `wsid`: echoed in `connected`, which proves the server answered this socket.
    pub wsid: String,
}

/// The request target of a connect: `/sync/v51/connect?...` as the Zero client sends it.
pub fn connect_path(who: &Identity) -> String {
    let enc = |s: &str| utf8_percent_encode(s, URI_COMPONENT).to_string();
    format!(
        "/sync/v{PROTOCOL_VERSION}/connect?clientID={}&clientGroupID={}&userID={}&baseCookie=&ts=1&lmid=0&wsid={}",
        enc(&who.client_id),
        enc(&who.group_id),
        enc(&who.user_id),
        enc(&who.wsid)
    )
}

/// The `Sec-WebSocket-Protocol` value: `encodeURIComponent(base64(JSON))` of
/// `{"initConnectionMessage": [...], "authToken": token}` (no `authToken` without a
/// token). The server must echo it verbatim.
///
/// The Zero client always sends `initConnection`, in this header when it fits, and a
/// server pokes only the connections that did (they are the group's recipients), so the
/// load client sends the smallest one: no desired queries.
pub fn protocol_header(token: Option<&str>) -> String {
    app_protocol_header(App::Bench, "", token)
}

/// [`protocol_header`] for `app`; `client_id` names the row [`App::ZeroCache`]'s desired
/// query follows (the row the connection's pushes write).
pub fn app_protocol_header(app: App, client_id: &str, token: Option<&str>) -> String {
    let init = match app {
        App::Bench => serde_json::json!({"desiredQueriesPatch": []}),
        App::ZeroCache => serde_json::json!({
            "desiredQueriesPatch": [{
                "op": "put",
                "hash": format!("row-{client_id}"),
                "ast": {
                    "table": "item",
                    "where": {
                        "type": "simple",
                        "left": {"type": "column", "name": "id"},
                        "right": {"type": "literal", "value": client_id},
                        "op": "=",
                    },
                    "orderBy": [["id", "asc"]],
                },
                "ttl": 300_000,
            }],
            "clientSchema": serde_json::from_str::<serde_json::Value>(ITEM_SCHEMA)
                .expect("ITEM_SCHEMA is JSON"),
        }),
    };
    let mut json = serde_json::json!({ "initConnectionMessage": ["initConnection", init] });
    if let Some(t) = token {
        json["authToken"] = t.into();
    }
    utf8_percent_encode(&STANDARD.encode(json.to_string()), URI_COMPONENT).to_string()
}

/// The token in a protocol header made by [`app_protocol_header`], if it carries one. The
/// storm's pre-minted headers are the bench app's; a storm that speaks another app takes
/// each one's token into a header of its own.
pub fn header_token(header: &str) -> Option<String> {
    let b64 = percent_decode_str(header).decode_utf8().ok()?;
    let json = STANDARD.decode(b64.as_bytes()).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&json).ok()?;
    v.get("authToken")?.as_str().map(str::to_owned)
}

/// Checks the first message of a socket: `["connected",{"wsid":<wsid>,...}]`. An `error`
/// message instead is reported with its text (it says why the server refused).
pub fn check_connected(msg: &[u8], wsid: &str) -> Result<(), String> {
    if msg.starts_with(br#"["error","#) {
        return Err(format!("server refused the connection: {}", lossy(msg)));
    }
    if !msg.starts_with(br#"["connected",{"#) {
        return Err(format!("first message is not connected: {}", lossy(msg)));
    }
    let needle = format!(r#""wsid":"{wsid}""#);
    if memmem::find(msg, needle.as_bytes()).is_none() {
        return Err(format!("connected names another wsid (want {wsid}): {}", lossy(msg)));
    }
    Ok(())
}

/// Up to 300 bytes of a message, for error text.
pub fn lossy(msg: &[u8]) -> String {
    let cut = msg.len().min(300);
    let mut s = String::from_utf8_lossy(&msg[..cut]).into_owned();
    if cut < msg.len() {
        s.push_str("...");
    }
    s
}

/// Characters the pushed row's payload is made of: JSON-safe, and varied enough that
/// deflate gets a realistic ratio (about 60%), not the 99% of a run of one letter.
const PAD_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,.-";

/// Longest push the load client builds.
pub const MAX_PUSH_BYTES: usize = 1024 * 1024;

/// The shared payload text, generated once from a fixed seed (runs are reproducible).
fn pad() -> &'static [u8] {
    static PAD: OnceLock<Vec<u8>> = OnceLock::new();
    PAD.get_or_init(|| {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..MAX_PUSH_BYTES)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                PAD_ALPHABET[(x % PAD_ALPHABET.len() as u64) as usize]
            })
            .collect()
    })
}

/// A push frame of a fixed total size, encoded (and masked, and if asked compressed)
/// once; sending the next mutation only rewrites the id's digits in place.
///
/// The message is `["push",{... "id":<N>, ... "value":{"id":"r1","v":"<payload>"}...}]`
/// with the payload padded so the whole JSON text is exactly `size` bytes. When the id
/// gains a digit the payload loses one and the frame is rebuilt (once per power of 10).
pub struct PushFrame {
    /// Text before the mutation id.
    prefix: Vec<u8>,
    /// Text between the id and the payload.
    middle: Vec<u8>,
    /// Exact length of the whole JSON message.
    size: usize,
    /// `Some(window bits)` when the frame is sent compressed.
    deflate: Option<u8>,
    /// The encoded frame for ids of the current width.
    frame: Vec<u8>,
    /// Offset of the id digits inside `frame`.
    digits_at: usize,
    /// Position of the digits inside the (masked) payload, for the mask phase.
    digits_phase: usize,
    /// Number of digits the current frame holds room for.
    width: usize,
    /// Length of the payload in the current frame.
    pad_len: usize,
    /// The payload, prepared for finding it in pokes.
    value: Needle,
}

/// Text after the payload: closes the value, the op, the mutation and the push.
const PUSH_TAIL: &str = r#""}}]}]}],"pushVersion":1,"requestID":"bench"}]"#;

impl PushFrame {
    /// A push from `client_id` of group `group_id`, `size` bytes of JSON in all.
    pub fn new(
        group_id: &str,
        client_id: &str,
        size: usize,
        deflate: Option<u8>,
    ) -> Result<Self, String> {
        Self::for_app(App::Bench, group_id, client_id, size, deflate)
    }

    /// [`PushFrame::new`] writing `app`'s table.
    pub fn for_app(
        app: App,
        group_id: &str,
        client_id: &str,
        size: usize,
        deflate: Option<u8>,
    ) -> Result<Self, String> {
        let prefix = format!(
            r#"["push",{{"timestamp":{TIMESTAMP},"clientGroupID":"{group_id}","mutations":[{{"type":"crud","timestamp":{TIMESTAMP},"id":"#
        );
        // The payload is the row's last column, so PUSH_TAIL closes both apps' rows.
        let (table, row) = match app {
            App::Bench => ("bench", r#""id":"r1","v":""#.to_string()),
            App::ZeroCache => ("item", format!(r#""id":"{client_id}","owner":"public","title":""#)),
        };
        let middle = format!(
            r#","clientID":"{client_id}","name":"_zero_crud","args":[{{"ops":[{{"op":"upsert","tableName":"{table}","primaryKey":["id"],"value":{{{row}"#
        );
        let fixed = prefix.len() + middle.len() + PUSH_TAIL.len();
        if size > MAX_PUSH_BYTES || size < fixed + 20 + 1 {
            return Err(format!(
                "push size {size} out of range {}..={MAX_PUSH_BYTES} for these ids",
                fixed + 21
            ));
        }
        let mut p = PushFrame {
            prefix: prefix.into_bytes(),
            middle: middle.into_bytes(),
            size,
            deflate,
            frame: Vec::new(),
            digits_at: 0,
            digits_phase: 0,
            width: 0,
            pad_len: 0,
            value: needle(b""),
        };
        p.set_id(1);
        Ok(p)
    }

    /// Makes the frame carry mutation `id`.
    pub fn set_id(&mut self, id: u64) {
        let digits = id.to_string();
        if digits.len() != self.width {
            self.rebuild(digits.len());
        }
        let at = self.digits_at;
        self.frame[at..at + digits.len()].copy_from_slice(digits.as_bytes());
        wsframe::apply_mask(&mut self.frame[at..at + digits.len()], self.digits_phase);
    }

    /// The frame to send.
    pub fn frame(&self) -> &[u8] {
        &self.frame
    }

    /// The payload string of the pushed row: a correct poke carries it verbatim.
    pub fn value(&self) -> &Needle {
        &self.value
    }

    fn rebuild(&mut self, width: usize) {
        self.width = width;
        self.pad_len = self.size - self.prefix.len() - self.middle.len() - PUSH_TAIL.len() - width;
        self.value = needle(&pad()[..self.pad_len]);
        let zeros = vec![b'0'; width];
        let mut suffix = self.middle.clone();
        suffix.extend_from_slice(&pad()[..self.pad_len]);
        suffix.extend_from_slice(PUSH_TAIL.as_bytes());
        self.frame.clear();
        match self.deflate {
            None => {
                let mut text = self.prefix.clone();
                text.extend_from_slice(&zeros);
                text.extend_from_slice(&suffix);
                debug_assert_eq!(text.len(), self.size);
                let start = wsframe::encode_masked(OP_TEXT, false, &text, &mut self.frame);
                self.digits_phase = self.prefix.len();
                self.digits_at = start + self.digits_phase;
            }
            Some(bits) => {
                // prefix and suffix are compressed on their own; the digits sit in a
                // stored block between them, where they can be rewritten in place.
                let mut z = wsframe::deflate_segment(&self.prefix, bits);
                let stored_at = z.len();
                z.extend(wsframe::stored_block(&zeros));
                z.extend(wsframe::deflate_segment(&suffix, bits));
                z.truncate(z.len() - wsframe::DEFLATE_TAIL.len());
                let start = wsframe::encode_masked(OP_TEXT, true, &z, &mut self.frame);
                self.digits_phase = stored_at + 5;
                self.digits_at = start + self.digits_phase;
            }
        }
    }
}

/// What one message did to a [`PokeCheck`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PokeEvent {
    /// Nothing complete yet (a pokeStart or pokePart, or an ignored keepalive pong).
    Pending,
    /// A pokeEnd closed a poke that carried the expected mutation and row.
    Delivered,
    /// A pokeEnd closed a poke about something else (an initial or query poke).
    Other,
}

/// Follows the pokes arriving on one connection and checks each against the mutation
/// it should carry: `lastMutationIDChanges` names the pusher's client with the expected
/// id, and a part carries the pushed row's payload.
#[derive(Debug, Default)]
pub struct PokeCheck {
    /// Inside a pokeStart..pokeEnd sequence.
    open: bool,
    /// The pokeID of the open poke (raw JSON token), which every part must repeat.
    poke_id: Vec<u8>,
    /// The open poke named the pusher's client.
    ours: bool,
    /// The open poke carried the row's payload.
    row: bool,
}

impl PokeCheck {
    /// Feeds one server message. `client_needle` is `"<pusher clientID>":`, `expected`
    /// the mutation id the next delivery must carry, `value` the row's payload.
    pub fn on_message(
        &mut self,
        msg: &[u8],
        client_needle: &Needle,
        expected: u64,
        value: &Needle,
    ) -> Result<PokeEvent, String> {
        if let Some(body) = msg.strip_prefix(br#"["pokeStart",{"#) {
            if self.open {
                return Err("pokeStart inside an open poke".into());
            }
            self.poke_id =
                poke_id(body).ok_or_else(|| format!("pokeStart without pokeID: {}", lossy(msg)))?;
            (self.open, self.ours, self.row) = (true, false, false);
            Ok(PokeEvent::Pending)
        } else if let Some(body) = msg.strip_prefix(br#"["pokePart",{"#) {
            self.same_poke(body, msg)?;
            if let Some(id) = mutation_id(body, client_needle)? {
                if id != expected {
                    return Err(format!(
                        "lastMutationIDChanges gives {id} for {}, expected {expected}",
                        lossy(client_needle.needle())
                    ));
                }
                self.ours = true;
            }
            if !self.row && value.find(body).is_some() {
                self.row = true;
            }
            Ok(PokeEvent::Pending)
        } else if let Some(body) = msg.strip_prefix(br#"["pokeEnd",{"#) {
            self.same_poke(body, msg)?;
            self.open = false;
            match (self.ours, self.row) {
                (true, true) => Ok(PokeEvent::Delivered),
                (true, false) => Err(format!("poke for mutation {expected} lacks the pushed row")),
                (false, _) => Ok(PokeEvent::Other),
            }
        } else if msg == PONG {
            Ok(PokeEvent::Pending)
        } else {
            Err(format!("unexpected message: {}", lossy(msg)))
        }
    }

    fn same_poke(&self, body: &[u8], msg: &[u8]) -> Result<(), String> {
        if !self.open {
            return Err(format!("poke message outside a poke: {}", lossy(msg)));
        }
        match poke_id(body) {
            Some(id) if id == self.poke_id => Ok(()),
            _ => Err(format!("pokeID differs from its pokeStart: {}", lossy(msg))),
        }
    }
}

/// The raw JSON token after `"pokeID":` (a string with its quotes, or a number).
fn poke_id(body: &[u8]) -> Option<Vec<u8>> {
    const KEY: &[u8] = br#""pokeID":"#;
    static FINDER: OnceLock<Needle> = OnceLock::new();
    let at = FINDER.get_or_init(|| needle(KEY)).find(body)? + KEY.len();
    let rest = &body[at..];
    let end = if rest.first() == Some(&b'"') {
        1 + memchr::memchr(b'"', &rest[1..])? + 1
    } else {
        memchr::memchr2(b',', b'}', rest)?
    };
    Some(rest[..end].to_vec())
}

/// The mutation id that `lastMutationIDChanges` gives for the client named by
/// `client_needle`, if the part has that key and names the client.
fn mutation_id(body: &[u8], client_needle: &Needle) -> Result<Option<u64>, String> {
    const KEY: &[u8] = br#""lastMutationIDChanges":{"#;
    static FINDER: OnceLock<Needle> = OnceLock::new();
    let Some(at) = FINDER.get_or_init(|| needle(KEY)).find(body) else {
        return Ok(None);
    };
    let object = &body[at + KEY.len()..];
    let object = &object[..memchr::memchr(b'}', object).unwrap_or(object.len())];
    let Some(pos) = client_needle.find(object) else {
        return Ok(None);
    };
    let digits = &object[pos + client_needle.needle().len()..];
    let end = digits.iter().position(|b| !b.is_ascii_digit()).unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end])
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Some)
        .ok_or_else(|| format!("bad mutation id in lastMutationIDChanges: {}", lossy(object)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wsframe::{apply_mask, decode, Inflater};

    #[test]
    fn a_headers_token_is_found_again() {
        for app in [App::Bench, App::ZeroCache] {
            let with = app_protocol_header(app, "c1", Some("a.b.c"));
            assert_eq!(header_token(&with).as_deref(), Some("a.b.c"));
            assert_eq!(header_token(&app_protocol_header(app, "c1", None)), None);
        }
        assert_eq!(header_token("%%not base64"), None);
    }

    fn who() -> Identity {
        Identity {
            client_id: "c1".into(),
            group_id: "g 1".into(),
            user_id: "u1".into(),
            wsid: "w1".into(),
        }
    }

    fn unmasked_text(frame: &[u8]) -> (bool, Vec<u8>) {
        // Client frames are masked; turn the mask bit off to reuse the server decoder.
        let mut f = frame.to_vec();
        f[1] &= 0x7f;
        let head = match f[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        f.drain(head..head + 4);
        let (fr, used) = decode(&f).unwrap().unwrap();
        assert_eq!(used, f.len());
        let mut p = fr.payload.to_vec();
        apply_mask(&mut p, 0);
        (fr.rsv1, p)
    }

    #[test]
    fn connect_path_and_protocol_header_match_the_zero_client() {
        assert_eq!(
            connect_path(&who()),
            "/sync/v51/connect?clientID=c1&clientGroupID=g%201&userID=u1&baseCookie=&ts=1&lmid=0&wsid=w1"
        );
        let decode = |h: &str| {
            let decoded = percent_encoding::percent_decode_str(h).decode_utf8().unwrap();
            serde_json::from_slice::<serde_json::Value>(
                &STANDARD.decode(decoded.as_bytes()).unwrap(),
            )
            .unwrap()
        };
        let init = serde_json::json!(["initConnection", {"desiredQueriesPatch": []}]);
        assert_eq!(
            decode(&protocol_header(None)),
            serde_json::json!({ "initConnectionMessage": init })
        );
        let h = protocol_header(Some("a.b.c"));
        assert_eq!(
            decode(&h),
            serde_json::json!({ "initConnectionMessage": init, "authToken": "a.b.c" })
        );
        assert!(!h.contains('=') && !h.contains('/') && !h.contains('+'));
    }

    #[test]
    fn the_zero_cache_app_declares_its_schema_and_follows_the_pushed_row() {
        let decoded =
            percent_encoding::percent_decode_str(&app_protocol_header(App::ZeroCache, "c7", None))
                .decode_utf8()
                .unwrap()
                .into_owned();
        let v: serde_json::Value =
            serde_json::from_slice(&STANDARD.decode(decoded.as_bytes()).unwrap()).unwrap();
        let init = &v["initConnectionMessage"][1];
        assert_eq!(init["clientSchema"]["tables"]["item"]["primaryKey"][0], "id");
        let query = &init["desiredQueriesPatch"][0];
        assert_eq!(query["op"], "put");
        assert_eq!(query["ast"]["table"], "item");
        assert_eq!(query["ast"]["where"]["right"]["value"], "c7");

        let mut p = PushFrame::for_app(App::ZeroCache, "g1", "c7", 600, None).unwrap();
        p.set_id(12);
        let (_, text) = unmasked_text(p.frame());
        assert_eq!(text.len(), 600);
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        let op = &v[1]["mutations"][0]["args"][0]["ops"][0];
        assert_eq!(op["tableName"], "item");
        assert_eq!(op["value"]["id"], "c7", "the row the connection's query follows");
        assert_eq!(op["value"]["owner"], "public", "a row an anonymous client may write");
        assert_eq!(op["value"]["title"].as_str().unwrap().as_bytes(), p.value().needle());
        assert_eq!(v[1]["mutations"][0]["id"], 12);
    }

    #[test]
    fn connected_check_accepts_only_this_socket() {
        check_connected(br#"["connected",{"wsid":"w1","timestamp":1}]"#, "w1").unwrap();
        assert!(check_connected(br#"["connected",{"wsid":"w2","timestamp":1}]"#, "w1").is_err());
        let e = check_connected(br#"["error",{"kind":"ServerOverloaded"}]"#, "w1").unwrap_err();
        assert!(e.contains("ServerOverloaded"));
        assert!(check_connected(br#"["pong",{}]"#, "w1").is_err());
    }

    #[test]
    fn push_frame_has_the_exact_size_and_patches_ids() {
        for size in [512usize, 1024, 16 * 1024] {
            let mut p = PushFrame::new("g1", "c1", size, None).unwrap();
            for id in [1u64, 9, 10, 99, 100, 123_456] {
                p.set_id(id);
                let (rsv1, text) = unmasked_text(p.frame());
                assert!(!rsv1);
                assert_eq!(text.len(), size, "size {size} id {id}");
                let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
                assert_eq!(v[0], "push");
                assert_eq!(v[1]["mutations"][0]["id"], id);
                assert_eq!(v[1]["clientGroupID"], "g1");
                let row = v[1]["mutations"][0]["args"][0]["ops"][0]["value"]["v"].as_str().unwrap();
                assert_eq!(row.as_bytes(), p.value().needle());
            }
        }
        assert!(PushFrame::new("g1", "c1", 100, None).is_err());
    }

    #[test]
    fn compressed_push_frame_inflates_to_the_same_message() {
        let mut plain = PushFrame::new("g1", "c7", 4096, None).unwrap();
        let mut z = PushFrame::new("g1", "c7", 4096, Some(13)).unwrap();
        for id in [1u64, 5, 10, 11, 1000] {
            plain.set_id(id);
            z.set_id(id);
            let (_, text) = unmasked_text(plain.frame());
            let (rsv1, zbody) = unmasked_text(z.frame());
            assert!(rsv1);
            assert!(zbody.len() < text.len());
            let mut out = Vec::new();
            Inflater::default().inflate(&zbody, &mut out, 1 << 20).unwrap();
            assert_eq!(out, text, "id {id}");
        }
    }

    const NEEDLE: &[u8] = br#""c1":"#;

    fn poke(id: &str, lmid: u64, value: &str) -> [Vec<u8>; 3] {
        [
            format!(r#"["pokeStart",{{"pokeID":{id},"baseCookie":null}}]"#).into_bytes(),
            format!(
                r#"["pokePart",{{"pokeID":{id},"lastMutationIDChanges":{{"c1":{lmid}}},"rowsPatch":[{{"op":"put","tableName":"bench","value":{{"id":"r1","v":"{value}"}}}}]}}]"#
            )
            .into_bytes(),
            format!(r#"["pokeEnd",{{"pokeID":{id},"cookie":"2"}}]"#).into_bytes(),
        ]
    }

    fn feed(c: &mut PokeCheck, msgs: &[Vec<u8>], expected: u64) -> Result<Vec<PokeEvent>, String> {
        let (client, value) = (needle(NEEDLE), needle(b"xyz"));
        msgs.iter().map(|m| c.on_message(m, &client, expected, &value)).collect()
    }

    #[test]
    fn poke_check_accepts_a_correct_poke_and_ignores_others() {
        let mut c = PokeCheck::default();
        let ev = feed(&mut c, &poke(r#""5""#, 3, "xyz"), 3).unwrap();
        assert_eq!(ev, [PokeEvent::Pending, PokeEvent::Pending, PokeEvent::Delivered]);
        // A numeric pokeID works too; a keepalive pong is ignored.
        let (client, value) = (needle(NEEDLE), needle(b"xyz"));
        assert_eq!(c.on_message(PONG, &client, 4, &value), Ok(PokeEvent::Pending));
        let ev = feed(&mut c, &poke("6", 4, "xyz"), 4).unwrap();
        assert_eq!(ev[2], PokeEvent::Delivered);
        // An initial poke that names no client is not an error.
        let initial = [
            br#"["pokeStart",{"pokeID":"1","baseCookie":null}]"#.to_vec(),
            br#"["pokePart",{"pokeID":"1"}]"#.to_vec(),
            br#"["pokeEnd",{"pokeID":"1","cookie":"01"}]"#.to_vec(),
        ];
        assert_eq!(feed(&mut c, &initial, 5).unwrap()[2], PokeEvent::Other);
    }

    #[test]
    fn poke_check_rejects_wrong_content() {
        let e = feed(&mut PokeCheck::default(), &poke("1", 2, "xyz"), 3).unwrap_err();
        assert!(e.contains("gives 2"), "{e}");
        let e = feed(&mut PokeCheck::default(), &poke("1", 3, "other"), 3).unwrap_err();
        assert!(e.contains("lacks the pushed row"), "{e}");
        let mut mixed = poke("1", 3, "xyz");
        mixed[2] = br#"["pokeEnd",{"pokeID":2,"cookie":"2"}]"#.to_vec();
        assert!(feed(&mut PokeCheck::default(), &mixed, 3).unwrap_err().contains("pokeID differs"));
        let p = poke("1", 3, "xyz");
        let e = feed(&mut PokeCheck::default(), &p[1..], 3).unwrap_err();
        assert!(e.contains("outside a poke"), "{e}");
        let twice = [p[0].clone(), p[0].clone()];
        assert!(feed(&mut PokeCheck::default(), &twice, 3).is_err());
        let bad_id = [
            p[0].clone(),
            br#"["pokePart",{"pokeID":1,"lastMutationIDChanges":{"c1":x}}]"#.to_vec(),
        ];
        assert!(feed(&mut PokeCheck::default(), &bad_id, 3)
            .unwrap_err()
            .contains("bad mutation id"));
        let e = PokeCheck::default().on_message(
            br#"["error",{"kind":"InvalidPush"}]"#,
            &needle(NEEDLE),
            1,
            &needle(b"x"),
        );
        assert!(e.unwrap_err().contains("InvalidPush"));
    }
}
