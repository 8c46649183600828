//! The message layer of Zero's sync protocol, without any I/O.
//!
//! A Zero client (npm `@rocicorp/zero`) talks to its sync server over one
//! WebSocket. Every text frame holds one JSON message `[tag, body]`. This
//! module turns the bytes of an upstream frame into a typed [`Upstream`]
//! value, and writes the few downstream messages the connection layer sends
//! itself (`connected`, `pong`, `error`). It also decodes the
//! `Sec-WebSocket-Protocol` header, which carries the auth token and often
//! the client's first message.
//!
//! The shapes follow the valita schemas of `zero-protocol` in the public
//! `rocicorp/mono` repository, for sync protocol 51 (release 1.9.0) and 52
//! (the development head). zero-cache parses upstream messages in valita's
//! default *strict* mode, so an unknown tag, an unknown key or a wrong type
//! makes the whole message invalid; we do the same, and the error text
//! becomes the message of an `InvalidMessage` error.
//!
//! Everything here works on byte slices and returns values: no sockets,
//! no clocks, no global state. Callers pass in the time and the ids.

pub mod cookie;
pub mod error;
pub mod header;
pub mod json;
pub mod messages;
pub mod poke;
pub mod route;
mod strict;

pub use error::{encode_error, write_error, ErrorBody, ErrorKind};
pub use header::{
    decode_protocol_header, encode_protocol_header, HeaderError, ProtocolHeader,
    MAX_PROTOCOL_HEADER_LEN,
};
pub use messages::{
    connected, parse_upstream, pong, write_connected, write_pong, AnalyzeQueryOptions,
    ChangeDesiredQueriesBody, CrudOp, CrudOpKind, DeleteClientsBody, InitConnectionBody,
    InspectBody, InspectOp, Mutation, MutationId, MutationKind, PullBody, PushBody, QueriesPatchOp,
    QueryPut, Upstream, CRUD_MUTATION_NAME, MAX_JSON_DEPTH,
};
