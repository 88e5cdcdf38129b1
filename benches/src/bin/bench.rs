//! `chorus-bench publisher`: the publisher's cost per message, against the emulator.
//!
//! Writes 1 KB messages (`--body-bytes`) over 50 rooms through the real store (so the stream holds what production
//! streams hold: items of one or more messages, and each room's marker), reads the stream back as
//! Lambda records, and runs them through the handler at Lambda batch sizes 100 and 1,000:
//! - against the emulator's SNS, counting calls and bytes (the bill);
//! - against an in-memory publisher, timing the handler's own CPU per record, next to a baseline
//!   measured in the same run: what the Lambda runtime itself does with the same batch
//!   (deserializing the event JSON).
//!
//! The last line is `publisher: records=N sns_calls=M calls_per_1000=X mean_bytes_per_call=Y`
//! for batch size 1,000, where N counts message records and X is SNS calls per 1,000 messages.
//!
//! A tool that reports to a terminal: it prints to stdout by design.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aws_lambda_events::dynamodb::{Event, EventRecord};
use chorus_protocol::{Body, ClientMsgId, RoomId, UserId};
use chorus_publisher::sns::{SnsPublisher, ensure_topic};
use chorus_publisher::{Classified, Publish, PublishError, classify, handle_with_outcome};
use chorus_testkit::emulator::aws;
use chorus_writer::store::{
    DynamoStore, DynamoTable, MessageStore as _, NewMessage, Settings, ensure_table,
};
use clap::Parser as _;

#[derive(Debug, clap::Parser)]
#[command(name = "chorus-bench", about = "Chorus benchmarks (see BENCHMARKS.md)")]
enum Bench {
    /// The publisher: SNS calls and bytes per message, handler CPU per record.
    Publisher {
        /// Messages to write.
        #[arg(long, default_value_t = 1000)]
        messages: usize,
        #[arg(long, default_value_t = 50)]
        rooms: usize,
        /// Body size of each message.
        #[arg(long, default_value_t = 1024)]
        body_bytes: usize,
        /// Timed repetitions of the CPU measurement.
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
}

/// Counts what it would publish, publishing nothing.
#[derive(Default)]
struct Counting {
    calls: AtomicUsize,
}

#[async_trait::async_trait]
impl Publish for Counting {
    async fn publish(&self, messages: &[String]) -> Result<(), PublishError> {
        self.calls.fetch_add(messages.len(), Ordering::Relaxed);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let result = match Bench::parse() {
        Bench::Publisher {
            messages,
            rooms,
            body_bytes,
            rounds,
        } => publisher(messages, rooms, body_bytes, rounds).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn publisher(
    messages: usize,
    rooms: usize,
    body_bytes: usize,
    rounds: usize,
) -> anyhow::Result<()> {
    let aws = aws().await;
    let name = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let stream_arn = ensure_table(&aws_sdk_dynamodb::Client::new(&aws), &name).await?;
    let topic_arn = ensure_topic(&aws_sdk_sns::Client::new(&aws), &name).await?;

    // Round-robin over the rooms, 16 writers at once.
    let started = Instant::now();
    let store = Arc::new(DynamoStore::new(
        DynamoTable::new(aws_sdk_dynamodb::Client::new(&aws), &name),
        Settings::default(),
    ));
    let body = "x".repeat(body_bytes);
    let next = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for _ in 0..16 {
        let (store, next, body) = (Arc::clone(&store), Arc::clone(&next), body.clone());
        writers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= messages {
                    return Ok::<_, anyhow::Error>(());
                }
                store
                    .append(NewMessage {
                        room: RoomId::parse(format!("room-{}", i % rooms))?,
                        id: ClientMsgId::parse(format!("m{i}"))?,
                        sender: UserId::parse("bench")?,
                        body: Body::parse(body.as_str())?,
                    })
                    .await?;
            }
        }));
    }
    for writer in writers {
        writer.await??;
    }
    println!(
        "bench: wrote {messages} messages of {body_bytes} bytes over {rooms} rooms in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let records = read_stream(&aws, &stream_arn).await?;
    let held: Vec<usize> = records
        .iter()
        .filter_map(|r| match classify(r) {
            Classified::Messages(messages) => Some(messages.len()),
            _ => None,
        })
        .collect();
    let stored: usize = held.iter().sum();
    anyhow::ensure!(
        stored == messages,
        "the stream's items hold {stored} messages, expected {messages}"
    );
    println!(
        "bench: stream: {} records ({} items holding {stored} messages, {} room markers) = {:.2} records per message",
        records.len(),
        held.len(),
        records.len() - held.len(),
        records.len() as f64 / messages as f64
    );

    let sns = SnsPublisher::new(aws_sdk_sns::Client::new(&aws), &topic_arn);
    let mut last = String::new();
    for batch_size in [100, 1000] {
        let batches: Vec<Event> = records
            .chunks(batch_size)
            .map(|chunk| {
                let mut event = Event::default();
                event.records = chunk.to_vec();
                event
            })
            .collect();

        // The bill: real SNS calls.
        let (mut calls, mut sns_messages, mut bytes, mut forwarded) = (0, 0, 0, 0);
        for event in &batches {
            let (response, outcome) = handle_with_outcome(event, &sns, None).await;
            anyhow::ensure!(response.batch_item_failures.is_empty(), "a publish failed");
            calls += outcome.sns_calls;
            sns_messages += outcome.sns_messages;
            bytes += outcome.sns_bytes;
            forwarded += outcome.forwarded;
        }
        anyhow::ensure!(forwarded == messages, "forwarded {forwarded} of {messages}");

        // The CPU: handler with a no-op publisher vs. the runtime's own event decoding.
        let json: Vec<String> = batches
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<_, _>>()?;
        let counting = Counting::default();
        let handler = time_per_record(rounds, records.len(), || async {
            for event in &batches {
                handle_with_outcome(event, &counting, None).await;
            }
        })
        .await;
        let baseline = time_per_record(rounds, records.len(), || async {
            for text in &json {
                let event: Event = serde_json::from_str(text).expect("event JSON");
                std::hint::black_box(event);
            }
        })
        .await;

        println!(
            "bench: batch_size={batch_size}: invocations={} sns_calls={calls} sns_messages={sns_messages} \
             calls_per_1000={:.1} mean_bytes_per_call={} handler_us_per_record={:.2} \
             baseline_event_decode_us_per_record={:.2}",
            batches.len(),
            calls as f64 * 1000.0 / messages as f64,
            bytes / calls.max(1),
            handler.as_nanos() as f64 / 1000.0,
            baseline.as_nanos() as f64 / 1000.0,
        );
        last = format!(
            "publisher: records={messages} sns_calls={calls} calls_per_1000={:.1} mean_bytes_per_call={}",
            calls as f64 * 1000.0 / messages as f64,
            bytes / calls.max(1)
        );
    }
    println!("{last}");
    Ok(())
}

/// Best (least disturbed) time per record over `rounds` runs of `f`.
async fn time_per_record<F, Fut>(rounds: usize, records: usize, f: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut best = Duration::MAX;
    for _ in 0..rounds.max(1) {
        let started = Instant::now();
        f().await;
        best = best.min(started.elapsed() / u32::try_from(records.max(1)).unwrap_or(u32::MAX));
    }
    best
}

async fn read_stream(
    aws: &aws_config::SdkConfig,
    stream_arn: &str,
) -> anyhow::Result<Vec<EventRecord>> {
    let streams = aws_sdk_dynamodbstreams::Client::new(aws);
    let shards = streams
        .describe_stream()
        .stream_arn(stream_arn)
        .send()
        .await?
        .stream_description
        .and_then(|d| d.shards)
        .unwrap_or_default();
    let mut out = Vec::new();
    for shard in shards {
        let mut iterator = streams
            .get_shard_iterator()
            .stream_arn(stream_arn)
            .shard_id(shard.shard_id.context("shard id")?)
            .shard_iterator_type(aws_sdk_dynamodbstreams::types::ShardIteratorType::TrimHorizon)
            .send()
            .await?
            .shard_iterator;
        while let Some(current) = iterator {
            let page = streams
                .get_records()
                .shard_iterator(current)
                .limit(1000)
                .send()
                .await?;
            let records = page.records.unwrap_or_default();
            if records.is_empty() {
                break;
            }
            out.extend(
                records
                    .iter()
                    .map(|r| chorus_publisher::poller::to_lambda_record(r, stream_arn)),
            );
            iterator = page.next_shard_iterator;
        }
    }
    Ok(out)
}
