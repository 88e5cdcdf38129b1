//! The gateway: WebSocket clients on one side, the SNS bus on the other.
//!
//! - `GET /ws` — WebSocket (subprotocol `chorus.v1`), see the README's protocol section.
//! - `POST /sns` — SNS HTTP deliveries of the topic.
//! - `GET /healthz` — 200 while the process serves; `GET /readyz` — 200 only while subscribed and
//!   not draining (load balancers route on this); `GET /metrics` — Prometheus text.
//!
//! Lifecycle ([`App`]): [`App::build`] binds the listener and builds everything from the settings
//! and the external effects ([`Deps`]); [`App::run_until`] serves, subscribes to the topic and
//! waits for confirmation, becomes ready; on shutdown, drains: readiness fails and new sockets
//! are refused, the subscription is removed, every client is closed with
//! [`close::SERVER_RESTARTING`](chorus_protocol::close), and it returns within the drain
//! timeout. What only a system service needs (a second metrics listener, systemd) is in
//! [`service`].
//!
//! Folders say what they hold:
//! - `http`: the router: WebSocket upgrade, `/sns`, the chat page, health;
//! - `session`: one WebSocket connection: its select loop, the frame handlers, and the one
//!   mapping from a refused request to an error frame;
//! - `hub`: rooms and their members, joins and replays, fan-out, repair; it never sees a socket;
//! - [`bus`]: the SNS subscription, verification, the SQS transport, the janitor, and the one way
//!   bus messages come in;
//! - [`writer_client`]: the writer's API as the gateway sees it.
//!
//! Public, for the integration tests, the benchmark and the fuzz targets outside the crate:
//! [`auth`] (the token rules are tested from outside), [`bus`] (envelope, verification,
//! subscriptions and the janitor, through re-exports), [`config`] and [`writer_client`].

pub mod auth;
pub mod bus;
pub mod config;
mod http;
mod hub;
mod metrics;
pub mod service;
mod session;
pub mod writer_client;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chorus_service::http::HttpSettings;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthConfigError, Authenticator};
use crate::bus::certs::CertCacheSettings;
use crate::bus::inbox::Inbox;
use crate::bus::sqs::{self, GatewayQueue};
use crate::bus::subscription::{ConfirmPolicy, Endpoint, Readiness, Subscription};
use crate::bus::{BusError, CertSource, TopicSubscriptions, Verifier};
use crate::config::BusKind;
pub use crate::config::{Config, ConfigError};
use crate::http::AppState;
use crate::hub::{Hub, HubSettings};
use crate::metrics::GatewayMetrics;
use crate::session::ConnectionSettings;
use crate::session::rate::Rate;
use crate::writer_client::MessageLog;

/// The gateway's external effects, built once at start-up.
pub struct Deps {
    pub log: Arc<dyn MessageLog>,
    pub subscriptions: Arc<dyn TopicSubscriptions>,
    /// Where SNS signing certificates come from (unused with verification off).
    pub certs: CertSource,
    /// SQS, for `--bus sqs`.
    pub sqs: Option<aws_sdk_sqs::Client>,
}

/// Why the gateway could not start, or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "the gateway needs --writer-key-file (CHORUS_WRITER_KEY_FILE): the service key it signs \
         its calls to the writers with"
    )]
    WriterKeys(#[source] chorus_service::service_auth::KeyError),
    #[error("building the writer client")]
    WriterClient(#[source] reqwest::Error),
    #[error("building the SNS verifier")]
    Verifier(#[source] reqwest::Error),
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
    #[error("binding {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("subscribing to the topic failed: {0}")]
    Subscribe(#[from] BusError),
    #[error("serving failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Where a gateway is in its life, for whoever supervises it (systemd, see [`service`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Serving HTTP, subscribing to the topic: not ready.
    Starting,
    /// Subscribed: load balancers may route clients here.
    Ready,
    /// Shutting down: unsubscribing and closing clients.
    Draining,
}

/// The drain, one signal cancelled stage by stage. Each stage's token is a child of the next
/// stage's, so no stage outlives a later one, and cancelling the root (the server's token, at a
/// failed start) stops everything at once.
struct Drain {
    /// Stops taking messages from the bus (the SQS receiver), once the subscription is removed.
    bus: CancellationToken,
    /// Closes every client with [`close::SERVER_RESTARTING`](chorus_protocol::close).
    clients: CancellationToken,
    /// Stops the HTTP server: the last stage, and the root.
    server: CancellationToken,
}

impl Drain {
    fn new() -> Self {
        let server = CancellationToken::new();
        let clients = server.child_token();
        let bus = clients.child_token();
        Drain {
            bus,
            clients,
            server,
        }
    }
}

/// A gateway built and bound to its address, not yet serving.
pub struct App {
    listener: TcpListener,
    gateway_id: String,
    config: Config,
    state: AppState,
    hub: Hub,
    inbox: Arc<Inbox>,
    metrics: Arc<GatewayMetrics>,
    readiness: Readiness,
    subscriptions: Arc<dyn TopicSubscriptions>,
    sqs: Option<aws_sdk_sqs::Client>,
    drain: Drain,
    connections: TaskTracker,
    phase: watch::Sender<Phase>,
}

impl App {
    /// Binds `config.listen` and builds the gateway: the authenticator (reading its key
    /// files), the SNS verifier, the hub, the HTTP state. Warns loudly about every insecure
    /// setting.
    ///
    /// # Errors
    /// [`GatewayError`] for bad configuration, unreadable keys or an address that cannot be bound.
    pub async fn build(config: Config, deps: Deps) -> Result<App, GatewayError> {
        config.validate()?;
        let auth = Arc::new(Authenticator::new(&config.auth())?);
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| GatewayError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let bound = listener.local_addr()?;
        let gateway_id = config
            .gateway_id
            .clone()
            .unwrap_or_else(|| bound.to_string());
        warn_insecure(&config, &gateway_id);

        let metrics = Arc::new(GatewayMetrics::default());
        let verifier = if config.insecure_skip_sns_verification {
            None
        } else {
            Some(
                Verifier::with_cache(
                    config.topic_arn.clone(),
                    Duration::from_secs(config.sns_max_age_secs),
                    deps.certs.clone(),
                    CertCacheSettings::default(),
                    Arc::clone(&metrics.certs),
                )
                .map_err(GatewayError::Verifier)?,
            )
        };
        let hub = Hub::new(
            Arc::clone(&deps.log),
            HubSettings {
                gap_timeout: Duration::from_millis(config.gap_timeout_ms),
                tail_check: Duration::from_millis(config.tail_check_ms),
                tail_check_max: Duration::from_millis(config.tail_check_max_ms),
                replay_stall: Duration::from_millis(config.replay_stall_timeout_ms),
                replay_page: hub::replay_page(config.send_queue, config.send_queue_bytes),
                max_join_buffer_bytes: config.send_queue_bytes,
                ..HubSettings::default()
            },
            Arc::clone(&metrics),
        );
        let drain = Drain::new();
        let connections = TaskTracker::new();
        let readiness = Readiness::default();
        readiness.waiting_for("starting the bus endpoint");
        let inbox = Arc::new(Inbox::new(
            hub.clone(),
            Arc::clone(&metrics),
            config.topic_arn.clone(),
            verifier,
            Arc::clone(&deps.subscriptions),
            readiness.clone(),
        ));
        let state = AppState {
            session: session::Context {
                hub: hub.clone(),
                log: deps.log,
                metrics: Arc::clone(&metrics),
                settings: ConnectionSettings {
                    queue_len: config.send_queue,
                    queue_bytes: config.send_queue_bytes,
                    max_rooms: config.max_rooms_per_connection,
                    sends: Rate {
                        per_sec: config.sends_per_sec,
                        burst: config.send_burst,
                    },
                    joins: Rate {
                        per_sec: config.joins_per_sec,
                        burst: config.join_burst,
                    },
                    ping_interval: Duration::from_millis(config.ping_interval_ms),
                    idle_timeout: Duration::from_millis(config.idle_timeout_ms),
                },
                drain: drain.clients.clone(),
            },
            inbox: Arc::clone(&inbox),
            metrics: Arc::clone(&metrics),
            readiness: readiness.clone(),
            page: http::page::chat_page(&gateway_id, &config.web_fallback).into(),
            connections: connections.clone(),
            auth,
            slots: Arc::new(tokio::sync::Semaphore::new(config.max_connections)),
            sns_slots: Arc::new(tokio::sync::Semaphore::new(config.max_sns_requests)),
            sns_body_timeout: Duration::from_millis(config.sns_body_timeout_ms),
        };
        Ok(App {
            listener,
            gateway_id,
            config,
            state,
            hub,
            inbox,
            metrics,
            readiness,
            subscriptions: deps.subscriptions,
            sqs: deps.sqs,
            drain,
            connections,
            phase: watch::channel(Phase::Starting).0,
        })
    }

    /// The address the gateway listens on (read it back after binding port 0).
    ///
    /// # Errors
    /// When the socket cannot say.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The gateway's phases as they change.
    pub fn phases(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Renders `/metrics`, for serving it on another address too.
    pub fn metrics(&self) -> Arc<dyn Fn() -> String + Send + Sync> {
        let (metrics, hub) = (Arc::clone(&self.metrics), self.hub.clone());
        Arc::new(move || metrics.render(hub.room_count()))
    }

    /// Serves until `shutdown` resolves, then drains (see the crate docs). Returns once drained,
    /// within the drain timeout.
    ///
    /// # Errors
    /// [`GatewayError`] when the bus endpoint cannot be set up or no subscription can be made
    /// and confirmed; everything made until then is removed again.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), GatewayError> {
        let App {
            listener,
            gateway_id,
            config,
            state,
            hub,
            inbox,
            metrics: _,
            readiness,
            subscriptions,
            sqs,
            drain,
            connections,
            phase,
        } = self;
        let bound = listener.local_addr()?;
        let grace = config.drain_timeout();

        // Serve first: SNS may post a SubscriptionConfirmation while we subscribe.
        let server = tokio::spawn(chorus_service::http::serve(
            listener,
            http::router(state),
            HttpSettings {
                header_read_timeout: Duration::from_millis(config.header_read_timeout_ms),
            },
            drain.server.clone().cancelled_owned(),
        ));
        tracing::info!(gateway = %gateway_id, addr = %bound, "gateway listening");

        let stop_server = async |server: JoinHandle<std::io::Result<()>>| {
            drain.server.cancel();
            let _ = server.await;
        };
        let mut link = match BusLink::open(
            &config,
            &gateway_id,
            bound,
            sqs,
            subscriptions,
            &readiness,
        )
        .await
        {
            Ok(link) => link,
            Err(e) => {
                stop_server(server).await;
                return Err(e);
            }
        };
        let mut shutdown = std::pin::pin!(shutdown);
        // `None`: shut down before the subscription was confirmed.
        let confirmed = tokio::select! {
            result = link.subscription.confirm() => Some(result),
            () = &mut shutdown => None,
        };
        let subscription = match confirmed {
            Some(Ok(arn)) => arn,
            failed_or_stopped => {
                // Leave nothing behind: the subscription still pending (or made just before the
                // shutdown), the queue, the server.
                link.leave(&drain, grace).await;
                stop_server(server).await;
                return match failed_or_stopped {
                    Some(Err(e)) => {
                        tracing::error!(gateway = %gateway_id, error.message = %e, "no confirmed subscription: stopping");
                        Err(e.into())
                    }
                    _ => {
                        tracing::info!(gateway = %gateway_id, "shut down before the subscription was confirmed");
                        Ok(())
                    }
                };
            }
        };
        link.start_receiving(&inbox, &drain, Duration::from_secs(config.sqs_wait_secs));
        readiness.ready();
        phase.send_replace(Phase::Ready);
        tracing::info!(gateway = %gateway_id, endpoint = %link.subscription.endpoint(), %subscription, "gateway ready: subscribed to the topic");

        let check = Duration::from_millis(config.subscription_check_ms);
        tokio::select! {
            () = link.subscription.watch(check, &hub) => {}
            () = &mut shutdown => {}
        }

        // Drain, in order: not ready, off the bus, clients closed, server stopped.
        let started = tokio::time::Instant::now();
        readiness.waiting_for("draining: unsubscribing and closing clients");
        phase.send_replace(Phase::Draining);
        tracing::info!(gateway = %gateway_id, "draining: unsubscribing and closing clients");
        link.leave(&drain, grace).await;
        drain.clients.cancel();
        connections.close();
        chorus_service::with_grace(
            "closing clients",
            grace.saturating_sub(started.elapsed()),
            connections.wait(),
        )
        .await;
        chorus_service::with_grace(
            "stopping the server",
            grace.saturating_sub(started.elapsed()),
            stop_server(server),
        )
        .await;
        tracing::info!(gateway = %gateway_id, elapsed_ms = started.elapsed().as_millis() as u64, "gateway stopped");
        Ok(())
    }
}

/// Says loudly, at every start, which insecure settings are on.
fn warn_insecure(config: &Config, gateway_id: &str) {
    if config.insecure_skip_sns_verification {
        tracing::warn!(
            gateway = %gateway_id,
            "SNS SIGNATURE VERIFICATION IS OFF: anyone who can POST to /sns can broadcast into \
             any room. Use this only with a local emulator."
        );
    }
    if let (false, Some(mirror)) = (
        config.insecure_skip_sns_verification,
        &config.sns_cert_mirror,
    ) {
        tracing::warn!(
            gateway = %gateway_id, %mirror,
            "SNS SIGNING CERTIFICATES COME FROM A MIRROR, whatever host the messages name: \
             trust in the mirror replaces the check that certificates come from an SNS host. \
             Use this only with a local emulator, never on AWS."
        );
    }
    if config.insecure_dev_users {
        tracing::warn!(
            gateway = %gateway_id,
            "DEV USERS ARE ON: clients name themselves with ?user=NAME, unauthenticated."
        );
    }
}

/// What the gateway holds on the bus while it runs: its subscription, and with `--bus sqs` its
/// queue and the task receiving from it. [`BusLink::leave`] removes all of it, at a failed start
/// as at the drain.
struct BusLink {
    subscription: Subscription,
    queue: Option<GatewayQueue>,
    receiver: Option<JoinHandle<()>>,
}

impl BusLink {
    /// The endpoint SNS delivers to: this gateway's `/sns`, or a queue created for it.
    async fn open(
        config: &Config,
        gateway_id: &str,
        bound: SocketAddr,
        sqs: Option<aws_sdk_sqs::Client>,
        subscriptions: Arc<dyn TopicSubscriptions>,
        readiness: &Readiness,
    ) -> Result<BusLink, GatewayError> {
        let (endpoint, queue) = match config.bus {
            BusKind::Http => (Endpoint::Http(config.sns_endpoint(bound)), None),
            BusKind::Sqs => {
                let Some(sqs) = sqs else {
                    return Err(ConfigError::Invalid("--bus sqs needs an SQS client".into()).into());
                };
                let name = config
                    .sqs_queue_name
                    .clone()
                    .unwrap_or_else(|| sqs::queue_name(gateway_id));
                let queue = GatewayQueue::create(sqs, &name, &config.topic_arn).await?;
                let endpoint = Endpoint::Queue {
                    arn: queue.arn.clone(),
                };
                (endpoint, Some(queue))
            }
        };
        let policy = ConfirmPolicy {
            timeout: Duration::from_millis(config.subscribe_timeout_ms),
            attempts: config.subscribe_attempts,
        };
        Ok(BusLink {
            subscription: Subscription::new(subscriptions, endpoint, policy, readiness.clone()),
            queue,
            receiver: None,
        })
    }

    /// With a queue, starts taking its messages in; they stop when the drain's bus stage does.
    fn start_receiving(&mut self, inbox: &Arc<Inbox>, drain: &Drain, wait: Duration) {
        let Some(queue) = self.queue.clone() else {
            return;
        };
        let (inbox, stop) = (Arc::clone(inbox), drain.bus.clone());
        self.receiver = Some(tokio::spawn(async move {
            queue.receive(&inbox, wait, stop).await;
        }));
    }

    /// Leaves the bus: removes the subscription first (within `grace`), so SNS stops delivering
    /// while what was already delivered is still taken in; then stops receiving and deletes the
    /// queue.
    async fn leave(mut self, drain: &Drain, grace: Duration) {
        chorus_service::with_grace("unsubscribing", grace, self.subscription.remove()).await;
        drain.bus.cancel();
        if let Some(receiver) = self.receiver.take() {
            let _ = receiver.await;
        }
        if let Some(queue) = &self.queue {
            queue.delete().await;
        }
    }
}
