//! First logins: claim the identity, then create everything the plan lists, set-based.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::auth_sync::IdentityWrite;
use crate::domain::SignupPlan;
use crate::store::users::clocks_to_json;

/// Claims these identities. Returns the (provider, subject) pairs this transaction won; a
/// pair another transaction claimed first (a concurrent first login, which this statement
/// waits for) is not returned and must be handled as a known user.
pub async fn claim_identities(
    conn: &mut PgConnection,
    identities: &[IdentityWrite],
) -> Result<Vec<(String, String)>, sqlx::Error> {
    if identities.is_empty() {
        return Ok(Vec::new());
    }
    let providers: Vec<&str> = identities.iter().map(|i| i.provider.as_str()).collect();
    let subjects: Vec<&str> = identities.iter().map(|i| i.subject.as_str()).collect();
    let users: Vec<Uuid> = identities.iter().map(|i| i.user_id).collect();
    let emails: Vec<Option<&str>> = identities
        .iter()
        .map(|i| i.claims.email.as_deref())
        .collect();
    let verified: Vec<bool> = identities.iter().map(|i| i.claims.email_verified).collect();
    // text[] per row cannot be a row of a 2-D array (ragged): pass each as JSON.
    let groups: Vec<serde_json::Value> = identities
        .iter()
        .map(|i| serde_json::json!(i.claims.groups))
        .collect();
    let connection_ids: Vec<Option<&str>> = identities
        .iter()
        .map(|i| i.claims.connection_id.as_deref())
        .collect();
    let connection_kinds: Vec<Option<&str>> = identities
        .iter()
        .map(|i| i.claims.connection_kind.map(|k| k.as_str()))
        .collect();
    let connection_groups: Vec<serde_json::Value> = identities
        .iter()
        .map(|i| serde_json::json!(i.claims.connection_groups))
        .collect();
    let audiences: Vec<Option<&str>> = identities
        .iter()
        .map(|i| i.claims.audience.as_deref())
        .collect();
    let at: Vec<DateTime<Utc>> = identities.iter().map(|i| i.last_login_at).collect();
    let linked_by: Vec<Option<&str>> = identities.iter().map(|i| i.linked_by).collect();
    let rows = sqlx::query!(
        r#"
        INSERT INTO external_identities (provider, subject, user_id, email, email_verified, groups,
                                         connection_id, connection_groups, audience, last_login_at,
                                         linked_by, connection_kind)
        SELECT p, s, u, e, v, ARRAY(SELECT jsonb_array_elements_text(g)), c,
               ARRAY(SELECT jsonb_array_elements_text(cg)), a, t, l, ck
        FROM UNNEST($1::text[], $2::text[], $3::uuid[], $4::text[], $5::bool[], $6::jsonb[],
                    $7::text[], $8::jsonb[], $9::text[], $10::timestamptz[], $11::text[],
                    $12::text[])
            AS x(p, s, u, e, v, g, c, cg, a, t, l, ck)
        ON CONFLICT (provider, subject) DO NOTHING
        RETURNING provider, subject
        "#,
        &providers as &[&str],
        &subjects as &[&str],
        &users,
        &emails as &[Option<&str>],
        &verified,
        &groups,
        &connection_ids as &[Option<&str>],
        &connection_groups,
        &audiences as &[Option<&str>],
        &at,
        &linked_by as &[Option<&str>],
        &connection_kinds as &[Option<&str>],
    )
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.provider, r.subject)).collect())
}

/// Creates users, emails, tenants, organizations (+ owner membership), default projects,
/// collections and working contexts for plans whose identity this transaction claimed.
pub async fn create(conn: &mut PgConnection, plans: &[&SignupPlan]) -> Result<(), sqlx::Error> {
    if plans.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = plans.iter().map(|p| p.user.id).collect();
    let emails: Vec<Option<&str>> = plans.iter().map(|p| p.user.email.as_deref()).collect();
    let names: Vec<Option<&str>> = plans
        .iter()
        .map(|p| p.user.display_name.as_deref())
        .collect();
    let pictures: Vec<Option<&str>> = plans
        .iter()
        .map(|p| p.user.auth_picture_url.as_deref())
        .collect();
    let given: Vec<Option<&str>> = plans.iter().map(|p| p.user.given_name.as_deref()).collect();
    let family: Vec<Option<&str>> = plans
        .iter()
        .map(|p| p.user.family_name.as_deref())
        .collect();
    let locales: Vec<Option<&str>> = plans.iter().map(|p| p.user.locale.as_deref()).collect();
    let variants: Vec<serde_json::Value> = plans
        .iter()
        .map(|p| serde_json::json!(p.user.workflow_variants))
        .collect();
    let at: Vec<chrono::DateTime<chrono::Utc>> =
        plans.iter().map(|p| p.user.profile_event_at).collect();
    let now: Vec<chrono::DateTime<chrono::Utc>> = plans.iter().map(|p| p.user.created_at).collect();
    let owner_providers: Vec<Option<&str>> = plans
        .iter()
        .map(|p| p.user.email_owner.as_ref().map(|o| o.0.as_str()))
        .collect();
    let owner_subjects: Vec<Option<&str>> = plans
        .iter()
        .map(|p| p.user.email_owner.as_ref().map(|o| o.1.as_str()))
        .collect();
    let clocks: Vec<serde_json::Value> = plans
        .iter()
        .map(|p| clocks_to_json(&p.user.clocks))
        .collect();
    sqlx::query!(
        r#"
        INSERT INTO users (id, email, display_name, auth_display_name, auth_picture_url, given_name,
                           family_name, locale, workflow_variants, profile_event_at, last_login_at,
                           created_at, created_by, modified_at, modified_by, email_provider,
                           email_subject, field_clocks)
        SELECT id, e, n, n, pic, g, f, l, ARRAY(SELECT jsonb_array_elements_text(v)), t, t, c, id, c, id,
               ep, es, cl
        FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                    $7::text[], $8::jsonb[], $9::timestamptz[], $10::timestamptz[], $11::text[],
                    $12::text[], $13::jsonb[])
            AS x(id, e, n, pic, g, f, l, v, t, c, ep, es, cl)
        "#,
        &ids,
        &emails as &[Option<&str>],
        &names as &[Option<&str>],
        &pictures as &[Option<&str>],
        &given as &[Option<&str>],
        &family as &[Option<&str>],
        &locales as &[Option<&str>],
        &variants,
        &at,
        &now,
        &owner_providers as &[Option<&str>],
        &owner_subjects as &[Option<&str>],
        &clocks,
    )
    .execute(&mut *conn)
    .await?;

    let with_email: Vec<&&SignupPlan> = plans.iter().filter(|p| p.user.email.is_some()).collect();
    let email_users: Vec<Uuid> = with_email.iter().map(|p| p.user.id).collect();
    let email_values: Vec<&str> = with_email
        .iter()
        .filter_map(|p| p.user.email.as_deref())
        .collect();
    let email_verified: Vec<Option<chrono::DateTime<chrono::Utc>>> = with_email
        .iter()
        .map(|p| p.user.email_verified.then_some(p.user.profile_event_at))
        .collect();
    sqlx::query!(
        r#"
        INSERT INTO user_emails (user_id, email, verified_at)
        SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[])
        "#,
        &email_users,
        &email_values as &[&str],
        &email_verified as &[Option<chrono::DateTime<chrono::Utc>>],
    )
    .execute(&mut *conn)
    .await?;

    let tenants: Vec<Uuid> = plans.iter().map(|p| p.tenant_id).collect();
    let orgs: Vec<Uuid> = plans.iter().map(|p| p.organization_id).collect();
    let org_names: Vec<&str> = plans.iter().map(|p| p.organization_name.as_str()).collect();
    let org_display: Vec<&str> = plans
        .iter()
        .map(|p| p.organization_display_name.as_str())
        .collect();
    let org_slugs: Vec<&str> = plans.iter().map(|p| p.organization_slug.as_str()).collect();
    let projects: Vec<Uuid> = plans.iter().map(|p| p.project_id).collect();
    let project_names: Vec<&str> = plans.iter().map(|p| p.project_name.as_str()).collect();
    let project_display: Vec<&str> = plans
        .iter()
        .map(|p| p.project_display_name.as_str())
        .collect();
    let project_slugs: Vec<&str> = plans.iter().map(|p| p.project_slug.as_str()).collect();
    // One statement for the tenancy rows: tenant, organization, owner membership, project,
    // working context.
    sqlx::query!(
        r#"
        WITH x AS (
            SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[],
                                 $6::text[], $7::uuid[], $8::text[], $9::text[], $10::text[])
                AS x(user_id, tenant_id, org_id, org_name, org_display, org_slug,
                     project_id, project_name, project_display, project_slug)
        ), t AS (
            INSERT INTO tenants (id, created_by) SELECT tenant_id, user_id FROM x
        ), o AS (
            INSERT INTO organizations (id, tenant_id, name, display_name, slug, created_by)
            SELECT org_id, tenant_id, org_name, org_display, org_slug, user_id FROM x
        ), m AS (
            INSERT INTO organization_members (organization_id, user_id, role)
            SELECT org_id, user_id, 'owner' FROM x
        ), p AS (
            INSERT INTO projects (id, organization_id, name, display_name, slug, created_by)
            SELECT project_id, org_id, project_name, project_display, project_slug, user_id FROM x
        )
        INSERT INTO working_contexts (user_id, tenant_id, organization_id)
        SELECT user_id, tenant_id, org_id FROM x
        "#,
        &ids,
        &tenants,
        &orgs,
        &org_names as &[&str],
        &org_display as &[&str],
        &org_slugs as &[&str],
        &projects,
        &project_names as &[&str],
        &project_display as &[&str],
        &project_slugs as &[&str],
    )
    .execute(&mut *conn)
    .await?;

    let mut c_ids = Vec::new();
    let mut c_tenants = Vec::new();
    let mut c_orgs = Vec::new();
    let mut c_kinds = Vec::new();
    let mut c_labels = Vec::new();
    let mut c_paths = Vec::new();
    let mut c_users = Vec::new();
    for plan in plans {
        for c in &plan.collections {
            c_ids.push(c.id);
            c_tenants.push(plan.tenant_id);
            c_orgs.push(plan.organization_id);
            c_kinds.push(c.kind.as_str());
            c_labels.push(c.label.as_str());
            c_paths.push(serde_json::json!(c.path));
            c_users.push(plan.user.id);
        }
    }
    sqlx::query!(
        r#"
        INSERT INTO collections (id, tenant_id, organization_id, kind, label, path, created_by)
        SELECT id, t, o, k, l, ARRAY(SELECT jsonb_array_elements_text(p)::uuid), u
        FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::jsonb[], $7::uuid[])
            AS x(id, t, o, k, l, p, u)
        "#,
        &c_ids,
        &c_tenants,
        &c_orgs,
        &c_kinds as &[&str],
        &c_labels as &[&str],
        &c_paths,
        &c_users,
    )
    .execute(&mut *conn)
    .await?;

    // The owner has full rights on their collections.
    sqlx::query!(
        r#"
        INSERT INTO collection_permissions (collection_id, user_id, action, created_by)
        SELECT id, u, 'owner', u FROM UNNEST($1::uuid[], $2::uuid[]) AS x(id, u)
        "#,
        &c_ids,
        &c_users,
    )
    .execute(conn)
    .await
    .map(|_| ())
}
