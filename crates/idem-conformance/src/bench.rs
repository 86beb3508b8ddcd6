//! The store benchmark every store crate runs (`cargo bench -p <store> --bench store`):
//! claims+completes and replay lookups per second with 64 concurrent callers, what a
//! busy sidecar sees and what group commit feeds on. Behind the `bench` feature.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use idem_core::{Claim, ClaimSpec, Fingerprint, RecordKey, Store, StoredResponse};
use tokio::runtime::Runtime;

const CONCURRENCY: u64 = 64;
static NEXT: AtomicU64 = AtomicU64::new(0);

/// The runtime benchmarks run on: two workers, as on the machine the figures come from.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A small created charge, the response the store benches and harnesses store.
pub fn response() -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![(
            http::HeaderName::from_static("content-type"),
            http::HeaderValue::from_static("application/json"),
        )],
        body: Bytes::from_static(
            br#"{"id":"ch_1","amount":1000,"currency":"brl","status":"succeeded"}"#,
        ),
        body_kept: idem_core::BodyKept::Whole,
        request_id: Some("req_1".into()),
    }
}

fn spec(fingerprint: &Fingerprint) -> ClaimSpec<'_> {
    ClaimSpec {
        fingerprint,
        lease: Duration::from_secs(30),
        ttl: Duration::from_secs(3600),
    }
}

fn fp() -> Fingerprint {
    Fingerprint {
        version: 1,
        digest: vec![7; 32],
    }
}

async fn claim_complete<S: Store>(store: &S, key: &RecordKey) {
    let f = fp();
    let Claim::Acquired(lease) = store.claim(key, spec(&f)).await.unwrap() else {
        panic!("fresh key was taken")
    };
    assert!(
        store
            .complete(key, lease.token, &response(), Duration::from_secs(3600))
            .await
            .unwrap()
    );
}

/// Runs `iters` rounds of CONCURRENCY concurrent operations; returns the wall time.
fn concurrent<S: Store, F, Fut>(rt: &Runtime, store: &Arc<S>, iters: u64, op: F) -> Duration
where
    F: Fn(Arc<S>, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = ()> + Send,
{
    rt.block_on(async {
        let start = Instant::now();
        // One iteration = CONCURRENCY operations in flight at once, as on a busy server.
        let tasks: Vec<_> = (0..CONCURRENCY)
            .map(|_| {
                let (store, op) = (store.clone(), op.clone());
                tokio::spawn(async move {
                    for _ in 0..iters {
                        op(store.clone(), NEXT.fetch_add(1, Ordering::Relaxed)).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        start.elapsed()
    })
}

/// Benchmarks one store, made on `rt` (stores with connections belong to the runtime
/// that made them). Each run uses a tenant of its own, so a shared server needs no
/// cleaning between runs.
pub fn bench_store<S: Store>(c: &mut Criterion, name: &str, rt: &Runtime, store: S) {
    let tenant = format!("t_bench_{}", uuid::Uuid::new_v4().simple());
    let store = Arc::new(store);
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(CONCURRENCY));
    let key = move |name: String| RecordKey::new(tenant.as_str(), "POST /v1/charges", name);
    let new_key = key.clone();
    g.bench_function("claim+complete", |b| {
        b.iter_custom(|iters| {
            let new_key = new_key.clone();
            concurrent(rt, &store, iters, move |s, i| {
                let k = new_key(format!("new-{i}"));
                async move { claim_complete(&*s, &k).await }
            })
        })
    });
    // 1,000 stored keys, replayed in turn.
    rt.block_on(async {
        for i in 0..1000 {
            claim_complete(&*store, &key(format!("stored-{i}"))).await;
        }
    });
    g.bench_function("replay lookup", |b| {
        b.iter_custom(|iters| {
            let key = key.clone();
            concurrent(rt, &store, iters, move |s, i| {
                let k = key(format!("stored-{}", i % 1000));
                async move {
                    let f = fp();
                    assert!(matches!(
                        s.claim(&k, spec(&f)).await.unwrap(),
                        Claim::Existing(_)
                    ));
                }
            })
        })
    });
    g.finish();
}

/// Criterion settings for the store benchmarks: 20 samples of 5 s.
pub fn criterion() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1))
}
