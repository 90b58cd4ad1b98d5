//! `keepd.opaque_logins` (as `keepd_auth`, with the email's HMAC set): an
//! OPAQUE login between its two messages. The server's state is sealed
//! under the field key; a state is read once (deleted as it is read) and
//! only before it expires, so a finish can be neither replayed nor late.

use std::time::Duration;

use uuid::Uuid;
use zeroize::Zeroizing;

use super::StoreError;
use crate::field_crypto::{FieldCipher, column};
use crate::postgres::pool::ScopedTransaction;

const INSERT: &str = "INSERT INTO keepd.opaque_logins (id, account, user_id, state, expires_at) \
     VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))";

const TAKE: &str = "DELETE FROM keepd.opaque_logins \
     WHERE id = $1 AND account = $2 AND expires_at > now() RETURNING user_id, state";

/// A login its start left.
pub struct Pending {
    /// The account it is for; None when none has the email (the fake
    /// record answered), and then nothing can verify.
    pub user: Option<Uuid>,
    pub state: Zeroizing<Vec<u8>>,
}

/// Keeps a login's state for `ttl`.
pub async fn keep(
    tx: &ScopedTransaction,
    fields: &FieldCipher,
    id: Uuid,
    account: &[u8],
    user: Option<Uuid>,
    state: &[u8],
    ttl: Duration,
) -> Result<(), StoreError> {
    let sealed = fields.seal_bytes(column::OPAQUE_LOGIN_STATE, state.to_vec());
    tx.execute(INSERT, &[&id, &account, &user, &sealed, &ttl.as_secs_f64()])
        .await?;
    Ok(())
}

/// The login `id` of `account`, gone from the table; None when there is
/// none: never started, finished already, or expired.
pub async fn take(
    tx: &ScopedTransaction,
    fields: &FieldCipher,
    id: Uuid,
    account: &[u8],
) -> Result<Option<Pending>, StoreError> {
    let rows = tx.query(TAKE, &[&id, &account]).await?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    Ok(Some(Pending {
        user: row.get(0),
        state: Zeroizing::new(fields.open_bytes(column::OPAQUE_LOGIN_STATE, row.get(1))?),
    }))
}
