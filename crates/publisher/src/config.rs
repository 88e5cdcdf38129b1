//! The publisher's command line ([`Cli`]) and what it means ([`Settings`]), parsed once at start.
//! In Lambda (`AWS_LAMBDA_RUNTIME_API` set) only the environment is read: `CHORUS_TOPIC_ARN`,
//! `CHORUS_DEAD_LETTER_QUEUE_URL` and the log settings; a subcommand is ignored there.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chorus_service::LogArgs;

use crate::poller::PollerConfig;

#[derive(Debug, clap::Parser)]
#[command(
    name = "chorus-publisher",
    version,
    about = "Chorus publisher: DynamoDB stream records of new messages → SNS"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// SNS topic every gateway subscribes to.
    #[arg(long, global = true, env = "CHORUS_TOPIC_ARN")]
    pub topic_arn: Option<String>,
    /// SQS queue URL for records that can never be published (poison). Without it they are
    /// logged and skipped.
    #[arg(long, global = true, env = "CHORUS_DEAD_LETTER_QUEUE_URL")]
    pub dead_letter_queue_url: Option<String>,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run the handler as a long-lived stream poller (local stack, non-Lambda installs).
    Poll(PollArgs),
    /// Create the SNS topic (SignatureVersion 2) if it does not exist, and print its ARN.
    CreateTopic {
        /// Topic name.
        #[arg(long, env = "CHORUS_TOPIC_NAME", default_value = "chorus-messages")]
        name: String,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct PollArgs {
    /// Table whose stream to read (its latest stream is used).
    #[arg(long, env = "CHORUS_TABLE", default_value = "chorus-messages")]
    pub table: String,
    /// Records per batch (1–1000), as Lambda's BatchSize.
    #[arg(long, env = "CHORUS_BATCH_SIZE", default_value_t = 100,
          value_parser = clap::value_parser!(i32).range(1..=1000))]
    pub batch_size: i32,
    /// Serve Prometheus `/metrics` (and `/healthz`) on this address.
    #[arg(long, env = "CHORUS_PUBLISHER_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Pause between polls when the stream is idle, in milliseconds.
    #[arg(long = "idle-ms", value_name = "IDLE_MS", env = "CHORUS_POLL_IDLE_MS",
          default_value = "100", value_parser = millis)]
    pub idle_interval: Duration,
    /// Keep each shard's position in this file (saved at most once a second and at shutdown) and
    /// resume from it on start. Without it positions live in memory and a restart reads the
    /// stream from its start again (gateways drop the duplicates).
    #[arg(long, env = "CHORUS_CHECKPOINT_FILE")]
    pub checkpoint_file: Option<std::path::PathBuf>,
}

/// A number of milliseconds on the command line.
fn millis(arg: &str) -> Result<Duration, std::num::ParseIntError> {
    arg.parse().map(Duration::from_millis)
}

/// Where the process runs: it decides the mode before any subcommand does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// Inside AWS Lambda (`AWS_LAMBDA_RUNTIME_API` is set).
    Lambda,
    /// Anywhere else: the subcommand says what to do.
    Process,
}

impl Runtime {
    /// Reads `AWS_LAMBDA_RUNTIME_API` from the process environment.
    pub fn detect() -> Runtime {
        if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() {
            Runtime::Lambda
        } else {
            Runtime::Process
        }
    }
}

/// What the publisher was asked to do, with everything it needs for that, parsed.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    /// SQS queue for records that can never be published; `None`: logged and skipped.
    pub dead_letter_queue_url: Option<String>,
}

/// The publisher's three ways to run.
#[derive(Debug, Clone)]
pub enum Mode {
    /// The handler under the Lambda runtime.
    Lambda { topic_arn: String },
    /// The handler as a long-lived stream poller (`poll`).
    Poll {
        topic_arn: String,
        poll: PollSettings,
    },
    /// Create the topic and print its ARN (`create-topic`).
    CreateTopic { name: String },
}

/// How `poll` reads the stream.
#[derive(Debug, Clone)]
pub struct PollSettings {
    /// Table whose latest stream is read.
    pub table: String,
    pub poller: PollerConfig,
    pub metrics_listen: Option<SocketAddr>,
    pub checkpoint_file: Option<PathBuf>,
}

/// A command line that says nothing the publisher can do.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("no topic: set CHORUS_TOPIC_ARN or pass --topic-arn")]
    NoTopic,
    #[error(
        "nothing to do: run `chorus-publisher poll` (or inside Lambda, where \
         AWS_LAMBDA_RUNTIME_API is set); see --help"
    )]
    NothingToDo,
}

impl Settings {
    /// The settings `cli` asks for, run under `runtime`.
    ///
    /// # Errors
    /// When the mode needs a topic and none is given, or there is no mode at all.
    pub fn from_cli(cli: Cli, runtime: Runtime) -> Result<Settings, SettingsError> {
        let Cli {
            command,
            topic_arn,
            dead_letter_queue_url,
            log: _,
        } = cli;
        let topic_arn = topic_arn.ok_or(SettingsError::NoTopic);
        let mode = match (runtime, command) {
            (Runtime::Lambda, _) => Mode::Lambda {
                topic_arn: topic_arn?,
            },
            (Runtime::Process, Some(Command::Poll(args))) => Mode::Poll {
                topic_arn: topic_arn?,
                poll: PollSettings {
                    table: args.table,
                    poller: PollerConfig {
                        batch_size: args.batch_size,
                        idle_interval: args.idle_interval,
                        ..PollerConfig::default()
                    },
                    metrics_listen: args.metrics_listen,
                    checkpoint_file: args.checkpoint_file,
                },
            },
            (Runtime::Process, Some(Command::CreateTopic { name })) => Mode::CreateTopic { name },
            (Runtime::Process, None) => return Err(SettingsError::NothingToDo),
        };
        Ok(Settings {
            mode,
            dead_letter_queue_url,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn poll_takes_a_checkpoint_file_and_defaults_to_none() {
        use clap::Parser as _;
        let poll = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
            Some(Command::Poll(poll)) => poll,
            other => panic!("{other:?}"),
        };
        assert_eq!(poll(&["chorus-publisher", "poll"]).checkpoint_file, None);
        assert_eq!(
            poll(&[
                "chorus-publisher",
                "poll",
                "--checkpoint-file",
                "/var/lib/chorus/poller.json"
            ])
            .checkpoint_file,
            Some("/var/lib/chorus/poller.json".into())
        );
    }

    fn settings(args: &[&str], runtime: Runtime) -> Result<Settings, SettingsError> {
        use clap::Parser as _;
        let mut argv = vec!["chorus-publisher"];
        argv.extend(args);
        Settings::from_cli(Cli::try_parse_from(argv).unwrap(), runtime)
    }

    #[test]
    fn poll_flags_become_the_pollers_settings() {
        let settings = settings(
            &[
                "poll",
                "--topic-arn",
                "arn:aws:sns:us-east-1:1:t",
                "--table",
                "messages",
                "--idle-ms",
                "50",
                "--batch-size",
                "10",
                "--metrics-listen",
                "127.0.0.1:9464",
            ],
            Runtime::Process,
        )
        .unwrap();
        let Mode::Poll { topic_arn, poll } = settings.mode else {
            panic!("{:?}", settings.mode)
        };
        assert_eq!(topic_arn, "arn:aws:sns:us-east-1:1:t");
        assert_eq!(poll.table, "messages");
        assert_eq!(poll.poller.idle_interval, Duration::from_millis(50));
        assert_eq!(poll.poller.batch_size, 10);
        assert_eq!(poll.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
    }

    #[test]
    fn the_idle_pause_is_a_number_of_milliseconds() {
        use clap::Parser as _;
        let err = Cli::try_parse_from(["chorus-publisher", "poll", "--idle-ms", "1s"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("invalid value '1s' for '--idle-ms <IDLE_MS>'"),
            "{err}"
        );
    }

    #[test]
    fn publishing_modes_refuse_to_start_without_a_topic() {
        let cli = |command| Cli {
            command,
            topic_arn: None,
            dead_letter_queue_url: None,
            log: chorus_service::LogArgs {
                log_format: chorus_service::LogFormat::Text,
                log: "info".into(),
            },
        };
        let poll = || {
            use clap::Parser as _;
            Cli::try_parse_from(["chorus-publisher", "poll"])
                .unwrap()
                .command
        };
        for (cli, runtime) in [
            (cli(poll()), Runtime::Process),
            (cli(None), Runtime::Lambda),
        ] {
            let err = Settings::from_cli(cli, runtime).unwrap_err();
            assert_eq!(
                err.to_string(),
                "no topic: set CHORUS_TOPIC_ARN or pass --topic-arn"
            );
        }
    }

    #[test]
    fn in_lambda_the_handler_runs_whatever_the_command_line_says() {
        let settings = settings(
            &["poll", "--topic-arn", "arn:aws:sns:us-east-1:1:t"],
            Runtime::Lambda,
        )
        .unwrap();
        assert!(
            matches!(&settings.mode, Mode::Lambda { topic_arn } if topic_arn == "arn:aws:sns:us-east-1:1:t"),
            "{:?}",
            settings.mode
        );
    }

    #[test]
    fn without_a_command_outside_lambda_there_is_nothing_to_do() {
        let err = settings(&[], Runtime::Process).unwrap_err();
        assert!(
            err.to_string().contains("run `chorus-publisher poll`"),
            "{err}"
        );
    }
}
