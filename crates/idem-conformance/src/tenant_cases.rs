//! Per-tenant caps ([`TenantCounting::admit`], [`TenantCounting::settle`]): exact under concurrency,
//! never refusing a record already counted, freed by settling and by expiry.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use idem_core::{
    Admission, ClaimSpec, Decision, Engine, Keep, Policy, RecordKey, Recorded, Rejection,
    TenantCap, TenantCounting, TenantHasher, TenantLimits, TenantSecret, Wakeups,
};

const MINUTE: Duration = Duration::from_secs(60);

fn tenant() -> String {
    format!("t_{}", uuid::Uuid::new_v4().simple())
}

fn key(tenant: &str, name: &str) -> RecordKey {
    RecordKey::new(tenant, "POST /v1/charges", name)
}

async fn admit<S: TenantCounting>(store: &S, key: &RecordKey, limits: TenantLimits) -> Admission {
    admit_for(store, key, limits, MINUTE).await
}

/// Claims `key` unless it is held already, then counts it with an in-flight slot for
/// `lease`, as the engine does: a store may count only a record that is in flight
/// (PostgreSQL does, so that an admit that arrives after its settle counts nothing).
async fn admit_for<S: TenantCounting>(
    store: &S,
    key: &RecordKey,
    limits: TenantLimits,
    lease: Duration,
) -> Admission {
    let fp = crate::fp("tenant-cases");
    let spec = ClaimSpec {
        fingerprint: &fp,
        lease: MINUTE,
        ttl: MINUTE,
    };
    store.claim(key, spec).await.unwrap();
    store.admit(key, limits, lease, MINUTE).await.unwrap()
}

/// 64 concurrent new records against a cap of 10 in flight: exactly 10 admitted,
/// another tenant unaffected, an admitted record never refused, and settling one
/// makes room for exactly one more.
pub async fn tenant_in_flight_cap_is_exact<S: TenantCounting>(store: Arc<S>) {
    let limits = TenantLimits::new(Some(10), None);
    let t = tenant();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let (store, k) = (store.clone(), key(&t, &format!("k{i}")));
            tokio::spawn(async move { (admit(&*store, &k, limits).await, k) })
        })
        .collect();
    let mut admitted = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            (Admission::Admitted, k) => admitted.push(k),
            (Admission::InFlightFull, _) => {}
            (other, _) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        admitted.len(),
        10,
        "the cap holds exactly under concurrency"
    );
    for k in &admitted {
        assert_eq!(admit(&*store, k, limits).await, Admission::Admitted);
    }
    let other = tenant();
    assert_eq!(
        admit(&*store, &key(&other, "k0"), limits).await,
        Admission::Admitted,
        "tenants are counted apart"
    );
    store.settle(&admitted[0], Some(MINUTE)).await.unwrap();
    assert_eq!(
        admit(&*store, &key(&t, "new-1"), limits).await,
        Admission::Admitted
    );
    assert_eq!(
        admit(&*store, &key(&t, "new-2"), limits).await,
        Admission::InFlightFull
    );
}

/// The cap on live records: completed records count until they expire or are
/// released; in-flight slots end with their lease.
pub async fn tenant_record_cap_counts_until_expiry<S: TenantCounting>(store: Arc<S>) {
    let limits = TenantLimits::new(Some(2), Some(3));
    let t = tenant();
    let short = Duration::from_millis(1500);
    let a = key(&t, "a");
    assert_eq!(
        admit_for(&*store, &a, limits, short).await,
        Admission::Admitted
    );
    store.settle(&a, Some(short)).await.unwrap();
    for name in ["b", "c"] {
        assert_eq!(
            admit_for(&*store, &key(&t, name), limits, short).await,
            Admission::Admitted
        );
    }
    assert_eq!(
        admit_for(&*store, &key(&t, "d"), limits, short).await,
        Admission::InFlightFull,
        "b and c are in flight"
    );
    store.settle(&key(&t, "c"), None).await.unwrap();
    assert_eq!(
        admit_for(&*store, &key(&t, "d"), limits, short).await,
        Admission::Admitted,
        "a released record frees both slots"
    );
    store.settle(&key(&t, "d"), Some(MINUTE)).await.unwrap();
    assert_eq!(
        admit_for(&*store, &key(&t, "e"), limits, short).await,
        Admission::RecordsFull,
        "a, b and d are live"
    );
    // a's record and b's lease end: room again, and a purge keeps the counts right.
    tokio::time::sleep(short + Duration::from_millis(300)).await;
    store.purge_expired().await.unwrap();
    assert_eq!(
        admit_for(&*store, &key(&t, "e"), limits, short).await,
        Admission::Admitted
    );
    assert_eq!(
        admit_for(&*store, &key(&t, "f"), limits, short).await,
        Admission::RecordsFull,
        "b's lease ended (only e is in flight), but b's record still counts: b, d, e"
    );
}

fn parts(key: &str, tenant: &str) -> http::request::Parts {
    Request::post("/v1/charges")
        .header("idempotency-key", key)
        .header("authorization", tenant)
        .body(())
        .unwrap()
        .into_parts()
        .0
}

/// Through the engine: past the cap a new key gets 429 `tenant-limit-reached` and
/// executes nothing; a refused key is not held (it executes once there is room);
/// replays of records already held are never refused.
pub async fn engine_tenant_cap_refuses_new_keys_only<S: TenantCounting + Wakeups>(store: Arc<S>) {
    let engine = Engine::new(
        store,
        TenantHasher::new(TenantSecret::new(b"conformance-secret".to_vec()).unwrap()),
    )
    .with_tenant_limits(TenantLimits::new(Some(2), Some(3)));
    let policy = Arc::new(Policy::default());
    let caller = format!("Bearer {}", uuid::Uuid::new_v4());
    let begin = |k: &str| {
        let (engine, policy, p) = (engine.clone(), policy.clone(), parts(k, &caller));
        async move { engine.begin(&policy, "POST /v1/charges", &p, b"{}").await }
    };
    let Decision::Execute(one) = begin("one").await else {
        panic!("one executes")
    };
    let Decision::Execute(two) = begin("two").await else {
        panic!("two executes")
    };
    match begin("three").await {
        Decision::Reject(
            r @ Rejection::TenantLimitReached {
                cap: TenantCap::InFlight,
                ..
            },
            _,
        ) => {
            assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
            assert!(r.retry_after().is_some());
        }
        other => panic!("expected 429 in flight, got {other:?}"),
    }
    let headers = http::HeaderMap::new();
    one.finish(
        StatusCode::CREATED,
        &headers,
        Recorded::Whole("1".into()),
        Keep::AsPolicy,
    )
    .await
    .unwrap();
    assert!(
        matches!(begin("one").await, Decision::Replay(_)),
        "a record already held replays"
    );
    let Decision::Execute(three) = begin("three").await else {
        panic!("the refused key was not held: it executes once there is room")
    };
    three
        .finish(
            StatusCode::CREATED,
            &headers,
            Recorded::Whole("3".into()),
            Keep::AsPolicy,
        )
        .await
        .unwrap();
    match begin("four").await {
        Decision::Reject(
            Rejection::TenantLimitReached {
                cap: TenantCap::Records,
                ..
            },
            _,
        ) => {}
        other => panic!("expected 429 records, got {other:?}"),
    }
    // A released key frees its record slot.
    two.release().await.unwrap();
    assert!(matches!(begin("four").await, Decision::Execute(_)));
    assert!(
        matches!(begin("one").await, Decision::Replay(_)),
        "replays are never refused, at the cap or not"
    );
    let other = format!("Bearer {}", uuid::Uuid::new_v4());
    let p = parts("five", &other);
    assert!(
        matches!(
            engine.begin(&policy, "POST /v1/charges", &p, b"{}").await,
            Decision::Execute(_)
        ),
        "another tenant is not limited by this one"
    );
}
