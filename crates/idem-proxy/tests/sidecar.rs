//! Black-box tests of the `idem` binary: a real upstream on loopback, the real binary
//! as a child process, driven over HTTP.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{start_idem, start_in_memory, upstream_config, write_config};
use idem_test_support::{Sent, client, post, upstream};

#[tokio::test]
async fn replay_mismatch_and_headers_through_the_proxy() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let idem = start_idem(dir.path(), &["--upstream", &format!("http://{}", up.addr)]);
    let c = client();
    let first = post(&c, idem.url("/v1/charges"), Some("k1"), r#"{"amount":100}"#)
        .sent()
        .await;
    assert_eq!(first.status(), 201);
    let request_id = first.headers()["x-request-id"].clone();
    assert!(
        first.headers().get("set-cookie").is_some(),
        "the first caller gets every header"
    );
    let body = first.bytes().await.unwrap();

    let retry = post(
        &c,
        idem.url("/v1/charges"),
        Some("k1"),
        r#"{ "amount": 100 }"#,
    )
    .sent()
    .await;
    assert_eq!(retry.status(), 201);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.headers()["idempotency-key"], "k1");
    assert_eq!(
        retry.headers()["x-request-id"],
        request_id,
        "the original request id"
    );
    assert!(
        retry.headers().get("set-cookie").is_none(),
        "set-cookie is never replayed"
    );
    assert_eq!(retry.bytes().await.unwrap(), body);
    assert_eq!(up.counter.get("charges:k1"), 1);

    let other = post(&c, idem.url("/v1/charges"), Some("k1"), r#"{"amount":999}"#)
        .sent()
        .await;
    assert_eq!(other.status(), 422);
    assert_eq!(other.headers()["content-type"], "application/problem+json");
    assert_eq!(up.counter.get("charges:k1"), 1);

    // Safe methods pass through untouched.
    for _ in 0..2 {
        let res = c
            .get(idem.url("/v1/echo"))
            .header("idempotency-key", "k1")
            .sent()
            .await;
        assert_eq!(res.status(), 200);
    }
    assert_eq!(up.counter.get("echo:k1"), 2);
}

#[tokio::test]
async fn proxying_strips_hop_by_hop_and_forwards_client_info() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let idem = start_idem(dir.path(), &["--upstream", &format!("http://{}", up.addr)]);
    let res = client()
        .post(idem.url("/v1/echo?x=1"))
        .header("connection", "keep-alive, x-client-private")
        .header("x-client-private", "secret")
        .header("x-request-id", "req-123")
        .body("{}")
        .sent()
        .await;
    assert_eq!(res.status(), 200);
    assert!(
        res.headers().get("x-upstream-private").is_none(),
        "hop-by-hop response header stripped"
    );
    assert_eq!(res.headers()["x-request-id"], "req-123");
    let seen: std::collections::HashMap<String, String> = res.json().await.unwrap();
    assert!(
        !seen.contains_key("x-client-private"),
        "hop-by-hop request header stripped: {seen:?}"
    );
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert!(
        seen["forwarded"].starts_with("for=127.0.0.1;proto=http"),
        "{seen:?}"
    );
    assert_eq!(seen["x-forwarded-host"], idem.addr.to_string());
    assert_eq!(seen["x-request-id"], "req-123");
    // A request without an id gets one, which the upstream sees too.
    let res = client().get(idem.url("/v1/echo")).sent().await;
    let id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let seen: std::collections::HashMap<String, String> = res.json().await.unwrap();
    assert_eq!(seen["x-request-id"], id);
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let idem = start_in_memory(dir.path(), up.addr);
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for _ in 0..2 {
        let res = post(&h2, idem.url("/v1/charges"), Some("k-h2"), "{}")
            .sent()
            .await;
        assert_eq!(res.version(), reqwest::Version::HTTP_2);
        assert_eq!(res.status(), 201);
    }
    assert_eq!(up.counter.get("charges:k-h2"), 1);
}

#[tokio::test]
async fn tenants_and_routes_are_isolated() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            upstream = "http://{}"
            store = "memory"
            [tenant]
            secret = "a-test-secret-of-enough-length"
            [[routes]]
            method = "POST"
            path = "/v1/charges/{{id}}/capture"
            key = "required"
            "#,
            up.addr
        ),
    );
    let idem = start_idem(dir.path(), &["--config", &config]);
    let c = client();
    let as_tenant = |who: &str, path: &str| {
        c.post(idem.url(path))
            .header("authorization", format!("Bearer {who}"))
            .header("idempotency-key", "same")
            .body("{}")
    };
    let a = as_tenant("alice", "/v1/charges")
        .sent()
        .await
        .text()
        .await
        .unwrap();
    let b = as_tenant("bob", "/v1/charges").sent().await;
    assert!(b.headers().get("idempotent-replayed").is_none());
    assert_ne!(a, b.text().await.unwrap());
    assert_eq!(up.counter.get("charges:same"), 2);

    // The pattern route: one record for every id? No: the pattern names the route, the
    // key is scoped to it, so the same key on two charges' captures is one record.
    assert_eq!(
        as_tenant("alice", "/v1/charges/ch_1/capture")
            .sent()
            .await
            .status(),
        200
    );
    let again = as_tenant("alice", "/v1/charges/ch_1/capture").sent().await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(up.counter.get("capture:ch_1:same"), 1);
    // key = "required" on that route.
    let missing = c
        .post(idem.url("/v1/charges/ch_1/capture"))
        .body("{}")
        .sent()
        .await;
    assert_eq!(missing.status(), 400);
    assert_eq!(up.counter.get("capture:ch_1:"), 0);
}

#[tokio::test]
async fn concurrent_duplicates_get_409_or_wait_for_the_replay() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            upstream = "http://{}"
            [[routes]]
            path = "/v1/wait"
            on_concurrent = "wait"
            wait_timeout = "10s"
            "#,
            up.addr
        ),
    );
    let idem = Arc::new(start_idem(dir.path(), &["--config", &config]));
    let c = client();
    let run = |path: &'static str, key: &'static str| {
        let (c, idem) = (c.clone(), idem.clone());
        tokio::spawn(async move {
            let res = post(&c, idem.url(path), Some(key), "{}").sent().await;
            (
                res.status().as_u16(),
                res.headers().get("retry-after").is_some(),
                res.text().await.unwrap(),
            )
        })
    };
    let storm: Vec<_> = (0..16).map(|_| run("/v1/slow?ms=600", "k-storm")).collect();
    let (mut ok, mut conflict) = (0, 0);
    for t in storm {
        match t.await.unwrap() {
            (201, _, body) => {
                ok += 1;
                assert_eq!(body, "slow-k-storm");
            }
            (409, retry_after, body) => {
                conflict += 1;
                assert!(retry_after);
                assert!(body.contains("idempotency-key-in-use"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(up.counter.get("slow:k-storm"), 1);
    assert!(conflict >= 1 && ok + conflict == 16);

    let waiters: Vec<_> = (0..16).map(|_| run("/v1/wait?ms=600", "k-wait")).collect();
    for t in waiters {
        let (status, _, body) = t.await.unwrap();
        assert_eq!(status, 201);
        assert_eq!(body, "slow-k-wait");
    }
    assert_eq!(up.counter.get("slow:k-wait"), 1);
}

#[tokio::test]
async fn stored_500_released_400_and_upstream_no_store_header() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let idem = start_idem(dir.path(), &["--upstream", &format!("http://{}", up.addr)]);
    let c = client();
    for _ in 0..2 {
        assert_eq!(
            post(&c, idem.url("/v1/fail/500"), Some("k"), "{}")
                .sent()
                .await
                .status(),
            500
        );
        assert_eq!(
            post(&c, idem.url("/v1/fail/400"), Some("k"), "{}")
                .sent()
                .await
                .status(),
            400
        );
        let ns = post(&c, idem.url("/v1/no-store"), Some("k"), "{}")
            .sent()
            .await;
        assert!(
            ns.headers().get("idem-no-store").is_none(),
            "the signal is stripped"
        );
        assert!(ns.headers().get("idempotent-replayed").is_none());
    }
    assert_eq!(up.counter.get("fail:500:k"), 1, "500 stored and replayed");
    assert_eq!(
        up.counter.get("fail:400:k"),
        2,
        "400 released and executed again"
    );
    assert_eq!(
        up.counter.get("no-store:k"),
        2,
        "upstream said do not store"
    );
}

#[tokio::test]
async fn restart_with_sqlite_still_replays() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let args = ["--upstream".to_owned(), format!("http://{}", up.addr)];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let c = client();
    let body = {
        let idem = start_idem(dir.path(), &args);
        let res = post(&c, idem.url("/v1/charges"), Some("k-restart"), "{}")
            .sent()
            .await;
        assert_eq!(res.status(), 201);
        res.text().await.unwrap()
    };
    assert!(
        dir.path().join("idem.db").exists(),
        "the default store is ./idem.db"
    );
    let idem = start_idem(dir.path(), &args);
    let res = post(&c, idem.url("/v1/charges"), Some("k-restart"), "{}")
        .sent()
        .await;
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(res.text().await.unwrap(), body);
    assert_eq!(up.counter.get("charges:k-restart"), 1);
}

/// Starts idem, sends a slow request with `key`, SIGKILLs idem while the upstream
/// runs it, and returns a fresh idem on the same store.
async fn killed_mid_request(
    dir: &std::path::Path,
    config: &str,
    up: &idem_test_support::Upstream,
    key: &str,
) -> common::Idem {
    let c = client();
    let mut idem = start_idem(dir, &["--config", config]);
    let pending = tokio::spawn(common::slow_post(&c, &idem, key, 5000).send());
    while up.counter.get(&format!("slow:{key}")) == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    idem.child.kill().unwrap(); // SIGKILL
    idem.child.wait().unwrap();
    assert!(
        pending.await.unwrap().is_err(),
        "the client lost its answer"
    );
    start_idem(dir, &["--config", config])
}

#[tokio::test]
async fn sigkill_mid_request_keeps_the_key_in_flight_until_the_lease_expires() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = upstream_config(dir.path(), up.addr, "[defaults]\nlease = \"1500ms\"\n");
    let c = client();
    let idem = killed_mid_request(dir.path(), &config, &up, "k-kill").await;
    // Within the lease: in use.
    let during = common::slow_post(&c, &idem, "k-kill", 10).sent().await;
    assert_eq!(during.status(), 409);
    assert_eq!(up.counter.get("slow:k-kill"), 1);
    // After it: on_abandoned = reexecute.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let after = common::slow_post(&c, &idem, "k-kill", 10).sent().await;
    assert_eq!(after.status(), 201);
    assert_eq!(up.counter.get("slow:k-kill"), 2);
}

#[tokio::test]
async fn abandoned_key_with_reject_policy_stays_refused() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = upstream_config(
        dir.path(),
        up.addr,
        "[defaults]\nlease = \"500ms\"\non_abandoned = \"reject\"\n",
    );
    let c = client();
    let idem = killed_mid_request(dir.path(), &config, &up, "k-rej").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let res = common::slow_post(&c, &idem, "k-rej", 10).sent().await;
    assert_eq!(res.status(), 409);
    let p: serde_json::Value = res.json().await.unwrap();
    assert_eq!(p["type"], "urn:idem:problem:idempotency-outcome-unknown");
    assert_eq!(up.counter.get("slow:k-rej"), 1);
}

#[tokio::test]
async fn upstream_down_is_502_and_the_key_stays_usable() {
    let up = upstream().await;
    // A port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    {
        let idem = start_idem(dir.path(), &["--upstream", &format!("http://{dead}")]);
        let res = post(&c, idem.url("/v1/charges"), Some("k-down"), "{}")
            .sent()
            .await;
        assert_eq!(res.status(), 502);
        let p: serde_json::Value = res.json().await.unwrap();
        assert_eq!(p["type"], "urn:idem:problem:upstream-unreachable");
    }
    // Same database, upstream back: the key was released, the request executes.
    let idem = start_idem(dir.path(), &["--upstream", &format!("http://{}", up.addr)]);
    let res = post(&c, idem.url("/v1/charges"), Some("k-down"), "{}")
        .sent()
        .await;
    assert_eq!(res.status(), 201);
    assert!(res.headers().get("idempotent-replayed").is_none());
    assert_eq!(up.counter.get("charges:k-down"), 1);
}

#[tokio::test]
async fn response_lost_after_sending_is_outcome_unknown_and_never_reexecuted_within_the_lease() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = upstream_config(dir.path(), up.reset_addr, "[defaults]\nlease = \"1s\"\n");
    let idem = start_idem(dir.path(), &["--config", &config]);
    let c = client();
    let res = post(&c, idem.url("/v1/charges"), Some("k-lost"), "{}")
        .sent()
        .await;
    assert_eq!(res.status(), 502);
    let p: serde_json::Value = res.json().await.unwrap();
    assert_eq!(p["type"], "urn:idem:problem:upstream-outcome-unknown");
    assert_eq!(up.counter.get("reset:k-lost"), 1);
    // Inside the lease: refused, not executed again.
    let again = post(&c, idem.url("/v1/charges"), Some("k-lost"), "{}")
        .sent()
        .await;
    assert_eq!(again.status(), 409);
    assert_eq!(up.counter.get("reset:k-lost"), 1);
    // After the lease: on_abandoned = reexecute sends it again.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let later = post(&c, idem.url("/v1/charges"), Some("k-lost"), "{}")
        .sent()
        .await;
    assert_eq!(later.status(), 502);
    assert_eq!(up.counter.get("reset:k-lost"), 2);
}

#[tokio::test]
async fn response_timeout_is_504_outcome_unknown() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = upstream_config(
        dir.path(),
        up.addr,
        "[proxy]\nresponse_timeout = \"300ms\"\n",
    );
    let idem = start_idem(dir.path(), &["--config", &config]);
    let c = client();
    let res = common::slow_post(&c, &idem, "k-to", 2000).sent().await;
    assert_eq!(res.status(), 504);
    let p: serde_json::Value = res.json().await.unwrap();
    assert_eq!(p["type"], "urn:idem:problem:upstream-outcome-unknown");
    let again = common::slow_post(&c, &idem, "k-to", 10).sent().await;
    assert_eq!(again.status(), 409, "in flight until the lease expires");
    assert_eq!(up.counter.get("slow:k-to"), 1);
}

#[test]
fn config_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write_config(
        dir.path(),
        "upstream = \"http://127.0.0.1:1\"\n[[routes]]\npath = \"/v1/x\"\nttl = \"soon\"\n",
    );
    let out = std::process::Command::new(common::binary())
        .args(["check-config", &bad])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("routes[0]") && err.contains("soon"), "{err}");

    let out = std::process::Command::new(common::binary())
        .args([
            "serve",
            "--upstream",
            "http://127.0.0.1:1",
            "--listen",
            "nowhere",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("listen:"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let good = write_config(
        dir.path(),
        "upstream = \"http://127.0.0.1:1\"\n[[routes]]\npath = \"/v1/x\"\nttl = \"72h\"\n",
    );
    let out = std::process::Command::new(common::binary())
        .args(["check-config", &good])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn admin_api_and_keys_cli() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let token = "admin-token-0123456789";
    let config = upstream_config(
        dir.path(),
        up.addr,
        &format!(
            "store = \"sqlite:keys.db\"\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n[defaults]\nlease = \"30s\"\n"
        ),
    );
    let idem = start_idem(dir.path(), &["--config", &config]);
    let admin = idem.admin.expect("admin listener");
    let c = client();
    let admin_get = |path: &str, tok: Option<&str>| {
        let mut req = c.get(format!("http://{admin}{path}"));
        if let Some(t) = tok {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    assert_eq!(admin_get("/healthz", None).await.unwrap().status(), 401);
    assert_eq!(
        admin_get("/healthz", Some("wrong-token-0123456789"))
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        admin_get("/healthz", Some(token)).await.unwrap().status(),
        200
    );
    assert_eq!(
        admin_get("/readyz", Some(token)).await.unwrap().status(),
        200
    );

    post(&c, idem.url("/v1/charges"), Some("k-admin"), "{}")
        .sent()
        .await;
    post(&c, idem.url("/v1/charges"), Some("k-admin"), "{}")
        .sent()
        .await;
    let metrics = admin_get("/metrics", Some(token))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("idem_requests_total{outcome=\"executed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("idem_requests_total{outcome=\"replayed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("idem_store_latency_seconds_bucket"),
        "{metrics}"
    );
    assert!(metrics.contains("idem_in_flight"), "{metrics}");
    assert!(metrics.contains("idem_stored_bytes_total"), "{metrics}");

    let q = "route=POST%20/v1/charges&key=k-admin&credential=Bearer%20sk_alice";
    let doc: serde_json::Value = admin_get(&format!("/keys?{q}"), Some(token))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["state"], "completed");
    assert_eq!(doc["status"], 201);
    assert!(
        !doc.to_string().contains("sk_alice"),
        "never the credential"
    );

    // The same through the CLI, against the same database file.
    let out = std::process::Command::new(common::binary())
        .args([
            "keys",
            "inspect",
            "--config",
            &config,
            "--route",
            "POST /v1/charges",
            "--key",
            "k-admin",
            "--credential",
            "Bearer sk_alice",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli["state"], "completed");
    assert_eq!(cli["tenant"], doc["tenant"]);

    // Purge through the admin API: the key executes again.
    let purged = c
        .delete(format!("http://{admin}/keys?{q}"))
        .bearer_auth(token)
        .sent()
        .await;
    assert_eq!(purged.status(), 200);
    post(&c, idem.url("/v1/charges"), Some("k-admin"), "{}")
        .sent()
        .await;
    assert_eq!(up.counter.get("charges:k-admin"), 2);

    // Release an in-flight key (its executor is stuck) through the CLI.
    let stuck = tokio::spawn(common::slow_post(&c, &idem, "k-stuck", 3000).send());
    while up.counter.get("slow:k-stuck") == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = std::process::Command::new(common::binary())
        .args([
            "keys",
            "release",
            "--config",
            &config,
            "--route",
            "POST /v1/slow",
            "--key",
            "k-stuck",
            "--credential",
            "Bearer sk_alice",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = common::slow_post(&c, &idem, "k-stuck", 10).sent().await;
    assert_eq!(again.status(), 201, "released: executes again");
    let _ = stuck.await;
}

#[tokio::test]
async fn sigterm_finishes_accepted_requests_then_exits_0() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut idem = start_in_memory(dir.path(), up.addr);
    let c = client();
    let inflight: Vec<_> = (0..8)
        .map(|i| {
            let (c, url) = (c.clone(), idem.url("/v1/slow?ms=800"));
            tokio::spawn(async move {
                post(&c, url, Some(&format!("k-term-{i}")), "{}")
                    .send()
                    .await
            })
        })
        .collect();
    while (0..8)
        .map(|i| up.counter.get(&format!("slow:k-term-{i}")))
        .sum::<usize>()
        < 8
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    idem.signal("TERM");
    for t in inflight {
        let res = t.await.unwrap().expect("an accepted request is answered");
        assert_eq!(res.status(), 201);
    }
    assert_eq!(idem.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        post(&c, idem.url("/v1/charges"), Some("k-after"), "{}")
            .send()
            .await
            .is_err(),
        "no new connections"
    );
}

#[test]
fn the_shipped_example_config_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/idem.toml");
    let out = std::process::Command::new(common::binary())
        .args(["check-config", example])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 routes"));
}

/// Two `idem` instances on one shared store behave as one: a key executed through the
/// first replays through the second, and a duplicate in flight on one is refused by the
/// other.
async fn two_instances_share(store: &str, reachable: &str) {
    if std::net::TcpStream::connect_timeout(&reachable.parse().unwrap(), Duration::from_secs(1))
        .is_err()
    {
        idem_conformance::skip(&format!("two instances on {store}"));
        return;
    }
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = upstream_config(
        dir.path(),
        up.addr,
        &format!("store = \"{store}\"\n[tenant]\nsecret = \"shared-secret-for-both-instances\"\n"),
    );
    let a = start_idem(dir.path(), &["--config", &config]);
    let b = start_idem(dir.path(), &["--config", &config]);
    let c = client();
    let key = format!("k-shared-{}", uuid::Uuid::new_v4());
    let first = post(&c, a.url("/v1/charges"), Some(&key), "{}")
        .sent()
        .await;
    assert_eq!(first.status(), 201);
    let body = first.text().await.unwrap();
    let replay = post(&c, b.url("/v1/charges"), Some(&key), "{}")
        .sent()
        .await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.text().await.unwrap(), body);
    assert_eq!(up.counter.get(&format!("charges:{key}")), 1);

    let slow_key = format!("k-slow-{}", uuid::Uuid::new_v4());
    let pending = tokio::spawn(common::slow_post(&c, &a, &slow_key, 800).send());
    while up.counter.get(&format!("slow:{slow_key}")) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let dup = common::slow_post(&c, &b, &slow_key, 800).sent().await;
    assert_eq!(dup.status(), 409);
    assert_eq!(pending.await.unwrap().unwrap().status(), 201);
    assert_eq!(up.counter.get(&format!("slow:{slow_key}")), 1);
}

#[tokio::test]
async fn two_instances_share_redis() {
    two_instances_share("redis://127.0.0.1:6379/0", "127.0.0.1:6379").await;
}

#[tokio::test]
async fn two_instances_share_postgres() {
    two_instances_share("postgres://postgres@127.0.0.1:5432/test", "127.0.0.1:5432").await;
}

#[test]
fn a_shared_store_without_a_secret_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::binary())
        .args([
            "serve",
            "--upstream",
            "http://127.0.0.1:1",
            "--store",
            "redis://127.0.0.1:6379",
            "--listen",
            "127.0.0.1:0",
        ])
        .env_remove("IDEM_TENANT_SECRET")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tenant.secret"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What a store holds for the test's records (keys starting with `marker`), as text
/// for searching: the whole SQLite files, the PostgreSQL rows, or the Redis hashes.
fn dump(
    store: &str,
    dir: &std::path::Path,
    marker: &str,
    records: &[idem_core::RecordKey],
) -> String {
    if store.starts_with("sqlite:") {
        let mut bytes = std::fs::read(dir.join("idem.db")).unwrap();
        bytes.extend(std::fs::read(dir.join("idem.db-wal")).unwrap_or_default());
        return String::from_utf8_lossy(&bytes).into_owned();
    }
    let run = |cmd: &mut std::process::Command| {
        let out = cmd.output().expect("client tool");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    if store.starts_with("postgres") {
        return run(std::process::Command::new("psql").args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "test",
            "-At",
            "-c",
            &format!(
                "SELECT tenant, route, key, fingerprint, encode(response, 'escape') FROM idem_records \
                 WHERE key LIKE '{marker}%'"
            ),
        ]));
    }
    let mut all = String::new();
    for r in records {
        let hash = format!("idem:{{{}}}", r.storage_id());
        all.push_str(&r.key);
        all.push_str(&run(std::process::Command::new("redis-cli").args([
            "-h",
            "127.0.0.1",
            "--raw",
            "HGETALL",
            &hash,
        ])));
    }
    all
}

/// The raw credential is never stored, and with `[encryption]` neither is any body.
async fn nothing_secret_at_rest(store: &str, reachable: Option<&str>) {
    if let Some(addr) = reachable
        && std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(1))
            .is_err()
    {
        idem_conformance::skip(&format!("nothing secret at rest on {store}"));
        return;
    }
    let up = upstream().await;
    for encrypt in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let marker = format!("body-marker-{}", uuid::Uuid::new_v4().simple());
        let credential = format!("sk_live_{}", uuid::Uuid::new_v4().simple());
        let encryption = if encrypt {
            format!("[encryption]\nkey = \"{}\"\n", "3c".repeat(32))
        } else {
            String::new()
        };
        let config = upstream_config(
            dir.path(),
            up.addr,
            &format!(
                "store = \"{store}\"\n[tenant]\nsecret = \"secret-for-the-at-rest-test\"\n{encryption}"
            ),
        );
        let idem = start_idem(dir.path(), &["--config", &config]);
        let c = client();
        // The upstream answers with the request's size; the marker makes the body unique.
        for i in 0..3 {
            let res = c
                .post(idem.url("/v1/charges"))
                .header("authorization", format!("Bearer {credential}"))
                .header("idempotency-key", format!("{marker}-{i}"))
                .body(marker.clone())
                .sent()
                .await;
            assert_eq!(res.status(), 201);
            // The outcome is stored before the last byte of the body is delivered.
            res.bytes().await.unwrap();
            let replay = c
                .post(idem.url("/v1/charges"))
                .header("authorization", format!("Bearer {credential}"))
                .header("idempotency-key", format!("{marker}-{i}"))
                .body(marker.clone())
                .sent()
                .await;
            assert_eq!(
                replay.headers()["idempotent-replayed"],
                "true",
                "replays decrypt"
            );
        }
        drop(idem);
        let tenants = idem_core::TenantHasher::new(
            idem_core::TenantSecret::new(b"secret-for-the-at-rest-test".to_vec()).unwrap(),
        );
        let tenant = tenants.tenant_for(format!("Bearer {credential}").as_bytes());
        let records: Vec<_> = (0..3)
            .map(|i| {
                idem_core::RecordKey::new(
                    tenant.clone(),
                    "POST /v1/charges",
                    format!("{marker}-{i}"),
                )
            })
            .collect();
        let at_rest = dump(store, dir.path(), &marker, &records);
        assert!(
            at_rest.contains(&marker),
            "the dump must see the records (keys hold the marker)"
        );
        assert!(!at_rest.contains(&credential), "the credential was stored");
        // Bodies are `{"id":"ch_N","execution":1,"bytes":N}`.
        assert_eq!(
            at_rest.contains("\"execution\":1"),
            !encrypt,
            "plaintext bodies with encryption {encrypt}"
        );
    }
}

#[tokio::test]
async fn nothing_secret_at_rest_in_sqlite() {
    nothing_secret_at_rest("sqlite:idem.db", None).await;
}

#[tokio::test]
async fn nothing_secret_at_rest_in_postgres() {
    nothing_secret_at_rest(
        "postgres://postgres@127.0.0.1:5432/test",
        Some("127.0.0.1:5432"),
    )
    .await;
}

#[tokio::test]
async fn nothing_secret_at_rest_in_redis() {
    nothing_secret_at_rest("redis://127.0.0.1:6379/0", Some("127.0.0.1:6379")).await;
}

/// The proxy's workers share their port with `SO_REUSEPORT`; a second sidecar started
/// on a port already served must still refuse to start, not split the traffic with
/// the first one (each with its own memory, a retry landing on the other would run
/// again).
#[tokio::test]
async fn a_second_sidecar_on_a_served_port_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream().await;
    let upstream_url = format!("http://{}", up.addr);
    let first = start_idem(dir.path(), &["--upstream", &upstream_url]);
    let second = std::process::Command::new(common::binary())
        .args(["serve", "--listen", &first.addr.to_string()])
        .args(["--upstream", &upstream_url, "--store", "memory"])
        .current_dir(dir.path())
        .env("IDEM_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start a second idem");
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || second.wait_with_output()),
    )
    .await
    .expect("the second sidecar must exit, not serve")
    .unwrap()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the second sidecar started: {stderr}"
    );
    assert!(
        stderr.contains("listen: cannot bind"),
        "the refusal names the field: {stderr}"
    );
    // The first one goes on serving.
    let res = post(&client(), first.url("/v1/charges"), None, "{}")
        .sent()
        .await;
    assert_eq!(res.status(), 201);
}
