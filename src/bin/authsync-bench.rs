//! authsync-bench: how fast is the pipeline against this machine's ceiling?
//!
//! `cargo run --release --bin authsync-bench -- <scenario> [--events N]`
//!
//! Each scenario gets a fresh database and fresh topics, drives the real `authsync` binary
//! (a subprocess, so its peak RSS is its own) over the Kafka protocol of a broker process
//! (tansu, started here when `--brokers` is not given), and in the same run measures the
//! ceiling: the same SQL per event, batched the same way (the `run_batch` step with the
//! same batch size and one task per partition), executed directly against Postgres. It
//! prints one JSON line per scenario.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use authsync::config::{Config, Secret};
use authsync::relay;
use authsync::steps::auth_sync::AuthSync;
use authsync::steps::{run_batch, InputMessage, StepContext};
use authsync::store;
use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Message};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

#[path = "bench/ingest.rs"]
mod ingest;

#[derive(Parser)]
#[command(about = "Benchmark authsync against the machine's ceiling")]
struct Args {
    /// returning | signup | replay | relay | merge | latency | mixed | all, or `soak` (not in `all`:
    /// `--minutes` at `--rate` logins/s through the real binary, with a short retention), or
    /// `ingest` (not in `all`: signed webhooks through `authsync ingest`, driven by `oha`)
    scenario: String,
    /// soak: how long to run.
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    /// soak, latency and mixed: logins per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// `mock` (librdkafka's mock cluster hosted in this process: a broker whose floor is far
    /// below the worker's latency) or `tansu` (a real broker process started here). Default:
    /// mock for latency, mixed, soak and ingest; tansu for the throughput scenarios.
    #[arg(long)]
    broker: Option<String>,
    /// Events for the scenario (defaults: returning 200000, signup 50000, replay 200000,
    /// relay 200000, latency 20 s at `--rate`, mixed: 200000 replayed).
    #[arg(long)]
    events: Option<usize>,
    /// Kafka brokers; when absent a tansu broker is started on a free port.
    #[arg(long, env = "AUTHSYNC_BENCH_BROKERS")]
    brokers: Option<String>,
    /// Postgres URL with rights to create databases.
    #[arg(
        long,
        env = "AUTHSYNC_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Partitions of the input topic (= concurrent batches).
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// consumer.batch_size for both the pipeline and the ceiling.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// returning: also run the pipeline with this many `authsync run` replicas in one group
    /// and report their split beside the single replica's run.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
}

struct Bench {
    args: Args,
    brokers: String,
    authsync_bin: std::path::PathBuf,
    /// The tansu process the bench started (none with `--brokers`).
    broker_pid: Option<u32>,
    /// The mock cluster hosted here (`--broker mock`); it takes topics from its owner only.
    mock: Option<rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>>,
}

struct Db {
    name: String,
    url: String,
    pool: PgPool,
    admin: String,
}

impl Db {
    async fn create(admin: &str) -> anyhow::Result<Self> {
        let name = format!("authsync_bench_{}", uuid::Uuid::new_v4().simple());
        let admin_pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(admin)
            .await?;
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&admin_pool)
            .await?;
        admin_pool.close().await;
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(admin);
        let url = format!("{base}/{name}");
        let pool = PgPoolOptions::new()
            .max_connections(12)
            .connect(&url)
            .await?;
        store::migrate(&pool).await?;
        Ok(Self {
            name,
            url,
            pool,
            admin: admin.to_string(),
        })
    }

    async fn drop(self) {
        self.pool.close().await;
        // For looking at plans and sizes afterwards.
        if std::env::var_os("AUTHSYNC_BENCH_KEEP_DATABASES").is_some() {
            progress(&format!("kept database {}", self.name));
            return;
        }
        if let Ok(admin) = PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.admin)
            .await
        {
            let _ = sqlx::raw_sql(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&admin)
            .await;
        }
    }

    /// Table statistics as autovacuum keeps them in a running system (a minute-old bench
    /// database has none, and plans on empty-table estimates are not what production runs).
    async fn analyze(&self) -> anyhow::Result<()> {
        sqlx::raw_sql("ANALYZE").execute(&self.pool).await?;
        Ok(())
    }

    /// CPU seconds used so far by the worker's Postgres backends (their `application_name`
    /// starts with `authsync`) in this database.
    async fn worker_backends_cpu_secs(&self) -> f64 {
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = current_database() AND application_name LIKE 'authsync%'",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default();
        pids.into_iter().map(|p| cpu_secs(p as u32)).sum()
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&self.pool)
            .await
            .unwrap_or(-1)
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn login_value(id: &str, subject: usize, variant: usize, now: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "specversion": "1.0",
        "id": id,
        "source": "authsync-bench",
        "type": "auth.login",
        "time": now,
        "data": {
            "provider": "bench",
            "subject": format!("user-{subject}"),
            "email": format!("user-{subject}@bench.example"),
            "isEmailVerified": true,
            "displayName": format!("User {subject} v{variant}"),
            "locale": "en-US",
            "deviceID": format!("device-{}", subject % 3),
            "userAgent": "bench/1.0",
            "groups": ["staff"],
        }
    }))
    .unwrap_or_default()
}

/// The `q` quantile of ascending `sorted` values (0 when empty).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q) as usize)
        .copied()
        .unwrap_or(0.0)
}

fn time_at(offset_ms: i64) -> String {
    (chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .map(|t| t.with_timezone(&chrono::Utc))
        .unwrap_or_else(|_| chrono::Utc::now())
        + chrono::Duration::milliseconds(offset_ms))
    .to_rfc3339()
}

/// `n` logins over `users` identities; `round` shifts ids and times so rounds differ.
fn logins(prefix: &str, users: usize, n: usize, round: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let subject = i % users;
            let seq = round * n + i;
            let id = format!("{prefix}-{seq}");
            // Every 10th returning login changes the display name (a profile update).
            let variant = if round == 0 {
                0
            } else {
                usize::from(i % 10 == 0) * seq
            };
            (
                format!("bench:user-{subject}"),
                login_value(&id, subject, variant, &time_at(seq as i64)),
            )
        })
        .collect()
}

impl Bench {
    fn config(&self, db: &Db, suffix: &str, http_port: u16) -> Config {
        let mut c = Config::default();
        c.trust.unsigned = "trusted".into();
        c.kafka.brokers = self.brokers.clone();
        c.kafka.group_id = format!("bench-{suffix}");
        c.database.url = Secret::new(db.url.clone());
        c.topics.login = format!("bench.login.{suffix}");
        c.topics.user_events = format!("bench.user-events.{suffix}");
        c.topics.merge = format!("bench.merge.{suffix}");
        c.topics.partitions = self.args.partitions;
        c.consumer.batch_size = self.args.batch_size;
        c.http.listen = format!("127.0.0.1:{http_port}")
            .parse()
            .unwrap_or(c.http.listen);
        c
    }

    async fn create_topics(&self, config: &Config) -> anyhow::Result<()> {
        self.create_named_topics(&config.topics.all()).await
    }

    /// Creates `names` (dead-letter topics with one partition, the others with
    /// `--partitions`), through the mock cluster when it is the broker.
    async fn create_named_topics(&self, names: &[String]) -> anyhow::Result<()> {
        if let Some(cluster) = &self.mock {
            for t in names {
                let partitions = if t.ends_with(".dlq") {
                    1
                } else {
                    self.args.partitions
                };
                cluster.create_topic(t, partitions, 1)?;
            }
            return Ok(());
        }
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()?;
        // Dead-letter topics need no parallelism.
        let topics: Vec<NewTopic> = names
            .iter()
            .map(|t| {
                let partitions = if t.ends_with(".dlq") {
                    1
                } else {
                    self.args.partitions
                };
                NewTopic::new(t, partitions, TopicReplication::Fixed(1))
            })
            .collect();
        for r in admin.create_topics(&topics, &AdminOptions::new()).await? {
            match r {
                Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) | Ok(_) => {}
                Err((name, code)) => bail!("create topic {name}: {code}"),
            }
        }
        Ok(())
    }

    async fn produce(&self, topic: &str, messages: &[(String, Vec<u8>)]) -> anyhow::Result<()> {
        produce_to(&self.brokers, topic, messages).await
    }

    fn spawn_worker(&self, config: &Config) -> anyhow::Result<Child> {
        let mut cmd = Command::new(&self.authsync_bin);
        cmd.arg("run")
            .env("AUTHSYNC_KAFKA_BROKERS", &config.kafka.brokers)
            .env("AUTHSYNC_KAFKA_GROUP_ID", &config.kafka.group_id)
            .env("AUTHSYNC_DATABASE_URL", config.database.url.expose())
            .env("AUTHSYNC_TOPICS_LOGIN", &config.topics.login)
            .env("AUTHSYNC_TOPICS_USER_EVENTS", &config.topics.user_events)
            .env("AUTHSYNC_TOPICS_MERGE", &config.topics.merge)
            .env(
                "AUTHSYNC_CONSUMER_BATCH_SIZE",
                config.consumer.batch_size.to_string(),
            )
            .env("AUTHSYNC_HTTP_LISTEN", config.http.listen.to_string())
            // This producer stands in for a cluster whose ACLs admit only trusted producers.
            .env("AUTHSYNC_TRUST_UNSIGNED", "trusted")
            .env(
                "AUTHSYNC_RELAY_INBOX_RETENTION_HOURS",
                config.relay.inbox_retention_hours.to_string(),
            )
            .env(
                "AUTHSYNC_RELAY_OUTBOX_RETENTION_HOURS",
                config.relay.outbox_retention_hours.to_string(),
            )
            .env(
                "AUTHSYNC_RELAY_CLEANUP_INTERVAL_SECS",
                config.relay.cleanup_interval_secs.to_string(),
            )
            .env(
                "AUTHSYNC_LOG_LEVEL",
                std::env::var("AUTHSYNC_BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        cmd.spawn().context("spawn authsync")
    }

    /// Runs the worker over what the topic holds until `processed` messages are handled
    /// and the outbox is drained.
    async fn run_pipeline(
        &self,
        config: &Config,
        db: &Db,
        processed: u64,
    ) -> anyhow::Result<PipelineRun> {
        let broker_cpu_before = self.broker_cpu_secs();
        let mut child = self.spawn_worker(config)?;
        let pid = child.id();
        let addr = config.http.listen;
        let deadline = Instant::now() + Duration::from_secs(1800);
        let mut t0: Option<Instant> = None;
        let (done, last_metrics);
        loop {
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("pipeline did not finish");
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!("authsync exited early: {status}");
            }
            if let Some(m) = scrape(addr).await {
                // The clock starts at the first fetched message (or, for the relay alone,
                // the first published row).
                let consumed = sum_metric(&m, "authsync_messages_consumed_total")
                    + sum_metric(&m, "authsync_relay_published_total");
                let handled = sum_metric(&m, "authsync_messages_processed_total");
                if t0.is_none() && consumed > 0.0 {
                    t0 = Some(Instant::now());
                }
                if handled as u64 >= processed && db.count("SELECT count(*) FROM outbox").await == 0
                {
                    (done, last_metrics) = (Instant::now(), m);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let rss = peak_rss(pid);
        let broker_secs = self.broker_cpu_secs_since(broker_cpu_before);
        let cpu = Cpu::of(pid, db, broker_secs).await;
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        // The last scrape may predate the last acks by one poll: close enough for quantiles.
        let w = WorkerStats::of(&last_metrics);
        Ok(PipelineRun {
            secs: done.duration_since(t0.unwrap_or(done)).as_secs_f64(),
            rss,
            cpu,
            events: processed as usize,
            p50_ms: w.delay_p50_ms,
            p99_ms: w.delay_p99_ms,
            batch_avg_size: w.batch_avg_size,
            batch_avg_ms: w.batch_avg_ms,
            batch_total_secs: w.batch_total_secs,
        })
    }

    /// The broker's CPU seconds now, when the bench started it (`None` otherwise).
    fn broker_cpu_secs(&self) -> Option<f64> {
        self.broker_pid.map(cpu_secs)
    }

    /// The broker's CPU seconds since `before` (a `broker_cpu_secs` reading).
    fn broker_cpu_secs_since(&self, before: Option<f64>) -> Option<f64> {
        self.broker_cpu_secs().zip(before).map(|(now, b)| now - b)
    }

    fn ctx(config: &Config) -> anyhow::Result<StepContext> {
        Ok(StepContext::from_config(config)?)
    }

    /// The ceiling: the same step, same batches, one task per partition, no Kafka.
    async fn ceiling(
        &self,
        pool: &PgPool,
        config: &Config,
        messages: &[(String, Vec<u8>)],
    ) -> anyhow::Result<f64> {
        let ctx = Arc::new(Self::ctx(config)?);
        let partitions = self.args.partitions as usize;
        let mut per_partition: Vec<Vec<InputMessage>> = vec![Vec::new(); partitions];
        for (i, (key, value)) in messages.iter().enumerate() {
            let p = partition_of(key, partitions);
            per_partition[p].push(InputMessage {
                topic: config.topics.login.clone(),
                partition: p as i32,
                offset: i as i64,
                key: Some(key.as_bytes().to_vec()),
                value: Some(value.clone()),
                headers: vec![],
                timestamp: None,
            });
        }
        let started = Instant::now();
        let mut tasks = Vec::new();
        for batch_list in per_partition {
            let (pool, ctx, size) = (pool.clone(), ctx.clone(), self.args.batch_size);
            tasks.push(tokio::spawn(async move {
                for batch in batch_list.chunks(size) {
                    loop {
                        match run_batch(&pool, &ctx, &AuthSync, batch).await {
                            Ok(_) => break,
                            Err(e) if e.is_retryable() => continue,
                            Err(e) => return Err(anyhow::anyhow!(e)),
                        }
                    }
                }
                Ok::<_, anyhow::Error>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        Ok(started.elapsed().as_secs_f64())
    }
}

fn partition_of(key: &str, partitions: usize) -> usize {
    // Any stable spread will do for the ceiling; it only needs the same per-key grouping.
    let mut h: u64 = 1469598103934665603;
    for b in key.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(1099511628211);
    }
    (h % partitions as u64) as usize
}

async fn scrape(addr: std::net::SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    Some(buf)
}

/// Per replica: login partitions owned, logins consumed, logins handled.
type Readings = [(f64, f64, f64)];
/// A condition on [`Readings`] to wait for.
type Until = Box<dyn Fn(&Readings) -> bool>;

/// The sum of metric `name`'s series labelled `topic="<topic>"`.
fn topic_metric(text: &str, name: &str, topic: &str) -> f64 {
    let label = format!("topic=\"{topic}\"");
    metric_sum(text, name, |line| line.contains(&label))
}

fn sum_metric(text: &str, name: &str) -> f64 {
    metric_sum(text, name, |_| true)
}

/// The sum of the series of metric `name` whose line passes `keep`.
fn metric_sum(text: &str, name: &str, keep: impl Fn(&str) -> bool) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
                && keep(l)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// CPU seconds (user + system) process `pid` has used so far; 0 when it cannot be read.
/// (CPU time per event compares builds on a noisy machine better than wall time does.)
/// CPU seconds over the wall time since `t0`: at 1k/s tansu alone can take half of a
/// two-core machine or more.
fn cores(cpu_secs: f64, t0: Instant) -> f64 {
    cpu_secs / t0.elapsed().as_secs_f64().max(f64::EPSILON)
}

fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): state is the 3rd field,
    // utime the 14th, stime the 15th; clock ticks are 1/100 s on Linux.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// A `/proc/<pid>/status` memory field (`VmHWM:`, `VmRSS:`) in bytes; 0 when unreadable.
fn status_bytes(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn peak_rss(pid: u32) -> u64 {
    status_bytes(pid, "VmHWM:")
}

/// `a` with `b`'s fields added.
fn merge(mut a: serde_json::Value, b: serde_json::Value) -> serde_json::Value {
    if let (Some(a), Some(b)) = (a.as_object_mut(), b.as_object()) {
        a.extend(b.clone());
    }
    a
}

/// What the worker's own metrics say: publish delay quantiles and average batches.
struct WorkerStats {
    delay_p50_ms: f64,
    delay_p99_ms: f64,
    /// Producer timestamp → start of the batch applying it (broker hop, fetch, linger).
    consume_p50_ms: f64,
    consume_p99_ms: f64,
    batch_avg_size: f64,
    batch_avg_ms: f64,
    batch_p99_ms: f64,
    /// Seconds spent in batches, all partitions together.
    batch_total_secs: f64,
}

impl WorkerStats {
    fn of(metrics: &str) -> Self {
        let delay =
            |q| histogram_quantile(metrics, "authsync_outbox_publish_delay_seconds", q) * 1000.0;
        let consume = |q| histogram_quantile(metrics, "authsync_consume_delay_seconds", q) * 1000.0;
        let batches = sum_metric(metrics, "authsync_batch_size_count").max(1.0);
        Self {
            delay_p50_ms: delay(0.5),
            delay_p99_ms: delay(0.99),
            consume_p50_ms: consume(0.5),
            consume_p99_ms: consume(0.99),
            batch_avg_size: sum_metric(metrics, "authsync_batch_size_sum") / batches,
            batch_avg_ms: sum_metric(metrics, "authsync_batch_duration_seconds_sum") * 1000.0
                / batches,
            batch_p99_ms: histogram_quantile(metrics, "authsync_batch_duration_seconds", 0.99)
                * 1000.0,
            batch_total_secs: sum_metric(metrics, "authsync_batch_duration_seconds_sum"),
        }
    }
}

/// What one pipeline run measured.
struct PipelineRun {
    /// From the first fetched message to the last result published.
    secs: f64,
    /// Peak RSS of the worker process, bytes.
    rss: u64,
    /// Outbox write (transaction start) to broker ack, from the worker's own histogram.
    p50_ms: f64,
    p99_ms: f64,
    /// Where a batch's time goes: its size and its transaction time (retries included).
    batch_avg_size: f64,
    batch_avg_ms: f64,
    /// Seconds spent in batches, all partitions together (over `secs`: how many partitions
    /// were busy on average).
    batch_total_secs: f64,
    cpu: Cpu,
    /// Events the run handled (or, for the relay alone, rows it published).
    events: usize,
}

impl PipelineRun {
    fn batches(&self) -> serde_json::Value {
        merge(
            serde_json::json!({
                "batch_avg_size": self.batch_avg_size.round(),
                "batch_avg_ms": (self.batch_avg_ms * 10.0).round() / 10.0,
                "batches_in_flight_avg":
                    (self.batch_total_secs / self.secs.max(1e-9) * 100.0).round() / 100.0,
            }),
            self.cpu.json(self.events),
        )
    }
}

/// CPU time of the worker process and of its Postgres backends, over the worker's life,
/// and of the broker over the same span (when the bench started it).
struct Cpu {
    worker_secs: f64,
    postgres_secs: f64,
    broker_secs: Option<f64>,
}

impl Cpu {
    async fn of(pid: u32, db: &Db, broker_secs: Option<f64>) -> Self {
        Self {
            worker_secs: cpu_secs(pid),
            postgres_secs: db.worker_backends_cpu_secs().await,
            broker_secs,
        }
    }

    /// Per event, in µs.
    fn json(&self, events: usize) -> serde_json::Value {
        let per_event = |secs: f64| (secs * 1e6 / events.max(1) as f64).round();
        serde_json::json!({
            "worker_cpu_us_per_event": per_event(self.worker_secs),
            "postgres_cpu_us_per_event": per_event(self.postgres_secs),
            "broker_cpu_us_per_event": self.broker_secs.map(per_event),
        })
    }
}

/// The `q` quantile of a Prometheus histogram in `text`, interpolated within its bucket
/// (as PromQL's `histogram_quantile` does); 0 when it has no observations.
fn histogram_quantile(text: &str, name: &str, q: f64) -> f64 {
    // Buckets of every label set (topics, say) are summed by their bound.
    let prefix = format!("{name}_bucket{{");
    let mut by_le: HashMap<u64, (f64, f64)> = HashMap::new();
    for l in text.lines() {
        let Some(rest) = l.strip_prefix(&prefix) else {
            continue;
        };
        let Some((labels, count)) = rest.split_once("} ") else {
            continue;
        };
        let Some(le) = labels
            .split(',')
            .find_map(|kv| kv.strip_prefix("le=\""))
            .and_then(|v| v.strip_suffix('"'))
        else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            match le.parse::<f64>() {
                Ok(v) => v,
                Err(_) => continue,
            }
        };
        let Ok(count) = count.trim().parse::<f64>() else {
            continue;
        };
        by_le.entry(le.to_bits()).or_insert((le, 0.0)).1 += count;
    }
    let mut buckets: Vec<(f64, f64)> = by_le.into_values().collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let Some(&(_, total)) = buckets.last() else {
        return 0.0;
    };
    if total <= 0.0 {
        return 0.0;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return lower;
            }
            let share = if count > below {
                (rank - below) / (count - below)
            } else {
                1.0
            };
            return lower + (le - lower) * share;
        }
        (lower, below) = (le, count);
    }
    lower
}

/// One scenario's result line.
struct Report {
    scenario: &'static str,
    events: usize,
    secs: f64,
    ceiling_secs: Option<f64>,
    p50: f64,
    p99: f64,
    rss: u64,
    extra: serde_json::Value,
}

impl Report {
    fn print(&self) {
        let eps = self.events as f64 / self.secs.max(1e-9);
        let ceiling_eps = self.ceiling_secs.map(|c| self.events as f64 / c.max(1e-9));
        let mut v = serde_json::json!({
            "scenario": self.scenario,
            "events": self.events,
            "seconds": (self.secs * 1000.0).round() / 1000.0,
            "events_per_s": eps.round(),
            "ceiling_events_per_s": ceiling_eps.map(f64::round),
            "ratio": ceiling_eps.map(|c| ((eps / c) * 1000.0).round() / 1000.0),
            "p50_ms": (self.p50 * 10.0).round() / 10.0,
            "p99_ms": (self.p99 * 10.0).round() / 10.0,
            "peak_rss_mib": ((self.rss as f64 / 1048576.0) * 10.0).round() / 10.0,
        });
        if let (Some(obj), Some(extra)) = (v.as_object_mut(), self.extra.as_object()) {
            for (k, val) in extra {
                obj.insert(k.clone(), val.clone());
            }
        }
        println!("{v}");
    }
}

impl Bench {
    /// Sign up `users`, then measure `n` returning logins (pipeline vs ceiling).
    async fn returning(&self, n: usize) -> anyhow::Result<()> {
        let users = (n / 10).max(1);
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let signups = logins(&format!("r-{suffix}"), users, users, 0);
        let returning = logins(&format!("r-{suffix}"), users, n, 1);

        // Ceiling first, on its own database.
        let cdb = Db::create(&self.args.database_url).await?;
        let config = self.config(&cdb, &suffix, 0);
        progress("returning: ceiling (sign-ups)");
        self.ceiling(&cdb.pool, &config, &signups).await?;
        cdb.analyze().await?;
        progress("returning: ceiling (returning logins)");
        let ceiling = self.ceiling(&cdb.pool, &config, &returning).await?;
        cdb.drop().await;

        let db = Db::create(&self.args.database_url).await?;
        let config = self.config(&db, &suffix, free_port()?);
        progress("returning: topics");
        self.create_topics(&config).await?;
        progress("returning: producing sign-ups");
        self.produce(&config.topics.login, &signups).await?;
        progress("returning: pipeline (sign-ups)");
        self.run_pipeline(&config, &db, users as u64).await?;
        db.analyze().await?;
        progress("returning: producing returning logins");
        sqlx::raw_sql("TRUNCATE outbox").execute(&db.pool).await?;
        self.produce(&config.topics.login, &returning).await?;
        progress("returning: pipeline (returning logins)");
        let run = self.run_pipeline(&config, &db, n as u64).await?;
        Report {
            scenario: "returning",
            events: n,
            secs: run.secs,
            ceiling_secs: Some(ceiling),
            p50: run.p50_ms,
            p99: run.p99_ms,
            rss: run.rss,
            extra: merge(
                serde_json::json!({"users": users, "latency": "tx start -> broker ack"}),
                run.batches(),
            ),
        }
        .print();
        db.drop().await;
        if self.args.replicas > 1 {
            let single = n as f64 / run.secs.max(1e-9);
            self.returning_replicas(&signups, &returning, single)
                .await?;
        }
        Ok(())
    }

    /// `returning` with `--replicas` processes in one group. They start, and share the
    /// partitions, before anything is produced (a rebalance under load on tansu resumes
    /// inside a record batch, which it does not serve). Reports the total rate, the single
    /// replica's rate of the same run, and how the partitions and logins split.
    async fn returning_replicas(
        &self,
        signups: &[(String, Vec<u8>)],
        returning: &[(String, Vec<u8>)],
        single_per_s: f64,
    ) -> anyhow::Result<()> {
        let replicas = self.args.replicas;
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let db = Db::create(&self.args.database_url).await?;
        let base = self.config(&db, &suffix, 0);
        let topic = base.topics.login.clone();
        progress(&format!("returning: {replicas} replicas"));
        self.create_topics(&base).await?;
        let mut workers = Vec::new();
        for _ in 0..replicas {
            let mut config = base.clone();
            config.http.listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?));
            workers.push((self.spawn_worker(&config)?, config.http.listen));
        }
        let addrs: Vec<std::net::SocketAddr> = workers.iter().map(|(_, a)| *a).collect();
        // Per replica: (login partitions owned, logins consumed, logins handled).
        let read = |addrs: Vec<std::net::SocketAddr>, topic: String| async move {
            let mut out = Vec::new();
            for addr in addrs {
                let m = scrape(addr).await.unwrap_or_default();
                let of = |name: &str| topic_metric(&m, name, &topic);
                out.push((
                    of("authsync_partitions_assigned"),
                    of("authsync_messages_consumed_total"),
                    of("authsync_messages_processed_total"),
                ));
            }
            out
        };
        let wait = |what: &'static str, done: Until| {
            let (addrs, topic) = (addrs.clone(), topic.clone());
            async move {
                let deadline = Instant::now() + Duration::from_secs(600);
                loop {
                    let now = read(addrs.clone(), topic.clone()).await;
                    if done(&now) {
                        return Ok(now);
                    }
                    if Instant::now() > deadline {
                        bail!("{what}: not within 600 s ({now:?})");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let partitions = f64::from(self.args.partitions);
        wait(
            "the login partitions are owned",
            Box::new(move |r| r.iter().map(|(owned, _, _)| owned).sum::<f64>() == partitions),
        )
        .await?;
        self.produce(&topic, signups).await?;
        let users = signups.len() as f64;
        wait(
            "sign-ups applied",
            Box::new(move |r| r.iter().map(|(_, _, h)| h).sum::<f64>() >= users),
        )
        .await?;
        db.analyze().await?;
        sqlx::raw_sql("TRUNCATE outbox").execute(&db.pool).await?;
        let before = read(addrs.clone(), topic.clone()).await;
        let consumed_before: f64 = before.iter().map(|(_, c, _)| c).sum();
        self.produce(&topic, returning).await?;
        let first = wait(
            "first returning login fetched",
            Box::new(move |r| r.iter().map(|(_, c, _)| c).sum::<f64>() > consumed_before),
        );
        first.await?;
        let t0 = Instant::now();
        let total = users + returning.len() as f64;
        let after = wait(
            "returning logins applied",
            Box::new(move |r| r.iter().map(|(_, _, h)| h).sum::<f64>() >= total),
        )
        .await?;
        while db.count("SELECT count(*) FROM outbox").await > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let secs = t0.elapsed().as_secs_f64();
        for (child, _) in &mut workers {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for (mut child, _) in workers {
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
        let per_s = returning.len() as f64 / secs;
        println!(
            "{}",
            serde_json::json!({
                "scenario": "returning_replicas",
                "replicas": replicas,
                "events": returning.len(),
                "seconds": (secs * 1000.0).round() / 1000.0,
                "events_per_s": per_s.round(),
                "single_replica_events_per_s": single_per_s.round(),
                "ratio_to_single": ((per_s / single_per_s) * 1000.0).round() / 1000.0,
                "login_partitions_per_replica": after.iter().map(|(o, _, _)| *o).collect::<Vec<_>>(),
                "returning_applied_per_replica": after
                    .iter()
                    .zip(&before)
                    .map(|((_, _, h), (_, _, b))| h - b)
                    .collect::<Vec<_>>(),
            })
        );
        db.drop().await;
        Ok(())
    }

    async fn signup(&self, n: usize) -> anyhow::Result<()> {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let signups = logins(&format!("s-{suffix}"), n, n, 0);
        let cdb = Db::create(&self.args.database_url).await?;
        let config = self.config(&cdb, &suffix, 0);
        let ceiling = self.ceiling(&cdb.pool, &config, &signups).await?;
        cdb.drop().await;

        let db = Db::create(&self.args.database_url).await?;
        let config = self.config(&db, &suffix, free_port()?);
        self.create_topics(&config).await?;
        self.produce(&config.topics.login, &signups).await?;
        progress("signup: pipeline");
        let run = self.run_pipeline(&config, &db, n as u64).await?;
        Report {
            scenario: "signup",
            events: n,
            secs: run.secs,
            ceiling_secs: Some(ceiling),
            p50: run.p50_ms,
            p99: run.p99_ms,
            rss: run.rss,
            extra: merge(
                serde_json::json!({"latency": "tx start -> broker ack"}),
                run.batches(),
            ),
        }
        .print();
        db.drop().await;
        Ok(())
    }

    async fn replay(&self, n: usize) -> anyhow::Result<()> {
        let users = (n / 10).max(1);
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let events = logins(&format!("p-{suffix}"), users, n, 0);
        let cdb = Db::create(&self.args.database_url).await?;
        let config = self.config(&cdb, &suffix, 0);
        self.ceiling(&cdb.pool, &config, &events).await?;
        let ceiling = self.ceiling(&cdb.pool, &config, &events).await?; // all duplicates
        cdb.drop().await;

        let db = Db::create(&self.args.database_url).await?;
        let config = self.config(&db, &suffix, free_port()?);
        self.create_topics(&config).await?;
        self.produce(&config.topics.login, &events).await?;
        progress("replay: first pass");
        self.run_pipeline(&config, &db, n as u64).await?;
        // Re-deliver everything: the same events again (what a rewind re-reads).
        progress("replay: re-delivering");
        self.produce(&config.topics.login, &events).await?;
        let run = self.run_pipeline(&config, &db, n as u64).await?;
        Report {
            scenario: "replay",
            events: n,
            secs: run.secs,
            ceiling_secs: Some(ceiling),
            p50: 0.0,
            p99: 0.0,
            rss: run.rss,
            extra: run.batches(),
        }
        .print();
        db.drop().await;
        Ok(())
    }

    async fn relay(&self, n: usize) -> anyhow::Result<()> {
        use authsync::store::outbox::{self, NewMessage};
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let db = Db::create(&self.args.database_url).await?;
        let config = self.config(&db, &suffix, free_port()?);
        self.create_topics(&config).await?;
        let payload = login_value("x", 1, 0, &time_at(0));
        let rows: Vec<NewMessage> = (0..n)
            .map(|i| NewMessage {
                event_id: uuid::Uuid::new_v4(),
                topic: config.topics.user_events.clone(),
                key: Some(format!("user-{}", i % 20_000).into_bytes()),
                event_type: "user.synced".into(),
                payload: Some(payload.clone()),
                headers: vec![(
                    "content-type".into(),
                    b"application/cloudevents+json".to_vec(),
                )],
            })
            .collect();
        // Ceiling: the same messages straight to Kafka with the same producer settings.
        let producer = relay::producer(&config)?;
        let started = Instant::now();
        for chunk in rows.chunks(config.relay.batch_size as usize) {
            let futures: Vec<_> = chunk
                .iter()
                .filter_map(|r| {
                    producer
                        .send_result(
                            FutureRecord::to(&r.topic)
                                .key(r.key.as_deref().unwrap_or_default())
                                .payload(r.payload.as_deref().unwrap_or_default()),
                        )
                        .ok()
                })
                .collect();
            for f in futures {
                let _ = f.await;
            }
        }
        let ceiling = started.elapsed().as_secs_f64();
        drop(producer);

        for chunk in rows.chunks(5_000) {
            let mut conn = db.pool.acquire().await?;
            outbox::insert(&mut conn, chunk).await?;
        }
        // A worker with nothing to consume: only its relay works.
        progress("relay: publishing");
        let run = self.run_pipeline(&config, &db, 0).await?;
        Report {
            scenario: "relay",
            events: n,
            secs: run.secs,
            ceiling_secs: Some(ceiling),
            p50: 0.0,
            p99: 0.0,
            rss: run.rss,
            extra: merge(
                serde_json::json!({"ceiling": "same producer, no database"}),
                run.cpu.json(n),
            ),
        }
        .print();
        db.drop().await;
        Ok(())
    }

    /// A reader of `topic` from its start, fetching with a short wait (latency scenarios).
    fn latency_reader(&self, group: &str, topic: &str) -> anyhow::Result<StreamConsumer> {
        let reader: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", group)
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "5")
            .create()?;
        reader.subscribe(&[topic])?;
        Ok(reader)
    }

    /// Polls `consumer` until the group gave it partitions (nothing is on its topics yet),
    /// so no group join lands inside the measured window.
    async fn joined<C: rdkafka::consumer::ConsumerContext + 'static>(
        consumer: &StreamConsumer<C>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while consumer.assignment()?.count() == 0 {
            if Instant::now() > deadline {
                bail!("consumer got no partitions within 30 s");
            }
            tokio::select! {
                m = consumer.recv() => { m?; }
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        Ok(())
    }

    /// Fetches `topic`'s metadata with `producer`, so its first send does not wait for it.
    async fn warmed<C: rdkafka::ClientContext + 'static>(
        producer: &FutureProducer<C>,
        topic: &str,
    ) -> anyhow::Result<()> {
        let (producer, topic) = (producer.clone(), topic.to_string());
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .map(|_| ())
        })
        .await??;
        Ok(())
    }

    /// Waits until the worker owns every input partition (its own metrics say so).
    async fn worker_joined(&self, config: &Config) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let metrics = scrape(config.http.listen).await.unwrap_or_default();
            let line = format!(
                "authsync_partitions_assigned{{topic=\"{}\"}} ",
                config.topics.login
            );
            let owned: f64 = metrics
                .lines()
                .find_map(|l| l.strip_prefix(&line)?.trim().parse().ok())
                .unwrap_or(0.0);
            if owned >= self.args.partitions as f64 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the worker owns {owned} partitions after 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The broker's own share of the latency, measured the way the pipeline uses it: the
    /// same pacing and duration, an input topic, a forwarder with the worker's consumer and
    /// relay-producer settings (and nothing else in between), an output topic, the same
    /// reader. (tansu's in-memory storage slows as topics grow, so a shorter floor run
    /// would flatter the broker.) Returns (p50, p99) in ms and, when the bench started the
    /// broker, the cores it used meanwhile.
    async fn broker_floor(&self, config: &Config, n: usize) -> anyhow::Result<Floor> {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let rate = self.args.rate.max(1) as usize;
        let (input, output) = (
            format!("bench.floor-in.{suffix}"),
            format!("bench.floor-out.{suffix}"),
        );
        self.create_named_topics(&[input.clone(), output.clone()])
            .await?;
        let mut forwarder_config = config.clone();
        forwarder_config.kafka.group_id = format!("bench-forwarder-{suffix}");
        let forwarder: StreamConsumer =
            authsync::consumer::consumer_client_config(&forwarder_config).create()?;
        forwarder.subscribe(&[&input])?;
        Self::joined(&forwarder).await?;
        let relay_producer = relay::producer(config)?;
        Self::warmed(&relay_producer, &output).await?;
        let stop = tokio_util::sync::CancellationToken::new();
        let forwarding = tokio::spawn({
            let (stop, output) = (stop.clone(), output.clone());
            async move {
                loop {
                    let m = tokio::select! {
                        _ = stop.cancelled() => break,
                        m = forwarder.recv() => m,
                    };
                    let Ok(m) = m else { continue };
                    let mut record =
                        FutureRecord::to(&output).payload(m.payload().unwrap_or_default());
                    if let Some(k) = m.key() {
                        record = record.key(k);
                    }
                    if let Ok(d) = relay_producer.send_result(record) {
                        drop(d);
                    }
                }
            }
        });
        let reader = self.latency_reader(&format!("bench-floor-{suffix}"), &output)?;
        Self::joined(&reader).await?;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("linger.ms", "0")
            .create()?;
        Self::warmed(&producer, &input).await?;
        // One clock for both sides: the payload carries its send time (µs since t0), padded
        // to about a login's size.
        let broker_cpu_before = self.broker_cpu_secs();
        let t0 = Instant::now();
        let sender = tokio::spawn({
            let (producer, topic) = (producer.clone(), input.clone());
            paced(rate, n, move |i| {
                let sent = format!("{:<600}", t0.elapsed().as_micros());
                let key = format!("k-{}", i % 1000);
                if let Ok(d) =
                    producer.send_result(FutureRecord::to(&topic).key(&key).payload(&sent))
                {
                    drop(d);
                }
            })
        });
        let mut latencies = Vec::with_capacity(n);
        let deadline = Instant::now() + Duration::from_secs((n / rate) as u64 + 30);
        while latencies.len() < n && Instant::now() < deadline {
            let m = tokio::select! {
                m = reader.recv() => m?,
                _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
            };
            let sent_us: f64 = std::str::from_utf8(m.payload().unwrap_or_default())?
                .trim_end()
                .parse()?;
            latencies.push(t0.elapsed().as_secs_f64() * 1000.0 - sent_us / 1000.0);
        }
        sender.await?;
        let broker_cores = self
            .broker_cpu_secs_since(broker_cpu_before)
            .map(|secs| cores(secs, t0));
        stop.cancel();
        forwarding.await?;
        latencies.sort_by(|a, b| a.total_cmp(b));
        let pct = |q: f64| percentile(&latencies, q);
        Ok(Floor {
            p50: pct(0.5),
            p99: pct(0.99),
            cores: broker_cores,
        })
    }

    /// `--rate` logins/s paced; latency = produce → result readable on the output topic,
    /// beside the broker's two-hop floor measured in the same run.
    async fn latency(&self, n: usize) -> anyhow::Result<()> {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let db = Db::create(&self.args.database_url).await?;
        let config = self.config(&db, &suffix, free_port()?);
        progress("latency: broker floor (two hops through a forwarder, no database)");
        let floor = self.broker_floor(&config, n).await?;
        progress("latency: the pipeline");
        let run = self.live_latency(&config, &db, n, None).await?;
        run.report("latency", &floor, serde_json::json!({}));
        db.drop().await;
        Ok(())
    }

    /// `--rate` logins/s for 20 s while, from the 4th second, `replayed` old events (all
    /// applied before, as a rewind re-reads them) are delivered again on the same topic.
    async fn mixed(&self, replayed: usize) -> anyhow::Result<()> {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let db = Db::create(&self.args.database_url).await?;
        let config = self.config(&db, &suffix, free_port()?);
        let n = 20 * self.args.rate as usize;
        progress("mixed: broker floor (two hops through a forwarder, no database)");
        let floor = self.broker_floor(&config, n).await?;
        // The old events, applied directly (the same step) and their results published
        // long ago: a replay finds each in the inbox and announces nothing.
        progress("mixed: applying the events to be replayed");
        let old = logins(&format!("m-{suffix}"), (replayed / 10).max(1), replayed, 0);
        self.ceiling(&db.pool, &config, &old).await?;
        sqlx::query("DELETE FROM outbox").execute(&db.pool).await?;
        progress("mixed: live logins with a replay from the 4th second");
        let run = self.live_latency(&config, &db, n, Some(old)).await?;
        run.report("mixed", &floor, serde_json::json!({"replayed": replayed}));
        db.drop().await;
        Ok(())
    }

    /// Runs the worker over `n` logins paced at `--rate`, each timed from its send to its
    /// `user.synced` on the output topic; with `replay`, those events are produced again
    /// (as fast as the producer goes) once a sixth of the logins are out.
    async fn live_latency(
        &self,
        config: &Config,
        db: &Db,
        n: usize,
        replay: Option<Vec<(String, Vec<u8>)>>,
    ) -> anyhow::Result<LatencyRun> {
        let rate = self.args.rate.max(1) as usize;
        self.create_topics(config).await?;
        let mut child = self.spawn_worker(config)?;
        let pid = child.id();
        let reader = self.latency_reader(
            &format!("bench-reader-{}", config.kafka.group_id),
            &config.topics.user_events,
        )?;
        // The worker and the reader join their groups before the clock starts.
        Self::joined(&reader).await?;
        self.worker_joined(config).await?;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("linger.ms", "0")
            .create()?;
        Self::warmed(&producer, &config.topics.login).await?;
        // login id -> its send time
        let sent: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
        let users = 1000;
        let broker_cpu_before = self.broker_cpu_secs();
        let t0 = Instant::now();
        let replay_window: Arc<std::sync::Mutex<Option<(Instant, Instant)>>> = Arc::default();
        let sender = {
            let (sent, topic, producer) =
                (sent.clone(), config.topics.login.clone(), producer.clone());
            tokio::spawn(paced(rate, n, move |i| {
                let id = format!("l-{i}");
                let key = format!("bench:user-{}", i % users);
                // Wall-clock event times: never stale against the replayed ones.
                let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
                let value = login_value(&id, i % users, i, &now);
                if let Ok(mut s) = sent.lock() {
                    s.insert(id, Instant::now());
                }
                if let Ok(d) =
                    producer.send_result(FutureRecord::to(&topic).key(&key).payload(&value))
                {
                    drop(d);
                }
            }))
        };
        let replaying = replay.map(|events| {
            let (window, topic, wait) = (
                replay_window.clone(),
                config.topics.login.clone(),
                Duration::from_secs_f64(n as f64 / rate as f64 / 6.0),
            );
            let brokers = self.brokers.clone();
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let started = Instant::now();
                let result = produce_to(&brokers, &topic, &events).await;
                if let Ok(mut w) = window.lock() {
                    *w = Some((started, Instant::now()));
                }
                result
            })
        });
        let mut latencies: Vec<(Instant, f64)> = Vec::with_capacity(n);
        let deadline = Instant::now() + Duration::from_secs((n / rate) as u64 + 60);
        while latencies.len() < n && Instant::now() < deadline {
            let m = tokio::select! {
                m = reader.recv() => m?,
                _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
            };
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())?;
            if v["type"] != "user.synced" {
                continue;
            }
            let cause = v["causationid"].as_str().unwrap_or_default();
            if let Some(t) = sent.lock().ok().and_then(|s| s.get(cause).copied()) {
                latencies.push((t, t.elapsed().as_secs_f64() * 1000.0));
            }
        }
        let elapsed = t0.elapsed();
        sender.await?;
        if let Some(r) = replaying {
            r.await??;
        }
        let broker_secs = self.broker_cpu_secs_since(broker_cpu_before);
        let rss = peak_rss(pid);
        let cpu = Cpu::of(pid, db, broker_secs).await;
        let worker = scrape(config.http.listen).await.unwrap_or_default();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        // Logins sent from the replay's first message until 5 s after its last: those
        // that could queue behind it.
        let window = replay_window.lock().ok().and_then(|w| *w);
        let during: Vec<f64> = window
            .map(|(from, to)| {
                latencies
                    .iter()
                    .filter(|(t, _)| *t >= from && *t <= to + Duration::from_secs(5))
                    .map(|(_, l)| *l)
                    .collect()
            })
            .unwrap_or_default();
        // p99 per 10 s of sending: shows a pipeline (or broker) that degrades as it runs.
        let mut windows: Vec<Vec<f64>> = Vec::new();
        for (t, l) in &latencies {
            let w = (t.duration_since(t0).as_secs() / 10) as usize;
            if windows.len() <= w {
                windows.resize(w + 1, Vec::new());
            }
            windows[w].push(*l);
        }
        let p99_by_10s = windows
            .into_iter()
            .map(|mut w| {
                w.sort_by(|a, b| a.total_cmp(b));
                (percentile(&w, 0.99) * 10.0).round() / 10.0
            })
            .collect();
        Ok(LatencyRun {
            sent: n,
            rate,
            p99_by_10s,
            latencies: latencies.into_iter().map(|(_, l)| l).collect(),
            during_replay: window.map(|(from, to)| (during, (to - from).as_secs_f64())),
            stats: WorkerStats::of(&worker),
            rss,
            cpu,
            batch_in_flight_avg: sum_metric(&worker, "authsync_batch_duration_seconds_sum")
                / elapsed.as_secs_f64().max(1e-9),
            broker_cores: broker_secs.map(|secs| secs / elapsed.as_secs_f64().max(1e-9)),
        })
    }
}

/// Calls `send(i)` for `i` in `0..n` at `rate` per second: one tick per ms with
/// `rate / 1000` sends each (at least one per tick, so below 1,000/s the tick slows down).
async fn paced(rate: usize, n: usize, mut send: impl FnMut(usize)) {
    let per_tick = (rate / 1000).max(1);
    let period = Duration::from_micros((1_000_000 * per_tick / rate.max(1)) as u64);
    let mut tick = tokio::time::interval(period);
    let mut i = 0;
    while i < n {
        tick.tick().await;
        for _ in 0..per_tick.min(n - i) {
            send(i);
            i += 1;
        }
    }
}

/// Produces `messages` to `topic` as fast as the producer goes (batched, lz4), awaiting
/// every delivery.
async fn produce_to(
    brokers: &str,
    topic: &str,
    messages: &[(String, Vec<u8>)],
) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("compression.type", "lz4")
        .create()?;
    for chunk in messages.chunks(20_000) {
        let futures: Vec<_> = chunk
            .iter()
            .map(|(k, v)| {
                producer
                    .send_result(FutureRecord::to(topic).key(k).payload(v))
                    .map_err(|(e, _)| e)
            })
            .collect();
        for f in futures {
            f?.await?.map_err(|(e, _)| e)?;
        }
    }
    Ok(())
}

/// One paced latency run (see [`Bench::live_latency`]).
struct LatencyRun {
    sent: usize,
    rate: usize,
    p99_by_10s: Vec<f64>,
    /// Produce → `user.synced` readable, ms, per login received.
    latencies: Vec<f64>,
    /// The latencies of logins sent during the replay (and 5 s after), and how long its
    /// delivery took, s.
    during_replay: Option<(Vec<f64>, f64)>,
    stats: WorkerStats,
    rss: u64,
    cpu: Cpu,
    /// Batches in flight on average (seconds in batches over the run's seconds).
    batch_in_flight_avg: f64,
    broker_cores: Option<f64>,
}

/// The broker's two-hop floor of the same run (see [`Bench::broker_floor`]).
struct Floor {
    p50: f64,
    p99: f64,
    cores: Option<f64>,
}

fn quantiles(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(|a, b| a.total_cmp(b));
    let tenth = |x: f64| (x * 10.0).round() / 10.0;
    serde_json::json!({
        "p50_ms": tenth(percentile(&v, 0.5)),
        "p90_ms": tenth(percentile(&v, 0.9)),
        "p99_ms": tenth(percentile(&v, 0.99)),
        "max_ms": tenth(v.last().copied().unwrap_or(0.0)),
        "n": v.len(),
    })
}

impl LatencyRun {
    fn report(self, scenario: &'static str, floor: &Floor, extra: serde_json::Value) {
        let tenth = |v: f64| (v * 10.0).round() / 10.0;
        let hundredth = |v: f64| (v * 100.0).round() / 100.0;
        let w = &self.stats;
        let pipeline = quantiles(self.latencies.clone());
        let mut sorted = self.latencies;
        sorted.sort_by(|a, b| a.total_cmp(b));
        let (p50, p99) = (percentile(&sorted, 0.5), percentile(&sorted, 0.99));
        let during = self.during_replay.map(|(d, secs)| {
            merge(
                quantiles(d),
                serde_json::json!({"replay_delivery_secs": tenth(secs)}),
            )
        });
        Report {
            scenario,
            events: sorted.len(),
            secs: self.sent as f64 / self.rate as f64,
            ceiling_secs: None,
            p50,
            p99,
            rss: self.rss,
            extra: merge(
                merge(
                    serde_json::json!({
                        "rate_per_s": self.rate,
                        "latency": "produce -> user.synced readable on the output topic",
                        "sent": self.sent,
                        "pipeline": pipeline,
                        "pipeline_p99_by_10s": self.p99_by_10s,
                        "during_replay": during,
                        "floor_two_hops": {"p50_ms": tenth(floor.p50), "p99_ms": tenth(floor.p99)},
                        "p50_over_floor": hundredth(p50 / floor.p50.max(1e-9)),
                        "p99_over_floor": hundredth(p99 / floor.p99.max(1e-9)),
                        "stages": {
                            "produce_to_batch_p50_ms": tenth(w.consume_p50_ms),
                            "produce_to_batch_p99_ms": tenth(w.consume_p99_ms),
                            "batch_avg_size": tenth(w.batch_avg_size),
                            "batch_avg_ms": tenth(w.batch_avg_ms),
                            "batch_p99_ms": tenth(w.batch_p99_ms),
                            "batches_in_flight_avg": hundredth(self.batch_in_flight_avg),
                            "tx_to_ack_p50_ms": tenth(w.delay_p50_ms),
                            "tx_to_ack_p99_ms": tenth(w.delay_p99_ms),
                        },
                        "broker_floor_cores": floor.cores.map(hundredth),
                        "broker_cores": self.broker_cores.map(hundredth),
                    }),
                    self.cpu.json(self.sent),
                ),
                extra,
            ),
        }
        .print();
    }
}

fn progress(what: &str) {
    eprintln!("[{}] {what}", chrono::Utc::now().format("%H:%M:%S"));
}

impl Bench {
    /// One user owning `n` rows across the tables a merge re-points, merged into another
    /// (through the same step the pipeline runs, in one transaction).
    async fn merge(&self, n: usize) -> anyhow::Result<()> {
        use authsync::steps::merge::AccountMerge;
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let db = Db::create(&self.args.database_url).await?;
        let config = self.config(&db, &suffix, 0);
        let ctx = Self::ctx(&config)?;
        let users = logins(&format!("m-{suffix}"), 2, 2, 0);
        let signups: Vec<InputMessage> = users
            .iter()
            .enumerate()
            .map(|(i, (k, v))| InputMessage {
                topic: config.topics.login.clone(),
                partition: 0,
                offset: i as i64,
                key: Some(k.as_bytes().to_vec()),
                value: Some(v.clone()),
                headers: vec![],
                timestamp: None,
            })
            .collect();
        run_batch(&db.pool, &ctx, &AuthSync, &signups).await?;
        let old = authsync::domain::ids::user_id("bench", "user-0");
        let new = authsync::domain::ids::user_id("bench", "user-1");
        progress(&format!("merge: seeding {n} rows owned by the old user"));
        let per = (n / 10).max(1) as i64;
        sqlx::raw_sql(&format!(
            r#"
            INSERT INTO assets (id, owner_id, name) SELECT gen_random_uuid(), '{old}', 'a' FROM generate_series(1, {a});
            INSERT INTO threads (id, owner_id) SELECT gen_random_uuid(), '{old}' FROM generate_series(1, {per});
            INSERT INTO asset_references (id, asset_id, created_by) SELECT gen_random_uuid(), gen_random_uuid(), '{old}' FROM generate_series(1, {per});
            INSERT INTO recent_assets (user_id, asset_id) SELECT '{old}', gen_random_uuid() FROM generate_series(1, {per});
            INSERT INTO recent_threads (user_id, thread_id) SELECT '{old}', gen_random_uuid() FROM generate_series(1, {per});
            INSERT INTO assets_to_collections (id, asset_id, collection_id, created_by) SELECT gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), '{old}' FROM generate_series(1, {per});
            INSERT INTO threads_to_collections (id, thread_id, collection_id, created_by) SELECT gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), '{old}' FROM generate_series(1, {per});
            INSERT INTO collection_permissions (collection_id, user_id, action) SELECT gen_random_uuid(), '{old}', 'write' FROM generate_series(1, {per});
            INSERT INTO collections (id, tenant_id, organization_id, kind, label, path, created_by)
                SELECT x, x, x, 'folder', 'c', ARRAY[x], '{old}' FROM (SELECT gen_random_uuid() AS x FROM generate_series(1, {per})) s;
            INSERT INTO access_tokens (token, user_id) SELECT 't' || g, '{old}' FROM generate_series(1, {per}) g;
            ANALYZE;
            "#,
            a = n as i64 - 9 * per,
        ))
        .execute(&db.pool)
        .await?;
        let value = serde_json::to_vec(&serde_json::json!({
            "specversion": "1.0", "id": format!("bench-merge-{suffix}"), "source": "bench",
            "type": "auth.merge", "time": chrono::Utc::now().to_rfc3339(),
            "data": {"newUserID": new, "oldUserId": old, "reason": "bench", "requestedBy": "authsync-bench"},
        }))?;
        let message = InputMessage {
            topic: config.topics.merge.clone(),
            partition: 0,
            offset: 0,
            key: Some(old.to_string().into_bytes()),
            value: Some(value),
            headers: vec![],
            timestamp: None,
        };
        progress("merge: merging");
        let started = Instant::now();
        let report = run_batch(
            &db.pool,
            &ctx,
            &AccountMerge,
            std::slice::from_ref(&message),
        )
        .await?;
        let secs = started.elapsed().as_secs_f64();
        if report.applied != 1 {
            bail!("merge not applied: {report:?}");
        }
        let moved = db
            .count(&format!(
                "SELECT count(*) FROM assets WHERE owner_id = '{new}'"
            ))
            .await;
        Report {
            scenario: "merge",
            events: 1,
            secs,
            ceiling_secs: None,
            p50: secs * 1000.0,
            p99: secs * 1000.0,
            rss: 0,
            extra: serde_json::json!({"rows_owned": n, "assets_moved": moved, "target_seconds": 3}),
        }
        .print();
        db.drop().await;
        Ok(())
    }
}

fn current_rss(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS:")
}

impl Bench {
    /// `soak`: `--rate` logins/s for `--minutes` through the real binary, retention at its
    /// shortest (0 h, every 10 s) so the clean-up runs the whole time. Prints, every minute,
    /// RSS, consumer lag (produced − handled), outbox backlog and inbox size; passes when
    /// RSS stays within 10% of its value at the end of the warm-up (the first sixth of the
    /// run, at least two minutes: connection pools, statement caches and jemalloc's arenas
    /// fill up) and lag, backlog and inbox stay bounded (at most 30 s, 10 s and 120 s of
    /// input).
    async fn soak(&self) -> anyhow::Result<bool> {
        let (minutes, rate) = (self.args.minutes.max(3), self.args.rate.max(1));
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let db = Db::create(&self.args.database_url).await?;
        let mut config = self.config(&db, &suffix, free_port()?);
        config.relay.inbox_retention_hours = 0;
        config.relay.outbox_retention_hours = 0;
        config.relay.cleanup_interval_secs = 10;
        self.create_topics(&config).await?;
        let mut child = self.spawn_worker(&config)?;
        let pid = child.id();
        self.worker_joined(&config).await?;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "1000000")
            .create()?;
        let produced = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sender = {
            let (producer, topic, produced, stop) = (
                producer.clone(),
                config.topics.login.clone(),
                produced.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                let per_tick = (rate / 100).max(1);
                let mut i: u64 = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    tick.tick().await;
                    for _ in 0..per_tick {
                        let now =
                            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
                        let id = format!("soak-{i}");
                        let user = (i % 20_000) as usize;
                        let value = login_value(&id, user, i as usize, &now);
                        let key = format!("bench:user-{user}");
                        if producer
                            .send_result(FutureRecord::to(&topic).key(&key).payload(&value))
                            .is_ok()
                        {
                            produced.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        i += 1;
                    }
                }
            })
        };
        let warm_up = (minutes / 6).max(2);
        let mut rows = Vec::new();
        let mut passed = true;
        let mut baseline_rss = 0u64;
        let mut max_rss = 0u64;
        for minute in 1..=minutes {
            tokio::time::sleep(Duration::from_secs(60)).await;
            if let Ok(Some(status)) = child.try_wait() {
                bail!("authsync exited during the soak: {status}");
            }
            let metrics = scrape(config.http.listen).await.unwrap_or_default();
            let handled = sum_metric(&metrics, "authsync_messages_processed_total") as u64;
            let sent = produced.load(std::sync::atomic::Ordering::Relaxed);
            let lag = sent.saturating_sub(handled);
            let backlog = db.count("SELECT count(*) FROM outbox").await;
            let inbox = db.count("SELECT count(*) FROM inbox").await;
            let rss = current_rss(pid);
            if minute == warm_up {
                baseline_rss = rss;
            }
            if minute > warm_up {
                max_rss = max_rss.max(rss);
            }
            let row = serde_json::json!({
                "minute": minute, "produced": sent, "handled": handled, "lag": lag,
                "outbox_backlog": backlog, "inbox_rows": inbox,
                "rss_mib": (rss as f64 / 1048576.0 * 10.0).round() / 10.0,
            });
            println!("{row}");
            if minute > warm_up {
                passed &=
                    lag <= rate * 30 && backlog as u64 <= rate * 10 && inbox as u64 <= rate * 120;
            }
            rows.push(row);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        sender.await?;
        let rss_growth = if baseline_rss > 0 {
            max_rss as f64 / baseline_rss as f64
        } else {
            0.0
        };
        passed &= rss_growth <= 1.10;
        println!(
            "{}",
            serde_json::json!({
                "scenario": "soak", "minutes": minutes, "rate": rate, "passed": passed,
                "warm_up_minutes": warm_up,
                "rss_after_warmup_mib": (baseline_rss as f64 / 1048576.0 * 10.0).round() / 10.0,
                "rss_max_mib": (max_rss as f64 / 1048576.0 * 10.0).round() / 10.0,
                "rss_growth": (rss_growth * 1000.0).round() / 1000.0,
            })
        );
        let _ = child.kill();
        let _ = child.wait();
        db.drop().await;
        Ok(passed)
    }
}

struct Broker(Option<Child>);
impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The worker binary lives beside this one; build it if it is not there.
    let exe = std::env::current_exe()?;
    let authsync_bin = exe.with_file_name("authsync");
    let profile_release = exe.to_string_lossy().contains("/release/");
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build.args(["build", "--quiet", "--bin", "authsync"]);
    if profile_release {
        build.arg("--release");
    }
    progress("building the authsync binary");
    if !build.status().map(|s| s.success()).unwrap_or(false) || !authsync_bin.exists() {
        bail!("cannot build the authsync binary");
    }
    let mut broker = Broker(None);
    // The latency scenarios, the soak and the ingest run against librdkafka's mock cluster
    // hosted here unless told otherwise: its two-hop floor is a few ms where tansu's is
    // hundreds (it would hide the worker), and tansu's in-memory store slows down as it
    // fills (its fetch lists every stored batch; after ~6 minutes at 1,000/s its metadata
    // requests took over 3 s).
    let use_mock = match args.broker.as_deref() {
        Some("mock") => true,
        Some("tansu") => false,
        Some(other) => bail!("--broker {other}: expected mock or tansu"),
        None => matches!(
            args.scenario.as_str(),
            "soak" | "ingest" | "latency" | "mixed"
        ),
    };
    let mut mock = None;
    let brokers = match &args.brokers {
        Some(b) => b.clone(),
        None if use_mock => {
            let cluster = rdkafka::mocking::MockCluster::new(1)?;
            let servers = cluster.bootstrap_servers();
            mock = Some(cluster);
            servers
        }
        None => {
            let port = free_port()?;
            let child = Command::new("tansu")
                .args([
                    "broker",
                    "--listener-url",
                    &format!("tcp://127.0.0.1:{port}"),
                    "--advertised-listener-url",
                    &format!("tcp://127.0.0.1:{port}"),
                    "--storage-engine",
                    "memory://tansu/",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start tansu (cargo install tansu --version 0.6.0 --locked --features dynostore), or pass --brokers")?;
            broker.0 = Some(child);
            tokio::time::sleep(Duration::from_millis(500)).await;
            format!("127.0.0.1:{port}")
        }
    };
    let bench = Bench {
        args,
        brokers,
        authsync_bin,
        broker_pid: broker.0.as_ref().map(Child::id),
        mock,
    };
    let scenario = bench.args.scenario.clone();
    let ev = bench.args.events;
    let run = |s: &str| s == scenario || scenario == "all";
    if scenario == "ingest" {
        ingest::verify_cost(200_000)?;
        ingest::run(&bench.brokers, bench.mock.as_ref(), 20).await?;
    }
    if run("returning") {
        bench.returning(ev.unwrap_or(200_000)).await?;
    }
    if run("signup") {
        bench.signup(ev.unwrap_or(50_000)).await?;
    }
    if run("replay") {
        bench.replay(ev.unwrap_or(200_000)).await?;
    }
    if run("relay") {
        bench.relay(ev.unwrap_or(200_000)).await?;
    }
    if run("merge") {
        bench.merge(ev.unwrap_or(100_000)).await?;
    }
    if run("latency") {
        // 20 s: the mock cluster's fetch walks a partition's whole log ("FIXME: Maintain an
        // index" in librdkafka's rdkafka_mock.c), so the floor and the pipeline both slow
        // down as the topics grow; `pipeline_p99_by_10s` shows it.
        bench
            .latency(ev.unwrap_or(20 * bench.args.rate as usize))
            .await?;
    }
    if run("mixed") {
        bench.mixed(ev.unwrap_or(200_000)).await?;
    }
    if scenario == "soak" {
        let passed = bench.soak().await?;
        drop(broker);
        if !passed {
            bail!("soak failed (see the summary line)");
        }
        return Ok(());
    }
    drop(broker);
    drop(bench);
    Ok(())
}
