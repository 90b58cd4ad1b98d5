//! `keepd.invites`: single-use registration codes (`api.registration:
//! invite`). Only a code's SHA-256 is stored.

use std::time::Duration;

use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::StoreError;
use crate::postgres::pool::ScopedTransaction;

const CREATE: &str = "INSERT INTO keepd.invites (code_hash, expires_at) \
     VALUES ($1, now() + make_interval(secs => $2))";

/// Marks the invite used (by no account yet); no row when it is unknown,
/// used or expired. One statement, so two registrations cannot share a
/// code; the registration's transaction holds it until it commits, and a
/// registration that fails after it (a taken email) gives it back by
/// rolling back.
const TAKE: &str = "UPDATE keepd.invites SET used_at = now() \
     WHERE code_hash = $1 AND used_at IS NULL AND expires_at > now()";

const USED_BY: &str = "UPDATE keepd.invites SET used_by = $2 WHERE code_hash = $1";

fn code_hash(code: &str) -> Vec<u8> {
    Sha256::digest(code.trim().as_bytes()).to_vec()
}

/// A new invite code valid for `ttl`: 128 random bits, as hex.
pub async fn create(tx: &ScopedTransaction, ttl: Duration) -> Result<String, StoreError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| StoreError::Random(e.to_string()))?;
    let code = hex::encode(bytes);
    tx.execute(CREATE, &[&code_hash(&code), &ttl.as_secs_f64()])
        .await?;
    Ok(code)
}

/// Takes the invite, before anything tells whether the email is free;
/// false when the code is unknown, used or expired.
pub async fn take(tx: &ScopedTransaction, code: &str) -> Result<bool, StoreError> {
    Ok(tx.execute(TAKE, &[&code_hash(code)]).await? > 0)
}

/// Records which account the invite `take` took made.
pub async fn used_by(tx: &ScopedTransaction, code: &str, user: Uuid) -> Result<(), StoreError> {
    tx.execute(USED_BY, &[&code_hash(code), &user]).await?;
    Ok(())
}
