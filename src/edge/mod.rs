//! The public edge: how clients' connections are accepted, bounded and
//! (with `api.tls`) encrypted before a request reaches the router.
//!
//! Invariants: every connection holds a permit of `api.max_connections`
//! (and, unless it comes from a trusted proxy, of
//! `api.max_connections_per_client`); past either, a new connection is
//! closed at once while open ones keep being served. A connection must
//! finish its TLS handshake and first request's headers within
//! `api.header_timeout`, and is closed once it has no request open and has
//! moved no byte for `api.idle_timeout`. With TLS on there is no plaintext
//! listener at all.
//!
//! What it does not know: routes, users, the database. It hands the
//! router each request with the peer's address as `ConnectInfo`.

pub mod proxies;
pub mod tls;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;
use tracing::{debug, warn};

pub use proxies::TrustedProxies;
pub use tls::{ApiCertificate, ApiTlsError, CertificateInfo};

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// File descriptors kept free beyond the API's connections: Postgres
/// connections, logs, sockets of the control and metrics listeners.
pub const RESERVED_FDS: u64 = 256;

/// How the edge treats connections, from `api.*`.
#[derive(Debug, Clone)]
pub struct EdgeSettings {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_per_client: usize,
    pub trusted: TrustedProxies,
    pub tls: Option<Arc<ApiCertificate>>,
}

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error(
        "api.max_connections = {wanted} needs {needed} open files, but this process may open \
         only {limit} (RLIMIT_NOFILE; the hard limit is {hard}): lower api.max_connections or \
         raise the limit (LimitNOFILE= in the systemd unit, ulimit -n in a shell)"
    )]
    FileLimit {
        wanted: usize,
        needed: u64,
        limit: u64,
        hard: u64,
    },
}

/// Raises the soft open-file limit as far as the hard limit allows when
/// `max_connections` needs it, and refuses a configuration that cannot
/// hold: running out of descriptors takes down the audit sealer and the
/// pool along with the API.
pub fn ensure_file_limit(max_connections: usize, pool: usize) -> Result<u64, EdgeError> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let needed = (max_connections + pool) as u64 + RESERVED_FDS;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return Ok(needed);
    };
    if soft >= needed {
        return Ok(soft);
    }
    let raised = needed.max(soft).min(hard);
    if raised > soft && setrlimit(Resource::RLIMIT_NOFILE, raised, hard).is_ok() && raised >= needed
    {
        return Ok(raised);
    }
    Err(EdgeError::FileLimit {
        wanted: max_connections,
        needed,
        limit: raised.max(soft),
        hard,
    })
}

/// Counts open connections per client address.
#[derive(Default)]
struct PerClient(Mutex<HashMap<IpAddr, usize>>);

/// One connection's share of its address's allowance.
struct ClientSlot {
    table: Arc<PerClient>,
    addr: IpAddr,
}

impl PerClient {
    fn take(self: &Arc<Self>, addr: IpAddr, max: usize) -> Option<ClientSlot> {
        let mut table = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let open = table.entry(addr).or_default();
        if *open >= max {
            return None;
        }
        *open += 1;
        Some(ClientSlot {
            table: self.clone(),
            addr,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut table = self.table.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(open) = table.get_mut(&self.addr) {
            *open -= 1;
            if *open == 0 {
                table.remove(&self.addr);
            }
        }
    }
}

/// What a connection has been doing, for its deadlines.
struct Activity {
    epoch: Instant,
    /// Milliseconds since `epoch` of the last byte read or written.
    last_io: AtomicU64,
    open_requests: AtomicUsize,
    any_request: AtomicBool,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            last_io: AtomicU64::new(0),
            open_requests: AtomicUsize::new(0),
            any_request: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_io.store(ms, Ordering::Relaxed);
    }

    /// When the connection should be closed if nothing changes, or None
    /// while a request is being answered (`api.request_timeout` and
    /// `api.body_timeout` bound those).
    fn deadline(&self, settings: &EdgeSettings) -> Option<Instant> {
        if self.open_requests.load(Ordering::Acquire) > 0 {
            return None;
        }
        if !self.any_request.load(Ordering::Acquire) {
            // Handshake and first headers count from the accept, however
            // slowly the bytes trickle in.
            return Some(self.epoch + settings.header_timeout);
        }
        let last = Duration::from_millis(self.last_io.load(Ordering::Relaxed));
        Some(self.epoch + last + settings.idle_timeout)
    }
}

/// A stream that records when it last moved a byte.
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Decrements the open-request count when a response is done (or the
/// request was dropped).
struct OpenRequest(Arc<Activity>);

impl OpenRequest {
    fn start(activity: &Arc<Activity>) -> OpenRequest {
        activity.any_request.store(true, Ordering::Release);
        activity.open_requests.fetch_add(1, Ordering::AcqRel);
        OpenRequest(activity.clone())
    }
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.touch();
        self.0.open_requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves `router` on `listener` until `stop`; open connections are then
/// given `drain` to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: EdgeSettings,
    metrics: Arc<Metrics>,
    mut stop: Shutdown,
) -> io::Result<()> {
    let settings = Arc::new(settings);
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    let per_client = Arc::new(PerClient::default());
    let acceptor = settings
        .tls
        .as_ref()
        .map(|cert| tokio_rustls::TlsAcceptor::from(cert.server_config()));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(64)
        .keep_alive_interval(settings.idle_timeout / 2)
        .keep_alive_timeout(settings.header_timeout);
    let builder = Arc::new(builder);
    let mut accept_errors = 0u64;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: wait for descriptors to free up
                    // instead of spinning; say so once per burst.
                    accept_errors += 1;
                    if accept_errors == 1 || accept_errors.is_multiple_of(1000) {
                        warn!(error = %e, count = accept_errors, "api: cannot accept a connection");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.requested() => break,
        };
        accept_errors = 0;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics.connection_refused("max_connections");
            debug!(%peer, "api: api.max_connections reached; connection closed");
            continue;
        };
        let slot = if settings.trusted.trusts(peer.ip()) {
            None
        } else {
            match per_client.take(peer.ip(), settings.max_per_client) {
                Some(slot) => Some(slot),
                None => {
                    metrics.connection_refused("max_connections_per_client");
                    debug!(%peer, "api: api.max_connections_per_client reached; connection closed");
                    continue;
                }
            }
        };
        let connection = Connection {
            stream,
            peer,
            router: router.clone(),
            settings: settings.clone(),
            acceptor: acceptor.clone(),
            builder: builder.clone(),
            stop: stop.clone(),
            metrics: metrics.clone(),
        };
        tokio::spawn(connection.run(permit, slot));
    }
    drop(listener);
    // Let open requests finish; connections close as they go idle.
    let drain = settings.header_timeout.max(Duration::from_secs(5));
    let all = settings.max_connections as u32;
    let _ = tokio::time::timeout(drain, permits.acquire_many(all)).await;
    Ok(())
}

struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    settings: Arc<EdgeSettings>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    stop: Shutdown,
    metrics: Arc<Metrics>,
}

impl Connection {
    async fn run(self, permit: OwnedSemaphorePermit, slot: Option<ClientSlot>) {
        let _held = (permit, slot, self.metrics.connection_opened());
        // Without TCP_NODELAY a response written in several segments waits
        // for the client's delayed ACK (tens of milliseconds) before its tail.
        let _ = self.stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let watched = Watched {
            inner: self.stream,
            activity: activity.clone(),
        };
        let Connection {
            peer,
            router,
            settings,
            acceptor,
            builder,
            stop,
            ..
        } = self;
        match acceptor {
            None => {
                serve_connection(watched, peer, router, &settings, &builder, activity, stop).await
            }
            Some(acceptor) => {
                let handshake =
                    tokio::time::timeout(settings.header_timeout, acceptor.accept(watched));
                match handshake.await {
                    Ok(Ok(tls)) => {
                        serve_connection(tls, peer, router, &settings, &builder, activity, stop)
                            .await
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "api: TLS handshake failed"),
                    Err(_) => debug!(%peer, "api: TLS handshake outlived api.header_timeout"),
                }
            }
        }
    }
}

async fn serve_connection<S>(
    io: S,
    peer: SocketAddr,
    router: Router,
    settings: &EdgeSettings,
    builder: &auto::Builder<TokioExecutor>,
    activity: Arc<Activity>,
    mut stop: Shutdown,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let requests = activity.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let open = OpenRequest::start(&requests);
        let mut request = request.map(axum::body::Body::new);
        request.extensions_mut().insert(ConnectInfo(peer));
        let answer = router.clone().oneshot(request);
        async move {
            let response = answer.await;
            drop(open);
            response
        }
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut connection = pin!(connection);
    let mut closing: Option<Instant> = None;
    loop {
        // Past a deadline: ask the connection to finish (an idle HTTP/1
        // connection closes at once; HTTP/2 sends GOAWAY), then drop it.
        let wake = match (closing, activity.deadline(settings)) {
            (Some(grace_end), _) => grace_end,
            (None, Some(deadline)) => deadline,
            (None, None) => Instant::now() + Duration::from_millis(500),
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    debug!(%peer, error = %e, "api: connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until(wake.into()) => {
                if closing.is_some() {
                    return;
                }
                if activity.deadline(settings).is_some_and(|d| d <= Instant::now()) {
                    connection.as_mut().graceful_shutdown();
                    closing = Some(Instant::now() + Duration::from_secs(1));
                }
            }
            _ = stop.requested(), if closing.is_none() => {
                connection.as_mut().graceful_shutdown();
                closing = Some(Instant::now() + settings.header_timeout.max(Duration::from_secs(5)));
            }
        }
    }
}
