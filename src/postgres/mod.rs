//! Everything about the Postgres server keepd runs: rendering its
//! configuration, provisioning it, and supervising the running process.

pub mod bootstrap;
pub mod child;
pub mod commands;
pub mod docker;
pub mod external;
pub mod locate;
pub mod matrix;
pub mod migrate;
pub mod native;
pub mod pool;
pub mod render;
pub mod replay;
pub mod roles;
pub mod server;
pub mod supervise;
pub mod tls;
pub mod tuning;

/// initdb's arguments after `-D DIR`, for every provider: nobody can log
/// in until keepd installs its own pg_hba.conf and sets the superuser's
/// verifier, so initdb never sees a password; checksums are on.
pub const INITDB_ARGS: [&str; 6] = [
    "-U",
    SUPERUSER,
    "--auth=reject",
    "--data-checksums",
    "--encoding=UTF8",
    "--no-locale",
];

/// `postgres --single -D DIR` settings that keep the statement setting the
/// superuser's verifier out of every log.
pub const SINGLE_USER_ARGS: [&str; 6] = [
    "-c",
    "log_statement=none",
    "-c",
    "log_min_error_statement=panic",
    "-c",
    "logging_collector=off",
];

/// The statement single-user mode runs to give the superuser its verifier
/// (sent over stdin, never in a file, argument or environment).
pub fn superuser_verifier_statement(
    verifier: &crate::secrets::values::ScramVerifier,
) -> zeroize::Zeroizing<String> {
    zeroize::Zeroizing::new(format!(
        "ALTER ROLE {SUPERUSER} WITH LOGIN SUPERUSER PASSWORD {};\n",
        verifier.sql_literal().as_str()
    ))
}

/// How a postmaster is stopped: a fast shutdown (SIGINT) for up to
/// `timeout`, then an immediate one (SIGQUIT), then SIGKILL, each given
/// time to take effect.
pub fn stop_ladder(
    timeout: std::time::Duration,
) -> [(nix::sys::signal::Signal, std::time::Duration); 3] {
    use nix::sys::signal::Signal;
    use std::time::Duration;
    [
        (Signal::SIGINT, timeout),
        (Signal::SIGQUIT, Duration::from_secs(5)),
        (Signal::SIGKILL, Duration::from_secs(5)),
    ]
}

/// The database keepd's own data lives in.
pub const DATABASE: &str = "keepd";
/// The bootstrap superuser created by initdb; used for provisioning only.
pub const SUPERUSER: &str = "keepd_superuser";
/// NOLOGIN owner of every schema object.
pub const OWNER_ROLE: &str = "keepd_owner";
/// NOLOGIN role whose privileges are what pgAudit's object logging logs
/// (`pgaudit.role`); it is granted, never used.
pub const AUDITOR_ROLE: &str = "keepd_auditor";
/// The NOLOGIN group roles the login roles are members of: every unit of
/// work runs as one (`pool`), the matrix grants to them (`matrix`), the
/// renderer and bootstrap create them. Their names are spelled here only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupRole {
    Sync,
    Query,
    Auth,
    Audit,
    Readonly,
    /// The operator's account commands (`keepd account`).
    Operator,
}

impl GroupRole {
    pub const ALL: [GroupRole; 6] = [
        GroupRole::Sync,
        GroupRole::Query,
        GroupRole::Auth,
        GroupRole::Audit,
        GroupRole::Readonly,
        GroupRole::Operator,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            GroupRole::Sync => "keepd_sync",
            GroupRole::Query => "keepd_query",
            GroupRole::Auth => "keepd_auth",
            GroupRole::Audit => "keepd_audit",
            GroupRole::Readonly => "keepd_readonly",
            GroupRole::Operator => "keepd_operator",
        }
    }
}

impl std::fmt::Display for GroupRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl PartialEq<&str> for GroupRole {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

/// The group roles' names, in `GroupRole::ALL`'s order.
pub const GROUP_ROLES: [&str; 6] = {
    let mut names = [""; 6];
    let mut i = 0;
    while i < names.len() {
        names[i] = GroupRole::ALL[i].name();
        i += 1;
    }
    names
};

/// Where Postgres listens for keepd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgAddress {
    /// The directory of the Unix socket.
    Socket(std::path::PathBuf),
    /// A TCP address (TLS only).
    Tcp(std::net::IpAddr),
    /// A server by name (the external provider).
    Host(String),
}

/// Connection settings for `user` at `address`: over the socket, or over
/// TCP requiring TLS (`tls` carries the role's client certificate).
pub fn endpoint(
    address: &PgAddress,
    port: u16,
    user: &str,
    password: &crate::secrets::values::SecretString,
    dbname: &str,
    tls: tls::Tls,
) -> tls::Endpoint {
    let mut config = tokio_postgres::Config::new();
    match address {
        PgAddress::Socket(dir) => {
            config.host_path(dir);
        }
        PgAddress::Tcp(ip) => {
            config
                .host(ip.to_string())
                .ssl_mode(tokio_postgres::config::SslMode::Require);
        }
        PgAddress::Host(name) => {
            let mode = match tls {
                tls::Tls::On(_) => tokio_postgres::config::SslMode::Require,
                tls::Tls::Off => tokio_postgres::config::SslMode::Disable,
            };
            config.host(name).ssl_mode(mode);
        }
    }
    config
        .port(port)
        .user(user)
        .password(password.expose())
        .dbname(dbname)
        .application_name("keepd")
        .connect_timeout(std::time::Duration::from_secs(5));
    if user == SUPERUSER {
        // keepd's own superuser sessions: pgAudit's common classes, not
        // the everything its role setting asks of any other.
        config.options(format!(
            "-c pgaudit.log={}",
            render::PGAUDIT_SESSION_CLASSES
        ));
    }
    tls::Endpoint::new(config, tls)
}

/// A Postgres error as an operator needs it: the server's own message with
/// its detail and hint, or the connection problem with its cause (the
/// driver's Display alone says only "db error").
pub fn describe_error(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => {
            let mut text = format!("{} ({})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(&format!("; {detail}"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            text
        }
        None => match std::error::Error::source(error) {
            Some(cause) => format!("{error}: {cause}"),
            None => error.to_string(),
        },
    }
}
