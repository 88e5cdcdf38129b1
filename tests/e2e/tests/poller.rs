//! The stream poller binary with `--checkpoint-file`, against the emulator's real stream: a
//! restart resumes where the last run stopped instead of re-publishing the stream, and a corrupt
//! checkpoint stops start-up with a message that says what to do.

use std::path::Path;
use std::time::Duration;

use chorus_e2e::{Service, start_publisher, table_and_topic};
use chorus_protocol::{Body, ClientMsgId, RoomId, UserId};
use chorus_testkit::emulator::aws;
use chorus_writer::store::{DynamoStore, DynamoTable, MessageStore as _, NewMessage, Settings};

async fn write(store: &DynamoStore, ids: std::ops::RangeInclusive<u32>) {
    for i in ids {
        store
            .append(NewMessage {
                room: RoomId::parse("lobby").unwrap(),
                id: ClientMsgId::parse(format!("m{i}")).unwrap(),
                sender: UserId::parse("john").unwrap(),
                body: Body::parse(format!("message {i}")).unwrap(),
            })
            .await
            .unwrap();
    }
}

fn start_poller(table: &str, topic_arn: &str, checkpoint: &Path) -> anyhow::Result<Service> {
    start_publisher(table, topic_arn, Some(checkpoint))
}

fn forwarded(n: usize) -> String {
    format!("chorus_publisher_records_total{{kind=\"forwarded\"}} {n}")
}

#[tokio::test]
async fn a_poller_restarted_with_its_checkpoint_file_publishes_only_what_is_new() {
    let aws = aws().await;
    let (table, topic_arn) = table_and_topic("poller").await.unwrap();
    let store = DynamoStore::new(
        DynamoTable::new(aws_sdk_dynamodb::Client::new(&aws), &table),
        Settings::default(),
    );
    let checkpoint = std::env::temp_dir().join(format!("{table}-checkpoint.json"));

    write(&store, 1..=3).await;
    let mut poller = start_poller(&table, &topic_arn, &checkpoint).unwrap();
    poller.wait_for_metrics(&[&forwarded(3)]).await;
    let status = poller.terminate(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{status}; log:\n{}", poller.log());
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&checkpoint).expect("a checkpoint file")).unwrap();
    let shards = saved["shards"].as_object().unwrap();
    assert_eq!(shards.len(), 1, "{saved}");
    assert!(shards.values().all(|at| at["after"].is_string()), "{saved}");

    // Restarted after more messages: it forwards those two, not the stream from its start
    // (which would read all five in its first batch).
    write(&store, 4..=5).await;
    let poller = start_poller(&table, &topic_arn, &checkpoint).unwrap();
    poller.wait_for_metrics(&[&forwarded(2)]).await;
    drop(poller);
    let _ = std::fs::remove_file(&checkpoint);
}

#[tokio::test]
async fn a_corrupt_checkpoint_file_stops_the_poller_at_start_with_what_to_do() {
    let (table, topic_arn) = table_and_topic("poller").await.unwrap();
    let checkpoint = std::env::temp_dir().join(format!("{table}-checkpoint.json"));
    std::fs::write(&checkpoint, "{\"version\":1,\"stream_arn\":").unwrap();

    let err = match start_poller(&table, &topic_arn, &checkpoint) {
        Ok(poller) => panic!("started with a corrupt checkpoint; log:\n{}", poller.log()),
        Err(err) => format!("{err:#}"),
    };
    let _ = std::fs::remove_file(&checkpoint);
    assert!(
        err.contains("exited during start-up")
            && err.contains("is not a poller checkpoint")
            && err.contains("delete it"),
        "{err}"
    );
}
