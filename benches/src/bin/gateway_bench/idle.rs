//! The idle run: how much resident memory one open, joined, silent connection costs a server.
//!
//! One process may hold at most 20,000 file descriptors here (a hard limit that cannot be
//! raised), so 100,000 connections are spread over several server processes, each with its own
//! client process connecting from its own 127.0.0.x source address (28,000 ephemeral ports per
//! address). Per server process: RSS once it is ready with no clients, and again once all of its
//! clients are connected (and, for the gateway, joined) and a few seconds have passed. The
//! result is the sum of the growths over the sum of the connections.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::children::{Child, stop_all};
use crate::wsclient::{self, Frame};
use crate::{ServerKind, ServerProcess};

/// Role `idle-clients`: open `count` connections, join, report, then hold them silently until
/// stdin closes.
#[derive(Debug, clap::Args)]
pub(crate) struct IdleClientsArgs {
    #[arg(long)]
    server: SocketAddr,
    #[arg(long)]
    count: usize,
    /// Source address to connect from.
    #[arg(long)]
    source: Ipv4Addr,
    /// Each connection joins one of this many rooms (`idle-0` …), round-robin.
    #[arg(long, default_value_t = 1000)]
    rooms: usize,
    /// Wait for `joined` (the gateway); the baseline answers nothing.
    #[arg(long)]
    expect_joined: bool,
    /// Prefix of the `?user=` names.
    #[arg(long, default_value = "idle")]
    user_prefix: String,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
}

/// Source port of a client process's first connection.
const FIRST_PORT: u16 = 10_000;

pub(crate) async fn clients(args: IdleClientsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.count <= usize::from(32_768 - FIRST_PORT),
        "at most {} connections per client process",
        32_768 - FIRST_PORT
    );
    let mut open: Vec<TcpStream> = Vec::with_capacity(args.count);
    let mut failed = 0usize;
    let mut first_error: Option<String> = None;
    let mut pending = JoinSet::new();
    let mut next = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    while next < args.count || !pending.is_empty() {
        while next < args.count && pending.len() < args.concurrency {
            let path = format!("/ws?user={}{next}", args.user_prefix);
            let join = format!(
                r#"{{"type":"join","room":"idle-{}"}}"#,
                next % args.rooms.max(1)
            );
            // Ports below the kernel's ephemeral range (32768 and up), chosen here: binding
            // to port 0 costs a linear search per connection.
            let source = SocketAddrV4::new(args.source, FIRST_PORT + next as u16);
            pending.spawn(open_one(
                source,
                args.server,
                path,
                join,
                args.expect_joined,
            ));
            next += 1;
        }
        match tokio::time::timeout_at(deadline, pending.join_next()).await {
            Ok(Some(Ok(Ok(stream)))) => open.push(stream),
            Ok(Some(Ok(Err(e)))) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Ok(Some(Err(e))) => bail!("a connecting task failed: {e}"),
            Ok(None) => {}
            Err(_) => bail!("connecting took over 240 s"),
        }
    }
    crate::say(&format!(
        "connected {} {failed} {}",
        open.len(),
        first_error.unwrap_or_default()
    ));
    crate::stdin_closed().await;
    drop(open);
    Ok(())
}

/// One connection: upgrade, join, and (gateway) wait for `joined`; up to 3 attempts.
async fn open_one(
    source: SocketAddrV4,
    server: SocketAddr,
    path: String,
    join: String,
    expect_joined: bool,
) -> anyhow::Result<TcpStream> {
    let mut last = None;
    for attempt in 0..3u64 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
        }
        let attempt = async {
            let (mut stream, mut buf) = wsclient::connect(source, server, &path).await?;
            stream.write_all(&wsclient::text_frame(&join)).await?;
            if expect_joined {
                wait_joined(&mut stream, &mut buf).await?;
            }
            anyhow::Ok(stream)
        };
        match tokio::time::timeout(Duration::from_secs(30), attempt).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = Some(e),
            Err(_) => last = Some(anyhow::anyhow!("no upgrade and join within 30 s")),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt")))
}

async fn wait_joined(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt as _;
    loop {
        let mut at = 0;
        while let Some((frame, used)) = wsclient::parse_frame(&buf[at..]) {
            match frame {
                Frame::Text(text) if text.starts_with(br#"{"type":"joined""#) => return Ok(()),
                Frame::Text(text) => bail!(
                    "expected joined, got {}",
                    String::from_utf8_lossy(&text[..text.len().min(200)])
                ),
                Frame::Close(code) => bail!("closed ({code:?}) before joined"),
                Frame::Other => {}
            }
            at += used;
        }
        buf.drain(..at);
        let mut chunk = [0u8; 512];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before joined");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Result of the idle run for one kind of server.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IdleResult {
    pub(crate) connections: usize,
    pub(crate) kib_per_conn: f64,
}

/// Runs `total` idle connections against `processes` servers of `kind`, the clients connecting
/// from 127.0.0.`first_source` onwards (one address per client process).
pub(crate) async fn run(
    kind: ServerKind,
    total: usize,
    processes: usize,
    first_source: u8,
    rooms: usize,
) -> anyhow::Result<IdleResult> {
    let mut servers = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..processes {
        let ServerProcess { child, ws, .. } = ServerProcess::start(kind, i).await?;
        servers.push(child);
        addrs.push(ws);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before: Vec<u64> = servers
        .iter()
        .map(Child::rss_kib)
        .collect::<Result<_, _>>()?;

    let mut clients = Vec::new();
    let started = std::time::Instant::now();
    for (i, addr) in addrs.iter().enumerate() {
        let count = total / processes + usize::from(i < total % processes);
        let source = Ipv4Addr::new(127, 0, 0, first_source + i as u8);
        let mut args = vec![
            "idle-clients".to_owned(),
            "--server".to_owned(),
            addr.to_string(),
            "--count".to_owned(),
            count.to_string(),
            "--source".to_owned(),
            source.to_string(),
            "--rooms".to_owned(),
            rooms.to_string(),
            "--user-prefix".to_owned(),
            format!("idle{i}-"),
        ];
        if kind == ServerKind::Gateway {
            args.push("--expect-joined".to_owned());
        }
        clients.push(Child::spawn(format!("{kind}-clients-{i}"), &args)?);
    }
    let mut connected = Vec::new();
    for client in &mut clients {
        let line = client.expect("connected", Duration::from_secs(300)).await?;
        let mut words = line.splitn(3, ' ');
        let ok: usize = words.next().unwrap_or_default().parse().context("count")?;
        let failed: usize = words.next().unwrap_or_default().parse().context("failed")?;
        if failed > 0 {
            println!(
                "{}: {failed} connections failed, first: {}",
                client.name,
                words.next().unwrap_or_default()
            );
        }
        connected.push(ok);
    }
    let open: usize = connected.iter().sum();
    println!(
        "idle {kind}: {open} connections open in {:.1}s; settling",
        started.elapsed().as_secs_f64()
    );
    if open * 100 < total * 99 {
        stop_all(servers, clients).await;
        bail!("only {open} of {total} connections could be opened");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after: Vec<u64> = servers
        .iter()
        .map(Child::rss_kib)
        .collect::<Result<_, _>>()?;
    for (i, server) in servers.iter().enumerate() {
        let growth = after[i].saturating_sub(before[i]);
        println!(
            "idle {kind}[{i}] pid={} connections={} rss_start_kib={} rss_after_kib={} kib_per_conn={:.2}",
            server.pid,
            connected[i],
            before[i],
            after[i],
            growth as f64 / connected[i].max(1) as f64
        );
    }
    let growth: u64 = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.saturating_sub(*b))
        .sum();
    stop_all(servers, clients).await;
    Ok(IdleResult {
        connections: open,
        kib_per_conn: growth as f64 / open.max(1) as f64,
    })
}
