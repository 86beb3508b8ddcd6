//! Work that must finish even when its caller goes away, without a task of its own
//! while the caller stays.
//!
//! A claim on its way to the store, or a handler that has begun, must run to its end
//! whoever is still waiting for it: a claim applied with nobody to execute or release
//! it holds the key for the whole lease, and a handler cut off halfway leaves its
//! outcome unknown. Spawning such work as a task does that, but costs a task, a wake-up
//! and a second poll for every request, although callers nearly always stay.
//! [`Detached`] polls the work in the caller's task instead, and spawns what is left of
//! it only if the caller drops it unfinished.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use tracing::Instrument;

/// A future that runs in its caller's task while the caller waits for it, and is
/// spawned onto the current runtime, to run to its end, if the caller drops it first.
/// Its output is then dropped, as a finished task's is.
///
/// A panic in the work is caught and returned as `Err` (as a task's `JoinError`),
/// so that one request's panic does not take the caller (a server's connection
/// task) with it.
#[must_use = "futures do nothing unless polled"]
pub struct Detached<F: Future + Send + 'static>
where
    F::Output: Send + 'static,
{
    /// `None` once finished (or panicked).
    work: Option<Pin<Box<tracing::instrument::Instrumented<F>>>>,
}

/// What a panic in detached work left: its payload.
pub type Panicked = Box<dyn Any + Send + 'static>;

/// The message a panic was raised with, for a log line.
pub fn panic_message(panic: &Panicked) -> &str {
    if let Some(s) = panic.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "a panic without a message"
    }
}

impl<F> Detached<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    /// Wraps `work`; it keeps the current span (the request's), also if it is spawned.
    pub fn new(work: F) -> Self {
        Detached {
            work: Some(Box::pin(work.in_current_span())),
        }
    }
}

impl<F> Future for Detached<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    type Output = Result<F::Output, Panicked>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let work = self
            .work
            .as_mut()
            .expect("Detached polled after it finished");
        match std::panic::catch_unwind(AssertUnwindSafe(|| work.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(out)) => {
                self.work = None;
                Poll::Ready(Ok(out))
            }
            Err(panic) => {
                self.work = None;
                Poll::Ready(Err(panic))
            }
        }
    }
}

impl<F> Drop for Detached<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        let Some(work) = self.work.take() else {
            return;
        };
        // Without a runtime the work is dropped with its caller: whatever it holds
        // ends as its own drop says (a claim's lease runs out).
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(work);
        }
    }
}

impl<F> std::fmt::Debug for Detached<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detached")
            .field("finished", &self.work.is_none())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[tokio::test]
    async fn work_runs_in_the_callers_task() {
        let before = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        let out = Detached::new(async {
            tokio::task::yield_now().await;
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        })
        .await
        .unwrap();
        assert_eq!(out, before, "no task was spawned for the work");
    }

    #[tokio::test]
    async fn work_dropped_unfinished_runs_to_its_end() {
        let (gate, opened) = tokio::sync::oneshot::channel::<()>();
        let done = Arc::new(AtomicBool::new(false));
        let work = Detached::new({
            let done = done.clone();
            async move {
                opened.await.unwrap();
                done.store(true, Ordering::SeqCst);
            }
        });
        // The caller polls once, then goes away.
        let left = tokio::time::timeout(std::time::Duration::from_millis(10), work).await;
        assert!(left.is_err());
        assert!(!done.load(Ordering::SeqCst));
        gate.send(()).unwrap();
        for _ in 0..100 {
            if done.load(Ordering::SeqCst) {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the work its caller dropped did not finish");
    }

    #[tokio::test]
    async fn a_panic_is_returned_not_raised() {
        let out = Detached::new(async {
            if std::hint::black_box(true) {
                panic!("boom");
            }
        })
        .await;
        let panic = out.unwrap_err();
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"boom"));
    }
}
