//! [`Session`]: a client that stays in its rooms across reconnects, as the README's client
//! contract asks, and delivers every message of a room once and in order.
//!
//! - **Position per room.** The session's position in a room is the highest of the last message
//!   seq it delivered there and the seq of the latest `joined` (which says where the client is
//!   after a replay, or the room's head for a plain join). A room joined without a message yet
//!   still has a position: the `joined` seq.
//! - **Once and in order.** A message is delivered ([`Event::Message`]) only if it is the next
//!   seq of its room. One at or below the position is a duplicate and is dropped; one past a hole
//!   is dropped too, and the room is re-joined from its position on the same connection, so the
//!   gateway replays the hole. [`Session::stats`] counts both (a correct gateway causes neither).
//! - **Reconnect and resume.** After a close with a resume code (4000–4499) or a dropped socket,
//!   the next [`Session::next_event`] reconnects after a randomized backoff (to the next URL)
//!   and re-joins every room with `since` = its position. A room never joined (no `joined` yet)
//!   is joined as the user asked: plain (live messages from now on) or with the `since` the user
//!   gave for history. So a message sent while the client was away is received once, and nothing
//!   already received is replayed.
//! - **Token expiry.** A close with 4003 makes the session ask its token source
//!   ([`Session::set_token_source`]) for a fresh token before it reconnects, as does a handshake
//!   refused with HTTP 401. Without a token source, 4003 stops the session
//!   ([`ClientError::TokenExpired`]).
//! - **Stop.** A close with 4500 or above stops the session ([`ClientError::Closed`]): it does not
//!   reconnect until [`Session::reconnect`]. Rooms, positions and unacked sends are kept.
//! - **When history has expired** (`history_expired` answers a join with `since`), the session
//!   reports it ([`Event::HistoryExpired`], with the `since` that could not be served and the
//!   gateway's words naming the oldest seq kept) and joins the room again without `since`.
//! - **Sends until acked.** A send is kept until its `ack` arrives; after a reconnect it is sent
//!   again, with the same id, once its room is joined on the new connection (the writer stores a
//!   retried id once). An `unavailable` or `rate_limited` answer retries it after a backoff. At
//!   most [`Session::set_max_pending_sends`] sends wait at once.
//! - **Scrollback.** [`Session::history`] asks for a page of a room's earlier messages (no join
//!   needed); the answer is [`Event::History`] with the request's id. A request is asked again
//!   after a reconnect or an `unavailable` answer until it is answered; at most
//!   [`MAX_PENDING_HISTORY`] wait at once. Pages are for the app to show: they move no position
//!   and are not [`Event::Message`]s.
//! - **A silent connection.** When a request (join, leave, send or history) waits and nothing at all — not
//!   even a ping — is heard for the request timeout, the connection counts as dropped and the
//!   session moves on ([`Event::Disconnected`] without a code).
//! - **One request at a time per room.** Joins go out one at a time (each answered by `joined`
//!   or an error, in order; after a reconnect, in the order the rooms were first joined), and a
//!   room the user re-joins is re-joined on the same connection only after its `left`.
//!
//! Every method is synchronous except [`Session::next_event`], [`Session::flush`] and
//! [`Session::close`]; the first two are cancel-safe (a frame is taken off the session's outgoing
//! queue only in the same step as it is handed to the socket, and a connection attempt or token
//! refresh in progress is kept for the next call), so `next_event` can sit in a `select!` with
//! stdin or a channel of the app's commands. Nothing happens on the network between calls: the
//! app drives the session by calling `next_event` in a loop.

use std::collections::{BTreeMap, VecDeque};
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::time::Duration;

use chorus_protocol::{
    Body, ClientFrame, ClientMsgId, ErrorCode, MessageEvent, PageLimit, RoomId, Seq, ServerFrame,
    close,
};
use futures_util::Sink;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep, sleep_until};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{Client, ClientError, Received};

/// Most sends awaiting their ack at once, unless [`Session::set_max_pending_sends`] says
/// otherwise; [`Session::send`] refuses more with [`ClientError::QueueFull`].
pub const DEFAULT_MAX_PENDING_SENDS: usize = 256;

/// How long a waiting request may go with nothing heard before the connection counts as dropped,
/// unless [`Session::set_request_timeout`] says otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a connection attempt (TCP, TLS and the WebSocket handshake) may take, unless
/// [`Session::set_connect_timeout`] says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Most [`Session::history`] requests waiting for their answer at once.
pub const MAX_PENDING_HISTORY: usize = 16;

/// The error a token source may fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What [`Session::next_event`] reports.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A new connection is up; the session re-joins its rooms on it.
    Connected { url: String },
    /// A connection attempt failed; the next call tries the next URL after `retry_in`.
    ConnectFailed {
        url: String,
        error: ClientError,
        retry_in: Duration,
    },
    /// The token source failed; the next call asks it again after `retry_in`.
    TokenRefreshFailed { error: BoxError, retry_in: Duration },
    /// The connection ended: closed with a resume code (`code`), or dropped or silent (`None`).
    /// The next call reconnects after `retry_in`.
    Disconnected {
        code: Option<u16>,
        reason: String,
        retry_in: Duration,
    },
    /// `room` is joined on this connection; live messages follow `seq` (the position).
    /// `resumed`: the join carried `since`, so nothing between was missed.
    Joined {
        room: RoomId,
        seq: Seq,
        resumed: bool,
    },
    /// The gateway confirmed a [`Session::leave`].
    Left { room: RoomId },
    /// A message: each seq of a room once, each the next of its room.
    Message(MessageEvent),
    /// The send with this id is durable at `seq` (its only ack: duplicates are dropped).
    Acked {
        id: ClientMsgId,
        room: RoomId,
        seq: Seq,
    },
    /// The messages of `room` after `since` are no longer stored: they were missed for good.
    /// The session joins the room again live (its next [`Event::Joined`] has `resumed: false`).
    HistoryExpired {
        room: RoomId,
        since: Seq,
        message: String,
    },
    /// The gateway refused a send for good (e.g. `forbidden`); it is no longer pending.
    SendFailed {
        id: ClientMsgId,
        room: RoomId,
        code: ErrorCode,
        message: String,
    },
    /// The gateway refused a join for good (`forbidden`, `limit_exceeded`, …): the session is no
    /// longer in the room, and the sends waiting for it (`dropped_sends`) are given up.
    JoinFailed {
        room: RoomId,
        code: ErrorCode,
        message: String,
        dropped_sends: Vec<ClientMsgId>,
    },
    /// The gateway answered `unavailable`, `rate_limited` or `not_joined`; the session retries
    /// the join or send (`id`) by itself. For information.
    Retrying {
        code: ErrorCode,
        message: String,
        room: Option<RoomId>,
        id: Option<ClientMsgId>,
    },
    /// The answer to the [`Session::history`] request `id`: consecutive messages of `room`,
    /// oldest first, ending right below the request's `before` (or at the room's newest); empty
    /// when nothing earlier is stored. Page on with `before` = the first message's seq.
    History {
        id: ClientMsgId,
        room: RoomId,
        messages: Vec<MessageEvent>,
    },
    /// The gateway refused the history request `id` for good (e.g. `forbidden`).
    HistoryFailed {
        id: ClientMsgId,
        room: RoomId,
        code: ErrorCode,
        message: String,
    },
    /// An error frame that answers nothing the session waits for.
    Error {
        code: ErrorCode,
        message: String,
        room: Option<RoomId>,
    },
}

/// Backoff between reconnects and retries: `base · 2^(failures-1)`, at most `cap`, times a
/// random factor in [0.5, 1) so clients of a drained gateway do not come back in step. It starts
/// over once a room is joined again.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(200),
            cap: Duration::from_secs(5),
        }
    }
}

/// What a session counted, for tests and diagnostics. A correct gateway causes no duplicate, no
/// gap and no message of a room the session never joined.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Connections opened.
    pub connections: u64,
    /// Messages dropped because their seq was already delivered.
    pub duplicates_dropped: u64,
    /// Holes seen in a room's seqs, each answered by re-joining from the position.
    pub gaps_resynced: u64,
    /// Messages of rooms the session was never asked to join (dropped).
    pub unknown_room_messages: u64,
    /// Acks that answered no waiting send (a duplicate).
    pub stray_acks: u64,
    /// Sends written again after a reconnect or a retryable error.
    pub send_retries: u64,
}

#[derive(Debug, Default)]
struct RoomState {
    /// max(last message seq delivered, latest `joined` seq); `None` until the first `joined`.
    position: Option<Seq>,
    /// `since` the user asked for (history), used until the room has a position.
    requested: Option<Seq>,
    /// The user wants to be in the room: it is (re-)joined on every connection.
    wanted: bool,
    /// Joined on the current connection (its `joined` arrived, no `leave` sent since).
    joined: bool,
    /// A `leave` was sent on this connection and its answer has not arrived.
    leaving: bool,
    /// A hole was seen: a re-join from the position is queued or in flight.
    resyncing: bool,
    /// When the room was first joined, relative to the others: rooms are re-joined in that
    /// order after a reconnect.
    order: u64,
}

#[derive(Debug)]
struct PendingSend {
    id: ClientMsgId,
    room: RoomId,
    body: Body,
    /// Sent on the current connection (awaiting its ack or error).
    sent: bool,
    /// Sent at least once, on any connection.
    ever_sent: bool,
    /// Not before this instant (after `unavailable` or `rate_limited`).
    retry_at: Option<Instant>,
    failures: u32,
}

#[derive(Debug)]
struct PendingHistory {
    id: ClientMsgId,
    room: RoomId,
    before: Option<Seq>,
    limit: PageLimit,
    /// Sent on the current connection (awaiting its answer).
    sent: bool,
    /// Not before this instant (after `unavailable` or `rate_limited`).
    retry_at: Option<Instant>,
    failures: u32,
}

/// The join in flight on this connection.
#[derive(Debug)]
struct Joining {
    room: RoomId,
    since: Option<Seq>,
}

/// Why the session stopped.
#[derive(Debug, Clone)]
enum Stop {
    Closed { code: u16, reason: String },
    TokenExpired,
}

impl Stop {
    fn error(&self) -> ClientError {
        match self.clone() {
            Stop::Closed { code, reason } => ClientError::Closed { code, reason },
            Stop::TokenExpired => ClientError::TokenExpired,
        }
    }
}

/// Where the session connects: the URL for the n-th attempt.
type UrlSource = Box<dyn FnMut(usize) -> String + Send>;
type TokenFuture = Pin<Box<dyn Future<Output = Result<String, BoxError>> + Send>>;
type TokenSource = Box<dyn FnMut() -> TokenFuture + Send>;
type ConnectFuture = Pin<Box<dyn Future<Output = Result<Client, ClientError>> + Send>>;

/// A client that keeps its rooms and unacked sends across connections. See the module docs.
pub struct Session {
    urls: UrlSource,
    token: Option<String>,
    token_source: Option<TokenSource>,
    /// The gateway said the token expired (4003, or 401 at the handshake): refresh first.
    token_stale: bool,
    /// A token refresh in progress (kept across a cancelled `next_event`).
    refreshing: Option<TokenFuture>,
    /// A connection attempt in progress and its URL (kept across a cancelled `next_event`).
    connecting: Option<(String, ConnectFuture)>,
    conn: Option<Client>,
    url: Option<String>,
    stopped: Option<Stop>,
    attempts: usize,
    /// Consecutive connections that failed or ended before a room was joined (backoff).
    failures: u32,
    reconnect_at: Option<Instant>,
    backoff: Backoff,
    request_timeout: Duration,
    connect_timeout: Duration,
    max_pending: usize,
    /// When the session last started waiting for an answer (the silence counts from the later of
    /// this and the last thing heard).
    waiting_since: Instant,
    /// Fires at the silence deadline, or before (made on first use: it needs the runtime).
    silence_timer: Option<Pin<Box<Sleep>>>,
    rooms: BTreeMap<RoomId, RoomState>,
    /// Rooms to join on this connection, in order; one join is in flight at a time.
    join_queue: VecDeque<RoomId>,
    joining: Option<Joining>,
    join_failures: u32,
    join_retry_at: Option<Instant>,
    /// Rooms whose `leave` is in flight, in the order sent (answers come in that order).
    leaves: VecDeque<RoomId>,
    pending: VecDeque<PendingSend>,
    /// Scrollback requests awaiting their page.
    histories: VecDeque<PendingHistory>,
    next_history_id: u64,
    /// Events decided outside `next_event` (a leave done at once), reported first.
    ready: VecDeque<Event>,
    /// Frames decided but not yet handed to the socket.
    outgoing: VecDeque<String>,
    /// Rooms ever joined (gives each its `order`).
    rooms_joined: u64,
    next_id: u64,
    id_prefix: String,
    rng: u64,
    stats: Stats,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("url", &self.url)
            .field("stopped", &self.stopped)
            .field("attempts", &self.attempts)
            .field("rooms", &self.rooms)
            .field("joining", &self.joining)
            .field("pending", &self.pending.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session over `urls`, tried in turn (the first connection goes to the first URL). With a
    /// token, it is offered as the `bearer.<token>` subprotocol. Nothing happens until
    /// [`Session::next_event`].
    ///
    /// # Panics
    /// When `urls` is empty.
    pub fn new(urls: Vec<String>, token: Option<String>) -> Session {
        assert!(!urls.is_empty(), "a session needs at least one URL");
        Session::with_url_source(move |attempt| urls[attempt % urls.len()].clone(), token)
    }

    /// A session whose n-th connection attempt goes to `url(n)` (e.g. whichever gateways are
    /// alive now).
    pub fn with_url_source(
        url: impl FnMut(usize) -> String + Send + 'static,
        token: Option<String>,
    ) -> Session {
        let seed = uuid::Uuid::new_v4();
        Session {
            urls: Box::new(url),
            token,
            token_source: None,
            token_stale: false,
            refreshing: None,
            connecting: None,
            conn: None,
            url: None,
            stopped: None,
            attempts: 0,
            failures: 0,
            reconnect_at: None,
            backoff: Backoff::default(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_pending: DEFAULT_MAX_PENDING_SENDS,
            waiting_since: Instant::now(),
            silence_timer: None,
            rooms: BTreeMap::new(),
            join_queue: VecDeque::new(),
            joining: None,
            join_failures: 0,
            join_retry_at: None,
            leaves: VecDeque::new(),
            pending: VecDeque::new(),
            histories: VecDeque::new(),
            next_history_id: 0,
            ready: VecDeque::new(),
            outgoing: VecDeque::new(),
            rooms_joined: 0,
            next_id: 0,
            id_prefix: seed.simple().to_string()[..12].to_owned(),
            rng: (seed.as_u128() as u64) | 1,
            stats: Stats::default(),
        }
    }

    /// Replaces the backoff between reconnects and retries.
    pub fn set_backoff(&mut self, backoff: Backoff) {
        self.backoff = backoff;
    }

    /// A request (join, leave, send) that waits while nothing at all is heard for this long ends
    /// the connection (default [`DEFAULT_REQUEST_TIMEOUT`]). Keep it above the gateway's ping
    /// interval for connections that wait long on a busy store.
    pub fn set_request_timeout(&mut self, timeout: Duration) {
        self.request_timeout = timeout;
    }

    /// A connection attempt that has not completed its handshake after this long is abandoned
    /// (default [`DEFAULT_CONNECT_TIMEOUT`]).
    pub fn set_connect_timeout(&mut self, timeout: Duration) {
        self.connect_timeout = timeout;
    }

    /// Most sends waiting for their ack at once (default [`DEFAULT_MAX_PENDING_SENDS`]); the
    /// session's memory is bounded by it (and the 16 KiB body limit).
    pub fn set_max_pending_sends(&mut self, max: usize) {
        self.max_pending = max;
    }

    /// The token for the next connection (the current one keeps its token until it ends).
    pub fn set_token(&mut self, token: Option<String>) {
        self.token = token;
        self.token_stale = false;
        self.refreshing = None;
    }

    /// Where a fresh token comes from when the gateway says the token expired (close code 4003,
    /// or a handshake refused with HTTP 401): called before the next connection attempt. When it
    /// fails, [`Event::TokenRefreshFailed`] is reported and it is called again after a backoff.
    ///
    /// ```no_run
    /// # use chorus_client::Session;
    /// # async fn fetch_token() -> Result<String, std::io::Error> { Ok(String::new()) }
    /// let mut session = Session::new(vec!["wss://chat.example.com/ws".into()], None);
    /// session.set_token_source(|| async { fetch_token().await });
    /// ```
    pub fn set_token_source<F, Fut, E>(&mut self, mut source: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<String, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.token_source = Some(Box::new(move || {
            let future = source();
            Box::pin(async move { future.await.map_err(Into::into) })
        }));
    }

    /// Prefix of the ids [`Session::send`] makes (`<prefix>-1`, `<prefix>-2`, …); it must be
    /// unique to this client (the default is random).
    ///
    /// # Errors
    /// When the ids it would make are not valid client message ids.
    pub fn set_id_prefix(&mut self, prefix: &str) -> Result<(), ClientError> {
        ClientMsgId::parse(format!("{prefix}-{}", u64::MAX))?;
        prefix.clone_into(&mut self.id_prefix);
        Ok(())
    }

    /// Be in `room` from now on, on this connection and every later one. The first join is plain
    /// (live messages from now on), or replays every message after `since` if given; once the
    /// room has a position, every join resumes from it instead. Joining a room the session is in
    /// re-joins it (after a `leave`, so nothing in flight is received twice).
    pub fn join(&mut self, room: RoomId, since: Option<Seq>) {
        if !self.rooms.contains_key(&room) {
            let state = RoomState {
                order: self.rooms_joined,
                ..RoomState::default()
            };
            self.rooms.insert(room.clone(), state);
            self.rooms_joined += 1;
        }
        let state = self.rooms.get_mut(&room).expect("inserted above");
        state.wanted = true;
        if state.position.is_none() && since.is_some() {
            state.requested = since;
        }
        if state.joined {
            self.send_leave(&room);
        }
        self.enqueue_join(room);
    }

    /// Leave `room`; [`Event::Left`] confirms it (at once when the room is not joined on a
    /// connection, or when the connection ends first). Its position is kept (a later
    /// [`Session::join`] resumes from it), and so are its unacked sends (they go out if the room
    /// is joined again). Does nothing for a room never joined.
    pub fn leave(&mut self, room: &RoomId) {
        let Some(state) = self.rooms.get_mut(room) else {
            return;
        };
        if !state.wanted {
            return;
        }
        state.wanted = false;
        let joined = state.joined;
        self.join_queue.retain(|r| r != room);
        if self.joining.as_ref().is_some_and(|j| j.room == *room) {
            // The join in flight is answered first: its `joined` sends the leave; a refusal
            // means there is nothing to leave.
        } else if joined && self.conn.is_some() {
            self.send_leave(room);
        } else {
            self.ready.push_back(Event::Left { room: room.clone() });
        }
    }

    /// Sends `body` to `room` (joined, or being joined) with a fresh id, which it returns. The
    /// send goes out when the room is joined on the connection, and again after every reconnect
    /// until it is acked ([`Event::Acked`]).
    ///
    /// # Errors
    /// [`ClientError::Invalid`] for a body the protocol refuses, [`ClientError::NotJoined`] when
    /// the room was not joined, [`ClientError::QueueFull`] when the most sends allowed wait for
    /// their ack.
    pub fn send(&mut self, room: &RoomId, body: &str) -> Result<ClientMsgId, ClientError> {
        let id = ClientMsgId::parse(format!("{}-{}", self.id_prefix, self.next_id + 1))?;
        self.send_with_id(room, id.clone(), body)?;
        self.next_id += 1;
        Ok(id)
    }

    /// As [`Session::send`], with the caller's id: to retry a send made before a restart, or to
    /// make a send idempotent on the caller's terms. The writer stores an id once; sending it
    /// again after its ack is acked again with the same seq.
    ///
    /// # Errors
    /// As [`Session::send`], and [`ClientError::DuplicateId`] when a send with this id waits.
    pub fn send_with_id(
        &mut self,
        room: &RoomId,
        id: ClientMsgId,
        body: &str,
    ) -> Result<(), ClientError> {
        let body = Body::parse(body)?;
        if !self.rooms.get(room).is_some_and(|s| s.wanted) {
            return Err(ClientError::NotJoined(room.clone()));
        }
        if self.pending.iter().any(|p| p.id == id) {
            return Err(ClientError::DuplicateId(id));
        }
        if self.pending.len() >= self.max_pending {
            return Err(ClientError::QueueFull {
                limit: self.max_pending,
            });
        }
        self.pending.push_back(PendingSend {
            id,
            room: room.clone(),
            body,
            sent: false,
            ever_sent: false,
            retry_at: None,
            failures: 0,
        });
        Ok(())
    }

    /// Asks for a page of `room`'s history for scrollback: up to `limit` messages with seq below
    /// `before` (the room's newest without it). Returns the request's id; the page comes as
    /// [`Event::History`] with it (or [`Event::HistoryFailed`]). The room need not be joined.
    ///
    /// # Errors
    /// [`ClientError::QueueFull`] when [`MAX_PENDING_HISTORY`] requests wait.
    pub fn history(
        &mut self,
        room: &RoomId,
        before: Option<Seq>,
        limit: PageLimit,
    ) -> Result<ClientMsgId, ClientError> {
        if self.histories.len() >= MAX_PENDING_HISTORY {
            return Err(ClientError::QueueFull {
                limit: MAX_PENDING_HISTORY,
            });
        }
        let id = ClientMsgId::parse(format!("{}-h{}", self.id_prefix, self.next_history_id + 1))?;
        self.next_history_id += 1;
        self.histories.push_back(PendingHistory {
            id: id.clone(),
            room: room.clone(),
            before,
            limit,
            sent: false,
            retry_at: None,
            failures: 0,
        });
        Ok(id)
    }

    /// The session's position in `room`: max(last message seq delivered, latest `joined` seq).
    pub fn position(&self, room: &RoomId) -> Option<Seq> {
        self.rooms.get(room).and_then(|s| s.position)
    }

    /// Whether `room` is joined on the current connection.
    pub fn is_joined(&self, room: &RoomId) -> bool {
        self.conn.is_some() && self.rooms.get(room).is_some_and(|s| s.joined)
    }

    /// Ids of the sends awaiting their ack, oldest first.
    pub fn unacked(&self) -> impl Iterator<Item = &ClientMsgId> {
        self.pending.iter().map(|p| &p.id)
    }

    /// Whether a connection is up.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// The URL of the current connection.
    pub fn url(&self) -> Option<&str> {
        self.conn.as_ref().and(self.url.as_deref())
    }

    /// Whether the session stopped (a close with 4500 or above, or 4003 without a token source)
    /// and waits for [`Session::reconnect`].
    pub fn is_stopped(&self) -> bool {
        self.stopped.is_some()
    }

    /// What the session counted so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// After a stop, lets the next [`Session::next_event`] connect again (at once), with the
    /// rooms, positions and unacked sends the session had. Does nothing otherwise.
    pub fn reconnect(&mut self) {
        if self.stopped.take().is_some() {
            self.failures = 0;
            self.reconnect_at = None;
        }
    }

    /// Drops the connection at once, without a close frame (as a network failure would); the
    /// next [`Session::next_event`] reconnects without a backoff.
    pub fn drop_connection(&mut self) {
        self.disconnected();
        self.connecting = None;
        self.failures = 0;
        self.reconnect_at = None;
    }

    /// Hands every frame decided so far (joins, leaves, sends due) to the socket, without
    /// reading. Cancel-safe. On a socket error the connection is dropped and the next
    /// [`Session::next_event`] reconnects.
    ///
    /// # Errors
    /// The socket's error.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        let result = self.write_out().await;
        if result.is_err() {
            self.disconnected();
        }
        result
    }

    /// The next thing that happened: (re)connects when there is no connection, sends what is
    /// due, then waits for the gateway. Cancel-safe.
    ///
    /// # Errors
    /// Only when the session stopped: the gateway closed the connection with 4500 or above
    /// ([`ClientError::Closed`]), or with 4003 and there is no token source
    /// ([`ClientError::TokenExpired`]). Every later call returns the same error until
    /// [`Session::reconnect`]. Failed connection attempts and dropped connections are events:
    /// the caller decides when to give up.
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Ok(event);
            }
            if let Some(stop) = &self.stopped {
                return Err(stop.error());
            }
            if self.conn.is_none() {
                return Ok(self.connect().await);
            }
            // Write what is due; a write that cannot proceed counts as silence too.
            self.plan();
            let awaiting = self.awaiting_answer();
            if awaiting {
                self.arm_silence_timer();
            }
            if !self.outgoing.is_empty() {
                let conn = self.conn.as_mut().expect("connected");
                let timer = self
                    .silence_timer
                    .as_mut()
                    .expect("armed: frames are requests");
                let written = tokio::select! {
                    written = write_frames(&mut conn.socket, &mut self.outgoing) => Some(written),
                    () = timer.as_mut() => None,
                };
                match written {
                    Some(Ok(())) => {}
                    Some(Err(e)) => return Ok(self.lost(None, e.to_string())),
                    None if self.silent_too_long() => {
                        return Ok(self.lost(None, self.silence_reason()));
                    }
                    None => continue,
                }
            }

            let retry = self.next_retry();
            let conn = self.conn.as_mut().expect("connected");
            let timer = self.silence_timer.as_mut().filter(|_| awaiting);
            let woken = tokio::select! {
                received = conn.recv() => Wake::Received(received),
                () = sleep_until(retry.unwrap_or_else(Instant::now)), if retry.is_some() => Wake::Retry,
                () = async {
                    match timer {
                        Some(timer) => timer.as_mut().await,
                        None => std::future::pending().await,
                    }
                } => Wake::Silence,
            };
            match woken {
                Wake::Retry => {}
                // Something may have been heard since the timer was set (a ping is read inside
                // `recv`): only a full timeout of silence ends the connection.
                Wake::Silence => {
                    if self.silent_too_long() {
                        return Ok(self.lost(None, self.silence_reason()));
                    }
                }
                Wake::Received(Ok(Received::Frame(frame))) => {
                    if let Some(event) = self.on_frame(frame) {
                        return Ok(event);
                    }
                }
                Wake::Received(Ok(Received::Closed { code, reason })) => {
                    return self.on_close(code, reason);
                }
                Wake::Received(Err(e)) => return Ok(self.lost(None, e.to_string())),
            }
        }
    }

    /// Closes the connection normally (unacked sends are given up).
    ///
    /// # Errors
    /// When the socket fails.
    pub async fn close(mut self) -> Result<(), ClientError> {
        match self.conn.take() {
            Some(conn) => conn.close().await,
            None => Ok(()),
        }
    }

    /// Refreshes the token if it is stale, then makes one connection attempt. Cancel-safe: the
    /// refresh and the attempt in progress are kept in the session.
    async fn connect(&mut self) -> Event {
        if self.connecting.is_none() {
            if let Some(at) = self.reconnect_at {
                sleep_until(at).await;
            }
            if self.token_stale
                && let Some(source) = self.token_source.as_mut()
            {
                let refreshing = self.refreshing.get_or_insert_with(source);
                let refreshed = refreshing.as_mut().await;
                self.refreshing = None;
                match refreshed {
                    Ok(token) => {
                        self.token = Some(token);
                        self.token_stale = false;
                    }
                    Err(error) => {
                        let retry_in = self.back_off();
                        return Event::TokenRefreshFailed { error, retry_in };
                    }
                }
            }
            let url = (self.urls)(self.attempts);
            self.attempts += 1;
            let (target, token, timeout) = (url.clone(), self.token.clone(), self.connect_timeout);
            let attempt = async move {
                tokio::time::timeout(
                    timeout,
                    Client::connect_with_token(&target, token.as_deref()),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(ClientError::Timeout(
                        timeout,
                        "the WebSocket handshake".into(),
                    ))
                })
            };
            self.connecting = Some((url, Box::pin(attempt)));
        }
        let (_, attempt) = self.connecting.as_mut().expect("set above");
        let result = attempt.as_mut().await;
        let (url, _) = self.connecting.take().expect("set above");
        match result {
            Ok(client) => {
                self.connected(client, url.clone());
                Event::Connected { url }
            }
            Err(error) => {
                if self.token_source.is_some() && is_unauthorized(&error) {
                    self.token_stale = true;
                }
                let retry_in = self.back_off();
                Event::ConnectFailed {
                    url,
                    error,
                    retry_in,
                }
            }
        }
    }

    /// One more failure in a row: the next attempt waits for the backoff, which it returns.
    fn back_off(&mut self) -> Duration {
        self.failures += 1;
        let delay = self.delay(self.failures);
        self.reconnect_at = Some(Instant::now() + delay);
        delay
    }

    fn delay(&mut self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(16);
        let full = self
            .backoff
            .base
            .saturating_mul(1 << exp)
            .min(self.backoff.cap);
        // xorshift64: jitter only, not security.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let unit = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        full.mul_f64(0.5 + unit / 2.0)
    }

    fn connected(&mut self, client: Client, url: String) {
        self.conn = Some(client);
        self.url = Some(url);
        self.stats.connections += 1;
        self.reconnect_at = None;
        self.waiting_since = Instant::now();
        self.outgoing.clear();
        self.leaves.clear();
        self.joining = None;
        self.join_retry_at = None;
        self.join_failures = 0;
        self.join_queue.clear();
        let mut wanted = Vec::new();
        for (room, state) in &mut self.rooms {
            state.joined = false;
            state.leaving = false;
            state.resyncing = false;
            if state.wanted {
                wanted.push((state.order, room.clone()));
            }
        }
        if wanted.is_empty() {
            // Nothing to join that would prove the connection healthy: it is.
            self.failures = 0;
        }
        // In the order they were first joined.
        wanted.sort();
        self.join_queue
            .extend(wanted.into_iter().map(|(_, room)| room));
        for send in &mut self.pending {
            send.sent = false;
            send.retry_at = None;
        }
        for request in &mut self.histories {
            request.sent = false;
            request.retry_at = None;
        }
    }

    /// The connection is gone (dropped, or closed with a resume code): forget what lived on it.
    fn disconnected(&mut self) {
        self.conn = None;
        self.outgoing.clear();
        // Leaves in flight are done, and so is a leave waiting for the join in flight: the
        // connection that had the rooms is gone.
        let joining = self.joining.take().map(|j| j.room);
        let mut left = Vec::new();
        for room in self.leaves.drain(..).chain(joining) {
            if !self.rooms.get(&room).is_some_and(|s| s.wanted) && !left.contains(&room) {
                left.push(room);
            }
        }
        self.ready
            .extend(left.into_iter().map(|room| Event::Left { room }));
        for state in self.rooms.values_mut() {
            state.joined = false;
            state.leaving = false;
            state.resyncing = false;
        }
        self.back_off();
    }

    /// The connection ended without a stop: the event that says so.
    fn lost(&mut self, code: Option<u16>, reason: String) -> Event {
        self.disconnected();
        Event::Disconnected {
            code,
            reason,
            retry_in: self
                .reconnect_at
                .map_or(Duration::ZERO, |at| at - Instant::now().min(at)),
        }
    }

    fn on_close(&mut self, code: u16, reason: String) -> Result<Event, ClientError> {
        if code >= close::PROTOCOL_VIOLATION {
            self.disconnected();
            let stop = Stop::Closed { code, reason };
            self.stopped = Some(stop.clone());
            return Err(stop.error());
        }
        if code == close::TOKEN_EXPIRED {
            if self.token_source.is_none() {
                self.disconnected();
                self.stopped = Some(Stop::TokenExpired);
                return Err(ClientError::TokenExpired);
            }
            self.token_stale = true;
        }
        // Resume codes, and any other close (a proxy's 1001, say): reconnect and resume.
        Ok(self.lost(Some(code), reason))
    }

    fn silence_reason(&self) -> String {
        format!(
            "nothing heard for {:?} while a request waited",
            self.request_timeout
        )
    }

    /// When the silence on this connection becomes too long, counted from the later of the last
    /// thing heard and the moment the session started waiting.
    fn silence_deadline(&self) -> Instant {
        let heard = self
            .conn
            .as_ref()
            .map_or(self.waiting_since, |c| c.last_heard);
        heard.max(self.waiting_since) + self.request_timeout
    }

    /// Whether a request has waited with nothing heard for the whole request timeout.
    fn silent_too_long(&self) -> bool {
        self.awaiting_answer() && self.silence_deadline() <= Instant::now()
    }

    /// Makes sure the silence timer fires no later than the silence deadline. It is kept across
    /// frames and may fire early (the deadline moves on with every frame heard): the wake-up
    /// then checks and sets it again, once per request timeout at most, not once per frame.
    fn arm_silence_timer(&mut self) {
        let deadline = self.silence_deadline();
        match &mut self.silence_timer {
            Some(timer) if timer.deadline() <= deadline && !timer.is_elapsed() => {}
            Some(timer) => timer.as_mut().reset(deadline),
            None => self.silence_timer = Some(Box::pin(sleep_until(deadline))),
        }
    }

    /// Whether a join, leave or send on this connection waits for its answer.
    fn awaiting_answer(&self) -> bool {
        self.joining.is_some()
            || !self.leaves.is_empty()
            || self.pending.iter().any(|p| p.sent)
            || self.histories.iter().any(|h| h.sent)
    }

    /// Call before making a request: the silence that counts starts when waiting starts.
    fn start_waiting(&mut self) {
        if !self.awaiting_answer() {
            self.waiting_since = Instant::now();
        }
    }

    fn enqueue_join(&mut self, room: RoomId) {
        let joining = self.joining.as_ref().is_some_and(|j| j.room == room);
        if !joining && !self.join_queue.contains(&room) {
            self.join_queue.push_back(room);
        }
    }

    fn send_leave(&mut self, room: &RoomId) {
        self.start_waiting();
        let state = self.rooms.get_mut(room).expect("known room");
        state.joined = false;
        state.leaving = true;
        self.leaves.push_back(room.clone());
        self.outgoing
            .push_back(frame_json(&ClientFrame::Leave { room: room.clone() }));
    }

    /// Decides what to send now: the next join (one in flight at a time, never for a room whose
    /// leave is unanswered), and the sends whose room is joined.
    fn plan(&mut self) {
        if self.conn.is_none() {
            return;
        }
        self.start_waiting();
        let now = Instant::now();
        if self.joining.is_none() && self.join_retry_at.is_none_or(|at| at <= now) {
            self.join_retry_at = None;
            let next = self
                .join_queue
                .iter()
                .position(|room| !self.rooms.get(room).is_some_and(|s| s.leaving));
            if let Some(room) = next.and_then(|i| self.join_queue.remove(i)) {
                let state = &self.rooms[&room];
                let since = state.position.or(state.requested);
                self.outgoing.push_back(frame_json(&ClientFrame::Join {
                    room: room.clone(),
                    since,
                }));
                self.joining = Some(Joining { room, since });
            }
        }
        for send in &mut self.pending {
            let joined = self.rooms.get(&send.room).is_some_and(|s| s.joined);
            if !send.sent && joined && send.retry_at.is_none_or(|at| at <= now) {
                if send.ever_sent {
                    self.stats.send_retries += 1;
                }
                send.sent = true;
                send.ever_sent = true;
                send.retry_at = None;
                self.outgoing.push_back(frame_json(&ClientFrame::Send {
                    room: send.room.clone(),
                    id: send.id.clone(),
                    body: send.body.clone(),
                }));
            }
        }
        for request in &mut self.histories {
            if !request.sent && request.retry_at.is_none_or(|at| at <= now) {
                request.sent = true;
                request.retry_at = None;
                self.outgoing.push_back(frame_json(&ClientFrame::History {
                    room: request.room.clone(),
                    id: request.id.clone(),
                    before: request.before,
                    limit: request.limit,
                }));
            }
        }
    }

    /// The next instant a retry (of a join or a send) is due, if any waits.
    fn next_retry(&self) -> Option<Instant> {
        let join = self
            .join_retry_at
            .filter(|_| self.joining.is_none() && !self.join_queue.is_empty());
        let sends = self
            .pending
            .iter()
            .filter(|p| !p.sent)
            .filter_map(|p| p.retry_at)
            .min();
        let histories = self
            .histories
            .iter()
            .filter(|h| !h.sent)
            .filter_map(|h| h.retry_at)
            .min();
        join.into_iter().chain(sends).chain(histories).min()
    }

    /// Plans, then writes the outgoing frames (see [`write_frames`]).
    async fn write_out(&mut self) -> Result<(), ClientError> {
        self.plan();
        match self.conn.as_mut() {
            Some(conn) => write_frames(&mut conn.socket, &mut self.outgoing).await,
            None => Ok(()),
        }
    }

    /// Updates the state for a frame; the event to report, if the app should see one.
    fn on_frame(&mut self, frame: ServerFrame) -> Option<Event> {
        match frame {
            ServerFrame::Message(m) => self.on_message(m),
            ServerFrame::Joined { room, seq } => self.on_joined(room, seq),
            ServerFrame::Left { room } => self.on_left(room),
            ServerFrame::Ack { id, room, seq } => {
                let Some(index) = self.pending.iter().position(|p| p.id == id) else {
                    self.stats.stray_acks += 1;
                    return None;
                };
                self.pending.remove(index);
                Some(Event::Acked { id, room, seq })
            }
            ServerFrame::History { id, room, messages } => {
                // Not waited for: answered already (a duplicate frame).
                let index = self.histories.iter().position(|h| h.id == id)?;
                self.histories.remove(index);
                Some(Event::History { id, room, messages })
            }
            ServerFrame::Error {
                code,
                message,
                reference: Some(reference),
                ..
            } if self.histories.iter().any(|h| h.id.as_str() == reference) => {
                self.on_history_error(code, message, &reference)
            }
            ServerFrame::Error {
                code,
                message,
                reference: Some(reference),
                room,
            } => self.on_send_error(code, message, reference, room),
            ServerFrame::Error {
                code,
                message,
                reference: None,
                room,
            } => self.on_request_error(code, message, room),
        }
    }

    fn on_message(&mut self, m: MessageEvent) -> Option<Event> {
        let joining = self.joining.as_ref().filter(|j| j.room == m.room);
        let Some(state) = self.rooms.get_mut(&m.room) else {
            self.stats.unknown_room_messages += 1;
            return None;
        };
        // Left, or leaving for good, on this connection: what is still in flight is not the
        // app's. (A re-join in place leaves first; until its `left`, messages still count.)
        let rejoining = state.leaving && state.wanted;
        if !state.joined && !rejoining && joining.is_none() {
            return None;
        }
        let expected = state.position.or(joining.and_then(|j| j.since));
        if let Some(expected) = expected {
            if m.seq <= expected {
                self.stats.duplicates_dropped += 1;
                return None;
            }
            if m.seq != expected.next() {
                // A hole: never deliver out of order. Re-join from the position (the gateway
                // starts the room over and replays the hole); what is in flight meanwhile is
                // dropped here as duplicates or as part of the same hole.
                if !state.resyncing {
                    self.stats.gaps_resynced += 1;
                    state.resyncing = true;
                    if joining.is_none() {
                        let room = m.room;
                        self.join_queue.retain(|r| *r != room);
                        self.join_queue.push_front(room);
                    }
                }
                return None;
            }
        }
        state.position = Some(m.seq);
        Some(Event::Message(m))
    }

    fn on_joined(&mut self, room: RoomId, seq: Seq) -> Option<Event> {
        // Joins are answered in order, one in flight: a `joined` for another room answers
        // nothing (a duplicate).
        let joining = self.joining.take_if(|j| j.room == room)?;
        self.join_failures = 0;
        self.failures = 0;
        let state = self.rooms.get_mut(&room)?;
        state.position = state.position.max(Some(seq));
        state.resyncing = false;
        state.joined = true;
        if !state.wanted {
            // Left while the join was in flight.
            self.send_leave(&room);
            return None;
        }
        Some(Event::Joined {
            seq: state.position.unwrap_or(seq),
            room,
            resumed: joining.since.is_some(),
        })
    }

    fn on_left(&mut self, room: RoomId) -> Option<Event> {
        // Leaves are answered in order: a `left` for another room answers nothing (a duplicate).
        if self.leaves.front() != Some(&room) {
            return None;
        }
        self.leaves.pop_front();
        let state = self.rooms.get_mut(&room)?;
        state.leaving = false;
        state.joined = false;
        // A re-join in place leaves first: only a leave the app asked for is reported.
        (!state.wanted).then_some(Event::Left { room })
    }

    fn on_send_error(
        &mut self,
        code: ErrorCode,
        message: String,
        reference: String,
        room: Option<RoomId>,
    ) -> Option<Event> {
        let Some(index) = self.pending.iter().position(|p| p.id.as_str() == reference) else {
            // Not a send of this session's: tell the app.
            return Some(Event::Error {
                code,
                message,
                room,
            });
        };
        if !self.pending[index].sent {
            // Answered already on this connection (a duplicate frame).
            return None;
        }
        match code {
            ErrorCode::Unavailable | ErrorCode::RateLimited => {
                let failures = self.pending[index].failures + 1;
                let at = Instant::now() + self.delay(failures);
                let send = &mut self.pending[index];
                send.failures = failures;
                send.sent = false;
                send.retry_at = Some(at);
                Some(Event::Retrying {
                    code,
                    message,
                    room: Some(send.room.clone()),
                    id: Some(send.id.clone()),
                })
            }
            // The gateway does not have the room on this connection: re-join it, then send
            // again.
            ErrorCode::NotJoined => {
                let send = &mut self.pending[index];
                send.sent = false;
                let (room, id) = (send.room.clone(), send.id.clone());
                if let Some(state) = self.rooms.get_mut(&room)
                    && state.joined
                {
                    state.joined = false;
                    self.enqueue_join(room.clone());
                }
                Some(Event::Retrying {
                    code,
                    message,
                    room: Some(room),
                    id: Some(id),
                })
            }
            // Refused for good.
            _ => {
                let send = self.pending.remove(index).expect("index found above");
                Some(Event::SendFailed {
                    id: send.id,
                    room: send.room,
                    code,
                    message,
                })
            }
        }
    }

    fn on_history_error(&mut self, code: ErrorCode, message: String, id: &str) -> Option<Event> {
        let index = self.histories.iter().position(|h| h.id.as_str() == id)?;
        if !self.histories[index].sent {
            return None;
        }
        if matches!(code, ErrorCode::Unavailable | ErrorCode::RateLimited) {
            let failures = self.histories[index].failures + 1;
            let at = Instant::now() + self.delay(failures);
            let request = &mut self.histories[index];
            request.failures = failures;
            request.sent = false;
            request.retry_at = Some(at);
            return Some(Event::Retrying {
                code,
                message,
                room: Some(request.room.clone()),
                id: Some(request.id.clone()),
            });
        }
        let request = self.histories.remove(index).expect("index found above");
        Some(Event::HistoryFailed {
            id: request.id,
            room: request.room,
            code,
            message,
        })
    }

    /// An error without a send id answers the join in flight (a failed join names its room),
    /// or a leave of a room the gateway did not have (answers come in the order the requests
    /// were sent).
    fn on_request_error(
        &mut self,
        code: ErrorCode,
        message: String,
        named: Option<RoomId>,
    ) -> Option<Event> {
        if code == ErrorCode::NotJoined
            && let Some(room) = self.leaves.pop_front()
        {
            if let Some(state) = self.rooms.get_mut(&room) {
                state.leaving = false;
                if !state.wanted {
                    return Some(Event::Left { room });
                }
            }
            return None;
        }
        let answers_join = match (&self.joining, &named) {
            (Some(joining), Some(named)) => joining.room == *named,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !answers_join {
            return Some(Event::Error {
                code,
                message,
                room: named,
            });
        }
        let Joining { room, since } = self.joining.take().expect("checked above");
        let state = self.rooms.get_mut(&room)?;
        state.resyncing = false;
        if !state.wanted {
            // Left while the join was in flight, and the join was refused: nothing to leave.
            return Some(Event::Left { room });
        }
        match code {
            ErrorCode::Unavailable | ErrorCode::RateLimited => {
                let wanted = state.wanted;
                self.join_failures += 1;
                self.join_retry_at = Some(Instant::now() + self.delay(self.join_failures));
                if wanted {
                    self.join_queue.push_front(room.clone());
                }
                Some(Event::Retrying {
                    code,
                    message,
                    room: Some(room),
                    id: None,
                })
            }
            // The store no longer holds everything after `since`: nothing was replayed. As the
            // README says, the app tells the user (the message names the oldest seq kept) and
            // the session joins again without `since`: live from now on.
            ErrorCode::HistoryExpired => {
                state.position = None;
                state.requested = None;
                if state.wanted {
                    self.join_queue.push_front(room.clone());
                }
                Some(Event::HistoryExpired {
                    room,
                    since: since.unwrap_or(Seq(0)),
                    message,
                })
            }
            // Forbidden, a room limit, or a code this client does not know: the join is not
            // retried, and sends waiting for the room are given up.
            _ => {
                state.wanted = false;
                let mut dropped_sends = Vec::new();
                self.pending.retain(|p| {
                    let keep = p.room != room;
                    if !keep {
                        dropped_sends.push(p.id.clone());
                    }
                    keep
                });
                Some(Event::JoinFailed {
                    room,
                    code,
                    message,
                    dropped_sends,
                })
            }
        }
    }
}

/// Writes `outgoing` to the socket. A frame leaves the queue in the same step as the socket takes
/// it (`start_send`), so a cancelled write loses and repeats nothing.
async fn write_frames(
    socket: &mut WebSocketStream<MaybeTlsStream<TcpStream>>,
    outgoing: &mut VecDeque<String>,
) -> Result<(), ClientError> {
    if outgoing.is_empty() {
        return Ok(());
    }
    while let Some(frame) = outgoing.front() {
        poll_fn(|cx| Pin::new(&mut *socket).poll_ready(cx)).await?;
        Pin::new(&mut *socket).start_send(Message::text(frame.clone()))?;
        outgoing.pop_front();
    }
    poll_fn(|cx| Pin::new(&mut *socket).poll_flush(cx)).await?;
    Ok(())
}

/// What woke a session waiting on its connection.
enum Wake {
    Received(Result<Received, ClientError>),
    Retry,
    Silence,
}

/// Whether a handshake was refused with HTTP 401 (the gateway's answer to a bad or expired token).
fn is_unauthorized(error: &ClientError) -> bool {
    matches!(error, ClientError::WebSocket(tungstenite::Error::Http(response)) if response.status() == 401)
}

fn frame_json(frame: &ClientFrame) -> String {
    serde_json::to_string(frame).expect("client frames always serialize")
}
