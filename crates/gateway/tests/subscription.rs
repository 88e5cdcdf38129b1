//! The subscription lifecycle as an operator sees it, with verification on: a gateway whose
//! SubscriptionConfirmation is refused (as LocalStack's were before the mirror took any host)
//! says so in `/readyz` and its log, removes the pending subscription and subscribes again, and
//! either becomes ready or stops with an error that says why. SNS is a fake that posts real,
//! signed confirmations to the gateway's `/sns`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chorus_gateway::Deps;
use chorus_gateway::bus::{BusError, CertSource, Endpoint, SubscriptionState, TopicSubscriptions};
use chorus_gateway::settings::VerifySettings;
use chorus_gateway::test_support::MemoryLog;
use chorus_testkit::gateway::Running;
use chorus_testkit::logs::CapturedLogs;
use chorus_testkit::sns::{
    CERT_PATH, cert_server, confirmation, forger_key_and_cert, generated_key_and_cert, sign_with,
    to_json,
};

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
        let mut confirmation = confirmation(
            &self.topic,
            &token,
            &format!("http://sns.invalid/?Action=ConfirmSubscription&Token={token}"),
        );
        confirmation.message_id = format!("confirmation-of-{arn}");
        confirmation.signing_cert_url = Some(self.cert_url.clone());
        let key = if self.genuine.load(Ordering::SeqCst) {
            &generated_key_and_cert().0
        } else {
            &forger_key_and_cert().0
        };
        let body = to_json(&sign_with(confirmation, "1", key));
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

/// Everything this test binary logs, at info and above. One subscriber for the whole binary
/// (tests may run in parallel threads of one process): each test finds its own lines by the
/// subscriptions they name.
fn logs() -> &'static CapturedLogs {
    static LOGS: OnceLock<CapturedLogs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = CapturedLogs::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        logs
    })
}

/// Whether a captured line says `said` about subscription `arn`.
fn logged(said: &str, arn: &str) -> bool {
    let followed = format!("{arn} ");
    logs()
        .text()
        .lines()
        .any(|line| line.contains(said) && (line.contains(&followed) || line.ends_with(arn)))
}

/// A gateway with verification on (certificates from the test's mirror) and the fake SNS.
struct Started {
    gateway: Running,
    sns: Arc<FakeSns>,
}

async fn start(topic: &str, timeout_ms: u64, attempts: u32) -> Started {
    logs();
    let (mirror, _) = cert_server().await;
    // LocalStack names its certificate on its own host over plain HTTP; the mirror serves it.
    let sns = FakeSns::new(
        topic,
        format!("http://localhost.localstack.cloud:4566{CERT_PATH}"),
    );
    let mut settings = chorus_testkit::gateway::settings(topic);
    settings.bus.verify = Some(VerifySettings {
        cert_mirror: Some(mirror.parse().unwrap()),
        ..VerifySettings::default()
    });
    settings.bus.subscribe_timeout = Duration::from_millis(timeout_ms);
    settings.bus.subscribe_attempts = attempts;
    // No client sends or joins here: the log stays empty.
    let deps = Deps {
        log: Arc::new(MemoryLog::default()),
        subscriptions: Arc::clone(&sns) as Arc<dyn TopicSubscriptions>,
        certs: CertSource::Mirror {
            base: mirror.parse().unwrap(),
            sign_as: None,
        },
        sqs: None,
    };
    let gateway = Running::start(settings, deps)
        .await
        .expect("the gateway builds");
    Started { gateway, sns }
}

/// Polls `/readyz` until `done(status, body)` holds; gives up only when neither the answer nor
/// the fake SNS's subscriptions moved for [`NO_PROGRESS`], naming what was awaited and the last
/// answer, or at once when the gateway stops.
async fn readyz_until(
    started: &Started,
    awaited: &str,
    done: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    started
        .gateway
        .readyz(awaited)
        .idle(NO_PROGRESS)
        .watching(|| {
            if started.gateway.is_finished() {
                Err("the gateway stopped".to_owned())
            } else {
                Ok(started.sns.snapshot().0.len() as u64)
            }
        })
        .until(done)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
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

    started.gateway.stop().await.unwrap();
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
        .gateway
        .exited()
        .await
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
