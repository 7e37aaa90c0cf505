//! What result events show about users: emails, identities, working context (batched reads).

use std::collections::HashMap;

use sqlx::PgConnection;
use uuid::Uuid;

use serde_json::value::RawValue;

use crate::events::results::{
    ClaimsViews, CollectionRecord, EmailRecord, IdentityRecord, WorkingContextRecord,
};

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

pub async fn load(conn: &mut PgConnection, users: &[Uuid]) -> Result<UserViews, sqlx::Error> {
    let mut views = UserViews::default();
    if users.is_empty() {
        return Ok(views);
    }
    let emails = sqlx::query!(
        r#"SELECT user_id, email, email_type, verified_at FROM user_emails
           WHERE user_id = ANY($1) ORDER BY user_id, created_at, email"#,
        users
    )
    .fetch_all(&mut *conn)
    .await?;
    for r in emails {
        views
            .emails
            .entry(r.user_id)
            .or_default()
            .push(EmailRecord {
                email: r.email,
                email_type: r.email_type,
                verified_at: r.verified_at,
            });
    }
    let identities = sqlx::query!(
        r#"SELECT user_id, provider, subject, created_at, groups, connection_id,
                  connection_groups, audience, linked_by
           FROM external_identities
           WHERE user_id = ANY($1) ORDER BY user_id, created_at, provider, subject"#,
        users
    )
    .fetch_all(&mut *conn)
    .await?;
    for r in identities {
        views
            .identities
            .entry(r.user_id)
            .or_default()
            .push(IdentityRecord {
                provider: r.provider,
                subject: r.subject,
                created_at: r.created_at,
                groups: r.groups,
                connection_id: r.connection_id,
                connection_groups: r.connection_groups,
                audience: r.audience,
                linked_by: r.linked_by,
            });
    }
    // Roles, memberships, custom UPNs and attributes in the `$sync` response's shape, built
    // as JSON by Postgres in one round trip. Set-based per table (not a correlated subquery
    // per user, whose plan could scan `organizations` once per user); the organization of
    // each membership by its key (OFFSET 0: never a hash of the whole table).
    let claims = sqlx::query!(
        r#"
        SELECT r.user_id AS "user_id!", 'roles' AS "kind!",
               json_agg(json_build_object(
                   'id', r.role || CASE WHEN r.organization_id = '00000000-0000-0000-0000-000000000000'
                                        THEN '' ELSE '@' || r.organization_id::text END,
                   'name', r.role,
                   'organizationId', NULLIF(r.organization_id, '00000000-0000-0000-0000-000000000000'),
                   'expires', NULL, 'created', r.granted_at)
                 ORDER BY r.role, r.organization_id)::text AS "json!"
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
        "#,
        users
    )
    .fetch_all(&mut *conn)
    .await?;
    for r in claims {
        let json = pg_json(r.json)?;
        let views = views.claims.entry(r.user_id).or_default();
        match r.kind.as_str() {
            "roles" => views.roles = json,
            "member_of" => views.member_of = json,
            "custom_upns" => views.custom_upns = json,
            _ => views.attributes = json,
        }
    }
    // The working organization's shared collections plus the user's own. A LATERAL
    // subquery the planner may not flatten (OFFSET 0) keeps it an index lookup per user
    // whatever the statistics say: as a plain join, a generic plan on young statistics
    // hashed the whole collections table for every batch (4 ms for a batch of 3 users at
    // 3k collections, 20 ms at 60k: the largest share of end-to-end latency).
    let contexts = sqlx::query!(
        r#"
        SELECT wc.user_id, wc.tenant_id, wc.organization_id,
               c.id AS "collection_id?", c.kind AS "kind?", c.label AS "label?",
               c.path AS "path?", c.lifecycle_state AS "lifecycle_state?", c.version AS "version?",
               c.tenant_id AS "c_tenant?", c.organization_id AS "c_org?"
        FROM working_contexts wc
        LEFT JOIN LATERAL (
            SELECT * FROM collections c
            WHERE c.organization_id = wc.organization_id
              AND (c.kind = 'organization' OR c.created_by = wc.user_id)
              AND c.lifecycle_state = 'active'
            OFFSET 0
        ) c ON true
        WHERE wc.user_id = ANY($1)
        ORDER BY wc.user_id, c.path
        "#,
        users
    )
    .fetch_all(&mut *conn)
    .await?;
    for r in contexts {
        let ctx = views
            .working_contexts
            .entry(r.user_id)
            .or_insert_with(|| WorkingContextRecord {
                tenant_id: r.tenant_id,
                organization_id: r.organization_id,
                collections: Vec::new(),
            });
        if let (Some(id), Some(kind), Some(label), Some(path), Some(state), Some(version)) = (
            r.collection_id,
            r.kind,
            r.label,
            r.path,
            r.lifecycle_state,
            r.version,
        ) {
            ctx.collections.push(CollectionRecord {
                id,
                kind,
                label,
                path,
                lifecycle_state: state,
                version,
                tenant_id: r.c_tenant.unwrap_or(r.tenant_id),
                organization_id: r.c_org.unwrap_or(r.organization_id),
            });
        }
    }
    Ok(views)
}
