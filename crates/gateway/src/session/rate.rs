//! Per-connection rate limits: a token bucket per kind of request.

use tokio::time::Instant;

pub(crate) use crate::settings::Rate;

/// A token bucket; the [`Rate`] is passed in on each take, so a connection stores only its
/// level and the time of the last take.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket: a new connection may burst at once.
    pub(crate) fn full(rate: Rate, now: Instant) -> Self {
        TokenBucket {
            tokens: f64::from(rate.burst),
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub(crate) fn try_take(&mut self, rate: Rate, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(rate.per_sec)).min(f64::from(rate.burst));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const RATE: Rate = Rate {
        per_sec: 10,
        burst: 3,
    };

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let start = Instant::now();
        let mut bucket = TokenBucket::full(RATE, start);
        let passed = (0..10).filter(|_| bucket.try_take(RATE, start)).count();
        assert_eq!(passed, 3, "the burst, no more");
        // 10 per second: one more token every 100 ms.
        assert!(!bucket.try_take(RATE, start + Duration::from_millis(50)));
        assert!(bucket.try_take(RATE, start + Duration::from_millis(110)));
        assert!(!bucket.try_take(RATE, start + Duration::from_millis(120)));
    }

    #[test]
    fn an_idle_bucket_refills_only_to_the_burst() {
        let start = Instant::now();
        let mut bucket = TokenBucket::full(RATE, start);
        let later = start + Duration::from_secs(3600);
        let passed = (0..10).filter(|_| bucket.try_take(RATE, later)).count();
        assert_eq!(passed, 3);
    }
}
