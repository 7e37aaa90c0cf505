//! Steps: one Postgres transaction per micro-batch holding the inbox rows, the state
//! changes and the outbox rows together.
//!
//! The fast path applies the whole batch set-based without savepoints. Only when Postgres
//! rejects the batch permanently (a constraint or data error some message provoked) is the
//! batch re-run in isolation: one SAVEPOINT per message, so the poison message rolls back
//! alone and is dead-lettered through the outbox while every other message is applied.

pub mod auth_sync;
pub mod merge;

use std::collections::BTreeMap;

use sqlx::{PgConnection, PgPool};

use std::collections::HashSet;

use std::sync::Arc;

use crate::config::{Config, ConfigError, MergeConfig, ProvisioningConfig, TopicsConfig};
use crate::domain::identity::IdentityPolicy;
use crate::domain::ids;
use crate::events::{DecodeError, ErrorClass};
use crate::store::inbox::{self, Claim};
use crate::store::outbox::{self, NewMessage};
use crate::store::StoreError;

/// A Kafka message, owned (it crosses from the fetch loop to its partition's task).
#[derive(Clone, Debug)]
pub struct InputMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The Kafka message timestamp (create or log-append time), when the broker gave one.
    pub timestamp: Option<chrono::DateTime<chrono::Utc>>,
}

impl InputMessage {
    /// The inbox key of a message that has no usable event id.
    pub fn position_key(&self) -> String {
        format!("kafka:{}:{}:{}", self.topic, self.partition, self.offset)
    }
}

/// What a step needs besides the database.
#[derive(Clone, Debug)]
pub struct StepContext {
    pub consumer_group: String,
    pub topics: TopicsConfig,
    pub provisioning: ProvisioningConfig,
    pub merge: MergeConfig,
    pub identity: Arc<IdentityPolicy>,
    pub max_message_bytes: usize,
    /// `database.random_page_cost`, set for each step transaction (`store::begin_step`).
    pub random_page_cost: f64,
}

impl StepContext {
    /// The steps' view of a validated configuration (compiles the identity policy).
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        Ok(Self {
            consumer_group: config.kafka.group_id.clone(),
            topics: config.topics.clone(),
            provisioning: config.provisioning.clone(),
            merge: config.merge.clone(),
            identity: Arc::new(IdentityPolicy::compile(&config.identity)?),
            max_message_bytes: config.consumer.max_message_bytes,
            random_page_cost: config.database.random_page_cost,
        })
    }
}

/// The messages of a batch this transaction claimed, and the dead letters of those that
/// could not be decoded.
pub struct Claimed<'a, D> {
    pub items: Vec<(&'a InputMessage, &'a D)>,
    pub dead_letters: Vec<NewMessage>,
}

/// One event of a batch to claim: the message it came in, its decoding, its inbox key.
/// A message may hold several events (an Okta hook delivery) or one undecodable value.
pub type Candidate<'a, D> = (&'a InputMessage, Result<&'a D, &'a DecodeError>, String);

/// Claims a batch in the inbox: duplicates (within the batch or handled before) are
/// counted and dropped; undecodable messages are claimed as dead-lettered and their dead
/// letters returned; the rest are returned in order.
pub async fn claim_batch<'a, D>(
    conn: &mut PgConnection,
    ctx: &StepContext,
    items: &[Candidate<'a, D>],
    report: &mut BatchReport,
) -> Result<Claimed<'a, D>, StoreError> {
    let mut seen = HashSet::new();
    let mut claims = Vec::with_capacity(items.len());
    let mut candidates = Vec::with_capacity(items.len());
    for (message, decoded, key) in items {
        if !seen.insert(key.as_str()) {
            report.duplicates += 1;
            continue;
        }
        claims.push(Claim {
            event_id: key,
            topic: &message.topic,
            partition: message.partition,
            offset: message.offset,
            outcome: if decoded.is_ok() {
                "applied"
            } else {
                "dead_lettered"
            },
        });
        candidates.push((*message, *decoded, key.as_str()));
    }
    let claimed: HashSet<String> = inbox::claim(&mut *conn, &ctx.consumer_group, &claims)
        .await?
        .into_iter()
        .collect();
    let mut out = Claimed {
        items: Vec::with_capacity(candidates.len()),
        dead_letters: Vec::new(),
    };
    for (message, decoded, key) in candidates {
        if !claimed.contains(key) {
            report.duplicates += 1;
            continue;
        }
        match decoded {
            Ok(value) => out.items.push((message, value)),
            Err(e) => {
                out.dead_letters
                    .push(dead_letter(ctx, message, key, e.class.as_str(), &e.reason));
                *report.dead_lettered.entry(e.class.as_str()).or_default() += 1;
            }
        }
    }
    Ok(out)
}

/// What a batch did, for metrics and logs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchReport {
    pub applied: u64,
    pub signed_up: u64,
    pub duplicates: u64,
    /// Dead letters by error class.
    pub dead_lettered: BTreeMap<&'static str, u64>,
    /// Result events written to the outbox (not counting ones a replay had already written).
    pub results: u64,
    /// The batch was re-run one message per savepoint.
    pub isolated: bool,
}

impl BatchReport {
    pub fn dead_lettered_total(&self) -> u64 {
        self.dead_lettered.values().sum()
    }

    fn absorb(&mut self, other: BatchReport) {
        self.applied += other.applied;
        self.signed_up += other.signed_up;
        self.duplicates += other.duplicates;
        self.results += other.results;
        for (class, n) in other.dead_lettered {
            *self.dead_lettered.entry(class).or_default() += n;
        }
    }
}

/// Builds the dead letter of `message`: original key, value and headers, plus ours.
pub fn dead_letter(
    ctx: &StepContext,
    message: &InputMessage,
    inbox_key: &str,
    class: &'static str,
    reason: &str,
) -> NewMessage {
    let mut headers = message.headers.clone();
    headers.retain(|(k, _)| !k.starts_with("authsync-"));
    for (name, value) in [
        ("authsync-error-class", class.to_string()),
        ("authsync-error-reason", reason.to_string()),
        ("authsync-original-topic", message.topic.clone()),
        ("authsync-original-partition", message.partition.to_string()),
        ("authsync-original-offset", message.offset.to_string()),
        ("authsync-consumer-group", ctx.consumer_group.clone()),
    ] {
        headers.push((name.to_string(), value.into_bytes()));
    }
    tracing::warn!(
        topic = %message.topic,
        partition = message.partition,
        offset = message.offset,
        error_class = class,
        error_reason = %reason,
        "dead-lettering message"
    );
    NewMessage {
        // Per source position: a replay of the same message is recognised, a redriven copy
        // (a new offset) that fails again is dead-lettered again.
        event_id: ids::result_event_id(
            &format!(
                "{inbox_key}@{}/{}/{}",
                message.topic, message.partition, message.offset
            ),
            "dead_letter",
        ),
        topic: ctx.topics.dlq_for(&message.topic),
        key: message.key.clone(),
        event_type: "dead_letter".into(),
        payload: message.value.clone().unwrap_or_default(),
        headers,
    }
}

/// A step that applies a batch of messages inside a transaction it is handed.
pub trait Step: Sync {
    /// Per-message decoding result, computed once outside the transaction.
    type Decoded: Send + Sync;

    fn decode(&self, ctx: &StepContext, message: &InputMessage) -> Self::Decoded;

    /// The inbox key (the event id) of a decoded message.
    fn inbox_key(&self, message: &InputMessage, decoded: &Self::Decoded) -> String;

    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        ctx: &'a StepContext,
        items: &'a [(&'a InputMessage, &'a Self::Decoded)],
    ) -> impl std::future::Future<Output = Result<BatchReport, StoreError>> + Send + 'a;
}

/// Applies `messages` in one transaction; falls back to one savepoint per message when
/// the database rejects the batch. Transient failures are returned for the caller to retry
/// (nothing is committed then).
pub async fn run_batch<S: Step>(
    pool: &PgPool,
    ctx: &StepContext,
    step: &S,
    messages: &[InputMessage],
) -> Result<BatchReport, StoreError> {
    let decoded: Vec<S::Decoded> = messages.iter().map(|m| step.decode(ctx, m)).collect();
    let items: Vec<(&InputMessage, &S::Decoded)> = messages.iter().zip(decoded.iter()).collect();

    let mut tx = crate::store::begin_step(pool, ctx.random_page_cost).await?;
    match step.apply(&mut tx, ctx, &items).await {
        Ok(report) => {
            tx.commit().await?;
            return Ok(report);
        }
        Err(e) if e.is_retryable() => return Err(e),
        Err(e) => {
            tracing::info!(error = %e, size = messages.len(), "batch rejected; re-running it one savepoint per message");
            tx.rollback().await?;
        }
    }

    let mut report = BatchReport {
        isolated: true,
        ..BatchReport::default()
    };
    let mut tx = crate::store::begin_step(pool, ctx.random_page_cost).await?;
    for item in &items {
        let mut savepoint = sqlx::Connection::begin(&mut *tx).await?;
        match step
            .apply(&mut savepoint, ctx, std::slice::from_ref(item))
            .await
        {
            Ok(r) => {
                savepoint.commit().await?;
                report.absorb(r);
            }
            Err(e) if e.is_retryable() => return Err(e),
            Err(e) => {
                savepoint.rollback().await?;
                let (message, decoded) = *item;
                let key = step.inbox_key(message, decoded);
                let claimed = inbox::claim(
                    &mut tx,
                    &ctx.consumer_group,
                    &[Claim {
                        event_id: &key,
                        topic: &message.topic,
                        partition: message.partition,
                        offset: message.offset,
                        outcome: "dead_lettered",
                    }],
                )
                .await?;
                if claimed.is_empty() {
                    report.duplicates += 1;
                    continue;
                }
                let letter = dead_letter(
                    ctx,
                    message,
                    &key,
                    ErrorClass::Unprocessable.as_str(),
                    &e.to_string(),
                );
                outbox::insert(&mut tx, &[letter]).await?;
                *report
                    .dead_lettered
                    .entry(ErrorClass::Unprocessable.as_str())
                    .or_default() += 1;
            }
        }
    }
    tx.commit().await?;
    Ok(report)
}
