//! Cost growth of new keys: claims + completes per second through the store API (64
//! concurrent callers on a two-worker runtime, as the engine drives it) against a
//! file holding 1,000 records and against a copy filled to `FILL` records with the
//! fill statement of `bench/run.sh`, alternating, in one run, so that the ratio
//! cancels out machine drift (`GROWTH_ROUNDS`, default 3, rounds of `SECONDS` on each
//! file). Also prints, per new key, figures that do not move with the machine's load:
//! the process's CPU time and the bytes it wrote and read (WAL, checkpoint copies,
//! page reads; `/proc/self/io`).
//!
//! `cargo run --release -p idem-store-sqlite --example growth -- DIR FILL SECONDS`
//! (take `flock /tmp/idem-bench.lock` around it on a shared machine). `GROWTH_REUSE=1`
//! reuses the filled file of an earlier run in DIR (when the schema did not change).
//!
//! `… --example growth -- --open PATH` times opening an existing file (an upgrade of
//! its schema included) and counts its records.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idem_core::{Claim, ClaimSpec, Fingerprint, RecordKey, Store};
use idem_store_sqlite::SqliteStore;

const CONCURRENCY: usize = 64;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, path] = args.as_slice()
        && flag == "--open"
    {
        let t0 = Instant::now();
        drop(SqliteStore::open(path).expect("open"));
        let n: i64 = rusqlite::Connection::open(path)
            .and_then(|c| c.query_row("SELECT count(*) FROM idem_records", [], |r| r.get(0)))
            .expect("count");
        println!("opened {path} in {:.1?}: {n} records", t0.elapsed());
        return;
    }
    let [dir, fill, secs] = args.as_slice() else {
        eprintln!("usage: growth DIR FILL SECONDS");
        std::process::exit(2);
    };
    let (fill, secs): (u64, u64) = (fill.parse().expect("FILL"), secs.parse().expect("SECONDS"));
    let rounds: usize = std::env::var("GROWTH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = Path::new(dir);
    let (few_file, many_file, run_file) = (
        dir.join("growth-1k.db"),
        dir.join(format!("growth-{fill}.db")),
        dir.join("growth-run.db"),
    );
    remove(&few_file);
    drop(SqliteStore::open(&few_file).expect("open"));
    settle();
    fill_file(&few_file, 0, 1000);
    let t0 = Instant::now();
    // The fill starts from a copy of the 1k file, unless GROWTH_REUSE finds one.
    if std::env::var_os("GROWTH_REUSE").is_none() || !many_file.exists() {
        remove(&many_file);
        std::fs::copy(&few_file, &many_file).expect("copy");
        fill_file(&many_file, 1000, fill);
        drop(SqliteStore::open(&many_file).expect("open"));
        settle();
        println!("filled to {fill} in {:.0?}", t0.elapsed());
    }
    // Alternating rounds: each 1k round starts from a copy of the 1k file; the filled
    // file gains a few records per round (a negligible share of FILL).
    let (mut few, mut many) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        remove(&run_file);
        std::fs::copy(&few_file, &run_file).expect("copy");
        few.push(measure(&run_file, "1k", Duration::from_secs(secs)));
        many.push(measure(
            &many_file,
            &fill.to_string(),
            Duration::from_secs(secs),
        ));
    }
    let growth: Vec<f64> = few
        .iter()
        .zip(&many)
        .map(|(a, b)| (a / b - 1.0) * 100.0)
        .collect();
    let (few, many) = (few.iter().sum::<f64>(), many.iter().sum::<f64>());
    println!(
        "cost growth: {:+.1}% over {rounds} rounds ({:.0} -> {:.0} new keys/s); per round: {}",
        (few / many - 1.0) * 100.0,
        few / rounds as f64,
        many / rounds as f64,
        growth
            .iter()
            .map(|g| format!("{g:+.0}%"))
            .collect::<Vec<_>>()
            .join(" ")
    );
}

fn remove(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

/// Lets the writer and checkpoint threads of a dropped store close their connections.
fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

/// The fill of `bench/run.sh`: records `lo..hi` with 200-byte responses, a day to live.
fn fill_file(path: &Path, lo: u64, hi: u64) {
    let c = rusqlite::Connection::open(path).expect("open for the fill");
    c.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=OFF; PRAGMA cache_size=-1000000")
        .expect("fill pragmas");
    let now = idem_core::record::now_millis() as i64;
    let step = 200_000;
    let mut a = lo;
    while a < hi {
        let b = hi.min(a + step);
        c.execute(
            "WITH RECURSIVE n(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?2)
        INSERT OR IGNORE INTO idem_records (id, tenant, route, key, fingerprint, token, lease_expires_at,
            response, created_at, expires_at)
        SELECT randomblob(32), 't_fill', 'POST /v1/charges', 'fill-' || i, lower(hex(randomblob(32))),
            NULL, NULL, randomblob(200), ?3, ?4 FROM n",
            rusqlite::params![a as i64, b as i64, now, now + 86_400_000],
        )
        .expect("fill");
        a = b;
    }
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("checkpoint");
}

/// `/proc/self/io`: bytes passed to write and read calls.
fn io() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (field("wchar:"), field("rchar:"))
}

/// CPU time of the process (user + system, every thread), in clock ticks (`/proc/self/stat`).
fn cpu_ticks() -> u64 {
    let text = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name, which ends at the last ')'.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    field(11) + field(12)
}

/// New keys per second for `run`, right after opening the file (as the kit does).
fn measure(path: &Path, label: &str, run: Duration) -> f64 {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let store = Arc::new(SqliteStore::open(path).expect("open"));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (w0, r0, c0) = (io().0, io().1, cpu_ticks());
    let start = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..CONCURRENCY)
            .map(|t| {
                let (store, done, stop) = (store.clone(), done.clone(), stop.clone());
                // Keys never met before: the files outlive a run and a round.
                let label = format!(
                    "{label}-{}",
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_nanos()
                );
                tokio::spawn(async move {
                    let fp = Fingerprint {
                        version: 1,
                        digest: vec![7; 32],
                    };
                    let spec = ClaimSpec {
                        fingerprint: &fp,
                        lease: Duration::from_secs(30),
                        ttl: Duration::from_secs(3600),
                    };
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let key = RecordKey::new(
                            "t_growth",
                            "POST /v1/charges",
                            format!("{label}-{t}-{i}"),
                        );
                        i += 1;
                        let Claim::Acquired(lease) = store.claim(&key, spec).await.expect("claim")
                        else {
                            panic!("a fresh key was taken")
                        };
                        let kept = store
                            .complete(
                                &key,
                                lease.token,
                                &idem_conformance::bench::response(),
                                Duration::from_secs(3600),
                            )
                            .await
                            .expect("complete");
                        assert!(kept);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        tokio::time::sleep(run).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.expect("task");
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let (w1, r1, c1) = (io().0, io().1, cpu_ticks());
    let n = done.load(Ordering::Relaxed) as f64;
    let rate = n / secs;
    println!(
        "{label:>8} records: {rate:>7.0} new keys/s; per new key: {:.0} µs CPU, {:.1} KiB written, {:.1} KiB read",
        (c1 - c0) as f64 * 10_000.0 / n,
        (w1 - w0) as f64 / n / 1024.0,
        (r1 - r0) as f64 / n / 1024.0,
    );
    drop(store);
    drop(rt);
    settle();
    rate
}
