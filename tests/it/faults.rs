//! Faults under load: the broker unavailable for 30 s, then Postgres "restarted" (every
//! connection cut and new ones refused for 10 s, through a proxy in front of the real
//! server, so the rest of the suite keeps its database). The worker recovers without a
//! restart, loses nothing, and `/readyz` shows each outage while it lasts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// A TCP proxy to Postgres that can be cut: every open connection dropped, new ones refused.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    /// Replaced on every cut: cancelling it drops the connections of that generation.
    generation: Arc<std::sync::Mutex<CancellationToken>>,
}

impl Proxy {
    async fn start(target: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let up = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let (up2, gen2) = (up.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused, as by a server that is down
                }
                let token = gen2.lock().expect("lock").clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        Self {
            port,
            up,
            generation,
        }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut g = self.generation.lock().expect("lock");
        g.cancel();
        *g = CancellationToken::new();
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_and_postgres_restart_under_load_lose_nothing_and_show_in_readyz() {
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let mut h = Harness::new().await;
    let proxied =
        h.db.url
            .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port));
    assert_ne!(
        proxied, h.db.url,
        "the test database is reached through the proxy"
    );
    h.config.database.url = authsync::config::Secret::new(proxied);
    h.config.consumer.stalled_after_secs = 5;
    h.start().await;
    let addr = h.worker().http_addr;
    wait_for("ready", || async {
        http_get(addr, "/readyz").await.0 == 200
    })
    .await;

    // Load: logins for 60 identities, produced the whole time (the producer retries while
    // the broker is down; librdkafka keeps them).
    let total = 600usize;
    let feeder = {
        let brokers = h.config.kafka.brokers.clone();
        let topic = h.config.topics.login.clone();
        tokio::spawn(async move {
            let producer = producer(&brokers);
            for i in 0..total {
                let value = login(
                    &format!("fault-{i}"),
                    &format!("2026-06-01T00:{:02}:{:02}Z", i / 60, i % 60),
                    json!({"provider": "f", "subject": format!("s{}", i % 60),
                           "displayName": format!("n{i}")}),
                );
                produce_to(
                    &producer,
                    &topic,
                    &format!("f:s{}", i % 60),
                    &value,
                    None,
                    &[],
                )
                .await;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 1. The broker is unavailable for 30 s.
    let cluster = h.cluster.as_ref().expect("mock cluster");
    cluster.broker_down(1).expect("down");
    let mut saw_broker_outage = false;
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < until {
        let (status, body) = http_get(addr, "/readyz").await;
        saw_broker_outage |= status == 503 && body.contains("Kafka");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cluster.broker_up(1).expect("up");
    assert!(saw_broker_outage, "/readyz showed the broker outage");
    wait_for("ready after the broker outage", || async {
        http_get(addr, "/readyz").await.0 == 200
    })
    .await;

    // 2. Postgres "restarts": every connection dropped, new ones refused, for 10 s.
    proxy.cut();
    let mut saw_db_outage = false;
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < until {
        let (status, _) = http_get(addr, "/readyz").await;
        saw_db_outage |= status == 503;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    proxy.restore();
    assert!(saw_db_outage, "/readyz showed the database outage");

    feeder.await.expect("feeder");
    wait_for("every login handled", || async {
        h.db.count("SELECT count(*) FROM inbox").await == total as i64
    })
    .await;
    h.wait_published().await;
    wait_for("ready again", || async {
        http_get(addr, "/readyz").await.0 == 200
    })
    .await;
    assert_eq!(h.db.count("SELECT count(*) FROM users").await, 60);
    let out = read_topics(
        &h.config.kafka.brokers,
        std::slice::from_ref(&h.config.topics.user_events),
        total + 60,
    )
    .await;
    let ids: std::collections::HashSet<String> = out
        .iter()
        .map(|o| o.json()["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        ids.len(),
        total + 60,
        "every result published, none missing"
    );
    h.stop().await;
}
