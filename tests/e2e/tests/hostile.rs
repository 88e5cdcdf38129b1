//! Hostile clients against a running gateway. For each: the expected error frame or close, the
//! gateway still serves a well-behaved pair of clients afterwards, and nothing panics.

use std::time::Duration;

use chorus_client::{Client, Received};
use chorus_e2e::{Service, Stack};
use chorus_protocol::{ErrorCode, RoomId, ServerFrame};
use chorus_testkit::gateway::upgrade_request;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);

fn lobby() -> RoomId {
    RoomId::parse("lobby").unwrap()
}

/// John and Lucy, joined to lobby: the gateway still serves them if John's message reaches Lucy.
struct Witnesses {
    john: Client,
    lucy: Client,
    n: u32,
}

impl Witnesses {
    async fn new(gateway: &Service) -> Self {
        let mut john = Client::connect(&gateway.ws("john")).await.unwrap();
        let mut lucy = Client::connect(&gateway.ws("lucy")).await.unwrap();
        for client in [&mut john, &mut lucy] {
            client.join(&lobby(), None).await.unwrap();
            client
                .wait_for(WAIT, "joined", |f| matches!(f, ServerFrame::Joined { .. }))
                .await
                .unwrap();
        }
        Witnesses { john, lucy, n: 0 }
    }

    async fn still_served(&mut self, after: &str) {
        self.n += 1;
        let body = format!("still here after {after} ({})", self.n);
        self.john.send(&lobby(), &body).await.unwrap();
        self.lucy
            .wait_for(
                WAIT,
                &format!("the witness message after {after}"),
                |f| matches!(f, ServerFrame::Message(m) if m.body.as_str() == body),
            )
            .await
            .unwrap_or_else(|e| panic!("after {after} the gateway no longer serves others: {e}"));
    }
}

async fn expect_error(client: &mut Client, code: ErrorCode) {
    match client.next_frame(WAIT).await.unwrap() {
        ServerFrame::Error {
            code: got, message, ..
        } => {
            assert_eq!(got, code, "{message}");
            assert!(!message.is_empty());
        }
        other => panic!("expected an {code:?} error, got {other:?}"),
    }
}

/// A WebSocket upgraded by hand, for frames no client library will send.
async fn raw_upgrade(gateway: &Service) -> TcpStream {
    let mut socket = TcpStream::connect(gateway.addr).await.unwrap();
    socket
        .write_all(upgrade_request("raw").as_bytes())
        .await
        .unwrap();
    let mut response = Vec::new();
    let mut byte = [0u8; 1];
    while !response.ends_with(b"\r\n\r\n") {
        socket.read_exact(&mut byte).await.unwrap();
        response.push(byte[0]);
    }
    assert!(
        response.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    socket
}

/// A masked client frame header (FIN set) for a payload of `len` bytes, with a zero mask.
fn frame_header(opcode: u8, len: u64) -> Vec<u8> {
    let mut header = vec![0x80 | opcode];
    match len {
        0..=125 => header.push(0x80 | len as u8),
        126..=65535 => {
            header.push(0x80 | 126);
            header.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            header.push(0x80 | 127);
            header.extend_from_slice(&len.to_be_bytes());
        }
    }
    header.extend_from_slice(&[0, 0, 0, 0]); // mask: payload bytes go out as they are
    header
}

/// Reads until the gateway closes: returns the close code it sent, if it sent a close frame.
async fn close_code(socket: &mut TcpStream) -> Option<u16> {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, socket.read(&mut buf)).await {
            Err(_) => panic!("the gateway kept the connection open"),
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
    // Server frames are unmasked: a close frame is 0x88, a length, then the code.
    received
        .windows(4)
        .find(|w| w[0] == 0x88 && w[1] >= 2)
        .map(|w| u16::from_be_bytes([w[2], w[3]]))
}

#[tokio::test]
async fn hostile_clients_get_clear_answers_and_never_hurt_others() {
    let stack = Stack::start(1).await.unwrap();
    let gateway = &stack.gateways[0];
    let mut witnesses = Witnesses::new(gateway).await;

    // Binary frames: an error frame, and the connection stays usable.
    let mut eve = Client::connect(&gateway.ws("eve")).await.unwrap();
    eve.send_message(Message::binary(vec![1u8, 2, 3]))
        .await
        .unwrap();
    expect_error(&mut eve, ErrorCode::BadFrame).await;
    witnesses.still_served("a binary frame").await;

    // Unknown types, missing fields, sends to rooms not joined: error frames.
    eve.send_raw(r#"{"type":"subscribe","room":"lobby"}"#)
        .await
        .unwrap();
    expect_error(&mut eve, ErrorCode::UnknownType).await;
    eve.send_raw(r#"{"type":"send","room":"lobby"}"#)
        .await
        .unwrap();
    expect_error(&mut eve, ErrorCode::BadFrame).await;
    eve.send_raw(r#"{"type":"send","room":"elsewhere","id":"x1","body":"hi"}"#)
        .await
        .unwrap();
    expect_error(&mut eve, ErrorCode::NotJoined).await;
    witnesses
        .still_served("unknown types and missing fields")
        .await;

    // A flood of joins: the first 100 rooms, then a limit error for each one more.
    for i in 0..110 {
        eve.send_raw(format!(r#"{{"type":"join","room":"flood-{i}"}}"#))
            .await
            .unwrap();
    }
    let (mut joined, mut refused) = (0, 0);
    while joined + refused < 110 {
        match eve.next_frame(WAIT).await.unwrap() {
            ServerFrame::Joined { .. } => joined += 1,
            ServerFrame::Error {
                code: ErrorCode::LimitExceeded,
                ..
            } => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((joined, refused), (100, 10));
    witnesses.still_served("a flood of joins").await;

    // Invalid UTF-8 in a text frame: the connection is closed (1007 if a code is sent).
    let mut raw = raw_upgrade(gateway).await;
    let mut frame = frame_header(0x1, 2);
    frame.extend_from_slice(&[0xff, 0xfe]);
    raw.write_all(&frame).await.unwrap();
    let code = close_code(&mut raw).await;
    assert!(
        code.is_none() || code == Some(1007),
        "invalid UTF-8 closed with {code:?}"
    );
    witnesses.still_served("invalid UTF-8").await;

    // A huge frame (over the 64 KiB limit): refused from its header, closed (1009 if a code is sent).
    let mut raw = raw_upgrade(gateway).await;
    raw.write_all(&frame_header(0x1, 10 * 1024 * 1024))
        .await
        .unwrap();
    let _ = raw.write_all(&vec![b'x'; 64 * 1024]).await;
    let code = close_code(&mut raw).await;
    assert!(
        code.is_none() || code == Some(1009),
        "a huge frame closed with {code:?}"
    );
    witnesses.still_served("a huge frame").await;

    // A client that closes mid-frame: its connection is cleaned up.
    let mut raw = raw_upgrade(gateway).await;
    let mut partial = frame_header(0x1, 1000);
    partial.extend_from_slice(b"{\"type\":\"join\"");
    raw.write_all(&partial).await.unwrap();
    drop(raw);
    witnesses.still_served("a close mid-frame").await;

    // A half-open TCP connection and a slowloris upgrade request, left hanging meanwhile.
    let _half_open = TcpStream::connect(gateway.addr).await.unwrap();
    let mut slow = TcpStream::connect(gateway.addr).await.unwrap();
    slow.write_all(b"GET /ws?user=slow HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    for _ in 0..5 {
        slow.write_all(b"X-Slow: 1\r\n").await.unwrap();
        witnesses
            .still_served("a slowloris request in progress")
            .await;
    }

    // Garbage HTTP on the WebSocket port: a 400, and the gateway carries on.
    let mut garbage = TcpStream::connect(gateway.addr).await.unwrap();
    garbage
        .write_all(b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, garbage.read_to_end(&mut answer)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    witnesses.still_served("garbage HTTP").await;

    // The hostile connections are gone from the gauge (only the witnesses and eve remain).
    gateway
        .wait_for_metrics(&["chorus_gateway_connections 3"])
        .await;
    assert!(
        !gateway.log().contains("panicked"),
        "the gateway panicked:\n{}",
        gateway.log()
    );
    // Eve is still connected and usable after all her own mistakes.
    eve.send_raw(r#"{"type":"leave","room":"flood-0"}"#)
        .await
        .unwrap();
    assert!(matches!(
        eve.recv_timeout(WAIT).await.unwrap(),
        Some(Received::Frame(ServerFrame::Left { .. }))
    ));
}
