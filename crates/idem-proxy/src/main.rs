//! `idem`: the sidecar. `idem serve --upstream http://127.0.0.1:3000` is all it needs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use idem_core::{RecordKey, TenantHasher};
use idem_proxy::config::{Config, LogFormat, Overrides};
use idem_proxy::keys::{KeyAction, run};
use idem_proxy::store::{parse_url, tenant_secret};
use idem_proxy::telemetry::{Telemetry, TelemetryConfig};

/// The binary's allocator (feature `mimalloc`, on by default): see Cargo.toml.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "idem",
    version,
    about = "Idempotency-Key sidecar: makes any HTTP API safe to retry"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve: proxy requests to the upstream with idempotency.
    Serve {
        /// The protected API, e.g. http://127.0.0.1:3000.
        #[arg(long)]
        upstream: Option<String>,
        /// Listen address [default: 127.0.0.1:8080].
        #[arg(long)]
        listen: Option<String>,
        /// Store: memory, sqlite:PATH, redis://…, postgres://… [default: sqlite:idem.db].
        #[arg(long)]
        store: Option<String>,
        /// Configuration file (TOML); flags override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Admin listen address (health, readiness, metrics, keys); off by default.
        #[arg(long)]
        admin_listen: Option<String>,
        /// Log format.
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// Validate a configuration file without serving.
    CheckConfig {
        /// The configuration file (TOML) to check.
        file: PathBuf,
    },
    /// Inspect, release or purge one key in a store.
    Keys {
        #[command(subcommand)]
        action: KeysCommand,
    },
}

#[derive(clap::Args)]
struct KeyArgs {
    /// Store URL (as for serve); taken from --config when omitted.
    #[arg(long)]
    store: Option<String>,
    /// Configuration file, for the store URL and the tenant secret.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Route, as idem names it: "POST /v1/charges" or the matched pattern.
    #[arg(long)]
    route: String,
    /// The idempotency key.
    #[arg(long)]
    key: String,
    /// The caller's credential (e.g. "Bearer sk_…"), hashed with the tenant secret.
    #[arg(long, conflicts_with = "tenant")]
    credential: Option<String>,
    /// The tenant id itself (t_…), or "anonymous".
    #[arg(long)]
    tenant: Option<String>,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Show a record: state, fingerprint, status, times, size.
    Inspect(KeyArgs),
    /// Release an in-flight key whose executor is known dead.
    Release(KeyArgs),
    /// Delete a record whatever its state.
    Purge(KeyArgs),
}

/// Logs to stderr, and spans to OTLP when `[telemetry]` says so.
fn init_logs(format: LogFormat, telemetry: &TelemetryConfig) -> Result<Option<Telemetry>, String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("IDEM_LOG").unwrap_or_else(|_| "info".into());
    let (guard, otel) = match Telemetry::start(telemetry)? {
        Some((guard, layer)) => (Some(guard), Some(layer)),
        None => (None, None),
    };
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Json => registry.with(fmt.json()).init(),
        LogFormat::Text => registry.with(fmt).init(),
    }
    Ok(guard)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn load(config: Option<&PathBuf>) -> Result<Config, String> {
    match config {
        Some(path) => Config::from_file(path).map_err(|e| format!("{}: {e}", path.display())),
        None => Ok(Config::default()),
    }
}

async fn keys(action: KeyAction, args: KeyArgs) -> Result<(), String> {
    let mut config = load(args.config.as_ref())?;
    if let Some(store) = args.store {
        config.store = store;
    }
    let store = parse_url(&config.store).map_err(|e| format!("store: {e}"))?;
    let tenant = match (args.credential, args.tenant) {
        (Some(credential), _) => {
            let configured = config.tenant.configured_secret().map(|(_, s)| s);
            let secret = tenant_secret(configured.as_ref().map(String::as_bytes), &store)
                .map_err(|e| format!("tenant.secret: {e}"))?;
            TenantHasher::new(secret).tenant_for(credential.as_bytes())
        }
        (None, Some(t)) => t,
        (None, None) => idem_core::scope::ANONYMOUS_TENANT.to_owned(),
    };
    let encryption = config.encryption.key().map_err(|e| e.to_string())?;
    // Deleting a record wakes duplicates waiting on it, wherever they wait.
    let store = idem_proxy::store::open(&store, encryption.as_ref(), true, 1)
        .await
        .map_err(|e| e.to_string())?;
    let key = RecordKey::new(tenant, args.route, args.key);
    match run(&store, &key, action).await.map_err(|e| e.to_string())? {
        Some(doc) => {
            println!("{}", serde_json::to_string_pretty(&doc).expect("JSON"));
            Ok(())
        }
        None => Err(match action {
            KeyAction::Release => "no in-flight record for this key".into(),
            _ => "no record for this key".into(),
        }),
    }
}

/// `idem serve`: the file, the flags over it, checked; then logs, and serving until
/// SIGTERM or SIGINT.
async fn serve(config: Option<PathBuf>, overrides: Overrides) -> Result<(), String> {
    let log_format = overrides.log_format;
    let config = load(config.as_ref())?.with_overrides(overrides);
    let format = log_format.unwrap_or(config.log_format);
    let settings = config
        .validate()
        .map_err(|e| format!("configuration: {e}"))?;
    let telemetry = init_logs(format, &settings.telemetry)?;
    let served = idem_proxy::server::serve(settings, shutdown_signal(), |_| {}).await;
    if let Some(t) = telemetry {
        t.shutdown().await;
    }
    served.map_err(|e| e.to_string())
}

/// `idem check-config FILE`: reads and checks the file, serves nothing.
fn check_config(file: &Path) -> Result<(), String> {
    let settings = load(Some(&file.to_owned()))?
        .validate()
        .map_err(|e| format!("{}: {e}", file.display()))?;
    println!(
        "{}: ok ({} routes)",
        file.display(),
        settings.routes.routes().len()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve {
                upstream,
                listen,
                store,
                config,
                admin_listen,
                log_format,
            } => {
                let overrides = Overrides {
                    listen,
                    upstream,
                    store,
                    admin_listen,
                    log_format,
                };
                serve(config, overrides).await
            }
            Command::CheckConfig { file } => check_config(&file),
            Command::Keys { action } => match action {
                KeysCommand::Inspect(a) => keys(KeyAction::Inspect, a).await,
                KeysCommand::Release(a) => keys(KeyAction::Release, a).await,
                KeysCommand::Purge(a) => keys(KeyAction::Purge, a).await,
            },
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("idem: {e}");
            ExitCode::FAILURE
        }
    }
}
