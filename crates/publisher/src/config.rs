//! The publisher's command line. In Lambda (`AWS_LAMBDA_RUNTIME_API` set) only the environment is
//! read: `CHORUS_TOPIC_ARN`, and the log settings.

use chorus_service::LogArgs;

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
    #[arg(long, env = "CHORUS_POLL_IDLE_MS", default_value_t = 100)]
    pub idle_ms: u64,
    /// Keep each shard's position in this file (saved at most once a second and at shutdown) and
    /// resume from it on start. Without it positions live in memory and a restart reads the
    /// stream from its start again (gateways drop the duplicates).
    #[arg(long, env = "CHORUS_CHECKPOINT_FILE")]
    pub checkpoint_file: Option<std::path::PathBuf>,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }

    #[test]
    fn poll_takes_a_checkpoint_file_and_defaults_to_none() {
        use clap::Parser as _;
        let poll = |args: &[&str]| match super::Cli::try_parse_from(args).unwrap().command {
            Some(super::Command::Poll(poll)) => poll,
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
}
