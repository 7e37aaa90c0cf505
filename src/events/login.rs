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

/// What the provider says happened. Only logins move the login bookkeeping
/// (`loginCount`, `lastLoginAt`); profile updates sync the profile alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LoginKind {
    #[default]
    Login,
    /// The provider reports a registration (it is still applied idempotently: a known
    /// identity is synced, not signed up twice).
    Signup,
    /// A profile change outside a login (Clerk `user.updated`, Keycloak `UPDATE_PROFILE`).
    ProfileUpdate,
}

impl LoginKind {
    pub fn counts_as_login(self) -> bool {
        !matches!(self, LoginKind::ProfileUpdate)
    }
}

/// What kind of sign-in a connection is. Link trust depends on it: a database, social or
/// passwordless connection is the provider's own check of the address; an enterprise
/// (SAML / OIDC / AD) connection relays whatever the customer's IdP asserts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConnectionKind {
    Database,
    Social,
    Enterprise,
    Passwordless,
}

impl ConnectionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionKind::Database => "database",
            ConnectionKind::Social => "social",
            ConnectionKind::Enterprise => "enterprise",
            ConnectionKind::Passwordless => "passwordless",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "database" => Some(ConnectionKind::Database),
            "social" => Some(ConnectionKind::Social),
            "enterprise" => Some(ConnectionKind::Enterprise),
            "passwordless" => Some(ConnectionKind::Passwordless),
            _ => None,
        }
    }
}

/// The connection the login came through, as in `$sync`, plus its kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Connection {
    pub connection_id: Option<String>,
    /// `None`: the producer did not say. A connection id without a kind is treated as
    /// enterprise wherever trust is decided (the safe reading).
    pub kind: Option<ConnectionKind>,
    /// Sorted, de-duplicated. `None`: the provider gave no groups (not "no groups"), so a
    /// `force` set revokes nothing on it.
    pub groups: Option<Vec<String>>,
}

/// A validated login. `None` means "the event did not say": stored values are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginEvent {
    /// The de-duplication key: the CloudEvents `id`, or the id a provider adapter chose.
    pub event_id: String,
    pub source: String,
    pub occurred_at: DateTime<Utc>,
    pub provider: String,
    pub subject: String,
    pub kind: LoginKind,
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
    /// Sorted, de-duplicated.
    pub groups: Option<Vec<String>>,
    /// `$sync` fields: the audience (client) the login is for.
    pub audience: Option<String>,
    /// Key/value attributes, sorted by key; for a repeated key the last value wins.
    pub attributes: Option<Vec<(String, String)>>,
    pub connection: Option<Connection>,
    /// `$sync` `clientUpnKey`: the client whose custom UPN this login sets.
    pub client_upn_key: Option<String>,
    /// The UPN value for `client_upn_key`; when absent the login's email (else subject) is used.
    pub custom_upn: Option<String>,
    pub hints: ProvisioningHints,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoginData {
    provider: Option<String>,
    subject: Option<String>,
    kind: Option<String>,
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
    audience: Option<String>,
    attributes: Option<Vec<AttributeData>>,
    connection: Option<ConnectionData>,
    client_upn_key: Option<String>,
    custom_upn_value: Option<String>,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttributeData {
    key: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConnectionData {
    groups: Option<Vec<String>>,
    connection_id: Option<String>,
    kind: Option<String>,
}

/// Size limits at the edge, so a hostile payload cannot bloat rows or tokens.
const MAX_KEY: usize = 255;
const MAX_TEXT: usize = 512;
const MAX_URL: usize = 2048;
const MAX_EMAIL: usize = 320;
const MAX_LIST: usize = 500;
const MAX_ATTRIBUTE_VALUE: usize = 2048;

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

fn check_list(field: &str, value: Option<&Vec<String>>) -> Result<(), DecodeError> {
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
        // NUL cannot be stored, and the identity key is part of other keys (clocks, locks).
        Some(v) if v.chars().any(char::is_control) => Err(DecodeError::new(
            ErrorClass::InvalidField,
            format!("field `data.{field}` holds a control character"),
        )),
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

/// The one form of an address that is compared, stored and linked on, or `None` when it is
/// not an address: trimmed, exactly one `@`, ASCII-only lower-casing of the local part
/// (Unicode case folding maps U+212A KELVIN SIGN to `k`: CVE-2019-19844), and the domain
/// through IDNA (UTS #46) to its lower-case ASCII form. A non-ASCII local part is kept as
/// given; such an address is never a link key ([`is_linkable_email`]).
pub fn normalize_email(raw: &str) -> Option<String> {
    let raw = raw.trim();
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    let (local, domain) = raw.split_once('@')?;
    if local.is_empty() || domain.is_empty() || domain.contains('@') || local.len() > 64 {
        return None;
    }
    let domain = idna::domain_to_ascii(domain).ok()?;
    if domain.is_empty() {
        return None;
    }
    let local = if local.is_ascii() {
        local.to_ascii_lowercase()
    } else {
        local.to_string()
    };
    Some(format!("{local}@{domain}"))
}

/// Only an all-ASCII normalized address links accounts: a non-ASCII local part has no
/// agreed case folding, so two spellings could reach one mailbox or two.
pub fn is_linkable_email(email: &str) -> bool {
    email.is_ascii()
}

impl LoginEvent {
    /// A login that says nothing beyond its identity; adapters fill in what they know and
    /// then call [`LoginEvent::validated`].
    pub fn new(
        event_id: impl Into<String>,
        source: impl Into<String>,
        occurred_at: DateTime<Utc>,
        provider: impl Into<String>,
        subject: impl Into<String>,
    ) -> Self {
        LoginEvent {
            event_id: event_id.into(),
            source: source.into(),
            occurred_at,
            provider: provider.into(),
            subject: subject.into(),
            kind: LoginKind::Login,
            email: None,
            email_verified: None,
            display_name: None,
            photo_url: None,
            locale: None,
            device_id: None,
            user_agent: None,
            workflow_variants: None,
            given_name: None,
            family_name: None,
            groups: None,
            audience: None,
            attributes: None,
            connection: None,
            client_upn_key: None,
            custom_upn: None,
            hints: ProvisioningHints::default(),
        }
    }

    /// The edge checks every login passes, whatever payload it came from: identity keys
    /// present and trimmed, sizes within limits, email well-formed and lower-cased, empty
    /// strings dropped, lists sorted and de-duplicated. Field names in errors are the
    /// normalized contract's (`data.<field>`).
    pub fn validated(mut self) -> Result<Self, DecodeError> {
        // Provider names are case-insensitive: `Okta` must not escape rules written for `okta`.
        self.provider =
            required("provider", Some(std::mem::take(&mut self.provider)))?.to_ascii_lowercase();
        self.subject = required("subject", Some(std::mem::take(&mut self.subject)))?;
        if self.event_id.is_empty() || self.event_id.len() > 256 {
            return Err(DecodeError::new(
                ErrorClass::InvalidField,
                "the event id must be 1 to 256 bytes",
            ));
        }
        check_len("provider", &Some(self.provider.clone()), MAX_KEY)?;
        check_len("subject", &Some(self.subject.clone()), MAX_KEY)?;
        check_len("email", &self.email, MAX_EMAIL)?;
        check_len("photoURL", &self.photo_url, MAX_URL)?;
        check_len("userAgent", &self.user_agent, MAX_URL)?;
        check_len("audience", &self.audience, MAX_KEY)?;
        check_len("clientUpnKey", &self.client_upn_key, MAX_KEY)?;
        check_len("customUpnValue", &self.custom_upn, MAX_EMAIL)?;
        let h = &self.hints;
        for (field, value) in [
            ("displayName", &self.display_name),
            ("locale", &self.locale),
            ("deviceID", &self.device_id),
            ("givenName", &self.given_name),
            ("familyName", &self.family_name),
            ("defaultOrganizationName", &h.organization_name),
            (
                "defaultOrganizationDisplayName",
                &h.organization_display_name,
            ),
            ("defaultOrganizationSlug", &h.organization_slug),
            ("defaultProjectName", &h.project_name),
            ("defaultProjectDisplayName", &h.project_display_name),
            ("defaultProjectSlug", &h.project_slug),
            (
                "defaultPersonalCollectionLabel",
                &h.personal_collection_label,
            ),
            (
                "defaultFavoritesCollectionLabel",
                &h.favorites_collection_label,
            ),
            (
                "defaultOrganizationCollectionLabel",
                &h.organization_collection_label,
            ),
        ] {
            check_len(field, value, MAX_TEXT)?;
        }
        check_list("groups", self.groups.as_ref())?;
        check_list("workflowVariants", self.workflow_variants.as_ref())?;
        if let Some(c) = &self.connection {
            check_list("connection.groups", c.groups.as_ref())?;
            check_len("connection.connectionId", &c.connection_id, MAX_KEY)?;
        }
        if let Some(attributes) = &self.attributes {
            if attributes.len() > MAX_LIST {
                return Err(DecodeError::new(
                    ErrorClass::InvalidField,
                    format!(
                        "field `data.attributes` has {} entries, the limit is {MAX_LIST}",
                        attributes.len()
                    ),
                ));
            }
            for (key, value) in attributes {
                if key.trim().is_empty() || key.len() > MAX_KEY {
                    return Err(DecodeError::new(
                        ErrorClass::InvalidField,
                        format!("an attribute key of `data.attributes` is empty or over {MAX_KEY} bytes"),
                    ));
                }
                if value.len() > MAX_ATTRIBUTE_VALUE {
                    return Err(DecodeError::new(
                        ErrorClass::InvalidField,
                        format!(
                            "attribute `{key}` of `data.attributes` is {} bytes, the limit is {MAX_ATTRIBUTE_VALUE}",
                            value.len()
                        ),
                    ));
                }
            }
        }
        self.email = match non_empty(self.email.take()) {
            Some(raw) => Some(normalize_email(&raw).ok_or_else(|| {
                DecodeError::new(
                    ErrorClass::InvalidField,
                    "field `data.email` is not an email address (one `@`, a local part, a valid domain)",
                )
            })?),
            None => None,
        };
        self.display_name = non_empty(self.display_name);
        self.photo_url = non_empty(self.photo_url);
        self.locale = non_empty(self.locale);
        self.device_id = non_empty(self.device_id);
        self.user_agent = non_empty(self.user_agent);
        self.given_name = non_empty(self.given_name);
        self.family_name = non_empty(self.family_name);
        self.audience = non_empty(self.audience);
        self.client_upn_key = non_empty(self.client_upn_key).map(|k| k.trim().to_string());
        self.custom_upn = non_empty(self.custom_upn).map(|k| k.trim().to_string());
        self.workflow_variants = normalize_list(self.workflow_variants);
        self.groups = normalize_list(self.groups);
        if let Some(c) = &mut self.connection {
            c.connection_id = non_empty(c.connection_id.take());
            c.groups = normalize_list(c.groups.take());
        }
        if let Some(attributes) = &mut self.attributes {
            for (key, _) in attributes.iter_mut() {
                *key = key.trim().to_string();
            }
            // Last value wins for a repeated key: stable sort keeps input order per key.
            attributes.sort_by(|a, b| a.0.cmp(&b.0));
            let mut deduped: Vec<(String, String)> = Vec::with_capacity(attributes.len());
            for (key, value) in attributes.drain(..) {
                match deduped.last_mut() {
                    Some(last) if last.0 == key => last.1 = value,
                    _ => deduped.push((key, value)),
                }
            }
            *attributes = deduped;
        }
        let hints = &mut self.hints;
        for hint in [
            &mut hints.organization_name,
            &mut hints.organization_display_name,
            &mut hints.organization_slug,
            &mut hints.project_name,
            &mut hints.project_display_name,
            &mut hints.project_slug,
            &mut hints.personal_collection_label,
            &mut hints.favorites_collection_label,
            &mut hints.organization_collection_label,
        ] {
            *hint = non_empty(hint.take());
        }
        Ok(self)
    }

    /// Decodes a normalized `auth.login` CloudEvent, or says precisely why it cannot be.
    pub fn decode(value: Option<&[u8]>, max_bytes: usize) -> Result<Self, DecodeError> {
        let envelope = decode_envelope(value, max_bytes, LOGIN_EVENT_TYPE)?;
        Self::from_envelope(envelope)
    }

    /// The normalized contract's `data`, under an envelope already checked.
    pub fn from_envelope(envelope: super::Envelope<'_>) -> Result<Self, DecodeError> {
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
        let kind = match data.kind.as_deref() {
            None | Some("login") => LoginKind::Login,
            Some("signup") => LoginKind::Signup,
            Some("profile_update") => LoginKind::ProfileUpdate,
            Some(other) => {
                return Err(DecodeError::new(
                    ErrorClass::InvalidField,
                    format!(
                        "field `data.kind` is `{other}`; expected login, signup or profile_update"
                    ),
                ))
            }
        };
        let mut event = LoginEvent::new(
            envelope.id,
            envelope.source,
            envelope.time,
            required("provider", data.provider)?,
            required("subject", data.subject)?,
        );
        event.kind = kind;
        event.email = data.email;
        event.email_verified = data.is_email_verified;
        event.display_name = data.display_name;
        event.photo_url = data.photo_url;
        event.locale = data.locale;
        event.device_id = data.device_id;
        event.user_agent = data.user_agent;
        event.workflow_variants = data.workflow_variants;
        event.given_name = data.given_name;
        event.family_name = data.family_name;
        event.groups = data.groups;
        event.audience = data.audience;
        event.attributes = data
            .attributes
            .map(|list| list.into_iter().map(|a| (a.key, a.value)).collect());
        event.connection = match data.connection {
            Some(c) => Some(Connection {
                kind: match c.kind.as_deref().filter(|k| !k.trim().is_empty()) {
                    None => None,
                    Some(k) => Some(ConnectionKind::parse(k).ok_or_else(|| {
                        DecodeError::new(
                            ErrorClass::InvalidField,
                            format!("field `data.connection.kind` is `{k}`; expected database, social, enterprise or passwordless"),
                        )
                    })?),
                },
                connection_id: c.connection_id,
                groups: c.groups,
            }),
            None => None,
        };
        event.client_upn_key = data.client_upn_key;
        event.custom_upn = data.custom_upn_value;
        event.hints = ProvisioningHints {
            organization_name: data.default_organization_name,
            organization_display_name: data.default_organization_display_name,
            organization_slug: data.default_organization_slug,
            project_name: data.default_project_name,
            project_display_name: data.default_project_display_name,
            project_slug: data.default_project_slug,
            personal_collection_label: data.default_personal_collection_label,
            favorites_collection_label: data.default_favorites_collection_label,
            organization_collection_label: data.default_organization_collection_label,
        };
        event.validated()
    }

    /// The normalized `auth.login` CloudEvent of this login: what `authsync ingest` produces
    /// for a provider delivery, so the worker reads one contract and nothing the adapter
    /// did not take (tokens, secrets, raw payloads) travels on. Decoding it gives back this
    /// login.
    pub fn to_cloudevent(&self) -> serde_json::Value {
        use serde_json::{json, Map, Value};
        let mut data = Map::new();
        let mut put = |key: &str, value: Value| {
            if !value.is_null() {
                data.insert(key.to_string(), value);
            }
        };
        put("provider", json!(self.provider));
        put("subject", json!(self.subject));
        put(
            "kind",
            json!(match self.kind {
                LoginKind::Login => "login",
                LoginKind::Signup => "signup",
                LoginKind::ProfileUpdate => "profile_update",
            }),
        );
        put("email", json!(self.email));
        put("isEmailVerified", json!(self.email_verified));
        put("displayName", json!(self.display_name));
        put("photoURL", json!(self.photo_url));
        put("locale", json!(self.locale));
        put("deviceID", json!(self.device_id));
        put("userAgent", json!(self.user_agent));
        put("workflowVariants", json!(self.workflow_variants));
        put("givenName", json!(self.given_name));
        put("familyName", json!(self.family_name));
        put("groups", json!(self.groups));
        put("audience", json!(self.audience));
        if let Some(attributes) = &self.attributes {
            put(
                "attributes",
                Value::Array(
                    attributes
                        .iter()
                        .map(|(k, v)| json!({"key": k, "value": v}))
                        .collect(),
                ),
            );
        }
        if let Some(c) = &self.connection {
            let mut connection = Map::new();
            if let Some(id) = &c.connection_id {
                connection.insert("connectionId".into(), json!(id));
            }
            if let Some(kind) = c.kind {
                connection.insert("kind".into(), json!(kind.as_str()));
            }
            if let Some(groups) = &c.groups {
                connection.insert("groups".into(), json!(groups));
            }
            put("connection", Value::Object(connection));
        }
        put("clientUpnKey", json!(self.client_upn_key));
        put("customUpnValue", json!(self.custom_upn));
        let h = &self.hints;
        put("defaultOrganizationName", json!(h.organization_name));
        put(
            "defaultOrganizationDisplayName",
            json!(h.organization_display_name),
        );
        put("defaultOrganizationSlug", json!(h.organization_slug));
        put("defaultProjectName", json!(h.project_name));
        put("defaultProjectDisplayName", json!(h.project_display_name));
        put("defaultProjectSlug", json!(h.project_slug));
        put(
            "defaultPersonalCollectionLabel",
            json!(h.personal_collection_label),
        );
        put(
            "defaultFavoritesCollectionLabel",
            json!(h.favorites_collection_label),
        );
        put(
            "defaultOrganizationCollectionLabel",
            json!(h.organization_collection_label),
        );
        json!({
            "specversion": "1.0",
            "id": self.event_id,
            "source": self.source,
            "type": LOGIN_EVENT_TYPE,
            "time": self.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            "datacontenttype": "application/json",
            "data": data,
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
    fn emails_fold_ascii_only_and_domains_go_through_idna() {
        let email = |raw: &str| {
            decode(&format!(
                r#"{{"provider":"p","subject":"s","email":{}}}"#,
                serde_json::to_string(raw).unwrap()
            ))
            .map(|e| e.email.unwrap())
        };
        assert_eq!(email(" Kim@Example.COM ").unwrap(), "kim@example.com");
        // KELVIN SIGN is not `K`: no Unicode case folding (CVE-2019-19844 class).
        let kelvin = email("\u{212A}im@example.com").unwrap();
        assert_eq!(kelvin, "\u{212A}im@example.com");
        assert!(!is_linkable_email(&kelvin));
        assert_eq!(
            email("Ada@B\u{fc}cher.Example").unwrap(),
            "ada@xn--bcher-kva.example"
        );
        for bad in [
            "a@b@c",
            "@x.io",
            "a@",
            "a b@x.io",
            "a@x\u{0}.io",
            "a@-\u{fffd}-.io",
        ] {
            let err = email(bad).unwrap_err();
            assert_eq!(err.class, ErrorClass::InvalidField, "{bad:?}");
        }
    }

    #[test]
    fn provider_names_are_lower_cased_and_connection_kinds_checked() {
        let ev = decode(r#"{"provider":" Okta ","subject":"s"}"#).unwrap();
        assert_eq!(ev.provider, "okta");
        let ev = decode(
            r#"{"provider":"auth0","subject":"s","connection":{"connectionId":"con_1","kind":"Enterprise"}}"#,
        )
        .unwrap();
        let c = ev.connection.unwrap();
        assert_eq!(c.kind, Some(ConnectionKind::Enterprise));
        assert_eq!(c.groups, None, "no groups given is not no groups");
        let ev = decode(
            r#"{"provider":"auth0","subject":"s","connection":{"connectionId":"con_1","groups":[]}}"#,
        )
        .unwrap();
        assert_eq!(ev.connection.unwrap().groups, Some(vec![]));
        let err =
            decode(r#"{"provider":"auth0","subject":"s","connection":{"kind":"trusted-please"}}"#)
                .unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidField);
        assert!(err.reason.contains("connection.kind"), "{}", err.reason);
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
