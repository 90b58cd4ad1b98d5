//! The reference client: what an application does against keepd. It
//! derives and holds every key itself (`crypto`); the server only ever
//! receives ciphertext, wrapped keys, public keys and signatures. Tests and
//! the load generator drive keepd through it, over real HTTP or HTTPS
//! (`Endpoint`).

pub mod crypto;
pub mod opaque;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use uuid::Uuid;

pub use crypto::{CryptoError, DeviceKey, EncryptedBackup, VaultKey, WrappedVaultKey};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach keepd at {addr}: {reason}")]
    Transport { addr: String, reason: String },
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    #[error("keepd answered {status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
        retry_after: Option<u64>,
    },
    #[error("keepd's answer is not what the API describes: {0}")]
    Decode(String),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("log in first")]
    NotLoggedIn,
}

impl ClientError {
    /// The error code of an API error (`vault_not_found`, ...).
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// An HTTP answer: status, `Retry-After` if any, and the JSON body
/// (`Null` when the body is not JSON).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub body: Value,
    pub text: String,
}

impl Answer {
    /// keepd's error body (`{"error":{"code","message"}}`) as an error;
    /// the text when the body is not one.
    fn into_error(self) -> ClientError {
        let error = &self.body["error"];
        ClientError::Api {
            status: self.status,
            code: error["code"].as_str().unwrap_or("").to_string(),
            message: error["message"].as_str().unwrap_or(&self.text).to_string(),
            retry_after: self.retry_after,
        }
    }
}

/// Which certificates an HTTPS endpoint may present.
pub enum Trust {
    /// Only those issued by this CA (PEM), e.g. a private CA.
    Ca(String),
    /// The operating system's trust store.
    System,
}

/// Where keepd is: a host name or address, a port, and TLS or not.
#[derive(Clone)]
pub struct Endpoint {
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Endpoint {
    /// Plain HTTP (loopback, or tests of the plaintext edge).
    pub fn http(addr: SocketAddr) -> Endpoint {
        Endpoint {
            host: addr.ip().to_string(),
            port: addr.port(),
            tls: None,
        }
    }

    /// HTTPS to `host` (a name the certificate must carry, or an address).
    pub fn https(host: &str, port: u16, trust: Trust) -> Result<Endpoint, ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        match trust {
            Trust::Ca(pem) => {
                use rustls_pki_types::pem::PemObject;
                for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    let cert = cert.map_err(|e| ClientError::Tls(format!("the CA PEM: {e}")))?;
                    roots
                        .add(cert)
                        .map_err(|e| ClientError::Tls(format!("the CA certificate: {e}")))?;
                }
            }
            Trust::System => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
            }
        }
        if roots.is_empty() {
            return Err(ClientError::Tls(
                "no trusted certificate to verify keepd's".into(),
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Endpoint {
            host: host.to_string(),
            port,
            tls: Some(Arc::new(config)),
        })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A second factor as a login sends it.
#[derive(Debug, Clone, Copy)]
pub enum SecondFactor<'a> {
    /// The authenticator's current code.
    Totp(&'a str),
    /// One of the recovery codes.
    Recovery(&'a str),
}

impl SecondFactor<'_> {
    fn add_to(self, body: &mut Value) {
        match self {
            SecondFactor::Totp(code) => body["totpCode"] = json!(code),
            SecondFactor::Recovery(code) => body["recoveryCode"] = json!(code),
        }
    }
}

/// One user's connection to keepd (HTTP/1.1 keep-alive, reconnecting).
pub struct SyncClient {
    endpoint: Endpoint,
    connection: Mutex<Option<SendRequest<Full<Bytes>>>>,
    token: Option<String>,
    /// The logged-in account (device registration names it).
    user: Option<Uuid>,
}

/// What a connection runs over.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Stream for T {}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub id: String,
    pub email: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PushedEntry {
    pub id: String,
    pub sequence: i64,
    pub haex_timestamp: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PushResult {
    pub count: usize,
    pub logs: Vec<PushedEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PulledEntry {
    pub id: String,
    pub encrypted_data: String,
    pub nonce: String,
    pub haex_timestamp: String,
    pub sequence: i64,
    pub created_at: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PullResult {
    pub logs: Vec<PulledEntry>,
    pub has_more: bool,
}

/// One live update: the vault's new last sequence.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VaultEvent {
    pub vault_id: String,
    pub sequence: i64,
}

/// An open `GET /sync/events` stream.
pub struct EventStream {
    body: hyper::body::Incoming,
    buffer: String,
    ended: Option<String>,
    _sender: SendRequest<Full<Bytes>>,
}

/// The data of a stream's final `end` event.
#[derive(Deserialize)]
struct StreamEnd {
    reason: String,
}

impl EventStream {
    /// The next event; None when the server ended the stream (reconnect
    /// with `Last-Event-ID`, unless `end_reason` says the session ended).
    /// Heartbeat comments are skipped.
    pub async fn next(&mut self) -> Result<Option<VaultEvent>, ClientError> {
        let Some(block) = self.next_block().await? else {
            return Ok(None);
        };
        let data: String = block
            .lines()
            .filter_map(|line| line.strip_prefix("data:"))
            .map(str::trim)
            .collect();
        if block.lines().any(|line| line.trim() == "event: end") {
            let end: StreamEnd = serde_json::from_str(&data)
                .map_err(|e| ClientError::Decode(format!("end event {data:?}: {e}")))?;
            self.ended = Some(end.reason);
            return Ok(None);
        }
        serde_json::from_str(&data)
            .map(Some)
            .map_err(|e| ClientError::Decode(format!("event {data:?}: {e}")))
    }

    /// Why the server ended the stream, from its final `end` event:
    /// `logout`, `password_changed`, `account_disabled`, `account_deleted`
    /// or `session_expired` (log in again), `idle` (reconnect).
    pub fn end_reason(&self) -> Option<&str> {
        self.ended.as_deref()
    }

    /// The next event as the server framed it (`event:`, `id:`, `data:`
    /// lines); heartbeat comments are skipped.
    pub async fn next_block(&mut self) -> Result<Option<String>, ClientError> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if block.lines().any(|line| line.starts_with("data:")) {
                    return Ok(Some(block));
                }
                continue;
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => {
                    return Err(ClientError::Transport {
                        addr: "event stream".into(),
                        reason: e.to_string(),
                    });
                }
                Some(Ok(frame)) => {
                    if let Ok(bytes) = frame.into_data() {
                        self.buffer.push_str(&String::from_utf8_lossy(&bytes));
                    }
                }
            }
        }
    }
}

/// A push request as encrypted once: the same bytes on every retry.
#[derive(Debug, Clone)]
pub struct SealedPush(Value);

/// One plaintext log entry before encryption.
pub struct LogEntry {
    pub data: Vec<u8>,
    pub haex_timestamp: String,
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl SyncClient {
    /// Plain HTTP to `addr`.
    pub fn new(addr: SocketAddr) -> SyncClient {
        SyncClient::at(Endpoint::http(addr))
    }

    pub fn at(endpoint: Endpoint) -> SyncClient {
        SyncClient {
            endpoint,
            connection: Mutex::new(None),
            token: None,
            user: None,
        }
    }

    /// A second connection for the same user (parallel work).
    pub fn another_connection(&self) -> SyncClient {
        SyncClient {
            endpoint: self.endpoint.clone(),
            connection: Mutex::new(None),
            token: self.token.clone(),
            user: self.user,
        }
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Uses `token` from now on (e.g. one issued to another client).
    pub fn set_token(&mut self, token: Option<String>) {
        self.token = token;
    }

    fn transport(&self, reason: impl std::fmt::Display) -> ClientError {
        ClientError::Transport {
            addr: self.endpoint.authority(),
            reason: reason.to_string(),
        }
    }

    /// A ready connection: the kept one, or a new one when it closed.
    async fn connect(
        &self,
        kept: Option<SendRequest<Full<Bytes>>>,
    ) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        if let Some(mut sender) = kept
            && sender.ready().await.is_ok()
        {
            return Ok(sender);
        }
        let endpoint = &self.endpoint;
        let stream = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|e| self.transport(e))?;
        stream.set_nodelay(true).map_err(|e| self.transport(e))?;
        let stream: Pin<Box<dyn Stream>> = match &endpoint.tls {
            None => Box::pin(stream),
            Some(config) => {
                let name = rustls_pki_types::ServerName::try_from(endpoint.host.clone())
                    .map_err(|e| self.transport(format!("{}: {e}", endpoint.host)))?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, stream)
                    .await
                    .map_err(|e| self.transport(format!("TLS: {e}")))?;
                Box::pin(tls)
            }
        };
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.transport(e))?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// A request to the endpoint, with the session's token when logged in.
    fn request(&self, method: Method, path: &str) -> hyper::http::request::Builder {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.endpoint.authority());
        match &self.token {
            Some(token) => request.header("authorization", format!("Bearer {token}")),
            None => request,
        }
    }

    /// Any request, raw: for tests that send what a client should not.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Answer, ClientError> {
        let mut request = self.request(method, path);
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| self.transport(e))?;
        // HTTP/1.1: one exchange at a time on the connection.
        let mut slot = self.connection.lock().await;
        let exchange = async {
            let mut sender = self.connect(slot.take()).await?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| self.transport(e))?;
            let answer = self.read_answer(response).await?;
            *slot = Some(sender);
            Ok(answer)
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| self.transport("no answer within 30s"))?
    }

    /// The whole answer: status, `Retry-After`, the body as JSON and text.
    async fn read_answer(
        &self,
        response: hyper::Response<hyper::body::Incoming>,
    ) -> Result<Answer, ClientError> {
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.transport(e))?
            .to_bytes();
        Ok(Answer {
            status,
            retry_after,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            text: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }

    /// A JSON request whose non-2xx answer becomes `ClientError::Api`.
    async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
        let body = body.map(|b| b.to_string().into_bytes());
        let answer = self.send(method, path, headers, body).await?;
        if (200..300).contains(&answer.status) {
            return Ok(answer.body);
        }
        Err(answer.into_error())
    }

    fn decode<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ClientError> {
        serde_json::from_value(value).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Registers with OPAQUE: the password never leaves this process.
    pub async fn register(&self, email: &str, password: &str) -> Result<User, ClientError> {
        self.register_invited(email, password, None).await
    }

    /// Registers with OPAQUE and an invite code (`api.registration: invite`).
    pub async fn register_invited(
        &self,
        email: &str,
        password: &str,
        invite_code: Option<&str>,
    ) -> Result<User, ClientError> {
        let record = self.opaque_record(email, password).await?;
        let body = json!({"email": email, "registrationRecord": record, "inviteCode": invite_code});
        let answer = self
            .call(
                Method::POST,
                "/auth/opaque/register/finish",
                &[],
                Some(body),
            )
            .await?;
        Self::decode(answer["user"].clone())
    }

    /// An OPAQUE record of `password` for `email` (base64), for a
    /// registration, a password change or a move to OPAQUE.
    async fn opaque_record(&self, email: &str, password: &str) -> Result<String, ClientError> {
        let (registration, request) = opaque::Registration::start(password)?;
        let body = json!({"email": email, "registrationRequest": request});
        let answer = self
            .call(Method::POST, "/auth/opaque/register/start", &[], Some(body))
            .await?;
        registration.finish(password, &answer["registrationResponse"])
    }

    /// An OPAQUE login's two steps up to the proof: `loginId` and
    /// `credentialFinalization` for the finish. A wrong password still
    /// finishes (with a proof that cannot verify), so keepd answers and
    /// records the failure as for any wrong password.
    async fn opaque_proof(&self, email: &str, password: &str) -> Result<Value, ClientError> {
        let (login, request) = opaque::Login::start(password)?;
        let body = json!({"email": email, "credentialRequest": request});
        let answer = self
            .call(Method::POST, "/auth/opaque/login/start", &[], Some(body))
            .await?;
        let finalization = match login.finish(password, &answer["credentialResponse"])? {
            Some(finished) => finished.finalization,
            None => {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.encode(crypto::random::<64>()?)
            }
        };
        Ok(json!({"loginId": answer["loginId"], "credentialFinalization": finalization}))
    }

    /// Logs in with OPAQUE and keeps the token for later calls.
    pub async fn login(&mut self, email: &str, password: &str) -> Result<User, ClientError> {
        self.login_with_second_factor(email, password, None).await
    }

    /// Logs in with OPAQUE and, for an account that has one, its second
    /// factor.
    pub async fn login_with_second_factor(
        &mut self,
        email: &str,
        password: &str,
        factor: Option<SecondFactor<'_>>,
    ) -> Result<User, ClientError> {
        let mut body = self.opaque_proof(email, password).await?;
        body["email"] = json!(email);
        if let Some(factor) = factor {
            factor.add_to(&mut body);
        }
        let answer = self
            .call(Method::POST, "/auth/opaque/login/finish", &[], Some(body))
            .await?;
        self.logged_in(answer)
    }

    /// Registers on the password routes (HaexHub's): keepd sees the password.
    pub async fn register_with_password(
        &self,
        email: &str,
        password: &str,
    ) -> Result<User, ClientError> {
        let body = json!({"email": email, "password": password});
        let answer = self
            .call(Method::POST, "/auth/register", &[], Some(body))
            .await?;
        Self::decode(answer["user"].clone())
    }

    /// Logs in on the password route (HaexHub's): keepd sees the password.
    pub async fn login_with_password(
        &mut self,
        email: &str,
        password: &str,
    ) -> Result<User, ClientError> {
        let body = json!({"email": email, "password": password});
        let answer = self
            .call(Method::POST, "/auth/login", &[], Some(body))
            .await?;
        self.logged_in(answer)
    }

    fn logged_in(&mut self, answer: Value) -> Result<User, ClientError> {
        self.token = Some(
            answer["token"]
                .as_str()
                .ok_or_else(|| ClientError::Decode("login answer without a token".into()))?
                .to_string(),
        );
        let user: User = Self::decode(answer["user"].clone())?;
        self.user = Uuid::parse_str(&user.id).ok();
        Ok(user)
    }

    /// Moves a password account to OPAQUE (logged in; the password is
    /// shown to keepd this last time).
    pub async fn upgrade_to_opaque(&self, email: &str, password: &str) -> Result<(), ClientError> {
        let record = self.opaque_record(email, password).await?;
        let body = json!({"currentPassword": password, "registrationRecord": record});
        self.call(Method::POST, "/auth/opaque/upgrade", &[], Some(body))
            .await?;
        Ok(())
    }

    /// Starts enrolling TOTP: the `otpauth://` URI and the base32 secret.
    pub async fn enrol_totp(&self, label: Option<&str>) -> Result<(String, String), ClientError> {
        let answer = self
            .call(
                Method::POST,
                "/auth/totp",
                &[],
                Some(json!({"label": label})),
            )
            .await?;
        let text = |field: &str| {
            answer[field]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| ClientError::Decode(format!("no `{field}` in the enrolment")))
        };
        Ok((text("otpauthUri")?, text("secret")?))
    }

    /// Confirms the enrolment with a code; the recovery codes, shown once.
    pub async fn confirm_totp(&self, code: &str) -> Result<Vec<String>, ClientError> {
        let answer = self
            .call(
                Method::POST,
                "/auth/totp/confirm",
                &[],
                Some(json!({"totpCode": code})),
            )
            .await?;
        Self::decode(answer["recoveryCodes"].clone())
    }

    /// Turns an OPAQUE account's second factor off: the password (a login
    /// proves it) and a code.
    pub async fn disable_totp(
        &self,
        email: &str,
        password: &str,
        factor: SecondFactor<'_>,
    ) -> Result<(), ClientError> {
        let mut body = self.opaque_proof(email, password).await?;
        factor.add_to(&mut body);
        self.call(Method::DELETE, "/auth/totp", &[], Some(body))
            .await?;
        Ok(())
    }

    pub async fn logout(&self) -> Result<(), ClientError> {
        self.call(Method::POST, "/auth/logout", &[], None).await?;
        Ok(())
    }

    /// Changes an OPAQUE account's password: a login proves the current
    /// one, a new record replaces it; every session ends.
    pub async fn change_password(
        &self,
        email: &str,
        current: &str,
        new: &str,
    ) -> Result<(), ClientError> {
        let record = self.opaque_record(email, new).await?;
        let mut body = self.opaque_proof(email, current).await?;
        body["registrationRecord"] = json!(record);
        self.call(Method::POST, "/auth/opaque/password", &[], Some(body))
            .await?;
        Ok(())
    }

    /// Changes a password account's password (HaexHub's route).
    pub async fn change_password_with_password(
        &self,
        current: &str,
        new: &str,
    ) -> Result<(), ClientError> {
        let body = json!({"currentPassword": current, "newPassword": new});
        self.call(Method::POST, "/auth/password", &[], Some(body))
            .await?;
        Ok(())
    }

    /// The account's usage and quotas (`GET /account`).
    pub async fn account(&self) -> Result<Value, ClientError> {
        self.call(Method::GET, "/account", &[], None).await
    }

    /// Erases an OPAQUE account; a login proves the password again.
    pub async fn delete_account(&self, email: &str, password: &str) -> Result<(), ClientError> {
        let body = self.opaque_proof(email, password).await?;
        self.call(Method::DELETE, "/account", &[], Some(body))
            .await?;
        Ok(())
    }

    /// Erases a password account; the server checks the password again.
    pub async fn delete_account_with_password(&self, password: &str) -> Result<(), ClientError> {
        let body = json!({"currentPassword": password});
        self.call(Method::DELETE, "/account", &[], Some(body))
            .await?;
        Ok(())
    }

    /// Creates a vault: a fresh key, stored wrapped under `password`.
    pub async fn create_vault(
        &self,
        vault_id: &str,
        password: &str,
    ) -> Result<VaultKey, ClientError> {
        let key = VaultKey::generate()?;
        self.store_vault_key(vault_id, &key.wrap(password)?).await?;
        Ok(key)
    }

    pub async fn store_vault_key(
        &self,
        vault_id: &str,
        wrapped: &WrappedVaultKey,
    ) -> Result<Value, ClientError> {
        let mut body = json!({
            "vaultId": vault_id,
            "encryptedVaultKey": wrapped.encrypted_vault_key,
            "salt": wrapped.salt,
            "nonce": wrapped.nonce,
        });
        if let Some(check) = &wrapped.key_check {
            body["keyCheck"] = json!(check);
        }
        self.call(Method::POST, "/sync/vault-key", &[], Some(body))
            .await
    }

    /// The caller's vaults, a page at a time (`after`: the previous
    /// page's `nextCursor`).
    pub async fn vaults(&self, limit: u32, after: Option<&str>) -> Result<Value, ClientError> {
        let mut path = format!("/sync/vaults?limit={limit}");
        if let Some(after) = after {
            path.push_str(&format!("&after={after}"));
        }
        self.call(Method::GET, &path, &[], None).await
    }

    /// Erases a vault with its key and entries.
    pub async fn delete_vault(&self, vault_id: &str) -> Result<Value, ClientError> {
        self.call(
            Method::DELETE,
            &format!("/sync/vault/{vault_id}"),
            &[],
            None,
        )
        .await
    }

    /// Re-wraps a vault's key under `new_password` (after a password
    /// change), replacing the record at `version` and no other.
    pub async fn rewrap_vault(
        &self,
        vault_id: &str,
        key: &VaultKey,
        new_password: &str,
        version: i64,
    ) -> Result<Value, ClientError> {
        let wrapped = key.wrap(new_password)?;
        let body = json!({
            "encryptedVaultKey": wrapped.encrypted_vault_key,
            "salt": wrapped.salt,
            "nonce": wrapped.nonce,
            "version": version,
            "keyCheck": wrapped.key_check,
        });
        self.call(
            Method::PATCH,
            &format!("/sync/vault-key/{vault_id}"),
            &[],
            Some(body),
        )
        .await
    }

    /// Fetches and unwraps a vault's key with `password`.
    pub async fn open_vault(
        &self,
        vault_id: &str,
        password: &str,
    ) -> Result<VaultKey, ClientError> {
        let answer = self
            .call(
                Method::GET,
                &format!("/sync/vault-key/{vault_id}"),
                &[],
                None,
            )
            .await?;
        let stored = &answer["vaultKey"];
        let field = |name: &str| {
            stored[name]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| ClientError::Decode(format!("vaultKey.{name} missing")))
        };
        let wrapped = WrappedVaultKey {
            encrypted_vault_key: field("encryptedVaultKey")?,
            salt: field("salt")?,
            nonce: field("nonce")?,
            key_check: stored["keyCheck"].as_str().map(str::to_string),
        };
        Ok(VaultKey::unwrap(&wrapped, password)?)
    }

    /// Encrypts and pushes `entries` as one batch.
    pub async fn push(
        &self,
        vault_id: &str,
        key: &VaultKey,
        entries: &[LogEntry],
        idempotency_key: Option<&str>,
    ) -> Result<PushResult, ClientError> {
        let sealed = Self::seal_push(vault_id, key, entries)?;
        self.push_sealed(&sealed, idempotency_key).await
    }

    /// The encrypted request for `entries`, to send (and resend on a retry
    /// with the same Idempotency-Key: a retry must be the same request).
    pub fn seal_push(
        vault_id: &str,
        key: &VaultKey,
        entries: &[LogEntry],
    ) -> Result<SealedPush, ClientError> {
        let mut logs = Vec::with_capacity(entries.len());
        for entry in entries {
            let (data, nonce) = key.encrypt_entry(&entry.data)?;
            logs.push(json!({
                "encryptedData": data,
                "nonce": nonce,
                "haexTimestamp": entry.haex_timestamp,
            }));
        }
        Ok(SealedPush(json!({
            "vaultId": vault_id,
            "logs": logs,
            "keyCheck": key.key_check(),
        })))
    }

    /// Sends a sealed push (again, when retrying).
    pub async fn push_sealed(
        &self,
        push: &SealedPush,
        idempotency_key: Option<&str>,
    ) -> Result<PushResult, ClientError> {
        let headers: Vec<(&str, &str)> = idempotency_key
            .map(|k| ("idempotency-key", k))
            .into_iter()
            .collect();
        let answer = self
            .call(Method::POST, "/sync/push", &headers, Some(push.0.clone()))
            .await?;
        Self::decode(answer)
    }

    pub async fn pull(
        &self,
        vault_id: &str,
        after_sequence: i64,
        limit: i64,
    ) -> Result<PullResult, ClientError> {
        let body = json!({"vaultId": vault_id, "afterSequence": after_sequence, "limit": limit});
        let answer = self
            .call(Method::POST, "/sync/pull", &[], Some(body))
            .await?;
        Self::decode(answer)
    }

    /// Opens `GET /sync/events` for `vault_id` on a connection of its own,
    /// resuming after `last_event_id` when given.
    pub async fn events(
        &self,
        vault_id: &str,
        last_event_id: Option<i64>,
    ) -> Result<EventStream, ClientError> {
        let mut request = self
            .request(Method::GET, &format!("/sync/events?vaultId={vault_id}"))
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| self.transport(e))?;
        let mut sender = self.connect(None).await?;
        let response = tokio::time::timeout(REQUEST_TIMEOUT, sender.send_request(request))
            .await
            .map_err(|_| self.transport("no answer within 30s"))?
            .map_err(|e| self.transport(e))?;
        if response.status() != 200 {
            return Err(self.read_answer(response).await?.into_error());
        }
        Ok(EventStream {
            body: response.into_body(),
            buffer: String::new(),
            ended: None,
            _sender: sender,
        })
    }

    /// Follows a vault: every event becomes pulls of what came after
    /// `after`, each page handed to `on_page` (which says whether to go
    /// on); a stream that ends is opened again with `Last-Event-ID`, so
    /// nothing is missed. Returns the last sequence seen.
    pub async fn watch(
        &self,
        vault_id: &str,
        mut after: i64,
        mut on_page: impl FnMut(&PullResult) -> bool,
    ) -> Result<i64, ClientError> {
        loop {
            let mut events = self.events(vault_id, Some(after)).await?;
            while let Some(event) = events.next().await? {
                while event.sequence > after {
                    let page = self.pull(vault_id, after, 1000).await?;
                    let Some(last) = page.logs.last().map(|e| e.sequence) else {
                        break;
                    };
                    after = last;
                    if !on_page(&page) {
                        return Ok(after);
                    }
                    if !page.has_more {
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Registers `device`'s public key with its proof of possession;
    /// returns the device id.
    pub async fn register_device(
        &self,
        name: &str,
        device: &DeviceKey,
    ) -> Result<String, ClientError> {
        let account = self
            .user
            .ok_or_else(|| ClientError::Decode("log in before registering a device".into()))?;
        let body = json!({
            "deviceName": name,
            "publicKey": device.public_key(),
            "proof": device.registration_proof(account),
        });
        let answer = self.call(Method::POST, "/devices", &[], Some(body)).await?;
        answer["device"]["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| ClientError::Decode("device.id missing".into()))
    }

    pub async fn devices(&self) -> Result<Value, ClientError> {
        self.call(Method::GET, "/devices", &[], None).await
    }

    pub async fn revoke_device(&self, device_id: &str) -> Result<(), ClientError> {
        self.call(Method::DELETE, &format!("/devices/{device_id}"), &[], None)
            .await?;
        Ok(())
    }

    /// Deletes one of the account's backups.
    pub async fn delete_backup(&self, backup_id: &str) -> Result<(), ClientError> {
        self.call(Method::DELETE, &format!("/backups/{backup_id}"), &[], None)
            .await?;
        Ok(())
    }

    /// Encrypts `plaintext`, signs it with `device` (signature version 2:
    /// device, classification, nonce, tag and ciphertext), stores it;
    /// returns the backup id.
    pub async fn store_backup(
        &self,
        device_id: &str,
        device: &DeviceKey,
        key: &VaultKey,
        plaintext: &[u8],
        classification: &str,
    ) -> Result<String, ClientError> {
        use base64::Engine;
        use base64::engine::general_purpose::STANDARD as BASE64;
        let backup = key.encrypt_backup(plaintext)?;
        let device_uuid = Uuid::parse_str(device_id)
            .map_err(|e| ClientError::Decode(format!("device id {device_id}: {e}")))?;
        let message = crate::device_messages::backup_v2(
            device_uuid,
            classification,
            &backup.nonce,
            &backup.auth_tag,
            &backup.ciphertext,
        );
        let body = json!({
            "deviceId": device_id,
            "ciphertext": BASE64.encode(&backup.ciphertext),
            "nonce": BASE64.encode(&backup.nonce),
            "authTag": BASE64.encode(&backup.auth_tag),
            "signature": device.sign(&message),
            "signatureVersion": 2,
            "dataClassification": classification,
        });
        let answer = self.call(Method::POST, "/backups", &[], Some(body)).await?;
        answer["backup"]["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| ClientError::Decode("backup.id missing".into()))
    }

    /// Fetches a backup and decrypts it with `key`.
    pub async fn restore_backup(
        &self,
        backup_id: &str,
        key: &VaultKey,
    ) -> Result<Vec<u8>, ClientError> {
        use base64::Engine;
        use base64::engine::general_purpose::STANDARD as BASE64;
        let answer = self
            .call(Method::GET, &format!("/backups/{backup_id}"), &[], None)
            .await?;
        let field = |name: &str| {
            answer["backup"][name]
                .as_str()
                .and_then(|v| BASE64.decode(v).ok())
                .ok_or_else(|| ClientError::Decode(format!("backup.{name} missing")))
        };
        let backup = EncryptedBackup {
            ciphertext: field("ciphertext")?,
            nonce: field("nonce")?,
            auth_tag: field("authTag")?,
        };
        Ok(key.decrypt_backup(&backup)?)
    }

    pub async fn backups(&self, query: &str) -> Result<Value, ClientError> {
        self.call(Method::GET, &format!("/backups{query}"), &[], None)
            .await
    }
}
