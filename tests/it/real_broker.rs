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

/// Both real binaries: `authsync ingest` takes a Clerk-signed `user.created`, `authsync run`
/// turns it into a user and its `user.synced` and `user.signed_up`.
async fn clerk_webhook_through_ingest_and_run(brokers: &str, suffix: &str) {
    use crate::ingest::{svix_headers, CLERK_SECRET, SOURCE_KEY};
    let db = TestDb::new().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        l.local_addr().expect("addr").port()
    };
    let dir = std::env::temp_dir().join(random_name("authsync-e2e"));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("authsync.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[topics]
login = "auth.login.{suffix}"
user_events = "auth.user-events.{suffix}"
merge = "auth.merge.{suffix}"
partitions = 3

[ingest]
listen = "127.0.0.1:{port}"
signing_key = "env:E2E_SOURCE_KEY"

[ingest.endpoints.clerk-prod]
provider = "clerk"
secrets = ["env:E2E_CLERK_SECRET"]

[trust]
unsigned = "refuse"

[trust.keys]
k1 = "env:E2E_SOURCE_KEY"

[trust.sources.clerk-prod]
providers = ["clerk"]
"#
        ),
    )
    .expect("config file");
    let spawn = |args: &[&str]| {
        Process(
            Command::new(env!("CARGO_BIN_EXE_authsync"))
                .arg("--config")
                .arg(&config)
                .args(args)
                .env("AUTHSYNC_KAFKA_BROKERS", brokers)
                .env("AUTHSYNC_KAFKA_GROUP_ID", random_name("e2e-ingest"))
                .env("AUTHSYNC_DATABASE_URL", &db.url)
                .env("AUTHSYNC_HTTP_LISTEN", "127.0.0.1:0")
                .env("AUTHSYNC_RELAY_POLL_INTERVAL_MS", "100")
                .env("AUTHSYNC_KAFKA_SESSION_TIMEOUT_MS", "10000")
                .env("AUTHSYNC_LOG_LEVEL", "warn")
                .env("E2E_SOURCE_KEY", SOURCE_KEY)
                .env("E2E_CLERK_SECRET", CLERK_SECRET)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn authsync"),
        )
    };
    let mut worker = spawn(&["run", "--create-topics"]);
    wait_for("worker ready", || async {
        db.count("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'authsync-worker:%'")
            .await
            > 0
    })
    .await;
    let mut ingest = spawn(&["ingest"]);
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    wait_for("ingest ready", || async {
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    let body = crate::ingest::fixture("clerk/user-created.json");
    let mut request = http
        .post(format!("{base}/hooks/clerk-prod"))
        .body(body.clone());
    for (k, v) in svix_headers(
        CLERK_SECRET,
        "msg_e2e_bin",
        chrono::Utc::now().timestamp(),
        &body,
    ) {
        request = request.header(k, v);
    }
    let response = request.send().await.expect("POST");
    assert_eq!(response.status().as_u16(), 200);
    let outputs = read_topics(brokers, &[format!("auth.user-events.{suffix}")], 2).await;
    let mut types: Vec<String> = outputs.iter().map(Output::event_type).collect();
    types.sort();
    assert_eq!(types, ["user.signed_up", "user.synced"]);
    let synced = outputs
        .iter()
        .find(|o| o.event_type() == "user.synced")
        .expect("synced")
        .json();
    assert_eq!(synced["data"]["didSignUp"], true, "{synced}");
    assert_eq!(db.count("SELECT count(*) FROM users").await, 1);
    assert_eq!(
        ingest.terminate(),
        Some(0),
        "ingest stops cleanly on SIGTERM"
    );
    assert_eq!(
        worker.terminate(),
        Some(0),
        "worker stops cleanly on SIGTERM"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clerk_webhook_through_both_binaries_on_the_embedded_broker() {
    let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    for topic in [
        "auth.login",
        "auth.user-events",
        "auth.merge",
        "auth.login.dlq",
        "auth.merge.dlq",
    ] {
        let (base, dlq) = topic
            .split_once(".dlq")
            .map_or((topic, ""), |(b, _)| (b, ".dlq"));
        cluster
            .create_topic(&format!("{base}.{suffix}{dlq}"), 3, 1)
            .expect("topic");
    }
    clerk_webhook_through_ingest_and_run(&cluster.bootstrap_servers(), &suffix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clerk_webhook_through_both_binaries_on_a_real_broker_process() {
    let Some(brokers) = brokers() else { return };
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    clerk_webhook_through_ingest_and_run(&brokers, &suffix).await;
}

/// A replica process with `partitions` partitions per topic and its metrics on `port`.
fn spawn_replica(brokers: &str, db: &TestDb, suffix: &str, group: &str, port: u16) -> Process {
    let child = Command::new(env!("CARGO_BIN_EXE_authsync"))
        .args(["run", "--create-topics"])
        .env("AUTHSYNC_KAFKA_BROKERS", brokers)
        .env("AUTHSYNC_KAFKA_GROUP_ID", group)
        .env("AUTHSYNC_DATABASE_URL", &db.url)
        .env("AUTHSYNC_HTTP_LISTEN", format!("127.0.0.1:{port}"))
        .env("AUTHSYNC_TRUST_UNSIGNED", "trusted")
        .env("AUTHSYNC_TOPICS_LOGIN", format!("auth.login.{suffix}"))
        .env("AUTHSYNC_TOPICS_MERGE", format!("auth.merge.{suffix}"))
        .env(
            "AUTHSYNC_TOPICS_USER_EVENTS",
            format!("auth.user-events.{suffix}"),
        )
        .env("AUTHSYNC_TOPICS_PARTITIONS", "6")
        .env("AUTHSYNC_RELAY_POLL_INTERVAL_MS", "100")
        .env("AUTHSYNC_KAFKA_SESSION_TIMEOUT_MS", "6000")
        .env("AUTHSYNC_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn authsync");
    Process(child)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// What one replica reports: the partitions it owns and the logins it applied, per topic.
#[derive(Debug, Default, Clone)]
struct ReplicaView {
    owned: std::collections::BTreeMap<String, std::collections::BTreeSet<i32>>,
    applied: u64,
}

async fn replica_view(port: u16, login_topic: &str) -> Option<ReplicaView> {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let mut view = ReplicaView::default();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let label = |name: &str| {
            let start = series.find(&format!("{name}=\""))? + name.len() + 2;
            let len = series[start..].find('"')?;
            Some(series[start..start + len].to_string())
        };
        if series.starts_with("authsync_partition_owned{") {
            if let (Some(topic), Some(p)) = (label("topic"), label("partition")) {
                let p = p.parse().ok()?;
                view.owned.entry(topic).or_default().insert(p);
            }
        } else if series.starts_with("authsync_messages_processed_total{")
            && label("topic").as_deref() == Some(login_topic)
            && matches!(label("outcome").as_deref(), Some("applied" | "signed_up"))
        {
            view.applied += value.parse::<f64>().ok()? as u64;
        }
    }
    Some(view)
}

async fn views(ports: &[u16], login_topic: &str) -> Vec<ReplicaView> {
    let mut out = Vec::new();
    for port in ports {
        out.push(replica_view(*port, login_topic).await.unwrap_or_default());
    }
    out
}

/// Every topic's 6 partitions owned once, each replica within ±1 of the others.
fn balanced(views: &[ReplicaView], topics: &[String]) -> bool {
    topics.iter().all(|t| {
        let sizes: Vec<usize> = views
            .iter()
            .map(|v| v.owned.get(t).map_or(0, |o| o.len()))
            .collect();
        let all: std::collections::BTreeSet<i32> = views
            .iter()
            .filter_map(|v| v.owned.get(t))
            .flatten()
            .copied()
            .collect();
        sizes.iter().sum::<usize>() == 6
            && all.len() == 6
            && sizes.iter().max().unwrap_or(&0) - sizes.iter().min().unwrap_or(&0) <= 1
    })
}

/// Scale-out on a real broker with real processes: 2 and then 3 replicas each own their
/// share of *every* topic (±1), each applies logins, and a kill -9 of the busiest moves only
/// its partitions; every login is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_processes_share_each_topic_and_a_kill_moves_only_its_share() {
    let Some(brokers) = brokers() else { return };
    let db = TestDb::new().await;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let group = random_name("spread");
    let login_topic = format!("auth.login.{suffix}");
    let topics = [login_topic.clone(), format!("auth.merge.{suffix}")];
    let producer = producer(&brokers);
    let mut sent = 0;
    let mut send = |n: usize| {
        let from = sent;
        sent += n;
        (from, sent)
    };
    let produce = |range: (usize, usize)| {
        let (producer, topic) = (producer.clone(), login_topic.clone());
        async move {
            for i in range.0..range.1 {
                let subject = format!("user-{}", i % 120);
                let value = login(
                    &format!("spread-{i}"),
                    "2026-06-01T09:00:00Z",
                    json!({"provider": "kcat", "subject": subject}),
                );
                produce_to(
                    &producer,
                    &topic,
                    &format!("kcat:{subject}"),
                    &value,
                    None,
                    &[],
                )
                .await;
            }
        }
    };

    let mut ports = vec![free_port(), free_port()];
    let mut replicas = vec![
        spawn_replica(&brokers, &db, &suffix, &group, ports[0]),
        spawn_replica(&brokers, &db, &suffix, &group, ports[1]),
    ];
    wait_for("2 replicas balanced per topic", || async {
        balanced(&views(&ports, &login_topic).await, &topics)
    })
    .await;
    let two = views(&ports, &login_topic).await;
    produce(send(600)).await;
    wait_for("600 applied", || async {
        db.count("SELECT count(*) FROM inbox").await == 600
    })
    .await;
    let after_two = views(&ports, &login_topic).await;
    for (i, v) in after_two.iter().enumerate() {
        assert!(v.applied > 0, "replica {i} applied logins: {after_two:?}");
    }
    eprintln!(
        "spread, 2 replicas: login partitions {:?}, applied {:?}",
        two.iter()
            .map(|v| v.owned.get(&topics[0]).map_or(0, |o| o.len()))
            .collect::<Vec<_>>(),
        after_two.iter().map(|v| v.applied).collect::<Vec<_>>()
    );

    ports.push(free_port());
    replicas.push(spawn_replica(&brokers, &db, &suffix, &group, ports[2]));
    wait_for("3 replicas balanced per topic", || async {
        balanced(&views(&ports, &login_topic).await, &topics)
    })
    .await;
    let three = views(&ports, &login_topic).await;
    for v in &three {
        for t in &topics {
            assert_eq!(v.owned.get(t).map_or(0, |o| o.len()), 2, "2/2/2: {three:?}");
        }
    }
    produce(send(600)).await;
    wait_for("1,200 applied", || async {
        db.count("SELECT count(*) FROM inbox").await == 1200
    })
    .await;
    let after_three = views(&ports, &login_topic).await;
    let phase: Vec<u64> = after_three
        .iter()
        .zip(three.iter())
        .map(|(now, then)| now.applied - then.applied)
        .collect();
    assert!(
        phase.iter().all(|&n| n > 0),
        "each of 3 replicas applied: {phase:?}"
    );
    eprintln!("spread, 3 replicas: 2/2/2 partitions per topic, applied {phase:?}");

    // Kill -9 the busiest: only its partitions move, to the two that are left.
    let busiest = (0..3).max_by_key(|&i| phase[i]).unwrap_or(0);
    let _ = replicas[busiest].0.kill();
    let _ = replicas[busiest].0.wait();
    replicas.remove(busiest);
    ports.remove(busiest);
    let mut kept = three.clone();
    kept.remove(busiest);
    wait_for("2 survivors balanced per topic", || async {
        balanced(&views(&ports, &login_topic).await, &topics)
    })
    .await;
    let survivors = views(&ports, &login_topic).await;
    for (before, after) in kept.iter().zip(&survivors) {
        for t in &topics {
            let (b, a) = (before.owned.get(t), after.owned.get(t));
            assert!(
                a.zip(b).is_some_and(|(a, b)| a.is_superset(b)),
                "a survivor keeps its partitions of {t}: {kept:?} -> {survivors:?}"
            );
        }
    }
    produce(send(300)).await;
    wait_for("1,500 applied", || async {
        db.count("SELECT count(*) FROM inbox").await == 1500
    })
    .await;
    assert_eq!(
        db.count("SELECT sum(login_count)::int8 FROM users").await,
        1500,
        "every login applied exactly once"
    );
    for mut r in replicas {
        assert_eq!(r.terminate(), Some(0));
    }
}
