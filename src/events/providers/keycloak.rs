//! Keycloak user events (`org.keycloak.events.Event` as an event-listener SPI exports it):
//! `LOGIN`, `REGISTER`, `UPDATE_PROFILE`. Admin events have another shape and are ignored.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

use super::{
    as_email, attributes, derived_id, epoch_millis, missing, owned, parse, require, Delivery,
    Provider,
};
use crate::events::login::{Connection, LoginKind};
use crate::events::{DecodeError, LoginEvent};

const PROVIDER: &str = "keycloak";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Event<'a> {
    /// Present since Keycloak 22; older exports have none (a derived id is used).
    id: Option<&'a str>,
    /// Epoch milliseconds.
    time: Option<i64>,
    #[serde(rename = "type")]
    event_type: Option<&'a str>,
    realm_id: Option<&'a str>,
    client_id: Option<&'a str>,
    user_id: Option<&'a str>,
    session_id: Option<&'a str>,
    error: Option<&'a str>,
    #[serde(borrow)]
    details: Option<HashMap<&'a str, &'a str>>,
}

pub(super) fn decode(
    payload: &Value,
    delivery: &Delivery<'_>,
) -> Result<Vec<LoginEvent>, DecodeError> {
    let e: Event<'_> = parse(payload, "Keycloak event")?;
    let kind = match e.event_type {
        Some("LOGIN") => LoginKind::Login,
        Some("REGISTER") => LoginKind::Signup,
        Some("UPDATE_PROFILE") => LoginKind::ProfileUpdate,
        // LOGIN_ERROR, LOGOUT, CODE_TO_TOKEN, REFRESH_TOKEN, ...: not logins.
        Some(_) => return Ok(Vec::new()),
        None => return Err(missing("Keycloak event type")),
    };
    if e.error.is_some_and(|err| !err.is_empty()) {
        return Ok(Vec::new());
    }
    let subject = require(e.user_id, "Keycloak event userId")?;
    let time = e.time.ok_or_else(|| missing("Keycloak event time"))?;
    let occurred_at = epoch_millis(time, "Keycloak event time")?;
    let event_id = match (delivery.envelope.and_then(|ce| ce.id), e.id) {
        (Some(id), _) | (None, Some(id)) => format!("{PROVIDER}:{id}"),
        (None, None) => derived_id(Provider::Keycloak, payload, None),
    };
    let source = delivery.source_or(match e.realm_id {
        Some(realm) => format!("keycloak:{realm}"),
        None => PROVIDER.to_string(),
    });
    let details = e.details.unwrap_or_default();
    let detail = |key: &str| details.get(key).copied();
    let mut login = LoginEvent::new(event_id, source, occurred_at, PROVIDER, subject);
    login.kind = kind;
    // An UPDATE_PROFILE carries the new values as `updated_*`; a LOGIN only the username,
    // which is the email in realms that log in by email.
    login.email = as_email(
        detail("updated_email")
            .or(detail("email"))
            .or(detail("username")),
    );
    login.given_name = owned(detail("updated_first_name").or(detail("first_name")));
    login.family_name = owned(detail("updated_last_name").or(detail("last_name")));
    login.audience = owned(e.client_id);
    let broker = detail("identity_provider");
    // A brokered login: the alias names the upstream IdP, whose kind Keycloak does not
    // say (operators declare it in `[[identity.connections]]`).
    login.connection = broker.map(|alias| Connection {
        connection_id: Some(alias.to_string()),
        kind: None,
        groups: None,
    });
    login.attributes = attributes(&[
        ("keycloak.realm_id", e.realm_id),
        ("keycloak.username", detail("username")),
    ]);
    // A session id is per login, not per device: kept out of device_id on purpose.
    let _ = e.session_id;
    login.validated().map(|l| vec![l])
}

#[cfg(test)]
mod tests {
    use super::super::tests::{decode_fixture, decode_with};
    use super::*;

    #[test]
    fn login_register_and_update_profile() {
        let login = decode_fixture(
            include_str!("../../../tests/fixtures/keycloak/login.json"),
            &[],
        )
        .unwrap();
        let e = &login[0];
        assert_eq!(e.provider, "keycloak");
        assert_eq!(e.kind, LoginKind::Login);
        assert_eq!(e.subject, "7c9e6679-7425-40de-944b-e07fc1f90ae7");
        assert_eq!(e.event_id, "keycloak:3f2a1b4c-5d6e-4f70-8a9b-0c1d2e3f4a5b");
        assert_eq!(e.email.as_deref(), Some("jonas.berg@example.org"));
        assert_eq!(e.email_verified, None);
        assert_eq!(e.audience.as_deref(), Some("account-console"));
        assert_eq!(e.occurred_at.timestamp_millis(), 1_717_236_000_123);

        let register = decode_fixture(
            include_str!("../../../tests/fixtures/keycloak/register.json"),
            &[],
        )
        .unwrap();
        assert_eq!(register[0].kind, LoginKind::Signup);
        assert_eq!(
            register[0]
                .connection
                .as_ref()
                .and_then(|c| c.connection_id.as_deref()),
            Some("github")
        );

        let update = decode_fixture(
            include_str!("../../../tests/fixtures/keycloak/update-profile.json"),
            &[],
        )
        .unwrap();
        assert_eq!(update[0].kind, LoginKind::ProfileUpdate);
        assert_eq!(update[0].email.as_deref(), Some("jonas@berg.example"));
        assert_eq!(update[0].given_name.as_deref(), Some("Jonas"));
    }

    #[test]
    fn login_error_yields_nothing() {
        let none = decode_fixture(
            include_str!("../../../tests/fixtures/keycloak/login-error.json"),
            &[],
        )
        .unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn an_event_without_id_gets_a_stable_derived_one() {
        let body = br#"{"time":1717236000123,"type":"LOGIN","realmId":"r","userId":"u1"}"#;
        let a = decode_with(body, &[], None).unwrap();
        let b = decode_with(body, &[], None).unwrap();
        assert!(a[0].event_id.starts_with("keycloak:derived:"));
        assert_eq!(a[0].event_id, b[0].event_id);
    }
}
