//! `keepd.login_throttle` (as `keepd_auth`): failed password and code
//! attempts per account key (the email's HMAC), shared by every node. An
//! attempt is judged and counted under the row's lock, in the transaction
//! that precedes the slow check, so concurrent guesses queue on the row
//! and each sees the ones before it.

use std::time::Duration;

use super::StoreError;
use crate::postgres::pool::ScopedTransaction;

/// Creates the row or locks it (the no-op update takes the row lock) and
/// reads it: one round trip.
const LOCK: &str = "INSERT INTO keepd.login_throttle AS t (account) VALUES ($1) \
     ON CONFLICT (account) DO UPDATE SET failures = t.failures \
     RETURNING t.failures, extract(epoch FROM now() - t.last_failure)::float8, $2 = ANY(t.known)";

const COUNT_FAILURE: &str = "UPDATE keepd.login_throttle \
     SET failures = failures + 1, last_failure = now() WHERE account = $1";

/// Forgets the failures and puts the address first among the known ones.
const SUCCEEDED: &str = "UPDATE keepd.login_throttle \
     SET failures = 0, last_failure = NULL, known = (array_prepend($2, array_remove(known, $2)))[1:8] \
     WHERE account = $1";

/// An account's failed attempts as the next attempt finds them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Seen {
    pub failures: u32,
    /// Since the last counted failure, by the database's clock (every
    /// node reads the same one).
    pub since_last_failure: Option<Duration>,
    /// The attempt comes from an address the account logged in from.
    pub known_address: bool,
}

/// Locks `account`'s row until `tx` ends and reads it; `client` is the
/// keyed identifier of the address attempting.
pub async fn lock(
    tx: &ScopedTransaction,
    account: &[u8],
    client: &str,
) -> Result<Seen, StoreError> {
    let rows = tx.query(LOCK, &[&account, &client]).await?;
    let row = rows
        .first()
        .expect("INSERT … ON CONFLICT DO UPDATE returns its row");
    let failures: i32 = row.get(0);
    let since: Option<f64> = row.get(1);
    Ok(Seen {
        failures: failures.max(0) as u32,
        since_last_failure: since.map(|s| Duration::from_secs_f64(s.max(0.0))),
        known_address: row.get::<_, Option<bool>>(2).unwrap_or(false),
    })
}

/// Counts one failure now, before the attempt is checked: a right
/// password or code takes it back (`succeeded`).
pub async fn count_failure(tx: &ScopedTransaction, account: &[u8]) -> Result<(), StoreError> {
    tx.execute(COUNT_FAILURE, &[&account]).await?;
    Ok(())
}

/// The attempt from `client` was right.
pub async fn succeeded(
    tx: &ScopedTransaction,
    account: &[u8],
    client: &str,
) -> Result<(), StoreError> {
    tx.execute(SUCCEEDED, &[&account, &client]).await?;
    Ok(())
}
