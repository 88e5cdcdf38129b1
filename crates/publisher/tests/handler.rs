//! The publisher's handler on a Lambda-format DynamoDB stream batch (fixtures/stream_batch.json):
//! what reaches SNS, and what the response tells Lambda.

use std::sync::Mutex;

use aws_lambda_events::dynamodb::Event;
use chorus_protocol::BusPayload;
use chorus_publisher::{Publish, PublishError, handle, handle_with_outcome};

/// Records what it is asked to publish; fails every call from `fail_from` on.
#[derive(Default)]
struct FakeSns {
    published: Mutex<Vec<String>>,
    fail_from: Option<usize>,
    calls: Mutex<usize>,
}

#[async_trait::async_trait]
impl Publish for FakeSns {
    async fn publish(&self, message: String) -> Result<(), PublishError> {
        let mut calls = self.calls.lock().unwrap();
        *calls += 1;
        if self.fail_from.is_some_and(|n| *calls >= n) {
            return Err(PublishError("throttled".into()));
        }
        self.published.lock().unwrap().push(message);
        Ok(())
    }
}

fn batch() -> Event {
    serde_json::from_slice(include_bytes!("fixtures/stream_batch.json")).unwrap()
}

fn delivered(sns: &FakeSns) -> Vec<(String, u64, String)> {
    sns.published
        .lock()
        .unwrap()
        .iter()
        .flat_map(|m| BusPayload::parse(m).unwrap().events)
        .map(|e| (e.room.to_string(), e.seq.0, e.body.as_str().to_owned()))
        .collect()
}

#[tokio::test]
async fn forwards_message_inserts_only_in_stream_order_in_one_packed_message() {
    let sns = FakeSns::default();
    let (response, outcome) = handle_with_outcome(&batch(), &sns).await;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(
        delivered(&sns),
        [
            ("lobby".into(), 1, "Hello world".into()),
            ("news".into(), 1, "Extra!".into()),
            ("lobby".into(), 2, "Hi John".into()),
            ("lobby".into(), 4, "after the poison".into()),
        ]
    );
    assert_eq!(
        sns.published.lock().unwrap().len(),
        1,
        "one SNS message for the batch"
    );
    assert_eq!(outcome.forwarded, 4);
    assert_eq!(
        outcome.skipped, 4,
        "head insert, idempotency insert, MODIFY, REMOVE"
    );
    assert_eq!(outcome.poison, 1);
    assert!(!outcome.failed);
}

#[tokio::test]
async fn a_failed_publish_reports_the_first_record_of_its_pack() {
    let sns = FakeSns {
        fail_from: Some(1),
        ..FakeSns::default()
    };
    let response = handle(&batch(), &sns).await;
    let ids: Vec<_> = response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone())
        .collect();
    assert_eq!(ids, [Some("101".to_owned())]);
    assert!(delivered(&sns).is_empty());
    let json = serde_json::to_value(&response).unwrap();
    assert_eq!(json["batchItemFailures"][0]["itemIdentifier"], "101");
}

#[tokio::test]
async fn an_empty_batch_publishes_nothing_and_succeeds() {
    let sns = FakeSns::default();
    let response = handle(&Event::default(), &sns).await;
    assert!(response.batch_item_failures.is_empty());
    assert!(sns.published.lock().unwrap().is_empty());
}
