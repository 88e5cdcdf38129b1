//! [`Publish`] on SNS, and the topic's one-time set-up.

use anyhow::Context as _;
use aws_sdk_sns::Client;
use aws_sdk_sns::error::DisplayErrorContext;
use aws_sdk_sns::types::PublishBatchRequestEntry;

use crate::{Publish, PublishError};

/// Publishes bus payloads to one SNS topic. Built once at start-up; cheap to clone.
#[derive(Debug, Clone)]
pub struct SnsPublisher {
    client: Client,
    topic_arn: String,
}

impl SnsPublisher {
    pub fn new(client: Client, topic_arn: impl Into<String>) -> Self {
        SnsPublisher {
            client,
            topic_arn: topic_arn.into(),
        }
    }
}

#[async_trait::async_trait]
impl Publish for SnsPublisher {
    async fn publish(&self, messages: &[String]) -> Result<(), PublishError> {
        // No Subject: gateways verify signatures over exactly these fields.
        let failed_at = |first_failed: usize| {
            move |e: &dyn std::fmt::Display| PublishError {
                first_failed,
                reason: e.to_string(),
            }
        };
        if let [message] = messages {
            return self
                .client
                .publish()
                .topic_arn(&self.topic_arn)
                .message(message)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| failed_at(0)(&DisplayErrorContext(&e)));
        }
        let mut request = self.client.publish_batch().topic_arn(&self.topic_arn);
        for (i, message) in messages.iter().enumerate() {
            let entry = PublishBatchRequestEntry::builder()
                .id(i.to_string())
                .message(message)
                .build()
                .map_err(|e| failed_at(i)(&e))?;
            request = request.publish_batch_request_entries(entry);
        }
        let out = request
            .send()
            .await
            .map_err(|e| failed_at(0)(&DisplayErrorContext(&e)))?;
        let first_failed = out
            .failed
            .unwrap_or_default()
            .iter()
            .filter_map(|f| f.id.parse::<usize>().ok().map(|i| (i, f.message.clone())))
            .min_by_key(|(i, _)| *i);
        match first_failed {
            None => Ok(()),
            Some((i, message)) => Err(PublishError {
                first_failed: i,
                reason: message.unwrap_or_else(|| "entry failed".into()),
            }),
        }
    }
}

/// Creates the topic (SignatureVersion 2) if it does not exist and returns its ARN. CreateTopic is
/// idempotent for the same name and attributes.
///
/// For the local emulator and first-time set-up; production topics come from CloudFormation.
///
/// # Errors
/// When SNS refuses.
pub async fn ensure_topic(client: &Client, name: &str) -> anyhow::Result<String> {
    let out = client
        .create_topic()
        .name(name)
        .attributes("SignatureVersion", "2")
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("creating topic {name}: {}", DisplayErrorContext(&e)))?;
    out.topic_arn.context("CreateTopic returned no ARN")
}
