//! The design the group commit replaced, kept only so `chorus-bench writer` can measure both in
//! the same run (`--legacy-store` on the writer). Removed once the numbers are in BENCHMARKS.md.
//!
//! [`MessageStore`] on DynamoDB: one table holds messages and the writer's bookkeeping.
//!
//! Items (partition key `room` S, sort key `seq` N):
//! - message: `room` = the room id, `seq` ≥ 1, plus `id`, `sender`, `body`, `ts`.
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
use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem};
use chorus_protocol::api::HistoryPage;
use chorus_protocol::{Body, ClientMsgId, MessageEvent, RoomId, Seq, UserId};

use super::dynamo::sdk;
use super::item::{item_bytes, write_units};
use super::{Appended, MessageStore, Meter, NewMessage, StoreError, Usage, now_rfc3339_ms};

/// First character of the old design's bookkeeping keys (no room id can contain it).
const BOOKKEEPING_PREFIX: char = '#';

/// The old design's message item.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct StoredMessage {
    room: RoomId,
    seq: Seq,
    id: ClientMsgId,
    sender: UserId,
    body: Body,
    ts: String,
}

impl From<StoredMessage> for MessageEvent {
    fn from(m: StoredMessage) -> Self {
        MessageEvent {
            room: m.room,
            seq: m.seq,
            id: m.id,
            sender: m.sender,
            body: m.body,
            ts: m.ts,
        }
    }
}

/// How many times a send re-reads the head after losing a race before giving up.
const MAX_ATTEMPTS: u32 = 20;

/// The old DynamoDB-backed store.
#[derive(Debug, Clone)]
pub struct LegacyStore {
    client: Client,
    table: String,
    meter: std::sync::Arc<Meter>,
}

impl LegacyStore {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        LegacyStore {
            client,
            table: table.into(),
            meter: std::sync::Arc::default(),
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
        self.meter.read(1);
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
        self.meter.read(1);
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
impl MessageStore for LegacyStore {
    fn usage(&self) -> Usage {
        self.meter.usage()
    }

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
            let head_item_for_size = {
                let mut item = bookkeeping_key(head_key(&msg.room));
                item.insert("head".into(), AttributeValue::N(seq.to_string()));
                item
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
            };
            let message_item: HashMap<String, AttributeValue> =
                serde_dynamo::to_item(&stored).context("encoding the message item")?;

            let mut idem_item = bookkeeping_key(idem_key(&msg.room, &msg.sender, msg.id.as_str()));
            idem_item.insert("msg_seq".into(), AttributeValue::N(seq.to_string()));
            idem_item.insert("ts".into(), AttributeValue::S(ts.clone()));

            // A transaction bills each item twice; a cancelled one is billed too.
            let units: u64 = [&head_item_for_size, &message_item, &idem_item]
                .iter()
                .map(|i| write_units(item_bytes(i)))
                .sum();
            self.meter.wrote(2 * units);
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
                    self.meter.stored(1);
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
                    self.meter.lost_race();
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
            reason: format!("gave up allocating a seq after {MAX_ATTEMPTS} conflicting attempts"),
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
