//! Claims+completes and replay lookups per second, memory against SQLite, with 64
//! concurrent callers (what a busy sidecar sees, and what group commit feeds on).
//!
//! `cargo bench -p idem-store-sqlite --bench store`

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use idem_core::{Claim, ClaimSpec, Fingerprint, RecordKey, Store, StoredResponse};
use idem_store_memory::MemoryStore;
use idem_store_sqlite::{Durability, SqliteOptions, SqliteStore};

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

fn bench_store<S: Store>(c: &mut Criterion, name: &str, store: S) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = Arc::new(store);
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(CONCURRENCY));
    g.bench_function("claim+complete", |b| {
        b.iter_custom(|iters| {
            concurrent(&rt, &store, iters, |s, i| async move {
                claim_complete(
                    &*s,
                    &RecordKey::new("t_bench", "POST /v1/charges", format!("new-{i}")),
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
                &RecordKey::new("t_bench", "POST /v1/charges", format!("stored-{i}")),
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
                    "t_bench",
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
    bench_store(c, "memory", MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    bench_store(
        c,
        "sqlite-full",
        SqliteStore::open(dir.path().join("full.db")).unwrap(),
    );
    bench_store(
        c,
        "sqlite-normal",
        SqliteStore::open_with(
            dir.path().join("normal.db"),
            SqliteOptions::default().with_durability(Durability::Normal),
        )
        .unwrap(),
    );
}

criterion_group! {
    name = store;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(store);
