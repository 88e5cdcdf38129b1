//! A chat message as it travels: in `message` frames, in the writer's history API, in the SNS
//! payload, and, many at a time, as the stored DynamoDB item.

use serde::{Deserialize, Serialize};

use crate::ids::{Body, ClientMsgId, InvalidValue, RoomId, Seq, UserId};

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

/// The DynamoDB item of a run of consecutive messages of one room, written by one conditional
/// put: partition key `room` (S), sort key `seq` (N) = the first message's seq, `last` (N) = the
/// last one's, and the messages in seq order in `msgs`. Every message of the item was stored at
/// the same instant `ts`; `ttl` (N, epoch seconds) is when the item expires (the table's TTL
/// attribute).
///
/// Items tile each room's seq space: the item after `[seq, last]` starts at `last + 1`. See
/// docs/decisions/0007-group-commit-items.md.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBatch {
    pub room: RoomId,
    pub seq: Seq,
    pub last: Seq,
    pub ts: String,
    pub ttl: u64,
    pub msgs: Vec<StoredEntry>,
}

/// One message inside a [`StoredBatch`]; its seq is the item's `seq` plus its index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEntry {
    pub id: ClientMsgId,
    pub sender: UserId,
    pub body: Body,
}

/// Sort key of each room's marker item: the writer's bookkeeping of the seqs it has reserved,
/// never a message (message seqs start at 1). The publisher skips it.
pub const MARKER_SEQ: Seq = Seq(0);

impl StoredBatch {
    /// Checks that the item is whole: at least one message, and `last` = `seq` + messages − 1.
    ///
    /// # Errors
    /// [`InvalidValue`] saying what does not add up.
    pub fn check(&self) -> Result<(), InvalidValue> {
        let count = self.msgs.len() as u64;
        if count == 0
            || self.seq == MARKER_SEQ
            || self.seq.0.checked_add(count - 1) != Some(self.last.0)
        {
            return Err(InvalidValue(format!(
                "item {}/{} holds {count} messages but ends at {}",
                self.room, self.seq, self.last
            )));
        }
        Ok(())
    }

    /// The item's messages as events, in seq order.
    pub fn into_events(self) -> impl Iterator<Item = MessageEvent> {
        let StoredBatch {
            room,
            seq,
            ts,
            msgs,
            ..
        } = self;
        msgs.into_iter()
            .zip(seq.0..)
            .map(move |(entry, seq)| MessageEvent {
                room: room.clone(),
                seq: Seq(seq),
                id: entry.id,
                sender: entry.sender,
                body: entry.body,
                ts: ts.clone(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: u64, last: u64, count: usize) -> StoredBatch {
        StoredBatch {
            room: RoomId::parse("lobby").unwrap(),
            seq: Seq(seq),
            last: Seq(last),
            ts: "2026-11-29T10:00:00.123Z".into(),
            ttl: 1,
            msgs: (0..count)
                .map(|i| StoredEntry {
                    id: ClientMsgId::parse(format!("m{i}")).unwrap(),
                    sender: UserId::parse("john").unwrap(),
                    body: Body::parse("hi").unwrap(),
                })
                .collect(),
        }
    }

    #[test]
    fn an_item_unpacks_into_consecutive_seqs_in_order() {
        let item = batch(7, 9, 3);
        item.check().unwrap();
        let events: Vec<(u64, String)> = item
            .into_events()
            .map(|e| (e.seq.0, e.id.to_string()))
            .collect();
        assert_eq!(
            events,
            [(7, "m0".into()), (8, "m1".into()), (9, "m2".into())]
        );
    }

    #[test]
    fn items_whose_range_does_not_match_their_messages_are_refused() {
        assert!(batch(7, 8, 3).check().is_err());
        assert!(batch(7, 10, 3).check().is_err());
        assert!(batch(7, 6, 0).check().is_err());
        assert!(batch(0, 2, 3).check().is_err(), "seq 0 is the marker's");
        assert!(batch(u64::MAX, 1, 3).check().is_err());
    }
}
