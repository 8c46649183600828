//! Fuzzes the request-head path of the listener and the worker: `handshake::head_end` over
//! reads, `parse_head`, `check_upgrade`, then `route::parse_sync_path` and
//! `route::parse_connect_params` on the target, and the responses built from what was parsed.
//!
//! Properties, beyond "never panics":
//! - `head_end` resumed read by read (as the listener calls it) finds the same end as one
//!   scan of the whole buffer (as the worker calls it).
//! - A parsed head's path has no `?`; an accepted upgrade has a key that is 16 bytes of base64.
//! - Connect parameters are non-empty and within `MAX_PARAM_BYTES` when accepted.
//! - The 101 built from an accepted head parses as HTTP and echoes the protocol header
//!   exactly; an error response parses and its Content-Length is its body's length.
//! - `worker_for` is in range.
//! - `request::with_user_id` (`upstream.anonymous_user_id`) changes only the `userID` that
//!   `parse_connect_params` reads: every other parameter reads back the same.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use syncgate::protocol::route::{
    parse_connect_params, parse_sync_path, worker_for, MAX_PARAM_BYTES,
};
use syncgate::upstream::request::with_user_id;
use syncgate::ws::handshake::{
    check_upgrade, head_end, http_error, parse_head, switching_protocols,
};

#[derive(Debug, Arbitrary)]
struct Input {
    /// `limits.max_headers`, reduced to 1..=128.
    max_headers: u8,
    /// Lengths of the reads the bytes arrive in.
    cuts: Vec<u16>,
    /// Worker count for `worker_for`, reduced to 1..=256.
    workers: u8,
    bytes: Vec<u8>,
}

/// Finds the end of the head the way the listener does: one scan per read, resumed where
/// the previous read ended.
fn head_end_by_reads(bytes: &[u8], cuts: &[u16]) -> Option<usize> {
    let mut received = 0;
    let mut cuts = cuts.iter();
    while received < bytes.len() {
        let take = cuts.next().map_or(bytes.len() - received, |&n| usize::from(n).max(1));
        let before = received;
        received = (received + take).min(bytes.len());
        if let Some(end) = head_end(&bytes[..received], before) {
            return Some(end);
        }
    }
    None
}

fn check_response(bytes: &[u8], status: u16) -> Vec<(String, Vec<u8>)> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut response = httparse::Response::new(&mut headers);
    let parsed = response.parse(bytes).expect("our response is valid HTTP");
    let httparse::Status::Complete(head_len) = parsed else {
        panic!("our response head is incomplete: {:?}", String::from_utf8_lossy(bytes));
    };
    assert_eq!(response.code, Some(status));
    let headers: Vec<(String, Vec<u8>)> =
        response.headers.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec())).collect();
    if let Some((_, length)) = headers.iter().find(|(n, _)| n == "content-length") {
        let length: usize = std::str::from_utf8(length).unwrap().parse().unwrap();
        assert_eq!(length, bytes.len() - head_len, "Content-Length differs from the body");
    }
    headers
}

fuzz_target!(|input: Input| {
    let bytes = &input.bytes;
    let end = head_end_by_reads(bytes, &input.cuts);
    assert_eq!(end, head_end(bytes, 0), "resumed scan and whole scan disagree");
    let Some(end) = end else {
        return;
    };
    assert!(end <= bytes.len() && bytes[..end].ends_with(b"\r\n\r\n"));

    let max_headers = usize::from(input.max_headers % 128) + 1;
    let Ok(head) = parse_head(&bytes[..end], max_headers) else {
        return;
    };
    assert!(!head.path.contains('?'), "path keeps its query: {:?}", head.path);

    // The path may be echoed in an error body (404 and friends).
    check_response(&http_error(404, &[("Allow", "GET")], &head.path), 404);

    if check_upgrade(&head).is_ok() {
        let key = head.ws_key.as_deref().expect("an accepted upgrade has a key");
        assert_eq!(key.len(), 24, "16 bytes of base64 are 24 characters");
        let response = switching_protocols(key, head.ws_protocol.as_deref(), None);
        let headers = check_response(&response, 101);
        if let Some(protocol) = &head.ws_protocol {
            let echoed = headers.iter().find(|(n, _)| n == "sec-websocket-protocol");
            assert_eq!(
                echoed.map(|(_, v)| v.as_slice()),
                Some(protocol.as_bytes()),
                "the protocol header is not echoed verbatim"
            );
        }
    }

    if parse_sync_path(&head.path).is_ok() {
        if let Ok(params) = parse_connect_params(&head.query) {
            for value in [&params.client_id, &params.client_group_id] {
                assert!(!value.is_empty() && value.len() <= MAX_PARAM_BYTES, "{value:?}");
            }
            let optional = [&params.base_cookie, &params.user_id, &params.profile_id];
            for value in optional.into_iter().flatten().chain([&params.wsid]) {
                assert!(value.len() <= MAX_PARAM_BYTES, "{value:?}");
            }
            let workers = usize::from(input.workers) + 1;
            assert!(worker_for("task", &params.client_group_id, workers) < workers);
            let rewritten = with_user_id(&format!("{}?{}", head.path, head.query), "an on");
            let (_, query) = rewritten.split_once('?').expect("the rewrite keeps a query");
            let again = parse_connect_params(query).expect("the rewrite parses as before");
            assert_eq!(again.user_id.as_deref(), Some("an on"), "{rewritten}");
            assert_eq!(
                syncgate::protocol::route::ConnectParams {
                    user_id: params.user_id.clone(),
                    ..again
                },
                params,
                "the rewrite changed another parameter: {rewritten}"
            );
        }
    }
    // The parsers also see targets the head parser would never let through.
    let text = String::from_utf8_lossy(bytes);
    let _ = parse_sync_path(&text);
    let _ = parse_connect_params(&text);
});
