//! Read connections beside the one writer. WAL lets a reader see the last committed
//! state while the writer thread runs its next batch, so a replay or a duplicate (a
//! `claim` that finds a live record) and a `get` never queue behind a batch of
//! claims.
//!
//! A read is an optimisation, never the source of truth: when every reader is busy,
//! or SQLite answers busy or fails, the operation goes to the writer as before.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

/// A few lazily opened read-only connections, each behind its own lock.
#[derive(Debug)]
pub(crate) struct Readers {
    conns: Box<[Mutex<Option<Connection>>]>,
}

impl Readers {
    /// As many readers as threads can use them at once.
    pub(crate) fn new() -> Self {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 16));
        Readers {
            conns: (0..n).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// Runs `f` on the first free reader; `None` when none is free or the read failed
    /// (the caller then asks the writer). The read is a point lookup on a B-tree of a
    /// few levels (microseconds), so it runs on the caller's thread: handing it to
    /// another thread would cost more than the read.
    pub(crate) fn try_read<T>(
        &self,
        path: &Path,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Option<T> {
        let mut slot = self.conns.iter().find_map(|c| c.try_lock().ok())?;
        if slot.is_none() {
            *slot = Some(open(path).ok()?);
        }
        match f(slot.as_ref()?) {
            Ok(v) => Some(v),
            Err(e) => {
                // Busy, or broken: the writer answers this one; a broken connection is
                // reopened next time.
                if !matches!(
                    e.sqlite_error_code(),
                    Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
                ) {
                    *slot = None;
                }
                None
            }
        }
    }
}

fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // Never wait: a busy reader hands the operation to the writer instead.
    conn.busy_timeout(Duration::ZERO)?;
    conn.pragma_update(None, "cache_size", READER_CACHE_KIB)?;
    Ok(conn)
}

/// Page cache of each reader, in KiB (a negative `cache_size`): the inner pages of
/// the primary key stay cached, so a lookup reads at most its leaf.
const READER_CACHE_KIB: i64 = -16 * 1024;
