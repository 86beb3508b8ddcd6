#![doc = include_str!("../README.md")]

pub mod crypto;
pub mod detach;
pub mod engine;
pub mod fingerprint;
pub mod key;
pub mod policy;
pub mod problem;
pub mod record;
pub mod routes;
pub mod scope;
pub mod shared;
pub mod store;

pub use detach::{Detached, Panicked, panic_message};
pub use engine::{Decision, Engine, Execution, Executions, Finished, Keep, PassReason, Replay};
pub use fingerprint::{Fingerprint, FingerprintMode};
pub use key::{IdempotencyKey, KeyError, KeyRules};
pub use policy::Policy;
pub use problem::{Problem, ProblemKind, Rejection, TenantCap};
pub use record::{BodyKept, FencingToken, Lease, Record, RecordState, Recorded, StoredResponse};
pub use routes::{Resolved, Routes};
pub use scope::{RecordKey, TenantHasher, TenantSecret};
pub use shared::IntoShared;
pub use store::{
    Admission, Claim, ClaimSpec, InFlightListing, InFlightRecord, Store, StoreError,
    StoreErrorKind, TenantCounting, TenantLimits, Wakeups,
};
