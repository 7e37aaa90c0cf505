//! Auth0: the post-login Action's `event` object (published by an Action), and Log Streams
//! records (`s` login, `ss` signup; every other log type is not a login).

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use super::{
    as_email, attributes, derived_id, missing, owned, parse, require, rfc3339, Delivery, Provider,
};
use crate::events::login::{Connection, ConnectionKind, LoginKind};
use crate::events::{DecodeError, LoginEvent};

const PROVIDER: &str = "auth0";

/// The post-login trigger also runs when a refresh token is exchanged: that is not a login.
const REFRESH_PROTOCOL: &str = "oauth2-refresh-token";

pub(super) fn decode(
    payload: &Value,
    delivery: &Delivery<'_>,
) -> Result<Vec<LoginEvent>, DecodeError> {
    if payload.is_array() || payload.get("log_id").is_some() {
        return log_records(payload, delivery);
    }
    // An Action may publish `event` itself or `{"event": event}`.
    let event = match payload.get("event") {
        Some(inner) if inner.get("user").is_some() => inner,
        _ => payload,
    };
    post_login(event, delivery).map(|e| vec![e])
}

// ------------------------------------------------------------------ post-login Action

#[derive(Deserialize)]
struct PostLogin<'a> {
    #[serde(borrow)]
    user: Option<User<'a>>,
    #[serde(borrow)]
    transaction: Option<Transaction<'a>>,
    #[serde(borrow)]
    authorization: Option<Authorization<'a>>,
    #[serde(borrow)]
    organization: Option<Organization<'a>>,
    #[serde(borrow)]
    request: Option<Request<'a>>,
    #[serde(borrow)]
    client: Option<Client<'a>>,
    #[serde(borrow)]
    connection: Option<ConnectionInfo<'a>>,
    #[serde(borrow)]
    tenant: Option<Tenant<'a>>,
    #[serde(borrow)]
    authentication: Option<Authentication<'a>>,
    stats: Option<Stats>,
}

#[derive(Deserialize)]
struct User<'a> {
    user_id: Option<&'a str>,
    email: Option<&'a str>,
    email_verified: Option<bool>,
    name: Option<&'a str>,
    given_name: Option<&'a str>,
    family_name: Option<&'a str>,
    picture: Option<&'a str>,
}

#[derive(Deserialize)]
struct Transaction<'a> {
    id: Option<&'a str>,
    protocol: Option<&'a str>,
    locale: Option<&'a str>,
}

#[derive(Deserialize)]
struct Authorization<'a> {
    #[serde(borrow)]
    roles: Option<Vec<&'a str>>,
}

#[derive(Deserialize)]
struct Organization<'a> {
    id: Option<&'a str>,
    name: Option<&'a str>,
    display_name: Option<&'a str>,
}

#[derive(Deserialize)]
struct Request<'a> {
    user_agent: Option<&'a str>,
    language: Option<&'a str>,
}

#[derive(Deserialize)]
struct Client<'a> {
    client_id: Option<&'a str>,
}

#[derive(Deserialize)]
struct ConnectionInfo<'a> {
    id: Option<&'a str>,
    name: Option<&'a str>,
    strategy: Option<&'a str>,
}

#[derive(Deserialize)]
struct Tenant<'a> {
    id: Option<&'a str>,
}

#[derive(Deserialize)]
struct Authentication<'a> {
    #[serde(borrow)]
    methods: Option<Vec<Method<'a>>>,
}

#[derive(Deserialize)]
struct Method<'a> {
    timestamp: Option<&'a str>,
}

#[derive(Deserialize)]
struct Stats {
    logins_count: Option<u64>,
}

fn post_login(event: &Value, delivery: &Delivery<'_>) -> Result<LoginEvent, DecodeError> {
    let e: PostLogin<'_> = parse(event, "Auth0 post-login event")?;
    let user = e
        .user
        .as_ref()
        .ok_or_else(|| missing("Auth0 post-login event.user"))?;
    let subject = require(user.user_id, "Auth0 post-login event.user.user_id")?;
    let transaction = e.transaction.as_ref();
    let refresh = transaction.and_then(|t| t.protocol) == Some(REFRESH_PROTOCOL);
    let kind = if refresh {
        // Claims are recomputed (roles may have changed), but nobody logged in.
        LoginKind::ProfileUpdate
    } else if e.stats.as_ref().and_then(|s| s.logins_count) == Some(1) {
        LoginKind::Signup
    } else {
        LoginKind::Login
    };
    // The hook has no event id: the transaction id, else a hash of the delivery.
    let event_id = match (
        delivery.envelope.and_then(|ce| ce.id),
        transaction.and_then(|t| t.id),
    ) {
        (Some(ce_id), _) => format!("{PROVIDER}:{ce_id}"),
        (None, Some(txn)) if !refresh => format!("{PROVIDER}:txn:{txn}"),
        _ => derived_id(Provider::Auth0, event, delivery.message.timestamp),
    };
    // Neither has a time: the delivery's, else the last completed authentication method.
    let occurred_at = match delivery.time_or_err("Auth0 post-login event") {
        Ok(t) => t,
        Err(err) => latest_method_time(e.authentication.as_ref())?.ok_or(err)?,
    };
    let tenant = e.tenant.as_ref().and_then(|t| t.id);
    let source = delivery.source_or(match tenant {
        Some(t) => format!("auth0:{t}"),
        None => PROVIDER.to_string(),
    });
    let mut login = LoginEvent::new(event_id, source, occurred_at, PROVIDER, subject);
    login.kind = kind;
    login.email = owned(user.email);
    login.email_verified = user.email_verified;
    login.display_name = owned(user.name);
    login.given_name = owned(user.given_name);
    login.family_name = owned(user.family_name);
    login.photo_url = owned(user.picture);
    login.locale = owned(
        transaction
            .and_then(|t| t.locale)
            .or(e.request.as_ref().and_then(|r| r.language)),
    );
    login.user_agent = owned(e.request.as_ref().and_then(|r| r.user_agent));
    login.audience = owned(e.client.as_ref().and_then(|c| c.client_id));
    login.groups = e
        .authorization
        .as_ref()
        .and_then(|a| a.roles.as_ref())
        .map(|roles| roles.iter().map(|r| r.to_string()).collect());
    let org = e.organization.as_ref();
    let conn = e.connection.as_ref();
    // Auth0 relays an enterprise IdP's `email_verified` as is: the kind decides trust.
    login.connection = conn
        .filter(|c| c.id.is_some() || c.strategy.is_some())
        .map(|c| Connection {
            connection_id: owned(c.id),
            kind: c.strategy.and_then(super::auth0_strategy_kind),
            groups: None,
        });
    login.attributes = attributes(&[
        ("auth0.organization_id", org.and_then(|o| o.id)),
        ("auth0.organization_name", org.and_then(|o| o.name)),
        ("auth0.connection", conn.and_then(|c| c.name)),
        ("auth0.strategy", conn.and_then(|c| c.strategy)),
    ]);
    login.hints.organization_name = owned(org.and_then(|o| o.name));
    login.hints.organization_display_name = owned(org.and_then(|o| o.display_name));
    login.validated()
}

fn latest_method_time(
    authentication: Option<&Authentication<'_>>,
) -> Result<Option<DateTime<Utc>>, DecodeError> {
    let mut latest = None;
    for method in authentication
        .and_then(|a| a.methods.as_ref())
        .into_iter()
        .flatten()
    {
        if let Some(ts) = method.timestamp {
            let t = rfc3339(
                ts,
                "Auth0 post-login event.authentication.methods[].timestamp",
            )?;
            latest = latest.max(Some(t));
        }
    }
    Ok(latest)
}

// ------------------------------------------------------------------ Log Streams

#[derive(Deserialize)]
struct LogRecord<'a> {
    log_id: Option<&'a str>,
    date: Option<&'a str>,
    #[serde(rename = "type")]
    log_type: Option<&'a str>,
    user_id: Option<&'a str>,
    user_name: Option<&'a str>,
    client_id: Option<&'a str>,
    connection: Option<&'a str>,
    connection_id: Option<&'a str>,
    strategy: Option<&'a str>,
    strategy_type: Option<&'a str>,
    user_agent: Option<&'a str>,
    organization_id: Option<&'a str>,
    organization_name: Option<&'a str>,
    hostname: Option<&'a str>,
}

/// One record, an array of records (a batch), or the stream's `{"log_id", "data"}` wrapper.
fn log_records(payload: &Value, delivery: &Delivery<'_>) -> Result<Vec<LoginEvent>, DecodeError> {
    let items: &[Value] = match payload.as_array() {
        Some(list) => list,
        None => std::slice::from_ref(payload),
    };
    let mut seen = HashSet::new();
    let mut logins = Vec::new();
    for (i, item) in items.iter().enumerate() {
        // The wrapper's `log_id` is the record's; prefer the record's own when both exist.
        let (record, wrapper_id) = match item.get("data") {
            Some(data) if data.is_object() => (data, item.get("log_id").and_then(Value::as_str)),
            _ => (item, None),
        };
        let what = format!("Auth0 log record [{i}]");
        let r: LogRecord<'_> = parse(record, &what)?;
        let kind = match r.log_type {
            Some("s") => LoginKind::Login,
            Some("ss") => LoginKind::Signup,
            // Failed logins, silent auth, token exchanges, emails...: not logins.
            _ => continue,
        };
        let log_id = require(r.log_id.or(wrapper_id), &format!("{what} log_id"))?;
        // A stream retries whole batches: the same record may come twice.
        if !seen.insert(log_id) {
            continue;
        }
        let subject = require(r.user_id, &format!("{what} user_id"))?;
        let date = require(r.date, &format!("{what} date"))?;
        let occurred_at = rfc3339(date, &format!("{what} date"))?;
        let source = delivery.source_or(match r.hostname {
            Some(host) => format!("https://{host}/"),
            None => PROVIDER.to_string(),
        });
        let mut login = LoginEvent::new(
            format!("{PROVIDER}:log:{log_id}"),
            source,
            occurred_at,
            PROVIDER,
            subject,
        );
        login.kind = kind;
        // `user_name` is the login identifier: an email for database and most social
        // connections, a username or phone number otherwise. Logs say nothing of verification.
        login.email = as_email(r.user_name);
        login.user_agent = owned(r.user_agent);
        login.audience = owned(r.client_id);
        if r.connection_id.is_some() || r.strategy.is_some() {
            login.connection = Some(Connection {
                connection_id: owned(r.connection_id),
                kind: r
                    .strategy_type
                    .and_then(ConnectionKind::parse)
                    .or_else(|| r.strategy.and_then(super::auth0_strategy_kind)),
                groups: None,
            });
        }
        login.attributes = attributes(&[
            ("auth0.organization_id", r.organization_id),
            ("auth0.organization_name", r.organization_name),
            ("auth0.connection", r.connection),
            ("auth0.strategy", r.strategy),
        ]);
        logins.push(login.validated()?);
    }
    Ok(logins)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{decode_fixture, decode_with};
    use super::*;

    #[test]
    fn post_login_maps_user_roles_org_and_connection() {
        let events = decode_fixture(
            include_str!("../../../tests/fixtures/auth0/post-login.json"),
            &[],
        )
        .unwrap();
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!(e.provider, "auth0");
        assert_eq!(e.subject, "auth0|65f1c0a2b3d4e5f60718293a");
        assert_eq!(e.event_id, "auth0:txn:f0cJbZ5Qk3uVv1hXWmS9rT2yL8nA4pDe");
        assert_eq!(e.kind, LoginKind::Login);
        assert_eq!(e.email.as_deref(), Some("grace.hopper@example.com"));
        assert_eq!(e.email_verified, Some(true));
        assert_eq!(e.given_name.as_deref(), Some("Grace"));
        assert_eq!(
            e.groups,
            Some(vec!["admin".to_string(), "editor".to_string()])
        );
        assert_eq!(
            e.audience.as_deref(),
            Some("x7QbYv2M9kLpT4rW1nZs8CdFgH3jK6eA")
        );
        // Strategy `auth0`: the tenant's own database connection; no groups given.
        let c = e.connection.as_ref();
        assert_eq!(c.and_then(|c| c.kind), Some(ConnectionKind::Database));
        assert_eq!(c.and_then(|c| c.groups.clone()), None);
        assert_eq!(
            e.connection
                .as_ref()
                .and_then(|c| c.connection_id.as_deref()),
            Some("con_Q2wErTyUiOp4AsDf")
        );
        let attrs = e.attributes.as_ref().unwrap();
        assert!(attrs.contains(&(
            "auth0.organization_id".into(),
            "org_W3xYz9AbCdEf1234".into()
        )));
        assert_eq!(
            e.hints.organization_display_name.as_deref(),
            Some("Acme Navy Labs")
        );
        assert!(e
            .user_agent
            .as_deref()
            .unwrap_or_default()
            .contains("Mozilla"));
    }

    #[test]
    fn first_post_login_is_a_signup_and_refresh_exchange_a_profile_update() {
        let signup = decode_fixture(
            include_str!("../../../tests/fixtures/auth0/post-login-first.json"),
            &[],
        )
        .unwrap();
        assert_eq!(signup[0].kind, LoginKind::Signup);
        assert_eq!(signup[0].subject, "google-oauth2|108474839202117733905");
        assert_eq!(signup[0].email_verified, Some(true));

        let refresh = decode_fixture(
            include_str!("../../../tests/fixtures/auth0/post-login-refresh.json"),
            &[],
        )
        .unwrap();
        assert_eq!(refresh[0].kind, LoginKind::ProfileUpdate);
        assert!(refresh[0].event_id.starts_with("auth0:derived:"));
    }

    #[test]
    fn log_batch_keeps_logins_and_signups_once_and_skips_other_types() {
        let events = decode_fixture(
            include_str!("../../../tests/fixtures/auth0/log-stream-batch.json"),
            &[],
        )
        .unwrap();
        let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "auth0:log:90020240514091628516000000000000001234567890123456",
                "auth0:log:90020240514091702144000000000000001234567890123789"
            ],
            "`f` and `sv` yield nothing, the repeated record counts once"
        );
        assert_eq!(events[0].kind, LoginKind::Login);
        assert_eq!(events[0].subject, "auth0|6643e1c0f1a2b3c4d5e6f708");
        assert_eq!(events[0].email.as_deref(), Some("ada@example.com"));
        assert_eq!(events[0].email_verified, None);
        assert_eq!(events[1].kind, LoginKind::Signup);
        assert_eq!(events[1].subject, "auth0|6643e1f6a9b8c7d6e5f40312");
    }

    #[test]
    fn log_stream_wrapper_is_unwrapped_and_failed_login_yields_nothing() {
        let events = decode_fixture(
            include_str!("../../../tests/fixtures/auth0/log-stream-wrapped-success.json"),
            &[],
        )
        .unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].subject, "samlp|acme-okta|kate@acme.example");
        assert_eq!(events[0].email.as_deref(), Some("kate@acme.example"));
        let none = decode_fixture(
            include_str!("../../../tests/fixtures/auth0/log-failed-login.json"),
            &[],
        )
        .unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn post_login_without_user_id_names_the_field() {
        let err = decode_with(
            br#"{"user":{"email":"a@example.com"},"transaction":{"id":"t1"}}"#,
            &[],
            None,
        )
        .unwrap_err();
        assert_eq!(err.class, crate::events::ErrorClass::MissingField);
        assert!(err.reason.contains("event.user.user_id"), "{}", err.reason);
    }
}
