//! The short version of the fault-and-load suite, part of the workspace tests: each
//! fault against each store for a few seconds. The long version is the `idem-chaos`
//! binary (see the crate README).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use idem_chaos::{FaultKind, Outcome, Scenario, StoreKind};

const LOAD: Duration = Duration::from_secs(6);

fn bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| idem_chaos::procs::idem_binary().expect("the idem binary"))
        .clone()
}

async fn short(store: StoreKind, fault: FaultKind) {
    let mut s = Scenario::new(store, fault, LOAD);
    s.clients = 8;
    s.fault_every = Duration::from_millis(1500);
    let name = format!("chaos {} / {}", store.name(), fault.name());
    let bin = tokio::task::spawn_blocking(bin).await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(120), idem_chaos::run(&s, &bin))
        .await
        .unwrap_or_else(|_| panic!("{name}: did not finish within 120 s"))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let report = match outcome {
        Outcome::Skipped(why) => return idem_conformance::skip(&format!("{name} ({why})")),
        Outcome::Ran(r) => r,
    };
    eprintln!("{}\n{}", idem_chaos::Report::table_header(), report.row());
    assert!(report.ok(), "{name}:\n{}", report.details());
    // A run that injected nothing or answered nothing proved nothing.
    assert!(report.answered > 0, "{name}: no operation answered");
    assert!(
        report.verified > 0 || !fault.records_outlive_the_run(),
        "{name}: nothing to verify"
    );
    assert!(
        report.faults > 0 || report.upstream_faults > 0,
        "{name}: no fault injected"
    );
    if matches!(fault, FaultKind::Sigterm | FaultKind::SigtermHangup) {
        assert!(report.faults > 0, "{name}: no SIGTERM sent");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_kill_9() {
    short(StoreKind::Sqlite, FaultKind::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_upstream_faults() {
    short(StoreKind::Sqlite, FaultKind::Upstream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_sigterm() {
    short(StoreKind::Sqlite, FaultKind::Sigterm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_three_instances_kill_9() {
    short(StoreKind::Redis, FaultKind::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_crash_and_pause() {
    short(StoreKind::Redis, FaultKind::StoreRestart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_three_instances_kill_9() {
    short(StoreKind::Postgres, FaultKind::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_crash() {
    short(StoreKind::Postgres, FaultKind::StoreRestart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_sigterm_while_callers_hang_up() {
    short(StoreKind::Sqlite, FaultKind::SigtermHangup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_executions_longer_than_the_ttl() {
    short(StoreKind::Redis, FaultKind::LongExecution).await;
}
