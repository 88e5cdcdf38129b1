//! The subscription lifecycle as an operator sees it, with verification on: a gateway whose
//! SubscriptionConfirmation is refused (as LocalStack's were before the mirror took any host)
//! says so in `/readyz` and its log, removes the pending subscription and subscribes again, and
//! either becomes ready or stops with an error that says why. SNS is a fake that posts real,
//! signed confirmations to the gateway's `/sns`.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chorus_gateway::bus::CertSource;
use chorus_gateway::bus::{BusError, Endpoint, SnsEnvelope, SubscriptionState, TopicSubscriptions};
use chorus_gateway::settings::VerifySettings;
use chorus_gateway::writer_client::{LogError, MessageLog};
use chorus_gateway::{App, Deps, GatewayError, Settings};
use chorus_protocol::RoomId;
use chorus_protocol::Seq;
use chorus_protocol::api::{HistoryPage, SendRequest, SendResponse};
use common::sns::{CERT_PATH, cert_server, forger_key_and_cert, generated_key_and_cert, sign_with};
use tokio::sync::oneshot;

/// How long the test waits while nothing at all happens on the fake SNS before it gives up.
const NO_PROGRESS: Duration = Duration::from_secs(60);

/// A fake SNS topic. Every Subscribe gets a new subscription and a SubscriptionConfirmation
/// posted to the endpoint (before Subscribe returns): signed with the topic's key once `genuine`
/// is set, with a forger's key before. A subscription is confirmed when the gateway confirms its
/// token.
struct FakeSns {
    topic: String,
    http: reqwest::Client,
    cert_url: String,
    genuine: AtomicBool,
    state: Mutex<FakeState>,
}

#[derive(Default)]
struct FakeState {
    made: Vec<String>,
    tokens: HashMap<String, String>,
    confirmed: HashSet<String>,
    removed: HashSet<String>,
}

impl FakeSns {
    fn new(topic: &str, cert_url: String) -> Arc<FakeSns> {
        Arc::new(FakeSns {
            topic: topic.to_owned(),
            http: reqwest::Client::new(),
            cert_url,
            genuine: AtomicBool::new(false),
            state: Mutex::default(),
        })
    }

    /// (subscriptions made, confirmed, removed), in that order of making.
    fn snapshot(&self) -> (Vec<String>, HashSet<String>, HashSet<String>) {
        let state = self.state.lock().unwrap();
        (
            state.made.clone(),
            state.confirmed.clone(),
            state.removed.clone(),
        )
    }
}

#[async_trait::async_trait]
impl TopicSubscriptions for FakeSns {
    async fn subscribe(&self, endpoint: &Endpoint) -> Result<String, BusError> {
        let Endpoint::Http(url) = endpoint else {
            panic!("an HTTP endpoint is expected, got {endpoint}");
        };
        let (arn, token) = {
            let mut state = self.state.lock().unwrap();
            let n = state.made.len() + 1;
            let (arn, token) = (format!("{}:sub-{n}", self.topic), format!("token-{n}"));
            state.made.push(arn.clone());
            state.tokens.insert(token.clone(), arn.clone());
            (arn, token)
        };
        let confirmation: SnsEnvelope = serde_json::from_value(serde_json::json!({
            "Type": "SubscriptionConfirmation",
            "MessageId": format!("confirmation-of-{arn}"),
            "Token": token,
            "TopicArn": self.topic,
            "Message": "You have chosen to subscribe to the topic",
            "SubscribeURL": format!("http://sns.invalid/?Action=ConfirmSubscription&Token={token}"),
            "Timestamp": time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap(),
            "SigningCertURL": self.cert_url,
        }))
        .unwrap();
        let key = if self.genuine.load(Ordering::SeqCst) {
            &generated_key_and_cert().0
        } else {
            &forger_key_and_cert().0
        };
        let body = envelope_json(&sign_with(confirmation, "1", key));
        // SNS posts after Subscribe returns; posting before makes the order of what the gateway
        // sees the same on every run.
        let _ = self.http.post(url).body(body).send().await;
        Ok(arn)
    }

    async fn state(&self, arn: &str) -> Result<SubscriptionState, BusError> {
        let state = self.state.lock().unwrap();
        Ok(if state.removed.contains(arn) {
            SubscriptionState::Gone
        } else if state.confirmed.contains(arn) {
            SubscriptionState::Confirmed
        } else {
            SubscriptionState::Pending
        })
    }

    async fn confirm(&self, token: &str) -> Result<(), BusError> {
        let mut state = self.state.lock().unwrap();
        let arn = state
            .tokens
            .get(token)
            .cloned()
            .ok_or_else(|| BusError::Aws {
                call: "ConfirmSubscription",
                source: format!("unknown token {token}").into(),
            })?;
        state.confirmed.insert(arn);
        Ok(())
    }

    async fn unsubscribe(&self, arn: &str) -> Result<(), BusError> {
        self.state.lock().unwrap().removed.insert(arn.to_owned());
        Ok(())
    }
}

/// The envelope as SNS posts it (the gateway reads the fields it signs).
fn envelope_json(envelope: &SnsEnvelope) -> String {
    serde_json::json!({
        "Type": envelope.kind,
        "MessageId": envelope.message_id,
        "Token": envelope.token,
        "TopicArn": envelope.topic_arn,
        "Message": envelope.message,
        "SubscribeURL": envelope.subscribe_url,
        "Timestamp": envelope.timestamp,
        "SignatureVersion": envelope.signature_version,
        "Signature": envelope.signature,
        "SigningCertURL": envelope.signing_cert_url,
    })
    .to_string()
}

/// No writer behind these gateways: nothing here sends or joins.
struct NoWriter;

#[async_trait::async_trait]
impl MessageLog for NoWriter {
    async fn append(&self, _: &RoomId, _: &SendRequest) -> Result<SendResponse, LogError> {
        unreachable!("no client sends in these tests")
    }
    async fn history(&self, _: &RoomId, _: Seq, _: u32) -> Result<HistoryPage, LogError> {
        unreachable!("no client joins in these tests")
    }
    async fn scrollback(
        &self,
        _: &RoomId,
        _: Option<Seq>,
        _: u32,
    ) -> Result<HistoryPage, LogError> {
        unreachable!("no client asks for history in these tests")
    }
}

/// Everything this test binary logs, at info and above. One subscriber for the whole binary
/// (tests may run in parallel threads of one process): each test finds its own lines by the
/// subscriptions they name.
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs: &'static Mutex<Vec<u8>> = Box::leak(Box::default());
        tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || CapturedLogs(logs))
            .init();
        logs
    })
}

struct CapturedLogs(&'static Mutex<Vec<u8>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether a captured line says `said` about subscription `arn`.
fn logged(said: &str, arn: &str) -> bool {
    let followed = format!("{arn} ");
    String::from_utf8_lossy(&logs().lock().unwrap())
        .lines()
        .any(|line| line.contains(said) && (line.contains(&followed) || line.ends_with(arn)))
}

/// A gateway with verification on (certificates from the test's mirror) and the fake SNS.
struct Started {
    addr: std::net::SocketAddr,
    sns: Arc<FakeSns>,
    stop: oneshot::Sender<()>,
    run: tokio::task::JoinHandle<Result<(), GatewayError>>,
}

async fn start(topic: &str, timeout_ms: u64, attempts: u32) -> Started {
    logs();
    let (mirror, _) = cert_server().await;
    // LocalStack names its certificate on its own host over plain HTTP; the mirror serves it.
    let sns = FakeSns::new(
        topic,
        format!("http://localhost.localstack.cloud:4566{CERT_PATH}"),
    );
    let mut settings = Settings::new(topic, "http://127.0.0.1:9".parse().unwrap());
    settings.listen = "127.0.0.1:0".parse().unwrap();
    settings.auth.dev_users = true;
    settings.bus.verify = Some(VerifySettings {
        cert_mirror: Some(mirror.parse().unwrap()),
        ..VerifySettings::default()
    });
    settings.bus.subscribe_timeout = Duration::from_millis(timeout_ms);
    settings.bus.subscribe_attempts = attempts;
    let deps = Deps {
        log: Arc::new(NoWriter),
        subscriptions: Arc::clone(&sns) as Arc<dyn TopicSubscriptions>,
        certs: CertSource::Mirror {
            base: mirror.parse().unwrap(),
            sign_as: None,
        },
        sqs: None,
    };
    let app = App::build(settings, deps)
        .await
        .expect("the gateway builds");
    let addr = app.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let run = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    Started {
        addr,
        sns,
        stop,
        run,
    }
}

/// Polls `/readyz` until `done(status, body)` holds; gives up only when the fake SNS saw no new
/// subscription for [`NO_PROGRESS`], naming what was awaited and the last answer.
async fn readyz_until(
    started: &Started,
    awaited: &str,
    done: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let http = reqwest::Client::new();
    let mut last_made = 0;
    let mut last_progress = tokio::time::Instant::now();
    loop {
        if let Ok(response) = http
            .get(format!("http://{}/readyz", started.addr))
            .send()
            .await
        {
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            if done(status, &body) {
                return (status, body);
            }
            let made = started.sns.snapshot().0.len();
            if made != last_made {
                (last_made, last_progress) = (made, tokio::time::Instant::now());
            }
            assert!(
                last_progress.elapsed() < NO_PROGRESS,
                "awaited {awaited}; no new subscription for {NO_PROGRESS:?}; /readyz: {status} {body}"
            );
        }
        assert!(
            !started.run.is_finished(),
            "the gateway stopped while awaiting {awaited}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_refused_confirmation_is_reported_and_a_new_subscription_made_until_one_is_confirmed() {
    // Many attempts: the test decides when the confirmations become genuine.
    let started = start(
        "arn:aws:sns:us-east-1:000000000000:chorus-refused-then-genuine",
        500,
        1_000,
    )
    .await;

    let (status, body) = readyz_until(&started, "/readyz to report the refusal", |_, body| {
        body.contains("refused")
    })
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("pending confirmation")
            && body.contains(
                "the last SubscriptionConfirmation was refused: signature does not verify"
            ),
        "/readyz says what the gateway waits for and why: {body}"
    );
    readyz_until(&started, "a second subscription", |_, _| {
        started.sns.snapshot().0.len() >= 2
    })
    .await;

    started.sns.genuine.store(true, Ordering::SeqCst);
    let (_, body) = readyz_until(&started, "readiness", |status, _| status == 200).await;
    assert_eq!(body, "ready");

    let (made, confirmed, removed) = started.sns.snapshot();
    let live: Vec<&String> = made.iter().filter(|arn| !removed.contains(*arn)).collect();
    assert_eq!(
        live.len(),
        1,
        "every unconfirmed subscription was removed: {made:?} {removed:?}"
    );
    assert!(
        confirmed.contains(live[0]),
        "the live subscription is the confirmed one"
    );
    assert_ne!(
        live[0], &made[0],
        "the first subscription never got a genuine confirmation"
    );

    for said in [
        "SubscriptionConfirmation refused: not a genuine message of the topic; the subscription stays pending",
        "the subscription is still not confirmed: removing it and subscribing again",
    ] {
        assert!(
            logged(said, &made[0]),
            "the log lacks {said:?} about {}",
            made[0]
        );
    }
    assert!(logged("gateway ready: subscribed to the topic", live[0]));

    started.stop.send(()).unwrap();
    started.run.await.unwrap().unwrap();
    let (_, _, removed) = started.sns.snapshot();
    assert!(removed.contains(live[0]), "drain removed the subscription");
}

#[tokio::test]
async fn a_subscription_never_confirmed_stops_the_gateway_with_the_reason() {
    let started = start(
        "arn:aws:sns:us-east-1:000000000000:chorus-never-confirmed",
        300,
        2,
    )
    .await;
    let error = started
        .run
        .await
        .unwrap()
        .expect_err("no subscription can be confirmed")
        .to_string();
    assert!(
        error.contains("was not confirmed in 2 attempts")
            && error.contains(
                "the last SubscriptionConfirmation was refused: signature does not verify"
            ),
        "{error}"
    );
    let (made, confirmed, removed) = started.sns.snapshot();
    assert_eq!(made.len(), 2);
    assert!(confirmed.is_empty());
    assert_eq!(
        removed,
        made.into_iter().collect(),
        "nothing is left pending on the topic"
    );
}
