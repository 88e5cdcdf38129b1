//! Joining a room. A join with `since` registers the member first (live messages are buffered
//! for it), then replays history from the writer page by page, then sends `joined` and the
//! buffered messages above the replay, then switches the member to live: no gap and no duplicate
//! at the switch (the module docs of [`crate::hub`] say why). Joins are cancel-safe
//! ([`JoinGuard`]).

use std::sync::{Arc, Mutex};

use chorus_protocol::{RoomId, Seq, ServerFrame, close};

use super::Hub;
use super::fanout::{fan_out, message_frame, send_or_kick};
use super::members::{ConnId, JoinBuffer, Member, MemberHandle};
use super::outbox::{Frame, PushError};
use super::rooms::{CloseIfEmpty, Room, lock};
use crate::writer_client::LogError;

/// Why a join failed. The member is not in the room afterwards, whatever the error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JoinError {
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
    pub(crate) async fn join(
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
                Err(LogError::Expired { .. }) => return Err(expired(None)),
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
}

fn joined(room: &RoomId, seq: Seq) -> Frame {
    ServerFrame::Joined {
        room: room.clone(),
        seq,
    }
    .to_json()
    .into()
}
