//! `authsync dlq inspect` / `authsync dlq redrive`: look at dead letters, send them back.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use sqlx::PgPool;

use crate::config::Config;
use crate::kafka::client_config;
use crate::steps::{is_dead_letter_header, BODY_REF_HEADER};
use crate::store::outbox::StoredBody;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A dead letter as read back from its topic.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl DeadLetter {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
    pub fn class(&self) -> String {
        self.header("authsync-error-class")
            .unwrap_or_else(|| "unknown".into())
    }
}

/// Reads every message now on `topic` (start to current end), committing nothing.
pub fn read_all(
    config: &Config,
    topic: &str,
    limit: Option<usize>,
) -> anyhow::Result<Vec<DeadLetter>> {
    let consumer: BaseConsumer = client_config(&config.kafka)
        .set(
            "group.id",
            format!("authsync-dlq-reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .create()
        .context("cannot create a Kafka client")?;
    let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
    let Some(t) = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
    else {
        bail!("topic `{topic}` does not exist");
    };
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for p in t.partitions() {
        let (low, high) = consumer.fetch_watermarks(topic, p.id(), TIMEOUT)?;
        if high > low {
            tpl.add_partition_offset(topic, p.id(), Offset::Offset(low))?;
            ends.insert(p.id(), high);
        }
    }
    if ends.is_empty() {
        return Ok(Vec::new());
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let mut idle = 0;
    while !ends.is_empty() && limit.is_none_or(|l| out.len() < l) && idle < 100 {
        match consumer.poll(Duration::from_millis(100)) {
            None => idle += 1,
            Some(Err(e)) => bail!("reading {topic}: {e}"),
            Some(Ok(m)) => {
                idle = 0;
                let (p, o) = (m.partition(), m.offset());
                if ends.get(&p).is_some_and(|end| o + 1 >= *end) {
                    ends.remove(&p);
                }
                out.push(DeadLetter {
                    partition: p,
                    offset: o,
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec),
                    headers: crate::kafka::message_headers(&m),
                });
            }
        }
    }
    Ok(out)
}

/// Counts by (class, reason), reasons cut to keep groups readable.
pub fn summarize(letters: &[DeadLetter]) -> BTreeMap<(String, String), usize> {
    let mut groups = BTreeMap::new();
    for l in letters {
        let mut reason = l.header("authsync-error-reason").unwrap_or_default();
        if reason.len() > 120 {
            let mut cut = 120;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
            reason.push('…');
        }
        *groups.entry((l.class(), reason)).or_insert(0) += 1;
    }
    groups
}

pub fn render_summary(topic: &str, letters: &[DeadLetter]) -> String {
    let mut out = format!("{} dead letter(s) on {topic}\n", letters.len());
    for ((class, reason), n) in summarize(letters) {
        out.push_str(&format!("  {n:>7}  {class:<26} {reason}\n"));
        if let Some(example) = letters.iter().find(|l| {
            l.class() == class
                && l.header("authsync-error-reason")
                    .unwrap_or_default()
                    .starts_with(reason.trim_end_matches('…'))
        }) {
            out.push_str(&format!(
                "           e.g. {}/{}/{} (from {}/{}/{})\n",
                topic,
                example.partition,
                example.offset,
                example
                    .header("authsync-original-topic")
                    .unwrap_or_default(),
                example
                    .header("authsync-original-partition")
                    .unwrap_or_default(),
                example
                    .header("authsync-original-offset")
                    .unwrap_or_default()
            ));
        }
    }
    out
}

#[derive(Clone, Debug, Default)]
pub struct RedriveRequest {
    pub topic: String,
    /// Only letters of this error class.
    pub filter_class: Option<String>,
    pub limit: Option<usize>,
    pub dry_run: bool,
}

#[derive(Debug, Default)]
pub struct RedriveOutcome {
    /// Re-published (or, on a dry run, would be), by class.
    pub redriven: BTreeMap<String, usize>,
    pub skipped_already_redriven: usize,
    pub skipped_filtered: usize,
}

/// Re-publishes dead letters to their original topic with their original key and headers.
pub async fn redrive(
    config: &Config,
    pool: &PgPool,
    request: &RedriveRequest,
    progress: bool,
) -> anyhow::Result<RedriveOutcome> {
    let (cfg, topic) = (config.clone(), request.topic.clone());
    let letters = tokio::task::spawn_blocking(move || read_all(&cfg, &topic, None)).await??;
    let done: HashSet<(i32, i64)> = crate::store::redrives::redriven(pool, &request.topic)
        .await?
        .into_iter()
        .collect();
    let mut outcome = RedriveOutcome::default();
    let mut todo = Vec::new();
    for l in letters {
        if done.contains(&(l.partition, l.offset)) {
            outcome.skipped_already_redriven += 1;
            continue;
        }
        if request
            .filter_class
            .as_ref()
            .is_some_and(|c| *c != l.class())
        {
            outcome.skipped_filtered += 1;
            continue;
        }
        if request.limit.is_some_and(|n| todo.len() >= n) {
            break;
        }
        todo.push(l);
    }
    if request.dry_run {
        for l in &todo {
            *outcome.redriven.entry(l.class()).or_default() += 1;
        }
        return Ok(outcome);
    }
    let producer: FutureProducer = client_config(&config.kafka)
        .set("enable.idempotence", "true")
        .create()
        .context("cannot create a Kafka producer")?;
    let bar = if progress {
        let bar = ProgressBar::new(todo.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} redriven  {per_sec}  ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    for l in &todo {
        let original = original_of(pool, l).await?;
        let Some(target) = l.header("authsync-original-topic") else {
            tracing::warn!(
                partition = l.partition,
                offset = l.offset,
                "dead letter without authsync-original-topic; skipped"
            );
            continue;
        };
        let mut headers = OwnedHeaders::new();
        // The original headers, `authsync-provider` included; not the dead-letter metadata
        // nor an earlier redrive's mark.
        for (k, v) in original
            .headers
            .iter()
            .filter(|(k, _)| !is_dead_letter_header(k) && k != REDRIVEN_FROM)
        {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let from = format!("{}/{}/{}", request.topic, l.partition, l.offset);
        headers = headers.insert(Header {
            key: REDRIVEN_FROM,
            value: Some(from.as_bytes()),
        });
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&target).headers(headers);
        // A tombstone stays a tombstone.
        if let Some(value) = &original.payload {
            record = record.payload(value.as_slice());
        }
        if let Some(key) = &original.key {
            record = record.key(key.as_slice());
        }
        producer
            .send(record, TIMEOUT)
            .await
            .map_err(|(e, _)| e)
            .with_context(|| format!("re-publishing {from} to {target}"))?;
        crate::store::redrives::record(
            pool,
            &request.topic,
            l.partition,
            l.offset,
            &target,
            &l.class(),
        )
        .await?;
        *outcome.redriven.entry(l.class()).or_default() += 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(outcome)
}

/// Marks a redriven message with the dead letter it came from.
pub const REDRIVEN_FROM: &str = "authsync-redriven-from";

/// The original message of a dead letter: the letter itself, or, when it was too large to
/// publish, the copy kept in `dead_letter_bodies` (see `steps::write_outbox`).
pub async fn original_of(pool: &PgPool, letter: &DeadLetter) -> anyhow::Result<StoredBody> {
    let Some(reference) = letter.header(BODY_REF_HEADER) else {
        return Ok(StoredBody {
            key: letter.key.clone(),
            payload: letter.value.clone(),
            headers: letter.headers.clone(),
        });
    };
    let id = uuid::Uuid::parse_str(&reference)
        .with_context(|| format!("dead letter with a malformed {BODY_REF_HEADER}: {reference}"))?;
    let mut body = crate::store::outbox::load_body(pool, id)
        .await?
        .with_context(|| {
            format!("the original of dead letter {id} is no longer in dead_letter_bodies")
        })?;
    // The metadata is the letter's (the stored copy has it too, as written).
    body.headers.retain(|(k, _)| !is_dead_letter_header(k));
    body.headers.extend(
        letter
            .headers
            .iter()
            .filter(|(k, _)| is_dead_letter_header(k))
            .cloned(),
    );
    Ok(body)
}

/// `authsync dlq show`: one dead letter, whole: metadata, headers, key and value (from
/// `dead_letter_bodies` when it was too large to publish).
pub async fn show(
    config: &Config,
    pool: &PgPool,
    topic: &str,
    partition: i32,
    offset: i64,
) -> anyhow::Result<String> {
    let (cfg, t) = (config.clone(), topic.to_string());
    let letters = tokio::task::spawn_blocking(move || read_all(&cfg, &t, None)).await??;
    let letter = letters
        .iter()
        .find(|l| l.partition == partition && l.offset == offset)
        .with_context(|| format!("no dead letter at {topic}/{partition}/{offset}"))?;
    let original = original_of(pool, letter).await?;
    let printable = |bytes: &[u8]| match std::str::from_utf8(bytes) {
        Ok(text)
            if !text
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t') =>
        {
            text.to_string()
        }
        _ => format!("(binary, {} bytes) {}", bytes.len(), hex(bytes)),
    };
    let mut out = format!("dead letter {topic}/{partition}/{offset}\n");
    if let Some(r) = letter.header(BODY_REF_HEADER) {
        out.push_str(&format!(
            "  original kept in dead_letter_bodies ({r}): too large to publish\n"
        ));
    }
    out.push_str("headers:\n");
    for (k, v) in &original.headers {
        out.push_str(&format!("  {k}: {}\n", printable(v)));
    }
    out.push_str(&format!(
        "key: {}\n",
        original.key.as_deref().map_or("(null)".into(), printable)
    ));
    match &original.payload {
        None => out.push_str("value: (null: a tombstone)\n"),
        Some(v) => out.push_str(&format!("value ({} bytes):\n{}\n", v.len(), printable(v))),
    }
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    let shown: String = bytes.iter().take(64).map(|b| format!("{b:02x}")).collect();
    if bytes.len() > 64 {
        format!("{shown}…")
    } else {
        shown
    }
}

pub fn render_redrive(request: &RedriveRequest, outcome: &RedriveOutcome) -> String {
    let total: usize = outcome.redriven.values().sum();
    let mut out = format!(
        "{} {total} dead letter(s) from {}\n",
        if request.dry_run {
            "Dry run: would redrive"
        } else {
            "Redrove"
        },
        request.topic
    );
    for (class, n) in &outcome.redriven {
        out.push_str(&format!("  {n:>7}  {class}\n"));
    }
    out.push_str(&format!(
        "  skipped: {} already redriven, {} filtered out\n",
        outcome.skipped_already_redriven, outcome.skipped_filtered
    ));
    out
}
