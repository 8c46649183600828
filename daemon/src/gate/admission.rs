//! The admission decision for a newcomer to a client group (DESIGN.md's displacement
//! rules), from what the worker knows: the group's owner and size, and the connection, if
//! any, that holds the newcomer's clientID.
//!
//! Every socket of a group lands on the same worker (the routing hash), so what this looks
//! at is local, single-threaded and authoritative. It is sans-IO: it decides, the worker
//! acts. The groups themselves (owner, connections) are kept by [`crate::sync::GroupSync`],
//! and connections by clientID in the worker's [`crate::index::NameIndex`].

use crate::protocol::ErrorKind;

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

/// The connection already admitted under the newcomer's clientID.
pub struct Existing<'a> {
    pub slot: u32,
    /// Its verified user; `None` if it carried no verified token.
    pub user: Option<&'a str>,
}

/// The newcomer's group as it stands.
pub struct GroupState<'a> {
    /// The verified user the group is pinned to (rule 4), if any.
    pub owner: Option<&'a str>,
    /// Connections admitted to it.
    pub connections: usize,
}

/// Decides on a newcomer with verified user `user` (`None`: no verified token).
pub fn decide(
    group: &GroupState<'_>,
    existing: Option<Existing<'_>>,
    user: Option<&str>,
    max_group_connections: usize,
) -> Admission {
    if let Some(refusal) = check_owner(group.owner, user) {
        return refusal;
    }
    if let Some(existing) = existing {
        return match (existing.user, user) {
            (Some(a), Some(b)) if a == b => Admission::Replace(existing.slot),
            _ => Admission::Probe(existing.slot),
        };
    }
    if group.connections >= max_group_connections {
        return Admission::Refuse(
            ErrorKind::ServerOverloaded,
            format!("client group has the maximum of {max_group_connections} connections"),
        );
    }
    Admission::Admit
}

/// Rule 4 alone: a group pinned to a user admits nobody else. The worker asks again when a
/// newcomer that waited on a probe is finally admitted, since the group may have been
/// pinned meanwhile.
pub fn check_owner(owner: Option<&str>, user: Option<&str>) -> Option<Admission> {
    match owner {
        Some(owner) if user != Some(owner) => Some(Admission::Refuse(
            ErrorKind::Unauthorized,
            "this client group belongs to another user".into(),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(owner: Option<&str>, connections: usize) -> GroupState<'_> {
        GroupState { owner, connections }
    }

    #[test]
    fn same_user_replaces_anyone_else_probes() {
        let alice = || Some(Existing { slot: 1, user: Some("alice") });
        let pinned = group(Some("alice"), 1);
        assert_eq!(decide(&pinned, alice(), Some("alice"), 64), Admission::Replace(1));
        // Another user is refused by the pin before the clientID is even looked at.
        assert!(matches!(
            decide(&pinned, alice(), Some("bob"), 64),
            Admission::Refuse(ErrorKind::Unauthorized, _)
        ));
        assert!(matches!(
            decide(&pinned, alice(), None, 64),
            Admission::Refuse(ErrorKind::Unauthorized, _)
        ));
        let anon = Some(Existing { slot: 1, user: None });
        assert_eq!(decide(&group(None, 1), anon, None, 64), Admission::Probe(1));
        // A verified newcomer against an unverified holder of its clientID must probe too.
        let anon = Some(Existing { slot: 1, user: None });
        assert_eq!(decide(&group(None, 1), anon, Some("alice"), 64), Admission::Probe(1));
    }

    #[test]
    fn the_pin_and_the_cap_apply() {
        let pinned = group(Some("alice"), 0);
        assert!(matches!(
            decide(&pinned, None, Some("bob"), 64),
            Admission::Refuse(ErrorKind::Unauthorized, _)
        ));
        assert_eq!(decide(&pinned, None, Some("alice"), 64), Admission::Admit);
        assert!(matches!(
            decide(&group(Some("alice"), 1), None, Some("alice"), 1),
            Admission::Refuse(ErrorKind::ServerOverloaded, _)
        ));
        assert_eq!(check_owner(None, Some("bob")), None);
        assert_eq!(check_owner(Some("alice"), Some("alice")), None);
        assert!(check_owner(Some("alice"), None).is_some());
    }
}
