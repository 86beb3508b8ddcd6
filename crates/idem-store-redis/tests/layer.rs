//! The Tower layer over a real Redis: a duplicate storm over three instances sharing
//! one store (standalone and Cluster), and a restart of a private Redis during traffic.

use std::sync::Arc;
use std::time::Duration;

use idem_conformance::servers::{PrivateRedis, PrivateStore};
use idem_store_redis::{RedisOptions, RedisStore};
use idem_test_support::layer::{self, skip};

async fn connect(var: &str, default: &str) -> Option<Arc<RedisStore>> {
    let url = std::env::var(var).unwrap_or_else(|_| default.to_owned());
    // A generous timeout: on a loaded machine a 503 would fail the storm. It bounds
    // hangs; nothing is timed.
    let options = RedisOptions::default().with_op_timeout(Duration::from_secs(10));
    match RedisStore::connect_with(&url, options).await {
        Ok(store) => Some(Arc::new(store)),
        Err(e) => {
            eprintln!("no Redis at {url}: {e}");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_three_instances_standalone() {
    match connect("IDEM_REDIS_URL", "redis://127.0.0.1:6379").await {
        Some(store) => layer::storm(store).await,
        None => skip("storm_three_instances_standalone", "Redis unreachable"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_right_after_the_answer_replays() {
    match connect("IDEM_REDIS_URL", "redis://127.0.0.1:6379").await {
        Some(store) => layer::retry_right_after_the_answer_replays(store).await,
        None => skip("retry_right_after_the_answer_replays", "Redis unreachable"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_three_instances_cluster() {
    match connect(
        "IDEM_REDIS_CLUSTER",
        "redis://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002",
    )
    .await
    {
        Some(store) => layer::storm(store).await,
        None => skip("storm_three_instances_cluster", "Redis Cluster unreachable"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_during_traffic() {
    // With an append-only file synced on every write: what was acknowledged before
    // the kill is there after the restart.
    let Some(server) = PrivateRedis::start_new(true) else {
        return skip("restart_during_traffic", "redis-server is not installed");
    };
    let mut server = server.expect("start a private redis-server");
    let options = RedisOptions::default().with_op_timeout(Duration::from_millis(500));
    let store = RedisStore::connect_with(&server.url(), options)
        .await
        .expect("connect to the private redis");
    layer::restart_during_traffic(Arc::new(store), &mut server).await;
}
