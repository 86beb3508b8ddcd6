//! Executions as the handler saw them, and the key a request carried.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;

/// Executions per name (`route:key`, or whatever the test counts), shared by the
/// handlers of a test upstream and the test that asserts on them.
#[derive(Clone, Debug, Default)]
pub struct Counter(Arc<Mutex<HashMap<String, usize>>>);

impl Counter {
    /// Counts one execution of `what`; returns how many there have been, this one
    /// included.
    pub fn hit(&self, what: &str) -> usize {
        let mut m = self.0.lock().unwrap();
        let n = m.entry(what.to_owned()).or_default();
        *n += 1;
        *n
    }

    /// How many times `what` executed (0 if never).
    pub fn get(&self, what: &str) -> usize {
        self.0.lock().unwrap().get(what).copied().unwrap_or(0)
    }

    /// Executions of every name together.
    pub fn total(&self) -> usize {
        self.0.lock().unwrap().values().sum()
    }

    /// The most executions any one name had (1 when everything ran exactly once).
    pub fn max(&self) -> usize {
        self.0.lock().unwrap().values().copied().max().unwrap_or(0)
    }

    /// How many distinct names executed at least once.
    pub fn keys(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// The request's `Idempotency-Key`, or `""` without one.
pub fn key_of(h: &HeaderMap) -> String {
    h.get("idempotency-key")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}
