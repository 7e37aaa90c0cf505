//! What result events show about users: emails, identities, working context (batched reads).

use std::collections::HashMap;

use sqlx::PgConnection;
use uuid::Uuid;

use serde_json::value::RawValue;

use crate::events::results::{ClaimsViews, EmailRecord, IdentityRecord, WorkingContextRecord};

#[derive(Debug, Default)]
pub struct UserViews {
    pub emails: HashMap<Uuid, Vec<EmailRecord>>,
    pub identities: HashMap<Uuid, Vec<IdentityRecord>>,
    pub working_contexts: HashMap<Uuid, WorkingContextRecord>,
    pub claims: HashMap<Uuid, ClaimsViews>,
}

/// Postgres wrote this JSON itself; failing to take it is a bug, not the input's fault.
fn pg_json(text: String) -> Result<Box<RawValue>, sqlx::Error> {
    RawValue::from_string(text).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// Every view of `users` in one round trip: one row per user and kind, each a JSON
/// document Postgres built. A batch of logins is a handful of statements in all, so a
/// round trip here is a measurable share of a login's latency (four reads were four).
pub async fn load(conn: &mut PgConnection, users: &[Uuid]) -> Result<UserViews, sqlx::Error> {
    let mut views = UserViews::default();
    if users.is_empty() {
        return Ok(views);
    }
    // Roles, memberships, custom UPNs and attributes come in the `$sync` response's shape.
    // Set-based per table (not a correlated subquery per user, whose plan could scan
    // `organizations` once per user); the organization of each membership by its key
    // (OFFSET 0: never a hash of the whole table). The working context's collections are a
    // subquery per context row, an index lookup per user whatever the statistics say: as a
    // plain join, a generic plan on young statistics hashed the whole collections table for
    // every batch (4 ms for a batch of 3 users at 3k collections, 20 ms at 60k).
    let rows = sqlx::query!(
        r#"
        SELECT e.user_id AS "user_id!", 'emails' AS "kind!",
               json_agg(json_build_object(
                   'email', e.email, 'email_type', e.email_type, 'verified_at', e.verified_at)
                 ORDER BY e.created_at, e.email)::text AS "json!"
        FROM user_emails e WHERE e.user_id = ANY($1) GROUP BY e.user_id
        UNION ALL
        SELECT i.user_id, 'identities',
               json_agg(json_build_object(
                   'provider', i.provider, 'subject', i.subject, 'created_at', i.created_at,
                   'groups', i.groups, 'connection_id', i.connection_id,
                   'connection_groups', i.connection_groups, 'audience', i.audience,
                   'linked_by', i.linked_by)
                 ORDER BY i.created_at, i.provider, i.subject)::text
        FROM external_identities i WHERE i.user_id = ANY($1) GROUP BY i.user_id
        UNION ALL
        SELECT r.user_id, 'roles',
               json_agg(json_build_object(
                   'id', r.role || CASE WHEN r.organization_id = '00000000-0000-0000-0000-000000000000'
                                        THEN '' ELSE '@' || r.organization_id::text END,
                   'name', r.role,
                   'organizationId', NULLIF(r.organization_id, '00000000-0000-0000-0000-000000000000'),
                   'expires', NULL, 'created', r.granted_at)
                 ORDER BY r.role, r.organization_id)::text
        FROM (SELECT user_id, role, organization_id, min(granted_at) AS granted_at
              FROM user_roles WHERE user_id = ANY($1) GROUP BY 1, 2, 3) r
        GROUP BY r.user_id
        UNION ALL
        SELECT m.user_id, 'member_of',
               json_agg(json_build_object(
                   'id', m.organization_id, 'userId', m.user_id,
                   'organizationId', m.organization_id, 'organizationName', o.name,
                   'organizationDisplayName', o.display_name,
                   'roles', json_build_array(m.role), 'isGuest', false, 'created', m.created_at)
                 ORDER BY m.created_at, m.organization_id)::text
        FROM organization_members m
        CROSS JOIN LATERAL (
            SELECT name, display_name FROM organizations WHERE id = m.organization_id OFFSET 0
        ) o
        WHERE m.user_id = ANY($1) GROUP BY m.user_id
        UNION ALL
        SELECT c.user_id, 'custom_upns',
               json_agg(json_build_object(
                   'userId', c.user_id, 'clientUpnKey', c.client_key,
                   'customUpnValue', c.upn, 'modified', c.updated_at)
                 ORDER BY c.client_key)::text
        FROM custom_upns c WHERE c.user_id = ANY($1) GROUP BY c.user_id
        UNION ALL
        SELECT a.user_id, 'attributes',
               json_agg(json_build_object(
                   'name', a.key, 'value', a.value, 'userId', a.user_id,
                   'expires', NULL, 'modified', a.updated_at)
                 ORDER BY a.key)::text
        FROM user_attributes a WHERE a.user_id = ANY($1) GROUP BY a.user_id
        UNION ALL
        SELECT wc.user_id, 'context',
               json_build_object(
                   'tenant_id', wc.tenant_id, 'organization_id', wc.organization_id,
                   'collections', COALESCE((
                       SELECT json_agg(json_build_object(
                                  'id', c.id, 'kind', c.kind, 'label', c.label, 'path', c.path,
                                  'lifecycle_state', c.lifecycle_state, 'version', c.version,
                                  'tenant_id', c.tenant_id, 'organization_id', c.organization_id)
                                ORDER BY c.path)
                       FROM (SELECT * FROM collections c
                             WHERE c.organization_id = wc.organization_id
                               AND (c.kind = 'organization' OR c.created_by = wc.user_id)
                               AND c.lifecycle_state = 'active'
                             OFFSET 0) c
                   ), '[]'::json))::text
        FROM working_contexts wc WHERE wc.user_id = ANY($1)
        "#,
        users
    )
    .fetch_all(&mut *conn)
    .await?;
    for r in rows {
        match r.kind.as_str() {
            "emails" => {
                views.emails.insert(r.user_id, pg_record(&r.json)?);
            }
            "identities" => {
                views.identities.insert(r.user_id, pg_record(&r.json)?);
            }
            "context" => {
                views
                    .working_contexts
                    .insert(r.user_id, pg_record(&r.json)?);
            }
            kind => {
                let json = pg_json(r.json)?;
                let claims = views.claims.entry(r.user_id).or_default();
                match kind {
                    "roles" => claims.roles = json,
                    "member_of" => claims.member_of = json,
                    "custom_upns" => claims.custom_upns = json,
                    _ => claims.attributes = json,
                }
            }
        }
    }
    Ok(views)
}

/// A record Postgres built as JSON; failing to read it is a bug, not the input's fault.
fn pg_record<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, sqlx::Error> {
    serde_json::from_str(text).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}
