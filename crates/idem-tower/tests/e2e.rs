//! End-to-end tests: a real axum server on 127.0.0.1 behind the layer, driven over
//! real sockets by reqwest. One test per row of SPEC §4 and per rule of §1, §2, §6, §7.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use idem_core::policy::{ErrorFormat, KeyRequirement, OnConcurrent};
use idem_core::{Policy, Routes, TenantSecret};
use idem_store_sqlite::SqliteStore;
use idem_test_support::upstream::{self, charge};
use idem_test_support::{Counter, Sent, key_of, serve_app};
use idem_tower::{IdempotencyLayer, NoStore};

async fn refund(State(c): State<Counter>, h: HeaderMap) -> Response {
    c.hit(&format!("refunds:{}", key_of(&h)));
    (StatusCode::CREATED, "refund").into_response()
}

async fn flaky(State(c): State<Counter>, h: HeaderMap) -> Response {
    // Panics on its first execution per key, succeeds after.
    if c.hit(&format!("flaky:{}", key_of(&h))) == 1 {
        panic!("handler bug");
    }
    (StatusCode::CREATED, "recovered").into_response()
}

async fn hang(State(c): State<Counter>, h: HeaderMap) -> Response {
    // Takes 1.5 s, longer than the client waits; counts completions separately.
    c.hit(&format!("hang:{}", key_of(&h)));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.hit(&format!("hang-done:{}", key_of(&h)));
    (StatusCode::CREATED, "done").into_response()
}

async fn big(State(c): State<Counter>, h: HeaderMap) -> Response {
    c.hit(&format!("big:{}", key_of(&h)));
    (
        StatusCode::CREATED,
        [("location", "/v1/big/1")],
        vec![b'x'; 64 * 1024],
    )
        .into_response()
}

async fn validate(State(c): State<Counter>, h: HeaderMap) -> Response {
    c.hit(&format!("validate:{}", key_of(&h)));
    let mut res = (StatusCode::OK, "validated but not stored").into_response();
    res.extensions_mut().insert(NoStore);
    res
}

async fn read(State(c): State<Counter>, h: HeaderMap) -> Response {
    c.hit(&format!("read:{}", key_of(&h)));
    (StatusCode::OK, "read").into_response()
}

struct App {
    addr: SocketAddr,
    counter: Counter,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

fn routes() -> Routes {
    let fast_lease = Policy::default().with_lease(Duration::from_millis(1500));
    Routes::default()
        .route(
            Some(Method::POST),
            "/v1/required",
            Policy::default().with_key(KeyRequirement::Required),
        )
        .unwrap()
        .route(
            Some(Method::POST),
            "/v1/wait",
            Policy::default()
                .with_on_concurrent(OnConcurrent::Wait)
                .with_wait_timeout(Duration::from_secs(10)),
        )
        .unwrap()
        .route(Some(Method::POST), "/v1/flaky", fast_lease.clone())
        .unwrap()
        .route(Some(Method::POST), "/v1/hang", fast_lease)
        .unwrap()
        .route(
            Some(Method::POST),
            "/v1/big",
            Policy::default().with_max_response_bytes(1024),
        )
        .unwrap()
        .route(
            Some(Method::POST),
            "/v1/small-body",
            Policy::default().with_max_request_bytes(16),
        )
        .unwrap()
        .route(
            Some(Method::POST),
            "/v1/provider",
            Policy::default()
                .with_error_format(ErrorFormat::Provider)
                .with_mismatch_status(StatusCode::BAD_REQUEST),
        )
        .unwrap()
}

async fn start() -> App {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("idem.db")).unwrap();
    let layer = IdempotencyLayer::<SqliteStore>::new(
        Arc::new(store),
        TenantSecret::new(b"e2e-test-secret-value".to_vec()).unwrap(),
    )
    .with_routes(routes());
    let counter = Counter::default();
    // The shared counting upstream's routes, and this layer's own.
    let app = upstream::routes()
        .route("/v1/charges", get(read).delete(read))
        .route("/v1/refunds", post(refund))
        .route("/v1/required", post(charge))
        .route("/v1/flaky", post(flaky))
        .route("/v1/hang", post(hang))
        .route("/v1/big", post(big))
        .route("/v1/small-body", post(charge))
        .route("/v1/validate", post(validate))
        .route("/v1/provider", post(charge))
        .route("/v1/things/{id}", get(read).put(read))
        .route("/v1/other", delete(read))
        .layer(layer)
        .with_state(counter.clone());
    let addr = serve_app(app).await;
    App {
        addr,
        counter,
        client: reqwest::Client::new(),
        _dir: dir,
    }
}

impl App {
    fn post(&self, path: &str, key: Option<&str>, body: &str) -> reqwest::RequestBuilder {
        idem_test_support::post(
            &self.client,
            format!("http://{}{path}", self.addr),
            key,
            body,
        )
    }
}

async fn problem(res: reqwest::Response) -> serde_json::Value {
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    res.json().await.unwrap()
}

#[tokio::test]
async fn retry_replays_status_headers_and_body_byte_for_byte() {
    let app = start().await;
    let first = app
        .post("/v1/charges", Some("k1"), r#"{"amount":100}"#)
        .header("x-request-id", "req-original")
        .sent()
        .await;
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let location = first.headers()["location"].clone();
    let first_body = first.bytes().await.unwrap();

    let retry = app
        .post("/v1/charges", Some("k1"), r#"{"amount":100}"#)
        .header("x-request-id", "req-retry")
        .sent()
        .await;
    assert_eq!(retry.status(), 201, "a replayed 201 stays 201");
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.headers()["idempotency-key"], "k1");
    assert_eq!(
        retry.headers()["x-request-id"],
        "req-original",
        "the original request id"
    );
    assert_eq!(retry.headers()["location"], location);
    assert!(
        retry.headers().get("set-cookie").is_none(),
        "set-cookie is never replayed"
    );
    assert_eq!(retry.bytes().await.unwrap(), first_body);
    assert_eq!(app.counter.get("charges:k1"), 1);
}

#[tokio::test]
async fn canonical_json_retry_replays() {
    let app = start().await;
    let a = app
        .post(
            "/v1/charges",
            Some("k-json"),
            r#"{"amount":100,"currency":"brl"}"#,
        )
        .sent()
        .await;
    assert_eq!(a.status(), 201);
    let b = app
        .post(
            "/v1/charges",
            Some("k-json"),
            "{ \"currency\": \"brl\",\n  \"amount\": 100.0 }",
        )
        .sent()
        .await;
    assert_eq!(b.status(), 201);
    assert_eq!(b.headers()["idempotent-replayed"], "true");
    assert_eq!(app.counter.get("charges:k-json"), 1);
}

#[tokio::test]
async fn same_key_other_body_is_422_reused() {
    let app = start().await;
    assert_eq!(
        app.post("/v1/charges", Some("k-mis"), r#"{"amount":100}"#)
            .sent()
            .await
            .status(),
        201
    );
    let res = app
        .post("/v1/charges", Some("k-mis"), r#"{"amount":999}"#)
        .sent()
        .await;
    assert_eq!(res.status(), 422);
    let p = problem(res).await;
    assert_eq!(p["type"], "urn:idem:problem:idempotency-key-reused");
    assert_eq!(p["status"], 422);
    assert_eq!(app.counter.get("charges:k-mis"), 1);
}

#[tokio::test]
async fn quoted_key_is_the_same_key() {
    let app = start().await;
    assert_eq!(
        app.post("/v1/charges", Some("k-q"), "{}")
            .sent()
            .await
            .status(),
        201
    );
    let res = app.post("/v1/charges", Some("\"k-q\""), "{}").sent().await;
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(app.counter.get("charges:k-q"), 1);
    let bad = app.post("/v1/charges", Some("\"k-q"), "{}").sent().await;
    assert_eq!(bad.status(), 400);
    assert_eq!(
        problem(bad).await["type"],
        "urn:idem:problem:idempotency-key-invalid"
    );
}

#[tokio::test]
async fn over_long_key_is_400_and_nothing_runs() {
    let app = start().await;
    let long = "k".repeat(256);
    let res = app.post("/v1/charges", Some(&long), "{}").sent().await;
    assert_eq!(res.status(), 400);
    assert_eq!(
        problem(res).await["type"],
        "urn:idem:problem:idempotency-key-invalid"
    );
    assert_eq!(app.counter.get(&format!("charges:{long}")), 0);
    assert_eq!(
        app.post("/v1/charges", Some(&"k".repeat(255)), "{}")
            .sent()
            .await
            .status(),
        201
    );
}

#[tokio::test]
async fn get_delete_and_put_are_untouched_by_a_key() {
    let app = start().await;
    for _ in 0..2 {
        for (method, path) in [
            (reqwest::Method::GET, "/v1/charges"),
            (reqwest::Method::DELETE, "/v1/charges"),
            (reqwest::Method::PUT, "/v1/things/1"),
        ] {
            let res = app
                .client
                .request(method, format!("http://{}{path}", app.addr))
                .header("idempotency-key", "k-read")
                .sent()
                .await;
            assert_eq!(res.status(), 200);
            assert!(res.headers().get("idempotent-replayed").is_none());
        }
    }
    assert_eq!(
        app.counter.get("read:k-read"),
        6,
        "every safe request executed"
    );
}

#[tokio::test]
async fn keys_are_scoped_to_the_tenant() {
    let app = start().await;
    let as_tenant = |who: &str| {
        app.client
            .post(format!("http://{}/v1/charges", app.addr))
            .header("authorization", format!("Bearer {who}"))
            .header("idempotency-key", "shared-key")
            .header("content-type", "application/json")
            .body("{}")
    };
    let alice = as_tenant("alice").sent().await.text().await.unwrap();
    let bob = as_tenant("bob").sent().await;
    assert!(
        bob.headers().get("idempotent-replayed").is_none(),
        "bob must not get alice's response"
    );
    let bob = bob.text().await.unwrap();
    assert_ne!(alice, bob);
    assert_eq!(app.counter.get("charges:shared-key"), 2);
    let alice_again = as_tenant("alice").sent().await;
    assert_eq!(alice_again.headers()["idempotent-replayed"], "true");
    assert_eq!(alice_again.text().await.unwrap(), alice);
}

#[tokio::test]
async fn same_key_on_two_routes_is_two_records() {
    let app = start().await;
    assert_eq!(
        app.post("/v1/charges", Some("k-routes"), "{}")
            .sent()
            .await
            .status(),
        201
    );
    let refund = app.post("/v1/refunds", Some("k-routes"), "{}").sent().await;
    assert_eq!(refund.status(), 201);
    assert!(refund.headers().get("idempotent-replayed").is_none());
    assert_eq!(app.counter.get("charges:k-routes"), 1);
    assert_eq!(app.counter.get("refunds:k-routes"), 1);
}

#[tokio::test]
async fn concurrent_duplicates_execute_once_and_get_409() {
    let app = Arc::new(start().await);
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                let res = app.post("/v1/slow", Some("k-storm"), "{}").sent().await;
                let status = res.status().as_u16();
                let retry_after = res.headers().get("retry-after").is_some();
                (status, retry_after, res.text().await.unwrap())
            })
        })
        .collect();
    let mut created = 0;
    let mut conflicts = 0;
    for t in tasks {
        let (status, retry_after, body) = t.await.unwrap();
        match status {
            201 => {
                created += 1;
                assert_eq!(body, "slow-k-storm");
            }
            409 => {
                conflicts += 1;
                assert!(retry_after, "409 carries Retry-After");
                assert!(body.contains("idempotency-key-in-use"));
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(app.counter.get("slow:k-storm"), 1, "exactly one execution");
    assert!(conflicts >= 1);
    assert_eq!(created + conflicts, 32);
}

#[tokio::test]
async fn wait_mode_gives_every_duplicate_the_replay() {
    let app = Arc::new(start().await);
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                let res = app.post("/v1/wait", Some("k-wait"), "{}").sent().await;
                (res.status().as_u16(), res.text().await.unwrap())
            })
        })
        .collect();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 201);
        assert_eq!(body, "slow-k-wait");
    }
    assert_eq!(app.counter.get("slow:k-wait"), 1);
}

#[tokio::test]
async fn a_500_is_stored_and_replayed() {
    let app = start().await;
    let first = app.post("/v1/fail/500", Some("k-500"), "{}").sent().await;
    assert_eq!(first.status(), 500);
    let retry = app.post("/v1/fail/500", Some("k-500"), "{}").sent().await;
    assert_eq!(retry.status(), 500);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.text().await.unwrap(), "status 500, execution 1");
    assert_eq!(app.counter.get("fail:500:k-500"), 1);
}

#[tokio::test]
async fn a_400_releases_the_key_and_the_retry_executes() {
    let app = start().await;
    for expected in 1..=2 {
        let res = app.post("/v1/fail/400", Some("k-400"), "{}").sent().await;
        assert_eq!(res.status(), 400);
        assert!(res.headers().get("idempotent-replayed").is_none());
        assert_eq!(
            res.text().await.unwrap(),
            format!("status 400, execution {expected}")
        );
    }
    for code in [409, 422, 429, 503] {
        app.post(&format!("/v1/fail/{code}"), Some("k-x"), "{}")
            .sent()
            .await;
        app.post(&format!("/v1/fail/{code}"), Some("k-x"), "{}")
            .sent()
            .await;
        assert_eq!(
            app.counter.get(&format!("fail:{code}:k-x")),
            2,
            "{code} is not stored"
        );
    }
}

#[tokio::test]
async fn handler_saying_no_store_releases_the_key() {
    let app = start().await;
    for _ in 0..2 {
        let res = app.post("/v1/validate", Some("k-ns"), "{}").sent().await;
        assert_eq!(res.status(), 200);
        assert!(res.headers().get("idempotent-replayed").is_none());
    }
    assert_eq!(app.counter.get("validate:k-ns"), 2);
}

#[tokio::test]
async fn handler_panic_leaves_the_key_usable_after_the_lease() {
    // No backtrace printing (slow in debug builds): the 409 below must come within the lease.
    std::panic::set_hook(Box::new(|_| {}));
    let app = start().await;
    let first = app.post("/v1/flaky", Some("k-panic"), "{}").sent().await;
    assert_eq!(first.status(), 500);
    assert_eq!(
        problem(first).await["type"],
        "urn:idem:problem:handler-failed"
    );
    // Its outcome is unknown: in flight until the lease ends.
    assert_eq!(
        app.post("/v1/flaky", Some("k-panic"), "{}")
            .sent()
            .await
            .status(),
        409
    );
    // The lease (1.5 s) runs out; then the key is reclaimed and executes again.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let res = app.post("/v1/flaky", Some("k-panic"), "{}").sent().await;
    assert_eq!(res.status(), 201);
    assert_eq!(res.text().await.unwrap(), "recovered");
    assert_eq!(app.counter.get("flaky:k-panic"), 2);
    let replay = app.post("/v1/flaky", Some("k-panic"), "{}").sent().await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
}

#[tokio::test]
async fn a_caller_leaving_does_not_cancel_the_handler_and_the_retry_replays() {
    let app = start().await;
    let gave_up = app
        .post("/v1/hang", Some("k-drop"), "{}")
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(gave_up.is_err(), "the client gives up");
    // The handler keeps running (its lease renewed): a retry now is in use.
    let during = app.post("/v1/hang", Some("k-drop"), "{}").sent().await;
    assert_eq!(during.status(), 409);
    // Once it finished, its outcome was stored although nobody read it.
    let mut replay = None;
    for _ in 0..100 {
        let res = app.post("/v1/hang", Some("k-drop"), "{}").sent().await;
        if res.status() != 409 {
            replay = Some(res);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let replay = replay.expect("the key was still in use after 10 s");
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(app.counter.get("hang:k-drop"), 1, "executed once");
    assert_eq!(app.counter.get("hang-done:k-drop"), 1, "and to its end");
}

#[tokio::test]
async fn oversized_response_is_delivered_once_and_never_executed_twice() {
    let app = start().await;
    let first = app.post("/v1/big", Some("k-big"), "{}").sent().await;
    assert_eq!(first.status(), 201);
    assert_eq!(
        first.bytes().await.unwrap().len(),
        64 * 1024,
        "the first caller gets the whole body"
    );
    let retry = app.post("/v1/big", Some("k-big"), "{}").sent().await;
    assert_eq!(
        retry.status(),
        201,
        "the replay carries the original status"
    );
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.headers()["location"], "/v1/big/1");
    let p = problem(retry).await;
    assert_eq!(
        p["type"],
        "urn:idem:problem:idempotency-response-not-replayable"
    );
    assert_eq!(p["original_status"], 201);
    assert_eq!(app.counter.get("big:k-big"), 1);
}

#[tokio::test]
async fn required_key_missing_is_400() {
    let app = start().await;
    let res = app.post("/v1/required", None, "{}").sent().await;
    assert_eq!(res.status(), 400);
    assert_eq!(
        problem(res).await["type"],
        "urn:idem:problem:idempotency-key-missing"
    );
    assert_eq!(app.counter.get("charges"), 0);
    // Optional elsewhere: no key passes through unprotected.
    assert_eq!(
        app.post("/v1/charges", None, "{}").sent().await.status(),
        201
    );
    assert_eq!(
        app.post("/v1/charges", None, "{}").sent().await.status(),
        201
    );
    assert_eq!(app.counter.get("charges:"), 2);
}

#[tokio::test]
async fn request_over_the_cap_is_413_before_anything_runs() {
    let app = start().await;
    let res = app
        .post("/v1/small-body", Some("k-413"), &"x".repeat(17))
        .sent()
        .await;
    assert_eq!(res.status(), 413);
    assert_eq!(
        problem(res).await["type"],
        "urn:idem:problem:request-too-large"
    );
    // Chunked (no Content-Length) is caught while reading.
    let stream = futures_stream(vec![b"0123456789".to_vec(), b"0123456789".to_vec()]);
    let res = app
        .client
        .post(format!("http://{}/v1/small-body", app.addr))
        .header("idempotency-key", "k-413b")
        .body(reqwest::Body::wrap_stream(stream))
        .sent()
        .await;
    assert_eq!(res.status(), 413);
    assert_eq!(app.counter.get("charges"), 0);
    // Nothing was stored: the same key with a small body executes.
    assert_eq!(
        app.post("/v1/small-body", Some("k-413"), "{}")
            .sent()
            .await
            .status(),
        201
    );
}

fn futures_stream(
    chunks: Vec<Vec<u8>>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    struct Chunks(std::vec::IntoIter<Vec<u8>>);
    impl futures_core::Stream for Chunks {
        type Item = Result<Vec<u8>, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(self.0.next().map(Ok))
        }
    }
    Chunks(chunks.into_iter())
}

#[tokio::test]
async fn provider_error_format_and_status() {
    let app = start().await;
    assert_eq!(
        app.post("/v1/provider", Some("k-prov"), r#"{"a":1}"#)
            .sent()
            .await
            .status(),
        201
    );
    let res = app
        .post("/v1/provider", Some("k-prov"), r#"{"a":2}"#)
        .sent()
        .await;
    assert_eq!(res.status(), 400);
    let doc: serde_json::Value = res.json().await.unwrap();
    assert_eq!(doc["error"]["type"], "invalid_request_error");
    assert_eq!(doc["error"]["code"], "idempotency_key_conflict");
}

#[tokio::test]
async fn two_key_headers_with_different_values_are_400() {
    let app = start().await;
    let res = app
        .post("/v1/charges", Some("k-a"), "{}")
        .header("idempotency-key", "k-b")
        .sent()
        .await;
    assert_eq!(res.status(), 400);
    assert_eq!(app.counter.get("charges"), 0);
}

#[tokio::test]
async fn executions_counted_once_across_many_sequential_retries() {
    let app = start().await;
    let counter = Arc::new(AtomicUsize::new(0));
    for _ in 0..10 {
        let res = app.post("/v1/charges", Some("k-many"), "{}").sent().await;
        if res.headers().get("idempotent-replayed").is_some() {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    }
    assert_eq!(counter.load(Ordering::SeqCst), 9);
    assert_eq!(app.counter.get("charges:k-many"), 1);
}

/// A memory store whose `complete` waits until the test opens its gate (a store that
/// has to reconnect, or to wait for a pooled connection).
struct SlowComplete {
    inner: idem_store_memory::MemoryStore,
    gate: tokio::sync::Semaphore,
}

impl idem_core::Store for SlowComplete {
    async fn complete(
        &self,
        key: &idem_core::RecordKey,
        token: idem_core::FencingToken,
        response: &idem_core::StoredResponse,
        ttl: Duration,
    ) -> Result<bool, idem_core::StoreError> {
        drop(self.gate.acquire().await.unwrap());
        self.inner.complete(key, token, response, ttl).await
    }
    idem_core::forward_store!(inner => claim, reclaim, release, renew, get, delete, purge_expired, ping);
}

impl idem_core::Wakeups for SlowComplete {
    idem_core::forward_store!(inner => watch);
}

/// hyper sends a 204 without a body and drops the body it was given unread, so the
/// end of that body cannot hold the response back: the layer must store the outcome
/// before the 204 leaves, or a retry sent right after it finds the key in flight (409).
/// Over a real socket: while `complete` waits, no 204 reaches the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_204_reaches_the_caller_only_once_its_outcome_is_stored() {
    let store = Arc::new(SlowComplete {
        inner: idem_store_memory::MemoryStore::new(),
        gate: tokio::sync::Semaphore::new(0),
    });
    let layer = IdempotencyLayer::new(
        store.clone(),
        TenantSecret::new(b"e2e-test-secret-value".to_vec()).unwrap(),
    );
    let counter = Counter::default();
    let app = upstream::routes().layer(layer).with_state(counter.clone());
    let addr = serve_app(app).await;
    let client = reqwest::Client::new();
    let send = move || {
        idem_test_support::post(
            &client,
            format!("http://{addr}/v1/fail/204"),
            Some("k-204"),
            "{}",
        )
        .send()
    };
    let mut first = tokio::spawn(send());
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut first)
            .await
            .is_err(),
        "the 204 reached the caller while its outcome was not stored"
    );
    store.gate.add_permits(1);
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), 204);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let retry = send().await.unwrap();
    assert_eq!(retry.status(), 204);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(counter.get("fail:204:k-204"), 1);
}
