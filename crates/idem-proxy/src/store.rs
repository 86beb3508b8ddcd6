//! Picking a store from a URL at run time, and the tenant secret that goes with it.
//!
//! Each store is compiled in by the cargo feature of its name (`memory`, `sqlite`,
//! `redis`, `postgres`; all on by default). A URL naming a store left out is refused
//! with [`UrlError::NotBuilt`], which says which feature to turn on.

#[cfg(not(any(
    feature = "memory",
    feature = "sqlite",
    feature = "redis",
    feature = "postgres"
)))]
compile_error!("idem-proxy needs at least one store feature: memory, sqlite, redis or postgres");

use std::fmt;
#[cfg(feature = "sqlite")]
use std::path::{Path, PathBuf};
use std::sync::Arc;

use idem_core::TenantSecret;
use idem_core::crypto::{Encrypted, EncryptionKey};
use idem_core::scope::ScopeError;
use idem_core::store::{DynStore, StoreError};
#[cfg(feature = "memory")]
use idem_store_memory::MemoryStore;
#[cfg(feature = "postgres")]
use idem_store_postgres::{PostgresOptions, PostgresStore};
#[cfg(feature = "redis")]
use idem_store_redis::tls::RedisTls;
#[cfg(feature = "redis")]
use idem_store_redis::{RedisOptions, RedisStore, Topology};
#[cfg(feature = "sqlite")]
use idem_store_sqlite::{Durability, SqliteOptions, SqliteStore};

use crate::config::TENANT_SECRET_ENV;

/// A parsed store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `memory`.
    #[cfg(feature = "memory")]
    Memory,
    /// `sqlite:PATH[?synchronous=full|normal]`.
    #[cfg(feature = "sqlite")]
    Sqlite(PathBuf, Durability),
    /// `redis://…` or `rediss://…`, standalone or cluster.
    #[cfg(feature = "redis")]
    Redis(String),
    /// `postgres://…` or `postgresql://…`.
    #[cfg(feature = "postgres")]
    Postgres(String),
}

impl StoreUrl {
    /// The store's name, as the `store` metric label and the cargo feature give it:
    /// `memory`, `sqlite`, `redis` or `postgres`.
    pub fn label(&self) -> &'static str {
        match self {
            #[cfg(feature = "memory")]
            StoreUrl::Memory => "memory",
            #[cfg(feature = "sqlite")]
            StoreUrl::Sqlite(..) => "sqlite",
            #[cfg(feature = "redis")]
            StoreUrl::Redis(_) => "redis",
            #[cfg(feature = "postgres")]
            StoreUrl::Postgres(_) => "postgres",
        }
    }
}

/// The URL as [`parse_url`] reads it back: `sqlite://PATH` is written `sqlite:PATH`,
/// and `synchronous=full`, the default, is left out. Redis and PostgreSQL URLs are
/// written as given, password included: mask them before showing them.
impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            #[cfg(feature = "memory")]
            StoreUrl::Memory => f.write_str("memory"),
            #[cfg(feature = "sqlite")]
            StoreUrl::Sqlite(path, Durability::Normal) => {
                write!(f, "sqlite:{}?synchronous=normal", path.display())
            }
            #[cfg(feature = "sqlite")]
            StoreUrl::Sqlite(path, _) => write!(f, "sqlite:{}", path.display()),
            #[cfg(feature = "redis")]
            StoreUrl::Redis(url) => f.write_str(url),
            #[cfg(feature = "postgres")]
            StoreUrl::Postgres(url) => f.write_str(url),
        }
    }
}

/// Why a text is not a store URL; the message says what is accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UrlError {
    /// `sqlite:` with nothing after it.
    #[error("sqlite: needs a file path, as in sqlite:idem.db")]
    SqliteWithoutPath,
    /// `synchronous=` with a value other than `full` or `normal`.
    #[error("sqlite: synchronous={0:?}: use full or normal")]
    SqliteSynchronous(String),
    /// A query parameter other than `synchronous`.
    #[error("sqlite: unknown parameter {0:?}; the one parameter is synchronous=full|normal")]
    SqliteParameter(String),
    /// A Redis or PostgreSQL URL its store refuses: a malformed topology, or TLS
    /// files that cannot be read.
    #[error(transparent)]
    Refused(#[from] StoreError),
    /// A URL naming a store this build left out.
    #[error(
        "{url:?} names the {store} store, which this idem was built without (cargo feature `{store}`)"
    )]
    NotBuilt {
        /// The URL as given.
        url: String,
        /// The store it names, which is also the name of its cargo feature.
        store: &'static str,
    },
    /// A URL naming no store idem knows.
    #[error(
        "{0:?} is not a store URL; use memory, sqlite:PATH, redis://host:port[/db][?cluster=true] \
         or postgres://user@host:port/db"
    )]
    Unknown(String),
}

/// The store a URL names, by its scheme, whether or not this build has it.
fn store_named(url: &str) -> Option<&'static str> {
    if url == "memory" {
        Some("memory")
    } else if url.starts_with("sqlite:") {
        Some("sqlite")
    } else if url.starts_with("redis://") || url.starts_with("rediss://") {
        Some("redis")
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Some("postgres")
    } else {
        None
    }
}

/// Parses a store URL; the error says what is accepted.
pub fn parse_url(url: &str) -> Result<StoreUrl, UrlError> {
    match store_named(url) {
        #[cfg(feature = "memory")]
        Some("memory") => Ok(StoreUrl::Memory),
        #[cfg(feature = "sqlite")]
        Some("sqlite") => parse_sqlite(url),
        #[cfg(feature = "redis")]
        Some("redis") => parse_redis(url),
        #[cfg(feature = "postgres")]
        Some("postgres") => parse_postgres(url),
        Some(store) => Err(UrlError::NotBuilt {
            url: url.to_owned(),
            store,
        }),
        None => Err(UrlError::Unknown(url.to_owned())),
    }
}

#[cfg(feature = "sqlite")]
fn parse_sqlite(url: &str) -> Result<StoreUrl, UrlError> {
    let rest = url.strip_prefix("sqlite:").unwrap_or(url);
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() {
        return Err(UrlError::SqliteWithoutPath);
    }
    let mut durability = Durability::Full;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        durability = match pair.split_once('=') {
            Some(("synchronous", v)) if v.eq_ignore_ascii_case("full") => Durability::Full,
            Some(("synchronous", v)) if v.eq_ignore_ascii_case("normal") => Durability::Normal,
            Some(("synchronous", v)) => return Err(UrlError::SqliteSynchronous(v.to_owned())),
            _ => return Err(UrlError::SqliteParameter(pair.to_owned())),
        };
    }
    Ok(StoreUrl::Sqlite(PathBuf::from(path), durability))
}

/// The TLS files are read and checked now, so that a wrong one stops start-up.
#[cfg(feature = "redis")]
fn parse_redis(url: &str) -> Result<StoreUrl, UrlError> {
    let (plain, _) = RedisTls::split_url(url)?;
    Topology::parse(&plain)?;
    Ok(StoreUrl::Redis(url.to_owned()))
}

/// The TLS files are read and checked now, so that a wrong one stops start-up.
#[cfg(feature = "postgres")]
fn parse_postgres(url: &str) -> Result<StoreUrl, UrlError> {
    let (rest, _) = idem_store_postgres::split_options(url, PostgresOptions::default())?;
    let (_, tls) = idem_store_postgres::tls::split_url(&rest)?;
    tls.connector()?;
    Ok(StoreUrl::Postgres(url.to_owned()))
}

/// A store that could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The SQLite database could not be opened or set up.
    #[error("cannot open {}: {source}", .path.display())]
    #[cfg(feature = "sqlite")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: StoreError,
    },
    /// The Redis or PostgreSQL server could not be reached or refused the connection.
    #[error("store: cannot connect to {url}: {source}")]
    Connect {
        /// The store URL.
        url: String,
        /// What the store's client said.
        #[source]
        source: StoreError,
    },
}

/// Opens the store a URL names, sealing stored responses when a key is given.
/// `wakeups`: whether some route waits for concurrent duplicates (`on_concurrent =
/// "wait"`). Without such a route PostgreSQL is opened without `pg_notify`, whose
/// commits do not group-commit (see `PostgresOptions::notify`), and Redis without
/// `PUBLISH` and its pub/sub connection, a message to every instance per completed
/// request (see `RedisOptions::notify`). `runtimes`: how many
/// runtimes serve requests with it (the worker threads); PostgreSQL gives each its own
/// share of the pool, driven on it (see `PostgresOptions::runtimes`).
pub async fn open(
    url: &StoreUrl,
    encryption: Option<&EncryptionKey>,
    wakeups: bool,
    runtimes: usize,
) -> Result<Arc<dyn DynStore>, OpenError> {
    let store = open_plain(url, wakeups, runtimes).await?;
    Ok(match encryption {
        Some(key) => Arc::new(Encrypted::new(store, key)),
        None => store,
    })
}

#[cfg_attr(
    not(any(feature = "postgres", feature = "redis")),
    allow(unused_variables)
)]
async fn open_plain(
    url: &StoreUrl,
    wakeups: bool,
    runtimes: usize,
) -> Result<Arc<dyn DynStore>, OpenError> {
    Ok(match url {
        #[cfg(feature = "memory")]
        StoreUrl::Memory => Arc::new(MemoryStore::new()),
        #[cfg(feature = "sqlite")]
        StoreUrl::Sqlite(path, durability) => Arc::new(
            SqliteStore::open_with(path, SqliteOptions::default().with_durability(*durability))
                .map_err(|source| OpenError::Sqlite {
                    path: path.clone(),
                    source,
                })?,
        ),
        #[cfg(feature = "redis")]
        StoreUrl::Redis(url) => Arc::new(
            RedisStore::connect_with(url, RedisOptions::default().with_notify(wakeups))
                .await
                .map_err(|source| connect_error(url, source))?,
        ),
        #[cfg(feature = "postgres")]
        StoreUrl::Postgres(url) => Arc::new(
            PostgresStore::connect_with(
                url,
                PostgresOptions::default()
                    .with_notify(wakeups)
                    .with_runtimes(runtimes),
            )
            .await
            .map_err(|source| connect_error(url, source))?,
        ),
    })
}

#[cfg(any(feature = "redis", feature = "postgres"))]
fn connect_error(url: &str, source: StoreError) -> OpenError {
    OpenError::Connect {
        url: url.to_owned(),
        source,
    }
}

/// Why no tenant secret could be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// None is configured, and the store is shared between processes.
    #[error(
        "a shared store needs the same tenant secret on every instance: set tenant.secret or ${env}",
        env = TENANT_SECRET_ENV
    )]
    SharedStore,
    /// The secret kept beside the SQLite database is too short.
    #[error("{} is too short to be a tenant secret", .path.display())]
    #[cfg(feature = "sqlite")]
    TooShort {
        /// The secret's file.
        path: PathBuf,
    },
    /// The secret kept beside the SQLite database cannot be read.
    #[error("cannot read {}: {source}", .path.display())]
    #[cfg(feature = "sqlite")]
    Read {
        /// The secret's file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A new secret cannot be created beside the SQLite database.
    #[error("cannot create {}: {source}", .path.display())]
    #[cfg(feature = "sqlite")]
    Create {
        /// The secret's file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A new secret cannot be written beside the SQLite database.
    #[error("cannot write {}: {source}", .path.display())]
    #[cfg(feature = "sqlite")]
    Write {
        /// The secret's file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The secret is not one the tenant hash accepts (too short).
    #[error(transparent)]
    Invalid(#[from] ScopeError),
}

/// The tenant secret: the configured one (`tenant.secret` or its environment
/// variable), else the store's own (see [`default_secret`]).
pub fn tenant_secret(
    configured: Option<&[u8]>,
    store: &StoreUrl,
) -> Result<TenantSecret, SecretError> {
    let secret = match configured {
        Some(s) => s.to_vec(),
        None => default_secret(store)?,
    };
    Ok(TenantSecret::new(secret)?)
}

/// The tenant secret when none is configured. A store shared between processes needs
/// the same secret everywhere, so it must be configured; the embedded stores can make
/// their own: a random one per process for `memory` (whose records die with it), and
/// for SQLite a random one kept beside the database (`PATH.secret`, mode 0600) so that
/// keys still match after a restart.
pub fn default_secret(url: &StoreUrl) -> Result<Vec<u8>, SecretError> {
    match url {
        #[cfg(feature = "memory")]
        StoreUrl::Memory => Ok(random_secret()),
        #[cfg(feature = "sqlite")]
        StoreUrl::Sqlite(path, _) => secret_beside(path),
        #[cfg(any(feature = "redis", feature = "postgres"))]
        _ => Err(SecretError::SharedStore),
    }
}

#[cfg(any(feature = "memory", feature = "sqlite"))]
fn random_secret() -> Vec<u8> {
    let mut s = vec![0u8; 32];
    rand::fill(&mut s[..]);
    s
}

#[cfg(feature = "sqlite")]
fn secret_beside(db: &Path) -> Result<Vec<u8>, SecretError> {
    let mut name = db.as_os_str().to_owned();
    name.push(".secret");
    let path = PathBuf::from(name);
    match std::fs::read(&path) {
        Ok(s) if s.len() >= idem_core::TenantSecret::MIN_LEN => return Ok(s),
        Ok(_) => return Err(SecretError::TooShort { path }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(SecretError::Read { path, source }),
    }
    let secret = hex_string(&random_secret()).into_bytes();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    use std::io::Write;
    match options.open(&path) {
        Ok(mut f) => f.write_all(&secret).map_err(|source| SecretError::Write {
            path: path.clone(),
            source,
        })?,
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return std::fs::read(&path).map_err(|source| SecretError::Read { path, source });
        }
        Err(source) => return Err(SecretError::Create { path, source }),
    }
    Ok(secret)
}

#[cfg(feature = "sqlite")]
fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// The cases name every store.
#[cfg(all(
    test,
    feature = "memory",
    feature = "sqlite",
    feature = "redis",
    feature = "postgres"
))]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(parse_url("memory").unwrap(), StoreUrl::Memory);
        assert_eq!(
            parse_url("sqlite:idem.db").unwrap(),
            StoreUrl::Sqlite("idem.db".into(), Durability::Full)
        );
        assert_eq!(
            parse_url("sqlite:///var/lib/idem.db").unwrap(),
            StoreUrl::Sqlite("/var/lib/idem.db".into(), Durability::Full)
        );
        assert_eq!(
            parse_url("sqlite:idem.db?synchronous=normal").unwrap(),
            StoreUrl::Sqlite("idem.db".into(), Durability::Normal)
        );
        assert!(parse_url("sqlite:").is_err());
        assert!(parse_url("sqlite:idem.db?synchronous=off").is_err());
        assert!(parse_url("sqlite:idem.db?journal=wal").is_err());
        assert_eq!(
            parse_url("redis://127.0.0.1:6379/0").unwrap(),
            StoreUrl::Redis("redis://127.0.0.1:6379/0".into())
        );
        assert!(parse_url("redis://127.0.0.1:7000,127.0.0.1:7001").is_ok());
        assert!(parse_url("postgres://postgres@127.0.0.1:5432/test").is_ok());
        assert!(
            default_secret(&parse_url("postgres://postgres@127.0.0.1/test").unwrap()).is_err(),
            "shared stores need a configured secret"
        );
        assert!(parse_url("mongodb://x").is_err());
    }

    #[test]
    fn a_displayed_url_parses_back() {
        for url in [
            "memory",
            "sqlite:idem.db",
            "sqlite:/var/lib/idem.db?synchronous=normal",
            "redis://127.0.0.1:6379/0",
            "postgres://postgres@127.0.0.1:5432/test",
        ] {
            assert_eq!(parse_url(url).unwrap().to_string(), url);
        }
        let url = parse_url("sqlite:///var/lib/idem.db?synchronous=full").unwrap();
        assert_eq!(url.to_string(), "sqlite:/var/lib/idem.db");
    }

    #[test]
    fn sqlite_secret_is_kept_beside_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("idem.db").display());
        let a = default_secret(&parse_url(&url).unwrap()).unwrap();
        let b = default_secret(&parse_url(&url).unwrap()).unwrap();
        assert_eq!(a, b);
        assert!(a.len() >= 32);
        assert_ne!(
            default_secret(&StoreUrl::Memory).unwrap(),
            default_secret(&StoreUrl::Memory).unwrap()
        );
    }
}
