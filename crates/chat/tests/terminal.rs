//! The `chorus-chat` terminal client, as a user runs it, against a scripted gateway: a message
//! posted while it is reconnecting shows up once, and a line typed just before the end of input
//! is delivered before it exits.

use std::process::Stdio;

use chorus_protocol::RoomId;
use chorus_testkit::fake_gateway::{FakeGateway, WAIT};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{ChildStderr, ChildStdout, Command};

/// Reads lines until one contains `want`; returns the lines read, that one last.
async fn read_until<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut Lines<R>,
    want: &str,
) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no line with {want:?} within {WAIT:?}; saw {seen:?}"))
            .expect("readable output")
            .unwrap_or_else(|| panic!("output ended before {want:?}; saw {seen:?}"));
        let done = line.contains(want);
        seen.push(line);
        if done {
            return seen;
        }
    }
}

#[tokio::test]
async fn a_message_posted_while_the_client_reconnects_is_shown_once() {
    let lobby = RoomId::parse("lobby").unwrap();
    let fake = FakeGateway::start().await;
    fake.post(&lobby, &["one", "two", "three", "four", "five"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_chorus-chat"))
        .args(["--url", &fake.url, "--room", "lobby", "--user", "tester"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout: Lines<BufReader<ChildStdout>> =
        BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr: Lines<BufReader<ChildStderr>> =
        BufReader::new(child.stderr.take().unwrap()).lines();
    read_until(&mut stderr, "joined lobby at seq 5").await;

    // The gateway drains; seq 6 is posted before the client is back.
    fake.close_all_then_post(4000, &lobby, &["six"]);
    read_until(&mut stderr, "joined lobby at seq 6").await;
    fake.post(&lobby, &["seven"]);
    let mut shown = read_until(&mut stdout, "#7]").await;

    // A line typed right before the end of input is sent, and acked, before the client exits.
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"bye\n").await.unwrap();
    drop(stdin);
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("the client exits once its send is acked")
        .unwrap();
    assert!(status.success(), "{status}");
    while let Some(line) = stdout.next_line().await.unwrap() {
        shown.push(line);
    }
    // Its own message may or may not come back before the exit (the ack ends the wait).
    shown.retain(|line| line != "[lobby #8] client: bye");
    assert_eq!(
        shown,
        ["[lobby #6] someone: six", "[lobby #7] someone: seven"]
    );
    let log = fake.log(&lobby);
    assert_eq!(log.len(), 8);
    assert_eq!(log[7].body.as_str(), "bye");
}
