//! Postgres: the pool, migrations, and the set-based SQL of every step. No policy here.

pub mod identity;
pub mod inbox;
pub mod merge;
pub mod outbox;
pub mod provisioning;
pub mod redrives;
pub mod users;
pub mod views;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::config::DatabaseConfig;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A database failure, sorted by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Connection loss, pool exhaustion, serialization failure, deadlock, shutdown, a bug in
    /// our SQL: retry the whole batch later; the input is not to blame.
    #[error("transient database failure: {0}")]
    Transient(#[source] sqlx::Error),
    /// The data violates a constraint or a type (SQLSTATE classes 22 and 23): retrying
    /// cannot help; the message that caused it is dead-lettered.
    #[error("database rejected the data: {0}")]
    Permanent(#[source] sqlx::Error),
    /// The step cannot proceed yet (e.g. a merge naming a user not synced yet): retry.
    #[error("not yet possible: {0}")]
    NotYet(String),
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Transient(_) | StoreError::NotYet(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        let permanent = match &e {
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|code| code.starts_with("22") || code.starts_with("23")),
            // Decoding a row we wrote ourselves failing is a bug, not the input's fault.
            _ => false,
        };
        if permanent {
            StoreError::Permanent(e)
        } else {
            StoreError::Transient(e)
        }
    }
}

pub fn connect_options(config: &DatabaseConfig) -> Result<PgConnectOptions, sqlx::Error> {
    Ok(PgConnectOptions::from_str(config.url.expose())?.application_name("authsync"))
}

/// A lazily connecting pool: start-up does not fail on a database that is still booting.
pub fn pool(config: &DatabaseConfig) -> Result<PgPool, sqlx::Error> {
    named_pool(config, "authsync")
}

/// `application_name` of a worker's connections: operator commands use it to see whether
/// workers of a consumer group are running (`authsync replay` refuses then).
pub fn worker_application_name(group: &str) -> String {
    let mut name = format!("authsync-worker:{group}");
    name.truncate(63); // Postgres keeps 63 bytes
    name
}

pub fn named_pool(config: &DatabaseConfig, application_name: &str) -> Result<PgPool, sqlx::Error> {
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(Duration::from_millis(config.acquire_timeout_ms))
        .connect_lazy_with(connect_options(config)?.application_name(application_name)))
}

/// Connections of running workers of `group` to this database: (count, client addresses).
pub async fn live_workers(pool: &PgPool, group: &str) -> Result<(i64, String), sqlx::Error> {
    let row = sqlx::query!(
        r#"SELECT count(*) AS "n!", coalesce(string_agg(DISTINCT coalesce(client_addr::text, 'local socket'), ', '), '') AS "hosts!"
           FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1"#,
        worker_application_name(group)
    )
    .fetch_one(pool)
    .await?;
    Ok((row.n, row.hosts))
}

pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Begins a step transaction planned for batched key lookups: `random_page_cost` is set
/// for this transaction only, in the same round trip as `BEGIN`. `random_page_cost` is a
/// validated, finite number (`database.random_page_cost`), so formatting it is safe.
pub async fn begin_step(
    pool: &PgPool,
    random_page_cost: f64,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    pool.begin_with(format!(
        "BEGIN; SET LOCAL random_page_cost = {random_page_cost}"
    ))
    .await
}

/// `SELECT 1`, for readiness.
pub async fn ping(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query_scalar!("SELECT 1 AS \"one!\"")
        .fetch_one(pool)
        .await
        .map(|_| ())
}
