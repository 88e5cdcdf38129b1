//! What a [`Session`] does across reconnects, against a scripted gateway: it resumes every room
//! from its position (the latest `joined` seq counts as much as the last message), never
//! replays history it was not asked for, retries unacked sends with the same id, delivers each
//! message once and in order whatever the gateway sends, leaves a silent connection, refreshes
//! its token, stops when told to, and bounds what it keeps.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chorus_client::{Backoff, ClientError, Event, Session};
use chorus_protocol::{ClientFrame, ErrorCode, PageLimit, RoomId, Seq};
use chorus_testkit::fake_gateway::{FakeGateway, SendPolicy, WAIT};

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

/// A session of `fake` that has joined the lobby (live).
async fn joined_lobby(fake: &FakeGateway) -> Session {
    let mut session = session(fake);
    session.join(lobby(), None);
    events_until(&mut session, is_joined).await;
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
    matches!(event, Event::Joined { .. })
}

fn message_seqs(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m.seq.0),
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
    let mut session = joined_lobby(&fake).await;

    fake.set_send_policy(SendPolicy::StoreThenDrop);
    let id = session.send(&lobby(), "hello").unwrap();
    let events = events_until(&mut session, |e| matches!(e, Event::Acked { .. })).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Disconnected { code: None, .. })),
        "{events:?}"
    );
    let Some(Event::Acked { id: acked, seq, .. }) = events.last() else {
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
    let mut session = joined_lobby(&fake).await;
    fake.set_send_policy(SendPolicy::UnavailableOnce);
    let id = session.send(&lobby(), "hello").unwrap();
    let events = events_until(&mut session, |e| matches!(e, Event::Acked { .. })).await;
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::Retrying {
                code: ErrorCode::Unavailable,
                ..
            }
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
    let mut session = joined_lobby(&fake).await;
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
    let mut session = joined_lobby(&fake).await;
    fake.close_all_then_post(4500, &lobby(), &["while stopped"]);
    let end = tokio::time::timeout(WAIT, session.next_event())
        .await
        .unwrap();
    assert!(
        matches!(end, Err(ClientError::Closed { code: 4500, .. })),
        "{end:?}"
    );
    // Stopped: every later call says so at once, and nothing reconnects.
    let again = tokio::time::timeout(WAIT, session.next_event())
        .await
        .unwrap();
    assert!(
        matches!(again, Err(ClientError::Closed { code: 4500, .. })),
        "{again:?}"
    );
    assert!(session.is_stopped());
    assert_eq!(fake.connections(), 1);
    // Until the app says so: then it resumes where it was.
    session.reconnect();
    let events = events_until(&mut session, is_joined).await;
    assert_eq!(message_seqs(&events), [1], "{events:?}");
    assert_eq!(joins(&fake.received()), [(0, None), (1, Some(Seq(0)))]);
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
    let mut session = joined_lobby(&fake).await;
    // Away while messages 3..=6 are posted and 1..=5 expire.
    fake.close_all_then_post(4000, &lobby(), &["3", "4", "5", "6"]);
    fake.expire_up_to(5);
    let events = events_until(&mut session, is_joined).await;
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::HistoryExpired { room, since: Seq(2), .. } if *room == lobby()
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

/// Runs the session until `done` holds for it; returns every event on the way.
async fn events_while_not(session: &mut Session, done: impl Fn(&Session) -> bool) -> Vec<Event> {
    let mut events = Vec::new();
    while !done(session) {
        events.push(next(session).await);
    }
    events
}

fn count(events: &[Event], what: impl Fn(&Event) -> bool) -> usize {
    events.iter().filter(|e| what(e)).count()
}

#[tokio::test]
async fn frames_the_gateway_sends_twice_reach_the_app_once() {
    let fake = FakeGateway::start().await;
    fake.post(&lobby(), &["1", "2"]);
    fake.duplicate_frames(true);
    let mut session = session(&fake);
    session.join(lobby(), Some(Seq(0)));
    let id = session.send(&lobby(), "mine").unwrap();
    let mut events = events_while_not(&mut session, |s| {
        s.position(&lobby()) == Some(Seq(3)) && s.unacked().count() == 0
    })
    .await;
    // One more message: once it is in, every duplicate sent before it has been read.
    fake.post(&lobby(), &["4"]);
    events.extend(events_while_not(&mut session, |s| s.position(&lobby()) == Some(Seq(4))).await);
    assert_eq!(message_seqs(&events), [1, 2, 3, 4], "{events:?}");
    assert_eq!(count(&events, is_joined), 1, "one joined for one join");
    let acks: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Acked { .. }))
        .collect();
    assert!(
        matches!(acks[..], [Event::Acked { id: acked, seq: Seq(3), .. }] if *acked == id),
        "{acks:?}"
    );
    let stats = session.stats();
    assert!(stats.duplicates_dropped >= 3, "{stats:?}");
    assert_eq!(stats.stray_acks, 1, "{stats:?}");
    assert_eq!(fake.log(&lobby()).len(), 4);
}

#[tokio::test]
async fn a_hole_is_never_delivered_out_of_order_the_room_is_joined_again_from_its_position() {
    let fake = FakeGateway::start().await;
    let mut session = joined_lobby(&fake).await;
    // Seq 1's notification is lost: seq 2 arrives past a hole.
    fake.post_unsent(&lobby(), &["1"]);
    fake.post(&lobby(), &["2"]);
    let events = events_until(&mut session, is_joined).await;
    assert_eq!(message_seqs(&events), [1, 2], "{events:?}");
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::Joined {
                seq: Seq(2),
                resumed: true,
                ..
            }
        )),
        "{events:?}"
    );
    assert_eq!(count(&events, |e| matches!(e, Event::Connected { .. })), 0);
    assert_eq!(
        joins(&fake.received()),
        [(0, None), (0, Some(Seq(0)))],
        "re-joined on the same connection from the position before the hole"
    );
    assert_eq!(session.stats().gaps_resynced, 1);
}

#[tokio::test]
async fn a_send_met_by_silence_is_sent_again_with_its_id_on_a_new_connection() {
    let fake = FakeGateway::start().await;
    let mut session = session(&fake);
    let timeout = Duration::from_millis(300);
    session.set_request_timeout(timeout);
    session.join(lobby(), None);
    events_until(&mut session, is_joined).await;
    // Nothing waits for an answer: a quiet connection is not a dead one.
    assert!(
        tokio::time::timeout(timeout * 3, session.next_event())
            .await
            .is_err(),
        "no event on a quiet connection"
    );
    fake.silence_all();
    let id = session.send(&lobby(), "hello").unwrap();
    let events = events_until(&mut session, |e| matches!(e, Event::Acked { .. })).await;
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::Disconnected { code: None, reason, .. } if reason.contains("nothing heard")
        )),
        "{events:?}"
    );
    let sends: Vec<(u64, String)> = fake
        .received()
        .into_iter()
        .filter_map(|(conn, f)| match f {
            ClientFrame::Send { id, .. } => Some((conn, id.to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(
        sends,
        [(1, id.to_string())],
        "the silent connection read nothing"
    );
    assert_eq!(session.stats().send_retries, 1);
    assert_eq!(fake.log(&lobby()).len(), 1);
}

/// A token source that counts its calls and hands out `fresh-1`, `fresh-2`, …, failing the
/// first `failures` calls.
fn token_source(session: &mut Session, failures: usize) -> Arc<AtomicUsize> {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    session.set_token_source(move || {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            if n <= failures {
                Err(format!("the auth service is down (call {n})"))
            } else {
                Ok(format!("fresh-{n}"))
            }
        }
    });
    calls
}

fn token(value: &str) -> Option<String> {
    Some(value.to_owned())
}

#[tokio::test]
async fn on_4003_the_session_asks_for_a_fresh_token_then_resumes() {
    let fake = FakeGateway::start().await;
    let mut session = session(&fake);
    session.set_token(token("old"));
    let calls = token_source(&mut session, 1);
    session.join(lobby(), None);
    events_until(&mut session, is_joined).await;
    fake.close_all_then_post(4003, &lobby(), &["missed"]);
    let events = events_until(&mut session, is_joined).await;
    assert!(
        matches!(
            &events[..],
            [
                Event::Disconnected {
                    code: Some(4003),
                    ..
                },
                Event::TokenRefreshFailed { .. },
                Event::Connected { .. },
                ..
            ]
        ),
        "{events:?}"
    );
    assert_eq!(message_seqs(&events), [1]);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(fake.tokens(), [token("old"), token("fresh-2")]);
}

#[tokio::test]
async fn a_handshake_refused_with_401_gets_a_fresh_token_from_the_source() {
    let fake = FakeGateway::start().await;
    fake.refuse_token("expired");
    let mut session = session(&fake);
    session.set_token(token("expired"));
    token_source(&mut session, 0);
    session.join(lobby(), None);
    let events = events_until(&mut session, is_joined).await;
    assert!(
        matches!(
            &events[..],
            [Event::ConnectFailed { .. }, Event::Connected { .. }, ..]
        ),
        "{events:?}"
    );
    assert_eq!(fake.tokens(), [token("expired"), token("fresh-1")]);
}

#[tokio::test]
async fn on_4003_without_a_token_source_the_session_stops_until_given_a_token() {
    let fake = FakeGateway::start().await;
    let mut session = session(&fake);
    session.set_token(token("old"));
    session.join(lobby(), None);
    events_until(&mut session, is_joined).await;
    fake.close_all(4003);
    for _ in 0..2 {
        let end = tokio::time::timeout(WAIT, session.next_event())
            .await
            .unwrap();
        assert!(matches!(end, Err(ClientError::TokenExpired)), "{end:?}");
    }
    assert_eq!(fake.connections(), 1, "no reconnect with the expired token");
    session.set_token(token("new"));
    session.reconnect();
    events_until(&mut session, is_joined).await;
    assert_eq!(fake.tokens(), [token("old"), token("new")]);
}

#[test]
fn what_a_session_keeps_is_bounded_and_every_refusal_says_why() {
    let mut session = Session::new(vec!["ws://127.0.0.1:9/ws".into()], None);
    session.set_max_pending_sends(2);
    let elsewhere = RoomId::parse("elsewhere").unwrap();
    assert!(matches!(
        session.send(&elsewhere, "hi"),
        Err(ClientError::NotJoined(room)) if room == elsewhere
    ));
    session.join(lobby(), None);
    let first = session.send(&lobby(), "one").unwrap();
    assert!(matches!(
        session.send_with_id(&lobby(), first.clone(), "one again"),
        Err(ClientError::DuplicateId(id)) if id == first
    ));
    session.send(&lobby(), "two").unwrap();
    let full = session.send(&lobby(), "three").unwrap_err();
    assert!(
        matches!(full, ClientError::QueueFull { limit: 2 }),
        "{full:?}"
    );
    assert!(
        full.to_string()
            .contains("2 sends are waiting for their ack")
    );
    assert!(matches!(
        session.send(&lobby(), ""),
        Err(ClientError::Invalid(_))
    ));
    assert_eq!(session.unacked().count(), 2);
}

#[tokio::test]
async fn every_leave_is_confirmed_even_when_the_connection_ends_before_its_answer() {
    let fake = FakeGateway::start().await;
    let mut session = session(&fake);
    // Not joined on any connection yet: done at once.
    session.join(lobby(), None);
    session.leave(&lobby());
    assert!(matches!(next(&mut session).await, Event::Left { room } if room == lobby()));

    session.join(lobby(), None);
    events_until(&mut session, is_joined).await;
    fake.silence_all();
    session.leave(&lobby());
    session.flush().await.unwrap();
    fake.drop_all();
    let events = events_until(&mut session, |e| matches!(e, Event::Left { .. })).await;
    assert!(
        matches!(
            &events[..],
            [Event::Disconnected { code: None, .. }, Event::Left { room }] if *room == lobby()
        ),
        "{events:?}"
    );
    assert!(!session.is_joined(&lobby()));
}

#[tokio::test]
async fn scrollback_needs_no_join_moves_no_position_and_is_asked_again_on_a_new_connection() {
    let fake = FakeGateway::start().await;
    fake.post(&lobby(), &["one", "two", "three", "four", "five"]);
    let mut session = session(&fake);
    let timeout = Duration::from_millis(300);
    session.set_request_timeout(timeout);
    let limit = PageLimit::new(2).unwrap();
    let first = session.history(&lobby(), None, limit).unwrap();
    let events = events_until(&mut session, |e| matches!(e, Event::History { .. })).await;
    let Some(Event::History { id, room, messages }) = events.last() else {
        unreachable!()
    };
    assert_eq!((id, room), (&first, &lobby()));
    let seqs: Vec<u64> = messages.iter().map(|m| m.seq.0).collect();
    assert_eq!(seqs, [4, 5], "the newest, oldest first");
    assert_eq!(session.position(&lobby()), None, "no position moved");
    assert!(!session.is_joined(&lobby()));

    // The connection goes silent with the next request waiting: asked again on a new one.
    fake.silence_all();
    let second = session.history(&lobby(), Some(Seq(4)), limit).unwrap();
    let events = events_until(&mut session, |e| matches!(e, Event::History { .. })).await;
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::Disconnected { code: None, reason, .. } if reason.contains("nothing heard")
        )),
        "{events:?}"
    );
    let Some(Event::History { id, messages, .. }) = events.last() else {
        unreachable!()
    };
    assert_eq!(id, &second);
    let seqs: Vec<u64> = messages.iter().map(|m| m.seq.0).collect();
    assert_eq!(seqs, [2, 3]);
    let asked: Vec<(u64, String)> = fake
        .received()
        .into_iter()
        .filter_map(|(conn, f)| match f {
            ClientFrame::History { id, .. } => Some((conn, id.to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(
        asked,
        [(0, first.to_string()), (1, second.to_string())],
        "the silent connection read nothing; the new one got the request"
    );
    assert_eq!(
        message_seqs(&events),
        Vec::<u64>::new(),
        "no message events"
    );
}

#[tokio::test]
async fn at_most_sixteen_history_requests_wait() {
    let fake = FakeGateway::start().await;
    let mut session = session(&fake);
    let limit = PageLimit::default();
    for _ in 0..chorus_client::MAX_PENDING_HISTORY {
        session.history(&lobby(), None, limit).unwrap();
    }
    assert!(matches!(
        session.history(&lobby(), None, limit),
        Err(ClientError::QueueFull { limit: 16 })
    ));
}
