//! A fault layer in front of one gateway's SNS ingress: the gateway subscribes through it, and it
//! duplicates, reorders (delays) and drops notifications with given probabilities, the way an
//! at-least-once, unordered bus may behave. Deterministic for a given seed. It can also drop, every
//! time, the notifications that carry chosen messages (e.g. the last of each burst in a room).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;

/// Probabilities of each fault, per notification.
#[derive(Debug, Clone, Copy)]
pub struct FaultPlan {
    pub duplicate: f64,
    pub reorder: f64,
    pub drop: f64,
    pub seed: u64,
}

/// What the layer did.
#[derive(Debug, Default)]
pub struct FaultStats {
    pub notifications: AtomicU64,
    pub duplicated: AtomicU64,
    pub reordered: AtomicU64,
    pub dropped: AtomicU64,
    /// Dropped because they carried a message the drop rule names.
    pub dropped_by_rule: AtomicU64,
}

/// Which messages (room, seq) the layer always drops.
pub type DropRule = Box<dyn Fn(&str, u64) -> bool + Send + Sync>;

/// Awaited before a notification the drop rule names is answered (e.g. to delete its message from
/// the store, so that the gateway cannot fill the hole from there either).
pub type DropHook = Box<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

#[derive(Clone)]
struct Shared {
    plan: FaultPlan,
    rng: Arc<Mutex<u64>>,
    target: Arc<OnceLock<String>>,
    rule: Arc<OnceLock<DropRule>>,
    hook: Arc<OnceLock<DropHook>>,
    stats: Arc<FaultStats>,
    http: reqwest::Client,
}

/// The running fault layer.
pub struct FaultyIngress {
    /// Base URL to give the gateway as `--public-url`.
    pub url: String,
    shared: Shared,
}

impl FaultyIngress {
    /// Listens on an ephemeral loopback port.
    ///
    /// # Errors
    /// When it cannot bind.
    pub async fn start(plan: FaultPlan) -> anyhow::Result<FaultyIngress> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let shared = Shared {
            plan,
            rng: Arc::new(Mutex::new(plan.seed.max(1))),
            target: Arc::default(),
            rule: Arc::default(),
            hook: Arc::default(),
            stats: Arc::default(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
        };
        let app = Router::new()
            .route("/sns", post(ingress))
            .with_state(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FaultyIngress { url, shared })
    }

    /// Where to forward: the gateway's own `/sns` URL.
    pub fn forward_to(&self, gateway_sns_url: String) {
        let _ = self.shared.target.set(gateway_sns_url);
    }

    /// From now on, drop every notification that carries a message `rule(room, seq)` names,
    /// whatever the dice say (at most one rule; later calls are ignored).
    pub fn always_drop(&self, rule: DropRule) {
        let _ = self.shared.rule.set(rule);
    }

    /// From now on, await `hook` before answering a notification the drop rule names (at most
    /// one hook; later calls are ignored).
    pub fn on_rule_drop(&self, hook: DropHook) {
        let _ = self.shared.hook.set(hook);
    }

    pub fn stats(&self) -> &FaultStats {
        &self.shared.stats
    }
}

impl Shared {
    /// xorshift64*: a uniform number in [0, 1).
    fn roll(&self) -> f64 {
        let mut state = self.rng.lock().expect("rng lock");
        let mut x = *state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *state = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    async fn target(&self) -> Option<String> {
        for _ in 0..500 {
            if let Some(target) = self.target.get() {
                return Some(target.clone());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    async fn forward(&self, body: Bytes) -> StatusCode {
        let Some(target) = self.target().await else {
            return StatusCode::SERVICE_UNAVAILABLE;
        };
        match self
            .http
            .post(target)
            .header("content-type", "text/plain; charset=UTF-8")
            .body(body)
            .send()
            .await
        {
            Ok(res) => {
                StatusCode::from_u16(res.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            Err(_) => StatusCode::BAD_GATEWAY,
        }
    }

    fn forward_later(&self, body: Bytes, delay: Duration) {
        let shared = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            shared.forward(body).await;
        });
    }
}

/// Whether a notification carries a message the rule names.
fn ruled_out(rule: &DropRule, notification: &serde_json::Value) -> bool {
    let Some(payload) = notification["Message"]
        .as_str()
        .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
    else {
        return false;
    };
    payload["events"].as_array().is_some_and(|events| {
        events
            .iter()
            .any(|e| match (e["room"].as_str(), e["seq"].as_u64()) {
                (Some(room), Some(seq)) => rule(room, seq),
                _ => false,
            })
    })
}

async fn ingress(State(shared): State<Shared>, body: Bytes) -> StatusCode {
    let Some(notification) = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .filter(|v| v["Type"] == "Notification")
    else {
        return shared.forward(body).await;
    };
    let stats = &shared.stats;
    stats.notifications.fetch_add(1, Ordering::Relaxed);
    if shared
        .rule
        .get()
        .is_some_and(|rule| ruled_out(rule, &notification))
    {
        if let Some(hook) = shared.hook.get() {
            hook().await;
        }
        stats.dropped_by_rule.fetch_add(1, Ordering::Relaxed);
        return StatusCode::OK;
    }
    let plan = shared.plan;
    let roll = shared.roll();
    let jitter = shared.roll();
    if roll < plan.drop {
        stats.dropped.fetch_add(1, Ordering::Relaxed);
        StatusCode::OK
    } else if roll < plan.drop + plan.duplicate {
        stats.duplicated.fetch_add(1, Ordering::Relaxed);
        let status = shared.forward(body.clone()).await;
        shared.forward_later(body, Duration::from_millis(5 + (jitter * 100.0) as u64));
        status
    } else if roll < plan.drop + plan.duplicate + plan.reorder {
        // Held back while later notifications overtake it.
        stats.reordered.fetch_add(1, Ordering::Relaxed);
        shared.forward_later(body, Duration::from_millis(50 + (jitter * 250.0) as u64));
        StatusCode::OK
    } else {
        shared.forward(body).await
    }
}
