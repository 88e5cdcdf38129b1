//! A room's members: who they are ([`ConnId`]), how the hub reaches them ([`MemberHandle`]: the
//! connection's queue and a [`Kick`] that closes it), where each one is in the room's sequence,
//! and leaving.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};

use chorus_protocol::{RoomId, Seq};
use tokio_util::sync::CancellationToken;

use super::Hub;
use super::fanout::Delivery;
use super::outbox::Outbox;
use super::rooms::{Room, lock};

/// Identifies one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConnId(u64);

impl ConnId {
    /// A process-unique id.
    pub(crate) fn next() -> ConnId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ConnId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Asks a connection to close with a code; the first code wins.
#[derive(Debug, Clone, Default)]
pub(crate) struct Kick {
    token: CancellationToken,
    code: Arc<AtomicU16>,
}

impl Kick {
    pub(crate) fn kick(&self, code: u16) {
        let _ = self
            .code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        self.token.cancel();
    }

    /// Resolves once kicked, with the close code.
    pub(crate) async fn kicked(&self) -> u16 {
        self.token.cancelled().await;
        self.code.load(Ordering::Acquire)
    }
}

/// The hub's handle on one connection.
#[derive(Debug, Clone)]
pub(crate) struct MemberHandle {
    pub(crate) id: ConnId,
    pub(crate) outbox: Outbox,
    pub(crate) kick: Kick,
}

/// A connection in one room.
pub(super) struct Member {
    pub(super) handle: MemberHandle,
    /// Last seq given to this member.
    pub(super) last: Seq,
    /// `Some` while the member's replay runs: live messages wait here.
    pub(super) buffer: Option<JoinBuffer>,
    /// A frame could not be queued: the connection is closing and must get nothing more, or it
    /// would see a hole.
    pub(super) dead: bool,
}

/// Live messages kept for a member while its replay runs.
#[derive(Default)]
pub(super) struct JoinBuffer {
    pub(super) items: Vec<Delivery>,
    pub(super) bytes: usize,
}

impl Hub {
    /// Removes the member from the room; the room goes when its last member does.
    pub(crate) fn leave(&self, id: ConnId, room_id: &RoomId) {
        if let Some(room_arc) = self.room(room_id) {
            self.remove_member(room_id, &room_arc, id);
        }
    }

    pub(super) fn remove_member(&self, room_id: &RoomId, room_arc: &Arc<Mutex<Room>>, id: ConnId) {
        if lock(room_arc).members.remove(&id).is_some() {
            self.inner.metrics.room_members.dec();
        }
        self.close_if_empty(room_id, room_arc);
    }
}
