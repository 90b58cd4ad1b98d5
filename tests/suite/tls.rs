//! TCP mode: Postgres on a TLS-only TCP address with client certificates,
//! proven from outside with real connection attempts.

use crate::common;

use std::time::{Duration, SystemTime};

use common::TestNode;
use keepd::client::SyncClient;
use keepd::pki::NodePki;
use keepd::postgres::tls::{Tls, client_config, connect};
use serde_json::{Value, json};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

fn superuser_config(port: u16, password: &str) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("keepd_superuser")
        .password(password)
        .dbname("keepd")
        .ssl_mode(SslMode::Require)
        .connect_timeout(Duration::from_secs(5));
    config
}

fn tls_with(
    pki: &NodePki,
    client: Option<&keepd::pki::Pair>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Tls {
    Tls::On(MakeRustlsConnect::new(
        client_config(&pki.ca.cert_pem, client, versions).unwrap(),
    ))
}

/// `network` in TCP mode on 127.0.0.1:`port`.
fn tcp_mode(port: u16) -> Value {
    json!({"network": {"use_unix_socket": false, "bind_address": "127.0.0.1", "port": port}})
}

/// A healthy node in TCP mode on a port of its own: (node, daemon, port,
/// node id).
fn tcp_node() -> (TestNode, common::Daemon, u16, String) {
    let port = common::free_port();
    let node = TestNode::with(tcp_mode(port));
    let daemon = node.start();
    assert!(
        daemon.wait_health(200, Duration::from_secs(60)),
        "{}",
        daemon.log()
    );
    let node_id = daemon.get("/health").unwrap().1["nodeId"]
        .as_str()
        .unwrap()
        .to_string();
    (node, daemon, port, node_id)
}

/// The node's PKI, the superuser's password and a client certificate for it.
fn superuser_pki(node: &TestNode, node_id: &str) -> (NodePki, String, keepd::pki::Pair) {
    let pki = NodePki::ensure(
        &node.state_dir(),
        node_id,
        &["127.0.0.1".parse().unwrap()],
        SystemTime::now(),
    )
    .unwrap();
    let password = node.credentials().superuser.expose().to_string();
    let superuser_cert = pki.issue_client("keepd_superuser").unwrap();
    (pki, password, superuser_cert)
}

/// keepd works over TLS with no Unix socket; from outside only TLS 1.3 with
/// the right client certificate and password gets in, every other attempt
/// refused by the server; the login role reaches keepd's database only.
#[tokio::test(flavor = "multi_thread")]
async fn only_tls13_with_the_right_certificate_and_password_gets_in() {
    let (node, daemon, port, node_id) = tcp_node();
    // keepd itself works over TLS: the API stores and reads data.
    let mut client = SyncClient::new(daemon.addr());
    client
        .register("tls@example.org", "a long password")
        .await
        .unwrap();
    client
        .login("tls@example.org", "a long password")
        .await
        .unwrap();
    let key = client.create_vault("v", "a long password").await.unwrap();
    client
        .push(
            "v",
            &key,
            &[keepd::client::LogEntry {
                data: b"over tls".to_vec(),
                haex_timestamp: "t".into(),
            }],
            None,
        )
        .await
        .unwrap();

    // No Unix socket at all.
    let run_dir = node.dir.path().join("run/postgres");
    let sockets: Vec<_> = std::fs::read_dir(&run_dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(sockets.is_empty(), "sockets in TCP mode: {sockets:?}");

    let (pki, password, superuser_cert) = superuser_pki(&node, &node_id);
    let tls13 = [&rustls::version::TLS13];

    // The right certificate and password: in, over TLS 1.3.
    let good = connect(
        &superuser_config(port, &password),
        &tls_with(&pki, Some(&superuser_cert), &tls13),
    )
    .await
    .expect("the right certificate and password");
    let row = good
        .query_one(
            "SELECT version, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "TLSv1.3");
    assert_eq!(row.get::<_, String>(1), "/CN=keepd_superuser");

    let other_ca = tempfile::tempdir().unwrap();
    let stranger = NodePki::ensure(
        other_ca.path(),
        "0123456789abcdef",
        &["127.0.0.1".parse().unwrap()],
        SystemTime::now(),
    )
    .unwrap();
    let foreign_cert = stranger.issue_client("keepd_superuser").unwrap();
    let login_cert = pki.issue_client("keepd_someone_else").unwrap();
    // Each refused, by the server: an authentication error (SQLSTATE) or a
    // failed TLS handshake (None).
    let attempts: Vec<(&str, tokio_postgres::Config, Tls, Option<&str>)> = vec![
        (
            "plain TCP, no TLS",
            {
                let mut c = superuser_config(port, &password);
                c.ssl_mode(SslMode::Disable);
                c
            },
            Tls::Off,
            Some("28000"),
        ),
        (
            "TLS 1.2",
            superuser_config(port, &password),
            tls_with(&pki, Some(&superuser_cert), &[&rustls::version::TLS12]),
            None,
        ),
        (
            "TLS 1.3 without a client certificate",
            superuser_config(port, &password),
            tls_with(&pki, None, &tls13),
            Some("28000"),
        ),
        (
            "a client certificate from another CA",
            superuser_config(port, &password),
            tls_with(&pki, Some(&foreign_cert), &tls13),
            None,
        ),
        (
            "a certificate issued for another role",
            superuser_config(port, &password),
            tls_with(&pki, Some(&login_cert), &tls13),
            // The right password: Postgres reports the CN mismatch as the
            // method's failure.
            Some("28P01"),
        ),
        (
            "the right certificate with a wrong password",
            superuser_config(port, "wrong password"),
            tls_with(&pki, Some(&superuser_cert), &tls13),
            Some("28P01"),
        ),
    ];
    for (what, config, tls, sqlstate) in attempts {
        let result = connect(&config, &tls).await;
        let error = result.err().unwrap_or_else(|| panic!("{what} was let in"));
        let code = error.code().map(|c| c.code());
        assert_eq!(code, sqlstate, "{what}: {error:?}");
    }
    // The login role reaches keepd's database only (CIS 5.10): with its
    // certificate and password, template1 is refused by pg_hba.
    let active = node.credentials().active().unwrap().clone();
    let login = format!("keepd_{node_id}_v{}", active.version);
    let login_cert = pki.issue_client(&login).unwrap();
    let login_password = active.password.as_ref().unwrap().expose().to_string();
    for (db, allowed) in [("keepd", true), ("template1", false), ("postgres", false)] {
        let mut config = superuser_config(port, &login_password);
        config.user(&login).dbname(db);
        let result = connect(&config, &tls_with(&pki, Some(&login_cert), &tls13)).await;
        match (allowed, result) {
            (true, Ok(_)) => {}
            (false, Err(e)) => assert_eq!(e.code().map(|c| c.code()), Some("28000"), "{db}: {e:?}"),
            (allowed, other) => panic!("{login} on {db} (allowed: {allowed}): {:?}", other.err()),
        }
    }

    // The handshake failures are the server's refusals, as its log says.
    let log_dir = node.pg_log_dir();
    let log: String = std::fs::read_dir(&log_dir)
        .unwrap()
        .filter_map(|f| std::fs::read_to_string(f.ok()?.path()).ok())
        .collect();
    for reason in ["unsupported protocol", "certificate verify failed"] {
        assert!(
            log.contains(reason),
            "the server log lacks {reason:?}:\n{log}"
        );
    }
}

/// The report measures TCP mode (TLS 1.3, client certificates, expiry, a
/// plain connection attempt refused), and a server weakened from outside
/// fails the checks.
#[tokio::test(flavor = "multi_thread")]
async fn the_report_measures_tcp_mode_and_a_weakened_server() {
    let (node, _daemon, _, _) = tcp_node();
    let status_of = |report: &serde_json::Value, id: &str| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .unwrap()["status"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let out = node.command(&["report", "--json"]).output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for id in [
        "tls.minimum_version",
        "tls.client_certificates",
        "tls.certificate_expiry",
        "network.forbidden_connection",
        "hba.rules",
    ] {
        assert_eq!(status_of(&report, id), "pass", "{id}: {report}");
    }
    assert_eq!(status_of(&report, "network.transport"), "warn");
    node.psql(
        "superuser",
        "ALTER SYSTEM SET ssl_min_protocol_version = 'TLSv1.2'",
    )
    .unwrap();
    let hba = node.data_dir().join("pg_hba.conf");
    let rendered_hba = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, rendered_hba.replace(" clientcert=verify-full", "")).unwrap();
    node.psql("superuser", "SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = node.command(&["report", "--json"]).output().unwrap();
    let weakened: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        status_of(&weakened, "tls.minimum_version"),
        "warn",
        "{weakened}"
    );
    assert_eq!(status_of(&weakened, "tls.client_certificates"), "fail");
    node.psql("superuser", "ALTER SYSTEM RESET ssl_min_protocol_version")
        .unwrap();
    std::fs::write(&hba, rendered_hba).unwrap();
    node.psql("superuser", "SELECT pg_reload_conf()").unwrap();
}

/// A server certificate replaced while keepd runs (here: removed, so it is
/// re-issued; renewal takes the same path) is installed and applied with a
/// reload on SIGHUP, without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_server_certificate_is_applied_by_sighup() {
    let (node, daemon, port, node_id) = tcp_node();
    let (pki, password, superuser_cert) = superuser_pki(&node, &node_id);
    let tls13 = [&rustls::version::TLS13];
    let postmaster = daemon.postmaster_pid();
    std::fs::remove_file(node.state_dir().join("pki/server.crt")).unwrap();
    sighup_applies_the_pki(&daemon);
    let issued = std::fs::read_to_string(node.state_dir().join("pki/server.crt")).unwrap();
    let installed = std::fs::read_to_string(node.data_dir().join("server.crt")).unwrap();
    assert_eq!(issued, installed);
    assert_ne!(issued, pki.server.cert_pem);
    assert_eq!(
        daemon.postmaster_pid(),
        postmaster,
        "Postgres was restarted"
    );
    let after = connect(
        &superuser_config(port, &password),
        &tls_with(&pki, Some(&superuser_cert), &tls13),
    )
    .await
    .expect("TLS works with the new certificate");
    after.query_one("SELECT 1", &[]).await.unwrap();
    assert!(daemon.wait_health(200, Duration::from_secs(5)));
}

/// The revocation list (CIS 6.8): a certificate listed in the node's
/// revocation record is refused by Postgres once SIGHUP applies the CRL,
/// without a restart; a rotation revokes the retired role's certificates,
/// and what keepd issues lives a day.
#[tokio::test(flavor = "multi_thread")]
async fn revoked_certificates_are_refused_and_rotation_revokes_its_role() {
    let port = common::free_port();
    let node = TestNode::with(tcp_mode(port));
    node.set("credentials.rotation_grace_period", "2s");
    let daemon = node.start_healthy();
    let node_id = daemon.get("/health").unwrap().1["nodeId"]
        .as_str()
        .unwrap()
        .to_string();
    let pki = NodePki::load(&node.state_dir(), &node_id).unwrap();
    let password = node.credentials().superuser.expose().to_string();
    let cert = pki.issue_client("keepd_superuser").unwrap();
    let validity = keepd::pki::validity(&cert.cert_pem).unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        validity.not_after <= now + 86_400,
        "a client certificate lives a day at most"
    );
    let tls13 = [&rustls::version::TLS13];
    let tls = tls_with(&pki, Some(&cert), &tls13);
    let client = connect(&superuser_config(port, &password), &tls)
        .await
        .expect("not revoked yet");
    // keepd's own sessions present certificates keepd issued for a day.
    let serials: i64 = client
        .query_one(
            "SELECT count(DISTINCT client_serial) FROM pg_stat_ssl WHERE client_dn IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(serials >= 2, "{serials}");
    drop(client);

    let serial = hex::encode(&validity.serial);
    let record = node.state_dir().join("pki/revoked");
    let mut text = std::fs::read_to_string(&record).unwrap_or_default();
    text.push_str(&format!("{serial} {} {now}\n", validity.not_after));
    std::fs::write(&record, text).unwrap();
    let postmaster = daemon.postmaster_pid();
    sighup_applies_the_pki(&daemon);
    let refused = common::wait_until(Duration::from_secs(10), || {
        futures_executor_block(connect(&superuser_config(port, &password), &tls)).err()
    })
    .expect("the revoked certificate is refused");
    // The server's own answer: TLS alert certificate_revoked.
    assert!(
        format!("{refused:?}").contains("CertificateRevoked"),
        "{refused:?}"
    );
    assert_eq!(
        daemon.postmaster_pid(),
        postmaster,
        "Postgres was restarted"
    );
    // A fresh certificate for the same role is not affected.
    let fresh = pki.issue_client("keepd_superuser").unwrap();
    connect(
        &superuser_config(port, &password),
        &tls_with(&pki, Some(&fresh), &tls13),
    )
    .await
    .expect("a certificate not revoked");

    // A rotation: the retired role's certificates go on the list Postgres
    // checks, and keepd carries on with the new role's.
    let before = node.login_roles()[0].clone();
    assert!(node.rotate().0);
    let revoked = daemon
        .wait_for_log(
            "rotation: the retired role's client certificates revoked",
            Duration::from_secs(30),
        )
        .unwrap_or_else(|| panic!("{}", daemon.log()));
    assert_eq!(revoked["role"], before.as_str());
    assert!(revoked["revoked"].as_u64().unwrap() >= 1, "{revoked}");
    let listed = common::wait_until(Duration::from_secs(20), || {
        let record = std::fs::read_to_string(node.state_dir().join("pki/revoked")).ok()?;
        let installed = std::fs::read_to_string(node.data_dir().join("crl.pem")).ok()?;
        let lines = record.lines().count();
        (lines >= 2
            && installed == std::fs::read_to_string(node.state_dir().join("pki/crl.pem")).ok()?)
        .then_some(lines)
    });
    assert!(listed.is_some(), "{}", daemon.log());
    let client = SyncClient::new(daemon.addr());
    client
        .register("crl@example.org", "a long password")
        .await
        .expect("the pool connects with the new role's certificate");
}

/// SIGHUP, and the renewal task's word that what changed in the PKI (a
/// certificate, the revocation list) is installed and reloaded.
fn sighup_applies_the_pki(daemon: &common::Daemon) {
    daemon.signal(common::Signal::SIGHUP);
    assert!(
        daemon
            .wait_for_log(
                "pki: the new server certificate or revocation list is applied (configuration reloaded)",
                Duration::from_secs(20)
            )
            .is_some(),
        "{}",
        daemon.log()
    );
}

/// Runs a future to its end on the current thread (inside a probe).
fn futures_executor_block<F: std::future::Future>(future: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}
