//! Client groups on one worker: who is connected under which clientID, which user a group
//! belongs to, and the admission decision for a newcomer (DESIGN.md's displacement rules).
//!
//! Every socket of a group lands on the same worker (the routing hash), so this registry is
//! local, single-threaded and authoritative. It is sans-IO: it decides, the worker acts.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use crate::protocol::ErrorKind;

/// Groups whose owner is remembered after their last client left, so a stranger cannot wait
/// for the owner to disconnect and then join (rule 4). Bounded so that many groups cannot
/// grow the worker without limit; the oldest pins go first.
const MAX_PINS: usize = 1 << 20;

/// The decision for a newcomer whose token (if any) is already verified.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Admit,
    /// Same clientID, same verified user: close the old connection and admit (rule 2).
    Replace(u32),
    /// Same clientID, not provably the same user: probe the old connection; refuse the
    /// newcomer if it answers, replace it if it does not (rule 3).
    Probe(u32),
    Refuse(ErrorKind, String),
}

#[derive(Default)]
pub struct Groups {
    /// Admitted connections by clientID (the unique key of a connection inside a worker).
    clients: HashMap<Rc<str>, Member>,
    /// Connection count per client group, for the per-group cap.
    sizes: HashMap<Rc<str>, usize>,
    /// The verified user each group is pinned to.
    pins: HashMap<Rc<str>, Rc<str>>,
    /// Pin insertion order, for eviction at `MAX_PINS`.
    pin_order: VecDeque<Rc<str>>,
}

struct Member {
    slot: u32,
    user: Option<Rc<str>>,
    group: Rc<str>,
}

impl Groups {
    pub fn decide(
        &self,
        client_id: &str,
        group_id: &str,
        user: Option<&str>,
        max_group_connections: usize,
    ) -> Admission {
        if let Some(owner) = self.pins.get(group_id) {
            if user != Some(&**owner) {
                return Admission::Refuse(
                    ErrorKind::Unauthorized,
                    "this client group belongs to another user".into(),
                );
            }
        }
        if let Some(existing) = self.clients.get(client_id) {
            return match (&existing.user, user) {
                (Some(a), Some(b)) if **a == *b => Admission::Replace(existing.slot),
                _ => Admission::Probe(existing.slot),
            };
        }
        if self.sizes.get(group_id).copied().unwrap_or(0) >= max_group_connections {
            return Admission::Refuse(
                ErrorKind::ServerOverloaded,
                format!("client group has the maximum of {max_group_connections} connections"),
            );
        }
        Admission::Admit
    }

    /// Pins a group to the owner the store remembered (rule 4 across restarts).
    pub fn pin(&mut self, group_id: &Rc<str>, user: &str) {
        if !self.pins.contains_key(group_id) {
            self.insert_pin(group_id, Rc::from(user));
        }
    }

    fn insert_pin(&mut self, group_id: &Rc<str>, user: Rc<str>) {
        if self.pins.len() >= MAX_PINS {
            if let Some(old) = self.pin_order.pop_front() {
                self.pins.remove(&old);
            }
        }
        self.pins.insert(group_id.clone(), user);
        self.pin_order.push_back(group_id.clone());
    }

    /// Records an admitted connection (and pins its group to its user if not yet pinned).
    /// Returns whether this pinned the group.
    pub fn join(
        &mut self,
        slot: u32,
        client_id: &Rc<str>,
        group_id: &Rc<str>,
        user: Option<&Rc<str>>,
    ) -> bool {
        let member = Member { slot, user: user.cloned(), group: group_id.clone() };
        // A replaced connection stops counting now; its later `leave` is then a no-op.
        if let Some(replaced) = self.clients.insert(client_id.clone(), member) {
            self.shrink(&replaced.group);
        }
        *self.sizes.entry(group_id.clone()).or_insert(0) += 1;
        match user {
            Some(user) if !self.pins.contains_key(group_id) => {
                self.insert_pin(group_id, user.clone());
                true
            }
            _ => false,
        }
    }

    /// Forgets a connection that left; a no-op for one that was never admitted or was
    /// already replaced under its clientID.
    pub fn leave(&mut self, slot: u32, client_id: &str, group_id: &str) {
        if self.clients.get(client_id).is_some_and(|m| m.slot == slot) {
            self.clients.remove(client_id);
            self.shrink(group_id);
        }
    }

    fn shrink(&mut self, group_id: &str) {
        if let Some(n) = self.sizes.get_mut(group_id) {
            *n -= 1;
            if *n == 0 {
                self.sizes.remove(group_id);
            }
        }
    }

    pub fn group_size(&self, group_id: &str) -> usize {
        self.sizes.get(group_id).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rc(s: &str) -> Rc<str> {
        Rc::from(s)
    }

    #[test]
    fn same_user_replaces_anyone_else_probes() {
        let mut g = Groups::default();
        g.join(1, &rc("c1"), &rc("g"), Some(&rc("alice")));
        assert_eq!(g.decide("c1", "g", Some("alice"), 64), Admission::Replace(1));
        // Another user is refused by the pin before the clientID is even looked at.
        assert!(matches!(
            g.decide("c1", "g", Some("bob"), 64),
            Admission::Refuse(ErrorKind::Unauthorized, _)
        ));
        assert!(matches!(
            g.decide("c1", "g", None, 64),
            Admission::Refuse(ErrorKind::Unauthorized, _)
        ));
        let mut anon = Groups::default();
        anon.join(1, &rc("c1"), &rc("g"), None);
        assert_eq!(anon.decide("c1", "g", None, 64), Admission::Probe(1));
    }

    #[test]
    fn pins_outlive_members_and_caps_apply() {
        let mut g = Groups::default();
        g.join(1, &rc("c1"), &rc("g"), Some(&rc("alice")));
        g.leave(1, "c1", "g");
        assert_eq!(g.group_size("g"), 0);
        assert!(matches!(
            g.decide("c2", "g", Some("bob"), 64),
            Admission::Refuse(ErrorKind::Unauthorized, _)
        ));
        assert_eq!(g.decide("c2", "g", Some("alice"), 64), Admission::Admit);
        g.join(2, &rc("c2"), &rc("g"), Some(&rc("alice")));
        assert!(matches!(
            g.decide("c3", "g", Some("alice"), 1),
            Admission::Refuse(ErrorKind::ServerOverloaded, _)
        ));
    }

    #[test]
    fn a_replaced_slot_leaving_does_not_remove_its_successor() {
        let mut g = Groups::default();
        g.join(1, &rc("c1"), &rc("g"), None);
        g.join(2, &rc("c1"), &rc("g"), None);
        assert_eq!(g.group_size("g"), 1);
        g.leave(1, "c1", "g");
        assert_eq!(g.group_size("g"), 1);
        assert_eq!(g.decide("c1", "g", None, 64), Admission::Probe(2));
    }
}
