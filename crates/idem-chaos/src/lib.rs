#![doc = include_str!("../README.md")]

pub mod client;
pub mod history;
pub mod procs;
pub mod scenario;
pub mod upstream;

pub use history::{Findings, History, check};
pub use scenario::{FaultKind, Outcome, Report, Scenario, StoreKind, run};
