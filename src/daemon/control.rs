//! The control socket: `keepd rotate` and `keepd account` talk to the
//! running daemon through a 0600 Unix socket in the runtime directory. Only
//! keepd's own user and root may use it (checked with SO_PEERCRED too).
//!
//! Protocol: one JSON request line, one JSON response line: a message for
//! people and, for what the CLI prints as a table or JSON, the data.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use uuid::Uuid;

use super::rotator::Rotator;
use crate::api::Api;
use crate::api::operator::{AccountRef, Operator, OperatorError};
use crate::shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "keepd does not appear to be running: nothing answers on {path} ({source}); start it \
         with `keepd run`, or pass the --config it runs with"
    )]
    NotRunning {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the control socket {path} failed: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("keepd answered: {0}")]
    Refused(String),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Rotate {
        /// keepd's superuser's password instead of the login role.
        #[serde(default)]
        superuser: bool,
    },
    AccountList {
        after: Option<Uuid>,
        limit: u32,
    },
    AccountShow {
        account: AccountRef,
    },
    AccountDisable {
        account: AccountRef,
    },
    AccountEnable {
        account: AccountRef,
    },
    AccountDelete {
        account: AccountRef,
    },
    AccountInvite {
        ttl_seconds: u64,
    },
    AccountResetSecondFactor {
        account: AccountRef,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub message: String,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl Response {
    fn refused(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            message: message.into(),
            data: serde_json::Value::Null,
        }
    }

    fn done(message: impl Into<String>, data: impl Serialize) -> Response {
        Response {
            ok: true,
            message: message.into(),
            data: serde_json::to_value(data).expect("control data serialises"),
        }
    }
}

/// Binds the socket (replacing a stale one; the state lock guarantees no
/// other keepd uses this runtime directory) with mode 0600.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(
    listener: UnixListener,
    rotator: Arc<Rotator>,
    api: Arc<Api>,
    mut stop: Shutdown,
) {
    let me = nix::unistd::geteuid().as_raw();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    continue;
                }
            },
            _ = stop.requested() => return,
        };
        let operator = stream
            .peer_cred()
            .ok()
            .filter(|cred| cred.uid() == me || cred.uid() == 0)
            .map(|cred| Operator { uid: cred.uid() });
        let rotator = rotator.clone();
        let api = api.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, operator, &rotator, &api).await {
                warn!(error = %e, "control request failed");
            }
        });
    }
}

async fn handle(
    stream: UnixStream,
    operator: Option<Operator>,
    rotator: &Rotator,
    api: &Api,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(64 * 1024);
    // A client that connects and says nothing does not hold a task.
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let response = match (operator, serde_json::from_str::<Request>(&line)) {
        (None, _) => Response::refused(
            "permission denied: only keepd's own user and root may use the control socket",
        ),
        (Some(_), Err(e)) => Response::refused(format!("bad request: {e}")),
        (Some(operator), Ok(request)) => answer(request, operator, rotator, api).await,
    };
    let mut out = serde_json::to_vec(&response).expect("response serialises");
    out.push(b'\n');
    write.write_all(&out).await
}

async fn answer(request: Request, operator: Operator, rotator: &Rotator, api: &Api) -> Response {
    match request {
        Request::Rotate { superuser } => {
            info!(
                superuser,
                "credential rotation requested on the control socket"
            );
            let rotated = match superuser {
                true => rotator.rotate_superuser().await,
                false => rotator.rotate_now().await,
            };
            match rotated {
                Ok(message) => Response::done(message, ()),
                Err(e) => Response::refused(e.to_string()),
            }
        }
        Request::AccountList { after, limit } => {
            account(api.operator_list(after, limit).await, "accounts")
        }
        Request::AccountShow { account: who } => account(api.operator_show(&who).await, "account"),
        // Logged by id once found: an email the operator typed stays out
        // of the log, as it stays out of the database.
        Request::AccountDisable { account: who } => {
            let result = api.operator_set_disabled(operator, &who, true).await;
            if let Ok(view) = &result {
                info!(account = %view.account.id, uid = operator.uid, "account disabled by the operator");
            }
            account(result, "disabled; its sessions are ended")
        }
        Request::AccountEnable { account: who } => {
            let result = api.operator_set_disabled(operator, &who, false).await;
            if let Ok(view) = &result {
                info!(account = %view.account.id, uid = operator.uid, "account enabled by the operator");
            }
            account(result, "enabled")
        }
        Request::AccountDelete { account: who } => {
            let result = api.operator_delete(operator, &who).await;
            if let Ok(gone) = &result {
                info!(account = %gone.id, uid = operator.uid, "account deleted by the operator");
            }
            account(result, "deleted with everything it stored")
        }
        Request::AccountResetSecondFactor { account: who } => {
            let result = api.operator_reset_second_factor(operator, &who).await;
            if let Ok(view) = &result {
                info!(account = %view.account.id, uid = operator.uid, "second factor reset by the operator");
            }
            account(
                result,
                "second factor removed; it logs in with its password alone",
            )
        }
        Request::AccountInvite { ttl_seconds } => account(
            api.operator_invite(operator, Duration::from_secs(ttl_seconds))
                .await,
            "invite",
        ),
    }
}

fn account<T: Serialize>(result: Result<T, OperatorError>, said: &str) -> Response {
    match result {
        Ok(data) => Response::done(said, data),
        Err(e) => Response::refused(e.to_string()),
    }
}

/// Sends one request to the daemon and returns its answer.
pub async fn request(socket: &Path, request: &Request) -> Result<Response, ControlError> {
    let path = socket.to_owned();
    let io_err = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    let stream = UnixStream::connect(&path)
        .await
        .map_err(|source| ControlError::NotRunning {
            path: path.clone(),
            source,
        })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request).expect("request serialises");
    line.push(b'\n');
    write.write_all(&line).await.map_err(io_err)?;
    let mut answer = String::new();
    let mut reader = BufReader::new(read);
    // A rotation waits for Postgres only (the grace period runs afterwards).
    tokio::time::timeout(Duration::from_secs(120), reader.read_line(&mut answer))
        .await
        .map_err(|_| io_err(std::io::Error::from(std::io::ErrorKind::TimedOut)))?
        .map_err(io_err)?;
    let response: Response = serde_json::from_str(&answer)
        .map_err(|e| io_err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    if response.ok {
        Ok(response)
    } else {
        Err(ControlError::Refused(response.message))
    }
}
