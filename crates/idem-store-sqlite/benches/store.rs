//! Claims+completes and replay lookups per second, memory against SQLite (both
//! durabilities), with 64 concurrent callers: the shared store benchmark of
//! `idem_conformance::bench`.
//!
//! `cargo bench -p idem-store-sqlite --bench store`

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use idem_conformance::bench::{bench_store, criterion, runtime};
use idem_store_memory::MemoryStore;
use idem_store_sqlite::{Durability, SqliteOptions, SqliteStore};

fn benches(c: &mut Criterion) {
    let rt = runtime();
    bench_store(c, "memory", &rt, MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let full = SqliteStore::open(dir.path().join("full.db")).unwrap();
    bench_store(c, "sqlite-full", &rt, full);
    let normal = SqliteStore::open_with(
        dir.path().join("normal.db"),
        SqliteOptions::default().with_durability(Durability::Normal),
    )
    .unwrap();
    bench_store(c, "sqlite-normal", &rt, normal);
}

criterion_group! {
    name = store;
    config = criterion();
    targets = benches
}
criterion_main!(store);
