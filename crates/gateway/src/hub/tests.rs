use std::sync::Arc;
use std::time::Duration;

use chorus_protocol::{RoomId, Seq, ServerFrame, close};

use super::fanout::message_frame;
use super::outbox::{Next, Outbound, OutboxReceiver};
use super::*;
use crate::test_support::{MemoryLog, stored_message};

fn hub(log: Arc<MemoryLog>) -> Hub {
    Hub::new(log, HubSettings::default(), Arc::default())
}

fn member(queue: usize) -> (MemberHandle, OutboxReceiver) {
    let (outbox, rx) = super::outbox::outbox(queue, 1 << 20);
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
    let log = Arc::new(MemoryLog::default());
    let hub = hub(Arc::clone(&log));
    let (m, mut rx) = member(64);
    assert_eq!(hub.join(&m, &lobby(), None).await.unwrap(), Seq(0));
    let stored = log.fill(&lobby(), 4);
    for seq in [2, 1, 1, 4, 2, 3, 4] {
        hub.ingest(&stored[seq - 1]);
    }
    let frames = drain(&mut rx);
    assert!(matches!(frames[0], ServerFrame::Joined { seq: Seq(0), .. }));
    assert_eq!(seqs(&frames), [1, 2, 3, 4]);
}

#[tokio::test(start_paused = true)]
async fn a_hole_that_does_not_fill_is_fetched_from_history_after_the_gap_timeout() {
    let log = Arc::new(MemoryLog::default());
    let hub = hub(Arc::clone(&log));
    let (m, mut rx) = member(64);
    hub.join(&m, &lobby(), None).await.unwrap();
    let stored = log.fill(&lobby(), 5);
    hub.ingest(&stored[0]);
    hub.ingest(&stored[3]); // 2 and 3 lost
    hub.ingest(&stored[4]);
    assert_eq!(seqs(&drain(&mut rx)), [1]);
    tokio::time::sleep(HubSettings::default().gap_timeout * 2).await;
    assert_eq!(seqs(&drain(&mut rx)), [2, 3, 4, 5]);
}

#[tokio::test(start_paused = true)]
async fn a_lost_last_message_is_found_once_the_room_goes_quiet() {
    let log = Arc::new(MemoryLog::default());
    let hub = hub(Arc::clone(&log));
    let (m, mut rx) = member(64);
    hub.join(&m, &lobby(), None).await.unwrap();
    let stored = log.fill(&lobby(), 3);
    hub.ingest(&stored[0]);
    hub.ingest(&stored[1]); // 3 is lost and nothing follows it
    tokio::time::sleep(HubSettings::default().tail_check * 2).await;
    assert_eq!(seqs(&drain(&mut rx)), [1, 2, 3]);
}

#[tokio::test(start_paused = true)]
async fn a_lost_message_in_a_quiet_room_is_found_with_no_later_arrival() {
    let log = Arc::new(MemoryLog::default());
    let hub = hub(Arc::clone(&log));
    let (m, mut rx) = member(64);
    hub.join(&m, &lobby(), None).await.unwrap();
    // Long after the last traffic, one message whose notification never comes.
    tokio::time::sleep(Duration::from_secs(600)).await;
    log.fill(&lobby(), 1);
    let settings = HubSettings::default();
    tokio::time::sleep(settings.tail_check_max + settings.gap_timeout).await;
    assert_eq!(seqs(&drain(&mut rx)), [1]);
}

#[tokio::test(start_paused = true)]
async fn a_quiet_room_is_checked_less_and_less_often() {
    let log = Arc::new(MemoryLog::default());
    let hub = hub(Arc::clone(&log));
    let (m, _rx) = member(64);
    hub.join(&m, &lobby(), None).await.unwrap();
    let settings = HubSettings::default();
    let reads = log.history_reads();
    let quiet = settings.tail_check_max * 10;
    tokio::time::sleep(quiet).await;
    let checks = log.history_reads() - reads;
    // At the base interval it would be 150; backing off to the ceiling, about 14.
    assert!(
        (10..=20).contains(&checks),
        "{checks} head reads in {quiet:?} of silence"
    );
}

#[tokio::test(start_paused = true)]
async fn join_with_since_replays_then_switches_to_live_without_gap_or_duplicate() {
    let log = Arc::new(MemoryLog::default());
    let hub = hub(Arc::clone(&log));
    // Someone already follows the room live.
    let (early, mut early_rx) = member(64);
    hub.join(&early, &lobby(), None).await.unwrap();
    let stored = log.fill(&lobby(), 6);
    for e in &stored[..5] {
        hub.ingest(e);
    }
    let (late, mut late_rx) = member(64);
    assert_eq!(
        hub.join(&late, &lobby(), Some(Seq(2))).await.unwrap(),
        Seq(6)
    );
    // 5 again (an SNS duplicate) and 6 (already in the replay) and 7 live.
    let stored = log.fill(&lobby(), 7);
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
    let log = Arc::new(MemoryLog::default());
    log.fill(&lobby(), 3);
    let hub = hub(Arc::clone(&log));
    let (m, mut rx) = member(64);
    assert_eq!(hub.join(&m, &lobby(), Some(Seq(99))).await.unwrap(), Seq(3));
    let stored = log.fill(&lobby(), 4);
    hub.ingest(&stored[3]);
    assert_eq!(seqs(&drain(&mut rx)), [4]);
}

#[tokio::test(start_paused = true)]
async fn a_member_whose_queue_overflows_is_kicked_and_gets_nothing_after_the_overflow() {
    let log = Arc::new(MemoryLog::default());
    let hub = hub(Arc::clone(&log));
    let (slow, mut slow_rx) = member(2);
    let (fast, mut fast_rx) = member(64);
    hub.join(&slow, &lobby(), None).await.unwrap(); // joined fills one slot
    hub.join(&fast, &lobby(), None).await.unwrap();
    let stored = log.fill(&lobby(), 3);
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
    let log = Arc::new(MemoryLog::default());
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
    let log = Arc::new(MemoryLog::gated());
    log.fill(&lobby(), 5);
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
    let reads = log.history_reads();
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(log.history_reads(), reads);
}

#[tokio::test(start_paused = true)]
async fn a_join_dropped_during_the_head_read_leaves_no_room() {
    let log = Arc::new(MemoryLog::gated());
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
    let log = Arc::new(MemoryLog::gated());
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
    let stored = log.fill(&lobby(), 1);
    hub.ingest(&stored[0]);
    assert_eq!(seqs(&drain(&mut rx_b)), [1]);
}

#[tokio::test(start_paused = true)]
async fn a_replay_stays_within_the_byte_bound_and_a_client_that_does_not_read_is_closed() {
    let log = Arc::new(MemoryLog::default());
    log.fill(&lobby(), 200);
    let settings = HubSettings {
        replay_page: 20,
        ..HubSettings::default()
    };
    let hub = Hub::new(log.clone(), settings.clone(), Arc::default());
    let frame_len = message_frame(&stored_message(&lobby(), 1, "message 1"))
        .frame
        .len();
    let (outbox, mut rx) = super::outbox::outbox(1000, frame_len * 5);
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
        log.read_limits().iter().all(|&l| l <= 20),
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
    let log = Arc::new(MemoryLog::gated());
    let stored = log.fill(&lobby(), 10);
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
    let more = log.fill(&lobby(), 12);
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
    let log = Arc::new(MemoryLog::default());
    log.fill(&lobby(), 10);
    log.lose(1..=4); // expired
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
    log.expire_below(5);
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
    let log = Arc::new(MemoryLog::default());
    let hub = hub(Arc::clone(&log));
    let (m, mut rx) = member(64);
    hub.join(&m, &lobby(), None).await.unwrap();
    let stored = log.fill(&lobby(), 3);
    log.lose([2]);
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
    let log = Arc::new(MemoryLog::gated());
    log.fill(&lobby(), 3);
    let hub = hub(Arc::clone(&log));
    let (m, mut rx) = member(64);
    log.open_gate(2); // the head read and the first replay read
    let join = tokio::spawn({
        let (hub, m) = (hub.clone(), m.clone());
        async move { hub.join(&m, &lobby(), Some(Seq(99))).await }
    });
    while log.history_reads() < 2 {
        tokio::task::yield_now().await;
    }
    // 4 is stored and delivered live before the replay reads again.
    let stored = log.fill(&lobby(), 4);
    hub.ingest(&stored[3]);
    log.open_gate(1000);
    assert_eq!(join.await.unwrap().unwrap(), Seq(4));
    assert_eq!(seqs(&drain(&mut rx)), [4]);
}
