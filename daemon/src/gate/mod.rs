//! Who gets in, and how often: the checks a socket passes before it is served. Rate limits
//! run in the listener, before any handoff or token work; the token and the admission
//! decision in the worker that owns the socket's client group.

pub mod admission;
pub mod auth;
pub mod limits;
pub mod proxies;
