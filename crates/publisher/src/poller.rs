//! The stream poller: runs [`handle`](crate::handle) as a long-lived process reading the table's
//! stream itself, for the local stack (the emulator cannot run Lambda functions) and for installs
//! without Lambda.
//!
//! **Shards.** The stream is described at start and every `refresh_interval` (at once when a shard
//! ends, to find its children). A shard is read only once its parent (`ParentShardId`) is fully
//! read or gone from the description (trimmed): a room's messages move to the children when a shard
//! splits, so reading parent first keeps per-room order across splits, as Lambda does. A closed
//! shard that is fully read (no next iterator) is forgotten: never read again, remembered only by
//! id until the description drops it. A shard the description no longer lists is dropped.
//!
//! **Reads.** Each shard is read from its start (TRIM_HORIZON), or just after its checkpointed
//! position, then on with each read's next iterator. When a read fails (an expired iterator, one
//! invalidated as some emulators do) or a publish fails, a fresh iterator is taken after the last
//! record handled (AFTER_SEQUENCE_NUMBER): after a failed publish the shard resumes at the failed
//! record, exactly as Lambda retries a batch from the reported failure. A position older than the
//! trim horizon (TrimmedDataAccessException) falls back to TRIM_HORIZON, with a warning.
//!
//! **Pacing, per shard.** A shard that returned records is read again at once; an idle one after
//! `idle_interval`; a failing one after `retry_interval`, doubling with each consecutive failure up
//! to `max_retry_interval`. One failing shard never delays the others.
//!
//! **Checkpoint.** With a [`CheckpointStore`] (`chorus-publisher poll --checkpoint-file`), the
//! position of every shard (last sequence number handled, or "finished") is saved when it changed,
//! at most once per `checkpoint_interval` (1 s), and at shutdown; a restart resumes from it. Once a
//! second rather than after each batch: a crash then re-publishes at most about a second of
//! messages, which gateways drop as duplicates, and a busy stream does not pay a synced file
//! write per batch in its delivery path. Without a store, positions live in memory: a restarted
//! poller reads every shard from its start again, which gateways absorb (they drop duplicates), at
//! the cost of re-publishing up to 24 h of messages before live ones.

mod checkpoint;
mod stream;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use aws_lambda_events::dynamodb::{Event, EventRecord, StreamRecord};
use aws_sdk_dynamodbstreams::types::Record;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use chorus_service::metrics::{Counter, Exposition, Gauge};

pub use self::checkpoint::{
    Checkpoint, CheckpointError, CheckpointStore, FileCheckpoint, ShardCheckpoint, Unreadable,
};
pub use self::stream::{DynamoDbStream, Page, ShardInfo, StartAt, StreamError, StreamSource};
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
    /// Shards not yet fully read (being read, or waiting for their parent).
    pub shards_open: Gauge,
    pub checkpoint_saves: Counter,
    pub checkpoint_failures: Counter,
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
            .gauge(
                "chorus_publisher_open_shards",
                "Shards not yet fully read: being read, or waiting for their parent.",
                &self.shards_open,
            )
            .counter(
                "chorus_publisher_checkpoint_saves_total",
                "Checkpoint saves (--checkpoint-file), by outcome.",
                "result",
                &[
                    ("ok", &self.checkpoint_saves),
                    ("failed", &self.checkpoint_failures),
                ],
            )
            .finish()
    }
}

/// How the poller reads.
#[derive(Debug, Clone)]
pub struct PollerConfig {
    /// Records per GetRecords call (1–1000), i.e. the batch size the handler sees.
    pub batch_size: i32,
    /// Pause before reading a shard again after a read that returned no records.
    pub idle_interval: Duration,
    /// Pause before retrying a shard after its first failed read or publish; it doubles with each
    /// consecutive failure of that shard…
    pub retry_interval: Duration,
    /// … up to this.
    pub max_retry_interval: Duration,
    /// How often the stream is described again to find new shards and drop trimmed ones.
    pub refresh_interval: Duration,
    /// Least time between two checkpoint saves.
    pub checkpoint_interval: Duration,
}

impl Default for PollerConfig {
    fn default() -> Self {
        PollerConfig {
            batch_size: 100,
            idle_interval: Duration::from_millis(100),
            retry_interval: Duration::from_millis(500),
            max_retry_interval: Duration::from_secs(10),
            refresh_interval: Duration::from_secs(10),
            checkpoint_interval: Duration::from_secs(1),
        }
    }
}

/// Why the poller could not run.
#[derive(Debug, thiserror::Error)]
pub enum PollerError {
    #[error("describing the stream at start")]
    Describe(#[source] StreamError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// Polls `stream` until `shutdown` is cancelled, resuming from and saving to `checkpoints` if
/// given.
///
/// # Errors
/// At start, when the checkpoint cannot be read or the stream cannot be described (wrong ARN, no
/// access); at shutdown, when the last checkpoint cannot be saved. Failures in between are logged
/// and retried.
pub async fn run(
    stream: &dyn StreamSource,
    config: &PollerConfig,
    checkpoints: Option<&dyn CheckpointStore>,
    publisher: &dyn Publish,
    dead_letters: Option<&dyn DeadLetter>,
    metrics: &PollerMetrics,
    shutdown: CancellationToken,
) -> Result<(), PollerError> {
    let stream_arn = stream.stream_arn();
    let restored = match checkpoints {
        None => BTreeMap::new(),
        Some(store) => match store.load().await? {
            None => {
                tracing::info!("no checkpoint yet: every shard is read from its trim horizon");
                BTreeMap::new()
            }
            Some(saved) if saved.stream_arn == stream_arn => saved.shards,
            Some(saved) => {
                tracing::warn!(
                    checkpoint_stream = %saved.stream_arn,
                    "the checkpoint is for another stream: its positions are ignored"
                );
                BTreeMap::new()
            }
        },
    };
    let described = stream.shards().await.map_err(PollerError::Describe)?;
    let mut shards = Shards::default();
    let restored_count = restored.len();
    shards.update(described, restored, Instant::now());
    metrics.shards_open.set(shards.reading.len() as i64);
    tracing::info!(
        stream = %stream_arn,
        open_shards = shards.reading.len(),
        finished_shards = shards.finished.len(),
        checkpointed_shards = restored_count,
        "polling stream"
    );

    let mut next_refresh = Instant::now() + config.refresh_interval;
    let mut last_save = Instant::now();
    // Whether positions changed since the last saved checkpoint.
    let mut unsaved = false;
    while !shutdown.is_cancelled() {
        if Instant::now() >= next_refresh {
            match stream.shards().await {
                Ok(described) => {
                    unsaved |= shards.update(described, BTreeMap::new(), Instant::now())
                }
                Err(e) => {
                    metrics.read_errors.inc();
                    tracing::warn!(
                        error.message = %e,
                        error.cause_chain = ?e,
                        "describing the stream failed: retrying later"
                    );
                }
            }
            next_refresh = Instant::now() + config.refresh_interval;
        }

        for id in shards.due(Instant::now()) {
            if shutdown.is_cancelled() {
                break;
            }
            let Some(shard) = shards.reading.get_mut(&id) else {
                continue;
            };
            let handled_before = shard.after.clone();
            let result =
                poll_shard(stream, config, &id, shard, publisher, dead_letters, metrics).await;
            unsaved |= shard.after != handled_before;
            match result {
                Ok(Next::Finished) => {
                    shards.finish(&id);
                    unsaved = true;
                    // Its children can be read now; find any the last description missed.
                    next_refresh = Instant::now();
                }
                Ok(next) => {
                    shard.failures = 0;
                    shard.due = match next {
                        Next::Idle => Instant::now() + config.idle_interval,
                        _ => Instant::now(),
                    };
                }
                Err(e) => {
                    shard.failures += 1;
                    let delay = backoff(config, shard.failures);
                    shard.due = Instant::now() + delay;
                    if matches!(e, PollError::Stream(_)) {
                        metrics.read_errors.inc();
                    }
                    tracing::warn!(
                        shard = %id,
                        error.message = %e,
                        error.cause_chain = ?e,
                        failures = shard.failures,
                        retry_in_ms = delay.as_millis() as u64,
                        "polling the shard failed: retrying it later"
                    );
                }
            }
        }
        metrics.shards_open.set(shards.reading.len() as i64);

        if let Some(store) = checkpoints
            && unsaved
            && Instant::now() >= last_save + config.checkpoint_interval
        {
            match save(store, &shards, stream_arn, metrics).await {
                Ok(()) => unsaved = false,
                Err(e) => tracing::warn!(
                    error.message = %e,
                    error.cause_chain = ?e,
                    "saving the checkpoint failed: retrying"
                ),
            }
            last_save = Instant::now();
        }

        let mut wake = next_refresh;
        if let Some(due) = shards.next_due() {
            wake = wake.min(due);
        }
        if checkpoints.is_some() && unsaved {
            wake = wake.min(last_save + config.checkpoint_interval);
        }
        if wake > Instant::now() {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }
    if let Some(store) = checkpoints
        && unsaved
    {
        save(store, &shards, stream_arn, metrics).await?;
    }
    tracing::info!("poller stopped");
    Ok(())
}

async fn save(
    store: &dyn CheckpointStore,
    shards: &Shards,
    stream_arn: &str,
    metrics: &PollerMetrics,
) -> Result<(), CheckpointError> {
    let result = store.save(&shards.checkpoint(stream_arn)).await;
    match &result {
        Ok(()) => metrics.checkpoint_saves.inc(),
        Err(_) => metrics.checkpoint_failures.inc(),
    }
    result
}

/// The pause before the next attempt at a shard that failed `failures` times in a row.
fn backoff(config: &PollerConfig, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    config
        .retry_interval
        .saturating_mul(1 << doublings)
        .min(config.max_retry_interval)
}

/// The shards the poller knows of.
#[derive(Debug, Default)]
struct Shards {
    /// Described and not yet fully read.
    reading: BTreeMap<String, ShardState>,
    /// Described, closed and fully read: never read again; kept (ids only) so the next description
    /// does not bring them back, and so their children know they may start.
    finished: BTreeSet<String>,
}

/// Where the poller is in one shard.
#[derive(Debug)]
struct ShardState {
    parent: Option<String>,
    /// Last sequence number handled (None: nothing yet, start from TRIM_HORIZON).
    after: Option<String>,
    /// The iterator to read next with, if the last read left a usable one.
    iterator: Option<String>,
    /// When to read it next.
    due: Instant,
    /// Failed attempts in a row.
    failures: u32,
}

impl Shards {
    /// Brings the set in line with the stream's description: shards it no longer lists are
    /// dropped; new ones start at their `restored` position, or at their trim horizon. Returns
    /// whether the checkpoint changed.
    fn update(
        &mut self,
        described: Vec<ShardInfo>,
        mut restored: BTreeMap<String, ShardCheckpoint>,
        now: Instant,
    ) -> bool {
        let listed: BTreeSet<&str> = described.iter().map(|s| s.id.as_str()).collect();
        let mut changed = false;
        self.reading.retain(|id, shard| {
            let keep = listed.contains(id.as_str());
            if !keep {
                tracing::warn!(shard = %id, "shard gone from the stream before it was fully read (trimmed): dropped");
                changed |= shard.after.is_some();
            }
            keep
        });
        let finished = self.finished.len();
        self.finished.retain(|id| listed.contains(id.as_str()));
        changed |= self.finished.len() != finished;
        for shard in described {
            if self.finished.contains(&shard.id) || self.reading.contains_key(&shard.id) {
                continue;
            }
            let after = match restored.remove(&shard.id) {
                Some(ShardCheckpoint::Finished) => {
                    self.finished.insert(shard.id);
                    continue;
                }
                Some(ShardCheckpoint::After(seq)) => Some(seq),
                None => None,
            };
            tracing::debug!(shard = %shard.id, parent = ?shard.parent, ?after, "new shard");
            self.reading.insert(
                shard.id,
                ShardState {
                    parent: shard.parent,
                    after,
                    iterator: None,
                    due: now,
                    failures: 0,
                },
            );
        }
        if !restored.is_empty() {
            tracing::info!(
                shards = ?restored.keys().collect::<Vec<_>>(),
                "checkpointed shards no longer in the stream: ignored"
            );
        }
        changed
    }

    /// Whether `shard` may be read: its parent is fully read or no longer described.
    fn may_read(&self, shard: &ShardState) -> bool {
        shard
            .parent
            .as_ref()
            .is_none_or(|parent| !self.reading.contains_key(parent))
    }

    /// The shards to read now, in id order.
    fn due(&self, now: Instant) -> Vec<String> {
        self.reading
            .iter()
            .filter(|(_, shard)| shard.due <= now && self.may_read(shard))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// When the next shard that may be read is due.
    fn next_due(&self) -> Option<Instant> {
        self.reading
            .values()
            .filter(|shard| self.may_read(shard))
            .map(|shard| shard.due)
            .min()
    }

    fn finish(&mut self, id: &str) {
        if self.reading.remove(id).is_some() {
            tracing::info!(shard = %id, "shard closed and fully read: no longer polled");
            self.finished.insert(id.to_owned());
        }
    }

    fn checkpoint(&self, stream_arn: &str) -> Checkpoint {
        let reading = self.reading.iter().filter_map(|(id, shard)| {
            let after = shard.after.clone()?;
            Some((id.clone(), ShardCheckpoint::After(after)))
        });
        let finished = self
            .finished
            .iter()
            .map(|id| (id.clone(), ShardCheckpoint::Finished));
        Checkpoint {
            stream_arn: stream_arn.to_owned(),
            shards: reading.chain(finished).collect(),
        }
    }
}

/// When to read a shard again after a successful poll.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// It returned records: at once.
    Now,
    /// It had none: after the idle interval.
    Idle,
    /// It is closed and fully read: never.
    Finished,
}

#[derive(Debug, thiserror::Error)]
enum PollError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("publish failed at record {done} of {records}")]
    Publish { done: usize, records: usize },
}

/// Reads one batch from a shard and hands it to the handler.
async fn poll_shard(
    stream: &dyn StreamSource,
    config: &PollerConfig,
    shard_id: &str,
    shard: &mut ShardState,
    publisher: &dyn Publish,
    dead_letters: Option<&dyn DeadLetter>,
    metrics: &PollerMetrics,
) -> Result<Next, PollError> {
    let iterator = match shard.iterator.take() {
        Some(iterator) => iterator,
        None => {
            let start = shard
                .after
                .clone()
                .map_or(StartAt::TrimHorizon, StartAt::After);
            let iterator = match stream.iterator(shard_id, &start).await {
                Err(e @ StreamError::Trimmed { .. }) if shard.after.is_some() => {
                    tracing::warn!(
                        shard = %shard_id,
                        after = shard.after.as_deref().unwrap_or_default(),
                        error.message = %e,
                        "the shard's position is older than its trim horizon (records after it \
                         were trimmed unpublished): reading from the trim horizon"
                    );
                    shard.after = None;
                    stream.iterator(shard_id, &StartAt::TrimHorizon).await?
                }
                other => other?,
            };
            match iterator {
                Some(iterator) => iterator,
                None => return Ok(Next::Finished),
            }
        }
    };
    let page = stream.records(iterator, config.batch_size).await?;
    if page.records.is_empty() {
        return Ok(match page.next_iterator {
            Some(next) => {
                shard.iterator = Some(next);
                Next::Idle
            }
            None => Next::Finished,
        });
    }

    let stream_arn = stream.stream_arn();
    let mut event = Event::default();
    event.records = page
        .records
        .iter()
        .map(|r| to_lambda_record(r, stream_arn))
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
        shard.after = event.records[done - 1].change.sequence_number.clone();
    }
    if failed_at.is_some() {
        return Err(PollError::Publish {
            done,
            records: event.records.len(),
        });
    }
    Ok(match page.next_iterator {
        Some(next) => {
            shard.iterator = Some(next);
            Next::Now
        }
        None => Next::Finished,
    })
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

#[cfg(test)]
mod tests {
    //! The poller's scheduling on a fake stream, in virtual time (`start_paused`): what reaches
    //! SNS, in which order and how soon, and which stream calls are (not) made.

    use std::collections::HashMap;
    use std::future::Future;
    use std::sync::Mutex;

    use aws_sdk_dynamodbstreams::types::{
        AttributeValue, OperationType, StreamRecord as SdkStreamRecord,
    };
    use chorus_protocol::{
        Body, BusPayload, ClientMsgId, RoomId, Seq, StoredBatch, StoredEntry, UserId,
    };

    use super::*;
    use crate::PublishError;

    const ARN: &str =
        "arn:aws:dynamodb:us-east-1:123456789012:table/chorus/stream/2026-01-01T00:00:00.000";

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Describe,
        Iterator(String, StartAt),
        Records(String),
    }

    impl Call {
        fn shard(&self) -> Option<&str> {
            match self {
                Call::Describe => None,
                Call::Iterator(shard, _) | Call::Records(shard) => Some(shard),
            }
        }
    }

    struct FakeShard {
        id: String,
        parent: Option<String>,
        records: Vec<Record>,
        /// Records before this index have been trimmed.
        trimmed: usize,
        closed: bool,
        failing: bool,
        described: bool,
    }

    #[derive(Default)]
    struct FakeState {
        shards: Vec<FakeShard>,
        next_sequence_number: u64,
        calls: Vec<(Instant, Call)>,
    }

    /// A stream whose iterators are `<shard>#<index>`.
    #[derive(Default)]
    struct FakeStream {
        state: Mutex<FakeState>,
    }

    impl FakeStream {
        fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
            f(&mut self.state.lock().unwrap())
        }

        fn shard<T>(&self, id: &str, f: impl FnOnce(&mut FakeShard) -> T) -> T {
            self.with(|s| f(s.shards.iter_mut().find(|s| s.id == id).expect("a shard")))
        }

        fn add_shard(&self, id: &str, parent: Option<&str>) {
            self.with(|s| {
                s.shards.push(FakeShard {
                    id: id.into(),
                    parent: parent.map(Into::into),
                    records: Vec::new(),
                    trimmed: 0,
                    closed: false,
                    failing: false,
                    described: true,
                });
            });
        }

        /// Appends a message insert; returns its sequence number.
        fn push(&self, shard: &str, room: &str, seq: u64) -> String {
            let sequence_number = self.with(|s| {
                s.next_sequence_number += 1;
                format!("{:021}", 100 + s.next_sequence_number)
            });
            let record = message_record(&sequence_number, room, seq);
            self.shard(shard, |s| s.records.push(record));
            sequence_number
        }

        fn calls(&self) -> Vec<(Instant, Call)> {
            self.with(|s| s.calls.clone())
        }

        fn calls_for(&self, shard: &str) -> Vec<(Instant, Call)> {
            let mut calls = self.calls();
            calls.retain(|(_, call)| call.shard() == Some(shard));
            calls
        }

        fn log(&self, call: Call) {
            self.with(|s| s.calls.push((Instant::now(), call)));
        }
    }

    fn message_record(sequence_number: &str, room: &str, seq: u64) -> Record {
        let stored = StoredBatch {
            room: RoomId::parse(room).unwrap(),
            seq: Seq(seq),
            last: Seq(seq),
            ts: "2026-01-01T00:00:00.000Z".into(),
            ttl: 0,
            msgs: vec![StoredEntry {
                id: ClientMsgId::parse(format!("{room}-{seq}")).unwrap(),
                sender: UserId::parse("ann").unwrap(),
                body: Body::parse(format!("message {seq}")).unwrap(),
            }],
        };
        let image: HashMap<String, AttributeValue> = serde_dynamo::to_item(&stored).unwrap();
        let keys = HashMap::from([
            ("room".to_owned(), AttributeValue::S(room.into())),
            ("seq".to_owned(), AttributeValue::N(seq.to_string())),
        ]);
        Record::builder()
            .event_name(OperationType::Insert)
            .dynamodb(
                SdkStreamRecord::builder()
                    .set_keys(Some(keys))
                    .set_new_image(Some(image))
                    .sequence_number(sequence_number)
                    .build(),
            )
            .build()
    }

    #[async_trait::async_trait]
    impl StreamSource for FakeStream {
        fn stream_arn(&self) -> &str {
            ARN
        }

        async fn shards(&self) -> Result<Vec<ShardInfo>, StreamError> {
            self.log(Call::Describe);
            Ok(self.with(|s| {
                s.shards
                    .iter()
                    .filter(|s| s.described)
                    .map(|s| ShardInfo {
                        id: s.id.clone(),
                        parent: s.parent.clone(),
                    })
                    .collect()
            }))
        }

        async fn iterator(
            &self,
            shard_id: &str,
            start: &StartAt,
        ) -> Result<Option<String>, StreamError> {
            self.log(Call::Iterator(shard_id.into(), start.clone()));
            self.shard(shard_id, |shard| {
                let index = match start {
                    StartAt::TrimHorizon => shard.trimmed,
                    StartAt::After(seq) => {
                        let at = shard
                            .records
                            .iter()
                            .position(|r| {
                                r.dynamodb().and_then(|d| d.sequence_number()) == Some(seq)
                            })
                            .ok_or_else(|| {
                                StreamError::failed("GetShardIterator", format!("no record {seq}"))
                            })?;
                        if at < shard.trimmed {
                            return Err(StreamError::Trimmed {
                                call: format!("after {seq}"),
                            });
                        }
                        at + 1
                    }
                };
                Ok(Some(format!("{shard_id}#{index}")))
            })
        }

        async fn records(&self, iterator: String, limit: i32) -> Result<Page, StreamError> {
            let (shard_id, index) = iterator.split_once('#').unwrap();
            let index: usize = index.parse().unwrap();
            self.log(Call::Records(shard_id.into()));
            self.shard(shard_id, |shard| {
                if shard.failing {
                    return Err(StreamError::failed("GetRecords", "throttled"));
                }
                if index < shard.trimmed {
                    return Err(StreamError::Trimmed {
                        call: "GetRecords".into(),
                    });
                }
                let end = (index + limit as usize).min(shard.records.len());
                Ok(Page {
                    records: shard.records[index..end].to_vec(),
                    next_iterator: (!shard.closed || end < shard.records.len())
                        .then(|| format!("{shard_id}#{end}")),
                })
            })
        }
    }

    /// Records every event published, with when.
    #[derive(Default)]
    struct FakeSns {
        published: Mutex<Vec<(Instant, String, u64)>>,
        progress: tokio::sync::Notify,
    }

    #[async_trait::async_trait]
    impl Publish for FakeSns {
        async fn publish(&self, messages: &[String]) -> Result<(), PublishError> {
            let now = Instant::now();
            let mut published = self.published.lock().unwrap();
            for message in messages {
                for event in BusPayload::parse(message).unwrap().events {
                    published.push((now, event.room.as_str().to_owned(), event.seq.0));
                }
            }
            self.progress.notify_waiters();
            Ok(())
        }
    }

    impl FakeSns {
        fn events(&self) -> Vec<(String, u64)> {
            let published = self.published.lock().unwrap();
            published.iter().map(|(_, r, s)| (r.clone(), *s)).collect()
        }

        fn published_at(&self, index: usize) -> Instant {
            self.published.lock().unwrap()[index].0
        }

        /// Waits until at least `n` events were published; fails when nothing more is published
        /// for a minute of (virtual) time.
        async fn wait_for(&self, n: usize) -> Vec<(String, u64)> {
            loop {
                let progress = self.progress.notified();
                let events = self.events();
                if events.len() >= n {
                    return events;
                }
                if tokio::time::timeout(Duration::from_secs(60), progress)
                    .await
                    .is_err()
                {
                    panic!("waited for {n} published events; nothing more after {events:?}");
                }
            }
        }
    }

    #[derive(Default)]
    struct MemoryCheckpoint {
        saves: Mutex<Vec<(Instant, Checkpoint)>>,
        initial: Option<Checkpoint>,
    }

    impl MemoryCheckpoint {
        fn holding(checkpoint: Checkpoint) -> Self {
            MemoryCheckpoint {
                saves: Mutex::default(),
                initial: Some(checkpoint),
            }
        }

        fn saves(&self) -> Vec<(Instant, Checkpoint)> {
            self.saves.lock().unwrap().clone()
        }
    }

    #[async_trait::async_trait]
    impl CheckpointStore for MemoryCheckpoint {
        async fn load(&self) -> Result<Option<Checkpoint>, CheckpointError> {
            let saves = self.saves.lock().unwrap();
            Ok(saves
                .last()
                .map(|(_, c)| c.clone())
                .or(self.initial.clone()))
        }

        async fn save(&self, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
            let mut saves = self.saves.lock().unwrap();
            saves.push((Instant::now(), checkpoint.clone()));
            Ok(())
        }
    }

    fn checkpoint(shards: &[(&str, ShardCheckpoint)]) -> Checkpoint {
        Checkpoint {
            stream_arn: ARN.into(),
            shards: shards
                .iter()
                .map(|(id, at)| ((*id).to_owned(), at.clone()))
                .collect(),
        }
    }

    fn after(sequence_number: &str) -> ShardCheckpoint {
        ShardCheckpoint::After(sequence_number.into())
    }

    fn events(room: &str, seqs: std::ops::RangeInclusive<u64>) -> Vec<(String, u64)> {
        seqs.map(|seq| (room.to_owned(), seq)).collect()
    }

    /// Runs the poller (default config) alongside `test`, stops it when `test` is done.
    async fn alongside<T>(
        stream: &FakeStream,
        store: Option<&dyn CheckpointStore>,
        sns: &FakeSns,
        metrics: &PollerMetrics,
        test: impl Future<Output = T>,
    ) -> T {
        let config = PollerConfig::default();
        let shutdown = CancellationToken::new();
        let poller = run(stream, &config, store, sns, None, metrics, shutdown.clone());
        let test = async {
            let out = test.await;
            shutdown.cancel();
            out
        };
        let (result, out) = tokio::join!(poller, test);
        result.expect("the poller runs and stops cleanly");
        out
    }

    /// Runs a poller until `n` events are published; returns every event it published.
    async fn poll_until(
        stream: &FakeStream,
        store: Option<&dyn CheckpointStore>,
        n: usize,
    ) -> Vec<(String, u64)> {
        let sns = FakeSns::default();
        let metrics = PollerMetrics::default();
        alongside(stream, store, &sns, &metrics, sns.wait_for(n)).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_child_shard_is_read_after_its_parent_so_a_room_stays_in_order_across_a_split() {
        let stream = FakeStream::default();
        // "shard-b" (whose own parent was trimmed away) ended after lobby 1–3; its child "shard-a"
        // got lobby 4–5. The ids sort child first.
        stream.add_shard("shard-b", Some("shard-trimmed"));
        stream.add_shard("shard-a", Some("shard-b"));
        for seq in 1..=3 {
            stream.push("shard-b", "lobby", seq);
        }
        stream.shard("shard-b", |s| s.closed = true);
        for seq in 4..=5 {
            stream.push("shard-a", "lobby", seq);
        }

        assert_eq!(poll_until(&stream, None, 5).await, events("lobby", 1..=5));
        let calls = stream.calls();
        let first_child = calls.iter().position(|(_, c)| c.shard() == Some("shard-a"));
        let last_parent = calls
            .iter()
            .rposition(|(_, c)| c.shard() == Some("shard-b"));
        assert!(last_parent < first_child, "{calls:#?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_shard_once_fully_read_is_never_polled_again() {
        let stream = FakeStream::default();
        stream.add_shard("shard-a", None);
        stream.push("shard-a", "lobby", 1);
        stream.push("shard-a", "lobby", 2);
        stream.shard("shard-a", |s| s.closed = true);
        stream.add_shard("shard-b", Some("shard-a"));
        let sns = FakeSns::default();
        let metrics = PollerMetrics::default();

        alongside(&stream, None, &sns, &metrics, async {
            sns.wait_for(2).await;
            let polls_of_closed = stream.calls_for("shard-a").len();
            let start = Instant::now();
            tokio::time::sleep(Duration::from_secs(60)).await;
            assert_eq!(
                stream.calls_for("shard-a").len(),
                polls_of_closed,
                "the fully read closed shard was polled again"
            );
            assert_eq!(metrics.shards_open.get(), 1);
            // Its child is polled at the idle pace meanwhile, and is live.
            let child_reads = stream
                .calls_for("shard-b")
                .iter()
                .filter(|(at, call)| *at >= start && matches!(call, Call::Records(_)))
                .count();
            assert!(
                child_reads >= 500,
                "{child_reads} reads of the child in 60 s"
            );
            stream.push("shard-b", "lobby", 3);
            sns.wait_for(3).await;
        })
        .await;
        assert_eq!(sns.events(), events("lobby", 1..=3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_shard_gone_from_the_description_is_dropped() {
        let stream = FakeStream::default();
        stream.add_shard("shard-a", None);
        stream.add_shard("shard-b", None);
        stream.push("shard-a", "lobby", 1);
        stream.push("shard-b", "news", 1);
        let sns = FakeSns::default();
        let metrics = PollerMetrics::default();

        alongside(&stream, None, &sns, &metrics, async {
            sns.wait_for(2).await;
            assert_eq!(metrics.shards_open.get(), 2);
            // Trimmed: the stream no longer lists it.
            stream.shard("shard-a", |s| s.described = false);
            tokio::time::sleep(PollerConfig::default().refresh_interval * 2).await;
            let polls = stream.calls_for("shard-a").len();
            tokio::time::sleep(Duration::from_secs(60)).await;
            assert_eq!(stream.calls_for("shard-a").len(), polls, "still polled");
            assert_eq!(metrics.shards_open.get(), 1);
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_shard_backs_off_on_its_own_and_the_others_stay_live() {
        let config = PollerConfig::default();
        let stream = FakeStream::default();
        stream.add_shard("shard-a", None);
        stream.shard("shard-a", |s| s.failing = true);
        stream.add_shard("shard-b", None);
        let sns = FakeSns::default();
        let metrics = PollerMetrics::default();

        alongside(&stream, None, &sns, &metrics, async {
            // Messages land between two of the healthy shard's polls while the other one fails.
            tokio::time::sleep(Duration::from_millis(250)).await;
            for seq in 1..=40u64 {
                let written = Instant::now();
                stream.push("shard-b", "lobby", seq);
                sns.wait_for(seq as usize).await;
                let waited = sns.published_at(seq as usize - 1) - written;
                assert!(
                    waited <= config.idle_interval,
                    "message {seq} waited {waited:?} behind the failing shard"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }

            // The failing shard was retried after 0.5 s, 1 s, 2 s … then every 10 s.
            let attempts: Vec<Instant> = stream
                .calls_for("shard-a")
                .into_iter()
                .filter(|(_, call)| matches!(call, Call::Records(_)))
                .map(|(at, _)| at)
                .collect();
            let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
            let mut expected = config.retry_interval;
            assert!(gaps.len() >= 6, "{gaps:?}");
            for gap in &gaps {
                assert!(
                    *gap >= expected && *gap <= expected + Duration::from_millis(5),
                    "expected {expected:?} between attempts: {gaps:?}"
                );
                expected = (expected * 2).min(config.max_retry_interval);
            }

            // Once it recovers it is read within the longest pause.
            stream.shard("shard-a", |s| s.failing = false);
            let recovered = Instant::now();
            stream.push("shard-a", "news", 1);
            sns.wait_for(41).await;
            assert!(sns.published_at(40) - recovered <= config.max_retry_interval);
        })
        .await;
        assert_eq!(metrics.read_errors.get() as usize, {
            let failures = stream.calls_for("shard-a").len();
            // Each failed attempt is one GetShardIterator and one failed GetRecords; the last
            // attempt succeeded.
            (failures - 2) / 2
        });
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_resumes_after_the_checkpointed_position() {
        let stream = FakeStream::default();
        stream.add_shard("shard-a", None);
        stream.push("shard-a", "lobby", 1);
        stream.push("shard-a", "lobby", 2);
        let last = stream.push("shard-a", "lobby", 3);
        let store = MemoryCheckpoint::default();

        assert_eq!(
            poll_until(&stream, Some(&store), 3).await,
            events("lobby", 1..=3)
        );
        let (_, saved) = store.saves().pop().expect("saved at shutdown");
        assert_eq!(saved, checkpoint(&[("shard-a", after(&last))]));

        stream.push("shard-a", "lobby", 4);
        stream.push("shard-a", "lobby", 5);
        let calls_before = stream.calls().len();
        assert_eq!(
            poll_until(&stream, Some(&store), 2).await,
            events("lobby", 4..=5),
            "the restarted poller re-published what the first had done"
        );
        let restart_calls = &stream.calls()[calls_before..];
        assert_eq!(
            restart_calls
                .iter()
                .find(|(_, c)| matches!(c, Call::Iterator(..)))
                .map(|(_, c)| c),
            Some(&Call::Iterator("shard-a".into(), StartAt::After(last)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_checkpoint_is_saved_at_most_once_a_second_and_trails_by_at_most_a_second() {
        let stream = FakeStream::default();
        stream.add_shard("shard-a", None);
        let store = MemoryCheckpoint::default();
        let sns = FakeSns::default();
        let metrics = PollerMetrics::default();
        let mut handled = Vec::new();

        alongside(&stream, Some(&store), &sns, &metrics, async {
            for seq in 1..=30u64 {
                let sequence_number = stream.push("shard-a", "lobby", seq);
                sns.wait_for(seq as usize).await;
                handled.push((Instant::now(), sequence_number));
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        })
        .await;

        let saves = store.saves();
        for pair in saves.windows(2) {
            assert!(
                pair[1].0 - pair[0].0 >= Duration::from_secs(1),
                "{saves:#?}"
            );
        }
        // A crash re-publishes at most about a second of messages.
        for (at, sequence_number) in &handled {
            let (saved_at, _) = saves
                .iter()
                .find(|(_, c)| {
                    matches!(c.shards.get("shard-a"), Some(ShardCheckpoint::After(s)) if s >= sequence_number)
                })
                .expect("every position is saved");
            assert!(*saved_at - *at <= Duration::from_secs(1), "{saves:#?}");
        }
        assert_eq!(metrics.checkpoint_saves.get() as usize, saves.len());
    }

    #[tokio::test(start_paused = true)]
    async fn a_checkpointed_position_older_than_the_trim_horizon_falls_back_to_it() {
        let stream = FakeStream::default();
        stream.add_shard("shard-a", None);
        let first = stream.push("shard-a", "lobby", 1);
        for seq in 2..=5 {
            stream.push("shard-a", "lobby", seq);
        }
        stream.shard("shard-a", |s| s.trimmed = 3);
        let store = MemoryCheckpoint::holding(checkpoint(&[("shard-a", after(&first))]));

        assert_eq!(
            poll_until(&stream, Some(&store), 2).await,
            events("lobby", 4..=5)
        );
        let starts: Vec<Call> = stream
            .calls_for("shard-a")
            .into_iter()
            .filter(|(_, c)| matches!(c, Call::Iterator(..)))
            .map(|(_, c)| c)
            .collect();
        assert_eq!(
            starts,
            [
                Call::Iterator("shard-a".into(), StartAt::After(first)),
                Call::Iterator("shard-a".into(), StartAt::TrimHorizon),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn checkpointed_shards_that_are_finished_stay_so_and_vanished_ones_are_ignored() {
        let stream = FakeStream::default();
        stream.add_shard("shard-a", None);
        stream.push("shard-a", "lobby", 1);
        stream.shard("shard-a", |s| s.closed = true);
        stream.add_shard("shard-b", Some("shard-a"));
        let second = stream.push("shard-b", "lobby", 2);
        let store = MemoryCheckpoint::holding(checkpoint(&[
            ("shard-a", ShardCheckpoint::Finished),
            ("shard-trimmed", after("000000000000000000042")),
        ]));

        assert_eq!(
            poll_until(&stream, Some(&store), 1).await,
            events("lobby", 2..=2)
        );
        assert_eq!(stream.calls_for("shard-a"), []);
        assert_eq!(stream.calls_for("shard-trimmed"), []);
        let (_, saved) = store.saves().pop().unwrap();
        assert_eq!(
            saved,
            checkpoint(&[
                ("shard-a", ShardCheckpoint::Finished),
                ("shard-b", after(&second)),
            ])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_checkpoint_of_another_stream_is_ignored() {
        let stream = FakeStream::default();
        stream.add_shard("shard-a", None);
        let first = stream.push("shard-a", "lobby", 1);
        stream.push("shard-a", "lobby", 2);
        // Emulators reuse shard ids across tables: the position must not carry over.
        let mut other = checkpoint(&[("shard-a", after(&first))]);
        other.stream_arn = ARN.replace("table/chorus", "table/old");
        let store = MemoryCheckpoint::holding(other);

        assert_eq!(
            poll_until(&stream, Some(&store), 2).await,
            events("lobby", 1..=2)
        );
    }

    #[tokio::test]
    async fn a_corrupt_checkpoint_file_stops_the_poller_before_it_reads() {
        let path =
            std::env::temp_dir().join(format!("chorus-poller-corrupt-{}.json", std::process::id()));
        std::fs::write(&path, "{\"version\":1,\"stream_arn\":").unwrap();
        let store = FileCheckpoint::new(&path);
        let stream = FakeStream::default();
        stream.add_shard("shard-a", None);
        let result = run(
            &stream,
            &PollerConfig::default(),
            Some(&store),
            &FakeSns::default(),
            None,
            &PollerMetrics::default(),
            CancellationToken::new(),
        )
        .await;
        let _ = std::fs::remove_file(&path);
        assert!(
            matches!(
                result,
                Err(PollerError::Checkpoint(CheckpointError::Corrupt { .. }))
            ),
            "{result:?}"
        );
        assert_eq!(stream.calls(), []);
    }
}
