//! Where poison records go: an SQS queue (the event source mapping's on-failure destination, or
//! any queue), with the reason, so an operator can inspect and replay them.

use aws_lambda_events::dynamodb::EventRecord;
use aws_sdk_sqs::Client;
use serde::Serialize;

use crate::BoxError;

/// A destination for records that can never be published.
#[async_trait::async_trait]
pub trait DeadLetter: Send + Sync {
    /// Stores `record` with `reason`.
    ///
    /// # Errors
    /// When the record may not have been stored (the batch then resumes at it).
    async fn send(&self, record: &EventRecord, reason: &str) -> Result<(), DeadLetterError>;
}

/// A record that may not have reached the dead-letter queue.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("encoding the dead letter")]
    Encode(#[source] serde_json::Error),
    /// The queue did not take it: an SQS error, or whatever a test's fake says.
    #[error("sending to the dead-letter queue")]
    Send(#[source] BoxError),
}

/// The body of a dead-letter message.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterBody<'a> {
    pub reason: &'a str,
    pub event_id: &'a str,
    pub sequence_number: Option<&'a str>,
    pub event_source_arn: Option<&'a str>,
    pub record: &'a EventRecord,
}

/// [`DeadLetter`] on an SQS queue.
#[derive(Debug, Clone)]
pub struct SqsDeadLetter {
    client: Client,
    queue_url: String,
}

impl SqsDeadLetter {
    pub fn new(client: Client, queue_url: impl Into<String>) -> Self {
        SqsDeadLetter {
            client,
            queue_url: queue_url.into(),
        }
    }
}

#[async_trait::async_trait]
impl DeadLetter for SqsDeadLetter {
    async fn send(&self, record: &EventRecord, reason: &str) -> Result<(), DeadLetterError> {
        let body = DeadLetterBody {
            reason,
            event_id: &record.event_id,
            sequence_number: record.change.sequence_number.as_deref(),
            event_source_arn: record.event_source_arn.as_deref(),
            record,
        };
        let body = serde_json::to_string(&body).map_err(DeadLetterError::Encode)?;
        self.client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| DeadLetterError::Send(e.into()))
    }
}
