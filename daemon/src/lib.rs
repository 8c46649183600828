//! syncgate: a daemon that terminates the WebSocket connections of Zero's sync protocol on
//! io_uring, built so that the weaknesses a security review found in zero-cache's WebSocket
//! layer cannot happen (see DESIGN.md beside the repository).
//!
//! Processes (all the same binary):
//! - [`supervisor`]: binds the socket, starts the others by fork+exec, respawns, signals.
//! - [`listener`]: accepts, reads request heads, answers plain HTTP, routes upgrades.
//! - [`worker`]: finishes handshakes and runs connections, one io_uring ring each.
//!
//! Sans-IO core (no sockets; unit-tested and fuzzable):
//! - [`handshake`]: request heads, upgrade checks, HTTP and 101 responses.
//! - [`route`]: sync paths, connect parameters, the worker hash.
//! - [`auth`]: JWT verification and its cache.
//! - [`protocol`]: Zero's messages, error kinds and the `Sec-WebSocket-Protocol` header.
//! - [`frame`], [`mask`], [`close`]: the WebSocket frame codec.
//! - [`deflate`]: permessage-deflate negotiation and bounded (de)compression.
//! - [`limits`]: the fixed-memory rate limiters and trusted proxies.
//! - [`connection`]: one connection's state machine (lifecycle, keepalive, close).
//! - [`group`]: the admission decision for a newcomer (the displacement rules).
//! - [`replica`]: one client group's data, CRUD mutations, cookies, catch-up, pokes.
//! - [`json`]: rows written as JSON without escaping byte by byte.
//!
//! Plumbing: [`sync`] (a worker's groups, their commits and poke fan-out), [`store`]
//! (SQLite), [`ring`] (io_uring, buffer ring), [`slab`], [`index`] (names to slab entries),
//! [`handoff`] (fd passing), [`control`] (supervisor <-> children), [`metrics`] (shared
//! counters), [`heap`] (the counting allocator behind the heap gauge), [`config`],
//! [`logging`].

pub mod auth;
pub mod close;
pub mod config;
pub mod connection;
pub mod control;
pub mod deflate;
pub mod frame;
pub mod group;
pub mod handoff;
pub mod handshake;
pub mod heap;
pub mod index;
pub mod json;
pub mod limits;
pub mod listener;
pub mod logging;
pub mod mask;
pub mod metrics;
pub mod protocol;
pub mod replica;
pub mod ring;
pub mod route;
pub mod slab;
pub mod store;
pub mod supervisor;
pub mod sync;
pub mod worker;
