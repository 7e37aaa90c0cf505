//! Clerk webhooks (delivered by Svix): `user.created`, `user.updated`, `session.created`.
//! The body has no event id: the Svix message id (`svix-id` header) is the dedupe key.

use serde::Deserialize;
use serde_json::Value;

use super::{attributes, epoch_millis, full_name, missing, owned, parse, require, Delivery};
use crate::events::login::{Connection, ConnectionKind, LoginKind};
use crate::events::{DecodeError, LoginEvent};

const PROVIDER: &str = "clerk";

/// Svix's branded header, then the unbranded (Standard Webhooks) one.
const ID_HEADERS: [&str; 2] = ["svix-id", "webhook-id"];

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    event_type: Option<&'a str>,
    /// Delivery time, epoch milliseconds.
    timestamp: Option<i64>,
    instance_id: Option<&'a str>,
    #[serde(borrow)]
    event_attributes: Option<EventAttributes<'a>>,
}

#[derive(Deserialize)]
struct EventAttributes<'a> {
    #[serde(borrow)]
    http_request: Option<HttpRequest<'a>>,
}

#[derive(Deserialize)]
struct HttpRequest<'a> {
    user_agent: Option<&'a str>,
}

/// `UserJSON`, the fields authsync reads.
#[derive(Deserialize)]
struct User<'a> {
    id: Option<&'a str>,
    primary_email_address_id: Option<&'a str>,
    #[serde(borrow)]
    email_addresses: Option<Vec<EmailAddress<'a>>>,
    first_name: Option<&'a str>,
    last_name: Option<&'a str>,
    username: Option<&'a str>,
    image_url: Option<&'a str>,
    external_id: Option<&'a str>,
    locale: Option<&'a str>,
    created_at: Option<i64>,
    updated_at: Option<i64>,
}

#[derive(Deserialize)]
struct EmailAddress<'a> {
    id: Option<&'a str>,
    email_address: Option<&'a str>,
    #[serde(borrow)]
    verification: Option<Verification<'a>>,
}

#[derive(Deserialize)]
struct Verification<'a> {
    status: Option<&'a str>,
    strategy: Option<&'a str>,
}

/// `SessionJSON`, the fields authsync reads.
#[derive(Deserialize)]
struct Session<'a> {
    user_id: Option<&'a str>,
    client_id: Option<&'a str>,
    last_active_organization_id: Option<&'a str>,
    created_at: Option<i64>,
}

pub(super) fn decode(
    payload: &Value,
    delivery: &Delivery<'_>,
) -> Result<Vec<LoginEvent>, DecodeError> {
    let envelope: Envelope<'_> = parse(payload, "Clerk event")?;
    let kind = match envelope.event_type {
        Some("user.created") => LoginKind::Signup,
        Some("user.updated") => LoginKind::ProfileUpdate,
        Some("session.created") => LoginKind::Login,
        Some(_) => return Ok(Vec::new()),
        None => return Err(missing("Clerk event type")),
    };
    let svix_id = delivery
        .id_from(&ID_HEADERS)
        .ok_or_else(|| missing("Clerk delivery header svix-id (or webhook-id)"))?;
    let data = payload
        .get("data")
        .filter(|d| d.is_object())
        .ok_or_else(|| missing("Clerk event data"))?;
    let source = delivery.source_or(match envelope.instance_id {
        Some(instance) => format!("clerk:{instance}"),
        None => PROVIDER.to_string(),
    });
    let user_agent = envelope
        .event_attributes
        .as_ref()
        .and_then(|a| a.http_request.as_ref())
        .and_then(|r| r.user_agent);
    // Ordering time: the object's own change time, else the delivery's.
    let fallback_time = |field: &str| match envelope.timestamp {
        Some(ms) => epoch_millis(ms, "Clerk event timestamp"),
        None => delivery.time_or_err(field),
    };
    let event_id = format!("{PROVIDER}:{svix_id}");

    let mut login = if kind == LoginKind::Login {
        let session: Session<'_> = parse(data, "Clerk session.created data")?;
        let subject = require(session.user_id, "Clerk session.created data.user_id")?;
        let occurred_at = match session.created_at {
            Some(ms) => epoch_millis(ms, "Clerk data.created_at")?,
            None => fallback_time("Clerk session.created")?,
        };
        let mut login = LoginEvent::new(event_id, source, occurred_at, PROVIDER, subject);
        // A Clerk client is one browser or device.
        login.device_id = owned(session.client_id);
        login.attributes =
            attributes(&[("clerk.organization_id", session.last_active_organization_id)]);
        login
    } else {
        let user: User<'_> = parse(data, "Clerk user data")?;
        let subject = require(user.id, "Clerk user data.id")?;
        let changed_at = if kind == LoginKind::Signup {
            user.created_at
        } else {
            user.updated_at
        };
        let occurred_at = match changed_at {
            Some(ms) => epoch_millis(ms, "Clerk data.updated_at / data.created_at")?,
            None => fallback_time("Clerk user event")?,
        };
        let mut login = LoginEvent::new(event_id, source, occurred_at, PROVIDER, subject);
        let primary = user.email_addresses.as_ref().and_then(|list| {
            list.iter()
                .find(|e| e.id.is_some() && e.id == user.primary_email_address_id)
        });
        if let Some(primary) = primary {
            login.email = owned(primary.email_address);
            let verification = primary.verification.as_ref();
            login.email_verified = Some(verification.and_then(|v| v.status) == Some("verified"));
            // How Clerk verified the address is the trust question: its own code or link,
            // a social provider, or a SAML / enterprise IdP (which Clerk trusts by default).
            login.connection = verification.and_then(|v| v.strategy).map(|strategy| {
                let kind = match strategy {
                    "email_code" | "email_link" | "phone_code" | "ticket" | "admin" => {
                        Some(ConnectionKind::Database)
                    }
                    s if s.starts_with("from_oauth_") || s.starts_with("oauth_") => {
                        Some(ConnectionKind::Social)
                    }
                    s if s.contains("saml") || s.contains("enterprise") => {
                        Some(ConnectionKind::Enterprise)
                    }
                    _ => None,
                };
                Connection {
                    connection_id: Some(strategy.to_string()),
                    kind,
                    groups: None,
                }
            });
        }
        login.given_name = owned(user.first_name);
        login.family_name = owned(user.last_name);
        login.display_name =
            full_name(user.first_name, user.last_name).or_else(|| owned(user.username));
        login.photo_url = owned(user.image_url);
        login.locale = owned(user.locale);
        login.attributes = attributes(&[
            ("clerk.username", user.username),
            ("clerk.external_id", user.external_id),
        ]);
        login
    };
    login.kind = kind;
    login.user_agent = owned(user_agent);
    login.validated().map(|l| vec![l])
}

#[cfg(test)]
mod tests {
    use super::super::tests::{decode_fixture, decode_with, headers_of};
    use super::*;
    use crate::events::ErrorClass;

    #[test]
    fn user_created_is_a_signup_with_the_primary_email_verified() {
        let events = decode_fixture(
            include_str!("../../../tests/fixtures/clerk/user-created.json"),
            &headers_of(include_str!(
                "../../../tests/fixtures/clerk/user-created.headers.json"
            )),
        )
        .unwrap();
        let e = &events[0];
        assert_eq!(e.event_id, "clerk:msg_2hVq8mZk3TfXb1YcR7pN0dLsQwE");
        assert_eq!(e.kind, LoginKind::Signup);
        assert_eq!(e.provider, "clerk");
        assert_eq!(e.subject, "user_2hVq7Xo9LrT1kQ3sWbN8eYcP4aD");
        assert_eq!(e.email.as_deref(), Some("lin.wei@example.com"));
        assert_eq!(e.email_verified, Some(true));
        assert_eq!(e.display_name.as_deref(), Some("Lin Wei"));
        assert_eq!(e.occurred_at.timestamp_millis(), 1_715_678_901_234);
        // Verified by Clerk's own email code.
        assert_eq!(
            e.connection.as_ref().and_then(|c| c.kind),
            Some(ConnectionKind::Database)
        );
    }

    #[test]
    fn user_updated_with_unverified_primary_is_a_profile_update() {
        let events = decode_fixture(
            include_str!("../../../tests/fixtures/clerk/user-updated.json"),
            &headers_of(include_str!(
                "../../../tests/fixtures/clerk/user-updated.headers.json"
            )),
        )
        .unwrap();
        let e = &events[0];
        assert_eq!(e.kind, LoginKind::ProfileUpdate);
        assert_eq!(e.event_id, "clerk:msg_2hWa1Bc4De7Fg0Hi3Jk6Lm9No2P");
        assert_eq!(e.email.as_deref(), Some("lin@wei-family.example"));
        assert_eq!(e.email_verified, Some(false), "primary is unverified");
    }

    #[test]
    fn session_created_is_a_login_with_only_the_user_id() {
        let events = decode_fixture(
            include_str!("../../../tests/fixtures/clerk/session-created.json"),
            &headers_of(include_str!(
                "../../../tests/fixtures/clerk/session-created.headers.json"
            )),
        )
        .unwrap();
        let e = &events[0];
        assert_eq!(e.kind, LoginKind::Login);
        assert_eq!(e.subject, "user_2hVq7Xo9LrT1kQ3sWbN8eYcP4aD");
        assert_eq!(e.email, None);
        assert_eq!(e.email_verified, None);
        assert_eq!(
            e.device_id.as_deref(),
            Some("client_2hVqAbCdEfGhIjKlMnOpQrStUvW")
        );
    }

    #[test]
    fn other_types_yield_nothing_and_a_missing_svix_id_is_an_error() {
        let none = decode_fixture(
            include_str!("../../../tests/fixtures/clerk/email-created.json"),
            &headers_of(include_str!(
                "../../../tests/fixtures/clerk/email-created.headers.json"
            )),
        )
        .unwrap();
        assert!(none.is_empty());
        let err = decode_with(
            include_bytes!("../../../tests/fixtures/clerk/user-created.json"),
            &[],
            None,
        )
        .unwrap_err();
        assert_eq!(err.class, ErrorClass::MissingField);
        assert!(err.reason.contains("svix-id"), "{}", err.reason);
        // The unbranded header works too.
        let events = decode_with(
            include_bytes!("../../../tests/fixtures/clerk/user-created.json"),
            &[("webhook-id", "msg_unbranded1")],
            None,
        )
        .unwrap();
        assert_eq!(events[0].event_id, "clerk:msg_unbranded1");
    }
}
