//! An account's TOTP secret, last accepted step and recovery codes
//! (`keepd.users`' totp columns and `keepd.recovery_codes`, as
//! `keepd_auth` in the account's own transaction). The secret is sealed.

use uuid::Uuid;
use zeroize::Zeroizing;

use super::StoreError;
use crate::field_crypto::{FieldCipher, column};
use crate::postgres::pool::ScopedTransaction;

const ENROL: &str = "UPDATE keepd.users SET totp_secret = $2, totp_confirmed_at = NULL, \
     totp_last_step = NULL WHERE id = $1 AND totp_confirmed_at IS NULL";

const READ: &str =
    "SELECT totp_secret, totp_confirmed_at IS NOT NULL FROM keepd.users WHERE id = $1";

/// Accepts `$2` unless a code of that step or a later one was accepted:
/// the row's lock orders two logins with the same code, and the second
/// finds the step taken.
const TAKE_STEP: &str = "UPDATE keepd.users SET totp_last_step = $2 \
     WHERE id = $1 AND totp_secret IS NOT NULL \
       AND (totp_last_step IS NULL OR totp_last_step < $2)";

const CONFIRM: &str = "UPDATE keepd.users SET totp_confirmed_at = now() WHERE id = $1";

const ADD_RECOVERY: &str = "INSERT INTO keepd.recovery_codes (user_id, code_hash) VALUES ($1, $2)";

const USE_RECOVERY: &str = "UPDATE keepd.recovery_codes SET used_at = now() \
     WHERE user_id = $1 AND code_hash = $2 AND used_at IS NULL";

const REMOVE: &str = "UPDATE keepd.users SET totp_secret = NULL, totp_confirmed_at = NULL, \
     totp_last_step = NULL WHERE id = $1";

const REMOVE_RECOVERY: &str = "DELETE FROM keepd.recovery_codes WHERE user_id = $1";

/// An account's second factor.
pub struct Enrolment {
    pub secret: Zeroizing<Vec<u8>>,
    /// Confirmed with a code: from then on every login needs one.
    pub confirmed: bool,
}

/// Stores a new secret, unconfirmed; false when a confirmed one exists
/// (turn that off first).
pub async fn enrol(
    tx: &ScopedTransaction,
    fields: &FieldCipher,
    user: Uuid,
    secret: &[u8],
) -> Result<bool, StoreError> {
    let sealed = fields.seal_bytes(column::TOTP_SECRET, secret.to_vec());
    Ok(tx.execute(ENROL, &[&user, &sealed]).await? == 1)
}

pub async fn read(
    tx: &ScopedTransaction,
    fields: &FieldCipher,
    user: Uuid,
) -> Result<Option<Enrolment>, StoreError> {
    let rows = tx.query(READ, &[&user]).await?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let Some(sealed) = row.get::<_, Option<Vec<u8>>>(0) else {
        return Ok(None);
    };
    Ok(Some(Enrolment {
        secret: Zeroizing::new(fields.open_bytes(column::TOTP_SECRET, sealed)?),
        confirmed: row.get(1),
    }))
}

/// Takes time step `step` for the account; false when it (or a later
/// one) was taken already: the code is a replay.
pub async fn take_step(tx: &ScopedTransaction, user: Uuid, step: u64) -> Result<bool, StoreError> {
    let step = i64::try_from(step).unwrap_or(i64::MAX);
    Ok(tx.execute(TAKE_STEP, &[&user, &step]).await? == 1)
}

/// Confirms the enrolment and stores the recovery codes' hashes.
pub async fn confirm(
    tx: &ScopedTransaction,
    user: Uuid,
    recovery: &[[u8; 32]],
) -> Result<(), StoreError> {
    tx.execute(CONFIRM, &[&user]).await?;
    tx.execute(REMOVE_RECOVERY, &[&user]).await?;
    for hash in recovery {
        tx.execute(ADD_RECOVERY, &[&user, &hash.as_slice()]).await?;
    }
    Ok(())
}

/// Uses a recovery code; false when it is unknown or used.
pub async fn use_recovery(
    tx: &ScopedTransaction,
    user: Uuid,
    hash: &[u8; 32],
) -> Result<bool, StoreError> {
    Ok(tx.execute(USE_RECOVERY, &[&user, &hash.as_slice()]).await? == 1)
}

/// Removes the second factor and its recovery codes (by its owner, or by
/// the operator as `keepd_operator`); whether there was one.
pub async fn remove(tx: &ScopedTransaction, user: Uuid) -> Result<bool, StoreError> {
    tx.execute(REMOVE_RECOVERY, &[&user]).await?;
    Ok(tx.execute(REMOVE, &[&user]).await? == 1)
}
