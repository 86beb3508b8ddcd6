//! Forwarding, generated once. Every method of the store traits is written down once,
//! in [`__store_method!`](crate::__store_method); [`forward_store!`](crate::forward_store)
//! (wrappers), [`DynStore`](super::DynStore) and its blanket impls are generated from
//! that list. The traits have no default methods, so a wrapper that neither writes nor
//! forwards a method does not compile.

/// Implements methods of [`Store`](crate::Store) and its capability traits by
/// forwarding them to another store, inside an `impl` block of the trait. List the
/// methods the wrapper does not change; write the others by hand.
///
/// - `forward_store!(field => m1, m2)` calls the same method on `self.field`, a store
///   (a `S: Store`, an `Arc<S>`, an `Arc<dyn DynStore>`).
/// - `forward_store!(field, around hook => m1, m2)` passes each call through
///   `self.hook(op, key, future)`: `op` is the method's name, `key` its record key
///   (`None` for `purge_expired`, `ping`, `list_in_flight`), `future` the inner call.
/// - `forward_store!(* => m1, m2)` calls the store `self` dereferences to (`**self`).
///
/// ```
/// use idem_core::store::{InFlightListing, InFlightRecord, StoreError};
/// use idem_core::{Store, forward_store};
///
/// /// Hides the records in flight; passes everything else through.
/// struct Discreet<S>(S);
///
/// impl<S: Store> Store for Discreet<S> {
///     forward_store!(0 => claim, reclaim, complete, release, renew, get, delete, purge_expired, ping);
/// }
///
/// impl<S: Store> InFlightListing for Discreet<S> {
///     async fn list_in_flight(&self, _: usize) -> Result<Vec<InFlightRecord>, StoreError> {
///         Ok(Vec::new())
///     }
/// }
/// ```
#[macro_export]
macro_rules! forward_store {
    (* => $($method:ident),+ $(,)?) => {
        $( $crate::__store_method!(['_ deref] $method); )+
    };
    ($field:tt, around $hook:ident => $($method:ident),+ $(,)?) => {
        $( $crate::__store_method!(['_ around $field $hook] $method); )+
    };
    ($field:tt => $($method:ident),+ $(,)?) => {
        $( $crate::__store_method!(['_ field $field] $method); )+
    };
}

/// The one list of the store traits' methods: each one's trait, whether it takes a
/// record key (`keyed`), parameters and answer, handed to
/// [`__store_emit!`](crate::__store_emit) with a mode `[lifetime mode…]`. Not for use
/// outside this crate's macros.
#[doc(hidden)]
#[macro_export]
macro_rules! __store_method {
    ([$lt:lifetime $($mode:tt)*] claim) => {
        $crate::__store_emit! { [$lt $($mode)*] Store claim keyed(
            key: &$lt $crate::scope::RecordKey,
            spec: $crate::store::ClaimSpec<$lt>
        ) -> $crate::store::Claim }
    };
    ([$lt:lifetime $($mode:tt)*] reclaim) => {
        $crate::__store_emit! { [$lt $($mode)*] Store reclaim keyed(
            key: &$lt $crate::scope::RecordKey,
            stale: $crate::record::FencingToken,
            spec: $crate::store::ClaimSpec<$lt>
        ) -> ::core::option::Option<$crate::record::Lease> }
    };
    ([$lt:lifetime $($mode:tt)*] complete) => {
        $crate::__store_emit! { [$lt $($mode)*] Store complete keyed(
            key: &$lt $crate::scope::RecordKey,
            token: $crate::record::FencingToken,
            response: &$lt $crate::record::StoredResponse,
            ttl: ::core::time::Duration
        ) -> bool }
    };
    ([$lt:lifetime $($mode:tt)*] release) => {
        $crate::__store_emit! { [$lt $($mode)*] Store release keyed(
            key: &$lt $crate::scope::RecordKey,
            token: $crate::record::FencingToken
        ) -> bool }
    };
    ([$lt:lifetime $($mode:tt)*] renew) => {
        $crate::__store_emit! { [$lt $($mode)*] Store renew keyed(
            key: &$lt $crate::scope::RecordKey,
            token: $crate::record::FencingToken,
            lease: ::core::time::Duration
        ) -> bool }
    };
    ([$lt:lifetime $($mode:tt)*] get) => {
        $crate::__store_emit! { [$lt $($mode)*] Store get keyed(
            key: &$lt $crate::scope::RecordKey
        ) -> ::core::option::Option<$crate::record::Record> }
    };
    ([$lt:lifetime $($mode:tt)*] delete) => {
        $crate::__store_emit! { [$lt $($mode)*] Store delete keyed(
            key: &$lt $crate::scope::RecordKey
        ) -> bool }
    };
    ([$lt:lifetime $($mode:tt)*] purge_expired) => {
        $crate::__store_emit! { [$lt $($mode)*] Store purge_expired unkeyed() -> u64 }
    };
    ([$lt:lifetime $($mode:tt)*] ping) => {
        $crate::__store_emit! { [$lt $($mode)*] Store ping unkeyed() -> () }
    };
    ([$lt:lifetime $($mode:tt)*] admit) => {
        $crate::__store_emit! { [$lt $($mode)*] TenantCounting admit keyed(
            key: &$lt $crate::scope::RecordKey,
            limits: $crate::store::TenantLimits,
            lease: ::core::time::Duration,
            ttl: ::core::time::Duration
        ) -> $crate::store::Admission }
    };
    ([$lt:lifetime $($mode:tt)*] settle) => {
        $crate::__store_emit! { [$lt $($mode)*] TenantCounting settle keyed(
            key: &$lt $crate::scope::RecordKey,
            kept: ::core::option::Option<::core::time::Duration>
        ) -> () }
    };
    ([$lt:lifetime $($mode:tt)*] watch) => {
        $crate::__store_emit! { [$lt $($mode)*] Wakeups watch keyed(
            key: &$lt $crate::scope::RecordKey
        ) -> $crate::store::Watch }
    };
    ([$lt:lifetime $($mode:tt)*] list_in_flight) => {
        $crate::__store_emit! { [$lt $($mode)*] InFlightListing list_in_flight unkeyed(
            limit: usize
        ) -> ::std::vec::Vec<$crate::store::InFlightRecord> }
    };
}

/// Writes one method of [`__store_method!`](crate::__store_method) in a mode: a
/// forwarding impl (`field`, `around`, `deref`, `from_dyn`), or the object-safe twin's
/// declaration (`dyn_decl`) and blanket impl (`dyn_impl`). Not for use outside this
/// crate's macros.
#[doc(hidden)]
#[macro_export]
macro_rules! __store_emit {
    ([$lt:lifetime field $f:tt] $tr:ident $m:ident $keyed:ident($($p:ident: $t:ty),*) -> $r:ty) => {
        fn $m(&self, $($p: $t),*) -> impl ::core::future::Future<
            Output = ::core::result::Result<$r, $crate::store::StoreError>,
        > + Send {
            $crate::store::$tr::$m(&self.$f, $($p),*)
        }
    };
    ([$lt:lifetime around $f:tt $h:ident] $tr:ident $m:ident keyed(
        $k:ident: $kt:ty $(, $p:ident: $t:ty)*
    ) -> $r:ty) => {
        fn $m(&self, $k: $kt $(, $p: $t)*) -> impl ::core::future::Future<
            Output = ::core::result::Result<$r, $crate::store::StoreError>,
        > + Send {
            self.$h(
                ::core::stringify!($m),
                ::core::option::Option::Some($k),
                $crate::store::$tr::$m(&self.$f, $k $(, $p)*),
            )
        }
    };
    ([$lt:lifetime around $f:tt $h:ident] $tr:ident $m:ident unkeyed($($p:ident: $t:ty),*) -> $r:ty) => {
        fn $m(&self, $($p: $t),*) -> impl ::core::future::Future<
            Output = ::core::result::Result<$r, $crate::store::StoreError>,
        > + Send {
            self.$h(
                ::core::stringify!($m),
                ::core::option::Option::None,
                $crate::store::$tr::$m(&self.$f, $($p),*),
            )
        }
    };
    ([$lt:lifetime deref] $tr:ident $m:ident $keyed:ident($($p:ident: $t:ty),*) -> $r:ty) => {
        fn $m(&self, $($p: $t),*) -> impl ::core::future::Future<
            Output = ::core::result::Result<$r, $crate::store::StoreError>,
        > + Send {
            $crate::store::$tr::$m(&**self, $($p),*)
        }
    };
    ([$lt:lifetime from_dyn $dyn:ident] $tr:ident $m:ident $keyed:ident($($p:ident: $t:ty),*) -> $r:ty) => {
        fn $m(&self, $($p: $t),*) -> impl ::core::future::Future<
            Output = ::core::result::Result<$r, $crate::store::StoreError>,
        > + Send {
            // A boxed future has one lifetime, which `impl Future` cannot name when the
            // arguments have several: an async block captures each.
            async move { $crate::store::$dyn::$m(&**self, $($p),*).await }
        }
    };
    ([$lt:lifetime dyn_decl] $tr:ident $m:ident $keyed:ident($($p:ident: $t:ty),*) -> $r:ty) => {
        #[doc = ::core::concat!(
            "[`", ::core::stringify!($tr), "::", ::core::stringify!($m), "`](crate::store::",
            ::core::stringify!($tr), "::", ::core::stringify!($m), "), with its future boxed."
        )]
        fn $m<$lt>(&$lt self, $($p: $t),*)
            -> $crate::store::BoxFuture<$lt, ::core::result::Result<$r, $crate::store::StoreError>>;
    };
    ([$lt:lifetime dyn_impl] $tr:ident $m:ident $keyed:ident($($p:ident: $t:ty),*) -> $r:ty) => {
        fn $m<$lt>(&$lt self, $($p: $t),*)
            -> $crate::store::BoxFuture<$lt, ::core::result::Result<$r, $crate::store::StoreError>>
        {
            ::std::boxed::Box::pin($crate::store::$tr::$m(self, $($p),*))
        }
    };
}
