//! Validation, one function per section: each says which key is wrong,
//! the bad value, and what is allowed.

use std::time::Duration;

use super::*;

/// One setting that cannot work as written.
pub(super) struct Invalid {
    pub key: &'static str,
    pub value: String,
    pub allowed: String,
}

fn invalid(key: &'static str, value: String, allowed: String) -> Invalid {
    Invalid {
        key,
        value,
        allowed,
    }
}

pub(super) fn node(node: &NodeConfig) -> Result<(), Invalid> {
    if node.state_dir == node.runtime_dir {
        return Err(invalid(
            "node.runtime_dir",
            node.runtime_dir.display().to_string(),
            "a directory other than node.state_dir".into(),
        ));
    }
    if let (Some(_), Some(credential)) = (&node.identity.passphrase_file, &node.identity.credential)
    {
        return Err(invalid(
            "node.identity.credential",
            credential.display().to_string(),
            "unset while node.identity.passphrase_file is set: the key is kept one way".into(),
        ));
    }
    Ok(())
}

pub(super) fn log(log: &LogConfig) -> Result<(), Invalid> {
    // A bare word that is not a level is a target to tracing's filter
    // (`verbose` would silence everything else): only levels, and
    // `target=level` directives, are taken.
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let is_level = |word: &str| LEVELS.contains(&word.trim().to_ascii_lowercase().as_str());
    let directives_ok = !log.level.trim().is_empty()
        && log
            .level
            .split(',')
            .all(|directive| match directive.rsplit_once('=') {
                Some((target, level)) => !target.trim().is_empty() && is_level(level),
                None => is_level(directive),
            });
    let parses = tracing_subscriber::EnvFilter::try_new(&log.level).is_ok();
    if !(directives_ok && parses) {
        return Err(invalid(
            "log.level",
            format!("{:?}", log.level),
            "one of off, error, warn, info, debug, trace, or directives like \
             `keepd=debug,warn` (target=level, separated by commas)"
                .into(),
        ));
    }
    Ok(())
}

pub(super) fn credentials(creds: &CredentialsConfig) -> Result<(), Invalid> {
    if creds.password_length < MIN_PASSWORD_LENGTH {
        return Err(invalid(
            "credentials.password_length",
            creds.password_length.to_string(),
            format!("at least {MIN_PASSWORD_LENGTH} (64 recommended)"),
        ));
    }
    if creds.password_length > 1024 {
        return Err(invalid(
            "credentials.password_length",
            creds.password_length.to_string(),
            "at most 1024".into(),
        ));
    }
    if creds.rotation_interval.get() < Duration::from_secs(60) {
        return Err(invalid(
            "credentials.rotation_interval",
            creds.rotation_interval.to_string(),
            "at least 1m".into(),
        ));
    }
    if creds.superuser_rotation_interval.get() < Duration::from_secs(60) {
        return Err(invalid(
            "credentials.superuser_rotation_interval",
            creds.superuser_rotation_interval.to_string(),
            "at least 1m".into(),
        ));
    }
    if creds.rotation_grace_period >= creds.rotation_interval {
        return Err(invalid(
            "credentials.rotation_grace_period",
            creds.rotation_grace_period.to_string(),
            format!(
                "shorter than credentials.rotation_interval ({})",
                creds.rotation_interval
            ),
        ));
    }
    Ok(())
}

/// Parameters keepd sets itself and the report checks: passing one through
/// `database.postgres.settings` could only weaken them.
const KEEPD_OWNS: &[&str] = &[
    "listen_addresses",
    "port",
    "unix_socket_directories",
    "unix_socket_permissions",
    "unix_socket_group",
    "max_connections",
    "superuser_reserved_connections",
    "authentication_timeout",
    "password_encryption",
    "row_security",
    "fsync",
    "full_page_writes",
    "synchronous_commit",
    "shared_preload_libraries",
    "session_preload_libraries",
    "local_preload_libraries",
    "dynamic_library_path",
    "max_wal_senders",
    "wal_level",
    "jit",
    "archive_mode",
    "archive_command",
    "archive_library",
    "archive_timeout",
    "restore_command",
    "hba_file",
    "ident_file",
    "config_file",
    "data_directory",
    "external_pid_file",
    "timezone",
];
/// Families of them: TLS, logging (and so auditing), the loaded
/// extensions' own.
const KEEPD_OWNS_PREFIXES: &[&str] = &[
    "ssl",
    "log_",
    "logging_",
    "syslog_",
    "event_source",
    "pgaudit.",
    "auth_delay.",
    "pg_stat_statements.",
];

/// The `database.postgres.settings` names keepd refuses, each named.
fn refused_settings(pg: &crate::config::PostgresConfig) -> Vec<String> {
    pg.settings
        .keys()
        .filter(|name| {
            let well_formed = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.');
            !well_formed
                || KEEPD_OWNS.contains(&name.as_str())
                || KEEPD_OWNS_PREFIXES.iter().any(|p| name.starts_with(p))
        })
        .cloned()
        .collect()
}

pub(super) fn database(database: &DatabaseConfig) -> Result<(), Invalid> {
    let pg = &database.postgres;
    let pool = &database.pool;
    let refused = refused_settings(pg);
    if !refused.is_empty() {
        return Err(invalid(
            "database.postgres.settings",
            refused.join(", "),
            "parameters keepd does not set itself: these it sets (connections, TLS, \
             authentication, logging and auditing, preloaded libraries, durability, archiving), \
             and the report checks them"
                .into(),
        ));
    }
    if let Some((name, value)) = pg
        .settings
        .iter()
        .find(|(_, v)| v.to_string().contains(['\n', '\r', '\0']))
    {
        return Err(invalid(
            "database.postgres.settings",
            format!("{name}: {value:?}"),
            "a value on one line".into(),
        ));
    }
    if pg.provider == Provider::External && (pg.memory_mb.is_some() || !pg.settings.is_empty()) {
        return Err(invalid(
            "database.postgres.settings",
            "set with provider: external".into(),
            "nothing: an external server's configuration (memory_mb, settings) is its \
             operator's, set on the server"
                .into(),
        ));
    }
    if pg.memory_mb.is_some_and(|mb| mb < 256) {
        return Err(invalid(
            "database.postgres.memory_mb",
            pg.memory_mb.unwrap_or_default().to_string(),
            "256 or more (MiB)".into(),
        ));
    }
    match (pg.managed, pg.provider) {
        (Some(false), Provider::Native | Provider::Docker) => {
            return Err(invalid(
                "database.postgres.managed",
                "false".into(),
                "true or unset: keepd runs native and docker servers itself; for a server it \
                 does not run, set provider: external"
                    .into(),
            ));
        }
        (Some(true), Provider::External) => {
            return Err(invalid(
                "database.postgres.managed",
                "true".into(),
                "false or unset: keepd does not run an external server (provider: external), \
                 it only manages its roles and schema there"
                    .into(),
            ));
        }
        _ => {}
    }
    if !(5..=10_000).contains(&pg.max_connections) {
        return Err(invalid(
            "database.postgres.max_connections",
            pg.max_connections.to_string(),
            "5 to 10000".into(),
        ));
    }
    if pool.max_size == 0 || pool.max_size + 5 > pg.max_connections {
        return Err(invalid(
            "database.pool.max_size",
            pool.max_size.to_string(),
            format!(
                "1 to database.postgres.max_connections - 5 ({}), leaving room for \
                 rotation and administration",
                pg.max_connections.saturating_sub(5)
            ),
        ));
    }
    if pool.acquire_timeout.get() < Duration::from_millis(100) {
        return Err(invalid(
            "database.pool.acquire_timeout",
            pool.acquire_timeout.to_string(),
            "at least 100ms".into(),
        ));
    }
    if let Some(v) = pg.version
        && !(13..=99).contains(&v)
    {
        return Err(invalid(
            "database.postgres.version",
            v.to_string(),
            "a PostgreSQL major version of 13 or later, e.g. 15".into(),
        ));
    }
    if !is_os_user_name(&pg.native.run_as) {
        return Err(invalid(
            "database.postgres.native.run_as",
            format!("{:?}", pg.native.run_as),
            "a user name of lowercase letters, digits, `-` and `_`, starting with a letter".into(),
        ));
    }
    if pg.docker.image.trim().is_empty() || pg.docker.image.chars().any(char::is_whitespace) {
        return Err(invalid(
            "database.postgres.docker.image",
            format!("{:?}", pg.docker.image),
            "an image reference such as postgres:15 or registry.example/postgres:15".into(),
        ));
    }
    if pg.docker.memory_mb < 128 {
        return Err(invalid(
            "database.postgres.docker.memory_mb",
            pg.docker.memory_mb.to_string(),
            "at least 128 (MiB)".into(),
        ));
    }
    if pg.docker.pids_limit < 32 {
        return Err(invalid(
            "database.postgres.docker.pids_limit",
            pg.docker.pids_limit.to_string(),
            "at least 32 (Postgres forks a process per connection)".into(),
        ));
    }
    if let Some(retention) = pg.log_retention {
        if pg.provider != Provider::Native {
            return Err(invalid(
                "database.postgres.log_retention",
                retention.to_string(),
                "unset with this provider: it applies to the native provider only (docker keeps \
                 seven days, a file per weekday; an external server's logs are its own)"
                    .into(),
            ));
        }
        if retention.get() < Duration::from_secs(86_400) {
            return Err(invalid(
                "database.postgres.log_retention",
                retention.to_string(),
                "at least 1d (Postgres starts a new file each day)".into(),
            ));
        }
    }
    for (key, timeout) in [
        (
            "database.postgres.native.start_timeout",
            pg.native.start_timeout,
        ),
        (
            "database.postgres.docker.start_timeout",
            pg.docker.start_timeout,
        ),
        (
            "database.postgres.external.start_timeout",
            pg.external.start_timeout,
        ),
    ] {
        if timeout.get() < Duration::from_secs(1) {
            return Err(invalid(key, timeout.to_string(), "at least 1s".into()));
        }
    }
    if pg.provider == Provider::External {
        let ext = &pg.external;
        if ext.host.is_none() && ext.hosts.is_empty() {
            return Err(invalid(
                "database.postgres.external.host",
                "(unset)".into(),
                "the host name of the external server (or `hosts`, several host:port), \
                 required with provider: external"
                    .into(),
            ));
        }
        if ext.host.is_some() && !ext.hosts.is_empty() {
            return Err(invalid(
                "database.postgres.external.hosts",
                ext.hosts.join(", "),
                "either `host` and `port` or `hosts`, not both".into(),
            ));
        }
        if let Some(bad) = ext
            .hosts
            .iter()
            .find(|h| super::parse_host_port(h).is_none())
        {
            return Err(invalid(
                "database.postgres.external.hosts",
                bad.clone(),
                "host:port entries, e.g. db1.internal:5432 or [2001:db8::1]:5432".into(),
            ));
        }
        if ext.database != DATABASE_NAME {
            return Err(invalid(
                "database.postgres.external.database",
                ext.database.clone(),
                format!("{DATABASE_NAME} (keepd's schema and grants name its database)"),
            ));
        }
        if ext.admin_password_file.is_some() == ext.admin_password_env.is_some() {
            return Err(invalid(
                "database.postgres.external.admin_password_file",
                format!(
                    "{:?} with admin_password_env {:?}",
                    ext.admin_password_file, ext.admin_password_env
                ),
                "exactly one of admin_password_file and admin_password_env".into(),
            ));
        }
        if ext.sslmode == ExternalSslMode::VerifyFull && ext.ca_file.is_none() {
            return Err(invalid(
                "database.postgres.external.ca_file",
                "(unset)".into(),
                "the CA certificate (PEM) that signed the server's, required with \
                 sslmode: verify-full"
                    .into(),
            ));
        }
    }
    Ok(())
}

pub(super) fn audit(audit: &AuditConfig) -> Result<(), Invalid> {
    match audit.retention {
        Some(keep) if keep.get() < Duration::from_secs(1) => Err(invalid(
            "audit.retention",
            keep.to_string(),
            "at least 1s, or unset to keep the whole chain".into(),
        )),
        _ => Ok(()),
    }
}

pub(super) fn security(security: &SecurityConfig) -> Result<(), Invalid> {
    if security.remeasure_interval.get() < Duration::from_secs(1) {
        return Err(invalid(
            "security.remeasure_interval",
            security.remeasure_interval.to_string(),
            "1s or longer (the default is 5m)".into(),
        ));
    }
    Ok(())
}

pub(super) fn encryption_at_rest(at_rest: &EncryptionAtRestConfig) -> Result<(), Invalid> {
    if at_rest.application.key_version == 0 {
        return Err(invalid(
            "encryption_at_rest.application.key_version",
            "0".into(),
            "1 or more".into(),
        ));
    }
    // Rotation is checked once a second at most; a key renewed faster
    // than its values can be moved would never settle.
    if at_rest.application.rotate_after.get() < Duration::from_secs(1) {
        return Err(invalid(
            "encryption_at_rest.application.rotate_after",
            at_rest.application.rotate_after.to_string(),
            "1s or longer (the default is 90d)".into(),
        ));
    }
    if at_rest.application.rotate_after_uses == 0 {
        return Err(invalid(
            "encryption_at_rest.application.rotate_after_uses",
            "0".into(),
            "1 or more (the default is 1000000)".into(),
        ));
    }
    let shamir = &at_rest.recovery.shamir;
    if shamir.threshold < 2 || shamir.threshold > shamir.total_shares {
        return Err(invalid(
            "encryption_at_rest.recovery.shamir.threshold",
            shamir.threshold.to_string(),
            format!(
                "from 2 to total_shares ({}); one share alone must not recover the key",
                shamir.total_shares
            ),
        ));
    }
    if !shamir.shareholder_ids.is_empty()
        && shamir.shareholder_ids.len() != usize::from(shamir.total_shares)
    {
        return Err(invalid(
            "encryption_at_rest.recovery.shamir.shareholder_ids",
            format!("{} names", shamir.shareholder_ids.len()),
            format!(
                "none, or exactly total_shares ({}) names",
                shamir.total_shares
            ),
        ));
    }
    Ok(())
}

pub(super) fn backup(backup: &BackupConfig, provider: Provider) -> Result<(), Invalid> {
    let key = match (&backup.repository, &backup.s3) {
        (None, None) => return Ok(()),
        (Some(_), Some(_)) => {
            return Err(invalid(
                "backup.s3",
                "set".into(),
                "one repository: backup.repository (a directory) or backup.s3, not both".into(),
            ));
        }
        (Some(_), None) => "backup.repository",
        (None, Some(_)) => "backup.s3",
    };
    if provider == Provider::External {
        return Err(invalid(
            key,
            "set".into(),
            "unset with provider: external: backing up an external server is its cluster's \
             job (pgBackRest or Barman beside Patroni, CloudNativePG's backups)"
                .into(),
        ));
    }
    if let Some(s3) = &backup.s3 {
        if provider == Provider::Docker {
            return Err(invalid(
                "backup.s3",
                "set".into(),
                "unset with provider: docker: its container has no route out (no network, or an \
                 internal one), so no bucket is reachable; use backup.repository (a directory, \
                 which may be a mounted remote filesystem)"
                    .into(),
            ));
        }
        s3_repository(s3)?;
    }
    if backup.retention_full == 0 {
        return Err(invalid(
            "backup.retention_full",
            "0".into(),
            "1 or more full backups to keep".into(),
        ));
    }
    if backup.diff_interval.get() > backup.full_interval.get() {
        return Err(invalid(
            "backup.diff_interval",
            backup.diff_interval.to_string(),
            format!(
                "at most backup.full_interval ({}): differentials fall between full backups",
                backup.full_interval
            ),
        ));
    }
    for (key, interval) in [
        ("backup.full_interval", backup.full_interval),
        ("backup.diff_interval", backup.diff_interval),
    ] {
        if interval.get() < Duration::from_secs(60) {
            return Err(invalid(key, interval.to_string(), "at least 1m".into()));
        }
    }
    Ok(())
}

/// The S3 repository's names reach pgBackRest's configuration file
/// unquoted: plain characters only.
fn s3_repository(s3: &S3Config) -> Result<(), Invalid> {
    let plain = |text: &str, extra: &str| {
        !text.is_empty()
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
    };
    if s3.endpoint.contains("://") {
        return Err(invalid(
            "backup.s3.endpoint",
            s3.endpoint.clone(),
            "a host name, with :port if not 443, without a scheme (always HTTPS)".into(),
        ));
    }
    let (host, _) = s3.host_port();
    let port_ok = match s3.endpoint.rsplit_once(':') {
        Some((_, port)) => port.parse::<u16>().is_ok_and(|p| p > 0),
        None => true,
    };
    if !plain(host, ".-") || !port_ok {
        return Err(invalid(
            "backup.s3.endpoint",
            s3.endpoint.clone(),
            "a host name of letters, digits, dots and dashes, with an optional :port".into(),
        ));
    }
    if !plain(&s3.bucket, ".-") {
        return Err(invalid(
            "backup.s3.bucket",
            s3.bucket.clone(),
            "a bucket name (letters, digits, dots and dashes)".into(),
        ));
    }
    if !plain(&s3.region, "-") {
        return Err(invalid(
            "backup.s3.region",
            s3.region.clone(),
            "a region such as eu-central-1 (letters, digits and dashes)".into(),
        ));
    }
    if !s3.path.starts_with('/') || !plain(&s3.path, "/._-") {
        return Err(invalid(
            "backup.s3.path",
            s3.path.clone(),
            "an absolute path in the bucket of letters, digits and / . _ -".into(),
        ));
    }
    Ok(())
}

pub(super) fn quotas(quotas: &QuotasConfig) -> Result<(), Invalid> {
    let retention = quotas.revoked_device_retention;
    if !(Duration::from_secs(1)..=Duration::from_secs(365 * 86_400)).contains(&retention.get()) {
        return Err(invalid(
            "api.quotas.revoked_device_retention",
            retention.to_string(),
            "1s to 365d (a revoked device counts against api.quotas.devices until then)".into(),
        ));
    }
    Ok(())
}

pub(super) fn api(api: &ApiConfig) -> Result<(), Invalid> {
    api_events(api)?;
    api_bodies(api)?;
    api_limits_and_connections(api)
}

/// `api.events`: the streams' caps, idle life and heartbeat.
fn api_events(api: &ApiConfig) -> Result<(), Invalid> {
    let events = &api.events;
    if events.max_streams == 0 {
        return Err(invalid(
            "api.events.max_streams",
            "0".into(),
            "1 or more streams".into(),
        ));
    }
    if !(1..=events.max_streams).contains(&events.max_streams_per_account) {
        return Err(invalid(
            "api.events.max_streams_per_account",
            events.max_streams_per_account.to_string(),
            format!("1 to api.events.max_streams ({})", events.max_streams),
        ));
    }
    if !(1..=events.max_streams).contains(&events.max_streams_per_client) {
        return Err(invalid(
            "api.events.max_streams_per_client",
            events.max_streams_per_client.to_string(),
            format!("1 to api.events.max_streams ({})", events.max_streams),
        ));
    }
    if events.max_idle.get() < Duration::from_secs(60) {
        return Err(invalid(
            "api.events.max_idle",
            events.max_idle.to_string(),
            "at least 1m".into(),
        ));
    }
    let heartbeat = events.heartbeat.get();
    if heartbeat < Duration::from_secs(1) || heartbeat * 2 > api.idle_timeout.get() {
        return Err(invalid(
            "api.events.heartbeat",
            events.heartbeat.to_string(),
            format!(
                "1s to half of api.idle_timeout ({}), so an idle stream is never closed",
                api.idle_timeout
            ),
        ));
    }
    Ok(())
}

/// What one request may carry and how long it may take.
fn api_bodies(api: &ApiConfig) -> Result<(), Invalid> {
    if !(Duration::from_secs(1)..=Duration::from_secs(30 * 86_400))
        .contains(&api.idempotency_ttl.get())
    {
        return Err(invalid(
            "api.idempotency_ttl",
            api.idempotency_ttl.to_string(),
            "1s to 30d".into(),
        ));
    }
    if !(1024..=1024 * 1024 * 1024).contains(&api.max_body_bytes) {
        return Err(invalid(
            "api.max_body_bytes",
            api.max_body_bytes.to_string(),
            "1024 to 1073741824 (1 GiB)".into(),
        ));
    }
    // An entry larger than api.max_body_bytes is refused by that bound
    // first; no need to make operators lower both.
    if !(1..=1024 * 1024 * 1024).contains(&api.max_entry_bytes) {
        return Err(invalid(
            "api.max_entry_bytes",
            api.max_entry_bytes.to_string(),
            "1 to 1073741824 (1 GiB)".into(),
        ));
    }
    if !(64 * 1024..=1024 * 1024 * 1024).contains(&api.max_pull_bytes) {
        return Err(invalid(
            "api.max_pull_bytes",
            api.max_pull_bytes.to_string(),
            "65536 (64 KiB) to 1073741824 (1 GiB)".into(),
        ));
    }
    if !(1..=100_000).contains(&api.max_push_entries) {
        return Err(invalid(
            "api.max_push_entries",
            api.max_push_entries.to_string(),
            "1 to 100000".into(),
        ));
    }
    if api.request_timeout.get() < Duration::from_secs(1) {
        return Err(invalid(
            "api.request_timeout",
            api.request_timeout.to_string(),
            "at least 1s".into(),
        ));
    }
    Ok(())
}

/// Rate limits, timeouts, connections, clients, response budgets, CORS,
/// the metrics listener and tokens.
fn api_limits_and_connections(api: &ApiConfig) -> Result<(), Invalid> {
    let limits = &api.rate_limits;
    for (key, value, meaning) in [
        (
            "api.rate_limits.auth_per_minute",
            limits.auth_per_minute,
            "attempts per client address per minute",
        ),
        (
            "api.rate_limits.account_per_second",
            limits.account_per_second,
            "requests per account per second",
        ),
        (
            "api.rate_limits.account_burst",
            limits.account_burst,
            "requests an account may send at once",
        ),
        (
            "api.rate_limits.address_per_second",
            limits.address_per_second,
            "requests per client address per second",
        ),
        (
            "api.rate_limits.address_burst",
            limits.address_burst,
            "requests an address may send at once",
        ),
    ] {
        if value == 0 {
            return Err(invalid(key, "0".into(), format!("at least 1 ({meaning})")));
        }
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(86_400))
        .contains(&limits.login_delay_max.get())
    {
        return Err(invalid(
            "api.rate_limits.login_delay_max",
            limits.login_delay_max.to_string(),
            "1s to 24h".into(),
        ));
    }
    for (key, value) in [
        ("api.header_timeout", api.header_timeout),
        ("api.idle_timeout", api.idle_timeout),
        ("api.body_timeout", api.body_timeout),
    ] {
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&value.get()) {
            return Err(invalid(key, value.to_string(), "1s to 1h".into()));
        }
    }
    if !(16..=1_000_000).contains(&api.max_connections) {
        return Err(invalid(
            "api.max_connections",
            api.max_connections.to_string(),
            "16 to 1000000 (and below the process's open-file limit)".into(),
        ));
    }
    if !(1..=api.max_connections).contains(&api.max_connections_per_client) {
        return Err(invalid(
            "api.max_connections_per_client",
            api.max_connections_per_client.to_string(),
            format!("1 to api.max_connections ({})", api.max_connections),
        ));
    }
    if !(8..=32).contains(&api.client_prefix_v4) {
        return Err(invalid(
            "api.client_prefix_v4",
            api.client_prefix_v4.to_string(),
            "a prefix length of 8 to 32 (32: each address is a client)".into(),
        ));
    }
    if !(16..=128).contains(&api.client_prefix_v6) {
        return Err(invalid(
            "api.client_prefix_v6",
            api.client_prefix_v6.to_string(),
            "a prefix length of 16 to 128 (64: a subscriber's /64 is one client)".into(),
        ));
    }
    for (key, value) in [
        ("api.max_response_bytes", api.max_response_bytes),
        (
            "api.max_response_bytes_per_client",
            api.max_response_bytes_per_client,
        ),
        (
            "api.max_response_bytes_per_connection",
            api.max_response_bytes_per_connection,
        ),
    ] {
        if value < api.max_pull_bytes {
            return Err(invalid(
                key,
                value.to_string(),
                format!(
                    "at least api.max_pull_bytes ({}), or no full pull could ever be answered",
                    api.max_pull_bytes
                ),
            ));
        }
    }
    for origin in &api.cors_origins {
        if let Some(problem) = origin_problem(origin) {
            return Err(invalid(
                "api.cors_origins",
                format!("{origin:?}"),
                problem.into(),
            ));
        }
    }
    if let Some(metrics) = api.metrics_listen
        && metrics.port() != 0
        && metrics == api.listen
    {
        return Err(invalid(
            "api.metrics_listen",
            metrics.to_string(),
            "an address other than api.listen (metrics are never on the public listener)".into(),
        ));
    }
    if api.jwt_ttl.get() < Duration::from_secs(60) {
        return Err(invalid(
            "api.jwt_ttl",
            api.jwt_ttl.to_string(),
            "at least 1m".into(),
        ));
    }
    Ok(())
}

/// Why `origin` is not a CORS origin as browsers send it, if it is not.
fn origin_problem(origin: &str) -> Option<&'static str> {
    if origin == "*" || origin.contains('*') {
        return Some("name each origin exactly; keepd never allows a wildcard");
    }
    let Some((scheme, authority)) = origin.split_once("://") else {
        return Some("an origin is scheme://host[:port], e.g. https://app.example.org");
    };
    if !matches!(scheme, "http" | "https") {
        return Some("the scheme is http or https");
    }
    if authority.is_empty() {
        return Some("an origin names a host");
    }
    if authority.contains(['/', '?', '#']) {
        return Some("an origin has no path, query or trailing slash: scheme://host[:port] only");
    }
    if authority.contains('@')
        || authority
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Some("an origin has no user information or spaces");
    }
    if authority.chars().any(|c| c.is_ascii_uppercase()) {
        return Some("browsers send origins in lower case; write it so");
    }
    None
}

fn is_os_user_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && name.len() <= 32
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}
