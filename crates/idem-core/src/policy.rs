//! The per-route policy: every setting SPEC names, with its default.

use std::time::Duration;

use http::{HeaderName, Method, StatusCode};
use serde::{Deserialize, Serialize};

use crate::fingerprint::FingerprintMode;
use crate::key::KeyRules;

/// Whether a route wants a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum KeyRequirement {
    /// A request without a key is refused with `idempotency-key-missing` (400).
    Required,
    /// A request without a key passes through unprotected (the default).
    #[default]
    Optional,
    /// Idempotency is off on this route: the key is ignored.
    Off,
}

/// What to do with a duplicate that arrives while the first request still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum OnConcurrent {
    /// Answer 409 `idempotency-key-in-use` with `Retry-After` (the default).
    #[default]
    Reject,
    /// Wait up to `wait_timeout` for the first to finish and replay its result; 409 after.
    Wait,
}

/// What to do when the executor of a key died (its lease expired, no outcome stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum OnAbandoned {
    /// Take the key over and execute again (the default). The dead executor's late
    /// result is refused by its fencing token.
    #[default]
    Reexecute,
    /// Refuse with 409 until the record expires: for operations where a second
    /// execution after an unknown outcome is worse than an error.
    Reject,
}

/// Which outcomes are stored (and replayed) and which release the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum StoreProfile {
    /// Store every outcome except the statuses in `no_store_statuses` (the default).
    #[default]
    Stripe,
    /// Store 2xx only.
    SuccessOnly,
    /// Store everything that reached the handler.
    All,
}

/// Shape of the errors idem produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ErrorFormat {
    /// `application/problem+json` (RFC 9457), the default.
    #[default]
    Problem,
    /// `{"error":{"type":"invalid_request_error","code":"…","message":"…"}}`.
    Provider,
}

/// What to do when the store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum OnStoreError {
    /// 503 `idempotency-store-unavailable` with `Retry-After` (the default).
    #[default]
    Reject,
    /// Serve the request without protection; counted and logged.
    Passthrough,
}

/// The statuses that mean "nothing was executed" under the `stripe` profile.
pub const DEFAULT_NO_STORE_STATUSES: [u16; 12] =
    [400, 401, 403, 404, 405, 408, 409, 413, 415, 422, 429, 503];

/// Response headers never stored nor replayed, whatever the configuration adds.
pub const DEFAULT_DENY_HEADERS: [&str; 3] = ["set-cookie", "set-cookie2", "www-authenticate"];

/// Per-route idempotency policy.
///
/// ```
/// use idem_core::policy::{Policy, OnConcurrent};
/// use std::time::Duration;
/// let p = Policy::default()
///     .with_ttl(Duration::from_secs(72 * 3600))
///     .with_on_concurrent(OnConcurrent::Wait);
/// assert_eq!(p.validate().unwrap().ttl, Duration::from_secs(72 * 3600));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Policy {
    /// Methods whose requests are protected. Default `POST`, `PATCH`. Other methods pass
    /// through untouched even with a key.
    #[serde(with = "serde_http::methods")]
    pub methods: Vec<Method>,
    /// `required`, `optional` (default) or `off`.
    pub key: KeyRequirement,
    /// Header names that carry the key, all accepted. Default `Idempotency-Key`.
    #[serde(with = "serde_http::header_names")]
    pub header_names: Vec<HeaderName>,
    /// Key validation rules.
    pub key_rules: KeyRules,
    /// Fingerprint mode: `json` (default), `raw`, `none`.
    pub fingerprint: FingerprintMode,
    /// Request headers included in the fingerprint (e.g. an API version header).
    #[serde(with = "serde_http::header_names")]
    pub fingerprint_headers: Vec<HeaderName>,
    /// How long a record is kept after completion. Default 24 h.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Lease of an execution: renewed in the background while it runs, lost within
    /// this time after the executor dies. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// `reexecute` (default) or `reject` a key whose executor died.
    pub on_abandoned: OnAbandoned,
    /// `reject` (default, 409) or `wait` for a concurrent duplicate.
    pub on_concurrent: OnConcurrent,
    /// Longest wait in `wait` mode before answering 409. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// `stripe` (default), `success-only` or `all`.
    pub store_profile: StoreProfile,
    /// Statuses that release the key instead of storing it (profile `stripe`).
    pub no_store_statuses: Vec<u16>,
    /// `problem` (default) or `provider`.
    pub error_format: ErrorFormat,
    /// Status for a key reused with another request. Default 422 (Stripe uses 400).
    #[serde(with = "serde_http::status")]
    pub mismatch_status: StatusCode,
    /// Status for a concurrent duplicate. Default 409.
    #[serde(with = "serde_http::status")]
    pub in_use_status: StatusCode,
    /// `Retry-After` seconds on 409 in-use and 503 store-unavailable. Default 1.
    pub retry_after_secs: u32,
    /// Largest request body accepted, in bytes; larger ones get 413 before anything
    /// runs. Default 1 MiB.
    pub max_request_bytes: usize,
    /// Longest time to receive the whole body of a request with a key, counted from
    /// its head; a slower client gets `408 request-body-timeout` and nothing runs.
    /// Bounds what a client stalling mid-body holds. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Largest response body stored for replay, in bytes. A larger response is still
    /// delivered and never executed twice; its replay is a problem. Default 4 MiB.
    pub max_response_bytes: usize,
    /// `reject` (default, 503) or `passthrough` when the store is down.
    pub on_store_error: OnStoreError,
    /// Response headers never stored or replayed, on top of hop-by-hop headers and
    /// [`DEFAULT_DENY_HEADERS`].
    #[serde(with = "serde_http::header_names")]
    pub deny_headers: Vec<HeaderName>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            methods: vec![Method::POST, Method::PATCH],
            key: KeyRequirement::Optional,
            header_names: vec![HeaderName::from_static("idempotency-key")],
            key_rules: KeyRules::default(),
            fingerprint: FingerprintMode::Json,
            fingerprint_headers: Vec::new(),
            ttl: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(30),
            on_abandoned: OnAbandoned::Reexecute,
            on_concurrent: OnConcurrent::Reject,
            wait_timeout: Duration::from_secs(10),
            store_profile: StoreProfile::Stripe,
            no_store_statuses: DEFAULT_NO_STORE_STATUSES.to_vec(),
            error_format: ErrorFormat::Problem,
            mismatch_status: StatusCode::UNPROCESSABLE_ENTITY,
            in_use_status: StatusCode::CONFLICT,
            retry_after_secs: 1,
            max_request_bytes: 1024 * 1024,
            body_read_timeout: Duration::from_secs(30),
            max_response_bytes: 4 * 1024 * 1024,
            on_store_error: OnStoreError::Reject,
            deny_headers: Vec::new(),
        }
    }
}

/// A refused setting: names the field and says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    /// The field, as written in configuration (e.g. `key_rules.max_len`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

fn refuse(field: &str, message: impl Into<String>) -> PolicyError {
    PolicyError {
        field: field.to_owned(),
        message: message.into(),
    }
}

macro_rules! builder {
    ($(#[$doc:meta] $name:ident($field:ident: $ty:ty);)*) => {
        impl Policy {
            $(
                #[$doc]
                #[must_use]
                pub fn $name(mut self, $field: $ty) -> Self {
                    self.$field = $field;
                    self
                }
            )*
        }
    };
}

builder! {
    /// Sets the protected methods.
    with_methods(methods: Vec<Method>);
    /// Sets whether a key is required, optional or ignored.
    with_key(key: KeyRequirement);
    /// Sets the accepted key header names.
    with_header_names(header_names: Vec<HeaderName>);
    /// Sets the key validation rules.
    with_key_rules(key_rules: KeyRules);
    /// Sets the fingerprint mode.
    with_fingerprint(fingerprint: FingerprintMode);
    /// Sets the headers included in the fingerprint.
    with_fingerprint_headers(fingerprint_headers: Vec<HeaderName>);
    /// Sets the retention.
    with_ttl(ttl: Duration);
    /// Sets the lease.
    with_lease(lease: Duration);
    /// Sets the policy for abandoned executions.
    with_on_abandoned(on_abandoned: OnAbandoned);
    /// Sets the policy for concurrent duplicates.
    with_on_concurrent(on_concurrent: OnConcurrent);
    /// Sets the longest wait in `wait` mode.
    with_wait_timeout(wait_timeout: Duration);
    /// Sets the store profile.
    with_store_profile(store_profile: StoreProfile);
    /// Sets the statuses that release instead of store.
    with_no_store_statuses(no_store_statuses: Vec<u16>);
    /// Sets the error format.
    with_error_format(error_format: ErrorFormat);
    /// Sets the status answered on a fingerprint mismatch.
    with_mismatch_status(mismatch_status: StatusCode);
    /// Sets the status answered to a concurrent duplicate.
    with_in_use_status(in_use_status: StatusCode);
    /// Sets the request body cap.
    with_max_request_bytes(max_request_bytes: usize);
    /// Sets the longest time to receive a request body.
    with_body_read_timeout(body_read_timeout: Duration);
    /// Sets the stored response body cap.
    with_max_response_bytes(max_response_bytes: usize);
    /// Sets the store-error policy.
    with_on_store_error(on_store_error: OnStoreError);
    /// Sets extra response headers never replayed.
    with_deny_headers(deny_headers: Vec<HeaderName>);
}

impl Policy {
    /// Checks every setting; the error names the field.
    pub fn validate(self) -> Result<Self, PolicyError> {
        self.check_key_rules()?;
        self.check_methods()?;
        self.check_lease_and_waits()?;
        self.check_statuses()?;
        if self.max_request_bytes == 0 {
            return Err(refuse("max_request_bytes", "must be positive"));
        }
        if self.body_read_timeout.is_zero() {
            return Err(refuse("body_read_timeout", "must be positive"));
        }
        Ok(self)
    }

    fn check_key_rules(&self) -> Result<(), PolicyError> {
        let r = &self.key_rules;
        if r.min_len == 0 {
            return Err(refuse("key_rules.min_len", "must be at least 1"));
        }
        if r.max_len < r.min_len {
            return Err(refuse(
                "key_rules.max_len",
                format!(
                    "{} is smaller than key_rules.min_len ({})",
                    r.max_len, r.min_len
                ),
            ));
        }
        if r.max_len > 4096 {
            return Err(refuse("key_rules.max_len", "must be at most 4096"));
        }
        if self.header_names.is_empty() {
            return Err(refuse("header_names", "must name at least one header"));
        }
        Ok(())
    }

    fn check_methods(&self) -> Result<(), PolicyError> {
        if self.methods.is_empty() && self.key != KeyRequirement::Off {
            return Err(refuse(
                "methods",
                "must name at least one method (or set key = \"off\")",
            ));
        }
        if let Some(m) = self
            .methods
            .iter()
            .find(|m| [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE].contains(m))
        {
            return Err(refuse(
                "methods",
                format!("{m} is safe by definition and cannot be protected"),
            ));
        }
        Ok(())
    }

    fn check_lease_and_waits(&self) -> Result<(), PolicyError> {
        if self.lease < Duration::from_millis(100) {
            return Err(refuse("lease", "must be at least 100ms"));
        }
        if self.ttl < self.lease {
            return Err(refuse("ttl", "must be at least as long as lease"));
        }
        if self.on_concurrent == OnConcurrent::Wait && self.wait_timeout.is_zero() {
            return Err(refuse(
                "wait_timeout",
                "must be positive when on_concurrent = \"wait\"",
            ));
        }
        Ok(())
    }

    fn check_statuses(&self) -> Result<(), PolicyError> {
        if let Some(s) = self
            .no_store_statuses
            .iter()
            .find(|s| !(100..=599).contains(*s))
        {
            return Err(refuse(
                "no_store_statuses",
                format!("{s} is not an HTTP status"),
            ));
        }
        if !self.mismatch_status.is_client_error() {
            return Err(refuse("mismatch_status", "must be a 4xx status"));
        }
        if !self.in_use_status.is_client_error() {
            return Err(refuse("in_use_status", "must be a 4xx status"));
        }
        Ok(())
    }

    /// Whether an outcome with this status is stored (else the key is released).
    pub fn should_store(&self, status: StatusCode) -> bool {
        match self.store_profile {
            StoreProfile::Stripe => !self.no_store_statuses.contains(&status.as_u16()),
            StoreProfile::SuccessOnly => status.is_success(),
            StoreProfile::All => true,
        }
    }

    /// Whether the method is protected on this route.
    pub fn protects(&self, method: &Method) -> bool {
        self.key != KeyRequirement::Off && self.methods.contains(method)
    }

    /// Whether a response header may be stored and replayed.
    pub fn replays_header(&self, name: &HeaderName) -> bool {
        !is_hop_by_hop(name)
            && !DEFAULT_DENY_HEADERS.contains(&name.as_str())
            && !self.deny_headers.contains(name)
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), which belong to one connection and are never
/// stored or forwarded.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Serde helpers for `http` types as configuration strings.
pub mod serde_http {
    /// `Vec<HeaderName>` as a list of strings.
    pub mod header_names {
        use http::HeaderName;
        use serde::{Deserialize, Deserializer, Serializer, de::Error};

        /// Serializes.
        pub fn serialize<S: Serializer>(v: &[HeaderName], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(v.iter().map(HeaderName::as_str))
        }

        /// Deserializes, refusing invalid names.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<HeaderName>, D::Error> {
            Vec::<String>::deserialize(d)?
                .into_iter()
                .map(|s| {
                    HeaderName::try_from(s.as_str())
                        .map_err(|_| D::Error::custom(format!("{s:?} is not a valid header name")))
                })
                .collect()
        }
    }

    /// `StatusCode` as a number; one outside 100..=999 is refused here, one outside
    /// the range a setting allows by [`Policy::validate`](super::Policy::validate).
    pub mod status {
        use http::StatusCode;
        use serde::{Deserialize, Deserializer, Serializer, de::Error};

        /// Serializes as the number.
        pub fn serialize<S: Serializer>(v: &StatusCode, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_u16(v.as_u16())
        }

        /// Deserializes, refusing a number that is no status.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<StatusCode, D::Error> {
            let n = u16::deserialize(d)?;
            StatusCode::from_u16(n)
                .map_err(|_| D::Error::custom(format!("{n} is not an HTTP status")))
        }
    }

    /// `Vec<Method>` as a list of strings.
    pub mod methods {
        use http::Method;
        use serde::{Deserialize, Deserializer, Serializer, de::Error};

        /// Serializes.
        pub fn serialize<S: Serializer>(v: &[Method], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(v.iter().map(Method::as_str))
        }

        /// Deserializes, upper-casing and refusing invalid methods.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Method>, D::Error> {
            Vec::<String>::deserialize(d)?
                .into_iter()
                .map(|s| {
                    Method::from_bytes(s.to_ascii_uppercase().as_bytes())
                        .map_err(|_| D::Error::custom(format!("{s:?} is not a valid method")))
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_spec() {
        let p = Policy::default().validate().unwrap();
        assert_eq!(p.methods, vec![Method::POST, Method::PATCH]);
        assert_eq!(p.ttl, Duration::from_secs(86400));
        assert_eq!(p.mismatch_status, 422);
        assert!(!p.should_store(StatusCode::BAD_REQUEST));
        assert!(!p.should_store(StatusCode::SERVICE_UNAVAILABLE));
        assert!(p.should_store(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(p.should_store(StatusCode::CREATED));
        assert!(p.protects(&Method::POST));
        assert!(!p.protects(&Method::PUT));
        assert!(!p.protects(&Method::DELETE));
        assert!(!p.replays_header(&http::header::SET_COOKIE));
        assert!(!p.replays_header(&http::header::TRANSFER_ENCODING));
        assert!(p.replays_header(&http::header::LOCATION));
    }

    #[test]
    fn profiles() {
        let s = Policy::default().with_store_profile(StoreProfile::SuccessOnly);
        assert!(!s.should_store(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(s.should_store(StatusCode::CREATED));
        let a = Policy::default().with_store_profile(StoreProfile::All);
        assert!(a.should_store(StatusCode::CONFLICT));
    }

    #[test]
    fn every_refused_value_names_its_field() {
        let cases: Vec<(Policy, &str)> = vec![
            (
                Policy::default().with_key_rules(KeyRules {
                    min_len: 0,
                    ..KeyRules::default()
                }),
                "key_rules.min_len",
            ),
            (
                Policy::default().with_key_rules(KeyRules {
                    min_len: 10,
                    max_len: 5,
                    ..KeyRules::default()
                }),
                "key_rules.max_len",
            ),
            (
                Policy::default().with_key_rules(KeyRules {
                    max_len: 5000,
                    ..KeyRules::default()
                }),
                "key_rules.max_len",
            ),
            (Policy::default().with_header_names(vec![]), "header_names"),
            (Policy::default().with_methods(vec![]), "methods"),
            (Policy::default().with_methods(vec![Method::GET]), "methods"),
            (
                Policy::default().with_lease(Duration::from_millis(1)),
                "lease",
            ),
            (Policy::default().with_ttl(Duration::from_secs(1)), "ttl"),
            (
                Policy::default()
                    .with_on_concurrent(OnConcurrent::Wait)
                    .with_wait_timeout(Duration::ZERO),
                "wait_timeout",
            ),
            (
                Policy::default().with_no_store_statuses(vec![700]),
                "no_store_statuses",
            ),
            (
                Policy::default().with_mismatch_status(StatusCode::OK),
                "mismatch_status",
            ),
            (
                Policy::default().with_in_use_status(StatusCode::SERVICE_UNAVAILABLE),
                "in_use_status",
            ),
            (
                Policy::default().with_max_request_bytes(0),
                "max_request_bytes",
            ),
        ];
        for (policy, field) in cases {
            assert_eq!(policy.validate().unwrap_err().field, field);
        }
    }

    #[test]
    fn deserializes_with_defaults_and_refuses_unknown_fields() {
        let p: Policy = serde_json::from_str(
            r#"{"ttl":"72h","methods":["post","put"],"header_names":["X-Idempotency-Key"]}"#,
        )
        .unwrap();
        assert_eq!(p.ttl, Duration::from_secs(72 * 3600));
        assert_eq!(p.methods, vec![Method::POST, Method::PUT]);
        assert_eq!(p.header_names[0].as_str(), "x-idempotency-key");
        assert_eq!(p.lease, Duration::from_secs(30));
        let err = serde_json::from_str::<Policy>(r#"{"tll":"1h"}"#).unwrap_err();
        assert!(err.to_string().contains("tll"), "{err}");
        let err = serde_json::from_str::<Policy>(r#"{"header_names":["bad header"]}"#).unwrap_err();
        assert!(err.to_string().contains("bad header"), "{err}");
    }
}
