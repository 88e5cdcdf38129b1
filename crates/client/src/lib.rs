//! A Rust client for Chorus gateways (WebSocket subprotocol `chorus.v1`) that keeps the
//! gateway's promise — every message of a room once and in order — across reconnects, gateway
//! drains and crashes.
//!
//! The gateway keeps half of that promise: it replays a room from `since` and drops the bus's
//! duplicates. The other half lives in the client, and [`Session`] does it:
//!
//! - **A position per room**: the highest of the last message seq it delivered and the seq of
//!   the latest `joined` (a room joined with no message since still has one).
//! - **Resume**: after any reconnect it re-joins every room with `since` = its position, so the
//!   gateway replays exactly what was missed; a room never joined is joined as first asked.
//! - **Once and in order, checked**: a message is delivered only if it is the next seq of its
//!   room. A duplicate is dropped; a seq past a hole makes the session re-join the room from its
//!   position (the gateway replays the hole) instead of delivering out of order.
//! - **Sends until acked**: an unacked send is sent again, with the same id, once its room is
//!   joined on the next connection (the writer stores an id once); `unavailable` and
//!   `rate_limited` answers retry it after a backoff. At most
//!   [`DEFAULT_MAX_PENDING_SENDS`] sends wait at once (configurable); more are refused with
//!   [`ClientError::QueueFull`].
//! - **Reconnects**: a close with a resume code (4000–4499) or a dropped connection moves to the
//!   next URL after a jittered exponential [`Backoff`]. 4003 (token expired) first asks the
//!   [token source](Session::set_token_source) for a fresh token (without one the session stops
//!   with [`ClientError::TokenExpired`]); 4500 and above stop it with [`ClientError::Closed`]
//!   until the app calls [`Session::reconnect`].
//! - **A silent connection**: when a request (join, leave, send or history) waits and nothing at all is
//!   heard for the [request timeout](Session::set_request_timeout), the connection counts as
//!   dropped.
//! - **Lost history is reported, never skipped**: a resume reaching past what the store still
//!   holds gives [`Event::HistoryExpired`], then the room is joined live.
//! - **Scrollback**: [`Session::history`] asks for a page of earlier messages (no join needed;
//!   asked again after a reconnect until answered) and [`Event::History`] brings it, for a "load
//!   earlier messages" button.
//!
//! [`Client`] is a single connection, frame by frame, for tests that say exactly what goes on the
//! wire; it keeps nothing across connections.
//!
//! # Example
//!
//! ```no_run
//! use chorus_client::{Event, RoomId, Session};
//!
//! # async fn run() -> Result<(), chorus_client::ClientError> {
//! let mut session = Session::new(vec!["ws://127.0.0.1:8081/ws?user=john".into()], None);
//! let lobby = RoomId::parse("lobby")?;
//! session.join(lobby.clone(), None);
//! session.send(&lobby, "Hello world")?;
//! loop {
//!     match session.next_event().await? {
//!         Event::Message(m) => println!("[{} #{}] {}: {}", m.room, m.seq, m.sender, m.body.as_str()),
//!         Event::Acked { seq, .. } => println!("stored at seq {seq}"),
//!         Event::HistoryExpired { room, message, .. } => println!("missed in {room}: {message}"),
//!         _ => {}
//!     }
//! }
//! # }
//! ```
//!
//! `examples/hello.rs` is a complete program. The wire protocol and close codes are in the
//! Chorus README; `clients/conformance/` lists the scenarios this client passes against the real
//! stack (`tests/e2e/tests/conformance.rs`).

mod connection;
pub mod session;

pub use chorus_protocol as protocol;
pub use chorus_protocol::{
    ClientMsgId, ErrorCode, MessageEvent, PageLimit, RoomId, Seq, ServerFrame, close,
};
pub use connection::{Client, Received};
pub use session::{
    Backoff, BoxError, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_PENDING_SENDS, DEFAULT_REQUEST_TIMEOUT,
    Event, MAX_PENDING_HISTORY, Session, Stats,
};

use std::time::Duration;

use tokio_tungstenite::tungstenite;

/// What the client can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The WebSocket connection or handshake failed (a refused token is an HTTP 401 here).
    #[error("websocket: {0}")]
    WebSocket(#[from] tungstenite::Error),
    /// The gateway closed the connection with a code that says not to reconnect without
    /// changing something (4500 and above). A [`Session`] stops until [`Session::reconnect`].
    #[error("the gateway closed the connection (code {code}: {reason})")]
    Closed { code: u16, reason: String },
    /// The gateway closed with 4003 (token expired) and the session has no token source: set a
    /// token ([`Session::set_token`]) and call [`Session::reconnect`].
    #[error(
        "the token expired (close code 4003) and no token source gives a fresh one: set a new \
         token and reconnect"
    )]
    TokenExpired,
    /// The token source failed; the session tries again after a backoff.
    #[error("the token source failed: {0}")]
    TokenRefresh(#[source] BoxError),
    /// The connection ended.
    #[error("the connection ended")]
    Ended,
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    /// A room name, message id or body breaks the protocol's rules (the message says which).
    #[error("invalid: {0}")]
    Invalid(#[from] chorus_protocol::InvalidValue),
    /// A send to a room the session was not asked to join.
    #[error("join {0} before sending to it")]
    NotJoined(RoomId),
    /// As many sends as the session allows are waiting for their ack.
    #[error("{limit} sends are waiting for their ack: wait for some before sending more")]
    QueueFull { limit: usize },
    /// A send with this id is already waiting for its ack.
    #[error("a send with id {0} is already waiting for its ack")]
    DuplicateId(ClientMsgId),
    #[error("unexpected frame: {0}")]
    Unexpected(String),
    #[error("invalid frame from the gateway: {0}")]
    BadFrame(#[from] serde_json::Error),
}
