//! Per-room order: SNS delivers at least once and in any order; clients must see each seq once,
//! in order. [`RoomOrder`] turns the arrivals into that: duplicates dropped, early arrivals held
//! (bounded) until the hole before them fills, and the hole reported so the caller can fetch it
//! from the writer's history after a timeout.
//!
//! Pure data structure, no I/O and no clock: the hub drives it and owns the timer.

use std::collections::BTreeMap;

use chorus_protocol::Seq;

/// What happened to an offered item.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Offer<T> {
    /// These items, in seq order, are next: deliver them now (the offered one and any held ones it
    /// unblocked).
    Deliver(Vec<T>),
    /// Held until the seqs before it arrive.
    Held,
    /// Already delivered or already held: dropped.
    Duplicate,
    /// Too far ahead to hold (the buffer is full): dropped; the gap fill will fetch it.
    Dropped,
}

/// The ordering state of one room.
#[derive(Debug)]
pub(crate) struct RoomOrder<T> {
    /// Last seq delivered; `None` until the room's head is learned from the writer.
    head: Option<Seq>,
    held: BTreeMap<Seq, T>,
    max_held: usize,
    /// Highest seq ever offered: above the head with nothing held means items were dropped.
    highest_seen: Seq,
}

impl<T> RoomOrder<T> {
    /// A room whose head is not known yet: everything offered is held until [`Self::start_at`].
    pub(crate) fn new(max_held: usize) -> Self {
        RoomOrder {
            head: None,
            held: BTreeMap::new(),
            max_held,
            highest_seen: Seq(0),
        }
    }

    /// The last seq delivered, if known.
    pub(crate) fn head(&self) -> Option<Seq> {
        self.head
    }

    /// Sets the head (the room's latest seq according to the writer) if it was not known, and
    /// returns the held items that follow it. Items at or below the head are dropped: they were
    /// stored before this gateway started following the room.
    pub(crate) fn start_at(&mut self, head: Seq) -> Vec<T> {
        if self.head.is_some() {
            return Vec::new();
        }
        self.head = Some(head);
        self.held = self.held.split_off(&head.next());
        self.drain()
    }

    /// Offers the item with seq `seq`.
    pub(crate) fn offer(&mut self, seq: Seq, item: T) -> Offer<T> {
        self.highest_seen = self.highest_seen.max(seq);
        if self.head.is_some_and(|head| seq <= head) || self.held.contains_key(&seq) {
            return Offer::Duplicate;
        }
        let next = self.head.map(Seq::next);
        if next == Some(seq) {
            self.held.insert(seq, item);
            return Offer::Deliver(self.drain());
        }
        if self.held.len() >= self.max_held {
            // Keep the lowest seqs: they unblock delivery first. Evict the highest if the new one
            // is lower.
            match self.held.last_key_value() {
                Some((&highest, _)) if seq < highest => {
                    self.held.remove(&highest);
                }
                _ => return Offer::Dropped,
            }
        }
        self.held.insert(seq, item);
        Offer::Held
    }

    /// The missing range `(after, before)`: seqs `after+1 ..= before-1` have not arrived but a
    /// later one has (held, or dropped because the buffer was full). `None` when nothing is
    /// missing or the head is unknown.
    pub(crate) fn gap(&self) -> Option<(Seq, Seq)> {
        let head = self.head?;
        match self.held.first_key_value() {
            Some((&first, _)) => Some((head, first)),
            None if self.highest_seen > head => Some((head, self.highest_seen.next())),
            None => None,
        }
    }

    /// Records that `seq` exists (the writer says so) even though it has not arrived: if it is
    /// above the head, [`Self::gap`] reports the hole up to it.
    pub(crate) fn note_exists(&mut self, seq: Seq) {
        self.highest_seen = self.highest_seen.max(seq);
    }

    /// Number of items held.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.len()
    }

    fn drain(&mut self) -> Vec<T> {
        let mut out = Vec::new();
        let Some(mut head) = self.head else {
            return out;
        };
        while let Some(entry) = self.held.first_entry() {
            if *entry.key() != head.next() {
                break;
            }
            head = head.next();
            out.push(entry.remove());
        }
        self.head = Some(head);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(head: u64) -> RoomOrder<u64> {
        let mut order = RoomOrder::new(4);
        assert!(order.start_at(Seq(head)).is_empty());
        order
    }

    #[test]
    fn in_order_arrivals_are_delivered_at_once() {
        let mut order = started(0);
        assert_eq!(order.offer(Seq(1), 1), Offer::Deliver(vec![1]));
        assert_eq!(order.offer(Seq(2), 2), Offer::Deliver(vec![2]));
        assert_eq!(order.head(), Some(Seq(2)));
        assert_eq!(order.gap(), None);
    }

    #[test]
    fn duplicates_are_dropped_whether_delivered_or_held() {
        let mut order = started(0);
        order.offer(Seq(1), 1);
        assert_eq!(order.offer(Seq(1), 1), Offer::Duplicate);
        assert_eq!(order.offer(Seq(3), 3), Offer::Held);
        assert_eq!(order.offer(Seq(3), 3), Offer::Duplicate);
    }

    #[test]
    fn early_arrivals_wait_for_the_hole_then_flow_in_order() {
        let mut order = started(10);
        assert_eq!(order.offer(Seq(13), 13), Offer::Held);
        assert_eq!(order.offer(Seq(12), 12), Offer::Held);
        assert_eq!(order.gap(), Some((Seq(10), Seq(12))));
        assert_eq!(order.offer(Seq(11), 11), Offer::Deliver(vec![11, 12, 13]));
        assert_eq!(order.gap(), None);
        assert_eq!(order.head(), Some(Seq(13)));
    }

    #[test]
    fn arrivals_before_the_head_is_known_are_held_then_trimmed() {
        let mut order = RoomOrder::new(8);
        assert_eq!(order.offer(Seq(5), 5), Offer::Held);
        assert_eq!(order.offer(Seq(6), 6), Offer::Held);
        assert_eq!(order.offer(Seq(8), 8), Offer::Held);
        assert_eq!(order.gap(), None, "no gap while the head is unknown");
        // The writer says the room is at 5: 5 was stored before, 6 follows, 8 waits for 7.
        assert_eq!(order.start_at(Seq(5)), vec![6]);
        assert_eq!(order.gap(), Some((Seq(6), Seq(8))));
        // A later start_at changes nothing.
        assert!(order.start_at(Seq(100)).is_empty());
        assert_eq!(order.head(), Some(Seq(6)));
    }

    #[test]
    fn a_seq_known_to_exist_opens_a_gap_up_to_it() {
        let mut order = started(3);
        order.note_exists(Seq(2));
        assert_eq!(order.gap(), None);
        order.note_exists(Seq(5));
        assert_eq!(order.gap(), Some((Seq(3), Seq(6))));
        assert_eq!(order.offer(Seq(4), 4), Offer::Deliver(vec![4]));
        assert_eq!(order.offer(Seq(5), 5), Offer::Deliver(vec![5]));
        assert_eq!(order.gap(), None);
    }

    #[test]
    fn the_buffer_is_bounded_and_keeps_the_lowest_seqs() {
        let mut order = started(0);
        for seq in [5, 6, 7, 8] {
            assert_eq!(order.offer(Seq(seq), seq), Offer::Held);
        }
        assert_eq!(order.offer(Seq(9), 9), Offer::Dropped);
        assert_eq!(order.offer(Seq(3), 3), Offer::Held, "evicts 8");
        assert_eq!(order.held(), 4);
        assert_eq!(order.offer(Seq(1), 1), Offer::Deliver(vec![1]));
        assert_eq!(order.offer(Seq(2), 2), Offer::Deliver(vec![2, 3]));
        assert_eq!(order.offer(Seq(4), 4), Offer::Deliver(vec![4, 5, 6, 7]));
        // 8 and 9 were dropped: the gap fill must fetch them.
        assert_eq!(order.gap(), Some((Seq(7), Seq(10))));
        assert_eq!(order.offer(Seq(8), 8), Offer::Deliver(vec![8]));
        assert_eq!(order.gap(), Some((Seq(8), Seq(10))));
        assert_eq!(order.offer(Seq(10), 10), Offer::Held);
        assert_eq!(order.gap(), Some((Seq(8), Seq(10))));
        assert_eq!(order.offer(Seq(9), 9), Offer::Deliver(vec![9, 10]));
        assert_eq!(order.gap(), None);
    }
}
