//! Rooms → local members, and fan-out. Knows nothing of sockets: a member is a bounded queue of
//! serialized frames plus a way to close its connection.
//!
//! Delivery guarantees, per room and per member:
//! - The room's [`RoomOrder`] turns SNS arrivals into one gap-free, duplicate-free sequence; a hole
//!   that does not fill within the gap timeout is fetched from the writer's history.
//! - A lost *last* message (no later arrival reveals it) is found by the room's tail check: once
//!   the room has been quiet for the tail-check interval, one read of the room's head. Quiet rooms
//!   are checked less and less often (the interval doubles up to a ceiling) and again at the base
//!   interval after any arrival, so a loss right after traffic is repaired within about one base
//!   interval, and one after a long silence within the ceiling.
//! - A hole that cannot be filled (the writer no longer has the seqs, or keeps answering without
//!   them) ends the room on this gateway: its members are closed with [`close::RESYNC`] and
//!   resume from history, where a replay that cannot follow on from `since` says so.
//! - Each member remembers the last seq it was given (`last`) and is given only seqs above it, so
//!   a replay and the live stream can overlap without duplicates.
//! - A join with `since` registers the member first (live messages are buffered for it), then
//!   replays history from the writer page by page, then sends `joined` and the buffered messages
//!   above the replay, then switches the member to live: no gap and no duplicate at the switch.
//!   Why this holds: the room's head when the member registers was read from (or delivered after
//!   being stored by) the writer, so the replay, read later, reaches at least that head;
//!   everything after it is buffered. The replay and the buffer drain wait for room in the
//!   member's queue (both its bounds); a member that makes no room within the stall timeout is
//!   closed with [`close::SLOW_CONSUMER`].
//! - Joins are cancel-safe: a join future dropped at any await (a kick, a drain, a closed socket)
//!   leaves neither the member nor an empty room behind ([`JoinGuard`]).
//! - Fan-out never awaits: a member whose queue is full is closed with the resume code, and
//!   resumes from history on reconnect.
//!
//! Locking: the room map is split into shards, each a `std::sync::RwLock` (read on the hot path,
//! written when a room appears or empties); each room is a `std::sync::Mutex`. Neither is held
//! across an `.await`. Lock order: shard, then room.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chorus_protocol::api::MAX_HISTORY_LIMIT;
use chorus_protocol::{MessageEvent, RoomId, Seq, ServerFrame, close};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::log::{LogError, MessageLog};
use crate::metrics::GatewayMetrics;
use crate::ordering::{Offer, RoomOrder};

pub use crate::outbox::Frame;
use crate::outbox::{Outbox, PushError};

/// Identifies one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(u64);

impl ConnId {
    /// A process-unique id.
    pub fn next() -> ConnId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ConnId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Asks a connection to close with a code; the first code wins.
#[derive(Debug, Clone, Default)]
pub struct Kick {
    token: CancellationToken,
    code: Arc<AtomicU16>,
}

impl Kick {
    pub fn kick(&self, code: u16) {
        let _ = self
            .code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        self.token.cancel();
    }

    /// Resolves once kicked, with the close code.
    pub async fn kicked(&self) -> u16 {
        self.token.cancelled().await;
        self.code.load(Ordering::Acquire)
    }
}

/// The hub's handle on one connection.
#[derive(Debug, Clone)]
pub struct MemberHandle {
    pub id: ConnId,
    pub outbox: Outbox,
    pub kick: Kick,
}

/// Tuning of the hub.
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// How long a hole in a room's sequence may stay open before it is fetched from the writer.
    pub gap_timeout: Duration,
    /// A room quiet for this long has its head read, to find a lost last message.
    pub tail_check: Duration,
    /// Ceiling of the tail-check interval in a room that stays quiet (it doubles per check).
    pub tail_check_max: Duration,
    /// Most early arrivals held per room.
    pub max_held_per_room: usize,
    /// Most live messages buffered for one member while its replay runs.
    pub max_join_buffer: usize,
    /// Most bytes of live messages buffered for one member while its replay runs.
    pub max_join_buffer_bytes: usize,
    /// Messages per history page of a replay: a replay holds one page at a time.
    pub replay_page: u32,
    /// A replay (or the switch to live after it) that cannot queue anything for this long closes
    /// the connection as too slow.
    pub replay_stall: Duration,
    /// Fetches of the same hole that bring nothing before the room is resynced.
    pub max_repair_attempts: u32,
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
pub fn replay_page(queue_len: usize, queue_bytes: usize) -> u32 {
    // The largest body plus the frame's other fields.
    const LARGEST_FRAME: usize = chorus_protocol::Body::MAX_BYTES + 512;
    let page = (queue_bytes / LARGEST_FRAME).min(queue_len).max(1);
    u32::try_from(page)
        .unwrap_or(MAX_HISTORY_LIMIT)
        .min(MAX_HISTORY_LIMIT)
}

/// Why a join failed. The member is not in the room afterwards, whatever the error.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Log(#[from] LogError),
    /// The connection went away (or was closed by the hub) during the join.
    #[error("connection closed during the join")]
    Closed,
    /// The client made no room in its queue within the stall timeout during the replay; the
    /// connection has been kicked with [`close::SLOW_CONSUMER`].
    #[error("the replay stalled: the client is not reading")]
    Stalled,
    /// Messages after `since` can no longer be read: nothing was replayed.
    #[error("messages after {since} are no longer stored{}", oldest.map(|o| format!(" (the oldest is {o})")).unwrap_or_default())]
    Expired { since: Seq, oldest: Option<Seq> },
}

/// One serialized message on its way to members.
#[derive(Debug, Clone)]
struct Delivery {
    seq: Seq,
    frame: Frame,
}

struct Member {
    handle: MemberHandle,
    /// Last seq given to this member.
    last: Seq,
    /// `Some` while the member's replay runs: live messages wait here.
    buffer: Option<JoinBuffer>,
    /// A frame could not be queued: the connection is closing and must get nothing more, or it
    /// would see a hole.
    dead: bool,
}

#[derive(Default)]
struct JoinBuffer {
    items: Vec<Delivery>,
    bytes: usize,
}

struct Room {
    order: RoomOrder<Delivery>,
    members: HashMap<ConnId, Member>,
    /// When the current hole was first seen; `None` while the sequence is whole.
    gap_since: Option<Instant>,
    /// Fetches of the current hole that brought nothing.
    failed_fills: u32,
    /// The last bus arrival (or the room's creation).
    last_arrival: Instant,
    /// Check the tail at once (after the bus may have lost messages).
    check_now: bool,
    /// Wakes the room's repair task: a hole appeared, a check is asked for, or the room closed.
    wake: Arc<Notify>,
    /// Removed from the map (emptied or resynced): joins must look it up again.
    closed: bool,
}

impl Room {
    fn new(settings: &HubSettings) -> Self {
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
    fn note_gap(&mut self) {
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

/// Rooms with local members. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

type Rooms = HashMap<RoomId, Arc<Mutex<Room>>>;

/// Rooms by id, split into shards by the id's hash: fan-out to one room and joins of another
/// never wait on the same lock, and no lock is held for the whole map.
struct RoomMap {
    shards: Box<[RwLock<Rooms>]>,
    hasher: std::hash::RandomState,
}

impl RoomMap {
    const SHARDS: usize = 64;

    fn new() -> Self {
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
    fn write(&self, room: &RoomId) -> std::sync::RwLockWriteGuard<'_, Rooms> {
        self.shard(room).write().expect("room map lock poisoned")
    }

    fn get(&self, room: &RoomId) -> Option<Arc<Mutex<Room>>> {
        self.shard(room)
            .read()
            .expect("room map lock poisoned")
            .get(room)
            .cloned()
    }

    fn all(&self) -> Vec<(RoomId, Arc<Mutex<Room>>)> {
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

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.read().expect("room map lock poisoned").len())
            .sum()
    }
}

struct HubInner {
    rooms: RoomMap,
    log: Arc<dyn MessageLog>,
    settings: HubSettings,
    metrics: Arc<GatewayMetrics>,
}

fn message_frame(event: &MessageEvent) -> Delivery {
    Delivery {
        seq: event.seq,
        frame: ServerFrame::Message(event.clone()).to_json().into(),
    }
}

fn lock(room: &Mutex<Room>) -> std::sync::MutexGuard<'_, Room> {
    room.lock().expect("room lock poisoned")
}

/// Undoes a join that did not finish: whatever await the join future is dropped at (a kick, a
/// drain, a closed socket) or whatever error it returns, the member leaves the room and a room
/// left empty goes, so no ghost member or room stays behind.
struct JoinGuard<'a> {
    hub: &'a Hub,
    room_id: &'a RoomId,
    member: ConnId,
    /// The room the member was added to, once it was; before that, a room opened for the join.
    room: Option<Arc<Mutex<Room>>>,
    done: bool,
}

impl Drop for JoinGuard<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(room_arc) = &self.room {
            self.hub.remove_member(self.room_id, room_arc, self.member);
        }
    }
}

impl Hub {
    pub fn new(
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

    fn room(&self, room: &RoomId) -> Option<Arc<Mutex<Room>>> {
        self.inner.rooms.get(room)
    }

    /// Checks every room's tail now: after the bus may have lost messages, e.g. while the
    /// subscription was gone.
    pub fn repair_all(&self) {
        for (_, room_arc) in self.inner.rooms.all() {
            let mut room = lock(&room_arc);
            room.check_now = true;
            room.wake.notify_one();
        }
    }

    /// Number of rooms with local members.
    pub fn room_count(&self) -> usize {
        self.inner.rooms.len()
    }

    /// A message from the bus. Dropped if no local member is in its room.
    pub fn ingest(&self, event: &MessageEvent) {
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

    fn apply_offer(&self, room: &mut Room, offer: Offer<Delivery>) {
        if let Offer::Deliver(items) = offer {
            for item in &items {
                fan_out(room, item, &self.inner.settings, &self.inner.metrics);
            }
        }
        room.note_gap();
    }

    /// The room's repair task, one per room for as long as the room exists: fills holes after
    /// the gap timeout and checks a quiet room's tail (see the module docs). It sleeps until
    /// the next deadline or a wake-up and ends when the room closes.
    async fn repair_loop(self, room_id: RoomId, room_arc: Arc<Mutex<Room>>, wake: Arc<Notify>) {
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
                tracing::warn!(room = %room_id, error.message = %e, "reading the room head failed: retrying later");
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
            Err(LogError::Expired(e)) => {
                tracing::warn!(room = %room_id, %after, error.message = %e, "the missing seqs have expired");
                room.failed_fills = self.inner.settings.max_repair_attempts;
            }
            Err(e) => {
                tracing::warn!(room = %room_id, error.message = %e, "history read for a gap failed: retrying");
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

    /// Gets or creates the room and makes sure its head is known. Cancel-safe: a room created
    /// here whose head read is dropped or fails is removed again unless someone joined it.
    async fn open_room(&self, room_id: &RoomId) -> Result<Arc<Mutex<Room>>, LogError> {
        loop {
            let room_arc = {
                let mut rooms = self.inner.rooms.write(room_id);
                let room_arc = rooms.entry(room_id.clone()).or_insert_with(|| {
                    let room = Room::new(&self.inner.settings);
                    let wake = Arc::clone(&room.wake);
                    let room_arc = Arc::new(Mutex::new(room));
                    tokio::spawn(self.clone().repair_loop(
                        room_id.clone(),
                        Arc::clone(&room_arc),
                        wake,
                    ));
                    room_arc
                });
                Arc::clone(room_arc)
            };
            let known = {
                let room = lock(&room_arc);
                if room.closed {
                    continue;
                }
                room.order.head().is_some()
            };
            if known {
                return Ok(room_arc);
            }
            // Removes the room again if this read is dropped or fails and nobody joined.
            let mut guard = CloseIfEmpty {
                hub: self,
                room_id,
                room: Arc::clone(&room_arc),
                armed: true,
            };
            // The room entry exists from here on, so every later bus message is kept; the head
            // read now covers everything published before.
            let page = self.inner.log.history(room_id, Seq(0), 0).await?;
            guard.armed = false;
            {
                let mut room = lock(&room_arc);
                let ready = room.order.start_at(page.head);
                for item in &ready {
                    fan_out(&mut room, item, &self.inner.settings, &self.inner.metrics);
                }
                room.note_gap();
            }
            return Ok(room_arc);
        }
    }

    /// Adds `member` to `room_id`. Without `since`, it gets live messages after the room's
    /// current head; with `since`, first every stored message after `since` (a `since` beyond the
    /// head counts as the head). Sends `joined` with the seq the member is at, then live
    /// messages. Returns that seq.
    ///
    /// Cancel-safe: dropped at any point, the member is not in the room afterwards.
    ///
    /// # Errors
    /// When the writer cannot serve the head or the replay, when history after `since` has
    /// expired, or when the client stalls the replay (it is then kicked); the member is then not
    /// in the room.
    pub async fn join(
        &self,
        member: &MemberHandle,
        room_id: &RoomId,
        since: Option<Seq>,
    ) -> Result<Seq, JoinError> {
        let mut guard = JoinGuard {
            hub: self,
            room_id,
            member: member.id,
            room: None,
            done: false,
        };
        let head = loop {
            let room_arc = self.open_room(room_id).await?;
            let mut room = lock(&room_arc);
            // The room may have emptied and closed since it was opened: open it again.
            if room.closed {
                continue;
            }
            let head = room.order.head().unwrap_or_default();
            let (last, buffer, dead) = match since {
                None => (head, None, !send_or_kick(member, joined(room_id, head))),
                Some(since) => (since, Some(JoinBuffer::default()), false),
            };
            let previous = room.members.insert(
                member.id,
                Member {
                    handle: member.clone(),
                    last,
                    buffer,
                    dead,
                },
            );
            if previous.is_none() {
                self.inner.metrics.room_members.inc();
            }
            drop(room);
            guard.room = Some(room_arc);
            break head;
        };
        let Some(since) = since else {
            guard.done = true;
            return Ok(head);
        };
        let room_arc = guard.room.clone().expect("set above");
        let replayed = match self.replay(member, room_id, &room_arc, since).await {
            Ok(last) => last,
            Err(JoinError::Stalled) => {
                self.inner.metrics.slow_consumers.inc();
                member.kick.kick(close::SLOW_CONSUMER);
                return Err(JoinError::Stalled);
            }
            Err(e) => return Err(e),
        };
        self.switch_to_live(member, room_id, &room_arc, replayed)
            .await?;
        guard.done = true;
        Ok(replayed)
    }

    /// After the replay: `joined`, then the live messages buffered meanwhile, then live. The
    /// buffer is drained with waiting pushes outside the room's lock, batch by batch, until a
    /// look under the lock finds it empty; only then does fan-out queue directly. A client that
    /// reads keeps up; one that does not is closed by the stall timeout, and one that falls
    /// further behind than the buffer's bound by fan-out.
    async fn switch_to_live(
        &self,
        member: &MemberHandle,
        room_id: &RoomId,
        room_arc: &Arc<Mutex<Room>>,
        replayed: Seq,
    ) -> Result<(), JoinError> {
        self.push_waiting(member, joined(room_id, replayed)).await?;
        let mut last = replayed;
        loop {
            let batch = {
                let mut room = lock(room_arc);
                let Some(entry) = room.members.get_mut(&member.id) else {
                    return Err(JoinError::Closed);
                };
                // Only raised here: `last` starts at the replay's end, at or above the position
                // the member was buffered from.
                entry.last = last;
                let Some(buffer) = entry.buffer.as_mut() else {
                    return Err(JoinError::Closed);
                };
                if buffer.items.iter().all(|item| item.seq <= last) {
                    entry.buffer = None;
                    return Ok(());
                }
                std::mem::take(buffer).items
            };
            for item in batch {
                if item.seq > last {
                    self.push_waiting(member, item.frame).await?;
                    last = item.seq;
                }
            }
        }
    }

    /// Queues a frame for the member, waiting for room up to the stall timeout.
    async fn push_waiting(&self, member: &MemberHandle, frame: Frame) -> Result<(), JoinError> {
        match tokio::time::timeout(self.inner.settings.replay_stall, member.outbox.push(frame))
            .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(PushError::Closed | PushError::Full)) => Err(JoinError::Closed),
            Err(_) => Err(JoinError::Stalled),
        }
    }

    /// Sends every stored message after `since` to the member, one page at a time (a page is
    /// held until it is queued). Returns the last seq sent (or the room's head if there was
    /// nothing newer than `since`). Every page must follow on from the seq before it: messages
    /// that can no longer be read are reported, never skipped.
    async fn replay(
        &self,
        member: &MemberHandle,
        room_id: &RoomId,
        room_arc: &Mutex<Room>,
        since: Seq,
    ) -> Result<Seq, JoinError> {
        let expired = |oldest| JoinError::Expired { since, oldest };
        let mut last = since;
        loop {
            let page = match self
                .inner
                .log
                .history(room_id, last, self.inner.settings.replay_page.max(1))
                .await
            {
                Ok(page) => page,
                Err(LogError::Expired(_)) => return Err(expired(None)),
                Err(e) => return Err(e.into()),
            };
            if last > page.head {
                // A `since` beyond the head counts as the head: lower the member's position
                // first (so live messages above the head are buffered for it), then read again.
                Self::lower_position(room_arc, member.id, page.head);
                last = page.head;
                continue;
            }
            if page.messages.is_empty() {
                if last < page.head {
                    // The head is beyond, yet nothing after `last` can be read.
                    return Err(expired(None));
                }
                return Ok(last.min(page.head));
            }
            for event in &page.messages {
                if event.seq != last.next() {
                    return Err(expired(Some(event.seq)));
                }
                self.push_waiting(member, message_frame(event).frame)
                    .await?;
                self.inner.metrics.replayed.inc();
                last = event.seq;
            }
            if last >= page.head {
                return Ok(last);
            }
        }
    }

    /// Lowers a joining member's position to `seq`, so live messages above it are buffered.
    fn lower_position(room_arc: &Mutex<Room>, id: ConnId, seq: Seq) {
        if let Some(member) = lock(room_arc).members.get_mut(&id) {
            member.last = member.last.min(seq);
        }
    }

    /// Removes the member from the room; the room goes when its last member does.
    pub fn leave(&self, id: ConnId, room_id: &RoomId) {
        if let Some(room_arc) = self.room(room_id) {
            self.remove_member(room_id, &room_arc, id);
        }
    }

    fn remove_member(&self, room_id: &RoomId, room_arc: &Arc<Mutex<Room>>, id: ConnId) {
        if lock(room_arc).members.remove(&id).is_some() {
            self.inner.metrics.room_members.dec();
        }
        self.close_if_empty(room_id, room_arc);
    }

    fn close_if_empty(&self, room_id: &RoomId, room_arc: &Arc<Mutex<Room>>) {
        let mut rooms = self.inner.rooms.write(room_id);
        let mut room = lock(room_arc);
        if room.members.is_empty() {
            close_room(&mut rooms, room_id, room_arc, &mut room);
        }
    }
}

/// Marks the room closed, removes it from the map (if it is still the one there) and wakes its
/// repair task so it ends. Called with the shard and the room locked.
fn close_room(rooms: &mut Rooms, room_id: &RoomId, room_arc: &Arc<Mutex<Room>>, room: &mut Room) {
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
struct CloseIfEmpty<'a> {
    hub: &'a Hub,
    room_id: &'a RoomId,
    room: Arc<Mutex<Room>>,
    armed: bool,
}

impl Drop for CloseIfEmpty<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.hub.close_if_empty(self.room_id, &self.room);
        }
    }
}

fn joined(room: &RoomId, seq: Seq) -> Frame {
    ServerFrame::Joined {
        room: room.clone(),
        seq,
    }
    .to_json()
    .into()
}

/// Queues a frame without waiting; a full queue closes the connection with the resume code.
fn send_or_kick(member: &MemberHandle, frame: Frame) -> bool {
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

fn fan_out(room: &mut Room, item: &Delivery, settings: &HubSettings, metrics: &GatewayMetrics) {
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use chorus_protocol::api::{HistoryPage, SendRequest, SendResponse};
    use chorus_protocol::{Body, ClientMsgId, UserId};

    use super::*;
    use crate::outbox::{Next, Outbound, OutboxReceiver};

    /// The writer's history, in memory. It can hold every read at a gate, forget seqs (as if
    /// they could never be read) and answer that history below a seq has expired.
    #[derive(Default)]
    struct FakeLog {
        rooms: Mutex<HashMap<RoomId, Vec<MessageEvent>>>,
        reads: AtomicU64,
        /// Limits of the reads made (the head reads ask for 0).
        limits: Mutex<Vec<u32>>,
        /// When set, each read waits for a permit.
        gate: Option<tokio::sync::Semaphore>,
        /// Seqs the history never returns.
        unreadable: Mutex<Vec<u64>>,
        /// Reads after a seq below this answer `Expired`.
        expired_below: AtomicU64,
    }

    impl FakeLog {
        fn gated() -> Self {
            FakeLog {
                gate: Some(tokio::sync::Semaphore::new(0)),
                ..FakeLog::default()
            }
        }

        fn open_gate(&self, reads: usize) {
            self.gate.as_ref().unwrap().add_permits(reads);
        }

        fn store(&self, room: &RoomId, upto: u64) -> Vec<MessageEvent> {
            let mut rooms = self.rooms.lock().unwrap();
            let log = rooms.entry(room.clone()).or_default();
            while (log.len() as u64) < upto {
                log.push(event(room, log.len() as u64 + 1));
            }
            log.clone()
        }
    }

    #[async_trait::async_trait]
    impl MessageLog for FakeLog {
        async fn append(&self, _: &RoomId, _: &SendRequest) -> Result<SendResponse, LogError> {
            Err(LogError::Unavailable("not used".into()))
        }
        async fn history(
            &self,
            room: &RoomId,
            after: Seq,
            limit: u32,
        ) -> Result<HistoryPage, LogError> {
            if let Some(gate) = &self.gate {
                gate.acquire().await.unwrap().forget();
            }
            self.reads.fetch_add(1, Ordering::Relaxed);
            self.limits.lock().unwrap().push(limit);
            if limit > 0 && after.0 + 1 < self.expired_below.load(Ordering::Relaxed) {
                return Err(LogError::Expired("gone".into()));
            }
            let rooms = self.rooms.lock().unwrap();
            let log = rooms.get(room).cloned().unwrap_or_default();
            let unreadable = self.unreadable.lock().unwrap().clone();
            Ok(HistoryPage {
                head: Seq(log.len() as u64),
                messages: log
                    .into_iter()
                    .filter(|m| m.seq > after && !unreadable.contains(&m.seq.0))
                    .take(limit as usize)
                    .collect(),
            })
        }
        async fn scrollback(
            &self,
            _: &RoomId,
            _: Option<Seq>,
            _: u32,
        ) -> Result<HistoryPage, LogError> {
            Err(LogError::Unavailable(
                "the hub never reads backwards".into(),
            ))
        }
    }

    fn event(room: &RoomId, seq: u64) -> MessageEvent {
        MessageEvent {
            room: room.clone(),
            seq: Seq(seq),
            id: ClientMsgId::parse(format!("m{seq}")).unwrap(),
            sender: UserId::parse("john").unwrap(),
            body: Body::parse(format!("message {seq}")).unwrap(),
            ts: "2026-11-29T10:00:00.000Z".into(),
        }
    }

    fn hub(log: Arc<FakeLog>) -> Hub {
        Hub::new(log, HubSettings::default(), Arc::default())
    }

    fn member(queue: usize) -> (MemberHandle, OutboxReceiver) {
        let (outbox, rx) = crate::outbox::outbox(queue, 1 << 20);
        (
            MemberHandle {
                id: ConnId::next(),
                outbox,
                kick: Kick::default(),
            },
            rx,
        )
    }

    /// Everything queued for the member so far, as frames.
    fn drain(rx: &mut OutboxReceiver) -> Vec<ServerFrame> {
        let mut batch = std::collections::VecDeque::new();
        let mut out = Vec::new();
        while futures_util::FutureExt::now_or_never(rx.next(&mut batch)) == Some(Next::Send) {
            for item in batch.drain(..) {
                if let Outbound::Text(frame) = item {
                    out.push(serde_json::from_str(frame.as_str()).unwrap());
                }
            }
        }
        out
    }

    fn seqs(frames: &[ServerFrame]) -> Vec<u64> {
        frames
            .iter()
            .filter_map(|f| match f {
                ServerFrame::Message(m) => Some(m.seq.0),
                _ => None,
            })
            .collect()
    }

    fn lobby() -> RoomId {
        RoomId::parse("lobby").unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn duplicates_and_reordering_from_the_bus_reach_members_once_in_order() {
        let log = Arc::new(FakeLog::default());
        let hub = hub(Arc::clone(&log));
        let (m, mut rx) = member(64);
        assert_eq!(hub.join(&m, &lobby(), None).await.unwrap(), Seq(0));
        let stored = log.store(&lobby(), 4);
        for seq in [2, 1, 1, 4, 2, 3, 4] {
            hub.ingest(&stored[seq - 1]);
        }
        let frames = drain(&mut rx);
        assert!(matches!(frames[0], ServerFrame::Joined { seq: Seq(0), .. }));
        assert_eq!(seqs(&frames), [1, 2, 3, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hole_that_does_not_fill_is_fetched_from_history_after_the_gap_timeout() {
        let log = Arc::new(FakeLog::default());
        let hub = hub(Arc::clone(&log));
        let (m, mut rx) = member(64);
        hub.join(&m, &lobby(), None).await.unwrap();
        let stored = log.store(&lobby(), 5);
        hub.ingest(&stored[0]);
        hub.ingest(&stored[3]); // 2 and 3 lost
        hub.ingest(&stored[4]);
        assert_eq!(seqs(&drain(&mut rx)), [1]);
        tokio::time::sleep(HubSettings::default().gap_timeout * 2).await;
        assert_eq!(seqs(&drain(&mut rx)), [2, 3, 4, 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_last_message_is_found_once_the_room_goes_quiet() {
        let log = Arc::new(FakeLog::default());
        let hub = hub(Arc::clone(&log));
        let (m, mut rx) = member(64);
        hub.join(&m, &lobby(), None).await.unwrap();
        let stored = log.store(&lobby(), 3);
        hub.ingest(&stored[0]);
        hub.ingest(&stored[1]); // 3 is lost and nothing follows it
        tokio::time::sleep(HubSettings::default().tail_check * 2).await;
        assert_eq!(seqs(&drain(&mut rx)), [1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_message_in_a_quiet_room_is_found_with_no_later_arrival() {
        let log = Arc::new(FakeLog::default());
        let hub = hub(Arc::clone(&log));
        let (m, mut rx) = member(64);
        hub.join(&m, &lobby(), None).await.unwrap();
        // Long after the last traffic, one message whose notification never comes.
        tokio::time::sleep(Duration::from_secs(600)).await;
        log.store(&lobby(), 1);
        let settings = HubSettings::default();
        tokio::time::sleep(settings.tail_check_max + settings.gap_timeout).await;
        assert_eq!(seqs(&drain(&mut rx)), [1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_room_is_checked_less_and_less_often() {
        let log = Arc::new(FakeLog::default());
        let hub = hub(Arc::clone(&log));
        let (m, _rx) = member(64);
        hub.join(&m, &lobby(), None).await.unwrap();
        let settings = HubSettings::default();
        let reads = log.reads.load(Ordering::Relaxed);
        let quiet = settings.tail_check_max * 10;
        tokio::time::sleep(quiet).await;
        let checks = log.reads.load(Ordering::Relaxed) - reads;
        // At the base interval it would be 150; backing off to the ceiling, about 14.
        assert!(
            (10..=20).contains(&checks),
            "{checks} head reads in {quiet:?} of silence"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn join_with_since_replays_then_switches_to_live_without_gap_or_duplicate() {
        let log = Arc::new(FakeLog::default());
        let hub = hub(Arc::clone(&log));
        // Someone already follows the room live.
        let (early, mut early_rx) = member(64);
        hub.join(&early, &lobby(), None).await.unwrap();
        let stored = log.store(&lobby(), 6);
        for e in &stored[..5] {
            hub.ingest(e);
        }
        let (late, mut late_rx) = member(64);
        assert_eq!(
            hub.join(&late, &lobby(), Some(Seq(2))).await.unwrap(),
            Seq(6)
        );
        // 5 again (an SNS duplicate) and 6 (already in the replay) and 7 live.
        let stored = log.store(&lobby(), 7);
        hub.ingest(&stored[4]);
        hub.ingest(&stored[5]);
        hub.ingest(&stored[6]);
        let frames = drain(&mut late_rx);
        assert_eq!(seqs(&frames), [3, 4, 5, 6, 7]);
        let joined_at = frames
            .iter()
            .position(|f| matches!(f, ServerFrame::Joined { .. }))
            .unwrap();
        assert_eq!(joined_at, 4, "joined comes after the replay: {frames:?}");
        assert_eq!(seqs(&drain(&mut early_rx)), [1, 2, 3, 4, 5, 6, 7]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_since_beyond_the_head_counts_as_the_head() {
        let log = Arc::new(FakeLog::default());
        log.store(&lobby(), 3);
        let hub = hub(Arc::clone(&log));
        let (m, mut rx) = member(64);
        assert_eq!(hub.join(&m, &lobby(), Some(Seq(99))).await.unwrap(), Seq(3));
        let stored = log.store(&lobby(), 4);
        hub.ingest(&stored[3]);
        assert_eq!(seqs(&drain(&mut rx)), [4]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_whose_queue_overflows_is_kicked_and_gets_nothing_after_the_overflow() {
        let log = Arc::new(FakeLog::default());
        let hub = hub(Arc::clone(&log));
        let (slow, mut slow_rx) = member(2);
        let (fast, mut fast_rx) = member(64);
        hub.join(&slow, &lobby(), None).await.unwrap(); // joined fills one slot
        hub.join(&fast, &lobby(), None).await.unwrap();
        let stored = log.store(&lobby(), 3);
        hub.ingest(&stored[0]); // fills the second slot
        hub.ingest(&stored[1]); // overflows: kicked
        let read = drain(&mut slow_rx); // the client reads what was queued…
        hub.ingest(&stored[2]); // …but must not get 3 after missing 2
        assert_eq!(slow.kick.kicked().await, close::SLOW_CONSUMER);
        assert_eq!(seqs(&read), [1]);
        assert!(drain(&mut slow_rx).is_empty());
        assert_eq!(
            seqs(&drain(&mut fast_rx)),
            [1, 2, 3],
            "others are not held back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_room_goes_away_with_its_last_member() {
        let log = Arc::new(FakeLog::default());
        let hub = hub(Arc::clone(&log));
        let (a, _rx_a) = member(8);
        let (b, _rx_b) = member(8);
        hub.join(&a, &lobby(), None).await.unwrap();
        hub.join(&b, &lobby(), None).await.unwrap();
        hub.leave(a.id, &lobby());
        assert_eq!(hub.room_count(), 1);
        hub.leave(b.id, &lobby());
        assert_eq!(hub.room_count(), 0);
    }

    fn members(hub: &Hub) -> i64 {
        hub.inner.metrics.room_members.get()
    }

    /// Polls `future` until the hub has registered `count` memberships (or the future ends).
    async fn until_members<F: std::future::Future + Unpin>(hub: &Hub, future: &mut F, count: i64) {
        while members(hub) < count {
            tokio::select! {
                biased;
                _ = &mut *future => panic!("the join ended before it registered"),
                () = tokio::task::yield_now() => {}
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_join_dropped_during_its_replay_leaves_no_member_and_no_room() {
        let log = Arc::new(FakeLog::gated());
        log.store(&lobby(), 5);
        let hub = hub(Arc::clone(&log));
        let (m, _rx) = member(64);
        log.open_gate(1); // the head read; the replay's read waits
        let room = lobby();
        let mut join = Box::pin(hub.join(&m, &room, Some(Seq(0))));
        until_members(&hub, &mut join, 1).await;
        assert_eq!(hub.room_count(), 1);
        drop(join); // a kick or a drain cancels the join here
        assert_eq!(members(&hub), 0, "no ghost member");
        assert_eq!(hub.room_count(), 0, "no ghost room");
        // Its repair task ends too: no reads go on for a room nobody is in.
        log.open_gate(1000);
        let reads = log.reads.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(log.reads.load(Ordering::Relaxed), reads);
    }

    #[tokio::test(start_paused = true)]
    async fn a_join_dropped_during_the_head_read_leaves_no_room() {
        let log = Arc::new(FakeLog::gated());
        let hub = hub(Arc::clone(&log));
        let (m, _rx) = member(64);
        let room = lobby();
        let mut join = Box::pin(hub.join(&m, &room, None));
        while hub.room_count() == 0 {
            tokio::select! {
                biased;
                _ = &mut join => panic!("the head read is gated"),
                () = tokio::task::yield_now() => {}
            }
        }
        drop(join);
        assert_eq!(hub.room_count(), 0);
        assert_eq!(members(&hub), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_join_whose_room_closed_under_it_lands_in_a_live_room() {
        let log = Arc::new(FakeLog::gated());
        let hub = hub(Arc::clone(&log));
        let (a, _rx_a) = member(64);
        let (b, mut rx_b) = member(64);
        // Both read the new room's head; A's read answers first.
        let join_a = tokio::spawn({
            let (hub, a) = (hub.clone(), a.clone());
            async move { hub.join(&a, &lobby(), None).await.map(|_| ()) }
        });
        let join_b = tokio::spawn({
            let (hub, b) = (hub.clone(), b.clone());
            async move { hub.join(&b, &lobby(), None).await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        log.open_gate(1);
        join_a.await.unwrap().unwrap();
        // A leaves: the room empties and closes while B's head read is still out.
        hub.leave(a.id, &lobby());
        assert_eq!(hub.room_count(), 0);
        log.open_gate(1000);
        join_b.await.unwrap().unwrap();
        assert_eq!(hub.room_count(), 1, "B is in a room the bus reaches");
        let stored = log.store(&lobby(), 1);
        hub.ingest(&stored[0]);
        assert_eq!(seqs(&drain(&mut rx_b)), [1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replay_stays_within_the_byte_bound_and_a_client_that_does_not_read_is_closed() {
        let log = Arc::new(FakeLog::default());
        log.store(&lobby(), 200);
        let settings = HubSettings {
            replay_page: 20,
            ..HubSettings::default()
        };
        let hub = Hub::new(log.clone(), settings.clone(), Arc::default());
        let frame_len = message_frame(&event(&lobby(), 1)).frame.len();
        let (outbox, mut rx) = crate::outbox::outbox(1000, frame_len * 5);
        let m = MemberHandle {
            id: ConnId::next(),
            outbox,
            kick: Kick::default(),
        };
        let room = lobby();
        let mut join = Box::pin(hub.join(&m, &room, Some(Seq(0))));
        tokio::select! {
            _ = &mut join => panic!("nobody reads: the replay cannot finish"),
            () = tokio::time::sleep(settings.replay_stall / 2) => {}
        }
        let queued = drain(&mut rx);
        assert!(
            (1..=5).contains(&queued.len()),
            "{} frames queued past a bound of 5 frames' bytes",
            queued.len()
        );
        assert!(
            log.limits.lock().unwrap().iter().all(|&l| l <= 20),
            "pages of at most replay_page"
        );
        // Then the client stops reading for good: the replay stalls and the connection is closed.
        let result = join.await;
        assert!(matches!(result, Err(JoinError::Stalled)), "{result:?}");
        assert_eq!(m.kick.kicked().await, close::SLOW_CONSUMER);
        assert_eq!(members(&hub), 0);
        assert_eq!(hub.room_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_switch_from_replay_to_live_waits_for_a_reading_client_instead_of_closing_it() {
        let log = Arc::new(FakeLog::gated());
        let stored = log.store(&lobby(), 10);
        let hub = hub(Arc::clone(&log));
        let (m, mut rx) = member(4);
        // A reader that takes the queue whenever it is full.
        log.open_gate(1); // the head read
        let join = tokio::spawn({
            let (hub, m) = (hub.clone(), m.clone());
            async move { hub.join(&m, &lobby(), Some(Seq(0))).await }
        });
        while members(&hub) == 0 {
            tokio::task::yield_now().await;
        }
        // Live messages arrive while the replay waits for the writer: they are buffered.
        let more = log.store(&lobby(), 12);
        hub.ingest(&more[10]);
        hub.ingest(&more[11]);
        log.open_gate(1000);
        let mut got = Vec::new();
        while !join.is_finished()
            || !got
                .iter()
                .any(|f| matches!(f, ServerFrame::Message(m) if m.seq == Seq(12)))
        {
            tokio::task::yield_now().await;
            got.extend(drain(&mut rx));
            if got.len() > 100 {
                break;
            }
        }
        assert_eq!(join.await.unwrap().unwrap(), Seq(stored.len() as u64 + 2));
        assert!(
            futures_util::FutureExt::now_or_never(m.kick.kicked()).is_none(),
            "a client that reads is not closed"
        );
        assert_eq!(seqs(&got), (1..=12).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn a_replay_that_cannot_follow_on_from_since_says_so_and_joins_nothing() {
        let log = Arc::new(FakeLog::default());
        log.store(&lobby(), 10);
        log.unreadable.lock().unwrap().extend(1..=4); // expired
        let hub = hub(Arc::clone(&log));
        let (m, mut rx) = member(64);
        let result = hub.join(&m, &lobby(), Some(Seq(2))).await;
        assert!(
            matches!(
                result,
                Err(JoinError::Expired {
                    since: Seq(2),
                    oldest: Some(Seq(5))
                })
            ),
            "{result:?}"
        );
        assert!(
            seqs(&drain(&mut rx)).is_empty(),
            "nothing replayed past the hole"
        );
        assert_eq!(members(&hub), 0);
        // The writer saying so (410) is the same answer.
        log.expired_below.store(5, Ordering::Relaxed);
        let result = hub.join(&m, &lobby(), Some(Seq(2))).await;
        assert!(
            matches!(result, Err(JoinError::Expired { oldest: None, .. })),
            "{result:?}"
        );
        // From the oldest on, the join works.
        assert_eq!(hub.join(&m, &lobby(), Some(Seq(4))).await.unwrap(), Seq(10));
        assert_eq!(seqs(&drain(&mut rx)), [5, 6, 7, 8, 9, 10]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hole_the_writer_cannot_fill_closes_the_rooms_members_with_resync() {
        let log = Arc::new(FakeLog::default());
        let hub = hub(Arc::clone(&log));
        let (m, mut rx) = member(64);
        hub.join(&m, &lobby(), None).await.unwrap();
        let stored = log.store(&lobby(), 3);
        log.unreadable.lock().unwrap().push(2);
        hub.ingest(&stored[0]);
        hub.ingest(&stored[2]);
        let settings = HubSettings::default();
        tokio::time::sleep(settings.gap_timeout * (settings.max_repair_attempts + 2)).await;
        assert_eq!(m.kick.kicked().await, close::RESYNC);
        assert_eq!(seqs(&drain(&mut rx)), [1], "never 3 after a missing 2");
        assert_eq!(hub.room_count(), 0);
        assert_eq!(members(&hub), 0);
        assert_eq!(hub.inner.metrics.resyncs.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_since_beyond_the_head_gets_the_live_messages_that_arrive_during_the_join() {
        let log = Arc::new(FakeLog::gated());
        log.store(&lobby(), 3);
        let hub = hub(Arc::clone(&log));
        let (m, mut rx) = member(64);
        log.open_gate(2); // the head read and the first replay read
        let join = tokio::spawn({
            let (hub, m) = (hub.clone(), m.clone());
            async move { hub.join(&m, &lobby(), Some(Seq(99))).await }
        });
        while log.reads.load(Ordering::Relaxed) < 2 {
            tokio::task::yield_now().await;
        }
        // 4 is stored and delivered live before the replay reads again.
        let stored = log.store(&lobby(), 4);
        hub.ingest(&stored[3]);
        log.open_gate(1000);
        assert_eq!(join.await.unwrap().unwrap(), Seq(4));
        assert_eq!(seqs(&drain(&mut rx)), [4]);
    }
}
