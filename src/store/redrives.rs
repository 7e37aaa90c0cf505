//! Which dead letters `authsync dlq redrive` already re-published.

use sqlx::PgPool;

pub async fn redriven(pool: &PgPool, dlq_topic: &str) -> Result<Vec<(i32, i64)>, sqlx::Error> {
    let rows = sqlx::query!(
        "SELECT dlq_partition, dlq_offset FROM dlq_redrives WHERE dlq_topic = $1",
        dlq_topic
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.dlq_partition, r.dlq_offset))
        .collect())
}

pub async fn record(
    pool: &PgPool,
    dlq_topic: &str,
    partition: i32,
    offset: i64,
    target: &str,
    class: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        r#"INSERT INTO dlq_redrives (dlq_topic, dlq_partition, dlq_offset, target_topic, error_class)
           VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING"#,
        dlq_topic,
        partition,
        offset,
        target,
        class
    )
    .execute(pool)
    .await
    .map(|_| ())
}
