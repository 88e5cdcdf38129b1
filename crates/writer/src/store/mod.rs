//! Where messages live. [`MessageStore`] is the writer's one external effect.
//!
//! [`GroupCommitStore`] is the real one: per room, the sends that arrive while a write is in
//! flight are committed together by the next write, one conditional put of one item that holds a
//! contiguous run of seqs ([`commit`]). It runs over a [`Table`]: [`DynamoTable`] in production,
//! [`MemoryTable`] in unit tests (same semantics, with faults to inject).

mod commit;
mod dynamo;
mod item;
mod memory;
mod window;

pub use commit::GroupCommitStore;
pub use dynamo::{DynamoTable, ensure_table};
pub use item::{MAX_ITEM_BYTES, MAX_ITEM_MESSAGES, Marker, item_bytes, write_units};
pub use memory::{MemoryTable, PutFault};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chorus_protocol::api::HistoryPage;
use chorus_protocol::{Body, ClientMsgId, RoomId, Seq, StoredBatch, UserId};

/// The store the writer runs on DynamoDB.
pub type DynamoStore = GroupCommitStore<DynamoTable>;
/// The same store over an in-memory table, for tests.
pub type MemoryStore = GroupCommitStore<MemoryTable>;

/// A send that has been made durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub seq: Seq,
    pub ts: String,
    /// The (room, sender, id) was already stored: `seq` and `ts` are the original ones and nothing
    /// new was written.
    pub duplicate: bool,
}

/// A message to append, already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub room: RoomId,
    pub id: ClientMsgId,
    pub sender: UserId,
    pub body: Body,
}

/// Why the store could not serve a request. Callers show clients only what each variant's
/// documentation says.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The room is too busy: writers kept racing for its next seq, or too many sends are queued.
    /// The caller may retry with the same id.
    #[error("room {room} is too busy: {reason}")]
    Contention { room: RoomId, reason: String },
    /// The messages right after `after` are no longer stored (retention); `oldest` is the oldest
    /// seq that is (the room's head + 1 when it stores none). Safe to tell the client.
    #[error(
        "messages after seq {after} of room {room} are no longer stored (retention); the oldest stored seq of room {room} is {oldest}"
    )]
    HistoryExpired {
        room: RoomId,
        after: Seq,
        oldest: Seq,
    },
    /// The database failed or answered something unexpected.
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl StoreError {
    /// A copy for each of several waiters of one failed write (the cause chain becomes text).
    pub(crate) fn duplicate(&self) -> StoreError {
        match self {
            StoreError::Contention { room, reason } => StoreError::Contention {
                room: room.clone(),
                reason: reason.clone(),
            },
            StoreError::HistoryExpired {
                room,
                after,
                oldest,
            } => StoreError::HistoryExpired {
                room: room.clone(),
                after: *after,
                oldest: *oldest,
            },
            StoreError::Unexpected(cause) => StoreError::Unexpected(anyhow::anyhow!("{cause:#}")),
        }
    }
}

/// What the store has cost so far, in DynamoDB's billing units, counted from the sizes of the
/// items written and read (1 write unit per started KB written, 1 read unit per started 4 KB of a
/// consistent read).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Write request units, failed conditional writes included.
    pub write_units: u64,
    /// Read request units (consistent reads).
    pub read_units: u64,
    /// Items written (each a run of one or more messages).
    pub items_written: u64,
    /// Messages stored by those items.
    pub messages_written: u64,
    /// Writes that lost the race for a seq to another writer (then caught up and retried).
    pub races_lost: u64,
}

/// Counters behind [`Usage`], shared by a store and its table.
#[derive(Debug, Default)]
pub struct Meter {
    write_units: AtomicU64,
    read_units: AtomicU64,
    items_written: AtomicU64,
    messages_written: AtomicU64,
    races_lost: AtomicU64,
}

impl Meter {
    pub(crate) fn wrote(&self, units: u64) {
        self.write_units.fetch_add(units, Ordering::Relaxed);
    }
    pub(crate) fn read(&self, units: u64) {
        self.read_units.fetch_add(units, Ordering::Relaxed);
    }
    pub(crate) fn stored(&self, messages: u64) {
        self.items_written.fetch_add(1, Ordering::Relaxed);
        self.messages_written.fetch_add(messages, Ordering::Relaxed);
    }
    pub(crate) fn lost_race(&self) {
        self.races_lost.fetch_add(1, Ordering::Relaxed);
    }
    /// The counts so far.
    pub fn usage(&self) -> Usage {
        Usage {
            write_units: self.write_units.load(Ordering::Relaxed),
            read_units: self.read_units.load(Ordering::Relaxed),
            items_written: self.items_written.load(Ordering::Relaxed),
            messages_written: self.messages_written.load(Ordering::Relaxed),
            races_lost: self.races_lost.load(Ordering::Relaxed),
        }
    }
}

/// Per-room append-only log with dense seqs and idempotent appends.
#[async_trait::async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Appends `msg` at the room's next seq, or returns the original seq if (room, sender, id) was
    /// stored within the dedupe window.
    ///
    /// # Errors
    /// [`StoreError`] when the database fails or the room is too busy.
    async fn append(&self, msg: NewMessage) -> Result<Appended, StoreError>;

    /// Messages with seq > `after`, oldest first, at most `limit`, and the room's head.
    ///
    /// # Errors
    /// [`StoreError::HistoryExpired`] when the messages right after `after` are no longer stored;
    /// [`StoreError::Unexpected`] when the database fails.
    async fn history(
        &self,
        room: &RoomId,
        after: Seq,
        limit: u32,
    ) -> Result<HistoryPage, StoreError>;

    /// Scrollback: the newest `limit` messages with seq < `before` (≤ the head if `None`), oldest
    /// first, and the room's head. The page is consecutive and ends right below `before`; it
    /// stops early (or is empty) where retention has removed older messages.
    ///
    /// # Errors
    /// [`StoreError::Unexpected`] when the database fails.
    async fn history_before(
        &self,
        room: &RoomId,
        before: Option<Seq>,
        limit: u32,
    ) -> Result<HistoryPage, StoreError>;

    /// What the store has cost so far.
    fn usage(&self) -> Usage;
}

/// How the store keeps messages and recognizes retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// How long an item is kept (its `ttl`); older history answers [`StoreError::HistoryExpired`].
    pub retention: Duration,
    /// A retry is recognized if its original was stored less than this long ago …
    pub dedupe_window: Duration,
    /// … or is among the room's last this many messages.
    pub dedupe_window_messages: usize,
    /// Most (sender, id) entries the writer keeps in memory over all rooms; also the most one room
    /// keeps, should one room store more than this within `dedupe_window`.
    pub dedupe_memory_entries: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            retention: Duration::from_secs(3 * 24 * 3600),
            dedupe_window: Duration::from_secs(600),
            dedupe_window_messages: 10_000,
            dedupe_memory_entries: 1_000_000,
        }
    }
}

/// Store settings that would break one of the store's promises; the message names the setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSettings(String);

impl Settings {
    /// Checks that the settings keep the store's promises.
    ///
    /// # Errors
    /// [`InvalidSettings`] naming the setting that does not.
    pub fn validate(&self) -> Result<(), InvalidSettings> {
        self.check().map_err(InvalidSettings)
    }

    fn check(&self) -> Result<(), String> {
        if self.retention < Duration::from_secs(3600) {
            return Err(format!(
                "retention must be at least 1 hour, got {:?}",
                self.retention
            ));
        }
        if self.retention < self.dedupe_window * 4 {
            return Err(format!(
                "retention ({:?}) must be at least 4 times the dedupe window ({:?})",
                self.retention, self.dedupe_window
            ));
        }
        if self.dedupe_window_messages == 0 || self.dedupe_window.is_zero() {
            return Err("the dedupe window must be at least 1 message and 1 second".into());
        }
        if self.dedupe_memory_entries < self.dedupe_window_messages {
            return Err(format!(
                "dedupe memory ({} entries) must hold at least the dedupe window ({} messages)",
                self.dedupe_memory_entries, self.dedupe_window_messages
            ));
        }
        Ok(())
    }
}

/// The store's clock, in milliseconds since the Unix epoch. Injected so tests can move time.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A clock that moves only when told, for tests.
#[derive(Debug)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock showing `ms` since the epoch.
    pub fn at(ms: u64) -> Arc<Self> {
        Arc::new(ManualClock(AtomicU64::new(ms)))
    }
    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// `ms` since the epoch as RFC 3339 UTC with milliseconds, the writer's `ts` format.
pub fn rfc3339_ms(ms: u64) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .format(&format)
        .expect("UTC timestamps always format")
}

/// Whether `item` is still within retention at `now_ms` (DynamoDB deletes expired items lazily,
/// so readers filter them out themselves).
pub(crate) fn is_live(item: &StoredBatch, now_ms: u64) -> bool {
    item.ttl.saturating_mul(1000) > now_ms
}

/// One page of a room's items, in the order asked for.
#[derive(Debug, Default)]
pub struct ItemPage {
    pub items: Vec<StoredBatch>,
    /// The read stopped early (its limit or DynamoDB's 1 MB page): more items may follow.
    pub more: bool,
}

/// What a conditional write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Written,
    /// The condition failed: another writer got there first.
    Lost,
}

/// The table operations the group commit needs, every read consistent. Implemented on DynamoDB
/// ([`DynamoTable`]) and in memory ([`MemoryTable`]).
#[async_trait::async_trait]
pub trait Table: Send + Sync + 'static {
    /// Writes `item` unless an item exists at its key (room, seq).
    async fn put_new(&self, item: &StoredBatch) -> Result<Put, StoreError>;

    /// Up to `limit` items of `room` with `from` ≤ key, ascending.
    async fn read_from(&self, room: &RoomId, from: Seq, limit: u32)
    -> Result<ItemPage, StoreError>;

    /// Up to `limit` items of `room` with 1 ≤ key ≤ `at_most` (no bound if `None`), descending.
    async fn read_back(
        &self,
        room: &RoomId,
        at_most: Option<Seq>,
        limit: u32,
    ) -> Result<ItemPage, StoreError>;

    /// The room's marker, if it has one.
    async fn marker(&self, room: &RoomId) -> Result<Option<Marker>, StoreError>;

    /// Writes the room's marker if its `reserved` is still `expected` (`None`: no marker yet).
    async fn put_marker(
        &self,
        room: &RoomId,
        marker: &Marker,
        expected: Option<u64>,
    ) -> Result<Put, StoreError>;

    /// The table's cost counters.
    fn meter(&self) -> &Meter;
}
