//! The transactional outbox: rows written in the step's transaction, read by the relay,
//! deleted once the broker acknowledged them. The ids of emitted events are remembered
//! (`outbox_emitted`) for the retention, so a replay that emits one again adds nothing.

use chrono::{DateTime, Utc};
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
    /// `None` for a tombstone (a dead letter of a message with a null value).
    pub payload: Option<Vec<u8>>,
    /// Kafka headers, in order (stored as bytes, see [`pack_headers`]).
    pub headers: Vec<Header>,
}

impl NewMessage {
    /// What the message weighs on the wire, for the producer's `message.max.bytes`: key,
    /// value, and each header's name and value with their length fields.
    pub fn wire_bytes(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + self.payload.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 10)
                .sum::<usize>()
    }
}

/// Headers as bytes, lossless (a value may hold NUL or any other byte): per header, the
/// name's length (u32, big-endian), the name, the value's length (u32), the value.
pub fn pack_headers(headers: &[Header]) -> Vec<u8> {
    let size: usize = headers.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
    let mut out = Vec::with_capacity(size);
    for (k, v) in headers {
        for part in [k.as_bytes(), v.as_slice()] {
            // Kafka caps a whole message far below 4 GiB; a longer part cannot reach here.
            let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&part[..len as usize]);
        }
    }
    out
}

/// The inverse of [`pack_headers`]; `None` when the bytes are not such a list.
pub fn unpack_headers(mut bytes: &[u8]) -> Option<Vec<Header>> {
    fn part<'a>(bytes: &mut &'a [u8]) -> Option<&'a [u8]> {
        let (len, rest) = bytes.split_first_chunk::<4>()?;
        let len = u32::from_be_bytes(*len) as usize;
        if rest.len() < len {
            return None;
        }
        let (part, rest) = rest.split_at(len);
        *bytes = rest;
        Some(part)
    }
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let name = String::from_utf8(part(&mut bytes)?.to_vec()).ok()?;
        let value = part(&mut bytes)?.to_vec();
        out.push((name, value));
    }
    Some(out)
}

/// Headers as JSON: `[{"k": name, "v": text}]` or `{"k": name, "b": [bytes]}` for non-UTF-8.
/// Rows written before migration 9 carry their headers this way; new rows use
/// [`pack_headers`] (a jsonb string cannot hold NUL).
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

/// Largest piece of `COPY` data sent at once. A connection keeps its write buffer at the
/// size of the largest message it ever sent, for its whole life: a 500-signup batch in one
/// message (~3 MB) would leave ~3 MB behind on every pooled connection.
const COPY_SEND_BYTES: usize = 512 * 1024;

/// The outbox's columns as `COPY` receives them (binary format, in this order).
const COPY_OUTBOX: &str = concat!(
    "COPY outbox (event_id, topic, message_key, event_type, payload, header_bytes) ",
    "FROM STDIN (FORMAT binary)"
);

/// Inserts messages in order (their `id`s follow it), skipping any whose event id was
/// emitted before (within the retention) or repeats in `messages`; returns how many were new.
///
/// Two statements: the ids go into the `outbox_emitted` ledger first (`ON CONFLICT DO
/// NOTHING`, which also waits for a concurrent transaction emitting the same id, so two
/// transactions never both publish one event); the rows whose ids were new are then
/// streamed with `COPY`. For 500 of the benchmark's rows (2.9 KB payloads) `COPY` costs
/// Postgres 17–19 µs of CPU per row, where one `INSERT … SELECT FROM UNNEST(…)` with the
/// ledger in a CTE cost 37–41 µs (decoding a ~1.5 MB `bytea[]` parameter is most of it);
/// in the `returning` benchmark, Postgres's CPU per event fell by 5–9%.
pub async fn insert(conn: &mut PgConnection, messages: &[NewMessage]) -> Result<u64, sqlx::Error> {
    let mut seen = std::collections::HashSet::with_capacity(messages.len());
    let messages: Vec<&NewMessage> = messages
        .iter()
        .filter(|m| seen.insert(m.event_id))
        .collect();
    if messages.is_empty() {
        return Ok(0);
    }
    if messages.len() <= ONE_STATEMENT_ROWS {
        return insert_in_one_statement(conn, &messages).await;
    }
    let ids: Vec<Uuid> = messages.iter().map(|m| m.event_id).collect();
    let types: Vec<&str> = messages.iter().map(|m| m.event_type.as_str()).collect();
    let fresh: std::collections::HashSet<Uuid> = sqlx::query_scalar!(
        r#"INSERT INTO outbox_emitted (event_id, event_type)
           SELECT * FROM UNNEST($1::uuid[], $2::text[])
           ON CONFLICT (event_id) DO NOTHING
           RETURNING event_id"#,
        &ids,
        &types as &[&str],
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    if fresh.is_empty() {
        return Ok(0);
    }
    // Result events of one type share their headers: pack each list once. Only the last
    // few lists are compared (dead letters each carry their own).
    let mut packed: Vec<(&[Header], Vec<u8>)> = Vec::new();
    let size: usize = messages
        .iter()
        .map(|m| m.payload.as_ref().map_or(0, Vec::len) + 256)
        .sum();
    let mut rows = CopyRows::with_capacity(size.min(COPY_SEND_BYTES + 64 * 1024));
    let mut copy = conn.copy_in_raw(COPY_OUTBOX).await?;
    for m in messages.iter().filter(|m| fresh.contains(&m.event_id)) {
        let recent = packed.len().saturating_sub(4);
        let same = packed[recent..]
            .iter()
            .position(|(h, _)| *h == m.headers.as_slice());
        let headers = match same {
            Some(i) => &packed[recent + i].1,
            None => {
                packed.push((&m.headers, pack_headers(&m.headers)));
                &packed[packed.len() - 1].1
            }
        };
        rows.row(6);
        rows.field(Some(m.event_id.as_bytes()))?;
        rows.field(Some(m.topic.as_bytes()))?;
        rows.field(m.key.as_deref())?;
        rows.field(Some(m.event_type.as_bytes()))?;
        rows.field(m.payload.as_deref())?;
        rows.field(Some(headers))?;
        if rows.len() >= COPY_SEND_BYTES {
            copy.send(rows.take()).await?;
        }
    }
    copy.send(rows.finish()).await?;
    copy.finish().await
}

/// Up to this many rows go in with one statement (ledger and rows together, one round
/// trip) rather than the ledger statement plus `COPY` (three round trips). At 1,000
/// logins/s a transaction holds a few logins and pays per round trip, not per row; `COPY`
/// wins only for large batches (see [`insert`]).
const ONE_STATEMENT_ROWS: usize = 32;

/// [`insert`] for a few rows: the ledger insert in a CTE, the rows of fresh ids inserted in
/// their order (the ids follow it: `ORDER BY` feeds the insert row by row).
async fn insert_in_one_statement(
    conn: &mut PgConnection,
    messages: &[&NewMessage],
) -> Result<u64, sqlx::Error> {
    let ids: Vec<Uuid> = messages.iter().map(|m| m.event_id).collect();
    let types: Vec<&str> = messages.iter().map(|m| m.event_type.as_str()).collect();
    let topics: Vec<&str> = messages.iter().map(|m| m.topic.as_str()).collect();
    let keys: Vec<Option<&[u8]>> = messages.iter().map(|m| m.key.as_deref()).collect();
    let payloads: Vec<Option<&[u8]>> = messages.iter().map(|m| m.payload.as_deref()).collect();
    let headers: Vec<Vec<u8>> = messages.iter().map(|m| pack_headers(&m.headers)).collect();
    let done = sqlx::query!(
        r#"WITH fresh AS (
               INSERT INTO outbox_emitted (event_id, event_type)
               SELECT * FROM UNNEST($1::uuid[], $2::text[])
               ON CONFLICT (event_id) DO NOTHING
               RETURNING event_id)
           INSERT INTO outbox (event_id, topic, message_key, event_type, payload, header_bytes)
           SELECT m.event_id, m.topic, m.message_key, m.event_type, m.payload, m.header_bytes
           FROM UNNEST($1::uuid[], $3::text[], $4::bytea[], $2::text[], $5::bytea[], $6::bytea[])
                WITH ORDINALITY
                AS m(event_id, topic, message_key, event_type, payload, header_bytes, n)
           WHERE m.event_id IN (SELECT event_id FROM fresh)
           ORDER BY m.n"#,
        &ids,
        &types as &[&str],
        &topics as &[&str],
        &keys as &[Option<&[u8]>],
        &payloads as &[Option<&[u8]>],
        &headers,
    )
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}

/// Rows in `COPY`'s binary format: a signature, flags and an empty header extension, then
/// per row its field count and each field as a big-endian length (-1 for NULL) and bytes,
/// then -1 as the trailer. sqlx streams `COPY` data but has no encoder for the format.
struct CopyRows {
    buf: Vec<u8>,
}

impl CopyRows {
    fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes);
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
        buf.extend_from_slice(&0i32.to_be_bytes()); // header extension length
        Self { buf }
    }

    fn len(&self) -> usize {
        self.buf.len()
    }

    fn row(&mut self, fields: i16) {
        self.buf.extend_from_slice(&fields.to_be_bytes());
    }

    fn length(&mut self, len: usize) -> Result<(), sqlx::Error> {
        let len = i32::try_from(len).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        self.buf.extend_from_slice(&len.to_be_bytes());
        Ok(())
    }

    /// A uuid, text or bytea field: their binary forms are the raw bytes. (Text must not
    /// hold NUL; only topics and event types, which authsync writes, go in as text.)
    fn field(&mut self, value: Option<&[u8]>) -> Result<(), sqlx::Error> {
        match value {
            None => self.buf.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(bytes) => {
                self.length(bytes.len())?;
                self.buf.extend_from_slice(bytes);
            }
        }
        Ok(())
    }

    /// The data so far, to send; the rows that follow continue the same stream.
    fn take(&mut self) -> Vec<u8> {
        let capacity = self.buf.capacity();
        std::mem::replace(&mut self.buf, Vec::with_capacity(capacity))
    }

    fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }
}

/// Keeps the original of a dead letter too large to publish (see `steps::write_outbox`).
pub async fn store_body(conn: &mut PgConnection, message: &NewMessage) -> Result<(), sqlx::Error> {
    sqlx::query!(
        r#"INSERT INTO dead_letter_bodies (event_id, topic, message_key, payload, header_bytes)
           VALUES ($1, $2, $3, $4, $5) ON CONFLICT (event_id) DO NOTHING"#,
        message.event_id,
        message.topic,
        message.key.as_deref(),
        message.payload.as_deref(),
        pack_headers(&message.headers),
    )
    .execute(conn)
    .await
    .map(|_| ())
}

/// The stored original of a dead letter: key, value and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBody {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<Header>,
}

pub async fn load_body(pool: &PgPool, event_id: Uuid) -> Result<Option<StoredBody>, sqlx::Error> {
    Ok(sqlx::query!(
        "SELECT message_key, payload, header_bytes FROM dead_letter_bodies WHERE event_id = $1",
        event_id
    )
    .fetch_optional(pool)
    .await?
    .map(|r| StoredBody {
        key: r.message_key,
        payload: r.payload,
        headers: unpack_headers(&r.header_bytes).unwrap_or_default(),
    }))
}

/// Moves rows the broker refused for good out of the outbox (see `relay`): they no longer
/// hold anything behind them. `errors` pairs each row id with why it was refused.
pub async fn park(pool: &PgPool, errors: &[(i64, String)]) -> Result<u64, sqlx::Error> {
    let ids: Vec<i64> = errors.iter().map(|(id, _)| *id).collect();
    let reasons: Vec<&str> = errors.iter().map(|(_, e)| e.as_str()).collect();
    sqlx::query!(
        r#"WITH moved AS (
               DELETE FROM outbox WHERE id = ANY($1) RETURNING *
           )
           INSERT INTO outbox_parked (id, event_id, topic, message_key, event_type, payload,
                                      headers, header_bytes, created_at, error)
           SELECT m.id, m.event_id, m.topic, m.message_key, m.event_type, m.payload,
                  m.headers, m.header_bytes, m.created_at, r.error
           FROM moved m JOIN UNNEST($1::int8[], $2::text[]) AS r(id, error) ON r.id = m.id
           ON CONFLICT (id) DO NOTHING"#,
        &ids,
        &reasons as &[&str],
    )
    .execute(pool)
    .await
    .map(|r| r.rows_affected())
}

/// A parked row, as `authsync outbox parked` lists it.
#[derive(Debug, Clone)]
pub struct Parked {
    pub id: i64,
    pub event_id: Uuid,
    pub topic: String,
    pub event_type: String,
    pub bytes: i64,
    pub parked_at: DateTime<Utc>,
    pub error: String,
}

pub async fn parked(pool: &PgPool, limit: i64) -> Result<Vec<Parked>, sqlx::Error> {
    sqlx::query_as!(
        Parked,
        r#"SELECT id, event_id, topic, event_type,
                  (coalesce(length(payload), 0) + coalesce(length(message_key), 0)
                   + coalesce(length(header_bytes), 0))::int8 AS "bytes!",
                  parked_at, error
           FROM outbox_parked ORDER BY id LIMIT $1"#,
        limit
    )
    .fetch_all(pool)
    .await
}

pub async fn parked_count(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM outbox_parked"#)
        .fetch_one(pool)
        .await
}

/// Puts parked rows (all, or the listed ids) back at the end of the outbox: they are
/// published after every row written before this call. Returns how many.
pub async fn retry_parked(pool: &PgPool, ids: Option<&[i64]>) -> Result<u64, sqlx::Error> {
    let all = ids.is_none();
    let ids = ids.unwrap_or_default();
    sqlx::query!(
        r#"WITH moved AS (
               DELETE FROM outbox_parked WHERE $1 OR id = ANY($2) RETURNING *
           )
           INSERT INTO outbox (event_id, topic, message_key, event_type, payload, headers,
                               header_bytes)
           SELECT event_id, topic, message_key, event_type, payload, headers, header_bytes
           FROM moved ORDER BY id"#,
        all,
        ids
    )
    .execute(pool)
    .await
    .map(|r| r.rows_affected())
}

/// A row the relay may publish.
#[derive(Debug)]
pub struct Pending {
    pub id: i64,
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// Headers of rows written before migration 9 (see [`encode_headers`]).
    pub headers: serde_json::Value,
    pub header_bytes: Option<Vec<u8>>,
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

/// The fence is computed once per read (`MATERIALIZED`): inlined, the function ran for
/// every row scanned (~9 µs each) and the relay published 4x slower.
///
/// The oldest unpublished rows whose transactions, and every older transaction that could
/// write the outbox, have finished, past `cursor`. Waiting for that fence (see the SQL
/// function `authsync_outbox_fence`: transactions of other databases do not count) is what
/// keeps a late-committing transaction's rows from being overtaken by a newer
/// transaction's rows for the same key.
pub async fn fetch_publishable(
    pool: &PgPool,
    limit: i64,
    cursor: ReadCursor,
) -> Result<Vec<Pending>, sqlx::Error> {
    sqlx::query_as!(
        Pending,
        r#"
        WITH snap AS MATERIALIZED (SELECT authsync_outbox_fence(pg_current_snapshot()) AS xmin)
        SELECT o.id, o.topic, o.message_key AS key, o.payload, o.headers, o.header_bytes,
               o.created_at,
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

/// Who holds publishing back: committed rows waiting for an older transaction that can
/// still write the outbox, and the backend running it.
#[derive(Debug, Clone, PartialEq)]
pub struct Hold {
    pub rows: i64,
    /// When the oldest held row's transaction started.
    pub oldest: Option<DateTime<Utc>>,
    pub pid: Option<i32>,
    pub application_name: Option<String>,
    pub state: Option<String>,
    pub xact_start: Option<DateTime<Utc>>,
}

pub async fn hold(pool: &PgPool) -> Result<Hold, sqlx::Error> {
    sqlx::query_as!(
        Hold,
        r#"
        WITH fence AS MATERIALIZED (SELECT authsync_outbox_fence(pg_current_snapshot()) AS xid),
        held AS (SELECT count(*) AS n, min(o.created_at) AS oldest
                 FROM outbox o, fence WHERE o.txid >= fence.xid)
        SELECT held.n AS "rows!", held.oldest, a.pid AS "pid?", a.application_name AS "application_name?",
               a.state AS "state?", a.xact_start AS "xact_start?"
        FROM held, fence
        LEFT JOIN pg_stat_activity a
          ON a.backend_xid IS NOT NULL AND a.backend_xid::text::int8 = fence.xid % 4294967296
        LIMIT 1
        "#
    )
    .fetch_one(pool)
    .await
}

/// Deletes rows the broker has acknowledged.
pub async fn delete_published(pool: &PgPool, ids: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query!("DELETE FROM outbox WHERE id = ANY($1)", ids)
        .execute(pool)
        .await
        .map(|_| ())
}

/// Forgets that these events were emitted, so that an outbox insert of the same ids
/// goes through again (`authsync dev`, whose broker starts empty on every run).
pub async fn forget_emitted(pool: &PgPool, ids: &[Uuid]) -> Result<u64, sqlx::Error> {
    sqlx::query!("DELETE FROM outbox_emitted WHERE event_id = ANY($1)", ids)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
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

/// As `inbox::overdue_seconds`, for the emitted-id ledger.
pub async fn emitted_overdue_seconds(pool: &PgPool, hours: i32) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT coalesce(extract(epoch FROM (now() - make_interval(hours => $1)) - min(emitted_at)), 0)::int8 AS "s!"
           FROM outbox_emitted WHERE emitted_at < now() - make_interval(hours => $1)"#,
        hours
    )
    .fetch_one(pool)
    .await
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

impl Pending {
    /// The row's headers, from whichever column holds them.
    pub fn headers(&self) -> Vec<Header> {
        match &self.header_bytes {
            Some(bytes) => unpack_headers(bytes).unwrap_or_default(),
            None => decode_headers(&self.headers),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_headers_round_trip_any_bytes() {
        let headers = vec![
            ("x-trace".to_string(), vec![0x00, 0x01]),
            ("empty".to_string(), Vec::new()),
            ("bin".to_string(), vec![0xff, 0xfe, 0x00]),
            (String::new(), b"no name".to_vec()),
            ("authsync-provider".to_string(), b"okta".to_vec()),
        ];
        let packed = pack_headers(&headers);
        assert_eq!(unpack_headers(&packed), Some(headers));
        assert_eq!(unpack_headers(&[]), Some(Vec::new()));
    }

    #[test]
    fn truncated_or_garbled_header_bytes_are_refused_not_misread() {
        let packed = pack_headers(&[("a".to_string(), b"value".to_vec())]);
        for cut in 1..packed.len() {
            assert_eq!(unpack_headers(&packed[..cut]), None, "cut at {cut}");
        }
        assert_eq!(
            unpack_headers(&[0, 0, 0, 1, 0xff, 0, 0, 0, 0]),
            None,
            "name not UTF-8"
        );
    }

    #[test]
    fn headers_round_trip_including_binary() {
        let headers = vec![
            ("a".to_string(), b"text".to_vec()),
            ("b".to_string(), vec![0xff, 0x00, 0x10]),
        ];
        assert_eq!(decode_headers(&encode_headers(&headers)), headers);
    }
}
