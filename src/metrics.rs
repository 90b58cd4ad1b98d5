//! Process metrics in the Prometheus text format (version 0.0.4): HTTP
//! requests and latency per route, the pool, rotations and Postgres
//! restarts. Counters live here; gauges are read from their owners when
//! scraped, so they cannot go stale.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Latency buckets, seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
struct Histogram {
    /// Observations at or below each bucket bound (not yet cumulative).
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
struct Http {
    /// (method, route, status) → requests.
    requests: BTreeMap<(String, String, u16), u64>,
    /// (method, route) → latency.
    latency: BTreeMap<(String, String), Histogram>,
}

/// Counters shared by the API, the rotator and the supervisor.
#[derive(Default)]
pub struct Metrics {
    http: Mutex<Http>,
    rotations: AtomicU64,
    postgres_restarts: AtomicU64,
}

/// Gauges read at scrape time.
pub struct Gauges {
    pub pool_max: usize,
    pub pool_open: usize,
    pub pool_idle: usize,
    pub pool_waiting: usize,
    pub postgres_up: bool,
}

impl Metrics {
    /// One answered request; `route` is the route template, never the raw
    /// path (ids in paths would make unbounded series).
    pub fn observe_request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let mut http = self.http.lock().unwrap_or_else(|e| e.into_inner());
        *http
            .requests
            .entry((method.to_string(), route.to_string(), status))
            .or_default() += 1;
        let histogram = http
            .latency
            .entry((method.to_string(), route.to_string()))
            .or_default();
        let seconds = elapsed.as_secs_f64();
        if let Some(bucket) = BUCKETS.iter().position(|bound| seconds <= *bound) {
            histogram.counts[bucket] += 1;
        }
        histogram.count += 1;
        histogram.sum += seconds;
    }

    pub fn rotation_completed(&self) {
        self.rotations.fetch_add(1, Ordering::Relaxed);
    }

    pub fn postgres_restarted(&self) {
        self.postgres_restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition text.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::new();
        let http = self.http.lock().unwrap_or_else(|e| e.into_inner());
        out.push_str("# HELP keepd_http_requests_total HTTP requests answered.\n");
        out.push_str("# TYPE keepd_http_requests_total counter\n");
        for ((method, route, status), n) in &http.requests {
            let _ = writeln!(
                out,
                "keepd_http_requests_total{{method=\"{method}\",route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        out.push_str("# HELP keepd_http_request_duration_seconds Time to answer, by route.\n");
        out.push_str("# TYPE keepd_http_request_duration_seconds histogram\n");
        for ((method, route), h) in &http.latency {
            let labels = format!("method=\"{method}\",route=\"{}\"", escape(route));
            let mut cumulative = 0;
            for (bound, count) in BUCKETS.iter().zip(h.counts) {
                cumulative += count;
                let _ = writeln!(
                    out,
                    "keepd_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "keepd_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "keepd_http_request_duration_seconds_sum{{{labels}}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "keepd_http_request_duration_seconds_count{{{labels}}} {}",
                h.count
            );
        }
        drop(http);
        let mut single = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        single(
            "keepd_pool_max_connections",
            "gauge",
            "Configured pool size.",
            gauges.pool_max.to_string(),
        );
        single(
            "keepd_pool_open_connections",
            "gauge",
            "Connections open to Postgres.",
            gauges.pool_open.to_string(),
        );
        single(
            "keepd_pool_idle_connections",
            "gauge",
            "Open connections not in use.",
            gauges.pool_idle.to_string(),
        );
        single(
            "keepd_pool_waiting_requests",
            "gauge",
            "Units of work waiting for a connection.",
            gauges.pool_waiting.to_string(),
        );
        single(
            "keepd_postgres_up",
            "gauge",
            "1 while the supervisor sees Postgres ready.",
            u8::from(gauges.postgres_up).to_string(),
        );
        single(
            "keepd_credential_rotations_total",
            "counter",
            "Login-role rotations completed by this process.",
            self.rotations.load(Ordering::Relaxed).to_string(),
        );
        single(
            "keepd_postgres_restarts_total",
            "counter",
            "Times the supervisor restarted a Postgres that died.",
            self.postgres_restarts.load(Ordering::Relaxed).to_string(),
        );
        out
    }
}

fn escape(label: &str) -> String {
    label.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_cumulative_buckets_and_counters() {
        let metrics = Metrics::default();
        metrics.observe_request("POST", "/sync/push", 200, Duration::from_millis(3));
        metrics.observe_request("POST", "/sync/push", 200, Duration::from_millis(30));
        metrics.observe_request("POST", "/sync/push", 400, Duration::from_secs(20));
        metrics.rotation_completed();
        let text = metrics.render(&Gauges {
            pool_max: 16,
            pool_open: 3,
            pool_idle: 2,
            pool_waiting: 0,
            postgres_up: true,
        });
        for line in [
            r#"keepd_http_requests_total{method="POST",route="/sync/push",status="200"} 2"#,
            r#"keepd_http_requests_total{method="POST",route="/sync/push",status="400"} 1"#,
            r#"keepd_http_request_duration_seconds_bucket{method="POST",route="/sync/push",le="0.005"} 1"#,
            r#"keepd_http_request_duration_seconds_bucket{method="POST",route="/sync/push",le="0.05"} 2"#,
            r#"keepd_http_request_duration_seconds_bucket{method="POST",route="/sync/push",le="10"} 2"#,
            r#"keepd_http_request_duration_seconds_bucket{method="POST",route="/sync/push",le="+Inf"} 3"#,
            r#"keepd_http_request_duration_seconds_count{method="POST",route="/sync/push"} 3"#,
            "keepd_pool_max_connections 16",
            "keepd_postgres_up 1",
            "keepd_credential_rotations_total 1",
            "keepd_postgres_restarts_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }
}
