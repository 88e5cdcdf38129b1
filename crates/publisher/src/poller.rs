//! The stream poller: runs [`handle`](crate::handle) as a long-lived process reading the table's
//! stream itself, for the local stack (the emulator cannot run Lambda functions) and for installs
//! without Lambda.
//!
//! Each shard is read from its start (TRIM_HORIZON), then on with each read's next iterator. When
//! an iterator fails (expired, or invalidated as some emulators do) or a publish fails, a fresh
//! one is taken after the last record handled (AFTER_SEQUENCE_NUMBER): after a failed publish the
//! poller resumes at the failed record after a pause, exactly as Lambda retries a batch from the
//! reported failure. An idle shard is polled every `idle_interval`; a busy one back to back.
//! Positions live in memory: a restarted poller starts from the shard's start again, which
//! gateways absorb (they drop duplicates), at the cost of republishing up to 24 h of messages.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_lambda_events::dynamodb::{Event, EventRecord, StreamRecord};
use aws_sdk_dynamodbstreams::Client;
use aws_sdk_dynamodbstreams::error::DisplayErrorContext;
use aws_sdk_dynamodbstreams::types::{Record, ShardIteratorType};
use tokio_util::sync::CancellationToken;

use chorus_service::metrics::{Counter, Exposition};

use crate::{BatchOutcome, DeadLetter, Publish, handle_with_outcome};

/// What the poller has done, for `/metrics` (`chorus-publisher poll --metrics-listen`). In Lambda
/// the same numbers are in each batch's `batch handled` log line.
#[derive(Debug, Default)]
pub struct PollerMetrics {
    pub batches: Counter,
    pub failed_batches: Counter,
    pub records: Counter,
    pub forwarded: Counter,
    pub skipped: Counter,
    pub poison: Counter,
    pub dead_lettered: Counter,
    pub sns_calls: Counter,
    pub sns_messages: Counter,
    pub read_errors: Counter,
}

impl PollerMetrics {
    fn record(&self, outcome: &BatchOutcome) {
        if outcome.failed {
            self.failed_batches.inc();
        } else {
            self.batches.inc();
        }
        self.records.add(outcome.records as u64);
        self.forwarded.add(outcome.forwarded as u64);
        self.skipped.add(outcome.skipped as u64);
        self.poison.add(outcome.poison as u64);
        self.dead_lettered.add(outcome.dead_lettered as u64);
        self.sns_calls.add(outcome.sns_calls as u64);
        self.sns_messages.add(outcome.sns_messages as u64);
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        Exposition::new()
            .counter(
                "chorus_publisher_batches_total",
                "Stream batches handled, by outcome.",
                "result",
                &[("ok", &self.batches), ("failed", &self.failed_batches)],
            )
            .counter(
                "chorus_publisher_records_total",
                "Stream records, by what became of them.",
                "kind",
                &[
                    ("read", &self.records),
                    ("forwarded", &self.forwarded),
                    ("skipped", &self.skipped),
                    ("poison", &self.poison),
                    ("dead_lettered", &self.dead_lettered),
                ],
            )
            .counter(
                "chorus_publisher_sns_total",
                "SNS calls made and messages published.",
                "kind",
                &[("calls", &self.sns_calls), ("messages", &self.sns_messages)],
            )
            .counter(
                "chorus_publisher_stream_read_errors_total",
                "Failed stream reads (retried).",
                "",
                &[("", &self.read_errors)],
            )
            .finish()
    }
}

/// How the poller reads.
#[derive(Debug, Clone)]
pub struct PollerConfig {
    pub stream_arn: String,
    /// Records per GetRecords call (1–1000), i.e. the batch size the handler sees.
    pub batch_size: i32,
    /// Pause when no shard had records.
    pub idle_interval: Duration,
    /// Pause after a failed publish or read before retrying.
    pub retry_interval: Duration,
}

/// Polls until `shutdown` is cancelled.
///
/// # Errors
/// Only when the stream cannot be described at start (wrong ARN, no access); later failures are
/// logged and retried.
pub async fn run(
    client: &Client,
    config: &PollerConfig,
    publisher: &dyn Publish,
    dead_letters: Option<&dyn DeadLetter>,
    metrics: &PollerMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut shards: BTreeMap<String, ShardPosition> = BTreeMap::new();
    refresh_shards(client, &config.stream_arn, &mut shards).await?;
    tracing::info!(stream = %config.stream_arn, shards = shards.len(), "polling stream");
    let mut last_refresh = tokio::time::Instant::now();

    while !shutdown.is_cancelled() {
        if last_refresh.elapsed() > Duration::from_secs(10) {
            if let Err(e) = refresh_shards(client, &config.stream_arn, &mut shards).await {
                tracing::warn!(error.message = %e, "describing the stream failed");
            }
            last_refresh = tokio::time::Instant::now();
        }
        let mut pause = config.idle_interval;
        for (shard_id, position) in &mut shards {
            match poll_shard(
                client,
                config,
                shard_id,
                position,
                publisher,
                dead_letters,
                metrics,
            )
            .await
            {
                Ok(0) => {}
                Ok(_) => pause = Duration::ZERO,
                Err(e) => {
                    metrics.read_errors.inc();
                    tracing::warn!(shard = %shard_id, error.message = %e, "poll failed: retrying");
                    pause = config.retry_interval;
                }
            }
        }
        if !pause.is_zero() {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
    tracing::info!("poller stopped");
    Ok(())
}

/// Where the poller is in one shard.
#[derive(Debug, Default)]
struct ShardPosition {
    /// Last sequence number handled (None: nothing yet, start from TRIM_HORIZON).
    handled: Option<String>,
    /// The iterator to read next with, if the last read left a usable one.
    iterator: Option<String>,
}

async fn refresh_shards(
    client: &Client,
    stream_arn: &str,
    shards: &mut BTreeMap<String, ShardPosition>,
) -> anyhow::Result<()> {
    let out = client
        .describe_stream()
        .stream_arn(stream_arn)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("describing {stream_arn}: {}", DisplayErrorContext(&e)))?;
    let description = out
        .stream_description
        .ok_or_else(|| anyhow::anyhow!("stream {stream_arn} has no description"))?;
    for shard in description.shards.unwrap_or_default() {
        if let Some(id) = shard.shard_id {
            shards.entry(id).or_default();
        }
    }
    Ok(())
}

/// Reads one batch from a shard and hands it to the handler. Returns how many records were read.
async fn poll_shard(
    client: &Client,
    config: &PollerConfig,
    shard_id: &str,
    position: &mut ShardPosition,
    publisher: &dyn Publish,
    dead_letters: Option<&dyn DeadLetter>,
    metrics: &PollerMetrics,
) -> anyhow::Result<usize> {
    let iterator = match position.iterator.take() {
        Some(iterator) => iterator,
        None => {
            let request = client
                .get_shard_iterator()
                .stream_arn(&config.stream_arn)
                .shard_id(shard_id);
            let request = match &position.handled {
                Some(seq) => request
                    .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                    .sequence_number(seq.as_str()),
                None => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
            };
            request
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("GetShardIterator: {}", DisplayErrorContext(&e)))?
                .shard_iterator
                .ok_or_else(|| anyhow::anyhow!("shard {shard_id} is closed and fully read"))?
        }
    };
    let output = client
        .get_records()
        .shard_iterator(iterator)
        .limit(config.batch_size)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("GetRecords: {}", DisplayErrorContext(&e)))?;
    let records = output.records.unwrap_or_default();
    if records.is_empty() {
        position.iterator = output.next_shard_iterator;
        return Ok(0);
    }

    let mut event = Event::default();
    event.records = records
        .iter()
        .map(|r| to_lambda_record(r, &config.stream_arn))
        .collect();
    let (response, outcome) = handle_with_outcome(&event, publisher, dead_letters).await;
    metrics.record(&outcome);

    let failed_at = response
        .batch_item_failures
        .first()
        .and_then(|f| f.item_identifier.as_deref())
        .and_then(|id| {
            event
                .records
                .iter()
                .position(|r| r.change.sequence_number.as_deref() == Some(id))
        });
    let done = failed_at.unwrap_or(event.records.len());
    if done > 0 {
        position.handled = event.records[done - 1].change.sequence_number.clone();
    }
    if failed_at.is_none() {
        position.iterator = output.next_shard_iterator;
    } else {
        anyhow::bail!("publish failed at record {done} of {}", event.records.len());
    }
    Ok(records.len())
}

/// The record as Lambda's event source mapping would deliver it.
pub fn to_lambda_record(record: &Record, stream_arn: &str) -> EventRecord {
    let mut out = EventRecord::default();
    out.event_id = record.event_id.clone().unwrap_or_default();
    out.event_name = record
        .event_name
        .as_ref()
        .map(|n| n.as_str().to_owned())
        .unwrap_or_default();
    out.event_source = record.event_source.clone();
    out.event_version = record.event_version.clone();
    out.aws_region = record.aws_region.clone().unwrap_or_default();
    out.event_source_arn = Some(stream_arn.to_owned());
    if let Some(change) = &record.dynamodb {
        let mut stream_record = StreamRecord::default();
        stream_record.keys = change.keys.clone().unwrap_or_default().into();
        stream_record.new_image = change.new_image.clone().unwrap_or_default().into();
        stream_record.old_image = change.old_image.clone().unwrap_or_default().into();
        stream_record.sequence_number = change.sequence_number.clone();
        stream_record.size_bytes = change.size_bytes.unwrap_or_default();
        if let Some(at) = change.approximate_creation_date_time {
            stream_record.approximate_creation_date_time =
                chrono::DateTime::from_timestamp(at.secs(), at.subsec_nanos()).unwrap_or_default();
        }
        out.change = stream_record;
    }
    out
}
