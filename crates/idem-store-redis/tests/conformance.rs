//! The shared conformance suite against a real Redis: standalone and Cluster.

use std::sync::Arc;

use idem_store_redis::{RedisOptions, RedisStore};

async fn connect(var: &str, default: &str) -> Option<Arc<RedisStore>> {
    connect_with(var, default, RedisOptions::default()).await
}

async fn connect_with(var: &str, default: &str, options: RedisOptions) -> Option<Arc<RedisStore>> {
    let url = std::env::var(var).unwrap_or_else(|_| default.to_owned());
    match RedisStore::connect_with(&url, options).await {
        Ok(store) => Some(Arc::new(store)),
        Err(e) => {
            eprintln!("no Redis at {url}: {e}");
            None
        }
    }
}

mod standalone {
    use super::*;
    idem_conformance::conformance_tests!(connect("IDEM_REDIS_URL", "redis://127.0.0.1:6379"));
}

mod cluster {
    use super::*;
    idem_conformance::conformance_tests!(connect(
        "IDEM_REDIS_CLUSTER",
        "redis://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002"
    ));
}

/// Without change notifications (the sidecar's choice when no route waits): nothing is
/// published, and watches find changes by re-reading.
mod standalone_without_notifications {
    use super::*;
    idem_conformance::conformance_tests!(connect_with(
        "IDEM_REDIS_URL",
        "redis://127.0.0.1:6379",
        RedisOptions::default().with_notify(false)
    ));
}
