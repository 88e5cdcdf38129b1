//! The publisher's handler on a Lambda-format DynamoDB stream batch (fixtures/stream_batch.json):
//! what reaches SNS and the dead-letter queue, and what the response tells Lambda.
//!
//! The fixture, by sequence number: 101 item lobby#1–2, 102 marker insert (lobby), 103 item
//! news#1, 104 marker MODIFY (news), 105 item lobby#3–5, 106 REMOVE (an expired item deleted),
//! 107 poison (an item whose range does not match its messages), 108 poison (an item of the old
//! one-message format), 109 item lobby#6.

use std::sync::Mutex;

use aws_lambda_events::dynamodb::{Event, EventRecord};
use chorus_protocol::BusPayload;
use chorus_publisher::{
    DeadLetter, DeadLetterError, Publish, PublishError, handle, handle_with_outcome,
};

/// Records what it is asked to publish; fails every call from call number `fail_from` (1-based).
#[derive(Default)]
struct FakeSns {
    calls: Mutex<Vec<Vec<String>>>,
    fail_from: Option<usize>,
}

#[async_trait::async_trait]
impl Publish for FakeSns {
    async fn publish(&self, messages: &[String]) -> Result<(), PublishError> {
        let mut calls = self.calls.lock().unwrap();
        if self.fail_from.is_some_and(|n| calls.len() + 1 >= n) {
            return Err(PublishError::new(0, "throttled"));
        }
        calls.push(messages.to_vec());
        Ok(())
    }
}

#[derive(Default)]
struct FakeQueue {
    letters: Mutex<Vec<(String, String)>>,
    broken: bool,
}

#[async_trait::async_trait]
impl DeadLetter for FakeQueue {
    async fn send(&self, record: &EventRecord, reason: &str) -> Result<(), DeadLetterError> {
        if self.broken {
            return Err(DeadLetterError::Send("queue down".into()));
        }
        let seq = record.change.sequence_number.clone().unwrap_or_default();
        self.letters.lock().unwrap().push((seq, reason.to_owned()));
        Ok(())
    }
}

fn batch() -> Event {
    serde_json::from_slice(include_bytes!("fixtures/stream_batch.json")).unwrap()
}

fn delivered(sns: &FakeSns) -> Vec<(String, u64, String)> {
    sns.calls
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .flat_map(|m| BusPayload::parse(m).unwrap().events)
        .map(|e| (e.room.to_string(), e.seq.0, e.body.as_str().to_owned()))
        .collect()
}

fn failures(response: &aws_lambda_events::streams::DynamoDbEventResponse) -> Vec<Option<String>> {
    response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone())
        .collect()
}

#[tokio::test]
async fn forwards_message_inserts_only_in_stream_order_in_one_packed_message() {
    let sns = FakeSns::default();
    let queue = FakeQueue::default();
    let (response, outcome) = handle_with_outcome(&batch(), &sns, Some(&queue)).await;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(
        delivered(&sns),
        [
            ("lobby".into(), 1, "Hello world".into()),
            ("lobby".into(), 2, "Hi John".into()),
            ("news".into(), 1, "Extra!".into()),
            ("lobby".into(), 3, "three".into()),
            ("lobby".into(), 4, "four".into()),
            ("lobby".into(), 5, "five".into()),
            ("lobby".into(), 6, "after the poison".into()),
        ]
    );
    assert_eq!(
        sns.calls.lock().unwrap().len(),
        1,
        "one SNS call for the batch"
    );
    assert_eq!(outcome.records, 9);
    assert_eq!(outcome.forwarded, 7, "messages, from 4 items");
    assert_eq!(outcome.skipped, 3, "marker insert, marker MODIFY, REMOVE");
    assert_eq!((outcome.poison, outcome.dead_lettered), (2, 2));
    assert_eq!((outcome.sns_messages, outcome.sns_calls), (1, 1));
    let letters = queue.letters.lock().unwrap();
    assert_eq!(letters.len(), 2);
    assert_eq!(
        (letters[0].0.as_str(), letters[1].0.as_str()),
        ("107", "108")
    );
    assert!(
        letters[0].1.contains("ends at 9"),
        "the reason names the problem: {}",
        letters[0].1
    );
    assert!(
        letters[1].1.contains("not a message item"),
        "{}",
        letters[1].1
    );
}

#[tokio::test]
async fn a_failed_publish_reports_the_first_record_of_its_message_and_holds_later_poison() {
    let sns = FakeSns {
        fail_from: Some(1),
        ..FakeSns::default()
    };
    let queue = FakeQueue::default();
    let response = handle(&batch(), &sns, Some(&queue)).await;
    assert_eq!(failures(&response), [Some("101".to_owned())]);
    assert!(delivered(&sns).is_empty());
    assert!(
        queue.letters.lock().unwrap().is_empty(),
        "the poison record will be retried with the batch"
    );
    let json = serde_json::to_value(&response).unwrap();
    assert_eq!(json["batchItemFailures"][0]["itemIdentifier"], "101");
}

#[tokio::test]
async fn an_unreachable_dead_letter_queue_stops_the_batch_at_the_poison_record() {
    let sns = FakeSns::default();
    let queue = FakeQueue {
        broken: true,
        ..FakeQueue::default()
    };
    let response = handle(&batch(), &sns, Some(&queue)).await;
    assert_eq!(failures(&response), [Some("107".to_owned())]);
}

#[tokio::test]
async fn without_a_dead_letter_queue_poison_is_skipped_and_the_batch_succeeds() {
    let sns = FakeSns::default();
    let (response, outcome) = handle_with_outcome(&batch(), &sns, None).await;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!((outcome.poison, outcome.dead_lettered), (2, 0));
    assert_eq!(delivered(&sns).len(), 7);
}

#[tokio::test]
async fn an_empty_batch_publishes_nothing_and_succeeds() {
    let sns = FakeSns::default();
    let response = handle(&Event::default(), &sns, None).await;
    assert!(response.batch_item_failures.is_empty());
    assert!(sns.calls.lock().unwrap().is_empty());
}
