//! Minimal Prometheus text exposition (format 0.0.4) for counters and gauges backed by atomics.
//!
//! Services declare their metrics as fields of a struct and render them in `/metrics`; there is no
//! global registry, so tests can run many services in one process without shared state.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Content type of [`Exposition`] output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Builds one `/metrics` response.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// A counter family with one sample per `(label value, counter)`; `label` names the label.
    pub fn counter(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        samples: &[(&str, &Counter)],
    ) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (value, counter) in samples {
            if label.is_empty() {
                let _ = writeln!(self.out, "{name} {}", counter.get());
            } else {
                let _ = writeln!(self.out, "{name}{{{label}=\"{value}\"}} {}", counter.get());
            }
        }
        self
    }

    /// A gauge with no labels.
    pub fn gauge(&mut self, name: &str, help: &str, gauge: &Gauge) -> &mut Self {
        let _ = writeln!(
            self.out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
            gauge.get()
        );
        self
    }

    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let ok = Counter::default();
        let bad = Counter::default();
        ok.add(3);
        bad.inc();
        let conns = Gauge::default();
        conns.set(2);
        let text = Exposition::new()
            .counter(
                "x_total",
                "Things.",
                "result",
                &[("ok", &ok), ("bad", &bad)],
            )
            .gauge("y", "Conns.", &conns)
            .finish();
        assert_eq!(
            text,
            "# HELP x_total Things.\n# TYPE x_total counter\nx_total{result=\"ok\"} 3\n\
             x_total{result=\"bad\"} 1\n# HELP y Conns.\n# TYPE y gauge\ny 2\n"
        );
    }
}
