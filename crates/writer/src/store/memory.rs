//! An in-memory [`MessageStore`] with the same semantics as DynamoDB's, for unit tests.

use std::collections::HashMap;
use std::sync::Mutex;

use chorus_protocol::api::HistoryPage;
use chorus_protocol::{MessageEvent, RoomId, Seq};

use super::{Appended, MessageStore, NewMessage, StoreError, now_rfc3339_ms};

/// Rooms in a `HashMap` under one std `Mutex`: every section is short and never awaits.
#[derive(Debug, Default)]
pub struct MemoryStore {
    rooms: Mutex<HashMap<RoomId, Vec<MessageEvent>>>,
}

#[async_trait::async_trait]
impl MessageStore for MemoryStore {
    async fn append(&self, msg: NewMessage) -> Result<Appended, StoreError> {
        let mut rooms = self.rooms.lock().expect("memory store lock poisoned");
        let log = rooms.entry(msg.room.clone()).or_default();
        if let Some(existing) = log
            .iter()
            .find(|m| m.id == msg.id && m.sender == msg.sender)
        {
            return Ok(Appended {
                seq: existing.seq,
                ts: existing.ts.clone(),
                duplicate: true,
            });
        }
        let seq = Seq(log.len() as u64 + 1);
        let ts = now_rfc3339_ms();
        log.push(MessageEvent {
            room: msg.room,
            seq,
            id: msg.id,
            sender: msg.sender,
            body: msg.body,
            ts: ts.clone(),
        });
        Ok(Appended {
            seq,
            ts,
            duplicate: false,
        })
    }

    async fn history(
        &self,
        room: &RoomId,
        after: Seq,
        limit: u32,
    ) -> Result<HistoryPage, StoreError> {
        let rooms = self.rooms.lock().expect("memory store lock poisoned");
        let log = rooms.get(room).map(Vec::as_slice).unwrap_or_default();
        let messages = log
            .iter()
            .filter(|m| m.seq > after)
            .take(limit as usize)
            .cloned()
            .collect();
        Ok(HistoryPage {
            head: Seq(log.len() as u64),
            messages,
        })
    }
}
