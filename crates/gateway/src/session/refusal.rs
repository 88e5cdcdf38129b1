//! Why a client's request was refused, and the one mapping from a refusal to the `error` frame the
//! client gets and to the counter it moves. A refusal changes nothing: the connection carries on.

use chorus_protocol::frames::Rejected;
use chorus_protocol::{ClientMsgId, ErrorCode, RoomId, Seq, ServerFrame};

use crate::metrics::GatewayMetrics;
use crate::session::rate::Rate;
use crate::writer_client::LogError;

/// A client request the gateway refused. Each variant is answered with one `error` frame
/// ([`Refusal::frame`]); joins are answered without a reference (a room error for expired
/// history), sends with the send's id, scrollback requests with their room and id.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The text frame is not a valid client frame.
    BadFrame(Rejected),
    /// A binary frame: the protocol is JSON text frames.
    Binary,
    /// Over the connection's join rate.
    JoinRate { room: RoomId, rate: Rate },
    /// The token does not allow the room.
    JoinForbidden { room: RoomId },
    /// The connection is in as many rooms as it may be.
    TooManyRooms { max: usize },
    /// Messages after `since` are no longer stored: nothing was replayed.
    HistoryExpired {
        room: RoomId,
        since: Seq,
        oldest: Option<Seq>,
    },
    /// The writer could not serve the join.
    JoinUnavailable { room: RoomId },
    /// A leave of a room the connection is not in.
    LeaveNotJoined { room: RoomId },
    /// Over the connection's send rate.
    SendRate { id: ClientMsgId, rate: Rate },
    /// A send to a room the connection is not in.
    SendNotJoined { room: RoomId, id: ClientMsgId },
    /// The writer did not store the send.
    SendFailed { id: ClientMsgId, error: LogError },
    /// Over the connection's join rate (scrollback counts as a join).
    HistoryRate {
        room: RoomId,
        id: ClientMsgId,
        rate: Rate,
    },
    /// The token does not allow the room.
    HistoryForbidden { room: RoomId, id: ClientMsgId },
    /// The writer could not serve the scrollback.
    HistoryUnavailable { room: RoomId, id: ClientMsgId },
}

impl Refusal {
    /// Counts the refusal in its metric, if it has one.
    pub(crate) fn count(&self, metrics: &GatewayMetrics) {
        let counter = match self {
            Refusal::BadFrame(_) | Refusal::Binary => &metrics.frames_rejected,
            Refusal::JoinRate { .. } | Refusal::HistoryRate { .. } => &metrics.rate_limited_joins,
            Refusal::JoinForbidden { .. } | Refusal::HistoryForbidden { .. } => {
                &metrics.forbidden_joins
            }
            Refusal::TooManyRooms { .. } => &metrics.room_limit_hits,
            Refusal::HistoryExpired { .. } => &metrics.history_expired,
            Refusal::SendRate { .. } => &metrics.rate_limited_sends,
            Refusal::SendFailed { .. } => &metrics.sends_failed,
            Refusal::HistoryUnavailable { .. } => &metrics.history_failed,
            Refusal::JoinUnavailable { .. }
            | Refusal::LeaveNotJoined { .. }
            | Refusal::SendNotJoined { .. } => return,
        };
        counter.inc();
    }

    /// The `error` frame that tells the client.
    pub(crate) fn frame(self) -> ServerFrame {
        match self {
            Refusal::BadFrame(Rejected { error, reference }) => {
                ServerFrame::error(error.code(), error.to_string(), reference)
            }
            Refusal::Binary => ServerFrame::error(
                ErrorCode::BadFrame,
                "binary frames are not supported: send JSON text frames",
                None,
            ),
            Refusal::JoinRate { room, rate } => ServerFrame::error(
                ErrorCode::RateLimited,
                format!(
                    "too many joins: at most {} per second (bursts of {}); join {room} again later",
                    rate.per_sec, rate.burst
                ),
                None,
            ),
            Refusal::JoinForbidden { room } => ServerFrame::error(
                ErrorCode::Forbidden,
                format!("your token does not allow room {room}"),
                None,
            ),
            Refusal::TooManyRooms { max } => ServerFrame::error(
                ErrorCode::LimitExceeded,
                format!("a connection may join at most {max} rooms"),
                None,
            ),
            Refusal::HistoryExpired {
                room,
                since,
                oldest,
            } => {
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
                ServerFrame::room_error(ErrorCode::HistoryExpired, message, room)
            }
            Refusal::JoinUnavailable { room } => ServerFrame::error(
                ErrorCode::Unavailable,
                format!("could not join {room}: the message store is unavailable, try again"),
                None,
            ),
            Refusal::LeaveNotJoined { room } => {
                ServerFrame::error(ErrorCode::NotJoined, format!("not in room {room}"), None)
            }
            Refusal::SendRate { id, rate } => ServerFrame::error(
                ErrorCode::RateLimited,
                format!(
                    "too many sends: at most {} per second (bursts of {}); this one was not \
                     sent: retry it with the same id",
                    rate.per_sec, rate.burst
                ),
                Some(id.to_string()),
            ),
            Refusal::SendNotJoined { room, id } => ServerFrame::error(
                ErrorCode::NotJoined,
                format!("join room {room} before sending to it"),
                Some(id.to_string()),
            ),
            Refusal::SendFailed { id, error } => {
                let message = match error {
                    LogError::Unavailable(_) => {
                        "the message store is unavailable: retry with the same id"
                    }
                    LogError::Refused { .. } | LogError::Expired { .. } => {
                        "the message store refused this send"
                    }
                };
                ServerFrame::error(ErrorCode::Unavailable, message, Some(id.to_string()))
            }
            Refusal::HistoryRate { room, id, rate } => ServerFrame::history_error(
                ErrorCode::RateLimited,
                format!(
                    "too many joins and history requests: at most {} per second (bursts of {}); \
                     ask again later",
                    rate.per_sec, rate.burst
                ),
                room,
                &id,
            ),
            Refusal::HistoryForbidden { room, id } => ServerFrame::history_error(
                ErrorCode::Forbidden,
                format!("your token does not allow room {room}"),
                room,
                &id,
            ),
            Refusal::HistoryUnavailable { room, id } => ServerFrame::history_error(
                ErrorCode::Unavailable,
                format!(
                    "could not read the history of {room}: the message store is unavailable, try \
                     again"
                ),
                room,
                &id,
            ),
        }
    }
}
