//! A TCP proxy on loopback in front of a gateway, for the client conformance scenarios
//! (`clients/conformance/`): it passes both directions through in order and can delay every
//! chunk, pause (hold everything, close nothing: a silent network), cut every connection (no close
//! frame: a dropped network), send every text frame of the gateway twice, or close its clients
//! with a given close code as if the gateway had.
//!
//! The gateway → client direction is split into whole WebSocket frames (server frames are not
//! masked), so a duplicated frame or an injected close never lands in the middle of another.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What the proxy does to the traffic it carries.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProxyOptions {
    /// Every chunk goes on this long after it arrived, in both directions.
    pub delay: Duration,
    /// Every text frame from the gateway reaches the client twice.
    pub duplicate_text_frames: bool,
}

enum Control {
    Cut,
    CloseWith(u16),
}

enum Item {
    Bytes {
        at: Instant,
        bytes: Vec<u8>,
    },
    /// A close frame with this code, then the end of the connection.
    Close(u16),
    /// The other side ended: end this one too once everything before is written.
    End,
}

struct Shared {
    target: SocketAddr,
    options: ProxyOptions,
    paused: watch::Sender<bool>,
    pairs: Mutex<HashMap<u64, mpsc::UnboundedSender<Control>>>,
    connections: AtomicU64,
    duplicated: AtomicU64,
}

/// The running proxy; it stops accepting and drops every connection when dropped.
pub struct TcpProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on an ephemeral loopback port; each connection gets one of its own to `target`.
    ///
    /// # Errors
    /// When it cannot bind.
    pub async fn start(target: SocketAddr, options: ProxyOptions) -> anyhow::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            options,
            paused: watch::Sender::new(false),
            pairs: Mutex::default(),
            connections: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
        });
        let accepting = Arc::clone(&shared);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let id = accepting.connections.fetch_add(1, Ordering::SeqCst);
                let (control, controls) = mpsc::unbounded_channel();
                accepting
                    .pairs
                    .lock()
                    .expect("pairs lock")
                    .insert(id, control);
                let shared = Arc::clone(&accepting);
                tokio::spawn(async move {
                    serve(client, &shared, controls).await;
                    shared.pairs.lock().expect("pairs lock").remove(&id);
                });
            }
        });
        Ok(TcpProxy {
            addr,
            shared,
            accept,
        })
    }

    /// `ws://…/ws?user=…` through the proxy.
    pub fn ws(&self, user: &str) -> String {
        format!("ws://{}/ws?user={user}", self.addr)
    }

    /// Holds everything in both directions from now on, closing nothing.
    pub fn pause(&self) {
        self.shared.paused.send_replace(true);
    }

    /// Lets what was held, and everything after, through.
    pub fn resume(&self) {
        self.shared.paused.send_replace(false);
    }

    /// Drops every connection at once, without a close frame.
    pub fn cut(&self) {
        self.control(|| Control::Cut);
    }

    /// Sends every client a close frame with `code` (as if the gateway had), then drops the
    /// gateway's side.
    pub fn close_with(&self, code: u16) {
        self.control(|| Control::CloseWith(code));
    }

    fn control(&self, make: impl Fn() -> Control) {
        for control in self.shared.pairs.lock().expect("pairs lock").values() {
            let _ = control.send(make());
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Text frames sent twice so far.
    pub fn duplicated(&self) -> u64 {
        self.shared.duplicated.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// One client connection and its own to the target, until either ends or the test says so.
async fn serve(
    client: TcpStream,
    shared: &Arc<Shared>,
    mut controls: mpsc::UnboundedReceiver<Control>,
) {
    let Ok(upstream) = TcpStream::connect(shared.target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let (to_upstream, for_upstream) = mpsc::unbounded_channel();
    let (to_client, for_client) = mpsc::unbounded_channel();
    let delay = shared.options.delay;
    let tasks = [
        tokio::spawn(read_chunks(client_read, to_upstream, delay)),
        tokio::spawn(read_server_frames(
            upstream_read,
            to_client.clone(),
            Arc::clone(shared),
        )),
        tokio::spawn(write_items(
            upstream_write,
            for_upstream,
            shared.paused.subscribe(),
        )),
    ];
    let mut to_client_writer = tokio::spawn(write_items(
        client_write,
        for_client,
        shared.paused.subscribe(),
    ));
    let control = tokio::select! {
        control = controls.recv() => control,
        _ = &mut to_client_writer => None,
    };
    if let Some(Control::CloseWith(code)) = control {
        // Nothing more from the gateway; the client gets what was already on its way, then
        // the close frame.
        tasks[1].abort();
        let _ = to_client.send(Item::Close(code));
        let _ = (&mut to_client_writer).await;
    }
    to_client_writer.abort();
    for task in tasks {
        task.abort();
    }
    // Dropping the halves (in the aborted tasks) closes both connections.
}

/// Client → gateway: chunks as they come.
async fn read_chunks(mut from: OwnedReadHalf, to: mpsc::UnboundedSender<Item>, delay: Duration) {
    let mut buffer = vec![0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buffer).await {
        if n == 0 {
            break;
        }
        let item = Item::Bytes {
            at: Instant::now() + delay,
            bytes: buffer[..n].to_vec(),
        };
        if to.send(item).is_err() {
            return;
        }
    }
    let _ = to.send(Item::End);
}

/// Gateway → client: the HTTP upgrade answer, then whole WebSocket frames.
async fn read_server_frames(
    mut from: OwnedReadHalf,
    to: mpsc::UnboundedSender<Item>,
    shared: Arc<Shared>,
) {
    let mut splitter = ServerFrameSplitter::default();
    let mut buffer = vec![0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buffer).await {
        if n == 0 {
            break;
        }
        let at = Instant::now() + shared.options.delay;
        for (bytes, text) in splitter.push(&buffer[..n]) {
            let twice = text && shared.options.duplicate_text_frames;
            if twice {
                shared.duplicated.fetch_add(1, Ordering::SeqCst);
                let copy = Item::Bytes {
                    at,
                    bytes: bytes.clone(),
                };
                if to.send(copy).is_err() {
                    return;
                }
            }
            if to.send(Item::Bytes { at, bytes }).is_err() {
                return;
            }
        }
    }
    let _ = to.send(Item::End);
}

/// Writes items in order, each not before its time and never while the proxy is paused.
async fn write_items(
    mut to: OwnedWriteHalf,
    mut items: mpsc::UnboundedReceiver<Item>,
    mut paused: watch::Receiver<bool>,
) {
    while let Some(item) = items.recv().await {
        if paused.wait_for(|paused| !paused).await.is_err() {
            return;
        }
        let bytes = match item {
            Item::Bytes { at, bytes } => {
                tokio::time::sleep_until(at).await;
                // Paused while it waited: hold it.
                if paused.wait_for(|paused| !paused).await.is_err() {
                    return;
                }
                bytes
            }
            Item::Close(code) => {
                let reason = b"injected by the test proxy";
                let mut frame = vec![0x88, (2 + reason.len()) as u8];
                frame.extend_from_slice(&code.to_be_bytes());
                frame.extend_from_slice(reason);
                let _ = to.write_all(&frame).await;
                let _ = to.shutdown().await;
                return;
            }
            Item::End => {
                let _ = to.shutdown().await;
                return;
            }
        };
        if to.write_all(&bytes).await.is_err() {
            return;
        }
    }
}

/// Splits the gateway → client byte stream into the HTTP upgrade answer and whole WebSocket
/// frames, marking unfragmented text frames.
#[derive(Default)]
struct ServerFrameSplitter {
    buffer: Vec<u8>,
    upgraded: bool,
}

impl ServerFrameSplitter {
    fn push(&mut self, chunk: &[u8]) -> Vec<(Vec<u8>, bool)> {
        self.buffer.extend_from_slice(chunk);
        let mut pieces = Vec::new();
        if !self.upgraded {
            let Some(end) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
                return pieces;
            };
            pieces.push((self.buffer.drain(..end + 4).collect(), false));
            self.upgraded = true;
        }
        while let Some((header, length)) = frame_length(&self.buffer) {
            if self.buffer.len() < header + length {
                break;
            }
            let text = self.buffer[0] == 0x81;
            pieces.push((self.buffer.drain(..header + length).collect(), text));
        }
        pieces
    }
}

/// The header and payload length of the frame at the start of `buffer`, once its header is in.
fn frame_length(buffer: &[u8]) -> Option<(usize, usize)> {
    let short = usize::from(*buffer.get(1)? & 0x7f);
    match short {
        126 => Some((
            4,
            usize::from(u16::from_be_bytes([*buffer.get(2)?, *buffer.get(3)?])),
        )),
        127 => {
            let bytes: [u8; 8] = buffer.get(2..10)?.try_into().ok()?;
            Some((10, usize::try_from(u64::from_be_bytes(bytes)).ok()?))
        }
        n => Some((2, n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_splitter_finds_whole_frames_across_chunks() {
        let mut splitter = ServerFrameSplitter::default();
        let mut stream = b"HTTP/1.1 101 Switching Protocols\r\n\r\n".to_vec();
        stream.extend([0x81, 2, b'h', b'i']);
        let long = vec![b'x'; 300];
        stream.extend([0x81, 126, 1, 44]);
        stream.extend(&long);
        stream.extend([0x89, 0]);
        let mut pieces = Vec::new();
        for chunk in stream.chunks(7) {
            pieces.extend(splitter.push(chunk));
        }
        let shapes: Vec<(usize, bool)> = pieces.iter().map(|(b, t)| (b.len(), *t)).collect();
        assert_eq!(shapes, [(36, false), (4, true), (304, true), (2, false)]);
    }
}
