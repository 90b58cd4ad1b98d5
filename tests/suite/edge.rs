//! The public edge from outside: HTTPS as configured (and nothing else on
//! its port), certificates reloaded while connections stay open, bad
//! certificates refused at start, slow and silent clients that cannot
//! starve others, a slow body answered 408, security headers, and the
//! edge as the security report measures it.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ApiTls, Signal, TestNode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TLS client trusting the test CA, with the given versions and ALPN.
fn tls_config(
    tls: &ApiTls,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    common::tls_client(&tls.ca_pem, versions, alpn)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A finished TLS handshake with keepd, or the error that ended it.
fn handshake(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<Tls, String> {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(config, name).unwrap();
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(|e| e.to_string())?;
    }
    Ok(stream)
}

/// One keep-alive GET on an open stream: the head and body of the answer.
fn get_on(stream: &mut impl ReadWrite, path: &str) -> (String, String) {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    stream.flush().unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).expect("an answer");
        assert!(n > 0, "closed before answering");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_string)
                })
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if body.len() >= length {
                return (head.to_string(), body[..length].to_string());
            }
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn leaf_of(stream: &Tls) -> Vec<u8> {
    stream.conn.peer_certificates().unwrap()[0]
        .as_ref()
        .to_vec()
}

fn https_node() -> (TestNode, common::Daemon) {
    let node = TestNode::with_https(json!({}));
    let daemon = node.start_healthy();
    (node, daemon)
}

/// Runs `cmd` quietly and waits until it listens on 127.0.0.1:`port`.
fn spawn_listening(mut cmd: std::process::Command, port: u16, what: &str) -> std::process::Child {
    let child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    common::wait_until(Duration::from_secs(10), || TcpStream::connect(addr).ok())
        .unwrap_or_else(|| panic!("{what} does not listen on {addr}"));
    child
}

#[test]
fn https_with_alpn_security_headers_and_no_plaintext() {
    let (node, daemon) = https_node();
    let tls = node.tls.as_ref().unwrap();
    let addr = daemon.addr();

    // HTTP/2 and HTTP/1.1 by ALPN.
    let all = [&rustls::version::TLS13, &rustls::version::TLS12];
    let h2 = handshake(addr, tls_config(tls, &all, &[b"h2", b"http/1.1"])).unwrap();
    assert_eq!(h2.conn.alpn_protocol(), Some(&b"h2"[..]));
    let mut h1 = handshake(addr, tls_config(tls, &all, &[b"http/1.1"])).unwrap();
    assert_eq!(h1.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    // The default minimum is TLS 1.2, and 1.2 clients get a forward-secret AEAD suite.
    let old = handshake(addr, tls_config(tls, &[&rustls::version::TLS12], &[])).unwrap();
    let suite = format!("{:?}", old.conn.negotiated_cipher_suite().unwrap().suite());
    assert!(
        suite.starts_with("TLS_ECDHE_") && (suite.contains("GCM") || suite.contains("CHACHA")),
        "{suite}"
    );

    let (head, body) = get_on(&mut h1, "/health");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    let head = head.to_ascii_lowercase();
    for header in [
        "strict-transport-security: max-age=31536000",
        "x-content-type-options: nosniff",
        "cache-control: no-store",
        "referrer-policy: no-referrer",
    ] {
        assert!(head.contains(header), "missing {header}:\n{head}");
    }

    // Plain HTTP on the same port gets no HTTP answer at all.
    let plain = common::http_get_raw(addr, "/health");
    assert!(plain.is_none(), "plaintext was answered: {plain:?}");
    assert!(
        daemon.log().contains("\"scheme\":\"https\""),
        "{}",
        daemon.log()
    );
}

#[test]
fn minimum_version_1_3_refuses_tls_1_2() {
    let (node, daemon) = {
        let node = TestNode::with_https(json!({}));
        node.set("api.tls.min_version", "1.3");
        let daemon = node.start();
        (node, daemon)
    };
    let tls = node.tls.as_ref().unwrap();
    let addr = daemon.addr();
    let refused = handshake(addr, tls_config(tls, &[&rustls::version::TLS12], &[]));
    assert!(refused.is_err(), "TLS 1.2 was accepted");
    let ok = handshake(addr, tls_config(tls, &[&rustls::version::TLS13], &[])).unwrap();
    assert_eq!(
        ok.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
}

/// `keepd run` with `api.tls` pointing at `cert`/`key`: (exit code, stderr).
fn run_with_files(cert: &str, key: &str) -> (Option<i32>, String, TestNode) {
    let node = TestNode::with(json!({"api": {"tls": {"cert": cert, "key": key}}}));
    let out = node.command(&["run"]).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        node,
    )
}

#[test]
fn unusable_certificates_are_configuration_errors_never_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let a = ApiTls::new(dir.path());
    let other = tempfile::tempdir().unwrap();
    let b = ApiTls::new(other.path());
    let (cert_a, key_a, key_b) = (
        a.cert.display().to_string(),
        a.key.display().to_string(),
        b.key.display().to_string(),
    );
    for (cert, key, says) in [
        (
            "/nonexistent/api.crt",
            key_a.as_str(),
            "api.tls.cert: cannot read /nonexistent/api.crt",
        ),
        (
            cert_a.as_str(),
            "/nonexistent/api.key",
            "api.tls.key: cannot read /nonexistent/api.key",
        ),
        (
            cert_a.as_str(),
            key_b.as_str(),
            "does not belong to the certificate",
        ),
        (key_a.as_str(), key_a.as_str(), "api.tls.cert"),
        (cert_a.as_str(), cert_a.as_str(), "api.tls.key"),
    ] {
        let (code, stderr, node) = run_with_files(cert, key);
        assert_eq!(code, Some(2), "{cert} {key}: {stderr}");
        assert!(
            stderr.contains(says),
            "{cert} {key}: expected {says:?} in {stderr}"
        );
        // Refused before anything was written or served.
        assert!(!node.state_dir().join("identity.key").exists(), "{stderr}");
    }
}

#[test]
fn an_expired_certificate_starts_warns_and_fails_the_report() {
    let node = TestNode::with_https(json!({}));
    node.tls.as_ref().unwrap().issue(time::Duration::days(-1));
    let daemon = node.start();
    let warned = daemon.wait_for_log(
        "the api certificate has expired; clients will refuse it until it is renewed",
        Duration::from_secs(5),
    );
    assert!(warned.is_some(), "{}", daemon.log());
    let check = node.report_check("api.tls");
    assert_eq!(check["status"], "fail", "{check}");
    assert!(
        check["value"].as_str().unwrap().contains("expired"),
        "{check}"
    );
}

#[test]
fn certificates_reload_on_change_and_sighup_without_dropping_connections() {
    let (node, daemon) = https_node();
    let tls = node.tls.as_ref().unwrap();
    let addr = daemon.addr();
    let config = tls_config(tls, &[&rustls::version::TLS13], &[b"http/1.1"]);
    let mut kept = handshake(addr, config.clone()).unwrap();
    let first = leaf_of(&kept);
    assert!(get_on(&mut kept, "/health").0.starts_with("HTTP/1.1 200"));

    // A renewal tool replaces the files: new handshakes get the new one.
    tls.issue(time::Duration::days(90));
    let second = common::wait_until(Duration::from_secs(15), || {
        let leaf = leaf_of(&handshake(addr, config.clone()).ok()?);
        (leaf != first).then_some(leaf)
    })
    .unwrap_or_else(|| panic!("the new certificate was not picked up:\n{}", daemon.log()));
    // The connection opened before the renewal is still served.
    assert!(get_on(&mut kept, "/health").0.starts_with("HTTP/1.1 200"));

    // A broken file keeps the certificate in use and says why, once.
    std::fs::write(&tls.cert, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    let kept_warning = daemon.wait_for_log(
        "api certificate not reloaded; the previous one stays in use",
        Duration::from_secs(15),
    );
    assert!(kept_warning.is_some(), "{}", daemon.log());
    assert_eq!(leaf_of(&handshake(addr, config.clone()).unwrap()), second);

    // SIGHUP reloads at once.
    tls.issue(time::Duration::days(60));
    daemon.signal(Signal::SIGHUP);
    let third = common::wait_until(Duration::from_secs(3), || {
        let leaf = leaf_of(&handshake(addr, config.clone()).ok()?);
        (leaf != second).then_some(leaf)
    });
    assert!(third.is_some(), "{}", daemon.log());
    // (The swap comes just before its log line.)
    let logged = common::wait_until(Duration::from_secs(3), || {
        daemon.log().contains("\"why\":\"SIGHUP\"").then_some(())
    });
    assert!(logged.is_some(), "{}", daemon.log());
    assert!(get_on(&mut kept, "/health").0.starts_with("HTTP/1.1 200"));
}

/// A connection from `source` (a loopback address of its own).
async fn connect_from(source: &str, to: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Waits until the peer closes `stream`; how long that took.
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

fn raise_file_limit(to: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < to {
        setrlimit(Resource::RLIMIT_NOFILE, to.min(hard), hard).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_and_silent_clients_cannot_starve_an_ordinary_one() {
    raise_file_limit(8192);
    let node = TestNode::with(json!({"api": {"header_timeout": "2s", "idle_timeout": "30s"}}));
    let daemon = node.start();
    assert!(daemon.wait_health(200, Duration::from_secs(30)));
    let addr = daemon.addr();
    // The ordinary client is connected before the flood.
    let client = daemon.client();
    client
        .send(hyper::Method::GET, "/health", &[], None)
        .await
        .unwrap();

    // 2,000 connections from 40 other addresses: half silent, half sending
    // one header line a second (never finishing their headers).
    let mut attackers = Vec::new();
    for i in 0..2000 {
        let source = format!("127.0.0.{}", 10 + i % 40);
        let mut stream = connect_from(&source, addr).await;
        if i % 2 == 1 {
            let _ = stream.write_all(b"GET /health HTTP/1.1\r\n").await;
        }
        attackers.push(stream);
    }
    let flood_done = Instant::now();
    let trickle = tokio::spawn(async move {
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            for stream in attackers.iter_mut().skip(1).step_by(2) {
                let _ = stream.write_all(b"X-Slow: 1\r\n").await;
            }
        }
        attackers
    });
    // Meanwhile every ordinary request is answered within a second.
    let mut slowest = Duration::ZERO;
    while flood_done.elapsed() < Duration::from_secs(3) {
        let started = Instant::now();
        let answer = client
            .send(hyper::Method::GET, "/health", &[], None)
            .await
            .unwrap();
        assert_eq!(answer.status, 200);
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        slowest < Duration::from_secs(1),
        "slowest ordinary request: {slowest:?}"
    );

    // Every slow or silent connection is closed by the server: the oldest
    // as newer ones arrive past the cap, the others by api.header_timeout.
    let mut attackers = trickle.await.unwrap();
    let mut closed = 0;
    for stream in &mut attackers {
        if closed_within(stream, Duration::from_secs(3))
            .await
            .is_some()
        {
            closed += 1;
        }
    }
    assert_eq!(closed, attackers.len(), "connections left open by keepd");
    drop(attackers);
    let metrics = daemon.metrics();
    // Past the cap each newcomer took the place of the longest-waiting
    // attacker (none of them had a request open).
    let evicted: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keepd_http_connections_evicted_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(evicted >= 2000 - 1024, "{metrics}");
    // And the capacity is back for newcomers.
    let newcomer = daemon.client();
    assert_eq!(
        newcomer
            .send(hyper::Method::GET, "/health", &[], None)
            .await
            .unwrap()
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_address_gets_its_share_of_connections_and_no_more() {
    let node = TestNode::with(json!({"api": {"max_connections_per_client": 8}}));
    let daemon = node.start();
    assert!(daemon.wait_health(200, Duration::from_secs(30)));
    let addr = daemon.addr();
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(connect_from("127.0.0.70", addr).await);
    }
    // Give keepd time to accept them all.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ninth = connect_from("127.0.0.70", addr).await;
    let closed = closed_within(&mut ninth, Duration::from_secs(1)).await;
    assert!(
        closed.is_some(),
        "the ninth connection from one address stayed open"
    );
    // Another address is not affected.
    let mut other = connect_from("127.0.0.71", addr).await;
    other
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    other.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The held ones are still open (the header timeout is 10 s).
    for stream in &mut held {
        assert!(
            closed_within(stream, Duration::from_millis(10))
                .await
                .is_none()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_body_is_answered_408_not_503() {
    let node = TestNode::with(json!({"api": {"body_timeout": "2s", "request_timeout": "5s"}}));
    let daemon = node.start();
    assert!(daemon.wait_health(200, Duration::from_secs(30)));
    let mut stream = tokio::net::TcpStream::connect(daemon.addr()).await.unwrap();
    stream
        .write_all(
            b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"email\":",
        )
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"body_timeout\""), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let log = daemon.log();
    assert!(
        !log.contains("unavailable") && !log.contains("\"ERROR\""),
        "{log}"
    );
}

#[test]
fn plain_http_on_a_public_address_is_refused_in_strict_mode() {
    // Never bound: strict mode refuses before the listener exists.
    let node = TestNode::with(json!({
        "security": {"fallback_mode": "strict", "minimum_level": "reduced"},
        "api": {"listen": "0.0.0.0:0"},
    }));
    let mut daemon = node.spawn();
    let status = daemon
        .wait_exit(Duration::from_secs(60))
        .expect("keepd exits");
    assert!(!status.success());
    let log = daemon.log();
    assert!(
        log.contains("api.exposure: plain HTTP on 0.0.0.0:0"),
        "{log}"
    );
    // The report, measured afterwards, says the same and finds the
    // metrics listener on loopback.
    let exposure = node.report_check("api.exposure");
    assert_eq!(exposure["status"], "fail", "{exposure}");
    let metrics = node.report_check("api.metrics");
    assert_eq!(metrics["status"], "pass", "{metrics}");
}

/// A POST from `source` (a loopback address of its own) to `to`, with
/// extra headers; the status code.
async fn post_from(source: &str, to: SocketAddr, path: &str, headers: &str, body: &str) -> u16 {
    let mut stream = connect_from(source, to).await;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: keepd\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n{headers}\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {answer:?}"))
}

/// nginx from Debian's packages in front of `upstream`, connecting from
/// 127.0.0.5 and appending to X-Forwarded-For as its documentation shows.
struct Nginx {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(upstream: SocketAddr) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let port = common::free_port();
        let server = format!(
            "    listen 127.0.0.1:{port};\n    location / {{\n\
             proxy_pass http://{upstream};\n      proxy_bind 127.0.0.5;\n\
             proxy_http_version 1.1;\n\
             proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n    }}"
        );
        Nginx {
            child: common::start_nginx(dir.path(), port, &server),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            _dir: dir,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its worker too (SIGKILL would orphan it).
        common::kill(self.child.id() as i32, Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn per_client_limits_hold_through_a_real_proxy_and_forged_headers_are_not_believed() {
    if !common::require_nginx() {
        return;
    }
    // The per-account login throttle is out of the way: this is about
    // addresses.
    let node = TestNode::with(json!({"api": {
        "trusted_proxies": ["127.0.0.5/32"],
        "rate_limits": {"auth_per_minute": 3, "login_failures_free": 100},
    }}));
    let daemon = node.start();
    assert!(daemon.wait_health(200, Duration::from_secs(30)));
    let nginx = Nginx::start(daemon.addr());
    let login = r#"{"email":"nobody@example.org","password":"not the password"}"#;

    // Client A, through the proxy: three attempts, then throttled, however
    // it forges X-Forwarded-For (nginx appends the address it saw).
    for _ in 0..3 {
        assert_eq!(
            post_from("127.0.0.20", nginx.addr, "/auth/login", "", login).await,
            401
        );
    }
    for forged in [
        "X-Forwarded-For: 198.51.100.1\r\n",
        "X-Forwarded-For: 127.0.0.21\r\n",
    ] {
        let status = post_from("127.0.0.20", nginx.addr, "/auth/login", forged, login).await;
        assert_eq!(status, 429, "client A got through with {forged:?}");
    }
    // Client B shares the proxy's address but not A's allowance.
    assert_eq!(
        post_from("127.0.0.21", nginx.addr, "/auth/login", "", login).await,
        401
    );

    // A client talking to keepd directly cannot pick its address either:
    // its peer is not a trusted proxy, so the header is ignored.
    for i in 0..3 {
        let forged = format!("X-Forwarded-For: 203.0.113.{i}\r\nForwarded: for=203.0.113.{i}\r\n");
        assert_eq!(
            post_from("127.0.0.22", daemon.addr(), "/auth/login", &forged, login).await,
            401
        );
    }
    let forged = "X-Forwarded-For: 203.0.113.99\r\n";
    assert_eq!(
        post_from("127.0.0.22", daemon.addr(), "/auth/login", forged, login).await,
        429
    );
}

/// A static page server (Python's http.server) for `dir` on a free port.
struct PageServer {
    child: std::process::Child,
    origin: String,
}

impl PageServer {
    fn start(dir: &std::path::Path) -> PageServer {
        let port = common::free_port();
        let mut cmd = std::process::Command::new("python3");
        cmd.args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
            "--directory",
        ])
        .arg(dir);
        let child = spawn_listening(cmd, port, "the page server");
        PageServer {
            child,
            origin: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Debian's Chromium, run headless.
const CHROMIUM: &str = "/usr/bin/chromium";

/// Loads `url` in headless Chromium and returns the DOM after its scripts ran.
fn chromium_dom(url: &str) -> String {
    let binary = CHROMIUM;
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--virtual-time-budget=20000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stderr(std::process::Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_real_browser_calls_keepd_from_an_allowed_origin_only() {
    if !common::require_file(CHROMIUM, "Chromium (Debian's chromium)") {
        return;
    }
    let pages = tempfile::tempdir().unwrap();
    let allowed = PageServer::start(pages.path());
    let other = PageServer::start(pages.path());
    let node = TestNode::with(json!({"api": {"cors_origins": [allowed.origin]}}));
    let daemon = node.start();
    assert!(daemon.wait_health(200, Duration::from_secs(30)));
    let api = format!("http://{}", daemon.addr());
    let email = format!("browser-{}@example.org", common::uuid());
    // Register, log in, pull: JSON bodies and a bearer token make every
    // call a preflighted CORS request.
    let page = format!(
        r#"<!doctype html><html><body><pre id="out">pending</pre><script>
(async () => {{
  const out = document.getElementById('out');
  try {{
    const json = {{'Content-Type': 'application/json'}};
    const creds = JSON.stringify({{email: '{email}', password: 'correct horse battery'}});
    const reg = await fetch('{api}/auth/register', {{method: 'POST', headers: json, body: creds}});
    const login = await fetch('{api}/auth/login', {{method: 'POST', headers: json, body: creds}});
    const {{token}} = await login.json();
    const pull = await fetch('{api}/sync/pull', {{method: 'POST',
      headers: {{...json, 'Authorization': 'Bearer ' + token, 'Idempotency-Key': 'k1'}},
      body: JSON.stringify({{vaultId: 'v1', afterSequence: 0, limit: 10}})}});
    const body = await pull.json();
    out.textContent = 'answered ' + reg.status + ' ' + login.status + ' ' + pull.status + ' '
      + pull.headers.get('retry-after') + ' ' + JSON.stringify(body);
  }} catch (e) {{
    out.textContent = 'blocked ' + e;
  }}
}})();
</script></body></html>"#
    );
    std::fs::write(pages.path().join("page.html"), page).unwrap();

    let dom = chromium_dom(&format!("{}/page.html", allowed.origin));
    // The page read every answer, the pull's body included (no vault yet).
    assert!(
        dom.contains(r#"answered 201 200 404 null {"error":{"code":"vault_not_found""#),
        "the allowed origin was not served:\n{dom}"
    );

    let dom = chromium_dom(&format!("{}/page.html", other.origin));
    assert!(
        dom.contains("blocked TypeError"),
        "another origin was not blocked:\n{dom}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_requests_are_served_over_tls() {
    use http_body_util::{BodyExt, Empty};
    let (node, daemon) = https_node();
    let tls = node.tls.as_ref().unwrap();
    let config = tls_config(tls, &[&rustls::version::TLS13], &[b"h2"]);
    let tcp = tokio::net::TcpStream::connect(daemon.addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    // Several requests, concurrently, on the one connection.
    let mut answers = Vec::new();
    for path in ["/health", "/", "/openapi.json"] {
        let request = hyper::Request::get(format!("https://localhost{path}"))
            .body(Empty::<axum::body::Bytes>::new())
            .unwrap();
        answers.push(sender.send_request(request));
    }
    for answer in answers {
        let response = answer.await.unwrap();
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        assert_eq!(response.status(), 200);
        assert!(response.headers().contains_key("strict-transport-security"));
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(!body.is_empty());
    }
}
