//! Inspect, release and purge one key: shared by the admin API and `idem keys`.

use idem_core::{Record, RecordKey, RecordState, Store, StoreError};
use serde_json::{Value, json};

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAction {
    /// Show the record.
    Inspect,
    /// Release an in-flight key (its executor is known dead).
    Release,
    /// Delete the record whatever its state.
    Purge,
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

/// The record as JSON: state, fingerprint, status, times, size. Never the credential
/// (which idem never has) and never the body.
pub fn describe(key: &RecordKey, record: &Record) -> Value {
    let mut doc = json!({
        "tenant": key.tenant,
        "route": key.route,
        "key": key.key,
        "fingerprint": record.fingerprint.encode(),
        "created_at": rfc3339(record.created_at),
        "expires_at": rfc3339(record.expires_at),
    });
    match &record.state {
        RecordState::InFlight {
            lease_expires_at, ..
        } => {
            doc["state"] = "in_flight".into();
            doc["lease_expires_at"] = rfc3339(*lease_expires_at).into();
            doc["abandoned"] = record.is_abandoned(idem_core::record::now_millis()).into();
        }
        RecordState::Completed(r) => {
            doc["state"] = "completed".into();
            doc["status"] = r.status.into();
            doc["size"] = r.size().into();
            doc["replayable"] = r.is_replayable().into();
        }
    }
    doc
}

/// Runs an action; `Ok(None)` when there is no such record (or, for release, when
/// it is not in flight any more).
pub async fn run<S: Store>(
    store: &S,
    key: &RecordKey,
    action: KeyAction,
) -> Result<Option<Value>, StoreError> {
    let Some(record) = store.get(key).await? else {
        return Ok(None);
    };
    let mut doc = describe(key, &record);
    match action {
        KeyAction::Inspect => {}
        KeyAction::Release => {
            let RecordState::InFlight { token, .. } = record.state else {
                return Ok(None);
            };
            if !store.release(key, token).await? {
                return Ok(None);
            }
            doc["released"] = true.into();
        }
        KeyAction::Purge => {
            doc["purged"] = store.delete(key).await?.into();
        }
    }
    Ok(Some(doc))
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(
            super::rfc3339(1_795_362_209_123),
            "2026-11-22T15:43:29.123Z"
        );
    }
}
