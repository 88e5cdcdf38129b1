//! The writer: the only box that talks to DynamoDB. It gives each room a dense, gap-free sequence
//! (1, 2, 3 …), commits each room's concurrent sends together (one conditional write per batch),
//! recognizes retries within its dedupe window, and serves history pages to gateways.

pub mod config;
mod error;
mod routes;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use chorus_service::service_auth::ServiceKeys;
use tokio::net::TcpListener;

pub use config::Config;
pub use error::ApiError;
pub use routes::OPENAPI;

use crate::routes::{AppState, router};
use crate::store::MessageStore;

/// Serves the writer API on `listener` until `shutdown` resolves, then finishes in-flight requests.
///
/// # Errors
/// When the server fails (not when a request does).
/// Every `/v1` request must carry a service token signed with one of `keys`.
pub async fn run(
    listener: TcpListener,
    store: Arc<dyn MessageStore>,
    keys: Arc<ServiceKeys>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    run_with_metrics_listener(listener, None, store, keys, shutdown).await
}

/// [`run`], also serving `/metrics` on `metrics_listener` when given.
///
/// # Errors
/// When the server fails (not when a request does).
pub async fn run_with_metrics_listener(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    store: Arc<dyn MessageStore>,
    keys: Arc<ServiceKeys>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = AppState {
        store,
        metrics: Arc::default(),
        keys,
    };
    let stop_metrics = tokio_util::sync::CancellationToken::new();
    if let Some(metrics_listener) = metrics_listener {
        let metrics = Arc::clone(&state.metrics);
        let store = Arc::clone(&state.store);
        tokio::spawn(chorus_service::metrics::serve(
            metrics_listener,
            Arc::new(move || routes::render_metrics_text(&metrics, &*store)),
            stop_metrics.clone().cancelled_owned(),
        ));
    }
    let _stop_metrics_on_return = stop_metrics.drop_guard();
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "writer listening");
    }
    // Behind the internal load balancer, but a client that trickles headers still gets cut off.
    chorus_service::http::serve(
        listener,
        router(state),
        chorus_service::http::HttpSettings::default(),
        shutdown,
    )
    .await
}
