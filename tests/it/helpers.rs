//! Test harness: a fresh Postgres database and a fresh Kafka-protocol broker per test.

use std::collections::HashMap;
use std::time::Duration;

use authsync::app::{self, RunOptions, Worker};
use authsync::config::{Config, Secret};
use authsync::store;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub const PARTITIONS: i32 = 3;

pub fn admin_url() -> String {
    std::env::var("AUTHSYNC_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn url_with_db(name: &str) -> String {
    let admin = admin_url();
    match admin.rfind('/') {
        Some(i) if admin[..i].contains("://") && admin[i..].len() > 1 => {
            format!("{}/{name}", &admin[..i])
        }
        _ => format!("{admin}/{name}"),
    }
}

pub fn random_name(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// A database of its own, migrated; dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn new() -> Self {
        let name = random_name("authsync_test");
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url())
            .await
            .expect("test Postgres reachable (AUTHSYNC_TEST_DATABASE_URL)");
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let url = url_with_db(&name);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .expect("connect test database");
        store::migrate(&pool).await.expect("migrate");
        Self { name, url, pool }
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop needs async work: do it on a thread with its own small runtime. The test's
        // pool is NOT closed from there: its connections belong to the test's runtime, which
        // is blocked in this very `drop` (a current-thread test could never drive their I/O:
        // a CI run hung for 74 minutes that way). `WITH (FORCE)` ends them server-side, and
        // the pool is dropped with the test's runtime. The whole clean-up is bounded.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let drop_database = async {
                    if let Ok(admin) = PgPoolOptions::new()
                        .max_connections(1)
                        .connect(&admin_url())
                        .await
                    {
                        let _ =
                            sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&admin)
                                .await;
                        admin.close().await;
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(30), drop_database).await;
            });
        })
        .join();
    }
}

/// One output message as a downstream consumer sees it.
#[derive(Debug, Clone)]
pub struct Output {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    /// The message had no value at all (a tombstone), not an empty one.
    pub null_value: bool,
    pub headers: HashMap<String, Vec<u8>>,
    pub header_list: Vec<(String, Vec<u8>)>,
}

impl Output {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.value).expect("output is JSON")
    }
    /// The CloudEvents type; empty for a message that is not JSON (a dead letter).
    pub fn event_type(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.value)
            .ok()
            .and_then(|v| v["type"].as_str().map(str::to_string))
            .unwrap_or_default()
    }
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    }
}

/// A mock cluster, a database, a config pointing at both, and (once started) a worker.
pub struct Harness {
    /// The in-process mock broker; `None` when the harness runs on a real broker process.
    pub cluster: Option<MockCluster<'static, rdkafka::producer::DefaultProducerContext>>,
    pub db: TestDb,
    pub config: Config,
    pub shutdown: CancellationToken,
    pub worker: Option<Worker>,
    producer: FutureProducer,
}

pub fn test_config(brokers: &str, db_url: &str) -> Config {
    init_test_log();
    let mut config = Config::default();
    config.kafka.brokers = brokers.to_string();
    config.kafka.group_id = random_name("group");
    config.kafka.session_timeout_ms = 6_000;
    config.database.url = Secret::new(db_url);
    config.database.max_connections = 6;
    config.http.listen = "127.0.0.1:0".parse().expect("addr");
    config.consumer.batch_linger_ms = 20;
    config.consumer.drain_timeout_ms = 10_000;
    config.consumer.retry_initial_ms = 50;
    config.consumer.retry_max_ms = 500;
    config.relay.poll_interval_ms = 100;
    config.topics.partitions = PARTITIONS;
    // The tests' producers stand in for a cluster whose ACLs admit only trusted producers;
    // the trust tests set their own policy.
    config.trust.unsigned = "trusted".into();
    config
}

/// The worker's log in the test output, when `AUTHSYNC_TEST_LOG` holds a filter
/// (e.g. `AUTHSYNC_TEST_LOG=authsync=debug,librdkafka=debug`); silent otherwise.
fn init_test_log() {
    if let Ok(filter) = std::env::var("AUTHSYNC_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

pub fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .create()
        .expect("producer")
}

impl Harness {
    /// Fresh broker with the configured topics, fresh migrated database; not started.
    pub async fn new() -> Self {
        Self::with(|_| {}).await
    }

    pub async fn with(tweak: impl FnOnce(&mut Config)) -> Self {
        let cluster = MockCluster::new(1).expect("mock cluster");
        let db = TestDb::new().await;
        let mut config = test_config(&cluster.bootstrap_servers(), &db.url);
        tweak(&mut config);
        for topic in config.topics.all() {
            cluster
                .create_topic(&topic, PARTITIONS, 1)
                .expect("create topic");
        }
        let producer = producer(&config.kafka.brokers);
        Self {
            cluster: Some(cluster),
            db,
            config,
            shutdown: CancellationToken::new(),
            worker: None,
            producer,
        }
    }

    /// The same harness on the real broker process of `AUTHSYNC_TEST_KAFKA_BROKERS`, with
    /// topics of its own. `None` (skip) when no broker is configured outside CI.
    pub async fn on_real_broker(tweak: impl FnOnce(&mut Config)) -> Option<Self> {
        let brokers = real_brokers()?;
        let db = TestDb::new().await;
        let mut config = test_config(&brokers, &db.url);
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        config.topics.login = format!("auth.login.{suffix}");
        config.topics.merge = format!("auth.merge.{suffix}");
        config.topics.user_events = format!("auth.user-events.{suffix}");
        tweak(&mut config);
        authsync::kafka::ensure_topics(&config, true)
            .await
            .expect("create topics on the real broker");
        let producer = producer(&config.kafka.brokers);
        Some(Self {
            cluster: None,
            db,
            config,
            shutdown: CancellationToken::new(),
            worker: None,
            producer,
        })
    }

    pub async fn start(&mut self) {
        self.shutdown = CancellationToken::new();
        let worker = app::start(
            self.config.clone(),
            RunOptions::default(),
            self.shutdown.clone(),
        )
        .await
        .expect("worker starts");
        self.worker = Some(worker);
    }

    /// SIGTERM equivalent: cancel, then wait for the drain to finish.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(worker) = self.worker.take() {
            tokio::time::timeout(Duration::from_secs(30), worker.wait())
                .await
                .expect("worker stops within 30 s")
                .expect("worker stops cleanly");
        }
    }

    pub fn worker(&self) -> &Worker {
        self.worker.as_ref().expect("worker started")
    }

    pub async fn produce(&self, key: &str, value: &[u8]) {
        self.produce_with(key, value, None, &[]).await;
    }

    pub async fn produce_with(
        &self,
        key: &str,
        value: &[u8],
        partition: Option<i32>,
        headers: &[(&str, &[u8])],
    ) {
        produce_to(
            &self.producer,
            &self.config.topics.login,
            key,
            value,
            partition,
            headers,
        )
        .await;
    }

    /// Waits until the inbox holds `n` rows (events handled, whatever the outcome).
    pub async fn wait_handled(&self, n: i64) {
        wait_for(&format!("{n} inbox rows"), || async {
            self.db.count("SELECT count(*) FROM inbox").await >= n
        })
        .await;
    }

    /// Waits until every outbox row is published.
    pub async fn wait_published(&self) {
        wait_for("outbox drained", || async {
            self.db.count("SELECT count(*) FROM outbox").await == 0
        })
        .await;
    }

    /// Every message on the output and dead-letter topics, read from the beginning until
    /// `expected` arrived (then a short grace period to catch extras).
    pub async fn outputs(&self, expected: usize) -> Vec<Output> {
        let topics = [
            self.config.topics.user_events.clone(),
            self.config.topics.dlq_for(&self.config.topics.login),
        ];
        read_topics(&self.config.kafka.brokers, &topics, expected).await
    }
}

/// The real broker process for tests that need one; under `CI=true` it must be there.
pub fn real_brokers() -> Option<String> {
    match std::env::var("AUTHSYNC_TEST_KAFKA_BROKERS") {
        Ok(b) if !b.is_empty() => Some(b),
        _ => {
            assert!(
                std::env::var("CI").is_err(),
                "CI must provide a broker process: set AUTHSYNC_TEST_KAFKA_BROKERS"
            );
            eprintln!("skipped: AUTHSYNC_TEST_KAFKA_BROKERS is not set");
            None
        }
    }
}

pub async fn produce_to(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    value: &[u8],
    partition: Option<i32>,
    headers: &[(&str, &[u8])],
) {
    let mut owned = OwnedHeaders::new();
    for (k, v) in headers {
        owned = owned.insert(Header {
            key: k,
            value: Some(*v),
        });
    }
    let mut record = FutureRecord::to(topic)
        .key(key)
        .payload(value)
        .headers(owned);
    if let Some(p) = partition {
        record = record.partition(p);
    }
    producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
}

pub async fn read_topics(brokers: &str, topics: &[String], expected: usize) -> Vec<Output> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", random_name("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("reader");
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&refs).expect("subscribe");
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let wait_until = if out.len() >= expected {
            // Grace period: anything extra would show up now.
            (tokio::time::Instant::now() + Duration::from_millis(1500)).min(deadline)
        } else {
            deadline
        };
        let message = tokio::select! {
            m = consumer.recv() => m.expect("read"),
            _ = tokio::time::sleep_until(wait_until) => break,
        };
        let header_list: Vec<(String, Vec<u8>)> = message
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        out.push(Output {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().unwrap_or_default().to_vec(),
            null_value: message.payload().is_none(),
            headers: header_list.iter().cloned().collect(),
            header_list,
        });
    }
    assert!(
        out.len() >= expected,
        "expected {expected} output messages, got {}: {:?}",
        out.len(),
        out.iter().map(|o| o.event_type()).collect::<Vec<_>>()
    );
    out
}

/// Resets a (stopped) group's committed offsets on `topic` to the beginning: a replay.
/// It joins the group as a member (the coordinator only takes commits from members), takes
/// every partition, commits offset 0 and leaves.
pub fn rewind_group(brokers: &str, group: &str, topic: &str) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("rewind consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while consumer.assignment().map(|a| a.count()).unwrap_or(0) < PARTITIONS as usize {
        assert!(
            std::time::Instant::now() < deadline,
            "rewind: no assignment"
        );
        let _ = consumer.poll(Duration::from_millis(100));
    }
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Offset(0))
            .expect("tpl");
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .expect("rewind commit");
    consumer.unsubscribe();
    let _ = consumer.poll(Duration::from_millis(100));
}

pub async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `auth.login` CloudEvent.
pub fn login(id: &str, time: &str, data: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "specversion": "1.0",
        "id": id,
        "source": "https://idp.example.test",
        "type": "auth.login",
        "time": time,
        "data": data,
    }))
    .expect("json")
}

/// Validates a produced message against its JSON Schema in `schemas/`.
pub fn assert_matches_schema(event: &serde_json::Value) {
    let kind = event["type"].as_str().expect("type");
    let path = format!("{}/schemas/{kind}.json", env!("CARGO_MANIFEST_DIR"));
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}")),
    )
    .expect("schema JSON");
    let validator = jsonschema::validator_for(&schema).expect("valid schema");
    let errors: Vec<String> = validator
        .iter_errors(event)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "{kind} violates {path}: {errors:#?}\n{event:#}"
    );
}

pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
    let mut buf = String::new();
    stream.read_to_string(&mut buf).await.expect("read");
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (status, body)
}
