//! Listing the records in flight ([`InFlightListing::list_in_flight`]), which the admin page and
//! the oldest-in-flight gauge read.

use std::sync::Arc;
use std::time::Duration;

use idem_core::record::now_millis;
use idem_core::{InFlightListing, InFlightRecord, RecordKey};

use crate::{LONG, acquire, fp, response};

/// Enough to see this case's records past those of cases running beside it on a
/// shared server.
const WIDE: usize = 10_000;

async fn mine<S: InFlightListing>(store: &S, tenant: &str) -> Vec<InFlightRecord> {
    let all = store.list_in_flight(WIDE).await.unwrap();
    assert!(
        all.windows(2).all(|w| w[0].created_at <= w[1].created_at),
        "oldest first: {all:?}"
    );
    all.into_iter().filter(|r| r.key.tenant == tenant).collect()
}

fn names(records: &[InFlightRecord]) -> Vec<&str> {
    records.iter().map(|r| r.key.key.as_str()).collect()
}

/// Records in flight are listed oldest first with their lease, abandoned ones
/// included; completed, released, deleted and expired ones are not; a takeover keeps
/// the original claim time.
pub async fn in_flight_records_are_listed_oldest_first<S: InFlightListing>(store: Arc<S>) {
    let tenant = format!("t_{}", uuid::Uuid::new_v4().simple());
    let key = |name: &str| RecordKey::new(tenant.clone(), "POST /v1/charges", name);
    let f = fp("a");
    let mut leases = Vec::new();
    for (name, lease_ms, ttl_ms) in [
        ("a", 30_000, LONG),
        ("done", 30_000, LONG),
        ("b", 30_000, LONG),
        ("released", 30_000, LONG),
        ("deleted", 30_000, LONG),
        ("expired", 50, 150),
        ("abandoned", 50, LONG),
    ] {
        leases.push(acquire(&*store, &key(name), &f, lease_ms, ttl_ms).await);
        // Distinct claim times (the stores count in milliseconds).
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (done, released) = (leases[1], leases[3]);
    assert!(
        store
            .complete(
                &key("done"),
                done.token,
                &response(b"{}"),
                Duration::from_millis(LONG)
            )
            .await
            .unwrap()
    );
    assert!(
        store
            .release(&key("released"), released.token)
            .await
            .unwrap()
    );
    assert!(store.delete(&key("deleted")).await.unwrap());
    tokio::time::sleep(Duration::from_millis(250)).await;

    let listed = mine(&*store, &tenant).await;
    assert_eq!(names(&listed), ["a", "b", "abandoned"], "{listed:?}");
    assert_eq!(listed[0].lease_expires_at, leases[0].expires_at);
    assert!(
        listed[2].lease_expires_at <= now_millis(),
        "the abandoned lease has ended"
    );
    let first = store.list_in_flight(1).await.unwrap();
    assert!(
        first.len() == 1 && first[0].created_at <= listed[0].created_at,
        "{first:?}"
    );
    assert!(store.list_in_flight(0).await.unwrap().is_empty());

    let taken = store
        .reclaim(
            &key("abandoned"),
            leases[6].token,
            crate::spec(&f, 30_000, LONG),
        )
        .await
        .unwrap()
        .expect("the abandoned record is taken over");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let after = mine(&*store, &tenant).await;
    assert_eq!(names(&after), ["a", "b", "abandoned"], "{after:?}");
    assert_eq!(
        after[2].created_at, listed[2].created_at,
        "a takeover keeps the claim time"
    );
    assert_eq!(after[2].lease_expires_at, taken.expires_at);

    for (name, lease) in [("a", leases[0]), ("b", leases[2])] {
        assert!(
            store
                .complete(
                    &key(name),
                    lease.token,
                    &response(b"{}"),
                    Duration::from_millis(LONG)
                )
                .await
                .unwrap()
        );
    }
    assert!(store.release(&key("abandoned"), taken.token).await.unwrap());
    assert!(
        mine(&*store, &tenant).await.is_empty(),
        "nothing of this case is in flight"
    );
}
