//! Hardened Postgres configuration as a pure function of keepd's config.
//!
//! Nothing here touches the file system: `keepd render` writes the result
//! out, the provisioners install it. The settings follow `004_*` and the CIS
//! PostgreSQL benchmark where they apply to the chosen mode.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::tuning::Tuning;
use super::{AUDITOR_ROLE, DATABASE, GROUP_ROLES, OWNER_ROLE, SUPERUSER};
use crate::config::{Config, Layout, LogStatement, Provider, Topology, container};
use crate::repository::{
    self, BackupInputs, NotPlain, PGBACKREST, PGBACKREST_CONF, STANZA, plain_path,
};

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(
        "`{key}` = {value:?} cannot be written into postgresql.conf: {reason}; choose another value"
    )]
    Unquotable {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error(
        "the Postgres socket path {path} is {len} bytes, over the {max}-byte limit of Unix sockets; \
         choose a shorter node.runtime_dir"
    )]
    SocketPathTooLong {
        path: PathBuf,
        len: usize,
        max: usize,
    },
}

impl From<NotPlain> for RenderError {
    fn from(e: NotPlain) -> RenderError {
        RenderError::Unquotable {
            key: e.key,
            value: e.value,
            reason: e.reason,
        }
    }
}

/// One bootstrap script of the `initdb/` directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitdbScript {
    pub name: &'static str,
    pub sql: String,
}

/// Every file keepd installs into a Postgres data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedConfig {
    pub postgresql_conf: String,
    pub pg_hba_conf: String,
    pub pg_ident_conf: String,
    /// With `backup.repository`: pgBackRest's configuration (no secret in
    /// it; the repository passphrase reaches pgBackRest through its
    /// environment).
    pub pgbackrest_conf: Option<String>,
    pub initdb: Vec<InitdbScript>,
}

impl RenderedConfig {
    /// A short fingerprint of everything rendered: a changed configuration
    /// changes it, so a provisioner can tell when to re-apply.
    pub fn fingerprint(&self) -> String {
        let mut hash = Sha256::new();
        for part in [
            &self.postgresql_conf,
            &self.pg_hba_conf,
            &self.pg_ident_conf,
            self.pgbackrest_conf.as_deref().unwrap_or_default(),
        ] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        for script in &self.initdb {
            hash.update(script.name.as_bytes());
            hash.update(script.sql.as_bytes());
            hash.update([0]);
        }
        hex::encode(&hash.finalize()[..8])
    }

    /// The three files Postgres reads, by name: what every provider
    /// installs.
    pub fn server_files(&self) -> [(&'static str, &str); 3] {
        [
            ("postgresql.conf", self.postgresql_conf.as_str()),
            ("pg_hba.conf", self.pg_hba_conf.as_str()),
            ("pg_ident.conf", self.pg_ident_conf.as_str()),
        ]
    }

    /// The files with their relative paths, as `keepd render` writes them.
    pub fn files(&self) -> Vec<(String, &str)> {
        let mut files: Vec<(String, &str)> = self
            .server_files()
            .into_iter()
            .map(|(name, text)| (name.to_string(), text))
            .collect();
        if let Some(conf) = &self.pgbackrest_conf {
            files.push((PGBACKREST_CONF.into(), conf));
        }
        for script in &self.initdb {
            files.push((format!("initdb/{}", script.name), script.sql.as_str()));
        }
        files
    }
}

/// Where Postgres puts its Unix socket for this configuration.
pub fn socket_dir(config: &Config) -> PathBuf {
    match config.database.postgres.provider {
        Provider::Docker => PathBuf::from(container::SOCKET),
        Provider::Native | Provider::External => Layout::of(config).socket_dir(),
    }
}

/// Where Postgres writes its log files for this configuration: outside
/// the data directory for every provider (for external, the rendered file
/// names Debian's log directory for the operator who applies it).
pub fn log_dir(config: &Config) -> PathBuf {
    match config.database.postgres.provider {
        Provider::Docker => PathBuf::from(container::LOG),
        Provider::Native => Layout::of(config).postgres_log_dir(),
        Provider::External => PathBuf::from("/var/log/postgresql"),
    }
}

/// The largest `sun_path` Linux accepts, less its terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// What the renderer reads, and nothing more: the topology and the few
/// settings that reach Postgres's files, resolved once from `Config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderInputs {
    pub topology: Topology,
    /// Where Postgres puts its Unix socket (inside the container for
    /// docker).
    pub socket_dir: PathBuf,
    /// Where Postgres writes its log, outside its data directory.
    pub log_dir: PathBuf,
    pub bind_address: IpAddr,
    pub port: u16,
    pub max_connections: u32,
    pub log_statement: LogStatement,
    /// TCP mode: every login must present a client certificate.
    pub client_cert_required: bool,
    /// Continuous archiving and backups (`backup.repository`).
    pub backup: Option<BackupInputs>,
    /// pgAudit is preloaded: the provider found its library beside the
    /// server it runs (a missing one is the report's finding, not a
    /// server that cannot start).
    pub pgaudit: bool,
    /// Memory settings sized for the server (`database.postgres.memory_mb`,
    /// the container's limit, or what the native provider measured).
    pub tuning: Option<Tuning>,
    /// `database.postgres.settings`, already refused where they would
    /// weaken keepd's own (config validation).
    pub settings: Vec<(String, String)>,
}

/// What pgAudit logs of keepd's own sessions: its superuser's (asked for
/// at connect) and its pool's login roles' (their role setting).
pub const PGAUDIT_SESSION_CLASSES: &str = "role,ddl";
/// What it logs of every other session (server-wide, and the superuser's
/// role setting for an operator's `keepd psql`): everything.
pub const PGAUDIT_SUPERUSER_CLASSES: &str = "all";
/// keepd's superuser's `CONNECTION LIMIT` (CIS 5.5): keepd's own sessions
/// (bootstrap, janitor, backups, renewal, rotation, the supervisor's
/// probe) with room for an operator's.
pub const SUPERUSER_CONNECTION_LIMIT: u32 = 10;

impl RenderInputs {
    pub fn of(config: &Config) -> RenderInputs {
        let security = &config.security;
        RenderInputs {
            topology: Topology::of(config),
            socket_dir: socket_dir(config),
            log_dir: log_dir(config),
            bind_address: config.network.bind_address,
            port: config.network.port,
            max_connections: config.database.postgres.max_connections,
            log_statement: config.database.postgres.log_statement,
            client_cert_required: security.require_client_cert
                && !security.allow_client_cert_fallback,
            backup: config.backup.enabled().then(|| BackupInputs::of(config)),
            pgaudit: true,
            tuning: {
                let pg = &config.database.postgres;
                let mib = |mb: u32| u64::from(mb) * 1024 * 1024;
                match (pg.memory_mb, pg.provider) {
                    (Some(mb), _) => Some(Tuning::for_memory(mib(mb), pg.max_connections)),
                    (None, Provider::Docker) => Some(Tuning::for_memory(
                        mib(pg.docker.memory_mb),
                        pg.max_connections,
                    )),
                    // Measured by the provider (`with_memory`).
                    (None, Provider::Native | Provider::External) => None,
                }
            },
            settings: config
                .database
                .postgres
                .settings
                .iter()
                .map(|(name, value)| (name.clone(), value.to_string()))
                .collect(),
        }
    }

    /// Sized for `bytes` of memory, unless the configuration said how much.
    pub fn with_memory(self, bytes: u64) -> RenderInputs {
        RenderInputs {
            tuning: self
                .tuning
                .or_else(|| Some(Tuning::for_memory(bytes, self.max_connections))),
            ..self
        }
    }

    /// The same inputs for a server whose libraries the provider has
    /// looked at.
    pub fn with_pgaudit(self, pgaudit: bool) -> RenderInputs {
        RenderInputs { pgaudit, ..self }
    }
}

pub fn render(inputs: &RenderInputs) -> Result<RenderedConfig, RenderError> {
    Ok(RenderedConfig {
        postgresql_conf: postgresql_conf(inputs)?,
        pg_hba_conf: pg_hba_conf(inputs),
        pg_ident_conf: pg_ident_conf(inputs),
        pgbackrest_conf: match &inputs.backup {
            Some(backup) => {
                let socket = plain_path(
                    "node.runtime_dir",
                    backup_socket(inputs).unwrap_or(&inputs.socket_dir),
                )?;
                let conf = repository::conf(backup, socket, inputs.port, SUPERUSER, DATABASE)?;
                Some(format!("{HEADER}{conf}"))
            }
            None => None,
        },
        initdb: initdb_scripts(),
    })
}

const HEADER: &str =
    "# Rendered by keepd. Do not edit: change keepd's configuration and restart keepd.\n";

fn quote(key: &'static str, value: &str) -> Result<String, RenderError> {
    if value.contains(['\n', '\r', '\0']) {
        return Err(RenderError::Unquotable {
            key,
            value: value.into(),
            reason: "it contains a line break or NUL",
        });
    }
    Ok(format!(
        "'{}'",
        value.replace('\\', "\\\\").replace('\'', "''")
    ))
}

fn path_str(key: &'static str, path: &Path) -> Result<String, RenderError> {
    let text = path.to_str().ok_or_else(|| RenderError::Unquotable {
        key,
        value: path.display().to_string(),
        reason: "it is not valid UTF-8",
    })?;
    quote(key, text)
}

fn postgresql_conf(inputs: &RenderInputs) -> Result<String, RenderError> {
    let provider = inputs.topology.provider;
    let unix = !inputs.topology.is_tcp();
    let mut out = String::from(HEADER);
    let mut set = |name: &str, value: String| {
        let _ = writeln!(out, "{name} = {value}");
    };

    // Connections: a Unix socket only, or one TLS-only TCP address.
    if unix {
        let dir = &inputs.socket_dir;
        let socket = dir.join(format!(".s.PGSQL.{}", inputs.port));
        let len = socket.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(RenderError::SocketPathTooLong {
                path: socket,
                len,
                max: MAX_SOCKET_PATH,
            });
        }
        set("listen_addresses", "''".into());
        set(
            "unix_socket_directories",
            path_str("node.runtime_dir", dir)?,
        );
        set("unix_socket_permissions", "0700".into());
    } else {
        let bind = match (provider, inputs.bind_address) {
            // Inside a container on an internal network: its only interface.
            (Provider::Docker, _) => "*".to_string(),
            (_, addr) => addr.to_string(),
        };
        set("listen_addresses", quote("network.bind_address", &bind)?);
        match backup_socket(inputs) {
            Some(dir) => {
                set(
                    "unix_socket_directories",
                    path_str("node.runtime_dir", dir)?,
                );
                set("unix_socket_permissions", "0700".into());
            }
            None => set("unix_socket_directories", "''".into()),
        }
    }
    set("port", inputs.port.to_string());
    set("max_connections", inputs.max_connections.to_string());
    set("superuser_reserved_connections", "3".into());
    set("authentication_timeout", "'10s'".into());
    set("password_encryption", "'scram-sha-256'".into());
    set("ssl", if unix { "off" } else { "on" }.into());
    if !unix {
        // Native: beside the data; docker: a read-only mount of their own.
        let dir = match provider {
            Provider::Docker => "/etc/keepd-tls/",
            Provider::Native | Provider::External => "",
        };
        set("ssl_cert_file", format!("'{dir}server.crt'"));
        set("ssl_key_file", format!("'{dir}server.key'"));
        set("ssl_ca_file", format!("'{dir}ca.crt'"));
        // Client certificates of retired roles (the node PKI's CRL).
        set("ssl_crl_file", format!("'{dir}crl.pem'"));
        set("ssl_min_protocol_version", "'TLSv1.3'".into());
        set("ssl_prefer_server_ciphers", "on".into());
        // TLS 1.2 and older only, which the minimum above refuses anyway:
        // named, forward-secret AEAD suites for the server's ECDSA key, so
        // an audit reading this setting alone (pgdsat 6.10) finds no gap.
        set(
            "ssl_ciphers",
            "'ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305'"
                .into(),
        );
        // Postgres 15 offers one ECDH group, and only NIST curves (X25519 is
        // not an EC_KEY curve there): P-256, which every TLS 1.3 client
        // keepd uses (rustls, libpq) offers. Named, not left to a default.
        set("ssl_ecdh_curve", "'prime256v1'".into());
    }

    // Logging: to 0600 files outside the data directory, one prefix that
    // names who did what from where.
    set("logging_collector", "on".into());
    set("log_destination", "'stderr'".into());
    set(
        "log_directory",
        path_str("node.state_dir", &inputs.log_dir)?,
    );
    match provider {
        // Inside the container's volume keepd deletes nothing: a file per
        // weekday, overwritten a week later, keeps seven days.
        Provider::Docker => {
            set("log_filename", "'postgresql-%a.log'".into());
            set("log_truncate_on_rotation", "on".into());
        }
        // keepd deletes files older than database.postgres.log_retention.
        Provider::Native | Provider::External => {
            set("log_filename", "'postgresql-%Y-%m-%d.log'".into());
            set("log_truncate_on_rotation", "off".into());
        }
    }
    set("log_file_mode", "0600".into());
    set("log_rotation_age", "'1d'".into());
    set("log_rotation_size", "'100MB'".into());
    set("log_connections", "on".into());
    set("log_disconnections", "on".into());
    set("log_hostname", "off".into());
    set(
        "log_line_prefix",
        "'%m [%p] user=%u,db=%d,app=%a,client=%h '".into(),
    );
    set(
        "log_statement",
        format!("'{}'", inputs.log_statement.as_str()),
    );
    set("log_min_messages", "'warning'".into());
    set("log_min_error_statement", "'error'".into());
    set("log_checkpoints", "on".into());
    // CIS 3.1: the SQLSTATE and where an error came from; replication
    // commands logged though keepd runs none.
    set("log_error_verbosity", "'verbose'".into());
    set("log_replication_commands", "on".into());
    set("log_lock_waits", "on".into());
    set("log_timezone", "'UTC'".into());
    set("timezone", "'UTC'".into());

    // Security and durability: never relaxed outside tests.
    set("row_security", "on".into());
    set("fsync", "on".into());
    set("full_page_writes", "on".into());
    set("synchronous_commit", "on".into());
    // auth_delay (contrib, CIS 5.7): every failed authentication waits
    // half a second before its answer, which slows guessing through
    // Postgres itself.
    let mut preload = String::from("pg_stat_statements,auth_delay");
    if inputs.pgaudit {
        preload.push_str(",pgaudit");
    }
    set("shared_preload_libraries", format!("'{preload}'"));
    set("auth_delay.milliseconds", "500".into());
    if inputs.pgaudit {
        // pgAudit (CIS 3.2): every statement of every session, except
        // keepd's own, which log role and DDL statements (the superuser's
        // connections ask for it, the login roles have it as their role
        // setting): a role made behind keepd's back is logged whole.
        // Object logging for what `AUDITOR_ROLE` is granted (tampering with
        // the audit trail, reading the cluster key). Statement text only:
        // passwords are redacted by pgAudit, parameters never logged.
        set("pgaudit.log", format!("'{PGAUDIT_SUPERUSER_CLASSES}'"));
        set("pgaudit.log_catalog", "off".into());
        set("pgaudit.log_parameter", "off".into());
        set("pgaudit.log_relation", "on".into());
        set("pgaudit.log_statement_once", "on".into());
        set("pgaudit.role", format!("'{AUDITOR_ROLE}'"));
    }
    // No replication: no WAL sender may connect (archiving needs none).
    set("max_wal_senders", "0".into());
    // Under systemd's MemoryDenyWriteExecute a JIT cannot work; keepd's
    // short queries never needed one.
    set("jit", "off".into());
    // Utility statements would include ALTER ROLE ... PASSWORD.
    set("pg_stat_statements.track_utility", "off".into());

    // Continuous archiving: every WAL segment to pgBackRest's repository,
    // a segment at least every minute, so at most a minute of commits
    // depends on this disk alone.
    if let Some(backup) = &inputs.backup {
        let conf = plain_path("node.state_dir", &backup.conf)?;
        set("archive_mode", "on".into());
        set(
            "archive_command",
            format!("'{PGBACKREST} --config={conf} --stanza={STANZA} archive-push %p'"),
        );
        set("archive_timeout", "'60s'".into());
    }

    // Memory, from what the server may use (`postgres::tuning`).
    if let Some(tuning) = &inputs.tuning {
        for (name, value) in tuning.settings() {
            set(name, value);
        }
    }
    // The operator's, last: they may override the sizes above.
    for (name, value) in &inputs.settings {
        set(name, format!("'{}'", value.replace('\'', "''")));
    }
    Ok(out)
}

/// The users pg_hba admits to keepd's database besides the superuser: the
/// members of a group role, which every login role keepd creates is (and
/// no other role: a role created behind keepd's back is refused).
pub const LOGIN_ROLES: &str = "+keepd_sync";

/// A container reached over TCP keeps a socket on its tmpfs for the
/// pgBackRest that runs inside it (backups on).
/// TCP mode with backups: the Unix socket pgBackRest alone uses (keepd
/// itself reaches the server over TLS; pgBackRest's `pg1-socket-path` takes
/// no certificate). Docker: on the container's tmpfs; native: the private
/// socket directory of socket mode.
fn backup_socket(inputs: &RenderInputs) -> Option<&Path> {
    if !(inputs.topology.is_tcp() && inputs.backup.is_some()) {
        return None;
    }
    match inputs.topology.provider {
        Provider::Docker => Some(Path::new(container::BACKUP_SOCKET)),
        Provider::Native => Some(&inputs.socket_dir),
        Provider::External => None,
    }
}

fn pg_hba_conf(inputs: &RenderInputs) -> String {
    let mut out = String::from(HEADER);
    out.push_str("# TYPE   DATABASE  USER  ADDRESS      METHOD\n");
    if !inputs.topology.is_tcp() {
        // The superuser administers every database; keepd's login roles,
        // and no other role, reach keepd's database only (CIS 5.10).
        let _ = writeln!(out, "local    all       {SUPERUSER}  scram-sha-256");
        let _ = writeln!(
            out,
            "local    {DATABASE}     {LOGIN_ROLES}      scram-sha-256"
        );
        out.push_str("local    all       all                reject\n");
    } else {
        let client_cert = if inputs.client_cert_required {
            " clientcert=verify-full"
        } else {
            ""
        };
        let address = match (inputs.topology.provider, inputs.bind_address) {
            (Provider::Docker, _) => "samenet".to_string(),
            (_, std::net::IpAddr::V4(a)) => format!("{a}/32"),
            (_, std::net::IpAddr::V6(a)) => format!("{a}/128"),
        };
        // As in socket mode: the superuser administers every database,
        // keepd's login roles reach keepd's only (CIS 5.10).
        let _ = writeln!(
            out,
            "hostssl  all       {SUPERUSER}  {address}  scram-sha-256{client_cert}"
        );
        let _ = writeln!(
            out,
            "hostssl  {DATABASE}     {LOGIN_ROLES}  {address}  scram-sha-256{client_cert}"
        );
        if backup_socket(inputs).is_some() {
            // pgBackRest (inside the container for docker), on its socket.
            let _ = writeln!(out, "local    all       {SUPERUSER}  scram-sha-256");
        }
        out.push_str("local    all       all                reject\n");
    }
    out.push_str("# Everything else is rejected, TLS or not.\n");
    out.push_str("host     all       all   0.0.0.0/0    reject\n");
    out.push_str("host     all       all   ::/0         reject\n");
    out
}

fn pg_ident_conf(inputs: &RenderInputs) -> String {
    let mut out = String::from(HEADER);
    out.push_str("# MAPNAME  SYSTEM-USERNAME  PG-USERNAME\n");
    if !inputs.topology.is_tcp() {
        out.push_str("# No client certificates in Unix-socket mode.\n");
    } else {
        // Postgres accepts map= only with certificate-style methods, not
        // with scram-sha-256; keepd instead issues each role a client
        // certificate whose CN is the role's name, which
        // clientcert=verify-full compares with the role logging in.
        out.push_str("# Empty: each client certificate's CN is the role it logs in as.\n");
    }
    out
}

fn initdb_scripts() -> Vec<InitdbScript> {
    let intro = format!(
        "-- Rendered by keepd. Run by keepd as {SUPERUSER} in database {DATABASE} at every start;\n\
         -- every statement is idempotent so a restart reconciles drift.\n"
    );
    let mut roles = intro.clone();
    roles.push_str(
        "-- Group roles own nothing and cannot log in; login roles are created by keepd\n",
    );
    roles.push_str("-- at run time from sealed credentials, so no password is ever in a file.\n");
    roles.push_str("DO $$\nBEGIN\n");
    for role in [OWNER_ROLE, AUDITOR_ROLE].into_iter().chain(GROUP_ROLES) {
        let _ = writeln!(
            roles,
            "  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN\n    \
             CREATE ROLE {role} NOLOGIN;\n  END IF;"
        );
    }
    roles.push_str("END\n$$;\n");
    for role in [OWNER_ROLE, AUDITOR_ROLE].into_iter().chain(GROUP_ROLES) {
        let _ = writeln!(
            roles,
            "ALTER ROLE {role} NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS \
             CONNECTION LIMIT 0;"
        );
    }
    let _ = writeln!(roles, "ALTER DATABASE {DATABASE} OWNER TO {OWNER_ROLE};");
    // Where keepd made the server (an external server's administrator is
    // the operator's).
    let _ = writeln!(
        roles,
        "-- keepd's superuser: a stated connection limit (Postgres does not hold superusers\n\
         -- to it; pg_hba keeps them to the socket or the provider's private channel), and\n\
         -- pgAudit logs every statement of its sessions but keepd's own, which ask for the\n\
         -- common classes at connect (a setting only a superuser may pass).\n\
         DO $$\n\
         BEGIN\n  \
           IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{SUPERUSER}') THEN\n    \
             ALTER ROLE {SUPERUSER} CONNECTION LIMIT {SUPERUSER_CONNECTION_LIMIT};\n    \
             ALTER ROLE {SUPERUSER} SET pgaudit.log = '{PGAUDIT_SUPERUSER_CLASSES}';\n  \
           END IF;\n\
         END\n\
         $$;"
    );

    let schema = format!(
        "{intro}-- keepd's objects live in one schema owned by {OWNER_ROLE}; the tables themselves\n\
         -- come from versioned migrations applied as {OWNER_ROLE}.\n\
         CREATE SCHEMA IF NOT EXISTS keepd AUTHORIZATION {OWNER_ROLE};\n\
         ALTER SCHEMA keepd OWNER TO {OWNER_ROLE};\n\
         ALTER DATABASE {DATABASE} SET search_path = keepd;\n"
    );
    let audit = format!(
        "{intro}-- The audit trail has a schema of its own so its privileges are granted apart\n\
         -- from the data's: only keepd_audit writes there, and nobody updates or deletes.\n\
         CREATE SCHEMA IF NOT EXISTS keepd_audit AUTHORIZATION {OWNER_ROLE};\n\
         ALTER SCHEMA keepd_audit OWNER TO {OWNER_ROLE};\n"
    );
    let hardening = format!(
        "{intro}REVOKE ALL ON DATABASE {DATABASE} FROM PUBLIC;\n\
         REVOKE ALL ON DATABASE postgres FROM PUBLIC;\n\
         REVOKE ALL ON DATABASE template1 FROM PUBLIC;\n\
         REVOKE ALL ON SCHEMA public FROM PUBLIC;\n\
         -- keepd's database metrics read pg_stat_statements (in public) as pg_monitor.\n\
         GRANT USAGE ON SCHEMA public TO pg_monitor;\n\
         REVOKE ALL ON SCHEMA keepd FROM PUBLIC;\n\
         REVOKE ALL ON SCHEMA keepd_audit FROM PUBLIC;\n\
         ALTER DEFAULT PRIVILEGES FOR ROLE {OWNER_ROLE} REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;\n\
         ALTER DEFAULT PRIVILEGES FOR ROLE {OWNER_ROLE} REVOKE ALL ON TABLES FROM PUBLIC;\n\
         ALTER DEFAULT PRIVILEGES FOR ROLE {OWNER_ROLE} REVOKE ALL ON SEQUENCES FROM PUBLIC;\n"
    );
    vec![
        InitdbScript {
            name: "00-extensions.sql",
            sql: format!(
                "{intro}-- Query statistics for operators; utility statements are not tracked.\n\
                 CREATE EXTENSION IF NOT EXISTS pg_stat_statements;\n\
                 -- pgAudit's event triggers, where the server preloads it.\n\
                 DO $$\n\
                 BEGIN\n  \
                   IF current_setting('shared_preload_libraries') ~ '(^|,)\\s*pgaudit\\s*(,|$)' THEN\n    \
                     CREATE EXTENSION IF NOT EXISTS pgaudit;\n  \
                   END IF;\n\
                 END\n\
                 $$;\n"
            ),
        },
        InitdbScript {
            name: "01-roles.sql",
            sql: roles,
        },
        InitdbScript {
            name: "02-schema.sql",
            sql: schema,
        },
        InitdbScript {
            name: "03-audit.sql",
            sql: audit,
        },
        InitdbScript {
            name: "04-hardening.sql",
            sql: hardening,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        Config::from_yaml(yaml, Path::new("t.yaml"), Path::new("/srv")).unwrap()
    }

    fn unix() -> RenderedConfig {
        render(&RenderInputs::of(&config(
            "node:\n  runtime_dir: /run/keepd\n",
        )))
        .unwrap()
    }

    fn tcp() -> RenderedConfig {
        render(&RenderInputs::of(&config(
            "network:\n  use_unix_socket: false\n",
        )))
        .unwrap()
    }

    /// The value of `name` in a rendered postgresql.conf; each is set once.
    fn setting<'a>(conf: &'a str, name: &str) -> &'a str {
        let mut found = conf.lines().filter_map(|l| {
            let (k, v) = l.split_once(" = ")?;
            (k == name).then_some(v)
        });
        let value = found.next().unwrap_or_else(|| panic!("{name} not set"));
        assert!(found.next().is_none(), "{name} set twice");
        value
    }

    /// pg_hba.conf as (type, database, user, rest) rows, comments dropped.
    fn hba_rows(hba: &str) -> Vec<Vec<&str>> {
        hba.lines()
            .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
            .map(|l| l.split_whitespace().collect())
            .collect()
    }

    #[test]
    fn unix_mode_listens_on_the_socket_only() {
        let c = unix().postgresql_conf;
        assert_eq!(setting(&c, "listen_addresses"), "''");
        assert_eq!(
            setting(&c, "unix_socket_directories"),
            "'/run/keepd/postgres'"
        );
        assert_eq!(setting(&c, "unix_socket_permissions"), "0700");
        assert_eq!(setting(&c, "ssl"), "off");
    }

    #[test]
    fn hardening_settings_present() {
        for c in [unix().postgresql_conf, tcp().postgresql_conf] {
            assert_eq!(setting(&c, "password_encryption"), "'scram-sha-256'");
            assert_eq!(setting(&c, "log_connections"), "on");
            assert_eq!(setting(&c, "log_disconnections"), "on");
            let prefix = setting(&c, "log_line_prefix");
            for escape in ["%u", "%d", "%a", "%h", "%m", "%p"] {
                assert!(prefix.contains(escape), "log_line_prefix lacks {escape}");
            }
            assert_eq!(setting(&c, "row_security"), "on");
            assert_eq!(setting(&c, "logging_collector"), "on");
            assert_eq!(setting(&c, "log_file_mode"), "0600");
            assert_eq!(setting(&c, "fsync"), "on");
            assert_eq!(setting(&c, "full_page_writes"), "on");
            assert_eq!(setting(&c, "synchronous_commit"), "on");
            assert_eq!(setting(&c, "log_statement"), "'none'");
            assert_eq!(setting(&c, "pg_stat_statements.track_utility"), "off");
        }
    }

    #[test]
    fn tcp_mode_requires_tls13_on_the_bind_address() {
        let c = tcp().postgresql_conf;
        assert_eq!(setting(&c, "listen_addresses"), "'127.0.0.1'");
        assert_eq!(setting(&c, "ssl"), "on");
        assert_eq!(setting(&c, "ssl_min_protocol_version"), "'TLSv1.3'");
        assert_eq!(setting(&c, "unix_socket_directories"), "''");
    }

    /// pgBackRest takes no client certificate: in TCP mode with backups a
    /// private socket serves it, and the superuser alone, for each
    /// provider that runs the server.
    #[test]
    fn tcp_mode_with_backups_keeps_a_private_socket_for_pgbackrest() {
        for (provider, socket) in [("native", "'/run/keepd/postgres'"), ("docker", "'/tmp'")] {
            let r = render(&RenderInputs::of(&config(&format!(
                "node:\n  runtime_dir: /run/keepd\nnetwork:\n  use_unix_socket: false\n\
                 database:\n  postgres:\n    provider: {provider}\nbackup:\n  repository: /srv/b\n"
            ))))
            .unwrap();
            let c = &r.postgresql_conf;
            assert_eq!(setting(c, "unix_socket_directories"), socket, "{provider}");
            assert_eq!(setting(c, "unix_socket_permissions"), "0700", "{provider}");
            assert!(
                r.pg_hba_conf
                    .lines()
                    .any(|l| l.split_whitespace().collect::<Vec<_>>()
                        == ["local", "all", SUPERUSER, "scram-sha-256"]),
                "{provider}:\n{}",
                r.pg_hba_conf
            );
            let conf = r.pgbackrest_conf.as_deref().unwrap();
            let path = socket.trim_matches('\'');
            assert!(
                conf.lines().any(|l| l == format!("pg1-socket-path={path}")),
                "{provider}:\n{conf}"
            );
        }
        // Without backups, TCP mode opens no socket at all.
        assert_eq!(
            setting(&tcp().postgresql_conf, "unix_socket_directories"),
            "''"
        );
    }

    #[test]
    fn hba_has_no_weak_methods_and_rejects_the_rest() {
        for hba in [unix().pg_hba_conf, tcp().pg_hba_conf] {
            let rows = hba_rows(&hba);
            for row in &rows {
                let method = row.iter().find(|w| {
                    [
                        "trust",
                        "password",
                        "md5",
                        "ident",
                        "peer",
                        "scram-sha-256",
                        "reject",
                    ]
                    .contains(w)
                });
                let method = method.unwrap_or_else(|| panic!("no method in {row:?}"));
                assert!(
                    ["scram-sha-256", "reject"].contains(method),
                    "weak method in {row:?}"
                );
            }
            let last_two: Vec<_> = rows[rows.len() - 2..].to_vec();
            assert_eq!(last_two[0], ["host", "all", "all", "0.0.0.0/0", "reject"]);
            assert_eq!(last_two[1], ["host", "all", "all", "::/0", "reject"]);
        }
    }

    #[test]
    fn unix_hba_allows_only_local_scram() {
        let hba = unix().pg_hba_conf;
        let rows = hba_rows(&hba);
        let allowing: Vec<_> = rows.iter().filter(|r| !r.contains(&"reject")).collect();
        assert_eq!(
            allowing,
            [
                &vec!["local", "all", "keepd_superuser", "scram-sha-256"],
                &vec!["local", "keepd", "+keepd_sync", "scram-sha-256"]
            ]
        );
        assert!(rows.contains(&vec!["local", "all", "all", "reject"]));
    }

    #[test]
    fn tcp_hba_requires_client_certificates() {
        let hba = tcp().pg_hba_conf;
        let rows = hba_rows(&hba);
        let allowing: Vec<_> = rows.iter().filter(|r| !r.contains(&"reject")).collect();
        assert_eq!(
            allowing,
            [
                &vec![
                    "hostssl",
                    "all",
                    SUPERUSER,
                    "127.0.0.1/32",
                    "scram-sha-256",
                    "clientcert=verify-full"
                ],
                &vec![
                    "hostssl",
                    DATABASE,
                    "+keepd_sync",
                    "127.0.0.1/32",
                    "scram-sha-256",
                    "clientcert=verify-full"
                ]
            ]
        );
        assert!(rows.contains(&vec!["local", "all", "all", "reject"]));
    }

    #[test]
    fn initdb_scripts_in_order_and_passwordless() {
        let r = unix();
        let names: Vec<_> = r.initdb.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "00-extensions.sql",
                "01-roles.sql",
                "02-schema.sql",
                "03-audit.sql",
                "04-hardening.sql"
            ]
        );
        for script in &r.initdb {
            let statements: String = script
                .sql
                .lines()
                .filter(|l| !l.trim_start().starts_with("--"))
                .collect();
            let upper = statements.to_uppercase();
            assert!(
                !upper.contains("PASSWORD"),
                "{} mentions a password",
                script.name
            );
            assert!(
                !upper.contains(" LOGIN;") && !upper.contains(" LOGIN "),
                "{}",
                script.name
            );
        }
        let roles = &r.initdb[1].sql;
        for role in [
            "keepd_owner",
            "keepd_sync",
            "keepd_query",
            "keepd_auth",
            "keepd_audit",
            "keepd_readonly",
        ] {
            assert!(
                roles.contains(&format!("CREATE ROLE {role} NOLOGIN;")),
                "{role}"
            );
        }
        assert!(
            r.initdb[4]
                .sql
                .contains("REVOKE ALL ON DATABASE keepd FROM PUBLIC;")
        );
        assert!(
            r.initdb[4]
                .sql
                .contains("REVOKE ALL ON SCHEMA public FROM PUBLIC;")
        );
    }

    #[test]
    fn shipped_initdb_directory_matches_the_renderer() {
        let shipped = [
            include_str!("../../initdb/00-extensions.sql"),
            include_str!("../../initdb/01-roles.sql"),
            include_str!("../../initdb/02-schema.sql"),
            include_str!("../../initdb/03-audit.sql"),
            include_str!("../../initdb/04-hardening.sql"),
        ];
        let rendered = render(&RenderInputs::of(&Config::default())).unwrap();
        for (script, text) in rendered.initdb.iter().zip(shipped) {
            assert_eq!(
                script.sql, text,
                "initdb/{} is stale: run `keepd render`",
                script.name
            );
        }
    }

    #[test]
    fn an_s3_repository_reaches_pgbackrest_without_its_key() {
        let c = config(
            "backup:\n  s3:\n    endpoint: localhost:9443\n    bucket: keepd-b\n    region: us-east-1\n    \
             uri_style: path\n    ca_file: /etc/keepd/s3-ca.pem\n",
        );
        let conf = render(&RenderInputs::of(&c))
            .unwrap()
            .pgbackrest_conf
            .unwrap();
        for line in [
            "repo1-type=s3",
            "repo1-path=/keepd",
            "repo1-s3-endpoint=localhost",
            "repo1-storage-port=9443",
            "repo1-s3-bucket=keepd-b",
            "repo1-s3-region=us-east-1",
            "repo1-s3-uri-style=path",
            "repo1-storage-ca-file=/etc/keepd/s3-ca.pem",
            "repo1-cipher-type=aes-256-cbc",
        ] {
            assert!(conf.lines().any(|l| l == line), "{line} missing:\n{conf}");
        }
        assert!(!conf.contains("s3-key"), "no key in the file:\n{conf}");
    }

    #[test]
    fn rendering_is_deterministic_and_fingerprint_tracks_changes() {
        assert_eq!(unix(), unix());
        assert_eq!(unix().fingerprint(), unix().fingerprint());
        assert_ne!(unix().fingerprint(), tcp().fingerprint());
    }

    #[test]
    fn hostile_paths_are_quoted_or_refused() {
        let r = render(&RenderInputs::of(&config(
            "node:\n  runtime_dir: \"/run/it's\"\n",
        )))
        .unwrap();
        assert_eq!(
            setting(&r.postgresql_conf, "unix_socket_directories"),
            "'/run/it''s/postgres'"
        );
        let err = render(&RenderInputs::of(&config(
            "node:\n  runtime_dir: \"/run/a\\nb\"\n",
        )))
        .unwrap_err();
        assert!(err.to_string().contains("node.runtime_dir"), "{err}");
    }

    #[test]
    fn overlong_socket_path_is_refused() {
        let long = "/run/".to_string() + &"x".repeat(100);
        let err = render(&RenderInputs::of(&config(&format!(
            "node:\n  runtime_dir: {long}\n"
        ))))
        .unwrap_err();
        assert!(
            matches!(err, RenderError::SocketPathTooLong { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("node.runtime_dir"), "{err}");
    }
}
