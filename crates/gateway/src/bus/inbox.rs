//! The one way into the hub for bus messages, whatever carried them: SNS posts to `/sns`
//! ([`Inbox::sns_post`]) and messages of the gateway's SQS queue both end in [`Inbox::deliver`],
//! and every message refused on either path is counted and logged by [`Inbox::rejected`].

use std::sync::Arc;

use chorus_protocol::BusPayload;
use chorus_protocol::bus::BusPayloadError;

use super::envelope::SnsEnvelope;
use super::subscription::{Readiness, TopicSubscriptions};
use super::verify::{Verifier, VerifyError};
use crate::Chain;
use crate::hub::Hub;
use crate::metrics::GatewayMetrics;

/// A bus message taken in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accepted {
    /// Its events were handed to the hub.
    Notification,
    /// A SubscriptionConfirmation: the subscription is being confirmed.
    Confirming,
    /// SNS says the subscription was removed.
    UnsubscribeConfirmed,
}

/// Why a bus message was refused. It changes nothing; each is counted under its reason.
#[derive(Debug)]
pub(crate) enum Rejection {
    /// Too many SNS posts are being read or verified at once.
    Busy,
    /// The post's body is over the limit or could not be read.
    TooLarge,
    /// The post's body did not arrive in time.
    BodyTimeout,
    /// The post is not an SNS message.
    NotSns,
    /// An SNS message type the gateway does not know.
    UnknownType,
    /// A SubscriptionConfirmation without its token.
    NoToken,
    /// From another topic.
    WrongTopic,
    /// The signing certificate cannot be had just now: not a verdict on the message.
    CertUnavailable {
        message_id: String,
        error: VerifyError,
    },
    /// Not a genuine message of the topic.
    NotGenuine {
        message_id: String,
        error: VerifyError,
        confirmation: bool,
    },
    /// The message's body is not a Chorus bus payload.
    NotPayload {
        /// The SNS message id, when there is an envelope.
        message_id: Option<String>,
        error: BusPayloadError,
    },
}

/// Takes bus messages in for the hub. Built once; shared by the `/sns` route and the SQS
/// receiver.
pub(crate) struct Inbox {
    hub: Hub,
    metrics: Arc<GatewayMetrics>,
    topic_arn: String,
    /// `None` only with `--insecure-skip-sns-verification`.
    verifier: Option<Verifier>,
    subscriptions: Arc<dyn TopicSubscriptions>,
    /// Where refused SubscriptionConfirmations are noted, for `/readyz`.
    readiness: Readiness,
}

impl Inbox {
    pub(crate) fn new(
        hub: Hub,
        metrics: Arc<GatewayMetrics>,
        topic_arn: String,
        verifier: Option<Verifier>,
        subscriptions: Arc<dyn TopicSubscriptions>,
        readiness: Readiness,
    ) -> Self {
        Inbox {
            hub,
            metrics,
            topic_arn,
            verifier,
            subscriptions,
            readiness,
        }
    }

    /// An SNS HTTP(S) delivery, as posted: checked (topic, then signature) before anything in it
    /// is used.
    ///
    /// # Errors
    /// The [`Rejection`], already counted and logged.
    pub(crate) async fn sns_post(&self, body: &[u8]) -> Result<Accepted, Rejection> {
        let result = self.sns_message(body).await;
        if let Err(rejection) = &result {
            self.rejected(rejection);
        }
        result
    }

    async fn sns_message(&self, body: &[u8]) -> Result<Accepted, Rejection> {
        let envelope: SnsEnvelope = serde_json::from_slice(body).map_err(|_| Rejection::NotSns)?;
        if envelope.topic_arn != self.topic_arn {
            return Err(Rejection::WrongTopic);
        }
        if let Some(verifier) = &self.verifier
            && let Err(error) = verifier.verify(&envelope).await
        {
            let message_id: String = envelope.message_id.chars().take(96).collect();
            if let VerifyError::CertFetch(_) = error {
                return Err(Rejection::CertUnavailable { message_id, error });
            }
            let confirmation = envelope.kind == "SubscriptionConfirmation";
            if confirmation {
                self.readiness.confirmation_refused(&error);
            }
            return Err(Rejection::NotGenuine {
                message_id,
                error,
                confirmation,
            });
        }
        match envelope.kind.as_str() {
            "Notification" => {
                let payload = BusPayload::parse(&envelope.message).map_err(|error| {
                    Rejection::NotPayload {
                        message_id: Some(envelope.message_id.clone()),
                        error,
                    }
                })?;
                self.deliver(&payload);
                Ok(Accepted::Notification)
            }
            "SubscriptionConfirmation" => {
                let Some(token) = envelope.token else {
                    return Err(Rejection::NoToken);
                };
                self.metrics.bus_notifications.inc();
                // Confirm off the request: SNS may wait on this response before it can serve the
                // ConfirmSubscription call.
                let subscriptions = Arc::clone(&self.subscriptions);
                tokio::spawn(async move {
                    match subscriptions.confirm(&token).await {
                        Ok(()) => tracing::info!("subscription confirmed"),
                        Err(e) => {
                            tracing::error!(error.message = %Chain(&e), "confirming the subscription failed")
                        }
                    }
                });
                Ok(Accepted::Confirming)
            }
            "UnsubscribeConfirmation" => {
                self.metrics.bus_notifications.inc();
                tracing::info!(message_id = %envelope.message_id, "unsubscribe confirmed by SNS");
                Ok(Accepted::UnsubscribeConfirmed)
            }
            _ => Err(Rejection::UnknownType),
        }
    }

    /// Hands a payload's events to the hub: the one path from the bus to clients.
    pub(crate) fn deliver(&self, payload: &BusPayload) {
        self.metrics.bus_notifications.inc();
        let started = std::time::Instant::now();
        for event in &payload.events {
            self.metrics.bus_events_in.inc();
            self.hub.ingest(event);
        }
        self.metrics.fanout.observe(started.elapsed());
    }

    /// Counts a refused message under its reason, and logs why (never the payload).
    pub(crate) fn rejected(&self, rejection: &Rejection) {
        let metrics = &self.metrics;
        metrics.bus_rejected.inc();
        match rejection {
            Rejection::Busy => metrics.rejected_busy.inc(),
            Rejection::TooLarge
            | Rejection::NotSns
            | Rejection::UnknownType
            | Rejection::NoToken => {
                metrics.rejected_malformed.inc();
            }
            Rejection::BodyTimeout => metrics.rejected_body_timeout.inc(),
            Rejection::WrongTopic => metrics.rejected_topic.inc(),
            Rejection::CertUnavailable { .. } => metrics.rejected_cert_unavailable.inc(),
            Rejection::NotGenuine { .. } => metrics.rejected_signature.inc(),
            Rejection::NotPayload { .. } => metrics.rejected_payload.inc(),
        }
        match rejection {
            Rejection::CertUnavailable { message_id, error } => {
                // SNS retries a 5xx (never a 4xx), so a genuine notification is not lost.
                tracing::warn!(%message_id, reason = %error, "SNS post not verified yet: signing certificate unavailable, asking SNS to retry");
            }
            Rejection::NotGenuine {
                message_id,
                error,
                confirmation: true,
            } => {
                tracing::warn!(%message_id, reason = %error, "SubscriptionConfirmation refused: not a genuine message of the topic; the subscription stays pending");
            }
            Rejection::NotGenuine {
                message_id, error, ..
            } => {
                tracing::warn!(%message_id, reason = %error, "SNS post refused: not a genuine message of the topic");
            }
            Rejection::NotPayload {
                message_id: Some(message_id),
                error,
            } => {
                tracing::warn!(%message_id, error.message = %error, "SNS post rejected: not a Chorus bus payload");
            }
            Rejection::NotPayload {
                message_id: None,
                error,
            } => {
                // Only the topic can send to the queue; a body that is not a bus payload can
                // never become one.
                tracing::warn!(error.message = %error, "gateway queue message is not a bus payload: dropped");
            }
            other => tracing::warn!(reason = other.why(), "SNS post rejected"),
        }
    }
}

impl Rejection {
    /// Why, in a few words (the answer to an SNS post).
    pub(crate) fn why(&self) -> &'static str {
        match self {
            Rejection::Busy => "too many SNS posts at once: retry later",
            Rejection::TooLarge => "body over the limit or unreadable",
            Rejection::BodyTimeout => "body not sent in time",
            Rejection::NotSns => "not an SNS message",
            Rejection::UnknownType => "unknown SNS message type",
            Rejection::NoToken => "confirmation without a token",
            Rejection::WrongTopic => "not from the configured topic",
            Rejection::CertUnavailable { .. } => "signing certificate unavailable: retry later",
            Rejection::NotGenuine { .. } => "signature verification failed",
            Rejection::NotPayload { .. } => "not a Chorus bus payload",
        }
    }
}
