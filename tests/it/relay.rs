//! The outbox relay: commit order per key, late commits never skipped, deletes only after
//! delivery, survives a broker outage without losing or duplicating rows.

use std::time::Duration;

use authsync::relay;
use authsync::store::outbox::{self, NewMessage};
use authsync::telemetry::Metrics;
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

fn row(n: u32, key: &str, topic: &str) -> NewMessage {
    NewMessage {
        event_id: uuid::Uuid::new_v4(),
        topic: topic.to_string(),
        key: Some(key.as_bytes().to_vec()),
        event_type: "test".into(),
        payload: Some(format!("{{\"n\":{n}}}").into_bytes()),
        headers: vec![("h".into(), vec![0xff, 0x01])],
    }
}

/// Runs a relay on the harness's database until `token` is cancelled.
fn spawn_relay(
    h: &Harness,
    metrics: &Metrics,
    token: &CancellationToken,
) -> tokio::task::JoinHandle<Result<(), relay::RelayError>> {
    let (config, pool, metrics, token) = (
        h.config.clone(),
        h.db.pool.clone(),
        metrics.clone(),
        token.clone(),
    );
    tokio::spawn(async move { relay::run(&config, pool, metrics, Default::default(), token).await })
}

/// watermill's TestNotMissingMessages, for our relay: a transaction that started first but
/// commits last is neither skipped nor overtaken; a rolled-back one never appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_commit_is_published_in_order_and_rollback_never() {
    let h = Harness::new().await;
    let topic = h.config.topics.user_events.clone();
    let mut slow = sqlx::PgConnection::connect(&h.db.url).await.expect("conn");
    let mut slow_tx = slow.begin().await.expect("tx");
    outbox::insert(&mut slow_tx, &[row(1, "k", &topic)])
        .await
        .expect("insert 1");
    let mut doomed = sqlx::PgConnection::connect(&h.db.url).await.expect("conn");
    let mut doomed_tx = doomed.begin().await.expect("tx");
    outbox::insert(&mut doomed_tx, &[row(99, "k", &topic)])
        .await
        .expect("insert 99");
    let mut conn = h.db.pool.acquire().await.expect("conn");
    outbox::insert(&mut conn, &[row(2, "k", &topic), row(3, "other", &topic)])
        .await
        .expect("insert 2, 3");
    drop(conn);

    let shutdown = CancellationToken::new();
    let metrics = Metrics::new();
    let relay_task = spawn_relay(&h, &metrics, &shutdown);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        h.db.count("SELECT count(*) FROM outbox").await,
        2,
        "nothing newer than an open transaction is published"
    );
    doomed_tx.rollback().await.expect("rollback");
    slow_tx.commit().await.expect("commit");
    wait_for("3 rows published", || async {
        h.db.count("SELECT count(*) FROM outbox").await == 0
    })
    .await;
    shutdown.cancel();
    relay_task.await.expect("join").expect("relay");

    let out = read_topics(&h.config.kafka.brokers, &[topic], 3).await;
    let ns: Vec<String> = out
        .iter()
        .map(|o| String::from_utf8_lossy(&o.value).into_owned())
        .collect();
    assert_eq!(out.len(), 3, "{ns:?}");
    let for_k: Vec<&String> = ns
        .iter()
        .zip(&out)
        .filter(|(_, o)| o.key.as_deref() == Some(b"k"))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        for_k,
        vec!["{\"n\":1}", "{\"n\":2}"],
        "commit order per key"
    );
    assert!(
        !ns.iter().any(|n| n.contains("99")),
        "rolled back row never published"
    );
    assert_eq!(
        out[0].header_list,
        vec![("h".to_string(), vec![0xff, 0x01])]
    );
    assert_eq!(
        metrics
            .relay_published
            .with_label_values(&[&h.config.topics.user_events])
            .get(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_waits_out_a_broker_outage_and_loses_nothing() {
    let mut h = Harness::with(|c| {
        c.relay.batch_size = 50;
        // Retention runs all the time, yet never forgets an id whose row still waits.
        c.relay.outbox_retention_hours = 0;
        c.relay.cleanup_interval_secs = 1;
    })
    .await;
    let topic = h.config.topics.user_events.clone();
    h.cluster
        .as_ref()
        .expect("mock")
        .broker_down(1)
        .expect("down");
    let mut conn = h.db.pool.acquire().await.expect("conn");
    let rows: Vec<NewMessage> = (0..200)
        .map(|n| row(n, &format!("k{}", n % 7), &topic))
        .collect();
    outbox::insert(&mut conn, &rows).await.expect("insert");
    drop(conn);
    h.config.relay.enabled = true;
    let shutdown = CancellationToken::new();
    let relay_task = spawn_relay(&h, &Metrics::new(), &shutdown);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        h.db.count("SELECT count(*) FROM outbox").await,
        200,
        "nothing is deleted while the broker is down"
    );
    assert_eq!(
        h.db.count("SELECT count(*) FROM outbox_emitted").await,
        200,
        "ids of waiting rows are remembered past the retention"
    );
    h.cluster.as_ref().expect("mock").broker_up(1).expect("up");
    wait_for("all published", || async {
        h.db.count("SELECT count(*) FROM outbox").await == 0
    })
    .await;
    shutdown.cancel();
    relay_task.await.expect("join").expect("relay");
    let out = read_topics(&h.config.kafka.brokers, &[topic], 200).await;
    assert_eq!(
        out.len(),
        200,
        "every row exactly once (idempotent producer)"
    );
    // Per key, the payload order is the insertion order.
    for k in 0..7 {
        let key = format!("k{k}");
        let ns: Vec<u32> = out
            .iter()
            .filter(|o| o.key.as_deref() == Some(key.as_bytes()))
            .map(|o| o.json()["n"].as_u64().expect("n") as u32)
            .collect();
        let mut sorted = ns.clone();
        sorted.sort_unstable();
        assert_eq!(ns, sorted, "order of key {key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_relay_leads_and_retention_forgets_emitted_ids() {
    let h = Harness::with(|c| {
        c.relay.outbox_retention_hours = 0;
        c.relay.cleanup_interval_secs = 1;
    })
    .await;
    let topic = h.config.topics.user_events.clone();
    let shutdown = CancellationToken::new();
    let (m1, m2) = (Metrics::new(), Metrics::new());
    let mut tasks = Vec::new();
    for m in [&m1, &m2] {
        tasks.push(spawn_relay(&h, m, &shutdown));
    }
    wait_for("a leader", || async {
        m1.relay_leader.get() + m2.relay_leader.get() == 1
    })
    .await;
    let mut conn = h.db.pool.acquire().await.expect("conn");
    outbox::insert(&mut conn, &[row(1, "a", &topic), row(2, "b", &topic)])
        .await
        .expect("insert");
    drop(conn);
    wait_for(
        "rows published and their ids forgotten by retention",
        || async {
            h.db.count("SELECT count(*) FROM outbox").await == 0
                && h.db.count("SELECT count(*) FROM outbox_emitted").await == 0
        },
    )
    .await;
    assert_eq!(
        m1.relay_leader.get() + m2.relay_leader.get(),
        1,
        "never two leaders"
    );
    shutdown.cancel();
    for t in tasks {
        t.await.expect("join").expect("relay");
    }
    let out = read_topics(&h.config.kafka.brokers, &[topic], 2).await;
    assert_eq!(out.len(), 2, "published once, not once per relay");
}

/// Reads past `cursor` once `expected` rows are publishable. Rows become publishable only
/// once every older transaction *in the cluster* has finished (txids are cluster-wide), so
/// a test running beside this one that holds a transaction open delays them.
async fn read_when_publishable(
    pool: &sqlx::PgPool,
    cursor: outbox::ReadCursor,
    expected: usize,
) -> Vec<outbox::Pending> {
    wait_for(&format!("{expected} publishable rows"), || async {
        outbox::fetch_publishable(pool, 100, cursor)
            .await
            .expect("read")
            .len()
            >= expected
    })
    .await;
    outbox::fetch_publishable(pool, 100, cursor)
        .await
        .expect("read")
}

/// The pipelined relay's read cursor: rows it holds (sent, not yet acknowledged) are not
/// read again, but a row a late-committing transaction wrote *below* the cursor is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_cursor_skips_held_rows_but_not_a_late_commit_below_it() {
    let h = Harness::new().await;
    let topic = h.config.topics.user_events.clone();
    // `late` takes its txid first but writes its row after `early` did and commits last.
    let mut late = sqlx::PgConnection::connect(&h.db.url).await.expect("conn");
    let mut late_tx = late.begin().await.expect("tx");
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *late_tx)
        .await
        .expect("xid");
    let mut early = sqlx::PgConnection::connect(&h.db.url).await.expect("conn");
    let mut early_tx = early.begin().await.expect("tx");
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *early_tx)
        .await
        .expect("xid");
    // late writes first (the lower id) and commits last.
    outbox::insert(&mut late_tx, &[row(1, "a", &topic)])
        .await
        .expect("insert late");
    outbox::insert(&mut early_tx, &[row(2, "b", &topic)])
        .await
        .expect("insert early");
    early_tx.commit().await.expect("commit early");

    let start = outbox::ReadCursor::default();
    let first = outbox::fetch_publishable(&h.db.pool, 100, start)
        .await
        .expect("read");
    assert!(
        first.is_empty(),
        "early's txid is newer than late's, which still runs: nothing is publishable yet"
    );
    late_tx.commit().await.expect("commit late");
    let first = read_when_publishable(&h.db.pool, start, 2).await;
    assert_eq!(first.len(), 2);
    let held = start.advance(&first);
    assert!(
        outbox::fetch_publishable(&h.db.pool, 100, held)
            .await
            .expect("read")
            .is_empty(),
        "held rows are not read again"
    );

    // Now the hazard itself: a newer transaction writes a row, an older one writes a
    // higher id and commits first; the cursor passes that higher id. The newer one's row,
    // below the cursor, must still be read once it commits.
    let mut older = sqlx::PgConnection::connect(&h.db.url).await.expect("conn");
    let mut older_tx = older.begin().await.expect("tx");
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *older_tx)
        .await
        .expect("xid");
    let mut newer = sqlx::PgConnection::connect(&h.db.url).await.expect("conn");
    let mut newer_tx = newer.begin().await.expect("tx");
    outbox::insert(&mut newer_tx, &[row(3, "c", &topic)])
        .await
        .expect("insert newer");
    outbox::insert(&mut older_tx, &[row(4, "d", &topic)])
        .await
        .expect("insert older");
    older_tx.commit().await.expect("commit older");
    let second = read_when_publishable(&h.db.pool, held, 1).await;
    let payloads = |rows: &[outbox::Pending]| -> Vec<String> {
        rows.iter()
            .map(|r| String::from_utf8_lossy(r.payload.as_deref().unwrap_or_default()).into_owned())
            .collect()
    };
    assert_eq!(payloads(&second), vec!["{\"n\":4}"], "only the older row");
    let held = held.advance(&second);
    newer_tx.commit().await.expect("commit newer");
    let third = read_when_publishable(&h.db.pool, held, 1).await;
    assert_eq!(
        payloads(&third),
        vec!["{\"n\":3}"],
        "the row below the cursor is read, and the held row above it is not"
    );
}

/// Many rounds in flight (slow acks) while writers commit concurrently: every row is
/// published exactly once, each key in commit order, and then deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_relay_publishes_concurrent_commits_once_in_key_order() {
    let mut h = Harness::with(|c| {
        c.relay.batch_size = 25;
        c.relay.rounds_in_flight = 8;
    })
    .await;
    let topic = h.config.topics.user_events.clone();
    // Slow acks keep several rounds in flight at once.
    h.cluster
        .as_ref()
        .expect("mock")
        .broker_round_trip_time(1, Duration::from_millis(40))
        .expect("rtt");
    h.config.relay.enabled = true;
    let shutdown = CancellationToken::new();
    let metrics = Metrics::new();
    let relay_task = spawn_relay(&h, &metrics, &shutdown);
    let (writers, per_writer) = (4u32, 300u32);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (pool, topic) = (h.db.pool.clone(), topic.clone());
        tasks.push(tokio::spawn(async move {
            // Each writer owns its keys, so its commit order is each key's order.
            for chunk in (0..per_writer).collect::<Vec<_>>().chunks(3) {
                let rows: Vec<NewMessage> = chunk
                    .iter()
                    .map(|n| row(w * 10_000 + n, &format!("w{w}-k{}", n % 5), &topic))
                    .collect();
                let mut tx = pool.begin().await.expect("tx");
                outbox::insert(&mut tx, &rows).await.expect("insert");
                tx.commit().await.expect("commit");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let total = (writers * per_writer) as usize;
    wait_for("all published and deleted", || async {
        h.db.count("SELECT count(*) FROM outbox").await == 0
    })
    .await;
    shutdown.cancel();
    relay_task.await.expect("join").expect("relay");
    let out = read_topics(&h.config.kafka.brokers, &[topic], total).await;
    let ns: Vec<u64> = out
        .iter()
        .map(|o| o.json()["n"].as_u64().expect("n"))
        .collect();
    let distinct: std::collections::HashSet<u64> = ns.iter().copied().collect();
    assert_eq!(out.len(), total, "no row twice");
    assert_eq!(distinct.len(), total, "every row once");
    let mut by_key: std::collections::HashMap<Vec<u8>, Vec<u64>> = Default::default();
    for (o, n) in out.iter().zip(&ns) {
        by_key
            .entry(o.key.clone().expect("key"))
            .or_default()
            .push(*n);
    }
    for (key, ns) in by_key {
        let mut sorted = ns.clone();
        sorted.sort_unstable();
        assert_eq!(ns, sorted, "order of key {}", String::from_utf8_lossy(&key));
    }
    assert_eq!(
        metrics
            .relay_published
            .with_label_values(&[&h.config.topics.user_events])
            .get(),
        total as u64
    );
}

/// A batch larger than one `COPY` message's budget is streamed in several pieces: still in
/// order, still skipping ids emitted before and ids repeated in the batch, and every column
/// (a NULL key, binary headers) arrives as written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_outbox_insert_keeps_order_skips_repeats_and_every_column() {
    let h = Harness::new().await;
    let topic = h.config.topics.user_events.clone();
    let big = |n: u32| {
        let mut m = row(n, "k", &topic);
        // ~2 KiB each: 600 of them are more than two statements' worth.
        m.payload = Some(format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(2048)).into_bytes());
        m
    };
    let mut conn = h.db.pool.acquire().await.expect("conn");
    let early = big(0);
    outbox::insert(&mut conn, std::slice::from_ref(&early))
        .await
        .expect("insert early");
    let mut batch: Vec<NewMessage> = (1..600).map(big).collect();
    batch[300].key = None;
    batch[300].headers = vec![("a".into(), b"text".to_vec()), ("b".into(), vec![0, 0xfe])];
    let odd = batch[300].clone();
    batch.insert(0, early.clone()); // emitted before: skipped
    let repeat = batch[450].clone(); // repeated in a later chunk: skipped
    batch.push(repeat);
    let inserted = outbox::insert(&mut conn, &batch)
        .await
        .expect("insert batch");
    assert_eq!(inserted, 599, "only the 599 new ids");
    let ns: Vec<i64> = sqlx::query_scalar(
        "SELECT (convert_from(payload, 'UTF8')::jsonb ->> 'n')::int8 FROM outbox ORDER BY id",
    )
    .fetch_all(&h.db.pool)
    .await
    .expect("read");
    let expected: Vec<i64> = (0..600).collect();
    assert_eq!(ns, expected, "one row per id, in insertion order");
    let (key, headers, event_type, topic_read): (Option<Vec<u8>>, Vec<u8>, String, String) =
        sqlx::query_as(
            "SELECT message_key, header_bytes, event_type, topic FROM outbox WHERE event_id = $1",
        )
        .bind(odd.event_id)
        .fetch_one(&h.db.pool)
        .await
        .expect("read odd row");
    assert_eq!(key, None);
    assert_eq!(outbox::unpack_headers(&headers), Some(odd.headers.clone()));
    assert_eq!(
        (event_type.as_str(), topic_read.as_str()),
        ("test", topic.as_str())
    );
}

/// A small batch (one statement: the ledger in a CTE, no `COPY`) keeps the same contract:
/// rows in order, ids emitted before or repeated skipped, a NULL key, a tombstone and
/// binary headers (a NUL byte included) as written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_outbox_insert_keeps_order_skips_repeats_and_every_column() {
    let h = Harness::new().await;
    let topic = h.config.topics.user_events.clone();
    let mut conn = h.db.pool.acquire().await.expect("conn");
    let early = row(0, "k", &topic);
    outbox::insert(&mut conn, std::slice::from_ref(&early))
        .await
        .expect("insert early");
    let mut batch: Vec<NewMessage> = (1..6).map(|n| row(n, "k", &topic)).collect();
    batch[2].key = None;
    batch[2].headers = vec![("a".into(), vec![0, 0xfe]), ("b".into(), Vec::new())];
    batch[3].payload = None;
    let odd = batch[2].clone();
    batch.insert(1, early.clone()); // emitted before: skipped
    let repeat = batch[4].clone(); // repeated in the batch: skipped
    batch.push(repeat);
    let inserted = outbox::insert(&mut conn, &batch).await.expect("insert");
    assert_eq!(inserted, 5, "only the 5 new ids");
    let ns: Vec<Option<i64>> = sqlx::query_scalar(
        "SELECT (convert_from(payload, 'UTF8')::jsonb ->> 'n')::int8 FROM outbox ORDER BY id",
    )
    .fetch_all(&h.db.pool)
    .await
    .expect("read");
    assert_eq!(
        ns,
        vec![Some(0), Some(1), Some(2), Some(3), None, Some(5)],
        "one row per id, in insertion order (the tombstone in its place)"
    );
    let (key, headers): (Option<Vec<u8>>, Vec<u8>) =
        sqlx::query_as("SELECT message_key, header_bytes FROM outbox WHERE event_id = $1")
            .bind(odd.event_id)
            .fetch_one(&h.db.pool)
            .await
            .expect("read odd row");
    assert_eq!(key, None);
    assert_eq!(outbox::unpack_headers(&headers), Some(odd.headers.clone()));
}

/// The inbox retention forgets events handled longer ago than the window and keeps the
/// recent ones (the BRIN index on `processed_at` finds them), in bounded rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_retention_forgets_only_events_older_than_the_window() {
    let db = TestDb::new().await;
    sqlx::raw_sql(
        "INSERT INTO inbox (consumer_group, event_id, topic, kafka_partition, kafka_offset, outcome, processed_at)
         SELECT 'g', 'old-' || n, 't', 0, n, 'applied', now() - interval '3 hours' + n * interval '1 ms'
         FROM generate_series(1, 2500) n;
         INSERT INTO inbox (consumer_group, event_id, topic, kafka_partition, kafka_offset, outcome)
         SELECT 'g', 'new-' || n, 't', 0, 10000 + n, 'applied' FROM generate_series(1, 500) n;",
    )
    .execute(&db.pool)
    .await
    .expect("seed inbox");
    let first = authsync::store::inbox::delete_older_than(&db.pool, 2, 2000)
        .await
        .expect("first round");
    let second = authsync::store::inbox::delete_older_than(&db.pool, 2, 2000)
        .await
        .expect("second round");
    assert_eq!(
        (first, second),
        (2000, 500),
        "rounds are bounded by the limit"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM inbox WHERE event_id LIKE 'old-%'")
            .await,
        0
    );
    assert_eq!(
        db.count("SELECT count(*) FROM inbox WHERE event_id LIKE 'new-%'")
            .await,
        500
    );
}

/// A transaction that writes no outbox row (a batch of duplicates) can hold committed
/// results behind the fence, and its commit sends no NOTIFY. The step handlers tell the
/// relay of every commit in process (`CommitSignal`): the held row goes out then, not at
/// the next poll (60 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_signal_releases_results_held_by_a_transaction_without_outbox_rows() {
    let h = Harness::with(|c| c.relay.poll_interval_ms = 60_000).await;
    let topic = h.config.topics.user_events.clone();
    // The holder takes a transaction id first, then the result commits (and notifies).
    let mut holder = sqlx::PgConnection::connect(&h.db.url).await.expect("conn");
    let mut holder_tx = holder.begin().await.expect("tx");
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *holder_tx)
        .await
        .expect("xid");
    let signal = relay::CommitSignal::default();
    let shutdown = CancellationToken::new();
    let relay_task = {
        let (config, pool, signal, token) = (
            h.config.clone(),
            h.db.pool.clone(),
            signal.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move { relay::run(&config, pool, Metrics::new(), signal, token).await })
    };
    let mut conn = h.db.pool.acquire().await.expect("conn");
    outbox::insert(&mut conn, &[row(1, "k", &topic)])
        .await
        .expect("insert");
    drop(conn);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        h.db.count("SELECT count(*) FROM outbox").await,
        1,
        "held behind the older open transaction"
    );
    holder_tx.commit().await.expect("commit");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        h.db.count("SELECT count(*) FROM outbox").await,
        1,
        "no NOTIFY and no poll yet: still waiting"
    );
    signal.notify_one();
    let woken = std::time::Instant::now();
    wait_for("the held row is published", || async {
        h.db.count("SELECT count(*) FROM outbox").await == 0
    })
    .await;
    assert!(
        woken.elapsed() < Duration::from_secs(20),
        "published on the signal, not on the 60 s poll"
    );
    shutdown.cancel();
    relay_task.await.expect("join").expect("relay");
    let out = read_topics(&h.config.kafka.brokers, &[topic], 1).await;
    assert_eq!(out.len(), 1);
}

/// The backlog gauges count the outbox (a scan of its heap, dead rows included until a
/// vacuum). Publishing must not wait for them: here the count cannot finish at all (a
/// session holds the parked table locked; its rows committed before it took the lock, so
/// the fence does not hold them), and the results are published all the same; the gauge
/// catches up once the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_count_that_cannot_finish_does_not_hold_publishing() {
    let h = Harness::new().await;
    let topic = h.config.topics.user_events.clone();
    let mut conn = h.db.pool.acquire().await.expect("conn");
    outbox::insert(&mut conn, &[row(1, "k", &topic), row(2, "k", &topic)])
        .await
        .expect("insert");
    drop(conn);
    let mut locker = sqlx::PgConnection::connect(&h.db.url).await.expect("conn");
    let mut locker_tx = locker.begin().await.expect("tx");
    sqlx::query("LOCK TABLE outbox_parked IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker_tx)
        .await
        .expect("lock");
    let shutdown = CancellationToken::new();
    let metrics = Metrics::new();
    metrics.outbox_parked.set(-1);
    let relay_task = spawn_relay(&h, &metrics, &shutdown);
    wait_for("both rows published while the count waits", || async {
        h.db.count("SELECT count(*) FROM outbox").await == 0
    })
    .await;
    assert_eq!(
        metrics.outbox_parked.get(),
        -1,
        "the parked count is still waiting for the lock"
    );
    locker_tx.rollback().await.expect("unlock");
    wait_for("the parked gauge is refreshed", || async {
        metrics.outbox_parked.get() == 0
    })
    .await;
    shutdown.cancel();
    relay_task.await.expect("join").expect("relay");
    let out = read_topics(&h.config.kafka.brokers, &[topic], 2).await;
    assert_eq!(out.len(), 2);
}
