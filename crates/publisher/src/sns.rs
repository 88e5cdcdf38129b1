//! [`Publish`] on SNS, and the topic's one-time set-up.

use anyhow::Context as _;
use aws_sdk_sns::Client;
use aws_sdk_sns::error::DisplayErrorContext;

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
    async fn publish(&self, message: String) -> Result<(), PublishError> {
        // No Subject: gateways verify signatures over exactly these fields.
        self.client
            .publish()
            .topic_arn(&self.topic_arn)
            .message(message)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| PublishError(DisplayErrorContext(&e).to_string()))
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
