//! The Kafka side of the pipeline: fetch, hand each partition's messages to its own task,
//! apply them in micro-batches, store the offsets only after the batch's transaction has
//! committed. The pipeline knows nothing about users: a [`BatchHandler`] per topic does.
//!
//! Offsets: `enable.auto.offset.store=false`; after a commit the task stores `last + 1` and
//! librdkafka's auto-commit sends it. On revocation and on shutdown in-flight batches drain
//! (bounded by `consumer.drain_timeout_ms`) and stored offsets are committed synchronously.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use futures::future::BoxFuture;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConsumerConfig};
use crate::kafka::client_config;
use crate::steps::{run_batch, BatchReport, InputMessage, Step, StepContext};
use crate::store::StoreError;
use crate::telemetry::{Health, Metrics};

/// Applies one micro-batch of one partition.
pub trait BatchHandler: Send + Sync {
    fn handle<'a>(
        &'a self,
        messages: &'a [InputMessage],
    ) -> BoxFuture<'a, Result<BatchReport, StoreError>>;
}

/// A [`Step`] run by [`run_batch`] against a pool.
pub struct StepHandler<S> {
    pub pool: PgPool,
    pub ctx: StepContext,
    pub step: S,
}

impl<S: Step + Send> BatchHandler for StepHandler<S>
where
    S::Decoded: Send,
{
    fn handle<'a>(
        &'a self,
        messages: &'a [InputMessage],
    ) -> BoxFuture<'a, Result<BatchReport, StoreError>> {
        Box::pin(run_batch(&self.pool, &self.ctx, &self.step, messages))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("could not create the Kafka consumer: {0}")]
    Create(#[source] KafkaError),
    #[error("could not subscribe to {topics:?}: {source}")]
    Subscribe {
        topics: Vec<String>,
        #[source]
        source: KafkaError,
    },
}

type PartitionKey = (String, i32);

/// Shared between the fetch loop, the partition's task and the rebalance callback.
struct PartitionState {
    busy: AtomicBool,
    /// Set on revocation: the task stops after its current batch and drops its queue.
    revoked: AtomicBool,
    /// Cancelled when the task must abandon even its current batch (drain deadline passed).
    abort: CancellationToken,
}

#[derive(Default)]
struct Partitions {
    by_key: Mutex<HashMap<PartitionKey, Arc<PartitionState>>>,
}

impl Partitions {
    fn get(&self, key: &PartitionKey) -> Option<Arc<PartitionState>> {
        self.by_key.lock().ok()?.get(key).cloned()
    }
    fn insert(&self, key: PartitionKey, state: Arc<PartitionState>) {
        if let Ok(mut map) = self.by_key.lock() {
            map.insert(key, state);
        }
    }
    fn remove(&self, key: &PartitionKey) -> Option<Arc<PartitionState>> {
        self.by_key.lock().ok()?.remove(key)
    }
    fn all(&self) -> Vec<Arc<PartitionState>> {
        self.by_key
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// Waits until no listed partition has a batch in flight, or the deadline passes.
fn wait_idle(states: &[Arc<PartitionState>], deadline: Instant) -> bool {
    loop {
        if states.iter().all(|s| !s.busy.load(Ordering::Acquire)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Rebalance hooks: drain revoked partitions before they go to another consumer.
pub struct PipelineContext {
    partitions: Arc<Partitions>,
    drain_timeout: Duration,
    metrics: Metrics,
}

impl ClientContext for PipelineContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", fac, "{log_message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{log_message}"),
            _ => tracing::debug!(target: "librdkafka", fac, "{log_message}"),
        }
    }
}

impl ConsumerContext for PipelineContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let revoked: Vec<Arc<PartitionState>> = tpl
            .elements()
            .iter()
            .filter_map(|e| {
                self.partitions
                    .remove(&(e.topic().to_string(), e.partition()))
            })
            .collect();
        for state in &revoked {
            state.revoked.store(true, Ordering::Release);
        }
        let deadline = Instant::now() + self.drain_timeout;
        // This callback runs inside the fetch loop's poll; let the runtime move other tasks
        // (the partition tasks we wait for) off this thread while we block.
        let drained = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                tokio::task::block_in_place(|| wait_idle(&revoked, deadline))
            }
            _ => wait_idle(&revoked, Instant::now()),
        };
        if !drained {
            tracing::warn!("revoked partitions did not drain in time; abandoning their batches");
        }
        for state in &revoked {
            state.abort.cancel();
        }
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            if !matches!(
                e,
                KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)
            ) {
                tracing::warn!(error = %e, "commit on revocation failed");
            }
        }
        tracing::info!(partitions = tpl.count(), "partitions revoked");
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::info!(partitions = tpl.count(), "partitions assigned");
        }
        if let Ok(assignment) = consumer.assignment() {
            let mut per_topic: HashMap<String, i64> = HashMap::new();
            for e in assignment.elements() {
                *per_topic.entry(e.topic().to_string()).or_default() += 1;
            }
            self.metrics.partitions_assigned.reset();
            for (topic, n) in per_topic {
                self.metrics
                    .partitions_assigned
                    .with_label_values(&[&topic])
                    .set(n);
            }
        }
    }
}

type PipelineConsumer = StreamConsumer<PipelineContext>;

/// The consumer settings authsync relies on; user properties cannot override them.
pub fn consumer_client_config(config: &Config) -> rdkafka::ClientConfig {
    let mut cc = client_config(&config.kafka);
    cc.set("group.id", &config.kafka.group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set(
            "session.timeout.ms",
            config.kafka.session_timeout_ms.to_string(),
        )
        .set("enable.partition.eof", "false")
        // Bound what librdkafka pre-fetches: the limit is per partition (16 MiB x 6
        // partitions was most of the worker's memory); the partition queues bound the rest.
        .set(
            "queued.max.messages.kbytes",
            config.consumer.prefetch_kbytes_per_partition.to_string(),
        )
        .set(
            "fetch.wait.max.ms",
            config.consumer.fetch_wait_max_ms.to_string(),
        )
        .set(
            "fetch.queue.backoff.ms",
            config.consumer.fetch_queue_backoff_ms.to_string(),
        );
    cc
}

fn to_input(message: &BorrowedMessage<'_>) -> InputMessage {
    let headers = message
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    InputMessage {
        topic: message.topic().to_string(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        headers,
        timestamp: message
            .timestamp()
            .to_millis()
            .and_then(chrono::DateTime::from_timestamp_millis),
    }
}

/// A message on its way to its partition's task, with when it was fetched.
type Queued = (Instant, InputMessage);

/// Everything a partition task needs.
struct Worker {
    key: PartitionKey,
    state: Arc<PartitionState>,
    handler: Arc<dyn BatchHandler>,
    consumer: Arc<PipelineConsumer>,
    config: ConsumerConfig,
    metrics: Metrics,
    health: Arc<Health>,
}

impl Worker {
    async fn run(self, mut rx: mpsc::Receiver<Queued>) {
        let linger = Duration::from_millis(self.config.batch_linger_ms);
        loop {
            let first = tokio::select! {
                biased;
                _ = self.state.abort.cancelled() => break,
                m = rx.recv() => m,
            };
            let Some((queued_at, first)) = first else {
                break;
            };
            let mut batch = Vec::with_capacity(self.config.batch_size.min(1024));
            batch.push(first);
            // A message waits at most `linger` for company, counted from when it was queued:
            // one that waited behind the previous batch goes at once, with what is queued.
            let deadline = tokio::time::Instant::from_std(queued_at + linger);
            while batch.len() < self.config.batch_size {
                match rx.try_recv() {
                    Ok((_, m)) => batch.push(m),
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        match tokio::time::timeout_at(deadline, rx.recv()).await {
                            Ok(Some((_, m))) => batch.push(m),
                            _ => break,
                        }
                    }
                }
            }
            if self.state.revoked.load(Ordering::Acquire) {
                break;
            }
            self.state.busy.store(true, Ordering::Release);
            let applied = self.apply(&batch).await;
            self.state.busy.store(false, Ordering::Release);
            if !applied {
                break;
            }
        }
    }

    /// Applies a batch, retrying transient failures until it commits; then stores the
    /// offset. Returns false when the batch was abandoned (revocation deadline, abort).
    async fn apply(&self, batch: &[InputMessage]) -> bool {
        let started = Instant::now();
        let topic = self.key.0.as_str();
        // Producer clock → now: broker hop, fetch wait, queueing and batch linger together.
        let now = chrono::Utc::now();
        let delay = self
            .metrics
            .consume_delay_seconds
            .with_label_values(&[topic]);
        for m in batch {
            if let Some(t) = m.timestamp {
                let ms = (now - t).num_milliseconds().max(0);
                delay.observe(ms as f64 / 1000.0);
            }
        }
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.config.retry_initial_ms))
            .with_max_delay(Duration::from_millis(self.config.retry_max_ms))
            .with_jitter()
            .without_max_times();
        let attempt = || self.handler.handle(batch);
        let retried = attempt.retry(backoff).notify(|e: &StoreError, delay| {
            self.metrics.batch_retries.inc();
            self.health.failing_batches.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(topic, partition = self.key.1, error = %e, retry_in = ?delay, "batch failed transiently; retrying");
        });
        let report = tokio::select! {
            biased;
            _ = self.state.abort.cancelled() => return false,
            r = retried => match r {
                Ok(report) => report,
                Err(_) => return false, // without_max_times: not reached
            },
        };
        self.health.failing_batches.store(0, Ordering::Relaxed);

        // The transaction committed: now, and only now, the offset may move.
        let Some(last) = batch.last() else {
            return true;
        };
        let mut tpl = TopicPartitionList::new();
        if tpl
            .add_partition_offset(topic, self.key.1, Offset::Offset(last.offset + 1))
            .is_ok()
        {
            if let Err(e) = self.consumer.store_offsets(&tpl) {
                // Revoked meanwhile: the next owner re-reads these; the inbox skips them.
                tracing::debug!(topic, partition = self.key.1, error = %e, "offset not stored");
            }
        }
        let m = &self.metrics;
        m.batch_seconds
            .with_label_values(&[topic])
            .observe(started.elapsed().as_secs_f64());
        m.batch_size.observe(batch.len() as f64);
        let processed = |outcome: &str, n: u64| {
            if n > 0 {
                m.processed.with_label_values(&[topic, outcome]).inc_by(n);
            }
        };
        processed("applied", report.applied.saturating_sub(report.signed_up));
        processed("signed_up", report.signed_up);
        processed("duplicate", report.duplicates);
        processed("dead_lettered", report.dead_lettered_total());
        if report.duplicates > 0 {
            m.duplicates
                .with_label_values(&[topic])
                .inc_by(report.duplicates);
        }
        for (class, n) in &report.dead_lettered {
            m.dead_lettered
                .with_label_values(&[topic, class])
                .inc_by(*n);
        }
        if report.isolated {
            m.isolated_batches.inc();
        }
        true
    }
}

/// Hands fetched messages to the partition queues without head-of-line blocking.
///
/// librdkafka delivers long runs of one partition (a fetch response per partition). When
/// that partition's queue is full, waiting for it would starve the other partitions, whose
/// queues drain meanwhile (measured: a third of the CPU idle). Instead the message waits in
/// a bounded overflow, in order per partition, and the loop goes on feeding the others; it
/// waits only when the overflow is full, and then for whichever queue frees a slot first.
struct Dispatcher {
    senders: HashMap<PartitionKey, mpsc::Sender<Queued>>,
    overflow: HashMap<PartitionKey, VecDeque<Queued>>,
    /// Messages in `overflow`, all partitions.
    overflowed: usize,
    /// Bound of `overflowed`.
    limit: usize,
}

impl Dispatcher {
    fn new(limit: usize) -> Self {
        Self {
            senders: HashMap::new(),
            overflow: HashMap::new(),
            overflowed: 0,
            limit,
        }
    }

    fn is_live(&self, key: &PartitionKey) -> bool {
        self.senders.get(key).is_some_and(|s| !s.is_closed())
    }

    /// A new queue for `key`; overflow left from an earlier assignment is dropped (those
    /// messages are fetched again from the committed offset, in order).
    fn register(&mut self, key: PartitionKey, tx: mpsc::Sender<Queued>) {
        if let Some(stale) = self.overflow.remove(&key) {
            self.overflowed -= stale.len();
        }
        self.senders.insert(key, tx);
    }

    fn dispatch(&mut self, key: PartitionKey, message: Queued) {
        let Some(tx) = self.senders.get(&key) else {
            return;
        };
        let queue = self.overflow.entry(key).or_default();
        if queue.is_empty() {
            match tx.try_send(message) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(message)) => queue.push_back(message),
            }
        } else {
            queue.push_back(message);
        }
        self.overflowed += 1;
    }

    /// Moves overflow into queues that have room; never waits.
    fn flush(&mut self) {
        if self.overflowed == 0 {
            return;
        }
        for (key, queue) in &mut self.overflow {
            let Some(tx) = self.senders.get(key) else {
                self.overflowed -= queue.len();
                queue.clear();
                continue;
            };
            while let Some(message) = queue.pop_front() {
                match tx.try_send(message) {
                    Ok(()) => self.overflowed -= 1,
                    Err(mpsc::error::TrySendError::Full(message)) => {
                        queue.push_front(message);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        // Revoked: the next owner fetches these again.
                        self.overflowed -= queue.len() + 1;
                        queue.clear();
                    }
                }
            }
        }
    }

    fn is_full(&self) -> bool {
        self.overflowed >= self.limit
    }

    /// Resolves once a partition with overflow has room in its queue.
    async fn room(&self) {
        let waits: Vec<_> = self
            .overflow
            .iter()
            .filter(|(_, queue)| !queue.is_empty())
            .filter_map(|(key, _)| self.senders.get(key))
            .map(|tx| Box::pin(tx.reserve()))
            .collect();
        if !waits.is_empty() {
            // The permit is released at once; `flush` then takes the slot.
            let _ = futures::future::select_all(waits).await;
        }
    }
}

/// Consumes `handlers`' topics until `shutdown`, then drains and commits.
pub async fn run(
    config: &Config,
    handlers: HashMap<String, Arc<dyn BatchHandler>>,
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<(), ConsumerError> {
    let partitions = Arc::new(Partitions::default());
    let context = PipelineContext {
        partitions: partitions.clone(),
        drain_timeout: config.drain_timeout(),
        metrics: metrics.clone(),
    };
    let consumer: PipelineConsumer = consumer_client_config(config)
        .create_with_context(context)
        .map_err(ConsumerError::Create)?;
    let consumer = Arc::new(consumer);
    let topics: Vec<String> = handlers.keys().cloned().collect();
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topic_refs)
        .map_err(|source| ConsumerError::Subscribe {
            topics: topics.clone(),
            source,
        })?;
    tracing::info!(?topics, group = %config.kafka.group_id, "consumer started");
    health.consumer_running.store(true, Ordering::Relaxed);

    // A fetch response's run of one partition (up to 1 MiB) fits in the overflow.
    let mut dispatcher = Dispatcher::new(4 * config.consumer.partition_buffer);
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    let hard_abort = CancellationToken::new();

    loop {
        dispatcher.flush();
        // Back-pressure: with the overflow full the loop waits for a queue to drain, and
        // librdkafka stops fetching once its own pre-fetch queue is full. Shutdown still
        // interrupts.
        if dispatcher.is_full() {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = dispatcher.room() => continue,
            }
        }
        let received = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            received = consumer.recv() => received,
            // Overflow must reach its queue even when no new message arrives.
            _ = dispatcher.room(), if dispatcher.overflowed > 0 => continue,
        };
        let message = match received {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "Kafka consumer error");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let input = to_input(&message);
        drop(message);
        metrics.consumed.with_label_values(&[&input.topic]).inc();
        let key: PartitionKey = (input.topic.clone(), input.partition);
        let live = partitions.get(&key).is_some() && dispatcher.is_live(&key);
        if !live {
            // A partition seen for the first time since its assignment.
            let Some(handler) = handlers.get(&key.0).cloned() else {
                continue;
            };
            let state = Arc::new(PartitionState {
                busy: AtomicBool::new(false),
                revoked: AtomicBool::new(false),
                abort: hard_abort.child_token(),
            });
            partitions.insert(key.clone(), state.clone());
            let (tx, rx) = mpsc::channel(config.consumer.partition_buffer);
            dispatcher.register(key.clone(), tx);
            let worker = Worker {
                key: key.clone(),
                state,
                handler,
                consumer: consumer.clone(),
                config: config.consumer.clone(),
                metrics: metrics.clone(),
                health: health.clone(),
            };
            tasks.retain(|t| !t.is_finished());
            tasks.push(tokio::spawn(worker.run(rx)));
        }
        dispatcher.dispatch(key, (Instant::now(), input));
    }

    // Shutdown: stop fetching, let every task finish what it holds, commit, leave.
    health.shutting_down.store(true, Ordering::Relaxed);
    tracing::info!("consumer draining");
    drop(dispatcher);
    let drain = futures::future::join_all(tasks);
    tokio::pin!(drain);
    if tokio::time::timeout(config.drain_timeout(), &mut drain)
        .await
        .is_err()
    {
        tracing::warn!(
            "drain deadline passed; abandoning unfinished batches (they will be redelivered)"
        );
        hard_abort.cancel();
        let _ = drain.await;
    }
    for state in partitions.all() {
        state.abort.cancel();
    }
    let consumer_for_commit = consumer.clone();
    let committed = tokio::task::spawn_blocking(move || {
        consumer_for_commit.commit_consumer_state(CommitMode::Sync)
    })
    .await;
    match committed {
        Ok(Ok(())) => tracing::info!("offsets committed"),
        Ok(Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset))) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "final offset commit failed"),
        Err(e) => tracing::warn!(error = %e, "final offset commit task failed"),
    }
    consumer.unsubscribe();
    health.consumer_running.store(false, Ordering::Relaxed);
    tracing::info!("consumer stopped");
    Ok(())
}
