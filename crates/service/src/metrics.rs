//! Minimal Prometheus text exposition (format 0.0.4) for counters and gauges backed by atomics.
//!
//! Services declare their metrics as fields of a struct and render them in `/metrics`; there is no
//! global registry, so tests can run many services in one process without shared state.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Serves `GET /metrics` (from `render`) and `GET /healthz` on `listener` until `shutdown`: for a
/// metrics port separate from the service's own (`--metrics-listen`), or for a process that has
/// no HTTP server of its own (the stream poller).
///
/// # Errors
/// When the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: std::sync::Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::header;
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = render();
                async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], text) }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics listening");
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

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
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of the latency buckets, in seconds: 100 µs to 10 s.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0,
];

/// A latency histogram with [`LATENCY_BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    /// Count per bucket (not cumulative), plus one for +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: std::time::Duration) {
        let secs = elapsed.as_secs_f64();
        let index = LATENCY_BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
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

    /// A histogram family with one series per `(label value, histogram)`.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        series: &[(&str, &Histogram)],
    ) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (value, histogram) in series {
            let prefix = if label.is_empty() {
                String::new()
            } else {
                format!("{label}=\"{value}\",")
            };
            let mut cumulative = 0;
            for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
                cumulative += histogram.buckets[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    self.out,
                    "{name}_bucket{{{prefix}le=\"{le}\"}} {cumulative}"
                );
            }
            cumulative += histogram.buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
            let _ = writeln!(
                self.out,
                "{name}_bucket{{{prefix}le=\"+Inf\"}} {cumulative}"
            );
            let labels = prefix.trim_end_matches(',');
            let braces = if labels.is_empty() {
                String::new()
            } else {
                format!("{{{labels}}}")
            };
            let sum = histogram.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(self.out, "{name}_sum{braces} {sum}");
            let _ = writeln!(self.out, "{name}_count{braces} {}", histogram.count());
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
    fn histograms_are_cumulative_with_sum_and_count() {
        let h = Histogram::default();
        h.observe(std::time::Duration::from_micros(50));
        h.observe(std::time::Duration::from_millis(3));
        h.observe(std::time::Duration::from_secs(60));
        let text = Exposition::new()
            .histogram("lat_seconds", "Latency.", "route", &[("send", &h)])
            .finish();
        assert!(
            text.contains("lat_seconds_bucket{route=\"send\",le=\"0.0001\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_bucket{route=\"send\",le=\"0.005\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_bucket{route=\"send\",le=\"10\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_bucket{route=\"send\",le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_count{route=\"send\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_sum{route=\"send\"} 60.00305\n"),
            "{text}"
        );
    }

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
