//! `merge`: account merges.
use super::*;

impl Bench {
    /// One user owning `n` rows across the tables a merge re-points, merged into another
    /// (through the same step the pipeline runs, in one transaction).
    pub(crate) async fn merge(&self, n: usize) -> anyhow::Result<()> {
        use authsync::steps::merge::AccountMerge;
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let db = Db::create(&self.args.database_url).await?;
        let config = self.config(&db, &suffix, 0);
        let ctx = Self::ctx(&config)?;
        let users = logins(&format!("m-{suffix}"), 2, 2, 0);
        let signups: Vec<InputMessage> = users
            .iter()
            .enumerate()
            .map(|(i, (k, v))| InputMessage {
                topic: config.topics.login.clone(),
                partition: 0,
                offset: i as i64,
                key: Some(k.as_bytes().to_vec()),
                value: Some(v.clone()),
                headers: vec![],
                timestamp: None,
            })
            .collect();
        run_batch(&db.pool, &ctx, &AuthSync, &signups).await?;
        let old = authsync::domain::ids::user_id("bench", "user-0");
        let new = authsync::domain::ids::user_id("bench", "user-1");
        progress(&format!("merge: seeding {n} rows owned by the old user"));
        let per = (n / 10).max(1) as i64;
        sqlx::raw_sql(&format!(
            r#"
            INSERT INTO assets (id, owner_id, name) SELECT gen_random_uuid(), '{old}', 'a' FROM generate_series(1, {a});
            INSERT INTO threads (id, owner_id) SELECT gen_random_uuid(), '{old}' FROM generate_series(1, {per});
            INSERT INTO asset_references (id, asset_id, created_by) SELECT gen_random_uuid(), gen_random_uuid(), '{old}' FROM generate_series(1, {per});
            INSERT INTO recent_assets (user_id, asset_id) SELECT '{old}', gen_random_uuid() FROM generate_series(1, {per});
            INSERT INTO recent_threads (user_id, thread_id) SELECT '{old}', gen_random_uuid() FROM generate_series(1, {per});
            INSERT INTO assets_to_collections (id, asset_id, collection_id, created_by) SELECT gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), '{old}' FROM generate_series(1, {per});
            INSERT INTO threads_to_collections (id, thread_id, collection_id, created_by) SELECT gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), '{old}' FROM generate_series(1, {per});
            INSERT INTO collection_permissions (collection_id, user_id, action) SELECT gen_random_uuid(), '{old}', 'write' FROM generate_series(1, {per});
            INSERT INTO collections (id, tenant_id, organization_id, kind, label, path, created_by)
                SELECT x, x, x, 'folder', 'c', ARRAY[x], '{old}' FROM (SELECT gen_random_uuid() AS x FROM generate_series(1, {per})) s;
            INSERT INTO access_tokens (token, user_id) SELECT 't' || g, '{old}' FROM generate_series(1, {per}) g;
            ANALYZE;
            "#,
            a = n as i64 - 9 * per,
        ))
        .execute(&db.pool)
        .await?;
        let value = serde_json::to_vec(&serde_json::json!({
            "specversion": "1.0", "id": format!("bench-merge-{suffix}"), "source": "bench",
            "type": "auth.merge", "time": chrono::Utc::now().to_rfc3339(),
            "data": {"newUserID": new, "oldUserId": old, "reason": "bench", "requestedBy": "authsync-bench"},
        }))?;
        let message = InputMessage {
            topic: config.topics.merge.clone(),
            partition: 0,
            offset: 0,
            key: Some(old.to_string().into_bytes()),
            value: Some(value),
            headers: vec![],
            timestamp: None,
        };
        progress("merge: merging");
        let started = Instant::now();
        let report = run_batch(
            &db.pool,
            &ctx,
            &AccountMerge,
            std::slice::from_ref(&message),
        )
        .await?;
        let secs = started.elapsed().as_secs_f64();
        if report.applied != 1 {
            bail!("merge not applied: {report:?}");
        }
        let moved = db
            .count(&format!(
                "SELECT count(*) FROM assets WHERE owner_id = '{new}'"
            ))
            .await;
        Report {
            scenario: "merge",
            events: 1,
            secs,
            ceiling_secs: None,
            p50: secs * 1000.0,
            p99: secs * 1000.0,
            rss: 0,
            extra: serde_json::json!({"rows_owned": n, "assets_moved": moved, "target_seconds": 3}),
        }
        .print();
        db.drop().await;
        Ok(())
    }
}
