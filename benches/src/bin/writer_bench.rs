//! `chorus-writer-bench`: the writer's send path (the group commit), against the DynamoDB the
//! SDK environment names (`AWS_ENDPOINT_URL_DYNAMODB` or `AWS_ENDPOINT_URL`; DynamoDB Local for
//! real conditional-write semantics). The design it replaced (one three-item transaction per
//! send) was measured next to it in the same runs until it was removed; those numbers are in
//! BENCHMARKS.md, and `ratio_to_old` is now printed as `n/a`.
//!
//! A fresh table (the messages table's keys, without its stream: see
//! [`create_table_without_stream`]), a writer serving it on loopback (in this process, the real
//! HTTP API), then two phases, each bounded in time and count:
//! - hot room: `--hot-senders` concurrent senders (200-byte bodies) into one room, each sending
//!   its next message as soon as the last is acked;
//! - quiet rooms: `--quiet-rooms` rooms with one sender each (512-byte bodies), each sending
//!   `--quiet-messages` messages one after another.
//!
//! Every room gets one send before its phase is timed (64 rooms at a time): a room's first write
//! also creates its marker (once per room, ever), which is reported apart, not counted per
//! message.
//! Write units are computed from the sizes of the items written (DynamoDB's rules, 1 WRU per
//! started KB; failed conditional writes included).
//!
//! The last line is `writer: hot_room_sends_per_s=X ratio_to_old=n/a p99_ms=Y
//! wru_per_message_hot=A wru_per_message_quiet=B`.
//!
//! A tool that reports to a terminal: it prints to stdout by design.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chorus_testkit::emulator::aws;
use chorus_writer::store::{DynamoStore, DynamoTable, MessageStore, Settings, Usage};
use clap::Parser as _;
use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Parser)]
#[command(
    name = "chorus-writer-bench",
    about = "The writer's send path: group commit vs. one transaction per send (see BENCHMARKS.md)"
)]
struct Args {
    /// Concurrent senders into the hot room.
    #[arg(long, default_value_t = 64)]
    hot_senders: usize,
    /// Body size of the hot room's messages.
    #[arg(long, default_value_t = 200)]
    hot_body_bytes: usize,
    /// Length of the hot-room phase, in seconds.
    #[arg(long, default_value_t = 15)]
    hot_seconds: u64,
    /// Quiet rooms, one sender each.
    #[arg(long, default_value_t = 1000)]
    quiet_rooms: usize,
    /// Body size of the quiet rooms' messages.
    #[arg(long, default_value_t = 512)]
    quiet_body_bytes: usize,
    /// Messages each quiet sender sends (after its room's first).
    #[arg(long, default_value_t = 5)]
    quiet_messages: usize,
    /// Longest the quiet phase may run, in seconds.
    #[arg(long, default_value_t = 120)]
    quiet_max_seconds: u64,
    /// Most sends of one phase.
    #[arg(long, default_value_t = 200_000)]
    max_sends: usize,
}

/// What one phase measured.
#[derive(Debug, Default)]
struct Phase {
    acked: usize,
    failed: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    usage: Usage,
    /// Why the first failed send failed.
    first_error: Option<String>,
}

impl Phase {
    /// Counts one send made at `sent` and its answer.
    fn record(&mut self, sent: Instant, answer: anyhow::Result<()>) {
        match answer {
            Ok(()) => {
                self.acked += 1;
                self.latencies.push(sent.elapsed());
            }
            Err(e) => {
                self.failed += 1;
                self.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }

    fn per_s(&self) -> f64 {
        self.acked as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// `p`-th latency percentile (the latencies are sorted by [`merge`]).
    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let rank =
            ((self.latencies.len() as f64 * p).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[rank - 1].as_secs_f64() * 1000.0
    }

    fn wru_per_message(&self) -> f64 {
        self.usage.write_units as f64 / self.acked.max(1) as f64
    }

    fn rru_per_message(&self) -> f64 {
        self.usage.read_units as f64 / self.acked.max(1) as f64
    }

    fn messages_per_item(&self) -> f64 {
        self.usage.messages_written as f64 / self.usage.items_written.max(1) as f64
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match bench(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let aws = aws().await;
    let endpoint = std::env::var("AWS_ENDPOINT_URL_DYNAMODB")
        .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
        .unwrap_or_else(|_| "AWS".into());
    println!("bench: DynamoDB at {endpoint}");
    let (hot, quiet, room_creation) = run(&args, &aws).await?;
    for (name, phase) in [("hot", &hot), ("quiet", &quiet)] {
        println!(
            "bench: {name}: acked={} failed={} seconds={:.1} sends_per_s={:.1} p50_ms={:.1} p99_ms={:.1} \
             wru_per_message={:.3} rru_per_message={:.3} messages_per_item={:.1} races_lost={}",
            phase.acked,
            phase.failed,
            phase.elapsed.as_secs_f64(),
            phase.per_s(),
            phase.percentile_ms(0.50),
            phase.percentile_ms(0.99),
            phase.wru_per_message(),
            phase.rru_per_message(),
            phase.messages_per_item(),
            phase.usage.races_lost,
        );
        if let Some(e) = &phase.first_error {
            println!("bench: {name}: the first failure: {e}");
        }
    }
    println!(
        "bench: room creation (first send of a room, once): wru_per_room={:.2}",
        room_creation.write_units as f64 / (args.quiet_rooms + 1) as f64
    );
    println!(
        "writer: hot_room_sends_per_s={:.1} ratio_to_old=n/a p99_ms={:.1} wru_per_message_hot={:.3} wru_per_message_quiet={:.3}",
        hot.per_s(),
        hot.percentile_ms(0.99),
        hot.wru_per_message(),
        quiet.wru_per_message(),
    );
    Ok(())
}

/// Measures the hot phase, the quiet phase, and what creating the rooms cost.
async fn run(args: &Args, aws: &aws_config::SdkConfig) -> anyhow::Result<(Phase, Phase, Usage)> {
    let client = aws_sdk_dynamodb::Client::new(aws);
    let table = format!(
        "bench-writer-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    create_table_without_stream(&client, &table).await?;
    let table = DynamoTable::new(client, &table);
    table.check().await?;
    let store: Arc<dyn MessageStore> = Arc::new(DynamoStore::new(table, Settings::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    // The writer wants a service token, as in production: a gateway's, from a key of this run.
    let keys = chorus_service::service_auth::ServiceKeys::from_secrets(&[uuid::Uuid::new_v4()
        .simple()
        .to_string()
        .repeat(2)
        .into_bytes()])?;
    let token = chorus_testkit::tokens::gateway_token(&keys, "writer-bench");
    let server = tokio::spawn(chorus_writer::run(
        listener,
        Arc::clone(&store),
        Arc::new(keys),
        stop.clone().cancelled_owned(),
    ));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .default_headers(chorus_testkit::tokens::bearer_headers(&token))
        .build()?;
    let sender = Sender {
        http,
        base,
        run: uuid::Uuid::new_v4().simple().to_string()[..6].to_owned(),
    };

    // Every room's first send, untimed.
    let before = store.usage();
    sender
        .send("hot", "user-0", "warm-up", &"h".repeat(args.hot_body_bytes))
        .await
        .context("warming up the hot room")?;
    let quiet_body = "q".repeat(args.quiet_body_bytes);
    // Created 64 at a time: creation is not what is measured, and a thousand rooms created at
    // once only measure the local DynamoDB's queue.
    let warm: Vec<anyhow::Result<()>> = futures_util::stream::iter(0..args.quiet_rooms)
        .map(|r| {
            let (sender, body) = (&sender, &quiet_body);
            async move {
                let room = format!("quiet-{r}");
                sender
                    .send(&room, &format!("user-{r}"), "warm-up", body)
                    .await
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let failures: Vec<&anyhow::Error> = warm.iter().filter_map(|r| r.as_ref().err()).collect();
    if let Some(first) = failures.first() {
        anyhow::bail!(
            "{} quiet rooms could not be created, the first: {first:#}",
            failures.len()
        );
    }
    let room_creation = minus(store.usage(), before);

    let hot = hot_phase(&sender, &*store, args).await;
    let quiet = quiet_phase(&sender, &*store, args).await;
    stop.cancel();
    server.await??;
    Ok((hot, quiet, room_creation))
}

#[derive(Clone)]
struct Sender {
    http: reqwest::Client,
    base: String,
    /// Makes ids unique per run, so nothing is answered as a retry.
    run: String,
}

impl Sender {
    /// Sends one message as `user` and waits for its ack; `Err` says why it was not acked.
    async fn send(&self, room: &str, user: &str, id: &str, body: &str) -> anyhow::Result<()> {
        let res = self
            .http
            .post(format!("{}/v1/rooms/{room}/messages", self.base))
            .json(&serde_json::json!({
                "id": format!("{}-{id}", self.run),
                "sender": user,
                "body": body,
            }))
            .send()
            .await?;
        let status = res.status();
        if status != 201 {
            let body = res.text().await.unwrap_or_default();
            anyhow::bail!("answered {status}: {body}");
        }
        Ok(())
    }
}

async fn hot_phase(sender: &Sender, store: &dyn MessageStore, args: &Args) -> Phase {
    let body = "h".repeat(args.hot_body_bytes);
    let before = store.usage();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.hot_seconds);
    let issued = AtomicUsize::new(0);
    let senders = (0..args.hot_senders).map(|s| {
        let (sender, body, issued) = (sender, &body, &issued);
        async move {
            let mut phase = Phase::default();
            let mut n = 0;
            while Instant::now() < deadline
                && issued.fetch_add(1, Ordering::Relaxed) < args.max_sends
            {
                let sent = Instant::now();
                let (user, id) = (format!("user-{s}"), format!("s{s}-{n}"));
                phase.record(sent, sender.send("hot", &user, &id, body).await);
                n += 1;
            }
            phase
        }
    });
    let phases = futures_util::future::join_all(senders).await;
    merge(phases, started.elapsed(), minus(store.usage(), before))
}

async fn quiet_phase(sender: &Sender, store: &dyn MessageStore, args: &Args) -> Phase {
    let body = "q".repeat(args.quiet_body_bytes);
    let before = store.usage();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.quiet_max_seconds);
    let senders = (0..args.quiet_rooms).map(|r| {
        let (sender, body) = (sender, &body);
        async move {
            let mut phase = Phase::default();
            for n in 0..args
                .quiet_messages
                .min(args.max_sends / args.quiet_rooms.max(1))
            {
                if Instant::now() >= deadline {
                    break;
                }
                let sent = Instant::now();
                let (room, user, id) = (
                    format!("quiet-{r}"),
                    format!("user-{r}"),
                    format!("r{r}-{n}"),
                );
                phase.record(sent, sender.send(&room, &user, &id, body).await);
            }
            phase
        }
    });
    let phases = futures_util::future::join_all(senders).await;
    merge(phases, started.elapsed(), minus(store.usage(), before))
}

/// Creates `name` with the messages table's keys and billing but no stream: the writer never
/// reads the stream (the publisher's bench measures that side), and DynamoDB Local's stream
/// slows every later write as its records pile up — measured here: a second run of the replaced
/// design on the same DynamoDB Local fell from 36 to 0.3 sends/s with streams, not without.
async fn create_table_without_stream(
    client: &aws_sdk_dynamodb::Client,
    name: &str,
) -> anyhow::Result<()> {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
        TableStatus,
    };
    client
        .create_table()
        .table_name(name)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("room")
                .attribute_type(ScalarAttributeType::S)
                .build()?,
        )
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("seq")
                .attribute_type(ScalarAttributeType::N)
                .build()?,
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("room")
                .key_type(KeyType::Hash)
                .build()?,
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("seq")
                .key_type(KeyType::Range)
                .build()?,
        )
        .send()
        .await
        .context("creating the bench table")?;
    for _ in 0..300 {
        let status = client
            .describe_table()
            .table_name(name)
            .send()
            .await?
            .table
            .and_then(|t| t.table_status);
        if status == Some(TableStatus::Active) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("table {name} not active after 300 checks")
}

fn merge(phases: Vec<Phase>, elapsed: Duration, usage: Usage) -> Phase {
    let mut total = Phase {
        elapsed,
        usage,
        ..Phase::default()
    };
    for phase in phases {
        total.acked += phase.acked;
        total.failed += phase.failed;
        total.latencies.extend(phase.latencies);
        total.first_error = total.first_error.or(phase.first_error);
    }
    total.latencies.sort_unstable();
    total
}

fn minus(after: Usage, before: Usage) -> Usage {
    Usage {
        write_units: after.write_units - before.write_units,
        read_units: after.read_units - before.read_units,
        items_written: after.items_written - before.items_written,
        messages_written: after.messages_written - before.messages_written,
        races_lost: after.races_lost - before.races_lost,
    }
}
