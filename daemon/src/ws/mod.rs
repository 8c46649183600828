//! The WebSocket layer (RFC 6455, RFC 7692), without any I/O: state machines over byte
//! slices that the workers' loops feed and drain.

pub mod close;
pub mod connection;
pub mod deflate;
pub mod frame;
pub mod handshake;
pub mod mask;
