//! Source signatures: `authsync ingest` signs every message it produces, so the worker can
//! tell a delivery whose provider signature was verified from a message any producer of the
//! topic wrote, whatever the Kafka ACLs are.
//!
//! Headers: `authsync-source: <endpoint>` and `authsync-source-signature: v1,<key id>,<mac>`,
//! where `<mac>` is base64 HMAC-SHA256 under the key over the length-prefixed source, Kafka
//! key and value (each as an 8-byte big-endian length, then the bytes). A signed message
//! cannot be re-keyed, re-sourced or edited without the key; a copy of it is the same
//! delivery (the inbox de-duplicates it).

use std::collections::HashMap;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::Secret;

pub const SOURCE_HEADER: &str = "authsync-source";
pub const SIGNATURE_HEADER: &str = "authsync-source-signature";
const VERSION: &str = "v1";
/// Shorter keys are refused: HMAC-SHA256 wants at least its output size.
pub const MIN_KEY_BYTES: usize = 32;

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8], source: &str, kafka_key: &[u8], value: &[u8]) -> HmacSha256 {
    // Any key length is valid for HMAC; the error case cannot happen.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for part in [source.as_bytes(), kafka_key, value] {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    mac
}

/// A key id fits in the signature header: non-empty, no commas, spaces or control characters.
pub fn is_valid_key_id(id: &str) -> bool {
    !id.is_empty() && !id.contains([',', ' ']) && !id.chars().any(char::is_control)
}

/// A resolved key with its id.
#[derive(Clone)]
pub struct SigningKey {
    pub id: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({}, <redacted>)", self.id)
    }
}

impl SigningKey {
    /// Resolves a configured secret (`env:`, `file:` or the value); `field` names it in errors.
    pub fn resolve(id: &str, secret: &Secret, field: &str) -> Result<Self, String> {
        let value = secret.resolve().map_err(|e| format!("{field}: {e}"))?;
        if value.expose().len() < MIN_KEY_BYTES {
            return Err(format!(
                "{field}: a source signing key needs at least {MIN_KEY_BYTES} bytes"
            ));
        }
        if !is_valid_key_id(id) {
            return Err(format!(
                "{field}: key id `{id}` must be non-empty, without commas or spaces"
            ));
        }
        Ok(Self {
            id: id.to_string(),
            key: value.expose().as_bytes().to_vec(),
        })
    }

    /// The `authsync-source-signature` value for this message.
    pub fn sign(&self, source: &str, kafka_key: &[u8], value: &[u8]) -> String {
        let tag = mac(&self.key, source, kafka_key, value)
            .finalize()
            .into_bytes();
        format!(
            "{VERSION},{},{}",
            self.id,
            base64::engine::general_purpose::STANDARD.encode(tag)
        )
    }
}

/// The keys a worker accepts, by id.
#[derive(Clone, Debug, Default)]
pub struct SourceKeys {
    keys: HashMap<String, SigningKey>,
}

/// What the headers of a message say about who wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceCheck {
    /// No signature: any producer may have written it.
    Unsigned,
    /// Signed by a key the worker holds: the source is the one ingest verified.
    Verified(String),
    /// A signature that does not verify (forged, edited, unknown key, malformed).
    Invalid(String),
}

impl SourceKeys {
    pub fn new(keys: impl IntoIterator<Item = SigningKey>) -> Self {
        Self {
            keys: keys.into_iter().map(|k| (k.id.clone(), k)).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks a message's source signature (constant-time comparison).
    pub fn check(
        &self,
        headers: &[(String, Vec<u8>)],
        kafka_key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> SourceCheck {
        let named = |name: &'static str| {
            headers
                .iter()
                .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_slice())
        };
        let mut signatures = named(SIGNATURE_HEADER);
        let Some(signature) = signatures.next() else {
            return SourceCheck::Unsigned;
        };
        if signatures.next().is_some() {
            return SourceCheck::Invalid(format!("more than one `{SIGNATURE_HEADER}` header"));
        }
        let mut sources = named(SOURCE_HEADER);
        let (Some(source), None) = (sources.next(), sources.next()) else {
            return SourceCheck::Invalid(format!(
                "a signed message needs exactly one `{SOURCE_HEADER}` header"
            ));
        };
        let Ok(source) = std::str::from_utf8(source) else {
            return SourceCheck::Invalid(format!("`{SOURCE_HEADER}` is not UTF-8"));
        };
        let parts: Vec<&[u8]> = signature.splitn(3, |b| *b == b',').collect();
        let [version, key_id, tag] = parts.as_slice() else {
            return SourceCheck::Invalid(format!(
                "`{SIGNATURE_HEADER}` is not `v1,<key id>,<mac>`"
            ));
        };
        if *version != VERSION.as_bytes() {
            return SourceCheck::Invalid(format!("`{SIGNATURE_HEADER}` has an unknown version"));
        }
        let Some(key) = std::str::from_utf8(key_id)
            .ok()
            .and_then(|id| self.keys.get(id))
        else {
            return SourceCheck::Invalid(format!(
                "`{SIGNATURE_HEADER}` names a key id this worker does not hold (trust.keys)"
            ));
        };
        let Ok(tag) = base64::engine::general_purpose::STANDARD.decode(tag) else {
            return SourceCheck::Invalid(format!("`{SIGNATURE_HEADER}` mac is not base64"));
        };
        let expected = mac(
            &key.key,
            source,
            kafka_key.unwrap_or_default(),
            value.unwrap_or_default(),
        );
        match expected.verify_slice(&tag) {
            Ok(()) => SourceCheck::Verified(source.to_string()),
            Err(_) => SourceCheck::Invalid(format!(
                "`{SIGNATURE_HEADER}` does not match the message (edited, re-keyed or forged)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, secret: &str) -> SigningKey {
        SigningKey::resolve(id, &Secret::new(secret), "test").unwrap()
    }

    fn headers(source: &str, signature: &str) -> Vec<(String, Vec<u8>)> {
        vec![
            (SOURCE_HEADER.into(), source.as_bytes().to_vec()),
            (SIGNATURE_HEADER.into(), signature.as_bytes().to_vec()),
        ]
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn a_signed_message_verifies_and_any_edit_breaks_it() {
        let k = key("k1", SECRET);
        let keys = SourceKeys::new([k.clone()]);
        let sig = k.sign("clerk-prod", b"clerk:user_1", b"{\"a\":1}");
        let h = headers("clerk-prod", &sig);
        assert_eq!(
            keys.check(&h, Some(b"clerk:user_1"), Some(b"{\"a\":1}")),
            SourceCheck::Verified("clerk-prod".into())
        );
        // Another value, another key, another source, a truncated tag: all invalid.
        for (h, k, v) in [
            (h.clone(), &b"clerk:user_1"[..], &b"{\"a\":2}"[..]),
            (h.clone(), &b"clerk:user_2"[..], &b"{\"a\":1}"[..]),
            (
                headers("okta-prod", &sig),
                &b"clerk:user_1"[..],
                &b"{\"a\":1}"[..],
            ),
            (
                headers("clerk-prod", &sig[..sig.len() - 4]),
                &b"clerk:user_1"[..],
                &b"{\"a\":1}"[..],
            ),
        ] {
            assert!(matches!(
                keys.check(&h, Some(k), Some(v)),
                SourceCheck::Invalid(_)
            ));
        }
        // Moving bytes between the key and the value does not keep the mac (length prefixes).
        let sig = k.sign("s", b"ab", b"c");
        assert!(matches!(
            keys.check(&headers("s", &sig), Some(b"a"), Some(b"bc")),
            SourceCheck::Invalid(_)
        ));
    }

    #[test]
    fn unknown_keys_duplicates_and_short_keys_are_refused() {
        let keys = SourceKeys::new([key("k1", SECRET)]);
        let other = key("k2", SECRET);
        let sig = other.sign("s", b"k", b"v");
        assert!(matches!(
            keys.check(&headers("s", &sig), Some(b"k"), Some(b"v")),
            SourceCheck::Invalid(r) if r.contains("key id")
        ));
        assert_eq!(
            keys.check(&[], Some(b"k"), Some(b"v")),
            SourceCheck::Unsigned
        );
        // A source header alone is a claim, not a signature.
        let claim = vec![(SOURCE_HEADER.to_string(), b"clerk-prod".to_vec())];
        assert_eq!(keys.check(&claim, None, None), SourceCheck::Unsigned);
        let k1 = key("k1", SECRET);
        let mut twice = headers("s", &k1.sign("s", b"k", b"v"));
        twice.push((SOURCE_HEADER.into(), b"t".to_vec()));
        assert!(matches!(
            keys.check(&twice, Some(b"k"), Some(b"v")),
            SourceCheck::Invalid(_)
        ));
        assert!(SigningKey::resolve("k1", &Secret::new("short"), "f").is_err());
        assert!(SigningKey::resolve("k,1", &Secret::new(SECRET), "f").is_err());
    }

    #[test]
    fn rotation_accepts_either_key() {
        let (old, new) = (key("k1", SECRET), key("k2", &SECRET.repeat(2)));
        let keys = SourceKeys::new([old.clone(), new.clone()]);
        for k in [old, new] {
            let sig = k.sign("s", b"k", b"v");
            assert_eq!(
                keys.check(&headers("s", &sig), Some(b"k"), Some(b"v")),
                SourceCheck::Verified("s".into())
            );
        }
    }
}
