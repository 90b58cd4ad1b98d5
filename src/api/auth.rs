//! Accounts: register, login, logout, password change, erasure.
//!
//! The email is kept only as a keyed HMAC of its normalised form; the
//! password only as an Argon2id hash. A failed login looks the same
//! whether the account exists or not (same answer, same hashing work).

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ClientAddr, UserAuth};
use super::limits::Attempt;
use super::opaque::OpaqueProofFields;
use super::second_factor::{self, SecondFactorFields};
use super::store::accounts::{Credential, SessionEnd};
use super::store::usage::{self, Usage};
use super::store::{accounts, invites, throttle};
use super::{Api, iso8601};
use crate::audit;
use crate::audit::AuditAction;
use crate::config::Registration;
use crate::postgres::pool::{GroupRole, OperationContext, ScopedTransaction};
use crate::secrets::values::SecretString;

const MIN_PASSWORD_CHARS: usize = 8;
/// In characters, as the OpenAPI document states it (at most 1 KiB).
const MAX_PASSWORD_CHARS: usize = 256;
const MAX_EMAIL_BYTES: usize = 254;

#[derive(Deserialize, ToSchema)]
pub struct CredentialsBody {
    #[schema(format = Email, max_length = 254)]
    email: String,
    #[schema(value_type = String, format = Password, min_length = 8, max_length = 256)]
    password: SecretString,
    /// For an account with a second factor.
    #[serde(flatten)]
    second_factor: SecondFactorFields,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisterBody {
    #[schema(format = Email, max_length = 254)]
    email: String,
    #[schema(value_type = String, format = Password, min_length = 8, max_length = 256)]
    password: SecretString,
    /// A code from `keepd account invite`; needed when the operator set
    /// `api.registration: invite`, ignored otherwise.
    invite_code: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChangePasswordBody {
    #[schema(value_type = String, format = Password, min_length = 8, max_length = 256)]
    current_password: SecretString,
    #[schema(value_type = String, format = Password, min_length = 8, max_length = 256)]
    new_password: SecretString,
}

/// What erasing an account needs: proof of the password, not only a
/// token (a stolen token must not be able to destroy everything). A
/// password account sends `currentPassword`; an OPAQUE account `loginId`
/// and `credentialFinalization` of a login it started for this
/// (docs/api.md, OPAQUE).
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeleteAccountBody {
    #[schema(value_type = Option<String>, format = Password, min_length = 8, max_length = 256)]
    current_password: Option<SecretString>,
    #[serde(flatten)]
    opaque: OpaqueProofFields,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserBody {
    id: Uuid,
    email: String,
    created_at: String,
}

#[derive(Serialize, ToSchema)]
pub struct RegisteredBody {
    message: &'static str,
    user: UserBody,
}

#[derive(Serialize, ToSchema)]
pub struct LoginBody {
    message: &'static str,
    user: UserBody,
    /// A bearer token (JWT) for the other routes.
    token: String,
}

#[derive(Serialize, ToSchema)]
pub struct MessageBody {
    message: &'static str,
}

impl MessageBody {
    pub(super) fn new(message: &'static str) -> MessageBody {
        MessageBody { message }
    }
}

/// A login whose password (or OPAQUE proof) was right.
pub(super) struct Proved<'a> {
    pub account: &'a accounts::Account,
    /// The account's throttle key.
    pub email_hmac: &'a [u8],
    pub email: String,
    /// How it logged in, as the audit names it.
    pub method: &'static str,
}

/// Unicode's format characters (general category Cf): invisible, so two
/// addresses differing only by one would look the same to a person.
const FORMAT_CHARACTERS: &[(char, char)] = &[
    ('\u{00AD}', '\u{00AD}'),
    ('\u{0600}', '\u{0605}'),
    ('\u{061C}', '\u{061C}'),
    ('\u{06DD}', '\u{06DD}'),
    ('\u{070F}', '\u{070F}'),
    ('\u{0890}', '\u{0891}'),
    ('\u{08E2}', '\u{08E2}'),
    ('\u{180E}', '\u{180E}'),
    ('\u{200B}', '\u{200F}'),
    ('\u{202A}', '\u{202E}'),
    ('\u{2060}', '\u{2064}'),
    ('\u{2066}', '\u{206F}'),
    ('\u{FEFF}', '\u{FEFF}'),
    ('\u{FFF9}', '\u{FFFB}'),
    ('\u{110BD}', '\u{110BD}'),
    ('\u{110CD}', '\u{110CD}'),
    ('\u{13430}', '\u{1343F}'),
    ('\u{1BCA0}', '\u{1BCA3}'),
    ('\u{1D173}', '\u{1D17A}'),
    ('\u{E0001}', '\u{E0001}'),
    ('\u{E0020}', '\u{E007F}'),
];

fn is_format(c: char) -> bool {
    FORMAT_CHARACTERS
        .iter()
        .any(|(first, last)| (*first..=*last).contains(&c))
}

/// The form an email is stored (as an HMAC) and compared in: NFKC, lower
/// case, trimmed; or why it is not an email address. Control and format
/// characters are refused rather than dropped, so `a@b.c` and the same
/// text with a zero-width space can never be two accounts.
pub(super) fn normalise_email(email: &str) -> Result<String, ApiError> {
    use unicode_normalization::UnicodeNormalization;
    if email.chars().any(|c| c.is_control() || is_format(c)) {
        return Err(ApiError::bad_request(
            "invalid_email",
            "`email` must not contain control or invisible (format) characters",
        ));
    }
    let email: String = email.trim().nfkc().collect::<String>().to_lowercase();
    let valid = email.len() <= MAX_EMAIL_BYTES
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && domain.contains('.') && !domain.contains('@')
        })
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if valid {
        Ok(email)
    } else {
        Err(ApiError::bad_request(
            "invalid_email",
            format!(
                "`email` must be an address like name@example.com of at most {MAX_EMAIL_BYTES} bytes"
            ),
        ))
    }
}

fn check_password(password: &SecretString, field: &str) -> Result<(), ApiError> {
    let text = password.expose();
    let chars = text.chars().count();
    if !(MIN_PASSWORD_CHARS..=MAX_PASSWORD_CHARS).contains(&chars) {
        return Err(ApiError::bad_request(
            "weak_password",
            format!("`{field}` must have {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters"),
        ));
    }
    Ok(())
}

fn account_disabled() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "account_disabled",
        "this account is disabled by the operator of this server; ask them to enable it",
    )
}

pub(super) fn invalid_credentials() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
        "the email or the password is wrong",
    )
}

impl Api {
    pub(super) fn limit_auth_attempts(&self, client: &ClientAddr) -> Result<(), ApiError> {
        self.limits
            .authentication(client.0)
            .map_err(ApiError::rate_limited)
    }

    pub(super) fn client_ref(&self, client: &ClientAddr) -> String {
        self.root_keys()
            .identifiers
            .identifier("ip", &client.0.to_string())
    }

    /// Judges and counts an attempt at `account`'s password (or code) in
    /// `tx`, which the caller commits before checking it: every node sees
    /// the attempt before its answer is known, so N concurrent guesses
    /// cost N attempts. 429 while the account's failures delay `client`.
    pub(super) async fn reserve_attempt(
        &self,
        tx: &ScopedTransaction,
        account: &[u8],
        client: &ClientAddr,
    ) -> Result<(), ApiError> {
        let seen = throttle::lock(tx, account, &self.client_ref(client)).await?;
        let attempt = self
            .limits
            .login_rule()
            .judge(&seen)
            .map_err(ApiError::rate_limited)?;
        if attempt == Attempt::Counted {
            throttle::count_failure(tx, account).await?;
        }
        Ok(())
    }

    /// 401 unless `password` is the caller's current password. Guesses
    /// count per address and, like failed logins, per account (a stolen
    /// token used from many addresses is slowed down all the same); the
    /// addresses the account logged in from are exempt, so a thief's
    /// guesses cannot lock the owner out of the calls that end the
    /// thief's session.
    pub(super) async fn check_current_password(
        &self,
        auth: &UserAuth,
        client: &ClientAddr,
        password: SecretString,
    ) -> Result<(), ApiError> {
        self.password_routes()?;
        self.limit_auth_attempts(client)?;
        let tx = auth.begin(self, GroupRole::Auth).await?;
        let Some(stored) = accounts::credentials(&tx, &self.fields, auth.user).await? else {
            return Err(ApiError::unauthorized("the account no longer exists"));
        };
        let Credential::Password(hash) = stored.credential else {
            return Err(ApiError::bad_request(
                "opaque_account",
                "this account logs in with OPAQUE and has no password keepd could check: \
                 prove it with `loginId` and `credentialFinalization` (docs/api.md, OPAQUE)",
            ));
        };
        self.reserve_attempt(&tx, &stored.email_hmac, client)
            .await?;
        tx.commit().await?;
        if !self.passwords.verify(password, Some(hash)).await? {
            return Err(invalid_credentials());
        }
        let tx = auth.begin(self, GroupRole::Auth).await?;
        throttle::succeeded(&tx, &stored.email_hmac, &self.client_ref(client)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// 401 unless the caller proves the account's password again: a
    /// password account with `currentPassword`, an OPAQUE account with a
    /// login's proof; 400 unless exactly one of the two is given.
    pub(super) async fn reauthenticate(
        &self,
        auth: &UserAuth,
        client: &ClientAddr,
        current_password: Option<SecretString>,
        opaque: OpaqueProofFields,
    ) -> Result<(), ApiError> {
        match (current_password, opaque.proof()?) {
            (Some(password), None) => self.check_current_password(auth, client, password).await,
            (None, Some(proof)) => self.check_opaque_proof(auth, client, proof).await,
            _ => Err(ApiError::bad_request(
                "missing_proof",
                "send `currentPassword` (a password account) or `loginId` and \
                 `credentialFinalization` (an OPAQUE account), one of the two",
            )),
        }
    }

    /// 403 while `api.auth.password_login` is off.
    pub(super) fn password_routes(&self) -> Result<(), ApiError> {
        if self.settings.auth.password_login {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "password_login_disabled",
                "this server takes no passwords (api.auth.password_login: false): \
                 register and log in with OPAQUE, /auth/opaque/...",
            ))
        }
    }

    /// What `api.registration` asks of a new account: the invite code to
    /// use, or why no account can be made.
    pub(super) fn invite(&self, code: Option<String>) -> Result<Option<String>, ApiError> {
        match (self.settings.registration, code) {
            (Registration::Open, _) => Ok(None),
            (Registration::Closed, _) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "registration_closed",
                "this server does not create accounts (api.registration: closed)",
            )),
            (Registration::Invite, None) => Err(ApiError::bad_request(
                "invite_required",
                "this server creates accounts by invitation: send `inviteCode` from its operator",
            )),
            (Registration::Invite, Some(code)) => Ok(Some(code)),
        }
    }

    /// Creates the account `email` with `credential`, taking `invite`
    /// first: without a valid one, a taken email and a free one get the
    /// same answer.
    pub(super) async fn create_account(
        &self,
        client: &ClientAddr,
        started: Instant,
        email: String,
        credential: Credential,
        invite: Option<String>,
    ) -> Result<(StatusCode, Json<RegisteredBody>), ApiError> {
        let method = credential.method();
        let id = Uuid::new_v4();
        let mut tx = self
            .pool
            .begin(&OperationContext::user(GroupRole::Auth, id.to_string()))
            .await?;
        if let Some(code) = &invite
            && !invites::take(&tx, code).await?
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "invalid_invite",
                "`inviteCode` is unknown, used already or expired; ask the operator for a new one",
            ));
        }
        let email_hmac = self.email_hmac(&email);
        let Some(created_at) =
            accounts::create(&tx, &self.fields, id, &email_hmac, credential).await?
        else {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "email_taken",
                "an account with this email exists; log in instead",
            ));
        };
        if let Some(code) = &invite {
            invites::used_by(&tx, code, id).await?;
        }
        let metadata = json!({
            "user": self.user_ref(id),
            "client": self.client_ref(client),
            "invited": invite.is_some(),
            "method": method,
        });
        self.audit(&mut tx, AuditAction::UserRegister, 1, started, metadata)
            .await?;
        tx.commit().await?;
        let user = UserBody {
            id,
            email,
            created_at: iso8601(created_at),
        };
        Ok((
            StatusCode::CREATED,
            Json(RegisteredBody {
                message: "User registered successfully",
                user,
            }),
        ))
    }

    /// Records a failed login (in a transaction of its own: the attempt
    /// changed nothing) and answers it.
    pub(super) async fn login_failed(
        &self,
        started: Instant,
        metadata: serde_json::Value,
        answer: ApiError,
    ) -> Result<ApiError, ApiError> {
        let entry = audit::AuditEntry {
            action: AuditAction::LoginFailed,
            rows_affected: 0,
            duration: started.elapsed(),
            source_component: "api",
            metadata,
        };
        audit::record_alone(&self.pool, &self.node_id, &entry).await?;
        Ok(answer)
    }

    /// A session for the account whose credential `proved` just proved right:
    /// the token, unless the operator disabled the account (told only to
    /// whoever proved the credential).
    pub(super) async fn open_session(
        &self,
        client: &ClientAddr,
        started: Instant,
        proved: Proved<'_>,
        second_factor: &SecondFactorFields,
    ) -> Result<Json<LoginBody>, ApiError> {
        let Proved {
            account,
            email_hmac,
            email,
            method,
        } = proved;
        let client_ref = self.client_ref(client);
        if account.disabled {
            let metadata = json!({"user": self.user_ref(account.id), "client": client_ref, "reason": "disabled"});
            return Err(self
                .login_failed(started, metadata, account_disabled())
                .await?);
        }
        let id = account.id;
        let session = Uuid::new_v4();
        let (token, claims) = self.root_keys().tokens.issue(id, session);
        let expires_at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(claims.exp);
        let mut tx = self
            .pool
            .begin(&OperationContext::user(GroupRole::Auth, id.to_string()))
            .await?;
        let proved = match self.check_second_factor(&tx, id, second_factor).await {
            Ok(proved) => proved == second_factor::Proved::Yes,
            Err(refused) => {
                drop(tx);
                let metadata = json!({"user": self.user_ref(id), "client": client_ref, "reason": "second_factor"});
                return Err(self.login_failed(started, metadata, refused).await?);
            }
        };
        if !accounts::open_session(&tx, session, id, expires_at, proved).await? {
            // Disabled (or erased) while the credential was being checked.
            return Err(account_disabled());
        }
        throttle::succeeded(&tx, email_hmac, &client_ref).await?;
        let metadata = json!({"user": self.user_ref(id), "client": client_ref, "method": method});
        self.audit(&mut tx, AuditAction::Login, 1, started, metadata)
            .await?;
        tx.commit().await?;
        Ok(Json(LoginBody {
            message: "Login successful",
            user: UserBody {
                id,
                email,
                created_at: iso8601(account.created_at),
            },
            token,
        }))
    }
}

/// Creates an account. With open registration a 409 tells anyone whether
/// an email is taken (keepd sends no email to hide that behind); with
/// invites, only a holder of a valid invite learns it.
#[utoipa::path(post, path = "/auth/register", tag = "auth",
    request_body = RegisterBody,
    responses(
        (status = 201, body = RegisteredBody),
        (status = 400, body = ErrorBody),
        (status = 403, description = "Registration is closed, or the invite code is not valid", body = ErrorBody),
        (status = 409, body = ErrorBody),
        (status = 429, body = ErrorBody),
    ))]
pub(super) async fn register(
    State(api): State<Arc<Api>>,
    client: ClientAddr,
    ApiJson(body): ApiJson<RegisterBody>,
) -> Result<(StatusCode, Json<RegisteredBody>), ApiError> {
    api.password_routes()?;
    api.limit_auth_attempts(&client)?;
    let started = Instant::now();
    let invite = api.invite(body.invite_code)?;
    let email = normalise_email(&body.email)?;
    check_password(&body.password, "password")?;
    let hash = api.passwords.hash(body.password).await?;
    api.create_account(&client, started, email, Credential::Password(hash), invite)
        .await
}

/// Exchanges email and password for a token.
#[utoipa::path(post, path = "/auth/login", tag = "auth",
    request_body = CredentialsBody,
    responses(
        (status = 200, body = LoginBody),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "`account_disabled`: the operator disabled the account"),
        (status = 429, body = ErrorBody),
    ))]
pub(super) async fn login(
    State(api): State<Arc<Api>>,
    client: ClientAddr,
    ApiJson(body): ApiJson<CredentialsBody>,
) -> Result<Json<LoginBody>, ApiError> {
    api.password_routes()?;
    api.limit_auth_attempts(&client)?;
    let started = Instant::now();
    let email = normalise_email(&body.email)?;
    let email_hmac = api.email_hmac(&email);
    let lookup = OperationContext {
        role: GroupRole::Auth,
        user_id: None,
        email_hmac: Some(hex::encode(&email_hmac)),
    };
    let tx = api.pool.begin(&lookup).await?;
    // Per account too, whether or not it exists (the answer must not tell).
    api.reserve_attempt(&tx, &email_hmac, &client).await?;
    let account = accounts::by_email(&tx, &api.fields, &email_hmac).await?;
    tx.commit().await?;
    // An OPAQUE account has no password hash: the same work, and a 401.
    let stored = match &account {
        Some(accounts::Account {
            credential: Credential::Password(hash),
            ..
        }) => Some(hash.clone()),
        _ => None,
    };
    let matches = api.passwords.verify(body.password, stored.clone()).await?;
    match account {
        Some(account) if matches && stored.is_some() => {
            let proved = Proved {
                account: &account,
                email_hmac: &email_hmac,
                email,
                method: "password",
            };
            api.open_session(&client, started, proved, &body.second_factor)
                .await
        }
        _ => {
            let metadata = json!({
                "email": api.root_keys().identifiers.identifier("email", &email),
                "client": api.client_ref(&client),
            });
            Err(api
                .login_failed(started, metadata, invalid_credentials())
                .await?)
        }
    }
}

/// Ends the session of the token presented.
#[utoipa::path(post, path = "/auth/logout", tag = "auth",
    responses((status = 200, body = MessageBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn logout(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
) -> Result<Json<MessageBody>, ApiError> {
    let started = Instant::now();
    let mut tx = auth.begin(&api, GroupRole::Auth).await?;
    let revoked = accounts::revoke_session(&tx, auth.session, SessionEnd::Logout).await?;
    let metadata = json!({"user": api.user_ref(auth.user)});
    api.audit(
        &mut tx,
        AuditAction::Logout,
        revoked as i64,
        started,
        metadata,
    )
    .await?;
    tx.commit().await?;
    Ok(Json(MessageBody {
        message: "Logged out",
    }))
}

/// Changes the password; every session of the account ends.
#[utoipa::path(post, path = "/auth/password", tag = "auth",
    request_body = ChangePasswordBody,
    responses(
        (status = 200, body = MessageBody),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn change_password(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
    client: ClientAddr,
    ApiJson(body): ApiJson<ChangePasswordBody>,
) -> Result<Json<MessageBody>, ApiError> {
    let started = Instant::now();
    check_password(&body.new_password, "newPassword")?;
    api.check_current_password(&auth, &client, body.current_password)
        .await?;
    let hash = api.passwords.hash(body.new_password).await?;
    let mut tx = auth.begin(&api, GroupRole::Auth).await?;
    accounts::set_credential(&tx, &api.fields, auth.user, Credential::Password(hash)).await?;
    let revoked =
        accounts::revoke_all_sessions(&tx, auth.user, SessionEnd::PasswordChanged).await?;
    let metadata = json!({"user": api.user_ref(auth.user), "sessionsRevoked": revoked});
    api.audit(&mut tx, AuditAction::PasswordChange, 1, started, metadata)
        .await?;
    tx.commit().await?;
    Ok(Json(MessageBody {
        message: "Password changed; every session has ended, log in again",
    }))
}

/// Amounts of what an account stores, or may store (0 = unlimited).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Amounts {
    /// Bytes of log entries and backups as the client sent them.
    storage_bytes: u64,
    vaults: u64,
    /// Devices not revoked.
    devices: u64,
    backups: u64,
}

impl From<Usage> for Amounts {
    fn from(u: Usage) -> Amounts {
        Amounts {
            storage_bytes: u.storage_bytes,
            vaults: u.vaults,
            devices: u.devices,
            backups: u.backups,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct AccountBody {
    id: Uuid,
    /// What the account stores now.
    usage: Amounts,
    /// What it may store (`api.quotas`; 0 = unlimited).
    quotas: Amounts,
}

/// The caller's usage and quotas.
#[utoipa::path(get, path = "/account", tag = "auth",
    responses((status = 200, body = AccountBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn account(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
) -> Result<Json<AccountBody>, ApiError> {
    let tx = auth.begin(&api, GroupRole::Query).await?;
    let used = usage::of(&tx, auth.user).await?;
    tx.commit().await?;
    Ok(Json(AccountBody {
        id: auth.user,
        usage: used.into(),
        quotas: Usage::from(&api.settings.quotas).into(),
    }))
}

/// Erases the account and everything it owns (right to erasure); needs
/// proof of the password: the password itself, or an OPAQUE login.
#[utoipa::path(delete, path = "/account", tag = "auth",
    request_body = DeleteAccountBody,
    responses(
        (status = 200, body = MessageBody),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn delete_account(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
    client: ClientAddr,
    ApiJson(body): ApiJson<DeleteAccountBody>,
) -> Result<Json<MessageBody>, ApiError> {
    let started = Instant::now();
    api.reauthenticate(&auth, &client, body.current_password, body.opaque)
        .await?;
    let mut tx = auth.begin(&api, GroupRole::Auth).await?;
    let deleted = accounts::delete(&tx, auth.user).await?;
    let metadata = json!({"user": api.user_ref(auth.user)});
    api.audit(
        &mut tx,
        AuditAction::AccountErase,
        deleted as i64,
        started,
        metadata,
    )
    .await?;
    tx.commit().await?;
    Ok(Json(MessageBody {
        message: "The account and all its data are erased",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(
            normalise_email("  Ann@Example.ORG ").unwrap(),
            "ann@example.org"
        );
        // Compatibility forms fold to one account: fullwidth letters, a
        // ligature, the Kelvin sign.
        assert_eq!(
            normalise_email("\u{FF21}nn@example.org").unwrap(),
            "ann@example.org"
        );
        assert_eq!(
            normalise_email("\u{FB01}@example.org").unwrap(),
            "fi@example.org"
        );
        assert_eq!(
            normalise_email("\u{212A}@example.org").unwrap(),
            "k@example.org"
        );
        for invisible in [
            "a@b.c\u{200B}",
            "a\u{200D}@b.c",
            "\u{FEFF}a@b.c",
            "a@b\u{0}.c",
        ] {
            let e = normalise_email(invisible).unwrap_err();
            assert!(
                format!("{e:?}").contains("invisible"),
                "{invisible:?}: {e:?}"
            );
        }
        for bad in [
            "",
            "ann",
            "@example.org",
            "ann@localhost",
            "a b@example.org",
            "a@b@c.org",
        ] {
            let e = normalise_email(bad).unwrap_err();
            assert_eq!(e.code(), "invalid_email", "{bad:?}");
        }
        assert!(normalise_email(&format!("{}@example.org", "a".repeat(300))).is_err());
    }
}
