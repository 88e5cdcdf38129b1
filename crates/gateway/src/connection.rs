//! One WebSocket connection: a reader task that parses client frames and acts on them, and a
//! writer task that drains the connection's bounded queue into the socket. When either ends, the
//! other is stopped (`select!`), and the connection leaves all its rooms.
//!
//! Generic over the socket's `Sink`/`Stream`, so tests can drive it with channels.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::ws::{CloseFrame, Message};
use chorus_protocol::api::SendRequest;
use chorus_protocol::frames::Rejected;
use chorus_protocol::{
    ClientFrame, ClientMsgId, ErrorCode, MessageEvent, RoomId, Seq, ServerFrame, close,
};
use futures_util::{Sink, SinkExt as _, Stream, StreamExt as _};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::Identity;
use crate::hub::{ConnId, Hub, JoinError, Kick, MemberHandle};
use crate::log::{LogError, MessageLog};
use crate::metrics::GatewayMetrics;
use crate::outbox::{Close, Next, Outbound, OutboxReceiver, outbox};
use crate::rate::{Rate, TokenBucket};

/// Per-connection limits.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    /// Frames queued for the socket before the connection counts as too slow and is closed.
    pub queue_len: usize,
    /// Bytes of frames queued before the connection counts as too slow and is closed.
    pub queue_bytes: usize,
    /// Rooms one connection may be in at once.
    pub max_rooms: usize,
    pub sends: Rate,
    pub joins: Rate,
    /// How often the client is pinged.
    pub ping_interval: Duration,
    /// Closed when nothing is heard from the client for this long.
    pub idle_timeout: Duration,
}

/// What a connection needs from the gateway.
#[derive(Clone)]
pub struct ConnectionContext {
    pub hub: Hub,
    pub log: Arc<dyn MessageLog>,
    pub metrics: Arc<GatewayMetrics>,
    pub settings: ConnectionSettings,
    /// Cancelled when the gateway drains: the connection closes with [`close::SERVER_RESTARTING`].
    pub drain: CancellationToken,
}

/// One connection's state, owned by its reader.
struct Session {
    identity: Identity,
    rooms: HashSet<RoomId>,
    sends: TokenBucket,
    joins: TokenBucket,
}

/// How long a closing connection may take to get its last frames and the close frame out.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

const RESTARTING: Close = (
    close::SERVER_RESTARTING,
    "server restarting: reconnect and resume",
);
const SLOW: &str = "too slow: reconnect and resume";
const TOKEN_EXPIRED: Close = (
    close::TOKEN_EXPIRED,
    "token expired: reconnect with a fresh token and resume",
);

/// Serves one upgraded socket for `identity` until the client leaves, the gateway drains, the
/// connection is kicked, falls silent, or its token expires.
pub async fn serve<S, E>(socket: S, identity: Identity, ctx: ConnectionContext)
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + Send + 'static,
    E: std::fmt::Display,
{
    let (sink, mut stream) = socket.split();
    let (outbox, rx) = outbox(ctx.settings.queue_len, ctx.settings.queue_bytes);
    let member = MemberHandle {
        id: ConnId::next(),
        outbox,
        kick: Kick::default(),
    };
    let writer = tokio::spawn(write_loop(sink, rx));
    ctx.metrics.connections.inc();
    ctx.metrics.connections_total.inc();
    tracing::debug!(conn = ?member.id, user = %identity.user, "connected");

    let now = Instant::now();
    let mut session = Session {
        identity,
        rooms: HashSet::new(),
        sends: TokenBucket::full(ctx.settings.sends, now),
        joins: TokenBucket::full(ctx.settings.joins, now),
    };
    let ping = ctx.settings.ping_interval;
    let mut heartbeat = tokio::time::interval_at(now + ping, ping);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = now;
    let close: Option<Close> = loop {
        let message = tokio::select! {
            biased;
            () = ctx.drain.cancelled() => break Some(RESTARTING),
            code = member.kick.kicked() => break Some((code, SLOW)),
            _ = heartbeat.tick() => {
                if session.identity.expired(SystemTime::now()) {
                    ctx.metrics.tokens_expired.inc();
                    break Some(TOKEN_EXPIRED);
                }
                if last_heard.elapsed() >= ctx.settings.idle_timeout {
                    ctx.metrics.idle_timeouts.inc();
                    break Some((close::IDLE_TIMEOUT, "idle: nothing heard within the idle timeout"));
                }
                member.outbox.ping();
                continue;
            }
            message = stream.next() => message,
        };
        last_heard = Instant::now();
        let text = match message {
            None => break None,
            Some(Err(e)) => {
                tracing::debug!(conn = ?member.id, error = %e, "socket error");
                break None;
            }
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Binary(_))) => {
                ctx.metrics.frames_rejected.inc();
                Box::pin(reply(
                    &member,
                    ServerFrame::error(
                        ErrorCode::BadFrame,
                        "binary frames are not supported: send JSON text frames",
                        None,
                    ),
                ))
                .await;
                continue;
            }
            Some(Ok(Message::Close(_))) => break None,
            // Pings are answered by the WebSocket layer; pongs only count as signs of life.
            Some(Ok(_)) => continue,
        };
        // A slow request (a send waiting on the writer, a long replay) still yields to a drain or
        // kick, and heartbeats and token expiry go on meanwhile. (Idleness is not judged while a
        // request runs: the client waits on us.) Dropping the handler at any await leaves the
        // hub consistent: joins are cancel-safe.
        let expires = session.identity.expires;
        // Boxed: the handler's state (a join's replay, a send's writer call) lives only while a
        // frame is handled, not in every idle connection's future (about 1 KiB each).
        let mut handler = Box::pin(handle_text(&ctx, &member, &mut session, text.as_str()));
        let interrupted = loop {
            tokio::select! {
                biased;
                () = ctx.drain.cancelled() => break Some(RESTARTING),
                code = member.kick.kicked() => break Some((code, SLOW)),
                _ = heartbeat.tick() => {
                    if expires.is_some_and(|at| SystemTime::now() >= at) {
                        ctx.metrics.tokens_expired.inc();
                        break Some(TOKEN_EXPIRED);
                    }
                    member.outbox.ping();
                }
                () = &mut handler => break None,
            }
        };
        drop(handler);
        if let Some(close) = interrupted {
            break Some(close);
        }
        last_heard = Instant::now();
    };

    for room in &session.rooms {
        ctx.hub.leave(member.id, room);
    }
    if let Some(close) = close {
        member.outbox.close(close);
    }
    drop(member);
    // The writer ends once it has sent the close frame, or when the queue closes. A client that
    // does not read would keep it waiting on the socket: after a grace period, the socket goes.
    let mut writer = writer;
    if tokio::time::timeout(CLOSE_GRACE, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
    ctx.metrics.connections.dec();
    tracing::debug!(user = %session.identity.user, "disconnected");
}

async fn write_loop<S>(
    mut sink: futures_util::stream::SplitSink<S, Message>,
    mut rx: OutboxReceiver,
) where
    S: Sink<Message> + Send,
{
    fn message(item: Outbound) -> Message {
        match item {
            Outbound::Text(frame) => Message::Text(frame),
            Outbound::Ping => Message::Ping(Default::default()),
        }
    }
    let mut batch = VecDeque::new();
    loop {
        match rx.next(&mut batch).await {
            // Batch: queue everything that was waiting, then flush once.
            Next::Send => {
                for item in batch.drain(..) {
                    if sink.feed(message(item)).await.is_err() {
                        return;
                    }
                }
                if sink.flush().await.is_err() {
                    break;
                }
            }
            Next::Close((code, reason)) => {
                let _ = sink
                    .send(Message::Close(Some(CloseFrame {
                        code,
                        reason: reason.into(),
                    })))
                    .await;
                break;
            }
            Next::Ended => break,
        }
    }
    let _ = sink.close().await;
}

async fn reply(member: &MemberHandle, frame: ServerFrame) {
    // The reader awaits its own queue: only this connection waits if it is full.
    let _ = member.outbox.push(frame.to_json().into()).await;
}

/// Answers a scrollback request: authorised and rate-limited like a join, the page trimmed from
/// its oldest end to half the connection's byte bound (so a reply always fits the queue; the
/// client pages on from the oldest message it got).
async fn history(
    ctx: &ConnectionContext,
    member: &MemberHandle,
    session: &mut Session,
    room: RoomId,
    id: ClientMsgId,
    before: Option<Seq>,
    limit: u32,
) {
    if !session.joins.try_take(ctx.settings.joins, Instant::now()) {
        ctx.metrics.rate_limited_joins.inc();
        let message = format!(
            "too many joins and history requests: at most {} per second (bursts of {}); ask \
             again later",
            ctx.settings.joins.per_sec, ctx.settings.joins.burst
        );
        let frame = ServerFrame::history_error(ErrorCode::RateLimited, message, room, &id);
        return reply(member, frame).await;
    }
    if !session.identity.rooms.allows(&room) {
        ctx.metrics.forbidden_joins.inc();
        let message = format!("your token does not allow room {room}");
        let frame = ServerFrame::history_error(ErrorCode::Forbidden, message, room, &id);
        return reply(member, frame).await;
    }
    match ctx.log.scrollback(&room, before, limit).await {
        Ok(page) => {
            ctx.metrics.history_served.inc();
            let messages = newest_within(page.messages, ctx.settings.queue_bytes / 2);
            reply(member, ServerFrame::History { room, id, messages }).await;
        }
        Err(e) => {
            ctx.metrics.history_failed.inc();
            tracing::warn!(%room, error.message = %e, "history request failed");
            let message = format!(
                "could not read the history of {room}: the message store is unavailable, try again"
            );
            let frame = ServerFrame::history_error(ErrorCode::Unavailable, message, room, &id);
            reply(member, frame).await;
        }
    }
}

/// The newest of `messages` (oldest first) whose JSON fits in `budget` bytes; at least one, so
/// paging always moves on.
fn newest_within(mut messages: Vec<MessageEvent>, budget: usize) -> Vec<MessageEvent> {
    let mut bytes = 0;
    let mut keep = 0;
    for message in messages.iter().rev() {
        // Each message's JSON, plus a comma; the body dominates.
        bytes += serde_json::to_string(message).map_or(0, |json| json.len() + 1);
        if keep > 0 && bytes > budget {
            break;
        }
        keep += 1;
    }
    messages.split_off(messages.len() - keep)
}

async fn handle_text(
    ctx: &ConnectionContext,
    member: &MemberHandle,
    session: &mut Session,
    text: &str,
) {
    let rooms = &mut session.rooms;
    let frame = match ClientFrame::parse(text) {
        Ok(frame) => frame,
        Err(Rejected { error, reference }) => {
            ctx.metrics.frames_rejected.inc();
            reply(
                member,
                ServerFrame::error(error.code(), error.to_string(), reference),
            )
            .await;
            return;
        }
    };
    ctx.metrics.frames_received.inc();
    match frame {
        ClientFrame::Join { room, since } => {
            if !session.joins.try_take(ctx.settings.joins, Instant::now()) {
                ctx.metrics.rate_limited_joins.inc();
                let message = format!(
                    "too many joins: at most {} per second (bursts of {}); join {room} again later",
                    ctx.settings.joins.per_sec, ctx.settings.joins.burst
                );
                reply(
                    member,
                    ServerFrame::error(ErrorCode::RateLimited, message, None),
                )
                .await;
                return;
            }
            if !session.identity.rooms.allows(&room) {
                ctx.metrics.forbidden_joins.inc();
                let message = format!("your token does not allow room {room}");
                reply(
                    member,
                    ServerFrame::error(ErrorCode::Forbidden, message, None),
                )
                .await;
                return;
            }
            if rooms.contains(&room) {
                // A re-join (e.g. to resume with `since`) starts over.
                ctx.hub.leave(member.id, &room);
                rooms.remove(&room);
            }
            if rooms.len() >= ctx.settings.max_rooms {
                ctx.metrics.room_limit_hits.inc();
                let message = format!(
                    "a connection may join at most {} rooms",
                    ctx.settings.max_rooms
                );
                reply(
                    member,
                    ServerFrame::error(ErrorCode::LimitExceeded, message, None),
                )
                .await;
                return;
            }
            match ctx.hub.join(member, &room, since).await {
                Ok(_) => {
                    ctx.metrics.joins.inc();
                    rooms.insert(room);
                }
                // The connection is closing (and was kicked, if it stalled the replay).
                Err(JoinError::Closed | JoinError::Stalled) => {}
                Err(JoinError::Expired { since, oldest }) => {
                    ctx.metrics.history_expired.inc();
                    let message = match oldest {
                        Some(oldest) => format!(
                            "messages {}..={} of {room} are no longer stored (the oldest is \
                             {oldest}): join {room} without since, or with since of {} or more",
                            since.next(),
                            Seq(oldest.0 - 1),
                            Seq(oldest.0 - 1),
                        ),
                        None => format!(
                            "messages after {since} of {room} are no longer stored: join {room} \
                             without since"
                        ),
                    };
                    reply(
                        member,
                        ServerFrame::room_error(ErrorCode::HistoryExpired, message, room),
                    )
                    .await;
                }
                Err(JoinError::Log(e)) => {
                    tracing::warn!(%room, error.message = %e, "join failed");
                    let message = format!(
                        "could not join {room}: the message store is unavailable, try again"
                    );
                    reply(
                        member,
                        ServerFrame::error(ErrorCode::Unavailable, message, None),
                    )
                    .await;
                }
            }
        }
        ClientFrame::History {
            room,
            id,
            before,
            limit,
        } => history(ctx, member, session, room, id, before, limit.get()).await,
        ClientFrame::Leave { room } => {
            if rooms.remove(&room) {
                ctx.metrics.leaves.inc();
                ctx.hub.leave(member.id, &room);
                reply(member, ServerFrame::Left { room }).await;
            } else {
                let message = format!("not in room {room}");
                reply(
                    member,
                    ServerFrame::error(ErrorCode::NotJoined, message, None),
                )
                .await;
            }
        }
        ClientFrame::Send { room, id, body } => {
            if !session.sends.try_take(ctx.settings.sends, Instant::now()) {
                ctx.metrics.rate_limited_sends.inc();
                let message = format!(
                    "too many sends: at most {} per second (bursts of {}); this one was not \
                     sent: retry it with the same id",
                    ctx.settings.sends.per_sec, ctx.settings.sends.burst
                );
                reply(
                    member,
                    ServerFrame::error(ErrorCode::RateLimited, message, Some(id.to_string())),
                )
                .await;
                return;
            }
            if !rooms.contains(&room) {
                let message = format!("join room {room} before sending to it");
                reply(
                    member,
                    ServerFrame::error(ErrorCode::NotJoined, message, Some(id.to_string())),
                )
                .await;
                return;
            }
            let request = SendRequest {
                id: id.clone(),
                sender: session.identity.user.clone(),
                body,
            };
            match ctx.log.append(&room, &request).await {
                Ok(stored) => {
                    ctx.metrics.sends_acked.inc();
                    reply(
                        member,
                        ServerFrame::Ack {
                            id,
                            room,
                            seq: stored.seq,
                        },
                    )
                    .await;
                }
                Err(e) => {
                    ctx.metrics.sends_failed.inc();
                    tracing::warn!(%room, error.message = %e, "send failed");
                    let message = match e {
                        LogError::Unavailable(_) => {
                            "the message store is unavailable: retry with the same id".to_owned()
                        }
                        LogError::Refused(_) | LogError::Expired(_) => {
                            "the message store refused this send".to_owned()
                        }
                    };
                    reply(
                        member,
                        ServerFrame::error(ErrorCode::Unavailable, message, Some(id.to_string())),
                    )
                    .await;
                }
            }
        }
    }
}
