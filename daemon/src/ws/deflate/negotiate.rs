//! The handshake half of permessage-deflate (RFC 7692): the `[compression]` configuration,
//! what each connection may cost ([`context_bytes`]), and the answer to a client's offers
//! ([`negotiate`]). An offer the server cannot honour is declined, never answered wrongly.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::{
    Deflater, Inflater, DEFLATE_FIXED_BYTES, INFLATE_BYTES, MAX_WINDOW_BITS, MIN_RFC_WINDOW_BITS,
    MIN_ZLIB_WINDOW_BITS,
};

/// The extension token of RFC 7692 section 7.
const EXTENSION_NAME: &str = "permessage-deflate";

/// The `[compression]` table of the daemon's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompressionConfig {
    /// Off by default, as in zero-cache: compression costs CPU on every message and is only
    /// worth it on slow links.
    pub enabled: bool,
    /// Largest LZ77 window (log2) the server compresses with; caps the memory of each
    /// compressor (9..=15).
    pub server_max_window_bits: u8,
    /// Largest window (log2) the server asks clients to compress with, when they let it ask
    /// (9..=15).
    pub client_max_window_bits: u8,
    /// Messages shorter than this many bytes go out uncompressed: compressing them costs
    /// more CPU than the bytes it saves.
    pub threshold: usize,
    /// false: one shared compressor/decompressor per worker, no context takeover either way
    /// and no memory per connection. true: dedicated per-connection contexts (better ratio)
    /// while `memory_budget_bytes` allows.
    pub context_takeover: bool,
    /// Total bytes of dedicated contexts a worker may hold; past it, new connections get the
    /// shared mode. See [`context_bytes`] for what one context costs.
    pub memory_budget_bytes: usize,
    /// zlib compression level, 1 (fastest) to 9 (smallest output).
    pub level: u32,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            enabled: false,
            server_max_window_bits: 13,
            client_max_window_bits: 13,
            threshold: 1024,
            context_takeover: false,
            memory_budget_bytes: 64 << 20,
            // Level 1 is zlib-rs's quick strategy (one hash probe, fixed Huffman codes): the
            // least CPU per byte. On Zero-like JSON it keeps about 18% of the size against
            // 12% at level 2 and 11% at level 6, so operators short of bandwidth raise it.
            level: 1,
        }
    }
}

impl CompressionConfig {
    /// Checks the ranges that the codec relies on; the message names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        for (key, bits) in [
            ("server_max_window_bits", self.server_max_window_bits),
            ("client_max_window_bits", self.client_max_window_bits),
        ] {
            if !(MIN_ZLIB_WINDOW_BITS..=MAX_WINDOW_BITS).contains(&bits) {
                return Err(format!(
                    "compression.{key} = {bits}: must be 9..=15 (zlib cannot use an 8-bit window)"
                ));
            }
        }
        if !(1..=9).contains(&self.level) {
            return Err(format!(
                "compression.level = {}: must be 1..=9 (to switch compression off, set enabled = false)",
                self.level
            ));
        }
        if self.context_takeover && self.memory_budget_bytes < self.max_dedicated_bytes() {
            return Err(format!(
                "compression.memory_budget_bytes = {}: with context_takeover = true it must hold \
                 at least one connection's contexts ({} bytes)",
                self.memory_budget_bytes,
                self.max_dedicated_bytes()
            ));
        }
        Ok(())
    }

    /// Whether a message of `payload_len` bytes is worth compressing on a connection that
    /// negotiated permessage-deflate.
    pub fn compresses(&self, payload_len: usize) -> bool {
        payload_len >= self.threshold
    }

    /// The most a connection's dedicated contexts can cost: what the worker must have left
    /// in its budget before it passes `dedicated_available = true` to [`negotiate`].
    pub fn max_dedicated_bytes(&self) -> usize {
        context_bytes(self.server_max_window_bits, true) + context_bytes(MAX_WINDOW_BITS, false)
    }
}

/// Bytes one zlib-rs context holds: a compressor (`deflate = true`) or a decompressor.
///
/// zlib documents deflate as `(1 << (windowBits + 2)) + (1 << (memLevel + 9))` and inflate
/// as `(1 << windowBits)` plus about 7 KiB. zlib-rs needs more (see the constants), so this
/// returns zlib-rs's numbers: the window term of the formula plus zlib-rs's fixed part for
/// deflate, and a constant for inflate, whose window zlib-rs allocates at full size.
pub fn context_bytes(window_bits: u8, deflate: bool) -> usize {
    if deflate {
        (1usize << (window_bits.clamp(MIN_ZLIB_WINDOW_BITS, MAX_WINDOW_BITS) + 2))
            + DEFLATE_FIXED_BYTES
    } else {
        INFLATE_BYTES
    }
}

/// The outcome of a successful negotiation: what to answer and how to run the codec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    /// The `Sec-WebSocket-Extensions` value of the 101 response.
    pub response: String,
    /// Window (log2) the server compresses with, 9..=15: never more than the client allows.
    pub server_window_bits: u8,
    /// Window (log2) the client may compress with, 8..=15; 15 when the client did not offer
    /// `client_max_window_bits` and so cannot be limited. An 8 is inflated with 9 (see
    /// [`Inflater::new`]).
    pub client_window_bits: u8,
    /// The server resets its compressor after every message (always so in shared mode).
    pub server_no_context_takeover: bool,
    /// The client resets its compressor after every message, so the server's decompressor
    /// may be reset too (always so in shared mode).
    pub client_no_context_takeover: bool,
}

impl Agreement {
    /// Bytes of the contexts this connection needs for itself: a direction without context takeover
    /// runs on the worker's [`SharedContexts`](super::SharedContexts) and costs nothing here.
    pub fn dedicated_bytes(&self) -> usize {
        let deflate = if self.server_no_context_takeover {
            0
        } else {
            context_bytes(self.server_window_bits, true)
        };
        let inflate = if self.client_no_context_takeover {
            0
        } else {
            context_bytes(self.client_window_bits, false)
        };
        deflate + inflate
    }

    /// This connection's own compressor, or None when it uses the worker's shared one.
    pub fn dedicated_deflater(&self, level: u32) -> Option<Deflater> {
        (!self.server_no_context_takeover)
            .then(|| Deflater::new(self.server_window_bits, level, false))
    }

    /// This connection's own decompressor, or None when it uses the worker's shared one.
    pub fn dedicated_inflater(&self) -> Option<Inflater> {
        (!self.client_no_context_takeover).then(|| Inflater::new(self.client_window_bits, false))
    }
}

/// Chooses the permessage-deflate offer to accept, per RFC 7692 section 7.
///
/// `offers` is the `Sec-WebSocket-Extensions` request value; several header lines are
/// joined with commas. Offers are considered in the client's order and the first acceptable
/// permessage-deflate offer wins. An offer with an unknown, invalid or duplicate parameter,
/// or that asks for what the server cannot do, is declined and the next one is considered;
/// None means no compression (the handshake still succeeds). `dedicated_available` says
/// whether the worker's budget still holds [`CompressionConfig::max_dedicated_bytes`].
pub fn negotiate(
    offers: &str,
    cfg: &CompressionConfig,
    dedicated_available: bool,
) -> Option<Agreement> {
    if !cfg.enabled {
        return None;
    }
    let dedicated = cfg.context_takeover && dedicated_available;
    SplitUnquoted::new(offers, b',')
        .map(trim_ows)
        .filter(|element| !element.is_empty())
        .filter_map(parse_offer)
        .find_map(|offer| accept(&offer, cfg, dedicated))
}

/// The parameters of one syntactically valid permessage-deflate offer.
#[derive(Debug, Default, PartialEq, Eq)]
struct Offer {
    /// The client asks the server to reset its compressor after every message.
    server_no_context_takeover: bool,
    /// The client will reset its own compressor after every message.
    client_no_context_takeover: bool,
    /// The largest window the client lets the server use, if it limits it.
    server_max_window_bits: Option<u8>,
    /// None: not offered (the server must not answer it). Some(None): offered without a
    /// value (the server may choose). Some(Some(n)): the client will use at most n.
    client_max_window_bits: Option<Option<u8>>,
}

/// Parses one element of the extension list; None if it is not a valid permessage-deflate
/// offer (another extension, malformed, or an unknown, duplicate or invalid parameter).
fn parse_offer(element: &str) -> Option<Offer> {
    let mut parts = SplitUnquoted::new(element, b';');
    if trim_ows(parts.next()?) != EXTENSION_NAME {
        return None;
    }
    let mut offer = Offer::default();
    for part in parts {
        // A parameter name is a token, so the first '=' ends it.
        let (name, value) = match part.split_once('=') {
            Some((name, value)) => (trim_ows(name), Some(param_value(trim_ows(value))?)),
            None => (trim_ows(part), None),
        };
        let value = value.as_deref();
        // Each arm's guard rejects a repeated parameter; the catch-all declines unknown
        // names and values where the RFC allows none (or none where it needs one).
        match (name, value) {
            ("server_no_context_takeover", None) if !offer.server_no_context_takeover => {
                offer.server_no_context_takeover = true;
            }
            ("client_no_context_takeover", None) if !offer.client_no_context_takeover => {
                offer.client_no_context_takeover = true;
            }
            ("server_max_window_bits", Some(bits)) if offer.server_max_window_bits.is_none() => {
                offer.server_max_window_bits = Some(parse_window_bits(bits)?);
            }
            ("client_max_window_bits", None) if offer.client_max_window_bits.is_none() => {
                offer.client_max_window_bits = Some(None);
            }
            ("client_max_window_bits", Some(bits)) if offer.client_max_window_bits.is_none() => {
                offer.client_max_window_bits = Some(Some(parse_window_bits(bits)?));
            }
            _ => return None,
        }
    }
    Some(offer)
}

/// Builds the answer to one valid offer, or None if the server cannot honour it.
fn accept(offer: &Offer, cfg: &CompressionConfig, dedicated: bool) -> Option<Agreement> {
    // Clamping only guards against a configuration that skipped validate().
    let our_server = cfg.server_max_window_bits.clamp(MIN_ZLIB_WINDOW_BITS, MAX_WINDOW_BITS);
    let our_client = cfg.client_max_window_bits.clamp(MIN_ZLIB_WINDOW_BITS, MAX_WINDOW_BITS);

    let server_window_bits = match offer.server_max_window_bits {
        // zlib would compress with 9 bits after agreeing to 8: decline rather than lie.
        Some(bits) if bits < MIN_ZLIB_WINDOW_BITS => return None,
        Some(bits) => bits.min(our_server),
        None => our_server,
    };
    let client_window_bits = match offer.client_max_window_bits {
        None => MAX_WINDOW_BITS,
        Some(None) => our_client,
        Some(Some(bits)) => bits.min(our_client),
    };
    // Shared mode sets both flags even when not offered, as RFC 7692 7.1.1.1 and 7.1.1.2
    // allow; dedicated mode honours what the client asked for and nothing more.
    let (server_no_context_takeover, client_no_context_takeover) = if dedicated {
        (offer.server_no_context_takeover, offer.client_no_context_takeover)
    } else {
        (true, true)
    };

    let mut response = String::from(EXTENSION_NAME);
    if server_no_context_takeover {
        response.push_str("; server_no_context_takeover");
    }
    if client_no_context_takeover {
        response.push_str("; client_no_context_takeover");
    }
    // server_max_window_bits is answered only when offered. Otherwise the client assumes
    // 15, which our smaller window satisfies, and an answer to a question the client did
    // not ask is the part of RFC 7692 that clients are least consistent about accepting.
    if offer.server_max_window_bits.is_some() {
        response.push_str(&format!("; server_max_window_bits={server_window_bits}"));
    }
    // RFC 7692 7.1.2.2: never answer client_max_window_bits unless it was offered.
    if offer.client_max_window_bits.is_some() {
        response.push_str(&format!("; client_max_window_bits={client_window_bits}"));
    }
    Some(Agreement {
        response,
        server_window_bits,
        client_window_bits,
        server_no_context_takeover,
        client_no_context_takeover,
    })
}

/// Unquotes a parameter value (RFC 6455 9.1: a token, or a quoted-string whose unescaped
/// content is a token); None if it is neither.
fn param_value(raw: &str) -> Option<Cow<'_, str>> {
    let value = match raw.strip_prefix('"') {
        None => Cow::Borrowed(raw),
        Some(quoted) => {
            let mut unescaped = String::with_capacity(quoted.len());
            let mut chars = quoted.chars();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => unescaped.push(chars.next()?),
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => unescaped.push(c),
                }
            }
            // Nothing may follow the closing quote.
            if !closed || chars.next().is_some() {
                return None;
            }
            Cow::Owned(unescaped)
        }
    };
    is_token(&value).then_some(value)
}

/// RFC 7692 7.1.2: a decimal integer from 8 to 15 without leading zeros.
fn parse_window_bits(value: &str) -> Option<u8> {
    if value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let bits: u8 = value.parse().ok()?;
    (MIN_RFC_WINDOW_BITS..=MAX_WINDOW_BITS).contains(&bits).then_some(bits)
}

/// RFC 7230 token: one or more tchar.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Strips optional whitespace (space and horizontal tab) at both ends.
fn trim_ows(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

/// Splits at a separator that is not inside a quoted string, so that a comma or semicolon
/// within quotes can never start a new offer or parameter. An unterminated quote runs to
/// the end of the input, which then fails to parse as a whole.
struct SplitUnquoted<'a> {
    /// What is left to split; None once the last piece has been returned.
    rest: Option<&'a str>,
    /// The ASCII separator byte (',' between offers, ';' between parameters).
    sep: u8,
}

impl<'a> SplitUnquoted<'a> {
    fn new(s: &'a str, sep: u8) -> Self {
        SplitUnquoted { rest: Some(s), sep }
    }
}

impl<'a> Iterator for SplitUnquoted<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let s = self.rest?;
        let bytes = s.as_bytes();
        let mut in_quotes = false;
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                // The escaped byte is skipped; being inside a quote, it ends nothing.
                b'\\' if in_quotes => i += 1,
                b'"' => in_quotes = !in_quotes,
                // The separator is ASCII, so slicing around it stays on char boundaries.
                b if b == self.sep && !in_quotes => {
                    self.rest = Some(&s[i + 1..]);
                    return Some(&s[..i]);
                }
                _ => {}
            }
            i += 1;
        }
        self.rest = None;
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::deflate::tests::{inflate_all, sample};

    /// Config with compression on and everything else default.
    fn on() -> CompressionConfig {
        CompressionConfig { enabled: true, ..CompressionConfig::default() }
    }

    /// Config for dedicated contexts.
    fn dedicated() -> CompressionConfig {
        CompressionConfig { context_takeover: true, ..on() }
    }

    fn response(offers: &str) -> Option<String> {
        negotiate(offers, &on(), true).map(|a| a.response)
    }

    #[test]
    fn config_defaults_and_toml() {
        let d = CompressionConfig::default();
        assert!(!d.enabled);
        assert_eq!((d.server_max_window_bits, d.client_max_window_bits), (13, 13));
        assert_eq!(d.threshold, 1024);
        assert!(!d.context_takeover);
        assert_eq!(d.validate(), Ok(()));

        let c: CompressionConfig = toml::from_str("enabled = true\nlevel = 6").unwrap();
        assert_eq!(c, CompressionConfig { enabled: true, level: 6, ..d.clone() });
        assert!(toml::from_str::<CompressionConfig>("enable = true").is_err());
        // Round trip through TOML keeps every field.
        let text = toml::to_string(&c).unwrap();
        assert_eq!(toml::from_str::<CompressionConfig>(&text).unwrap(), c);
    }

    #[test]
    fn config_validation() {
        let ok = CompressionConfig::default();
        for bad in [
            CompressionConfig { server_max_window_bits: 8, ..ok.clone() },
            CompressionConfig { client_max_window_bits: 16, ..ok.clone() },
            CompressionConfig { level: 0, ..ok.clone() },
            CompressionConfig { level: 10, ..ok.clone() },
            CompressionConfig {
                context_takeover: true,
                memory_budget_bytes: 100_000,
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        let err =
            CompressionConfig { server_max_window_bits: 8, ..ok.clone() }.validate().unwrap_err();
        assert!(err.contains("server_max_window_bits"), "{err}");
        assert!(ok.compresses(1024) && !ok.compresses(1023));
    }

    #[test]
    fn context_bytes_cover_zlib_formula_and_grow_with_window() {
        for bits in 9..=15u8 {
            // zlib's documented formula (memLevel 8) is a lower bound of zlib-rs's real use.
            assert!(context_bytes(bits, true) >= (1 << (bits + 2)) + (1 << 17));
            assert!(context_bytes(bits, false) >= (1 << bits) + 7 * 1024);
        }
        assert!(context_bytes(14, true) > context_bytes(13, true));
        // Measured in a counting-allocator run with zlib-rs 0.6.8: 281,728 and 47,552 bytes.
        assert!(context_bytes(13, true) >= 281_728);
        assert!(context_bytes(13, false) >= 47_552);
        assert_eq!(on().max_dedicated_bytes(), context_bytes(13, true) + context_bytes(15, false));
    }

    #[test]
    fn browser_node_ws_and_python_websockets_default_offer() {
        // Chrome, Node's `ws` (the Zero client's capture in zero-client-capture.md) and
        // Python's `websockets` (client_max_window_bits=True by default) send this.
        let a = negotiate("permessage-deflate; client_max_window_bits", &on(), true).unwrap();
        assert_eq!(
            a.response,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
             client_max_window_bits=13"
        );
        assert_eq!((a.server_window_bits, a.client_window_bits), (13, 13));
        assert!(a.server_no_context_takeover && a.client_no_context_takeover);
        assert_eq!(a.dedicated_bytes(), 0);
        assert!(a.dedicated_deflater(1).is_none() && a.dedicated_inflater().is_none());
    }

    #[test]
    fn bare_offer_gets_no_client_window_and_client_may_use_15() {
        let a = negotiate("permessage-deflate", &on(), true).unwrap();
        assert_eq!(
            a.response,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        assert_eq!((a.server_window_bits, a.client_window_bits), (13, 15));
    }

    #[test]
    fn disabled_config_declines_everything() {
        let off = CompressionConfig::default();
        assert_eq!(negotiate("permessage-deflate", &off, true), None);
    }

    #[test]
    fn quoted_values_and_whitespace() {
        assert_eq!(
            response("permessage-deflate; client_max_window_bits=\"10\"").as_deref(),
            Some(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                 client_max_window_bits=10"
            )
        );
        // A backslash escape inside quotes is undone before the token check.
        let a = negotiate(
            "permessage-deflate;\tserver_max_window_bits = \"1\\1\" ; client_max_window_bits",
            &on(),
            true,
        )
        .unwrap();
        assert_eq!((a.server_window_bits, a.client_window_bits), (11, 13));
        assert!(a.response.contains("server_max_window_bits=11"));
    }

    #[test]
    fn server_window_is_never_larger_than_offered_or_configured() {
        assert!(response("permessage-deflate; server_max_window_bits=10")
            .unwrap()
            .ends_with("server_max_window_bits=10"));
        assert!(response("permessage-deflate; server_max_window_bits=15")
            .unwrap()
            .ends_with("server_max_window_bits=13"));
    }

    #[test]
    fn server_window_8_is_declined_and_next_offer_taken() {
        assert_eq!(response("permessage-deflate; server_max_window_bits=8"), None);
        let a = negotiate(
            "permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=9",
            &on(),
            true,
        )
        .unwrap();
        assert_eq!(a.server_window_bits, 9);
    }

    #[test]
    fn client_window_8_is_accepted_and_inflated_with_9() {
        let a = negotiate("permessage-deflate; client_max_window_bits=8", &on(), true).unwrap();
        assert_eq!(a.client_window_bits, 8);
        assert!(a.response.ends_with("client_max_window_bits=8"));
        // Our decoder for an 8-bit peer still inflates 9-bit streams (what zlib produces).
        let msg = sample(5000);
        let mut out = Vec::new();
        Deflater::new(9, 6, true).deflate(&msg, &mut out).unwrap();
        assert_eq!(inflate_all(&mut Inflater::new(8, false), &out).unwrap(), msg);
    }

    #[test]
    fn several_offers_first_acceptable_wins() {
        let a = negotiate(
            "x-webkit-deflate-frame, permessage-deflate; foo, permessage-deflate; \
             client_max_window_bits=12, permessage-deflate",
            &on(),
            true,
        )
        .unwrap();
        assert_eq!(a.client_window_bits, 12);
        // Header lines joined by the caller, with empty list elements.
        let a = negotiate(" , permessage-deflate,,", &on(), true).unwrap();
        assert_eq!(a.client_window_bits, 15);
    }

    #[test]
    fn malformed_or_unacceptable_offers_are_declined() {
        for offer in [
            "",
            ",",
            "permessage-deflate;",
            "permessage-deflate;;",
            "permessage-deflate; foo",
            "permessage-deflate; foo=1",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=08",
            "permessage-deflate; client_max_window_bits=+9",
            "permessage-deflate; client_max_window_bits=abc",
            "permessage-deflate; client_max_window_bits=",
            "permessage-deflate; client_max_window_bits=\"\"",
            "permessage-deflate; client_max_window_bits=\"10",
            "permessage-deflate; client_max_window_bits=\"10\"x",
            "permessage-deflate; client_max_window_bits=\"1 0\"",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover=\"\"",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits; client_max_window_bits=10",
            "permessage-deflate; server_max_window_bits=10; server_max_window_bits=10",
            "permessage-deflate x",
            "permessage-deflate=1",
            "deflate-frame",
            "permessage-deflate; client_max_window_bits=1\u{e9}",
            // A comma inside quotes does not start a new offer.
            "foo; x=\", permessage-deflate, \"",
        ] {
            assert_eq!(negotiate(offer, &on(), true), None, "{offer:?}");
        }
    }

    #[test]
    fn responses_never_exceed_offers_or_config() {
        for cfg_bits in 9..=15u8 {
            let cfg = CompressionConfig {
                server_max_window_bits: cfg_bits,
                client_max_window_bits: cfg_bits,
                ..on()
            };
            for offered in 8..=15u8 {
                let offer = format!(
                    "permessage-deflate; server_max_window_bits={offered}; \
                     client_max_window_bits={offered}"
                );
                let Some(a) = negotiate(&offer, &cfg, false) else {
                    assert_eq!(offered, 8, "only a server window of 8 is declined");
                    continue;
                };
                for param in a.response.split("; ").skip(1) {
                    if let Some((_, v)) = param.split_once('=') {
                        let v: u8 = v.parse().unwrap();
                        assert!(v <= offered && v <= cfg_bits, "{offer} -> {}", a.response);
                    }
                }
                assert_eq!(a.server_window_bits, offered.min(cfg_bits));
                assert_eq!(a.client_window_bits, offered.min(cfg_bits));
            }
        }
    }

    #[test]
    fn dedicated_mode_honours_client_requests_only() {
        let a =
            negotiate("permessage-deflate; client_max_window_bits", &dedicated(), true).unwrap();
        assert_eq!(a.response, "permessage-deflate; client_max_window_bits=13");
        assert!(!a.server_no_context_takeover && !a.client_no_context_takeover);
        assert_eq!(a.dedicated_bytes(), context_bytes(13, true) + context_bytes(13, false));
        assert!(a.dedicated_deflater(1).is_some() && a.dedicated_inflater().is_some());

        let a = negotiate("permessage-deflate; client_no_context_takeover", &dedicated(), true)
            .unwrap();
        assert_eq!(a.response, "permessage-deflate; client_no_context_takeover");
        assert!(!a.server_no_context_takeover && a.client_no_context_takeover);
        assert_eq!(a.dedicated_bytes(), context_bytes(13, true));

        // Budget exhausted: shared mode.
        let a = negotiate("permessage-deflate", &dedicated(), false).unwrap();
        assert!(a.server_no_context_takeover && a.client_no_context_takeover);
        // Budget left but the operator did not ask for dedicated contexts: shared mode.
        let a = negotiate("permessage-deflate", &on(), true).unwrap();
        assert!(a.server_no_context_takeover && a.client_no_context_takeover);
    }
}
