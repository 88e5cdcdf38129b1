//! Where messages live. [`MessageStore`] is the writer's one external effect; [`DynamoStore`] is
//! the real one and [`MemoryStore`] the one unit tests use.

mod dynamo;
mod memory;

pub use dynamo::{DynamoStore, ensure_table};
pub use memory::MemoryStore;

use chorus_protocol::api::HistoryPage;
use chorus_protocol::{Body, ClientMsgId, RoomId, Seq, UserId};

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

/// Why the store could not serve a request. Callers show none of this to clients.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Too many writers raced for the same room's next seq; the caller may retry.
    #[error("gave up allocating a seq in room {room} after {attempts} conflicting attempts")]
    Contention { room: RoomId, attempts: u32 },
    /// The database failed or answered something unexpected.
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// Per-room append-only log with dense seqs and idempotent appends.
#[async_trait::async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Appends `msg` at the room's next seq, or returns the original seq if (room, sender, id) was
    /// stored before.
    ///
    /// # Errors
    /// [`StoreError`] when the database fails or contention does not resolve.
    async fn append(&self, msg: NewMessage) -> Result<Appended, StoreError>;

    /// Messages with seq > `after`, oldest first, at most `limit`, and the room's head.
    ///
    /// # Errors
    /// [`StoreError`] when the database fails.
    async fn history(
        &self,
        room: &RoomId,
        after: Seq,
        limit: u32,
    ) -> Result<HistoryPage, StoreError>;
}

/// The writer's clock: RFC 3339 UTC with milliseconds.
pub fn now_rfc3339_ms() -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(&format)
        .expect("UTC timestamps always format")
}
