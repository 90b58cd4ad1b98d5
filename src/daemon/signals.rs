//! The service manager's signals, registered before anything starts: a
//! stop that arrives during start-up is held and honoured once keepd can
//! stop in order, instead of the default action ending keepd with its
//! Postgres half-started and a health check already answered.

use tokio::signal::unix::{Signal, SignalKind, signal};

use super::DaemonError;

pub(super) struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

/// What the service manager asked for.
pub(super) enum Request {
    Stop(&'static str),
    Reload,
}

impl Signals {
    pub(super) fn register() -> Result<Signals, DaemonError> {
        let listen = |kind| signal(kind).map_err(DaemonError::Signals);
        Ok(Signals {
            term: listen(SignalKind::terminate())?,
            int: listen(SignalKind::interrupt())?,
            hup: listen(SignalKind::hangup())?,
        })
    }

    /// The next request, including one that arrived before this was called.
    pub(super) async fn next(&mut self) -> Request {
        tokio::select! {
            _ = self.term.recv() => Request::Stop("SIGTERM"),
            _ = self.int.recv() => Request::Stop("SIGINT"),
            _ = self.hup.recv() => Request::Reload,
        }
    }

    /// The next stop; a reload asked for meanwhile has nothing to reload.
    pub(super) async fn stop(&mut self) -> &'static str {
        loop {
            if let Request::Stop(name) = self.next().await {
                return name;
            }
        }
    }
}
