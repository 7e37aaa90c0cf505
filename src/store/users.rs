//! Known users: load (and lock) by identity, write back what the domain decided.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::UserRecord;

/// A known identity and the (locked) user it resolves to.
#[derive(Debug, Clone)]
pub struct LoadedIdentity {
    pub provider: String,
    pub subject: String,
    pub groups: Vec<String>,
    pub connection_id: Option<String>,
    pub connection_groups: Vec<String>,
    pub audience: Option<String>,
    /// The email this identity's provider last asserted, and whether it said verified.
    pub email: Option<String>,
    pub email_verified: bool,
    /// Set when a merge moved this identity here from another user.
    pub merged_from: Option<Uuid>,
    pub user: UserRecord,
}

/// Loads and locks the users of these identities, in user-id order (a fixed lock order is
/// what keeps concurrent batches and merges from deadlocking).
pub async fn lock_by_identities(
    conn: &mut PgConnection,
    keys: &[(String, String)],
) -> Result<Vec<LoadedIdentity>, sqlx::Error> {
    let providers: Vec<&str> = keys.iter().map(|(p, _)| p.as_str()).collect();
    let subjects: Vec<&str> = keys.iter().map(|(_, s)| s.as_str()).collect();
    let rows = sqlx::query!(
        r#"
        SELECT ei.provider, ei.subject, ei.groups, ei.connection_id, ei.connection_groups,
               ei.audience, ei.email AS identity_email,
               ei.email_verified AS identity_email_verified, ei.merged_from,
               u.id, u.email, (ue.verified_at IS NOT NULL) AS "email_verified!",
               u.display_name, u.auth_display_name, u.auth_picture_url, u.given_name,
               u.family_name, u.locale, u.workflow_variants, u.lifecycle_state, u.version,
               u.profile_event_at, u.last_login_at, u.login_count, u.created_at, u.modified_at
        FROM UNNEST($1::text[], $2::text[]) AS k(provider, subject)
        JOIN external_identities ei ON ei.provider = k.provider AND ei.subject = k.subject
        JOIN users u ON u.id = ei.user_id
        LEFT JOIN user_emails ue ON ue.user_id = u.id AND ue.email = u.email
        ORDER BY u.id, ei.provider, ei.subject
        FOR UPDATE OF u, ei
        "#,
        &providers as &[&str],
        &subjects as &[&str],
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| LoadedIdentity {
            provider: r.provider,
            subject: r.subject,
            groups: r.groups,
            connection_id: r.connection_id,
            connection_groups: r.connection_groups,
            audience: r.audience,
            email: r.identity_email,
            email_verified: r.identity_email_verified,
            merged_from: r.merged_from,
            user: UserRecord {
                id: r.id,
                email: r.email,
                email_verified: r.email_verified,
                display_name: r.display_name,
                auth_display_name: r.auth_display_name,
                auth_picture_url: r.auth_picture_url,
                given_name: r.given_name,
                family_name: r.family_name,
                locale: r.locale,
                workflow_variants: r.workflow_variants,
                lifecycle_state: r.lifecycle_state,
                version: r.version,
                profile_event_at: r.profile_event_at,
                last_login_at: r.last_login_at,
                login_count: r.login_count,
                created_at: r.created_at,
                modified_at: r.modified_at,
            },
        })
        .collect())
}

/// Writes the full state of each user (one statement for the batch).
pub async fn write(conn: &mut PgConnection, users: &[&UserRecord]) -> Result<(), sqlx::Error> {
    if users.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = users.iter().map(|u| u.id).collect();
    let emails: Vec<Option<&str>> = users.iter().map(|u| u.email.as_deref()).collect();
    let auth_names: Vec<Option<&str>> = users
        .iter()
        .map(|u| u.auth_display_name.as_deref())
        .collect();
    let pictures: Vec<Option<&str>> = users
        .iter()
        .map(|u| u.auth_picture_url.as_deref())
        .collect();
    let given: Vec<Option<&str>> = users.iter().map(|u| u.given_name.as_deref()).collect();
    let family: Vec<Option<&str>> = users.iter().map(|u| u.family_name.as_deref()).collect();
    let locales: Vec<Option<&str>> = users.iter().map(|u| u.locale.as_deref()).collect();
    // text[] per user cannot be a row of a 2-D array (ragged): pass each as JSON.
    let variants: Vec<serde_json::Value> = users
        .iter()
        .map(|u| serde_json::json!(u.workflow_variants))
        .collect();
    let versions: Vec<i64> = users.iter().map(|u| u.version).collect();
    let profile_at: Vec<DateTime<Utc>> = users.iter().map(|u| u.profile_event_at).collect();
    let login_at: Vec<DateTime<Utc>> = users.iter().map(|u| u.last_login_at).collect();
    let counts: Vec<i64> = users.iter().map(|u| u.login_count).collect();
    let modified: Vec<DateTime<Utc>> = users.iter().map(|u| u.modified_at).collect();
    sqlx::query!(
        r#"
        UPDATE users u SET
            email = d.email, auth_display_name = d.auth_display_name,
            auth_picture_url = d.auth_picture_url, given_name = d.given_name,
            family_name = d.family_name, locale = d.locale,
            workflow_variants = ARRAY(SELECT jsonb_array_elements_text(d.variants)),
            version = d.version, profile_event_at = d.profile_event_at,
            last_login_at = d.last_login_at, login_count = d.login_count,
            modified_at = d.modified_at, modified_by = CASE WHEN d.version <> u.version THEN d.id ELSE u.modified_by END
        FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                    $7::text[], $8::jsonb[], $9::int8[], $10::timestamptz[], $11::timestamptz[],
                    $12::int8[], $13::timestamptz[])
            AS d(id, email, auth_display_name, auth_picture_url, given_name, family_name, locale,
                 variants, version, profile_event_at, last_login_at, login_count, modified_at)
        WHERE u.id = d.id
        "#,
        &ids,
        &emails as &[Option<&str>],
        &auth_names as &[Option<&str>],
        &pictures as &[Option<&str>],
        &given as &[Option<&str>],
        &family as &[Option<&str>],
        &locales as &[Option<&str>],
        &variants,
        &versions,
        &profile_at,
        &login_at,
        &counts,
        &modified,
    )
    .execute(conn)
    .await
    .map(|_| ())
}

/// The verification state of one (user, email), as the latest applied event says.
#[derive(Debug, Clone)]
pub struct EmailState {
    pub user_id: Uuid,
    pub email: String,
    pub verified_at: Option<DateTime<Utc>>,
}

/// Adds addresses and records (un)verification; a verified address keeps its first
/// verification time. `emails` must not repeat a (user, email).
pub async fn upsert_emails(
    conn: &mut PgConnection,
    emails: &[EmailState],
) -> Result<(), sqlx::Error> {
    if emails.is_empty() {
        return Ok(());
    }
    let users: Vec<Uuid> = emails.iter().map(|e| e.user_id).collect();
    let addresses: Vec<&str> = emails.iter().map(|e| e.email.as_str()).collect();
    let verified: Vec<Option<DateTime<Utc>>> = emails.iter().map(|e| e.verified_at).collect();
    sqlx::query!(
        r#"
        INSERT INTO user_emails (user_id, email, verified_at)
        SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[])
        ON CONFLICT (user_id, email) DO UPDATE SET verified_at =
            CASE WHEN EXCLUDED.verified_at IS NULL THEN NULL
                 ELSE COALESCE(user_emails.verified_at, EXCLUDED.verified_at) END
        "#,
        &users,
        &addresses as &[&str],
        &verified as &[Option<DateTime<Utc>>],
    )
    .execute(conn)
    .await
    .map(|_| ())
}

/// The claims of one identity after the batch (written only when they changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityState {
    pub provider: String,
    pub subject: String,
    pub groups: Vec<String>,
    pub connection_id: Option<String>,
    pub connection_groups: Vec<String>,
    pub audience: Option<String>,
    pub email: Option<String>,
    pub email_verified: bool,
    pub last_login_at: DateTime<Utc>,
}

/// `identities` must not repeat a (provider, subject).
pub async fn update_identities(
    conn: &mut PgConnection,
    identities: &[IdentityState],
) -> Result<(), sqlx::Error> {
    if identities.is_empty() {
        return Ok(());
    }
    let providers: Vec<&str> = identities.iter().map(|i| i.provider.as_str()).collect();
    let subjects: Vec<&str> = identities.iter().map(|i| i.subject.as_str()).collect();
    let groups: Vec<serde_json::Value> = identities
        .iter()
        .map(|i| serde_json::json!(i.groups))
        .collect();
    let emails: Vec<Option<&str>> = identities.iter().map(|i| i.email.as_deref()).collect();
    let verified: Vec<bool> = identities.iter().map(|i| i.email_verified).collect();
    let login_at: Vec<DateTime<Utc>> = identities.iter().map(|i| i.last_login_at).collect();
    let connection_ids: Vec<Option<&str>> = identities
        .iter()
        .map(|i| i.connection_id.as_deref())
        .collect();
    let connection_groups: Vec<serde_json::Value> = identities
        .iter()
        .map(|i| serde_json::json!(i.connection_groups))
        .collect();
    let audiences: Vec<Option<&str>> = identities.iter().map(|i| i.audience.as_deref()).collect();
    sqlx::query!(
        r#"
        UPDATE external_identities ei SET
            groups = ARRAY(SELECT jsonb_array_elements_text(d.groups)),
            email = d.email, email_verified = d.verified,
            last_login_at = GREATEST(ei.last_login_at, d.login_at),
            connection_id = d.connection_id,
            connection_groups = ARRAY(SELECT jsonb_array_elements_text(d.connection_groups)),
            audience = d.audience
        FROM UNNEST($1::text[], $2::text[], $3::jsonb[], $4::text[], $5::bool[], $6::timestamptz[],
                    $7::text[], $8::jsonb[], $9::text[])
            AS d(provider, subject, groups, email, verified, login_at, connection_id,
                 connection_groups, audience)
        WHERE ei.provider = d.provider AND ei.subject = d.subject
        "#,
        &providers as &[&str],
        &subjects as &[&str],
        &groups,
        &emails as &[Option<&str>],
        &verified,
        &login_at,
        &connection_ids as &[Option<&str>],
        &connection_groups,
        &audiences as &[Option<&str>],
    )
    .execute(conn)
    .await
    .map(|_| ())
}

#[derive(Debug, Clone)]
pub struct DeviceSighting {
    pub user_id: Uuid,
    pub device_id: String,
    pub user_agent: Option<String>,
    pub seen_at: DateTime<Utc>,
}

/// Records devices with first / last seen. `devices` must not repeat a (user, device).
pub async fn upsert_devices(
    conn: &mut PgConnection,
    devices: &[DeviceSighting],
) -> Result<(), sqlx::Error> {
    if devices.is_empty() {
        return Ok(());
    }
    let users: Vec<Uuid> = devices.iter().map(|d| d.user_id).collect();
    let ids: Vec<&str> = devices.iter().map(|d| d.device_id.as_str()).collect();
    let agents: Vec<Option<&str>> = devices.iter().map(|d| d.user_agent.as_deref()).collect();
    let seen: Vec<DateTime<Utc>> = devices.iter().map(|d| d.seen_at).collect();
    sqlx::query!(
        r#"
        INSERT INTO devices (user_id, device_id, user_agent, first_seen_at, last_seen_at)
        SELECT u, d, a, s, s FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::timestamptz[]) AS x(u, d, a, s)
        ON CONFLICT (user_id, device_id) DO UPDATE SET
            user_agent = COALESCE(EXCLUDED.user_agent, devices.user_agent),
            first_seen_at = LEAST(devices.first_seen_at, EXCLUDED.first_seen_at),
            last_seen_at = GREATEST(devices.last_seen_at, EXCLUDED.last_seen_at)
        "#,
        &users,
        &ids as &[&str],
        &agents as &[Option<&str>],
        &seen,
    )
    .execute(conn)
    .await
    .map(|_| ())
}
