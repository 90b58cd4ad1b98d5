//! Process metrics in the Prometheus text format (version 0.0.4): HTTP
//! requests and latency per route, responses by status class (unrouted
//! ones included), connections, the pool, rotations, Postgres restarts,
//! the security level, and the usual `process_*` figures. Counters live here; gauges are read from their owners when
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

/// Counters shared by the API, the edge, the rotator and the supervisor.
#[derive(Default)]
pub struct Metrics {
    http: Mutex<Http>,
    /// Responses by status class (index 1..=5), every path included.
    responses: [AtomicU64; 6],
    connections_open: AtomicU64,
    refused_total: AtomicU64,
    refused_per_client: AtomicU64,
    /// Connections closed to make room for a newcomer at the cap.
    evicted_total: AtomicU64,
    rotations: AtomicU64,
    postgres_restarts: AtomicU64,
    /// The measured security level, 1 (reduced) to 4 (maximum); 0 before
    /// the first report.
    security_level: AtomicU64,
    /// `security.minimum_level` on the same scale, so an alert compares
    /// the two.
    security_minimum: AtomicU64,
    /// 1 when backups are configured: a backup time of 0 then means none
    /// was taken, not that none is expected.
    backup_enabled: AtomicU64,
    /// Unix seconds of the newest backup and of the newest archived WAL
    /// segment (0: none), and whether archiving is failing now; kept by
    /// the backup schedule.
    backup_last_success: AtomicU64,
    wal_archived_last: AtomicU64,
    wal_archive_failing: AtomicU64,
}

/// Holds one open connection in the gauge.
pub struct OpenConnection<'a>(&'a Metrics);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
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

    /// Any answered request, routed or not (404s and 405s included).
    pub fn observe_response(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5);
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_opened(&self) -> OpenConnection<'_> {
        self.connections_open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(self)
    }

    /// A connection closed at once; `cap` is the setting that was reached.
    pub fn connection_refused(&self, cap: &str) {
        if cap == "max_connections" {
            self.refused_total.fetch_add(1, Ordering::Relaxed);
        } else {
            self.refused_per_client.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A connection closed to make room for a new one (`edge::slots`).
    pub fn connection_evicted(&self) {
        self.evicted_total.fetch_add(1, Ordering::Relaxed);
    }

    /// The level of the last security report and the configured minimum,
    /// 1 (reduced) to 4 (maximum).
    pub fn set_security_level(&self, measured: u64, minimum: u64) {
        self.security_level.store(measured, Ordering::Relaxed);
        self.security_minimum.store(minimum, Ordering::Relaxed);
    }

    pub fn set_backup_enabled(&self, enabled: bool) {
        self.backup_enabled
            .store(u64::from(enabled), Ordering::Relaxed);
    }

    /// What the backup schedule last saw.
    pub fn set_backup_status(
        &self,
        last_backup: Option<u64>,
        last_archived: Option<u64>,
        failing: bool,
    ) {
        self.backup_last_success
            .store(last_backup.unwrap_or(0), Ordering::Relaxed);
        self.wal_archived_last
            .store(last_archived.unwrap_or(0), Ordering::Relaxed);
        self.wal_archive_failing
            .store(u64::from(failing), Ordering::Relaxed);
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
        out.push_str("# HELP keepd_http_responses_total HTTP responses by status class, unrouted paths included.\n");
        out.push_str("# TYPE keepd_http_responses_total counter\n");
        for class in 1..=5 {
            let _ = writeln!(
                out,
                "keepd_http_responses_total{{class=\"{class}xx\"}} {}",
                self.responses[class].load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP keepd_http_connections_refused_total Connections closed at once because a cap was reached.\n");
        out.push_str("# TYPE keepd_http_connections_refused_total counter\n");
        for (cap, n) in [
            ("max_connections", &self.refused_total),
            ("max_connections_per_client", &self.refused_per_client),
        ] {
            let _ = writeln!(
                out,
                "keepd_http_connections_refused_total{{cap=\"{cap}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP keepd_http_connections_evicted_total Connections without a request open closed to admit a new one at api.max_connections.\n\
             # TYPE keepd_http_connections_evicted_total counter\n\
             keepd_http_connections_evicted_total {}",
            self.evicted_total.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP keepd_build_info keepd's version.\n# TYPE keepd_build_info gauge\n\
             keepd_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        let mut single = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        for (name, kind, help, value) in [
            (
                "keepd_pool_max_connections",
                "gauge",
                "Configured pool size.",
                gauges.pool_max as u64,
            ),
            (
                "keepd_pool_open_connections",
                "gauge",
                "Connections open to Postgres.",
                gauges.pool_open as u64,
            ),
            (
                "keepd_pool_idle_connections",
                "gauge",
                "Open connections not in use.",
                gauges.pool_idle as u64,
            ),
            (
                "keepd_pool_waiting_requests",
                "gauge",
                "Units of work waiting for a connection.",
                gauges.pool_waiting as u64,
            ),
            (
                "keepd_postgres_up",
                "gauge",
                "1 while the supervisor sees Postgres ready.",
                u64::from(gauges.postgres_up),
            ),
            (
                "keepd_credential_rotations_total",
                "counter",
                "Login-role rotations completed by this process.",
                load(&self.rotations),
            ),
            (
                "keepd_postgres_restarts_total",
                "counter",
                "Times the supervisor restarted a Postgres that died.",
                load(&self.postgres_restarts),
            ),
            (
                "keepd_http_connections_open",
                "gauge",
                "Client connections open on the API listener.",
                load(&self.connections_open),
            ),
            (
                "keepd_security_level",
                "gauge",
                "The measured security level: 1 reduced, 2 moderate, 3 high, 4 maximum (0 before the first report).",
                load(&self.security_level),
            ),
            (
                "keepd_security_minimum_level",
                "gauge",
                "security.minimum_level: 1 reduced, 2 moderate, 3 high, 4 maximum.",
                load(&self.security_minimum),
            ),
            (
                "keepd_backup_enabled",
                "gauge",
                "1 when backup.repository or backup.s3 is set.",
                load(&self.backup_enabled),
            ),
            (
                "keepd_backup_last_success_timestamp_seconds",
                "gauge",
                "When the newest backup in the repository finished, unix seconds (0: none).",
                load(&self.backup_last_success),
            ),
            (
                "keepd_wal_archive_last_success_timestamp_seconds",
                "gauge",
                "When Postgres last archived a WAL segment, unix seconds (0: never); now minus this is the archive lag.",
                load(&self.wal_archived_last),
            ),
            (
                "keepd_wal_archive_failing",
                "gauge",
                "1 while the last attempt to archive WAL failed (pg_wal grows until it succeeds).",
                load(&self.wal_archive_failing),
            ),
        ] {
            single(name, kind, help, value.to_string());
        }
        let process = Process::read();
        for (name, kind, help, value) in [
            (
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
                process.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "gauge",
                "Virtual memory size in bytes.",
                process.virtual_bytes,
            ),
            (
                "process_open_fds",
                "gauge",
                "Open file descriptors.",
                process.open_fds,
            ),
            (
                "process_max_fds",
                "gauge",
                "The open-file limit (RLIMIT_NOFILE, soft).",
                process.max_fds,
            ),
            ("process_threads", "gauge", "OS threads.", process.threads),
        ] {
            if let Some(value) = value {
                single(name, kind, help, value.to_string());
            }
        }
        if let Some(cpu) = process.cpu_seconds {
            single(
                "process_cpu_seconds_total",
                "counter",
                "User and system CPU time, seconds.",
                format!("{cpu}"),
            );
        }
        if let Some(start) = process.start_time_seconds {
            single(
                "process_start_time_seconds",
                "gauge",
                "Start time since the epoch, seconds.",
                start.to_string(),
            );
        }
        out
    }
}

/// This process as `/proc/self` tells it (Linux; elsewhere nothing).
#[derive(Default)]
struct Process {
    resident_bytes: Option<u64>,
    virtual_bytes: Option<u64>,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
    threads: Option<u64>,
    cpu_seconds: Option<f64>,
    start_time_seconds: Option<u64>,
}

impl Process {
    fn read() -> Process {
        let mut p = Process {
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as u64),
            max_fds: nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .ok()
                .map(|(soft, _)| soft),
            ..Process::default()
        };
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096) as u64;
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        // Fields after the parenthesised command name, which may hold spaces.
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // proc(5) numbers fields from 1 (pid); `fields[0]` is field 3.
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        if let (Some(utime), Some(stime)) = (field(14), field(15)) {
            p.cpu_seconds = Some((utime + stime) as f64 / ticks);
        }
        p.threads = field(20);
        p.virtual_bytes = field(23);
        p.resident_bytes = field(24).map(|pages| pages * page);
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())
        });
        if let (Some(boot), Some(start)) = (boot, field(22)) {
            p.start_time_seconds = Some(boot + (start as f64 / ticks) as u64);
        }
        p
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
        metrics.observe_response(404);
        metrics.observe_response(200);
        metrics.set_security_level(3, 2);
        metrics.set_backup_enabled(true);
        let _open = metrics.connection_opened();
        metrics.connection_refused("max_connections_per_client");
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
            r#"keepd_http_responses_total{class="4xx"} 1"#,
            r#"keepd_http_responses_total{class="2xx"} 1"#,
            r#"keepd_http_responses_total{class="5xx"} 0"#,
            r#"keepd_http_connections_refused_total{cap="max_connections_per_client"} 1"#,
            "keepd_http_connections_open 1",
            "keepd_security_level 3",
            "keepd_security_minimum_level 2",
            "keepd_backup_enabled 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        for name in [
            "keepd_build_info{version=",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_cpu_seconds_total ",
            "process_start_time_seconds ",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(name)),
                "missing {name}\n{text}"
            );
        }
        let rss: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            rss > 1 << 20,
            "a running test has more than 1 MiB resident: {rss}"
        );
    }
}
