//! Bodies of the writer's HTTP API (`/v1/rooms/{room}/messages`), shared by the writer and the
//! gateway's client of it.

use serde::{Deserialize, Serialize};

use crate::ids::{Body, ClientMsgId, Seq, UserId};
use crate::message::MessageEvent;

/// Most messages one history page returns.
pub const MAX_HISTORY_LIMIT: u32 = 500;
/// Page size when a history request names none.
pub const DEFAULT_HISTORY_LIMIT: u32 = 100;

/// `POST /v1/rooms/{room}/messages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendRequest {
    /// Idempotency key, scoped to (room, sender).
    pub id: ClientMsgId,
    pub sender: UserId,
    pub body: Body,
}

/// Answer to a send: `201 Created` when stored now, `200 OK` when `id` was already stored (the
/// original seq and ts are returned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendResponse {
    pub seq: Seq,
    pub ts: String,
}

/// `GET /v1/rooms/{room}/messages?after=N&limit=L`: messages with seq > `after`, oldest first, at
/// most `limit` ([`DEFAULT_HISTORY_LIMIT`] if absent, at most [`MAX_HISTORY_LIMIT`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryPage {
    /// The room's head (its latest seq, 0 if empty) when the page was read. More pages follow
    /// while the last message's seq is below it.
    pub head: Seq,
    pub messages: Vec<MessageEvent>,
}

/// Every 4xx/5xx body of the writer: `{"error":{"code":"…","message":"…"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: ApiErrorDetail,
}

/// See [`ApiError`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiErrorDetail {
    /// Stable machine-readable code, e.g. `invalid_room`, `invalid_body`, `internal`.
    pub code: String,
    /// Human-readable explanation. Never contains internal details.
    pub message: String,
}

/// Error code of a history read (`410 Gone`) whose messages right after `after` are no longer
/// stored: expired by the writer's retention. The message names the oldest seq still stored.
pub const HISTORY_EXPIRED: &str = "history_expired";
