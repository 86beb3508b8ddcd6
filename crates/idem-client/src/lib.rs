#![doc = include_str!("../README.md")]

mod answer;
mod classify;
mod error;
mod key;
mod middleware;
mod policy;
mod run;

pub use answer::{Answer, Failure, TransportError};
pub use error::{Error, LastAttempt, Stopped};
pub use key::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, IdempotencyKey, KeyError, MAX_KEY_LEN};
pub use middleware::IdempotencyMiddleware;
pub use policy::{PolicyError, RetryPolicy};
pub use reqwest_middleware;
pub use run::{Attempt, retry, retry_with_key};
