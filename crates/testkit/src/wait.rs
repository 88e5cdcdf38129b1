//! Waits that end on progress. Each gives up only when nothing it watches has moved for the
//! idle limit, and then says what it awaited and what it saw last: a loaded machine (two cores,
//! other builds and tests beside this one) makes progress slower, not absent, and a fixed total
//! time sized for an idle machine would fail by chance.

use std::time::Duration;

use tokio::time::Instant;

/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(20);

/// How long a wait may see nothing move before it gives up: `CHORUS_TEST_IDLE_MS`, or 30 s.
pub fn idle_limit() -> Duration {
    let ms = std::env::var("CHORUS_TEST_IDLE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000);
    Duration::from_millis(ms)
}

/// Why a wait ended without what it awaited.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// Nothing moved for the idle limit.
    #[error("nothing moved for {idle:?} while awaiting {awaited}; last answer: {last}")]
    Stalled {
        awaited: String,
        idle: Duration,
        last: String,
    },
    /// What was awaited can no longer come (the server exited, say).
    #[error("{why} while awaiting {awaited}; last answer: {last}")]
    Gone {
        awaited: String,
        why: String,
        last: String,
    },
}

/// Polls an HTTP endpoint — a `/readyz`, say — until its answer is the one awaited. Every new
/// answer (a first answer after none, a body that says something else) counts as progress, and
/// so does a new value of what [`Poll::watching`] watches.
pub struct Poll<W> {
    url: String,
    awaited: String,
    idle: Duration,
    watch: W,
}

impl Poll<fn() -> Result<u64, String>> {
    /// A poll of `url`, awaiting what `awaited` names (for the error, should it stall).
    pub fn new(url: impl Into<String>, awaited: impl Into<String>) -> Self {
        Poll {
            url: url.into(),
            awaited: awaited.into(),
            idle: idle_limit(),
            watch: || Ok(0),
        }
    }
}

impl<W: FnMut() -> Result<u64, String>> Poll<W> {
    /// Gives up after `idle` without progress instead of [`idle_limit`].
    pub fn idle(self, idle: Duration) -> Self {
        Poll { idle, ..self }
    }

    /// Also watches `watch`, called once per poll: a new value is progress (a count of what
    /// happened elsewhere: subscriptions made, lines logged), an error ends the wait at once
    /// (the server exited).
    pub fn watching<V: FnMut() -> Result<u64, String>>(self, watch: V) -> Poll<V> {
        Poll {
            url: self.url,
            awaited: self.awaited,
            idle: self.idle,
            watch,
        }
    }

    /// Polls until `done(status, body)` holds; returns that answer.
    ///
    /// # Errors
    /// [`WaitError::Stalled`] when nothing moved for the idle limit, [`WaitError::Gone`] when the
    /// watch says what was awaited can no longer come.
    pub async fn until(
        mut self,
        mut done: impl FnMut(u16, &str) -> bool,
    ) -> Result<(u16, String), WaitError> {
        let http = reqwest::Client::new();
        let mut last = String::from("none yet");
        let mut last_watched = None;
        let mut moved_at = Instant::now();
        loop {
            let seen = match http.get(&self.url).timeout(self.idle).send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let body = response.text().await.unwrap_or_default();
                    if done(status, &body) {
                        return Ok((status, body));
                    }
                    format!("{status} {body}")
                }
                Err(e) => format!("no answer ({e})"),
            };
            let watched = (self.watch)().map_err(|why| WaitError::Gone {
                awaited: self.awaited.clone(),
                why,
                last: seen.clone(),
            })?;
            if seen != last || last_watched != Some(watched) {
                (last, last_watched, moved_at) = (seen, Some(watched), Instant::now());
            } else if moved_at.elapsed() >= self.idle {
                return Err(WaitError::Stalled {
                    awaited: self.awaited,
                    idle: self.idle,
                    last,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls until the endpoint answers 200.
    ///
    /// # Errors
    /// As [`Poll::until`].
    pub async fn ready(self) -> Result<(), WaitError> {
        self.until(|status, _| status == 200).await.map(|_| ())
    }
}

/// Polls a `/metrics` exposition at `url` until it has every `expected` line — a line equal to
/// it, or, for an expectation without a value, one that starts with it and a space — and
/// returns it. Counters move right after the effect a client sees, so this follows it closely.
/// Moves on while the exposition changes; gives up when it has not changed for the idle limit.
///
/// # Panics
/// When the lines do not come, or the answer is not a Prometheus text exposition.
pub async fn metrics(url: &str, expected: &[&str]) -> String {
    let http = reqwest::Client::new();
    let idle = idle_limit();
    let mut last = String::new();
    let mut changed_at = Instant::now();
    loop {
        let response = http
            .get(url)
            .timeout(idle)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{url}: {content_type}"
        );
        let text = response.text().await.expect("the metrics text");
        let missing: Vec<&&str> = expected
            .iter()
            .filter(|want| {
                !text
                    .lines()
                    .any(|line| line == **want || line.starts_with(&format!("{want} ")))
            })
            .collect();
        if missing.is_empty() {
            return text;
        }
        if text != last {
            (last, changed_at) = (text, Instant::now());
        }
        assert!(
            changed_at.elapsed() < idle,
            "{url} did not change for {idle:?} without showing {missing:?}:\n{last}"
        );
        tokio::time::sleep(POLL).await;
    }
}
