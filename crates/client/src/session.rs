//! [`Session`]: a client that stays in its rooms across reconnects, as the README's client
//! contract asks, and loses nothing doing so.
//!
//! - **Position per room.** The session's position in a room is the highest of the last message
//!   seq it received there and the seq of the latest `joined` (which says where the client is
//!   after a replay, or the room's head for a plain join). A room joined without a message yet
//!   still has a position: the `joined` seq.
//! - **Reconnect and resume.** After a close with a resume code (4000–4499) or a dropped socket,
//!   the next [`Session::next_event`] reconnects after a short randomized backoff (the next URL)
//!   and re-joins every room with `since` = its position. A room never joined (no `joined` yet)
//!   is joined as the user asked: plain (live messages from now on) or with the `since` the user
//!   gave for history. So a message sent while the client was away is received once, and nothing
//!   already received is replayed.
//! - **When history has expired** (`history_expired` answers a join with `since`), the session
//!   passes the error on (it names what was lost) and joins the room again without `since`.
//! - **Sends until acked.** A send is kept until its `ack` arrives; after a reconnect it is sent
//!   again, with the same id, once its room is joined on the new connection (the writer stores a
//!   retried id once). An `unavailable` or `rate_limited` answer retries it after a backoff.
//! - **One request at a time per room.** Joins go out one at a time (each answered by `joined`
//!   or an error, in order; after a reconnect, in the order the rooms were first joined), and a
//!   room is re-joined on the same connection only after its `left`: a re-join with `since` while
//!   earlier messages are still in flight would get them twice.
//!
//! The session never drops, reorders or de-duplicates frames: [`Event::Frame`] is exactly what
//! the gateway sent, so tests and the chaos run can check the gateway's promise through it.
//!
//! Every method is synchronous except [`Session::next_event`], [`Session::flush`] and
//! [`Session::close`]; the first two are cancel-safe (a frame is taken off the session's outgoing
//! queue only in the same step as it is handed to the socket), so `next_event` can sit in a
//! `select!` with stdin.

use std::collections::{BTreeMap, VecDeque};
use std::future::poll_fn;
use std::pin::Pin;
use std::time::Duration;

use chorus_protocol::{Body, ClientFrame, ClientMsgId, ErrorCode, RoomId, Seq, ServerFrame, close};
use futures_util::Sink;
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::tungstenite::Message;

use crate::{Client, ClientError, Received};

/// Most sends awaiting their ack at once; [`Session::send`] refuses more.
pub const MAX_PENDING_SENDS: usize = 256;

/// What [`Session::next_event`] reports.
#[derive(Debug)]
pub enum Event {
    /// A new connection is up; the session re-joins its rooms on it.
    Connected { url: String },
    /// A frame from the gateway, exactly as received.
    Frame(ServerFrame),
    /// The connection ended: closed with a resume code (`code`), or dropped (`None`). The next
    /// call reconnects.
    Disconnected { code: Option<u16>, reason: String },
    /// A connection attempt failed; the next call tries the next URL after a backoff.
    ConnectFailed { url: String, error: ClientError },
}

/// Backoff between reconnects and retries: `base · 2^(failures-1)`, at most `cap`, times a
/// random factor in [0.5, 1) so clients of a drained gateway do not come back in step.
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

#[derive(Debug, Default)]
struct RoomState {
    /// max(last message seq, latest `joined` seq); `None` until the first `joined`.
    position: Option<Seq>,
    /// `since` the user asked for (history), used until the room has a position.
    requested: Option<Seq>,
    /// The user wants to be in the room: it is (re-)joined on every connection.
    wanted: bool,
    /// Joined on the current connection (its `joined` arrived, no `leave` sent since).
    joined: bool,
    /// A `leave` was sent on this connection and its answer has not arrived.
    leaving: bool,
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
    /// Not before this instant (after `unavailable` or `rate_limited`).
    retry_at: Option<Instant>,
    failures: u32,
}

/// Where the session connects: the URL for the n-th attempt.
type UrlSource = Box<dyn FnMut(usize) -> String + Send>;

/// A client that keeps its rooms and unacked sends across connections. See the module docs.
pub struct Session {
    urls: UrlSource,
    token: Option<String>,
    conn: Option<Client>,
    attempts: usize,
    /// Consecutive connections that failed or ended before a room was joined (backoff).
    failures: u32,
    reconnect_at: Option<Instant>,
    backoff: Backoff,
    rooms: BTreeMap<RoomId, RoomState>,
    /// Rooms to join on this connection, in order; one join is in flight at a time.
    join_queue: VecDeque<RoomId>,
    joining: Option<RoomId>,
    join_failures: u32,
    join_retry_at: Option<Instant>,
    /// Rooms whose `leave` is in flight, in the order sent (answers come in that order).
    leaves: VecDeque<RoomId>,
    pending: VecDeque<PendingSend>,
    /// Frames decided but not yet handed to the socket.
    outgoing: VecDeque<String>,
    /// Rooms ever joined (gives each its `order`).
    rooms_joined: u64,
    next_id: u64,
    id_prefix: String,
    rng: u64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("connected", &self.conn.is_some())
            .field("attempts", &self.attempts)
            .field("rooms", &self.rooms)
            .field("joining", &self.joining)
            .field("pending", &self.pending.len())
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
            conn: None,
            attempts: 0,
            failures: 0,
            reconnect_at: None,
            backoff: Backoff::default(),
            rooms: BTreeMap::new(),
            join_queue: VecDeque::new(),
            joining: None,
            join_failures: 0,
            join_retry_at: None,
            leaves: VecDeque::new(),
            pending: VecDeque::new(),
            outgoing: VecDeque::new(),
            rooms_joined: 0,
            next_id: 0,
            id_prefix: seed.simple().to_string()[..12].to_owned(),
            rng: (seed.as_u128() as u64) | 1,
        }
    }

    /// Replaces the backoff between reconnects and retries.
    pub fn set_backoff(&mut self, backoff: Backoff) {
        self.backoff = backoff;
    }

    /// Prefix of the ids [`Session::send`] makes (`<prefix>-1`, `<prefix>-2`, …); it must be
    /// unique to this client (the default is random).
    ///
    /// # Errors
    /// When the ids it would make are not valid client message ids.
    pub fn set_id_prefix(&mut self, prefix: &str) -> Result<(), ClientError> {
        ClientMsgId::parse(format!("{prefix}-{}", u64::MAX)).map_err(invalid)?;
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
        let joined = state.joined;
        if joined {
            self.send_leave(&room);
        }
        if self.joining.as_ref() != Some(&room) && !self.join_queue.contains(&room) {
            self.join_queue.push_back(room);
        }
    }

    /// Leave `room` (its position is kept: a later [`Session::join`] resumes from it).
    pub fn leave(&mut self, room: &RoomId) {
        let Some(state) = self.rooms.get_mut(room) else {
            return;
        };
        state.wanted = false;
        let joined = state.joined;
        self.join_queue.retain(|r| r != room);
        if joined {
            self.send_leave(room);
        }
        // A join in flight is answered first; its `joined` then sends the leave.
    }

    /// Sends `body` to `room` (joined, or being joined) with a fresh id, which it returns. The
    /// send goes out when the room is joined on the connection, and again after every reconnect
    /// until it is acked.
    ///
    /// # Errors
    /// When the body is invalid, the room was not joined, or [`MAX_PENDING_SENDS`] sends await
    /// their ack.
    pub fn send(&mut self, room: &RoomId, body: &str) -> Result<ClientMsgId, ClientError> {
        self.next_id += 1;
        let id =
            ClientMsgId::parse(format!("{}-{}", self.id_prefix, self.next_id)).map_err(invalid)?;
        self.send_with_id(room, id.clone(), body)?;
        Ok(id)
    }

    /// As [`Session::send`], with the caller's id (to retry a send made before a restart).
    ///
    /// # Errors
    /// As [`Session::send`].
    pub fn send_with_id(
        &mut self,
        room: &RoomId,
        id: ClientMsgId,
        body: &str,
    ) -> Result<(), ClientError> {
        let body = Body::parse(body).map_err(invalid)?;
        if !self.rooms.get(room).is_some_and(|s| s.wanted) {
            return Err(ClientError::Unexpected(format!(
                "join {room} before sending to it"
            )));
        }
        if self.pending.len() >= MAX_PENDING_SENDS {
            return Err(ClientError::Unexpected(format!(
                "{MAX_PENDING_SENDS} sends are waiting for their ack: wait before sending more"
            )));
        }
        self.pending.push_back(PendingSend {
            id,
            room: room.clone(),
            body,
            sent: false,
            retry_at: None,
            failures: 0,
        });
        Ok(())
    }

    /// The session's position in `room`: max(last message seq, latest `joined` seq).
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

    /// Drops the connection at once, without a close frame (as a network failure would); the
    /// next [`Session::next_event`] reconnects without a backoff.
    pub fn drop_connection(&mut self) {
        self.disconnected();
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
    /// Only when the gateway closed the connection with a code that says not to reconnect
    /// (outside 4000–4499), as [`ClientError::Closed`]. Failed connection attempts and dropped
    /// connections are events: the caller decides when to give up.
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        loop {
            if self.conn.is_none() {
                if let Some(at) = self.reconnect_at {
                    sleep_until(at).await;
                }
                let url = (self.urls)(self.attempts);
                self.attempts += 1;
                return match Client::connect_with_token(&url, self.token.as_deref()).await {
                    Ok(client) => {
                        self.connected(client);
                        Ok(Event::Connected { url })
                    }
                    Err(error) => {
                        self.failures += 1;
                        self.reconnect_at = Some(Instant::now() + self.delay(self.failures));
                        Ok(Event::ConnectFailed { url, error })
                    }
                };
            }
            if let Err(e) = self.write_out().await {
                self.disconnected();
                return Ok(Event::Disconnected {
                    code: None,
                    reason: e.to_string(),
                });
            }
            let wake = self.next_retry();
            let conn = self.conn.as_mut().expect("connected");
            let received = tokio::select! {
                received = conn.recv() => received,
                () = sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => continue,
            };
            return match received {
                Ok(Received::Frame(frame)) => {
                    self.on_frame(&frame);
                    Ok(Event::Frame(frame))
                }
                Ok(Received::Closed { code, reason }) if close::should_resume(code) => {
                    self.disconnected();
                    Ok(Event::Disconnected {
                        code: Some(code),
                        reason,
                    })
                }
                Ok(Received::Closed { code, reason }) => {
                    self.conn = None;
                    Err(ClientError::Closed { code, reason })
                }
                Err(e) => {
                    self.disconnected();
                    Ok(Event::Disconnected {
                        code: None,
                        reason: e.to_string(),
                    })
                }
            };
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

    fn connected(&mut self, client: Client) {
        self.conn = Some(client);
        self.reconnect_at = None;
        self.outgoing.clear();
        self.leaves.clear();
        self.joining = None;
        self.join_retry_at = None;
        self.join_queue.clear();
        let mut wanted = Vec::new();
        for (room, state) in &mut self.rooms {
            state.joined = false;
            state.leaving = false;
            if state.wanted {
                wanted.push((state.order, room.clone()));
            }
        }
        // In the order they were first joined.
        wanted.sort();
        self.join_queue
            .extend(wanted.into_iter().map(|(_, room)| room));
        for send in &mut self.pending {
            send.sent = false;
            send.retry_at = None;
        }
    }

    fn disconnected(&mut self) {
        self.conn = None;
        self.outgoing.clear();
        self.failures += 1;
        self.reconnect_at = Some(Instant::now() + self.delay(self.failures));
    }

    fn send_leave(&mut self, room: &RoomId) {
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
                self.joining = Some(room);
            }
        }
        for send in &mut self.pending {
            let joined = self.rooms.get(&send.room).is_some_and(|s| s.joined);
            if !send.sent && joined && send.retry_at.is_none_or(|at| at <= now) {
                send.sent = true;
                send.retry_at = None;
                self.outgoing.push_back(frame_json(&ClientFrame::Send {
                    room: send.room.clone(),
                    id: send.id.clone(),
                    body: send.body.clone(),
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
        join.into_iter().chain(sends).min()
    }

    /// Plans, then writes the outgoing frames. A frame leaves the queue in the same step as the
    /// socket takes it (`start_send`), so a cancelled write loses and repeats nothing.
    async fn write_out(&mut self) -> Result<(), ClientError> {
        self.plan();
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        if self.outgoing.is_empty() {
            return Ok(());
        }
        let socket = &mut conn.socket;
        while let Some(frame) = self.outgoing.front() {
            poll_fn(|cx| Pin::new(&mut *socket).poll_ready(cx)).await?;
            Pin::new(&mut *socket).start_send(Message::text(frame.clone()))?;
            self.outgoing.pop_front();
        }
        poll_fn(|cx| Pin::new(&mut *socket).poll_flush(cx)).await?;
        Ok(())
    }

    fn on_frame(&mut self, frame: &ServerFrame) {
        match frame {
            ServerFrame::Message(m) => {
                if let Some(state) = self.rooms.get_mut(&m.room) {
                    state.position = state.position.max(Some(m.seq));
                }
            }
            ServerFrame::Joined { room, seq } => {
                if self.joining.as_ref() == Some(room) {
                    self.joining = None;
                    self.join_failures = 0;
                    self.failures = 0;
                }
                let Some(state) = self.rooms.get_mut(room) else {
                    return;
                };
                state.position = state.position.max(Some(*seq));
                state.joined = true;
                if !state.wanted {
                    self.send_leave(room);
                }
            }
            ServerFrame::Left { room } => {
                if self.leaves.front() == Some(room) {
                    self.leaves.pop_front();
                }
                if let Some(state) = self.rooms.get_mut(room) {
                    state.leaving = false;
                    state.joined = false;
                }
            }
            ServerFrame::Ack { id, .. } => self.pending.retain(|p| p.id != *id),
            ServerFrame::Error {
                code,
                reference: Some(reference),
                ..
            } => self.on_send_error(*code, reference),
            ServerFrame::Error {
                code,
                reference: None,
                room,
                ..
            } => self.on_request_error(*code, room.as_ref()),
        }
    }

    fn on_send_error(&mut self, code: ErrorCode, reference: &str) {
        let Some(index) = self.pending.iter().position(|p| p.id.as_str() == reference) else {
            return;
        };
        match code {
            ErrorCode::Unavailable | ErrorCode::RateLimited => {
                let failures = self.pending[index].failures + 1;
                let at = Instant::now() + self.delay(failures);
                let send = &mut self.pending[index];
                send.failures = failures;
                send.sent = false;
                send.retry_at = Some(at);
            }
            // The room's join on this connection failed or is not answered yet: sent again
            // once it is joined.
            ErrorCode::NotJoined => self.pending[index].sent = false,
            // Refused for good (the frame error says why): the caller sees the frame.
            _ => {
                self.pending.remove(index);
            }
        }
    }

    /// An error without a send id answers the join in flight (a failed join names its room),
    /// or a leave of a room the gateway did not have (answers come in the order the requests
    /// were sent).
    fn on_request_error(&mut self, code: ErrorCode, named: Option<&RoomId>) {
        if code == ErrorCode::NotJoined {
            if let Some(room) = self.leaves.pop_front()
                && let Some(state) = self.rooms.get_mut(&room)
            {
                state.leaving = false;
            }
            return;
        }
        if named.is_some_and(|named| self.joining.as_ref() != Some(named)) {
            return;
        }
        let Some(room) = self.joining.take() else {
            return;
        };
        match code {
            ErrorCode::Unavailable | ErrorCode::RateLimited => {
                self.join_failures += 1;
                self.join_retry_at = Some(Instant::now() + self.delay(self.join_failures));
                self.join_queue.push_front(room);
            }
            // The store no longer holds everything after `since`: nothing was replayed. As the
            // README says, the caller tells the user (it sees the frame, which names the oldest
            // seq kept) and the session joins again without `since`: live from now on.
            ErrorCode::HistoryExpired => {
                if let Some(state) = self.rooms.get_mut(&room) {
                    state.position = None;
                    state.requested = None;
                }
                self.join_queue.push_front(room);
            }
            // Forbidden, a room limit, or a code this client does not know: the join is not
            // retried; the caller sees the error frame.
            _ => {
                if let Some(state) = self.rooms.get_mut(&room) {
                    state.wanted = false;
                }
            }
        }
    }
}

fn frame_json(frame: &ClientFrame) -> String {
    serde_json::to_string(frame).expect("client frames always serialize")
}

fn invalid(e: chorus_protocol::InvalidValue) -> ClientError {
    ClientError::Unexpected(e.to_string())
}
