//! The walking skeleton end to end: real binaries, the emulator's DynamoDB stream and SNS.

use std::time::Duration;

use chorus_client::{Client, ClientError, Received};
use chorus_e2e::Stack;
use chorus_protocol::{ErrorCode, RoomId, Seq, ServerFrame, close};
use chorus_testkit::sns;
use tokio_tungstenite::tungstenite;

const WAIT: Duration = Duration::from_secs(10);

async fn connect(gateway: &chorus_e2e::Service, user: &str) -> Client {
    Client::connect(&gateway.ws(user)).await.unwrap()
}

fn room(name: &str) -> RoomId {
    RoomId::parse(name).unwrap()
}

async fn joined(client: &mut Client, room: &RoomId, since: Option<Seq>) -> (Seq, Vec<ServerFrame>) {
    client.join(room, since).await.unwrap();
    let (frame, before) = client
        .wait_for(WAIT, "joined", |f| matches!(f, ServerFrame::Joined { .. }))
        .await
        .unwrap();
    let ServerFrame::Joined { seq, room: got } = frame else {
        unreachable!()
    };
    assert_eq!(&got, room);
    (seq, before)
}

async fn next_message(client: &mut Client) -> chorus_protocol::MessageEvent {
    let (frame, _) = client
        .wait_for(WAIT, "a message", |f| matches!(f, ServerFrame::Message(_)))
        .await
        .unwrap();
    let ServerFrame::Message(m) = frame else {
        unreachable!()
    };
    m
}

async fn acked(client: &mut Client, id: &str) -> Seq {
    let (frame, _) = client
        .wait_for(
            WAIT,
            "ack",
            |f| matches!(f, ServerFrame::Ack { id: got, .. } if got.as_str() == id),
        )
        .await
        .unwrap();
    let ServerFrame::Ack { seq, .. } = frame else {
        unreachable!()
    };
    seq
}

#[tokio::test]
async fn john_on_a_and_lucy_on_b_hear_each_other_once_and_in_order() {
    let stack = Stack::start(2).await.unwrap();
    let lobby = room("lobby");
    let mut john = connect(&stack.gateways[0], "john").await;
    let mut lucy = connect(&stack.gateways[1], "lucy").await;
    assert_eq!(joined(&mut john, &lobby, None).await.0, Seq(0));
    assert_eq!(joined(&mut lucy, &lobby, None).await.0, Seq(0));

    let id = john.send(&lobby, "Hello world").await.unwrap();
    let (ack, _) = john
        .wait_for(WAIT, "ack", |f| matches!(f, ServerFrame::Ack { .. }))
        .await
        .unwrap();
    assert!(
        matches!(&ack, ServerFrame::Ack { id: got, room: r, seq: Seq(1) } if got.as_str() == id && r == &lobby),
        "{ack:?}"
    );

    let heard = next_message(&mut lucy).await;
    assert_eq!(
        (heard.seq, heard.sender.as_str(), heard.body.as_str()),
        (Seq(1), "john", "Hello world")
    );
    assert_eq!(heard.id.as_str(), id);

    let id2 = lucy.send(&lobby, "Hi John").await.unwrap();
    let (ack, lucy_before_ack) = lucy
        .wait_for(
            WAIT,
            "ack",
            |f| matches!(f, ServerFrame::Ack { id, .. } if id.as_str() == id2),
        )
        .await
        .unwrap();
    assert!(matches!(ack, ServerFrame::Ack { seq: Seq(2), .. }));
    // John gets his own message and then Lucy's, in order.
    let own = next_message(&mut john).await;
    let reply = next_message(&mut john).await;
    assert_eq!((own.seq, reply.seq), (Seq(1), Seq(2)));
    assert_eq!(
        (reply.sender.as_str(), reply.body.as_str()),
        ("lucy", "Hi John")
    );

    // Exactly once: Lucy's frames up to her own message 2, then for both everything up to a
    // probe (leave → left), hold seq 1 then 2 and nothing else.
    let (last, lucy_before_own) = lucy
        .wait_for(
            WAIT,
            "message 2",
            |f| matches!(f, ServerFrame::Message(m) if m.seq == Seq(2)),
        )
        .await
        .unwrap();
    let mut seen = vec![vec![1, 2], vec![1]];
    seen[1].extend(message_seqs(&lucy_before_ack));
    seen[1].extend(message_seqs(&lucy_before_own));
    seen[1].extend(message_seqs(&[last]));
    for (client, seen) in [&mut john, &mut lucy].into_iter().zip(&mut seen) {
        client
            .send_raw(r#"{"type":"leave","room":"lobby"}"#)
            .await
            .unwrap();
        let (_, before) = client
            .wait_for(WAIT, "left", |f| matches!(f, ServerFrame::Left { .. }))
            .await
            .unwrap();
        seen.extend(message_seqs(&before));
        assert_eq!(seen, &[1, 2]);
    }
}

fn message_seqs(frames: &[ServerFrame]) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Message(m) => Some(m.seq.0),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_member_of_one_room_never_sees_another_rooms_messages() {
    let stack = Stack::start(2).await.unwrap();
    let (x, y) = (room("x"), room("y"));
    let mut only_x = connect(&stack.gateways[0], "ann").await;
    let mut sender = connect(&stack.gateways[1], "bob").await;
    joined(&mut only_x, &x, None).await;
    joined(&mut sender, &x, None).await;
    joined(&mut sender, &y, None).await;

    let secret = sender.send(&y, "for room y only").await.unwrap();
    acked(&mut sender, &secret).await;
    let marker = sender.send(&x, "marker").await.unwrap();
    acked(&mut sender, &marker).await;

    // The publisher forwards in stream order, so a leak of y's message would arrive first.
    let (frame, before) = only_x
        .wait_for(
            WAIT,
            "the marker",
            |f| matches!(f, ServerFrame::Message(m) if m.id.as_str() == marker),
        )
        .await
        .unwrap();
    assert!(matches!(frame, ServerFrame::Message(ref m) if m.room == x && m.seq == Seq(1)));
    assert!(before.is_empty(), "room x member got {before:?}");
}

#[tokio::test]
async fn invalid_frames_get_an_error_and_the_connection_stays_usable() {
    let stack = Stack::start(1).await.unwrap();
    let lobby = room("lobby");
    let mut client = connect(&stack.gateways[0], "eve").await;

    let cases = [
        ("not json", ErrorCode::BadFrame, None),
        (
            r#"{"type":"shout","id":"m1"}"#,
            ErrorCode::UnknownType,
            Some("m1"),
        ),
        (
            r#"{"type":"join","room":"bad room"}"#,
            ErrorCode::BadFrame,
            None,
        ),
        (
            r#"{"type":"send","room":"lobby","id":"m2","body":"hi"}"#,
            ErrorCode::NotJoined,
            Some("m2"),
        ),
        (
            r#"{"type":"leave","room":"lobby"}"#,
            ErrorCode::NotJoined,
            None,
        ),
    ];
    for (text, code, reference) in cases {
        client.send_raw(text).await.unwrap();
        match client.next_frame(WAIT).await.unwrap() {
            ServerFrame::Error {
                code: got,
                message,
                reference: got_ref,
                ..
            } => {
                assert_eq!(got, code, "{text}: {message}");
                assert_eq!(got_ref.as_deref(), reference, "{text}");
                assert!(!message.is_empty());
            }
            other => panic!("{text}: expected an error, got {other:?}"),
        }
    }
    let oversized = format!(
        r#"{{"type":"send","room":"lobby","id":"m3","body":"{}"}}"#,
        "x".repeat(17 * 1024)
    );
    client.send_raw(oversized).await.unwrap();
    assert!(matches!(
        client.next_frame(WAIT).await.unwrap(),
        ServerFrame::Error {
            code: ErrorCode::BadFrame,
            ..
        }
    ));

    // Still usable: join, send, receive.
    joined(&mut client, &lobby, None).await;
    let id = client.send(&lobby, "still here").await.unwrap();
    assert_eq!(acked(&mut client, &id).await, Seq(1));
    assert_eq!(next_message(&mut client).await.body.as_str(), "still here");
}

#[tokio::test]
async fn resume_with_since_on_another_gateway_replays_then_goes_live_without_gap_or_duplicate() {
    let stack = Stack::start(2).await.unwrap();
    let lobby = room("lobby");
    let mut john = connect(&stack.gateways[0], "john").await;
    joined(&mut john, &lobby, None).await;
    for i in 1..=5 {
        let id = john.send(&lobby, &format!("m{i}")).await.unwrap();
        acked(&mut john, &id).await;
    }

    let mut lucy = connect(&stack.gateways[1], "lucy").await;
    let (head, replay) = joined(&mut lucy, &lobby, Some(Seq(2))).await;
    assert_eq!(head, Seq(5));
    let replayed: Vec<(u64, String)> = replay
        .iter()
        .map(|f| match f {
            ServerFrame::Message(m) => (m.seq.0, m.body.as_str().to_owned()),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        replayed,
        [(3, "m3".into()), (4, "m4".into()), (5, "m5".into())]
    );

    let id = john.send(&lobby, "live").await.unwrap();
    acked(&mut john, &id).await;
    let live = next_message(&mut lucy).await;
    assert_eq!((live.seq, live.body.as_str()), (Seq(6), "live"));
}

#[tokio::test]
async fn a_draining_gateway_closes_clients_with_the_resume_code_and_unsubscribes() {
    let mut stack = Stack::start(2).await.unwrap();
    let lobby = room("lobby");
    let mut on_a = connect(&stack.gateways[0], "ann").await;
    let mut on_b = connect(&stack.gateways[1], "bob").await;
    joined(&mut on_a, &lobby, None).await;
    joined(&mut on_b, &lobby, None).await;

    let status = stack.gateways[0]
        .terminate(Duration::from_secs(10))
        .unwrap();
    assert!(status.success(), "gateway exited with {status}");
    match on_a.recv_timeout(WAIT).await.unwrap() {
        Some(Received::Closed { code, .. }) => {
            assert_eq!(code, close::SERVER_RESTARTING);
            assert!(close::should_resume(code));
        }
        other => panic!("expected a close, got {other:?}"),
    }
    assert!(stack.gateways[0].log().contains("gateway stopped"));

    // The drained gateway unsubscribed: publishing still works for the others.
    let id = on_b.send(&lobby, "after the drain").await.unwrap();
    acked(&mut on_b, &id).await;
    assert_eq!(
        next_message(&mut on_b).await.body.as_str(),
        "after the drain"
    );

    // And the client resumes on B with what it had.
    let mut resumed = connect(&stack.gateways[1], "ann").await;
    let (head, replay) = joined(&mut resumed, &lobby, Some(Seq(0))).await;
    assert_eq!(head, Seq(1));
    assert_eq!(replay.len(), 1);
}

#[tokio::test]
async fn connecting_without_a_user_in_dev_mode_is_refused_with_a_reason() {
    let stack = Stack::start(1).await.unwrap();
    let url = format!("ws://{}/ws", stack.gateways[0].addr);
    let err = Client::connect(&url).await.expect_err("refused");
    assert!(err.to_string().contains("401"), "{err}");
    let ClientError::WebSocket(tungstenite::Error::Http(response)) = err else {
        panic!("expected an HTTP refusal")
    };
    let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned();
    assert!(body.contains("?user=NAME"), "{body}");
}

#[tokio::test]
async fn a_send_retried_with_the_same_id_is_stored_and_delivered_once() {
    let stack = Stack::start(2).await.unwrap();
    let lobby = room("lobby");
    let mut john = connect(&stack.gateways[0], "john").await;
    let mut lucy = connect(&stack.gateways[1], "lucy").await;
    joined(&mut john, &lobby, None).await;
    joined(&mut lucy, &lobby, None).await;

    let send = r#"{"type":"send","room":"lobby","id":"retry-1","body":"once"}"#;
    john.send_raw(send).await.unwrap();
    let first = acked(&mut john, "retry-1").await;
    // The retry comes on another connection, as after a reconnect.
    let mut john_again = connect(&stack.gateways[1], "john").await;
    joined(&mut john_again, &lobby, Some(first)).await;
    john_again.send_raw(send).await.unwrap();
    assert_eq!(acked(&mut john_again, "retry-1").await, first);
    let id = john.send(&lobby, "next").await.unwrap();
    let next = acked(&mut john, &id).await;
    assert_eq!(next.0, first.0 + 1, "the retry took no seq");

    let (_, before) = lucy
        .wait_for(
            WAIT,
            "the next message",
            |f| matches!(f, ServerFrame::Message(m) if m.seq == next),
        )
        .await
        .unwrap();
    assert_eq!(
        message_seqs(&before),
        [first.0],
        "the retried message arrives once"
    );
}

#[tokio::test]
async fn two_writers_racing_on_one_room_give_dense_seqs() {
    let stack = Stack::start_with(2, 0).await.unwrap();
    let http = chorus_e2e::writer_http();
    let writers = [stack.writer.http(), stack.more_writers[0].http()];
    let mut sends = Vec::new();
    for i in 0..40 {
        let url = format!("{}/v1/rooms/race/messages", writers[i % 2]);
        let body = serde_json::json!({"id": format!("r{i}"), "sender": "racer", "body": "go"});
        let http = http.clone();
        sends.push(tokio::spawn(async move {
            let res = http.post(url).json(&body).send().await.unwrap();
            assert_eq!(res.status(), 201);
            res.json::<chorus_protocol::api::SendResponse>()
                .await
                .unwrap()
                .seq
                .0
        }));
    }
    let mut seqs = Vec::new();
    for send in sends {
        seqs.push(send.await.unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=40).collect::<Vec<u64>>());
    let page: chorus_protocol::api::HistoryPage = http
        .get(format!("{}/v1/rooms/race/messages?limit=500", writers[1]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page.head, Seq(40));
    let stored: Vec<u64> = page.messages.iter().map(|m| m.seq.0).collect();
    assert_eq!(stored, (1..=40).collect::<Vec<u64>>());
}

#[tokio::test]
async fn forged_sns_posts_are_refused_and_reach_no_client() {
    let stack = Stack::start(1).await.unwrap();
    let lobby = room("lobby");
    let gateway = &stack.gateways[0];
    let mut lucy = connect(gateway, "lucy").await;
    joined(&mut lucy, &lobby, None).await;

    let forged_payload = serde_json::json!({"v": 1, "events": [{
        "room": "lobby", "seq": 1, "id": "forged", "sender": "mallory",
        "body": "send me your password", "ts": "2026-11-29T10:00:00.000Z"}]})
    .to_string();
    let envelope = |topic: &str, signature: Option<&str>| {
        let mut e = sns::notification_at(
            topic,
            &forged_payload,
            "00000000-0000-4000-8000-000000000000".into(),
            "2099-01-01T00:00:00.000Z".into(),
        );
        e.signature_version = Some("2".into());
        e.signature = signature.map(str::to_owned);
        e.signing_cert_url =
            Some("https://sns.us-east-1.amazonaws.com/SimpleNotificationService-forged.pem".into());
        sns::to_json(&e)
    };
    let http = reqwest::Client::new();
    let url = format!("{}/sns", gateway.http());
    for (body, status) in [
        (envelope(&stack.topic_arn, None), 403),
        (
            envelope(&stack.topic_arn, Some("bm90IGEgc2lnbmF0dXJl")),
            403,
        ),
        (
            envelope("arn:aws:sns:us-east-1:123456789012:elsewhere", Some("AAAA")),
            403,
        ),
        ("{not json".to_owned(), 400),
        ("x".repeat(2 * 1024 * 1024), 413),
    ] {
        let res = http
            .post(&url)
            .header("content-type", "text/plain")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), status);
        let text = res.text().await.unwrap();
        assert!(
            !text.contains("password"),
            "the refusal does not echo the payload"
        );
    }

    // The real first message of the room is the first thing Lucy sees.
    let mut john = connect(gateway, "john").await;
    joined(&mut john, &lobby, None).await;
    let id = john.send(&lobby, "the real one").await.unwrap();
    acked(&mut john, &id).await;
    let first = next_message(&mut lucy).await;
    assert_eq!(
        (first.seq, first.sender.as_str(), first.body.as_str()),
        (Seq(1), "john", "the real one")
    );

    gateway
        // Every refusal is counted, the oversized post's too.
        .wait_for_metrics(&["chorus_gateway_bus_notifications_total{result=\"rejected\"} 5"])
        .await;
    assert!(
        !gateway.log().contains("send me your password"),
        "payloads never reach the log"
    );
}

#[tokio::test]
async fn a_gateway_whose_subscription_disappears_subscribes_again_and_loses_nothing() {
    let mut stack = Stack::start(0).await.unwrap();
    stack
        .add_gateway(&["--subscription-check-ms", "200"])
        .await
        .unwrap();
    let lobby = room("lobby");
    let gateway = &stack.gateways[0];
    let mut lucy = connect(gateway, "lucy").await;
    let mut john = connect(gateway, "john").await;
    joined(&mut lucy, &lobby, None).await;
    joined(&mut john, &lobby, None).await;

    // Someone removes the gateway's subscription, and a message is sent right then.
    let sns = aws_sdk_sns::Client::new(&chorus_testkit::emulator::aws().await);
    let subscriptions = |sns: aws_sdk_sns::Client, topic: String| async move {
        sns.list_subscriptions_by_topic()
            .topic_arn(topic)
            .send()
            .await
            .unwrap()
            .subscriptions
            .unwrap_or_default()
    };
    let before = subscriptions(sns.clone(), stack.topic_arn.clone()).await;
    assert_eq!(before.len(), 1);
    sns.unsubscribe()
        .subscription_arn(before[0].subscription_arn.clone().unwrap())
        .send()
        .await
        .unwrap();
    let id = john.send(&lobby, "while unsubscribed").await.unwrap();
    acked(&mut john, &id).await;

    // The gateway notices and subscribes again (SNS shows a new subscription).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = subscriptions(sns.clone(), stack.topic_arn.clone()).await;
        if now.len() == 1 && now[0].subscription_arn != before[0].subscription_arn {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new subscription"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let id = john.send(&lobby, "after").await.unwrap();
    acked(&mut john, &id).await;

    let first = next_message(&mut lucy).await;
    let second = next_message(&mut lucy).await;
    assert_eq!(
        [
            (first.seq, first.body.as_str()),
            (second.seq, second.body.as_str())
        ],
        [(Seq(1), "while unsubscribed"), (Seq(2), "after")]
    );
}

#[tokio::test]
async fn every_service_serves_its_named_metric_series() {
    let stack = Stack::start(1).await.unwrap();
    // SNS posts before the message: the subscription's confirmation, on emulators that send one
    // (LocalStack; moto confirms at once).
    let accepted = "chorus_gateway_bus_notifications_total{result=\"accepted\"}";
    let before = stack.gateways[0].metric(accepted).await.expect(accepted);
    let lobby = room("lobby");
    let mut john = connect(&stack.gateways[0], "john").await;
    joined(&mut john, &lobby, None).await;
    let id = john.send(&lobby, "measured").await.unwrap();
    acked(&mut john, &id).await;
    next_message(&mut john).await;

    let accepted_after = format!("{accepted} {}", before + 1.0);
    stack.gateways[0]
        .wait_for_metrics(&[
            &accepted_after,
            "chorus_gateway_connections 1",
            "chorus_gateway_rooms 1",
            "chorus_gateway_room_changes_total{kind=\"join\"} 1",
            "chorus_gateway_messages_total{direction=\"in\"} 1",
            "chorus_gateway_messages_total{direction=\"out\"} 1",
            "chorus_gateway_fanout_seconds_count 1",
            "chorus_gateway_slow_consumers_total 0",
            "chorus_gateway_bus_rejected_total{reason=\"signature\"} 0",
            "chorus_gateway_sends_total{result=\"acked\"} 1",
        ])
        .await;
    stack
        .writer
        .wait_for_metrics(&[
            "chorus_writer_sends_total{result=\"stored\"} 1",
            "chorus_writer_request_seconds_count{route=\"send\"} 1",
            "chorus_writer_store_errors_total{kind=\"unavailable\"} 0",
        ])
        .await;
    stack
        .publisher
        .wait_for_metrics(&[
            "chorus_publisher_batches_total{result=\"ok\"}",
            "chorus_publisher_records_total{kind=\"forwarded\"} 1",
            "chorus_publisher_sns_total{kind=\"calls\"}",
            "chorus_publisher_batches_total{result=\"failed\"} 0",
        ])
        .await;
}

#[tokio::test]
async fn a_gateway_on_the_sqs_transport_chats_with_one_on_http_and_cleans_up_on_drain() {
    let mut stack = Stack::start(1).await.unwrap();
    stack
        .add_gateway(&["--bus", "sqs", "--sqs-wait-secs", "1"])
        .await
        .unwrap();
    let lobby = room("lobby");
    let mut john = connect(&stack.gateways[0], "john").await;
    let mut lucy = connect(&stack.gateways[1], "lucy").await;
    joined(&mut john, &lobby, None).await;
    joined(&mut lucy, &lobby, None).await;

    let id = john.send(&lobby, "over http, into a queue").await.unwrap();
    acked(&mut john, &id).await;
    let heard = next_message(&mut lucy).await;
    assert_eq!(
        (heard.seq, heard.body.as_str()),
        (Seq(1), "over http, into a queue")
    );
    let id = lucy.send(&lobby, "and back").await.unwrap();
    acked(&mut lucy, &id).await;
    let (_, before) = john
        .wait_for(
            WAIT,
            "Lucy's reply",
            |f| matches!(f, ServerFrame::Message(m) if m.seq == Seq(2)),
        )
        .await
        .unwrap();
    assert_eq!(message_seqs(&before), [1]);

    // Drained, the SQS gateway removes its subscription and its queue.
    let aws = chorus_testkit::emulator::aws().await;
    let sqs = aws_sdk_sqs::Client::new(&aws);
    let queues = |prefix: &'static str| {
        let sqs = sqs.clone();
        async move {
            sqs.list_queues()
                .queue_name_prefix(prefix)
                .send()
                .await
                .unwrap()
                .queue_urls
                .unwrap_or_default()
        }
    };
    let gateway_queues_before = queues("chorus-gw-").await.len();
    assert!(gateway_queues_before >= 1);
    let status = stack.gateways[1]
        .terminate(Duration::from_secs(10))
        .unwrap();
    assert!(status.success());
    assert_eq!(queues("chorus-gw-").await.len(), gateway_queues_before - 1);
    let sns = aws_sdk_sns::Client::new(&aws);
    let subscriptions = sns
        .list_subscriptions_by_topic()
        .topic_arn(&stack.topic_arn)
        .send()
        .await
        .unwrap()
        .subscriptions
        .unwrap_or_default();
    assert!(
        subscriptions
            .iter()
            .all(|s| s.protocol.as_deref() != Some("sqs")),
        "{subscriptions:?}"
    );
}
