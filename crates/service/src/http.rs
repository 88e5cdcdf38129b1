//! Serving an axum [`Router`] over HTTP/1.1, like `axum::serve`, plus what that lacks: a limit on
//! how long a client may take to send a request's headers. Without it a client that trickles
//! header lines (slowloris) holds a socket and a task for as long as it likes.
//!
//! Upgrades (WebSocket) are supported; an upgraded connection leaves this server's bookkeeping,
//! so shutting down waits only for requests in flight, not for WebSocket sessions.

use std::future::Future;
use std::io;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Limits of the HTTP server.
#[derive(Debug, Clone, Copy)]
pub struct HttpSettings {
    /// Time from a connection's (or a keep-alive request's) first byte to the end of its headers.
    pub header_read_timeout: Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves; then stops accepting, lets requests
/// in flight finish and closes idle keep-alive connections.
///
/// # Errors
/// None today: accept errors (e.g. out of file descriptors) are logged and retried after a pause.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: HttpSettings,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // EMFILE and friends: pause instead of spinning; connections will close.
                    tracing::warn!(error.message = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(settings.header_read_timeout);
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                () = stop.cancelled() => connection.as_mut().graceful_shutdown(),
            }
            let _ = connection.await;
        });
    }
    drop(listener);
    stop.cancel();
    connections.close();
    connections.wait().await;
    Ok(())
}
