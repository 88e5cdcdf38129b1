//! The table's items as DynamoDB sees them: encoding, DynamoDB's size rules (which decide both
//! the 400 KB limit and the bill), and the room marker.
//!
//! Items (partition key `room` S, sort key `seq` N):
//! - a run of messages ([`StoredBatch`]): `seq` ≥ 1 is its first seq, `last` its last, `msgs` the
//!   messages, `ts`, `ttl`;
//! - the room's marker ([`Marker`]), at `seq` = 0, without `ttl`: the seqs the writers have
//!   reserved, so a room whose items have all expired never reuses a seq.

use std::collections::HashMap;

use anyhow::Context as _;
use aws_sdk_dynamodb::types::AttributeValue;
use chorus_protocol::{RoomId, Seq, StoredBatch};

/// Largest item the writer writes, by DynamoDB's size rules: well under DynamoDB's 400 KB, so
/// one item is a cheap read and a small stream record. A message alone always fits (bodies are at
/// most 16 KiB).
pub const MAX_ITEM_BYTES: usize = 64 * 1024;
/// Most messages in one item, whatever their size.
pub const MAX_ITEM_MESSAGES: usize = 500;

/// A DynamoDB item.
pub(crate) type Item = HashMap<String, AttributeValue>;

/// The room's marker: every item of the room ends at or below `reserved`; when it was last
/// raised (`at_ms`), no item started at or above `floor` yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    pub reserved: u64,
    pub floor: u64,
    pub at_ms: u64,
}

pub(crate) fn encode_batch(batch: &StoredBatch) -> anyhow::Result<Item> {
    serde_dynamo::to_item(batch).context("encoding an item")
}

pub(crate) fn decode_batch(item: Item) -> anyhow::Result<StoredBatch> {
    let batch: StoredBatch = serde_dynamo::from_item(item).context("decoding an item")?;
    batch.check().context("a stored item does not add up")?;
    Ok(batch)
}

pub(crate) fn encode_marker(room: &RoomId, marker: &Marker) -> Item {
    HashMap::from([
        ("room".to_owned(), AttributeValue::S(room.to_string())),
        (
            "seq".to_owned(),
            AttributeValue::N(chorus_protocol::message::MARKER_SEQ.to_string()),
        ),
        (
            "reserved".to_owned(),
            AttributeValue::N(marker.reserved.to_string()),
        ),
        (
            "floor".to_owned(),
            AttributeValue::N(marker.floor.to_string()),
        ),
        (
            "at_ms".to_owned(),
            AttributeValue::N(marker.at_ms.to_string()),
        ),
    ])
}

pub(crate) fn decode_marker(item: &Item) -> anyhow::Result<Marker> {
    let number = |name: &str| -> anyhow::Result<u64> {
        match item.get(name) {
            Some(AttributeValue::N(n)) => n
                .parse()
                .with_context(|| format!("marker attribute {name} is not a u64: {n:?}")),
            _ => anyhow::bail!("marker has no numeric attribute {name}"),
        }
    };
    Ok(Marker {
        reserved: number("reserved")?,
        floor: number("floor")?,
        at_ms: number("at_ms")?,
    })
}

/// The room key of a sort key value `seq`.
pub(crate) fn key(room: &RoomId, seq: Seq) -> Item {
    HashMap::from([
        ("room".to_owned(), AttributeValue::S(room.to_string())),
        ("seq".to_owned(), AttributeValue::N(seq.to_string())),
    ])
}

/// An item's size by DynamoDB's rules: per attribute its name's UTF-8 bytes plus its value's
/// size; a string is its UTF-8 bytes; a number about one byte per two significant digits plus
/// one; a list or map 3 bytes plus 1 per element plus its elements (a map's names included).
pub fn item_bytes(item: &HashMap<String, AttributeValue>) -> usize {
    item.iter()
        .map(|(name, value)| name.len() + value_bytes(value))
        .sum()
}

fn value_bytes(value: &AttributeValue) -> usize {
    match value {
        AttributeValue::S(s) => s.len(),
        AttributeValue::N(n) => number_bytes(n),
        AttributeValue::B(b) => b.as_ref().len(),
        AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
        AttributeValue::L(list) => 3 + list.iter().map(|v| 1 + value_bytes(v)).sum::<usize>(),
        AttributeValue::M(map) => {
            3 + map
                .iter()
                .map(|(name, v)| 1 + name.len() + value_bytes(v))
                .sum::<usize>()
        }
        AttributeValue::Ss(set) => set.iter().map(String::len).sum(),
        AttributeValue::Ns(set) => set.iter().map(|n| number_bytes(n)).sum(),
        AttributeValue::Bs(set) => set.iter().map(|b| b.as_ref().len()).sum(),
        _ => 0,
    }
}

fn number_bytes(n: &str) -> usize {
    let digits: String = n.chars().filter(char::is_ascii_digit).collect();
    let significant = digits
        .trim_start_matches('0')
        .trim_end_matches('0')
        .len()
        .max(1);
    significant.div_ceil(2) + 1
}

/// Write units DynamoDB bills for writing an item of `bytes`: one per started KB.
pub fn write_units(bytes: usize) -> u64 {
    bytes.div_ceil(1024).max(1) as u64
}

/// Read units of a consistent read of `bytes`: one per started 4 KB.
pub(crate) fn read_units(bytes: usize) -> u64 {
    bytes.div_ceil(4096).max(1) as u64
}

/// The size of a batch's attributes other than its messages, computed without encoding it.
/// Together with [`entry_bytes`] it is tested equal to [`item_bytes`] of the encoding, which
/// keeps [`batch_overhead_bound`] honest.
#[cfg(test)]
fn batch_bytes_without_msgs(room: &RoomId, seq: Seq, last: Seq, ts: &str, ttl: u64) -> usize {
    "room".len()
        + room.as_str().len()
        + "seq".len()
        + number_bytes(&seq.to_string())
        + "last".len()
        + number_bytes(&last.to_string())
        + "ts".len()
        + ts.len()
        + "ttl".len()
        + number_bytes(&ttl.to_string())
        + "msgs".len()
        + 3
}

/// What one message adds to an item's size (its map inside the `msgs` list).
pub(crate) fn entry_bytes(id: &str, sender: &str, body: &str) -> usize {
    // The list element (1) and the map (3), plus per attribute 1 + name + value.
    1 + 3
        + (1 + "id".len() + id.len())
        + (1 + "sender".len() + sender.len())
        + (1 + "body".len() + body.len())
}

/// An upper bound of [`batch_bytes_without_msgs`] for any seq, last and ttl (numbers of at most
/// 20 digits), so the queue can be cut before the seqs are known.
pub(crate) fn batch_overhead_bound(room: &RoomId) -> usize {
    let max_number = 20usize.div_ceil(2) + 1;
    "room".len()
        + room.as_str().len()
        + "seq".len()
        + "last".len()
        + "ttl".len()
        + 3 * max_number
        + "ts".len()
        + "2026-11-29T10:00:00.123Z".len()
        + "msgs".len()
        + 3
}

#[cfg(test)]
mod tests {
    use chorus_protocol::{Body, ClientMsgId, StoredEntry, UserId};

    use super::*;

    fn batch(count: usize, body: &str) -> StoredBatch {
        StoredBatch {
            room: RoomId::parse("lobby").unwrap(),
            seq: Seq(1_000_001),
            last: Seq(1_000_000 + count as u64),
            ts: "2026-11-29T10:00:00.123Z".into(),
            ttl: 1_798_531_200,
            msgs: (0..count)
                .map(|i| StoredEntry {
                    id: ClientMsgId::parse(format!("m-{i}")).unwrap(),
                    sender: UserId::parse("john@example.com").unwrap(),
                    body: Body::parse(body).unwrap(),
                })
                .collect(),
        }
    }

    #[test]
    fn the_size_computed_from_parts_is_the_size_of_the_encoded_item() {
        for (count, body) in [(1, "x"), (3, "héllo wörld"), (64, &"y".repeat(200)[..])] {
            let b = batch(count, body);
            let parts = batch_bytes_without_msgs(&b.room, b.seq, b.last, &b.ts, b.ttl)
                + b.msgs
                    .iter()
                    .map(|m| entry_bytes(m.id.as_str(), m.sender.as_str(), m.body.as_str()))
                    .sum::<usize>();
            assert_eq!(
                parts,
                item_bytes(&encode_batch(&b).unwrap()),
                "{count} × {body:?}"
            );
            assert!(
                batch_overhead_bound(&b.room)
                    >= batch_bytes_without_msgs(&b.room, b.seq, b.last, &b.ts, b.ttl)
            );
        }
    }

    #[test]
    fn sizes_follow_dynamodb_rules() {
        // "room" (4) + "lobby" (5), "seq" (3) + 12345 (3 digits pairs → 3 + 1 = 4).
        let item = key(&RoomId::parse("lobby").unwrap(), Seq(12345));
        assert_eq!(item_bytes(&item), 4 + 5 + 3 + 4);
        assert_eq!(number_bytes("100"), 2, "trailing zeros are not significant");
        assert_eq!(write_units(1024), 1);
        assert_eq!(write_units(1025), 2);
        assert_eq!(write_units(0), 1);
        assert_eq!(read_units(4097), 2);
    }

    #[test]
    fn a_512_byte_message_alone_is_one_write_unit() {
        let b = batch(1, &"z".repeat(512));
        assert_eq!(write_units(item_bytes(&encode_batch(&b).unwrap())), 1);
    }

    #[test]
    fn items_and_markers_round_trip() {
        let b = batch(2, "hi");
        assert_eq!(decode_batch(encode_batch(&b).unwrap()).unwrap(), b);
        let m = Marker {
            reserved: 10_000,
            floor: 1,
            at_ms: 1_796_000_000_000,
        };
        assert_eq!(decode_marker(&encode_marker(&b.room, &m)).unwrap(), m);
        let mut broken = encode_batch(&b).unwrap();
        broken.insert("last".into(), AttributeValue::N("1000005".into()));
        assert!(
            decode_batch(broken).is_err(),
            "an item whose range does not match is refused"
        );
    }
}
