//! The tables the API serves, one module each: its statements, their
//! parameters and the decoding of its rows live together, so a handler
//! never pairs a `$n` with a `row.get(i)`. Every function runs in the
//! caller's `ScopedTransaction` (its group role and tenant already set, so
//! row-level security limits it to the caller's rows; the explicit
//! `user_id` conditions are for the indexes), or, for a read that is a
//! request's whole work (`logs::page`), through the caller's `Reader`,
//! which runs each statement in a transaction of its own with the same
//! role, tenant and session check. The two writes a push makes outside
//! its transaction open one of their own: `usage::reserve` with the same
//! role and tenant, `logs::announce` (many pushes' events at once) with
//! the role and no tenant. Encrypted columns are sealed and opened here,
//! through the typed columns of `field_crypto`.

pub mod accounts;
pub mod backups;
pub mod devices;
pub mod invites;
pub mod logs;
pub mod opaque_logins;
pub mod second_factor;
pub mod throttle;
pub mod usage;
pub mod vaults;

use std::future::Future;

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::field_crypto::FieldError;
use crate::postgres::pool::PoolError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Field(#[from] FieldError),
    #[error("no randomness: {0}")]
    Random(String),
    #[error("cannot encode a record: {0}")]
    Encode(String),
    #[error("a write that runs to its end was cut short: {0}")]
    Interrupted(String),
}

impl StoreError {
    /// A stored answer (an Idempotency-Key's record from before schema
    /// v25) that does not read back as one.
    fn decode(e: serde_json::Error) -> StoreError {
        StoreError::Encode(format!("a stored answer does not read back: {e}"))
    }
}

/// Runs one read statement in a transaction of its own, scoped to the
/// caller (role, tenant, and whatever the caller checks with it).
pub trait Reader: Sync {
    type Error: From<StoreError>;

    fn read(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<Row>, Self::Error>> + Send;
}
