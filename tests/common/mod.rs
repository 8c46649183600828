//! The harness of the end-to-end tests: it runs the real `syncgate` binary on an ephemeral
//! port and talks to it the way clients do, over real sockets. One module per kind of peer:
//!
//! - [`daemon`]: the binary under test, started with a config of the test's own; its log as
//!   events to wait for, its metrics and its child processes.
//! - [`ws`]: a well-behaved WebSocket client (tungstenite) that answers pings like a browser.
//! - [`raw`]: a WebSocket peer that does only what the test says: hung or dead peers, frames
//!   split or pipelined at will, frames no library would send.
//! - [`http`]: raw bytes in, raw HTTP answer out, for the plain routes and malformed requests.
//! - [`zero`]: what a Zero client puts on the wire: connect parameters, the protocol header
//!   and its token, pushes.
//! - [`browser`]: the real Zero client in a page in headless Chromium, over WebDriver.
//! - [`host`]: what the tests take from the machine: the binary, the repository, temp
//!   directories, `node`, command output.
//! - [`upstream`]: a real upstream: PostgreSQL and zero-cache with the test app's schema,
//!   started once per test process; its logs, its sockets, an outage on demand.
//! - [`cluster`]: zero-cache scaled out (a replication-manager and several view-syncers on
//!   one PostgreSQL), for the many-upstreams tests; which view-syncer serves a group.
//! - [`app`]: the test app, a real Zero client connected wherever the test says, as whom the
//!   test says, driven over JSON lines.
//!
//! Every item is re-exported here, so a test file needs only `mod common; use common::*;`.
//!
//! Nothing here sleeps in place of waiting for something: every wait is for a message, a log
//! line, a socket event, a process exit or a metric value, under a deadline (the last two are
//! polled, as there is nothing to block on).

// Every test binary compiles the whole harness as a private module and uses a different part
// of it (ops_install.rs only a few items of `host`), so in each binary some are never used.
#![allow(dead_code)]

pub mod app;
pub mod browser;
pub mod cluster;
pub mod daemon;
pub mod host;
pub mod http;
pub mod raw;
pub mod upstream;
pub mod ws;
pub mod zero;

// For the same reason, a binary that uses nothing of a module leaves its re-export unused.
#[allow(unused_imports)]
pub use self::{
    app::*, browser::*, cluster::*, daemon::*, host::*, http::*, raw::*, upstream::*, ws::*,
    zero::*,
};
