//! Rooms → local members, and fan-out. Knows nothing of sockets: a member is a bounded queue of
//! serialized frames ([`outbox`]) plus a way to close its connection ([`Kick`]).
//!
//! - [`rooms`]: the sharded room map and a room's state;
//! - [`members`]: connection ids, kicks, a member's position, leaving;
//! - [`join`]: joining, with the replay of history and the switch to live;
//! - [`fanout`]: bus arrivals ordered per room ([`ordering`]) and queued for every member;
//! - [`repair`]: each room's repair task (holes, quiet tails, resync).
//!
//! Delivery guarantees, per room and per member:
//! - The room's [`RoomOrder`](ordering::RoomOrder) turns SNS arrivals into one gap-free,
//!   duplicate-free sequence; a hole that does not fill within the gap timeout is fetched from
//!   the writer's history.
//! - A lost *last* message (no later arrival reveals it) is found by the room's tail check: once
//!   the room has been quiet for the tail-check interval, one read of the room's head. Quiet rooms
//!   are checked less and less often (the interval doubles up to a ceiling) and again at the base
//!   interval after any arrival, so a loss right after traffic is repaired within about one base
//!   interval, and one after a long silence within the ceiling.
//! - A hole that cannot be filled (the writer no longer has the seqs, or keeps answering without
//!   them) ends the room on this gateway: its members are closed with
//!   [`RESYNC`](chorus_protocol::close::RESYNC) and resume from history, where a replay that
//!   cannot follow on from `since` says so.
//! - Each member remembers the last seq it was given (`last`) and is given only seqs above it, so
//!   a replay and the live stream can overlap without duplicates.
//! - A join with `since` registers the member first (live messages are buffered for it), then
//!   replays history from the writer page by page, then sends `joined` and the buffered messages
//!   above the replay, then switches the member to live: no gap and no duplicate at the switch.
//!   Why this holds: the room's head when the member registers was read from (or delivered after
//!   being stored by) the writer, so the replay, read later, reaches at least that head;
//!   everything after it is buffered. The replay and the buffer drain wait for room in the
//!   member's queue (both its bounds); a member that makes no room within the stall timeout is
//!   closed with [`SLOW_CONSUMER`](chorus_protocol::close::SLOW_CONSUMER).
//! - Joins are cancel-safe: a join future dropped at any await (a kick, a drain, a closed socket)
//!   leaves neither the member nor an empty room behind (`JoinGuard`).
//! - Fan-out never awaits: a member whose queue is full is closed with the resume code, and
//!   resumes from history on reconnect.
//!
//! Locking: the room map is split into shards, each a `std::sync::RwLock` (read on the hot path,
//! written when a room appears or empties); each room is a `std::sync::Mutex`. Neither is held
//! across an `.await`. Lock order: shard, then room.

mod fanout;
mod join;
mod members;
pub(crate) mod ordering;
pub(crate) mod outbox;
mod repair;
mod rooms;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use chorus_protocol::RoomId;
use chorus_protocol::api::MAX_HISTORY_LIMIT;

use crate::metrics::GatewayMetrics;
use crate::writer_client::MessageLog;

pub(crate) use self::join::JoinError;
pub(crate) use self::members::{ConnId, Kick, MemberHandle};
use self::rooms::{Room, RoomMap};

/// Tuning of the hub.
#[derive(Debug, Clone)]
pub(crate) struct HubSettings {
    /// How long a hole in a room's sequence may stay open before it is fetched from the writer.
    pub(crate) gap_timeout: Duration,
    /// A room quiet for this long has its head read, to find a lost last message.
    pub(crate) tail_check: Duration,
    /// Ceiling of the tail-check interval in a room that stays quiet (it doubles per check).
    pub(crate) tail_check_max: Duration,
    /// Most early arrivals held per room.
    pub(crate) max_held_per_room: usize,
    /// Most live messages buffered for one member while its replay runs.
    pub(crate) max_join_buffer: usize,
    /// Most bytes of live messages buffered for one member while its replay runs.
    pub(crate) max_join_buffer_bytes: usize,
    /// Messages per history page of a replay: a replay holds one page at a time.
    pub(crate) replay_page: u32,
    /// A replay (or the switch to live after it) that cannot queue anything for this long closes
    /// the connection as too slow.
    pub(crate) replay_stall: Duration,
    /// Fetches of the same hole that bring nothing before the room is resynced.
    pub(crate) max_repair_attempts: u32,
}

impl Default for HubSettings {
    fn default() -> Self {
        HubSettings {
            gap_timeout: Duration::from_millis(500),
            tail_check: Duration::from_secs(2),
            tail_check_max: Duration::from_secs(30),
            max_held_per_room: 1024,
            max_join_buffer: 4096,
            max_join_buffer_bytes: 1 << 20,
            replay_page: MAX_HISTORY_LIMIT,
            replay_stall: Duration::from_secs(10),
            max_repair_attempts: 5,
        }
    }
}

/// Messages per replay page for a connection queue of `queue_len` frames and `queue_bytes`
/// bytes: a page of the largest messages fits the byte bound, so a replay holds at most about
/// twice the bound (the page being queued and the queue).
pub(crate) fn replay_page(queue_len: usize, queue_bytes: usize) -> u32 {
    // The largest body plus the frame's other fields.
    const LARGEST_FRAME: usize = chorus_protocol::Body::MAX_BYTES + 512;
    let page = (queue_bytes / LARGEST_FRAME).min(queue_len).max(1);
    u32::try_from(page)
        .unwrap_or(MAX_HISTORY_LIMIT)
        .min(MAX_HISTORY_LIMIT)
}

/// Rooms with local members. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Hub {
    inner: Arc<HubInner>,
}

struct HubInner {
    rooms: RoomMap,
    log: Arc<dyn MessageLog>,
    settings: HubSettings,
    metrics: Arc<GatewayMetrics>,
}

impl Hub {
    pub(crate) fn new(
        log: Arc<dyn MessageLog>,
        settings: HubSettings,
        metrics: Arc<GatewayMetrics>,
    ) -> Self {
        Hub {
            inner: Arc::new(HubInner {
                rooms: RoomMap::new(),
                log,
                settings,
                metrics,
            }),
        }
    }

    fn room(&self, room: &RoomId) -> Option<Arc<std::sync::Mutex<Room>>> {
        self.inner.rooms.get(room)
    }

    /// Number of rooms with local members.
    pub(crate) fn room_count(&self) -> usize {
        self.inner.rooms.len()
    }
}
