//! The `Idempotency-Key` value (SPEC §1): parsing both accepted forms and validation.

use serde::{Deserialize, Serialize};

/// Which characters a key may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum KeyCharset {
    /// Printable ASCII, `0x20..=0x7E` (the default).
    #[default]
    PrintableAscii,
    /// Letters, digits, `-` and `_` only (`[A-Za-z0-9_-]`).
    Token,
}

impl KeyCharset {
    fn allows(self, c: u8) -> bool {
        match self {
            KeyCharset::PrintableAscii => (0x20..=0x7e).contains(&c),
            KeyCharset::Token => c.is_ascii_alphanumeric() || c == b'-' || c == b'_',
        }
    }

    fn describe(self) -> &'static str {
        match self {
            KeyCharset::PrintableAscii => "printable ASCII",
            KeyCharset::Token => "letters, digits, '-' and '_'",
        }
    }
}

/// Validation rules for a key; checked before any store lookup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeyRules {
    /// Shortest accepted key, in characters (after unquoting). Default 1.
    pub min_len: usize,
    /// Longest accepted key, in characters (after unquoting). Default 255.
    pub max_len: usize,
    /// Accepted characters. Default printable ASCII.
    pub charset: KeyCharset,
    /// Require the key to be a UUID version 4 (any case, hyphenated). Default false.
    pub uuid_v4: bool,
}

impl Default for KeyRules {
    fn default() -> Self {
        KeyRules {
            min_len: 1,
            max_len: 255,
            charset: KeyCharset::PrintableAscii,
            uuid_v4: false,
        }
    }
}

/// Why a key was refused. Every variant renders as `idempotency-key-invalid` (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key is empty or shorter than the minimum.
    #[error("the key is {len} characters long; at least {min} are required")]
    TooShort {
        /// Length of the key.
        len: usize,
        /// Configured minimum.
        min: usize,
    },
    /// The key is longer than the maximum.
    #[error("the key is {len} characters long; at most {max} are allowed")]
    TooLong {
        /// Length of the key.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// A character outside the configured set.
    #[error("the key contains a character outside {allowed} at position {position}")]
    BadCharacter {
        /// Zero-based byte position in the unquoted key.
        position: usize,
        /// The allowed set, in words.
        allowed: &'static str,
    },
    /// A quoted key (RFC 8941 sf-string) that is not well formed.
    #[error("the quoted key is not a valid structured-field string: {0}")]
    BadSfString(&'static str),
    /// The route requires UUID v4 keys.
    #[error("the key must be a UUID version 4")]
    NotUuidV4,
    /// Two accepted header names carried different values.
    #[error("the request carries two different keys in {first} and {second}")]
    Conflicting {
        /// First header name.
        first: String,
        /// Second header name.
        second: String,
    },
    /// The same header appears more than once.
    #[error("the {0} header appears more than once")]
    Repeated(String),
}

/// A validated idempotency key (the unquoted form).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Parses a header value (bare token or sf-string) and validates it against `rules`.
    ///
    /// ```
    /// use idem_core::key::{IdempotencyKey, KeyRules};
    /// let rules = KeyRules::default();
    /// let bare = IdempotencyKey::parse(b"abc-123", &rules).unwrap();
    /// let quoted = IdempotencyKey::parse(br#""abc-123""#, &rules).unwrap();
    /// assert_eq!(bare, quoted);
    /// ```
    pub fn parse(raw: &[u8], rules: &KeyRules) -> Result<Self, KeyError> {
        let value = trim_ows(raw);
        let unquoted = if value.first() == Some(&b'"') {
            parse_sf_string(value)?
        } else {
            value.to_vec()
        };
        validate(&unquoted, rules)?;
        // validate() admitted only ASCII, so this never fails.
        let s = String::from_utf8(unquoted).map_err(|_| KeyError::BadCharacter {
            position: 0,
            allowed: rules.charset.describe(),
        })?;
        Ok(IdempotencyKey(s))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn trim_ows(raw: &[u8]) -> &[u8] {
    let start = raw
        .iter()
        .position(|c| *c != b' ' && *c != b'\t')
        .unwrap_or(raw.len());
    let end = raw
        .iter()
        .rposition(|c| *c != b' ' && *c != b'\t')
        .map_or(start, |e| e + 1);
    &raw[start..end]
}

/// RFC 8941 §4.2.5: a string is `"` chars `"`, where chars are printable ASCII and the
/// only escapes are `\"` and `\\`. Parameters (`;a=b`) are not accepted: a key is a bare item.
fn parse_sf_string(value: &[u8]) -> Result<Vec<u8>, KeyError> {
    let mut out = Vec::with_capacity(value.len());
    let mut iter = value[1..].iter().enumerate();
    while let Some((i, &c)) = iter.next() {
        match c {
            b'\\' => match iter.next() {
                Some((_, &e)) if e == b'"' || e == b'\\' => out.push(e),
                Some(_) => return Err(KeyError::BadSfString("only \\\" and \\\\ may be escaped")),
                None => return Err(KeyError::BadSfString("the string ends inside an escape")),
            },
            b'"' => {
                if i + 2 != value.len() {
                    return Err(KeyError::BadSfString("characters follow the closing quote"));
                }
                return Ok(out);
            }
            0x20..=0x7e => out.push(c),
            _ => return Err(KeyError::BadSfString("a character outside printable ASCII")),
        }
    }
    Err(KeyError::BadSfString("the closing quote is missing"))
}

fn validate(key: &[u8], rules: &KeyRules) -> Result<(), KeyError> {
    let len = key.len();
    if len < rules.min_len.max(1) {
        return Err(KeyError::TooShort {
            len,
            min: rules.min_len.max(1),
        });
    }
    if len > rules.max_len {
        return Err(KeyError::TooLong {
            len,
            max: rules.max_len,
        });
    }
    if let Some(position) = key.iter().position(|c| !rules.charset.allows(*c)) {
        return Err(KeyError::BadCharacter {
            position,
            allowed: rules.charset.describe(),
        });
    }
    if rules.uuid_v4 && !is_uuid_v4(key) {
        return Err(KeyError::NotUuidV4);
    }
    Ok(())
}

fn is_uuid_v4(key: &[u8]) -> bool {
    // Hyphenated form only: providers document keys as `xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`.
    key.len() == 36
        && std::str::from_utf8(key)
            .ok()
            .and_then(|s| uuid::Uuid::try_parse(s).ok())
            .is_some_and(|u| u.get_version_num() == 4 && u.get_variant() == uuid::Variant::RFC4122)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(s: &str) -> Result<IdempotencyKey, KeyError> {
        IdempotencyKey::parse(s.as_bytes(), &KeyRules::default())
    }

    #[test]
    fn bare_and_quoted_forms_are_the_same_key() {
        assert_eq!(parse("abc-123").unwrap(), parse("\"abc-123\"").unwrap());
        assert_eq!(parse(r#""a\"b\\c""#).unwrap().as_str(), r#"a"b\c"#);
        assert_eq!(parse("  spaced  ").unwrap().as_str(), "spaced");
    }

    #[test]
    fn bad_sf_strings_are_refused() {
        for bad in [
            r#""abc"#,
            r#""a\nb""#,
            r#""abc"x"#,
            r#""abc\"#,
            "\"a\u{e9}\"",
        ] {
            assert!(matches!(parse(bad), Err(KeyError::BadSfString(_))), "{bad}");
        }
    }

    #[test]
    fn length_bounds() {
        assert!(matches!(parse(""), Err(KeyError::TooShort { .. })));
        assert!(matches!(parse("\"\""), Err(KeyError::TooShort { .. })));
        assert!(parse(&"a".repeat(255)).is_ok());
        assert!(matches!(
            parse(&"a".repeat(256)),
            Err(KeyError::TooLong { len: 256, max: 255 })
        ));
        let rules = KeyRules {
            min_len: 10,
            ..KeyRules::default()
        };
        assert!(matches!(
            IdempotencyKey::parse(b"short", &rules),
            Err(KeyError::TooShort { len: 5, min: 10 })
        ));
    }

    #[test]
    fn charset_token() {
        let rules = KeyRules {
            charset: KeyCharset::Token,
            ..KeyRules::default()
        };
        assert!(IdempotencyKey::parse(b"Abc_09-x", &rules).is_ok());
        assert!(matches!(
            IdempotencyKey::parse(b"abc.def", &rules),
            Err(KeyError::BadCharacter { position: 3, .. })
        ));
        assert!(matches!(
            parse("tab\there"),
            Err(KeyError::BadCharacter { position: 3, .. })
        ));
    }

    #[test]
    fn uuid_v4_rule() {
        let rules = KeyRules {
            uuid_v4: true,
            ..KeyRules::default()
        };
        assert!(IdempotencyKey::parse(b"6f1c2b9e-8a3d-4c1e-9f2a-0b1c2d3e4f5a", &rules).is_ok());
        // version 1
        assert_eq!(
            IdempotencyKey::parse(b"6f1c2b9e-8a3d-1c1e-9f2a-0b1c2d3e4f5a", &rules),
            Err(KeyError::NotUuidV4)
        );
        // simple (unhyphenated) form
        assert_eq!(
            IdempotencyKey::parse(b"6f1c2b9e8a3d4c1e9f2a0b1c2d3e4f5a", &rules),
            Err(KeyError::NotUuidV4)
        );
    }

    proptest! {
        #[test]
        fn any_printable_key_round_trips_through_both_forms(key in "[ -~]{1,255}") {
            let trimmed = key.trim_matches([' ', '\t']);
            prop_assume!(!trimmed.is_empty() && !trimmed.starts_with('"'));
            let bare = parse(&key).unwrap();
            prop_assert_eq!(bare.as_str(), trimmed);
            let quoted = format!("\"{}\"", bare.as_str().replace('\\', "\\\\").replace('"', "\\\""));
            prop_assert_eq!(parse(&quoted).unwrap(), bare);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_accepted_keys_respect_rules(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let rules = KeyRules { min_len: 3, max_len: 40, charset: KeyCharset::Token, uuid_v4: false };
            if let Ok(k) = IdempotencyKey::parse(&raw, &rules) {
                prop_assert!((3..=40).contains(&k.as_str().len()));
                prop_assert!(k.as_str().bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
            }
        }
    }
}
