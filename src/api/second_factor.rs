//! TOTP as a second factor (`crate::second_factor` does RFC 6238): enrol
//! (the secret shown once, as an `otpauth://` URI), confirm with a code
//! (ten single-use recovery codes, shown once), then every login needs a
//! code; turning it off needs the password and a code. A code is accepted
//! once; wrong codes count as failed attempts of the account
//! (`Api::reserve_attempt`), so guessing is throttled as passwords are.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::Api;
use super::auth::MessageBody;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ClientAddr, UserAuth};
use super::opaque::OpaqueProofFields;
use super::store::accounts;
use super::store::{second_factor as store, throttle};
use crate::audit::AuditAction;
use crate::clock::unix_now;
use crate::postgres::pool::{GroupRole, ScopedTransaction};
use crate::second_factor::{self as totp, CodeError};
use crate::secrets::values::SecretString;

/// A second factor as a login (or its removal) sends it: a TOTP code or
/// a recovery code.
#[derive(Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecondFactorFields {
    /// The authenticator's current code: 6 digits.
    #[schema(min_length = 6, max_length = 6, pattern = "^[0-9]{6}$")]
    totp_code: Option<String>,
    /// One of the recovery codes shown at confirmation, instead of a code;
    /// each works once.
    #[schema(max_length = 64)]
    recovery_code: Option<String>,
}

impl SecondFactorFields {
    fn given(&self) -> bool {
        self.totp_code.is_some() || self.recovery_code.is_some()
    }
}

fn invalid_second_factor() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_second_factor",
        "the code is wrong, or was used already (a code works once; wait for the next)",
    )
}

fn code_error(e: CodeError) -> ApiError {
    match e {
        CodeError::Format => ApiError::bad_request(
            "invalid_totp_code",
            format!(
                "`totpCode` must be the {} digits the authenticator shows",
                totp::DIGITS
            ),
        ),
        CodeError::Entropy(_) => ApiError::internal("randomness", &e),
    }
}

/// What a check of the second factor found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proved {
    /// The account has no confirmed second factor.
    NotEnrolled,
    /// A right code, now used.
    Yes,
}

impl Api {
    /// Checks `given` against `user`'s second factor in `tx` (the
    /// account's own transaction: an accepted code is used when `tx`
    /// commits). 401 `second_factor_required` when the account has one and
    /// nothing was given, `invalid_second_factor` when it is wrong or used.
    pub(super) async fn check_second_factor(
        &self,
        tx: &ScopedTransaction,
        user: Uuid,
        given: &SecondFactorFields,
    ) -> Result<Proved, ApiError> {
        let enrolment = store::read(tx, &self.fields, user).await?;
        let Some(enrolment) = enrolment.filter(|e| e.confirmed) else {
            return Ok(Proved::NotEnrolled);
        };
        if let Some(code) = &given.totp_code {
            let step =
                totp::check(&enrolment.secret, code.trim(), unix_now()).map_err(code_error)?;
            return match step {
                Some(step) if store::take_step(tx, user, step).await? => Ok(Proved::Yes),
                _ => Err(invalid_second_factor()),
            };
        }
        if let Some(code) = &given.recovery_code {
            return if store::use_recovery(tx, user, &totp::recovery_hash(code)).await? {
                Ok(Proved::Yes)
            } else {
                Err(invalid_second_factor())
            };
        }
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "second_factor_required",
            "this account has a second factor: send `totpCode` (or one of its `recoveryCode`s) \
             with the login",
        ))
    }

    /// Counts an attempt at the caller's code before it is checked (as
    /// for passwords); the account's throttle key.
    async fn reserve_code_attempt(
        &self,
        auth: &UserAuth,
        client: &ClientAddr,
    ) -> Result<Vec<u8>, ApiError> {
        self.limit_auth_attempts(client)?;
        let tx = auth.begin(self, GroupRole::Auth).await?;
        let stored = accounts::credentials(&tx, &self.fields, auth.user)
            .await?
            .ok_or_else(|| ApiError::unauthorized("the account no longer exists"))?;
        self.reserve_attempt(&tx, &stored.email_hmac, client)
            .await?;
        tx.commit().await?;
        Ok(stored.email_hmac)
    }
}

/// As the OpenAPI document states it.
const MAX_LABEL_CHARS: usize = 254;

/// Read from a JSON object only: every field is optional, and serde would
/// otherwise take an array (`[null]`) for the struct.
#[derive(Deserialize, ToSchema, Default)]
#[serde(
    rename_all = "camelCase",
    try_from = "serde_json::Map<String, serde_json::Value>"
)]
pub struct EnrolBody {
    /// How the authenticator app names the account (an email, say); the
    /// account id when absent. Never stored.
    #[schema(max_length = 254)]
    label: Option<String>,
}

#[derive(Deserialize)]
struct EnrolFields {
    label: Option<String>,
}

impl TryFrom<serde_json::Map<String, serde_json::Value>> for EnrolBody {
    type Error = serde_json::Error;

    fn try_from(object: serde_json::Map<String, serde_json::Value>) -> Result<Self, Self::Error> {
        let fields: EnrolFields = serde_json::from_value(serde_json::Value::Object(object))?;
        Ok(EnrolBody {
            label: fields.label,
        })
    }
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnrolAnswer {
    /// For the authenticator app (its QR code): RFC 6238 with SHA-1, 6
    /// digits, 30 s. Shown once: keepd keeps the secret sealed.
    otpauth_uri: String,
    /// The same secret in base32, to type in.
    secret: String,
}

/// Starts enrolling a TOTP second factor (replacing one not yet
/// confirmed); it counts once confirmed.
#[utoipa::path(post, path = "/auth/totp", tag = "auth",
    request_body = EnrolBody,
    responses(
        (status = 200, body = EnrolAnswer),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, description = "`second_factor_enrolled`: turn the confirmed one off first", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn enrol(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
    ApiJson(body): ApiJson<EnrolBody>,
) -> Result<Json<EnrolAnswer>, ApiError> {
    let label = match body.label {
        Some(label)
            if label.trim().is_empty()
                || label.chars().count() > MAX_LABEL_CHARS
                || label.chars().any(char::is_control) =>
        {
            return Err(ApiError::bad_request(
                "invalid_label",
                format!(
                    "`label` must be printable text of at most {MAX_LABEL_CHARS} characters, \
                     for example the account's email"
                ),
            ));
        }
        Some(label) => label,
        None => auth.user.to_string(),
    };
    let secret = totp::new_secret().map_err(code_error)?;
    let tx = auth.begin(&api, GroupRole::Auth).await?;
    if !store::enrol(&tx, &api.fields, auth.user, &secret).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "second_factor_enrolled",
            "this account has a confirmed second factor: turn it off first (DELETE /auth/totp)",
        ));
    }
    tx.commit().await?;
    Ok(Json(EnrolAnswer {
        otpauth_uri: totp::uri(&secret, &label),
        secret: totp::secret_text(&secret),
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfirmBody {
    /// The authenticator's current code.
    #[schema(min_length = 6, max_length = 6, pattern = "^[0-9]{6}$")]
    totp_code: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfirmAnswer {
    message: &'static str,
    /// Ten single-use codes for a lost authenticator, shown once (keepd
    /// keeps only their hashes).
    recovery_codes: Vec<String>,
}

/// Confirms the enrolment with a code: from now on every login needs one.
/// This session counts as having proved it.
#[utoipa::path(post, path = "/auth/totp/confirm", tag = "auth",
    request_body = ConfirmBody,
    responses(
        (status = 200, body = ConfirmAnswer),
        (status = 400, body = ErrorBody),
        (status = 401, description = "`invalid_second_factor`, or the token's session ended", body = ErrorBody),
        (status = 409, description = "`no_enrolment`: POST /auth/totp first, or it is confirmed already", body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn confirm(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
    client: ClientAddr,
    ApiJson(body): ApiJson<ConfirmBody>,
) -> Result<Json<ConfirmAnswer>, ApiError> {
    let started = Instant::now();
    let email_hmac = api.reserve_code_attempt(&auth, &client).await?;
    let mut tx = auth.begin(&api, GroupRole::Auth).await?;
    let Some(enrolment) = store::read(&tx, &api.fields, auth.user)
        .await?
        .filter(|e| !e.confirmed)
    else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_enrolment",
            "nothing to confirm: start with POST /auth/totp (a confirmed second factor stays \
             until it is turned off)",
        ));
    };
    let step =
        totp::check(&enrolment.secret, body.totp_code.trim(), unix_now()).map_err(code_error)?;
    match step {
        Some(step) if store::take_step(&tx, auth.user, step).await? => {}
        _ => return Err(invalid_second_factor()),
    }
    let codes = totp::recovery_codes().map_err(code_error)?;
    let hashes: Vec<[u8; 32]> = codes.iter().map(|(_, hash)| *hash).collect();
    store::confirm(&tx, auth.user, &hashes).await?;
    accounts::session_proved_second_factor(&tx, auth.session).await?;
    throttle::succeeded(&tx, &email_hmac, &api.client_ref(&client)).await?;
    let metadata = json!({"user": api.user_ref(auth.user)});
    api.audit(
        &mut tx,
        AuditAction::SecondFactorEnable,
        1,
        started,
        metadata,
    )
    .await?;
    tx.commit().await?;
    Ok(Json(ConfirmAnswer {
        message: "Second factor on: every login needs a code from now on",
        recovery_codes: codes.into_iter().map(|(text, _)| text).collect(),
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DisableBody {
    /// A password account's password.
    #[schema(value_type = Option<String>, format = Password, min_length = 8, max_length = 256)]
    current_password: Option<SecretString>,
    /// An OPAQUE account's proof instead (docs/api.md, OPAQUE).
    #[serde(flatten)]
    opaque: OpaqueProofFields,
    #[serde(flatten)]
    second_factor: SecondFactorFields,
}

/// Turns the second factor off: needs the password (or an OPAQUE proof)
/// and a code (or a recovery code).
#[utoipa::path(delete, path = "/auth/totp", tag = "auth",
    request_body = DisableBody,
    responses(
        (status = 200, body = MessageBody),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, description = "`no_second_factor`: the account has none", body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn disable(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
    client: ClientAddr,
    ApiJson(body): ApiJson<DisableBody>,
) -> Result<Json<MessageBody>, ApiError> {
    let started = Instant::now();
    api.reauthenticate(&auth, &client, body.current_password, body.opaque)
        .await?;
    if !body.second_factor.given() {
        return Err(ApiError::bad_request(
            "missing_second_factor",
            "send `totpCode` (or a `recoveryCode`) with the password",
        ));
    }
    let email_hmac = api.reserve_code_attempt(&auth, &client).await?;
    let mut tx = auth.begin(&api, GroupRole::Auth).await?;
    if api
        .check_second_factor(&tx, auth.user, &body.second_factor)
        .await?
        == Proved::NotEnrolled
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_second_factor",
            "this account has no confirmed second factor",
        ));
    }
    store::remove(&tx, auth.user).await?;
    throttle::succeeded(&tx, &email_hmac, &api.client_ref(&client)).await?;
    let metadata = json!({"user": api.user_ref(auth.user)});
    api.audit(
        &mut tx,
        AuditAction::SecondFactorDisable,
        1,
        started,
        metadata,
    )
    .await?;
    tx.commit().await?;
    Ok(Json(MessageBody::new(
        "Second factor off: logins need the password alone",
    )))
}
