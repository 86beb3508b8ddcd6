#![doc = include_str!("../README.md")]

pub use idem_core::*;

/// The Tower middleware (`idem-tower`): [`IdempotencyLayer`] and what it is made of.
#[cfg(feature = "tower")]
pub use idem_tower as tower;
#[cfg(feature = "tower")]
pub use idem_tower::IdempotencyLayer;

/// The in-memory store (`idem-store-memory`): one process, records lost on restart.
#[cfg(feature = "memory")]
pub use idem_store_memory as memory;
#[cfg(feature = "memory")]
pub use idem_store_memory::MemoryStore;

/// The SQLite store (`idem-store-sqlite`): one host, records kept across restarts.
#[cfg(feature = "sqlite")]
pub use idem_store_sqlite as sqlite;
#[cfg(feature = "sqlite")]
pub use idem_store_sqlite::SqliteStore;

/// The Redis store (`idem-store-redis`): shared by every instance, standalone or
/// cluster.
#[cfg(feature = "redis")]
pub use idem_store_redis as redis;
#[cfg(feature = "redis")]
pub use idem_store_redis::RedisStore;

/// The PostgreSQL store (`idem-store-postgres`): shared by every instance.
#[cfg(feature = "postgres")]
pub use idem_store_postgres as postgres;
#[cfg(feature = "postgres")]
pub use idem_store_postgres::PostgresStore;
