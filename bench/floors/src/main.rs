//! Each durable store's floor: the store's own statements (or scripts), driven as
//! fast as the backend takes them, with nothing of idem around them. `bench/run.sh`
//! runs it beside idem in the same run; a store at 0.8x its floor or more has little
//! left to gain on idem's side.
//!
//! ```text
//! idem-floors sqlite PATH full|normal SECONDS     new keys, then replays
//! idem-floors redis URL CONNS SECONDS             new keys, then replays
//! idem-floors pgbench new|replay|prefill          prints a pgbench -f script
//! ```
//!
//! Each measurement prints one line: `FLOOR scenario=new rate=<pairs/s> ...` (a claim
//! and its complete per new key) or `FLOOR scenario=replay rate=<reads/s>`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags, params};

/// Size of the stored response: about what idem stores for the kit's upstream (a
/// 201 with a small JSON body and a few headers).
const RESPONSE_BYTES: usize = 200;
/// Keys the replays read (as the kit's replay scenario).
const REPLAY_KEYS: usize = 1000;
const LEASE_MS: i64 = 30_000;
const TTL_MS: i64 = 86_400_000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["sqlite", path, sync, secs] => sqlite(Path::new(path), sync, seconds(secs)),
        ["redis", url, conns, secs] => {
            redis_floor(url, conns.parse().expect("CONNS"), seconds(secs))
        }
        ["pgbench", scenario] => print!("{}", pgbench_script(scenario)),
        _ => {
            eprintln!(
                "usage: idem-floors sqlite PATH full|normal SECONDS | redis URL CONNS SECONDS | pgbench new|replay"
            );
            std::process::exit(2);
        }
    }
}

fn seconds(s: &str) -> Duration {
    Duration::from_secs_f64(s.parse().expect("SECONDS"))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn random_bytes(n: usize) -> Vec<u8> {
    std::iter::repeat_with(|| fastrand::u8(..))
        .take(n)
        .collect()
}

fn fingerprint() -> String {
    hex::encode(random_bytes(32))
}

// ---------------------------------------------------------------- SQLite

/// Statements per transaction in the SQLite floor: the claims of new keys and the
/// completes of the previous transaction's keys.
const BATCH: usize = 64;

/// The writer's loop as the store runs it at best: one connection, transactions of
/// `BATCH` statements (the claims of new keys and the completes of the previous
/// batch's keys), the same pragmas and `synchronous`. Then replays: the store's read
/// on one read-only connection per core.
fn sqlite(path: &Path, sync: &str, run: Duration) {
    let conn = sqlite_writer(path, sync);
    let replay_ids = sqlite_new_keys(&conn, run);
    drop(conn);
    sqlite_replays(path, replay_ids, run);
}

/// The store's writer connection: the schema created by the store itself, exactly as
/// idem does, then the store's pragmas.
fn sqlite_writer(path: &Path, sync: &str) -> Connection {
    let durability = match sync {
        "full" => idem_store_sqlite::Durability::Full,
        "normal" => idem_store_sqlite::Durability::Normal,
        other => panic!("synchronous must be full or normal, not {other}"),
    };
    let options = idem_store_sqlite::SqliteOptions::default().with_durability(durability);
    drop(idem_store_sqlite::SqliteStore::open_with(path, options).expect("open the store"));

    let conn = Connection::open(path).expect("open");
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", sync).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    for (name, value) in idem_store_sqlite::statements::WRITER_PRAGMAS {
        conn.pragma_update(None, name, value).unwrap();
    }
    conn
}

/// New keys for `run`: prints the rate of claim + complete pairs; returns the keys the
/// replays read.
fn sqlite_new_keys(conn: &Connection, run: Duration) -> Vec<Vec<u8>> {
    let fp = fingerprint();
    let response = random_bytes(RESPONSE_BYTES);
    let mut pending: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut replay_ids: Vec<Vec<u8>> = Vec::new();
    let (mut pairs, mut commits) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < run {
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        let now = now_ms();
        for (id, token) in pending.drain(..) {
            sqlite_complete(conn, &id, &token, &response, now);
            pairs += 1;
            if replay_ids.len() < REPLAY_KEYS {
                replay_ids.push(id);
            }
        }
        pending = (0..BATCH / 2)
            .map(|i| sqlite_claim(conn, &format!("floor-{commits}-{i}"), &fp, now))
            .collect();
        conn.execute_batch("COMMIT").unwrap();
        commits += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "FLOOR scenario=new rate={:.1} ops_per_commit={BATCH} commits={commits}",
        pairs as f64 / secs
    );
    replay_ids
}

/// The store's claim of a new key; its id and fencing token.
fn sqlite_claim(conn: &Connection, key: &str, fp: &str, now: i64) -> (Vec<u8>, Vec<u8>) {
    let (id, token) = (random_bytes(32), random_bytes(16));
    let n = conn
        .prepare_cached(idem_store_sqlite::statements::CLAIM)
        .unwrap()
        .execute(params![
            id,
            "t_floor",
            "POST /v1/charges",
            key,
            fp,
            token,
            now + LEASE_MS,
            now,
            now + TTL_MS
        ])
        .unwrap();
    assert_eq!(n, 1, "claim");
    (id, token)
}

/// The store's complete of a claimed key.
fn sqlite_complete(conn: &Connection, id: &[u8], token: &[u8], response: &[u8], now: i64) {
    let n = conn
        .prepare_cached(idem_store_sqlite::statements::COMPLETE)
        .unwrap()
        .execute(params![id, token, response, now + TTL_MS, now])
        .unwrap();
    assert_eq!(n, 1, "complete");
}

/// Replays for `run`, one read-only connection per core; prints their rate.
fn sqlite_replays(path: &Path, ids: Vec<Vec<u8>>, run: Duration) {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let ids = Arc::new(ids);
    let reads = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (ids, reads) = (ids.clone(), reads.clone());
            s.spawn(move || {
                let n = sqlite_reader(path, &ids, || start.elapsed() < run);
                reads.fetch_add(n, Ordering::Relaxed);
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    println!(
        "FLOOR scenario=replay rate={:.1} threads={threads}",
        reads.load(Ordering::Relaxed) as f64 / secs
    );
}

/// One reader: the store's read of a random completed record, while `go`; returns
/// how many.
fn sqlite_reader(path: &Path, ids: &[Vec<u8>], go: impl Fn() -> bool) -> u64 {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .unwrap();
    let mut stmt = conn
        .prepare_cached(idem_store_sqlite::statements::GET)
        .unwrap();
    let mut n = 0u64;
    while go() {
        for _ in 0..256 {
            let id = &ids[fastrand::usize(..ids.len())];
            let response = stmt
                .query_row(params![id, now_ms()], |r| {
                    r.get::<_, String>(0)?;
                    r.get::<_, Option<Vec<u8>>>(1)?;
                    r.get::<_, Option<i64>>(2)?;
                    let response = r.get::<_, Option<Vec<u8>>>(3)?;
                    r.get::<_, i64>(4)?;
                    r.get::<_, i64>(5)?;
                    Ok(response)
                })
                .unwrap();
            assert!(response.is_some(), "a completed record");
        }
        n += 256;
    }
    n
}

// ---------------------------------------------------------------- Redis

/// The store's scripts on one multiplexed connection (the store's own kind of
/// connection), `conns` callers at once: a new key is the claim script then the
/// complete script; a replay is the claim script finding the completed record.
fn redis_floor(url: &str, conns: usize, run: Duration) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = redis::Client::open(url).expect("redis url");
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis");
        let fp = fingerprint();
        let response = random_bytes(RESPONSE_BYTES);
        let new_key = {
            let (conn, fp, response) = (conn.clone(), fp.clone(), response.clone());
            move || {
                let (mut conn, fp, response) = (conn.clone(), fp.clone(), response.clone());
                async move {
                    redis_new_key(&mut conn, &fp, &response).await;
                }
            }
        };
        let rate = drive(conns, run, new_key).await;
        println!("FLOOR scenario=new rate={rate:.1} conns={conns}");

        let mut keys = Vec::with_capacity(REPLAY_KEYS);
        for _ in 0..REPLAY_KEYS {
            keys.push(redis_new_key(&mut conn.clone(), &fp, &response).await);
        }
        let keys = Arc::new(keys);
        let replay = move || {
            let (mut conn, keys, fp) = (conn.clone(), keys.clone(), fp.clone());
            async move {
                let key = &keys[fastrand::usize(..keys.len())];
                let found: redis::Value = idem_store_redis::statements::claim()
                    .key(key)
                    .arg(&fp)
                    .arg(hex::encode(random_bytes(16)))
                    .arg(LEASE_MS)
                    .arg(TTL_MS)
                    .invoke_async(&mut conn)
                    .await
                    .expect("replay");
                assert!(
                    matches!(&found, redis::Value::Array(a) if a.first() == Some(&redis::Value::Int(0))),
                    "a replay finds the record"
                );
            }
        };
        let rate = drive(conns, run, replay).await;
        println!("FLOOR scenario=replay rate={rate:.1} conns={conns}");
    });
}

/// Runs `conns` callers for `run`, each repeating the operation `op` makes, and
/// returns the operations per second.
async fn drive<F, Fut>(conns: usize, run: Duration, op: F) -> f64
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let (stop, count, op) = (stop.clone(), count.clone(), op.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    op().await;
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(run).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("a caller panicked");
    }
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// A new key: the claim script, then the complete script; returns the record's key.
async fn redis_new_key(
    conn: &mut redis::aio::MultiplexedConnection,
    fp: &str,
    response: &[u8],
) -> String {
    let id = hex::encode(random_bytes(32));
    let token = hex::encode(random_bytes(16));
    let key = format!("floor:{{{id}}}");
    let claimed: redis::Value = idem_store_redis::statements::claim()
        .key(&key)
        .arg(fp)
        .arg(&token)
        .arg(LEASE_MS)
        .arg(TTL_MS)
        .invoke_async(conn)
        .await
        .expect("claim");
    assert!(
        matches!(&claimed, redis::Value::Array(a) if a.first() == Some(&redis::Value::Int(1))),
        "a new key is acquired"
    );
    let done: i64 = idem_store_redis::statements::complete()
        .key(&key)
        .arg(&token)
        .arg(response)
        .arg(TTL_MS)
        .arg(format!("floor:ch:{id}"))
        .invoke_async(conn)
        .await
        .expect("complete");
    assert_eq!(done, 1, "complete");
    key
}

// ---------------------------------------------------------------- PostgreSQL

/// A `pgbench -f` script with the store's statements, parameters replaced by pgbench
/// variables and expressions of the same types: `new` claims a random key and
/// completes it (two statements, each its own transaction, as the store runs them);
/// (`IDEM_FLOOR_NOTIFY` set: with the wake-up a `wait` route makes the store send);
/// `replay` claims one of the keys `1..=1000`, stored beforehand by `prefill` (the
/// claim finds the record and returns it, as for idem's replays).
fn pgbench_script(scenario: &str) -> String {
    use idem_store_postgres::statements::{CLAIM, COMPLETE, NOTIFY};
    let id = "sha256(:k::text::bytea)";
    let token = "substr(sha256(('t' || :k)::text::bytea), 1, 16)";
    let fill = |sql: &str, values: &[&str]| {
        // From the last parameter down, so that `$1` never eats the start of `$10`.
        let mut s = sql.to_owned();
        for (i, v) in values.iter().enumerate().rev() {
            s = s.replace(&format!("${}", i + 1), v);
        }
        // One line per statement: easier to read in the kit's logs.
        s.split_whitespace().collect::<Vec<_>>().join(" ") + ";\n"
    };
    let fp = format!("'{}'", "f".repeat(64));
    let response = format!("'\\x{}'::bytea", "ab".repeat(RESPONSE_BYTES));
    let (lease, ttl) = (LEASE_MS.to_string(), TTL_MS.to_string());
    let claim = fill(
        CLAIM,
        &[
            id,
            "'t_floor'",
            "'POST /v1/charges'",
            ":k::text",
            &fp,
            token,
            &lease,
            &ttl,
        ],
    );
    // As the sidecar runs them when no route waits for duplicates (the kit's routes):
    // no notification. With `notify`, the complete is followed by [`NOTIFY`].
    let complete = if std::env::var_os("IDEM_FLOOR_NOTIFY").is_some() {
        fill(COMPLETE, &[id, token, &response, &ttl, "false"])
            + &fill(NOTIFY, &["encode(sha256(:k::text::bytea), 'hex')"])
    } else {
        fill(COMPLETE, &[id, token, &response, &ttl, "false"])
    };
    match scenario {
        "new" => format!("\\set k random(1001, 1000000000000)\n{claim}{complete}"),
        // A replay is the claim statement finding the completed record.
        "replay" => format!("\\set k random(1, 1000)\n{claim}"),
        "prefill" => format!("\\set k random(1, 1000)\n{claim}{complete}"),
        other => panic!("scenario must be new, replay or prefill, not {other}"),
    }
}
