//! `signup`, `replay` and `relay`.
use super::*;

impl Bench {
    pub(crate) async fn signup(&self, n: usize) -> anyhow::Result<()> {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let signups = logins(&format!("s-{suffix}"), n, n, 0);
        let cdb = Db::create(&self.args.database_url).await?;
        let config = self.config(&cdb, &suffix, 0);
        let ceiling = self.ceiling(&cdb.pool, &config, &signups).await?;
        cdb.drop().await;

        let db = Db::create(&self.args.database_url).await?;
        let config = self.config(&db, &suffix, free_port()?);
        self.create_topics(&config).await?;
        self.produce(&config.topics.login, &signups).await?;
        progress("signup: pipeline");
        let run = self.run_pipeline(&config, &db, n as u64).await?;
        Report {
            scenario: "signup",
            events: n,
            secs: run.secs,
            ceiling_secs: Some(ceiling),
            p50: run.p50_ms,
            p99: run.p99_ms,
            rss: run.rss,
            extra: merge(
                serde_json::json!({"latency": "tx start -> broker ack"}),
                run.batches(),
            ),
        }
        .print();
        db.drop().await;
        Ok(())
    }

    pub(crate) async fn replay(&self, n: usize) -> anyhow::Result<()> {
        let users = (n / 10).max(1);
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let events = logins(&format!("p-{suffix}"), users, n, 0);
        let cdb = Db::create(&self.args.database_url).await?;
        let config = self.config(&cdb, &suffix, 0);
        self.ceiling(&cdb.pool, &config, &events).await?;
        let ceiling = self.ceiling(&cdb.pool, &config, &events).await?; // all duplicates
        cdb.drop().await;

        let db = Db::create(&self.args.database_url).await?;
        let config = self.config(&db, &suffix, free_port()?);
        self.create_topics(&config).await?;
        self.produce(&config.topics.login, &events).await?;
        progress("replay: first pass");
        self.run_pipeline(&config, &db, n as u64).await?;
        // Re-deliver everything: the same events again (what a rewind re-reads).
        progress("replay: re-delivering");
        self.produce(&config.topics.login, &events).await?;
        let run = self.run_pipeline(&config, &db, n as u64).await?;
        Report {
            scenario: "replay",
            events: n,
            secs: run.secs,
            ceiling_secs: Some(ceiling),
            p50: 0.0,
            p99: 0.0,
            rss: run.rss,
            extra: run.batches(),
        }
        .print();
        db.drop().await;
        Ok(())
    }

    pub(crate) async fn relay(&self, n: usize) -> anyhow::Result<()> {
        use authsync::store::outbox::{self, NewMessage};
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let db = Db::create(&self.args.database_url).await?;
        let config = self.config(&db, &suffix, free_port()?);
        self.create_topics(&config).await?;
        let payload = login_value("x", 1, 0, &time_at(0));
        let rows: Vec<NewMessage> = (0..n)
            .map(|i| NewMessage {
                event_id: uuid::Uuid::new_v4(),
                topic: config.topics.user_events.clone(),
                key: Some(format!("user-{}", i % 20_000).into_bytes()),
                event_type: "user.synced".into(),
                payload: Some(payload.clone()),
                headers: vec![(
                    "content-type".into(),
                    b"application/cloudevents+json".to_vec(),
                )],
            })
            .collect();
        // Ceiling: the same messages straight to Kafka with the same producer settings.
        let producer = relay::producer(&config)?;
        let started = Instant::now();
        for chunk in rows.chunks(config.relay.batch_size as usize) {
            let futures: Vec<_> = chunk
                .iter()
                .filter_map(|r| {
                    producer
                        .send_result(
                            FutureRecord::to(&r.topic)
                                .key(r.key.as_deref().unwrap_or_default())
                                .payload(r.payload.as_deref().unwrap_or_default()),
                        )
                        .ok()
                })
                .collect();
            for f in futures {
                let _ = f.await;
            }
        }
        let ceiling = started.elapsed().as_secs_f64();
        drop(producer);

        for chunk in rows.chunks(5_000) {
            let mut conn = db.pool.acquire().await?;
            outbox::insert(&mut conn, chunk).await?;
        }
        // A worker with nothing to consume: only its relay works.
        progress("relay: publishing");
        let run = self.run_pipeline(&config, &db, 0).await?;
        Report {
            scenario: "relay",
            events: n,
            secs: run.secs,
            ceiling_secs: Some(ceiling),
            p50: 0.0,
            p99: 0.0,
            rss: run.rss,
            extra: merge(
                serde_json::json!({"ceiling": "same producer, no database"}),
                run.cpu.json(n),
            ),
        }
        .print();
        db.drop().await;
        Ok(())
    }
}
