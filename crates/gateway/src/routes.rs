//! HTTP routes of the gateway.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chorus_protocol::frames::{MAX_CLIENT_FRAME_BYTES, SUBPROTOCOL};
use chorus_protocol::{BusPayload, close};

use crate::AppState;
use crate::auth::Offered;
use crate::bus::SnsEnvelope;
use crate::connection;
use crate::verify::VerifyError;

/// Largest SNS post accepted: a 256 KiB message, JSON-escaped, in its envelope.
const MAX_SNS_POST_BYTES: usize = 1024 * 1024;
/// Per-connection read buffer: chat frames are small (tungstenite's default is 128 KiB, and
/// this one is allocated and resident for every idle connection); a larger frame grows it.
const READ_BUFFER_BYTES: usize = 2 * 1024;
/// Per-connection write buffer before a flush.
const WRITE_BUFFER_BYTES: usize = 8 * 1024;

/// The chat page's template (its script imports [`CLIENT_LIBRARY`] from `/chorus.js`).
const PAGE: &str = include_str!("../static/index.html");
/// Where the gateway's id and fallback URLs go in [`PAGE`].
const SLOT: &str = r#"/*CHORUS_CONFIG*/{"gateway":"?","fallbacks":[]}/*END*/"#;
/// The TypeScript client library (clients/typescript) compiled to one ES module; committed so
/// that cargo needs no Node.js, and checked against its source by `scripts/client-test`.
const CLIENT_LIBRARY: &str = include_str!("../static/chorus.js");

/// The chat page, with this gateway's id and fallback URLs filled in.
pub(crate) fn chat_page(gateway_id: &str, fallbacks: &[String]) -> String {
    // JSON inside a <script>: escape '<' so no value can close the element.
    let config = serde_json::json!({"gateway": gateway_id, "fallbacks": fallbacks})
        .to_string()
        .replace('<', "\\u003c");
    PAGE.replacen(SLOT, &config, 1)
}

async fn page(State(state): State<AppState>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'",
            ),
        ],
        state.page.to_string(),
    )
        .into_response()
}

async fn client_library() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        CLIENT_LIBRARY,
    )
        .into_response()
}

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/chorus.js", get(client_library))
        .route("/ws", get(websocket))
        .route(
            "/sns",
            post(sns).layer(DefaultBodyLimit::max(MAX_SNS_POST_BYTES)),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

fn plain(status: StatusCode, message: impl Into<String>) -> Response {
    (status, message.into()).into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        plain(StatusCode::OK, "ready")
    } else {
        plain(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}", state.subscription.describe()),
        )
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, chorus_service::metrics::CONTENT_TYPE)],
        state.metrics.render(state.connection.hub.room_count()),
    )
}

async fn websocket(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if !state.ready.load(Ordering::Acquire) {
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
    let ctx = state.connection.clone();
    let tracker = state.connections.clone();
    upgrade.on_upgrade(move |socket| {
        tracker.track_future(async move {
            connection::serve(socket, identity, ctx).await;
            drop(slot);
        })
    })
}

/// `/sns`: bounded in how many requests are read and verified at once, and in how long a body
/// may take, so slow or forged posts cannot starve genuine notifications.
async fn sns(State(state): State<AppState>, body: axum::body::Body) -> Response {
    let reject = |status: StatusCode, why: &str| {
        state.metrics.bus_rejected.inc();
        tracing::warn!(reason = why, "SNS post rejected");
        plain(status, why.to_owned())
    };
    let Ok(_slot) = state.sns_slots.try_acquire() else {
        state.metrics.rejected_busy.inc();
        return reject(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many SNS posts at once: retry later",
        );
    };
    let deadline = std::time::Duration::from_millis(state.config.sns_body_timeout_ms);
    let body: Bytes = match tokio::time::timeout(
        deadline,
        axum::body::to_bytes(body, MAX_SNS_POST_BYTES),
    )
    .await
    {
        Ok(Ok(body)) => body,
        Ok(Err(_)) => {
            state.metrics.rejected_malformed.inc();
            return reject(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body over the limit or unreadable",
            );
        }
        Err(_) => {
            state.metrics.rejected_body_timeout.inc();
            return reject(StatusCode::REQUEST_TIMEOUT, "body not sent in time");
        }
    };
    let envelope: SnsEnvelope = match serde_json::from_slice(&body) {
        Ok(envelope) => envelope,
        Err(_) => {
            state.metrics.rejected_malformed.inc();
            return reject(StatusCode::BAD_REQUEST, "not an SNS message");
        }
    };
    if envelope.topic_arn != state.config.topic_arn {
        state.metrics.rejected_topic.inc();
        return reject(StatusCode::FORBIDDEN, "not from the configured topic");
    }
    if let Some(verifier) = &state.verifier
        && let Err(e) = verifier.verify(&envelope).await
    {
        state.metrics.bus_rejected.inc();
        let message_id: String = envelope.message_id.chars().take(96).collect();
        if let VerifyError::CertFetch(_) = e {
            // Not a verdict on the message: the certificate could not be had just now. SNS
            // retries a 5xx (never a 4xx), so a genuine notification is not lost.
            state.metrics.rejected_cert_unavailable.inc();
            tracing::warn!(%message_id, reason = %e, "SNS post not verified yet: signing certificate unavailable, asking SNS to retry");
            return plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "signing certificate unavailable: retry later",
            );
        }
        state.metrics.rejected_signature.inc();
        // The reason, never the payload.
        if envelope.kind == "SubscriptionConfirmation" {
            tracing::warn!(%message_id, reason = %e, "SubscriptionConfirmation refused: not a genuine message of the topic; the subscription stays pending");
            state.subscription.confirmation_refused(&e);
        } else {
            tracing::warn!(%message_id, reason = %e, "SNS post refused: not a genuine message of the topic");
        }
        return plain(StatusCode::FORBIDDEN, "signature verification failed");
    }
    match envelope.kind.as_str() {
        "Notification" => {
            let payload = match BusPayload::parse(&envelope.message) {
                Ok(payload) => payload,
                Err(e) => {
                    state.metrics.rejected_payload.inc();
                    tracing::warn!(message_id = %envelope.message_id, error.message = %e, "bad bus payload");
                    return reject(StatusCode::BAD_REQUEST, "not a Chorus bus payload");
                }
            };
            state.metrics.bus_notifications.inc();
            let started = std::time::Instant::now();
            for event in &payload.events {
                state.metrics.bus_events_in.inc();
                state.connection.hub.ingest(event);
            }
            state.metrics.fanout.observe(started.elapsed());
            plain(StatusCode::OK, "ok")
        }
        "SubscriptionConfirmation" => {
            let Some(token) = envelope.token else {
                return reject(StatusCode::BAD_REQUEST, "confirmation without a token");
            };
            state.metrics.bus_notifications.inc();
            // Confirm off the request: SNS may wait on this response before it can serve the
            // ConfirmSubscription call.
            let subscriptions = state.subscriptions.clone();
            tokio::spawn(async move {
                match subscriptions.confirm(&token).await {
                    Ok(()) => tracing::info!("subscription confirmed"),
                    Err(e) => {
                        tracing::error!(error.message = %e, "confirming the subscription failed")
                    }
                }
            });
            plain(StatusCode::OK, "confirming")
        }
        "UnsubscribeConfirmation" => {
            state.metrics.bus_notifications.inc();
            tracing::info!(message_id = %envelope.message_id, "unsubscribe confirmed by SNS");
            plain(StatusCode::OK, "ok")
        }
        _ => {
            state.metrics.rejected_malformed.inc();
            reject(StatusCode::BAD_REQUEST, "unknown SNS message type")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_gets_its_config_and_loads_the_library_from_this_origin() {
        let page = chat_page("gw-1", &["ws://b/ws".to_owned()]);
        assert!(!page.contains(SLOT), "the config slot was filled");
        assert!(page.contains(r#"const CONFIG = {"fallbacks":["ws://b/ws"],"gateway":"gw-1"};"#));
        assert!(page.contains(r#"import { ChorusClient } from "/chorus.js";"#));
        assert!(CLIENT_LIBRARY.contains("export class ChorusClient"));
    }
}
