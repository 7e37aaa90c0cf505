//! What result events show about users: emails, identities, working context (batched reads).

use std::collections::HashMap;

use sqlx::PgConnection;
use uuid::Uuid;

use crate::events::results::{CollectionRecord, EmailRecord, IdentityRecord, WorkingContextRecord};

#[derive(Debug, Default)]
pub struct UserViews {
    pub emails: HashMap<Uuid, Vec<EmailRecord>>,
    pub identities: HashMap<Uuid, Vec<IdentityRecord>>,
    pub working_contexts: HashMap<Uuid, WorkingContextRecord>,
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
        r#"SELECT user_id, provider, subject, created_at FROM external_identities
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
            });
    }
    // The working organization's shared collections plus the user's own.
    let contexts = sqlx::query!(
        r#"
        SELECT wc.user_id, wc.tenant_id, wc.organization_id,
               c.id AS "collection_id?", c.kind AS "kind?", c.label AS "label?",
               c.path AS "path?", c.lifecycle_state AS "lifecycle_state?", c.version AS "version?",
               c.tenant_id AS "c_tenant?", c.organization_id AS "c_org?"
        FROM working_contexts wc
        LEFT JOIN collections c ON c.organization_id = wc.organization_id
             AND (c.kind = 'organization' OR c.created_by = wc.user_id)
             AND c.lifecycle_state = 'active'
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
