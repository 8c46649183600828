//! What a Zero client sends: the connect parameters of a sync socket ([`Params`]), the
//! `Sec-WebSocket-Protocol` header with its token and initConnection, and the pushes of CRUD
//! mutations.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{json, Value};

use super::daemon::SECRET;
use super::ws::Ws;

/// The connect parameters of one sync socket.
#[derive(Debug, Clone)]
pub struct Params {
    pub client_id: String,
    pub group: String,
    pub user: Option<String>,
    pub wsid: String,
    pub version: u32,
}

impl Params {
    pub fn new(client_id: &str, group: &str) -> Params {
        Params {
            client_id: client_id.into(),
            group: group.into(),
            user: None,
            wsid: format!("ws-{client_id}"),
            version: 51,
        }
    }

    pub fn user(mut self, user: &str) -> Params {
        self.user = Some(user.into());
        self
    }

    pub fn wsid(mut self, wsid: &str) -> Params {
        self.wsid = wsid.into();
        self
    }

    pub fn version(mut self, version: u32) -> Params {
        self.version = version;
        self
    }

    /// The request target, shaped like the 1.9.0 client's (zero-client-capture.md).
    pub fn path(&self) -> String {
        let user = self.user.as_deref().map(|u| format!("&userID={u}")).unwrap_or_default();
        format!(
            "/sync/v{}/connect?clientID={}&clientGroupID={}{user}&baseCookie=&ts=297.30944&lmid=0&wsid={}",
            self.version, self.client_id, self.group, self.wsid
        )
    }
}

/// The `Sec-WebSocket-Protocol` value for `{initConnectionMessage?, authToken?}`, encoded as
/// the client does: `encodeURIComponent(base64(JSON))`. Written here rather than borrowed from
/// the daemon so that a bug in the daemon's encoder cannot hide one in its decoder.
pub fn protocol_header(token: Option<&str>, init: Option<Value>) -> String {
    let mut body = serde_json::Map::new();
    if let Some(init) = init {
        body.insert("initConnectionMessage".into(), init);
    }
    if let Some(token) = token {
        body.insert("authToken".into(), Value::String(token.into()));
    }
    encode_protocol_json(&Value::Object(body).to_string())
}

/// `encodeURIComponent(base64_standard(json))`; base64's alphabet leaves only `+ / =` to escape.
pub fn encode_protocol_json(json: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(json)
        .replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D")
}

/// The header of a socket without a token (and without an initConnection).
pub fn anon_header() -> String {
    protocol_header(None, None)
}

/// The header carrying a valid token for `user`.
pub fn user_header(user: &str) -> String {
    protocol_header(Some(&token(user)), None)
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// An HS256 token over `claims`, signed with `secret`.
pub fn sign(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign a token")
}

/// A valid token for `user`, an hour from expiry.
pub fn token(user: &str) -> String {
    sign(&json!({"sub": user, "iat": now_secs(), "exp": now_secs() + 3600}), SECRET)
}

/// The initConnection the 1.9.0 client put in its header (zero-client-capture.md, "init").
pub fn captured_init_connection(client_id: &str) -> Value {
    json!(["initConnection", {
        "desiredQueriesPatch": [{"op": "put", "hash": "19040arbgigdy", "ast": {"table": "issue",
            "where": {"type": "simple", "left": {"type": "column", "name": "title"},
                      "right": {"type": "literal", "value": "x"}, "op": "="},
            "limit": 10, "orderBy": [["id", "desc"]]}, "ttl": 300000}],
        "clientSchema": {"tables": {"issue": {"columns": {"id": {"type": "string"},
            "title": {"type": "string"}}, "primaryKey": ["id"]}}},
        "activeClients": [client_id]
    }])
}

/// Sends one push with one CRUD mutation, as the 1.9.0 client does (zero-client-capture.md).
pub fn push(ws: &mut Ws, group: &str, client: &str, id: u64, ops: &[Value]) {
    ws.send_json(&push_message(group, client, id, ops));
}

/// The message [`push`] sends.
pub fn push_message(group: &str, client: &str, id: u64, ops: &[Value]) -> Value {
    json!(["push", {
        "timestamp": now_ms(),
        "clientGroupID": group,
        "mutations": [{"type": "crud", "timestamp": now_ms(), "id": id, "clientID": client,
                       "name": "_zero_crud", "args": [{"ops": ops}]}],
        "pushVersion": 1,
        "requestID": format!("{client}-{id}"),
    }])
}

/// A CRUD op of a push that inserts an `issue` row.
pub fn insert(id: &str, title: &str) -> Value {
    json!({"op": "insert", "tableName": "issue", "primaryKey": ["id"], "value": {"id": id, "title": title}})
}

/// A CRUD op of a push that updates an `issue` row.
pub fn update(id: &str, title: &str) -> Value {
    json!({"op": "update", "tableName": "issue", "primaryKey": ["id"], "value": {"id": id, "title": title}})
}

/// A CRUD op of a push that deletes an `issue` row.
pub fn delete(id: &str) -> Value {
    json!({"op": "delete", "tableName": "issue", "primaryKey": ["id"], "value": {"id": id}})
}
