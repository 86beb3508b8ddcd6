//! The conformance suite every idem [`Store`] runs, as one crate (never a copied file).
//!
//! A store's test module calls [`conformance_tests!`] with an async expression that
//! yields `Option<Arc<S>>`: `None` means the backend is unreachable, and the tests
//! skip with a loud message, unless `IDEM_REQUIRE_BACKENDS=1`, where they fail.
//!
//! Every case uses its own random tenant, so stores shared between cases (a Redis or
//! PostgreSQL server) need no cleaning.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use idem_core::record::now_millis;
use idem_core::{
    Claim, ClaimSpec, FencingToken, Fingerprint, Lease, Record, RecordKey, RecordState, Store,
    StoredResponse, Wakeups,
};

#[cfg(feature = "bench")]
pub mod bench;
pub mod engine_cases;
pub mod in_flight_cases;
pub mod pki;
pub mod servers;
pub mod tenant_cases;

/// Generates one `#[tokio::test]` per conformance case.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@cases $make;
            claim_then_replay, mismatch_surfaces_stored_fingerprint, concurrent_claims_one_winner,
            expired_lease_is_reclaimable, concurrent_reclaims_one_winner, stale_token_cannot_complete_release_or_renew,
            complete_after_lease_end_without_takeover, renew_extends, ttl_expiry, live_lease_outlives_ttl,
            release_frees_the_key,
            delete_and_purge, binary_and_large_round_trip, many_keys, watch_wakes_on_change,
            engine_storm_one_execution, engine_wait_mode_replays, engine_wait_mode_after_release_executes,
            engine_unreadable_record_is_never_executed,
            tenant_in_flight_cap_is_exact, tenant_record_cap_counts_until_expiry,
            engine_tenant_cap_refuses_new_keys_only, in_flight_records_are_listed_oldest_first);
    };
    (@cases $make:expr; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                match $make.await {
                    Some(store) => $crate::run_case(stringify!($case), $crate::cases_dispatch::$case(store)).await,
                    None => $crate::skip(stringify!($case)),
                }
            }
        )*
    };
}

/// Whether backend tests must fail instead of skipping (`IDEM_REQUIRE_BACKENDS=1`).
pub fn backends_required() -> bool {
    std::env::var("IDEM_REQUIRE_BACKENDS").is_ok_and(|v| v == "1")
}

/// Skips loudly, or fails when backends are required.
pub fn skip(case: &str) {
    if backends_required() {
        panic!("{case}: backend unreachable and IDEM_REQUIRE_BACKENDS=1");
    }
    eprintln!(
        "SKIPPED {case}: backend unreachable (set IDEM_REQUIRE_BACKENDS=1 to make this an error)"
    );
}

/// Runs a case with an overall time limit, so a hung store fails instead of hanging CI.
pub async fn run_case(name: &str, fut: impl std::future::Future<Output = ()>) {
    if tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .is_err()
    {
        panic!("{name}: did not finish within 60 s");
    }
}

/// The cases, by name, generic over the store (used by the macro).
pub mod cases_dispatch {
    pub use crate::engine_cases::*;
    pub use crate::in_flight_cases::*;
    pub use crate::tenant_cases::*;
    pub use crate::*;
}

/// A record key in a fresh random tenant.
pub fn fresh_key(name: &str) -> RecordKey {
    RecordKey::new(
        format!("t_{}", uuid::Uuid::new_v4().simple()),
        "POST /v1/charges",
        name,
    )
}

/// A distinct fingerprint per label.
pub fn fp(label: &str) -> Fingerprint {
    let mut digest = label.as_bytes().to_vec();
    digest.resize(32, 0);
    Fingerprint { version: 1, digest }
}

/// A claim of `fingerprint` with a lease and a retention in milliseconds.
pub fn spec<'a>(fingerprint: &'a Fingerprint, lease_ms: u64, ttl_ms: u64) -> ClaimSpec<'a> {
    ClaimSpec {
        fingerprint,
        lease: Duration::from_millis(lease_ms),
        ttl: Duration::from_millis(ttl_ms),
    }
}

pub(crate) const LONG: u64 = 3_600_000;

pub(crate) fn response(body: &[u8]) -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![
            (
                http::HeaderName::from_static("content-type"),
                http::HeaderValue::from_static("application/json"),
            ),
            (
                http::HeaderName::from_static("location"),
                http::HeaderValue::from_static("/v1/charges/ch_1"),
            ),
        ],
        body: Bytes::copy_from_slice(body),
        body_kept: idem_core::BodyKept::Whole,
        request_id: Some("req_123".into()),
    }
}

pub(crate) async fn acquire<S: Store>(
    store: &S,
    key: &RecordKey,
    f: &Fingerprint,
    lease_ms: u64,
    ttl_ms: u64,
) -> Lease {
    match store.claim(key, spec(f, lease_ms, ttl_ms)).await.unwrap() {
        Claim::Acquired(lease) => lease,
        Claim::Existing(r) => panic!("expected to acquire {key:?}, found {r:?}"),
    }
}

async fn existing<S: Store>(store: &S, key: &RecordKey, f: &Fingerprint) -> Record {
    match store.claim(key, spec(f, 30_000, LONG)).await.unwrap() {
        Claim::Existing(r) => r,
        Claim::Acquired(l) => panic!("expected an existing record for {key:?}, acquired {l:?}"),
    }
}

/// Claim, complete, then every later claim sees the stored response.
pub async fn claim_then_replay<S: Store>(store: Arc<S>) {
    let key = fresh_key("replay");
    let f = fp("a");
    let lease = acquire(&*store, &key, &f, 30_000, LONG).await;
    assert!(lease.expires_at > now_millis());
    let r = existing(&*store, &key, &f).await;
    assert_eq!(
        r.state,
        RecordState::InFlight {
            token: lease.token,
            lease_expires_at: r_lease(&r)
        }
    );
    assert_eq!(
        r_token(&r),
        lease.token,
        "a second claim must see the first claim's token"
    );
    let resp = response(br#"{"id":"ch_1"}"#);
    assert!(
        store
            .complete(&key, lease.token, &resp, Duration::from_millis(LONG))
            .await
            .unwrap()
    );
    for _ in 0..2 {
        let r = existing(&*store, &key, &f).await;
        assert_eq!(r.state, RecordState::Completed(resp.clone()));
        assert_eq!(r.fingerprint, f);
    }
    let got = store
        .get(&key)
        .await
        .unwrap()
        .expect("get returns the completed record");
    assert_eq!(got.state, RecordState::Completed(resp));
    assert!(got.expires_at > now_millis() + LONG / 2);
    // A completed record cannot be completed again, even by its own token.
    assert!(
        !store
            .complete(
                &key,
                lease.token,
                &response(b"other"),
                Duration::from_millis(LONG)
            )
            .await
            .unwrap()
    );
}

fn r_token(r: &Record) -> FencingToken {
    match r.state {
        RecordState::InFlight { token, .. } => token,
        RecordState::Completed(_) => panic!("expected in flight, got {r:?}"),
    }
}

fn r_lease(r: &Record) -> u64 {
    match r.state {
        RecordState::InFlight {
            lease_expires_at, ..
        } => lease_expires_at,
        RecordState::Completed(_) => panic!("expected in flight, got {r:?}"),
    }
}

/// A claim with another fingerprint returns the record with the *stored* fingerprint,
/// in flight and completed; the store itself never judges.
pub async fn mismatch_surfaces_stored_fingerprint<S: Store>(store: Arc<S>) {
    let key = fresh_key("mismatch");
    let (a, b) = (fp("a"), fp("b"));
    let lease = acquire(&*store, &key, &a, 30_000, LONG).await;
    assert_eq!(existing(&*store, &key, &b).await.fingerprint, a);
    store
        .complete(
            &key,
            lease.token,
            &response(b"x"),
            Duration::from_millis(LONG),
        )
        .await
        .unwrap();
    let r = existing(&*store, &key, &b).await;
    assert_eq!(r.fingerprint, a);
    assert!(matches!(r.state, RecordState::Completed(_)));
}

/// 64 concurrent claims of one key: exactly one winner.
pub async fn concurrent_claims_one_winner<S: Store>(store: Arc<S>) {
    for round in 0..3 {
        let key = fresh_key(&format!("storm-{round}"));
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let (store, key) = (store.clone(), key.clone());
                tokio::spawn(async move {
                    let f = fp("a");
                    matches!(
                        store.claim(&key, spec(&f, 30_000, LONG)).await.unwrap(),
                        Claim::Acquired(_)
                    )
                })
            })
            .collect();
        let mut winners = 0;
        for t in tasks {
            winners += usize::from(t.await.unwrap());
        }
        assert_eq!(winners, 1, "round {round}: {winners} claims won");
    }
}

/// A lease that ran out can be taken over with the stale token, once; the dead
/// holder's token is then refused everywhere.
pub async fn expired_lease_is_reclaimable<S: Store>(store: Arc<S>) {
    let key = fresh_key("abandoned");
    let f = fp("a");
    let old = acquire(&*store, &key, &f, 200, LONG).await;
    let before = existing(&*store, &key, &f).await;
    assert!(!before.is_abandoned(now_millis()));
    // A live lease cannot be taken over.
    assert_eq!(
        store
            .reclaim(&key, old.token, spec(&f, 30_000, LONG))
            .await
            .unwrap(),
        None
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    let r = existing(&*store, &key, &f).await;
    assert!(
        r.is_abandoned(now_millis()),
        "lease should have ended: {r:?}"
    );
    let new = store
        .reclaim(&key, old.token, spec(&f, 30_000, LONG))
        .await
        .unwrap()
        .expect("reclaim of an expired lease");
    assert_ne!(new.token, old.token);
    assert_eq!(
        store
            .reclaim(&key, old.token, spec(&f, 30_000, LONG))
            .await
            .unwrap(),
        None,
        "second reclaim"
    );
    assert!(
        !store
            .complete(
                &key,
                old.token,
                &response(b"late"),
                Duration::from_millis(LONG)
            )
            .await
            .unwrap()
    );
    assert!(!store.release(&key, old.token).await.unwrap());
    assert!(
        !store
            .renew(&key, old.token, Duration::from_secs(30))
            .await
            .unwrap()
    );
    let r = existing(&*store, &key, &f).await;
    assert_eq!(r_token(&r), new.token);
    assert_eq!(
        r.created_at, before.created_at,
        "a takeover keeps the creation time"
    );
    assert!(
        store
            .complete(
                &key,
                new.token,
                &response(b"fresh"),
                Duration::from_millis(LONG)
            )
            .await
            .unwrap()
    );
    assert_eq!(
        existing(&*store, &key, &f).await.state,
        RecordState::Completed(response(b"fresh"))
    );
}

/// 16 concurrent takeovers of one abandoned record: exactly one wins.
pub async fn concurrent_reclaims_one_winner<S: Store>(store: Arc<S>) {
    let key = fresh_key("reclaim-storm");
    let f = fp("a");
    let old = acquire(&*store, &key, &f, 150, LONG).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (store, key) = (store.clone(), key.clone());
            tokio::spawn(async move {
                let f = fp("a");
                store
                    .reclaim(&key, old.token, spec(&f, 30_000, LONG))
                    .await
                    .unwrap()
                    .is_some()
            })
        })
        .collect();
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.unwrap());
    }
    assert_eq!(winners, 1);
}

/// A token that never held the key changes nothing.
pub async fn stale_token_cannot_complete_release_or_renew<S: Store>(store: Arc<S>) {
    let key = fresh_key("stale");
    let f = fp("a");
    let lease = acquire(&*store, &key, &f, 30_000, LONG).await;
    let stranger = FencingToken::random();
    assert!(
        !store
            .complete(&key, stranger, &response(b"x"), Duration::from_millis(LONG))
            .await
            .unwrap()
    );
    assert!(!store.release(&key, stranger).await.unwrap());
    assert!(
        !store
            .renew(&key, stranger, Duration::from_secs(60))
            .await
            .unwrap()
    );
    assert_eq!(r_token(&existing(&*store, &key, &f).await), lease.token);
    // On a key with no record at all, too.
    let none = fresh_key("none");
    assert!(
        !store
            .complete(
                &none,
                stranger,
                &response(b"x"),
                Duration::from_millis(LONG)
            )
            .await
            .unwrap()
    );
    assert!(!store.release(&none, stranger).await.unwrap());
    assert!(store.get(&none).await.unwrap().is_none());
}

/// The current holder may still complete after its lease ended, as long as nobody
/// took the key over: its token is still the current one.
pub async fn complete_after_lease_end_without_takeover<S: Store>(store: Arc<S>) {
    let key = fresh_key("late-but-current");
    let f = fp("a");
    let lease = acquire(&*store, &key, &f, 150, LONG).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        store
            .complete(
                &key,
                lease.token,
                &response(b"ok"),
                Duration::from_millis(LONG)
            )
            .await
            .unwrap()
    );
}

/// Renewal pushes the lease end forward.
pub async fn renew_extends<S: Store>(store: Arc<S>) {
    let key = fresh_key("renew");
    let f = fp("a");
    let lease = acquire(&*store, &key, &f, 400, LONG).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        store
            .renew(&key, lease.token, Duration::from_secs(5))
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = existing(&*store, &key, &f).await;
    assert!(
        !r.is_abandoned(now_millis()),
        "renewed lease ended early: {r:?}"
    );
    assert!(r_lease(&r) >= lease.expires_at + 2_000);
    assert_eq!(
        store
            .reclaim(&key, lease.token, spec(&f, 1_000, LONG))
            .await
            .unwrap(),
        None
    );
}

/// After its retention a record is gone and the key is new again.
pub async fn ttl_expiry<S: Store>(store: Arc<S>) {
    let key = fresh_key("ttl");
    let f = fp("a");
    let lease = acquire(&*store, &key, &f, 300, 1_000).await;
    assert!(
        store
            .complete(
                &key,
                lease.token,
                &response(b"x"),
                Duration::from_millis(1_000)
            )
            .await
            .unwrap()
    );
    assert!(store.get(&key).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert!(
        store.get(&key).await.unwrap().is_none(),
        "record outlived its ttl"
    );
    let again = acquire(&*store, &key, &fp("other"), 30_000, LONG).await;
    assert_ne!(again.token, lease.token);
    // An in-flight record expires too.
    let key2 = fresh_key("ttl-inflight");
    acquire(&*store, &key2, &f, 300, 1_000).await;
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert!(store.get(&key2).await.unwrap().is_none());
}

/// A record never expires while its lease is alive, however short its retention; the
/// retention then counts from completion (SPEC §5).
pub async fn live_lease_outlives_ttl<S: Store>(store: Arc<S>) {
    let key = fresh_key("lease-over-ttl");
    let f = fp("a");
    // A lease longer than the retention, from the claim on.
    let lease = acquire(&*store, &key, &f, 900, 300).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = existing(&*store, &key, &f).await;
    assert!(
        matches!(r.state, RecordState::InFlight { token, .. } if token == lease.token),
        "the record expired under its live lease: {r:?}"
    );
    // Renewals keep it past both the retention and the first lease end.
    assert!(
        store
            .renew(&key, lease.token, Duration::from_millis(900))
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        store.get(&key).await.unwrap().is_some(),
        "the record expired under its renewed lease"
    );
    assert_eq!(
        store
            .reclaim(&key, lease.token, spec(&fp("b"), 900, 300))
            .await
            .unwrap(),
        None,
        "a live lease cannot be taken over"
    );
    assert!(
        store
            .complete(
                &key,
                lease.token,
                &response(b"late"),
                Duration::from_millis(400)
            )
            .await
            .unwrap(),
        "the holder of a live lease stores its outcome"
    );
    assert!(
        store.get(&key).await.unwrap().is_some(),
        "kept from completion"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        store.get(&key).await.unwrap().is_none(),
        "retention counts from completion"
    );
}

/// Release removes the record; the next claim acquires with a new token.
pub async fn release_frees_the_key<S: Store>(store: Arc<S>) {
    let key = fresh_key("release");
    let f = fp("a");
    let lease = acquire(&*store, &key, &f, 30_000, LONG).await;
    assert!(store.release(&key, lease.token).await.unwrap());
    assert!(store.get(&key).await.unwrap().is_none());
    let again = acquire(&*store, &key, &fp("b"), 30_000, LONG).await;
    assert_ne!(again.token, lease.token);
    assert!(
        !store.release(&key, lease.token).await.unwrap(),
        "old token after re-claim"
    );
}

/// Delete removes any record; purge removes expired ones and keeps live ones.
pub async fn delete_and_purge<S: Store>(store: Arc<S>) {
    let f = fp("a");
    let live = fresh_key("live");
    let l = acquire(&*store, &live, &f, 30_000, LONG).await;
    store
        .complete(
            &live,
            l.token,
            &response(b"keep"),
            Duration::from_millis(LONG),
        )
        .await
        .unwrap();
    let short: Vec<RecordKey> = (0..5).map(|i| fresh_key(&format!("short-{i}"))).collect();
    for k in &short {
        let l = acquire(&*store, k, &f, 200, 400).await;
        store
            .complete(k, l.token, &response(b"gone"), Duration::from_millis(400))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    store.purge_expired().await.unwrap();
    for k in &short {
        assert!(store.get(k).await.unwrap().is_none());
    }
    assert!(
        store.get(&live).await.unwrap().is_some(),
        "purge removed a live record"
    );
    assert!(store.delete(&live).await.unwrap());
    assert!(store.get(&live).await.unwrap().is_none());
    assert!(!store.delete(&live).await.unwrap());
    // Delete also frees an in-flight key.
    let inflight = fresh_key("inflight");
    let l = acquire(&*store, &inflight, &f, 30_000, LONG).await;
    assert!(store.delete(&inflight).await.unwrap());
    assert!(
        !store
            .complete(
                &inflight,
                l.token,
                &response(b"x"),
                Duration::from_millis(LONG)
            )
            .await
            .unwrap()
    );
    acquire(&*store, &inflight, &f, 30_000, LONG).await;
}

/// Binary and 1 MiB bodies, repeated and binary header values, and a non-replayable
/// record all round-trip byte for byte.
pub async fn binary_and_large_round_trip<S: Store>(store: Arc<S>) {
    let f = fp("a");
    let mut body = Vec::with_capacity(1 << 20);
    let mut x: u32 = 0x9e37_79b9;
    for _ in 0..(1 << 20) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        body.push((x >> 24) as u8);
    }
    body[0] = 0;
    body[1] = 0xff;
    let resp = StoredResponse {
        status: 200,
        headers: vec![
            (
                http::HeaderName::from_static("x-multi"),
                http::HeaderValue::from_static("one"),
            ),
            (
                http::HeaderName::from_static("content-type"),
                http::HeaderValue::from_static("application/octet-stream"),
            ),
            (
                http::HeaderName::from_static("x-multi"),
                http::HeaderValue::from_static("two"),
            ),
            (
                http::HeaderName::from_static("x-latin"),
                http::HeaderValue::from_bytes(&[b'c', b'a', b'f', 0xe9]).unwrap(),
            ),
        ],
        body: Bytes::from(body),
        body_kept: idem_core::BodyKept::Whole,
        request_id: None,
    };
    let key = fresh_key("large");
    let l = acquire(&*store, &key, &f, 30_000, LONG).await;
    assert!(
        store
            .complete(&key, l.token, &resp, Duration::from_millis(LONG))
            .await
            .unwrap()
    );
    assert_eq!(
        store.get(&key).await.unwrap().unwrap().state,
        RecordState::Completed(resp.clone())
    );
    let unreplayable = StoredResponse {
        status: 202,
        body: Bytes::new(),
        body_kept: idem_core::BodyKept::TooLarge,
        request_id: Some("req_big".into()),
        ..resp
    };
    let key = fresh_key("unreplayable");
    let l = acquire(&*store, &key, &f, 30_000, LONG).await;
    assert!(
        store
            .complete(&key, l.token, &unreplayable, Duration::from_millis(LONG))
            .await
            .unwrap()
    );
    assert_eq!(
        existing(&*store, &key, &f).await.state,
        RecordState::Completed(unreplayable)
    );
}

/// 1,000 keys, claimed and completed concurrently, each keeps its own response.
pub async fn many_keys<S: Store>(store: Arc<S>) {
    let tenant = fresh_key("x").tenant;
    let keys: Vec<RecordKey> = (0..1000)
        .map(|i| RecordKey::new(tenant.clone(), "POST /v1/charges", format!("k{i}")))
        .collect();
    let tasks: Vec<_> = keys
        .chunks(100)
        .map(|chunk| {
            let (store, chunk) = (store.clone(), chunk.to_vec());
            tokio::spawn(async move {
                let f = fp("a");
                for k in &chunk {
                    let l = acquire(&*store, k, &f, 30_000, LONG).await;
                    assert!(
                        store
                            .complete(
                                k,
                                l.token,
                                &response(k.key.as_bytes()),
                                Duration::from_millis(LONG)
                            )
                            .await
                            .unwrap()
                    );
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    for k in &keys {
        let r = store.get(k).await.unwrap().expect("record kept");
        assert_eq!(r.state, RecordState::Completed(response(k.key.as_bytes())));
    }
    // Same key, another route or tenant: independent records.
    let other_route = RecordKey::new(tenant.clone(), "POST /v1/refunds", "k1");
    assert!(store.get(&other_route).await.unwrap().is_none());
    let other_tenant = RecordKey::new(format!("{tenant}x"), "POST /v1/charges", "k1");
    acquire(&*store, &other_tenant, &fp("a"), 30_000, LONG).await;
}

/// A watch taken before a change resolves once the record completes.
pub async fn watch_wakes_on_change<S: Wakeups>(store: Arc<S>) {
    let key = fresh_key("watch");
    let f = fp("a");
    let lease = acquire(&*store, &key, &f, 30_000, LONG).await;
    let watch = store.watch(&key).await.unwrap();
    let s2 = store.clone();
    let k2 = key.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s2.complete(
            &k2,
            lease.token,
            &response(b"done"),
            Duration::from_millis(LONG),
        )
        .await
        .unwrap();
    });
    tokio::time::timeout(Duration::from_secs(5), watch)
        .await
        .expect("watch did not wake within 5 s of the change");
    // Re-reading after waking finds the outcome (possibly after a spurious wake).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(Record {
            state: RecordState::Completed(_),
            ..
        }) = store.get(&key).await.unwrap()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "completion never became visible"
        );
        let w = store.watch(&key).await.unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(500), w).await;
    }
}
