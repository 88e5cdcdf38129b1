//! The gateway: WebSocket clients on one side, the SNS bus on the other.
//!
//! - `GET /ws` — WebSocket (subprotocol `chorus.v1`), see the README's protocol section.
//! - `POST /sns` — SNS HTTP deliveries of the topic.
//! - `GET /healthz` — 200 while the process serves; `GET /readyz` — 200 only while subscribed and
//!   not draining (load balancers route on this); `GET /metrics` — Prometheus text.
//!
//! Lifecycle ([`run`]): serve, subscribe to the topic and wait for confirmation, become ready;
//! on shutdown, drain: readiness fails and new sockets are refused, the subscription is removed,
//! every client is closed with [`close::SERVER_RESTARTING`](chorus_protocol::close), and the
//! process exits within the drain timeout.
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
mod session;
pub mod writer_client;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use chorus_service::http::HttpSettings;

use crate::auth::{AuthConfigError, Authenticator};
use crate::bus::certs::CertCacheSettings;
use crate::bus::inbox::Inbox;
use crate::bus::sqs::{self, GatewayQueue};
use crate::bus::subscription::{
    ConfirmPolicy, Endpoint, SubscriptionState, SubscriptionStatus, TopicSubscriptions,
    subscribe_and_confirm,
};
use crate::bus::{BusError, CertSource, Verifier};
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

/// Why the gateway stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("building the SNS verifier: {0}")]
    Verifier(#[from] reqwest::Error),
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
    #[error("subscribing to the topic failed: {0}")]
    Subscribe(#[from] BusError),
    #[error("serving failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the gateway on `listener` until `shutdown` resolves, then drains.
///
/// # Errors
/// [`GatewayError`] for bad configuration, a subscription that cannot be made or confirmed, or a
/// failing listener.
pub async fn run(
    listener: TcpListener,
    config: Config,
    deps: Deps,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    config.validate()?;
    let auth = Arc::new(Authenticator::new(&config.auth())?);
    let bound = listener.local_addr()?;
    let gateway_id = config
        .gateway_id
        .clone()
        .unwrap_or_else(|| bound.to_string());
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

    let metrics = Arc::new(GatewayMetrics::default());
    let verifier = if config.insecure_skip_sns_verification {
        None
    } else {
        Some(Verifier::with_cache(
            config.topic_arn.clone(),
            Duration::from_secs(config.sns_max_age_secs),
            deps.certs.clone(),
            CertCacheSettings::default(),
            Arc::clone(&metrics.certs),
        )?)
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
    let drain = CancellationToken::new();
    let connections = TaskTracker::new();
    let ready = Arc::new(AtomicBool::new(false));
    let status = SubscriptionStatus::default();
    status.waiting_for("starting the bus endpoint");
    let inbox = Arc::new(Inbox::new(
        hub.clone(),
        Arc::clone(&metrics),
        config.topic_arn.clone(),
        verifier,
        Arc::clone(&deps.subscriptions),
        status.clone(),
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
            drain: drain.clone(),
        },
        inbox: Arc::clone(&inbox),
        metrics: Arc::clone(&metrics),
        ready: Arc::clone(&ready),
        status: status.clone(),
        page: http::page::chat_page(&gateway_id, &config.web_fallback).into(),
        connections: connections.clone(),
        auth,
        slots: Arc::new(tokio::sync::Semaphore::new(config.max_connections)),
        sns_slots: Arc::new(tokio::sync::Semaphore::new(config.max_sns_requests)),
        sns_body_timeout: Duration::from_millis(config.sns_body_timeout_ms),
    };
    let config = Arc::new(config);

    if let Some(addr) = config.metrics_listen {
        let metrics_listener = TcpListener::bind(addr).await?;
        let (metrics, hub) = (Arc::clone(&metrics), hub.clone());
        tokio::spawn(chorus_service::metrics::serve(
            metrics_listener,
            Arc::new(move || metrics.render(hub.room_count())),
            drain.clone().cancelled_owned(),
        ));
    }

    // Serve first: SNS may post a SubscriptionConfirmation while we subscribe.
    let stop_server = CancellationToken::new();
    let server = tokio::spawn(chorus_service::http::serve(
        listener,
        http::router(state),
        HttpSettings {
            header_read_timeout: Duration::from_millis(config.header_read_timeout_ms),
        },
        stop_server.clone().cancelled_owned(),
    ));
    tracing::info!(gateway = %gateway_id, addr = %bound, "gateway listening");

    let (endpoint, queue) = match config.bus {
        BusKind::Http => (Endpoint::Http(config.sns_endpoint(bound)), None),
        BusKind::Sqs => {
            let Some(sqs) = deps.sqs.clone() else {
                return Err(ConfigError::Invalid("--bus sqs needs an SQS client".into()).into());
            };
            let name = config
                .sqs_queue_name
                .clone()
                .unwrap_or_else(|| sqs::queue_name(&gateway_id));
            let queue = match GatewayQueue::create(sqs, &name, &config.topic_arn).await {
                Ok(queue) => queue,
                Err(e) => {
                    stop_server.cancel();
                    let _ = server.await;
                    return Err(e.into());
                }
            };
            (
                Endpoint::Queue {
                    arn: queue.arn.clone(),
                },
                Some(queue),
            )
        }
    };
    let policy = ConfirmPolicy {
        timeout: Duration::from_millis(config.subscribe_timeout_ms),
        attempts: config.subscribe_attempts,
    };
    let mut shutdown = std::pin::pin!(shutdown);
    // `None`: shut down before the subscription was confirmed.
    let outcome = tokio::select! {
        result = subscribe_and_confirm(deps.subscriptions.as_ref(), &endpoint, policy, &status) => Some(result),
        () = &mut shutdown => None,
    };
    let subscription = match outcome {
        Some(Ok(arn)) => arn,
        failed_or_stopped => {
            // Leave nothing behind: the subscription still pending (or made just before the
            // shutdown), the queue, the server.
            if let Some(arn) = status.arn()
                && let Err(e) = deps.subscriptions.unsubscribe(&arn).await
            {
                tracing::warn!(subscription = %arn, error.message = %e, "removing the unconfirmed subscription failed");
            }
            if let Some(queue) = &queue {
                queue.delete().await;
            }
            stop_server.cancel();
            let _ = server.await;
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
    let stop_receiving = CancellationToken::new();
    let receiver = queue.clone().map(|queue| {
        let (inbox, stop) = (Arc::clone(&inbox), stop_receiving.clone());
        let wait = Duration::from_secs(config.sqs_wait_secs);
        tokio::spawn(async move { queue.receive(&inbox, wait, stop).await })
    });
    ready.store(true, Ordering::Release);
    chorus_service::systemd::ready();
    tracing::info!(gateway = %gateway_id, %endpoint, %subscription, "gateway ready: subscribed to the topic");

    let stop_watch = CancellationToken::new();
    let watch = tokio::spawn(watch_subscription(
        Arc::clone(&deps.subscriptions),
        endpoint.clone(),
        status.clone(),
        Duration::from_millis(config.subscription_check_ms),
        policy,
        Arc::clone(&ready),
        hub.clone(),
        stop_watch.clone(),
    ));

    shutdown.await;
    stop_watch.cancel();
    let _ = watch.await;

    // Drain.
    let started = tokio::time::Instant::now();
    let grace = config.drain_timeout();
    ready.store(false, Ordering::Release);
    status.waiting_for("draining: unsubscribing and closing clients");
    chorus_service::systemd::stopping();
    tracing::info!(gateway = %gateway_id, "draining: unsubscribing and closing clients");
    chorus_service::with_grace("unsubscribing", grace, async {
        let Some(subscription) = status.arn() else {
            return;
        };
        if let Err(e) = deps.subscriptions.unsubscribe(&subscription).await {
            tracing::warn!(error.message = %e, "unsubscribing failed: SNS will drop the endpoint after failed deliveries");
        }
    })
    .await;
    stop_receiving.cancel();
    if let Some(receiver) = receiver {
        let _ = receiver.await;
    }
    if let Some(queue) = &queue {
        queue.delete().await;
    }
    drain.cancel();
    connections.close();
    chorus_service::with_grace(
        "closing clients",
        grace.saturating_sub(started.elapsed()),
        connections.wait(),
    )
    .await;
    stop_server.cancel();
    chorus_service::with_grace(
        "stopping the server",
        grace.saturating_sub(started.elapsed()),
        async {
            let _ = server.await;
        },
    )
    .await;
    tracing::info!(gateway = %gateway_id, elapsed_ms = started.elapsed().as_millis() as u64, "gateway stopped");
    Ok(())
}

/// Checks every `interval` that the subscription still exists; if it is gone (someone removed
/// it, or SNS gave up on the endpoint), subscribes again, and since the bus may have lost
/// messages meanwhile, has every room check its tail. Not ready while re-subscribing; a
/// re-subscription that fails is tried again at the next check.
#[allow(clippy::too_many_arguments)]
async fn watch_subscription(
    subscriptions: Arc<dyn TopicSubscriptions>,
    endpoint: Endpoint,
    status: SubscriptionStatus,
    interval: Duration,
    policy: ConfirmPolicy,
    ready: Arc<AtomicBool>,
    hub: Hub,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        match status.arn() {
            // The last re-subscription failed: try again.
            None => {}
            Some(arn) => match subscriptions.state(&arn).await {
                Ok(SubscriptionState::Gone) => {
                    tracing::warn!(subscription = %arn, "the subscription is gone: subscribing again");
                    status.set_arn(None);
                }
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(error.message = %e, "checking the subscription failed");
                    continue;
                }
            },
        }
        ready.store(false, Ordering::Release);
        let renewed = tokio::select! {
            () = stop.cancelled() => return,
            renewed = subscribe_and_confirm(subscriptions.as_ref(), &endpoint, policy, &status) => renewed,
        };
        match renewed {
            Ok(new_arn) => {
                tracing::info!(subscription = %new_arn, "subscribed again");
                ready.store(true, Ordering::Release);
                hub.repair_all();
            }
            Err(e) => {
                tracing::error!(error.message = %e, "subscribing again failed: trying again at the next check")
            }
        }
    }
}
