//! `keepd.users` and `keepd.sessions` (as `keepd_auth`; every role that
//! serves a caller reads its session).

use std::time::SystemTime;

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::StoreError;
use crate::field_crypto::{FieldCipher, column};
use crate::postgres::pool::{OperationContext, RoleAwarePool, ScopedTransaction};

/// Registers a user; no row back when the email is taken.
const INSERT_USER: &str = "INSERT INTO keepd.users (id, email_hmac, password_hash, opaque_record) \
     VALUES ($1, $2, $3, $4) ON CONFLICT (email_hmac) DO NOTHING RETURNING created_at";

/// The account for a login (visible through the email-HMAC policy).
const USER_BY_EMAIL: &str = "SELECT id, password_hash, opaque_record, created_at, \
     disabled_at IS NOT NULL FROM keepd.users WHERE email_hmac = $1";

const CREDENTIALS: &str =
    "SELECT email_hmac, password_hash, opaque_record FROM keepd.users WHERE id = $1";

/// One credential replaces the other (the table's check keeps exactly one).
const SET_CREDENTIAL: &str =
    "UPDATE keepd.users SET password_hash = $2, opaque_record = $3 WHERE id = $1";

/// Each statement that ends sessions names why first, for the streams
/// the trigger of schema v13 ends (`events::listen`).
const DELETE_USER: &str = "WITH why AS (SELECT set_config('keepd.session_end', 'account_deleted', true)) \
     DELETE FROM keepd.users USING why WHERE id = $1";

const INSERT_SESSION: &str =
    "INSERT INTO keepd.sessions (id, user_id, expires_at, second_factor) VALUES ($1, $2, $3, $4)";

/// The session proved the second factor after its login (enrolment
/// confirmed in it).
const SESSION_SECOND_FACTOR: &str = "UPDATE keepd.sessions SET second_factor = true WHERE id = $1";

/// Locks the account row against a concurrent disable (whose UPDATE
/// conflicts with FOR SHARE, unlike the session's foreign-key check):
/// either the disable waits and then ends the new session too, or the
/// login waits and sees the account disabled.
const STILL_ENABLED: &str = "SELECT disabled_at IS NULL FROM keepd.users WHERE id = $1 FOR SHARE";

const SESSION_IS_LIVE: &str = "SELECT second_factor FROM keepd.sessions \
     WHERE id = $1 AND revoked_at IS NULL AND expires_at > now()";

const REVOKE_SESSION: &str = "WITH why AS (SELECT set_config('keepd.session_end', $2, true)) \
     UPDATE keepd.sessions SET revoked_at = now() FROM why WHERE id = $1 AND revoked_at IS NULL";

const REVOKE_ALL_SESSIONS: &str = "WITH why AS (SELECT set_config('keepd.session_end', $2, true)) \
     UPDATE keepd.sessions SET revoked_at = now() FROM why \
     WHERE user_id = $1 AND revoked_at IS NULL";

/// Why sessions end, as their streams' final event names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    Logout,
    PasswordChanged,
    AccountDisabled,
}

impl SessionEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionEnd::Logout => "logout",
            SessionEnd::PasswordChanged => "password_changed",
            SessionEnd::AccountDisabled => "account_disabled",
        }
    }
}

/// How an account proves its owner: one of the two, never both.
pub enum Credential {
    /// An Argon2id hash of the password (the password routes).
    Password(String),
    /// An OPAQUE record (`crate::opaque`); stored sealed.
    Opaque(Vec<u8>),
}

impl Credential {
    /// How the account logs in, as audit entries name it.
    pub fn method(&self) -> &'static str {
        match self {
            Credential::Password(_) => "password",
            Credential::Opaque(_) => "opaque",
        }
    }

    /// The two columns, the record sealed.
    fn columns(self, fields: &FieldCipher) -> (Option<String>, Option<Vec<u8>>) {
        match self {
            Credential::Password(hash) => (Some(hash), None),
            Credential::Opaque(record) => {
                (None, Some(fields.seal_bytes(column::OPAQUE_RECORD, record)))
            }
        }
    }

    fn from_columns(
        fields: &FieldCipher,
        password_hash: Option<String>,
        record: Option<Vec<u8>>,
    ) -> Result<Credential, StoreError> {
        match (password_hash, record) {
            (_, Some(sealed)) => Ok(Credential::Opaque(
                fields.open_bytes(column::OPAQUE_RECORD, sealed)?,
            )),
            (Some(hash), None) => Ok(Credential::Password(hash)),
            (None, None) => Err(StoreError::Encode(
                "an account without a credential (schema v16 forbids it)".into(),
            )),
        }
    }
}

/// An account as a login sees it.
pub struct Account {
    pub id: Uuid,
    pub credential: Credential,
    pub created_at: SystemTime,
    /// By the operator (`keepd account disable`): it may not log in.
    pub disabled: bool,
}

/// Creates the account; its creation time, or None when the email is taken.
pub async fn create(
    tx: &ScopedTransaction,
    fields: &FieldCipher,
    id: Uuid,
    email_hmac: &[u8],
    credential: Credential,
) -> Result<Option<SystemTime>, StoreError> {
    let (hash, record) = credential.columns(fields);
    let rows = tx
        .query(INSERT_USER, &[&id, &email_hmac, &hash, &record])
        .await?;
    Ok(rows.first().map(|row| row.get(0)))
}

pub async fn by_email(
    tx: &ScopedTransaction,
    fields: &FieldCipher,
    email_hmac: &[u8],
) -> Result<Option<Account>, StoreError> {
    let rows = tx.query(USER_BY_EMAIL, &[&email_hmac]).await?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    Ok(Some(Account {
        id: row.get(0),
        credential: Credential::from_columns(fields, row.get(1), row.get(2))?,
        created_at: row.get(3),
        disabled: row.get(4),
    }))
}

/// What re-authenticating an account checks: its throttle key (the
/// email's HMAC) and its credential.
pub struct Credentials {
    pub email_hmac: Vec<u8>,
    pub credential: Credential,
}

pub async fn credentials(
    tx: &ScopedTransaction,
    fields: &FieldCipher,
    user: Uuid,
) -> Result<Option<Credentials>, StoreError> {
    let rows = tx.query(CREDENTIALS, &[&user]).await?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    Ok(Some(Credentials {
        email_hmac: row.get(0),
        credential: Credential::from_columns(fields, row.get(1), row.get(2))?,
    }))
}

/// Replaces the account's credential (a new password, a new OPAQUE
/// record, or a move from the one to the other).
pub async fn set_credential(
    tx: &ScopedTransaction,
    fields: &FieldCipher,
    user: Uuid,
    credential: Credential,
) -> Result<(), StoreError> {
    let (hash, record) = credential.columns(fields);
    tx.execute(SET_CREDENTIAL, &[&user, &hash, &record]).await?;
    Ok(())
}

/// Erases the account (and, by cascade, everything it owns); rows deleted.
pub async fn delete(tx: &ScopedTransaction, user: Uuid) -> Result<u64, StoreError> {
    Ok(tx.execute(DELETE_USER, &[&user]).await?)
}

/// Opens a session unless the account was disabled (or erased) since the
/// password was checked; whether it did.
pub async fn open_session(
    tx: &ScopedTransaction,
    session: Uuid,
    user: Uuid,
    expires_at: SystemTime,
    second_factor: bool,
) -> Result<bool, StoreError> {
    let enabled = tx.query(STILL_ENABLED, &[&user]).await?;
    if !enabled.first().is_some_and(|row| row.get::<_, bool>(0)) {
        return Ok(false);
    }
    tx.execute(
        INSERT_SESSION,
        &[&session, &user, &expires_at, &second_factor],
    )
    .await?;
    Ok(true)
}

/// Marks the session as having proved the second factor.
pub async fn session_proved_second_factor(
    tx: &ScopedTransaction,
    session: Uuid,
) -> Result<(), StoreError> {
    tx.execute(SESSION_SECOND_FACTOR, &[&session]).await?;
    Ok(())
}

/// A live session, as a transaction opened in it sees it.
pub struct LiveSession {
    /// Its login proved the second factor (or a confirmation in it did).
    pub second_factor: bool,
}

/// Opens the transaction of `ctx` with the session's liveness checked in
/// it, in the same round trip; None when the session is revoked or expired.
pub async fn begin_in_session(
    pool: &RoleAwarePool,
    ctx: &OperationContext,
    session: Uuid,
) -> Result<Option<(ScopedTransaction, LiveSession)>, StoreError> {
    let (tx, rows) = pool.begin_with(ctx, SESSION_IS_LIVE, &[&session]).await?;
    Ok(rows.first().map(|row| {
        let second_factor = row.get(0);
        (tx, LiveSession { second_factor })
    }))
}

/// Runs `sql` as `ctx` in a transaction of its own, after the session's
/// liveness is checked in it, all in one round trip; its rows and the
/// session, or None when the session is revoked or expired (the rows are
/// then dropped unread). For reads only.
pub async fn read_in_session(
    pool: &RoleAwarePool,
    ctx: &OperationContext,
    session: Uuid,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<(Vec<Row>, LiveSession)>, StoreError> {
    let mut found = pool
        .read(ctx, &[(SESSION_IS_LIVE, &[&session]), (sql, params)])
        .await?
        .into_iter();
    let (live, rows) = (found.next(), found.next());
    Ok(live
        .and_then(|live| live.first().map(|row| row.get(0)))
        .map(|second_factor| (rows.unwrap_or_default(), LiveSession { second_factor })))
}

/// Ends one session; sessions ended (0 or 1).
pub async fn revoke_session(
    tx: &ScopedTransaction,
    session: Uuid,
    why: SessionEnd,
) -> Result<u64, StoreError> {
    Ok(tx
        .execute(REVOKE_SESSION, &[&session, &why.as_str()])
        .await?)
}

/// Ends every session of the account; how many.
pub async fn revoke_all_sessions(
    tx: &ScopedTransaction,
    user: Uuid,
    why: SessionEnd,
) -> Result<u64, StoreError> {
    Ok(tx
        .execute(REVOKE_ALL_SESSIONS, &[&user, &why.as_str()])
        .await?)
}

/// The operator's view (`keepd account`, as `keepd_operator`, whose
/// policies show every account): an account with its live sessions and
/// what it stores.
const SUMMARY: &str = "SELECT u.id, to_char(u.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
       to_char(u.disabled_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
       (SELECT count(*) FROM keepd.sessions s \
         WHERE s.user_id = u.id AND s.revoked_at IS NULL AND s.expires_at > now()), \
       coalesce(a.storage_bytes, 0), coalesce(a.vaults, 0), coalesce(a.devices, 0), \
       coalesce(a.backups, 0), u.totp_confirmed_at IS NOT NULL \
     FROM keepd.users u LEFT JOIN keepd.account_usage a ON a.user_id = u.id";

/// A page of accounts in id order, after `$1` (nil for the first).
const LIST: &str = "ORDER BY u.id LIMIT $2";

/// Disables or enables; no row when the account is unknown or already so.
const SET_DISABLED: &str = "UPDATE keepd.users \
     SET disabled_at = CASE WHEN $2 THEN now() END \
     WHERE id = $1 AND (disabled_at IS NOT NULL) <> $2";

/// An account as the operator sees it: no email (keepd keeps only its
/// HMAC), no data.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Summary {
    pub id: Uuid,
    pub created_at: String,
    pub disabled_at: Option<String>,
    pub live_sessions: u64,
    pub usage: super::usage::Usage,
    /// A confirmed second factor (TOTP).
    #[serde(default)]
    pub second_factor: bool,
}

fn summary(row: &tokio_postgres::Row) -> Summary {
    let count = |i: usize| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
    let small = |i: usize| u64::try_from(row.get::<_, i32>(i)).unwrap_or(0);
    Summary {
        id: row.get(0),
        created_at: row.get(1),
        disabled_at: row.get(2),
        live_sessions: count(3),
        usage: super::usage::Usage {
            storage_bytes: count(4),
            vaults: small(5),
            devices: small(6),
            backups: small(7),
        },
        second_factor: row.get(8),
    }
}

/// Up to `limit` accounts after `after`, in id order.
pub async fn list(
    tx: &ScopedTransaction,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Summary>, StoreError> {
    let sql = format!("{SUMMARY} WHERE u.id > $1 {LIST}");
    let rows = tx
        .query(&sql, &[&after.unwrap_or(Uuid::nil()), &limit])
        .await?;
    Ok(rows.iter().map(summary).collect())
}

/// One account, by id or by the HMAC of its email.
pub async fn find(tx: &ScopedTransaction, key: &Lookup) -> Result<Option<Summary>, StoreError> {
    let rows = match key {
        Lookup::Id(id) => {
            tx.query(&format!("{SUMMARY} WHERE u.id = $1"), &[id])
                .await?
        }
        Lookup::EmailHmac(hmac) => {
            tx.query(&format!("{SUMMARY} WHERE u.email_hmac = $1"), &[hmac])
                .await?
        }
    };
    Ok(rows.first().map(summary))
}

/// How the operator names an account.
#[derive(Debug, Clone)]
pub enum Lookup {
    Id(Uuid),
    EmailHmac(Vec<u8>),
}

/// Disables (`true`) or enables the account; false when it is unknown or
/// already in that state.
pub async fn set_disabled(
    tx: &ScopedTransaction,
    user: Uuid,
    disabled: bool,
) -> Result<bool, StoreError> {
    Ok(tx.execute(SET_DISABLED, &[&user, &disabled]).await? > 0)
}
