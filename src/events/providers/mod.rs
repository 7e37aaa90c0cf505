//! Provider adapters: the native payloads of auth providers, on the login topic beside the
//! normalized `auth.login` CloudEvent, turned into [`LoginEvent`]s.
//!
//! One Kafka message may hold several logins (an Okta hook delivery, an Auth0 log-stream
//! batch) or none (a provider event that is not a login, e.g. a failed login): the adapter
//! returns them all, each with its own de-duplication id, prefixed by the provider so ids
//! of different providers never collide in the inbox.

mod auth0;
mod clerk;
mod cognito;
mod firebase;
mod keycloak;
mod okta;
mod workos;

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use super::login::ConnectionKind;
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
            Some(events) => {
                // What `authsync ingest` would produce for it must read back: the
                // normalized contract's `source` limit applies here too (long ids meet the
                // step's own edge check).
                for event in &events {
                    super::check_source(&event.source)?;
                }
                Ok(events)
            }
            // A CloudEvent of a type no adapter claims keeps its precise class.
            None if e.class == ErrorClass::WrongType => Err(e),
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

/// The kind of an Auth0 connection strategy (post-login `connection.strategy`, log
/// `strategy`), as Auth0 documents them. Unknown strategies (custom OAuth2, new enterprise
/// types) stay unknown: trust treats them as enterprise.
pub(super) fn auth0_strategy_kind(strategy: &str) -> Option<ConnectionKind> {
    match strategy {
        "auth0" => Some(ConnectionKind::Database),
        "email" | "sms" => Some(ConnectionKind::Passwordless),
        "samlp" | "adfs" | "waad" | "ad" | "auth0-adldap" | "oidc" | "okta" | "pingfederate"
        | "google-apps" | "office365" | "ip" | "sharepoint" | "custom" => {
            Some(ConnectionKind::Enterprise)
        }
        "google-oauth2" | "github" | "facebook" | "apple" | "windowslive" | "linkedin"
        | "twitter" | "amazon" | "bitbucket" | "dropbox" | "paypal" | "salesforce" | "yahoo"
        | "box" | "discord" | "gitlab" | "slack" | "spotify" | "twitch" | "microsoft" => {
            Some(ConnectionKind::Social)
        }
        _ => None,
    }
}

/// The header that forces an adapter: `authsync-provider: okta`.
pub const PROVIDER_HEADER: &str = "authsync-provider";

/// CloudEvents `type` prefix that names an adapter: `authsync.native.<provider>`.
pub const NATIVE_TYPE_PREFIX: &str = "authsync.native.";

/// The auth providers whose native payloads authsync reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Provider {
    Auth0,
    Clerk,
    Firebase,
    Okta,
    Keycloak,
    Workos,
    Cognito,
}

impl Provider {
    pub const ALL: [Provider; 7] = [
        Provider::Auth0,
        Provider::Clerk,
        Provider::Firebase,
        Provider::Okta,
        Provider::Keycloak,
        Provider::Workos,
        Provider::Cognito,
    ];

    /// The `provider` of the logins it yields, and its name in headers and CloudEvent types.
    pub fn name(self) -> &'static str {
        match self {
            Provider::Auth0 => "auth0",
            Provider::Clerk => "clerk",
            Provider::Firebase => "firebase",
            Provider::Okta => "okta",
            Provider::Keycloak => "keycloak",
            Provider::Workos => "workos",
            Provider::Cognito => "cognito",
        }
    }

    pub fn from_name(name: &str) -> Option<Provider> {
        Provider::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(name.trim()))
    }

    fn decode(
        self,
        payload: &Value,
        delivery: &Delivery<'_>,
    ) -> Result<Vec<LoginEvent>, DecodeError> {
        match self {
            Provider::Auth0 => auth0::decode(payload, delivery),
            Provider::Clerk => clerk::decode(payload, delivery),
            Provider::Firebase => firebase::decode(payload, delivery),
            Provider::Okta => okta::decode(payload, delivery),
            Provider::Keycloak => keycloak::decode(payload, delivery),
            Provider::Workos => workos::decode(payload, delivery),
            Provider::Cognito => cognito::decode(payload, delivery),
        }
    }
}

/// What an adapter knows about the delivery besides the payload.
pub(crate) struct Delivery<'a> {
    pub message: RawMessage<'a>,
    /// The CloudEvent the payload was wrapped in, if it was.
    pub envelope: Option<CloudEventInfo<'a>>,
}

/// The attributes of a wrapping CloudEvent (rule b): its `id` and `time` stand in for the
/// ones a native payload lacks.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CloudEventInfo<'a> {
    pub id: Option<&'a str>,
    pub source: Option<&'a str>,
    pub event_type: Option<&'a str>,
    pub time: Option<DateTime<Utc>>,
}

impl<'a> CloudEventInfo<'a> {
    /// `Some` for any JSON object with a `specversion`.
    fn of(value: &'a Value) -> Option<Self> {
        let object = value.as_object()?;
        object.get("specversion")?;
        let text = |key: &str| {
            object
                .get(key)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        };
        Some(CloudEventInfo {
            id: text("id"),
            source: text("source"),
            event_type: text("type"),
            time: text("time")
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc)),
        })
    }
}

impl Delivery<'_> {
    /// The CloudEvent id, else the first of these headers present.
    fn id_from(&self, headers: &[&str]) -> Option<String> {
        self.envelope
            .and_then(|e| e.id)
            .map(str::to_string)
            .or_else(|| {
                headers
                    .iter()
                    .find_map(|h| self.message.header(h))
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(str::to_string)
            })
    }

    /// For payloads without a time of their own: the CloudEvent `time`, else the Kafka
    /// timestamp.
    fn time_or_err(&self, what: &str) -> Result<DateTime<Utc>, DecodeError> {
        self.envelope
            .and_then(|e| e.time)
            .or(self.message.timestamp)
            .ok_or_else(|| {
                DecodeError::new(
                    ErrorClass::MissingField,
                    format!("{what} carries no time and the Kafka message has no timestamp"),
                )
            })
    }

    fn source_or(&self, default: impl Into<String>) -> String {
        self.envelope
            .and_then(|e| e.source)
            .map(str::to_string)
            .unwrap_or_else(|| default.into())
    }
}

/// Detects the provider of a JSON payload that is not a normalized login and runs its
/// adapter. `Ok(None)`: nothing recognises it (the caller makes it `unknown_payload`).
///
/// Rules, first match wins:
/// 1. Header `authsync-provider: <name>` (auth0, clerk, firebase, okta, keycloak, workos,
///    cognito) forces that adapter; an unknown name is `unknown_payload`. If the value is a
///    CloudEvent, the adapter reads its `data`.
/// 2. A CloudEvent (has `specversion`) whose `type` is `authsync.native.<name>`, or
///    `com.okta.event_hook`: the adapter reads its `data`, and the CloudEvent `id`/`time`
///    stand in where the native payload has none. Any other CloudEvent type: `Ok(None)`.
/// 3. A `svix-id` or `webhook-id` header: Clerk (delivered by Svix).
/// 4. The payload's shape, see [`detect_shape`].
fn native(message: RawMessage<'_>) -> Result<Option<Vec<LoginEvent>>, DecodeError> {
    let Some(bytes) = message.value else {
        return Ok(None);
    };
    let Ok(value) = serde_json::from_slice::<Value>(bytes) else {
        return Ok(None);
    };
    let envelope = CloudEventInfo::of(&value);
    let forced = match message.header(PROVIDER_HEADER) {
        Some(name) => Some(Provider::from_name(name).ok_or_else(|| {
            DecodeError::new(
                ErrorClass::UnknownPayload,
                format!(
                    "header `{PROVIDER_HEADER}` names no known provider: `{}`",
                    name.trim()
                ),
            )
        })?),
        None => None,
    };
    let provider = match (forced, envelope) {
        (Some(p), _) => Some(p),
        (None, Some(ce)) => ce.event_type.and_then(provider_of_type),
        (None, None)
            if message
                .header("svix-id")
                .or(message.header("webhook-id"))
                .is_some() =>
        {
            Some(Provider::Clerk)
        }
        (None, None) => detect_shape(&value),
    };
    let Some(provider) = provider else {
        return Ok(None);
    };
    let payload = match envelope {
        Some(_) => value.get("data").filter(|d| !d.is_null()).ok_or_else(|| {
            DecodeError::new(ErrorClass::MissingField, "CloudEvent `data` is missing")
        })?,
        None => &value,
    };
    let delivery = Delivery { message, envelope };
    provider.decode(payload, &delivery).map(Some)
}

/// CloudEvent types that name an adapter (rule 2).
fn provider_of_type(event_type: &str) -> Option<Provider> {
    if event_type == okta::HOOK_EVENT_TYPE {
        return Some(Provider::Okta);
    }
    event_type
        .strip_prefix(NATIVE_TYPE_PREFIX)
        .and_then(Provider::from_name)
}

/// Rule 4, the payload's shape, checked in this order:
/// - `eventType == "com.okta.event_hook"`: Okta event hook;
/// - `triggerSource` and `userPoolId`: Cognito trigger;
/// - `object == "event"` and a string `type`: Clerk;
/// - `log_id`, or an array whose first element has `log_id`: Auth0 Log Streams;
/// - `user` and `transaction`, or `event.user`: Auth0 post-login Action event;
/// - `eventType` starting `providers/cloud.auth/eventTypes/`: Firebase blocking function;
/// - `id`, `event`, `data` and `created_at`: WorkOS event;
/// - `realmId`, a string `type` and a numeric `time`: Keycloak event.
pub fn detect_shape(value: &Value) -> Option<Provider> {
    if let Some(first) = value.as_array().and_then(|a| a.first()) {
        return first.get("log_id").map(|_| Provider::Auth0);
    }
    let object = value.as_object()?;
    let text = |key: &str| object.get(key).and_then(Value::as_str);
    let has = |key: &str| object.get(key).is_some_and(|v| !v.is_null());
    if text("eventType") == Some(okta::HOOK_EVENT_TYPE) {
        Some(Provider::Okta)
    } else if has("triggerSource") && has("userPoolId") {
        Some(Provider::Cognito)
    } else if text("object") == Some("event") && text("type").is_some() {
        Some(Provider::Clerk)
    } else if has("log_id")
        || (has("user") && has("transaction"))
        || object.get("event").and_then(|e| e.get("user")).is_some()
    {
        Some(Provider::Auth0)
    } else if text("eventType").is_some_and(|t| t.starts_with(firebase::EVENT_TYPE_PREFIX)) {
        Some(Provider::Firebase)
    } else if has("id") && has("event") && has("data") && has("created_at") {
        Some(Provider::Workos)
    } else if has("realmId")
        && text("type").is_some()
        && object.get("time").is_some_and(Value::is_number)
    {
        Some(Provider::Keycloak)
    } else {
        None
    }
}

// ------------------------------------------------------------------ shared adapter helpers

/// Deserializes a native payload; a mistyped field is `invalid_field` naming its path.
pub(crate) fn parse<'a, T: Deserialize<'a>>(
    value: &'a Value,
    what: &str,
) -> Result<T, DecodeError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let reason = if path == "." {
            format!("{what}: {inner}")
        } else {
            format!("{what} field `{path}`: {inner}")
        };
        DecodeError::new(ErrorClass::InvalidField, reason)
    })
}

/// `missing_field` naming the native field: "Okta event actor.id is missing".
pub(crate) fn missing(field: impl std::fmt::Display) -> DecodeError {
    DecodeError::new(ErrorClass::MissingField, format!("{field} is missing"))
}

pub(crate) fn invalid(reason: impl Into<String>) -> DecodeError {
    DecodeError::new(ErrorClass::InvalidField, reason)
}

/// A required, non-blank native string.
pub(crate) fn require<'a>(value: Option<&'a str>, field: &str) -> Result<&'a str, DecodeError> {
    value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| missing(field))
}

pub(crate) fn rfc3339(value: &str, field: &str) -> Result<DateTime<Utc>, DecodeError> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| invalid(format!("{field} is not an RFC 3339 timestamp: {e}")))
}

pub(crate) fn epoch_millis(value: i64, field: &str) -> Result<DateTime<Utc>, DecodeError> {
    DateTime::from_timestamp_millis(value).ok_or_else(|| {
        invalid(format!(
            "{field} is not a time in milliseconds since the epoch"
        ))
    })
}

/// Identifiers such as Okta's `alternateId` are emails only sometimes: take them as the
/// login's email only when they look like one (the shared validation would reject the rest).
pub(crate) fn as_email(value: Option<&str>) -> Option<String> {
    value
        .map(str::trim)
        .filter(|v| {
            v.split_once('@')
                .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'))
                && !v.contains(char::is_whitespace)
        })
        .map(str::to_string)
}

/// "First Last" from whichever parts are present and non-blank.
pub(crate) fn full_name(first: Option<&str>, last: Option<&str>) -> Option<String> {
    let parts: Vec<&str> = [first, last]
        .into_iter()
        .flatten()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    (!parts.is_empty()).then(|| parts.join(" "))
}

pub(crate) fn owned(value: Option<&str>) -> Option<String> {
    value.map(str::to_string)
}

/// Key/value attributes from the pairs whose value is present.
pub(crate) fn attributes(pairs: &[(&str, Option<&str>)]) -> Option<Vec<(String, String)>> {
    let list: Vec<(String, String)> = pairs
        .iter()
        .filter_map(|(k, v)| {
            v.filter(|v| !v.is_empty())
                .map(|v| (k.to_string(), v.to_string()))
        })
        .collect();
    (!list.is_empty()).then_some(list)
}

/// A de-duplication id for payloads that carry none: a UUIDv5 over the canonical JSON
/// (object keys sorted, no whitespace) plus the Kafka timestamp. The same delivery
/// re-produced with its timestamp (a replay, a mirror) gets the same id; two logins with
/// identical bodies (Cognito sends no time or nonce) at different times do not collide.
pub(crate) fn derived_id(
    provider: Provider,
    payload: &Value,
    timestamp: Option<DateTime<Utc>>,
) -> String {
    let mut canonical = String::new();
    canonical_json(payload, &mut canonical);
    if let Some(t) = timestamp {
        let _ = write!(canonical, "\n{}", t.timestamp_millis());
    }
    let id = uuid::Uuid::new_v5(&DERIVED_ID_NAMESPACE, canonical.as_bytes());
    format!("{}:derived:{id}", provider.name())
}

/// Fixed namespace of derived ids (a random constant: changing it re-keys every derived id).
const DERIVED_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6a1f_3c52_9d0e_4b7a_8e21_5f4c_0b9d_e713);

fn canonical_json(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                canonical_json(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Kafka timestamp fixtures are decoded with (2024-06-01T10:00:00Z).
    pub(crate) const FIXED_TIMESTAMP: i64 = 1_717_236_000_000;

    pub(crate) fn decode_with(
        value: &[u8],
        headers: &[(&str, &str)],
        timestamp: Option<DateTime<Utc>>,
    ) -> Result<Vec<LoginEvent>, DecodeError> {
        let headers: Vec<(String, Vec<u8>)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        decode_login_message(
            RawMessage {
                value: Some(value),
                headers: &headers,
                timestamp,
            },
            1 << 20,
        )
    }

    pub(crate) fn decode_fixture(
        text: &str,
        headers: &[(&str, &str)],
    ) -> Result<Vec<LoginEvent>, DecodeError> {
        decode_with(
            text.as_bytes(),
            headers,
            DateTime::from_timestamp_millis(FIXED_TIMESTAMP),
        )
    }

    /// A Clerk `<name>.headers.json` sidecar as header pairs.
    pub(crate) fn headers_of(text: &'static str) -> Vec<(&'static str, &'static str)> {
        let map: std::collections::BTreeMap<&str, &str> =
            serde_json::from_str(text).expect("sidecar is a string map");
        map.into_iter().collect()
    }

    fn detected(text: &str) -> Option<Provider> {
        detect_shape(&serde_json::from_str(text).expect("fixture JSON"))
    }

    #[test]
    fn shapes_pick_their_adapter() {
        let cases = [
            (
                include_str!("../../../tests/fixtures/auth0/post-login.json"),
                Provider::Auth0,
            ),
            (
                include_str!("../../../tests/fixtures/auth0/log-stream-batch.json"),
                Provider::Auth0,
            ),
            (
                include_str!("../../../tests/fixtures/auth0/log-stream-wrapped-success.json"),
                Provider::Auth0,
            ),
            (
                include_str!("../../../tests/fixtures/clerk/user-created.json"),
                Provider::Clerk,
            ),
            (
                include_str!("../../../tests/fixtures/firebase/before-sign-in.json"),
                Provider::Firebase,
            ),
            (
                include_str!("../../../tests/fixtures/okta/event-hook-logins.json"),
                Provider::Okta,
            ),
            (
                include_str!("../../../tests/fixtures/keycloak/login.json"),
                Provider::Keycloak,
            ),
            (
                include_str!("../../../tests/fixtures/workos/user-created.json"),
                Provider::Workos,
            ),
            (
                include_str!("../../../tests/fixtures/cognito/post-authentication.json"),
                Provider::Cognito,
            ),
        ];
        for (text, provider) in cases {
            assert_eq!(detected(text), Some(provider), "{text}");
        }
        assert_eq!(detected(r#"{"hello":"world"}"#), None);
        assert_eq!(detected("[]"), None);
        assert_eq!(detected(r#"[{"no":"log"}]"#), None);
    }

    #[test]
    fn the_provider_header_forces_an_adapter() {
        // A Keycloak event without `realmId` has no recognisable shape...
        let body = br#"{"id":"kc-1","time":1717236000123,"type":"LOGIN","userId":"u-1"}"#;
        let err = decode_with(body, &[], None).unwrap_err();
        assert_eq!(err.class, ErrorClass::UnknownPayload);
        // ...unless the header says what it is.
        let events = decode_with(body, &[("authsync-provider", "keycloak")], None).unwrap();
        assert_eq!(events[0].event_id, "keycloak:kc-1");
        let err = decode_with(body, &[("authsync-provider", "myidp")], None).unwrap_err();
        assert_eq!(err.class, ErrorClass::UnknownPayload);
        assert!(err.reason.contains("myidp"), "{}", err.reason);
    }

    #[test]
    fn a_native_cloudevent_type_unwraps_data_and_lends_its_id_and_time() {
        let cognito = include_str!("../../../tests/fixtures/cognito/post-authentication.json");
        let wrapped = format!(
            r#"{{"specversion":"1.0","id":"ce-77","source":"arn:aws:lambda:eu-west-1:123456789012:function:fwd",
                "type":"authsync.native.cognito","time":"2024-06-01T11:00:00Z","data":{cognito}}}"#
        );
        let events = decode_with(wrapped.as_bytes(), &[], None).unwrap();
        assert_eq!(events[0].event_id, "cognito:ce-77");
        assert_eq!(
            events[0].occurred_at.to_rfc3339(),
            "2024-06-01T11:00:00+00:00"
        );
        assert_eq!(
            events[0].source,
            "arn:aws:lambda:eu-west-1:123456789012:function:fwd"
        );
    }

    #[test]
    fn the_svix_header_means_clerk() {
        let body = include_bytes!("../../../tests/fixtures/clerk/session-created.json");
        let events = decode_with(body, &[("svix-id", "msg_x")], None).unwrap();
        assert_eq!(events[0].provider, "clerk");
        assert_eq!(events[0].event_id, "clerk:msg_x");
    }

    #[test]
    fn unknown_json_is_unknown_payload_and_other_cloudevents_keep_wrong_type() {
        let err = decode_with(br#"{"provider":"p","subject":"s"}"#, &[], None).unwrap_err();
        assert_eq!(err.class, ErrorClass::UnknownPayload);
        let err = decode_with(br#"[1,2,3]"#, &[], None).unwrap_err();
        assert_eq!(err.class, ErrorClass::UnknownPayload);
        let err = decode_with(
            br#"{"specversion":"1.0","id":"a","source":"s","type":"auth.logout","time":"2026-01-01T00:00:00Z","data":{}}"#,
            &[],
            None,
        )
        .unwrap_err();
        assert_eq!(err.class, ErrorClass::WrongType);
    }

    #[test]
    fn the_normalized_login_still_wins() {
        let body = br#"{"specversion":"1.0","id":"n1","source":"s","type":"auth.login","time":"2026-01-01T00:00:00Z","data":{"provider":"okta","subject":"00u1"}}"#;
        let events = decode_with(body, &[("svix-id", "msg_ignored")], None).unwrap();
        assert_eq!(events[0].event_id, "n1");
    }
}
