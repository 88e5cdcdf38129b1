use std::sync::Arc;

use anyhow::Context as _;
use chorus_service::service_auth::{CallerKind, Grant, Patterns, ServiceKeys};
use chorus_writer::config::{Cli, Command};
use chorus_writer::store::{DynamoStore, DynamoTable, ensure_table};
use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config;
    chorus_service::init_tracing(&config.log)?;
    let settings = config.settings().map_err(anyhow::Error::msg)?;
    let command = cli.command.unwrap_or(Command::Serve);
    let keys = || {
        ServiceKeys::from_files(&config.service_key_file).context(
            "the writer needs --service-key-file (CHORUS_SERVICE_KEY_FILE): the key its callers \
             sign their tokens with",
        )
    };
    let dynamodb =
        || async { aws_sdk_dynamodb::Client::new(&chorus_service::load_aws_config().await) };

    match command {
        Command::MintToken(mint) => {
            let grant = Grant {
                sub: mint.sub,
                kind: CallerKind::Backend,
                rooms: Patterns(mint.rooms),
                senders: Patterns(mint.senders),
            };
            let token = keys()?.mint(&grant, mint.ttl);
            // The one line of output: a CLI answer, not a log.
            #[allow(clippy::print_stdout)]
            {
                println!("{token}");
            }
            Ok(())
        }
        Command::CreateTable => {
            let client = dynamodb().await;
            let stream_arn = ensure_table(&client, &config.table).await?;
            // The one line of output scripts read: this is a CLI answer, not a log.
            #[allow(clippy::print_stdout)]
            {
                println!("{stream_arn}");
            }
            Ok(())
        }
        Command::Serve => {
            let keys = Arc::new(keys()?);
            let client = dynamodb().await;
            let table = DynamoTable::new(client, &config.table);
            table
                .check()
                .await
                .with_context(|| format!("table {} is not usable", config.table))?;
            let store = Arc::new(DynamoStore::new(table, settings));
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("binding {}", config.listen))?;
            chorus_service::systemd::spawn_watchdog();
            chorus_service::systemd::ready();
            let metrics_listener = match config.metrics_listen {
                Some(addr) => Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("binding {addr}"))?,
                ),
                None => None,
            };
            chorus_writer::run_with_metrics_listener(
                listener,
                metrics_listener,
                store,
                keys,
                async {
                    chorus_service::shutdown_signal().await;
                    chorus_service::systemd::stopping();
                },
            )
            .await
            .context("serving")?;
            tracing::info!("writer stopped");
            Ok(())
        }
    }
}
