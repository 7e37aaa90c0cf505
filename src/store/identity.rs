//! Identity claims: account-link candidates, roles, attributes and custom UPNs (batched).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

pub use crate::domain::auth_sync::ClaimsState;

/// Loads the claims state of these users (users with none are absent).
pub async fn load_claims(
    conn: &mut PgConnection,
    users: &[Uuid],
) -> Result<HashMap<Uuid, ClaimsState>, sqlx::Error> {
    let mut out: HashMap<Uuid, ClaimsState> = HashMap::new();
    if users.is_empty() {
        return Ok(out);
    }
    // One round trip: the three tables as tagged rows.
    let rows = sqlx::query!(
        r#"
        SELECT user_id AS "user_id!", 'role' AS "kind!", role AS "k!", organization_id::text AS "v!",
               granted_by AS by
          FROM user_roles WHERE user_id = ANY($1)
        UNION ALL
        SELECT user_id, 'attribute', key, value, NULL FROM user_attributes WHERE user_id = ANY($1)
        UNION ALL
        SELECT user_id, 'upn', client_key, upn, NULL FROM custom_upns WHERE user_id = ANY($1)
        "#,
        users
    )
    .fetch_all(conn)
    .await?;
    for r in rows {
        let state = out.entry(r.user_id).or_default();
        match r.kind.as_str() {
            "role" => {
                let org = Uuid::parse_str(&r.v).unwrap_or_default();
                state
                    .roles
                    .entry((r.k, org))
                    .or_default()
                    .insert(r.by.unwrap_or_default());
            }
            "attribute" => {
                state.attributes.insert(r.k, r.v);
            }
            _ => {
                state.upns.insert(r.k, r.v);
            }
        }
    }
    Ok(out)
}

/// Writes the difference between `before` and `after` for each user: role grants and
/// revocations, attribute upserts and deletions, UPN upserts (a UPN is never removed by a login).
pub async fn write_claims(
    conn: &mut PgConnection,
    changes: &[(Uuid, ClaimsState, ClaimsState)],
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    // (user, role, organization, granted_by), column by column for UNNEST.
    type Grants<'a> = (Vec<Uuid>, Vec<&'a str>, Vec<Uuid>, Vec<&'a str>);
    let mut grant: Grants<'_> = Default::default();
    let mut revoke_by: Vec<&str> = Vec::new();
    let mut revoke: (Vec<Uuid>, Vec<&str>, Vec<Uuid>) = Default::default();
    let mut set_attr: (Vec<Uuid>, Vec<&str>, Vec<&str>) = Default::default();
    let mut del_attr: (Vec<Uuid>, Vec<&str>) = Default::default();
    let mut set_upn: (Vec<Uuid>, Vec<&str>, Vec<&str>) = Default::default();
    for (user, before, after) in changes {
        for ((role, org), grantors) in &after.roles {
            let had = before.roles.get(&(role.clone(), *org));
            for by in grantors {
                if !had.is_some_and(|h| h.contains(by)) {
                    grant.0.push(*user);
                    grant.1.push(role);
                    grant.2.push(*org);
                    grant.3.push(by);
                }
            }
        }
        for ((role, org), grantors) in &before.roles {
            let has = after.roles.get(&(role.clone(), *org));
            for by in grantors {
                if !has.is_some_and(|h| h.contains(by)) {
                    revoke.0.push(*user);
                    revoke.1.push(role);
                    revoke.2.push(*org);
                    revoke_by.push(by);
                }
            }
        }
        for (k, v) in &after.attributes {
            if before.attributes.get(k) != Some(v) {
                set_attr.0.push(*user);
                set_attr.1.push(k);
                set_attr.2.push(v);
            }
        }
        for k in before.attributes.keys() {
            if !after.attributes.contains_key(k) {
                del_attr.0.push(*user);
                del_attr.1.push(k);
            }
        }
        for (k, v) in &after.upns {
            if before.upns.get(k) != Some(v) {
                set_upn.0.push(*user);
                set_upn.1.push(k);
                set_upn.2.push(v);
            }
        }
    }
    if !grant.0.is_empty() {
        sqlx::query!(
            r#"INSERT INTO user_roles (user_id, role, organization_id, granted_at, granted_by)
               SELECT u, r, o, $4, b FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $5::text[]) AS x(u, r, o, b)
               ON CONFLICT DO NOTHING"#,
            &grant.0,
            &grant.1 as &[&str],
            &grant.2,
            now,
            &grant.3 as &[&str],
        )
        .execute(&mut *conn)
        .await?;
    }
    if !revoke.0.is_empty() {
        sqlx::query!(
            r#"DELETE FROM user_roles ur
               USING UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::text[]) AS x(u, r, o, b)
               WHERE ur.user_id = x.u AND ur.role = x.r AND ur.organization_id = x.o
                 AND ur.granted_by = x.b"#,
            &revoke.0,
            &revoke.1 as &[&str],
            &revoke.2,
            &revoke_by as &[&str],
        )
        .execute(&mut *conn)
        .await?;
    }
    if !set_attr.0.is_empty() {
        sqlx::query!(
            r#"INSERT INTO user_attributes (user_id, key, value, updated_at)
               SELECT u, k, v, $4 FROM UNNEST($1::uuid[], $2::text[], $3::text[]) AS x(u, k, v)
               ON CONFLICT (user_id, key) DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at"#,
            &set_attr.0,
            &set_attr.1 as &[&str],
            &set_attr.2 as &[&str],
            now,
        )
        .execute(&mut *conn)
        .await?;
    }
    if !del_attr.0.is_empty() {
        sqlx::query!(
            r#"DELETE FROM user_attributes a USING UNNEST($1::uuid[], $2::text[]) AS x(u, k)
               WHERE a.user_id = x.u AND a.key = x.k"#,
            &del_attr.0,
            &del_attr.1 as &[&str],
        )
        .execute(&mut *conn)
        .await?;
    }
    if !set_upn.0.is_empty() {
        sqlx::query!(
            r#"INSERT INTO custom_upns (user_id, client_key, upn, updated_at)
               SELECT u, k, v, $4 FROM UNNEST($1::uuid[], $2::text[], $3::text[]) AS x(u, k, v)
               ON CONFLICT (user_id, client_key) DO UPDATE SET upn = EXCLUDED.upn, updated_at = EXCLUDED.updated_at"#,
            &set_upn.0,
            &set_upn.1 as &[&str],
            &set_upn.2 as &[&str],
            now,
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
