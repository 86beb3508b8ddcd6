//! TLS to real PostgreSQL servers: a private one started with `ssl = on` and
//! certificates made here, and the machine's own server on 127.0.0.1:5432.

use std::time::Duration;

use idem_conformance::pki::{TestCa, Validity};
use idem_conformance::servers::{PrivatePostgres, PrivateStore, ServerTls};
use idem_conformance::skip;
use idem_store_postgres::{PostgresOptions, PostgresStore};

/// A private server whose certificate names `localhost` only (not `127.0.0.1`), so
/// that `verify-full` to the address fails where `verify-ca` passes.
fn private_server(ca: &TestCa, validity: Validity) -> Option<PrivatePostgres> {
    let server = ca.server("pg", &["localhost"], validity);
    let tls = ServerTls {
        cert: server.cert,
        key: server.key,
        ca: ca.ca_file(),
        require_client_cert: false,
    };
    PrivatePostgres::start_tls(&tls).map(|r| r.expect("start a private PostgreSQL with ssl = on"))
}

fn with_query(url: &str, query: &str) -> String {
    format!("{url}?{query}")
}

async fn connect(url: &str) -> Result<PostgresStore, idem_core::StoreError> {
    let options = PostgresOptions::default()
        .with_max_connections(2)
        .with_op_timeout(Duration::from_secs(5));
    PostgresStore::connect_with(url, options).await
}

/// What the server says of the store's connections, found by application name:
/// whether they use TLS, and the client certificate's subject.
async fn ssl_of(admin_url: &str, app: &str) -> Vec<(bool, Option<String>)> {
    let (client, conn) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
        .await
        .expect("admin connection");
    tokio::spawn(conn);
    client
        .query(
            "SELECT s.ssl, s.client_dn FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = $1",
            &[&app],
        )
        .await
        .expect("pg_stat_ssl")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// One conformance case over the connection: claim, complete, replay.
async fn round_trip(store: PostgresStore) {
    idem_conformance::cases_dispatch::claim_then_replay(std::sync::Arc::new(store)).await;
}

fn app() -> String {
    format!("idem_tls_{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_server_every_sslmode() {
    let ca = TestCa::new("pg");
    let Some(server) = private_server(&ca, Validity::Current) else {
        return skip("private_server_every_sslmode (initdb/pg_ctl not found)");
    };
    let base = server.url();
    let localhost = base.replace("127.0.0.1", "localhost");
    let root = ca.ca_file().display().to_string();
    let client = ca.client("client", "idem-client");
    let cases = [
        (&base, format!("sslmode=verify-ca&sslrootcert={root}"), true),
        (
            &localhost,
            format!("sslmode=verify-full&sslrootcert={root}"),
            true,
        ),
        (&base, "sslmode=require".to_owned(), true),
        (&base, "sslmode=prefer".to_owned(), true),
        (&base, "sslmode=disable".to_owned(), false),
        (
            &localhost,
            format!(
                "sslmode=verify-full&sslrootcert={root}&sslcert={}&sslkey={}",
                client.cert.display(),
                client.key.display()
            ),
            true,
        ),
    ];
    for (url, query, encrypted) in cases {
        let app = app();
        let url = with_query(url, &format!("{query}&application_name={app}"));
        let store = connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"));
        // The pool keeps its connections while the case runs; they are counted after.
        let store = std::sync::Arc::new(store);
        idem_conformance::cases_dispatch::claim_then_replay(store.clone()).await;
        let seen = ssl_of(&with_query(&base, "sslmode=disable"), &app).await;
        assert!(
            !seen.is_empty(),
            "{query}: the store's connections are seen"
        );
        for (ssl, dn) in seen {
            assert_eq!(ssl, encrypted, "{query}");
            if query.contains("sslcert") {
                assert!(dn.unwrap_or_default().contains("idem-client"), "{query}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_server_wrong_certificates_are_refused() {
    let ca = TestCa::new("pg");
    let Some(server) = private_server(&ca, Validity::Current) else {
        return skip("private_server_wrong_certificates_are_refused (initdb/pg_ctl not found)");
    };
    let other = TestCa::new("other");
    let base = server.url();
    let root = ca.ca_file().display().to_string();
    let refused = [
        // The name is 127.0.0.1; the certificate says localhost.
        format!("sslmode=verify-full&sslrootcert={root}"),
        format!(
            "sslmode=verify-ca&sslrootcert={}",
            other.ca_file().display()
        ),
        format!("sslmode=require&sslrootcert={}", other.ca_file().display()),
    ];
    for query in refused {
        let err = connect(&with_query(&base, &query))
            .await
            .err()
            .unwrap_or_else(|| panic!("{query}: accepted"));
        let text = format!("{err:?}");
        assert!(
            text.contains("certificate") || text.contains("Certificate"),
            "{query}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_server_expired_certificate_is_refused() {
    let ca = TestCa::new("pg");
    let Some(server) = private_server(&ca, Validity::Expired) else {
        return skip("private_server_expired_certificate_is_refused (initdb/pg_ctl not found)");
    };
    let url = with_query(
        &server.url(),
        &format!("sslmode=verify-ca&sslrootcert={}", ca.ca_file().display()),
    );
    let Err(err) = connect(&url).await else {
        panic!("an expired certificate is refused");
    };
    assert!(format!("{err:?}").contains("Expired"), "{err:?}");
    // `require` without a root certificate encrypts without checking, as libpq.
    let store = connect(&with_query(&server.url(), "sslmode=require"))
        .await
        .expect("require does not check the certificate");
    round_trip(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_server_require_encrypts_and_verify_full_checks() {
    let base = "postgres://postgres@127.0.0.1:5432/test";
    let app = app();
    let store = match connect(&format!("{base}?sslmode=require&application_name={app}")).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("no PostgreSQL with TLS at {base}: {e}");
            return skip("machine_server_require_encrypts_and_verify_full_checks");
        }
    };
    let store = std::sync::Arc::new(store);
    idem_conformance::cases_dispatch::claim_then_replay(store.clone()).await;
    let seen = ssl_of(&format!("{base}?sslmode=disable"), &app).await;
    assert!(
        !seen.is_empty() && seen.iter().all(|(ssl, _)| *ssl),
        "{seen:?}"
    );
    // Its certificate is the distribution's self-signed one, trusted by no CA here.
    let other = TestCa::new("other");
    let untrusted = format!(
        "{base}?sslmode=verify-full&sslrootcert={}",
        other.ca_file().display()
    );
    let Err(err) = connect(&untrusted).await else {
        panic!("an untrusted certificate is refused");
    };
    assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");
}
