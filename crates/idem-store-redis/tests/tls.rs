//! `rediss://` against real `redis-server`s started here with `--tls-port` and
//! certificates made here: standalone, a client certificate required, a three-node
//! Cluster over TLS, and the certificates that must be refused.

use std::sync::Arc;
use std::time::Duration;

use idem_conformance::cases_dispatch as cases;
use idem_conformance::pki::{TestCa, Validity};
use idem_conformance::servers::{PrivateRedis, PrivateRedisCluster, PrivateStore, ServerTls};
use idem_conformance::skip;
use idem_store_redis::{RedisOptions, RedisStore};

fn server_tls(ca: &TestCa, names: &[&str], validity: Validity, mtls: bool) -> ServerTls {
    let pair = ca.server(&format!("redis-{}", names.join("-")), names, validity);
    ServerTls {
        cert: pair.cert,
        key: pair.key,
        ca: ca.ca_file(),
        require_client_cert: mtls,
    }
}

fn start(tls: ServerTls) -> Option<PrivateRedis> {
    PrivateRedis::start_tls(tls, false).map(|r| r.expect("start a TLS redis-server"))
}

async fn connect(url: &str) -> Result<RedisStore, idem_core::StoreError> {
    RedisStore::connect_with(
        url,
        RedisOptions::default().with_op_timeout(Duration::from_secs(5)),
    )
    .await
}

fn root(ca: &TestCa) -> String {
    format!("sslrootcert={}", ca.ca_file().display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_over_tls() {
    let ca = TestCa::new("redis");
    let Some(server) = start(server_tls(
        &ca,
        &["127.0.0.1", "localhost"],
        Validity::Current,
        false,
    )) else {
        return skip("standalone_over_tls (redis-server not installed)");
    };
    let store = connect(&format!("{}?{}", server.url(), root(&ca)))
        .await
        .expect("rediss:// with the test CA");
    let store = Arc::new(store);
    cases::claim_then_replay(store.clone()).await;
    // Pub/sub wake-ups ride their own TLS connection.
    cases::watch_wakes_on_change(store).await;
    let plain = server.url().replace("rediss://", "redis://");
    assert!(
        connect(&plain).await.is_err(),
        "the TLS port speaks no plain RESP"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_when_the_server_requires_one() {
    let ca = TestCa::new("redis");
    let Some(server) = start(server_tls(&ca, &["127.0.0.1"], Validity::Current, true)) else {
        return skip(
            "client_certificate_when_the_server_requires_one (redis-server not installed)",
        );
    };
    let without = format!("{}?{}", server.url(), root(&ca));
    assert!(connect(&without).await.is_err(), "no client certificate");
    let client = ca.client("redis-client", "idem");
    let with = format!(
        "{without}&sslcert={}&sslkey={}",
        client.cert.display(),
        client.key.display()
    );
    let store = connect(&with).await.expect("with a client certificate");
    cases::claim_then_replay(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_certificates_are_refused() {
    let ca = TestCa::new("redis");
    let other = TestCa::new("other");
    // (server certificate names, validity, CA the client trusts, what the error says)
    let cases: [(&[&str], Validity, &TestCa, &str); 3] = [
        (&["127.0.0.1"], Validity::Current, &other, "UnknownIssuer"),
        (
            &["redis.example.invalid"],
            Validity::Current,
            &ca,
            "not valid for name",
        ),
        (&["127.0.0.1"], Validity::Expired, &ca, "expired"),
    ];
    for (names, validity, trusted, says) in cases {
        let Some(server) = start(server_tls(&ca, names, validity, false)) else {
            return skip("wrong_certificates_are_refused (redis-server not installed)");
        };
        let url = format!("{}?{}", server.url(), root(trusted));
        let Err(err) = connect(&url).await else {
            panic!("{names:?} {validity:?}: accepted");
        };
        assert!(format!("{err:?}").contains(says), "{names:?}: {err:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_over_tls_with_client_certificates() {
    let ca = TestCa::new("cluster");
    let client = ca.client("cluster-client", "idem");
    let tls = server_tls(&ca, &["127.0.0.1"], Validity::Current, true);
    let started = tokio::task::spawn_blocking(move || {
        PrivateRedisCluster::start_tls(tls, Some((client.cert, client.key)))
    })
    .await
    .unwrap();
    let Some(cluster) = started else {
        return skip("cluster_over_tls_with_client_certificates (redis-server not installed)");
    };
    let cluster = cluster.expect("start a private TLS Redis Cluster");
    let client = ca.client("cluster-client-2", "idem");
    let seeds = cluster.nodes().join(",");
    let without = format!("rediss://{seeds}?{}", root(&ca));
    assert!(
        connect(&without).await.is_err(),
        "the nodes require a client certificate"
    );
    // One seed only: the other nodes are found through CLUSTER SLOTS and must get the
    // same TLS settings.
    let one_seed = format!(
        "rediss://{}?cluster=true&{}&sslcert={}&sslkey={}",
        cluster.nodes()[0],
        root(&ca),
        client.cert.display(),
        client.key.display()
    );
    let store = Arc::new(connect(&one_seed).await.expect("rediss:// to the cluster"));
    cases::claim_then_replay(store.clone()).await;
    // Keys spread over every slot range: every node is used.
    cases::many_keys(store.clone()).await;
    cases::watch_wakes_on_change(store).await;
}
