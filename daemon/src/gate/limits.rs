//! Rate limiters: connection attempts per client address or per clientID, and mutations per
//! user per client group (docs/SECURITY.md, "No connection rate limiting" and the limits table).
//!
//! zero-cache had no connection rate limiting: any address could open sockets as fast as it
//! liked and make the server verify a JWT for each. syncgate refuses an address over its
//! limit in the listener, before any handoff or JWT work, and answers 429 with a
//! `Retry-After` that tells an honest client exactly when to come back.
//!
//! Everything here is sans-IO and single-threaded: one event loop owns each limiter, passes
//! the time in as an [`Instant`], and the limiters never read a clock, lock, or spawn.
//!
//! # The window
//!
//! Each key keeps one counter per sub-window of `window / SUB_WINDOWS`, and an attempt is
//! allowed while fewer than `max` attempts are counted. The counters span one sub-window more
//! than a window: the oldest lies partly before `now - window`, and it is counted in full.
//! So:
//!
//! - the limiter is never lenient: in any interval of length `window` at most `max` attempts
//!   are allowed, whatever their timing (the counters always cover the whole interval);
//! - it is strict by at most one sub-window: an attempt is forgotten between `window` and
//!   `window + window / SUB_WINDOWS` after it was made (60 to 75 s with the defaults),
//!   instead of exactly `window`.
//!
//! The usual two-counter estimate (previous window weighted by its overlap, plus the current
//! one) errs both ways: when the previous window's attempts were bunched at its end it lets
//! through up to twice `max` in one window. These counters cost 16 more bytes per key and
//! their only error is that bounded over-hold. Only allowed attempts are counted: a client
//! that keeps knocking while refused does not push its own wait further out, so the
//! `Retry-After` it is told is exact: the start of the sub-window in which enough of its old
//! attempts have dropped out.
//!
//! # The table ([`WindowLimiter`])
//!
//! Keys (client addresses, clientIDs) are chosen by clients and unbounded in number, so the
//! table is a fixed array of slots allocated once. A key is hashed with std's keyed SipHash
//! (`RandomState`, random keys per process), so nobody can compute offline which keys land
//! together. The hash picks two buckets of `WAYS` (8) slots, the key may live in either (two
//! choices keep the buckets evenly filled), and the hash is also the slot's fingerprint: the
//! key itself is never stored. `check` looks at those 16 slots only: O(1).
//!
//! A key found there uses its own slot. A new key takes the candidate ranked first by
//! (attempts still counted, last use), among those under the limit:
//! 1. a slot never used or whose attempts have all expired, which is a fresh start; else
//! 2. the least used slot under the limit, counts included: eviction changes whose attempts
//!    they were, never how many. So no flood can lower a count, every slot lets at most `max`
//!    attempts through per window (any number of keys together get at most `capacity * max`),
//!    and keys that churn through one slot share its budget instead of starting afresh;
//! 3. if all 16 hold keys at or over their limit, the new key is refused (fail closed) until
//!    the first of them drops under its limit, and told so in its `Retry-After`.
//!
//! A limited key is never evicted, so no flood of other keys can reset it. The cost of
//! failing closed: whoever keeps both buckets of a key full of limited keys locks that key
//! out while it is new to the table. Doing that to many keys means keeping much of the table
//! limited, which takes `max` allowed attempts per slot per window, every one passing on to
//! JWT verification: visible, and bounded by the connection caps. Failing open instead would
//! give an untracked, unlimited key to exactly the client that filled the table, the attack
//! the limiter exists to stop. A key that found a slot under the limit when it arrived is only
//! ever refused for attempts counted in its slot, and with two choices of 8 a key finds one
//! until roughly 70% of the whole table holds limited keys.
//! [`WindowLimiter::saturated_refusals`] counts the fail-closed refusals, so operators see a
//! table too small for its traffic; size it above the distinct keys expected per window
//! (40 bytes a slot: 65,536 keys take 2.5 MiB).
//!
//! # Client addresses
//!
//! [`ip_key`] groups IPv6 clients by /64 (one host usually owns a whole /64, and a limit per
//! address would give it 2^64 budgets). [`TrustedProxies`](crate::gate::proxies::TrustedProxies)
//! takes the client address from `X-Forwarded-For` only when the socket's peer is a configured
//! proxy.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher, RandomState};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Sub-windows per window. More of them forget an attempt closer to exactly one window after
/// it was made, at 4 bytes per sub-window per key; 4 keeps a slot at 40 bytes and the
/// over-hold under 15 s of the default 60 s window.
const SUB_WINDOWS: usize = 4;

/// Counters per key: one more than [`SUB_WINDOWS`], so that the counted sub-windows always
/// cover at least one whole window behind `now`.
const COUNTERS: usize = SUB_WINDOWS + 1;

/// Slots per bucket of a [`WindowLimiter`] table. With two buckets per key a new key has 16
/// candidates: enough that a key practically never fails closed until about 70% of the table
/// holds limited keys (one bucket of 8 fails 5% of new keys at 50%), few enough that `check`
/// reads about 10 cache lines.
const WAYS: usize = 8;

/// The number of whole seconds to put in an HTTP `Retry-After` header: rounded up, because a
/// client told to come back before its wait is over is refused again; at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// Turns instants into sub-window numbers. Sub-window 0 starts at the first instant seen, as
/// the limiters never read the clock themselves.
#[derive(Debug, Clone)]
struct Clock {
    /// The instant sub-window 0 starts at; `None` until the first `tick`.
    origin: Option<Instant>,
    /// Length of a sub-window in nanoseconds, at least 1.
    width_ns: u64,
    /// Nanoseconds from `origin` to the latest instant seen. Time never goes back behind it, so
    /// an instant out of order cannot bring counted attempts back, and a window change can
    /// re-express "now" in the new sub-windows without being passed an instant.
    latest_ns: u64,
}

impl Clock {
    fn new(window: Duration) -> Clock {
        Clock { origin: None, width_ns: Self::width(window), latest_ns: 0 }
    }

    /// A window's sub-window length, rounded up so that `SUB_WINDOWS` of them span at least
    /// the window (rounding down would make the limiter lenient).
    fn width(window: Duration) -> u64 {
        let ns = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        ns.div_ceil(SUB_WINDOWS as u64).max(1)
    }

    /// The sub-window `now` falls in (never one before the latest seen).
    fn tick(&mut self, now: Instant) -> u64 {
        let origin = *self.origin.get_or_insert(now);
        let since = now.saturating_duration_since(origin).as_nanos();
        self.latest_ns = self.latest_ns.max(u64::try_from(since).unwrap_or(u64::MAX));
        self.current()
    }

    /// The sub-window of the latest instant seen.
    fn current(&self) -> u64 {
        self.latest_ns / self.width_ns
    }

    /// How long from `now` until sub-window `tick` starts; more than zero for any tick after
    /// the current one.
    fn until(&self, tick: u64, now: Instant) -> Duration {
        let origin = self.origin.unwrap_or(now);
        let offset = Duration::from_nanos(tick.saturating_mul(self.width_ns));
        match origin.checked_add(offset) {
            Some(start) => start.saturating_duration_since(now),
            // Only a window of centuries gets here; "much later" is the honest answer.
            None => Duration::from_nanos(u64::MAX),
        }
    }
}

/// The attempts one key made in the sub-windows still counted, oldest first.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    /// The newest sub-window held; `counts` holds `newest - SUB_WINDOWS ..= newest`. Also
    /// serves as "last used" when picking which slot a new key takes.
    newest: u64,
    /// `counts[k]`: attempts allowed in sub-window `newest - SUB_WINDOWS + k` (zero for
    /// sub-windows before the first).
    counts: [u32; COUNTERS],
    /// The sum of `counts` (at most `max`, as only attempts under the limit are counted), so
    /// that the common case, a window already seen in the current sub-window, is not summed
    /// again for each of a key's 16 candidates.
    total: u32,
}

impl Window {
    /// Moves forward to sub-window `tick`: the oldest counts drop out, zeros come in.
    fn advance(&mut self, tick: u64) {
        if tick <= self.newest {
            return;
        }
        let gap = tick - self.newest;
        if gap >= COUNTERS as u64 {
            self.counts = [0; COUNTERS];
        } else {
            let gap = gap as usize;
            self.counts.copy_within(gap.., 0);
            self.counts[COUNTERS - gap..].fill(0);
        }
        self.newest = tick;
        self.total = u32::try_from(self.sum_from(0)).unwrap_or(u32::MAX);
    }

    /// Attempts still counted in sub-window `tick` (`newest` or later), without moving.
    fn live(&self, tick: u64) -> u64 {
        match tick.saturating_sub(self.newest) {
            0 => u64::from(self.total),
            // The oldest `gone` counts have dropped out by `tick`.
            gone if gone < COUNTERS as u64 => self.sum_from(gone as usize),
            _ => 0,
        }
    }

    /// The sum of `counts[k..]`. Index loops here and in `free_at` rather than iterators: in
    /// debug builds, where the tests flood a table with a million keys, every iterator step
    /// is a function call.
    fn sum_from(&self, mut k: usize) -> u64 {
        let mut sum = 0;
        while k < COUNTERS {
            sum += u64::from(self.counts[k]);
            k += 1;
        }
        sum
    }

    /// Counts one attempt in sub-window `tick` if fewer than `max` are counted; otherwise
    /// says from which sub-window on one would be allowed.
    fn try_count(&mut self, max: u32, tick: u64) -> Result<(), u64> {
        self.advance(tick);
        if self.live(tick) < u64::from(max) {
            let newest = &mut self.counts[COUNTERS - 1];
            *newest = newest.saturating_add(1);
            self.total = self.total.saturating_add(1);
            Ok(())
        } else {
            Err(self.free_at(max))
        }
    }

    /// The first sub-window in which fewer than `max` attempts are counted, if none are added:
    /// drop sub-windows oldest first until enough have gone. `counts[k]` stops counting when
    /// sub-window `newest + 1 + k` starts. Needs `max > 0` and a window at its limit now
    /// (then counts that have dropped out already cannot be the answer, so the window need
    /// not be moved to now first).
    fn free_at(&self, max: u32) -> u64 {
        let mut left = u64::from(self.total);
        let mut k = 0;
        while k < COUNTERS {
            left -= u64::from(self.counts[k]);
            if left < u64::from(max) {
                return self.newest + 1 + k as u64;
            }
            k += 1;
        }
        // Not reached when `max > 0`: nothing is left after the newest sub-window.
        self.newest + COUNTERS as u64
    }

    /// Re-expresses the window after a window change: every attempt still counted at
    /// `old_tick` (old sub-windows) is treated as made in `new_tick` (new sub-windows). That
    /// keeps a limited key limited, for up to one new window; finer history cannot be
    /// converted.
    fn collapse(&mut self, old_tick: u64, new_tick: u64) {
        let total = u32::try_from(self.live(old_tick)).unwrap_or(u32::MAX);
        self.counts = [0; COUNTERS];
        self.counts[COUNTERS - 1] = total;
        self.total = total;
        self.newest = new_tick;
    }
}

/// One entry of a [`WindowLimiter`] table.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// The keyed hash of the key that owns the slot, 0 for a slot never used (hashes of 0 are
    /// stored as 1). 64 bits make two live keys sharing one a 2^-64 event, which is what lets
    /// the table keep no key bytes and stay fixed-size; keys that did share one would only
    /// share a budget (stricter, never more lenient).
    fingerprint: u64,
    /// The owner's attempts (and, after an eviction, those of the key it took over from).
    window: Window,
}

/// A sliding-window limit on attempts per key, in a table of fixed size (see the module doc).
#[derive(Debug)]
pub struct WindowLimiter {
    /// Attempts allowed per window; 0 turns the limiter off.
    max: u32,
    /// Sub-window numbering for `window`.
    clock: Clock,
    /// Keyed SipHash with random per-process keys: nobody can choose offline a set of keys
    /// that land in the same buckets.
    hasher: RandomState,
    /// The table, `WAYS` slots per bucket, allocated once in `new` and never grown.
    slots: Box<[Slot]>,
    /// Attempts refused only because every candidate slot held a limited key (failing closed);
    /// a count that keeps growing says the table is too small for the traffic.
    saturated: u64,
}

impl WindowLimiter {
    /// A limiter of `max` attempts per `window` (`max` 0: off) tracking at least `capacity`
    /// keys: the table gets `capacity` rounded up to a multiple of 8 slots, at least 8.
    pub fn new(max: u32, window: Duration, capacity: usize) -> Self {
        let buckets = capacity.div_ceil(WAYS).max(1);
        WindowLimiter {
            max,
            clock: Clock::new(window),
            hasher: RandomState::new(),
            slots: vec![Slot::default(); buckets * WAYS].into_boxed_slice(),
            saturated: 0,
        }
    }

    /// Counts an attempt by `key` at `now` if it is allowed; otherwise refuses it, without
    /// counting it, with how long the key has to wait (never zero).
    pub fn check(&mut self, key: &[u8], now: Instant) -> Result<(), Duration> {
        if self.max == 0 {
            return Ok(());
        }
        let tick = self.clock.tick(now);
        let mut hasher = self.hasher.build_hasher();
        hasher.write(key);
        let hash = hasher.finish();
        let fingerprint = hash.max(1);
        // Two buckets from the two halves of the hash (a table of one bucket has just that).
        let buckets = self.slots.len() / WAYS;
        let first = (hash as u32) as usize % buckets;
        let mut second = (hash >> 32) as usize % buckets;
        if second == first {
            second = (first + 1) % buckets;
        }
        let candidates = [first, second];
        let candidates = &candidates[..buckets.min(2)];

        // The key's own slot or, if it has none, the one it takes: the least used under the
        // limit, ranked by attempts still counted, then by last use. (Index loops, and the
        // rank packed into one integer, because iterator steps and tuple comparisons are
        // function calls in the debug builds that run the million-key flood test.)
        let mut victim = None;
        // Ranks from this one up belong to slots at their limit, which are never taken.
        let mut best = u128::from(self.max) << 64;
        for &bucket in candidates {
            let mut i = bucket * WAYS;
            while i < (bucket + 1) * WAYS {
                let slot = &mut self.slots[i];
                if slot.fingerprint == fingerprint {
                    return slot
                        .window
                        .try_count(self.max, tick)
                        .map_err(|t| self.clock.until(t, now));
                }
                let rank =
                    u128::from(slot.window.live(tick)) << 64 | u128::from(slot.window.newest);
                if rank < best {
                    victim = Some(i);
                    best = rank;
                }
                i += 1;
            }
        }
        if let Some(i) = victim {
            let slot = &mut self.slots[i];
            slot.fingerprint = fingerprint;
            return slot.window.try_count(self.max, tick).map_err(|t| self.clock.until(t, now));
        }
        // Every candidate is limited: fail closed until the first of them drops under its limit.
        self.saturated += 1;
        let mut soonest_free = u64::MAX;
        for &bucket in candidates {
            let mut i = bucket * WAYS;
            while i < (bucket + 1) * WAYS {
                let free_at = self.slots[i].window.free_at(self.max);
                if free_at < soonest_free {
                    soonest_free = free_at;
                }
                i += 1;
            }
        }
        Err(self.clock.until(soonest_free, now))
    }

    /// Applies a config reload without forgetting anyone's attempts. A new `max` applies to
    /// the attempts already counted. A new `window` cannot convert the old sub-windows, so
    /// every attempt still counted is treated as made at the latest `check`: a limited key
    /// stays limited, for up to one new window.
    pub fn set_limits(&mut self, max: u32, window: Duration) {
        self.max = max;
        let width = Clock::width(window);
        if width == self.clock.width_ns {
            return;
        }
        let old_tick = self.clock.current();
        self.clock.width_ns = width;
        let new_tick = self.clock.current();
        for slot in self.slots.iter_mut().filter(|s| s.fingerprint != 0) {
            slot.window.collapse(old_tick, new_tick);
        }
    }

    /// Bytes this limiter holds, table included; fixed at construction.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + std::mem::size_of_val::<[Slot]>(&self.slots)
    }

    /// The number of keys the table holds (the `capacity` asked for, rounded up).
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Attempts refused because the key's candidate slots all held limited keys (see the
    /// module doc); for metrics, to tell that the table is too small.
    pub fn saturated_refusals(&self) -> u64 {
        self.saturated
    }
}

/// The rate-limit key of a client address: an IPv4 address whole (as its IPv4-mapped IPv6
/// form), an IPv6 address by its /64 (the rest zeroed), an IPv4-mapped IPv6 address as the
/// IPv4 address it carries. The two kinds cannot collide: a mapped key has `ff ff` in bytes
/// 10 and 11, where a /64 key has zeros.
pub fn ip_key(ip: IpAddr) -> [u8; 16] {
    match canonical(ip) {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => {
            let mut key = [0; 16];
            key[..8].copy_from_slice(&v6.octets()[..8]);
            key
        }
    }
}

/// An IPv4-mapped IPv6 address (what a dual-stack socket reports for IPv4 peers) as the IPv4
/// address it is; anything else unchanged.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// zero-cache's `perUserMutationLimit`: at most `max` mutations per window for each user in
/// each client group, over the same sliding window as [`WindowLimiter`]. A refused mutation
/// gets `MutationRateLimited` and the connection stays open.
///
/// Users and groups come from verified tokens and live connections, so entries are exact (a
/// map, not a fixed table). The worker calls [`MutationLimiter::forget_group`] when a group's
/// last client leaves; the group's counts are then kept only until they run out (one window
/// and a sub-window at most), so that leaving and rejoining does not reset them. Memory is
/// thus bounded by the live groups plus those left within the last window, and within a group
/// by the users active in the last window.
#[derive(Debug)]
pub struct MutationLimiter {
    /// Mutations allowed per user per group per window; 0 turns the limit off.
    max: u32,
    /// Sub-window numbering for `window`.
    clock: Clock,
    /// Counts by client group.
    groups: HashMap<String, Group>,
    /// Groups whose last client left, with the sub-window it left in, oldest first: all their
    /// counts have run out `COUNTERS` sub-windows later, and then the group goes.
    departed: VecDeque<(u64, String)>,
}

/// One client group's mutation counts.
#[derive(Debug, Default)]
struct Group {
    /// Windows by user.
    users: HashMap<String, Window>,
    /// The sub-window in which the group's last client left, while it has none; it matches
    /// its `departed` entry, unless the group came back (and maybe left again) since.
    left_at: Option<u64>,
}

impl MutationLimiter {
    /// A limit of `max` mutations per `window` per user per group; `max` 0 turns it off.
    pub fn new(max: u32, window: Duration) -> Self {
        MutationLimiter {
            max,
            clock: Clock::new(window),
            groups: HashMap::new(),
            departed: VecDeque::new(),
        }
    }

    /// Counts a mutation by `user` in `group` at `now` if allowed; otherwise refuses it,
    /// without counting it, with how long the user has to wait (never zero).
    pub fn check(&mut self, user: &str, group: &str, now: Instant) -> Result<(), Duration> {
        if self.max == 0 {
            return Ok(());
        }
        let tick = self.clock.tick(now);
        self.prune(tick);
        let result = match self.groups.get_mut(group) {
            Some(entry) => {
                entry.left_at = None;
                Self::check_user(&mut entry.users, user, self.max, tick)
            }
            None => {
                let mut entry = Group::default();
                let result = Self::check_user(&mut entry.users, user, self.max, tick);
                self.groups.insert(group.to_owned(), entry);
                result
            }
        };
        result.map_err(|t| self.clock.until(t, now))
    }

    fn check_user(
        users: &mut HashMap<String, Window>,
        user: &str,
        max: u32,
        tick: u64,
    ) -> Result<(), u64> {
        if let Some(window) = users.get_mut(user) {
            return window.try_count(max, tick);
        }
        // A user new to the group: drop the windows that have run out, so that a long-lived
        // group holds only the users of the last window.
        users.retain(|_, window| window.live(tick) > 0);
        let mut window = Window::default();
        let result = window.try_count(max, tick);
        users.insert(user.to_owned(), window);
        result
    }

    /// Says that `group`'s last client left: its counts go once they have run out.
    pub fn forget_group(&mut self, group: &str) {
        let tick = self.clock.current();
        if let Some(entry) = self.groups.get_mut(group) {
            entry.left_at = Some(tick);
            self.departed.push_back((tick, group.to_owned()));
        }
        self.prune(tick);
    }

    /// Drops the departed groups whose counts have all run out by sub-window `tick`.
    fn prune(&mut self, tick: u64) {
        while self.departed.front().is_some_and(|(left, _)| left + COUNTERS as u64 <= tick) {
            let Some((left, group)) = self.departed.pop_front() else { break };
            if self.groups.get(&group).is_some_and(|entry| entry.left_at == Some(left)) {
                self.groups.remove(&group);
            }
        }
    }

    /// Applies a config reload, as [`WindowLimiter::set_limits`] does; `max` 0 turns the limit
    /// off and frees its memory.
    pub fn set_limits(&mut self, max: u32, window: Duration) {
        self.max = max;
        if max == 0 {
            self.groups = HashMap::new();
            self.departed = VecDeque::new();
        }
        let width = Clock::width(window);
        if width == self.clock.width_ns {
            return;
        }
        let old_tick = self.clock.current();
        self.clock.width_ns = width;
        let new_tick = self.clock.current();
        // Every count now dates from `new_tick`, and so does every departure.
        for entry in self.groups.values_mut() {
            for window in entry.users.values_mut() {
                window.collapse(old_tick, new_tick);
            }
            if entry.left_at.is_some() {
                entry.left_at = Some(new_tick);
            }
        }
        for (left, _) in &mut self.departed {
            *left = new_tick;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const MINUTE: Duration = Duration::from_secs(60);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A deterministic generator for schedules and keys (xorshift64*).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    // ----- WindowLimiter -----

    #[test]
    fn allows_max_then_refuses_with_the_wait_until_the_oldest_attempts_expire() {
        let t0 = Instant::now();
        let mut l = WindowLimiter::new(3, MINUTE, 64);
        for s in 0..3 {
            assert_eq!(l.check(b"a", t0 + secs(s)), Ok(()), "attempt {s}");
        }
        // All three fell in sub-window 0 (0..15 s), which stops counting at 75 s.
        assert_eq!(l.check(b"a", t0 + secs(3)), Err(secs(72)));
        assert_eq!(l.check(b"b", t0 + secs(3)), Ok(()), "other keys have their own count");
    }

    #[test]
    fn retry_after_is_exact_and_short_when_little_is_left() {
        let t0 = Instant::now();
        let mut l = WindowLimiter::new(3, MINUTE, 64);
        for s in [0, 20, 40] {
            l.check(b"k", t0 + secs(s)).unwrap();
        }
        // Only the attempt at 0 s has to drop out: at 75 s, not a whole window from now.
        assert_eq!(l.check(b"k", t0 + secs(50)), Err(secs(25)));
        assert_eq!(l.check(b"k", t0 + ms(74_900)), Err(ms(100)));
        let just_before = t0 + secs(75) - Duration::from_nanos(1);
        assert_eq!(l.check(b"k", just_before), Err(Duration::from_nanos(1)));
        assert_eq!(l.check(b"k", t0 + secs(75)), Ok(()));
        // Now 20, 40 and 75 s are counted; 20 s (sub-window 1) drops out at 90 s.
        assert_eq!(l.check(b"k", t0 + secs(76)), Err(secs(14)));
    }

    #[test]
    fn refused_attempts_do_not_extend_the_wait() {
        let t0 = Instant::now();
        let mut l = WindowLimiter::new(2, MINUTE, 64);
        l.check(b"k", t0).unwrap();
        l.check(b"k", t0).unwrap();
        for s in 1..75 {
            let wait = l.check(b"k", t0 + secs(s)).unwrap_err();
            assert_eq!(wait, secs(75 - s), "at {s} s");
        }
        assert_eq!(l.check(b"k", t0 + secs(75)), Ok(()));
    }

    #[test]
    fn a_limited_key_is_allowed_again_after_the_window() {
        let t0 = Instant::now();
        let mut l = WindowLimiter::new(5, ms(1000), 64);
        for _ in 0..5 {
            l.check(b"k", t0).unwrap();
        }
        let wait = l.check(b"k", t0).unwrap_err();
        assert!(wait > ms(1000) && wait <= ms(1250), "{wait:?}");
        for _ in 0..5 {
            assert_eq!(l.check(b"k", t0 + wait), Ok(()));
        }
        assert!(l.check(b"k", t0 + wait).is_err());
    }

    /// The error bound of the module doc, checked against an exact log of allowed attempts
    /// under random timing: never more than `max` in any window, and a refusal only when
    /// `max` were allowed within the last window and one sub-window.
    #[test]
    fn never_lenient_and_strict_by_at_most_one_sub_window() {
        let t0 = Instant::now();
        let (max, window) = (10u32, ms(1000));
        let mut l = WindowLimiter::new(max, window, 64);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut allowed: Vec<Duration> = Vec::new();
        let mut now = Duration::ZERO;
        let (mut refusals, mut admits) = (0, 0);
        for _ in 0..20_000 {
            // Bursts and lulls: mostly short gaps, sometimes long ones.
            now += match rng.next() % 10 {
                0 => ms(rng.next() % 1500),
                _ => ms(rng.next() % 60),
            };
            // `allowed` is in time order: count its tail within `span` of now.
            let in_window =
                |span: Duration| allowed.len() - allowed.partition_point(|&a| a + span <= now);
            match l.check(b"k", t0 + now) {
                Ok(()) => {
                    admits += 1;
                    assert!(in_window(window) < max as usize, "lenient at {now:?}");
                    allowed.push(now);
                }
                Err(wait) => {
                    refusals += 1;
                    assert!(wait > Duration::ZERO);
                    assert!(
                        in_window(window + window / SUB_WINDOWS as u32) >= max as usize,
                        "refused at {now:?} with fewer than max in window + sub-window"
                    );
                    assert!(wait <= window + window / SUB_WINDOWS as u32, "{wait:?}");
                }
            }
        }
        assert!(refusals > 1000 && admits > 1000, "the schedule exercised both sides");
    }

    /// The flood the module exists for: a million distinct addresses (IPv6 /64s are cheap)
    /// against a 4096-slot table, all within one window.
    #[test]
    fn a_flood_of_distinct_keys_neither_grows_memory_nor_resets_a_limited_key() {
        let t0 = Instant::now();
        let mut l = WindowLimiter::new(100, MINUTE, 4096);
        let before = l.memory_bytes();
        let table = l.slots.as_ptr();
        assert_eq!(l.capacity(), 4096);
        assert_eq!(std::mem::size_of::<Slot>(), 40, "the size the module doc quotes");
        assert!((4096 * 40..4096 * 40 + 1024).contains(&before), "{before}");

        let victim = ip_key(ip("203.0.113.9"));
        for _ in 0..100 {
            l.check(&victim, t0).unwrap();
        }
        let wait = l.check(&victim, t0).unwrap_err();
        let mut allowed = 0u64;
        for i in 0u64..1_000_000 {
            // What `ip_key` makes of an address in the i-th /64.
            let mut attacker = [0; 16];
            attacker[..8].copy_from_slice(&i.to_be_bytes());
            allowed += u64::from(l.check(&attacker, t0 + Duration::from_micros(i)).is_ok());
        }
        assert_eq!(l.memory_bytes(), before);
        assert_eq!(l.slots.as_ptr(), table, "the table was never reallocated");
        assert!(allowed <= 4096 * 100, "at most capacity * max got through: {allowed}");
        assert!(l.saturated_refusals() > 0, "the table filled up and failed closed");

        let now = t0 + secs(1);
        assert_eq!(l.check(&victim, now), Err(wait - secs(1)), "still limited, same wait");
        assert_eq!(l.check(&victim, t0 + wait), Ok(()), "and free once the window passed");
    }

    /// A 16-slot table is one candidate set (two buckets of 8), so which slot a key takes is
    /// deterministic whatever the hash keys are.
    fn one_set(max: u32) -> WindowLimiter {
        let l = WindowLimiter::new(max, MINUTE, 16);
        assert_eq!(l.capacity(), 16);
        l
    }

    #[test]
    fn flooding_cannot_get_more_than_capacity_times_max_through() {
        let t0 = Instant::now();
        let mut l = one_set(3);
        let allowed = (0u32..10_000).filter(|i| l.check(&i.to_le_bytes(), t0).is_ok()).count();
        assert_eq!(allowed, 16 * 3);

        // Two keys taking turns in a full table, each arrival taking over the least used slot
        // (often the other's), get no more than the budget left in the table: 1 in each of
        // the 15 busy slots and 3 in the free one. Were evicted counts forgotten, every turn
        // would start afresh and all 1000 would pass.
        let mut l = one_set(3);
        for i in 0u32..15 {
            for _ in 0..2 {
                l.check(&i.to_le_bytes(), t0).unwrap();
            }
        }
        let turns = (0..1000).filter(|n| l.check(if n % 2 == 0 { b"x" } else { b"y" }, t0).is_ok());
        let turns = turns.count();
        assert!((2..=15 + 3).contains(&turns), "{turns}");
    }

    #[test]
    fn a_key_under_its_limit_is_not_refused_while_a_slot_is_free() {
        let t0 = Instant::now();
        let mut l = one_set(3);
        for i in 0u32..15 {
            for _ in 0..3 {
                l.check(&i.to_le_bytes(), t0 + secs(u64::from(i))).unwrap();
            }
            assert!(l.check(&i.to_le_bytes(), t0 + secs(u64::from(i))).is_err());
        }
        let now = t0 + secs(20);
        for _ in 0..3 {
            assert_eq!(l.check(b"newcomer", now), Ok(()));
        }
        assert!(l.check(b"newcomer", now).is_err());
        assert_eq!(l.saturated_refusals(), 0);

        // Every slot is now limited: a 17th key fails closed, told to come back when the
        // first slot drops under its limit (key 0's attempts, sub-window 0, free at 75 s).
        assert_eq!(l.check(b"late", now), Err(secs(55)));
        assert_eq!(l.saturated_refusals(), 1);
        for i in 0u32..15 {
            assert!(l.check(&i.to_le_bytes(), now).is_err(), "no limited key was evicted");
        }
        assert_eq!(l.check(b"late", t0 + secs(75)), Ok(()));
    }

    #[test]
    fn a_new_key_takes_an_expired_slot_then_the_least_used_one() {
        let t0 = Instant::now();
        let mut l = one_set(4);
        // 16 keys with 2 attempts each, except key 5 with 1.
        for i in 0u32..16 {
            let n = if i == 5 { 1 } else { 2 };
            for _ in 0..n {
                l.check(&i.to_le_bytes(), t0).unwrap();
            }
        }
        // The newcomer takes key 5's slot and its one attempt: 3 more for it.
        for _ in 0..3 {
            assert_eq!(l.check(b"new", t0), Ok(()));
        }
        assert!(l.check(b"new", t0).is_err());
        // Nobody else lost their count: each of the other 15 has exactly 2 left.
        for i in (0u32..16).filter(|&i| i != 5) {
            assert_eq!(l.check(&i.to_le_bytes(), t0), Ok(()));
            assert_eq!(l.check(&i.to_le_bytes(), t0), Ok(()));
            assert!(l.check(&i.to_le_bytes(), t0).is_err(), "key {i}");
        }

        // Once everything has expired, a newcomer gets a whole budget again.
        let later = t0 + secs(80);
        for _ in 0..4 {
            assert_eq!(l.check(b"later", later), Ok(()));
        }
        assert!(l.check(b"later", later).is_err());
    }

    #[test]
    fn set_limits_keeps_the_counts() {
        let t0 = Instant::now();
        let mut l = WindowLimiter::new(5, MINUTE, 64);
        for _ in 0..3 {
            l.check(b"k", t0).unwrap();
        }
        l.set_limits(3, MINUTE);
        assert!(l.check(b"k", t0 + secs(1)).is_err(), "lower max applies to the counted");
        l.set_limits(4, MINUTE);
        assert_eq!(l.check(b"k", t0 + secs(1)), Ok(()));
        assert!(l.check(b"k", t0 + secs(1)).is_err());

        // A shorter window: the four attempts count as made at the last check (1 s) and are
        // held for up to one new window plus a sub-window.
        l.set_limits(4, secs(10));
        let wait = l.check(b"k", t0 + secs(2)).unwrap_err();
        assert!(wait > secs(8) && wait <= secs(11), "{wait:?}");
        assert!(l.check(b"k", t0 + secs(2) + wait - ms(1)).is_err());
        assert_eq!(l.check(b"k", t0 + secs(2) + wait), Ok(()));
    }

    #[test]
    fn max_zero_turns_the_limiter_off() {
        let t0 = Instant::now();
        let mut l = WindowLimiter::new(0, MINUTE, 8);
        assert!((0..1000).all(|_| l.check(b"k", t0).is_ok()));
        l.set_limits(1, MINUTE);
        assert_eq!(l.check(b"k", t0), Ok(()));
        assert!(l.check(b"k", t0).is_err());
    }

    #[test]
    fn an_instant_out_of_order_is_harmless() {
        let t0 = Instant::now();
        let mut l = WindowLimiter::new(2, MINUTE, 8);
        l.check(b"k", t0 + secs(30)).unwrap();
        l.check(b"k", t0 + secs(30)).unwrap();
        // Earlier than anything seen: still counted as "now", not before the attempts.
        let wait = l.check(b"k", t0 + secs(1)).unwrap_err();
        assert!(wait > secs(60), "{wait:?}");
        // Earlier than the very first instant the limiter saw.
        let mut l = WindowLimiter::new(1, MINUTE, 8);
        l.check(b"k", t0 + secs(5)).unwrap();
        assert!(l.check(b"k", t0).is_err());
    }

    #[test]
    fn capacity_rounds_up_to_whole_buckets() {
        assert_eq!(WindowLimiter::new(1, MINUTE, 0).capacity(), 8);
        assert_eq!(WindowLimiter::new(1, MINUTE, 9).capacity(), 16);
        let t0 = Instant::now();
        let mut l = WindowLimiter::new(1, MINUTE, 0);
        let allowed = (0u32..100).filter(|i| l.check(&i.to_le_bytes(), t0).is_ok()).count();
        assert_eq!(allowed, 8, "one bucket: its 8 slots' budgets");
    }

    #[test]
    fn tiny_and_huge_windows_do_not_break_the_arithmetic() {
        let t0 = Instant::now();
        let mut l = WindowLimiter::new(1, Duration::ZERO, 8);
        l.check(b"k", t0).unwrap();
        assert_eq!(l.check(b"k", t0), Err(Duration::from_nanos(COUNTERS as u64)));
        let mut l = WindowLimiter::new(1, Duration::MAX, 8);
        l.check(b"k", t0).unwrap();
        assert!(l.check(b"k", t0 + secs(1_000_000)).unwrap_err() > secs(1_000_000));
    }

    #[test]
    fn retry_after_seconds_round_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_nanos(1)), 1);
        assert_eq!(retry_after_secs(secs(1)), 1);
        assert_eq!(retry_after_secs(secs(1) + Duration::from_nanos(1)), 2);
        assert_eq!(retry_after_secs(secs(72)), 72);
    }

    // ----- ip_key -----

    #[test]
    fn ip_keys_group_ipv6_by_64_and_keep_ipv4_whole() {
        assert_eq!(ip_key(ip("192.0.2.1")), Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped().octets());
        assert_ne!(ip_key(ip("192.0.2.1")), ip_key(ip("192.0.2.2")));
        assert_eq!(ip_key(ip("::ffff:192.0.2.1")), ip_key(ip("192.0.2.1")));
        assert_eq!(ip_key(ip("2001:db8:1:2:aaaa::1")), ip_key(ip("2001:db8:1:2:ffff:1:2:3")));
        assert_ne!(ip_key(ip("2001:db8:1:2::1")), ip_key(ip("2001:db8:1:3::1")));
        assert_eq!(ip_key(ip("2001:db8:1:2:3:4:5:6"))[8..], [0; 8]);
        // The /64 that holds the mapped range does not alias IPv4 keys.
        assert_ne!(ip_key(ip("::1")), ip_key(ip("0.0.0.1")));
        assert_ne!(ip_key(ip("::")), ip_key(ip("0.0.0.0")));
    }

    // ----- TrustedProxies -----

    // ----- MutationLimiter -----

    #[test]
    fn mutations_are_limited_per_user_and_group() {
        let t0 = Instant::now();
        let mut m = MutationLimiter::new(2, MINUTE);
        assert_eq!(m.check("alice", "g1", t0), Ok(()));
        assert_eq!(m.check("alice", "g1", t0 + secs(20)), Ok(()));
        assert_eq!(m.check("alice", "g1", t0 + secs(21)), Err(secs(54)));
        assert_eq!(m.check("alice", "g2", t0 + secs(21)), Ok(()), "another group");
        assert_eq!(m.check("bob", "g1", t0 + secs(21)), Ok(()), "another user");
        assert_eq!(m.check("alice", "g1", t0 + secs(75)), Ok(()));
        assert!(m.check("alice", "g1", t0 + secs(75)).is_err());
    }

    #[test]
    fn mutation_limit_zero_is_off_and_holds_nothing() {
        let t0 = Instant::now();
        let mut m = MutationLimiter::new(0, MINUTE);
        assert!((0..1000).all(|i| m.check("u", &format!("g{i}"), t0).is_ok()));
        assert!(m.groups.is_empty());
        m.set_limits(1, MINUTE);
        assert_eq!(m.check("u", "g", t0), Ok(()));
        assert!(m.check("u", "g", t0).is_err());
        m.set_limits(0, MINUTE);
        assert!(m.groups.is_empty());
        assert_eq!(m.check("u", "g", t0), Ok(()));
    }

    #[test]
    fn leaving_and_rejoining_does_not_reset_a_group() {
        let t0 = Instant::now();
        let mut m = MutationLimiter::new(1, MINUTE);
        m.check("u", "g", t0).unwrap();
        m.forget_group("g");
        assert_eq!(m.check("u", "g", t0 + secs(1)), Err(secs(74)), "still counted");
        m.forget_group("g");
        m.forget_group("never-seen");
        assert_eq!(m.check("u", "g", t0 + secs(75)), Ok(()));
    }

    #[test]
    fn departed_groups_are_dropped_once_their_counts_run_out() {
        let t0 = Instant::now();
        let mut m = MutationLimiter::new(1, MINUTE);
        for g in 0..100 {
            m.check("u", &format!("g{g}"), t0).unwrap();
            m.forget_group(&format!("g{g}"));
        }
        // One that left and came back stays however long ago it first left.
        m.check("u", "g7", t0 + secs(10)).unwrap_err();
        m.check("u", "live", t0 + secs(10)).unwrap();
        assert_eq!(m.groups.len(), 101);
        m.check("u", "live", t0 + secs(74)).unwrap_err();
        assert_eq!(m.groups.len(), 101, "nothing has run out yet");
        m.check("u", "live", t0 + secs(75)).unwrap();
        let mut left: Vec<_> = m.groups.keys().cloned().collect();
        left.sort();
        assert_eq!(left, ["g7", "live"]);
        assert!(m.departed.is_empty());
        // g7 leaving again goes through the same delay, from its new departure.
        m.forget_group("g7");
        m.check("u", "live", t0 + secs(89)).unwrap_err();
        assert!(m.groups.contains_key("g7"));
        m.check("u", "live", t0 + secs(150)).unwrap();
        assert!(!m.groups.contains_key("g7"));
    }

    #[test]
    fn a_group_keeps_only_the_users_of_the_last_window() {
        let t0 = Instant::now();
        let mut m = MutationLimiter::new(1, MINUTE);
        m.check("old", "g", t0).unwrap();
        m.check("recent", "g", t0 + secs(70)).unwrap();
        // "old" ran out at 75 s: a new user at 80 s drops its entry, not "recent"'s.
        m.check("new", "g", t0 + secs(80)).unwrap();
        let mut users: Vec<_> = m.groups["g"].users.keys().cloned().collect();
        users.sort();
        assert_eq!(users, ["new", "recent"]);
        assert!(m.check("recent", "g", t0 + secs(80)).is_err());
    }

    #[test]
    fn mutation_limits_reload_keeps_counts() {
        let t0 = Instant::now();
        let mut m = MutationLimiter::new(3, MINUTE);
        for _ in 0..3 {
            m.check("u", "g", t0).unwrap();
        }
        m.set_limits(4, MINUTE);
        assert_eq!(m.check("u", "g", t0), Ok(()));
        m.set_limits(4, secs(10));
        let wait = m.check("u", "g", t0 + secs(1)).unwrap_err();
        assert!(wait > secs(8) && wait <= secs(13), "{wait:?}");
        assert_eq!(m.check("u", "g", t0 + secs(1) + wait), Ok(()));
    }
}
