use std::time::Duration;

use anyhow::Context as _;
use aws_lambda_events::dynamodb::Event;
use aws_lambda_events::streams::DynamoDbEventResponse;
use chorus_publisher::config::{Cli, Command};
use std::sync::Arc;

use chorus_publisher::poller::{
    self, CheckpointStore, DynamoDbStream, FileCheckpoint, PollerConfig, PollerMetrics,
};
use chorus_publisher::sns::{SnsPublisher, ensure_topic};
use chorus_publisher::{DeadLetter, SqsDeadLetter};
use clap::Parser as _;
use lambda_runtime::{LambdaEvent, service_fn};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    chorus_service::init_tracing(&cli.log)?;
    let aws = chorus_service::load_aws_config().await;
    let sns = aws_sdk_sns::Client::new(&aws);
    let topic_arn = || {
        cli.topic_arn
            .clone()
            .context("no topic: set CHORUS_TOPIC_ARN or pass --topic-arn")
    };

    let dead_letters = cli
        .dead_letter_queue_url
        .as_ref()
        .map(|url| SqsDeadLetter::new(aws_sdk_sqs::Client::new(&aws), url));
    let dead_letters = dead_letters.as_ref().map(|d| d as &dyn DeadLetter);

    if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() {
        let publisher = SnsPublisher::new(sns, topic_arn()?);
        let publisher = &publisher;
        return lambda_runtime::run(service_fn(move |event: LambdaEvent<Event>| async move {
            let response: DynamoDbEventResponse =
                chorus_publisher::handle(&event.payload, publisher, dead_letters).await;
            Ok::<_, lambda_runtime::Error>(response)
        }))
        .await
        .map_err(|e| anyhow::anyhow!("lambda runtime: {e}"));
    }

    match cli.command {
        Some(Command::CreateTopic { name }) => {
            let arn = ensure_topic(&sns, &name).await?;
            // The one line of output scripts read: a CLI answer, not a log.
            #[allow(clippy::print_stdout)]
            {
                println!("{arn}");
            }
            Ok(())
        }
        Some(Command::Poll(args)) => {
            let checkpoints = args.checkpoint_file.map(FileCheckpoint::new);
            if let Some(store) = &checkpoints {
                // A corrupt checkpoint stops start-up before anything is bound or read (the
                // poller loads it again when it starts).
                store.load().await?;
            }
            let publisher = SnsPublisher::new(sns, topic_arn()?);
            let dynamodb = aws_sdk_dynamodb::Client::new(&aws);
            let stream_arn = dynamodb
                .describe_table()
                .table_name(&args.table)
                .send()
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "describing table {}: {}",
                        args.table,
                        aws_sdk_dynamodb::error::DisplayErrorContext(&e)
                    )
                })?
                .table
                .and_then(|t| t.latest_stream_arn)
                .with_context(|| format!("table {} has no stream", args.table))?;
            let stream =
                DynamoDbStream::new(aws_sdk_dynamodbstreams::Client::new(&aws), stream_arn);
            let config = PollerConfig {
                batch_size: args.batch_size,
                idle_interval: Duration::from_millis(args.idle_ms),
                ..PollerConfig::default()
            };
            let shutdown = CancellationToken::new();
            let trigger = shutdown.clone();
            tokio::spawn(async move {
                chorus_service::shutdown_signal().await;
                trigger.cancel();
            });
            let metrics = Arc::new(PollerMetrics::default());
            if let Some(addr) = args.metrics_listen {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                let render = Arc::clone(&metrics);
                tokio::spawn(chorus_service::metrics::serve(
                    listener,
                    Arc::new(move || render.render()),
                    shutdown.clone().cancelled_owned(),
                ));
            }
            poller::run(
                &stream,
                &config,
                checkpoints.as_ref().map(|c| c as &dyn CheckpointStore),
                &publisher,
                dead_letters,
                &metrics,
                shutdown,
            )
            .await
            .context("stream poller")
        }
        None => anyhow::bail!(
            "nothing to do: run `chorus-publisher poll` (or inside Lambda, where \
             AWS_LAMBDA_RUNTIME_API is set); see --help"
        ),
    }
}
