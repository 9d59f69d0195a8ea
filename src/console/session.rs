//! The console's session cookie and CSRF token. The browser never holds the admin token: it
//! holds `v1.{expiry}.{nonce}.{mac}`, an HMAC under a key derived from the token (so changing
//! the token ends every session), and each form carries a per-session CSRF token.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The cookie's name. `__Host-`: browsers accept it only `Secure`, on `Path=/`, without a
/// `Domain`, so no sibling host can set or shadow it.
pub const COOKIE: &str = "__Host-relay_console";

/// How long a session lasts after logging in.
pub const LIFETIME_SECS: i64 = 8 * 3600;

/// The key sessions and CSRF tokens are signed with, derived from the admin token.
pub struct SessionKey([u8; 32]);

impl SessionKey {
    pub fn from_admin_token(token: &str) -> Self {
        let mut h = Sha256::new();
        h.update(b"relay-console-session-v1\0");
        h.update(token.as_bytes());
        Self(h.finalize().into())
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("any key length");
        for p in parts {
            mac.update(p);
            mac.update(b"\0");
        }
        mac.finalize().into_bytes().into()
    }

    /// A new session value expiring `LIFETIME_SECS` after `now_secs`.
    pub fn issue(&self, now_secs: i64) -> String {
        use rand::RngCore;
        let mut nonce = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut nonce);
        let nonce = hex(&nonce);
        let expiry = (now_secs + LIFETIME_SECS).to_string();
        let mac = self.mac(&[b"session", expiry.as_bytes(), nonce.as_bytes()]);
        format!("v1.{expiry}.{nonce}.{}", b64(&mac))
    }

    /// The session a cookie value proves, if it is genuine and not expired.
    pub fn verify(&self, value: &str, now_secs: i64) -> Option<Session> {
        let mut parts = value.split('.');
        let (Some("v1"), Some(expiry), Some(nonce), Some(mac), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let given = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(mac)
            .ok()?;
        let expected = self.mac(&[b"session", expiry.as_bytes(), nonce.as_bytes()]);
        if !bool::from(given.as_slice().ct_eq(&expected)) {
            return None;
        }
        let expires_at = expiry.parse::<i64>().ok()?;
        (now_secs < expires_at).then(|| Session {
            csrf: b64(&self.mac(&[b"csrf", nonce.as_bytes()])),
            nonce: nonce.to_owned(),
            expires_at,
        })
    }
}

/// A logged-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// Identifies the session (for logging out); random, carries nothing.
    pub nonce: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// The value every form of this session must send back in its `csrf` field.
    pub csrf: String,
}

impl Session {
    /// Whether `given` is this session's CSRF token (constant time).
    pub fn csrf_matches(&self, given: &str) -> bool {
        Sha256::digest(given.as_bytes())
            .ct_eq(&Sha256::digest(self.csrf.as_bytes()))
            .into()
    }
}

/// Whether a state-changing request comes from a page of this relay: `Sec-Fetch-Site` (sent
/// by every current browser) must not say another site, and an `Origin` must name the host
/// the request was sent to. A client that sends neither (curl) still needs the CSRF token.
pub fn same_origin(sec_fetch_site: Option<&str>, origin: Option<&str>, host: Option<&str>) -> bool {
    if let Some(site) = sec_fetch_site {
        if !matches!(site, "same-origin" | "none") {
            return false;
        }
    }
    match origin {
        None => true,
        Some(origin) => {
            let authority = origin.split_once("://").map(|(_, rest)| rest);
            matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h))
        }
    }
}

/// Constant-time comparison of a typed admin token with the configured one.
pub fn token_matches(given: &str, token: &str) -> bool {
    Sha256::digest(given.as_bytes())
        .ct_eq(&Sha256::digest(token.as_bytes()))
        .into()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_valid_until_it_expires_and_only_under_its_token() {
        let key = SessionKey::from_admin_token("a".repeat(32).as_str());
        let value = key.issue(1_000);
        assert!(!value.contains(&"a".repeat(32)), "the token never leaves");
        let s = key.verify(&value, 1_001).expect("fresh session");
        assert_eq!(s.expires_at, 1_000 + LIFETIME_SECS);
        assert!(key.verify(&value, 1_000 + LIFETIME_SECS).is_none());
        let other = SessionKey::from_admin_token("b".repeat(32).as_str());
        assert!(other.verify(&value, 1_001).is_none());
    }

    #[test]
    fn a_tampered_session_is_refused() {
        let key = SessionKey::from_admin_token("token");
        let value = key.issue(0);
        let later = value.replacen(&LIFETIME_SECS.to_string(), "99999999999", 1);
        assert!(key.verify(&later, 1).is_none());
        assert!(key.verify("v1.1.2.3", 0).is_none());
        assert!(key.verify("", 0).is_none());
        assert!(key.verify(&format!("{value}.x"), 0).is_none());
    }

    #[test]
    fn the_csrf_token_belongs_to_one_session() {
        let key = SessionKey::from_admin_token("token");
        let a = key.verify(&key.issue(0), 1).unwrap();
        let b = key.verify(&key.issue(0), 1).unwrap();
        assert!(a.csrf_matches(&a.csrf));
        assert!(!a.csrf_matches(&b.csrf));
        assert!(!a.csrf_matches(""));
    }

    #[test]
    fn only_same_origin_posts_pass() {
        let host = Some("127.0.0.1:9090");
        assert!(same_origin(
            Some("same-origin"),
            Some("http://127.0.0.1:9090"),
            host
        ));
        assert!(same_origin(None, None, host));
        assert!(!same_origin(Some("cross-site"), None, host));
        assert!(!same_origin(Some("same-site"), None, host));
        assert!(!same_origin(None, Some("https://evil.example"), host));
        assert!(!same_origin(None, Some("null"), host));
        assert!(!same_origin(None, Some("http://127.0.0.1:9090"), None));
    }
}
