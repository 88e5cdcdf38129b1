//! What the gateway does with each client frame: `join`, `leave`, `send` and `history`. A handler
//! answers with a frame, or with nothing (a join's `joined` comes from the hub), or refuses with
//! a [`Refusal`], which [`handle_text`] counts and turns into the client's `error` frame.

use chorus_protocol::api::SendRequest;
use chorus_protocol::{Body, ClientFrame, ClientMsgId, MessageEvent, RoomId, Seq, ServerFrame};
use tokio::time::Instant;

use super::refusal::Refusal;
use super::{Context, Session, reply};
use crate::Chain;
use crate::hub::{JoinError, MemberHandle};

/// What a handler answers when it does not refuse: a frame, or nothing.
type Handled = Result<Option<ServerFrame>, Refusal>;

/// Parses one text frame and acts on it; every refusal is answered and counted here, once.
pub(super) async fn handle_text(
    ctx: &Context,
    member: &MemberHandle,
    session: &mut Session,
    text: &str,
) {
    let handled = match ClientFrame::parse(text) {
        Ok(frame) => {
            ctx.metrics.frames_received.inc();
            handle(ctx, member, session, frame).await
        }
        Err(rejected) => Err(Refusal::BadFrame(rejected)),
    };
    match handled {
        Ok(Some(frame)) => reply(member, frame).await,
        Ok(None) => {}
        Err(refusal) => refuse(ctx, member, refusal).await,
    }
}

/// Counts a refusal and tells the client.
pub(super) async fn refuse(ctx: &Context, member: &MemberHandle, refusal: Refusal) {
    refusal.count(&ctx.metrics);
    reply(member, refusal.frame()).await;
}

async fn handle(
    ctx: &Context,
    member: &MemberHandle,
    session: &mut Session,
    frame: ClientFrame,
) -> Handled {
    match frame {
        ClientFrame::Join { room, since } => join(ctx, member, session, room, since).await,
        ClientFrame::History {
            room,
            id,
            before,
            limit,
        } => history(ctx, session, room, id, before, limit.get()).await,
        ClientFrame::Leave { room } => leave(ctx, member, session, room),
        ClientFrame::Send { room, id, body } => send(ctx, session, room, id, body).await,
    }
}

async fn join(
    ctx: &Context,
    member: &MemberHandle,
    session: &mut Session,
    room: RoomId,
    since: Option<Seq>,
) -> Handled {
    let joins = ctx.settings.joins;
    if !session.joins.try_take(joins, Instant::now()) {
        return Err(Refusal::JoinRate { room, rate: joins });
    }
    if !session.identity.rooms.allows(&room) {
        return Err(Refusal::JoinForbidden { room });
    }
    if session.rooms.contains(&room) {
        // A re-join (e.g. to resume with `since`) starts over.
        ctx.hub.leave(member.id, &room);
        session.rooms.remove(&room);
    }
    if session.rooms.len() >= ctx.settings.max_rooms {
        return Err(Refusal::TooManyRooms {
            max: ctx.settings.max_rooms,
        });
    }
    match ctx.hub.join(member, &room, since).await {
        Ok(_) => {
            ctx.metrics.joins.inc();
            session.rooms.insert(room);
            Ok(None)
        }
        // The connection is closing (and was kicked, if it stalled the replay).
        Err(JoinError::Closed | JoinError::Stalled) => Ok(None),
        Err(JoinError::Expired { since, oldest }) => Err(Refusal::HistoryExpired {
            room,
            since,
            oldest,
        }),
        Err(JoinError::Log(e)) => {
            tracing::warn!(%room, error.message = %Chain(&e), "join failed");
            Err(Refusal::JoinUnavailable { room })
        }
    }
}

fn leave(ctx: &Context, member: &MemberHandle, session: &mut Session, room: RoomId) -> Handled {
    if !session.rooms.remove(&room) {
        return Err(Refusal::LeaveNotJoined { room });
    }
    ctx.metrics.leaves.inc();
    ctx.hub.leave(member.id, &room);
    Ok(Some(ServerFrame::Left { room }))
}

async fn send(
    ctx: &Context,
    session: &mut Session,
    room: RoomId,
    id: ClientMsgId,
    body: Body,
) -> Handled {
    let sends = ctx.settings.sends;
    if !session.sends.try_take(sends, Instant::now()) {
        return Err(Refusal::SendRate { id, rate: sends });
    }
    if !session.rooms.contains(&room) {
        return Err(Refusal::SendNotJoined { room, id });
    }
    let request = SendRequest {
        id: id.clone(),
        sender: session.identity.user.clone(),
        body,
    };
    match ctx.log.append(&room, &request).await {
        Ok(stored) => {
            ctx.metrics.sends_acked.inc();
            Ok(Some(ServerFrame::Ack {
                id,
                room,
                seq: stored.seq,
            }))
        }
        Err(error) => {
            tracing::warn!(%room, error.message = %Chain(&error), "send failed");
            Err(Refusal::SendFailed { id, error })
        }
    }
}

/// Answers a scrollback request: authorised and rate-limited like a join, the page trimmed from
/// its oldest end to half the connection's byte bound (so a reply always fits the queue; the
/// client pages on from the oldest message it got).
async fn history(
    ctx: &Context,
    session: &mut Session,
    room: RoomId,
    id: ClientMsgId,
    before: Option<Seq>,
    limit: u32,
) -> Handled {
    let joins = ctx.settings.joins;
    if !session.joins.try_take(joins, Instant::now()) {
        return Err(Refusal::HistoryRate {
            room,
            id,
            rate: joins,
        });
    }
    if !session.identity.rooms.allows(&room) {
        return Err(Refusal::HistoryForbidden { room, id });
    }
    match ctx.log.scrollback(&room, before, limit).await {
        Ok(page) => {
            ctx.metrics.history_served.inc();
            let messages = newest_within(page.messages, ctx.settings.queue_bytes / 2);
            Ok(Some(ServerFrame::History { room, id, messages }))
        }
        Err(e) => {
            tracing::warn!(%room, error.message = %Chain(&e), "history request failed");
            Err(Refusal::HistoryUnavailable { room, id })
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
