//! Everything about the Postgres server keepd runs: rendering its
//! configuration, provisioning it, and supervising the running process.

pub mod bootstrap;
pub mod child;
pub mod docker;
pub mod matrix;
pub mod migrate;
pub mod native;
pub mod pool;
pub mod render;
pub mod roles;
pub mod supervise;

/// The database keepd's own data lives in.
pub const DATABASE: &str = "keepd";
/// The bootstrap superuser created by initdb; used for provisioning only.
pub const SUPERUSER: &str = "keepd_superuser";
/// NOLOGIN owner of every schema object.
pub const OWNER_ROLE: &str = "keepd_owner";
/// NOLOGIN group roles the login roles are members of.
pub const GROUP_ROLES: [&str; 5] = [
    "keepd_sync",
    "keepd_query",
    "keepd_auth",
    "keepd_audit",
    "keepd_readonly",
];

/// A Postgres error as an operator needs it: the server's own message with
/// its detail and hint, or the connection problem with its cause (the
/// driver's Display alone says only "db error").
/// Connection settings for the bootstrap superuser over the Unix socket
/// in `socket_dir` (native and docker providers alike).
pub fn superuser_config(
    socket_dir: &std::path::Path,
    port: u16,
    password: &crate::secret::SecretString,
    dbname: &str,
) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host_path(socket_dir)
        .port(port)
        .user(SUPERUSER)
        .password(password.expose())
        .dbname(dbname)
        .application_name("keepd")
        .connect_timeout(std::time::Duration::from_secs(5));
    config
}

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
