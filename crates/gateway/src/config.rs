//! The gateway's configuration, parsed once from flags and `CHORUS_*` environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chorus_service::LogArgs;

use crate::auth::AuthSettings;

/// `chorus-gateway [serve] …` or `chorus-gateway prune-subscriptions …`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "chorus-gateway",
    version,
    about = "Chorus gateway: WebSocket clients ↔ rooms, fed by SNS"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Clone, Copy, clap::Subcommand)]
pub enum Command {
    /// Serve (the default).
    Serve,
    /// Janitor: remove the topic's subscriptions whose gateway no longer answers (crashed
    /// without draining), then exit. Run it from a timer or a lifecycle hook.
    PruneSubscriptions,
}

/// Everything the gateway is configured with.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address to listen on (WebSocket `/ws`, SNS `/sns`, `/healthz`, `/readyz`, `/metrics`).
    #[arg(
        long,
        global = true,
        env = "CHORUS_GATEWAY_LISTEN",
        default_value = "127.0.0.1:8081"
    )]
    pub listen: SocketAddr,
    /// Base URL of the writer API; several (repeated or comma-separated) spread rooms over
    /// writers by rendezvous hashing, each room falling back to its next writer on failure.
    #[arg(
        long = "writer-url",
        env = "CHORUS_WRITER_URL",
        value_delimiter = ',',
        num_args = 1..,
        default_value = "http://127.0.0.1:8080"
    )]
    pub writer_urls: Vec<String>,
    /// Files holding the service keys shared with the writers (at least 32 bytes each): the
    /// gateway signs a short-lived token with the first for every call to a writer. Several for
    /// rotation; comma-separated in the environment variable.
    #[arg(
        long,
        global = true,
        env = "CHORUS_WRITER_KEY_FILE",
        value_delimiter = ','
    )]
    pub writer_key_file: Vec<std::path::PathBuf>,
    /// SNS topic to subscribe to; only its notifications are accepted.
    #[arg(long, env = "CHORUS_TOPIC_ARN")]
    pub topic_arn: String,
    /// How SNS reaches this gateway: `http` posts to `<public-url>/sns`; `sqs` gives the gateway
    /// its own queue (for private subnets, which SNS cannot reach over HTTP).
    #[arg(
        long,
        global = true,
        env = "CHORUS_BUS",
        value_enum,
        default_value = "http"
    )]
    pub bus: BusKind,
    /// With `--bus sqs`: the queue's name (default `chorus-gw-<gateway id>-<random>`).
    #[arg(long, global = true, env = "CHORUS_SQS_QUEUE_NAME")]
    pub sqs_queue_name: Option<String>,
    /// With `--bus sqs`: long-poll wait, in seconds (1–20).
    #[arg(long, global = true, env = "CHORUS_SQS_WAIT_SECS", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..=20))]
    pub sqs_wait_secs: u64,
    /// URL at which SNS reaches this gateway (the subscription endpoint is `<public-url>/sns`).
    /// Defaults to `http://<listen>`.
    #[arg(long, global = true, env = "CHORUS_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Also serve `/metrics` on this address (e.g. a port only the monitoring network reaches).
    #[arg(long, global = true, env = "CHORUS_GATEWAY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// WebSocket URLs the chat page at `/` falls back to, in turn, when this gateway drops it
    /// (comma-separated). Behind a load balancer none are needed: the page reconnects to its origin.
    #[arg(
        long,
        global = true,
        env = "CHORUS_WEB_FALLBACKS",
        value_delimiter = ','
    )]
    pub web_fallback: Vec<String>,
    /// Name shown in logs, metrics and the chat page; defaults to the listen address.
    #[arg(long, global = true, env = "CHORUS_GATEWAY_ID")]
    pub gateway_id: Option<String>,
    /// Accept SNS posts without checking their signature. Never in production: anyone who can
    /// reach `/sns` could broadcast. The gateway warns at every start with this set.
    #[arg(long, global = true, env = "CHORUS_INSECURE_SKIP_SNS_VERIFICATION")]
    pub insecure_skip_sns_verification: bool,
    /// Local emulators only: fetch SNS signing certificates from this base URL (the certificate
    /// URL's path is kept, and the request is signed as an SNS call) whatever host or scheme the
    /// message's `SigningCertURL` names, instead of only from `https://sns.<region>.amazonaws.com`.
    /// Signatures are still checked. The gateway warns at every start with this set.
    #[arg(long, global = true, env = "CHORUS_SNS_CERT_MIRROR")]
    pub sns_cert_mirror: Option<String>,
    /// SNS messages whose Timestamp is older than this many seconds are refused.
    #[arg(
        long,
        global = true,
        env = "CHORUS_SNS_MAX_AGE_SECS",
        default_value_t = 3600
    )]
    pub sns_max_age_secs: u64,
    /// Development only: a client names itself with `?user=NAME`, unauthenticated.
    #[arg(long, global = true, env = "CHORUS_INSECURE_DEV_USERS")]
    pub insecure_dev_users: bool,
    /// On SIGTERM: how long to wait for clients to be closed and the subscription removed.
    #[arg(
        long,
        global = true,
        env = "CHORUS_DRAIN_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub drain_timeout_ms: u64,
    /// How long a hole in a room's sequence may stay open before it is fetched from the writer.
    #[arg(
        long,
        global = true,
        env = "CHORUS_GAP_TIMEOUT_MS",
        default_value_t = 500
    )]
    pub gap_timeout_ms: u64,
    /// A room with local members that has been quiet for this long has its head read from the
    /// writer, so a lost last message is delivered with no later message. The interval doubles
    /// while the room stays quiet, up to --tail-check-max-ms.
    #[arg(
        long,
        global = true,
        env = "CHORUS_TAIL_CHECK_MS",
        default_value_t = 2_000
    )]
    pub tail_check_ms: u64,
    /// Ceiling of the quiet-room tail-check interval: the longest a lost message can wait in a
    /// room that had been quiet long before it.
    #[arg(
        long,
        global = true,
        env = "CHORUS_TAIL_CHECK_MAX_MS",
        default_value_t = 30_000
    )]
    pub tail_check_max_ms: u64,
    /// A replay (join with `since`) into a connection that takes nothing from its queue for this
    /// long closes it as too slow (4001).
    #[arg(
        long,
        global = true,
        env = "CHORUS_REPLAY_STALL_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub replay_stall_timeout_ms: u64,
    /// `/sns` requests read or verified at once; more are answered 503 at once (SNS retries).
    #[arg(
        long,
        global = true,
        env = "CHORUS_MAX_SNS_REQUESTS",
        default_value_t = 64
    )]
    pub max_sns_requests: usize,
    /// Time an `/sns` request has to send its body, after its headers; a slower one gets 408.
    #[arg(
        long,
        global = true,
        env = "CHORUS_SNS_BODY_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub sns_body_timeout_ms: u64,
    /// How often to check that the subscription still exists (re-subscribing if it is gone).
    #[arg(
        long,
        global = true,
        env = "CHORUS_SUBSCRIPTION_CHECK_MS",
        default_value_t = 30_000
    )]
    pub subscription_check_ms: u64,
    /// How long a subscription may stay pending confirmation before it is removed and made again
    /// (SNS then sends a new confirmation). Not ready meanwhile; `/readyz` says why.
    #[arg(
        long,
        global = true,
        env = "CHORUS_SUBSCRIBE_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub subscribe_timeout_ms: u64,
    /// Subscriptions made, each waited on for `--subscribe-timeout-ms`, before the gateway gives
    /// up with an error saying why (at start it then exits; later it tries again at the next
    /// subscription check).
    #[arg(long, global = true, env = "CHORUS_SUBSCRIBE_ATTEMPTS", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub subscribe_attempts: u32,
    /// Timeout of one call to the writer (sends are retried up to 3 times with the same id).
    #[arg(
        long,
        global = true,
        env = "CHORUS_WRITER_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub writer_timeout_ms: u64,
    /// Frames queued per connection before it counts as too slow and is closed (code 4001).
    #[arg(long, global = true, env = "CHORUS_SEND_QUEUE", default_value_t = 512)]
    pub send_queue: usize,
    /// Rooms one connection may be in at once.
    #[arg(
        long,
        global = true,
        env = "CHORUS_MAX_ROOMS_PER_CONNECTION",
        default_value_t = 100
    )]
    pub max_rooms_per_connection: usize,
    /// Bytes of frames queued per connection before it counts as too slow and is closed (4001).
    #[arg(
        long,
        global = true,
        env = "CHORUS_SEND_QUEUE_BYTES",
        default_value_t = 1024 * 1024
    )]
    pub send_queue_bytes: usize,
    /// WebSocket connections this gateway holds at once; one more is closed with code 4004
    /// (gateway full: reconnect elsewhere and resume).
    #[arg(
        long,
        global = true,
        env = "CHORUS_MAX_CONNECTIONS",
        default_value_t = 100_000
    )]
    pub max_connections: usize,
    /// Sends per second one connection may make (token bucket); more get `rate_limited`.
    #[arg(
        long,
        global = true,
        env = "CHORUS_SENDS_PER_SEC",
        default_value_t = 20
    )]
    pub sends_per_sec: u32,
    /// Sends one connection may make in a burst above `--sends-per-sec`.
    #[arg(long, global = true, env = "CHORUS_SEND_BURST", default_value_t = 40)]
    pub send_burst: u32,
    /// Joins per second one connection may make (token bucket); more get `rate_limited`.
    #[arg(
        long,
        global = true,
        env = "CHORUS_JOINS_PER_SEC",
        default_value_t = 10
    )]
    pub joins_per_sec: u32,
    /// Joins one connection may make in a burst above `--joins-per-sec`.
    #[arg(long, global = true, env = "CHORUS_JOIN_BURST", default_value_t = 50)]
    pub join_burst: u32,
    /// How often the gateway pings each client.
    #[arg(
        long,
        global = true,
        env = "CHORUS_PING_INTERVAL_MS",
        default_value_t = 25_000
    )]
    pub ping_interval_ms: u64,
    /// A connection from which nothing (no frame, no pong) is heard for this long is closed
    /// (4005). Must be longer than the ping interval.
    #[arg(
        long,
        global = true,
        env = "CHORUS_IDLE_TIMEOUT_MS",
        default_value_t = 60_000
    )]
    pub idle_timeout_ms: u64,
    /// Time a client has to send a request's headers (slowloris protection).
    #[arg(
        long,
        global = true,
        env = "CHORUS_HEADER_READ_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub header_read_timeout_ms: u64,
    /// HS256 secret for client tokens: a file holding at least 32 bytes (a trailing newline is
    /// ignored). Repeat the flag (or comma-separate) to accept several keys during a rotation.
    #[arg(
        long,
        global = true,
        env = "CHORUS_JWT_SECRET_FILE",
        value_delimiter = ','
    )]
    pub jwt_secret_file: Vec<PathBuf>,
    /// Public key for client tokens, PEM: RSA for RS256, EC P-256 for ES256. Repeatable.
    #[arg(
        long,
        global = true,
        env = "CHORUS_JWT_PUBLIC_KEY_FILE",
        value_delimiter = ','
    )]
    pub jwt_public_key_file: Vec<PathBuf>,
    /// When set, tokens must carry this `aud`.
    #[arg(long, global = true, env = "CHORUS_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// When set, tokens must carry this `iss`.
    #[arg(long, global = true, env = "CHORUS_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Clock skew allowed on a token's `exp` and `nbf`, in seconds.
    #[arg(
        long,
        global = true,
        env = "CHORUS_JWT_LEEWAY_SECS",
        default_value_t = 30
    )]
    pub jwt_leeway_secs: u64,
    #[command(flatten)]
    pub log: LogArgs,
}

/// The transport from SNS to this gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BusKind {
    Http,
    Sqs,
}

/// A setting that makes no sense.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// A configuration with every default, for tests and embedding.
    pub fn new(topic_arn: impl Into<String>, writer_url: impl Into<String>) -> Self {
        use clap::Parser as _;
        let mut config = Cli::parse_from(["chorus-gateway", "--topic-arn", "unset"]).config;
        config.topic_arn = topic_arn.into();
        config.writer_urls = vec![writer_url.into()];
        config
    }

    /// Checks the settings that clap cannot.
    ///
    /// # Errors
    /// [`ConfigError`] naming the bad setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(mirror) = &self.sns_cert_mirror
            && !(mirror.starts_with("http://") || mirror.starts_with("https://"))
        {
            return Err(ConfigError::Invalid(format!(
                "--sns-cert-mirror must be an http(s) URL, got {mirror:?}"
            )));
        }
        if self.sns_max_age_secs == 0 {
            return Err(ConfigError::Invalid(
                "--sns-max-age-secs must be at least 1".into(),
            ));
        }
        if let Some(url) = &self.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::Invalid(format!(
                "--public-url must be an http(s) URL, got {url:?}"
            )));
        }
        for url in &self.writer_urls {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::Invalid(format!(
                    "--writer-url must be an http(s) URL, got {url:?}"
                )));
            }
        }
        for (flag, value) in [
            ("--send-queue", self.send_queue),
            ("--send-queue-bytes", self.send_queue_bytes),
            ("--max-rooms-per-connection", self.max_rooms_per_connection),
            ("--max-connections", self.max_connections),
            ("--sends-per-sec", self.sends_per_sec as usize),
            ("--send-burst", self.send_burst as usize),
            ("--joins-per-sec", self.joins_per_sec as usize),
            ("--join-burst", self.join_burst as usize),
            ("--ping-interval-ms", self.ping_interval_ms as usize),
            ("--tail-check-ms", self.tail_check_ms as usize),
            ("--max-sns-requests", self.max_sns_requests),
            ("--sns-body-timeout-ms", self.sns_body_timeout_ms as usize),
            (
                "--replay-stall-timeout-ms",
                self.replay_stall_timeout_ms as usize,
            ),
            (
                "--header-read-timeout-ms",
                self.header_read_timeout_ms as usize,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{flag} must be at least 1")));
            }
        }
        if self.idle_timeout_ms <= self.ping_interval_ms {
            return Err(ConfigError::Invalid(format!(
                "--idle-timeout-ms ({}) must be longer than --ping-interval-ms ({}): a client \
                 needs a ping to answer before it can be called idle",
                self.idle_timeout_ms, self.ping_interval_ms
            )));
        }
        Ok(())
    }

    /// How clients are authenticated.
    pub fn auth(&self) -> AuthSettings {
        AuthSettings {
            secret_files: self.jwt_secret_file.clone(),
            public_key_files: self.jwt_public_key_file.clone(),
            audience: self.jwt_audience.clone(),
            issuer: self.jwt_issuer.clone(),
            leeway: Duration::from_secs(self.jwt_leeway_secs),
            dev_users: self.insecure_dev_users,
        }
    }

    /// Where SNS should post.
    pub fn sns_endpoint(&self, bound: SocketAddr) -> String {
        let base = self
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{bound}"));
        format!("{}/sns", base.trim_end_matches('/'))
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn verification_is_on_unless_switched_off() {
        let cli = Cli::try_parse_from(["chorus-gateway", "--topic-arn", "arn:t"]).unwrap();
        assert!(!cli.config.insecure_skip_sns_verification);
        cli.config.validate().unwrap();
        let cli = Cli::try_parse_from([
            "chorus-gateway",
            "--topic-arn",
            "arn:t",
            "--insecure-skip-sns-verification",
        ])
        .unwrap();
        cli.config.validate().unwrap();
        assert_eq!(
            cli.config.sns_endpoint("127.0.0.1:9000".parse().unwrap()),
            "http://127.0.0.1:9000/sns"
        );
    }

    #[test]
    fn several_writer_urls_are_taken_comma_separated_or_repeated_and_each_is_checked() {
        let parse = |args: &[&str]| {
            let mut all = vec!["chorus-gateway", "--topic-arn", "arn:t"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).unwrap().config
        };
        assert_eq!(parse(&[]).writer_urls, ["http://127.0.0.1:8080"]);
        let comma = parse(&["--writer-url", "http://a:1,http://b:2"]);
        let repeated = parse(&["--writer-url", "http://a:1", "--writer-url", "http://b:2"]);
        assert_eq!(comma.writer_urls, ["http://a:1", "http://b:2"]);
        assert_eq!(repeated.writer_urls, comma.writer_urls);
        comma.validate().unwrap();
        let err = parse(&["--writer-url", "http://a:1,b:2"])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("--writer-url"), "{err}");
    }

    #[test]
    fn bad_urls_are_refused_with_the_flag_named() {
        let cli = Cli::try_parse_from([
            "chorus-gateway",
            "--topic-arn",
            "arn:t",
            "--insecure-skip-sns-verification",
            "--public-url",
            "ftp://x",
        ])
        .unwrap();
        let err = cli.config.validate().unwrap_err().to_string();
        assert!(err.contains("--public-url"), "{err}");
    }
}
