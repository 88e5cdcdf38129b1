//! [`MessageStore`] on DynamoDB: one table holds messages and the writer's bookkeeping.
//!
//! Items (partition key `room` S, sort key `seq` N):
//! - message: `room` = the room id, `seq` ≥ 1, plus `id`, `sender`, `body`, `ts` ([`StoredMessage`]).
//! - room head: `room` = `#head#<room>`, `seq` = 0, `head` N = the room's latest seq.
//! - idempotency key: `room` = `#idem#<room>#<sender>#<id>`, `seq` = 0, `msg_seq` N, `ts` S.
//!
//! A send is one transaction of three conditional puts: the head moves from h to h+1 (condition: it
//! is still h), the message is written at h+1 (condition: nothing there), the idempotency key is
//! written (condition: not there yet). Two writers racing for h+1 cannot both commit; the loser
//! re-reads the head and tries again. A retried send fails on the idempotency condition and is
//! answered from the stored key. So seqs are dense, never reused, and a client id is stored once,
//! with any number of writer instances. See docs/decisions/0001-dense-seq-and-idempotency.md.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::DisplayErrorContext;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, Put,
    ScalarAttributeType, StreamSpecification, StreamViewType, TableStatus, TransactWriteItem,
};
use chorus_protocol::api::HistoryPage;
use chorus_protocol::message::BOOKKEEPING_PREFIX;
use chorus_protocol::{MessageEvent, RoomId, Seq, StoredMessage, UserId};

use super::{Appended, MessageStore, NewMessage, StoreError, now_rfc3339_ms};

/// How many times a send re-reads the head after losing a race before giving up.
const MAX_ATTEMPTS: u32 = 20;

/// The DynamoDB-backed store. Cheap to clone: the SDK client is an `Arc` inside.
#[derive(Debug, Clone)]
pub struct DynamoStore {
    client: Client,
    table: String,
}

impl DynamoStore {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        DynamoStore {
            client,
            table: table.into(),
        }
    }

    /// Checks that the table exists, so a misconfigured writer fails at start, not at first send.
    ///
    /// # Errors
    /// When the table cannot be described.
    pub async fn check(&self) -> Result<(), StoreError> {
        self.client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map_err(sdk("describing the table"))?;
        Ok(())
    }

    async fn read_head(&self, room: &RoomId) -> Result<Seq, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(bookkeeping_key(head_key(room))))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk("reading room head"))?;
        let Some(item) = out.item else {
            return Ok(Seq(0));
        };
        Ok(Seq(number(&item, "head")?))
    }

    async fn read_idempotency_key(&self, msg: &NewMessage) -> Result<Option<Appended>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(bookkeeping_key(idem_key(
                &msg.room,
                &msg.sender,
                msg.id.as_str(),
            ))))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk("reading idempotency key"))?;
        let Some(item) = out.item else {
            return Ok(None);
        };
        let seq = Seq(number(&item, "msg_seq")?);
        let ts = match item.get("ts") {
            Some(AttributeValue::S(ts)) => ts.clone(),
            _ => return Err(anyhow::anyhow!("idempotency item without ts").into()),
        };
        Ok(Some(Appended {
            seq,
            ts,
            duplicate: true,
        }))
    }

    fn put(
        &self,
        item: HashMap<String, AttributeValue>,
        condition: &str,
    ) -> Result<TransactWriteItem, StoreError> {
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression(condition)
            .expression_attribute_names("#r", "room")
            .build()
            .context("building a put")?;
        Ok(TransactWriteItem::builder().put(put).build())
    }
}

#[async_trait::async_trait]
impl MessageStore for DynamoStore {
    async fn append(&self, msg: NewMessage) -> Result<Appended, StoreError> {
        for attempt in 0..MAX_ATTEMPTS {
            let head = self.read_head(&msg.room).await?;
            let seq = head.next();
            let ts = now_rfc3339_ms();

            let mut head_item = bookkeeping_key(head_key(&msg.room));
            head_item.insert("head".into(), AttributeValue::N(seq.to_string()));
            let mut head_put = Put::builder()
                .table_name(&self.table)
                .set_item(Some(head_item));
            // DynamoDB refuses expression names an expression does not use: set only these.
            head_put = if head == Seq(0) {
                head_put
                    .condition_expression("attribute_not_exists(#r)")
                    .expression_attribute_names("#r", "room")
            } else {
                head_put
                    .condition_expression("#h = :prev")
                    .expression_attribute_names("#h", "head")
                    .expression_attribute_values(":prev", AttributeValue::N(head.to_string()))
            };
            let head_put = TransactWriteItem::builder()
                .put(head_put.build().context("building the head put")?)
                .build();

            let stored = StoredMessage {
                room: msg.room.clone(),
                seq,
                id: msg.id.clone(),
                sender: msg.sender.clone(),
                body: msg.body.clone(),
                ts: ts.clone(),
                ttl: None,
            };
            let message_item: HashMap<String, AttributeValue> =
                serde_dynamo::to_item(&stored).context("encoding the message item")?;

            let mut idem_item = bookkeeping_key(idem_key(&msg.room, &msg.sender, msg.id.as_str()));
            idem_item.insert("msg_seq".into(), AttributeValue::N(seq.to_string()));
            idem_item.insert("ts".into(), AttributeValue::S(ts.clone()));

            let result = self
                .client
                .transact_write_items()
                .transact_items(head_put)
                .transact_items(self.put(message_item, "attribute_not_exists(#r)")?)
                .transact_items(self.put(idem_item, "attribute_not_exists(#r)")?)
                .send()
                .await;
            match result {
                Ok(_) => {
                    return Ok(Appended {
                        seq,
                        ts,
                        duplicate: false,
                    });
                }
                Err(err)
                    if err
                        .as_service_error()
                        .is_some_and(|e| e.is_transaction_canceled_exception()) =>
                {
                    // Either the id was stored before (answer from it) or another writer took
                    // this seq (re-read the head and try again).
                    if let Some(original) = self.read_idempotency_key(&msg).await? {
                        return Ok(original);
                    }
                    tracing::debug!(room = %msg.room, attempt, "seq race lost, retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(err) => {
                    return Err(sdk("writing the message transaction")(err).into());
                }
            }
        }
        Err(StoreError::Contention {
            room: msg.room,
            attempts: MAX_ATTEMPTS,
        })
    }

    async fn history(
        &self,
        room: &RoomId,
        after: Seq,
        limit: u32,
    ) -> Result<HistoryPage, StoreError> {
        let head = self.read_head(room).await?;
        let mut messages = Vec::new();
        if limit > 0 {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("#r = :room AND #s > :after")
                .expression_attribute_names("#r", "room")
                .expression_attribute_names("#s", "seq")
                .expression_attribute_values(":room", AttributeValue::S(room.to_string()))
                .expression_attribute_values(":after", AttributeValue::N(after.to_string()))
                .consistent_read(true)
                .scan_index_forward(true)
                .limit(i32::try_from(limit).unwrap_or(i32::MAX))
                .send()
                .await
                .map_err(sdk("querying history"))?;
            let stored: Vec<StoredMessage> =
                serde_dynamo::from_items(out.items.unwrap_or_default())
                    .context("decoding stored messages")?;
            messages = stored.into_iter().map(MessageEvent::from).collect();
        }
        // A send may commit between the two reads: the head is never below what the page holds.
        let head = messages.last().map_or(head, |m| m.seq.max(head));
        Ok(HistoryPage { head, messages })
    }
}

/// Turns an SDK error into one whose message says what the service answered (the SDK's own
/// `Display` says only "service error").
fn sdk<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
) -> impl FnOnce(E) -> anyhow::Error {
    move |err| anyhow::anyhow!("{what}: {}", DisplayErrorContext(&err))
}

fn head_key(room: &RoomId) -> String {
    format!("{BOOKKEEPING_PREFIX}head{BOOKKEEPING_PREFIX}{room}")
}

fn idem_key(room: &RoomId, sender: &UserId, id: &str) -> String {
    // None of the three parts can contain '#' (their alphabets leave it out), so the key is
    // unambiguous.
    let p = BOOKKEEPING_PREFIX;
    format!("{p}idem{p}{room}{p}{sender}{p}{id}")
}

fn bookkeeping_key(room_key: String) -> HashMap<String, AttributeValue> {
    HashMap::from([
        ("room".to_owned(), AttributeValue::S(room_key)),
        ("seq".to_owned(), AttributeValue::N("0".to_owned())),
    ])
}

fn number(item: &HashMap<String, AttributeValue>, name: &str) -> Result<u64, StoreError> {
    match item.get(name) {
        Some(AttributeValue::N(n)) => n
            .parse()
            .with_context(|| format!("attribute {name} is not a u64: {n:?}"))
            .map_err(Into::into),
        _ => Err(anyhow::anyhow!("item has no numeric attribute {name}").into()),
    }
}

/// 5, 10, 20 … ms, capped at 200 ms, with up to 50% jitter so racing writers spread out.
fn backoff(attempt: u32) -> Duration {
    let base = 5u64.saturating_mul(1 << attempt.min(6)).min(200);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()))
        .unwrap_or(0);
    Duration::from_millis(base + (nanos % (base / 2 + 1)))
}

/// Creates the messages table (keys `room` S / `seq` N, on-demand billing, stream NEW_IMAGE) if it
/// does not exist, waits until it is active, and returns its stream ARN.
///
/// For the local emulator and first-time set-up; production tables come from CloudFormation.
///
/// # Errors
/// When the table cannot be described or created, has no stream, or is not active within 60 s.
pub async fn ensure_table(client: &Client, table: &str) -> anyhow::Result<String> {
    let exists = match client.describe_table().table_name(table).send().await {
        Ok(_) => true,
        Err(err)
            if err
                .as_service_error()
                .is_some_and(|e| e.is_resource_not_found_exception()) =>
        {
            false
        }
        Err(err) => return Err(sdk("describing the table")(err)),
    };
    if !exists {
        tracing::info!(table, "creating table");
        let created = client
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attribute("room", ScalarAttributeType::S)?)
            .attribute_definitions(attribute("seq", ScalarAttributeType::N)?)
            .key_schema(key("room", KeyType::Hash)?)
            .key_schema(key("seq", KeyType::Range)?)
            .stream_specification(
                StreamSpecification::builder()
                    .stream_enabled(true)
                    .stream_view_type(StreamViewType::NewImage)
                    .build()?,
            )
            .send()
            .await;
        if let Err(err) = created {
            // Another process may have created it between our describe and create.
            if !err
                .as_service_error()
                .is_some_and(|e| e.is_resource_in_use_exception())
            {
                return Err(sdk("creating the table")(err));
            }
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let table_desc = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(sdk("describing the table"))?
            .table
            .context("describe_table returned no table")?;
        if table_desc.table_status == Some(TableStatus::Active) {
            return table_desc
                .latest_stream_arn
                .with_context(|| format!("table {table} has no stream: enable NEW_IMAGE streams"));
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "table {table} not active after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn attribute(name: &str, kind: ScalarAttributeType) -> anyhow::Result<AttributeDefinition> {
    Ok(AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(kind)
        .build()?)
}

fn key(name: &str, kind: KeyType) -> anyhow::Result<KeySchemaElement> {
    Ok(KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kind)
        .build()?)
}
