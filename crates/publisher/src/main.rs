//! `chorus-publisher`: in Lambda the stream handler, elsewhere `poll` (the same handler as a stream
//! poller) or `create-topic`. Everything past the command line is [`chorus_publisher::App`].

use chorus_publisher::App;
use chorus_publisher::app::Finished;
use chorus_publisher::config::{Cli, Runtime, Settings};
use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    chorus_service::init_tracing(&cli.log)?;
    let settings = Settings::from_cli(cli, Runtime::detect())?;
    let app = App::build(settings).await?;
    if let Finished::TopicCreated { topic_arn } =
        app.run_until(chorus_service::shutdown_signal()).await?
    {
        // The one line of output scripts read: a CLI answer, not a log.
        #[allow(clippy::print_stdout)]
        {
            println!("{topic_arn}");
        }
    }
    Ok(())
}
