//! The signing-key cache behind SNS verification, built so forged notifications cannot starve
//! genuine ones:
//! - **LRU**: at most [`CertCacheSettings::max_keys`] keys; the least recently used goes first,
//!   so the topic's own certificate, used by every genuine message, stays.
//! - **Single flight**: concurrent messages naming the same new certificate wait for one fetch.
//! - **Bounded fetching**: at most [`CertCacheSettings::max_fetches`] fetches at once; beyond that
//!   a message is answered "unavailable" (503, which SNS retries) without a fetch.
//! - **Negative cache**: a certificate that could not be fetched or parsed is not asked for again
//!   for [`CertCacheSettings::failure_ttl`]; at most [`CertCacheSettings::max_failures`] such
//!   entries are kept (the oldest go first).
//!
//! A fetch runs as its own task, so a caller that goes away (a dropped request) neither
//! cancels it for the others waiting nor leaves its slot taken.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chorus_service::metrics::Counter;
use rsa::RsaPublicKey;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use super::verify::VerifyError;

/// Limits of the cache.
#[derive(Debug, Clone)]
pub struct CertCacheSettings {
    pub max_keys: usize,
    pub max_fetches: usize,
    pub failure_ttl: Duration,
    pub max_failures: usize,
}

impl Default for CertCacheSettings {
    fn default() -> Self {
        CertCacheSettings {
            max_keys: 32,
            max_fetches: 4,
            failure_ttl: Duration::from_secs(60),
            max_failures: 1024,
        }
    }
}

/// What became of key look-ups, for `/metrics`.
#[derive(Debug, Default)]
pub struct CertMetrics {
    pub hits: Counter,
    pub fetched: Counter,
    pub failed: Counter,
    pub negative_hits: Counter,
    pub limited: Counter,
}

type Outcome = Option<Result<Arc<RsaPublicKey>, VerifyError>>;

enum Entry {
    Ready { key: Arc<RsaPublicKey>, used: u64 },
    Failed { until: Instant, error: VerifyError },
    Fetching(watch::Receiver<Outcome>),
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// Bumped on every use, to find the least recently used key.
    clock: u64,
}

/// Signing keys by certificate URL. Cheap to clone.
#[derive(Clone)]
pub(crate) struct KeyCache {
    inner: Arc<Inner>,
}

struct Inner {
    /// A std `Mutex`: held only to look up or update, never across `.await`.
    state: Mutex<State>,
    fetches: Arc<Semaphore>,
    settings: CertCacheSettings,
    metrics: Arc<CertMetrics>,
}

impl KeyCache {
    pub(crate) fn new(settings: CertCacheSettings, metrics: Arc<CertMetrics>) -> Self {
        KeyCache {
            inner: Arc::new(Inner {
                state: Mutex::default(),
                fetches: Arc::new(Semaphore::new(settings.max_fetches.max(1))),
                settings,
                metrics,
            }),
        }
    }

    /// The key of `url`: cached, or from the fetch under way, or from `fetch` (run as a task).
    ///
    /// # Errors
    /// The fetch's error (remembered for the failure TTL), or [`VerifyError::CertFetch`] when
    /// too many fetches are under way.
    pub(crate) async fn get<F, Fut>(
        &self,
        url: &str,
        fetch: F,
    ) -> Result<Arc<RsaPublicKey>, VerifyError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Arc<RsaPublicKey>, VerifyError>> + Send + 'static,
    {
        let mut waiting = {
            let mut state = self.lock();
            state.clock += 1;
            let now = state.clock;
            match state.entries.get_mut(url) {
                Some(Entry::Ready { key, used }) => {
                    *used = now;
                    self.inner.metrics.hits.inc();
                    return Ok(Arc::clone(key));
                }
                Some(Entry::Failed { until, error }) if *until > Instant::now() => {
                    self.inner.metrics.negative_hits.inc();
                    return Err(error.clone());
                }
                Some(Entry::Fetching(receiver)) => receiver.clone(),
                _ => {
                    let Ok(permit) = Arc::clone(&self.inner.fetches).try_acquire_owned() else {
                        self.inner.metrics.limited.inc();
                        return Err(VerifyError::CertFetch(
                            "too many certificate fetches under way".into(),
                        ));
                    };
                    let (sender, receiver) = watch::channel(None);
                    state
                        .entries
                        .insert(url.to_owned(), Entry::Fetching(receiver.clone()));
                    let (cache, url, fetching) = (self.clone(), url.to_owned(), fetch());
                    tokio::spawn(async move {
                        let result = fetching.await;
                        drop(permit);
                        cache.settle(&url, &result);
                        let _ = sender.send(Some(result));
                    });
                    receiver
                }
            }
        };
        let outcome = waiting
            .wait_for(Option::is_some)
            .await
            .map_err(|_| VerifyError::CertFetch("certificate fetch ended".into()))?;
        outcome.clone().expect("waited for Some")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().expect("key cache lock poisoned")
    }

    /// Records a finished fetch, evicting to stay within the bounds.
    fn settle(&self, url: &str, result: &Result<Arc<RsaPublicKey>, VerifyError>) {
        let settings = &self.inner.settings;
        let mut state = self.lock();
        state.clock += 1;
        let used = state.clock;
        let entry = match result {
            Ok(key) => {
                self.inner.metrics.fetched.inc();
                tracing::info!(cert_url = %url, "SNS signing certificate fetched and cached");
                let ready = state
                    .entries
                    .values()
                    .filter(|e| matches!(e, Entry::Ready { .. }))
                    .count();
                if ready >= settings.max_keys.max(1) {
                    evict(&mut state.entries, |e| match e {
                        Entry::Ready { used, .. } => Some(*used),
                        _ => None,
                    });
                }
                Entry::Ready {
                    key: Arc::clone(key),
                    used,
                }
            }
            Err(error) => {
                self.inner.metrics.failed.inc();
                let now = Instant::now();
                state
                    .entries
                    .retain(|_, e| !matches!(e, Entry::Failed { until, .. } if *until <= now));
                let failed = state
                    .entries
                    .values()
                    .filter(|e| matches!(e, Entry::Failed { .. }))
                    .count();
                if failed >= settings.max_failures.max(1) {
                    evict(&mut state.entries, |e| match e {
                        Entry::Failed { until, .. } => Some(*until),
                        _ => None,
                    });
                }
                Entry::Failed {
                    until: now + settings.failure_ttl,
                    error: error.clone(),
                }
            }
        };
        state.entries.insert(url.to_owned(), entry);
    }
}

/// Removes the entry with the smallest `rank` (entries without one are kept).
fn evict<R: Ord>(entries: &mut HashMap<String, Entry>, rank: impl Fn(&Entry) -> Option<R>) {
    let oldest = entries
        .iter()
        .filter_map(|(url, entry)| rank(entry).map(|r| (r, url)))
        .min_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, url)| url.clone());
    if let Some(url) = oldest {
        entries.remove(&url);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn key() -> Arc<RsaPublicKey> {
        static KEY: std::sync::OnceLock<Arc<RsaPublicKey>> = std::sync::OnceLock::new();
        Arc::clone(KEY.get_or_init(|| {
            // A small fixed public key: the cache never uses it, it only hands it out.
            Arc::new(
                RsaPublicKey::new(rsa::BigUint::from(0xC5u32 * 0x1001u32), 65537u32.into())
                    .unwrap(),
            )
        }))
    }

    fn cache(settings: CertCacheSettings) -> (KeyCache, Arc<CertMetrics>) {
        let metrics = Arc::new(CertMetrics::default());
        (KeyCache::new(settings, Arc::clone(&metrics)), metrics)
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_look_ups_of_a_new_certificate_share_one_fetch() {
        let (cache, metrics) = cache(CertCacheSettings::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let lookups: Vec<_> = (0..10)
            .map(|_| {
                let (cache, calls) = (cache.clone(), Arc::clone(&calls));
                tokio::spawn(async move {
                    cache
                        .get("u", || async move {
                            calls.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            Ok(key())
                        })
                        .await
                })
            })
            .collect();
        for lookup in lookups {
            lookup.await.unwrap().unwrap();
        }
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.fetched.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_fetch_is_not_repeated_within_the_failure_ttl() {
        let settings = CertCacheSettings::default();
        let (cache, metrics) = cache(settings.clone());
        let calls = Arc::new(AtomicUsize::new(0));
        let fetch = || {
            let calls = Arc::clone(&calls);
            async move {
                calls.fetch_add(1, Ordering::Relaxed);
                Err(VerifyError::CertFetch("HTTP 500".into()))
            }
        };
        for _ in 0..5 {
            assert!(cache.get("u", fetch).await.is_err());
        }
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.negative_hits.get(), 4);
        tokio::time::sleep(settings.failure_ttl).await;
        assert!(cache.get("u", fetch).await.is_err());
        assert_eq!(
            calls.load(Ordering::Relaxed),
            2,
            "tried again after the TTL"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_least_recently_used_key_goes_first() {
        let (cache, _) = cache(CertCacheSettings {
            max_keys: 3,
            ..CertCacheSettings::default()
        });
        let calls = Arc::new(AtomicUsize::new(0));
        let get = |url: &'static str| {
            let (cache, calls) = (cache.clone(), Arc::clone(&calls));
            async move {
                cache
                    .get(url, || async move {
                        calls.fetch_add(1, Ordering::Relaxed);
                        Ok(key())
                    })
                    .await
                    .unwrap();
            }
        };
        for url in ["topic", "a", "b"] {
            get(url).await;
        }
        get("topic").await; // the genuine certificate is used again
        get("c").await; // evicts "a", the least recently used
        assert_eq!(calls.load(Ordering::Relaxed), 4);
        get("topic").await;
        get("b").await;
        get("c").await;
        assert_eq!(calls.load(Ordering::Relaxed), 4, "still cached");
        get("a").await;
        assert_eq!(calls.load(Ordering::Relaxed), 5, "evicted, fetched again");
    }

    #[tokio::test(start_paused = true)]
    async fn fetches_beyond_the_limit_are_refused_without_fetching_and_dropped_callers_free_nothing_early()
     {
        let (cache, metrics) = cache(CertCacheSettings {
            max_fetches: 2,
            ..CertCacheSettings::default()
        });
        let slow = || async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Err(VerifyError::CertFetch("timed out".into()))
        };
        // Two callers start fetches and go away at once (dropped requests).
        for url in ["x1", "x2"] {
            let _ = tokio::time::timeout(Duration::from_millis(1), cache.get(url, slow)).await;
        }
        let refused = cache.get("x3", slow).await.unwrap_err();
        assert!(refused.to_string().contains("too many"), "{refused}");
        assert_eq!(metrics.limited.get(), 1);
        // The abandoned fetches still finish and give their slots back.
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(metrics.failed.get(), 2);
        let fetched = cache.get("x4", || async { Ok(key()) }).await;
        assert!(fetched.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_bounded() {
        let (cache, _) = cache(CertCacheSettings {
            max_failures: 10,
            ..CertCacheSettings::default()
        });
        for i in 0..100 {
            let url = format!("forged-{i}");
            let _ = cache
                .get(&url, || async { Err(VerifyError::CertFetch("404".into())) })
                .await;
        }
        assert!(cache.lock().entries.len() <= 10);
    }
}
