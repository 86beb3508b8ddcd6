//! Claims+completes and replay lookups per second against a real PostgreSQL, with 64
//! concurrent callers (what a busy sidecar sees) sharing the default pool of 16.
//!
//! `cargo bench -p idem-store-postgres --bench store`
//!
//! Server: `IDEM_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`); when
//! unreachable the bench is skipped with a message.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use idem_core::{Claim, ClaimSpec, Fingerprint, RecordKey, Store, StoredResponse};
use idem_store_postgres::PostgresStore;

static TENANT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "t_bench_{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
});

const CONCURRENCY: u64 = 64;
static NEXT: AtomicU64 = AtomicU64::new(0);

fn response() -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![(
            "content-type".into(),
            Bytes::from_static(b"application/json"),
        )],
        body: Bytes::from_static(
            br#"{"id":"ch_1","amount":1000,"currency":"brl","status":"succeeded"}"#,
        ),
        body_replayable: true,
        request_id: Some("req_1".into()),
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
    let spec = ClaimSpec {
        fingerprint: &f,
        lease: Duration::from_secs(30),
        ttl: Duration::from_secs(3600),
    };
    let Claim::Acquired(lease) = store.claim(key, spec).await.unwrap() else {
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
fn concurrent<S: Store, F, Fut>(
    rt: &tokio::runtime::Runtime,
    store: &Arc<S>,
    iters: u64,
    op: F,
) -> Duration
where
    F: Fn(Arc<S>, u64) -> Fut + Send + Sync + Copy + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    rt.block_on(async {
        let start = Instant::now();
        // One iteration = CONCURRENCY operations in flight at once, as on a busy server.
        let tasks: Vec<_> = (0..CONCURRENCY)
            .map(|_| {
                let store = store.clone();
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

fn bench_store(c: &mut Criterion, name: &str, url: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = Arc::new(rt.block_on(PostgresStore::connect(url)).unwrap());
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(CONCURRENCY));
    g.bench_function("claim+complete", |b| {
        b.iter_custom(|iters| {
            concurrent(&rt, &store, iters, |s, i| async move {
                claim_complete(
                    &*s,
                    &RecordKey::new(TENANT.as_str(), "POST /v1/charges", format!("new-{i}")),
                )
                .await;
            })
        })
    });
    // 1,000 stored keys, replayed in turn.
    rt.block_on(async {
        for i in 0..1000 {
            claim_complete(
                &*store,
                &RecordKey::new(TENANT.as_str(), "POST /v1/charges", format!("stored-{i}")),
            )
            .await;
        }
    });
    g.bench_function("replay lookup", |b| {
        b.iter_custom(|iters| {
            concurrent(&rt, &store, iters, |s, i| async move {
                let f = fp();
                let spec = ClaimSpec {
                    fingerprint: &f,
                    lease: Duration::from_secs(30),
                    ttl: Duration::from_secs(3600),
                };
                let key = RecordKey::new(
                    TENANT.as_str(),
                    "POST /v1/charges",
                    format!("stored-{}", i % 1000),
                );
                assert!(matches!(
                    s.claim(&key, spec).await.unwrap(),
                    Claim::Existing(_)
                ));
            })
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let url = std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    match rt.block_on(PostgresStore::connect(&url)) {
        Ok(_) => bench_store(c, "postgres", &url),
        Err(e) => eprintln!("SKIPPED postgres bench: no PostgreSQL at {url}: {e}"),
    }
}

criterion_group! {
    name = store;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(store);
