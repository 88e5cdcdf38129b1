//! `chorus-chat`: chat from a terminal, or run the two-gateway demo.
//!
//! This is a command-line tool, not a service: it prints to stdout by design.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;
use std::time::Duration;

use chorus_client::{Client, ClientError, Event, Session};
use chorus_protocol::{PageLimit, RoomId, Seq, ServerFrame};
use clap::Parser as _;
use tokio::io::AsyncBufReadExt as _;

#[derive(Debug, clap::Parser)]
#[command(
    name = "chorus-chat",
    version,
    about = "Chat through Chorus gateways from a terminal"
)]
struct Cli {
    #[command(subcommand)]
    demo: Option<Demo>,
    /// Gateway WebSocket URL; repeat to give fallbacks used in turn after a drain or a drop.
    #[arg(long = "url", default_value = "ws://127.0.0.1:8081/ws")]
    urls: Vec<String>,
    /// Room to join.
    #[arg(long, default_value = "lobby")]
    room: String,
    /// Show the room's history first: every message after this seq (0: all that is kept).
    /// Without it, only messages from now on.
    #[arg(long)]
    since: Option<u64>,
    /// Your name (dev mode: sent as ?user=NAME). Ignored with a token.
    #[arg(long, default_value = "guest")]
    user: String,
    /// A JWT for gateways that take tokens (its `sub` is your name). Prefer the environment
    /// variable: command lines are visible to other users of the machine.
    #[arg(long, env = "CHORUS_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
enum Demo {
    /// John on gateway A and Lucy on gateway B greet each other; exit 0 only if both hear the other.
    Demo {
        #[arg(long, default_value = "ws://127.0.0.1:8081/ws")]
        a: String,
        #[arg(long, default_value = "ws://127.0.0.1:8082/ws")]
        b: String,
        #[arg(long, default_value = "lobby")]
        room: String,
    },
    /// Print an HS256 client token signed with a gateway's secret (for development and tests;
    /// production tokens come from your auth service).
    MintToken {
        /// The gateway's `--jwt-secret-file`.
        #[arg(long)]
        secret_file: std::path::PathBuf,
        /// The user (`sub`).
        #[arg(long)]
        sub: String,
        /// Rooms the token allows: exact names or `prefix*` (`*`: every room).
        #[arg(long, value_delimiter = ',', default_value = "*")]
        rooms: Vec<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
}

const WAIT: Duration = Duration::from_secs(10);

fn with_user(url: &str, user: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}user={user}")
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.demo {
        Some(Demo::Demo { a, b, room }) => demo(&a, &b, &room).await,
        Some(Demo::MintToken {
            secret_file,
            sub,
            rooms,
            ttl_secs,
        }) => mint_token(&secret_file, &sub, &rooms, ttl_secs),
        None => {
            chat(
                &cli.urls,
                &cli.room,
                &cli.user,
                cli.token.as_deref(),
                cli.since.map(Seq),
            )
            .await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chorus-chat: {e}");
            ExitCode::FAILURE
        }
    }
}

fn mint_token(
    secret_file: &std::path::Path,
    sub: &str,
    rooms: &[String],
    ttl_secs: u64,
) -> Result<(), ClientError> {
    let fail = |e: String| ClientError::Unexpected(e);
    let mut secret = std::fs::read(secret_file)
        .map_err(|e| fail(format!("reading {}: {e}", secret_file.display())))?;
    // As the gateway reads it: a trailing newline is not part of the secret.
    while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        secret.pop();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| fail(e.to_string()))?
        .as_secs();
    let claims = serde_json::json!({"sub": sub, "rooms": rooms, "iat": now, "exp": now + ttl_secs});
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&secret),
    )
    .map_err(|e| fail(e.to_string()))?;
    println!("{token}");
    Ok(())
}

fn parse_room(room: &str) -> Result<RoomId, ClientError> {
    RoomId::parse(room).map_err(|e| ClientError::Unexpected(e.to_string()))
}

async fn chat(
    urls: &[String],
    room: &str,
    user: &str,
    token: Option<&str>,
    since: Option<Seq>,
) -> Result<(), ClientError> {
    let room = parse_room(room)?;
    let urls: Vec<String> = match token {
        Some(_) => urls.to_vec(),
        None => urls.iter().map(|url| with_user(url, user)).collect(),
    };
    // Give up after this many connection attempts in a row that failed or ended before the room
    // was joined.
    let give_up_after = urls.len() * 5;
    let mut session = Session::new(urls, token.map(str::to_owned));
    session.join(room.clone(), since);
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let mut failed = 0usize;
    // The oldest seq on screen, or the one after the join's: where `/earlier` pages back from.
    let mut oldest: Option<Seq> = None;
    loop {
        // At the end of input, leave once every send is acked (they survive reconnects).
        if !stdin_open && session.unacked().next().is_none() {
            return session.close().await;
        }
        tokio::select! {
            line = stdin.next_line(), if stdin_open => match line {
                Ok(Some(line)) if line.trim().is_empty() => {}
                Ok(Some(line)) if line.trim() == "/earlier" => {
                    let limit = PageLimit::new(20).expect("20 is a page limit");
                    if let Err(e) = session.history(&room, oldest, limit) {
                        eprintln!("! {e}");
                    }
                }
                Ok(Some(line)) => {
                    if let Err(e) = session.send(&room, &line) {
                        eprintln!("! {e}");
                    }
                }
                _ => stdin_open = false,
            },
            event = session.next_event() => match event? {
                Event::Connected { url } => eprintln!("* connected to {url}"),
                Event::Joined { room, seq, .. } => {
                    failed = 0;
                    oldest = oldest.or(Some(seq.next()));
                    eprintln!("* joined {room} at seq {seq} (/earlier shows what came before)");
                }
                Event::Message(m) => {
                    oldest = Some(oldest.map_or(m.seq, |o| o.min(m.seq)));
                    println!("[{} #{}] {}: {}", m.room, m.seq, m.sender, m.body.as_str());
                }
                Event::History { room, messages, .. } => match messages.first() {
                    None => eprintln!("* nothing earlier of {room} is stored"),
                    Some(first) => {
                        oldest = Some(first.seq);
                        eprintln!("* {} earlier messages of {room}:", messages.len());
                        for m in &messages {
                            println!("[{} #{}] {}: {}", m.room, m.seq, m.sender, m.body.as_str());
                        }
                    }
                },
                Event::Acked { seq, .. } => eprintln!("* sent (seq {seq})"),
                Event::Left { room } => eprintln!("* left {room}"),
                Event::HistoryExpired { room, message, .. } => {
                    eprintln!("! messages of {room} were missed: {message}");
                }
                Event::SendFailed { code, message, .. } | Event::JoinFailed { code, message, .. } => {
                    eprintln!("! {code:?}: {message}");
                }
                Event::Retrying { code, message, .. } | Event::Error { code, message, .. } => {
                    eprintln!("! {code:?}: {message}");
                }
                Event::Disconnected { code: Some(code), reason, .. } => {
                    failed += 1;
                    eprintln!("* gateway closed ({code}: {reason}): reconnecting and resuming");
                }
                Event::Disconnected { code: None, reason, .. } => {
                    failed += 1;
                    eprintln!("* connection lost ({reason}): reconnecting and resuming");
                }
                Event::ConnectFailed { url, error, .. } => {
                    failed += 1;
                    eprintln!("* cannot connect to {url}: {error}");
                    if failed >= give_up_after {
                        return Err(error);
                    }
                }
                other => eprintln!("* {other:?}"),
            },
        }
    }
}

async fn demo(a: &str, b: &str, room: &str) -> Result<(), ClientError> {
    let room = parse_room(room)?;
    let mut john = Client::connect(&with_user(a, "john")).await?;
    let mut lucy = Client::connect(&with_user(b, "lucy")).await?;
    for (who, client) in [("john", &mut john), ("lucy", &mut lucy)] {
        client.join(&room, None).await?;
        let (frame, _) = client
            .wait_for(WAIT, "joined", |f| matches!(f, ServerFrame::Joined { .. }))
            .await?;
        if let ServerFrame::Joined { seq, .. } = frame {
            println!("{who:>5} joined {room} (head seq {seq})");
        }
    }
    greet(
        &mut john,
        "john",
        "A",
        &mut lucy,
        "lucy",
        "B",
        &room,
        "Hello world",
    )
    .await?;
    greet(
        &mut lucy,
        "lucy",
        "B",
        &mut john,
        "john",
        "A",
        &room,
        "Hi John, Lucy here!",
    )
    .await?;
    john.close().await?;
    lucy.close().await?;
    println!("demo ok: each heard the other across gateways");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn greet(
    from: &mut Client,
    from_name: &str,
    from_gw: &str,
    to: &mut Client,
    to_name: &str,
    to_gw: &str,
    room: &RoomId,
    body: &str,
) -> Result<(), ClientError> {
    let id = from.send(room, body).await?;
    let (ack, _) = from
        .wait_for(
            WAIT,
            "ack",
            |f| matches!(f, ServerFrame::Ack { id: got, .. } if got.as_str() == id),
        )
        .await?;
    let ServerFrame::Ack { seq, .. } = ack else {
        unreachable!()
    };
    println!("{from_name:>5} on gateway {from_gw} → {room}: {body:?} (acked, seq {seq})");
    let (got, _) = to
        .wait_for(
            WAIT,
            &format!("{from_name}'s message on gateway {to_gw}"),
            |f| matches!(f, ServerFrame::Message(m) if m.id.as_str() == id),
        )
        .await?;
    if let ServerFrame::Message(m) = got {
        println!(
            "{to_name:>5} on gateway {to_gw} ← {room} #{}: {}: {:?}",
            m.seq,
            m.sender,
            m.body.as_str()
        );
    }
    Ok(())
}
