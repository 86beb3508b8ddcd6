//! Which answers are final and which are worth another attempt (SPEC §9).

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode, header};

use crate::key::IDEMPOTENT_REPLAYED;

/// What to do with an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The operation's answer: hand it to the caller (success or error).
    Final,
    /// Try again, not before `retry_after` when the server said so.
    Retry {
        /// Why, for the logs.
        reason: &'static str,
        /// The server's `Retry-After`.
        retry_after: Option<Duration>,
    },
}

/// Decides from the status and headers alone, so that nothing is read from a body
/// that will be thrown away:
/// - a replay (`Idempotent-Replayed: true`) is final whatever its status: it is the
///   original answer, and asking again returns it again;
/// - 1xx, 2xx, 3xx are final;
/// - 400 and 422 are final (the request is wrong, or the key was reused with another
///   request): sending it again cannot change that;
/// - 409 with `Retry-After` is idem's `idempotency-key-in-use` (the first attempt is
///   still running): retried after the wait; 409 without it is a final conflict;
/// - any other 4xx is retried only when the server sent `Retry-After` (429, 503-style
///   throttling), else final;
/// - 5xx that is not a replay is retried (nothing was stored, or the server is down).
pub(crate) fn classify(status: StatusCode, headers: &HeaderMap, now: SystemTime) -> Verdict {
    if is_replay(headers) {
        return Verdict::Final;
    }
    let retry_after = headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, now));
    match status.as_u16() {
        400 | 422 => Verdict::Final,
        409 if retry_after.is_some() => Verdict::Retry {
            reason: "idempotency key in use",
            retry_after,
        },
        400..=499 if retry_after.is_some() => Verdict::Retry {
            reason: "client error with Retry-After",
            retry_after,
        },
        500..=599 => Verdict::Retry {
            reason: "server error",
            retry_after,
        },
        _ => Verdict::Final,
    }
}

/// Whether the answer is a replay of a stored outcome.
pub(crate) fn is_replay(headers: &HeaderMap) -> bool {
    headers
        .get(IDEMPOTENT_REPLAYED)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// `Retry-After` as delta-seconds or an HTTP-date (RFC 9110 §10.2.3); a date in the
/// past means "now". `None` when unreadable.
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Absurdly large values saturate; the time budget bounds the wait anyway.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Whether an error body is idem's "key reused with another request": the problem
/// type `urn:idem:problem:idempotency-key-reused`, or the provider-style code
/// `idempotency_key_conflict` (which some servers send with 400).
pub(crate) fn is_key_reused(body: &[u8]) -> bool {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    doc["type"] == "urn:idem:problem:idempotency-key-reused"
        || doc["error"]["code"] == "idempotency_key_conflict"
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn verdict(status: u16, pairs: &[(&'static str, &'static str)]) -> Verdict {
        classify(
            StatusCode::from_u16(status).unwrap(),
            &headers(pairs),
            SystemTime::now(),
        )
    }

    fn retries(status: u16, pairs: &[(&'static str, &'static str)]) -> bool {
        matches!(verdict(status, pairs), Verdict::Retry { .. })
    }

    #[test]
    fn success_and_redirects_are_final() {
        for s in [200, 201, 204, 301, 304] {
            assert_eq!(verdict(s, &[]), Verdict::Final, "{s}");
        }
    }

    #[test]
    fn never_retries_400_or_422_even_with_retry_after() {
        for s in [400, 422] {
            assert!(!retries(s, &[]), "{s}");
            assert!(!retries(s, &[("retry-after", "1")]), "{s}");
        }
    }

    #[test]
    fn other_4xx_only_with_retry_after() {
        for s in [401, 403, 404, 408, 409, 413, 429] {
            assert!(!retries(s, &[]), "{s} without Retry-After");
            assert!(retries(s, &[("retry-after", "2")]), "{s} with Retry-After");
        }
        assert_eq!(
            verdict(409, &[("retry-after", "1")]),
            Verdict::Retry {
                reason: "idempotency key in use",
                retry_after: Some(Duration::from_secs(1))
            }
        );
    }

    #[test]
    fn server_errors_are_retried_unless_replayed() {
        for s in [500, 502, 503, 504] {
            assert!(retries(s, &[]), "{s}");
            assert!(!retries(s, &[("idempotent-replayed", "true")]), "{s}");
        }
        assert!(retries(500, &[("idempotent-replayed", "false")]));
        assert_eq!(
            verdict(503, &[("retry-after", "3")]),
            Verdict::Retry {
                reason: "server error",
                retry_after: Some(Duration::from_secs(3))
            }
        );
    }

    #[test]
    fn a_replay_is_final_whatever_its_status() {
        for s in [201, 409, 429, 500, 503] {
            assert_eq!(
                verdict(s, &[("idempotent-replayed", "True"), ("retry-after", "1")]),
                Verdict::Final,
                "{s}"
            );
        }
    }

    #[test]
    fn retry_after_delta_seconds_and_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("0", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("", now), None);
        assert!(parse_retry_after("99999999999999999999999", now).is_some());
    }

    #[test]
    fn unreadable_retry_after_counts_as_absent() {
        assert!(!retries(429, &[("retry-after", "soon")]));
        assert_eq!(
            verdict(503, &[("retry-after", "soon")]),
            Verdict::Retry {
                reason: "server error",
                retry_after: None
            }
        );
    }

    #[test]
    fn key_reused_in_both_error_formats() {
        assert!(is_key_reused(
            br#"{"type":"urn:idem:problem:idempotency-key-reused","status":422}"#
        ));
        assert!(is_key_reused(
            br#"{"error":{"type":"invalid_request_error","code":"idempotency_key_conflict"}}"#
        ));
        assert!(!is_key_reused(br#"{"error":"amount must be positive"}"#));
        assert!(!is_key_reused(b"not json"));
    }
}
