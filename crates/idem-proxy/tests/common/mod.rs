//! Test harness: a real upstream on loopback that counts executions, and the real
//! `idem` binary started as a child process.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post as route_post;

/// Executions per (route, key) as the upstream saw them.
#[derive(Clone, Default)]
pub struct Counter(Arc<Mutex<HashMap<String, usize>>>);

impl Counter {
    pub fn hit(&self, what: &str) -> usize {
        let mut m = self.0.lock().unwrap();
        let n = m.entry(what.to_owned()).or_default();
        *n += 1;
        *n
    }
    pub fn get(&self, what: &str) -> usize {
        self.0.lock().unwrap().get(what).copied().unwrap_or(0)
    }
}

fn key_of(h: &HeaderMap) -> String {
    h.get("idempotency-key")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

async fn charge(State(c): State<Counter>, h: HeaderMap, body: Bytes) -> Response {
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

async fn capture(State(c): State<Counter>, h: HeaderMap, UrlPath(id): UrlPath<String>) -> Response {
    c.hit(&format!("capture:{id}:{}", key_of(&h)));
    (StatusCode::OK, format!("captured {id}")).into_response()
}

async fn slow(
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

async fn fail(State(c): State<Counter>, h: HeaderMap, UrlPath(code): UrlPath<u16>) -> Response {
    let n = c.hit(&format!("fail:{code}:{}", key_of(&h)));
    (
        StatusCode::from_u16(code).unwrap(),
        format!("status {code}, execution {n}"),
    )
        .into_response()
}

async fn no_store(State(c): State<Counter>, h: HeaderMap) -> Response {
    c.hit(&format!("no-store:{}", key_of(&h)));
    (StatusCode::OK, [("idem-no-store", "1")], "not stored").into_response()
}

async fn echo(State(c): State<Counter>, h: HeaderMap) -> Response {
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

/// The upstream: an axum app on 127.0.0.1:0, plus a raw endpoint that reads a request,
/// counts it, and closes the connection without answering.
pub struct Upstream {
    pub addr: SocketAddr,
    pub reset_addr: SocketAddr,
    /// Answers status and headers and part of the body, then closes the connection.
    pub cut_addr: SocketAddr,
    pub counter: Counter,
}

pub async fn upstream() -> Upstream {
    let counter = Counter::default();
    let app = Router::new()
        .route("/v1/charges", route_post(charge))
        .route("/v1/charges/{id}/capture", route_post(capture))
        .route("/v1/slow", route_post(slow))
        .route("/v1/wait", route_post(slow))
        .route("/v1/fail/{code}", route_post(fail))
        .route("/v1/no-store", route_post(no_store))
        .route("/v1/echo", route_post(echo).get(echo))
        .with_state(counter.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

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

/// Writes `idem.toml` in `dir`; returns its path.
pub fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("idem.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A running `idem` child process.
pub struct Idem {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

impl Drop for Idem {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_idem")
}

/// Starts `idem serve` with the arguments, in `dir`, and waits until it listens.
pub fn start_idem(dir: &Path, args: &[&str]) -> Idem {
    start_idem_with_env(dir, args, &[])
}

/// [`start_idem`] with extra environment variables.
pub fn start_idem_with_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Idem {
    let mut child = Command::new(binary())
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(args)
        .current_dir(dir)
        .env("IDEM_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start idem");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let keep = lines.clone();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("idem ready")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(line.clone());
            }
            keep.lock().unwrap().push(line);
        }
    });
    let ready = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(line) => line,
        Err(_) => {
            let _ = child.kill();
            panic!(
                "idem did not start with {args:?}: {:?}",
                lines.lock().unwrap()
            );
        }
    };
    let v: serde_json::Value = serde_json::from_str(&ready).unwrap();
    let addr = v["fields"]["listen"].as_str().unwrap().parse().unwrap();
    let admin = v["fields"]["admin"]
        .as_str()
        .and_then(|a| a.strip_prefix("Some("))
        .and_then(|a| a.strip_suffix(')'))
        .and_then(|a| a.parse().ok());
    Idem {
        child,
        addr,
        admin,
        stderr: lines,
    }
}

impl Idem {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends a signal with kill(1) (no unsafe code in tests either).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A POST to /v1/slow that the upstream holds for `ms`.
pub fn slow_post(
    client: &reqwest::Client,
    idem: &Idem,
    key: &str,
    ms: u64,
) -> reqwest::RequestBuilder {
    post(client, idem.url("/v1/slow"), Some(key), "{}").header("x-delay-ms", ms.to_string())
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

pub fn post(
    client: &reqwest::Client,
    url: String,
    key: Option<&str>,
    body: &str,
) -> reqwest::RequestBuilder {
    let mut req = client
        .post(url)
        .header("authorization", "Bearer sk_alice")
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    req
}
