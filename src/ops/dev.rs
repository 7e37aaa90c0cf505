//! `authsync dev`: a first run with nothing but Postgres. librdkafka's mock broker runs in
//! this process, speaking the real Kafka protocol on a loopback port.

use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio_util::sync::CancellationToken;

use crate::app::{self, RunOptions};
use crate::config::Config;
use crate::kafka::client_config;
use crate::store;

/// Creates the configured database when it does not exist (dev convenience only).
pub async fn ensure_database(config: &Config) -> anyhow::Result<()> {
    let options = store::connect_options(&config.database).context("database.url")?;
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    if options.connect().await.is_ok() {
        return Ok(());
    }
    let admin: PgConnectOptions = options.clone().database("postgres");
    let mut conn = admin
        .connect()
        .await
        .context("cannot reach Postgres (database.url)")?;
    let exists: bool = sqlx::query_scalar!(
        r#"SELECT EXISTS(SELECT 1 FROM pg_database WHERE datname = $1) AS "e!""#,
        name
    )
    .fetch_one(&mut conn)
    .await?;
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        sqlx::raw_sql(&format!("CREATE DATABASE {quoted}"))
            .execute(&mut conn)
            .await
            .with_context(|| format!("cannot create database {name}"))?;
        tracing::info!(database = %name, "created database");
    }
    conn.close().await.ok();
    Ok(())
}

/// The `clerk-dev` endpoint's Standard Webhooks secret (dev only: printed, never secret).
pub const DEV_CLERK_SECRET: &str = "whsec_ZGV2LW9ubHktc2VjcmV0LWRvLW5vdC11c2UtaW4tcHJvZA==";

/// Dev defaults for the front door and the trust policy, unless configured: an ingest on
/// 127.0.0.1:8081 with a `clerk-dev` endpoint, a signing key made for this run, and
/// unsigned producers (kcat, the demo) trusted unless `trust.unsigned` was set in the
/// environment. Returns whether the `clerk-dev` endpoint was added.
fn prepare_dev_trust(config: &mut Config) -> bool {
    if std::env::var_os("AUTHSYNC_TRUST_UNSIGNED").is_none() && config.trust.unsigned == "refuse" {
        config.trust.unsigned = "trusted".into();
    }
    if config.ingest.signing_key.is_empty() {
        let key = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        config.ingest.signing_key = crate::config::Secret::new(key.clone());
        config.trust.keys.insert(
            config.ingest.signing_key_id.clone(),
            crate::config::Secret::new(key),
        );
    }
    if std::env::var_os("AUTHSYNC_INGEST_LISTEN").is_none()
        && config.ingest.listen == crate::config::IngestConfig::default().listen
    {
        config.ingest.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 8081));
    }
    if !config.ingest.endpoints.is_empty() {
        return false;
    }
    config.ingest.endpoints.insert(
        "clerk-dev".into(),
        crate::config::IngestEndpointConfig {
            provider: "clerk".into(),
            secrets: vec![crate::config::Secret::new(DEV_CLERK_SECRET)],
            ..Default::default()
        },
    );
    config.trust.sources.insert(
        "clerk-dev".into(),
        crate::config::TrustedSourceConfig {
            providers: vec!["clerk".into()],
            email_verified: true,
            groups: true,
        },
    );
    true
}

/// A sample `auth.login` CloudEvent (also used by `--demo`).
pub fn sample_login(id: &str, provider: &str, subject: &str, data: serde_json::Value) -> Vec<u8> {
    let mut data = data;
    if let Some(obj) = data.as_object_mut() {
        obj.insert("provider".into(), provider.into());
        obj.insert("subject".into(), subject.into());
    }
    serde_json::to_vec(&serde_json::json!({
        "specversion": "1.0",
        "id": id,
        "source": "authsync-dev-demo",
        "type": "auth.login",
        "time": chrono::Utc::now().to_rfc3339(),
        "datacontenttype": "application/json",
        "data": data,
    }))
    .unwrap_or_default()
}

pub async fn run(
    mut config: Config,
    demo: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let cluster = MockCluster::new(1).context("cannot start the embedded Kafka mock broker")?;
    for topic in config.topics.all() {
        cluster
            .create_topic(&topic, config.topics.partitions, 1)
            .with_context(|| format!("cannot create topic {topic}"))?;
    }
    config.kafka.brokers = cluster.bootstrap_servers();
    let ingest_on = prepare_dev_trust(&mut config);
    ensure_database(&config).await?;
    let pool = store::pool(&config.database)?;
    store::migrate(&pool).await.context("migrations failed")?;
    // The embedded broker is new: offsets an earlier run saw now hold other messages, and
    // their dead letters (whose ids name the position) must be written again.
    let forgotten = store::inbox::forget_positions(&pool, &config.kafka.group_id)
        .await
        .context("cannot reset the dev inbox")?;
    let letters: Vec<uuid::Uuid> = forgotten
        .iter()
        .map(|f| crate::steps::dead_letter_id(&f.event_id, &f.topic, f.partition, f.offset))
        .collect();
    store::outbox::forget_emitted(&pool, &letters)
        .await
        .context("cannot reset the dev outbox ledger")?;
    pool.close().await;

    let worker = app::start(config.clone(), RunOptions::default(), shutdown.clone()).await?;
    let ingest = crate::ingest::start(&config, shutdown.clone()).await?;
    println!("authsync dev is running");
    println!("  Kafka (embedded mock broker): {}", config.kafka.brokers);
    println!(
        "  topics: {} (in), {} (out), {} (dead letters)",
        config.topics.login,
        config.topics.user_events,
        config.topics.dlq_for(&config.topics.login)
    );
    println!(
        "  metrics / health: http://{}/metrics  /healthz  /readyz",
        worker.http_addr
    );
    println!(
        "  publish a login:  kcat -b {} -t {} -P -k 'demo:alice'   (one JSON CloudEvent per line)",
        config.kafka.brokers, config.topics.login
    );
    if ingest_on {
        println!(
            "  webhooks (authsync ingest): http://{}/hooks/clerk-dev  (Standard Webhooks secret {DEV_CLERK_SECRET})",
            ingest.addr
        );
    } else {
        println!(
            "  webhooks (authsync ingest): http://{}/hooks/<endpoint>",
            ingest.addr
        );
    }
    println!(
        "  trust.unsigned = {}: what kcat publishes directly is {}",
        config.trust.unsigned,
        if config.trust.unsigned == "refuse" {
            "dead-lettered (untrusted_source)"
        } else {
            "applied"
        }
    );
    println!("  Ctrl-C stops it.");

    if demo {
        if let Err(e) = run_demo(&config, &shutdown).await {
            tracing::error!(error = %e, "demo failed");
        }
    }
    shutdown.cancelled().await;
    ingest.wait().await?;
    worker.wait().await?;
    drop(cluster);
    Ok(())
}

async fn run_demo(config: &Config, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let producer: FutureProducer = client_config(&config.kafka).create()?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let samples = [
        (
            format!("demo-{run}-1"),
            "demo",
            "alice",
            serde_json::json!({"email": "alice@example.com", "isEmailVerified": false,
                               "displayName": "Alice", "locale": "en-GB", "deviceID": "laptop"}),
        ),
        (
            format!("demo-{run}-2"),
            "demo",
            "alice",
            serde_json::json!({"email": "alice@example.com", "isEmailVerified": true,
                               "displayName": "Alice L.", "groups": ["staff"]}),
        ),
        (
            format!("demo-{run}-3"),
            "demo",
            "bob",
            serde_json::json!({"email": "bob@example.com", "isEmailVerified": true,
                               "defaultPersonalCollectionLabel": "Bob's stuff"}),
        ),
    ];
    let mut expected = 0;
    for (id, provider, subject, data) in &samples {
        let key = format!("{provider}:{subject}");
        let value = sample_login(id, provider, subject, data.clone());
        producer
            .send(
                FutureRecord::to(&config.topics.login)
                    .key(&key)
                    .payload(&value),
                Duration::from_secs(5),
            )
            .await
            .map_err(|(e, _)| e)?;
        println!("demo: published login {id} for {key}");
        expected += 1;
    }
    // A message that can never succeed, to show the dead-letter path. (The broker is new on
    // every run, so it lands where an earlier run's did: dev forgets that position at start.)
    let broken_key = "demo:broken";
    producer
        .send(
            FutureRecord::to(&config.topics.login)
                .key(broken_key)
                .payload("not json"),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)?;
    println!("demo: published one malformed message");

    let reader: StreamConsumer = client_config(&config.kafka)
        .set("group.id", format!("authsync-demo-{run}"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()?;
    let dlq = config.topics.dlq_for(&config.topics.login);
    reader.subscribe(&[&config.topics.user_events, &dlq])?;
    // Only the demo's own results are shown and counted (not what kcat published).
    // Once every login's `user.synced` and the dead letter are in, the results still in
    // flight (another user's `user.signed_up`, say) get a moment to arrive.
    let mine = format!("demo-{run}-");
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut synced = 0;
    let mut dead = 0;
    let mut settling = false;
    loop {
        if !settling && synced >= expected && dead >= 1 {
            settling = true;
            deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        }
        let message = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep_until(deadline) => {
                if !settling {
                    println!("demo: timed out waiting for results");
                    return Ok(());
                }
                break;
            }
            m = reader.recv() => m?,
        };
        if message.topic() == dlq {
            if message.key() != Some(broken_key.as_bytes()) {
                // Someone else's, published with kcat meanwhile.
                continue;
            }
            dead += 1;
            let headers = crate::kafka::message_headers(&message);
            let header = |name: &str| {
                headers
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default()
            };
            println!(
                "demo: dead letter  class={} reason={}",
                header("authsync-error-class"),
                header("authsync-error-reason")
            );
            continue;
        }
        let event: serde_json::Value =
            serde_json::from_slice(message.payload().unwrap_or_default()).unwrap_or_default();
        let cause = event["causationid"].as_str().unwrap_or("?");
        if !cause.starts_with(&mine) {
            continue;
        }
        let kind = event["type"].as_str().unwrap_or("?");
        if kind == "user.synced" {
            synced += 1;
        }
        println!(
            "demo: {kind:<28} user={} cause={} {}",
            event["subject"].as_str().unwrap_or("?"),
            cause,
            match kind {
                "user.synced" => format!(
                    "didSignUp={} tokenRefreshRequired={} reason={:?}",
                    event["data"]["didSignUp"],
                    event["data"]["tokenRefreshRequired"],
                    event["data"]["tokenRefreshReason"].as_str().unwrap_or("")
                ),
                _ => String::new(),
            }
        );
    }
    println!("demo: done; the worker keeps running (Ctrl-C stops it)");
    Ok(())
}
