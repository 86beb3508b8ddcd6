//! The `idem` binary on a Redis that may evict its records (`maxmemory-policy` other
//! than `noeviction`): it refuses to start, naming the override, starts with
//! `allow_eviction=true`, and `/readyz` follows the policy at run time. Against a
//! private `redis-server`: the shared one's configuration is never changed.

mod common;

use std::process::Command;

use common::start_idem;
use idem_conformance::servers::{PrivateRedis, PrivateStore};
use idem_test_support::{client, upstream};

const SECRET: &str = "a-test-secret-of-enough-length";
const TOKEN: &str = "admin-token-0123456789";

fn private(test: &str) -> Option<PrivateRedis> {
    match PrivateRedis::start_with(false, &["--maxmemory-policy", "allkeys-lru"]) {
        Some(server) => Some(server.expect("start a private redis-server")),
        None => {
            eprintln!("{test}: redis-server is not installed");
            idem_conformance::skip(test);
            None
        }
    }
}

fn set_policy(server: &PrivateRedis, policy: &str) {
    let port = server.url().rsplit(':').next().unwrap().to_owned();
    let ok = Command::new("redis-cli")
        .args(["-p", &port, "CONFIG", "SET", "maxmemory-policy", policy])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"OK"));
    assert!(ok, "redis-cli CONFIG SET maxmemory-policy {policy}");
}

#[tokio::test]
async fn idem_refuses_an_evicting_redis_and_readiness_follows_the_policy() {
    let Some(server) = private("idem_refuses_an_evicting_redis_and_readiness_follows_the_policy")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(common::binary())
        .args(["serve", "--upstream", "http://127.0.0.1:1"])
        .args(["--store", &server.url(), "--listen", "127.0.0.1:0"])
        .env("IDEM_TENANT_SECRET", SECRET)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started on an evicting Redis: {stderr}"
    );
    assert!(
        stderr.contains("allkeys-lru") && stderr.contains("allow_eviction=true"),
        "the refusal names the policy and the override: {stderr}"
    );

    let up = upstream().await;
    let config = dir.path().join("idem.toml");
    std::fs::write(
        &config,
        format!(
            "upstream = \"http://{}\"\nstore = \"{}?allow_eviction=true\"\n[tenant]\nsecret = \"{SECRET}\"\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n",
            up.addr,
            server.url()
        ),
    )
    .unwrap();
    let allowed = start_idem(dir.path(), &["--config", config.to_str().unwrap()]);
    let c = client();
    let ready = |idem: &common::Idem| {
        let admin = idem.admin.expect("admin listener");
        c.get(format!("http://{admin}/readyz"))
            .bearer_auth(TOKEN)
            .send()
    };
    assert_eq!(
        ready(&allowed).await.unwrap().status(),
        200,
        "allowed knowingly"
    );
    drop(allowed);

    set_policy(&server, "noeviction");
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("?allow_eviction=true", ""),
    )
    .unwrap();
    let idem = start_idem(dir.path(), &["--config", config.to_str().unwrap()]);
    assert_eq!(ready(&idem).await.unwrap().status(), 200);
    set_policy(&server, "volatile-ttl");
    let res = ready(&idem).await.unwrap();
    assert_eq!(res.status(), 503, "not ready once Redis may evict");
    let body = res.text().await.unwrap();
    assert!(
        body.contains("volatile-ttl") && body.contains("allow_eviction"),
        "{body}"
    );
    set_policy(&server, "noeviction");
    assert_eq!(ready(&idem).await.unwrap().status(), 200, "ready again");
}
