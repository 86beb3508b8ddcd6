//! The serving loop: the proxy listener (HTTP/1.1 and h2c), the admin listener, and a
//! graceful shutdown on SIGTERM/SIGINT.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use idem_core::{Engine, Executions, TenantHasher};
use idem_tower::{Idempotency, IdempotencyLayer, Outcome, ResponseBody};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tower::{Layer, ServiceExt};
use tracing::Instrument;

use crate::admin::{Admin, LoginLimit};
use crate::config::Settings;
use crate::metrics::{MeteredStore, Metrics, RouteLabels, outcome_label};
use crate::observe::ObservedUpstream;
use crate::proxy::{ClientAddr, ClientOverTls, Upstream, UpstreamBody};
use crate::telemetry::{RequestSpan, adopt_parent};
use crate::tls::{CertResolver, ListenerTls};

const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// A running sidecar's addresses (for tests that bind port 0).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// Proxy listener.
    pub proxy: SocketAddr,
    /// Admin listener, if any.
    pub admin: Option<SocketAddr>,
}

/// What serves requests on one worker: its own upstream pool, the shared engine.
struct State {
    service: Idempotency<ObservedUpstream, MeteredStore>,
    metrics: Arc<Metrics>,
    labels: RouteLabels,
    traces: bool,
    tls: Option<TlsAcceptor>,
    header_read_timeout: std::time::Duration,
}

/// Why the sidecar could not start. Each message names the setting to look at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] crate::store::OpenError),
    /// No usable tenant secret (see [`crate::store::tenant_secret`]).
    #[error("tenant.secret: {0}")]
    TenantSecret(#[source] crate::store::SecretError),
    /// The upstream's TLS settings cannot be used.
    #[error("upstream_tls: {0}")]
    UpstreamTls(#[source] idem_tls::TlsError),
    /// A listener's certificate cannot be served.
    #[error(transparent)]
    ListenerTls(#[from] crate::tls::CertError),
    /// The proxy listener's address is taken or not ours.
    #[error("listen: cannot bind {addr}: {source}")]
    Bind {
        /// The address in `listen` that could not be bound.
        addr: SocketAddr,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The admin listener's address is taken or not ours.
    #[error("admin.listen: cannot bind {addr}: {source}")]
    AdminBind {
        /// The address in `admin.listen` that could not be bound.
        addr: SocketAddr,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The bound listener's address could not be read back.
    #[error(transparent)]
    LocalAddr(std::io::Error),
    /// A worker thread could not be started.
    #[error("proxy.workers: cannot start a worker thread: {0}")]
    WorkerThread(#[source] std::io::Error),
}

/// Builds everything and serves until `shutdown` resolves, then drains in-flight
/// requests for at most the grace period. `on_bound` is told the listening addresses.
///
/// The proxy listener is served by `proxy.workers` threads (one per core by default),
/// each with a current-thread runtime, its own `SO_REUSEPORT` listener and its own
/// upstream pool: a request is read, decided, forwarded and answered on one thread,
/// without crossing to another (see docs/benchmarks.md for the measurements behind
/// it). The store, the admin listener and the signals run on the caller's runtime.
pub async fn serve(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send,
    on_bound: impl FnOnce(Bound),
) -> Result<(), ServeError> {
    let metrics = Arc::new(Metrics::new());
    let traces = settings.telemetry.enabled();
    let store = open_store(&settings, &metrics, traces).await?;
    let secret = crate::store::tenant_secret(settings.tenant_secret.as_deref(), &settings.store)
        .map_err(ServeError::TenantSecret)?;
    let tenants =
        TenantHasher::new(secret).with_credential_headers(settings.credential_headers.clone());
    let engine = Engine::new(Arc::new(store.clone()), tenants.clone())
        .with_tenant_limits(settings.tenant_limits);
    let executions = engine.executions().clone();
    let routes = Arc::new(settings.routes.clone());
    // Before on_bound: a SIGHUP sent once the sidecar said it is ready must reload.
    let (listen_tls, admin_tls, reload_task) = listeners_tls(&settings)?;
    let shared = Shared {
        layer: IdempotencyLayer::from_engine(engine).with_routes((*routes).clone()),
        labels: RouteLabels::new(routes.clone()),
        routes,
        metrics: metrics.clone(),
        traces,
        tls: listen_tls.clone(),
    };
    let workers = settings.proxy.workers();
    let states = (0..workers)
        .map(|_| shared.worker(&settings))
        .collect::<Result<Vec<_>, _>>()?;
    let listeners = bind_workers(settings.listen, workers)?;
    let admin = bind_admin(&settings, &store, tenants, &metrics).await?;
    let bound = Bound {
        proxy: listeners[0].local_addr().map_err(ServeError::LocalAddr)?,
        admin: admin.as_ref().and_then(|(l, _)| l.local_addr().ok()),
    };
    tracing::info!(listen = %bound.proxy, workers, tls = listen_tls.is_some(), upstream = %settings.upstream, store = %settings.store, admin = ?bound.admin, "idem ready");
    on_bound(bound);

    let admin_task = admin.map(|(l, admin)| {
        tokio::spawn(admin_loop(
            l,
            admin,
            connection_builder(settings.proxy.header_read_timeout),
            admin_tls,
            settings.proxy.header_read_timeout,
        ))
    });
    let (stop, stopped) = tokio::sync::watch::channel(None);
    let running = start_workers(listeners, states, &stopped, &executions)?;
    shutdown.await;
    for task in [admin_task, reload_task].into_iter().flatten() {
        task.abort();
    }
    stop_workers(settings.proxy.grace_period, &stop, running).await;
    Ok(())
}

/// Whether some route waits for concurrent duplicates (`on_concurrent = "wait"`), so
/// that the store must wake them.
fn waits_for_duplicates(routes: &idem_core::Routes) -> bool {
    routes
        .routes()
        .iter()
        .map(|r| &r.policy)
        .chain([routes.default_policy()])
        .any(|p| p.on_concurrent == idem_core::policy::OnConcurrent::Wait)
}

/// The configured store, sealed when a key is set, measured and (with traces on)
/// traced.
async fn open_store(
    settings: &Settings,
    metrics: &Arc<Metrics>,
    traces: bool,
) -> Result<MeteredStore, ServeError> {
    let waits = waits_for_duplicates(&settings.routes);
    // One share of the PostgreSQL pool per worker runtime, driven on it.
    let raw_store = crate::store::open(
        &settings.store,
        settings.encryption.as_ref(),
        waits,
        settings.proxy.workers(),
    )
    .await?;
    Ok(MeteredStore::new(raw_store, metrics.clone(), settings.store.label()).with_traces(traces))
}

/// What every worker shares, from which each builds its own [`State`].
struct Shared {
    layer: IdempotencyLayer<MeteredStore>,
    routes: Arc<idem_core::Routes>,
    labels: RouteLabels,
    metrics: Arc<Metrics>,
    traces: bool,
    tls: Option<TlsAcceptor>,
}

impl Shared {
    /// A worker's state: the shared engine in front of an upstream pool of its own.
    fn worker(&self, settings: &Settings) -> Result<State, ServeError> {
        let upstream = Upstream::new(
            settings.upstream.clone(),
            self.routes.clone(),
            &settings.proxy,
            settings.upstream_tls.as_ref(),
        )
        .map_err(ServeError::UpstreamTls)?;
        let upstream = ObservedUpstream::new(
            upstream,
            self.metrics.clone(),
            self.labels.clone(),
            self.traces,
        );
        Ok(State {
            service: self.layer.layer(upstream),
            metrics: self.metrics.clone(),
            labels: self.labels.clone(),
            traces: self.traces,
            tls: self.tls.clone(),
            header_read_timeout: settings.proxy.header_read_timeout,
        })
    }
}

/// The admin listener, bound, and what it serves; `None` when none is configured.
async fn bind_admin(
    settings: &Settings,
    store: &MeteredStore,
    tenants: TenantHasher,
    metrics: &Arc<Metrics>,
) -> Result<Option<(TcpListener, Arc<Admin>)>, ServeError> {
    let Some(admin) = &settings.admin else {
        return Ok(None);
    };
    let addr = admin.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::AdminBind { addr, source })?;
    let admin = Admin {
        store: store.clone(),
        tenants,
        metrics: metrics.clone(),
        token: admin.token.clone(),
        sessions: Default::default(),
        tls: settings.admin_tls.is_some(),
        login_limit: LoginLimit::new(admin.login_limit.failures, admin.login_limit.window),
        config: crate::admin::running_config(settings),
    };
    Ok(Some((listener, Arc::new(admin))))
}

/// Where each worker thread learns that it must stop, and by when.
type StopSignal = tokio::sync::watch::Receiver<Option<tokio::time::Instant>>;

/// Starts one thread per worker, each serving its listener; the set ends as they do.
fn start_workers(
    listeners: Vec<std::net::TcpListener>,
    states: Vec<State>,
    stopped: &StopSignal,
    executions: &Arc<Executions>,
) -> Result<tokio::task::JoinSet<std::thread::Result<()>>, ServeError> {
    let mut running = tokio::task::JoinSet::new();
    for (i, (listener, state)) in listeners.into_iter().zip(states).enumerate() {
        let (stopped, executions) = (stopped.clone(), executions.clone());
        let thread = std::thread::Builder::new()
            .name(format!("idem-worker-{i}"))
            .spawn(move || run_worker(listener, state, stopped, &executions))
            .map_err(ServeError::WorkerThread)?;
        running.spawn_blocking(move || thread.join());
    }
    Ok(running)
}

/// Tells the workers to stop accepting and to finish within the grace period, and
/// waits for their threads.
async fn stop_workers(
    grace: std::time::Duration,
    stop: &tokio::sync::watch::Sender<Option<tokio::time::Instant>>,
    mut running: tokio::task::JoinSet<std::thread::Result<()>>,
) {
    let deadline = tokio::time::Instant::now() + grace;
    tracing::info!(grace = ?grace, "shutting down: no new connections, finishing in-flight requests");
    let _ = stop.send(Some(deadline));
    while let Some(joined) = running.join_next().await {
        if !matches!(joined, Ok(Ok(()))) {
            tracing::error!("a worker thread panicked");
        }
    }
}

/// A listener on `addr` with `SO_REUSEPORT`, which other workers' listeners share.
fn reuse_port_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// One listener per worker, all on the same address with `SO_REUSEPORT`, so that the
/// kernel spreads connections across them. Port 0 is resolved by the first.
fn bind_workers(
    addr: SocketAddr,
    workers: usize,
) -> Result<Vec<std::net::TcpListener>, ServeError> {
    let bind = |addr: SocketAddr| {
        reuse_port_listener(addr).map_err(|source| ServeError::Bind { addr, source })
    };
    // `SO_REUSEPORT` would let this process share a port another one already serves
    // (as the same user) and split its traffic silently: a plain bind first, which
    // fails as it always did when the port is taken.
    if addr.port() != 0 {
        drop(
            std::net::TcpListener::bind(addr)
                .map_err(|source| ServeError::Bind { addr, source })?,
        );
    }
    let first = bind(addr)?;
    let bound = first.local_addr().map_err(ServeError::LocalAddr)?;
    let mut listeners = vec![first];
    for _ in 1..workers {
        listeners.push(bind(bound)?);
    }
    Ok(listeners)
}

/// The HTTP/1.1 and h2c connection settings of the proxy and admin listeners.
fn connection_builder(header_read_timeout: std::time::Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    builder
}

/// A worker thread: its own runtime, accepting on its listener until told to stop,
/// then draining its connections and the executions within the grace period. The
/// runtime lives until then: tasks storing the outcome of a caller that left run on it.
fn run_worker(
    listener: std::net::TcpListener,
    state: State,
    mut stopped: StopSignal,
    executions: &Executions,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "a worker could not start its runtime");
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "a worker could not listen");
                return;
            }
        };
        let builder = Arc::new(connection_builder(state.header_read_timeout));
        let state = Arc::new(state);
        let graceful = GracefulShutdown::new();
        let deadline = loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, remote)) => accept(stream, remote, &state, &builder, &graceful),
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                changed = stopped.changed() => {
                    let deadline = *stopped.borrow();
                    match (changed, deadline) {
                        (_, Some(deadline)) => break deadline,
                        (Err(_), None) => break tokio::time::Instant::now(),
                        (Ok(()), None) => {}
                    }
                }
            }
        };
        drop(listener);
        drain(graceful, executions, deadline).await;
    });
}

/// Serves one accepted connection in a task of its own; the graceful shutdown waits
/// for it.
fn accept(
    stream: TcpStream,
    remote: SocketAddr,
    state: &Arc<State>,
    builder: &Arc<auto::Builder<TokioExecutor>>,
    graceful: &GracefulShutdown,
) {
    let _ = stream.set_nodelay(true);
    if let Some(acceptor) = &state.tls {
        tokio::spawn(serve_tls(
            acceptor.clone(),
            stream,
            remote,
            state.clone(),
            builder.clone(),
            graceful.watcher(),
        ));
        return;
    }
    let state = state.clone();
    let svc = service_fn(move |req| handle(state.clone(), remote, req));
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
        .into_owned();
    let conn = graceful.watch(conn);
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    });
}

/// Lets the open connections finish, then the executions whose callers hung up (their
/// outcomes are still being stored), all within one grace period. An execution still
/// running at its end is left in flight, as after a crash: its lease runs out.
async fn drain(
    graceful: GracefulShutdown,
    executions: &Executions,
    deadline: tokio::time::Instant,
) {
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep_until(deadline) => tracing::warn!("grace period over; closing the remaining connections"),
    }
    if executions.running() > 0 {
        tracing::info!(
            running = executions.running(),
            "waiting for executions whose callers left"
        );
    }
    tokio::select! {
        () = executions.idle() => {}
        () = tokio::time::sleep_until(deadline) => tracing::warn!(
            running = executions.running(),
            "grace period over; executions still running are left in flight until their leases end"
        ),
    }
}

/// How often the listeners' certificate files are checked for a change.
const CERT_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// The proxy and admin listeners' TLS acceptors, and the task that reloads their
/// certificates (SIGHUP, file change), when any listener serves TLS.
#[allow(clippy::type_complexity)]
fn listeners_tls(
    settings: &Settings,
) -> Result<
    (
        Option<TlsAcceptor>,
        Option<TlsAcceptor>,
        Option<tokio::task::JoinHandle<()>>,
    ),
    ServeError,
> {
    let mut resolvers = Vec::new();
    let proxy = acceptor(settings.listen_tls.as_ref(), &mut resolvers)?;
    let admin = acceptor(settings.admin_tls.as_ref(), &mut resolvers)?;
    let reload = (!resolvers.is_empty())
        .then(|| tokio::spawn(crate::tls::reload_loop(resolvers, CERT_POLL)));
    Ok((proxy, admin, reload))
}

/// A TLS acceptor serving a listener's certificate, whose resolver joins `resolvers`
/// (reloaded on SIGHUP and file change).
fn acceptor(
    tls: Option<&ListenerTls>,
    resolvers: &mut Vec<Arc<CertResolver>>,
) -> Result<Option<TlsAcceptor>, ServeError> {
    let Some(tls) = tls else { return Ok(None) };
    let resolver = Arc::new(CertResolver::load(tls.clone())?);
    let config = resolver.server_config()?;
    resolvers.push(resolver);
    Ok(Some(TlsAcceptor::from(config)))
}

/// The handshake, bounded by the header read timeout: a client that opens a
/// connection and says nothing must not hold a task forever.
async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    timeout: std::time::Duration,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}

/// Serves one proxy connection over TLS; the graceful shutdown waits for it.
async fn serve_tls(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    remote: SocketAddr,
    state: Arc<State>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let timeout = state.header_read_timeout;
    let Some(tls) = handshake(&acceptor, stream, timeout).await else {
        return;
    };
    let svc = service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(ClientOverTls);
        handle(state.clone(), remote, req)
    });
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(tls), svc)
        .into_owned();
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

async fn admin_loop(
    listener: TcpListener,
    admin: Arc<Admin>,
    builder: auto::Builder<TokioExecutor>,
    tls: Option<TlsAcceptor>,
    timeout: std::time::Duration,
) {
    let builder = Arc::new(builder);
    loop {
        let Ok((stream, remote)) = listener.accept().await else {
            continue;
        };
        let admin = admin.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let admin = admin.clone();
            async move { Ok::<_, Infallible>(admin.handle(remote.ip(), req).await) }
        });
        let (builder, tls) = (builder.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                None => {
                    let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                }
                Some(acceptor) => {
                    let Some(tls) = handshake(&acceptor, stream, timeout).await else {
                        return;
                    };
                    let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                }
            }
        });
    }
}

/// `POST /v1/charges` for a configured route, the method alone otherwise (a path is
/// no span name: it may hold ids).
fn span_name(method: &http::Method, route: &str) -> String {
    match route.strip_prefix("* ") {
        Some(pattern) => format!("{method} {pattern}"),
        None if route == "unmatched" => method.to_string(),
        None => route.to_owned(),
    }
}

/// The request's span, a child of the caller's trace when it sent a `traceparent`;
/// none while traces are off, so that they cost nothing then.
fn request_span(state: &State, req: &Request<Incoming>, route: &str) -> tracing::Span {
    if !state.traces {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "request",
        otel.kind = "server",
        otel.name = %span_name(req.method(), route),
        http.request.method = %req.method(),
        http.route = route,
        http.response.status_code = tracing::field::Empty,
        idem.outcome = tracing::field::Empty,
    );
    adopt_parent(&span, req.headers());
    span
}

/// The request's id: the caller's, or a new random UUID (from the thread's generator:
/// no system call per request), which the upstream sees, the outcome keeps and the
/// caller gets back.
fn request_id(req: &mut Request<Incoming>) -> HeaderValue {
    if let Some(v) = req.headers().get(&REQUEST_ID) {
        return v.clone();
    }
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let v = HeaderValue::from_bytes(id.hyphenated().encode_lower(&mut buf).as_bytes())
        .expect("a UUID is a header value");
    req.headers_mut().insert(REQUEST_ID, v.clone());
    v
}

async fn handle(
    state: Arc<State>,
    remote: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<ResponseBody<UpstreamBody>>, Infallible> {
    let start = Instant::now();
    state.metrics.in_flight().inc();
    let request_id = request_id(&mut req);
    req.extensions_mut().insert(ClientAddr(remote));
    let route = state.labels.index(req.method(), req.uri().path());
    // What the log line needs, taken only when it is written.
    let logged = tracing::enabled!(tracing::Level::INFO)
        .then(|| (req.method().clone(), req.uri().path().to_owned()));
    let span = request_span(&state, &req, state.labels.get(route).as_str());
    if state.traces {
        req.extensions_mut().insert(RequestSpan(span.clone()));
    }
    let result = state
        .service
        .clone()
        .oneshot(req)
        .instrument(span.clone())
        .await;
    state.metrics.in_flight().dec();
    let mut res = match result {
        Ok(res) => res,
        Err(never) => match never {},
    };
    let outcome = outcome_label(res.extensions().get::<Outcome>());
    state
        .metrics
        .request(outcome, state.labels.get(route), start.elapsed());
    span.record("http.response.status_code", res.status().as_u16());
    span.record("idem.outcome", outcome);
    if let Some((method, path)) = logged {
        tracing::info!(
            request_id = request_id.to_str().unwrap_or(""),
            %method,
            path,
            status = res.status().as_u16(),
            outcome,
            elapsed_ms = start.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
    }
    res.headers_mut().entry(REQUEST_ID).or_insert(request_id);
    Ok(res)
}
