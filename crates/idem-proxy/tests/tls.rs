//! TLS end to end with the real `idem` binary: an https upstream (hyper + rustls, with
//! certificates made here), client certificates, refused certificates, TLS on the
//! proxy and admin listeners, a listener certificate rotated under traffic with
//! SIGHUP, and the start-up refusals that name their field.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use bytes::Bytes;
use common::{Idem, start_idem};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use idem_conformance::pki::{PemPair, TestCa, Validity};
use idem_test_support::{client, post, serve_tls_app, tls_acceptor, upstream};
use idem_tls::ClientTls;
use idem_tls::rustls::ClientConfig;
use idem_tls::rustls::pki_types::{CertificateDer, ServerName};

const ADMIN_TOKEN: &str = "admin-token-0123456789";

/// An https upstream on 127.0.0.1 that counts executions and says which HTTP version
/// it was spoken to in and which `X-Forwarded-Proto` it got. With `client_ca`, it
/// requires a client certificate from that CA.
async fn https_upstream(
    pair: &PemPair,
    client_ca: Option<&Path>,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let acceptor = tls_acceptor(pair, client_ca);
    let executions = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/v1/charges", axum::routing::post(charge))
        .with_state(executions.clone());
    let addr = serve_tls_app(app, acceptor).await;
    (addr, executions)
}

async fn charge(State(n): State<Arc<AtomicUsize>>, req: Request) -> impl IntoResponse {
    let execution = n.fetch_add(1, Ordering::SeqCst) + 1;
    let proto = req
        .headers()
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (
        StatusCode::CREATED,
        [
            ("x-upstream-version", format!("{:?}", req.version())),
            ("x-seen-proto", proto),
        ],
        format!("{{\"execution\":{execution}}}"),
    )
}

/// Starts idem with this configuration file text (plus `store = "memory"`).
fn start_with_config(dir: &Path, toml: &str) -> Idem {
    let path = dir.join("idem.toml");
    std::fs::write(&path, format!("store = \"memory\"\n{toml}")).unwrap();
    start_idem(dir, &["--config", path.to_str().unwrap()])
}

/// A configuration naming the https upstream at `addr` by `localhost`, whose name is
/// what is verified and sent as SNI, with these `[upstream_tls]` lines.
fn https_upstream_config(addr: SocketAddr, upstream_tls: &str) -> String {
    format!(
        "upstream = \"https://localhost:{}\"\n[upstream_tls]\n{upstream_tls}\n",
        addr.port()
    )
}

/// idem's log once it holds `needle` (it is read from the child's stderr by a thread,
/// so a line may land a moment after the response that followed it).
async fn logs_with(idem: &Idem, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let logs = idem.stderr.lock().unwrap().join("\n");
        if logs.contains(needle) || tokio::time::Instant::now() > deadline {
            assert!(logs.contains(needle), "no {needle:?} in: {logs}");
            return logs;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_with_a_private_ca_speaks_h2() {
    let ca = TestCa::new("upstream");
    let (addr, executions) =
        https_upstream(&ca.server("up", &["localhost"], Validity::Current), None).await;
    let dir = tempfile::tempdir().unwrap();
    // The host name is what is verified and sent as SNI.
    let idem = start_with_config(
        dir.path(),
        &https_upstream_config(addr, &format!("ca = {}", toml_path(&ca.ca_file()))),
    );
    let c = client();
    for replayed in [false, true] {
        let res = post(&c, idem.url("/v1/charges"), Some("k-https"), "{}")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
        assert_eq!(res.headers().contains_key("idempotent-replayed"), replayed);
        assert_eq!(res.headers()["x-upstream-version"], "HTTP/2.0", "ALPN h2");
        assert_eq!(
            res.headers()["x-seen-proto"],
            "http",
            "the client came in plain"
        );
    }
    assert_eq!(executions.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_client_certificate() {
    let ca = TestCa::new("mtls");
    let (addr, executions) = https_upstream(
        &ca.server("up", &["localhost"], Validity::Current),
        Some(&ca.ca_file()),
    )
    .await;
    let client_pair = ca.client("idem-client", "idem");
    let base = https_upstream_config(addr, &format!("ca = {}", toml_path(&ca.ca_file())));
    let c = client();
    let dir = tempfile::tempdir().unwrap();
    let without = start_with_config(dir.path(), &base);
    let res = post(&c, without.url("/v1/charges"), Some("k1"), "{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502, "the upstream wants a client certificate");
    drop(without);
    let dir = tempfile::tempdir().unwrap();
    let with = start_with_config(
        dir.path(),
        &format!(
            "{base}cert = {}\nkey = {}\n",
            toml_path(&client_pair.cert),
            toml_path(&client_pair.key)
        ),
    );
    let res = post(&c, with.url("/v1/charges"), Some("k1"), "{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(executions.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_upstream_certificates_are_refused_and_named() {
    let ca = TestCa::new("trusted");
    let other = TestCa::new("other");
    let cases = [
        (
            other.server("up", &["localhost"], Validity::Current),
            "UnknownIssuer",
        ),
        (
            ca.server("expired", &["localhost"], Validity::Expired),
            "Expired",
        ),
        (
            ca.server("elsewhere", &["elsewhere.invalid"], Validity::Current),
            "NotValidForName",
        ),
    ];
    let c = client();
    for (pair, says) in cases {
        let (addr, executions) = https_upstream(&pair, None).await;
        let dir = tempfile::tempdir().unwrap();
        let idem = start_with_config(
            dir.path(),
            &https_upstream_config(addr, &format!("ca = {}", toml_path(&ca.ca_file()))),
        );
        let res = post(&c, idem.url("/v1/charges"), Some("k"), "{}")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 502, "{says}");
        assert_eq!(executions.load(Ordering::SeqCst), 0, "{says}: never sent");
        let logs = logs_with(&idem, says).await;
        assert!(logs.contains("upstream_tls.ca"), "{says}: {logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_skip_verify_works_and_is_loud() {
    let other = TestCa::new("unknown");
    let (addr, _) =
        https_upstream(&other.server("up", &["localhost"], Validity::Current), None).await;
    let dir = tempfile::tempdir().unwrap();
    let idem = start_with_config(
        dir.path(),
        &https_upstream_config(addr, "insecure_skip_verify = true"),
    );
    let res = post(&client(), idem.url("/v1/charges"), Some("k"), "{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let logs = logs_with(&idem, "NOT checked").await;
    assert!(logs.contains("WARN"), "{logs}");
}

fn tls_client(ca: &TestCa, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut config = ClientTls {
        ca_files: vec![ca.ca_file()],
        ..ClientTls::default()
    }
    .config()
    .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Every connection a full handshake: a resumed one shows no certificate anew.
    config.resumption = idem_tls::rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// Opens an HTTP/1.1 connection over TLS to `localhost` at `addr`; returns it, the
/// certificate the server showed, and the protocol ALPN chose.
async fn connect_tls(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
) -> Result<
    (
        SendRequest<Full<Bytes>>,
        CertificateDer<'static>,
        Option<Vec<u8>>,
    ),
    String,
> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let session = tls.get_ref().1;
    let peer = session.peer_certificates().unwrap()[0].clone();
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok((send, peer, alpn))
}

/// One request on an open connection, with `{}` as its body; the body of the answer is
/// read so that the connection can carry the next one.
async fn request_on(
    send: &mut SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, http::HeaderMap, Bytes), String> {
    request_with_body(send, method, path, headers, "{}").await
}

/// [`request_on`] with this body.
async fn request_with_body(
    send: &mut SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, http::HeaderMap, Bytes), String> {
    send.ready().await.map_err(|e| e.to_string())?;
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = send
        .send_request(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let (parts, body) = res.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((parts.status.as_u16(), parts.headers, body))
}

async fn charge_on(send: &mut SendRequest<Full<Bytes>>, key: &str) -> Result<u16, String> {
    let headers = [
        ("idempotency-key", key),
        ("authorization", "Bearer sk_alice"),
        ("content-type", "application/json"),
    ];
    Ok(request_on(send, "POST", "/v1/charges", &headers).await?.0)
}

fn listener_config(up: SocketAddr, pair: &PemPair, admin: bool) -> String {
    let mut toml = format!(
        "upstream = \"http://{up}\"\n[listen_tls]\ncert = {}\nkey = {}\n",
        toml_path(&pair.cert),
        toml_path(&pair.key)
    );
    if admin {
        toml.push_str(&format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n[admin.tls]\ncert = {}\nkey = {}\n",
            toml_path(&pair.cert),
            toml_path(&pair.key)
        ));
    }
    toml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_and_admin_listeners_over_tls() {
    let up = upstream().await;
    let ca = TestCa::new("listen");
    let pair = ca.server("listen", &["localhost"], Validity::Current);
    let dir = tempfile::tempdir().unwrap();
    let idem = start_with_config(dir.path(), &listener_config(up.addr, &pair, true));
    let config = tls_client(&ca, &[b"h2", b"http/1.1"]);
    let (_, _, alpn) = connect_tls(idem.addr, &config).await.unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "h2 is offered first");
    let config = tls_client(&ca, &[b"http/1.1"]);
    let (mut send, _, alpn) = connect_tls(idem.addr, &config).await.unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    for _ in 0..2 {
        assert_eq!(charge_on(&mut send, "k-tls").await.unwrap(), 201);
    }
    assert_eq!(
        up.counter.get("charges:k-tls"),
        1,
        "replayed over the same connection"
    );
    let (_, _, body) = request_on(&mut send, "POST", "/v1/echo", &[])
        .await
        .unwrap();
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert!(seen["forwarded"].as_str().unwrap().contains("proto=https"));
    let (mut send, _, _) = connect_tls(idem.admin.unwrap(), &config).await.unwrap();
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let (status, _, _) = request_on(&mut send, "GET", "/healthz", &[("authorization", &bearer)])
        .await
        .unwrap();
    assert_eq!(status, 200, "admin over TLS");
    admin_cookies_are_secure(&mut send).await;
    let plain = client().get(idem.url("/v1/charges")).send().await;
    assert!(plain.is_err(), "the TLS listener speaks no plain HTTP");
    let other = TestCa::new("other");
    assert!(
        connect_tls(idem.addr, &tls_client(&other, &[]))
            .await
            .is_err()
    );
}

/// Over an HTTPS admin listener, the session cookie and the cookie that ends it are
/// `Secure`: a browser never sends them over plain HTTP.
async fn admin_cookies_are_secure(send: &mut SendRequest<Full<Bytes>>) {
    let login = format!("{{\"token\":\"{ADMIN_TOKEN}\"}}");
    let json = [("content-type", "application/json")];
    let (status, headers, _) = request_with_body(send, "POST", "/login", &json, &login)
        .await
        .unwrap();
    assert_eq!(status, 200, "login over TLS");
    let set = headers["set-cookie"].to_str().unwrap().to_owned();
    assert!(set.contains("; Secure"), "{set}");
    let cookie = set.split(';').next().unwrap();
    let headers = [("cookie", cookie), ("x-requested-with", "idem-admin")];
    let (status, headers, _) = request_on(send, "POST", "/logout", &headers).await.unwrap();
    assert_eq!(status, 200, "logout over TLS");
    let cleared = headers["set-cookie"].to_str().unwrap();
    assert!(
        cleared.contains("Max-Age=0") && cleared.contains("; Secure"),
        "{cleared}"
    );
}

/// Requests in a loop until `stop`: on one kept-alive connection, or on a new
/// connection each (recording the certificate each one saw). Returns the successes,
/// and every failure.
async fn traffic(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    keep_alive: bool,
    stop: Arc<AtomicBool>,
    seen: Arc<std::sync::Mutex<Vec<CertificateDer<'static>>>>,
) -> (usize, Vec<String>) {
    let (mut ok, mut failures) = (0, Vec::new());
    let mut kept = None;
    while !stop.load(Ordering::SeqCst) {
        let key = uuid::Uuid::new_v4().to_string();
        let result = async {
            if kept.is_none() || !keep_alive {
                let (send, cert, _) = connect_tls(addr, &config).await?;
                seen.lock().unwrap().push(cert);
                kept = Some(send);
            }
            charge_on(kept.as_mut().expect("connected"), &key).await
        }
        .await;
        match result {
            Ok(201) => ok += 1,
            other => {
                failures.push(format!("{key}: {other:?}"));
                kept = None;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    (ok, failures)
}

/// Stops the traffic loops when the test ends, by success or by panic.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Renames a new certificate and key into place, sends SIGHUP, and waits until a new
/// connection is served the new certificate.
async fn rotate(
    ca: &TestCa,
    pair: &PemPair,
    idem: &Idem,
    seen: &std::sync::Mutex<Vec<CertificateDer<'static>>>,
    old: &CertificateDer<'static>,
) {
    let next = ca.server("listen-next", &["localhost"], Validity::Current);
    std::fs::rename(&next.key, &pair.key).unwrap();
    std::fs::rename(&next.cert, &pair.cert).unwrap();
    idem.signal("HUP");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.lock().unwrap().last() == Some(old) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate is never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Rotation as an operator does it: the new files are renamed into place, then SIGHUP.
/// New connections get the new certificate; the connection opened before keeps
/// working; no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_certificate_rotated_under_traffic_with_sighup() {
    let up = upstream().await;
    let ca = TestCa::new("rotate");
    let pair = ca.server("listen", &["localhost"], Validity::Current);
    let dir = tempfile::tempdir().unwrap();
    let idem = start_with_config(dir.path(), &listener_config(up.addr, &pair, false));
    let config = tls_client(&ca, &[b"http/1.1"]);
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_panic = StopOnDrop(stop.clone());
    let kept_seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let fresh_seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = tokio::spawn(traffic(
        idem.addr,
        config.clone(),
        true,
        stop.clone(),
        kept_seen.clone(),
    ));
    let fresh = tokio::spawn(traffic(
        idem.addr,
        config.clone(),
        false,
        stop.clone(),
        fresh_seen.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let old = fresh_seen
        .lock()
        .unwrap()
        .first()
        .cloned()
        .expect("traffic before the rotation");
    rotate(&ca, &pair, &idem, &fresh_seen, &old).await;
    // Some more traffic on the new certificate, then stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let (kept_ok, kept_failures) = kept.await.unwrap();
    let (fresh_ok, fresh_failures) = fresh.await.unwrap();
    assert!(
        kept_failures.is_empty() && fresh_failures.is_empty(),
        "{kept_failures:?} {fresh_failures:?}"
    );
    assert_eq!(
        kept_seen.lock().unwrap().len(),
        1,
        "the kept-alive connection was never dropped"
    );
    assert!(kept_ok > 1 && fresh_ok > 1, "{kept_ok} {fresh_ok}");
    let logs = logs_with(&idem, "TLS certificate reloaded").await;
    assert!(!logs.contains("not reloaded"), "{logs}");
}

/// Each wrong TLS setting stops start-up, and the message names the field.
#[test]
fn wrong_tls_settings_stop_start_up_naming_the_field() {
    let ca = TestCa::new("refuse");
    let a = ca.server("a", &["localhost"], Validity::Current);
    let b = ca.server("b", &["localhost"], Validity::Current);
    let missing = ca.dir().join("missing.pem");
    let up = "upstream = \"http://127.0.0.1:9\"\n";
    let https = "upstream = \"https://localhost:9\"\n";
    let (c, k, m) = (toml_path(&a.cert), toml_path(&a.key), toml_path(&missing));
    let kb = toml_path(&b.key);
    let cases = [
        (
            format!("{up}[listen_tls]\ncert = {c}\nkey = {kb}\n"),
            "listen_tls.key",
        ),
        (
            format!("{up}[listen_tls]\ncert = {m}\nkey = {k}\n"),
            "listen_tls.cert",
        ),
        (
            format!("{up}[listen_tls]\ncert = {c}\nkey = {c}\n"),
            "listen_tls.key",
        ),
        (
            format!(
                "{up}[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n[admin.tls]\ncert = {c}\nkey = {m}\n"
            ),
            "admin.tls.key",
        ),
        (
            format!("{https}[upstream_tls]\nca = {m}\n"),
            "upstream_tls.ca",
        ),
        (
            format!("{https}[upstream_tls]\ncert = {c}\nkey = {kb}\n"),
            "upstream_tls.key",
        ),
        (
            format!("{up}store = \"postgres://h/db?sslmode=verify-everything\"\n"),
            "sslmode",
        ),
        (
            format!(
                "{up}store = \"postgres://h/db?sslmode=verify-full&sslrootcert={}\"\n",
                missing.display()
            ),
            "sslrootcert",
        ),
        (
            format!(
                "{up}store = \"rediss://h:6380?sslrootcert={}\"\n",
                missing.display()
            ),
            "sslrootcert",
        ),
    ];
    for (toml, field) in cases {
        let stderr = refused_start(&toml);
        assert!(stderr.contains(field), "{toml}: {stderr}");
    }
}

/// Runs `idem serve` with this configuration, which it must refuse; returns stderr.
fn refused_start(toml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, toml).unwrap();
    let out = std::process::Command::new(common::binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{toml}: started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The managed-services examples (https upstream; rediss:// or sslmode=verify-full)
/// are valid as shipped.
#[test]
fn the_managed_services_examples_are_valid() {
    for name in ["managed-redis.toml", "managed-postgres.toml"] {
        let example = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/configs")
            .join(name);
        let text = std::fs::read_to_string(&example).unwrap();
        assert!(text.contains("upstream = \"https://"), "{name}");
        assert!(
            text.contains("rediss://") || text.contains("sslmode=verify-full"),
            "{name}"
        );
        let out = std::process::Command::new(common::binary())
            .arg("check-config")
            .arg(&example)
            .env("IDEM_TENANT_SECRET", "a-tenant-secret-of-enough-bytes")
            .env("IDEM_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
