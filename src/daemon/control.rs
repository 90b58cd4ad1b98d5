//! The control socket: `keepd rotate` (and later `keepd report`) talk to the
//! running daemon through a 0600 Unix socket in the runtime directory. Only
//! keepd's own user and root may use it (checked with SO_PEERCRED too).
//!
//! Protocol: one JSON request line, one JSON response line.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use super::rotator::Rotator;
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
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Request {
    Rotate,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub message: String,
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

pub async fn serve(listener: UnixListener, rotator: Arc<Rotator>, mut stop: Shutdown) {
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
        let allowed = stream
            .peer_cred()
            .is_ok_and(|cred| cred.uid() == me || cred.uid() == 0);
        let rotator = rotator.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, allowed, &rotator).await {
                warn!(error = %e, "control request failed");
            }
        });
    }
}

async fn handle(stream: UnixStream, allowed: bool, rotator: &Rotator) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(64 * 1024);
    reader.read_line(&mut line).await?;
    let response = if !allowed {
        Response {
            ok: false,
            message: "permission denied: only keepd's own user and root may use the control socket"
                .into(),
        }
    } else {
        match serde_json::from_str::<Request>(&line) {
            Ok(Request::Rotate) => {
                info!("credential rotation requested on the control socket");
                match rotator.rotate_now().await {
                    Ok(message) => Response { ok: true, message },
                    Err(e) => Response {
                        ok: false,
                        message: e.to_string(),
                    },
                }
            }
            Err(e) => Response {
                ok: false,
                message: format!("bad request: {e}"),
            },
        }
    };
    let mut out = serde_json::to_vec(&response).expect("response serialises");
    out.push(b'\n');
    write.write_all(&out).await
}

/// Sends one request to the daemon and returns its message.
pub async fn request(socket: &Path, request: &Request) -> Result<String, ControlError> {
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
        Ok(response.message)
    } else {
        Err(ControlError::Refused(response.message))
    }
}
