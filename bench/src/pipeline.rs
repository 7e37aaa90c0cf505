//! Topics, the worker subprocess, one pipeline run and its ceiling.
use super::*;

impl Bench {
    pub(crate) fn config(&self, db: &Db, suffix: &str, http_port: u16) -> Config {
        let mut c = Config::default();
        c.trust.unsigned = "trusted".into();
        c.kafka.brokers = self.brokers.clone();
        c.kafka.group_id = format!("bench-{suffix}");
        c.database.url = Secret::new(db.url.clone());
        c.topics.login = format!("bench.login.{suffix}");
        c.topics.user_events = format!("bench.user-events.{suffix}");
        c.topics.merge = format!("bench.merge.{suffix}");
        c.topics.partitions = self.args.partitions;
        c.consumer.batch_size = self.args.batch_size;
        c.http.listen = format!("127.0.0.1:{http_port}")
            .parse()
            .unwrap_or(c.http.listen);
        c
    }

    pub(crate) async fn create_topics(&self, config: &Config) -> anyhow::Result<()> {
        self.create_named_topics(&config.topics.all()).await
    }

    /// Creates `names` (dead-letter topics with one partition, the others with
    /// `--partitions`), through the mock cluster when it is the broker.
    pub(crate) async fn create_named_topics(&self, names: &[String]) -> anyhow::Result<()> {
        if let Some(cluster) = &self.mock {
            for t in names {
                let partitions = if t.ends_with(".dlq") {
                    1
                } else {
                    self.args.partitions
                };
                cluster.create_topic(t, partitions, 1)?;
            }
            return Ok(());
        }
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()?;
        // Dead-letter topics need no parallelism.
        let topics: Vec<NewTopic> = names
            .iter()
            .map(|t| {
                let partitions = if t.ends_with(".dlq") {
                    1
                } else {
                    self.args.partitions
                };
                NewTopic::new(t, partitions, TopicReplication::Fixed(1))
            })
            .collect();
        for r in admin.create_topics(&topics, &AdminOptions::new()).await? {
            match r {
                Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) | Ok(_) => {}
                Err((name, code)) => bail!("create topic {name}: {code}"),
            }
        }
        Ok(())
    }

    pub(crate) async fn produce(
        &self,
        topic: &str,
        messages: &[(String, Vec<u8>)],
    ) -> anyhow::Result<()> {
        produce_to(&self.brokers, topic, messages).await
    }

    pub(crate) fn spawn_worker(&self, config: &Config) -> anyhow::Result<Child> {
        let mut cmd = self.authsync_command(config);
        cmd.arg("run");
        cmd.spawn().context("spawn authsync")
    }

    /// The `authsync` binary with `config` in its environment (add the command).
    pub(crate) fn authsync_command(&self, config: &Config) -> Command {
        let mut cmd = Command::new(&self.authsync_bin);
        cmd.env("AUTHSYNC_KAFKA_BROKERS", &config.kafka.brokers)
            .env("AUTHSYNC_KAFKA_GROUP_ID", &config.kafka.group_id)
            .env("AUTHSYNC_DATABASE_URL", config.database.url.expose())
            .env("AUTHSYNC_TOPICS_LOGIN", &config.topics.login)
            .env("AUTHSYNC_TOPICS_USER_EVENTS", &config.topics.user_events)
            .env("AUTHSYNC_TOPICS_MERGE", &config.topics.merge)
            .env(
                "AUTHSYNC_CONSUMER_BATCH_SIZE",
                config.consumer.batch_size.to_string(),
            )
            .env("AUTHSYNC_HTTP_LISTEN", config.http.listen.to_string())
            // This producer stands in for a cluster whose ACLs admit only trusted producers.
            .env("AUTHSYNC_TRUST_UNSIGNED", "trusted")
            .env(
                "AUTHSYNC_RELAY_INBOX_RETENTION_HOURS",
                config.relay.inbox_retention_hours.to_string(),
            )
            .env(
                "AUTHSYNC_RELAY_OUTBOX_RETENTION_HOURS",
                config.relay.outbox_retention_hours.to_string(),
            )
            .env(
                "AUTHSYNC_RELAY_CLEANUP_INTERVAL_SECS",
                config.relay.cleanup_interval_secs.to_string(),
            )
            .env(
                "AUTHSYNC_LOG_LEVEL",
                std::env::var("AUTHSYNC_BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        cmd
    }

    /// Runs the worker over what the topic holds until `processed` messages are handled
    /// and the outbox is drained.
    pub(crate) async fn run_pipeline(
        &self,
        config: &Config,
        db: &Db,
        processed: u64,
    ) -> anyhow::Result<PipelineRun> {
        let broker_cpu_before = self.broker_cpu_secs();
        let mut child = self.spawn_worker(config)?;
        let pid = child.id();
        let addr = config.http.listen;
        let deadline = Instant::now() + Duration::from_secs(1800);
        let mut t0: Option<Instant> = None;
        let (done, last_metrics);
        loop {
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("pipeline did not finish");
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!("authsync exited early: {status}");
            }
            if let Some(m) = scrape(addr).await {
                // The clock starts at the first fetched message (or, for the relay alone,
                // the first published row).
                let consumed = sum_metric(&m, "authsync_messages_consumed_total")
                    + sum_metric(&m, "authsync_relay_published_total");
                let handled = sum_metric(&m, "authsync_messages_processed_total");
                if t0.is_none() && consumed > 0.0 {
                    t0 = Some(Instant::now());
                }
                if handled as u64 >= processed && db.count("SELECT count(*) FROM outbox").await == 0
                {
                    (done, last_metrics) = (Instant::now(), m);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let rss = peak_rss(pid);
        let broker_secs = self.broker_cpu_secs_since(broker_cpu_before);
        let cpu = Cpu::of(pid, db, broker_secs).await;
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        // The last scrape may predate the last acks by one poll: close enough for quantiles.
        let w = WorkerStats::of(&last_metrics);
        Ok(PipelineRun {
            secs: done.duration_since(t0.unwrap_or(done)).as_secs_f64(),
            rss,
            cpu,
            events: processed as usize,
            p50_ms: w.delay_p50_ms,
            p99_ms: w.delay_p99_ms,
            batch_avg_size: w.batch_avg_size,
            batch_avg_ms: w.batch_avg_ms,
            batch_total_secs: w.batch_total_secs,
        })
    }

    /// The broker's CPU seconds now, when the bench started it (`None` otherwise).
    pub(crate) fn broker_cpu_secs(&self) -> Option<f64> {
        self.broker_pid.map(cpu_secs)
    }

    /// The broker's CPU seconds since `before` (a `broker_cpu_secs` reading).
    pub(crate) fn broker_cpu_secs_since(&self, before: Option<f64>) -> Option<f64> {
        self.broker_cpu_secs().zip(before).map(|(now, b)| now - b)
    }

    pub(crate) fn ctx(config: &Config) -> anyhow::Result<StepContext> {
        Ok(StepContext::from_config(config)?)
    }

    /// The ceiling: the same step, same batches, one task per partition, no Kafka.
    pub(crate) async fn ceiling(
        &self,
        pool: &PgPool,
        config: &Config,
        messages: &[(String, Vec<u8>)],
    ) -> anyhow::Result<f64> {
        let ctx = Arc::new(Self::ctx(config)?);
        let partitions = self.args.partitions as usize;
        let mut per_partition: Vec<Vec<InputMessage>> = vec![Vec::new(); partitions];
        for (i, (key, value)) in messages.iter().enumerate() {
            let p = partition_of(key, partitions);
            per_partition[p].push(InputMessage {
                topic: config.topics.login.clone(),
                partition: p as i32,
                offset: i as i64,
                key: Some(key.as_bytes().to_vec()),
                value: Some(value.clone()),
                headers: vec![],
                timestamp: None,
            });
        }
        let started = Instant::now();
        let mut tasks = Vec::new();
        for batch_list in per_partition {
            let (pool, ctx, size) = (pool.clone(), ctx.clone(), self.args.batch_size);
            tasks.push(tokio::spawn(async move {
                for batch in batch_list.chunks(size) {
                    loop {
                        match run_batch(&pool, &ctx, &AuthSync, batch).await {
                            Ok(_) => break,
                            Err(e) if e.is_retryable() => continue,
                            Err(e) => return Err(anyhow::anyhow!(e)),
                        }
                    }
                }
                Ok::<_, anyhow::Error>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        Ok(started.elapsed().as_secs_f64())
    }
}
