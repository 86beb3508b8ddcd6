//! What operators look at, against the real `idem` binary: the admin page's API and
//! its login, the latency histograms and the oldest-in-flight gauge, the Grafana
//! dashboard's queries (each must name a metric the running binary exports), and the
//! OTLP traces, received by a collector this test runs (over HTTP, and over HTTPS with
//! a private CA and a client certificate).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use common::*;
use idem_conformance::pki::{PemPair, TestCa, Validity};
use idem_test_support::*;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

const TOKEN: &str = "admin-token-0123456789";

fn config(dir: &std::path::Path, upstream: std::net::SocketAddr, extra: &str) -> String {
    let path = dir.join("idem.toml");
    std::fs::write(
        &path,
        format!(
            "upstream = \"http://{upstream}\"\nstore = \"memory\"\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\
             [defaults]\nlease = \"30s\"\n[[routes]]\nmethod = \"POST\"\npath = \"/v1/charges\"\n\
             [[routes]]\nmethod = \"POST\"\npath = \"/v1/slow\"\n{extra}"
        ),
    )
    .unwrap();
    path.display().to_string()
}

async fn scrape(c: &reqwest::Client, idem: &Idem) -> String {
    let admin = idem.admin.expect("admin listener");
    let res = c
        .get(format!("http://{admin}/metrics"))
        .bearer_auth(TOKEN)
        .sent()
        .await;
    assert_eq!(res.status(), 200);
    res.text().await.unwrap()
}

/// The value of the first sample line that starts with `prefix`.
fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Every series name the exposition declares: samples, and the names a declared family
/// will have (`_total`, `_bucket`, `_sum`, `_count`) before its first observation.
fn exported_names(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap_or(""));
            names.insert(name.to_owned());
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// Light traffic of every kind: executed, replayed, mismatch, in use, unmatched route.
async fn traffic(c: &reqwest::Client, idem: &Idem) -> tokio::task::JoinHandle<()> {
    for _ in 0..2 {
        let r = post(c, idem.url("/v1/charges"), Some("k-1"), "{\"a\":1}");
        assert!(r.sent().await.status().is_success());
    }
    let r = post(c, idem.url("/v1/charges"), Some("k-1"), "{\"a\":2}");
    assert_eq!(r.sent().await.status(), 422);
    let r = post(c, idem.url("/v1/echo"), Some("k-echo"), "{}");
    assert_eq!(r.sent().await.status(), 200);
    let slow = slow_post(c, idem, "k-slow", 3_000).send();
    let slow = tokio::spawn(async move {
        let res = slow.await.unwrap();
        assert!(res.status().is_success());
        // Read to the end: the outcome is stored as the body ends.
        res.bytes().await.unwrap();
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dup = slow_post(c, idem, "k-slow", 3_000).sent().await;
    assert_eq!(dup.status(), 409);
    slow
}

#[tokio::test]
async fn histograms_gauge_and_the_dashboard_name_exported_metrics() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let idem = start_idem(dir.path(), &["--config", &config(dir.path(), up.addr, "")]);
    let c = client();
    let slow = traffic(&c, &idem).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let metrics = scrape(&c, &idem).await;
    let age = sample(&metrics, "idem_in_flight_oldest_age_seconds").expect("gauge");
    assert!(
        age >= 0.5,
        "the slow key is about a second old: {age}\n{metrics}"
    );
    for series in [
        "idem_request_duration_seconds_count{outcome=\"executed\",route=\"POST /v1/charges\"} 1",
        "idem_request_duration_seconds_count{outcome=\"replayed\",route=\"POST /v1/charges\"} 1",
        "idem_request_duration_seconds_count{outcome=\"reused\",route=\"POST /v1/charges\"} 1",
        "idem_request_duration_seconds_count{outcome=\"in_use\",route=\"POST /v1/slow\"} 1",
        "idem_request_duration_seconds_bucket{le=\"0.001\",outcome=\"executed\",route=\"POST /v1/charges\"}",
        "idem_request_duration_seconds_count{outcome=\"executed\",route=\"unmatched\"}",
        "idem_upstream_latency_seconds_count{route=\"POST /v1/charges\"} 1",
        "idem_store_latency_seconds_count{op=\"claim\",store=\"memory\"}",
        "idem_store_latency_seconds_count{op=\"list_in_flight\",store=\"memory\"}",
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
    assert!(
        !metrics.contains("/v1/echo"),
        "an unconfigured path is no label value (bounded cardinality):\n{metrics}"
    );
    slow.await.unwrap();
    let after = scrape(&c, &idem).await;
    assert_eq!(
        sample(&after, "idem_in_flight_oldest_age_seconds"),
        Some(0.0),
        "{after}"
    );

    let names = exported_names(&after);
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/grafana/idem.json"
    ))
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let exprs = expressions(&dashboard);
    assert!(exprs.len() >= 10, "a query per panel: {exprs:?}");
    for expr in &exprs {
        let used = metric_names(expr);
        assert!(!used.is_empty(), "{expr} names no idem metric");
        for name in used {
            assert!(
                names.contains(&name),
                "{expr}: {name} is not exported; idem exports {names:?}"
            );
        }
    }
}

/// Every PromQL expression of a dashboard (panel targets and variable queries).
fn expressions(v: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                        out.push(s.clone());
                    }
                    _ => out.extend(expressions(v)),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| out.extend(expressions(i))),
        _ => {}
    }
    out
}

fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("idem_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test]
async fn the_admin_page_needs_the_token_and_keeps_it_out_of_urls() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let idem = start_idem(dir.path(), &["--config", &config(dir.path(), up.addr, "")]);
    let admin = format!("http://{}", idem.admin.unwrap());
    let c = client();
    let page = c.get(format!("{admin}/")).sent().await;
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(
        html.contains("/assets/app.js") && !html.contains("http://") && !html.contains("https://")
    );
    let js = c
        .get(format!("{admin}/assets/app.js"))
        .sent()
        .await
        .text()
        .await
        .unwrap();
    assert!(
        !js.contains("http://") && !js.contains("https://"),
        "no external resource"
    );

    for path in ["/api/in-flight", "/api/config", "/metrics"] {
        let res = c.get(format!("{admin}{path}")).sent().await;
        assert_eq!(res.status(), 401, "{path}");
        assert_eq!(res.headers()["content-type"], "application/problem+json");
    }
    let cookie = login(&c, &admin).await;

    let slow = slow_post(&c, &idem, "k-stuck", 2_000).send();
    let slow = tokio::spawn(slow);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let listed = get_json(&c, &format!("{admin}/api/in-flight"), &cookie).await;
    let record = &listed["records"][0];
    assert_eq!(record["key"], "k-stuck", "{listed}");
    assert_eq!(record["route"], "POST /v1/slow", "{listed}");
    let q = format!(
        "route=POST%20/v1/slow&key=k-stuck&tenant={}",
        record["tenant"].as_str().unwrap()
    );
    let forged = c
        .post(format!("{admin}/keys/release?{q}"))
        .header("cookie", &cookie)
        .sent()
        .await;
    assert_eq!(
        forged.status(),
        403,
        "a cookie alone cannot change anything"
    );
    assert_eq!(forged.headers()["content-type"], "application/problem+json");
    let released = c
        .post(format!("{admin}/keys/release?{q}"))
        .header("cookie", &cookie)
        .header("x-requested-with", "idem-admin")
        .sent()
        .await;
    assert_eq!(released.status(), 200);
    let config = get_json(&c, &format!("{admin}/api/config"), &cookie).await;
    assert!(!config.to_string().contains(TOKEN), "{config}");
    let _ = slow.await;
}

/// Failed logins are limited per client address, 10 per 5 minutes by default; a
/// successful one is not counted. Past the limit, even the right token gets a `429`
/// problem with `Retry-After`, while another address still logs in.
#[tokio::test]
async fn failed_logins_are_limited_per_client_address() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let idem = start_idem(dir.path(), &["--config", &config(dir.path(), up.addr, "")]);
    let url = format!("http://{}/login", idem.admin.unwrap());
    let c = client();
    let attempt = |token: &str| c.post(&url).body(format!("token={token}")).sent();
    for n in 0..10 {
        if n == 5 {
            assert_eq!(attempt(TOKEN).await.status(), 200, "not counted");
        }
        let refused = attempt("wrong-token-0123456789").await;
        assert_eq!(refused.status(), 401, "failure {n}");
    }
    let limited = attempt(TOKEN).await;
    assert_eq!(limited.status(), 429, "the right token, past the limit");
    assert_eq!(
        limited.headers()["content-type"],
        "application/problem+json"
    );
    let wait: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=300).contains(&wait), "Retry-After: {wait}");
    let doc: serde_json::Value = limited.json().await.unwrap();
    assert_eq!(doc["status"], 429, "{doc}");
    assert_eq!(doc["type"], "urn:idem:problem:admin-login-limited", "{doc}");
    let other = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let res = other.post(&url).body(format!("token={TOKEN}")).sent().await;
    assert_eq!(res.status(), 200, "another address is not refused");
}

/// A wrong bearer token is a guess at the admin token as fast as a login: it counts
/// against the address's failed logins, and past the limit even the right bearer token
/// gets 429 from that address (the login form too); another address is not refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bearer_tokens_count_as_failed_logins() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let idem = start_idem(dir.path(), &["--config", &config(dir.path(), up.addr, "")]);
    let admin = idem.admin.unwrap();
    let url = format!("http://{admin}/healthz");
    let c = client();
    let probe = |token: &str| c.get(&url).bearer_auth(token).sent();
    for n in 0..10 {
        if n == 5 {
            assert_eq!(probe(TOKEN).await.status(), 200, "not counted");
        }
        assert_eq!(
            probe("wrong-token-0123456789").await.status(),
            401,
            "guess {n}"
        );
    }
    let limited = probe(TOKEN).await;
    assert_eq!(limited.status(), 429, "the right token, past the limit");
    assert!(limited.headers().contains_key("retry-after"));
    let login = c
        .post(format!("http://{admin}/login"))
        .body(format!("token={TOKEN}"))
        .sent()
        .await;
    assert_eq!(login.status(), 429, "the login form shares the count");
    let other = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let res = other.get(&url).bearer_auth(TOKEN).sent().await;
    assert_eq!(res.status(), 200, "another address is not refused");
}

/// Logs in as the page does; returns the session cookie (`name=value`).
async fn login(c: &reqwest::Client, admin: &str) -> String {
    let refused = c
        .post(format!("{admin}/login"))
        .body("token=wrong-token-0123456789")
        .sent()
        .await;
    assert_eq!(refused.status(), 401);
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    let ok = c
        .post(format!("{admin}/login"))
        .header("content-type", "application/json")
        .body(format!("{{\"token\":\"{TOKEN}\"}}"))
        .sent()
        .await;
    assert_eq!(ok.status(), 200);
    let set_cookie = ok.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"),
        "{set_cookie}"
    );
    assert!(
        !set_cookie.contains("Secure"),
        "over plain HTTP a browser would drop a Secure cookie: {set_cookie}"
    );
    assert!(
        !set_cookie.contains(TOKEN),
        "the cookie is a session id, not the token"
    );
    set_cookie.split(';').next().unwrap().to_owned()
}

/// A GET with the session cookie, as JSON.
async fn get_json(c: &reqwest::Client, url: &str, cookie: &str) -> serde_json::Value {
    let res = c.get(url).header("cookie", cookie).sent().await;
    assert_eq!(res.status(), 200, "{url}");
    res.json().await.unwrap()
}

/// Spans received by the test collector.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

/// An OTLP/HTTP receiver that keeps every span it is sent.
fn collector_app(spans: Collector) -> axum::Router {
    axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let keep = spans.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut all = keep.0.lock().unwrap();
                for rs in req.resource_spans {
                    for ss in rs.scope_spans {
                        all.extend(ss.spans);
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }
        }),
    )
}

async fn collector() -> (std::net::SocketAddr, Collector) {
    let spans = Collector::default();
    let app = collector_app(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, spans)
}

/// The collector over HTTPS with `pair`'s certificate, as a managed collector is; it
/// requires a client certificate from `client_ca`.
async fn tls_collector(pair: &PemPair, client_ca: &Path) -> (std::net::SocketAddr, Collector) {
    let acceptor = tls_acceptor(pair, Some(client_ca));
    let spans = Collector::default();
    let app = collector_app(spans.clone());
    let addr = serve_tls_app(app, acceptor).await;
    (addr, spans)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

// Multi-threaded: the collector must answer while this thread waits for idem to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_reach_the_collector_as_one_tree_under_the_callers_span() {
    let (otlp, spans) = collector().await;
    let telemetry = format!("otlp_endpoint = \"http://{otlp}/v1/traces\"\n");
    one_tree_under_the_callers_span(&telemetry, &spans).await;
}

/// A collector across a network: `https://`, a private CA, a client certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_reach_an_https_collector_with_a_private_ca_and_a_client_certificate() {
    let ca = TestCa::new("otlp");
    let server = ca.server("collector", &["localhost"], Validity::Current);
    let (otlp, spans) = tls_collector(&server, &ca.ca_file()).await;
    let me = ca.client("idem", "idem");
    let telemetry = format!(
        "otlp_endpoint = \"https://localhost:{}/v1/traces\"\nca = {}\ncert = {}\nkey = {}\n",
        otlp.port(),
        toml_path(&ca.ca_file()),
        toml_path(&me.cert),
        toml_path(&me.key),
    );
    one_tree_under_the_callers_span(&telemetry, &spans).await;
}

/// Without the private CA the collector's certificate is refused: nothing is sent to
/// it, the refusal is logged naming `telemetry.ca`, and idem still serves and stops
/// cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_collector_certificate_gets_no_spans() {
    let ca = TestCa::new("otlp-untrusted");
    let server = ca.server("collector", &["localhost"], Validity::Current);
    let (otlp, spans) = tls_collector(&server, &ca.ca_file()).await;
    let me = ca.client("idem", "idem");
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[telemetry]\notlp_endpoint = \"https://localhost:{}/v1/traces\"\ncert = {}\nkey = {}\n",
        otlp.port(),
        toml_path(&me.cert),
        toml_path(&me.key),
    );
    let mut idem = start_idem(
        dir.path(),
        &["--config", &config(dir.path(), up.addr, &extra)],
    );
    let res = post(&client(), idem.url("/v1/charges"), Some("k-1"), "{}")
        .sent()
        .await;
    assert!(res.status().is_success());
    idem.signal("TERM");
    assert_eq!(idem.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(spans.0.lock().unwrap().is_empty(), "the export was refused");
    // stderr is read by a thread: the last lines may land a moment after the exit.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let logs = idem.stderr.lock().unwrap().join("\n");
        if logs.contains("the collector's certificate was refused (") {
            assert!(logs.contains("check telemetry.ca"), "{logs}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the refusal is not logged: {logs}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends a request with a caller's `traceparent` through idem configured with these
/// `[telemetry]` lines, stops idem (which flushes), and checks what `spans` received:
/// the request span under the caller's, and the store and upstream calls under it.
async fn one_tree_under_the_callers_span(telemetry: &str, spans: &Collector) {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[[routes]]\nmethod = \"POST\"\npath = \"/v1/echo\"\n[telemetry]\n{telemetry}service_name = \"idem-test\"\n"
    );
    let mut idem = start_idem(
        dir.path(),
        &["--config", &config(dir.path(), up.addr, &extra)],
    );
    let c = client();
    let (trace_id, caller) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let res = post(&c, idem.url("/v1/echo"), Some("k-traced"), "{}")
        .header("traceparent", format!("00-{trace_id}-{caller}-01"))
        .sent()
        .await;
    assert_eq!(res.status(), 200);
    let seen: HashMap<String, String> = res.json().await.unwrap();
    // Shutting down flushes the spans still buffered.
    idem.signal("TERM");
    assert_eq!(idem.wait_exit(Duration::from_secs(20)), Some(0));

    let spans = spans.0.lock().unwrap().clone();
    let mine: Vec<&Span> = spans
        .iter()
        .filter(|s| hex(&s.trace_id) == trace_id)
        .collect();
    let names: Vec<&str> = mine.iter().map(|s| s.name.as_str()).collect();
    let request = mine
        .iter()
        .find(|s| s.name == "POST /v1/echo")
        .unwrap_or_else(|| {
            panic!(
                "no request span in {names:?}; idem said {:?}",
                idem.stderr.lock().unwrap()
            )
        });
    assert_eq!(
        hex(&request.parent_span_id),
        caller,
        "the caller's span is the parent"
    );
    let child = |name: &str| {
        mine.iter()
            .find(|s| s.name == name && s.parent_span_id == request.span_id)
            .unwrap_or_else(|| panic!("no {name} span under the request in {names:?}"))
    };
    let upstream = child("upstream");
    child("claim");
    child("complete");
    assert_eq!(
        seen.get("traceparent").map(String::as_str),
        Some(format!("00-{trace_id}-{}-01", hex(&upstream.span_id)).as_str()),
        "the upstream sees the upstream span as its parent: {seen:?}"
    );
}
