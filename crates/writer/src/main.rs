use anyhow::Context as _;
use chorus_writer::config::{Cli, Command};
use chorus_writer::{App, Settings, cli};
use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli { command, config } = Cli::parse();
    chorus_service::init_tracing(&config.log)?;
    match command.unwrap_or(Command::Serve) {
        Command::Serve => {
            // Bad settings stop the writer before it touches AWS.
            let settings = Settings::try_from(&config).context("invalid settings")?;
            let app = App::build(settings).await?;
            chorus_service::systemd::spawn_watchdog();
            chorus_service::systemd::ready();
            let shutdown = async {
                chorus_service::shutdown_signal().await;
                chorus_service::systemd::stopping();
            };
            app.run_until(shutdown).await.context("serving")?;
            tracing::info!("writer stopped");
        }
        Command::CreateTable => cli::answer(cli::create_table(&config).await?),
        Command::MintToken(mint) => cli::answer(cli::mint_token(&config, mint)?),
    }
    Ok(())
}
