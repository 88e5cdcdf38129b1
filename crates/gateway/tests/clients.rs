//! What one gateway does with its clients, seen from the clients: tokens, limits, heartbeats and
//! slow consumers. Each client that breaks a limit is told why, and the others carry on.

use std::time::Duration;

use chorus_client::{Client, ClientError, Received};
use chorus_gateway::Settings;
use chorus_gateway::settings::VerifySettings;
use chorus_protocol::{ErrorCode, RoomId, Seq, ServerFrame, close};
use chorus_testkit::gateway::{Gateway, TOPIC, metric, upgrade_request};
use chorus_testkit::logs::CapturedLogs;
use chorus_testkit::sns;
use chorus_testkit::tokens::{client_token as token, unix_now as now};
use futures_util::StreamExt as _;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite;

const SECRET: &[u8] = b"a test secret of more than thirty-two bytes";
const WAIT: Duration = Duration::from_secs(10);

fn room(name: &str) -> RoomId {
    RoomId::parse(name).unwrap()
}

/// A gateway that takes tokens signed with [`SECRET`] (and no dev users).
async fn token_gateway(configure: impl FnOnce(&mut Settings)) -> Gateway {
    let path = std::env::temp_dir().join(format!("chorus-clients-test-{}", std::process::id()));
    std::fs::write(&path, SECRET).unwrap();
    Gateway::start(|settings| {
        settings.auth.dev_users = false;
        settings.auth.secret_files = vec![path];
        settings.auth.leeway = Duration::ZERO;
        configure(settings);
    })
    .await
}

/// The HTTP status and body of a refused handshake.
fn refusal(err: ClientError) -> (u16, String) {
    match err {
        ClientError::WebSocket(tungstenite::Error::Http(response)) => (
            response.status().as_u16(),
            String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

async fn join(client: &mut Client, name: &str) -> ServerFrame {
    client
        .send_raw(json!({"type": "join", "room": name}).to_string())
        .await
        .unwrap();
    client.next_frame(WAIT).await.unwrap()
}

fn is_error(frame: &ServerFrame, code: ErrorCode) -> bool {
    matches!(frame, ServerFrame::Error { code: c, .. } if *c == code)
}

/// Reads until the gateway closes the connection; returns the close code.
async fn closed_with(client: &mut Client) -> u16 {
    loop {
        match client.recv_timeout(WAIT).await.unwrap() {
            Some(Received::Closed { code, .. }) => return code,
            Some(Received::Frame(_)) => continue,
            None => panic!("not closed within {WAIT:?}"),
        }
    }
}

#[tokio::test]
async fn a_token_names_the_sender_and_its_rooms_claim_authorizes_joins() {
    let gateway = token_gateway(|_| {}).await;
    let john = token(SECRET, "john", &["lobby", "team-*"], now() + 600);
    let mut client = Client::connect_with_token(&gateway.ws_url(), Some(&john))
        .await
        .unwrap();
    assert!(matches!(
        join(&mut client, "lobby").await,
        ServerFrame::Joined { .. }
    ));
    assert!(matches!(
        join(&mut client, "team-red").await,
        ServerFrame::Joined { .. }
    ));
    let refused = join(&mut client, "admin").await;
    assert!(is_error(&refused, ErrorCode::Forbidden), "{refused:?}");

    // The sender is the token's subject.
    client.send(&room("lobby"), "hello").await.unwrap();
    let (message, _) = client
        .wait_for(WAIT, "own message", |f| {
            matches!(f, ServerFrame::Message(_))
        })
        .await
        .unwrap();
    let ServerFrame::Message(message) = message else {
        unreachable!()
    };
    assert_eq!(message.sender.as_str(), "john");

    // The query parameter works too (for clients that cannot set a subprotocol).
    let lucy = token(SECRET, "lucy", &["lobby"], now() + 600);
    let mut by_query = Client::connect(&format!("{}?token={lucy}", gateway.ws_url()))
        .await
        .unwrap();
    assert!(matches!(
        join(&mut by_query, "lobby").await,
        ServerFrame::Joined { .. }
    ));
}

#[tokio::test]
async fn expired_forged_and_missing_tokens_are_refused_with_the_reason() {
    let gateway = token_gateway(|_| {}).await;
    let url = gateway.ws_url();
    let expired = token(SECRET, "john", &["*"], now() - 60);
    let forged = token(
        b"not the gateway's secret, but long enough",
        "john",
        &["*"],
        now() + 600,
    );
    for (offered, reason) in [
        (Some(expired.as_str()), "expired"),
        (Some(forged.as_str()), "signature"),
        (Some("not-a-jwt"), "not a well-formed JWT"),
        (None, "no token"),
    ] {
        let err = Client::connect_with_token(&url, offered)
            .await
            .err()
            .unwrap();
        let (status, body) = refusal(err);
        assert_eq!(status, 401, "{body}");
        assert!(body.contains(reason), "{reason:?} not in {body:?}");
    }
    // Dev names are off on a gateway that takes tokens.
    let err = Client::connect(&gateway.user_url("john"))
        .await
        .err()
        .unwrap();
    let (status, body) = refusal(err);
    assert_eq!(status, 401);
    assert!(body.contains("tokens only"), "{body}");
    gateway
        .wait_for_metrics(&[
            r#"chorus_gateway_connections_refused_total{reason="expired"} 1"#,
            r#"chorus_gateway_connections_refused_total{reason="signature"} 1"#,
            r#"chorus_gateway_connections_refused_total{reason="missing"} 2"#,
            "chorus_gateway_connections 0",
        ])
        .await;
}

#[tokio::test]
async fn a_connection_is_closed_when_its_token_expires() {
    let gateway = token_gateway(|settings| {
        settings.clients.ping_interval = Duration::from_millis(100);
        settings.clients.idle_timeout = Duration::from_millis(5_000);
    })
    .await;
    let short = token(SECRET, "john", &["lobby"], now() + 2);
    let mut client = Client::connect_with_token(&gateway.ws_url(), Some(&short))
        .await
        .unwrap();
    assert!(matches!(
        join(&mut client, "lobby").await,
        ServerFrame::Joined { .. }
    ));
    assert_eq!(closed_with(&mut client).await, close::TOKEN_EXPIRED);
}

#[tokio::test]
async fn over_the_send_rate_a_client_is_told_and_the_others_carry_on() {
    let gateway = Gateway::start(|settings| {
        settings.clients.sends.per_sec = 1;
        settings.clients.sends.burst = 2;
    })
    .await;
    let mut john = Client::connect(&gateway.user_url("john")).await.unwrap();
    let mut lucy = Client::connect(&gateway.user_url("lucy")).await.unwrap();
    join(&mut john, "lobby").await;
    join(&mut lucy, "lobby").await;
    for id in ["a1", "a2", "a3"] {
        john.send_raw(json!({"type": "send", "room": "lobby", "id": id, "body": id}).to_string())
            .await
            .unwrap();
    }
    let (limited, _) = john
        .wait_for(WAIT, "rate_limited", |f| {
            is_error(f, ErrorCode::RateLimited)
        })
        .await
        .unwrap();
    let ServerFrame::Error {
        reference, message, ..
    } = limited
    else {
        unreachable!()
    };
    assert_eq!(
        reference.as_deref(),
        Some("a3"),
        "the refused send is named"
    );
    assert!(message.contains("retry it with the same id"), "{message}");

    // Lucy got the two sends that went through, and her own send is not limited by John's.
    let mut bodies = Vec::new();
    while bodies.len() < 2 {
        if let ServerFrame::Message(m) = lucy.next_frame(WAIT).await.unwrap() {
            bodies.push(m.body.as_str().to_owned());
        }
    }
    assert_eq!(bodies, ["a1", "a2"]);
    lucy.send(&room("lobby"), "mine").await.unwrap();
    lucy.wait_for(WAIT, "ack", |f| matches!(f, ServerFrame::Ack { .. }))
        .await
        .unwrap();
    gateway
        .wait_for_metrics(&[r#"chorus_gateway_requests_limited_total{limit="send_rate"} 1"#])
        .await;
}

#[tokio::test]
async fn over_the_join_rate_a_client_is_told_which_join_was_ignored() {
    let gateway = Gateway::start(|settings| {
        settings.clients.joins.per_sec = 1;
        settings.clients.joins.burst = 2;
    })
    .await;
    let mut client = Client::connect(&gateway.user_url("john")).await.unwrap();
    assert!(matches!(
        join(&mut client, "r1").await,
        ServerFrame::Joined { .. }
    ));
    assert!(matches!(
        join(&mut client, "r2").await,
        ServerFrame::Joined { .. }
    ));
    let refused = join(&mut client, "r3").await;
    let ServerFrame::Error { code, message, .. } = refused else {
        panic!("{refused:?}")
    };
    assert_eq!(code, ErrorCode::RateLimited);
    assert!(message.contains("r3"), "{message}");
}

#[tokio::test]
async fn a_full_gateway_closes_one_more_connection_with_the_code_that_says_so() {
    let gateway = Gateway::start(|settings| settings.clients.max_connections = 2).await;
    let mut first = Client::connect(&gateway.user_url("a")).await.unwrap();
    let _second = Client::connect(&gateway.user_url("b")).await.unwrap();
    let mut third = Client::connect(&gateway.user_url("c")).await.unwrap();
    match third.recv_timeout(WAIT).await.unwrap() {
        Some(Received::Closed { code, reason }) => {
            assert_eq!(code, close::GATEWAY_FULL);
            assert!(reason.contains("full"), "{reason}");
        }
        other => panic!("expected a close, got {other:?}"),
    }
    assert!(matches!(
        join(&mut first, "lobby").await,
        ServerFrame::Joined { .. }
    ));
    // A slot frees when a connection ends.
    first.close().await.unwrap();
    gateway
        .wait_for_metrics(&["chorus_gateway_connections 1"])
        .await;
    let mut fourth = Client::connect(&gateway.user_url("d")).await.unwrap();
    assert!(matches!(
        join(&mut fourth, "lobby").await,
        ServerFrame::Joined { .. }
    ));
}

#[tokio::test]
async fn a_silent_client_is_closed_and_one_that_answers_pings_is_not() {
    let gateway = Gateway::start(|settings| {
        settings.clients.ping_interval = Duration::from_millis(100);
        settings.clients.idle_timeout = Duration::from_millis(300);
    })
    .await;
    // A raw socket that completes the handshake, then says nothing (not even pongs).
    let mut silent = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    silent
        .write_all(upgrade_request("silent").as_bytes())
        .await
        .unwrap();
    let mut lively = Client::connect(&gateway.user_url("lively")).await.unwrap();
    let idle = r#"chorus_gateway_closed_total{reason="idle"} 1"#;
    // The lively client reads (and so answers pings) while the silent one times out.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !gateway.metrics().await.lines().any(|l| l == idle) {
        assert!(tokio::time::Instant::now() < deadline, "nobody timed out");
        assert_eq!(
            lively
                .recv_timeout(Duration::from_millis(50))
                .await
                .unwrap(),
            None
        );
    }
    // Two more idle timeouts of reading: still open.
    assert_eq!(
        lively
            .recv_timeout(Duration::from_millis(700))
            .await
            .unwrap(),
        None
    );
    assert!(matches!(
        join(&mut lively, "lobby").await,
        ServerFrame::Joined { .. }
    ));
    // The silent socket got the handshake, pings, and a close frame with the idle code.
    let mut bytes = Vec::new();
    tokio::time::timeout(WAIT, silent.read_to_end(&mut bytes))
        .await
        .expect("the gateway closes the socket")
        .unwrap();
    assert!(bytes.starts_with(b"HTTP/1.1 101"));
    let [high, low] = close::IDLE_TIMEOUT.to_be_bytes();
    assert!(
        bytes
            .windows(4)
            .any(|w| w[0] == 0x88 && w[2] == high && w[3] == low),
        "no close frame with code {}",
        close::IDLE_TIMEOUT
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_does_not_delay_the_others() {
    let gateway = Gateway::start(|settings| {
        settings.clients.send_queue = 64;
        settings.clients.send_queue_bytes = 512 * 1024;
    })
    .await;
    let lobby = room("lobby");
    // The stalled client: a tiny receive buffer, joins, then reads nothing.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(gateway.addr).await.unwrap();
    let (mut stalled, _) = tokio_tungstenite::client_async(gateway.user_url("stalled"), stream)
        .await
        .unwrap();
    futures_util::SinkExt::send(
        &mut stalled,
        tungstenite::Message::text(r#"{"type":"join","room":"lobby"}"#),
    )
    .await
    .unwrap();
    let mut readers = Vec::new();
    for name in ["john", "lucy"] {
        let mut client = Client::connect(&gateway.user_url(name)).await.unwrap();
        join(&mut client, "lobby").await;
        readers.push(client);
    }
    gateway
        .wait_for_metrics(&[r#"chorus_gateway_room_changes_total{kind="join"} 3"#])
        .await;

    // Far more than the stalled socket's kernel buffers and queue hold: 400 × 16 KiB.
    const MESSAGES: u64 = 400;
    let events = gateway
        .log
        .store(&lobby, (0..MESSAGES).map(|i| format!("{i:0>16384}")));
    let feeder = {
        let log = std::sync::Arc::clone(&gateway.log);
        tokio::spawn(async move {
            for chunk in events.chunks(4) {
                log.deliver(chunk.to_vec()).await;
            }
        })
    };
    // Everyone who reads gets everything, in order, while the stalled client reads nothing.
    let readers: Vec<_> = readers
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                for seq in 1..=MESSAGES {
                    match client.next_frame(WAIT).await.unwrap() {
                        ServerFrame::Message(m) => assert_eq!(m.seq, Seq(seq)),
                        other => panic!("unexpected {other:?}"),
                    }
                }
            })
        })
        .collect();
    for reader in readers {
        reader.await.unwrap();
    }
    feeder.await.unwrap();
    gateway
        .wait_for_metrics(&["chorus_gateway_slow_consumers_total 1"])
        .await;

    // When the stalled client reads at last: a gap-free prefix, then the resume code.
    let mut next = 1;
    let code = loop {
        match stalled.next().await {
            Some(Ok(tungstenite::Message::Text(text))) => {
                let frame: ServerFrame = serde_json::from_str(text.as_str()).unwrap();
                if let ServerFrame::Message(m) = frame {
                    assert_eq!(m.seq, Seq(next), "no gap before the close");
                    next += 1;
                }
            }
            Some(Ok(tungstenite::Message::Close(Some(frame)))) => break u16::from(frame.code),
            Some(Ok(_)) => continue,
            other => panic!("expected frames then a close, got {other:?}"),
        }
    };
    assert_eq!(code, close::SLOW_CONSUMER);
    assert!(next - 1 < MESSAGES, "the stalled client was cut off early");
}

#[tokio::test]
async fn a_client_that_trickles_its_request_headers_is_cut_off() {
    let gateway =
        Gateway::start(|settings| settings.header_read_timeout = Duration::from_millis(200)).await;
    let mut slow = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    slow.write_all(b"GET /ws?user=slow HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    // Never finishes its headers: the gateway hangs up (instead of holding the socket forever).
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, slow.read_to_end(&mut answer))
        .await
        .expect("the gateway closes the connection")
        .unwrap();
    // Others are served meanwhile and after.
    let mut client = Client::connect(&gateway.user_url("john")).await.unwrap();
    assert!(matches!(
        join(&mut client, "lobby").await,
        ServerFrame::Joined { .. }
    ));
}

#[tokio::test]
async fn tokens_and_query_strings_never_reach_the_logs() {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    // Every level of the server side; this test's own clients (which do send the token) are
    // left out.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "trace,tungstenite::handshake::client=off,reqwest=off,hyper_util::client=off",
        ))
        .with_writer(move || writer.clone())
        .init();
    let gateway = token_gateway(|_| {}).await;
    let good = token(SECRET, "john", &["lobby"], now() + 600);
    let forged = token(
        b"a forger's secret, long enough to be used",
        "eve",
        &["*"],
        now() + 600,
    );
    let expired = token(SECRET, "john", &["*"], now() - 600);
    let mut by_protocol = Client::connect_with_token(&gateway.ws_url(), Some(&good))
        .await
        .unwrap();
    join(&mut by_protocol, "lobby").await;
    let mut by_query = Client::connect(&format!("{}?token={good}", gateway.ws_url()))
        .await
        .unwrap();
    join(&mut by_query, "lobby").await;
    for refused in [&forged, &expired] {
        let url = format!(
            "{}?token={refused}&secret=query-string-marker",
            gateway.ws_url()
        );
        assert!(Client::connect(&url).await.is_err());
        assert!(
            Client::connect_with_token(&gateway.ws_url(), Some(refused))
                .await
                .is_err()
        );
    }
    by_protocol.close().await.unwrap();
    by_query.close().await.unwrap();
    gateway.stop().await;

    let logs = logs.text();
    assert!(
        logs.contains("WebSocket request refused"),
        "the refusals are logged:\n{logs}"
    );
    for secret in [&good, &forged, &expired] {
        for part in secret.split('.') {
            assert!(
                !logs.contains(part),
                "a token part reached the logs:\n{logs}"
            );
        }
    }
    assert!(!logs.contains("query-string-marker"), "{logs}");
}

/// A raw client on a socket with a tiny receive buffer that joins `room` with `since` and then
/// reads nothing.
async fn stalled_joiner(
    gateway: &Gateway,
    url: String,
    room: &str,
    since: u64,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(gateway.addr).await.unwrap();
    let (mut stalled, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    futures_util::SinkExt::send(
        &mut stalled,
        tungstenite::Message::text(
            json!({"type": "join", "room": room, "since": since}).to_string(),
        ),
    )
    .await
    .unwrap();
    stalled
}

#[tokio::test]
async fn a_replay_into_a_client_that_does_not_read_stays_bounded_and_is_closed() {
    let gateway = Gateway::start(|settings| {
        settings.clients.send_queue = 64;
        settings.clients.send_queue_bytes = 64 * 1024;
        settings.rooms.replay_stall = Duration::from_millis(300);
    })
    .await;
    // 16 MiB of history: far more than the queue, a page and the socket's buffers hold.
    const STORED: u64 = 1000;
    gateway
        .log
        .store(&room("lobby"), (0..STORED).map(|i| format!("{i:0>16384}")));
    let _stalled = stalled_joiner(&gateway, gateway.user_url("stalled"), "lobby", 0).await;
    // The replay stalls, the connection is closed as too slow, and nothing of it stays behind.
    gateway
        .wait_for_metrics(&[
            "chorus_gateway_slow_consumers_total 1",
            "chorus_gateway_room_members 0",
            "chorus_gateway_rooms 0",
        ])
        .await;
    let replayed = metric(&gateway.metrics().await, "chorus_gateway_replayed_total");
    assert!(
        replayed < STORED / 2,
        "{replayed} of {STORED} messages were taken from history for a client that reads nothing"
    );
    // The others are served as usual.
    let mut lucy = Client::connect(&gateway.user_url("lucy")).await.unwrap();
    assert!(matches!(
        join(&mut lucy, "lobby").await,
        ServerFrame::Joined {
            seq: Seq(STORED),
            ..
        }
    ));
}

#[tokio::test]
async fn a_token_that_expires_during_a_stalled_replay_still_closes_the_connection() {
    let gateway = token_gateway(|settings| {
        settings.clients.send_queue_bytes = 64 * 1024;
        settings.rooms.replay_stall = Duration::from_secs(600); // only the expiry can end it
        settings.clients.ping_interval = Duration::from_millis(100);
    })
    .await;
    gateway
        .log
        .store(&room("lobby"), (0..1000).map(|i| format!("{i:0>16384}")));
    let soon = token(SECRET, "john", &["lobby"], now() + 2);
    let url = format!("{}?token={soon}", gateway.ws_url());
    let _stalled = stalled_joiner(&gateway, url, "lobby", 0).await;
    gateway
        .wait_for_metrics(&[
            r#"chorus_gateway_closed_total{reason="token_expired"} 1"#,
            "chorus_gateway_room_members 0",
            "chorus_gateway_rooms 0",
        ])
        .await;
}

#[tokio::test]
async fn a_notification_whose_certificate_cannot_be_fetched_is_answered_with_a_retryable_5xx() {
    // Verification on; the certificate source (a loopback port nobody listens on) is down.
    let gateway =
        Gateway::start(|settings| settings.bus.verify = Some(VerifySettings::default())).await;
    let mut envelope = sns::notification(TOPIC, "{\"v\":1,\"events\":[]}");
    envelope.signature_version = Some("2".into());
    envelope.signature = Some("AAAA".into());
    envelope.signing_cert_url =
        Some("https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0000.pem".into());
    let response = reqwest::Client::new()
        .post(format!("http://{}/sns", gateway.addr))
        .body(sns::to_json(&envelope))
        .send()
        .await
        .unwrap();
    // SNS retries 5xx and gives up on 4xx: a 403 here would lose a genuine message.
    assert_eq!(response.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    gateway
        .wait_for_metrics(&[r#"chorus_gateway_bus_rejected_total{reason="cert_unavailable"} 1"#])
        .await;
}

/// Sends a `history` request and returns the answer.
async fn history(client: &mut Client, request: serde_json::Value) -> ServerFrame {
    client.send_raw(request.to_string()).await.unwrap();
    client.next_frame(WAIT).await.unwrap()
}

/// The id and seqs of a `history` frame.
fn page(frame: &ServerFrame) -> (String, Vec<u64>) {
    match frame {
        ServerFrame::History { id, messages, .. } => {
            (id.to_string(), messages.iter().map(|m| m.seq.0).collect())
        }
        other => panic!("expected a history frame, got {other:?}"),
    }
}

#[tokio::test]
async fn scrollback_pages_backwards_through_a_rooms_history_that_the_token_allows() {
    let gateway = token_gateway(|settings| settings.clients.send_queue_bytes = 128 * 1024).await;
    let stored = gateway
        .log
        .store(&room("lobby"), (1..=30).map(|i| format!("message {i}")));
    gateway
        .log
        .store(&room("admin"), ["not for john".to_owned()]);
    // 16 KiB messages: a page of them is cut to half the queue's bytes.
    gateway
        .log
        .store(&room("big"), (1..=10).map(|i| format!("{i:0>16384}")));
    let john = token(SECRET, "john", &["lobby", "big"], now() + 600);
    let mut client = Client::connect_with_token(&gateway.ws_url(), Some(&john))
        .await
        .unwrap();

    // No join needed: the newest first, then page on from the oldest received.
    let newest = history(
        &mut client,
        json!({"type": "history", "room": "lobby", "id": "h1", "limit": 10}),
    )
    .await;
    assert_eq!(page(&newest), ("h1".into(), (21..=30).collect()));
    let ServerFrame::History {
        messages, room: r, ..
    } = &newest
    else {
        unreachable!()
    };
    assert_eq!(r.as_str(), "lobby");
    assert_eq!(messages, &stored[20..30], "the stored messages, whole");
    let earlier = history(
        &mut client,
        json!({"type": "history", "room": "lobby", "id": "h2", "before": 21, "limit": 10}),
    )
    .await;
    assert_eq!(page(&earlier), ("h2".into(), (11..=20).collect()));
    let rest = history(
        &mut client,
        json!({"type": "history", "room": "lobby", "id": "h3", "before": 11}),
    )
    .await;
    assert_eq!(
        page(&rest),
        ("h3".into(), (1..=10).collect()),
        "default limit 50"
    );
    let none = history(
        &mut client,
        json!({"type": "history", "room": "lobby", "id": "h4", "before": 1}),
    )
    .await;
    assert_eq!(page(&none), ("h4".into(), vec![]));

    // A room the token does not allow, and a limit out of range: refused, naming the request.
    let refused = history(
        &mut client,
        json!({"type": "history", "room": "admin", "id": "h5"}),
    )
    .await;
    assert!(
        matches!(&refused, ServerFrame::Error { code: ErrorCode::Forbidden, reference: Some(r), room: Some(room), .. }
            if r == "h5" && room.as_str() == "admin"),
        "{refused:?}"
    );
    let refused = history(
        &mut client,
        json!({"type": "history", "room": "lobby", "id": "h6", "limit": 101}),
    )
    .await;
    assert!(
        matches!(&refused, ServerFrame::Error { code: ErrorCode::BadFrame, reference: Some(r), message, .. }
            if r == "h6" && message.contains("limit must be 1 to 100")),
        "{refused:?}"
    );

    // Large messages: the page ends right below `before`, cut to what fits half the queue.
    let cut = history(
        &mut client,
        json!({"type": "history", "room": "big", "id": "h7", "limit": 100}),
    )
    .await;
    assert_eq!(page(&cut), ("h7".into(), vec![8, 9, 10]));
    let next = history(
        &mut client,
        json!({"type": "history", "room": "big", "id": "h8", "before": 8, "limit": 100}),
    )
    .await;
    assert_eq!(page(&next), ("h8".into(), vec![5, 6, 7]));

    // The connection joined nothing by reading history, and it is still open.
    assert!(matches!(
        join(&mut client, "lobby").await,
        ServerFrame::Joined { seq: Seq(30), .. }
    ));
    gateway
        .wait_for_metrics(&[
            "chorus_gateway_history_requests_total{result=\"served\"} 6",
            "chorus_gateway_requests_limited_total{limit=\"room_not_allowed\"} 1",
            "chorus_gateway_room_members 1",
        ])
        .await;
}
