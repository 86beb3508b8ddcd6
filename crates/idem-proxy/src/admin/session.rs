//! Browser sessions of the admin page: the login form trades the admin token for a
//! random session id in an `HttpOnly`, `SameSite=Strict` cookie (also `Secure` when
//! the admin listener serves HTTPS), so the token never sits in a URL, in the page's
//! script, or in the browser's history.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::HeaderMap;
use subtle::ConstantTimeEq;

/// The cookie's name.
pub(super) const COOKIE: &str = "idem_admin";

/// How long a session lasts.
pub(super) const LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// Most sessions held at once; the oldest goes first.
const MAX_SESSIONS: usize = 256;

/// The live sessions, by id.
#[derive(Debug, Default)]
pub struct Sessions {
    live: Mutex<HashMap<String, Instant>>,
}

impl Sessions {
    /// Opens a session; returns its id.
    pub fn open(&self) -> String {
        let mut bytes = [0u8; 32];
        rand::fill(&mut bytes[..]);
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        live.retain(|_, born| now.duration_since(*born) < LIFETIME);
        if live.len() >= MAX_SESSIONS
            && let Some(oldest) = live.iter().min_by_key(|(_, b)| **b).map(|(k, _)| k.clone())
        {
            live.remove(&oldest);
        }
        live.insert(id.clone(), now);
        id
    }

    /// Whether the request's cookie names a live session.
    pub fn valid(&self, headers: &HeaderMap) -> bool {
        let Some(id) = cookie(headers) else {
            return false;
        };
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        // Compared in constant time, like the token.
        live.iter().any(|(k, born)| {
            bool::from(k.as_bytes().ct_eq(id.as_bytes())) && born.elapsed() < LIFETIME
        })
    }

    /// Ends the request's session, if any.
    pub fn close(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers) {
            self.live
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
    }
}

/// The session id from the `Cookie` header.
fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// The `Set-Cookie` value of a new session. `secure` (the listener serves HTTPS) adds
/// `Secure`, so that the browser never sends the id over plain HTTP; it is left out on
/// a plain-HTTP listener, where a browser would drop a `Secure` cookie.
pub(super) fn set_cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        LIFETIME.as_secs(),
        secure_attr(secure)
    )
}

/// The `Set-Cookie` value that ends a session, with the attributes it was set with
/// (a browser may ignore a `Secure` cookie's removal sent without `Secure`).
pub(super) fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{}",
        secure_attr(secure)
    )
}

fn secure_attr(secure: bool) -> &'static str {
    if secure { "; Secure" } else { "" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cookie(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::COOKIE, v.parse().unwrap());
        h
    }

    #[test]
    fn a_session_is_valid_until_closed() {
        let s = Sessions::default();
        let id = s.open();
        let h = with_cookie(&format!("other=1; {COOKIE}={id}"));
        assert!(s.valid(&h));
        assert!(!s.valid(&with_cookie(&format!("{COOKIE}=0{id}"))));
        assert!(!s.valid(&HeaderMap::new()));
        s.close(&h);
        assert!(!s.valid(&h));
    }

    #[test]
    fn sessions_are_bounded() {
        let s = Sessions::default();
        let first = s.open();
        for _ in 0..MAX_SESSIONS {
            s.open();
        }
        assert!(!s.valid(&with_cookie(&format!("{COOKIE}={first}"))));
        assert_eq!(s.live.lock().unwrap().len(), MAX_SESSIONS);
    }

    #[test]
    fn cookie_attributes() {
        let c = set_cookie("abc", false);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Path=/"));
        assert!(!c.contains("Secure"), "{c}");
        assert!(!clear_cookie(false).contains("Secure"));
    }

    #[test]
    fn cookies_are_secure_over_https() {
        let c = set_cookie("abc", true);
        assert!(c.ends_with("; Secure") && c.contains("HttpOnly"), "{c}");
        let cleared = clear_cookie(true);
        assert!(
            cleared.contains("Max-Age=0") && cleared.ends_with("; Secure"),
            "{cleared}"
        );
    }
}
