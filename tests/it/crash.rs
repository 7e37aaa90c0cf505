//! Crash consistency through the real binary on a real broker process (tansu in CI): two
//! workers, `kill -9` of whichever owns login partitions every few seconds, and (with the
//! `failpoints` feature, as `./scripts/test.sh` builds) deterministic aborts mid-batch, after
//! the commit but before the offset store, and in the relay after the broker ack but before
//! the delete. Then every invariant a user relies on is checked.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

const LOGINS: usize = 5_000;
const IDENTITIES: usize = 400;

struct Worker {
    child: Child,
    port: u16,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn spawn(brokers: &str, db: &TestDb, suffix: &str, group: &str, failpoints: &str) -> Worker {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_authsync"))
        .args(["run", "--create-topics"])
        .env("AUTHSYNC_KAFKA_BROKERS", brokers)
        .env("AUTHSYNC_KAFKA_GROUP_ID", group)
        .env("AUTHSYNC_DATABASE_URL", &db.url)
        .env("AUTHSYNC_HTTP_LISTEN", format!("127.0.0.1:{port}"))
        // This producer stands in for a cluster whose ACLs admit only trusted producers.
        .env("AUTHSYNC_TRUST_UNSIGNED", "trusted")
        .env("AUTHSYNC_TOPICS_LOGIN", format!("auth.login.{suffix}"))
        .env("AUTHSYNC_TOPICS_MERGE", format!("auth.merge.{suffix}"))
        .env(
            "AUTHSYNC_TOPICS_USER_EVENTS",
            format!("auth.user-events.{suffix}"),
        )
        .env("AUTHSYNC_TOPICS_PARTITIONS", "6")
        .env("AUTHSYNC_RELAY_POLL_INTERVAL_MS", "100")
        .env("AUTHSYNC_CONSUMER_BATCH_SIZE", "10")
        .env("AUTHSYNC_KAFKA_SESSION_TIMEOUT_MS", "6000")
        .env("AUTHSYNC_LOG_LEVEL", "warn")
        .env("FAILPOINTS", failpoints)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn authsync");
    Worker { child, port }
}

/// Login partitions the worker owns now (its metrics), or 0 when it does not answer.
async fn login_partitions(w: &Worker, login_topic: &str) -> i64 {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], w.port));
    if tokio::net::TcpStream::connect(addr).await.is_err() {
        return 0;
    }
    let metrics = http_get(addr, "/metrics").await.1;
    let prefix = format!("authsync_partitions_assigned{{topic=\"{login_topic}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_crash_points_lose_nothing_and_apply_nothing_twice() {
    let Some(brokers) = real_brokers() else {
        return;
    };
    let db = TestDb::new().await;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let group = random_name("crash");
    let login_topic = format!("auth.login.{suffix}");
    let out_topic = format!("auth.user-events.{suffix}");

    // Phase 1: two workers, logins arriving over ~40 s (100 every second), and kill -9 of
    // whichever worker owns login partitions every 2.5 s.
    // Phase 2 (with the `failpoints` feature): one worker at a time, started with one crash
    // point, fed until it aborts there; then the next.
    // Phase 3: two plain workers finish everything.
    let crash_points: Vec<&str> = if cfg!(feature = "failpoints") {
        vec![
            "step-before-commit=2*off->1*return",
            "consumer-after-commit=2*off->1*return",
            "relay-after-ack=2*off->1*return",
        ]
    } else {
        Vec::new()
    };
    let phase1 = LOGINS - 300 * crash_points.len();
    let mut newest: HashMap<String, usize> = HashMap::new();
    for i in 0..LOGINS {
        newest.insert(format!("u{}", i % IDENTITIES), i);
    }
    let feed = |from: usize, to: usize| {
        let (brokers, login_topic, suffix) = (brokers.clone(), login_topic.clone(), suffix.clone());
        tokio::spawn(async move {
            let producer = producer(&brokers);
            let base = chrono::DateTime::parse_from_rfc3339("2026-06-01T00:00:00Z").expect("time");
            for i in from..to {
                let subject = format!("u{}", i % IDENTITIES);
                let time = (base + chrono::Duration::seconds(i as i64)).to_rfc3339();
                let value = login(
                    &format!("crash-{suffix}-{i}"),
                    &time,
                    json!({"provider": "crash", "subject": subject, "displayName": format!("n{i}")}),
                );
                produce_to(
                    &producer,
                    &login_topic,
                    &format!("crash:{subject}"),
                    &value,
                    None,
                    &[],
                )
                .await;
                if i % 100 == 99 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        })
    };

    let mut a = spawn(&brokers, &db, &suffix, &group, "");
    let mut b = spawn(&brokers, &db, &suffix, &group, "");
    wait_for("workers connected", || async {
        db.count("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'authsync-worker:%'")
            .await
            > 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let feeder = feed(0, phase1);
    let mut kills = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    while !feeder.is_finished() || db.count("SELECT count(*) FROM inbox").await < phase1 as i64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "phase 1 not handled in time"
        );
        tokio::time::sleep(Duration::from_millis(2500)).await;
        if kills >= 6 {
            continue;
        }
        let owner = if login_partitions(&a, &login_topic).await > 0 {
            Some(&mut a)
        } else if login_partitions(&b, &login_topic).await > 0 {
            Some(&mut b)
        } else {
            None
        };
        if let Some(w) = owner {
            let _ = w.child.kill(); // SIGKILL
            let _ = w.child.wait();
            kills += 1;
            *w = spawn(&brokers, &db, &suffix, &group, "");
        }
    }

    let mut crashes = 0;
    let mut next = phase1;
    drop(b);
    for point in &crash_points {
        drop(a);
        a = spawn(&brokers, &db, &suffix, &group, point);
        let feeder = feed(next, next + 300);
        next += 300;
        let until = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(Some(_)) = a.child.try_wait() {
                crashes += 1;
                break;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "crash point {point} never fired"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        feeder.await.expect("feeder");
    }

    drop(a);
    let _a = spawn(&brokers, &db, &suffix, &group, "");
    let _b = spawn(&brokers, &db, &suffix, &group, "");
    wait_for("every login handled", || async {
        db.count("SELECT count(*) FROM inbox").await == LOGINS as i64
    })
    .await;
    wait_for("outbox drained", || async {
        db.count("SELECT count(*) FROM outbox").await == 0
    })
    .await;
    eprintln!("crash test: {kills} kill -9, {crashes} crash-point aborts, {LOGINS} logins");
    assert!(kills >= 3, "the test must really kill workers ({kills})");
    if cfg!(feature = "failpoints") {
        assert!(
            crashes >= 2,
            "the crash points must really fire ({crashes})"
        );
    }

    // Users equal distinct identities: no double sign-up.
    assert_eq!(
        db.count("SELECT count(*) FROM users").await,
        IDENTITIES as i64
    );
    assert_eq!(
        db.count("SELECT count(*) FROM external_identities").await,
        IDENTITIES as i64
    );
    // Every event id is in the inbox, once.
    assert_eq!(
        db.count(&format!("SELECT count(DISTINCT event_id) FROM inbox WHERE event_id LIKE 'crash-{suffix}-%' OR event_id LIKE '%crash-{suffix}-%'"))
            .await,
        LOGINS as i64
    );
    // Final profiles equal the newest events.
    let names: Vec<(String, String)> = sqlx::query_as(
        "SELECT i.subject, u.auth_display_name FROM external_identities i JOIN users u ON u.id = i.user_id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("profiles");
    for (subject, name) in names {
        assert_eq!(
            name,
            format!("n{}", newest[&subject]),
            "newest event won for {subject}"
        );
    }
    // The output topic's ids equal the emitted set; an id seen twice has identical bytes.
    let emitted: HashSet<String> =
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT event_id FROM outbox_emitted")
            .fetch_all(&db.pool)
            .await
            .expect("emitted")
            .into_iter()
            .map(|u| u.to_string())
            .collect();
    assert_eq!(
        emitted.len(),
        LOGINS + IDENTITIES,
        "one synced per login, one signed_up per user"
    );
    let out = read_topics(&brokers, std::slice::from_ref(&out_topic), emitted.len()).await;
    let mut seen: HashMap<String, Vec<u8>> = HashMap::new();
    let mut repeats = 0;
    for o in &out {
        let id = o.json()["id"].as_str().expect("id").to_string();
        if let Some(first) = seen.get(&id) {
            assert_eq!(first, &o.value, "a re-published id carries identical bytes");
            repeats += 1;
        } else {
            seen.insert(id, o.value.clone());
        }
    }
    let ids: HashSet<String> = seen.into_keys().collect();
    assert_eq!(
        ids, emitted,
        "output ids equal the emitted set: nothing lost, nothing extra"
    );
    eprintln!(
        "crash test: {} results, {repeats} re-published duplicates",
        out.len()
    );
}
