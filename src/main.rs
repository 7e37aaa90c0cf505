use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use authsync::app::{self, RunOptions};
use authsync::config::Config;
use authsync::ops::replay::{self, ReplayFrom, ReplayRequest};
use authsync::ops::replay_lane;
use authsync::ops::{dlq, outbox};
use authsync::{ops, store, telemetry};

/// Event-driven auth-sync and account-merge worker (Kafka → Postgres → outbox → Kafka).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// TOML config file; environment variables (AUTHSYNC_*) override it.
    #[arg(long, short, global = true, env = "AUTHSYNC_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume login events, apply them, publish results (until SIGTERM / SIGINT).
    Run {
        /// Create missing topics instead of refusing to start.
        #[arg(long)]
        create_topics: bool,
    },
    /// Receive provider webhooks over HTTP, verify them, and produce one signed login per
    /// message to the login topic (until SIGTERM / SIGINT). Needs Kafka, not Postgres.
    Ingest,
    /// Apply the database migrations.
    Migrate,
    /// First run: embedded Kafka mock broker, migrations, worker, relay, HTTP.
    Dev {
        /// Publish sample logins and print the result events.
        #[arg(long)]
        demo: bool,
    },
    /// Validate the configuration and print it (secrets redacted).
    Config,
    /// Read a topic's events again: rewind the consumer group (workers stopped), or with
    /// --online re-read the range beside the running workers.
    Replay {
        /// Input topic to replay.
        #[arg(long)]
        topic: String,
        /// Consumer group (default: kafka.group_id).
        #[arg(long)]
        group: Option<String>,
        /// Start at the first event at or after this time (RFC 3339).
        #[arg(long, conflicts_with_all = ["from_offset", "from_beginning"])]
        from_time: Option<chrono::DateTime<chrono::Utc>>,
        /// Start at these offsets: `partition:offset,…` (other partitions keep theirs).
        #[arg(long, conflicts_with = "from_beginning")]
        from_offset: Option<String>,
        /// Start at the beginning of every partition.
        #[arg(long)]
        from_beginning: bool,
        /// Also forget the inbox rows of the range so the events are applied again
        /// (result events keep their ids: nothing is announced twice).
        #[arg(long)]
        reprocess: bool,
        /// Print the plan; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Leave the group where it is and read the range here, beside the running
        /// workers: live events never wait behind replayed ones. Runs until the range
        /// (up to the group's committed offsets) is read.
        #[arg(long)]
        online: bool,
        /// With --online: at most this many events per second (default: one batch at a
        /// time, as fast as it goes).
        #[arg(long, requires = "online")]
        max_rate: Option<u32>,
    },
    /// Dead letters: inspect or redrive.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// The transactional outbox.
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters grouped by error class and reason (reads, commits nothing).
    Inspect {
        /// Dead-letter topic, e.g. auth.login.v1.dlq.
        #[arg(long)]
        topic: String,
        /// Read at most this many.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Print one dead letter whole: its metadata, headers, key and value (also when the
    /// original was too large to publish and was kept in Postgres).
    Show {
        /// Dead-letter topic, e.g. auth.login.v1.dlq.
        #[arg(long)]
        topic: String,
        #[arg(long)]
        partition: i32,
        #[arg(long)]
        offset: i64,
    },
    /// Re-publish dead letters to their original topic with their original key and headers.
    Redrive {
        /// Dead-letter topic, e.g. auth.login.v1.dlq.
        #[arg(long)]
        topic: String,
        /// Only letters of this error class (authsync-error-class).
        #[arg(long)]
        filter_reason: Option<String>,
        /// Redrive at most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// Count what would be redriven; publish nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Backlog, oldest unpublished age, relay leader.
    Status,
    /// Rows the broker refused for good (too large, unknown topic, not authorized).
    Parked {
        /// List at most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Put parked rows back at the end of the outbox (after fixing their cause).
    Retry {
        /// Only these row ids (from `outbox parked`); all parked rows when absent.
        #[arg(long = "id")]
        ids: Vec<i64>,
    },
}

fn main() -> ExitCode {
    app::limit_malloc_arenas();
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("authsync: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_tracing(&config.log);
    if !config.ignored_environment.is_empty() {
        tracing::warn!(
            variables = ?config.ignored_environment,
            "ignoring AUTHSYNC_* variables shaped like Kubernetes service links (set enableServiceLinks: false on the pod to stop them)"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get().max(2)))
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("authsync: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "authsync failed");
            eprintln!("authsync: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(command: Command, config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    match command {
        Command::Run { create_topics } => {
            app::cancel_on_signals(shutdown.clone());
            let worker = app::start(config, RunOptions { create_topics }, shutdown).await?;
            worker.wait().await
        }
        Command::Ingest => {
            app::cancel_on_signals(shutdown.clone());
            let ingest = authsync::ingest::start(&config, shutdown).await?;
            println!("authsync ingest listening on http://{}", ingest.addr);
            ingest.wait().await
        }
        Command::Migrate => {
            let pool = store::pool(&config.database)?;
            store::migrate(&pool).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Dev { demo } => {
            app::cancel_on_signals(shutdown.clone());
            ops::dev::run(config, demo, shutdown).await
        }
        Command::Config => {
            print!("{}", config.redacted());
            Ok(())
        }
        Command::Replay {
            topic,
            group,
            from_time,
            from_offset,
            from_beginning,
            reprocess,
            dry_run,
            online,
            max_rate,
        } => {
            let from = match (from_time, from_offset, from_beginning) {
                (Some(t), None, false) => ReplayFrom::Time(t),
                (None, Some(o), false) => ReplayFrom::Offsets(replay::parse_offsets(&o)?),
                (None, None, true) => ReplayFrom::Beginning,
                _ => anyhow::bail!(
                    "say where to start: one of --from-time, --from-offset, --from-beginning"
                ),
            };
            let request = ReplayRequest {
                topic,
                group: group.unwrap_or_else(|| config.kafka.group_id.clone()),
                from,
                reprocess,
                dry_run,
            };
            let pool = store::pool(&config.database)?;
            if online {
                app::cancel_on_signals(shutdown.clone());
                let options = replay_lane::LaneOptions { max_rate };
                let outcome =
                    replay_lane::run(&config, &pool, &request, &options, shutdown).await?;
                print!("{}", replay_lane::render(&request, &outcome));
                return Ok(());
            }
            let outcome = replay::run(&config, &pool, &request).await?;
            print!("{}", replay::render(&request, &outcome));
            Ok(())
        }
        Command::Dlq {
            command: DlqCommand::Inspect { topic, limit },
        } => {
            let cfg = config.clone();
            let t = topic.clone();
            let letters =
                tokio::task::spawn_blocking(move || dlq::read_all(&cfg, &t, limit)).await??;
            print!("{}", dlq::render_summary(&topic, &letters));
            Ok(())
        }
        Command::Dlq {
            command:
                DlqCommand::Redrive {
                    topic,
                    filter_reason,
                    limit,
                    dry_run,
                },
        } => {
            let request = dlq::RedriveRequest {
                topic,
                filter_class: filter_reason,
                limit,
                dry_run,
            };
            let pool = store::pool(&config.database)?;
            let outcome = dlq::redrive(&config, &pool, &request, true).await?;
            print!("{}", dlq::render_redrive(&request, &outcome));
            Ok(())
        }
        Command::Outbox {
            command: OutboxCommand::Status,
        } => {
            let pool = store::pool(&config.database)?;
            print!("{}", outbox::render(&outbox::status(&pool).await?));
            Ok(())
        }
        Command::Outbox {
            command: OutboxCommand::Parked { limit },
        } => {
            let pool = store::pool(&config.database)?;
            print!(
                "{}",
                outbox::render_parked(&store::outbox::parked(&pool, limit).await?)
            );
            Ok(())
        }
        Command::Outbox {
            command: OutboxCommand::Retry { ids },
        } => {
            let pool = store::pool(&config.database)?;
            let ids = (!ids.is_empty()).then_some(ids.as_slice());
            let n = store::outbox::retry_parked(&pool, ids).await?;
            println!("{n} parked row(s) put back at the end of the outbox");
            Ok(())
        }
        Command::Dlq {
            command:
                DlqCommand::Show {
                    topic,
                    partition,
                    offset,
                },
        } => {
            let pool = store::pool(&config.database)?;
            print!(
                "{}",
                dlq::show(&config, &pool, &topic, partition, offset).await?
            );
            Ok(())
        }
    }
}
