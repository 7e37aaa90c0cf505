//! Logs, Prometheus metrics and the HTTP endpoints `/metrics`, `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

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
        let partitions_assigned = IntGaugeVec::new(
            Opts::new(
                "partitions_assigned",
                "Input partitions owned by this process",
            ),
            &["topic"],
        )
        .unwrap_or_else(|e| panic!("metric partitions_assigned: {e}"));
        for c in [
            Box::new(batch_seconds.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(consume_delay_seconds.clone()),
            Box::new(batch_size.clone()),
            Box::new(relay_publish_seconds.clone()),
            Box::new(outbox_publish_delay_seconds.clone()),
            Box::new(partitions_assigned.clone()),
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
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if encoder.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Readiness inputs shared by the components.
#[derive(Default)]
pub struct Health {
    pub consumer_running: AtomicBool,
    pub shutting_down: AtomicBool,
    /// Consecutive transient batch failures (reset by a success).
    pub failing_batches: AtomicU32,
    pub unready_after_failures: AtomicU32,
}

impl Health {
    pub fn new(unready_after_failures: u32) -> Arc<Self> {
        let health = Self::default();
        health
            .unready_after_failures
            .store(unready_after_failures, Ordering::Relaxed);
        Arc::new(health)
    }

    /// `None` when ready, else why not.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Some("shutting down");
        }
        if !self.consumer_running.load(Ordering::Relaxed) {
            return Some("consumer not running");
        }
        if self.failing_batches.load(Ordering::Relaxed)
            >= self.unready_after_failures.load(Ordering::Relaxed).max(1)
        {
            return Some("batches are failing transiently (database or broker)");
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
        return (StatusCode::SERVICE_UNAVAILABLE, reason.to_string());
    }
    match crate::store::ping(&state.pool).await {
        Ok(()) => (StatusCode::OK, "ready".to_string()),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "database unreachable".to_string(),
        ),
    }
}

/// Serves the endpoints until `shutdown`; returns the bound address through `bound`.
pub async fn serve_http(
    listen: SocketAddr,
    metrics: Metrics,
    health: Arc<Health>,
    pool: PgPool,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(HttpState {
            metrics,
            health,
            pool,
        });
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

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
