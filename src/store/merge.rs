//! Account merge: re-point everything the old user owns to the new user, set-based, and
//! report exactly what changed (the merge reference's response shape).

use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::merge::MergeParty;

/// Locks both users in id order (the same order logins lock in: no deadlocks).
pub async fn lock_parties(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<Vec<MergeParty>, sqlx::Error> {
    let rows = sqlx::query!(
        "SELECT id, lifecycle_state, merged_into FROM users WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        ids
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| MergeParty {
            id: r.id,
            lifecycle_state: r.lifecycle_state,
            merged_into: r.merged_into,
        })
        .collect())
}

/// The `merged_into` chain from `start` (bounded; a longer chain is a data error).
pub async fn merged_chain(conn: &mut PgConnection, start: Uuid) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"
        WITH RECURSIVE chain(id, next, depth) AS (
            SELECT id, merged_into, 0 FROM users WHERE id = $1
            UNION ALL
            SELECT u.id, u.merged_into, c.depth + 1 FROM users u JOIN chain c ON u.id = c.next
            WHERE c.depth < 64
        )
        SELECT id AS "id!" FROM chain WHERE depth > 0
        "#,
        start
    )
    .fetch_all(conn)
    .await
}

#[derive(Debug, Default, Serialize)]
pub struct AssetsReport {
    pub assets: Vec<Uuid>,
    pub recent: Vec<Uuid>,
    pub references: Vec<Uuid>,
}

#[derive(Debug, Serialize)]
pub struct CollectionPath {
    pub collection_id: Uuid,
    pub old_path: String,
    pub new_path: String,
}

#[derive(Debug, Serialize)]
pub struct CollectionChange {
    pub id: Uuid,
    pub created_by: Option<Uuid>,
    pub last_asset_by: Option<Uuid>,
    pub last_chat_by: Option<Uuid>,
}

#[derive(Debug, Serialize)]
pub struct JoinChange {
    pub join_id: Uuid,
    pub created_by: Option<Uuid>,
    pub modified_by: Option<Uuid>,
    pub deleted_by: Option<Uuid>,
}

#[derive(Debug, Default, Serialize)]
pub struct JoinTables {
    pub assets_to_col: Vec<JoinChange>,
    pub threads_to_col: Vec<JoinChange>,
}

#[derive(Debug, Serialize)]
pub struct PermissionDeleted {
    pub action: String,
    pub collection_id: Uuid,
    pub user_id: Uuid,
}

#[derive(Debug, Serialize)]
pub struct PermissionUpdated {
    pub action: String,
    pub collection_id: Uuid,
    pub created_by: Option<Uuid>,
    pub user_id: Uuid,
}

#[derive(Debug, Default, Serialize)]
pub struct Permissions {
    pub deleted: Vec<PermissionDeleted>,
    pub updated: Vec<PermissionUpdated>,
}

#[derive(Debug, Serialize)]
pub struct TeamChange {
    pub id: Uuid,
    pub created_by: Option<Uuid>,
    pub modified_by: Option<Uuid>,
}

#[derive(Debug, Default, Serialize)]
pub struct ThreadsReport {
    pub recent: Vec<Uuid>,
    pub threads: Vec<Uuid>,
}

/// A token is reported by fingerprint (UUIDv5 of its value), never by value.
#[derive(Debug, Serialize)]
pub struct TokenChange {
    pub token: Uuid,
}

#[derive(Debug, Serialize)]
pub struct WorkingContextChange {
    pub organization_id: Uuid,
    pub tenant_id: Uuid,
    pub user_id: Uuid,
}

#[derive(Debug, Serialize)]
pub struct MembershipChange {
    pub organization_id: Uuid,
    pub role: String,
    pub user_id: Uuid,
}

#[derive(Debug, Default, Serialize)]
pub struct Memberships {
    pub deleted: Vec<MembershipChange>,
    pub updated: Vec<MembershipChange>,
}

#[derive(Debug, Serialize)]
pub struct MovedIdentity {
    pub provider: String,
    pub subject: String,
}

/// What a merge changed: the merge reference's `data`, plus what it moved of identity
/// (identities, emails, memberships), which the reference does not list.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MergeReport {
    pub assets: AssetsReport,
    pub collection_paths: Vec<CollectionPath>,
    pub collections: Vec<CollectionChange>,
    pub join_tables: JoinTables,
    pub permissions: Permissions,
    pub teams: Vec<TeamChange>,
    pub threads: ThreadsReport,
    pub tokens: Vec<TokenChange>,
    pub working_context: Vec<WorkingContextChange>,
    pub memberships: Memberships,
    pub identities: Vec<MovedIdentity>,
    pub emails: Vec<String>,
    /// Roles, devices, attributes and custom UPNs of the old user: each row as it was,
    /// `moved` to the survivor or `dropped` (the survivor already had that key).
    pub roles: ClaimRows,
    pub devices: ClaimRows,
    pub attributes: ClaimRows,
    pub upns: ClaimRows,
}

/// Rows of one per-user table a merge moved or dropped, as they were (for the audit).
#[derive(Debug, Default, Serialize)]
pub struct ClaimRows {
    pub moved: Vec<serde_json::Value>,
    pub dropped: Vec<serde_json::Value>,
}

impl ClaimRows {
    fn len(&self) -> usize {
        self.moved.len() + self.dropped.len()
    }
}

impl MergeReport {
    /// Rows changed in all.
    pub fn total(&self) -> usize {
        self.assets.assets.len()
            + self.assets.recent.len()
            + self.assets.references.len()
            + self.collection_paths.len()
            + self.collections.len()
            + self.join_tables.assets_to_col.len()
            + self.join_tables.threads_to_col.len()
            + self.permissions.deleted.len()
            + self.permissions.updated.len()
            + self.teams.len()
            + self.threads.recent.len()
            + self.threads.threads.len()
            + self.tokens.len()
            + self.working_context.len()
            + self.memberships.deleted.len()
            + self.memberships.updated.len()
            + self.identities.len()
            + self.emails.len()
            + self.roles.len()
            + self.devices.len()
            + self.attributes.len()
            + self.upns.len()
    }
}

fn path_text(path: &[Uuid]) -> String {
    path.iter()
        .map(Uuid::to_string)
        .collect::<Vec<_>>()
        .join("/")
}

/// Moves everything `old` owns to `new`. Both users must be locked by the caller.
/// `permission_order` / `role_order` list actions / roles weakest first (the domain's
/// ranking): on a duplicate the stronger one survives.
pub async fn transfer(
    conn: &mut PgConnection,
    old: Uuid,
    new: Uuid,
    permission_order: &[&str],
    role_order: &[&str],
) -> Result<MergeReport, sqlx::Error> {
    let mut report = MergeReport::default();

    // The old personal tree moves under the survivor's personal root (paths rewritten,
    // personal / favorites become folders, organization follows the survivor).
    let target = sqlx::query!(
        r#"SELECT c.id, wc.organization_id, wc.tenant_id
           FROM collections c JOIN working_contexts wc ON wc.user_id = $1
           WHERE c.created_by = $1 AND c.kind = 'personal' AND cardinality(c.path) = 1
           LIMIT 1"#,
        new
    )
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(target) = target {
        let moved = sqlx::query!(
            r#"
            WITH roots AS (
                SELECT id FROM collections
                WHERE created_by = $1 AND kind = 'personal' AND cardinality(path) = 1
            ), tree AS (
                SELECT c.id, c.path FROM collections c JOIN roots r ON c.path[1] = r.id
                FOR UPDATE OF c
            )
            UPDATE collections c SET
                path = $2::uuid || c.path,
                kind = CASE WHEN c.kind IN ('personal', 'favorites') THEN 'folder' ELSE c.kind END,
                organization_id = $3, tenant_id = $4, version = c.version + 1
            FROM tree WHERE c.id = tree.id
            RETURNING c.id, tree.path AS old_path, c.path AS new_path
            "#,
            old,
            target.id,
            target.organization_id,
            target.tenant_id
        )
        .fetch_all(&mut *conn)
        .await?;
        report.collection_paths = moved
            .into_iter()
            .map(|r| CollectionPath {
                collection_id: r.id,
                old_path: path_text(&r.old_path),
                new_path: path_text(&r.new_path),
            })
            .collect();
    }

    report.collections = sqlx::query!(
        r#"UPDATE collections SET
               created_by = CASE WHEN created_by = $1 THEN $2 ELSE created_by END,
               last_asset_by = CASE WHEN last_asset_by = $1 THEN $2 ELSE last_asset_by END,
               last_chat_by = CASE WHEN last_chat_by = $1 THEN $2 ELSE last_chat_by END
           WHERE created_by = $1 OR last_asset_by = $1 OR last_chat_by = $1
           RETURNING id, created_by, last_asset_by, last_chat_by"#,
        old,
        new
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| CollectionChange {
        id: r.id,
        created_by: r.created_by,
        last_asset_by: r.last_asset_by,
        last_chat_by: r.last_chat_by,
    })
    .collect();

    report.assets.assets = sqlx::query_scalar!(
        "UPDATE assets SET owner_id = $2 WHERE owner_id = $1 RETURNING id",
        old,
        new
    )
    .fetch_all(&mut *conn)
    .await?;
    report.assets.references = sqlx::query_scalar!(
        "UPDATE asset_references SET created_by = $2 WHERE created_by = $1 RETURNING id",
        old,
        new
    )
    .fetch_all(&mut *conn)
    .await?;
    report.assets.recent = sqlx::query_scalar!(
        r#"WITH moved AS (DELETE FROM recent_assets WHERE user_id = $1 RETURNING asset_id, viewed_at)
           INSERT INTO recent_assets (user_id, asset_id, viewed_at)
           SELECT $2, asset_id, viewed_at FROM moved
           ON CONFLICT (user_id, asset_id) DO UPDATE
               SET viewed_at = GREATEST(recent_assets.viewed_at, EXCLUDED.viewed_at)
           RETURNING asset_id"#,
        old,
        new
    )
    .fetch_all(&mut *conn)
    .await?;
    report.threads.threads = sqlx::query_scalar!(
        "UPDATE threads SET owner_id = $2 WHERE owner_id = $1 RETURNING id",
        old,
        new
    )
    .fetch_all(&mut *conn)
    .await?;
    report.threads.recent = sqlx::query_scalar!(
        r#"WITH moved AS (DELETE FROM recent_threads WHERE user_id = $1 RETURNING thread_id, viewed_at)
           INSERT INTO recent_threads (user_id, thread_id, viewed_at)
           SELECT $2, thread_id, viewed_at FROM moved
           ON CONFLICT (user_id, thread_id) DO UPDATE
               SET viewed_at = GREATEST(recent_threads.viewed_at, EXCLUDED.viewed_at)
           RETURNING thread_id"#,
        old,
        new
    )
    .fetch_all(&mut *conn)
    .await?;

    report.join_tables.assets_to_col = sqlx::query!(
        r#"UPDATE assets_to_collections SET
               created_by = CASE WHEN created_by = $1 THEN $2 ELSE created_by END,
               modified_by = CASE WHEN modified_by = $1 THEN $2 ELSE modified_by END,
               deleted_by = CASE WHEN deleted_by = $1 THEN $2 ELSE deleted_by END
           WHERE created_by = $1 OR modified_by = $1 OR deleted_by = $1
           RETURNING id, created_by, modified_by, deleted_by"#,
        old,
        new
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| JoinChange {
        join_id: r.id,
        created_by: r.created_by,
        modified_by: r.modified_by,
        deleted_by: r.deleted_by,
    })
    .collect();
    report.join_tables.threads_to_col = sqlx::query!(
        r#"UPDATE threads_to_collections SET
               created_by = CASE WHEN created_by = $1 THEN $2 ELSE created_by END,
               modified_by = CASE WHEN modified_by = $1 THEN $2 ELSE modified_by END,
               deleted_by = CASE WHEN deleted_by = $1 THEN $2 ELSE deleted_by END
           WHERE created_by = $1 OR modified_by = $1 OR deleted_by = $1
           RETURNING id, created_by, modified_by, deleted_by"#,
        old,
        new
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| JoinChange {
        join_id: r.id,
        created_by: r.created_by,
        modified_by: r.modified_by,
        deleted_by: r.deleted_by,
    })
    .collect();

    // Permissions: where both hold one on a collection, the stronger survives on the new
    // user and the old row is deleted; the rest are re-pointed.
    report.permissions.deleted = sqlx::query!(
        r#"
        WITH pairs AS (
            SELECT o.collection_id, o.action AS old_action
            FROM collection_permissions o
            JOIN collection_permissions n ON n.collection_id = o.collection_id AND n.user_id = $2
            WHERE o.user_id = $1
        ), strengthened AS (
            UPDATE collection_permissions p SET action = pairs.old_action
            FROM pairs
            WHERE p.user_id = $2 AND p.collection_id = pairs.collection_id
              AND array_position($3::text[], pairs.old_action) > array_position($3::text[], p.action)
        )
        DELETE FROM collection_permissions p USING pairs
        WHERE p.user_id = $1 AND p.collection_id = pairs.collection_id
        RETURNING p.action, p.collection_id, p.user_id
        "#,
        old,
        new,
        permission_order as &[&str]
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| PermissionDeleted {
        action: r.action,
        collection_id: r.collection_id,
        user_id: r.user_id,
    })
    .collect();
    report.permissions.updated = sqlx::query!(
        r#"UPDATE collection_permissions SET
               user_id = CASE WHEN user_id = $1 THEN $2 ELSE user_id END,
               created_by = CASE WHEN created_by = $1 THEN $2 ELSE created_by END
           WHERE user_id = $1 OR created_by = $1
           RETURNING action, collection_id, created_by, user_id"#,
        old,
        new
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| PermissionUpdated {
        action: r.action,
        collection_id: r.collection_id,
        created_by: r.created_by,
        user_id: r.user_id,
    })
    .collect();

    report.memberships.deleted = sqlx::query!(
        r#"
        WITH pairs AS (
            SELECT o.organization_id, o.role AS old_role
            FROM organization_members o
            JOIN organization_members n ON n.organization_id = o.organization_id AND n.user_id = $2
            WHERE o.user_id = $1
        ), strengthened AS (
            UPDATE organization_members m SET role = pairs.old_role
            FROM pairs
            WHERE m.user_id = $2 AND m.organization_id = pairs.organization_id
              AND array_position($3::text[], pairs.old_role) > array_position($3::text[], m.role)
        )
        DELETE FROM organization_members m USING pairs
        WHERE m.user_id = $1 AND m.organization_id = pairs.organization_id
        RETURNING m.organization_id, m.role, m.user_id
        "#,
        old,
        new,
        role_order as &[&str]
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| MembershipChange {
        organization_id: r.organization_id,
        role: r.role,
        user_id: r.user_id,
    })
    .collect();
    report.memberships.updated = sqlx::query!(
        r#"UPDATE organization_members SET user_id = $2 WHERE user_id = $1
           RETURNING organization_id, role, user_id"#,
        old,
        new
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| MembershipChange {
        organization_id: r.organization_id,
        role: r.role,
        user_id: r.user_id,
    })
    .collect();

    report.teams = sqlx::query!(
        r#"UPDATE teams SET
               created_by = CASE WHEN created_by = $1 THEN $2 ELSE created_by END,
               modified_by = CASE WHEN modified_by = $1 THEN $2 ELSE modified_by END
           WHERE created_by = $1 OR modified_by = $1
           RETURNING id, created_by, modified_by"#,
        old,
        new
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| TeamChange {
        id: r.id,
        created_by: r.created_by,
        modified_by: r.modified_by,
    })
    .collect();
    // The old user's sessions are revoked, not re-pointed: an old session must not act
    // as the survivor. Reported (and announced) by fingerprint only.
    report.tokens = sqlx::query_scalar!(
        "DELETE FROM access_tokens WHERE user_id = $1 RETURNING token",
        old
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|t| TokenChange {
        token: Uuid::new_v5(&crate::domain::ids::NAMESPACE, t.as_bytes()),
    })
    .collect();
    report.working_context = sqlx::query!(
        "DELETE FROM working_contexts WHERE user_id = $1 RETURNING organization_id, tenant_id, user_id",
        old
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| WorkingContextChange {
        organization_id: r.organization_id,
        tenant_id: r.tenant_id,
        user_id: r.user_id,
    })
    .collect();

    // Identity: logins of the old identities now land on the survivor (and say so).
    report.identities = sqlx::query!(
        r#"UPDATE external_identities SET user_id = $2, merged_from = $1 WHERE user_id = $1
           RETURNING provider, subject"#,
        old,
        new
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| MovedIdentity {
        provider: r.provider,
        subject: r.subject,
    })
    .collect();
    report.emails = sqlx::query_scalar!(
        r#"WITH moved AS (
               DELETE FROM user_emails WHERE user_id = $1
               RETURNING email, email_type, verified_at, created_at)
           INSERT INTO user_emails (user_id, email, email_type, verified_at, created_at)
           SELECT $2, email, email_type, verified_at, created_at FROM moved
           ON CONFLICT (user_id, email) DO UPDATE SET verified_at =
               COALESCE(LEAST(user_emails.verified_at, EXCLUDED.verified_at),
                        user_emails.verified_at, EXCLUDED.verified_at)
           RETURNING email"#,
        old,
        new
    )
    .fetch_all(&mut *conn)
    .await?;
    // Roles, devices, attributes and UPNs move unless the survivor has the same key; every
    // row is reported as it was, moved or dropped, so the audit can explain and reverse it.
    let rows = sqlx::query!(
        r#"WITH r AS (DELETE FROM user_roles WHERE user_id = $1
                      RETURNING role, organization_id, granted_at, granted_by),
                d AS (DELETE FROM devices WHERE user_id = $1
                      RETURNING device_id, user_agent, first_seen_at, last_seen_at),
                a AS (DELETE FROM user_attributes WHERE user_id = $1 RETURNING key, value, updated_at),
                u AS (DELETE FROM custom_upns WHERE user_id = $1 RETURNING client_key, upn, updated_at),
                ri AS (INSERT INTO user_roles (user_id, role, organization_id, granted_at, granted_by)
                       SELECT $2, role, organization_id, granted_at, granted_by FROM r
                       ON CONFLICT DO NOTHING RETURNING role, organization_id, granted_by),
                di AS (INSERT INTO devices (user_id, device_id, user_agent, first_seen_at, last_seen_at)
                       SELECT $2, device_id, user_agent, first_seen_at, last_seen_at FROM d
                       ON CONFLICT DO NOTHING RETURNING device_id),
                ai AS (INSERT INTO user_attributes (user_id, key, value, updated_at)
                       SELECT $2, key, value, updated_at FROM a ON CONFLICT DO NOTHING RETURNING key),
                ui AS (INSERT INTO custom_upns (user_id, client_key, upn, updated_at)
                       SELECT $2, client_key, upn, updated_at FROM u
                       ON CONFLICT DO NOTHING RETURNING client_key)
           SELECT 'roles' AS "kind!", jsonb_build_object('role', r.role, 'organizationId', r.organization_id,
                      'grantedAt', r.granted_at, 'grantedBy', r.granted_by) AS "row!",
                  (ri.role IS NOT NULL) AS "moved!"
             FROM r LEFT JOIN ri USING (role, organization_id, granted_by)
           UNION ALL
           SELECT 'devices', jsonb_build_object('deviceId', d.device_id, 'userAgent', d.user_agent,
                      'firstSeenAt', d.first_seen_at, 'lastSeenAt', d.last_seen_at),
                  di.device_id IS NOT NULL
             FROM d LEFT JOIN di USING (device_id)
           UNION ALL
           SELECT 'attributes', jsonb_build_object('key', a.key, 'value', a.value, 'updatedAt', a.updated_at),
                  ai.key IS NOT NULL
             FROM a LEFT JOIN ai USING (key)
           UNION ALL
           SELECT 'upns', jsonb_build_object('clientKey', u.client_key, 'upn', u.upn, 'updatedAt', u.updated_at),
                  ui.client_key IS NOT NULL
             FROM u LEFT JOIN ui USING (client_key)"#,
        old,
        new
    )
    .fetch_all(&mut *conn)
    .await?;
    for r in rows {
        let target = match r.kind.as_str() {
            "roles" => &mut report.roles,
            "devices" => &mut report.devices,
            "attributes" => &mut report.attributes,
            _ => &mut report.upns,
        };
        if r.moved {
            target.moved.push(r.row);
        } else {
            target.dropped.push(r.row);
        }
    }

    // The moved identities' claim clocks (kept in the user row, keys holding U+001F) go
    // with them, so an old event for a moved identity stays old on the survivor.
    sqlx::query!(
        r#"UPDATE users s SET field_clocks = s.field_clocks || COALESCE(
               (SELECT jsonb_object_agg(c.key, c.value) FROM users o, jsonb_each(o.field_clocks) c
                WHERE o.id = $1 AND strpos(c.key, chr(31)) > 0), '{}'::jsonb)
           WHERE s.id = $2"#,
        old,
        new
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        r#"UPDATE users SET
               lifecycle_state = CASE WHEN id = $1 THEN 'merged' ELSE lifecycle_state END,
               merged_into = CASE WHEN id = $1 THEN $2 ELSE merged_into END,
               version = version + 1, modified_at = now()
           WHERE id IN ($1, $2)"#,
        old,
        new
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        r#"INSERT INTO maintenance_activities (user_id, activity)
           VALUES ($1, 'merged_into:' || $2::uuid::text), ($2, 'merged_from:' || $1::uuid::text)"#,
        old,
        new
    )
    .execute(&mut *conn)
    .await?;
    Ok(report)
}

/// The audit row: enough to explain (and reverse) the merge later.
pub async fn record(
    conn: &mut PgConnection,
    id: Uuid,
    old: Uuid,
    new: Uuid,
    reason: &str,
    requested_by: Option<&str>,
    report: &serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        r#"INSERT INTO merges (id, old_user_id, new_user_id, reason, requested_by, report)
           VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING"#,
        id,
        old,
        new,
        reason,
        requested_by,
        report
    )
    .execute(conn)
    .await
    .map(|_| ())
}

/// A merge waiting for its users (see the `merge_waits` table).
#[derive(Debug, Clone)]
pub struct Waiting {
    pub id: i64,
    pub event_id: String,
    pub message_key: Option<Vec<u8>>,
    pub topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    pub payload: Option<Vec<u8>>,
    pub header_bytes: Vec<u8>,
    pub first_seen_at: chrono::DateTime<chrono::Utc>,
    pub attempts: i32,
}

/// Whether a merge with this message key is waiting (a later one must wait behind it).
pub async fn key_waiting(
    conn: &mut PgConnection,
    group: &str,
    key: Option<&[u8]>,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM merge_waits
                          WHERE consumer_group = $1 AND message_key IS NOT DISTINCT FROM $2) AS "w!""#,
        group,
        key
    )
    .fetch_one(conn)
    .await
}

/// Puts a merge in the waiting room (once per event id).
#[allow(clippy::too_many_arguments)]
pub async fn wait(
    conn: &mut PgConnection,
    group: &str,
    event_id: &str,
    key: Option<&[u8]>,
    topic: &str,
    partition: i32,
    offset: i64,
    payload: Option<&[u8]>,
    header_bytes: &[u8],
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        r#"INSERT INTO merge_waits (consumer_group, event_id, message_key, topic, kafka_partition,
                                    kafka_offset, payload, header_bytes, next_attempt_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now() + interval '200 milliseconds')
           ON CONFLICT (consumer_group, event_id) DO NOTHING"#,
        group,
        event_id,
        key,
        topic,
        partition,
        offset,
        payload,
        header_bytes
    )
    .execute(conn)
    .await
    .map(|_| ())
}

/// The oldest waiting merge of each key whose next attempt is due, locked (other
/// replicas skip them).
pub async fn due_waits(
    conn: &mut PgConnection,
    group: &str,
    limit: i64,
) -> Result<Vec<Waiting>, sqlx::Error> {
    sqlx::query_as!(
        Waiting,
        r#"SELECT w.id, w.event_id, w.message_key, w.topic, w.kafka_partition, w.kafka_offset,
                  w.payload, w.header_bytes, w.first_seen_at, w.attempts
           FROM merge_waits w
           WHERE w.consumer_group = $1 AND w.next_attempt_at <= now()
             AND NOT EXISTS (SELECT 1 FROM merge_waits e
                             WHERE e.consumer_group = w.consumer_group
                               AND e.message_key IS NOT DISTINCT FROM w.message_key
                               AND e.id < w.id)
           ORDER BY w.id
           LIMIT $2
           FOR UPDATE SKIP LOCKED"#,
        group,
        limit
    )
    .fetch_all(conn)
    .await
}

pub async fn reschedule(
    conn: &mut PgConnection,
    id: i64,
    delay_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        r#"UPDATE merge_waits SET attempts = attempts + 1,
                  next_attempt_at = now() + make_interval(secs => $2::int8 / 1000.0)
           WHERE id = $1"#,
        id,
        delay_ms
    )
    .execute(conn)
    .await
    .map(|_| ())
}

pub async fn done_waiting(conn: &mut PgConnection, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query!("DELETE FROM merge_waits WHERE id = $1", id)
        .execute(conn)
        .await
        .map(|_| ())
}

/// How many merges wait, and since when the oldest.
pub async fn waiting_summary(
    pool: &sqlx::PgPool,
) -> Result<(i64, Option<chrono::DateTime<chrono::Utc>>), sqlx::Error> {
    let r =
        sqlx::query!(r#"SELECT count(*) AS "n!", min(first_seen_at) AS oldest FROM merge_waits"#)
            .fetch_one(pool)
            .await?;
    Ok((r.n, r.oldest))
}
