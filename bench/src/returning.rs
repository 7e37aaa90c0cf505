//! `returning`: returning logins against the ceiling; `--replicas N` with N workers.
use super::*;

impl Bench {
    /// Sign up `users`, then measure `n` returning logins (pipeline vs ceiling).
    pub(crate) async fn returning(&self, n: usize) -> anyhow::Result<()> {
        let users = (n / 10).max(1);
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let signups = logins(&format!("r-{suffix}"), users, users, 0);
        let returning = logins(&format!("r-{suffix}"), users, n, 1);

        // Ceiling first, on its own database.
        let cdb = Db::create(&self.args.database_url).await?;
        let config = self.config(&cdb, &suffix, 0);
        progress("returning: ceiling (sign-ups)");
        self.ceiling(&cdb.pool, &config, &signups).await?;
        cdb.analyze().await?;
        progress("returning: ceiling (returning logins)");
        let ceiling = self.ceiling(&cdb.pool, &config, &returning).await?;
        cdb.drop().await;

        let db = Db::create(&self.args.database_url).await?;
        let config = self.config(&db, &suffix, free_port()?);
        progress("returning: topics");
        self.create_topics(&config).await?;
        progress("returning: producing sign-ups");
        self.produce(&config.topics.login, &signups).await?;
        progress("returning: pipeline (sign-ups)");
        self.run_pipeline(&config, &db, users as u64).await?;
        db.analyze().await?;
        progress("returning: producing returning logins");
        sqlx::raw_sql("TRUNCATE outbox").execute(&db.pool).await?;
        self.produce(&config.topics.login, &returning).await?;
        progress("returning: pipeline (returning logins)");
        let run = self.run_pipeline(&config, &db, n as u64).await?;
        Report {
            scenario: "returning",
            events: n,
            secs: run.secs,
            ceiling_secs: Some(ceiling),
            p50: run.p50_ms,
            p99: run.p99_ms,
            rss: run.rss,
            extra: merge(
                serde_json::json!({"users": users, "latency": "tx start -> broker ack"}),
                run.batches(),
            ),
        }
        .print();
        db.drop().await;
        if self.args.replicas > 1 {
            let single = n as f64 / run.secs.max(1e-9);
            self.returning_replicas(&signups, &returning, single)
                .await?;
        }
        Ok(())
    }

    /// `returning` with `--replicas` processes in one group. They start, and share the
    /// partitions, before anything is produced (a rebalance under load on tansu resumes
    /// inside a record batch, which it does not serve). Reports the total rate, the single
    /// replica's rate of the same run, and how the partitions and logins split.
    pub(crate) async fn returning_replicas(
        &self,
        signups: &[(String, Vec<u8>)],
        returning: &[(String, Vec<u8>)],
        single_per_s: f64,
    ) -> anyhow::Result<()> {
        let replicas = self.args.replicas;
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let db = Db::create(&self.args.database_url).await?;
        let base = self.config(&db, &suffix, 0);
        let topic = base.topics.login.clone();
        progress(&format!("returning: {replicas} replicas"));
        self.create_topics(&base).await?;
        let mut workers = Vec::new();
        for _ in 0..replicas {
            let mut config = base.clone();
            config.http.listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?));
            workers.push((self.spawn_worker(&config)?, config.http.listen));
        }
        let addrs: Vec<std::net::SocketAddr> = workers.iter().map(|(_, a)| *a).collect();
        // Per replica: (login partitions owned, logins consumed, logins handled).
        let read = |addrs: Vec<std::net::SocketAddr>, topic: String| async move {
            let mut out = Vec::new();
            for addr in addrs {
                let m = scrape(addr).await.unwrap_or_default();
                let of = |name: &str| topic_metric(&m, name, &topic);
                out.push((
                    of("authsync_partitions_assigned"),
                    of("authsync_messages_consumed_total"),
                    of("authsync_messages_processed_total"),
                ));
            }
            out
        };
        let wait = |what: &'static str, done: Until| {
            let (addrs, topic) = (addrs.clone(), topic.clone());
            async move {
                let deadline = Instant::now() + Duration::from_secs(600);
                loop {
                    let now = read(addrs.clone(), topic.clone()).await;
                    if done(&now) {
                        return Ok(now);
                    }
                    if Instant::now() > deadline {
                        bail!("{what}: not within 600 s ({now:?})");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let partitions = f64::from(self.args.partitions);
        wait(
            "replicas share the login partitions",
            Box::new(move |r| {
                r.iter().all(|(owned, _, _)| *owned > 0.0)
                    && r.iter().map(|(owned, _, _)| owned).sum::<f64>() == partitions
            }),
        )
        .await?;
        self.produce(&topic, signups).await?;
        let users = signups.len() as f64;
        wait(
            "sign-ups applied",
            Box::new(move |r| r.iter().map(|(_, _, h)| h).sum::<f64>() >= users),
        )
        .await?;
        db.analyze().await?;
        sqlx::raw_sql("TRUNCATE outbox").execute(&db.pool).await?;
        let before = read(addrs.clone(), topic.clone()).await;
        let consumed_before: f64 = before.iter().map(|(_, c, _)| c).sum();
        self.produce(&topic, returning).await?;
        let first = wait(
            "first returning login fetched",
            Box::new(move |r| r.iter().map(|(_, c, _)| c).sum::<f64>() > consumed_before),
        );
        first.await?;
        let t0 = Instant::now();
        let total = users + returning.len() as f64;
        let after = wait(
            "returning logins applied",
            Box::new(move |r| r.iter().map(|(_, _, h)| h).sum::<f64>() >= total),
        )
        .await?;
        while db.count("SELECT count(*) FROM outbox").await > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let secs = t0.elapsed().as_secs_f64();
        for (child, _) in &mut workers {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for (mut child, _) in workers {
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
        let per_s = returning.len() as f64 / secs;
        println!(
            "{}",
            serde_json::json!({
                "scenario": "returning_replicas",
                "replicas": replicas,
                "events": returning.len(),
                "seconds": (secs * 1000.0).round() / 1000.0,
                "events_per_s": per_s.round(),
                "single_replica_events_per_s": single_per_s.round(),
                "ratio_to_single": ((per_s / single_per_s) * 1000.0).round() / 1000.0,
                "login_partitions_per_replica": after.iter().map(|(o, _, _)| *o).collect::<Vec<_>>(),
                "returning_applied_per_replica": after
                    .iter()
                    .zip(&before)
                    .map(|((_, _, h), (_, _, b))| h - b)
                    .collect::<Vec<_>>(),
            })
        );
        db.drop().await;
        Ok(())
    }
}
