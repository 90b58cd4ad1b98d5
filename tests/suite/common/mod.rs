//! Helpers for tests that drive the real keepd binary against a real Postgres.

pub mod config;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use config::unlimited_rates;
pub use nix::sys::signal::Signal;
use serde_json::{Value, json};

pub fn keepd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_keepd")
}

/// A keepd configuration in its own temporary directory: a tree of values
/// (`common::config`) written to `config` as YAML whenever it changes.
pub struct TestNode {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// Set when the API serves HTTPS (`with_https`).
    pub tls: Option<ApiTls>,
    settings: Mutex<Value>,
}

impl TestNode {
    pub fn new() -> TestNode {
        Self::with(json!({}))
    }

    /// The base configuration (state and runtime directories in the
    /// node's own, the API and metrics on free loopback ports, JSON logs at
    /// info) merged with `overlay` (`common::config::merge`).
    pub fn with(overlay: Value) -> TestNode {
        let dir = tempfile::tempdir().expect("tempdir");
        // Postgres may run as another user: let it traverse to its directories.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let config = dir.path().join("keepd.yaml");
        let d = dir.path().display();
        let mut settings = json!({
            "node": {"state_dir": format!("{d}/state"), "runtime_dir": format!("{d}/run")},
            "api": {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"},
            "log": {"format": "json", "level": "info"},
        });
        config::merge(&mut settings, overlay);
        let node = TestNode {
            dir,
            config,
            tls: None,
            settings: Mutex::new(settings),
        };
        node.write_config();
        node
    }

    /// A node whose API serves HTTPS with a certificate from a test CA
    /// (for `localhost` and 127.0.0.1); `overlay` as in `with`.
    pub fn with_https(overlay: Value) -> TestNode {
        let mut node = Self::with(overlay);
        let tls = ApiTls::new(node.dir.path());
        node.merge(json!({"api": {"tls": tls.settings()}}));
        node.tls = Some(tls);
        node
    }

    /// Sets the dotted `path` (`api.events.max_idle`) to `value` and
    /// rewrites the file.
    pub fn set(&self, path: &str, value: impl Into<Value>) -> &TestNode {
        self.merge(config::at(path, value))
    }

    /// Merges `overlay` into the configuration and rewrites the file.
    pub fn merge(&self, overlay: Value) -> &TestNode {
        config::merge(&mut self.settings.lock().unwrap(), overlay);
        self.write_config();
        self
    }

    fn write_config(&self) {
        let yaml = config::to_yaml(&self.settings.lock().unwrap());
        std::fs::write(&self.config, yaml).unwrap();
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.state_dir().join("pgdata")
    }

    /// The native Postgres's log directory, beside its data directory.
    pub fn pg_log_dir(&self) -> PathBuf {
        self.state_dir().join("pglog")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(keepd_bin());
        cmd.arg("--config").arg(&self.config).args(args);
        cmd
    }

    /// Starts `keepd run` and waits until its API listens.
    pub fn start(&self) -> Daemon {
        let daemon = self.spawn();
        assert!(
            daemon.addr.is_some(),
            "keepd did not start:\n{}",
            daemon.log()
        );
        daemon
    }

    /// Starts `keepd run` and waits until `/health` answers 200.
    pub fn start_healthy(&self) -> Daemon {
        let daemon = self.start();
        assert!(
            daemon.wait_health(200, Duration::from_secs(30)),
            "{}",
            daemon.log()
        );
        daemon
    }

    /// Starts `keepd run` and waits until its API listens or it exits.
    pub fn spawn(&self) -> Daemon {
        let mut daemon = Daemon::spawn_with(self.command(&["run"]), self.data_dir());
        daemon.tls_ca = self.tls.as_ref().map(|t| t.ca_pem.clone());
        daemon
    }
}

/// A test CA and the API certificate it issued, as files.
pub struct ApiTls {
    pub ca_pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    ca_key: rcgen::KeyPair,
    ca_params: rcgen::CertificateParams,
}

impl ApiTls {
    pub fn new(dir: &Path) -> ApiTls {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "keepd test CA");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
        let tls = ApiTls {
            ca_pem,
            cert: dir.join("api.crt"),
            key: dir.join("api.key"),
            ca_key,
            ca_params,
        };
        tls.issue(time::Duration::days(30));
        tls
    }

    /// Writes a new certificate and key valid from a day ago for
    /// `lifetime` (negative: already expired); returns the certificate PEM.
    pub fn issue(&self, lifetime: time::Duration) -> String {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(2);
        params.not_after = now + lifetime;
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::new(self.ca_params.clone(), &self.ca_key);
        let pem = params.signed_by(&key, &issuer).unwrap().pem();
        // Key first, then the certificate, as a renewal tool replaces them.
        std::fs::write(&self.key, key.serialize_pem()).unwrap();
        std::fs::write(&self.cert, &pem).unwrap();
        pem
    }

    /// The `api.tls` settings for these files.
    pub fn settings(&self) -> Value {
        json!({"cert": self.cert, "key": self.key})
    }
}

/// A TLS client trusting only `ca_pem`, offering `versions` and `alpn`.
pub fn tls_client(
    ca_pem: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A running `keepd run`; killed (-9) when dropped if still running.
pub struct Daemon {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// Reads stderr into `lines`; awaited once keepd exits, so the log is
    /// whole when a test reads it.
    reader: std::thread::JoinHandle<()>,
    addr: Option<SocketAddr>,
    data_dir: PathBuf,
    /// The CA of the API's certificate when it serves HTTPS.
    pub tls_ca: Option<String>,
}

impl Daemon {
    /// Starts `cmd` (a `keepd run`) and waits until its API listens or it exits.
    pub fn spawn_with(mut cmd: Command, data_dir: PathBuf) -> Daemon {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keepd");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut daemon = Daemon {
            child,
            lines,
            reader,
            addr: None,
            data_dir,
            tls_ca: None,
        };
        daemon.addr = daemon.wait_for_addr(Duration::from_secs(60));
        daemon
    }

    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("daemon started with start()")
    }

    /// The private metrics listener's address.
    pub fn metrics_addr(&self) -> SocketAddr {
        let event = self
            .wait_for_log("metrics listening", Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no metrics listener:\n{}", self.log()));
        event["addr"].as_str().unwrap().parse().unwrap()
    }

    /// `/metrics` from the private listener.
    pub fn metrics(&self) -> String {
        http_get_text(self.metrics_addr(), "/metrics").expect("metrics answer")
    }

    /// A client of this daemon's API: HTTPS to `localhost` when it serves
    /// TLS, plain HTTP otherwise.
    pub fn client(&self) -> keepd::client::SyncClient {
        use keepd::client::{Endpoint, SyncClient, Trust};
        match &self.tls_ca {
            Some(ca) => SyncClient::at(
                Endpoint::https("localhost", self.addr().port(), Trust::Ca(ca.clone())).unwrap(),
            ),
            None => SyncClient::new(self.addr()),
        }
    }

    fn wait_for_addr(&mut self, timeout: Duration) -> Option<SocketAddr> {
        wait_until(timeout, || {
            let addr = self.lines.lock().unwrap().iter().find_map(|line| {
                let event: serde_json::Value = serde_json::from_str(line).ok()?;
                (event["message"] == "api listening")
                    .then(|| event["addr"].as_str()?.parse().ok())?
            });
            if addr.is_some() {
                return Some(addr);
            }
            // Exited without listening: stop waiting.
            self.child.try_wait().ok().flatten().map(|_| None)
        })
        .flatten()
    }

    /// Waits for the log line with this message; returns the whole event.
    pub fn wait_for_log(&self, message: &str, timeout: Duration) -> Option<serde_json::Value> {
        wait_until(timeout, || {
            self.lines.lock().unwrap().iter().find_map(|line| {
                let event: serde_json::Value = serde_json::from_str(line).ok()?;
                (event["message"] == message).then_some(event)
            })
        })
    }

    pub fn get(&self, path: &str) -> Option<(u16, serde_json::Value)> {
        let (status, body) = match &self.tls_ca {
            Some(ca) => https_get_raw(self.addr(), path, ca)?,
            None => http_get_raw(self.addr(), path)?,
        };
        Some((
            status,
            serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
        ))
    }

    pub fn health(&self) -> Option<u16> {
        self.get("/health").map(|(status, _)| status)
    }

    /// Waits until /health answers `status`; false on timeout.
    pub fn wait_health(&self, status: u16, timeout: Duration) -> bool {
        wait_until(timeout, || (self.health() == Some(status)).then_some(())).is_some()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.child.id() as i32, signal);
    }

    /// Waits for keepd to exit; None on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = wait_until(timeout, || self.child.try_wait().ok().flatten())?;
        // keepd's last lines (its refusal) may still be in the pipe; a
        // child that inherited it must not hold the test, hence the bound.
        wait_until(Duration::from_secs(5), || {
            self.reader.is_finished().then_some(())
        });
        Some(status)
    }

    /// SIGTERM, and a clean exit within 30 s.
    pub fn stop(&mut self) {
        self.signal(Signal::SIGTERM);
        let status = self.wait_exit(Duration::from_secs(30));
        assert!(
            status.is_some_and(|s| s.success()),
            "{status:?}\n{}",
            self.log()
        );
    }

    pub fn postmaster_pid(&self) -> Option<i32> {
        postmaster_pid(&self.data_dir)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // The parent-death signal takes the server down; wait so the next
        // test does not see it.
        wait_until(Duration::from_secs(15), || {
            postgres_pids(&self.data_dir).is_empty().then_some(())
        });
    }
}

pub fn kill(pid: i32, signal: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
        .unwrap_or_else(|e| panic!("kill({pid}, {signal}) failed: {e}"));
}

pub fn wait_until<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl TestNode {
    /// A moment to restore to, as `keepd restore --to` takes it, with a
    /// second and more on either side so the commits before and after it
    /// cannot fall into the same instant.
    pub fn restore_moment(&self) -> String {
        std::thread::sleep(Duration::from_millis(1200));
        let moment = self
            .psql(
                "superuser",
                "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'",
            )
            .unwrap()
            .trim()
            .to_string();
        std::thread::sleep(Duration::from_millis(1200));
        moment
    }
}

/// Debian's nginx, which `start_nginx` runs.
pub const NGINX: &str = "/usr/sbin/nginx";

/// `require` for Debian's nginx.
#[track_caller]
pub fn require_nginx() -> bool {
    require_file(NGINX, "nginx (Debian's nginx-light)")
}

/// nginx from Debian's packages in the foreground, its files under `dir`,
/// serving one `server { ... }` block whose body is `server`; returned
/// once `port` listens. As root its workers run as root too, so they can
/// read the test's files.
pub fn start_nginx(dir: &Path, port: u16, server: &str) -> std::process::Child {
    let binary = NGINX;
    assert!(
        Path::new(binary).exists(),
        "nginx is not installed: call common::require_nginx first"
    );
    let d = dir.display();
    let user = if nix::unistd::geteuid().is_root() {
        "user root root;"
    } else {
        ""
    };
    let conf = format!(
        "{user}\nworker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log;\nevents {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n\
         proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
         uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         server {{\n{server}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let child = Command::new(binary)
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nginx starts");
    let up = wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    assert!(up.is_some(), "nginx does not listen on {port}");
    child
}

/// `wait_until` for an async probe that succeeds with Ok.
pub async fn wait_until_async<T, E, F: std::future::Future<Output = Result<T, E>>>(
    timeout: Duration,
    mut probe: impl FnMut() -> F,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(v) = probe().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A plain HTTP/1.1 GET: (status, body text); None when nothing answers.
pub fn http_get_raw(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((status, body.to_string()))
}

/// An HTTP/1.1 GET over TLS to `localhost` trusting `ca_pem`.
pub fn https_get_raw(addr: SocketAddr, path: &str, ca_pem: &str) -> Option<(u16, String)> {
    let config = tls_client(ca_pem, rustls::DEFAULT_VERSIONS, &[]);
    let name = rustls::pki_types::ServerName::try_from("localhost").ok()?;
    let conn = rustls::ClientConnection::new(config, name).ok()?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = Vec::new();
    // A peer that closes without close_notify still gave us the answer.
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((status, body.to_string()))
}

/// The body of a plain HTTP/1.1 GET as text; None when nothing answers.
pub fn http_get_text(addr: SocketAddr, path: &str) -> Option<String> {
    http_get_raw(addr, path).map(|(_, body)| body)
}

/// A plain HTTP/1.1 GET; None when nothing answers.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, serde_json::Value)> {
    let (status, body) = http_get_raw(addr, path)?;
    Some((
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    ))
}

/// A TCP port on 127.0.0.1 nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// Every process whose working directory is `data_dir`: Postgres chdirs
/// into its data directory, so this finds the postmaster and all children.
pub fn postgres_pids(data_dir: &Path) -> Vec<i32> {
    let Ok(target) = std::fs::canonicalize(data_dir) else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == target) {
            pids.push(pid);
        }
    }
    pids
}

/// Inodes of listening TCP sockets (IPv4 and IPv6) on this machine.
pub fn listening_tcp_inodes() -> HashSet<u64> {
    let mut inodes = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // st == 0A is LISTEN; field 9 is the inode.
            if fields.get(3) == Some(&"0A")
                && let Some(inode) = fields.get(9).and_then(|i| i.parse().ok())
            {
                inodes.insert(inode);
            }
        }
    }
    inodes
}

/// Socket inodes a process holds open.
pub fn socket_inodes(pid: i32) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return inodes;
    };
    for fd in fds.flatten() {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let target = target.to_string_lossy().into_owned();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse().ok())
            {
                inodes.insert(inode);
            }
        }
    }
    inodes
}

impl TestNode {
    /// Runs one SQL statement through `keepd psql` and returns its rows,
    /// one line each, fields separated by `|`.
    pub fn psql(&self, role: &str, sql: &str) -> Result<String, String> {
        let out = self
            .command(&[
                "psql",
                "--role",
                role,
                "--",
                "-XAtq",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .expect("run keepd psql");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// This node's login roles that exist in Postgres, sorted.
    pub fn login_roles(&self) -> Vec<String> {
        let rows = self
            .psql("superuser", r"SELECT rolname FROM pg_roles WHERE rolname ~ '^keepd_[0-9a-f]{16}_v[0-9]+$' ORDER BY 1")
            .expect("list login roles");
        rows.lines().map(str::to_string).collect()
    }

    /// The sealed credentials, opened with the node's identity.
    pub fn credentials(&self) -> keepd::secrets::store::Credentials {
        let identity =
            keepd::identity::NodeIdentity::load(&self.state_dir().join("identity.key")).unwrap();
        keepd::secrets::store::CredentialStore::new(self.state_dir().join("secrets/db.enc"))
            .load(&identity)
            .unwrap()
            .expect("db.enc exists")
            .0
    }

    /// One check of `keepd report --json`, by id (the report measured as
    /// the command does, from the live system).
    pub fn report_check(&self, id: &str) -> serde_json::Value {
        let out = self.command(&["report", "--json"]).output().unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!(
                "keepd report --json printed no JSON: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        report["checks"]
            .as_array()
            .and_then(|checks| checks.iter().find(|c| c["id"] == id))
            .unwrap_or_else(|| panic!("no check {id} in {report}"))
            .clone()
    }

    /// `keepd rotate`: (success, message).
    pub fn rotate(&self) -> (bool, String) {
        let out = self.command(&["rotate"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }
}

impl TestNode {
    /// A pool like the daemon's, as the node's active login role.
    pub fn pool(&self, max_size: usize) -> keepd::postgres::pool::RoleAwarePool {
        let identity =
            keepd::identity::NodeIdentity::load(&self.state_dir().join("identity.key")).unwrap();
        let login = keepd::daemon::rotator::login_credential(
            &identity,
            &self.credentials(),
            &keepd::postgres::tls::TlsSource::Off,
        )
        .expect("an active login credential");
        keepd::postgres::pool::RoleAwarePool::new(
            self.pg_config(),
            login,
            keepd::postgres::pool::PoolSettings {
                max_size,
                acquire_timeout: Duration::from_secs(5),
            },
        )
    }

    /// Connection settings for keepd's database over its socket (no user).
    pub fn pg_config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(self.dir.path().join("run/postgres"))
            .port(5432)
            .dbname("keepd");
        config
    }

    /// A superuser session on keepd's database.
    pub async fn superuser(&self) -> tokio_postgres::Client {
        let mut config = self.pg_config();
        config
            .user("keepd_superuser")
            .password(self.credentials().superuser.expose());
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    }

    /// The node's identity and the cluster key sealed to it in the database.
    pub async fn cluster_key(&self) -> (keepd::identity::NodeIdentity, keepd::cluster::ClusterKey) {
        let identity =
            keepd::identity::NodeIdentity::load(&self.state_dir().join("identity.key")).unwrap();
        let mut client = self.superuser().await;
        match keepd::cluster::join(&mut client, &identity, 1, None)
            .await
            .unwrap()
        {
            keepd::cluster::Membership::Member(key) => (identity, key),
            keepd::cluster::Membership::Pending => panic!("the node is not admitted"),
        }
    }

    /// `keepd audit verify`: (exit code, stdout + stderr).
    pub fn audit_verify(&self) -> (i32, String) {
        self.run(&["audit", "verify"])
    }

    /// `keepd ARGS` to its end: (exit code, stdout + stderr).
    pub fn run(&self, args: &[&str]) -> (i32, String) {
        let out = self.command(args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code().unwrap_or(-1), text)
    }
}

/// A random UUID (version 4) as text.
pub fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Whether a test can go on, `available` saying whether `what` it needs
/// is there. Without it the test cannot test, and must not pass as if it
/// had: with `CI` set (where everything the suite uses is installed) it
/// fails, naming `what` is missing and `how` to get it; elsewhere it prints
/// `SKIPPED: <what> (<how>)` and the test returns. A test that calls this
/// belongs in .config/nextest.toml's filter, which shows what it printed at
/// the end of a nextest run (a skip is never silent).
#[track_caller]
pub fn require(available: bool, what: &str, how: &str) -> bool {
    if available {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{what}: {how}. CI runs every test: nothing may be skipped there");
    }
    eprintln!("SKIPPED: {what} ({how})");
    false
}

/// `require` for a program on the PATH, from Debian's `package` (or the
/// place named) that scripts/install-deps.sh installs.
#[track_caller]
pub fn require_tool(program: &str, package: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()));
    require(
        found,
        &format!("{program} is not installed"),
        &format!("{package}; scripts/install-deps.sh installs it"),
    )
}

/// `require` for a file a tool is run from (a virtualenv's program, say).
#[track_caller]
pub fn require_file(path: &str, what: &str) -> bool {
    require(
        Path::new(path).exists(),
        &format!("{what} is not installed ({path} is absent)"),
        "scripts/install-deps.sh installs it",
    )
}

/// `require` for a Docker engine that answers.
#[track_caller]
pub fn require_docker() -> bool {
    let answer = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    let why = match answer {
        Ok(out) if out.status.success() => return true,
        Ok(out) => format!(
            "no Docker engine answers: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => format!("the docker CLI cannot run: {e}"),
    };
    require(
        false,
        &why,
        "Debian's docker.io, which scripts/install-deps.sh installs; \
         scripts/test.sh starts dockerd in CI when none runs",
    )
}

/// The Postgres image the docker tests use (scripts/build-test-image.sh).
pub const DOCKER_IMAGE: &str = "keepd-test-postgres:test";

/// `require_docker`, then the test image, built once (under a lock, as
/// tests run in parallel processes) when it is missing.
#[track_caller]
pub fn require_docker_image() -> bool {
    if !require_docker() {
        return false;
    }
    let lock_path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("docker-image.lock");
    let lock = std::fs::File::create(&lock_path).unwrap();
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/build-test-image.sh");
    let out = Command::new(script).arg(DOCKER_IMAGE).output().unwrap();
    assert!(
        out.status.success(),
        "building the test image failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

/// Every entry of `vault` through `client`, page by page: (sequences,
/// plaintexts decrypted with `key`).
pub async fn pull_all(
    client: &keepd::client::SyncClient,
    key: &keepd::client::VaultKey,
    vault: &str,
) -> (Vec<i64>, Vec<String>) {
    let (mut sequences, mut labels) = (Vec::new(), Vec::new());
    let mut after = 0;
    loop {
        let page = client.pull(vault, after, 1000).await.unwrap();
        for entry in &page.logs {
            sequences.push(entry.sequence);
            let plain = key
                .decrypt_entry(&entry.encrypted_data, &entry.nonce)
                .unwrap();
            labels.push(String::from_utf8(plain).unwrap());
            after = entry.sequence;
        }
        if !page.has_more {
            return (sequences, labels);
        }
    }
}

/// A server certificate for 127.0.0.1 from a test CA, for a Postgres of
/// the test's own: server.crt and server.key (0600, handed to `own`) in
/// `tls_dir`; returns the CA certificate's path, `dir/ca.crt`.
pub fn server_tls(dir: &Path, tls_dir: &Path, own: impl Fn(&Path)) -> PathBuf {
    let pki = keepd::pki::NodePki::ensure(
        &dir.join("ca"),
        "0000000000000000",
        &["127.0.0.1".parse().unwrap()],
        std::time::SystemTime::now(),
    )
    .unwrap();
    for (name, text) in [
        ("server.crt", pki.server.cert_pem.as_str()),
        ("server.key", pki.server.key_pem.as_str()),
    ] {
        let path = tls_dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        own(&path);
    }
    let ca_file = dir.join("ca.crt");
    std::fs::write(&ca_file, &pki.ca.cert_pem).unwrap();
    ca_file
}

/// Log entries whose plaintext and timestamp are each label, so a pull
/// shows which were stored.
pub fn labelled(labels: &[impl AsRef<str>]) -> Vec<keepd::client::LogEntry> {
    labels
        .iter()
        .map(|l| keepd::client::LogEntry {
            data: l.as_ref().as_bytes().to_vec(),
            haex_timestamp: l.as_ref().to_string(),
        })
        .collect()
}

/// `guesses` wrong logins for `email`, all sent at once, each from its own
/// address (`X-Forwarded-For` 10.88.0.1, .2, …; the nodes must trust
/// 127.0.0.1 as a proxy), spread over `clients` (one per node) in turn:
/// how many were checked (401) and how many held back (429).
pub async fn wrong_logins_at_once(
    clients: Vec<keepd::client::SyncClient>,
    email: &str,
    guesses: usize,
) -> (usize, usize) {
    use std::sync::Arc;
    let clients: Vec<_> = clients.into_iter().map(Arc::new).collect();
    let start = Arc::new(tokio::sync::Barrier::new(guesses));
    let body = serde_json::json!({"email": email, "password": "a wrong guess"}).to_string();
    let tasks: Vec<_> = (0..guesses)
        .map(|i| {
            let client = clients[i % clients.len()].clone();
            let (start, body) = (start.clone(), body.clone());
            tokio::spawn(async move {
                let addr = format!("10.88.{}.{}", i / 250, i % 250 + 1);
                start.wait().await;
                client
                    .send(
                        hyper::Method::POST,
                        "/auth/login",
                        &[("x-forwarded-for", &addr)],
                        Some(body.into_bytes()),
                    )
                    .await
                    .unwrap()
                    .status
            })
        })
        .collect();
    let (mut checked, mut held) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            401 => checked += 1,
            429 => held += 1,
            other => panic!("a wrong login answered {other}"),
        }
    }
    (checked, held)
}
