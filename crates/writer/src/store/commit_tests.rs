//! The group commit on the in-memory table: how items tile the seq space, what two writers do
//! when they race, the dedupe window at its edges, the size bound, retention and cancellation.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chorus_protocol::{Body, ClientMsgId, RoomId, Seq, UserId};

use super::*;
use crate::store::item::{encode_batch, item_bytes};
use crate::store::{ManualClock, MemoryTable, PutFault};

type Writer = GroupCommitStore<Arc<MemoryTable>>;

/// 2026-11-30, in ms.
const T0: u64 = 1_796_000_000_000;

struct Setup {
    table: Arc<MemoryTable>,
    clock: Arc<ManualClock>,
}

impl Setup {
    fn new() -> Self {
        Setup {
            table: Arc::new(MemoryTable::default()),
            clock: ManualClock::at(T0),
        }
    }

    fn writer(&self, settings: Settings) -> Writer {
        GroupCommitStore::with_clock(Arc::clone(&self.table), settings, self.clock.clone())
    }

    /// (first, last) of every item of `room`, in key order.
    fn items(&self, room: &RoomId) -> Vec<(u64, u64)> {
        self.table
            .items(room)
            .iter()
            .map(|i| (i.seq.0, i.last.0))
            .collect()
    }

    /// Asserts the items of `room` tile 1..=`head` with no gap and no overlap.
    fn assert_tiles(&self, room: &RoomId, head: u64) {
        let items = self.items(room);
        let mut next = 1;
        for (first, last) in &items {
            assert_eq!(*first, next, "items {items:?} do not tile");
            next = last + 1;
        }
        assert_eq!(next, head + 1, "items {items:?} do not end at {head}");
    }
}

fn room(name: &str) -> RoomId {
    RoomId::parse(name).unwrap()
}

fn message(room_name: &str, id: &str, body: &str) -> NewMessage {
    NewMessage {
        room: room(room_name),
        id: ClientMsgId::parse(id).unwrap(),
        sender: UserId::parse("john").unwrap(),
        body: Body::parse(body).unwrap(),
    }
}

async fn send(store: &Writer, room_name: &str, id: &str) -> Appended {
    store.append(message(room_name, id, "hi")).await.unwrap()
}

/// Lets spawned tasks run until `done` holds; fails if they stop making progress.
async fn until(mut done: impl FnMut() -> bool, what: &str) {
    for _ in 0..100_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("gave up waiting for {what}");
}

fn window(duration: Duration, messages: usize) -> Settings {
    Settings {
        dedupe_window: duration,
        dedupe_window_messages: messages,
        ..Settings::default()
    }
}

#[tokio::test]
async fn sends_that_arrive_during_a_write_are_committed_together_by_the_next_one() {
    let setup = Setup::new();
    let store = setup.writer(Settings::default());
    let lobby = room("lobby");
    setup.table.hold_puts();
    let first = tokio::spawn({
        let store = store.clone();
        async move { send(&store, "lobby", "m0").await }
    });
    setup.table.puts_held(1).await;
    let rest: Vec<_> = (1..=20)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { send(&store, "lobby", &format!("m{i}")).await })
        })
        .collect();
    until(|| store.queued(&lobby) == 20, "20 queued sends").await;
    setup.table.release_puts(2);

    assert_eq!(first.await.unwrap().seq, Seq(1));
    for (i, send) in rest.into_iter().enumerate() {
        let appended = send.await.unwrap();
        assert_eq!(
            appended.seq,
            Seq(i as u64 + 2),
            "queued sends keep their arrival order"
        );
        assert!(!appended.duplicate);
    }
    assert_eq!(setup.items(&lobby), [(1, 1), (2, 21)]);
    assert_eq!(
        setup.table.puts(),
        2,
        "one write for the first send, one for the 20 others"
    );
    let usage = store.usage();
    assert_eq!((usage.items_written, usage.messages_written), (2, 21));
}

#[tokio::test]
async fn a_writer_that_loses_the_race_catches_up_and_commits_after_the_winner() {
    let setup = Setup::new();
    let (a, b) = (
        setup.writer(Settings::default()),
        setup.writer(Settings::default()),
    );
    assert_eq!(send(&a, "lobby", "a1").await.seq, Seq(1));
    // B reads the room on first use and writes after A's item.
    assert_eq!(send(&b, "lobby", "b1").await.seq, Seq(2));
    // A still believes 2 is next: it loses the condition, reads item 2, and writes at 3.
    let puts = setup.table.puts();
    assert_eq!(send(&a, "lobby", "a2").await.seq, Seq(3));
    assert_eq!(
        setup.table.puts(),
        puts + 2,
        "one lost write, one that took"
    );
    assert_eq!(a.usage().races_lost, 1);
    setup.assert_tiles(&room("lobby"), 3);
    // What A read while catching up is in its window: B's send retried through A is answered
    // with its original seq, and nothing is written.
    let retry = send(&a, "lobby", "b1").await;
    assert_eq!((retry.seq, retry.duplicate), (Seq(2), true));
    assert_eq!(setup.table.puts(), puts + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_racing_on_fresh_rooms_give_dense_seqs_and_store_each_id_once() {
    let setup = Setup::new();
    let writers = [
        setup.writer(Settings::default()),
        setup.writer(Settings::default()),
    ];
    let mut tasks = Vec::new();
    for r in 0..3 {
        for i in 0..120 {
            let writer = writers[i % 2].clone();
            let other = writers[(i + 1) % 2].clone();
            tasks.push(tokio::spawn(async move {
                let name = format!("room-{r}");
                let id = format!("m{i}");
                let first = send(&writer, &name, &id).await;
                // Every third send is retried through the other writer after its ack.
                if i % 3 == 0 {
                    let again = send(&other, &name, &id).await;
                    assert_eq!(
                        (again.seq, again.duplicate),
                        (first.seq, true),
                        "{name}/{id}"
                    );
                }
                (name, first.seq.0)
            }));
        }
    }
    let mut seqs: Vec<(String, u64)> = Vec::new();
    for task in tasks {
        seqs.push(task.await.unwrap());
    }
    for r in 0..3 {
        let name = format!("room-{r}");
        let mut mine: Vec<u64> = seqs
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, s)| *s)
            .collect();
        mine.sort_unstable();
        assert_eq!(mine, (1..=120).collect::<Vec<_>>(), "{name}");
        setup.assert_tiles(&room(&name), 120);
        let ids: HashSet<String> = setup
            .table
            .items(&room(&name))
            .into_iter()
            .flat_map(|i| i.msgs.into_iter().map(|m| m.id.to_string()))
            .collect();
        assert_eq!(ids.len(), 120, "each id stored once");
    }
}

#[tokio::test]
async fn the_window_holds_the_last_n_messages_however_old() {
    let setup = Setup::new();
    let store = setup.writer(window(Duration::from_secs(600), 5));
    for i in 0..10 {
        send(&store, "lobby", &format!("m{i}")).await;
    }
    // Everything is older than the window's duration now: only the last 5 are remembered.
    setup.clock.advance(Duration::from_secs(601));
    let kept = send(&store, "lobby", "m5").await;
    assert_eq!((kept.seq, kept.duplicate), (Seq(6), true));
    let forgotten = send(&store, "lobby", "m4").await;
    assert_eq!(
        (forgotten.seq, forgotten.duplicate),
        (Seq(11), false),
        "m4 was the 6th newest"
    );
}

#[tokio::test]
async fn the_window_holds_everything_younger_than_its_duration_to_the_millisecond() {
    let setup = Setup::new();
    let store = setup.writer(window(Duration::from_secs(600), 1));
    send(&store, "lobby", "old").await;
    send(&store, "lobby", "new").await;
    setup.clock.advance(Duration::from_millis(599_999));
    let young = send(&store, "lobby", "old").await;
    assert_eq!(
        (young.seq, young.duplicate),
        (Seq(1), true),
        "1 ms inside the window"
    );
    setup.clock.advance(Duration::from_millis(1));
    let expired = send(&store, "lobby", "old").await;
    assert_eq!(
        (expired.seq, expired.duplicate),
        (Seq(3), false),
        "at the edge it is a new send"
    );
}

#[tokio::test]
async fn a_writer_that_starts_later_rebuilds_the_window_from_the_table() {
    let setup = Setup::new();
    let settings = window(Duration::from_secs(600), 5);
    let first = setup.writer(settings);
    for i in 0..10 {
        send(&first, "lobby", &format!("m{i}")).await;
        setup.clock.advance(Duration::from_secs(1));
    }
    // A young message beyond the last 5 is remembered by time.
    let restarted = setup.writer(settings);
    let young = send(&restarted, "lobby", "m0").await;
    assert_eq!((young.seq, young.duplicate), (Seq(1), true));
    // Ten minutes on, a third writer remembers exactly the last 5 (m5..m9 and none before).
    setup.clock.advance(Duration::from_secs(600));
    let later = setup.writer(settings);
    assert_eq!(send(&later, "lobby", "m5").await.seq, Seq(6));
    let forgotten = send(&later, "lobby", "m4").await;
    assert_eq!((forgotten.seq, forgotten.duplicate), (Seq(11), false));
}

#[tokio::test]
async fn idle_rooms_leave_memory_and_come_back_from_the_table() {
    let setup = Setup::new();
    let settings = Settings {
        dedupe_memory_entries: 30,
        ..window(Duration::from_secs(600), 10)
    };
    let store = setup.writer(settings);
    for r in 0..5 {
        for i in 0..10 {
            send(&store, &format!("room-{r}"), &format!("m{i}")).await;
        }
        setup.clock.advance(Duration::from_millis(1));
    }
    // Over the memory budget: the least recently used idle rooms go at the next sweep (before
    // the send that runs it adds its own entry).
    setup.clock.advance(Duration::from_secs(1));
    send(&store, "room-4", "m10").await;
    assert_eq!(store.memory(), (3, 31), "rooms 0 and 1 left");
    // A dropped room still answers retries: its window is read back from the table.
    let retry = send(&store, "room-0", "m3").await;
    assert_eq!((retry.seq, retry.duplicate), (Seq(4), true));
    // Idle for a whole window: every other room goes.
    setup.clock.advance(Duration::from_secs(600));
    send(&store, "room-9", "x").await;
    assert_eq!(store.memory().0, 1);
}

#[tokio::test]
async fn items_stay_under_the_size_and_count_bounds() {
    let setup = Setup::new();
    let store = setup.writer(Settings::default());
    setup.table.hold_puts();
    let big = "é".repeat(Body::MAX_BYTES / 2);
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (store, big) = (store.clone(), big.clone());
        tasks.push(tokio::spawn(async move {
            store
                .append(message("big", &format!("b{i}"), &big))
                .await
                .unwrap()
        }));
    }
    for i in 0..1200 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            send(&store, "small", &format!("s{i}")).await
        }));
    }
    until(
        || store.waiting(&room("big")) == 40 && store.waiting(&room("small")) == 1200,
        "every send queued",
    )
    .await;
    setup.table.open_puts();
    for task in tasks {
        task.await.unwrap();
    }
    for (name, count) in [("big", 40), ("small", 1200)] {
        let items = setup.table.items(&room(name));
        for item in &items {
            let bytes = item_bytes(&encode_batch(item).unwrap());
            assert!(bytes <= MAX_ITEM_BYTES, "{name}: item of {bytes} bytes");
            assert!(item.msgs.len() <= MAX_ITEM_MESSAGES);
        }
        setup.assert_tiles(&room(name), count);
        assert!(
            items.len() < count as usize / 2,
            "{name}: {} items for {count} sends",
            items.len()
        );
    }
    // 16 KiB bodies: three fit under 64 KiB, four do not.
    assert_eq!(setup.table.items(&room("big"))[1].msgs.len(), 3);
    assert_eq!(
        setup.table.items(&room("small"))[1].msgs.len(),
        MAX_ITEM_MESSAGES
    );
}

/// Room "lobby" with items [1,1] [2,5] and, half an hour later, [6,6] [7,7] (m1..m7), kept for
/// an hour: the first two items expire first.
async fn lobby_of_seven_messages() -> (Setup, Writer, RoomId) {
    let setup = Setup::new();
    let settings = Settings {
        retention: Duration::from_secs(3600),
        dedupe_window: Duration::from_secs(60),
        ..Settings::default()
    };
    let store = setup.writer(settings);
    let lobby = room("lobby");
    setup.table.hold_puts();
    let mut tasks = Vec::new();
    for i in 1..=5 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            send(&store, "lobby", &format!("m{i}")).await
        }));
        if i == 1 {
            setup.table.puts_held(1).await;
        }
    }
    until(|| store.queued(&lobby) == 4, "4 queued").await;
    setup.table.open_puts();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(setup.items(&lobby), [(1, 1), (2, 5)]);
    setup.clock.advance(Duration::from_secs(1800));
    send(&store, "lobby", "m6").await;
    send(&store, "lobby", "m7").await;
    assert_eq!(setup.items(&lobby), [(1, 1), (2, 5), (6, 6), (7, 7)]);
    (setup, store, lobby)
}

#[tokio::test]
async fn history_reads_across_items_and_expired_history_is_refused_with_the_oldest_seq() {
    let (setup, store, lobby) = lobby_of_seven_messages().await;

    let seqs = |page: &HistoryPage| page.messages.iter().map(|m| m.seq.0).collect::<Vec<_>>();
    // A page can start inside an item and end inside another.
    let page = store.history(&lobby, Seq(2), 3).await.unwrap();
    assert_eq!((page.head, seqs(&page)), (Seq(7), vec![3, 4, 5]));
    assert_eq!(page.messages[0].id.as_str(), "m3");
    let page = store.history(&lobby, Seq(0), 0).await.unwrap();
    assert_eq!(
        (page.head, seqs(&page)),
        (Seq(7), vec![]),
        "limit 0 reads the head only"
    );
    let page = store.history(&lobby, Seq(7), 10).await.unwrap();
    assert!(page.messages.is_empty());

    // An hour after the first two items: they have expired (still in the table: DynamoDB deletes
    // lazily), the last two have not.
    setup.clock.advance(Duration::from_secs(1801));
    for deleted in [false, true] {
        if deleted {
            setup.table.delete_expired(setup.clock.now_ms());
        }
        let err = store.history(&lobby, Seq(0), 10).await.unwrap_err();
        assert!(
            matches!(err, StoreError::HistoryExpired { oldest: Seq(6), .. }),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("the oldest stored seq of room lobby is 6"),
            "{err}"
        );
        let err = store.history(&lobby, Seq(3), 10).await.unwrap_err();
        assert!(matches!(
            err,
            StoreError::HistoryExpired { oldest: Seq(6), .. }
        ));
        let page = store.history(&lobby, Seq(5), 10).await.unwrap();
        assert_eq!((page.head, seqs(&page)), (Seq(7), vec![6, 7]));
    }
}

#[tokio::test]
async fn scrollback_pages_backwards_across_items_and_stops_where_retention_removed_messages() {
    let (setup, store, lobby) = lobby_of_seven_messages().await;

    let seqs = |page: &HistoryPage| page.messages.iter().map(|m| m.seq.0).collect::<Vec<_>>();
    let page = |before: Option<u64>, limit: u32| {
        let store = store.clone();
        let lobby = lobby.clone();
        async move {
            let page = store
                .history_before(&lobby, before.map(Seq), limit)
                .await
                .unwrap();
            (page.head.0, seqs(&page))
        }
    };
    assert_eq!(
        page(None, 3).await,
        (7, vec![5, 6, 7]),
        "the newest, oldest first"
    );
    assert_eq!(page(Some(5), 3).await, (7, vec![2, 3, 4]), "inside an item");
    assert_eq!(page(Some(3), 10).await, (7, vec![1, 2]), "down to seq 1");
    assert_eq!(page(Some(1), 10).await, (7, vec![]), "nothing before seq 1");
    assert_eq!(
        page(Some(100), 2).await,
        (7, vec![6, 7]),
        "before past the head"
    );
    assert_eq!(page(None, 0).await, (7, vec![]), "limit 0 reads the head");
    let all = store.history_before(&lobby, None, 10).await.unwrap();
    let ids: Vec<&str> = all.messages.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["m1", "m2", "m3", "m4", "m5", "m6", "m7"]);
    assert_eq!(
        store
            .history_before(&room("empty"), None, 10)
            .await
            .unwrap()
            .messages
            .len(),
        0
    );

    // The first two items expire: scrollback ends at 6, with no error, whether DynamoDB has
    // deleted them yet or not.
    setup.clock.advance(Duration::from_secs(1801));
    for deleted in [false, true] {
        if deleted {
            setup.table.delete_expired(setup.clock.now_ms());
        }
        assert_eq!(page(None, 10).await, (7, vec![6, 7]));
        assert_eq!(page(Some(6), 10).await, (7, vec![]));
        assert_eq!(page(Some(4), 10).await, (7, vec![]));
    }
}

#[tokio::test]
async fn a_room_whose_every_item_expired_continues_above_every_seq_it_may_have_used() {
    let setup = Setup::new();
    let settings = Settings {
        retention: Duration::from_secs(3600),
        dedupe_window: Duration::from_secs(60),
        ..Settings::default()
    };
    let lobby = room("lobby");
    let store = setup.writer(settings);
    for i in 1..=5 {
        send(&store, "lobby", &format!("m{i}")).await;
    }
    setup.clock.advance(Duration::from_secs(3601));
    setup.table.delete_expired(setup.clock.now_ms());
    assert!(setup.table.items(&lobby).is_empty());
    // The marker, which never expires, says which seqs may have been used.
    let reserved = setup.table.marker_of(&lobby).unwrap().reserved;
    assert!(reserved >= 5);
    let later = setup.writer(settings);
    let page = later.history(&lobby, Seq(0), 0).await.unwrap();
    assert_eq!(page.head, Seq(reserved));
    let err = later.history(&lobby, Seq(5), 10).await.unwrap_err();
    assert!(
        matches!(err, StoreError::HistoryExpired { oldest, .. } if oldest == Seq(reserved + 1))
    );
    let resumed = send(&later, "lobby", "m1").await;
    assert_eq!((resumed.seq, resumed.duplicate), (Seq(reserved + 1), false));
    assert_eq!(send(&later, "lobby", "m2").await.seq, Seq(reserved + 2));
    assert!(setup.table.marker_of(&lobby).unwrap().reserved > reserved);
}

#[tokio::test]
async fn a_marker_raised_just_now_without_items_does_not_move_a_fresh_room() {
    let setup = Setup::new();
    let lobby = room("lobby");
    // A writer raised the marker of a new room and died before its first item.
    let marker = Marker {
        reserved: 1 + RESERVE_STEP,
        floor: 1,
        at_ms: T0,
    };
    setup.table.put_marker(&lobby, &marker, None).await.unwrap();
    let store = setup.writer(Settings::default());
    assert_eq!(store.history(&lobby, Seq(0), 0).await.unwrap().head, Seq(0));
    assert_eq!(send(&store, "lobby", "m1").await.seq, Seq(1));
}

#[tokio::test]
async fn a_send_whose_request_is_dropped_is_still_committed_with_its_batch() {
    let setup = Setup::new();
    let store = setup.writer(Settings::default());
    let lobby = room("lobby");
    setup.table.hold_puts();
    let in_flight = tokio::spawn({
        let store = store.clone();
        async move { send(&store, "lobby", "flying").await }
    });
    setup.table.puts_held(1).await;
    let queued = tokio::spawn({
        let store = store.clone();
        async move { send(&store, "lobby", "queued").await }
    });
    let kept = tokio::spawn({
        let store = store.clone();
        async move { send(&store, "lobby", "kept").await }
    });
    until(|| store.queued(&lobby) == 2, "2 queued").await;
    // Both clients give up: one while its send is being written, one while it waits.
    in_flight.abort();
    queued.abort();
    setup.table.release_puts(2);
    assert_eq!(kept.await.unwrap().seq, Seq(3));
    setup.assert_tiles(&lobby, 3);
    for (id, seq) in [("flying", 1), ("queued", 2)] {
        let retry = send(&store, "lobby", id).await;
        assert_eq!((retry.seq, retry.duplicate), (Seq(seq), true), "{id}");
    }
}

#[tokio::test]
async fn a_write_whose_outcome_is_unknown_is_answered_by_its_retry() {
    let setup = Setup::new();
    let store = setup.writer(Settings::default());
    let lobby = room("lobby");
    setup.table.fail_puts(&[PutFault::WriteThenFail]);
    let err = store
        .append(message("lobby", "m1", "hi"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unexpected(_)), "{err:?}");
    // The item was written: the retry loses the condition, reads it and answers from it.
    let retry = send(&store, "lobby", "m1").await;
    assert_eq!((retry.seq, retry.duplicate), (Seq(1), true));
    // A write that failed for sure leaves no hole: the next send takes the same seq.
    setup.table.fail_puts(&[PutFault::Fail]);
    assert!(store.append(message("lobby", "m2", "hi")).await.is_err());
    assert_eq!(send(&store, "lobby", "m3").await.seq, Seq(2));
    setup.assert_tiles(&lobby, 2);
}

#[tokio::test]
async fn a_retry_that_arrives_while_its_original_waits_shares_its_answer() {
    let setup = Setup::new();
    let store = setup.writer(Settings::default());
    let lobby = room("lobby");
    setup.table.hold_puts();
    let first = tokio::spawn({
        let store = store.clone();
        async move { send(&store, "lobby", "m0").await }
    });
    setup.table.puts_held(1).await;
    let twice: Vec<_> = (0..2)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { send(&store, "lobby", "m1").await })
        })
        .collect();
    until(
        || store.queued(&lobby) == 1,
        "one queued send for two requests",
    )
    .await;
    setup.table.release_puts(2);
    first.await.unwrap();
    for request in twice {
        assert_eq!(request.await.unwrap().seq, Seq(2));
    }
    setup.assert_tiles(&lobby, 2);
}
