//! Property tests (proptest, stable Rust) of every decoder and of the header path: any
//! input either decodes or yields a dead-letter class with a reason, and nothing panics.
//! The corpus is seeded from `tests/fixtures/` (every provider's real payload shapes),
//! mutated at the JSON level and at the byte level.
//!
//! CI runs the default case count. The long run (1,000,000+ inputs per property) is
//! `PROPTEST_CASES=1000000 cargo test --release --lib events::properties` (README).

use std::path::Path;

use proptest::prelude::*;
use serde_json::Value;

use super::merge::MergeRequest;
use super::providers::{decode_login_message, RawMessage};
use super::DecodeError;
use crate::steps::{bounded_reason, check_event_id, MAX_REASON_BYTES};
use crate::store::outbox::{pack_headers, unpack_headers};

const PROVIDERS: [&str; 7] = [
    "auth0", "clerk", "cognito", "firebase", "keycloak", "okta", "workos",
];

type Fixture = (String, Vec<u8>, Vec<(String, Vec<u8>)>);

/// Every fixture: (its provider, its bytes, its Clerk sidecar headers if any); read once.
fn fixtures() -> &'static [Fixture] {
    static CORPUS: std::sync::OnceLock<Vec<Fixture>> = std::sync::OnceLock::new();
    CORPUS.get_or_init(read_fixtures)
}

fn read_fixtures() -> Vec<Fixture> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut out = Vec::new();
    for provider in PROVIDERS {
        let Ok(dir) = std::fs::read_dir(root.join(provider)) else {
            continue;
        };
        let mut files: Vec<_> = dir.filter_map(Result::ok).map(|e| e.path()).collect();
        files.sort();
        for path in files {
            let name = path.to_string_lossy().to_string();
            if name.ends_with(".headers.json") || !name.ends_with(".json") {
                continue;
            }
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let sidecar = name.replace(".json", ".headers.json");
            let headers = std::fs::read(&sidecar)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Map<String, Value>>(&b).ok())
                .map(|m| {
                    m.into_iter()
                        .map(|(k, v)| (k, v.as_str().unwrap_or_default().as_bytes().to_vec()))
                        .collect()
                })
                .unwrap_or_default();
            out.push((provider.to_string(), bytes, headers));
        }
    }
    out
}

/// A decode result is acceptable: events, or an error with a class and a reason.
fn check_login(result: Result<Vec<super::LoginEvent>, DecodeError>) {
    match result {
        Ok(events) => {
            for e in events {
                // What reaches the steps: ids either pass the edge check or are refused there.
                let id_ok = check_event_id(&e.event_id).is_ok();
                assert!(!e.provider.is_empty(), "a decoded login names its provider");
                assert!(!e.subject.is_empty(), "a decoded login names its subject");
                // What `authsync ingest` produces for it reads back as the same login.
                if id_ok {
                    let normalized = serde_json::to_vec(&e.to_cloudevent()).expect("encodes");
                    let again = super::LoginEvent::decode(Some(&normalized), 1 << 20);
                    assert_eq!(
                        again.as_ref(),
                        Ok(&e),
                        "{}",
                        String::from_utf8_lossy(&normalized)
                    );
                }
            }
        }
        Err(e) => assert!(
            !e.reason.is_empty() && !e.class.as_str().is_empty(),
            "{e:?}"
        ),
    }
}

fn decode_all_ways(bytes: &[u8], extra: &[(String, Vec<u8>)]) {
    let mut headers = extra.to_vec();
    check_login(decode_login_message(
        RawMessage {
            value: Some(bytes),
            headers: &headers,
            timestamp: None,
        },
        64 * 1024,
    ));
    for provider in PROVIDERS {
        headers.retain(|(k, _)| k != "authsync-provider");
        headers.push(("authsync-provider".into(), provider.as_bytes().to_vec()));
        check_login(decode_login_message(
            RawMessage {
                value: Some(bytes),
                headers: &headers,
                timestamp: Some(chrono::Utc::now()),
            },
            64 * 1024,
        ));
    }
    if let Err(e) = MergeRequest::decode(Some(bytes), 64 * 1024) {
        assert!(!e.reason.is_empty());
    }
}

/// JSON values an attacker would try: NUL and control characters, huge and odd numbers,
/// deep nesting, wrong types, far-future and malformed times.
fn hostile_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        Just(Value::from(u64::MAX)),
        ".{0,40}".prop_map(Value::String),
        "[\\x00-\\x1f]{1,8}".prop_map(Value::String),
        Just(Value::String("\u{212A}im@example.com".into())),
        Just(Value::String("a@b@c".into())),
        Just(Value::String("2999-12-31T23:59:59Z".into())),
        Just(Value::String("not-a-time".into())),
        Just(Value::String("x".repeat(5000))),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Every path (JSON pointer) inside `value`.
fn pointers(value: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                pointers(
                    v,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                );
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                pointers(v, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_a_decoder(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        decode_all_ways(&bytes, &[]);
    }

    #[test]
    fn mutated_fixtures_decode_or_yield_a_class(
        pick in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), hostile_value()), 1..4),
    ) {
        let corpus = fixtures();
        prop_assume!(!corpus.is_empty());
        let (_, bytes, headers) = &corpus[pick.index(corpus.len())];
        let mut value: Value = serde_json::from_slice(bytes).expect("fixtures are JSON");
        for (at, replacement) in edits {
            let mut paths = Vec::new();
            pointers(&value, String::new(), &mut paths);
            let path = &paths[at.index(paths.len())];
            if path.is_empty() {
                value = replacement;
            } else if let Some(slot) = value.pointer_mut(path) {
                *slot = replacement;
            }
        }
        let mutated = serde_json::to_vec(&value).expect("serializes");
        decode_all_ways(&mutated, headers);
    }

    #[test]
    fn byte_flipped_fixtures_never_panic(
        pick in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let corpus = fixtures();
        prop_assume!(!corpus.is_empty());
        let (_, bytes, headers) = &corpus[pick.index(corpus.len())];
        let mut bytes = bytes.clone();
        for (at, b) in flips {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        decode_all_ways(&bytes, headers);
    }

    #[test]
    fn headers_survive_storage_byte_for_byte(
        headers in prop::collection::vec((".{0,16}", prop::collection::vec(any::<u8>(), 0..64)), 0..8),
    ) {
        prop_assert_eq!(unpack_headers(&pack_headers(&headers)), Some(headers));
    }

    #[test]
    fn garbage_header_bytes_are_refused_or_read_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = unpack_headers(&bytes);
    }

    #[test]
    fn reasons_are_bounded_and_printable(reason in ".{0,3000}") {
        let shown = bounded_reason(&reason);
        prop_assert!(shown.len() <= MAX_REASON_BYTES);
        prop_assert!(!shown.chars().any(char::is_control));
    }
}
