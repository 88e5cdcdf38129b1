//! The writer's API as the gateway sees it: append a send, read history. Behind a trait so the
//! hub and connections can be tested without a writer.

use std::time::Duration;

use chorus_protocol::api::{ApiError, HistoryPage, SendRequest, SendResponse};
use chorus_protocol::{RoomId, Seq};

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
}

/// Why the writer could not serve a request.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Not reachable, timed out, or 5xx: worth retrying.
    #[error("writer unavailable: {0}")]
    Unavailable(String),
    /// The writer refused the request (4xx): retrying will not help.
    #[error("writer refused the request: {0}")]
    Refused(String),
    /// The history asked for is no longer stored (410 Gone: expired by retention).
    #[error("history expired: {0}")]
    Expired(String),
}

/// [`MessageLog`] over HTTP, with bounded retries of idempotent calls.
#[derive(Debug, Clone)]
pub struct WriterClient {
    http: reqwest::Client,
    base: String,
    attempts: u32,
}

impl WriterClient {
    /// A client of the writer at `base` (e.g. `http://127.0.0.1:8080`); each call times out after
    /// `timeout` and is tried up to 3 times (sends are idempotent by message id).
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(base: &str, timeout: Duration) -> Result<Self, reqwest::Error> {
        Ok(WriterClient {
            http: reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(timeout.min(Duration::from_secs(2)))
                .build()?,
            base: base.trim_end_matches('/').to_owned(),
            attempts: 3,
        })
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        request: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<T, LogError> {
        let mut last = LogError::Unavailable("no attempt made".into());
        for attempt in 0..self.attempts {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            }
            match request().send().await {
                Ok(res) if res.status().is_success() => {
                    return res
                        .json()
                        .await
                        .map_err(|e| LogError::Unavailable(format!("bad answer: {e}")));
                }
                Ok(res) => {
                    let status = res.status();
                    let detail = res
                        .json::<ApiError>()
                        .await
                        .map(|e| e.error.message)
                        .unwrap_or_default();
                    if status == reqwest::StatusCode::GONE {
                        return Err(LogError::Expired(detail));
                    }
                    if status.is_client_error() {
                        return Err(LogError::Refused(format!("{status}: {detail}")));
                    }
                    last = LogError::Unavailable(format!("{status}: {detail}"));
                }
                Err(e) => last = LogError::Unavailable(e.to_string()),
            }
        }
        Err(last)
    }
}

#[async_trait::async_trait]
impl MessageLog for WriterClient {
    async fn append(&self, room: &RoomId, request: &SendRequest) -> Result<SendResponse, LogError> {
        let url = format!("{}/v1/rooms/{room}/messages", self.base);
        self.call(|| self.http.post(&url).json(request)).await
    }

    async fn history(
        &self,
        room: &RoomId,
        after: Seq,
        limit: u32,
    ) -> Result<HistoryPage, LogError> {
        let url = format!(
            "{}/v1/rooms/{room}/messages?after={after}&limit={limit}",
            self.base
        );
        self.call(|| self.http.get(&url)).await
    }
}
