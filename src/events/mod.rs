//! The wire contract: CloudEvents 1.0 structured JSON in and out.
//!
//! Input decoding never panics and never guesses: every way a message can be unusable has
//! its own [`ErrorClass`] and a reason that names the offending field. Those two strings
//! become the `authsync-error-class` / `authsync-error-reason` headers on the dead letter.

pub mod login;
pub mod merge;
pub mod providers;
pub mod redact;
pub mod results;
pub mod source;

#[cfg(test)]
mod properties;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;

pub use login::LoginEvent;

/// Why a message can never be applied. Stable strings: operators filter dead letters by them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The value is larger than `consumer.max_message_bytes`.
    TooLarge,
    /// The value is empty, not UTF-8 or not JSON.
    NotJson,
    /// JSON, but not a CloudEvents 1.0 structured event.
    NotCloudEvent,
    /// A CloudEvent of a type this topic does not carry.
    WrongType,
    /// A required field (`provider`, `subject`, `data`, `time`) is absent.
    MissingField,
    /// A field has the wrong type, format or size.
    InvalidField,
    /// Postgres rejected the step permanently (a constraint the input violates).
    Unprocessable,
    /// JSON that is neither a normalized login nor a provider payload authsync knows.
    UnknownPayload,
    /// No trusted source vouches for it: unsigned while `trust.unsigned = refuse`, a bad
    /// source signature, or a source speaking for a provider it may not.
    UntrustedSource,
    /// authsync broke one of its own invariants on this message (a bug): logged at error
    /// level and dead-lettered so the partition moves on.
    Internal,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::TooLarge => "too_large",
            ErrorClass::NotJson => "not_json",
            ErrorClass::NotCloudEvent => "not_cloudevent",
            ErrorClass::WrongType => "wrong_type",
            ErrorClass::MissingField => "missing_field",
            ErrorClass::InvalidField => "invalid_field",
            ErrorClass::Unprocessable => "unprocessable",
            ErrorClass::UnknownPayload => "unknown_payload",
            ErrorClass::UntrustedSource => "untrusted_source",
            ErrorClass::Internal => "internal",
        }
    }
}

/// A permanent decoding or validation failure.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {reason}", class.as_str())]
pub struct DecodeError {
    pub class: ErrorClass,
    pub reason: String,
}

impl DecodeError {
    pub fn new(class: ErrorClass, reason: impl Into<String>) -> Self {
        Self {
            class,
            reason: reason.into(),
        }
    }
}

/// The CloudEvents attributes authsync reads; `data` stays raw until the type is known.
#[derive(Debug)]
pub struct Envelope<'a> {
    pub id: String,
    pub source: String,
    pub event_type: String,
    pub time: DateTime<Utc>,
    pub data: &'a RawValue,
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    specversion: Option<serde_json::Value>,
    id: Option<serde_json::Value>,
    source: Option<serde_json::Value>,
    #[serde(rename = "type")]
    event_type: Option<serde_json::Value>,
    time: Option<serde_json::Value>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// CloudEvents ids and sources are opaque, but they become primary keys: keep them sane.
const MAX_ID_LEN: usize = 256;
const MAX_SOURCE_LEN: usize = 2048;

/// The `source` limit of the normalized contract, for the logins a provider's native
/// payload yields (they become normalized events when `authsync ingest` produces them).
pub(crate) fn check_source(source: &str) -> Result<(), DecodeError> {
    if source.len() > MAX_SOURCE_LEN {
        return Err(DecodeError::new(
            ErrorClass::InvalidField,
            format!(
                "the login's source is {} bytes; CloudEvent `source` is limited to {MAX_SOURCE_LEN}",
                source.len()
            ),
        ));
    }
    Ok(())
}

/// The CloudEvent size limits on `id` and `source`.
fn check_id_and_source(id: &str, source: &str) -> Result<(), DecodeError> {
    if id.len() > MAX_ID_LEN || source.len() > MAX_SOURCE_LEN {
        return Err(DecodeError::new(
            ErrorClass::InvalidField,
            format!(
                "CloudEvent `id` is limited to {MAX_ID_LEN} bytes and `source` to {MAX_SOURCE_LEN}"
            ),
        ));
    }
    Ok(())
}

fn required_string(
    value: Option<serde_json::Value>,
    name: &str,
    class_if_missing: ErrorClass,
) -> Result<String, DecodeError> {
    match value {
        None | Some(serde_json::Value::Null) => Err(DecodeError::new(
            class_if_missing,
            format!("CloudEvent attribute `{name}` is missing"),
        )),
        Some(serde_json::Value::String(s)) if s.is_empty() => Err(DecodeError::new(
            ErrorClass::NotCloudEvent,
            format!("CloudEvent attribute `{name}` is empty"),
        )),
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(other) => Err(DecodeError::new(
            ErrorClass::NotCloudEvent,
            format!(
                "CloudEvent attribute `{name}` must be a string, got {}",
                json_kind(&other)
            ),
        )),
    }
}

pub(crate) fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Checks size, JSON and the CloudEvents envelope, and that the event has `expected_type`.
pub fn decode_envelope<'a>(
    value: Option<&'a [u8]>,
    max_bytes: usize,
    expected_type: &str,
) -> Result<Envelope<'a>, DecodeError> {
    let bytes = value.unwrap_or_default();
    if bytes.len() > max_bytes {
        return Err(DecodeError::new(
            ErrorClass::TooLarge,
            format!(
                "value is {} bytes, the limit is {max_bytes} (consumer.max_message_bytes)",
                bytes.len()
            ),
        ));
    }
    if bytes.is_empty() {
        return Err(DecodeError::new(
            ErrorClass::NotJson,
            "value is empty (a tombstone or an empty message)",
        ));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| DecodeError::new(ErrorClass::NotJson, format!("value is not UTF-8: {e}")))?;
    let first = text.trim_start().chars().next();
    if first != Some('{') {
        // Either not JSON at all, or JSON that is not an object: tell them apart.
        return Err(match serde_json::from_str::<serde_json::Value>(text) {
            Ok(v) => DecodeError::new(
                ErrorClass::NotCloudEvent,
                format!(
                    "value is JSON {}, a structured CloudEvent is an object",
                    json_kind(&v)
                ),
            ),
            Err(e) => DecodeError::new(ErrorClass::NotJson, format!("value is not JSON: {e}")),
        });
    }
    let raw: RawEnvelope<'a> = serde_json::from_str(text)
        .map_err(|e| DecodeError::new(ErrorClass::NotJson, format!("value is not JSON: {e}")))?;
    let specversion = required_string(raw.specversion, "specversion", ErrorClass::NotCloudEvent)?;
    if specversion != "1.0" {
        return Err(DecodeError::new(
            ErrorClass::NotCloudEvent,
            format!("CloudEvent specversion `{specversion}` is not supported (expected 1.0)"),
        ));
    }
    let id = required_string(raw.id, "id", ErrorClass::NotCloudEvent)?;
    let source = required_string(raw.source, "source", ErrorClass::NotCloudEvent)?;
    let event_type = required_string(raw.event_type, "type", ErrorClass::NotCloudEvent)?;
    check_id_and_source(&id, &source)?;
    if event_type != expected_type {
        return Err(DecodeError::new(
            ErrorClass::WrongType,
            format!(
                "CloudEvent type `{event_type}` is not accepted here (expected `{expected_type}`)"
            ),
        ));
    }
    let time = required_string(raw.time, "time", ErrorClass::MissingField)?;
    let time = DateTime::parse_from_rfc3339(&time)
        .map_err(|e| {
            DecodeError::new(
                ErrorClass::InvalidField,
                format!("CloudEvent `time` is not an RFC 3339 timestamp: {e}"),
            )
        })?
        .with_timezone(&Utc);
    let data = raw.data.ok_or_else(|| {
        DecodeError::new(ErrorClass::MissingField, "CloudEvent `data` is missing")
    })?;
    Ok(Envelope {
        id,
        source,
        event_type,
        time,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_event(data: &str) -> String {
        format!(
            r#"{{"specversion":"1.0","id":"e1","source":"test","type":"auth.login","time":"2026-01-01T00:00:00Z","data":{data}}}"#
        )
    }

    fn class_of(bytes: &[u8]) -> ErrorClass {
        decode_envelope(Some(bytes), 1024, "auth.login")
            .unwrap_err()
            .class
    }

    #[test]
    fn accepts_a_structured_cloudevent() {
        let text = ok_event(r#"{"provider":"p","subject":"s"}"#);
        let env = decode_envelope(Some(text.as_bytes()), 1024, "auth.login").unwrap();
        assert_eq!(env.id, "e1");
        assert_eq!(env.source, "test");
        assert_eq!(env.time.to_rfc3339(), "2026-01-01T00:00:00+00:00");
    }

    #[test]
    fn classifies_each_kind_of_bad_envelope() {
        assert_eq!(class_of(&[b'x'; 2000]), ErrorClass::TooLarge);
        assert_eq!(class_of(b""), ErrorClass::NotJson);
        assert_eq!(class_of(b"not json"), ErrorClass::NotJson);
        assert_eq!(class_of(&[0xff, 0xfe]), ErrorClass::NotJson);
        assert_eq!(class_of(b"{\"a\":"), ErrorClass::NotJson);
        assert_eq!(class_of(b"[1,2]"), ErrorClass::NotCloudEvent);
        assert_eq!(class_of(b"{\"id\":\"x\"}"), ErrorClass::NotCloudEvent);
        assert_eq!(
            class_of(br#"{"specversion":"0.3","id":"a","source":"s","type":"auth.login"}"#),
            ErrorClass::NotCloudEvent
        );
        assert_eq!(
            class_of(br#"{"specversion":"1.0","id":"a","source":"s","type":"auth.logout","time":"2026-01-01T00:00:00Z","data":{}}"#),
            ErrorClass::WrongType
        );
        assert_eq!(
            class_of(
                br#"{"specversion":"1.0","id":"a","source":"s","type":"auth.login","data":{}}"#
            ),
            ErrorClass::MissingField
        );
        assert_eq!(
            class_of(br#"{"specversion":"1.0","id":"a","source":"s","type":"auth.login","time":"yesterday","data":{}}"#),
            ErrorClass::InvalidField
        );
        assert_eq!(
            class_of(br#"{"specversion":"1.0","id":"a","source":"s","type":"auth.login","time":"2026-01-01T00:00:00Z"}"#),
            ErrorClass::MissingField
        );
    }
}
