//! The outbox relay: publishes committed outbox rows to Kafka, in order, exactly as written.
//!
//! One relay is active at a time (a session advisory lock on a dedicated connection);
//! standbys poll for the lock. The leader reads rows whose transactions, and every older
//! transaction, have finished (see `store::outbox::fetch_publishable`), sends them with
//! the idempotent producer, and deletes them only after their delivery reports (their ids
//! stay in `outbox_emitted` for the retention, so a replay does not announce them again).
//! It wakes on `NOTIFY authsync_outbox`, and polls as a fallback.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{join_all, BoxFuture};
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::kafka::client_config;
use crate::store::{self, inbox, outbox};
use crate::telemetry::Metrics;

/// `pg_advisory_lock` key of the relay leader ("authsync" in ASCII).
pub const LEADER_LOCK_KEY: i64 = 0x6175_7468_7379_6e63;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("could not create the Kafka producer: {0}")]
    Producer(#[source] rdkafka::error::KafkaError),
    #[error("relay database failure: {0}")]
    Database(#[from] sqlx::Error),
}

/// The relay's producer: idempotent (no duplicates or reordering from retries), acks=all.
pub fn producer(config: &Config) -> Result<FutureProducer, RelayError> {
    client_config(&config.kafka)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", config.relay.linger_ms.to_string())
        .set("compression.type", &config.relay.compression)
        .set("message.timeout.ms", "60000")
        .set("queue.buffering.max.messages", "200000")
        .create()
        .map_err(RelayError::Producer)
}

/// How long a stopping relay waits for delivery reports and the final flush, together.
/// With the broker gone, reports only come at `message.timeout.ms` (60 s), past the pod's
/// grace period; rows whose delivery was not confirmed stay in the outbox and are
/// published again by the next leader (at least once, never lost).
const STOP_DELIVERY_BUDGET: Duration = Duration::from_secs(10);

/// Runs until `shutdown`: campaigns for leadership, publishes while leader.
pub async fn run(
    config: &Config,
    pool: PgPool,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), RelayError> {
    let producer = Arc::new(producer(config)?);
    let poll = Duration::from_millis(config.relay.poll_interval_ms);
    let options = store::connect_options(&config.database)?;
    let mut stop_by = None;
    while !shutdown.is_cancelled() {
        let mut lock_conn = match PgConnection::connect_with(&options).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "relay cannot reach the database");
                sleep_or_shutdown(poll * 4, &shutdown).await;
                continue;
            }
        };
        let leader: bool = sqlx::query_scalar!(
            r#"SELECT pg_try_advisory_lock($1) AS "locked!""#,
            LEADER_LOCK_KEY
        )
        .fetch_one(&mut lock_conn)
        .await
        .unwrap_or(false);
        if !leader {
            let _ = lock_conn.close().await;
            sleep_or_shutdown(poll * 4, &shutdown).await;
            continue;
        }
        tracing::info!("relay is leader");
        metrics.relay_leader.set(1);
        warm_up(config, &producer).await;
        let result = lead(
            config,
            &pool,
            &producer,
            &metrics,
            &mut lock_conn,
            &shutdown,
            &mut stop_by,
        )
        .await;
        metrics.relay_leader.set(0);
        if let Err(e) = result {
            tracing::warn!(error = %e, "relay lost leadership; campaigning again");
            sleep_or_shutdown(poll, &shutdown).await;
        }
        // Closing the session releases the advisory lock.
        let _ = lock_conn.close().await;
    }
    // Whatever was handed to librdkafka gets its chance to be delivered, within the budget.
    let budget = stop_by
        .map(|d: tokio::time::Instant| d.saturating_duration_since(tokio::time::Instant::now()))
        .unwrap_or(STOP_DELIVERY_BUDGET);
    let _ = tokio::task::spawn_blocking(move || producer.flush(budget)).await;
    tracing::info!("relay stopped");
    Ok(())
}

/// Looks up the result topic's partitions now, so the first results after a start or a
/// leader change do not wait for the producer's metadata round trip (measured: the first
/// quarter second of events took up to 0.9 s).
async fn warm_up(config: &Config, producer: &Arc<FutureProducer>) {
    // Only the result topic: dead-letter topics are rare, and a metadata request for a
    // missing topic may create it on brokers that auto-create.
    let topic = config.topics.user_events.clone();
    let producer = producer.clone();
    let _ = tokio::task::spawn_blocking(move || {
        if let Err(e) = producer
            .client()
            .fetch_metadata(Some(&topic), Duration::from_secs(5))
        {
            tracing::debug!(topic, error = %e, "result topic metadata not fetched yet");
        }
    })
    .await;
}

async fn sleep_or_shutdown(d: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shutdown.cancelled() => {}
    }
}

/// The leader's loop. Returns an error when leadership (its lock connection) is lost.
///
/// Reads are pipelined: up to `relay.rounds_in_flight` rounds await their delivery reports
/// while the next rows are read and sent, so a row committed during an ack wait does not
/// wait for it (see [`outbox::ReadCursor`] for how held rows are skipped).
async fn lead(
    config: &Config,
    pool: &PgPool,
    producer: &FutureProducer,
    metrics: &Metrics,
    lock_conn: &mut PgConnection,
    shutdown: &CancellationToken,
    stop_by: &mut Option<tokio::time::Instant>,
) -> Result<(), RelayError> {
    let poll = Duration::from_millis(config.relay.poll_interval_ms);
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen("authsync_outbox").await?;
    let cleanup_every = Duration::from_secs(config.relay.cleanup_interval_secs.max(1));
    let mut last_cleanup = Instant::now() - cleanup_every;
    let mut last_check = Instant::now();
    let mut last_backlog = Instant::now() - Duration::from_secs(60);
    let mut rounds = Rounds::default();
    let depth = config.relay.rounds_in_flight.max(1);
    while !shutdown.is_cancelled() {
        // Keep the backlog gauges fresh during long publishing bursts too.
        // (Counting the outbox is a scan; every few seconds is enough for a gauge.)
        if last_backlog.elapsed() >= Duration::from_secs(5) {
            update_backlog(pool, metrics).await;
            last_backlog = Instant::now();
        }
        if last_check.elapsed() >= poll * 4 {
            // Still holding the lock? A dead session means a standby may lead now.
            sqlx::query_scalar!(r#"SELECT 1 AS "one!""#)
                .fetch_one(&mut *lock_conn)
                .await?;
            last_check = Instant::now();
        }
        if last_cleanup.elapsed() >= cleanup_every {
            cleanup(config, pool).await;
            last_cleanup = Instant::now();
        }
        if rounds.pending.is_empty() && rounds.failed {
            // Undelivered rows are read again once nothing is in flight; give the broker
            // a moment first.
            sleep_or_shutdown(Duration::from_millis(500), shutdown).await;
            rounds.failed = false;
        }
        let room = !rounds.failed && rounds.pending.len() < depth;
        if room {
            // Commits notified so far are visible to the read below: their wake-ups are
            // answered by it. A short read took everything there was; the next commit
            // notifies. (Saves a read per round that would come back empty.)
            while listener.next_buffered().is_some() {}
            if rounds.start(config, pool, producer).await? == Read::Full {
                continue;
            }
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(round) = rounds.pending.next() => rounds.settle(pool, metrics, round).await?,
            n = listener.try_recv(), if room => { n?; }
            _ = tokio::time::sleep(poll) => {}
        }
    }
    // Wait for what was sent, so delivered rows are deleted and not published again; but
    // only within the stop budget (see `STOP_DELIVERY_BUDGET`).
    let deadline =
        *stop_by.get_or_insert_with(|| tokio::time::Instant::now() + STOP_DELIVERY_BUDGET);
    while let Ok(Some(round)) = tokio::time::timeout_at(deadline, rounds.pending.next()).await {
        rounds.settle(pool, metrics, round).await?;
    }
    if !rounds.pending.is_empty() {
        tracing::warn!(
            rows = rounds.held.len(),
            "relay stopping with deliveries unconfirmed; those rows stay in the outbox and are published again"
        );
    }
    Ok(())
}

async fn update_backlog(pool: &PgPool, metrics: &Metrics) {
    if let Ok(b) = outbox::backlog(pool).await {
        metrics.outbox_backlog.set(b.unpublished);
        let age = b
            .oldest
            .map(|t| (chrono::Utc::now() - t).num_seconds().max(0))
            .unwrap_or(0);
        metrics.outbox_oldest_age_seconds.set(age);
    }
}

async fn cleanup(config: &Config, pool: &PgPool) {
    let outbox_hours = i32::try_from(config.relay.outbox_retention_hours).unwrap_or(i32::MAX);
    let inbox_hours = i32::try_from(config.relay.inbox_retention_hours).unwrap_or(i32::MAX);
    match outbox::forget_emitted_older_than(pool, outbox_hours, 10_000).await {
        Ok(n) if n > 0 => tracing::info!(rows = n, "forgot expired emitted event ids"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "outbox clean-up failed"),
    }
    match inbox::delete_older_than(pool, inbox_hours, 10_000).await {
        Ok(n) if n > 0 => tracing::info!(rows = n, "deleted expired inbox rows"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "inbox clean-up failed"),
    }
}

/// A row's delivery outcome: acknowledged (and when), or not delivered.
type Delivered = (Sent, Option<chrono::DateTime<chrono::Utc>>);

/// What the relay keeps of a row once librdkafka holds its copy (not the payload).
struct Sent {
    id: i64,
    topic: String,
    created_at: chrono::DateTime<chrono::Utc>,
}

/// Whether a read returned as many rows as it asked for (more may be waiting).
#[derive(Debug, PartialEq, Eq)]
enum Read {
    Full,
    Short,
}

/// The relay's rounds awaiting delivery reports, and where the next read continues.
#[derive(Default)]
struct Rounds {
    pending: FuturesUnordered<BoxFuture<'static, (Vec<Delivered>, Instant)>>,
    /// Ids sent and not yet settled: never sent twice, whatever a read returns.
    held: HashSet<i64>,
    cursor: outbox::ReadCursor,
    /// A delivery failed: stop reading until every round settled, then read from the start.
    failed: bool,
}

impl Rounds {
    /// Reads publishable rows and hands them to the producer.
    async fn start(
        &mut self,
        config: &Config,
        pool: &PgPool,
        producer: &FutureProducer,
    ) -> Result<Read, RelayError> {
        if self.pending.is_empty() {
            self.cursor = outbox::ReadCursor::default();
        }
        let limit = config.relay.batch_size;
        let mut rows = outbox::fetch_publishable(pool, limit, self.cursor).await?;
        let full = rows.len() as i64 >= limit;
        self.cursor = self.cursor.advance(&rows);
        rows.retain(|r| !self.held.contains(&r.id));
        if rows.is_empty() {
            return Ok(Read::Short);
        }
        self.held.extend(rows.iter().map(|r| r.id));
        self.pending.push(Box::pin(send_round(producer, rows)));
        Ok(if full { Read::Full } else { Read::Short })
    }

    /// Deletes a round's delivered rows; its undelivered rows are read again later.
    async fn settle(
        &mut self,
        pool: &PgPool,
        metrics: &Metrics,
        (outcomes, started): (Vec<Delivered>, Instant),
    ) -> Result<(), RelayError> {
        let mut published = Vec::with_capacity(outcomes.len());
        let mut failed = 0usize;
        for (row, acked_at) in &outcomes {
            let Some(acked_at) = acked_at else {
                failed += 1;
                continue;
            };
            published.push(row.id);
            metrics
                .relay_published
                .with_label_values(&[&row.topic])
                .inc();
            let delay = (*acked_at - row.created_at).num_microseconds().unwrap_or(0);
            metrics
                .outbox_publish_delay_seconds
                .observe(delay.max(0) as f64 / 1e6);
        }
        let deleted = if published.is_empty() {
            Ok(())
        } else {
            outbox::delete_published(pool, &published).await
        };
        // Deleted rows are never read again; undelivered ones must be. (On a failed delete
        // the rows stay and are published again: at least once, never lost.)
        for (row, _) in &outcomes {
            self.held.remove(&row.id);
        }
        deleted?;
        metrics
            .relay_publish_seconds
            .observe(started.elapsed().as_secs_f64());
        if failed > 0 {
            metrics.relay_errors.inc_by(failed as u64);
            tracing::warn!(failed, "outbox rows not delivered; they will be retried");
            self.failed = true;
        }
        Ok(())
    }
}

/// Enqueues a round's rows in order and resolves once every delivery report is in.
fn send_round(
    producer: &FutureProducer,
    rows: Vec<outbox::Pending>,
) -> impl std::future::Future<Output = (Vec<Delivered>, Instant)> + Send + 'static {
    let started = Instant::now();
    let mut deliveries = Vec::with_capacity(rows.len());
    for row in rows {
        let mut headers = OwnedHeaders::new();
        for (k, v) in outbox::decode_headers(&row.headers) {
            headers = headers.insert(Header {
                key: &k,
                value: Some(&v),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&row.topic)
            .payload(row.payload.as_slice())
            .headers(headers);
        if let Some(key) = &row.key {
            record = record.key(key.as_slice());
        }
        // Enqueue without waiting; the delivery futures are awaited together.
        let delivery = match producer.send_result(record) {
            Ok(delivery) => Some(delivery),
            Err((e, _)) => {
                tracing::warn!(error = %e, "producer queue rejected a message");
                None
            }
        };
        deliveries.push((
            Sent {
                id: row.id,
                topic: row.topic,
                created_at: row.created_at,
            },
            delivery,
        ));
    }
    async move {
        let outcomes = join_all(deliveries.into_iter().map(|(row, d)| async move {
            let acked = match d {
                Some(d) => matches!(d.await, Ok(Ok(_))),
                None => false,
            };
            (row, acked.then(chrono::Utc::now))
        }))
        .await;
        (outcomes, started)
    }
}
