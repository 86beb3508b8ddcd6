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

/// One test per (store, fault), each running [`short`] on a two-thread runtime.
macro_rules! chaos_tests {
    ($($name:ident => ($store:ident, $fault:ident),)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            short(StoreKind::$store, FaultKind::$fault).await;
        }
    )*};
}

chaos_tests! {
    sqlite_kill_9 => (Sqlite, Kill),
    sqlite_upstream_faults => (Sqlite, Upstream),
    sqlite_sigterm => (Sqlite, Sigterm),
    redis_three_instances_kill_9 => (Redis, Kill),
    redis_store_crash_and_pause => (Redis, StoreRestart),
    postgres_three_instances_kill_9 => (Postgres, Kill),
    postgres_store_crash => (Postgres, StoreRestart),
    sqlite_sigterm_while_callers_hang_up => (Sqlite, SigtermHangup),
    redis_executions_longer_than_the_ttl => (Redis, LongExecution),
}
