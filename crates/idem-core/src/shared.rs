//! A store given by value or already shared, with its type inferred from either.

use std::sync::Arc;

use crate::store::Store;

/// A store given by value (`MemoryStore::new()`) or already shared (`Arc<S>`, to
/// keep a handle on it): what the layer's constructor takes, so that the store's type
/// is inferred from the argument, with no turbofish and no `Arc::new` at the call.
pub trait IntoShared {
    /// The store's type: `S` for both `S` and `Arc<S>`.
    type Store: Store;

    /// The store behind an `Arc`: the given one, or a new one around it.
    fn into_shared(self) -> Arc<Self::Store>;
}

impl<S: Store> IntoShared for S {
    type Store = S;

    fn into_shared(self) -> Arc<S> {
        Arc::new(self)
    }
}

/// Coherent with the impl above because no `Arc<S>` of a sized `S` is a [`Store`]
/// (only `Arc<dyn DynStore>` is, and it is its own store).
impl<S: Store> IntoShared for Arc<S> {
    type Store = S;

    fn into_shared(self) -> Arc<S> {
        self
    }
}
