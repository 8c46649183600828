//! What the Rust peer servers share: reading a connect request, answering the upgrade,
//! and the client-group logic that turns a push into the poke every member receives.
//!
//! The peers implement only the protocol subset the scenarios use (docs/PROTOCOL.md): the
//! protocol header echoed, `connected`, ping -> pong, and a CRUD push -> pokeStart,
//! pokePart, pokeEnd to every connection of the push's client group. They do no JWT
//! work. Each peer does its own I/O in its library's idiom; this module has none.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use percent_encoding::percent_decode_str;
use serde::Deserialize;
use serde_json::value::RawValue;

/// Largest request head a peer reads (the Zero protocol header alone can be 8 KiB).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Largest inbound message a peer accepts, as the daemon's default.
pub const MAX_MESSAGE_BYTES: usize = 10 * 1024 * 1024;

/// The answer to a ping.
pub const PONG: &str = r#"["pong",{}]"#;

/// The parts of a connect request a peer needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectRequest {
    /// `clientID` query parameter.
    pub client_id: String,
    /// `clientGroupID` query parameter: the group the socket joins.
    pub group_id: String,
    /// `wsid` query parameter (default empty), echoed in `connected`.
    pub wsid: String,
    /// The `Sec-WebSocket-Protocol` value, echoed verbatim in the 101.
    pub protocol: String,
    /// The plain echo route (`/echo`, the `frames` scenario): every message is sent back as
    /// it came, no Zero protocol, no ids, no `connected`.
    pub echo: bool,
}

/// Whether a request target is the plain echo route (`/echo`, any query), the twin of
/// syncgate's conformance route.
pub fn is_echo(target: &str) -> bool {
    target.split_once('?').map_or(target, |(p, _)| p) == "/echo"
}

/// Reads the request target and protocol header of a sync connect:
/// `(/<base>)?/sync/v<N>/<action>?clientID=..&clientGroupID=..`.
pub fn parse_connect(target: &str, protocol: Option<&str>) -> Result<ConnectRequest, String> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let sync_at = match segments.as_slice() {
        ["sync", _, _] => 0,
        [_, "sync", _, _] => 1,
        _ => return Err(format!("not a sync path: {path}")),
    };
    let version = segments[sync_at + 1];
    if version.strip_prefix('v').is_none_or(|n| n.parse::<u32>().is_err()) {
        return Err(format!("bad protocol version segment: {version}"));
    }
    let mut client_id = None;
    let mut group_id = None;
    let mut wsid = String::new();
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode_str(&v.replace('+', " "))
            .decode_utf8()
            .map_err(|_| format!("query parameter {k} is not UTF-8"))?
            .into_owned();
        match k {
            "clientID" => client_id = Some(v),
            "clientGroupID" => group_id = Some(v),
            "wsid" => wsid = v,
            _ => {}
        }
    }
    let protocol = protocol.ok_or("missing Sec-WebSocket-Protocol header")?;
    Ok(ConnectRequest {
        client_id: client_id.filter(|s| !s.is_empty()).ok_or("missing clientID")?,
        group_id: group_id.filter(|s| !s.is_empty()).ok_or("missing clientGroupID")?,
        wsid,
        protocol: protocol.to_string(),
        echo: false,
    })
}

/// Reads a whole upgrade request head and returns the connect request and the 101
/// response to write, for a peer whose library leaves the handshake to the application.
pub fn upgrade(head: &[u8]) -> Result<(ConnectRequest, String), String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("incomplete request head".into()),
        Err(e) => return Err(format!("bad request head: {e}")),
    }
    if req.method != Some("GET") {
        return Err("upgrade must be a GET".into());
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    if !header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")) {
        return Err("not a websocket upgrade".into());
    }
    if !header("connection")
        .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
    {
        return Err("Connection header lacks upgrade".into());
    }
    if header("sec-websocket-version") != Some("13") {
        return Err("unsupported Sec-WebSocket-Version".into());
    }
    let key = header("sec-websocket-key").ok_or("missing Sec-WebSocket-Key")?;
    let target = req.path.unwrap_or("");
    let accept = tungstenite::handshake::derive_accept_key(key.trim().as_bytes());
    if is_echo(target) {
        let response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        return Ok((ConnectRequest { echo: true, ..ConnectRequest::default() }, response));
    }
    let connect = parse_connect(target, header("sec-websocket-protocol"))?;
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
        connect.protocol
    );
    Ok((connect, response))
}

/// The first message on every socket.
pub fn connected_message(wsid: &str) -> String {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    serde_json::json!(["connected", {"wsid": wsid, "timestamp": ms}]).to_string()
}

/// An upstream message the peers act on.
#[derive(Debug)]
pub enum Upstream<'a> {
    /// `["ping",{}]`.
    Ping,
    /// `["push",{...}]`.
    Push(PushBody<'a>),
    /// Any other tag; the peers ignore it (they implement a subset).
    Other,
}

/// The body of a push (only the fields the pokes need are read; the rest are skipped).
#[derive(Debug, Deserialize)]
pub struct PushBody<'a> {
    /// Must be the socket's own group.
    #[serde(rename = "clientGroupID", borrow)]
    pub client_group_id: Cow<'a, str>,
    /// The client sends one per push, but any number is handled.
    #[serde(borrow)]
    pub mutations: Vec<Mutation<'a>>,
}

/// One mutation of a push.
#[derive(Debug, Deserialize)]
pub struct Mutation<'a> {
    /// `crud` or `custom`; only CRUD mutations change rows here.
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    /// Per-client sequence number; the poke reports it in `lastMutationIDChanges`.
    pub id: u64,
    /// The client that made the mutation.
    #[serde(rename = "clientID", borrow)]
    pub client_id: Cow<'a, str>,
    /// For CRUD: `[{"ops": [...]}]`; kept raw until the kind is known.
    #[serde(borrow)]
    pub args: &'a RawValue,
}

/// One CRUD argument.
#[derive(Debug, Deserialize)]
struct CrudArg<'a> {
    /// The operations, applied in order.
    #[serde(borrow)]
    ops: Vec<CrudOp<'a>>,
}

/// One CRUD operation; the row value is passed through as raw JSON, never re-encoded.
#[derive(Debug, Deserialize)]
struct CrudOp<'a> {
    /// `insert`, `upsert`, `update` (a put in the poke) or `delete` (a del).
    #[serde(borrow)]
    op: Cow<'a, str>,
    /// The table the row belongs to.
    #[serde(rename = "tableName", borrow)]
    table_name: Cow<'a, str>,
    /// The row (for a delete: its primary key), passed through untouched.
    #[serde(borrow)]
    value: &'a RawValue,
}

/// Parses one upstream text message.
pub fn parse_upstream(text: &str) -> Result<Upstream<'_>, String> {
    let (tag, body): (Cow<'_, str>, &RawValue) =
        serde_json::from_str(text).map_err(|e| format!("invalid message: {e}"))?;
    match tag.as_ref() {
        "ping" => Ok(Upstream::Ping),
        "push" => serde_json::from_str(body.get())
            .map(Upstream::Push)
            .map_err(|e| format!("invalid push: {e}")),
        _ => Ok(Upstream::Other),
    }
}

/// One client group's state in a peer.
#[derive(Debug)]
struct Group<T> {
    /// The group's sockets: a connection number and the peer's handle to write to it.
    members: Vec<(u64, T)>,
    /// Cookie version; each poke moves it forward by one.
    version: u64,
    /// Last applied mutation id per client of the group.
    last_mutation: HashMap<String, u64>,
}

/// The three messages of one poke.
pub type Poke = [String; 3];

/// A poke and the group members (connection number, write handle) to send it to.
pub type Delivery<'a, T> = (Poke, &'a [(u64, T)]);

/// Every client group of a peer. `T` is the peer's per-connection write handle.
#[derive(Debug)]
pub struct Hub<T> {
    /// Groups by clientGroupID; a group is dropped when its last member leaves.
    groups: HashMap<String, Group<T>>,
}

impl<T> Default for Hub<T> {
    fn default() -> Self {
        Hub { groups: HashMap::new() }
    }
}

impl<T> Hub<T> {
    /// Adds connection `conn` to `group`.
    pub fn join(&mut self, group: &str, conn: u64, handle: T) {
        self.groups
            .entry(group.to_string())
            .or_insert_with(|| Group {
                members: Vec::new(),
                version: 0,
                last_mutation: HashMap::new(),
            })
            .members
            .push((conn, handle));
    }

    /// Removes connection `conn` from `group`.
    pub fn leave(&mut self, group: &str, conn: u64) {
        if let Some(g) = self.groups.get_mut(group) {
            g.members.retain(|(c, _)| *c != conn);
            if g.members.is_empty() {
                self.groups.remove(group);
            }
        }
    }

    /// Applies a push that arrived on a socket of `group` and returns the poke and the
    /// members to send it to; `None` when every mutation was already applied.
    ///
    /// Mutations apply in order per client: an id at or below the last one is a
    /// duplicate and skipped, a gap is an error (as zero-cache treats them).
    pub fn push(
        &mut self,
        group: &str,
        push: &PushBody<'_>,
    ) -> Result<Option<Delivery<'_, T>>, String> {
        if push.client_group_id != group {
            return Err(format!(
                "InvalidPush: clientGroupID {} is not the socket's",
                push.client_group_id
            ));
        }
        let g = self.groups.get_mut(group).ok_or("push from a socket in no group")?;
        let mut lmids: Vec<(&str, u64)> = Vec::new();
        let mut rows = String::new();
        for m in &push.mutations {
            let last = g.last_mutation.get(m.client_id.as_ref()).copied().unwrap_or(0);
            if m.id <= last {
                continue;
            }
            if m.id != last + 1 {
                return Err(format!("mutation {} of {} skips {}", m.id, m.client_id, last + 1));
            }
            g.last_mutation.insert(m.client_id.to_string(), m.id);
            match lmids.iter_mut().find(|(c, _)| *c == m.client_id.as_ref()) {
                Some(entry) => entry.1 = m.id,
                None => lmids.push((m.client_id.as_ref(), m.id)),
            }
            if m.kind == "crud" {
                let args: Vec<CrudArg<'_>> = serde_json::from_str(m.args.get())
                    .map_err(|e| format!("invalid CRUD args: {e}"))?;
                for op in args.iter().flat_map(|a| &a.ops) {
                    let (verb, key) =
                        if op.op == "delete" { ("del", "id") } else { ("put", "value") };
                    if !rows.is_empty() {
                        rows.push(',');
                    }
                    let table =
                        serde_json::to_string(op.table_name.as_ref()).map_err(|e| e.to_string())?;
                    rows.push_str(&format!(
                        r#"{{"op":"{verb}","tableName":{table},"{key}":{}}}"#,
                        op.value.get()
                    ));
                }
            }
        }
        if lmids.is_empty() {
            return Ok(None);
        }
        let base = match g.version {
            0 => "null".to_string(),
            v => format!(r#""{v}""#),
        };
        g.version += 1;
        let v = g.version;
        let changes: Vec<String> = lmids
            .iter()
            .map(|(c, id)| format!("{}:{id}", serde_json::to_string(c).unwrap_or_default()))
            .collect();
        let poke = [
            format!(r#"["pokeStart",{{"pokeID":"{v}","baseCookie":{base}}}]"#),
            format!(
                r#"["pokePart",{{"pokeID":"{v}","lastMutationIDChanges":{{{}}},"rowsPatch":[{rows}]}}]"#,
                changes.join(",")
            ),
            format!(r#"["pokeEnd",{{"pokeID":"{v}","cookie":"{v}"}}]"#),
        ];
        Ok(Some((poke, &g.members)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zero::{self, Identity, PokeCheck, PokeEvent, PushFrame};

    #[test]
    fn parses_connect_requests() {
        let who = Identity {
            client_id: "c 1".into(),
            group_id: "g1".into(),
            user_id: "u".into(),
            wsid: "w9".into(),
        };
        let r = parse_connect(&zero::connect_path(&who), Some("e30%3D")).unwrap();
        assert_eq!(
            (r.client_id.as_str(), r.group_id.as_str(), r.wsid.as_str()),
            ("c 1", "g1", "w9")
        );
        assert_eq!(r.protocol, "e30%3D");
        assert!(
            parse_connect("/base/sync/v51/connect?clientID=a&clientGroupID=b", Some("x")).is_ok()
        );
        assert!(parse_connect("/sync/v51/connect?clientID=a&clientGroupID=b", None).is_err());
        assert!(parse_connect("/sync/v51/connect?clientGroupID=b", Some("x")).is_err());
        assert!(parse_connect("/sync/51/connect?clientID=a&clientGroupID=b", Some("x")).is_err());
        assert!(parse_connect("/other?clientID=a&clientGroupID=b", Some("x")).is_err());
    }

    #[test]
    fn upgrade_answers_with_accept_and_protocol_echo() {
        let head = b"GET /sync/v51/connect?clientID=a&clientGroupID=b&wsid=w HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: e30%3D\r\n\r\n";
        let (req, resp) = upgrade(head).unwrap();
        assert_eq!(req.wsid, "w");
        assert!(resp.starts_with("HTTP/1.1 101 "));
        assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(resp.contains("Sec-WebSocket-Protocol: e30%3D\r\n"));
        let no_key = String::from_utf8_lossy(head)
            .replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "");
        assert!(upgrade(no_key.as_bytes()).is_err());
        assert!(upgrade(b"POST / HTTP/1.1\r\n\r\n").is_err());
        assert!(upgrade(b"GET / HTTP/1.1\r\n").is_err());
        assert!(upgrade(b"\x00garbage\r\n\r\n").is_err());
    }

    #[test]
    fn the_echo_route_needs_no_zero_parameters() {
        let head = b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        let (req, resp) = upgrade(head).unwrap();
        assert!(req.echo);
        assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(!resp.contains("Sec-WebSocket-Protocol"));
        assert!(is_echo("/echo?x=1") && !is_echo("/echo/more") && !is_echo("/sync/v51/connect"));
    }

    #[test]
    fn connected_message_names_the_wsid() {
        zero::check_connected(connected_message("w5").as_bytes(), "w5").unwrap();
    }

    fn push_text(p: &PushFrame) -> String {
        let mut f = p.frame().to_vec();
        // Header, 16-bit length if any, then the 4-byte mask key.
        let start = if f[1] & 0x7f == 126 { 8 } else { 6 };
        crate::wsframe::apply_mask(&mut f[start..], 0);
        String::from_utf8(f[start..].to_vec()).unwrap()
    }

    #[test]
    fn push_becomes_a_poke_that_the_load_client_accepts() {
        let mut hub: Hub<&str> = Hub::default();
        hub.join("g1", 1, "a");
        hub.join("g1", 2, "b");
        hub.join("g2", 3, "c");
        let mut frame = PushFrame::new("g1", "c1", 600, None).unwrap();
        for id in 1..=3 {
            frame.set_id(id);
            let text = push_text(&frame);
            let Upstream::Push(push) = parse_upstream(&text).unwrap() else { panic!("not a push") };
            let (poke, members) = hub.push("g1", &push).unwrap().unwrap();
            assert_eq!(members.iter().map(|m| m.1).collect::<Vec<_>>(), ["a", "b"]);
            let mut check = PokeCheck::default();
            let client = crate::zero::needle(br#""c1":"#);
            let events: Vec<_> = poke
                .iter()
                .map(|m| check.on_message(m.as_bytes(), &client, id, frame.value()).unwrap())
                .collect();
            assert_eq!(events[2], PokeEvent::Delivered, "{poke:?}");
            let v: serde_json::Value = serde_json::from_str(&poke[1]).unwrap();
            assert_eq!(
                v[1]["rowsPatch"][0]["value"]["v"].as_str().unwrap().as_bytes(),
                frame.value().needle()
            );
        }
        // A duplicate is skipped, a gap and a foreign group are errors.
        let text = push_text(&frame);
        let Upstream::Push(dup) = parse_upstream(&text).unwrap() else { panic!() };
        assert!(hub.push("g1", &dup).unwrap().is_none());
        frame.set_id(9);
        let text = push_text(&frame);
        let Upstream::Push(gap) = parse_upstream(&text).unwrap() else { panic!() };
        assert!(hub.push("g1", &gap).unwrap_err().contains("skips 4"));
        assert!(hub.push("g2", &gap).unwrap_err().contains("InvalidPush"));
        hub.leave("g1", 1);
        hub.leave("g1", 2);
        assert!(hub.push("g1", &gap).is_err(), "an empty group is dropped");
    }

    #[test]
    fn delete_ops_become_del_patches_and_first_poke_has_null_base() {
        let mut hub: Hub<()> = Hub::default();
        hub.join("g", 1, ());
        let text = r#"["push",{"clientGroupID":"g","mutations":[{"type":"crud","id":1,"clientID":"c","name":"_zero_crud","args":[{"ops":[{"op":"delete","tableName":"t","primaryKey":["id"],"value":{"id":"i1"}}]}],"timestamp":1}],"pushVersion":1,"timestamp":1,"requestID":"r"}]"#;
        let Upstream::Push(p) = parse_upstream(text).unwrap() else { panic!() };
        let (poke, _) = hub.push("g", &p).unwrap().unwrap();
        assert!(poke[0].contains(r#""baseCookie":null"#));
        assert!(
            poke[1].contains(r#"{"op":"del","tableName":"t","id":{"id":"i1"}}"#),
            "{}",
            poke[1]
        );
    }

    #[test]
    fn rejects_malformed_upstream() {
        assert!(matches!(parse_upstream(r#"["ping",{}]"#), Ok(Upstream::Ping)));
        assert!(matches!(parse_upstream(r#"["changeDesiredQueries",{}]"#), Ok(Upstream::Other)));
        assert!(parse_upstream("not json").is_err());
        assert!(parse_upstream(r#"["push",{"mutations":[]}]"#).is_err());
        assert!(parse_upstream(r#"{"push":1}"#).is_err());
    }
}
