//! Packing message events into SNS messages.
//!
//! SNS bills and delivers per message (up to 256 KiB each), so the publisher puts as many events
//! as fit into one [`BusPayload`], measured on the serialized bytes, keeping their order.

use chorus_protocol::{BusPayload, MessageEvent};

/// Largest SNS message body, in bytes.
pub const MAX_SNS_MESSAGE_BYTES: usize = 256 * 1024;

/// One SNS message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pack {
    /// Serialized [`BusPayload`], at most [`MAX_SNS_MESSAGE_BYTES`].
    pub payload: String,
    /// Batch index of the first record in this pack (where to resume if its publish fails). The
    /// events of one record (an item holds many messages) may be split over two packs: if the
    /// second fails, the record is resumed whole and its first part published again, which
    /// gateways drop as duplicates.
    pub first_index: usize,
    /// Number of events in the pack.
    pub len: usize,
}

/// Packs `events` (batch index, event), in order, into payloads of at most
/// [`MAX_SNS_MESSAGE_BYTES`]. Every event fits alone: bodies are capped at 16 KiB, so even fully
/// escaped an event stays far below the limit.
pub fn pack_events(events: &[(usize, MessageEvent)]) -> Vec<Pack> {
    pack_events_within(events, MAX_SNS_MESSAGE_BYTES)
}

fn pack_events_within(events: &[(usize, MessageEvent)], limit: usize) -> Vec<Pack> {
    // `{"v":1,"events":[` + `]}`, and one comma between events.
    let envelope = BusPayload::new(Vec::new()).to_json().len();
    let mut packs = Vec::new();
    let mut start = 0;
    let mut size = envelope;
    for (i, (_, event)) in events.iter().enumerate() {
        let event_size = serde_json::to_vec(event).map_or(0, |v| v.len());
        let added = event_size + usize::from(i > start);
        if i > start && size + added > limit {
            packs.push(make_pack(&events[start..i]));
            start = i;
            size = envelope + event_size;
        } else {
            size += added;
        }
    }
    if start < events.len() {
        packs.push(make_pack(&events[start..]));
    }
    packs
}

/// Size of the payload that would carry `events`, in bytes.
pub fn payload_bytes(events: &[MessageEvent]) -> usize {
    let envelope = BusPayload::new(Vec::new()).to_json().len();
    let bodies: usize = events
        .iter()
        .map(|e| serde_json::to_vec(e).map_or(0, |v| v.len()))
        .sum();
    envelope + bodies + events.len().saturating_sub(1)
}

fn make_pack(events: &[(usize, MessageEvent)]) -> Pack {
    let payload = BusPayload::new(events.iter().map(|(_, e)| e.clone()).collect()).to_json();
    Pack {
        payload,
        first_index: events[0].0,
        len: events.len(),
    }
}

#[cfg(test)]
mod tests {
    use chorus_protocol::{Body, ClientMsgId, RoomId, Seq, UserId};

    use super::*;

    fn event(room: &str, seq: u64, body_len: usize) -> MessageEvent {
        MessageEvent {
            room: RoomId::parse(room).unwrap(),
            seq: Seq(seq),
            id: ClientMsgId::parse(format!("m{seq}")).unwrap(),
            sender: UserId::parse("john").unwrap(),
            body: Body::parse("x".repeat(body_len)).unwrap(),
            ts: "2026-11-29T10:00:00.000Z".into(),
        }
    }

    #[test]
    fn small_batches_go_out_as_one_message() {
        let events: Vec<_> = (0..10)
            .map(|i| (i, event("lobby", i as u64 + 1, 100)))
            .collect();
        let packs = pack_events(&events);
        assert_eq!(packs.len(), 1);
        assert_eq!(packs[0].len, 10);
        let payload = BusPayload::parse(&packs[0].payload).unwrap();
        let seqs: Vec<u64> = payload.events.iter().map(|e| e.seq.0).collect();
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    }

    #[test]
    fn packs_respect_the_byte_limit_exactly_and_keep_order() {
        let events: Vec<_> = (0..200)
            .map(|i| {
                (
                    i * 2,
                    event(if i % 2 == 0 { "a" } else { "b" }, i as u64 + 1, 16 * 1024),
                )
            })
            .collect();
        let packs = pack_events(&events);
        assert!(packs.len() > 1);
        let mut seen = Vec::new();
        for pack in &packs {
            assert!(
                pack.payload.len() <= MAX_SNS_MESSAGE_BYTES,
                "{}",
                pack.payload.len()
            );
            let payload = BusPayload::parse(&pack.payload).unwrap();
            assert_eq!(payload.events.len(), pack.len);
            assert_eq!(pack.first_index, (payload.events[0].seq.0 as usize - 1) * 2);
            seen.extend(payload.events.into_iter().map(|e| e.seq.0));
        }
        assert_eq!(seen, (1..=200).collect::<Vec<_>>());
        // Each pack but the last is full: one more event would not have fit.
        let one_event = serde_json::to_vec(&events[0].1).unwrap().len();
        for pack in &packs[..packs.len() - 1] {
            assert!(pack.payload.len() + one_event + 1 > MAX_SNS_MESSAGE_BYTES);
        }
    }

    #[test]
    fn the_size_estimate_matches_the_serialized_payload() {
        let events: Vec<_> = (0..7)
            .map(|i| (i, event("lobby", i as u64 + 1, 10 + i)))
            .collect();
        let exact = pack_events(&events)[0].payload.len();
        assert_eq!(pack_events_within(&events, exact).len(), 1);
        assert_eq!(pack_events_within(&events, exact - 1).len(), 2);
    }

    #[test]
    fn a_record_split_over_two_packs_is_resumed_from_that_record() {
        // Record 0 holds 20 messages of 16 KiB: more than one SNS message can carry.
        let events: Vec<_> = (0..20)
            .map(|i| (0, event("lobby", i + 1, 16 * 1024)))
            .collect();
        let packs = pack_events(&events);
        assert_eq!(packs.len(), 2);
        assert_eq!((packs[0].first_index, packs[1].first_index), (0, 0));
        assert_eq!(packs[0].len + packs[1].len, 20);
    }

    #[test]
    fn no_events_no_packs() {
        assert!(pack_events(&[]).is_empty());
    }
}
