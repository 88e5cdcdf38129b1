//! One WebSocket connection: a reader task that parses client frames and acts on them
//! ([`handlers`]), and a writer task that drains the connection's bounded queue into the socket
//! ([`writer`]). When either ends, the other is stopped (`select!`), and the connection leaves
//! all its rooms. A request the gateway refuses is answered with one `error` frame
//! ([`refusal`]) and the connection carries on.
//!
//! The socket types stop here: the hub sees a member as a queue and a kick.
//! Generic over the socket's `Sink`/`Stream`, so tests can drive it with channels.

mod handlers;
pub(crate) mod rate;
mod refusal;
mod writer;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::ws::Message;
use chorus_protocol::{RoomId, ServerFrame, close};
use futures_util::{Sink, Stream, StreamExt as _};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::handlers::{handle_text, refuse};
use self::rate::{Rate, TokenBucket};
use self::refusal::Refusal;
use crate::auth::Identity;
use crate::hub::outbox::{Close, outbox};
use crate::hub::{ConnId, Hub, Kick, MemberHandle};
use crate::metrics::GatewayMetrics;
use crate::writer_client::MessageLog;

/// Per-connection limits.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionSettings {
    /// Frames queued for the socket before the connection counts as too slow and is closed.
    pub(crate) queue_len: usize,
    /// Bytes of frames queued before the connection counts as too slow and is closed.
    pub(crate) queue_bytes: usize,
    /// Rooms one connection may be in at once.
    pub(crate) max_rooms: usize,
    pub(crate) sends: Rate,
    pub(crate) joins: Rate,
    /// How often the client is pinged.
    pub(crate) ping_interval: Duration,
    /// Closed when nothing is heard from the client for this long.
    pub(crate) idle_timeout: Duration,
}

/// What a connection needs from the gateway.
#[derive(Clone)]
pub(crate) struct Context {
    pub(crate) hub: Hub,
    pub(crate) log: Arc<dyn MessageLog>,
    pub(crate) metrics: Arc<GatewayMetrics>,
    pub(crate) settings: ConnectionSettings,
    /// Cancelled when the gateway drains: the connection closes with [`close::SERVER_RESTARTING`].
    pub(crate) drain: CancellationToken,
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
pub(crate) async fn serve<S, E>(socket: S, identity: Identity, ctx: Context)
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
    let writer = tokio::spawn(writer::write_loop(sink, rx));
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
                Box::pin(refuse(&ctx, &member, Refusal::Binary)).await;
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

/// Queues an answer to the client's own request.
async fn reply(member: &MemberHandle, frame: ServerFrame) {
    // The reader awaits its own queue: only this connection waits if it is full.
    let _ = member.outbox.push(frame.to_json().into()).await;
}
