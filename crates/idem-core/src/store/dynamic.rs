//! Object-safe twins of the store traits, for stores picked at run time. Generated from
//! the one method list in [`forward`](super::forward), never forwarded by hand.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::{InFlightListing, Store, TenantCounting, Wakeups};

/// A boxed, sendable future (for [`DynStore`]).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The object-safe twin of [`Store`] and all its capabilities, for stores picked at
/// run time (the proxy reads a URL). Every store with all the capabilities is a
/// `DynStore`, and `Arc<dyn DynStore>` is such a store again.
pub trait DynStore: Send + Sync + 'static {
    crate::__store_method!(['a dyn_decl] claim);
    crate::__store_method!(['a dyn_decl] reclaim);
    crate::__store_method!(['a dyn_decl] complete);
    crate::__store_method!(['a dyn_decl] release);
    crate::__store_method!(['a dyn_decl] renew);
    crate::__store_method!(['a dyn_decl] get);
    crate::__store_method!(['a dyn_decl] delete);
    crate::__store_method!(['a dyn_decl] purge_expired);
    crate::__store_method!(['a dyn_decl] ping);
    crate::__store_method!(['a dyn_decl] admit);
    crate::__store_method!(['a dyn_decl] settle);
    crate::__store_method!(['a dyn_decl] watch);
    crate::__store_method!(['a dyn_decl] list_in_flight);
}

impl<S: Store + TenantCounting + Wakeups + InFlightListing> DynStore for S {
    crate::__store_method!(['a dyn_impl] claim);
    crate::__store_method!(['a dyn_impl] reclaim);
    crate::__store_method!(['a dyn_impl] complete);
    crate::__store_method!(['a dyn_impl] release);
    crate::__store_method!(['a dyn_impl] renew);
    crate::__store_method!(['a dyn_impl] get);
    crate::__store_method!(['a dyn_impl] delete);
    crate::__store_method!(['a dyn_impl] purge_expired);
    crate::__store_method!(['a dyn_impl] ping);
    crate::__store_method!(['a dyn_impl] admit);
    crate::__store_method!(['a dyn_impl] settle);
    crate::__store_method!(['a dyn_impl] watch);
    crate::__store_method!(['a dyn_impl] list_in_flight);
}

impl Store for Arc<dyn DynStore> {
    crate::__store_method!(['_ from_dyn DynStore] claim);
    crate::__store_method!(['_ from_dyn DynStore] reclaim);
    crate::__store_method!(['_ from_dyn DynStore] complete);
    crate::__store_method!(['_ from_dyn DynStore] release);
    crate::__store_method!(['_ from_dyn DynStore] renew);
    crate::__store_method!(['_ from_dyn DynStore] get);
    crate::__store_method!(['_ from_dyn DynStore] delete);
    crate::__store_method!(['_ from_dyn DynStore] purge_expired);
    crate::__store_method!(['_ from_dyn DynStore] ping);
}

impl TenantCounting for Arc<dyn DynStore> {
    crate::__store_method!(['_ from_dyn DynStore] admit);
    crate::__store_method!(['_ from_dyn DynStore] settle);
}

impl Wakeups for Arc<dyn DynStore> {
    crate::__store_method!(['_ from_dyn DynStore] watch);
}

impl InFlightListing for Arc<dyn DynStore> {
    crate::__store_method!(['_ from_dyn DynStore] list_in_flight);
}

/// The object-safe twin of [`TenantCounting`] alone: how the engine keeps the store
/// that counts its tenant caps without requiring the capability of every store it
/// runs on.
pub trait DynTenantCounting: Send + Sync + 'static {
    crate::__store_method!(['a dyn_decl] admit);
    crate::__store_method!(['a dyn_decl] settle);
}

impl<S: TenantCounting> DynTenantCounting for S {
    crate::__store_method!(['a dyn_impl] admit);
    crate::__store_method!(['a dyn_impl] settle);
}
