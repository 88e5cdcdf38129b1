//! [`Publish`] on SNS, and the topic's one-time set-up.

use aws_sdk_sns::Client;
use aws_sdk_sns::error::{BuildError, SdkError};
use aws_sdk_sns::operation::create_topic::CreateTopicError;
use aws_sdk_sns::operation::publish::PublishError as PublishCallError;
use aws_sdk_sns::operation::publish_batch::PublishBatchError;
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

/// Why SNS did not take a message: the source of a [`PublishError`] from [`SnsPublisher`].
#[derive(Debug, thiserror::Error)]
pub enum SnsError {
    #[error("SNS Publish call")]
    Publish(#[source] SdkError<PublishCallError>),
    #[error("SNS PublishBatch call")]
    PublishBatch(#[source] SdkError<PublishBatchError>),
    #[error("building PublishBatch entry {index}")]
    Entry {
        index: usize,
        #[source]
        source: BuildError,
    },
    /// The call went through but SNS refused this entry.
    #[error("SNS refused the entry ({code}): {}", message.as_deref().unwrap_or("entry failed"))]
    Refused {
        code: String,
        message: Option<String>,
    },
}

#[async_trait::async_trait]
impl Publish for SnsPublisher {
    async fn publish(&self, messages: &[String]) -> Result<(), PublishError> {
        // No Subject: gateways verify signatures over exactly these fields.
        if let [message] = messages {
            return self
                .client
                .publish()
                .topic_arn(&self.topic_arn)
                .message(message)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| PublishError::new(0, SnsError::Publish(e)));
        }
        let mut request = self.client.publish_batch().topic_arn(&self.topic_arn);
        for (index, message) in messages.iter().enumerate() {
            let entry = PublishBatchRequestEntry::builder()
                .id(index.to_string())
                .message(message)
                .build()
                .map_err(|source| PublishError::new(index, SnsError::Entry { index, source }))?;
            request = request.publish_batch_request_entries(entry);
        }
        let out = request
            .send()
            .await
            .map_err(|e| PublishError::new(0, SnsError::PublishBatch(e)))?;
        let first_failed = out
            .failed
            .unwrap_or_default()
            .into_iter()
            .filter_map(|f| f.id.parse::<usize>().ok().map(|i| (i, f)))
            .min_by_key(|(i, _)| *i);
        match first_failed {
            None => Ok(()),
            Some((i, failed)) => Err(PublishError::new(
                i,
                SnsError::Refused {
                    code: failed.code,
                    message: failed.message,
                },
            )),
        }
    }
}

/// The topic could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("creating topic {name}")]
    Create {
        name: String,
        #[source]
        source: Box<SdkError<CreateTopicError>>,
    },
    #[error("CreateTopic {name} returned no ARN")]
    NoArn { name: String },
}

/// Creates the topic (SignatureVersion 2) if it does not exist and returns its ARN. CreateTopic is
/// idempotent for the same name and attributes.
///
/// For the local emulator and first-time set-up; production topics come from CloudFormation.
///
/// # Errors
/// When SNS refuses.
pub async fn ensure_topic(client: &Client, name: &str) -> Result<String, TopicError> {
    let out = client
        .create_topic()
        .name(name)
        .attributes("SignatureVersion", "2")
        .send()
        .await
        .map_err(|source| TopicError::Create {
            name: name.to_owned(),
            source: Box::new(source),
        })?;
    out.topic_arn.ok_or_else(|| TopicError::NoArn {
        name: name.to_owned(),
    })
}
