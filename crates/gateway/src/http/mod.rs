//! The gateway's HTTP side: one router for the WebSocket upgrade ([`ws`]), SNS deliveries
//! ([`sns`]), the chat page ([`page`]) and health, readiness and metrics ([`health`]).

mod health;
pub(crate) mod page;
mod sns;
mod ws;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::bus::inbox::Inbox;
use crate::bus::subscription::Readiness;
use crate::metrics::GatewayMetrics;
use crate::session;

/// Shared state of the HTTP handlers: one `Clone` struct of `Arc`s.
#[derive(Clone)]
pub(crate) struct AppState {
    /// What every WebSocket connection is served with.
    pub(crate) session: session::Context,
    pub(crate) inbox: Arc<Inbox>,
    pub(crate) metrics: Arc<GatewayMetrics>,
    /// Whether the gateway is ready, and why not, for `/readyz` and the upgrade.
    pub(crate) readiness: Readiness,
    /// The chat page, rendered once.
    pub(crate) page: Arc<str>,
    pub(crate) connections: TaskTracker,
    pub(crate) auth: Arc<Authenticator>,
    /// One permit per WebSocket connection (`--max-connections`).
    pub(crate) slots: Arc<Semaphore>,
    /// One permit per `/sns` request being read or verified (`--max-sns-requests`).
    pub(crate) sns_slots: Arc<Semaphore>,
    /// Time an `/sns` request has to send its body.
    pub(crate) sns_body_timeout: Duration,
}

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(page::page))
        .route("/chorus.js", get(page::client_library))
        .route("/ws", get(ws::websocket))
        .route(
            "/sns",
            post(sns::sns).layer(DefaultBodyLimit::max(sns::MAX_SNS_POST_BYTES)),
        )
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .with_state(state)
}

fn plain(status: StatusCode, message: impl Into<String>) -> Response {
    (status, message.into()).into_response()
}
