//! Engine-level cases run against each store: the decisions of SPEC §4 depend on the
//! store's atomicity and wake-ups, so they are part of conformance.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use idem_core::crypto::{Encrypted, EncryptionKey};
use idem_core::policy::{OnConcurrent, OnStoreError};
use idem_core::store::DynStore;
use idem_core::{
    Decision, Engine, Finished, Keep, Policy, Recorded, Rejection, TenantHasher, TenantSecret,
    Wakeups,
};

fn engine<S: Wakeups>(store: Arc<S>) -> Engine<S> {
    Engine::new(
        store,
        TenantHasher::new(TenantSecret::new(b"conformance-secret".to_vec()).unwrap()),
    )
}

fn parts(key: &str, tenant: &str) -> http::request::Parts {
    Request::post("/v1/charges")
        .header("idempotency-key", key)
        .header("authorization", tenant)
        .header("content-type", "application/json")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

fn body() -> &'static [u8] {
    br#"{"amount":100}"#
}

/// 32 concurrent duplicates through the engine: one executes, every other one is
/// answered `in use` (409) while it runs, and all later ones replay.
pub async fn engine_storm_one_execution<S: Wakeups>(store: Arc<S>) {
    let engine = engine(store);
    let policy = Arc::new(Policy::default());
    let tenant = format!("Bearer {}", uuid::Uuid::new_v4());
    let executed = Arc::new(AtomicUsize::new(0));
    let in_use = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (engine, policy, tenant, executed, in_use) = (
                engine.clone(),
                policy.clone(),
                tenant.clone(),
                executed.clone(),
                in_use.clone(),
            );
            tokio::spawn(async move {
                match engine
                    .begin(
                        &policy,
                        "POST /v1/charges",
                        &parts("storm", &tenant),
                        body(),
                    )
                    .await
                {
                    Decision::Execute(exec) => {
                        executed.fetch_add(1, Ordering::SeqCst);
                        // Hold the key long enough for every duplicate to arrive.
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        let fin = exec
                            .finish(
                                StatusCode::CREATED,
                                &HeaderMap::new(),
                                Recorded::Whole(Bytes::from_static(b"ok")),
                                Keep::AsPolicy,
                            )
                            .await;
                        assert_eq!(fin.unwrap(), Finished::Stored);
                    }
                    Decision::Reject(Rejection::InUse { status, .. }, _) => {
                        assert_eq!(status, StatusCode::CONFLICT);
                        in_use.fetch_add(1, Ordering::SeqCst);
                    }
                    Decision::Replay(_) => {}
                    other => panic!("unexpected decision {other:?}"),
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(executed.load(Ordering::SeqCst), 1, "exactly one execution");
    assert!(
        in_use.load(Ordering::SeqCst) >= 1,
        "duplicates during execution get 409"
    );
    match engine
        .begin(
            &policy,
            "POST /v1/charges",
            &parts("storm", &tenant),
            body(),
        )
        .await
    {
        Decision::Replay(r) => {
            let res = r.into_response();
            assert_eq!(res.status(), StatusCode::CREATED);
            assert_eq!(res.headers()["idempotent-replayed"], "true");
            assert_eq!(res.body().as_ref(), b"ok");
        }
        other => panic!("expected a replay, got {other:?}"),
    }
}

/// In `wait` mode every duplicate waits for the first and gets its replay.
pub async fn engine_wait_mode_replays<S: Wakeups>(store: Arc<S>) {
    let engine = engine(store);
    let policy = Arc::new(
        Policy::default()
            .with_on_concurrent(OnConcurrent::Wait)
            .with_wait_timeout(Duration::from_secs(10)),
    );
    let tenant = format!("Bearer {}", uuid::Uuid::new_v4());
    let Decision::Execute(exec) = engine
        .begin(&policy, "POST /v1/charges", &parts("wait", &tenant), body())
        .await
    else {
        panic!("first request must execute");
    };
    let waiters: Vec<_> = (0..8)
        .map(|_| {
            let (engine, policy, tenant) = (engine.clone(), policy.clone(), tenant.clone());
            tokio::spawn(async move {
                match engine
                    .begin(&policy, "POST /v1/charges", &parts("wait", &tenant), body())
                    .await
                {
                    Decision::Replay(r) => r.into_response(),
                    other => panic!("a waiter must get the replay, got {other:?}"),
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    exec.finish(
        StatusCode::CREATED,
        &HeaderMap::new(),
        Recorded::Whole(Bytes::from_static(b"first")),
        Keep::AsPolicy,
    )
    .await
    .unwrap();
    for w in waiters {
        let res = w.await.unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        assert_eq!(res.body().as_ref(), b"first");
    }
}

/// In `wait` mode, when the first request's outcome is not stored (released), one
/// waiter executes instead, and the others wait for it.
pub async fn engine_wait_mode_after_release_executes<S: Wakeups>(store: Arc<S>) {
    let engine = engine(store);
    let policy = Arc::new(Policy::default().with_on_concurrent(OnConcurrent::Wait));
    let tenant = format!("Bearer {}", uuid::Uuid::new_v4());
    let Decision::Execute(exec) = engine
        .begin(
            &policy,
            "POST /v1/charges",
            &parts("wait-rel", &tenant),
            body(),
        )
        .await
    else {
        panic!("first request must execute");
    };
    let executed = Arc::new(AtomicUsize::new(0));
    let waiters: Vec<_> = (0..4)
        .map(|_| {
            let (engine, policy, tenant, executed) = (
                engine.clone(),
                policy.clone(),
                tenant.clone(),
                executed.clone(),
            );
            tokio::spawn(async move {
                match engine
                    .begin(
                        &policy,
                        "POST /v1/charges",
                        &parts("wait-rel", &tenant),
                        body(),
                    )
                    .await
                {
                    Decision::Execute(exec) => {
                        executed.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        exec.finish(
                            StatusCode::OK,
                            &HeaderMap::new(),
                            Recorded::Whole(Bytes::from_static(b"second")),
                            Keep::AsPolicy,
                        )
                        .await
                        .unwrap();
                    }
                    Decision::Replay(r) => assert_eq!(r.into_response().body().as_ref(), b"second"),
                    other => panic!("unexpected {other:?}"),
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A 400 means nothing was executed: the key is released.
    let fin = exec
        .finish(
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            Recorded::Whole(Bytes::from_static(b"bad")),
            Keep::AsPolicy,
        )
        .await
        .unwrap();
    assert_eq!(fin, Finished::Released);
    for w in waiters {
        w.await.unwrap();
    }
    assert_eq!(executed.load(Ordering::SeqCst), 1);
}

/// A stored outcome that can no longer be read (sealed with an encryption key that is
/// not configured any more) is a problem response, never an execution, even where the
/// route serves unprotected when the store fails (`on_store_error = "passthrough"`):
/// that is for a store that could not be asked, not for a key the store knows.
pub async fn engine_unreadable_record_is_never_executed<S: DynStore>(store: Arc<S>) {
    let shared: Arc<dyn DynStore> = store;
    let sealed_with = |hex: &str| {
        engine(Arc::new(Encrypted::new(
            shared.clone(),
            &EncryptionKey::from_hex(hex).unwrap(),
        )))
    };
    let before = sealed_with(&"a1".repeat(32));
    let after = sealed_with(&"b2".repeat(32));
    let policy = Arc::new(Policy::default().with_on_store_error(OnStoreError::Passthrough));
    let tenant = format!("Bearer {}", uuid::Uuid::new_v4());
    let request = parts("sealed", &tenant);
    let Decision::Execute(exec) = before
        .begin(&policy, "POST /v1/charges", &request, body())
        .await
    else {
        panic!("the first request executes");
    };
    let stored = exec
        .finish(
            StatusCode::CREATED,
            &HeaderMap::new(),
            Recorded::Whole(Bytes::from_static(b"charged")),
            Keep::AsPolicy,
        )
        .await
        .unwrap();
    assert_eq!(stored, Finished::Stored);
    match after
        .begin(&policy, "POST /v1/charges", &request, body())
        .await
    {
        Decision::Reject(rejection, _) => {
            assert_eq!(rejection.slug(), "idempotency-record-unreadable");
            assert_eq!(rejection.status(), StatusCode::INTERNAL_SERVER_ERROR);
        }
        other => panic!("a record that cannot be read must not execute: {other:?}"),
    }
}
