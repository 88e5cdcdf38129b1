use chorus_gateway::cli::{Cli, Command};
use chorus_gateway::{App, Settings, service};
use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    chorus_service::init_tracing(&cli.log)?;
    if let Some(Command::PruneSubscriptions) = cli.command {
        let aws = chorus_service::load_aws_config().await;
        return Ok(service::prune_subscriptions(&aws, &cli.bus.topic_arn).await?);
    }
    // Bad settings stop the gateway before it touches AWS.
    let settings = Settings::try_from(cli)?;
    let aws = chorus_service::load_aws_config().await;
    let deps = service::deps(&settings, &aws)?;
    let metrics_listen = settings.metrics_listen;
    let app = App::build(settings, deps).await?;
    service::run(app, metrics_listen, chorus_service::shutdown_signal()).await?;
    Ok(())
}
