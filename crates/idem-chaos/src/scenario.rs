//! One run: a store, `idem` instances in front of the recording upstream, clients
//! under load, one kind of fault injected every few seconds, then a final verification
//! that every completed record still replays, and the checker's verdict.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::client::{Clients, OpEnd};
use crate::history::{self, AttemptResult, Findings, History, OpKey};
use crate::procs::{
    Idem, IdemSpec, PrivatePostgres, PrivateRedis, PrivateStore, free_port, reachable,
};
use crate::upstream::{Upstream, UpstreamFaults};

/// The shared Redis of the test environment.
pub const SHARED_REDIS: &str = "redis://127.0.0.1:6379/0";
/// The shared PostgreSQL of the test environment.
pub const SHARED_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";
const TENANT_SECRET: &str = "chaos-suite-tenant-secret-0123456789";

/// Which store the `idem` instances use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// `sqlite:PATH`, one instance (SQLite is single-host).
    Sqlite,
    /// Redis: three instances sharing it.
    Redis,
    /// Redis without any persistence (like the shared test server), for the store
    /// restart fault: shows what a restart of such a server costs.
    RedisVolatile,
    /// PostgreSQL: three instances sharing it.
    Postgres,
}

impl StoreKind {
    /// Its name in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Redis => "redis",
            StoreKind::RedisVolatile => "redis-volatile",
            StoreKind::Postgres => "postgres",
        }
    }
}

/// The fault a run injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// SIGKILL of one `idem` instance every few seconds, restarted on its port.
    Kill,
    /// The store crashed and restarted, or (Redis) paused with SIGSTOP, for seconds.
    StoreRestart,
    /// The upstream slow, failing (500), refusing (503) and closing connections after
    /// executing.
    Upstream,
    /// SIGTERM of one `idem` instance under load; it must answer everything it accepted
    /// and exit 0; then it is restarted.
    Sigterm,
    /// SIGTERM while clients hang up mid-request: the executions of the callers that
    /// left must be stored before the instance exits, so that no retry runs again.
    SigtermHangup,
    /// Executions longer than a short retention (`ttl` as short as the lease allows,
    /// the slowest answers twice as long): a record must not expire while its lease is
    /// alive.
    LongExecution,
}

impl FaultKind {
    /// Its name in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill -9 idem",
            FaultKind::StoreRestart => "store crash/pause",
            FaultKind::Upstream => "upstream faults",
            FaultKind::Sigterm => "SIGTERM idem",
            FaultKind::SigtermHangup => "SIGTERM idem, callers hang up",
            FaultKind::LongExecution => "executions longer than the ttl",
        }
    }

    /// A clean shutdown: every execution ends stored or released, so nothing runs again
    /// after a lease either.
    fn is_clean_shutdown(self) -> bool {
        matches!(self, FaultKind::Sigterm | FaultKind::SigtermHangup)
    }

    /// Records outlive the run: every one a client saw stored must replay afterwards.
    /// (Not with a retention shorter than the run's tail.)
    pub fn records_outlive_the_run(self) -> bool {
        self != FaultKind::LongExecution
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Which store the `idem` instances share.
    pub store: StoreKind,
    /// The kind of fault injected during the load.
    pub fault: FaultKind,
    /// How long the load runs.
    pub duration: Duration,
    /// Concurrent clients (each also sends a concurrent duplicate of a quarter of its
    /// operations).
    pub clients: usize,
    /// Time between two faults.
    pub fault_every: Duration,
    /// The lease idem gives an execution.
    pub lease: Duration,
    /// Most operations the load starts.
    pub max_ops: usize,
}

impl Scenario {
    /// A run with the suite's defaults.
    pub fn new(store: StoreKind, fault: FaultKind, duration: Duration) -> Self {
        Scenario {
            store,
            fault,
            duration,
            clients: 12,
            fault_every: Duration::from_millis(2500),
            lease: Duration::from_secs(2),
            max_ops: 200_000,
        }
    }

    fn instances(&self) -> usize {
        if self.store == StoreKind::Sqlite {
            1
        } else {
            3
        }
    }

    /// Whether lost records are the documented consequence of the configuration, not a
    /// defect (a Redis without persistence that crashes).
    pub fn loss_expected(&self) -> bool {
        self.store == StoreKind::RedisVolatile
    }

    /// The retention idem gives a record: as short as the lease (the shortest idem
    /// accepts), below the slowest answers, when the fault is long executions.
    fn ttl(&self) -> Duration {
        if self.fault == FaultKind::LongExecution {
            self.lease
        } else {
            Duration::from_secs(3600)
        }
    }

    /// What the upstream does besides the fault.
    fn upstream_faults(&self) -> UpstreamFaults {
        match self.fault {
            FaultKind::Upstream => UpstreamFaults::mix(self.lease),
            // Half the answers slow, up to twice the retention (renewals keep them).
            FaultKind::LongExecution => UpstreamFaults {
                slow: 0.5,
                slow_max: self.lease * 2,
                ..UpstreamFaults::none()
            },
            // Some slow answers, so that kills and signals find requests in flight.
            _ => UpstreamFaults {
                slow: 0.25,
                slow_max: Duration::from_millis(800),
                ..UpstreamFaults::none()
            },
        }
    }
}

/// The figures of one run.
#[derive(Clone, Debug)]
pub struct Report {
    /// Store name.
    pub store: &'static str,
    /// Fault name.
    pub fault: &'static str,
    /// `idem` instances.
    pub instances: usize,
    /// Seconds of load.
    pub seconds: f64,
    /// Operations started (concurrent duplicates not counted).
    pub operations: usize,
    /// Operations that got a final answer.
    pub answered: usize,
    /// Operations whose client gave up within its bounds.
    pub gave_up: usize,
    /// Process or store faults injected.
    pub faults: usize,
    /// Upstream faults injected (slow, 500, 503, closed after executing).
    pub upstream_faults: u64,
    /// SIGTERMed instances that did not exit 0 within the grace period.
    pub unclean_exits: Vec<String>,
    /// Completed records checked by the final verification.
    pub verified: usize,
    /// The checker's findings.
    pub findings: Findings,
    /// Lost records are the documented consequence of the configuration.
    pub loss_expected: bool,
    /// The fault is a clean shutdown: nothing may run again, even after a lease.
    pub clean_shutdown: bool,
}

impl Report {
    /// No violation (or only the documented loss of a store without persistence).
    pub fn ok(&self) -> bool {
        let f = &self.findings;
        let sigterm_clean = !self.clean_shutdown
            || (self.unclean_exits.is_empty() && f.reexecutions_after_lease == 0);
        let answered = self.fault != FaultKind::Sigterm.name() || f.unanswered_executed.is_empty();
        sigterm_clean && answered && f.leaks.is_empty() && (self.loss_expected || f.clean())
    }

    /// The header of [`Report::row`].
    pub fn table_header() -> &'static str {
        "| store | fault | idem instances | seconds | operations (answered / gave up) | attempts | executions | faults injected | re-executions after a lease | duplicates | replay mismatches | cross-tenant | records lost (of verified) | executed, unanswered |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    }

    /// One markdown table row.
    pub fn row(&self) -> String {
        let f = &self.findings;
        let faults = if self.upstream_faults > 0 && self.faults > 0 {
            format!("{} + {} upstream", self.faults, self.upstream_faults)
        } else if self.upstream_faults > 0 {
            format!("{} upstream", self.upstream_faults)
        } else {
            self.faults.to_string()
        };
        format!(
            "| {} | {} | {} | {:.0} | {} ({} / {}) | {} | {} | {} | {} | {} | {} | {} | {} (of {}){} | {} |",
            self.store,
            self.fault,
            self.instances,
            self.seconds,
            self.operations,
            self.answered,
            self.gave_up,
            f.attempts,
            f.executions,
            faults,
            f.reexecutions_after_lease,
            f.duplicates.len(),
            f.replay_mismatches.len(),
            f.leaks.len(),
            f.lost.len(),
            self.verified,
            if self.loss_expected { " expected" } else { "" },
            f.unanswered_executed.len(),
        )
    }

    /// The first few violations, for a failure message.
    pub fn details(&self) -> String {
        let f = &self.findings;
        let mut out = Vec::new();
        for (what, list) in [
            ("duplicate", &f.duplicates),
            ("replay mismatch", &f.replay_mismatches),
            ("cross-tenant", &f.leaks),
            ("lost", &f.lost),
            ("executed, unanswered", &f.unanswered_executed),
            ("unclean exit", &self.unclean_exits),
        ] {
            for d in list.iter().take(5) {
                out.push(format!("{what}: {d}"));
            }
        }
        out.join("\n")
    }
}

/// A run's result.
#[derive(Debug)]
pub enum Outcome {
    /// The backend is not available here; the reason.
    Skipped(String),
    /// It ran.
    Ran(Box<Report>),
}

fn write_config(dir: &Path, upstream: &str, store: &str, s: &Scenario) -> PathBuf {
    let path = dir.join("idem.toml");
    let text = format!(
        "upstream = \"http://{upstream}\"\nstore = \"{store}\"\n\
         [proxy]\nresponse_timeout = \"10s\"\ngrace_period = \"20s\"\n\
         [defaults]\nkey = \"required\"\nlease = \"{}ms\"\nttl = \"{}ms\"\n",
        s.lease.as_millis(),
        s.ttl().as_millis()
    );
    std::fs::write(&path, text).expect("write idem.toml");
    path
}

/// Runs a scenario with the `idem` binary `bin`.
pub async fn run(s: &Scenario, bin: &Path) -> Result<Outcome, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (store_url, mut private) = match prepare_store(s, dir.path()).await? {
        Ok(store) => store,
        Err(reason) => return Ok(Outcome::Skipped(reason)),
    };
    let history = History::new();
    let upstream = Upstream::start(history.clone(), s.upstream_faults())
        .await
        .map_err(|e| format!("upstream: {e}"))?;
    let spec = idem_spec(s, bin, dir.path(), &upstream.addr.to_string(), &store_url);
    let mut idems = start_instances(&spec, s.instances()).await?;
    let addrs: Vec<_> = idems.iter().map(|i| i.addr).collect();
    let clients = clients_for(s, &history, addrs);

    let started = Instant::now();
    let deadline = started + s.duration;
    let ops: Ops = Arc::default();
    let load = start_load(s, &clients, &ops, deadline);
    let faults = inject_faults(s, &spec, &mut idems, private.as_deref_mut(), deadline).await?;
    let (answered, gave_up) = join_load(load).await?;
    let seconds = started.elapsed().as_secs_f64();

    // Healed: every instance and the store up, the upstream well-behaved. Every record
    // a client saw stored must still replay, byte for byte.
    upstream.set_faults(false);
    let refs = if s.fault.records_outlive_the_run() {
        history::references(&history.attempts())
    } else {
        Default::default()
    };
    let verified = verify_stored(&clients, &ops, &refs).await;
    let attempts = history.attempts();
    let mut findings = history::check(&attempts, &history.executions(), s.lease);
    findings.lost.extend(lost_records(&attempts, &refs));
    drop(idems);
    drop(private);
    Ok(Outcome::Ran(Box::new(Report {
        store: s.store.name(),
        fault: s.fault.name(),
        instances: s.instances(),
        seconds,
        operations: answered + gave_up,
        answered,
        gave_up,
        faults: faults.injected,
        upstream_faults: upstream.counts().total(),
        unclean_exits: faults.unclean_exits,
        verified,
        findings,
        loss_expected: s.loss_expected(),
        clean_shutdown: s.fault.is_clean_shutdown(),
    })))
}

/// The operations the load started, with their payloads, for the final verification.
type Ops = Arc<std::sync::Mutex<Vec<(OpKey, serde_json::Value)>>>;

/// The store a run uses: its URL and, when the fault crashes it, the private server.
type RunStore = (String, Option<Box<dyn PrivateStore>>);

/// Picks (or starts) the store of a run; `Ok(Err(reason))` when the scenario cannot
/// run here.
async fn prepare_store(s: &Scenario, dir: &Path) -> Result<Result<RunStore, String>, String> {
    let url = match (s.store, s.fault) {
        (StoreKind::Sqlite, FaultKind::StoreRestart) => {
            return Ok(Err(
                "SQLite is embedded: its crash is the crash of idem (kill -9)".into(),
            ));
        }
        (StoreKind::Sqlite, _) => format!("sqlite:{}", dir.join("chaos.db").display()),
        (StoreKind::Redis | StoreKind::RedisVolatile, FaultKind::StoreRestart) => {
            let durable = s.store == StoreKind::Redis;
            let started = spawn_blocking(move || PrivateRedis::start_new(durable)).await?;
            return private_store(started, "redis-server is not installed");
        }
        (StoreKind::Postgres, FaultKind::StoreRestart) => {
            let started = spawn_blocking(PrivatePostgres::start_new).await?;
            return private_store(
                started,
                "initdb/pg_ctl not found under /usr/lib/postgresql/*/bin",
            );
        }
        (StoreKind::RedisVolatile, _) => {
            return Ok(Err("redis-volatile only runs the store crash fault".into()));
        }
        (StoreKind::Redis, _) => {
            if !reachable("127.0.0.1:6379") {
                return Ok(Err(format!("no Redis at {SHARED_REDIS}")));
            }
            SHARED_REDIS.to_owned()
        }
        (StoreKind::Postgres, _) => {
            if !reachable("127.0.0.1:5432") {
                return Ok(Err(format!("no PostgreSQL at {SHARED_POSTGRES}")));
            }
            SHARED_POSTGRES.to_owned()
        }
    };
    Ok(Ok((url, None)))
}

/// A private server as the run's store: skipped (`Ok(Err(missing))`) when it is not
/// installed here, an error when it is and did not start.
fn private_store<P: PrivateStore + 'static>(
    started: Option<Result<P, String>>,
    missing: &str,
) -> Result<Result<RunStore, String>, String> {
    match started {
        None => Ok(Err(missing.to_owned())),
        Some(started) => {
            let p = started?;
            Ok(Ok((p.url(), Some(Box::new(p)))))
        }
    }
}

/// Runs blocking start-up work (processes, sockets) off the runtime's threads.
async fn spawn_blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())
}

/// How every `idem` instance of a run starts: its config file and environment.
fn idem_spec(s: &Scenario, bin: &Path, dir: &Path, upstream: &str, store: &str) -> IdemSpec {
    let config = write_config(dir, upstream, store, s);
    let mut env = Vec::new();
    if s.store != StoreKind::Sqlite {
        env.push(("IDEM_TENANT_SECRET".to_owned(), TENANT_SECRET.to_owned()));
    }
    IdemSpec {
        bin: bin.to_owned(),
        config,
        dir: dir.to_owned(),
        env,
    }
}

/// Starts `n` instances, each on a port of its own.
async fn start_instances(spec: &IdemSpec, n: usize) -> Result<Vec<Idem>, String> {
    let mut idems = Vec::new();
    for _ in 0..n {
        let listen = format!("127.0.0.1:{}", free_port());
        let spec = spec.clone();
        idems.push(spawn_blocking(move || Idem::start(&spec, &listen)).await??);
    }
    Ok(idems)
}

/// The clients of a run, spread over the instances.
fn clients_for(s: &Scenario, history: &History, addrs: Vec<std::net::SocketAddr>) -> Clients {
    // Long enough to outlast a lease after a lost answer, a restart, and 409s.
    let mut clients = Clients::new(history.clone(), addrs, s.lease * 4 + Duration::from_secs(8));
    if s.fault == FaultKind::SigtermHangup {
        // A third of the attempts hang up before their (slow) answers.
        clients.hang_up = Some((1.0 / 3.0, Duration::from_millis(600)));
    }
    clients
}

/// Starts the load: `s.clients` tasks running operations until `deadline`, each
/// returning how many were answered and how many it gave up on.
fn start_load(
    s: &Scenario,
    clients: &Clients,
    ops: &Ops,
    deadline: Instant,
) -> tokio::task::JoinSet<(usize, usize)> {
    let run_id = format!("{:x}", fastrand::u64(..));
    let next_op = Arc::new(AtomicUsize::new(0));
    let mut load = tokio::task::JoinSet::new();
    for c in 0..s.clients {
        let (clients, next_op, ops, run_id) = (
            clients.clone(),
            next_op.clone(),
            ops.clone(),
            run_id.clone(),
        );
        let max_ops = s.max_ops;
        load.spawn(async move {
            let (mut answered, mut gave_up) = (0usize, 0usize);
            while Instant::now() < deadline {
                let n = next_op.fetch_add(1, Ordering::Relaxed);
                if n >= max_ops {
                    break;
                }
                let (op, payload) = operation(&run_id, n);
                ops.lock().unwrap().push((op.clone(), payload.clone()));
                match run_with_duplicate(&clients, op, payload, c + n).await {
                    OpEnd::Answered => answered += 1,
                    OpEnd::GaveUp => gave_up += 1,
                }
            }
            (answered, gave_up)
        });
    }
    load
}

/// Runs one operation through instance `first`; a quarter of the operations get a
/// concurrent duplicate through another instance: at most one of the two may execute.
async fn run_with_duplicate(
    clients: &Clients,
    op: OpKey,
    payload: serde_json::Value,
    first: usize,
) -> OpEnd {
    let first = first % clients.instances.len();
    let dup = (fastrand::u8(..4) == 0).then(|| {
        let (clients, op, payload) = (clients.clone(), op.clone(), payload.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(fastrand::u64(..20))).await;
            clients.run(&op, &payload, first + 1).await
        })
    });
    let end = clients.run(&op, &payload, first).await;
    if let Some(d) = dup {
        let _ = d.await;
    }
    end
}

/// The process and store faults a run injected.
struct Injected {
    injected: usize,
    unclean_exits: Vec<String>,
}

/// Injects the scenario's fault every `fault_every` (± a third) until the load stops.
async fn inject_faults(
    s: &Scenario,
    spec: &IdemSpec,
    idems: &mut [Idem],
    mut private: Option<&mut (dyn PrivateStore + 'static)>,
    deadline: Instant,
) -> Result<Injected, String> {
    let mut done = Injected {
        injected: 0,
        unclean_exits: Vec::new(),
    };
    if matches!(s.fault, FaultKind::Upstream | FaultKind::LongExecution) {
        return Ok(done);
    }
    loop {
        let jitter = s
            .fault_every
            .mul_f64(fastrand::f64() * 2.0 / 3.0 + 2.0 / 3.0);
        if Instant::now() + jitter + Duration::from_millis(500) >= deadline {
            return Ok(done);
        }
        tokio::time::sleep(jitter).await;
        let victim = done.injected % idems.len();
        tokio::task::block_in_place(|| match s.fault {
            FaultKind::StoreRestart => {
                let store = private.as_deref_mut().expect("a private store");
                restart_store(store, done.injected)
            }
            _ => stop_instance(s.fault, spec, &mut idems[victim], victim, &mut done),
        })?;
        done.injected += 1;
    }
}

/// Kills or terminates one instance and starts it again on its port; an instance that
/// does not exit 0 after SIGTERM is recorded.
fn stop_instance(
    fault: FaultKind,
    spec: &IdemSpec,
    idem: &mut Idem,
    victim: usize,
    done: &mut Injected,
) -> Result<(), String> {
    match fault {
        FaultKind::Kill => {
            idem.kill();
            std::thread::sleep(Duration::from_millis(200 + fastrand::u64(..300)));
        }
        FaultKind::Sigterm | FaultKind::SigtermHangup => {
            idem.terminate();
            match idem.wait_exit(Duration::from_secs(30)) {
                Some(0) => {}
                other => done.unclean_exits.push(format!(
                    "instance {victim}: exit {other:?}; log: {:?}",
                    idem.last_log(5)
                )),
            }
        }
        _ => unreachable!("not a fault of an instance: {fault:?}"),
    }
    *idem = Idem::start(spec, &idem.addr.to_string())?;
    Ok(())
}

/// Crashes and restarts the store, or (every other time, where it can) pauses it.
fn restart_store(store: &mut dyn PrivateStore, nth: usize) -> Result<(), String> {
    let down = Duration::from_millis(1000 + fastrand::u64(..1500));
    if nth % 2 == 1 && store.pause() {
        std::thread::sleep(down);
        store.resume();
    } else {
        store.crash()?;
        std::thread::sleep(down);
        store.start()?;
    }
    Ok(())
}

/// Waits for the load; how many operations were answered and how many given up.
async fn join_load(
    mut load: tokio::task::JoinSet<(usize, usize)>,
) -> Result<(usize, usize), String> {
    let (mut answered, mut gave_up) = (0, 0);
    while let Some(r) = load.join_next().await {
        let (a, g) = r.map_err(|e| format!("client task: {e}"))?;
        answered += a;
        gave_up += g;
    }
    Ok((answered, gave_up))
}

/// Sends every operation that a client saw stored once more, eight at a time;
/// returns how many.
async fn verify_stored(
    clients: &Clients,
    ops: &Ops,
    refs: &BTreeMap<OpKey, (u16, Bytes)>,
) -> usize {
    let ops = std::mem::take(&mut *ops.lock().unwrap());
    let to_verify: Vec<_> = ops
        .into_iter()
        .filter(|(op, _)| refs.contains_key(op))
        .collect();
    let verified = to_verify.len();
    let mut checks = tokio::task::JoinSet::new();
    let chunks: Vec<Vec<(OpKey, serde_json::Value)>> = to_verify
        .chunks(verified.div_ceil(8).max(1))
        .map(<[_]>::to_vec)
        .collect();
    for (i, chunk) in chunks.into_iter().enumerate() {
        let clients = clients.clone();
        checks.spawn(async move {
            for (j, (op, payload)) in chunk.iter().enumerate() {
                clients.verify(op, payload, i + j).await;
            }
        });
    }
    while checks.join_next().await.is_some() {}
    verified
}

/// The stored records whose verification did not replay them byte for byte.
fn lost_records(
    attempts: &[history::Attempt],
    refs: &BTreeMap<OpKey, (u16, Bytes)>,
) -> Vec<String> {
    let mut lost = Vec::new();
    for (op, (status, body)) in refs {
        let last = attempts
            .iter()
            .filter(|a| a.verification && &a.op == op)
            .filter_map(|a| match &a.result {
                AttemptResult::Answer {
                    status,
                    replayed,
                    body,
                } => Some((a.done, *status, *replayed, body.clone())),
                AttemptResult::Transport(_) => None,
            })
            .max_by_key(|x| x.0);
        match last {
            Some((_, st, true, b)) if st == *status && b == *body => {}
            Some((_, st, replayed, b)) => lost.push(format!(
                "{op}: stored {status}, after the run {}{st} {}",
                if replayed {
                    "replayed "
                } else {
                    "executed again: "
                },
                String::from_utf8_lossy(&b)
            )),
            None => lost.push(format!("{op}: stored {status}, after the run no answer")),
        }
    }
    lost
}

/// Operation `n` of a run: six consecutive operations share one key string over three
/// tenants and two routes, so that a response given to the wrong tenant or route would
/// be a response for the same key, and would be seen.
pub fn operation(run_id: &str, n: usize) -> (OpKey, serde_json::Value) {
    let op = OpKey {
        tenant: format!("Bearer sk_chaos_{run_id}_{}", n % 3),
        route: if (n / 3).is_multiple_of(2) {
            "/v1/charges".to_owned()
        } else {
            "/v1/refunds".to_owned()
        },
        key: format!("{run_id}-{}", n / 6),
    };
    let payload = serde_json::json!({"amount": n * 10 + 1, "currency": "brl", "op": n});
    (op, payload)
}
