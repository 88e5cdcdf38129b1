//! The command line: every flag with its `CHORUS_*` environment variable and default, in groups,
//! and its conversion into [`Settings`] (`TryFrom<Cli>`), which refuses what makes no sense with
//! an error naming the flag.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chorus_service::LogArgs;

use crate::auth::AuthSettings;
use crate::settings::{
    BusSettings, ClientSettings, HttpUrl, HttpUrlError, Rate, RoomSettings, Settings, Transport,
    VerifySettings, WriterSettings, defaults,
};

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
    pub server: ServerArgs,
    #[command(flatten)]
    pub writer: WriterArgs,
    #[command(flatten)]
    pub bus: BusArgs,
    #[command(flatten)]
    pub rooms: RoomArgs,
    #[command(flatten)]
    pub clients: ClientArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Clone, Copy, clap::Subcommand)]
pub enum Command {
    /// Serve (the default).
    Serve,
    /// Janitor: remove the topic's subscriptions whose gateway no longer answers (crashed
    /// without draining), then exit. Run it from a timer or a lifecycle hook.
    PruneSubscriptions,
}

/// Where and how the gateway serves.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Serving")]
pub struct ServerArgs {
    /// Address to listen on (WebSocket `/ws`, SNS `/sns`, `/healthz`, `/readyz`, `/metrics`).
    #[arg(long, global = true, env = "CHORUS_GATEWAY_LISTEN", default_value = defaults::LISTEN)]
    pub listen: SocketAddr,
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
    /// Time a client has to send a request's headers (slowloris protection).
    #[arg(
        long,
        global = true,
        env = "CHORUS_HEADER_READ_TIMEOUT_MS",
        default_value_t = defaults::HEADER_READ_TIMEOUT_MS
    )]
    pub header_read_timeout_ms: u64,
    /// On SIGTERM: how long to wait for clients to be closed and the subscription removed.
    #[arg(
        long,
        global = true,
        env = "CHORUS_DRAIN_TIMEOUT_MS",
        default_value_t = defaults::DRAIN_TIMEOUT_MS
    )]
    pub drain_timeout_ms: u64,
}

/// The writers the gateway sends to and reads history from.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Writers")]
pub struct WriterArgs {
    /// Base URL of the writer API; several (repeated or comma-separated) spread rooms over
    /// writers by rendezvous hashing, each room falling back to its next writer on failure.
    #[arg(
        long = "writer-url",
        env = "CHORUS_WRITER_URL",
        value_delimiter = ',',
        num_args = 1..,
        default_value = defaults::WRITER_URL
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
    pub writer_key_file: Vec<PathBuf>,
    /// Timeout of one call to the writer (sends are retried up to 3 times with the same id).
    #[arg(
        long,
        global = true,
        env = "CHORUS_WRITER_TIMEOUT_MS",
        default_value_t = defaults::WRITER_TIMEOUT_MS
    )]
    pub writer_timeout_ms: u64,
}

/// The SNS topic, how its messages get here, and how they are checked.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Bus")]
pub struct BusArgs {
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
    #[arg(long, global = true, env = "CHORUS_SQS_WAIT_SECS", default_value_t = defaults::SQS_WAIT_SECS,
          value_parser = clap::value_parser!(u64).range(1..=20))]
    pub sqs_wait_secs: u64,
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
        default_value_t = defaults::SNS_MAX_AGE_SECS
    )]
    pub sns_max_age_secs: u64,
    /// `/sns` requests read or verified at once; more are answered 503 at once (SNS retries).
    #[arg(
        long,
        global = true,
        env = "CHORUS_MAX_SNS_REQUESTS",
        default_value_t = defaults::MAX_SNS_REQUESTS
    )]
    pub max_sns_requests: usize,
    /// Time an `/sns` request has to send its body, after its headers; a slower one gets 408.
    #[arg(
        long,
        global = true,
        env = "CHORUS_SNS_BODY_TIMEOUT_MS",
        default_value_t = defaults::SNS_BODY_TIMEOUT_MS
    )]
    pub sns_body_timeout_ms: u64,
    /// How often to check that the subscription still exists (re-subscribing if it is gone).
    #[arg(
        long,
        global = true,
        env = "CHORUS_SUBSCRIPTION_CHECK_MS",
        default_value_t = defaults::SUBSCRIPTION_CHECK_MS
    )]
    pub subscription_check_ms: u64,
    /// How long a subscription may stay pending confirmation before it is removed and made again
    /// (SNS then sends a new confirmation). Not ready meanwhile; `/readyz` says why.
    #[arg(
        long,
        global = true,
        env = "CHORUS_SUBSCRIBE_TIMEOUT_MS",
        default_value_t = defaults::SUBSCRIBE_TIMEOUT_MS
    )]
    pub subscribe_timeout_ms: u64,
    /// Subscriptions made, each waited on for `--subscribe-timeout-ms`, before the gateway gives
    /// up with an error saying why (at start it then exits; later it tries again at the next
    /// subscription check).
    #[arg(long, global = true, env = "CHORUS_SUBSCRIBE_ATTEMPTS", default_value_t = defaults::SUBSCRIBE_ATTEMPTS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub subscribe_attempts: u32,
}

/// The transport from SNS to this gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BusKind {
    Http,
    Sqs,
}

/// How rooms are kept whole when the bus loses or delays messages.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Rooms")]
pub struct RoomArgs {
    /// How long a hole in a room's sequence may stay open before it is fetched from the writer.
    #[arg(
        long,
        global = true,
        env = "CHORUS_GAP_TIMEOUT_MS",
        default_value_t = defaults::GAP_TIMEOUT_MS
    )]
    pub gap_timeout_ms: u64,
    /// A room with local members that has been quiet for this long has its head read from the
    /// writer, so a lost last message is delivered with no later message. The interval doubles
    /// while the room stays quiet, up to --tail-check-max-ms.
    #[arg(
        long,
        global = true,
        env = "CHORUS_TAIL_CHECK_MS",
        default_value_t = defaults::TAIL_CHECK_MS
    )]
    pub tail_check_ms: u64,
    /// Ceiling of the quiet-room tail-check interval: the longest a lost message can wait in a
    /// room that had been quiet long before it.
    #[arg(
        long,
        global = true,
        env = "CHORUS_TAIL_CHECK_MAX_MS",
        default_value_t = defaults::TAIL_CHECK_MAX_MS
    )]
    pub tail_check_max_ms: u64,
    /// A replay (join with `since`) into a connection that takes nothing from its queue for this
    /// long closes it as too slow (4001).
    #[arg(
        long,
        global = true,
        env = "CHORUS_REPLAY_STALL_TIMEOUT_MS",
        default_value_t = defaults::REPLAY_STALL_TIMEOUT_MS
    )]
    pub replay_stall_timeout_ms: u64,
}

/// Per-connection limits, and how many connections.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Clients")]
pub struct ClientArgs {
    /// Frames queued per connection before it counts as too slow and is closed (code 4001).
    #[arg(long, global = true, env = "CHORUS_SEND_QUEUE", default_value_t = defaults::SEND_QUEUE)]
    pub send_queue: usize,
    /// Bytes of frames queued per connection before it counts as too slow and is closed (4001).
    #[arg(
        long,
        global = true,
        env = "CHORUS_SEND_QUEUE_BYTES",
        default_value_t = defaults::SEND_QUEUE_BYTES
    )]
    pub send_queue_bytes: usize,
    /// Rooms one connection may be in at once.
    #[arg(
        long,
        global = true,
        env = "CHORUS_MAX_ROOMS_PER_CONNECTION",
        default_value_t = defaults::MAX_ROOMS_PER_CONNECTION
    )]
    pub max_rooms_per_connection: usize,
    /// WebSocket connections this gateway holds at once; one more is closed with code 4004
    /// (gateway full: reconnect elsewhere and resume).
    #[arg(
        long,
        global = true,
        env = "CHORUS_MAX_CONNECTIONS",
        default_value_t = defaults::MAX_CONNECTIONS
    )]
    pub max_connections: usize,
    /// Sends per second one connection may make (token bucket); more get `rate_limited`.
    #[arg(
        long,
        global = true,
        env = "CHORUS_SENDS_PER_SEC",
        default_value_t = defaults::SENDS_PER_SEC
    )]
    pub sends_per_sec: u32,
    /// Sends one connection may make in a burst above `--sends-per-sec`.
    #[arg(long, global = true, env = "CHORUS_SEND_BURST", default_value_t = defaults::SEND_BURST)]
    pub send_burst: u32,
    /// Joins per second one connection may make (token bucket); more get `rate_limited`.
    #[arg(
        long,
        global = true,
        env = "CHORUS_JOINS_PER_SEC",
        default_value_t = defaults::JOINS_PER_SEC
    )]
    pub joins_per_sec: u32,
    /// Joins one connection may make in a burst above `--joins-per-sec`.
    #[arg(long, global = true, env = "CHORUS_JOIN_BURST", default_value_t = defaults::JOIN_BURST)]
    pub join_burst: u32,
    /// How often the gateway pings each client.
    #[arg(
        long,
        global = true,
        env = "CHORUS_PING_INTERVAL_MS",
        default_value_t = defaults::PING_INTERVAL_MS
    )]
    pub ping_interval_ms: u64,
    /// A connection from which nothing (no frame, no pong) is heard for this long is closed
    /// (4005). Must be longer than the ping interval.
    #[arg(
        long,
        global = true,
        env = "CHORUS_IDLE_TIMEOUT_MS",
        default_value_t = defaults::IDLE_TIMEOUT_MS
    )]
    pub idle_timeout_ms: u64,
}

/// How clients prove who they are.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Client authentication")]
pub struct AuthArgs {
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
        default_value_t = defaults::JWT_LEEWAY_SECS
    )]
    pub jwt_leeway_secs: u64,
    /// Development only: a client names itself with `?user=NAME`, unauthenticated.
    #[arg(long, global = true, env = "CHORUS_INSECURE_DEV_USERS")]
    pub insecure_dev_users: bool,
}

/// A setting that makes no sense, named by its flag.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{flag} must be an http(s) URL, got {value:?}")]
    NotHttpUrl {
        flag: &'static str,
        value: String,
        #[source]
        source: HttpUrlError,
    },
    #[error("{flag} must be at least 1")]
    Zero { flag: &'static str },
    #[error(
        "--idle-timeout-ms ({idle_ms}) must be longer than --ping-interval-ms ({ping_ms}): a \
         client needs a ping to answer before it can be called idle"
    )]
    IdleBeforePing { idle_ms: u64, ping_ms: u64 },
}

/// Parses `value` of `flag` as an http(s) URL.
fn http_url(flag: &'static str, value: &str) -> Result<HttpUrl, SettingsError> {
    value.parse().map_err(|source| SettingsError::NotHttpUrl {
        flag,
        value: value.to_owned(),
        source,
    })
}

/// `value` of `flag`, refused if zero.
fn at_least_one<T: Default + PartialEq>(flag: &'static str, value: T) -> Result<T, SettingsError> {
    if value == T::default() {
        return Err(SettingsError::Zero { flag });
    }
    Ok(value)
}

/// Milliseconds of `flag`, refused if zero.
fn nonzero_ms(flag: &'static str, ms: u64) -> Result<Duration, SettingsError> {
    at_least_one(flag, ms).map(Duration::from_millis)
}

impl TryFrom<Cli> for Settings {
    type Error = SettingsError;

    fn try_from(cli: Cli) -> Result<Settings, SettingsError> {
        let Cli {
            command: _,
            server,
            writer,
            bus,
            rooms,
            clients,
            auth,
            log: _,
        } = cli;
        let ms = Duration::from_millis;
        if clients.idle_timeout_ms <= clients.ping_interval_ms {
            return Err(SettingsError::IdleBeforePing {
                idle_ms: clients.idle_timeout_ms,
                ping_ms: clients.ping_interval_ms,
            });
        }
        // Checked even with verification off, when they are not used.
        let max_age =
            Duration::from_secs(at_least_one("--sns-max-age-secs", bus.sns_max_age_secs)?);
        let cert_mirror = bus
            .sns_cert_mirror
            .as_deref()
            .map(|mirror| http_url("--sns-cert-mirror", mirror))
            .transpose()?;
        let verify = (!bus.insecure_skip_sns_verification).then_some(VerifySettings {
            max_age,
            cert_mirror,
        });
        Ok(Settings {
            listen: server.listen,
            gateway_id: server.gateway_id,
            public_url: server
                .public_url
                .as_deref()
                .map(|url| http_url("--public-url", url))
                .transpose()?,
            metrics_listen: server.metrics_listen,
            web_fallbacks: server.web_fallback,
            header_read_timeout: nonzero_ms(
                "--header-read-timeout-ms",
                server.header_read_timeout_ms,
            )?,
            drain_timeout: ms(server.drain_timeout_ms),
            writer: WriterSettings {
                urls: writer
                    .writer_urls
                    .iter()
                    .map(|url| http_url("--writer-url", url))
                    .collect::<Result<_, _>>()?,
                key_files: writer.writer_key_file,
                timeout: ms(writer.writer_timeout_ms),
            },
            bus: BusSettings {
                topic_arn: bus.topic_arn,
                transport: match bus.bus {
                    BusKind::Http => Transport::Http,
                    BusKind::Sqs => Transport::Sqs {
                        queue_name: bus.sqs_queue_name,
                        wait: Duration::from_secs(bus.sqs_wait_secs),
                    },
                },
                verify,
                max_sns_requests: at_least_one("--max-sns-requests", bus.max_sns_requests)?,
                sns_body_timeout: nonzero_ms("--sns-body-timeout-ms", bus.sns_body_timeout_ms)?,
                subscription_check: ms(bus.subscription_check_ms),
                subscribe_timeout: ms(bus.subscribe_timeout_ms),
                subscribe_attempts: bus.subscribe_attempts,
            },
            rooms: RoomSettings {
                gap_timeout: ms(rooms.gap_timeout_ms),
                tail_check: nonzero_ms("--tail-check-ms", rooms.tail_check_ms)?,
                tail_check_max: ms(rooms.tail_check_max_ms),
                replay_stall: nonzero_ms(
                    "--replay-stall-timeout-ms",
                    rooms.replay_stall_timeout_ms,
                )?,
            },
            clients: ClientSettings {
                send_queue: at_least_one("--send-queue", clients.send_queue)?,
                send_queue_bytes: at_least_one("--send-queue-bytes", clients.send_queue_bytes)?,
                max_rooms: at_least_one(
                    "--max-rooms-per-connection",
                    clients.max_rooms_per_connection,
                )?,
                max_connections: at_least_one("--max-connections", clients.max_connections)?,
                sends: Rate {
                    per_sec: at_least_one("--sends-per-sec", clients.sends_per_sec)?,
                    burst: at_least_one("--send-burst", clients.send_burst)?,
                },
                joins: Rate {
                    per_sec: at_least_one("--joins-per-sec", clients.joins_per_sec)?,
                    burst: at_least_one("--join-burst", clients.join_burst)?,
                },
                ping_interval: nonzero_ms("--ping-interval-ms", clients.ping_interval_ms)?,
                idle_timeout: ms(clients.idle_timeout_ms),
            },
            auth: AuthSettings {
                secret_files: auth.jwt_secret_file,
                public_key_files: auth.jwt_public_key_file,
                audience: auth.jwt_audience,
                issuer: auth.jwt_issuer,
                leeway: Duration::from_secs(auth.jwt_leeway_secs),
                dev_users: auth.insecure_dev_users,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::*;

    fn settings(args: &[&str]) -> Result<Settings, SettingsError> {
        let mut all = vec!["chorus-gateway", "--topic-arn", "arn:t"];
        all.extend_from_slice(args);
        Settings::try_from(Cli::try_parse_from(all).unwrap())
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn verification_is_on_unless_switched_off() {
        let settings = settings(&[]).unwrap();
        assert!(settings.bus.verify.is_some());
        let settings = self::settings(&["--insecure-skip-sns-verification"]).unwrap();
        assert!(settings.bus.verify.is_none());
        assert_eq!(
            settings.sns_endpoint("127.0.0.1:9000".parse().unwrap()),
            "http://127.0.0.1:9000/sns"
        );
    }

    #[test]
    fn several_writer_urls_are_taken_comma_separated_or_repeated_and_each_is_checked() {
        let urls = |settings: Settings| -> Vec<String> {
            settings
                .writer
                .urls
                .iter()
                .map(|url| url.base().to_owned())
                .collect()
        };
        assert_eq!(urls(settings(&[]).unwrap()), ["http://127.0.0.1:8080"]);
        let comma = urls(settings(&["--writer-url", "http://a:1,http://b:2"]).unwrap());
        let repeated =
            urls(settings(&["--writer-url", "http://a:1", "--writer-url", "http://b:2"]).unwrap());
        assert_eq!(comma, ["http://a:1", "http://b:2"]);
        assert_eq!(repeated, comma);
        let err = settings(&["--writer-url", "http://a:1,b:2"]).unwrap_err();
        assert!(err.to_string().contains("--writer-url"), "{err}");
    }

    #[test]
    fn bad_urls_are_refused_with_the_flag_named() {
        let err = settings(&[
            "--insecure-skip-sns-verification",
            "--public-url",
            "ftp://x",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("--public-url"), "{err}");
    }

    #[test]
    fn the_defaults_of_the_command_line_are_those_of_settings_new() {
        let parsed = settings(&[]).unwrap();
        let built = Settings::new("arn:t", defaults::WRITER_URL.parse().unwrap());
        // Settings holds no secrets and every field is Debug: compare them all at once.
        assert_eq!(format!("{parsed:?}"), format!("{built:?}"));
    }
}
