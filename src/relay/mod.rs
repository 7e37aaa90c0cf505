//! The outbox relay: publishes committed outbox rows to Kafka, in order, exactly as written.
//!
//! One relay is active at a time (a session advisory lock on a dedicated connection);
//! standbys poll for the lock. The leader reads rows whose transactions, and every older
//! transaction, have finished (see `store::outbox::fetch_publishable`), sends them with
//! the idempotent producer, and deletes them only after their delivery reports (their ids
//! stay in `outbox_emitted` for the retention, so a replay does not announce them again).
//! It reads when there may be something new: on every commit of this process's steps (a
//! [`CommitSignal`], no round trip), on `NOTIFY authsync_outbox` (other replicas, the merge
//! waiter, operators), and on a short poll as a fallback; never again just because a round
//! was acknowledged.

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

/// Told by the step handlers of this process after each commit: a commit may make results
/// publishable, its own or those held behind its transaction by the fence (a batch of
/// duplicates writes no outbox row, so no NOTIFY would say it ended). A commit while the
/// relay is busy leaves a permit, so none is missed.
pub type CommitSignal = Arc<tokio::sync::Notify>;

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
        .set(
            "message.max.bytes",
            config.relay.message_max_bytes.to_string(),
        )
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
    commits: CommitSignal,
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
            &commits,
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
// The leader's whole world, passed once; a struct for one private call would only rename it.
#[allow(clippy::too_many_arguments)]
async fn lead(
    config: &Config,
    pool: &PgPool,
    producer: &FutureProducer,
    metrics: &Metrics,
    commits: &CommitSignal,
    lock_conn: &mut PgConnection,
    shutdown: &CancellationToken,
    stop_by: &mut Option<tokio::time::Instant>,
) -> Result<(), RelayError> {
    let poll = Duration::from_millis(config.relay.poll_interval_ms);
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen("authsync_outbox").await?;
    let mut cleaning = Beside::every(Duration::from_secs(
        config.relay.cleanup_interval_secs.max(1),
    ));
    let mut gauging = Beside::every(Duration::from_secs(5));
    let mut last_check = Instant::now();
    let mut rounds = Rounds::default();
    let depth = config.relay.rounds_in_flight.max(1);
    // Something may be publishable that the last read did not return. Cleared just before
    // a read, so a commit during the read marks the next one.
    let mut dirty = true;
    while !shutdown.is_cancelled() {
        // Keep the backlog gauges fresh during long publishing bursts too, beside
        // publishing: counting the outbox scans its heap, dead rows included (until a
        // vacuum), and awaited here it held every result committed meanwhile (p99 of
        // transaction start → ack 200–270 ms with 200k dead rows, 20 ms from read to ack).
        if gauging.due() {
            let (config, pool, metrics) = (config.clone(), pool.clone(), metrics.clone());
            gauging.start(async move {
                update_backlog(&pool, &metrics).await;
                check_hold(&config, &pool, &metrics).await;
            });
        }
        if last_check.elapsed() >= poll * 4 {
            // Still holding the lock? A dead session means a standby may lead now.
            sqlx::query_scalar!(r#"SELECT 1 AS "one!""#)
                .fetch_one(&mut *lock_conn)
                .await?;
            last_check = Instant::now();
        }
        // The clean-up runs beside publishing (a long one must not hold results back).
        if cleaning.due() {
            let (config, pool, metrics, shutdown) = (
                config.clone(),
                pool.clone(),
                metrics.clone(),
                shutdown.clone(),
            );
            cleaning.start(async move { cleanup(&config, &pool, &metrics, &shutdown).await });
        }
        if rounds.pending.is_empty() && rounds.failed {
            // Undelivered rows are read again once nothing is in flight; give the broker
            // a moment first.
            sleep_or_shutdown(Duration::from_millis(500), shutdown).await;
            rounds.failed = false;
            dirty = true;
        }
        let room = !rounds.failed && rounds.pending.len() < depth;
        if room && dirty {
            // Commits notified so far are visible to the read below: their wake-ups are
            // answered by it. A short read took everything there was; the next commit
            // says so.
            while listener.next_buffered().is_some() {}
            dirty = false;
            if rounds.start(config, pool, producer).await? == Read::Full {
                dirty = true;
                continue;
            }
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(round) = rounds.pending.next() => rounds.settle(pool, metrics, round).await?,
            _ = commits.notified() => dirty = true,
            n = listener.try_recv() => { n?; dirty = true; }
            _ = tokio::time::sleep(poll) => dirty = true,
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

/// Periodic work that runs beside publishing, one run at a time: due once its interval
/// has passed since the last start and the last run has finished.
struct Beside {
    every: Duration,
    last: Option<Instant>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Beside {
    /// Due at once, then every `every`.
    fn every(every: Duration) -> Self {
        Self {
            every,
            last: None,
            task: None,
        }
    }

    fn due(&self) -> bool {
        self.last.is_none_or(|t| t.elapsed() >= self.every)
            && self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    fn start(&mut self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        self.task = Some(tokio::spawn(work));
        self.last = Some(Instant::now());
    }
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
    if let Ok(n) = outbox::parked_count(pool).await {
        metrics.outbox_parked.set(n);
    }
}

/// Reports a hold: committed results waiting longer than `relay.held_warn_secs` for an
/// older transaction that can still write the outbox (an operator's session left open, a
/// stuck migration). Publishing resumes by itself when it ends; the log names it.
async fn check_hold(config: &Config, pool: &PgPool, metrics: &Metrics) {
    let Ok(hold) = outbox::hold(pool).await else {
        return;
    };
    let held = match (hold.rows, hold.oldest) {
        (n, Some(oldest)) if n > 0 => (chrono::Utc::now() - oldest).num_seconds().max(0),
        _ => 0,
    };
    metrics.relay_held_seconds.set(held);
    metrics.relay_holder.reset();
    if held >= i64::try_from(config.relay.held_warn_secs).unwrap_or(i64::MAX) {
        metrics
            .relay_holder
            .with_label_values(&[
                &hold
                    .pid
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "?".into()),
                hold.application_name.as_deref().unwrap_or("?"),
            ])
            .set(held);
        tracing::warn!(
            held_rows = hold.rows,
            held_secs = held,
            holder_pid = hold.pid,
            holder_application = hold.application_name.as_deref().unwrap_or("?"),
            holder_state = hold.state.as_deref().unwrap_or("?"),
            holder_xact_start = ?hold.xact_start,
            "results are held back by an open transaction in this database; they are published when it ends (see OPERATIONS: AuthsyncRelayHeld)"
        );
    }
}

/// Deletes everything past its retention, in statements of `relay.cleanup_batch_rows`
/// rows, until nothing expired is left or the next clean-up is due: one run keeps up with
/// any sustained rate (a fixed cap per run did not, above ~167 events/s).
async fn cleanup(config: &Config, pool: &PgPool, metrics: &Metrics, shutdown: &CancellationToken) {
    let outbox_hours = i32::try_from(config.relay.outbox_retention_hours).unwrap_or(i32::MAX);
    let inbox_hours = i32::try_from(config.relay.inbox_retention_hours).unwrap_or(i32::MAX);
    let batch = config.relay.cleanup_batch_rows;
    let budget = Duration::from_secs(config.relay.cleanup_interval_secs.max(1));
    let started = Instant::now();
    let (mut emitted, mut inbox_rows) = (0u64, 0u64);
    let (mut emitted_done, mut inbox_done) = (false, false);
    while !(emitted_done && inbox_done) && started.elapsed() < budget && !shutdown.is_cancelled() {
        if !emitted_done {
            match outbox::forget_emitted_older_than(pool, outbox_hours, batch).await {
                Ok(n) => {
                    emitted += n;
                    emitted_done = (n as i64) < batch;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbox clean-up failed");
                    emitted_done = true;
                }
            }
        }
        if !inbox_done {
            match inbox::delete_older_than(pool, inbox_hours, batch).await {
                Ok(n) => {
                    inbox_rows += n;
                    inbox_done = (n as i64) < batch;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "inbox clean-up failed");
                    inbox_done = true;
                }
            }
        }
    }
    if emitted > 0 || inbox_rows > 0 {
        tracing::info!(
            emitted_ids = emitted,
            inbox_rows,
            seconds = started.elapsed().as_secs_f64(),
            caught_up = emitted_done && inbox_done,
            "retention clean-up"
        );
    }
    metrics
        .cleanup_deleted
        .with_label_values(&["inbox"])
        .inc_by(inbox_rows);
    metrics
        .cleanup_deleted
        .with_label_values(&["outbox_emitted"])
        .inc_by(emitted);
    // What is left past its retention (an emitted id may wait for a row still in the
    // outbox; that is by design and shows here too).
    if let Ok(s) = inbox::overdue_seconds(pool, inbox_hours).await {
        metrics
            .retention_overdue_seconds
            .with_label_values(&["inbox"])
            .set(s.max(0));
    }
    if let Ok(s) = outbox::emitted_overdue_seconds(pool, outbox_hours).await {
        metrics
            .retention_overdue_seconds
            .with_label_values(&["outbox_emitted"])
            .set(s.max(0));
    }
    if let Ok(n) = inbox::estimated_rows(pool).await {
        metrics.inbox_rows.set(n);
    }
}

/// A row's delivery outcome.
#[derive(Debug)]
enum Outcome {
    /// The broker acknowledged it, at this time.
    Acked(chrono::DateTime<chrono::Utc>),
    /// Not delivered this time (broker unavailable, timeout, queue full): read again.
    Retry,
    /// Refused for good (see [`is_permanent`]): parked.
    Refused(String),
}

type Delivered = (Sent, Outcome);

/// Producer errors that no retry can fix for this row: it is too large, its topic does not
/// exist or may not be written. Every other error (broker down, timeouts, a full queue,
/// leadership changes) passes.
fn is_permanent(error: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        error.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::MessageBatchTooLarge
                | C::InvalidMessage
                | C::InvalidRecord
                | C::UnknownTopic
                | C::UnknownTopicOrPartition
                | C::InvalidTopic
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
        )
    )
}

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
        let mut refused = Vec::new();
        let mut failed = 0usize;
        for (row, outcome) in &outcomes {
            let acked_at = match outcome {
                Outcome::Acked(at) => at,
                Outcome::Retry => {
                    failed += 1;
                    continue;
                }
                Outcome::Refused(error) => {
                    refused.push((row.id, error.clone()));
                    continue;
                }
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
        if !refused.is_empty() {
            // Parked before the held ids are released: a read meanwhile cannot send them again.
            let parked = outbox::park(pool, &refused).await;
            for (id, error) in &refused {
                tracing::error!(outbox_id = id, error = %error, "the broker refused an outbox row for good; parked (authsync outbox parked)");
            }
            metrics.relay_parked.inc_by(refused.len() as u64);
            if let Err(e) = parked {
                for (row, _) in &outcomes {
                    self.held.remove(&row.id);
                }
                return Err(e.into());
            }
        }
        if !published.is_empty() {
            crate::failpoint!("relay-after-ack");
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
        for (k, v) in row.headers() {
            headers = headers.insert(Header {
                key: &k,
                value: Some(&v),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&row.topic).headers(headers);
        if let Some(payload) = &row.payload {
            record = record.payload(payload.as_slice());
        }
        if let Some(key) = &row.key {
            record = record.key(key.as_slice());
        }
        // Enqueue without waiting; the delivery futures are awaited together.
        let delivery = match producer.send_result(record) {
            Ok(delivery) => Ok(delivery),
            Err((e, _)) => {
                tracing::warn!(outbox_id = row.id, error = %e, "producer rejected a message");
                Err(e)
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
            let error = match d {
                Ok(d) => match d.await {
                    Ok(Ok(_)) => return (row, Outcome::Acked(chrono::Utc::now())),
                    Ok(Err((e, _))) => Some(e),
                    Err(_) => None, // the producer went away: retry
                },
                Err(e) => Some(e),
            };
            let outcome = match error {
                Some(e) if is_permanent(&e) => Outcome::Refused(e.to_string()),
                _ => Outcome::Retry,
            };
            (row, outcome)
        }))
        .await;
        (outcomes, started)
    }
}
