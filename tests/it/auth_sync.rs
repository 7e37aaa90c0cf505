//! Auth-sync semantics against real Postgres and the Kafka protocol (librdkafka mock broker).

use std::sync::Arc;

use authsync::domain::ids;
use authsync::steps::auth_sync::AuthSync;
use authsync::steps::{run_batch, InputMessage, StepContext};
use serde_json::json;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_login_provisions_the_account_and_announces_it() {
    let mut h = Harness::new().await;
    h.start().await;
    h.produce(
        "auth0:ada",
        &login(
            "evt-first",
            "2026-05-01T10:00:00Z",
            json!({"provider": "auth0", "subject": "ada", "email": "Ada@Example.com",
                   "isEmailVerified": true, "displayName": "Ada", "photoURL": "https://p/ada.png",
                   "locale": "en-GB", "deviceID": "laptop-1", "userAgent": "Firefox",
                   "givenName": "Ada", "familyName": "Lovelace", "groups": ["eng"],
                   "workflowVariants": ["beta"],
                   "defaultOrganizationName": "Analytical Engines",
                   "defaultPersonalCollectionLabel": "My things"}),
        ),
    )
    .await;
    h.wait_handled(1).await;
    let out = h.outputs(2).await;
    h.stop().await;

    let db = &h.db;
    for (table, n) in [
        ("users", 1),
        ("user_emails", 1),
        ("external_identities", 1),
        ("tenants", 1),
        ("organizations", 1),
        ("projects", 1),
        ("collections", 3),
        ("working_contexts", 1),
        ("devices", 1),
    ] {
        assert_eq!(
            db.count(&format!("SELECT count(*) FROM {table}")).await,
            n,
            "{table}"
        );
    }
    assert_eq!(
        db.count("SELECT count(*) FROM organization_members WHERE role = 'owner'")
            .await,
        1
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM collections WHERE kind = 'personal' AND label = 'My things'"
        )
        .await,
        1
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM collections WHERE kind = 'favorites' AND label = 'Favorites'"
        )
        .await,
        1,
        "labels the event does not give come from the configured defaults"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM user_emails WHERE email = 'ada@example.com' AND verified_at IS NOT NULL")
            .await,
        1
    );

    let user_id = ids::user_id("auth0", "ada");
    let types: Vec<String> = out.iter().map(Output::event_type).collect();
    assert_eq!(types, vec!["user.synced", "user.signed_up"]);
    for o in &out {
        assert_eq!(o.topic, h.config.topics.user_events);
        assert_eq!(o.key.as_deref(), Some(user_id.to_string().as_bytes()));
        let ev = o.json();
        assert_eq!(ev["subject"], json!(user_id.to_string()));
        assert_eq!(
            ev["id"],
            json!(ids::result_event_id("evt-first", &o.event_type()).to_string()),
            "result ids are UUIDv5(input id, type)"
        );
        assert_matches_schema(&ev);
    }
    let synced = out[0].json();
    let data = &synced["data"];
    assert_eq!(data["didSignUp"], json!(true));
    assert_eq!(data["tokenRefreshRequired"], json!(false));
    assert_eq!(data["user"]["email"], json!("ada@example.com"));
    assert_eq!(data["user"]["authDisplayName"], json!("Ada"));
    assert_eq!(data["user"]["version"], json!(1));
    assert_eq!(
        data["user"]["externalIdentifiers"][0]["id"],
        json!("auth0|ada")
    );
    let tree = data["workingContext"]["CollectionTree"]
        .as_array()
        .expect("tree");
    assert_eq!(tree.len(), 2, "organization and personal roots");
    assert_eq!(tree[1]["collection"]["label"], json!("My things"));
    assert_eq!(
        tree[1]["children"][0]["collection"]["collectionKind"],
        json!("favorites")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returning_login_updates_profile_and_requires_token_refresh_for_claims() {
    let mut h = Harness::new().await;
    h.start().await;
    let base = json!({"provider": "okta", "subject": "u1", "email": "u1@corp.test",
                      "isEmailVerified": false, "displayName": "U One", "groups": ["a"]});
    h.produce(
        "okta:u1",
        &login("e1", "2026-05-01T10:00:00Z", base.clone()),
    )
    .await;
    let mut changed = base.clone();
    changed["isEmailVerified"] = json!(true);
    changed["groups"] = json!(["a", "b"]);
    changed["displayName"] = json!("U. One");
    h.produce("okta:u1", &login("e2", "2026-05-01T11:00:00Z", changed))
        .await;
    h.wait_handled(2).await;
    let out = h.outputs(4).await;
    h.stop().await;

    let types: Vec<String> = out.iter().map(Output::event_type).collect();
    assert_eq!(
        types,
        vec![
            "user.synced",
            "user.signed_up",
            "user.synced",
            "user.token_refresh_required"
        ]
    );
    let second = out[2].json();
    assert_eq!(second["data"]["didSignUp"], json!(false));
    assert_eq!(second["data"]["tokenRefreshRequired"], json!(true));
    assert_eq!(
        second["data"]["tokenRefreshReason"],
        json!("email_verified_changed")
    );
    assert_eq!(second["data"]["user"]["version"], json!(2));
    assert_eq!(second["data"]["user"]["authDisplayName"], json!("U. One"));
    let refresh = out[3].json();
    assert_eq!(
        refresh["data"]["reasons"],
        json!(["email_verified_changed", "groups_changed"])
    );
    for o in &out {
        assert_matches_schema(&o.json());
    }
    assert_eq!(
        h.db.count("SELECT count(*) FROM external_identities WHERE groups = '{a,b}'")
            .await,
        1
    );
    assert_eq!(
        h.db.count("SELECT count(*) FROM user_emails WHERE verified_at IS NOT NULL")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_event_never_overwrites_newer_data_and_unchanged_login_only_touches_bookkeeping() {
    let mut h = Harness::new().await;
    h.start().await;
    let ev = |id: &str, time: &str, name: &str| {
        login(
            id,
            time,
            json!({"provider": "p", "subject": "s", "displayName": name, "email": "s@x.test"}),
        )
    };
    h.produce("p:s", &ev("new", "2026-05-02T10:00:00Z", "Newest"))
        .await;
    h.produce("p:s", &ev("old", "2026-05-01T10:00:00Z", "Stale"))
        .await;
    h.produce("p:s", &ev("same", "2026-05-03T10:00:00Z", "Newest"))
        .await;
    h.wait_handled(3).await;
    let out = h.outputs(4).await;
    h.stop().await;

    let row: (String, i64, i64, String) = sqlx::query_as(
        "SELECT auth_display_name, version, login_count, to_char(last_login_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') FROM users",
    )
    .fetch_one(&h.db.pool)
    .await
    .expect("user");
    assert_eq!(row.0, "Newest", "the stale event did not overwrite");
    assert_eq!(
        row.1, 1,
        "neither the stale nor the unchanged login bumped the version"
    );
    assert_eq!(row.2, 3, "every login counted");
    assert_eq!(row.3, "2026-05-03", "last login moved to the newest event");
    let synced: Vec<_> = out
        .iter()
        .filter(|o| o.event_type() == "user.synced")
        .collect();
    assert_eq!(
        synced.len(),
        3,
        "every processed login produces one user.synced"
    );
    assert!(
        !out.iter()
            .any(|o| o.event_type() == "user.token_refresh_required"),
        "nothing in a token changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_and_replay_change_nothing_and_emit_nothing_new() {
    let mut h = Harness::new().await;
    h.start().await;
    for i in 0..20 {
        let data = json!({"provider": "p", "subject": format!("u{i}"), "email": format!("u{i}@x.test"),
                          "isEmailVerified": true});
        h.produce(
            &format!("p:u{i}"),
            &login(&format!("evt-{i}"), "2026-05-01T10:00:00Z", data),
        )
        .await;
    }
    h.wait_handled(20).await;
    h.wait_published().await;
    // Redelivery: the same events published again.
    for i in 0..5 {
        let data = json!({"provider": "p", "subject": format!("u{i}"), "email": "changed@x.test"});
        h.produce(
            &format!("p:u{i}"),
            &login(&format!("evt-{i}"), "2026-05-09T10:00:00Z", data),
        )
        .await;
    }
    crate::helpers::wait_for("duplicates counted", || async {
        h.worker()
            .metrics
            .duplicates
            .with_label_values(&[&h.config.topics.login])
            .get()
            == 5
    })
    .await;
    h.stop().await;
    let snapshot = |db: &TestDb| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_as::<_, (i64, i64, i64, i64)>(
                "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM outbox_emitted),
                        (SELECT coalesce(sum(version), 0)::int8 FROM users),
                        (SELECT count(*) FROM users WHERE email = 'changed@x.test')",
            )
            .fetch_one(&pool)
            .await
            .expect("snapshot")
        }
    };
    let before = snapshot(&h.db).await;
    assert_eq!(before, (20, 40, 20, 0), "redelivered ids were not applied");

    // Replay: rewind the group to the beginning and run again.
    rewind_group(
        &h.config.kafka.brokers,
        &h.config.kafka.group_id,
        &h.config.topics.login,
    );
    h.start().await;
    crate::helpers::wait_for("replayed 25 messages as duplicates", || async {
        h.worker()
            .metrics
            .duplicates
            .with_label_values(&[&h.config.topics.login])
            .get()
            == 25
    })
    .await;
    h.stop().await;
    assert_eq!(snapshot(&h.db).await, before, "the replay changed nothing");
    let out = h.outputs(40).await;
    assert_eq!(out.len(), 40, "20 synced + 20 signed_up, nothing twice");
    let mut ids: Vec<String> = out.iter().map(|o| o.json()["id"].to_string()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 40);
}

fn message(partition: i32, offset: i64, id: &str, subject: &str) -> InputMessage {
    InputMessage {
        topic: "auth.login.v1".into(),
        partition,
        offset,
        key: Some(format!("p:{subject}").into_bytes()),
        value: Some(login(
            id,
            "2026-05-01T10:00:00Z",
            json!({"provider": "p", "subject": subject, "email": "race@x.test"}),
        )),
        headers: vec![],
        timestamp: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_logins_of_one_identity_make_one_user_and_one_signup() {
    let db = TestDb::new().await;
    let config = test_config("unused:9092", &db.url);
    let ctx = Arc::new(StepContext::from_config(&config).unwrap());
    // Eight transactions race to sign up the same identity, each from its own "partition".
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (pool, ctx) = (db.pool.clone(), ctx.clone());
        tasks.push(tokio::spawn(async move {
            let batch = [message(i, 0, &format!("race-{i}"), "racer")];
            loop {
                match run_batch(&pool, &ctx, &AuthSync, &batch).await {
                    Ok(report) => return report,
                    Err(e) if e.is_retryable() => continue, // deadlock / serialization: retry
                    Err(e) => panic!("{e}"),
                }
            }
        }));
    }
    let mut signed_up = 0;
    for t in tasks {
        let report = t.await.expect("task");
        assert_eq!(report.applied, 1);
        signed_up += report.signed_up;
    }
    assert_eq!(
        signed_up, 1,
        "exactly one transaction signed the identity up"
    );
    assert_eq!(db.count("SELECT count(*) FROM users").await, 1);
    assert_eq!(db.count("SELECT count(*) FROM organizations").await, 1);
    assert_eq!(
        db.count("SELECT count(*) FROM outbox_emitted WHERE event_type = 'user.signed_up'")
            .await,
        1
    );
    assert_eq!(
        db.count("SELECT count(*) FROM outbox_emitted WHERE event_type = 'user.synced'")
            .await,
        8
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_logins_through_kafka_on_different_partitions() {
    let mut h = Harness::new().await;
    h.start().await;
    for p in 0..PARTITIONS {
        h.produce_with(
            "p:twin",
            &login(
                &format!("twin-{p}"),
                "2026-05-01T10:00:00Z",
                json!({"provider": "p", "subject": "twin"}),
            ),
            Some(p),
            &[],
        )
        .await;
    }
    h.wait_handled(PARTITIONS as i64).await;
    h.stop().await;
    assert_eq!(h.db.count("SELECT count(*) FROM users").await, 1);
    assert_eq!(
        h.db.count("SELECT count(*) FROM outbox_emitted WHERE event_type = 'user.signed_up'")
            .await,
        1
    );
    assert_eq!(
        h.db.count("SELECT login_count FROM users").await,
        PARTITIONS as i64
    );
}

/// Step transactions price index lookups for a working set in memory, so a batch's write
/// of its users probes `users_pkey` instead of reading and hashing the whole table; the
/// setting ends with the transaction (a pooled connection keeps the server's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_transactions_plan_key_lookups_and_leave_the_session_alone() {
    let db = TestDb::new().await;
    sqlx::raw_sql(
        "INSERT INTO users (id, email, profile_event_at, last_login_at)
         SELECT md5(g::text)::uuid, 'u' || g || '@example.com', now(), now()
         FROM generate_series(1, 20000) g;
         ANALYZE users;",
    )
    .execute(&db.pool)
    .await
    .expect("seed users");
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM users ORDER BY email LIMIT 500")
        .fetch_all(&db.pool)
        .await
        .expect("ids");
    let explain = "EXPLAIN UPDATE users u SET login_count = u.login_count + 1
                   FROM UNNEST($1::uuid[]) AS d(id) WHERE u.id = d.id";
    let default_cost = 1.1;
    assert_eq!(
        authsync::config::Config::default()
            .database
            .random_page_cost,
        default_cost
    );

    // One connection, so the check after the commit sees the connection the step used.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .expect("pool");
    let server_cost: String = sqlx::query_scalar("SHOW random_page_cost")
        .fetch_one(&pool)
        .await
        .expect("show");
    let mut tx =
        authsync::store::begin_step(&pool, default_cost, authsync::store::LockWait::Unbounded)
            .await
            .expect("begin");
    let plan: Vec<String> = sqlx::query_scalar(explain)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await
        .expect("explain");
    let plan = plan.join("\n");
    assert!(plan.contains("Index Scan using users_pkey"), "{plan}");
    assert!(!plan.contains("Seq Scan on users"), "{plan}");
    tx.commit().await.expect("commit");

    let after: String = sqlx::query_scalar("SHOW random_page_cost")
        .fetch_one(&pool)
        .await
        .expect("show");
    assert_eq!(
        after, server_cost,
        "the setting must not outlive the transaction"
    );
}

/// A replay's batches are mostly duplicates. A claim locks each inbox row it finds (the
/// row's xmax becomes the claimer's transaction id), so a batch of nothing but duplicates
/// still wrote: it took a transaction id and held the relay's fence until it committed,
/// and every live result committed meanwhile waited for it. With `expect_duplicates` (what
/// the online replay sets) such a batch only reads: it counts the same duplicates, locks
/// no row, and a dead-lettered event is still claimed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_batch_of_duplicates_locks_no_inbox_row() {
    let db = TestDb::new().await;
    let config = test_config("unused:9092", &db.url);
    let live = StepContext::from_config(&config).unwrap();
    let mut replaying = StepContext::from_config(&config).unwrap();
    replaying.expect_duplicates = true;
    let mut batch: Vec<InputMessage> = (0..5)
        .map(|i| message(0, i, &format!("dup-{i}"), &format!("s-{i}")))
        .collect();
    let mut poison = message(0, 5, "poison-1", "s-poison");
    poison.value = Some(b"{not json".to_vec());
    batch.push(poison);
    let first = run_batch(&db.pool, &live, &AuthSync, &batch)
        .await
        .expect("first");
    assert_eq!((first.applied, first.dead_lettered_total()), (5, 1));
    let locked = || async {
        db.count("SELECT count(*) FROM inbox WHERE xmax::text <> '0'")
            .await
    };
    assert_eq!(locked().await, 0, "fresh rows carry no lock");

    let again = run_batch(&db.pool, &replaying, &AuthSync, &batch)
        .await
        .expect("replayed");
    assert_eq!(again.duplicates, 5);
    assert_eq!(again.applied, 0);
    assert_eq!(
        again.dead_lettered_total(),
        1,
        "the dead-lettered event is claimed again (a redrive)"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM inbox WHERE xmax::text <> '0' AND outcome = 'applied'")
            .await,
        0,
        "no applied row was locked"
    );

    // What the workers' claim does with the same batch: the same count, every row locked.
    let live_again = run_batch(&db.pool, &live, &AuthSync, &batch[..5])
        .await
        .expect("live replay");
    assert_eq!(live_again.duplicates, 5);
    assert_eq!(
        db.count("SELECT count(*) FROM inbox WHERE xmax::text <> '0' AND outcome = 'applied'")
            .await,
        5,
        "the plain claim locks what it finds"
    );
}
