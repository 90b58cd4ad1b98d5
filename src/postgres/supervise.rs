//! Keeps Postgres running, whichever provider runs it (`server::Server`):
//! starts it, waits until it accepts connections, restarts it with backoff
//! when it dies, and stops it fast on shutdown. The state is published on
//! a watch channel for `/health`. What a provider is, it does not know.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::server::{Running, Server};
use crate::backoff::Backoff;
use crate::metrics::Metrics;
use crate::shutdown::{self, Shutdown, ShutdownTrigger};

/// What the supervised server is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgState {
    Starting,
    Ready,
    Restarting,
    Stopped,
}

impl PgState {
    pub fn as_str(self) -> &'static str {
        match self {
            PgState::Starting => "starting",
            PgState::Ready => "up",
            PgState::Restarting => "restarting",
            PgState::Stopped => "stopped",
        }
    }
}

/// Handle to the supervision task; dropping it does not stop Postgres,
/// `stop` does (and keepd's death does, through the parent-death signal).
pub struct Supervisor {
    state: watch::Receiver<PgState>,
    stop: ShutdownTrigger,
    task: JoinHandle<()>,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A server that stayed up this long is healthy again: backoff resets.
const STABLE_AFTER: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

impl Supervisor {
    /// Starts supervising; `probe` is how readiness is tested (a login).
    pub fn start(server: Server, probe: super::tls::Endpoint, metrics: Arc<Metrics>) -> Supervisor {
        let (state_tx, state) = watch::channel(PgState::Starting);
        let (stop, shutdown) = shutdown::channel();
        let task = tokio::spawn(supervise(server, probe, state_tx, shutdown, metrics));
        Supervisor { state, stop, task }
    }

    pub fn state(&self) -> watch::Receiver<PgState> {
        self.state.clone()
    }

    /// Waits until the server accepts logins; false on timeout.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut state = self.state.clone();
        tokio::time::timeout(timeout, state.wait_for(|s| *s == PgState::Ready))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Fast shutdown of Postgres; returns once it has exited.
    pub async fn stop(self) {
        self.stop.trigger();
        let _ = self.task.await;
    }
}

enum Outcome {
    Stopped,
    Died { uptime: Duration },
}

async fn supervise(
    server: Server,
    probe: super::tls::Endpoint,
    state: watch::Sender<PgState>,
    mut stop: Shutdown,
    metrics: Arc<Metrics>,
) {
    let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
    loop {
        match run_once(&server, &probe, &state, &mut stop).await {
            Outcome::Stopped => break,
            Outcome::Died { uptime } => {
                if uptime >= STABLE_AFTER {
                    backoff.reset();
                }
                let _ = state.send(PgState::Restarting);
                metrics.postgres_restarted();
                let delay = backoff.next_delay();
                warn!(
                    retry_in_ms = delay.as_millis() as u64,
                    "restarting postgres"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.requested() => break,
                }
            }
        }
    }
    let _ = state.send(PgState::Stopped);
}

async fn run_once(
    server: &Server,
    probe: &super::tls::Endpoint,
    state: &watch::Sender<PgState>,
    stop: &mut Shutdown,
) -> Outcome {
    let started = Instant::now();
    let died = |why: Option<String>| {
        let uptime = started.elapsed();
        error!(
            status = %why.unwrap_or_else(|| "unknown".to_string()),
            uptime_s = uptime.as_secs(),
            "postgres exited unexpectedly"
        );
        Outcome::Died { uptime }
    };
    let running = match server.launch().await {
        Ok(running) => running,
        Err(e) => {
            error!(error = %e, "cannot start postgres");
            return Outcome::Died {
                uptime: Duration::ZERO,
            };
        }
    };

    let deadline = started + server.start_timeout();
    loop {
        if let Some(why) = running.exited().await {
            return died(Some(why));
        }
        if accepts_login(probe).await {
            break;
        }
        if Instant::now() >= deadline {
            error!(
                timeout_s = server.start_timeout().as_secs(),
                logs = %server.where_to_look(),
                "postgres did not accept connections in time; stopping it"
            );
            running.stop().await;
            return died(running.exited().await);
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.requested() => {
                running.stop().await;
                return Outcome::Stopped;
            }
        }
    }
    info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "postgres is ready"
    );
    let _ = state.send(PgState::Ready);

    let watch_every = match running {
        Running::Process(..) => POLL,
        // Each look at a container is an engine request.
        Running::Container(_) | Running::External => Duration::from_millis(500),
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(watch_every) => {
                if let Some(why) = running.exited().await {
                    return died(Some(why));
                }
            }
            _ = stop.requested() => {
                info!("stopping postgres (fast shutdown)");
                running.stop().await;
                info!("postgres stopped");
                return Outcome::Stopped;
            }
        }
    }
}

async fn accepts_login(probe: &super::tls::Endpoint) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe.connect()).await,
        Ok(Ok(_))
    )
}
