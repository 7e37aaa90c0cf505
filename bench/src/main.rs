//! authsync-bench: how fast is the pipeline against this machine's ceiling?
//!
//! `cargo run --release -p authsync-bench -- <scenario> [--events N]`
//!
//! Each scenario gets a fresh database and fresh topics, drives the real `authsync` binary
//! (a subprocess, so its peak RSS is its own) over the Kafka protocol of a broker process
//! (tansu, started here when `--brokers` is not given), and in the same run measures the
//! ceiling: the same SQL per event, batched the same way (the `run_batch` step with the
//! same batch size and one task per partition), executed directly against Postgres. It
//! prints one JSON line per scenario.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use authsync::config::{Config, Secret};
use authsync::relay;
use authsync::steps::auth_sync::AuthSync;
use authsync::steps::{run_batch, InputMessage, StepContext};
use authsync::store;
use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Message};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

mod common;
mod ingest;
mod latency;
mod merge;
mod pipeline;
mod returning;
mod soak;
mod throughput;

use common::*;

#[derive(Parser)]
#[command(about = "Benchmark authsync against the machine's ceiling")]
struct Args {
    /// returning | signup | replay | relay | merge | latency | mixed | all, or `soak` (not in `all`:
    /// `--minutes` at `--rate` logins/s through the real binary, with a short retention), or
    /// `ingest` (not in `all`: signed webhooks through `authsync ingest`, driven by `oha`)
    scenario: String,
    /// soak: how long to run.
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    /// soak, latency and mixed: logins per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// `mock` (librdkafka's mock cluster hosted in this process: a broker whose floor is far
    /// below the worker's latency) or `tansu` (a real broker process started here). Default:
    /// mock for latency, mixed, soak and ingest; tansu for the throughput scenarios.
    #[arg(long)]
    broker: Option<String>,
    /// Events for the scenario (defaults: returning 200000, signup 50000, replay 200000,
    /// relay 200000, latency 20 s at `--rate`, mixed: 200000 replayed).
    #[arg(long)]
    events: Option<usize>,
    /// mixed: deliver the replayed events again on the live topic, in front of the live
    /// logins (what a rewind of the workers' group does), instead of `authsync replay
    /// --online` beside the workers.
    #[arg(long)]
    rewind: bool,
    /// latency and mixed: seconds of logins at `--rate` sent (and their results awaited)
    /// before the clock starts: the steady state without the worker's first batches.
    #[arg(long, default_value_t = 0)]
    warmup_secs: u64,
    /// mixed: `authsync replay --online --max-rate` (events/s; default: unpaced).
    #[arg(long)]
    replay_rate: Option<u32>,
    /// Kafka brokers; when absent a tansu broker is started on a free port.
    #[arg(long, env = "AUTHSYNC_BENCH_BROKERS")]
    brokers: Option<String>,
    /// Postgres URL with rights to create databases.
    #[arg(
        long,
        env = "AUTHSYNC_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Partitions of the input topic (= concurrent batches).
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// consumer.batch_size for both the pipeline and the ceiling.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// returning: also run the pipeline with this many `authsync run` replicas in one group
    /// and report their split beside the single replica's run.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
}

struct Bench {
    args: Args,
    brokers: String,
    authsync_bin: std::path::PathBuf,
    /// The tansu process the bench started (none with `--brokers`).
    broker_pid: Option<u32>,
    /// The mock cluster hosted here (`--broker mock`); it takes topics from its owner only.
    mock: Option<rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>>,
}

struct Broker(Option<Child>);
impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The worker binary lives beside this one; build it if it is not there.
    let exe = std::env::current_exe()?;
    let authsync_bin = exe.with_file_name("authsync");
    let profile_release = exe.to_string_lossy().contains("/release/");
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build.args(["build", "--quiet", "-p", "authsync", "--bin", "authsync"]);
    if profile_release {
        build.arg("--release");
    }
    progress("building the authsync binary");
    if !build.status().map(|s| s.success()).unwrap_or(false) || !authsync_bin.exists() {
        bail!("cannot build the authsync binary");
    }
    let mut broker = Broker(None);
    // The latency scenarios, the soak and the ingest run against librdkafka's mock cluster
    // hosted here unless told otherwise: its two-hop floor is a few ms where tansu's is
    // hundreds (it would hide the worker), and tansu's in-memory store slows down as it
    // fills (its fetch lists every stored batch; after ~6 minutes at 1,000/s its metadata
    // requests took over 3 s).
    let use_mock = match args.broker.as_deref() {
        Some("mock") => true,
        Some("tansu") => false,
        Some(other) => bail!("--broker {other}: expected mock or tansu"),
        None => matches!(
            args.scenario.as_str(),
            "soak" | "ingest" | "latency" | "mixed"
        ),
    };
    let mut mock = None;
    let brokers = match &args.brokers {
        Some(b) => b.clone(),
        None if use_mock => {
            let cluster = rdkafka::mocking::MockCluster::new(1)?;
            let servers = cluster.bootstrap_servers();
            mock = Some(cluster);
            servers
        }
        None => {
            let port = free_port()?;
            let child = Command::new("tansu")
                .args([
                    "broker",
                    "--listener-url",
                    &format!("tcp://127.0.0.1:{port}"),
                    "--advertised-listener-url",
                    &format!("tcp://127.0.0.1:{port}"),
                    "--storage-engine",
                    "memory://tansu/",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start tansu (cargo install tansu --version 0.6.0 --locked --features dynostore), or pass --brokers")?;
            broker.0 = Some(child);
            tokio::time::sleep(Duration::from_millis(500)).await;
            format!("127.0.0.1:{port}")
        }
    };
    let bench = Bench {
        args,
        brokers,
        authsync_bin,
        broker_pid: broker.0.as_ref().map(Child::id),
        mock,
    };
    let scenario = bench.args.scenario.clone();
    let ev = bench.args.events;
    let run = |s: &str| s == scenario || scenario == "all";
    if scenario == "ingest" {
        ingest::verify_cost(200_000)?;
        ingest::run(&bench.brokers, bench.mock.as_ref(), 20).await?;
    }
    if run("returning") {
        bench.returning(ev.unwrap_or(200_000)).await?;
    }
    if run("signup") {
        bench.signup(ev.unwrap_or(50_000)).await?;
    }
    if run("replay") {
        bench.replay(ev.unwrap_or(200_000)).await?;
    }
    if run("relay") {
        bench.relay(ev.unwrap_or(200_000)).await?;
    }
    if run("merge") {
        bench.merge(ev.unwrap_or(100_000)).await?;
    }
    if run("latency") {
        // 20 s: the mock cluster's fetch walks a partition's whole log ("FIXME: Maintain an
        // index" in librdkafka's rdkafka_mock.c), so the floor and the pipeline both slow
        // down as the topics grow; `pipeline_p99_by_10s` shows it.
        bench
            .latency(ev.unwrap_or(20 * bench.args.rate as usize))
            .await?;
    }
    if run("mixed") {
        bench.mixed(ev.unwrap_or(200_000)).await?;
    }
    if scenario == "soak" {
        let passed = bench.soak().await?;
        drop(broker);
        if !passed {
            bail!("soak failed (see the summary line)");
        }
        return Ok(());
    }
    drop(broker);
    drop(bench);
    Ok(())
}
