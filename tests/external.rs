//! The external provider: two keepd nodes on one Postgres the test suite
//! starts itself (TLS with its own CA, a password-protected superuser).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use common::{TestNode, wait_until};
use keepd::client::{LogEntry, SyncClient};
use keepd::pki::NodePki;

const ADMIN_PASSWORD: &str = "external admin password";

/// A Postgres of the test's own, reachable only over TLS on 127.0.0.1.
struct ExternalPostgres {
    _dir: tempfile::TempDir,
    child: Child,
    port: u16,
    ca_file: PathBuf,
    password_file: PathBuf,
}

impl Drop for ExternalPostgres {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
    }
}

fn start_external() -> ExternalPostgres {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = keepd::postgres::native::PgBinaries::locate(None, None)
        .unwrap()
        .dir;
    // Postgres refuses root: it runs as nobody.
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let own = |path: &std::path::Path| {
        nix::unistd::chown(path, Some(nobody.uid), Some(nobody.gid)).unwrap();
    };
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    own(&data);
    let sockets = dir.path().join("sock");
    std::fs::create_dir(&sockets).unwrap();
    own(&sockets);
    let pwfile = dir.path().join("initdb.pw");
    std::fs::write(&pwfile, ADMIN_PASSWORD).unwrap();
    own(&pwfile);
    let status = Command::new(bin.join("initdb"))
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth=scram-sha-256",
            "--no-locale",
            "-E",
            "UTF8",
        ])
        .arg(format!("--pwfile={}", pwfile.display()))
        .uid(nobody.uid.as_raw())
        .gid(nobody.gid.as_raw())
        .current_dir("/")
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&status.stderr)
    );

    let pki = NodePki::ensure(
        &dir.path().join("ca"),
        "0000000000000000",
        &["127.0.0.1".parse().unwrap()],
        SystemTime::now(),
    )
    .unwrap();
    for (name, text) in [
        ("server.crt", pki.server.cert_pem.as_str()),
        ("server.key", pki.server.key_pem.as_str()),
    ] {
        let path = data.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        own(&path);
    }
    std::fs::write(
        data.join("pg_hba.conf"),
        "hostssl all all 127.0.0.1/32 scram-sha-256\n",
    )
    .unwrap();
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, &pki.ca.cert_pem).unwrap();
    let password_file = dir.path().join("admin.password");
    std::fs::write(&password_file, format!("{ADMIN_PASSWORD}\n")).unwrap();
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    let port = common::free_port();
    let child = Command::new(bin.join("postgres"))
        .arg("-D")
        .arg(&data)
        .args(["-c", "listen_addresses=127.0.0.1"])
        .args(["-c", &format!("port={port}")])
        .args(["-c", "ssl=on"])
        .args([
            "-c",
            &format!("unix_socket_directories={}", sockets.display()),
        ])
        .uid(nobody.uid.as_raw())
        .gid(nobody.gid.as_raw())
        .current_dir("/")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let up = wait_until(Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    assert!(up.is_some(), "the external Postgres did not start");
    ExternalPostgres {
        _dir: dir,
        child,
        port,
        ca_file,
        password_file,
    }
}

fn external_node(server: &ExternalPostgres) -> TestNode {
    TestNode::with_api_and_extra(
        common::UNLIMITED_RATES,
        &format!(
            "database:\n  postgres:\n    provider: external\n    external:\n      host: 127.0.0.1\n      \
             port: {}\n      admin_password_file: {}\n      ca_file: {}\n\
             credentials:\n  rotation_grace_period: 2s\n",
            server.port,
            server.password_file.display(),
            server.ca_file.display()
        ),
    )
}

/// Rows of `sql` on the external server's keepd database, as its admin.
fn admin_rows(node: &TestNode, sql: &str) -> Vec<String> {
    node.psql("superuser", sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_share_one_external_server() {
    let server = start_external();
    let (a, b) = (external_node(&server), external_node(&server));
    // Started together: migrations and grants run once, under a lock.
    let (daemon_a, daemon_b) = std::thread::scope(|s| {
        let one = s.spawn(|| a.start());
        let two = s.spawn(|| b.start());
        (one.join().unwrap(), two.join().unwrap())
    });
    for daemon in [&daemon_a, &daemon_b] {
        assert!(
            daemon.wait_health(200, Duration::from_secs(60)),
            "{}",
            daemon.log()
        );
    }
    let id = |d: &common::Daemon| {
        d.get("/health").unwrap().1["nodeId"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (id_a, id_b) = (id(&daemon_a), id(&daemon_b));
    assert_ne!(id_a, id_b);

    // keepd rendered and installed nothing.
    for node in [&a, &b] {
        assert!(!node.data_dir().exists(), "a data directory was created");
    }
    assert_eq!(
        admin_rows(&a, "SELECT current_user"),
        vec!["postgres".to_string()],
        "keepd psql reaches the external server as its administrator"
    );
    let migrations = admin_rows(
        &a,
        "SELECT version FROM keepd.schema_migrations ORDER BY version",
    );
    // Every migration exactly once, though two nodes started together.
    let expected: Vec<String> = keepd::postgres::migrate::MIGRATIONS
        .iter()
        .map(|m| m.version.to_string())
        .collect();
    assert_eq!(migrations, expected);
    let roles = |pattern: &str| {
        admin_rows(
            &a,
            &format!("SELECT rolname FROM pg_roles WHERE rolname LIKE '{pattern}' ORDER BY 1"),
        )
    };
    assert_eq!(
        roles(&format!("keepd_{id_a}_v%")),
        vec![format!("keepd_{id_a}_v1")]
    );
    assert_eq!(
        roles(&format!("keepd_{id_b}_v%")),
        vec![format!("keepd_{id_b}_v1")]
    );

    // Both serve, each as its own login role.
    for (daemon, tag) in [(&daemon_a, "a"), (&daemon_b, "b")] {
        let email = format!("{tag}-{}@example.org", common::uuid());
        let mut client = SyncClient::new(daemon.addr());
        client.register(&email, "a long password").await.unwrap();
        client.login(&email, "a long password").await.unwrap();
        let key = client.create_vault("v", "a long password").await.unwrap();
        let entry = LogEntry {
            data: tag.as_bytes().to_vec(),
            haex_timestamp: "t".into(),
        };
        client.push("v", &key, &[entry], None).await.unwrap();
    }

    // Rotating node A touches only A's roles.
    let (ok, message) = a.rotate();
    assert!(ok, "{message}");
    let converged = wait_until(Duration::from_secs(30), || {
        (roles(&format!("keepd_{id_a}_v%")) == vec![format!("keepd_{id_a}_v2")]).then_some(())
    });
    assert!(converged.is_some(), "{:?}", roles("keepd_%"));
    assert_eq!(
        roles(&format!("keepd_{id_b}_v%")),
        vec![format!("keepd_{id_b}_v1")]
    );
    assert!(daemon_b.wait_health(200, Duration::from_secs(5)));

    // Each node's audit chain verifies with its own key.
    for node in [&a, &b] {
        let verified = wait_until(Duration::from_secs(20), || {
            let (code, text) = node.audit_verify();
            (code == 0 && text.contains(", 0 entries not yet sealed")).then_some(text)
        });
        assert!(verified.is_some(), "{:?}", node.audit_verify());
    }
}
