//! Process metrics in the Prometheus text format (version 0.0.4): HTTP
//! requests and latency per route, responses by status class (unrouted
//! ones included), connections, the pool, rotations, Postgres restarts,
//! the security level, and the usual `process_*` figures. The exposition
//! is prometheus-client's; the process figures come from `/proc` through
//! the procfs crate (Linux; elsewhere only the open-file limit). Counters
//! live here; gauges are read from their owners when scraped, so they
//! cannot go stale.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Latency buckets, seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Request {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    method: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Class {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Cap {
    cap: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Key {
    key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Build {
    version: &'static str,
}

/// A gauge of a count that is never negative.
type Count = Gauge<u64, AtomicU64>;
/// A gauge of a measured quantity.
type Figure = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Table {
    table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Session {
    state: String,
    role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Statement {
    queryid: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Standby {
    application: String,
}

/// What `daemon::db_metrics` read of Postgres at one moment.
#[derive(Debug, Default, Clone)]
pub struct DatabaseSnapshot {
    /// (table, heap and TOAST bytes, index bytes, dead tuples, last
    /// vacuum as Unix seconds, 0 for never).
    pub tables: Vec<(String, f64, f64, f64, f64)>,
    /// (state, role, sessions).
    pub sessions: Vec<(String, String, f64)>,
    pub oldest_transaction_seconds: f64,
    pub xid_age: f64,
    pub checkpoints_timed: f64,
    pub checkpoints_requested: f64,
    pub wal_bytes: f64,
    /// The statements with the most total time: (queryid, calls, seconds).
    pub statements: Vec<(String, f64, f64)>,
    /// (standby's application name, replay lag in seconds).
    pub standbys: Vec<(String, f64)>,
}

/// The database's figures, set as a whole by each snapshot.
#[derive(Default)]
struct Database {
    table_bytes: Family<Table, Figure>,
    index_bytes: Family<Table, Figure>,
    dead_tuples: Family<Table, Figure>,
    last_autovacuum: Family<Table, Figure>,
    sessions: Family<Session, Figure>,
    oldest_transaction: Figure,
    xid_age: Figure,
    checkpoints: Family<Kind, Figure>,
    wal_bytes: Figure,
    statement_calls: Family<Statement, Figure>,
    statement_seconds: Family<Statement, Figure>,
    replication_lag: Family<Standby, Figure>,
}

/// Counters shared by the API, the edge, the rotator and the supervisor.
pub struct Metrics {
    registry: Registry,
    requests: Family<Request, Counter>,
    key_created: Family<Key, Count>,
    key_max_age: Family<Key, Count>,
    latency: Family<Route, Histogram, fn() -> Histogram>,
    /// Responses by status class, every path included.
    responses: Family<Class, Counter>,
    refused: Family<Cap, Counter>,
    /// Connections closed to make room for a newcomer at the cap.
    evicted: Counter,
    connections_open: Gauge,
    rotations: Counter,
    postgres_restarts: Counter,
    /// The measured security level, 1 (reduced) to 4 (maximum); 0 before
    /// the first report.
    security_level: Count,
    /// `security.minimum_level` on the same scale, so an alert compares
    /// the two.
    security_minimum: Count,
    /// 1 when backups are configured: a backup time of 0 then means none
    /// was taken, not that none is expected.
    backup_enabled: Count,
    /// Unix seconds of the newest backup and of the newest archived WAL
    /// segment (0: none), and whether archiving is failing now; kept by
    /// the backup schedule.
    backup_last_success: Count,
    wal_archived_last: Count,
    wal_archive_failing: Count,
    /// Set from [`Gauges`] at each scrape.
    pool_max: Count,
    pool_open: Count,
    pool_idle: Count,
    pool_waiting: Count,
    postgres_up: Count,
    database: Database,
}

/// The five status classes, each exposed from the start.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl Default for Metrics {
    fn default() -> Metrics {
        let latency: fn() -> Histogram = || Histogram::new(BUCKETS);
        let metrics = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            key_created: Family::default(),
            key_max_age: Family::default(),
            latency: Family::new_with_constructor(latency),
            responses: Family::default(),
            refused: Family::default(),
            evicted: Counter::default(),
            connections_open: Gauge::default(),
            rotations: Counter::default(),
            postgres_restarts: Counter::default(),
            security_level: Count::default(),
            security_minimum: Count::default(),
            backup_enabled: Count::default(),
            backup_last_success: Count::default(),
            wal_archived_last: Count::default(),
            wal_archive_failing: Count::default(),
            pool_max: Count::default(),
            pool_open: Count::default(),
            pool_idle: Count::default(),
            pool_waiting: Count::default(),
            postgres_up: Count::default(),
            database: Database::default(),
        };
        for class in CLASSES {
            let _ = metrics.responses.get_or_create(&Class { class });
        }
        for cap in ["max_connections", "max_connections_per_client"] {
            let _ = metrics.refused.get_or_create(&Cap { cap });
        }
        metrics.register()
    }
}

/// Holds one open connection in the gauge.
pub struct OpenConnection<'a>(&'a Metrics);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.connections_open.dec();
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
    /// Every family under its exposed name (a counter's without `_total`,
    /// which the encoder appends; prometheus-client ends each help with a
    /// full stop).
    fn register(mut self) -> Metrics {
        let r = &mut self.registry;
        r.register(
            "keepd_http_requests",
            "HTTP requests answered",
            self.requests.clone(),
        );
        r.register(
            "keepd_http_request_duration_seconds",
            "Time to answer, by route",
            self.latency.clone(),
        );
        r.register(
            "keepd_http_responses",
            "HTTP responses by status class, unrouted paths included",
            self.responses.clone(),
        );
        r.register(
            "keepd_http_connections_refused",
            "Connections closed at once because a cap was reached",
            self.refused.clone(),
        );
        r.register(
            "keepd_http_connections_evicted",
            "Connections without a request open closed to admit a new one at api.max_connections",
            self.evicted.clone(),
        );
        let build = Family::<Build, Count>::default();
        build
            .get_or_create(&Build {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        r.register("keepd_build_info", "keepd's version", build);
        let d = &self.database;
        for (name, help, family) in [
            (
                "keepd_db_table_bytes",
                "Size of each of keepd's tables (heap and TOAST), bytes",
                &d.table_bytes,
            ),
            (
                "keepd_db_index_bytes",
                "Size of each of keepd's tables' indexes, bytes",
                &d.index_bytes,
            ),
            (
                "keepd_db_dead_tuples",
                "Dead row versions in each of keepd's tables",
                &d.dead_tuples,
            ),
            (
                "keepd_db_last_autovacuum_timestamp_seconds",
                "When autovacuum last finished on each of keepd's tables, Unix seconds",
                &d.last_autovacuum,
            ),
        ] {
            r.register(name, help, family.clone());
        }
        r.register(
            "keepd_db_sessions",
            "Server sessions by state and role",
            d.sessions.clone(),
        );
        r.register(
            "keepd_db_oldest_transaction_seconds",
            "Age of the oldest open transaction, seconds",
            d.oldest_transaction.clone(),
        );
        r.register(
            "keepd_db_xid_age",
            "Transaction-ID age of the oldest database (wraparound at 2^31)",
            d.xid_age.clone(),
        );
        r.register(
            "keepd_db_checkpoints",
            "Checkpoints since the server's statistics reset, by kind",
            d.checkpoints.clone(),
        );
        r.register(
            "keepd_db_wal_bytes",
            "WAL written since the server's statistics reset, bytes",
            d.wal_bytes.clone(),
        );
        r.register(
            "keepd_db_statement_calls",
            "Calls of the statements with the most total time, by queryid (pg_stat_statements)",
            d.statement_calls.clone(),
        );
        r.register(
            "keepd_db_statement_seconds",
            "Total execution time of the statements with the most, by queryid, seconds",
            d.statement_seconds.clone(),
        );
        r.register(
            "keepd_db_replication_lag_seconds",
            "Replay lag of each standby, seconds (none without standbys)",
            d.replication_lag.clone(),
        );
        for (name, help, gauge) in [
            (
                "keepd_pool_max_connections",
                "Configured pool size",
                &self.pool_max,
            ),
            (
                "keepd_pool_open_connections",
                "Connections open to Postgres",
                &self.pool_open,
            ),
            (
                "keepd_pool_idle_connections",
                "Open connections not in use",
                &self.pool_idle,
            ),
            (
                "keepd_pool_waiting_requests",
                "Units of work waiting for a connection",
                &self.pool_waiting,
            ),
            (
                "keepd_postgres_up",
                "1 while the supervisor sees Postgres ready",
                &self.postgres_up,
            ),
        ] {
            r.register(name, help, gauge.clone());
        }
        r.register(
            "keepd_credential_rotations",
            "Login-role rotations completed by this process",
            self.rotations.clone(),
        );
        r.register(
            "keepd_postgres_restarts",
            "Times the supervisor restarted a Postgres that died",
            self.postgres_restarts.clone(),
        );
        r.register(
            "keepd_http_connections_open",
            "Client connections open on the API listener",
            self.connections_open.clone(),
        );
        for (name, help, gauge) in [
            (
                "keepd_security_level",
                "The measured security level: 1 reduced, 2 moderate, 3 high, 4 maximum (0 before \
                 the first report)",
                &self.security_level,
            ),
            (
                "keepd_security_minimum_level",
                "security.minimum_level: 1 reduced, 2 moderate, 3 high, 4 maximum",
                &self.security_minimum,
            ),
            (
                "keepd_backup_enabled",
                "1 when backup.repository or backup.s3 is set",
                &self.backup_enabled,
            ),
            (
                "keepd_backup_last_success_timestamp_seconds",
                "When the newest backup in the repository finished, unix seconds (0: none)",
                &self.backup_last_success,
            ),
            (
                "keepd_wal_archive_last_success_timestamp_seconds",
                "When Postgres last archived a WAL segment, unix seconds (0: never); now minus \
                 this is the archive lag",
                &self.wal_archived_last,
            ),
            (
                "keepd_wal_archive_failing",
                "1 while the last attempt to archive WAL failed (pg_wal grows until it succeeds)",
                &self.wal_archive_failing,
            ),
        ] {
            r.register(name, help, gauge.clone());
        }
        r.register(
            "keepd_key_created_timestamp_seconds",
            "When each key keepd holds or derives was made, unix seconds (keepd keys status)",
            self.key_created.clone(),
        );
        r.register(
            "keepd_key_max_age_seconds",
            "How old a key on a schedule may grow before its policy renews it",
            self.key_max_age.clone(),
        );
        r.register_collector(Box::new(ProcessCollector));
        self
    }

    /// Every key's making and, where it is on a schedule, its largest age;
    /// keys that are gone (a retired login role) leave the gauges.
    /// The database as `snapshot` saw it; figures of tables, sessions or
    /// statements it no longer lists are dropped.
    pub fn set_database(&self, snapshot: &DatabaseSnapshot) {
        let d = &self.database;
        for family in [
            &d.table_bytes,
            &d.index_bytes,
            &d.dead_tuples,
            &d.last_autovacuum,
        ] {
            family.clear();
        }
        for (table, bytes, index, dead, vacuumed) in &snapshot.tables {
            let label = Table {
                table: table.clone(),
            };
            d.table_bytes.get_or_create(&label).set(*bytes);
            d.index_bytes.get_or_create(&label).set(*index);
            d.dead_tuples.get_or_create(&label).set(*dead);
            d.last_autovacuum.get_or_create(&label).set(*vacuumed);
        }
        d.sessions.clear();
        for (state, role, n) in &snapshot.sessions {
            d.sessions
                .get_or_create(&Session {
                    state: state.clone(),
                    role: role.clone(),
                })
                .set(*n);
        }
        d.oldest_transaction
            .set(snapshot.oldest_transaction_seconds);
        d.xid_age.set(snapshot.xid_age);
        d.checkpoints
            .get_or_create(&Kind { kind: "timed" })
            .set(snapshot.checkpoints_timed);
        d.checkpoints
            .get_or_create(&Kind { kind: "requested" })
            .set(snapshot.checkpoints_requested);
        d.wal_bytes.set(snapshot.wal_bytes);
        d.statement_calls.clear();
        d.statement_seconds.clear();
        for (queryid, calls, seconds) in &snapshot.statements {
            let label = Statement {
                queryid: queryid.clone(),
            };
            d.statement_calls.get_or_create(&label).set(*calls);
            d.statement_seconds.get_or_create(&label).set(*seconds);
        }
        d.replication_lag.clear();
        for (application, lag) in &snapshot.standbys {
            d.replication_lag
                .get_or_create(&Standby {
                    application: application.clone(),
                })
                .set(*lag);
        }
    }

    pub fn set_keys(&self, keys: &[crate::keys::KeyStatus]) {
        self.key_created.clear();
        self.key_max_age.clear();
        for k in keys {
            let label = Key { key: k.key.clone() };
            if let Some(made) = k.created_at {
                self.key_created.get_or_create(&label).set(made);
            }
            if let Some(max) = k.max_age() {
                self.key_max_age.get_or_create(&label).set(max);
            }
        }
    }

    /// One answered request; `route` is the route template, never the raw
    /// path (ids in paths would make unbounded series).
    pub fn observe_request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let (method, route) = (method.to_string(), route.to_string());
        self.latency
            .get_or_create(&Route {
                method: method.clone(),
                route: route.clone(),
            })
            .observe(elapsed.as_secs_f64());
        self.requests
            .get_or_create(&Request {
                method,
                route,
                status,
            })
            .inc();
    }

    /// Any answered request, routed or not (404s and 405s included).
    pub fn observe_response(&self, status: u16) {
        let class = CLASSES[usize::from(status / 100).clamp(1, 5) - 1];
        self.responses.get_or_create(&Class { class }).inc();
    }

    pub fn connection_opened(&self) -> OpenConnection<'_> {
        self.connections_open.inc();
        OpenConnection(self)
    }

    /// A connection closed at once; `cap` is the setting that was reached.
    pub fn connection_refused(&self, cap: &str) {
        let cap = match cap {
            "max_connections" => "max_connections",
            _ => "max_connections_per_client",
        };
        self.refused.get_or_create(&Cap { cap }).inc();
    }

    /// A connection closed to make room for a new one (`edge::slots`).
    pub fn connection_evicted(&self) {
        self.evicted.inc();
    }

    /// The level of the last security report and the configured minimum,
    /// 1 (reduced) to 4 (maximum).
    pub fn set_security_level(&self, measured: u64, minimum: u64) {
        self.security_level.set(measured);
        self.security_minimum.set(minimum);
    }

    pub fn set_backup_enabled(&self, enabled: bool) {
        self.backup_enabled.set(u64::from(enabled));
    }

    /// What the backup schedule last saw.
    pub fn set_backup_status(
        &self,
        last_backup: Option<u64>,
        last_archived: Option<u64>,
        failing: bool,
    ) {
        self.backup_last_success.set(last_backup.unwrap_or(0));
        self.wal_archived_last.set(last_archived.unwrap_or(0));
        self.wal_archive_failing.set(u64::from(failing));
    }

    pub fn rotation_completed(&self) {
        self.rotations.inc();
    }

    pub fn postgres_restarted(&self) {
        self.postgres_restarts.inc();
    }

    /// The exposition text.
    pub fn render(&self, gauges: &Gauges) -> String {
        self.pool_max.set(gauges.pool_max as u64);
        self.pool_open.set(gauges.pool_open as u64);
        self.pool_idle.set(gauges.pool_idle as u64);
        self.pool_waiting.set(gauges.pool_waiting as u64);
        self.postgres_up.set(u64::from(gauges.postgres_up));
        let mut out = String::new();
        // Writing into a String fails only if an encoder does, which
        // none of these does.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// The `process_*` figures, read at each scrape.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        fn one(
            encoder: &mut DescriptorEncoder,
            name: &str,
            help: &str,
            metric: impl EncodeMetric,
        ) -> Result<(), std::fmt::Error> {
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
        }
        let process = Process::read();
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                process.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                process.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Open file descriptors.",
                process.open_fds,
            ),
            (
                "process_max_fds",
                "The open-file limit (RLIMIT_NOFILE, soft).",
                process.max_fds,
            ),
            ("process_threads", "OS threads.", process.threads),
        ] {
            if let Some(value) = value {
                one(&mut encoder, name, help, ConstGauge::new(value))?;
            }
        }
        if let Some(cpu) = process.cpu_seconds {
            // The counter's name without `_total`, which the encoder adds.
            one(
                &mut encoder,
                "process_cpu_seconds",
                "User and system CPU time, seconds.",
                ConstCounter::new(cpu),
            )?;
        }
        if let Some(start) = process.start_time_seconds {
            one(
                &mut encoder,
                "process_start_time_seconds",
                "Start time since the epoch, seconds.",
                ConstGauge::new(start),
            )?;
        }
        Ok(())
    }
}

/// This process's figures: from `/proc/self` on Linux; elsewhere only the
/// open-file limit.
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
        let max_fds = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .ok()
            .map(|(soft, _)| soft);
        Process {
            max_fds,
            ..Process::of_proc()
        }
    }

    #[cfg(target_os = "linux")]
    fn of_proc() -> Process {
        let Ok(me) = procfs::process::Process::myself() else {
            return Process::default();
        };
        let mut p = Process {
            open_fds: me.fd_count().ok().map(|n| n as u64),
            ..Process::default()
        };
        if let Ok(stat) = me.stat() {
            let ticks = procfs::ticks_per_second() as f64;
            p.cpu_seconds = Some((stat.utime + stat.stime) as f64 / ticks);
            p.threads = u64::try_from(stat.num_threads).ok();
            p.virtual_bytes = Some(stat.vsize);
            p.resident_bytes = Some(stat.rss * procfs::page_size());
            p.start_time_seconds = procfs::boot_time_secs()
                .ok()
                .map(|boot| boot + (stat.starttime as f64 / ticks) as u64);
        }
        p
    }

    #[cfg(not(target_os = "linux"))]
    fn of_proc() -> Process {
        Process::default()
    }
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
        ]
        .into_iter()
        // Off Linux only the open-file limit is known.
        .filter(|n| {
            cfg!(target_os = "linux") || !n.starts_with("process_") || *n == "process_max_fds "
        }) {
            assert!(
                text.lines().any(|l| l.starts_with(name)),
                "missing {name}\n{text}"
            );
        }
        if !cfg!(target_os = "linux") {
            return;
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

    #[test]
    fn every_family_keeps_its_name_and_type() {
        // What contrib/ (the dashboard, the alert rules) and operators'
        // queries rely on, in the order exposed; the process figures are
        // Linux's. (A family with no series yet, the HTTP ones before the
        // first request, is left out whole.)
        let metrics = Metrics::default();
        metrics.observe_request("GET", "/health", 200, Duration::from_millis(1));
        let text = metrics.render(&Gauges {
            pool_max: 1,
            pool_open: 0,
            pool_idle: 0,
            pool_waiting: 0,
            postgres_up: false,
        });
        let types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        let expected = [
            "keepd_http_requests_total counter",
            "keepd_http_request_duration_seconds histogram",
            "keepd_http_responses_total counter",
            "keepd_http_connections_refused_total counter",
            "keepd_http_connections_evicted_total counter",
            "keepd_build_info gauge",
            "keepd_db_oldest_transaction_seconds gauge",
            "keepd_db_xid_age gauge",
            "keepd_db_wal_bytes gauge",
            "keepd_pool_max_connections gauge",
            "keepd_pool_open_connections gauge",
            "keepd_pool_idle_connections gauge",
            "keepd_pool_waiting_requests gauge",
            "keepd_postgres_up gauge",
            "keepd_credential_rotations_total counter",
            "keepd_postgres_restarts_total counter",
            "keepd_http_connections_open gauge",
            "keepd_security_level gauge",
            "keepd_security_minimum_level gauge",
            "keepd_backup_enabled gauge",
            "keepd_backup_last_success_timestamp_seconds gauge",
            "keepd_wal_archive_last_success_timestamp_seconds gauge",
            "keepd_wal_archive_failing gauge",
            "process_resident_memory_bytes gauge",
            "process_virtual_memory_bytes gauge",
            "process_open_fds gauge",
            "process_max_fds gauge",
            "process_threads gauge",
            "process_cpu_seconds_total counter",
            "process_start_time_seconds gauge",
        ];
        let expected: Vec<&str> = expected
            .into_iter()
            .filter(|t| {
                cfg!(target_os = "linux")
                    || !t.starts_with("process_")
                    || t.starts_with("process_max_fds")
            })
            .collect();
        assert_eq!(types, expected);
        // A counter's samples carry the family's name as is (no second
        // `_total`), and every help ends with one full stop.
        assert!(
            text.contains("\nkeepd_credential_rotations_total 0\n"),
            "{text}"
        );
        assert!(
            !text.contains("_total_total") && !text.contains(".."),
            "{text}"
        );
    }
}
