//! Role `serve-baseline`: the bare baseline. A minimal tokio-tungstenite server that broadcasts
//! every frame it is given to every connection: no rooms, no auth, no ordering, no HTTP router.
//!
//! - Ingress: a plain TCP listener; each line is one frame, already serialized (the exact bytes
//!   the gateway would send), published once on a `tokio::sync::broadcast` channel.
//! - Connections: one task each, with the gateway's WebSocket settings (4 KiB read buffer,
//!   8 KiB write buffer, 64 KiB message limit). It waits for the next broadcast frame, queues it
//!   and every frame already waiting, then flushes once (as the gateway's writer does), and
//!   reads and drops whatever the client sends.
//! - A connection more than 512 frames behind (the gateway's default send queue) is closed with
//!   4001, as the gateway does.

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::AsyncBufReadExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::http::header::SEC_WEBSOCKET_PROTOCOL;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Frames a connection may fall behind before it is closed (the gateway's `--send-queue`).
const QUEUE: usize = 512;
/// The gateway's per-connection buffers (crates/gateway/src/http/ws.rs).
const READ_BUFFER_BYTES: usize = 2 * 1024;
const WRITE_BUFFER_BYTES: usize = 8 * 1024;
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Serves until stdin closes; prints `ready <ws addr> <ingress addr>`.
pub(crate) async fn serve() -> anyhow::Result<()> {
    let ws = TcpListener::bind("127.0.0.1:0").await?;
    let ingress = TcpListener::bind("127.0.0.1:0").await?;
    let (tx, _) = broadcast::channel::<Utf8Bytes>(QUEUE);
    crate::say(&format!(
        "ready {} {}",
        ws.local_addr()?,
        ingress.local_addr()?
    ));
    let publisher = tx.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = ingress.accept().await {
            let tx = publisher.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    // No receivers is fine: nobody is connected yet.
                    let _ = tx.send(Utf8Bytes::from(line));
                }
            });
        }
    });
    let accept = async {
        loop {
            match ws.accept().await {
                Ok((stream, _)) => {
                    // Frames go out as they are flushed, not held for the peer's ACK.
                    let _ = stream.set_nodelay(true);
                    let rx = tx.subscribe();
                    tokio::spawn(connection(stream, rx));
                }
                // Out of file descriptors and the like: wait, as axum's server does.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
    };
    tokio::select! {
        () = accept => {}
        () = crate::stdin_closed() => {}
    }
    Ok(())
}

async fn connection(stream: TcpStream, mut rx: broadcast::Receiver<Utf8Bytes>) {
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, offer_subprotocol, Some(config))
            .await
    else {
        return;
    };
    let lagged = loop {
        tokio::select! {
            biased;
            frame = rx.recv() => {
                let frame = match frame {
                    Ok(frame) => frame,
                    Err(RecvError::Lagged(_)) => break true,
                    Err(RecvError::Closed) => break false,
                };
                if ws.feed(Message::Text(frame)).await.is_err() {
                    return;
                }
                let mut lagged = false;
                loop {
                    match rx.try_recv() {
                        Ok(frame) => {
                            if ws.feed(Message::Text(frame)).await.is_err() {
                                return;
                            }
                        }
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Lagged(_)) => {
                            lagged = true;
                            break;
                        }
                        Err(TryRecvError::Closed) => return,
                    }
                }
                if lagged {
                    break true;
                }
                if ws.flush().await.is_err() {
                    return;
                }
            }
            message = ws.next() => match message {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break false,
                Some(Ok(_)) => {}
            },
        }
    };
    if lagged {
        let close = CloseFrame {
            code: 4001.into(),
            reason: "too slow".into(),
        };
        let _ = ws.close(Some(close)).await;
    }
}

/// Answers `chorus.v1` when the client offers it, as the gateway does.
// The error type is tungstenite's, fixed by its `Callback` trait.
#[allow(clippy::result_large_err)]
fn offer_subprotocol(request: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
    if request
        .headers()
        .get(SEC_WEBSOCKET_PROTOCOL)
        .is_some_and(|p| p.as_bytes() == b"chorus.v1")
    {
        response.headers_mut().insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("chorus.v1"),
        );
    }
    Ok(response)
}
