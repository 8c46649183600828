//! syncgate: a daemon that terminates the WebSocket connections of Zero's sync protocol on
//! io_uring, built so that the weaknesses a security review found in zero-cache's WebSocket
//! layer cannot happen (docs/SECURITY.md). docs/ARCHITECTURE.md tells the whole story; this
//! is the map of the source tree, one folder per layer.
//!
//! - [`process`]: the three kinds of process, all the same binary: the [`supervisor`]
//!   (binds, forks and execs the others, respawns, signals, reloads), the [`listener`]
//!   (accepts, reads request heads, answers plain HTTP, routes upgrades) and the [`worker`]s
//!   (finish handshakes and run connections, one io_uring ring each), with the IPC between
//!   them: [`handoff`] (a socket and its head over SCM_RIGHTS) and [`control`] (ready,
//!   reload, drain).
//! - [`ws`]: the WebSocket layer, sans-IO: [`frame`], [`mask`], [`close`], [`handshake`],
//!   [`deflate`] (permessage-deflate), and [`connection`], one connection's state machine.
//! - [`protocol`]: Zero's sync protocol, sans-IO: its messages, error kinds, the
//!   `Sec-WebSocket-Protocol` header, pokes, and the [`route`]s (paths, parameters, versions,
//!   the worker hash).
//! - [`gate`]: who gets in: [`admission`] (the displacement rules and every refusal, as a
//!   decision), [`auth`] (JWT verification), [`limits`] (fixed-memory rate limiters) and
//!   trusted proxies.
//! - [`sync`]: the embedded workload: a worker's client groups, their [`replica`]s, cookies,
//!   the durable [`store`], the worker's write-ahead log ([`wal`]) and the thread that runs
//!   both off the event loop ([`store_thread`]).
//! - [`upstream`]: the front door (upstream mode: syncgate in front of zero-cache), sans-IO:
//!   the upstream list and its rendezvous hash of the clientGroupID, the upgrade request and
//!   its 101, what one hop's end means for the other, and the upstreams' [`health`]; the
//!   worker's `relay` moves the bytes, the supervisor's [`health_checks`] run the checks.
//! - [`ring`]: the io_uring layer every loop stands on: the ring, typed operation tokens, the
//!   provided-buffer ring.
//!
//! Alone at the top: [`config`], [`logging`], [`metrics`] (shared counters), [`heap`] (the
//! counting allocator behind the heap gauge), [`slab`] and [`index`] (names to slab
//! entries without a second copy of each name), and two commands of the binary that serve
//! packaging: [`healthcheck`] (a container's health check) and [`manpage`] (syncgate(8)).
//!
//! [`health`]: upstream::health
//! [`health_checks`]: process::health
//! [`supervisor`]: process::supervisor
//! [`listener`]: process::listener
//! [`worker`]: process::worker
//! [`handoff`]: process::handoff
//! [`control`]: process::control
//! [`frame`]: ws::frame
//! [`mask`]: ws::mask
//! [`close`]: ws::close
//! [`handshake`]: ws::handshake
//! [`deflate`]: ws::deflate
//! [`connection`]: ws::connection
//! [`route`]: protocol::route
//! [`admission`]: gate::admission
//! [`auth`]: gate::auth
//! [`limits`]: gate::limits
//! [`replica`]: sync::replica
//! [`store`]: sync::store
//! [`wal`]: sync::wal
//! [`store_thread`]: sync::store_thread

pub mod config;
pub mod gate;
pub mod healthcheck;
pub mod heap;
pub mod index;
pub mod logging;
pub mod manpage;
pub mod metrics;
pub mod process;
pub mod protocol;
pub mod ring;
pub mod slab;
pub mod sync;
#[cfg(test)]
mod testing;
pub mod upstream;
pub mod ws;
