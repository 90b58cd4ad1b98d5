//! Keeps the native postmaster running: starts it, waits until it accepts
//! connections, restarts it with backoff when it dies, and stops it fast on
//! shutdown. The state is published on a watch channel for `/health`.

use std::io::BufRead;
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::child::ChildLauncher;
use super::native::NativeCluster;
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
    pub fn start(
        cluster: Arc<NativeCluster>,
        probe: tokio_postgres::Config,
        metrics: Arc<Metrics>,
    ) -> Supervisor {
        let (state_tx, state) = watch::channel(PgState::Starting);
        let (stop, shutdown) = shutdown::channel();
        let task = tokio::spawn(supervise(cluster, probe, state_tx, shutdown, metrics));
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
    cluster: Arc<NativeCluster>,
    probe: tokio_postgres::Config,
    state: watch::Sender<PgState>,
    mut stop: Shutdown,
    metrics: Arc<Metrics>,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        match run_once(&cluster, &probe, &state, &mut stop).await {
            Outcome::Stopped => break,
            Outcome::Died { uptime } => {
                if uptime >= STABLE_AFTER {
                    backoff = FIRST_BACKOFF;
                }
                let _ = state.send(PgState::Restarting);
                metrics.postgres_restarted();
                warn!(
                    retry_in_ms = backoff.as_millis() as u64,
                    "restarting postgres"
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.requested() => break,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    let _ = state.send(PgState::Stopped);
}

async fn run_once(
    cluster: &Arc<NativeCluster>,
    probe: &tokio_postgres::Config,
    state: &watch::Sender<PgState>,
    stop: &mut Shutdown,
) -> Outcome {
    let started = Instant::now();
    let died = |status: Option<ExitStatus>| {
        let uptime = started.elapsed();
        error!(
            status = %status.map_or("unknown".to_string(), |s| s.to_string()),
            uptime_s = uptime.as_secs(),
            "postgres exited unexpectedly"
        );
        Outcome::Died { uptime }
    };
    let prepared = {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || cluster.clear_stale_pid()).await
    };
    if let Ok(Err(e)) = prepared {
        error!(error = %e, "cannot clear the previous postmaster.pid");
        return Outcome::Died {
            uptime: Duration::ZERO,
        };
    }
    let child = match ChildLauncher::get().spawn(cluster.postmaster_command(), Signal::SIGQUIT) {
        Ok(child) => child,
        Err(e) => {
            error!(error = %e, "cannot start postgres");
            return Outcome::Died {
                uptime: Duration::ZERO,
            };
        }
    };
    let postmaster = Postmaster::new(child);
    info!(
        pid = postmaster.pid,
        "postgres started; waiting for it to accept connections"
    );

    let deadline = started + cluster.start_timeout;
    loop {
        if let Some(status) = postmaster.exited() {
            return died(Some(status));
        }
        if accepts_login(probe).await {
            break;
        }
        if Instant::now() >= deadline {
            error!(
                timeout_s = cluster.start_timeout.as_secs(),
                log_dir = %cluster.data_dir().join("log").display(),
                "postgres did not accept connections in time; stopping it"
            );
            postmaster.stop(cluster.shutdown_timeout).await;
            return died(postmaster.exited());
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.requested() => {
                postmaster.stop(cluster.shutdown_timeout).await;
                return Outcome::Stopped;
            }
        }
    }
    info!(
        pid = postmaster.pid,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "postgres is ready"
    );
    let _ = state.send(PgState::Ready);

    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {
                if let Some(status) = postmaster.exited() {
                    return died(Some(status));
                }
            }
            _ = stop.requested() => {
                info!(pid = postmaster.pid, "stopping postgres (fast shutdown)");
                postmaster.stop(cluster.shutdown_timeout).await;
                info!("postgres stopped");
                return Outcome::Stopped;
            }
        }
    }
}

async fn accepts_login(probe: &tokio_postgres::Config) -> bool {
    match tokio::time::timeout(Duration::from_secs(2), probe.connect(tokio_postgres::NoTls)).await {
        Ok(Ok((client, connection))) => {
            drop(client);
            let _ = connection.await;
            true
        }
        _ => false,
    }
}

/// The running postmaster. Signals are sent only while holding the lock
/// and after checking it has not been reaped, so a recycled PID is never hit.
struct Postmaster {
    pid: u32,
    child: Arc<Mutex<Child>>,
}

impl Postmaster {
    fn new(mut child: Child) -> Postmaster {
        if let Some(stderr) = child.stderr.take() {
            // Before the logging collector takes over, and when it cannot
            // start, Postgres speaks on stderr: one log event per line.
            let _ = std::thread::Builder::new()
                .name("postgres-stderr".into())
                .spawn(move || {
                    for line in std::io::BufReader::new(stderr)
                        .lines()
                        .map_while(Result::ok)
                    {
                        info!(target: "postgres", "{line}");
                    }
                });
        }
        Postmaster {
            pid: child.id(),
            child: Arc::new(Mutex::new(child)),
        }
    }

    fn exited(&self) -> Option<ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        child.try_wait().ok().flatten()
    }

    fn signal(&self, signal: Signal) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        kill(Pid::from_raw(self.pid as i32), signal).is_ok()
    }

    /// SIGINT (fast shutdown), then SIGQUIT (immediate), then SIGKILL.
    async fn stop(&self, timeout: Duration) {
        for (signal, wait) in [
            (Signal::SIGINT, timeout),
            (Signal::SIGQUIT, Duration::from_secs(5)),
            (Signal::SIGKILL, Duration::from_secs(5)),
        ] {
            if !self.signal(signal) {
                return;
            }
            if signal != Signal::SIGINT {
                warn!(
                    pid = self.pid,
                    ?signal,
                    "postgres did not stop in time; escalating"
                );
            }
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline {
                if self.exited().is_some() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
