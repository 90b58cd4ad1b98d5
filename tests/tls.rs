//! TCP mode: Postgres on a TLS-only TCP address with client certificates,
//! proven from outside with real connection attempts.

mod common;

use std::time::{Duration, SystemTime};

use common::TestNode;
use keepd::client::SyncClient;
use keepd::pki::NodePki;
use keepd::postgres::tls::{Tls, client_config, connect};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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

#[tokio::test(flavor = "multi_thread")]
async fn only_tls13_with_the_right_certificate_and_password_gets_in() {
    let port = free_port();
    let node = TestNode::with_extra(&format!(
        "network:\n  use_unix_socket: false\n  bind_address: 127.0.0.1\n  port: {port}\n"
    ));
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

    let pki = NodePki::ensure(
        &node.state_dir(),
        &node_id,
        &["127.0.0.1".parse().unwrap()],
        SystemTime::now(),
    )
    .unwrap();
    let password = node.credentials().superuser.expose().to_string();
    let superuser_cert = pki.issue_client("keepd_superuser").unwrap();
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
    // The handshake failures are the server's refusals, as its log says.
    let log_dir = node.data_dir().join("log");
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
