//! WorkOS events (`{id, event, data, created_at}`, from the events API or a webhook):
//! successful first-factor authentications are logins, `user.created` / `user.updated`
//! signups and profile updates.

use serde::Deserialize;
use serde_json::Value;

use super::{attributes, full_name, missing, owned, parse, require, rfc3339, Delivery};
use crate::events::login::{Connection, ConnectionKind, LoginKind};
use crate::events::{DecodeError, LoginEvent};

const PROVIDER: &str = "workos";

/// `authentication.<method>_succeeded` events that complete a sign-in. Email verification
/// and MFA succeed inside a sign-in that already has its own event: not counted again.
const SIGN_IN_METHODS: [&str; 5] = ["sso", "password", "oauth", "magic_auth", "passkey"];

#[derive(Deserialize)]
struct Event<'a> {
    id: Option<&'a str>,
    event: Option<&'a str>,
    created_at: Option<&'a str>,
}

#[derive(Deserialize)]
struct Authentication<'a> {
    user_id: Option<&'a str>,
    email: Option<&'a str>,
    user_agent: Option<&'a str>,
    #[serde(borrow)]
    sso: Option<Sso<'a>>,
}

#[derive(Deserialize)]
struct Sso<'a> {
    organization_id: Option<&'a str>,
    connection_id: Option<&'a str>,
}

#[derive(Deserialize)]
struct User<'a> {
    id: Option<&'a str>,
    email: Option<&'a str>,
    email_verified: Option<bool>,
    first_name: Option<&'a str>,
    last_name: Option<&'a str>,
    profile_picture_url: Option<&'a str>,
    external_id: Option<&'a str>,
    updated_at: Option<&'a str>,
}

pub(super) fn decode(
    payload: &Value,
    delivery: &Delivery<'_>,
) -> Result<Vec<LoginEvent>, DecodeError> {
    let e: Event<'_> = parse(payload, "WorkOS event")?;
    let name = require(e.event, "WorkOS event")?;
    let kind = match name {
        "user.created" => LoginKind::Signup,
        "user.updated" => LoginKind::ProfileUpdate,
        _ if name
            .strip_prefix("authentication.")
            .and_then(|rest| rest.strip_suffix("_succeeded"))
            .is_some_and(|method| SIGN_IN_METHODS.contains(&method)) =>
        {
            LoginKind::Login
        }
        _ => return Ok(Vec::new()),
    };
    let id = require(e.id, "WorkOS event id")?;
    let created_at = require(e.created_at, "WorkOS event created_at")?;
    let created_at = rfc3339(created_at, "WorkOS event created_at")?;
    let data = payload
        .get("data")
        .filter(|d| d.is_object())
        .ok_or_else(|| missing("WorkOS event data"))?;
    let event_id = format!("{PROVIDER}:{id}");
    let source = delivery.source_or(PROVIDER);
    let login = if kind == LoginKind::Login {
        let auth: Authentication<'_> = parse(data, "WorkOS authentication data")?;
        let subject = require(auth.user_id, "WorkOS data.user_id")?;
        let mut login = LoginEvent::new(event_id, source, created_at, PROVIDER, subject);
        // Authentication events carry the email but say nothing of its verification.
        login.email = owned(auth.email);
        login.user_agent = owned(auth.user_agent);
        let sso = auth.sso.as_ref();
        // The method is in the event name: `authentication.<method>_succeeded`.
        let method = name
            .strip_prefix("authentication.")
            .and_then(|rest| rest.strip_suffix("_succeeded"));
        login.connection = match method {
            Some("sso") => Some(Connection {
                connection_id: sso.and_then(|s| s.connection_id).map(str::to_string),
                kind: Some(ConnectionKind::Enterprise),
                groups: None,
            }),
            Some("oauth") => Some(Connection {
                connection_id: Some("oauth".into()),
                kind: Some(ConnectionKind::Social),
                groups: None,
            }),
            Some("magic_auth") => Some(Connection {
                connection_id: Some("magic_auth".into()),
                kind: Some(ConnectionKind::Passwordless),
                groups: None,
            }),
            _ => None,
        };
        login.attributes = attributes(&[(
            "workos.organization_id",
            sso.and_then(|s| s.organization_id),
        )]);
        login
    } else {
        let user: User<'_> = parse(data, "WorkOS user data")?;
        let subject = require(user.id, "WorkOS data.id")?;
        // Profile changes order by the user's own update time.
        let occurred_at = match user.updated_at {
            Some(t) => rfc3339(t, "WorkOS data.updated_at")?,
            None => created_at,
        };
        let mut login = LoginEvent::new(event_id, source, occurred_at, PROVIDER, subject);
        login.email = owned(user.email);
        login.email_verified = user.email_verified;
        login.given_name = owned(user.first_name);
        login.family_name = owned(user.last_name);
        login.display_name = full_name(user.first_name, user.last_name);
        login.photo_url = owned(user.profile_picture_url);
        login.attributes = attributes(&[("workos.external_id", user.external_id)]);
        login
    };
    let mut login = login;
    login.kind = kind;
    login.validated().map(|l| vec![l])
}

#[cfg(test)]
mod tests {
    use super::super::tests::decode_fixture;
    use super::*;

    #[test]
    fn sso_succeeded_is_a_login_through_the_connection() {
        let events = decode_fixture(
            include_str!("../../../tests/fixtures/workos/authentication-sso-succeeded.json"),
            &[],
        )
        .unwrap();
        let e = &events[0];
        assert_eq!(e.provider, "workos");
        assert_eq!(e.kind, LoginKind::Login);
        assert_eq!(e.event_id, "workos:event_01HY8Q2ZK6N4V9T3R7B5X1C0DM");
        assert_eq!(e.subject, "user_01HY8PZ3M5Q7S9U1W3Y5A7C9EF");
        assert_eq!(e.email.as_deref(), Some("omar.haddad@acme.example"));
        assert_eq!(e.email_verified, None);
        assert_eq!(
            e.connection
                .as_ref()
                .and_then(|c| c.connection_id.as_deref()),
            Some("conn_01HY8N1B3D5F7H9K1M3P5R7T9V")
        );
        assert_eq!(
            e.connection.as_ref().and_then(|c| c.kind),
            Some(ConnectionKind::Enterprise),
            "SSO is the customer's IdP"
        );
    }

    #[test]
    fn user_created_and_updated() {
        let created = decode_fixture(
            include_str!("../../../tests/fixtures/workos/user-created.json"),
            &[],
        )
        .unwrap();
        assert_eq!(created[0].kind, LoginKind::Signup);
        assert_eq!(created[0].email_verified, Some(true));
        assert_eq!(created[0].display_name.as_deref(), Some("Omar Haddad"));
        let updated = decode_fixture(
            include_str!("../../../tests/fixtures/workos/user-updated.json"),
            &[],
        )
        .unwrap();
        assert_eq!(updated[0].kind, LoginKind::ProfileUpdate);
        assert_eq!(updated[0].subject, "user_01HY8PZ3M5Q7S9U1W3Y5A7C9EF");
        assert_eq!(
            updated[0].photo_url.as_deref(),
            Some("https://workoscdn.com/images/v1/3k9L2m8N7b6V5c4X3z2")
        );
    }

    #[test]
    fn password_succeeded_is_a_login_and_a_failure_yields_nothing() {
        let events = decode_fixture(
            include_str!("../../../tests/fixtures/workos/authentication-password-succeeded.json"),
            &[],
        )
        .unwrap();
        assert_eq!(events[0].kind, LoginKind::Login);
        let none = decode_fixture(
            include_str!("../../../tests/fixtures/workos/authentication-password-failed.json"),
            &[],
        )
        .unwrap();
        assert!(none.is_empty());
    }
}
