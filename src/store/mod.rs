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
    /// One of authsync's own invariants broke (a row it resolved is missing, a row it wrote
    /// does not decode): a bug. Retrying cannot help and the input is not to blame; the
    /// message is dead-lettered as `internal` and logged at error level.
    #[error("internal error: {0}")]
    Internal(String),
}

impl StoreError {
    /// Whether retrying the same batch later can succeed. Everything else ends in a dead
    /// letter: the consumer never retries a permanent or internal failure.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Transient(_) | StoreError::NotYet(_))
    }

    /// A stable name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Transient(_) => "transient",
            StoreError::Permanent(_) => "permanent",
            StoreError::NotYet(_) => "not_yet",
            StoreError::Internal(_) => "internal",
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            // Data exceptions (22: a NUL in text, a value out of range), integrity
            // violations (23) and program limits (54: a row or index entry too large) are
            // caused by the input: permanent. Every other server error (connection, lock,
            // serialization, resources, shutdown, a schema not migrated yet) may pass.
            sqlx::Error::Database(db) => {
                let code = db.code();
                let code = code.as_deref().unwrap_or_default();
                if ["22", "23", "54"]
                    .iter()
                    .any(|class| code.starts_with(class))
                {
                    StoreError::Permanent(e)
                } else {
                    StoreError::Transient(e)
                }
            }
            // A value we could not encode came from the input.
            sqlx::Error::Encode(_) => StoreError::Permanent(e),
            // Reading back what authsync wrote failed, or a row it relies on is missing.
            sqlx::Error::RowNotFound
            | sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::ColumnIndexOutOfBounds { .. }
            | sqlx::Error::TypeNotFound { .. } => StoreError::Internal(e.to_string()),
            _ => StoreError::Transient(e),
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
    lock_wait: LockWait,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    // Generic plans: the step's statements are prepared once per connection, and with
    // array parameters Postgres kept planning each execution afresh (custom plans; 0.28 ms
    // for the role query alone), about a fifth of its CPU at 1,000 logins/s. The lookups
    // are all by key, so one plan fits every batch size.
    let lock_timeout = match lock_wait {
        LockWait::Unbounded => String::new(),
        LockWait::AtMost(limit) => {
            format!("; SET LOCAL lock_timeout = {}", limit.as_millis().max(1))
        }
    };
    pool.begin_with(format!(
        "BEGIN; SET LOCAL random_page_cost = {random_page_cost}; \
         SET LOCAL plan_cache_mode = force_generic_plan{lock_timeout}"
    ))
    .await
}

/// How long a step transaction waits for a row lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockWait {
    /// As long as it takes: a partition's own batch waits for its row (order per key).
    Unbounded,
    /// Then it fails with `lock_not_available` (55P03, transient). For transactions that
    /// carry several partitions' batches: one partition's locked row must not hold up the
    /// others, so they fall apart and go on alone.
    AtMost(std::time::Duration),
}

/// Opens up to `connections` of the pool's connections and has each one read the catalog
/// entries of the tables a login touches, so the first batches after a start pay neither
/// a connection set-up (tens of ms over TLS to a remote Postgres) nor a cold relation
/// cache. Returns how many were warmed; a failure is left for the step to meet.
pub async fn warm(pool: &PgPool, connections: u32) -> usize {
    let mut held = Vec::new();
    for _ in 0..connections {
        match pool.acquire().await {
            Ok(mut conn) => {
                let read = sqlx::query(
                    "SELECT 1 FROM users, user_emails, external_identities, devices, inbox, \
                     outbox, outbox_emitted, user_roles, organization_members, organizations, \
                     user_attributes, custom_upns, working_contexts, collections LIMIT 0",
                )
                .execute(&mut *conn)
                .await;
                if let Err(e) = read {
                    tracing::debug!(error = %e, "warming a database connection failed");
                    break;
                }
                held.push(conn);
            }
            Err(e) => {
                tracing::debug!(error = %e, "opening a database connection to warm it failed");
                break;
            }
        }
    }
    held.len()
}

/// `SELECT 1`, for readiness.
pub async fn ping(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query_scalar!("SELECT 1 AS \"one!\"")
        .fetch_one(pool)
        .await
        .map(|_| ())
}
