//! Is it the same request (SPEC §3): a versioned hash of method, path, normalized
//! query, content type, chosen headers and body.

use std::borrow::Cow;

use serde::de::{MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How the body enters the fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum FingerprintMode {
    /// Canonical JSON for JSON bodies (object key order and whitespace do not matter,
    /// numbers compare as values: `1`, `1.0` and `1e0` are equal), exact bytes for any
    /// other body, including a body that claims to be JSON but does not parse.
    #[default]
    Json,
    /// Exact bytes.
    Raw,
    /// No mismatch detection: every request with the key is "the same".
    None,
}

/// A request fingerprint: the algorithm version and the digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    /// Algorithm version; stored with the record so a later algorithm can tell old
    /// records apart instead of calling every one of them a mismatch.
    pub version: u16,
    /// SHA-256 digest (empty for [`FingerprintMode::None`]).
    pub digest: Vec<u8>,
}

impl Fingerprint {
    /// The version produced by this build.
    pub const CURRENT_VERSION: u16 = 1;

    /// Text form `v1:<hex>` used by stores that keep strings.
    pub fn encode(&self) -> String {
        format!("v{}:{}", self.version, hex::encode(&self.digest))
    }

    /// Parses [`Fingerprint::encode`]'s output.
    pub fn decode(s: &str) -> Option<Self> {
        let (v, hex_digest) = s.strip_prefix('v')?.split_once(':')?;
        Some(Fingerprint {
            version: v.parse().ok()?,
            digest: hex::decode(hex_digest).ok()?,
        })
    }

    /// Whether a stored fingerprint matches this one. An empty digest (mode `none`) on
    /// either side matches anything. A stored fingerprint of another version is compared
    /// leniently (treated as a match) because it cannot be recomputed here.
    pub fn matches(&self, stored: &Fingerprint) -> bool {
        if self.digest.is_empty() || stored.digest.is_empty() || self.version != stored.version {
            return true;
        }
        self.digest == stored.digest
    }
}

/// Computes the fingerprint of a request.
///
/// `headers` lists extra request headers to include (e.g. an API version header); their
/// values are included in that order, absent ones as absent.
pub fn fingerprint(
    mode: FingerprintMode,
    method: &http::Method,
    uri: &http::Uri,
    request_headers: &http::HeaderMap,
    headers: &[http::HeaderName],
    body: &[u8],
) -> Fingerprint {
    if mode == FingerprintMode::None {
        return Fingerprint {
            version: Fingerprint::CURRENT_VERSION,
            digest: Vec::new(),
        };
    }
    let mut h = Sha256::new();
    field(&mut h, method.as_str().as_bytes());
    field(&mut h, uri.path().as_bytes());
    let mut pairs: Vec<(String, String)> = uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    pairs.sort();
    h.update((pairs.len() as u64).to_be_bytes());
    for (k, v) in &pairs {
        field(&mut h, k.as_bytes());
        field(&mut h, v.as_bytes());
    }
    let content_type = request_headers
        .get(http::header::CONTENT_TYPE)
        .map(|v| normalize_content_type(v.as_bytes()))
        .unwrap_or_default();
    field(&mut h, content_type.as_bytes());
    for name in headers {
        match request_headers.get(name) {
            Some(v) => {
                h.update([1]);
                field(&mut h, v.as_bytes());
            }
            None => h.update([0]),
        }
    }
    let json = mode == FingerprintMode::Json && is_json(&content_type);
    match json
        .then(|| serde_json::from_slice::<Json<'_>>(body).ok())
        .flatten()
    {
        Some(value) => {
            h.update(b"J");
            value.feed(&mut h);
        }
        None => {
            h.update(b"R");
            field(&mut h, body);
        }
    }
    Fingerprint {
        version: Fingerprint::CURRENT_VERSION,
        digest: h.finalize().to_vec(),
    }
}

fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

/// Lower-cased, spaces removed: `Application/JSON; charset=utf-8` equals
/// `application/json;charset=utf-8`.
fn normalize_content_type(raw: &[u8]) -> std::borrow::Cow<'_, str> {
    // Nearly always already normal: then borrowed, nothing built.
    if let Ok(s) = std::str::from_utf8(raw)
        && s.bytes()
            .all(|b| b.is_ascii() && !(b as char).is_whitespace() && !b.is_ascii_uppercase())
    {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(
        String::from_utf8_lossy(raw)
            .chars()
            .filter(|c| !c.is_whitespace())
            .flat_map(char::to_lowercase)
            .collect(),
    )
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("");
    essence == "application/json" || essence.ends_with("+json")
}

/// A JSON body as the fingerprint reads it: strings borrowed from the body unless they
/// hold escapes, and each object's members in a vector, sorted by key once the object
/// is read. It is what `serde_json::Value` would give, without a string allocated per
/// key and value or a tree map per object: a duplicated key keeps its last value, as a
/// `Value`'s map does.
enum Json<'a> {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

impl Json<'_> {
    /// Feeds a canonical, unambiguous encoding of the value into the hasher: a type
    /// tag, then length-prefixed contents; object members sorted by key.
    fn feed(&self, h: &mut Sha256) {
        match self {
            Json::Null => h.update(b"n"),
            Json::Bool(b) => h.update(if *b { b"t" } else { b"f" }),
            Json::Number(n) => {
                h.update(b"#");
                field(h, canonical_number(n).as_bytes());
            }
            Json::String(s) => {
                h.update(b"s");
                field(h, s.as_bytes());
            }
            Json::Array(items) => {
                h.update(b"[");
                h.update((items.len() as u64).to_be_bytes());
                for item in items {
                    item.feed(h);
                }
            }
            Json::Object(members) => {
                h.update(b"{");
                h.update((members.len() as u64).to_be_bytes());
                for (k, item) in members {
                    field(h, k.as_bytes());
                    item.feed(h);
                }
            }
        }
    }
}

impl<'de> Deserialize<'de> for Json<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }

    fn visit_bool<E>(self, b: bool) -> Result<Json<'de>, E> {
        Ok(Json::Bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Json<'de>, E> {
        Ok(Json::Number(n.into()))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Json<'de>, E> {
        Ok(Json::Number(n.into()))
    }

    fn visit_f64<E>(self, n: f64) -> Result<Json<'de>, E> {
        // As `Value` does: a double that is not finite is null.
        Ok(serde_json::Number::from_f64(n).map_or(Json::Null, Json::Number))
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, s: &'de str) -> Result<Json<'de>, E> {
        StrVisitor.visit_borrowed_str(s).map(Json::String)
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Json<'de>, E> {
        StrVisitor.visit_str(s).map(Json::String)
    }

    fn visit_string<E: serde::de::Error>(self, s: String) -> Result<Json<'de>, E> {
        StrVisitor.visit_string(s).map(Json::String)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        let mut members: Vec<(Cow<'de, str>, Json<'de>)> = Vec::new();
        while let Some(Key(k)) = map.next_key()? {
            members.push((k, map.next_value()?));
        }
        // Nearly always sorted and without duplicates already.
        if !members.is_sorted_by(|a, b| a.0 < b.0) {
            // The stable sort keeps the members of one key in their order; reversed
            // first, the last of them comes first and is the one kept.
            members.reverse();
            members.sort_by(|a, b| a.0.cmp(&b.0));
            members.dedup_by(|later, kept| later.0 == kept.0);
        }
        Ok(Json::Object(members))
    }
}

/// An object member's key, borrowed from the body unless it holds escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(StrVisitor).map(Key)
    }
}

/// A JSON string (a value or a key): borrowed from the body unless it holds escapes.
struct StrVisitor;

impl<'de> Visitor<'de> for StrVisitor {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(s))
    }

    fn visit_str<E>(self, s: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(s.to_owned()))
    }

    fn visit_string<E>(self, s: String) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(s))
    }
}

/// Integers that fit 64 bits compare exactly; other numbers compare as IEEE-754
/// doubles, as RFC 8785 (JSON Canonicalization Scheme) does. A double with no
/// fractional part that fits an i64 or a u64 is written as that integer (exactly:
/// such a double is an integer), so `1.0 == 1` and `1e19 == 10000000000000000000`.
fn canonical_number(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    let f = n.as_f64().unwrap_or(f64::NAN);
    // 2^63 and 2^64 are exact doubles: the bounds are exact.
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    if f.fract() == 0.0 && (-TWO_63..TWO_63).contains(&f) {
        return (f as i64).to_string();
    }
    if f.fract() == 0.0 && (0.0..2.0 * TWO_63).contains(&f) {
        return (f as u64).to_string();
    }
    // `{:e}` prints the shortest representation that round-trips.
    format!("{f:e}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fp_with(mode: FingerprintMode, ct: &str, uri: &str, body: &[u8]) -> Fingerprint {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
        fingerprint(
            mode,
            &http::Method::POST,
            &uri.parse().unwrap(),
            &headers,
            &[],
            body,
        )
    }

    fn fp(body: &str) -> Fingerprint {
        fp_with(
            FingerprintMode::Json,
            "application/json",
            "/v1/charges",
            body.as_bytes(),
        )
    }

    #[test]
    fn json_ignores_order_and_whitespace() {
        assert_eq!(
            fp(r#"{"a":1,"b":[1,2]}"#),
            fp("{ \"b\" : [1, 2],\n \"a\": 1 }")
        );
        assert_eq!(fp(r#"{"n":1}"#), fp(r#"{"n":1.0}"#));
        assert_eq!(fp(r#"{"n":100}"#), fp(r#"{"n":1e2}"#));
        assert_eq!(fp(r#"{"s":"A"}"#), fp(r#"{"s":"\u0041"}"#));
        assert_ne!(fp(r#"{"a":1}"#), fp(r#"{"a":2}"#));
        assert_ne!(fp(r#"{"a":"1"}"#), fp(r#"{"a":1}"#));
        assert_ne!(fp(r#"[1,2]"#), fp(r#"[2,1]"#));
        assert_ne!(fp(r#"{"a":null}"#), fp(r#"{}"#));
    }

    #[test]
    fn a_number_and_its_reencoding_give_one_fingerprint() {
        // Found by fuzz/json_fingerprint: integers beyond 64 bits are parsed as doubles,
        // and without correctly rounded parsing `-9237320326854775808` and serde_json's
        // own re-encoding of it, `-9.237320326854775e+18`, became two different doubles.
        for text in ["-9237320326854775808", "[123456789012345678901234567890]"] {
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            let again = serde_json::to_string(&v).unwrap();
            assert_eq!(fp(text), fp(&again), "{text} vs {again}");
        }
    }

    #[test]
    fn integral_doubles_equal_their_integer_spelling_across_the_64_bit_range() {
        for (a, b) in [
            ("1e19", "10000000000000000000"),
            ("9.3e18", "9300000000000000000"),
            ("-9.223372036854775808e18", "-9223372036854775808"),
            ("1.8446744073709550e19", "18446744073709549568"),
            ("-0.0", "0"),
        ] {
            assert_eq!(fp(a), fp(b), "{a} vs {b}");
        }
        // Beyond 2^64 both spellings are doubles, and compare as such.
        assert_eq!(fp("2e19"), fp("20000000000000000000"));
        assert_ne!(fp("1e19"), fp("10000000000000000001"));
    }

    #[test]
    fn raw_mode_is_exact() {
        let a = fp_with(
            FingerprintMode::Raw,
            "application/json",
            "/x",
            br#"{"a":1}"#,
        );
        let b = fp_with(
            FingerprintMode::Raw,
            "application/json",
            "/x",
            br#"{ "a":1}"#,
        );
        assert_ne!(a, b);
    }

    #[test]
    fn malformed_json_falls_back_to_bytes() {
        let a = fp_with(FingerprintMode::Json, "application/json", "/x", b"{oops");
        let b = fp_with(FingerprintMode::Json, "application/json", "/x", b"{oops");
        let c = fp_with(FingerprintMode::Json, "application/json", "/x", b"{oops ");
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn query_is_normalized_and_path_matters() {
        let a = fp_with(FingerprintMode::Raw, "text/plain", "/x?b=2&a=1", b"");
        let b = fp_with(FingerprintMode::Raw, "text/plain", "/x?a=1&b=2", b"");
        let c = fp_with(FingerprintMode::Raw, "text/plain", "/x?a=%31&b=2", b"");
        let d = fp_with(FingerprintMode::Raw, "text/plain", "/y?a=1&b=2", b"");
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_ne!(a, d);
    }

    #[test]
    fn content_type_and_headers_count() {
        let a = fp_with(FingerprintMode::Raw, "text/plain", "/x", b"1");
        let b = fp_with(FingerprintMode::Raw, "text/csv", "/x", b"1");
        assert_ne!(a, b);
        let name = http::HeaderName::from_static("api-version");
        let mut h1 = http::HeaderMap::new();
        h1.insert(&name, "2024-01-01".parse().unwrap());
        let mut h2 = http::HeaderMap::new();
        h2.insert(&name, "2025-01-01".parse().unwrap());
        let uri: http::Uri = "/x".parse().unwrap();
        let f1 = fingerprint(
            FingerprintMode::Raw,
            &http::Method::POST,
            &uri,
            &h1,
            std::slice::from_ref(&name),
            b"",
        );
        let f2 = fingerprint(
            FingerprintMode::Raw,
            &http::Method::POST,
            &uri,
            &h2,
            &[name],
            b"",
        );
        assert_ne!(f1, f2);
    }

    #[test]
    fn none_mode_matches_everything_and_encoding_round_trips() {
        let none = fp_with(FingerprintMode::None, "application/json", "/x", b"1");
        assert!(none.matches(&fp("{}")));
        let f = fp("{}");
        assert_eq!(Fingerprint::decode(&f.encode()), Some(f.clone()));
        assert!(f.matches(&f));
        assert!(!f.matches(&fp("[]")));
    }

    /// The fingerprint as computed before [`Json`]: through a `serde_json::Value`. Both
    /// must give the same digest for every body, or stored records would stop matching
    /// their retries.
    fn fp_through_value(body: &str) -> Option<Fingerprint> {
        fn canonical(h: &mut Sha256, v: &serde_json::Value) {
            use serde_json::Value;
            match v {
                Value::Null => h.update(b"n"),
                Value::Bool(b) => h.update(if *b { b"t" } else { b"f" }),
                Value::Number(n) => {
                    h.update(b"#");
                    field(h, canonical_number(n).as_bytes());
                }
                Value::String(s) => {
                    h.update(b"s");
                    field(h, s.as_bytes());
                }
                Value::Array(items) => {
                    h.update(b"[");
                    h.update((items.len() as u64).to_be_bytes());
                    for item in items {
                        canonical(h, item);
                    }
                }
                Value::Object(map) => {
                    h.update(b"{");
                    h.update((map.len() as u64).to_be_bytes());
                    let mut members: Vec<_> = map.iter().collect();
                    members.sort_by(|a, b| a.0.cmp(b.0));
                    for (k, item) in members {
                        field(h, k.as_bytes());
                        canonical(h, item);
                    }
                }
            }
        }
        let value: serde_json::Value = serde_json::from_str(body).ok()?;
        let mut h = Sha256::new();
        field(&mut h, b"POST");
        field(&mut h, b"/v1/charges");
        h.update(0u64.to_be_bytes());
        field(&mut h, b"application/json");
        h.update(b"J");
        canonical(&mut h, &value);
        Some(Fingerprint {
            version: Fingerprint::CURRENT_VERSION,
            digest: h.finalize().to_vec(),
        })
    }

    #[test]
    fn the_fingerprint_is_the_one_computed_through_a_value() {
        for body in [
            r#"{"amount":1500,"currency":"brl","customer":"cus_1"}"#,
            r#"{"b":1,"a":2,"b":3}"#,
            r#"{"a":{"z":[1,2.5,-3e2,"x\u00e9"],"y":null},"\u0061":true}"#,
            r#"[{"k":"v"},{},[],"",0,-0,1.5e300]"#,
            r#""just a string""#,
            "18446744073709551615",
        ] {
            assert_eq!(Some(fp(body)), fp_through_value(body), "{body}");
        }
        // A body a `Value` refuses (a number out of range) is hashed as bytes, as before.
        let out_of_range = "[1e400]";
        assert_eq!(fp_through_value(out_of_range), None);
        assert_eq!(
            fp(out_of_range),
            fp_with(
                FingerprintMode::Raw,
                "application/json",
                "/v1/charges",
                out_of_range.as_bytes()
            )
        );
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            (-1.0e12f64..1.0e12).prop_map(Value::from),
            "[a-z\\u{e9}\"\\\\]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z]{0,5}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Serializes with shuffled member order and random whitespace.
    fn scramble(v: &serde_json::Value, seed: &mut u64, out: &mut String) {
        use serde_json::Value;
        fn next(seed: &mut u64) -> u64 {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *seed >> 33
        }
        let ws = [" ", "", "\n", "\t ", ""];
        match v {
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(ws[(next(seed) % 5) as usize]);
                    scramble(item, seed, out);
                }
                out.push(']');
            }
            Value::Object(map) => {
                let mut members: Vec<_> = map.iter().collect();
                let n = members.len();
                for i in (1..n).rev() {
                    let j = (next(seed) as usize) % (i + 1);
                    members.swap(i, j);
                }
                out.push('{');
                for (i, (k, item)) in members.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(k).unwrap());
                    out.push_str(ws[(next(seed) % 5) as usize]);
                    out.push(':');
                    scramble(item, seed, out);
                }
                out.push('}');
            }
            other => out.push_str(&serde_json::to_string(other).unwrap()),
        }
    }

    proptest! {
        #[test]
        fn equal_json_values_give_equal_fingerprints(v in json_value(), seed in any::<u64>()) {
            let compact = serde_json::to_string(&v).unwrap();
            let mut s = seed;
            let mut scrambled = String::new();
            scramble(&v, &mut s, &mut scrambled);
            prop_assert_eq!(fp(&compact), fp(&scrambled));
        }

        #[test]
        fn scrambled_json_gives_the_fingerprint_of_a_value(v in json_value(), seed in any::<u64>()) {
            let mut s = seed;
            let mut scrambled = String::new();
            scramble(&v, &mut s, &mut scrambled);
            prop_assert_eq!(Some(fp(&scrambled)), fp_through_value(&scrambled));
        }

        #[test]
        fn different_json_values_give_different_fingerprints(a in json_value(), b in json_value()) {
            let a_text = serde_json::to_string(&a).unwrap();
            let b_text = serde_json::to_string(&b).unwrap();
            // Compare as values after one round-trip through text (which is what the
            // fingerprint sees), with numbers normalized the way JSON compares them.
            let av: serde_json::Value = serde_json::from_str(&a_text).unwrap();
            let bv: serde_json::Value = serde_json::from_str(&b_text).unwrap();
            prop_assume!(!json_eq(&av, &bv));
            prop_assert_ne!(fp(&a_text), fp(&b_text));
        }
    }

    fn json_eq(a: &serde_json::Value, b: &serde_json::Value) -> bool {
        use serde_json::Value;
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_eq(p, q))
            }
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
            }
            _ => a == b,
        }
    }
}
