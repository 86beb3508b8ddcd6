//! The refusals idem produces, and how they render (SPEC §7).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::key::KeyError;
use crate::policy::ErrorFormat;

/// Prefix of every problem `type` URI: `urn:idem:problem:<slug>`.
pub const PROBLEM_TYPE_PREFIX: &str = "urn:idem:problem:";

/// Every problem idem answers on a request's path: one list owning each problem's
/// slug, title, usual status and metrics label, so that a problem cannot be built with
/// a slug the metrics do not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemKind {
    /// The route requires a key and the request has none ([`Rejection::KeyMissing`]).
    KeyMissing,
    /// The key is malformed or breaks the route's rules ([`Rejection::KeyInvalid`]).
    KeyInvalid,
    /// The key was used with another request ([`Rejection::KeyReused`]).
    KeyReused,
    /// Another request with this key is still running ([`Rejection::InUse`]).
    KeyInUse,
    /// The request that held the key died and the route refuses to run it again
    /// ([`Rejection::Abandoned`]).
    OutcomeUnknown,
    /// The stored record cannot be read ([`Rejection::RecordUnreadable`]).
    RecordUnreadable,
    /// The store cannot be reached ([`Rejection::StoreUnavailable`]).
    StoreUnavailable,
    /// The request body exceeds `max_request_bytes` ([`Rejection::RequestTooLarge`]).
    RequestTooLarge,
    /// The caller's tenant holds as many records as it may
    /// ([`Rejection::TenantLimitReached`]).
    TenantLimitReached,
    /// The request body did not arrive within `body_read_timeout`
    /// ([`Rejection::BodyTimeout`]).
    BodyTimeout,
    /// The request body could not be read to its end ([`Rejection::BodyUnreadable`]).
    BodyUnreadable,
    /// The handler panicked after the key was claimed: its outcome is unknown.
    HandlerFailed,
    /// A replay of an outcome whose body was too large to be stored.
    ResponseNotReplayable,
    /// A replay of an outcome whose body broke off before its end.
    ResponseIncomplete,
    /// The proxy could not reach its upstream: nothing was sent.
    UpstreamUnreachable,
    /// The proxy sent the request but lost the upstream's answer.
    UpstreamOutcomeUnknown,
}

impl ProblemKind {
    /// The problem slug (last part of `type`).
    pub const fn slug(self) -> &'static str {
        match self {
            ProblemKind::KeyMissing => "idempotency-key-missing",
            ProblemKind::KeyInvalid => "idempotency-key-invalid",
            ProblemKind::KeyReused => "idempotency-key-reused",
            ProblemKind::KeyInUse => "idempotency-key-in-use",
            ProblemKind::OutcomeUnknown => "idempotency-outcome-unknown",
            ProblemKind::RecordUnreadable => "idempotency-record-unreadable",
            ProblemKind::StoreUnavailable => "idempotency-store-unavailable",
            ProblemKind::RequestTooLarge => "request-too-large",
            ProblemKind::TenantLimitReached => "tenant-limit-reached",
            ProblemKind::BodyTimeout => "request-body-timeout",
            ProblemKind::BodyUnreadable => "request-body-unreadable",
            ProblemKind::HandlerFailed => "handler-failed",
            ProblemKind::ResponseNotReplayable => "idempotency-response-not-replayable",
            ProblemKind::ResponseIncomplete => "idempotency-response-incomplete",
            ProblemKind::UpstreamUnreachable => "upstream-unreachable",
            ProblemKind::UpstreamOutcomeUnknown => "upstream-outcome-unknown",
        }
    }

    /// The problem's short summary (`title`).
    pub const fn title(self) -> &'static str {
        match self {
            ProblemKind::KeyMissing => "Idempotency key missing",
            ProblemKind::KeyInvalid => "Invalid idempotency key",
            ProblemKind::KeyReused => "Idempotency key reused",
            ProblemKind::KeyInUse => "Idempotency key in use",
            ProblemKind::OutcomeUnknown => "Outcome unknown",
            ProblemKind::RecordUnreadable => "Idempotency record unreadable",
            ProblemKind::StoreUnavailable => "Idempotency store unavailable",
            ProblemKind::RequestTooLarge => "Request too large",
            ProblemKind::TenantLimitReached => "Too many idempotency keys",
            ProblemKind::BodyTimeout => "Request body too slow",
            ProblemKind::BodyUnreadable => "Request body unreadable",
            ProblemKind::HandlerFailed => "Handler failed",
            ProblemKind::ResponseNotReplayable => "Response not replayable",
            ProblemKind::ResponseIncomplete => "Response incomplete",
            ProblemKind::UpstreamUnreachable => "Upstream unreachable",
            ProblemKind::UpstreamOutcomeUnknown => "Upstream outcome unknown",
        }
    }

    /// The status a problem of this kind has unless the route or the occurrence says
    /// otherwise (a configured `mismatch_status`, a replay's original status, a 504
    /// for an upstream that did not answer in time).
    pub const fn status(self) -> StatusCode {
        match self {
            ProblemKind::KeyMissing | ProblemKind::KeyInvalid | ProblemKind::BodyUnreadable => {
                StatusCode::BAD_REQUEST
            }
            ProblemKind::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ProblemKind::KeyInUse | ProblemKind::OutcomeUnknown => StatusCode::CONFLICT,
            ProblemKind::RecordUnreadable
            | ProblemKind::HandlerFailed
            | ProblemKind::ResponseNotReplayable
            | ProblemKind::ResponseIncomplete => StatusCode::INTERNAL_SERVER_ERROR,
            ProblemKind::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ProblemKind::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProblemKind::TenantLimitReached => StatusCode::TOO_MANY_REQUESTS,
            ProblemKind::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProblemKind::UpstreamUnreachable | ProblemKind::UpstreamOutcomeUnknown => {
                StatusCode::BAD_GATEWAY
            }
        }
    }

    /// The `outcome` label of `idem_requests_total` for a request refused with this
    /// problem. Refusals without a label of their own share `rejected`, which the
    /// admin page and dashboards already group.
    pub const fn metric_label(self) -> &'static str {
        match self {
            ProblemKind::KeyInUse => "in_use",
            ProblemKind::KeyReused => "reused",
            ProblemKind::KeyInvalid => "invalid",
            ProblemKind::KeyMissing => "missing",
            ProblemKind::StoreUnavailable | ProblemKind::RecordUnreadable => "store_error",
            ProblemKind::RequestTooLarge => "too_large",
            ProblemKind::OutcomeUnknown => "abandoned",
            ProblemKind::TenantLimitReached
            | ProblemKind::BodyTimeout
            | ProblemKind::BodyUnreadable
            | ProblemKind::HandlerFailed
            | ProblemKind::ResponseNotReplayable
            | ProblemKind::ResponseIncomplete
            | ProblemKind::UpstreamUnreachable
            | ProblemKind::UpstreamOutcomeUnknown => "rejected",
        }
    }
}

/// Which of a tenant's caps ([`TenantLimits`](crate::TenantLimits)) refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TenantCap {
    /// The cap on records in flight (requests still running).
    InFlight,
    /// The cap on live records (in flight or kept for replay).
    Records,
}

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
        /// The route's `max_request_bytes`.
        limit: usize,
    },
    /// The caller already holds as many records as its tenant may (in flight, or in
    /// all): nothing was executed or stored.
    #[error("{}", match cap {
        TenantCap::InFlight => "too many requests with idempotency keys are in progress for this caller; retry when some have finished",
        TenantCap::Records => "this caller holds too many idempotency keys; retry when older ones have expired",
    })]
    TenantLimitReached {
        /// The cap that was reached.
        cap: TenantCap,
        /// `Retry-After` seconds.
        retry_after: u32,
    },
    /// The request body did not arrive within the route's `body_read_timeout`: nothing
    /// was executed, and the rest of the body may still be on its way.
    #[error("the request body did not arrive within {} s; nothing was executed", after.as_secs_f64())]
    BodyTimeout {
        /// The route's `body_read_timeout`.
        after: Duration,
    },
    /// The request body could not be read to its end (the client or the connection
    /// failed): nothing was executed.
    #[error("the request body could not be read to the end; nothing was executed")]
    BodyUnreadable,
}

impl Rejection {
    /// The kind of problem this rejection is.
    pub fn kind(&self) -> ProblemKind {
        match self {
            Rejection::KeyMissing => ProblemKind::KeyMissing,
            Rejection::KeyInvalid(_) => ProblemKind::KeyInvalid,
            Rejection::KeyReused { .. } => ProblemKind::KeyReused,
            Rejection::InUse { .. } => ProblemKind::KeyInUse,
            Rejection::Abandoned => ProblemKind::OutcomeUnknown,
            Rejection::RecordUnreadable => ProblemKind::RecordUnreadable,
            Rejection::StoreUnavailable { .. } => ProblemKind::StoreUnavailable,
            Rejection::RequestTooLarge { .. } => ProblemKind::RequestTooLarge,
            Rejection::TenantLimitReached { .. } => ProblemKind::TenantLimitReached,
            Rejection::BodyTimeout { .. } => ProblemKind::BodyTimeout,
            Rejection::BodyUnreadable => ProblemKind::BodyUnreadable,
        }
    }

    /// The HTTP status of this rejection: the route's configured one where SPEC lets
    /// it be configured, else its kind's.
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::KeyReused { status } | Rejection::InUse { status, .. } => *status,
            other => other.kind().status(),
        }
    }

    /// The problem slug (last part of `type`).
    pub fn slug(&self) -> &'static str {
        self.kind().slug()
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
        Problem::of(self.kind(), self.to_string())
            .with_status(self.status())
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
    /// A problem with no extension and no `Retry-After`, for problems outside the
    /// request path's list (the admin API's); see [`Problem::of`] for the others.
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

    /// A problem of a known kind, with the kind's status, slug and title.
    pub fn of(kind: ProblemKind, detail: impl Into<String>) -> Self {
        Problem::new(kind.status(), kind.slug(), kind.title(), detail)
    }

    /// Replaces the status (a configured one, or a replay's original status).
    #[must_use]
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
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
            cap: TenantCap::InFlight,
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

    /// The `outcome` label values dashboards and the admin page already use: each
    /// refusal keeps the one it had when labels were read off slugs.
    #[test]
    fn metric_labels_keep_their_values() {
        for (kind, slug, label) in [
            (ProblemKind::KeyInUse, "idempotency-key-in-use", "in_use"),
            (ProblemKind::KeyReused, "idempotency-key-reused", "reused"),
            (
                ProblemKind::KeyInvalid,
                "idempotency-key-invalid",
                "invalid",
            ),
            (
                ProblemKind::KeyMissing,
                "idempotency-key-missing",
                "missing",
            ),
            (
                ProblemKind::StoreUnavailable,
                "idempotency-store-unavailable",
                "store_error",
            ),
            (
                ProblemKind::RecordUnreadable,
                "idempotency-record-unreadable",
                "store_error",
            ),
            (
                ProblemKind::RequestTooLarge,
                "request-too-large",
                "too_large",
            ),
            (
                ProblemKind::OutcomeUnknown,
                "idempotency-outcome-unknown",
                "abandoned",
            ),
            (
                ProblemKind::TenantLimitReached,
                "tenant-limit-reached",
                "rejected",
            ),
            (ProblemKind::BodyTimeout, "request-body-timeout", "rejected"),
            (
                ProblemKind::BodyUnreadable,
                "request-body-unreadable",
                "rejected",
            ),
        ] {
            assert_eq!((kind.slug(), kind.metric_label()), (slug, label));
        }
    }

    #[test]
    fn body_rejections_keep_their_shape() {
        let r = Rejection::BodyTimeout {
            after: Duration::from_secs(30),
        };
        let res = r.to_response(ErrorFormat::Problem);
        assert_eq!(res.status(), 408);
        assert!(res.headers().get("retry-after").is_none());
        let doc = json(&res);
        assert_eq!(doc["type"], "urn:idem:problem:request-body-timeout");
        assert_eq!(doc["title"], "Request body too slow");
        assert_eq!(
            doc["detail"],
            "the request body did not arrive within 30 s; nothing was executed"
        );
        let res = Rejection::BodyUnreadable.to_response(ErrorFormat::Problem);
        assert_eq!(res.status(), 400);
        assert_eq!(
            json(&res)["type"],
            "urn:idem:problem:request-body-unreadable"
        );
    }
}
