//! The writer: the only box that talks to DynamoDB. It gives each room a dense, gap-free sequence
//! (1, 2, 3 …), commits each room's concurrent sends together (one conditional write per batch),
//! recognizes retries within its dedupe window, and serves history pages to gateways.
//!
//! [`App`] is the service: [`App::build`] makes the production writer from its [`Settings`]
//! (listeners bound, keys read, the table checked), [`App::new`] one over any store (tests and
//! benches, on `127.0.0.1:0`), and [`App::run_until`] serves until shutdown.

pub mod cli;
pub mod config;
mod error;
mod routes;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use chorus_service::service_auth::{KeyError, ServiceKeys};
use tokio::net::TcpListener;

pub use config::{Config, Settings};
pub use error::ApiError;
pub use routes::OPENAPI;

use crate::routes::{AppState, router};
use crate::store::{DynamoStore, DynamoTable, MessageStore};

/// Why the writer could not start.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(
        "reading the service keys (--service-key-file, CHORUS_SERVICE_KEY_FILE: the keys the \
         writer's callers sign their tokens with)"
    )]
    Keys(#[source] KeyError),
    #[error("binding {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("table {table} is not usable")]
    Table {
        table: String,
        #[source]
        source: anyhow::Error,
    },
}

/// A writer ready to serve: its listeners bound, its store and keys in hand.
pub struct App {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    state: AppState,
}

impl App {
    /// The production writer of `settings`: reads the service keys, binds the listeners, and
    /// checks that the DynamoDB table (from the environment's AWS configuration) is one it can
    /// read, so a misconfigured writer fails at start, not at the first send.
    ///
    /// # Errors
    /// [`BuildError`] naming what is missing or wrong.
    pub async fn build(settings: Settings) -> Result<App, BuildError> {
        let keys =
            ServiceKeys::from_files(&settings.service_key_files).map_err(BuildError::Keys)?;
        let client = aws_sdk_dynamodb::Client::new(&chorus_service::load_aws_config().await);
        let table = DynamoTable::new(client, &settings.table);
        table.check().await.map_err(|source| BuildError::Table {
            table: settings.table.clone(),
            source,
        })?;
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| BuildError::Bind { addr, source })
        };
        let listener = bind(settings.listen).await?;
        let metrics_listener = match settings.metrics_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let store = Arc::new(DynamoStore::new(table, settings.store));
        let app = App::new(listener, store, Arc::new(keys));
        Ok(match metrics_listener {
            Some(metrics) => app.with_metrics_listener(metrics),
            None => app,
        })
    }

    /// A writer over `store` serving on `listener`; every `/v1` request must carry a service
    /// token signed with one of `keys`.
    pub fn new(listener: TcpListener, store: Arc<dyn MessageStore>, keys: Arc<ServiceKeys>) -> App {
        App {
            listener,
            metrics_listener: None,
            state: AppState {
                store,
                metrics: Arc::default(),
                keys,
            },
        }
    }

    /// Also serves `/metrics` on `listener` (e.g. a port only the monitoring network reaches).
    #[must_use]
    pub fn with_metrics_listener(mut self, listener: TcpListener) -> App {
        self.metrics_listener = Some(listener);
        self
    }

    /// The address the API is served on.
    ///
    /// # Errors
    /// When the socket has none (it always has once bound).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then finishes the requests in flight.
    ///
    /// # Errors
    /// When the server fails (not when a request does).
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let App {
            listener,
            metrics_listener,
            state,
        } = self;
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
}

/// Serves the writer API over `store` on `listener` until `shutdown` resolves:
/// `App::new(listener, store, keys).run_until(shutdown)`.
///
/// # Errors
/// When the server fails (not when a request does).
pub async fn run(
    listener: TcpListener,
    store: Arc<dyn MessageStore>,
    keys: Arc<ServiceKeys>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    App::new(listener, store, keys).run_until(shutdown).await
}
