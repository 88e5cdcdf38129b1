//! [`GroupCommitStore`]: the writer's [`MessageStore`]. Per room, at most one write is in flight;
//! sends that arrive meanwhile wait in the room's queue and the next write commits them together,
//! as one item holding a contiguous run of seqs, with one conditional put ("no item at this
//! key"). Items tile each room's seq space, so with any number of writers seqs are dense and
//! never reused: a writer whose view is stale loses the condition, reads the room's items from
//! its view's end (consistent reads) and commits after them. What the writer wrote and read also
//! fills the room's dedupe window, which answers retries with their original seq. The argument:
//! docs/decisions/0007-group-commit-items.md.
//!
//! Cancellation: the write runs in a task of its own, never in the request's future, so a
//! request that is dropped (its client gone) leaves the queue and the batch whole: the batch
//! commits or fails for every message in it, and the dropped request's answer is discarded.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use chorus_protocol::api::HistoryPage;
use chorus_protocol::{
    Body, ClientMsgId, MessageEvent, RoomId, Seq, StoredBatch, StoredEntry, UserId,
};
use tokio::sync::oneshot;

use super::item::{MAX_ITEM_BYTES, MAX_ITEM_MESSAGES, Marker, batch_overhead_bound, entry_bytes};
use super::window::{DedupeWindow, WindowSize};
use super::{
    Appended, Clock, MessageStore, NewMessage, Put, Settings, StoreError, SystemClock, Table,
    Usage, is_live, rfc3339_ms,
};

/// Seqs a marker raise reserves beyond the write that needed it: one small marker write per
/// this many messages of a room.
const RESERVE_STEP: u64 = 10_000;
/// Sends one room may have queued in one writer; more are refused as contention (503).
const MAX_QUEUED_PER_ROOM: usize = 10_000;
/// Lost races in a row before a batch gives up (each one means another writer committed).
const MAX_RACES: u32 = 32;
/// Items per read when loading a room's tail or catching up.
const READ_PAGE: u32 = 100;
/// How often idle rooms are looked for.
const SWEEP_EVERY_MS: u64 = 1000;

type Waiter = oneshot::Sender<Result<Appended, StoreError>>;
type Key = (UserId, ClientMsgId);

/// The writer's store over a [`Table`]. Cheap to clone (an `Arc` inside).
pub struct GroupCommitStore<T: Table> {
    shared: Arc<Shared<T>>,
}

impl<T: Table> Clone for GroupCommitStore<T> {
    fn clone(&self) -> Self {
        GroupCommitStore {
            shared: Arc::clone(&self.shared),
        }
    }
}

struct Shared<T> {
    table: T,
    settings: Settings,
    clock: Arc<dyn Clock>,
    /// Rooms this writer has in memory. Lock order: `rooms`, then a room's `state`; both std
    /// mutexes, held for short sections that never await.
    rooms: Mutex<Rooms>,
}

#[derive(Default)]
struct Rooms {
    map: HashMap<RoomId, Arc<Room>>,
    last_sweep_ms: u64,
}

struct Room {
    id: RoomId,
    state: Mutex<RoomState>,
}

#[derive(Default)]
struct RoomState {
    /// What this writer knows of the room's items; `None` until read from the table.
    view: Option<View>,
    /// Sends not yet taken by a write, in arrival order.
    queue: VecDeque<Queued>,
    /// Everyone waiting for a (sender, id), queued or in flight: a retry that arrives while its
    /// original waits joins it instead of being queued again.
    waiters: HashMap<Key, Vec<Waiter>>,
    /// A task is committing this room's queue (at most one per room).
    committing: bool,
    last_used_ms: u64,
}

struct Queued {
    sender: UserId,
    id: ClientMsgId,
    body: Body,
}

/// This writer's view of a room. Only the room's committing task changes it.
struct View {
    /// The first seq no item is known to hold: every item below it has been seen (written or
    /// read) by this writer, so a write here that succeeds follows all of them.
    next: Seq,
    /// The marker's `reserved` as last seen (`None`: the room has no marker yet).
    reserved: Option<u64>,
    /// The newest item's `ttl`: a later item never expires before an earlier one.
    last_ttl: u64,
    /// When the view was last checked against the table (a read or a successful write).
    confirmed_ms: u64,
    window: DedupeWindow,
}

enum Enqueued {
    Answered(Appended),
    Waiting(oneshot::Receiver<Result<Appended, StoreError>>),
}

impl<T: Table> GroupCommitStore<T> {
    /// A store over `table` with the system clock.
    pub fn new(table: T, settings: Settings) -> Self {
        Self::with_clock(table, settings, Arc::new(SystemClock))
    }

    /// A store over `table` whose time comes from `clock` (tests move it).
    pub fn with_clock(table: T, settings: Settings, clock: Arc<dyn Clock>) -> Self {
        GroupCommitStore {
            shared: Arc::new(Shared {
                table,
                settings,
                clock,
                rooms: Mutex::default(),
            }),
        }
    }

    /// The table underneath.
    pub fn table(&self) -> &T {
        &self.shared.table
    }

    /// Sends of `room` waiting for a write (not yet taken by one).
    #[cfg(test)]
    fn queued(&self, room: &RoomId) -> usize {
        let rooms = self.shared.lock_rooms();
        rooms.map.get(room).map_or(0, |r| r.lock().queue.len())
    }

    /// Sends of `room` waiting for their answer, queued or in flight.
    #[cfg(test)]
    fn waiting(&self, room: &RoomId) -> usize {
        let rooms = self.shared.lock_rooms();
        rooms.map.get(room).map_or(0, |r| r.lock().waiters.len())
    }

    /// Rooms held in memory and the dedupe entries they hold.
    pub fn memory(&self) -> (usize, usize) {
        let rooms = self.shared.lock_rooms();
        let entries = rooms
            .map
            .values()
            .map(|room| room.lock().view.as_ref().map_or(0, |v| v.window.len()))
            .sum();
        (rooms.map.len(), entries)
    }
}

#[async_trait::async_trait]
impl<T: Table> MessageStore for GroupCommitStore<T> {
    async fn append(&self, msg: NewMessage) -> Result<Appended, StoreError> {
        match Shared::enqueue(&self.shared, msg)? {
            Enqueued::Answered(appended) => Ok(appended),
            Enqueued::Waiting(rx) => rx.await.unwrap_or_else(|_| {
                Err(anyhow::anyhow!("the room's commit task ended without an answer").into())
            }),
        }
    }

    async fn history(
        &self,
        room: &RoomId,
        after: Seq,
        limit: u32,
    ) -> Result<HistoryPage, StoreError> {
        self.shared.history(room, after, limit).await
    }

    async fn history_before(
        &self,
        room: &RoomId,
        before: Option<Seq>,
        limit: u32,
    ) -> Result<HistoryPage, StoreError> {
        self.shared.history_before(room, before, limit).await
    }

    fn usage(&self) -> Usage {
        self.shared.table.meter().usage()
    }
}

impl Room {
    fn lock(&self) -> MutexGuard<'_, RoomState> {
        self.state.lock().expect("room lock poisoned")
    }
}

impl RoomState {
    fn answer(&mut self, sender: &UserId, id: &ClientMsgId, result: &Result<Appended, StoreError>) {
        let key = (sender.clone(), id.clone());
        for waiter in self.waiters.remove(&key).unwrap_or_default() {
            let copy = match result {
                Ok(appended) => Ok(appended.clone()),
                Err(e) => Err(e.duplicate()),
            };
            // The request may be gone (client disconnected): its answer is not needed.
            let _ = waiter.send(copy);
        }
    }
}

/// Resets a room when its commit task ends without finishing (a panic): the waiters get an error
/// (their senders are dropped), and the next send starts a new task with a fresh view.
struct DriveGuard {
    room: Arc<Room>,
    finished: bool,
}

impl Drop for DriveGuard {
    fn drop(&mut self) {
        if !self.finished {
            let mut state = self.room.lock();
            state.committing = false;
            state.queue.clear();
            state.waiters.clear();
            state.view = None;
        }
    }
}

impl<T: Table> Shared<T> {
    fn lock_rooms(&self) -> MutexGuard<'_, Rooms> {
        self.rooms.lock().expect("rooms lock poisoned")
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    fn window_size(&self) -> WindowSize {
        WindowSize {
            messages: self.settings.dedupe_window_messages,
            duration_ms: millis(self.settings.dedupe_window),
            cap: self.settings.dedupe_memory_entries,
        }
    }

    /// Answers a send from the room's window, or queues it (joining its original if that is
    /// queued or in flight) and makes sure a task commits the queue.
    fn enqueue(shared: &Arc<Self>, msg: NewMessage) -> Result<Enqueued, StoreError> {
        let now = shared.now_ms();
        let mut rooms = shared.lock_rooms();
        shared.sweep(&mut rooms, now, &msg.room);
        let room = Arc::clone(rooms.map.entry(msg.room.clone()).or_insert_with(|| {
            Arc::new(Room {
                id: msg.room.clone(),
                state: Mutex::default(),
            })
        }));
        let mut state = room.lock();
        // Still under the rooms lock: a sweep cannot drop the room between here and the queue.
        drop(rooms);
        state.last_used_ms = now;
        let size = shared.window_size();
        if let Some(original) = state
            .view
            .as_mut()
            .and_then(|view| view.window.lookup(&msg.sender, &msg.id, size, now))
        {
            return Ok(Enqueued::Answered(Appended {
                seq: original.seq,
                ts: original.ts.to_string(),
                duplicate: true,
            }));
        }
        let (tx, rx) = oneshot::channel();
        let queued = state.queue.len();
        match state.waiters.entry((msg.sender.clone(), msg.id.clone())) {
            Entry::Occupied(mut waiting) => waiting.get_mut().push(tx),
            Entry::Vacant(slot) => {
                if queued >= MAX_QUEUED_PER_ROOM {
                    return Err(StoreError::Contention {
                        room: msg.room,
                        reason: format!("{queued} sends are queued in this writer"),
                    });
                }
                slot.insert(vec![tx]);
                state.queue.push_back(Queued {
                    sender: msg.sender,
                    id: msg.id,
                    body: msg.body,
                });
            }
        }
        if !state.committing {
            state.committing = true;
            tokio::spawn(Self::drive(Arc::clone(shared), Arc::clone(&room)));
        }
        Ok(Enqueued::Waiting(rx))
    }

    /// Drops rooms idle for longer than the dedupe window, then, while the rooms' windows hold
    /// more entries than allowed, the least recently used idle rooms. A dropped room is read
    /// again from the table when next used, so dropping is always safe.
    fn sweep(&self, rooms: &mut Rooms, now: u64, in_use: &RoomId) {
        if now < rooms.last_sweep_ms.saturating_add(SWEEP_EVERY_MS) {
            return;
        }
        rooms.last_sweep_ms = now;
        let idle_ms = millis(self.settings.dedupe_window);
        let mut total = 0;
        let mut idle: Vec<(u64, RoomId, usize)> = Vec::new();
        rooms.map.retain(|id, room| {
            let state = room.lock();
            let busy = state.committing || !state.queue.is_empty() || id == in_use;
            if !busy && now.saturating_sub(state.last_used_ms) >= idle_ms {
                return false;
            }
            let entries = state.view.as_ref().map_or(0, |v| v.window.len());
            total += entries;
            if !busy {
                idle.push((state.last_used_ms, id.clone(), entries));
            }
            true
        });
        if total > self.settings.dedupe_memory_entries {
            idle.sort_unstable_by_key(|(used, ..)| *used);
            for (_, id, entries) in idle {
                if total <= self.settings.dedupe_memory_entries {
                    break;
                }
                rooms.map.remove(&id);
                total -= entries;
            }
        }
    }

    /// The room's commit task: takes batches off the queue until it is empty.
    async fn drive(shared: Arc<Self>, room: Arc<Room>) {
        let mut guard = DriveGuard {
            room: Arc::clone(&room),
            finished: false,
        };
        loop {
            let batch = {
                let mut state = room.lock();
                if state.queue.is_empty() {
                    state.committing = false;
                    guard.finished = true;
                    return;
                }
                take_batch(&mut state.queue, &room.id)
            };
            let mut pending = batch;
            // On failure `pending` holds the sends not yet answered.
            if let Err(e) = shared.commit(&room, &mut pending).await {
                tracing::warn!(room = %room.id, error.message = %e, messages = pending.len(), "commit failed");
                let mut state = room.lock();
                for q in &pending {
                    state.answer(&q.sender, &q.id, &Err(e.duplicate()));
                }
            }
        }
    }

    /// Commits `batch` (answering each of its sends), or fails with the sends still in it.
    async fn commit(&self, room: &Room, batch: &mut Vec<Queued>) -> Result<(), StoreError> {
        let mut races = 0;
        loop {
            self.refresh_view(room).await?;

            // Retries the view knows are answered with their original seq, not written again.
            let size = self.window_size();
            let now = self.now_ms();
            let (next, reserved, last_ttl) = {
                let mut state = room.lock();
                let state = &mut *state;
                let view = state.view.as_mut().expect("refreshed above");
                let mut known = Vec::new();
                batch.retain(|q| match view.window.lookup(&q.sender, &q.id, size, now) {
                    Some(original) => {
                        known.push((q.sender.clone(), q.id.clone(), original));
                        false
                    }
                    None => true,
                });
                let view = (view.next, view.reserved, view.last_ttl);
                for (sender, id, original) in known {
                    let answer = Ok(Appended {
                        seq: original.seq,
                        ts: original.ts.to_string(),
                        duplicate: true,
                    });
                    state.answer(&sender, &id, &answer);
                }
                view
            };
            if batch.is_empty() {
                return Ok(());
            }

            let last = Seq(next.0 + batch.len() as u64 - 1);
            if reserved.is_none_or(|r| last.0 > r)
                && self.reserve(room, next, last, reserved).await? == Put::Lost
            {
                // The marker moved under us: the view was refreshed, start over.
                races += 1;
                if races >= MAX_RACES {
                    return Err(self.contention(room, races));
                }
                continue;
            }

            let now = self.now_ms();
            let ttl = (now + millis(self.settings.retention))
                .div_ceil(1000)
                .max(last_ttl);
            let item = StoredBatch {
                room: room.id.clone(),
                seq: next,
                last,
                ts: rfc3339_ms(now),
                ttl,
                msgs: batch
                    .iter()
                    .map(|q| StoredEntry {
                        id: q.id.clone(),
                        sender: q.sender.clone(),
                        body: q.body.clone(),
                    })
                    .collect(),
            };
            match self.table.put_new(&item).await? {
                Put::Written => {
                    self.table.meter().stored(batch.len() as u64);
                    let size = self.window_size();
                    let mut state = room.lock();
                    let view = state.view.as_mut().expect("refreshed above");
                    view.next = last.next();
                    view.last_ttl = ttl;
                    view.confirmed_ms = now;
                    view.window.add(&item, now, size, now);
                    for (q, seq) in batch.iter().zip(next.0..) {
                        let answer = Ok(Appended {
                            seq: Seq(seq),
                            ts: item.ts.clone(),
                            duplicate: false,
                        });
                        state.answer(&q.sender, &q.id, &answer);
                    }
                    batch.clear();
                    return Ok(());
                }
                Put::Lost => {
                    self.table.meter().lost_race();
                    races += 1;
                    tracing::debug!(room = %room.id, %next, races, "lost the race for a seq: catching up");
                    if races >= MAX_RACES {
                        return Err(self.contention(room, races));
                    }
                    self.catch_up(room).await?;
                }
            }
        }
    }

    fn contention(&self, room: &Room, races: u32) -> StoreError {
        StoreError::Contention {
            room: room.id.clone(),
            reason: format!("lost the race for its next seqs {races} times in a row"),
        }
    }

    /// Loads the room's view if this writer has none, or catches it up if it has not been
    /// checked against the table for a dedupe window (so a view is never older than that).
    async fn refresh_view(&self, room: &Room) -> Result<(), StoreError> {
        let now = self.now_ms();
        let confirmed = room.lock().view.as_ref().map(|v| v.confirmed_ms);
        match confirmed {
            None => {
                let view = self.load(&room.id).await?;
                room.lock().view = Some(view);
            }
            Some(at) if now.saturating_sub(at) >= millis(self.settings.dedupe_window) => {
                self.catch_up(room).await?;
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// Reads the room's tail and marker: where the next item goes, and the dedupe window.
    async fn load(&self, room: &RoomId) -> Result<View, StoreError> {
        let now = self.now_ms();
        let size = self.window_size();
        let (marker, tail) = tokio::join!(
            self.table.marker(room),
            self.table.read_back(room, None, READ_PAGE)
        );
        let (marker, mut page) = (marker?, tail?);
        let newest = page.items.first().filter(|i| is_live(i, now)).cloned();
        // Newest first: walk back until the window reaches far enough or items are expired.
        let mut seen: Vec<StoredBatch> = Vec::new();
        if newest.is_some() {
            let mut count = 0;
            'pages: loop {
                let mut oldest_key = None;
                for item in page.items.drain(..) {
                    if !is_live(&item, now) {
                        break 'pages;
                    }
                    count += item.msgs.len();
                    let oldest_ms = stored_ms(&item.ts);
                    oldest_key = Some(item.seq);
                    seen.push(item);
                    if DedupeWindow::reaches(size, count, oldest_ms, now) {
                        break 'pages;
                    }
                }
                match oldest_key {
                    Some(key) if page.more && key.0 > 1 => {
                        page = self
                            .table
                            .read_back(room, Some(Seq(key.0 - 1)), READ_PAGE)
                            .await?;
                    }
                    _ => break,
                }
            }
        }
        let next = match (&newest, marker) {
            (Some(item), marker) => item.last.next().max(Seq(marker.map_or(1, |m| m.floor))),
            (None, None) => Seq(1),
            (None, Some(marker)) => self.resume_after_expiry(marker, now).next(),
        };
        let mut window = DedupeWindow::default();
        for item in seen.iter().rev() {
            window.add(item, stored_ms(&item.ts), size, now);
        }
        Ok(View {
            next,
            reserved: marker.map(|m| m.reserved),
            last_ttl: newest.map_or(0, |i| i.ttl),
            confirmed_ms: now,
            window,
        })
    }

    /// The head of a room that has a marker but no live item. If the marker was raised recently
    /// (less than half the retention ago), no item written since can have expired, so none was:
    /// the head is just below the marker's floor. Otherwise items may have been written and have
    /// expired anywhere up to `reserved`, which is then the head: the room continues above every
    /// seq it may ever have used.
    fn resume_after_expiry(&self, marker: Marker, now: u64) -> Seq {
        let recent = now
            < marker
                .at_ms
                .saturating_add(millis(self.settings.retention) / 2);
        if recent {
            Seq(marker.floor.saturating_sub(1))
        } else {
            Seq(marker.reserved)
        }
    }

    /// Reads every item at or after the view's `next` (another writer's), adding them to the
    /// window and moving `next` past them.
    async fn catch_up(&self, room: &Room) -> Result<(), StoreError> {
        let size = self.window_size();
        let mut from = room.lock().view.as_ref().map_or(Seq(1), |v| v.next);
        loop {
            let page = self.table.read_from(&room.id, from, READ_PAGE).await?;
            let now = self.now_ms();
            let mut state = room.lock();
            let view = state
                .view
                .as_mut()
                .expect("only a loaded view is caught up");
            for item in &page.items {
                // An expired item still holds its seqs: step past it, just do not remember it.
                if is_live(item, now) {
                    view.window.add(item, stored_ms(&item.ts), size, now);
                }
                view.next = view.next.max(item.last.next());
                view.last_ttl = view.last_ttl.max(item.ttl);
            }
            view.confirmed_ms = now;
            from = view.next;
            if !page.more || page.items.is_empty() {
                return Ok(());
            }
        }
    }

    /// Raises the room's marker so `last` is reserved. `Put::Lost` when another writer moved it
    /// first: the view then has the new marker and has caught up.
    async fn reserve(
        &self,
        room: &Room,
        next: Seq,
        last: Seq,
        known: Option<u64>,
    ) -> Result<Put, StoreError> {
        let marker = Marker {
            reserved: last.0 + RESERVE_STEP,
            floor: next.0,
            at_ms: self.now_ms(),
        };
        match self.table.put_marker(&room.id, &marker, known).await? {
            Put::Written => {
                room.lock()
                    .view
                    .as_mut()
                    .expect("reserving with a view")
                    .reserved = Some(marker.reserved);
                Ok(Put::Written)
            }
            Put::Lost => {
                let current = self.table.marker(&room.id).await?;
                self.catch_up(room).await?;
                let mut state = room.lock();
                let view = state.view.as_mut().expect("reserving with a view");
                view.reserved = current.map(|m| m.reserved);
                // A writer that found every item expired moved the room above its old
                // reservation: nothing below the floor may be written any more.
                if let Some(m) = current {
                    view.next = view.next.max(Seq(m.floor));
                }
                Ok(Put::Lost)
            }
        }
    }

    /// The room's head: the newest live item's last seq, or, when no item is live, what its
    /// marker says (0 for a room never written).
    async fn head(&self, room: &RoomId) -> Result<Seq, StoreError> {
        let now = self.now_ms();
        let page = self.table.read_back(room, None, 1).await?;
        if let Some(item) = page.items.first().filter(|i| is_live(i, now)) {
            return Ok(item.last);
        }
        Ok(match self.table.marker(room).await? {
            None => Seq(0),
            Some(marker) => self.resume_after_expiry(marker, now),
        })
    }

    async fn history(
        &self,
        room: &RoomId,
        after: Seq,
        limit: u32,
    ) -> Result<HistoryPage, StoreError> {
        // The head first: every seq up to it is stored (or expired) before the items are read.
        let head = self.head(room).await?;
        if limit == 0 || after >= head {
            return Ok(HistoryPage {
                head,
                messages: Vec::new(),
            });
        }
        let first_wanted = after.next();
        // The item holding `after + 1` may start below it; the rest start above it.
        let (holding, mut rest) = tokio::join!(
            self.table.read_back(room, Some(first_wanted), 1),
            self.table.read_from(room, first_wanted.next(), limit)
        );
        let now = self.now_ms();
        let mut messages = Vec::new();
        let take = |items: Vec<StoredBatch>, messages: &mut Vec<_>| {
            let events = items
                .into_iter()
                .filter(|i| is_live(i, now))
                .flat_map(StoredBatch::into_events)
                .filter(|e| e.seq > after);
            for event in events {
                if messages.len() == limit as usize {
                    break;
                }
                messages.push(event);
            }
        };
        take(holding?.items, &mut messages);
        loop {
            let page = rest?;
            let from = page.items.last().map(|i| i.last.next());
            take(page.items, &mut messages);
            match from {
                Some(from) if page.more && messages.len() < limit as usize => {
                    let remaining = limit - messages.len() as u32;
                    rest = self.table.read_from(room, from, remaining).await;
                }
                _ => break,
            }
        }
        match messages.first() {
            Some(first) if first.seq == first_wanted => {
                let head = head.max(messages.last().map_or(head, |m| m.seq));
                Ok(HistoryPage { head, messages })
            }
            other => Err(StoreError::HistoryExpired {
                room: room.clone(),
                after,
                oldest: other.map_or(head.next(), |m| m.seq),
            }),
        }
    }

    async fn history_before(
        &self,
        room: &RoomId,
        before: Option<Seq>,
        limit: u32,
    ) -> Result<HistoryPage, StoreError> {
        // The head first: every seq up to it is stored (or expired) before the items are read.
        let head = self.head(room).await?;
        let newest = before.map_or(head, |b| Seq(b.0.saturating_sub(1)).min(head));
        let mut newest_first: Vec<MessageEvent> = Vec::new();
        if limit == 0 || newest == Seq(0) {
            return Ok(HistoryPage {
                head,
                messages: newest_first,
            });
        }
        let now = self.now_ms();
        // The next seq the page needs, going down; the page ends at the first gap (an expired
        // item), so it is always consecutive.
        let mut wanted = newest;
        let mut at_most = newest;
        'pages: loop {
            let page = self.table.read_back(room, Some(at_most), limit).await?;
            let Some(oldest_item) = page.items.last().map(|i| i.seq) else {
                break;
            };
            for item in page.items {
                if !is_live(&item, now) {
                    break 'pages;
                }
                let events: Vec<MessageEvent> = item.into_events().collect();
                for event in events.into_iter().rev() {
                    if event.seq > wanted {
                        continue;
                    }
                    if event.seq < wanted {
                        break 'pages;
                    }
                    newest_first.push(event);
                    if newest_first.len() == limit as usize || wanted == Seq(1) {
                        break 'pages;
                    }
                    wanted = Seq(wanted.0 - 1);
                }
            }
            if !page.more || oldest_item.0 <= 1 {
                break;
            }
            at_most = Seq(oldest_item.0 - 1);
        }
        newest_first.reverse();
        Ok(HistoryPage {
            head,
            messages: newest_first,
        })
    }
}

/// Takes from the front of the queue the sends one item can hold.
fn take_batch(queue: &mut VecDeque<Queued>, room: &RoomId) -> Vec<Queued> {
    let mut bytes = batch_overhead_bound(room);
    let mut batch = Vec::new();
    while let Some(q) = queue.front() {
        let add = entry_bytes(q.id.as_str(), q.sender.as_str(), q.body.as_str());
        if !batch.is_empty() && (batch.len() == MAX_ITEM_MESSAGES || bytes + add > MAX_ITEM_BYTES) {
            break;
        }
        bytes += add;
        batch.extend(queue.pop_front());
    }
    batch
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// When an item was stored, from its `ts` (0, i.e. long ago, if it does not parse).
fn stored_ms(ts: &str) -> u64 {
    time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
        .ok()
        .and_then(|t| u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok())
        .unwrap_or(0)
}

#[cfg(test)]
#[path = "commit_tests.rs"]
mod tests;
