use std::sync::Arc;

use chorus_service::service_auth::ServiceKeys;
use chorus_testkit::tokens::gateway_client;
use chorus_writer::store::{MemoryStore, MemoryTable, MessageStore, Settings};
use tokio_util::sync::CancellationToken;

/// The service key of the test writers.
pub(crate) const KEY: &[u8] = b"the writer tests' service key, 32 bytes or more";

pub(crate) fn keys() -> ServiceKeys {
    ServiceKeys::from_secrets(&[KEY.to_vec()]).unwrap()
}

/// A writer on an ephemeral loopback port, backed by an in-memory store; stopped on drop.
pub(crate) struct TestApp {
    pub(crate) base: String,
    /// Calls as a gateway (a valid service token on every request).
    pub(crate) http: reqwest::Client,
    shutdown: CancellationToken,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub(crate) async fn spawn_app() -> TestApp {
    spawn_app_with(Arc::new(MemoryStore::new(
        MemoryTable::default(),
        Settings::default(),
    )))
    .await
}

/// A writer on an ephemeral loopback port, serving `store`.
pub(crate) async fn spawn_app_with(store: Arc<dyn MessageStore>) -> TestApp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone().cancelled_owned();
    tokio::spawn(chorus_writer::run(listener, store, Arc::new(keys()), stop));
    TestApp {
        base,
        http: gateway_client(&keys(), "gateway-test"),
        shutdown,
    }
}

impl TestApp {
    pub(crate) async fn send(&self, room: &str, body: serde_json::Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/rooms/{room}/messages", self.base))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub(crate) async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }
}
