//! Keeps Postgres running, whichever provider runs it (a native child
//! process or a container): starts it, waits until it accepts connections,
//! restarts it with backoff when it dies, and stops it fast on shutdown.
//! The state is published on a watch channel for `/health`.

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
use super::docker::DockerCluster;
use super::external::ExternalServer;
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

/// The server to keep running.
#[derive(Clone)]
pub enum Server {
    Native(Arc<NativeCluster>),
    Docker(Arc<DockerCluster>),
    /// A server keepd does not run: watched through its probe only.
    External(Arc<ExternalServer>),
}

impl Server {
    fn start_timeout(&self) -> Duration {
        match self {
            Server::Native(c) => c.start_timeout,
            Server::Docker(c) => c.start_timeout,
            Server::External(c) => c.start_timeout,
        }
    }

    /// Starts the server; the handle tells when it dies and stops it.
    async fn launch(&self) -> Result<Running, String> {
        match self {
            Server::Native(cluster) => {
                let prepared = {
                    let cluster = cluster.clone();
                    tokio::task::spawn_blocking(move || cluster.clear_stale_pid()).await
                };
                match prepared {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        return Err(format!("cannot clear the previous postmaster.pid: {e}"));
                    }
                    Err(e) => return Err(e.to_string()),
                }
                let child = ChildLauncher::get()
                    .spawn(cluster.postmaster_command(), Signal::SIGQUIT)
                    .map_err(|e| format!("cannot start postgres: {e}"))?;
                let postmaster = Postmaster::new(child);
                info!(
                    pid = postmaster.pid,
                    "postgres started; waiting for it to accept connections"
                );
                Ok(Running::Process(postmaster, cluster.clone()))
            }
            Server::Docker(cluster) => {
                cluster
                    .start()
                    .await
                    .map_err(|e| format!("cannot start the container: {e}"))?;
                info!(
                    container = cluster.container_name(),
                    "postgres container running; waiting for it to accept connections"
                );
                Ok(Running::Container(cluster.clone()))
            }
            Server::External(server) => {
                info!(server = %server.describe(), "external postgres: waiting for it to accept connections");
                Ok(Running::External)
            }
        }
    }

    /// The bootstrap superuser's connection settings for this server.
    pub fn superuser_endpoint(
        &self,
        password: &crate::secrets::values::SecretString,
        dbname: &str,
    ) -> super::tls::Endpoint {
        match self {
            Server::Native(c) => c.superuser_endpoint(password, dbname),
            Server::Docker(c) => c.superuser_endpoint(password, dbname),
            // keepd's superuser there is the operator's administrator.
            Server::External(c) => c.admin_endpoint(dbname),
        }
    }

    /// The address the server certificate must name, in TCP mode.
    pub fn tls_address(&self) -> Option<std::net::IpAddr> {
        match self {
            Server::Native(c) => c.tls_address(),
            Server::Docker(c) => c.tls_address(),
            Server::External(_) => None,
        }
    }

    /// Installs a renewed server certificate where Postgres reads it.
    pub fn install_tls(&self, pki: &crate::pki::NodePki) -> Result<(), String> {
        match self {
            Server::Native(c) => c.install_tls(pki).map_err(|e| e.to_string()),
            Server::Docker(c) => c.install_server_tls(pki).map_err(|e| e.to_string()),
            Server::External(_) => Ok(()),
        }
    }

    fn where_to_look(&self) -> String {
        match self {
            Server::Native(c) => c.log_dir().display().to_string(),
            Server::Docker(c) => format!("docker logs {}", c.container_name()),
            Server::External(c) => format!("the log of {}", c.describe()),
        }
    }
}

/// A started server.
enum Running {
    Process(Postmaster, Arc<NativeCluster>),
    Container(Arc<DockerCluster>),
    External,
}

impl Running {
    /// Why it is not running any more, or None while it runs.
    async fn exited(&self) -> Option<String> {
        match self {
            Running::Process(postmaster, _) => postmaster.exited().map(|s| s.to_string()),
            Running::Container(cluster) => cluster.exited().await,
            Running::External => None,
        }
    }

    async fn stop(&self) {
        match self {
            Running::Process(postmaster, cluster) => {
                postmaster.stop(cluster.shutdown_timeout).await
            }
            Running::Container(cluster) => cluster.stop().await,
            Running::External => {}
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
    let mut backoff = FIRST_BACKOFF;
    loop {
        match run_once(&server, &probe, &state, &mut stop).await {
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
