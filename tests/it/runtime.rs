//! Process behaviour: HTTP endpoints, graceful shutdown, transient failures, start-up errors.

use std::time::Duration;

use authsync::app::{self, RunOptions};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoints_report_health_readiness_and_metrics() {
    let mut h = Harness::new().await;
    h.start().await;
    let addr = h.worker().http_addr;
    h.produce(
        "p:m",
        &login(
            "m1",
            "2026-05-01T10:00:00Z",
            json!({"provider": "p", "subject": "m"}),
        ),
    )
    .await;
    h.produce("p:m", b"garbage").await;
    h.wait_handled(2).await;
    h.wait_published().await;

    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    let (status, body) = http_get(addr, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready"));
    let (status, metrics) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    for needle in [
        "authsync_messages_consumed_total{topic=\"auth.login.v1\"} 2",
        "authsync_messages_processed_total{outcome=\"signed_up\",topic=\"auth.login.v1\"} 1",
        "authsync_messages_processed_total{outcome=\"dead_lettered\",topic=\"auth.login.v1\"} 1",
        "authsync_dead_lettered_total{class=\"not_json\",topic=\"auth.login.v1\"} 1",
        "authsync_batch_duration_seconds_bucket",
        "authsync_outbox_backlog",
        "authsync_relay_leader 1",
        "authsync_relay_published_total",
    ] {
        assert!(
            metrics.contains(needle),
            "metrics lack {needle}:\n{metrics}"
        );
    }
    h.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(50)).await;
    h.stop().await;
}

/// SIGTERM mid-stream: the worker drains, commits and exits cleanly; a restart continues
/// where it stopped, with nothing applied or announced twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_commits_and_restart_continues_exactly_once() {
    let mut h = Harness::with(|c| c.consumer.batch_size = 20).await;
    h.start().await;
    let total = 300;
    let send = |i: i64| {
        login(
            &format!("s-{i}"),
            &format!("2026-05-01T10:{:02}:{:02}Z", i / 60, i % 60),
            json!({"provider": "p", "subject": format!("u{}", i % 40)}),
        )
    };
    for i in 0..150 {
        h.produce(&format!("p:u{}", i % 40), &send(i)).await;
    }
    h.wait_handled(20).await;
    // Stop while messages are still flowing in.
    h.shutdown.cancel();
    for i in 150..total {
        h.produce(&format!("p:u{}", i % 40), &send(i)).await;
    }
    h.stop().await;
    let handled_at_stop = h.db.count("SELECT count(*) FROM inbox").await;
    assert!(handled_at_stop >= 20 && handled_at_stop <= total);
    h.start().await;
    h.wait_handled(total).await;
    h.wait_published().await;
    let duplicates = h
        .worker()
        .metrics
        .duplicates
        .with_label_values(&[&h.config.topics.login])
        .get();
    h.stop().await;
    assert_eq!(
        duplicates, 0,
        "committed offsets covered everything applied before the stop"
    );
    assert_eq!(h.db.count("SELECT count(*) FROM users").await, 40);
    assert_eq!(
        h.db.count("SELECT sum(login_count)::int8 FROM users").await,
        total
    );
    assert_eq!(
        h.db.count("SELECT count(*) FROM outbox_emitted WHERE event_type = 'user.synced'")
            .await,
        total
    );
}

/// Connections killed under the worker: the batch retries with backoff, nothing is lost,
/// nothing is applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_database_failures_are_retried_without_loss() {
    let mut h = Harness::new().await;
    h.start().await;
    h.produce(
        "p:t-first",
        &login(
            "t-first",
            "2026-05-01T10:00:00Z",
            json!({"provider": "p", "subject": "first"}),
        ),
    )
    .await;
    h.wait_handled(1).await;
    // Connections are killed until one dies inside a batch (an idle one is only replaced by
    // the pool), while logins keep arriving.
    let retries = h.worker().metrics.batch_retries.clone();
    let killer = {
        let (db_name, admin, retries) = (h.db.name.clone(), admin_url(), retries.clone());
        tokio::spawn(async move {
            let pool = sqlx::PgPool::connect(&admin).await.expect("admin");
            let until = tokio::time::Instant::now() + Duration::from_secs(60);
            while retries.get() == 0 && tokio::time::Instant::now() < until {
                let _ = sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = $1 AND application_name LIKE 'authsync%' AND pid <> pg_backend_pid()",
                )
                .bind(&db_name)
                .execute(&pool)
                .await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let mut logins = 0;
    while logins < 30 || (!killer.is_finished() && logins < 1000) {
        h.produce(
            &format!("p:t{logins}"),
            &login(
                &format!("t-{logins}"),
                "2026-05-01T10:00:00Z",
                json!({"provider": "p", "subject": format!("t{logins}")}),
            ),
        )
        .await;
        logins += 1;
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    killer.await.expect("killer");
    let total = logins + 1;
    h.wait_handled(total).await;
    h.wait_published().await;
    h.stop().await;
    assert!(retries.get() > 0, "the outage caused retries");
    assert_eq!(h.db.count("SELECT count(*) FROM users").await, total);
    assert_eq!(
        h.db.count("SELECT count(*) FROM outbox_emitted").await,
        2 * total
    );
}

/// librdkafka stops fetching a partition once its queue holds 5 messages.
fn tiny_queues(c: &mut authsync::config::Config) {
    c.consumer.batch_size = 3;
    c.kafka
        .properties
        .insert("queued.min.messages".into(), "5".into());
}

/// Tiny queues and batches: every partition's fetching keeps stopping on a full queue and
/// resuming, and nothing may be lost or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_partition_queues_apply_back_pressure_without_loss() {
    back_pressure_without_loss(Harness::with(tiny_queues).await).await;
}

/// The same against the broker process, whose fetch responses are long per-partition runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_partition_queues_apply_back_pressure_without_loss_on_a_real_broker() {
    let Some(h) = Harness::on_real_broker(tiny_queues).await else {
        return;
    };
    back_pressure_without_loss(h).await;
}

async fn back_pressure_without_loss(mut h: Harness) {
    for i in 0..400 {
        h.produce(
            &format!("p:q{}", i % 7),
            &login(
                &format!("q-{i}"),
                &format!("2026-05-01T10:{:02}:{:02}Z", i / 60, i % 60),
                json!({"provider": "p", "subject": format!("q{}", i % 7), "displayName": format!("n{i}")}),
            ),
        )
        .await;
    }
    h.start().await;
    h.wait_handled(400).await;
    h.stop().await;
    assert_eq!(
        h.db.count("SELECT sum(login_count)::int8 FROM users").await,
        400
    );
    assert_newest_event_won(&h.db, "q", 7, 400).await;
}

/// Per identity `{prefix}{q}` (event `i` went to identity `i % identities`), the newest
/// event's display name won: order was kept.
async fn assert_newest_event_won(db: &TestDb, prefix: &str, identities: i64, total: i64) {
    for q in 0..identities {
        let last = (0..total)
            .filter(|i| i % identities == q)
            .max()
            .unwrap_or_default();
        let name: String = sqlx::query_scalar(
            "SELECT u.auth_display_name FROM users u JOIN external_identities e ON e.user_id = u.id WHERE e.subject = $1",
        )
        .bind(format!("{prefix}{q}"))
        .fetch_one(&db.pool)
        .await
        .expect("user");
        assert_eq!(name, format!("n{last}"), "newest event of {prefix}{q}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topics_are_named_at_start_up() {
    let cluster = rdkafka::mocking::MockCluster::new(1).expect("cluster");
    let db = TestDb::new().await;
    let config = test_config(&cluster.bootstrap_servers(), &db.url);
    cluster
        .create_topic(&config.topics.login, 1, 1)
        .expect("topic");
    let err = app::start(config, RunOptions::default(), CancellationToken::new())
        .await
        .err()
        .expect("start-up refuses")
        .to_string();
    assert!(
        err.contains("auth.user-events.v1")
            && err.contains("auth.login.v1.dlq")
            && err.contains("--create-topics"),
        "{err}"
    );
    assert!(
        !err.contains("auth.login.v1,"),
        "present topics are not listed: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmigrated_database_is_refused_at_start_up() {
    let cluster = rdkafka::mocking::MockCluster::new(1).expect("cluster");
    let db = TestDb::new().await;
    sqlx::raw_sql("DROP TABLE _sqlx_migrations")
        .execute(&db.pool)
        .await
        .expect("drop");
    let config = test_config(&cluster.bootstrap_servers(), &db.url);
    let err = app::start(config, RunOptions::default(), CancellationToken::new())
        .await
        .err()
        .expect("start-up refuses")
        .to_string();
    assert!(err.contains("authsync migrate"), "{err}");
}

#[test]
fn bad_setting_stops_the_binary_with_a_message_naming_it() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_authsync"))
        .arg("config")
        .env("AUTHSYNC_CONSUMER_MAX_MESSAGE_BYTES", "12")
        .output()
        .expect("run binary");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("consumer.max_message_bytes"), "{stderr}");
}

#[test]
fn invalid_role_rule_stops_start_up_naming_the_rule() {
    let dir = std::env::temp_dir().join(random_name("authsync-rules"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("authsync.toml");
    std::fs::write(
        &path,
        "[[identity.role_sets]]\nname = \"entra\"\nmode = \"sometimes\"\nrules = []\n",
    )
    .expect("write config");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_authsync"))
        .arg("--config")
        .arg(&path)
        .arg("config")
        .output()
        .expect("run binary");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("`entra`") && stderr.contains("unknown mode `sometimes`"),
        "{stderr}"
    );
}

/// One partition stuck on a row lock (a long transaction elsewhere) holds up only itself:
/// the other partitions keep being applied, and the stuck one resumes when the lock goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_partition_does_not_hold_up_the_others() {
    let mut h = Harness::new().await;
    h.start().await;
    let stuck = |id: &str| {
        login(
            id,
            "2026-05-01T10:00:00Z",
            json!({"provider": "p", "subject": "stuck"}),
        )
    };
    h.produce_with("p:stuck", &stuck("b-0"), Some(0), &[]).await;
    h.wait_handled(1).await;
    let mut lock = h.db.pool.begin().await.expect("begin");
    sqlx::query(
        "SELECT u.id FROM users u JOIN external_identities e ON e.user_id = u.id
         WHERE e.subject = 'stuck' FOR UPDATE OF u",
    )
    .execute(&mut *lock)
    .await
    .expect("lock the user");
    h.produce_with("p:stuck", &stuck("b-1"), Some(0), &[]).await;
    for i in 0..60 {
        h.produce_with(
            &format!("p:free{i}"),
            &login(
                &format!("f-{i}"),
                "2026-05-01T10:00:00Z",
                json!({"provider": "p", "subject": format!("free{i}")}),
            ),
            Some(1 + i % 2),
            &[],
        )
        .await;
    }
    h.wait_handled(61).await;
    let stuck_done =
        h.db.count("SELECT count(*) FROM inbox WHERE event_id = 'b-1'")
            .await;
    assert_eq!(stuck_done, 0, "the locked partition waited for the lock");
    lock.rollback().await.expect("release");
    h.wait_handled(62).await;
    h.stop().await;
    assert_eq!(
        h.db.count("SELECT login_count::int8 FROM users u JOIN external_identities e ON e.user_id = u.id WHERE e.subject = 'stuck'")
            .await,
        2
    );
}

/// Group commit meets a locked row: batches of three partitions, queued while both slots
/// are busy, share one transaction, and one of them needs a row another session holds. The
/// shared transaction gives up on the lock (`SHARED_LOCK_WAIT`) and its batches go on
/// alone: the free partitions are applied while the row is still held, the stuck one
/// after it is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_row_in_a_shared_transaction_stalls_only_its_partition() {
    let mut h = Harness::with(|c| c.consumer.max_batches_in_flight = 2).await;
    h.start().await;
    let stuck = |id: &str| {
        login(
            id,
            "2026-05-01T10:00:00Z",
            json!({"provider": "p", "subject": "stuck"}),
        )
    };
    h.produce_with("p:stuck", &stuck("b-0"), Some(0), &[]).await;
    h.wait_handled(1).await;
    let mut row = h.db.pool.begin().await.expect("begin");
    sqlx::query(
        "SELECT u.id FROM users u JOIN external_identities e ON e.user_id = u.id
         WHERE e.subject = 'stuck' FOR UPDATE OF u",
    )
    .execute(&mut *row)
    .await
    .expect("lock the user");
    // Both slots busy: two merge batches wait on the inbox table.
    let mut inbox = h.db.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE inbox IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *inbox)
        .await
        .expect("lock the inbox");
    let merges = producer(&h.config.kafka.brokers);
    for p in 0..2 {
        let merge =
            crate::merge::merge_event(&format!("m{p}"), uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        produce_to(&merges, &h.config.topics.merge, "m", &merge, Some(p), &[]).await;
    }
    wait_for("both slots wait on the inbox lock", || async {
        h.db.count(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .await
            == 2
    })
    .await;
    h.produce_with("p:stuck", &stuck("b-1"), Some(0), &[]).await;
    for i in 0..20 {
        h.produce_with(
            &format!("p:free{i}"),
            &login(
                &format!("f-{i}"),
                "2026-05-01T10:00:00Z",
                json!({"provider": "p", "subject": format!("free{i}")}),
            ),
            Some(1 + i % 2),
            &[],
        )
        .await;
    }
    // The consumer counts a batch's delay just before it queues for a slot.
    let metrics = h.worker().metrics.clone();
    let topic = h.config.topics.login.clone();
    wait_for("three partitions' batches queued", || {
        let (metrics, topic) = (metrics.clone(), topic.clone());
        async move {
            metrics
                .consume_delay_seconds
                .with_label_values(&[&topic])
                .get_sample_count()
                >= 3
        }
    })
    .await;
    // Each partition's first batch is queued well within this (fetch wait is milliseconds).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let transactions_before = metrics.transaction_messages.get_sample_count();
    let login_batches = || {
        metrics
            .batch_seconds
            .with_label_values(&[&topic])
            .get_sample_count()
    };
    let batches_before = login_batches();
    inbox.rollback().await.expect("release the inbox");
    wait_for("every free login applied while the row is held", || async {
        h.db.count("SELECT count(*) FROM inbox WHERE event_id LIKE 'f-%'")
            .await
            == 20
    })
    .await;
    assert_eq!(
        h.db.count("SELECT count(*) FROM inbox WHERE event_id = 'b-1'")
            .await,
        0,
        "the locked partition waits for its row"
    );
    assert!(
        metrics.transaction_messages.get_sample_count() - transactions_before
            < login_batches() - batches_before,
        "the queued batches shared a transaction"
    );
    row.rollback().await.expect("release the row");
    wait_for("the stuck login applied", || async {
        h.db.count("SELECT count(*) FROM inbox WHERE event_id = 'b-1'")
            .await
            == 1
    })
    .await;
    h.stop().await;
    assert_eq!(
        h.db.count("SELECT login_count::int8 FROM users u JOIN external_identities e ON e.user_id = u.id WHERE e.subject = 'stuck'")
            .await,
        2
    );
}

/// Scaling out and back in mid-stream: a second worker joins the group and takes over
/// partitions, then the first leaves. Revoked partitions drain before they move, so every
/// event is applied by one worker, once, in order per identity, and announced once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_move_between_workers_without_loss_or_double_apply() {
    let mut h = Harness::with(|c| c.consumer.batch_size = 10).await;
    h.start().await;
    let total: i64 = 600;
    let identities = 30;
    let send = |i: i64| {
        login(
            &format!("r-{i}"),
            &format!(
                "2026-05-01T{:02}:{:02}:{:02}Z",
                10 + i / 3600,
                i / 60 % 60,
                i % 60
            ),
            json!({"provider": "p", "subject": format!("u{}", i % identities), "displayName": format!("n{i}")}),
        )
    };
    let topic = h.config.topics.login.clone();
    for i in 0..200 {
        h.produce(&format!("p:u{}", i % identities), &send(i)).await;
    }
    h.wait_handled(50).await;

    let second_stop = CancellationToken::new();
    let second = app::start(h.config.clone(), RunOptions::default(), second_stop.clone())
        .await
        .expect("second worker starts");
    for i in 200..400 {
        h.produce(&format!("p:u{}", i % identities), &send(i)).await;
    }
    let owns = |w: &app::Worker| {
        w.metrics
            .partitions_assigned
            .with_label_values(&[&topic])
            .get()
    };
    wait_for("the second worker owns partitions", || async {
        owns(&second) > 0
    })
    .await;
    let first_metrics = h.worker().metrics.clone();
    h.stop().await;
    wait_for("the second worker owns every partition", || async {
        owns(&second) == i64::from(PARTITIONS)
    })
    .await;
    for i in 400..total {
        h.produce(&format!("p:u{}", i % identities), &send(i)).await;
    }
    h.wait_handled(total).await;
    h.wait_published().await;
    let applied = |m: &authsync::telemetry::Metrics| {
        ["applied", "signed_up"]
            .iter()
            .map(|outcome| {
                m.processed
                    .with_label_values(&[topic.as_str(), outcome])
                    .get()
            })
            .sum::<u64>()
    };
    let first_applied = applied(&first_metrics);
    let second_applied = applied(&second.metrics);
    second_stop.cancel();
    second.wait().await.expect("second worker stops cleanly");

    assert!(second_applied > 0, "the second worker applied events");
    // Redelivery after a move is allowed (a commit refused mid-rebalance leaves offsets
    // behind; the inbox skips what was applied), applying twice is not.
    assert_eq!(
        first_applied + second_applied,
        total as u64,
        "each event applied by exactly one worker"
    );
    assert_eq!(
        h.db.count("SELECT sum(login_count)::int8 FROM users").await,
        total
    );
    assert_newest_event_won(&h.db, "u", identities, total).await;
    let outputs = h.outputs((total + identities) as usize).await;
    let synced = outputs
        .iter()
        .filter(|o| o.event_type() == "user.synced")
        .count();
    assert_eq!(synced as i64, total, "each login announced once");
    assert_eq!(outputs.len() as i64, total + identities);
}

/// SIGTERM while the broker is unreachable: the worker still exits within its deadlines
/// (drain for the consumer, 10 s for the relay's unconfirmed deliveries), not when the
/// group session or the deliveries time out (45 s, 60 s: past the pod's grace period).
/// What it applied stays applied, and the result whose delivery was never confirmed stays
/// in the outbox, to be published again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_while_the_broker_is_down() {
    let mut h = Harness::with(|c| {
        c.consumer.drain_timeout_ms = 3_000;
        // Longer than `Harness::stop` waits: a close that waits for the session fails.
        c.kafka.session_timeout_ms = 45_000;
    })
    .await;
    h.start().await;
    let topic = h.config.topics.login.clone();
    wait_for("partitions assigned", || async {
        h.worker()
            .metrics
            .partitions_assigned
            .with_label_values(&[&topic])
            .get()
            > 0
    })
    .await;
    let cluster = h.cluster.as_ref().expect("mock");
    // Slow answers: the result's delivery is still unconfirmed when the broker goes.
    cluster
        .broker_round_trip_time(1, Duration::from_secs(3))
        .expect("rtt");
    h.produce(
        "p:gone",
        &login(
            "g-1",
            "2026-05-01T10:00:00Z",
            json!({"provider": "p", "subject": "gone"}),
        ),
    )
    .await;
    h.wait_handled(1).await;
    cluster.broker_down(1).expect("down");
    h.stop().await;
    assert_eq!(h.db.count("SELECT count(*) FROM users").await, 1);
    assert_eq!(
        h.db.count("SELECT count(*) FROM outbox").await,
        2,
        "user.synced and user.signed_up wait to be published again"
    );
}

/// The partitions of `topic` that `metrics`' process owns (`authsync_partition_owned`).
fn owned_partitions(
    metrics: &authsync::telemetry::Metrics,
    topic: &str,
) -> std::collections::BTreeSet<i32> {
    metrics
        .registry
        .gather()
        .iter()
        .filter(|family| family.name() == "authsync_partition_owned")
        .flat_map(|family| family.get_metric().iter())
        .filter(|m| {
            m.get_label()
                .iter()
                .any(|l| l.name() == "topic" && l.value() == topic)
        })
        .filter_map(|m| {
            m.get_label()
                .iter()
                .find(|l| l.name() == "partition")
                .and_then(|l| l.value().parse().ok())
        })
        .collect()
}

/// Replicas share every input topic, not just the partition count: with one group member
/// per topic, two replicas split each topic's 3 partitions 2/1 and three split them 1/1/1
/// (a member reading both topics let one replica own every login partition). When a
/// replica leaves, only its partitions move: the others keep what they had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_every_topic_within_one_partition() {
    let mut h = Harness::new().await;
    h.start().await;
    let topics = [h.config.topics.login.clone(), h.config.topics.merge.clone()];
    let mut stops = Vec::new();
    let mut workers = vec![h.worker().metrics.clone()];
    let spread = |workers: &[authsync::telemetry::Metrics]| {
        topics
            .iter()
            .map(|t| {
                workers
                    .iter()
                    .map(|w| owned_partitions(w, t))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    };
    // Each topic's partitions: every one owned once, each replica within ±1 of the others.
    let balanced = |per_topic: &[Vec<std::collections::BTreeSet<i32>>]| {
        per_topic.iter().all(|owners| {
            let sizes: Vec<usize> = owners.iter().map(|o| o.len()).collect();
            let all: std::collections::BTreeSet<i32> = owners.iter().flatten().copied().collect();
            sizes.iter().sum::<usize>() == PARTITIONS as usize
                && all.len() == PARTITIONS as usize
                && sizes.iter().max().unwrap_or(&0) - sizes.iter().min().unwrap_or(&0) <= 1
        })
    };
    let mut extra = Vec::new();
    for _ in 0..2 {
        let stop = CancellationToken::new();
        let worker = app::start(h.config.clone(), RunOptions::default(), stop.clone())
            .await
            .expect("another replica starts");
        workers.push(worker.metrics.clone());
        stops.push(stop);
        extra.push(worker);
        wait_for(
            &format!("{} replicas balanced per topic", workers.len()),
            || async { balanced(&spread(&workers)) },
        )
        .await;
    }
    let before = spread(&workers);
    for owners in &before {
        assert!(owners.iter().all(|o| o.len() == 1), "1/1/1: {before:?}");
    }
    // The third replica leaves: its partitions go to the others, theirs stay.
    stops[1].cancel();
    if let Some(third) = extra.pop() {
        third.wait().await.expect("third replica stops cleanly");
    }
    workers.pop();
    wait_for("2 replicas balanced per topic", || async {
        balanced(&spread(&workers))
    })
    .await;
    let after = spread(&workers);
    for (t, owners) in after.iter().enumerate() {
        for (w, owned) in owners.iter().enumerate() {
            assert!(
                owned.is_superset(&before[t][w]),
                "replica {w} kept its partitions of {}: {before:?} -> {after:?}",
                topics[t]
            );
        }
    }
    stops[0].cancel();
    for worker in extra {
        worker.wait().await.expect("second replica stops cleanly");
    }
    h.stop().await;
}

/// While the worker drains after SIGTERM, its endpoints stay up: `/readyz` answers 503 (no
/// new traffic for this replica) and `/healthz` 200 (it is not hung), until the batch it
/// holds is done; then the endpoints go with the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_the_worker_drains() {
    let mut h = Harness::new().await;
    h.start().await;
    let addr = h.worker().http_addr;
    let held = |id: &str| {
        login(
            id,
            "2026-05-01T10:00:00Z",
            json!({"provider": "p", "subject": "held"}),
        )
    };
    h.produce("p:held", &held("d-0")).await;
    h.wait_handled(1).await;
    let mut lock = h.db.pool.begin().await.expect("begin");
    sqlx::query(
        "SELECT u.id FROM users u JOIN external_identities e ON e.user_id = u.id
         WHERE e.subject = 'held' FOR UPDATE OF u",
    )
    .execute(&mut *lock)
    .await
    .expect("lock the user");
    h.produce("p:held", &held("d-1")).await;
    wait_for("the batch waits on the lock", || async {
        h.db.count(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .await
            == 1
    })
    .await;
    assert_eq!(
        http_get(addr, "/readyz").await.0,
        200,
        "ready before SIGTERM"
    );
    h.shutdown.cancel();
    wait_for("/readyz turns 503 during the drain", || async {
        http_get(addr, "/readyz").await.0 == 503
    })
    .await;
    assert_eq!(
        http_get(addr, "/healthz").await.0,
        200,
        "alive while draining"
    );
    lock.rollback().await.expect("release");
    h.stop().await;
    assert_eq!(
        h.db.count("SELECT count(*) FROM inbox WHERE event_id = 'd-1'")
            .await,
        1,
        "the held batch finished before the worker stopped"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the endpoints stop with the worker"
    );
}
