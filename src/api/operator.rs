//! The operator's account commands (`keepd account`), which reach the
//! daemon over its control socket, never the database: the daemon runs
//! them as `keepd_operator` in its own pool, with the cluster's keys (an
//! email is looked up by its HMAC, as at login) and its audit chain. What
//! the operator sees of an account is what keepd knows: an id, times,
//! sessions and usage; never an address or any data.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::Api;
pub use super::store::accounts::Summary as AccountSummary;
use super::store::accounts::{self, Lookup, SessionEnd, Summary};
use super::store::usage::Usage;
use super::store::{self, StoreError};
use crate::audit::{self, AuditAction, AuditEntry, AuditError};
use crate::postgres::pool::{GroupRole, OperationContext, PoolError, ScopedTransaction};

/// How the operator names an account: its id or its email.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AccountRef {
    Id(Uuid),
    Email(String),
}

impl std::str::FromStr for AccountRef {
    type Err = String;

    fn from_str(text: &str) -> Result<AccountRef, String> {
        if let Ok(id) = Uuid::parse_str(text) {
            return Ok(AccountRef::Id(id));
        }
        if text.contains('@') {
            // Checked here too, so a malformed address is a usage error.
            return super::auth::normalise_email(text)
                .map(AccountRef::Email)
                .map_err(|e| e.message().to_string());
        }
        Err(format!(
            "`{text}` is neither an account id (a UUID, as `keepd account list` prints) nor an email"
        ))
    }
}

impl std::fmt::Display for AccountRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccountRef::Id(id) => write!(f, "{id}"),
            AccountRef::Email(email) => f.write_str(email),
        }
    }
}

/// One account with the quotas it is held to (`api.quotas`; 0 = none).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccountView {
    pub account: Summary,
    pub quotas: Usage,
}

/// The longest an invite code may stay valid (`keepd account invite
/// --ttl`): a year. Longer is refused as a usage error by the CLI and by
/// the daemon, before Postgres would answer "timestamp out of range".
pub const MAX_INVITE_TTL: Duration = Duration::from_secs(365 * 86_400);

/// Who asked, from the socket's peer credentials; the audit names them.
#[derive(Debug, Clone, Copy)]
pub struct Operator {
    pub uid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("no account {0} on this server")]
    NotFound(AccountRef),
    #[error("account {0} is already {1}")]
    Already(Uuid, &'static str),
    #[error("{0}")]
    BadEmail(String),
    #[error("an invite code stays valid for at most 365d (--ttl)")]
    TtlTooLong,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

const MAX_PAGE: u32 = 1000;

impl Api {
    async fn operator_tx(&self) -> Result<ScopedTransaction, OperatorError> {
        Ok(self
            .pool
            .begin(&OperationContext::system(GroupRole::Operator))
            .await?)
    }

    async fn resolve(
        &self,
        tx: &ScopedTransaction,
        account: &AccountRef,
    ) -> Result<Summary, OperatorError> {
        let lookup = match account {
            AccountRef::Id(id) => Lookup::Id(*id),
            AccountRef::Email(email) => {
                let email = super::auth::normalise_email(email)
                    .map_err(|e| OperatorError::BadEmail(e.message().to_string()))?;
                Lookup::EmailHmac(self.email_hmac(&email))
            }
        };
        accounts::find(tx, &lookup)
            .await?
            .ok_or_else(|| OperatorError::NotFound(account.clone()))
    }

    /// An account with the quotas it is held to.
    fn view(&self, account: Summary) -> AccountView {
        AccountView {
            account,
            quotas: Usage::from(&self.settings.quotas),
        }
    }

    async fn operator_audit(
        &self,
        tx: &mut ScopedTransaction,
        operator: Operator,
        action: AuditAction,
        user: Option<Uuid>,
        started: Instant,
    ) -> Result<(), OperatorError> {
        let mut metadata = json!({"operator": {"uid": operator.uid}});
        if let Some(user) = user {
            metadata["user"] = json!(self.user_ref(user));
        }
        let entry = AuditEntry {
            action,
            rows_affected: 1,
            duration: started.elapsed(),
            source_component: "control",
            metadata,
        };
        Ok(audit::record(tx, &self.node_id, &entry).await?)
    }

    /// Up to `limit` accounts (at most 1000) after `after`, in id order.
    pub async fn operator_list(
        &self,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<Summary>, OperatorError> {
        let tx = self.operator_tx().await?;
        let page = accounts::list(&tx, after, i64::from(limit.clamp(1, MAX_PAGE))).await?;
        tx.commit().await?;
        Ok(page)
    }

    pub async fn operator_show(&self, account: &AccountRef) -> Result<AccountView, OperatorError> {
        let tx = self.operator_tx().await?;
        let account = self.resolve(&tx, account).await?;
        tx.commit().await?;
        Ok(self.view(account))
    }

    /// Disables (ending its sessions: its tokens stop working at once) or
    /// enables the account.
    pub async fn operator_set_disabled(
        &self,
        operator: Operator,
        account: &AccountRef,
        disabled: bool,
    ) -> Result<AccountView, OperatorError> {
        let started = Instant::now();
        let mut tx = self.operator_tx().await?;
        let found = self.resolve(&tx, account).await?;
        if !accounts::set_disabled(&tx, found.id, disabled).await? {
            let state = if disabled { "disabled" } else { "enabled" };
            return Err(OperatorError::Already(found.id, state));
        }
        let action = if disabled {
            accounts::revoke_all_sessions(&tx, found.id, SessionEnd::AccountDisabled).await?;
            AuditAction::AccountDisable
        } else {
            AuditAction::AccountEnable
        };
        self.operator_audit(&mut tx, operator, action, Some(found.id), started)
            .await?;
        let account = self.resolve(&tx, &AccountRef::Id(found.id)).await?;
        tx.commit().await?;
        Ok(self.view(account))
    }

    /// Erases the account and everything it stored, as `DELETE /account`
    /// does, audited as the operator's.
    pub async fn operator_delete(
        &self,
        operator: Operator,
        account: &AccountRef,
    ) -> Result<Summary, OperatorError> {
        let started = Instant::now();
        let mut tx = self.operator_tx().await?;
        let found = self.resolve(&tx, account).await?;
        let rows = accounts::delete(&tx, found.id).await?;
        if rows == 0 {
            // Erased by its owner in between.
            return Err(OperatorError::NotFound(account.clone()));
        }
        self.operator_audit(
            &mut tx,
            operator,
            AuditAction::AccountDelete,
            Some(found.id),
            started,
        )
        .await?;
        tx.commit().await?;
        Ok(found)
    }

    /// Removes the account's second factor (a lost phone): it logs in with
    /// its password alone until it enrols again. Audited.
    pub async fn operator_reset_second_factor(
        &self,
        operator: Operator,
        account: &AccountRef,
    ) -> Result<AccountView, OperatorError> {
        let started = Instant::now();
        let mut tx = self.operator_tx().await?;
        let found = self.resolve(&tx, account).await?;
        if !found.second_factor {
            return Err(OperatorError::Already(found.id, "without a second factor"));
        }
        store::second_factor::remove(&tx, found.id).await?;
        self.operator_audit(
            &mut tx,
            operator,
            AuditAction::SecondFactorReset,
            Some(found.id),
            started,
        )
        .await?;
        let account = self.resolve(&tx, &AccountRef::Id(found.id)).await?;
        tx.commit().await?;
        Ok(self.view(account))
    }

    /// A single-use invite code for `POST /auth/register`.
    pub async fn operator_invite(
        &self,
        operator: Operator,
        ttl: Duration,
    ) -> Result<String, OperatorError> {
        if ttl > MAX_INVITE_TTL {
            return Err(OperatorError::TtlTooLong);
        }
        let started = Instant::now();
        let mut tx = self.operator_tx().await?;
        let code = store::invites::create(&tx, ttl).await?;
        self.operator_audit(&mut tx, operator, AuditAction::InviteCreate, None, started)
            .await?;
        tx.commit().await?;
        Ok(code)
    }
}
