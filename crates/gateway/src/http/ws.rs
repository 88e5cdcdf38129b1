//! `GET /ws`: the WebSocket upgrade. Refused while the gateway is not ready (starting or
//! draining) and for bad credentials; one connection past `--max-connections` is told so with
//! [`close::GATEWAY_FULL`] over the socket, where browsers can read it.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use chorus_protocol::close;
use chorus_protocol::frames::{MAX_CLIENT_FRAME_BYTES, SUBPROTOCOL};

use super::{AppState, plain};
use crate::auth::Offered;
use crate::session;

/// Per-connection read buffer: chat frames are small (tungstenite's default is 128 KiB, and
/// this one is allocated and resident for every idle connection); a larger frame grows it.
const READ_BUFFER_BYTES: usize = 2 * 1024;
/// Per-connection write buffer before a flush.
const WRITE_BUFFER_BYTES: usize = 8 * 1024;

pub(super) async fn websocket(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if !state.readiness.is_ready() {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "gateway not ready (starting or draining): connect to another gateway",
        );
    }
    let offered = Offered {
        protocols: headers
            .get(header::SEC_WEBSOCKET_PROTOCOL)
            .and_then(|v| v.to_str().ok()),
        query_token: params.get("token").map(String::as_str),
        query_user: params.get("user").map(String::as_str),
    };
    let identity = match state.auth.authenticate(offered) {
        Ok(identity) => identity,
        Err(e) => {
            state.metrics.refused(e.reason());
            // The reason only: never the token or the query string.
            tracing::debug!(reason = e.reason().as_str(), "WebSocket request refused");
            return plain(StatusCode::UNAUTHORIZED, e.to_string());
        }
    };
    let upgrade = upgrade
        .protocols([SUBPROTOCOL])
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_message_size(MAX_CLIENT_FRAME_BYTES)
        .max_frame_size(MAX_CLIENT_FRAME_BYTES);
    let Ok(slot) = Arc::clone(&state.slots).try_acquire_owned() else {
        // Told over the socket, so that browsers (which cannot read an HTTP refusal) see why.
        state.metrics.refused_full.inc();
        return upgrade.on_upgrade(|mut socket| async move {
            let reason = "gateway full: reconnect to another gateway and resume";
            let _ = socket
                .send(Message::Close(Some(CloseFrame {
                    code: close::GATEWAY_FULL,
                    reason: reason.into(),
                })))
                .await;
        });
    };
    let ctx = state.session.clone();
    let tracker = state.connections.clone();
    upgrade.on_upgrade(move |socket| {
        tracker.track_future(async move {
            session::serve(socket, identity, ctx).await;
            drop(slot);
        })
    })
}
