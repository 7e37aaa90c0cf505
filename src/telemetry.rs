//! Logs, Prometheus metrics and the HTTP endpoints `/metrics`, `/healthz`, `/readyz`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::LogConfig;

/// Installs the global `tracing` subscriber (once; later calls are ignored).
pub fn init_tracing(config: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if config.format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// Buckets of the end-to-end delay histograms: fine below 100 ms (latency targets), coarse
/// up to a minute (backlogs).
const DELAY_BUCKETS: &[f64] = &[
    0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0,
    3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0,
];

/// Every metric authsync exports, registered in its own registry.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub consumed: IntCounterVec,
    pub processed: IntCounterVec,
    pub duplicates: IntCounterVec,
    pub dead_lettered: IntCounterVec,
    pub batch_seconds: HistogramVec,
    pub consume_delay_seconds: HistogramVec,
    pub batch_size: Histogram,
    pub transaction_messages: Histogram,
    pub batch_retries: IntCounter,
    pub isolated_batches: IntCounter,
    pub outbox_backlog: IntGauge,
    pub outbox_oldest_age_seconds: IntGauge,
    pub relay_published: IntCounterVec,
    pub relay_errors: IntCounter,
    pub relay_leader: IntGauge,
    pub relay_publish_seconds: Histogram,
    pub outbox_publish_delay_seconds: Histogram,
    pub partitions_assigned: IntGaugeVec,
    /// `authsync_partition_owned{topic,partition}`: present (1) while this process owns it.
    pub partition_owned: IntGaugeVec,
    pub partition_stalled: IntGaugeVec,
    pub component_up: IntGaugeVec,
    pub relay_parked: IntCounter,
    pub outbox_parked: IntGauge,
    pub relay_held_seconds: IntGauge,
    pub relay_holder: IntGaugeVec,
    pub cleanup_deleted: IntCounterVec,
    pub retention_overdue_seconds: IntGaugeVec,
    pub inbox_rows: IntGauge,
    pub last_resort_failures: IntCounter,
    pub merges_waiting: IntGauge,
    pub merge_wait_oldest_seconds: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("authsync".into()), None).unwrap_or_else(|_| Registry::new());
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| panic!("metric {name}: {e}"));
            registry
                .register(Box::new(c.clone()))
                .unwrap_or_else(|e| panic!("metric {name}: {e}"));
            c
        };
        let consumed = counter_vec(
            "messages_consumed_total",
            "Messages fetched from input topics",
            &["topic"],
        );
        let processed = counter_vec(
            "messages_processed_total",
            "Messages handled, by outcome (applied, signed_up, duplicate, dead_lettered)",
            &["topic", "outcome"],
        );
        let duplicates = counter_vec(
            "duplicates_total",
            "Messages skipped because their event id was already handled",
            &["topic"],
        );
        let dead_lettered = counter_vec(
            "dead_lettered_total",
            "Messages sent to the dead-letter topic, by error class",
            &["topic", "class"],
        );
        let relay_published = counter_vec(
            "relay_published_total",
            "Outbox rows published to Kafka",
            &["topic"],
        );
        let batch_seconds = HistogramVec::new(
            HistogramOpts::new(
                "batch_duration_seconds",
                "Time to apply one micro-batch, including retries",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["topic"],
        )
        .unwrap_or_else(|e| panic!("metric batch_duration_seconds: {e}"));
        let consume_delay_seconds = HistogramVec::new(
            HistogramOpts::new(
                "consume_delay_seconds",
                "Time from a message's Kafka timestamp to the start of the batch that applies it",
            )
            .buckets(DELAY_BUCKETS.to_vec()),
            &["topic"],
        )
        .unwrap_or_else(|e| panic!("metric consume_delay_seconds: {e}"));
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("batch_size", "Messages per micro-batch").buckets(vec![
                1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
            ]),
        )
        .unwrap_or_else(|e| panic!("metric batch_size: {e}"));
        let transaction_messages = Histogram::with_opts(
            HistogramOpts::new(
                "transaction_messages",
                "Messages per step transaction (the batches of several partitions combined)",
            )
            .buckets(vec![
                1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
            ]),
        )
        .unwrap_or_else(|e| panic!("metric transaction_messages: {e}"));
        let relay_publish_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "relay_publish_seconds",
                "Time from reading an outbox batch to its last delivery report",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ]),
        )
        .unwrap_or_else(|e| panic!("metric relay_publish_seconds: {e}"));
        let outbox_publish_delay_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "outbox_publish_delay_seconds",
                "Time from the start of the transaction that wrote a result to its broker ack",
            )
            .buckets(DELAY_BUCKETS.to_vec()),
        )
        .unwrap_or_else(|e| panic!("metric outbox_publish_delay_seconds: {e}"));
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
            registry
                .register(Box::new(g.clone()))
                .unwrap_or_else(|e| panic!("metric {name}: {e}"));
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
            registry
                .register(Box::new(c.clone()))
                .unwrap_or_else(|e| panic!("metric {name}: {e}"));
            c
        };
        let batch_retries = counter(
            "batch_retries_total",
            "Transient failures of a batch that led to a retry (offsets not committed)",
        );
        let isolated_batches = counter(
            "isolated_batches_total",
            "Batches re-run one savepoint per message because the database rejected them",
        );
        let relay_errors = counter(
            "relay_errors_total",
            "Outbox rows whose delivery failed (they are retried)",
        );
        let outbox_backlog = gauge("outbox_backlog", "Outbox rows not yet published");
        let outbox_oldest_age_seconds = gauge(
            "outbox_oldest_age_seconds",
            "Age of the oldest unpublished outbox row",
        );
        let relay_leader = gauge(
            "relay_leader",
            "1 while this process holds the relay leader lock",
        );
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| panic!("metric {name}: {e}"));
            registry
                .register(Box::new(g.clone()))
                .unwrap_or_else(|e| panic!("metric {name}: {e}"));
            g
        };
        let partition_stalled = gauge_vec(
            "partition_stalled",
            "1 while an owned partition is stalled (holds messages without committing for consumer.stalled_after_secs, or keeps failing)",
            &["topic", "partition"],
        );
        let component_up = gauge_vec(
            "component_up",
            "1 while a component of this process runs (consumer, relay, http)",
            &["component"],
        );
        let relay_parked = counter(
            "relay_parked_total",
            "Outbox rows the broker refused for good, moved to outbox_parked",
        );
        let outbox_parked = gauge(
            "outbox_parked",
            "Rows in outbox_parked (authsync outbox parked / retry)",
        );
        let relay_held_seconds = gauge(
            "relay_held_seconds",
            "How long the oldest committed result has been held back by an open transaction that can write the outbox",
        );
        let relay_holder = gauge_vec(
            "relay_holder_seconds",
            "While results are held past relay.held_warn_secs: the holding backend (pid, application_name) and how long it has held them",
            &["pid", "application"],
        );
        let cleanup_deleted = counter_vec(
            "cleanup_deleted_total",
            "Rows the retention clean-up deleted",
            &["table"],
        );
        let retention_overdue_seconds = gauge_vec(
            "retention_overdue_seconds",
            "How far past its retention the oldest row still present is (0: the clean-up keeps up)",
            &["table"],
        );
        let inbox_rows = gauge("inbox_rows", "Inbox rows (planner estimate)");
        let last_resort_failures = counter(
            "last_resort_failures_total",
            "Messages whose last-resort dead letter could not be written either (logged with their position; replay them)",
        );
        let merges_waiting = gauge(
            "merges_waiting",
            "Merges waiting for their users in merge_waits",
        );
        let merge_wait_oldest_seconds = gauge(
            "merge_wait_oldest_seconds",
            "How long the oldest waiting merge has waited since authsync first saw it",
        );
        let partitions_assigned = IntGaugeVec::new(
            Opts::new(
                "partitions_assigned",
                "Input partitions owned by this process",
            ),
            &["topic"],
        )
        .unwrap_or_else(|e| panic!("metric partitions_assigned: {e}"));
        let partition_owned = IntGaugeVec::new(
            Opts::new(
                "partition_owned",
                "1 for each input partition this process owns (which replica reads what)",
            ),
            &["topic", "partition"],
        )
        .unwrap_or_else(|e| panic!("metric partition_owned: {e}"));
        for c in [
            Box::new(batch_seconds.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(consume_delay_seconds.clone()),
            Box::new(batch_size.clone()),
            Box::new(transaction_messages.clone()),
            Box::new(relay_publish_seconds.clone()),
            Box::new(outbox_publish_delay_seconds.clone()),
            Box::new(partitions_assigned.clone()),
            Box::new(partition_owned.clone()),
        ] {
            registry
                .register(c)
                .unwrap_or_else(|e| panic!("metric registration: {e}"));
        }
        Self {
            registry,
            consumed,
            processed,
            duplicates,
            dead_lettered,
            batch_seconds,
            consume_delay_seconds,
            batch_size,
            transaction_messages,
            batch_retries,
            isolated_batches,
            outbox_backlog,
            outbox_oldest_age_seconds,
            relay_published,
            relay_errors,
            relay_leader,
            relay_publish_seconds,
            outbox_publish_delay_seconds,
            partitions_assigned,
            partition_owned,
            partition_stalled,
            component_up,
            relay_parked,
            outbox_parked,
            relay_held_seconds,
            relay_holder,
            cleanup_deleted,
            retention_overdue_seconds,
            inbox_rows,
            last_resort_failures,
            merges_waiting,
            merge_wait_oldest_seconds,
        }
    }

    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

/// A registry in the Prometheus text format (empty if it cannot be encoded).
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    if TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .is_err()
    {
        return String::new();
    }
    String::from_utf8(buf).unwrap_or_default()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One partition's health, as its task reports it.
#[derive(Clone, Debug, Default)]
struct PartitionHealth {
    /// Consecutive failed attempts of the current batch.
    failures: u32,
    /// Since when the partition has held messages without committing them.
    holding_since: Option<Instant>,
    last_error: Option<String>,
}

/// A component of the process that must be running for it to be ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Consumer,
    Relay,
    Http,
    MergeWaiter,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Consumer => "consumer",
            Component::Relay => "relay",
            Component::Http => "http",
            Component::MergeWaiter => "merge_waiter",
        }
    }
}

/// Readiness inputs shared by the components: each partition task, the relay and the
/// HTTP server report here; `/readyz` and `authsync_partition_stalled` read it.
pub struct Health {
    pub consumer_running: AtomicBool,
    /// The consumer's last metadata probe reached the brokers (see `consumer::run`).
    pub broker_reachable: AtomicBool,
    pub shutting_down: AtomicBool,
    /// Consecutive failed attempts of any partition (kept for the summary line).
    pub failing_batches: AtomicU32,
    pub unready_after_failures: AtomicU32,
    stalled_after: Duration,
    partitions: Mutex<HashMap<(String, i32), PartitionHealth>>,
    /// Components expected to run, and whether they do.
    components: Mutex<HashMap<Component, bool>>,
    metrics: Option<Metrics>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            consumer_running: AtomicBool::new(false),
            broker_reachable: AtomicBool::new(true),
            shutting_down: AtomicBool::new(false),
            failing_batches: AtomicU32::new(0),
            unready_after_failures: AtomicU32::new(5),
            stalled_after: Duration::from_secs(120),
            partitions: Mutex::default(),
            components: Mutex::default(),
            metrics: None,
        }
    }
}

/// What `/readyz` says about one stalled partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stalled {
    pub topic: String,
    pub partition: i32,
    pub failures: u32,
    pub holding_secs: u64,
    pub last_error: Option<String>,
}

impl Health {
    pub fn new(unready_after_failures: u32) -> Arc<Self> {
        Self::with(unready_after_failures, Duration::from_secs(120), None)
    }

    /// Health that also keeps `authsync_partition_stalled` and `authsync_component_up`.
    pub fn with(
        unready_after_failures: u32,
        stalled_after: Duration,
        metrics: Option<Metrics>,
    ) -> Arc<Self> {
        let health = Self {
            stalled_after,
            metrics,
            ..Self::default()
        };
        health
            .unready_after_failures
            .store(unready_after_failures, Ordering::Relaxed);
        Arc::new(health)
    }

    fn with_partition(&self, topic: &str, partition: i32, f: impl FnOnce(&mut PartitionHealth)) {
        if let Ok(mut map) = self.partitions.lock() {
            f(map.entry((topic.to_string(), partition)).or_default());
        }
    }

    /// The partition's task took messages it has not committed yet.
    pub fn holding(&self, topic: &str, partition: i32) {
        self.with_partition(topic, partition, |p| {
            p.holding_since.get_or_insert_with(Instant::now);
        });
    }

    /// An attempt at the partition's batch failed (it will be retried).
    pub fn failed(&self, topic: &str, partition: i32, error: &str) {
        self.failing_batches.fetch_add(1, Ordering::Relaxed);
        self.with_partition(topic, partition, |p| {
            p.failures += 1;
            p.last_error = Some(error.chars().take(300).collect());
        });
    }

    /// The partition's batch committed: it holds nothing now.
    pub fn committed(&self, topic: &str, partition: i32) {
        self.failing_batches.store(0, Ordering::Relaxed);
        self.with_partition(topic, partition, |p| *p = PartitionHealth::default());
    }

    /// The partition is no longer this process's (revoked) or its task ended.
    pub fn forget(&self, topic: &str, partition: i32) {
        if let Ok(mut map) = self.partitions.lock() {
            map.remove(&(topic.to_string(), partition));
        }
        if let Some(m) = &self.metrics {
            let _ = m
                .partition_stalled
                .remove_label_values(&[topic, &partition.to_string()]);
        }
    }

    /// Partitions that hold messages without committing for `stalled_after`, or whose
    /// batch failed `unready_after_failures` times in a row. Updates the gauge.
    pub fn stalled(&self) -> Vec<Stalled> {
        let threshold = self.unready_after_failures.load(Ordering::Relaxed).max(1);
        let mut out = Vec::new();
        let Ok(map) = self.partitions.lock() else {
            return out;
        };
        for ((topic, partition), p) in map.iter() {
            let holding = p.holding_since.map(|t| t.elapsed()).unwrap_or_default();
            let stalled = p.failures >= threshold
                || (p.holding_since.is_some() && holding >= self.stalled_after);
            if let Some(m) = &self.metrics {
                m.partition_stalled
                    .with_label_values(&[topic, &partition.to_string()])
                    .set(i64::from(stalled));
            }
            if stalled {
                out.push(Stalled {
                    topic: topic.clone(),
                    partition: *partition,
                    failures: p.failures,
                    holding_secs: holding.as_secs(),
                    last_error: p.last_error.clone(),
                });
            }
        }
        out.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        out
    }

    /// A component that must run for the process to be ready started (`true`) or stopped.
    pub fn set_component(&self, component: Component, up: bool) {
        if let Ok(mut map) = self.components.lock() {
            map.insert(component, up);
        }
        if let Some(m) = &self.metrics {
            m.component_up
                .with_label_values(&[component.as_str()])
                .set(i64::from(up));
        }
    }

    /// `None` when ready, else why not.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Some("shutting down".into());
        }
        if !self.consumer_running.load(Ordering::Relaxed) {
            return Some("consumer not running".into());
        }
        if !self.broker_reachable.load(Ordering::Relaxed) {
            return Some("Kafka brokers unreachable (metadata probe failed)".into());
        }
        if let Ok(map) = self.components.lock() {
            let mut down: Vec<&str> = map
                .iter()
                .filter(|(_, up)| !**up)
                .map(|(c, _)| c.as_str())
                .collect();
            if !down.is_empty() {
                down.sort_unstable();
                return Some(format!("component stopped: {}", down.join(", ")));
            }
        }
        let stalled = self.stalled();
        if !stalled.is_empty() {
            let list: Vec<String> = stalled
                .iter()
                .map(|s| {
                    format!(
                        "{}[{}] ({} failed attempts, holding for {} s{})",
                        s.topic,
                        s.partition,
                        s.failures,
                        s.holding_secs,
                        s.last_error
                            .as_ref()
                            .map(|e| format!(", last error: {e}"))
                            .unwrap_or_default()
                    )
                })
                .collect();
            return Some(format!("stalled partitions: {}", list.join("; ")));
        }
        None
    }
}

#[derive(Clone)]
struct HttpState {
    metrics: Metrics,
    health: Arc<Health>,
    pool: PgPool,
}

async fn metrics_handler(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    if let Some(reason) = state.health.not_ready_reason() {
        return (StatusCode::SERVICE_UNAVAILABLE, reason);
    }
    match crate::store::ping(&state.pool).await {
        Ok(()) => (StatusCode::OK, "ready".to_string()),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "database unreachable".to_string(),
        ),
    }
}

/// Serves the endpoints until `stop`; returns the bound address. If the server fails
/// before that, it cancels `shutdown` (the worker stops with it).
pub async fn serve_http(
    listen: SocketAddr,
    metrics: Metrics,
    health: Arc<Health>,
    pool: PgPool,
    stop: CancellationToken,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(HttpState {
            metrics,
            health: health.clone(),
            pool,
        });
    let listener = bind_listener(listen)?;
    let addr = listener.local_addr()?;
    health.set_component(Component::Http, true);
    tokio::spawn(async move {
        let stopping = stop.clone();
        let served = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopping.cancelled().await })
                .await
        })
        .await;
        if stop.is_cancelled() {
            return;
        }
        // Without its endpoints the process cannot be probed or scraped: it ends, visibly,
        // so that the orchestrator restarts it.
        health.set_component(Component::Http, false);
        match served {
            Ok(Ok(())) => tracing::error!("HTTP server stopped; stopping the worker"),
            Ok(Err(e)) => tracing::error!(error = %e, "HTTP server failed; stopping the worker"),
            Err(e) => tracing::error!(error = %e, "HTTP server panicked; stopping the worker"),
        }
        shutdown.cancel();
    });
    Ok(addr)
}

/// Binds an HTTP listener. `[::]` listens on IPv6 *and* IPv4 (IPV6_V6ONLY is switched off
/// explicitly, whatever `net.ipv6.bindv6only` says), so one default serves IPv4-only,
/// dual-stack and IPv6-only clusters. On a host without IPv6 at all, `[::]` falls back to
/// `0.0.0.0` with a warning rather than failing the start.
pub fn bind_listener(listen: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let open = |addr: SocketAddr| -> std::io::Result<std::net::TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if addr.is_ipv6() && addr.ip().is_unspecified() {
            socket.set_only_v6(false)?;
        }
        // A restarted process can rebind while the old connections sit in TIME_WAIT.
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    };
    let listener = match open(listen) {
        Err(e)
            if listen.is_ipv6()
                && listen.ip().is_unspecified()
                && matches!(
                    e.raw_os_error(),
                    Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
                ) =>
        {
            let v4 = SocketAddr::from(([0, 0, 0, 0], listen.port()));
            tracing::warn!(%listen, fallback = %v4, error = %e, "no IPv6 on this host; listening on IPv4 only");
            open(v4)?
        }
        other => other?,
    };
    tokio::net::TcpListener::from_std(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default listen address must serve IPv4 clients (kubelet probes on an IPv4 pod IP)
    /// and IPv6 clients alike, whatever `net.ipv6.bindv6only` says.
    #[tokio::test]
    async fn the_unspecified_ipv6_address_accepts_ipv4_and_ipv6_clients() {
        let listener = bind_listener(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)))
            .expect("bind [::]:0");
        let port = listener.local_addr().expect("local addr").port();
        let accept = tokio::spawn(async move {
            for _ in 0..2 {
                let _ = listener.accept().await.expect("accept");
            }
        });
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("an IPv4 client reaches [::]");
        let ipv6_host = std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|s| !s.is_empty());
        if ipv6_host {
            tokio::net::TcpStream::connect(("::1", port))
                .await
                .expect("an IPv6 client reaches [::]");
        } else {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("second IPv4 client");
        }
        tokio::time::timeout(Duration::from_secs(5), accept)
            .await
            .expect("both accepted")
            .expect("accept task");
    }

    #[test]
    fn one_stuck_partition_makes_the_process_unready_whatever_the_others_do() {
        let metrics = Metrics::new();
        let health = Health::with(3, Duration::from_secs(3600), Some(metrics.clone()));
        health.consumer_running.store(true, Ordering::Relaxed);
        assert_eq!(health.not_ready_reason(), None);
        for _ in 0..3 {
            health.failed("auth.login.v1", 4, "deadlock detected");
        }
        // Another partition's success does not hide it (it did, with one global counter).
        health.holding("auth.login.v1", 1);
        health.committed("auth.login.v1", 1);
        let reason = health.not_ready_reason().expect("not ready");
        assert!(
            reason.contains("auth.login.v1[4]") && reason.contains("deadlock"),
            "{reason}"
        );
        assert!(metrics
            .render()
            .contains(r#"authsync_partition_stalled{partition="4",topic="auth.login.v1"} 1"#));
        health.committed("auth.login.v1", 4);
        assert_eq!(health.not_ready_reason(), None);
        // Holding messages without committing for too long is stalled too.
        let slow = Health::with(100, Duration::ZERO, None);
        slow.consumer_running.store(true, Ordering::Relaxed);
        slow.holding("auth.merge.v1", 0);
        assert!(slow
            .not_ready_reason()
            .is_some_and(|r| r.contains("auth.merge.v1[0]")));
        slow.forget("auth.merge.v1", 0);
        assert_eq!(slow.not_ready_reason(), None);
        // A component that stopped is named.
        slow.set_component(Component::Relay, true);
        slow.set_component(Component::Relay, false);
        assert_eq!(
            slow.not_ready_reason().as_deref(),
            Some("component stopped: relay")
        );
    }

    /// Every `authsync_*` series the shipped dashboard and alert rules query exists: a renamed
    /// metric would otherwise leave an empty panel or an alert that never fires.
    #[test]
    fn dashboard_and_alerts_query_only_exported_metrics() {
        let m = Metrics::new();
        // Labelled families appear once they have a child.
        m.consumed.with_label_values(&["t"]).inc();
        m.processed.with_label_values(&["t", "applied"]).inc();
        m.duplicates.with_label_values(&["t"]).inc();
        m.dead_lettered.with_label_values(&["t", "c"]).inc();
        m.batch_seconds.with_label_values(&["t"]).observe(0.1);
        m.consume_delay_seconds
            .with_label_values(&["t"])
            .observe(0.1);
        m.partitions_assigned.with_label_values(&["t"]).set(1);
        m.relay_published.with_label_values(&["t"]).inc();
        m.partition_stalled.with_label_values(&["t", "0"]).set(0);
        m.component_up.with_label_values(&["relay"]).set(1);
        m.relay_holder.with_label_values(&["1", "psql"]).set(1);
        m.cleanup_deleted.with_label_values(&["inbox"]).inc();
        m.retention_overdue_seconds
            .with_label_values(&["inbox"])
            .set(0);
        let exported = m.render();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut checked = 0;
        for file in [
            "deploy/grafana/authsync.json",
            "deploy/prometheus/alerts.yaml",
        ] {
            let text =
                std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            for (i, _) in text.match_indices("authsync_") {
                let name: String = text[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let line_start = format!("\n{name}");
                let family = format!("# TYPE {name} ");
                assert!(
                    exported.contains(&line_start) || exported.contains(&family),
                    "{file} queries `{name}`, which authsync does not export"
                );
                checked += 1;
            }
        }
        assert!(checked > 20, "found only {checked} metric references");
    }
}
