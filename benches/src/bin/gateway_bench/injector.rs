//! The injector: sends a step's messages on a fixed schedule into one server's ingress, from a
//! thread of its own (so its timers are not queued behind thousands of client tasks).
//!
//! - Gateway: one keep-alive HTTP/1.1 connection to `/sns`, requests pipelined (each written
//!   when due, without waiting for the previous answer, as SNS does not wait either); a reader
//!   counts the answers, and every one must be `200`.
//! - Baseline: one TCP connection, a line per frame.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use chorus_protocol::{
    Body, BusPayload, ClientMsgId, MessageEvent, RoomId, Seq, ServerFrame, UserId,
};
use chorus_testkit::sns;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};

use crate::ServerKind;
use crate::wsclient;

/// `ts` of every injected message (the gateway passes it through).
const TS: &str = "2026-11-29T10:00:00.000Z";

/// One step's messages: `messages` at `rate` per second into room `bench-<step>`, seqs from 1,
/// each body `<step>:<scheduled send time in µs since the epoch>:` padded to `body_bytes`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Job {
    pub(crate) step: u32,
    pub(crate) rate: u32,
    pub(crate) messages: u64,
    pub(crate) body_bytes: usize,
}

/// How a job went.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Injected {
    /// How far behind its schedule the last message was written.
    pub(crate) late_ms: f64,
}

type Request = (Job, oneshot::Sender<anyhow::Result<Injected>>);

pub(crate) struct Injector {
    jobs: mpsc::Sender<Request>,
}

impl Injector {
    /// Connects to `addr` (the gateway's HTTP address or the baseline's ingress) from a new
    /// thread; the thread ends when the injector is dropped.
    pub(crate) async fn start(kind: ServerKind, addr: SocketAddr) -> anyhow::Result<Injector> {
        let (jobs, mut rx) = mpsc::channel::<Request>(1);
        let (connected_tx, connected) = oneshot::channel::<anyhow::Result<()>>();
        std::thread::Builder::new()
            .name(format!("inject-{kind}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = connected_tx.send(Err(e.into()));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let mut ingress = match Ingress::connect(kind, addr).await {
                        Ok(ingress) => {
                            let _ = connected_tx.send(Ok(()));
                            ingress
                        }
                        Err(e) => {
                            let _ = connected_tx.send(Err(e));
                            return;
                        }
                    };
                    while let Some((job, reply)) = rx.recv().await {
                        let _ = reply.send(ingress.run(job).await);
                    }
                });
            })?;
        connected.await.context("the injector thread ended")??;
        Ok(Injector { jobs })
    }

    pub(crate) async fn run(&self, job: Job) -> anyhow::Result<Injected> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send((job, reply))
            .await
            .map_err(|_| anyhow::anyhow!("the injector thread ended"))?;
        answer.await.context("the injector thread ended")?
    }
}

enum Ingress {
    Gateway {
        writer: OwnedWriteHalf,
        host: SocketAddr,
        sent: u64,
        answers: Arc<Answers>,
    },
    Baseline(TcpStream),
}

/// Answers to the pipelined POSTs, counted by a reader task.
#[derive(Default)]
struct Answers {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl Ingress {
    async fn connect(kind: ServerKind, addr: SocketAddr) -> anyhow::Result<Ingress> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting the injector to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(match kind {
            ServerKind::Gateway => {
                let (reader, writer) = stream.into_split();
                let answers = Arc::new(Answers::default());
                tokio::spawn(read_answers(reader, Arc::clone(&answers)));
                Ingress::Gateway {
                    writer,
                    host: addr,
                    sent: 0,
                    answers,
                }
            }
            ServerKind::Baseline => Ingress::Baseline(stream),
        })
    }

    async fn run(&mut self, job: Job) -> anyhow::Result<Injected> {
        let room = RoomId::parse(format!("bench-{}", job.step))?;
        let sender = UserId::parse("bench")?;
        let pad = "x".repeat(job.body_bytes.saturating_sub(28));
        let lead = Duration::from_millis(20);
        let start = tokio::time::Instant::now() + lead;
        let start_micros = (SystemTime::now() + lead)
            .duration_since(UNIX_EPOCH)?
            .as_micros() as u64;
        let interval_micros = 1e6 / f64::from(job.rate);
        for i in 0..job.messages {
            let offset = (i as f64 * interval_micros) as u64;
            tokio::time::sleep_until(start + Duration::from_micros(offset)).await;
            let event = MessageEvent {
                room: room.clone(),
                seq: Seq(i + 1),
                id: ClientMsgId::parse(format!("m{}", i + 1))?,
                sender: sender.clone(),
                body: Body::parse(format!("{}:{}:{pad}", job.step, start_micros + offset))?,
                ts: TS.to_owned(),
            };
            self.send(event).await?;
        }
        let late_ms = start.elapsed().as_secs_f64() * 1000.0
            - (job.messages as f64 - 1.0) * interval_micros / 1000.0;
        if let Ingress::Gateway { sent, answers, .. } = self {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let (ok, failed) = (
                    answers.ok.load(Ordering::SeqCst),
                    answers.failed.load(Ordering::SeqCst),
                );
                if failed > 0 {
                    bail!("/sns refused {failed} notifications");
                }
                if ok >= *sent {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    bail!("/sns answered {ok} of {sent} notifications within 10 s");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        Ok(Injected { late_ms })
    }

    async fn send(&mut self, event: MessageEvent) -> anyhow::Result<()> {
        match self {
            Ingress::Gateway {
                writer, host, sent, ..
            } => {
                let message_id = format!("{}-{}", event.room, event.seq);
                let envelope = sns::to_json(&sns::notification_at(
                    crate::gateway::TOPIC_ARN,
                    &BusPayload::new(vec![event]).to_json(),
                    message_id,
                    TS.to_owned(),
                ));
                let request = format!(
                    "POST /sns HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/plain; charset=UTF-8\r\n\
                     Content-Length: {}\r\n\r\n{envelope}",
                    envelope.len()
                );
                writer.write_all(request.as_bytes()).await?;
                *sent += 1;
            }
            Ingress::Baseline(stream) => {
                let mut line = ServerFrame::Message(event).to_json();
                line.push('\n');
                stream.write_all(line.as_bytes()).await?;
            }
        }
        Ok(())
    }
}

/// Reads HTTP/1.1 responses (status line, headers, `Content-Length` body) and counts them.
async fn read_answers(mut reader: tokio::net::tcp::OwnedReadHalf, answers: Arc<Answers>) {
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                // The connection is gone: whatever is still owed will never come.
                answers.failed.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        while let Some(end) = wsclient::find(&buf[at..], b"\r\n\r\n") {
            let head = &buf[at..at + end];
            let body_len = content_length(head).unwrap_or(0);
            let total = end + 4 + body_len;
            if buf.len() - at < total {
                break;
            }
            if head.starts_with(b"HTTP/1.1 200") {
                answers.ok.fetch_add(1, Ordering::SeqCst);
            } else {
                answers.failed.fetch_add(1, Ordering::SeqCst);
            }
            at += total;
        }
        buf.drain(..at);
    }
}

fn content_length(head: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(head).ok()?;
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_is_read_from_any_case() {
        assert_eq!(
            content_length(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ndate: x"),
            Some(2)
        );
        assert_eq!(content_length(b"HTTP/1.1 200 OK"), None);
    }
}
