//! Upstream messages (client to server), parsed strictly, and the
//! downstream messages the connection layer writes itself.
//!
//! An upstream frame is the JSON array `[tag, body]`. [`parse_upstream`]
//! checks it in three steps, each for a reason:
//!
//! 1. simd-json parses the frame, in place, into its tape: a flat array of
//!    nodes whose strings point into the frame (unescaped in place). Its
//!    parser keeps its own stack, so no input makes it recurse.
//! 2. Nesting deeper than [`MAX_JSON_DEPTH`] is refused, by a walk over the
//!    tape's nodes (cheaper than another pass over the text). Reading a value
//!    into serde and dropping it recurse once per level, so a frame of
//!    `[[[[…]]]]` would otherwise overflow the stack. (Text that does not
//!    parse is refused as invalid JSON, however deep.)
//! 3. The body is read off the tape into the serde-derived structs
//!    below through `Strict`, a small serde `Deserializer` that builds
//!    structs only from JSON objects and lists only from arrays, and refuses
//!    array elements a visitor left unread. serde's stock deserializers
//!    (simd-json's and serde_json's) also accept a struct written as an
//!    array of its fields, and simd-json's tape deserializer silently loses
//!    its place when an array holds more elements than expected. zero-cache
//!    validates with valita in its default strict mode, so we accept neither.
//!
//! Optional fields follow valita's `.optional()`: the key may be missing, but
//! when present it must hold the right type, and `null` is a wrong type.
//! Values the server only stores or forwards (query ASTs, mutation
//! arguments, the client schema) stay `serde_json::Value`s, built from the tape.
//!
//! A push is most of what a busy server parses, so its path avoids every
//! copy it can: a CRUD mutation's one argument is read off the tape straight
//! into its ops (never into a `Value` first), and the parser's scratch
//! buffers are kept from one message to the next (bench/RESULTS.md, "a push
//! parsed off simd-json's tape").

use std::cell::RefCell;
use std::collections::BTreeMap;

use serde::{de, Deserialize, Serialize};

use super::strict::{decode, json_type, nullable, present, present_object, DecodeError, TapeValue};
use serde_json::{Map, Value};

/// Deepest JSON nesting accepted in an upstream message.
///
/// zero-cache refuses query ASTs nested deeper than 50 levels (its
/// `MAX_AST_DEPTH`); such an AST takes at most three JSON levels per AST level
/// plus about ten for the message around it, so 256 admits everything
/// zero-cache admits while keeping recursion to a few hundred stack frames.
pub const MAX_JSON_DEPTH: usize = 256;

/// The `name` every CRUD mutation carries (zero-protocol's
/// `CRUD_MUTATION_NAME`); a `crud` mutation with another name is invalid.
pub const CRUD_MUTATION_NAME: &str = "_zero_crud";

/// The downstream reply to a `ping`, and the keepalive the server sends
/// unprompted when it has been quiet; it never varies.
const PONG: &[u8] = br#"["pong",{}]"#;

/// One upstream message, by tag.
#[derive(Debug, Clone, PartialEq)]
pub enum Upstream {
    /// `initConnection`: the client's desired queries and schema; sent once,
    /// either inside the `Sec-WebSocket-Protocol` header or as the first
    /// message after `connected`.
    InitConnection(InitConnectionBody),
    /// `ping` (body `{}`): the client checks the server is alive.
    Ping,
    /// `changeDesiredQueries`: the client adds or removes queries.
    ChangeDesiredQueries(ChangeDesiredQueriesBody),
    /// `deleteClients`: the client reports clients it has garbage collected.
    DeleteClients(DeleteClientsBody),
    /// `pull`: used by the client for mutation recovery.
    Pull(PullBody),
    /// `updateAuth`: a new auth token for this connection's client group.
    UpdateAuth {
        /// The new token, verified like the one from the connect header.
        auth: String,
    },
    /// `push`: mutations to apply.
    Push(PushBody),
    /// `closeConnection` (deprecated, body: any array): ignored by the server.
    CloseConnection,
    /// `inspect`: a request from the client-side inspector tool.
    Inspect(InspectBody),
    /// `ackMutationResponses`: the client has seen the results of mutations
    /// up to this one, so the server may forget them.
    AckMutationResponses(MutationId),
}

/// Body of `initConnection`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InitConnectionBody {
    /// The queries the client wants synced (empty on a reconnect: the server
    /// must remember each client's queries itself).
    pub desired_queries_patch: Vec<QueriesPatchOp>,
    /// Tables, columns and primary keys the client knows; sent only while
    /// the client holds no snapshot from the server. An object.
    #[serde(default, deserialize_with = "present_object")]
    pub client_schema: Option<Value>,
    /// Clients and client groups the client deleted while disconnected.
    #[serde(default, deserialize_with = "present")]
    pub deleted: Option<DeleteClientsBody>,
    /// Where to send custom mutations, if the app overrides the server's
    /// default (must match the server's allow-list).
    #[serde(rename = "userPushURL", default, deserialize_with = "present")]
    pub user_push_url: Option<String>,
    /// Extra HTTP headers for the custom-mutation endpoint.
    #[serde(default, deserialize_with = "present")]
    pub user_push_headers: Option<BTreeMap<String, String>>,
    /// Where to send custom queries, if the app overrides the default.
    #[serde(rename = "userQueryURL", default, deserialize_with = "present")]
    pub user_query_url: Option<String>,
    /// Extra HTTP headers for the custom-query endpoint.
    #[serde(default, deserialize_with = "present")]
    pub user_query_headers: Option<BTreeMap<String, String>>,
    /// The clients of this group still running, so the server can drop the
    /// queries of the others.
    #[serde(default, deserialize_with = "present")]
    pub active_clients: Option<Vec<String>>,
    /// W3C trace context of the client (sent by the development head).
    #[serde(default, deserialize_with = "present")]
    pub traceparent: Option<String>,
}

/// One operation of a `desiredQueriesPatch`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "QueriesPatchOpWire")]
pub enum QueriesPatchOp {
    /// `{op: "put", hash, ...}`: add (or refresh) a query.
    Put(QueryPut),
    /// `{op: "del", hash}`: drop a query.
    Del {
        /// Hash of the query to drop.
        hash: String,
    },
    /// `{op: "clear"}`: drop all of the client's queries.
    Clear,
}

/// A `put` of a desired query.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryPut {
    /// The client's hash of the query: its identity in every later message.
    pub hash: String,
    /// The query AST, for queries built on the client (legacy queries).
    pub ast: Option<Value>,
    /// The query's name, for custom (named) queries.
    pub name: Option<String>,
    /// The arguments of a custom query.
    pub args: Option<Vec<Value>>,
    /// How long to keep the query after the client stops wanting it, in
    /// milliseconds; negative means forever.
    pub ttl: Option<f64>,
    /// Retry a failed custom query, but only if its error is still at this
    /// version (sent by the development head).
    pub retry_error_version: Option<String>,
}

/// Body of `changeDesiredQueries`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ChangeDesiredQueriesBody {
    /// The change to the client's desired queries.
    pub desired_queries_patch: Vec<QueriesPatchOp>,
    /// W3C trace context of the client.
    #[serde(default, deserialize_with = "present")]
    pub traceparent: Option<String>,
}

/// Body of `deleteClients` (and the `deleted` field of `initConnection`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteClientsBody {
    /// Clients the client has deleted locally.
    #[serde(rename = "clientIDs", default, deserialize_with = "present")]
    pub client_ids: Option<Vec<String>>,
    /// Whole client groups the client has deleted locally.
    #[serde(rename = "clientGroupIDs", default, deserialize_with = "present")]
    pub client_group_ids: Option<Vec<String>>,
}

/// Body of an upstream `pull`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullBody {
    /// The group the client belongs to.
    #[serde(rename = "clientGroupID")]
    pub client_group_id: String,
    /// The version the client holds; required, `null` before its first
    /// snapshot.
    #[serde(deserialize_with = "nullable")]
    pub cookie: Option<String>,
    /// Echoed in the downstream `pull` so the client can match the answer.
    #[serde(rename = "requestID")]
    pub request_id: String,
}

/// Body of `push`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushBody {
    /// Must be the socket's own group: anything else is a fatal `InvalidPush`.
    #[serde(rename = "clientGroupID")]
    pub client_group_id: String,
    /// The mutations, in order (the client sends one per push).
    pub mutations: Vec<Mutation>,
    /// Version of the push format; zero-cache only knows 1.
    #[serde(rename = "pushVersion")]
    pub push_version: u64,
    /// Version of the app schema, for CRUD mutations.
    #[serde(rename = "schemaVersion", default, deserialize_with = "present")]
    pub schema_version: Option<u64>,
    /// When the client sent the push, in milliseconds since the epoch.
    pub timestamp: f64,
    /// Identifies the push in logs and responses.
    #[serde(rename = "requestID")]
    pub request_id: String,
    /// Deprecated per-push auth token (protocol 47); auth now lives on the
    /// connection, but a client may still send it.
    #[serde(default, deserialize_with = "present")]
    pub auth: Option<String>,
    /// W3C trace context of the client (protocol 50 and later).
    #[serde(default, deserialize_with = "present")]
    pub traceparent: Option<String>,
}

/// One mutation of a push.
///
/// A custom mutation's arguments stay raw; a CRUD mutation's are decoded and
/// checked into `crud_ops` by [`parse_upstream`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mutation {
    /// Whether this is a CRUD mutation the server applies itself, or a
    /// custom one it forwards to the app's mutate endpoint.
    #[serde(rename = "type")]
    pub kind: MutationKind,
    /// Per-client sequence number; the server acknowledges mutations by it.
    pub id: u64,
    /// The client that made the mutation.
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// The mutator's name ([`CRUD_MUTATION_NAME`] for CRUD mutations).
    pub name: String,
    /// A custom mutation's arguments, as sent. Empty for a CRUD mutation: its one argument
    /// is read into `crud_ops` instead, never built as a `Value`.
    #[serde(deserialize_with = "array_read_later")]
    pub args: Vec<Value>,
    /// When the client ran the mutation, in milliseconds since the epoch.
    pub timestamp: f64,
    /// A CRUD mutation's ops, decoded from its `args` by [`parse_upstream`] (which has to
    /// check them anyway): decoded once, the rows are not copied again to apply them. Empty
    /// for a custom mutation.
    #[serde(skip)]
    pub crud_ops: Vec<CrudOp>,
}

/// The `type` of a mutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MutationKind {
    /// `"crud"`: row writes the server applies itself.
    Crud,
    /// `"custom"`: a named mutator run by the app's server.
    Custom,
}

/// One row write of a CRUD mutation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CrudOp {
    /// What to do with the row.
    pub op: CrudOpKind,
    /// The table, by its client-side name.
    pub table_name: String,
    /// The primary key columns (at least one).
    pub primary_key: Vec<String>,
    /// The row: all columns for insert and upsert, the key and the changed
    /// columns for update, only the key columns for delete (whose values
    /// must then be strings, numbers or booleans).
    pub value: Map<String, Value>,
    /// Upsert only: the columns to detect a conflict on, instead of the
    /// primary key (seen on a development branch; accepted, not required).
    #[serde(default, deserialize_with = "present")]
    pub conflict_columns: Option<Vec<String>>,
}

/// The `op` of a [`CrudOp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CrudOpKind {
    /// Insert the row if no row has its key.
    Insert,
    /// Insert the row, or update the row with its key.
    Upsert,
    /// Update the row with its key, if there is one.
    Update,
    /// Delete the row with its key, if there is one.
    Delete,
}

/// Identifies one mutation: the body of `ackMutationResponses`, and the
/// element of `mutationIDs` in a `PushFailed` error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MutationId {
    /// The mutation's sequence number within its client.
    pub id: u64,
    /// The client that made the mutation.
    #[serde(rename = "clientID")]
    pub client_id: String,
}

/// Body of `inspect`: one request of the inspector, told apart by `op`.
///
/// Which optional fields may appear depends on `op`; [`parse_upstream`]
/// checks that.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InspectBody {
    /// What the inspector asks for.
    pub op: InspectOp,
    /// Echoed in the answer so the inspector can match it.
    pub id: String,
    /// `queries` only: limit the answer to one client.
    #[serde(rename = "clientID", default, deserialize_with = "present")]
    pub client_id: Option<String>,
    /// `authenticate`: the admin password (a string). `analyze-query`: the
    /// query AST, the deprecated spelling of `ast` (an object).
    #[serde(default, deserialize_with = "present")]
    pub value: Option<Value>,
    /// `analyze-query` only: what to report.
    #[serde(default, deserialize_with = "present")]
    pub options: Option<AnalyzeQueryOptions>,
    /// `analyze-query` only: the query AST to analyze.
    #[serde(default, deserialize_with = "present_object")]
    pub ast: Option<Value>,
    /// `analyze-query` only: the custom query to analyze, by name.
    #[serde(default, deserialize_with = "present")]
    pub name: Option<String>,
    /// `analyze-query` only: the custom query's arguments.
    #[serde(default, deserialize_with = "present")]
    pub args: Option<Vec<Value>>,
}

/// The `op` of an `inspect` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InspectOp {
    /// List the queries of the group (or of one client).
    Queries,
    /// Server metrics.
    Metrics,
    /// The server's version.
    Version,
    /// Log in with the admin password.
    Authenticate,
    /// Run a query and report how it was executed.
    AnalyzeQuery,
}

/// What an `analyze-query` inspection reports.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AnalyzeQueryOptions {
    /// Include the rows the query sent to the client.
    #[serde(default, deserialize_with = "present")]
    pub vended_rows: Option<bool>,
    /// Include the rows synced for the query.
    #[serde(default, deserialize_with = "present")]
    pub synced_rows: Option<bool>,
    /// Include the join plans.
    #[serde(default, deserialize_with = "present")]
    pub join_plans: Option<bool>,
}

/// Parses one upstream text frame.
///
/// The frame is parsed in place: simd-json rewrites `json` while it
/// unescapes strings, so the caller must not read it afterwards. The error
/// text is meant for the `message` of an `InvalidMessage` error.
pub fn parse_upstream(json: &mut [u8]) -> Result<Upstream, String> {
    let len = json.len();
    SCRATCH.with_borrow_mut(|scratch| {
        let message = match simd_json::to_tape_with_buffers(json, scratch) {
            Ok(tape) if tape_nesting_exceeds(&tape.0, MAX_JSON_DEPTH) => Err(too_deep()),
            Ok(tape) => read_upstream(TapeValue::first(&tape.0)),
            Err(e) => Err(format!("invalid JSON: {e}")),
        };
        if len > KEPT_SCRATCH_BYTES {
            *scratch = simd_json::Buffers::new(KEPT_SCRATCH_BYTES);
        }
        message
    })
}

/// Messages up to this size reuse the parser's scratch buffers (their sizes follow the
/// message's); a larger one gets buffers of its own, freed after it, so that one large
/// message does not leave megabytes behind for the life of the worker.
const KEPT_SCRATCH_BYTES: usize = 64 * 1024;

thread_local! {
    /// simd-json's scratch buffers (the input copy, the string buffer, the structural
    /// indexes), kept between messages: allocating them was a tenth of a push's parse.
    static SCRATCH: RefCell<simd_json::Buffers> =
        RefCell::new(simd_json::Buffers::new(KEPT_SCRATCH_BYTES));
}

/// Reads one upstream message off the tape of its JSON text.
fn read_upstream(value: TapeValue<'_, '_>) -> Result<Upstream, String> {
    let Some(mut elements) = value.elements() else {
        return Err(format!("expected a message array [tag, body], got {}", value.json_type()));
    };
    let (Some(tag), Some(body), None) = (elements.next(), elements.next(), elements.next()) else {
        return Err(format!(
            "expected a message array [tag, body], got an array of {} elements",
            value.elements().map_or(0, |e| e.len())
        ));
    };
    let Some(tag) = tag.as_str() else {
        return Err(format!("expected a string message tag, got {}", tag.json_type()));
    };
    let message = match tag {
        "initConnection" => decode(body).map(Upstream::InitConnection),
        "ping" => decode::<Empty>(body).map(|_| Upstream::Ping),
        "changeDesiredQueries" => decode(body).map(Upstream::ChangeDesiredQueries),
        "deleteClients" => decode(body).map(Upstream::DeleteClients),
        "pull" => decode(body).map(Upstream::Pull),
        "updateAuth" => {
            decode::<UpdateAuthBody>(body).map(|body| Upstream::UpdateAuth { auth: body.auth })
        }
        "push" => decode(body).map(Upstream::Push),
        // The body is unused, but zero-cache still requires an array.
        "closeConnection" => decode::<Vec<de::IgnoredAny>>(body).map(|_| Upstream::CloseConnection),
        "inspect" => decode(body).map(Upstream::Inspect),
        "ackMutationResponses" => decode(body).map(Upstream::AckMutationResponses),
        other => return Err(format!("unknown message tag: {other}")),
    };
    message
        .and_then(|mut message| check_semantics(&mut message, body).map(|()| message))
        .map_err(|e| format!("{tag}: {e}"))
}

/// Appends `["connected",{"wsid":…,"timestamp":…}]`, the first message of
/// every connection.
pub fn write_connected(out: &mut Vec<u8>, wsid: &str, timestamp_ms: u64) {
    #[derive(Serialize)]
    struct ConnectedBody<'a> {
        wsid: &'a str,
        timestamp: u64,
    }
    write_json(out, &("connected", ConnectedBody { wsid, timestamp: timestamp_ms }));
}

/// `["connected",{"wsid":…,"timestamp":…}]` as a new buffer.
pub fn connected(wsid: &str, timestamp_ms: u64) -> Vec<u8> {
    let mut out = Vec::new();
    write_connected(&mut out, wsid, timestamp_ms);
    out
}

/// Appends `["pong",{}]`.
pub fn write_pong(out: &mut Vec<u8>) {
    out.extend_from_slice(PONG);
}

/// `["pong",{}]` as a new buffer.
pub fn pong() -> Vec<u8> {
    PONG.to_vec()
}

/// Serializes `value` as JSON onto `out`.
pub(crate) fn write_json<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Writing into a Vec cannot fail, and our types have only string keys,
    // so serde_json has no error to report.
    serde_json::to_writer(out, value).expect("serializing a protocol message cannot fail");
}

/// Refuses JSON text nested deeper than [`MAX_JSON_DEPTH`], before a parser that recurses
/// (the header decoder's serde_json) sees it: a header is refused for the depth a message
/// would be.
pub(crate) fn check_depth(json: &[u8]) -> Result<(), String> {
    if nesting_exceeds(json, MAX_JSON_DEPTH) {
        return Err(too_deep());
    }
    Ok(())
}

/// The refusal of JSON nested deeper than [`MAX_JSON_DEPTH`].
fn too_deep() -> String {
    format!("JSON nested deeper than {MAX_JSON_DEPTH} levels")
}

/// Whether the arrays and objects of a tape nest deeper than `max_depth` (at most
/// [`MAX_JSON_DEPTH`]), counted as [`nesting_exceeds`] counts them in text.
fn tape_nesting_exceeds(nodes: &[simd_json::Node<'_>], max_depth: usize) -> bool {
    // Where each open array or object ends (the index after its last node), innermost last.
    let mut ends = [0usize; MAX_JSON_DEPTH];
    let mut open = 0;
    for (i, node) in nodes.iter().enumerate() {
        while open > 0 && ends[open - 1] <= i {
            open -= 1;
        }
        if let simd_json::Node::Object { count, .. } | simd_json::Node::Array { count, .. } = node {
            if open >= max_depth.min(MAX_JSON_DEPTH) {
                return true;
            }
            ends[open] = i + 1 + count;
            open += 1;
        }
    }
    false
}

/// Whether brackets and braces outside strings nest deeper than `max_depth`.
///
/// Runs before any parser so that malformed or hostile input cannot make one
/// recurse; it needs no validity, only string boundaries.
fn nesting_exceeds(json: &[u8], max_depth: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&byte) = json.get(i) {
        i += 1;
        match byte {
            // Strings are most of a large message (a row's text): jump from one quote or
            // backslash to the next (memchr looks at many bytes per step) instead of
            // stepping through every byte. A backslash escapes the byte after it.
            b'"' => loop {
                let rest = json.get(i..).unwrap_or_default();
                match memchr::memchr2(b'"', b'\\', rest) {
                    // Unterminated: nothing nests inside a string; the parser reports it.
                    None => return false,
                    Some(at) if rest[at] == b'\\' => i += at + 2,
                    Some(at) => {
                        i += at + 1;
                        break;
                    }
                }
            },
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Checks what serde cannot express: which fields go with which `op`, and
/// the contents of CRUD mutations, which it reads off `body`, the message's body on the tape.
fn check_semantics(message: &mut Upstream, body: TapeValue<'_, '_>) -> Result<(), DecodeError> {
    match message {
        Upstream::Push(push) => {
            // The struct was read from these very nodes, so every mutation has its args.
            let mut args = body.get("mutations").and_then(|m| m.elements()).into_iter().flatten();
            for (i, mutation) in push.mutations.iter_mut().enumerate() {
                let args = args.next().and_then(|m| m.get("args"));
                let args = args.ok_or_else(|| DecodeError::new("missing field `args`"));
                args.and_then(|args| check_mutation(mutation, args))
                    .map_err(|e| e.inside(i).inside("mutations"))?;
            }
            Ok(())
        }
        Upstream::Inspect(inspect) => check_inspect(inspect),
        _ => Ok(()),
    }
}

/// Checks one mutation of a push and reads its `args` (on the tape): a CRUD mutation must be
/// named [`CRUD_MUTATION_NAME`] and carry valid ops, which go into `crud_ops`; a custom
/// mutation may carry any arguments, which go into `args`.
fn check_mutation(mutation: &mut Mutation, args: TapeValue<'_, '_>) -> Result<(), DecodeError> {
    if mutation.kind == MutationKind::Custom {
        mutation.args = decode(args).map_err(|e| e.inside("args"))?;
        return Ok(());
    }
    if mutation.name != CRUD_MUTATION_NAME {
        return Err(DecodeError::new(format!(
            "a crud mutation must be named {CRUD_MUTATION_NAME}, got {:?}",
            mutation.name
        ))
        .inside("name"));
    }
    mutation.crud_ops = crud_ops(args).map_err(|e| e.inside("args"))?;
    Ok(())
}

/// Reads the `args` of a CRUD mutation (an array, as the struct's field checked): exactly one
/// element, `{ops: [...]}`. Error paths are relative to `args` and still open for more path.
fn crud_ops(args: TapeValue<'_, '_>) -> Result<Vec<CrudOp>, DecodeError> {
    let mut elements = args.elements().into_iter().flatten();
    let (Some(arg), None) = (elements.next(), elements.next()) else {
        return Err(DecodeError::new(format!(
            "expected CRUD args [{{ops}}] of 1 element, got {}",
            args.elements().map_or(0, |e| e.len())
        )));
    };
    let arg: CrudArg = decode(arg).map_err(|e| e.inside(0))?;
    for (i, op) in arg.ops.iter().enumerate() {
        check_crud_op(op).map_err(|e| e.inside(i).inside("ops").inside(0))?;
    }
    Ok(arg.ops)
}

/// The per-op rules of a CRUD op that its struct cannot express.
fn check_crud_op(op: &CrudOp) -> Result<(), DecodeError> {
    if op.primary_key.is_empty() {
        return Err(DecodeError::new("expected at least one column").inside("primaryKey"));
    }
    if op.conflict_columns.is_some() && op.op != CrudOpKind::Upsert {
        return Err(
            DecodeError::new("only an upsert may have conflictColumns").inside("conflictColumns")
        );
    }
    if op.op == CrudOpKind::Delete {
        for (column, value) in &op.value {
            if !(value.is_string() || value.is_number() || value.is_boolean()) {
                return Err(DecodeError::new(format!(
                    "expected a string, number or boolean key value, got {}",
                    json_type(value)
                ))
                .inside(column)
                .inside("value"));
            }
        }
    }
    Ok(())
}

/// Which fields each inspector `op` allows, as in zero-protocol's
/// `inspect-up.ts`.
fn check_inspect(inspect: &InspectBody) -> Result<(), DecodeError> {
    let set_fields = [
        ("clientID", inspect.client_id.is_some()),
        ("value", inspect.value.is_some()),
        ("options", inspect.options.is_some()),
        ("ast", inspect.ast.is_some()),
        ("name", inspect.name.is_some()),
        ("args", inspect.args.is_some()),
    ];
    let allowed: &[&str] = match inspect.op {
        InspectOp::Queries => &["clientID"],
        InspectOp::Metrics | InspectOp::Version => &[],
        InspectOp::Authenticate => &["value"],
        InspectOp::AnalyzeQuery => &["value", "options", "ast", "name", "args"],
    };
    if let Some((field, _)) =
        set_fields.iter().find(|(field, set)| *set && !allowed.contains(field))
    {
        return Err(DecodeError::new(format!(
            "unknown field `{field}` for inspect op {:?}",
            inspect.op
        )));
    }
    let wrong_type = |expected: &str, got: &Value| {
        Err(DecodeError::new(format!("expected {expected}, got {}", json_type(got)))
            .inside("value"))
    };
    match (inspect.op, &inspect.value) {
        (InspectOp::Authenticate, None) => Err(DecodeError::new("missing field `value`")),
        (InspectOp::Authenticate, Some(value)) if !value.is_string() => {
            wrong_type("a string", value)
        }
        (InspectOp::AnalyzeQuery, Some(value)) if !value.is_object() => {
            wrong_type("an object", value)
        }
        _ => Ok(()),
    }
}

/// Reads a field that must be an array and is read off the tape afterwards (a mutation's
/// `args`, whose reading depends on the mutation's `type`); its elements are skipped here.
fn array_read_later<'de, D: de::Deserializer<'de>>(d: D) -> Result<Vec<Value>, D::Error> {
    Vec::<de::IgnoredAny>::deserialize(d).map(|_| Vec::new())
}

/// Body of `ping`: an empty object.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

/// Body of `updateAuth`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateAuthBody {
    /// The new token.
    auth: String,
}

/// The single element of a CRUD mutation's `args`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CrudArg {
    /// The row writes, applied in order.
    ops: Vec<CrudOp>,
}

/// A desired-query op as written on the wire: every field of every `op`,
/// checked against `op` when it becomes a [`QueriesPatchOp`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct QueriesPatchOpWire {
    /// Which op this is; decides which of the other fields may be set.
    op: PatchOpKind,
    /// `put` and `del`: see [`QueryPut::hash`].
    #[serde(default, deserialize_with = "present")]
    hash: Option<String>,
    /// `put` only: see [`QueryPut::ast`].
    #[serde(default, deserialize_with = "present_object")]
    ast: Option<Value>,
    /// `put` only: see [`QueryPut::name`].
    #[serde(default, deserialize_with = "present")]
    name: Option<String>,
    /// `put` only: see [`QueryPut::args`].
    #[serde(default, deserialize_with = "present")]
    args: Option<Vec<Value>>,
    /// `put` only: see [`QueryPut::ttl`].
    #[serde(default, deserialize_with = "present")]
    ttl: Option<f64>,
    /// `put` only: see [`QueryPut::retry_error_version`].
    #[serde(default, deserialize_with = "present")]
    retry_error_version: Option<String>,
}

/// The `op` of a desired-query patch.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum PatchOpKind {
    /// `"put"`
    Put,
    /// `"del"`
    Del,
    /// `"clear"`
    Clear,
}

impl TryFrom<QueriesPatchOpWire> for QueriesPatchOp {
    type Error = String;

    fn try_from(wire: QueriesPatchOpWire) -> Result<Self, String> {
        let put_only = [
            ("ast", wire.ast.is_some()),
            ("name", wire.name.is_some()),
            ("args", wire.args.is_some()),
            ("ttl", wire.ttl.is_some()),
            ("retryErrorVersion", wire.retry_error_version.is_some()),
        ];
        let unexpected = |op: &str, fields: &[(&str, bool)]| match fields.iter().find(|f| f.1) {
            Some((field, _)) => Err(format!("unknown field `{field}` in a `{op}` op")),
            None => Ok(()),
        };
        match wire.op {
            PatchOpKind::Put => Ok(QueriesPatchOp::Put(QueryPut {
                hash: wire.hash.ok_or("missing field `hash`")?,
                ast: wire.ast,
                name: wire.name,
                args: wire.args,
                ttl: wire.ttl,
                retry_error_version: wire.retry_error_version,
            })),
            PatchOpKind::Del => {
                unexpected("del", &put_only)?;
                let hash = wire.hash.ok_or("missing field `hash`")?;
                Ok(QueriesPatchOp::Del { hash })
            }
            PatchOpKind::Clear => {
                unexpected("clear", &put_only)?;
                unexpected("clear", &[("hash", wire.hash.is_some())])?;
                Ok(QueriesPatchOp::Clear)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Messages the Zero 1.9.0 client sent (zero-client-capture.md), as
    /// frames and as the `initConnectionMessage` of decoded headers.
    const CAPTURED: &[&str] = &[
        r#"["initConnection",{"desiredQueriesPatch":[],"clientSchema":{"tables":{"issue":{"columns":{"id":{"type":"string"},"title":{"type":"string"}},"primaryKey":["id"]}}},"activeClients":["jvp8kkl4ng86q8uhi0"]}]"#,
        r#"["initConnection",{"desiredQueriesPatch":[{"op":"put","hash":"19040arbgigdy","ast":{"table":"issue","where":{"type":"simple","left":{"type":"column","name":"title"},"right":{"type":"literal","value":"x"},"op":"="},"limit":10,"orderBy":[["id","desc"]]},"ttl":300000}],"clientSchema":{"tables":{"issue":{"columns":{"id":{"type":"string"},"title":{"type":"string"}},"primaryKey":["id"]}}},"activeClients":["2vpg7mim73a9d946ve"]}]"#,
        r#"["initConnection",{"desiredQueriesPatch":[],"clientSchema":{"tables":{"issue":{"columns":{"id":{"type":"string"},"title":{"type":"string"}},"primaryKey":["id"]}}},"activeClients":["e1skvd2fqie5aftv7f"]}]"#,
        r#"["initConnection",{"desiredQueriesPatch":[],"activeClients":["e1skvd2fqie5aftv7f"]}]"#,
        r#"["initConnection",{"desiredQueriesPatch":[{"op":"put","hash":"19040arbgigdy","ast":{"table":"issue","where":{"type":"simple","left":{"type":"column","name":"title"},"right":{"type":"literal","value":"x"},"op":"="},"limit":10,"orderBy":[["id","desc"]]},"ttl":300000}],"clientSchema":{"tables":{"issue":{"columns":{"id":{"type":"string"},"title":{"type":"string"}},"primaryKey":["id"]}}}}]"#,
        r#"["changeDesiredQueries",{"desiredQueriesPatch":[{"op":"put","hash":"2uh1iy5olazzo","ast":{"table":"issue"},"ttl":300000}]}]"#,
        r#"["changeDesiredQueries",{"desiredQueriesPatch":[{"op":"del","hash":"19040arbgigdy"}]}]"#,
        r#"["push",{"timestamp":1795804857593,"clientGroupID":"0h3jon9uhlfna8iufn","mutations":[{"type":"crud","timestamp":1795804857589,"id":1,"clientID":"jvp8kkl4ng86q8uhi0","name":"_zero_crud","args":[{"ops":[{"op":"insert","tableName":"issue","primaryKey":["id"],"value":{"id":"i1","title":"x"}}]}]}],"pushVersion":1,"requestID":"jvp8kkl4ng86q8uhi0-f5bad97d-3"}]"#,
        r#"["push",{"timestamp":1795804896413,"clientGroupID":"jcshdujn51p0nefrb2","mutations":[{"type":"crud","timestamp":1795804896407,"id":1,"clientID":"2vpg7mim73a9d946ve","name":"_zero_crud","args":[{"ops":[{"op":"upsert","tableName":"issue","primaryKey":["id"],"value":{"id":"i1","title":"x"}}]}]}],"pushVersion":1,"requestID":"2vpg7mim73a9d946ve-5418f167-2"}]"#,
        r#"["push",{"timestamp":1795804896413,"clientGroupID":"jcshdujn51p0nefrb2","mutations":[{"type":"crud","timestamp":1795804896410,"id":2,"clientID":"2vpg7mim73a9d946ve","name":"_zero_crud","args":[{"ops":[{"op":"update","tableName":"issue","primaryKey":["id"],"value":{"id":"i1","title":"y"}}]}]}],"pushVersion":1,"requestID":"2vpg7mim73a9d946ve-5418f167-2"}]"#,
        r#"["push",{"timestamp":1795804896415,"clientGroupID":"jcshdujn51p0nefrb2","mutations":[{"type":"crud","timestamp":1795804896413,"id":3,"clientID":"2vpg7mim73a9d946ve","name":"_zero_crud","args":[{"ops":[{"op":"delete","tableName":"issue","primaryKey":["id"],"value":{"id":"i1"}}]}]}],"pushVersion":1,"requestID":"2vpg7mim73a9d946ve-5418f167-3"}]"#,
        r#"["push",{"timestamp":1795804896416,"clientGroupID":"jcshdujn51p0nefrb2","mutations":[{"type":"crud","timestamp":1795804896415,"id":4,"clientID":"2vpg7mim73a9d946ve","name":"_zero_crud","args":[{"ops":[{"op":"insert","tableName":"issue","primaryKey":["id"],"value":{"id":"i1a","title":"x"}},{"op":"insert","tableName":"issue","primaryKey":["id"],"value":{"id":"i1b","title":"x"}}]}]}],"pushVersion":1,"requestID":"2vpg7mim73a9d946ve-5418f167-4"}]"#,
        r#"["ping",{}]"#,
        r#"["deleteClients",{"clientIDs":["n2luf0tfljng3tt2ae"]}]"#,
    ];

    fn parse(text: &str) -> Result<Upstream, String> {
        parse_upstream(&mut text.as_bytes().to_vec())
    }

    fn parse_value(value: serde_json::Value) -> Result<Upstream, String> {
        parse(&value.to_string())
    }

    fn push_with_mutation(mutation: serde_json::Value) -> serde_json::Value {
        json!(["push", {
            "clientGroupID": "g", "mutations": [mutation], "pushVersion": 1,
            "timestamp": 1, "requestID": "r"
        }])
    }

    fn crud_mutation(ops: serde_json::Value) -> serde_json::Value {
        json!({"type": "crud", "id": 1, "clientID": "c", "name": "_zero_crud",
               "args": [{"ops": ops}], "timestamp": 1})
    }

    fn assert_refused(message: serde_json::Value, expected_text: &str) {
        let error = parse_value(message.clone()).expect_err(&message.to_string());
        assert!(
            error.contains(expected_text),
            "error {error:?} for {message} lacks {expected_text:?}"
        );
    }

    #[test]
    fn every_captured_message_parses() {
        for text in CAPTURED {
            parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        }
    }

    #[test]
    fn captured_init_connection_keeps_its_fields() {
        let Upstream::InitConnection(init) = parse(CAPTURED[1]).unwrap() else {
            panic!("not initConnection");
        };
        assert_eq!(init.active_clients, Some(vec!["2vpg7mim73a9d946ve".to_string()]));
        assert_eq!(init.client_schema.unwrap()["tables"]["issue"]["primaryKey"], json!(["id"]));
        let [QueriesPatchOp::Put(put)] = init.desired_queries_patch.as_slice() else {
            panic!("expected one put");
        };
        assert_eq!(put.hash, "19040arbgigdy");
        assert_eq!(put.ttl, Some(300000.0));
        assert_eq!(put.ast.as_ref().unwrap()["orderBy"], json!([["id", "desc"]]));
        assert_eq!(put.name, None);
    }

    #[test]
    fn captured_push_keeps_its_fields_and_ops() {
        let Upstream::Push(push) = parse(CAPTURED[11]).unwrap() else {
            panic!("not a push");
        };
        assert_eq!(push.client_group_id, "jcshdujn51p0nefrb2");
        assert_eq!(push.push_version, 1);
        assert_eq!(push.schema_version, None);
        assert_eq!(push.request_id, "2vpg7mim73a9d946ve-5418f167-4");
        let mutation = &push.mutations[0];
        assert_eq!(mutation.kind, MutationKind::Crud);
        assert_eq!((mutation.id, mutation.client_id.as_str()), (4, "2vpg7mim73a9d946ve"));
        let ops = &mutation.crud_ops;
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[1].op, CrudOpKind::Insert);
        assert_eq!(ops[1].table_name, "issue");
        assert_eq!(ops[1].primary_key, vec!["id".to_string()]);
        assert_eq!(ops[1].value["id"], json!("i1b"));
    }

    #[test]
    fn captured_crud_kinds_are_recognized() {
        let kinds: Vec<CrudOpKind> = CAPTURED[8..11]
            .iter()
            .map(|text| {
                let Upstream::Push(push) = parse(text).unwrap() else { panic!() };
                push.mutations[0].crud_ops[0].op
            })
            .collect();
        assert_eq!(kinds, [CrudOpKind::Upsert, CrudOpKind::Update, CrudOpKind::Delete]);
    }

    #[test]
    fn every_tag_parses() {
        let cases = [
            json!(["initConnection", {"desiredQueriesPatch": []}]),
            json!(["ping", {}]),
            json!(["changeDesiredQueries", {"desiredQueriesPatch": [{"op": "clear"}]}]),
            json!(["deleteClients", {"clientIDs": ["a"], "clientGroupIDs": ["g"]}]),
            json!(["pull", {"clientGroupID": "g", "cookie": null, "requestID": "r"}]),
            json!(["updateAuth", {"auth": "tok"}]),
            json!(["push", {"clientGroupID": "g", "mutations": [], "pushVersion": 1,
                            "timestamp": 0, "requestID": "r"}]),
            json!(["closeConnection", []]),
            json!(["inspect", {"id": "i", "op": "version"}]),
            json!(["ackMutationResponses", {"id": 1, "clientID": "c"}]),
        ];
        let parsed: Vec<Upstream> =
            cases.into_iter().map(|case| parse_value(case).unwrap()).collect();
        assert_eq!(parsed[1], Upstream::Ping);
        assert_eq!(
            parsed[2],
            Upstream::ChangeDesiredQueries(ChangeDesiredQueriesBody {
                desired_queries_patch: vec![QueriesPatchOp::Clear],
                traceparent: None,
            })
        );
        assert_eq!(
            parsed[4],
            Upstream::Pull(PullBody {
                client_group_id: "g".into(),
                cookie: None,
                request_id: "r".into(),
            })
        );
        assert_eq!(parsed[5], Upstream::UpdateAuth { auth: "tok".into() });
        assert_eq!(parsed[7], Upstream::CloseConnection);
        assert_eq!(
            parsed[9],
            Upstream::AckMutationResponses(MutationId { id: 1, client_id: "c".into() })
        );
    }

    #[test]
    fn optional_fields_of_protocol_51_and_52_are_accepted() {
        let init = json!(["initConnection", {
            "desiredQueriesPatch": [{"op": "put", "hash": "h", "name": "issues",
                                     "args": [1, {"a": null}], "ttl": -1,
                                     "retryErrorVersion": "02"}],
            "clientSchema": {"tables": {}},
            "deleted": {"clientIDs": ["x"], "clientGroupIDs": []},
            "userPushURL": "https://app/push", "userPushHeaders": {"x-a": "1"},
            "userQueryURL": "https://app/query", "userQueryHeaders": {},
            "activeClients": ["c"], "traceparent": "00-abc-def-01"
        }]);
        let Upstream::InitConnection(init) = parse_value(init).unwrap() else { panic!() };
        assert_eq!(init.user_push_url.as_deref(), Some("https://app/push"));
        assert_eq!(init.user_push_headers.unwrap()["x-a"], "1");
        assert_eq!(init.traceparent.as_deref(), Some("00-abc-def-01"));
        let QueriesPatchOp::Put(put) = &init.desired_queries_patch[0] else { panic!() };
        assert_eq!(put.ttl, Some(-1.0));
        assert_eq!(put.retry_error_version.as_deref(), Some("02"));

        let push = json!(["push", {
            "clientGroupID": "g", "pushVersion": 1, "schemaVersion": 3, "timestamp": 5.5,
            "requestID": "r", "auth": "old-token", "traceparent": "00-1-2-01",
            "mutations": [
                {"type": "custom", "id": 7, "clientID": "c", "name": "issue.create",
                 "args": [{"deep": [1, 2]}], "timestamp": 1},
                crud_mutation(json!([{"op": "upsert", "tableName": "t", "primaryKey": ["a", "b"],
                                      "value": {"a": 1, "b": "x", "c": null},
                                      "conflictColumns": ["c"]}]))
            ]
        }]);
        let Upstream::Push(push) = parse_value(push).unwrap() else { panic!() };
        assert_eq!(push.schema_version, Some(3));
        assert_eq!(push.auth.as_deref(), Some("old-token"));
        assert_eq!(push.mutations[0].kind, MutationKind::Custom);
        let ops = &push.mutations[1].crud_ops;
        assert_eq!(ops[0].conflict_columns, Some(vec!["c".to_string()]));

        let change = json!(["changeDesiredQueries",
                            {"desiredQueriesPatch": [], "traceparent": "t"}]);
        assert!(parse_value(change).is_ok());
    }

    #[test]
    fn every_inspect_op_parses() {
        for body in [
            json!({"id": "1", "op": "queries", "clientID": "c"}),
            json!({"id": "2", "op": "metrics"}),
            json!({"id": "3", "op": "version"}),
            json!({"id": "4", "op": "authenticate", "value": "password"}),
            json!({"id": "5", "op": "analyze-query", "ast": {"table": "t"},
                   "options": {"vendedRows": true, "syncedRows": false, "joinPlans": true}}),
            json!({"id": "6", "op": "analyze-query", "name": "q", "args": [1]}),
            json!({"id": "7", "op": "analyze-query", "value": {"table": "t"}}),
        ] {
            parse_value(json!(["inspect", body])).unwrap();
        }
        let Upstream::Inspect(inspect) =
            parse_value(json!(["inspect", {"id": "x", "op": "analyze-query"}])).unwrap()
        else {
            panic!()
        };
        assert_eq!(inspect.op, InspectOp::AnalyzeQuery);
    }

    #[test]
    fn inspect_fields_must_match_the_op() {
        assert_refused(
            json!(["inspect", {"id": "1", "op": "metrics", "clientID": "c"}]),
            "unknown field `clientID`",
        );
        assert_refused(
            json!(["inspect", {"id": "1", "op": "authenticate"}]),
            "missing field `value`",
        );
        assert_refused(
            json!(["inspect", {"id": "1", "op": "authenticate", "value": 5}]),
            "expected a string",
        );
        assert_refused(
            json!(["inspect", {"id": "1", "op": "analyze-query", "value": "x"}]),
            "expected an object",
        );
        assert_refused(json!(["inspect", {"id": "1", "op": "nope"}]), "unknown variant `nope`");
    }

    #[test]
    fn unknown_keys_are_refused_at_every_level() {
        assert_refused(json!(["ping", {"extra": 1}]), "unknown field `extra`");
        assert_refused(json!(["updateAuth", {"auth": "t", "x": 1}]), "unknown field `x`");
        assert_refused(
            json!(["push", {"clientGroupID": "g", "mutations": [], "pushVersion": 1,
                            "timestamp": 0, "requestID": "r", "extra": true}]),
            "unknown field `extra`",
        );
        let mut mutation = crud_mutation(json!([]));
        mutation["extra"] = json!(1);
        assert_refused(push_with_mutation(mutation), "unknown field `extra`");
        assert_refused(
            push_with_mutation(crud_mutation(json!([{"op": "insert", "tableName": "t",
                "primaryKey": ["id"], "value": {}, "extra": 1}]))),
            "unknown field `extra`",
        );
        assert_refused(
            json!(["changeDesiredQueries", {"desiredQueriesPatch": [{"op": "put", "hash": "h",
                                                                     "extra": 1}]}]),
            "unknown field `extra`",
        );
        assert_refused(
            json!(["deleteClients", {"clientIDs": [], "all": true}]),
            "unknown field `all`",
        );
        assert_refused(
            json!(["ackMutationResponses", {"id": 1, "clientID": "c", "x": 0}]),
            "unknown field `x`",
        );
    }

    #[test]
    fn wrong_types_are_refused() {
        assert_refused(json!(["updateAuth", {"auth": 42}]), "invalid type");
        assert_refused(json!(["initConnection", "not-an-object"]), "invalid type");
        assert_refused(json!(["ping", []]), "invalid type: sequence");
        let mut mutation = crud_mutation(json!([]));
        mutation["id"] = json!("1");
        assert_refused(push_with_mutation(mutation.clone()), "at mutations.0.id");
        mutation["id"] = json!(-1);
        assert_refused(push_with_mutation(mutation.clone()), "invalid value");
        mutation["id"] = json!(1.5);
        assert_refused(push_with_mutation(mutation), "invalid type: floating point");
        assert_refused(
            json!(["changeDesiredQueries", {"desiredQueriesPatch":
                                            [{"op": "put", "hash": "h", "ttl": "5m"}]}]),
            "invalid type",
        );
        assert_refused(
            json!(["pull", {"clientGroupID": "g", "cookie": 3, "requestID": "r"}]),
            "invalid type",
        );
    }

    #[test]
    fn structs_written_as_arrays_are_refused() {
        assert_refused(json!(["updateAuth", ["tok"]]), "invalid type: sequence");
        assert_refused(json!(["pull", ["g", null, "r"]]), "invalid type: sequence");
        assert_refused(json!(["ackMutationResponses", [1, "c"]]), "invalid type: sequence");
        assert_refused(
            json!(["changeDesiredQueries", {"desiredQueriesPatch": [["put", "h"]]}]),
            "invalid type: sequence",
        );
    }

    #[test]
    fn null_is_not_an_absent_optional_field() {
        assert_refused(
            json!(["initConnection", {"desiredQueriesPatch": [], "activeClients": null}]),
            "invalid type: null",
        );
        assert_refused(
            json!(["updateAuth", {"auth": null}]),
            "invalid type: null, expected a string at auth",
        );
        assert_refused(
            json!(["initConnection", {"desiredQueriesPatch": null}]),
            "invalid type: null, expected a sequence",
        );
        assert_refused(
            json!(["initConnection", {"desiredQueriesPatch": [], "clientSchema": null}]),
            "expected an object",
        );
        assert_refused(
            json!(["changeDesiredQueries", {"desiredQueriesPatch":
                                            [{"op": "put", "hash": "h", "ast": null}]}]),
            "expected an object",
        );
    }

    #[test]
    fn required_fields_must_be_present() {
        assert_refused(json!(["initConnection", {}]), "missing field `desiredQueriesPatch`");
        assert_refused(
            json!(["pull", {"clientGroupID": "g", "requestID": "r"}]),
            "missing field `cookie`",
        );
        assert_refused(
            json!(["push", {"mutations": [], "pushVersion": 1, "timestamp": 0,
                            "requestID": "r"}]),
            "missing field `clientGroupID`",
        );
        assert_refused(
            json!(["changeDesiredQueries", {"desiredQueriesPatch": [{"op": "put"}]}]),
            "missing field `hash`",
        );
        assert_refused(
            json!(["changeDesiredQueries", {"desiredQueriesPatch": [{"op": "del"}]}]),
            "missing field `hash`",
        );
    }

    #[test]
    fn query_ops_take_only_their_own_fields() {
        assert_refused(
            json!(["changeDesiredQueries", {"desiredQueriesPatch":
                                            [{"op": "del", "hash": "h", "ttl": 5}]}]),
            "unknown field `ttl` in a `del` op",
        );
        assert_refused(
            json!(["changeDesiredQueries", {"desiredQueriesPatch": [{"op": "clear", "hash": "h"}]}]),
            "unknown field `hash` in a `clear` op",
        );
        assert_refused(
            json!(["changeDesiredQueries", {"desiredQueriesPatch": [{"op": "replace", "hash": "h"}]}]),
            "unknown variant `replace`",
        );
    }

    #[test]
    fn crud_mutations_are_checked() {
        let mut renamed = crud_mutation(json!([]));
        renamed["name"] = json!("issue.create");
        assert_refused(push_with_mutation(renamed), "must be named _zero_crud");
        let mut two_args = crud_mutation(json!([]));
        two_args["args"] = json!([{"ops": []}, {"ops": []}]);
        assert_refused(push_with_mutation(two_args), "of 1 element, got 2");
        assert_refused(
            push_with_mutation(crud_mutation(json!([{"op": "insert", "tableName": "t",
                "primaryKey": [], "value": {}}]))),
            "expected at least one column at mutations.0.args.0.ops.0.primaryKey",
        );
        assert_refused(
            push_with_mutation(crud_mutation(json!([{"op": "delete", "tableName": "t",
                "primaryKey": ["id"], "value": {"id": {"nested": 1}}}]))),
            "at mutations.0.args.0.ops.0.value.id",
        );
        assert_refused(
            push_with_mutation(crud_mutation(json!([{"op": "insert", "tableName": "t",
                "primaryKey": ["id"], "value": {}, "conflictColumns": ["id"]}]))),
            "only an upsert may have conflictColumns",
        );
        assert_refused(
            push_with_mutation(crud_mutation(json!([{"op": "truncate", "tableName": "t",
                "primaryKey": ["id"], "value": {}}]))),
            "unknown variant `truncate`",
        );
        assert_refused(
            push_with_mutation(json!({"type": "sql", "id": 1, "clientID": "c",
                                                 "name": "n", "args": [], "timestamp": 1})),
            "unknown variant `sql`",
        );
    }

    #[test]
    fn crud_args_errors_report_paths_relative_to_args() {
        let read = |args: Value| {
            let mut text = args.to_string().into_bytes();
            let tape = simd_json::to_tape(&mut text).unwrap();
            crud_ops(TapeValue::first(&tape.0)).map_err(|e| e.to_string())
        };
        assert_eq!(
            read(json!([{"ops": [{"op": "insert"}]}])).unwrap_err(),
            "missing field `tableName` at 0.ops.0"
        );
        assert!(read(json!([])).unwrap_err().contains("got 0"));
        assert!(read(json!([{"ops": []}, {"ops": []}])).unwrap_err().contains("got 2"));
        assert!(read(json!(["not ops"])).unwrap_err().contains("at 0"));
        assert_eq!(read(json!([{"ops": []}])).unwrap(), vec![]);
    }

    #[test]
    fn the_envelope_must_be_a_two_element_array_with_a_known_tag() {
        assert_eq!(parse(r#"["foo",{}]"#).unwrap_err(), "unknown message tag: foo");
        assert_refused(json!({"ping": {}}), "expected a message array [tag, body], got an object");
        assert_refused(json!([]), "got an array of 0 elements");
        assert_refused(json!(["ping"]), "got an array of 1 elements");
        assert_refused(json!(["ping", {}, {}]), "got an array of 3 elements");
        assert_refused(json!([1, {}]), "expected a string message tag, got a number");
        assert_refused(json!("ping"), "got a string");
    }

    #[test]
    fn malformed_json_is_refused() {
        for text in [
            "",
            r#"["ping",{}"#,
            r#"["ping",{}]]"#,
            r#"["ping",{}] x"#,
            r#"["ping",{,}]"#,
            r#"["push",{"clientGroupID":"g""#,
        ] {
            let error = parse(text).expect_err(text);
            assert!(error.starts_with("invalid JSON"), "{text}: {error}");
        }
        let mut not_utf8 = b"[\"ping\",{\"a\":\"\xff\"}]".to_vec();
        assert!(parse_upstream(&mut not_utf8).unwrap_err().starts_with("invalid JSON"));
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        for depth in [MAX_JSON_DEPTH + 1, 100_000] {
            let text = "[".repeat(depth) + &"]".repeat(depth);
            let error = parse(&text).unwrap_err();
            assert!(error.contains("nested deeper than 256"), "{error}");
        }
        // Deep inside a field the server keeps as opaque JSON.
        let deep_args = "[".repeat(200_000) + &"]".repeat(200_000);
        let text = format!(
            r#"["push",{{"clientGroupID":"g","pushVersion":1,"timestamp":1,"requestID":"r","mutations":[{{"type":"custom","id":1,"clientID":"c","name":"n","timestamp":1,"args":{deep_args}}}]}}]"#
        );
        assert!(parse(&text).unwrap_err().contains("nested deeper"));
        // Text that is not whole is invalid JSON however deep: the parser keeps its own stack.
        let cut = &text[..text.len() / 2];
        assert!(parse(cut).unwrap_err().starts_with("invalid JSON"));
    }

    #[test]
    fn a_key_written_twice_counts_once_with_its_last_value() {
        // As `JSON.parse` reads it in zero-cache: in a struct, in a row, and in a struct with
        // more keys than the pairwise scan handles (40 requestIDs).
        let request_ids: String = (0..40).map(|i| format!(r#""requestID":"r{i}","#)).collect();
        let text = format!(
            r#"["push",{{"clientGroupID":"a","clientGroupID":"g",{request_ids}"pushVersion":1,"timestamp":1,"mutations":[{{"type":"crud","id":1,"clientID":"c","name":"_zero_crud","timestamp":1,"args":[{{"ops":[{{"op":"upsert","tableName":"t","primaryKey":["id"],"value":{{"id":"a","n":1,"n":2}}}}]}}]}}]}}]"#
        );
        let Upstream::Push(push) = parse(&text).unwrap() else { panic!("not a push") };
        assert_eq!((push.client_group_id.as_str(), push.request_id.as_str()), ("g", "r39"));
        let value = &push.mutations[0].crud_ops[0].value;
        assert_eq!(serde_json::to_string(value).unwrap(), r#"{"id":"a","n":2}"#);
    }

    #[test]
    fn a_custom_mutation_keeps_its_args_and_a_crud_mutation_its_ops() {
        let custom = push_with_mutation(json!({"type": "custom", "id": 1, "clientID": "c",
            "name": "m", "args": [{"x": [1, "y"]}, null], "timestamp": 1}));
        let Upstream::Push(push) = parse_value(custom).unwrap() else { panic!("not a push") };
        assert_eq!(push.mutations[0].args, vec![json!({"x": [1, "y"]}), Value::Null]);
        assert!(push.mutations[0].crud_ops.is_empty());
        let crud = push_with_mutation(crud_mutation(json!([
            {"op": "delete", "tableName": "t", "primaryKey": ["id"], "value": {"id": "a"}}
        ])));
        let Upstream::Push(push) = parse_value(crud).unwrap() else { panic!("not a push") };
        assert!(push.mutations[0].args.is_empty());
        assert_eq!(push.mutations[0].crud_ops[0].table_name, "t");
        // A custom mutation's args must still be an array.
        let bad = push_with_mutation(json!({"type": "custom", "id": 1, "clientID": "c",
            "name": "m", "args": {"x": 1}, "timestamp": 1}));
        assert_refused(bad, "invalid type: map, expected a sequence at mutations.0.args");
    }

    #[test]
    fn messages_above_the_kept_scratch_size_parse_as_well_as_small_ones() {
        // The parser's buffers are kept between messages up to KEPT_SCRATCH_BYTES; a larger
        // message gets buffers of its own. Small, large, small, large: every one whole.
        for size in [10, 3 * KEPT_SCRATCH_BYTES, 10, 2 * KEPT_SCRATCH_BYTES, 100] {
            // An escape in every third byte, so the parser unescapes all through the string.
            let escaped = r"a\\".repeat(size / 3);
            let text = format!(r#"["updateAuth",{{"auth":"{escaped}"}}]"#);
            let Upstream::UpdateAuth { auth: parsed } = parse(&text).unwrap() else {
                panic!("not updateAuth")
            };
            assert_eq!(parsed, "a\\".repeat(size / 3));
        }
    }

    #[test]
    fn the_tape_depth_agrees_with_the_text_depth() {
        // Every value up to three levels of arrays and objects (strings with brackets in
        // them as leaves), against depth limits 0 to 4.
        let mut values: Vec<String> = vec![r#""[{""#.into(), "1".into()];
        for _ in 0..3 {
            let inner = values.clone();
            for v in inner.iter().take(40) {
                values.push(format!("[{v}]"));
                values.push(format!(r#"{{"k":{v}}}"#));
                values.push(format!(r#"[{v},{{"a":[]}},{v}]"#));
            }
            values.push("[]".into());
            values.push("{}".into());
            values.dedup();
        }
        assert!(values.len() > 100);
        for value in &values {
            let mut text = value.clone().into_bytes();
            let tape = simd_json::to_tape(&mut text).unwrap();
            for max_depth in 0..5 {
                assert_eq!(
                    tape_nesting_exceeds(&tape.0, max_depth),
                    nesting_exceeds(value.as_bytes(), max_depth),
                    "{value} at depth {max_depth}"
                );
            }
        }
    }

    #[test]
    fn nesting_up_to_the_limit_is_accepted() {
        // The envelope and the body take 2 levels, clientSchema and its
        // nested objects the rest.
        let inner = MAX_JSON_DEPTH - 2;
        let schema = "{\"a\":".repeat(inner) + "1" + &"}".repeat(inner);
        let text =
            format!(r#"["initConnection",{{"desiredQueriesPatch":[],"clientSchema":{schema}}}]"#);
        assert!(parse(&text).is_ok());
        let too_deep = text.replacen("{\"a\":", "{\"a\":{\"a\":", 1).replacen("1}", "1}}", 1);
        assert!(parse(&too_deep).unwrap_err().contains("nested deeper"));
    }

    #[test]
    fn brackets_inside_strings_do_not_count_as_nesting() {
        let brackets = "[{".repeat(MAX_JSON_DEPTH) + "\\\"]";
        let text = json!(["updateAuth", {"auth": brackets}]).to_string();
        assert_eq!(parse(&text).unwrap(), Upstream::UpdateAuth { auth: brackets });
    }

    #[test]
    fn the_nesting_scan_agrees_with_a_byte_by_byte_scan() {
        // The plain definition: depth of brackets outside strings, a backslash escaping the
        // next byte inside one.
        fn reference(json: &[u8], max_depth: usize) -> bool {
            let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
            for &byte in json {
                match (in_string, escaped, byte) {
                    (true, true, _) => escaped = false,
                    (true, false, b'\\') => escaped = true,
                    (true, false, b'"') => in_string = false,
                    (true, false, _) => {}
                    (false, _, b'"') => in_string = true,
                    (false, _, b'[' | b'{') => {
                        depth += 1;
                        if depth > max_depth {
                            return true;
                        }
                    }
                    (false, _, b']' | b'}') => depth = depth.saturating_sub(1),
                    (false, _, _) => {}
                }
            }
            false
        }
        let pieces: [&[u8]; 9] =
            [b"[", b"]", b"{", b"\"", b"\\", b"a", b"\\\"", b"}", b"[[\"x\\\\\"[["];
        // Every sequence of up to 5 pieces, against depth limits 0 to 3: escapes at the end,
        // escaped quotes and backslashes, brackets inside and after strings.
        let mut inputs: Vec<Vec<u8>> = vec![Vec::new()];
        for _ in 0..5 {
            let longer: Vec<Vec<u8>> = inputs
                .iter()
                .filter(|i| i.len() < 5 * 8)
                .flat_map(|i| pieces.iter().map(move |p| [i.as_slice(), p].concat()))
                .collect();
            inputs.extend(longer);
            inputs.dedup();
        }
        assert!(inputs.len() > 60_000);
        for input in &inputs {
            for max_depth in 0..4 {
                assert_eq!(
                    nesting_exceeds(input, max_depth),
                    reference(input, max_depth),
                    "{:?} at depth {max_depth}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let Upstream::UpdateAuth { auth } =
            parse(r#"["updateAuth",{"auth":"a\"b\\c\u00e9\n"}]"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(auth, "a\"b\\c\u{e9}\n");
    }

    #[test]
    fn connected_has_the_exact_wire_form() {
        assert_eq!(
            connected("OiWdDwkhIjjRAVOfTiBv0", 1795804857565),
            br#"["connected",{"wsid":"OiWdDwkhIjjRAVOfTiBv0","timestamp":1795804857565}]"#
        );
    }

    #[test]
    fn connected_escapes_the_wsid() {
        let wsid = "a\"b\\c\n\u{1}é";
        let bytes = connected(wsid, 7);
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value, json!(["connected", {"wsid": wsid, "timestamp": 7}]));
    }

    #[test]
    fn writers_append_after_existing_bytes() {
        let mut out = vec![0x81, 0x00];
        write_pong(&mut out);
        write_connected(&mut out, "w", 1);
        assert_eq!(&out[..2], &[0x81, 0x00]);
        assert_eq!(&out[2..], br#"["pong",{}]["connected",{"wsid":"w","timestamp":1}]"#);
        assert_eq!(pong(), br#"["pong",{}]"#);
    }
}
