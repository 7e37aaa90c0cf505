//! Result events on `auth.user-events.v1`: CloudEvents 1.0 structured JSON whose `data`
//! follows the reference APIs' response shapes (ids as UUID strings).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::domain::{ids, RefreshReason, UserRecord};

pub const SOURCE: &str = "urn:authsync";
pub const USER_SYNCED: &str = "user.synced";
pub const USER_SIGNED_UP: &str = "user.signed_up";
pub const USER_TOKEN_REFRESH_REQUIRED: &str = "user.token_refresh_required";
pub const USER_ROLES_CHANGED: &str = "user.roles_changed";
pub const USER_IDENTITY_LINKED: &str = "user.identity_linked";

/// An event ready for the outbox; `data` is already serialized JSON.
#[derive(Clone, Debug)]
pub struct ResultEvent {
    pub id: Uuid,
    pub event_type: &'static str,
    /// The user the event is about: the CloudEvents `subject` and the Kafka key.
    pub user_id: Uuid,
    pub time: DateTime<Utc>,
    /// The input event that caused it (CloudEvents extension `causationid`).
    pub causation_id: String,
    pub data: Box<RawValue>,
}

#[derive(Serialize)]
struct Wire<'a> {
    specversion: &'static str,
    id: Uuid,
    source: &'static str,
    #[serde(rename = "type")]
    event_type: &'static str,
    subject: Uuid,
    time: String,
    datacontenttype: &'static str,
    causationid: &'a str,
    data: &'a RawValue,
}

/// Serializes a view once; it is then embedded as-is wherever it appears.
pub fn raw<T: Serialize + ?Sized>(value: &T) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).unwrap_or_else(|_| null())
}

pub fn null() -> Box<RawValue> {
    RawValue::NULL.to_owned()
}

impl ResultEvent {
    /// A result of `event_type` caused by input `causation_id`, with its deterministic id.
    pub fn new(
        event_type: &'static str,
        causation_id: &str,
        user_id: Uuid,
        time: DateTime<Utc>,
        data: Box<RawValue>,
    ) -> Self {
        Self {
            id: ids::result_event_id(causation_id, event_type),
            event_type,
            user_id,
            time,
            causation_id: causation_id.to_owned(),
            data,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let wire = Wire {
            specversion: "1.0",
            id: self.id,
            source: SOURCE,
            event_type: self.event_type,
            subject: self.user_id,
            time: ts(self.time),
            datacontenttype: "application/json",
            causationid: &self.causation_id,
            data: &self.data,
        };
        // Sized for the envelope up front: growing a Vec by doubling copies the payload.
        let mut out = Vec::with_capacity(self.data.get().len() + 384);
        // Serializing plain structs of strings and numbers cannot fail.
        match serde_json::to_writer(&mut out, &wire) {
            Ok(()) => out,
            Err(_) => Vec::new(),
        }
    }
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmailRecord {
    pub email: String,
    pub email_type: String,
    pub verified_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityRecord {
    pub provider: String,
    pub subject: String,
    pub created_at: DateTime<Utc>,
    pub groups: Vec<String>,
    pub connection_id: Option<String>,
    pub connection_groups: Vec<String>,
    pub audience: Option<String>,
    pub linked_by: Option<String>,
}

/// The `$sync` response's `roles`, `memberOf`, `customUpns` and `attributes` arrays, as
/// JSON the store read (empty arrays by default).
#[derive(Debug)]
pub struct ClaimsViews {
    pub roles: Box<RawValue>,
    pub member_of: Box<RawValue>,
    pub custom_upns: Box<RawValue>,
    pub attributes: Box<RawValue>,
}

impl Default for ClaimsViews {
    fn default() -> Self {
        Self {
            roles: EMPTY_ARRAY.clone(),
            member_of: EMPTY_ARRAY.clone(),
            custom_upns: EMPTY_ARRAY.clone(),
            attributes: EMPTY_ARRAY.clone(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IdentityView<'a> {
    id: String,
    strategy: &'a str,
    azo_user_id: &'a str,
    azo_connection_id: Option<&'a str>,
    groups: &'a [String],
    connection_groups: &'a [String],
    audience: Option<&'a str>,
    linked_by: Option<&'a str>,
    created: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollectionRecord {
    pub id: Uuid,
    pub kind: String,
    pub label: String,
    pub path: Vec<Uuid>,
    pub lifecycle_state: String,
    pub version: i64,
    pub tenant_id: Uuid,
    pub organization_id: Uuid,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkingContextRecord {
    pub tenant_id: Uuid,
    pub organization_id: Uuid,
    /// The user's collections in the working organization, any order.
    pub collections: Vec<CollectionRecord>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EmailView<'a> {
    email: &'a str,
    #[serde(rename = "type")]
    email_type: &'a str,
    verified_at: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CreatedMetadata {
    created_at: String,
}

#[derive(Serialize)]
struct IdentifierView<'a> {
    id: String,
    label: &'a str,
    metadata: CreatedMetadata,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct UserMetadata {
    created_at: String,
    created_by: Uuid,
    modified_at: String,
    modified_by: Uuid,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct UserView<'a> {
    id: Uuid,
    email: Option<&'a str>,
    emails: Vec<EmailView<'a>>,
    display_name: Option<&'a str>,
    auth_display_name: Option<&'a str>,
    #[serde(rename = "authPictureURL")]
    auth_picture_url: Option<&'a str>,
    given_name: Option<&'a str>,
    family_name: Option<&'a str>,
    locale: Option<&'a str>,
    external_identifiers: Vec<IdentifierView<'a>>,
    identities: Vec<IdentityView<'a>>,
    roles: &'a RawValue,
    member_of: &'a RawValue,
    custom_upns: &'a RawValue,
    attributes: &'a RawValue,
    lifecycle_state: &'a str,
    version: i64,
    etag: String,
    metadata: UserMetadata,
}

/// The auth-sync response's `user`, serialized.
pub fn user_view(
    user: &UserRecord,
    emails: &[EmailRecord],
    identities: &[IdentityRecord],
    claims: Option<&ClaimsViews>,
) -> Box<RawValue> {
    let empty: &RawValue = EMPTY_ARRAY.as_ref();
    raw(&UserView {
        id: user.id,
        email: user.email.as_deref(),
        emails: emails
            .iter()
            .map(|e| EmailView {
                email: &e.email,
                email_type: &e.email_type,
                verified_at: e.verified_at.map(ts),
            })
            .collect(),
        display_name: user.display_name.as_deref(),
        auth_display_name: user.auth_display_name.as_deref(),
        auth_picture_url: user.auth_picture_url.as_deref(),
        given_name: user.given_name.as_deref(),
        family_name: user.family_name.as_deref(),
        locale: user.locale.as_deref(),
        external_identifiers: identities
            .iter()
            .map(|i| IdentifierView {
                id: format!("{}|{}", i.provider, i.subject),
                label: &i.provider,
                metadata: CreatedMetadata {
                    created_at: ts(i.created_at),
                },
            })
            .collect(),
        identities: identities
            .iter()
            .map(|i| IdentityView {
                id: format!("{}|{}", i.provider, i.subject),
                strategy: &i.provider,
                azo_user_id: &i.subject,
                azo_connection_id: i.connection_id.as_deref(),
                groups: &i.groups,
                connection_groups: &i.connection_groups,
                audience: i.audience.as_deref(),
                linked_by: i.linked_by.as_deref(),
                created: ts(i.created_at),
            })
            .collect(),
        roles: claims.map_or(empty, |c| &c.roles),
        member_of: claims.map_or(empty, |c| &c.member_of),
        custom_upns: claims.map_or(empty, |c| &c.custom_upns),
        attributes: claims.map_or(empty, |c| &c.attributes),
        lifecycle_state: &user.lifecycle_state,
        version: user.version,
        etag: ids::user_etag(user.id, user.version),
        metadata: UserMetadata {
            created_at: ts(user.created_at),
            created_by: user.id,
            modified_at: ts(user.modified_at),
            modified_by: user.id,
        },
    })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CollectionView<'a> {
    id: Uuid,
    collection_kind: &'a str,
    label: &'a str,
    lifecycle_state: &'a str,
    organization_id: Uuid,
    tenant_id: Uuid,
    path: &'a [Uuid],
    version: i64,
    etag: String,
}

#[derive(Serialize)]
struct CollectionNode<'a> {
    collection: CollectionView<'a>,
    children: Vec<CollectionNode<'a>>,
}

#[derive(Serialize)]
struct WorkingContextView<'a> {
    #[serde(rename = "tenantId")]
    tenant_id: Uuid,
    #[serde(rename = "organizationId")]
    organization_id: Uuid,
    #[serde(rename = "CollectionTree")]
    collection_tree: Vec<CollectionNode<'a>>,
}

fn collection_node<'a>(c: &'a CollectionRecord, all: &'a [CollectionRecord]) -> CollectionNode<'a> {
    CollectionNode {
        collection: CollectionView {
            id: c.id,
            collection_kind: &c.kind,
            label: &c.label,
            lifecycle_state: &c.lifecycle_state,
            organization_id: c.organization_id,
            tenant_id: c.tenant_id,
            path: &c.path,
            version: c.version,
            etag: Uuid::new_v5(&c.id, format!("etag:{}", c.version).as_bytes())
                .simple()
                .to_string(),
        },
        children: all
            .iter()
            .filter(|child| child.path.len() == c.path.len() + 1 && child.path.starts_with(&c.path))
            .map(|child| collection_node(child, all))
            .collect(),
    }
}

/// The auth-sync response's `workingContext`, collections nested by their paths.
pub fn working_context_view(ctx: &WorkingContextRecord) -> Box<RawValue> {
    let mut roots: Vec<&CollectionRecord> = ctx
        .collections
        .iter()
        .filter(|c| c.path.len() == 1)
        .collect();
    // Stable order: organization first, then personal, then anything else by label.
    roots.sort_by(|a, b| {
        (a.kind != "organization", a.kind != "personal", &a.label).cmp(&(
            b.kind != "organization",
            b.kind != "personal",
            &b.label,
        ))
    });
    raw(&WorkingContextView {
        tenant_id: ctx.tenant_id,
        organization_id: ctx.organization_id,
        collection_tree: roots
            .into_iter()
            .map(|c| collection_node(c, &ctx.collections))
            .collect(),
    })
}

static EMPTY_ARRAY: std::sync::LazyLock<Box<RawValue>> =
    std::sync::LazyLock::new(|| raw(&[] as &[u8]));

/// How an unknown identity's first login related to existing users with its email.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Linking {
    /// Linked to an existing user (the `user` of the event).
    Linked { by: &'static str },
    /// Not linked, a separate user was created: why.
    Skipped(&'static str),
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SyncedData<'a> {
    did_sign_up: bool,
    token_refresh_required: bool,
    token_refresh_reason: &'a str,
    user: &'a RawValue,
    working_context: &'a RawValue,
    /// Present when the login's identity was moved here by a merge: the old user's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    merged_from: Option<Uuid>,
    /// Present on the first login of an identity some existing user's email matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    linking: Option<Linking>,
}

/// `user.synced` data: the auth-sync response's `data`.
pub fn synced_data(
    did_sign_up: bool,
    refresh: &[RefreshReason],
    user: &RawValue,
    working_context: &RawValue,
    merged_from: Option<Uuid>,
    linking: Option<Linking>,
) -> Box<RawValue> {
    raw(&SyncedData {
        did_sign_up,
        token_refresh_required: !refresh.is_empty(),
        token_refresh_reason: refresh.first().map(|r| r.as_str()).unwrap_or(""),
        user,
        working_context,
        merged_from,
        linking,
    })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RoleView<'a> {
    name: &'a str,
    organization_id: Option<Uuid>,
}

fn role_views(grants: &[(String, Uuid)]) -> Vec<RoleView<'_>> {
    grants
        .iter()
        .map(|(name, org)| RoleView {
            name,
            organization_id: (!org.is_nil()).then_some(*org),
        })
        .collect()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RolesChangedData<'a> {
    user_id: Uuid,
    before: Vec<RoleView<'a>>,
    after: Vec<RoleView<'a>>,
    added: Vec<RoleView<'a>>,
    removed: Vec<RoleView<'a>>,
}

/// `user.roles_changed` data: the roles before and after the login, and the difference.
pub fn roles_changed_data(
    user_id: Uuid,
    before: &[(String, Uuid)],
    after: &[(String, Uuid)],
) -> Box<RawValue> {
    let added: Vec<(String, Uuid)> = after
        .iter()
        .filter(|g| !before.contains(g))
        .cloned()
        .collect();
    let removed: Vec<(String, Uuid)> = before
        .iter()
        .filter(|g| !after.contains(g))
        .cloned()
        .collect();
    raw(&RolesChangedData {
        user_id,
        before: role_views(before),
        after: role_views(after),
        added: role_views(&added),
        removed: role_views(&removed),
    })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IdentityLinkedData<'a> {
    user_id: Uuid,
    provider: &'a str,
    subject: &'a str,
    linked_by: &'static str,
}

/// `user.identity_linked` data.
pub fn identity_linked_data(
    user_id: Uuid,
    provider: &str,
    subject: &str,
    linked_by: &'static str,
) -> Box<RawValue> {
    raw(&IdentityLinkedData {
        user_id,
        provider,
        subject,
        linked_by,
    })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SignedUpData<'a> {
    provider: &'a str,
    subject: &'a str,
    user: &'a RawValue,
    working_context: &'a RawValue,
}

/// `user.signed_up` data.
pub fn signed_up_data(
    provider: &str,
    subject: &str,
    user: &RawValue,
    working_context: &RawValue,
) -> Box<RawValue> {
    raw(&SignedUpData {
        provider,
        subject,
        user,
        working_context,
    })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TokenRefreshData {
    user_id: Uuid,
    reason: &'static str,
    reasons: Vec<&'static str>,
}

/// `user.token_refresh_required` data.
pub fn token_refresh_data(user_id: Uuid, reasons: &[RefreshReason]) -> Box<RawValue> {
    raw(&TokenRefreshData {
        user_id,
        reason: reasons.first().map(|r| r.as_str()).unwrap_or(""),
        reasons: reasons.iter().map(|r| r.as_str()).collect(),
    })
}
