use chorus_gateway::config::{Cli, Command};
use chorus_gateway::{App, service};
use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli { command, config } = Cli::parse();
    chorus_service::init_tracing(&config.log)?;
    let aws = chorus_service::load_aws_config().await;
    if let Some(Command::PruneSubscriptions) = command {
        return Ok(service::prune_subscriptions(&aws, &config.topic_arn).await?);
    }
    let deps = service::deps(&config, &aws)?;
    let metrics_listen = config.metrics_listen;
    let app = App::build(config, deps).await?;
    service::run(app, metrics_listen, chorus_service::shutdown_signal()).await?;
    Ok(())
}
