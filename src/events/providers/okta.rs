//! Okta event hooks: one delivery holds several System Log events; `user.session.start`
//! and `user.authentication.sso` with a successful outcome are logins, one per event.

use serde::Deserialize;
use serde_json::Value;

use super::{as_email, missing, owned, parse, require, rfc3339, Delivery};
use crate::events::{DecodeError, LoginEvent};

const PROVIDER: &str = "okta";

pub(super) const HOOK_EVENT_TYPE: &str = "com.okta.event_hook";

const LOGIN_TYPES: [&str; 2] = ["user.session.start", "user.authentication.sso"];

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Hook<'a> {
    source: Option<&'a str>,
    #[serde(borrow)]
    data: Option<HookData<'a>>,
}

#[derive(Deserialize)]
struct HookData<'a> {
    #[serde(borrow)]
    events: Option<Vec<LogEvent<'a>>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogEvent<'a> {
    uuid: Option<&'a str>,
    published: Option<&'a str>,
    event_type: Option<&'a str>,
    #[serde(borrow)]
    actor: Option<Actor<'a>>,
    #[serde(borrow)]
    outcome: Option<Outcome<'a>>,
    #[serde(borrow)]
    client: Option<Client<'a>>,
    #[serde(borrow)]
    target: Option<Vec<Target<'a>>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Actor<'a> {
    id: Option<&'a str>,
    alternate_id: Option<&'a str>,
    display_name: Option<&'a str>,
}

#[derive(Deserialize)]
struct Outcome<'a> {
    result: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Client<'a> {
    #[serde(borrow)]
    user_agent: Option<UserAgent<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UserAgent<'a> {
    raw_user_agent: Option<&'a str>,
}

#[derive(Deserialize)]
struct Target<'a> {
    id: Option<&'a str>,
    #[serde(rename = "type")]
    target_type: Option<&'a str>,
}

pub(super) fn decode(
    payload: &Value,
    delivery: &Delivery<'_>,
) -> Result<Vec<LoginEvent>, DecodeError> {
    let hook: Hook<'_> = parse(payload, "Okta event hook")?;
    let events = hook
        .data
        .and_then(|d| d.events)
        .ok_or_else(|| missing("Okta event hook data.events"))?;
    let source = delivery.source_or(hook.source.unwrap_or(PROVIDER));
    let mut logins = Vec::new();
    for event in &events {
        let Some(event_type) = event.event_type.filter(|t| LOGIN_TYPES.contains(t)) else {
            continue;
        };
        // A failed or challenged sign-in is logged with the same type.
        let result = event.outcome.as_ref().and_then(|o| o.result);
        if result.is_some_and(|r| r != "SUCCESS") {
            continue;
        }
        let uuid = require(event.uuid, "Okta event uuid")?;
        let actor = event
            .actor
            .as_ref()
            .ok_or_else(|| missing("Okta event actor"))?;
        let subject = require(actor.id, "Okta event actor.id")?;
        let published = require(event.published, "Okta event published")?;
        let occurred_at = rfc3339(published, "Okta event published")?;
        let mut login = LoginEvent::new(
            format!("{PROVIDER}:{uuid}"),
            source.clone(),
            occurred_at,
            PROVIDER,
            subject,
        );
        // Okta sends no verification flag: email_verified stays unknown (never linked on).
        login.email = as_email(actor.alternate_id);
        login.display_name = owned(actor.display_name);
        login.user_agent = owned(
            event
                .client
                .as_ref()
                .and_then(|c| c.user_agent.as_ref())
                .and_then(|u| u.raw_user_agent),
        );
        if event_type == "user.authentication.sso" {
            // The app signed in to.
            login.audience = owned(
                event
                    .target
                    .iter()
                    .flatten()
                    .find(|t| t.target_type == Some("AppInstance"))
                    .and_then(|t| t.id),
            );
        }
        logins.push(login.validated()?);
    }
    Ok(logins)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{decode_fixture, decode_with};
    use crate::events::ErrorClass;

    #[test]
    fn a_delivery_yields_one_login_per_successful_login_event() {
        let events = decode_fixture(
            include_str!("../../../tests/fixtures/okta/event-hook-logins.json"),
            &[],
        )
        .unwrap();
        let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "okta:9f5c3a1e-2b7d-11ef-8e4a-5b1c2d3e4f60",
                "okta:a4d2e8b0-2b7d-11ef-9c1f-07e6d5c4b3a2"
            ],
            "the failed sign-in and the non-login event yield nothing"
        );
        let e = &events[0];
        assert_eq!(e.provider, "okta");
        assert_eq!(e.subject, "00u8k2m4n6p8r0t2v4x6");
        assert_eq!(e.email.as_deref(), Some("maria.garcia@example.com"));
        assert_eq!(e.email_verified, None);
        assert_eq!(events[1].subject, "00u1a3c5e7g9i1k3m5o7");
        assert_eq!(events[1].audience.as_deref(), Some("0oa5x7z9b1d3f5h7j9l1"));
        assert_eq!(events[1].email, None, "alternateId is not an email");
    }

    #[test]
    fn a_delivery_without_logins_yields_nothing() {
        let none = decode_fixture(
            include_str!("../../../tests/fixtures/okta/event-hook-no-login.json"),
            &[],
        )
        .unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn a_login_without_actor_id_names_the_field() {
        let err = decode_with(
            br#"{"eventType":"com.okta.event_hook","eventId":"e","data":{"events":[
                {"uuid":"u1","published":"2024-06-01T10:00:00.000Z","eventType":"user.session.start",
                 "actor":{"type":"User","alternateId":"x@example.com"},"outcome":{"result":"SUCCESS"}}]}}"#,
            &[],
            None,
        )
        .unwrap_err();
        assert_eq!(err.class, ErrorClass::MissingField);
        assert_eq!(err.reason, "Okta event actor.id is missing");
    }
}
