//! `keepd.field_keys`: the field-key versions a cluster has made, which
//! one seals (the highest), how many values each sealed and when one was
//! retired. The keys are never stored: `field_crypto` derives each from
//! the cluster key. This module holds the table's SQL, read and written
//! only by the superuser's background task (`daemon::reencrypt`) and the
//! CLI, and the pure rule that says when the next version is due.

use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::Config;

/// Why a version was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `key_version` asked for it.
    Configured,
    /// The previous one reached `rotate_after`.
    Age,
    /// The previous one sealed `rotate_after_uses` values.
    Uses,
    /// The cluster key rotated: the first version of the new root.
    Root,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Configured => "configured",
            Reason::Age => "age",
            Reason::Uses => "uses",
            Reason::Root => "root",
        }
    }
}

/// One row of `keepd.field_keys`, aged by the database's clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FieldKeyVersion {
    pub version: u32,
    /// Seconds since the epoch.
    pub created_at: u64,
    pub age_seconds: u64,
    /// Values sealed under it, as the nodes have counted them so far.
    pub uses: u64,
    pub reason: String,
    pub retired_at: Option<u64>,
    /// The cluster root generation it derives from: a node seals under it
    /// only once it holds that root.
    pub generation: u32,
}

/// When the current version is replaced: `rotate_after` and
/// `rotate_after_uses`, whichever comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationPolicy {
    pub after: Duration,
    pub after_uses: u64,
}

impl RotationPolicy {
    pub fn of(config: &Config) -> RotationPolicy {
        let application = &config.encryption_at_rest.application;
        RotationPolicy {
            after: application.rotate_after.get(),
            after_uses: application.rotate_after_uses,
        }
    }

    /// Whether `current` is due for replacement, and why.
    pub fn due(&self, current: &FieldKeyVersion) -> Option<Reason> {
        if current.uses >= self.after_uses {
            Some(Reason::Uses)
        } else if current.age_seconds >= self.after.as_secs() {
            Some(Reason::Age)
        } else {
            None
        }
    }

    /// How often a node counts its seals, learns the current version and
    /// looks at the rule: a tenth of `rotate_after`, between 1 s and 30 s.
    pub fn check_every(&self) -> Duration {
        (self.after / 10).clamp(Duration::from_secs(1), Duration::from_secs(30))
    }
}

const VERSIONS: &str = "SELECT version, extract(epoch FROM created_at)::int8, \
     extract(epoch FROM now() - created_at)::int8, uses, reason, \
     extract(epoch FROM retired_at)::int8, generation \
     FROM keepd.field_keys ORDER BY version";

/// Every version, oldest first.
pub async fn versions(client: &Client) -> Result<Vec<FieldKeyVersion>, tokio_postgres::Error> {
    let rows = client.query(VERSIONS, &[]).await?;
    let seconds = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok(rows
        .iter()
        .map(|row| FieldKeyVersion {
            version: u32::try_from(row.get::<_, i32>(0)).unwrap_or(0),
            created_at: seconds(row.get(1)),
            age_seconds: seconds(row.get(2)),
            uses: seconds(row.get(3)),
            reason: row.get(4),
            retired_at: row.get::<_, Option<i64>>(5).map(seconds),
            generation: u32::try_from(row.get::<_, i32>(6)).unwrap_or(1),
        })
        .collect())
}

/// Makes every version up to `floor` (`key_version`) that does not exist
/// yet, of root `generation`; returns the current one (the highest),
/// which may be above it.
pub async fn ensure(
    client: &Client,
    floor: u32,
    generation: u32,
) -> Result<u32, tokio_postgres::Error> {
    let floor = i32::try_from(floor).unwrap_or(i32::MAX);
    let row = client
        .query_one(
            "WITH made AS (INSERT INTO keepd.field_keys (version, reason, generation) \
             SELECT v, 'configured', $2 FROM generate_series(1, $1::int4) v \
             ON CONFLICT (version) DO NOTHING RETURNING version) \
             SELECT greatest((SELECT max(version) FROM keepd.field_keys), \
                             (SELECT max(version) FROM made), $1::int4)",
            &[&floor, &(generation as i32)],
        )
        .await?;
    Ok(u32::try_from(row.get::<_, i32>(0)).unwrap_or(1))
}

/// Adds `seals` to `version`'s count.
pub async fn count_uses(
    client: &Client,
    version: u32,
    seals: u64,
) -> Result<(), tokio_postgres::Error> {
    let (version, seals) = (version as i32, i64::try_from(seals).unwrap_or(i64::MAX));
    client
        .execute(
            "UPDATE keepd.field_keys SET uses = uses + $2 WHERE version = $1",
            &[&version, &seals],
        )
        .await?;
    Ok(())
}

/// Serialises making a version with rotating the cluster key, which
/// carries the versions that exist ("keepd_fk").
pub const VERSIONS_LOCK: i64 = 0x6b65_6570_645f_666b;

/// Makes the version after `current`, of root `generation`, unless
/// another node already made one, or the cluster holds a newer root than
/// `generation` (then nothing): `Some(new)` when this call made it.
pub async fn rotate(
    client: &mut Client,
    current: u32,
    reason: Reason,
    generation: u32,
) -> Result<Option<u32>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.query_one("SELECT pg_advisory_xact_lock($1)", &[&VERSIONS_LOCK])
        .await?;
    // A version made under an old root after a rotation was not carried:
    // the nodes holding the new one would derive another key for it.
    let rows = tx
        .query(
            "INSERT INTO keepd.field_keys (version, reason, generation) \
             SELECT $1::int4 + 1, $2, $3 FROM keepd.field_keys \
             HAVING max(version) = $1::int4 AND NOT EXISTS \
               (SELECT 1 FROM keepd.cluster_key_log WHERE generation > $3) \
             ON CONFLICT (version) DO NOTHING RETURNING version",
            &[&(current as i32), &reason.as_str(), &(generation as i32)],
        )
        .await?;
    tx.commit().await?;
    Ok(rows
        .first()
        .map(|row| u32::try_from(row.get::<_, i32>(0)).unwrap_or(0)))
}

/// Marks every version below `current` not retired yet as retired (no
/// value uses them any more); returns those it marked.
pub async fn retire_below(
    client: &Client,
    current: u32,
) -> Result<Vec<u32>, tokio_postgres::Error> {
    let rows = client
        .query(
            "UPDATE keepd.field_keys SET retired_at = now() \
             WHERE version < $1 AND retired_at IS NULL RETURNING version",
            &[&(current as i32)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| u32::try_from(row.get::<_, i32>(0)).unwrap_or(0))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(age_seconds: u64, uses: u64) -> FieldKeyVersion {
        FieldKeyVersion {
            version: 3,
            created_at: 0,
            age_seconds,
            uses,
            reason: "age".into(),
            retired_at: None,
            generation: 1,
        }
    }

    #[test]
    fn the_first_rule_reached_rotates() {
        let policy = RotationPolicy {
            after: Duration::from_secs(90 * 86_400),
            after_uses: 1_000_000,
        };
        assert_eq!(policy.due(&version(86_400, 10)), None);
        assert_eq!(policy.due(&version(90 * 86_400, 10)), Some(Reason::Age));
        assert_eq!(policy.due(&version(86_400, 1_000_000)), Some(Reason::Uses));
        assert_eq!(
            policy.due(&version(91 * 86_400, 2_000_000)),
            Some(Reason::Uses)
        );
        assert_eq!(policy.check_every(), Duration::from_secs(30));
        let quick = RotationPolicy {
            after: Duration::from_secs(5),
            after_uses: 1,
        };
        assert_eq!(quick.check_every(), Duration::from_secs(1));
    }
}
