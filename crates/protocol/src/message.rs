//! A chat message as it travels: in `message` frames, in the writer's history API, in the SNS
//! payload, and (with bookkeeping) as the stored DynamoDB item.

use serde::{Deserialize, Serialize};

use crate::ids::{Body, ClientMsgId, RoomId, Seq, UserId};

/// One stored message. Serialized as the body of a `message` frame and as an element of the SNS
/// payload's `events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageEvent {
    pub room: RoomId,
    pub seq: Seq,
    pub id: ClientMsgId,
    pub sender: UserId,
    pub body: Body,
    /// When the writer stored it, RFC 3339 UTC with milliseconds, e.g. `2026-11-29T10:00:00.123Z`.
    pub ts: String,
}

/// The DynamoDB item of a message: partition key `room` (S), sort key `seq` (N), and the rest of
/// the event, plus an optional `ttl` (N, epoch seconds) for the table's TTL.
///
/// The writer also stores bookkeeping items (room heads, idempotency keys) in the same table; their
/// `room` key starts with [`BOOKKEEPING_PREFIX`], which no [`RoomId`] can contain, so decoding one
/// as a `StoredMessage` fails and [`is_bookkeeping_key`] tells them apart without decoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub room: RoomId,
    pub seq: Seq,
    pub id: ClientMsgId,
    pub sender: UserId,
    pub body: Body,
    pub ts: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u64>,
}

/// First character of every bookkeeping item's partition key.
pub const BOOKKEEPING_PREFIX: char = '#';

/// Whether a partition key value names a bookkeeping item rather than a room.
pub fn is_bookkeeping_key(room_key: &str) -> bool {
    room_key.starts_with(BOOKKEEPING_PREFIX)
}

impl From<StoredMessage> for MessageEvent {
    fn from(item: StoredMessage) -> Self {
        MessageEvent {
            room: item.room,
            seq: item.seq,
            id: item.id,
            sender: item.sender,
            body: item.body,
            ts: item.ts,
        }
    }
}

impl StoredMessage {
    /// The item for `event`, with an optional expiry.
    pub fn new(event: MessageEvent, ttl: Option<u64>) -> Self {
        StoredMessage {
            room: event.room,
            seq: event.seq,
            id: event.id,
            sender: event.sender,
            body: event.body,
            ts: event.ts,
            ttl,
        }
    }
}
