//! The refusals idem produces, and how they render (SPEC §7).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::key::KeyError;
use crate::policy::ErrorFormat;

/// Prefix of every problem `type` URI: `urn:idem:problem:<slug>`.
pub const PROBLEM_TYPE_PREFIX: &str = "urn:idem:problem:";

/// A request idem refuses before (or instead of) executing it. Nothing is stored for
/// a rejection, so the request is always safe to retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The route requires a key and the request has none.
    #[error("this request requires an idempotency key")]
    KeyMissing,
    /// The key is malformed or breaks the route's rules.
    #[error("invalid idempotency key: {0}")]
    KeyInvalid(#[source] KeyError),
    /// The key was used with another request (other fingerprint).
    #[error("this idempotency key was already used with a different request")]
    KeyReused {
        /// Configured status (default 422).
        status: StatusCode,
    },
    /// Another request with this key is still running.
    #[error("a request with this idempotency key is still being processed")]
    InUse {
        /// Configured status (default 409).
        status: StatusCode,
        /// `Retry-After` seconds.
        retry_after: u32,
    },
    /// The request that held this key died and the route refuses to execute again
    /// (`on_abandoned = "reject"`): the outcome is unknown until the record expires.
    #[error("the request that used this idempotency key did not finish; its outcome is unknown")]
    Abandoned,
    /// The store holds a record for this key that cannot be read (corrupt, or sealed
    /// with an encryption key that is no longer configured). Nothing was executed, and
    /// nothing will be until the record is repaired or deleted.
    #[error("the stored outcome for this idempotency key cannot be read; nothing was executed")]
    RecordUnreadable,
    /// The store cannot be reached.
    #[error("the idempotency store is unavailable")]
    StoreUnavailable {
        /// `Retry-After` seconds.
        retry_after: u32,
    },
    /// The request body exceeds `max_request_bytes`.
    #[error("the request body exceeds the limit of {limit} bytes")]
    RequestTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The caller already holds as many records as its tenant may (in flight, or in
    /// all): nothing was executed or stored.
    #[error("{}", if *in_flight {
        "too many requests with idempotency keys are in progress for this caller; retry when some have finished"
    } else {
        "this caller holds too many idempotency keys; retry when older ones have expired"
    })]
    TenantLimitReached {
        /// True for the in-flight cap, false for the cap on live records.
        in_flight: bool,
        /// `Retry-After` seconds.
        retry_after: u32,
    },
}

impl Rejection {
    /// The HTTP status of this rejection.
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::KeyMissing | Rejection::KeyInvalid(_) => StatusCode::BAD_REQUEST,
            Rejection::KeyReused { status } | Rejection::InUse { status, .. } => *status,
            Rejection::Abandoned => StatusCode::CONFLICT,
            Rejection::RecordUnreadable => StatusCode::INTERNAL_SERVER_ERROR,
            Rejection::StoreUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Rejection::RequestTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::TenantLimitReached { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The problem slug (last part of `type`).
    pub fn slug(&self) -> &'static str {
        match self {
            Rejection::KeyMissing => "idempotency-key-missing",
            Rejection::KeyInvalid(_) => "idempotency-key-invalid",
            Rejection::KeyReused { .. } => "idempotency-key-reused",
            Rejection::InUse { .. } => "idempotency-key-in-use",
            Rejection::Abandoned => "idempotency-outcome-unknown",
            Rejection::RecordUnreadable => "idempotency-record-unreadable",
            Rejection::StoreUnavailable { .. } => "idempotency-store-unavailable",
            Rejection::RequestTooLarge { .. } => "request-too-large",
            Rejection::TenantLimitReached { .. } => "tenant-limit-reached",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Rejection::KeyMissing => "Idempotency key missing",
            Rejection::KeyInvalid(_) => "Invalid idempotency key",
            Rejection::KeyReused { .. } => "Idempotency key reused",
            Rejection::InUse { .. } => "Idempotency key in use",
            Rejection::Abandoned => "Outcome unknown",
            Rejection::RecordUnreadable => "Idempotency record unreadable",
            Rejection::StoreUnavailable { .. } => "Idempotency store unavailable",
            Rejection::RequestTooLarge { .. } => "Request too large",
            Rejection::TenantLimitReached { .. } => "Too many idempotency keys",
        }
    }

    /// `Retry-After` seconds, where SPEC gives one.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            Rejection::InUse { retry_after, .. }
            | Rejection::StoreUnavailable { retry_after }
            | Rejection::TenantLimitReached { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Renders the rejection in the route's error format.
    pub fn to_response(&self, format: ErrorFormat) -> Response<Bytes> {
        Problem::new(self.status(), self.slug(), self.title(), self.to_string())
            .with_retry_after(self.retry_after())
            .to_response(format)
    }
}

/// A problem document (RFC 9457), also renderable in the provider error style.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// HTTP status.
    pub status: StatusCode,
    /// Slug, appended to [`PROBLEM_TYPE_PREFIX`].
    pub slug: &'static str,
    /// Short summary.
    pub title: &'static str,
    /// Explanation of this occurrence.
    pub detail: String,
    /// `Retry-After` seconds.
    pub retry_after: Option<u32>,
    /// Extension members.
    pub extensions: serde_json::Map<String, serde_json::Value>,
}

impl Problem {
    /// A problem with no extension and no `Retry-After`.
    pub fn new(
        status: StatusCode,
        slug: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Problem {
            status,
            slug,
            title,
            detail: detail.into(),
            retry_after: None,
            extensions: serde_json::Map::new(),
        }
    }

    /// Sets `Retry-After`.
    #[must_use]
    pub fn with_retry_after(mut self, secs: Option<u32>) -> Self {
        self.retry_after = secs;
        self
    }

    /// Adds an extension member.
    #[must_use]
    pub fn with_extension(mut self, name: &str, value: impl Into<serde_json::Value>) -> Self {
        self.extensions.insert(name.to_owned(), value.into());
        self
    }

    /// Renders the problem.
    pub fn to_response(&self, format: ErrorFormat) -> Response<Bytes> {
        let (content_type, body) = match format {
            ErrorFormat::Problem => {
                let mut doc = serde_json::Map::new();
                doc.insert(
                    "type".into(),
                    format!("{PROBLEM_TYPE_PREFIX}{}", self.slug).into(),
                );
                doc.insert("title".into(), self.title.into());
                doc.insert("status".into(), self.status.as_u16().into());
                doc.insert("detail".into(), self.detail.clone().into());
                doc.extend(self.extensions.clone());
                ("application/problem+json", serde_json::Value::Object(doc))
            }
            ErrorFormat::Provider => {
                let kind = if self.status.is_server_error() {
                    "api_error"
                } else if self.status == StatusCode::TOO_MANY_REQUESTS {
                    "rate_limit_error"
                } else {
                    "invalid_request_error"
                };
                let code = match self.slug {
                    "idempotency-key-reused" => "idempotency_key_conflict".to_owned(),
                    other => other.replace('-', "_"),
                };
                let mut err = serde_json::Map::new();
                err.insert("type".into(), kind.into());
                err.insert("code".into(), code.into());
                err.insert("message".into(), self.detail.clone().into());
                err.extend(self.extensions.clone());
                ("application/json", serde_json::json!({ "error": err }))
            }
        };
        let mut res = Response::new(Bytes::from(body.to_string()));
        *res.status_mut() = self.status;
        res.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let Some(secs) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(res: &Response<Bytes>) -> serde_json::Value {
        serde_json::from_slice(res.body()).unwrap()
    }

    #[test]
    fn in_use_is_a_409_problem_with_retry_after() {
        let r = Rejection::InUse {
            status: StatusCode::CONFLICT,
            retry_after: 2,
        };
        assert_eq!(r.status(), StatusCode::CONFLICT);
        let res = r.to_response(ErrorFormat::Problem);
        assert_eq!(res.status(), 409);
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        assert_eq!(res.headers()["retry-after"], "2");
        let doc = json(&res);
        assert_eq!(doc["type"], "urn:idem:problem:idempotency-key-in-use");
        assert_eq!(doc["status"], 409);
        assert!(doc["title"].is_string() && doc["detail"].is_string());
    }

    #[test]
    fn provider_style() {
        let res = Rejection::KeyReused {
            status: StatusCode::BAD_REQUEST,
        }
        .to_response(ErrorFormat::Provider);
        assert_eq!(res.status(), 400);
        let doc = json(&res);
        assert_eq!(doc["error"]["type"], "invalid_request_error");
        assert_eq!(doc["error"]["code"], "idempotency_key_conflict");
        assert!(doc["error"]["message"].is_string());
        let res = Rejection::TenantLimitReached {
            in_flight: true,
            retry_after: 2,
        }
        .to_response(ErrorFormat::Provider);
        assert_eq!(res.status(), 429);
        assert_eq!(res.headers()["retry-after"], "2");
        let doc = json(&res);
        assert_eq!(doc["error"]["type"], "rate_limit_error");
        assert_eq!(doc["error"]["code"], "tenant_limit_reached");
        let res = Rejection::StoreUnavailable { retry_after: 1 }.to_response(ErrorFormat::Provider);
        assert_eq!(json(&res)["error"]["type"], "api_error");
        assert_eq!(res.headers()["retry-after"], "1");
    }

    #[test]
    fn statuses() {
        assert_eq!(Rejection::KeyMissing.status(), 400);
        assert_eq!(Rejection::KeyInvalid(KeyError::NotUuidV4).status(), 400);
        assert_eq!(Rejection::RequestTooLarge { limit: 1 }.status(), 413);
        assert_eq!(Rejection::StoreUnavailable { retry_after: 1 }.status(), 503);
        assert_eq!(
            Rejection::KeyReused {
                status: StatusCode::UNPROCESSABLE_ENTITY
            }
            .status(),
            422
        );
    }
}
