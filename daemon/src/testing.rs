//! Fixtures the unit tests of several modules share, so that none borrows another's test
//! module. Compiled only for tests.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{json, Value};

use crate::protocol::{parse_upstream, Mutation, Upstream};

/// A directory of its own for a test, removed when the test ends.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "syncgate-unit-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&path);
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CRUD mutation of `client` in client group `group`, parsed from the wire as the worker
/// gets it.
pub fn crud(group: &str, client: &str, id: u64, ops: Value) -> Mutation {
    let text = json!(["push", {
        "clientGroupID": group, "pushVersion": 1, "timestamp": 1, "requestID": "r",
        "mutations": [{"type": "crud", "id": id, "clientID": client, "name": "_zero_crud",
                       "args": [{"ops": ops}], "timestamp": 1}]
    }])
    .to_string();
    let Upstream::Push(mut push) = parse_upstream(&mut text.into_bytes()).unwrap() else {
        panic!("not a push")
    };
    push.mutations.remove(0)
}
