//! A TCP load balancer in front of the writers, standing in for the internal load balancer of a
//! deployment: each new connection goes to the next writer that accepts it. A killed writer
//! costs the gateways the requests in flight on its connections (the gateway retries them, with
//! the same id, on a new connection, which lands on a live writer) and nothing else.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How long one backend may take to accept a connection before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The running balancer; it stops accepting when dropped.
pub struct Balancer {
    pub addr: SocketAddr,
    backends: Arc<RwLock<Vec<SocketAddr>>>,
    accept: JoinHandle<()>,
}

impl Balancer {
    /// Listens on an ephemeral loopback port and spreads connections over `backends`.
    ///
    /// # Errors
    /// When it cannot bind.
    pub async fn start(backends: Vec<SocketAddr>) -> anyhow::Result<Balancer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let backends = Arc::new(RwLock::new(backends));
        let next = Arc::new(AtomicUsize::new(0));
        let shared = Arc::clone(&backends);
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let backends = shared.read().expect("backends lock").clone();
                let start = next.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(proxy(inbound, backends, start));
            }
        });
        Ok(Balancer {
            addr,
            backends,
            accept,
        })
    }

    /// `http://` URL of the balancer.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the backends; connections already open stay where they are.
    pub fn set_backends(&self, backends: Vec<SocketAddr>) {
        *self.backends.write().expect("backends lock") = backends;
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Connects `inbound` to the first backend that accepts, starting at `start` (round robin), and
/// copies both ways until either side closes. With no backend up, `inbound` is closed, as a load
/// balancer without healthy targets would.
async fn proxy(mut inbound: TcpStream, backends: Vec<SocketAddr>, start: usize) {
    for i in 0..backends.len() {
        let backend = backends[(start + i) % backends.len()];
        let Ok(Ok(mut outbound)) =
            tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend)).await
        else {
            continue;
        };
        let _ = inbound.set_nodelay(true);
        let _ = outbound.set_nodelay(true);
        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        return;
    }
}
