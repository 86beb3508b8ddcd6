//! Wake-ups: the [`Wakeups`] capability, and the notifiers stores build it from.

use std::future::Future;
use std::time::Duration;

use super::{BoxFuture, Store, StoreError};
use crate::scope::RecordKey;

/// Resolves when the watched record may have changed (completed, released, deleted), or
/// when the store cannot tell any more (the caller then re-reads the record).
pub type Watch = BoxFuture<'static, ()>;

/// The capability to say when a record changes, so that a request waiting for a
/// concurrent duplicate (`on_concurrent = "wait"`) wakes when it ends instead of
/// sleeping until its deadline. The [`Engine`](crate::Engine) requires it. Stores in
/// this process notify with a [`Notifier`], remote ones with [`RemoteWakeups`]; a store
/// that cannot notify polls, and says so: its `watch` returns [`poll`].
pub trait Wakeups: Store {
    /// Starts watching a record. The returned future resolves at its next change
    /// (complete, release, delete, reclaim); subscribe *before* re-reading the record
    /// so that no change is missed.
    fn watch(&self, key: &RecordKey) -> impl Future<Output = Result<Watch, StoreError>> + Send;
}

/// A watch for stores that cannot notify: it resolves after `every` (25 ms keeps a
/// waiting duplicate's added latency small at little cost), and the waiter re-reads
/// the record.
pub fn poll(every: Duration) -> Watch {
    Box::pin(tokio::time::sleep(every))
}

type WatchShard =
    std::sync::Mutex<std::collections::HashMap<RecordKey, tokio::sync::watch::Sender<()>>>;

/// In-process change notification for stores that live in this process (memory,
/// SQLite): waiters subscribe to a key and are woken by `notify`, without polling.
#[derive(Debug)]
pub struct Notifier {
    hasher: std::hash::RandomState,
    shards: Box<[WatchShard]>,
}

impl Default for Notifier {
    fn default() -> Self {
        Notifier {
            hasher: std::hash::RandomState::new(),
            shards: (0..16).map(|_| Default::default()).collect(),
        }
    }
}

impl Notifier {
    fn shard(
        &self,
        key: &RecordKey,
    ) -> &std::sync::Mutex<std::collections::HashMap<RecordKey, tokio::sync::watch::Sender<()>>>
    {
        use std::hash::BuildHasher;
        let h = self.hasher.hash_one(&key.key) as usize;
        &self.shards[h % self.shards.len()]
    }

    /// Subscribes to the next change of `key`.
    pub fn subscribe(&self, key: &RecordKey) -> Watch {
        let mut map = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        let tx = map
            .entry(key.clone())
            .or_insert_with(|| tokio::sync::watch::channel(()).0);
        let mut rx = tx.subscribe();
        Box::pin(async move {
            let _ = rx.changed().await;
        })
    }

    /// Wakes every subscriber of `key`. Costs one map lookup when nobody waits.
    pub fn notify(&self, key: &RecordKey) {
        let tx = self
            .shard(key)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        if let Some(tx) = tx {
            tx.send_replace(());
        }
    }
}

/// Wake-ups for stores that hear of changes from their server (Redis pub/sub,
/// PostgreSQL `LISTEN`): the store's listener task says when it is subscribed, when it
/// lost its connection, and which record (by storage id) changed. A watch resolves at
/// a change of its record, when the listener drops, or after `resync` at the latest;
/// while the listener is down, watches poll.
#[derive(Debug)]
pub struct RemoteWakeups {
    notifier: Notifier,
    /// True while the listener is subscribed.
    live: std::sync::atomic::AtomicBool,
    /// Bumped whenever the listener drops, so that watches re-read.
    epoch: tokio::sync::watch::Sender<u64>,
}

impl Default for RemoteWakeups {
    fn default() -> Self {
        RemoteWakeups {
            notifier: Notifier::default(),
            live: std::sync::atomic::AtomicBool::new(false),
            epoch: tokio::sync::watch::channel(0).0,
        }
    }
}

impl RemoteWakeups {
    /// The listener is subscribed: watches wait for notifications from now on.
    pub fn connected(&self) {
        self.live.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The listener lost its subscription: every pending watch resolves (its caller
    /// re-reads), and watches poll until [`RemoteWakeups::connected`].
    pub fn disconnected(&self) {
        if self.live.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.epoch.send_modify(|e| *e += 1);
        }
    }

    /// The record with this storage id changed.
    pub fn changed(&self, storage_id: &str) {
        self.notifier.notify(&Self::by_id(storage_id));
    }

    /// Watches `key`: see the type's docs.
    pub fn watch(&self, key: &RecordKey, poll: Duration, resync: Duration) -> Watch {
        // Subscribe to drops first, so a drop between the check and the subscription
        // still wakes this watch.
        let mut dropped = self.epoch.subscribe();
        if !self.live.load(std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(tokio::time::sleep(poll));
        }
        let change = self.notifier.subscribe(&Self::by_id(&key.storage_id()));
        Box::pin(async move {
            tokio::select! {
                () = change => {}
                _ = dropped.changed() => {}
                () = tokio::time::sleep(resync) => {}
            }
        })
    }

    /// Notifications carry only the storage id: the notifier is keyed by it alone.
    fn by_id(storage_id: &str) -> RecordKey {
        RecordKey::new("", "", storage_id)
    }
}
