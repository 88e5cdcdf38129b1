use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chorus_gateway::bus::SnsSubscriptions;
use chorus_gateway::log::WriterClient;
use chorus_gateway::{Config, Deps};
use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    chorus_service::init_tracing(&config.log)?;
    config.validate()?;
    let aws = chorus_service::load_aws_config().await;
    let deps = Deps {
        log: Arc::new(
            WriterClient::new(
                &config.writer_url,
                Duration::from_millis(config.writer_timeout_ms),
            )
            .context("building the writer client")?,
        ),
        subscriptions: Arc::new(SnsSubscriptions::new(
            aws_sdk_sns::Client::new(&aws),
            &config.topic_arn,
        )),
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    chorus_gateway::run(listener, config, deps, chorus_service::shutdown_signal()).await?;
    Ok(())
}
