//! The node's login roles in Postgres. This module is handed credentials to
//! apply; it never reads `db.enc` (only `secrets` does).
//!
//! A password reaches Postgres only as a SCRAM-SHA-256 verifier computed by
//! keepd, in a statement sent on its own after the transaction switched off
//! statement and error-statement logging, so neither the password nor the
//! verifier lands in a log.

use tokio_postgres::Client;
use tracing::info;

use super::{DATABASE, GROUP_ROLES, SUPERUSER};
use crate::identity::NodeId;
use crate::secrets::values::ScramVerifier;

#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error("{action} role {role} failed: {}", super::describe_error(source))]
    Sql {
        action: &'static str,
        role: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// `keepd_<nodeid>_v<version>`: the node's login role for one credential.
pub fn login_role_name(node_id: &NodeId, version: u32) -> String {
    format!("keepd_{node_id}_v{version}")
}

/// The version in a login role name of this node, if it is one.
pub fn login_role_version(node_id: &NodeId, name: &str) -> Option<u32> {
    name.strip_prefix(&format!("keepd_{node_id}_v"))?
        .parse()
        .ok()
}

/// Role names here are generated (`keepd_`, hex, `_v`, digits); quoting
/// keeps that an invariant of this module rather than of its callers.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Role changes of all nodes sharing a server happen one at a time, and
/// never while a node applies the initdb scripts or migrates: two GRANTs
/// to the same group role at once, or a login role's GRANT CONNECT ON
/// DATABASE beside the scripts' REVOKE ON DATABASE, fail with "tuple
/// concurrently updated" (three nodes starting at once met the second).
/// So the lock is the migrations' (bootstrap holds it around the scripts).
const ROLE_DDL_LOCK: &str = "SELECT pg_advisory_xact_lock($1)";

/// Sent first in a transaction that carries a verifier: neither the
/// statement nor an error about it reaches the server's log.
const SILENCED: &str = "SET LOCAL log_statement = 'none'; \
     SET LOCAL log_min_error_statement = 'panic'; \
     SET LOCAL log_min_duration_statement = -1";

/// Role administration over a superuser connection to keepd's database.
pub struct RoleAdmin<'a> {
    client: &'a mut Client,
}

impl<'a> RoleAdmin<'a> {
    pub fn new(client: &'a mut Client) -> RoleAdmin<'a> {
        RoleAdmin { client }
    }

    /// Creates the login role or brings an existing one in line: LOGIN,
    /// NOINHERIT, no special attributes, member of every group role, the
    /// connection limit, and this verifier. Idempotent.
    pub async fn ensure_login_role(
        &mut self,
        name: &str,
        verifier: &ScramVerifier,
        connection_limit: i32,
    ) -> Result<(), RoleError> {
        let err = |action| {
            move |source| RoleError::Sql {
                action,
                role: name.to_string(),
                source,
            }
        };
        let tx = self.client.transaction().await.map_err(err("begin for"))?;
        tx.query_one(ROLE_DDL_LOCK, &[&super::migrate::MIGRATION_LOCK])
            .await
            .map_err(err("lock role changes for"))?;
        tx.batch_execute(SILENCED)
            .await
            .map_err(err("silence logging for"))?;
        let exists = tx
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
            .await
            .map_err(err("look up"))?
            .is_some();
        let verb = if exists { "ALTER" } else { "CREATE" };
        let statement = zeroize::Zeroizing::new(format!(
            "{verb} ROLE {} LOGIN NOINHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION \
             NOBYPASSRLS CONNECTION LIMIT {connection_limit} PASSWORD {}",
            ident(name),
            verifier.sql_literal().as_str()
        ));
        tx.batch_execute(&statement).await.map_err(err("set"))?;
        // NOINHERIT: the role has its groups' privileges only after the
        // pool's per-transaction SET ROLE, so CONNECT is granted to it directly.
        let groups: Vec<String> = GROUP_ROLES.iter().map(|g| ident(g)).collect();
        tx.batch_execute(&format!(
            "GRANT {groups} TO {role}; GRANT CONNECT ON DATABASE {db} TO {role}",
            groups = groups.join(", "),
            role = ident(name),
            db = ident(DATABASE),
        ))
        .await
        .map_err(err("grant groups to"))?;
        // pgAudit logs everything server-wide; the pool's own sessions
        // only their role and DDL statements (where pgAudit is loaded).
        let pgaudit = tx
            .query_opt("SELECT 1 FROM pg_settings WHERE name = 'pgaudit.log'", &[])
            .await
            .map_err(err("look up pgAudit for"))?
            .is_some();
        if pgaudit {
            tx.batch_execute(&format!(
                "ALTER ROLE {} SET pgaudit.log = '{}'",
                ident(name),
                super::render::PGAUDIT_SESSION_CLASSES
            ))
            .await
            .map_err(err("set pgAudit's classes for"))?;
        }
        tx.commit().await.map_err(err("commit"))?;
        if !exists {
            info!(role = name, "created login role");
        }
        Ok(())
    }

    /// Gives keepd's superuser `verifier`; its sessions stay logged in.
    pub async fn set_superuser_password(
        &mut self,
        verifier: &ScramVerifier,
    ) -> Result<(), RoleError> {
        let err = |action| {
            move |source| RoleError::Sql {
                action,
                role: SUPERUSER.to_string(),
                source,
            }
        };
        let tx = self.client.transaction().await.map_err(err("begin for"))?;
        tx.batch_execute(SILENCED)
            .await
            .map_err(err("silence logging for"))?;
        let statement = zeroize::Zeroizing::new(format!(
            "ALTER ROLE {} PASSWORD {}",
            ident(SUPERUSER),
            verifier.sql_literal().as_str()
        ));
        tx.batch_execute(&statement)
            .await
            .map_err(err("set the password of"))?;
        tx.commit().await.map_err(err("commit"))
    }

    /// Sessions currently logged in as `name`.
    pub async fn sessions(&mut self, name: &str) -> Result<i64, RoleError> {
        let row = self
            .client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                &[&name],
            )
            .await
            .map_err(|source| RoleError::Sql {
                action: "count sessions of",
                role: name.into(),
                source,
            })?;
        Ok(row.get(0))
    }

    /// Ends every session of `name`; returns how many there were.
    pub async fn terminate_sessions(&mut self, name: &str) -> Result<i64, RoleError> {
        let row = self
            .client
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1",
                &[&name],
            )
            .await
            .map_err(|source| RoleError::Sql {
                action: "terminate sessions of",
                role: name.into(),
                source,
            })?;
        Ok(row.get(0))
    }

    /// Drops the role (and its CONNECT grant) if it exists. Idempotent.
    pub async fn drop_role(&mut self, name: &str) -> Result<(), RoleError> {
        let err = |source| RoleError::Sql {
            action: "drop",
            role: name.into(),
            source,
        };
        let tx = self.client.transaction().await.map_err(err)?;
        tx.query_one(ROLE_DDL_LOCK, &[&super::migrate::MIGRATION_LOCK])
            .await
            .map_err(err)?;
        let exists = tx
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
            .await
            .map_err(err)?
            .is_some();
        if exists {
            tx.batch_execute(&format!(
                "REVOKE ALL ON DATABASE {} FROM {role}; DROP ROLE IF EXISTS {role}",
                ident(DATABASE),
                role = ident(name)
            ))
            .await
            .map_err(err)?;
        }
        tx.commit().await.map_err(err)
    }

    /// The versions of this node's login roles that exist in Postgres.
    pub async fn node_role_versions(&mut self, node_id: &NodeId) -> Result<Vec<u32>, RoleError> {
        let pattern = format!("keepd\\_{node_id}\\_v%");
        let rows = self
            .client
            .query(
                "SELECT rolname FROM pg_roles WHERE rolname LIKE $1",
                &[&pattern],
            )
            .await
            .map_err(|source| RoleError::Sql {
                action: "list",
                role: pattern.clone(),
                source,
            })?;
        let mut versions: Vec<u32> = rows
            .iter()
            .filter_map(|r| login_role_version(node_id, r.get(0)))
            .collect();
        versions.sort_unstable();
        Ok(versions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (id, _) = crate::identity::NodeIdentity::load_or_create(&dir.path().join("k")).unwrap();
        let node = id.node_id();
        let name = login_role_name(node, 12);
        assert_eq!(name, format!("keepd_{node}_v12"));
        assert!(name.len() <= 63, "fits NAMEDATALEN");
        assert_eq!(login_role_version(node, &name), Some(12));
        assert_eq!(login_role_version(node, "keepd_sync"), None);
        assert_eq!(login_role_version(node, &format!("keepd_{node}_vx")), None);
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
    }
}
