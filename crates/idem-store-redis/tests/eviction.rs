//! A Redis that may evict keys (`maxmemory-policy` other than `noeviction`) can drop
//! a claim or a stored outcome under memory pressure, and the request then runs twice:
//! the store refuses to start on one, and readiness fails when the policy turns
//! evicting at run time, unless `allow_eviction` says the risk is accepted. Against
//! private `redis-server`s: the shared one's configuration is never changed.

use std::time::Duration;

use idem_conformance::servers::{PrivateRedis, PrivateStore};
use idem_core::Store;
use idem_store_redis::RedisStore;
use idem_test_support::layer::skip;

fn private(test: &str, args: &[&str]) -> Option<PrivateRedis> {
    match PrivateRedis::start_with(false, args) {
        Some(server) => Some(server.expect("start a private redis-server")),
        None => {
            skip(test, "redis-server is not installed");
            None
        }
    }
}

async fn config_set(url: &str, policy: &str) {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg(policy)
        .query_async(&mut c)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_evicting_redis_is_refused_at_start_unless_allowed() {
    let test = "an_evicting_redis_is_refused_at_start_unless_allowed";
    let Some(server) = private(test, &["--maxmemory-policy", "allkeys-lru"]) else {
        return;
    };
    let err = RedisStore::connect(&server.url())
        .await
        .expect_err("a Redis that may evict idem's records must be refused at start")
        .to_string();
    assert!(
        err.contains("allkeys-lru") && err.contains("allow_eviction"),
        "the refusal names the policy and the setting that overrides it: {err}"
    );
    let store = RedisStore::connect(&format!("{}?allow_eviction=true", server.url()))
        .await
        .expect("allow_eviction=true accepts the risk knowingly");
    store.ping().await.expect("ready when eviction is allowed");
}

#[tokio::test]
async fn readiness_fails_when_the_policy_turns_evicting() {
    let test = "readiness_fails_when_the_policy_turns_evicting";
    let Some(server) = private(test, &[]) else {
        return;
    };
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let allowed = RedisStore::connect(&format!("{}?allow_eviction=true", server.url()))
        .await
        .unwrap();
    store.ping().await.expect("noeviction: ready");
    config_set(&server.url(), "volatile-lru").await;
    let err = store
        .ping()
        .await
        .expect_err("not ready once Redis may evict idem's records")
        .to_string();
    assert!(
        err.contains("volatile-lru") && err.contains("allow_eviction"),
        "{err}"
    );
    allowed.ping().await.expect("ready: eviction allowed");
    config_set(&server.url(), "noeviction").await;
    store.ping().await.expect("ready again after noeviction");
}

/// Managed services often forbid `CONFIG`: the policy cannot be read, so the store
/// warns and starts anyway.
#[tokio::test]
async fn a_redis_that_forbids_config_still_starts() {
    let test = "a_redis_that_forbids_config_still_starts";
    let Some(server) = private(test, &["--rename-command", "CONFIG", ""]) else {
        return;
    };
    let store = RedisStore::connect(&server.url())
        .await
        .expect("CONFIG forbidden: start with a warning");
    store.ping().await.expect("ready");
    store.ping().await.expect("ready, and warned only once");
}

/// A cluster of two private masters, each with half of the slots.
async fn two_master_cluster(test: &str) -> Option<[PrivateRedis; 2]> {
    let a = private(test, &["--cluster-enabled", "yes"])?;
    let b = private(test, &["--cluster-enabled", "yes"])?;
    let port = |s: &PrivateRedis| s.url().rsplit(':').next().unwrap().to_owned();
    let cmd = |url: String, args: Vec<String>| async move {
        let client = redis::Client::open(url).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd(&args[0])
            .arg(&args[1..])
            .query_async::<redis::Value>(&mut c)
            .await
            .unwrap()
    };
    let words = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
    cmd(a.url(), words("CLUSTER ADDSLOTSRANGE 0 8191")).await;
    cmd(b.url(), words("CLUSTER ADDSLOTSRANGE 8192 16383")).await;
    cmd(
        a.url(),
        words(&format!("CLUSTER MEET 127.0.0.1 {}", port(&b))),
    )
    .await;
    for _ in 0..200 {
        let mut ok = true;
        for s in [&a, &b] {
            let info = cmd(s.url(), words("CLUSTER INFO")).await;
            let text = match info {
                redis::Value::BulkString(b) => String::from_utf8(b).unwrap(),
                redis::Value::VerbatimString { text, .. } => text,
                other => panic!("CLUSTER INFO: {other:?}"),
            };
            ok &= text.contains("cluster_state:ok");
        }
        if ok {
            return Some([a, b]);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the private cluster did not become ok");
}

/// On a Cluster every master is asked: one evicting master is enough to refuse.
#[tokio::test]
async fn a_cluster_with_one_evicting_master_is_refused() {
    let test = "a_cluster_with_one_evicting_master_is_refused";
    let Some([a, b]) = two_master_cluster(test).await else {
        return;
    };
    let nodes = format!("{},{}", a.url(), b.url().trim_start_matches("redis://"));
    RedisStore::connect(&nodes)
        .await
        .expect("both masters noeviction: starts");
    config_set(&b.url(), "allkeys-lfu").await;
    let err = RedisStore::connect(&nodes)
        .await
        .expect_err("one master may evict: refused")
        .to_string();
    let b_addr = b.url().trim_start_matches("redis://").to_owned();
    assert!(
        err.contains("allkeys-lfu") && err.contains(&b_addr) && err.contains("allow_eviction"),
        "the refusal names the node, its policy and the setting: {err}"
    );
    RedisStore::connect(&format!("{nodes}?allow_eviction=true"))
        .await
        .expect("allowed knowingly");
}
