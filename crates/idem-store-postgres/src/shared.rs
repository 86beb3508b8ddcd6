//! The request path's connections: a few per runtime, each shared by every caller of
//! that runtime, whose statements tokio-postgres pipelines on it.
//!
//! Every store operation on the request path is one statement (or, for a complete
//! that notifies, two sent together), and each ends with its own `Sync`, so statements
//! of unrelated callers can follow one another on one connection: an error or a
//! rollback of one never touches the next. A backend that finds several statements
//! waiting in its socket runs them one after the other without going back to sleep,
//! and answers them in one go: with one caller per connection at a time, as a pool
//! lends them, every statement costs PostgreSQL a wake-up and idem a read of its own
//! (measured: docs/benchmarks.md, "PostgreSQL").
//!
//! A caller takes an idle connection if there is one, else opens one more while the
//! runtime has fewer than its share, else joins the connection with the fewest
//! callers. A statement that commits still waits for its own WAL flush, and the ones
//! behind it on that connection wait with it; commits on different connections still
//! flush together.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use deadpool_postgres::{ClientWrapper, ConfigConnectImpl, Connect};
use idem_core::store::{StoreError, StoreErrorKind};
use tokio::sync::Notify;

use crate::map_pg;
use crate::tls::RustlsConnect;

/// One connection, with its driver task and its prepared statements
/// (`prepare_cached`), as deadpool makes them.
pub(crate) type Conn = ClientWrapper;

/// The shared connections of one runtime.
pub(crate) struct Shared {
    config: tokio_postgres::Config,
    /// Opens a connection and spawns its driver, as the exclusive pool's do.
    connect: ConfigConnectImpl<RustlsConnect>,
    /// At most this many connections.
    size: usize,
    state: Mutex<State>,
    /// Told when an opening ends, to callers that found no connection at all.
    opened: Notify,
}

#[derive(Default)]
struct State {
    conns: Vec<Arc<Conn>>,
    /// A connection is being opened (one at a time).
    opening: bool,
}

enum Pick {
    Use(Arc<Conn>),
    Open,
    Wait,
}

impl Shared {
    pub(crate) fn new(config: tokio_postgres::Config, tls: RustlsConnect, size: usize) -> Self {
        Shared {
            config,
            connect: ConfigConnectImpl { tls },
            size: size.max(1),
            state: Mutex::new(State::default()),
            opened: Notify::new(),
        }
    }

    /// A connection for one statement (or one pipelined pair); the caller holds the
    /// `Arc` while its statements run, which is how the others see it busy.
    pub(crate) async fn conn(&self, timeout: Duration) -> Result<Arc<Conn>, StoreError> {
        loop {
            let opened = self.opened.notified();
            match self.pick() {
                Pick::Use(c) => return Ok(c),
                Pick::Open => return self.open(timeout).await,
                Pick::Wait => opened.await,
            }
        }
    }

    fn pick(&self) -> Pick {
        let mut st = lock(&self.state);
        // A connection whose socket broke (server restart) is forgotten; its callers
        // get their errors, the next ones a new connection.
        st.conns.retain(|c| !c.is_closed());
        // Each caller holds a clone: the count is the connection's callers, plus one.
        let least = st.conns.iter().min_by_key(|c| Arc::strong_count(c));
        match least {
            Some(c) if Arc::strong_count(c) == 1 => Pick::Use(c.clone()),
            _ if st.conns.len() < self.size && !st.opening => {
                st.opening = true;
                Pick::Open
            }
            Some(c) => Pick::Use(c.clone()),
            None => Pick::Wait,
        }
    }

    async fn open(&self, timeout: Duration) -> Result<Arc<Conn>, StoreError> {
        // Ends the opening however this future ends (done, failed, or dropped).
        struct Opening<'a>(&'a Shared);
        impl Drop for Opening<'_> {
            fn drop(&mut self) {
                lock(&self.0.state).opening = false;
                self.0.opened.notify_waiters();
            }
        }
        let _opening = Opening(self);
        // Its driver task is spawned on the runtime that opens it, as its callers are.
        let (client, driver) = tokio::time::timeout(timeout, self.connect.connect(&self.config))
            .await
            .map_err(|_| {
                StoreError::msg(StoreErrorKind::Unavailable, "postgres connect timed out")
            })?
            .map_err(map_pg)?;
        let conn = Arc::new(ClientWrapper::new(client, driver));
        lock(&self.state).conns.push(conn.clone());
        Ok(conn)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
