//! JWTs for the connect-storm scenario: HS256 with a shared secret and RS256 with an RSA
//! key the bench generates, plus the public JWK the daemon is configured with.
//!
//! Tokens are minted ahead of a run into a pool (RSA signing costs about a millisecond,
//! far more than the server's verification), each with its own `jti` and `sub`, so
//! every connection presents a distinct token and a server-side cache of verified
//! tokens cannot turn the scenario into a cache benchmark.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{KeyPair, RsaKeyPair, RSA_PKCS1_SHA256};
use aws_lc_rs::{hmac, rsa::KeySize};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// How a token is signed.
pub enum Signer {
    /// HS256: HMAC-SHA256 over the secret's UTF-8 bytes (zero-cache's convention).
    Hs256(Box<hmac::Key>),
    /// RS256: RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256(Box<RsaKeyPair>),
}

/// The `kid` of the generated key; the JWK carries the same one.
pub const KEY_ID: &str = "syncgate-bench";

impl Signer {
    /// An HS256 signer.
    pub fn hs256(secret: &str) -> Self {
        Signer::Hs256(Box::new(hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes())))
    }

    /// An RS256 signer from a PKCS#8 DER private key.
    pub fn rs256(pkcs8: &[u8]) -> Result<Self, String> {
        RsaKeyPair::from_pkcs8(pkcs8)
            .map(|k| Signer::Rs256(Box::new(k)))
            .map_err(|e| format!("RSA key: {e}"))
    }

    /// A signed token for `sub`, valid from `iat` for `ttl_secs`, with a unique `jti`.
    pub fn mint(&self, sub: &str, jti: u64, iat: u64, ttl_secs: u64) -> Result<String, String> {
        let header = match self {
            Signer::Hs256(_) => r#"{"alg":"HS256","typ":"JWT"}"#.to_string(),
            Signer::Rs256(_) => format!(r#"{{"alg":"RS256","typ":"JWT","kid":"{KEY_ID}"}}"#),
        };
        let claims = serde_json::json!({
            "sub": sub, "iat": iat, "exp": iat + ttl_secs, "jti": format!("bench-{jti}"),
        });
        let mut token = URL_SAFE_NO_PAD.encode(header);
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
        let signature = match self {
            Signer::Hs256(key) => hmac::sign(key, token.as_bytes()).as_ref().to_vec(),
            Signer::Rs256(key) => {
                let mut sig = vec![0; key.public_modulus_len()];
                key.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), token.as_bytes(), &mut sig)
                    .map_err(|_| "RSA signing failed")?;
                sig
            }
        };
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature));
        Ok(token)
    }
}

/// A new 2048-bit RSA key: its PKCS#8 DER private key and its public JWK (JSON).
pub fn generate_rsa() -> Result<(Vec<u8>, String), String> {
    let key = RsaKeyPair::generate(KeySize::Rsa2048).map_err(|_| "RSA key generation failed")?;
    let der = key.as_der().map_err(|_| "RSA key export failed")?.as_ref().to_vec();
    Ok((der, public_jwk(&key)))
}

/// A random HS256 secret: 32 bytes, hex.
pub fn random_secret() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| "no randomness")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The public JWK of `key`, as the daemon's `auth.jwk` takes it.
pub fn public_jwk(key: &RsaKeyPair) -> String {
    let public = key.public_key();
    serde_json::json!({
        "kty": "RSA",
        "alg": "RS256",
        "use": "sig",
        "kid": KEY_ID,
        "n": URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()),
        "e": URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero()),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256;

    fn parts(token: &str) -> Vec<Vec<u8>> {
        token.split('.').map(|p| URL_SAFE_NO_PAD.decode(p).unwrap()).collect()
    }

    #[test]
    fn hs256_tokens_verify_and_differ() {
        let s = Signer::hs256("secret");
        let a = s.mint("u1", 1, 1000, 60).unwrap();
        let b = s.mint("u1", 2, 1000, 60).unwrap();
        assert_ne!(a, b, "jti makes every token distinct");
        let p = parts(&a);
        let claims: serde_json::Value = serde_json::from_slice(&p[1]).unwrap();
        assert_eq!((claims["sub"].as_str(), claims["exp"].as_u64()), (Some("u1"), Some(1060)));
        let (signed, _) = a.rsplit_once('.').unwrap();
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"secret");
        hmac::verify(&key, signed.as_bytes(), &p[2]).unwrap();
        let wrong = hmac::Key::new(hmac::HMAC_SHA256, b"other");
        assert!(hmac::verify(&wrong, signed.as_bytes(), &p[2]).is_err());
    }

    #[test]
    fn rs256_tokens_verify_against_the_jwk() {
        let (der, jwk) = generate_rsa().unwrap();
        let s = Signer::rs256(&der).unwrap();
        let token = s.mint("u2", 7, 1000, 60).unwrap();
        let p = parts(&token);
        let header: serde_json::Value = serde_json::from_slice(&p[0]).unwrap();
        assert_eq!((header["alg"].as_str(), header["kid"].as_str()), (Some("RS256"), Some(KEY_ID)));
        let jwk: serde_json::Value = serde_json::from_str(&jwk).unwrap();
        let n = URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap();
        let e = URL_SAFE_NO_PAD.decode(jwk["e"].as_str().unwrap()).unwrap();
        assert_eq!(n.len(), 256);
        let public = aws_lc_rs::rsa::PublicKeyComponents { n: &n[..], e: &e[..] };
        let (signed, _) = token.rsplit_once('.').unwrap();
        public.verify(&RSA_PKCS1_2048_8192_SHA256, signed.as_bytes(), &p[2]).unwrap();
        let tampered = format!("{signed}x");
        assert!(public.verify(&RSA_PKCS1_2048_8192_SHA256, tampered.as_bytes(), &p[2]).is_err());
        assert!(Signer::rs256(b"not a key").is_err());
    }
}
