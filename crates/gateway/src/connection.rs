//! One WebSocket connection: a reader task that parses client frames and acts on them, and a
//! writer task that drains the connection's bounded queue into the socket. When either ends, the
//! other is stopped (`select!`), and the connection leaves all its rooms.
//!
//! Generic over the socket's `Sink`/`Stream`, so tests can drive it with channels.

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message};
use chorus_protocol::api::SendRequest;
use chorus_protocol::frames::Rejected;
use chorus_protocol::{ClientFrame, ErrorCode, RoomId, ServerFrame, UserId, close};
use futures_util::{Sink, SinkExt as _, Stream, StreamExt as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::hub::{ConnId, Frame, Hub, JoinError, Kick, MemberHandle};
use crate::log::{LogError, MessageLog};
use crate::metrics::GatewayMetrics;

/// Per-connection limits.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    /// Frames queued for the socket before the connection counts as too slow and is closed.
    pub queue_len: usize,
    /// Rooms one connection may be in at once.
    pub max_rooms: usize,
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        ConnectionSettings {
            queue_len: 512,
            max_rooms: 100,
        }
    }
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

/// Serves one upgraded socket for `user` until the client leaves, the gateway drains, or the
/// connection is kicked.
pub async fn serve<S, E>(socket: S, user: UserId, ctx: ConnectionContext)
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + Send + 'static,
    E: std::fmt::Display,
{
    let (sink, mut stream) = socket.split();
    let (tx, rx) = mpsc::channel::<Frame>(ctx.settings.queue_len);
    let member = MemberHandle {
        id: ConnId::next(),
        tx,
        kick: Kick::default(),
    };
    let (close_tx, close_rx) = tokio::sync::oneshot::channel::<(u16, &'static str)>();
    let writer = tokio::spawn(write_loop(sink, rx, close_rx));
    ctx.metrics.connections.inc();
    ctx.metrics.connections_total.inc();
    tracing::debug!(conn = ?member.id, %user, "connected");

    let mut rooms: HashSet<RoomId> = HashSet::new();
    let close: Option<(u16, &'static str)> = loop {
        let message = tokio::select! {
            biased;
            () = ctx.drain.cancelled() => break Some((close::SERVER_RESTARTING, "server restarting: reconnect and resume")),
            code = member.kick.kicked() => break Some((code, "too slow: reconnect and resume")),
            message = stream.next() => message,
        };
        let text = match message {
            None => break None,
            Some(Err(e)) => {
                tracing::debug!(conn = ?member.id, error = %e, "socket error");
                break None;
            }
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Binary(_))) => {
                ctx.metrics.frames_rejected.inc();
                reply(
                    &member,
                    ServerFrame::error(
                        ErrorCode::BadFrame,
                        "binary frames are not supported: send JSON text frames",
                        None,
                    ),
                )
                .await;
                continue;
            }
            Some(Ok(Message::Close(_))) => break None,
            // Pings are answered by the WebSocket layer.
            Some(Ok(_)) => continue,
        };
        // A slow request (a send waiting on the writer, a long replay) still yields to a drain or
        // kick.
        tokio::select! {
            biased;
            () = ctx.drain.cancelled() => break Some((close::SERVER_RESTARTING, "server restarting: reconnect and resume")),
            code = member.kick.kicked() => break Some((code, "too slow: reconnect and resume")),
            () = handle_text(&ctx, &member, &user, &mut rooms, text.as_str()) => {}
        }
    };

    for room in &rooms {
        ctx.hub.leave(member.id, room);
    }
    if let Some(code) = close {
        let _ = close_tx.send(code);
    }
    drop(member);
    // The writer ends once it has sent the close frame, or when the queue closes.
    let _ = writer.await;
    ctx.metrics.connections.dec();
    tracing::debug!(%user, "disconnected");
}

async fn write_loop<S>(
    mut sink: futures_util::stream::SplitSink<S, Message>,
    mut rx: mpsc::Receiver<Frame>,
    mut close_rx: tokio::sync::oneshot::Receiver<(u16, &'static str)>,
) where
    S: Sink<Message> + Send,
{
    loop {
        tokio::select! {
            biased;
            close = &mut close_rx => {
                if let Ok((code, reason)) = close {
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame { code, reason: reason.into() })))
                        .await;
                }
                break;
            }
            frame = rx.recv() => {
                let Some(frame) = frame else { break };
                // Batch: queue everything already waiting, then flush once.
                if sink.feed(Message::Text(frame)).await.is_err() {
                    break;
                }
                while let Ok(frame) = rx.try_recv() {
                    if sink.feed(Message::Text(frame)).await.is_err() {
                        return;
                    }
                }
                if sink.flush().await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = sink.close().await;
}

async fn reply(member: &MemberHandle, frame: ServerFrame) {
    // The reader awaits its own queue: only this connection waits if it is full.
    let _ = member.tx.send(frame.to_json().into()).await;
}

async fn handle_text(
    ctx: &ConnectionContext,
    member: &MemberHandle,
    user: &UserId,
    rooms: &mut HashSet<RoomId>,
    text: &str,
) {
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
            if rooms.contains(&room) {
                // A re-join (e.g. to resume with `since`) starts over.
                ctx.hub.leave(member.id, &room);
                rooms.remove(&room);
            }
            if rooms.len() >= ctx.settings.max_rooms {
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
                Err(JoinError::Closed) => {}
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
                sender: user.clone(),
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
                        LogError::Refused(_) => "the message store refused this send".to_owned(),
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
