//! Wiring: one process = HTTP endpoints + consumer (steps) + relay, driven by one
//! cancellation token.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::consumer::{self, BatchHandler, StepHandler};
use crate::steps::auth_sync::AuthSync;
use crate::steps::merge::AccountMerge;
use crate::steps::StepContext;
use crate::telemetry::{self, Component, Health, Metrics};
use crate::{kafka, relay, store};

#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Create missing topics instead of refusing to start.
    pub create_topics: bool,
}

/// A started worker.
pub struct Worker {
    pub http_addr: SocketAddr,
    pub metrics: Metrics,
    pub health: Arc<Health>,
    pub pool: PgPool,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Worker {
    /// Waits until the worker has drained and stopped (after the shutdown token fired).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.handle.await.context("worker task panicked")?
    }
}

/// Fails unless every migration this build knows has been applied.
pub async fn check_migrated(pool: &PgPool) -> anyhow::Result<()> {
    let expected = store::MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    // sqlx's own bookkeeping table; absent on a database never migrated.
    let applied: Option<i64> =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await
            .unwrap_or(None);
    match applied {
        Some(v) if v >= expected => Ok(()),
        Some(v) => anyhow::bail!(
            "database schema is at migration {v}, this build needs {expected}: run `authsync migrate`"
        ),
        None => anyhow::bail!("database is not migrated: run `authsync migrate`"),
    }
}

/// Checks the database and topics, then starts everything. Start-up problems are returned
/// here; afterwards the worker runs until `shutdown` is cancelled.
pub async fn start(
    config: Config,
    options: RunOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<Worker> {
    let pool = store::named_pool(
        &config.database,
        &store::worker_application_name(&config.kafka.group_id),
    )
    .context("database.url")?;
    store::ping(&pool)
        .await
        .context("cannot reach Postgres (database.url)")?;
    check_migrated(&pool).await?;
    kafka::ensure_topics(&config, options.create_topics).await?;
    // As many as run at once in steady state: the batches in flight, the relay, one spare.
    let in_use = config.consumer.max_batches_in_flight as u32 + 2;
    let warmed = store::warm(&pool, in_use.min(config.database.max_connections)).await;
    tracing::debug!(
        warmed,
        "database connections opened before joining the group"
    );

    let metrics = Metrics::new();
    let health = Health::with(
        config.consumer.unready_after_failures,
        std::time::Duration::from_secs(config.consumer.stalled_after_secs),
        Some(metrics.clone()),
    );
    // The HTTP endpoints outlive the drain: `/readyz` answers 503 while the worker drains,
    // and stops when the worker has stopped (or when start-up fails, through the guard).
    let http_stop = CancellationToken::new();
    let http_guard = http_stop.clone().drop_guard();
    let http_addr = telemetry::serve_http(
        config.http.listen,
        metrics.clone(),
        health.clone(),
        pool.clone(),
        http_stop,
        shutdown.clone(),
    )
    .await
    .with_context(|| format!("cannot listen on http.listen = {}", config.http.listen))?;
    tracing::info!(%http_addr, "HTTP endpoints up");

    let ctx = StepContext::from_config(&config)?;
    let waiter_ctx = ctx.clone();
    let commits = relay::CommitSignal::default();
    let mut handlers: HashMap<String, Arc<dyn BatchHandler>> = HashMap::new();
    handlers.insert(
        config.topics.login.clone(),
        Arc::new(StepHandler {
            pool: pool.clone(),
            ctx: ctx.clone(),
            step: AuthSync,
            committed: commits.clone(),
        }),
    );
    handlers.insert(
        config.topics.merge.clone(),
        Arc::new(StepHandler {
            pool: pool.clone(),
            ctx,
            step: AccountMerge,
            committed: commits.clone(),
        }),
    );

    let waiter_task = {
        let (cfg, pool, ctx, metrics, token) = (
            config.clone(),
            pool.clone(),
            waiter_ctx,
            metrics.clone(),
            shutdown.clone(),
        );
        tokio::spawn(supervise(
            Component::MergeWaiter,
            health.clone(),
            token.clone(),
            move || {
                wait_for_merges(
                    cfg.clone(),
                    pool.clone(),
                    ctx.clone(),
                    metrics.clone(),
                    token.clone(),
                )
            },
        ))
    };
    let relay_task = if config.relay.enabled {
        let (cfg, pool, metrics, token, health) = (
            config.clone(),
            pool.clone(),
            metrics.clone(),
            shutdown.clone(),
            health.clone(),
        );
        Some(tokio::spawn(supervise(
            Component::Relay,
            health,
            token.clone(),
            move || {
                let (cfg, pool, metrics, commits, token) = (
                    cfg.clone(),
                    pool.clone(),
                    metrics.clone(),
                    commits.clone(),
                    token.clone(),
                );
                async move { Ok(relay::run(&cfg, pool, metrics, commits, token).await?) }
            },
        )))
    } else {
        None
    };
    let (m, h, worker_pool) = (metrics.clone(), health.clone(), pool.clone());
    let handle = tokio::spawn(async move {
        let _http = http_guard;
        let consumed = consumer::run(&config, handlers, m, h, shutdown.clone()).await;
        // A consumer that cannot start takes the process down with it.
        shutdown.cancel();
        let _ = waiter_task.await;
        let relayed = match relay_task {
            Some(relay) => relay.await.context("relay supervisor panicked"),
            None => Ok(()),
        };
        // Close the connections now: operator commands read them as "workers are live".
        worker_pool.close().await;
        relayed?;
        consumed?;
        Ok(())
    });
    Ok(Worker {
        http_addr,
        metrics,
        health,
        pool,
        handle,
    })
}

/// Runs a component until `shutdown`, restarting it when it fails or panics: a relay (or
/// merge waiter) that is gone while the worker keeps going must never go unnoticed. While
/// it is down, `/readyz` says so and `authsync_component_up{component=…}` is 0.
async fn supervise<F, Fut>(
    component: Component,
    health: Arc<Health>,
    shutdown: CancellationToken,
    run: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let name = component.as_str();
    let mut restarts = 0u32;
    while !shutdown.is_cancelled() {
        health.set_component(component, true);
        let ended = tokio::spawn(run()).await;
        if shutdown.is_cancelled() {
            break;
        }
        health.set_component(component, false);
        match ended {
            Ok(Ok(())) => tracing::error!(
                component = name,
                "stopped without being asked to; restarting it"
            ),
            Ok(Err(e)) => tracing::error!(
                component = name,
                error = format!("{e:#}"),
                "failed; restarting it"
            ),
            Err(e) => tracing::error!(component = name, error = %e, "panicked; restarting it"),
        }
        restarts += 1;
        let delay = std::time::Duration::from_millis(500 * u64::from(restarts.min(20)));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    health.set_component(component, false);
}

/// Tries waiting merges again every `merge.wait_poll_ms` until `shutdown`, and keeps the
/// waiting-room gauges.
async fn wait_for_merges(
    config: Config,
    pool: PgPool,
    ctx: StepContext,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let every = std::time::Duration::from_millis(config.merge.wait_poll_ms);
    let mut last_gauge = std::time::Instant::now() - std::time::Duration::from_secs(60);
    while !shutdown.is_cancelled() {
        match crate::steps::merge::retry_waiting(&pool, &ctx, 100).await {
            Ok(n) if n > 0 => tracing::info!(merges = n, "waiting merges resolved"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "waiting merges not tried (will retry)"),
        }
        if last_gauge.elapsed() >= std::time::Duration::from_secs(5) {
            if let Ok((n, oldest)) = store::merge::waiting_summary(&pool).await {
                metrics.merges_waiting.set(n);
                metrics.merge_wait_oldest_seconds.set(
                    oldest
                        .map(|t| (chrono::Utc::now() - t).num_seconds().max(0))
                        .unwrap_or(0),
                );
            }
            last_gauge = std::time::Instant::now();
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    Ok(())
}

/// Cancels `token` on SIGTERM or SIGINT.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        token.cancel();
    });
}

/// Caps glibc's malloc arenas at two (librdkafka's C code; Rust's allocations go to
/// jemalloc, see `allocator`). By default glibc grows up to eight arenas per core as
/// threads allocate concurrently; the freed memory of each stays mapped. Measured on the
/// `returning` benchmark (before jemalloc): peak RSS 121 -> 103 MiB at the same throughput.
/// Call before any thread starts.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
