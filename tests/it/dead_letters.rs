//! Bad input: each error class is dead-lettered with its original key, value and headers
//! plus the `authsync-error-*` headers, and the partition keeps moving.

use serde_json::json;

use crate::helpers::*;

/// Sends `bad` then a good login on the same partition; asserts the dead letter and that
/// the good one was applied after it.
async fn assert_dead_lettered(bad: &[u8], class: &str, reason_contains: &str) {
    let mut h = Harness::with(|c| c.consumer.max_message_bytes = 4096).await;
    h.start().await;
    h.produce_with("k:bad", bad, Some(0), &[("trace-id", b"abc123")])
        .await;
    let good = login(
        "good-after-bad",
        "2026-05-01T10:00:00Z",
        json!({"provider": "p", "subject": "after"}),
    );
    h.produce_with("k:good", &good, Some(0), &[]).await;
    h.wait_handled(2).await;
    let out = h.outputs(3).await;
    h.stop().await;

    let dlq_topic = h.config.topics.dlq_for(&h.config.topics.login);
    let letters: Vec<&Output> = out.iter().filter(|o| o.topic == dlq_topic).collect();
    assert_eq!(letters.len(), 1, "exactly one dead letter");
    let letter = letters[0];
    assert_eq!(letter.key.as_deref(), Some(&b"k:bad"[..]), "original key");
    assert_eq!(letter.value, bad, "original bytes, untouched");
    assert_eq!(letter.header("trace-id"), "abc123", "original headers kept");
    assert_eq!(letter.header("authsync-error-class"), class);
    let reason = letter.header("authsync-error-reason");
    assert!(
        reason.contains(reason_contains),
        "reason {reason:?} should mention {reason_contains:?}"
    );
    assert_eq!(
        letter.header("authsync-original-topic"),
        h.config.topics.login
    );
    assert_eq!(letter.header("authsync-original-partition"), "0");
    assert_eq!(letter.header("authsync-original-offset"), "0");
    assert!(
        out.iter().any(|o| o.event_type() == "user.synced"),
        "the message after the bad one was applied"
    );
    assert_eq!(
        h.db.count("SELECT count(*) FROM inbox WHERE outcome = 'dead_lettered'")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_value_is_dead_lettered() {
    let big = login(
        "big",
        "2026-05-01T10:00:00Z",
        json!({"provider": "p", "subject": "s", "displayName": "x".repeat(5000)}),
    );
    assert_dead_lettered(&big, "too_large", "limit is 4096").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_json_value_is_dead_lettered() {
    assert_dead_lettered(b"\x00\x01 definitely not json", "not_json", "not JSON").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_that_is_not_a_cloudevent_nor_a_provider_payload_is_dead_lettered() {
    // On the login topic JSON may be a provider's native payload; one no adapter
    // recognises is `unknown_payload`, and the reason still says what the envelope lacked.
    assert_dead_lettered(
        br#"{"provider":"p","subject":"s"}"#,
        "unknown_payload",
        "specversion",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevent_of_wrong_type_is_dead_lettered() {
    // A CloudEvent whose type names no provider adapter keeps its precise class.
    let wrong = serde_json::to_vec(&json!({"specversion": "1.0", "id": "w", "source": "s",
        "type": "auth.logout", "time": "2026-05-01T10:00:00Z", "data": {}}))
    .expect("json");
    assert_dead_lettered(&wrong, "wrong_type", "auth.logout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_without_subject_is_dead_lettered() {
    let missing = login("m", "2026-05-01T10:00:00Z", json!({"provider": "p"}));
    assert_dead_lettered(&missing, "missing_field", "data.subject").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_without_provider_is_dead_lettered() {
    let missing = login("m", "2026-05-01T10:00:00Z", json!({"subject": "s"}));
    assert_dead_lettered(&missing, "missing_field", "data.provider").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mistyped_field_is_dead_lettered() {
    let mistyped = login(
        "t",
        "2026-05-01T10:00:00Z",
        json!({"provider": "p", "subject": "s", "isEmailVerified": "yes"}),
    );
    assert_dead_lettered(&mistyped, "invalid_field", "data.isEmailVerified").await;
}

/// A value Postgres refuses (a NUL character in text) poisons the batch's transaction:
/// the batch is re-run one savepoint per message, the poison alone is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_the_database_rejects_rolls_back_alone() {
    let mut h = Harness::with(|c| {
        c.consumer.batch_size = 50;
        c.consumer.batch_linger_ms = 500;
    })
    .await;
    // Produce first, then start: the whole partition arrives as one batch.
    for i in 0..5 {
        let name = if i == 2 {
            "nul\u{0000}byte".to_string()
        } else {
            format!("n{i}")
        };
        h.produce_with(
            &format!("p:s{i}"),
            &login(
                &format!("b{i}"),
                "2026-05-01T10:00:00Z",
                json!({"provider": "p", "subject": format!("s{i}"), "displayName": name}),
            ),
            Some(0),
            &[],
        )
        .await;
    }
    h.start().await;
    h.wait_handled(5).await;
    let out = h.outputs(9).await;
    // The worker counts the isolated run just after its commit, which the test can see
    // first: wait for the count instead of reading it once.
    let metrics = h.worker().metrics.clone();
    wait_for("the isolated batch is counted", || {
        let metrics = metrics.clone();
        async move { metrics.isolated_batches.get() >= 1 }
    })
    .await;
    h.stop().await;
    assert_eq!(h.db.count("SELECT count(*) FROM users").await, 4);
    let letters: Vec<&Output> = out.iter().filter(|o| o.topic.ends_with(".dlq")).collect();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].header("authsync-error-class"), "unprocessable");
    assert_eq!(letters[0].key.as_deref(), Some(&b"p:s2"[..]));
}

/// Group commit: with one slot, the batches of partitions that are ready together share a
/// transaction. A value Postgres refuses in such a transaction sends every batch back to be
/// applied on its own: the poison alone is dead-lettered, every other login is applied,
/// and each user ends with its last login's name (order per key holds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_batches_keep_their_order_and_a_poison_stays_alone() {
    let mut h = Harness::with(|c| {
        c.consumer.max_batches_in_flight = 1;
        c.consumer.batch_size = 100;
    })
    .await;
    // Produced before the start: every partition has batches ready at once.
    for p in 0..PARTITIONS {
        for round in 0..3 {
            for u in 0..4 {
                let subject = format!("p{p}u{u}");
                // The last round: a batch folds a user's logins, so an earlier poisoned
                // name would be overwritten before it reached Postgres.
                let name = if (p, round, u) == (1, 2, 2) {
                    "nul\u{0000}byte".to_string()
                } else {
                    format!("{subject}-r{round}")
                };
                h.produce_with(
                    &format!("p:{subject}"),
                    &login(
                        &format!("e-{subject}-{round}"),
                        &format!("2026-05-01T10:0{round}:00Z"),
                        json!({"provider": "p", "subject": subject, "displayName": name}),
                    ),
                    Some(p),
                    &[],
                )
                .await;
            }
        }
    }
    h.start().await;
    let total = i64::from(PARTITIONS * 12);
    h.wait_handled(total).await;
    let metrics = h.worker().metrics.clone();
    let topic = h.config.topics.login.clone();
    wait_for("the poison is counted", || {
        let (metrics, topic) = (metrics.clone(), topic.clone());
        async move {
            metrics
                .dead_lettered
                .with_label_values(&[&topic, "unprocessable"])
                .get()
                >= 1
        }
    })
    .await;
    h.stop().await;
    assert_eq!(
        metrics
            .dead_lettered
            .with_label_values(&[&topic, "unprocessable"])
            .get(),
        1,
        "only the poison"
    );
    let users = 4 * PARTITIONS as i64;
    assert_eq!(h.db.count("SELECT count(*) FROM users").await, users);
    assert_eq!(
        h.db.count("SELECT count(*) FROM users WHERE auth_display_name LIKE '%-r2'")
            .await,
        users - 1,
        "each user has its last login's name"
    );
    assert_eq!(
        h.db.count("SELECT count(*) FROM users WHERE auth_display_name = 'p1u2-r1'")
            .await,
        1,
        "the poisoned user keeps the name of its last login that was applied"
    );
    assert!(
        metrics.transaction_messages.get_sample_count() < metrics.batch_size.get_sample_count(),
        "batches shared transactions: {} transactions for {} batches",
        metrics.transaction_messages.get_sample_count(),
        metrics.batch_size.get_sample_count()
    );
}
