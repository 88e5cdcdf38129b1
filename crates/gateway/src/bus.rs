//! The gateway's side of the bus: the SNS HTTP endpoint (`POST /sns`) and the subscription
//! lifecycle (subscribe at start, confirm, unsubscribe on drain).
//!
//! SNS posts a JSON envelope with `Content-Type: text/plain`; the body is read as bytes and
//! parsed here, and checked by [`crate::verify`] before anything in it is used.

use std::time::Duration;

use aws_sdk_sns::Client;
use aws_sdk_sns::error::DisplayErrorContext;
use serde::Deserialize;

/// An SNS HTTP(S) delivery: Notification, SubscriptionConfirmation or UnsubscribeConfirmation.
/// Fields kept as the exact strings SNS sent (they are what a signature covers).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SnsEnvelope {
    #[serde(rename = "Type")]
    pub kind: String,
    pub message_id: String,
    pub topic_arn: String,
    pub message: String,
    pub timestamp: String,
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default, rename = "SubscribeURL")]
    pub subscribe_url: Option<String>,
    #[serde(default)]
    pub signature_version: Option<String>,
    #[serde(default)]
    pub signature: Option<String>,
    #[serde(default, rename = "SigningCertURL")]
    pub signing_cert_url: Option<String>,
}

/// Where SNS delivers to this gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST <url>` (the gateway's `/sns`).
    Http(String),
    /// The gateway's own SQS queue (for gateways SNS cannot reach over HTTP).
    Queue { arn: String },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Http(url) => f.write_str(url),
            Endpoint::Queue { arn } => f.write_str(arn),
        }
    }
}

/// Where a subscription stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionState {
    /// Deliveries flow.
    Confirmed,
    /// Waiting for the endpoint to confirm.
    Pending,
    /// It no longer exists (removed by someone, or by SNS after failed deliveries).
    Gone,
}

/// Why a subscription call failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BusError(pub String);

/// The subscription calls the gateway makes on the topic. Behind a trait for tests.
#[async_trait::async_trait]
pub trait TopicSubscriptions: Send + Sync + 'static {
    /// Subscribes `endpoint` and returns the subscription ARN.
    async fn subscribe(&self, endpoint: &Endpoint) -> Result<String, BusError>;
    /// Where the subscription stands.
    async fn state(&self, subscription_arn: &str) -> Result<SubscriptionState, BusError>;
    /// Confirms a subscription with the token SNS posted.
    async fn confirm(&self, token: &str) -> Result<(), BusError>;
    /// Removes the subscription.
    async fn unsubscribe(&self, subscription_arn: &str) -> Result<(), BusError>;
}

/// [`TopicSubscriptions`] with no SNS behind them: every subscription is confirmed as soon as it
/// is made. For running a gateway in tests and benchmarks, whose bus messages are posted to its
/// `/sns` directly.
#[derive(Debug, Clone)]
pub struct ConfirmedAtOnce {
    /// The ARN every subscription gets.
    pub subscription_arn: String,
}

#[async_trait::async_trait]
impl TopicSubscriptions for ConfirmedAtOnce {
    async fn subscribe(&self, _: &Endpoint) -> Result<String, BusError> {
        Ok(self.subscription_arn.clone())
    }
    async fn state(&self, _: &str) -> Result<SubscriptionState, BusError> {
        Ok(SubscriptionState::Confirmed)
    }
    async fn confirm(&self, _: &str) -> Result<(), BusError> {
        Ok(())
    }
    async fn unsubscribe(&self, _: &str) -> Result<(), BusError> {
        Ok(())
    }
}

/// [`TopicSubscriptions`] on SNS.
#[derive(Debug, Clone)]
pub struct SnsSubscriptions {
    client: Client,
    topic_arn: String,
}

impl SnsSubscriptions {
    pub fn new(client: Client, topic_arn: impl Into<String>) -> Self {
        SnsSubscriptions {
            client,
            topic_arn: topic_arn.into(),
        }
    }
}

fn sns_error<E: std::error::Error + 'static>(what: &str) -> impl FnOnce(E) -> BusError + '_ {
    move |e| BusError(format!("{what}: {}", DisplayErrorContext(&e)))
}

#[async_trait::async_trait]
impl TopicSubscriptions for SnsSubscriptions {
    async fn subscribe(&self, endpoint: &Endpoint) -> Result<String, BusError> {
        let request = self
            .client
            .subscribe()
            .topic_arn(&self.topic_arn)
            .return_subscription_arn(true);
        let request = match endpoint {
            Endpoint::Http(url) if url.starts_with("https://") => {
                request.protocol("https").endpoint(url)
            }
            Endpoint::Http(url) => request.protocol("http").endpoint(url),
            // Raw delivery: the queue receives the bus payload itself; the queue policy admits
            // only the topic.
            Endpoint::Queue { arn } => request
                .protocol("sqs")
                .endpoint(arn)
                .attributes("RawMessageDelivery", "true"),
        };
        let out = request.send().await.map_err(sns_error("Subscribe"))?;
        out.subscription_arn
            .ok_or_else(|| BusError("Subscribe returned no subscription ARN".into()))
    }

    async fn state(&self, subscription_arn: &str) -> Result<SubscriptionState, BusError> {
        let out = match self
            .client
            .get_subscription_attributes()
            .subscription_arn(subscription_arn)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_not_found_exception()) =>
            {
                return Ok(SubscriptionState::Gone);
            }
            Err(e) => return Err(sns_error("GetSubscriptionAttributes")(e)),
        };
        let pending = out
            .attributes
            .as_ref()
            .and_then(|a| a.get("PendingConfirmation"))
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        Ok(if pending {
            SubscriptionState::Pending
        } else {
            SubscriptionState::Confirmed
        })
    }

    async fn confirm(&self, token: &str) -> Result<(), BusError> {
        self.client
            .confirm_subscription()
            .topic_arn(&self.topic_arn)
            .token(token)
            .authenticate_on_unsubscribe("true")
            .send()
            .await
            .map_err(sns_error("ConfirmSubscription"))?;
        Ok(())
    }

    async fn unsubscribe(&self, subscription_arn: &str) -> Result<(), BusError> {
        self.client
            .unsubscribe()
            .subscription_arn(subscription_arn)
            .send()
            .await
            .map_err(sns_error("Unsubscribe"))?;
        Ok(())
    }
}

/// Subscribes and waits until SNS confirms (our `/sns` handler confirms when asked).
///
/// # Errors
/// When subscribing fails or confirmation does not come within `timeout`.
pub async fn subscribe_and_confirm(
    subscriptions: &dyn TopicSubscriptions,
    endpoint: &Endpoint,
    timeout: Duration,
) -> Result<String, BusError> {
    let arn = subscriptions.subscribe(endpoint).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if subscriptions.state(&arn).await? == SubscriptionState::Confirmed {
            return Ok(arn);
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = subscriptions.unsubscribe(&arn).await;
            return Err(BusError(format!(
                "subscription of {endpoint} not confirmed within {timeout:?}: is the endpoint \
                 reachable from SNS?"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Removes the topic's HTTP(S) subscriptions whose gateway no longer answers at all (connection
/// refused or timed out on `GET <endpoint base>/healthz`, twice): the subscriptions of gateways
/// that crashed without draining. Any HTTP answer, even 503 while draining, counts as alive.
///
/// This is the janitor's job (a timer, or the terminating instance's lifecycle hook): on AWS a
/// dead endpoint only fails its own deliveries until SNS gives up on them, but some emulators fail
/// every publish while one subscriber is dead. Returns the removed subscription ARNs.
///
/// # Errors
/// When the subscriptions cannot be listed; a failed unsubscribe is logged and skipped.
pub async fn prune_dead_subscriptions(
    client: &Client,
    topic_arn: &str,
) -> Result<Vec<String>, BusError> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| BusError(format!("building the HTTP client: {e}")))?;
    let mut removed = Vec::new();
    let mut next_token: Option<String> = None;
    loop {
        let page = client
            .list_subscriptions_by_topic()
            .topic_arn(topic_arn)
            .set_next_token(next_token.take())
            .send()
            .await
            .map_err(sns_error("ListSubscriptionsByTopic"))?;
        for sub in page.subscriptions.unwrap_or_default() {
            let (Some(arn), Some(endpoint), Some(protocol)) =
                (sub.subscription_arn, sub.endpoint, sub.protocol)
            else {
                continue;
            };
            if !(protocol == "http" || protocol == "https") || !arn.starts_with("arn:") {
                continue;
            }
            let health = format!("{}/healthz", endpoint.trim_end_matches("/sns"));
            let mut alive = false;
            for _ in 0..2 {
                if http.get(&health).send().await.is_ok() {
                    alive = true;
                    break;
                }
            }
            if alive {
                continue;
            }
            match client.unsubscribe().subscription_arn(&arn).send().await {
                Ok(_) => {
                    tracing::info!(%endpoint, subscription = %arn, "removed the subscription of a dead gateway");
                    removed.push(arn);
                }
                Err(e) => {
                    tracing::warn!(%endpoint, error.message = %DisplayErrorContext(&e), "unsubscribing a dead gateway failed")
                }
            }
        }
        next_token = page.next_token;
        if next_token.is_none() {
            return Ok(removed);
        }
    }
}
