//! `authsync ingest`: the HTTP front door for provider webhooks. It authenticates each
//! request with its provider's scheme, turns it into one normalized login per message
//! (keyed `provider:subject`, secrets left behind), signs each with its verified source,
//! produces them with an idempotent `acks=all` producer and answers only after the broker
//! acknowledged. A separate process from the worker: it scales with webhook traffic.

pub mod auth;
pub mod deliveries;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, IngestConfig, IngestEndpointConfig};
use crate::events::providers::Provider;
use crate::events::source::{SigningKey, SIGNATURE_HEADER, SOURCE_HEADER};
use auth::{AuthFailure, Authenticator};
use deliveries::{Kind, Outgoing, Refusal};

/// How long a 503 asks the provider to wait before retrying.
const RETRY_AFTER_SECS: u64 = 5;

fn invalid(problem: impl Into<String>) -> ConfigError {
    crate::config::invalid("ingest.endpoints", problem)
}

fn endpoint_kind(
    name: &str,
    e: &IngestEndpointConfig,
) -> Result<(Kind, &'static str), ConfigError> {
    let provider = e.provider.trim().to_ascii_lowercase();
    let kind = if provider == "cloudevents" {
        if e.providers.is_empty() {
            return Err(invalid(format!(
                "`{name}`: a cloudevents endpoint lists the providers it may speak for (`providers`, [\"*\"] for any)"
            )));
        }
        Kind::CloudEvents((!e.providers.iter().any(|p| p.trim() == "*")).then(|| {
            e.providers
                .iter()
                .map(|p| p.trim().to_ascii_lowercase())
                .collect()
        }))
    } else {
        Kind::Native(Provider::from_name(&provider).ok_or_else(|| {
            invalid(format!(
                "`{name}`: provider `{provider}` is not one of auth0, clerk, firebase, okta, keycloak, workos, cognito, cloudevents"
            ))
        })?)
    };
    let default = match &kind {
        Kind::Native(Provider::Workos) => "workos",
        Kind::Native(Provider::Okta | Provider::Auth0) => "token",
        _ => "standard_webhooks",
    };
    let scheme = match e.auth.as_deref().map(str::trim) {
        None | Some("") => default,
        Some("standard_webhooks") => "standard_webhooks",
        Some("workos") => "workos",
        Some("token") => "token",
        Some(other) => {
            return Err(invalid(format!(
                "`{name}`: auth `{other}` is not one of standard_webhooks, workos, token"
            )))
        }
    };
    Ok((kind, scheme))
}

/// The checks that need no secret: run with every configuration load.
pub fn check_config(config: &IngestConfig) -> Result<(), ConfigError> {
    if !(1024..=64 * 1024 * 1024).contains(&config.max_body_bytes) {
        return Err(crate::config::invalid(
            "ingest.max_body_bytes",
            "must be between 1024 and 67108864",
        ));
    }
    if config.ack_timeout_ms == 0 || config.request_timeout_ms <= config.ack_timeout_ms {
        return Err(ConfigError::Invalid {
            field: "ingest.request_timeout_ms",
            problem:
                "must be greater than ingest.ack_timeout_ms (> 0): a request waits for its acks"
                    .into(),
        });
    }
    for (name, endpoint) in &config.endpoints {
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid(format!(
                "endpoint name `{name}` must be 1-64 letters, digits, `-`, `_` or `.` (it is a URL path and the source name)"
            )));
        }
        if endpoint.secrets.is_empty() {
            return Err(invalid(format!(
                "`{name}` has no secrets: every endpoint authenticates"
            )));
        }
        endpoint_kind(name, endpoint)?;
    }
    Ok(())
}

/// An endpoint ready to serve: its secrets resolved.
struct Endpoint {
    name: String,
    kind: Kind,
    provider_label: String,
    auth: Authenticator,
}

/// Metrics of the ingest process (its own registry, on its own `/metrics`).
#[derive(Clone)]
pub struct IngestMetrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub signature_failures: IntCounterVec,
    pub events: IntCounterVec,
    pub ack_seconds: HistogramVec,
}

impl IngestMetrics {
    fn new() -> anyhow::Result<Self> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("authsync_ingest_requests_total", "Webhook requests by endpoint, provider and outcome (accepted, unauthorized, too_large, bad_request, forbidden, unavailable, timeout, not_found, challenge)"),
            &["endpoint", "provider", "outcome"],
        )?;
        let signature_failures = IntCounterVec::new(
            Opts::new("authsync_ingest_signature_failures_total", "Requests refused with 401, by endpoint and reason (missing, malformed, stale, invalid)"),
            &["endpoint", "reason"],
        )?;
        let events = IntCounterVec::new(
            Opts::new("authsync_ingest_events_total", "Provider events by endpoint, provider and outcome (produced, dropped_not_login, undecodable)"),
            &["endpoint", "provider", "outcome"],
        )?;
        let ack_seconds = HistogramVec::new(
            HistogramOpts::new(
                "authsync_ingest_ack_seconds",
                "From the request's arrival to the broker's acknowledgement of all its messages",
            )
            .buckets(vec![
                0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
            ]),
            &["endpoint"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(signature_failures.clone()))?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(ack_seconds.clone()))?;
        Ok(Self {
            registry,
            requests,
            signature_failures,
            events,
            ack_seconds,
        })
    }

    pub fn render(&self) -> String {
        crate::telemetry::render(&self.registry)
    }
}

struct Shared {
    endpoints: HashMap<String, Endpoint>,
    producer: FutureProducer,
    topic: String,
    key: SigningKey,
    dry_run: bool,
    max_body_bytes: usize,
    request_timeout: Duration,
    metrics: IngestMetrics,
    /// The broker answered a metadata request recently.
    broker_ok: AtomicBool,
    stopping: AtomicBool,
}

/// A started ingest server.
pub struct Ingest {
    pub addr: SocketAddr,
    pub metrics: IngestMetrics,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Ingest {
    /// Waits until in-flight requests are answered and the producer flushed.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.handle.await.context("ingest task panicked")?
    }
}

/// Resolves secrets, binds the listener and serves until `shutdown`.
pub async fn start(config: &Config, shutdown: CancellationToken) -> anyhow::Result<Ingest> {
    let ingest = &config.ingest;
    if ingest.endpoints.is_empty() {
        anyhow::bail!("ingest.endpoints is empty: configure at least one webhook endpoint");
    }
    if ingest.signing_key.is_empty() {
        anyhow::bail!(
            "ingest.signing_key is required: the worker believes only what this key signs (trust.keys)"
        );
    }
    let key = SigningKey::resolve(
        &ingest.signing_key_id,
        &ingest.signing_key,
        "ingest.signing_key",
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let mut endpoints = HashMap::new();
    for (name, e) in &ingest.endpoints {
        let (kind, scheme) = endpoint_kind(name, e)?;
        let secrets = e
            .secrets
            .iter()
            .map(|s| s.resolve().map(|s| s.expose().to_string()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|problem| anyhow::anyhow!("ingest.endpoints.{name}.secrets: {problem}"))?;
        let auth = Authenticator::new(scheme, &secrets, e.header.as_deref(), ingest.tolerance_secs)
            .map_err(|problem| anyhow::anyhow!("ingest.endpoints.{name}: {problem}"))?;
        let provider_label = match &kind {
            Kind::Native(p) => p.name().to_string(),
            Kind::CloudEvents(_) => "cloudevents".to_string(),
        };
        endpoints.insert(
            name.clone(),
            Endpoint {
                name: name.clone(),
                kind,
                provider_label,
                auth,
            },
        );
    }
    let producer: FutureProducer = crate::kafka::client_config(&config.kafka)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .set("message.timeout.ms", ingest.ack_timeout_ms.to_string())
        .set("compression.type", "none")
        .create()
        .context("cannot create the Kafka producer")?;
    let metrics = IngestMetrics::new()?;
    let shared = Arc::new(Shared {
        endpoints,
        producer,
        topic: config.topics.login.clone(),
        key,
        dry_run: ingest.dry_run,
        max_body_bytes: ingest.max_body_bytes,
        request_timeout: Duration::from_millis(ingest.request_timeout_ms),
        metrics: metrics.clone(),
        broker_ok: AtomicBool::new(false),
        stopping: AtomicBool::new(false),
    });
    let listener = crate::telemetry::bind_listener(ingest.listen)
        .with_context(|| format!("cannot listen on {} (ingest.listen)", ingest.listen))?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/hooks/{endpoint}", any(hook))
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(shared.clone());
    tokio::spawn(watch_broker(shared.clone(), shutdown.clone()));
    tracing::info!(%addr, endpoints = shared.endpoints.len(), dry_run = shared.dry_run, "ingest listening");
    let handle = tokio::spawn(async move {
        let stop = shutdown.clone();
        let flag = shared.clone();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                stop.cancelled().await;
                flag.stopping.store(true, Ordering::Relaxed);
            })
            .await
            .context("ingest HTTP server failed")?;
        // Everything answered was acknowledged already; this only drains stragglers.
        let producer = shared.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10)))
            .await
            .ok();
        tracing::info!("ingest stopped");
        Ok(())
    });
    Ok(Ingest {
        addr,
        metrics,
        handle,
    })
}

/// Readiness follows the broker: a metadata round trip every few seconds.
async fn watch_broker(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let producer = shared.producer.clone();
        let topic = shared.topic.clone();
        let ok = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(3))
                .is_ok_and(|m| m.topics().iter().any(|t| t.error().is_none()))
        })
        .await
        .unwrap_or(false);
        if ok != shared.broker_ok.swap(ok, Ordering::Relaxed) {
            if ok {
                tracing::info!("ingest: broker reachable");
            } else {
                tracing::warn!("ingest: broker unreachable or topic missing; /readyz is 503");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(if ok { 5 } else { 1 })) => {}
        }
    }
}

async fn metrics_handler(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        shared.metrics.render(),
    )
}

async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if shared.stopping.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping")
    } else if !shared.broker_ok.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "broker unreachable")
    } else {
        (StatusCode::OK, "ready")
    }
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response {
    let mut response = (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from(RETRY_AFTER_SECS));
    }
    response
}

fn error(status: StatusCode, message: &str) -> Response {
    reply(status, serde_json::json!({ "error": message }))
}

async fn hook(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    request: Request,
) -> Response {
    let Some(endpoint) = shared.endpoints.get(&name) else {
        shared
            .metrics
            .requests
            .with_label_values(&["-", "-", "not_found"])
            .inc();
        return error(StatusCode::NOT_FOUND, "no such endpoint");
    };
    let count = |outcome: &str| {
        shared
            .metrics
            .requests
            .with_label_values(&[&endpoint.name, &endpoint.provider_label, outcome])
            .inc()
    };
    let started = Instant::now();
    let handled = tokio::time::timeout(
        shared.request_timeout,
        handle(&shared, endpoint, request, started),
    )
    .await;
    match handled {
        Ok((outcome, response)) => {
            count(outcome);
            response
        }
        Err(_) => {
            count("timeout");
            error(StatusCode::SERVICE_UNAVAILABLE, "timed out; retry")
        }
    }
}

async fn handle(
    shared: &Shared,
    endpoint: &Endpoint,
    request: Request,
    started: Instant,
) -> (&'static str, Response) {
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let method = parts.method;
    if method != Method::POST && method != Method::GET {
        return (
            "bad_request",
            error(StatusCode::METHOD_NOT_ALLOWED, "POST only"),
        );
    }
    let body = match read_body(body, shared.max_body_bytes).await {
        Ok(b) => b,
        Err(status) => {
            let outcome = if status == StatusCode::PAYLOAD_TOO_LARGE {
                "too_large"
            } else {
                "bad_request"
            };
            return (
                outcome,
                error(status, "request body too large or unreadable"),
            );
        }
    };
    let verified = match endpoint.auth.verify(&headers, &body, chrono::Utc::now()) {
        Ok(v) => v,
        Err(failure) => return unauthorized(shared, endpoint, failure),
    };
    if method == Method::GET {
        return okta_challenge(endpoint, &headers);
    }
    let now = chrono::Utc::now();
    // The worker applies what ingest produced with the same limit per message.
    let split = match deliveries::split(
        &endpoint.name,
        &endpoint.kind,
        &headers,
        &body,
        &verified,
        now,
        shared.max_body_bytes,
    ) {
        Ok(s) => s,
        Err(Refusal::BadRequest(reason)) => {
            return ("bad_request", error(StatusCode::BAD_REQUEST, &reason))
        }
        Err(Refusal::Forbidden(reason)) => {
            tracing::warn!(endpoint = %endpoint.name, %reason, "refused: provider not allowed");
            return ("forbidden", error(StatusCode::FORBIDDEN, &reason));
        }
    };
    let events = &shared.metrics.events;
    if split.dropped > 0 {
        events
            .with_label_values(&[
                &endpoint.name,
                &endpoint.provider_label,
                "dropped_not_login",
            ])
            .inc_by(split.dropped as u64);
    }
    if !shared.dry_run {
        if let Err(e) = produce(shared, &endpoint.name, &split.messages).await {
            if !is_retryable(&e) {
                tracing::warn!(endpoint = %endpoint.name, error = %e, "the broker refuses the message size; answering 413");
                return (
                    "too_large",
                    error(StatusCode::PAYLOAD_TOO_LARGE, "too large for the broker"),
                );
            }
            tracing::warn!(endpoint = %endpoint.name, error = %e, "broker did not acknowledge; answering 503");
            return (
                "unavailable",
                error(StatusCode::SERVICE_UNAVAILABLE, "broker unavailable; retry"),
            );
        }
    }
    shared
        .metrics
        .ack_seconds
        .with_label_values(&[&endpoint.name])
        .observe(started.elapsed().as_secs_f64());
    for m in &split.messages {
        let outcome = if m.login { "produced" } else { "undecodable" };
        events
            .with_label_values(&[&endpoint.name, &m.provider, outcome])
            .inc();
    }
    (
        "accepted",
        reply(
            StatusCode::OK,
            serde_json::json!({
                "accepted": split.messages.iter().filter(|m| m.login).count(),
                "undecodable": split.messages.iter().filter(|m| !m.login).count(),
                "dropped": split.dropped,
            }),
        ),
    )
}

async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, StatusCode> {
    match axum::body::to_bytes(body, limit).await {
        Ok(b) => Ok(b),
        Err(e) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            Err(if too_large {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            })
        }
    }
}

fn unauthorized(
    shared: &Shared,
    endpoint: &Endpoint,
    failure: AuthFailure,
) -> (&'static str, Response) {
    shared
        .metrics
        .signature_failures
        .with_label_values(&[&endpoint.name, failure.as_str()])
        .inc();
    // Debug, not warn: anyone can send requests, and each would otherwise be a log line.
    // authsync_ingest_signature_failures_total is what to alert on.
    tracing::debug!(endpoint = %endpoint.name, reason = failure.as_str(), "webhook request not authenticated");
    (
        "unauthorized",
        error(StatusCode::UNAUTHORIZED, "not authenticated"),
    )
}

/// Okta's one-time verification: echo `x-okta-verification-challenge` (after the same
/// authentication as every delivery).
fn okta_challenge(endpoint: &Endpoint, headers: &HeaderMap) -> (&'static str, Response) {
    let challenge = headers
        .get("x-okta-verification-challenge")
        .and_then(|v| v.to_str().ok());
    match (&endpoint.kind, challenge) {
        (Kind::Native(Provider::Okta), Some(c)) if c.len() <= 512 => (
            "challenge",
            reply(StatusCode::OK, serde_json::json!({ "verification": c })),
        ),
        (Kind::Native(Provider::Okta), _) => (
            "bad_request",
            error(
                StatusCode::BAD_REQUEST,
                "missing x-okta-verification-challenge",
            ),
        ),
        _ => (
            "bad_request",
            error(StatusCode::METHOD_NOT_ALLOWED, "POST only"),
        ),
    }
}

/// Produces every message of a request and waits for all acknowledgements.
async fn produce(shared: &Shared, source: &str, messages: &[Outgoing]) -> Result<(), KafkaError> {
    let mut pending = Vec::with_capacity(messages.len());
    for m in messages {
        let signature = shared.key.sign(source, m.key.as_bytes(), &m.value);
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: SOURCE_HEADER,
                value: Some(source),
            })
            .insert(Header {
                key: SIGNATURE_HEADER,
                value: Some(&signature),
            });
        let record = FutureRecord::to(&shared.topic)
            .key(&m.key)
            .payload(&m.value)
            .headers(headers);
        match shared.producer.send_result(record) {
            Ok(delivery) => pending.push(delivery),
            // A full queue is back-pressure: the provider retries later.
            Err((e, _)) => return Err(e),
        }
    }
    for delivery in pending {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(e),
            Err(_) => return Err(KafkaError::Canceled),
        }
    }
    Ok(())
}

/// Is this produce error the broker's absence (retry) rather than the message's fault?
fn is_retryable(e: &KafkaError) -> bool {
    !matches!(
        e,
        KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)
    )
}
