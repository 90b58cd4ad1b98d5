//! `keepd.account_usage`: what an account stores, kept by triggers on the
//! tables it counts (migration 6), read here against `api.quotas`; a
//! push adds its bytes itself as it commits (`add_pushed_and_commit`,
//! migration 21).

use uuid::Uuid;

use super::StoreError;
use crate::config::QuotasConfig;
use crate::postgres::pool::ScopedTransaction;

const USAGE: &str = "SELECT storage_bytes, vaults, devices, backups \
     FROM keepd.account_usage WHERE user_id = $1";

/// A push's bytes added to its tenant's usage, refused past the quota `$2`
/// (SQLSTATE KQ001, the bytes reached in DETAIL): migration 21.
const ADD_PUSHED: &str = "SELECT keepd.add_pushed_bytes($1, $2)";
const QUOTA_EXCEEDED: &str = "KQ001";

/// An account's usage, or its quotas (0 = unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub storage_bytes: u64,
    pub vaults: u64,
    pub devices: u64,
    pub backups: u64,
}

impl From<&QuotasConfig> for Usage {
    fn from(q: &QuotasConfig) -> Usage {
        Usage {
            storage_bytes: q.storage_bytes,
            vaults: u64::from(q.vaults),
            devices: u64::from(q.devices),
            backups: u64::from(q.backups),
        }
    }
}

/// A quota the account's writes went past: its setting, limit and the
/// usage the write would have reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    pub quota: &'static str,
    pub limit: u64,
    pub would_be: u64,
}

impl Usage {
    /// The first quota of `quotas` this usage is past, if any.
    pub fn exceeds(&self, quotas: &Usage) -> Option<Exceeded> {
        [
            (
                "api.quotas.storage_bytes",
                self.storage_bytes,
                quotas.storage_bytes,
            ),
            ("api.quotas.vaults", self.vaults, quotas.vaults),
            ("api.quotas.devices", self.devices, quotas.devices),
            ("api.quotas.backups", self.backups, quotas.backups),
        ]
        .into_iter()
        .find(|(_, used, limit)| *limit != 0 && used > limit)
        .map(|(quota, would_be, limit)| Exceeded {
            quota,
            limit,
            would_be,
        })
    }
}

/// The account's usage as this transaction sees it (its own writes
/// included). Read after a write, it is exact: the counting trigger holds
/// the usage row locked until commit.
pub async fn of(tx: &ScopedTransaction, user: Uuid) -> Result<Usage, StoreError> {
    let rows = tx.query(USAGE, &[&user]).await?;
    let count = |i: usize| -> u64 {
        rows.first()
            .map_or(0, |row| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0))
    };
    let small = |i: usize| -> u64 {
        rows.first()
            .map_or(0, |row| u64::try_from(row.get::<_, i32>(i)).unwrap_or(0))
    };
    Ok(Usage {
        storage_bytes: count(0),
        vaults: small(1),
        devices: small(2),
        backups: small(3),
    })
}

/// Ends a push: its `bytes` (not counted when appended) added to the
/// account's usage and the transaction committed, in one round trip. The
/// usage row is locked only from here to the end of the commit, so one
/// account's pushes do not queue on it for their whole transaction, and
/// the count it is checked against includes every write of the account
/// committed before. Past `quota` (0: none) nothing commits, and the
/// quota is named with what the account would have reached.
pub async fn add_pushed_and_commit(
    tx: ScopedTransaction,
    bytes: i64,
    quota: u64,
) -> Result<Result<(), Exceeded>, StoreError> {
    let limit = i64::try_from(quota).unwrap_or(i64::MAX);
    match tx.query_and_commit(ADD_PUSHED, &[&bytes, &limit]).await {
        Ok(_) => Ok(Ok(())),
        Err(crate::postgres::pool::PoolError::Sql(e))
            if e.code().map(|c| c.code()) == Some(QUOTA_EXCEEDED) =>
        {
            let would_be = e
                .as_db_error()
                .and_then(|db| db.detail())
                .and_then(|detail| detail.parse().ok())
                .unwrap_or(quota.saturating_add(1));
            Ok(Err(Exceeded {
                quota: "api.quotas.storage_bytes",
                limit: quota,
                would_be,
            }))
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_unlimited_and_the_first_quota_past_is_named() {
        let quotas = Usage {
            storage_bytes: 100,
            vaults: 0,
            devices: 2,
            backups: 1,
        };
        let within = Usage {
            storage_bytes: 100,
            vaults: 10_000,
            devices: 2,
            backups: 1,
        };
        assert_eq!(within.exceeds(&quotas), None);
        let past = Usage {
            devices: 3,
            backups: 2,
            ..within
        };
        assert_eq!(
            past.exceeds(&quotas),
            Some(Exceeded {
                quota: "api.quotas.devices",
                limit: 2,
                would_be: 3
            })
        );
    }
}
