//! One typed, validated configuration: built-in defaults, then an optional TOML file, then
//! environment variables. Every field is documented in `config/authsync.example.toml` and
//! in docs/CONFIGURATION.md.
//!
//! Environment variables: `AUTHSYNC_<SECTION>_<FIELD>` sets `<section>.<field>`
//! (`AUTHSYNC_KAFKA_BROKERS`, `AUTHSYNC_CONSUMER_BATCH_SIZE`, …). `DATABASE_URL` is accepted
//! when `AUTHSYNC_DATABASE_URL` is not set. `AUTHSYNC_KAFKA_PROPERTY_<NAME>` passes a
//! librdkafka property through (`AUTHSYNC_KAFKA_PROPERTY_SASL_MECHANISM` →
//! `sasl.mechanism`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration could not be read: {0}")]
    Load(String),
    #[error("configuration setting `{field}` {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
    /// A role rule that cannot work; `rule` names it as `<set>/<rule>` (or its index).
    #[error("identity role rule `{rule}`: {problem}")]
    InvalidRule { rule: String, problem: String },
    /// An `[[identity.connections]]` entry that cannot work; named `provider:connection`.
    #[error("identity connection `{connection}`: {problem}")]
    InvalidConnection { connection: String, problem: String },
}

/// Whether `rest` (an `AUTHSYNC_` variable without its prefix) has the shape of a Kubernetes
/// service-link variable: `<NAME>_SERVICE_HOST`, `<NAME>_SERVICE_PORT[_<PORT NAME>]`,
/// `<NAME>_PORT` (`tcp://…`), `<NAME>_PORT_<N>_<PROTO>[_PROTO|_PORT|_ADDR]`.
fn is_service_link(rest: &str) -> bool {
    let parts: Vec<&str> = rest.split('_').collect();
    let proto = |p: &str| matches!(p, "TCP" | "UDP" | "SCTP");
    let number = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if let Some(i) = parts.iter().rposition(|p| *p == "SERVICE") {
        return i > 0
            && matches!(parts.get(i + 1), Some(&"HOST") | Some(&"PORT"))
            && (parts.len() == i + 2 || parts[i + 1] == "PORT");
    }
    match parts.iter().rposition(|p| *p == "PORT") {
        Some(i) if i > 0 => {
            let tail = &parts[i + 1..];
            match tail {
                [] => true,
                [n, p] => number(n) && proto(p),
                [n, p, what] => number(n) && proto(p) && matches!(*what, "PROTO" | "PORT" | "ADDR"),
                _ => false,
            }
        }
        _ => false,
    }
}

/// SASL mechanisms this build can authenticate with.
pub const SUPPORTED_SASL_MECHANISMS: [&str; 3] = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

/// A setting that cannot work (shared by the modules that compile parts of the config).
pub(crate) fn invalid(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        problem: problem.into(),
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub kafka: KafkaConfig,
    pub topics: TopicsConfig,
    pub consumer: ConsumerConfig,
    pub relay: RelayConfig,
    pub http: HttpConfig,
    pub provisioning: ProvisioningConfig,
    pub merge: MergeConfig,
    pub identity: IdentityConfig,
    pub trust: TrustConfig,
    pub ingest: IngestConfig,
    pub log: LogConfig,
    /// `AUTHSYNC_*` variables skipped because they are Kubernetes service links (for a
    /// Service named `authsync-…`), not settings; logged as a warning at start-up.
    #[serde(skip)]
    pub ignored_environment: Vec<String>,
}

/// Identity depth: account linking, attributes, and IdP group → role mapping.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Link an unknown identity to the one existing active user whose verified email equals
    /// the login's verified email (never on an unverified email on either side).
    pub link_verified_email: bool,
    /// Providers whose identities are never linked by email (e.g. enterprise SSO, where the
    /// customer's IdP, not you, vouches for the address). Exact provider names.
    pub untrusted_link_providers: Vec<String>,
    /// `merge`: attributes absent from a later event are kept. `authoritative`: an event that
    /// carries `attributes` carries the whole set; absent keys are deleted.
    pub attributes: String,
    /// Group → role rule sets, applied on every login in order.
    pub role_sets: Vec<RoleSetConfig>,
    /// Per-connection trust and organization: which enterprise connections may link by
    /// email, the kind of a connection the provider does not report (Keycloak brokers), and
    /// the customer organization a connection's claims grant roles in.
    pub connections: Vec<ConnectionConfig>,
}

/// One connection of one provider (`[[identity.connections]]`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionConfig {
    /// Provider name as in the events (case-insensitive).
    pub provider: String,
    /// The connection id the provider reports (Auth0 `con_…`, WorkOS `conn_…`, a Keycloak
    /// broker alias, a Firebase `saml.…` provider id, a Cognito provider name).
    pub connection: String,
    /// `database`, `social`, `enterprise` or `passwordless`: overrides what the provider
    /// reports (or fills it in where it reports nothing).
    #[serde(default)]
    pub kind: Option<String>,
    /// May this connection's verified addresses link accounts? Default: yes for database,
    /// social and passwordless connections, no for enterprise and unknown ones.
    #[serde(default)]
    pub link: Option<bool>,
    /// The organization this (customer) connection belongs to: role rules matching its
    /// claims grant inside it. Without it, a customer connection grants no roles unless its
    /// rule set says `allow_global = true`.
    #[serde(default)]
    pub organization: Option<String>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            link_verified_email: true,
            untrusted_link_providers: Vec::new(),
            attributes: "merge".into(),
            role_sets: Vec::new(),
            connections: Vec::new(),
        }
    }
}

/// A set of role rules sharing one sync mode.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSetConfig {
    /// Names the set in errors and logs.
    pub name: String,
    /// `import` (grant at first login only), `force` (grant and revoke on every login to
    /// match the IdP; only the roles this set can grant are ever revoked), `additive`
    /// (grant, never revoke).
    pub mode: String,
    /// Only logins of these providers are matched against this set (empty = every
    /// provider). With several identities per user, scope `force` sets to the IdP that
    /// owns the groups, so a login through another provider cannot revoke them.
    #[serde(default)]
    pub providers: Vec<String>,
    /// Only logins through these connections (`provider:connection`) are matched (empty =
    /// every connection).
    #[serde(default)]
    pub connections: Vec<String>,
    /// Let claims from a customer (enterprise) connection grant the rules' own scopes,
    /// global ones included. Default false: such claims grant only inside the
    /// connection's configured organization.
    #[serde(default)]
    pub allow_global: bool,
    pub rules: Vec<RoleRuleConfig>,
}

/// One rule: when `claim` has a value that matches, grant `role`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleRuleConfig {
    /// Optional name for errors; defaults to the rule's position.
    #[serde(default)]
    pub name: Option<String>,
    /// `groups` (the identity's groups), `connection.groups`, or `attribute:<key>`.
    pub claim: String,
    /// `equals`, `prefix` or `regex` (the whole value must match).
    #[serde(rename = "match")]
    pub match_kind: String,
    pub value: String,
    pub role: String,
    /// Scope: absent = global, `personal` = the user's own organization, or an organization id.
    #[serde(default)]
    pub organization: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MergeConfig {
    /// A merge naming an unknown user (maybe a sign-up not synced yet) waits, outside its
    /// partition, for this long after authsync first saw it, then is dead-lettered with
    /// reason `unknown_user`.
    pub unknown_user_retry_secs: u64,
    /// How often waiting merges are tried again (each backs off from 0.2 s to 5 s).
    pub wait_poll_ms: u64,
    /// Longest list per report field in the `user.merged` event (the `merges` table keeps
    /// the full report); longer lists are cut and `truncated` is set.
    pub report_list_limit: usize,
}

impl Default for MergeConfig {
    fn default() -> Self {
        Self {
            unknown_user_retry_secs: 300,
            wait_poll_ms: 500,
            report_list_limit: 1000,
        }
    }
}

/// Which producers of the login topic the worker believes (`[trust]`). A message signed by
/// `authsync ingest` names its verified source; the policy says what each source may assert.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrustConfig {
    /// What happens to a login no trusted source signed (any other producer of the topic):
    /// `refuse` (default: dead-lettered as `untrusted_source`, redrivable), `restricted`
    /// (applied, but its `isEmailVerified` and groups are ignored: it can neither link
    /// accounts nor grant or revoke roles) or `trusted` (applied as it says; only where Kafka
    /// ACLs already restrict who can produce).
    pub unsigned: String,
    /// Source signing keys by key id (`k1 = "env:AUTHSYNC_SOURCE_KEY"`): the same keys as
    /// `ingest.signing_key`. Several during a rotation. Values are secrets: `env:NAME`,
    /// `file:/path` or the key itself.
    pub keys: BTreeMap<String, Secret>,
    /// What each signed source may say (`[trust.sources.clerk-prod]`). A signed source that
    /// is not listed is handled as unsigned.
    pub sources: BTreeMap<String, TrustedSourceConfig>,
}

impl Default for TrustConfig {
    fn default() -> Self {
        Self {
            unsigned: "refuse".into(),
            keys: BTreeMap::new(),
            sources: BTreeMap::new(),
        }
    }
}

/// One signed source (`[trust.sources.<name>]`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedSourceConfig {
    /// The providers it may speak for (`["clerk"]`; `["*"]` for any). A login for another
    /// provider is refused (`untrusted_source`).
    pub providers: Vec<String>,
    /// May its logins assert `isEmailVerified` (and so link accounts)? Default true.
    #[serde(default = "yes")]
    pub email_verified: bool,
    /// May its logins carry groups (and so grant or revoke roles)? Default true.
    #[serde(default = "yes")]
    pub groups: bool,
}

fn yes() -> bool {
    true
}

/// `authsync ingest`: the HTTP front door for provider webhooks (`[ingest]`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Address of the webhook endpoints (`POST /hooks/<endpoint>`) and of its own
    /// `/metrics`, `/healthz`, `/readyz`. `[::]` listens on IPv6 and IPv4 alike.
    pub listen: SocketAddr,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// A request not answered within this is cut off (408/503 to the caller, who retries).
    pub request_timeout_ms: u64,
    /// How long a produce may wait for the broker's acknowledgement before the request gets
    /// 503 (`message.timeout.ms` of the producer).
    pub ack_timeout_ms: u64,
    /// Tolerance for signed timestamps (WorkOS `t=`); Standard Webhooks uses its fixed 5 min.
    pub tolerance_secs: u64,
    /// The id of `signing_key`, sent with every signature (`trust.keys` on the worker).
    pub signing_key_id: String,
    /// The key that signs what ingest produces (`authsync-source-signature`). Required to
    /// start `authsync ingest`. `env:NAME`, `file:/path` or the key itself (≥ 32 bytes).
    pub signing_key: Secret,
    /// Verify, decode and answer, but produce nothing (check a provider's setup).
    pub dry_run: bool,
    /// The endpoints, by name (`[ingest.endpoints.clerk-prod]`): the name is the URL path
    /// (`/hooks/clerk-prod`) and the source every message from it carries.
    pub endpoints: BTreeMap<String, IngestEndpointConfig>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 8081)),
            max_body_bytes: 1024 * 1024,
            request_timeout_ms: 15_000,
            ack_timeout_ms: 5_000,
            tolerance_secs: 300,
            signing_key_id: "k1".into(),
            signing_key: Secret::default(),
            dry_run: false,
            endpoints: BTreeMap::new(),
        }
    }
}

/// One webhook endpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestEndpointConfig {
    /// `clerk`, `workos`, `okta`, `auth0`, `keycloak`, `firebase`, `cognito`, or
    /// `cloudevents` (normalized or `authsync.native.*` CloudEvents, structured, binary or
    /// batch).
    pub provider: String,
    /// `standard_webhooks` (Svix / `webhook-*` headers, `whsec_` secrets), `workos`
    /// (`WorkOS-Signature`), or `token` (a shared secret in `header`, as is or after
    /// `Bearer `). Default: standard_webhooks for clerk, keycloak, firebase, cognito and
    /// cloudevents; workos for workos; token for okta and auth0.
    #[serde(default)]
    pub auth: Option<String>,
    /// The secrets (`env:NAME`, `file:/path` or the value). Several during a rotation: a
    /// request signed with any of them is accepted.
    pub secrets: Vec<Secret>,
    /// The header that carries the `token` secret. Default `authorization`.
    #[serde(default)]
    pub header: Option<String>,
    /// `cloudevents` endpoints: the providers its events may name (required; `*` = any).
    #[serde(default)]
    pub providers: Vec<String>,
}

/// A string that never appears in logs or `Debug` output (database URLs carry passwords).
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The secret a reference names: `env:NAME` reads the variable, `file:/path` the file
    /// (trailing newline dropped); anything else is the secret itself. The error names the
    /// variable or file, never the value.
    pub fn resolve(&self) -> Result<Secret, String> {
        if let Some(name) = self.0.strip_prefix("env:") {
            std::env::var(name)
                .map(Secret)
                .map_err(|_| format!("environment variable {name} is not set"))
        } else if let Some(path) = self.0.strip_prefix("file:") {
            std::fs::read_to_string(path)
                .map(|s| Secret(s.trim_end_matches(['\n', '\r']).to_string()))
                .map_err(|e| format!("cannot read {path}: {e}"))
        } else {
            Ok(self.clone())
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Postgres connection URL.
    pub url: Secret,
    /// Connection pool size (consumer batches, relay, HTTP readiness).
    pub max_connections: u32,
    /// How long to wait for a pooled connection before the attempt counts as a transient failure.
    pub acquire_timeout_ms: u64,
    /// The planner's `random_page_cost` inside step transactions (`SET LOCAL`, so poolers
    /// and other sessions are unaffected). A step's statements are batched key lookups over a
    /// working set that is in memory; the server default of 4 prices each lookup as a disk
    /// seek and makes Postgres read and hash every user per batch while the tables are small.
    pub random_page_cost: f64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("postgres://postgres@127.0.0.1:5432/authsync"),
            max_connections: 10,
            acquire_timeout_ms: 5_000,
            random_page_cost: 1.1,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Consumer group id for the input topics.
    pub group_id: String,
    /// `session.timeout.ms` of the consumer.
    pub session_timeout_ms: u64,
    /// Extra librdkafka properties applied to every client (security.protocol, sasl.*, ssl.*, …).
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            group_id: "authsync".into(),
            session_timeout_ms: 45_000,
            properties: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    /// Login / identity events (input).
    pub login: String,
    /// Merge requests (input).
    pub merge: String,
    /// Result events (output).
    pub user_events: String,
    /// Suffix appended to an input topic to name its dead-letter topic.
    pub dlq_suffix: String,
    /// Partitions used by `--create-topics` and `authsync dev`.
    pub partitions: i32,
    /// Replication factor used by `--create-topics`.
    pub replication_factor: i32,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            login: "auth.login.v1".into(),
            merge: "auth.merge.v1".into(),
            user_events: "auth.user-events.v1".into(),
            dlq_suffix: ".dlq".into(),
            partitions: 6,
            replication_factor: 1,
        }
    }
}

impl TopicsConfig {
    pub fn dlq_for(&self, input_topic: &str) -> String {
        format!("{input_topic}{}", self.dlq_suffix)
    }

    /// Every topic authsync reads or writes.
    pub fn all(&self) -> Vec<String> {
        vec![
            self.login.clone(),
            self.dlq_for(&self.login),
            self.merge.clone(),
            self.dlq_for(&self.merge),
            self.user_events.clone(),
        ]
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerConfig {
    /// Most messages applied in one Postgres transaction (per partition).
    pub batch_size: usize,
    /// Longest a message that arrives on an idle partition waits for more before its
    /// partial batch is applied (messages that queued behind the previous batch go at once).
    pub batch_linger_ms: u64,
    /// Largest accepted message value; larger ones are dead-lettered (`too_large`).
    pub max_message_bytes: usize,
    /// Batches applied at the same time, all partitions together. Each partition has its
    /// own task; beyond the database's cores more concurrent batches only add lock and CPU
    /// contention, and each one holds its rows, statements and result sets in memory.
    pub max_batches_in_flight: usize,
    /// On shutdown or revocation, how long in-flight batches may take to finish.
    pub drain_timeout_ms: u64,
    /// First delay of the transient-failure retry (exponential, with jitter).
    pub retry_initial_ms: u64,
    /// Largest delay between retries of a transiently failing batch.
    pub retry_max_ms: u64,
    /// After this many consecutive transient failures `/readyz` reports not ready.
    pub unready_after_failures: u32,
    /// librdkafka `fetch.wait.max.ms`: how long the broker may hold a fetch for more data.
    /// Low values cut latency on a trickle of events at the cost of more fetch requests.
    pub fetch_wait_max_ms: u64,
    /// librdkafka `queued.max.messages.kbytes`: pre-fetched data kept per assigned
    /// partition, in the partition's own queue (the only buffer before its batches; a full
    /// queue stops that partition's fetching). Memory grows with it times the partitions a
    /// replica owns; larger values speed up replays (duplicates are cheap, fetching is not).
    pub prefetch_kbytes_per_partition: u64,
    /// Most data one fetch response brings (librdkafka `fetch.max.bytes` and
    /// `max.partition.fetch.bytes`; the broker still sends at least one record batch).
    /// Fetched batches are decompressed in memory, so with every partition fetching, this
    /// times the compression ratio bounds what a partition holds beyond its pre-fetch.
    pub fetch_max_kbytes: u64,
    /// librdkafka `fetch.queue.backoff.ms`: how long a partition's fetching pauses once its
    /// pre-fetch queue is full. librdkafka's 1000 ms default idles the pipeline for up to a
    /// second whenever the worker catches up (replays ran at 48k/s instead of 114k/s).
    pub fetch_queue_backoff_ms: u64,
    /// An input event whose `time` is further than this ahead of the worker's clock is
    /// dead-lettered (`invalid_field`): a login from the year 2999 would otherwise make
    /// every real login of its user "stale".
    pub max_clock_skew_secs: u64,
    /// A partition that holds messages and has not committed a batch for this long, or
    /// whose batch has failed `unready_after_failures` times in a row, is `stalled`: it
    /// shows in `/readyz`, in `authsync_partition_stalled` and in the alert.
    pub stalled_after_secs: u64,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            batch_linger_ms: 1,
            // A dead letter carries the whole value plus headers; it must fit under the
            // producer's `relay.message_max_bytes` (librdkafka's and Kafka's ~1 MB).
            max_message_bytes: 960 * 1024,
            max_batches_in_flight: 3,
            drain_timeout_ms: 25_000,
            retry_initial_ms: 100,
            retry_max_ms: 30_000,
            unready_after_failures: 5,
            fetch_wait_max_ms: 2,
            prefetch_kbytes_per_partition: 512,
            fetch_max_kbytes: 256,
            fetch_queue_backoff_ms: 10,
            max_clock_skew_secs: 300,
            stalled_after_secs: 120,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Run the outbox relay in this process (one instance holds the leader lock at a time).
    pub enabled: bool,
    /// Most outbox rows published per round.
    pub batch_size: i64,
    /// Rounds awaiting their delivery reports while the next one is read and sent
    /// (1 = read, send, wait for every ack, repeat).
    pub rounds_in_flight: usize,
    /// Polling interval when no NOTIFY arrives (fallback wake-up).
    pub poll_interval_ms: u64,
    /// Published outbox rows are deleted after this long.
    pub outbox_retention_hours: u64,
    /// Inbox rows (the de-duplication window) are deleted after this long.
    pub inbox_retention_hours: u64,
    /// How often the retention clean-up runs. Each run deletes everything expired, in
    /// statements of `cleanup_batch_rows` rows, so it keeps up with any sustained rate.
    pub cleanup_interval_secs: u64,
    /// Rows one clean-up statement deletes (short statements: no long row locks, no long
    /// transaction holding back vacuum).
    pub cleanup_batch_rows: i64,
    /// librdkafka `message.max.bytes` of the relay's producer: the largest message it
    /// sends. A result or dead letter larger than this is never handed to the producer: a
    /// dead letter's original goes to `dead_letter_bodies` and the DLQ gets a reference.
    /// Must be at least `consumer.max_message_bytes` + 16 KiB, and at most the broker's
    /// `message.max.bytes` (1,048,588 on a default Kafka), or the broker refuses what fits here.
    pub message_max_bytes: usize,
    /// A result held back longer than this by a transaction that can write the outbox is
    /// reported: `authsync_relay_held_seconds`, a log line naming the holding backend.
    pub held_warn_secs: u64,
    /// librdkafka `linger.ms` of the relay's producer.
    pub linger_ms: u64,
    /// librdkafka `compression.type` of the relay's producer.
    pub compression: String,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            batch_size: 1_000,
            rounds_in_flight: 4,
            poll_interval_ms: 500,
            outbox_retention_hours: 24,
            inbox_retention_hours: 24 * 7,
            cleanup_interval_secs: 60,
            cleanup_batch_rows: 10_000,
            message_max_bytes: 1_000_000,
            held_warn_secs: 30,
            linger_ms: 0,
            compression: "lz4".into(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of `/metrics`, `/healthz`, `/readyz`. `[::]:<port>` (the default) listens on
    /// IPv6 and IPv4 alike (IPv4 only on a host without IPv6).
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 8080)),
        }
    }
}

/// Defaults for a first login when the event carries no labels or names.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProvisioningConfig {
    pub organization_name: String,
    pub organization_display_name: String,
    pub project_name: String,
    pub project_display_name: String,
    pub personal_collection_label: String,
    pub favorites_collection_label: String,
    pub organization_collection_label: String,
}

impl Default for ProvisioningConfig {
    fn default() -> Self {
        Self {
            organization_name: "personal".into(),
            organization_display_name: "Personal".into(),
            project_name: "default".into(),
            project_display_name: "Default".into(),
            personal_collection_label: "Personal".into(),
            favorites_collection_label: "Favorites".into(),
            organization_collection_label: "Organization".into(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter directive, e.g. `info` or `authsync=debug,rdkafka=warn`.
    pub level: String,
    /// `json` (one object per line) or `text`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

const SECTIONS: &[&str] = &[
    "database",
    "kafka",
    "topics",
    "consumer",
    "relay",
    "http",
    "provisioning",
    "merge",
    "identity",
    "trust",
    "ingest",
    "log",
];

impl Config {
    /// Defaults, then `file` (if given), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Config::load`], with an explicit environment (tests must not mutate the process's).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        let env: Vec<(String, String)> = env.into_iter().collect();
        let has_own_db_url = env.iter().any(|(k, _)| k == "AUTHSYNC_DATABASE_URL");
        let mut overrides: Vec<(String, String)> = Vec::new();
        // librdkafka property names contain dots, which figment would read as nesting:
        // they go in as one map.
        let mut properties: BTreeMap<String, String> = BTreeMap::new();
        let mut ignored: Vec<String> = Vec::new();
        for (key, value) in &env {
            if key == "DATABASE_URL" && !has_own_db_url {
                overrides.push(("database.url".into(), value.clone()));
            } else if let Some(rest) = key.strip_prefix("AUTHSYNC_KAFKA_PROPERTY_") {
                let name = rest.to_ascii_lowercase().replace('_', ".");
                properties.insert(name, value.clone());
            } else if let Some(rest) = key.strip_prefix("AUTHSYNC_") {
                // Policy: an unknown setting stops the start (a typo must not run with a
                // default), except for the shapes Kubernetes gives service-link variables
                // (`<SERVICE>_SERVICE_HOST`, `<SERVICE>_PORT_8080_TCP`, ...), which no setting
                // has and which a Service named `authsync-kafka` injects into every pod.
                if is_service_link(rest) {
                    ignored.push(key.clone());
                    continue;
                }
                let lower = rest.to_ascii_lowercase();
                let Some((section, field)) = lower.split_once('_') else {
                    continue;
                };
                if SECTIONS.contains(&section) {
                    overrides.push((format!("{section}.{field}"), value.clone()));
                }
            }
        }
        for (key, value) in overrides {
            // Kept as strings; `extract_lossy` converts "42" / "true" where the field wants a
            // number or a boolean, and leaves `AUTHSYNC_KAFKA_GROUP_ID=12345` a string.
            figment = figment.merge(Serialized::global(&key, value));
        }
        if !properties.is_empty() {
            figment = figment.merge(Serialized::global("kafka.properties", properties));
        }
        let mut config: Config = figment.extract_lossy().map_err(|e| {
            let field = e.path.join(".");
            if field.is_empty() {
                ConfigError::Load(e.to_string())
            } else {
                ConfigError::Load(format!("setting `{field}`: {}", e.kind))
            }
        })?;
        config.validate()?;
        ignored.sort();
        config.ignored_environment = ignored;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = self.database.url.expose();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(invalid(
                "database.url",
                "must be a postgres:// or postgresql:// URL",
            ));
        }
        let cost = self.database.random_page_cost;
        if !(cost.is_finite() && (0.01..=1000.0).contains(&cost)) {
            return Err(invalid(
                "database.random_page_cost",
                format!("must be between 0.01 and 1000 (got {cost})"),
            ));
        }
        if self.database.max_connections < 2 {
            return Err(invalid(
                "database.max_connections",
                format!("must be at least 2 (got {})", self.database.max_connections),
            ));
        }
        if self.kafka.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must not be empty"));
        }
        if self.kafka.group_id.trim().is_empty() {
            return Err(invalid("kafka.group_id", "must not be empty"));
        }
        // librdkafka is built without libsasl2 (Kerberos) and authsync registers no
        // OAUTHBEARER token refresh, so those would fail at the first connection (or, for
        // OAUTHBEARER, fall back to librdkafka's unsecured test tokens): refuse them here.
        if let Some(mechanism) = self.kafka.properties.get("sasl.mechanism") {
            if !SUPPORTED_SASL_MECHANISMS
                .iter()
                .any(|m| m.eq_ignore_ascii_case(mechanism.trim()))
            {
                return Err(invalid(
                    "kafka.properties.sasl.mechanism",
                    format!(
                        "`{mechanism}` is not supported (no Kerberos / OAUTHBEARER provider in this build); use one of {}",
                        SUPPORTED_SASL_MECHANISMS.join(", ")
                    ),
                ));
            }
        }
        for (field, value) in [
            ("topics.login", &self.topics.login),
            ("topics.merge", &self.topics.merge),
            ("topics.user_events", &self.topics.user_events),
            ("topics.dlq_suffix", &self.topics.dlq_suffix),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(field, "must not be empty"));
            }
        }
        if self.topics.login == self.topics.user_events {
            return Err(invalid(
                "topics.user_events",
                "must differ from topics.login (the worker would consume its own output)",
            ));
        }
        if self.topics.partitions < 1 {
            return Err(invalid("topics.partitions", "must be at least 1"));
        }
        if !(1..=10_000).contains(&self.consumer.batch_size) {
            return Err(invalid(
                "consumer.batch_size",
                format!(
                    "must be between 1 and 10000 (got {})",
                    self.consumer.batch_size
                ),
            ));
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.consumer.max_message_bytes) {
            return Err(invalid(
                "consumer.max_message_bytes",
                format!(
                    "must be between 1 KiB and 64 MiB (got {})",
                    self.consumer.max_message_bytes
                ),
            ));
        }
        if self.consumer.max_batches_in_flight == 0
            || self.consumer.max_batches_in_flight >= self.database.max_connections as usize
        {
            return Err(invalid(
                "consumer.max_batches_in_flight",
                "must be at least 1 and below database.max_connections (the relay and /readyz need connections too)",
            ));
        }
        if self.consumer.retry_initial_ms == 0
            || self.consumer.retry_max_ms < self.consumer.retry_initial_ms
        {
            return Err(invalid(
                "consumer.retry_max_ms",
                "must be >= consumer.retry_initial_ms, and retry_initial_ms > 0",
            ));
        }
        if !(256..=1_048_576).contains(&self.consumer.prefetch_kbytes_per_partition) {
            return Err(invalid(
                "consumer.prefetch_kbytes_per_partition",
                "must be between 256 and 1048576",
            ));
        }
        if !(1..=1_048_576).contains(&self.consumer.fetch_max_kbytes) {
            return Err(invalid(
                "consumer.fetch_max_kbytes",
                "must be between 1 and 1048576",
            ));
        }
        if self.consumer.fetch_queue_backoff_ms > 60_000 {
            return Err(invalid(
                "consumer.fetch_queue_backoff_ms",
                "must be at most 60000",
            ));
        }
        if !(10..=60_000).contains(&self.merge.wait_poll_ms) {
            return Err(invalid(
                "merge.wait_poll_ms",
                "must be between 10 and 60000",
            ));
        }
        if self.consumer.stalled_after_secs == 0 {
            return Err(invalid(
                "consumer.stalled_after_secs",
                "must be greater than 0",
            ));
        }
        if !(1000..=1_000_000_000).contains(&self.relay.message_max_bytes) {
            return Err(invalid(
                "relay.message_max_bytes",
                format!(
                    "must be between 1000 and 1000000000 (got {})",
                    self.relay.message_max_bytes
                ),
            ));
        }
        if self.consumer.max_message_bytes + DEAD_LETTER_HEADROOM > self.relay.message_max_bytes {
            return Err(invalid(
                "consumer.max_message_bytes",
                format!(
                    "({}) plus {DEAD_LETTER_HEADROOM} bytes for a dead letter's headers must fit in relay.message_max_bytes ({}): lower it, or raise relay.message_max_bytes (and the broker's limit)",
                    self.consumer.max_message_bytes, self.relay.message_max_bytes
                ),
            ));
        }
        if !(1..=1_000_000).contains(&self.relay.cleanup_batch_rows) {
            return Err(invalid(
                "relay.cleanup_batch_rows",
                "must be between 1 and 1000000",
            ));
        }
        if !(1..=50_000).contains(&self.relay.batch_size) {
            return Err(invalid("relay.batch_size", "must be between 1 and 50000"));
        }
        if !(1..=64).contains(&self.relay.rounds_in_flight) {
            return Err(invalid(
                "relay.rounds_in_flight",
                "must be between 1 and 64",
            ));
        }
        if self.relay.poll_interval_ms == 0 {
            return Err(invalid("relay.poll_interval_ms", "must be greater than 0"));
        }
        if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&self.relay.compression.as_str()) {
            return Err(invalid(
                "relay.compression",
                "must be one of none, gzip, snappy, lz4, zstd",
            ));
        }
        if !["json", "text"].contains(&self.log.format.as_str()) {
            return Err(invalid("log.format", "must be `json` or `text`"));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid("log.level", "is not a valid tracing filter"));
        }
        let p = &self.provisioning;
        for (field, value) in [
            ("provisioning.organization_name", &p.organization_name),
            ("provisioning.project_name", &p.project_name),
            (
                "provisioning.personal_collection_label",
                &p.personal_collection_label,
            ),
            (
                "provisioning.favorites_collection_label",
                &p.favorites_collection_label,
            ),
            (
                "provisioning.organization_collection_label",
                &p.organization_collection_label,
            ),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(field, "must not be empty"));
            }
        }
        crate::domain::identity::IdentityPolicy::compile(&self.identity)?;
        crate::domain::trust::SourcePolicy::compile(&self.trust)?;
        for id in self.trust.keys.keys() {
            if !crate::events::source::is_valid_key_id(id) {
                return Err(invalid(
                    "trust.keys",
                    format!("key id `{id}` must be non-empty, without commas or spaces"),
                ));
            }
        }
        crate::ingest::check_config(&self.ingest)?;
        Ok(())
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.consumer.drain_timeout_ms)
    }

    /// The configuration with every secret replaced, for `authsync config`: the database
    /// URL's password, and librdkafka properties whose names say they hold a secret.
    pub fn redacted(&self) -> String {
        let mut shown = self.clone();
        for (name, value) in shown.kafka.properties.iter_mut() {
            if is_secret_property(name) {
                *value = REDACTED.into();
            }
        }
        format!(
            "{shown:#?}\n# database.url = {}\n",
            redact_url(self.database.url.expose())
        )
    }
}

/// Room a dead letter needs beyond the original value: its original headers (most
/// producers send a few hundred bytes) and authsync's own.
pub const DEAD_LETTER_HEADROOM: usize = 16 * 1024;

const REDACTED: &str = "<redacted>";

/// librdkafka properties that hold secrets (`sasl.password`, `ssl.key.password`,
/// `sasl.oauthbearer.client.secret`, `ssl.key.pem`, `sasl.jaas.config`, …).
pub fn is_secret_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "password",
        "secret",
        "jaas",
        "token",
        "credential",
        "key.pem",
        "oauthbearer.config",
        "keystore",
    ]
    .iter()
    .any(|word| name.contains(word))
}

/// A URL with its password (in the user info or a `password=` parameter) replaced.
pub fn redact_url(url: &str) -> String {
    let mut shown = url.to_string();
    if let Some((scheme, rest)) = url.split_once("://") {
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        if let Some((userinfo, host)) = authority.rsplit_once('@') {
            if let Some((user, _)) = userinfo.split_once(':') {
                shown = format!("{scheme}://{user}:{REDACTED}@{host}{tail}");
            }
        }
    }
    // libpq also takes the password as a parameter.
    if let Some(i) = shown.find("password=") {
        let start = i + "password=".len();
        let end = shown[start..].find('&').map_or(shown.len(), |e| start + e);
        shown.replace_range(start..end, REDACTED);
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let config = Config::load_from(None, env(&[])).unwrap();
        assert_eq!(config.topics.login, "auth.login.v1");
        assert_eq!(config.consumer.max_message_bytes, 960 * 1024);
    }

    #[test]
    fn env_overrides_sections_and_accepts_database_url() {
        let config = Config::load_from(
            None,
            env(&[
                ("AUTHSYNC_KAFKA_BROKERS", "k1:9092,k2:9092"),
                ("AUTHSYNC_CONSUMER_BATCH_SIZE", "42"),
                ("DATABASE_URL", "postgres://x@db/app"),
                ("AUTHSYNC_KAFKA_PROPERTY_SASL_MECHANISM", "SCRAM-SHA-512"),
                ("AUTHSYNC_KAFKA_GROUP_ID", "12345"),
                ("AUTHSYNC_RELAY_ENABLED", "false"),
            ]),
        )
        .unwrap();
        assert_eq!(config.kafka.brokers, "k1:9092,k2:9092");
        assert_eq!(
            config.kafka.group_id, "12345",
            "numeric-looking strings stay strings"
        );
        assert!(!config.relay.enabled);
        assert_eq!(config.consumer.batch_size, 42);
        assert_eq!(config.database.url.expose(), "postgres://x@db/app");
        assert_eq!(
            config
                .kafka
                .properties
                .get("sasl.mechanism")
                .map(String::as_str),
            Some("SCRAM-SHA-512")
        );
    }

    #[test]
    fn kubernetes_service_links_are_skipped_and_typos_still_stop_the_start() {
        // What a Service named `authsync-kafka` (a Strimzi cluster `authsync`) and one named
        // `authsync-ingest` inject into every pod of the namespace.
        let links = [
            ("AUTHSYNC_KAFKA_SERVICE_HOST", "10.0.0.7"),
            ("AUTHSYNC_KAFKA_SERVICE_PORT", "9092"),
            ("AUTHSYNC_KAFKA_SERVICE_PORT_TCP_CLIENTS", "9092"),
            ("AUTHSYNC_KAFKA_PORT", "tcp://10.0.0.7:9092"),
            ("AUTHSYNC_KAFKA_PORT_9092_TCP", "tcp://10.0.0.7:9092"),
            ("AUTHSYNC_KAFKA_PORT_9092_TCP_PROTO", "tcp"),
            ("AUTHSYNC_KAFKA_PORT_9092_TCP_PORT", "9092"),
            ("AUTHSYNC_KAFKA_PORT_9092_TCP_ADDR", "10.0.0.7"),
            ("AUTHSYNC_INGEST_SERVICE_HOST", "10.0.0.8"),
        ];
        let mut vars = links.to_vec();
        vars.push(("AUTHSYNC_CONSUMER_BATCH_SIZE", "7"));
        let config = Config::load_from(None, env(&vars)).unwrap();
        assert_eq!(config.consumer.batch_size, 7);
        let mut expected: Vec<String> = links.iter().map(|(k, _)| k.to_string()).collect();
        expected.sort();
        assert_eq!(config.ignored_environment, expected);
        // A misspelt setting is not a service link: it still names itself and stops the start.
        for typo in [
            "AUTHSYNC_CONSUMER_BATCH_SIZ",
            "AUTHSYNC_KAFKA_PORTS",
            "AUTHSYNC_KAFKA_PORT_X_TCP",
            "AUTHSYNC_HTTP_SERVICE",
        ] {
            let err = Config::load_from(None, env(&[(typo, "1")]))
                .unwrap_err()
                .to_string();
            assert!(err.contains("unknown field"), "{typo}: {err}");
        }
    }

    #[test]
    fn sasl_mechanisms_without_a_provider_in_this_build_are_refused() {
        for refused in ["GSSAPI", "OAUTHBEARER", "kerberos"] {
            let err = Config::load_from(
                None,
                env(&[("AUTHSYNC_KAFKA_PROPERTY_SASL_MECHANISM", refused)]),
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("kafka.properties.sasl.mechanism") && err.contains(refused),
                "{refused}: {err}"
            );
        }
        for accepted in ["PLAIN", "SCRAM-SHA-256", "scram-sha-512"] {
            Config::load_from(
                None,
                env(&[("AUTHSYNC_KAFKA_PROPERTY_SASL_MECHANISM", accepted)]),
            )
            .unwrap();
        }
    }

    #[test]
    fn authsync_database_url_wins_over_database_url() {
        let config = Config::load_from(
            None,
            env(&[
                ("DATABASE_URL", "postgres://generic@db/app"),
                ("AUTHSYNC_DATABASE_URL", "postgres://own@db/app"),
            ]),
        )
        .unwrap();
        assert_eq!(config.database.url.expose(), "postgres://own@db/app");
    }

    #[test]
    fn random_page_cost_is_read_from_the_environment_and_bounded() {
        let config =
            Config::load_from(None, env(&[("AUTHSYNC_DATABASE_RANDOM_PAGE_COST", "2.5")])).unwrap();
        assert_eq!(config.database.random_page_cost, 2.5);
        for bad in ["0", "-1", "1e9", "NaN"] {
            let err = Config::load_from(None, env(&[("AUTHSYNC_DATABASE_RANDOM_PAGE_COST", bad)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains("database.random_page_cost"), "{bad}: {err}");
        }
    }

    #[test]
    fn bad_setting_names_the_field() {
        let err = Config::load_from(None, env(&[("AUTHSYNC_CONSUMER_BATCH_SIZE", "0")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("consumer.batch_size"), "{err}");

        let err = Config::load_from(None, env(&[("AUTHSYNC_CONSUMER_BATCH_SIZE", "many")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("consumer.batch_size"), "{err}");

        let err = Config::load_from(None, env(&[("AUTHSYNC_DATABASE_URL", "mysql://x")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("database.url"), "{err}");

        // Batches in flight would take every connection the relay and /readyz need.
        let err = Config::load_from(
            None,
            env(&[
                ("AUTHSYNC_CONSUMER_MAX_BATCHES_IN_FLIGHT", "8"),
                ("AUTHSYNC_DATABASE_MAX_CONNECTIONS", "8"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("consumer.max_batches_in_flight"), "{err}");
    }

    #[test]
    fn file_settings_apply_and_unknown_keys_are_rejected() {
        let dir = std::env::temp_dir().join(format!("authsync-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.toml");
        std::fs::write(&path, "[relay]\nbatch_size = 77\n").unwrap();
        let config = Config::load_from(Some(&path), env(&[])).unwrap();
        assert_eq!(config.relay.batch_size, 77);

        std::fs::write(&path, "[relay]\nbatch_sise = 77\n").unwrap();
        let err = Config::load_from(Some(&path), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("batch_sise"), "{err}");
    }

    #[test]
    fn secrets_are_not_debug_printed() {
        let config = Config::default();
        assert!(!format!("{config:?}").contains("postgres://"));
    }

    #[test]
    fn config_output_redacts_secret_properties_and_url_passwords() {
        let config = Config::load_from(
            None,
            env(&[
                (
                    "AUTHSYNC_DATABASE_URL",
                    "postgres://app:hunter2@db:5432/authsync?sslmode=require",
                ),
                ("AUTHSYNC_KAFKA_PROPERTY_SASL_PASSWORD", "kafka-pass-1"),
                ("AUTHSYNC_KAFKA_PROPERTY_SSL_KEY_PASSWORD", "key-pass-2"),
                (
                    "AUTHSYNC_KAFKA_PROPERTY_SASL_OAUTHBEARER_CLIENT_SECRET",
                    "oauth-3",
                ),
                ("AUTHSYNC_KAFKA_PROPERTY_SASL_USERNAME", "alice"),
            ]),
        )
        .unwrap();
        let shown = config.redacted();
        for secret in ["hunter2", "kafka-pass-1", "key-pass-2", "oauth-3"] {
            assert!(!shown.contains(secret), "{secret} leaked:\n{shown}");
        }
        assert!(
            shown.contains("alice"),
            "non-secret properties stay visible"
        );
        assert!(
            shown.contains("postgres://app:<redacted>@db:5432/authsync?sslmode=require"),
            "{shown}"
        );
        assert_eq!(
            redact_url("postgres://db/authsync?user=a&password=pw&sslmode=require"),
            "postgres://db/authsync?user=a&password=<redacted>&sslmode=require"
        );
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
    }

    #[test]
    fn a_producer_limit_too_small_for_the_dead_letters_is_refused_at_start_up() {
        let err = Config::load_from(
            None,
            env(&[
                ("AUTHSYNC_CONSUMER_MAX_MESSAGE_BYTES", "1048576"),
                ("AUTHSYNC_RELAY_MESSAGE_MAX_BYTES", "1000000"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("consumer.max_message_bytes") && err.contains("relay.message_max_bytes"),
            "{err}"
        );
        Config::load_from(
            None,
            env(&[
                ("AUTHSYNC_CONSUMER_MAX_MESSAGE_BYTES", "1048576"),
                ("AUTHSYNC_RELAY_MESSAGE_MAX_BYTES", "1100000"),
            ]),
        )
        .unwrap();
    }

    #[test]
    fn the_example_file_loads_and_role_rules_come_from_the_file() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/authsync.example.toml");
        let config = Config::load_from(Some(&example), env(&[])).unwrap();
        assert!(config.identity.link_verified_email);

        let dir = std::env::temp_dir().join(format!("authsync-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("roles.toml");
        let rules = |value: &str| {
            format!(
                "[[identity.role_sets]]\nname = \"okta\"\nmode = \"force\"\n\
                 [[identity.role_sets.rules]]\nname = \"admins\"\nclaim = \"groups\"\n\
                 match = \"regex\"\nvalue = '{value}'\nrole = \"admin\"\n"
            )
        };
        std::fs::write(&path, rules("Admins|Owners")).unwrap();
        let config = Config::load_from(Some(&path), env(&[])).unwrap();
        assert_eq!(config.identity.role_sets[0].rules[0].role, "admin");

        std::fs::write(&path, rules("Admins(")).unwrap();
        let err = Config::load_from(Some(&path), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("okta/admins") && err.contains("regex"),
            "{err}"
        );
    }
}
