//! Hostile and malformed input, and results the broker refuses: no single message or row
//! stops a partition or the relay, and nothing is lost (issue 17's regression tests).

use std::time::Duration;

use authsync::store::outbox::{self, NewMessage};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use serde_json::json;

use crate::helpers::*;

fn good_login(id: &str, subject: &str) -> Vec<u8> {
    login(
        id,
        "2026-05-01T10:00:00Z",
        json!({"provider": "p", "subject": subject}),
    )
}

fn dead_letters<'a>(h: &Harness, out: &'a [Output]) -> Vec<&'a Output> {
    let dlq = h.config.topics.dlq_for(&h.config.topics.login);
    out.iter().filter(|o| o.topic == dlq).collect()
}

fn header_bytes<'a>(o: &'a Output, name: &str) -> Option<&'a [u8]> {
    o.header_list
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_slice())
}

/// Was: the dead letter's headers went into jsonb as "\u0000", Postgres refused them, and
/// the partition retried the batch for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_and_binary_header_values_reach_the_dead_letter_byte_for_byte() {
    let mut h = Harness::new().await;
    h.start().await;
    h.produce_with(
        "k:bad",
        b"{ not json",
        Some(0),
        &[
            ("x-trace", &[0x00, 0x01]),
            ("bin", &[0xff, 0xfe, 0x00]),
            ("authsync-provider", b"okta"),
            // A forged metadata header is replaced, not carried.
            ("authsync-error-class", b"forged"),
        ],
    )
    .await;
    h.produce_with("k:good", &good_login("after-nul", "s1"), Some(0), &[])
        .await;
    h.wait_handled(2).await;
    let out = h.outputs(3).await;
    h.stop().await;

    let letters = dead_letters(&h, &out);
    assert_eq!(letters.len(), 1);
    let letter = letters[0];
    assert_eq!(header_bytes(letter, "x-trace"), Some(&[0x00, 0x01][..]));
    assert_eq!(header_bytes(letter, "bin"), Some(&[0xff, 0xfe, 0x00][..]));
    assert_eq!(
        header_bytes(letter, "authsync-provider"),
        Some(&b"okta"[..]),
        "authsync-provider travels with the dead letter (a redrive decodes the same way)"
    );
    let classes: Vec<_> = letter
        .header_list
        .iter()
        .filter(|(k, _)| k == "authsync-error-class")
        .map(|(_, v)| v.clone())
        .collect();
    assert_eq!(classes, vec![b"not_json".to_vec()], "one class, ours");
    assert!(out.iter().any(|o| o.event_type() == "user.synced"));
}

/// rdkafka's safe header accessor panics on a header name that is not UTF-8; a panic would
/// have killed the partition's task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_name_that_is_not_utf8_does_not_stop_the_partition() {
    let mut h = Harness::new().await;
    h.start().await;
    let headers = OwnedHeaders::new().insert(Header {
        key: "ok",
        value: Some(&b"1"[..]),
    });
    let name = [b'x', 0xff, b'y'];
    let value = [0u8, 1, 2];
    // SAFETY: `as_borrowed` is the header list's native pointer (rdkafka's BorrowedHeaders is
    // a view of it); the name and value are copied by librdkafka.
    unsafe {
        let native = headers.as_borrowed() as *const rdkafka::message::BorrowedHeaders
            as *mut rdkafka::bindings::rd_kafka_headers_t;
        rdkafka::bindings::rd_kafka_header_add(
            native,
            name.as_ptr().cast(),
            name.len() as isize,
            value.as_ptr().cast(),
            value.len() as isize,
        );
    }
    let body = good_login("odd-header", "s-odd");
    let producer = producer(&h.config.kafka.brokers);
    producer
        .send(
            FutureRecord::to(&h.config.topics.login)
                .key("k")
                .payload(&body)
                .partition(0)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
    h.produce_with("k", &good_login("after-odd", "s-after"), Some(0), &[])
        .await;
    h.wait_handled(2).await;
    let out = h.outputs(2).await;
    h.stop().await;
    let synced = out
        .iter()
        .filter(|o| o.event_type() == "user.synced")
        .count();
    assert_eq!(synced, 2, "both logins applied");
}

/// A null value stays null on its dead letter, and keeps its headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tombstone_is_dead_lettered_as_a_tombstone() {
    let mut h = Harness::new().await;
    h.start().await;
    let producer = producer(&h.config.kafka.brokers);
    producer
        .send(
            FutureRecord::<str, [u8]>::to(&h.config.topics.login)
                .key("k:tomb")
                .partition(0)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "authsync-provider",
                    value: Some(&b"okta"[..]),
                })),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
    h.produce_with("k", &good_login("after-tomb", "s2"), Some(0), &[])
        .await;
    h.wait_handled(2).await;
    let out = h.outputs(3).await;
    h.stop().await;
    let letters = dead_letters(&h, &out);
    assert_eq!(letters.len(), 1);
    assert!(letters[0].null_value, "null stays null");
    assert_eq!(letters[0].key.as_deref(), Some(&b"k:tomb"[..]));
    assert_eq!(letters[0].header("authsync-provider"), "okta");
}

/// An event id with a NUL cannot be stored as text: refused at the edge, and the partition
/// moves on. A login dated far in the future is refused too, so it cannot freeze its user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_event_ids_and_future_times_are_dead_lettered_as_invalid_fields() {
    let mut h = Harness::new().await;
    h.start().await;
    h.produce_with("k", &good_login("nul\u{0}id", "s3"), Some(0), &[])
        .await;
    let future = login(
        "from-2999",
        "2999-01-01T00:00:00Z",
        json!({"provider": "p", "subject": "s3", "displayName": "Future"}),
    );
    h.produce_with("k", &future, Some(0), &[]).await;
    let now = chrono::Utc::now().to_rfc3339();
    let real = login(
        "real-now",
        &now,
        json!({"provider": "p", "subject": "s3", "displayName": "Real"}),
    );
    h.produce_with("k", &real, Some(0), &[]).await;
    h.wait_handled(3).await;
    let out = h.outputs(3).await;
    h.stop().await;
    let letters = dead_letters(&h, &out);
    assert_eq!(letters.len(), 2, "both refused");
    for l in &letters {
        assert_eq!(l.header("authsync-error-class"), "invalid_field");
    }
    assert!(letters
        .iter()
        .any(|l| l.header("authsync-error-reason").contains("max_clock_skew")));
    assert!(letters.iter().any(|l| l
        .header("authsync-error-reason")
        .contains("control character")));
    let name: String = sqlx::query_scalar("SELECT display_name FROM users")
        .fetch_one(&h.db.pool)
        .await
        .expect("one user");
    assert_eq!(
        name, "Real",
        "the real login applied; the future one did not freeze it"
    );
}

/// A dead letter the producer could not send keeps its original in Postgres and goes out
/// as its metadata plus a reference; `dlq show` and redrive get the original back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_over_the_producer_limit_keeps_its_original_in_postgres() {
    let mut h = Harness::with(|c| {
        c.consumer.max_message_bytes = 40_000;
        c.relay.message_max_bytes = 60_000;
    })
    .await;
    h.start().await;
    // 2 MB: over the consumer's limit (too_large) and far over the producer's.
    let huge = vec![b'x'; 2 * 1024 * 1024];
    let big_producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &h.config.kafka.brokers)
        .set("message.max.bytes", "10000000")
        .create()
        .expect("producer");
    produce_to(
        &big_producer,
        &h.config.topics.login,
        "k:huge",
        &huge,
        Some(0),
        &[("trace", b"t-1")],
    )
    .await;
    // Just under the consumer's limit, but its headers take it over the producer's.
    let mut under = good_login("under-limit", "s4");
    under.truncate(under.len() - 1); // not JSON any more
    under.extend(std::iter::repeat_n(b' ', 39_000 - under.len()));
    let fat_header = vec![b'h'; 30_000];
    produce_to(
        &big_producer,
        &h.config.topics.login,
        "k:under",
        &under,
        Some(0),
        &[("fat", &fat_header)],
    )
    .await;
    h.produce_with("k", &good_login("after-big", "s5"), Some(0), &[])
        .await;
    h.wait_handled(3).await;
    let out = h.outputs(3).await;
    let letters = dead_letters(&h, &out);
    assert_eq!(letters.len(), 2, "{letters:?}");
    for letter in &letters {
        assert!(letter.null_value, "no value on the wire");
        let reference = letter.header("authsync-dlq-body-ref");
        assert!(!reference.is_empty(), "a reference to the stored original");
        let dl = authsync::ops::dlq::DeadLetter {
            partition: letter.partition,
            offset: letter.offset,
            key: letter.key.clone(),
            value: None,
            headers: letter.header_list.clone(),
        };
        let original = authsync::ops::dlq::original_of(&h.db.pool, &dl)
            .await
            .expect("original");
        if letter.key.as_deref() == Some(&b"k:huge"[..]) {
            assert_eq!(letter.header("authsync-error-class"), "too_large");
            assert_eq!(original.payload.as_deref(), Some(&huge[..]));
            assert!(original
                .headers
                .contains(&("trace".into(), b"t-1".to_vec())));
        } else {
            assert_eq!(original.payload.as_deref(), Some(&under[..]));
            assert!(original
                .headers
                .contains(&("fat".into(), fat_header.clone())));
        }
    }
    let dlq = h.config.topics.dlq_for(&h.config.topics.login);
    let shown = authsync::ops::dlq::show(
        &h.config,
        &h.db.pool,
        &dlq,
        letters[0].partition,
        letters[0].offset,
    )
    .await
    .expect("dlq show");
    assert!(shown.contains("dead_letter_bodies"), "{shown}");
    assert!(out.iter().any(|o| o.event_type() == "user.synced"));
    assert_eq!(h.db.count("SELECT count(*) FROM outbox_parked").await, 0);
    h.stop().await;
}

/// A row the broker (here: the producer) refuses for good is parked; rows behind it, the
/// same key's included, are published; an operator can put it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_producer_refuses_is_parked_and_does_not_block_the_rest() {
    let mut h = Harness::new().await;
    let topic = h.config.topics.user_events.clone();
    let row = |n: usize, size: usize| NewMessage {
        event_id: uuid::Uuid::new_v4(),
        topic: topic.clone(),
        key: Some(b"same-key".to_vec()),
        event_type: "test".into(),
        payload: Some(vec![b'a' + (n as u8); size]),
        headers: vec![("n".into(), n.to_string().into_bytes())],
    };
    let rows = vec![row(0, 10), row(1, 2_000_000), row(2, 10)];
    let mut conn = h.db.pool.acquire().await.expect("conn");
    outbox::insert(&mut conn, &rows).await.expect("insert");
    drop(conn);
    h.start().await;
    wait_for("rows published or parked", || async {
        h.db.count("SELECT count(*) FROM outbox").await == 0
    })
    .await;
    let out = read_topics(&h.config.kafka.brokers, std::slice::from_ref(&topic), 2).await;
    let ns: Vec<String> = out.iter().map(|o| o.header("n")).collect();
    assert_eq!(ns, vec!["0", "2"], "the refused row does not hold the rest");
    let parked = outbox::parked(&h.db.pool, 10).await.expect("parked");
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].event_id, rows[1].event_id);
    assert!(
        parked[0].error.to_lowercase().contains("size") || parked[0].error.contains("large"),
        "{}",
        parked[0].error
    );
    let metrics = http_get(h.worker().http_addr, "/metrics").await.1;
    assert!(
        metrics.contains("authsync_relay_parked_total 1"),
        "{metrics}"
    );
    // Retry puts it back at the end of the outbox; still too large, it is parked again.
    assert_eq!(
        outbox::retry_parked(&h.db.pool, None).await.expect("retry"),
        1
    );
    wait_for("parked again", || async {
        h.db.count("SELECT count(*) FROM outbox_parked").await == 1
            && h.db.count("SELECT count(*) FROM outbox").await == 0
    })
    .await;
    h.stop().await;
}

/// Every part of the contract at once: a message whose dead letter the database refuses
/// (a trigger stands in for any such refusal) ends in a last-resort `internal` dead letter,
/// and every other message of its batch is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_dead_letter_is_refused_ends_in_a_last_resort_letter() {
    let mut h = Harness::with(|c| c.consumer.batch_linger_ms = 300).await;
    sqlx::raw_sql(
        r#"CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             IF NEW.event_type = 'dead_letter' AND position('poison'::bytea in coalesce(NEW.payload, ''::bytea)) > 0
                AND position('internal'::bytea in NEW.header_bytes) = 0 THEN
               RAISE EXCEPTION 'refused by the test' USING ERRCODE = '22023';
             END IF;
             RETURN NEW;
           END $$;
           CREATE TRIGGER refuse_poison BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION refuse_poison();"#,
    )
    .execute(&h.db.pool)
    .await
    .expect("trigger");
    h.start().await;
    h.produce_with("k", &good_login("before-poison", "s6"), Some(0), &[])
        .await;
    h.produce_with("k", b"poison, not json", Some(0), &[]).await;
    h.produce_with("k", &good_login("after-poison", "s7"), Some(0), &[])
        .await;
    h.wait_handled(3).await;
    let out = h.outputs(3).await;
    let letters = dead_letters(&h, &out);
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].header("authsync-error-class"), "internal");
    assert_eq!(letters[0].value, b"poison, not json");
    assert_eq!(
        out.iter()
            .filter(|o| o.event_type() == "user.synced")
            .count(),
        2
    );
    let metrics = http_get(h.worker().http_addr, "/metrics").await.1;
    assert!(
        metrics.contains(r#"authsync_dead_lettered_total{class="internal""#),
        "{metrics}"
    );
    h.stop().await;
}

/// A partition that keeps failing shows in /readyz and in the gauge, while the others go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_partition_shows_in_readyz_while_the_others_move() {
    let mut h = Harness::with(|c| c.consumer.stalled_after_secs = 2).await;
    // Every claim of merge partition 2 fails with a serialization failure (retryable): the
    // partition retries for ever, as it would behind a lock it can never get.
    sqlx::raw_sql(
        r#"CREATE FUNCTION stuck() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             IF NEW.kafka_partition = 2 AND NEW.topic LIKE 'auth.merge%' THEN
               RAISE EXCEPTION 'stuck by the test' USING ERRCODE = '40001';
             END IF;
             RETURN NEW;
           END $$;
           CREATE TRIGGER stuck BEFORE INSERT ON inbox FOR EACH ROW EXECUTE FUNCTION stuck();"#,
    )
    .execute(&h.db.pool)
    .await
    .expect("trigger");
    h.start().await;
    let addr = h.worker().http_addr;
    wait_for("ready", || async {
        http_get(addr, "/readyz").await.0 == 200
    })
    .await;
    let merge = crate::merge::merge_event("stuck", uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    produce_to(
        &producer(&h.config.kafka.brokers),
        &h.config.topics.merge,
        "m",
        &merge,
        Some(2),
        &[],
    )
    .await;
    wait_for("readyz names the stalled partition", || async {
        let (status, body) = http_get(addr, "/readyz").await;
        status == 503 && body.contains(&format!("{}[2]", h.config.topics.merge))
    })
    .await;
    h.produce_with("k", &good_login("while-stuck", "s8"), Some(0), &[])
        .await;
    h.wait_handled(1).await;
    let metrics = http_get(addr, "/metrics").await.1;
    assert!(
        metrics.contains(&format!(
            r#"authsync_partition_stalled{{partition="2",topic="{}"}} 1"#,
            h.config.topics.merge
        )),
        "{metrics}"
    );
    h.stop().await;
}

/// Results are published while a write transaction is open in another database of the
/// same cluster; one open in this database holds them and is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_transactions_of_this_database_hold_publishing() {
    use sqlx::Connection;
    let mut h = Harness::with(|c| c.relay.held_warn_secs = 1).await;
    let other = TestDb::new().await;
    let mut foreign = sqlx::PgConnection::connect(&other.url)
        .await
        .expect("connect");
    sqlx::raw_sql("CREATE TABLE t (x int); BEGIN; INSERT INTO t VALUES (1);")
        .execute(&mut foreign)
        .await
        .expect("open a write transaction elsewhere");
    h.start().await;
    for i in 0..5 {
        h.produce_with(
            "k",
            &good_login(&format!("fx-{i}"), &format!("fx{i}")),
            None,
            &[],
        )
        .await;
    }
    h.wait_handled(5).await;
    tokio::time::timeout(Duration::from_secs(20), h.wait_published())
        .await
        .expect("published while another database's transaction is open");

    // The same in this database holds results until it ends, and the hold is reported.
    let mut local = sqlx::PgConnection::connect(&h.db.url)
        .await
        .expect("connect");
    sqlx::raw_sql("BEGIN; INSERT INTO maintenance_activities (user_id, activity) VALUES (gen_random_uuid(), 'test');")
        .execute(&mut local)
        .await
        .expect("open a write transaction here");
    h.produce_with("k", &good_login("held-1", "held1"), None, &[])
        .await;
    h.wait_handled(6).await;
    let addr = h.worker().http_addr;
    wait_for("the hold is reported, naming the holder", || async {
        let m = http_get(addr, "/metrics").await.1;
        m.lines().any(|l| {
            l.strip_prefix("authsync_relay_held_seconds ")
                .and_then(|v| v.trim().parse::<i64>().ok())
                .is_some_and(|v| v >= 1)
        }) && m.contains("authsync_relay_holder_seconds{")
    })
    .await;
    assert!(h.db.count("SELECT count(*) FROM outbox").await > 0, "held");
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut local)
        .await
        .expect("end");
    h.wait_published().await;
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut foreign)
        .await
        .expect("end");
    h.stop().await;
}

/// The clean-up deletes everything expired in one run, whatever the backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_every_expired_row_in_one_run() {
    let mut h = Harness::with(|c| {
        c.relay.cleanup_batch_rows = 1_000;
        c.relay.cleanup_interval_secs = 3_600;
    })
    .await;
    sqlx::query(
        "INSERT INTO inbox (consumer_group, event_id, topic, kafka_partition, kafka_offset, outcome, processed_at)
         SELECT $1, 'old-' || g, 't', 0, g, 'applied', now() - interval '30 days'
         FROM generate_series(1, 25000) g",
    )
    .bind(&h.config.kafka.group_id)
    .execute(&h.db.pool)
    .await
    .expect("old rows");
    sqlx::query(
        "INSERT INTO inbox (consumer_group, event_id, topic, kafka_partition, kafka_offset, outcome)
         VALUES ($1, 'recent', 't', 0, 0, 'applied')",
    )
    .bind(&h.config.kafka.group_id)
    .execute(&h.db.pool)
    .await
    .expect("recent row");
    h.start().await;
    wait_for("expired rows gone", || async {
        h.db.count("SELECT count(*) FROM inbox").await == 1
    })
    .await;
    let addr = h.worker().http_addr;
    wait_for("overdue gauge at 0", || async {
        let m = http_get(addr, "/metrics").await.1;
        m.contains(r#"authsync_retention_overdue_seconds{table="inbox"} 0"#)
            && m.contains(r#"authsync_cleanup_deleted_total{table="inbox"} 25000"#)
    })
    .await;
    h.stop().await;
}

async fn produce_merge(h: &Harness, key: &str, id: &str, old: uuid::Uuid, new: uuid::Uuid) {
    produce_to(
        &producer(&h.config.kafka.brokers),
        &h.config.topics.merge,
        key,
        &crate::merge::merge_event(id, old, new),
        Some(0),
        &[],
    )
    .await;
}

async fn add_user(h: &Harness, id: uuid::Uuid) {
    sqlx::query(
        "INSERT INTO users (id, profile_event_at, last_login_at) VALUES ($1, now(), now())",
    )
    .bind(id)
    .execute(&h.db.pool)
    .await
    .expect("user");
}

/// Was: a merge waiting for its users held every message behind it in its partition.
/// Now it waits aside; a merge with another key goes on, one with the same key waits
/// behind it, and both apply in order once the users exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_merge_holds_only_its_own_key() {
    let mut h = Harness::with(|c| {
        c.merge.unknown_user_retry_secs = 3600;
        c.merge.wait_poll_ms = 100;
    })
    .await;
    let [x, y, a, b, c, d] = [(); 6].map(|_| uuid::Uuid::new_v4());
    for u in [a, b, c, d] {
        add_user(&h, u).await;
    }
    h.start().await;
    produce_merge(&h, "k1", "wait-x-y", x, y).await; // x and y do not exist yet
    produce_merge(&h, "k1", "behind-a-b", a, b).await; // possible, but behind k1's head
    produce_merge(&h, "k2", "other-c-d", c, d).await; // another key: goes at once
    wait_for("the other key's merge applied", || async {
        h.db.count("SELECT count(*) FROM merges").await == 1
    })
    .await;
    assert_eq!(h.db.count("SELECT count(*) FROM merge_waits").await, 2);
    assert_eq!(
        h.db.count(&format!(
            "SELECT count(*) FROM merges WHERE old_user_id = '{c}'"
        ))
        .await,
        1
    );
    add_user(&h, x).await;
    add_user(&h, y).await;
    wait_for("both waiting merges applied", || async {
        h.db.count("SELECT count(*) FROM merges").await == 3
    })
    .await;
    let order: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT old_user_id FROM merges WHERE old_user_id = ANY($1) ORDER BY merged_at",
    )
    .bind(vec![x, a])
    .fetch_all(&h.db.pool)
    .await
    .expect("order");
    assert_eq!(order, vec![x, a], "per-key order kept");
    assert_eq!(h.db.count("SELECT count(*) FROM merge_waits").await, 0);
    h.stop().await;
}

/// The unknown-user budget counts from when authsync first saw the merge, not from its
/// `time`: an old merge still gets its full wait, and is dead-lettered after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_waits_its_budget_from_first_sight_then_is_dead_lettered() {
    let mut h = Harness::with(|c| {
        c.merge.unknown_user_retry_secs = 2;
        c.merge.wait_poll_ms = 100;
    })
    .await;
    h.start().await;
    let old_time = serde_json::to_vec(&json!({
        "specversion": "1.0", "id": "old-merge", "source": "ops-console", "type": "auth.merge",
        "time": "2020-01-01T00:00:00Z",
        "data": {"newUserID": uuid::Uuid::new_v4(), "oldUserId": uuid::Uuid::new_v4(),
                 "reason": "duplicate account", "requestedBy": "support@example.com"},
    }))
    .expect("json");
    let sent = std::time::Instant::now();
    produce_to(
        &producer(&h.config.kafka.brokers),
        &h.config.topics.merge,
        "k",
        &old_time,
        Some(0),
        &[],
    )
    .await;
    let dlq = h.config.topics.dlq_for(&h.config.topics.merge);
    let out = read_topics(&h.config.kafka.brokers, &[dlq], 1).await;
    assert!(
        sent.elapsed() >= Duration::from_secs(2),
        "waited its budget"
    );
    assert_eq!(out[0].header("authsync-error-class"), "unknown_user");
    assert_eq!(h.db.count("SELECT count(*) FROM merge_waits").await, 0);
    assert_eq!(
        h.db.count("SELECT count(*) FROM inbox WHERE outcome = 'dead_lettered'")
            .await,
        1
    );
    h.stop().await;
}
