//! [`Table`] on DynamoDB: one conditional `PutItem` per commit, consistent `Query`s to read a
//! room's items, and the room marker at sort key 0. Also [`ensure_table`], which creates the
//! table for local stacks.

use std::time::Duration;

use anyhow::Context as _;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, StreamSpecification, StreamViewType, TableStatus, TimeToLiveSpecification,
};
use chorus_protocol::message::MARKER_SEQ;
use chorus_protocol::{RoomId, Seq, StoredBatch};

use super::item::{
    Item, Marker, decode_batch, decode_marker, encode_batch, encode_marker, item_bytes, key,
    read_units, write_units,
};
use super::{ItemPage, Meter, Put, StoreError, Table};

/// The table's TTL attribute: every message item carries it, the marker does not.
const TTL_ATTRIBUTE: &str = "ttl";

/// The messages table on DynamoDB. Cheap to clone: the SDK client is an `Arc` inside.
#[derive(Debug, Clone)]
pub struct DynamoTable {
    client: Client,
    table: String,
    meter: std::sync::Arc<Meter>,
}

impl DynamoTable {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        DynamoTable {
            client,
            table: table.into(),
            meter: std::sync::Arc::default(),
        }
    }

    /// Checks that the table exists and holds items this writer can read, so a misconfigured
    /// writer fails at start, not at first send. A table written by the old design (a head item
    /// and an idempotency item beside each message; keys starting with `#`) is refused: see the
    /// README's migration note.
    ///
    /// # Errors
    /// When the table cannot be described or read, or holds items of another format.
    pub async fn check(&self) -> anyhow::Result<()> {
        self.client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map_err(sdk("describing the table"))?;
        // Every item of an old-format table is old-format, so a few items tell.
        let out = self
            .client
            .scan()
            .table_name(&self.table)
            .limit(25)
            .send()
            .await
            .map_err(sdk("reading a few items"))?;
        for item in out.items.unwrap_or_default() {
            if let Some(reason) = foreign_item(&item) {
                anyhow::bail!(
                    "table {} holds an item this writer cannot read ({reason}): it was written by \
                     the old writer (one transaction per send). Point --table at a new table; see \
                     'Migration' in the README",
                    self.table
                );
            }
        }
        Ok(())
    }

    async fn query(
        &self,
        room: &RoomId,
        condition: &str,
        bounds: &[(&str, Seq)],
        forward: bool,
        limit: u32,
    ) -> Result<ItemPage, StoreError> {
        let mut request = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression(condition)
            .expression_attribute_names("#r", "room")
            .expression_attribute_names("#s", "seq")
            .expression_attribute_values(":room", AttributeValue::S(room.to_string()));
        for (name, seq) in bounds {
            request =
                request.expression_attribute_values(*name, AttributeValue::N(seq.to_string()));
        }
        let out = request
            .consistent_read(true)
            .scan_index_forward(forward)
            .limit(i32::try_from(limit.max(1)).unwrap_or(i32::MAX))
            .send()
            .await
            .map_err(sdk("querying items"))?;
        let raw = out.items.unwrap_or_default();
        self.meter
            .read(read_units(raw.iter().map(item_bytes).sum::<usize>()));
        let items = raw
            .into_iter()
            .map(decode_batch)
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(ItemPage {
            items,
            more: out.last_evaluated_key.is_some(),
        })
    }
}

#[async_trait::async_trait]
impl Table for DynamoTable {
    async fn put_new(&self, item: &StoredBatch) -> Result<Put, StoreError> {
        let encoded = encode_batch(item)?;
        self.meter.wrote(write_units(item_bytes(&encoded)));
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(encoded))
            .condition_expression("attribute_not_exists(#r)")
            .expression_attribute_names("#r", "room")
            .send()
            .await;
        conditional(result, "writing an item")
    }

    async fn read_from(
        &self,
        room: &RoomId,
        from: Seq,
        limit: u32,
    ) -> Result<ItemPage, StoreError> {
        let from = from.max(Seq(1));
        self.query(
            room,
            "#r = :room AND #s >= :from",
            &[(":from", from)],
            true,
            limit,
        )
        .await
    }

    async fn read_back(
        &self,
        room: &RoomId,
        at_most: Option<Seq>,
        limit: u32,
    ) -> Result<ItemPage, StoreError> {
        match at_most {
            Some(Seq(0)) => Ok(ItemPage::default()),
            Some(top) => {
                let bounds = [(":one", Seq(1)), (":top", top)];
                self.query(
                    room,
                    "#r = :room AND #s BETWEEN :one AND :top",
                    &bounds,
                    false,
                    limit,
                )
                .await
            }
            // Everything above the marker.
            None => {
                let bounds = [(":marker", MARKER_SEQ)];
                self.query(room, "#r = :room AND #s > :marker", &bounds, false, limit)
                    .await
            }
        }
    }

    async fn marker(&self, room: &RoomId) -> Result<Option<Marker>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(room, MARKER_SEQ)))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk("reading the room marker"))?;
        self.meter.read(1);
        Ok(out.item.as_ref().map(decode_marker).transpose()?)
    }

    async fn put_marker(
        &self,
        room: &RoomId,
        marker: &Marker,
        expected: Option<u64>,
    ) -> Result<Put, StoreError> {
        let item = encode_marker(room, marker);
        self.meter.wrote(write_units(item_bytes(&item)));
        let request = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item));
        // DynamoDB refuses expression names an expression does not use: set only these.
        let request = match expected {
            None => request
                .condition_expression("attribute_not_exists(#r)")
                .expression_attribute_names("#r", "room"),
            Some(reserved) => request
                .condition_expression("#v = :expected")
                .expression_attribute_names("#v", "reserved")
                .expression_attribute_values(":expected", AttributeValue::N(reserved.to_string())),
        };
        conditional(request.send().await, "writing the room marker")
    }

    fn meter(&self) -> &Meter {
        &self.meter
    }
}

fn conditional<T>(
    result: Result<T, SdkError<aws_sdk_dynamodb::operation::put_item::PutItemError>>,
    what: &'static str,
) -> Result<Put, StoreError> {
    match result {
        Ok(_) => Ok(Put::Written),
        Err(err)
            if err
                .as_service_error()
                .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
        {
            Ok(Put::Lost)
        }
        Err(err) => Err(sdk(what)(err).into()),
    }
}

/// Why an item is not one this writer wrote, if it is not.
fn foreign_item(item: &Item) -> Option<String> {
    let room = match item.get("room") {
        Some(AttributeValue::S(room)) => room,
        _ => return Some("no string `room`".into()),
    };
    if room.starts_with('#') {
        return Some(format!("bookkeeping key {room:?}"));
    }
    let marker = matches!(item.get("seq"), Some(AttributeValue::N(n)) if n == "0");
    if marker {
        return decode_marker(item)
            .err()
            .map(|e| format!("room {room} marker: {e}"));
    }
    decode_batch(item.clone())
        .err()
        .map(|e| format!("room {room}: {e:#}"))
}

/// Turns an SDK error into one whose message says what the service answered (the SDK's own
/// `Display` says only "service error").
pub(crate) fn sdk<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
) -> impl FnOnce(E) -> anyhow::Error {
    move |err| anyhow::anyhow!("{what}: {}", DisplayErrorContext(&err))
}

/// Creates the messages table (keys `room` S / `seq` N, on-demand billing, stream NEW_IMAGE, TTL
/// on `ttl`) if it does not exist, waits until it is active, and returns its stream ARN.
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
            .key_schema(key_element("room", KeyType::Hash)?)
            .key_schema(key_element("seq", KeyType::Range)?)
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
    let stream_arn = loop {
        let table_desc = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(sdk("describing the table"))?
            .table
            .context("describe_table returned no table")?;
        if table_desc.table_status == Some(TableStatus::Active) {
            break table_desc.latest_stream_arn.with_context(|| {
                format!("table {table} has no stream: enable NEW_IMAGE streams")
            })?;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "table {table} not active after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if !exists {
        // Expired items are filtered out by readers anyway; TTL makes DynamoDB delete them.
        client
            .update_time_to_live()
            .table_name(table)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .enabled(true)
                    .attribute_name(TTL_ATTRIBUTE)
                    .build()?,
            )
            .send()
            .await
            .map_err(sdk("enabling TTL"))?;
    }
    Ok(stream_arn)
}

fn attribute(name: &str, kind: ScalarAttributeType) -> anyhow::Result<AttributeDefinition> {
    Ok(AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(kind)
        .build()?)
}

fn key_element(name: &str, kind: KeyType) -> anyhow::Result<KeySchemaElement> {
    Ok(KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kind)
        .build()?)
}
