//! Result events on `auth.user-events.v1`: CloudEvents 1.0 structured JSON whose `data`
//! follows the reference APIs' response shapes (ids as UUID strings).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::domain::{ids, RefreshReason, UserRecord};

pub const SOURCE: &str = "urn:authsync";
pub const USER_SYNCED: &str = "user.synced";
pub const USER_SIGNED_UP: &str = "user.signed_up";
pub const USER_TOKEN_REFRESH_REQUIRED: &str = "user.token_refresh_required";

/// An event ready for the outbox.
#[derive(Clone, Debug)]
pub struct ResultEvent {
    pub id: Uuid,
    pub event_type: &'static str,
    /// The user the event is about: the CloudEvents `subject` and the Kafka key.
    pub user_id: Uuid,
    pub time: DateTime<Utc>,
    /// The input event that caused it (CloudEvents extension `causationid`).
    pub causation_id: String,
    pub data: serde_json::Value,
}

#[derive(Serialize)]
struct Wire<'a> {
    specversion: &'static str,
    id: Uuid,
    source: &'static str,
    #[serde(rename = "type")]
    event_type: &'static str,
    subject: String,
    time: String,
    datacontenttype: &'static str,
    causationid: &'a str,
    data: &'a serde_json::Value,
}

impl ResultEvent {
    /// A result of `event_type` caused by input `causation_id`, with its deterministic id.
    pub fn new(
        event_type: &'static str,
        causation_id: &str,
        user_id: Uuid,
        time: DateTime<Utc>,
        data: serde_json::Value,
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
            subject: self.user_id.to_string(),
            time: self.time.to_rfc3339_opts(SecondsFormat::Millis, true),
            datacontenttype: "application/json",
            causationid: &self.causation_id,
            data: &self.data,
        };
        // Serializing plain structs and `Value`s cannot fail.
        serde_json::to_vec(&wire).unwrap_or_default()
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

/// The auth-sync response's `user`.
pub fn user_view(
    user: &UserRecord,
    emails: &[EmailRecord],
    identities: &[IdentityRecord],
) -> serde_json::Value {
    let emails: Vec<_> = emails
        .iter()
        .map(|e| {
            serde_json::json!({
                "email": e.email,
                "type": e.email_type,
                "verifiedAt": e.verified_at.map(ts),
            })
        })
        .collect();
    let identifiers: Vec<_> = identities
        .iter()
        .map(|i| {
            serde_json::json!({
                "id": format!("{}|{}", i.provider, i.subject),
                "label": i.provider,
                "metadata": { "createdAt": ts(i.created_at) },
            })
        })
        .collect();
    serde_json::json!({
        "id": user.id,
        "email": user.email,
        "emails": emails,
        "displayName": user.display_name,
        "authDisplayName": user.auth_display_name,
        "authPictureURL": user.auth_picture_url,
        "givenName": user.given_name,
        "familyName": user.family_name,
        "locale": user.locale,
        "externalIdentifiers": identifiers,
        "lifecycleState": user.lifecycle_state,
        "version": user.version,
        "etag": ids::user_etag(user.id, user.version),
        "metadata": {
            "createdAt": ts(user.created_at),
            "createdBy": user.id,
            "modifiedAt": ts(user.modified_at),
            "modifiedBy": user.id,
        },
    })
}

/// The auth-sync response's `workingContext`, collections nested by their paths.
pub fn working_context_view(ctx: &WorkingContextRecord) -> serde_json::Value {
    fn node(c: &CollectionRecord, all: &[CollectionRecord]) -> serde_json::Value {
        let children: Vec<_> = all
            .iter()
            .filter(|child| child.path.len() == c.path.len() + 1 && child.path.starts_with(&c.path))
            .map(|child| node(child, all))
            .collect();
        serde_json::json!({
            "collection": {
                "id": c.id,
                "collectionKind": c.kind,
                "label": c.label,
                "lifecycleState": c.lifecycle_state,
                "organizationId": c.organization_id,
                "tenantId": c.tenant_id,
                "path": c.path,
                "version": c.version,
                "etag": Uuid::new_v5(&c.id, format!("etag:{}", c.version).as_bytes()).simple().to_string(),
            },
            "children": children,
        })
    }
    let mut roots: Vec<&CollectionRecord> = ctx
        .collections
        .iter()
        .filter(|c| c.path.len() == 1)
        .collect();
    // Stable order: organization first, then personal, then anything else by label.
    roots.sort_by_key(|c| {
        (
            c.kind != "organization",
            c.kind != "personal",
            c.label.clone(),
        )
    });
    let tree: Vec<_> = roots
        .into_iter()
        .map(|c| node(c, &ctx.collections))
        .collect();
    serde_json::json!({
        "tenantId": ctx.tenant_id,
        "organizationId": ctx.organization_id,
        "CollectionTree": tree,
    })
}

/// `user.synced` data: the auth-sync response's `data`.
pub fn synced_data(
    did_sign_up: bool,
    refresh: &[RefreshReason],
    user: serde_json::Value,
    working_context: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "didSignUp": did_sign_up,
        "tokenRefreshRequired": !refresh.is_empty(),
        "tokenRefreshReason": refresh.first().map(|r| r.as_str()).unwrap_or(""),
        "user": user,
        "workingContext": working_context,
    })
}

/// `user.signed_up` data.
pub fn signed_up_data(
    provider: &str,
    subject: &str,
    user: serde_json::Value,
    working_context: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "provider": provider,
        "subject": subject,
        "user": user,
        "workingContext": working_context,
    })
}

/// `user.token_refresh_required` data.
pub fn token_refresh_data(user_id: Uuid, reasons: &[RefreshReason]) -> serde_json::Value {
    serde_json::json!({
        "userId": user_id,
        "reason": reasons.first().map(|r| r.as_str()).unwrap_or(""),
        "reasons": reasons.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
    })
}
