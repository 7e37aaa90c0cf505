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

use crate::config::{
    Config, ConfigError, MergeConfig, ProvisioningConfig, TopicsConfig, TrustConfig,
};
use crate::domain::identity::IdentityPolicy;
use crate::domain::ids;
use crate::domain::trust::SourcePolicy;
use crate::events::redact;
use crate::events::source::{SigningKey, SourceKeys};
use crate::events::{DecodeError, ErrorClass};
use crate::store::inbox::{self, Claim};
use crate::store::outbox::{self, NewMessage};
use crate::store::{LockWait, StoreError};

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
    /// Which producers of the login topic are believed (`[trust]`), and their keys.
    pub sources: Arc<SourcePolicy>,
    pub source_keys: Arc<SourceKeys>,
    pub max_message_bytes: usize,
    /// `relay.message_max_bytes`: what the producer can send (see [`write_outbox`]).
    pub max_publish_bytes: usize,
    /// `consumer.max_clock_skew_secs`: input `time` beyond now plus this is refused.
    pub max_clock_skew: chrono::Duration,
    /// `database.random_page_cost`, set for each step transaction (`store::begin_step`).
    pub random_page_cost: f64,
    /// Look up which of a batch's events were handled before claiming the rest (see
    /// [`claim_batch`]): for readers of old ranges (the online replay), whose batches are
    /// mostly duplicates.
    pub expect_duplicates: bool,
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
            sources: Arc::new(SourcePolicy::compile(&config.trust)?),
            source_keys: Arc::new(resolve_source_keys(&config.trust)?),
            max_message_bytes: config.consumer.max_message_bytes,
            max_publish_bytes: config.relay.message_max_bytes,
            max_clock_skew: chrono::Duration::seconds(
                i64::try_from(config.consumer.max_clock_skew_secs).unwrap_or(i64::MAX / 1000),
            ),
            random_page_cost: config.database.random_page_cost,
            expect_duplicates: false,
        })
    }
}

/// The worker's source keys (`trust.keys`), read from where the configuration says.
pub fn resolve_source_keys(trust: &TrustConfig) -> Result<SourceKeys, ConfigError> {
    let mut keys = Vec::new();
    for (id, secret) in &trust.keys {
        keys.push(
            SigningKey::resolve(id, secret, &format!("trust.keys.{id}")).map_err(|problem| {
                ConfigError::Invalid {
                    field: "trust.keys",
                    problem,
                }
            })?,
        );
    }
    Ok(SourceKeys::new(keys))
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
    // A claim locks each row it finds, even one it leaves alone, so a batch of duplicates
    // still writes: it takes a transaction id and, until it commits, holds the relay's
    // fence (results of newer transactions wait behind it). Where duplicates are expected,
    // the rows handled for good are read first and only the rest are claimed; a batch of
    // nothing but duplicates then commits without a transaction id. A claim racing this
    // read is still settled by the insert below.
    let handled: HashSet<String> = if ctx.expect_duplicates {
        let ids: Vec<&str> = items.iter().map(|(_, _, key)| key.as_str()).collect();
        inbox::handled(&mut *conn, &ctx.consumer_group, &ids)
            .await?
            .into_iter()
            .collect()
    } else {
        HashSet::new()
    };
    let mut seen = HashSet::new();
    let mut claims = Vec::with_capacity(items.len());
    let mut candidates = Vec::with_capacity(items.len());
    for (message, decoded, key) in items {
        if !seen.insert(key.as_str()) || handled.contains(key.as_str()) {
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
    let claimed: HashSet<String> = if claims.is_empty() {
        HashSet::new()
    } else {
        inbox::claim(&mut *conn, &ctx.consumer_group, &claims)
            .await?
            .into_iter()
            .collect()
    };
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
    /// Merges that went to the waiting room (their users do not exist yet).
    pub waiting: u64,
}

impl BatchReport {
    pub fn dead_lettered_total(&self) -> u64 {
        self.dead_lettered.values().sum()
    }

    pub fn absorb(&mut self, other: BatchReport) {
        self.applied += other.applied;
        self.signed_up += other.signed_up;
        self.duplicates += other.duplicates;
        self.results += other.results;
        self.isolated |= other.isolated;
        self.waiting += other.waiting;
        for (class, n) in other.dead_lettered {
            *self.dead_lettered.entry(class).or_default() += n;
        }
    }
}

/// The headers authsync adds to a dead letter. They are replaced when a redriven copy
/// fails again, and removed by `authsync dlq redrive`; every other header, `authsync-provider`
/// included, travels with the message unchanged. Headers added later use the
/// `authsync-dlq-` prefix.
pub const DEAD_LETTER_HEADERS: [&str; 6] = [
    "authsync-error-class",
    "authsync-error-reason",
    "authsync-original-topic",
    "authsync-original-partition",
    "authsync-original-offset",
    "authsync-consumer-group",
];

/// Whether `name` is dead-letter metadata (see [`DEAD_LETTER_HEADERS`]).
pub fn is_dead_letter_header(name: &str) -> bool {
    DEAD_LETTER_HEADERS.contains(&name) || name.starts_with("authsync-dlq-")
}

/// Longest `authsync-error-reason`: reasons quote input (a parser's complaint, a database
/// error), and a header must not grow with it.
pub const MAX_REASON_BYTES: usize = 1024;

/// A reason fit for a header and a log line: control characters (NUL included) shown as
/// U+FFFD, at most [`MAX_REASON_BYTES`] bytes, cut on a character boundary.
pub fn bounded_reason(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len().min(MAX_REASON_BYTES));
    for c in reason.chars() {
        let c = if c.is_control() { '\u{FFFD}' } else { c };
        if out.len() + c.len_utf8() > MAX_REASON_BYTES - 3 {
            out.push('…');
            break;
        }
        out.push(c);
    }
    out
}

/// An inbox key Postgres can store: a text column cannot hold NUL, so an event id with one
/// falls back to the message's position (a replay of the same message still finds it).
pub fn storable_key(key: String, message: &InputMessage) -> String {
    if key.contains('\0') {
        message.position_key()
    } else {
        key
    }
}

/// Id of the dead letter of the message at `topic`/`partition`/`offset` claimed under
/// `inbox_key`. Per source position: a replay of the same message is recognised, a
/// redriven copy (a new offset) that fails again is dead-lettered again.
pub fn dead_letter_id(inbox_key: &str, topic: &str, partition: i32, offset: i64) -> uuid::Uuid {
    ids::result_event_id(
        &format!("{inbox_key}@{topic}/{partition}/{offset}"),
        "dead_letter",
    )
}

/// Builds the dead letter of `message`: original key, value (a null value stays null) and
/// headers, plus the dead-letter metadata.
pub fn dead_letter(
    ctx: &StepContext,
    message: &InputMessage,
    inbox_key: &str,
    class: &'static str,
    reason: &str,
) -> NewMessage {
    let reason = bounded_reason(reason);
    let mut headers = message.headers.clone();
    headers.retain(|(k, _)| !is_dead_letter_header(k));
    // Whatever reached the topic without passing `authsync ingest` may carry credentials:
    // they are not stored or forwarded with the dead letter.
    let stripped = redact::strip_headers(&mut headers);
    let payload = match message.value.as_deref().and_then(redact::strip_bytes) {
        Some(clean) => Some(clean),
        None => message.value.clone(),
    };
    if stripped > 0 || payload != message.value {
        headers.push(("authsync-dlq-secrets-removed".to_string(), b"true".to_vec()));
    }
    for (name, value) in [
        ("authsync-error-class", class.to_string()),
        ("authsync-error-reason", reason.clone()),
        ("authsync-original-topic", message.topic.clone()),
        ("authsync-original-partition", message.partition.to_string()),
        ("authsync-original-offset", message.offset.to_string()),
        ("authsync-consumer-group", ctx.consumer_group.clone()),
    ] {
        headers.push((name.to_string(), value.into_bytes()));
    }
    if class == ErrorClass::Internal.as_str() {
        tracing::error!(
            topic = %message.topic,
            partition = message.partition,
            offset = message.offset,
            error_class = class,
            error_reason = %reason,
            "dead-lettering message after an internal error"
        );
    } else {
        tracing::warn!(
            topic = %message.topic,
            partition = message.partition,
            offset = message.offset,
            error_class = class,
            error_reason = %reason,
            "dead-lettering message"
        );
    }
    NewMessage {
        event_id: dead_letter_id(inbox_key, &message.topic, message.partition, message.offset),
        topic: ctx.topics.dlq_for(&message.topic),
        key: message.key.clone(),
        event_type: "dead_letter".into(),
        payload,
        headers,
    }
}

/// Dead-letter headers that point at a stored original (see [`write_outbox`]).
pub const BODY_REF_HEADER: &str = "authsync-dlq-body-ref";
pub const BODY_BYTES_HEADER: &str = "authsync-dlq-body-bytes";

/// Writes outbox rows, keeping every one within what the producer can send
/// (`relay.message_max_bytes`). A dead letter that does not fit keeps its original in
/// `dead_letter_bodies` and goes out as its metadata headers plus a reference
/// ([`BODY_REF_HEADER`]); `authsync dlq show` prints the original and `authsync dlq
/// redrive` restores it. Returns how many rows were new (see [`outbox::insert`]).
pub async fn write_outbox(
    conn: &mut PgConnection,
    ctx: &StepContext,
    rows: &[NewMessage],
) -> Result<u64, StoreError> {
    // Room for what the relay and librdkafka add (topic, timestamps, record framing).
    let limit = ctx.max_publish_bytes.saturating_sub(512);
    if rows.iter().all(|r| r.wire_bytes() <= limit) {
        return Ok(outbox::insert(conn, rows).await?);
    }
    let mut fitted = Vec::with_capacity(rows.len());
    for row in rows {
        if row.wire_bytes() <= limit {
            fitted.push(row.clone());
            continue;
        }
        if row.event_type != "dead_letter" {
            // Results are bounded by construction (merge reports are cut to fit); one that
            // is not is a bug: refuse the batch rather than publish something unsendable.
            return Err(StoreError::Internal(format!(
                "result event {} of type {} is {} bytes, over relay.message_max_bytes",
                row.event_id,
                row.event_type,
                row.wire_bytes()
            )));
        }
        crate::store::outbox::store_body(&mut *conn, row).await?;
        let mut headers: Vec<_> = row
            .headers
            .iter()
            .filter(|(k, _)| is_dead_letter_header(k))
            .cloned()
            .collect();
        headers.push((
            BODY_REF_HEADER.into(),
            row.event_id.to_string().into_bytes(),
        ));
        headers.push((
            BODY_BYTES_HEADER.into(),
            row.wire_bytes().to_string().into_bytes(),
        ));
        let key = row.key.clone().filter(|k| k.len() <= limit / 2);
        fitted.push(NewMessage {
            key,
            payload: None,
            headers,
            ..row.clone()
        });
        tracing::warn!(
            event_id = %row.event_id,
            bytes = row.wire_bytes(),
            limit,
            "dead letter over relay.message_max_bytes: original kept in dead_letter_bodies, a reference published"
        );
    }
    Ok(outbox::insert(conn, &fitted).await?)
}

/// An event id must be storable and printable: no control characters (a NUL cannot go
/// into a Postgres text column).
pub fn check_event_id(id: &str) -> Result<(), DecodeError> {
    if id.chars().any(char::is_control) {
        return Err(DecodeError::new(
            crate::events::ErrorClass::InvalidField,
            "event id contains a control character",
        ));
    }
    Ok(())
}

/// An event `time` may not lie beyond now plus the allowed clock skew: a login dated in the
/// future would make every real login of its user "stale" until then.
pub fn check_event_time(
    time: chrono::DateTime<chrono::Utc>,
    now: chrono::DateTime<chrono::Utc>,
    skew: chrono::Duration,
) -> Result<(), DecodeError> {
    if time > now + skew {
        return Err(DecodeError::new(
            crate::events::ErrorClass::InvalidField,
            format!(
                "event time {} is more than {} s ahead of this worker's clock (consumer.max_clock_skew_secs)",
                time.to_rfc3339(),
                skew.num_seconds()
            ),
        ));
    }
    Ok(())
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
    run_batch_waiting(pool, ctx, step, messages, LockWait::Unbounded).await
}

/// [`run_batch`], waiting for row locks as `lock_wait` says.
pub async fn run_batch_waiting<S: Step>(
    pool: &PgPool,
    ctx: &StepContext,
    step: &S,
    messages: &[InputMessage],
    lock_wait: LockWait,
) -> Result<BatchReport, StoreError> {
    let decoded: Vec<S::Decoded> = messages.iter().map(|m| step.decode(ctx, m)).collect();
    let items: Vec<(&InputMessage, &S::Decoded)> = messages.iter().zip(decoded.iter()).collect();

    let mut tx = crate::store::begin_step(pool, ctx.random_page_cost, lock_wait).await?;
    match step.apply(&mut tx, ctx, &items).await {
        Ok(report) => {
            crate::failpoint!("step-before-commit");
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
    let mut tx = crate::store::begin_step(pool, ctx.random_page_cost, lock_wait).await?;
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
                let key = storable_key(step.inbox_key(message, decoded), message);
                // The dead letter goes in a savepoint of its own: if even it is refused, the
                // error escapes as an internal one and the consumer's last resort takes over,
                // for this message only.
                let mut letter_savepoint = sqlx::Connection::begin(&mut *tx).await?;
                let written = write_dead_letter(
                    &mut letter_savepoint,
                    ctx,
                    message,
                    &key,
                    ErrorClass::Unprocessable,
                    &e.to_string(),
                )
                .await;
                match written {
                    Ok(r) => {
                        letter_savepoint.commit().await?;
                        report.absorb(r);
                    }
                    Err(e) if e.is_retryable() => return Err(e),
                    Err(letter_error) => {
                        letter_savepoint.rollback().await?;
                        return Err(StoreError::Internal(format!(
                            "the dead letter of {} could not be written: {letter_error} (the message failed with: {e})",
                            message.position_key()
                        )));
                    }
                }
            }
        }
    }
    tx.commit().await?;
    Ok(report)
}

/// Claims `message` as dead-lettered under `key` and writes its dead letter; a duplicate
/// (handled before) is counted and written nothing.
async fn write_dead_letter(
    conn: &mut PgConnection,
    ctx: &StepContext,
    message: &InputMessage,
    key: &str,
    class: ErrorClass,
    reason: &str,
) -> Result<BatchReport, StoreError> {
    let mut report = BatchReport::default();
    let claimed = inbox::claim(
        &mut *conn,
        &ctx.consumer_group,
        &[Claim {
            event_id: key,
            topic: &message.topic,
            partition: message.partition,
            offset: message.offset,
            outcome: "dead_lettered",
        }],
    )
    .await?;
    if claimed.is_empty() {
        report.duplicates += 1;
        return Ok(report);
    }
    let letter = dead_letter(ctx, message, key, class.as_str(), reason);
    write_outbox(&mut *conn, ctx, &[letter]).await?;
    *report.dead_lettered.entry(class.as_str()).or_default() += 1;
    Ok(report)
}

/// The last resort for a message whose step failed in a way retrying cannot fix (an
/// internal error, or a dead letter that could not be written): in a transaction of its
/// own, claim it and dead-letter it as `internal`, under its position if its event id
/// cannot be stored. Everything it writes is bytes or text authsync made, so only the
/// database being unavailable can stop it (a retryable error).
pub async fn last_resort<S: Step>(
    pool: &PgPool,
    ctx: &StepContext,
    step: &S,
    message: &InputMessage,
    error: &StoreError,
) -> Result<BatchReport, StoreError> {
    let decoded = step.decode(ctx, message);
    let key = storable_key(step.inbox_key(message, &decoded), message);
    let mut tx = pool.begin().await?;
    let report = match write_dead_letter(
        &mut tx,
        ctx,
        message,
        &key,
        ErrorClass::Internal,
        &error.to_string(),
    )
    .await
    {
        Ok(report) => report,
        Err(e) if e.is_retryable() => return Err(e),
        Err(_) => {
            // The event id itself is what the database refuses: use the position.
            tx.rollback().await?;
            tx = pool.begin().await?;
            write_dead_letter(
                &mut tx,
                ctx,
                message,
                &message.position_key(),
                ErrorClass::Internal,
                &error.to_string(),
            )
            .await?
        }
    };
    tx.commit().await?;
    Ok(report)
}
