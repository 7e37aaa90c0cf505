//! Shared by every scenario: the database, the worker's metrics, pacing and producing.
use super::*;

pub(crate) struct Db {
    pub(crate) name: String,
    pub(crate) url: String,
    pub(crate) pool: PgPool,
    pub(crate) admin: String,
}

impl Db {
    pub(crate) async fn create(admin: &str) -> anyhow::Result<Self> {
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

    pub(crate) async fn drop(self) {
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
    pub(crate) async fn analyze(&self) -> anyhow::Result<()> {
        sqlx::raw_sql("ANALYZE").execute(&self.pool).await?;
        Ok(())
    }

    /// CPU seconds used so far by the worker's Postgres backends (their `application_name`
    /// starts with `authsync`) in this database.
    pub(crate) async fn worker_backends_cpu_secs(&self) -> f64 {
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = current_database() AND application_name LIKE 'authsync%'",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default();
        pids.into_iter().map(|p| cpu_secs(p as u32)).sum()
    }

    pub(crate) async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&self.pool)
            .await
            .unwrap_or(-1)
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) fn login_value(id: &str, subject: usize, variant: usize, now: &str) -> Vec<u8> {
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
pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q) as usize)
        .copied()
        .unwrap_or(0.0)
}

pub(crate) fn time_at(offset_ms: i64) -> String {
    (chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .map(|t| t.with_timezone(&chrono::Utc))
        .unwrap_or_else(|_| chrono::Utc::now())
        + chrono::Duration::milliseconds(offset_ms))
    .to_rfc3339()
}

/// `n` logins over `users` identities; `round` shifts ids and times so rounds differ.
pub(crate) fn logins(prefix: &str, users: usize, n: usize, round: usize) -> Vec<(String, Vec<u8>)> {
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

pub(crate) fn partition_of(key: &str, partitions: usize) -> usize {
    // Any stable spread will do for the ceiling; it only needs the same per-key grouping.
    let mut h: u64 = 1469598103934665603;
    for b in key.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(1099511628211);
    }
    (h % partitions as u64) as usize
}

pub(crate) async fn scrape(addr: std::net::SocketAddr) -> Option<String> {
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
pub(crate) type Readings = [(f64, f64, f64)];
/// A condition on [`Readings`] to wait for.
pub(crate) type Until = Box<dyn Fn(&Readings) -> bool>;

/// The sum of metric `name`'s series labelled `topic="<topic>"`.
pub(crate) fn topic_metric(text: &str, name: &str, topic: &str) -> f64 {
    let label = format!("topic=\"{topic}\"");
    metric_sum(text, name, |line| line.contains(&label))
}

pub(crate) fn sum_metric(text: &str, name: &str) -> f64 {
    metric_sum(text, name, |_| true)
}

/// The sum of the series of metric `name` whose line passes `keep`.
pub(crate) fn metric_sum(text: &str, name: &str, keep: impl Fn(&str) -> bool) -> f64 {
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
pub(crate) fn cores(cpu_secs: f64, t0: Instant) -> f64 {
    cpu_secs / t0.elapsed().as_secs_f64().max(f64::EPSILON)
}

pub(crate) fn cpu_secs(pid: u32) -> f64 {
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
pub(crate) fn status_bytes(pid: u32, field: &str) -> u64 {
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

pub(crate) fn peak_rss(pid: u32) -> u64 {
    status_bytes(pid, "VmHWM:")
}

/// `a` with `b`'s fields added.
pub(crate) fn merge(mut a: serde_json::Value, b: serde_json::Value) -> serde_json::Value {
    if let (Some(a), Some(b)) = (a.as_object_mut(), b.as_object()) {
        a.extend(b.clone());
    }
    a
}

/// What the worker's own metrics say: publish delay quantiles and average batches.
pub(crate) struct WorkerStats {
    pub(crate) delay_p50_ms: f64,
    pub(crate) delay_p99_ms: f64,
    /// Producer timestamp → start of the batch applying it (broker hop, fetch, linger).
    pub(crate) consume_p50_ms: f64,
    pub(crate) consume_p99_ms: f64,
    pub(crate) batch_avg_size: f64,
    pub(crate) batch_avg_ms: f64,
    pub(crate) batch_p99_ms: f64,
    /// Seconds spent in batches, all partitions together.
    pub(crate) batch_total_secs: f64,
    /// The relay's read of an outbox batch → its last broker ack (the broker's share of
    /// transaction start → ack).
    pub(crate) publish_p50_ms: f64,
    pub(crate) publish_p99_ms: f64,
}

impl WorkerStats {
    pub(crate) fn of(metrics: &str) -> Self {
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
            publish_p50_ms: histogram_quantile(metrics, "authsync_relay_publish_seconds", 0.5)
                * 1000.0,
            publish_p99_ms: histogram_quantile(metrics, "authsync_relay_publish_seconds", 0.99)
                * 1000.0,
        }
    }
}

/// What one pipeline run measured.
pub(crate) struct PipelineRun {
    /// From the first fetched message to the last result published.
    pub(crate) secs: f64,
    /// Peak RSS of the worker process, bytes.
    pub(crate) rss: u64,
    /// Outbox write (transaction start) to broker ack, from the worker's own histogram.
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    /// Where a batch's time goes: its size and its transaction time (retries included).
    pub(crate) batch_avg_size: f64,
    pub(crate) batch_avg_ms: f64,
    /// Seconds spent in batches, all partitions together (over `secs`: how many partitions
    /// were busy on average).
    pub(crate) batch_total_secs: f64,
    pub(crate) cpu: Cpu,
    /// Events the run handled (or, for the relay alone, rows it published).
    pub(crate) events: usize,
}

impl PipelineRun {
    pub(crate) fn batches(&self) -> serde_json::Value {
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
pub(crate) struct Cpu {
    pub(crate) worker_secs: f64,
    pub(crate) postgres_secs: f64,
    pub(crate) broker_secs: Option<f64>,
}

impl Cpu {
    pub(crate) async fn of(pid: u32, db: &Db, broker_secs: Option<f64>) -> Self {
        Self {
            worker_secs: cpu_secs(pid),
            postgres_secs: db.worker_backends_cpu_secs().await,
            broker_secs,
        }
    }

    /// Per event, in µs.
    pub(crate) fn json(&self, events: usize) -> serde_json::Value {
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
pub(crate) fn histogram_quantile(text: &str, name: &str, q: f64) -> f64 {
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
pub(crate) struct Report {
    pub(crate) scenario: &'static str,
    pub(crate) events: usize,
    pub(crate) secs: f64,
    pub(crate) ceiling_secs: Option<f64>,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) rss: u64,
    pub(crate) extra: serde_json::Value,
}

impl Report {
    pub(crate) fn print(&self) {
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

/// Calls `send(i)` for `i` in `0..n` at `rate` per second: one tick per ms with
/// `rate / 1000` sends each (at least one per tick, so below 1,000/s the tick slows down).
pub(crate) async fn paced(rate: usize, n: usize, mut send: impl FnMut(usize)) {
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
pub(crate) async fn produce_to(
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

pub(crate) fn progress(what: &str) {
    eprintln!("[{}] {what}", chrono::Utc::now().format("%H:%M:%S"));
}

pub(crate) fn current_rss(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS:")
}
