//! Encryption at rest: a [`Store`] wrapper that seals every stored response with
//! XChaCha20-Poly1305 before it reaches the backend.
//!
//! What is sealed: the response's headers, body and request id. What stays readable:
//! the status (for inspection and metrics), the fingerprint (a hash already), the key,
//! the route and the tenant (a keyed hash already), and the times. The record's
//! storage id is the associated data, so a sealed response cannot be moved to another
//! record. Records written before encryption was turned on are read as they are.

use std::time::Duration;

use bytes::Bytes;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use http::{HeaderName, HeaderValue};

use crate::record::{FencingToken, Record, RecordState, StoredResponse};
use crate::scope::RecordKey;
use crate::store::{
    Claim, ClaimSpec, InFlightListing, Store, StoreError, StoreErrorKind, TenantCounting, Wakeups,
};

/// Header that marks a sealed response inside the backend.
const SEALED_MARKER: HeaderName = HeaderName::from_static("x-idem-sealed");
const SEALED_VERSION: &str = "xchacha20poly1305-v1";
const NONCE_LEN: usize = 24;

/// A 256-bit encryption key.
#[derive(Clone)]
pub struct EncryptionKey([u8; 32]);

impl std::fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EncryptionKey(..)")
    }
}

/// Why a text is not an [`EncryptionKey`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum EncryptionKeyError {
    /// The text holds something other than hex digits, or an odd number of them.
    #[error("not hex: {0}")]
    NotHex(#[source] hex::FromHexError),
    /// Hex, but not 32 bytes of it.
    #[error("{len} bytes; a key is 32 bytes (64 hex digits)")]
    WrongLength {
        /// How many bytes the text decoded to.
        len: usize,
    },
}

impl EncryptionKey {
    /// Reads a key written as 64 hex digits.
    pub fn from_hex(text: &str) -> Result<Self, EncryptionKeyError> {
        let bytes = hex::decode(text.trim()).map_err(EncryptionKeyError::NotHex)?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| EncryptionKeyError::WrongLength { len: b.len() })?;
        Ok(EncryptionKey(key))
    }
}

/// A store whose stored responses are encrypted. Wrap any store:
/// `Encrypted::new(SqliteStore::open(path)?, key)`.
pub struct Encrypted<S> {
    inner: S,
    cipher: XChaCha20Poly1305,
}

impl<S> std::fmt::Debug for Encrypted<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encrypted").finish_non_exhaustive()
    }
}

impl<S: Store> Encrypted<S> {
    /// Wraps a store.
    pub fn new(inner: S, key: &EncryptionKey) -> Self {
        Encrypted {
            inner,
            cipher: XChaCha20Poly1305::new((&key.0).into()),
        }
    }

    fn seal(
        &self,
        key: &RecordKey,
        response: &StoredResponse,
    ) -> Result<StoredResponse, StoreError> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = key.storage_id();
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: &response.encode(),
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| StoreError::msg(StoreErrorKind::Backend, "encryption failed"))?;
        let mut body = Vec::with_capacity(NONCE_LEN + sealed.len());
        body.extend_from_slice(&nonce);
        body.extend_from_slice(&sealed);
        Ok(StoredResponse {
            status: response.status,
            headers: vec![(SEALED_MARKER, HeaderValue::from_static(SEALED_VERSION))],
            body: Bytes::from(body),
            body_kept: response.body_kept,
            request_id: None,
        })
    }

    fn open(&self, key: &RecordKey, stored: StoredResponse) -> Result<StoredResponse, StoreError> {
        let sealed = stored.headers.len() == 1 && stored.headers[0].0 == SEALED_MARKER;
        if !sealed {
            return Ok(stored);
        }
        let corrupt =
            |why: &str| StoreError::msg(StoreErrorKind::Corrupt, format!("sealed response: {why}"));
        if stored.headers[0].1 != SEALED_VERSION {
            return Err(corrupt("unknown sealing version"));
        }
        if stored.body.len() < NONCE_LEN {
            return Err(corrupt("too short"));
        }
        let (nonce, ciphertext) = stored.body.split_at(NONCE_LEN);
        let aad = key.storage_id();
        let plain = self
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| {
                corrupt(
                    "cannot be decrypted with this key (wrong key, or moved from another record)",
                )
            })?;
        StoredResponse::decode(&plain).map_err(|e| corrupt(&e.to_string()))
    }

    fn open_record(&self, key: &RecordKey, record: Record) -> Result<Record, StoreError> {
        Ok(match record.state {
            RecordState::Completed(r) => Record {
                state: RecordState::Completed(self.open(key, r)?),
                ..record
            },
            RecordState::InFlight { .. } => record,
        })
    }
}

impl<S: Store> Store for Encrypted<S> {
    async fn claim(&self, key: &RecordKey, spec: ClaimSpec<'_>) -> Result<Claim, StoreError> {
        Ok(match self.inner.claim(key, spec).await? {
            Claim::Existing(record) => Claim::Existing(self.open_record(key, record)?),
            acquired => acquired,
        })
    }
    async fn complete(
        &self,
        key: &RecordKey,
        token: FencingToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let sealed = self.seal(key, response)?;
        self.inner.complete(key, token, &sealed, ttl).await
    }
    async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        self.inner
            .get(key)
            .await?
            .map(|r| self.open_record(key, r))
            .transpose()
    }
    crate::forward_store!(inner => reclaim, release, renew, delete, purge_expired, ping);
}

// Tenant counts, wake-ups and the in-flight list hold no response: nothing to seal.
impl<S: TenantCounting> TenantCounting for Encrypted<S> {
    crate::forward_store!(inner => admit, settle);
}

impl<S: Wakeups> Wakeups for Encrypted<S> {
    crate::forward_store!(inner => watch);
}

impl<S: InFlightListing> InFlightListing for Encrypted<S> {
    crate::forward_store!(inner => list_in_flight);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Lease;

    fn key() -> EncryptionKey {
        EncryptionKey::from_hex(&"42".repeat(32)).unwrap()
    }

    fn response() -> StoredResponse {
        StoredResponse {
            status: 201,
            headers: vec![(
                http::header::LOCATION,
                HeaderValue::from_static("/v1/charges/ch_secret"),
            )],
            body: Bytes::from_static(b"{\"card\":\"4242424242424242\"}"),
            body_kept: crate::record::BodyKept::Whole,
            request_id: Some("req_1".into()),
        }
    }

    /// A store that is never called: sealing and opening need no backend.
    struct Nothing;
    impl Store for Nothing {
        async fn claim(&self, _: &RecordKey, _: ClaimSpec<'_>) -> Result<Claim, StoreError> {
            unreachable!()
        }
        async fn reclaim(
            &self,
            _: &RecordKey,
            _: FencingToken,
            _: ClaimSpec<'_>,
        ) -> Result<Option<Lease>, StoreError> {
            unreachable!()
        }
        async fn complete(
            &self,
            _: &RecordKey,
            _: FencingToken,
            _: &StoredResponse,
            _: Duration,
        ) -> Result<bool, StoreError> {
            unreachable!()
        }
        async fn release(&self, _: &RecordKey, _: FencingToken) -> Result<bool, StoreError> {
            unreachable!()
        }
        async fn renew(
            &self,
            _: &RecordKey,
            _: FencingToken,
            _: Duration,
        ) -> Result<bool, StoreError> {
            unreachable!()
        }
        async fn get(&self, _: &RecordKey) -> Result<Option<Record>, StoreError> {
            unreachable!()
        }
        async fn delete(&self, _: &RecordKey) -> Result<bool, StoreError> {
            unreachable!()
        }
        async fn purge_expired(&self) -> Result<u64, StoreError> {
            unreachable!()
        }
        async fn ping(&self) -> Result<(), StoreError> {
            unreachable!()
        }
    }

    #[test]
    fn sealed_responses_hide_everything_but_the_status_and_open_again() {
        let store = Encrypted::new(Nothing, &key());
        let k = RecordKey::new("t", "POST /v1/charges", "k");
        let sealed = store.seal(&k, &response()).unwrap();
        assert_eq!(sealed.status, 201);
        let raw = sealed.encode();
        for secret in [&b"4242424242424242"[..], b"ch_secret", b"req_1"] {
            assert!(
                !raw.windows(secret.len()).any(|w| w == secret),
                "plaintext leaked"
            );
        }
        assert_eq!(store.open(&k, sealed.clone()).unwrap(), response());
        // Bound to its record: moved to another key, it does not open.
        let other = RecordKey::new("t", "POST /v1/charges", "k2");
        assert_eq!(
            store.open(&other, sealed.clone()).unwrap_err().kind(),
            StoreErrorKind::Corrupt
        );
        // Another key does not open it either.
        let wrong = Encrypted::new(Nothing, &EncryptionKey::from_hex(&"24".repeat(32)).unwrap());
        assert!(wrong.open(&k, sealed).is_err());
        // Plaintext records from before encryption are read as they are.
        assert_eq!(store.open(&k, response()).unwrap(), response());
    }

    #[test]
    fn keys_must_be_32_bytes_of_hex() {
        assert!(EncryptionKey::from_hex("abcd").is_err());
        assert!(EncryptionKey::from_hex(&"zz".repeat(32)).is_err());
        assert!(EncryptionKey::from_hex(&"00".repeat(32)).is_ok());
    }
}
