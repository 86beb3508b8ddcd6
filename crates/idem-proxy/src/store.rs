//! Picking a store from a URL at run time, and the tenant secret that goes with it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use idem_core::crypto::{Encrypted, EncryptionKey};
use idem_core::store::DynStore;
use idem_store_memory::MemoryStore;
use idem_store_postgres::{PostgresOptions, PostgresStore};
use idem_store_redis::tls::RedisTls;
use idem_store_redis::{RedisStore, Topology};
use idem_store_sqlite::{Durability, SqliteOptions, SqliteStore};

/// A parsed store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `memory`.
    Memory,
    /// `sqlite:PATH[?synchronous=full|normal]`.
    Sqlite(PathBuf, Durability),
    /// `redis://…` or `rediss://…`, standalone or cluster.
    Redis(String),
    /// `postgres://…` or `postgresql://…`.
    Postgres(String),
}

/// Parses a store URL; the error says what is accepted.
pub fn parse_url(url: &str) -> Result<StoreUrl, String> {
    if url == "memory" {
        return Ok(StoreUrl::Memory);
    }
    if let Some(rest) = url.strip_prefix("sqlite:") {
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if path.is_empty() {
            return Err("sqlite: needs a file path, as in sqlite:idem.db".into());
        }
        let mut durability = Durability::Full;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            durability = match pair.split_once('=') {
                Some(("synchronous", v)) if v.eq_ignore_ascii_case("full") => Durability::Full,
                Some(("synchronous", v)) if v.eq_ignore_ascii_case("normal") => Durability::Normal,
                Some(("synchronous", v)) => {
                    return Err(format!("sqlite: synchronous={v:?}: use full or normal"));
                }
                _ => {
                    return Err(format!(
                        "sqlite: unknown parameter {pair:?}; the one parameter is synchronous=full|normal"
                    ));
                }
            };
        }
        return Ok(StoreUrl::Sqlite(PathBuf::from(path), durability));
    }
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        // The TLS files are read and checked now, so that a wrong one stops start-up.
        let (plain, _) = RedisTls::split_url(url).map_err(|e| e.to_string())?;
        Topology::parse(&plain).map_err(|e| e.to_string())?;
        return Ok(StoreUrl::Redis(url.to_owned()));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let (_, tls) = idem_store_postgres::tls::split_url(url).map_err(|e| e.to_string())?;
        tls.connector().map_err(|e| e.to_string())?;
        return Ok(StoreUrl::Postgres(url.to_owned()));
    }
    Err(format!(
        "{url:?} is not a store URL; use memory, sqlite:PATH, redis://host:port[/db][?cluster=true] \
         or postgres://user@host:port/db"
    ))
}

/// Checks a store URL without opening it.
pub fn check_url(url: &str) -> Result<(), String> {
    parse_url(url).map(|_| ())
}

/// Opens the store a URL names, sealing stored responses when a key is given.
/// `wakeups`: whether some route waits for concurrent duplicates (`on_concurrent =
/// "wait"`). Without such a route PostgreSQL is opened without `pg_notify`, whose
/// commits do not group-commit (see `PostgresOptions::notify`).
pub async fn open(
    url: &str,
    encryption: Option<&EncryptionKey>,
    wakeups: bool,
) -> Result<Arc<dyn DynStore>, String> {
    let store = open_plain(url, wakeups).await?;
    Ok(match encryption {
        Some(key) => Arc::new(Encrypted::new(store, key)),
        None => store,
    })
}

async fn open_plain(url: &str, wakeups: bool) -> Result<Arc<dyn DynStore>, String> {
    Ok(match parse_url(url)? {
        StoreUrl::Memory => Arc::new(MemoryStore::new()),
        StoreUrl::Sqlite(path, durability) => Arc::new(
            SqliteStore::open_with(&path, SqliteOptions::default().with_durability(durability))
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?,
        ),
        StoreUrl::Redis(url) => Arc::new(
            RedisStore::connect(&url)
                .await
                .map_err(|e| format!("store: cannot connect to {url}: {e}"))?,
        ),
        StoreUrl::Postgres(url) => Arc::new(
            PostgresStore::connect_with(&url, PostgresOptions::default().with_notify(wakeups))
                .await
                .map_err(|e| format!("store: cannot connect to {url}: {e}"))?,
        ),
    })
}

/// The tenant secret when none is configured. A store shared between processes needs
/// the same secret everywhere, so it must be configured; the embedded stores can make
/// their own: a random one per process for `memory` (whose records die with it), and
/// for SQLite a random one kept beside the database (`PATH.secret`, mode 0600) so that
/// keys still match after a restart.
pub fn default_secret(url: &str) -> Result<Vec<u8>, String> {
    match parse_url(url)? {
        StoreUrl::Memory => Ok(random_secret()),
        StoreUrl::Sqlite(path, _) => secret_beside(&path),
        StoreUrl::Redis(_) | StoreUrl::Postgres(_) => Err(
            "a shared store needs the same tenant secret on every instance: set tenant.secret or $IDEM_TENANT_SECRET".into(),
        ),
    }
}

fn random_secret() -> Vec<u8> {
    let mut s = vec![0u8; 32];
    rand::fill(&mut s[..]);
    s
}

fn secret_beside(db: &Path) -> Result<Vec<u8>, String> {
    let mut name = db.as_os_str().to_owned();
    name.push(".secret");
    let path = PathBuf::from(name);
    match std::fs::read(&path) {
        Ok(s) if s.len() >= idem_core::TenantSecret::MIN_LEN => return Ok(s),
        Ok(_) => {
            return Err(format!(
                "{} is too short to be a tenant secret",
                path.display()
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    }
    let secret = hex_string(&random_secret()).into_bytes();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    use std::io::Write;
    match options.open(&path) {
        Ok(mut f) => f
            .write_all(&secret)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?,
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return std::fs::read(&path).map_err(|e| e.to_string());
        }
        Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
    }
    Ok(secret)
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(parse_url("memory"), Ok(StoreUrl::Memory));
        assert_eq!(
            parse_url("sqlite:idem.db"),
            Ok(StoreUrl::Sqlite("idem.db".into(), Durability::Full))
        );
        assert_eq!(
            parse_url("sqlite:///var/lib/idem.db"),
            Ok(StoreUrl::Sqlite(
                "/var/lib/idem.db".into(),
                Durability::Full
            ))
        );
        assert_eq!(
            parse_url("sqlite:idem.db?synchronous=normal"),
            Ok(StoreUrl::Sqlite("idem.db".into(), Durability::Normal))
        );
        assert!(parse_url("sqlite:").is_err());
        assert!(parse_url("sqlite:idem.db?synchronous=off").is_err());
        assert!(parse_url("sqlite:idem.db?journal=wal").is_err());
        assert_eq!(
            parse_url("redis://127.0.0.1:6379/0"),
            Ok(StoreUrl::Redis("redis://127.0.0.1:6379/0".into()))
        );
        assert!(parse_url("redis://127.0.0.1:7000,127.0.0.1:7001").is_ok());
        assert!(parse_url("postgres://postgres@127.0.0.1:5432/test").is_ok());
        assert!(
            default_secret("postgres://postgres@127.0.0.1/test").is_err(),
            "shared stores need a configured secret"
        );
        assert!(parse_url("mongodb://x").is_err());
    }

    #[test]
    fn sqlite_secret_is_kept_beside_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("idem.db").display());
        let a = default_secret(&url).unwrap();
        let b = default_secret(&url).unwrap();
        assert_eq!(a, b);
        assert!(a.len() >= 32);
        assert_ne!(
            default_secret("memory").unwrap(),
            default_secret("memory").unwrap()
        );
    }
}
