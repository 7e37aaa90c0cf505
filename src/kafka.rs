//! Kafka client settings shared by the consumer, the relay and the operator commands.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::config::{Config, KafkaConfig};

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("Kafka topics missing: {}. Create them, or start with --create-topics", .0.join(", "))]
    Missing(Vec<String>),
    #[error("could not read Kafka metadata from {brokers}: {source}")]
    Metadata {
        brokers: String,
        #[source]
        source: KafkaError,
    },
    #[error("could not create topic {topic}: {reason}")]
    Create { topic: String, reason: String },
}

/// Base client settings: brokers plus the user's librdkafka properties.
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &config.brokers);
    for (k, v) in &config.properties {
        cc.set(k, v);
    }
    cc
}

/// Names every configured topic the broker does not have.
pub fn missing_topics(config: &Config, timeout: Duration) -> Result<Vec<String>, TopicError> {
    let consumer: BaseConsumer = client_config(&config.kafka)
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(|source| TopicError::Metadata {
            brokers: config.kafka.brokers.clone(),
            source,
        })?;
    let metadata =
        consumer
            .fetch_metadata(None, timeout)
            .map_err(|source| TopicError::Metadata {
                brokers: config.kafka.brokers.clone(),
                source,
            })?;
    let present: Vec<&str> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| t.name())
        .collect();
    Ok(config
        .topics
        .all()
        .into_iter()
        .filter(|t| !present.contains(&t.as_str()))
        .collect())
}

/// Fails with the names of missing topics, or creates them when `create` is set.
pub async fn ensure_topics(config: &Config, create: bool) -> Result<(), TopicError> {
    let cfg = config.clone();
    let missing =
        tokio::task::spawn_blocking(move || missing_topics(&cfg, Duration::from_secs(10)))
            .await
            .map_err(|e| TopicError::Create {
                topic: "*".into(),
                reason: e.to_string(),
            })??;
    if missing.is_empty() {
        return Ok(());
    }
    if !create {
        return Err(TopicError::Missing(missing));
    }
    let admin: AdminClient<DefaultClientContext> =
        client_config(&config.kafka)
            .create()
            .map_err(|e| TopicError::Create {
                topic: missing.join(","),
                reason: e.to_string(),
            })?;
    let new_topics: Vec<NewTopic> = missing
        .iter()
        .map(|name| {
            NewTopic::new(
                name,
                config.topics.partitions,
                TopicReplication::Fixed(config.topics.replication_factor),
            )
        })
        .collect();
    let results = admin
        .create_topics(&new_topics, &AdminOptions::new())
        .await
        .map_err(|e| TopicError::Create {
            topic: missing.join(","),
            reason: e.to_string(),
        })?;
    for result in results {
        match result {
            Ok(name) => tracing::info!(topic = %name, "created topic"),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(topic = %name, "topic already exists")
            }
            Err((name, code)) => {
                return Err(TopicError::Create {
                    topic: name,
                    reason: code.to_string(),
                })
            }
        }
    }
    Ok(())
}

/// A message's headers, in order, read without trusting them: rdkafka's safe accessor
/// (`Headers::try_get`) panics on a header name that is not UTF-8, which a hostile producer
/// can send, and a panic would kill the partition's task. Names that are not UTF-8 are
/// carried with U+FFFD in place of the bad bytes (rdkafka can only produce `&str` names);
/// values, NUL bytes included, are kept exactly. A null value becomes an empty one.
pub fn message_headers(message: &rdkafka::message::BorrowedMessage<'_>) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let raw = message.ptr();
    if raw.is_null() {
        return out;
    }
    let mut headers: *mut rdkafka::bindings::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `raw` is the live librdkafka message behind `message` (borrowed for this
    // call); librdkafka owns the header list and its entries, which stay valid while the
    // message does, and every pointer it returns is copied out before we return.
    unsafe {
        let err = rdkafka::bindings::rd_kafka_message_headers(raw, &mut headers);
        if err != rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            || headers.is_null()
        {
            return out;
        }
        let count = rdkafka::bindings::rd_kafka_header_cnt(headers);
        out.reserve(count);
        for idx in 0..count {
            let mut name: *const std::os::raw::c_char = std::ptr::null();
            let mut value: *const std::os::raw::c_void = std::ptr::null();
            let mut size: usize = 0;
            let err = rdkafka::bindings::rd_kafka_header_get_all(
                headers, idx, &mut name, &mut value, &mut size,
            );
            if err != rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                || name.is_null()
            {
                continue;
            }
            let name = std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned();
            let value = if value.is_null() || size == 0 {
                Vec::new()
            } else {
                std::slice::from_raw_parts(value.cast::<u8>(), size).to_vec()
            };
            out.push((name, value));
        }
    }
    out
}
