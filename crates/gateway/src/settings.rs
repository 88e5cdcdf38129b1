//! What a gateway runs with, typed: durations as [`Duration`], URLs as [`HttpUrl`], the
//! transport and verification as enums. Parsed once from the command line
//! ([`crate::cli::Cli`], which names every flag, environment variable and default); tests and
//! embedders build it directly, starting from [`Settings::new`].

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::auth::AuthSettings;

/// Every default, shared by the command line and [`Settings::new`].
pub(crate) mod defaults {
    pub(crate) const LISTEN: &str = "127.0.0.1:8081";
    pub(crate) const WRITER_URL: &str = "http://127.0.0.1:8080";
    pub(crate) const WRITER_TIMEOUT_MS: u64 = 5_000;
    pub(crate) const SQS_WAIT_SECS: u64 = 20;
    pub(crate) const SNS_MAX_AGE_SECS: u64 = 3600;
    pub(crate) const MAX_SNS_REQUESTS: usize = 64;
    pub(crate) const SNS_BODY_TIMEOUT_MS: u64 = 5_000;
    pub(crate) const SUBSCRIPTION_CHECK_MS: u64 = 30_000;
    pub(crate) const SUBSCRIBE_TIMEOUT_MS: u64 = 30_000;
    pub(crate) const SUBSCRIBE_ATTEMPTS: u32 = 3;
    pub(crate) const DRAIN_TIMEOUT_MS: u64 = 10_000;
    pub(crate) const HEADER_READ_TIMEOUT_MS: u64 = 10_000;
    pub(crate) const GAP_TIMEOUT_MS: u64 = 500;
    pub(crate) const TAIL_CHECK_MS: u64 = 2_000;
    pub(crate) const TAIL_CHECK_MAX_MS: u64 = 30_000;
    pub(crate) const REPLAY_STALL_TIMEOUT_MS: u64 = 10_000;
    pub(crate) const SEND_QUEUE: usize = 512;
    pub(crate) const SEND_QUEUE_BYTES: usize = 1024 * 1024;
    pub(crate) const MAX_ROOMS_PER_CONNECTION: usize = 100;
    pub(crate) const MAX_CONNECTIONS: usize = 100_000;
    pub(crate) const SENDS_PER_SEC: u32 = 20;
    pub(crate) const SEND_BURST: u32 = 40;
    pub(crate) const JOINS_PER_SEC: u32 = 10;
    pub(crate) const JOIN_BURST: u32 = 50;
    pub(crate) const PING_INTERVAL_MS: u64 = 25_000;
    pub(crate) const IDLE_TIMEOUT_MS: u64 = 60_000;
    pub(crate) const JWT_LEEWAY_SECS: u64 = 30;
}

/// Everything a gateway runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where `/ws`, `/sns`, `/healthz`, `/readyz` and `/metrics` are served.
    pub listen: SocketAddr,
    /// Name in logs, metrics and the chat page; the bound address when `None`.
    pub gateway_id: Option<String>,
    /// Where SNS reaches this gateway (the endpoint is `<public_url>/sns`); `http://<bound
    /// address>` when `None`.
    pub public_url: Option<HttpUrl>,
    /// `/metrics` on this address too (served by [`crate::service::run`]).
    pub metrics_listen: Option<SocketAddr>,
    /// WebSocket URLs the chat page falls back to, in turn.
    pub web_fallbacks: Vec<String>,
    /// Time a client has to send a request's headers.
    pub header_read_timeout: Duration,
    /// On shutdown: how long unsubscribing and closing clients may take.
    pub drain_timeout: Duration,
    pub writer: WriterSettings,
    pub bus: BusSettings,
    pub rooms: RoomSettings,
    pub clients: ClientSettings,
    pub auth: AuthSettings,
}

/// The writers, as the gateway calls them.
#[derive(Debug, Clone)]
pub struct WriterSettings {
    /// At least one; rooms are spread over several by rendezvous hashing.
    pub urls: Vec<HttpUrl>,
    /// The service keys shared with the writers; the first signs.
    pub key_files: Vec<PathBuf>,
    /// Timeout of one call.
    pub timeout: Duration,
}

/// The SNS topic and how its messages reach this gateway.
#[derive(Debug, Clone)]
pub struct BusSettings {
    /// Only this topic's notifications are accepted.
    pub topic_arn: String,
    pub transport: Transport,
    /// `None` only with `--insecure-skip-sns-verification`: never in production.
    pub verify: Option<VerifySettings>,
    /// `/sns` requests read or verified at once (at least 1).
    pub max_sns_requests: usize,
    /// Time an `/sns` request has to send its body.
    pub sns_body_timeout: Duration,
    /// How often the subscription is checked (and made again if it is gone).
    pub subscription_check: Duration,
    /// How long a subscription may stay pending before it is removed and made again.
    pub subscribe_timeout: Duration,
    /// Subscriptions made, each waited on for `subscribe_timeout`, before giving up (at least 1).
    pub subscribe_attempts: u32,
}

/// How SNS reaches this gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// SNS posts to `<public_url>/sns`.
    Http,
    /// The gateway's own SQS queue, for private subnets SNS cannot post to.
    Sqs {
        /// The queue's name; `chorus-gw-<gateway id>-<random>` when `None`.
        queue_name: Option<String>,
        /// Long-poll wait (1–20 s).
        wait: Duration,
    },
}

/// How SNS messages are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySettings {
    /// Messages older than this (or from further in the future) are refused.
    pub max_age: Duration,
    /// Local emulators only: signing certificates from this base URL, whatever host the message
    /// names. The gateway warns at every start with this set.
    pub cert_mirror: Option<HttpUrl>,
}

impl Default for VerifySettings {
    fn default() -> Self {
        VerifySettings {
            max_age: Duration::from_secs(defaults::SNS_MAX_AGE_SECS),
            cert_mirror: None,
        }
    }
}

/// How rooms are kept whole.
#[derive(Debug, Clone)]
pub struct RoomSettings {
    /// How long a hole may stay open before it is fetched from the writer.
    pub gap_timeout: Duration,
    /// A quiet room's head is read after this long, doubling while it stays quiet…
    pub tail_check: Duration,
    /// …up to this.
    pub tail_check_max: Duration,
    /// A replay into a connection that takes nothing from its queue for this long closes it.
    pub replay_stall: Duration,
}

/// Per-connection limits, and how many connections.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Frames queued per connection before it counts as too slow (4001).
    pub send_queue: usize,
    /// Bytes queued per connection before it counts as too slow (4001).
    pub send_queue_bytes: usize,
    /// Rooms one connection may be in at once.
    pub max_rooms: usize,
    /// Connections held at once; one more is closed with 4004.
    pub max_connections: usize,
    pub sends: Rate,
    /// Joins and scrollback requests.
    pub joins: Rate,
    /// How often each client is pinged.
    pub ping_interval: Duration,
    /// A connection silent for this long is closed (4005); longer than `ping_interval`.
    pub idle_timeout: Duration,
}

/// A sustained rate and the burst allowed above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_sec: u32,
    pub burst: u32,
}

impl Settings {
    /// Every default, for the topic `topic_arn` and one writer at `writer_url`; no client
    /// authentication is configured (set [`Settings::auth`]).
    pub fn new(topic_arn: impl Into<String>, writer_url: HttpUrl) -> Settings {
        use defaults::*;
        let ms = Duration::from_millis;
        Settings {
            listen: LISTEN.parse().expect("the default listen address parses"),
            gateway_id: None,
            public_url: None,
            metrics_listen: None,
            web_fallbacks: Vec::new(),
            header_read_timeout: ms(HEADER_READ_TIMEOUT_MS),
            drain_timeout: ms(DRAIN_TIMEOUT_MS),
            writer: WriterSettings {
                urls: vec![writer_url],
                key_files: Vec::new(),
                timeout: ms(WRITER_TIMEOUT_MS),
            },
            bus: BusSettings {
                topic_arn: topic_arn.into(),
                transport: Transport::Http,
                verify: Some(VerifySettings::default()),
                max_sns_requests: MAX_SNS_REQUESTS,
                sns_body_timeout: ms(SNS_BODY_TIMEOUT_MS),
                subscription_check: ms(SUBSCRIPTION_CHECK_MS),
                subscribe_timeout: ms(SUBSCRIBE_TIMEOUT_MS),
                subscribe_attempts: SUBSCRIBE_ATTEMPTS,
            },
            rooms: RoomSettings {
                gap_timeout: ms(GAP_TIMEOUT_MS),
                tail_check: ms(TAIL_CHECK_MS),
                tail_check_max: ms(TAIL_CHECK_MAX_MS),
                replay_stall: ms(REPLAY_STALL_TIMEOUT_MS),
            },
            clients: ClientSettings {
                send_queue: SEND_QUEUE,
                send_queue_bytes: SEND_QUEUE_BYTES,
                max_rooms: MAX_ROOMS_PER_CONNECTION,
                max_connections: MAX_CONNECTIONS,
                sends: Rate {
                    per_sec: SENDS_PER_SEC,
                    burst: SEND_BURST,
                },
                joins: Rate {
                    per_sec: JOINS_PER_SEC,
                    burst: JOIN_BURST,
                },
                ping_interval: ms(PING_INTERVAL_MS),
                idle_timeout: ms(IDLE_TIMEOUT_MS),
            },
            auth: AuthSettings {
                leeway: Duration::from_secs(JWT_LEEWAY_SECS),
                ..AuthSettings::default()
            },
        }
    }

    /// Where SNS should post, for a gateway bound to `bound`.
    pub fn sns_endpoint(&self, bound: SocketAddr) -> String {
        let base = self
            .public_url
            .as_ref()
            .map_or_else(|| format!("http://{bound}"), ToString::to_string);
        format!("{}/sns", base.trim_end_matches('/'))
    }
}

/// An `http` or `https` URL (writers, the public URL, a certificate mirror).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl(url::Url);

/// Why a value is not an http(s) URL.
#[derive(Debug, thiserror::Error)]
pub enum HttpUrlError {
    #[error("not a URL")]
    Parse(#[from] url::ParseError),
    #[error("the scheme is {0}, not http or https")]
    Scheme(String),
}

impl HttpUrl {
    /// The URL as text, as the `url` crate normalizes it (a bare host gets a `/` path).
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The URL, without the trailing `/`s, to append paths to.
    pub fn base(&self) -> &str {
        self.as_str().trim_end_matches('/')
    }
}

impl FromStr for HttpUrl {
    type Err = HttpUrlError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let url = url::Url::parse(text)?;
        match url.scheme() {
            "http" | "https" => Ok(HttpUrl(url)),
            other => Err(HttpUrlError::Scheme(other.to_owned())),
        }
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
