//! Bus arrivals into rooms: each message is serialized once, put in its room's order (duplicates
//! dropped, early arrivals held) and queued for every member above it. Fan-out never awaits: a
//! member whose queue is full is closed with the resume code, and resumes from history on
//! reconnect.

use chorus_protocol::{MessageEvent, Seq, ServerFrame, close};
use tokio::time::Instant;

use super::members::MemberHandle;
use super::ordering::Offer;
use super::outbox::{Frame, PushError};
use super::rooms::{Room, lock};
use super::{Hub, HubSettings};
use crate::metrics::GatewayMetrics;

/// One serialized message on its way to members.
#[derive(Debug, Clone)]
pub(super) struct Delivery {
    pub(super) seq: Seq,
    pub(super) frame: Frame,
}

pub(super) fn message_frame(event: &MessageEvent) -> Delivery {
    Delivery {
        seq: event.seq,
        frame: ServerFrame::Message(event.clone()).to_json().into(),
    }
}

impl Hub {
    /// A message from the bus. Dropped if no local member is in its room.
    pub(crate) fn ingest(&self, event: &MessageEvent) {
        let Some(room_arc) = self.room(&event.room) else {
            self.inner.metrics.bus_events_unrouted.inc();
            return;
        };
        let delivery = message_frame(event);
        let mut room = lock(&room_arc);
        room.last_arrival = Instant::now();
        let offer = room.order.offer(delivery.seq, delivery);
        let metrics = &self.inner.metrics;
        match &offer {
            Offer::Duplicate => metrics.bus_events_duplicate.inc(),
            Offer::Held => metrics.bus_events_held.inc(),
            Offer::Dropped => metrics.bus_events_dropped.inc(),
            Offer::Deliver(_) => {}
        }
        self.apply_offer(&mut room, offer);
    }

    pub(super) fn apply_offer(&self, room: &mut Room, offer: Offer<Delivery>) {
        if let Offer::Deliver(items) = offer {
            for item in &items {
                fan_out(room, item, &self.inner.settings, &self.inner.metrics);
            }
        }
        room.note_gap();
    }
}

/// Queues a frame without waiting; a full queue closes the connection with the resume code.
pub(super) fn send_or_kick(member: &MemberHandle, frame: Frame) -> bool {
    match member.outbox.try_push(frame) {
        Ok(()) => true,
        Err(PushError::Full) => {
            member.kick.kick(close::SLOW_CONSUMER);
            false
        }
        // The connection is gone; its clean-up removes it from the room.
        Err(PushError::Closed) => false,
    }
}

pub(super) fn fan_out(
    room: &mut Room,
    item: &Delivery,
    settings: &HubSettings,
    metrics: &GatewayMetrics,
) {
    // Counted once per message, not once per member: the loop is the hot path.
    let mut delivered = 0;
    for member in room.members.values_mut() {
        if item.seq <= member.last || member.dead {
            continue;
        }
        match &mut member.buffer {
            Some(buffer) => {
                let bytes = buffer.bytes + item.frame.len();
                if buffer.items.len() >= settings.max_join_buffer
                    || bytes > settings.max_join_buffer_bytes
                {
                    member.handle.kick.kick(close::SLOW_CONSUMER);
                    member.dead = true;
                    metrics.slow_consumers.inc();
                } else {
                    buffer.bytes = bytes;
                    buffer.items.push(item.clone());
                }
            }
            None => {
                if send_or_kick(&member.handle, item.frame.clone()) {
                    member.last = item.seq;
                    delivered += 1;
                } else {
                    member.dead = true;
                    metrics.slow_consumers.inc();
                }
            }
        }
    }
    metrics.delivered.add(delivered);
}
