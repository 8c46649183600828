//! The three kinds of process (all the same binary, chosen by a role flag) and the channels
//! between them. docs/ARCHITECTURE.md draws them.

pub mod control;
pub mod event_loop;
pub mod handoff;
pub mod listener;
pub mod supervisor;
pub mod worker;
