#![doc = include_str!("../README.md")]

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use idem_core::record::UnixMillis;
use idem_core::store::{RemoteWakeups, StoreErrorKind, Watch};
use idem_core::{
    Admission, Claim, ClaimSpec, FencingToken, Fingerprint, InFlightListing, InFlightRecord, Lease,
    Record, RecordKey, RecordState, Store, StoreError, StoredResponse, TenantCounting,
    TenantLimits, Wakeups,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{ErrorKind, RedisError, Script, ServerErrorKind, Value};

mod eviction;
mod in_flight;
mod scripts;
pub mod tls;

/// The scripts of a new key (claim, complete) and of a replay (a claim that finds the
/// record), as this store sends them: the benchmark kit's floor sends the very same
/// ones. Not a stable interface.
#[doc(hidden)]
pub mod statements {
    /// ARGV: fingerprint, token, lease ms, ttl ms.
    pub fn claim() -> &'static redis::Script {
        &crate::scripts::CLAIM
    }

    /// ARGV: token, encoded response, ttl ms, channel.
    pub fn complete() -> &'static redis::Script {
        &crate::scripts::COMPLETE
    }
}

use crate::tls::RedisTls;

/// Options of a Redis store.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RedisOptions {
    /// Prefix of every key and pub/sub channel. Default `idem:`. Two deployments that
    /// share one Redis keep apart by using two prefixes.
    pub prefix: String,
    /// Longest time one operation may take, connecting included, before it fails with
    /// [`StoreErrorKind::Unavailable`]. Default 2 s.
    pub op_timeout: Duration,
    /// How often a watch re-reads when pub/sub is down (bounded polling). Default 100 ms.
    pub poll_interval: Duration,
    /// Longest a watch waits for a pub/sub message before it lets the caller re-read,
    /// in case a message was lost (pub/sub delivers at most once). Default 1 s.
    pub watch_resync: Duration,
    /// Whether to run on a Redis whose `maxmemory-policy` may evict keys (anything but
    /// `noeviction`). Every idem key carries an expiry, so under memory pressure such a
    /// Redis may drop a claim or a stored outcome, and the request then runs twice. By
    /// default the store refuses to open on one, and [`Store::ping`] (readiness) fails
    /// when the policy turns evicting later; `true` accepts the risk (warned once).
    /// `allow_eviction=true` in the store URL sets it too. Default false.
    pub allow_eviction: bool,
    /// Whether the scripts that change a record `PUBLISH` it and the store keeps a
    /// pub/sub connection to hear of it, for watches (`wait`-mode duplicates). Every
    /// `PUBLISH` is matched against each instance's pattern subscription and delivered
    /// to every instance, a message per completed request for each of them, whether or
    /// not anyone waits. Without it, watches re-read every
    /// [`RedisOptions::poll_interval`] instead. Every instance sharing a prefix should
    /// say the same: a watch on an instance that listens hears of a change made by one
    /// that does not publish only at its next re-read ([`RedisOptions::watch_resync`]).
    /// Default true.
    pub notify: bool,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            prefix: "idem:".into(),
            op_timeout: Duration::from_secs(2),
            poll_interval: Duration::from_millis(100),
            watch_resync: Duration::from_secs(1),
            allow_eviction: false,
            notify: true,
        }
    }
}

impl RedisOptions {
    /// Sets the key and channel prefix.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets the per-operation timeout.
    #[must_use]
    pub fn with_op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// Accepts (`true`) or refuses (the default) a Redis that may evict keys; see
    /// [`RedisOptions::allow_eviction`].
    #[must_use]
    pub fn with_allow_eviction(mut self, allow: bool) -> Self {
        self.allow_eviction = allow;
        self
    }

    /// Turns change notifications (`PUBLISH` and the pub/sub connection) on or off;
    /// see [`RedisOptions::notify`].
    #[must_use]
    pub fn with_notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }
}

/// Where the store connects: one server, or the seed nodes of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Topology {
    /// A standalone server (`redis://host:port/db`).
    Standalone(String),
    /// Seed nodes of a Redis Cluster (`redis://host:port?cluster=true`, or several
    /// comma-separated nodes).
    Cluster(Vec<String>),
}

impl Topology {
    /// Reads a store URL: `redis://host:port/db`, `redis://host:port?cluster=true`, or
    /// `redis://host1:port1,host2:port2,…` (a cluster). Credentials given on the first
    /// node apply to every node. `allow_eviction=true|false` is idem's too (see
    /// [`RedisOptions::allow_eviction`]) and is not passed on.
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        Self::parse_with_eviction(url).map(|(topology, _)| topology)
    }

    /// The topology, and `allow_eviction` when the URL gives it.
    fn parse_with_eviction(url: &str) -> Result<(Self, Option<bool>), StoreError> {
        let bad = |why: &str| {
            StoreError::msg(
                StoreErrorKind::Backend,
                format!("invalid redis url {url:?}: {why}"),
            )
        };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
        if !matches!(scheme, "redis" | "rediss") {
            return Err(bad("the scheme must be redis:// or rediss://"));
        }
        // The path and query follow the last node.
        let tail_at = rest
            .rfind(',')
            .map_or(0, |i| i + 1)
            .max(rest.find('@').map_or(0, |i| i + 1));
        let suffix_at = rest[tail_at..]
            .find(['/', '?'])
            .map_or(rest.len(), |i| tail_at + i);
        let (nodes, suffix) = rest.split_at(suffix_at);
        let (path, query) = suffix.split_once('?').unwrap_or((suffix, ""));
        let (cluster, allow_eviction, query) = idem_settings(query).map_err(|w| bad(&w))?;
        let (userinfo, hosts) = match nodes.rsplit_once('@') {
            Some((u, h)) => (format!("{u}@"), h),
            None => (String::new(), nodes),
        };
        let hosts: Vec<&str> = hosts.split(',').map(str::trim).collect();
        if hosts.iter().any(|h| h.is_empty()) {
            return Err(bad("empty node"));
        }
        if hosts.len() > 1 || cluster {
            if !path.trim_matches('/').is_empty() && path.trim_matches('/') != "0" {
                return Err(bad("Redis Cluster has only database 0"));
            }
            Ok((
                Self::Cluster(
                    hosts
                        .iter()
                        .map(|h| format!("{scheme}://{userinfo}{h}{query}"))
                        .collect(),
                ),
                allow_eviction,
            ))
        } else {
            Ok((
                Self::Standalone(format!("{scheme}://{userinfo}{}{path}{query}", hosts[0])),
                allow_eviction,
            ))
        }
    }
}

/// Takes idem's own settings out of a URL query (`cluster`, `allow_eviction`); returns
/// them and the rest of the query (with its `?`, or empty) for the driver.
fn idem_settings(query: &str) -> Result<(bool, Option<bool>, String), String> {
    let (mut cluster, mut allow_eviction) = (false, None);
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, v) = pair.split_once('=').unwrap_or((pair, ""));
        let flag = match v {
            "true" | "1" | "yes" => Some(true),
            "false" | "0" | "no" => Some(false),
            _ => None,
        };
        match (name, flag) {
            ("cluster", Some(f)) => cluster = f,
            ("allow_eviction", Some(f)) => allow_eviction = Some(f),
            ("cluster" | "allow_eviction", None) => {
                return Err(format!("{name} must be true or false"));
            }
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        String::new()
    } else {
        format!("?{}", kept.join("&"))
    };
    Ok((cluster, allow_eviction, rest))
}

/// The Redis store: standalone or Redis Cluster. Cloning shares the connections.
///
/// One record is one hash at `<prefix>{<storage id>}`: the braces are a Cluster hash
/// tag, so every key of a record lives in one slot. Every state change is one Lua
/// script (sent with `EVALSHA`, loaded on `NOSCRIPT`), judged by Redis's own clock
/// (`TIME`), so instances with skewed clocks agree. Records carry a native expiry
/// (`PEXPIREAT`): Redis removes them itself, and [`Store::purge_expired`] is a no-op
/// that returns 0.
///
/// Wake-ups: the scripts that complete, release, delete or take over a record
/// `PUBLISH` on `<prefix>ch:<storage id>`. Each store keeps one pub/sub connection,
/// pattern-subscribed to `<prefix>ch:*`, and fans messages out in process. While that
/// connection is down (it reconnects by itself), watches fall back to polling every
/// [`RedisOptions::poll_interval`].
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("topology", &self.inner.topology)
            .field("prefix", &self.inner.options.prefix)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
enum Conn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

struct Inner {
    /// The connection opened at start: used by runtimes without one of their own yet.
    conn: Conn,
    /// One command connection per runtime that runs operations (each worker of the
    /// sidecar), opened and driven on that runtime, so that a command and its answer
    /// stay on the thread of the request that sent it instead of waking another
    /// runtime twice. At most [`RUNTIME_CONNECTIONS`]. (The PostgreSQL store keeps a
    /// pool per runtime for the same reason.)
    local: RuntimeConns,
    tls: RedisTls,
    topology: Topology,
    options: RedisOptions,
    wakeups: Arc<RemoteWakeups>,
    /// The pub/sub listener, when notifications are on.
    listener: Option<tokio::task::JoinHandle<()>>,
    /// Where the eviction check found the server, for messages: `host:port` of a
    /// standalone server, without credentials.
    address: String,
    warned: eviction::Warned,
    /// Claims not yet written to the in-flight index (see [`in_flight`]).
    unindexed: in_flight::Unindexed,
    indexer: std::sync::OnceLock<tokio::task::JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(listener) = &self.listener {
            listener.abort();
        }
        if let Some(indexer) = self.indexer.get() {
            indexer.abort();
        }
    }
}

/// At most this many runtimes get a command connection of their own; others share
/// the first connection.
const RUNTIME_CONNECTIONS: usize = 16;

/// A tokio runtime, or none (a caller outside any).
type RuntimeId = Option<tokio::runtime::Id>;

/// The command connections of the runtimes that have one, and the runtimes whose own
/// is being opened.
#[derive(Default)]
struct RuntimeConns {
    open: std::sync::RwLock<Vec<(RuntimeId, Conn)>>,
    opening: std::sync::Mutex<Vec<RuntimeId>>,
}

/// The runtime the caller runs on.
fn current_runtime() -> RuntimeId {
    tokio::runtime::Handle::try_current().ok().map(|h| h.id())
}

/// Maps a Redis error to a store error kind, keeping it as the source.
fn map_err(e: RedisError) -> StoreError {
    let kind = if e.is_io_error()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.is_timeout()
        || matches!(
            e.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                )
        ) {
        StoreErrorKind::Unavailable
    } else if matches!(e.kind(), ErrorKind::Parse | ErrorKind::UnexpectedReturnType) {
        StoreErrorKind::Corrupt
    } else {
        StoreErrorKind::Backend
    };
    StoreError::new(kind, "redis", e)
}

fn corrupt(what: &str) -> StoreError {
    StoreError::msg(
        StoreErrorKind::Corrupt,
        format!("corrupt redis record: {what}"),
    )
}

/// The command connection to `topology`, within `t` (a connection manager that
/// reconnects by itself, or a cluster connection).
async fn open_connection(
    topology: &Topology,
    tls: &RedisTls,
    t: Duration,
) -> Result<Conn, StoreError> {
    let connect = async {
        match topology {
            Topology::Standalone(u) => {
                let client = tls.client(u).map_err(map_err)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(t))
                    .set_response_timeout(Some(t))
                    .set_number_of_retries(3)
                    .set_max_delay(Duration::from_millis(500));
                let manager = ConnectionManager::new_with_config(client, config)
                    .await
                    .map_err(map_err)?;
                Ok::<_, StoreError>(Conn::Standalone(manager))
            }
            Topology::Cluster(nodes) => {
                let client = tls
                    .cluster_builder(nodes.clone())
                    .connection_timeout(t)
                    .response_timeout(t)
                    .retries(2)
                    .build()
                    .map_err(map_err)?;
                let conn = client.get_async_connection().await.map_err(map_err)?;
                Ok(Conn::Cluster(conn))
            }
        }
    };
    tokio::time::timeout(t, connect)
        .await
        .map_err(|_| StoreError::msg(StoreErrorKind::Unavailable, "redis connect timed out"))?
}

/// Starts the task that turns the change messages of this store's prefix into
/// wake-ups of `wakeups`.
fn spawn_listener(
    topology: &Topology,
    tls: RedisTls,
    options: &RedisOptions,
    wakeups: &Arc<RemoteWakeups>,
) -> tokio::task::JoinHandle<()> {
    let pubsub_urls = match topology {
        Topology::Standalone(u) => vec![u.clone()],
        // Classic PUBLISH reaches every node of a cluster: one node is enough.
        Topology::Cluster(nodes) => nodes.clone(),
    };
    tokio::spawn(listen(
        pubsub_urls,
        tls,
        format!("{}ch:*", options.prefix),
        format!("{}ch:", options.prefix),
        Arc::downgrade(wakeups),
        options.op_timeout,
    ))
}

impl RedisStore {
    /// Connects with default options. See [`Topology::parse`] for the URL forms.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, RedisOptions::default()).await
    }

    /// Connects with options. Fails with [`StoreErrorKind::Unavailable`] when the server
    /// cannot be reached within [`RedisOptions::op_timeout`], and with
    /// [`StoreErrorKind::Backend`] when it may evict keys and that is not allowed
    /// ([`RedisOptions::allow_eviction`], or `allow_eviction=true` in `url`).
    /// TLS: `rediss://`, with `sslrootcert`, `sslcert`, `sslkey` (see [`tls`]).
    pub async fn connect_with(url: &str, mut options: RedisOptions) -> Result<Self, StoreError> {
        let (url, tls) = RedisTls::split_url(url)?;
        let (topology, allow_eviction) = Topology::parse_with_eviction(&url)?;
        options.allow_eviction = allow_eviction.unwrap_or(options.allow_eviction);
        let conn = open_connection(&topology, &tls, options.op_timeout).await?;
        let wakeups = Arc::new(RemoteWakeups::default());
        let listener = options
            .notify
            .then(|| spawn_listener(&topology, tls.clone(), &options, &wakeups));
        let store = RedisStore {
            inner: Arc::new(Inner {
                conn,
                local: RuntimeConns::default(),
                tls,
                address: host_port(&topology),
                topology,
                options,
                wakeups,
                listener,
                warned: eviction::Warned::default(),
                unindexed: Default::default(),
                indexer: Default::default(),
            }),
        };
        let indexer = tokio::spawn(in_flight::index_late_claims(Arc::downgrade(&store.inner)));
        let _ = store.inner.indexer.set(indexer);
        store.ping().await?;
        Ok(store)
    }

    /// Where this store connects.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// The record's key, and the channel its changes are published on: empty when
    /// notifications are off, which the scripts read as "do not publish".
    fn key(&self, key: &RecordKey) -> (String, String) {
        let id = key.storage_id();
        let o = &self.inner.options;
        let p = &o.prefix;
        let channel = if o.notify {
            format!("{p}ch:{id}")
        } else {
            String::new()
        };
        (format!("{p}{{{id}}}"), channel)
    }

    /// RELEASE's keys and arguments for one `release` call, named by `call` (fresh per
    /// call, repeated by a re-send of it). The tombstone key is the token's, in the record's
    /// Cluster slot (`{id}`), so a later claim and release of the key by another token
    /// neither touches nor overwrites it.
    fn release_invocation(
        &self,
        key: &RecordKey,
        token: FencingToken,
        call: FencingToken,
    ) -> ([String; 2], [Vec<u8>; 4]) {
        let (k, ch) = self.key(key);
        let tombstone = format!("{k}:released:{token}");
        let args = [
            token.to_string().into_bytes(),
            ch.into_bytes(),
            ms(self.tombstone_life()),
            call.to_string().into_bytes(),
        ];
        ([k, tombstone], args)
    }

    /// How long a release's tombstone lives. A re-sent release whose answer anyone
    /// reads runs within one op timeout of the first (the call gives up after that), so
    /// four of them cover it with room to spare, and tombstones of a release-heavy load
    /// are gone in seconds, not held for a fixed minute.
    fn tombstone_life(&self) -> Duration {
        self.inner.options.op_timeout * 4
    }

    /// The sorted sets counting a tenant's records in flight and live records
    /// ([`TenantCounting::admit`]); `{tenant}` puts both in one Cluster slot.
    fn tenant_keys(&self, key: &RecordKey) -> [String; 2] {
        let p = &self.inner.options.prefix;
        let t = &key.tenant;
        [
            format!("{p}tenant:{{{t}}}:f"),
            format!("{p}tenant:{{{t}}}:r"),
        ]
    }

    /// Runs one operation with the store's timeout.
    async fn timed<T>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.inner.options.op_timeout, fut)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::msg(
                    StoreErrorKind::Unavailable,
                    "redis operation timed out",
                ))
            })
    }

    /// The calling runtime's command connection. A runtime without one yet uses the
    /// first connection while its own is opened in the background (on that runtime, so
    /// the connection's task runs there).
    fn conn(&self) -> Conn {
        let me = current_runtime();
        let local = &self.inner.local;
        let room = {
            let open = read_lock(&local.open);
            if let Some((_, conn)) = open.iter().find(|(r, _)| *r == me) {
                return conn.clone();
            }
            open.len() < RUNTIME_CONNECTIONS
        };
        let mut opening = local.opening.lock().unwrap_or_else(|e| e.into_inner());
        if room && !opening.contains(&me) {
            opening.push(me);
            tokio::spawn(open_for_runtime(Arc::downgrade(&self.inner), me));
        }
        self.inner.conn.clone()
    }

    /// Runs one plain command with the store's timeout.
    async fn command(&self, cmd: &redis::Cmd) -> Result<Value, StoreError> {
        self.timed(async {
            let r = match self.conn() {
                Conn::Standalone(mut c) => cmd.query_async::<Value>(&mut c).await,
                Conn::Cluster(mut c) => cmd.query_async::<Value>(&mut c).await,
            };
            r.map_err(map_err)
        })
        .await
    }

    async fn eval(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<Value, StoreError> {
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(*k);
        }
        for a in args {
            inv.arg(*a);
        }
        self.timed(async {
            let r = match self.conn() {
                Conn::Standalone(mut c) => inv.invoke_async::<Value>(&mut c).await,
                Conn::Cluster(mut c) => inv.invoke_async::<Value>(&mut c).await,
            };
            r.map_err(map_err)
        })
        .await
    }
}

fn read_lock<T>(lock: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

/// Opens the command connection of `runtime` (this task runs on it). On failure the
/// runtime goes on sharing the first connection, and tries again at its next
/// operation.
async fn open_for_runtime(store: std::sync::Weak<Inner>, runtime: RuntimeId) {
    let Some(inner) = store.upgrade() else { return };
    let opened = open_connection(&inner.topology, &inner.tls, inner.options.op_timeout).await;
    match opened {
        Ok(conn) => {
            let mut open = inner.local.open.write().unwrap_or_else(|e| e.into_inner());
            open.push((runtime, conn));
        }
        Err(e) => {
            tracing::debug!(error = %e, "redis: a worker's own connection could not be opened; it shares the first")
        }
    }
    let mut opening = inner
        .local
        .opening
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    opening.retain(|r| *r != runtime);
}

/// `host:port` of a standalone server (no credentials, for messages), or the seed
/// nodes of a cluster (whose replies name each node).
fn host_port(topology: &Topology) -> String {
    let strip = |url: &str| {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
        rest.split(['/', '?']).next().unwrap_or(rest).to_owned()
    };
    match topology {
        Topology::Standalone(u) => strip(u),
        Topology::Cluster(nodes) => nodes.iter().map(|n| strip(n)).collect::<Vec<_>>().join(","),
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn millis(v: &Value, what: &str) -> Result<UnixMillis, StoreError> {
    int(v)
        .and_then(|i| u64::try_from(i).ok())
        .ok_or_else(|| corrupt(what))
}

/// Reads the `[fingerprint, token, lease, response, created, expires]` array the
/// scripts return.
fn record(fields: &[Value]) -> Result<Record, StoreError> {
    let [f, t, l, r, c, e] = fields else {
        return Err(corrupt("wrong field count"));
    };
    let fingerprint = bytes(f)
        .and_then(|b| std::str::from_utf8(b).ok())
        .and_then(Fingerprint::decode)
        .ok_or_else(|| corrupt("fingerprint"))?;
    let state = match (bytes(t), bytes(r)) {
        (_, Some(resp)) => RecordState::Completed(
            StoredResponse::decode(resp)
                .map_err(|e| StoreError::new(StoreErrorKind::Corrupt, "redis record", e))?,
        ),
        (Some(tok), None) => RecordState::InFlight {
            token: std::str::from_utf8(tok)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| corrupt("token"))?,
            lease_expires_at: millis(l, "lease")?,
        },
        (None, None) => return Err(corrupt("neither token nor response")),
    };
    Ok(Record {
        fingerprint,
        state,
        created_at: millis(c, "created_at")?,
        expires_at: millis(e, "expires_at")?,
    })
}

fn ms(d: Duration) -> Vec<u8> {
    // At least 1 ms: PEXPIREAT and the lease arithmetic need a positive span.
    (d.as_millis().clamp(1, i64::MAX as u128) as i64)
        .to_string()
        .into_bytes()
}

fn flag(v: &Value) -> Result<bool, StoreError> {
    int(v).map(|i| i == 1).ok_or_else(|| corrupt("reply"))
}

impl Store for RedisStore {
    async fn claim(&self, key: &RecordKey, spec: ClaimSpec<'_>) -> Result<Claim, StoreError> {
        let (k, _) = self.key(key);
        let token = FencingToken::random();
        let reply = self
            .eval(
                &scripts::CLAIM,
                &[&k],
                &[
                    spec.fingerprint.encode().as_bytes(),
                    token.to_string().as_bytes(),
                    &ms(spec.lease),
                    &ms(spec.ttl),
                ],
            )
            .await?;
        let Value::Array(items) = reply else {
            return Err(corrupt("claim reply"));
        };
        match items.split_first() {
            Some((Value::Int(1), [lease])) => {
                let expires_at = millis(lease, "lease")?;
                // The script's `now`: the lease ends `lease` after it.
                let claimed_at = expires_at.saturating_sub(spec.lease.as_millis() as u64);
                self.index_claim(key, token, claimed_at);
                Ok(Claim::Acquired(Lease { token, expires_at }))
            }
            Some((Value::Int(0), fields)) => Ok(Claim::Existing(record(fields)?)),
            _ => Err(corrupt("claim reply")),
        }
    }

    async fn reclaim(
        &self,
        key: &RecordKey,
        stale: FencingToken,
        spec: ClaimSpec<'_>,
    ) -> Result<Option<Lease>, StoreError> {
        let (k, ch) = self.key(key);
        let token = FencingToken::random();
        let reply = self
            .eval(
                &scripts::RECLAIM,
                &[&k],
                &[
                    stale.to_string().as_bytes(),
                    token.to_string().as_bytes(),
                    spec.fingerprint.encode().as_bytes(),
                    &ms(spec.lease),
                    &ms(spec.ttl),
                    ch.as_bytes(),
                ],
            )
            .await?;
        match reply {
            Value::Nil => Ok(None),
            v => {
                let expires_at = millis(&v, "lease")?;
                // Scored by the takeover; the listing reports the original claim time.
                let at = expires_at.saturating_sub(spec.lease.as_millis() as u64);
                self.index_claim(key, token, at);
                self.unindex_claim(key, stale);
                Ok(Some(Lease { token, expires_at }))
            }
        }
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: FencingToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let (k, ch) = self.key(key);
        let reply = self
            .eval(
                &scripts::COMPLETE,
                &[&k],
                &[
                    token.to_string().as_bytes(),
                    &response.encode(),
                    &ms(ttl),
                    ch.as_bytes(),
                ],
            )
            .await?;
        let stored = flag(&reply)?;
        if stored {
            self.unindex_claim(key, token);
        }
        Ok(stored)
    }

    async fn release(&self, key: &RecordKey, token: FencingToken) -> Result<bool, StoreError> {
        // 128 random bits name this call, so that only a re-send of it finds its tombstone.
        let call = FencingToken::random();
        let ([k, tombstone], args) = self.release_invocation(key, token, call);
        let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        let reply = self
            .eval(&scripts::RELEASE, &[&k, &tombstone], &args)
            .await?;
        let released = flag(&reply)?;
        if released {
            self.unindex_claim(key, token);
        }
        Ok(released)
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let (k, _) = self.key(key);
        let reply = self
            .eval(
                &scripts::RENEW,
                &[&k],
                &[token.to_string().as_bytes(), &ms(lease)],
            )
            .await?;
        flag(&reply)
    }

    async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        let (k, _) = self.key(key);
        match self.eval(&scripts::GET, &[&k], &[]).await? {
            Value::Nil => Ok(None),
            Value::Array(fields) => record(&fields).map(Some),
            _ => Err(corrupt("get reply")),
        }
    }

    async fn delete(&self, key: &RecordKey) -> Result<bool, StoreError> {
        let (k, ch) = self.key(key);
        let reply = self.eval(&scripts::DELETE, &[&k], &[ch.as_bytes()]).await?;
        flag(&reply)
    }

    /// A no-op: every record carries a native Redis expiry (`PEXPIREAT`), so Redis
    /// removes expired records itself. Always returns 0.
    async fn purge_expired(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// Ready when Redis answers and cannot evict idem's records (unless that is
    /// allowed): see [`RedisOptions::allow_eviction`].
    async fn ping(&self) -> Result<(), StoreError> {
        self.timed(async {
            let cmd = redis::cmd("PING");
            let r: Result<String, RedisError> = match self.inner.conn.clone() {
                Conn::Standalone(mut c) => cmd.query_async(&mut c).await,
                Conn::Cluster(mut c) => cmd.query_async(&mut c).await,
            };
            r.map_err(map_err)?;
            let i = &self.inner;
            eviction::check(&i.conn, &i.address, i.options.allow_eviction, &i.warned).await
        })
        .await
    }
}

impl TenantCounting for RedisStore {
    async fn admit(
        &self,
        key: &RecordKey,
        limits: TenantLimits,
        lease: Duration,
        ttl: Duration,
    ) -> Result<Admission, StoreError> {
        let [f, r] = self.tenant_keys(key);
        let cap = |c: Option<u64>| c.map(|n| n.to_string()).unwrap_or_default();
        let reply = self
            .eval(
                &scripts::ADMIT,
                &[&f, &r],
                &[
                    key.storage_id().as_bytes(),
                    &ms(lease),
                    &ms(ttl),
                    cap(limits.max_in_flight).as_bytes(),
                    cap(limits.max_records).as_bytes(),
                ],
            )
            .await?;
        match int(&reply) {
            Some(0) => Ok(Admission::Admitted),
            Some(1) => Ok(Admission::InFlightFull),
            Some(2) => Ok(Admission::RecordsFull),
            _ => Err(corrupt("admit reply")),
        }
    }

    async fn settle(&self, key: &RecordKey, kept: Option<Duration>) -> Result<(), StoreError> {
        let [f, r] = self.tenant_keys(key);
        let kept = kept.map(ms).unwrap_or_default();
        self.eval(
            &scripts::SETTLE,
            &[&f, &r],
            &[key.storage_id().as_bytes(), &kept],
        )
        .await
        .map(drop)
    }
}

impl Wakeups for RedisStore {
    async fn watch(&self, key: &RecordKey) -> Result<Watch, StoreError> {
        let o = &self.inner.options;
        Ok(self
            .inner
            .wakeups
            .watch(key, o.poll_interval, o.watch_resync))
    }
}

impl InFlightListing for RedisStore {
    async fn list_in_flight(&self, limit: usize) -> Result<Vec<InFlightRecord>, StoreError> {
        self.list(limit).await
    }
}

/// Keeps one pattern subscription alive, reconnecting with backoff, and wakes local
/// watchers. Ends when the store is dropped.
async fn listen(
    urls: Vec<String>,
    tls: RedisTls,
    pattern: String,
    channel_prefix: String,
    wakeups: std::sync::Weak<RemoteWakeups>,
    timeout: Duration,
) {
    let mut backoff = Duration::from_millis(50);
    let mut next = 0usize;
    loop {
        let url = &urls[next % urls.len()];
        next += 1;
        let subscribed = tokio::time::timeout(timeout, async {
            let client = tls.client(url)?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.psubscribe(&pattern).await?;
            Ok::<_, RedisError>(pubsub)
        })
        .await;
        match subscribed {
            Ok(Ok(pubsub)) => {
                let Some(w) = wakeups.upgrade() else { return };
                w.connected();
                drop(w);
                backoff = Duration::from_millis(50);
                let mut messages = pubsub.into_on_message();
                while let Some(msg) = messages.next().await {
                    let Some(w) = wakeups.upgrade() else { return };
                    if let Some(id) = msg.get_channel_name().strip_prefix(&channel_prefix) {
                        w.changed(id);
                    }
                }
                tracing::warn!(
                    url,
                    "redis pub/sub connection lost; watches poll until it is back"
                );
            }
            Ok(Err(e)) => tracing::debug!(url, error = %e, "redis pub/sub connect failed"),
            Err(_) => tracing::debug!(url, "redis pub/sub connect timed out"),
        }
        let Some(w) = wakeups.upgrade() else { return };
        w.disconnected();
        drop(w);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn has_own(store: &RedisStore, runtime: RuntimeId) -> bool {
        read_lock(&store.inner.local.open)
            .iter()
            .any(|(r, _)| *r == runtime)
    }

    /// A store opened on one runtime and used from a worker thread with a runtime of
    /// its own (as the sidecar's): the worker shares the first connection, then gets
    /// one of its own, opened on its runtime, and keeps working through it.
    #[test]
    fn a_worker_thread_gets_its_own_connection() {
        let url = std::env::var("IDEM_REDIS_URL").unwrap_or("redis://127.0.0.1:6379".into());
        // The runtime that opens the store runs on (as the sidecar's main runtime).
        let main = tokio::runtime::Runtime::new().unwrap();
        let Ok(store) = main.block_on(RedisStore::connect(&url)) else {
            idem_conformance::skip("a_worker_thread_gets_its_own_connection");
            return;
        };
        let worker = store.clone();
        std::thread::spawn(move || {
            current_thread().block_on(async {
                let me = current_runtime();
                let key = RecordKey::new("t-threads", "r", "k");
                let mut operations = 0;
                while !has_own(&worker, me) && operations < 400 {
                    worker.get(&key).await.unwrap();
                    operations += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                assert!(
                    has_own(&worker, me),
                    "no connection of its own after {operations} operations"
                );
                assert_eq!(worker.get(&key).await.unwrap(), None);
            })
        })
        .join()
        .unwrap();
        assert_eq!(
            read_lock(&store.inner.local.open).len(),
            1,
            "only the worker opened one"
        );
    }

    /// The change messages a claim and a complete of a new record publish under
    /// `prefix`, heard by a pattern subscription of its own for 300 ms.
    async fn published(url: &str, store: &RedisStore, prefix: &str) -> usize {
        let mut pubsub = redis::Client::open(url)
            .unwrap()
            .get_async_pubsub()
            .await
            .unwrap();
        pubsub.psubscribe(format!("{prefix}ch:*")).await.unwrap();
        let (key, fp) = (
            idem_conformance::fresh_key(prefix),
            idem_conformance::fp("notify"),
        );
        let spec = idem_conformance::spec(&fp, 5_000, 60_000);
        let Claim::Acquired(lease) = store.claim(&key, spec).await.unwrap() else {
            panic!("a new key is acquired");
        };
        let response = idem_conformance::bench::response();
        let stored = store.complete(&key, lease.token, &response, Duration::from_secs(60));
        assert!(stored.await.unwrap());
        let mut messages = pubsub.into_on_message();
        let mut heard = 0;
        while let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_millis(300), messages.next()).await
        {
            heard += 1;
        }
        heard
    }

    /// Notifications on (the default), a completed record is published for watchers;
    /// off (the sidecar with no route that waits), nothing is: no message for every
    /// instance to receive per request.
    #[tokio::test]
    async fn a_completion_is_published_only_with_notifications_on() {
        let url = std::env::var("IDEM_REDIS_URL").unwrap_or("redis://127.0.0.1:6379".into());
        let run = FencingToken::random();
        let (on, off) = (format!("idem-on-{run}:"), format!("idem-off-{run}:"));
        let notifying = RedisOptions::default().with_prefix(&on);
        let Ok(store) = RedisStore::connect_with(&url, notifying).await else {
            idem_conformance::skip("a_completion_is_published_only_with_notifications_on");
            return;
        };
        assert_eq!(
            published(&url, &store, &on).await,
            1,
            "the complete's message"
        );
        let quiet = RedisOptions::default().with_prefix(&off).with_notify(false);
        let store = RedisStore::connect_with(&url, quiet).await.unwrap();
        assert_eq!(published(&url, &store, &off).await, 0);
        assert!(store.inner.listener.is_none(), "no pub/sub connection");
    }

    #[test]
    fn urls() {
        assert_eq!(
            Topology::parse("redis://127.0.0.1:6379/2").unwrap(),
            Topology::Standalone("redis://127.0.0.1:6379/2".into())
        );
        assert_eq!(
            Topology::parse("redis://127.0.0.1:7000?cluster=true").unwrap(),
            Topology::Cluster(vec!["redis://127.0.0.1:7000".into()])
        );
        assert_eq!(
            Topology::parse("redis://u:p@a:7000,b:7001,c:7002").unwrap(),
            Topology::Cluster(vec![
                "redis://u:p@a:7000".into(),
                "redis://u:p@b:7001".into(),
                "redis://u:p@c:7002".into()
            ])
        );
        assert_eq!(
            Topology::parse("redis://a:1?cluster=false&protocol=resp3").unwrap(),
            Topology::Standalone("redis://a:1?protocol=resp3".into())
        );
        assert!(Topology::parse("http://a:1").is_err());
        assert!(Topology::parse("redis://a:1,,b:2").is_err());
        assert!(Topology::parse("redis://a:1,b:2/3").is_err());
        assert!(Topology::parse("redis://a:1?cluster=maybe").is_err());
        assert_eq!(
            Topology::parse_with_eviction("redis://a:1?allow_eviction=true&protocol=resp3")
                .unwrap(),
            (
                Topology::Standalone("redis://a:1?protocol=resp3".into()),
                Some(true)
            )
        );
        assert_eq!(
            Topology::parse_with_eviction("redis://a:1,b:2").unwrap().1,
            None
        );
        let err = Topology::parse("redis://a:1?allow_eviction=maybe").unwrap_err();
        assert!(
            err.to_string()
                .contains("allow_eviction must be true or false")
        );
    }

    #[test]
    fn io_errors_are_unavailable_and_parse_errors_corrupt() {
        let refused: RedisError =
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into();
        assert_eq!(map_err(refused).kind(), StoreErrorKind::Unavailable);
        let pipe: RedisError = std::io::Error::from(std::io::ErrorKind::BrokenPipe).into();
        assert!(map_err(pipe).is_retryable());
        let parse: RedisError = (ErrorKind::UnexpectedReturnType, "bad").into();
        assert_eq!(map_err(parse).kind(), StoreErrorKind::Corrupt);
        assert!(
            std::error::Error::source(&map_err(
                std::io::Error::from(std::io::ErrorKind::TimedOut).into()
            ))
            .is_some()
        );
    }
}
