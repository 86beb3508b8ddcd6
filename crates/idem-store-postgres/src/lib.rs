#![doc = include_str!("../README.md")]

use std::sync::{Arc, Weak};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use idem_core::store::{RemoteWakeups, StoreErrorKind, Watch};
use idem_core::{
    Admission, Claim, ClaimSpec, FencingToken, Fingerprint, InFlightListing, InFlightRecord, Lease,
    Record, RecordKey, RecordState, Store, StoreError, StoredResponse, TenantCounting,
    TenantLimits, Wakeups,
};
use tokio_postgres::{AsyncMessage, Row};

mod shared;
pub mod tls;

/// The statements of a new key (claim, complete) and of a replay (a claim that finds
/// the record), as this store runs them: the benchmark kit's floor (`pgbench`) runs the
/// very same text. Not a stable interface.
#[doc(hidden)]
pub mod statements {
    /// `$1` id, `$2` tenant, `$3` route, `$4` key, `$5` fingerprint, `$6` token, `$7`
    /// lease ms, `$8` ttl ms.
    pub const CLAIM: &str = super::CLAIM;
    /// `$1` id, `$2` token, `$3` response, `$4` ttl ms, `$5` notify (idem sends false,
    /// then [`NOTIFY`] when notifications are on).
    pub const COMPLETE: &str = super::COMPLETE;
    /// `$1` the record's storage id in hex.
    pub const NOTIFY: &str = super::NOTIFY;
}

use crate::tls::RustlsConnect;

/// The schema version this crate writes. [`PostgresStore::migrate`] brings older
/// databases up to it, and refuses a newer one only when that one says this version's
/// code no longer works on it (each migration records the oldest version that still
/// does: a rolling upgrade leaves older instances running when it only adds tables).
pub const SCHEMA_VERSION: i32 = 4;

/// The `LISTEN/NOTIFY` channel; the payload is the record's storage id in hex.
pub const CHANNEL: &str = "idem_records_changed";

/// Options of a PostgreSQL store.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PostgresOptions {
    /// Longest time one operation may take, opening a connection included,
    /// before it fails with [`StoreErrorKind::Unavailable`]. Default 2 s.
    pub op_timeout: Duration,
    /// Largest number of connections of the request path (plus one dedicated
    /// listener, and up to two per runtime for the migration and the purge, opened when
    /// those run). Default 16. Split between [`PostgresOptions::runtimes`]. The
    /// connections are shared: every caller's statement is pipelined on the least busy
    /// one, so this bounds connections, not concurrent operations.
    pub max_connections: usize,
    /// How many tokio runtimes the store's callers run on (the sidecar's worker
    /// threads, each a current-thread runtime). Each runtime that uses the store gets
    /// connections of its own, `max_connections / runtimes` (rounded up), driven by
    /// that runtime: a query is written, read and answered on the caller's thread.
    /// With connections shared by all, a connection opened by one worker served the
    /// others too, and every such query crossed threads twice (measured: see
    /// docs/benchmarks.md, "PostgreSQL"). Default 1.
    pub runtimes: usize,
    /// How often expired records are purged in the background; `None` leaves it to
    /// the caller ([`Store::purge_expired`]). Default 60 s.
    pub purge_interval: Option<Duration>,
    /// How often a watch re-reads while the listener connection is down (bounded
    /// polling). Default 100 ms.
    pub poll_interval: Duration,
    /// Longest a watch waits for a notification before it lets the caller re-read.
    /// Default 1 s.
    pub watch_resync: Duration,
    /// Whether changes are announced with `pg_notify` and watched with `LISTEN`
    /// (default). A notifying commit holds PostgreSQL's notification queue lock until
    /// its WAL is flushed, so notifying commits do not group-commit: measured here,
    /// 7x fewer completes per second. Without it, watches (`wait`-mode duplicates)
    /// re-read every [`PostgresOptions::poll_interval`] instead, and no listener
    /// connection is kept. Every instance sharing a database should say the same.
    pub notify: bool,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            op_timeout: Duration::from_secs(2),
            max_connections: 16,
            runtimes: 1,
            purge_interval: Some(Duration::from_secs(60)),
            poll_interval: Duration::from_millis(100),
            watch_resync: Duration::from_secs(1),
            notify: true,
        }
    }
}

impl PostgresOptions {
    /// Sets the per-operation timeout.
    #[must_use]
    pub fn with_op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// Sets how many connections the request path may open ([`PostgresOptions::max_connections`]).
    #[must_use]
    pub fn with_max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Sets how many runtimes share the store ([`PostgresOptions::runtimes`]).
    #[must_use]
    pub fn with_runtimes(mut self, n: usize) -> Self {
        self.runtimes = n.max(1);
        self
    }

    /// Turns change notifications (`pg_notify`/`LISTEN`) on or off.
    #[must_use]
    pub fn with_notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// Sets the background purge interval (`None`: no background purge).
    #[must_use]
    pub fn with_purge_interval(mut self, every: Option<Duration>) -> Self {
        self.purge_interval = every;
        self
    }
}

/// The PostgreSQL store. Cloning shares the connections and the listener.
///
/// ## Table and indexes
///
/// One table, `idem_records`, keyed by `id bytea PRIMARY KEY`: the 32-byte SHA-256
/// [`RecordKey::storage_id`]. Every operation on a record is a single-row lookup of
/// that B-tree, O(log n): at tens of millions of rows the tree is 4 levels deep and
/// its upper levels stay cached. A second B-tree on `expires_at` serves the purge,
/// which walks the oldest expired rows first. The table's `fillfactor` of 90 leaves
/// room on each page so that renewals, which change no indexed column, are HOT
/// updates.
///
/// ## Atomicity and clocks
///
/// A claim is one `INSERT … ON CONFLICT (id) DO UPDATE … WHERE idem_records.expires_at
/// <= now` statement: it inserts, replaces an expired record, or leaves a live one
/// alone, never read-then-write. Complete, release, renew and reclaim are single
/// `UPDATE`/`DELETE` statements guarded by the fencing token. Every time comes from
/// the server (`clock_timestamp()`), so instances with skewed clocks agree.
///
/// ## Wake-ups
///
/// Complete, release, reclaim and delete `pg_notify` [`CHANNEL`] in the same statement
/// (delivered at commit), unless [`PostgresOptions::notify`] is off (then watches
/// poll). One dedicated connection per store `LISTEN`s and fans out
/// in process; it reconnects by itself, and while it is down watches poll every
/// [`PostgresOptions::poll_interval`].
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

struct Inner {
    pools: Pools,
    options: PostgresOptions,
    wakeups: Arc<RemoteWakeups>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The connections of each tokio runtime that uses the store, made on its first use
/// there: the shared, pipelined connections of the request path ([`shared`]) and a
/// small pool for work that holds a connection alone (the migration's transaction,
/// the purge's batches, which must not hold up the requests pipelined behind them).
/// A connection's driver task runs on the runtime that opens it, so a query is
/// written, read and answered on its caller's thread. A runtime that has shut down
/// leaves its entry behind, its connections closed (their drivers ended with it); the
/// sidecar's runtimes live as long as the store.
struct Pools {
    config: tokio_postgres::Config,
    connector: RustlsConnect,
    /// Shared connections per runtime.
    size: usize,
    timeout: Duration,
    by_runtime: std::sync::Mutex<Vec<(Option<tokio::runtime::Id>, Local)>>,
}

#[derive(Clone)]
struct Local {
    shared: Arc<shared::Shared>,
    pool: Pool,
}

/// Connections of the pool for exclusive work, per runtime: the migration and the
/// purge take one each.
const EXCLUSIVE_CONNECTIONS: usize = 2;

impl Pools {
    /// The current runtime's connections.
    fn current(&self) -> Result<Local, StoreError> {
        let runtime = tokio::runtime::Handle::try_current().ok().map(|h| h.id());
        let mut all = self
            .by_runtime
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, local)) = all.iter().find(|(r, _)| *r == runtime) {
            return Ok(local.clone());
        }
        let manager = Manager::from_config(
            self.config.clone(),
            self.connector.clone(),
            ManagerConfig {
                // A connection whose socket broke (server restart) reports closed and
                // is dropped on recycle; no round trip per checkout.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let t = Some(self.timeout);
        let pool = Pool::builder(manager)
            .max_size(EXCLUSIVE_CONNECTIONS)
            .wait_timeout(t)
            .create_timeout(t)
            .recycle_timeout(t)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::new(StoreErrorKind::Backend, "postgres pool", e))?;
        let local = Local {
            shared: Arc::new(shared::Shared::new(
                self.config.clone(),
                self.connector.clone(),
                self.size,
            )),
            pool,
        };
        all.push((runtime, local.clone()));
        Ok(local)
    }

    /// A connection of the current runtime's pool, held alone.
    async fn exclusive(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.current()?.pool.get().await.map_err(map_pool)
    }

    /// A shared connection of the current runtime, for the request path's statements.
    async fn shared(&self) -> Result<Arc<shared::Conn>, StoreError> {
        self.current()?.shared.conn(self.timeout).await
    }
}

const MIGRATION_V1: &str = "
CREATE TABLE IF NOT EXISTS idem_records (
    id               bytea PRIMARY KEY,
    tenant           text NOT NULL,
    route            text NOT NULL,
    key              text NOT NULL,
    fingerprint      text NOT NULL,
    token            bytea,
    lease_expires_at timestamptz,
    response         bytea,
    created_at       timestamptz NOT NULL,
    expires_at       timestamptz NOT NULL
) WITH (fillfactor = 90);
CREATE INDEX IF NOT EXISTS idem_records_expires_at ON idem_records (expires_at);
";

/// Per-tenant counts ([`TenantCounting::admit`]): one row per counted record and slot kind
/// (0 in flight, 1 live record) with its expiry, and a running count per tenant and
/// kind, so that checking a cap reads one row. Every change to one tenant's counts
/// holds a transaction-scoped advisory lock on the tenant, so the cap is exact under
/// concurrency and no two changes can deadlock.
const MIGRATION_V2: &str = "
CREATE TABLE IF NOT EXISTS idem_tenant_slots (
    tenant     text NOT NULL,
    kind       int2 NOT NULL,
    id         bytea NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (tenant, kind, id)
);
CREATE INDEX IF NOT EXISTS idem_tenant_slots_expiry ON idem_tenant_slots (tenant, kind, expires_at);
CREATE INDEX IF NOT EXISTS idem_tenant_slots_expires_at ON idem_tenant_slots (expires_at);
CREATE TABLE IF NOT EXISTS idem_tenant_counts (
    tenant text NOT NULL,
    kind   int2 NOT NULL,
    n      int8 NOT NULL,
    PRIMARY KEY (tenant, kind)
);

CREATE OR REPLACE FUNCTION idem_tenant_lock(p_tenant text) RETURNS void
LANGUAGE sql AS $$ SELECT pg_advisory_xact_lock(hashtextextended(p_tenant, 7426031976451584354)) $$;

-- Removes the tenant's expired slots of one kind; returns the live count.
CREATE OR REPLACE FUNCTION idem_tenant_prune(p_tenant text, p_kind int4, p_now timestamptz)
RETURNS int8 LANGUAGE plpgsql AS $$
DECLARE gone int8; remaining int8;
BEGIN
    WITH d AS (DELETE FROM idem_tenant_slots
               WHERE tenant = p_tenant AND kind = p_kind AND expires_at <= p_now RETURNING 1)
    SELECT count(*) INTO gone FROM d;
    UPDATE idem_tenant_counts SET n = n - gone WHERE tenant = p_tenant AND kind = p_kind
    RETURNING n INTO remaining;
    IF remaining IS NOT NULL AND remaining <= 0 THEN
        DELETE FROM idem_tenant_counts WHERE tenant = p_tenant AND kind = p_kind;
    END IF;
    RETURN coalesce(remaining, 0);
END $$;

-- Returns 0 when admitted, 1 when the in-flight cap is reached, 2 for records.
CREATE OR REPLACE FUNCTION idem_tenant_admit(
    p_tenant text, p_id bytea, p_lease int8, p_ttl int8, p_max_f int8, p_max_r int8)
RETURNS int2 LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := clock_timestamp();
    lim int8; life int8; n int8;
BEGIN
    PERFORM idem_tenant_lock(p_tenant);
    FOR k IN 0..1 LOOP
        lim := CASE k WHEN 0 THEN p_max_f ELSE p_max_r END;
        CONTINUE WHEN lim IS NULL;
        CONTINUE WHEN EXISTS (SELECT 1 FROM idem_tenant_slots
            WHERE tenant = p_tenant AND kind = k AND id = p_id AND expires_at > v_now);
        SELECT c.n INTO n FROM idem_tenant_counts c WHERE tenant = p_tenant AND kind = k;
        IF coalesce(n, 0) >= lim AND idem_tenant_prune(p_tenant, k, v_now) >= lim THEN
            RETURN k + 1;
        END IF;
    END LOOP;
    FOR k IN 0..1 LOOP
        lim := CASE k WHEN 0 THEN p_max_f ELSE p_max_r END;
        life := CASE k WHEN 0 THEN p_lease ELSE p_ttl END;
        CONTINUE WHEN lim IS NULL;
        UPDATE idem_tenant_slots SET expires_at = v_now + life * interval '1 millisecond'
        WHERE tenant = p_tenant AND kind = k AND id = p_id;
        IF NOT FOUND THEN
            INSERT INTO idem_tenant_slots VALUES (p_tenant, k, p_id, v_now + life * interval '1 millisecond');
            INSERT INTO idem_tenant_counts VALUES (p_tenant, k, 1)
            ON CONFLICT (tenant, kind) DO UPDATE SET n = idem_tenant_counts.n + 1;
        END IF;
    END LOOP;
    RETURN 0;
END $$;

-- Ends the in-flight slot; keeps the record slot for p_kept ms, or removes it (NULL).
CREATE OR REPLACE FUNCTION idem_tenant_settle(p_tenant text, p_id bytea, p_kept int8)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE gone int8;
BEGIN
    PERFORM idem_tenant_lock(p_tenant);
    FOR k IN 0..1 LOOP
        IF k = 1 AND p_kept IS NOT NULL THEN
            UPDATE idem_tenant_slots SET expires_at = clock_timestamp() + p_kept * interval '1 millisecond'
            WHERE tenant = p_tenant AND kind = 1 AND id = p_id;
            CONTINUE;
        END IF;
        DELETE FROM idem_tenant_slots WHERE tenant = p_tenant AND kind = k AND id = p_id;
        GET DIAGNOSTICS gone = ROW_COUNT;
        UPDATE idem_tenant_counts SET n = n - gone WHERE tenant = p_tenant AND kind = k AND gone > 0;
    END LOOP;
END $$;
";

/// An admit counts only a record in flight. Settle ends a record's count after its
/// complete or release has committed, and both take the tenant lock; so an admit sent
/// before the settle but run after it (a renewal whose renewer was aborted: the
/// statement was already on its way, and another connection may run the settle
/// first) finds the record completed or gone and counts nothing, while one that ran
/// first is undone by the settle. Without this, such a late admit held a `max_records`
/// slot of a released record for a whole TTL. The counting itself is v2's function,
/// renamed.
const MIGRATION_V3: &str = "
-- Left by a schema whose tables were dropped but not its functions (v2 has just
-- replaced idem_tenant_admit with the counting function again).
DROP FUNCTION IF EXISTS idem_tenant_count(text, bytea, int8, int8, int8, int8);
ALTER FUNCTION idem_tenant_admit(text, bytea, int8, int8, int8, int8) RENAME TO idem_tenant_count;

CREATE FUNCTION idem_tenant_admit(
    p_tenant text, p_id bytea, p_lease int8, p_ttl int8, p_max_f int8, p_max_r int8)
RETURNS int2 LANGUAGE plpgsql AS $$
BEGIN
    PERFORM idem_tenant_lock(p_tenant);
    -- Read after the lock: a settle that held it has its complete or release committed.
    IF NOT EXISTS (SELECT 1 FROM idem_records WHERE id = p_id AND response IS NULL
                   AND token IS NOT NULL AND expires_at > clock_timestamp()) THEN
        RETURN 0;
    END IF;
    RETURN idem_tenant_count(p_tenant, p_id, p_lease, p_ttl, p_max_f, p_max_r);
END $$;
";

/// The records in flight, by creation time ([`InFlightListing::list_in_flight`]): a partial
/// index, so it holds only the rows executing now, not every stored outcome. It is
/// built inside the migration's transaction, which holds writes to `idem_records` for
/// as long as the build scans the table; on a large table, create it beforehand with
/// `CREATE INDEX CONCURRENTLY` (same statement), and this step finds it there.
const MIGRATION_V4: &str = "
CREATE INDEX IF NOT EXISTS idem_records_in_flight ON idem_records (created_at) WHERE token IS NOT NULL;
";

/// The migrations: version, SQL, and the oldest schema version whose code still works
/// after it (v2 only adds tables, v3 only changes a function, v4 only adds an index:
/// v1 instances keep running beside newer ones).
const MIGRATIONS: [(i32, &str, i32); 4] = [
    (1, MIGRATION_V1, 1),
    (2, MIGRATION_V2, 1),
    (3, MIGRATION_V3, 1),
    (4, MIGRATION_V4, 1),
];

/// One purge batch of tenant counts: tenants with expired slots, one transaction
/// (and one tenant lock) each.
const PURGE_TENANTS: &str = "SELECT DISTINCT tenant, kind FROM idem_tenant_slots
     WHERE expires_at <= clock_timestamp() LIMIT $1";
const PRUNE_TENANT: &str =
    "SELECT idem_tenant_lock($1), idem_tenant_prune($1, $2, clock_timestamp())";

/// The longest a schema migration may take, lock wait included.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

/// Milliseconds since the epoch of a `timestamptz` expression.
macro_rules! ms {
    ($e:literal) => {
        concat!("floor(extract(epoch FROM ", $e, ") * 1000)::int8")
    };
}

/// One round trip for a new key and for a replay: read the live record in the
/// statement's snapshot; only when there is none, insert (or replace an expired
/// record). A live record found by the read is returned without touching its row: the
/// insert's `ON CONFLICT DO UPDATE` would lock it, which writes WAL and waits for a
/// flush, and replays and in-flight duplicates need no write at all. A record
/// committed by a concurrent claim after the snapshot is not seen by the read: the
/// insert then meets it, leaves it alone, and the statement returns no row; the caller
/// reads it with [`GET`].
const CLAIM: &str = concat!(
    "WITH now AS (SELECT clock_timestamp() AS t),
     cur AS (
        SELECT fingerprint, token, lease_expires_at, response, created_at, expires_at
        FROM idem_records, now WHERE id = $1 AND expires_at > now.t),
     ins AS (
        INSERT INTO idem_records AS r
            (id, tenant, route, key, fingerprint, token, lease_expires_at, response, created_at, expires_at)
        SELECT $1, $2, $3, $4, $5, $6, t + $7::int8 * interval '1 millisecond', NULL, t,
               t + GREATEST($7::int8, $8::int8) * interval '1 millisecond'
        FROM now WHERE NOT EXISTS (SELECT 1 FROM cur)
        ON CONFLICT (id) DO UPDATE SET
            tenant = excluded.tenant, route = excluded.route, key = excluded.key,
            fingerprint = excluded.fingerprint, token = excluded.token,
            lease_expires_at = excluded.lease_expires_at, response = NULL,
            created_at = excluded.created_at, expires_at = excluded.expires_at
        WHERE r.expires_at <= excluded.created_at
        RETURNING r.lease_expires_at)
     SELECT true, ",
    ms!("lease_expires_at"),
    ", NULL::text, NULL::bytea, NULL::int8, NULL::bytea, NULL::int8, NULL::int8 FROM ins
     UNION ALL
     SELECT false, NULL::int8, fingerprint, token, ",
    ms!("lease_expires_at"),
    ", response, ",
    ms!("created_at"),
    ", ",
    ms!("expires_at"),
    " FROM cur"
);

const GET: &str = concat!(
    "SELECT fingerprint, token, ",
    ms!("lease_expires_at"),
    ", response, ",
    ms!("created_at"),
    ", ",
    ms!("expires_at"),
    " FROM idem_records WHERE id = $1 AND expires_at > clock_timestamp()"
);

const RECLAIM: &str = concat!(
    "WITH now AS (SELECT clock_timestamp() AS t),
     upd AS (
        UPDATE idem_records r SET token = $3, fingerprint = $4,
            lease_expires_at = now.t + $5::int8 * interval '1 millisecond',
            expires_at = now.t + GREATEST($5::int8, $6::int8) * interval '1 millisecond'
        FROM now
        WHERE r.id = $1 AND r.token = $2 AND r.response IS NULL
          AND r.lease_expires_at <= now.t AND r.expires_at > now.t
        RETURNING r.id, r.lease_expires_at)
     SELECT ",
    ms!("lease_expires_at"),
    ", CASE WHEN $7 THEN pg_notify('idem_records_changed', encode(id, 'hex')) END::text FROM upd"
);

const COMPLETE: &str = "WITH now AS (SELECT clock_timestamp() AS t),
     upd AS (
        UPDATE idem_records r SET response = $3, token = NULL, lease_expires_at = NULL,
            expires_at = now.t + $4::int8 * interval '1 millisecond'
        FROM now
        WHERE r.id = $1 AND r.token = $2 AND r.expires_at > now.t
        RETURNING r.id)
     SELECT CASE WHEN $5 THEN pg_notify('idem_records_changed', encode(id, 'hex')) END::text FROM upd";

/// The wake-up of a complete, sent after it on the same connection. A notifying
/// commit holds PostgreSQL's notification queue lock until it is done; were the
/// notification in the complete's own transaction, that lock would be held across its
/// WAL flush and completes would not group-commit (measured: 7x fewer per second). In
/// a transaction of its own that does not wait for the flush, the lock is held for
/// microseconds. The wake-up is a hint that a watcher re-reads on, so one lost in a
/// crash costs nothing but the watcher's resync interval; the complete itself keeps
/// the server's `synchronous_commit`. It is sent even when the complete stored
/// nothing: a needless wake-up only makes a watcher re-read.
const NOTIFY: &str =
    "SELECT set_config('synchronous_commit', 'off', true), pg_notify('idem_records_changed', $1)";

const RELEASE: &str = "WITH del AS (
        DELETE FROM idem_records
        WHERE id = $1 AND token = $2 AND expires_at > clock_timestamp()
        RETURNING id)
     SELECT CASE WHEN $3 THEN pg_notify('idem_records_changed', encode(id, 'hex')) END::text FROM del";

const RENEW: &str = "WITH now AS (SELECT clock_timestamp() AS t)
     UPDATE idem_records r SET lease_expires_at = now.t + $3::int8 * interval '1 millisecond',
         expires_at = GREATEST(r.expires_at, now.t + $3::int8 * interval '1 millisecond')
     FROM now
     WHERE r.id = $1 AND r.token = $2 AND r.expires_at > now.t";

const DELETE: &str = "WITH del AS (DELETE FROM idem_records WHERE id = $1 RETURNING id)
     SELECT CASE WHEN $2 THEN pg_notify('idem_records_changed', encode(id, 'hex')) END::text FROM del";

/// The oldest records in flight, along `idem_records_in_flight`.
const LIST_IN_FLIGHT: &str = concat!(
    "SELECT tenant, route, key, ",
    ms!("created_at"),
    ", ",
    ms!("lease_expires_at"),
    " FROM idem_records WHERE token IS NOT NULL AND expires_at > clock_timestamp()
     ORDER BY created_at LIMIT $1"
);

/// One purge batch: short transactions, and rows another session holds are skipped
/// rather than waited for.
const PURGE: &str = "WITH doomed AS (
        SELECT id FROM idem_records
        WHERE expires_at <= clock_timestamp()
        ORDER BY expires_at
        LIMIT $1
        FOR UPDATE SKIP LOCKED)
     DELETE FROM idem_records r USING doomed WHERE r.id = doomed.id";

const PURGE_BATCH: i64 = 1000;

/// Maps a driver error to a store error kind, keeping it as the source.
fn map_pg(e: tokio_postgres::Error) -> StoreError {
    let kind = pg_kind(&e);
    StoreError::new(kind, "postgres", e)
}

fn pg_kind(e: &tokio_postgres::Error) -> StoreErrorKind {
    if e.is_closed() {
        return StoreErrorKind::Unavailable;
    }
    if let Some(code) = e.code() {
        let c = code.code();
        // 08: connection exception; 53: insufficient resources; 57P0x: shutdown or
        // not accepting connections yet; 57014: cancelled (statement_timeout); 40001 and
        // 40P01: serialization failure, deadlock; 55P03: lock not available.
        return if c.starts_with("08")
            || c.starts_with("53")
            || c.starts_with("57P")
            || matches!(c, "57014" | "40001" | "40P01" | "55P03")
        {
            StoreErrorKind::Unavailable
        } else {
            StoreErrorKind::Backend
        };
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return StoreErrorKind::Unavailable;
        }
        if s.is::<tokio_postgres::types::WasNull>() || s.is::<tokio_postgres::types::WrongType>() {
            return StoreErrorKind::Corrupt;
        }
        source = s.source();
    }
    StoreErrorKind::Backend
}

fn map_pool(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => map_pg(e),
        PoolError::Timeout(t) => StoreError::msg(
            StoreErrorKind::Unavailable,
            format!("postgres pool timed out ({t:?})"),
        ),
        other => StoreError::new(StoreErrorKind::Unavailable, "postgres pool", other),
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::msg(
        StoreErrorKind::Corrupt,
        format!("corrupt postgres record: {what}"),
    )
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

fn id(key: &RecordKey) -> Vec<u8> {
    // The column keeps the 32 raw bytes of the storage id.
    key.storage_digest().to_vec()
}

fn millis(v: Option<i64>, what: &str) -> Result<u64, StoreError> {
    v.and_then(|v| u64::try_from(v).ok())
        .ok_or_else(|| corrupt(what))
}

/// Reads a record from `row`, whose columns from `at` on are those of [`GET`].
fn record(row: &Row, at: usize) -> Result<Record, StoreError> {
    let get = |e: tokio_postgres::Error| map_pg(e);
    let fingerprint: String = row.try_get(at).map_err(get)?;
    let token: Option<Vec<u8>> = row.try_get(at + 1).map_err(get)?;
    let lease: Option<i64> = row.try_get(at + 2).map_err(get)?;
    let response: Option<Vec<u8>> = row.try_get(at + 3).map_err(get)?;
    let state = match (token, response) {
        (_, Some(bytes)) => RecordState::Completed(
            StoredResponse::decode(&bytes)
                .map_err(|e| StoreError::new(StoreErrorKind::Corrupt, "postgres record", e))?,
        ),
        (Some(t), None) => RecordState::InFlight {
            token: FencingToken::from_slice(&t).ok_or_else(|| corrupt("token"))?,
            lease_expires_at: millis(lease, "lease_expires_at")?,
        },
        (None, None) => return Err(corrupt("neither token nor response")),
    };
    Ok(Record {
        fingerprint: Fingerprint::decode(&fingerprint).ok_or_else(|| corrupt("fingerprint"))?,
        state,
        created_at: millis(row.try_get(at + 4).map_err(get)?, "created_at")?,
        expires_at: millis(row.try_get(at + 5).map_err(get)?, "expires_at")?,
    })
}

/// The largest `pool_size` a URL may ask for: far above any server's
/// `max_connections` a single instance should take.
const MAX_POOL_SIZE: usize = 1000;

/// Takes idem's own parameters out of a `postgres://` URL, into `options`:
/// `pool_size=N` (1 to 1000), the most connections of the request path
/// ([`PostgresOptions::max_connections`]). Returns the URL `tokio-postgres` reads
/// (which refuses parameters it does not know); other strings pass unchanged.
pub fn split_options(
    url: &str,
    mut options: PostgresOptions,
) -> Result<(String, PostgresOptions), StoreError> {
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let Some((base, query)) = url.split_once('?').filter(|_| is_url) else {
        return Ok((url.to_owned(), options));
    };
    let mut kept = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k != "pool_size" {
            kept.push((k, v));
            continue;
        }
        match v.parse::<usize>() {
            Ok(n) if (1..=MAX_POOL_SIZE).contains(&n) => options.max_connections = n,
            _ => {
                return Err(StoreError::msg(
                    StoreErrorKind::Backend,
                    format!("pool_size={v:?}: a number of connections, 1 to {MAX_POOL_SIZE}"),
                ));
            }
        }
    }
    if kept.is_empty() {
        return Ok((base.to_owned(), options));
    }
    let query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(kept)
        .finish();
    Ok((format!("{base}?{query}"), options))
}

impl PostgresStore {
    /// Connects with default options to `postgres://user@host:port/db` (any URL or
    /// key=value string `tokio-postgres` reads), and runs the migration.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, PostgresOptions::default()).await
    }

    /// Connects with options, and runs the migration. Fails with
    /// [`StoreErrorKind::Unavailable`] when the server cannot be reached within
    /// [`PostgresOptions::op_timeout`].
    /// TLS as libpq: `sslmode`, `sslrootcert`, `sslcert`, `sslkey` (see [`tls`]); the
    /// pool's size as `pool_size` (see [`split_options`]).
    pub async fn connect_with(url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        let (url, options) = split_options(url, options)?;
        let (url, tls) = tls::split_url(&url)?;
        let connector = tls.connector()?;
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::new(StoreErrorKind::Backend, "invalid postgres url", e))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.op_timeout);
        }
        config.keepalives(true);
        let pools = Pools {
            config: config.clone(),
            connector: connector.clone(),
            size: options.max_connections.div_ceil(options.runtimes.max(1)),
            timeout: options.op_timeout,
            by_runtime: std::sync::Mutex::new(Vec::new()),
        };
        let wakeups = Arc::new(RemoteWakeups::default());
        let store = PostgresStore {
            inner: Arc::new_cyclic(|weak: &Weak<Inner>| {
                let mut tasks = Vec::new();
                if options.notify {
                    tasks.push(tokio::spawn(listen(
                        config,
                        connector,
                        Arc::downgrade(&wakeups),
                        options.op_timeout,
                    )));
                }
                if let Some(every) = options.purge_interval {
                    tasks.push(tokio::spawn(purge_every(weak.clone(), every)));
                }
                Inner {
                    pools,
                    options,
                    wakeups,
                    tasks,
                }
            }),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Creates or upgrades the schema: idempotent, safe to run from several instances
    /// at once (they serialize on an advisory lock). Runs on connect. It is bounded by
    /// [`MIGRATION_TIMEOUT`], not by the per-operation timeout: creating the schema, or
    /// waiting for another instance that does, takes longer than a request's store call.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        within(MIGRATION_TIMEOUT.max(self.inner.options.op_timeout), async {
            let mut client = self.inner.pools.exclusive().await?;
            let tx = client.transaction().await.map_err(map_pg)?;
            // Concurrent CREATE TABLE IF NOT EXISTS can still collide in the catalog.
            tx.execute("SELECT pg_advisory_xact_lock(7426031976451584353)", &[])
                .await
                .map_err(map_pg)?;
            // `readable_by`: the oldest schema version whose code still works on this
            // one (a version that only adds tables leaves older instances running).
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS idem_schema_version (
                    version    int PRIMARY KEY,
                    applied_at timestamptz NOT NULL DEFAULT now());
                 ALTER TABLE idem_schema_version ADD COLUMN IF NOT EXISTS readable_by int;
                 UPDATE idem_schema_version SET readable_by = 1
                     WHERE version = 2 AND readable_by IS NULL;",
            )
            .await
            .map_err(map_pg)?;
            let row = tx
                .query_one(
                    "SELECT max(version), max(coalesce(readable_by, version))
                         FILTER (WHERE version > $1)
                     FROM idem_schema_version",
                    &[&SCHEMA_VERSION],
                )
                .await
                .map_err(map_pg)?;
            let current: i32 = row.get::<_, Option<i32>>(0).unwrap_or(0);
            if let Some(needs) = row.get::<_, Option<i32>>(1)
                && needs > SCHEMA_VERSION
            {
                return Err(StoreError::msg(
                    StoreErrorKind::Backend,
                    format!(
                        "the database schema is version {current} and needs idem's schema {needs} or later; this idem has {SCHEMA_VERSION}"
                    ),
                ));
            }
            for (version, sql, readable_by) in MIGRATIONS {
                if current < version {
                    tx.batch_execute(sql).await.map_err(map_pg)?;
                    tx.execute(
                        "INSERT INTO idem_schema_version (version, readable_by) VALUES ($1, $2)",
                        &[&version, &readable_by],
                    )
                    .await
                    .map_err(map_pg)?;
                }
            }
            tx.commit().await.map_err(map_pg)
        })
        .await
    }

    /// Runs one operation with the store's timeout.
    async fn timed<T>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        within(self.inner.options.op_timeout, fut).await
    }

    /// Runs one prepared (and per-connection cached) statement on a shared
    /// connection, returning its rows.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        self.timed(async {
            let conn = self.inner.pools.shared().await?;
            let stmt = conn.prepare_cached(sql).await.map_err(map_pg)?;
            conn.query(&stmt, params).await.map_err(map_pg)
        })
        .await
    }

    async fn get_row(&self, id: &[u8]) -> Result<Option<Record>, StoreError> {
        match self.query(GET, &[&id]).await?.first() {
            Some(row) => record(row, 0).map(Some),
            None => Ok(None),
        }
    }
}

/// Runs `fut` for at most `timeout`; past it, an `Unavailable` error.
async fn within<T>(
    timeout: Duration,
    fut: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::msg(
                StoreErrorKind::Unavailable,
                "postgres operation timed out",
            ))
        })
}

/// Deletes expired rows in batches until none is left; returns how many.
async fn purge(pools: &Pools, timeout: Duration) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let n = within(timeout, async {
            let client = pools.exclusive().await?;
            let stmt = client.prepare_cached(PURGE).await.map_err(map_pg)?;
            client.execute(&stmt, &[&PURGE_BATCH]).await.map_err(map_pg)
        })
        .await?;
        total += n;
        if n < PURGE_BATCH as u64 {
            break;
        }
    }
    // Tenant counts: slots past their expiry, pruned tenant by tenant.
    loop {
        let pruned = within(timeout, async {
            let client = pools.exclusive().await?;
            let groups = client
                .query(PURGE_TENANTS, &[&PURGE_BATCH])
                .await
                .map_err(map_pg)?;
            for row in &groups {
                let (tenant, kind): (String, i32) = (row.get(0), i32::from(row.get::<_, i16>(1)));
                client
                    .execute(PRUNE_TENANT, &[&tenant, &kind])
                    .await
                    .map_err(map_pg)?;
            }
            Ok(groups.len())
        })
        .await?;
        if pruned < PURGE_BATCH as usize {
            return Ok(total);
        }
    }
}

async fn purge_every(inner: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        match purge(&inner.pools, inner.options.op_timeout).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(purged = n, "purged expired records"),
            Err(e) => tracing::warn!(error = %e, "postgres purge failed"),
        }
    }
}

/// Keeps one `LISTEN` connection alive, reconnecting with backoff, and wakes local
/// watchers. Ends when the store is dropped.
async fn listen(
    config: tokio_postgres::Config,
    tls: RustlsConnect,
    wakeups: Weak<RemoteWakeups>,
    timeout: Duration,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match tokio::time::timeout(timeout, config.connect(tls.clone())).await {
            Ok(Ok((client, mut connection))) => {
                let w = wakeups.clone();
                // The connection yields notifications only to whoever polls it.
                let mut driver = tokio::spawn(async move {
                    while let Some(msg) =
                        std::future::poll_fn(|cx| connection.poll_message(cx)).await
                    {
                        match msg {
                            Ok(AsyncMessage::Notification(n)) => {
                                let Some(w) = w.upgrade() else { return };
                                w.changed(n.payload());
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "postgres listener connection lost");
                                return;
                            }
                        }
                    }
                });
                let listen_sql = format!("LISTEN {CHANNEL}");
                let listening = tokio::select! {
                    r = tokio::time::timeout(timeout, client.batch_execute(&listen_sql)) => matches!(r, Ok(Ok(()))),
                    _ = &mut driver => false,
                };
                if listening {
                    let Some(w) = wakeups.upgrade() else { return };
                    w.connected();
                    drop(w);
                    backoff = Duration::from_millis(50);
                    let _ = (&mut driver).await;
                }
                driver.abort();
                drop(client);
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "postgres listener connect failed"),
            Err(_) => tracing::debug!("postgres listener connect timed out"),
        }
        let Some(w) = wakeups.upgrade() else { return };
        w.disconnected();
        drop(w);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

impl Store for PostgresStore {
    async fn claim(&self, key: &RecordKey, spec: ClaimSpec<'_>) -> Result<Claim, StoreError> {
        let id = id(key);
        let fp = spec.fingerprint.encode();
        let (lease, ttl) = (ms(spec.lease), ms(spec.ttl));
        // The live record that blocked the insert can vanish (released, expired)
        // before it is read; the claim is then simply tried again.
        for _ in 0..8 {
            let token = FencingToken::random();
            let token_bytes = token.to_bytes().to_vec();
            let rows = self
                .query(
                    CLAIM,
                    &[
                        &id,
                        &key.tenant,
                        &key.route,
                        &key.key,
                        &fp,
                        &token_bytes,
                        &lease,
                        &ttl,
                    ],
                )
                .await?;
            if let Some(row) = rows.first() {
                let acquired: bool = row.try_get(0).map_err(map_pg)?;
                if !acquired {
                    return Ok(Claim::Existing(record(row, 2)?));
                }
                return Ok(Claim::Acquired(Lease {
                    token,
                    expires_at: millis(row.try_get(1).map_err(map_pg)?, "lease_expires_at")?,
                }));
            }
            if let Some(record) = self.get_row(&id).await? {
                return Ok(Claim::Existing(record));
            }
        }
        Err(StoreError::msg(
            StoreErrorKind::Unavailable,
            "claim kept racing with concurrent changes",
        ))
    }

    async fn reclaim(
        &self,
        key: &RecordKey,
        stale: FencingToken,
        spec: ClaimSpec<'_>,
    ) -> Result<Option<Lease>, StoreError> {
        let token = FencingToken::random();
        let rows = self
            .query(
                RECLAIM,
                &[
                    &id(key),
                    &stale.to_bytes().to_vec(),
                    &token.to_bytes().to_vec(),
                    &spec.fingerprint.encode(),
                    &ms(spec.lease),
                    &ms(spec.ttl),
                    &self.inner.options.notify,
                ],
            )
            .await?;
        match rows.first() {
            Some(row) => Ok(Some(Lease {
                token,
                expires_at: millis(row.try_get(0).map_err(map_pg)?, "lease_expires_at")?,
            })),
            None => Ok(None),
        }
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: FencingToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let id = id(key);
        let (token, response, ttl) = (token.to_bytes().to_vec(), response.encode(), ms(ttl));
        if !self.inner.options.notify {
            let rows = self
                .query(COMPLETE, &[&id, &token, &response, &ttl, &false])
                .await?;
            return Ok(rows.len() == 1);
        }
        // The complete commits on its own, so that it group-commits with the others,
        // and the wake-up follows it on the same connection, pipelined (one round trip
        // for both), in a transaction that does not wait for its WAL flush: see
        // [`NOTIFY`].
        self.timed(async {
            let conn = self.inner.pools.shared().await?;
            let (complete, notify) =
                tokio::try_join!(conn.prepare_cached(COMPLETE), conn.prepare_cached(NOTIFY))
                    .map_err(map_pg)?;
            let hex = key.storage_id();
            let no = false;
            let complete_params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
                [&id, &token, &response, &ttl, &no];
            let notify_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&hex];
            let (rows, _) = tokio::try_join!(
                conn.query(&complete, &complete_params),
                conn.query(&notify, &notify_params),
            )
            .map_err(map_pg)?;
            Ok(rows.len() == 1)
        })
        .await
    }

    async fn release(&self, key: &RecordKey, token: FencingToken) -> Result<bool, StoreError> {
        let rows = self
            .query(
                RELEASE,
                &[
                    &id(key),
                    &token.to_bytes().to_vec(),
                    &self.inner.options.notify,
                ],
            )
            .await?;
        Ok(rows.len() == 1)
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let (id, token, lease) = (id(key), token.to_bytes().to_vec(), ms(lease));
        self.timed(async {
            let conn = self.inner.pools.shared().await?;
            let stmt = conn.prepare_cached(RENEW).await.map_err(map_pg)?;
            conn.execute(&stmt, &[&id, &token, &lease])
                .await
                .map(|n| n == 1)
                .map_err(map_pg)
        })
        .await
    }

    async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        self.get_row(&id(key)).await
    }

    async fn delete(&self, key: &RecordKey) -> Result<bool, StoreError> {
        let rows = self
            .query(DELETE, &[&id(key), &self.inner.options.notify])
            .await?;
        Ok(rows.len() == 1)
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        purge(&self.inner.pools, self.inner.options.op_timeout).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.query("SELECT 1", &[]).await.map(|_| ())
    }
}

impl TenantCounting for PostgresStore {
    async fn admit(
        &self,
        key: &RecordKey,
        limits: TenantLimits,
        lease: Duration,
        ttl: Duration,
    ) -> Result<Admission, StoreError> {
        let cap = |c: Option<u64>| c.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
        let rows = self
            .query(
                "SELECT idem_tenant_admit($1, $2, $3, $4, $5, $6)",
                &[
                    &key.tenant,
                    &id(key),
                    &ms(lease),
                    &ms(ttl),
                    &cap(limits.max_in_flight),
                    &cap(limits.max_records),
                ],
            )
            .await?;
        let answer: Option<i16> = rows
            .first()
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(map_pg)?;
        match answer {
            Some(0) => Ok(Admission::Admitted),
            Some(1) => Ok(Admission::InFlightFull),
            Some(2) => Ok(Admission::RecordsFull),
            _ => Err(corrupt("admit reply")),
        }
    }

    async fn settle(&self, key: &RecordKey, kept: Option<Duration>) -> Result<(), StoreError> {
        self.query(
            "SELECT idem_tenant_settle($1, $2, $3)",
            &[&key.tenant, &id(key), &kept.map(ms)],
        )
        .await
        .map(drop)
    }
}

impl Wakeups for PostgresStore {
    async fn watch(&self, key: &RecordKey) -> Result<Watch, StoreError> {
        // Without notifications the listener never connects: watches poll.
        let o = &self.inner.options;
        Ok(self
            .inner
            .wakeups
            .watch(key, o.poll_interval, o.watch_resync))
    }
}

impl InFlightListing for PostgresStore {
    async fn list_in_flight(&self, limit: usize) -> Result<Vec<InFlightRecord>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.query(LIST_IN_FLIGHT, &[&limit]).await?;
        rows.iter()
            .map(|row| {
                let text = |i| row.try_get::<_, String>(i).map_err(map_pg);
                Ok(InFlightRecord {
                    key: RecordKey::new(text(0)?, text(1)?, text(2)?),
                    created_at: millis(row.try_get(3).map_err(map_pg)?, "created_at")?,
                    lease_expires_at: millis(row.try_get(4).map_err(map_pg)?, "lease_expires_at")?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_the_raw_storage_id() {
        let k = RecordKey::new("t", "POST /v1/charges", "k");
        let raw = id(&k);
        assert_eq!(raw.len(), 32);
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, k.storage_id());
    }

    #[test]
    fn pool_size_in_the_url_sets_the_pool_and_leaves_the_url() {
        let (url, options) = split_options(
            "postgres://u@h:5432/db?sslmode=require&pool_size=4&application_name=x",
            PostgresOptions::default(),
        )
        .unwrap();
        assert_eq!(options.max_connections, 4);
        assert_eq!(
            url,
            "postgres://u@h:5432/db?sslmode=require&application_name=x"
        );
        let (url, options) =
            split_options("postgres://u@h/db", PostgresOptions::default()).unwrap();
        assert_eq!(
            (url.as_str(), options.max_connections),
            ("postgres://u@h/db", 16)
        );
        for bad in ["0", "x", "-1", "100000"] {
            let err = split_options(
                &format!("postgres://u@h/db?pool_size={bad}"),
                PostgresOptions::default(),
            )
            .unwrap_err();
            assert!(err.to_string().contains("pool_size"), "{bad}: {err}");
        }
    }

    #[test]
    fn durations_in_ms() {
        assert_eq!(ms(Duration::from_secs(2)), 2000);
        assert_eq!(ms(Duration::MAX), i64::MAX);
    }
}
