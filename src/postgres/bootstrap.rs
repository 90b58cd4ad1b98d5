//! Applies the rendered `initdb/` scripts: creates keepd's database if it is
//! missing and runs every script, each idempotent, at every start.

use tracing::info;

use super::render::RenderedConfig;
use super::tls::Endpoint;
use super::{DATABASE, describe_error};

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("cannot connect to Postgres as the bootstrap superuser: {}", describe_error(.0))]
    Connect(#[source] tokio_postgres::Error),
    #[error("creating database {DATABASE} failed: {}", describe_error(.0))]
    CreateDatabase(#[source] tokio_postgres::Error),
    #[error("initdb script {script} failed: {}", describe_error(source))]
    Script {
        script: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
}

async fn connect(endpoint: &Endpoint) -> Result<tokio_postgres::Client, BootstrapError> {
    endpoint.connect().await.map_err(BootstrapError::Connect)
}

/// The databases of a server keepd runs besides its own. Their schema
/// `public` grants USAGE to PUBLIC by default, which nobody keepd admits
/// needs (the initdb scripts revoke it in keepd's database).
pub const OTHER_DATABASES: [&str; 2] = ["postgres", "template1"];

/// `maintenance` reaches the `postgres` database, `keepd_db` keepd's own; both
/// as the superuser. `own_server`: a server keepd runs (native, docker),
/// whose other databases it hardens too; an external server's are its
/// operator's.
pub async fn apply(
    maintenance: &Endpoint,
    keepd_db: &Endpoint,
    rendered: &RenderedConfig,
    own_server: bool,
) -> Result<(), BootstrapError> {
    let admin = connect(maintenance).await?;
    // Nodes sharing a server bootstrap one at a time: CREATE DATABASE and
    // the role DDL of the scripts race otherwise. A session lock, as
    // CREATE DATABASE cannot run inside a transaction; it ends with the
    // session whatever happens.
    admin
        .query_one("SELECT pg_advisory_lock($1)", &[&BOOTSTRAP_LOCK])
        .await
        .map_err(BootstrapError::CreateDatabase)?;
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&DATABASE])
        .await
        .map_err(BootstrapError::CreateDatabase)?
        .is_some();
    if !exists {
        info!(database = DATABASE, "creating database");
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {DATABASE} TEMPLATE template0 ENCODING 'UTF8'"
            ))
            .await
            .map_err(BootstrapError::CreateDatabase)?;
    }
    let client = connect(keepd_db).await?;
    // Advisory locks are per database: the lock above does not keep the
    // scripts' grants from meeting another node's migrations and grants
    // in keepd's database ("tuple concurrently updated"); theirs does.
    client
        .query_one(
            "SELECT pg_advisory_lock($1)",
            &[&super::migrate::MIGRATION_LOCK],
        )
        .await
        .map_err(|source| BootstrapError::Script {
            script: "pg_advisory_lock (keepd's migration lock)",
            source,
        })?;
    for script in &rendered.initdb {
        // One simple-query batch: the whole script commits or none of it.
        client
            .batch_execute(&script.sql)
            .await
            .map_err(|source| BootstrapError::Script {
                script: script.name,
                source,
            })?;
    }
    if own_server {
        for database in OTHER_DATABASES {
            let other = connect(&maintenance.database(database)).await?;
            other
                .batch_execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
                .await
                .map_err(|source| BootstrapError::Script {
                    script: "REVOKE ALL ON SCHEMA public FROM PUBLIC (postgres, template1)",
                    source,
                })?;
        }
    }
    // One line for all of them: a healthy start stays short.
    info!(
        scripts = rendered.initdb.len(),
        "applied the initdb scripts"
    );
    drop(admin);
    Ok(())
}

/// The advisory lock of `apply` ("keepd_bo").
const BOOTSTRAP_LOCK: i64 = 0x6b65_6570_645f_626f;
