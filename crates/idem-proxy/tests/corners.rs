//! The corners of "exactly once" against the real binary: executions longer than a
//! record's retention, SIGTERM while callers hang up, responses that break off.

mod common;

use std::time::Duration;

use common::{start_idem, start_in_memory, upstream_config};
use idem_test_support::{Sent, client, post, upstream};

/// A record must not expire while its lease is alive: an execution longer than the
/// route's `ttl` keeps its key, a duplicate sent after the ttl is refused, and the
/// first caller gets its whole response, which later replays.
#[tokio::test]
async fn an_execution_longer_than_the_ttl_keeps_its_key() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = upstream_config(
        dir.path(),
        up.addr,
        "[defaults]\nttl = \"2s\"\nlease = \"1s\"\n",
    );
    let idem = start_idem(dir.path(), &["--config", &config]);
    let c = client();
    let first = tokio::spawn(common::slow_post(&c, &idem, "k-long", 3500).send());
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let dup = common::slow_post(&c, &idem, "k-long", 10).sent().await;
    assert_eq!(
        dup.status(),
        409,
        "a duplicate past the ttl is still in use"
    );
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), 201);
    assert_eq!(first.text().await.unwrap(), "slow-k-long", "the whole body");
    assert_eq!(up.counter.get("slow:k-long"), 1, "executed once");
    // Retention counts from completion: the outcome replays now.
    let again = common::slow_post(&c, &idem, "k-long", 10).sent().await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(up.counter.get("slow:k-long"), 1);
}

/// SIGTERM while a caller who hung up is still being served: idem waits for the
/// execution and stores its outcome before it exits, so the retry after a restart on
/// the same SQLite file replays instead of running again. (Multi-threaded: the
/// upstream lives in this runtime and must answer while the test waits for the exit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stores_the_outcome_of_a_caller_that_hung_up() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = upstream_config(
        dir.path(),
        up.addr,
        "store = \"sqlite:corners.db\"\n[defaults]\nlease = \"1s\"\n",
    );
    let mut idem = start_idem(dir.path(), &["--config", &config]);
    let c = client();
    let hung_up = tokio::time::timeout(
        Duration::from_millis(400),
        common::slow_post(&c, &idem, "k-term", 2500).send(),
    )
    .await;
    assert!(hung_up.is_err(), "the caller hung up before the answer");
    assert_eq!(up.counter.get("slow:k-term"), 1);
    idem.signal("TERM");
    assert_eq!(
        idem.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{:#?}",
        idem.stderr.lock().unwrap()
    );
    drop(idem);

    let idem = start_idem(dir.path(), &["--config", &config]);
    // Past any lease the first execution could have held.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let retry = common::slow_post(&c, &idem, "k-term", 10).sent().await;
    assert_eq!(retry.status(), 201);
    assert_eq!(
        retry
            .headers()
            .get("idempotent-replayed")
            .map(|v| v.to_str().unwrap()),
        Some("true"),
        "the outcome was stored before the exit"
    );
    assert_eq!(up.counter.get("slow:k-term"), 1, "executed once");
}

/// The upstream sends its head and part of the body, then the connection dies: the
/// request executed, the first caller gets a broken body, and a retry is told the
/// truth (the original status, and that the body was cut), never "too large".
#[tokio::test]
async fn a_response_that_broke_off_replays_as_incomplete() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let idem = start_in_memory(dir.path(), up.cut_addr);
    let c = client();
    let first = post(&c, idem.url("/v1/charges"), Some("k-cut"), "{}")
        .sent()
        .await;
    assert_eq!(first.status(), 201);
    assert!(first.bytes().await.is_err(), "the body broke off");
    let retry = post(&c, idem.url("/v1/charges"), Some("k-cut"), "{}")
        .sent()
        .await;
    assert_eq!(retry.status(), 201, "the original status");
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.headers()["content-type"], "application/problem+json");
    let problem: serde_json::Value = retry.json().await.unwrap();
    assert_eq!(
        problem["type"], "urn:idem:problem:idempotency-response-incomplete",
        "{problem}"
    );
    assert_eq!(problem["original_status"], 201);
    assert_eq!(up.counter.get("cut:k-cut"), 1, "executed once");
}

/// Bodies hyper never polls (204, 304) are stored all the same: the response is
/// recorded when hyper drops its body unread. (HEAD is safe by definition: idem never
/// protects it, so it has nothing to store.)
#[tokio::test]
async fn responses_without_a_body_are_stored() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let idem = start_in_memory(dir.path(), up.addr);
    let c = client();
    for code in [204u16, 304] {
        let key = format!("k-{code}");
        for attempt in 0..2 {
            let res = post(&c, idem.url(&format!("/v1/fail/{code}")), Some(&key), "{}")
                .sent()
                .await;
            assert_eq!(res.status(), code);
            let replayed = res.headers().get("idempotent-replayed").is_some();
            assert_eq!(replayed, attempt == 1, "{code}, attempt {attempt}");
        }
        assert_eq!(up.counter.get(&format!("fail:{code}:{key}")), 1);
    }
}

/// Debian's libfaketime, which the test preloads into `idem` to step its wall clock.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// The wall clock steps an hour forward while an execution runs: its lease must not
/// look expired (a duplicate would take the key over and run). `idem` runs under
/// libfaketime, which moves the wall clock only; the monotonic clock runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_step_does_not_end_a_live_lease() {
    if !std::path::Path::new(LIBFAKETIME).exists() {
        return idem_conformance::skip(&format!(
            "a_wall_clock_step_does_not_end_a_live_lease ({LIBFAKETIME} missing: apt-get install faketime)"
        ));
    }
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = upstream_config(
        dir.path(),
        up.addr,
        "store = \"memory\"\n[defaults]\nlease = \"2s\"\n",
    );
    let offset = dir.path().join("faketime");
    std::fs::write(&offset, "+0\n").unwrap();
    let idem = common::start_idem_with_env(
        dir.path(),
        &["--config", &config],
        &[
            ("LD_PRELOAD", LIBFAKETIME),
            ("FAKETIME_TIMESTAMP_FILE", offset.to_str().unwrap()),
            ("FAKETIME_NO_CACHE", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    let c = client();
    let first = tokio::spawn(common::slow_post(&c, &idem, "k-clock", 3000).send());
    while up.counter.get("slow:k-clock") == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::write(&offset, "+3600\n").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dup = common::slow_post(&c, &idem, "k-clock", 10).sent().await;
    assert_eq!(dup.status(), 409, "the lease lives on after the step");
    assert_eq!(first.await.unwrap().unwrap().status(), 201);
    assert_eq!(up.counter.get("slow:k-clock"), 1, "executed once");
}
