//! Fakes for running a gateway without AWS and without a writer: in this crate's unit tests, and,
//! behind the `test-support` feature, in tests and benchmarks outside it (`chorus-testkit` builds
//! its harness on them). Never in the service binary.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use chorus_protocol::api::{HistoryPage, SendRequest, SendResponse};
use chorus_protocol::{Body, ClientMsgId, MessageEvent, RoomId, Seq, UserId};

use crate::bus::{BusError, Endpoint, SubscriptionState, TopicSubscriptions};
use crate::writer_client::{LogError, MessageLog};

/// [`TopicSubscriptions`] with no SNS behind them: every subscription is confirmed as soon as it
/// is made. For running a gateway in tests and benchmarks, whose bus messages are posted to its
/// `/sns` directly.
#[derive(Debug, Clone)]
pub struct ConfirmedAtOnce {
    /// The ARN every subscription gets.
    pub subscription_arn: String,
}

#[async_trait::async_trait]
impl TopicSubscriptions for ConfirmedAtOnce {
    async fn subscribe(&self, _: &Endpoint) -> Result<String, BusError> {
        Ok(self.subscription_arn.clone())
    }
    async fn state(&self, _: &str) -> Result<SubscriptionState, BusError> {
        Ok(SubscriptionState::Confirmed)
    }
    async fn confirm(&self, _: &str) -> Result<(), BusError> {
        Ok(())
    }
    async fn unsubscribe(&self, _: &str) -> Result<(), BusError> {
        Ok(())
    }
}

/// `ts` of every message the fakes store.
const TS: &str = "2026-11-29T10:00:00.000Z";

/// A message as [`MemoryLog`] stores it: id `m<seq>`, sent by `feeder`.
///
/// # Panics
/// When `body` is not a valid body (empty or too long).
pub fn stored_message(room: &RoomId, seq: u64, body: impl Into<String>) -> MessageEvent {
    MessageEvent {
        room: room.clone(),
        seq: Seq(seq),
        id: ClientMsgId::parse(format!("m{seq}")).expect("a valid message id"),
        sender: UserId::parse("feeder").expect("a valid user"),
        body: Body::parse(body.into()).expect("a valid body"),
        ts: TS.into(),
    }
}

/// What [`MemoryLog::append_event`] did with a send.
#[derive(Debug, Clone)]
pub struct Appended {
    /// The stored message: the new one, or the one stored before under the same id.
    pub event: MessageEvent,
    /// Whether it was stored now (not a retry of a stored id).
    pub fresh: bool,
}

/// The writer's message log in memory: dense seqs per room from 1, a retried id stored once,
/// history and scrollback as the writer pages them. Rooms start empty (head 0).
///
/// For repair and replay tests it can also hold every history read at a gate, lose seqs (history
/// never returns them) and answer that history below a seq has expired, and it counts the
/// history reads and their limits.
#[derive(Debug, Default)]
pub struct MemoryLog {
    /// A std `Mutex`: held for short sections without `.await`.
    rooms: Mutex<HashMap<RoomId, Vec<MessageEvent>>>,
    reads: AtomicU64,
    /// Limits of the history reads made (head reads ask for 0).
    limits: Mutex<Vec<u32>>,
    /// When set, each history read waits for a permit.
    gate: Option<tokio::sync::Semaphore>,
    /// Seqs history never returns.
    lost: Mutex<BTreeSet<u64>>,
    /// History reads after a seq below this answer `Expired`.
    expired_below: AtomicU64,
}

impl MemoryLog {
    /// A log whose history reads each wait for a permit of [`MemoryLog::open_gate`].
    pub fn gated() -> Self {
        MemoryLog {
            gate: Some(tokio::sync::Semaphore::new(0)),
            ..MemoryLog::default()
        }
    }

    /// Lets `reads` more history reads through the gate.
    ///
    /// # Panics
    /// When the log is not [`MemoryLog::gated`].
    pub fn open_gate(&self, reads: usize) {
        self.gate.as_ref().expect("a gated log").add_permits(reads);
    }

    /// Stores a message for each of `bodies` in `room`, without sending them anywhere; returns
    /// the new ones.
    pub fn store(
        &self,
        room: &RoomId,
        bodies: impl IntoIterator<Item = String>,
    ) -> Vec<MessageEvent> {
        let mut rooms = self.rooms.lock().expect("log lock");
        let log = rooms.entry(room.clone()).or_default();
        bodies
            .into_iter()
            .map(|body| {
                let event = stored_message(room, log.len() as u64 + 1, body);
                log.push(event.clone());
                event
            })
            .collect()
    }

    /// Stores messages `message <seq>` in `room` until its head is `head`; returns every
    /// message of the room.
    pub fn fill(&self, room: &RoomId, head: u64) -> Vec<MessageEvent> {
        let mut rooms = self.rooms.lock().expect("log lock");
        let log = rooms.entry(room.clone()).or_default();
        while (log.len() as u64) < head {
            let seq = log.len() as u64 + 1;
            log.push(stored_message(room, seq, format!("message {seq}")));
        }
        log.clone()
    }

    /// Stores a send as the writer does: a new id gets the next seq, a retried one the seq it
    /// got before.
    pub fn append_event(&self, room: &RoomId, request: &SendRequest) -> Appended {
        let mut rooms = self.rooms.lock().expect("log lock");
        let log = rooms.entry(room.clone()).or_default();
        if let Some(stored) = log.iter().find(|m| m.id == request.id) {
            return Appended {
                event: stored.clone(),
                fresh: false,
            };
        }
        let event = MessageEvent {
            room: room.clone(),
            seq: Seq(log.len() as u64 + 1),
            id: request.id.clone(),
            sender: request.sender.clone(),
            body: request.body.clone(),
            ts: TS.into(),
        };
        log.push(event.clone());
        Appended { event, fresh: true }
    }

    /// History reads so far (head reads included).
    pub fn history_reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// The limits of the history reads so far, in order.
    pub fn read_limits(&self) -> Vec<u32> {
        self.limits.lock().expect("limits lock").clone()
    }

    /// From now on history never returns `seqs`, as if they could not be read.
    pub fn lose(&self, seqs: impl IntoIterator<Item = u64>) {
        self.lost.lock().expect("lost lock").extend(seqs);
    }

    /// From now on a history read after a seq below `seq` answers that it has expired.
    pub fn expire_below(&self, seq: u64) {
        self.expired_below.store(seq, Ordering::Relaxed);
    }

    fn messages(&self, room: &RoomId) -> Vec<MessageEvent> {
        self.rooms
            .lock()
            .expect("log lock")
            .get(room)
            .cloned()
            .unwrap_or_default()
    }
}

#[async_trait::async_trait]
impl MessageLog for MemoryLog {
    async fn append(&self, room: &RoomId, request: &SendRequest) -> Result<SendResponse, LogError> {
        let Appended { event, .. } = self.append_event(room, request);
        Ok(SendResponse {
            seq: event.seq,
            ts: event.ts,
        })
    }

    async fn history(
        &self,
        room: &RoomId,
        after: Seq,
        limit: u32,
    ) -> Result<HistoryPage, LogError> {
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("the gate stays open").forget();
        }
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.limits.lock().expect("limits lock").push(limit);
        if limit > 0 && after.0 + 1 < self.expired_below.load(Ordering::Relaxed) {
            return Err(LogError::Expired {
                message: "gone".into(),
            });
        }
        let log = self.messages(room);
        let lost = self.lost.lock().expect("lost lock").clone();
        Ok(HistoryPage {
            head: Seq(log.len() as u64),
            messages: log
                .into_iter()
                .filter(|m| m.seq > after && !lost.contains(&m.seq.0))
                .take(limit as usize)
                .collect(),
        })
    }

    async fn scrollback(
        &self,
        room: &RoomId,
        before: Option<Seq>,
        limit: u32,
    ) -> Result<HistoryPage, LogError> {
        let log = self.messages(room);
        let head = Seq(log.len() as u64);
        let below: Vec<MessageEvent> = log
            .into_iter()
            .filter(|m| before.is_none_or(|b| m.seq < b))
            .collect();
        let skip = below.len().saturating_sub(limit as usize);
        Ok(HistoryPage {
            head,
            messages: below.into_iter().skip(skip).collect(),
        })
    }
}
