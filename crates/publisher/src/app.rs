//! The publisher's composition root. [`App::build`] turns [`Settings`] into what the chosen mode
//! runs — the AWS clients built once, and for the poller its checkpoint checked, its table's stream
//! found and its metrics port bound, so that a bad start-up fails before anything is read — and
//! [`App::run_until`] runs it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use aws_lambda_events::dynamodb::Event;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::describe_table::DescribeTableError;
use lambda_runtime::{LambdaEvent, service_fn};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Mode, PollSettings, Settings};
use crate::poller::{
    self, CheckpointError, CheckpointStore, DynamoDbStream, FileCheckpoint, PollerConfig,
    PollerError, PollerMetrics,
};
use crate::sns::{SnsPublisher, TopicError, ensure_topic};
use crate::{DeadLetter, SqsDeadLetter};

/// The publisher, built and ready to run in the mode its settings chose.
#[derive(Debug)]
pub struct App {
    job: Job,
}

#[derive(Debug)]
enum Job {
    Lambda {
        publisher: SnsPublisher,
        dead_letters: Option<SqsDeadLetter>,
    },
    Poll(Box<Poller>),
    CreateTopic {
        sns: aws_sdk_sns::Client,
        name: String,
    },
}

/// Everything the stream poller runs with.
#[derive(Debug)]
struct Poller {
    stream: DynamoDbStream,
    config: PollerConfig,
    checkpoints: Option<FileCheckpoint>,
    publisher: SnsPublisher,
    dead_letters: Option<SqsDeadLetter>,
    metrics: Arc<PollerMetrics>,
    metrics_listener: Option<TcpListener>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finished {
    /// The Lambda runtime or the poller stopped.
    Stopped,
    /// `create-topic` created the topic, or found it.
    TopicCreated { topic_arn: String },
}

/// Start-up failed; nothing was read or published.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("describing table {table}")]
    DescribeTable {
        table: String,
        #[source]
        source: Box<SdkError<DescribeTableError>>,
    },
    #[error("table {table} has no stream")]
    NoStream { table: String },
    #[error("binding {addr}")]
    BindMetrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A run that ended in failure.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("lambda runtime")]
    Lambda(#[source] lambda_runtime::Error),
    #[error("stream poller")]
    Poller(#[source] PollerError),
    #[error(transparent)]
    CreateTopic(#[from] TopicError),
}

impl App {
    /// Loads the AWS configuration from the environment (region, credentials, endpoint overrides)
    /// and builds what `settings` asks for.
    ///
    /// # Errors
    /// For the poller: when the checkpoint file is unreadable, the table cannot be described or
    /// has no stream, or the metrics address cannot be bound.
    pub async fn build(settings: Settings) -> Result<App, BuildError> {
        let aws = chorus_service::load_aws_config().await;
        let dead_letters = || {
            settings
                .dead_letter_queue_url
                .as_ref()
                .map(|url| SqsDeadLetter::new(aws_sdk_sqs::Client::new(&aws), url))
        };
        let sns = aws_sdk_sns::Client::new(&aws);
        let job = match settings.mode {
            Mode::Lambda { ref topic_arn } => Job::Lambda {
                publisher: SnsPublisher::new(sns, topic_arn),
                dead_letters: dead_letters(),
            },
            Mode::Poll {
                ref topic_arn,
                ref poll,
            } => {
                let poller = Poller::build(
                    &aws,
                    poll,
                    SnsPublisher::new(sns, topic_arn),
                    dead_letters(),
                )
                .await?;
                Job::Poll(Box::new(poller))
            }
            Mode::CreateTopic { ref name } => Job::CreateTopic {
                sns,
                name: name.clone(),
            },
        };
        Ok(App { job })
    }

    /// Runs until `shutdown` resolves, or until the work is done (`create-topic`, one call that
    /// does not wait for `shutdown`). The poller then saves its checkpoint and stops its metrics
    /// server; under Lambda the runtime is dropped, and an invocation cut short is retried by
    /// Lambda like any failed one.
    ///
    /// # Errors
    /// When the Lambda runtime fails, the poller cannot start (its stream cannot be described)
    /// or cannot save its last checkpoint, or the topic cannot be created.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<Finished, RunError> {
        match self.job {
            Job::Lambda {
                publisher,
                dead_letters,
            } => {
                let dead_letters = dead_letters.as_ref().map(|d| d as &dyn DeadLetter);
                tokio::select! {
                    result = serve_lambda(&publisher, dead_letters) => result.map_err(RunError::Lambda)?,
                    () = shutdown => {}
                }
                Ok(Finished::Stopped)
            }
            Job::Poll(poller) => {
                poller.run_until(shutdown).await.map_err(RunError::Poller)?;
                Ok(Finished::Stopped)
            }
            Job::CreateTopic { sns, name } => Ok(Finished::TopicCreated {
                topic_arn: ensure_topic(&sns, &name).await?,
            }),
        }
    }
}

/// The handler under the Lambda runtime, one batch per invocation.
async fn serve_lambda(
    publisher: &SnsPublisher,
    dead_letters: Option<&dyn DeadLetter>,
) -> Result<(), lambda_runtime::Error> {
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Event>| async move {
        Ok::<_, lambda_runtime::Error>(crate::handle(&event.payload, publisher, dead_letters).await)
    }))
    .await
}

impl Poller {
    async fn build(
        aws: &aws_config::SdkConfig,
        settings: &PollSettings,
        publisher: SnsPublisher,
        dead_letters: Option<SqsDeadLetter>,
    ) -> Result<Poller, BuildError> {
        let checkpoints = settings.checkpoint_file.clone().map(FileCheckpoint::new);
        if let Some(store) = &checkpoints {
            // A corrupt checkpoint stops start-up before anything is bound or read (the poller
            // loads it again when it starts).
            store.load().await?;
        }
        let table = &settings.table;
        let stream_arn = aws_sdk_dynamodb::Client::new(aws)
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|source| BuildError::DescribeTable {
                table: table.clone(),
                source: Box::new(source),
            })?
            .table
            .and_then(|t| t.latest_stream_arn)
            .ok_or_else(|| BuildError::NoStream {
                table: table.clone(),
            })?;
        let metrics_listener = match settings.metrics_listen {
            None => None,
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| BuildError::BindMetrics { addr, source })?,
            ),
        };
        Ok(Poller {
            stream: DynamoDbStream::new(aws_sdk_dynamodbstreams::Client::new(aws), stream_arn),
            config: settings.poller.clone(),
            checkpoints,
            publisher,
            dead_letters,
            metrics: Arc::new(PollerMetrics::default()),
            metrics_listener,
        })
    }

    /// Polls until `shutdown`, serving `/metrics` meanwhile if asked to.
    async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), PollerError> {
        // One token stops the poller (which then saves its checkpoint) and the metrics server:
        // cancelled on shutdown, and when the poller returns by itself (an error at start).
        let stop = CancellationToken::new();
        let _stop_on_return = stop.clone().drop_guard();
        let metrics_server = self.metrics_listener.map(|listener| {
            let metrics = Arc::clone(&self.metrics);
            tokio::spawn(chorus_service::metrics::serve(
                listener,
                Arc::new(move || metrics.render()),
                stop.clone().cancelled_owned(),
            ))
        });
        let poll = poller::run(
            &self.stream,
            &self.config,
            self.checkpoints.as_ref().map(|c| c as &dyn CheckpointStore),
            &self.publisher,
            self.dead_letters.as_ref().map(|d| d as &dyn DeadLetter),
            &self.metrics,
            stop.clone(),
        );
        tokio::pin!(poll);
        let result = tokio::select! {
            result = &mut poll => result,
            () = shutdown => {
                stop.cancel();
                // Not dropped: the poller finishes its batch and saves the checkpoint.
                poll.await
            }
        };
        stop.cancel();
        if let Some(server) = metrics_server {
            match server.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error.message = %e, "the metrics server failed"),
                Err(e) => tracing::warn!(error.message = %e, "the metrics server panicked"),
            }
        }
        result
    }
}
