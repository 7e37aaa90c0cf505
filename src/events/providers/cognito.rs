//! Amazon Cognito user-pool Lambda triggers, as the trigger function forwards its event:
//! `PostConfirmation_ConfirmSignUp` (signup) and `PostAuthentication_Authentication`
//! (login). The event has neither an id nor a time.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

use super::{attributes, derived_id, invalid, missing, owned, parse, require, Delivery, Provider};
use crate::events::login::{Connection, ConnectionKind, LoginKind};
use crate::events::{DecodeError, LoginEvent};

const PROVIDER: &str = "cognito";

/// Headers a forwarding Lambda may set to its request id (`context.awsRequestId`).
const REQUEST_ID_HEADERS: [&str; 3] = ["lambda-request-id", "x-amzn-requestid", "x-amz-request-id"];

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Trigger<'a> {
    trigger_source: Option<&'a str>,
    user_pool_id: Option<&'a str>,
    #[serde(borrow)]
    caller_context: Option<CallerContext<'a>>,
    #[serde(borrow)]
    request: Option<Request<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CallerContext<'a> {
    client_id: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request<'a> {
    /// All values are strings, `email_verified` included ("true" / "false").
    #[serde(borrow)]
    user_attributes: Option<HashMap<&'a str, &'a str>>,
}

pub(super) fn decode(
    payload: &Value,
    delivery: &Delivery<'_>,
) -> Result<Vec<LoginEvent>, DecodeError> {
    let t: Trigger<'_> = parse(payload, "Cognito trigger")?;
    let kind = match t.trigger_source {
        Some("PostConfirmation_ConfirmSignUp") => LoginKind::Signup,
        Some("PostAuthentication_Authentication") => LoginKind::Login,
        // PostConfirmation_ConfirmForgotPassword, PreSignUp_*, ...: not logins.
        Some(_) => return Ok(Vec::new()),
        None => return Err(missing("Cognito triggerSource")),
    };
    let attrs = t
        .request
        .and_then(|r| r.user_attributes)
        .ok_or_else(|| missing("Cognito request.userAttributes"))?;
    let attr = |key: &str| attrs.get(key).copied();
    let subject = require(attr("sub"), "Cognito request.userAttributes.sub")?;
    let email_verified = match attr("email_verified") {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => {
            return Err(invalid(
                "Cognito request.userAttributes.email_verified must be the string \"true\" or \"false\"",
            ))
        }
    };
    // No id in the event: the wrapping CloudEvent's, a request-id header, else derived.
    let event_id = match delivery.id_from(&REQUEST_ID_HEADERS) {
        Some(id) => format!("{PROVIDER}:{id}"),
        None => derived_id(Provider::Cognito, payload, delivery.message.timestamp),
    };
    let occurred_at = delivery.time_or_err("Cognito trigger")?;
    let pool = t.user_pool_id;
    let source = delivery.source_or(match pool {
        Some(pool) => format!("cognito:{pool}"),
        None => PROVIDER.to_string(),
    });
    let mut login = LoginEvent::new(event_id, source, occurred_at, PROVIDER, subject);
    login.kind = kind;
    login.email = owned(attr("email"));
    login.email_verified = email_verified;
    login.display_name = owned(attr("name"));
    login.given_name = owned(attr("given_name"));
    login.family_name = owned(attr("family_name"));
    login.photo_url = owned(attr("picture"));
    login.locale = owned(attr("locale"));
    login.audience = owned(t.caller_context.as_ref().and_then(|c| c.client_id));
    login.connection = cognito_connection(attr("cognito:user_status"), attr("identities"));
    login.attributes = attributes(&[("cognito.user_pool_id", pool)]);
    login.validated().map(|l| vec![l])
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FederatedIdentity<'a> {
    provider_name: Option<&'a str>,
    provider_type: Option<&'a str>,
}

/// A federated user (`EXTERNAL_PROVIDER`, or an `identities` attribute): its
/// `email_verified` is whatever attribute the pool's admin mapped, so the upstream kind
/// decides trust: SAML / OIDC are enterprise, the built-in social providers social.
fn cognito_connection(status: Option<&str>, identities: Option<&str>) -> Option<Connection> {
    let first = identities
        .and_then(|json| serde_json::from_str::<Vec<FederatedIdentity<'_>>>(json).ok())
        .and_then(|list| list.into_iter().next());
    if status != Some("EXTERNAL_PROVIDER") && identities.is_none() {
        return None;
    }
    let kind = first.as_ref().and_then(|i| match i.provider_type {
        Some("SAML") | Some("OIDC") => Some(ConnectionKind::Enterprise),
        Some("Google") | Some("Facebook") | Some("LoginWithAmazon") | Some("SignInWithApple") => {
            Some(ConnectionKind::Social)
        }
        _ => None,
    });
    Some(Connection {
        connection_id: first.and_then(|i| i.provider_name).map(str::to_string),
        kind,
        groups: None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{decode_fixture, decode_with, FIXED_TIMESTAMP};
    use super::*;
    use crate::events::ErrorClass;

    #[test]
    fn confirm_sign_up_is_a_signup_timed_by_kafka() {
        let events = decode_fixture(
            include_str!("../../../tests/fixtures/cognito/post-confirmation-sign-up.json"),
            &[],
        )
        .unwrap();
        let e = &events[0];
        assert_eq!(e.provider, "cognito");
        assert_eq!(e.kind, LoginKind::Signup);
        assert_eq!(e.subject, "3c7a9f12-4b6e-4d81-9f03-2a5b7c9d1e4f");
        assert_eq!(e.email.as_deref(), Some("chen.li@example.com"));
        assert_eq!(e.email_verified, Some(true));
        assert_eq!(e.occurred_at.timestamp_millis(), FIXED_TIMESTAMP);
        assert!(e.event_id.starts_with("cognito:derived:"));
        assert_eq!(e.audience.as_deref(), Some("4k7v2n9q1s3u5w7y9a1c3e5g7i"));
    }

    #[test]
    fn post_authentication_is_a_login_and_the_request_id_header_is_the_id() {
        let events = decode_fixture(
            include_str!("../../../tests/fixtures/cognito/post-authentication.json"),
            &[("lambda-request-id", "c6af9ac6-7b61-11e6-9a41-93e8deadbeef")],
        )
        .unwrap();
        assert_eq!(events[0].kind, LoginKind::Login);
        assert_eq!(
            events[0].event_id,
            "cognito:c6af9ac6-7b61-11e6-9a41-93e8deadbeef"
        );
        assert_eq!(events[0].email_verified, Some(false));
    }

    #[test]
    fn the_derived_id_is_stable_per_delivery_and_differs_per_time() {
        let body = include_bytes!("../../../tests/fixtures/cognito/post-authentication.json");
        let at = |ms| chrono::DateTime::from_timestamp_millis(ms);
        let a = decode_with(body, &[], at(1_000)).unwrap();
        let b = decode_with(body, &[], at(1_000)).unwrap();
        let c = decode_with(body, &[], at(2_000)).unwrap();
        assert_eq!(a[0].event_id, b[0].event_id);
        assert_ne!(a[0].event_id, c[0].event_id);
        // Key order does not matter: the body is canonicalized.
        let reordered: Value = serde_json::from_slice(body).unwrap();
        let mut map: Vec<(String, Value)> =
            reordered.as_object().unwrap().clone().into_iter().collect();
        map.reverse();
        let text = format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("{}:{v}", Value::String(k.clone())))
                .collect::<Vec<_>>()
                .join(",")
        );
        let d = decode_with(text.as_bytes(), &[], at(1_000)).unwrap();
        assert_eq!(a[0].event_id, d[0].event_id);
    }

    #[test]
    fn confirm_forgot_password_yields_nothing() {
        let none = decode_fixture(
            include_str!("../../../tests/fixtures/cognito/post-confirmation-forgot-password.json"),
            &[],
        )
        .unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn a_non_boolean_email_verified_string_is_invalid() {
        let err = decode_with(
            br#"{"version":"1","triggerSource":"PostAuthentication_Authentication","userPoolId":"eu-west-1_AbC123dEf",
                "userName":"u","callerContext":{"clientId":"c"},
                "request":{"userAttributes":{"sub":"s-1","email":"a@example.com","email_verified":"yes"}},"response":{}}"#,
            &[],
            chrono::DateTime::from_timestamp_millis(FIXED_TIMESTAMP),
        )
        .unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidField);
        assert!(err.reason.contains("email_verified"), "{}", err.reason);
    }

    #[test]
    fn no_time_anywhere_is_an_error() {
        let err = decode_with(
            include_bytes!("../../../tests/fixtures/cognito/post-authentication.json"),
            &[],
            None,
        )
        .unwrap_err();
        assert_eq!(err.class, ErrorClass::MissingField);
    }

    #[test]
    fn a_federated_user_reports_its_upstream_kind() {
        let saml = cognito_connection(
            Some("EXTERNAL_PROVIDER"),
            Some(r#"[{"userId":"x","providerName":"AcmeSAML","providerType":"SAML","issuer":null,"primary":true,"dateCreated":1}]"#),
        )
        .expect("federated");
        assert_eq!(saml.kind, Some(ConnectionKind::Enterprise));
        assert_eq!(saml.connection_id.as_deref(), Some("AcmeSAML"));
        let google = cognito_connection(
            None,
            Some(r#"[{"providerName":"Google","providerType":"Google"}]"#),
        )
        .expect("federated");
        assert_eq!(google.kind, Some(ConnectionKind::Social));
        // Federated but unreadable: unknown, which trust treats as enterprise.
        let unknown =
            cognito_connection(Some("EXTERNAL_PROVIDER"), Some("not json")).expect("federated");
        assert_eq!((unknown.kind, unknown.connection_id), (None, None));
        assert!(cognito_connection(Some("CONFIRMED"), None).is_none());
    }
}
