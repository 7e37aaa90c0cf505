//! End to end through the real `authsync` binary against a Kafka-compatible broker process
//! (tansu in CI; any Kafka works). Set `AUTHSYNC_TEST_KAFKA_BROKERS` to run it; under
//! `CI=true` its absence is a failure, not a skip.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

fn brokers() -> Option<String> {
    real_brokers()
}

struct Process(Child);

impl Process {
    fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.0.try_wait() {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                let _ = self.0.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

fn spawn_worker(brokers: &str, db: &TestDb, suffix: &str, group: &str) -> Process {
    let child = Command::new(env!("CARGO_BIN_EXE_authsync"))
        .args(["run", "--create-topics"])
        .env("AUTHSYNC_KAFKA_BROKERS", brokers)
        .env("AUTHSYNC_KAFKA_GROUP_ID", group)
        .env("AUTHSYNC_DATABASE_URL", &db.url)
        .env("AUTHSYNC_HTTP_LISTEN", "127.0.0.1:0")
        // This producer stands in for a cluster whose ACLs admit only trusted producers.
        .env("AUTHSYNC_TRUST_UNSIGNED", "trusted")
        .env("AUTHSYNC_TOPICS_LOGIN", format!("auth.login.{suffix}"))
        .env(
            "AUTHSYNC_TOPICS_USER_EVENTS",
            format!("auth.user-events.{suffix}"),
        )
        .env("AUTHSYNC_TOPICS_PARTITIONS", "3")
        .env("AUTHSYNC_RELAY_POLL_INTERVAL_MS", "100")
        // Tiny queues: back-pressure is exercised against the real broker too.
        .env("AUTHSYNC_CONSUMER_BATCH_SIZE", "2")
        .env("AUTHSYNC_KAFKA_PROPERTY_QUEUED_MIN_MESSAGES", "2")
        .env("AUTHSYNC_KAFKA_SESSION_TIMEOUT_MS", "10000")
        .env("AUTHSYNC_LOG_LEVEL", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn authsync");
    Process(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_against_a_real_broker_process_end_to_end() {
    let Some(brokers) = brokers() else { return };
    let db = TestDb::new().await;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let group = random_name("e2e");
    let login_topic = format!("auth.login.{suffix}");
    let out_topic = format!("auth.user-events.{suffix}");
    let dlq_topic = format!("{login_topic}.dlq");

    let mut worker = spawn_worker(&brokers, &db, &suffix, &group);
    // --create-topics creates the topics through the admin API; wait for them.
    wait_for("worker ready", || async {
        db.count("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'authsync-worker:%'")
            .await
            > 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let producer = producer(&brokers);
    for i in 0..10 {
        let value = login(
            &format!("e2e-{suffix}-{i}"),
            "2026-06-01T09:00:00Z",
            json!({"provider": "kcat", "subject": format!("user-{}", i % 4),
                   "email": format!("user{}@example.com", i % 4), "isEmailVerified": i >= 4}),
        );
        produce_to(
            &producer,
            &login_topic,
            &format!("kcat:user-{}", i % 4),
            &value,
            None,
            &[],
        )
        .await;
    }
    produce_to(&producer, &login_topic, "kcat:bad", b"{oops", None, &[]).await;

    wait_for("11 handled", || async {
        db.count("SELECT count(*) FROM inbox").await == 11
    })
    .await;
    wait_for("outbox drained", || async {
        db.count("SELECT count(*) FROM outbox").await == 0
    })
    .await;
    assert_eq!(
        worker.terminate(),
        Some(0),
        "SIGTERM: drain, commit, exit 0"
    );

    // 10 synced + 4 signed_up + 4 token refreshes (verification flipped for each user) + 1 DLQ.
    let out = read_topics(&brokers, &[out_topic.clone(), dlq_topic.clone()], 19).await;
    assert_eq!(out.len(), 19);
    let count = |t: &str| out.iter().filter(|o| o.event_type() == t).count();
    assert_eq!(count("user.synced"), 10);
    assert_eq!(count("user.signed_up"), 4);
    assert_eq!(count("user.token_refresh_required"), 4);
    for o in out.iter().filter(|o| o.topic == out_topic) {
        assert_matches_schema(&o.json());
    }
    let letter = out
        .iter()
        .find(|o| o.topic == dlq_topic)
        .expect("dead letter");
    assert_eq!(letter.header("authsync-error-class"), "not_json");

    // Restart: offsets were committed at shutdown, so nothing is re-read.
    let mut again = spawn_worker(&brokers, &db, &suffix, &group);
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(again.terminate(), Some(0));
    assert_eq!(db.count("SELECT count(*) FROM outbox_emitted").await, 19);
    assert_eq!(db.count("SELECT count(*) FROM inbox").await, 11);
}
