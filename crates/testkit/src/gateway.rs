//! A gateway in this process, with no writer and no SNS, for tests of what one gateway does with
//! its clients: [`Gateway`] feeds it from a [`BusLog`], the writer's log in memory whose
//! appends come back over the gateway's own `/sns` (as SNS would deliver them), and its
//! subscriptions are confirmed at once. Signature checks are off, except in
//! [`Gateway::start_signed`], whose log signs every notification with the run's key
//! ([`crate::sns`]), served on loopback. [`Running`] runs a gateway built from any settings and
//! fakes, for tests (and benchmarks) that bring their own.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use chorus_gateway::bus::CertSource;
use chorus_gateway::settings::VerifySettings;
use chorus_gateway::test_support::{Appended, ConfirmedAtOnce, MemoryLog};
use chorus_gateway::writer_client::{LogError, MessageLog};
use chorus_gateway::{App, Deps, GatewayError, Settings};
use chorus_protocol::api::{HistoryPage, SendRequest, SendResponse};
use chorus_protocol::{BusPayload, MessageEvent, RoomId, Seq};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::sns;
use crate::wait::{Poll, WaitError};

/// The topic of [`Gateway`]s.
pub const TOPIC: &str = "arn:aws:sns:us-east-1:000000000000:chorus-test";

/// Where no one listens: the writer URL of gateways that are given a log, and the certificate
/// source of gateways that never fetch one.
const NOBODY: &str = "http://127.0.0.1:9";

/// Settings for a gateway under test: `topic`, an ephemeral loopback port, users named by
/// `?user=` (dev users), SNS verification off, and a writer URL nobody listens at (the test
/// gives the gateway a log of its own).
///
/// # Panics
/// Never: the addresses are constants.
pub fn settings(topic: &str) -> Settings {
    let mut settings = Settings::new(topic, NOBODY.parse().expect("a URL"));
    settings.listen = "127.0.0.1:0".parse().expect("an address");
    settings.bus.verify = None;
    settings.auth.dev_users = true;
    settings
}

/// A gateway [`App`] running in a task of this process: drained by [`Running::stop`], aborted
/// if dropped still running.
pub struct Running {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    run: Option<JoinHandle<Result<(), GatewayError>>>,
}

impl Running {
    /// Builds the gateway (it listens from here on) and runs it.
    ///
    /// # Errors
    /// When it does not build.
    pub async fn start(settings: Settings, deps: Deps) -> Result<Running, GatewayError> {
        Self::start_until(settings, deps, std::future::pending()).await
    }

    /// [`Running::start`], and the gateway also drains when `shutdown` completes.
    ///
    /// # Errors
    /// When it does not build.
    pub async fn start_until(
        settings: Settings,
        deps: Deps,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Running, GatewayError> {
        let app = App::build(settings, deps).await?;
        let addr = app.local_addr().expect("a bound listener has an address");
        let (stop, stopped) = oneshot::channel::<()>();
        let run = tokio::spawn(app.run_until(async {
            tokio::select! {
                _ = stopped => {}
                () = shutdown => {}
            }
        }));
        Ok(Running {
            addr,
            stop: Some(stop),
            run: Some(run),
        })
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Whether the gateway has stopped (by itself, unless [`Running::stop`] was called).
    pub fn is_finished(&self) -> bool {
        self.run.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// A poll of the gateway's `/readyz` awaiting `awaited`, which ends at once if the gateway
    /// stops.
    pub fn readyz(&self, awaited: &str) -> Poll<impl FnMut() -> Result<u64, String> + '_> {
        Poll::new(self.url("/readyz"), awaited).watching(|| {
            if self.is_finished() {
                Err("the gateway stopped".to_owned())
            } else {
                Ok(0)
            }
        })
    }

    /// Waits until `/readyz` answers 200.
    ///
    /// # Errors
    /// When nothing moves for the idle limit, or the gateway stops.
    pub async fn ready(&self) -> Result<(), WaitError> {
        self.readyz("the gateway to be ready").ready().await
    }

    /// Drains and stops the gateway; returns how its run ended.
    ///
    /// # Errors
    /// The gateway's, when it stopped abnormally.
    pub async fn stop(mut self) -> Result<(), GatewayError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.exited().await
    }

    /// Waits until the gateway stops by itself; returns how its run ended.
    ///
    /// # Errors
    /// The gateway's, when it stopped abnormally.
    ///
    /// # Panics
    /// When the gateway's task panicked.
    pub async fn exited(mut self) -> Result<(), GatewayError> {
        let run = self.run.take().expect("a running gateway");
        run.await.expect("the gateway's task does not panic")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(run) = self.run.take() {
            run.abort();
        }
    }
}

/// The writer's log in memory ([`MemoryLog`]), whose every new message is also delivered to the
/// gateway's `/sns` as SNS would deliver it: signed (SignatureVersion 2) with the run's key when
/// the gateway verifies notifications.
pub struct BusLog {
    memory: MemoryLog,
    sns_url: OnceLock<String>,
    signed: bool,
    http: reqwest::Client,
}

impl BusLog {
    fn new(signed: bool) -> BusLog {
        BusLog {
            memory: MemoryLog::default(),
            sns_url: OnceLock::new(),
            signed,
            http: reqwest::Client::new(),
        }
    }

    /// Stores a message for each of `bodies` in `room` without delivering them; returns them.
    pub fn store(
        &self,
        room: &RoomId,
        bodies: impl IntoIterator<Item = String>,
    ) -> Vec<MessageEvent> {
        self.memory.store(room, bodies)
    }

    /// Delivers `events` to the gateway as one SNS notification.
    ///
    /// # Panics
    /// When the gateway does not take the post with a 2xx.
    pub async fn deliver(&self, events: Vec<MessageEvent>) {
        let url = self.sns_url.get().expect("the gateway started").clone();
        let message = serde_json::to_string(&BusPayload::new(events)).expect("a bus payload");
        let mut envelope = sns::notification(TOPIC, &message);
        if self.signed {
            envelope.signing_cert_url = Some(sns::cert_url());
            envelope = sns::sign(envelope, "2");
        }
        let response = self
            .http
            .post(url)
            .body(sns::to_json(&envelope))
            .send()
            .await
            .expect("the gateway takes SNS posts");
        assert!(response.status().is_success(), "{}", response.status());
    }
}

#[async_trait::async_trait]
impl MessageLog for BusLog {
    async fn append(&self, room: &RoomId, request: &SendRequest) -> Result<SendResponse, LogError> {
        let Appended { event, fresh } = self.memory.append_event(room, request);
        let response = SendResponse {
            seq: event.seq,
            ts: event.ts.clone(),
        };
        if fresh {
            self.deliver(vec![event]).await;
        }
        Ok(response)
    }

    async fn history(
        &self,
        room: &RoomId,
        after: Seq,
        limit: u32,
    ) -> Result<HistoryPage, LogError> {
        self.memory.history(room, after, limit).await
    }

    async fn scrollback(
        &self,
        room: &RoomId,
        before: Option<Seq>,
        limit: u32,
    ) -> Result<HistoryPage, LogError> {
        self.memory.scrollback(room, before, limit).await
    }
}

/// A running gateway fed by a [`BusLog`], ready when started.
pub struct Gateway {
    pub addr: SocketAddr,
    pub log: Arc<BusLog>,
    running: Running,
}

impl Gateway {
    /// Starts a gateway with [`settings`] for [`TOPIC`], adjusted by `configure`, and waits
    /// until `/readyz` says it is ready.
    ///
    /// # Panics
    /// When it does not build or become ready.
    pub async fn start(configure: impl FnOnce(&mut Settings)) -> Gateway {
        // Nothing listens at the certificate mirror: a test that switches verification on
        // never reaches out for a certificate, and sees the fetch fail.
        Self::start_with(configure, NOBODY.into(), false).await
    }

    /// A gateway that verifies every SNS post, fed by a log that signs its notifications.
    ///
    /// # Panics
    /// As [`Gateway::start`].
    pub async fn start_signed(configure: impl FnOnce(&mut Settings)) -> Gateway {
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
        let mut settings = settings(TOPIC);
        configure(&mut settings);
        let log = Arc::new(BusLog::new(signed));
        let deps = Deps {
            log: Arc::clone(&log) as Arc<dyn MessageLog>,
            subscriptions: Arc::new(ConfirmedAtOnce {
                subscription_arn: format!("{TOPIC}:subscription"),
            }),
            certs: CertSource::Mirror {
                base: cert_mirror.parse().expect("a mirror URL"),
                sign_as: None,
            },
            sqs: None,
        };
        let running = Running::start(settings, deps)
            .await
            .expect("the gateway builds");
        log.sns_url
            .set(running.url("/sns"))
            .expect("one gateway per log");
        running
            .ready()
            .await
            .unwrap_or_else(|e| panic!("the gateway is not ready: {e}"));
        Gateway {
            addr: running.addr,
            log,
            running,
        }
    }

    /// `ws://…/ws`, for clients with tokens.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// `ws://…/ws?user=<user>`, for a dev user.
    pub fn user_url(&self, user: &str) -> String {
        format!("ws://{}/ws?user={user}", self.addr)
    }

    /// `http://…/metrics`.
    pub fn metrics_url(&self) -> String {
        self.running.url("/metrics")
    }

    /// The `/metrics` text.
    ///
    /// # Panics
    /// When the gateway does not answer.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.metrics_url())
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("the metrics text")
    }

    /// Waits until `/metrics` has every line of `expected` (see [`crate::wait::metrics`]);
    /// returns the exposition.
    pub async fn wait_for_metrics(&self, expected: &[&str]) -> String {
        crate::wait::metrics(&self.metrics_url(), expected).await
    }

    /// Drains and stops the gateway.
    ///
    /// # Panics
    /// When its run ends with an error.
    pub async fn stop(self) {
        self.running
            .stop()
            .await
            .expect("the gateway drains and stops");
    }
}

/// The value of the metric line that starts with `series` (its labels included).
///
/// # Panics
/// When there is no such line.
pub fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// A WebSocket upgrade request for `/ws?user=<user>`, as a raw client writes it: for tests
/// that then write (or withhold) bytes no client library would.
pub fn upgrade_request(user: &str) -> String {
    format!(
        "GET /ws?user={user} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    )
}
