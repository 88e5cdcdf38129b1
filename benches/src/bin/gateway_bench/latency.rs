//! Delivery latencies: a shared histogram of 0.1 ms buckets up to 10 s, filled in batches (one
//! batch per socket read) so that thousands of client tasks do not fight over one counter.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bucket width.
const BUCKET_MICROS: u64 = 100;
/// Buckets; the last one also holds everything slower (10 s and more).
const BUCKETS: usize = 100_000;

/// Counts of latencies per 0.1 ms.
pub(crate) struct Histogram {
    buckets: Box<[AtomicU64]>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// Latencies seen by one task since its last flush: few distinct buckets, so a short list.
#[derive(Default)]
pub(crate) struct Batch {
    counts: Vec<(usize, u64)>,
}

impl Batch {
    pub(crate) fn record(&mut self, micros: u64) {
        let bucket =
            usize::try_from(micros / BUCKET_MICROS).map_or(BUCKETS - 1, |b| b.min(BUCKETS - 1));
        match self.counts.iter_mut().find(|(b, _)| *b == bucket) {
            Some((_, n)) => *n += 1,
            None => self.counts.push((bucket, 1)),
        }
    }
}

impl Histogram {
    /// Adds a batch and empties it.
    pub(crate) fn flush(&self, batch: &mut Batch) {
        for (bucket, n) in batch.counts.drain(..) {
            self.buckets[bucket].fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn reset(&self) {
        for bucket in self.buckets.iter() {
            bucket.store(0, Ordering::Relaxed);
        }
    }

    /// Summary in milliseconds; a quantile is the upper edge of its bucket.
    pub(crate) fn summary(&self) -> Summary {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let quantile = |q: f64| -> f64 {
            if total == 0 {
                return 0.0;
            }
            let rank = ((total as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, n) in counts.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return ((i as u64 + 1) * BUCKET_MICROS) as f64 / 1000.0;
                }
            }
            (BUCKETS as u64 * BUCKET_MICROS) as f64 / 1000.0
        };
        Summary {
            p50_ms: quantile(0.50),
            p99_ms: quantile(0.99),
            max_ms: quantile(1.0),
        }
    }
}

/// Latency quantiles of one step.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Summary {
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_bucket_upper_edges() {
        let histogram = Histogram::default();
        let mut batch = Batch::default();
        for micros in 0..100u64 {
            batch.record(micros * 1000); // 0 .. 99 ms
        }
        histogram.flush(&mut batch);
        let s = histogram.summary();
        assert!((s.p50_ms - 49.1).abs() < 1e-9, "{s:?}");
        assert!((s.p99_ms - 98.1).abs() < 1e-9, "{s:?}");
        assert!((s.max_ms - 99.1).abs() < 1e-9, "{s:?}");
        histogram.reset();
        assert_eq!(histogram.summary().max_ms, 0.0);
    }
}
