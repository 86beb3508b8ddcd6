//! `idem-chaos`: the long version of the fault-and-load suite.
//!
//! `cargo run --release -p idem-chaos -- --duration 300s --store all` runs every fault
//! against every store for `--duration` each and prints a markdown table; the exit code
//! is 1 when the checker found a violation.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use idem_chaos::{FaultKind, Outcome, Report, Scenario, StoreKind};

#[derive(Parser)]
#[command(
    name = "idem-chaos",
    about = "Faults and load against real idem processes; a history checker proves exactly-once"
)]
struct Args {
    /// Load duration of each run (e.g. 30s, 5m).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Stores, comma-separated: sqlite, redis, postgres, redis-volatile, or all.
    #[arg(long, default_value = "all")]
    store: String,
    /// Faults, comma-separated: kill, store, upstream, sigterm, sigterm-hangup,
    /// long-execution, or all.
    #[arg(long, default_value = "all")]
    fault: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 12)]
    clients: usize,
    /// Time between two faults.
    #[arg(long, default_value = "2500ms", value_parser = humantime::parse_duration)]
    fault_every: Duration,
    /// The lease idem gives an execution.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    lease: Duration,
}

fn stores(s: &str) -> Result<Vec<StoreKind>, String> {
    if s == "all" {
        return Ok(vec![
            StoreKind::Sqlite,
            StoreKind::Redis,
            StoreKind::Postgres,
            StoreKind::RedisVolatile,
        ]);
    }
    s.split(',')
        .map(|n| match n.trim() {
            "sqlite" => Ok(StoreKind::Sqlite),
            "redis" => Ok(StoreKind::Redis),
            "postgres" => Ok(StoreKind::Postgres),
            "redis-volatile" => Ok(StoreKind::RedisVolatile),
            other => Err(format!("unknown store {other:?}")),
        })
        .collect()
}

fn faults(s: &str) -> Result<Vec<FaultKind>, String> {
    if s == "all" {
        return Ok(vec![
            FaultKind::Kill,
            FaultKind::StoreRestart,
            FaultKind::Upstream,
            FaultKind::Sigterm,
            FaultKind::SigtermHangup,
            FaultKind::LongExecution,
        ]);
    }
    s.split(',')
        .map(|n| match n.trim() {
            "kill" => Ok(FaultKind::Kill),
            "store" => Ok(FaultKind::StoreRestart),
            "upstream" => Ok(FaultKind::Upstream),
            "sigterm" => Ok(FaultKind::Sigterm),
            "sigterm-hangup" => Ok(FaultKind::SigtermHangup),
            "long-execution" => Ok(FaultKind::LongExecution),
            other => Err(format!("unknown fault {other:?}")),
        })
        .collect()
}

fn applies(store: StoreKind, fault: FaultKind) -> bool {
    match store {
        // SQLite is embedded: a crash of its store is a crash of idem.
        StoreKind::Sqlite => fault != FaultKind::StoreRestart,
        // Only the restart says something about a store without persistence.
        StoreKind::RedisVolatile => fault == FaultKind::StoreRestart,
        StoreKind::Redis | StoreKind::Postgres => true,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    let (stores, faults) = match (stores(&args.store), faults(&args.fault)) {
        (Ok(s), Ok(f)) => (s, f),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("idem-chaos: {e}");
            return ExitCode::from(2);
        }
    };
    let bin = match tokio::task::spawn_blocking(idem_chaos::procs::idem_binary).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            eprintln!("idem-chaos: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("idem-chaos: {e}");
            return ExitCode::from(2);
        }
    };
    let mut reports: Vec<Report> = Vec::new();
    let mut failed = false;
    for &store in &stores {
        for &fault in faults.iter().filter(|&&f| applies(store, f)) {
            let mut s = Scenario::new(store, fault, args.duration);
            s.clients = args.clients;
            s.fault_every = args.fault_every;
            s.lease = args.lease;
            failed |= !run_one(&s, &bin, &mut reports).await;
        }
    }
    println!("{}", Report::table_header());
    for r in &reports {
        println!("{}", r.row());
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs one scenario, prints its row (and its violations) on stderr and keeps its
/// report; false when it failed.
async fn run_one(s: &Scenario, bin: &std::path::Path, reports: &mut Vec<Report>) -> bool {
    let (store, fault) = (s.store.name(), s.fault.name());
    eprintln!("== {store} / {fault} for {:?}", s.duration);
    match idem_chaos::run(s, bin).await {
        Ok(Outcome::Skipped(why)) => {
            eprintln!("SKIPPED {store} / {fault}: {why}");
            true
        }
        Ok(Outcome::Ran(r)) => {
            eprintln!("{}", Report::table_header());
            eprintln!("{}", r.row());
            let ok = r.ok();
            if !ok {
                eprintln!("VIOLATIONS:\n{}", r.details());
            } else if r.loss_expected && !r.findings.clean() {
                eprintln!("expected (no persistence):\n{}", r.details());
            }
            reports.push(*r);
            ok
        }
        Err(e) => {
            eprintln!("ERROR {store} / {fault}: {e}");
            false
        }
    }
}
