//! The SQLite [`Store`]: idem's embedded, durable default.
//!
//! One writer thread owns the connection and applies operations in batches: every
//! operation that arrives while a transaction commits joins the next one (group
//! commit), so concurrent claims share one `fsync`. Being the only writer makes every
//! operation atomic without read-then-write races. The database is in WAL mode and,
//! by default, `synchronous = FULL`: a completed record survives a crash of the
//! process *and* of the machine. [`Durability::Normal`] trades the machine-crash
//! guarantee for speed (a process crash still loses nothing).
//!
//! Expired records are purged in batches by the writer thread when it is idle.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use idem_core::Store;
//! let dir = tempfile::tempdir().unwrap();
//! let store = idem_store_sqlite::SqliteStore::open(dir.path().join("idem.db")).unwrap();
//! store.ping().await.unwrap();
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use idem_core::record::{UnixMillis, after, now_millis};
use idem_core::store::{Notifier, StoreErrorKind, Watch};
use idem_core::{
    Admission, Claim, ClaimSpec, FencingToken, Fingerprint, InFlightListing, InFlightRecord, Lease,
    Record, RecordKey, RecordState, Store, StoreError, StoredResponse, TenantCounting,
    TenantLimits, Wakeups,
};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

mod in_flight;
mod readers;

/// The statements of a new key (claim, complete) and of a replay (the read), as this
/// store runs them: the benchmark kit's floor runs the very same text. Not a stable
/// interface.
#[doc(hidden)]
pub mod statements {
    /// The pragmas of the writer connection (after `journal_mode = WAL` and
    /// `synchronous`).
    pub const WRITER_PRAGMAS: [(&str, i64); 2] = [
        ("cache_size", super::WRITER_CACHE_KIB),
        ("wal_autocheckpoint", super::BACKSTOP_CHECKPOINT_PAGES),
    ];

    /// One statement: insert, or replace an expired record; a live one is left alone.
    /// `?1` id, `?2` tenant, `?3` route, `?4` key, `?5` fingerprint, `?6` token, `?7`
    /// lease end, `?8` now, `?9` expiry.
    pub const CLAIM: &str = "INSERT INTO idem_records (id, tenant, route, key, fingerprint, token, lease_expires_at, response, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL, ?8, ?9)
         ON CONFLICT (id) DO UPDATE SET
            fingerprint = excluded.fingerprint, token = excluded.token,
            lease_expires_at = excluded.lease_expires_at, response = NULL,
            created_at = excluded.created_at, expires_at = excluded.expires_at
         WHERE idem_records.expires_at <= ?8";

    /// `?1` id, `?2` token, `?3` response, `?4` expiry, `?5` now.
    pub const COMPLETE: &str = "UPDATE idem_records SET response = ?3, token = NULL, lease_expires_at = NULL, expires_at = ?4
         WHERE id = ?1 AND token = ?2 AND expires_at > ?5";

    /// `?1` id, `?2` now.
    pub const GET: &str =
        "SELECT fingerprint, token, lease_expires_at, response, created_at, expires_at
         FROM idem_records WHERE id = ?1 AND expires_at > ?2";
}

/// How hard each commit pushes data to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// `synchronous = FULL`: survives power loss (the default).
    #[default]
    Full,
    /// `synchronous = NORMAL`: survives a process crash; the last commits may be lost
    /// if the machine loses power.
    Normal,
}

/// Options of a SQLite store.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SqliteOptions {
    /// Durability of commits.
    pub durability: Durability,
    /// How often the writer purges expired records (when idle). Default 60 s.
    pub purge_interval: Duration,
    /// Largest number of operations in one transaction. Default 512.
    pub max_batch: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            durability: Durability::Full,
            purge_interval: Duration::from_secs(60),
            max_batch: 512,
        }
    }
}

impl SqliteOptions {
    /// Sets the durability.
    #[must_use]
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Sets the purge interval.
    #[must_use]
    pub fn with_purge_interval(mut self, every: Duration) -> Self {
        self.purge_interval = every;
        self
    }
}

/// The SQLite store. Cloning shares the same writer.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    jobs: mpsc::Sender<Job>,
    notifier: Notifier,
    path: PathBuf,
    reader: in_flight::Reader,
    readers: readers::Readers,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Op {
    Claim {
        key: RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
        ttl: Duration,
        reply: Reply<Claim>,
    },
    Reclaim {
        key: RecordKey,
        stale: FencingToken,
        fingerprint: Fingerprint,
        lease: Duration,
        ttl: Duration,
        reply: Reply<Option<Lease>>,
    },
    Complete {
        key: RecordKey,
        token: FencingToken,
        response: Vec<u8>,
        ttl: Duration,
        reply: Reply<bool>,
    },
    Release {
        key: RecordKey,
        token: FencingToken,
        reply: Reply<bool>,
    },
    Renew {
        key: RecordKey,
        token: FencingToken,
        lease: Duration,
        reply: Reply<bool>,
    },
    Get {
        key: RecordKey,
        reply: Reply<Option<Record>>,
    },
    Delete {
        key: RecordKey,
        reply: Reply<bool>,
    },
    Purge {
        reply: Reply<u64>,
    },
    Admit {
        key: RecordKey,
        limits: TenantLimits,
        lease: Duration,
        ttl: Duration,
        reply: Reply<Admission>,
    },
    Settle {
        key: RecordKey,
        kept: Option<Duration>,
        reply: Reply<()>,
    },
}

struct Job {
    op: Op,
}

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::new(kind_of(&e), "sqlite", e)
}

/// A busy or locked database may answer later; anything else is a backend failure.
fn kind_of(e: &rusqlite::Error) -> StoreErrorKind {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            StoreErrorKind::Unavailable
        }
        _ => StoreErrorKind::Backend,
    }
}

fn gone() -> StoreError {
    StoreError::msg(
        StoreErrorKind::Unavailable,
        "the sqlite writer thread has stopped",
    )
}

/// The schema version this code writes (`PRAGMA user_version`). Version 0 is the
/// first layout, where `idem_records` was a `WITHOUT ROWID` table keyed by `id`;
/// [`migrate`] upgrades it.
const SCHEMA_VERSION: i64 = 1;

/// `idem_records` is a rowid table: a new record is appended at the end of the table
/// (rowids grow), and only the slim unique index on `id` (a random digest) takes an
/// entry at a random place. A commit of new keys then dirties one table page for many
/// records and one small index leaf per record, where a table keyed by `id` dirtied a
/// random leaf holding whole records (stored responses) per record. The other indexes
/// hold a rowid (8 bytes at most) rather than the 32-byte `id`.
const RECORDS_TABLE: &str = "
CREATE TABLE IF NOT EXISTS idem_records (
    id               BLOB NOT NULL UNIQUE,
    tenant           TEXT NOT NULL,
    route            TEXT NOT NULL,
    key              TEXT NOT NULL,
    fingerprint      TEXT NOT NULL,
    token            BLOB,
    lease_expires_at INTEGER,
    response         BLOB,
    created_at       INTEGER NOT NULL,
    expires_at       INTEGER NOT NULL
);
";

const SCHEMA: &str = "
CREATE INDEX IF NOT EXISTS idem_records_expires_at ON idem_records (expires_at);
CREATE INDEX IF NOT EXISTS idem_records_in_flight ON idem_records (created_at) WHERE token IS NOT NULL;
CREATE TABLE IF NOT EXISTS idem_tenant_slots (
    tenant     TEXT NOT NULL,
    kind       INTEGER NOT NULL,
    id         BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, kind, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idem_tenant_slots_expiry ON idem_tenant_slots (tenant, kind, expires_at);
CREATE INDEX IF NOT EXISTS idem_tenant_slots_expires_at ON idem_tenant_slots (expires_at);
CREATE TABLE IF NOT EXISTS idem_tenant_counts (
    tenant TEXT NOT NULL,
    kind   INTEGER NOT NULL,
    n      INTEGER NOT NULL,
    PRIMARY KEY (tenant, kind)
) WITHOUT ROWID;
";

/// Creates the schema, or upgrades a database an earlier version made, in one
/// transaction (a crash midway leaves the old layout intact; another process opening
/// the file meanwhile waits, then finds the upgrade done). Upgrading from version 0
/// copies every record into the new table: it takes time and disk space in
/// proportion to the records, once.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let version = || conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0));
    if version()? == SCHEMA_VERSION {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let upgraded = (|| {
        let found = version()?;
        if found > SCHEMA_VERSION {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_MISMATCH),
                Some(format!(
                    "idem_records has schema version {found}, newer than this idem ({SCHEMA_VERSION})"
                )),
            ));
        }
        let keyed_by_id: bool = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'idem_records'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n == 1)?
            && found == 0;
        if keyed_by_id {
            conn.execute_batch(
                "DROP INDEX IF EXISTS idem_records_expires_at;
                 DROP INDEX IF EXISTS idem_records_in_flight;
                 ALTER TABLE idem_records RENAME TO idem_records_v0;",
            )?;
            conn.execute_batch(RECORDS_TABLE)?;
            conn.execute_batch(
                "INSERT INTO idem_records (id, tenant, route, key, fingerprint, token,
                     lease_expires_at, response, created_at, expires_at)
                 SELECT id, tenant, route, key, fingerprint, token,
                     lease_expires_at, response, created_at, expires_at
                 FROM idem_records_v0;
                 DROP TABLE idem_records_v0;",
            )?;
        } else {
            conn.execute_batch(RECORDS_TABLE)?;
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(keyed_by_id)
    })();
    match upgraded {
        Ok(copied) => {
            conn.execute_batch("COMMIT")?;
            // The copy went through the WAL: put it into the database file now and
            // give the WAL's disk space back, rather than keep a WAL the size of
            // every record beside the database until idem stops.
            if copied
                && let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            {
                tracing::warn!(error = %e, "sqlite checkpoint after the schema upgrade failed");
            }
            Ok(())
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, SqliteOptions::default())
    }

    /// Opens the database with options.
    pub fn open_with(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let conn = Connection::open(&path).map_err(backend)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(backend)?;
        conn.pragma_update(
            None,
            "synchronous",
            match options.durability {
                Durability::Full => "FULL",
                Durability::Normal => "NORMAL",
            },
        )
        .map_err(backend)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(backend)?;
        conn.pragma_update(None, "cache_size", WRITER_CACHE_KIB)
            .map_err(backend)?;
        // Checkpoints run on a thread of their own (below); the writer checkpoints only
        // if that one falls far behind, so the WAL stays bounded.
        conn.pragma_update(None, "wal_autocheckpoint", BACKSTOP_CHECKPOINT_PAGES)
            .map_err(backend)?;
        migrate(&conn).map_err(backend)?;
        let checkpointer = Connection::open(&path).map_err(backend)?;
        checkpointer
            .busy_timeout(Duration::from_secs(5))
            .map_err(backend)?;
        let (tx, rx) = mpsc::channel::<Job>();
        let inner = Arc::new(Inner {
            jobs: tx,
            notifier: Notifier::default(),
            path: path.clone(),
            reader: Default::default(),
            readers: readers::Readers::new(),
        });
        let spawn_err =
            |e| StoreError::new(StoreErrorKind::Backend, "cannot start the sqlite writer", e);
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("idem-sqlite-writer".into())
            .spawn(move || writer(conn, rx, options, weak))
            .map_err(spawn_err)?;
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("idem-sqlite-checkpoint".into())
            .spawn(move || checkpoints(checkpointer, weak))
            .map_err(spawn_err)?;
        Ok(SqliteStore { inner })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// A read on one of the read connections, if one is free and the read succeeds.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Option<T> {
        self.inner.readers.try_read(&self.inner.path, f)
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .jobs
            .send(Job { op: make(tx) })
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// Page cache of the writer, in KiB (a negative `cache_size`): SQLite's default is 2
/// MiB. Not more, though a larger cache would hold more of the B-trees: every B-tree
/// split (random ids split a leaf of the id index every few dozen inserts) caches a
/// page under a number past the end of the file, and the commit after it then walks
/// the whole cache's hash table. With 64 MiB that walk was 5-6% of idem's CPU on new
/// keys; with 8 MiB new keys went faster with 1k records and with 5M alike (measured:
/// docs/benchmarks.md, "SQLite"). Pages past the cache come from the OS's page cache.
const WRITER_CACHE_KIB: i64 = -8 * 1024;

/// WAL pages after which the writer checkpoints by itself: only if the checkpoint
/// thread falls this far behind (about 64 MiB of WAL).
const BACKSTOP_CHECKPOINT_PAGES: i64 = 16 * 1024;

/// How often the checkpoint thread copies the WAL back into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

/// Copies committed pages from the WAL into the database file with
/// `wal_checkpoint(PASSIVE)`, off the writer's path: the writer keeps appending to
/// the WAL meanwhile and restarts it from the top once everything was copied.
/// Exits when every store handle is dropped.
fn checkpoints(conn: Connection, inner: std::sync::Weak<Inner>) {
    loop {
        std::thread::sleep(CHECKPOINT_EVERY);
        if inner.strong_count() == 0 {
            return;
        }
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "sqlite checkpoint failed");
        }
    }
}

/// The writer loop: wait for a job, gather whatever else is queued, run them in one
/// transaction, commit, then answer. Exits when every store handle is dropped.
fn writer(
    mut conn: Connection,
    rx: mpsc::Receiver<Job>,
    options: SqliteOptions,
    inner: std::sync::Weak<Inner>,
) {
    let mut last_purge = Instant::now();
    let mut stats = BatchStats::default();
    loop {
        let first = match rx.recv_timeout(options.purge_interval) {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                purge_in_batches(&conn);
                last_purge = Instant::now();
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = vec![first];
        while batch.len() < options.max_batch {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        stats.add(batch.len());
        run_batch(&mut conn, batch, inner.upgrade().as_deref());
        if last_purge.elapsed() >= options.purge_interval {
            purge_in_batches(&conn);
            last_purge = Instant::now();
        }
    }
}

/// Operations per commit, logged (at debug) every few seconds: how much group
/// commit gathers.
struct BatchStats {
    since: Instant,
    commits: u64,
    operations: u64,
}

impl Default for BatchStats {
    fn default() -> Self {
        BatchStats {
            since: Instant::now(),
            commits: 0,
            operations: 0,
        }
    }
}

impl BatchStats {
    fn add(&mut self, operations: usize) {
        self.commits += 1;
        self.operations += operations as u64;
        if self.since.elapsed() >= Duration::from_secs(10) {
            tracing::debug!(
                commits = self.commits,
                operations = self.operations,
                per_commit = self.operations as f64 / self.commits as f64,
                "sqlite group commit"
            );
            *self = BatchStats::default();
        }
    }
}

fn purge_in_batches(conn: &Connection) {
    let mut total = 0;
    loop {
        match purge_once(conn, now_millis()) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => {
                tracing::warn!(error = %e, "sqlite purge failed");
                break;
            }
        }
    }
    if total > 0 {
        tracing::debug!(purged = total, "purged expired records");
    }
    if let Err(e) = atomically(conn, || prune_slots(conn, now_millis())) {
        tracing::warn!(error = %e, "sqlite purge of tenant counts failed");
    }
}

const PURGE_BATCH: u64 = 1000;

fn purge_once(conn: &Connection, now: UnixMillis) -> rusqlite::Result<u64> {
    conn.prepare_cached(
        "DELETE FROM idem_records WHERE rowid IN (SELECT rowid FROM idem_records WHERE expires_at <= ?1 LIMIT ?2)",
    )?
    .execute(params![now as i64, PURGE_BATCH as i64])
    .map(|n| n as u64)
}

/// The failure of a batch's transaction (its `BEGIN` or its `COMMIT`), answered to
/// every operation of the batch: each caller's error keeps the one rusqlite error as
/// its source.
struct BatchError {
    kind: StoreErrorKind,
    cause: Arc<rusqlite::Error>,
}

impl BatchError {
    fn new(e: rusqlite::Error) -> Self {
        BatchError {
            kind: kind_of(&e),
            cause: Arc::new(e),
        }
    }

    /// One caller's copy: the same kind and message as [`backend`] gives, the shared
    /// cause as its source.
    fn to_store_error(&self) -> StoreError {
        StoreError::new(self.kind, "sqlite", Arc::clone(&self.cause))
    }
}

/// An operation's reply and its result, held until the batch commits.
struct Pending<T> {
    reply: Reply<T>,
    result: rusqlite::Result<T>,
}

/// A [`Pending`] of any result type, so that one batch holds them all.
trait Answer {
    /// Sends the result: the batch committed.
    fn send(self: Box<Self>);
    /// Sends the batch's failure instead: the batch rolled back.
    fn abort(self: Box<Self>, err: &BatchError);
}

impl<T> Answer for Pending<T> {
    fn send(self: Box<Self>) {
        let _ = self.reply.send(self.result.map_err(backend));
    }

    fn abort(self: Box<Self>, err: &BatchError) {
        let _ = self.reply.send(Err(err.to_store_error()));
    }
}

/// Holds `result` for `reply` until the commit.
fn pending<T: 'static>(reply: Reply<T>, result: rusqlite::Result<T>) -> Box<dyn Answer> {
    Box::new(Pending { reply, result })
}

/// Runs a batch in one transaction (group commit), then answers every operation:
/// with its result once the commit succeeded (after waking the watchers of the keys
/// it changed), with the transaction's failure otherwise.
fn run_batch(conn: &mut Connection, batch: Vec<Job>, inner: Option<&Inner>) {
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let err = BatchError::new(e);
        for job in batch {
            job.op.fail(&err);
        }
        return;
    }
    let mut changed = Changed::new();
    let pending: Vec<Box<dyn Answer>> = batch
        .into_iter()
        .map(|job| job.op.run(conn, now_millis(), &mut changed))
        .collect();
    if let Err(e) = conn.execute_batch("COMMIT") {
        let _ = conn.execute_batch("ROLLBACK");
        let err = BatchError::new(e);
        for p in pending {
            p.abort(&err);
        }
        return;
    }
    if let Some(inner) = inner {
        for key in &changed {
            inner.notifier.notify(key);
        }
    }
    for p in pending {
        p.send();
    }
}

impl Op {
    /// Runs the operation inside the batch's open transaction; a key it changed goes
    /// to `changed`, for the wake-ups after the commit.
    fn run(self, conn: &Connection, now: UnixMillis, changed: &mut Changed) -> Box<dyn Answer> {
        match self {
            Op::Claim {
                key,
                fingerprint,
                lease,
                ttl,
                reply,
            } => pending(reply, claim(conn, &key, &fingerprint, lease, ttl, now)),
            Op::Reclaim {
                key,
                stale,
                fingerprint,
                lease,
                ttl,
                reply,
            } => {
                let r = reclaim(conn, &key, stale, &fingerprint, lease, ttl, now);
                changing(changed, key, reply, r)
            }
            Op::Complete {
                key,
                token,
                response,
                ttl,
                reply,
            } => {
                let r = complete(conn, &key, token, response, ttl, now);
                changing(changed, key, reply, r)
            }
            Op::Release { key, token, reply } => {
                let r = release(conn, &key, token, now);
                changing(changed, key, reply, r)
            }
            Op::Renew {
                key,
                token,
                lease,
                reply,
            } => pending(reply, renew(conn, &key, token, lease, now)),
            Op::Get { key, reply } => pending(reply, get(conn, &key, now)),
            Op::Delete { key, reply } => {
                let r = delete(conn, &key);
                changing(changed, key, reply, r)
            }
            Op::Purge { reply } => pending(reply, purge_all(conn, now)),
            Op::Admit {
                key,
                limits,
                lease,
                ttl,
                reply,
            } => atomic(conn, reply, || admit(conn, &key, limits, lease, ttl, now)),
            Op::Settle { key, kept, reply } => {
                atomic(conn, reply, || settle(conn, &key, kept, now))
            }
        }
    }

    /// Answers the batch's failure without running the operation.
    fn fail(self, err: &BatchError) {
        let err = err.to_store_error();
        match self {
            Op::Claim { reply, .. } => drop(reply.send(Err(err))),
            Op::Reclaim { reply, .. } => drop(reply.send(Err(err))),
            Op::Complete { reply, .. }
            | Op::Release { reply, .. }
            | Op::Renew { reply, .. }
            | Op::Delete { reply, .. } => drop(reply.send(Err(err))),
            Op::Get { reply, .. } => drop(reply.send(Err(err))),
            Op::Purge { reply } => drop(reply.send(Err(err))),
            Op::Admit { reply, .. } => drop(reply.send(Err(err))),
            Op::Settle { reply, .. } => drop(reply.send(Err(err))),
        }
    }
}

/// Keys whose records a batch changed: their watchers are woken after the commit.
type Changed = Vec<RecordKey>;

/// An operation's result that says whether it changed the record.
trait Changes {
    /// Whether the record changed (watchers of the key are woken after the commit).
    fn changed(&self) -> bool;
}

impl Changes for bool {
    fn changed(&self) -> bool {
        *self
    }
}

impl Changes for Option<Lease> {
    fn changed(&self) -> bool {
        self.is_some()
    }
}

/// Holds `result` for `reply` until the commit, noting `key` for a wake-up after it
/// if the operation changed the record.
fn changing<T: Changes + 'static>(
    changed: &mut Changed,
    key: RecordKey,
    reply: Reply<T>,
    result: rusqlite::Result<T>,
) -> Box<dyn Answer> {
    if matches!(&result, Ok(r) if r.changed()) {
        changed.push(key);
    }
    pending(reply, result)
}

/// Runs `f` under a savepoint (all of it or nothing) and holds its result for `reply`
/// until the commit.
fn atomic<T: 'static>(
    conn: &Connection,
    reply: Reply<T>,
    f: impl FnOnce() -> rusqlite::Result<T>,
) -> Box<dyn Answer> {
    pending(reply, atomically(conn, f))
}

/// Stores the response of the lease `token` holds; false if the lease is gone.
fn complete(
    conn: &Connection,
    key: &RecordKey,
    token: FencingToken,
    response: Vec<u8>,
    ttl: Duration,
    now: UnixMillis,
) -> rusqlite::Result<bool> {
    conn.prepare_cached(statements::COMPLETE)?
        .execute(params![
            id(key),
            token.to_bytes(),
            response,
            after(now, ttl) as i64,
            now as i64
        ])
        .map(|n| n == 1)
}

/// Deletes the record the lease `token` holds; false if the lease is gone.
fn release(
    conn: &Connection,
    key: &RecordKey,
    token: FencingToken,
    now: UnixMillis,
) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "DELETE FROM idem_records WHERE id = ?1 AND token = ?2 AND expires_at > ?3",
    )?
    .execute(params![id(key), token.to_bytes(), now as i64])
    .map(|n| n == 1)
}

/// Extends the lease `token` holds (and the record's life with it); false if the
/// lease is gone.
fn renew(
    conn: &Connection,
    key: &RecordKey,
    token: FencingToken,
    lease: Duration,
    now: UnixMillis,
) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "UPDATE idem_records SET lease_expires_at = ?3, expires_at = MAX(expires_at, ?3)
                         WHERE id = ?1 AND token = ?2 AND expires_at > ?4",
    )?
    .execute(params![
        id(key),
        token.to_bytes(),
        after(now, lease) as i64,
        now as i64
    ])
    .map(|n| n == 1)
}

/// Deletes the record whatever its state; false if there was none.
fn delete(conn: &Connection, key: &RecordKey) -> rusqlite::Result<bool> {
    conn.prepare_cached("DELETE FROM idem_records WHERE id = ?1")?
        .execute(params![id(key)])
        .map(|n| n == 1)
}

/// Deletes every expired record, in batches, then the expired tenant slots; returns
/// how many records went.
fn purge_all(conn: &Connection, now: UnixMillis) -> rusqlite::Result<u64> {
    let mut total = 0;
    loop {
        match purge_once(conn, now)? {
            0 => return prune_slots(conn, now).map(|_| total),
            n => total += n,
        }
    }
}

fn id(key: &RecordKey) -> Vec<u8> {
    key.storage_digest().to_vec()
}

fn claim(
    conn: &Connection,
    key: &RecordKey,
    fp: &Fingerprint,
    lease: Duration,
    ttl: Duration,
    now: UnixMillis,
) -> rusqlite::Result<Claim> {
    let token = FencingToken::random();
    let lease_end = after(now, lease);
    // One statement: insert, or replace an expired record; a live one is left alone.
    let inserted = conn.prepare_cached(statements::CLAIM)?.execute(params![
        id(key),
        key.tenant,
        key.route,
        key.key,
        fp.encode(),
        token.to_bytes(),
        lease_end as i64,
        now as i64,
        after(now, ttl.max(lease)) as i64
    ])?;
    if inserted == 1 {
        return Ok(Claim::Acquired(Lease {
            token,
            expires_at: lease_end,
        }));
    }
    match get(conn, key, now)? {
        Some(record) => Ok(Claim::Existing(record)),
        None => Err(rusqlite::Error::QueryReturnedNoRows),
    }
}

fn reclaim(
    conn: &Connection,
    key: &RecordKey,
    stale: FencingToken,
    fp: &Fingerprint,
    lease: Duration,
    ttl: Duration,
    now: UnixMillis,
) -> rusqlite::Result<Option<Lease>> {
    let token = FencingToken::random();
    let lease_end = after(now, lease);
    let n = conn
        .prepare_cached(
            "UPDATE idem_records SET token = ?3, fingerprint = ?4, lease_expires_at = ?5, expires_at = ?6
             WHERE id = ?1 AND token = ?2 AND lease_expires_at <= ?7 AND expires_at > ?7",
        )?
        .execute(params![id(key), stale.to_bytes(), token.to_bytes(), fp.encode(), lease_end as i64, after(now, ttl.max(lease)) as i64, now as i64])?;
    Ok((n == 1).then_some(Lease {
        token,
        expires_at: lease_end,
    }))
}

/// Runs `f` under a savepoint: all of it or nothing, inside the batch's transaction
/// (or as its own transaction outside one).
fn atomically<T>(
    conn: &Connection,
    f: impl FnOnce() -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.execute_batch("SAVEPOINT idem_op")?;
    match f() {
        Ok(v) => conn.execute_batch("RELEASE idem_op").map(|()| v),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO idem_op; RELEASE idem_op");
            Err(e)
        }
    }
}

/// Slot kinds of `idem_tenant_slots`: records in flight, live records.
const IN_FLIGHT: i64 = 0;
const RECORDS: i64 = 1;

fn admit(
    conn: &Connection,
    key: &RecordKey,
    limits: TenantLimits,
    lease: Duration,
    ttl: Duration,
    now: UnixMillis,
) -> rusqlite::Result<Admission> {
    let id = id(key);
    let kinds = [
        (
            IN_FLIGHT,
            limits.max_in_flight,
            lease,
            Admission::InFlightFull,
        ),
        (RECORDS, limits.max_records, ttl, Admission::RecordsFull),
    ];
    for (kind, limit, _, full) in kinds {
        if let Some(limit) = limit
            && !has_room(conn, &key.tenant, kind, &id, limit, now)?
        {
            return Ok(full);
        }
    }
    for (kind, limit, life, _) in kinds {
        if limit.is_some() && !refresh(conn, &key.tenant, kind, &id, after(now, life))? {
            conn.prepare_cached(
                "INSERT INTO idem_tenant_slots (tenant, kind, id, expires_at) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![key.tenant, kind, id, after(now, life) as i64])?;
            add_to_count(conn, &key.tenant, kind, 1)?;
        }
    }
    Ok(Admission::Admitted)
}

/// Whether `id` holds a live slot, or one more fits under `limit` (expired slots of
/// the tenant are pruned when the count is at the limit).
fn has_room(
    conn: &Connection,
    tenant: &str,
    kind: i64,
    id: &[u8],
    limit: u64,
    now: UnixMillis,
) -> rusqlite::Result<bool> {
    let live = conn
        .prepare_cached(
            "SELECT 1 FROM idem_tenant_slots WHERE tenant = ?1 AND kind = ?2 AND id = ?3 AND expires_at > ?4",
        )?
        .exists(params![tenant, kind, id, now as i64])?;
    if live {
        return Ok(true);
    }
    let count = || -> rusqlite::Result<u64> {
        Ok(conn
            .prepare_cached("SELECT n FROM idem_tenant_counts WHERE tenant = ?1 AND kind = ?2")?
            .query_row(params![tenant, kind], |r| r.get::<_, i64>(0))
            .optional()?
            .unwrap_or(0) as u64)
    };
    if count()? < limit {
        return Ok(true);
    }
    prune_tenant(conn, tenant, kind, now)?;
    Ok(count()? < limit)
}

/// Sets the expiry of an existing slot; false if there is none.
fn refresh(
    conn: &Connection,
    tenant: &str,
    kind: i64,
    id: &[u8],
    until: UnixMillis,
) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "UPDATE idem_tenant_slots SET expires_at = ?4 WHERE tenant = ?1 AND kind = ?2 AND id = ?3",
    )?
    .execute(params![tenant, kind, id, until as i64])
    .map(|n| n == 1)
}

fn add_to_count(conn: &Connection, tenant: &str, kind: i64, delta: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO idem_tenant_counts (tenant, kind, n) VALUES (?1, ?2, ?3)
         ON CONFLICT (tenant, kind) DO UPDATE SET n = n + excluded.n",
    )?
    .execute(params![tenant, kind, delta])
    .map(drop)
}

fn remove_slot(conn: &Connection, tenant: &str, kind: i64, id: &[u8]) -> rusqlite::Result<()> {
    let n = conn
        .prepare_cached(
            "DELETE FROM idem_tenant_slots WHERE tenant = ?1 AND kind = ?2 AND id = ?3",
        )?
        .execute(params![tenant, kind, id])?;
    if n > 0 {
        add_to_count(conn, tenant, kind, -(n as i64))?;
    }
    Ok(())
}

fn settle(
    conn: &Connection,
    key: &RecordKey,
    kept: Option<Duration>,
    now: UnixMillis,
) -> rusqlite::Result<()> {
    let id = id(key);
    remove_slot(conn, &key.tenant, IN_FLIGHT, &id)?;
    match kept {
        Some(ttl) => refresh(conn, &key.tenant, RECORDS, &id, after(now, ttl)).map(drop),
        None => remove_slot(conn, &key.tenant, RECORDS, &id),
    }
}

fn prune_tenant(
    conn: &Connection,
    tenant: &str,
    kind: i64,
    now: UnixMillis,
) -> rusqlite::Result<()> {
    let n = conn
        .prepare_cached(
            "DELETE FROM idem_tenant_slots WHERE tenant = ?1 AND kind = ?2 AND expires_at <= ?3",
        )?
        .execute(params![tenant, kind, now as i64])?;
    if n > 0 {
        add_to_count(conn, tenant, kind, -(n as i64))?;
    }
    conn.prepare_cached(
        "DELETE FROM idem_tenant_counts WHERE tenant = ?1 AND kind = ?2 AND n <= 0",
    )?
    .execute(params![tenant, kind])
    .map(drop)
}

/// Removes every expired slot, keeping the counts right.
fn prune_slots(conn: &Connection, now: UnixMillis) -> rusqlite::Result<()> {
    let groups: Vec<(String, i64)> = conn
        .prepare_cached(
            "SELECT DISTINCT tenant, kind FROM idem_tenant_slots WHERE expires_at <= ?1",
        )?
        .query_map(params![now as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (tenant, kind) in groups {
        prune_tenant(conn, &tenant, kind, now)?;
    }
    Ok(())
}

fn get(conn: &Connection, key: &RecordKey, now: UnixMillis) -> rusqlite::Result<Option<Record>> {
    conn.prepare_cached(statements::GET)?
        .query_row(params![id(key), now as i64], |row| {
            let fingerprint: String = row.get(0)?;
            let token: Option<Vec<u8>> = row.get(1)?;
            let lease_expires_at: Option<i64> = row.get(2)?;
            let response: Option<Vec<u8>> = row.get(3)?;
            let corrupt = |what: &str| {
                rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Blob,
                    format!("corrupt record: {what}").into(),
                )
            };
            let state = match (token, response) {
                (_, Some(bytes)) => RecordState::Completed(
                    StoredResponse::decode(&bytes).map_err(|e| corrupt(&e.to_string()))?,
                ),
                (Some(t), None) => RecordState::InFlight {
                    token: FencingToken::from_slice(&t).ok_or_else(|| corrupt("token"))?,
                    lease_expires_at: lease_expires_at.unwrap_or(0) as u64,
                },
                (None, None) => return Err(corrupt("neither token nor response")),
            };
            Ok(Record {
                fingerprint: Fingerprint::decode(&fingerprint)
                    .ok_or_else(|| corrupt("fingerprint"))?,
                state,
                created_at: row.get::<_, i64>(4)? as u64,
                expires_at: row.get::<_, i64>(5)? as u64,
            })
        })
        .optional()
}

impl Store for SqliteStore {
    async fn claim(&self, key: &RecordKey, spec: ClaimSpec<'_>) -> Result<Claim, StoreError> {
        // A completed record (a replay) is answered from a read connection: it is what
        // the writer would answer, since a claim leaves a live record alone, and the
        // read sees every commit acknowledged before it began. Anything else goes to
        // the writer, in order behind the operations already sent to it: an absent or
        // expired record is claimed there, and a record in flight may have its complete
        // queued there (a caller may see a response end once its complete is sent, and
        // must then find the outcome, not the key in flight).
        let now = now_millis();
        if let Some(Some(record)) = self.read(|c| get(c, key, now))
            && matches!(record.state, RecordState::Completed(_))
        {
            return Ok(Claim::Existing(record));
        }
        let (key, fingerprint) = (key.clone(), spec.fingerprint.clone());
        self.call(|reply| Op::Claim {
            key,
            fingerprint,
            lease: spec.lease,
            ttl: spec.ttl,
            reply,
        })
        .await
    }

    async fn reclaim(
        &self,
        key: &RecordKey,
        stale: FencingToken,
        spec: ClaimSpec<'_>,
    ) -> Result<Option<Lease>, StoreError> {
        let (key, fingerprint) = (key.clone(), spec.fingerprint.clone());
        self.call(|reply| Op::Reclaim {
            key,
            stale,
            fingerprint,
            lease: spec.lease,
            ttl: spec.ttl,
            reply,
        })
        .await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: FencingToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let (key, response) = (key.clone(), response.encode());
        self.call(|reply| Op::Complete {
            key,
            token,
            response,
            ttl,
            reply,
        })
        .await
    }

    async fn release(&self, key: &RecordKey, token: FencingToken) -> Result<bool, StoreError> {
        let key = key.clone();
        self.call(|reply| Op::Release { key, token, reply }).await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let key = key.clone();
        self.call(|reply| Op::Renew {
            key,
            token,
            lease,
            reply,
        })
        .await
    }

    async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        // As for a claim: only a completed record is read beside the writer.
        let now = now_millis();
        if let Some(Some(record)) = self.read(|c| get(c, key, now))
            && matches!(record.state, RecordState::Completed(_))
        {
            return Ok(Some(record));
        }
        let key = key.clone();
        self.call(|reply| Op::Get { key, reply }).await
    }

    async fn delete(&self, key: &RecordKey) -> Result<bool, StoreError> {
        let key = key.clone();
        self.call(|reply| Op::Delete { key, reply }).await
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        self.call(|reply| Op::Purge { reply }).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // Through the writer: a ping proves that writes can still be made.
        let key = RecordKey::new("", "", "");
        self.call(|reply| Op::Get { key, reply }).await.map(|_| ())
    }
}

impl TenantCounting for SqliteStore {
    async fn admit(
        &self,
        key: &RecordKey,
        limits: TenantLimits,
        lease: Duration,
        ttl: Duration,
    ) -> Result<Admission, StoreError> {
        let key = key.clone();
        self.call(|reply| Op::Admit {
            key,
            limits,
            lease,
            ttl,
            reply,
        })
        .await
    }

    async fn settle(&self, key: &RecordKey, kept: Option<Duration>) -> Result<(), StoreError> {
        let key = key.clone();
        self.call(|reply| Op::Settle { key, kept, reply }).await
    }
}

impl Wakeups for SqliteStore {
    async fn watch(&self, key: &RecordKey) -> Result<Watch, StoreError> {
        Ok(self.inner.notifier.subscribe(key))
    }
}

impl InFlightListing for SqliteStore {
    async fn list_in_flight(&self, limit: usize) -> Result<Vec<InFlightRecord>, StoreError> {
        in_flight::list(self.inner.clone(), limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every caller of a failed batch gets its own error, with the one rusqlite error
    /// as its source and the kind that error has.
    #[test]
    fn a_batch_failure_keeps_its_source_for_every_caller() {
        use std::error::Error as _;
        let busy = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        );
        let err = BatchError::new(busy);
        for copy in [err.to_store_error(), err.to_store_error()] {
            assert_eq!(copy.kind(), StoreErrorKind::Unavailable);
            let source = copy.source().expect("a source");
            let cause = source
                .downcast_ref::<Arc<rusqlite::Error>>()
                .expect("the rusqlite error");
            assert!(Arc::ptr_eq(cause, &err.cause));
        }
    }

    fn temp_store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("idem.db")).unwrap();
        (dir, store)
    }

    idem_conformance::conformance_tests!(async {
        // The directory must outlive the store; leaking it in a test is fine.
        let (dir, store) = temp_store();
        std::mem::forget(dir);
        Some(std::sync::Arc::new(store))
    });

    /// The encryption wrapper passes the same suite.
    mod encrypted {
        use idem_core::crypto::{Encrypted, EncryptionKey};

        idem_conformance::conformance_tests!(async {
            let (dir, store) = super::temp_store();
            std::mem::forget(dir);
            let key = EncryptionKey::from_hex(&"5a".repeat(32)).unwrap();
            Some(std::sync::Arc::new(Encrypted::new(store, &key)))
        });
    }

    #[tokio::test]
    async fn encrypted_records_hold_no_plaintext_on_disk() {
        use idem_core::crypto::{Encrypted, EncryptionKey};
        let secret_body = b"{\"card\":\"4242424242424242\"}";
        for encrypt in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("idem.db");
            let plain = SqliteStore::open(&path).unwrap();
            let key = RecordKey::new("t_1", "POST /v1/charges", "k");
            let fp = idem_conformance::fp("a");
            let response = StoredResponse {
                status: 201,
                headers: vec![(
                    http::header::LOCATION,
                    http::HeaderValue::from_static("/v1/charges/ch_1"),
                )],
                body: bytes::Bytes::from_static(secret_body),
                body_kept: idem_core::BodyKept::Whole,
                request_id: None,
            };
            let spec = ClaimSpec {
                fingerprint: &fp,
                lease: Duration::from_secs(30),
                ttl: Duration::from_secs(3600),
            };
            if encrypt {
                let store = Encrypted::new(
                    plain.clone(),
                    &EncryptionKey::from_hex(&"5a".repeat(32)).unwrap(),
                );
                let Claim::Acquired(lease) = store.claim(&key, spec).await.unwrap() else {
                    panic!()
                };
                assert!(
                    store
                        .complete(&key, lease.token, &response, Duration::from_secs(3600))
                        .await
                        .unwrap()
                );
                let back = store.get(&key).await.unwrap().unwrap();
                assert_eq!(
                    back.state,
                    RecordState::Completed(response.clone()),
                    "reads back decrypted"
                );
            } else {
                let Claim::Acquired(lease) = plain.claim(&key, spec).await.unwrap() else {
                    panic!()
                };
                assert!(
                    plain
                        .complete(&key, lease.token, &response, Duration::from_secs(3600))
                        .await
                        .unwrap()
                );
            }
            drop(plain);
            // Everything SQLite wrote: the database and its write-ahead log.
            let mut bytes = std::fs::read(&path).unwrap();
            bytes.extend(std::fs::read(dir.path().join("idem.db-wal")).unwrap_or_default());
            let found = bytes.windows(16).any(|w| w == b"4242424242424242");
            assert_eq!(
                found,
                !encrypt,
                "plaintext on disk with encryption {}",
                if encrypt { "on" } else { "off" }
            );
        }
    }

    /// The writer runs operations in the order they were sent, and callers rely on it:
    /// the sidecar may send the last byte of a response once its `complete` is sent,
    /// before it commits, and the next request for the key must then find the
    /// outcome, not the key in flight (a 409). A read beside the writer must not
    /// overtake a complete still queued for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_after_a_queued_complete_finds_the_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idem.db");
        let store = SqliteStore::open(&path).unwrap();
        let key = RecordKey::new("t_1", "POST /v1/charges", "k");
        let fp = idem_conformance::fp("a");
        let spec = ClaimSpec {
            fingerprint: &fp,
            lease: Duration::from_secs(30),
            ttl: Duration::from_secs(3600),
        };
        let Claim::Acquired(lease) = store.claim(&key, spec).await.unwrap() else {
            panic!("a new key is acquired")
        };
        // Another connection holds the write lock: the writer's next batch waits for
        // it, while readers still read (WAL).
        let blocker = Connection::open(&path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let response = StoredResponse {
            status: 201,
            headers: vec![],
            body: bytes::Bytes::from_static(b"{}"),
            body_kept: idem_core::BodyKept::Whole,
            request_id: None,
        };
        let completing = {
            let (store, key, response) = (store.clone(), key.clone(), response.clone());
            tokio::spawn(async move {
                store
                    .complete(&key, lease.token, &response, Duration::from_secs(3600))
                    .await
            })
        };
        // The complete is queued for the writer (sent when its task first runs).
        tokio::time::sleep(Duration::from_millis(100)).await;
        let claiming = {
            let (store, key, fp) = (store.clone(), key.clone(), fp.clone());
            tokio::spawn(async move {
                let spec = ClaimSpec {
                    fingerprint: &fp,
                    lease: Duration::from_secs(30),
                    ttl: Duration::from_secs(3600),
                };
                store.claim(&key, spec).await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        blocker.execute_batch("ROLLBACK").unwrap();
        assert!(completing.await.unwrap().unwrap(), "the complete is stored");
        match claiming.await.unwrap().unwrap() {
            Claim::Existing(r) => assert_eq!(r.state, RecordState::Completed(response)),
            other => panic!("expected the stored outcome, got {other:?}"),
        }
    }

    /// The first schema (version 0), as the earlier code created it.
    const SCHEMA_V0: &str = "
        CREATE TABLE idem_records (
            id               BLOB PRIMARY KEY,
            tenant           TEXT NOT NULL,
            route            TEXT NOT NULL,
            key              TEXT NOT NULL,
            fingerprint      TEXT NOT NULL,
            token            BLOB,
            lease_expires_at INTEGER,
            response         BLOB,
            created_at       INTEGER NOT NULL,
            expires_at       INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX idem_records_expires_at ON idem_records (expires_at);
        CREATE INDEX idem_records_in_flight ON idem_records (created_at) WHERE token IS NOT NULL;
        CREATE TABLE idem_tenant_slots (
            tenant     TEXT NOT NULL,
            kind       INTEGER NOT NULL,
            id         BLOB NOT NULL,
            expires_at INTEGER NOT NULL,
            PRIMARY KEY (tenant, kind, id)
        ) WITHOUT ROWID;
        CREATE INDEX idem_tenant_slots_expiry ON idem_tenant_slots (tenant, kind, expires_at);
        CREATE INDEX idem_tenant_slots_expires_at ON idem_tenant_slots (expires_at);
        CREATE TABLE idem_tenant_counts (
            tenant TEXT NOT NULL,
            kind   INTEGER NOT NULL,
            n      INTEGER NOT NULL,
            PRIMARY KEY (tenant, kind)
        ) WITHOUT ROWID;
    ";

    /// A file made with the first schema (a table keyed by `id`), holding a completed
    /// record and one in flight, is upgraded when opened: both records are found,
    /// the lease still completes, and the in-flight listing still sees the claim.
    #[tokio::test]
    async fn a_database_of_the_first_schema_is_upgraded_with_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let (source, old) = (dir.path().join("source.db"), dir.path().join("old.db"));
        let fp = idem_conformance::fp("a");
        let spec = ClaimSpec {
            fingerprint: &fp,
            lease: Duration::from_secs(30),
            ttl: Duration::from_secs(3600),
        };
        let ttl = Duration::from_secs(3600);
        let done = RecordKey::new("t_1", "POST /v1/charges", "done");
        let flying = RecordKey::new("t_1", "POST /v1/charges", "flying");
        let response = StoredResponse {
            status: 201,
            headers: vec![],
            body: bytes::Bytes::from_static(b"{\"id\":1}"),
            body_kept: idem_core::BodyKept::Whole,
            request_id: None,
        };
        // Rows as this store writes them, copied into a file of the first schema.
        let token = {
            let store = SqliteStore::open(&source).unwrap();
            let Claim::Acquired(lease) = store.claim(&done, spec).await.unwrap() else {
                panic!("a fresh key was taken")
            };
            assert!(
                store
                    .complete(&done, lease.token, &response, ttl)
                    .await
                    .unwrap()
            );
            let Claim::Acquired(lease) = store.claim(&flying, spec).await.unwrap() else {
                panic!("a fresh key was taken")
            };
            lease.token
        };
        {
            let conn = Connection::open(&old).unwrap();
            conn.execute_batch(SCHEMA_V0).unwrap();
            conn.execute("ATTACH ?1 AS source", [source.to_str().unwrap()])
                .unwrap();
            let copied = conn
                .execute("INSERT INTO idem_records SELECT id, tenant, route, key, fingerprint, token, lease_expires_at, response, created_at, expires_at FROM source.idem_records", [])
                .unwrap();
            assert_eq!(copied, 2);
        }
        for _ in 0..2 {
            // Upgraded on the first open; the second finds the upgrade done.
            let store = SqliteStore::open(&old).unwrap();
            // The copy is in the database file, not left in the WAL.
            let wal = std::fs::metadata(dir.path().join("old.db-wal")).map_or(0, |m| m.len());
            assert_eq!(wal, 0, "the upgrade left its copy in the WAL");
            let conn = Connection::open(&old).unwrap();
            let version: i64 = conn
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap();
            assert_eq!(version, SCHEMA_VERSION);
            let table: String = conn
                .query_row(
                    "SELECT sql FROM sqlite_master WHERE name = 'idem_records'",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert!(!table.contains("WITHOUT ROWID"), "not upgraded: {table}");
            match store.get(&done).await.unwrap() {
                Some(r) => assert_eq!(r.state, RecordState::Completed(response.clone())),
                None => panic!("the completed record was lost in the upgrade"),
            }
            match store.get(&flying).await.unwrap().map(|r| r.state) {
                Some(RecordState::InFlight { token: t, .. }) => assert_eq!(t, token),
                other => panic!("expected the record in flight, got {other:?}"),
            }
            assert_eq!(store.list_in_flight(10).await.unwrap().len(), 1);
        }
        let store = SqliteStore::open(&old).unwrap();
        assert!(
            store
                .complete(&flying, token, &response, ttl)
                .await
                .unwrap()
        );
        assert!(matches!(
            store.claim(&flying, spec).await.unwrap(),
            Claim::Existing(_)
        ));
    }

    #[tokio::test]
    async fn a_record_survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idem.db");
        let key = RecordKey::new("t_1", "POST /v1/charges", "k");
        let fp = idem_conformance::fp("a");
        let response = StoredResponse {
            status: 201,
            headers: vec![(
                http::header::LOCATION,
                http::HeaderValue::from_static("/v1/charges/1"),
            )],
            body: bytes::Bytes::from_static(b"{\"id\":1}"),
            body_kept: idem_core::BodyKept::Whole,
            request_id: Some("req_1".into()),
        };
        {
            let store = SqliteStore::open(&path).unwrap();
            let spec = ClaimSpec {
                fingerprint: &fp,
                lease: Duration::from_secs(30),
                ttl: Duration::from_secs(3600),
            };
            let Claim::Acquired(lease) = store.claim(&key, spec).await.unwrap() else {
                panic!()
            };
            assert!(
                store
                    .complete(&key, lease.token, &response, Duration::from_secs(3600))
                    .await
                    .unwrap()
            );
        }
        let reopened = SqliteStore::open(&path).unwrap();
        let spec = ClaimSpec {
            fingerprint: &fp,
            lease: Duration::from_secs(30),
            ttl: Duration::from_secs(3600),
        };
        match reopened.claim(&key, spec).await.unwrap() {
            Claim::Existing(r) => assert_eq!(r.state, RecordState::Completed(response)),
            other => panic!("expected the stored record, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn background_purge_removes_expired_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idem.db");
        let store = SqliteStore::open_with(
            &path,
            SqliteOptions::default().with_purge_interval(Duration::from_millis(100)),
        )
        .unwrap();
        let fp = idem_conformance::fp("a");
        for i in 0..10 {
            let key = RecordKey::new("t", "r", format!("k{i}"));
            let spec = ClaimSpec {
                fingerprint: &fp,
                lease: Duration::from_millis(100),
                ttl: Duration::from_millis(150),
            };
            let _ = store.claim(&key, spec).await.unwrap();
        }
        let count = |p: &Path| -> i64 {
            Connection::open(p)
                .unwrap()
                .query_row("SELECT count(*) FROM idem_records", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(count(&path), 10);
        let deadline = Instant::now() + Duration::from_secs(10);
        while count(&path) > 0 {
            assert!(Instant::now() < deadline, "expired rows were never purged");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
