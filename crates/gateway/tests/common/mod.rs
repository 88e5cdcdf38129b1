//! An in-process gateway for tests of what one gateway does with its clients, without the
//! emulator: an in-memory message log whose appends come back over the gateway's own `/sns`
//! (as SNS would deliver them), and subscriptions that are confirmed at once. Signature checks
//! are off, except in [`Gateway::start_signed`], whose log signs every notification with a key
//! and certificate generated for the run and served on loopback.

#![allow(dead_code)] // Each test binary uses its own part of the harness.

pub(crate) mod sns;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chorus_gateway::bus::CertSource;
use chorus_gateway::settings::VerifySettings;
use chorus_gateway::test_support::ConfirmedAtOnce;
use chorus_gateway::writer_client::{LogError, MessageLog};
use chorus_gateway::{App, Deps, Settings};
use chorus_protocol::api::{HistoryPage, SendRequest, SendResponse};
use chorus_protocol::{BusPayload, MessageEvent, RoomId, Seq};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub(crate) const TOPIC: &str = "arn:aws:sns:us-east-1:000000000000:chorus-test";
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// The writer's log in memory. Every append is also delivered to the gateway's `/sns`.
#[derive(Default)]
pub(crate) struct MemoryLog {
    rooms: Mutex<HashMap<RoomId, Vec<MessageEvent>>>,
    sns_url: OnceLock<String>,
    /// Signs notifications (SignatureVersion 2) when set.
    signed: std::sync::atomic::AtomicBool,
    http: reqwest::Client,
}

/// The certificate URL the signed harness names; its path is served by [`sns::cert_server`].
pub(crate) fn cert_url() -> String {
    format!("https://sns.us-east-1.amazonaws.com{}", sns::CERT_PATH)
}

/// An SNS envelope as JSON, signed (SignatureVersion 2) with the run's key when `signed`.
pub(crate) fn envelope(message: &str, signed: bool) -> serde_json::Value {
    let timestamp = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let mut envelope = serde_json::json!({
        "Type": "Notification",
        "MessageId": uuid(),
        "TopicArn": TOPIC,
        "Message": message,
        "Timestamp": timestamp,
    });
    if signed {
        let parsed: chorus_gateway::bus::SnsEnvelope =
            serde_json::from_value(envelope.clone()).unwrap();
        let signature = sns::sign(parsed, "2").signature.unwrap();
        envelope["SignatureVersion"] = "2".into();
        envelope["Signature"] = signature.into();
        envelope["SigningCertURL"] = cert_url().into();
    }
    envelope
}

impl MemoryLog {
    /// Delivers events to the gateway as one SNS notification.
    pub(crate) async fn deliver(&self, events: Vec<MessageEvent>) {
        let url = self.sns_url.get().expect("gateway started").clone();
        let message = serde_json::to_string(&BusPayload::new(events)).unwrap();
        let envelope = envelope(
            &message,
            self.signed.load(std::sync::atomic::Ordering::Relaxed),
        );
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

    async fn scrollback(
        &self,
        room: &RoomId,
        before: Option<Seq>,
        limit: u32,
    ) -> Result<HistoryPage, LogError> {
        let log = self
            .rooms
            .lock()
            .unwrap()
            .get(room)
            .cloned()
            .unwrap_or_default();
        let head = Seq(log.len() as u64);
        let below: Vec<MessageEvent> = log
            .into_iter()
            .filter(|m| before.is_none_or(|b| m.seq < b))
            .collect();
        let skip = below.len().saturating_sub(limit as usize);
        Ok(HistoryPage {
            head,
            messages: below.into_iter().skip(skip).collect(),
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
    pub(crate) async fn start(configure: impl FnOnce(&mut Settings)) -> Gateway {
        // Nothing listens at the certificate mirror: a test that switches verification on
        // never reaches out for a certificate, and sees the fetch fail.
        Self::start_with(configure, "http://127.0.0.1:9".into(), false).await
    }

    /// A gateway that verifies every SNS post, fed by a log that signs its notifications.
    pub(crate) async fn start_signed(configure: impl FnOnce(&mut Settings)) -> Gateway {
        let (certs, _fetches) = sns::cert_server().await;
        Self::start_with(
            |settings| {
                settings.bus.verify = Some(VerifySettings::default());
                configure(settings);
            },
            certs,
            true,
        )
        .await
    }

    async fn start_with(
        configure: impl FnOnce(&mut Settings),
        cert_mirror: String,
        signed: bool,
    ) -> Gateway {
        let mut settings = Settings::new(TOPIC, "http://127.0.0.1:9".parse().unwrap());
        settings.listen = "127.0.0.1:0".parse().unwrap();
        settings.bus.verify = None;
        settings.auth.dev_users = true;
        configure(&mut settings);
        let log = Arc::new(MemoryLog::default());
        log.signed
            .store(signed, std::sync::atomic::Ordering::Relaxed);
        let deps = Deps {
            log: Arc::clone(&log) as Arc<dyn MessageLog>,
            subscriptions: Arc::new(ConfirmedAtOnce {
                subscription_arn: format!("{TOPIC}:subscription"),
            }),
            certs: CertSource::Mirror {
                base: cert_mirror.parse().unwrap(),
                sign_as: None,
            },
            sqs: None,
        };
        let app = App::build(settings, deps)
            .await
            .expect("the gateway builds");
        let addr = app.local_addr().unwrap();
        log.sns_url.set(format!("http://{addr}/sns")).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            app.run_until(async {
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

/// The value of the metric line that starts with `name` (its labels included).
pub(crate) fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}
