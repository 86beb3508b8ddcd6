//! The admin listener: health, readiness, metrics, and key inspection, behind a
//! bearer token.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use idem_core::policy::ErrorFormat;
use idem_core::{Problem, RecordKey, Store, TenantHasher};
use subtle::ConstantTimeEq;

use crate::keys::{KeyAction, run};
use crate::metrics::{MeteredStore, Metrics};

/// What the admin endpoints need.
#[derive(Debug)]
pub struct Admin {
    /// The store (measured).
    pub store: MeteredStore,
    /// Tenant hashing, to find a caller's key from its credential.
    pub tenants: TenantHasher,
    /// Metrics to expose.
    pub metrics: Arc<Metrics>,
    /// The bearer token.
    pub token: String,
}

fn problem(
    status: StatusCode,
    slug: &'static str,
    title: &'static str,
    detail: impl Into<String>,
) -> Response<Full<Bytes>> {
    Problem::new(status, slug, title, detail)
        .to_response(ErrorFormat::Problem)
        .map(Full::new)
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(v.to_string())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/json".parse().expect("static"),
    );
    res
}

impl Admin {
    fn authorized(&self, req: &Request<impl Sized>) -> bool {
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| t.as_bytes().ct_eq(self.token.as_bytes()).into())
    }

    /// Serves one admin request.
    pub async fn handle(&self, req: Request<impl Sized>) -> Response<Full<Bytes>> {
        if !self.authorized(&req) {
            let mut res = problem(
                StatusCode::UNAUTHORIZED,
                "admin-unauthorized",
                "Unauthorized",
                "a valid bearer token is required",
            );
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("static"));
            return res;
        }
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => {
                json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
            }
            (&Method::GET, "/readyz") => match self.store.ping().await {
                Ok(()) => json(StatusCode::OK, &serde_json::json!({ "status": "ready" })),
                Err(e) => problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "idempotency-store-unavailable",
                    "Store unavailable",
                    e.to_string(),
                ),
            },
            (&Method::GET, "/metrics") => {
                let mut res = Response::new(Full::new(Bytes::from(self.metrics.encode())));
                res.headers_mut().insert(
                    header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8"
                        .parse()
                        .expect("static"),
                );
                res
            }
            (m, "/keys") | (m, "/keys/release") => {
                let action = match (m, req.uri().path()) {
                    (&Method::GET, "/keys") => KeyAction::Inspect,
                    (&Method::DELETE, "/keys") => KeyAction::Purge,
                    (&Method::POST, "/keys/release") => KeyAction::Release,
                    _ => {
                        return problem(
                            StatusCode::METHOD_NOT_ALLOWED,
                            "method-not-allowed",
                            "Method not allowed",
                            "GET or DELETE /keys, POST /keys/release",
                        );
                    }
                };
                let key = match self.record_key(req.uri().query().unwrap_or("")) {
                    Ok(k) => k,
                    Err(msg) => {
                        return problem(
                            StatusCode::BAD_REQUEST,
                            "admin-bad-query",
                            "Bad query",
                            msg,
                        );
                    }
                };
                match run(&self.store, &key, action).await {
                    Ok(Some(doc)) => json(StatusCode::OK, &doc),
                    Ok(None) => problem(
                        StatusCode::NOT_FOUND,
                        "key-not-found",
                        "Key not found",
                        match action {
                            KeyAction::Release => "no in-flight record for this key",
                            _ => "no record for this key",
                        },
                    ),
                    Err(e) => problem(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "idempotency-store-unavailable",
                        "Store unavailable",
                        e.to_string(),
                    ),
                }
            }
            _ => problem(
                StatusCode::NOT_FOUND,
                "not-found",
                "Not found",
                "endpoints: /healthz /readyz /metrics /keys /keys/release",
            ),
        }
    }

    /// `route=POST%20/v1/charges&key=K&credential=…` or `&tenant=t_…`.
    fn record_key(&self, query: &str) -> Result<RecordKey, String> {
        let mut route = None;
        let mut key = None;
        let mut tenant = None;
        for (k, v) in form_urlencoded::parse(query.as_bytes()).into_owned() {
            match k.as_str() {
                "route" => route = Some(v),
                "key" => key = Some(v),
                "credential" => tenant = Some(self.tenants.tenant_for(v.as_bytes())),
                "tenant" => tenant = Some(v),
                other => return Err(format!("unknown parameter {other:?}")),
            }
        }
        Ok(RecordKey::new(
            tenant.unwrap_or_else(|| idem_core::scope::ANONYMOUS_TENANT.to_owned()),
            route.ok_or("route is required, e.g. route=POST%20/v1/charges")?,
            key.ok_or("key is required")?,
        ))
    }
}
