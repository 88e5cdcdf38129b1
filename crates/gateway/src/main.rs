use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chorus_gateway::Deps;
use chorus_gateway::bus::CertSource;
use chorus_gateway::bus::{SnsSubscriptions, prune_dead_subscriptions};
use chorus_gateway::config::{Cli, Command};
use chorus_gateway::writer_client::WriterClient;
use chorus_service::service_auth::{Grant, ServiceKeys, TokenSource};
use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config;
    chorus_service::init_tracing(&config.log)?;
    let aws = chorus_service::load_aws_config().await;
    let sns = aws_sdk_sns::Client::new(&aws);

    if let Some(Command::PruneSubscriptions) = cli.command {
        let removed = prune_dead_subscriptions(&sns, &config.topic_arn).await?;
        tracing::info!(removed = removed.len(), "janitor done");
        return Ok(());
    }

    config.validate()?;
    let writer_keys = ServiceKeys::from_files(&config.writer_key_file).context(
        "the gateway needs --writer-key-file (CHORUS_WRITER_KEY_FILE): the service key it signs \
         its calls to the writers with",
    )?;
    let caller = config
        .gateway_id
        .clone()
        .unwrap_or_else(|| "gateway".to_owned());
    let deps = Deps {
        log: Arc::new(
            WriterClient::new(
                &config.writer_urls,
                Duration::from_millis(config.writer_timeout_ms),
            )
            .context("building the writer client")?
            .with_auth(TokenSource::new(
                writer_keys,
                Grant::gateway(caller),
                Duration::from_secs(300),
            )),
        ),
        subscriptions: Arc::new(SnsSubscriptions::new(sns, &config.topic_arn)),
        sqs: Some(aws_sdk_sqs::Client::new(&aws)),
        certs: match &config.sns_cert_mirror {
            None => CertSource::Aws,
            Some(base) => CertSource::Mirror {
                base: base.clone(),
                sign_as: aws.credentials_provider().map(|credentials| {
                    let region = aws
                        .region()
                        .map_or("us-east-1".to_owned(), |r| r.to_string());
                    (credentials, region)
                }),
            },
        },
    };
    chorus_service::systemd::spawn_watchdog();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    chorus_gateway::run(listener, config, deps, chorus_service::shutdown_signal()).await?;
    Ok(())
}
