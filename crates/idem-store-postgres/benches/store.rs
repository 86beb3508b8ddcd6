//! Claims+completes and replay lookups per second against a real PostgreSQL, with 64
//! concurrent callers sharing the default pool of 16: the shared store benchmark of
//! `idem_conformance::bench`.
//!
//! `cargo bench -p idem-store-postgres --bench store`
//!
//! Server: `IDEM_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`); when
//! unreachable the bench is skipped with a message.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use idem_conformance::bench::{bench_store, criterion, runtime};
use idem_store_postgres::{PostgresOptions, PostgresStore};

fn benches(c: &mut Criterion) {
    let url = std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let rt = runtime();
    for (name, notify) in [("postgres", true), ("postgres-no-notify", false)] {
        let options = PostgresOptions::default().with_notify(notify);
        match rt.block_on(PostgresStore::connect_with(&url, options)) {
            Ok(store) => bench_store(c, name, &rt, store),
            Err(e) => eprintln!("SKIPPED {name} bench: no PostgreSQL at {url}: {e}"),
        }
    }
}

criterion_group! {
    name = store;
    config = criterion();
    targets = benches
}
criterion_main!(store);
