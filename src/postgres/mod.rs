//! Everything about the Postgres server keepd runs: rendering its
//! configuration, provisioning it, and supervising the running process.

pub mod bootstrap;
pub mod child;
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
