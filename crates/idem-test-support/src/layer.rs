//! The Tower layer over a shared store, as every shared store's tests run it: layer
//! servers over one store, a handler that counts executions per key, a duplicate
//! storm, a retry right after the answer, and a restart of the store's private server
//! during traffic.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use idem_conformance::servers::PrivateStore;
use idem_core::policy::OnStoreError;
use idem_core::{Policy, Routes, TenantSecret, Wakeups};
use idem_tower::IdempotencyLayer;

use crate::{Counter, key_of, serve_app};

/// 201 `charged <key>`, counting executions under the bare key.
async fn charge(axum::extract::State(c): axum::extract::State<Counter>, h: HeaderMap) -> Response {
    let key = key_of(&h);
    c.hit(&key);
    // Slow enough that concurrent duplicates overlap with the execution.
    tokio::time::sleep(Duration::from_millis(20)).await;
    (StatusCode::CREATED, format!("charged {key}")).into_response()
}

/// Starts an axum server on 127.0.0.1:0 behind the idempotency layer over `store`.
/// `/v1/charges` rejects with 503 when the store is down (the default);
/// `/v1/open` passes through unprotected instead.
pub async fn serve<S: Wakeups>(store: Arc<S>, counter: Counter) -> SocketAddr {
    let routes = Routes::default()
        .route(
            Some(Method::POST),
            "/v1/open",
            Policy::default().with_on_store_error(OnStoreError::Passthrough),
        )
        .unwrap();
    let layer = IdempotencyLayer::<S>::new(
        store,
        TenantSecret::new(b"storm-test-secret-value".to_vec()).unwrap(),
    )
    .with_routes(routes);
    let app = Router::new()
        .route("/v1/charges", post(charge))
        .route("/v1/open", post(charge))
        .layer(layer)
        .with_state(counter);
    serve_app(app).await
}

/// What one request got back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Executed now (not a replay).
    Executed,
    /// The stored response, replayed.
    Replayed,
    /// 409 `idempotency-key-in-use`.
    InUse,
    /// 503 `idempotency-store-unavailable`.
    StoreUnavailable,
    /// Headers came, then the body broke off: the outcome could not be stored (the
    /// layer does not deliver a response whole unless it is), so it is unknown.
    BrokenOff(u16),
    /// The connection closed before any response: for a small body the head goes out
    /// with the (held) last chunk, so an outcome that could not be stored shows this
    /// way. Unknown whether it executed.
    Unanswered,
    /// Anything else: status and body.
    Other(u16, String),
}

/// POSTs `{"amount":100}` to `path` as `tenant` with `key`, and says what came back.
pub async fn send(
    client: &reqwest::Client,
    addr: SocketAddr,
    path: &str,
    tenant: &str,
    key: &str,
) -> Answer {
    let res = match client
        .post(format!("http://{addr}{path}"))
        .header("authorization", tenant)
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(r#"{"amount":100}"#)
        .send()
        .await
    {
        Ok(res) => res,
        Err(e) if e.is_request() => return Answer::Unanswered,
        Err(e) => return Answer::Other(0, e.to_string()),
    };
    let status = res.status().as_u16();
    let replayed = res.headers().get("idempotent-replayed").is_some();
    let body = match res.text().await {
        Ok(body) => body,
        Err(_) => return Answer::BrokenOff(status),
    };
    match status {
        201 if replayed && body == format!("charged {key}") => Answer::Replayed,
        201 if !replayed && body == format!("charged {key}") => Answer::Executed,
        409 if body.contains("idempotency-key-in-use") => Answer::InUse,
        503 if body.contains("idempotency-store-unavailable") => Answer::StoreUnavailable,
        _ => Answer::Other(status, body),
    }
}

/// 1,000 keys × 16 concurrent duplicates spread over three layer instances sharing
/// `store`: exactly one execution per key, every duplicate a replay or a 409.
pub async fn storm<S: Wakeups>(store: Arc<S>) {
    const KEYS: usize = 1000;
    const DUPLICATES: usize = 16;
    let counter = Counter::default();
    let mut addrs = Vec::new();
    for _ in 0..3 {
        addrs.push(serve(store.clone(), counter.clone()).await);
    }
    let client = reqwest::Client::new();
    let tenant = format!("Bearer storm-{}", uniq());
    let permits = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..KEYS {
        for d in 0..DUPLICATES {
            let permit = permits.clone().acquire_owned().await.unwrap();
            let (client, tenant, addr) = (client.clone(), tenant.clone(), addrs[(k + d) % 3]);
            tasks.spawn(async move {
                let key = format!("storm-{k}");
                // A 503 means nothing ran (the store timed out under load): a careful
                // client retries it with the same key, as SPEC §7 allows.
                let mut answer = send(&client, addr, "/v1/charges", &tenant, &key).await;
                for attempt in 1..=40u64 {
                    if !matches!(answer, Answer::StoreUnavailable) {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50 * attempt.min(10)))
                        .await;
                    answer = send(&client, addr, "/v1/charges", &tenant, &key).await;
                }
                drop(permit);
                (key, answer)
            });
        }
    }
    let mut executed: HashMap<String, usize> = HashMap::new();
    let (mut replays, mut in_use) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let (key, answer) = r.unwrap();
        match answer {
            // A broken-off answer ran the handler too; the counter proves it ran once.
            Answer::Executed | Answer::BrokenOff(201) => *executed.entry(key).or_default() += 1,
            Answer::Replayed => replays += 1,
            Answer::InUse => in_use += 1,
            other => panic!("{key}: unexpected answer {other:?}"),
        }
    }
    eprintln!("storm: {replays} replays, {in_use} answered 409 in use");
    assert_eq!(counter.total(), KEYS, "handler executions");
    assert_eq!(counter.keys(), KEYS);
    assert_eq!(counter.max(), 1, "a key executed twice");
    assert_eq!(executed.len(), KEYS);
    assert!(executed.values().all(|n| *n == 1));
    assert_eq!(replays + in_use, KEYS * (DUPLICATES - 1));
    assert!(in_use > 0, "duplicates never overlapped an execution");
}

/// A retry sent the moment the first answer has arrived, to another instance sharing
/// `store`, replays it: the end of a response is never delivered before its outcome
/// is stored, whichever connection of the store the retry uses.
pub async fn retry_right_after_the_answer_replays<S: Wakeups>(store: Arc<S>) {
    let counter = Counter::default();
    let (first, second) = (
        serve(store.clone(), counter.clone()).await,
        serve(store, counter.clone()).await,
    );
    let client = reqwest::Client::new();
    let tenant = format!("Bearer retry-{}", uniq());
    for i in 0..200 {
        let key = format!("retry-{i}");
        let answer = send(&client, first, "/v1/charges", &tenant, &key).await;
        assert!(matches!(answer, Answer::Executed), "{key}: {answer:?}");
        let retry = send(&client, second, "/v1/charges", &tenant, &key).await;
        assert!(
            matches!(retry, Answer::Replayed),
            "{key}: a retry right after the answer got {retry:?}"
        );
    }
    assert_eq!(counter.total(), 200);
    assert_eq!(counter.max(), 1);
}

/// A string no other test run uses (process id and time), for tenants and keys.
pub fn uniq() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// Traffic with fresh keys through one layer instance while `server` is killed and
/// restarted: during the outage requests get 503 (or pass through on the passthrough
/// route), no key executes twice, and traffic recovers without intervention.
pub async fn restart_during_traffic<S: Wakeups>(store: Arc<S>, server: &mut dyn PrivateStore) {
    let counter = Counter::default();
    let addr = serve(store, counter.clone()).await;
    let client = reqwest::Client::new();
    let tenant = format!("Bearer restart-{}", uniq());
    let stop = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<Vec<(String, Answer)>>> = Arc::default();
    let traffic = {
        let (client, tenant, stop, log) =
            (client.clone(), tenant.clone(), stop.clone(), log.clone());
        tokio::spawn(async move {
            // Four callers, each sending fresh keys back to back; bounded in count.
            let mut callers = tokio::task::JoinSet::new();
            for c in 0..4 {
                let (client, tenant, stop, log) =
                    (client.clone(), tenant.clone(), stop.clone(), log.clone());
                callers.spawn(async move {
                    for i in 0..20_000 {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let key = format!("restart-{c}-{i}");
                        let a = send(&client, addr, "/v1/charges", &tenant, &key).await;
                        log.lock().unwrap().push((key, a));
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                });
            }
            while callers.join_next().await.is_some() {}
        })
    };
    let count = |a: Answer| {
        let log = log.lock().unwrap();
        (log.len(), log.iter().filter(|(_, x)| *x == a).count())
    };
    wait_for("traffic before the outage", || {
        count(Answer::Executed).1 >= 20
    })
    .await;

    tokio::task::block_in_place(|| server.crash()).expect("crash the private server");
    let (outage_start, _) = count(Answer::Executed);
    wait_for("503 answers during the outage", || {
        count(Answer::StoreUnavailable).1 >= 10
    })
    .await;
    // The passthrough route serves without protection meanwhile.
    let open_key = format!("open-{}", uniq());
    assert_eq!(
        send(&client, addr, "/v1/open", &tenant, &open_key).await,
        Answer::Executed,
        "passthrough while the store is down"
    );
    assert_eq!(counter.get(&open_key), 1);

    tokio::task::block_in_place(|| server.start()).expect("restart the private server");
    // Recovery by itself: fresh keys execute again, with no help from the test.
    wait_for("traffic to recover after the restart", || {
        let log = log.lock().unwrap();
        log[outage_start..]
            .iter()
            .rev()
            .take(20)
            .filter(|(_, a)| *a == Answer::Executed)
            .count()
            >= 20
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    traffic.await.unwrap();

    let log = std::mem::take(&mut *log.lock().unwrap());
    let unavailable = log
        .iter()
        .filter(|(_, a)| *a == Answer::StoreUnavailable)
        .count();
    eprintln!(
        "restart: {} requests, {unavailable} answered 503 store unavailable",
        log.len()
    );
    for (key, a) in &log {
        assert!(
            matches!(
                a,
                Answer::Executed
                    | Answer::StoreUnavailable
                    | Answer::BrokenOff(201)
                    | Answer::Unanswered
            ),
            "{key}: unexpected answer {a:?}"
        );
        assert!(counter.get(key) <= 1, "{key} executed twice");
        if *a == Answer::StoreUnavailable {
            assert_eq!(counter.get(key), 0, "{key} executed but answered 503");
        }
    }
    // Every key retried once more: executed ones replay (or are still in flight if
    // their completion was lost with the server); refused ones execute now, once (or
    // are in flight, if the claim landed but its answer was lost).
    let log = Arc::new(log);
    let mut retries = tokio::task::JoinSet::new();
    for part in 0..16 {
        let (client, tenant, log, counter) =
            (client.clone(), tenant.clone(), log.clone(), counter.clone());
        retries.spawn(async move {
            for (key, first) in log.iter().skip(part).step_by(16) {
                let again = send(&client, addr, "/v1/charges", &tenant, key).await;
                match first {
                    // Executed, maybe without its outcome stored (store died meanwhile).
                    Answer::BrokenOff(_) => assert!(
                        matches!(again, Answer::Replayed | Answer::InUse),
                        "{key}: retry of a broken-off request got {again:?}"
                    ),
                    Answer::Executed => assert!(
                        matches!(again, Answer::Replayed | Answer::InUse),
                        "{key}: retry of an executed request got {again:?}"
                    ),
                    // Executed or not: either way once at most.
                    Answer::Unanswered => {
                        assert!(
                            matches!(again, Answer::Replayed | Answer::InUse | Answer::Executed),
                            "{key}: retry of an unanswered request got {again:?}"
                        );
                        assert!(counter.get(key) <= 1, "{key} executed twice");
                        continue;
                    }
                    _ => assert!(
                        matches!(again, Answer::Executed | Answer::InUse),
                        "{key}: retry after a 503 got {again:?}"
                    ),
                }
                let expected = usize::from(matches!(
                    (first, &again),
                    (Answer::Executed | Answer::BrokenOff(_), _) | (_, Answer::Executed)
                ));
                assert_eq!(counter.get(key), expected, "{key} executions");
            }
        });
    }
    while let Some(r) = retries.join_next().await {
        r.unwrap();
    }
}

/// Polls `cond` every 50 ms for up to 60 s (a bound against hangs, not a timing
/// assertion).
pub async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Skips loudly, or fails under `IDEM_REQUIRE_BACKENDS=1`.
pub fn skip(test: &str, why: &str) {
    eprintln!("{test}: {why}");
    idem_conformance::skip(test);
}
