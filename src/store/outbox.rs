//! The transactional outbox: rows written in the step's transaction, read by the relay,
//! deleted once the broker acknowledged them. The ids of emitted events are remembered
//! (`outbox_emitted`) for the retention, so a replay that emits one again adds nothing.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// A Kafka header: name and value.
pub type Header = (String, Vec<u8>);

/// A message to publish once the transaction that wrote it commits.
#[derive(Clone, Debug)]
pub struct NewMessage {
    /// Unique; a second insert with the same id is ignored (a replay that re-emits).
    pub event_id: Uuid,
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub event_type: String,
    pub payload: Vec<u8>,
    /// Kafka headers, in order (stored as JSON, see [`encode_headers`]).
    pub headers: Vec<Header>,
}

/// Headers as JSON: `[{"k": name, "v": text}]` or `{"k": name, "b": [bytes]}` for non-UTF-8.
pub fn encode_headers(headers: &[Header]) -> serde_json::Value {
    serde_json::Value::Array(
        headers
            .iter()
            .map(|(k, v)| match std::str::from_utf8(v) {
                Ok(text) => serde_json::json!({ "k": k, "v": text }),
                Err(_) => serde_json::json!({ "k": k, "b": v }),
            })
            .collect(),
    )
}

pub fn decode_headers(value: &serde_json::Value) -> Vec<Header> {
    let Some(items) = value.as_array() else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let k = item.get("k")?.as_str()?.to_owned();
            if let Some(text) = item.get("v").and_then(|v| v.as_str()) {
                return Some((k, text.as_bytes().to_vec()));
            }
            let bytes = item
                .get("b")?
                .as_array()?
                .iter()
                .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect();
            Some((k, bytes))
        })
        .collect()
}

/// Largest payload bytes bound in one insert statement. A connection keeps its write
/// buffer at the size of the largest statement it ever sent, for its whole life: a
/// 500-signup batch in one statement (~3 MB) left ~3 MB behind on every pooled connection.
const INSERT_CHUNK_BYTES: usize = 512 * 1024;

/// Inserts messages in order (their `id`s follow it), skipping any whose event id was
/// emitted before (within the retention) or repeats in `messages`; returns how many were new.
/// Large batches go in a few statements of at most [`INSERT_CHUNK_BYTES`] of payload.
pub async fn insert(conn: &mut PgConnection, messages: &[NewMessage]) -> Result<u64, sqlx::Error> {
    let mut seen = std::collections::HashSet::with_capacity(messages.len());
    let messages: Vec<&NewMessage> = messages
        .iter()
        .filter(|m| seen.insert(m.event_id))
        .collect();
    let mut inserted = 0;
    let mut rest = messages.as_slice();
    while !rest.is_empty() {
        let mut bytes = 0;
        let n = rest
            .iter()
            .take_while(|m| {
                bytes += m.payload.len();
                bytes <= INSERT_CHUNK_BYTES
            })
            .count()
            .max(1);
        let (chunk, tail) = rest.split_at(n);
        inserted += insert_chunk(&mut *conn, chunk).await?;
        rest = tail;
    }
    Ok(inserted)
}

async fn insert_chunk(
    conn: &mut PgConnection,
    messages: &[&NewMessage],
) -> Result<u64, sqlx::Error> {
    let ids: Vec<Uuid> = messages.iter().map(|m| m.event_id).collect();
    let topics: Vec<&str> = messages.iter().map(|m| m.topic.as_str()).collect();
    let keys: Vec<Option<&[u8]>> = messages.iter().map(|m| m.key.as_deref()).collect();
    let types: Vec<&str> = messages.iter().map(|m| m.event_type.as_str()).collect();
    let payloads: Vec<&[u8]> = messages.iter().map(|m| m.payload.as_slice()).collect();
    // Result events of one type share their headers: encode each list once. Only the last
    // few lists are compared (dead letters each carry their own).
    let mut encoded: Vec<(&[Header], Box<RawValue>)> = Vec::new();
    let mut header_index = Vec::with_capacity(messages.len());
    for m in messages {
        let recent = encoded.len().saturating_sub(4);
        let same = encoded[recent..]
            .iter()
            .position(|(h, _)| *h == m.headers.as_slice());
        let i = match same {
            Some(i) => recent + i,
            None => {
                let json = serde_json::value::to_raw_value(&encode_headers(&m.headers))
                    .map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
                encoded.push((&m.headers, json));
                encoded.len() - 1
            }
        };
        header_index.push(i);
    }
    let headers: Vec<Json<&RawValue>> = header_index
        .into_iter()
        .map(|i| Json(encoded[i].1.as_ref()))
        .collect();
    // A concurrent transaction emitting the same id makes this wait for it (the ledger's
    // primary key), so two transactions never both publish one event.
    let result = sqlx::query!(
        r#"
        WITH m AS (
            SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::bytea[], $4::text[], $5::bytea[],
                                 $6::jsonb[])
                WITH ORDINALITY AS m(event_id, topic, message_key, event_type, payload, headers, n)
        ), fresh AS (
            INSERT INTO outbox_emitted (event_id, event_type) SELECT event_id, event_type FROM m
            ON CONFLICT (event_id) DO NOTHING
            RETURNING event_id
        )
        INSERT INTO outbox (event_id, topic, message_key, event_type, payload, headers)
        SELECT m.event_id, m.topic, m.message_key, m.event_type, m.payload, m.headers
        FROM m JOIN fresh ON fresh.event_id = m.event_id
        ORDER BY m.n
        "#,
        &ids,
        &topics as &[&str],
        &keys as &[Option<&[u8]>],
        &types as &[&str],
        &payloads as &[&[u8]],
        &headers as &[Json<&RawValue>],
    )
    .execute(conn)
    .await?;
    Ok(result.rows_affected())
}

/// A row the relay may publish.
#[derive(Debug)]
pub struct Pending {
    pub id: i64,
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: serde_json::Value,
    /// When the transaction that wrote it started.
    pub created_at: DateTime<Utc>,
    /// The xmin of the snapshot that read it (every older transaction had finished).
    pub snapshot_xmin: i64,
}

/// Where a read continues while earlier reads still await their delivery reports.
///
/// A row with an id at or below `after_id` that the previous read did not return belonged
/// to a transaction still running then (its txid ≥ that read's xmin), so rows the relay
/// holds are skipped without listing them. The default reads everything publishable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadCursor {
    pub after_id: i64,
    pub xmin: i64,
}

impl ReadCursor {
    /// The cursor after a read returned `rows` (unchanged when it returned none).
    pub fn advance(self, rows: &[Pending]) -> Self {
        match (rows.iter().map(|r| r.id).max(), rows.first()) {
            (Some(after_id), Some(first)) => Self {
                after_id,
                xmin: first.snapshot_xmin,
            },
            _ => self,
        }
    }
}

/// The oldest unpublished rows whose transactions, and every older transaction, have
/// finished, past `cursor`. Waiting for the snapshot's xmin is what keeps a late-committing
/// transaction's rows from being overtaken by a newer transaction's rows for the same key.
pub async fn fetch_publishable(
    pool: &PgPool,
    limit: i64,
    cursor: ReadCursor,
) -> Result<Vec<Pending>, sqlx::Error> {
    sqlx::query_as!(
        Pending,
        r#"
        WITH snap AS (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8 AS xmin)
        SELECT o.id, o.topic, o.message_key AS key, o.payload, o.headers, o.created_at,
               snap.xmin AS "snapshot_xmin!"
        FROM outbox o, snap
        WHERE o.txid < snap.xmin AND (o.id > $1 OR o.txid >= $2)
        ORDER BY o.id
        LIMIT $3
        "#,
        cursor.after_id,
        cursor.xmin,
        limit
    )
    .fetch_all(pool)
    .await
}

/// Deletes rows the broker has acknowledged.
pub async fn delete_published(pool: &PgPool, ids: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query!("DELETE FROM outbox WHERE id = ANY($1)", ids)
        .execute(pool)
        .await
        .map(|_| ())
}

/// Forgets emitted ids older than the retention, but never one that may still be waiting
/// in the outbox (a relay down longer than the retention); returns how many.
pub async fn forget_emitted_older_than(
    pool: &PgPool,
    hours: i32,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    sqlx::query!(
        r#"DELETE FROM outbox_emitted WHERE ctid = ANY(ARRAY(
               SELECT ctid FROM outbox_emitted
               WHERE emitted_at < now() - make_interval(hours => $1)
                 AND emitted_at < COALESCE((SELECT min(created_at) FROM outbox), 'infinity')
               LIMIT $2))"#,
        hours,
        limit
    )
    .execute(pool)
    .await
    .map(|r| r.rows_affected())
}

/// How many emitted ids are remembered for de-duplication.
pub async fn remembered(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM outbox_emitted"#)
        .fetch_one(pool)
        .await
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    pub unpublished: i64,
    pub oldest: Option<DateTime<Utc>>,
}

pub async fn backlog(pool: &PgPool) -> Result<Backlog, sqlx::Error> {
    let row = sqlx::query!(
        r#"SELECT count(*) AS "unpublished!", min(created_at) AS oldest
           FROM outbox"#
    )
    .fetch_one(pool)
    .await?;
    Ok(Backlog {
        unpublished: row.unpublished,
        oldest: row.oldest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_including_binary() {
        let headers = vec![
            ("a".to_string(), b"text".to_vec()),
            ("b".to_string(), vec![0xff, 0x00, 0x10]),
        ];
        assert_eq!(decode_headers(&encode_headers(&headers)), headers);
    }
}
