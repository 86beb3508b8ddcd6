//! The admin listener: health, readiness, metrics, key inspection, and the operators'
//! page, behind the admin token (a bearer header, or the page's session cookie).

mod login_limit;
mod page;
mod session;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use idem_core::policy::ErrorFormat;
use idem_core::record::now_millis;
use idem_core::{InFlightListing, Problem, RecordKey, Store, TenantHasher};
use subtle::ConstantTimeEq;

pub use login_limit::LoginLimit;
pub use page::running_config;
pub use session::Sessions;

use crate::keys::{KeyAction, run};
use crate::metrics::{MeteredStore, Metrics};

/// Header the page sends with every state-changing request made with its cookie: a
/// cross-site form cannot set it, so a forged request is refused (on top of the
/// cookie's `SameSite=Strict`).
const CSRF_HEADER: &str = "x-requested-with";
const CSRF_VALUE: &str = "idem-admin";

/// Longest in-flight list one request may ask for.
const MAX_LIST: usize = 500;

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
    /// The page's browser sessions.
    pub sessions: Sessions,
    /// The admin listener serves HTTPS: its session cookies are `Secure`.
    pub tls: bool,
    /// Failed logins counted per client address.
    pub login_limit: LoginLimit,
    /// The running configuration, secrets masked (see [`running_config`]).
    pub config: serde_json::Value,
}

type AdminResponse = Response<Full<Bytes>>;

fn problem(
    status: StatusCode,
    slug: &'static str,
    title: &'static str,
    detail: impl Into<String>,
) -> AdminResponse {
    Problem::new(status, slug, title, detail)
        .to_response(ErrorFormat::Problem)
        .map(Full::new)
}

fn json(status: StatusCode, v: &serde_json::Value) -> AdminResponse {
    let mut res = Response::new(Full::new(Bytes::from(v.to_string())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    res.headers_mut().insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    res
}

fn unauthorized() -> AdminResponse {
    let mut res = problem(
        StatusCode::UNAUTHORIZED,
        "admin-unauthorized",
        "Unauthorized",
        "a valid bearer token is required",
    );
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer"),
    );
    res
}

/// `429` to an address that has used up its failed logins: try again in `wait`.
fn too_many_logins(client: IpAddr, wait: Duration) -> AdminResponse {
    tracing::warn!(%client, "admin login refused: too many failed logins");
    let secs = u32::try_from(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
        .unwrap_or(u32::MAX)
        .max(1);
    Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "admin-login-limited",
        "Too many failed logins",
        format!("too many failed logins from this address; try again in {secs} s"),
    )
    .with_retry_after(Some(secs))
    .to_response(ErrorFormat::Problem)
    .map(Full::new)
}

/// The token a login body carries (JSON `token`, or the form field `token`), or `400`
/// when the body cannot be read.
async fn login_token<B>(body: B) -> Result<Option<String>, AdminResponse>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Ok(body) = Limited::new(body, 4096).collect().await else {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            "admin-bad-login",
            "Bad login",
            "the login body could not be read (4 KiB at most)",
        ));
    };
    let body = body.to_bytes();
    Ok(serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("token").and_then(|t| t.as_str()).map(str::to_owned))
        .or_else(|| {
            form_urlencoded::parse(&body)
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
        }))
}

fn store_unavailable(e: impl std::fmt::Display) -> AdminResponse {
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "idempotency-store-unavailable",
        "Store unavailable",
        e.to_string(),
    )
}

/// How a request proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    Bearer,
    Session,
    None,
}

impl Admin {
    fn token_matches(&self, candidate: &str) -> bool {
        candidate.as_bytes().ct_eq(self.token.as_bytes()).into()
    }

    /// Who `client` is. A bearer token is a guess at the admin token like a login: a
    /// wrong one counts against the address's failed logins, and past the limit the
    /// token is not even looked at (`Err`: how long until the address may try again).
    fn auth(&self, client: IpAddr, headers: &HeaderMap) -> Result<Auth, Duration> {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(token) = bearer else {
            return Ok(self.session_auth(headers));
        };
        self.login_limit.attempt(client, Instant::now())?;
        if self.token_matches(token) {
            self.login_limit.succeeded(client);
            return Ok(Auth::Bearer);
        }
        tracing::warn!(%client, "admin bearer token refused");
        Ok(self.session_auth(headers))
    }

    /// A request without a (right) bearer token: authenticated by its session cookie,
    /// or not at all.
    fn session_auth(&self, headers: &HeaderMap) -> Auth {
        if self.sessions.valid(headers) {
            Auth::Session
        } else {
            Auth::None
        }
    }

    /// Serves one admin request from `client` (the connection's peer address).
    pub async fn handle<B>(&self, client: IpAddr, req: Request<B>) -> AdminResponse
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path().to_owned();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/") => {
                return page::asset(page::INDEX_HTML, "text/html; charset=utf-8");
            }
            (&Method::GET, "/assets/app.js") => {
                return page::asset(page::APP_JS, "text/javascript; charset=utf-8");
            }
            (&Method::GET, "/assets/app.css") => {
                return page::asset(page::APP_CSS, "text/css; charset=utf-8");
            }
            (&Method::POST, "/login") => return self.login(client, req).await,
            _ => {}
        }
        let auth = match self.auth(client, req.headers()) {
            Ok(auth) => auth,
            Err(wait) => return too_many_logins(client, wait),
        };
        if auth == Auth::None {
            return unauthorized();
        }
        let safe = matches!(*req.method(), Method::GET | Method::HEAD);
        if auth == Auth::Session
            && !safe
            && req.headers().get(CSRF_HEADER).and_then(|v| v.to_str().ok()) != Some(CSRF_VALUE)
        {
            return problem(
                StatusCode::FORBIDDEN,
                "admin-csrf",
                "Forbidden",
                format!(
                    "requests made with the session cookie must carry {CSRF_HEADER}: {CSRF_VALUE}"
                ),
            );
        }
        self.route(
            req.method(),
            &path,
            req.uri().query().unwrap_or(""),
            req.headers(),
        )
        .await
    }

    async fn route(
        &self,
        method: &Method,
        path: &str,
        query: &str,
        headers: &HeaderMap,
    ) -> AdminResponse {
        match (method, path) {
            (&Method::GET, "/healthz") => {
                json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
            }
            (&Method::GET, "/readyz") => match self.store.ping().await {
                Ok(()) => json(StatusCode::OK, &serde_json::json!({ "status": "ready" })),
                Err(e) => store_unavailable(e),
            },
            (&Method::GET, "/metrics") => self.metrics_text().await,
            (&Method::GET, "/api/session") => json(
                StatusCode::OK,
                &serde_json::json!({ "authenticated": true }),
            ),
            (&Method::GET, "/api/config") => json(StatusCode::OK, &self.config),
            (&Method::GET, "/api/in-flight") => self.in_flight(query).await,
            (&Method::POST, "/logout") => {
                self.sessions.close(headers);
                let mut res = json(StatusCode::OK, &serde_json::json!({ "logged_out": true }));
                res.headers_mut().insert(
                    header::SET_COOKIE,
                    session::clear_cookie(self.tls).parse().expect("ascii"),
                );
                res
            }
            (m, "/keys") | (m, "/keys/release") => self.keys(m, path, query).await,
            _ => problem(
                StatusCode::NOT_FOUND,
                "not-found",
                "Not found",
                "endpoints: / /healthz /readyz /metrics /keys /keys/release /api/in-flight /api/config",
            ),
        }
    }

    /// The exposition, with the oldest-in-flight gauge read from the store first.
    async fn metrics_text(&self) -> AdminResponse {
        match self.store.list_in_flight(1).await {
            Ok(oldest) => self.metrics.set_oldest_in_flight(Duration::from_millis(
                oldest
                    .first()
                    .map_or(0, |r| now_millis().saturating_sub(r.created_at)),
            )),
            // Counted in idem_store_errors_total; the gauge keeps its last value.
            Err(e) => tracing::debug!(error = %e, "cannot list the records in flight"),
        }
        let mut res = Response::new(Full::new(Bytes::from(self.metrics.encode())));
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
        );
        res
    }

    /// `GET /api/in-flight?limit=N`: the oldest records in flight.
    async fn in_flight(&self, query: &str) -> AdminResponse {
        let mut limit = 50;
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match (k.as_ref(), v.parse::<usize>()) {
                ("limit", Ok(n)) if (1..=MAX_LIST).contains(&n) => limit = n,
                _ => {
                    return problem(
                        StatusCode::BAD_REQUEST,
                        "admin-bad-query",
                        "Bad query",
                        format!("the one parameter is limit, 1 to {MAX_LIST}"),
                    );
                }
            }
        }
        match self.store.list_in_flight(limit).await {
            Ok(records) => json(StatusCode::OK, &page::in_flight_doc(&records)),
            Err(e) => store_unavailable(e),
        }
    }

    /// `POST /login` with the token (form field or JSON `token`): opens a session.
    /// Every attempt but a successful one counts against `client`'s failed logins;
    /// past the limit, the token is not even looked at.
    async fn login<B>(&self, client: IpAddr, req: Request<B>) -> AdminResponse
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if let Err(wait) = self.login_limit.attempt(client, Instant::now()) {
            return too_many_logins(client, wait);
        }
        let token = match login_token(req.into_body()).await {
            Ok(token) => token,
            Err(refused) => return refused,
        };
        if !token.is_some_and(|t| self.token_matches(&t)) {
            tracing::warn!(%client, "admin login refused");
            return unauthorized();
        }
        self.login_limit.succeeded(client);
        let mut res = json(
            StatusCode::OK,
            &serde_json::json!({ "authenticated": true }),
        );
        res.headers_mut().insert(
            header::SET_COOKIE,
            session::set_cookie(&self.sessions.open(), self.tls)
                .parse()
                .expect("ascii"),
        );
        res
    }

    async fn keys(&self, m: &Method, path: &str, query: &str) -> AdminResponse {
        let action = match (m, path) {
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
        let key = match self.record_key(query) {
            Ok(k) => k,
            Err(msg) => {
                return problem(StatusCode::BAD_REQUEST, "admin-bad-query", "Bad query", msg);
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
            Err(e) => store_unavailable(e),
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
