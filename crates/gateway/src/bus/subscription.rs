//! The subscription lifecycle: subscribe at start and wait for SNS to confirm, make it again
//! when it disappears, remove it on drain; and where it stands, in words, for `/readyz`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sns::Client;

use super::{BusError, aws_error};
use crate::Chain;
use crate::hub::Hub;

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
        let out = request.send().await.map_err(aws_error("Subscribe"))?;
        out.subscription_arn.ok_or(BusError::Missing {
            call: "Subscribe",
            missing: "subscription ARN",
        })
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
            Err(e) => return Err(aws_error("GetSubscriptionAttributes")(e)),
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
            .map_err(aws_error("ConfirmSubscription"))?;
        Ok(())
    }

    async fn unsubscribe(&self, subscription_arn: &str) -> Result<(), BusError> {
        self.client
            .unsubscribe()
            .subscription_arn(subscription_arn)
            .send()
            .await
            .map_err(aws_error("Unsubscribe"))?;
        Ok(())
    }
}

/// How long the gateway waits for SNS to confirm a subscription, and how often it tries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConfirmPolicy {
    /// How long one subscription may stay pending before it is removed and made again.
    pub timeout: Duration,
    /// Subscriptions made before giving up (at least 1).
    pub attempts: u32,
}

/// Whether the gateway is ready (subscribed and not draining), and if not, why, in words for
/// `/readyz` and the log. Written by the subscription's owner, the `/sns` route (refused
/// confirmations) and the drain; read by `/readyz` and the WebSocket upgrade. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct Readiness {
    /// A std `Mutex`: held only to read or replace a flag and a few strings, never across
    /// `.await`.
    inner: Arc<Mutex<ReadinessInner>>,
}

#[derive(Debug, Default)]
struct ReadinessInner {
    ready: bool,
    /// What the gateway waits for while it is not ready.
    waiting_for: String,
    /// Why the last SubscriptionConfirmation posted to this gateway was refused, until a
    /// subscription is confirmed.
    refused_confirmation: Option<String>,
}

impl Readiness {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReadinessInner> {
        self.inner.lock().expect("readiness lock poisoned")
    }

    /// Whether load balancers may route clients here.
    pub(crate) fn is_ready(&self) -> bool {
        self.lock().ready
    }

    /// Ready: subscribed, with the bus flowing in.
    pub(crate) fn ready(&self) {
        self.lock().ready = true;
    }

    /// Not ready, waiting for `what` (shown by `/readyz`).
    pub(crate) fn waiting_for(&self, what: impl Into<String>) {
        let mut inner = self.lock();
        inner.ready = false;
        inner.waiting_for = what.into();
    }

    /// Records that a SubscriptionConfirmation was refused, and why: the subscription stays
    /// pending, and `/readyz` and the final error say so.
    pub(crate) fn confirmation_refused(&self, why: impl std::fmt::Display) {
        self.lock().refused_confirmation = Some(why.to_string());
    }

    fn refused_confirmation(&self) -> Option<String> {
        self.lock().refused_confirmation.clone()
    }

    fn confirmed(&self) {
        let mut inner = self.lock();
        inner.refused_confirmation = None;
        inner.waiting_for.clear();
    }

    /// Why the gateway is not ready, in a sentence.
    pub(crate) fn describe(&self) -> String {
        let inner = self.lock();
        let mut out = if inner.waiting_for.is_empty() {
            "starting".to_owned()
        } else {
            inner.waiting_for.clone()
        };
        if let Some(why) = &inner.refused_confirmation {
            out.push_str("; the last SubscriptionConfirmation was refused: ");
            out.push_str(why);
        }
        out
    }
}

/// This gateway's subscription to the topic, owned by whoever runs the gateway: made and
/// confirmed ([`Self::confirm`]), watched ([`Self::watch`]) and removed ([`Self::remove`]).
///
/// Every method is cancel-safe: the subscription made last is recorded as soon as it exists, so
/// a future dropped at any await (a shutdown during start-up, the watcher stopped by the drain)
/// leaves [`Self::remove`] something to remove.
pub(crate) struct Subscription {
    subscriptions: Arc<dyn TopicSubscriptions>,
    endpoint: Endpoint,
    policy: ConfirmPolicy,
    readiness: Readiness,
    /// The subscription made last, pending or confirmed; `None` before the first and after it
    /// was removed.
    arn: Option<String>,
}

impl Subscription {
    pub(crate) fn new(
        subscriptions: Arc<dyn TopicSubscriptions>,
        endpoint: Endpoint,
        policy: ConfirmPolicy,
        readiness: Readiness,
    ) -> Self {
        Subscription {
            subscriptions,
            endpoint,
            policy,
            readiness,
            arn: None,
        }
    }

    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Subscribes and waits until SNS confirms (the `/sns` route confirms when asked). A
    /// subscription still pending after the policy's timeout (its confirmation never came, or
    /// was refused) is removed and made again, which has SNS send a new confirmation; after the
    /// policy's attempts, gives up. [`Readiness`] says where it stands all along. Returns the
    /// confirmed subscription's ARN.
    ///
    /// # Errors
    /// When a call to SNS fails, or no subscription is confirmed in the policy's attempts.
    pub(crate) async fn confirm(&mut self) -> Result<String, BusError> {
        let (endpoint, policy, status) = (&self.endpoint, self.policy, &self.readiness);
        let attempts = policy.attempts.max(1);
        for attempt in 1..=attempts {
            status.waiting_for(format!(
                "subscribing {endpoint} to the topic (attempt {attempt} of {attempts})"
            ));
            let arn = self.subscriptions.subscribe(endpoint).await?;
            self.arn = Some(arn.clone());
            tracing::info!(%endpoint, subscription = %arn, attempt, attempts, "subscribed: waiting for SNS to confirm");
            let started = tokio::time::Instant::now();
            loop {
                match self.subscriptions.state(&arn).await? {
                    SubscriptionState::Confirmed => {
                        status.confirmed();
                        return Ok(arn);
                    }
                    SubscriptionState::Gone => break,
                    SubscriptionState::Pending => {}
                }
                let waited = started.elapsed();
                status.waiting_for(format!(
                    "subscription {arn} pending confirmation for {:.1} s of {:.1} s (attempt \
                     {attempt} of {attempts}): no SubscriptionConfirmation from SNS has been \
                     accepted yet",
                    waited.as_secs_f32(),
                    policy.timeout.as_secs_f32()
                ));
                if waited >= policy.timeout {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            tracing::warn!(
                %endpoint, subscription = %arn, attempt, attempts,
                waited_ms = started.elapsed().as_millis() as u64,
                refused = status.refused_confirmation().as_deref().unwrap_or("none"),
                "the subscription is still not confirmed: removing it{}",
                if attempt < attempts { " and subscribing again" } else { "" }
            );
            // A pending subscription may not be removable (SNS expires those itself);
            // subscribing again still has SNS send a new confirmation.
            if let Err(e) = self.subscriptions.unsubscribe(&arn).await {
                tracing::debug!(subscription = %arn, error.message = %Chain(&e), "removing the pending subscription failed");
            }
            self.arn = None;
        }
        Err(BusError::NotConfirmed {
            endpoint: endpoint.to_string(),
            attempts,
            timeout: policy.timeout,
            refused: status.refused_confirmation(),
        })
    }

    /// Checks every `interval` that the subscription still exists; if it is gone (someone
    /// removed it, or SNS gave up on the endpoint), subscribes again, and since the bus may have
    /// lost messages meanwhile, has every room check its tail. Not ready while re-subscribing; a
    /// re-subscription that fails is tried again at the next check. Runs until dropped.
    pub(crate) async fn watch(&mut self, interval: Duration, hub: &Hub) {
        loop {
            tokio::time::sleep(interval).await;
            if let Some(arn) = &self.arn {
                match self.subscriptions.state(arn).await {
                    Ok(SubscriptionState::Gone) => {
                        tracing::warn!(subscription = %arn, "the subscription is gone: subscribing again");
                        self.arn = None;
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!(error.message = %Chain(&e), "checking the subscription failed");
                        continue;
                    }
                }
            }
            // Gone, or the last re-subscription failed: subscribe again.
            self.readiness
                .waiting_for("the subscription is gone: subscribing again");
            match self.confirm().await {
                Ok(arn) => {
                    tracing::info!(subscription = %arn, "subscribed again");
                    self.readiness.ready();
                    hub.repair_all();
                }
                Err(e) => {
                    tracing::error!(error.message = %Chain(&e), "subscribing again failed: trying again at the next check")
                }
            }
        }
    }

    /// Removes the subscription, if there is one: SNS stops delivering here. A failure is logged
    /// (SNS drops an endpoint after failed deliveries).
    pub(crate) async fn remove(&mut self) {
        let Some(arn) = self.arn.take() else {
            return;
        };
        if let Err(e) = self.subscriptions.unsubscribe(&arn).await {
            tracing::warn!(subscription = %arn, error.message = %Chain(&e), "unsubscribing failed: SNS will drop the endpoint after failed deliveries");
        }
    }
}
