//! `keepd.account_usage`: what an account stores, kept by triggers on the
//! tables it counts (migration 6), read here against `api.quotas`; a
//! push reserves its bytes before its transaction and claims them in it
//! (`reserve`, migration 23).

use uuid::Uuid;

use super::StoreError;
use crate::config::QuotasConfig;
use crate::postgres::pool::{
    GroupRole, OperationContext, PoolError, RoleAwarePool, ScopedTransaction,
};

const USAGE: &str = "SELECT storage_bytes, vaults, devices, backups \
     FROM keepd.account_usage WHERE user_id = $1";

/// A push's bytes reserved on its tenant's usage, refused past the quota
/// `$2` (SQLSTATE KQ001, the bytes reached in DETAIL), claimed by the push,
/// given back if it did not commit: migration 23.
const RESERVE: &str = "SELECT keepd.reserve_pushed_bytes($1, $2)";
const CLAIM: &str = "SELECT keepd.claim_pushed_bytes($1)";
const GIVE_BACK: &str = "SELECT keepd.give_back_pushed_bytes($1)";
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

/// A push's bytes counted on its account (and checked against the
/// quota) before its transaction, in one of their own committed without
/// waiting for the disk, so no lock one account's pushes share is held
/// while a commit is flushed (migration 23). The push's transaction
/// claims it ([`Reservation::claim_and_commit`]); dropped unclaimed (the
/// push failed, was answered from its Idempotency-Key, or was cancelled)
/// it is given back. Giving back a reservation the push claimed changes
/// nothing, so a push whose commit keepd never saw answered is never
/// counted twice nor uncounted.
pub struct Reservation {
    id: Uuid,
    pool: RoleAwarePool,
    ctx: OperationContext,
    settled: bool,
}

/// The reservation of `bytes` for `user` (as the sync role), or the quota
/// it would pass (`quota`, 0: none). It runs to its end even if the
/// request is dropped meanwhile (a client that went away): the
/// reservation is then dropped with the task's output, and so given back,
/// rather than committed with no one to claim it.
pub async fn reserve(
    pool: &RoleAwarePool,
    user: Uuid,
    bytes: i64,
    quota: u64,
) -> Result<Result<Reservation, Exceeded>, StoreError> {
    let pool = pool.clone();
    tokio::spawn(async move { reserve_detached(pool, user, bytes, quota).await })
        .await
        .map_err(|e| StoreError::Interrupted(e.to_string()))?
}

async fn reserve_detached(
    pool: RoleAwarePool,
    user: Uuid,
    bytes: i64,
    quota: u64,
) -> Result<Result<Reservation, Exceeded>, StoreError> {
    let ctx = OperationContext::user(GroupRole::Sync, user.to_string());
    let limit = i64::try_from(quota).unwrap_or(i64::MAX);
    match pool.run_unflushed(&ctx, RESERVE, &[&bytes, &limit]).await {
        Ok(rows) => {
            let id = rows.first().map(|row| row.get(0)).ok_or_else(|| {
                StoreError::Encode("a reservation came back without its id".into())
            })?;
            Ok(Ok(Reservation {
                id,
                pool,
                ctx,
                settled: false,
            }))
        }
        Err(PoolError::Sql(e)) if e.code().map(|c| c.code()) == Some(QUOTA_EXCEEDED) => {
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

impl Reservation {
    /// Ends the push: the reservation claimed and `tx` committed, in one
    /// round trip. A reservation given back meanwhile (the janitor's, after
    /// an hour) aborts the transaction: nothing is stored uncounted.
    pub async fn claim_and_commit(mut self, tx: ScopedTransaction) -> Result<(), StoreError> {
        let outcome = tx.query_and_commit(CLAIM, &[&self.id]).await;
        // Committed: the claim used the reservation. Refused: the
        // transaction rolled back and the reservation goes back on drop.
        // Lost on the way: giving back is harmless either way.
        self.settled = outcome.is_ok();
        outcome?;
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let (pool, ctx, id) = (self.pool.clone(), self.ctx.clone(), self.id);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            if let Err(e) = pool.run_unflushed(&ctx, GIVE_BACK, &[&id]).await {
                // Counted until the janitor gives it back (after an hour).
                tracing::warn!(reservation = %id, error = %e, "could not give back a push's reserved bytes");
            }
        });
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
