//! The shared conformance suite against a real PostgreSQL.

use std::sync::Arc;

use idem_store_postgres::{PostgresOptions, PostgresStore};

async fn connect() -> Option<Arc<PostgresStore>> {
    connect_with(PostgresOptions::default()).await
}

async fn connect_with(options: PostgresOptions) -> Option<Arc<PostgresStore>> {
    let url = std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    // A small pool: nextest runs several test processes side by side.
    match PostgresStore::connect_with(&url, options.with_max_connections(8)).await {
        Ok(store) => Some(Arc::new(store)),
        Err(e) => {
            eprintln!("no PostgreSQL at {url}: {e}");
            None
        }
    }
}

idem_conformance::conformance_tests!(connect());

/// Without `pg_notify`: the same contract, watches poll.
mod without_notify {
    idem_conformance::conformance_tests!(super::connect_with(
        idem_store_postgres::PostgresOptions::default().with_notify(false)
    ));
}

#[tokio::test]
async fn migrate_is_idempotent() {
    let Some(store) = connect().await else {
        return idem_conformance::skip("migrate_is_idempotent");
    };
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
}
