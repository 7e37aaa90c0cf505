//! `authsync-bench ingest`: Clerk-style signed webhooks through `authsync ingest` to the
//! broker's acknowledgement, driven by a real HTTP load generator (`oha`), against
//! librdkafka's mock cluster hosted in this process. The ceiling of the same run is the same
//! requests answered by an ingest that verifies and decodes but does not produce
//! (`ingest.dry_run`).

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use authsync::config::{Config, IngestEndpointConfig, Secret};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One oha run's summary.
#[derive(Debug, Default)]
pub struct Load {
    pub requests_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub ok: u64,
    pub other: u64,
}

fn config(brokers: &str, topic: &str, dry_run: bool) -> Config {
    let mut c = Config::default();
    c.kafka.brokers = brokers.to_string();
    c.topics.login = topic.to_string();
    c.ingest.listen = "127.0.0.1:0".parse().unwrap_or(c.ingest.listen);
    c.ingest.signing_key = Secret::new("bench-source-key-0123456789abcdef0123456789");
    c.ingest.dry_run = dry_run;
    c.ingest.endpoints.insert(
        "clerk-bench".into(),
        IngestEndpointConfig {
            provider: "clerk".into(),
            secrets: vec![Secret::new(SECRET)],
            ..Default::default()
        },
    );
    c.log.level = "warn".into();
    c
}

/// `oha` with a fixed, validly signed Clerk delivery (the signature stays fresh for the
/// 5-minute tolerance, longer than the runs). `rate`: requests/s, or saturation.
fn oha(
    url: &str,
    body: &str,
    headers: &[(String, String)],
    secs: u64,
    rate: Option<u64>,
) -> anyhow::Result<Load> {
    let mut cmd = Command::new("oha");
    cmd.args([
        "--no-tui",
        "--output-format",
        "json",
        "-z",
        &format!("{secs}s"),
        "-m",
        "POST",
        "-c",
        "50",
    ]);
    if let Some(r) = rate {
        cmd.args(["-q", &r.to_string()]);
    }
    for (k, v) in headers {
        cmd.args(["-H", &format!("{k}: {v}")]);
    }
    cmd.args(["-d", body, url]);
    let out = cmd
        .output()
        .context("run oha (cargo install oha --locked)")?;
    if !out.status.success() {
        bail!("oha failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("oha JSON")?;
    let codes = v["statusCodeDistribution"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let ok = codes
        .get("200")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    let all: u64 = codes.values().filter_map(serde_json::Value::as_u64).sum();
    Ok(Load {
        requests_per_sec: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        p50_ms: v["latencyPercentiles"]["p50"].as_f64().unwrap_or(f64::NAN) * 1000.0,
        p99_ms: v["latencyPercentiles"]["p99"].as_f64().unwrap_or(f64::NAN) * 1000.0,
        ok,
        other: all - ok,
    })
}

/// Messages ever produced to the topic (sum of high watermarks: the mock cluster drops old
/// segments, so the low watermark moves).
fn produced(brokers: &str, topic: &str) -> anyhow::Result<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
    let mut total = 0;
    for t in metadata.topics() {
        for p in t.partitions() {
            let (_, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(5))?;
            total += high;
        }
    }
    Ok(total)
}

pub async fn run(
    brokers: &str,
    mock: Option<&rdkafka::mocking::MockCluster<'_, rdkafka::producer::DefaultProducerContext>>,
    secs: u64,
) -> anyhow::Result<()> {
    let topic = format!("auth.login.bench.{}", uuid::Uuid::new_v4().simple());
    match mock {
        // The mock cluster takes topics from its owner, not through the admin API.
        Some(cluster) => cluster.create_topic(&topic, 6, 1)?,
        None => authsync::kafka::ensure_topics(&config(brokers, &topic, false), true).await?,
    }
    let body = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/clerk/session-created.json"
    ))?;
    let id = "msg_bench_1";
    let ts = chrono::Utc::now().timestamp();
    let signature = standardwebhooks::Webhook::new(SECRET)?.sign(id, ts, body.as_bytes())?;
    let headers = vec![
        ("svix-id".to_string(), id.to_string()),
        ("svix-timestamp".to_string(), ts.to_string()),
        ("svix-signature".to_string(), signature),
        ("content-type".to_string(), "application/json".to_string()),
    ];
    let shutdown = CancellationToken::new();
    let ceiling = authsync::ingest::start(&config(brokers, &topic, true), shutdown.clone()).await?;
    let real = authsync::ingest::start(&config(brokers, &topic, false), shutdown.clone()).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let url = |addr: std::net::SocketAddr| format!("http://{addr}/hooks/clerk-bench");
    let (c_url, r_url) = (url(ceiling.addr), url(real.addr));
    let before = produced(brokers, &topic)?;
    let mut rows = Vec::new();
    for (label, rate) in [("1,000 requests/s", Some(1000)), ("saturation", None)] {
        let (c_url, r_url, body, headers) =
            (c_url.clone(), r_url.clone(), body.clone(), headers.clone());
        let (c, r) = tokio::task::spawn_blocking(move || -> anyhow::Result<(Load, Load)> {
            let c = oha(&c_url, &body, &headers, secs, rate)?;
            let r = oha(&r_url, &body, &headers, secs, rate)?;
            Ok((c, r))
        })
        .await??;
        rows.push((label, c, r));
    }
    let after = produced(brokers, &topic)?;
    let accepted: u64 = rows.iter().map(|(_, _, r)| r.ok).sum();
    shutdown.cancel();
    ceiling.wait().await?;
    real.wait().await?;

    println!("\n## ingest: signed Clerk webhooks → broker ack (mock cluster, oha -c 50, {secs} s per run)\n");
    println!("| load | ceiling (verify + decode, no produce) req/s | p50 | p99 | ingest req/s | p50 | p99 | ratio | non-200 |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (label, c, r) in &rows {
        println!(
            "| {label} | {:.0} | {:.2} ms | {:.2} ms | {:.0} | {:.2} ms | {:.2} ms | {:.2} | {} |",
            c.requests_per_sec,
            c.p50_ms,
            c.p99_ms,
            r.requests_per_sec,
            r.p50_ms,
            r.p99_ms,
            r.requests_per_sec / c.requests_per_sec.max(1.0),
            r.other
        );
    }
    // oha cuts the requests in flight at its deadline (at most its 50 connections per run):
    // the server may have produced those without oha counting the answer, as a provider
    // whose connection dropped would retry (the delivery id de-duplicates it).
    let produced = u64::try_from(after - before).unwrap_or(0);
    let cut = produced.saturating_sub(accepted);
    let verdict = if produced >= accepted && cut <= 2 * 50 {
        format!("one per answered request, none lost; {cut} more for requests oha cut off at its deadline")
    } else {
        "MISMATCH".to_string()
    };
    println!("\nproduced {produced} messages for {accepted} requests answered 200: {verdict}");
    Ok(())
}

/// What verifying source signatures costs the worker, per message, beside what decoding
/// the same message costs (the cheapest thing the worker does with every message), in the
/// same run: normalized logins as ingest produces them.
pub fn verify_cost(n: usize) -> anyhow::Result<()> {
    use authsync::events::source::{SigningKey, SourceKeys, SIGNATURE_HEADER, SOURCE_HEADER};
    use authsync::events::LoginEvent;
    let key = SigningKey::resolve(
        "k1",
        &Secret::new("bench-source-key-0123456789abcdef0123456789"),
        "bench",
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let keys = SourceKeys::new([key.clone()]);
    let body = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/clerk/user-created.json"
    ))?;
    let headers = vec![("svix-id".to_string(), b"msg_bench".to_vec())];
    let logins = authsync::events::providers::decode_login_message(
        authsync::events::providers::RawMessage {
            value: Some(&body),
            headers: &headers,
            timestamp: None,
        },
        1 << 20,
    )?;
    let value = serde_json::to_vec(&logins[0].to_cloudevent())?;
    let kafka_key = logins[0].partition_key();
    let signed = vec![
        (SOURCE_HEADER.to_string(), b"clerk-prod".to_vec()),
        (
            SIGNATURE_HEADER.to_string(),
            key.sign("clerk-prod", kafka_key.as_bytes(), &value)
                .into_bytes(),
        ),
    ];
    let time = |f: &mut dyn FnMut()| {
        let start = std::time::Instant::now();
        for _ in 0..n {
            f();
        }
        start.elapsed().as_secs_f64() * 1e6 / n as f64
    };
    let mut sink = 0usize;
    let decode = time(&mut || {
        sink += LoginEvent::decode(Some(&value), 1 << 20).map_or(0, |e| e.subject.len())
    });
    let verify = time(&mut || {
        sink += matches!(
            keys.check(&signed, Some(kafka_key.as_bytes()), Some(&value)),
            authsync::events::source::SourceCheck::Verified(_)
        ) as usize
    });
    let unsigned = time(&mut || {
        sink += matches!(
            keys.check(&[], Some(kafka_key.as_bytes()), Some(&value)),
            authsync::events::source::SourceCheck::Unsigned
        ) as usize
    });
    println!(
        "\n## worker: source signature check per message ({} bytes, {n} times, same run)\n",
        value.len()
    );
    println!("| step | µs per message | vs decoding it |");
    println!("|---|---|---|");
    println!("| decode the normalized login (baseline) | {decode:.2} | 1.00 |");
    println!(
        "| verify its source signature | {verify:.2} | {:.2} |",
        verify / decode
    );
    println!(
        "| find no signature (unsigned) | {unsigned:.3} | {:.3} |",
        unsigned / decode
    );
    anyhow::ensure!(sink > 0, "nothing measured");
    Ok(())
}
