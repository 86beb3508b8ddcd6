use std::sync::Arc;

use idem_core::{
    Engine, IntoShared, Policy, Routes, TenantCounting, TenantHasher, TenantLimits, TenantSecret,
    Wakeups,
};
use tower::Layer;

use crate::service::Idempotency;

/// Applies idempotency to a service: see the crate docs.
#[derive(Debug)]
pub struct IdempotencyLayer<St> {
    pub(crate) engine: Engine<St>,
    pub(crate) routes: Arc<Routes>,
}

impl<St> Clone for IdempotencyLayer<St> {
    fn clone(&self) -> Self {
        IdempotencyLayer {
            engine: self.engine.clone(),
            routes: self.routes.clone(),
        }
    }
}

impl<St: Wakeups> IdempotencyLayer<St> {
    /// A layer over `store`, with tenants derived from the `Authorization` (else
    /// `x-api-key`) header under `secret`, and the default policy on every route.
    /// `store` is a store (`MemoryStore::new()`) or a shared one (`Arc<S>`, to keep a
    /// handle on it); its type is inferred from it.
    pub fn new(store: impl IntoShared<Store = St>, secret: TenantSecret) -> Self {
        Self::from_engine(Engine::new(store.into_shared(), TenantHasher::new(secret)))
    }

    /// A layer over an existing engine (shared with other layers or the admin API).
    pub fn from_engine(engine: Engine<St>) -> Self {
        IdempotencyLayer {
            engine,
            routes: Arc::new(Routes::default()),
        }
    }

    /// Replaces the tenant hasher (to read the credential from other headers).
    #[must_use]
    pub fn with_tenants(self, tenants: TenantHasher) -> Self {
        IdempotencyLayer {
            engine: self.engine.with_tenants(tenants),
            routes: self.routes,
        }
    }

    /// Sets the policy of every route that has none of its own.
    ///
    /// # Panics
    /// If the policy is invalid; call [`Policy::validate`] first to handle the error.
    #[must_use]
    pub fn with_policy(self, policy: Policy) -> Self {
        let policy = policy
            .validate()
            .unwrap_or_else(|e| panic!("invalid idempotency policy: {e}"));
        let mut routes = Routes::new(policy);
        for r in self.routes.routes() {
            routes = routes
                .route(r.method.clone(), r.pattern.as_str(), (*r.policy).clone())
                .expect("routes already validated");
        }
        IdempotencyLayer {
            engine: self.engine,
            routes: Arc::new(routes),
        }
    }

    /// Sets the whole route table (per-route policies).
    #[must_use]
    pub fn with_routes(self, routes: Routes) -> Self {
        IdempotencyLayer {
            engine: self.engine,
            routes: Arc::new(routes),
        }
    }

    /// The engine every service of this layer shares: its store, its tenants, and
    /// the executions a graceful shutdown waits for.
    pub fn engine(&self) -> &Engine<St> {
        &self.engine
    }
}

impl<St: Wakeups + TenantCounting> IdempotencyLayer<St> {
    /// Caps what one tenant may hold (records in flight, live records): past a cap a
    /// request with a new key gets `429 tenant-limit-reached` and is not run. See
    /// [`Engine::with_tenant_limits`].
    #[must_use]
    pub fn with_tenant_limits(self, limits: TenantLimits) -> Self {
        IdempotencyLayer {
            engine: self.engine.with_tenant_limits(limits),
            routes: self.routes,
        }
    }
}

impl<S, St> Layer<S> for IdempotencyLayer<St> {
    type Service = Idempotency<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            engine: self.engine.clone(),
            routes: self.routes.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use idem_store_memory::MemoryStore;

    use super::*;

    fn secret() -> TenantSecret {
        TenantSecret::new(b"a-test-secret-of-enough-length".to_vec()).unwrap()
    }

    #[test]
    fn the_store_type_is_inferred_from_a_store_or_a_shared_one() {
        let by_value = IdempotencyLayer::new(MemoryStore::new(), secret());
        let _: &Arc<MemoryStore> = by_value.engine().store();
        let shared = Arc::new(MemoryStore::new());
        let layer = IdempotencyLayer::new(shared.clone(), secret());
        assert!(Arc::ptr_eq(layer.engine().store(), &shared));
    }
}
