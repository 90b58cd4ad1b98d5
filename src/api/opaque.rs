//! OPAQUE registration and login (RFC 9807; `crate::opaque` does the
//! protocol): the password never leaves the client. Registration is two
//! steps, the first stateless; a login's state between its two messages
//! is kept in Postgres (`store::opaque_logins`), so any node finishes
//! what any node started. A login for an email no account has is answered
//! from OPAQUE's fake record: the same shape, the same work.
//!
//! Guessing is throttled at the login's start, where a client learns
//! whether its password was right: the attempt is counted before the
//! answer leaves (`Api::reserve_attempt`) and forgiven when the finish
//! verifies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::Api;
use super::auth::{
    LoginBody, MessageBody, Proved, RegisteredBody, invalid_credentials, normalise_email,
};
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ClientAddr, UserAuth};
use super::second_factor::SecondFactorFields;
use super::store::accounts::{self, Credential, SessionEnd};
use super::store::{opaque_logins, throttle};
use crate::audit::AuditAction;
use crate::opaque::{OpaqueError, OpaqueServer};
use crate::postgres::pool::{GroupRole, OperationContext};
use crate::secrets::values::SecretString;

/// How long a login may take between its two messages.
pub const LOGIN_STATE_TTL: Duration = Duration::from_secs(60);

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisterStartBody {
    #[schema(format = Email, max_length = 254)]
    email: String,
    /// Base64 of the client's RegistrationRequest (32 bytes).
    #[schema(format = Byte, max_length = 64, pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$")]
    registration_request: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisterStartAnswer {
    /// Base64 of the server's RegistrationResponse (64 bytes).
    registration_response: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisterFinishBody {
    #[schema(format = Email, max_length = 254)]
    email: String,
    /// Base64 of the client's RegistrationRecord (192 bytes).
    #[schema(format = Byte, max_length = 400, pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$")]
    registration_record: String,
    /// A code from `keepd account invite`; needed when the operator set
    /// `api.registration: invite`, ignored otherwise.
    invite_code: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoginStartBody {
    #[schema(format = Email, max_length = 254)]
    email: String,
    /// Base64 of the client's KE1 (CredentialRequest, 96 bytes).
    #[schema(format = Byte, max_length = 200, pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$")]
    credential_request: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoginStartAnswer {
    /// Names this login at its finish (valid for 60 seconds, once).
    login_id: Uuid,
    /// Base64 of the server's KE2 (CredentialResponse, 320 bytes).
    credential_response: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoginFinishBody {
    #[schema(format = Email, max_length = 254)]
    email: String,
    #[serde(flatten)]
    proof: OpaqueProofFields,
    /// For an account with a second factor.
    #[serde(flatten)]
    second_factor: SecondFactorFields,
}

/// A login's finish as proof of the password: `loginId` from
/// `POST /auth/opaque/login/start`, and the client's KE3.
#[derive(Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct OpaqueProofFields {
    /// From the login's start.
    #[schema(format = Uuid)]
    login_id: Option<String>,
    /// Base64 of the client's KE3 (CredentialFinalization, 64 bytes).
    #[schema(format = Byte, max_length = 200, pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$")]
    credential_finalization: Option<String>,
}

/// A checked `OpaqueProofFields`.
pub struct OpaqueProof {
    login: Uuid,
    finalization: Vec<u8>,
}

impl OpaqueProofFields {
    /// The proof, None when neither field is there; 400 when one is
    /// missing or malformed.
    pub fn proof(self) -> Result<Option<OpaqueProof>, ApiError> {
        match (self.login_id, self.credential_finalization) {
            (None, None) => Ok(None),
            (Some(login), Some(finalization)) => Ok(Some(OpaqueProof {
                login: Uuid::parse_str(&login).map_err(|_| {
                    ApiError::bad_request(
                        "invalid_login_id",
                        "`loginId` must be the UUID POST /auth/opaque/login/start answered",
                    )
                })?,
                finalization: message("credentialFinalization", &finalization)?,
            })),
            _ => Err(ApiError::bad_request(
                "missing_proof",
                "`loginId` and `credentialFinalization` go together",
            )),
        }
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeBody {
    /// The account's password, once more: the last time keepd sees it.
    #[schema(value_type = String, format = Password, min_length = 8, max_length = 256)]
    current_password: SecretString,
    /// Base64 of a RegistrationRecord made for this account's email.
    #[schema(format = Byte, max_length = 400, pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$")]
    registration_record: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OpaquePasswordBody {
    #[serde(flatten)]
    proof: OpaqueProofFields,
    /// Base64 of a RegistrationRecord for the new password.
    #[schema(format = Byte, max_length = 400, pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$")]
    registration_record: String,
}

/// An OPAQUE message from its base64, or 400 naming the field.
fn message(field: &'static str, value: &str) -> Result<Vec<u8>, ApiError> {
    match BASE64.decode(value) {
        Ok(bytes) if !bytes.is_empty() => Ok(bytes),
        _ => Err(malformed(field)),
    }
}

fn malformed(field: &str) -> ApiError {
    ApiError::bad_request(
        "invalid_opaque_message",
        format!(
            "`{field}` is not a valid OPAQUE message: base64 (with padding) of the message \
             RFC 9807 defines for ristretto255-SHA512 (docs/api.md, OPAQUE)"
        ),
    )
}

fn opaque_error(e: OpaqueError) -> ApiError {
    match e {
        OpaqueError::Malformed(field) => malformed(field),
        OpaqueError::NotVerified => invalid_credentials(),
        OpaqueError::Damaged => ApiError::internal("OPAQUE", &e),
    }
}

fn login_expired() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "login_expired",
        "no login with this `loginId` is waiting: it finished already, took longer than 60 \
         seconds, or never started; start again with POST /auth/opaque/login/start",
    )
}

impl Api {
    /// The record a registration upload makes, checked.
    fn record(&self, upload: &str) -> Result<Vec<u8>, ApiError> {
        OpaqueServer::record(&message("registrationRecord", upload)?).map_err(opaque_error)
    }

    /// Finishes the login `proof` names for the account keyed
    /// `email_hmac`: the account it proved, or 401.
    async fn finish_login(
        &self,
        email_hmac: &[u8],
        proof: &OpaqueProof,
    ) -> Result<Option<Uuid>, ApiError> {
        let lookup = OperationContext {
            role: GroupRole::Auth,
            user_id: None,
            email_hmac: Some(hex::encode(email_hmac)),
        };
        let tx = self.pool.begin(&lookup).await?;
        let pending = opaque_logins::take(&tx, &self.fields, proof.login, email_hmac).await?;
        tx.commit().await?;
        let pending = pending.ok_or_else(login_expired)?;
        match OpaqueServer::login_finish(&pending.state, &proof.finalization) {
            Ok(()) => Ok(pending.user),
            Err(OpaqueError::NotVerified) => Ok(None),
            Err(e) => Err(opaque_error(e)),
        }
    }

    /// 401 unless `proof` finishes a login of the caller's own account
    /// (password change and erasure of an OPAQUE account).
    pub(super) async fn check_opaque_proof(
        &self,
        auth: &UserAuth,
        client: &ClientAddr,
        proof: OpaqueProof,
    ) -> Result<(), ApiError> {
        let tx = auth.begin(self, GroupRole::Auth).await?;
        let stored = accounts::credentials(&tx, &self.fields, auth.user).await?;
        tx.commit().await?;
        let Some(stored) = stored else {
            return Err(ApiError::unauthorized("the account no longer exists"));
        };
        if !matches!(stored.credential, Credential::Opaque(_)) {
            return Err(ApiError::bad_request(
                "password_account",
                "this account logs in with a password: send `currentPassword`",
            ));
        }
        if self.finish_login(&stored.email_hmac, &proof).await? != Some(auth.user) {
            return Err(invalid_credentials());
        }
        let tx = auth.begin(self, GroupRole::Auth).await?;
        throttle::succeeded(&tx, &stored.email_hmac, &self.client_ref(client)).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// OPAQUE registration, first step: the server's response to the
/// client's blinded password. Stateless; nothing is stored.
#[utoipa::path(post, path = "/auth/opaque/register/start", tag = "auth",
    request_body = RegisterStartBody,
    responses(
        (status = 200, body = RegisterStartAnswer),
        (status = 400, description = "`invalid_email`, `invalid_opaque_message`", body = ErrorBody),
        (status = 429, body = ErrorBody),
    ))]
pub(super) async fn register_start(
    State(api): State<Arc<Api>>,
    ApiJson(body): ApiJson<RegisterStartBody>,
) -> Result<Json<RegisterStartAnswer>, ApiError> {
    let email = normalise_email(&body.email)?;
    let request = message("registrationRequest", &body.registration_request)?;
    let response = api
        .opaque
        .registration_response(&request, &api.email_hmac(&email))
        .map_err(opaque_error)?;
    Ok(Json(RegisterStartAnswer {
        registration_response: BASE64.encode(response),
    }))
}

/// OPAQUE registration, second step: creates the account with the
/// client's record. Answers as `POST /auth/register` does.
#[utoipa::path(post, path = "/auth/opaque/register/finish", tag = "auth",
    request_body = RegisterFinishBody,
    responses(
        (status = 201, body = RegisteredBody),
        (status = 400, body = ErrorBody),
        (status = 403, description = "Registration is closed, or the invite code is not valid", body = ErrorBody),
        (status = 409, body = ErrorBody),
        (status = 429, body = ErrorBody),
    ))]
pub(super) async fn register_finish(
    State(api): State<Arc<Api>>,
    client: ClientAddr,
    ApiJson(body): ApiJson<RegisterFinishBody>,
) -> Result<(StatusCode, Json<RegisteredBody>), ApiError> {
    api.limit_auth_attempts(&client)?;
    let started = Instant::now();
    let invite = api.invite(body.invite_code)?;
    let email = normalise_email(&body.email)?;
    let record = api.record(&body.registration_record)?;
    api.create_account(&client, started, email, Credential::Opaque(record), invite)
        .await
}

/// OPAQUE login, first step: the server's KE2 and the id to finish with.
/// An email no account has gets an answer of the same shape (OPAQUE's
/// fake record); the client then cannot finish.
#[utoipa::path(post, path = "/auth/opaque/login/start", tag = "auth",
    request_body = LoginStartBody,
    responses(
        (status = 200, body = LoginStartAnswer),
        (status = 400, description = "`invalid_email`, `invalid_opaque_message`", body = ErrorBody),
        (status = 429, body = ErrorBody),
    ))]
pub(super) async fn login_start(
    State(api): State<Arc<Api>>,
    client: ClientAddr,
    ApiJson(body): ApiJson<LoginStartBody>,
) -> Result<Json<LoginStartAnswer>, ApiError> {
    api.limit_auth_attempts(&client)?;
    let email = normalise_email(&body.email)?;
    let request = message("credentialRequest", &body.credential_request)?;
    let email_hmac = api.email_hmac(&email);
    let lookup = OperationContext {
        role: GroupRole::Auth,
        user_id: None,
        email_hmac: Some(hex::encode(&email_hmac)),
    };
    let tx = api.pool.begin(&lookup).await?;
    // Counted before the answer leaves: the answer is what tells the
    // client whether its password was right.
    api.reserve_attempt(&tx, &email_hmac, &client).await?;
    let account = accounts::by_email(&tx, &api.fields, &email_hmac).await?;
    let (user, record) = match &account {
        Some(accounts::Account {
            id,
            credential: Credential::Opaque(record),
            ..
        }) => (Some(*id), Some(record.as_slice())),
        // A password account has no record: the fake one answers.
        _ => (None, None),
    };
    let (state, response) = api
        .opaque
        .login_start(record, &request, &email_hmac)
        .map_err(opaque_error)?;
    let login_id = Uuid::new_v4();
    opaque_logins::keep(
        &tx,
        &api.fields,
        login_id,
        &email_hmac,
        user,
        &state,
        LOGIN_STATE_TTL,
    )
    .await?;
    tx.commit().await?;
    Ok(Json(LoginStartAnswer {
        login_id,
        credential_response: BASE64.encode(response),
    }))
}

/// OPAQUE login, second step: the client's KE3 proves the password; the
/// answer is `POST /auth/login`'s.
#[utoipa::path(post, path = "/auth/opaque/login/finish", tag = "auth",
    request_body = LoginFinishBody,
    responses(
        (status = 200, body = LoginBody),
        (status = 400, body = ErrorBody),
        (status = 401, description = "`invalid_credentials`, or `login_expired`: no such login is waiting", body = ErrorBody),
        (status = 403, body = ErrorBody, description = "`account_disabled`: the operator disabled the account"),
        (status = 429, body = ErrorBody),
    ))]
pub(super) async fn login_finish(
    State(api): State<Arc<Api>>,
    client: ClientAddr,
    ApiJson(body): ApiJson<LoginFinishBody>,
) -> Result<Json<LoginBody>, ApiError> {
    let started = Instant::now();
    let email = normalise_email(&body.email)?;
    let proof = body.proof.proof()?.ok_or_else(|| {
        ApiError::bad_request(
            "missing_proof",
            "send `loginId` and `credentialFinalization`",
        )
    })?;
    let email_hmac = api.email_hmac(&email);
    let proved = api.finish_login(&email_hmac, &proof).await?;
    let lookup = OperationContext {
        role: GroupRole::Auth,
        user_id: None,
        email_hmac: Some(hex::encode(&email_hmac)),
    };
    let account = match proved {
        Some(user) => {
            let tx = api.pool.begin(&lookup).await?;
            let account = accounts::by_email(&tx, &api.fields, &email_hmac).await?;
            tx.commit().await?;
            account.filter(|a| a.id == user)
        }
        None => None,
    };
    match account {
        Some(account) => {
            let proved = Proved {
                account: &account,
                email_hmac: &email_hmac,
                email,
                method: "opaque",
            };
            api.open_session(&client, started, proved, &body.second_factor)
                .await
        }
        None => {
            let metadata = json!({
                "email": api.root_keys().identifiers.identifier("email", &email),
                "client": api.client_ref(&client),
                "method": "opaque",
            });
            Err(api
                .login_failed(started, metadata, invalid_credentials())
                .await?)
        }
    }
}

/// Moves a password account to OPAQUE, authenticated by its current
/// password (the last time keepd sees it); from then on its password
/// login is refused. Sessions stay.
#[utoipa::path(post, path = "/auth/opaque/upgrade", tag = "auth",
    request_body = UpgradeBody,
    responses(
        (status = 200, body = MessageBody),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn upgrade(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
    client: ClientAddr,
    ApiJson(body): ApiJson<UpgradeBody>,
) -> Result<Json<MessageBody>, ApiError> {
    let started = Instant::now();
    let record = api.record(&body.registration_record)?;
    api.check_current_password(&auth, &client, body.current_password)
        .await?;
    let mut tx = auth.begin(&api, GroupRole::Auth).await?;
    accounts::set_credential(&tx, &api.fields, auth.user, Credential::Opaque(record)).await?;
    let metadata = json!({"user": api.user_ref(auth.user), "method": "opaque", "from": "password"});
    api.audit(&mut tx, AuditAction::PasswordChange, 1, started, metadata)
        .await?;
    tx.commit().await?;
    Ok(Json(MessageBody::new(
        "This account now logs in with OPAQUE; its password login is refused",
    )))
}

/// Changes an OPAQUE account's password: a login started for it proves
/// the current one, a new record replaces the old; every session ends.
#[utoipa::path(post, path = "/auth/opaque/password", tag = "auth",
    request_body = OpaquePasswordBody,
    responses(
        (status = 200, body = MessageBody),
        (status = 400, body = ErrorBody),
        (status = 401, description = "`invalid_credentials`, `login_expired`, or the token's session ended", body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn change_password(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
    client: ClientAddr,
    ApiJson(body): ApiJson<OpaquePasswordBody>,
) -> Result<Json<MessageBody>, ApiError> {
    let started = Instant::now();
    let record = api.record(&body.registration_record)?;
    let proof = body.proof.proof()?.ok_or_else(|| {
        ApiError::bad_request(
            "missing_proof",
            "send `loginId` and `credentialFinalization` of a login started for this account",
        )
    })?;
    api.check_opaque_proof(&auth, &client, proof).await?;
    let mut tx = auth.begin(&api, GroupRole::Auth).await?;
    accounts::set_credential(&tx, &api.fields, auth.user, Credential::Opaque(record)).await?;
    let revoked =
        accounts::revoke_all_sessions(&tx, auth.user, SessionEnd::PasswordChanged).await?;
    let metadata =
        json!({"user": api.user_ref(auth.user), "sessionsRevoked": revoked, "method": "opaque"});
    api.audit(&mut tx, AuditAction::PasswordChange, 1, started, metadata)
        .await?;
    tx.commit().await?;
    Ok(Json(MessageBody::new(
        "Password changed; every session has ended, log in again",
    )))
}
