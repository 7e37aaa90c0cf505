//! `auth.login` events: the auth-sync request's fields plus the identity key.

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::{decode_envelope, DecodeError, ErrorClass};

pub const LOGIN_EVENT_TYPE: &str = "auth.login";

/// Labels and names for a first login; each falls back to the configured default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProvisioningHints {
    pub organization_name: Option<String>,
    pub organization_display_name: Option<String>,
    pub organization_slug: Option<String>,
    pub project_name: Option<String>,
    pub project_display_name: Option<String>,
    pub project_slug: Option<String>,
    pub personal_collection_label: Option<String>,
    pub favorites_collection_label: Option<String>,
    pub organization_collection_label: Option<String>,
}

/// A validated login. `None` means "the event did not say": stored values are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginEvent {
    /// CloudEvents `id`: the de-duplication key.
    pub event_id: String,
    pub source: String,
    pub occurred_at: DateTime<Utc>,
    pub provider: String,
    pub subject: String,
    /// Lower-cased, trimmed.
    pub email: Option<String>,
    pub email_verified: Option<bool>,
    pub display_name: Option<String>,
    pub photo_url: Option<String>,
    pub locale: Option<String>,
    pub device_id: Option<String>,
    pub user_agent: Option<String>,
    pub workflow_variants: Option<Vec<String>>,
    pub given_name: Option<String>,
    pub family_name: Option<String>,
    pub groups: Option<Vec<String>>,
    pub hints: ProvisioningHints,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoginData {
    provider: Option<String>,
    subject: Option<String>,
    email: Option<String>,
    is_email_verified: Option<bool>,
    display_name: Option<String>,
    #[serde(rename = "photoURL")]
    photo_url: Option<String>,
    locale: Option<String>,
    #[serde(rename = "deviceID")]
    device_id: Option<String>,
    user_agent: Option<String>,
    workflow_variants: Option<Vec<String>>,
    given_name: Option<String>,
    family_name: Option<String>,
    groups: Option<Vec<String>>,
    default_organization_name: Option<String>,
    default_organization_display_name: Option<String>,
    default_organization_slug: Option<String>,
    default_project_name: Option<String>,
    default_project_display_name: Option<String>,
    default_project_slug: Option<String>,
    default_personal_collection_label: Option<String>,
    default_favorites_collection_label: Option<String>,
    default_organization_collection_label: Option<String>,
}

/// Size limits at the edge, so a hostile payload cannot bloat rows or tokens.
const MAX_KEY: usize = 255;
const MAX_TEXT: usize = 512;
const MAX_URL: usize = 2048;
const MAX_EMAIL: usize = 320;
const MAX_LIST: usize = 500;

fn check_len(field: &str, value: &Option<String>, max: usize) -> Result<(), DecodeError> {
    match value {
        Some(v) if v.len() > max => Err(DecodeError::new(
            ErrorClass::InvalidField,
            format!(
                "field `data.{field}` is {} bytes, the limit is {max}",
                v.len()
            ),
        )),
        _ => Ok(()),
    }
}

fn check_list(field: &str, value: &Option<Vec<String>>) -> Result<(), DecodeError> {
    if let Some(list) = value {
        if list.len() > MAX_LIST {
            return Err(DecodeError::new(
                ErrorClass::InvalidField,
                format!(
                    "field `data.{field}` has {} entries, the limit is {MAX_LIST}",
                    list.len()
                ),
            ));
        }
        if let Some(long) = list.iter().find(|s| s.len() > MAX_KEY) {
            return Err(DecodeError::new(
                ErrorClass::InvalidField,
                format!(
                    "an entry of `data.{field}` is {} bytes, the limit is {MAX_KEY}",
                    long.len()
                ),
            ));
        }
    }
    Ok(())
}

/// Identity keys are trimmed: ` auth0` and `auth0` must not become two identities.
fn required(field: &str, value: Option<String>) -> Result<String, DecodeError> {
    match value {
        Some(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
        Some(_) => Err(DecodeError::new(
            ErrorClass::InvalidField,
            format!("field `data.{field}` is empty"),
        )),
        None => Err(DecodeError::new(
            ErrorClass::MissingField,
            format!("required field `data.{field}` is missing"),
        )),
    }
}

/// Empty strings mean "not provided" (the reference API's convention for optional fields).
fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

fn normalize_list(list: Option<Vec<String>>) -> Option<Vec<String>> {
    list.map(|mut l| {
        l.retain(|s| !s.trim().is_empty());
        l.sort();
        l.dedup();
        l
    })
}

impl LoginEvent {
    /// Decodes a Kafka message value into a login event, or says precisely why it cannot be.
    pub fn decode(value: Option<&[u8]>, max_bytes: usize) -> Result<Self, DecodeError> {
        let envelope = decode_envelope(value, max_bytes, LOGIN_EVENT_TYPE)?;
        let mut de = serde_json::Deserializer::from_str(envelope.data.get());
        let data: LoginData = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." {
                DecodeError::new(
                    ErrorClass::InvalidField,
                    format!("CloudEvent `data` must be an object: {inner}"),
                )
            } else {
                DecodeError::new(
                    ErrorClass::InvalidField,
                    format!("field `data.{path}`: {inner}"),
                )
            }
        })?;
        let provider = required("provider", data.provider)?;
        let subject = required("subject", data.subject)?;
        check_len("provider", &Some(provider.clone()), MAX_KEY)?;
        check_len("subject", &Some(subject.clone()), MAX_KEY)?;
        check_len("email", &data.email, MAX_EMAIL)?;
        check_len("photoURL", &data.photo_url, MAX_URL)?;
        check_len("userAgent", &data.user_agent, MAX_URL)?;
        for (field, value) in [
            ("displayName", &data.display_name),
            ("locale", &data.locale),
            ("deviceID", &data.device_id),
            ("givenName", &data.given_name),
            ("familyName", &data.family_name),
            ("defaultOrganizationName", &data.default_organization_name),
            (
                "defaultOrganizationDisplayName",
                &data.default_organization_display_name,
            ),
            ("defaultOrganizationSlug", &data.default_organization_slug),
            ("defaultProjectName", &data.default_project_name),
            (
                "defaultProjectDisplayName",
                &data.default_project_display_name,
            ),
            ("defaultProjectSlug", &data.default_project_slug),
            (
                "defaultPersonalCollectionLabel",
                &data.default_personal_collection_label,
            ),
            (
                "defaultFavoritesCollectionLabel",
                &data.default_favorites_collection_label,
            ),
            (
                "defaultOrganizationCollectionLabel",
                &data.default_organization_collection_label,
            ),
        ] {
            check_len(field, value, MAX_TEXT)?;
        }
        check_list("groups", &data.groups)?;
        check_list("workflowVariants", &data.workflow_variants)?;
        let email = non_empty(data.email).map(|e| e.trim().to_lowercase());
        if let Some(e) = &email {
            let valid = e
                .split_once('@')
                .is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty())
                && !e.contains(char::is_whitespace);
            if !valid {
                return Err(DecodeError::new(
                    ErrorClass::InvalidField,
                    "field `data.email` is not an email address",
                ));
            }
        }
        Ok(LoginEvent {
            event_id: envelope.id,
            source: envelope.source,
            occurred_at: envelope.time,
            provider,
            subject,
            email,
            email_verified: data.is_email_verified,
            display_name: non_empty(data.display_name),
            photo_url: non_empty(data.photo_url),
            locale: non_empty(data.locale),
            device_id: non_empty(data.device_id),
            user_agent: non_empty(data.user_agent),
            workflow_variants: normalize_list(data.workflow_variants),
            given_name: non_empty(data.given_name),
            family_name: non_empty(data.family_name),
            groups: normalize_list(data.groups),
            hints: ProvisioningHints {
                organization_name: non_empty(data.default_organization_name),
                organization_display_name: non_empty(data.default_organization_display_name),
                organization_slug: non_empty(data.default_organization_slug),
                project_name: non_empty(data.default_project_name),
                project_display_name: non_empty(data.default_project_display_name),
                project_slug: non_empty(data.default_project_slug),
                personal_collection_label: non_empty(data.default_personal_collection_label),
                favorites_collection_label: non_empty(data.default_favorites_collection_label),
                organization_collection_label: non_empty(
                    data.default_organization_collection_label,
                ),
            },
        })
    }

    /// The Kafka key producers should use: all events of one identity land in one partition.
    pub fn partition_key(&self) -> String {
        format!("{}:{}", self.provider, self.subject)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(data: &str) -> String {
        format!(
            r#"{{"specversion":"1.0","id":"evt-1","source":"idp","type":"auth.login","time":"2026-03-01T10:00:00Z","data":{data}}}"#
        )
    }

    fn decode(data: &str) -> Result<LoginEvent, DecodeError> {
        LoginEvent::decode(Some(event(data).as_bytes()), 1 << 20)
    }

    #[test]
    fn decodes_the_auth_sync_fields_and_ignores_unknown_ones() {
        let ev = decode(
            r#"{"provider":"auth0","subject":"auth0|1","email":" Ada@Example.COM ","isEmailVerified":true,
                "displayName":"Ada","photoURL":"https://p/a.png","locale":"en-GB","deviceID":"d1",
                "userAgent":"UA","workflowVariants":["b","a","a"],"givenName":"Ada","familyName":"L",
                "groups":["eng","admins",""],"defaultPersonalCollectionLabel":"Mine","somethingNew":1}"#,
        )
        .unwrap();
        assert_eq!(ev.provider, "auth0");
        assert_eq!(ev.email.as_deref(), Some("ada@example.com"));
        assert_eq!(ev.email_verified, Some(true));
        assert_eq!(ev.workflow_variants, Some(vec!["a".into(), "b".into()]));
        assert_eq!(ev.groups, Some(vec!["admins".into(), "eng".into()]));
        assert_eq!(ev.hints.personal_collection_label.as_deref(), Some("Mine"));
        assert_eq!(ev.partition_key(), "auth0:auth0|1");
    }

    #[test]
    fn missing_identity_is_a_missing_field() {
        let err = decode(r#"{"subject":"s"}"#).unwrap_err();
        assert_eq!(err.class, ErrorClass::MissingField);
        assert!(err.reason.contains("data.provider"), "{}", err.reason);
        let err = decode(r#"{"provider":"p"}"#).unwrap_err();
        assert_eq!(err.class, ErrorClass::MissingField);
        assert!(err.reason.contains("data.subject"), "{}", err.reason);
    }

    #[test]
    fn mistyped_fields_name_their_path() {
        let err = decode(r#"{"provider":"p","subject":"s","isEmailVerified":"yes"}"#).unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidField);
        assert!(
            err.reason.contains("data.isEmailVerified"),
            "{}",
            err.reason
        );
        let err = decode(r#"{"provider":"p","subject":"s","groups":[1]}"#).unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidField);
        assert!(err.reason.contains("data.groups"), "{}", err.reason);
        let err = decode(r#"[]"#).unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidField);
    }

    #[test]
    fn oversized_and_malformed_values_are_rejected() {
        let long = "x".repeat(600);
        let err = decode(&format!(
            r#"{{"provider":"p","subject":"s","displayName":"{long}"}}"#
        ))
        .unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidField);
        let err = decode(r#"{"provider":"p","subject":"s","email":"not-an-email"}"#).unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidField);
        let err = decode(r#"{"provider":" ","subject":"s"}"#).unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidField);
    }
}
