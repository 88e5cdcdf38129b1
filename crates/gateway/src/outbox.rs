//! A connection's outbound queue, bounded by frames and by bytes.
//!
//! Two producers share it: the hub's fan-out, which never waits ([`Outbox::try_push`]: a full
//! queue means the connection is too slow and gets closed), and the connection's own reader,
//! which answers the client's requests and may wait for room ([`Outbox::push`]: only that
//! connection waits). One consumer, the connection's writer task, drains it into the socket.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;

/// A frame serialized once and shared by every member it goes to.
pub type Frame = Utf8Bytes;

/// What the writer task sends.
#[derive(Debug)]
pub enum Outbound {
    Text(Frame),
    /// A heartbeat: a WebSocket ping.
    Ping,
}

/// The producer side; cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Outbound>,
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

/// The writer's side.
#[derive(Debug)]
pub struct OutboxReceiver {
    rx: mpsc::Receiver<Outbound>,
    bytes: Arc<AtomicUsize>,
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The frame or byte bound would be passed: the consumer is too slow.
    Full,
    /// The connection is gone.
    Closed,
}

/// A queue of at most `frames` frames and `max_bytes` bytes of frames.
pub fn outbox(frames: usize, max_bytes: usize) -> (Outbox, OutboxReceiver) {
    let (tx, rx) = mpsc::channel(frames);
    let bytes = Arc::new(AtomicUsize::new(0));
    (
        Outbox {
            tx,
            bytes: Arc::clone(&bytes),
            max_bytes,
        },
        OutboxReceiver { rx, bytes },
    )
}

impl Outbox {
    /// Queues `frame` without waiting.
    ///
    /// # Errors
    /// [`PushError::Full`] if either bound would be passed, [`PushError::Closed`] if the
    /// connection is gone.
    pub fn try_push(&self, frame: Frame) -> Result<(), PushError> {
        let len = frame.len();
        let queued = self.bytes.fetch_add(len, Ordering::AcqRel);
        if queued + len > self.max_bytes && queued > 0 {
            self.bytes.fetch_sub(len, Ordering::AcqRel);
            return Err(PushError::Full);
        }
        self.tx.try_send(Outbound::Text(frame)).map_err(|e| {
            self.bytes.fetch_sub(len, Ordering::AcqRel);
            match e {
                mpsc::error::TrySendError::Full(_) => PushError::Full,
                mpsc::error::TrySendError::Closed(_) => PushError::Closed,
            }
        })
    }

    /// Queues `frame`, waiting while the queue holds as many frames as it may. The byte bound
    /// is counted but not enforced: this is for answers to the client's own requests (and
    /// replays), which the client paces by reading.
    ///
    /// # Errors
    /// [`PushError::Closed`] if the connection is gone.
    pub async fn push(&self, frame: Frame) -> Result<(), PushError> {
        let len = frame.len();
        self.bytes.fetch_add(len, Ordering::AcqRel);
        self.tx.send(Outbound::Text(frame)).await.map_err(|_| {
            self.bytes.fetch_sub(len, Ordering::AcqRel);
            PushError::Closed
        })
    }

    /// Queues a heartbeat ping unless the queue is full (a full queue is not idle).
    pub fn ping(&self) {
        let _ = self.tx.try_send(Outbound::Ping);
    }
}

impl OutboxReceiver {
    /// The next item, waiting for one; `None` once every [`Outbox`] is dropped.
    pub async fn recv(&mut self) -> Option<Outbound> {
        let item = self.rx.recv().await;
        self.taken(item.as_ref());
        item
    }

    /// The next item if one is queued.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        let item = self.rx.try_recv().ok();
        self.taken(item.as_ref());
        item
    }

    fn taken(&self, item: Option<&Outbound>) {
        if let Some(Outbound::Text(frame)) = item {
            self.bytes.fetch_sub(frame.len(), Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Frame {
        "x".repeat(n).into()
    }

    #[test]
    fn the_frame_bound_holds() {
        let (outbox, mut rx) = outbox(2, 1 << 20);
        outbox.try_push(text(1)).unwrap();
        outbox.try_push(text(1)).unwrap();
        assert_eq!(outbox.try_push(text(1)), Err(PushError::Full));
        assert!(matches!(rx.try_recv(), Some(Outbound::Text(_))));
        outbox.try_push(text(1)).unwrap();
    }

    #[test]
    fn the_byte_bound_holds_and_frees_as_the_writer_takes() {
        let (outbox, mut rx) = outbox(100, 10);
        outbox.try_push(text(6)).unwrap();
        assert_eq!(outbox.try_push(text(6)), Err(PushError::Full));
        outbox.try_push(text(4)).unwrap();
        assert!(rx.try_recv().is_some());
        outbox.try_push(text(6)).unwrap();
    }

    #[test]
    fn one_frame_larger_than_the_byte_bound_passes_an_empty_queue() {
        // Otherwise a large message could never reach anyone.
        let (outbox, mut rx) = outbox(100, 10);
        outbox.try_push(text(50)).unwrap();
        assert_eq!(outbox.try_push(text(1)), Err(PushError::Full));
        assert!(rx.try_recv().is_some());
        assert!(rx.try_recv().is_none());
        outbox.try_push(text(1)).unwrap();
    }

    #[test]
    fn a_closed_connection_says_so_and_counts_nothing() {
        let (outbox, rx) = outbox(1, 10);
        drop(rx);
        assert_eq!(outbox.try_push(text(5)), Err(PushError::Closed));
        assert_eq!(outbox.bytes.load(Ordering::Acquire), 0);
    }
}
