//! Claims+completes and replay lookups per second against a real Redis (standalone
//! and Cluster), with 64 concurrent callers: the shared store benchmark of
//! `idem_conformance::bench`.
//!
//! `cargo bench -p idem-store-redis --bench store`
//!
//! Servers: `IDEM_REDIS_URL` (default `redis://127.0.0.1:6379`) and `IDEM_REDIS_CLUSTER`
//! (default `redis://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002`); an unreachable one
//! is skipped with a message.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use idem_conformance::bench::{bench_store, criterion, runtime};
use idem_store_redis::RedisStore;

fn benches(c: &mut Criterion) {
    let rt = runtime();
    for (name, var, default) in [
        ("redis", "IDEM_REDIS_URL", "redis://127.0.0.1:6379"),
        (
            "redis-cluster",
            "IDEM_REDIS_CLUSTER",
            "redis://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002",
        ),
    ] {
        let url = std::env::var(var).unwrap_or_else(|_| default.to_owned());
        match rt.block_on(RedisStore::connect(&url)) {
            Ok(store) => bench_store(c, name, &rt, store),
            Err(e) => eprintln!("SKIPPED {name} bench: no Redis at {url}: {e}"),
        }
    }
}

criterion_group! {
    name = store;
    config = criterion();
    targets = benches
}
criterion_main!(store);
