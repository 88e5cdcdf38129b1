//! The publisher: turns DynamoDB stream records of new messages into SNS publishes that reach
//! every gateway.
//!
//! [`handle`] is the whole logic, independent of how records arrive: the Lambda runtime (in
//! production) and [`poller`] (locally and on non-Lambda installs) both call it.
//!
//! Per batch: records are taken in stream order; only inserts of message items are forwarded
//! (bookkeeping items, MODIFY and REMOVE are skipped); forwarded events are packed into as few SNS
//! messages as fit ([`pack`]), keeping stream order, so per-room seq order holds within and across
//! messages; packs are published one after another. On the first failed publish the handler stops
//! and reports the first record of that pack in `batchItemFailures`: DynamoDB streams checkpoint at
//! the lowest reported failure, so everything before it is done and everything from it is retried.

pub mod config;
pub mod pack;
pub mod poller;
pub mod sns;

use aws_lambda_events::dynamodb::{Event, EventRecord};
use aws_lambda_events::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use chorus_protocol::message::is_bookkeeping_key;
use chorus_protocol::{MessageEvent, StoredMessage};

use crate::pack::pack_events;

/// The one external effect of the publisher: send one SNS message body to the topic.
#[async_trait::async_trait]
pub trait Publish: Send + Sync {
    /// Publishes `message` (a serialized [`chorus_protocol::BusPayload`]).
    ///
    /// # Errors
    /// [`PublishError`] when the message may not have been published.
    async fn publish(&self, message: String) -> Result<(), PublishError>;
}

/// A publish that failed; the records behind it will be retried.
#[derive(Debug, thiserror::Error)]
#[error("publishing to SNS failed: {0}")]
pub struct PublishError(pub String);

/// What one batch did, for logs and metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Message inserts forwarded (published) in this batch.
    pub forwarded: usize,
    /// Records that are not message inserts (bookkeeping, MODIFY, REMOVE).
    pub skipped: usize,
    /// Records that can never be published (undecodable image); logged and skipped.
    pub poison: usize,
    /// SNS messages published.
    pub publishes: usize,
    /// Whether a publish failed (the response names where to resume).
    pub failed: bool,
}

/// Processes one stream batch. Never fails as a whole: a failure is reported per record in the
/// response, as DynamoDB streams' `ReportBatchItemFailures` expects.
pub async fn handle(event: &Event, publisher: &dyn Publish) -> DynamoDbEventResponse {
    handle_with_outcome(event, publisher).await.0
}

/// [`handle`], also returning what the batch did.
pub async fn handle_with_outcome(
    event: &Event,
    publisher: &dyn Publish,
) -> (DynamoDbEventResponse, BatchOutcome) {
    let mut outcome = BatchOutcome::default();
    // (index of the record in the batch, its event), in stream order.
    let mut forward: Vec<(usize, MessageEvent)> = Vec::new();
    for (index, record) in event.records.iter().enumerate() {
        match classify(record) {
            Classified::Message(message) => forward.push((index, *message)),
            Classified::Skip => outcome.skipped += 1,
            Classified::Poison(reason) => {
                outcome.poison += 1;
                tracing::error!(
                    event_id = %record.event_id,
                    sequence_number = record.change.sequence_number.as_deref().unwrap_or("-"),
                    reason = %reason,
                    "stream record can never be published: skipped"
                );
            }
        }
    }

    let mut response = DynamoDbEventResponse::default();
    for pack in pack_events(&forward) {
        match publisher.publish(pack.payload).await {
            Ok(()) => {
                outcome.publishes += 1;
                outcome.forwarded += pack.len;
            }
            Err(err) => {
                let record = &event.records[pack.first_index];
                tracing::warn!(
                    error.message = %err,
                    sequence_number = record.change.sequence_number.as_deref().unwrap_or("-"),
                    "publish failed: reporting the batch from this record for retry"
                );
                let mut failure = DynamoDbBatchItemFailure::default();
                failure.item_identifier = record.change.sequence_number.clone();
                response.batch_item_failures.push(failure);
                outcome.failed = true;
                break;
            }
        }
    }
    (response, outcome)
}

enum Classified {
    Message(Box<MessageEvent>),
    Skip,
    Poison(String),
}

fn classify(record: &EventRecord) -> Classified {
    if record.event_name != "INSERT" {
        return Classified::Skip;
    }
    let room_key = match record.change.keys.get("room") {
        Some(serde_dynamo::AttributeValue::S(room)) => room.as_str(),
        _ => return Classified::Poison("record keys have no string `room`".into()),
    };
    if is_bookkeeping_key(room_key) {
        return Classified::Skip;
    }
    match serde_dynamo::from_item::<_, StoredMessage>(record.change.new_image.clone()) {
        Ok(stored) => Classified::Message(Box::new(stored.into())),
        Err(e) => Classified::Poison(format!("new image is not a message: {e}")),
    }
}
