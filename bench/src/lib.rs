//! The syncgate benchmark kit: a load client (`loadgen`) that reproduces uWebSockets'
//! load_test method against a server speaking Zero's sync protocol, the peer servers it
//! compares syncgate with (`peer-tungstenite`, `peer-fastwebsockets`, and the Node `ws`
//! server in `node-peer/`), and `bench-report`, which turns the runs into a table and a
//! chart. bench/README.md explains the method and how to read the results.
//!
//! The library holds what is worth testing on its own: framing, the protocol pieces,
//! the peers' group logic, measurement helpers and the report.

pub mod front_door;
pub mod peer;
pub mod record;
pub mod report;
pub mod stats;
pub mod token;
pub mod wsframe;
pub mod zero;
