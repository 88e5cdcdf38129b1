//! A scripted stand-in for a gateway, enough to test what a client does across reconnects: it
//! keeps a log per room, replays after `since`, acks sends (storing a retried id once), fans out
//! live messages, and lets the test close or drop connections, store messages "from someone
//! else" at chosen moments (or store them without sending them: a lost notification), send every
//! frame twice, go silent, and refuse tokens. It records every frame clients send and the token
//! each connection offered. Used by chorus-client's tests and chorus-chat's.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chorus_protocol::{
    Body, ClientFrame, ClientMsgId, MessageEvent, RoomId, Seq, ServerFrame, UserId,
};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// How long the tests wait for a frame, and [`FakeGateway::wait_received`] for anything to
/// happen.
pub const WAIT: Duration = Duration::from_secs(10);

/// What the fake does with a client's `send`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendPolicy {
    /// Store, ack, fan out.
    Ack,
    /// Store, then drop the connection before the ack (the ack is lost on the way).
    StoreThenDrop,
    /// Answer `unavailable` (nothing stored), then go back to `Ack`.
    UnavailableOnce,
}

enum Out {
    Frame(ServerFrame),
    Close(u16),
    Drop,
    /// From now on nothing goes out and nothing coming in is read (a network that went silent
    /// without closing anything).
    Silence,
}

#[derive(Default)]
struct State {
    rooms: HashMap<RoomId, Vec<MessageEvent>>,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    /// Every frame received, with the connection number.
    received: Vec<(u64, ClientFrame)>,
    send_policy: Option<SendPolicy>,
    /// Joins are left unanswered (the connection is then dropped by the test).
    hold_joins: bool,
    /// Messages up to this seq are no longer stored: a join with an older `since` gets
    /// `history_expired`.
    expired_up_to: u64,
    /// Every frame goes out twice.
    duplicate_frames: bool,
    /// The token (`bearer.<token>` subprotocol) each connection offered, in accept order.
    tokens: Vec<Option<String>>,
    /// Handshakes offering one of these tokens are refused with 401.
    refused_tokens: HashSet<String>,
}

struct Conn {
    out: mpsc::UnboundedSender<Out>,
    rooms: BTreeSet<RoomId>,
}

/// The running fake gateway.
#[derive(Clone)]
pub struct FakeGateway {
    pub url: String,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
}

fn event(room: &RoomId, seq: u64, id: &str, sender: &str, body: &str) -> MessageEvent {
    MessageEvent {
        room: room.clone(),
        seq: Seq(seq),
        id: ClientMsgId::parse(id).unwrap(),
        sender: UserId::parse(sender).unwrap(),
        body: Body::parse(body).unwrap(),
        ts: "2026-11-29T10:00:00.000Z".into(),
    }
}

impl FakeGateway {
    pub async fn start() -> FakeGateway {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        let fake = FakeGateway {
            url,
            state: Arc::default(),
            changed: Arc::default(),
        };
        let accepting = fake.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let fake = accepting.clone();
                tokio::spawn(async move { fake.serve(stream).await });
            }
        });
        fake
    }

    async fn serve(self, stream: tokio::net::TcpStream) {
        let mut offered = None;
        let refused = self.state.lock().unwrap().refused_tokens.clone();
        #[allow(clippy::result_large_err)] // The callback's signature is tungstenite's.
        let handshake = |request: &Request, mut response: Response| {
            let protocols = request
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            offered = protocols
                .split(',')
                .find_map(|p| p.trim().strip_prefix("bearer."))
                .map(str::to_owned);
            if offered.as_ref().is_some_and(|t| refused.contains(t)) {
                let mut refusal = ErrorResponse::new(Some("token expired".into()));
                *refusal.status_mut() =
                    tokio_tungstenite::tungstenite::http::StatusCode::UNAUTHORIZED;
                return Err(refusal);
            }
            if !protocols.is_empty() {
                response
                    .headers_mut()
                    .insert("sec-websocket-protocol", "chorus.v1".parse().unwrap());
            }
            Ok(response)
        };
        let socket = tokio_tungstenite::accept_hdr_async(stream, handshake).await;
        self.state.lock().unwrap().tokens.push(offered);
        let Ok(socket) = socket else {
            self.changed.notify_waiters();
            return;
        };
        let (mut sink, mut stream) = socket.split();
        let (out, mut outbox) = mpsc::unbounded_channel();
        let id = {
            let mut state = self.state.lock().unwrap();
            let id = state.next_conn;
            state.next_conn += 1;
            state.conns.insert(
                id,
                Conn {
                    out,
                    rooms: BTreeSet::new(),
                },
            );
            id
        };
        self.changed.notify_waiters();
        let mut silent = false;
        loop {
            tokio::select! {
                out = outbox.recv() => match out {
                    Some(Out::Frame(_)) if silent => {}
                    Some(Out::Frame(frame)) => {
                        let copies = if self.state.lock().unwrap().duplicate_frames { 2 } else { 1 };
                        let text = frame.to_json();
                        let mut failed = false;
                        for _ in 0..copies {
                            failed |= sink.send(Message::text(text.clone())).await.is_err();
                        }
                        if failed {
                            break;
                        }
                    }
                    Some(Out::Silence) => silent = true,
                    Some(Out::Close(code)) => {
                        let close = CloseFrame { code: code.into(), reason: "test".into() };
                        let _ = sink.send(Message::Close(Some(close))).await;
                        break;
                    }
                    Some(Out::Drop) | None => break,
                },
                message = stream.next(), if !silent => match message {
                    Some(Ok(Message::Text(text))) => {
                        let frame = ClientFrame::parse(text.as_str()).expect("a valid client frame");
                        self.handle(id, frame);
                        self.changed.notify_waiters();
                    }
                    Some(Ok(_)) => {}
                    _ => break,
                },
            }
        }
        self.state.lock().unwrap().conns.remove(&id);
        self.changed.notify_waiters();
    }

    fn handle(&self, conn: u64, frame: ClientFrame) {
        let mut state = self.state.lock().unwrap();
        state.received.push((conn, frame.clone()));
        match frame {
            ClientFrame::Join { room, since } => {
                if state.hold_joins {
                    return;
                }
                let log = state.rooms.entry(room.clone()).or_default().clone();
                let head = log.len() as u64;
                let expired = state.expired_up_to;
                let c = state.conns.get_mut(&conn).unwrap();
                if since.is_some_and(|since| since.0 < expired) {
                    let error = ServerFrame::room_error(
                        chorus_protocol::ErrorCode::HistoryExpired,
                        format!("messages up to {expired} are no longer stored"),
                        room,
                    );
                    let _ = c.out.send(Out::Frame(error));
                    return;
                }
                if let Some(since) = since {
                    for m in log.iter().filter(|m| m.seq > since) {
                        let _ = c.out.send(Out::Frame(ServerFrame::Message(m.clone())));
                    }
                }
                let _ = c.out.send(Out::Frame(ServerFrame::Joined {
                    room: room.clone(),
                    seq: Seq(head),
                }));
                c.rooms.insert(room);
            }
            ClientFrame::History {
                room,
                id,
                before,
                limit,
            } => {
                let log = state.rooms.get(&room).cloned().unwrap_or_default();
                let below: Vec<_> = log
                    .into_iter()
                    .filter(|m| before.is_none_or(|b| m.seq < b))
                    .collect();
                let skip = below.len().saturating_sub(limit.get() as usize);
                let messages = below.into_iter().skip(skip).collect();
                let frame = ServerFrame::History { room, id, messages };
                let _ = state.conns[&conn].out.send(Out::Frame(frame));
            }
            ClientFrame::Leave { room } => {
                let c = state.conns.get_mut(&conn).unwrap();
                c.rooms.remove(&room);
                let _ = c.out.send(Out::Frame(ServerFrame::Left { room }));
            }
            ClientFrame::Send { room, id, body } => {
                let policy = state.send_policy.unwrap_or(SendPolicy::Ack);
                if policy == SendPolicy::UnavailableOnce {
                    state.send_policy = Some(SendPolicy::Ack);
                    let error = ServerFrame::error(
                        chorus_protocol::ErrorCode::Unavailable,
                        "try again",
                        Some(id.to_string()),
                    );
                    let _ = state.conns[&conn].out.send(Out::Frame(error));
                    return;
                }
                let log = state.rooms.entry(room.clone()).or_default();
                let (seq, fresh) = match log.iter().find(|m| m.id == id) {
                    Some(stored) => (stored.seq, false),
                    None => {
                        let seq = log.len() as u64 + 1;
                        log.push(event(&room, seq, id.as_str(), "client", body.as_str()));
                        (Seq(seq), true)
                    }
                };
                if policy == SendPolicy::StoreThenDrop {
                    state.send_policy = Some(SendPolicy::Ack);
                    let _ = state.conns[&conn].out.send(Out::Drop);
                    return;
                }
                let _ = state.conns[&conn].out.send(Out::Frame(ServerFrame::Ack {
                    id,
                    room: room.clone(),
                    seq,
                }));
                if fresh {
                    let m = state.rooms[&room].last().unwrap().clone();
                    fan_out(&state, &m);
                }
            }
        }
    }

    /// Stores `bodies` in `room` as another user's messages and sends them to members.
    pub fn post(&self, room: &RoomId, bodies: &[&str]) -> Vec<Seq> {
        let mut state = self.state.lock().unwrap();
        let mut seqs = Vec::new();
        for body in bodies {
            let log = state.rooms.entry(room.clone()).or_default();
            let seq = log.len() as u64 + 1;
            let m = event(room, seq, &format!("other-{seq}"), "someone", body);
            log.push(m.clone());
            fan_out(&state, &m);
            seqs.push(Seq(seq));
        }
        seqs
    }

    /// Closes every connection with `code`, then stores `bodies` in `room` (so no connection
    /// open before can have them: only a resume can fetch them).
    pub fn close_all_then_post(&self, code: u16, room: &RoomId, bodies: &[&str]) {
        let mut state = self.state.lock().unwrap();
        for (_, c) in state.conns.drain() {
            let _ = c.out.send(Out::Close(code));
        }
        drop(state);
        self.post(room, bodies);
    }

    /// Drops every connection (no close frame).
    pub fn drop_all(&self) {
        let mut state = self.state.lock().unwrap();
        for (_, c) in state.conns.drain() {
            let _ = c.out.send(Out::Drop);
        }
    }

    /// Stores `bodies` in `room` as another user's messages without sending them to anyone (their
    /// notification was lost): only a join with `since` before them gets them.
    pub fn post_unsent(&self, room: &RoomId, bodies: &[&str]) {
        let mut state = self.state.lock().unwrap();
        for body in bodies {
            let log = state.rooms.entry(room.clone()).or_default();
            let seq = log.len() as u64 + 1;
            log.push(event(room, seq, &format!("other-{seq}"), "someone", body));
        }
    }

    /// Every connection open now goes silent: nothing more is sent to it or read from it, and
    /// it is not closed. Later connections are served as usual.
    pub fn silence_all(&self) {
        let state = self.state.lock().unwrap();
        for c in state.conns.values() {
            let _ = c.out.send(Out::Silence);
        }
    }

    /// Whether every frame goes out twice.
    pub fn duplicate_frames(&self, on: bool) {
        self.state.lock().unwrap().duplicate_frames = on;
    }

    /// Closes every connection with `code`.
    pub fn close_all(&self, code: u16) {
        let mut state = self.state.lock().unwrap();
        for (_, c) in state.conns.drain() {
            let _ = c.out.send(Out::Close(code));
        }
    }

    /// From now on, handshakes offering `token` are refused with 401.
    pub fn refuse_token(&self, token: &str) {
        self.state
            .lock()
            .unwrap()
            .refused_tokens
            .insert(token.to_owned());
    }

    /// The token each connection attempt offered, in order (refused ones too).
    pub fn tokens(&self) -> Vec<Option<String>> {
        self.state.lock().unwrap().tokens.clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.lock().unwrap().next_conn
    }

    pub fn set_send_policy(&self, policy: SendPolicy) {
        self.state.lock().unwrap().send_policy = Some(policy);
    }

    /// From now on, messages up to `seq` count as no longer stored.
    pub fn expire_up_to(&self, seq: u64) {
        self.state.lock().unwrap().expired_up_to = seq;
    }

    pub fn hold_joins(&self, hold: bool) {
        self.state.lock().unwrap().hold_joins = hold;
    }

    /// The stored messages of `room`.
    pub fn log(&self, room: &RoomId) -> Vec<MessageEvent> {
        self.state
            .lock()
            .unwrap()
            .rooms
            .get(room)
            .cloned()
            .unwrap_or_default()
    }

    /// Every frame received so far, with its connection number (0, 1, … in accept order).
    pub fn received(&self) -> Vec<(u64, ClientFrame)> {
        self.state.lock().unwrap().received.clone()
    }

    /// Waits until `check` holds on the frames received; gives up when nothing happened on the
    /// fake (no connection, frame or close) for [`WAIT`].
    pub async fn wait_received(&self, what: &str, check: impl Fn(&[(u64, ClientFrame)]) -> bool) {
        loop {
            let changed = self.changed.notified();
            if check(&self.received()) {
                return;
            }
            assert!(
                tokio::time::timeout(WAIT, changed).await.is_ok(),
                "nothing happened for {WAIT:?} and the fake gateway never received {what}: {:?}",
                self.received()
            );
        }
    }
}

fn fan_out(state: &State, m: &MessageEvent) {
    for c in state.conns.values() {
        if c.rooms.contains(&m.room) {
            let _ = c.out.send(Out::Frame(ServerFrame::Message(m.clone())));
        }
    }
}
