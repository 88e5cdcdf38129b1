//! The writer's API as the gateway sees it: append a send, read history. Behind a trait so the
//! hub and connections can be tested without a writer.
//!
//! Given several writers, [`WriterClient`] sends each room's requests to one of them, chosen by
//! rendezvous hashing of (writer, room): every gateway picks the same writer for a room, so that
//! writer's group commit batches the room's sends and writers rarely race for a room's seqs.
//! When the chosen writer fails, the call moves on to the room's next writer. Correctness never
//! depends on the routing: any writer may write any room.

use std::sync::Arc;
use std::time::Duration;

use chorus_protocol::api::{ApiError, HistoryPage, SendRequest, SendResponse};
use chorus_protocol::{RoomId, Seq};
use chorus_service::service_auth::TokenSource;

use crate::settings::HttpUrl;

/// The message log (the writer, over HTTP).
#[async_trait::async_trait]
pub trait MessageLog: Send + Sync + 'static {
    /// Stores a send; retried with the same id it returns the same seq.
    ///
    /// # Errors
    /// [`LogError`] when the send may not be stored.
    async fn append(&self, room: &RoomId, request: &SendRequest) -> Result<SendResponse, LogError>;

    /// Messages with seq > `after`, at most `limit`, and the room's head.
    ///
    /// # Errors
    /// [`LogError`] when the writer cannot answer.
    async fn history(&self, room: &RoomId, after: Seq, limit: u32)
    -> Result<HistoryPage, LogError>;

    /// Scrollback: the newest `limit` messages with seq < `before` (the room's newest if `None`),
    /// oldest first, and the room's head.
    ///
    /// # Errors
    /// [`LogError`] when the writer cannot answer.
    async fn scrollback(
        &self,
        room: &RoomId,
        before: Option<Seq>,
        limit: u32,
    ) -> Result<HistoryPage, LogError>;
}

/// Why the writer could not serve a request.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Not reachable, timed out, or 5xx: worth retrying.
    #[error("writer unavailable")]
    Unavailable(#[source] Unavailable),
    /// The writer refused the request (4xx): retrying will not help.
    #[error("writer refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
    /// The history asked for is no longer stored (410 Gone: expired by retention).
    #[error("history expired: {message}")]
    Expired { message: String },
}

/// Why no writer answered a request (the last attempt's reason).
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("no writer configured")]
    NoWriter,
    /// Not reachable, or timed out.
    #[error("calling the writer failed")]
    Call(#[source] reqwest::Error),
    /// A 5xx.
    #[error("the writer answered {status}: {message}")]
    Failing { status: u16, message: String },
    /// A success whose body could not be read.
    #[error("the writer's answer could not be read")]
    BadAnswer(#[source] reqwest::Error),
}

/// [`MessageLog`] over HTTP, with bounded retries of idempotent calls.
#[derive(Debug, Clone)]
pub struct WriterClient {
    http: reqwest::Client,
    bases: Vec<String>,
    attempts: u32,
    /// Signs this gateway's service token for every call (the writer refuses calls without).
    auth: Option<Arc<TokenSource>>,
}

impl WriterClient {
    /// A client of the writers at `bases` (e.g. `http://127.0.0.1:8080`; at least one); each call
    /// times out after `timeout` and is tried up to 3 times (sends are idempotent by message id),
    /// going round the room's writers in rendezvous order.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(bases: &[HttpUrl], timeout: Duration) -> Result<Self, reqwest::Error> {
        Ok(WriterClient {
            http: reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(timeout.min(Duration::from_secs(2)))
                .build()?,
            bases: bases.iter().map(|b| b.base().to_owned()).collect(),
            attempts: 3,
            auth: None,
        })
    }

    /// Sends a service token from `auth` with every call.
    #[must_use]
    pub fn with_auth(mut self, auth: TokenSource) -> Self {
        self.auth = Some(Arc::new(auth));
        self
    }

    /// The writers for `room`, the preferred one first: highest rendezvous score first.
    fn writers_for(&self, room: &RoomId) -> Vec<&str> {
        let mut scored: Vec<(u64, &str)> = self
            .bases
            .iter()
            .map(|base| (rendezvous_score(base, room.as_str()), base.as_str()))
            .collect();
        scored.sort_unstable_by(|a, b| b.cmp(a));
        scored.into_iter().map(|(_, base)| base).collect()
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        room: &RoomId,
        request: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<T, LogError> {
        let writers = self.writers_for(room);
        let mut last = Unavailable::NoWriter;
        for attempt in 0..self.attempts {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            }
            let Some(base) = writers.get(attempt as usize % writers.len().max(1)) else {
                break;
            };
            let mut request = request(base);
            if let Some(auth) = &self.auth {
                request = request.bearer_auth(auth.token());
            }
            match request.send().await {
                Ok(res) if res.status().is_success() => {
                    return res
                        .json()
                        .await
                        .map_err(|e| LogError::Unavailable(Unavailable::BadAnswer(e)));
                }
                Ok(res) => {
                    let status = res.status();
                    let message = res
                        .json::<ApiError>()
                        .await
                        .map(|e| e.error.message)
                        .unwrap_or_default();
                    if status == reqwest::StatusCode::GONE {
                        return Err(LogError::Expired { message });
                    }
                    let status = status.as_u16();
                    if (400..500).contains(&status) {
                        return Err(LogError::Refused { status, message });
                    }
                    last = Unavailable::Failing { status, message };
                }
                Err(e) => last = Unavailable::Call(e),
            }
        }
        Err(LogError::Unavailable(last))
    }
}

#[async_trait::async_trait]
impl MessageLog for WriterClient {
    async fn append(&self, room: &RoomId, request: &SendRequest) -> Result<SendResponse, LogError> {
        self.call(room, |base| {
            self.http
                .post(format!("{base}/v1/rooms/{room}/messages"))
                .json(request)
        })
        .await
    }

    async fn history(
        &self,
        room: &RoomId,
        after: Seq,
        limit: u32,
    ) -> Result<HistoryPage, LogError> {
        self.call(room, |base| {
            self.http.get(format!(
                "{base}/v1/rooms/{room}/messages?after={after}&limit={limit}"
            ))
        })
        .await
    }

    async fn scrollback(
        &self,
        room: &RoomId,
        before: Option<Seq>,
        limit: u32,
    ) -> Result<HistoryPage, LogError> {
        // Without `before`, from above any seq: the newest messages.
        let before = before.map_or(i64::MAX as u64, |b| b.0);
        self.call(room, |base| {
            self.http.get(format!(
                "{base}/v1/rooms/{room}/messages?before={before}&limit={limit}"
            ))
        })
        .await
    }
}

/// The rendezvous (highest random weight) score of `writer` for `room`: FNV-1a over both, then a
/// 64-bit finalizer so similar names spread. Stable across processes and builds, so every gateway
/// ranks a room's writers the same way; adding or removing a writer moves only the rooms it wins
/// or held.
fn rendezvous_score(writer: &str, room: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in writer.bytes().chain([0xff]).chain(room.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finalizer.
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use axum::extract::State;
    use axum::routing::post;
    use chorus_protocol::{Body, ClientMsgId, UserId};

    use super::*;

    fn room(name: &str) -> RoomId {
        RoomId::parse(name).unwrap()
    }

    fn client(bases: &[String]) -> WriterClient {
        let bases: Vec<HttpUrl> = bases.iter().map(|b| b.parse().unwrap()).collect();
        WriterClient::new(&bases, Duration::from_secs(2)).unwrap()
    }

    #[test]
    fn every_gateway_ranks_a_rooms_writers_the_same_and_rooms_spread_over_writers() {
        let bases: Vec<String> = (0..3).map(|i| format!("http://writer-{i}:8080")).collect();
        let (a, b) = (
            client(&bases),
            client(&bases.iter().rev().cloned().collect::<Vec<_>>()),
        );
        let mut first_choice: HashMap<&str, usize> = HashMap::new();
        for r in 0..3000 {
            let name = format!("room-{r}");
            let order = a.writers_for(&room(&name));
            assert_eq!(
                order,
                b.writers_for(&room(&name)),
                "order of --writer-url does not matter"
            );
            assert_eq!(order.len(), 3);
            *first_choice.entry(order[0]).or_default() += 1;
        }
        for (writer, rooms) in &first_choice {
            assert!(
                (800..1200).contains(rooms),
                "{writer} is first for {rooms} of 3000 rooms"
            );
        }
        // Removing a writer moves only the rooms it was first for.
        let two = client(&bases[..2]);
        for r in 0..3000 {
            let name = room(&format!("room-{r}"));
            let before = a.writers_for(&name)[0];
            if before != bases[2] {
                assert_eq!(two.writers_for(&name)[0], before);
            }
        }
    }

    /// A writer that counts the sends it acks.
    async fn counting_writer() -> (String, Arc<AtomicUsize>) {
        let count = Arc::new(AtomicUsize::new(0));
        let app = Router::new()
            .route(
                "/v1/rooms/{room}/messages",
                post(|State(count): State<Arc<AtomicUsize>>| async move {
                    let seq = count.fetch_add(1, Ordering::SeqCst) as u64 + 1;
                    (
                        axum::http::StatusCode::CREATED,
                        axum::Json(SendResponse {
                            seq: Seq(seq),
                            ts: "2026-11-29T10:00:00.000Z".into(),
                        }),
                    )
                }),
            )
            .with_state(Arc::clone(&count));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (base, count)
    }

    #[tokio::test]
    async fn a_rooms_sends_go_to_its_first_writer_and_to_the_next_when_that_one_is_down() {
        let (up, acked) = counting_writer().await;
        // A port that refuses connections: bound, then closed.
        let down = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", listener.local_addr().unwrap())
        };
        let bases = vec![up.clone(), down.clone()];
        let writers = client(&bases);
        let request = SendRequest {
            id: ClientMsgId::parse("m1").unwrap(),
            sender: UserId::parse("john").unwrap(),
            body: Body::parse("hi").unwrap(),
        };
        // One room whose first writer is the live one, one whose first writer is down.
        let (mut on_up, mut on_down) = (None, None);
        for r in 0..100 {
            let name = room(&format!("room-{r}"));
            match writers.writers_for(&name)[0] {
                first if first == up => on_up = on_up.or(Some(name)),
                _ => on_down = on_down.or(Some(name)),
            }
        }
        let (on_up, on_down) = (on_up.unwrap(), on_down.unwrap());
        writers.append(&on_up, &request).await.unwrap();
        assert_eq!(
            acked.load(Ordering::SeqCst),
            1,
            "sent once, to the first writer"
        );
        writers.append(&on_down, &request).await.unwrap();
        assert_eq!(
            acked.load(Ordering::SeqCst),
            2,
            "the down writer's room fell back"
        );

        let only_down = client(&[down]);
        let err = only_down.append(&on_up, &request).await.unwrap_err();
        assert!(matches!(err, LogError::Unavailable(_)), "{err:?}");
    }
}
