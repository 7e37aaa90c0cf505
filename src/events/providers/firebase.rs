//! Firebase Authentication blocking functions: the `AuthBlockingEvent` of `beforeCreate`
//! (signup) and `beforeSignIn` (login), as the function forwards it. `credential` holds
//! OAuth tokens: only its `providerId`/`signInMethod` is ever read.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use super::{attributes, invalid, missing, owned, parse, require, Delivery};
use crate::events::login::{Connection, ConnectionKind, LoginKind};
use crate::events::{DecodeError, LoginEvent};

const PROVIDER: &str = "firebase";

pub(super) const EVENT_TYPE_PREFIX: &str = "providers/cloud.auth/eventTypes/";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BlockingEvent<'a> {
    event_id: Option<&'a str>,
    /// `providers/cloud.auth/eventTypes/user.beforeSignIn:google.com` (the sign-in method
    /// is appended after a colon when there is one).
    event_type: Option<&'a str>,
    timestamp: Option<&'a str>,
    locale: Option<&'a str>,
    user_agent: Option<&'a str>,
    #[serde(borrow)]
    resource: Option<Resource<'a>>,
    #[serde(borrow)]
    additional_user_info: Option<AdditionalUserInfo<'a>>,
    #[serde(borrow)]
    credential: Option<Credential<'a>>,
    #[serde(borrow)]
    data: Option<AuthUserRecord<'a>>,
}

#[derive(Deserialize)]
struct Resource<'a> {
    name: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AdditionalUserInfo<'a> {
    provider_id: Option<&'a str>,
}

/// Only the method: the tokens beside it are never deserialized.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Credential<'a> {
    sign_in_method: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuthUserRecord<'a> {
    uid: Option<&'a str>,
    email: Option<&'a str>,
    email_verified: Option<bool>,
    display_name: Option<&'a str>,
    #[serde(rename = "photoURL")]
    photo_url: Option<&'a str>,
    tenant_id: Option<&'a str>,
}

pub(super) fn decode(
    payload: &Value,
    delivery: &Delivery<'_>,
) -> Result<Vec<LoginEvent>, DecodeError> {
    let e: BlockingEvent<'_> = parse(payload, "Firebase blocking event")?;
    let event_type = require(e.event_type, "Firebase eventType")?;
    let trigger = event_type
        .strip_prefix(EVENT_TYPE_PREFIX)
        .map(|rest| rest.split(':').next().unwrap_or(rest));
    let kind = match trigger {
        Some("user.beforeCreate") => LoginKind::Signup,
        Some("user.beforeSignIn") => LoginKind::Login,
        // beforeSendEmail, beforeSendSms, ...: not logins.
        _ => return Ok(Vec::new()),
    };
    let user = e.data.as_ref().ok_or_else(|| missing("Firebase data"))?;
    let subject = require(user.uid, "Firebase data.uid")?;
    let event_id = require(e.event_id, "Firebase eventId")?;
    let occurred_at = match e.timestamp {
        Some(ts) => blocking_time(ts)?,
        None => delivery.time_or_err("Firebase blocking event")?,
    };
    let source = delivery.source_or(match e.resource.as_ref().and_then(|r| r.name) {
        Some(name) => format!("firebase:{name}"),
        None => PROVIDER.to_string(),
    });
    let mut login = LoginEvent::new(
        format!("{PROVIDER}:{event_id}"),
        source,
        occurred_at,
        PROVIDER,
        subject,
    );
    login.kind = kind;
    login.email = owned(user.email);
    login.email_verified = user.email_verified;
    login.display_name = owned(user.display_name);
    login.photo_url = owned(user.photo_url);
    login.locale = owned(e.locale);
    login.user_agent = owned(e.user_agent);
    let sign_in_provider = e
        .additional_user_info
        .as_ref()
        .and_then(|i| i.provider_id)
        .or(e.credential.as_ref().and_then(|c| c.sign_in_method));
    // `saml.*` / `oidc.*` providers are the customer's enterprise IdPs.
    login.connection = sign_in_provider.map(|p| Connection {
        connection_id: Some(p.to_string()),
        kind: match p {
            "password" => Some(ConnectionKind::Database),
            "phone" | "emailLink" => Some(ConnectionKind::Passwordless),
            p if p.starts_with("saml.") || p.starts_with("oidc.") => {
                Some(ConnectionKind::Enterprise)
            }
            "google.com"
            | "facebook.com"
            | "github.com"
            | "twitter.com"
            | "apple.com"
            | "microsoft.com"
            | "yahoo.com"
            | "playgames.google.com"
            | "gc.apple.com" => Some(ConnectionKind::Social),
            _ => None,
        },
        groups: None,
    });
    login.attributes = attributes(&[
        ("firebase.tenant_id", user.tenant_id),
        ("firebase.sign_in_provider", sign_in_provider),
    ]);
    login.validated().map(|l| vec![l])
}

/// firebase-functions formats `timestamp` with `Date.toUTCString()` (RFC 2822 style,
/// `Tue, 14 May 2024 09:16:28 GMT`); accept RFC 3339 too.
fn blocking_time(value: &str) -> Result<DateTime<Utc>, DecodeError> {
    DateTime::parse_from_rfc2822(value)
        .or_else(|_| DateTime::parse_from_rfc3339(value))
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| invalid("Firebase timestamp is neither an RFC 2822 nor an RFC 3339 time"))
}

#[cfg(test)]
mod tests {
    use super::super::tests::decode_fixture;
    use super::*;
    use crate::events::ErrorClass;

    #[test]
    fn before_create_is_a_signup_without_touching_the_credential() {
        let text = include_str!("../../../tests/fixtures/firebase/before-create.json");
        let events = decode_fixture(text, &[]).unwrap();
        let e = &events[0];
        assert_eq!(e.provider, "firebase");
        assert_eq!(e.kind, LoginKind::Signup);
        assert_eq!(e.subject, "kR3nXo8YvJc2WqT5bLz1HmPa9Ue4");
        assert_eq!(e.event_id, "firebase:Kq3Fz9mY2pWnR8tL1vXc");
        assert_eq!(e.email.as_deref(), Some("priya.nair@example.com"));
        assert_eq!(e.email_verified, Some(true));
        assert_eq!(e.occurred_at.to_rfc3339(), "2024-05-14T09:16:28+00:00");
        // Nothing of the credential's tokens ends up in the login.
        let debug = format!("{e:?}");
        assert!(!debug.contains("REDACTED-TEST-TOKEN"), "{debug}");
    }

    #[test]
    fn before_sign_in_is_a_login() {
        let events = decode_fixture(
            include_str!("../../../tests/fixtures/firebase/before-sign-in.json"),
            &[],
        )
        .unwrap();
        let e = &events[0];
        assert_eq!(e.kind, LoginKind::Login);
        assert_eq!(e.email_verified, Some(false));
        assert_eq!(e.locale.as_deref(), Some("fr"));
        let attrs = e.attributes.as_ref().unwrap();
        assert!(attrs.contains(&("firebase.tenant_id".into(), "tenant-emea-4k2j9".into())));
    }

    /// Found by the property test: a resource name long enough to make the login's
    /// `source` exceed the normalized contract's limit decoded here, and then the event
    /// `authsync ingest` would produce for it was refused by the worker.
    #[test]
    fn a_source_over_the_cloudevent_limit_is_refused_at_the_edge() {
        let text = include_str!("../../../tests/fixtures/firebase/before-create.json")
            .replace("projects/acme-prod-4821", &"x".repeat(2100));
        let e = decode_fixture(&text, &[]).unwrap_err();
        assert_eq!(e.class, ErrorClass::InvalidField);
        assert!(e.reason.contains("source"), "{}", e.reason);
        // At the limit it still decodes.
        let text = include_str!("../../../tests/fixtures/firebase/before-create.json").replace(
            "projects/acme-prod-4821",
            &"x".repeat(2048 - "firebase:".len()),
        );
        assert_eq!(decode_fixture(&text, &[]).unwrap()[0].source.len(), 2048);
    }

    #[test]
    fn before_send_email_yields_nothing() {
        let none = decode_fixture(
            include_str!("../../../tests/fixtures/firebase/before-send-email.json"),
            &[],
        )
        .unwrap();
        assert!(none.is_empty());
    }
}
