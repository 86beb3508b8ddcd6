#![doc = include_str!("../README.md")]

pub mod admin;
pub mod config;
pub mod keys;
pub mod metrics;
pub mod observe;
pub mod proxy;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
