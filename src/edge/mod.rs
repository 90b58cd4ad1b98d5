//! The public edge: how clients' connections are accepted, bounded and
//! (with `api.tls`) encrypted before a request reaches the router.
//!
//! Invariants: every connection holds a place under `api.max_connections`
//! (and, unless it comes from a trusted proxy, under
//! `api.max_connections_per_client`, clients grouped by prefix); at the
//! cap a newcomer takes the place of the connection that has waited
//! longest without a request open (`slots`), and is refused only when
//! every counted connection is answering. A connection must finish its
//! TLS handshake and first request's headers within `api.header_timeout`,
//! and is closed once it has no request open and has moved no byte for
//! `api.idle_timeout`. Over TLS, HTTP/2 is spoken only when ALPN chose it
//! (an invalid preface gets GOAWAY); on plain HTTP a client may use h2c
//! with prior knowledge. Response bodies a client has not read are held
//! within `budget`. Protocol errors are counted and summarised once a
//! minute, never logged a line each. With TLS on there is no plaintext
//! listener at all.
//!
//! What it does not know: routes, users, the database. It hands the
//! router each request with the peer's address as `ConnectInfo` and a
//! `RequestContext` (mark a stream, reserve response bytes).

pub mod budget;
pub mod proxies;
pub mod slots;
mod streams;
pub mod tls;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;
use tracing::{debug, info, warn};

pub use budget::{Exhausted, Reservation, ResponseBudget};
pub use proxies::{ClientPrefixes, TrustedProxies};
use slots::{ConnState, Slot, Slots};
pub use slots::{ConnectionRef, StreamMark};
pub use tls::{ApiCertificate, ApiTlsError, CertificateInfo};

use crate::config::ApiConfig;
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
    pub prefixes: ClientPrefixes,
    pub max_response_bytes: usize,
    pub max_response_bytes_per_client: usize,
    pub max_response_bytes_per_connection: usize,
    pub trusted: TrustedProxies,
    pub tls: Option<Arc<ApiCertificate>>,
    /// Paths whose answers are long-lived streams, answered outside hyper
    /// when they open a connection (`streams`); none unless the router
    /// names them (`with_streams`).
    pub stream_paths: &'static [&'static str],
}

impl EdgeSettings {
    /// The edge's settings from its section, `api`.
    pub fn new(
        api: &ApiConfig,
        trusted: TrustedProxies,
        tls: Option<Arc<ApiCertificate>>,
    ) -> EdgeSettings {
        EdgeSettings {
            header_timeout: api.header_timeout.get(),
            idle_timeout: api.idle_timeout.get(),
            max_connections: api.max_connections as usize,
            max_per_client: api.max_connections_per_client as usize,
            prefixes: ClientPrefixes::new(api.client_prefix_v4, api.client_prefix_v6),
            max_response_bytes: api.max_response_bytes,
            max_response_bytes_per_client: api.max_response_bytes_per_client,
            max_response_bytes_per_connection: api.max_response_bytes_per_connection,
            trusted,
            tls,
            stream_paths: &[],
        }
    }

    /// How long open answers get to finish once the node stops.
    fn stop_grace(&self) -> Duration {
        self.header_timeout.max(Duration::from_secs(5))
    }

    /// When the connection of `state` should close if nothing changes
    /// (`ConnState::deadline` under these timeouts).
    fn deadline(&self, state: &ConnState) -> Option<Instant> {
        state.deadline(self.header_timeout, self.idle_timeout)
    }

    /// The router's stream paths (`api::STREAM_PATHS`).
    pub fn with_streams(self, stream_paths: &'static [&'static str]) -> EdgeSettings {
        EdgeSettings {
            stream_paths,
            ..self
        }
    }
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

/// A stream that records when it last moved a byte.
struct Watched<S> {
    inner: S,
    activity: Arc<ConnState>,
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

/// Counts a request as open on its connection until its response is
/// done (or the request was dropped).
struct OpenRequest(ConnectionRef);

impl OpenRequest {
    fn start(connection: &ConnectionRef) -> OpenRequest {
        connection.request_started();
        OpenRequest(connection.clone())
    }
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.request_finished();
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
    let slots = Slots::new(settings.max_connections, settings.max_per_client);
    let budget = ResponseBudget::new(
        settings.max_response_bytes,
        settings.max_response_bytes_per_client,
        settings.max_response_bytes_per_connection,
    );
    let acceptor = settings
        .tls
        .as_ref()
        .map(|cert| tokio_rustls::TlsAcceptor::from(cert.server_config()));
    let builders = Arc::new(Builders::new(&settings));
    let abuse = Arc::new(Summary::default());
    let mut summaries = tokio::time::interval(SUMMARY_EVERY);
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
            _ = summaries.tick() => {
                abuse.flush();
                continue;
            }
            _ = stop.requested() => break,
        };
        accept_errors = 0;
        let client =
            (!settings.trusted.trusts(peer.ip())).then(|| settings.prefixes.client(peer.ip()));
        let slot = match slots.admit(client, acceptor.is_some()) {
            Ok((slot, evicted)) => {
                if evicted {
                    metrics.connection_evicted();
                }
                slot
            }
            Err(refused) => {
                metrics.connection_refused(refused.setting());
                debug!(%peer, cap = refused.setting(), "api: a connection cap was reached; connection closed");
                continue;
            }
        };
        let connection = Connection {
            stream,
            peer,
            router: router.clone(),
            settings: settings.clone(),
            acceptor: acceptor.clone(),
            builders: builders.clone(),
            budget: budget.clone(),
            abuse: abuse.clone(),
            stop: stop.clone(),
            metrics: metrics.clone(),
        };
        tokio::spawn(connection.run(slot));
    }
    drop(listener);
    abuse.flush();
    // Let open requests finish; connections close as they go idle.
    let drain = settings.stop_grace();
    let _ = tokio::time::timeout(drain, async {
        while slots.open().0 > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    Ok(())
}

/// hyper's connection builders, one per protocol choice: over TLS ALPN
/// decides (h2 only when the client asked for it), on plain HTTP a client
/// may speak HTTP/2 with prior knowledge (h2c).
struct Builders {
    plain: auto::Builder<TokioExecutor>,
    http1: auto::Builder<TokioExecutor>,
    http2: auto::Builder<TokioExecutor>,
}

impl Builders {
    fn new(settings: &EdgeSettings) -> Builders {
        let configure = || {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(settings.header_timeout)
                .max_buf_size(64 * 1024);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
                // Streams a client may reset before their answer starts
                // (rapid reset, CVE-2023-44487): past it, GOAWAY.
                .max_pending_accept_reset_streams(MAX_STREAMS_PER_CONNECTION as usize)
                .max_local_error_reset_streams(Some(MAX_STREAMS_PER_CONNECTION as usize))
                .keep_alive_interval(settings.idle_timeout / 2)
                .keep_alive_timeout(settings.header_timeout);
            builder
        };
        Builders {
            plain: configure(),
            http1: configure().http1_only(),
            http2: configure().http2_only(),
        }
    }
}

/// HTTP/2 streams one connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// How often protocol abuse is summarised in the log.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);
/// What every HTTP/2 connection starts with (RFC 9113 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Connections that ended in a protocol error, a failed handshake or an
/// invalid preface, counted and logged once per `SUMMARY_EVERY` rather
/// than a line each: an attacker must not be able to write the log.
#[derive(Default)]
struct Summary(Mutex<HashMap<&'static str, u64>>);

impl Summary {
    fn note(&self, kind: &'static str) {
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind)
            .or_insert(0) += 1;
    }

    fn flush(&self) {
        let counts = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        let count = |kind| counts.get(kind).copied().unwrap_or(0);
        if !counts.is_empty() {
            info!(
                protocol_errors = count("protocol_error"),
                tls_handshakes_failed = count("tls_handshake"),
                invalid_prefaces = count("invalid_preface"),
                interval = ?SUMMARY_EVERY,
                "api: connections ended by the client's errors"
            );
        }
    }
}

struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    settings: Arc<EdgeSettings>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    builders: Arc<Builders>,
    budget: Arc<ResponseBudget>,
    abuse: Arc<Summary>,
    stop: Shutdown,
    metrics: Arc<Metrics>,
}

impl Connection {
    async fn run(self, slot: Slot) {
        let _held = self.metrics.connection_opened();
        // Without TCP_NODELAY a response written in several segments waits
        // for the client's delayed ACK (tens of milliseconds) before its tail.
        let _ = self.stream.set_nodelay(true);
        let state = slot.state.clone();
        let watched = Watched {
            inner: self.stream,
            activity: state.clone(),
        };
        let handle = RequestContext {
            connection: ConnectionRef::of(&slot),
            budget: self.budget.clone(),
        };
        let Connection {
            peer,
            router,
            settings,
            acceptor,
            builders,
            abuse,
            stop,
            ..
        } = self;
        let served = Served {
            peer,
            router,
            settings: &settings,
            handle,
            abuse: &abuse,
            stop,
        };
        match acceptor {
            None => served.http(watched, &builders.plain).await,
            // Boxed: the TLS state is the size of a plain connection's
            // whole task, and plain streams should not carry it.
            Some(acceptor) => {
                Box::pin(served.tls(acceptor, watched, &builders)).await;
            }
        }
    }
}

impl Served<'_> {
    async fn tls(
        self,
        acceptor: tokio_rustls::TlsAcceptor,
        watched: Watched<TcpStream>,
        builders: &Builders,
    ) {
        let (settings, abuse, peer) = (self.settings, self.abuse, self.peer);
        let state = self.handle.connection.state.clone();
        // The handshake counts against header_timeout; an evicted
        // connection stops at once.
        let handshake = tokio::time::timeout(settings.header_timeout, acceptor.accept(watched));
        let tls = tokio::select! {
            done = handshake => done,
            _ = state.evicted() => return,
        };
        let mut tls = match tls {
            Ok(Ok(tls)) => {
                self.handle.connection.handshake_done();
                tls
            }
            Ok(Err(e)) => {
                abuse.note("tls_handshake");
                debug!(%peer, error = %e, "api: TLS handshake failed");
                return;
            }
            Err(_) => {
                debug!(%peer, "api: TLS handshake outlived api.header_timeout");
                return;
            }
        };
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            self.http(tls, &builders.http1).await;
            return;
        }
        // ALPN chose h2: the client must open with the HTTP/2 preface.
        // hyper would drop a wrong one silently; RFC 9113 3.4 wants a
        // connection error, so the preface is read here first.
        let mut preface = [0u8; 24];
        let read = tokio::time::timeout(settings.header_timeout, tls.read_exact(&mut preface));
        let read = tokio::select! {
            done = read => done,
            _ = state.evicted() => return,
        };
        match read {
            Ok(Ok(_)) if &preface == H2_PREFACE => {
                let replayed = Prefixed::new(preface.to_vec(), tls);
                self.serve(replayed, &builders.http2).await;
            }
            Ok(Ok(_)) => {
                abuse.note("invalid_preface");
                let _ = tls.write_all(&goaway_protocol_error()).await;
                let _ = tls.shutdown().await;
            }
            _ => debug!(%peer, "api: no HTTP/2 preface within api.header_timeout"),
        }
    }

    /// HTTP/1.1 (or, on plain HTTP, h2c): a stream opening the connection
    /// is answered by `streams`, anything else by hyper.
    async fn http<S>(mut self, mut io: S, builder: &auto::Builder<TokioExecutor>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let state = self.handle.connection.state.clone();
        let first = if self.settings.stream_paths.is_empty() {
            Ok(streams::First::Other(Vec::new()))
        } else {
            // Until the first request's head is in, the same bounds as
            // hyper's: api.header_timeout from the accept, eviction, stop.
            let header_deadline = self
                .settings
                .deadline(&state)
                .unwrap_or_else(|| Instant::now() + self.settings.header_timeout);
            tokio::select! {
                first = streams::first_request(&mut io, self.settings.stream_paths) => first,
                _ = tokio::time::sleep_until(header_deadline.into()) => return,
                _ = state.evicted() => return,
                _ = self.stop.requested() => return,
            }
        };
        match first {
            Ok(streams::First::Stream(request)) => streams::answer(io, *request, self).await,
            // Boxed: hyper's connection is most of a connection's memory,
            // and streams answered above should not carry its size.
            Ok(streams::First::Other(read)) => {
                Box::pin(self.serve(Prefixed::new(read, io), builder)).await
            }
            Err(e) => {
                debug!(peer = %self.peer, error = %e, "api: connection failed before a request")
            }
        }
    }
}

/// An empty SETTINGS frame (the server's preface) and a GOAWAY with
/// PROTOCOL_ERROR, last stream 0 (RFC 9113 6.5, 6.8).
fn goaway_protocol_error() -> Vec<u8> {
    let mut frames = Vec::with_capacity(9 + 17);
    // SETTINGS: length 0, type 0x4, flags 0, stream 0.
    frames.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    // GOAWAY: length 8, type 0x7, flags 0, stream 0; last stream id 0,
    // error code PROTOCOL_ERROR (0x1).
    frames.extend_from_slice(&[0, 0, 8, 0x7, 0, 0, 0, 0, 0]);
    frames.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
    frames
}

/// A stream whose first bytes were read already and are handed out again.
struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    fn new(prefix: Vec<u8>, inner: S) -> Prefixed<S> {
        Prefixed {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            if self.at == self.prefix.len() {
                // Handed out: its buffer is not kept for the connection's life.
                self.prefix = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
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

/// What a request may ask of its connection (a request extension): mark a
/// stream, reserve response bytes.
#[derive(Clone)]
pub struct RequestContext {
    pub connection: ConnectionRef,
    pub budget: Arc<ResponseBudget>,
}

impl RequestContext {
    /// Reserves `bytes` of the response budget for an answer to `client`
    /// (its address as the API sees it), waiting up to `wait`.
    pub async fn reserve(
        &self,
        client: IpAddr,
        bytes: usize,
        wait: Duration,
    ) -> Result<Reservation, Exhausted> {
        self.budget
            .reserve(&self.connection, client, bytes, wait)
            .await
    }
}

/// A request through the router, however its connection is served: the
/// peer's address and the connection's context as extensions, the request
/// open on its connection until the router has made the answer's head.
fn route(
    router: &Router,
    peer: SocketAddr,
    handle: &RequestContext,
    mut request: hyper::Request<axum::body::Body>,
) -> impl Future<Output = axum::response::Response> + Send + use<> {
    let open = OpenRequest::start(&handle.connection);
    request.extensions_mut().insert(ConnectInfo(peer));
    request.extensions_mut().insert(handle.clone());
    let answer = router.clone().oneshot(request);
    async move {
        let Ok(response) = answer.await;
        drop(open);
        response
    }
}

/// One connection being served.
struct Served<'a> {
    peer: SocketAddr,
    router: Router,
    settings: &'a EdgeSettings,
    handle: RequestContext,
    abuse: &'a Summary,
    stop: Shutdown,
}

impl Served<'_> {
    async fn serve<S>(self, io: S, builder: &auto::Builder<TokioExecutor>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Served {
            peer,
            router,
            settings,
            handle,
            abuse,
            mut stop,
        } = self;
        let state = handle.connection.state.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let answer = route(&router, peer, &handle, request.map(axum::body::Body::new));
            async move { Ok::<_, std::convert::Infallible>(answer.await) }
        });
        // No route upgrades a connection; serve_connection (unlike the
        // upgrading variant) keeps to the protocol the builder allows.
        let connection = builder.serve_connection(TokioIo::new(io), service);
        let mut connection = pin!(connection);
        let mut closing: Option<Instant> = None;
        let deadline = || settings.deadline(&state);
        loop {
            // Past a deadline: ask the connection to finish (an idle HTTP/1
            // connection closes at once; HTTP/2 sends GOAWAY), then drop it.
            let wake = match (closing, deadline()) {
                (Some(grace_end), _) => grace_end,
                (None, Some(deadline)) => deadline,
                (None, None) => Instant::now() + Duration::from_millis(500),
            };
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        abuse.note("protocol_error");
                        debug!(%peer, error = %e, "api: connection ended with an error");
                    }
                    return;
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    if closing.is_some() {
                        return;
                    }
                    if deadline().is_some_and(|d| d <= Instant::now()) {
                        connection.as_mut().graceful_shutdown();
                        closing = Some(Instant::now() + Duration::from_secs(1));
                    }
                }
                // Closed to make room for a newcomer: it had no request
                // open, so nothing is cut short.
                _ = state.evicted() => return,
                _ = stop.requested(), if closing.is_none() => {
                    connection.as_mut().graceful_shutdown();
                    closing = Some(Instant::now() + settings.stop_grace());
                }
            }
        }
    }
}
