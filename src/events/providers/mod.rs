//! Provider adapters: the native payloads of auth providers, on the login topic beside the
//! normalized `auth.login` CloudEvent, turned into [`LoginEvent`]s.
//!
//! One Kafka message may hold several logins (an Okta hook delivery, an Auth0 log-stream
//! batch) or none (a provider event that is not a login, e.g. a failed login): the adapter
//! returns them all, each with its own de-duplication id, prefixed by the provider so ids
//! of different providers never collide in the inbox.

use chrono::{DateTime, Utc};

use super::{login::LOGIN_EVENT_TYPE, DecodeError, ErrorClass, LoginEvent};

/// What an adapter sees of a Kafka message.
#[derive(Clone, Copy, Debug)]
pub struct RawMessage<'a> {
    pub value: Option<&'a [u8]>,
    pub headers: &'a [(String, Vec<u8>)],
    /// The Kafka message timestamp, for payloads that carry no time of their own.
    pub timestamp: Option<DateTime<Utc>>,
}

impl RawMessage<'_> {
    /// The first header of that name (case-insensitive), as UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

/// Decodes a message of the login topic: a normalized `auth.login` CloudEvent, or a
/// provider's native payload. Returns every login it holds (possibly none).
pub fn decode_login_message(
    message: RawMessage<'_>,
    max_bytes: usize,
) -> Result<Vec<LoginEvent>, DecodeError> {
    let bytes = message.value.unwrap_or_default();
    if bytes.len() > max_bytes {
        return Err(DecodeError::new(
            ErrorClass::TooLarge,
            format!(
                "value is {} bytes, the limit is {max_bytes} (consumer.max_message_bytes)",
                bytes.len()
            ),
        ));
    }
    // The normalized contract first: it is the common case and keeps its precise errors.
    let normalized = LoginEvent::decode(message.value, max_bytes);
    match normalized {
        Ok(event) => Ok(vec![event]),
        Err(e) if is_native_candidate(&e) => match native(message)? {
            Some(events) => Ok(events),
            None => Err(unknown_or(e)),
        },
        Err(e) => Err(e),
    }
}

/// Only payloads that are JSON but not a normalized login may be native ones; everything
/// else (too large, not JSON, a broken `auth.login`) keeps its own error.
fn is_native_candidate(e: &DecodeError) -> bool {
    matches!(e.class, ErrorClass::NotCloudEvent | ErrorClass::WrongType)
}

/// A JSON value that no adapter recognised is `unknown_payload`.
fn unknown_or(e: DecodeError) -> DecodeError {
    DecodeError::new(
        ErrorClass::UnknownPayload,
        format!(
            "not a normalized `{LOGIN_EVENT_TYPE}` CloudEvent ({}) and no provider adapter recognises it",
            e.reason
        ),
    )
}

/// Detects the provider (CloudEvents `type`, a header, or the payload's shape) and runs
/// its adapter. `Ok(None)`: no adapter recognises the payload.
fn native(_message: RawMessage<'_>) -> Result<Option<Vec<LoginEvent>>, DecodeError> {
    Ok(None)
}
