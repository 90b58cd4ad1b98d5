//! `keepd.invites`: single-use registration codes (`api.registration:
//! invite`). Only a code's SHA-256 is stored.

use std::time::Duration;

use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::StoreError;
use crate::postgres::pool::ScopedTransaction;

const CREATE: &str = "INSERT INTO keepd.invites (code_hash, expires_at) \
     VALUES ($1, now() + make_interval(secs => $2))";

/// Marks the invite used by `$2`; no row when it is unknown, used or
/// expired. One statement, so two registrations cannot share a code.
const CONSUME: &str = "UPDATE keepd.invites SET used_at = now(), used_by = $2 \
     WHERE code_hash = $1 AND used_at IS NULL AND expires_at > now()";

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

/// Uses the invite for `user`; false when the code is unknown, used or
/// expired.
pub async fn consume(tx: &ScopedTransaction, code: &str, user: Uuid) -> Result<bool, StoreError> {
    Ok(tx.execute(CONSUME, &[&code_hash(code), &user]).await? > 0)
}
