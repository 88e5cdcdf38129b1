//! The three DynamoDB Streams calls the poller makes, behind [`StreamSource`] so its scheduling
//! (lineage, per-shard backoff, forgetting finished shards) is unit-tested on a fake stream;
//! [`DynamoDbStream`] is the real one, exercised against the emulator in `tests/e2e`.

use aws_sdk_dynamodbstreams::Client;
use aws_sdk_dynamodbstreams::error::SdkError;
use aws_sdk_dynamodbstreams::types::{Record, ShardIteratorType};

use crate::BoxError;

/// One shard as the stream describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub id: String,
    /// The shard this one was split from; its records come first.
    pub parent: Option<String>,
}

/// Where a shard iterator starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest record still in the shard.
    TrimHorizon,
    /// Just after this sequence number (the last one handled).
    After(String),
}

/// One GetRecords answer.
#[derive(Debug, Default)]
pub struct Page {
    pub records: Vec<Record>,
    /// `None`: the shard is closed and every record has been read.
    pub next_iterator: Option<String>,
}

/// A failed stream call; `call` names it (and its shard or position).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The position asked for is older than the shard's trim horizon (24 h on AWS).
    #[error("{call}: the position is older than the shard's trim horizon")]
    Trimmed { call: String },
    /// The stream answered DescribeStream without a description.
    #[error("stream {stream_arn} has no description")]
    NoDescription { stream_arn: String },
    /// The stream kept answering with a next page of shards.
    #[error("describing {stream_arn}: more than {MAX_DESCRIBE_PAGES} pages of shards")]
    EndlessShardList { stream_arn: String },
    /// Anything else (throttling, expired iterator, network); retried.
    #[error("{call}")]
    Failed {
        call: String,
        #[source]
        source: BoxError,
    },
}

impl StreamError {
    /// `call` failed because of `source` (an SDK error; a fake stream's reason in tests).
    pub fn failed(call: impl Into<String>, source: impl Into<BoxError>) -> Self {
        StreamError::Failed {
            call: call.into(),
            source: source.into(),
        }
    }
}

/// The DynamoDB Streams calls the poller makes on one stream.
#[async_trait::async_trait]
pub trait StreamSource: Send + Sync {
    /// The stream's ARN (it names the stream in checkpoints and in records' `eventSourceARN`).
    fn stream_arn(&self) -> &str;

    /// Every shard the stream describes now, all pages of them.
    ///
    /// # Errors
    /// When the stream cannot be described.
    async fn shards(&self) -> Result<Vec<ShardInfo>, StreamError>;

    /// An iterator into `shard_id` from `start`; `None` when the shard is closed and fully read.
    ///
    /// # Errors
    /// [`StreamError::Trimmed`] when `start` is older than the trim horizon.
    async fn iterator(
        &self,
        shard_id: &str,
        start: &StartAt,
    ) -> Result<Option<String>, StreamError>;

    /// Up to `limit` records from `iterator`.
    ///
    /// # Errors
    /// When the read fails; the iterator must not be used again.
    async fn records(&self, iterator: String, limit: i32) -> Result<Page, StreamError>;
}

/// [`StreamSource`] on DynamoDB Streams (or an emulator of it).
#[derive(Debug, Clone)]
pub struct DynamoDbStream {
    client: Client,
    stream_arn: String,
}

impl DynamoDbStream {
    pub fn new(client: Client, stream_arn: impl Into<String>) -> Self {
        DynamoDbStream {
            client,
            stream_arn: stream_arn.into(),
        }
    }
}

/// Most DescribeStream pages read in one listing (100 shards a page): a guard against an endpoint
/// that keeps answering with a next page.
const MAX_DESCRIBE_PAGES: usize = 1000;

#[async_trait::async_trait]
impl StreamSource for DynamoDbStream {
    fn stream_arn(&self) -> &str {
        &self.stream_arn
    }

    async fn shards(&self) -> Result<Vec<ShardInfo>, StreamError> {
        let mut shards = Vec::new();
        let mut start: Option<String> = None;
        for _ in 0..MAX_DESCRIBE_PAGES {
            let out = self
                .client
                .describe_stream()
                .stream_arn(&self.stream_arn)
                .set_exclusive_start_shard_id(start.clone())
                .send()
                .await
                .map_err(|e| StreamError::failed(format!("describing {}", self.stream_arn), e))?;
            let description = out
                .stream_description
                .ok_or_else(|| StreamError::NoDescription {
                    stream_arn: self.stream_arn.clone(),
                })?;
            shards.extend(
                description
                    .shards
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|shard| {
                        Some(ShardInfo {
                            id: shard.shard_id?,
                            parent: shard.parent_shard_id,
                        })
                    }),
            );
            match description.last_evaluated_shard_id {
                Some(last) if start.as_deref() != Some(last.as_str()) => start = Some(last),
                _ => return Ok(shards),
            }
        }
        Err(StreamError::EndlessShardList {
            stream_arn: self.stream_arn.clone(),
        })
    }

    async fn iterator(
        &self,
        shard_id: &str,
        start: &StartAt,
    ) -> Result<Option<String>, StreamError> {
        let request = self
            .client
            .get_shard_iterator()
            .stream_arn(&self.stream_arn)
            .shard_id(shard_id);
        let request = match start {
            StartAt::TrimHorizon => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
            StartAt::After(seq) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .sequence_number(seq),
        };
        match request.send().await {
            Ok(out) => Ok(out.shard_iterator),
            Err(SdkError::ServiceError(e)) if e.err().is_trimmed_data_access_exception() => {
                Err(StreamError::Trimmed {
                    call: format!("GetShardIterator {shard_id} {start:?}"),
                })
            }
            Err(e) => Err(StreamError::failed(
                format!("GetShardIterator {shard_id}"),
                e,
            )),
        }
    }

    async fn records(&self, iterator: String, limit: i32) -> Result<Page, StreamError> {
        match self
            .client
            .get_records()
            .shard_iterator(iterator)
            .limit(limit)
            .send()
            .await
        {
            Ok(out) => Ok(Page {
                records: out.records.unwrap_or_default(),
                next_iterator: out.next_shard_iterator,
            }),
            Err(SdkError::ServiceError(e)) if e.err().is_trimmed_data_access_exception() => {
                Err(StreamError::Trimmed {
                    call: "GetRecords".into(),
                })
            }
            Err(e) => Err(StreamError::failed("GetRecords", e)),
        }
    }
}
