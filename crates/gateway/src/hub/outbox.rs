//! A connection's outbound queue, bounded by frames and by bytes.
//!
//! Two producers share it: the hub's fan-out, which never waits ([`Outbox::try_push`]: a full
//! queue means the connection is too slow and gets closed), and the connection's own reader,
//! which answers the client's requests and replays history, and waits for room
//! ([`Outbox::push`]: only that connection waits). Both respect both bounds, so a replay into a
//! client that does not read holds at most the byte bound (plus the one page being replayed). One consumer, the connection's writer task, takes everything queued at
//! once ([`OutboxReceiver::next`]) and flushes it in one write.
//!
//! Why not a `tokio::sync::mpsc` channel: fan-out pushes one frame into thousands of queues per
//! message, and the channel's per-item semaphore, block list and waker cost more than a plain
//! uncontended mutex around a `VecDeque` (measured: `./scripts/bench gateway`, BENCHMARKS.md);
//! the channel also allocates a block of 32 slots per connection up front, where an idle
//! connection's `VecDeque` holds a few. Counting bytes under the same lock is then free.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::Notify;

/// A frame serialized once and shared by every member it goes to.
pub(crate) type Frame = Utf8Bytes;

/// A close code and its reason.
pub(crate) type Close = (u16, &'static str);

/// What the writer task sends.
#[derive(Debug)]
pub(crate) enum Outbound {
    Text(Frame),
    /// A heartbeat: a WebSocket ping.
    Ping,
}

/// What the writer is to do next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Send the items moved into the batch, then flush.
    Send,
    /// Send a close frame (whatever is still queued is dropped) and end.
    Close(Close),
    /// Every producer is gone: end.
    Ended,
}

#[derive(Debug)]
struct State {
    queue: VecDeque<Outbound>,
    bytes: usize,
    close: Option<Close>,
    /// The writer, when it waits for something to do.
    writer: Option<Waker>,
    /// A [`Outbox::push`] waits for room: the writer signals `space` when it takes the queue.
    pusher_waiting: bool,
    producers: usize,
    receiver_alive: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Signalled when a full queue is drained, for [`Outbox::push`].
    space: Notify,
    max_frames: usize,
    max_bytes: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("outbox lock poisoned")
    }
}

/// The producer side; cheap to clone.
#[derive(Debug)]
pub(crate) struct Outbox {
    shared: Arc<Shared>,
}

/// The writer's side.
#[derive(Debug)]
pub(crate) struct OutboxReceiver {
    shared: Arc<Shared>,
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PushError {
    /// The frame or byte bound would be passed: the consumer is too slow.
    Full,
    /// The connection is gone.
    Closed,
}

/// A queue of at most `frames` frames and `max_bytes` bytes of frames.
pub(crate) fn outbox(frames: usize, max_bytes: usize) -> (Outbox, OutboxReceiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            bytes: 0,
            close: None,
            writer: None,
            pusher_waiting: false,
            producers: 1,
            receiver_alive: true,
        }),
        space: Notify::new(),
        max_frames: frames.max(1),
        max_bytes,
    });
    (
        Outbox {
            shared: Arc::clone(&shared),
        },
        OutboxReceiver { shared },
    )
}

/// Queues `item`, releases the lock, then wakes the writer if it waits.
fn enqueue(mut state: MutexGuard<'_, State>, item: Outbound) {
    if let Outbound::Text(frame) = &item {
        state.bytes += frame.len();
    }
    state.queue.push_back(item);
    wake_writer(state);
}

/// Releases the lock, then wakes the writer if it waits (not under the lock: the writer's
/// first act is to take it).
fn wake_writer(mut state: MutexGuard<'_, State>) {
    let writer = state.writer.take();
    drop(state);
    if let Some(writer) = writer {
        writer.wake();
    }
}

impl Outbox {
    /// Queues `frame` without waiting.
    ///
    /// # Errors
    /// [`PushError::Full`] if either bound would be passed (a single frame larger than the byte
    /// bound passes an empty queue, or a large message could reach no one),
    /// [`PushError::Closed`] if the connection is gone.
    pub(crate) fn try_push(&self, frame: Frame) -> Result<(), PushError> {
        let state = self.shared.lock();
        if !state.receiver_alive {
            return Err(PushError::Closed);
        }
        let too_many = state.queue.len() >= self.shared.max_frames;
        let too_big = state.bytes > 0 && state.bytes + frame.len() > self.shared.max_bytes;
        if too_many || too_big {
            return Err(PushError::Full);
        }
        enqueue(state, Outbound::Text(frame));
        Ok(())
    }

    /// Queues `frame`, waiting while it would pass either bound (as with [`Self::try_push`], one
    /// frame larger than the byte bound passes an empty queue). This is for answers to the
    /// client's own requests and for replays, which the client paces by reading. Cancel-safe:
    /// dropped while waiting, nothing was queued.
    ///
    /// # Errors
    /// [`PushError::Closed`] if the connection is gone.
    pub(crate) async fn push(&self, frame: Frame) -> Result<(), PushError> {
        loop {
            let space = self.shared.space.notified();
            let mut space = std::pin::pin!(space);
            // Registered before the check, so a drain in between is not missed.
            space.as_mut().enable();
            {
                let mut state = self.shared.lock();
                if !state.receiver_alive {
                    return Err(PushError::Closed);
                }
                let fits_frames = state.queue.len() < self.shared.max_frames;
                let fits_bytes =
                    state.bytes == 0 || state.bytes + frame.len() <= self.shared.max_bytes;
                if fits_frames && fits_bytes {
                    enqueue(state, Outbound::Text(frame));
                    return Ok(());
                }
                state.pusher_waiting = true;
            }
            space.await;
        }
    }

    /// Queues a heartbeat ping unless the queue is full (a full queue is not idle).
    pub(crate) fn ping(&self) {
        let state = self.shared.lock();
        if !state.receiver_alive || state.queue.len() >= self.shared.max_frames {
            return;
        }
        enqueue(state, Outbound::Ping);
    }

    /// Asks the writer to send a close frame next; the first request wins.
    pub(crate) fn close(&self, close: Close) {
        let mut state = self.shared.lock();
        state.close.get_or_insert(close);
        wake_writer(state);
    }
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        self.shared.lock().producers += 1;
        Outbox {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.producers -= 1;
        if state.producers == 0 {
            wake_writer(state);
        }
    }
}

impl OutboxReceiver {
    /// Waits for something to do; with [`Next::Send`], everything queued has been moved into
    /// `batch` (which should be empty on entry).
    pub(crate) async fn next(&mut self, batch: &mut VecDeque<Outbound>) -> Next {
        poll_fn(|cx| {
            let mut state = self.shared.lock();
            if let Some(close) = state.close {
                return Poll::Ready(Next::Close(close));
            }
            if !state.queue.is_empty() {
                let pusher_waiting = std::mem::take(&mut state.pusher_waiting);
                std::mem::swap(&mut state.queue, batch);
                state.bytes = 0;
                drop(state);
                if pusher_waiting {
                    self.shared.space.notify_waiters();
                }
                return Poll::Ready(Next::Send);
            }
            if state.producers == 0 {
                return Poll::Ready(Next::Ended);
            }
            state.writer = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

impl Drop for OutboxReceiver {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.receiver_alive = false;
        state.queue.clear();
        drop(state);
        self.shared.space.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn text(n: usize) -> Frame {
        "x".repeat(n).into()
    }

    fn take(rx: &mut OutboxReceiver) -> Vec<usize> {
        let mut batch = VecDeque::new();
        let next = futures_util::FutureExt::now_or_never(rx.next(&mut batch));
        assert_eq!(next, Some(Next::Send));
        batch
            .into_iter()
            .map(|item| match item {
                Outbound::Text(frame) => frame.len(),
                Outbound::Ping => 0,
            })
            .collect()
    }

    #[test]
    fn the_frame_bound_holds_and_the_writer_takes_everything_at_once() {
        let (outbox, mut rx) = outbox(2, 1 << 20);
        outbox.try_push(text(1)).unwrap();
        outbox.try_push(text(2)).unwrap();
        assert_eq!(outbox.try_push(text(1)), Err(PushError::Full));
        assert_eq!(take(&mut rx), [1, 2]);
        outbox.try_push(text(3)).unwrap();
        assert_eq!(take(&mut rx), [3]);
    }

    #[test]
    fn the_byte_bound_holds_and_frees_as_the_writer_takes() {
        let (outbox, mut rx) = outbox(100, 10);
        outbox.try_push(text(6)).unwrap();
        assert_eq!(outbox.try_push(text(6)), Err(PushError::Full));
        outbox.try_push(text(4)).unwrap();
        assert_eq!(take(&mut rx), [6, 4]);
        outbox.try_push(text(6)).unwrap();
    }

    #[test]
    fn one_frame_larger_than_the_byte_bound_passes_an_empty_queue() {
        // Otherwise a large message could never reach anyone.
        let (outbox, mut rx) = outbox(100, 10);
        outbox.try_push(text(50)).unwrap();
        assert_eq!(outbox.try_push(text(1)), Err(PushError::Full));
        assert_eq!(take(&mut rx), [50]);
        outbox.try_push(text(1)).unwrap();
    }

    #[test]
    fn a_closed_connection_says_so() {
        let (outbox, rx) = outbox(1, 10);
        drop(rx);
        assert_eq!(outbox.try_push(text(5)), Err(PushError::Closed));
    }

    #[test]
    fn a_close_request_comes_before_queued_frames() {
        let (outbox, mut rx) = outbox(8, 1 << 20);
        outbox.try_push(text(1)).unwrap();
        outbox.close((4001, "slow"));
        outbox.close((4000, "later requests lose"));
        let mut batch = VecDeque::new();
        let next = futures_util::FutureExt::now_or_never(rx.next(&mut batch));
        assert_eq!(next, Some(Next::Close((4001, "slow"))));
    }

    #[tokio::test]
    async fn the_writer_ends_when_every_producer_is_gone() {
        let (outbox, mut rx) = outbox(8, 1 << 20);
        let other = outbox.clone();
        drop(outbox);
        let mut batch = VecDeque::new();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), rx.next(&mut batch))
                .await
                .is_err(),
            "one producer is left"
        );
        drop(other);
        assert_eq!(rx.next(&mut batch).await, Next::Ended);
    }

    #[tokio::test]
    async fn a_waiting_push_goes_through_once_the_writer_drains() {
        let (outbox, mut rx) = outbox(1, 1 << 20);
        outbox.try_push(text(1)).unwrap();
        let pusher = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.push(text(2)).await })
        };
        tokio::task::yield_now().await;
        assert!(!pusher.is_finished(), "it waits for room");
        assert_eq!(take(&mut rx), [1]);
        pusher.await.unwrap().unwrap();
        assert_eq!(take(&mut rx), [2]);
    }

    #[tokio::test]
    async fn a_waiting_push_respects_the_byte_bound() {
        let (outbox, mut rx) = outbox(100, 10);
        outbox.try_push(text(6)).unwrap();
        let pusher = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.push(text(6)).await })
        };
        tokio::task::yield_now().await;
        assert!(
            !pusher.is_finished(),
            "6 + 6 bytes would pass the bound of 10"
        );
        assert_eq!(take(&mut rx), [6]);
        pusher.await.unwrap().unwrap();
        assert_eq!(take(&mut rx), [6]);
    }

    #[tokio::test]
    async fn a_cancelled_push_queues_nothing_and_later_pushes_still_wake() {
        let (outbox, mut rx) = outbox(1, 1 << 20);
        outbox.try_push(text(1)).unwrap();
        let cancelled = tokio::time::timeout(Duration::from_millis(10), outbox.push(text(2))).await;
        assert!(cancelled.is_err(), "it waited, then was dropped");
        let pusher = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.push(text(3)).await })
        };
        tokio::task::yield_now().await;
        assert_eq!(take(&mut rx), [1]);
        pusher.await.unwrap().unwrap();
        assert_eq!(take(&mut rx), [3], "the dropped push left nothing behind");
    }

    #[tokio::test]
    async fn the_writer_wakes_for_a_frame() {
        let (outbox, mut rx) = outbox(8, 1 << 20);
        let writer = tokio::spawn(async move {
            let mut batch = VecDeque::new();
            (rx.next(&mut batch).await, batch.len())
        });
        tokio::task::yield_now().await;
        outbox.try_push(text(1)).unwrap();
        assert_eq!(writer.await.unwrap(), (Next::Send, 1));
    }
}
