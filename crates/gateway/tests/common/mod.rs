//! An in-process gateway for tests of what one gateway does with its clients, without the
//! emulator: an in-memory message log whose appends come back over the gateway's own `/sns`
//! (as SNS would deliver them; signature checks are off here and have their own tests), and
//! subscriptions that are confirmed at once.

#![allow(dead_code)] // Each test binary uses its own part of the harness.

pub(crate) mod sns;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chorus_gateway::bus::ConfirmedAtOnce;
use chorus_gateway::log::{LogError, MessageLog};
use chorus_gateway::verify::CertSource;
use chorus_gateway::{Config, Deps};
use chorus_protocol::api::{HistoryPage, SendRequest, SendResponse};
use chorus_protocol::{BusPayload, MessageEvent, RoomId, Seq};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub(crate) const TOPIC: &str = "arn:aws:sns:us-east-1:000000000000:chorus-test";
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// The writer's log in memory. Every append is also delivered to the gateway's `/sns`.
#[derive(Default)]
pub(crate) struct MemoryLog {
    rooms: Mutex<HashMap<RoomId, Vec<MessageEvent>>>,
    sns_url: OnceLock<String>,
    http: reqwest::Client,
}

impl MemoryLog {
    /// Delivers events to the gateway as one SNS notification.
    pub(crate) async fn deliver(&self, events: Vec<MessageEvent>) {
        let url = self.sns_url.get().expect("gateway started").clone();
        let message = serde_json::to_string(&BusPayload::new(events)).unwrap();
        let envelope = serde_json::json!({
            "Type": "Notification",
            "MessageId": uuid(),
            "TopicArn": TOPIC,
            "Message": message,
            "Timestamp": "2026-11-29T10:00:00.000Z",
        });
        let response = self
            .http
            .post(url)
            .body(envelope.to_string())
            .send()
            .await
            .expect("the gateway takes SNS posts");
        assert!(response.status().is_success(), "{}", response.status());
    }

    /// Stores `n` messages in `room` without delivering them.
    pub(crate) fn store(
        &self,
        room: &RoomId,
        bodies: impl IntoIterator<Item = String>,
    ) -> Vec<MessageEvent> {
        let mut rooms = self.rooms.lock().unwrap();
        let log = rooms.entry(room.clone()).or_default();
        bodies
            .into_iter()
            .map(|body| {
                let seq = log.len() as u64 + 1;
                let event = MessageEvent {
                    room: room.clone(),
                    seq: Seq(seq),
                    id: chorus_protocol::ClientMsgId::parse(format!("m{seq}")).unwrap(),
                    sender: chorus_protocol::UserId::parse("feeder").unwrap(),
                    body: chorus_protocol::Body::parse(body).unwrap(),
                    ts: "2026-11-29T10:00:00.000Z".into(),
                };
                log.push(event.clone());
                event
            })
            .collect()
    }
}

fn uuid() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("msg-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

#[async_trait::async_trait]
impl MessageLog for MemoryLog {
    async fn append(&self, room: &RoomId, request: &SendRequest) -> Result<SendResponse, LogError> {
        let event = {
            let mut rooms = self.rooms.lock().unwrap();
            let log = rooms.entry(room.clone()).or_default();
            if let Some(stored) = log.iter().find(|m| m.id == request.id) {
                return Ok(SendResponse {
                    seq: stored.seq,
                    ts: stored.ts.clone(),
                });
            }
            let event = MessageEvent {
                room: room.clone(),
                seq: Seq(log.len() as u64 + 1),
                id: request.id.clone(),
                sender: request.sender.clone(),
                body: request.body.clone(),
                ts: "2026-11-29T10:00:00.000Z".into(),
            };
            log.push(event.clone());
            event
        };
        let response = SendResponse {
            seq: event.seq,
            ts: event.ts.clone(),
        };
        self.deliver(vec![event]).await;
        Ok(response)
    }

    async fn history(
        &self,
        room: &RoomId,
        after: Seq,
        limit: u32,
    ) -> Result<HistoryPage, LogError> {
        let rooms = self.rooms.lock().unwrap();
        let log = rooms.get(room).cloned().unwrap_or_default();
        Ok(HistoryPage {
            head: Seq(log.len() as u64),
            messages: log
                .into_iter()
                .filter(|m| m.seq > after)
                .take(limit as usize)
                .collect(),
        })
    }
}

/// A running gateway.
pub(crate) struct Gateway {
    pub(crate) addr: SocketAddr,
    pub(crate) log: Arc<MemoryLog>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Gateway {
    /// Starts a gateway with test defaults, adjusted by `configure`, and waits until `/readyz`
    /// says it is ready.
    pub(crate) async fn start(configure: impl FnOnce(&mut Config)) -> Gateway {
        let mut config = Config::new(TOPIC, "http://127.0.0.1:9");
        config.insecure_skip_sns_verification = true;
        config.insecure_dev_users = true;
        configure(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(MemoryLog::default());
        log.sns_url.set(format!("http://{addr}/sns")).unwrap();
        let deps = Deps {
            log: Arc::clone(&log) as Arc<dyn MessageLog>,
            subscriptions: Arc::new(ConfirmedAtOnce {
                subscription_arn: format!("{TOPIC}:subscription"),
            }),
            certs: CertSource::Aws,
            sqs: None,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            chorus_gateway::run(listener, config, deps, async {
                let _ = stopped.await;
            })
            .await
            .expect("the gateway runs");
        });
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(response) = http.get(format!("http://{addr}/readyz")).send().await
                && response.status().is_success()
            {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "gateway not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Gateway {
            addr,
            log,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub(crate) fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub(crate) fn user_url(&self, user: &str) -> String {
        format!("ws://{}/ws?user={user}", self.addr)
    }

    /// The `/metrics` text.
    pub(crate) async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Drains and stops the gateway.
    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
