//! What a [`Session`] does across reconnects, against a scripted gateway: it resumes every room
//! from its position (the latest `joined` seq counts as much as the last message), never
//! replays history it was not asked for, and retries unacked sends with the same id.

mod common;

use std::time::Duration;

use chorus_client::{Backoff, ClientError, Event, Session};
use chorus_protocol::{ClientFrame, ErrorCode, RoomId, Seq, ServerFrame};
use common::{FakeGateway, SendPolicy, WAIT};

fn lobby() -> RoomId {
    RoomId::parse("lobby").unwrap()
}

fn session(fake: &FakeGateway) -> Session {
    let mut session = Session::new(vec![fake.url.clone()], None);
    session.set_backoff(Backoff {
        base: Duration::from_millis(10),
        cap: Duration::from_millis(50),
    });
    session
}

async fn next(session: &mut Session) -> Event {
    tokio::time::timeout(WAIT, session.next_event())
        .await
        .expect("an event within the wait")
        .expect("no fatal close")
}

/// Runs the session until `until` holds for an event; returns every event up to and with it.
async fn events_until(session: &mut Session, until: impl Fn(&Event) -> bool) -> Vec<Event> {
    let mut events = Vec::new();
    loop {
        let event = next(session).await;
        let done = until(&event);
        events.push(event);
        if done {
            return events;
        }
    }
}

fn is_joined(event: &Event) -> bool {
    matches!(event, Event::Frame(ServerFrame::Joined { .. }))
}

fn message_seqs(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Frame(ServerFrame::Message(m)) => Some(m.seq.0),
            _ => None,
        })
        .collect()
}

fn joins(frames: &[(u64, ClientFrame)]) -> Vec<(u64, Option<Seq>)> {
    frames
        .iter()
        .filter_map(|(conn, f)| match f {
            ClientFrame::Join { since, .. } => Some((*conn, *since)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn after_a_reconnect_the_session_resumes_from_the_joined_seq_and_gets_what_it_missed_once() {
    let fake = FakeGateway::start().await;
    fake.post(&lobby(), &["one", "two", "three", "four", "five"]);
    let mut session = session(&fake);
    session.join(lobby(), None);

    // A plain join: no history, the head is the position.
    let first = events_until(&mut session, is_joined).await;
    assert!(message_seqs(&first).is_empty(), "{first:?}");
    assert_eq!(session.position(&lobby()), Some(Seq(5)));

    // The gateway drains; someone posts seq 6 while this client is away.
    fake.close_all_then_post(4000, &lobby(), &["six"]);
    let closed = next(&mut session).await;
    assert!(
        matches!(
            closed,
            Event::Disconnected {
                code: Some(4000),
                ..
            }
        ),
        "{closed:?}"
    );
    let resumed = events_until(&mut session, is_joined).await;
    assert_eq!(message_seqs(&resumed), [6], "{resumed:?}");

    // And live messages follow, once.
    fake.post(&lobby(), &["seven"]);
    let live = events_until(&mut session, |e| {
        !message_seqs(std::slice::from_ref(e)).is_empty()
    })
    .await;
    assert_eq!(message_seqs(&live), [7]);
    assert_eq!(
        joins(&fake.received()),
        [(0, None), (1, Some(Seq(5)))],
        "the second join resumes from the first one's joined seq"
    );
}

#[tokio::test]
async fn a_room_never_joined_is_joined_again_plainly_not_replayed_from_zero() {
    let fake = FakeGateway::start().await;
    fake.post(&lobby(), &["old", "history"]);
    fake.hold_joins(true);
    let mut session = session(&fake);
    session.join(lobby(), None);
    assert!(matches!(next(&mut session).await, Event::Connected { .. }));
    session.flush().await.unwrap();
    fake.wait_received("the first join", |f| joins(f).len() == 1)
        .await;
    // Dropped before the join was answered: nothing was ever seen.
    fake.hold_joins(false);
    fake.drop_all();
    let events = events_until(&mut session, is_joined).await;
    assert!(message_seqs(&events).is_empty(), "{events:?}");
    assert_eq!(joins(&fake.received()), [(0, None), (1, None)]);
}

#[tokio::test]
async fn history_is_replayed_only_when_asked_for_and_only_once() {
    let fake = FakeGateway::start().await;
    fake.post(&lobby(), &["a", "b", "c"]);
    let mut session = session(&fake);
    session.join(lobby(), Some(Seq(1)));
    let events = events_until(&mut session, is_joined).await;
    assert_eq!(message_seqs(&events), [2, 3]);
    fake.drop_all();
    let events = events_until(&mut session, is_joined).await;
    assert!(message_seqs(&events).is_empty(), "{events:?}");
    assert_eq!(
        joins(&fake.received()),
        [(0, Some(Seq(1))), (1, Some(Seq(3)))]
    );
}

#[tokio::test]
async fn a_send_whose_ack_was_lost_is_sent_again_with_the_same_id_and_stored_once() {
    let fake = FakeGateway::start().await;
    let mut session = session(&fake);
    session.join(lobby(), None);
    events_until(&mut session, is_joined).await;

    fake.set_send_policy(SendPolicy::StoreThenDrop);
    let id = session.send(&lobby(), "hello").unwrap();
    let events = events_until(&mut session, |e| {
        matches!(e, Event::Frame(ServerFrame::Ack { .. }))
    })
    .await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Disconnected { code: None, .. })),
        "{events:?}"
    );
    let Some(Event::Frame(ServerFrame::Ack { id: acked, seq, .. })) = events.last() else {
        unreachable!()
    };
    assert_eq!((acked, *seq), (&id, Seq(1)));
    assert_eq!(message_seqs(&events), [1], "the resume replays it once");
    assert_eq!(session.unacked().count(), 0);
    assert_eq!(fake.log(&lobby()).len(), 1, "stored once");
    let sends: Vec<(u64, String)> = fake
        .received()
        .into_iter()
        .filter_map(|(conn, f)| match f {
            ClientFrame::Send { id, .. } => Some((conn, id.to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(sends, [(0, id.to_string()), (1, id.to_string())]);
    // On the new connection the retry goes out after the join.
    let second: Vec<ClientFrame> = fake
        .received()
        .into_iter()
        .filter(|(conn, _)| *conn == 1)
        .map(|(_, f)| f)
        .collect();
    assert!(
        matches!(
            &second[..],
            [
                ClientFrame::Join {
                    since: Some(Seq(0)),
                    ..
                },
                ClientFrame::Send { .. }
            ]
        ),
        "{second:?}"
    );
}

#[tokio::test]
async fn an_unavailable_send_is_retried_with_the_same_id_on_the_same_connection() {
    let fake = FakeGateway::start().await;
    let mut session = session(&fake);
    session.join(lobby(), None);
    events_until(&mut session, is_joined).await;
    fake.set_send_policy(SendPolicy::UnavailableOnce);
    let id = session.send(&lobby(), "hello").unwrap();
    let events = events_until(&mut session, |e| {
        matches!(e, Event::Frame(ServerFrame::Ack { .. }))
    })
    .await;
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::Frame(ServerFrame::Error {
                code: ErrorCode::Unavailable,
                ..
            })
        )),
        "{events:?}"
    );
    assert!(!events.iter().any(|e| matches!(e, Event::Connected { .. })));
    let ids: Vec<String> = fake
        .received()
        .into_iter()
        .filter_map(|(_, f)| match f {
            ClientFrame::Send { id, .. } => Some(id.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(ids, [id.to_string(), id.to_string()]);
}

#[tokio::test]
async fn a_rejoin_on_the_same_connection_waits_for_left_and_replays_nothing_twice() {
    let fake = FakeGateway::start().await;
    let mut session = session(&fake);
    session.join(lobby(), None);
    events_until(&mut session, is_joined).await;
    fake.post(&lobby(), &["1", "2", "3"]);
    // Re-join before the three live messages are read: they are in flight.
    session.join(lobby(), None);
    session.flush().await.unwrap();
    fake.wait_received("the leave", |f| {
        f.iter()
            .any(|(_, f)| matches!(f, ClientFrame::Leave { .. }))
    })
    .await;
    fake.post(&lobby(), &["4"]);
    let events = events_until(&mut session, is_joined).await;
    assert_eq!(message_seqs(&events), [1, 2, 3, 4], "{events:?}");
    let frames: Vec<ClientFrame> = fake.received().into_iter().map(|(_, f)| f).collect();
    assert!(
        matches!(
            &frames[..],
            [
                ClientFrame::Join { since: None, .. },
                ClientFrame::Leave { .. },
                ClientFrame::Join {
                    since: Some(Seq(3)),
                    ..
                }
            ]
        ),
        "{frames:?}"
    );
}

#[tokio::test]
async fn a_close_that_says_do_not_reconnect_ends_the_session() {
    let fake = FakeGateway::start().await;
    let mut session = session(&fake);
    session.join(lobby(), None);
    events_until(&mut session, is_joined).await;
    fake.close_all_then_post(4500, &lobby(), &[]);
    let end = tokio::time::timeout(WAIT, session.next_event())
        .await
        .unwrap();
    assert!(
        matches!(end, Err(ClientError::Closed { code: 4500, .. })),
        "{end:?}"
    );
}

#[tokio::test]
async fn after_a_reconnect_rooms_are_joined_again_one_at_a_time_in_the_order_first_joined() {
    let fake = FakeGateway::start().await;
    let (zeta, alpha) = (
        RoomId::parse("zeta").unwrap(),
        RoomId::parse("alpha").unwrap(),
    );
    fake.post(&zeta, &["z1"]);
    let mut session = session(&fake);
    session.join(zeta.clone(), None);
    session.join(alpha.clone(), None);
    let both_joined = |session: &Session| session.is_joined(&zeta) && session.is_joined(&alpha);
    while !both_joined(&session) {
        next(&mut session).await;
    }
    fake.drop_all();
    while !matches!(next(&mut session).await, Event::Connected { .. }) {}
    // Only the first room's join goes out before its answer is read.
    session.flush().await.unwrap();
    fake.wait_received("the first re-join", |f| joins(f).len() == 3)
        .await;
    while !both_joined(&session) {
        next(&mut session).await;
    }
    let rooms: Vec<(u64, String)> = fake
        .received()
        .into_iter()
        .filter_map(|(conn, f)| match f {
            ClientFrame::Join { room, .. } => Some((conn, room.to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(
        rooms,
        [
            (0, "zeta".to_owned()),
            (0, "alpha".to_owned()),
            (1, "zeta".to_owned()),
            (1, "alpha".to_owned())
        ]
    );
}

#[tokio::test]
async fn when_history_has_expired_the_error_is_passed_on_and_the_room_joined_again_live() {
    let fake = FakeGateway::start().await;
    fake.post(&lobby(), &["1", "2"]);
    let mut session = session(&fake);
    session.join(lobby(), None);
    events_until(&mut session, is_joined).await;
    // Away while messages 3..=6 are posted and 1..=5 expire.
    fake.close_all_then_post(4000, &lobby(), &["3", "4", "5", "6"]);
    fake.expire_up_to(5);
    let events = events_until(&mut session, is_joined).await;
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::Frame(ServerFrame::Error { code: ErrorCode::HistoryExpired, room: Some(r), .. }) if *r == lobby()
        )),
        "{events:?}"
    );
    assert!(message_seqs(&events).is_empty(), "{events:?}");
    assert_eq!(session.position(&lobby()), Some(Seq(6)));
    assert_eq!(
        joins(&fake.received()),
        [(0, None), (1, Some(Seq(2))), (1, None)]
    );
}
