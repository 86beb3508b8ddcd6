//! The Tower layer over a real PostgreSQL: a duplicate storm over three instances
//! sharing one store, and a restart of a private PostgreSQL during traffic.

use std::sync::Arc;
use std::time::Duration;

use idem_conformance::servers::{PrivatePostgres, PrivateStore};
use idem_store_postgres::{PostgresOptions, PostgresStore};
use idem_test_support::layer::{self, skip};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_three_instances() {
    let url = std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    // A generous timeout: 256 requests in flight share 16 connections on a loaded
    // machine, and a 503 would fail the storm. It bounds hangs; nothing is timed.
    let options = PostgresOptions::default().with_op_timeout(Duration::from_secs(10));
    match PostgresStore::connect_with(&url, options).await {
        Ok(store) => layer::storm(Arc::new(store)).await,
        Err(e) => skip(
            "storm_three_instances",
            &format!("no PostgreSQL at {url}: {e}"),
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_right_after_the_answer_replays() {
    let url = std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    match PostgresStore::connect(&url).await {
        Ok(store) => layer::retry_right_after_the_answer_replays(Arc::new(store)).await,
        Err(e) => skip(
            "retry_right_after_the_answer_replays",
            &format!("no PostgreSQL at {url}: {e}"),
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_during_traffic() {
    let Some(server) = PrivatePostgres::start_new() else {
        return skip(
            "restart_during_traffic",
            "initdb/pg_ctl not found under /usr/lib/postgresql/*/bin",
        );
    };
    let mut server = server.expect("start a private PostgreSQL");
    let options = PostgresOptions::default().with_op_timeout(Duration::from_millis(500));
    let store = PostgresStore::connect_with(&server.url(), options)
        .await
        .expect("connect to the private PostgreSQL");
    layer::restart_during_traffic(Arc::new(store), &mut server).await;
}
