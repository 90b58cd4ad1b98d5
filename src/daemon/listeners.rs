//! The API's and the metrics' TCP listeners: bound early (a busy port is
//! found before anything is written), served by tokio later.

use std::net::SocketAddr;

use super::{DaemonError, control};
use crate::config::{Config, Layout};

/// The control socket, the API's listener (bound early, `api_socket`)
/// and the metrics listener, ready for tokio.
pub(super) fn open(
    config: &Config,
    layout: &Layout,
    api_socket: std::net::TcpListener,
) -> Result<
    (
        tokio::net::UnixListener,
        tokio::net::TcpListener,
        Option<tokio::net::TcpListener>,
    ),
    DaemonError,
> {
    let control_path = layout.control_socket();
    let control = control::bind(&control_path).map_err(|source| DaemonError::Listen {
        what: "the control socket",
        addr: control_path.display().to_string(),
        source,
    })?;
    let listener = serving("api.listen", api_socket)?;
    let metrics = match config.api.metrics_listen {
        Some(addr) => Some(serving(
            "api.metrics_listen",
            bind("api.metrics_listen", addr)?,
        )?),
        None => None,
    };
    Ok((control, listener, metrics))
}

pub(super) fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<std::net::TcpListener, DaemonError> {
    let listen = |addr| {
        let listener = std::net::TcpListener::bind(addr)?;
        // std listens with a backlog of 128: under a connection flood the
        // kernel then drops ordinary clients' SYNs (a retry costs them a
        // second). Listening again raises it to the system's maximum.
        nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::MAXCONN)?;
        listener.set_nonblocking(true)?;
        Ok::<_, std::io::Error>(listener)
    };
    listen(addr).map_err(|source| DaemonError::Listen {
        what,
        addr: addr.to_string(),
        source,
    })
}

/// The bound socket, for tokio.
pub(super) fn serving(
    what: &'static str,
    listener: std::net::TcpListener,
) -> Result<tokio::net::TcpListener, DaemonError> {
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string());
    tokio::net::TcpListener::from_std(listener).map_err(|source| DaemonError::Listen {
        what,
        addr,
        source,
    })
}
