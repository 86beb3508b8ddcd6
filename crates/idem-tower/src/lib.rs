#![doc = include_str!("../README.md")]

mod body;
mod future;
mod layer;
mod service;

pub use body::{BoxError, RequestBody, ResponseBody};
pub use future::ResponseFuture;
pub use idem_core;
pub use layer::IdempotencyLayer;
pub use service::Idempotency;

/// Put this in a response's extensions to say "do not store this outcome": the key is
/// released and a retry executes again (e.g. a validation failure the handler knows
/// changed nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NoStore;

/// Put this in a response's extensions to say "the outcome is unknown" (e.g. a proxy
/// lost the upstream's answer after sending the request): nothing is stored and the
/// key is not released; it stays in flight until its lease expires, then follows
/// `on_abandoned`. The response itself is delivered as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutcomeUnknown;

/// What the layer did with a request; found in every response's extensions (for
/// metrics and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The request executed under a claimed key.
    Executed,
    /// The request executed but its outcome is unknown ([`OutcomeUnknown`]): the key
    /// stays in flight until its lease expires.
    Unknown,
    /// The stored outcome was replayed.
    Replayed,
    /// idem refused the request; the problem's kind says why (and gives its metrics
    /// label).
    Rejected(idem_core::ProblemKind),
    /// The request passed through without protection.
    Passed(idem_core::PassReason),
}
