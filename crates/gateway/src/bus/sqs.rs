//! The SQS transport (`--bus sqs`): SNS cannot deliver to private addresses, so a gateway in a
//! private subnet gets its own queue, subscribed to the topic with raw delivery, and long-polls
//! it. The queue's policy admits only the topic and denies every other sender explicitly.
//! Messages are deleted after their events are handed to the hub (ordered and queued for every
//! local member), so a gateway that dies mid-batch gets them again if it comes back, and the
//! order layer drops what it already had.
//! On drain the subscription and the queue are removed.

use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, QueueAttributeName};
use chorus_protocol::BusPayload;
use tokio_util::sync::CancellationToken;

use super::envelope::SnsEnvelope;
use super::inbox::{Inbox, Rejection};
use super::{BusError, aws_error};
use crate::Chain;

/// This gateway's queue.
#[derive(Debug, Clone)]
pub(crate) struct GatewayQueue {
    client: Client,
    pub url: String,
    pub arn: String,
}

impl GatewayQueue {
    /// Creates the queue `name` with a policy that lets only `topic_arn` send to it.
    ///
    /// # Errors
    /// When SQS refuses.
    pub(crate) async fn create(
        client: Client,
        name: &str,
        topic_arn: &str,
    ) -> Result<Self, BusError> {
        let created = client
            .create_queue()
            .queue_name(name)
            .attributes(QueueAttributeName::MessageRetentionPeriod, "3600")
            .attributes(QueueAttributeName::ReceiveMessageWaitTimeSeconds, "20")
            // Chat messages at rest are encrypted (SQS-managed keys: SNS can still deliver).
            .attributes(QueueAttributeName::SqsManagedSseEnabled, "true")
            .send()
            .await
            .map_err(aws_error("CreateQueue"))?;
        let url = created.queue_url.ok_or(BusError::Missing {
            call: "CreateQueue",
            missing: "queue URL",
        })?;
        let attributes = client
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(aws_error("GetQueueAttributes"))?;
        let arn = attributes
            .attributes
            .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
            .ok_or(BusError::Missing {
                call: "GetQueueAttributes",
                missing: "queue ARN",
            })?;
        let policy = queue_policy(&arn, topic_arn);
        client
            .set_queue_attributes()
            .queue_url(&url)
            .attributes(QueueAttributeName::Policy, policy.to_string())
            .send()
            .await
            .map_err(aws_error("SetQueueAttributes"))?;
        tracing::info!(queue = %url, "gateway queue created");
        Ok(GatewayQueue { client, url, arn })
    }

    /// Long-polls the queue and hands what it receives to the inbox until `stop` is cancelled.
    pub(crate) async fn receive(&self, inbox: &Inbox, wait: Duration, stop: CancellationToken) {
        let wait_secs = i32::try_from(wait.as_secs().clamp(1, 20)).unwrap_or(20);
        loop {
            let received = tokio::select! {
                () = stop.cancelled() => return,
                received = self
                    .client
                    .receive_message()
                    .queue_url(&self.url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(wait_secs)
                    .send() => received,
            };
            let messages = match received {
                Ok(out) => out.messages.unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(error.message = %Chain(&e), "receiving from the gateway queue failed: retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            let mut done = Vec::new();
            for (i, message) in messages.iter().enumerate() {
                // A body that is not a bus payload is counted and dropped (deleted): it can never
                // become one.
                match parse_body(message.body.as_deref().unwrap_or_default()) {
                    Ok(payload) => inbox.deliver(&payload),
                    Err(rejection) => inbox.rejected(&rejection),
                }
                if let Some(handle) = &message.receipt_handle
                    && let Ok(entry) = DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(handle)
                        .build()
                {
                    done.push(entry);
                }
            }
            if !done.is_empty()
                && let Err(e) = self
                    .client
                    .delete_message_batch()
                    .queue_url(&self.url)
                    .set_entries(Some(done))
                    .send()
                    .await
            {
                // They come back after the visibility timeout; the order layer drops them.
                tracing::warn!(error.message = %Chain(&e), "deleting handled messages failed");
            }
        }
    }

    /// Deletes the queue.
    pub(crate) async fn delete(&self) {
        match self.client.delete_queue().queue_url(&self.url).send().await {
            Ok(_) => tracing::info!(queue = %self.url, "gateway queue deleted"),
            Err(e) => {
                tracing::warn!(error.message = %Chain(&e), "deleting the gateway queue failed")
            }
        }
    }
}

/// A raw-delivery body is the bus payload itself; without raw delivery it is the SNS envelope.
fn parse_body(body: &str) -> Result<BusPayload, Rejection> {
    let error = match BusPayload::parse(body) {
        Ok(payload) => return Ok(payload),
        Err(error) => error,
    };
    let Ok(envelope) = serde_json::from_str::<SnsEnvelope>(body) else {
        return Err(Rejection::NotPayload {
            message_id: None,
            error,
        });
    };
    BusPayload::parse(&envelope.message).map_err(|error| Rejection::NotPayload {
        message_id: None,
        error,
    })
}

/// A queue name for this gateway: `chorus-gw-<id>-<random>`, within SQS's 80 characters of
/// `[A-Za-z0-9_-]`.
pub(crate) fn queue_name(gateway_id: &str) -> String {
    let id: String = gateway_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(50)
        .collect();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("chorus-gw-{id}-{:08x}", nanos ^ std::process::id())
}

/// The gateway queue's policy: the topic may send, and every other sender is denied explicitly,
/// so a principal whose own IAM policy allows `sqs:SendMessage` broadly still cannot inject
/// events. `infra/tests` checks the same document (fixtures/gateway-queue-policy.json).
fn queue_policy(queue_arn: &str, topic_arn: &str) -> serde_json::Value {
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "OnlyTheChorusTopic",
                "Effect": "Allow",
                "Principal": {"Service": "sns.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": topic_arn}}
            },
            {
                "Sid": "NoOtherSender",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {"ArnNotEquals": {"aws:SourceArn": topic_arn}}
            }
        ]
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_queue_policy_is_the_one_the_infra_checks_hold_to() {
        let expected: serde_json::Value = serde_json::from_str(include_str!(
            "../../../../infra/tests/fixtures/gateway-queue-policy.json"
        ))
        .unwrap();
        let policy = super::queue_policy(
            "arn:aws:sqs:us-east-1:123456789012:chorus-gw-chorus-i-0123456789abcdef0-k3v9",
            "arn:aws:sns:us-east-1:123456789012:chorus-messages",
        );
        assert_eq!(policy, expected);
    }

    use super::*;

    #[test]
    fn queue_names_are_valid_sqs_names() {
        let name = queue_name("127.0.0.1:8081");
        assert!(name.starts_with("chorus-gw-127-0-0-1-8081-"), "{name}");
        assert!(name.len() <= 80);
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert!(queue_name(&"x".repeat(200)).len() <= 80);
    }

    #[test]
    fn raw_and_enveloped_bodies_both_parse() {
        let raw = r#"{"v":1,"events":[]}"#;
        assert!(parse_body(raw).is_ok());
        let enveloped = serde_json::json!({
            "Type": "Notification", "MessageId": "m", "TopicArn": "t", "Message": raw,
            "Timestamp": "2026-11-29T10:00:00.000Z"
        })
        .to_string();
        assert!(parse_body(&enveloped).is_ok());
        assert!(parse_body("nonsense").is_err());
    }
}
