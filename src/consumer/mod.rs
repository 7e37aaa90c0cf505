//! The Kafka side of the pipeline: each assigned partition gets its own librdkafka queue
//! and its own task, which applies the partition's messages in micro-batches and stores the
//! offset only after the batch's transaction has committed. The pipeline knows nothing about
//! users: a [`BatchHandler`] per topic does.
//!
//! Why a queue per partition: librdkafka stops fetching a partition when *its* queue holds
//! `queued.max.messages.kbytes`. With every partition forwarded into the one consumer queue,
//! the check counts the shared queue, so one partition's backlog stopped the fetching of all
//! the others and partitions were applied one after another (1.4 of 6 busy on average).
//! A split queue also gives back-pressure per partition without any buffer of our own.
//!
//! Offsets: `enable.auto.offset.store=false`; after a commit the task stores `last + 1` and
//! librdkafka's auto-commit sends it. On revocation and on shutdown in-flight batches drain
//! (bounded by `consumer.drain_timeout_ms`) and stored offsets are committed synchronously.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use futures::future::BoxFuture;
use futures::FutureExt;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConsumerConfig};
use crate::kafka::client_config;
use crate::steps::{run_batch, run_batch_waiting, BatchReport, InputMessage, Step, StepContext};
use crate::store::LockWait;
use crate::store::StoreError;
use crate::telemetry::{Health, Metrics};

/// Applies one micro-batch of one partition.
pub trait BatchHandler: Send + Sync {
    fn handle<'a>(
        &'a self,
        messages: &'a [InputMessage],
    ) -> BoxFuture<'a, Result<BatchReport, StoreError>>;

    /// [`Self::handle`] for a transaction that carries several partitions' batches: it
    /// waits at most [`SHARED_LOCK_WAIT`] for a row lock, then fails transiently.
    fn handle_shared<'a>(
        &'a self,
        messages: &'a [InputMessage],
    ) -> BoxFuture<'a, Result<BatchReport, StoreError>>;

    /// Dead-letters one message whose step failed in a way no retry can fix (see
    /// [`crate::steps::last_resort`]). Fails only while the database is unavailable.
    fn last_resort<'a>(
        &'a self,
        message: &'a InputMessage,
        error: &'a StoreError,
    ) -> BoxFuture<'a, Result<BatchReport, StoreError>>;
}

/// The contract every applier of input batches keeps (the partition workers and the online
/// replay lane): a batch always ends committed, each of its messages applied or
/// dead-lettered. Transient failures are retried with backoff, without limit (the caller
/// drops the future to give up); a failure no retry can fix is narrowed down to its message
/// by applying the batch again one message at a time, and that message ends in a
/// last-resort dead letter.
pub(crate) struct Containment<'a> {
    pub(crate) handler: &'a dyn BatchHandler,
    /// `retry_initial_ms` and `retry_max_ms`: the backoff.
    pub(crate) retry: &'a ConsumerConfig,
    /// Told of each transient failure and the pause before the next attempt.
    pub(crate) on_retry: OnRetry<'a>,
    /// Told of a message skipped because even its last-resort dead letter was refused.
    pub(crate) on_skipped: OnSkipped<'a>,
}

/// See [`Containment::on_retry`].
pub(crate) type OnRetry<'a> = Box<dyn Fn(&StoreError, Duration) + Send + Sync + 'a>;
/// See [`Containment::on_skipped`].
pub(crate) type OnSkipped<'a> = Box<dyn Fn(&InputMessage, &StoreError) + Send + Sync + 'a>;

impl Containment<'_> {
    /// Applies `batch` (or, when `failed` says how its first attempt failed for good,
    /// starts from that) and returns what happened to its messages.
    pub(crate) async fn apply(
        &self,
        batch: &[InputMessage],
        failed: Option<StoreError>,
    ) -> BatchReport {
        let first = match failed {
            Some(e) => e,
            None => match self.retrying(|| self.handler.handle(batch)).await {
                Ok(report) => return report,
                Err(e) => e,
            },
        };
        tracing::error!(
            topic = batch.first().map(|m| m.topic.as_str()),
            partition = batch.first().map(|m| m.partition),
            error = %first,
            kind = first.kind(),
            size = batch.len(),
            "batch failed permanently; applying its messages one by one"
        );
        let mut total = BatchReport {
            isolated: true,
            ..BatchReport::default()
        };
        let mut first = Some(first);
        for message in batch {
            let one = std::slice::from_ref(message);
            let error = match first.take().filter(|_| batch.len() == 1) {
                Some(error) => error,
                None => match self.retrying(|| self.handler.handle(one)).await {
                    Ok(report) => {
                        total.absorb(report);
                        continue;
                    }
                    Err(error) => error,
                },
            };
            match self
                .retrying(|| self.handler.last_resort(message, &error))
                .await
            {
                Ok(report) => total.absorb(report),
                // Nothing authsync writes there can be refused; if it is, say where the
                // message is so it can be replayed, and move on.
                Err(e) => (self.on_skipped)(message, &e),
            }
        }
        total
    }

    /// Runs `attempt` until it succeeds or fails in a way retrying cannot fix, backing off
    /// between transient failures.
    async fn retrying<F, Fut>(&self, attempt: F) -> Result<BatchReport, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<BatchReport, StoreError>>,
    {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.retry.retry_initial_ms))
            .with_max_delay(Duration::from_millis(self.retry.retry_max_ms))
            .with_jitter()
            .without_max_times();
        attempt
            .retry(backoff)
            .when(StoreError::is_retryable)
            .notify(|e: &StoreError, delay| (self.on_retry)(e, delay))
            .await
    }
}

/// A [`Step`] run by [`run_batch`] against a pool.
pub struct StepHandler<S> {
    pub pool: PgPool,
    pub ctx: StepContext,
    pub step: S,
    /// Told after every commit (the relay of this process reads then).
    pub committed: crate::relay::CommitSignal,
}

impl<S: Step + Send> BatchHandler for StepHandler<S>
where
    S::Decoded: Send,
{
    fn handle<'a>(
        &'a self,
        messages: &'a [InputMessage],
    ) -> BoxFuture<'a, Result<BatchReport, StoreError>> {
        Box::pin(self.telling_the_relay(run_batch(&self.pool, &self.ctx, &self.step, messages)))
    }

    fn handle_shared<'a>(
        &'a self,
        messages: &'a [InputMessage],
    ) -> BoxFuture<'a, Result<BatchReport, StoreError>> {
        Box::pin(self.telling_the_relay(run_batch_waiting(
            &self.pool,
            &self.ctx,
            &self.step,
            messages,
            LockWait::AtMost(SHARED_LOCK_WAIT),
        )))
    }

    fn last_resort<'a>(
        &'a self,
        message: &'a InputMessage,
        error: &'a StoreError,
    ) -> BoxFuture<'a, Result<BatchReport, StoreError>> {
        Box::pin(self.telling_the_relay(crate::steps::last_resort(
            &self.pool, &self.ctx, &self.step, message, error,
        )))
    }
}

impl<S> StepHandler<S> {
    /// Runs `step` and, once it committed, tells the relay.
    async fn telling_the_relay(
        &self,
        step: impl std::future::Future<Output = Result<BatchReport, StoreError>>,
    ) -> Result<BatchReport, StoreError> {
        let report = step.await;
        if report.is_ok() {
            self.committed.notify_one();
        }
        report
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
    /// Its messages would arrive on the shared queue, out of reach of the partition's task.
    #[error("partition {topic}[{partition}] got no queue of its own from librdkafka")]
    Unsplit { topic: String, partition: i32 },
}

type PartitionKey = (String, i32);

/// One assignment of one partition, shared by its task and the rebalance callback.
/// A new assignment gets a new state, so a batch gathered under an earlier one is
/// recognised as stale.
struct PartitionState {
    busy: AtomicBool,
    /// Set on revocation: a batch not yet started is dropped, a running one finishes.
    revoked: AtomicBool,
    /// Cancelled when the task must abandon even its current batch (drain deadline passed).
    abort: CancellationToken,
}

impl PartitionState {
    fn new(abort: CancellationToken) -> Self {
        Self {
            busy: AtomicBool::new(false),
            revoked: AtomicBool::new(false),
            abort,
        }
    }

    /// Marks the start of a batch; false when the assignment was revoked meanwhile.
    /// Paired with the callback's store of `revoked` before it reads `busy` (both SeqCst):
    /// either the task sees the revocation or the callback sees the batch and waits for it.
    fn begin_batch(&self) -> bool {
        self.busy.store(true, Ordering::SeqCst);
        if self.revoked.load(Ordering::SeqCst) {
            self.busy.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    fn end_batch(&self) {
        self.busy.store(false, Ordering::SeqCst);
    }
}

/// The current assignment of each partition.
#[derive(Default)]
struct Partitions {
    by_key: Mutex<HashMap<PartitionKey, Arc<PartitionState>>>,
}

impl Partitions {
    fn get(&self, key: &PartitionKey) -> Option<Arc<PartitionState>> {
        self.by_key.lock().ok()?.get(key).cloned()
    }
    fn insert(&self, key: PartitionKey, state: Arc<PartitionState>) -> Option<Arc<PartitionState>> {
        self.by_key.lock().ok()?.insert(key, state)
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
        if states.iter().all(|s| !s.busy.load(Ordering::SeqCst)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

type PipelineConsumer = StreamConsumer<PipelineContext>;
type PartitionQueue = StreamPartitionQueue<PipelineContext>;

/// What the rebalance callback hands to the consume loop.
enum Assigned {
    /// A partition assigned for the first time: its queue, for a new task.
    Queue(PartitionKey, PartitionQueue),
    /// librdkafka gave no queue for it; its messages would go to the shared queue.
    Unsplit(PartitionKey),
}

/// Rebalance hooks: give new partitions their own queue before their fetch starts, drain
/// revoked partitions before they go to another consumer.
pub struct PipelineContext {
    /// The one input topic this consumer reads (see [`run`]: one group member per topic).
    topic: String,
    /// Its partitions as last exported (`authsync_partition_owned`).
    owned: Mutex<HashSet<i32>>,
    /// Told of this member's first assignment (see [`StartUp`]).
    start_up: Arc<StartUp>,
    first_assignment_seen: AtomicBool,
    /// Counts this member's completed rebalances (see [`leave_one_by_one`]).
    rebalances: tokio::sync::watch::Sender<u64>,
    partitions: Arc<Partitions>,
    /// Partitions whose queue is already split off (a split lasts for the client's life).
    split: Mutex<HashSet<PartitionKey>>,
    /// Set once the consumer exists; splitting needs the `Arc`.
    consumer: OnceLock<Weak<PipelineConsumer>>,
    assigned: mpsc::UnboundedSender<Assigned>,
    /// Parent of every assignment's abort token.
    hard_abort: CancellationToken,
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

impl PipelineContext {
    /// Runs before librdkafka starts fetching the assigned partitions, so the split happens
    /// before any of their messages reach the shared queue (no message changes queue, so
    /// none is reordered). The state goes in first: a message popped without one is dropped.
    fn on_assign(&self, tpl: &TopicPartitionList) {
        for e in tpl.elements() {
            let key: PartitionKey = (e.topic().to_string(), e.partition());
            let state = Arc::new(PartitionState::new(self.hard_abort.child_token()));
            if let Some(stale) = self.partitions.insert(key.clone(), state) {
                // Assignment lost without a revocation: its unstarted batches are stale.
                stale.revoked.store(true, Ordering::SeqCst);
            }
            let Ok(mut split) = self.split.lock() else {
                continue;
            };
            if split.contains(&key) {
                continue;
            }
            let queue = self
                .consumer
                .get()
                .and_then(Weak::upgrade)
                .and_then(|c| c.split_partition_queue(&key.0, key.1));
            let event = match queue {
                Some(queue) => {
                    split.insert(key.clone());
                    Assigned::Queue(key, queue)
                }
                None => Assigned::Unsplit(key),
            };
            // The receiver only goes away after the consume loop has stopped.
            let _ = self.assigned.send(event);
        }
    }

    fn on_revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let revoked: Vec<Arc<PartitionState>> = tpl
            .elements()
            .iter()
            .filter_map(|e| {
                self.partitions
                    .remove(&(e.topic().to_string(), e.partition()))
            })
            .collect();
        for state in &revoked {
            state.revoked.store(true, Ordering::SeqCst);
        }
        let deadline = Instant::now() + self.drain_timeout;
        // This callback runs inside the consume loop's poll; let the runtime move other
        // tasks (the partition tasks we wait for) off this thread while we block.
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
}

impl ConsumerContext for PipelineContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => self.on_assign(tpl),
            Rebalance::Revoke(tpl) => self.on_revoke(consumer, tpl),
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance failed"),
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::info!(topic = %self.topic, partitions = tpl.count(), "partitions assigned");
            if !self.first_assignment_seen.swap(true, Ordering::SeqCst) {
                self.start_up.member_assigned();
            }
        }
        self.publish_assignment(rebalance);
        self.rebalances.send_modify(|n| *n += 1);
    }
}

impl PipelineContext {
    /// Exports what this member owns after `rebalance`. Kept from the rebalances' own
    /// partition lists (increments with the cooperative protocol, whole sets with an eager
    /// one: both add up). Never `consumer.assignment()` here: it waits for librdkafka's
    /// group thread with no timeout, and while a consumer closes (its final rebalance runs
    /// inside `Drop`) that thread no longer answers, which hung a worker's shutdown.
    fn publish_assignment(&self, rebalance: &Rebalance<'_>) {
        let Ok(mut owned) = self.owned.lock() else {
            return;
        };
        let m = &self.metrics;
        match rebalance {
            Rebalance::Assign(tpl) => {
                for e in tpl.elements().iter().filter(|e| e.topic() == self.topic) {
                    owned.insert(e.partition());
                    m.partition_owned
                        .with_label_values(&[&self.topic, &e.partition().to_string()])
                        .set(1);
                }
            }
            Rebalance::Revoke(tpl) => {
                for e in tpl.elements().iter().filter(|e| e.topic() == self.topic) {
                    owned.remove(&e.partition());
                    let _ = m
                        .partition_owned
                        .remove_label_values(&[&self.topic, &e.partition().to_string()]);
                }
            }
            Rebalance::Error(_) => {}
        }
        m.partitions_assigned
            .with_label_values(&[&self.topic])
            .set(owned.len() as i64);
    }
}

/// The process's members join the group one by one, and each join re-balances the members
/// already in. Partition tasks pull only once every member has had its first assignment
/// (or after [`START_UP_SETTLE_MAX`]), so no batch is taken from a fetch the next join
/// discards and fetches again from the committed offset. (tansu 0.6 returns nothing for a
/// fetch that starts inside a record batch, so there such a re-fetch stalled the partition.)
struct StartUp {
    members: usize,
    assigned: std::sync::atomic::AtomicUsize,
    settled: tokio::sync::watch::Sender<bool>,
}

/// Longest the partition tasks wait for the other members' first assignments.
const START_UP_SETTLE_MAX: Duration = Duration::from_secs(10);

impl StartUp {
    fn member_assigned(&self) {
        if self.assigned.fetch_add(1, Ordering::SeqCst) + 1 >= self.members {
            self.settled.send_replace(true);
        }
    }
}

/// The settings of the group member that reads `topic`: the ones authsync relies on
/// ([`consumer_client_config`]), and a static member id of its own when one is set (two
/// members with one id would fence each other).
fn topic_consumer_config(config: &Config, topic: &str) -> rdkafka::ClientConfig {
    let mut cc = consumer_client_config(config);
    if let Some(id) = cc.get("group.instance.id").map(str::to_owned) {
        cc.set("group.instance.id", format!("{id}-{topic}"));
    }
    let client_id = cc.get("client.id").unwrap_or("authsync").to_owned();
    cc.set("client.id", format!("{client_id}-{topic}"));
    cc
}

/// The consumer settings authsync relies on; user properties cannot override them.
pub fn consumer_client_config(config: &Config) -> rdkafka::ClientConfig {
    let fetch_bytes = config.consumer.fetch_max_kbytes * 1024;
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
        // Per partition, since each partition has its own queue: the only buffer between
        // the broker and the batches, so it is both the memory bound and the back-pressure.
        .set(
            "queued.max.messages.kbytes",
            config.consumer.prefetch_kbytes_per_partition.to_string(),
        )
        .set(
            "fetch.wait.max.ms",
            config.consumer.fetch_wait_max_ms.to_string(),
        )
        // Small responses: every partition fetches, and each holds a response's share,
        // decompressed (lz4 JSON: ~9x), until its task has taken it. librdkafka wants
        // `message.max.bytes` (a request limit, irrelevant to this consumer) below it.
        .set("fetch.max.bytes", fetch_bytes.to_string())
        .set("max.partition.fetch.bytes", fetch_bytes.to_string())
        .set(
            "message.max.bytes",
            fetch_bytes.clamp(1000, 1_000_000).to_string(),
        )
        .set(
            "fetch.queue.backoff.ms",
            config.consumer.fetch_queue_backoff_ms.to_string(),
        );
    cc
}

pub(crate) fn to_input(message: &BorrowedMessage<'_>) -> InputMessage {
    let headers = crate::kafka::message_headers(message);
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

/// How long a transaction carrying several partitions' batches waits for a row lock. A
/// partition's own batch waits for its row as long as it takes (its order depends on it);
/// a shared one gives up after this and its batches go on alone, so a row held by an
/// operator's session or a long merge stalls only the partition that needs it.
pub const SHARED_LOCK_WAIT: Duration = Duration::from_secs(1);

/// How long a small transaction waits for the previous small one before it runs beside
/// it. Waiting gathers company under a trickle (commits are the cost); bounding it keeps
/// one partition stuck on a lock from holding up every other partition's small batches.
const SMALL_TRANSACTION_WAIT: Duration = Duration::from_millis(20);

/// What a partition's batch got from its first attempt in a combined transaction.
enum FirstAttempt {
    /// Committed (a combined transaction's report goes to its first batch, empty ones to
    /// the others, so the counters add up).
    Applied(BatchReport),
    /// It ran alone and failed with this error: the partition goes on from there.
    Failed(StoreError),
    /// It ran with other partitions' batches and the transaction failed: the partition
    /// applies its batch on its own, from the start (the failure may not be its own).
    Shared,
}

struct Job {
    messages: Vec<InputMessage>,
    done: tokio::sync::oneshot::Sender<(Vec<InputMessage>, FirstAttempt)>,
}

/// Group commit: the batches of a topic's partitions that are ready while every slot
/// (`consumer.max_batches_in_flight`) is busy go together into the next free slot, as one
/// transaction of at most `consumer.batch_size` messages; small transactions (under a tenth
/// of that) also run one at a time, so that under a trickle the next one gathers what
/// arrives meanwhile. An idle pipeline runs each batch at once and alone; a busy one runs
/// fewer, larger transactions instead of queueing small ones (at 1,000 logins/s over 6 partitions, batches averaged 2.6 messages, held 3.5 of 4
/// slots, and their time went to per-transaction round trips). Each partition still has one
/// batch in flight at a time, so its order holds; its offset moves only after the commit.
struct Combiner {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Combiner {
    fn start(
        handler: Arc<dyn BatchHandler>,
        in_flight: Arc<Semaphore>,
        max_messages: usize,
        metrics: Metrics,
    ) -> Self {
        let (jobs, queue) = mpsc::unbounded_channel();
        tokio::spawn(Self::run(handler, in_flight, max_messages, metrics, queue));
        Self { jobs }
    }

    /// Applies `messages` (once, no retry) in the next free slot, with whatever other
    /// batches are waiting. `None` when the consumer is stopping.
    async fn submit(
        &self,
        messages: Vec<InputMessage>,
    ) -> Option<(Vec<InputMessage>, FirstAttempt)> {
        let (done, result) = tokio::sync::oneshot::channel();
        self.jobs.send(Job { messages, done }).ok()?;
        result.await.ok()
    }

    async fn run(
        handler: Arc<dyn BatchHandler>,
        in_flight: Arc<Semaphore>,
        max_messages: usize,
        metrics: Metrics,
        mut queue: mpsc::UnboundedReceiver<Job>,
    ) {
        let mut carried: Option<Job> = None;
        let small = Arc::new(Semaphore::new(1));
        let small_below = (max_messages / 10).max(2);
        loop {
            // A job first, then a slot (every topic's combiner shares the slots: one waiting
            // for work must not hold one), then whatever else queued meanwhile.
            let first = match carried.take() {
                Some(job) => job,
                None => match queue.recv().await {
                    Some(job) => job,
                    None => break,
                },
            };
            let Ok(slot) = in_flight.clone().acquire_owned().await else {
                break;
            };
            let mut total = first.messages.len();
            let mut jobs = vec![first];
            Self::gather(
                &mut queue,
                &mut jobs,
                &mut total,
                &mut carried,
                max_messages,
            );
            // Small transactions run one at a time: while one runs the next gathers company
            // (their cost is per transaction, not per message). Large ones use every slot.
            let small_slot = if total < small_below && carried.is_none() {
                let small_slot = match tokio::time::timeout(
                    SMALL_TRANSACTION_WAIT,
                    small.clone().acquire_owned(),
                )
                .await
                {
                    Ok(Ok(small_slot)) => Some(small_slot),
                    Ok(Err(_)) => break,
                    // The previous one is stuck (a lock, a slow database): run beside it.
                    Err(_) => None,
                };
                Self::gather(
                    &mut queue,
                    &mut jobs,
                    &mut total,
                    &mut carried,
                    max_messages,
                );
                small_slot
            } else {
                None
            };
            metrics.transaction_messages.observe(total as f64);
            let handler = handler.clone();
            tokio::spawn(async move {
                let _slots = (slot, small_slot);
                Self::apply(handler.as_ref(), jobs, total).await;
            });
        }
    }

    /// Adds the jobs already queued to `jobs`, up to `max_messages` in all; the first that
    /// does not fit is carried to the next transaction.
    fn gather(
        queue: &mut mpsc::UnboundedReceiver<Job>,
        jobs: &mut Vec<Job>,
        total: &mut usize,
        carried: &mut Option<Job>,
        max_messages: usize,
    ) {
        while *total < max_messages && carried.is_none() {
            match queue.try_recv() {
                Ok(job) if *total + job.messages.len() <= max_messages => {
                    *total += job.messages.len();
                    jobs.push(job);
                }
                Ok(job) => *carried = Some(job),
                Err(_) => break,
            }
        }
    }

    async fn apply(handler: &dyn BatchHandler, mut jobs: Vec<Job>, total: usize) {
        if jobs.len() == 1 {
            let Some(job) = jobs.pop() else { return };
            let attempt = match handler.handle(&job.messages).await {
                Ok(report) => FirstAttempt::Applied(report),
                Err(e) => FirstAttempt::Failed(e),
            };
            let _ = job.done.send((job.messages, attempt));
            return;
        }
        let mut messages = Vec::with_capacity(total);
        let mut sizes = Vec::with_capacity(jobs.len());
        for job in &mut jobs {
            sizes.push(job.messages.len());
            messages.append(&mut job.messages);
        }
        let result = handler.handle_shared(&messages).await;
        if let Err(e) = &result {
            tracing::debug!(error = %e, batches = sizes.len(), "combined transaction failed; its batches go on alone");
        }
        let failed = result.is_err();
        let mut report = result.ok();
        // Back to their partitions, in order.
        let mut rest = messages;
        for (job, size) in jobs.into_iter().zip(sizes) {
            let tail = rest.split_off(size.min(rest.len()));
            let mine = std::mem::replace(&mut rest, tail);
            let attempt = if failed {
                FirstAttempt::Shared
            } else {
                FirstAttempt::Applied(report.take().unwrap_or_default())
            };
            let _ = job.done.send((mine, attempt));
        }
    }
}

/// One partition's task: takes micro-batches off the partition's queue and applies them,
/// for as long as the process runs (across revocations and re-assignments).
struct PartitionWorker {
    key: PartitionKey,
    partitions: Arc<Partitions>,
    handler: Arc<dyn BatchHandler>,
    consumer: Arc<PipelineConsumer>,
    config: ConsumerConfig,
    metrics: Metrics,
    health: Arc<Health>,
    /// Batches applied at once, all partitions together (`consumer.max_batches_in_flight`):
    /// taken by the combiner, and here while a batch is retried or isolated on its own.
    in_flight: Arc<Semaphore>,
    /// The first attempt of every batch goes through the topic's combiner.
    combiner: Arc<Combiner>,
    /// True once the process's group members have settled (see [`StartUp`]).
    settled: tokio::sync::watch::Receiver<bool>,
}

impl PartitionWorker {
    fn warn_consumer_error(&self, e: &KafkaError) {
        tracing::warn!(topic = %self.key.0, partition = self.key.1, error = %e, "Kafka consumer error");
    }

    async fn run(mut self, queue: PartitionQueue, shutdown: CancellationToken) {
        let linger = Duration::from_millis(self.config.batch_linger_ms);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                self.health.forget(&self.key.0, self.key.1);
                return;
            }
            _ = self.settled.wait_for(|settled| *settled) => {}
        }
        let consumed = self.metrics.consumed.with_label_values(&[&self.key.0]);
        loop {
            // A message that was already queued (it waited behind the previous batch) goes
            // at once with whatever else is queued; one awaited on an idle partition waits
            // up to `linger` for company.
            let (first, waited) = match queue.recv().now_or_never() {
                Some(received) => (received, false),
                None => tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    received = queue.recv() => (received, true),
                },
            };
            if shutdown.is_cancelled() {
                break;
            }
            let first = match first {
                Ok(m) => to_input(&m),
                Err(e) => {
                    self.warn_consumer_error(&e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            consumed.inc();
            // No state: the partition was revoked after this message was fetched; its next
            // owner reads it again from the committed offset.
            let Some(state) = self.partitions.get(&self.key) else {
                continue;
            };
            self.health.holding(&self.key.0, self.key.1);
            let mut batch = Vec::with_capacity(self.config.batch_size.min(1024));
            batch.push(first);
            let deadline =
                tokio::time::Instant::now() + if waited { linger } else { Duration::ZERO };
            while batch.len() < self.config.batch_size {
                // `timeout_at` polls first: queued messages are taken even past the deadline.
                match tokio::time::timeout_at(deadline, queue.recv()).await {
                    Ok(Ok(m)) => {
                        consumed.inc();
                        batch.push(to_input(&m));
                    }
                    Ok(Err(e)) => {
                        self.warn_consumer_error(&e);
                        break;
                    }
                    Err(_) => break,
                }
            }
            if !state.begin_batch() {
                self.health.forget(&self.key.0, self.key.1);
                continue;
            }
            self.apply(&state, batch).await;
            state.end_batch();
            if state.revoked.load(Ordering::SeqCst) {
                self.health.forget(&self.key.0, self.key.1);
            }
        }
        self.health.forget(&self.key.0, self.key.1);
    }

    /// How this partition's failed batches are carried to the end (see [`Containment`]):
    /// the consumer's backoff, and every transient failure counted and shown in health.
    fn containment(&self) -> Containment<'_> {
        Containment {
            handler: self.handler.as_ref(),
            retry: &self.config,
            on_retry: Box::new(move |e: &StoreError, delay: Duration| {
                let (topic, partition) = (self.key.0.as_str(), self.key.1);
                self.metrics.batch_retries.inc();
                self.health.failed(topic, partition, &e.to_string());
                tracing::warn!(topic, partition, error = %e, kind = e.kind(), retry_in = ?delay, "batch failed transiently; retrying");
            }),
            on_skipped: Box::new(move |m: &InputMessage, e: &StoreError| {
                self.metrics.last_resort_failures.inc();
                tracing::error!(topic = m.topic.as_str(), partition = m.partition, offset = m.offset, error = %e, "the last-resort dead letter failed too; the message is skipped (replay it from this offset)");
            }),
        }
    }

    /// Applies `batch` so that the partition moves on whatever happens (see
    /// [`Containment::apply`]); `attempt` is what the combined transaction already did with
    /// it. `None` when the assignment was aborted meanwhile.
    async fn apply_contained(
        &self,
        state: &PartitionState,
        batch: &[InputMessage],
        attempt: FirstAttempt,
    ) -> Option<BatchReport> {
        let (topic, partition) = (self.key.0.as_str(), self.key.1);
        let failed = match attempt {
            FirstAttempt::Applied(report) => return Some(report),
            FirstAttempt::Failed(e) if !e.is_retryable() => Some(e),
            FirstAttempt::Failed(e) => {
                self.metrics.batch_retries.inc();
                self.health.failed(topic, partition, &e.to_string());
                tracing::warn!(topic, partition, error = %e, kind = e.kind(), "batch failed transiently; retrying");
                let pause = Duration::from_millis(self.config.retry_initial_ms);
                tokio::select! {
                    biased;
                    _ = state.abort.cancelled() => return None,
                    _ = tokio::time::sleep(pause) => {}
                }
                None
            }
            FirstAttempt::Shared => None,
        };
        // From here the batch is on its own, in a slot of its own.
        let _slot = tokio::select! {
            biased;
            _ = state.abort.cancelled() => return None,
            slot = self.in_flight.acquire() => slot.ok()?,
        };
        let containment = self.containment();
        tokio::select! {
            biased;
            _ = state.abort.cancelled() => None,
            report = containment.apply(batch, failed) => Some(report),
        }
    }

    /// Applies a batch (see [`Self::apply_contained`]: it always ends committed, every
    /// message applied or dead-lettered); then stores the offset. Gives up only when the
    /// assignment's abort token fires (drain deadline).
    async fn apply(&self, state: &PartitionState, batch: Vec<InputMessage>) {
        let started = Instant::now();
        let topic = self.key.0.as_str();
        // Producer clock → now: broker hop, fetch wait, queueing and batch linger together.
        let now = chrono::Utc::now();
        let delay = self
            .metrics
            .consume_delay_seconds
            .with_label_values(&[topic]);
        for m in &batch {
            if let Some(t) = m.timestamp {
                let ms = (now - t).num_milliseconds().max(0);
                delay.observe(ms as f64 / 1000.0);
            }
        }
        let submitted = tokio::select! {
            biased;
            _ = state.abort.cancelled() => None,
            done = self.combiner.submit(batch) => done,
        };
        let Some((batch, attempt)) = submitted else {
            return;
        };
        let Some(report) = self.apply_contained(state, &batch, attempt).await else {
            return;
        };
        self.health.committed(topic, self.key.1);

        crate::failpoint!("consumer-after-commit");
        // The transaction committed: now, and only now, the offset may move.
        let Some(last) = batch.last() else {
            return;
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
        processed("waiting", report.waiting);
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
    }
}

/// Commits the stored offsets and leaves the group, giving up at `deadline` (at least 1 s
/// from now). Both calls block until the group coordinator answers, and with the broker
/// gone that is only when the session times out (`kafka.session_timeout_ms`, 45 s by
/// default, longer than the pod's grace period). So they run on a thread of their own,
/// which the process does not wait for; offsets not committed are re-read by the next
/// owner, and the inbox skips what was applied.
async fn close_within(consumer: Arc<PipelineConsumer>, deadline: tokio::time::Instant) {
    let deadline = deadline.max(tokio::time::Instant::now() + Duration::from_secs(1));
    let (committed_tx, committed) = tokio::sync::oneshot::channel();
    let (closed_tx, closed) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("consumer-close".into())
        .spawn(move || {
            let _ = committed_tx.send(consumer.commit_consumer_state(CommitMode::Sync));
            consumer.unsubscribe();
            // Dropping the last reference closes the consumer, which polls it until the
            // group is left: that belongs on this thread, never on a runtime worker. Wait
            // (bounded) for any other holder to let go first.
            let until = std::time::Instant::now() + Duration::from_secs(5);
            while Arc::strong_count(&consumer) > 1 && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            drop(consumer);
            let _ = closed_tx.send(());
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the consumer-close thread; not committing");
        return;
    }
    match tokio::time::timeout_at(deadline, committed).await {
        Ok(Ok(Ok(()))) => tracing::info!("offsets committed"),
        Ok(Ok(Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "final offset commit failed"),
        Ok(Err(_)) => tracing::warn!("final offset commit did not report"),
        Err(_) => {
            tracing::warn!("final offset commit timed out (broker unreachable?); leaving it");
            return;
        }
    }
    if tokio::time::timeout_at(deadline, closed).await.is_err() {
        tracing::warn!("leaving the consumer group timed out (broker unreachable?)");
    }
}

/// Longest a member waits, after another member of the process left, for the rebalance
/// that leave caused before it leaves too.
const LEAVE_SETTLE_MAX: Duration = Duration::from_secs(5);
/// How long the members staying must see no further rebalance before the next one leaves.
const LEAVE_QUIET: Duration = Duration::from_millis(500);

/// The process's members leave the group one at a time. Each leave starts a rebalance
/// that the members still in must complete (their pollers keep serving it) before the
/// next one leaves. Two members leaving within one rebalance left tansu 0.6 with a group
/// whose leader was gone: every later join (a replay, the next worker) waited on that
/// leader's assignment for good. Bounded by the drain deadline and [`LEAVE_SETTLE_MAX`].
async fn leave_one_by_one(
    consumers: HashMap<String, Arc<PipelineConsumer>>,
    mut pollers: HashMap<String, (CancellationToken, JoinHandle<()>)>,
    deadline: tokio::time::Instant,
) {
    let mut members: Vec<(String, Arc<PipelineConsumer>)> = consumers.into_iter().collect();
    members.sort_by(|a, b| a.0.cmp(&b.0));
    let watch =
        |members: &[(String, Arc<PipelineConsumer>)]| -> Vec<tokio::sync::watch::Receiver<u64>> {
            members
                .iter()
                .map(|(_, c)| {
                    let mut seen = c.context().rebalances.subscribe();
                    seen.mark_unchanged();
                    seen
                })
                .collect()
        };
    while !members.is_empty() {
        // Closing a member in the middle of an assignment aborts inside librdkafka
        // (`!rd_kafka_assignment_in_progress`), and a cooperative rebalance can take a
        // second round: leave only once every member still here has been quiet a moment.
        let mut present = watch(&members);
        let settle = deadline.min(tokio::time::Instant::now() + LEAVE_SETTLE_MAX);
        let _ = tokio::time::timeout_at(settle, quiet(&mut present)).await;
        let (topic, consumer) = members.remove(0);
        let mut staying = watch(&members);
        if let Some((poller_stop, poller)) = pollers.remove(&topic) {
            poller_stop.cancel();
            let _ = poller.await;
        }
        close_within(consumer, deadline).await;
        if staying.is_empty() {
            break;
        }
        // The members staying must see the rebalance this leave caused.
        let settle = deadline.min(tokio::time::Instant::now() + LEAVE_SETTLE_MAX);
        let seen = tokio::time::timeout_at(settle, async {
            for seen in &mut staying {
                let _ = seen.changed().await;
            }
        })
        .await;
        if seen.is_err() {
            tracing::info!(%topic, "the other members did not rebalance after this one left; leaving anyway");
        }
    }
    for (_, (poller_stop, poller)) in pollers {
        poller_stop.cancel();
        let _ = poller.await;
    }
}

/// Returns once none of `seen` has changed for [`LEAVE_QUIET`].
async fn quiet(seen: &mut [tokio::sync::watch::Receiver<u64>]) {
    if seen.is_empty() {
        return;
    }
    loop {
        let changed = futures::future::select_all(seen.iter_mut().map(|s| Box::pin(s.changed())));
        tokio::select! {
            _ = tokio::time::sleep(LEAVE_QUIET) => return,
            (result, _, _) = changed => {
                if result.is_err() {
                    // A member's context is gone: nothing more to wait for.
                    return;
                }
            }
        }
    }
}

/// How often (and how long at most) the consumer asks the brokers for metadata to tell
/// readiness whether they are reachable.
const BROKER_PROBE_EVERY: Duration = Duration::from_secs(3);

/// Consumes `handlers`' topics until `shutdown`, then drains and commits.
pub async fn run(
    config: &Config,
    handlers: HashMap<String, Arc<dyn BatchHandler>>,
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<(), ConsumerError> {
    let partitions = Arc::new(Partitions::default());
    let hard_abort = CancellationToken::new();
    let (assigned_tx, mut assigned) = mpsc::unbounded_channel();
    let mut topics: Vec<String> = handlers.keys().cloned().collect();
    topics.sort();
    // One group member per input topic, all in the one group. The assignor balances the
    // number of partitions per member: with a member reading both topics, two replicas
    // settled on one owning every login partition and the other every merge partition.
    // Members of one topic each share only that topic, so each topic spreads within ±1.
    let mut consumers: HashMap<String, Arc<PipelineConsumer>> = HashMap::new();
    let (settled_tx, settled) = tokio::sync::watch::channel(false);
    let start_up = Arc::new(StartUp {
        members: topics.len(),
        assigned: std::sync::atomic::AtomicUsize::new(0),
        settled: settled_tx,
    });
    {
        let start_up = start_up.clone();
        tokio::spawn(async move {
            tokio::time::sleep(START_UP_SETTLE_MAX).await;
            if !start_up.settled.send_replace(true) {
                tracing::info!(
                    "not every group member was assigned within the start-up wait; pulling anyway"
                );
            }
        });
    }
    for topic in &topics {
        let context = PipelineContext {
            topic: topic.clone(),
            owned: Mutex::new(HashSet::new()),
            start_up: start_up.clone(),
            first_assignment_seen: AtomicBool::new(false),
            rebalances: tokio::sync::watch::channel(0).0,
            partitions: partitions.clone(),
            split: Mutex::new(HashSet::new()),
            consumer: OnceLock::new(),
            assigned: assigned_tx.clone(),
            hard_abort: hard_abort.clone(),
            drain_timeout: config.drain_timeout(),
            metrics: metrics.clone(),
        };
        let consumer: PipelineConsumer = topic_consumer_config(config, topic)
            .create_with_context(context)
            .map_err(ConsumerError::Create)?;
        let consumer = Arc::new(consumer);
        // Before subscribing: no rebalance callback can run without it.
        let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
        consumer
            .subscribe(&[topic.as_str()])
            .map_err(|source| ConsumerError::Subscribe {
                topics: vec![topic.clone()],
                source,
            })?;
        consumers.insert(topic.clone(), consumer);
    }
    drop(assigned_tx);
    tracing::info!(?topics, group = %config.kafka.group_id, "consumer started");
    health.consumer_running.store(true, Ordering::Relaxed);

    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    let in_flight = Arc::new(Semaphore::new(config.consumer.max_batches_in_flight));
    let combiners: HashMap<String, Arc<Combiner>> = handlers
        .iter()
        .map(|(topic, handler)| {
            let combiner = Combiner::start(
                handler.clone(),
                in_flight.clone(),
                config.consumer.batch_size,
                metrics.clone(),
            );
            (topic.clone(), Arc::new(combiner))
        })
        .collect();
    // Partition tasks stop taking new batches on `stop`: on shutdown, and also when the loop
    // below stops on an error while `shutdown` is still live.
    let stop = shutdown.child_token();
    let mut failed = None;
    // Each member's shared queue carries its rebalances and errors only; polling it serves
    // them. A message there means a partition was not split off: the loop stops on it.
    let (unsplit_tx, mut unsplit) = mpsc::unbounded_channel();
    // A member's poller runs until that member leaves (see [`leave_one_by_one`]): the
    // members still in the group must answer the rebalance each leave causes.
    let mut pollers: HashMap<String, (CancellationToken, JoinHandle<()>)> = HashMap::new();
    for (topic, consumer) in &consumers {
        let poller_stop = CancellationToken::new();
        let handle = {
            let (consumer, unsplit_tx, stop) =
                (consumer.clone(), unsplit_tx.clone(), poller_stop.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => break,
                        received = consumer.recv() => match received {
                            Ok(message) => {
                                let _ = unsplit_tx.send((message.topic().to_string(), message.partition()));
                                break;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "Kafka consumer error");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        },
                    }
                }
            })
        };
        pollers.insert(topic.clone(), (poller_stop, handle));
    }
    drop(unsplit_tx);
    // Readiness shows a broker outage: an idle consumer would not notice one otherwise.
    // The probe has a client of its own: metadata requests on the group consumer's client
    // made it rejoin the group over and over (seen with the mock cluster: no assignment
    // within 40 s).
    let prober: Option<Arc<rdkafka::producer::BaseProducer>> =
        client_config(&config.kafka).create().ok().map(Arc::new);
    let probe_topic = topics.first().cloned().unwrap_or_default();
    let mut probe = tokio::time::interval(BROKER_PROBE_EVERY);
    let mut probing: Option<JoinHandle<bool>> = None;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = probe.tick() => {
                if let Some(done) = probing.take_if(|p| p.is_finished()) {
                    let reachable = done.await.unwrap_or(false);
                    if health.broker_reachable.swap(reachable, Ordering::Relaxed) != reachable {
                        if reachable {
                            tracing::info!("Kafka brokers reachable again");
                        } else {
                            tracing::warn!("Kafka brokers unreachable (metadata probe failed)");
                        }
                    }
                }
                if let (None, Some(p)) = (&probing, &prober) {
                    let (p, topic) = (p.clone(), probe_topic.clone());
                    probing = Some(tokio::task::spawn_blocking(move || {
                        rdkafka::producer::Producer::client(p.as_ref()).fetch_metadata(Some(&topic), BROKER_PROBE_EVERY).is_ok()
                    }));
                }
            }
            event = assigned.recv() => match event {
                Some(Assigned::Queue(key, queue)) => {
                    let (Some(handler), Some(combiner), Some(consumer)) = (
                        handlers.get(&key.0).cloned(),
                        combiners.get(&key.0).cloned(),
                        consumers.get(&key.0).cloned(),
                    ) else {
                        continue;
                    };
                    let worker = PartitionWorker {
                        key,
                        partitions: partitions.clone(),
                        handler,
                        consumer,
                        config: config.consumer.clone(),
                        metrics: metrics.clone(),
                        health: health.clone(),
                        in_flight: in_flight.clone(),
                        combiner,
                        settled: settled.clone(),
                    };
                    tasks.push(tokio::spawn(worker.run(queue, stop.clone())));
                }
                Some(Assigned::Unsplit((topic, partition))) => {
                    failed = Some(ConsumerError::Unsplit { topic, partition });
                    break;
                }
                None => {}
            },
            Some((topic, partition)) = unsplit.recv() => {
                failed = Some(ConsumerError::Unsplit { topic, partition });
                break;
            }
        }
    }
    if let Some(e) = &failed {
        tracing::error!(error = %e, "consumer stopping");
    }

    // Shutdown: every task finishes the batch it holds, then offsets are committed.
    stop.cancel();
    health.shutting_down.store(true, Ordering::Relaxed);
    tracing::info!("consumer draining");
    let deadline = tokio::time::Instant::now() + config.drain_timeout();
    let drain = futures::future::join_all(tasks);
    tokio::pin!(drain);
    if tokio::time::timeout_at(deadline, &mut drain).await.is_err() {
        tracing::warn!(
            "drain deadline passed; abandoning unfinished batches (they will be redelivered)"
        );
        hard_abort.cancel();
        let _ = drain.await;
    }
    for state in partitions.all() {
        state.abort.cancel();
    }
    // Queues of partitions assigned after the loop stopped hold the consumer too. (A probe
    // still running ends within its timeout; it is not waited for.)
    drop(assigned);
    drop(probing);
    leave_one_by_one(consumers, pollers, deadline).await;
    health.consumer_running.store(false, Ordering::Relaxed);
    tracing::info!("consumer stopped");
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
