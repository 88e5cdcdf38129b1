//! A room's dedupe window: recent (sender, id) → original seq and ts, learned from the items the
//! writer wrote and read. Entries go in in seq order; the oldest leave once the window has more
//! than its message count *and* they are older than its duration, or when it holds more than its
//! memory cap.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use chorus_protocol::{ClientMsgId, Seq, StoredBatch, UserId};

/// The original answer to a send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Original {
    pub(crate) seq: Seq,
    /// Shared by every message of an item.
    pub(crate) ts: Arc<str>,
}

type Key = (UserId, ClientMsgId);

#[derive(Debug, Default)]
pub(crate) struct DedupeWindow {
    by_key: HashMap<Key, Original>,
    /// In seq order: the key and when it was stored (ms since the epoch).
    order: VecDeque<(Key, u64)>,
}

/// How long and how deep a window reaches, and the most it may hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WindowSize {
    pub(crate) messages: usize,
    pub(crate) duration_ms: u64,
    pub(crate) cap: usize,
}

impl DedupeWindow {
    /// The original of a send, if it is inside the window at `now_ms`.
    pub(crate) fn lookup(
        &mut self,
        sender: &UserId,
        id: &ClientMsgId,
        size: WindowSize,
        now_ms: u64,
    ) -> Option<Original> {
        self.trim(size, now_ms);
        self.get(sender, id).cloned()
    }

    fn get(&self, sender: &UserId, id: &ClientMsgId) -> Option<&Original> {
        // Borrowed lookup would need a custom key type; clones of two short strings are cheap next
        // to a network round trip.
        self.by_key.get(&(sender.clone(), id.clone()))
    }

    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }

    /// Adds every message of `item` (which must follow what the window holds), then trims.
    pub(crate) fn add(
        &mut self,
        item: &StoredBatch,
        stored_ms: u64,
        size: WindowSize,
        now_ms: u64,
    ) {
        let ts: Arc<str> = Arc::from(item.ts.as_str());
        for (entry, seq) in item.msgs.iter().zip(item.seq.0..) {
            let key = (entry.sender.clone(), entry.id.clone());
            let original = Original {
                seq: Seq(seq),
                ts: Arc::clone(&ts),
            };
            // A second message with the same key would be a bug of an earlier writer: keep the
            // first, which is the one a retry was answered with.
            if let Entry::Vacant(slot) = self.by_key.entry(key.clone()) {
                slot.insert(original);
                self.order.push_back((key, stored_ms));
            }
        }
        self.trim(size, now_ms);
    }

    /// Drops the oldest entries the window no longer has to hold.
    pub(crate) fn trim(&mut self, size: WindowSize, now_ms: u64) {
        while let Some((key, stored_ms)) = self.order.front() {
            let over_count = self.order.len() > size.messages;
            let over_age = now_ms.saturating_sub(*stored_ms) >= size.duration_ms;
            if (over_count && over_age) || self.order.len() > size.cap {
                self.by_key.remove(key);
                self.order.pop_front();
            } else {
                break;
            }
        }
    }

    /// Whether a window holding `count` entries, the oldest stored at `oldest_ms`, already reaches
    /// as far back as it must.
    pub(crate) fn reaches(size: WindowSize, count: usize, oldest_ms: u64, now_ms: u64) -> bool {
        count >= size.cap
            || (count >= size.messages && now_ms.saturating_sub(oldest_ms) >= size.duration_ms)
    }
}

#[cfg(test)]
mod tests {
    use chorus_protocol::{Body, RoomId, StoredEntry};

    use super::*;

    fn item(first: u64, ids: &[&str]) -> StoredBatch {
        StoredBatch {
            room: RoomId::parse("lobby").unwrap(),
            seq: Seq(first),
            last: Seq(first + ids.len() as u64 - 1),
            ts: format!("ts-{first}"),
            ttl: 0,
            msgs: ids
                .iter()
                .map(|id| StoredEntry {
                    id: ClientMsgId::parse(*id).unwrap(),
                    sender: UserId::parse("john").unwrap(),
                    body: Body::parse("x").unwrap(),
                })
                .collect(),
        }
    }

    fn has(w: &DedupeWindow, id: &str) -> Option<u64> {
        w.get(
            &UserId::parse("john").unwrap(),
            &ClientMsgId::parse(id).unwrap(),
        )
        .map(|o| o.seq.0)
    }

    const SIZE: WindowSize = WindowSize {
        messages: 3,
        duration_ms: 1000,
        cap: 5,
    };

    #[test]
    fn entries_stay_while_young_or_among_the_last_n() {
        let mut w = DedupeWindow::default();
        w.add(&item(1, &["a", "b"]), 0, SIZE, 0);
        w.add(&item(3, &["c", "d"]), 0, SIZE, 999);
        // 4 entries, more than 3, but all younger than 1 s: all kept.
        assert_eq!((has(&w, "a"), has(&w, "d")), (Some(1), Some(4)));
        // At exactly 1 s the oldest beyond the last 3 goes; the last 3 stay however old.
        w.trim(SIZE, 1000);
        assert_eq!((has(&w, "a"), has(&w, "b")), (None, Some(2)));
        w.trim(SIZE, 1_000_000);
        assert_eq!(w.len(), 3);
        assert_eq!(has(&w, "b"), Some(2));
    }

    #[test]
    fn the_cap_wins_over_age() {
        let mut w = DedupeWindow::default();
        w.add(&item(1, &["a", "b", "c", "d", "e", "f", "g"]), 0, SIZE, 0);
        assert_eq!(w.len(), 5);
        assert_eq!(has(&w, "b"), None);
        assert_eq!(has(&w, "c"), Some(3));
    }

    #[test]
    fn items_share_their_ts_and_a_repeated_key_keeps_the_first_seq() {
        let mut w = DedupeWindow::default();
        w.add(&item(1, &["a", "b"]), 0, SIZE, 0);
        w.add(&item(3, &["a"]), 0, SIZE, 0);
        let sender = UserId::parse("john").unwrap();
        let a = w.get(&sender, &ClientMsgId::parse("a").unwrap()).unwrap();
        let b = w.get(&sender, &ClientMsgId::parse("b").unwrap()).unwrap();
        assert_eq!((a.seq.0, &*a.ts), (1, "ts-1"));
        assert!(Arc::ptr_eq(&a.ts, &b.ts));
    }
}
