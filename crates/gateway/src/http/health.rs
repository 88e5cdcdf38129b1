//! `/healthz` (the process serves), `/readyz` (subscribed and not draining: load balancers route
//! on it) and `/metrics` (Prometheus text).

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{AppState, plain};

pub(super) async fn healthz() -> &'static str {
    "ok"
}

pub(super) async fn readyz(State(state): State<AppState>) -> Response {
    if state.readiness.is_ready() {
        plain(StatusCode::OK, "ready")
    } else {
        plain(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}", state.readiness.describe()),
        )
    }
}

pub(super) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, chorus_service::metrics::CONTENT_TYPE)],
        state.metrics.render(state.session.hub.room_count()),
    )
}
