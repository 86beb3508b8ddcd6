//! The one set of test fixtures for idem's crates (test-only, never published).
//!
//! - [`Counter`] and [`key_of`]: executions per key, as a handler saw them.
//! - [`upstream`]: a counting upstream on loopback (axum handlers for charges,
//!   captures, slow, failing and echoing routes, plus raw endpoints that reset or cut
//!   the connection), which the layer's and the proxy's tests put behind idem.
//! - [`serve_app`], [`client`], [`post`], [`Sent`]: serving an app on loopback, and
//!   sending the usual JSON POST with a key.
//! - [`layer`]: the Tower layer over a shared store (duplicate storm, retry right after
//!   the answer, store restart during traffic), run by every shared store's tests.

mod counter;
mod http;
pub mod layer;
pub mod upstream;

pub use counter::{Counter, key_of};
pub use http::{Sent, client, post, serve_app, serve_tls_app, tls_acceptor};
pub use upstream::{Upstream, upstream};
