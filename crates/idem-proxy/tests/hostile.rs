//! Hostile input against the real `idem` binary (issue 8): oversized headers, bodies
//! and keys, clients that send slowly or stall, malformed JSON, bytes that are not
//! text in the key, and a flood of new keys. Every case checks that idem answers (or
//! closes) without hanging, never calls the upstream for a request it refuses, and
//! keeps serving afterwards.
//!
//! Requests that a well-behaved HTTP client cannot send are written by hand on a raw
//! TCP socket (`raw_exchange`). Every wait is bounded by a deadline; no assertion
//! is about how long something took.

mod common;

// The fuzz targets' checks (fuzz/src/lib.rs), replayed here on the committed corpora:
// this test binary is built with the workspace, so CI replays them at no build cost.
#[allow(dead_code, unreachable_pub)]
#[path = "../../../fuzz/src/lib.rs"]
mod fuzz_checks;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Idem, start_idem};
use idem_test_support::{Upstream, client, post, upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest any single exchange in this file may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(20);

/// A small body cap and a short header timeout, so the limits are cheap to reach.
const CONFIG: &str = r#"
[proxy]
header_read_timeout = "1s"

[tenant]
max_in_flight = 4
max_records = 300

[defaults]
max_request_bytes = 1024
body_read_timeout = "2s"
"#;

fn start(up: &Upstream, dir: &std::path::Path) -> Idem {
    let config = dir.join("idem.toml");
    std::fs::write(&config, CONFIG).unwrap();
    start_idem(
        dir,
        &[
            "--config",
            config.to_str().unwrap(),
            "--upstream",
            &format!("http://{}", up.addr),
            "--store",
            "memory",
        ],
    )
}

/// What came back on a raw connection.
#[derive(Debug)]
enum Raw {
    /// A response: status, lower-cased headers, body (as read until the peer closed).
    Response {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// The peer closed or reset the connection without a (complete) status line.
    Closed,
}

impl Raw {
    fn status(&self) -> Option<u16> {
        match self {
            Raw::Response { status, .. } => Some(*status),
            Raw::Closed => None,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        match self {
            Raw::Response { headers, .. } => headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str()),
            Raw::Closed => None,
        }
    }

    fn problem_type(&self) -> Option<String> {
        match self {
            Raw::Response { body, .. } => serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v["type"].as_str().map(str::to_owned)),
            Raw::Closed => None,
        }
    }
}

/// Reads until the peer closes (requests here say `Connection: close`), then parses
/// the status line and headers. A reset counts as a close.
async fn read_until_closed(stream: &mut TcpStream) -> Raw {
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(DEADLINE, read_all)
        .await
        .expect("idem neither answered nor closed the connection");
    parse_response(&seen)
}

fn parse_response(bytes: &[u8]) -> Raw {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Raw::Closed;
    };
    let head = String::from_utf8_lossy(&bytes[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = bytes[end + 4..].to_vec();
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Raw::Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
            .expect("a chunk size");
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&data[start..start + size]);
        data = &data[start + size + 2..];
    }
    out
}

/// Sends `request` on a new connection (a write that fails because idem already
/// answered and closed is not an error), then reads until idem closes.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Raw {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // A large request may be refused part-way: idem answers and closes, and the rest
    // of our write fails with a reset or a broken pipe.
    let _ = tokio::time::timeout(DEADLINE, stream.write_all(request))
        .await
        .expect("the write neither finished nor failed");
    read_until_closed(&mut stream).await
}

/// A POST head with the usual credential, `Connection: close`, and extra header lines.
fn head(path: &str, extra: &[&[u8]]) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nhost: idem.test\r\nauthorization: Bearer sk_alice\r\n\
         content-type: application/json\r\nconnection: close\r\n"
    )
    .into_bytes();
    for line in extra {
        req.extend_from_slice(line);
        req.extend_from_slice(b"\r\n");
    }
    req
}

/// A complete POST with a Content-Length body.
fn request(path: &str, extra: &[&[u8]], body: &[u8]) -> Vec<u8> {
    let mut req = head(path, extra);
    req.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    req.extend_from_slice(body);
    req
}

/// Idem still serves: a fresh key executes once and its retry replays.
async fn still_serves(idem: &Idem, up: &Upstream, key: &str) {
    let c = client();
    let first = post(&c, idem.url("/v1/charges"), Some(key), "{}")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    let retry = post(&c, idem.url("/v1/charges"), Some(key), "{}")
        .send()
        .await
        .unwrap();
    assert_eq!(retry.status(), 201);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(up.counter.get(&format!("charges:{key}")), 1);
}

fn assert_alive(idem: &mut Idem) {
    assert!(
        idem.child.try_wait().unwrap().is_none(),
        "idem exited: {:?}",
        idem.stderr.lock().unwrap()
    );
}

#[tokio::test]
async fn oversized_headers_are_refused_and_idem_keeps_serving() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut idem = start(&up, dir.path());

    // 100 KB in one header is within hyper's HTTP/1 read buffer (about 400 KB), which
    // idem does not lower: the request is served like any other, once.
    let big = format!("x-padding: {}", "a".repeat(100 * 1024));
    let res = raw_exchange(
        idem.addr,
        &request(
            "/v1/charges",
            &[big.as_bytes(), b"idempotency-key: big-100k"],
            b"{}",
        ),
    )
    .await;
    assert_eq!(res.status(), Some(201), "{res:?}");
    assert_eq!(up.counter.get("charges:big-100k"), 1);

    // 1 MB of headers overflows the buffer: 431, or a reset if the close overtakes
    // the answer while we are still writing. Never forwarded.
    let huge = format!("x-padding: {}", "a".repeat(1024 * 1024));
    let res = raw_exchange(
        idem.addr,
        &request(
            "/v1/charges",
            &[huge.as_bytes(), b"idempotency-key: big-1m"],
            b"{}",
        ),
    )
    .await;
    assert!(
        matches!(res.status(), Some(431) | None),
        "1 MB of headers: {res:?}"
    );
    assert_eq!(up.counter.get("charges:big-1m"), 0);

    // Many small headers: more than hyper's limit of 100 → 431.
    let many: Vec<String> = (0..200).map(|i| format!("x-h{i}: {i}")).collect();
    let mut lines: Vec<&[u8]> = many.iter().map(|s| s.as_bytes()).collect();
    lines.push(b"idempotency-key: many-headers");
    let res = raw_exchange(idem.addr, &request("/v1/charges", &lines, b"{}")).await;
    assert!(
        matches!(res.status(), Some(431) | None),
        "200 headers: {res:?}"
    );
    assert_eq!(up.counter.get("charges:many-headers"), 0);

    assert_alive(&mut idem);
    still_serves(&idem, &up, "after-big-headers").await;
}

#[tokio::test]
async fn oversized_bodies_get_413_and_never_reach_the_upstream() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut idem = start(&up, dir.path());
    let body = format!(r#"{{"pad":"{}"}}"#, "a".repeat(4096));

    // Declared too large: refused from the Content-Length, before reading the body.
    let res = raw_exchange(
        idem.addr,
        &request(
            "/v1/charges",
            &[b"idempotency-key: big-cl"],
            body.as_bytes(),
        ),
    )
    .await;
    assert_eq!(res.status(), Some(413), "{res:?}");
    assert_eq!(res.header("content-type"), Some("application/problem+json"));
    assert!(
        res.problem_type().unwrap().ends_with("request-too-large"),
        "{res:?}"
    );

    // No Content-Length (chunked): refused once the cap is crossed while reading.
    let mut req = head(
        "/v1/charges",
        &[
            b"idempotency-key: big-chunked",
            b"transfer-encoding: chunked",
        ],
    );
    req.extend_from_slice(b"\r\n");
    for chunk in body.as_bytes().chunks(500) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let res = raw_exchange(idem.addr, &req).await;
    assert_eq!(res.status(), Some(413), "{res:?}");
    assert!(res.problem_type().unwrap().ends_with("request-too-large"));

    // A lying Content-Length (small, then more bytes) is cut at the declared length:
    // the extra bytes are a malformed next request on a closed connection.
    let res = raw_exchange(
        idem.addr,
        &[
            request("/v1/charges", &[b"idempotency-key: small-cl"], b"{}"),
            body.clone().into_bytes(),
        ]
        .concat(),
    )
    .await;
    assert_eq!(res.status(), Some(201), "{res:?}");

    // The refused keys were not stored: each runs once when retried within the cap.
    assert_eq!(up.counter.get("charges:big-cl"), 0);
    assert_eq!(up.counter.get("charges:big-chunked"), 0);
    for key in ["big-cl", "big-chunked"] {
        let res = post(&client(), idem.url("/v1/charges"), Some(key), "{}")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
        assert_eq!(up.counter.get(&format!("charges:{key}")), 1);
    }
    assert_eq!(up.counter.get("charges:small-cl"), 1);

    assert_alive(&mut idem);
    still_serves(&idem, &up, "after-big-bodies").await;
}

#[tokio::test]
async fn oversized_and_non_text_keys_get_400() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut idem = start(&up, dir.path());

    let long = format!("idempotency-key: {}", "k".repeat(256));
    let very_long = format!("idempotency-key: {}", "k".repeat(8 * 1024));
    let quoted_long = format!("idempotency-key: \"{}\"", "k".repeat(256));
    let cases: &[(&str, Vec<u8>)] = &[
        ("256 characters", long.into_bytes()),
        ("8 KB", very_long.into_bytes()),
        ("a 256-character sf-string", quoted_long.into_bytes()),
        ("invalid UTF-8", b"idempotency-key: k\xff\xfe".to_vec()),
        ("valid UTF-8, not ASCII", "idempotency-key: cl\u{e9}".into()),
        ("a tab inside", b"idempotency-key: tab\there".to_vec()),
        (
            "an sf-string with a bad escape",
            br#"idempotency-key: "a\nb""#.to_vec(),
        ),
        (
            "an unterminated sf-string",
            br#"idempotency-key: "abc"#.to_vec(),
        ),
        ("an empty value", b"idempotency-key: ".to_vec()),
        ("an empty sf-string", br#"idempotency-key: """#.to_vec()),
    ];
    for (what, line) in cases {
        let res = raw_exchange(idem.addr, &request("/v1/charges", &[line], b"{}")).await;
        assert_eq!(res.status(), Some(400), "{what}: {res:?}");
        assert_eq!(
            res.header("content-type"),
            Some("application/problem+json"),
            "{what}"
        );
        assert!(
            res.problem_type()
                .unwrap()
                .ends_with("idempotency-key-invalid"),
            "{what}: {res:?}"
        );
    }

    // Control characters (other than tab) and DEL are not legal in an HTTP field
    // value: hyper refuses the request before idem sees it, with a bare 400 (no
    // problem body) and a close. Either way: a 400 and nothing forwarded.
    for ctl in [b'\x00', b'\x01', b'\x1b', b'\x7f'] {
        let line = [b"idempotency-key: k".as_slice(), &[ctl], b"k"].concat();
        let res = raw_exchange(idem.addr, &request("/v1/charges", &[&line], b"{}")).await;
        assert!(
            matches!(res.status(), Some(400) | None),
            "control byte {ctl:#04x}: {res:?}"
        );
    }
    // A bare CR or LF inside the value breaks the framing: refused likewise.
    let res = raw_exchange(
        idem.addr,
        &request("/v1/charges", &[b"idempotency-key: a\rb"], b"{}"),
    )
    .await;
    assert!(matches!(res.status(), Some(400) | None), "CR: {res:?}");

    // Nothing above reached the upstream.
    assert_eq!(up.counter.get("charges"), 0, "no refused request executed");

    // 255 characters is the default maximum: accepted.
    let key255 = "k".repeat(255);
    still_serves(&idem, &up, &key255).await;
    assert_alive(&mut idem);
}

#[tokio::test]
async fn a_client_sending_headers_too_slowly_is_disconnected() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut idem = start(&up, dir.path());

    let req = request("/v1/charges", &[b"idempotency-key: slowloris"], b"{}");
    let mut stream = TcpStream::connect(idem.addr).await.unwrap();
    // One byte every 100 ms: the whole head would take far longer than the configured
    // `header_read_timeout` of 1 s. Bounded: at most one pass over the request.
    let mut closed_while_writing = false;
    for byte in &req[..req.len() - 4] {
        if stream.write_all(std::slice::from_ref(byte)).await.is_err() {
            closed_while_writing = true;
            break;
        }
        // A closed peer is noticed on read sooner than on write.
        let mut probe = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut probe)).await {
            Err(_) => continue,
            Ok(Ok(0) | Err(_)) => {
                closed_while_writing = true;
                break;
            }
            Ok(Ok(n)) => {
                let res = parse_response(&probe[..n]);
                panic!("idem answered a request it had not fully received: {res:?}");
            }
        }
    }
    assert!(
        closed_while_writing,
        "idem kept a connection whose headers took {} × 100 ms",
        req.len()
    );
    assert_eq!(up.counter.get("charges:slowloris"), 0);
    assert_alive(&mut idem);
    still_serves(&idem, &up, "after-slowloris").await;
}

/// idem reads the whole request body of a request with a key before it looks the
/// key up, within `body_read_timeout`: a client that stalls mid-body never holds the
/// key (nothing is claimed yet), and past the timeout gets 408 and is disconnected.
#[tokio::test]
async fn a_client_stalling_mid_body_does_not_hold_the_key() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut idem = start(&up, dir.path());
    let body = br#"{"amount":100}"#;

    let mut stalled = TcpStream::connect(idem.addr).await.unwrap();
    let mut req = head(
        "/v1/charges",
        &[
            b"idempotency-key: stalled",
            format!("content-length: {}", body.len()).as_bytes(),
        ],
    );
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(&body[..5]);
    stalled.write_all(&req).await.unwrap();

    // Meanwhile a retry with the same key and the whole body is executed at once:
    // no 409 in-use, since the stalled request claimed nothing.
    let c = client();
    let res = post(
        &c,
        idem.url("/v1/charges"),
        Some("stalled"),
        r#"{"amount":100}"#,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(up.counter.get("charges:stalled"), 1);

    // Past body_read_timeout (2 s) the stalled request is answered 408 and its
    // connection closed; nothing was executed for it.
    let res = tokio::time::timeout(Duration::from_secs(30), read_until_closed(&mut stalled))
        .await
        .expect("the stalled request is answered within the body read timeout");
    assert_eq!(res.status(), Some(408), "{res:?}");
    assert_eq!(
        res.problem_type().as_deref(),
        Some("urn:idem:problem:request-body-timeout")
    );
    assert_eq!(res.header("connection"), Some("close"));
    assert_eq!(up.counter.get("charges:stalled"), 1);

    // A client that goes away mid-body leaves nothing behind.
    let mut gone = TcpStream::connect(idem.addr).await.unwrap();
    let mut req = head(
        "/v1/charges",
        &[b"idempotency-key: gone", b"content-length: 100"],
    );
    req.extend_from_slice(b"\r\n{\"a\":");
    gone.write_all(&req).await.unwrap();
    drop(gone);
    still_serves(&idem, &up, "gone").await;
    assert_alive(&mut idem);
}

#[tokio::test]
async fn malformed_json_is_fingerprinted_as_bytes() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut idem = start(&up, dir.path());
    let c = client();
    let send = |body: &'static [u8]| {
        c.post(idem.url("/v1/charges"))
            .header("authorization", "Bearer sk_alice")
            .header("content-type", "application/json")
            .header("idempotency-key", "bad-json")
            .body(body)
            .send()
    };
    let first = send(b"{\"amount\": 100,").await.unwrap();
    assert_eq!(first.status(), 201);
    let first_body = first.bytes().await.unwrap();

    // The same malformed bytes: a retry, replayed byte for byte.
    let retry = send(b"{\"amount\": 100,").await.unwrap();
    assert_eq!(retry.status(), 201);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.bytes().await.unwrap(), first_body);

    // Other malformed bytes, even only in whitespace, or bytes that are not UTF-8:
    // another request with the same key.
    for other in [
        b"{\"amount\": 100, ".as_slice(),
        b"{\"amount\":100,",
        b"{\"amount\": 100,\xff",
        b"\xff\xfe\x00",
    ] {
        let res = c
            .post(idem.url("/v1/charges"))
            .header("authorization", "Bearer sk_alice")
            .header("content-type", "application/json")
            .header("idempotency-key", "bad-json")
            .body(other)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 422, "{other:?}");
    }
    assert_eq!(up.counter.get("charges:bad-json"), 1);

    // Deeply nested JSON (beyond serde_json's recursion limit) does not crash idem:
    // it falls back to the bytes like any other body that does not parse.
    // 500 levels (1000 bytes, within the 1 KiB cap), past serde_json's limit of 128.
    let deep = format!("{}{}", "[".repeat(500), "]".repeat(500));
    for replayed in [false, true] {
        let res = post(&c, idem.url("/v1/charges"), Some("deep"), &deep)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
        assert_eq!(res.headers().contains_key("idempotent-replayed"), replayed);
    }
    assert_eq!(up.counter.get("charges:deep"), 1);
    assert_alive(&mut idem);
}

/// One tenant floods new keys: `[tenant] max_in_flight = 4` and `max_records = 300`
/// hold exactly, refused keys get 429 `tenant-limit-reached` and never run, records
/// already held still replay, and other tenants are served meanwhile.
#[tokio::test]
async fn a_flood_of_new_keys_from_one_tenant_is_capped() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut idem = start(&up, dir.path());
    let c = client();
    let flood = |path: &str, key: &str| {
        c.post(idem.url(path))
            .header("authorization", "Bearer sk_flood")
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(r#"{"amount":1}"#)
    };
    let refused = |res: &reqwest::Response| {
        res.status() == 429
            && res.headers().contains_key("retry-after")
            && res.headers()["content-type"] == "application/problem+json"
    };

    // In flight: 12 slow requests (5 s each) at once, 4 run, 8 are refused.
    let slow: Vec<String> = (0..12).map(|i| format!("slow-{i}")).collect();
    let mut sends = tokio::task::JoinSet::new();
    for k in &slow {
        let req = flood("/v1/slow", k).header("x-delay-ms", "5000");
        let k = k.clone();
        sends.spawn(async move { (k, req.send().await.unwrap()) });
    }
    // Another tenant is served while this one is at its in-flight cap.
    tokio::time::sleep(Duration::from_millis(500)).await;
    still_serves(&idem, &up, "during-flood").await;
    let (mut ran, mut capped) = (0, 0);
    while let Some(r) = sends.join_next().await {
        let (k, res) = r.unwrap();
        if res.status() == 201 {
            ran += 1;
            assert_eq!(up.counter.get(&format!("slow:{k}")), 1, "{k}");
        } else {
            assert!(refused(&res), "{k}: {res:?}");
            let body: serde_json::Value = res.json().await.unwrap();
            assert_eq!(body["type"], "urn:idem:problem:tenant-limit-reached");
            assert_eq!(up.counter.get(&format!("slow:{k}")), 0, "{k} ran");
            capped += 1;
        }
    }
    assert_eq!((ran, capped), (4, 8), "the in-flight cap holds exactly");

    // Live records: 600 new keys, 4 at a time (within the in-flight cap). With the 4
    // slow records, 300 are held: the first 296 run, every later one is refused.
    const KEYS: usize = 600;
    let rss_before = rss_kib(&idem);
    let keys: Vec<String> = (0..KEYS).map(|i| format!("flood-{i}")).collect();
    let mut executed = Vec::new();
    for batch in keys.chunks(4) {
        let mut sends = tokio::task::JoinSet::new();
        for k in batch {
            let req = flood("/v1/charges", k);
            let k = k.clone();
            sends.spawn(async move { (k, req.send().await.unwrap()) });
        }
        while let Some(r) = sends.join_next().await {
            let (k, res) = r.unwrap();
            if res.status() == 201 {
                executed.push(k);
            } else {
                assert!(refused(&res), "{k}: {res:?}");
            }
        }
    }
    let rss_after = rss_kib(&idem);
    assert_eq!(executed.len(), 300 - 4, "the record cap holds exactly");
    for k in &keys {
        let runs = usize::from(executed.contains(k));
        assert_eq!(up.counter.get(&format!("charges:{k}")), runs, "{k}");
    }
    // At the cap, records already held still replay; the cap is the tenant's, on
    // every route.
    for k in executed.iter().step_by(50) {
        let res = flood("/v1/charges", k).send().await.unwrap();
        assert_eq!(res.status(), 201);
        assert_eq!(res.headers()["idempotent-replayed"], "true", "{k}");
    }
    let res = flood("/v1/charges/ch_1/capture", "another-route")
        .send()
        .await
        .unwrap();
    assert!(refused(&res), "{res:?}");
    println!("idem RSS: {rss_before:?} KiB before, {rss_after:?} KiB after {KEYS} new keys");
    assert_alive(&mut idem);
    still_serves(&idem, &up, "after-flood").await;
}

/// Resident memory of the idem process, from /proc (Linux), for the log.
fn rss_kib(idem: &Idem) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", idem.child.id())).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Every committed fuzz corpus file (and every local crash under `fuzz/artifacts/`,
/// which is not committed) through its target's checks: past findings stay fixed.
/// `bash fuzz/run.sh --short` runs this test alone.
#[test]
fn fuzz_corpora_replay() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut total = 0;
    for (name, check) in fuzz_checks::TARGETS {
        let mut inputs = 0;
        for dir in [
            root.join("corpus").join(name),
            root.join("artifacts").join(name),
        ] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut paths: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
            paths.sort();
            for path in paths {
                let data = std::fs::read(&path).unwrap();
                let outcome = std::panic::catch_unwind(|| check(&data));
                assert!(outcome.is_ok(), "{name}: {} fails", path.display());
                inputs += 1;
            }
        }
        assert!(inputs > 0, "{name}: no corpus under fuzz/corpus/{name}");
        println!("{name}: {inputs} inputs replayed");
        total += inputs;
    }
    println!("{total} fuzz inputs replayed");
}
