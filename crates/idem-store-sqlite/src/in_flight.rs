//! Listing the records in flight ([`idem_core::InFlightListing::list_in_flight`]) on a
//! connection of its own: WAL lets it read while the writer thread writes, so an
//! operator's page never waits behind a batch of claims.

use std::sync::{Arc, Mutex};

use idem_core::record::now_millis;
use idem_core::{InFlightRecord, RecordKey, StoreError, StoreErrorKind};
use rusqlite::{Connection, OpenFlags, params};

use crate::{Inner, backend};

/// Walks the partial index `idem_records_in_flight` (rows with a token, by creation
/// time): the cost is that of the rows listed, not of the table.
const LIST: &str = "SELECT tenant, route, key, created_at, lease_expires_at
     FROM idem_records INDEXED BY idem_records_in_flight
     WHERE token IS NOT NULL AND expires_at > ?1
     ORDER BY created_at LIMIT ?2";

/// The lazily opened read-only connection.
pub(crate) type Reader = Mutex<Option<Connection>>;

pub(crate) async fn list(
    inner: Arc<Inner>,
    limit: usize,
) -> Result<Vec<InFlightRecord>, StoreError> {
    tokio::task::spawn_blocking(move || {
        let mut reader = inner.reader.lock().unwrap_or_else(|e| e.into_inner());
        if reader.is_none() {
            let conn = Connection::open_with_flags(
                &inner.path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(backend)?;
            *reader = Some(conn);
        }
        let conn = reader.as_ref().expect("opened above");
        query(conn, limit).map_err(|e| {
            // A broken connection is reopened next time.
            *reader = None;
            backend(e)
        })
    })
    .await
    .map_err(|e| StoreError::new(StoreErrorKind::Backend, "sqlite reader task", e))?
}

fn query(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<InFlightRecord>> {
    let mut stmt = conn.prepare_cached(LIST)?;
    let rows = stmt.query_map(
        params![now_millis() as i64, limit.min(i64::MAX as usize) as i64],
        |row| {
            Ok(InFlightRecord {
                key: RecordKey::new(
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                ),
                created_at: row.get::<_, i64>(3)? as u64,
                lease_expires_at: row.get::<_, Option<i64>>(4)?.unwrap_or(0) as u64,
            })
        },
    )?;
    rows.collect()
}
