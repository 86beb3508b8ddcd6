//! What a store keeps for one (tenant, route, key).

use std::sync::LazyLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::fingerprint::Fingerprint;

/// Milliseconds since the Unix epoch, the time unit of records.
pub type UnixMillis = u64;

/// The current time in [`UnixMillis`], as this process judges leases and expiries:
/// the wall clock read once, at the first call, moved forward by the monotonic clock.
/// A step of the wall clock while the process runs (a manual change, an NTP step)
/// then neither makes live leases look expired nor keeps dead ones alive; gradual NTP
/// corrections still apply, since the monotonic clock is slewed with the wall clock.
/// The times it gives are stored, so after a restart they continue from the wall clock
/// of that moment (docs/reliability.md, "Clocks").
pub fn now_millis() -> UnixMillis {
    static CLOCK: LazyLock<Clock> =
        LazyLock::new(|| Clock::anchored(wall_millis(), Instant::now()));
    CLOCK.at(Instant::now())
}

/// The wall clock, in [`UnixMillis`].
fn wall_millis() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A wall-clock reading tied to a monotonic instant.
#[derive(Debug, Clone, Copy)]
struct Clock {
    wall: UnixMillis,
    at: Instant,
}

impl Clock {
    fn anchored(wall: UnixMillis, at: Instant) -> Self {
        Clock { wall, at }
    }

    fn at(&self, now: Instant) -> UnixMillis {
        after(self.wall, now.saturating_duration_since(self.at))
    }
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
    /// A fresh random token (128 random bits from the thread's cryptographic
    /// generator).
    pub fn random() -> Self {
        FencingToken(rand::random())
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

/// How much of a response body was stored with its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BodyKept {
    /// The whole body: a replay sends it.
    Whole,
    /// None: the body exceeded `max_response_bytes`. The first caller had it whole; a
    /// replay is a problem that carries the original status.
    TooLarge,
    /// None: the response broke off before its end (the upstream or the handler failed
    /// mid-body). A replay is a problem that carries the original status.
    BrokenOff,
}

impl BodyKept {
    /// The byte that stands for it in [`StoredResponse::encode`]. `0` and `1` are the
    /// values of the boolean that came before (not replayable, replayable).
    fn to_byte(self) -> u8 {
        match self {
            BodyKept::TooLarge => 0,
            BodyKept::Whole => 1,
            BodyKept::BrokenOff => 2,
        }
    }

    fn from_byte(b: u8) -> Result<Self, DecodeError> {
        match b {
            0 => Ok(BodyKept::TooLarge),
            1 => Ok(BodyKept::Whole),
            2 => Ok(BodyKept::BrokenOff),
            _ => Err(DecodeError("body kind")),
        }
    }
}

/// A response body as recorded while it streamed to the first caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// It ended cleanly within `max_response_bytes`.
    Whole(Bytes),
    /// It exceeded `max_response_bytes`.
    TooLarge,
    /// It broke off before its end.
    BrokenOff,
}

/// The outcome of one execution, as stored and replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// HTTP status.
    pub status: u16,
    /// Replayable headers, in order; repeated names allowed. Kept as the header map's
    /// own types, so that a replay inserts them without parsing them again
    /// ([`StoredResponse::compact_headers`] makes them from a response's).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The body. Empty unless `body_kept` is [`BodyKept::Whole`].
    pub body: Bytes,
    /// Whether the body was kept, and if not why: the replay is then a problem that
    /// carries the original status.
    pub body_kept: BodyKept,
    /// The `X-Request-Id` of the request that executed, if any.
    pub request_id: Option<String>,
}

/// Errors decoding a stored response (corrupt or foreign data).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored response is corrupt: {0}")]
pub struct DecodeError(&'static str);

const ENCODING_VERSION: u8 = 1;

impl StoredResponse {
    /// A response made of what was recorded.
    pub fn new(
        status: u16,
        headers: Vec<(HeaderName, HeaderValue)>,
        recorded: Recorded,
        request_id: Option<String>,
    ) -> Self {
        let (body, body_kept) = match recorded {
            Recorded::Whole(body) => (body, BodyKept::Whole),
            Recorded::TooLarge => (Bytes::new(), BodyKept::TooLarge),
            Recorded::BrokenOff => (Bytes::new(), BodyKept::BrokenOff),
        };
        StoredResponse {
            status,
            headers,
            body,
            body_kept,
            request_id,
        }
    }

    /// The headers of `map` that `keep` accepts, in order, their values copied into one
    /// buffer that they share: a value parsed by hyper is a slice of its connection's
    /// read buffer, which a stored record must not hold on to, and one allocation for
    /// all of them is what a record keeps instead of one per value.
    pub fn compact_headers(
        map: &HeaderMap,
        mut keep: impl FnMut(&HeaderName) -> bool,
    ) -> Vec<(HeaderName, HeaderValue)> {
        let kept: Vec<(&HeaderName, &HeaderValue)> = map.iter().filter(|(n, _)| keep(n)).collect();
        let mut buf = BytesMut::with_capacity(kept.iter().map(|(_, v)| v.len()).sum());
        for (_, v) in &kept {
            buf.extend_from_slice(v.as_bytes());
        }
        let mut values = buf.freeze();
        kept.into_iter()
            .filter_map(|(n, v)| {
                let value = values.split_to(v.len());
                // The bytes of a valid value: valid again.
                let mut value = HeaderValue::from_maybe_shared(value).ok()?;
                value.set_sensitive(v.is_sensitive());
                Some((n.clone(), value))
            })
            .collect()
    }

    /// Whether a replay can send the body.
    pub fn is_replayable(&self) -> bool {
        self.body_kept == BodyKept::Whole
    }

    /// Size in bytes of headers and body, for metrics.
    pub fn size(&self) -> usize {
        self.body.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len())
                .sum::<usize>()
    }

    /// A compact binary encoding, shared by every store that keeps bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.size() + 8 * self.headers.len());
        out.push(ENCODING_VERSION);
        out.extend_from_slice(&self.status.to_be_bytes());
        out.push(self.body_kept.to_byte());
        put(
            &mut out,
            self.request_id.as_deref().unwrap_or("").as_bytes(),
        );
        out.push(u8::from(self.request_id.is_some()));
        out.extend_from_slice(&(self.headers.len() as u32).to_be_bytes());
        for (name, value) in &self.headers {
            put(&mut out, name.as_str().as_bytes());
            put(&mut out, value.as_bytes());
        }
        put(&mut out, &self.body);
        out
    }

    /// Decodes [`StoredResponse::encode`]'s output. The input is copied once; the
    /// header values and the body are slices of that copy.
    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        let shared = Bytes::copy_from_slice(data);
        let slice = |part: &[u8]| shared.slice_ref(part);
        let mut r = Reader {
            data: &shared,
            pos: 0,
        };
        if r.take(1)? != [ENCODING_VERSION] {
            return Err(DecodeError("unknown encoding version"));
        }
        let status = u16::from_be_bytes(r.take(2)?.try_into().map_err(|_| DecodeError("status"))?);
        let body_kept = BodyKept::from_byte(r.take(1)?[0])?;
        let request_id =
            String::from_utf8(r.field()?.to_vec()).map_err(|_| DecodeError("request id"))?;
        let has_request_id = r.take(1)?[0] == 1;
        let count = u32::from_be_bytes(r.take(4)?.try_into().map_err(|_| DecodeError("count"))?);
        let mut headers = Vec::with_capacity(count.min(1024) as usize);
        for _ in 0..count {
            let name =
                HeaderName::from_bytes(r.field()?).map_err(|_| DecodeError("header name"))?;
            let value = HeaderValue::from_maybe_shared(slice(r.field()?))
                .map_err(|_| DecodeError("header value"))?;
            headers.push((name, value));
        }
        let body = slice(r.field()?);
        if r.pos != shared.len() {
            return Err(DecodeError("trailing bytes"));
        }
        Ok(StoredResponse {
            status,
            headers,
            body,
            body_kept,
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
                (http::header::LOCATION, HeaderValue::from_static("/v1/x")),
                (
                    HeaderName::from_static("x-a"),
                    HeaderValue::from_bytes(&[0xff, b'!']).unwrap(),
                ),
            ],
            body: Bytes::from((0..=255u8).collect::<Vec<_>>()),
            body_kept: BodyKept::Whole,
            request_id: Some("req_1".into()),
        };
        assert_eq!(StoredResponse::decode(&r.encode()).unwrap(), r);
        let cut = StoredResponse {
            body_kept: BodyKept::BrokenOff,
            body: Bytes::new(),
            ..r.clone()
        };
        assert_eq!(StoredResponse::decode(&cut.encode()).unwrap(), cut);
        let none = StoredResponse {
            request_id: None,
            body_kept: BodyKept::TooLarge,
            body: Bytes::new(),
            ..r
        };
        assert_eq!(StoredResponse::decode(&none.encode()).unwrap(), none);
        // Records stored before the broken-off kind existed read as they were written.
        assert_eq!(none.encode()[3], 0);
        let mut unknown = none.encode();
        unknown[3] = 7;
        assert!(StoredResponse::decode(&unknown).is_err());
        let enc = none.encode();
        assert!(StoredResponse::decode(&enc[..enc.len() - 1]).is_err());
        assert!(StoredResponse::decode(&[9]).is_err());
    }

    #[test]
    fn compact_headers_keep_order_and_share_one_buffer() {
        let mut map = HeaderMap::new();
        map.append(http::header::LOCATION, HeaderValue::from_static("/v1/x"));
        map.append("x-multi", HeaderValue::from_static("one"));
        map.append("x-multi", HeaderValue::from_static("two"));
        map.append(http::header::CONNECTION, HeaderValue::from_static("close"));
        let mut secret = HeaderValue::from_static("s3cret");
        secret.set_sensitive(true);
        map.append("x-secret", secret);
        let kept = StoredResponse::compact_headers(&map, |n| n != http::header::CONNECTION);
        let pairs: Vec<(&str, &[u8])> = kept
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("location", &b"/v1/x"[..]),
                ("x-multi", b"one"),
                ("x-multi", b"two"),
                ("x-secret", b"s3cret"),
            ]
        );
        assert!(kept[3].1.is_sensitive());
        // One buffer, in order: each value starts where the one before ends.
        for pair in kept.windows(2) {
            let (a, b) = (pair[0].1.as_bytes(), pair[1].1.as_bytes());
            assert_eq!(a.as_ptr().wrapping_add(a.len()), b.as_ptr());
        }
        let decoded = StoredResponse::decode(
            &StoredResponse::new(200, kept.clone(), Recorded::Whole(Bytes::new()), None).encode(),
        )
        .unwrap();
        assert_eq!(decoded.headers, kept);
    }

    #[test]
    fn the_clock_moves_with_the_monotonic_clock_only() {
        let start = Instant::now();
        let clock = Clock::anchored(1_000_000, start);
        // Whatever the wall clock does meanwhile, the time is the anchor plus the
        // monotonic time elapsed.
        assert_eq!(clock.at(start + Duration::from_millis(1_500)), 1_001_500);
        assert_eq!(clock.at(start), 1_000_000);
        let a = now_millis();
        std::thread::sleep(Duration::from_millis(20));
        let b = now_millis();
        assert!(b >= a + 20, "{a} then {b}");
    }

    #[test]
    fn tokens_round_trip() {
        let t = FencingToken::random();
        assert_eq!(FencingToken::from_slice(&t.to_bytes()), Some(t));
        assert_eq!(t.to_string().parse::<FencingToken>().unwrap(), t);
        assert_ne!(t, FencingToken::random());
    }
}
