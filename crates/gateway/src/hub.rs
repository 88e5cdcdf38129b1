//! Rooms → local members, and fan-out. Knows nothing of sockets: a member is a bounded queue of
//! serialized frames plus a way to close its connection.
//!
//! Delivery guarantees, per room and per member:
//! - The room's [`RoomOrder`] turns SNS arrivals into one gap-free, duplicate-free sequence; a hole
//!   that does not fill within the gap timeout is fetched from the writer's history.
//! - Each member remembers the last seq it was given (`last`) and is given only seqs above it, so
//!   a replay and the live stream can overlap without duplicates.
//! - A join with `since` registers the member first (live messages are buffered for it), then
//!   replays history from the writer, then sends `joined` and the buffered messages above the
//!   replay: no gap and no duplicate at the switch. Why this holds: the room's head when the
//!   member registers was read from (or delivered after being stored by) the writer, so the
//!   replay, read later, reaches at least that head; everything after it is buffered.
//! - Fan-out never awaits: a member whose queue is full is closed with the resume code, and
//!   resumes from history on reconnect.
//!
//! Locking: the room map is split into shards, each a `std::sync::RwLock` (read on the hot path,
//! written when a room appears or empties); each room is a `std::sync::Mutex`. Neither is held
//! across an `.await`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chorus_protocol::api::MAX_HISTORY_LIMIT;
use chorus_protocol::{MessageEvent, RoomId, Seq, ServerFrame, close};
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
    /// Most early arrivals held per room.
    pub max_held_per_room: usize,
    /// Most live messages buffered for one member while its replay runs.
    pub max_join_buffer: usize,
}

impl Default for HubSettings {
    fn default() -> Self {
        HubSettings {
            gap_timeout: Duration::from_millis(500),
            max_held_per_room: 1024,
            max_join_buffer: 4096,
        }
    }
}

/// Why a join failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Log(#[from] LogError),
    /// The connection went away during the replay.
    #[error("connection closed during replay")]
    Closed,
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
    buffer: Option<Vec<Delivery>>,
    /// A frame could not be queued: the connection is closing and must get nothing more, or it
    /// would see a hole.
    dead: bool,
}

struct Room {
    order: RoomOrder<Delivery>,
    members: HashMap<ConnId, Member>,
    /// A repair task (gap fill, tail check) is running for this room.
    repairing: bool,
    /// Bumped on every bus arrival, so the repair task can tell a quiet room.
    activity: u64,
    /// Removed from the map (emptied): joins must look it up again.
    closed: bool,
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

    /// Starts a repair (gap fill and tail check) in every room: after the bus may have lost
    /// messages, e.g. while the subscription was gone.
    pub fn repair_all(&self) {
        for (room_id, room_arc) in self.inner.rooms.all() {
            let mut room = room_arc.lock().expect("room lock poisoned");
            if !room.repairing && !room.closed {
                room.repairing = true;
                self.spawn_repair(room_id, Arc::clone(&room_arc));
            }
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
        let mut room = room_arc.lock().expect("room lock poisoned");
        let offer = room.order.offer(delivery.seq, delivery);
        self.apply_offer(&event.room, &room_arc, &mut room, offer, true);
    }

    fn apply_offer(
        &self,
        room_id: &RoomId,
        room_arc: &Arc<Mutex<Room>>,
        room: &mut Room,
        offer: Offer<Delivery>,
        from_bus: bool,
    ) {
        let metrics = &self.inner.metrics;
        match offer {
            Offer::Deliver(items) => {
                for item in &items {
                    fan_out(room, item, &self.inner.settings, metrics);
                }
            }
            Offer::Duplicate if from_bus => metrics.bus_events_duplicate.inc(),
            Offer::Held if from_bus => metrics.bus_events_held.inc(),
            Offer::Dropped if from_bus => metrics.bus_events_dropped.inc(),
            _ => {}
        }
        if from_bus {
            room.activity += 1;
        } else if room.order.gap().is_none() {
            return;
        }
        if !room.repairing {
            room.repairing = true;
            self.spawn_repair(room_id.clone(), Arc::clone(room_arc));
        }
    }

    /// Keeps a room's sequence whole after bus traffic: every gap timeout, a hole (a later seq
    /// arrived, or early arrivals were dropped) is fetched from the writer's history; once the
    /// room has been quiet for a whole interval, one read of the room's head catches a lost *last*
    /// message, which no later arrival would reveal. Then the task ends; the next arrival starts
    /// another. Cost: one head read (a single-key read) per room per burst, and a history page
    /// per hole.
    fn spawn_repair(&self, room_id: RoomId, room_arc: Arc<Mutex<Room>>) {
        let hub = self.clone();
        tokio::spawn(async move {
            let mut seen_activity = u64::MAX;
            loop {
                tokio::time::sleep(hub.inner.settings.gap_timeout).await;
                // (after, limit, is it the final tail check)
                let read = {
                    let mut room = room_arc.lock().expect("room lock poisoned");
                    if room.closed {
                        room.repairing = false;
                        return;
                    }
                    let quiet = room.activity == seen_activity;
                    seen_activity = room.activity;
                    match (room.order.gap(), room.order.head()) {
                        (Some((after, before)), _) => {
                            let wanted = before.0.saturating_sub(after.0 + 1);
                            Some((after, wanted.clamp(1, u64::from(MAX_HISTORY_LIMIT)), false))
                        }
                        (None, Some(head)) if quiet => {
                            // Quiet for a whole interval with no hole: check the tail, then stop.
                            room.repairing = false;
                            Some((head, 0, true))
                        }
                        _ => None,
                    }
                };
                let Some((after, limit, last)) = read else {
                    continue;
                };
                if last {
                    hub.check_tail(&room_id, &room_arc).await;
                    return;
                }
                let limit = u32::try_from(limit).unwrap_or(MAX_HISTORY_LIMIT);
                hub.fetch_and_offer(&room_id, &room_arc, after, limit).await;
            }
        });
    }

    /// Asks the writer for the room's head only (a single key read, no query): if it is beyond
    /// what the room delivered, the missing tail becomes a gap and a repair task fetches it.
    async fn check_tail(&self, room_id: &RoomId, room_arc: &Arc<Mutex<Room>>) {
        let result = self.inner.log.history(room_id, Seq(0), 0).await;
        let mut room = room_arc.lock().expect("room lock poisoned");
        match result {
            Ok(page) => {
                room.order.note_exists(page.head);
                if room.order.gap().is_none() {
                    return;
                }
                self.inner.metrics.tail_fills.inc();
            }
            Err(e) => {
                tracing::warn!(room = %room_id, error.message = %e, "reading the room head failed: retrying");
            }
        }
        if !room.repairing && !room.closed {
            room.repairing = true;
            self.spawn_repair(room_id.clone(), Arc::clone(room_arc));
        }
    }

    /// Reads history after `after` to fill a hole and offers it to the room's order.
    async fn fetch_and_offer(
        &self,
        room_id: &RoomId,
        room_arc: &Arc<Mutex<Room>>,
        after: Seq,
        limit: u32,
    ) {
        match self.inner.log.history(room_id, after, limit).await {
            Ok(page) => {
                self.inner.metrics.gap_fills.inc();
                tracing::debug!(room = %room_id, %after, fetched = page.messages.len(), "gap repaired from history");
                let mut room = room_arc.lock().expect("room lock poisoned");
                for event in &page.messages {
                    let delivery = message_frame(event);
                    let offer = room.order.offer(delivery.seq, delivery);
                    self.apply_offer(room_id, room_arc, &mut room, offer, false);
                }
            }
            Err(e) => {
                tracing::warn!(room = %room_id, error.message = %e, "history read for a gap failed: retrying");
            }
        }
    }

    /// Gets or creates the room and makes sure its head is known.
    async fn open_room(&self, room_id: &RoomId) -> Result<Arc<Mutex<Room>>, LogError> {
        loop {
            let room_arc = {
                let mut rooms = self.inner.rooms.write(room_id);
                Arc::clone(rooms.entry(room_id.clone()).or_insert_with(|| {
                    Arc::new(Mutex::new(Room {
                        order: RoomOrder::new(self.inner.settings.max_held_per_room),
                        members: HashMap::new(),
                        repairing: false,
                        activity: 0,
                        closed: false,
                    }))
                }))
            };
            let known = {
                let room = room_arc.lock().expect("room lock poisoned");
                if room.closed {
                    continue;
                }
                room.order.head().is_some()
            };
            if !known {
                // The room entry exists from here on, so every later bus message is kept; the
                // head read now covers everything published before.
                let page = match self.inner.log.history(room_id, Seq(0), 0).await {
                    Ok(page) => page,
                    Err(e) => {
                        self.close_if_empty(room_id, &room_arc);
                        return Err(e);
                    }
                };
                let mut room = room_arc.lock().expect("room lock poisoned");
                let ready = room.order.start_at(page.head);
                for item in &ready {
                    fan_out(&mut room, item, &self.inner.settings, &self.inner.metrics);
                }
            }
            return Ok(room_arc);
        }
    }

    /// Adds `member` to `room_id`. Without `since`, it gets live messages after the room's
    /// current head; with `since`, first every stored message after `since` (a `since` beyond the
    /// head counts as the head). Sends `joined` with the seq the member is at, then live
    /// messages. Returns that seq.
    ///
    /// # Errors
    /// When the writer cannot serve the head or the replay; the member is then not in the room.
    pub async fn join(
        &self,
        member: &MemberHandle,
        room_id: &RoomId,
        since: Option<Seq>,
    ) -> Result<Seq, JoinError> {
        let room_arc = self.open_room(room_id).await?;
        {
            let mut room = room_arc.lock().expect("room lock poisoned");
            let head = room.order.head().unwrap_or_default();
            match since {
                None => {
                    let dead = !send_or_kick(member, joined(room_id, head));
                    room.members.insert(
                        member.id,
                        Member {
                            handle: member.clone(),
                            last: head,
                            buffer: None,
                            dead,
                        },
                    );
                    return Ok(head);
                }
                Some(since) => {
                    room.members.insert(
                        member.id,
                        Member {
                            handle: member.clone(),
                            last: since,
                            buffer: Some(Vec::new()),
                            dead: false,
                        },
                    );
                }
            }
        }
        let since = since.unwrap_or_default();
        let replayed = match self.replay(member, room_id, since).await {
            Ok(last) => last,
            Err(e) => {
                self.leave(member.id, room_id);
                return Err(e);
            }
        };
        let mut room = room_arc.lock().expect("room lock poisoned");
        let Some(entry) = room.members.get_mut(&member.id) else {
            return Err(JoinError::Closed);
        };
        let buffered = entry.buffer.take().unwrap_or_default();
        entry.last = replayed;
        entry.dead = !send_or_kick(member, joined(room_id, replayed));
        for item in &buffered {
            if entry.dead {
                break;
            }
            if item.seq > entry.last {
                entry.last = item.seq;
                entry.dead = !send_or_kick(member, item.frame.clone());
            }
        }
        Ok(replayed)
    }

    /// Sends every stored message after `since` to the member, page by page. Returns the last
    /// seq sent (or the room's head if there was nothing newer than `since`).
    async fn replay(
        &self,
        member: &MemberHandle,
        room_id: &RoomId,
        since: Seq,
    ) -> Result<Seq, JoinError> {
        let mut last = since;
        loop {
            let page = self
                .inner
                .log
                .history(room_id, last, MAX_HISTORY_LIMIT)
                .await?;
            let Some(newest) = page.messages.last().map(|m| m.seq) else {
                return Ok(last.min(page.head));
            };
            for event in &page.messages {
                let frame = message_frame(event).frame;
                member
                    .outbox
                    .push(frame)
                    .await
                    .map_err(|_| JoinError::Closed)?;
                self.inner.metrics.replayed.inc();
            }
            last = newest;
            if last >= page.head {
                return Ok(last);
            }
        }
    }

    /// Removes the member from the room; the room goes when its last member does.
    pub fn leave(&self, id: ConnId, room_id: &RoomId) {
        let Some(room_arc) = self.room(room_id) else {
            return;
        };
        room_arc
            .lock()
            .expect("room lock poisoned")
            .members
            .remove(&id);
        self.close_if_empty(room_id, &room_arc);
    }

    fn close_if_empty(&self, room_id: &RoomId, room_arc: &Arc<Mutex<Room>>) {
        let mut rooms = self.inner.rooms.write(room_id);
        let mut room = room_arc.lock().expect("room lock poisoned");
        if room.members.is_empty() && !room.closed {
            room.closed = true;
            if rooms
                .get(room_id)
                .is_some_and(|current| Arc::ptr_eq(current, room_arc))
            {
                rooms.remove(room_id);
            }
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
                if buffer.len() >= settings.max_join_buffer {
                    member.handle.kick.kick(close::SLOW_CONSUMER);
                    member.dead = true;
                    metrics.slow_consumers.inc();
                } else {
                    buffer.push(item.clone());
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

    /// The writer's history, in memory.
    #[derive(Default)]
    struct FakeLog {
        rooms: Mutex<HashMap<RoomId, Vec<MessageEvent>>>,
        reads: AtomicU64,
    }

    impl FakeLog {
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
            self.reads.fetch_add(1, Ordering::Relaxed);
            let rooms = self.rooms.lock().unwrap();
            let log = rooms.get(room).cloned().unwrap_or_default();
            Ok(HistoryPage {
                head: Seq(log.len() as u64),
                messages: log
                    .into_iter()
                    .filter(|m| m.seq > after)
                    .take(limit as usize)
                    .collect(),
            })
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
        tokio::time::sleep(HubSettings::default().gap_timeout * 10).await;
        assert_eq!(seqs(&drain(&mut rx)), [1, 2, 3]);
        // Then the room is left alone: no more reads while nothing arrives.
        let reads = log.reads.load(Ordering::Relaxed);
        tokio::time::sleep(HubSettings::default().gap_timeout * 10).await;
        assert_eq!(log.reads.load(Ordering::Relaxed), reads);
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
}
