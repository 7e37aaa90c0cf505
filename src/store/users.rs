//! Known users: load (and lock) by identity, write back what the domain decided.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

pub use crate::domain::auth_sync::{DeviceSighting, EmailState, IdentityWrite};
use crate::domain::auth_sync::{IdentityClaims, KnownIdentity};
use crate::domain::identity::LinkTarget;
use crate::domain::{Clocks, UserRecord};
use crate::events::login::ConnectionKind;

/// Clocks as stored: `{"field": <microseconds since the epoch>}` (integers: cheap to write
/// and read on every login). An entry that is not one is dropped (that field has no clock).
pub fn clocks_from_json(value: serde_json::Value) -> Clocks {
    let serde_json::Value::Object(map) = value else {
        return Clocks::new();
    };
    map.into_iter()
        .filter_map(|(k, v)| Some((k, DateTime::from_timestamp_micros(v.as_i64()?)?)))
        .collect()
}

pub fn clocks_to_json(clocks: &Clocks) -> serde_json::Value {
    serde_json::Value::Object(
        clocks
            .iter()
            .map(|(k, t)| (k.clone(), t.timestamp_micros().into()))
            .collect(),
    )
}

fn kind_of(value: Option<&str>) -> Option<ConnectionKind> {
    value.and_then(ConnectionKind::parse)
}

/// The user of a locking read's row: both reads select the same user columns (their
/// row types differ, so a macro rather than a function).
macro_rules! user_record {
    ($r:expr) => {
        UserRecord {
            id: $r.id,
            email: $r.email,
            email_verified: $r.email_verified,
            email_owner: $r.email_provider.zip($r.email_subject),
            clocks: clocks_from_json($r.field_clocks),
            display_name: $r.display_name,
            auth_display_name: $r.auth_display_name,
            auth_picture_url: $r.auth_picture_url,
            given_name: $r.given_name,
            family_name: $r.family_name,
            locale: $r.locale,
            workflow_variants: $r.workflow_variants,
            lifecycle_state: $r.lifecycle_state,
            version: $r.version,
            profile_event_at: $r.profile_event_at,
            last_login_at: $r.last_login_at,
            login_count: $r.login_count,
            created_at: $r.created_at,
            modified_at: $r.modified_at,
        }
    };
}

/// Postgres advisory-lock keys for a batch's first logins: one per identity and per
/// address. Taken in sorted order, so two batches (on one replica or two) wanting the same
/// address queue behind each other instead of both signing up a user.
pub fn lock_keys<'a>(
    identities: impl IntoIterator<Item = &'a (String, String)>,
    addresses: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    let mut keys: Vec<String> = identities
        .into_iter()
        .map(|(p, s)| format!("authsync:identity:{p}\u{1f}{s}"))
        .chain(addresses.into_iter().map(|a| format!("authsync:email:{a}")))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Takes transaction-scoped advisory locks on `keys` (hashed to 64 bits), in hash order.
pub async fn lock(conn: &mut PgConnection, keys: &[String]) -> Result<(), sqlx::Error> {
    if keys.is_empty() {
        return Ok(());
    }
    sqlx::query!(
        r#"SELECT count(pg_advisory_xact_lock(k)) AS "n!" FROM (
               SELECT DISTINCT hashtextextended(x, 0) AS k FROM UNNEST($1::text[]) AS x ORDER BY 1
           ) s"#,
        keys
    )
    .fetch_one(conn)
    .await
    .map(|_| ())
}

/// Loads and locks the users of these identities, in user-id order (a fixed lock order is
/// what keeps concurrent batches and merges from deadlocking).
pub async fn lock_by_identities(
    conn: &mut PgConnection,
    keys: &[(String, String)],
) -> Result<(Vec<KnownIdentity>, HashMap<Uuid, UserRecord>), sqlx::Error> {
    let providers: Vec<&str> = keys.iter().map(|(p, _)| p.as_str()).collect();
    let subjects: Vec<&str> = keys.iter().map(|(_, s)| s.as_str()).collect();
    let rows = sqlx::query!(
        r#"
        SELECT ei.provider, ei.subject, ei.groups, ei.connection_id, ei.connection_kind,
               ei.connection_groups, ei.audience, ei.email AS identity_email,
               ei.email_verified AS identity_email_verified, ei.merged_from,
               ei.last_login_at AS identity_login_at,
               u.id, u.email, (ue.verified_at IS NOT NULL) AS "email_verified!",
               u.email_provider, u.email_subject, u.field_clocks,
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
    let mut identities = Vec::with_capacity(rows.len());
    let mut users = HashMap::new();
    for r in rows {
        identities.push(KnownIdentity {
            key: (r.provider, r.subject),
            user_id: r.id,
            claims: IdentityClaims {
                email: r.identity_email,
                email_verified: r.identity_email_verified,
                groups: r.groups,
                connection_id: r.connection_id,
                connection_kind: kind_of(r.connection_kind.as_deref()),
                connection_groups: r.connection_groups,
                audience: r.audience,
                // Kept in the user's clocks; `decide` reads them from there.
                clocks: Clocks::new(),
            },
            merged_from: r.merged_from,
            last_login_at: r.identity_login_at,
        });
        users.entry(r.id).or_insert(user_record!(r));
    }
    Ok((identities, users))
}

/// The identities of active users that currently assert one of these addresses (verified
/// or not), with the providers of each user; the users are loaded and locked.
pub async fn lock_link_targets(
    conn: &mut PgConnection,
    addresses: &[&str],
) -> Result<(HashMap<String, Vec<LinkTarget>>, HashMap<Uuid, UserRecord>), sqlx::Error> {
    let mut targets: HashMap<String, Vec<LinkTarget>> = HashMap::new();
    let mut users = HashMap::new();
    if addresses.is_empty() {
        return Ok((targets, users));
    }
    let rows = sqlx::query!(
        r#"
        SELECT ei.email AS "address!", ei.provider, ei.connection_id, ei.connection_kind,
               ei.email_verified AS identity_email_verified,
               ARRAY(SELECT DISTINCT o.provider FROM external_identities o WHERE o.user_id = u.id) AS "providers!",
               u.id, u.email, (ue.verified_at IS NOT NULL) AS "email_verified!",
               u.email_provider, u.email_subject, u.field_clocks,
               u.display_name, u.auth_display_name, u.auth_picture_url, u.given_name,
               u.family_name, u.locale, u.workflow_variants, u.lifecycle_state, u.version,
               u.profile_event_at, u.last_login_at, u.login_count, u.created_at, u.modified_at
        FROM external_identities ei
        JOIN users u ON u.id = ei.user_id AND u.lifecycle_state = 'active'
        LEFT JOIN user_emails ue ON ue.user_id = u.id AND ue.email = u.email
        WHERE ei.email = ANY($1)
        ORDER BY u.id, ei.provider, ei.subject
        FOR UPDATE OF u
        "#,
        addresses as &[&str],
    )
    .fetch_all(conn)
    .await?;
    for r in rows {
        targets.entry(r.address).or_default().push(LinkTarget {
            user_id: r.id,
            provider: r.provider,
            connection_id: r.connection_id,
            connection_kind: kind_of(r.connection_kind.as_deref()),
            email_verified: r.identity_email_verified,
            user_providers: r.providers,
        });
        users.entry(r.id).or_insert(user_record!(r));
    }
    Ok((targets, users))
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
    let owner_providers: Vec<Option<&str>> = users
        .iter()
        .map(|u| u.email_owner.as_ref().map(|o| o.0.as_str()))
        .collect();
    let owner_subjects: Vec<Option<&str>> = users
        .iter()
        .map(|u| u.email_owner.as_ref().map(|o| o.1.as_str()))
        .collect();
    let clocks: Vec<serde_json::Value> = users.iter().map(|u| clocks_to_json(&u.clocks)).collect();
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
            modified_at = d.modified_at, modified_by = CASE WHEN d.version <> u.version THEN d.id ELSE u.modified_by END,
            email_provider = d.email_provider, email_subject = d.email_subject,
            field_clocks = d.clocks
        FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                    $7::text[], $8::jsonb[], $9::int8[], $10::timestamptz[], $11::timestamptz[],
                    $12::int8[], $13::timestamptz[], $14::text[], $15::text[], $16::jsonb[])
            AS d(id, email, auth_display_name, auth_picture_url, given_name, family_name, locale,
                 variants, version, profile_event_at, last_login_at, login_count, modified_at,
                 email_provider, email_subject, clocks)
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
        &owner_providers as &[Option<&str>],
        &owner_subjects as &[Option<&str>],
        &clocks,
    )
    .execute(conn)
    .await
    .map(|_| ())
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

/// `identities` must not repeat a (provider, subject).
pub async fn update_identities(
    conn: &mut PgConnection,
    identities: &[IdentityWrite],
) -> Result<(), sqlx::Error> {
    if identities.is_empty() {
        return Ok(());
    }
    let providers: Vec<&str> = identities.iter().map(|i| i.provider.as_str()).collect();
    let subjects: Vec<&str> = identities.iter().map(|i| i.subject.as_str()).collect();
    let groups: Vec<serde_json::Value> = identities
        .iter()
        .map(|i| serde_json::json!(i.claims.groups))
        .collect();
    let emails: Vec<Option<&str>> = identities
        .iter()
        .map(|i| i.claims.email.as_deref())
        .collect();
    let verified: Vec<bool> = identities.iter().map(|i| i.claims.email_verified).collect();
    let login_at: Vec<DateTime<Utc>> = identities.iter().map(|i| i.last_login_at).collect();
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
    sqlx::query!(
        r#"
        UPDATE external_identities ei SET
            groups = ARRAY(SELECT jsonb_array_elements_text(d.groups)),
            email = d.email, email_verified = d.verified,
            last_login_at = GREATEST(ei.last_login_at, d.login_at),
            connection_id = d.connection_id, connection_kind = d.connection_kind,
            connection_groups = ARRAY(SELECT jsonb_array_elements_text(d.connection_groups)),
            audience = d.audience
        FROM UNNEST($1::text[], $2::text[], $3::jsonb[], $4::text[], $5::bool[], $6::timestamptz[],
                    $7::text[], $8::jsonb[], $9::text[], $10::text[])
            AS d(provider, subject, groups, email, verified, login_at, connection_id,
                 connection_groups, audience, connection_kind)
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
        &connection_kinds as &[Option<&str>],
    )
    .execute(conn)
    .await
    .map(|_| ())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_round_trip_as_microseconds_and_bad_entries_are_dropped() {
        let t = DateTime::from_timestamp_micros(1_780_000_000_123_456).expect("time");
        let clocks: Clocks = [("email".to_string(), t), ("p\u{1f}s\u{1f}groups".into(), t)].into();
        let json = clocks_to_json(&clocks);
        assert_eq!(json["email"], serde_json::json!(1_780_000_000_123_456i64));
        assert_eq!(clocks_from_json(json), clocks);
        let mixed = serde_json::json!({"email": 1_780_000_000_123_456i64, "locale": "soon"});
        assert_eq!(clocks_from_json(mixed).len(), 1);
        assert!(clocks_from_json(serde_json::json!([1, 2])).is_empty());
    }
}
