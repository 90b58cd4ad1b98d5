//! Versioned schema migrations, applied at start as `keepd_owner`.
//!
//! A small runner of our own rather than a migration crate: keepd needs
//! every pending migration *and* the permission matrix applied in one
//! transaction (all or nothing), as `keepd_owner` (so the owner owns what
//! it creates), under a transaction-level advisory lock (several keepd
//! nodes may share an external cluster), with checksums of applied files
//! verified. That is about a hundred lines; the crates that do the rest
//! would add some forty dependencies to a two-core build.

use sha2::{Digest, Sha256};
use tracing::info;

use super::{OWNER_ROLE, describe_error, matrix};

/// One migration file, embedded in the binary.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

impl Migration {
    fn checksum(&self) -> String {
        hex::encode(Sha256::digest(self.sql.as_bytes()))
    }
}

/// keepd's schema, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "sync_schema",
        sql: include_str!("../../migrations/0001_sync_schema.sql"),
    },
    Migration {
        version: 2,
        name: "audit_log",
        sql: include_str!("../../migrations/0002_audit_log.sql"),
    },
    Migration {
        version: 3,
        name: "per_node_chains",
        sql: include_str!("../../migrations/0003_per_node_chains.sql"),
    },
    Migration {
        version: 4,
        name: "plaintext_limits",
        sql: include_str!("../../migrations/0004_plaintext_limits.sql"),
    },
    Migration {
        version: 5,
        name: "idempotency_fingerprint",
        sql: include_str!("../../migrations/0005_idempotency_fingerprint.sql"),
    },
    Migration {
        version: 6,
        name: "account_usage",
        sql: include_str!("../../migrations/0006_account_usage.sql"),
    },
    Migration {
        version: 7,
        name: "device_proof",
        sql: include_str!("../../migrations/0007_device_proof.sql"),
    },
    Migration {
        version: 8,
        name: "invites",
        sql: include_str!("../../migrations/0008_invites.sql"),
    },
    Migration {
        version: 9,
        name: "policy_initplans",
        sql: include_str!("../../migrations/0009_policy_initplans.sql"),
    },
    Migration {
        version: 10,
        name: "cluster_members",
        sql: include_str!("../../migrations/0010_cluster_members.sql"),
    },
    Migration {
        version: 11,
        name: "vault_management",
        sql: include_str!("../../migrations/0011_vault_management.sql"),
    },
    Migration {
        version: 12,
        name: "operator",
        sql: include_str!("../../migrations/0012_operator.sql"),
    },
    Migration {
        version: 13,
        name: "stream_ends",
        sql: include_str!("../../migrations/0013_stream_ends.sql"),
    },
    Migration {
        version: 14,
        name: "usage_rule",
        sql: include_str!("../../migrations/0014_usage_rule.sql"),
    },
    Migration {
        version: 15,
        name: "login_throttle",
        sql: include_str!("../../migrations/0015_login_throttle.sql"),
    },
    Migration {
        version: 16,
        name: "opaque",
        sql: include_str!("../../migrations/0016_opaque.sql"),
    },
    Migration {
        version: 17,
        name: "second_factor",
        sql: include_str!("../../migrations/0017_second_factor.sql"),
    },
    Migration {
        version: 18,
        name: "field_keys",
        sql: include_str!("../../migrations/0018_field_keys.sql"),
    },
    Migration {
        version: 19,
        name: "cluster_key_log",
        sql: include_str!("../../migrations/0019_cluster_key_log.sql"),
    },
    Migration {
        version: 20,
        name: "audit_base",
        sql: include_str!("../../migrations/0020_audit_base.sql"),
    },
    Migration {
        version: 21,
        name: "push_usage",
        sql: include_str!("../../migrations/0021_push_usage.sql"),
    },
    Migration {
        version: 22,
        name: "join_tokens",
        sql: include_str!("../../migrations/0022_join_tokens.sql"),
    },
    Migration {
        version: 23,
        name: "push_reservations",
        sql: include_str!("../../migrations/0023_push_reservations.sql"),
    },
    Migration {
        version: 24,
        name: "log_integrity",
        sql: include_str!("../../migrations/0024_log_integrity.sql"),
    },
    Migration {
        version: 25,
        name: "lean_push",
        sql: include_str!("../../migrations/0025_lean_push.sql"),
    },
    Migration {
        version: 26,
        name: "page_bound",
        sql: include_str!("../../migrations/0026_page_bound.sql"),
    },
];

/// Serialises migrations across every keepd sharing a cluster.
pub(crate) const MIGRATION_LOCK: i64 = 0x6b65_6570_645f_6d69; // "keepd_mi"

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "migration {version} ({name}) failed, nothing was changed: {}",
        describe_error(source)
    )]
    Failed {
        version: i32,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "migration {version} ({name}) was applied with different content (checksum {applied}, \
         this keepd has {expected}); a released migration must never change"
    )]
    Changed {
        version: i32,
        name: String,
        applied: String,
        expected: String,
    },
    #[error(
        "the database is at schema version {applied}, newer than this keepd knows ({known}); \
         run the newer keepd"
    )]
    Newer { applied: i32, known: i32 },
    #[error("applying migrations failed, nothing was changed: {}", describe_error(.0))]
    Sql(#[from] tokio_postgres::Error),
}

/// Applies `migrations` not yet applied and grants the permission matrix,
/// all in one transaction. `client` is a superuser session.
pub async fn apply(
    client: &mut tokio_postgres::Client,
    migrations: &[Migration],
) -> Result<Vec<i32>, MigrateError> {
    let tx = client.transaction().await?;
    tx.query_one("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(&format!(
        "SET LOCAL ROLE {OWNER_ROLE};
         CREATE TABLE IF NOT EXISTS keepd.schema_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             checksum   text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .await?;
    let applied: Vec<(i32, String, String)> = tx
        .query(
            "SELECT version, name, checksum FROM keepd.schema_migrations ORDER BY version",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let known = migrations.iter().map(|m| m.version).max().unwrap_or(0);
    if let Some((newest, _, _)) = applied.last()
        && *newest > known
    {
        return Err(MigrateError::Newer {
            applied: *newest,
            known,
        });
    }
    for (version, name, checksum) in &applied {
        if let Some(m) = migrations.iter().find(|m| m.version == *version)
            && m.checksum() != *checksum
        {
            return Err(MigrateError::Changed {
                version: *version,
                name: name.clone(),
                applied: checksum.clone(),
                expected: m.checksum(),
            });
        }
    }
    let pending: Vec<&Migration> = migrations
        .iter()
        .filter(|m| !applied.iter().any(|(v, _, _)| *v == m.version))
        .collect();
    for (index, m) in pending.iter().enumerate() {
        info!(
            version = m.version,
            name = m.name,
            progress = format!("{}/{}", index + 1, pending.len()),
            "applying migration"
        );
        let failed = |source| MigrateError::Failed {
            version: m.version,
            name: m.name,
            source,
        };
        tx.batch_execute(m.sql).await.map_err(failed)?;
        tx.execute(
            "INSERT INTO keepd.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[&m.version, &m.name, &m.checksum()],
        )
        .await
        .map_err(failed)?;
    }
    // The matrix, exactly, at every start: drift is revoked.
    tx.batch_execute(&matrix::grant_statements().join(";\n"))
        .await?;
    tx.commit().await?;
    Ok(pending.iter().map(|m| m.version).collect())
}

/// One migration as `keepd migrate status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    pub version: i32,
    pub name: String,
    pub state: MigrationState,
    /// When it was applied (`YYYY-MM-DD HH:MM:SS` UTC), if it was.
    pub applied_at: Option<String>,
    /// The checksum this keepd has (none for a migration it does not know).
    pub checksum: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    /// Applied with the content this keepd has.
    Applied,
    /// Known to this keepd, not applied yet (the next start applies it).
    Pending,
    /// Applied with other content than this keepd's: a changed release.
    Changed,
    /// Applied by a newer keepd.
    Unknown,
}

/// Every migration, known or applied, with its state; `applied` is
/// (version, name, checksum, applied at) as `keepd.schema_migrations`
/// holds them.
pub fn status(
    migrations: &[Migration],
    applied: &[(i32, String, String, String)],
) -> Vec<MigrationStatus> {
    let mut out: Vec<MigrationStatus> = migrations
        .iter()
        .map(|m| {
            let row = applied.iter().find(|(v, ..)| *v == m.version);
            MigrationStatus {
                version: m.version,
                name: m.name.to_string(),
                state: match row {
                    None => MigrationState::Pending,
                    Some((_, _, checksum, _)) if *checksum == m.checksum() => {
                        MigrationState::Applied
                    }
                    Some(_) => MigrationState::Changed,
                },
                applied_at: row.map(|(.., at)| at.clone()),
                checksum: Some(m.checksum()),
            }
        })
        .collect();
    for (version, name, _, at) in applied {
        if !migrations.iter().any(|m| m.version == *version) {
            out.push(MigrationStatus {
                version: *version,
                name: name.clone(),
                state: MigrationState::Unknown,
                applied_at: Some(at.clone()),
                checksum: None,
            });
        }
    }
    out
}

/// `keepd.schema_migrations` as `status` reads it (empty before the first
/// start).
pub async fn applied(
    client: &tokio_postgres::Client,
) -> Result<Vec<(i32, String, String, String)>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('keepd.schema_migrations') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    Ok(client
        .query(
            "SELECT version, name, checksum, \
               to_char(applied_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') \
             FROM keepd.schema_migrations ORDER BY version",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_from_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1, "{}", m.name);
            assert!(!m.sql.trim().is_empty());
        }
    }

    #[test]
    fn migrations_grant_nothing_themselves() {
        // The matrix is the one place privileges come from.
        for m in MIGRATIONS {
            let code: String = m
                .sql
                .lines()
                .filter(|l| !l.trim_start().starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n")
                .to_uppercase();
            assert!(!code.contains("GRANT "), "{} grants", m.name);
        }
    }

    #[test]
    fn every_tenant_table_forces_row_level_security() {
        let all: String = MIGRATIONS.iter().map(|m| m.sql).collect();
        for table in matrix::TABLES.iter().filter(|t| t.starts_with("keepd.")) {
            assert!(
                all.contains(&format!("ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;")),
                "{table}"
            );
            assert!(
                all.contains(&format!("ALTER TABLE {table} FORCE ROW LEVEL SECURITY;")),
                "{table}"
            );
        }
    }

    #[test]
    fn status_names_applied_pending_changed_and_unknown() {
        let known = &MIGRATIONS[..3];
        let row = |m: &Migration, checksum: String| {
            (
                m.version,
                m.name.to_string(),
                checksum,
                "2026-12-07 00:00:00".to_string(),
            )
        };
        let applied = vec![
            row(&known[0], known[0].checksum()),
            row(&known[1], "0".repeat(64)),
            (
                99,
                "from the future".to_string(),
                "f".repeat(64),
                "2027-01-01 00:00:00".to_string(),
            ),
        ];
        let states: Vec<(i32, MigrationState)> = status(known, &applied)
            .iter()
            .map(|m| (m.version, m.state))
            .collect();
        assert_eq!(
            states,
            [
                (1, MigrationState::Applied),
                (2, MigrationState::Changed),
                (3, MigrationState::Pending),
                (99, MigrationState::Unknown),
            ]
        );
    }
}
