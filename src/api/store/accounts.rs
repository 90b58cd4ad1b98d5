//! `keepd.users` and `keepd.sessions` (as `keepd_auth`; every role that
//! serves a caller reads its session).

use std::time::SystemTime;

use uuid::Uuid;

use super::StoreError;
use crate::postgres::pool::{OperationContext, RoleAwarePool, ScopedTransaction};

/// Registers a user; no row back when the email is taken.
const INSERT_USER: &str = "INSERT INTO keepd.users (id, email_hmac, password_hash) \
     VALUES ($1, $2, $3) ON CONFLICT (email_hmac) DO NOTHING RETURNING created_at";

/// The account for a login (visible through the email-HMAC policy).
const USER_BY_EMAIL: &str =
    "SELECT id, password_hash, created_at FROM keepd.users WHERE email_hmac = $1";

const PASSWORD_HASH: &str = "SELECT password_hash FROM keepd.users WHERE id = $1";

const SET_PASSWORD: &str = "UPDATE keepd.users SET password_hash = $2 WHERE id = $1";

const DELETE_USER: &str = "DELETE FROM keepd.users WHERE id = $1";

const INSERT_SESSION: &str =
    "INSERT INTO keepd.sessions (id, user_id, expires_at) VALUES ($1, $2, $3)";

const SESSION_IS_LIVE: &str = "SELECT 1 FROM keepd.sessions \
     WHERE id = $1 AND revoked_at IS NULL AND expires_at > now()";

const REVOKE_SESSION: &str =
    "UPDATE keepd.sessions SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL";

const REVOKE_ALL_SESSIONS: &str =
    "UPDATE keepd.sessions SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL";

/// An account as a login sees it.
pub struct Account {
    pub id: Uuid,
    pub password_hash: String,
    pub created_at: SystemTime,
}

/// Creates the account; its creation time, or None when the email is taken.
pub async fn create(
    tx: &ScopedTransaction,
    id: Uuid,
    email_hmac: &[u8],
    password_hash: &str,
) -> Result<Option<SystemTime>, StoreError> {
    let rows = tx
        .query(INSERT_USER, &[&id, &email_hmac, &password_hash])
        .await?;
    Ok(rows.first().map(|row| row.get(0)))
}

pub async fn by_email(
    tx: &ScopedTransaction,
    email_hmac: &[u8],
) -> Result<Option<Account>, StoreError> {
    let rows = tx.query(USER_BY_EMAIL, &[&email_hmac]).await?;
    Ok(rows.first().map(|row| Account {
        id: row.get(0),
        password_hash: row.get(1),
        created_at: row.get(2),
    }))
}

pub async fn password_hash(
    tx: &ScopedTransaction,
    user: Uuid,
) -> Result<Option<String>, StoreError> {
    let rows = tx.query(PASSWORD_HASH, &[&user]).await?;
    Ok(rows.first().map(|row| row.get(0)))
}

pub async fn set_password(
    tx: &ScopedTransaction,
    user: Uuid,
    password_hash: &str,
) -> Result<(), StoreError> {
    tx.execute(SET_PASSWORD, &[&user, &password_hash]).await?;
    Ok(())
}

/// Erases the account (and, by cascade, everything it owns); rows deleted.
pub async fn delete(tx: &ScopedTransaction, user: Uuid) -> Result<u64, StoreError> {
    Ok(tx.execute(DELETE_USER, &[&user]).await?)
}

pub async fn open_session(
    tx: &ScopedTransaction,
    session: Uuid,
    user: Uuid,
    expires_at: SystemTime,
) -> Result<(), StoreError> {
    tx.execute(INSERT_SESSION, &[&session, &user, &expires_at])
        .await?;
    Ok(())
}

/// Opens the transaction of `ctx` with the session's liveness checked in
/// it, in the same round trip; None when the session is revoked or expired.
pub async fn begin_in_session(
    pool: &RoleAwarePool,
    ctx: &OperationContext,
    session: Uuid,
) -> Result<Option<ScopedTransaction>, StoreError> {
    let (tx, rows) = pool.begin_with(ctx, SESSION_IS_LIVE, &[&session]).await?;
    Ok((!rows.is_empty()).then_some(tx))
}

/// Ends one session; sessions ended (0 or 1).
pub async fn revoke_session(tx: &ScopedTransaction, session: Uuid) -> Result<u64, StoreError> {
    Ok(tx.execute(REVOKE_SESSION, &[&session]).await?)
}

/// Ends every session of the account; how many.
pub async fn revoke_all_sessions(tx: &ScopedTransaction, user: Uuid) -> Result<u64, StoreError> {
    Ok(tx.execute(REVOKE_ALL_SESSIONS, &[&user]).await?)
}
