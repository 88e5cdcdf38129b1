//! The publisher: turns DynamoDB stream records of new messages into SNS publishes that reach
//! every gateway.
//!
//! [`handle`] is the whole logic, independent of how records arrive: the Lambda runtime (in
//! production) and [`poller`] (locally and on non-Lambda installs) both call it.
//!
//! Per batch: records are taken in stream order; only inserts of message items are forwarded
//! (room markers, MODIFY and REMOVE are skipped and counted). One item holds a run of a room's
//! messages: it is unpacked into its events in seq order. Forwarded events are packed into as few
//! SNS messages as fit ([`pack`]), keeping stream order, so per-room seq order holds within and
//! across messages; the messages go out in PublishBatch calls of up to 10 entries and
//! 256 KiB, one call after another. On the first failed entry the handler stops and reports the
//! first record of that entry's pack in `batchItemFailures`: DynamoDB streams checkpoint at the
//! lowest reported failure, so everything before it is done and everything from it is retried.
//! (Entries after a failed one in the same call may have been published: gateways drop the
//! duplicates.) A record that can never be published (poison) goes to the dead-letter queue with
//! its reason, or is logged and skipped when none is configured: it never blocks the shard.

pub mod app;
pub mod config;
pub mod dead_letter;
pub mod pack;
pub mod poller;
pub mod sns;

use aws_lambda_events::dynamodb::{Event, EventRecord};
use aws_lambda_events::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use chorus_protocol::message::MARKER_SEQ;
use chorus_protocol::{MessageEvent, StoredBatch};

pub use crate::app::App;
pub use crate::dead_letter::{DeadLetter, DeadLetterError, SqsDeadLetter};
use crate::pack::{MAX_SNS_MESSAGE_BYTES, Pack, pack_events};

/// Most entries in one SNS PublishBatch call.
pub const MAX_BATCH_ENTRIES: usize = 10;
/// Most bytes of all entries of one PublishBatch call together.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;

/// The one external effect on the happy path: send SNS message bodies to the topic.
#[async_trait::async_trait]
pub trait Publish: Send + Sync {
    /// Publishes `messages` (serialized [`BusPayload`]s, at most [`MAX_BATCH_ENTRIES`] and
    /// [`MAX_BATCH_BYTES`] together) in one call.
    ///
    /// # Errors
    /// [`PublishError`] with the index of the first message that may not have been published.
    async fn publish(&self, messages: &[String]) -> Result<(), PublishError>;
}

/// A publish that failed from message `first_failed` of the call on; those records are retried.
#[derive(Debug, thiserror::Error)]
#[error("publishing to SNS failed at entry {first_failed}")]
pub struct PublishError {
    /// The first message of the call that may not have been published.
    pub first_failed: usize,
    /// Why: an SNS error ([`sns::SnsError`]), or whatever a test's fake says.
    #[source]
    pub source: BoxError,
}

impl PublishError {
    pub fn new(first_failed: usize, source: impl Into<BoxError>) -> Self {
        PublishError {
            first_failed,
            source: source.into(),
        }
    }
}

/// The cause behind an error of one of the publisher's traits ([`Publish`], [`DeadLetter`],
/// [`poller::StreamSource`]), whose implementations (AWS, fakes) fail in their own ways.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What one batch did, for logs and metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Records in the batch.
    pub records: usize,
    /// Messages forwarded (published) in this batch (one record may hold many).
    pub forwarded: usize,
    /// Records that are not message inserts (room markers, MODIFY, REMOVE).
    pub skipped: usize,
    /// Records that can never be published (undecodable or inconsistent image, over-size).
    pub poison: usize,
    /// Of those, how many went to the dead-letter queue (the rest were logged and dropped).
    pub dead_lettered: usize,
    /// SNS messages published, and the calls that carried them.
    pub sns_messages: usize,
    pub sns_calls: usize,
    /// Bytes of message bodies published.
    pub sns_bytes: usize,
    /// Whether the batch stopped at a failure (the response names where to resume).
    pub failed: bool,
}

/// Processes one stream batch. Never fails as a whole: a failure is reported per record in the
/// response, as DynamoDB streams' `ReportBatchItemFailures` expects.
pub async fn handle(
    event: &Event,
    publisher: &dyn Publish,
    dead_letters: Option<&dyn DeadLetter>,
) -> DynamoDbEventResponse {
    handle_with_outcome(event, publisher, dead_letters).await.0
}

/// [`handle`], also returning what the batch did.
pub async fn handle_with_outcome(
    event: &Event,
    publisher: &dyn Publish,
    dead_letters: Option<&dyn DeadLetter>,
) -> (DynamoDbEventResponse, BatchOutcome) {
    let mut outcome = BatchOutcome {
        records: event.records.len(),
        ..BatchOutcome::default()
    };
    // (index of the record in the batch, its event), in stream order and, within a record, in
    // seq order; and the poison records.
    let mut forward: Vec<(usize, MessageEvent)> = Vec::new();
    let mut poison: Vec<(usize, String)> = Vec::new();
    for (index, record) in event.records.iter().enumerate() {
        match classify(record) {
            Classified::Messages(messages) => {
                forward.extend(messages.into_iter().map(|m| (index, m)));
            }
            Classified::Skip => outcome.skipped += 1,
            Classified::Poison(reason) => poison.push((index, reason)),
        }
    }
    outcome.poison = poison.len();

    // Publish in order; `resume_at` is the first record not done.
    let mut resume_at: Option<usize> = None;
    let packs = pack_events(&forward);
    let mut rest: &[Pack] = &packs;
    while !rest.is_empty() {
        let take = calls_worth(rest);
        let (call, after) = rest.split_at(take);
        let bodies: Vec<String> = call.iter().map(|p| p.payload.clone()).collect();
        outcome.sns_calls += 1;
        match publisher.publish(&bodies).await {
            Ok(()) => {
                outcome.sns_messages += call.len();
                outcome.sns_bytes += bodies.iter().map(String::len).sum::<usize>();
                outcome.forwarded += call.iter().map(|p| p.len).sum::<usize>();
                rest = after;
            }
            Err(err) => {
                let failed = &call[err.first_failed.min(call.len() - 1)];
                tracing::warn!(
                    error.message = %err,
                    error.cause_chain = ?err,
                    "publish failed: the batch resumes at the first record of the failed message"
                );
                outcome.sns_messages += err.first_failed;
                outcome.forwarded += call[..err.first_failed.min(call.len())]
                    .iter()
                    .map(|p| p.len)
                    .sum::<usize>();
                resume_at = Some(failed.first_index);
                break;
            }
        }
    }

    // Poison records before the resume point are done with now: dead-letter or drop them.
    for (index, reason) in &poison {
        if resume_at.is_some_and(|r| *index >= r) {
            break;
        }
        let record = &event.records[*index];
        match dead_letters {
            Some(queue) => match queue.send(record, reason).await {
                Ok(()) => {
                    outcome.dead_lettered += 1;
                    tracing::error!(event_id = %record.event_id, %reason, "poison record sent to the dead-letter queue");
                }
                Err(e) => {
                    tracing::warn!(
                        error.message = %e,
                        error.cause_chain = ?e,
                        "dead-letter queue unavailable: the batch resumes at the poison record"
                    );
                    resume_at = Some(resume_at.map_or(*index, |r| r.min(*index)));
                    break;
                }
            },
            None => tracing::error!(
                event_id = %record.event_id,
                sequence_number = record.change.sequence_number.as_deref().unwrap_or("-"),
                %reason,
                "poison record skipped (no dead-letter queue configured)"
            ),
        }
    }

    let mut response = DynamoDbEventResponse::default();
    if let Some(index) = resume_at {
        let mut failure = DynamoDbBatchItemFailure::default();
        failure.item_identifier = event.records[index].change.sequence_number.clone();
        response.batch_item_failures.push(failure);
        outcome.failed = true;
    }
    tracing::info!(
        records = outcome.records,
        forwarded = outcome.forwarded,
        skipped = outcome.skipped,
        poison = outcome.poison,
        dead_lettered = outcome.dead_lettered,
        sns_messages = outcome.sns_messages,
        sns_calls = outcome.sns_calls,
        failed = outcome.failed,
        "batch handled"
    );
    (response, outcome)
}

/// How many of `packs` (from the front) fit one PublishBatch call.
fn calls_worth(packs: &[Pack]) -> usize {
    let mut bytes = 0;
    let mut count = 0;
    for pack in packs.iter().take(MAX_BATCH_ENTRIES) {
        if count > 0 && bytes + pack.payload.len() > MAX_BATCH_BYTES {
            break;
        }
        bytes += pack.payload.len();
        count += 1;
    }
    count.max(1)
}

/// What a stream record is to the publisher.
#[derive(Debug)]
pub enum Classified {
    /// An insert of a message item: forward its messages, in seq order.
    Messages(Vec<MessageEvent>),
    /// A room marker, MODIFY or REMOVE: skip it.
    Skip,
    /// Can never be published (the reason says why): dead-letter it.
    Poison(String),
}

/// Decides what to do with one stream record. Never panics, whatever the record holds.
pub fn classify(record: &EventRecord) -> Classified {
    if record.event_name != "INSERT" {
        return Classified::Skip;
    }
    if !matches!(
        record.change.keys.get("room"),
        Some(serde_dynamo::AttributeValue::S(_))
    ) {
        return Classified::Poison("record keys have no string `room`".into());
    }
    let marker = MARKER_SEQ.to_string();
    if matches!(record.change.keys.get("seq"), Some(serde_dynamo::AttributeValue::N(seq)) if *seq == marker)
    {
        return Classified::Skip;
    }
    let item = match serde_dynamo::from_item::<_, StoredBatch>(record.change.new_image.clone()) {
        Ok(item) => item,
        Err(e) => return Classified::Poison(format!("new image is not a message item: {e}")),
    };
    if let Err(e) = item.check() {
        return Classified::Poison(format!("new image is not a whole message item: {e}"));
    }
    let events: Vec<MessageEvent> = item.into_events().collect();
    // Bodies are capped far below this, but an item written around the writer could exceed it.
    for event in &events {
        let alone = pack::payload_bytes(std::slice::from_ref(event));
        if alone > MAX_SNS_MESSAGE_BYTES {
            return Classified::Poison(format!(
                "message {} is {alone} bytes serialized, over the SNS limit of {MAX_SNS_MESSAGE_BYTES}",
                event.seq
            ));
        }
    }
    Classified::Messages(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(bytes: usize, first_index: usize) -> Pack {
        Pack {
            payload: "x".repeat(bytes),
            first_index,
            len: 1,
        }
    }

    #[test]
    fn publish_batch_calls_take_up_to_ten_entries_and_256_kib() {
        let small: Vec<Pack> = (0..25).map(|i| pack(1000, i)).collect();
        assert_eq!(calls_worth(&small), 10);
        assert_eq!(calls_worth(&small[20..]), 5);
        let big: Vec<Pack> = (0..3).map(|i| pack(100 * 1024, i)).collect();
        assert_eq!(
            calls_worth(&big),
            2,
            "a third 100 KiB entry would pass 256 KiB"
        );
        let full = vec![pack(MAX_BATCH_BYTES, 0), pack(10, 1)];
        assert_eq!(calls_worth(&full), 1);
    }
}
