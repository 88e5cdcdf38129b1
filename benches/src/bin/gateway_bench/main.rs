//! `chorus-gateway-bench` (`./scripts/bench gateway`): one gateway's memory per idle connection
//! and its fan-out rate, each next to a bare baseline measured in the same run: a minimal
//! tokio-tungstenite server that only broadcasts the same frames to the same clients.
//!
//! Everything is on loopback and bounded in count and time. The orchestrator (no subcommand)
//! starts this same executable in other roles — `serve-gateway`, `serve-baseline`,
//! `idle-clients` — as child processes that die with it; the fan-out clients and the injector
//! run inside the orchestrator. Method and results: BENCHMARKS.md.
//!
//! The last two lines are
//! `gateway: connections=N idle_kib_per_conn=X deliveries_per_s=Y p99_ms=Z ratio_to_baseline=R`
//! for the idle run (R compares memory per connection; no deliveries, so `-`) and for the
//! fan-out run (R compares deliveries per second; X is the growth once N clients had joined).
//!
//! A tool that reports to a terminal: it prints to stdout by design.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod baseline;
mod children;
mod fanout;
mod gateway;
mod idle;
mod injector;
mod latency;
mod wsclient;

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser as _;
use tokio::io::AsyncReadExt as _;

use crate::children::Child;

#[derive(Debug, clap::Parser)]
#[command(
    name = "chorus-gateway-bench",
    about = "Gateway memory per idle connection and fan-out rate, against a bare baseline (see BENCHMARKS.md)"
)]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, clap::Subcommand)]
enum Role {
    /// (started by the bench) The gateway on 127.0.0.1:0 with an empty log and a fake topic.
    ServeGateway,
    /// (started by the bench) The bare broadcast baseline on 127.0.0.1:0.
    ServeBaseline,
    /// (started by the bench) Idle clients of one server.
    IdleClients(idle::IdleClientsArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Idle run: connections in total, over all server processes.
    #[arg(long, default_value_t = 100_000)]
    idle_connections: usize,
    /// Idle run: server processes (one process holds at most ~19,900 sockets here).
    #[arg(long, default_value_t = 6)]
    idle_processes: usize,
    /// Idle run: rooms per gateway process the connections are spread over.
    #[arg(long, default_value_t = 1000)]
    idle_rooms: usize,
    /// Fan-out run: members of the room.
    #[arg(long, default_value_t = 2000)]
    fanout_clients: usize,
    /// Fan-out run: seconds of injection per step.
    #[arg(long, default_value_t = 3.0)]
    step_secs: f64,
    /// Fan-out run: bytes of each message body.
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
    /// Fan-out run: a step fails at or above this p99 latency.
    #[arg(long, default_value_t = 50.0)]
    max_p99_ms: f64,
    /// Fan-out run: first rate tried, in messages per second (× members = deliveries).
    #[arg(long, default_value_t = 50)]
    start_rate: u32,
    /// Fan-out run: the doubling stops above this rate.
    #[arg(long, default_value_t = 3200)]
    max_rate: u32,
    /// Fan-out run: bisection steps after the first failing rate.
    #[arg(long, default_value_t = 4)]
    bisections: u32,
    /// Fan-out run: a failing step is tried this many more times before it counts (the knee's
    /// p99 moves by ±10 ms from one step to the next on a shared 2-core machine).
    #[arg(long, default_value_t = 2)]
    retries: u32,
    #[arg(long)]
    skip_idle: bool,
    #[arg(long)]
    skip_fanout: bool,
    /// The whole bench is stopped (and everything it started) after this many seconds.
    #[arg(long, default_value_t = 900)]
    deadline_secs: u64,
}

/// Which server is under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServerKind {
    Gateway,
    Baseline,
}

impl std::fmt::Display for ServerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ServerKind::Gateway => "gateway",
            ServerKind::Baseline => "baseline",
        })
    }
}

/// A server child process and where it listens.
pub(crate) struct ServerProcess {
    pub(crate) child: Child,
    /// WebSocket address (the gateway's `/ws` and `/sns`; the baseline's WebSocket listener).
    pub(crate) ws: SocketAddr,
    /// The baseline's line ingress.
    pub(crate) ingress: Option<SocketAddr>,
}

impl ServerProcess {
    pub(crate) async fn start(kind: ServerKind, index: usize) -> anyhow::Result<ServerProcess> {
        let role = match kind {
            ServerKind::Gateway => "serve-gateway",
            ServerKind::Baseline => "serve-baseline",
        };
        let mut child = Child::spawn(format!("{kind}-{index}"), &[role.to_owned()])?;
        let line = child.expect("ready", Duration::from_secs(30)).await?;
        let mut addrs = line.split(' ').map(str::parse::<SocketAddr>);
        let ws = addrs.next().context("no address")??;
        let ingress = addrs.next().transpose()?;
        Ok(ServerProcess { child, ws, ingress })
    }
}

/// A line to the parent process.
pub(crate) fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Resolves when stdin reaches its end: the parent is gone or wants this child to stop.
pub(crate) async fn stdin_closed() {
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 256];
    while let Ok(n) = stdin.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match &cli.role {
        // The load generator's idle clients only connect and wait: one thread is plenty.
        Some(Role::IdleClients(_)) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        // Servers get what `#[tokio::main]` gives the real gateway: a worker per core.
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("gateway-bench: cannot start tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.role {
            Some(Role::ServeGateway) => gateway::serve().await,
            Some(Role::ServeBaseline) => baseline::serve().await,
            Some(Role::IdleClients(args)) => idle::clients(args).await,
            None => orchestrate(cli.run).await,
        }
    });
    // A read of stdin may still be blocking a thread: do not wait for it.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// 127.0.0.x source addresses of each phase's clients: distinct, so that one phase's closed
/// sockets never hold ports another needs.
const GATEWAY_IDLE_SOURCES: u8 = 10;
const BASELINE_IDLE_SOURCES: u8 = 110;
const FANOUT_SOURCES: u8 = 210;

async fn orchestrate(args: RunArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=90).contains(&args.idle_processes),
        "--idle-processes must be 1 to 90"
    );
    anyhow::ensure!(
        args.fanout_clients <= 19_000 / 2,
        "--fanout-clients must be at most 9,500"
    );
    anyhow::ensure!(
        args.step_secs > 0.0 && args.start_rate > 0,
        "--step-secs and --start-rate must be positive"
    );
    let deadline = Duration::from_secs(args.deadline_secs);
    tokio::time::timeout(deadline, bench(args))
        .await
        .with_context(|| format!("the bench ran over its deadline of {deadline:?}"))?
}

async fn bench(args: RunArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let idle = if args.skip_idle {
        None
    } else {
        println!(
            "idle run: {} connections over {} processes per server (at most ~19,900 sockets per process here)",
            args.idle_connections, args.idle_processes
        );
        let gateway = idle::run(
            ServerKind::Gateway,
            args.idle_connections,
            args.idle_processes,
            GATEWAY_IDLE_SOURCES,
            args.idle_rooms,
        )
        .await?;
        let baseline = idle::run(
            ServerKind::Baseline,
            args.idle_connections,
            args.idle_processes,
            BASELINE_IDLE_SOURCES,
            args.idle_rooms,
        )
        .await?;
        Some((gateway, baseline))
    };
    let fanout = if args.skip_fanout {
        None
    } else {
        println!(
            "fan-out run: {} members of one room, {} s steps, p99 < {} ms, no loss",
            args.fanout_clients, args.step_secs, args.max_p99_ms
        );
        let fanout_args = fanout::FanoutArgs {
            clients: args.fanout_clients,
            step_secs: args.step_secs,
            body_bytes: args.body_bytes,
            max_p99_ms: args.max_p99_ms,
            start_rate: args.start_rate,
            max_rate: args.max_rate,
            bisections: args.bisections,
            retries: args.retries,
            source: FANOUT_SOURCES,
        };
        Some(fanout::run(&fanout_args).await?)
    };
    println!("bench took {:.0} s", started.elapsed().as_secs_f64());

    let p99 = |r: &fanout::FanoutResult| {
        r.best
            .as_ref()
            .map_or("-".to_owned(), |b| format!("{:.1}", b.latency.p99_ms))
    };
    if let Some((_, baseline)) = &idle {
        println!(
            "baseline: connections={} idle_kib_per_conn={:.2} deliveries_per_s=- p99_ms=-",
            baseline.connections, baseline.kib_per_conn
        );
    }
    if let Some((_, baseline)) = &fanout {
        println!(
            "baseline: connections={} idle_kib_per_conn={:.2} deliveries_per_s={:.0} p99_ms={}",
            baseline.clients,
            baseline.kib_per_conn,
            baseline.deliveries_per_s(),
            p99(baseline)
        );
    }
    if let (Some((gi, _)), Some((gf, bf))) = (&idle, &fanout) {
        let ratio = gf.deliveries_per_s() / bf.deliveries_per_s().max(1.0);
        println!(
            "targets: idle {:.2} KiB/conn (target ≤ 10: {}); fan-out {:.2}× the baseline (target ≥ 0.8: {})",
            gi.kib_per_conn,
            if gi.kib_per_conn <= 10.0 {
                "met"
            } else {
                "MISSED"
            },
            ratio,
            if ratio >= 0.8 { "met" } else { "MISSED" }
        );
    }
    if let Some((gateway, baseline)) = &idle {
        println!(
            "gateway: connections={} idle_kib_per_conn={:.2} deliveries_per_s=- p99_ms=- ratio_to_baseline={:.2}",
            gateway.connections,
            gateway.kib_per_conn,
            gateway.kib_per_conn / baseline.kib_per_conn.max(0.01)
        );
    }
    if let Some((gateway, baseline)) = &fanout {
        println!(
            "gateway: connections={} idle_kib_per_conn={:.2} deliveries_per_s={:.0} p99_ms={} ratio_to_baseline={:.2}",
            gateway.clients,
            gateway.kib_per_conn,
            gateway.deliveries_per_s(),
            p99(gateway),
            gateway.deliveries_per_s() / baseline.deliveries_per_s().max(1.0)
        );
    }
    Ok(())
}
