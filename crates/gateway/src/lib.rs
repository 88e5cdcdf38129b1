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
//! subscriptions and the janitor, through re-exports), [`cli`], [`settings`] and [`writer_client`];
//! with the `test-support` feature, `test_support` (fakes for tests and benchmarks).

pub mod auth;
pub mod bus;
pub mod cli;
mod http;
mod hub;
mod metrics;
pub mod service;
mod session;
pub mod settings;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;
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
pub use crate::cli::{Cli, SettingsError};
use crate::http::AppState;
use crate::hub::{Hub, HubSettings};
use crate::metrics::GatewayMetrics;
use crate::session::ConnectionSettings;
pub use crate::settings::Settings;
use crate::settings::Transport;
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

/// Why the gateway could not start, or stopped abnormally. Each error's causes are its
/// [`source`](std::error::Error::source)s (`main` prints them all).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
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
    #[error("--bus sqs needs an SQS client")]
    NoSqsClient,
    #[error("binding {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The bus endpoint could not be set up, or no subscription made and confirmed.
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("the listening socket failed")]
    Listener(#[from] std::io::Error),
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
    settings: Settings,
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
    /// Binds `settings.listen` and builds the gateway: the authenticator (reading its key
    /// files), the SNS verifier, the hub, the HTTP state. Warns loudly about every insecure
    /// setting.
    ///
    /// # Errors
    /// [`GatewayError`] for unreadable client keys or an address that cannot be bound.
    pub async fn build(settings: Settings, deps: Deps) -> Result<App, GatewayError> {
        let auth = Arc::new(Authenticator::new(&settings.auth)?);
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| GatewayError::Bind {
                    addr: settings.listen,
                    source,
                })?;
        let bound = listener.local_addr()?;
        let gateway_id = settings
            .gateway_id
            .clone()
            .unwrap_or_else(|| bound.to_string());
        warn_insecure(&settings, &gateway_id);

        let metrics = Arc::new(GatewayMetrics::default());
        let verifier = match &settings.bus.verify {
            None => None,
            Some(verify) => Some(
                Verifier::with_cache(
                    settings.bus.topic_arn.clone(),
                    verify.max_age,
                    deps.certs.clone(),
                    CertCacheSettings::default(),
                    Arc::clone(&metrics.certs),
                )
                .map_err(GatewayError::Verifier)?,
            ),
        };
        let clients = &settings.clients;
        let hub = Hub::new(
            Arc::clone(&deps.log),
            HubSettings {
                gap_timeout: settings.rooms.gap_timeout,
                tail_check: settings.rooms.tail_check,
                tail_check_max: settings.rooms.tail_check_max,
                replay_stall: settings.rooms.replay_stall,
                replay_page: hub::replay_page(clients.send_queue, clients.send_queue_bytes),
                max_join_buffer_bytes: clients.send_queue_bytes,
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
            settings.bus.topic_arn.clone(),
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
                    queue_len: clients.send_queue,
                    queue_bytes: clients.send_queue_bytes,
                    max_rooms: clients.max_rooms,
                    sends: clients.sends,
                    joins: clients.joins,
                    ping_interval: clients.ping_interval,
                    idle_timeout: clients.idle_timeout,
                },
                drain: drain.clients.clone(),
            },
            inbox: Arc::clone(&inbox),
            metrics: Arc::clone(&metrics),
            readiness: readiness.clone(),
            page: http::page::chat_page(&gateway_id, &settings.web_fallbacks).into(),
            connections: connections.clone(),
            auth,
            slots: Arc::new(tokio::sync::Semaphore::new(clients.max_connections)),
            sns_slots: Arc::new(tokio::sync::Semaphore::new(settings.bus.max_sns_requests)),
            sns_body_timeout: settings.bus.sns_body_timeout,
        };
        Ok(App {
            listener,
            gateway_id,
            settings,
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
            settings,
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
        let grace = settings.drain_timeout;

        // Serve first: SNS may post a SubscriptionConfirmation while we subscribe.
        let server = tokio::spawn(chorus_service::http::serve(
            listener,
            http::router(state),
            HttpSettings {
                header_read_timeout: settings.header_read_timeout,
            },
            drain.server.clone().cancelled_owned(),
        ));
        tracing::info!(gateway = %gateway_id, addr = %bound, "gateway listening");

        let stop_server = async |server: JoinHandle<std::io::Result<()>>| {
            drain.server.cancel();
            let _ = server.await;
        };
        let mut link = match BusLink::open(
            &settings,
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
                        tracing::error!(gateway = %gateway_id, error.message = %Chain(&e), "no confirmed subscription: stopping");
                        Err(e.into())
                    }
                    _ => {
                        tracing::info!(gateway = %gateway_id, "shut down before the subscription was confirmed");
                        Ok(())
                    }
                };
            }
        };
        link.start_receiving(&inbox, &drain);
        readiness.ready();
        phase.send_replace(Phase::Ready);
        tracing::info!(gateway = %gateway_id, endpoint = %link.subscription.endpoint(), %subscription, "gateway ready: subscribed to the topic");

        tokio::select! {
            () = link.subscription.watch(settings.bus.subscription_check, &hub) => {}
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
fn warn_insecure(settings: &Settings, gateway_id: &str) {
    match &settings.bus.verify {
        None => tracing::warn!(
            gateway = %gateway_id,
            "SNS SIGNATURE VERIFICATION IS OFF: anyone who can POST to /sns can broadcast into \
             any room. Use this only with a local emulator."
        ),
        Some(verify) => {
            if let Some(mirror) = &verify.cert_mirror {
                tracing::warn!(
                    gateway = %gateway_id, %mirror,
                    "SNS SIGNING CERTIFICATES COME FROM A MIRROR, whatever host the messages \
                     name: trust in the mirror replaces the check that certificates come from an \
                     SNS host. Use this only with a local emulator, never on AWS."
                );
            }
        }
    }
    if settings.auth.dev_users {
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
    /// With `--bus sqs`: the queue and its long-poll wait.
    queue: Option<(GatewayQueue, Duration)>,
    receiver: Option<JoinHandle<()>>,
}

impl BusLink {
    /// The endpoint SNS delivers to: this gateway's `/sns`, or a queue created for it.
    async fn open(
        settings: &Settings,
        gateway_id: &str,
        bound: SocketAddr,
        sqs: Option<aws_sdk_sqs::Client>,
        subscriptions: Arc<dyn TopicSubscriptions>,
        readiness: &Readiness,
    ) -> Result<BusLink, GatewayError> {
        let (endpoint, queue) = match &settings.bus.transport {
            Transport::Http => (Endpoint::Http(settings.sns_endpoint(bound)), None),
            Transport::Sqs { queue_name, wait } => {
                let sqs = sqs.ok_or(GatewayError::NoSqsClient)?;
                let name = queue_name
                    .clone()
                    .unwrap_or_else(|| sqs::queue_name(gateway_id));
                let queue = GatewayQueue::create(sqs, &name, &settings.bus.topic_arn).await?;
                let endpoint = Endpoint::Queue {
                    arn: queue.arn.clone(),
                };
                (endpoint, Some((queue, *wait)))
            }
        };
        let policy = ConfirmPolicy {
            timeout: settings.bus.subscribe_timeout,
            attempts: settings.bus.subscribe_attempts,
        };
        Ok(BusLink {
            subscription: Subscription::new(subscriptions, endpoint, policy, readiness.clone()),
            queue,
            receiver: None,
        })
    }

    /// With a queue, starts taking its messages in; they stop when the drain's bus stage does.
    fn start_receiving(&mut self, inbox: &Arc<Inbox>, drain: &Drain) {
        let Some((queue, wait)) = self.queue.clone() else {
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
        if let Some((queue, _)) = &self.queue {
            queue.delete().await;
        }
    }
}

/// An error with its causes, `error: cause: cause`, for logs (an SDK error's own text is only
/// "service error": what went wrong is in its causes).
pub(crate) struct Chain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(error) = cause {
            write!(f, ": {error}")?;
            cause = error.source();
        }
        Ok(())
    }
}
