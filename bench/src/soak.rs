//! `soak`: a long paced run; memory and latency over time.
use super::*;

impl Bench {
    /// `soak`: `--rate` logins/s for `--minutes` through the real binary, retention at its
    /// shortest (0 h, every 10 s) so the clean-up runs the whole time. Prints, every minute,
    /// RSS, consumer lag (produced − handled), outbox backlog and inbox size; passes when
    /// RSS stays within 10% of its value at the end of the warm-up (the first sixth of the
    /// run, at least two minutes: connection pools, statement caches and jemalloc's arenas
    /// fill up) and lag, backlog and inbox stay bounded (at most 30 s, 10 s and 120 s of
    /// input).
    pub(crate) async fn soak(&self) -> anyhow::Result<bool> {
        let (minutes, rate) = (self.args.minutes.max(3), self.args.rate.max(1));
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let db = Db::create(&self.args.database_url).await?;
        let mut config = self.config(&db, &suffix, free_port()?);
        config.relay.inbox_retention_hours = 0;
        config.relay.outbox_retention_hours = 0;
        config.relay.cleanup_interval_secs = 10;
        self.create_topics(&config).await?;
        let mut child = self.spawn_worker(&config)?;
        let pid = child.id();
        self.worker_joined(&config).await?;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "1000000")
            .create()?;
        let produced = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sender = {
            let (producer, topic, produced, stop) = (
                producer.clone(),
                config.topics.login.clone(),
                produced.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                let per_tick = (rate / 100).max(1);
                let mut i: u64 = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    tick.tick().await;
                    for _ in 0..per_tick {
                        let now =
                            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
                        let id = format!("soak-{i}");
                        let user = (i % 20_000) as usize;
                        let value = login_value(&id, user, i as usize, &now);
                        let key = format!("bench:user-{user}");
                        if producer
                            .send_result(FutureRecord::to(&topic).key(&key).payload(&value))
                            .is_ok()
                        {
                            produced.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        i += 1;
                    }
                }
            })
        };
        let warm_up = (minutes / 6).max(2);
        let mut rows = Vec::new();
        let mut passed = true;
        let mut baseline_rss = 0u64;
        let mut max_rss = 0u64;
        for minute in 1..=minutes {
            tokio::time::sleep(Duration::from_secs(60)).await;
            if let Ok(Some(status)) = child.try_wait() {
                bail!("authsync exited during the soak: {status}");
            }
            let metrics = scrape(config.http.listen).await.unwrap_or_default();
            let handled = sum_metric(&metrics, "authsync_messages_processed_total") as u64;
            let sent = produced.load(std::sync::atomic::Ordering::Relaxed);
            let lag = sent.saturating_sub(handled);
            let backlog = db.count("SELECT count(*) FROM outbox").await;
            let inbox = db.count("SELECT count(*) FROM inbox").await;
            let rss = current_rss(pid);
            if minute == warm_up {
                baseline_rss = rss;
            }
            if minute > warm_up {
                max_rss = max_rss.max(rss);
            }
            let row = serde_json::json!({
                "minute": minute, "produced": sent, "handled": handled, "lag": lag,
                "outbox_backlog": backlog, "inbox_rows": inbox,
                "rss_mib": (rss as f64 / 1048576.0 * 10.0).round() / 10.0,
            });
            println!("{row}");
            if minute > warm_up {
                passed &=
                    lag <= rate * 30 && backlog as u64 <= rate * 10 && inbox as u64 <= rate * 120;
            }
            rows.push(row);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        sender.await?;
        let rss_growth = if baseline_rss > 0 {
            max_rss as f64 / baseline_rss as f64
        } else {
            0.0
        };
        passed &= rss_growth <= 1.10;
        println!(
            "{}",
            serde_json::json!({
                "scenario": "soak", "minutes": minutes, "rate": rate, "passed": passed,
                "warm_up_minutes": warm_up,
                "rss_after_warmup_mib": (baseline_rss as f64 / 1048576.0 * 10.0).round() / 10.0,
                "rss_max_mib": (max_rss as f64 / 1048576.0 * 10.0).round() / 10.0,
                "rss_growth": (rss_growth * 1000.0).round() / 1000.0,
            })
        );
        let _ = child.kill();
        let _ = child.wait();
        db.drop().await;
        Ok(passed)
    }
}
