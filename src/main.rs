use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use authsync::app::{self, RunOptions};
use authsync::config::Config;
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("authsync: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_tracing(&config.log);
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
            println!("{config:#?}");
            Ok(())
        }
    }
}
