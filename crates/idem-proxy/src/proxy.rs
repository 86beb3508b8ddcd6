//! The upstream side: a keep-alive hyper-util client as a Tower service, behind the
//! same `IdempotencyLayer` the Rust services use. One engine, no second implementation.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use idem_core::policy::is_hop_by_hop;
use idem_core::{Problem, ProblemKind, Routes};
use idem_tower::{BoxError, NoStore, OutcomeUnknown, RequestBody};

use crate::config::ProxyConfig;

/// The forwarding headers' names, made once rather than parsed from a string on every
/// request.
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Body of upstream responses (streamed) and of the problems the proxy produces.
pub type UpstreamBody = UnsyncBoxBody<Bytes, BoxError>;

/// The client's address, put in request extensions by the server.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// Put in request extensions by the server when the client connected over TLS, so
/// that the upstream is told `proto=https`.
#[derive(Debug, Clone, Copy)]
pub struct ClientOverTls;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Forwards requests to the upstream. Cloned per request: one `Arc`.
#[derive(Clone, Debug)]
pub struct Upstream(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    client: Client<Connector, RequestBody<Incoming>>,
    base: Uri,
    /// The base's path without its trailing `/`, put before every request's path.
    prefix: String,
    /// The `Host` the upstream is sent: its own authority.
    host: Option<HeaderValue>,
    routes: Arc<Routes>,
    response_timeout: Duration,
    no_store_header: HeaderName,
}

impl Upstream {
    /// A client with a keep-alive pool and the configured timeouts; over TLS for an
    /// `https://` base (SNI from its host, ALPN `h2` then `http/1.1`).
    pub fn new(
        base: Uri,
        routes: Arc<Routes>,
        config: &ProxyConfig,
        tls: Option<&idem_tls::ClientTls>,
    ) -> Result<Self, idem_tls::TlsError> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        connector.enforce_http(false);
        let tls_config = match tls {
            Some(tls) => {
                if tls.verify == idem_tls::Verify::Nothing {
                    tracing::warn!(
                        upstream = %base,
                        "upstream_tls.insecure_skip_verify = true: the upstream's certificate is NOT checked; \
                         anyone on the path can read and change the traffic"
                    );
                }
                tls.config()
            }
            // An http:// upstream: every request goes to the http:// base, so the TLS
            // side of the connector is never used.
            None => idem_tls::ClientTls {
                verify: idem_tls::Verify::Nothing,
                ..idem_tls::ClientTls::default()
            }
            .config(),
        }?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(1024)
            .build(connector);
        Ok(Upstream(Arc::new(Shared {
            client,
            prefix: base.path().trim_end_matches('/').to_owned(),
            host: base
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
            base,
            routes,
            response_timeout: config.response_timeout,
            no_store_header: config.no_store_header.clone(),
        })))
    }
}

impl Shared {
    fn target(&self, uri: &Uri) -> Uri {
        let mut parts = self.base.clone().into_parts();
        parts.path_and_query = if self.prefix.is_empty() {
            uri.path_and_query().cloned()
        } else {
            let pq = uri.path_and_query().map_or("/", |p| p.as_str());
            format!("{}{pq}", self.prefix).parse().ok()
        };
        Uri::from_parts(parts).unwrap_or_else(|_| self.base.clone())
    }

    fn problem(
        &self,
        req_method: &http::Method,
        path: &str,
        problem: Problem,
    ) -> Response<UpstreamBody> {
        let format = self.routes.lookup(req_method, path).policy().error_format;
        problem.to_response(format).map(|b| {
            http_body_util::Full::new(b)
                .map_err(|never| match never {})
                .boxed_unsync()
        })
    }
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::try_from(n.trim()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    let hop: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    for name in hop {
        headers.remove(name);
    }
}

/// Adds `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` and `Forwarded`
/// (RFC 7239), appending to what earlier proxies wrote. Runs for every request: each
/// value is written once into its own buffer, with no formatting machinery.
fn add_forwarded(headers: &mut HeaderMap, client: Option<SocketAddr>, proto: &'static str) {
    let host = headers.get(header::HOST).cloned();
    if let Some(addr) = client {
        let mut ip = String::with_capacity(48);
        push_ip(&mut ip, addr.ip());
        let mut xff = String::new();
        if let Some(prev) = headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            xff.push_str(prev);
            xff.push_str(", ");
        }
        xff.push_str(&ip);
        if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(xff)) {
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
        let mut fwd = String::with_capacity(96);
        if let Some(prev) = headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
            fwd.push_str(prev);
            fwd.push_str(", ");
        }
        fwd.push_str("for=");
        if addr.is_ipv6() {
            fwd.push_str("\"[");
            fwd.push_str(&ip);
            fwd.push_str("]\"");
        } else {
            fwd.push_str(&ip);
        }
        fwd.push_str(";proto=");
        fwd.push_str(proto);
        if let Some(h) = host.as_ref().and_then(|h| h.to_str().ok()) {
            fwd.push_str(";host=\"");
            fwd.push_str(h);
            fwd.push('"');
        }
        if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(fwd)) {
            headers.insert(header::FORWARDED, v);
        }
    }
    headers
        .entry(X_FORWARDED_PROTO.clone())
        .or_insert(HeaderValue::from_static(proto));
    if let Some(h) = host {
        headers.entry(X_FORWARDED_HOST.clone()).or_insert(h);
    }
}

/// Writes an address as `Display` does; IPv4 digit by digit.
fn push_ip(out: &mut String, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        std::net::IpAddr::V6(v6) => {
            use std::fmt::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

impl tower::Service<Request<RequestBody<Incoming>>> for Upstream {
    type Response = Response<UpstreamBody>;
    type Error = Infallible;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The pool takes requests at any time; back-pressure comes from the listener.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody<Incoming>>) -> Self::Future {
        let this = self.0.clone();
        Box::pin(async move { Ok(this.forward(req).await) })
    }
}

/// The upstream's answer, or why there is none.
type Sent = Result<
    Result<Response<Incoming>, hyper_util::client::legacy::Error>,
    tokio::time::error::Elapsed,
>;

impl Shared {
    /// Sends a request upstream: its response, or the problem saying why there is none
    /// and whether the request may have run.
    async fn forward(&self, req: Request<RequestBody<Incoming>>) -> Response<UpstreamBody> {
        let (mut parts, body) = req.into_parts();
        let method = parts.method.clone();
        let uri = self.address(&mut parts);
        let sent: Sent = tokio::time::timeout(
            self.response_timeout,
            self.client.request(Request::from_parts(parts, body)),
        )
        .await;
        match sent {
            Ok(Ok(res)) => self.relay(res),
            Ok(Err(e)) if e.is_connect() => {
                let mut res = self.problem(&method, uri.path(), upstream_unreachable(&e));
                res.extensions_mut().insert(NoStore);
                res
            }
            lost => {
                let mut res = self.problem(&method, uri.path(), outcome_unknown(lost));
                res.extensions_mut().insert(OutcomeUnknown);
                res
            }
        }
    }

    /// Points a request at the upstream: its URI, HTTP/1.1, no hop-by-hop headers,
    /// the forwarding headers, and the upstream's own `Host`. Returns the URI the client
    /// asked for.
    fn address(&self, parts: &mut http::request::Parts) -> Uri {
        let client = parts.extensions.get::<ClientAddr>().map(|c| c.0);
        let proto = match parts.extensions.get::<ClientOverTls>() {
            Some(_) => "https",
            None => "http",
        };
        let target = self.target(&parts.uri);
        let asked = std::mem::replace(&mut parts.uri, target);
        parts.version = http::Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        add_forwarded(&mut parts.headers, client, proto);
        // The upstream sees its own authority, as with nginx's default; the client's
        // is in X-Forwarded-Host.
        if let Some(host) = &self.host {
            parts.headers.insert(header::HOST, host.clone());
        }
        asked
    }

    /// The upstream's response as the client gets it: no hop-by-hop headers, no
    /// length on a 204 or 304, the no-store header honoured and removed.
    fn relay(&self, mut res: Response<Incoming>) -> Response<UpstreamBody> {
        strip_hop_by_hop(res.headers_mut());
        // A 204 has no body and must not say a length (RFC 9110 §8.6); a 304 may
        // give the length of the representation it stands for, which would be
        // taken for its own body's length. Both are sent without one.
        if matches!(
            res.status(),
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
        ) {
            res.headers_mut().remove(header::CONTENT_LENGTH);
        }
        if res.headers_mut().remove(&self.no_store_header).is_some() {
            res.extensions_mut().insert(NoStore);
        }
        res.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync())
    }
}

/// Never sent: nothing ran upstream, so the key is released.
fn upstream_unreachable(e: &hyper_util::client::legacy::Error) -> Problem {
    match crate::tls::certificate_hint(e, &crate::tls::UPSTREAM) {
        Some(hint) => tracing::error!(error = %e, "{hint}"),
        None => tracing::warn!(error = %e, "upstream unreachable"),
    }
    Problem::of(
        ProblemKind::UpstreamUnreachable,
        "the upstream could not be reached; the request was not sent and is safe to retry",
    )
}

/// Sent, but the answer was lost (timed out, or the connection failed): the upstream
/// may have executed it.
fn outcome_unknown(lost: Sent) -> Problem {
    let (status, why) = match lost {
        Err(_) => (
            StatusCode::GATEWAY_TIMEOUT,
            "the upstream did not answer in time".to_owned(),
        ),
        Ok(Err(e)) => (
            StatusCode::BAD_GATEWAY,
            format!("the connection to the upstream failed after the request was sent ({e})"),
        ),
        Ok(Ok(_)) => unreachable!("an answer is relayed, not lost"),
    };
    tracing::warn!(%status, "upstream outcome unknown: {why}");
    Problem::of(
        ProblemKind::UpstreamOutcomeUnknown,
        format!(
            "{why}; the request may have been executed. The key stays in use until its lease \
             expires; retry with the same key after that"
        ),
    )
    .with_status(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn addresses_are_written_as_display_does() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.200.9.255",
            "1.22.103.4",
            "::1",
            "fe80::1:2",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut out = String::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string());
        }
    }

    #[test]
    fn forwarded_headers_append() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "api.example".parse().unwrap());
        h.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        add_forwarded(&mut h, Some("127.0.0.7:5000".parse().unwrap()), "http");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.7");
        assert_eq!(
            h["forwarded"],
            "for=127.0.0.7;proto=http;host=\"api.example\""
        );
        assert_eq!(h["x-forwarded-host"], "api.example");
        let mut v6 = HeaderMap::new();
        add_forwarded(&mut v6, Some("[::1]:5000".parse().unwrap()), "https");
        assert_eq!(v6["forwarded"], "for=\"[::1]\";proto=https");
        assert_eq!(v6["x-forwarded-proto"], "https");
    }
}
