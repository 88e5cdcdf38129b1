//! The client ↔ gateway protocol `chorus.v1`: JSON text frames, one object per WebSocket message,
//! discriminated by `"type"`. Unknown fields are ignored (so clients may add their own); unknown
//! types are refused with an `error` frame.

use serde::{Deserialize, Serialize};

use crate::ids::{Body, ClientMsgId, PageLimit, RoomId, Seq};
use crate::message::MessageEvent;

/// The WebSocket subprotocol a client asks for. A gateway also accepts clients that ask for none.
pub const SUBPROTOCOL: &str = "chorus.v1";

/// Largest client frame a gateway reads, in bytes: a send with the largest body, JSON-escaped,
/// plus its envelope.
pub const MAX_CLIENT_FRAME_BYTES: usize = 64 * 1024;

/// What a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Start receiving a room's messages. With `since`, first replay every message with seq > since.
    Join {
        room: RoomId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<Seq>,
    },
    /// Stop receiving a room's messages.
    Leave { room: RoomId },
    /// Post a message to a room the connection has joined. `id` is the idempotency key: a retry
    /// with the same id is stored once and acked with the same seq.
    Send {
        room: RoomId,
        id: ClientMsgId,
        body: Body,
    },
    /// Scrollback ("load earlier messages"): up to `limit` (default 50, at most 100) of the
    /// room's messages with seq < `before` (the newest ones if `before` is absent), answered by a
    /// `history` frame with the same `id`. Authorised like a join (the token must allow the room,
    /// and it counts against the join rate); the connection need not have joined the room.
    History {
        room: RoomId,
        id: ClientMsgId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<Seq>,
        #[serde(default)]
        limit: PageLimit,
    },
}

/// What a gateway sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The join took effect; `seq` is the room's head after any replay: live messages follow it.
    Joined { room: RoomId, seq: Seq },
    /// The leave took effect.
    Left { room: RoomId },
    /// A message of a joined room.
    Message(MessageEvent),
    /// The send with client id `id` is durable at `seq`.
    Ack {
        id: ClientMsgId,
        room: RoomId,
        seq: Seq,
    },
    /// The answer to the `history` request `id`: consecutive messages of `room`, oldest first,
    /// ending right below the request's `before` (or at the room's newest). Fewer than asked
    /// when the room has no more, or when their bytes would overflow the connection's queue;
    /// empty when nothing earlier is stored (seq 1 reached, or older messages expired). To page
    /// on, ask with `before` = the first message's seq.
    History {
        room: RoomId,
        id: ClientMsgId,
        messages: Vec<MessageEvent>,
    },
    /// A request could not be served. `ref` echoes the `id` of a failed send or history request,
    /// if any; `room` names the room of a failed join or history request (absent otherwise).
    Error {
        code: ErrorCode,
        message: String,
        #[serde(rename = "ref")]
        reference: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        room: Option<RoomId>,
    },
}

/// Machine-readable reason in an `error` frame. The connection stays open after any of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not a JSON object of a known type with valid fields.
    BadFrame,
    /// The frame's `type` is not one this protocol version knows.
    UnknownType,
    /// A send or leave named a room the connection has not joined.
    NotJoined,
    /// The message store could not be reached or refused the write; retry with the same id.
    Unavailable,
    /// A per-connection limit was reached (e.g. rooms per connection); the request was ignored.
    LimitExceeded,
    /// Too many sends or joins per second: this one was ignored; slow down and retry it (a send
    /// with the same id).
    RateLimited,
    /// The connection's token does not allow this room; the request was ignored.
    Forbidden,
    /// A join's `since` reaches back past what the store still holds (messages expire after the
    /// retention period, or a seq can no longer be read): the join was ignored and nothing was
    /// replayed. The client decides: join again without `since` (or with a `since` at or after
    /// the oldest seq the message names) and treat the messages in between as lost.
    HistoryExpired,
}

/// Why a client frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not JSON, not an object, or a field is missing or invalid.
    #[error("{0}")]
    Malformed(String),
    /// A JSON object whose `type` is unknown.
    #[error("unknown frame type {0:?}: expected join, leave or send")]
    UnknownType(String),
}

impl FrameError {
    /// The wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::Malformed(_) => ErrorCode::BadFrame,
            FrameError::UnknownType(_) => ErrorCode::UnknownType,
        }
    }
}

/// A client frame that failed to parse, with the client message id if one could be read, so the
/// error can reference the send it refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub error: FrameError,
    pub reference: Option<String>,
}

impl ClientFrame {
    /// Parses one text frame.
    ///
    /// # Errors
    /// [`Rejected`] with a message naming what is wrong and, where the frame carried a string
    /// `id`, that id (truncated to [`ClientMsgId::MAX_LEN`] characters).
    pub fn parse(text: &str) -> Result<ClientFrame, Rejected> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| Rejected {
            error: FrameError::Malformed(format!("frame is not valid JSON: {e}")),
            reference: None,
        })?;
        let reference = value
            .get("id")
            .and_then(|id| id.as_str())
            .map(|id| id.chars().take(ClientMsgId::MAX_LEN).collect());
        let reject = |error| Rejected {
            error,
            reference: reference.clone(),
        };
        let Some(kind) = value.get("type") else {
            return Err(reject(FrameError::Malformed(
                "frame must be a JSON object with a \"type\" field".into(),
            )));
        };
        match kind.as_str() {
            Some("join" | "leave" | "send" | "history") => {}
            Some(other) => {
                let shown: String = other.chars().take(32).collect();
                return Err(reject(FrameError::UnknownType(shown)));
            }
            None => {
                return Err(reject(FrameError::Malformed(
                    "\"type\" must be a string".into(),
                )));
            }
        }
        serde_json::from_value(value)
            .map_err(|e| reject(FrameError::Malformed(format!("invalid frame: {e}"))))
    }
}

impl ServerFrame {
    /// The frame as JSON text. Serializing these types cannot fail (string keys, no maps of
    /// non-string keys, no floats).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialize")
    }

    /// An `error` frame.
    pub fn error(code: ErrorCode, message: impl Into<String>, reference: Option<String>) -> Self {
        ServerFrame::Error {
            code,
            message: message.into(),
            reference,
            room: None,
        }
    }

    /// An `error` frame about a request for `room` (a join).
    pub fn room_error(code: ErrorCode, message: impl Into<String>, room: RoomId) -> Self {
        ServerFrame::Error {
            code,
            message: message.into(),
            reference: None,
            room: Some(room),
        }
    }

    /// An `error` frame about the `history` request `id` for `room`.
    pub fn history_error(
        code: ErrorCode,
        message: impl Into<String>,
        room: RoomId,
        id: &ClientMsgId,
    ) -> Self {
        ServerFrame::Error {
            code,
            message: message.into(),
            reference: Some(id.to_string()),
            room: Some(room),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reports_what_is_wrong() {
        let err = ClientFrame::parse("not json").unwrap_err();
        assert_eq!(err.error.code(), ErrorCode::BadFrame);
        assert!(err.error.to_string().contains("not valid JSON"));

        let err = ClientFrame::parse(r#"{"type":"shout","id":"m1"}"#).unwrap_err();
        assert_eq!(err.error, FrameError::UnknownType("shout".into()));
        assert_eq!(err.reference.as_deref(), Some("m1"));

        let err = ClientFrame::parse(r#"{"type":"send","room":"lobby","id":"m2"}"#).unwrap_err();
        assert_eq!(err.error.code(), ErrorCode::BadFrame);
        assert!(err.error.to_string().contains("body"), "{}", err.error);
        assert_eq!(err.reference.as_deref(), Some("m2"));

        let err = ClientFrame::parse(r#"{"type":"join","room":"no spaces"}"#).unwrap_err();
        assert!(
            err.error.to_string().contains("room must be"),
            "{}",
            err.error
        );

        let err = ClientFrame::parse(r#"[1,2]"#).unwrap_err();
        assert!(err.error.to_string().contains("\"type\""));
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let frame = ClientFrame::parse(r#"{"type":"leave","room":"lobby","extra":true}"#).unwrap();
        assert_eq!(
            frame,
            ClientFrame::Leave {
                room: RoomId::parse("lobby").unwrap()
            }
        );
    }

    #[test]
    fn a_history_limit_outside_1_to_100_is_refused_naming_the_request() {
        for limit in ["0", "101", "-1", "2.5", "\"ten\""] {
            let text = format!(r#"{{"type":"history","room":"a","id":"h1","limit":{limit}}}"#);
            let err = ClientFrame::parse(&text).unwrap_err();
            assert_eq!(err.error.code(), ErrorCode::BadFrame, "{limit}");
            assert_eq!(err.reference.as_deref(), Some("h1"), "{limit}");
        }
        let err =
            ClientFrame::parse(r#"{"type":"history","room":"a","id":"h1","limit":0}"#).unwrap_err();
        assert!(
            err.error.to_string().contains("limit must be 1 to 100"),
            "{}",
            err.error
        );
        let frame = ClientFrame::parse(r#"{"type":"history","room":"a","id":"h1"}"#).unwrap();
        assert!(
            matches!(frame, ClientFrame::History { limit, before: None, .. } if limit.get() == 50)
        );
    }

    #[test]
    fn negative_or_fractional_since_is_refused() {
        assert!(ClientFrame::parse(r#"{"type":"join","room":"a","since":-1}"#).is_err());
        assert!(ClientFrame::parse(r#"{"type":"join","room":"a","since":1.5}"#).is_err());
    }
}
