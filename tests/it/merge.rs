//! Account merge against real Postgres and the Kafka protocol.

use std::sync::Arc;

use authsync::domain::ids;
use authsync::steps::auth_sync::AuthSync;
use authsync::steps::merge::AccountMerge;
use authsync::steps::{run_batch, InputMessage, StepContext};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::*;

pub fn merge_event(id: &str, old: Uuid, new: Uuid) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "specversion": "1.0", "id": id, "source": "ops-console", "type": "auth.merge",
        "time": chrono::Utc::now().to_rfc3339(),
        "data": {"newUserID": new, "oldUserId": old, "reason": "duplicate account",
                 "requestedBy": "support@example.com"},
    }))
    .expect("json")
}

async fn sign_up(h: &Harness, subject: &str) -> Uuid {
    h.produce(
        &format!("p:{subject}"),
        &login(
            &format!("signup-{subject}"),
            "2026-05-01T10:00:00Z",
            json!({"provider": "p", "subject": subject, "email": format!("{subject}@x.test"),
                   "isEmailVerified": true, "deviceID": format!("{subject}-phone")}),
        ),
    )
    .await;
    ids::user_id("p", subject)
}

async fn produce_merge(h: &Harness, id: &str, old: Uuid, new: Uuid) {
    let producer = producer(&h.config.kafka.brokers);
    produce_to(
        &producer,
        &h.config.topics.merge,
        &old.to_string(),
        &merge_event(id, old, new),
        None,
        &[],
    )
    .await;
}

/// Content owned by `old`, some of it overlapping with what `new` has.
async fn seed_content(db: &TestDb, old: Uuid, new: Uuid) -> Uuid {
    let shared = Uuid::new_v4();
    sqlx::raw_sql(&format!(
        r#"
        INSERT INTO assets (id, owner_id, name) SELECT gen_random_uuid(), '{old}', 'a' || g FROM generate_series(1, 5) g;
        INSERT INTO asset_references (id, asset_id, created_by) SELECT gen_random_uuid(), gen_random_uuid(), '{old}' FROM generate_series(1, 2);
        INSERT INTO threads (id, owner_id) SELECT gen_random_uuid(), '{old}' FROM generate_series(1, 3);
        INSERT INTO recent_assets (user_id, asset_id) VALUES ('{old}', '{shared}'), ('{new}', '{shared}'), ('{old}', gen_random_uuid());
        INSERT INTO recent_threads (user_id, thread_id) VALUES ('{old}', gen_random_uuid());
        INSERT INTO assets_to_collections (id, asset_id, collection_id, created_by, modified_by) VALUES (gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), '{old}', '{new}');
        INSERT INTO threads_to_collections (id, thread_id, collection_id, deleted_by) VALUES (gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), '{old}');
        -- a collection both can access: old is admin, new only reads -> new becomes admin
        INSERT INTO collection_permissions (collection_id, user_id, action) VALUES ('{shared}', '{old}', 'admin'), ('{shared}', '{new}', 'read');
        INSERT INTO teams (id, name, created_by, modified_by) VALUES (gen_random_uuid(), 't', '{old}', '{old}');
        INSERT INTO access_tokens (token, user_id) VALUES ('secret-token-1', '{old}');
        -- both have `dept`: the survivor's value wins, the old one is reported as dropped
        INSERT INTO user_attributes (user_id, key, value) VALUES ('{old}', 'dept', 'sales'), ('{new}', 'dept', 'ops'), ('{old}', 'site', 'berlin');
        "#
    ))
    .execute(&db.pool)
    .await
    .expect("seed");
    shared
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_transfers_everything_reports_it_and_is_applied_once() {
    let mut h = Harness::new().await;
    h.start().await;
    let old = sign_up(&h, "old").await;
    let new = sign_up(&h, "new").await;
    h.wait_handled(2).await;
    let shared = seed_content(&h.db, old, new).await;
    produce_merge(&h, "merge-1", old, new).await;
    // Replays: the same event again, and a new request for the same merge.
    produce_merge(&h, "merge-1", old, new).await;
    produce_merge(&h, "merge-1-again", old, new).await;
    // 2 sign-ups + 2 merge ids (the redelivered "merge-1" adds no inbox row).
    h.wait_handled(4).await;
    // The old identity logs in after the merge: it lands on the survivor, and says so.
    h.produce(
        "p:old",
        &login(
            "after-merge",
            "2026-05-02T10:00:00Z",
            json!({"provider": "p", "subject": "old"}),
        ),
    )
    .await;
    h.wait_handled(5).await;
    h.wait_published().await;
    let out = h.outputs(4 + 4 + 1).await;
    h.stop().await;

    let db = &h.db;
    for (sql, n) in [
        (format!("SELECT count(*) FROM assets WHERE owner_id = '{new}'"), 5),
        (format!("SELECT count(*) FROM threads WHERE owner_id = '{new}'"), 3),
        (format!("SELECT count(*) FROM asset_references WHERE created_by = '{new}'"), 2),
        (format!("SELECT count(*) FROM recent_assets WHERE user_id = '{new}'"), 2),
        (format!("SELECT count(*) FROM recent_assets WHERE user_id = '{old}'"), 0),
        (format!("SELECT count(*) FROM collection_permissions WHERE user_id = '{new}' AND collection_id = '{shared}' AND action = 'admin'"), 1),
        (format!("SELECT count(*) FROM collection_permissions WHERE user_id = '{old}'"), 0),
        // Revoked, not moved: an old session must not act as the survivor.
        (format!("SELECT count(*) FROM access_tokens WHERE user_id IN ('{new}', '{old}')"), 0),
        (format!("SELECT count(*) FROM external_identities WHERE user_id = '{new}'"), 2),
        (format!("SELECT count(*) FROM user_emails WHERE user_id = '{new}'"), 2),
        (format!("SELECT count(*) FROM devices WHERE user_id = '{new}'"), 2),
        (format!("SELECT count(*) FROM working_contexts WHERE user_id = '{old}'"), 0),
        (format!("SELECT count(*) FROM users WHERE id = '{old}' AND lifecycle_state = 'merged' AND merged_into = '{new}'"), 1),
        (format!("SELECT count(*) FROM maintenance_activities WHERE user_id IN ('{old}', '{new}')"), 2),
        (format!("SELECT count(*) FROM merges WHERE old_user_id = '{old}' AND new_user_id = '{new}'"), 1),
        // The old personal tree now hangs under the survivor's personal root.
        (format!("SELECT count(*) FROM collections WHERE created_by = '{new}' AND cardinality(path) = 2 AND kind = 'folder'"), 1),
        (format!("SELECT count(*) FROM collections WHERE created_by = '{new}' AND cardinality(path) = 3"), 1),
    ] {
        assert_eq!(db.count(&sql).await, n, "{sql}");
    }

    let merged: Vec<&Output> = out
        .iter()
        .filter(|o| o.event_type() == "user.merged")
        .collect();
    assert_eq!(merged.len(), 1, "announced once despite the replays");
    let ev = merged[0].json();
    assert_matches_schema(&ev);
    assert_eq!(merged[0].key.as_deref(), Some(new.to_string().as_bytes()));
    let data = &ev["data"];
    assert_eq!(data["oldUserId"], json!(old));
    assert_eq!(data["newUserID"], json!(new));
    assert_eq!(data["assets"]["assets"].as_array().map(Vec::len), Some(5));
    assert_eq!(data["threads"]["threads"].as_array().map(Vec::len), Some(3));
    assert_eq!(data["permissions"]["deleted"][0]["action"], json!("admin"));
    assert_eq!(data["permissions"]["deleted"][0]["user_id"], json!(old));
    assert_eq!(data["collectionPaths"].as_array().map(Vec::len), Some(2));
    assert_eq!(data["tokens"].as_array().map(Vec::len), Some(1));
    assert!(
        !ev.to_string().contains("secret-token-1"),
        "tokens are fingerprinted"
    );
    assert_eq!(data["workingContext"][0]["user_id"], json!(old));
    // Devices: each side had its own; the old one moved (and is reported as it was).
    assert_eq!(data["devices"]["moved"].as_array().map(Vec::len), Some(1));
    assert_eq!(data["devices"]["moved"][0]["deviceId"], json!("old-phone"));
    assert_eq!(data["attributes"]["moved"][0]["key"], json!("site"));
    assert_eq!(data["attributes"]["dropped"][0]["key"], json!("dept"));
    assert_eq!(
        data["attributes"]["dropped"][0]["value"],
        json!("sales"),
        "the audit keeps what the merge dropped, enough to reverse it"
    );
    let revoked: Vec<serde_json::Value> = out
        .iter()
        .filter(|o| o.event_type() == "user.tokens_revoked")
        .map(Output::json)
        .collect();
    assert_eq!(revoked.len(), 1, "the revocation is announced once");
    assert_matches_schema(&revoked[0]);
    assert_eq!(revoked[0]["subject"], json!(old));
    assert_eq!(
        revoked[0]["data"]["tokenFingerprints"][0],
        data["tokens"][0]["token"]
    );
    assert_eq!(data["truncated"], json!(false));

    let refresh: Vec<serde_json::Value> = out
        .iter()
        .filter(|o| o.event_type() == "user.token_refresh_required")
        .map(Output::json)
        .collect();
    assert_eq!(refresh.len(), 1);
    assert_eq!(refresh[0]["data"]["reason"], json!("user_merged"));
    assert_eq!(refresh[0]["subject"], json!(new));
    let deactivated: Vec<serde_json::Value> = out
        .iter()
        .filter(|o| o.event_type() == "user.deactivated")
        .map(Output::json)
        .collect();
    assert_eq!(deactivated.len(), 1);
    assert_eq!(deactivated[0]["subject"], json!(old));
    for e in refresh.iter().chain(&deactivated) {
        assert_matches_schema(e);
    }
    let after = out
        .iter()
        .map(Output::json)
        .find(|e| e["causationid"] == json!("after-merge"))
        .expect("synced after merge");
    assert_eq!(
        after["subject"],
        json!(new),
        "old identity resolves to the survivor"
    );
    assert_eq!(after["data"]["mergedFrom"], json!(old), "and says so");
    assert_matches_schema(&after);
}

async fn assert_merge_rejected(
    tweak: impl FnOnce(&mut authsync::config::Config),
    setup: impl for<'a> FnOnce(
        &'a Harness,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = (Uuid, Uuid)> + 'a>,
    >,
    handled_before: i64,
    reason: &str,
) {
    let mut h = Harness::with(tweak).await;
    h.start().await;
    let (old, new) = setup(&h).await;
    h.wait_handled(handled_before).await;
    produce_merge(&h, "bad-merge", old, new).await;
    h.wait_handled(handled_before + 1).await;
    h.wait_published().await;
    let dlq = h.config.topics.dlq_for(&h.config.topics.merge);
    let letters = read_topics(&h.config.kafka.brokers, &[dlq], 1).await;
    h.stop().await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].header("authsync-error-class"), reason);
    assert!(letters[0]
        .header("authsync-error-reason")
        .starts_with(reason));
    assert_eq!(
        letters[0].key.as_deref(),
        Some(old.to_string().as_bytes()),
        "original key"
    );
    assert_eq!(
        h.db.count("SELECT count(*) FROM merges").await,
        if reason == "already_merged_elsewhere" || reason == "cycle" {
            1
        } else {
            0
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_into_itself_is_rejected() {
    assert_merge_rejected(
        |_| {},
        |h| {
            Box::pin(async move {
                let a = sign_up(h, "a").await;
                (a, a)
            })
        },
        1,
        "same_user",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_of_unknown_user_is_rejected_after_the_retry_budget() {
    assert_merge_rejected(
        |c| c.merge.unknown_user_retry_secs = 0,
        |h| {
            Box::pin(async move {
                let a = sign_up(h, "a").await;
                (Uuid::new_v4(), a)
            })
        },
        1,
        "unknown_user",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_of_user_merged_elsewhere_is_rejected() {
    assert_merge_rejected(
        |_| {},
        |h| {
            Box::pin(async move {
                let (a, b, c) = (
                    sign_up(h, "a").await,
                    sign_up(h, "b").await,
                    sign_up(h, "c").await,
                );
                produce_merge(h, "a-into-b", a, b).await;
                (a, c)
            })
        },
        4,
        "already_merged_elsewhere",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_back_into_a_merged_user_is_a_cycle() {
    assert_merge_rejected(
        |_| {},
        |h| {
            Box::pin(async move {
                let (a, b) = (sign_up(h, "a").await, sign_up(h, "b").await);
                produce_merge(h, "a-into-b", a, b).await;
                // The first merge may wait for its sign-ups (in `merge_waits`, already in the
                // inbox); the second has another key and would not wait behind it.
                wait_for("a merged into b", || async {
                    h.db.count("SELECT count(*) FROM merges").await == 1
                })
                .await;
                (b, a)
            })
        },
        3,
        "cycle",
    )
    .await;
}

/// A merge naming a user that does not exist yet waits (in `merge_waits`, tried again with
/// backoff) and is applied once the sign-up arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_waits_for_a_user_not_synced_yet() {
    let mut h = Harness::new().await;
    h.start().await;
    let old = sign_up(&h, "early").await;
    h.wait_handled(1).await;
    let late = ids::user_id("p", "late");
    produce_merge(&h, "early-into-late", old, late).await;
    // Waited for, not slept on: how soon the merge member fetches depends on the machine.
    wait_for("the merge waits aside", || async {
        h.db.count("SELECT count(*) FROM merge_waits").await == 1
    })
    .await;
    assert_eq!(h.db.count("SELECT count(*) FROM merges").await, 0);
    assert_eq!(
        h.worker().metrics.batch_retries.get(),
        0,
        "its partition does not retry"
    );
    sign_up(&h, "late").await;
    wait_for("merge applied", || async {
        h.db.count("SELECT count(*) FROM merges").await == 1
    })
    .await;
    h.stop().await;
}

/// A→B then B→C: everything, identities included, ends at C.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chained_merges_end_at_the_last_survivor() {
    let mut h = Harness::new().await;
    h.start().await;
    let (a, b, c) = (
        sign_up(&h, "a").await,
        sign_up(&h, "b").await,
        sign_up(&h, "c").await,
    );
    h.wait_handled(3).await;
    sqlx::raw_sql(&format!(
        "INSERT INTO assets (id, owner_id, name) VALUES (gen_random_uuid(), '{a}', 'from-a')"
    ))
    .execute(&h.db.pool)
    .await
    .expect("asset");
    produce_merge(&h, "a-b", a, b).await;
    h.wait_handled(4).await;
    produce_merge(&h, "b-c", b, c).await;
    h.wait_handled(5).await;
    h.stop().await;
    assert_eq!(
        h.db.count(&format!(
            "SELECT count(*) FROM external_identities WHERE user_id = '{c}'"
        ))
        .await,
        3
    );
    assert_eq!(
        h.db.count(&format!(
            "SELECT count(*) FROM assets WHERE owner_id = '{c}'"
        ))
        .await,
        1
    );
    assert_eq!(
        h.db.count(&format!(
            "SELECT count(*) FROM users WHERE lifecycle_state = 'merged' AND id IN ('{a}', '{b}')"
        ))
        .await,
        2
    );
}

fn input(topic: &str, partition: i32, offset: i64, value: Vec<u8>) -> InputMessage {
    InputMessage {
        topic: topic.into(),
        partition,
        offset,
        key: None,
        value: Some(value),
        headers: vec![],
        timestamp: None,
    }
}

/// Merges racing logins of both users: no deadlock, nothing lost, and every login after
/// the merge commits lands on the survivor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_racing_logins_of_either_user() {
    let db = TestDb::new().await;
    let config = test_config("unused:9092", &db.url);
    let ctx = Arc::new(StepContext::from_config(&config).unwrap());
    let signups: Vec<InputMessage> = ["x", "y"]
        .iter()
        .enumerate()
        .map(|(i, s)| {
            input(
                "auth.login.v1",
                0,
                i as i64,
                login(
                    &format!("su-{s}"),
                    "2026-05-01T10:00:00Z",
                    json!({"provider": "p", "subject": s}),
                ),
            )
        })
        .collect();
    run_batch(&db.pool, &ctx, &AuthSync, &signups)
        .await
        .expect("signups");
    let (x, y) = (ids::user_id("p", "x"), ids::user_id("p", "y"));
    let mut tasks = Vec::new();
    for round in 0..10 {
        for (subject, partition) in [("x", 1), ("y", 2)] {
            let (pool, ctx) = (db.pool.clone(), ctx.clone());
            tasks.push(tokio::spawn(async move {
                let batch = [input(
                    "auth.login.v1",
                    partition,
                    round,
                    login(
                        &format!("l-{subject}-{round}"),
                        "2026-05-01T11:00:00Z",
                        json!({"provider": "p", "subject": subject}),
                    ),
                )];
                loop {
                    match run_batch(&pool, &ctx, &AuthSync, &batch).await {
                        Ok(r) => return r.applied,
                        Err(e) if e.is_retryable() => continue,
                        Err(e) => panic!("{e}"),
                    }
                }
            }));
        }
    }
    let (pool, mctx) = (db.pool.clone(), ctx.clone());
    let merge = tokio::spawn(async move {
        let merge_step = AccountMerge;
        let batch = [input(
            "auth.merge.v1",
            0,
            0,
            merge_event("race-merge", x, y),
        )];
        loop {
            match run_batch(&pool, &mctx, &merge_step, &batch).await {
                Ok(r) => return r.applied,
                Err(e) if e.is_retryable() => continue,
                Err(e) => panic!("{e}"),
            }
        }
    });
    let mut applied = 0;
    for t in tasks {
        applied += t.await.expect("login task");
    }
    assert_eq!(merge.await.expect("merge task"), 1);
    assert_eq!(applied, 20, "every login applied");
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM external_identities WHERE user_id = '{y}'"
        ))
        .await,
        2
    );
    assert_eq!(
        db.count("SELECT sum(login_count)::int8 FROM users").await,
        22,
        "no login lost or doubled"
    );
    // A login after the merge lands on the survivor.
    let after = [input(
        "auth.login.v1",
        1,
        99,
        login(
            "x-after",
            "2026-05-01T12:00:00Z",
            json!({"provider": "p", "subject": "x"}),
        ),
    )];
    run_batch(&db.pool, &ctx, &AuthSync, &after)
        .await
        .expect("after");
    let subject: String = sqlx::query_scalar(
        "SELECT convert_from(payload, 'UTF8')::jsonb->>'subject' FROM outbox
         WHERE event_type = 'user.synced' AND convert_from(payload, 'UTF8')::jsonb->>'causationid' = 'x-after'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("synced after merge");
    assert_eq!(subject, y.to_string());
}

/// `replay --online --reprocess` of the merge topic beside the running worker: the merge is
/// applied again and moves nothing twice, `user.merged` is announced once, and a plain
/// online replay finds it applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_replay_of_the_merge_topic_moves_nothing_twice() {
    use authsync::ops::replay::{ReplayFrom, ReplayRequest};
    use authsync::ops::replay_lane::{self, LaneOptions};
    use tokio_util::sync::CancellationToken;

    let mut h = Harness::new().await;
    h.start().await;
    let old = sign_up(&h, "old").await;
    let new = sign_up(&h, "new").await;
    h.wait_handled(2).await;
    seed_content(&h.db, old, new).await;
    produce_merge(&h, "merge-1", old, new).await;
    h.wait_handled(3).await;
    h.wait_published().await;
    let mut request = ReplayRequest {
        topic: h.config.topics.merge.clone(),
        group: h.config.kafka.group_id.clone(),
        from: ReplayFrom::Beginning,
        reprocess: true,
        dry_run: true,
    };
    let lane = |request: ReplayRequest| {
        let (config, pool) = (h.config.clone(), h.db.pool.clone());
        async move {
            replay_lane::run(
                &config,
                &pool,
                &request,
                &LaneOptions::default(),
                CancellationToken::new(),
            )
            .await
            .expect("online replay of the merge topic")
        }
    };
    wait_for("the merge's offset committed", || async {
        let plan = lane(request.clone()).await;
        plan.plans
            .iter()
            .map(|p| p.current.unwrap_or(p.new) - p.new)
            .sum::<i64>()
            == 1
    })
    .await;
    request.dry_run = false;
    let again = lane(request.clone()).await;
    assert_eq!(again.inbox_rows_deleted, 1);
    assert_eq!(again.read.values().sum::<u64>(), 1);
    assert_eq!(again.report.dead_lettered_total(), 0, "{:?}", again.report);
    request.reprocess = false;
    let plain = lane(request).await;
    assert_eq!(plain.report.duplicates, 1, "{:?}", plain.report);
    h.wait_published().await;
    h.stop().await;

    for (sql, n) in [
        (format!("SELECT count(*) FROM assets WHERE owner_id = '{new}'"), 5),
        (format!("SELECT count(*) FROM threads WHERE owner_id = '{new}'"), 3),
        (format!("SELECT count(*) FROM merges WHERE old_user_id = '{old}' AND new_user_id = '{new}'"), 1),
        (format!("SELECT count(*) FROM users WHERE id = '{old}' AND lifecycle_state = 'merged' AND merged_into = '{new}'"), 1),
    ] {
        assert_eq!(h.db.count(&sql).await, n, "{sql}");
    }
    let merged = h
        .outputs(4 + 1)
        .await
        .into_iter()
        .filter(|o| o.event_type() == "user.merged")
        .count();
    assert_eq!(merged, 1, "announced once");
}
