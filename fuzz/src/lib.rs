//! The checks behind idem's fuzz targets, kept in a library so that the same code
//! runs under libFuzzer (`fuzz_targets/*.rs`, via `cargo fuzz`) and, on stable, as the
//! `fuzz_corpora_replay` test of `crates/idem-proxy/tests/hostile.rs`, which includes
//! this file and replays the committed corpora (`bash fuzz/run.sh --short`).
//!
//! Each function takes the fuzzer's bytes, must never panic on any input, and panics
//! (an assertion) when a property idem promises does not hold.

use idem_core::fingerprint::{Fingerprint, FingerprintMode, fingerprint};
use idem_core::key::{IdempotencyKey, KeyCharset, KeyRules};

/// A target's checks: panics on a finding.
pub type Check = fn(&[u8]);

/// The targets, by name (the folder names under `corpus/`).
pub const TARGETS: &[(&str, Check)] = &[
    ("key_parse", key_parse),
    ("sf_string", sf_string),
    ("json_fingerprint", json_fingerprint),
    ("config_parse", config_parse),
];

/// `IdempotencyKey::parse` on arbitrary bytes with arbitrary `KeyRules`.
///
/// Input layout: byte 0 = flags (bit 0: token charset, bit 1: UUID v4 required),
/// byte 1 = `min_len`, bytes 2..4 = `max_len` (big endian), then the header value.
/// Shorter inputs are header values checked against the default rules.
///
/// Properties: an accepted key satisfies every rule, and both of its canonical
/// spellings (bare token, RFC 8941 sf-string) parse to the same key.
pub fn key_parse(data: &[u8]) {
    let (rules, raw) = match data {
        [flags, min, hi, lo, raw @ ..] => (
            KeyRules {
                min_len: usize::from(*min),
                max_len: usize::from(u16::from_be_bytes([*hi, *lo])),
                charset: if flags & 1 == 1 {
                    KeyCharset::Token
                } else {
                    KeyCharset::PrintableAscii
                },
                uuid_v4: flags & 2 == 2,
            },
            raw,
        ),
        _ => (KeyRules::default(), data),
    };
    let key = match IdempotencyKey::parse(raw, &rules) {
        Ok(key) => key,
        Err(e) => {
            // Rendering the error (it ends up in a problem's `detail`) must not panic.
            let _ = e.to_string();
            return;
        }
    };
    let k = key.as_str().as_bytes();
    assert!(
        k.len() >= rules.min_len.max(1),
        "too short: {key:?} {rules:?}"
    );
    assert!(k.len() <= rules.max_len, "too long: {key:?} {rules:?}");
    for &c in k {
        let ok = match rules.charset {
            KeyCharset::Token => c.is_ascii_alphanumeric() || c == b'-' || c == b'_',
            _ => (0x20..=0x7e).contains(&c),
        };
        assert!(ok, "byte {c:#04x} outside {:?}: {key:?}", rules.charset);
    }
    if rules.uuid_v4 {
        assert_eq!(k.len(), 36, "{key:?}");
        let text = std::str::from_utf8(k).expect("ASCII");
        // An independent check of the same rule: the `http`-free text form.
        let dashes: Vec<usize> = text.match_indices('-').map(|(i, _)| i).collect();
        assert_eq!(dashes, [8, 13, 18, 23], "{key:?}");
        assert_eq!(&text[14..15], "4", "{key:?}");
        assert!(
            matches!(&text[19..20], "8" | "9" | "a" | "b" | "A" | "B"),
            "{key:?}"
        );
    }
    let quoted = sf_serialize(k);
    assert_eq!(
        IdempotencyKey::parse(&quoted, &rules).as_ref(),
        Ok(&key),
        "the sf-string spelling {:?} of {key:?}",
        String::from_utf8_lossy(&quoted)
    );
    let bare_is_unambiguous =
        k[0] != b'"' && !matches!(k[0], b' ' | b'\t') && !matches!(k[k.len() - 1], b' ' | b'\t');
    if bare_is_unambiguous {
        assert_eq!(
            IdempotencyKey::parse(k, &rules).as_ref(),
            Ok(&key),
            "the bare spelling of {key:?}"
        );
    }
}

/// RFC 8941 sf-string parsing: the input, after a leading `"`, is a quoted header value.
///
/// Properties: idem agrees with an independent RFC 8941 §4.2.5 parser (accept or refuse,
/// and the unquoted value), and since an sf-string has exactly one spelling, an accepted
/// value serialises back to the (whitespace-trimmed) input, byte for byte.
pub fn sf_string(data: &[u8]) {
    let mut raw = Vec::with_capacity(data.len() + 1);
    raw.push(b'"');
    raw.extend_from_slice(data);
    let rules = KeyRules {
        min_len: 0,
        max_len: usize::MAX,
        charset: KeyCharset::PrintableAscii,
        uuid_v4: false,
    };
    let got = IdempotencyKey::parse(&raw, &rules);
    // A key is at least one character, so an empty sf-string is a valid string but
    // not a valid key.
    let want = reference_sf_string(&raw).filter(|v| !v.is_empty());
    match (&got, &want) {
        (Ok(key), Some(v)) => {
            assert_eq!(key.as_str().as_bytes(), v.as_slice());
            let trimmed = trim_sp_htab(&raw);
            assert_eq!(
                sf_serialize(key.as_str().as_bytes()),
                trimmed,
                "an sf-string has one spelling"
            );
        }
        (Err(_), None) => {}
        _ => panic!(
            "idem and RFC 8941 disagree on {:?}: idem {got:?}, reference {want:?}",
            String::from_utf8_lossy(&raw)
        ),
    }
}

/// The JSON-mode fingerprint on arbitrary bytes.
///
/// Properties: a body that does not parse as JSON is fingerprinted as its exact bytes
/// (equal to `raw` mode); a body that parses gets the same fingerprint as serde_json's
/// compact and pretty re-serialisations of it (a client that parses and re-encodes its
/// body between two attempts is still sending the same request).
pub fn json_fingerprint(data: &[u8]) {
    let json = fp(FingerprintMode::Json, data);
    let raw = fp(FingerprintMode::Raw, data);
    match serde_json::from_slice::<serde_json::Value>(data) {
        Err(_) => assert_eq!(json, raw, "malformed JSON is compared as bytes"),
        Ok(value) => {
            assert_ne!(json, raw, "parsed JSON is hashed as a value, not as bytes");
            let compact = serde_json::to_vec(&value).expect("a Value serialises");
            assert_eq!(
                fp(FingerprintMode::Json, &compact),
                json,
                "re-serialised {:?} from {:?}",
                String::from_utf8_lossy(&compact),
                String::from_utf8_lossy(data)
            );
            let pretty = serde_json::to_vec_pretty(&value).expect("a Value serialises");
            assert_eq!(fp(FingerprintMode::Json, &pretty), json);
        }
    }
}

/// `Config::parse(text).and_then(validate)` on arbitrary text: never panics, and every
/// error names a field.
pub fn config_parse(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match idem_proxy::config::Config::parse(&text).and_then(idem_proxy::config::Config::validate) {
        Ok(settings) => {
            let _ = format!("{settings:?}");
        }
        Err(e) => {
            assert!(!e.field.is_empty(), "an error without a field: {e:?}");
            let _ = e.to_string();
        }
    }
}

fn fp(mode: FingerprintMode, body: &[u8]) -> Fingerprint {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    fingerprint(
        mode,
        &http::Method::POST,
        &http::Uri::from_static("/v1/charges?b=2&a=1"),
        &headers,
        &[],
        body,
    )
}

fn trim_sp_htab(raw: &[u8]) -> &[u8] {
    let is_ows = |c: &u8| *c == b' ' || *c == b'\t';
    let start = raw.iter().position(|c| !is_ows(c)).unwrap_or(raw.len());
    let end = raw
        .iter()
        .rposition(|c| !is_ows(c))
        .map_or(start, |e| e + 1);
    &raw[start..end]
}

/// RFC 8941 §4.1.6 (serialising a string): `"`, each `\` and `"` escaped, `"`.
fn sf_serialize(value: &[u8]) -> Vec<u8> {
    let mut out = vec![b'"'];
    for &c in value {
        if c == b'"' || c == b'\\' {
            out.push(b'\\');
        }
        out.push(c);
    }
    out.push(b'"');
    out
}

/// RFC 8941 §4.2 + §4.2.5, written from the RFC's steps: trim the field value, parse a
/// string (printable ASCII; `\` may escape only `"` and `\`), then nothing may remain
/// (idem takes a bare item: no parameters). `None` where the RFC says "fail parsing".
fn reference_sf_string(field: &[u8]) -> Option<Vec<u8>> {
    let input = trim_sp_htab(field);
    let (&first, mut rest) = input.split_first()?;
    if first != b'"' {
        return None;
    }
    let mut out = Vec::new();
    loop {
        let (&c, tail) = rest.split_first()?;
        rest = tail;
        if c == b'\\' {
            let (&next, tail) = rest.split_first()?;
            rest = tail;
            if next != b'"' && next != b'\\' {
                return None;
            }
            out.push(next);
        } else if c == b'"' {
            return rest.is_empty().then_some(out);
        } else if !(0x20..=0x7e).contains(&c) {
            return None;
        } else {
            out.push(c);
        }
    }
}
