//! The writer's HTTP API.
//!
//! - `POST /v1/rooms/{room}/messages` — body [`SendRequest`]; `201` [`SendResponse`] when stored,
//!   `200` with the original seq when the (room, sender, id) was stored before.
//! - `GET /v1/rooms/{room}/messages?after=N&limit=L` (or `?before=B&limit=L`, scrollback) —
//!   [`HistoryPage`].
//! - `GET /healthz` — `200 ok` while the process serves.
//! - `GET /metrics` — Prometheus text.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use chorus_protocol::api::{
    DEFAULT_HISTORY_LIMIT, HistoryPage, MAX_HISTORY_LIMIT, SendRequest, SendResponse,
};
use chorus_protocol::{RoomId, Seq};
use chorus_service::metrics::{self, Counter, Exposition, Histogram};
use chorus_service::service_auth::{CallerKind, Grant, ServiceKeys, TokenError};

use crate::error::ApiError;
use crate::store::{MessageStore, NewMessage, StoreError};

/// Largest request body accepted: a send with the largest body, JSON-escaped, and its envelope.
const MAX_REQUEST_BYTES: usize = 128 * 1024;

/// Shared state of the handlers: one `Clone` struct of `Arc`s.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) store: Arc<dyn MessageStore>,
    pub(crate) metrics: Arc<WriterMetrics>,
    /// The service keys callers' tokens must be signed with.
    pub(crate) keys: Arc<ServiceKeys>,
}

/// The authenticated caller of a `/v1` request: a valid service token's grant. Extracting it
/// refuses the request (401) when the token is missing or invalid.
pub(crate) struct Caller(pub(crate) Grant);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim);
        let verified = match token {
            None | Some("") => Err(TokenError::Missing),
            Some(token) => state.keys.verify(token),
        };
        verified.map(Caller).map_err(|reason| {
            state.metrics.refused(&reason);
            // The reason, never the token.
            tracing::warn!(reason = %reason, "request refused: no valid service token");
            ApiError::Unauthorized(reason)
        })
    }
}

impl Caller {
    /// Refuses (403) a room the caller's grant does not name.
    fn may_use_room(&self, room: &RoomId, metrics: &WriterMetrics) -> Result<(), ApiError> {
        if self.0.kind == CallerKind::Gateway || self.0.rooms.allows(room.as_str()) {
            return Ok(());
        }
        metrics.forbidden_room.inc();
        Err(ApiError::Forbidden {
            code: "forbidden_room",
            message: format!("the token of {} does not allow room {room}", self.0.sub),
        })
    }

    /// Refuses (403) a sender name a backend's grant does not name. A gateway names the sender
    /// its client authenticated as.
    fn may_send_as(&self, sender: &str, metrics: &WriterMetrics) -> Result<(), ApiError> {
        if self.0.kind == CallerKind::Gateway || self.0.senders.allows(sender) {
            return Ok(());
        }
        metrics.forbidden_sender.inc();
        Err(ApiError::Forbidden {
            code: "forbidden_sender",
            message: format!(
                "the token of {} does not allow sending as {sender}",
                self.0.sub
            ),
        })
    }
}

#[derive(Debug, Default)]
pub(crate) struct WriterMetrics {
    stored: Counter,
    duplicate: Counter,
    rejected: Counter,
    failed: Counter,
    history: Counter,
    send_latency: Histogram,
    history_latency: Histogram,
    store_contention: Counter,
    store_unavailable: Counter,
    history_expired: Counter,
    refused_missing: Counter,
    refused_malformed: Counter,
    refused_signature: Counter,
    refused_expired: Counter,
    refused_audience: Counter,
    forbidden_room: Counter,
    forbidden_sender: Counter,
}

impl WriterMetrics {
    fn refused(&self, reason: &TokenError) {
        match reason {
            TokenError::Missing => &self.refused_missing,
            TokenError::Malformed => &self.refused_malformed,
            TokenError::Signature => &self.refused_signature,
            TokenError::Expired => &self.refused_expired,
            TokenError::Audience => &self.refused_audience,
        }
        .inc();
    }
}

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/rooms/{room}/messages", get(history).post(send))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(render_metrics))
        .route("/openapi.json", get(openapi))
        .fallback(|| async { ApiError::NotFound })
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(state)
}

fn parse_room(raw: String) -> Result<RoomId, ApiError> {
    RoomId::parse(raw).map_err(|e| ApiError::bad_request("invalid_room", e.to_string()))
}

async fn send(
    State(state): State<AppState>,
    caller: Caller,
    Path(room): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let started = std::time::Instant::now();
    let result = async {
        let room = parse_room(room)?;
        caller.may_use_room(&room, &state.metrics)?;
        let request: SendRequest = serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request("invalid_body", format!("invalid send request: {e}"))
        })?;
        caller.may_send_as(request.sender.as_str(), &state.metrics)?;
        let appended = state
            .store
            .append(NewMessage {
                room,
                id: request.id,
                sender: request.sender,
                body: request.body,
            })
            .await?;
        Ok::<_, ApiError>(appended)
    }
    .await;
    state.metrics.send_latency.observe(started.elapsed());
    match result {
        Ok(appended) => {
            let status = if appended.duplicate {
                state.metrics.duplicate.inc();
                StatusCode::OK
            } else {
                state.metrics.stored.inc();
                StatusCode::CREATED
            };
            let body = SendResponse {
                seq: appended.seq,
                ts: appended.ts,
            };
            Ok((status, Json(body)))
        }
        Err(err) => {
            match err {
                ApiError::BadRequest { .. } | ApiError::NotFound => state.metrics.rejected.inc(),
                // Counted by reason where refused.
                ApiError::Unauthorized(_) | ApiError::Forbidden { .. } => {}
                ApiError::Store(ref e) => {
                    state.metrics.failed.inc();
                    match e {
                        StoreError::Contention { .. } => state.metrics.store_contention.inc(),
                        StoreError::Unexpected(_) => state.metrics.store_unavailable.inc(),
                        // Only history reads expire.
                        StoreError::HistoryExpired { .. } => {}
                    }
                }
            }
            Err(err)
        }
    }
}

async fn history(
    State(state): State<AppState>,
    caller: Caller,
    Path(room): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<HistoryPage>, ApiError> {
    let room = parse_room(room)?;
    caller.may_use_room(&room, &state.metrics)?;
    // Seqs are int64 on the wire (what every JSON client can hold).
    let seq_param = |name: &str, code: &'static str, min: u64| -> Result<Option<Seq>, ApiError> {
        params
            .get(name)
            .map(|raw| {
                raw.parse::<u64>()
                    .ok()
                    .filter(|n| *n >= min && i64::try_from(*n).is_ok())
                    .map(Seq)
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            code,
                            format!(
                                "{name} must be a whole number from {min} to {}, got {raw:?}",
                                i64::MAX
                            ),
                        )
                    })
            })
            .transpose()
    };
    let after = seq_param("after", "invalid_after", 0)?;
    let before = seq_param("before", "invalid_before", 1)?;
    let limit = match params.get("limit") {
        None => DEFAULT_HISTORY_LIMIT,
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|l| *l <= MAX_HISTORY_LIMIT)
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_limit",
                    format!(
                        "limit must be a whole number from 0 to {MAX_HISTORY_LIMIT}, got {raw:?}"
                    ),
                )
            })?,
    };
    state.metrics.history.inc();
    let started = std::time::Instant::now();
    let page = match (after, before) {
        // Scrollback: the newest messages below `before`.
        (None, Some(before)) => state.store.history_before(&room, Some(before), limit).await,
        // Forwards from `after`, stopping below `before` if given.
        (after, before) => {
            let after = after.unwrap_or(Seq(0));
            let span = before.map_or(u64::MAX, |b| b.0.saturating_sub(after.0 + 1));
            let limit = u32::try_from(span).map_or(limit, |span| span.min(limit));
            state.store.history(&room, after, limit).await
        }
    };
    state.metrics.history_latency.observe(started.elapsed());
    match &page {
        Err(StoreError::Unexpected(_)) => state.metrics.store_unavailable.inc(),
        Err(StoreError::HistoryExpired { .. }) => state.metrics.history_expired.inc(),
        _ => {}
    }
    Ok(Json(page?))
}

/// The API's contract, `api/openapi.json` (kept in step with the code by tests/api).
pub const OPENAPI: &str = include_str!("../api/openapi.json");

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    let text = render_metrics_text(&state.metrics, &*state.store);
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text)
}

pub(crate) fn render_metrics_text(m: &WriterMetrics, store: &dyn MessageStore) -> String {
    let usage = store.usage();
    let store_counters = [
        ("write_units", usage.write_units),
        ("read_units", usage.read_units),
        ("items_written", usage.items_written),
        ("messages_written", usage.messages_written),
        ("races_lost", usage.races_lost),
    ]
    .map(|(name, value)| {
        let counter = Counter::default();
        counter.add(value);
        (name, counter)
    });
    let store_counters: Vec<(&str, &Counter)> =
        store_counters.iter().map(|(n, c)| (*n, c)).collect();
    Exposition::new()
        .counter(
            "chorus_writer_sends_total",
            "Send requests by outcome.",
            "result",
            &[
                ("stored", &m.stored),
                ("duplicate", &m.duplicate),
                ("rejected", &m.rejected),
                ("failed", &m.failed),
            ],
        )
        .counter(
            "chorus_writer_history_requests_total",
            "History pages served.",
            "",
            &[("", &m.history)],
        )
        .counter(
            "chorus_writer_history_expired_total",
            "History requests answered 410: the messages asked for are past retention.",
            "",
            &[("", &m.history_expired)],
        )
        .counter(
            "chorus_writer_dynamodb_total",
            "DynamoDB work: write and read request units (from item sizes), items written, messages they hold, writes that lost the race for a seq.",
            "kind",
            &store_counters,
        )
        .histogram(
            "chorus_writer_request_seconds",
            "Writer request latency, including DynamoDB.",
            "route",
            &[("send", &m.send_latency), ("history", &m.history_latency)],
        )
        .counter(
            "chorus_writer_store_errors_total",
            "DynamoDB failures by kind: contention (a room's seq race not resolved), unavailable (errors, throttling, timeouts).",
            "kind",
            &[("contention", &m.store_contention), ("unavailable", &m.store_unavailable)],
        )
        .counter(
            "chorus_writer_requests_refused_total",
            "Requests refused before anything was done: no valid service token (401: missing, malformed, signature, expired, audience), or a backend token that does not allow the room or sender (403).",
            "reason",
            &[
                ("missing", &m.refused_missing),
                ("malformed", &m.refused_malformed),
                ("signature", &m.refused_signature),
                ("expired", &m.refused_expired),
                ("audience", &m.refused_audience),
                ("forbidden_room", &m.forbidden_room),
                ("forbidden_sender", &m.forbidden_sender),
            ],
        )
        .finish()
}
