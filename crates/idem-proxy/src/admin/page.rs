//! The admin page: its assets (compiled into the binary, no build step), the list of
//! records in flight, and the running configuration with its secrets masked.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use idem_core::InFlightRecord;
use idem_core::record::now_millis;
use serde_json::{Value, json};

use crate::config::Settings;

/// The page (its login form shows when the browser has no session).
pub(super) const INDEX_HTML: &str = include_str!("assets/index.html");
/// The page's script.
pub(super) const APP_JS: &str = include_str!("assets/app.js");
/// The page's style.
pub(super) const APP_CSS: &str = include_str!("assets/app.css");

/// Serves a static asset. The page loads nothing from elsewhere: its policy says so.
pub(super) fn asset(body: &'static str, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    *res.status_mut() = StatusCode::OK;
    res
}

/// Records in flight as the page shows them: oldest first, with ages and leases.
pub(super) fn in_flight_doc(records: &[InFlightRecord]) -> Value {
    let now = now_millis();
    let rows: Vec<Value> = records
        .iter()
        .map(|r| {
            json!({
                "tenant": r.key.tenant,
                "route": r.key.route,
                "key": r.key.key,
                "created_at": r.created_at,
                "age_ms": now.saturating_sub(r.created_at),
                "lease_expires_at": r.lease_expires_at,
                "lease_left_ms": r.lease_expires_at as i64 - now as i64,
                "abandoned": r.lease_expires_at <= now,
            })
        })
        .collect();
    json!({ "now": now, "records": rows })
}

/// A URL with its password (userinfo, or a `password=` parameter) masked.
pub(super) fn mask_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some(at) = rest.rfind('@')
        && let Some((user, _)) = rest[..at].split_once(':')
    {
        out = format!("{scheme}://{user}:********{}", &rest[at..]);
    }
    if let Some((base, query)) = out.clone().split_once('?') {
        let masked: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=********"),
                _ => p.to_owned(),
            })
            .collect();
        out = format!("{base}?{}", masked.join("&"));
    }
    out
}

/// The running configuration, secrets masked: the token, the tenant secret and the
/// encryption key appear only as "set".
pub fn running_config(s: &Settings) -> Value {
    let routes: Vec<Value> = s
        .routes
        .routes()
        .iter()
        .map(|r| {
            json!({
                "method": r.method.as_ref().map_or("*", http::Method::as_str),
                "pattern": r.pattern.as_str(),
                "policy": format!("{:?}", r.policy),
            })
        })
        .collect();
    json!({
        "listen": s.listen.to_string(),
        "upstream": mask_url(&s.upstream.to_string()),
        "store": mask_url(&s.store.to_string()),
        "admin": s.admin.as_ref().map(|a| json!({
            "listen": a.listen.to_string(),
            "token": "******** (set)",
            "login_limit": format!("{} failures per {}", a.login_limit.failures, humantime::format_duration(a.login_limit.window)),
        })),
        "tenant": {
            "secret": if s.tenant_secret.is_some() { "******** (set)" } else { "generated beside the store" },
            "credential_headers": s.credential_headers.iter().map(|h| h.as_str()).collect::<Vec<_>>(),
            "limits": format!("{:?}", s.tenant_limits),
        },
        "encryption": if s.encryption.is_some() { "on (key set)" } else { "off" },
        "proxy": format!("{:?}", s.proxy),
        "telemetry": {
            "otlp_endpoint": s.telemetry.otlp_endpoint.as_deref().map(mask_url),
            "service_name": s.telemetry.service_name,
            "sample_ratio": s.telemetry.sample_ratio,
        },
        "defaults": format!("{:?}", s.routes.default_policy()),
        "routes": routes,
        "version": env!("CARGO_PKG_VERSION"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            mask_url("postgres://idem:s3cret@db:5432/idem"),
            "postgres://idem:********@db:5432/idem"
        );
        assert_eq!(
            mask_url("redis://:pw@127.0.0.1:6379/0"),
            "redis://:********@127.0.0.1:6379/0"
        );
        assert_eq!(
            mask_url("postgres://db/idem?user=a&password=s3cret"),
            "postgres://db/idem?user=a&password=********"
        );
        assert_eq!(mask_url("sqlite:idem.db"), "sqlite:idem.db");
        assert_eq!(mask_url("redis://user@host:6379"), "redis://user@host:6379");
    }

    // Its store URL carries a password: a PostgreSQL one.
    #[cfg(feature = "postgres")]
    #[test]
    fn the_running_configuration_shows_no_secret() {
        let text = "upstream = \"http://127.0.0.1:3000\"\nstore = \"postgres://u:pw-secret@127.0.0.1/test\"\n\
                    [tenant]\nsecret = \"tenant-secret-0123456789\"\n\
                    [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"admin-token-0123456789\"\n\
                    [[routes]]\nmethod = \"POST\"\npath = \"/v1/charges\"\n";
        let settings = crate::config::Config::parse(text)
            .unwrap()
            .validate()
            .unwrap();
        let doc = running_config(&settings).to_string();
        for secret in [
            "pw-secret",
            "tenant-secret-0123456789",
            "admin-token-0123456789",
        ] {
            assert!(!doc.contains(secret), "{secret} in {doc}");
        }
        assert!(doc.contains("/v1/charges"), "{doc}");
    }
}
