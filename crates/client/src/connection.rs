//! [`Client`]: one WebSocket connection to a gateway, frame by frame, with no memory across
//! connections. It says exactly what goes on the wire, which is what tests of the gateway want;
//! an app wants a [`Session`](crate::Session), which is built on it.

use std::time::Duration;

use chorus_protocol::frames::SUBPROTOCOL;
use chorus_protocol::{Body, ClientFrame, ClientMsgId, RoomId, Seq, ServerFrame};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::ClientError;

/// Something received from the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A text frame, parsed.
    Frame(ServerFrame),
    /// The gateway closed the connection with this code (1005 when its close frame had none).
    Closed { code: u16, reason: String },
}

/// One connection to a gateway, offering the `chorus.v1` subprotocol.
pub struct Client {
    pub(crate) socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    id_prefix: String,
    /// When anything at all (a frame, a ping, a pong) was last read from the socket.
    pub(crate) last_heard: Instant,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id_prefix", &self.id_prefix)
            .field("next_id", &self.next_id)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `url` (e.g. `ws://127.0.0.1:8081/ws?user=john` for a gateway in dev mode).
    ///
    /// # Errors
    /// When the connection or handshake fails (the gateway's HTTP answer is in the error).
    pub async fn connect(url: &str) -> Result<Client, ClientError> {
        Client::connect_with_token(url, None).await
    }

    /// Connects to `url` with a JWT, offered as the subprotocol `bearer.<token>` next to
    /// `chorus.v1` (so it stays out of URLs and access logs).
    ///
    /// # Errors
    /// When the connection or handshake fails (the gateway's HTTP answer, e.g. a 401 saying why
    /// the token was refused, is in the error).
    pub async fn connect_with_token(url: &str, token: Option<&str>) -> Result<Client, ClientError> {
        let mut request = url.into_client_request()?;
        let protocols = match token {
            Some(token) => HeaderValue::from_str(&format!("{SUBPROTOCOL}, bearer.{token}"))
                .map_err(|_| ClientError::Unexpected("the token has invalid characters".into()))?,
            None => HeaderValue::from_static(SUBPROTOCOL),
        };
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", protocols);
        let (socket, _response) = tokio_tungstenite::connect_async(request).await?;
        Ok(Client {
            socket,
            next_id: 0,
            id_prefix: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
            last_heard: Instant::now(),
        })
    }

    /// Sends a raw text frame (for tests of bad input).
    ///
    /// # Errors
    /// When the socket fails.
    pub async fn send_raw(&mut self, text: impl Into<String>) -> Result<(), ClientError> {
        self.socket.send(Message::text(text.into())).await?;
        Ok(())
    }

    /// Sends a raw WebSocket message.
    ///
    /// # Errors
    /// When the socket fails.
    pub async fn send_message(&mut self, message: Message) -> Result<(), ClientError> {
        self.socket.send(message).await?;
        Ok(())
    }

    async fn send_frame(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        self.send_raw(serde_json::to_string(frame)?).await
    }

    /// Asks to join `room` (with `since`, replay first); returns without waiting for `joined`.
    ///
    /// # Errors
    /// When the socket fails.
    pub async fn join(&mut self, room: &RoomId, since: Option<Seq>) -> Result<(), ClientError> {
        self.send_frame(&ClientFrame::Join {
            room: room.clone(),
            since,
        })
        .await
    }

    /// Sends `body` to `room` with a fresh client message id, which it returns.
    ///
    /// # Errors
    /// When the body is invalid ([`ClientError::Invalid`]) or the socket fails.
    pub async fn send(&mut self, room: &RoomId, body: &str) -> Result<String, ClientError> {
        self.next_id += 1;
        let id = format!("{}-{}", self.id_prefix, self.next_id);
        let body = Body::parse(body)?;
        let id_value = ClientMsgId::parse(id.clone())?;
        self.send_frame(&ClientFrame::Send {
            room: room.clone(),
            id: id_value,
            body,
        })
        .await?;
        Ok(id)
    }

    /// The next frame or close, waiting at most `timeout`. `Ok(None)` on timeout.
    ///
    /// # Errors
    /// When the socket fails or the gateway sends something that is not a server frame.
    pub async fn recv_timeout(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<Received>, ClientError> {
        match tokio::time::timeout(timeout, self.recv()).await {
            Err(_) => Ok(None),
            Ok(received) => received.map(Some),
        }
    }

    /// The next frame or close. Cancel-safe.
    ///
    /// # Errors
    /// When the socket fails or ends ([`ClientError::Ended`]), or the gateway sends something
    /// that is not a server frame.
    pub async fn recv(&mut self) -> Result<Received, ClientError> {
        loop {
            let next = self.socket.next().await;
            self.last_heard = Instant::now();
            match next {
                None | Some(Err(tungstenite::Error::ConnectionClosed)) => {
                    return Err(ClientError::Ended);
                }
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Text(text))) => {
                    return Ok(Received::Frame(serde_json::from_str(text.as_str())?));
                }
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame
                        .map(|CloseFrame { code, reason }| (u16::from(code), reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    return Ok(Received::Closed { code, reason });
                }
                // Pings (answered by tungstenite on the next write or flush), pongs, binary.
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next server frame, or an error if the connection closes or `timeout` passes.
    ///
    /// # Errors
    /// [`ClientError::Timeout`], [`ClientError::Closed`] and socket errors.
    pub async fn next_frame(&mut self, timeout: Duration) -> Result<ServerFrame, ClientError> {
        match self.recv_timeout(timeout).await? {
            Some(Received::Frame(frame)) => Ok(frame),
            Some(Received::Closed { code, reason }) => Err(ClientError::Closed { code, reason }),
            None => Err(ClientError::Timeout(timeout, "a frame".into())),
        }
    }

    /// Reads frames until one matches `want`, returning it; frames before it are returned too.
    ///
    /// # Errors
    /// As [`Client::next_frame`]; the deadline covers the whole wait.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        what: &str,
        want: impl Fn(&ServerFrame) -> bool,
    ) -> Result<(ServerFrame, Vec<ServerFrame>), ClientError> {
        let deadline = Instant::now() + timeout;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = match self.next_frame(left).await {
                Err(ClientError::Timeout(..)) => {
                    return Err(ClientError::Timeout(timeout, what.to_owned()));
                }
                other => other?,
            };
            if want(&frame) {
                return Ok((frame, before));
            }
            before.push(frame);
        }
    }

    /// Closes the connection normally.
    ///
    /// # Errors
    /// When the socket fails.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.socket.close(None).await?;
        Ok(())
    }
}
