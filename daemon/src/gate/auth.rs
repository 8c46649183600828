//! JWT verification for sync sockets.
//!
//! A worker verifies the token a client sends in its `Sec-WebSocket-Protocol` header before it
//! looks at anything else about the connection (docs/SECURITY.md, "Displacement before
//! authentication"; the displacement rules): the verified `sub` decides whether a socket may
//! displace another one with the same `clientID` and whether it may join a client group. This
//! module turns the `[auth]` config table into a [`Verifier`] and checks tokens against it; it does
//! no I/O after construction (building it reads `auth.jwks_file` once).
//!
//! Keys come from exactly one source: an HS256 shared secret, one public JWK, or a file
//! holding a JWKS. The accepted algorithm always comes from the key, never from the
//! token alone, so a token cannot pick a weaker or different scheme than the operator
//! configured (the classic "HS256 signed with the RSA public key" confusion).
//!
//! Verified tokens are kept in a small bounded cache until they expire, so that a
//! reconnect storm (every client of a restarted worker coming back at once) does not
//! turn into a storm of RSA or ECDSA verifications.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::io::Read;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
///
/// The token issuer's clock and ours are never exactly equal; a few seconds keep a token
/// minted "now" from being refused as not yet valid, without stretching its life in any
/// way that matters. zero-cache (jose) uses no tolerance; jsonwebtoken's default of 60 s
/// is more than a sync connection needs.
pub const CLOCK_SKEW_SECS: u64 = 5;

/// Longest token accepted, in bytes.
///
/// The token travels inside the `Sec-WebSocket-Protocol` header, which the client keeps
/// under about 8 KiB; anything longer is not from a real client and is refused before
/// any decoding.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Number of slots in the verified-token cache.
///
/// One slot per recently seen token: enough for the distinct users of a busy worker
/// reconnecting at once. Worst-case memory is `CACHE_SLOTS * MAX_CACHED_TOKEN_BYTES`
/// (8 MiB) plus the subjects; typical tokens are well under 1 KiB.
const CACHE_SLOTS: usize = 4096;

/// Longest token that is cached. Longer tokens are still verified, just every time;
/// this keeps the cache's memory bound independent of what clients send.
const MAX_CACHED_TOKEN_BYTES: usize = 2048;

/// Largest JWKS file read. Real key sets are a few KiB; the bound only keeps a wrong
/// path (a log file, a device) from being read whole at startup.
const MAX_JWKS_FILE_BYTES: u64 = 1024 * 1024;

/// Every algorithm of the RSA family, accepted for an RSA key that names no `alg`.
/// They all need the private key to sign, so accepting the family opens no confusion.
const RSA_ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// The `[auth]` table of the config file.
#[derive(Deserialize, serde::Serialize, Clone, Default, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 shared secret (its UTF-8 bytes are the key, as in zero-cache).
    pub secret: Option<String>,
    /// One public JWK as inline JSON, for an issuer with a single signing key.
    pub jwk: Option<String>,
    /// A file holding a JWKS (`{"keys": [...]}`), for issuers that rotate keys;
    /// tokens pick their key with the `kid` header.
    pub jwks_file: Option<PathBuf>,
    /// When set, tokens must carry exactly this `iss`.
    pub issuer: Option<String>,
    /// When set, tokens must name this value in `aud`.
    pub audience: Option<String>,
    /// Refuse sockets that carry no token (needs a key to be configured).
    pub required: bool,
    /// For deployments that authenticate with a cookie instead of a token: a connection is
    /// bound to a hash of this cookie's value, and a socket for a connected clientID is
    /// refused unless it carries the same one (or the connection proves dead on a probe).
    pub session_cookie: Option<String>,
}

/// Written by hand so that logging a config never prints the shared secret.
impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("jwk", &self.jwk)
            .field("jwks_file", &self.jwks_file)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("required", &self.required)
            .field("session_cookie", &self.session_cookie)
            .finish()
    }
}

/// What a successfully verified token says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The `sub` claim: the user the token was issued to. Displacement and client-group
    /// pinning compare this value.
    pub sub: String,
    /// The `exp` claim in seconds since the Unix epoch (fraction dropped), if any; lets
    /// the caller act when the token runs out.
    pub exp: Option<u64>,
}

/// Why a token was refused. Each variant has a client-facing [`message`](Self::message)
/// that says what was wrong without echoing the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// Not a JWT: wrong shape, bad base64 or JSON, unknown `alg`, or too long.
    Malformed,
    /// The signature does not match the key.
    BadSignature,
    /// The token's `alg` is not one the selected key is configured for.
    WrongAlgorithm,
    /// `exp` has passed.
    Expired,
    /// `nbf` is still in the future.
    NotYetValid,
    /// `iss` is missing or not the configured issuer.
    WrongIssuer,
    /// `aud` is missing or does not name the configured audience.
    WrongAudience,
    /// `sub` is missing or empty.
    NoSubject,
    /// No configured key matches the token's `kid`.
    UnknownKey,
    /// No key is configured, so no token can be verified.
    NoKeyConfigured,
}

impl AuthError {
    /// The text for the client's error message (kind `AuthInvalidated`).
    pub fn message(&self) -> &'static str {
        match self {
            AuthError::Malformed => "Token is malformed",
            AuthError::BadSignature => "Token signature is invalid",
            AuthError::WrongAlgorithm => "Token algorithm is not accepted",
            AuthError::Expired => "Token has expired",
            AuthError::NotYetValid => "Token is not valid yet (nbf)",
            AuthError::WrongIssuer => "Token issuer is not accepted",
            AuthError::WrongAudience => "Token audience is not accepted",
            AuthError::NoSubject => "Token has no subject (sub)",
            AuthError::UnknownKey => "Token key id (kid) matches no configured key",
            AuthError::NoKeyConfigured => "Server has no key to verify tokens",
        }
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for AuthError {}

/// One configured verification key.
struct Key {
    /// The JWK's `kid`, matched against the token header's `kid`.
    kid: Option<String>,
    /// The public key (or HS256 secret).
    key: DecodingKey,
    /// Signature check only: its `algorithms` are the ones this key accepts; time and
    /// claim checks are done by [`Verifier`] against the caller's clock.
    validation: Validation,
}

/// Verifies tokens against the configured keys and claims, with a cache.
pub struct Verifier {
    /// The keys tokens may be signed with; empty when auth is not configured.
    keys: Vec<Key>,
    /// Required `iss`, from `auth.issuer`.
    issuer: Option<String>,
    /// Required member of `aud`, from `auth.audience`.
    audience: Option<String>,
    /// Recently verified tokens.
    cache: TokenCache,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Builds a verifier from the `[auth]` table; reads `auth.jwks_file` when set.
    ///
    /// Refuses, with a message that names the key (and the path), a config that sets
    /// more than one of `secret`, `jwk` and `jwks_file` (which one wins would be a
    /// guess), an empty secret, issuer or audience, a JWK that is not valid JSON or not
    /// a usable public signing key, an unreadable or invalid JWKS file, and
    /// `required = true` without any key.
    pub fn new(cfg: &AuthConfig) -> Result<Self, String> {
        let sources = [cfg.secret.is_some(), cfg.jwk.is_some(), cfg.jwks_file.is_some()];
        if sources.iter().filter(|set| **set).count() > 1 {
            return Err(
                "auth: set only one of auth.secret, auth.jwk and auth.jwks_file".to_string()
            );
        }
        let keys = if let Some(secret) = &cfg.secret {
            if secret.is_empty() {
                return Err("auth.secret is empty".to_string());
            }
            vec![Key {
                kid: None,
                key: DecodingKey::from_secret(secret.as_bytes()),
                validation: signature_only(vec![Algorithm::HS256]),
            }]
        } else if let Some(jwk) = &cfg.jwk {
            let value: serde_json::Value = serde_json::from_str(jwk)
                .map_err(|e| format!("auth.jwk is not valid JSON: {e}"))?;
            if value.get("keys").is_some() {
                return Err("auth.jwk holds a JWKS, not one JWK: use auth.jwks_file".into());
            }
            vec![key_from_jwk(value).map_err(|e| format!("auth.jwk: {e}"))?]
        } else if let Some(path) = &cfg.jwks_file {
            read_jwks(path).map_err(|e| format!("auth.jwks_file {}: {e}", path.display()))?
        } else {
            Vec::new()
        };

        for (name, value) in [("issuer", &cfg.issuer), ("audience", &cfg.audience)] {
            if value.as_deref() == Some("") {
                return Err(format!("auth.{name} is empty"));
            }
        }
        if cfg.required && keys.is_empty() {
            return Err("auth.required is set but no key is configured \
                        (set auth.secret, auth.jwk or auth.jwks_file)"
                .to_string());
        }
        Ok(Verifier {
            keys,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            cache: TokenCache::new(),
        })
    }

    /// Whether any key is configured (without one every token is refused).
    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Verifies `token` at time `now_secs` (seconds since the Unix epoch).
    ///
    /// A token verified earlier is answered from the cache while it has not expired.
    pub fn verify(&mut self, token: &str, now_secs: u64) -> Result<Verified, AuthError> {
        if self.keys.is_empty() {
            return Err(AuthError::NoKeyConfigured);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed);
        }
        if let Some(verified) = self.cache.get(token, now_secs) {
            return Ok(verified);
        }
        let verified = self.verify_uncached(token, now_secs)?;
        self.cache.insert(token, &verified);
        Ok(verified)
    }

    /// Signature, then time, issuer, audience and subject checks.
    fn verify_uncached(&self, token: &str, now_secs: u64) -> Result<Verified, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let key = self.key_for(header.kid.as_deref())?;
        if !key.validation.algorithms.contains(&header.alg) {
            return Err(AuthError::WrongAlgorithm);
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature
                | ErrorKind::InvalidRsaKey(_)
                | ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidEddsaKey => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm => AuthError::WrongAlgorithm,
                _ => AuthError::Malformed,
            })?
            .claims;

        let skew = CLOCK_SKEW_SECS as f64;
        if claims.exp.is_some_and(|exp| now_secs as f64 >= exp + skew) {
            return Err(AuthError::Expired);
        }
        if claims.nbf.is_some_and(|nbf| now_secs as f64 + skew < nbf) {
            return Err(AuthError::NotYetValid);
        }
        if let Some(issuer) = &self.issuer {
            if claims.iss.as_ref() != Some(issuer) {
                return Err(AuthError::WrongIssuer);
            }
        }
        if let Some(audience) = &self.audience {
            let named = match &claims.aud {
                Some(Audience::One(aud)) => aud == audience,
                Some(Audience::Many(auds)) => auds.contains(audience),
                None => false,
            };
            if !named {
                return Err(AuthError::WrongAudience);
            }
        }
        let sub = claims.sub.filter(|sub| !sub.is_empty()).ok_or(AuthError::NoSubject)?;
        // `as` saturates: a negative exp cannot get here, a huge one becomes u64::MAX.
        Ok(Verified { sub, exp: claims.exp.map(|exp| exp as u64) })
    }

    /// The key for a token's `kid`. A key set with several keys needs an exact `kid`
    /// match (trying every key would multiply the cost of a bad token); a single key
    /// also serves tokens without a `kid`, and a single key without a `kid` serves all.
    fn key_for(&self, kid: Option<&str>) -> Result<&Key, AuthError> {
        if let Some(kid) = kid {
            if let Some(key) = self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)) {
                return Ok(key);
            }
        }
        match self.keys.as_slice() {
            [only] if only.kid.is_none() || kid.is_none() => Ok(only),
            _ => Err(AuthError::UnknownKey),
        }
    }
}

/// The claims syncgate reads; any others are ignored.
#[derive(Deserialize)]
struct Claims {
    /// The user; required, it is what displacement and group pinning compare.
    sub: Option<String>,
    /// Issuer, compared with `auth.issuer` when that is set.
    iss: Option<String>,
    /// Audience, searched for `auth.audience` when that is set.
    aud: Option<Audience>,
    /// Expiry, seconds since the epoch (JWT allows fractions).
    exp: Option<f64>,
    /// Not-before, seconds since the epoch.
    nbf: Option<f64>,
}

/// `aud` is either one string or an array of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    /// `"aud": "x"`
    One(String),
    /// `"aud": ["x", "y"]`
    Many(Vec<String>),
}

/// A validation that checks the signature and `alg` only. jsonwebtoken would check
/// `exp` against the system clock; syncgate checks times against the caller's `now`.
fn signature_only(algorithms: Vec<Algorithm>) -> Validation {
    let mut validation = Validation::new(algorithms[0]);
    validation.algorithms = algorithms;
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation
}

/// Reads a JWKS file. Keys marked `"use": "enc"` are skipped (they are not for
/// signatures); every other key must be usable, and with several keys each needs a
/// distinct `kid` because that is how tokens select them.
fn read_jwks(path: &Path) -> Result<Vec<Key>, String> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_JWKS_FILE_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_JWKS_FILE_BYTES {
        return Err(format!("larger than {MAX_JWKS_FILE_BYTES} bytes"));
    }

    #[derive(Deserialize)]
    struct Jwks {
        keys: Vec<serde_json::Value>,
    }
    let jwks: Jwks = serde_json::from_str(&text)
        .map_err(|e| format!("not a JWKS ({{\"keys\": [...]}}): {e}"))?;

    let mut keys: Vec<Key> = Vec::new();
    for (index, value) in jwks.keys.into_iter().enumerate() {
        if value.get("use").and_then(|u| u.as_str()) == Some("enc") {
            continue;
        }
        let key = key_from_jwk(value).map_err(|e| format!("key {index}: {e}"))?;
        if let Some(kid) = &key.kid {
            if keys.iter().any(|k| k.kid.as_ref() == Some(kid)) {
                return Err(format!("key {index}: kid {kid:?} appears twice"));
            }
        }
        keys.push(key);
    }
    if keys.is_empty() {
        return Err("no signing keys".to_string());
    }
    if keys.len() > 1 && keys.iter().any(|k| k.kid.is_none()) {
        return Err("with several keys every key needs a kid".to_string());
    }
    Ok(keys)
}

/// Turns one JWK into a [`Key`], deciding which algorithms it accepts: its `alg` when
/// present (which must fit the key type), else what its type and curve allow.
fn key_from_jwk(value: serde_json::Value) -> Result<Key, String> {
    match value.get("kty").and_then(|kty| kty.as_str()) {
        None => return Err("not a JWK (no kty)".to_string()),
        Some("oct") => return Err("symmetric (oct) keys are not accepted: use auth.secret".into()),
        Some(_) => {}
    }
    let alg_name = value.get("alg").and_then(|alg| alg.as_str()).map(str::to_owned);
    let jwk: Jwk = serde_json::from_value(value).map_err(|e| format!("not a usable JWK: {e}"))?;
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
        return Err("is an encryption key (use: enc)".to_string());
    }

    let by_type: &[Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(rsa) => {
            let modulus = b64url_len("n", &rsa.n, |n| n.iter().skip_while(|b| **b == 0).count())?;
            if !(256..=1024).contains(&modulus) {
                return Err("RSA modulus must be 2048 to 8192 bits".to_string());
            }
            RSA_ALGORITHMS
        }
        AlgorithmParameters::EllipticCurve(ec) => {
            let (algorithm, size) = match ec.curve {
                EllipticCurve::P256 => (&[Algorithm::ES256], 32),
                EllipticCurve::P384 => (&[Algorithm::ES384], 48),
                _ => return Err("EC curve must be P-256 or P-384".to_string()),
            };
            for (name, coordinate) in [("x", &ec.x), ("y", &ec.y)] {
                if b64url_len(name, coordinate, <[u8]>::len)? != size {
                    return Err(format!("EC {name} must be {size} bytes"));
                }
            }
            algorithm
        }
        AlgorithmParameters::OctetKeyPair(okp) => {
            if okp.curve != EllipticCurve::Ed25519 {
                return Err("OKP curve must be Ed25519".to_string());
            }
            if b64url_len("x", &okp.x, <[u8]>::len)? != 32 {
                return Err("Ed25519 x must be 32 bytes".to_string());
            }
            &[Algorithm::EdDSA]
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric (oct) keys are not accepted: use auth.secret".into())
        }
    };

    let algorithms = match jwk.common.key_algorithm {
        None => by_type.to_vec(),
        Some(alg) => {
            let name = alg_name.unwrap_or_default();
            let algorithm = signature_algorithm(alg)
                .ok_or_else(|| format!("alg {name} is not a supported signature algorithm"))?;
            if !by_type.contains(&algorithm) {
                return Err(format!("alg {name} does not fit the key type"));
            }
            vec![algorithm]
        }
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("invalid key material: {e}"))?;
    Ok(Key { kid: jwk.common.key_id, key, validation: signature_only(algorithms) })
}

/// Decodes a base64url JWK member and measures it with `measure`.
fn b64url_len(name: &str, value: &str, measure: fn(&[u8]) -> usize) -> Result<usize, String> {
    let bytes = URL_SAFE_NO_PAD.decode(value).map_err(|_| format!("{name} is not base64url"))?;
    Ok(measure(&bytes))
}

/// The JWT algorithm a JWK `alg` names, when it is an asymmetric signature algorithm.
fn signature_algorithm(alg: KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// A direct-mapped cache of verified tokens: each token hashes to one slot, and a new
/// token simply replaces whatever was there. That bounds memory and keeps every
/// operation O(1) with no eviction bookkeeping; a collision only costs one extra
/// verification later. The hash is keyed per process (`RandomState`), so clients
/// cannot aim tokens at each other's slots.
struct TokenCache {
    /// `CACHE_SLOTS` entries, allocated once.
    slots: Box<[Option<CachedToken>]>,
    /// Keyed hasher choosing a token's slot.
    hasher: RandomState,
}

/// One cached verification.
struct CachedToken {
    /// The whole token, compared on lookup so a hash collision never returns another
    /// token's identity.
    token: Box<str>,
    /// What verifying it produced.
    verified: Verified,
}

impl TokenCache {
    fn new() -> Self {
        TokenCache { slots: (0..CACHE_SLOTS).map(|_| None).collect(), hasher: RandomState::new() }
    }

    fn slot(&self, token: &str) -> usize {
        (self.hasher.hash_one(token) % CACHE_SLOTS as u64) as usize
    }

    /// The cached result for `token`, if present and not expired at `now_secs` (by the
    /// same rule as a fresh verification). An expired entry is dropped.
    fn get(&mut self, token: &str, now_secs: u64) -> Option<Verified> {
        let slot = &mut self.slots[self.slot(token)];
        let entry = slot.as_ref().filter(|entry| &*entry.token == token)?;
        let expired =
            entry.verified.exp.is_some_and(|exp| now_secs >= exp.saturating_add(CLOCK_SKEW_SECS));
        if expired {
            *slot = None;
            return None;
        }
        Some(entry.verified.clone())
    }

    fn insert(&mut self, token: &str, verified: &Verified) {
        if token.len() > MAX_CACHED_TOKEN_BYTES {
            return;
        }
        let index = self.slot(token);
        self.slots[index] = Some(CachedToken { token: token.into(), verified: verified.clone() });
    }
}

#[cfg(test)]
mod tests {
    //! Test keys were made once with OpenSSL 3.0 on the development machine:
    //!
    //! ```sh
    //! openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out rsa.pem
    //! openssl rsa -in rsa.pem -traditional -out rsa1.pem      # PKCS#1, what aws-lc signs with
    //! openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out eca.pem  # and ecb.pem
    //! openssl genpkey -algorithm ED25519 -out ed.pem
    //! ```
    //!
    //! The public JWKs came from a small Python (stdlib only) script: RSA `n` is
    //! `openssl rsa -noout -modulus` as base64url, `e` is 65537; for EC and Ed25519 it
    //! takes `openssl pkey -pubout -outform DER`, whose last 65 bytes are `04||x||y`
    //! (P-256) or whose last 32 bytes are the Ed25519 public key, and base64url-encodes
    //! them. One EC `x` was cross-checked against Python's `cryptography`. These keys
    //! protect nothing; never reuse them.

    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const RSA_PRIVATE_PEM: &str = "-----BEGIN RSA PRIVATE KEY-----
MIIEowIBAAKCAQEAsHpbgo3kz2oqbaVXK80R+J9jOTbsuzmyWHdCHT60/nvMM9Nx
wqe/SSCb8h24NSJDEiaF6SShQznLZ1TT/sNXrmn2Waoa9aan2i6sYUgU9jlc6VnK
+UegWW6AqAdhaWDMNIa8hoX5L4Ss/P+e5g1zfLxGZyjvr/NiUsYNaFRU9Seo7JcJ
3V7j9Qv2LHr///Nj/s9z172sYlhcoiG/RZrMmuk5jWfGs3xskFo3VIeRx16jGUzV
jgw3MeAOqTTFEJZWqNq1BJkvuv4CfaUbB9y2dplNhwj0xvMMsuU/c+zcd3MAx0k6
QID1lgRO9e9jwWFF6X+mjMn7iRItsfX9qknfiQIDAQABAoIBADcUcVQ9giEEYyqm
lJ7smcPNx1O3o0pKFzJKQn3LMQVOUS0JvPNClM63mUSHZxNaVrGnCVt7XcOUGbpt
/N6CTG74znUsxM5PzgqoT4/rRfOVcry4FEQaSV8wQIJxD0Oq/QEV3mhkDyJ4F9+8
znTB1P4k6xpOagSyA0mPW+bojz2WNvDjt90qakwqabYiX5L8LhYYtpJ/YI98ljMK
MJfQQOsJyhawT5hH+YZXC9Z7bOhDQh6lDDs243ZGfcNcGiRBMILBpF0OLFP+QoEs
f9kcW4UvGLccRsmX7oHyYM2dRx7J5QmKa6yoBU1RRuhMHlgXTI5TXICwAD7XzEss
PdZeBAMCgYEA3jVCOdgsZ/BmSrAkgxTiCvwDi1nUZAdhfREOAiZOTUbCBPVrJQhn
mx1RYc2wN+XaHCKRg5cUbl7aADYfrkMI0k6l1myaKTyAZ7lw+vzHct1wD2Iq+BfU
MUun+y3afHpsf5P0xDkXz5ma4gwfOlQsC+LECoYCB2R+8eOtG4a7dR8CgYEAy1DK
BJGEt/Kw33MmfPOICDaOpgZzXcihW7ak3ig31MzdBIpXAMRMokL8fdLLhN0EKZ+w
o8HM2pNbgypcvaMwjd8Dg0cOtXdUpB3L3r3qaLgPhKqvEUFLJf9nvDXs+B1Ni5oN
VquRpjqbZbjiFRYNycj0+6novTUp+2t0d//GrlcCgYEAr9araoTTVwjYmZ/btNMQ
sSqOT3ataN6iWcrmL/NKIUKuBCiFOg/1lLzVirSvDvzX5U3BosUqSNDMaEBsP4US
dQIBn7XfJGSZI/uOGT9xQUdUBwhjAmIw6zV4X38Al2J1e1uE5MZdPk3KT7jR+WFk
XZ98DOvQrTLsddP6R38N1ncCgYBy20X0xLxEKn8PDH8esXkUorV9R0GfJns5U3nZ
4sB/n+fv67LwxPRB6jO3ZQECItV6KjNgn1f51qso8yKHIwyH6QeT/u1pSGtxdz+3
qnQlCm4B1WanCcrJQXq50YD4PZ2UEsgcQTo7vPoSwho+LUJGzxbOoRLQ6Jq55N9b
9wunawKBgHZdZZu0oGPtH0LvxIwkguKwtZBKo8qrmMf8lRt/WdyGJ9omP/i27I94
MBnKEKHL++5pRW+UnPsBOrt7/PrmFXXlUldVumvs4cdQL/+UxRjsVTmqPiZqUFfH
jaHwRQE+QAceCRtWOdfKI+MI91BATlOMt5892rOuVLOPAvyRwYMH
-----END RSA PRIVATE KEY-----";
    const RSA_JWK: &str = r#"{"kty":"RSA","n":"sHpbgo3kz2oqbaVXK80R-J9jOTbsuzmyWHdCHT60_nvMM9Nxwqe_SSCb8h24NSJDEiaF6SShQznLZ1TT_sNXrmn2Waoa9aan2i6sYUgU9jlc6VnK-UegWW6AqAdhaWDMNIa8hoX5L4Ss_P-e5g1zfLxGZyjvr_NiUsYNaFRU9Seo7JcJ3V7j9Qv2LHr___Nj_s9z172sYlhcoiG_RZrMmuk5jWfGs3xskFo3VIeRx16jGUzVjgw3MeAOqTTFEJZWqNq1BJkvuv4CfaUbB9y2dplNhwj0xvMMsuU_c-zcd3MAx0k6QID1lgRO9e9jwWFF6X-mjMn7iRItsfX9qknfiQ","e":"AQAB"}"#;

    const EC_A_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgiGxPLe7UeSrLg7ZD
o6FzF5c9iy49AJtBsXIWh5JP4KahRANCAATNEAFLPelW7rmM1O0YBmQOHgS0cbbU
kfBNPeNfaOGvtzlU/56XZMVAp395tCoE6FiEoCEiDjAqE/nppN4Ue/Ct
-----END PRIVATE KEY-----";
    const EC_A_JWK: &str = r#"{"kty":"EC","crv":"P-256","x":"zRABSz3pVu65jNTtGAZkDh4EtHG21JHwTT3jX2jhr7c","y":"OVT_npdkxUCnf3m0KgToWISgISIOMCoT-emk3hR78K0","kid":"ec-a"}"#;

    const EC_B_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgjR0eMg8DbKr4fDyO
SJjmxOPjdOiIwvMtAzMNBJySBzmhRANCAAQEdbCZ7eenOKgUDZ6me2mp3IJS8z+h
w/TQ3RYKVAdlFbFB8SjhTDDKg6wTyDa9fyFNQHNr6alXxuvRe33PZWYM
-----END PRIVATE KEY-----";
    const EC_B_JWK: &str = r#"{"kty":"EC","crv":"P-256","x":"BHWwme3npzioFA2epntpqdyCUvM_ocP00N0WClQHZRU","y":"sUHxKOFMMMqDrBPINr1_IU1Ac2vpqVfG69F7fc9lZgw","kid":"ec-b"}"#;

    const ED_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIBZDNVteCTpGEyJU8GA0V11ylwcenr5TdulTR491er0i
-----END PRIVATE KEY-----";
    const ED_JWK: &str =
        r#"{"kty":"OKP","crv":"Ed25519","x":"kmoyShUCv8x7S7Jbqtd5Lb33x5VD20LTRNsPrLkwxVE"}"#;

    const SECRET: &str = "a shared secret of reasonable length!";
    /// "Now" for the tests; tokens expire at `NOW + 3600` unless a test says otherwise.
    const NOW: u64 = 1_800_000_000;

    fn der(pem: &str) -> Vec<u8> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        STANDARD.decode(body).unwrap()
    }

    fn mint(
        alg: Algorithm,
        kid: Option<&str>,
        key: &EncodingKey,
        claims: serde_json::Value,
    ) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        encode(&header, &claims, key).unwrap()
    }

    fn hs(claims: serde_json::Value) -> String {
        mint(Algorithm::HS256, None, &EncodingKey::from_secret(SECRET.as_bytes()), claims)
    }

    fn good_claims() -> serde_json::Value {
        json!({"sub": "user-1", "exp": NOW + 3600, "iat": NOW})
    }

    fn secret_config() -> AuthConfig {
        AuthConfig { secret: Some(SECRET.into()), ..AuthConfig::default() }
    }

    fn verifier(cfg: AuthConfig) -> Verifier {
        Verifier::new(&cfg).unwrap()
    }

    fn jwk_verifier(jwk: &str) -> Verifier {
        verifier(AuthConfig { jwk: Some(jwk.into()), ..AuthConfig::default() })
    }

    /// Writes `contents` to a fresh file in the system temp dir and returns its path.
    fn temp_file(name: &str, contents: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("syncgate-auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn jwks_config(path: PathBuf) -> AuthConfig {
        AuthConfig { jwks_file: Some(path), ..AuthConfig::default() }
    }

    #[test]
    fn hs256_good_token() {
        let mut v = verifier(secret_config());
        assert!(v.has_keys());
        let verified = v.verify(&hs(good_claims()), NOW).unwrap();
        assert_eq!(verified, Verified { sub: "user-1".into(), exp: Some(NOW + 3600) });
        // exp is optional; a fractional exp is floored.
        let verified = v.verify(&hs(json!({"sub": "u"})), NOW).unwrap();
        assert_eq!(verified.exp, None);
        let verified = v.verify(&hs(json!({"sub": "u", "exp": NOW as f64 + 10.75})), NOW);
        assert_eq!(verified.unwrap().exp, Some(NOW + 10));
    }

    #[test]
    fn hs256_bad_signature() {
        let mut v = verifier(secret_config());
        let other = EncodingKey::from_secret(b"another secret");
        let token = mint(Algorithm::HS256, None, &other, good_claims());
        assert_eq!(v.verify(&token, NOW), Err(AuthError::BadSignature));
        // A token whose payload was swapped after signing.
        let good = hs(good_claims());
        let forged = hs(json!({"sub": "admin", "exp": NOW + 3600}));
        let parts: Vec<&str> = good.split('.').collect();
        let forged_payload = forged.split('.').nth(1).unwrap();
        let spliced = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert_eq!(v.verify(&spliced, NOW), Err(AuthError::BadSignature));
    }

    #[test]
    fn hs256_only_not_hs384() {
        let mut v = verifier(secret_config());
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let token = mint(Algorithm::HS384, None, &key, good_claims());
        assert_eq!(v.verify(&token, NOW), Err(AuthError::WrongAlgorithm));
    }

    #[test]
    fn expiry_and_not_before() {
        let mut v = verifier(secret_config());
        let exp = NOW + 100;
        let token = hs(json!({"sub": "u", "exp": exp}));
        assert!(v.verify(&token, exp + CLOCK_SKEW_SECS - 1).is_ok());
        let fresh = verifier(secret_config()).verify(&token, exp + CLOCK_SKEW_SECS);
        assert_eq!(fresh, Err(AuthError::Expired));
        let old = hs(json!({"sub": "u", "exp": NOW - 3600}));
        assert_eq!(v.verify(&old, NOW), Err(AuthError::Expired));

        let nbf = NOW + 100;
        let token = hs(json!({"sub": "u", "exp": NOW + 3600, "nbf": nbf}));
        assert_eq!(v.verify(&token, NOW), Err(AuthError::NotYetValid));
        assert_eq!(v.verify(&token, nbf - CLOCK_SKEW_SECS - 1), Err(AuthError::NotYetValid));
        assert!(v.verify(&token, nbf - CLOCK_SKEW_SECS).is_ok());
    }

    #[test]
    fn bad_claim_types_are_malformed() {
        let mut v = verifier(secret_config());
        for claims in [
            json!({"sub": "u", "exp": "tomorrow"}),
            json!({"sub": "u", "nbf": [1]}),
            json!({"sub": 42}),
            json!({"sub": "u", "aud": 7}),
            json!(["not", "an", "object"]),
        ] {
            assert_eq!(v.verify(&hs(claims.clone()), NOW), Err(AuthError::Malformed), "{claims}");
        }
    }

    #[test]
    fn issuer_only_when_configured() {
        let mut open = verifier(secret_config());
        assert!(open.verify(&hs(json!({"sub": "u", "iss": "anyone"})), NOW).is_ok());

        let mut v = verifier(AuthConfig {
            issuer: Some("https://issuer.example".into()),
            ..secret_config()
        });
        let with = |iss: serde_json::Value| hs(json!({"sub": "u", "iss": iss}));
        assert!(v.verify(&with(json!("https://issuer.example")), NOW).is_ok());
        assert_eq!(
            v.verify(&with(json!("https://evil.example")), NOW),
            Err(AuthError::WrongIssuer)
        );
        assert_eq!(v.verify(&hs(json!({"sub": "u"})), NOW), Err(AuthError::WrongIssuer));
    }

    #[test]
    fn audience_only_when_configured() {
        // Not configured: a token's aud is not checked (zero-cache behaves the same).
        let mut open = verifier(secret_config());
        assert!(open.verify(&hs(json!({"sub": "u", "aud": "authenticated"})), NOW).is_ok());

        let mut v = verifier(AuthConfig { audience: Some("sync".into()), ..secret_config() });
        let with = |aud: serde_json::Value| hs(json!({"sub": "u", "aud": aud}));
        assert!(v.verify(&with(json!("sync")), NOW).is_ok());
        assert!(v.verify(&with(json!(["web", "sync"])), NOW).is_ok());
        assert_eq!(v.verify(&with(json!("web")), NOW), Err(AuthError::WrongAudience));
        assert_eq!(v.verify(&with(json!([])), NOW), Err(AuthError::WrongAudience));
        assert_eq!(v.verify(&hs(json!({"sub": "u"})), NOW), Err(AuthError::WrongAudience));
    }

    #[test]
    fn subject_is_required() {
        let mut v = verifier(secret_config());
        assert_eq!(v.verify(&hs(json!({"exp": NOW + 10})), NOW), Err(AuthError::NoSubject));
        assert_eq!(v.verify(&hs(json!({"sub": ""})), NOW), Err(AuthError::NoSubject));
        assert_eq!(v.verify(&hs(json!({"sub": null})), NOW), Err(AuthError::NoSubject));
    }

    #[test]
    fn malformed_tokens_do_not_panic() {
        let mut v = verifier(secret_config());
        let good = hs(good_claims());
        let parts: Vec<&str> = good.split('.').collect();
        let too_long = "a".repeat(MAX_TOKEN_BYTES + 1);
        let cases = [
            String::new(),
            "garbage".to_string(),
            "a.b".to_string(),
            format!("{}.{}", parts[0], parts[1]),
            format!("{good}.extra"),
            "..".to_string(),
            "!!!.???.***".to_string(),
            format!("{}.%%%%.{}", parts[0], parts[2]),
            format!("{}.{}.%%%%", parts[0], parts[1]),
            format!("{}.{}.{}", URL_SAFE_NO_PAD.encode("not json"), parts[1], parts[2]),
            format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode("{"), parts[2]),
            // alg "none" is not an algorithm jsonwebtoken knows.
            format!("{}.{}.", URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#), parts[1]),
            too_long,
            "\u{e9}.\u{e9}.\u{e9}".to_string(),
        ];
        for token in &cases {
            let result = v.verify(token, NOW);
            assert!(
                matches!(result, Err(AuthError::Malformed) | Err(AuthError::BadSignature)),
                "{token:?}: {result:?}"
            );
        }
        // These fail before any signature check.
        assert_eq!(v.verify(&cases[11], NOW), Err(AuthError::Malformed));
        assert_eq!(v.verify(&cases[12], NOW), Err(AuthError::Malformed));
    }

    #[test]
    fn correctly_signed_garbage_is_malformed() {
        // The signature is checked before the payload is decoded; these are signed
        // properly, so only the payload checks can refuse them.
        let mut v = verifier(secret_config());
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
        for payload in [
            "%%%%".to_string(),
            URL_SAFE_NO_PAD.encode("{"),
            URL_SAFE_NO_PAD.encode("not json"),
            URL_SAFE_NO_PAD.encode([0xff, 0xfe, 0x00]),
        ] {
            let message = format!("{header}.{payload}");
            let signature =
                jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).unwrap();
            let token = format!("{message}.{signature}");
            assert_eq!(v.verify(&token, NOW), Err(AuthError::Malformed), "{payload}");
        }
    }

    #[test]
    fn rs256_with_jwk() {
        let mut v = jwk_verifier(RSA_JWK);
        let key = EncodingKey::from_rsa_der(&der(RSA_PRIVATE_PEM));
        let token = mint(Algorithm::RS256, None, &key, good_claims());
        assert_eq!(v.verify(&token, NOW).unwrap().sub, "user-1");
        // Without an alg in the JWK, the whole RSA family is accepted.
        let token = mint(Algorithm::PS256, None, &key, good_claims());
        assert_eq!(v.verify(&token, NOW).unwrap().sub, "user-1");
        // With alg RS256 in the JWK, PS256 is refused.
        let pinned = RSA_JWK.replace(r#""kty":"RSA""#, r#""kty":"RSA","alg":"RS256""#);
        assert_eq!(jwk_verifier(&pinned).verify(&token, NOW), Err(AuthError::WrongAlgorithm));
        // A flipped signature bit fails.
        // (Not the last character: its spare bits must be zero, so changing it is a
        // base64 error rather than a wrong signature.)
        let mut bad = mint(Algorithm::RS256, None, &key, good_claims());
        let at = bad.len() - 10;
        let flipped = if &bad[at..=at] == "A" { "B" } else { "A" };
        bad.replace_range(at..=at, flipped);
        assert_eq!(v.verify(&bad, NOW), Err(AuthError::BadSignature));
    }

    #[test]
    fn es256_and_eddsa_with_jwk() {
        let ec = EncodingKey::from_ec_der(&der(EC_A_PRIVATE_PEM));
        let token = mint(Algorithm::ES256, Some("ec-a"), &ec, good_claims());
        assert_eq!(jwk_verifier(EC_A_JWK).verify(&token, NOW).unwrap().sub, "user-1");
        // Signed by the other EC key: same kid claimed, wrong signature.
        let other = EncodingKey::from_ec_der(&der(EC_B_PRIVATE_PEM));
        let forged = mint(Algorithm::ES256, Some("ec-a"), &other, good_claims());
        assert_eq!(jwk_verifier(EC_A_JWK).verify(&forged, NOW), Err(AuthError::BadSignature));

        let ed = EncodingKey::from_ed_der(&der(ED_PRIVATE_PEM));
        let token = mint(Algorithm::EdDSA, None, &ed, good_claims());
        let mut v = jwk_verifier(ED_JWK);
        assert_eq!(v.verify(&token, NOW).unwrap().sub, "user-1");
        let expired = mint(Algorithm::EdDSA, None, &ed, json!({"sub": "u", "exp": NOW - 60}));
        assert_eq!(v.verify(&expired, NOW), Err(AuthError::Expired));
    }

    #[test]
    fn jwks_selects_key_by_kid() {
        let jwks = format!(r#"{{"keys":[{EC_A_JWK},{EC_B_JWK}]}}"#);
        let mut v = verifier(jwks_config(temp_file("two.json", &jwks)));
        let key_a = EncodingKey::from_ec_der(&der(EC_A_PRIVATE_PEM));
        let key_b = EncodingKey::from_ec_der(&der(EC_B_PRIVATE_PEM));
        let claims = |sub: &str| json!({"sub": sub, "exp": NOW + 60});

        let by_a = mint(Algorithm::ES256, Some("ec-a"), &key_a, claims("a"));
        let by_b = mint(Algorithm::ES256, Some("ec-b"), &key_b, claims("b"));
        assert_eq!(v.verify(&by_a, NOW).unwrap().sub, "a");
        assert_eq!(v.verify(&by_b, NOW).unwrap().sub, "b");
        // The kid picks the key: B's signature under A's kid fails.
        let wrong_kid = mint(Algorithm::ES256, Some("ec-a"), &key_b, claims("x"));
        assert_eq!(v.verify(&wrong_kid, NOW), Err(AuthError::BadSignature));
        let unknown = mint(Algorithm::ES256, Some("ec-c"), &key_a, claims("x"));
        assert_eq!(v.verify(&unknown, NOW), Err(AuthError::UnknownKey));
        let no_kid = mint(Algorithm::ES256, None, &key_a, claims("x"));
        assert_eq!(v.verify(&no_kid, NOW), Err(AuthError::UnknownKey));
    }

    #[test]
    fn single_key_kid_rules() {
        let key_a = EncodingKey::from_ec_der(&der(EC_A_PRIVATE_PEM));
        let mut v = jwk_verifier(EC_A_JWK);
        let no_kid = mint(Algorithm::ES256, None, &key_a, good_claims());
        assert!(v.verify(&no_kid, NOW).is_ok());
        let other_kid = mint(Algorithm::ES256, Some("ec-z"), &key_a, good_claims());
        assert_eq!(v.verify(&other_kid, NOW), Err(AuthError::UnknownKey));
        // A key without a kid serves any kid.
        let ed = EncodingKey::from_ed_der(&der(ED_PRIVATE_PEM));
        let token = mint(Algorithm::EdDSA, Some("whatever"), &ed, good_claims());
        assert!(jwk_verifier(ED_JWK).verify(&token, NOW).is_ok());
    }

    #[test]
    fn algorithm_confusion_is_refused() {
        // The classic attack: sign HS256 with the public key as the HMAC secret.
        let mut v = jwk_verifier(RSA_JWK);
        for secret in [
            RSA_JWK.as_bytes().to_vec(),
            URL_SAFE_NO_PAD
                .decode(
                    serde_json::from_str::<serde_json::Value>(RSA_JWK).unwrap()["n"]
                        .as_str()
                        .unwrap(),
                )
                .unwrap(),
        ] {
            let token =
                mint(Algorithm::HS256, None, &EncodingKey::from_secret(&secret), good_claims());
            assert_eq!(v.verify(&token, NOW), Err(AuthError::WrongAlgorithm));
        }
        // An ES256 token against the RSA key, and RS256 against the HS256 secret.
        let ec = EncodingKey::from_ec_der(&der(EC_A_PRIVATE_PEM));
        let es = mint(Algorithm::ES256, None, &ec, good_claims());
        assert_eq!(v.verify(&es, NOW), Err(AuthError::WrongAlgorithm));
        let rsa = EncodingKey::from_rsa_der(&der(RSA_PRIVATE_PEM));
        let rs = mint(Algorithm::RS256, None, &rsa, good_claims());
        assert_eq!(verifier(secret_config()).verify(&rs, NOW), Err(AuthError::WrongAlgorithm));
        // An EdDSA key never accepts ES256, even with a matching kid.
        assert_eq!(jwk_verifier(ED_JWK).verify(&es, NOW), Err(AuthError::WrongAlgorithm));
    }

    #[test]
    fn cache_answers_until_expiry() {
        let mut v = verifier(secret_config());
        let exp = NOW + 100;
        let token = hs(json!({"sub": "u", "exp": exp}));
        assert!(v.verify(&token, NOW).is_ok());
        // Swap the key: only a cache hit can still accept the token.
        v.keys[0].key = DecodingKey::from_secret(b"rotated");
        assert_eq!(v.verify(&token, NOW + 50).unwrap().sub, "u");
        assert_eq!(v.verify(&token, exp + CLOCK_SKEW_SECS - 1).unwrap().sub, "u");
        // Past exp the entry is not used (a fresh check fails on the new key)...
        assert_eq!(v.verify(&token, exp + CLOCK_SKEW_SECS), Err(AuthError::BadSignature));
        // ...and it was dropped: going back in time does not revive it.
        assert_eq!(v.verify(&token, NOW), Err(AuthError::BadSignature));
        // With the original key, the same token is simply expired.
        let fresh = verifier(secret_config()).verify(&token, exp + CLOCK_SKEW_SECS);
        assert_eq!(fresh, Err(AuthError::Expired));
    }

    #[test]
    fn cache_skips_failures_and_long_tokens() {
        let mut v = verifier(secret_config());
        let expired = hs(json!({"sub": "u", "exp": NOW - 3600}));
        assert_eq!(v.verify(&expired, NOW), Err(AuthError::Expired));
        let padding = "x".repeat(MAX_CACHED_TOKEN_BYTES);
        let long = hs(json!({"sub": "u", "pad": padding}));
        assert!(long.len() > MAX_CACHED_TOKEN_BYTES && long.len() <= MAX_TOKEN_BYTES);
        assert!(v.verify(&long, NOW).is_ok());
        assert!(v.cache.slots.iter().all(Option::is_none));
    }

    #[test]
    fn cache_collision_replaces_and_never_confuses() {
        let mut v = verifier(secret_config());
        // Find two tokens that share a slot (birthday bound: a few hundred tries).
        let mut seen = std::collections::HashMap::new();
        let (first, second) = (0..100_000)
            .find_map(|i| {
                let token = hs(json!({"sub": format!("user-{i}")}));
                let slot = v.cache.slot(&token);
                seen.insert(slot, token.clone()).map(|earlier| (earlier, token))
            })
            .unwrap();
        assert!(v.verify(&first, NOW).is_ok());
        assert!(v.verify(&second, NOW).is_ok());
        v.keys[0].key = DecodingKey::from_secret(b"rotated");
        // The second replaced the first; the full compare keeps them apart.
        assert!(v.verify(&second, NOW).is_ok());
        assert_eq!(v.verify(&first, NOW), Err(AuthError::BadSignature));
        assert_eq!(v.cache.slots.len(), CACHE_SLOTS);
    }

    #[test]
    fn no_key_configured() {
        let mut v = verifier(AuthConfig::default());
        assert!(!v.has_keys());
        assert_eq!(v.verify(&hs(good_claims()), NOW), Err(AuthError::NoKeyConfigured));
        let err =
            Verifier::new(&AuthConfig { required: true, ..AuthConfig::default() }).unwrap_err();
        assert!(err.contains("auth.required"), "{err}");
    }

    #[test]
    fn config_errors_are_clear() {
        let err = |cfg: AuthConfig| Verifier::new(&cfg).unwrap_err();
        let jwk = |text: &str| AuthConfig { jwk: Some(text.into()), ..AuthConfig::default() };

        let both = err(AuthConfig { jwk: Some(EC_A_JWK.into()), ..secret_config() });
        assert!(both.contains("only one of"), "{both}");
        assert_eq!(
            err(AuthConfig { secret: Some(String::new()), ..AuthConfig::default() }),
            "auth.secret is empty"
        );
        assert_eq!(
            err(AuthConfig { issuer: Some(String::new()), ..secret_config() }),
            "auth.issuer is empty"
        );
        assert!(err(jwk("{not json")).starts_with("auth.jwk is not valid JSON"));
        assert!(err(jwk(r#"{"keys":[]}"#)).contains("use auth.jwks_file"));
        assert!(err(jwk(r#"{"n":"AQAB"}"#)).contains("no kty"));
        assert!(err(jwk(r#"{"kty":"oct","k":"c2VjcmV0"}"#)).contains("use auth.secret"));
        assert!(err(jwk(r#"{"kty":"RSA","n":"AQAB"}"#)).contains("not a usable JWK"));
        assert!(err(jwk(r#"{"kty":"RSA","n":"AQAB","e":"AQAB"}"#)).contains("2048 to 8192"));
        assert!(
            err(jwk(r#"{"kty":"EC","crv":"P-256","x":"AQAB","y":"AQAB"}"#)).contains("32 bytes")
        );
        assert!(err(jwk(r#"{"kty":"EC","crv":"P-521","x":"AQAB","y":"AQAB"}"#))
            .contains("P-256 or P-384"));
        assert!(err(jwk(r#"{"kty":"OKP","crv":"Ed25519","x":"!!"}"#)).contains("not base64url"));
        let enc = EC_A_JWK.replace(r#""kty""#, r#""use":"enc","kty""#);
        assert!(err(jwk(&enc)).contains("encryption key"));
        let hs_alg = EC_A_JWK.replace(r#""kty""#, r#""alg":"HS256","kty""#);
        assert!(err(jwk(&hs_alg)).contains("alg HS256 is not a supported"));
        let misfit = EC_A_JWK.replace(r#""kty""#, r#""alg":"RS256","kty""#);
        assert!(err(jwk(&misfit)).contains("alg RS256 does not fit"));
        let unknown = EC_A_JWK.replace(r#""kty""#, r#""alg":"ES512","kty""#);
        assert!(err(jwk(&unknown)).contains("alg ES512 is not a supported"));
    }

    #[test]
    fn jwks_file_errors_name_the_path() {
        let missing = std::env::temp_dir().join("syncgate-no-such-dir/jwks.json");
        let message = Verifier::new(&jwks_config(missing.clone())).unwrap_err();
        assert!(
            message.starts_with(&format!("auth.jwks_file {}:", missing.display())),
            "{message}"
        );

        let cases = [
            ("bad-json.json", "{".to_string(), "not a JWKS"),
            ("no-keys.json", r#"{"kid":"x"}"#.to_string(), "not a JWKS"),
            ("empty.json", r#"{"keys":[]}"#.to_string(), "no signing keys"),
            ("bad-key.json", r#"{"keys":[{"kty":"EC"}]}"#.to_string(), "key 0:"),
            ("dup.json", format!(r#"{{"keys":[{EC_A_JWK},{EC_A_JWK}]}}"#), "appears twice"),
            ("no-kid.json", format!(r#"{{"keys":[{EC_A_JWK},{ED_JWK}]}}"#), "needs a kid"),
        ];
        for (name, contents, expected) in cases {
            let path = temp_file(name, &contents);
            let message = Verifier::new(&jwks_config(path.clone())).unwrap_err();
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(message.contains(expected), "{name}: {message}");
        }
        let big = temp_file("big.json", &" ".repeat(MAX_JWKS_FILE_BYTES as usize + 1));
        assert!(Verifier::new(&jwks_config(big)).unwrap_err().contains("larger than"));

        // Encryption keys in a JWKS are skipped rather than refused.
        let enc = RSA_JWK.replace(r#""kty""#, r#""use":"enc","kid":"e","kty""#);
        let path = temp_file("with-enc.json", &format!(r#"{{"keys":[{enc},{EC_A_JWK}]}}"#));
        let v = verifier(jwks_config(path));
        assert_eq!(v.keys.len(), 1);
    }

    #[test]
    fn config_from_toml() {
        let cfg: AuthConfig =
            toml::from_str("secret = \"s\"\nissuer = \"i\"\naudience = \"a\"\nrequired = true\n")
                .unwrap();
        assert_eq!(cfg.secret.as_deref(), Some("s"));
        assert_eq!(cfg.issuer.as_deref(), Some("i"));
        assert_eq!(cfg.audience.as_deref(), Some("a"));
        assert!(cfg.required);
        let cfg: AuthConfig = toml::from_str("jwks_file = \"/etc/syncgate/jwks.json\"").unwrap();
        assert_eq!(cfg.jwks_file, Some(PathBuf::from("/etc/syncgate/jwks.json")));
        assert_eq!(toml::from_str::<AuthConfig>("").unwrap(), AuthConfig::default());
        assert!(toml::from_str::<AuthConfig>("jwks_url = \"https://x\"").is_err());
    }

    #[test]
    fn debug_hides_the_secret_and_messages_hide_the_token() {
        let text = format!("{:?}", secret_config());
        assert!(!text.contains(SECRET), "{text}");
        assert!(text.contains("<redacted>"));
        let mut v = verifier(secret_config());
        let token = hs(json!({"sub": "u", "exp": NOW - 100}));
        let error = v.verify(&token, NOW).unwrap_err();
        assert_eq!(error.message(), "Token has expired");
        assert_eq!(error.to_string(), error.message());
    }
}
