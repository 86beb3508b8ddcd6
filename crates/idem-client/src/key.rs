//! The idempotency key: one per logical operation, the same on every attempt.

use std::fmt;

use http::HeaderValue;

/// The header that carries the key by default (SPEC §1).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The header a server sets on a replayed answer (SPEC §7).
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// Longest key a default idem server accepts (SPEC §1).
pub const MAX_KEY_LEN: usize = 255;

/// An idempotency key: printable ASCII, 1 to 255 characters, so that every server with
/// default rules accepts it.
///
/// One key names one logical operation. Generate it once ([`IdempotencyKey::generate`],
/// a UUID v4) when the caller decides to do the operation, keep it with the operation
/// (e.g. in the order row), and send it on every attempt: that is what lets the server
/// answer a retry with the original result instead of doing the work twice.
///
/// ```
/// use idem_client::IdempotencyKey;
/// let key = IdempotencyKey::new("order-1001").unwrap();
/// assert_eq!(key.as_str(), "order-1001");
/// assert!(IdempotencyKey::new("").is_err());
/// assert_eq!(IdempotencyKey::generate().as_str().len(), 36);
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

/// Why a string is not a usable key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key is empty.
    #[error("an idempotency key cannot be empty")]
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`].
    #[error("an idempotency key is at most {MAX_KEY_LEN} characters, this one has {0}")]
    TooLong(usize),
    /// The key has a character outside printable ASCII (space to `~`).
    #[error("an idempotency key is printable ASCII; found {0:?}")]
    BadChar(char),
}

impl IdempotencyKey {
    /// A key from the caller's own identifier of the operation.
    pub fn new(key: impl Into<String>) -> Result<Self, KeyError> {
        let key = key.into();
        if key.is_empty() {
            return Err(KeyError::Empty);
        }
        if key.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong(key.len()));
        }
        if let Some(c) = key.chars().find(|c| !(' '..='~').contains(c)) {
            return Err(KeyError::BadChar(c));
        }
        Ok(IdempotencyKey(key))
    }

    /// A fresh random key (UUID v4, hyphenated).
    pub fn generate() -> Self {
        IdempotencyKey(uuid::Uuid::new_v4().hyphenated().to_string())
    }

    /// The key as sent.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key as a header value.
    pub fn to_header_value(&self) -> HeaderValue {
        HeaderValue::from_str(&self.0).expect("validated: printable ASCII")
    }

    /// The key a request already carries in `value`, if it is a usable one.
    pub(crate) fn from_header(value: &HeaderValue) -> Option<Self> {
        value.to_str().ok().and_then(|s| Self::new(s).ok())
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey({:?})", self.0)
    }
}

impl std::str::FromStr for IdempotencyKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_uuid_v4_and_distinct() {
        let a = IdempotencyKey::generate();
        let b = IdempotencyKey::generate();
        assert_ne!(a, b);
        let uuid = uuid::Uuid::parse_str(a.as_str()).unwrap();
        assert_eq!(uuid.get_version_num(), 4);
    }

    #[test]
    fn refuses_what_a_default_server_refuses() {
        assert_eq!(IdempotencyKey::new(""), Err(KeyError::Empty));
        assert_eq!(
            IdempotencyKey::new("x".repeat(256)),
            Err(KeyError::TooLong(256))
        );
        assert!(IdempotencyKey::new("x".repeat(255)).is_ok());
        assert_eq!(IdempotencyKey::new("a\nb"), Err(KeyError::BadChar('\n')));
        assert_eq!(IdempotencyKey::new("café"), Err(KeyError::BadChar('é')));
        assert!(IdempotencyKey::new("order 42 ~ok").is_ok());
    }

    #[test]
    fn header_round_trip() {
        let k = IdempotencyKey::new("order-1").unwrap();
        assert_eq!(
            IdempotencyKey::from_header(&k.to_header_value()),
            Some(k.clone())
        );
        assert_eq!(
            IdempotencyKey::from_header(&HeaderValue::from_static("")),
            None
        );
    }
}
