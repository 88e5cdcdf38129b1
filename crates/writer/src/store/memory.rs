//! [`Table`] in memory, with DynamoDB's semantics (conditional puts, consistent reads, expired
//! items kept until deleted), for unit tests. Tests can also make puts wait or fail, and delete
//! expired items as DynamoDB's TTL eventually does.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use chorus_protocol::{RoomId, Seq, StoredBatch};
use tokio::sync::{Semaphore, watch};

use super::item::{Marker, encode_batch, item_bytes, read_units, write_units};
use super::{ItemPage, Meter, Put, StoreError, Table};

/// What the next put does instead of succeeding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutFault {
    /// Fails without writing.
    Fail,
    /// Writes, then fails as a timeout would: the caller cannot know it was written.
    WriteThenFail,
}

/// The table in memory. Every section under the std `Mutex` is short and never awaits.
#[derive(Debug, Default)]
pub struct MemoryTable {
    state: Mutex<State>,
    meter: Meter,
    /// When set, each put waits for a permit first (see [`MemoryTable::hold_puts`]).
    gate: Mutex<Option<Arc<Semaphore>>>,
    waiting: Waiting,
}

#[derive(Debug, Default)]
struct State {
    items: BTreeMap<(RoomId, u64), StoredBatch>,
    markers: HashMap<RoomId, Marker>,
    faults: VecDeque<PutFault>,
    puts: usize,
}

/// How many puts wait at the gate, watchable.
#[derive(Debug)]
struct Waiting(watch::Sender<usize>);

impl Default for Waiting {
    fn default() -> Self {
        Waiting(watch::channel(0).0)
    }
}

impl MemoryTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("memory table lock poisoned")
    }

    /// Every item of `room`, in key order, expired or not.
    pub fn items(&self, room: &RoomId) -> Vec<StoredBatch> {
        self.lock()
            .items
            .range((room.clone(), 0)..=(room.clone(), u64::MAX))
            .map(|(_, item)| item.clone())
            .collect()
    }

    /// The room's marker.
    pub fn marker_of(&self, room: &RoomId) -> Option<Marker> {
        self.lock().markers.get(room).copied()
    }

    /// Puts attempted so far (written or not).
    pub fn puts(&self) -> usize {
        self.lock().puts
    }

    /// The next puts fail as given, one fault each.
    pub fn fail_puts(&self, faults: &[PutFault]) {
        self.lock().faults.extend(faults);
    }

    /// Deletes the items whose `ttl` has passed at `now_ms`, as DynamoDB's TTL does some time
    /// after expiry.
    pub fn delete_expired(&self, now_ms: u64) {
        self.lock()
            .items
            .retain(|_, item| item.ttl.saturating_mul(1000) > now_ms);
    }

    /// From now on puts wait until [`MemoryTable::release_puts`] lets them through.
    pub fn hold_puts(&self) {
        *self.gate.lock().expect("gate lock poisoned") = Some(Arc::new(Semaphore::new(0)));
    }

    /// Puts no longer wait (held ones go through).
    pub fn open_puts(&self) {
        if let Some(gate) = self.gate.lock().expect("gate lock poisoned").take() {
            gate.add_permits(Semaphore::MAX_PERMITS / 2);
        }
    }

    /// Lets `n` held puts through.
    pub fn release_puts(&self, n: usize) {
        if let Some(gate) = self.gate.lock().expect("gate lock poisoned").as_ref() {
            gate.add_permits(n);
        }
    }

    /// Waits until `n` puts are held at the gate.
    pub async fn puts_held(&self, n: usize) {
        let mut rx = self.waiting.0.subscribe();
        rx.wait_for(|waiting| *waiting >= n)
            .await
            .expect("the table outlives its watchers");
    }

    fn page(&self, items: Vec<StoredBatch>, more: bool) -> ItemPage {
        let bytes: usize = items
            .iter()
            .filter_map(|i| encode_batch(i).ok())
            .map(|i| item_bytes(&i))
            .sum();
        self.meter.read(read_units(bytes));
        ItemPage { items, more }
    }
}

#[async_trait::async_trait]
impl Table for MemoryTable {
    async fn put_new(&self, item: &StoredBatch) -> Result<Put, StoreError> {
        // Every call is a network round trip in production: let other tasks run in between.
        tokio::task::yield_now().await;
        let gate = self.gate.lock().expect("gate lock poisoned").clone();
        if let Some(gate) = gate {
            self.waiting.0.send_modify(|n| *n += 1);
            let permit = gate.acquire().await;
            self.waiting.0.send_modify(|n| *n -= 1);
            permit.expect("the gate is never closed").forget();
        }
        self.meter
            .wrote(write_units(item_bytes(&encode_batch(item)?)));
        let mut state = self.lock();
        state.puts += 1;
        let fault = state.faults.pop_front();
        if fault == Some(PutFault::Fail) {
            return Err(anyhow::anyhow!("injected failure").into());
        }
        let key = (item.room.clone(), item.seq.0);
        if state.items.contains_key(&key) {
            return Ok(Put::Lost);
        }
        state.items.insert(key, item.clone());
        if fault == Some(PutFault::WriteThenFail) {
            return Err(anyhow::anyhow!("injected timeout after the write").into());
        }
        Ok(Put::Written)
    }

    async fn read_from(
        &self,
        room: &RoomId,
        from: Seq,
        limit: u32,
    ) -> Result<ItemPage, StoreError> {
        tokio::task::yield_now().await;
        let (items, more) = {
            let state = self.lock();
            let mut range = state
                .items
                .range((room.clone(), from.0.max(1))..=(room.clone(), u64::MAX));
            let items: Vec<StoredBatch> = range
                .by_ref()
                .take(limit.max(1) as usize)
                .map(|(_, i)| i.clone())
                .collect();
            (items, range.next().is_some())
        };
        Ok(self.page(items, more))
    }

    async fn read_back(
        &self,
        room: &RoomId,
        at_most: Option<Seq>,
        limit: u32,
    ) -> Result<ItemPage, StoreError> {
        tokio::task::yield_now().await;
        let top = at_most.map_or(u64::MAX, |s| s.0);
        if top == 0 {
            return Ok(ItemPage::default());
        }
        let (items, more) = {
            let state = self.lock();
            let mut range = state
                .items
                .range((
                    Bound::Included((room.clone(), 1)),
                    Bound::Included((room.clone(), top)),
                ))
                .rev();
            let items: Vec<StoredBatch> = range
                .by_ref()
                .take(limit.max(1) as usize)
                .map(|(_, i)| i.clone())
                .collect();
            (items, range.next().is_some())
        };
        Ok(self.page(items, more))
    }

    async fn marker(&self, room: &RoomId) -> Result<Option<Marker>, StoreError> {
        tokio::task::yield_now().await;
        self.meter.read(1);
        Ok(self.lock().markers.get(room).copied())
    }

    async fn put_marker(
        &self,
        room: &RoomId,
        marker: &Marker,
        expected: Option<u64>,
    ) -> Result<Put, StoreError> {
        tokio::task::yield_now().await;
        self.meter.wrote(1);
        let mut state = self.lock();
        let current = state.markers.get(room).map(|m| m.reserved);
        if current != expected {
            return Ok(Put::Lost);
        }
        state.markers.insert(room.clone(), *marker);
        Ok(Put::Written)
    }

    fn meter(&self) -> &Meter {
        &self.meter
    }
}

/// Several stores (writers) can share one table.
#[async_trait::async_trait]
impl<T: Table> Table for Arc<T> {
    async fn put_new(&self, item: &StoredBatch) -> Result<Put, StoreError> {
        (**self).put_new(item).await
    }
    async fn read_from(
        &self,
        room: &RoomId,
        from: Seq,
        limit: u32,
    ) -> Result<ItemPage, StoreError> {
        (**self).read_from(room, from, limit).await
    }
    async fn read_back(
        &self,
        room: &RoomId,
        at_most: Option<Seq>,
        limit: u32,
    ) -> Result<ItemPage, StoreError> {
        (**self).read_back(room, at_most, limit).await
    }
    async fn marker(&self, room: &RoomId) -> Result<Option<Marker>, StoreError> {
        (**self).marker(room).await
    }
    async fn put_marker(
        &self,
        room: &RoomId,
        marker: &Marker,
        expected: Option<u64>,
    ) -> Result<Put, StoreError> {
        (**self).put_marker(room, marker, expected).await
    }
    fn meter(&self) -> &Meter {
        (**self).meter()
    }
}
