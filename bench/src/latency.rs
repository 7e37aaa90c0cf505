//! `latency` and `mixed`: produce → result latency beside the broker's own floor.
use super::*;

impl Bench {
    /// A reader of `topic` from its start, fetching with a short wait (latency scenarios).
    pub(crate) fn latency_reader(
        &self,
        group: &str,
        topic: &str,
    ) -> anyhow::Result<StreamConsumer> {
        let reader: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", group)
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "5")
            .create()?;
        reader.subscribe(&[topic])?;
        Ok(reader)
    }

    /// Polls `consumer` until the group gave it partitions (nothing is on its topics yet),
    /// so no group join lands inside the measured window.
    pub(crate) async fn joined<C: rdkafka::consumer::ConsumerContext + 'static>(
        consumer: &StreamConsumer<C>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while consumer.assignment()?.count() == 0 {
            if Instant::now() > deadline {
                bail!("consumer got no partitions within 30 s");
            }
            tokio::select! {
                m = consumer.recv() => { m?; }
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        Ok(())
    }

    /// Fetches `topic`'s metadata with `producer`, so its first send does not wait for it.
    pub(crate) async fn warmed<C: rdkafka::ClientContext + 'static>(
        producer: &FutureProducer<C>,
        topic: &str,
    ) -> anyhow::Result<()> {
        let (producer, topic) = (producer.clone(), topic.to_string());
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .map(|_| ())
        })
        .await??;
        Ok(())
    }

    /// Waits until the worker owns every input partition (its own metrics say so).
    pub(crate) async fn worker_joined(&self, config: &Config) -> anyhow::Result<()> {
        // Both members (one per input topic): the partitions of either pull only once
        // every member of the process has its first assignment.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let metrics = scrape(config.http.listen).await.unwrap_or_default();
            let owned = |topic: &str| -> f64 {
                let line = format!("authsync_partitions_assigned{{topic=\"{topic}\"}} ");
                metrics
                    .lines()
                    .find_map(|l| l.strip_prefix(&line)?.trim().parse().ok())
                    .unwrap_or(0.0)
            };
            let (login, merge) = (owned(&config.topics.login), owned(&config.topics.merge));
            if login >= self.args.partitions as f64 && merge >= 1.0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the worker owns {login} login and {merge} merge partitions after 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The broker's own share of the latency, measured the way the pipeline uses it: the
    /// same pacing and duration, an input topic, a forwarder with the worker's consumer and
    /// relay-producer settings (and nothing else in between), an output topic, the same
    /// reader. (tansu's in-memory storage slows as topics grow, so a shorter floor run
    /// would flatter the broker.) Returns (p50, p99) in ms and, when the bench started the
    /// broker, the cores it used meanwhile.
    pub(crate) async fn broker_floor(&self, config: &Config, n: usize) -> anyhow::Result<Floor> {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let rate = self.args.rate.max(1) as usize;
        let (input, output) = (
            format!("bench.floor-in.{suffix}"),
            format!("bench.floor-out.{suffix}"),
        );
        self.create_named_topics(&[input.clone(), output.clone()])
            .await?;
        let mut forwarder_config = config.clone();
        forwarder_config.kafka.group_id = format!("bench-forwarder-{suffix}");
        let forwarder: StreamConsumer =
            authsync::consumer::consumer_client_config(&forwarder_config).create()?;
        forwarder.subscribe(&[&input])?;
        Self::joined(&forwarder).await?;
        let relay_producer = relay::producer(config)?;
        Self::warmed(&relay_producer, &output).await?;
        let stop = tokio_util::sync::CancellationToken::new();
        let forwarding = tokio::spawn({
            let (stop, output) = (stop.clone(), output.clone());
            async move {
                loop {
                    let m = tokio::select! {
                        _ = stop.cancelled() => break,
                        m = forwarder.recv() => m,
                    };
                    let Ok(m) = m else { continue };
                    let mut record =
                        FutureRecord::to(&output).payload(m.payload().unwrap_or_default());
                    if let Some(k) = m.key() {
                        record = record.key(k);
                    }
                    if let Ok(d) = relay_producer.send_result(record) {
                        drop(d);
                    }
                }
            }
        });
        let reader = self.latency_reader(&format!("bench-floor-{suffix}"), &output)?;
        Self::joined(&reader).await?;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("linger.ms", "0")
            .create()?;
        Self::warmed(&producer, &input).await?;
        // One clock for both sides: the payload carries its send time (µs since t0), padded
        // to about a login's size.
        let broker_cpu_before = self.broker_cpu_secs();
        let t0 = Instant::now();
        let sender = tokio::spawn({
            let (producer, topic) = (producer.clone(), input.clone());
            paced(rate, n, move |i| {
                let sent = format!("{:<600}", t0.elapsed().as_micros());
                let key = format!("k-{}", i % 1000);
                if let Ok(d) =
                    producer.send_result(FutureRecord::to(&topic).key(&key).payload(&sent))
                {
                    drop(d);
                }
            })
        });
        let mut latencies = Vec::with_capacity(n);
        let deadline = Instant::now() + Duration::from_secs((n / rate) as u64 + 30);
        while latencies.len() < n && Instant::now() < deadline {
            let m = tokio::select! {
                m = reader.recv() => m?,
                _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
            };
            let sent_us: f64 = std::str::from_utf8(m.payload().unwrap_or_default())?
                .trim_end()
                .parse()?;
            latencies.push(t0.elapsed().as_secs_f64() * 1000.0 - sent_us / 1000.0);
        }
        sender.await?;
        let broker_cores = self
            .broker_cpu_secs_since(broker_cpu_before)
            .map(|secs| cores(secs, t0));
        stop.cancel();
        forwarding.await?;
        latencies.sort_by(|a, b| a.total_cmp(b));
        let pct = |q: f64| percentile(&latencies, q);
        Ok(Floor {
            p50: pct(0.5),
            p99: pct(0.99),
            cores: broker_cores,
        })
    }

    /// `--rate` logins/s paced; latency = produce → result readable on the output topic,
    /// beside the broker's two-hop floor measured in the same run.
    pub(crate) async fn latency(&self, n: usize) -> anyhow::Result<()> {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let db = Db::create(&self.args.database_url).await?;
        let config = self.config(&db, &suffix, free_port()?);
        progress("latency: broker floor (two hops through a forwarder, no database)");
        let floor = self.broker_floor(&config, n).await?;
        progress("latency: the pipeline");
        let run = self.live_latency(&config, &db, n, None).await?;
        run.report("latency", &floor, serde_json::json!({}));
        db.drop().await;
        Ok(())
    }

    /// `--rate` logins/s for 20 s while, from the 4th second, `replayed` old events (all
    /// applied before) are read again: by `authsync replay --online` beside the worker, or
    /// with `--rewind` delivered again on the same topic, in front of the live logins.
    pub(crate) async fn mixed(&self, replayed: usize) -> anyhow::Result<()> {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let db = Db::create(&self.args.database_url).await?;
        let config = self.config(&db, &suffix, free_port()?);
        let n = 20 * self.args.rate as usize;
        progress("mixed: broker floor (two hops through a forwarder, no database)");
        let floor = self.broker_floor(&config, n).await?;
        // The old events, applied directly (the same step) and their results published
        // long ago: a replay finds each in the inbox and announces nothing.
        progress("mixed: applying the events to be replayed");
        let old = logins(&format!("m-{suffix}"), (replayed / 10).max(1), replayed, 0);
        self.ceiling(&db.pool, &config, &old).await?;
        sqlx::query("DELETE FROM outbox").execute(&db.pool).await?;
        let replay = if self.args.rewind {
            Replay::Redeliver(old)
        } else {
            // On the topic already, and read by the workers' group: what an online replay
            // reads again.
            self.create_topics(&config).await?;
            self.produce(&config.topics.login, &old).await?;
            commit_at_end(&self.brokers, &config.kafka.group_id, &config.topics.login)?;
            Replay::Online
        };
        progress("mixed: live logins with a replay from the 4th second");
        let run = self.live_latency(&config, &db, n, Some(replay)).await?;
        run.report(
            "mixed",
            &floor,
            serde_json::json!({
                "replayed": replayed,
                "replay": if self.args.rewind { "rewind" } else { "online" },
                "replay_max_rate": self.args.replay_rate,
            }),
        );
        db.drop().await;
        Ok(())
    }

    /// Runs the worker over `n` logins paced at `--rate`, each timed from its send to its
    /// `user.synced` on the output topic; with `replay`, those events are produced again
    /// (as fast as the producer goes) once a sixth of the logins are out.
    pub(crate) async fn live_latency(
        &self,
        config: &Config,
        db: &Db,
        n: usize,
        replay: Option<Replay>,
    ) -> anyhow::Result<LatencyRun> {
        let rate = self.args.rate.max(1) as usize;
        if !matches!(replay, Some(Replay::Online)) {
            self.create_topics(config).await?;
        }
        let mut child = self.spawn_worker(config)?;
        let pid = child.id();
        let reader = self.latency_reader(
            &format!("bench-reader-{}", config.kafka.group_id),
            &config.topics.user_events,
        )?;
        // The worker and the reader join their groups before the clock starts.
        Self::joined(&reader).await?;
        self.worker_joined(config).await?;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("linger.ms", "0")
            .create()?;
        Self::warmed(&producer, &config.topics.login).await?;
        let users = 1000;
        let warmup = self.args.warmup_secs as usize * rate;
        if warmup > 0 {
            let topic = config.topics.login.clone();
            paced(rate, warmup, |i| {
                send_login(&producer, &topic, &format!("w-{i}"), i, users);
            })
            .await;
            let (mut seen, deadline) = (0, Instant::now() + Duration::from_secs(30));
            while seen < warmup && Instant::now() < deadline {
                let m = tokio::select! {
                    m = reader.recv() => m?,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                };
                let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())?;
                if v["type"] == "user.synced" {
                    seen += 1;
                }
            }
        }
        // login id -> its send time
        let sent: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
        let broker_cpu_before = self.broker_cpu_secs();
        let t0 = Instant::now();
        let t0_utc = chrono::Utc::now();
        let replay_window: Arc<std::sync::Mutex<Option<(Instant, Instant)>>> = Arc::default();
        let sender = {
            let (sent, topic, producer) =
                (sent.clone(), config.topics.login.clone(), producer.clone());
            tokio::spawn(paced(rate, n, move |i| {
                let id = format!("l-{i}");
                if let Ok(mut s) = sent.lock() {
                    s.insert(id.clone(), Instant::now());
                }
                send_login(&producer, &topic, &id, i, users);
            }))
        };
        let replaying = replay.map(|replay| {
            let (window, topic, wait) = (
                replay_window.clone(),
                config.topics.login.clone(),
                Duration::from_secs_f64(n as f64 / rate as f64 / 6.0),
            );
            let brokers = self.brokers.clone();
            let mut online = self.authsync_command(config);
            online.args(["replay", "--online", "--from-beginning", "--topic", &topic]);
            if let Some(rate) = self.args.replay_rate {
                online.args(["--max-rate", &rate.to_string()]);
            }
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let started = Instant::now();
                let result = match replay {
                    Replay::Redeliver(events) => produce_to(&brokers, &topic, &events).await,
                    Replay::Online => tokio::task::spawn_blocking(move || {
                        let status = online.status().context("spawn authsync replay")?;
                        anyhow::ensure!(status.success(), "authsync replay --online: {status}");
                        Ok(())
                    })
                    .await
                    .context("replay task")
                    .and_then(|r| r),
                };
                if let Ok(mut w) = window.lock() {
                    *w = Some((started, Instant::now()));
                }
                result
            })
        });
        let mut latencies: Vec<(Instant, f64)> = Vec::with_capacity(n);
        let deadline = Instant::now() + Duration::from_secs((n / rate) as u64 + 60);
        while latencies.len() < n && Instant::now() < deadline {
            let m = tokio::select! {
                m = reader.recv() => m?,
                _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
            };
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())?;
            if v["type"] != "user.synced" {
                continue;
            }
            let cause = v["causationid"].as_str().unwrap_or_default();
            if let Some(t) = sent.lock().ok().and_then(|s| s.get(cause).copied()) {
                latencies.push((t, t.elapsed().as_secs_f64() * 1000.0));
            }
        }
        let elapsed = t0.elapsed();
        sender.await?;
        if let Some(r) = replaying {
            r.await??;
        }
        let broker_secs = self.broker_cpu_secs_since(broker_cpu_before);
        let rss = peak_rss(pid);
        let cpu = Cpu::of(pid, db, broker_secs).await;
        let worker = scrape(config.http.listen).await.unwrap_or_default();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        // Logins sent from the replay's first message until 5 s after its last: those
        // that could queue behind it.
        let window = replay_window.lock().ok().and_then(|w| *w);
        let during: Vec<f64> = window
            .map(|(from, to)| {
                latencies
                    .iter()
                    .filter(|(t, _)| *t >= from && *t <= to + Duration::from_secs(5))
                    .map(|(_, l)| *l)
                    .collect()
            })
            .unwrap_or_default();
        // p99 per 10 s of sending: shows a pipeline (or broker) that degrades as it runs.
        let mut windows: Vec<Vec<f64>> = Vec::new();
        for (t, l) in &latencies {
            let w = (t.duration_since(t0).as_secs() / 10) as usize;
            if windows.len() <= w {
                windows.resize(w + 1, Vec::new());
            }
            windows[w].push(*l);
        }
        let mut seconds: Vec<Vec<f64>> = Vec::new();
        for (t, l) in &latencies {
            let w = t.duration_since(t0).as_secs() as usize;
            if w < 10 {
                if seconds.len() <= w {
                    seconds.resize(w + 1, Vec::new());
                }
                seconds[w].push(*l);
            }
        }
        let p99_first_seconds = seconds
            .into_iter()
            .map(|mut w| {
                w.sort_by(|a, b| a.total_cmp(b));
                (percentile(&w, 0.99) * 10.0).round() / 10.0
            })
            .collect();
        let p99_by_10s = windows
            .into_iter()
            .map(|mut w| {
                w.sort_by(|a, b| a.total_cmp(b));
                (percentile(&w, 0.99) * 10.0).round() / 10.0
            })
            .collect();
        // The slowest logins and when they were sent: to line a tail up with what else the
        // machine did then (a checkpoint or an autovacuum in Postgres's log, say).
        let mut slowest: Vec<(f64, f64)> = latencies
            .iter()
            .map(|(t, l)| (t.duration_since(t0).as_secs_f64(), *l))
            .collect();
        slowest.sort_by(|a, b| b.1.total_cmp(&a.1));
        slowest.truncate(5);
        let slowest = slowest
            .into_iter()
            .map(|(at, ms)| {
                let sent_at = t0_utc + chrono::Duration::microseconds((at * 1e6) as i64);
                serde_json::json!({
                    "sent_at": sent_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    "second": (at * 10.0).round() / 10.0,
                    "ms": (ms * 10.0).round() / 10.0,
                })
            })
            .collect();
        Ok(LatencyRun {
            sent: n,
            rate,
            warmup_secs: self.args.warmup_secs,
            p99_by_10s,
            p99_first_seconds,
            slowest,
            latencies: latencies.into_iter().map(|(_, l)| l).collect(),
            during_replay: window.map(|(from, to)| (during, (to - from).as_secs_f64())),
            stats: WorkerStats::of(&worker),
            rss,
            cpu,
            batch_in_flight_avg: sum_metric(&worker, "authsync_batch_duration_seconds_sum")
                / elapsed.as_secs_f64().max(1e-9),
            broker_cores: broker_secs.map(|secs| secs / elapsed.as_secs_f64().max(1e-9)),
        })
    }
}

/// Sends login `id`, the `i`-th, of one of `users` users (keyed by user), without waiting
/// for its delivery. Its event time is the wall clock: never stale against replayed events.
fn send_login(producer: &FutureProducer, topic: &str, id: &str, i: usize, users: usize) {
    let key = format!("bench:user-{}", i % users);
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let value = login_value(id, i % users, i, &now);
    if let Ok(d) = producer.send_result(FutureRecord::to(topic).key(&key).payload(&value)) {
        drop(d);
    }
}

/// How `mixed` reads its old events again.
pub(crate) enum Replay {
    /// Produced again on the live topic: in front of the live logins, as a rewind puts them.
    Redeliver(Vec<(String, Vec<u8>)>),
    /// `authsync replay --online --from-beginning` beside the worker.
    Online,
}

/// Commits `group`'s offsets at the end of every partition of `topic`: a group that has
/// read everything there is.
fn commit_at_end(brokers: &str, group: &str, topic: &str) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let timeout = Duration::from_secs(10);
    let metadata = client.fetch_metadata(Some(topic), timeout)?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            let (_, high) = client.fetch_watermarks(topic, p.id(), timeout)?;
            tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Offset(high))?;
        }
    }
    client.commit(&tpl, CommitMode::Sync)?;
    Ok(())
}

/// One paced latency run (see [`Bench::live_latency`]).
pub(crate) struct LatencyRun {
    pub(crate) sent: usize,
    pub(crate) rate: usize,
    pub(crate) warmup_secs: u64,
    pub(crate) p99_by_10s: Vec<f64>,
    /// p99 of each of the first 10 s: the worker's start apart from its steady state.
    pub(crate) p99_first_seconds: Vec<f64>,
    /// The five slowest logins: when each was sent (UTC, and seconds into the run) and ms.
    pub(crate) slowest: Vec<serde_json::Value>,
    /// Produce → `user.synced` readable, ms, per login received.
    pub(crate) latencies: Vec<f64>,
    /// The latencies of logins sent during the replay (and 5 s after), and how long its
    /// delivery took, s.
    pub(crate) during_replay: Option<(Vec<f64>, f64)>,
    pub(crate) stats: WorkerStats,
    pub(crate) rss: u64,
    pub(crate) cpu: Cpu,
    /// Batches in flight on average (seconds in batches over the run's seconds).
    pub(crate) batch_in_flight_avg: f64,
    pub(crate) broker_cores: Option<f64>,
}

/// The broker's two-hop floor of the same run (see [`Bench::broker_floor`]).
pub(crate) struct Floor {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) cores: Option<f64>,
}

pub(crate) fn quantiles(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(|a, b| a.total_cmp(b));
    let tenth = |x: f64| (x * 10.0).round() / 10.0;
    serde_json::json!({
        "p50_ms": tenth(percentile(&v, 0.5)),
        "p90_ms": tenth(percentile(&v, 0.9)),
        "p99_ms": tenth(percentile(&v, 0.99)),
        "max_ms": tenth(v.last().copied().unwrap_or(0.0)),
        "n": v.len(),
    })
}

impl LatencyRun {
    pub(crate) fn report(self, scenario: &'static str, floor: &Floor, extra: serde_json::Value) {
        let tenth = |v: f64| (v * 10.0).round() / 10.0;
        let hundredth = |v: f64| (v * 100.0).round() / 100.0;
        let w = &self.stats;
        let pipeline = quantiles(self.latencies.clone());
        let mut sorted = self.latencies;
        sorted.sort_by(|a, b| a.total_cmp(b));
        let (p50, p99) = (percentile(&sorted, 0.5), percentile(&sorted, 0.99));
        let during = self.during_replay.map(|(d, secs)| {
            merge(
                quantiles(d),
                serde_json::json!({"replay_delivery_secs": tenth(secs)}),
            )
        });
        Report {
            scenario,
            events: sorted.len(),
            secs: self.sent as f64 / self.rate as f64,
            ceiling_secs: None,
            p50,
            p99,
            rss: self.rss,
            extra: merge(
                merge(
                    serde_json::json!({
                        "rate_per_s": self.rate,
                        "latency": "produce -> user.synced readable on the output topic",
                        "sent": self.sent,
                        "pipeline": pipeline,
                        "pipeline_p99_by_10s": self.p99_by_10s,
                        "pipeline_p99_first_seconds": self.p99_first_seconds,
                        "warmup_secs": self.warmup_secs,
                        "slowest": self.slowest,
                        "during_replay": during,
                        "floor_two_hops": {"p50_ms": tenth(floor.p50), "p99_ms": tenth(floor.p99)},
                        "p50_over_floor": hundredth(p50 / floor.p50.max(1e-9)),
                        "p99_over_floor": hundredth(p99 / floor.p99.max(1e-9)),
                        "stages": {
                            "produce_to_batch_p50_ms": tenth(w.consume_p50_ms),
                            "produce_to_batch_p99_ms": tenth(w.consume_p99_ms),
                            "batch_avg_size": tenth(w.batch_avg_size),
                            "batch_avg_ms": tenth(w.batch_avg_ms),
                            "batch_p99_ms": tenth(w.batch_p99_ms),
                            "batches_in_flight_avg": hundredth(self.batch_in_flight_avg),
                            "tx_to_ack_p50_ms": tenth(w.delay_p50_ms),
                            "tx_to_ack_p99_ms": tenth(w.delay_p99_ms),
                            "relay_read_to_ack_p50_ms": tenth(w.publish_p50_ms),
                            "relay_read_to_ack_p99_ms": tenth(w.publish_p99_ms),
                        },
                        "broker_floor_cores": floor.cores.map(hundredth),
                        "broker_cores": self.broker_cores.map(hundredth),
                    }),
                    self.cpu.json(self.sent),
                ),
                extra,
            ),
        }
        .print();
    }
}
