//! Operator commands against real Postgres and the Kafka protocol.

use authsync::ops::dlq::{self, RedriveRequest};
use authsync::ops::outbox;
use authsync::ops::replay::{self, ReplayFrom, ReplayRequest};
use authsync::ops::replay_lane::{self, LaneOptions};
use authsync::relay;
use authsync::telemetry::Metrics;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// `replay::run` once the stopped workers have left the group. A worker leaves its group
/// on a thread the process does not wait for (`consumer::close_within`), so right after a
/// stop the broker may still list it, and the replay refuses (as it must while workers
/// run): retry as the refusal says, for at most 30 s.
async fn replay_after_stop(
    h: &Harness,
    request: &ReplayRequest,
) -> authsync::ops::replay::ReplayOutcome {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match replay::run(&h.config, &h.db.pool, request).await {
            Ok(outcome) => return outcome,
            Err(e)
                if e.to_string().contains("live member")
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => panic!("replay: {e:#}"),
        }
    }
}

fn replay_request(h: &Harness, reprocess: bool, dry_run: bool) -> ReplayRequest {
    ReplayRequest {
        topic: h.config.topics.login.clone(),
        group: h.config.kafka.group_id.clone(),
        from: ReplayFrom::Beginning,
        reprocess,
        dry_run,
    }
}

/// A bug corrupted derived state; after the fix, `replay --reprocess` re-derives it from
/// the events, and no result event is announced twice. (On the real broker process:
/// librdkafka's mock coordinator cannot describe groups.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_after_a_simulated_bug_rederives_state_and_announces_nothing_twice() {
    let Some(mut h) = Harness::on_real_broker(|_| {}).await else {
        return;
    };
    h.start().await;
    for i in 0..10 {
        h.produce(
            &format!("p:u{}", i % 5),
            &login(
                &format!("r-{i}"),
                &format!("2026-05-01T10:00:{i:02}Z"),
                json!({"provider": "p", "subject": format!("u{}", i % 5), "displayName": format!("Name {}", i % 5)}),
            ),
        )
        .await;
    }
    h.wait_handled(10).await;
    h.wait_published().await;
    h.stop().await;
    let outbox_before = h.db.count("SELECT count(*) FROM outbox_emitted").await;
    assert_eq!(outbox_before, 15, "10 synced + 5 signed_up");

    // The "bug": derived state went wrong.
    sqlx::raw_sql("UPDATE users SET auth_display_name = 'BUG'")
        .execute(&h.db.pool)
        .await
        .expect("corrupt");

    // A dry run changes nothing.
    let dry = replay_after_stop(&h, &replay_request(&h, true, true)).await;
    assert!(!dry.applied);
    assert_eq!(dry.plans.iter().map(|p| p.rereads()).sum::<i64>(), 10);
    assert_eq!(h.db.count("SELECT count(*) FROM inbox").await, 10);
    assert!(replay::render(&replay_request(&h, true, true), &dry).contains("nothing was changed"));

    let done = replay_after_stop(&h, &replay_request(&h, true, false)).await;
    assert!(done.applied);
    assert_eq!(done.inbox_rows_deleted, 10);
    h.start().await;
    h.wait_handled(10).await;
    h.wait_published().await;
    h.stop().await;
    assert_eq!(
        h.db.count("SELECT count(*) FROM users WHERE auth_display_name = 'BUG'")
            .await,
        0,
        "state re-derived from the events"
    );
    assert_eq!(
        h.db.count("SELECT count(*) FROM outbox_emitted").await,
        outbox_before,
        "no new result ids"
    );

    // A plain replay (no --reprocess): everything is a duplicate.
    replay_after_stop(&h, &replay_request(&h, false, false)).await;
    h.start().await;
    wait_for("10 duplicates", || async {
        h.worker()
            .metrics
            .duplicates
            .with_label_values(&[&h.config.topics.login])
            .get()
            == 10
    })
    .await;
    h.stop().await;
    let out = h.outputs(15).await;
    assert_eq!(out.len(), 15, "each result event published once");
    let mut ids: Vec<String> = out.iter().map(|o| o.json()["id"].to_string()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 15);
}

/// Waits until the worker's group committed `n` login offsets in all.
async fn wait_committed(h: &Harness, n: i64) {
    let plan_only = replay_request(h, false, true);
    wait_for(&format!("{n} committed offsets"), || async {
        let plan = replay_lane::run(
            &h.config,
            &h.db.pool,
            &plan_only,
            &LaneOptions::default(),
            CancellationToken::new(),
        )
        .await
        .expect("dry run");
        plan.plans
            .iter()
            .map(|p| p.current.unwrap_or(p.new) - p.new)
            .sum::<i64>()
            == n
    })
    .await;
}

/// `replay --online` beside a running worker: the worker's group is not moved (live
/// logins go on, and none is read twice), `--reprocess` re-derives corrupted state and
/// re-dead-letters a poison message under its old id (nothing announced twice), a plain
/// online replay finds every login applied, and a second lane of the same topic is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_replay_runs_beside_the_workers_and_announces_nothing_twice() {
    let mut h = Harness::new().await;
    h.start().await;
    for i in 0..10 {
        h.produce(
            &format!("p:u{}", i % 5),
            &login(
                &format!("r-{i}"),
                &format!("2026-05-01T10:00:{i:02}Z"),
                json!({"provider": "p", "subject": format!("u{}", i % 5), "displayName": format!("Name {}", i % 5)}),
            ),
        )
        .await;
    }
    h.produce("p:junk", b"not json at all").await;
    h.wait_handled(11).await;
    h.wait_published().await;
    let emitted_before = h.db.count("SELECT count(*) FROM outbox_emitted").await;
    assert_eq!(
        emitted_before, 16,
        "10 synced + 5 signed_up + 1 dead letter"
    );
    // The lane reads up to the group's committed offsets: wait for the worker's commits.
    wait_committed(&h, 11).await;
    // Live logins keep coming while the lane runs.
    let live = async {
        for i in 0..5 {
            h.produce(
                &format!("p:live{i}"),
                &login(
                    &format!("live-{i}"),
                    "2026-05-01T11:00:00Z",
                    json!({"provider": "p", "subject": format!("live{i}")}),
                ),
            )
            .await;
        }
    };
    let mut request = replay_request(&h, true, false);
    let unpaced = LaneOptions::default();
    let lane = replay_lane::run(
        &h.config,
        &h.db.pool,
        &request,
        &unpaced,
        CancellationToken::new(),
    );
    let (done, ()) = tokio::join!(lane, live);
    let done = done.expect("online replay");
    assert_eq!(
        done.read.values().sum::<u64>(),
        11,
        "the range the group had read"
    );
    assert_eq!(done.inbox_rows_deleted, 11);
    assert_eq!(done.report.applied, 10);
    assert_eq!(done.report.dead_lettered_total(), 1, "the poison again");
    assert!(done.interrupted.is_none());
    h.wait_handled(16).await;
    h.wait_published().await;
    assert_eq!(
        h.db.count("SELECT count(*) FROM users WHERE auth_display_name = 'BUG'")
            .await,
        0,
        "state re-derived from the events"
    );
    assert_eq!(
        h.db.count("SELECT count(*) FROM outbox_emitted").await,
        emitted_before + 10,
        "only the live logins' results are new (5 synced + 5 signed_up)"
    );
    let handled = |h: &Harness| {
        h.worker()
            .metrics
            .consumed
            .with_label_values(&[&h.config.topics.login])
            .get()
    };
    assert_eq!(handled(&h), 16, "the worker read nothing twice");

    // A plain online replay: everything it reads was applied.
    wait_committed(&h, 16).await;
    request.reprocess = false;
    let plain = replay_lane::run(
        &h.config,
        &h.db.pool,
        &request,
        &LaneOptions {
            max_rate: Some(1_000),
        },
        CancellationToken::new(),
    )
    .await
    .expect("plain online replay");
    assert_eq!(plain.read.values().sum::<u64>(), 16);
    // A dead-lettered event may be claimed again (that is how a redrive works): the poison
    // is dead-lettered again under the same id, which the outbox does not publish twice.
    assert_eq!(plain.report.duplicates, 15, "{:?}", plain.report);
    assert_eq!(plain.report.dead_lettered_total(), 1);
    assert_eq!(plain.report.applied, 0);
    assert!(replay_lane::render(&request, &plain).contains("already applied 15"));

    // One lane per group and topic.
    let mut holder = h.db.pool.acquire().await.expect("connection");
    let key = format!(
        "authsync-replay:{}:{}",
        h.config.kafka.group_id, h.config.topics.login
    );
    sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
        .bind(&key)
        .execute(&mut *holder)
        .await
        .expect("lock");
    let refused = replay_lane::run(
        &h.config,
        &h.db.pool,
        &request,
        &LaneOptions::default(),
        CancellationToken::new(),
    )
    .await
    .expect_err("a second lane")
    .to_string();
    assert!(refused.contains("another online replay"), "{refused}");
    drop(holder);

    h.produce(
        "p:after",
        &login(
            "after",
            "2026-05-01T12:00:00Z",
            json!({"provider": "p", "subject": "after"}),
        ),
    )
    .await;
    h.wait_handled(17).await;
    h.stop().await;
    let out = h.outputs(28).await;
    let letters = out.iter().filter(|o| o.topic.ends_with(".dlq")).count();
    assert_eq!(letters, 1, "the poison's dead letter, once");
    let mut ids: Vec<String> = out
        .iter()
        .filter(|o| !o.topic.ends_with(".dlq"))
        .map(|o| o.json()["id"].to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        (out.len(), ids.len()),
        (28, 27),
        "each result event published once"
    );
}

/// An online replay stopped by a signal says where to resume; resuming there reads the
/// rest, and nothing twice. A topic the worker does not consume is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_replay_stopped_by_a_signal_resumes_where_it_stopped() {
    let mut h = Harness::new().await;
    h.start().await;
    for i in 0..300 {
        h.produce(
            &format!("p:s{}", i % 30),
            &login(
                &format!("s-{i}"),
                "2026-05-01T10:00:00Z",
                json!({"provider": "p", "subject": format!("s{}", i % 30)}),
            ),
        )
        .await;
    }
    h.wait_handled(300).await;
    wait_committed(&h, 300).await;

    let mut request = replay_request(&h, false, false);
    let stop = CancellationToken::new();
    let stopper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
            stop.cancel();
        })
    };
    // 100 events/s: about 3 s for the whole range, stopped after 1.5 s.
    let first = replay_lane::run(
        &h.config,
        &h.db.pool,
        &request,
        &LaneOptions {
            max_rate: Some(100),
        },
        stop,
    )
    .await
    .expect("first part");
    stopper.await.expect("stopper");
    let resume = first.interrupted.clone().expect("interrupted");
    let first_read: u64 = first.read.values().sum();
    assert!(first_read > 0 && first_read < 300, "read {first_read}");
    let rendered = replay_lane::render(&request, &first);
    assert!(
        rendered.contains("resume with --online --from-offset"),
        "{rendered}"
    );

    request.from = ReplayFrom::Offsets(resume.into_iter().collect());
    let rest = replay_lane::run(
        &h.config,
        &h.db.pool,
        &request,
        &LaneOptions::default(),
        CancellationToken::new(),
    )
    .await
    .expect("the rest");
    assert!(rest.interrupted.is_none());
    assert_eq!(first_read + rest.read.values().sum::<u64>(), 300);
    assert_eq!(first.report.duplicates + rest.report.duplicates, 300);

    request.topic = "some.other.topic".into();
    let refused = replay_lane::run(
        &h.config,
        &h.db.pool,
        &request,
        &LaneOptions::default(),
        CancellationToken::new(),
    )
    .await
    .expect_err("not an input topic")
    .to_string();
    assert!(
        refused.contains("some.other.topic") && refused.contains("topics.login"),
        "{refused}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_refuses_while_the_group_has_live_members() {
    let Some(mut h) = Harness::on_real_broker(|_| {}).await else {
        return;
    };
    h.start().await;
    h.produce(
        "p:x",
        &login(
            "x",
            "2026-05-01T10:00:00Z",
            json!({"provider": "p", "subject": "x"}),
        ),
    )
    .await;
    h.wait_handled(1).await;
    wait_for("assignment", || async {
        h.worker()
            .metrics
            .partitions_assigned
            .with_label_values(&[&h.config.topics.login])
            .get()
            > 0
    })
    .await;
    let err = replay::run(&h.config, &h.db.pool, &replay_request(&h, false, false))
        .await
        .expect_err("refused")
        .to_string();
    h.stop().await;
    assert!(err.contains("live workers"), "{err}");
    assert!(err.contains("Stop the workers"), "{err}");
}

/// Poison dead-lettered, the cause fixed (here: the size limit raised), redrive: the
/// letter is applied once; a second redrive sends nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_after_the_fix_applies_each_letter_once() {
    let mut h = Harness::with(|c| c.consumer.max_message_bytes = 4096).await;
    h.start().await;
    let big = login(
        "big-one",
        "2026-05-01T10:00:00Z",
        // Large but valid (unknown fields are ignored): only the size limit rejects it.
        json!({"provider": "p", "subject": "big", "padding": "x".repeat(5000)}),
    );
    h.produce_with("p:big", &big, None, &[("trace-id", b"t-1")])
        .await;
    h.produce("p:junk", b"not json at all").await;
    h.wait_handled(2).await;
    h.wait_published().await;
    h.stop().await;

    let dlq_topic = h.config.topics.dlq_for(&h.config.topics.login);
    let letters = dlq::read_all(&h.config, &dlq_topic, None).expect("read");
    assert_eq!(letters.len(), 2);
    let summary = dlq::render_summary(&dlq_topic, &letters);
    assert!(
        summary.contains("too_large") && summary.contains("not_json"),
        "{summary}"
    );

    // The fix.
    h.config.consumer.max_message_bytes = 1 << 20;
    h.start().await;
    let request = RedriveRequest {
        topic: dlq_topic.clone(),
        filter_class: Some("too_large".into()),
        limit: None,
        dry_run: false,
    };
    let first = dlq::redrive(&h.config, &h.db.pool, &request, false)
        .await
        .expect("redrive");
    assert_eq!(first.redriven.get("too_large"), Some(&1));
    assert_eq!(first.skipped_filtered, 1);
    wait_for("redriven login applied", || async {
        h.db.count("SELECT count(*) FROM users").await == 1
    })
    .await;
    let again = dlq::redrive(&h.config, &h.db.pool, &request, false)
        .await
        .expect("redrive again");
    assert!(again.redriven.is_empty(), "nothing redriven twice");
    assert_eq!(again.skipped_already_redriven, 1);
    h.wait_published().await;
    h.stop().await;
    assert_eq!(
        h.db.count("SELECT count(*) FROM outbox_emitted WHERE event_type = 'user.synced'")
            .await,
        1
    );
    let out = read_topics(&h.config.kafka.brokers, &[h.config.topics.login.clone()], 3).await;
    let redriven: Vec<&Output> = out
        .iter()
        .filter(|o| !o.header("authsync-redriven-from").is_empty())
        .collect();
    assert_eq!(redriven.len(), 1);
    assert_eq!(
        redriven[0].key.as_deref(),
        Some(&b"p:big"[..]),
        "original key"
    );
    assert_eq!(redriven[0].header("trace-id"), "t-1", "original headers");
    assert!(redriven[0].header("authsync-error-class").is_empty());
    assert_eq!(redriven[0].value, big);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_status_shows_backlog_and_the_relay_leader() {
    let h = Harness::new().await;
    let mut conn = h.db.pool.acquire().await.expect("conn");
    authsync::store::outbox::insert(
        &mut conn,
        &[authsync::store::outbox::NewMessage {
            event_id: uuid::Uuid::new_v4(),
            topic: h.config.topics.user_events.clone(),
            key: None,
            event_type: "test".into(),
            payload: Some(b"{}".to_vec()),
            headers: vec![],
        }],
    )
    .await
    .expect("insert");
    drop(conn);
    let before = outbox::status(&h.db.pool).await.expect("status");
    assert_eq!(before.backlog.unpublished, 1);
    assert!(before.leader.is_none());
    assert!(outbox::render(&before).contains("NONE"));

    let shutdown = CancellationToken::new();
    let task = {
        let (config, pool, token) = (h.config.clone(), h.db.pool.clone(), shutdown.clone());
        tokio::spawn(async move {
            relay::run(&config, pool, Metrics::new(), Default::default(), token).await
        })
    };
    h.wait_published().await;
    let after = outbox::status(&h.db.pool).await.expect("status");
    shutdown.cancel();
    task.await.expect("join").expect("relay");
    assert_eq!(after.backlog.unpublished, 0);
    assert_eq!(after.emitted_remembered, 1);
    let leader = after.leader.expect("a leader");
    assert_eq!(leader.application_name, "authsync");
}

/// Runs `authsync dev --demo` against `database_url` until the demo is done; its output.
fn run_dev_demo(database_url: &str) -> Vec<String> {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_authsync"))
        .args(["dev", "--demo"])
        .env("AUTHSYNC_DATABASE_URL", database_url)
        .env("AUTHSYNC_HTTP_LISTEN", "127.0.0.1:0")
        .env("AUTHSYNC_INGEST_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start authsync dev");
    let stdout = child.stdout.take().expect("stdout");
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut output = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        let Ok(line) = received.recv_timeout(left) else {
            break;
        };
        let done = line.starts_with("demo: done") || line.contains("timed out");
        output.push(line);
        if done {
            break;
        }
    }
    child.kill().ok();
    child.wait().ok();
    output
}

/// `authsync dev --demo` shows every result of its sample logins, and a second run on the
/// same dev database (its embedded broker new, its offsets back at 0) shows its own
/// results too, the malformed message's dead letter included, instead of taking it for a
/// duplicate of the first run's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_demo_shows_every_result_on_every_run() {
    let db = TestDb::new().await;
    let count = |output: &[String], what: &str| {
        let what = format!("demo: {what}");
        output.iter().filter(|l| l.starts_with(&what)).count()
    };
    let first = tokio::task::spawn_blocking({
        let url = db.url.clone();
        move || run_dev_demo(&url)
    })
    .await
    .expect("first run");
    assert!(
        first.iter().any(|l| l.starts_with("demo: done")),
        "{first:#?}"
    );
    assert_eq!(count(&first, "user.synced"), 3, "{first:#?}");
    assert_eq!(
        count(&first, "user.signed_up"),
        2,
        "alice and bob: {first:#?}"
    );
    assert_eq!(count(&first, "dead letter"), 1, "{first:#?}");

    let second = tokio::task::spawn_blocking({
        let url = db.url.clone();
        move || run_dev_demo(&url)
    })
    .await
    .expect("second run");
    assert!(
        second.iter().any(|l| l.starts_with("demo: done")),
        "{second:#?}"
    );
    assert_eq!(count(&second, "user.synced"), 3, "{second:#?}");
    assert_eq!(
        count(&second, "user.signed_up"),
        0,
        "they exist: {second:#?}"
    );
    assert_eq!(count(&second, "dead letter"), 1, "{second:#?}");
}
