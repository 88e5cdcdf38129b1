//! The room map and one room's state. A room lives in the map while it has members (or a join
//! is reading its head); the map is sharded so that fan-out to one room and joins of another
//! never wait on the same lock.
//!
//! Locking: each shard is a `std::sync::RwLock` (read on the hot path, written when a room
//! appears or empties); each room is a `std::sync::Mutex`. Neither is held across an `.await`.
//! Lock order: shard, then room.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use chorus_protocol::RoomId;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::fanout::Delivery;
use super::members::{ConnId, Member};
use super::ordering::RoomOrder;
use super::{Hub, HubSettings};

pub(super) type Rooms = HashMap<RoomId, Arc<Mutex<Room>>>;

/// One room with local members.
pub(super) struct Room {
    pub(super) order: RoomOrder<Delivery>,
    pub(super) members: HashMap<ConnId, Member>,
    /// When the current hole was first seen; `None` while the sequence is whole.
    pub(super) gap_since: Option<Instant>,
    /// Fetches of the current hole that brought nothing.
    pub(super) failed_fills: u32,
    /// The last bus arrival (or the room's creation).
    pub(super) last_arrival: Instant,
    /// Check the tail at once (after the bus may have lost messages).
    pub(super) check_now: bool,
    /// Wakes the room's repair task: a hole appeared, a check is asked for, or the room closed.
    pub(super) wake: Arc<Notify>,
    /// Removed from the map (emptied or resynced): joins must look it up again.
    pub(super) closed: bool,
}

impl Room {
    pub(super) fn new(settings: &HubSettings) -> Self {
        Room {
            order: RoomOrder::new(settings.max_held_per_room),
            members: HashMap::new(),
            gap_since: None,
            failed_fills: 0,
            last_arrival: Instant::now(),
            check_now: false,
            wake: Arc::new(Notify::new()),
            closed: false,
        }
    }

    /// Keeps `gap_since` in step with the order: starts the gap clock (and wakes the repair
    /// task) when a hole opens, stops it when the hole is filled.
    pub(super) fn note_gap(&mut self) {
        match (self.order.gap(), self.gap_since) {
            (Some(_), None) => {
                self.gap_since = Some(Instant::now());
                self.wake.notify_one();
            }
            (None, Some(_)) => {
                self.gap_since = None;
                self.failed_fills = 0;
            }
            _ => {}
        }
    }
}

pub(super) fn lock(room: &Mutex<Room>) -> std::sync::MutexGuard<'_, Room> {
    room.lock().expect("room lock poisoned")
}

/// Rooms by id, split into shards by the id's hash: fan-out to one room and joins of another
/// never wait on the same lock, and no lock is held for the whole map.
pub(super) struct RoomMap {
    shards: Box<[RwLock<Rooms>]>,
    hasher: std::hash::RandomState,
}

impl RoomMap {
    const SHARDS: usize = 64;

    pub(super) fn new() -> Self {
        RoomMap {
            shards: (0..Self::SHARDS).map(|_| RwLock::default()).collect(),
            hasher: std::hash::RandomState::new(),
        }
    }

    fn shard(&self, room: &RoomId) -> &RwLock<Rooms> {
        use std::hash::BuildHasher as _;
        let hash = self.hasher.hash_one(room);
        // The remainder is below SHARDS: the cast cannot truncate.
        #[allow(clippy::cast_possible_truncation)]
        &self.shards[(hash % Self::SHARDS as u64) as usize]
    }

    /// The shard of `room`, locked for writing.
    pub(super) fn write(&self, room: &RoomId) -> std::sync::RwLockWriteGuard<'_, Rooms> {
        self.shard(room).write().expect("room map lock poisoned")
    }

    pub(super) fn get(&self, room: &RoomId) -> Option<Arc<Mutex<Room>>> {
        self.shard(room)
            .read()
            .expect("room map lock poisoned")
            .get(room)
            .cloned()
    }

    pub(super) fn all(&self) -> Vec<(RoomId, Arc<Mutex<Room>>)> {
        self.shards
            .iter()
            .flat_map(|shard| {
                shard
                    .read()
                    .expect("room map lock poisoned")
                    .iter()
                    .map(|(id, room)| (id.clone(), Arc::clone(room)))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    pub(super) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.read().expect("room map lock poisoned").len())
            .sum()
    }
}

impl Hub {
    pub(super) fn close_if_empty(&self, room_id: &RoomId, room_arc: &Arc<Mutex<Room>>) {
        let mut rooms = self.inner.rooms.write(room_id);
        let mut room = lock(room_arc);
        if room.members.is_empty() {
            close_room(&mut rooms, room_id, room_arc, &mut room);
        }
    }
}

/// Marks the room closed, removes it from the map (if it is still the one there) and wakes its
/// repair task so it ends. Called with the shard and the room locked.
pub(super) fn close_room(
    rooms: &mut Rooms,
    room_id: &RoomId,
    room_arc: &Arc<Mutex<Room>>,
    room: &mut Room,
) {
    if room.closed {
        return;
    }
    room.closed = true;
    room.wake.notify_one();
    if rooms
        .get(room_id)
        .is_some_and(|current| Arc::ptr_eq(current, room_arc))
    {
        rooms.remove(room_id);
    }
}

/// Closes the room if it is empty when dropped while armed.
pub(super) struct CloseIfEmpty<'a> {
    pub(super) hub: &'a Hub,
    pub(super) room_id: &'a RoomId,
    pub(super) room: Arc<Mutex<Room>>,
    pub(super) armed: bool,
}

impl Drop for CloseIfEmpty<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.hub.close_if_empty(self.room_id, &self.room);
        }
    }
}
