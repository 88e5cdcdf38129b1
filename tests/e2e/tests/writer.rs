//! The writer's store on the emulator's DynamoDB (real conditional puts and consistent queries):
//! two writers racing on one room, a writer that starts later answering retries, retention, and
//! the refusal of a table written by the old design. Items are read back from the table itself.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use chorus_protocol::{Body, ClientMsgId, RoomId, Seq, StoredBatch, UserId};
use chorus_testkit::emulator::aws;
use chorus_writer::store::{
    Clock as _, DynamoStore, DynamoTable, ManualClock, MessageStore as _, NewMessage, Settings,
    StoreError, SystemClock, ensure_table,
};

/// A fresh table on the emulator.
async fn table() -> (aws_sdk_dynamodb::Client, String) {
    let client = aws_sdk_dynamodb::Client::new(&aws().await);
    let name = format!(
        "writer-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    ensure_table(&client, &name).await.unwrap();
    (client, name)
}

fn store(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    clock: Option<Arc<ManualClock>>,
) -> DynamoStore {
    let settings = Settings {
        retention: Duration::from_secs(3600),
        dedupe_window: Duration::from_secs(60),
        ..Settings::default()
    };
    let table = DynamoTable::new(client.clone(), table);
    match clock {
        Some(clock) => DynamoStore::with_clock(table, settings, clock),
        None => DynamoStore::new(table, settings),
    }
}

fn message(room: &str, sender: &str, id: &str) -> NewMessage {
    NewMessage {
        room: RoomId::parse(room).unwrap(),
        id: ClientMsgId::parse(id).unwrap(),
        sender: UserId::parse(sender).unwrap(),
        body: Body::parse(format!("body of {id}")).unwrap(),
    }
}

/// Every message item of `room`, read from the table.
async fn items(client: &aws_sdk_dynamodb::Client, table: &str, room: &str) -> Vec<StoredBatch> {
    let out = client
        .query()
        .table_name(table)
        .key_condition_expression("#r = :room AND #s > :zero")
        .expression_attribute_names("#r", "room")
        .expression_attribute_names("#s", "seq")
        .expression_attribute_values(":room", AttributeValue::S(room.into()))
        .expression_attribute_values(":zero", AttributeValue::N("0".into()))
        .consistent_read(true)
        .send()
        .await
        .unwrap();
    serde_dynamo::from_items(out.items.unwrap_or_default()).unwrap()
}

#[tokio::test]
async fn two_writers_on_one_room_tile_its_seqs_and_store_each_id_once() {
    let (client, name) = table().await;
    let writers = [store(&client, &name, None), store(&client, &name, None)];
    let mut sends = Vec::new();
    for i in 0..60 {
        let writer = writers[i % 2].clone();
        let other = writers[(i + 1) % 2].clone();
        sends.push(tokio::spawn(async move {
            let msg = message("race", &format!("user-{}", i % 7), &format!("m{i}"));
            let first = writer.append(msg.clone()).await.unwrap();
            // Every fourth is retried through the other writer once acked.
            if i % 4 == 0 {
                let again = other.append(msg).await.unwrap();
                assert_eq!((again.seq, again.duplicate), (first.seq, true), "m{i}");
            }
            first.seq.0
        }));
    }
    let mut seqs = Vec::new();
    for send in sends {
        seqs.push(send.await.unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=60).collect::<Vec<u64>>());

    let stored = items(&client, &name, "race").await;
    let mut next = 1;
    let mut ids = HashSet::new();
    for item in &stored {
        item.check().unwrap();
        assert_eq!(item.seq, Seq(next), "items tile the seq space");
        next = item.last.0 + 1;
        ids.extend(item.msgs.iter().map(|m| m.id.to_string()));
    }
    assert_eq!((next, ids.len()), (61, 60), "60 messages, each stored once");
    assert!(
        stored.len() < 60,
        "concurrent sends shared items: {} items",
        stored.len()
    );
    let page = writers[1]
        .history(&RoomId::parse("race").unwrap(), Seq(0), 500)
        .await
        .unwrap();
    assert_eq!(page.head, Seq(60));
    let history: Vec<u64> = page.messages.iter().map(|m| m.seq.0).collect();
    assert_eq!(history, (1..=60).collect::<Vec<u64>>());
}

#[tokio::test]
async fn a_writer_started_later_answers_retries_from_the_table_and_writes_after_it() {
    let (client, name) = table().await;
    let first = store(&client, &name, None);
    for i in 0..5 {
        first
            .append(message("lobby", "john", &format!("m{i}")))
            .await
            .unwrap();
    }
    let restarted = store(&client, &name, None);
    let retry = restarted
        .append(message("lobby", "john", "m2"))
        .await
        .unwrap();
    assert_eq!((retry.seq, retry.duplicate), (Seq(3), true));
    let new = restarted
        .append(message("lobby", "john", "m5"))
        .await
        .unwrap();
    assert_eq!((new.seq, new.duplicate), (Seq(6), false));
}

#[tokio::test]
async fn items_carry_their_ttl_and_history_past_retention_is_refused() {
    let (client, name) = table().await;
    let t0 = SystemClock.now_ms() / 1000 * 1000;
    let clock = ManualClock::at(t0);
    let writer = store(&client, &name, Some(clock.clone()));
    let lobby = RoomId::parse("lobby").unwrap();
    writer
        .append(message("lobby", "john", "old"))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(1800));
    writer
        .append(message("lobby", "john", "new"))
        .await
        .unwrap();

    let stored = items(&client, &name, "lobby").await;
    assert_eq!(
        stored[0].ttl,
        t0 / 1000 + 3600,
        "retention written as the item's ttl"
    );

    clock.advance(Duration::from_secs(1801));
    let err = writer.history(&lobby, Seq(0), 10).await.unwrap_err();
    assert!(
        matches!(err, StoreError::HistoryExpired { oldest: Seq(2), .. }),
        "{err:?}"
    );
    let page = writer.history(&lobby, Seq(1), 10).await.unwrap();
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.messages[0].id.as_str(), "new");
    assert_eq!(
        writer.history(&lobby, Seq(0), 0).await.unwrap().head,
        Seq(2)
    );
}

#[tokio::test]
async fn a_table_written_by_the_old_design_is_refused_with_a_pointer_to_the_migration_note() {
    let (client, name) = table().await;
    client
        .put_item()
        .table_name(&name)
        .item("room", AttributeValue::S("#head#lobby".into()))
        .item("seq", AttributeValue::N("0".into()))
        .item("head", AttributeValue::N("3".into()))
        .send()
        .await
        .unwrap();
    let err = DynamoTable::new(client.clone(), &name)
        .check()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("old writer") && err.contains("Migration"),
        "{err}"
    );

    let (client, fresh) = table().await;
    DynamoTable::new(client, &fresh).check().await.unwrap();
}
