//! A counting upstream on loopback: the protected API that idem's layer and proxy
//! tests put behind idem, counting every execution per route and key.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post as route_post;

use crate::{Counter, key_of, serve_app};

/// 201 with a `location`, a `set-cookie` and the JSON body
/// `{"id":"ch_N","execution":E,"bytes":B}`; counts `charges:<key>` (E) and `charges`
/// (N, across keys).
pub async fn charge(State(c): State<Counter>, h: HeaderMap, body: Bytes) -> Response {
    let n = c.hit(&format!("charges:{}", key_of(&h)));
    let id = c.hit("charges");
    (
        StatusCode::CREATED,
        [
            ("location", format!("/v1/charges/ch_{id}")),
            ("set-cookie", "s=1".to_owned()),
            ("content-type", "application/json".to_owned()),
        ],
        format!(
            r#"{{"id":"ch_{id}","execution":{n},"bytes":{}}}"#,
            body.len()
        ),
    )
        .into_response()
}

/// 200 `captured <id>`; counts `capture:<id>:<key>`.
pub async fn capture(
    State(c): State<Counter>,
    h: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    c.hit(&format!("capture:{id}:{}", key_of(&h)));
    (StatusCode::OK, format!("captured {id}")).into_response()
}

/// 201 `slow-<key>` after a delay: the `x-delay-ms` header, else the `ms` query
/// parameter, else 500 ms; counts `slow:<key>`.
pub async fn slow(
    State(c): State<Counter>,
    h: HeaderMap,
    Query(q): Query<HashMap<String, u64>>,
) -> Response {
    c.hit(&format!("slow:{}", key_of(&h)));
    // The delay comes from the query or, so that retries keep the same fingerprint,
    // from an `x-delay-ms` header (headers are not fingerprinted by default).
    let header_ms = h
        .get("x-delay-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    tokio::time::sleep(Duration::from_millis(
        header_ms.or(q.get("ms").copied()).unwrap_or(500),
    ))
    .await;
    (StatusCode::CREATED, format!("slow-{}", key_of(&h))).into_response()
}

/// Answers the status in the path, `status <code>, execution <n>`; counts
/// `fail:<code>:<key>`.
pub async fn fail(State(c): State<Counter>, h: HeaderMap, UrlPath(code): UrlPath<u16>) -> Response {
    let n = c.hit(&format!("fail:{code}:{}", key_of(&h)));
    (
        StatusCode::from_u16(code).unwrap(),
        format!("status {code}, execution {n}"),
    )
        .into_response()
}

/// 200 with the `idem-no-store` header the proxy honours; counts `no-store:<key>`.
pub async fn no_store(State(c): State<Counter>, h: HeaderMap) -> Response {
    c.hit(&format!("no-store:{}", key_of(&h)));
    (StatusCode::OK, [("idem-no-store", "1")], "not stored").into_response()
}

/// 200 with the request headers as a JSON object, and a hop-by-hop response header
/// the proxy must strip; counts `echo:<key>`.
pub async fn echo(State(c): State<Counter>, h: HeaderMap) -> Response {
    c.hit(&format!("echo:{}", key_of(&h)));
    let map: HashMap<String, String> = h
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    (
        StatusCode::OK,
        [
            ("connection", "x-upstream-private"),
            ("x-upstream-private", "1"),
        ],
        serde_json::to_string(&map).unwrap(),
    )
        .into_response()
}

/// The upstream: an axum app on 127.0.0.1:0 (`/v1/charges`, `/v1/charges/{id}/capture`,
/// `/v1/slow`, `/v1/wait`, `/v1/fail/{code}`, `/v1/no-store`, `/v1/echo`), plus two raw
/// endpoints that count a request and then break its connection.
pub struct Upstream {
    /// Where the axum app listens.
    pub addr: SocketAddr,
    /// Reads a request, counts it as `reset:<key>`, then closes without answering.
    pub reset_addr: SocketAddr,
    /// Answers status and headers and part of the body, then closes the connection.
    /// Counted as `cut:<key>`.
    pub cut_addr: SocketAddr,
    /// What every endpoint counted.
    pub counter: Counter,
}

/// The upstream's routes, for a test that serves them itself (behind the layer, with
/// routes of its own added).
pub fn routes() -> Router<Counter> {
    Router::new()
        .route("/v1/charges", route_post(charge))
        .route("/v1/charges/{id}/capture", route_post(capture))
        .route("/v1/slow", route_post(slow))
        .route("/v1/wait", route_post(slow))
        .route("/v1/fail/{code}", route_post(fail))
        .route("/v1/no-store", route_post(no_store))
        .route("/v1/echo", route_post(echo).get(echo))
}

/// Starts the upstream on 127.0.0.1.
pub async fn upstream() -> Upstream {
    let counter = Counter::default();
    let addr = serve_app(routes().with_state(counter.clone())).await;

    // Processes the request (counts it), then resets the connection: the response is lost.
    let reset_addr = raw_upstream(counter.clone(), "reset", b"").await;
    // Processes the request, answers the head and the start of a longer body, then
    // closes the connection: the response breaks off.
    let cut_addr = raw_upstream(
        counter.clone(),
        "cut",
        b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"id\":\"ch_",
    )
    .await;
    Upstream {
        addr,
        reset_addr,
        cut_addr,
        counter,
    }
}

/// A raw upstream: reads a request head, counts it as `<name>:<key>`, writes `answer`
/// and closes the connection.
async fn raw_upstream(c: Counter, name: &'static str, answer: &'static [u8]) -> SocketAddr {
    let raw = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = raw.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut sock, _)) = raw.accept().await else {
                continue;
            };
            let c = c.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&seen).to_lowercase();
                let key = text
                    .lines()
                    .find_map(|l| l.strip_prefix("idempotency-key:"))
                    .map(|k| k.trim().to_owned())
                    .unwrap_or_default();
                c.hit(&format!("{name}:{key}"));
                let _ = sock.write_all(answer).await;
                let _ = sock.flush().await;
                drop(sock);
            });
        }
    });
    addr
}
