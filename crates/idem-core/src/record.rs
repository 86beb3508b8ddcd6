//! What a store keeps for one (tenant, route, key).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::fingerprint::Fingerprint;

/// Milliseconds since the Unix epoch, the time unit of records.
pub type UnixMillis = u64;

/// The current time in [`UnixMillis`].
pub fn now_millis() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Adds a duration to a time, saturating.
pub fn after(t: UnixMillis, d: Duration) -> UnixMillis {
    t.saturating_add(d.as_millis().min(u64::MAX as u128) as u64)
}

/// The unique token of one claim. `complete`, `release` and `renew` succeed only with
/// the token of the current claim, so an executor that lost its lease cannot overwrite
/// the work of the one that took over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FencingToken(pub u128);

impl FencingToken {
    /// A fresh random token (122 random bits).
    pub fn random() -> Self {
        FencingToken(uuid::Uuid::new_v4().as_u128())
    }

    /// The token as 16 big-endian bytes.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// Reads [`FencingToken::to_bytes`]' output.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        Some(FencingToken(u128::from_be_bytes(b.try_into().ok()?)))
    }
}

impl std::fmt::Display for FencingToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl std::str::FromStr for FencingToken {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u128::from_str_radix(s, 16).map(FencingToken)
    }
}

/// A successful claim: the holder may execute until `expires_at` unless it renews.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// This claim's fencing token.
    pub token: FencingToken,
    /// When the lease ends unless renewed.
    pub expires_at: UnixMillis,
}

/// The outcome of one execution, as stored and replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// HTTP status.
    pub status: u16,
    /// Replayable headers, names in lower case, in order; repeated names allowed.
    pub headers: Vec<(String, Bytes)>,
    /// The body. Empty when `body_replayable` is false.
    pub body: Bytes,
    /// False when the body exceeded `max_response_bytes`: the replay is then a problem
    /// that carries the original status.
    pub body_replayable: bool,
    /// The `X-Request-Id` of the request that executed, if any.
    pub request_id: Option<String>,
}

/// Errors decoding a stored response (corrupt or foreign data).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored response is corrupt: {0}")]
pub struct DecodeError(&'static str);

const ENCODING_VERSION: u8 = 1;

impl StoredResponse {
    /// Size in bytes of headers and body, for metrics.
    pub fn size(&self) -> usize {
        self.body.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>()
    }

    /// A compact binary encoding, shared by every store that keeps bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.size() + 8 * self.headers.len());
        out.push(ENCODING_VERSION);
        out.extend_from_slice(&self.status.to_be_bytes());
        out.push(u8::from(self.body_replayable));
        put(
            &mut out,
            self.request_id.as_deref().unwrap_or("").as_bytes(),
        );
        out.push(u8::from(self.request_id.is_some()));
        out.extend_from_slice(&(self.headers.len() as u32).to_be_bytes());
        for (name, value) in &self.headers {
            put(&mut out, name.as_bytes());
            put(&mut out, value);
        }
        put(&mut out, &self.body);
        out
    }

    /// Decodes [`StoredResponse::encode`]'s output.
    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { data, pos: 0 };
        if r.take(1)? != [ENCODING_VERSION] {
            return Err(DecodeError("unknown encoding version"));
        }
        let status = u16::from_be_bytes(r.take(2)?.try_into().map_err(|_| DecodeError("status"))?);
        let body_replayable = r.take(1)?[0] == 1;
        let request_id =
            String::from_utf8(r.field()?.to_vec()).map_err(|_| DecodeError("request id"))?;
        let has_request_id = r.take(1)?[0] == 1;
        let count = u32::from_be_bytes(r.take(4)?.try_into().map_err(|_| DecodeError("count"))?);
        let mut headers = Vec::with_capacity(count.min(1024) as usize);
        for _ in 0..count {
            let name =
                String::from_utf8(r.field()?.to_vec()).map_err(|_| DecodeError("header name"))?;
            let value = Bytes::copy_from_slice(r.field()?);
            headers.push((name, value));
        }
        let body = Bytes::copy_from_slice(r.field()?);
        if r.pos != data.len() {
            return Err(DecodeError("trailing bytes"));
        }
        Ok(StoredResponse {
            status,
            headers,
            body,
            body_replayable,
            request_id: has_request_id.then_some(request_id),
        })
    }
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.data.len())
            .ok_or(DecodeError("truncated"))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn field(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = u32::from_be_bytes(
            self.take(4)?
                .try_into()
                .map_err(|_| DecodeError("length"))?,
        );
        self.take(len as usize)
    }
}

/// The state of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordState {
    /// An execution holds the key.
    InFlight {
        /// The holder's token.
        token: FencingToken,
        /// When the holder's lease ends unless renewed.
        lease_expires_at: UnixMillis,
    },
    /// The outcome is stored.
    Completed(StoredResponse),
}

/// One stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Fingerprint of the request that claimed the key.
    pub fingerprint: Fingerprint,
    /// In flight or completed.
    pub state: RecordState,
    /// When the key was first claimed.
    pub created_at: UnixMillis,
    /// When the record expires and the key becomes new again.
    pub expires_at: UnixMillis,
}

impl Record {
    /// An in-flight record whose lease has ended: its executor died or hung.
    pub fn is_abandoned(&self, now: UnixMillis) -> bool {
        matches!(self.state, RecordState::InFlight { lease_expires_at, .. } if lease_expires_at <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips() {
        let r = StoredResponse {
            status: 201,
            headers: vec![
                ("location".into(), Bytes::from_static(b"/v1/x")),
                ("x-a".into(), Bytes::from_static(&[0xff, 0])),
            ],
            body: Bytes::from((0..=255u8).collect::<Vec<_>>()),
            body_replayable: true,
            request_id: Some("req_1".into()),
        };
        assert_eq!(StoredResponse::decode(&r.encode()).unwrap(), r);
        let none = StoredResponse {
            request_id: None,
            body_replayable: false,
            body: Bytes::new(),
            ..r
        };
        assert_eq!(StoredResponse::decode(&none.encode()).unwrap(), none);
        let enc = none.encode();
        assert!(StoredResponse::decode(&enc[..enc.len() - 1]).is_err());
        assert!(StoredResponse::decode(&[9]).is_err());
    }

    #[test]
    fn tokens_round_trip() {
        let t = FencingToken::random();
        assert_eq!(FencingToken::from_slice(&t.to_bytes()), Some(t));
        assert_eq!(t.to_string().parse::<FencingToken>().unwrap(), t);
        assert_ne!(t, FencingToken::random());
    }
}
