//! Each room's repair task: SNS may lose or delay a message, so a hole in a room's sequence that
//! does not fill within the gap timeout is fetched from the writer's history, and a quiet room's
//! head is read now and then in case its *last* message was lost (no later arrival would reveal
//! the hole). A hole the writer cannot fill ends the room on this gateway ([`Hub::resync`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chorus_protocol::api::MAX_HISTORY_LIMIT;
use chorus_protocol::{RoomId, Seq, close};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::fanout::message_frame;
use super::rooms::{Room, close_room, lock};
use super::{Hub, HubSettings};
use crate::Chain;
use crate::writer_client::LogError;

/// What the repair task does next.
#[derive(Debug, PartialEq, Eq)]
enum Repair {
    /// Fetch up to `limit` messages after `after`: a hole that did not fill from the bus.
    Fill { after: Seq, limit: u32 },
    /// Read the room's head: a quiet room may have lost its last message.
    CheckTail,
}

/// When a room's tail is checked next: the base interval after the later of the last arrival
/// and the last check, doubling (up to the ceiling) with each check that finds nothing while
/// nothing arrives.
struct TailSchedule {
    base: Duration,
    max: Duration,
    last_check: Instant,
    /// Checks in a row that found nothing with no arrival between them.
    quiet_checks: u32,
    /// The arrival seen at the last check: a newer one resets the interval.
    arrival_at_check: Instant,
}

impl TailSchedule {
    fn new(settings: &HubSettings, now: Instant) -> Self {
        TailSchedule {
            base: settings.tail_check,
            max: settings.tail_check_max.max(settings.tail_check),
            last_check: now,
            quiet_checks: 0,
            arrival_at_check: now,
        }
    }

    fn due(&self, last_arrival: Instant) -> Instant {
        let quiet_checks = if last_arrival == self.arrival_at_check {
            self.quiet_checks
        } else {
            0
        };
        let interval = self
            .base
            .saturating_mul(1 << quiet_checks.min(16))
            .min(self.max);
        last_arrival.max(self.last_check) + interval
    }

    fn checked(&mut self, last_arrival: Instant, found: bool) {
        self.quiet_checks = if found || last_arrival != self.arrival_at_check {
            0
        } else {
            self.quiet_checks.saturating_add(1)
        };
        self.arrival_at_check = last_arrival;
        self.last_check = Instant::now();
    }
}

impl Hub {
    /// Checks every room's tail now: after the bus may have lost messages, e.g. while the
    /// subscription was gone.
    pub(crate) fn repair_all(&self) {
        for (_, room_arc) in self.inner.rooms.all() {
            let mut room = lock(&room_arc);
            room.check_now = true;
            room.wake.notify_one();
        }
    }

    /// The room's repair task, one per room for as long as the room exists: fills holes after
    /// the gap timeout and checks a quiet room's tail (see the module docs). It sleeps until
    /// the next deadline or a wake-up and ends when the room closes.
    pub(super) async fn repair_loop(
        self,
        room_id: RoomId,
        room_arc: Arc<Mutex<Room>>,
        wake: Arc<Notify>,
    ) {
        let mut tail = TailSchedule::new(&self.inner.settings, lock(&room_arc).last_arrival);
        loop {
            let deadline = {
                let room = lock(&room_arc);
                if room.closed {
                    return;
                }
                match room.gap_since {
                    Some(since) => since + self.inner.settings.gap_timeout,
                    // The head is being read by the first join: nothing to check yet.
                    None if room.order.head().is_none() => {
                        Instant::now() + self.inner.settings.tail_check
                    }
                    None if room.check_now => Instant::now(),
                    None => tail.due(room.last_arrival),
                }
            };
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                () = wake.notified() => continue,
            }
            let repair = {
                let mut room = lock(&room_arc);
                if room.closed {
                    return;
                }
                self.next_repair(&mut room, &tail)
            };
            match repair {
                Some(Repair::Fill { after, limit }) => {
                    self.fill(&room_id, &room_arc, after, limit).await;
                }
                Some(Repair::CheckTail) => {
                    let found = self.check_tail(&room_id, &room_arc).await;
                    tail.checked(lock(&room_arc).last_arrival, found);
                }
                None => {}
            }
        }
    }

    /// What the repair task should do now, if anything.
    fn next_repair(&self, room: &mut Room, tail: &TailSchedule) -> Option<Repair> {
        let now = Instant::now();
        match (room.order.gap(), room.gap_since) {
            (Some((after, before)), Some(since))
                if now >= since + self.inner.settings.gap_timeout =>
            {
                let wanted = before.0.saturating_sub(after.0 + 1);
                let limit = u32::try_from(wanted.clamp(1, u64::from(MAX_HISTORY_LIMIT)))
                    .unwrap_or(MAX_HISTORY_LIMIT);
                Some(Repair::Fill { after, limit })
            }
            (None, _) if room.order.head().is_some() => {
                let asked = std::mem::take(&mut room.check_now);
                (asked || now >= tail.due(room.last_arrival)).then_some(Repair::CheckTail)
            }
            _ => None,
        }
    }

    /// Reads the room's head (a single small read): if it is beyond what the room delivered, the
    /// missing tail is a hole, fetched at once. Returns whether it found one.
    async fn check_tail(&self, room_id: &RoomId, room_arc: &Arc<Mutex<Room>>) -> bool {
        let head = match self.inner.log.history(room_id, Seq(0), 0).await {
            Ok(page) => page.head,
            Err(e) => {
                tracing::warn!(room = %room_id, error.message = %Chain(&e), "reading the room head failed: retrying later");
                return false;
            }
        };
        let after = {
            let mut room = lock(room_arc);
            if room.closed {
                return false;
            }
            room.order.note_exists(head);
            let Some((after, _)) = room.order.gap() else {
                return false;
            };
            // The writer says the tail exists: no point waiting for the bus.
            room.gap_since = Some(Instant::now());
            after
        };
        self.inner.metrics.tail_fills.inc();
        let wanted = head
            .0
            .saturating_sub(after.0)
            .clamp(1, u64::from(MAX_HISTORY_LIMIT));
        self.fill(
            room_id,
            room_arc,
            after,
            u32::try_from(wanted).unwrap_or(MAX_HISTORY_LIMIT),
        )
        .await;
        true
    }

    /// Reads history after `after` to fill a hole and offers it to the room's order. A hole the
    /// writer cannot fill (expired, or answered again and again without the missing seqs) ends
    /// the room: see [`Self::resync`].
    async fn fill(&self, room_id: &RoomId, room_arc: &Arc<Mutex<Room>>, after: Seq, limit: u32) {
        let result = self.inner.log.history(room_id, after, limit).await;
        let mut room = lock(room_arc);
        if room.closed {
            return;
        }
        match result {
            Ok(page) => {
                self.inner.metrics.gap_fills.inc();
                tracing::debug!(room = %room_id, %after, fetched = page.messages.len(), "gap repaired from history");
                for event in &page.messages {
                    let delivery = message_frame(event);
                    let offer = room.order.offer(delivery.seq, delivery);
                    self.apply_offer(&mut room, offer);
                }
                if room.order.head().is_some_and(|head| head > after) {
                    return;
                }
                room.failed_fills += 1;
                tracing::warn!(room = %room_id, %after, attempts = room.failed_fills, "the writer's history does not have the missing seq");
            }
            Err(e @ LogError::Expired { .. }) => {
                tracing::warn!(room = %room_id, %after, error.message = %Chain(&e), "the missing seqs have expired");
                room.failed_fills = self.inner.settings.max_repair_attempts;
            }
            Err(e) => {
                tracing::warn!(room = %room_id, error.message = %Chain(&e), "history read for a gap failed: retrying");
            }
        }
        if room.failed_fills >= self.inner.settings.max_repair_attempts {
            drop(room);
            self.resync(room_id, room_arc);
        } else {
            // Try again after another gap timeout.
            room.gap_since = Some(Instant::now());
        }
    }

    /// Gives up on a room whose hole cannot be filled: every member is closed with
    /// [`close::RESYNC`] (they resume from history, which tells them what is lost) and the room
    /// goes, so the next join starts from the writer's head.
    fn resync(&self, room_id: &RoomId, room_arc: &Arc<Mutex<Room>>) {
        let mut rooms = self.inner.rooms.write(room_id);
        let mut room = lock(room_arc);
        if room.closed {
            return;
        }
        tracing::warn!(room = %room_id, members = room.members.len(), "a hole could not be filled: closing the room's members with RESYNC");
        self.inner.metrics.resyncs.inc();
        for member in room.members.values() {
            member.handle.kick.kick(close::RESYNC);
        }
        self.inner
            .metrics
            .room_members
            .add(-i64::try_from(room.members.len()).unwrap_or(i64::MAX));
        room.members.clear();
        close_room(&mut rooms, room_id, room_arc, &mut room);
    }
}
