//! The event loop every child process runs, written once: arm the signal read, the control
//! channel and the tick; tell the supervisor it is ready; then wait for completions and hand
//! each to the process, until the process says it is done. The listener and the workers
//! differ only in what they do with their own operations ([`Process`]).

use std::ops::ControlFlow;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::process::control::{self, Message, Order};
use crate::ring::{Completion, Op, Ring};

/// A child process, as its loop sees it.
pub trait Process {
    fn ring(&mut self) -> &mut Ring;
    /// The control channel from the supervisor.
    fn control(&self) -> &OwnedFd;
    /// The signalfd of the signals that stop the process.
    fn signalfd(&self) -> RawFd;
    /// How often [`Process::on_tick`] runs.
    fn tick(&self) -> Duration;
    /// A completion of one of the process's own operations (anything but the tick, the
    /// signal read and the control channel).
    fn on_completion(&mut self, op: Op, index: u32, cqe: &Completion, now: Instant);
    fn on_tick(&mut self, now: Instant);
    /// SIGTERM or SIGINT arrived.
    fn on_signal(&mut self, now: Instant);
    fn on_order(&mut self, order: Order, now: Instant);
    /// Before each wait for completions.
    fn before_wait(&mut self) {}
    /// After each batch of completions; `Break` ends the loop.
    fn after_batch(&mut self, now: Instant) -> ControlFlow<()>;
}

/// Runs `p` until it is done. Errors: the control channel or the ring failed.
pub fn run(p: &mut impl Process) -> Result<(), String> {
    let (signalfd, control) = (p.signalfd(), p.control().as_raw_fd());
    p.ring().read_signals(&signalfd);
    p.ring().poll_multi(&control, Op::Control.token(0));
    control::send_message(p.control().as_fd(), &Message::Ready)
        .map_err(|e| format!("control channel: {e}"))?;
    let tick = p.tick();
    p.ring().arm_tick(tick);
    let mut cqes = Vec::with_capacity(512);
    loop {
        p.before_wait();
        p.ring().submit_and_wait().map_err(|e| format!("waiting for completions: {e}"))?;
        p.ring().drain(&mut cqes);
        let now = Instant::now();
        for cqe in &cqes {
            match Op::of(cqe.user_data()) {
                (Op::Tick, _) => {
                    p.on_tick(now);
                    p.ring().arm_tick(tick);
                }
                (Op::Signal, _) => {
                    p.on_signal(now);
                    p.ring().read_signals(&signalfd);
                }
                (Op::Control, _) => {
                    if !cqe.more() {
                        p.ring().poll_multi(&control, Op::Control.token(0));
                    }
                    for order in control::receive_orders(p.control()) {
                        p.on_order(order, now);
                    }
                }
                (Op::Nothing, _) => {}
                (op, index) => p.on_completion(op, index, cqe, now),
            }
        }
        if p.after_batch(now).is_break() {
            return Ok(());
        }
    }
}
