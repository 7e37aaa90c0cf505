//! The inbox: one row per (consumer group, input event). Claiming is the de-duplication.

use sqlx::PgConnection;

/// One input message to claim.
#[derive(Clone, Debug)]
pub struct Claim<'a> {
    pub event_id: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// `applied` or `dead_lettered`.
    pub outcome: &'static str,
}

/// Claims every message not handled before and returns the claimed event ids.
///
/// A row that exists already means the event was handled: it is not returned (a duplicate),
/// unless it was dead-lettered, in which case it may be claimed again (a redrive). A
/// concurrent transaction claiming the same id makes this wait for it, so two consumers
/// never both apply one event. `claims` must not repeat an event id.
pub async fn claim(
    conn: &mut PgConnection,
    group: &str,
    claims: &[Claim<'_>],
) -> Result<Vec<String>, sqlx::Error> {
    let ids: Vec<&str> = claims.iter().map(|c| c.event_id).collect();
    let topics: Vec<&str> = claims.iter().map(|c| c.topic).collect();
    let partitions: Vec<i32> = claims.iter().map(|c| c.partition).collect();
    let offsets: Vec<i64> = claims.iter().map(|c| c.offset).collect();
    let outcomes: Vec<&str> = claims.iter().map(|c| c.outcome).collect();
    sqlx::query_scalar!(
        r#"
        INSERT INTO inbox (consumer_group, event_id, topic, kafka_partition, kafka_offset, outcome)
        SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::int4[], $5::int8[], $6::text[])
        ON CONFLICT (consumer_group, event_id) DO UPDATE
            SET outcome = EXCLUDED.outcome, topic = EXCLUDED.topic,
                kafka_partition = EXCLUDED.kafka_partition, kafka_offset = EXCLUDED.kafka_offset,
                processed_at = now()
            WHERE inbox.outcome = 'dead_lettered'
        RETURNING event_id
        "#,
        group,
        &ids as &[&str],
        &topics as &[&str],
        &partitions,
        &offsets,
        &outcomes as &[&str],
    )
    .fetch_all(conn)
    .await
}

/// Which of `ids` were handled for good (applied, or refused by the step) by `group`: what
/// a claim would skip. Dead-lettered rows are not among them (a replay claims them again).
/// Reads only: no row is locked.
pub async fn handled(
    conn: &mut PgConnection,
    group: &str,
    ids: &[&str],
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"
        SELECT event_id FROM inbox
        WHERE consumer_group = $1 AND event_id = ANY($2::text[]) AND outcome <> 'dead_lettered'
        "#,
        group,
        ids as &[&str],
    )
    .fetch_all(conn)
    .await
}

/// Records that a claimed event ended in the dead-letter topic after all.
pub async fn mark_dead_lettered(
    conn: &mut PgConnection,
    group: &str,
    event_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE inbox SET outcome = 'dead_lettered' WHERE consumer_group = $1 AND event_id = $2",
        group,
        event_id
    )
    .execute(conn)
    .await
    .map(|_| ())
}

/// Forgets the inbox rows of a replayed range (`authsync replay --reprocess`): per
/// partition, every row at an offset in `from..until`. Returns how many.
pub async fn delete_positions(
    pool: &sqlx::PgPool,
    group: &str,
    topic: &str,
    partitions: &[i32],
    from: &[i64],
    until: &[i64],
) -> Result<u64, sqlx::Error> {
    sqlx::query!(
        r#"DELETE FROM inbox i USING UNNEST($3::int4[], $4::int8[], $5::int8[]) AS r(p, o, e)
           WHERE i.consumer_group = $1 AND i.topic = $2 AND i.kafka_partition = r.p
             AND i.kafka_offset >= r.o AND i.kafka_offset < r.e"#,
        group,
        topic,
        partitions,
        from,
        until
    )
    .execute(pool)
    .await
    .map(|r| r.rows_affected())
}

/// A forgotten inbox row's key and position.
pub struct ForgottenPosition {
    pub event_id: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Forgets the group's rows keyed by their Kafka position (messages that had no usable
/// event id) and returns them. For `authsync dev` only: its embedded broker starts empty on
/// every run, so the same positions come back holding new messages, which would pass for
/// duplicates.
pub async fn forget_positions(
    pool: &sqlx::PgPool,
    group: &str,
) -> Result<Vec<ForgottenPosition>, sqlx::Error> {
    sqlx::query_as!(
        ForgottenPosition,
        r#"DELETE FROM inbox
           WHERE consumer_group = $1
             AND event_id = 'kafka:' || topic || ':' || kafka_partition || ':' || kafka_offset
           RETURNING event_id, topic, kafka_partition AS partition, kafka_offset AS offset"#,
        group
    )
    .fetch_all(pool)
    .await
}

/// Deletes inbox rows older than the de-duplication window; returns how many.
pub async fn delete_older_than(
    pool: &sqlx::PgPool,
    hours: i32,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    sqlx::query!(
        r#"DELETE FROM inbox WHERE ctid = ANY(ARRAY(
               SELECT ctid FROM inbox
               WHERE processed_at < now() - make_interval(hours => $1)
               LIMIT $2))"#,
        hours,
        limit
    )
    .execute(pool)
    .await
    .map(|r| r.rows_affected())
}

/// How far past its retention the oldest inbox row still present is, in seconds (0 when
/// the clean-up has caught up). Only expired rows are read, which the BRIN index on
/// `processed_at` finds without scanning the rest.
pub async fn overdue_seconds(pool: &sqlx::PgPool, hours: i32) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT coalesce(extract(epoch FROM (now() - make_interval(hours => $1)) - min(processed_at)), 0)::int8 AS "s!"
           FROM inbox WHERE processed_at < now() - make_interval(hours => $1)"#,
        hours
    )
    .fetch_one(pool)
    .await
}

/// The inbox's size as the planner knows it (`pg_class.reltuples`, kept by vacuum and
/// analyze): exact counts of a large table cost a full scan.
pub async fn estimated_rows(pool: &sqlx::PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT greatest(reltuples, 0)::int8 AS "n!" FROM pg_class WHERE oid = 'inbox'::regclass"#
    )
    .fetch_one(pool)
    .await
}
