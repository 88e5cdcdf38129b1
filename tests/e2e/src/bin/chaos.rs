//! `chorus-chaos`: the delivery promise under faults, against the AWS emulator.
//!
//! 3 gateways (one behind a fault layer that duplicates, reorders and drops SNS notifications),
//! 2 writers, the publisher; clients spread over the gateways in 3 rooms send messages (each
//! waits for its ack, retrying with the same id across reconnects). During the run one gateway is
//! drained (SIGTERM) and replaced by a new one, another is killed (SIGKILL) and its dead
//! subscription removed by the janitor, and the publisher is restarted (it re-reads the stream
//! from its start). Then every client's received sequence is checked against what the writer
//! stored. The last line is `chaos: messages=N clients=M lost=X duplicated=Y reordered=Z`; the exit
//! code is 0 only if the three are 0.
//!
//! It is a tool that reports to a terminal: it prints to stdout by design.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::{BTreeSet, HashMap};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use chorus_chat::{Client, Received};
use chorus_e2e::faults::{FaultPlan, FaultyIngress};
use chorus_e2e::{Stack, aws};
use chorus_protocol::{ErrorCode, RoomId, Seq, ServerFrame, close};
use clap::Parser as _;
use tokio::sync::{Barrier, watch};
use tokio::time::Instant;

#[derive(Debug, clap::Parser)]
#[command(
    name = "chorus-chaos",
    about = "Delivery under duplicated, reordered and dropped notifications and gateway churn"
)]
struct Args {
    #[arg(long, default_value_t = 21)]
    clients: usize,
    #[arg(long, default_value_t = 3)]
    rooms: usize,
    #[arg(long, default_value_t = 150)]
    messages_per_client: usize,
    #[arg(long, default_value_t = 0.10)]
    duplicate: f64,
    #[arg(long, default_value_t = 0.10)]
    reorder: f64,
    #[arg(long, default_value_t = 0.05)]
    drop: f64,
    /// Seed of the fault layer (printed, so a failing run can be replayed).
    #[arg(long)]
    seed: Option<u64>,
    /// Hard limit on the whole run, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

/// Gateways clients may connect to (ws URLs without the query).
type Live = Arc<RwLock<Vec<String>>>;

#[derive(Debug, Default)]
struct ClientReport {
    room: Option<RoomId>,
    /// The seq the client joined at (messages after it are expected).
    joined_at: u64,
    /// Every message seq received, in order, across all its connections.
    received: Vec<u64>,
    sent: usize,
    reconnects: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("chaos: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let began = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let plan = FaultPlan {
        duplicate: args.duplicate,
        reorder: args.reorder,
        drop: args.drop,
        seed,
    };
    println!(
        "chaos: seed={seed} clients={} rooms={} messages={} faults on gateway-0: duplicate={} reorder={} drop={}",
        args.clients,
        args.rooms,
        args.clients * args.messages_per_client,
        plan.duplicate,
        plan.reorder,
        plan.drop
    );

    let mut stack = Stack::start_with(2, 0).await?;
    let faults = FaultyIngress::start(plan).await?;
    // The fault layer forwards to the gateway as soon as it listens: SNS may post the
    // subscription's confirmation through it before the gateway is ready.
    stack
        .add_gateway_with(&["--public-url", &faults.url], |gateway| {
            faults.forward_to(format!("{}/sns", gateway.http()))
        })
        .await
        .context("faulty gateway")?;
    stack.add_gateway(&[]).await?;
    stack.add_gateway(&[]).await?;
    let ws = |s: &chorus_e2e::Service| format!("ws://{}/ws", s.addr);
    let live: Live = Arc::new(RwLock::new(stack.gateways.iter().map(ws).collect()));
    println!(
        "chaos: stack up: 2 writers, publisher, gateways {:?}",
        live.read().unwrap()
    );

    let rooms: Vec<RoomId> = (0..args.rooms)
        .map(|r| RoomId::parse(format!("chaos-{r}")).expect("valid room"))
        .collect();
    let total = args.clients * args.messages_per_client;
    let acked = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(args.clients + 1));
    let (heads_tx, heads_rx) = watch::channel::<Option<HashMap<RoomId, u64>>>(None);
    let mut tasks = Vec::new();
    for i in 0..args.clients {
        let room = rooms[i % rooms.len()].clone();
        tasks.push(tokio::spawn(client(
            i,
            room,
            args.messages_per_client,
            Arc::clone(&live),
            Arc::clone(&acked),
            Arc::clone(&start),
            heads_rx.clone(),
            deadline,
        )));
    }
    start.wait().await;
    println!(
        "chaos: [{:>5.1}s] {} clients joined, sending",
        began.elapsed().as_secs_f64(),
        args.clients
    );

    // Faults over time, driven by progress. A janitor removes dead subscriptions every second.
    let sns = aws_sdk_sns::Client::new(&aws().await);
    let mut janitor = tokio::time::interval(Duration::from_secs(1));
    let (mut drained, mut killed, mut restarted) = (false, false, false);
    while acked.load(Ordering::Relaxed) < total {
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out with {} of {total} sends acked",
            acked.load(Ordering::Relaxed)
        );
        tokio::select! {
            _ = janitor.tick() => {
                let removed = chorus_gateway::bus::prune_dead_subscriptions(&sns, &stack.topic_arn).await?;
                if !removed.is_empty() {
                    println!("chaos: [{:>5.1}s] janitor removed {} dead subscription(s)", began.elapsed().as_secs_f64(), removed.len());
                }
            }
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        let done = acked.load(Ordering::Relaxed);
        if !drained && done >= total / 4 {
            drained = true;
            let url = ws(&stack.gateways[1]);
            live.write().unwrap().retain(|u| *u != url);
            let status = tokio::task::block_in_place(|| {
                stack.gateways[1].terminate(Duration::from_secs(15))
            })?;
            println!(
                "chaos: [{:>5.1}s] gateway-1 drained (SIGTERM, {status}) at {done} acked",
                began.elapsed().as_secs_f64()
            );
            let index = stack.add_gateway(&[]).await?;
            live.write().unwrap().push(ws(&stack.gateways[index]));
            println!(
                "chaos: [{:>5.1}s] gateway-{index} added",
                began.elapsed().as_secs_f64()
            );
        }
        if !killed && done >= total / 2 {
            killed = true;
            let url = ws(&stack.gateways[2]);
            live.write().unwrap().retain(|u| *u != url);
            stack.gateways[2].kill();
            println!(
                "chaos: [{:>5.1}s] gateway-2 killed (SIGKILL) at {done} acked",
                began.elapsed().as_secs_f64()
            );
        }
        if !restarted && done >= total * 3 / 4 {
            restarted = true;
            tokio::task::block_in_place(|| stack.restart_publisher())?;
            println!(
                "chaos: [{:>5.1}s] publisher restarted at {done} acked",
                began.elapsed().as_secs_f64()
            );
        }
    }

    // Every send is acked: read what the writer stored, and let clients catch up to it.
    let writer = reqwest::Client::new();
    let mut heads = HashMap::new();
    let mut stored = 0u64;
    for room in &rooms {
        let page: chorus_protocol::api::HistoryPage = writer
            .get(format!(
                "{}/v1/rooms/{room}/messages?limit=0",
                stack.writer.http()
            ))
            .send()
            .await?
            .json()
            .await?;
        stored += page.head.0;
        heads.insert(room.clone(), page.head.0);
    }
    heads_tx.send_replace(Some(heads.clone()));
    let mut reports = Vec::new();
    for task in tasks {
        reports.push(task.await.context("client task panicked")??);
    }

    let (mut lost, mut duplicated, mut reordered, mut reconnects) = (0u64, 0u64, 0u64, 0usize);
    let mut sent = 0usize;
    for report in &reports {
        let room = report.room.as_ref().expect("room");
        let head = heads[room];
        let distinct: BTreeSet<u64> = report.received.iter().copied().collect();
        lost += (report.joined_at + 1..=head)
            .filter(|s| !distinct.contains(s))
            .count() as u64;
        duplicated += (report.received.len() - distinct.len()) as u64;
        reordered += report.received.windows(2).filter(|w| w[1] < w[0]).count() as u64;
        reconnects += report.reconnects;
        sent += report.sent;
    }
    // A retried send stored twice would show as more stored messages than sends.
    duplicated += stored.saturating_sub(sent as u64);
    lost += (sent as u64).saturating_sub(stored);
    let stats = faults.stats();
    println!(
        "chaos: faults injected: notifications={} duplicated={} reordered={} dropped={}; client reconnects={reconnects}",
        stats.notifications.load(Ordering::Relaxed),
        stats.duplicated.load(Ordering::Relaxed),
        stats.reordered.load(Ordering::Relaxed),
        stats.dropped.load(Ordering::Relaxed),
    );
    println!(
        "chaos: messages={stored} clients={} lost={lost} duplicated={duplicated} reordered={reordered}",
        reports.len()
    );
    Ok(lost == 0 && duplicated == 0 && reordered == 0)
}

#[allow(clippy::too_many_arguments)]
async fn client(
    index: usize,
    room: RoomId,
    messages: usize,
    live: Live,
    acked: Arc<AtomicUsize>,
    start: Arc<Barrier>,
    mut heads: watch::Receiver<Option<HashMap<RoomId, u64>>>,
    deadline: Instant,
) -> anyhow::Result<ClientReport> {
    let user = format!("client-{index}");
    let mut report = ClientReport {
        room: Some(room.clone()),
        ..ClientReport::default()
    };
    let mut last: Option<Seq> = None;
    let mut next = 0usize;
    // The send awaiting its ack: (id, body). Resent with the same id after a reconnect.
    let mut pending: Option<(String, String)> = None;
    let mut started = false;
    let mut attempt = index;
    loop {
        anyhow::ensure!(Instant::now() < deadline, "{user}: out of time");
        let url = {
            let live = live.read().unwrap();
            format!("{}?user={user}", live[attempt % live.len()])
        };
        attempt += 1;
        let mut conn = match Client::connect(&url).await {
            Ok(conn) => conn,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if started {
            report.reconnects += 1;
        }
        conn.join(&room, last).await?;
        // Replayed messages come before `joined`.
        let joined = loop {
            match conn.recv_timeout(Duration::from_secs(10)).await {
                Ok(Some(Received::Frame(ServerFrame::Message(m)))) => {
                    report.received.push(m.seq.0);
                    last = Some(m.seq);
                }
                Ok(Some(Received::Frame(ServerFrame::Joined { seq, .. }))) => break Some(seq),
                Ok(Some(Received::Frame(_))) => {}
                _ => break None,
            }
        };
        let Some(joined) = joined else { continue };
        if !started {
            started = true;
            report.joined_at = joined.0;
            last = Some(joined);
            start.wait().await;
        }

        // Send (one at a time, each acked) and receive on this connection until it ends.
        let mut resend = true;
        let finished = loop {
            if pending.is_none() && next < messages {
                pending = Some((
                    format!("{user}-{next}"),
                    format!("message {next} from {user}"),
                ));
                resend = true;
            }
            if resend && let Some((id, body)) = &pending {
                let frame =
                    serde_json::json!({"type": "send", "room": room, "id": id, "body": body});
                if conn.send_raw(frame.to_string()).await.is_err() {
                    break false;
                }
                resend = false;
            }
            if pending.is_none() && next >= messages {
                // All sent: read until this client has everything the writer stored.
                let target = heads.borrow().as_ref().map(|h| h[&room]);
                if let Some(target) = target
                    && last.is_some_and(|l| l.0 >= target)
                {
                    break true;
                }
            }
            let received = tokio::select! {
                received = conn.recv_timeout(Duration::from_secs(10)) => received,
                _ = heads.changed(), if heads.borrow().is_none() => continue,
            };
            match received {
                Ok(Some(Received::Frame(frame))) => match frame {
                    ServerFrame::Message(m) => {
                        report.received.push(m.seq.0);
                        last = Some(m.seq);
                    }
                    ServerFrame::Ack { id, .. }
                        if pending.as_ref().is_some_and(|(p, _)| *p == id.as_str()) =>
                    {
                        pending = None;
                        next += 1;
                        report.sent += 1;
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    ServerFrame::Error {
                        code: ErrorCode::Unavailable,
                        ..
                    } => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        resend = true;
                    }
                    ServerFrame::Error { code, message, .. } => {
                        anyhow::bail!("{user}: unexpected error {code:?}: {message}")
                    }
                    _ => {}
                },
                Ok(Some(Received::Closed { code, reason })) => {
                    anyhow::ensure!(
                        close::should_resume(code),
                        "{user}: closed with {code} ({reason})"
                    );
                    break false;
                }
                Ok(None) => anyhow::ensure!(Instant::now() < deadline, "{user}: out of time"),
                Err(_) => break false,
            }
        };
        if finished {
            let _ = conn.close().await;
            return Ok(report);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
