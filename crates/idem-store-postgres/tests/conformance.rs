//! The shared conformance suite against a real PostgreSQL.

use std::sync::Arc;

use idem_core::Store;
use idem_store_postgres::{PostgresOptions, PostgresStore};

async fn connect() -> Option<Arc<PostgresStore>> {
    connect_with(PostgresOptions::default()).await
}

fn url() -> String {
    std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

async fn connect_with(options: PostgresOptions) -> Option<Arc<PostgresStore>> {
    let url = url();
    // A small pool: nextest runs several test processes side by side.
    match PostgresStore::connect_with(&url, options.with_max_connections(8)).await {
        Ok(store) => Some(Arc::new(store)),
        Err(e) => {
            eprintln!("no PostgreSQL at {url}: {e}");
            None
        }
    }
}

idem_conformance::conformance_tests!(connect());

/// Without `pg_notify`: the same contract, watches poll.
mod without_notify {
    idem_conformance::conformance_tests!(super::connect_with(
        idem_store_postgres::PostgresOptions::default().with_notify(false)
    ));
}

/// `pool_size` in the URL is idem's: taken out before tokio-postgres reads the URL
/// (which refuses parameters it does not know), so a store opens with it and works.
#[tokio::test]
async fn a_pool_size_in_the_url_is_accepted() {
    if connect().await.is_none() {
        return idem_conformance::skip("a_pool_size_in_the_url_is_accepted");
    }
    let base = url();
    let sep = if base.contains('?') { '&' } else { '?' };
    let store = PostgresStore::connect(&format!("{base}{sep}pool_size=2"))
        .await
        .unwrap();
    store.ping().await.unwrap();
}

/// Each runtime that uses the store gets connections of its own, driven on it: a
/// worker thread's queries never go through a connection another runtime drives (each
/// would cross threads twice). Seen failing with one pool for all: the first worker's
/// query went through the connection the opening runtime had made, driven there, and
/// timed out while that runtime was not running.
#[test]
fn each_runtime_gets_connections_of_its_own() {
    let main = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if main.block_on(connect()).is_none() {
        return idem_conformance::skip("each_runtime_gets_connections_of_its_own");
    }
    let app = format!("idem_rt_{}", uuid::Uuid::new_v4().simple());
    let base = url();
    let sep = if base.contains('?') { '&' } else { '?' };
    let store = main
        .block_on(PostgresStore::connect_with(
            &format!("{base}{sep}application_name={app}"),
            PostgresOptions::default()
                .with_max_connections(4)
                .with_runtimes(2)
                .with_notify(false),
        ))
        .unwrap();
    // One at a time: each worker finds the opening runtime's connection idle. Their
    // runtimes are kept until the count below: a pool's connections end with them.
    let mut kept = Vec::new();
    for _ in 0..2 {
        let (store, app) = (store.clone(), app.clone());
        let rt = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                for _ in 0..3 {
                    store.ping().await.unwrap();
                }
                let sessions = sessions(&url(), &app).await;
                assert!(sessions >= 2, "{sessions} session(s)");
            });
            rt
        })
        .join()
        .unwrap();
        kept.push(rt);
    }
    main.block_on(async {
        store.ping().await.unwrap();
        // The migration's (the opening runtime's pool for exclusive work), and one
        // shared connection per runtime that pinged: the opening one's and each worker's.
        assert_eq!(sessions(&url(), &app).await, 4);
    });
}

/// How many sessions PostgreSQL has with this `application_name`.
async fn sessions(url: &str, app: &str) -> i64 {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let n = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .get(0);
    driver.abort();
    n
}

#[tokio::test]
async fn migrate_is_idempotent() {
    let Some(store) = connect().await else {
        return idem_conformance::skip("migrate_is_idempotent");
    };
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
}

/// A database of its own, for a test that changes the schema.
struct Scratch {
    admin: tokio_postgres::Client,
    db: String,
    store: PostgresStore,
    client: tokio_postgres::Client,
}

impl Scratch {
    async fn create() -> Option<Self> {
        let url = "postgres://postgres@127.0.0.1:5432/postgres";
        let Ok((admin, conn)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await else {
            if idem_conformance::backends_required() {
                panic!("no PostgreSQL at {url}");
            }
            return None;
        };
        tokio::spawn(conn);
        let db = format!("idem_schema_{}", uuid::Uuid::new_v4().simple());
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
        let url = format!("postgres://postgres@127.0.0.1:5432/{db}");
        let store = PostgresStore::connect(&url).await.unwrap();
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        Some(Scratch {
            admin,
            db,
            store,
            client,
        })
    }

    async fn drop_database(self) {
        let Scratch {
            admin,
            db,
            store,
            client,
        } = self;
        drop((store, client));
        admin
            .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
            .await
            .unwrap();
    }
}

/// A newer schema is accepted when it says this version still works on it, and refused
/// with both versions named when it says otherwise. In a scratch database of its own.
#[tokio::test]
async fn a_newer_schema_is_refused_only_when_it_says_so() {
    let Some(scratch) = Scratch::create().await else {
        return idem_conformance::skip("a_newer_schema_is_refused_only_when_it_says_so");
    };
    let (store, c) = (&scratch.store, &scratch.client);
    let next = idem_store_postgres::SCHEMA_VERSION + 1;
    c.execute(
        "INSERT INTO idem_schema_version (version, readable_by) VALUES ($1, $2)",
        &[&next, &idem_store_postgres::SCHEMA_VERSION],
    )
    .await
    .unwrap();
    store
        .migrate()
        .await
        .expect("a newer schema that this version can still use");
    c.execute(
        "UPDATE idem_schema_version SET readable_by = $1 WHERE version = $1",
        &[&next],
    )
    .await
    .unwrap();
    let err = store.migrate().await.unwrap_err().to_string();
    assert!(
        err.contains(&format!("needs idem's schema {next}")),
        "{err}"
    );
    scratch.drop_database().await;
}

/// A schema whose tables were dropped and whose functions were left (an operator's
/// partial clean-up) migrates again from scratch. In a scratch database.
#[tokio::test]
async fn tables_dropped_without_their_functions_migrate_again() {
    let Some(scratch) = Scratch::create().await else {
        return idem_conformance::skip("tables_dropped_without_their_functions_migrate_again");
    };
    let (store, c) = (&scratch.store, &scratch.client);
    c.batch_execute("DROP TABLE idem_records; DROP TABLE idem_schema_version")
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let versions: i64 = c
        .query_one("SELECT count(*) FROM idem_schema_version", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(versions, i64::from(idem_store_postgres::SCHEMA_VERSION));
}

/// A database at schema 3 (before the in-flight index) gains the index on migrate,
/// and the in-flight listing walks it rather than the table. In a scratch database.
#[tokio::test]
async fn migration_4_adds_the_in_flight_index() {
    let Some(scratch) = Scratch::create().await else {
        return idem_conformance::skip("migration_4_adds_the_in_flight_index");
    };
    let (store, c) = (&scratch.store, &scratch.client);
    // Back to schema 3, as an older idem left it.
    c.batch_execute(
        "DROP INDEX idem_records_in_flight; DELETE FROM idem_schema_version WHERE version = 4",
    )
    .await
    .unwrap();
    store.migrate().await.unwrap();
    let plan: Vec<String> = c
        .query(
            "EXPLAIN SELECT created_at FROM idem_records WHERE token IS NOT NULL ORDER BY created_at LIMIT 10",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter().any(|l| l.contains("idem_records_in_flight")),
        "{plan:?}"
    );
    scratch.drop_database().await;
}

/// A renewal's `admit` already sent when the execution ends is not recalled by
/// aborting the renewer: the statement runs anyway, and through the pool (another
/// connection, or one still busy with an earlier statement whose caller gave up) it can
/// commit after the `settle` that ended the record's count. Such a late admit must
/// count nothing: after a release it would hold one of the tenant's `max_records`
/// slots for a whole TTL, after a complete an in-flight slot for a lease.
mod late_admit {
    use std::sync::Arc;
    use std::time::Duration;

    use idem_core::{
        Admission, Claim, ClaimSpec, FencingToken, RecordKey, Store, StoredResponse,
        TenantCounting, TenantLimits,
    };
    use idem_store_postgres::PostgresStore;

    const LEASE: Duration = Duration::from_secs(30);
    const TTL: Duration = Duration::from_secs(60);

    async fn claim(store: &PostgresStore, key: &RecordKey) -> FencingToken {
        let fp = idem_conformance::fp("late-admit");
        let spec = ClaimSpec {
            fingerprint: &fp,
            lease: LEASE,
            ttl: TTL,
        };
        match store.claim(key, spec).await.unwrap() {
            Claim::Acquired(l) => l.token,
            Claim::Existing(r) => panic!("{key:?} exists: {r:?}"),
        }
    }

    /// Claims and counts `a` under `limits`, ends it with `end` and its settle, then
    /// sends the late admit of `a`; returns whether a new record `b` is admitted.
    async fn after<F: Future<Output = ()>>(
        store: Arc<PostgresStore>,
        limits: TenantLimits,
        end: impl FnOnce(Arc<PostgresStore>, RecordKey, FencingToken) -> F,
    ) -> Admission {
        let a = idem_conformance::fresh_key("a");
        let token = claim(&store, &a).await;
        assert_eq!(
            store.admit(&a, limits, LEASE, TTL).await.unwrap(),
            Admission::Admitted
        );
        end(store.clone(), a.clone(), token).await;
        store.admit(&a, limits, LEASE, TTL).await.unwrap(); // the late one
        let b = RecordKey::new(a.tenant.clone(), a.route.clone(), "b");
        claim(&store, &b).await;
        store.admit(&b, limits, LEASE, TTL).await.unwrap()
    }

    #[tokio::test]
    async fn a_late_admit_after_a_release_counts_nothing() {
        let Some(store) = super::connect().await else {
            return idem_conformance::skip("a_late_admit_after_a_release_counts_nothing");
        };
        let limits = TenantLimits::new(None, Some(1));
        let admitted = after(store, limits, |store, a, token| async move {
            assert!(store.release(&a, token).await.unwrap());
            store.settle(&a, None).await.unwrap();
        })
        .await;
        assert_eq!(
            admitted,
            Admission::Admitted,
            "a late admit of a released record took its max_records slot back"
        );
    }

    #[tokio::test]
    async fn a_late_admit_after_a_complete_counts_nothing() {
        let Some(store) = super::connect().await else {
            return idem_conformance::skip("a_late_admit_after_a_complete_counts_nothing");
        };
        let limits = TenantLimits::new(Some(1), None);
        let admitted = after(store, limits, |store, a, token| async move {
            let response = StoredResponse {
                status: 201,
                headers: vec![],
                body: "ok".into(),
                body_kept: idem_core::BodyKept::Whole,
                request_id: None,
            };
            assert!(store.complete(&a, token, &response, TTL).await.unwrap());
            store.settle(&a, Some(TTL)).await.unwrap();
        })
        .await;
        assert_eq!(
            admitted,
            Admission::Admitted,
            "a late admit of a completed record took its in-flight slot back"
        );
    }
}

/// Many callers of one runtime share its few connections, their statements pipelined
/// on each: every caller still gets the answer to its own statement (claims, completes
/// and reads of 64 keys at once over 2 connections), and no more connections open.
#[tokio::test(flavor = "current_thread")]
async fn pipelined_callers_get_their_own_answers() {
    use idem_conformance::{fp, fresh_key, spec};
    use idem_core::{Claim, RecordState};
    if connect().await.is_none() {
        return idem_conformance::skip("pipelined_callers_get_their_own_answers");
    }
    let app = format!("idem_pipe_{}", uuid::Uuid::new_v4().simple());
    let base = url();
    let sep = if base.contains('?') { '&' } else { '?' };
    let store = PostgresStore::connect_with(
        &format!("{base}{sep}application_name={app}"),
        PostgresOptions::default()
            .with_max_connections(2)
            .with_notify(false),
    )
    .await
    .unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..64 {
        let (store, mut response) = (store.clone(), idem_conformance::bench::response());
        calls.spawn(async move {
            let key = fresh_key(&format!("pipelined-{i}"));
            let fingerprint = fp(&format!("request {i}"));
            let Claim::Acquired(lease) = store
                .claim(&key, spec(&fingerprint, 60_000, 60_000))
                .await
                .unwrap()
            else {
                panic!("key {i} was not new");
            };
            response.body = format!("answer {i}").into();
            let ttl = std::time::Duration::from_secs(60);
            assert!(
                store
                    .complete(&key, lease.token, &response, ttl)
                    .await
                    .unwrap()
            );
            let record = store.get(&key).await.unwrap().expect("the record");
            assert_eq!(record.fingerprint, fingerprint, "key {i}");
            match record.state {
                RecordState::Completed(r) => assert_eq!(r.body, response.body, "key {i}"),
                other => panic!("key {i}: {other:?}"),
            }
        });
    }
    while let Some(call) = calls.join_next().await {
        call.unwrap();
    }
    // The migration's connection and the two shared ones.
    assert_eq!(sessions(&url(), &app).await, 3);
}
