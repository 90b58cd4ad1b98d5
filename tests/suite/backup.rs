//! Backups with pgBackRest on the native provider: WAL archived
//! continuously into an encrypted repository, backups taken, listed and
//! verified through `keepd backup`.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{TestNode, wait_until};
use keepd::client::{LogEntry, SyncClient};
use serde_json::json;

const PASSWORD: &str = "backup test password";

/// A node whose repository is in a directory Postgres's account can reach.
fn backed_up_node() -> (TestNode, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let repository = dir.path().join("repo");
    let node = TestNode::with(json!({"backup": {"repository": repository}}));
    (node, dir, repository)
}

/// A brand-new node in strict mode with a repository starts: Postgres
/// archived before the stanza existed, and those failed attempts must not
/// make the first report refuse the start (issue 34).
#[test]
fn a_strict_first_start_with_a_repository_starts() {
    let (node, _dir, _repository) = backed_up_node();
    strict_first_start(&node);
}

/// The same in TCP mode, where keepd reaches Postgres over TLS and
/// pgBackRest, which takes no client certificate, over a private socket
/// of its own (pgdsat's run found it had none).
#[test]
fn a_strict_first_start_in_tcp_mode_backs_up_over_a_private_socket() {
    let (node, _dir, _repository) = backed_up_node();
    node.merge(json!({"network": {"use_unix_socket": false, "port": common::free_port()}}));
    strict_first_start(&node);
}

fn strict_first_start(node: &TestNode) {
    node.merge(json!({"security": {"fallback_mode": "strict", "minimum_level": "high"}}));
    let mut daemon = node.spawn();
    assert!(
        daemon.wait_health(200, Duration::from_secs(60)),
        "{}",
        daemon.log()
    );
    assert!(
        daemon
            .wait_for_log("backup: WAL archiving works", Duration::from_secs(5))
            .is_some(),
        "{}",
        daemon.log()
    );
    let backup = node.report_check("backup");
    assert_ne!(backup["status"], "fail", "{backup}");
    daemon.stop();
}

/// Two `keepd backup now` at once (as one right after a first start meets
/// the scheduled full backup): the second waits for the first, saying so,
/// and both succeed.
#[test]
fn a_backup_asked_while_another_runs_waits_for_it() {
    let (node, _dir, _repository) = backed_up_node();
    let mut daemon = node.start_healthy();
    let both: Vec<_> = (0..2)
        .map(|_| {
            node.command(&["backup", "now", "--full"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = both
        .into_iter()
        .map(|child| child.wait_with_output().unwrap())
        .collect();
    for out in &outputs {
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let waited = outputs
        .iter()
        .any(|out| String::from_utf8_lossy(&out.stderr).contains("another backup is running"));
    assert!(waited, "one of the two waited for the other");
    daemon.stop();
}

fn pgbackrest_conf(node: &TestNode) -> PathBuf {
    node.state_dir().join("pgbackrest").join("pgbackrest.conf")
}

/// `keepd backup ARGS`: (exit code, stdout + stderr).
fn backup(node: &TestNode, args: &[&str]) -> (i32, String) {
    node.run(&[&["backup"], args].concat())
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread")]
async fn wal_is_archived_and_backups_are_taken_listed_and_verified() {
    let (node, _dir, repository) = backed_up_node();
    let daemon = node.start_healthy();
    let mut client = SyncClient::new(daemon.addr());
    client
        .register("backup@example.org", PASSWORD)
        .await
        .unwrap();
    client.login("backup@example.org", PASSWORD).await.unwrap();
    let key = client.create_vault("v", PASSWORD).await.unwrap();
    let entry = LogEntry {
        data: b"first".to_vec(),
        haex_timestamp: "t1".into(),
    };
    client.push("v", &key, &[entry], None).await.unwrap();

    // Continuous archiving: a finished segment reaches the repository.
    archive_a_segment(&node, &daemon);

    // The schedule takes the first (full) backup right after the start.
    let first = wait_until(Duration::from_secs(60), || {
        let (code, json) = backup(&node, &["list", "--json"]);
        let info: serde_json::Value = serde_json::from_str(&json).ok()?;
        (code == 0 && info[0]["backup"].as_array()?.len() == 1).then_some(())
    });
    assert!(first.is_some(), "{}", daemon.log());
    let metric = wait_until(Duration::from_secs(10), || {
        daemon.metrics().lines().find_map(|l| {
            let value = l.strip_prefix("keepd_backup_last_success_timestamp_seconds ")?;
            (value != "0").then(|| value.to_string())
        })
    });
    assert!(metric.is_some(), "{}", daemon.metrics());
    assert_eq!(node.report_check("backup")["status"], "pass");
    let (code, text) = backup(&node, &["now", "--full"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("backup complete"), "{text}");
    let (code, text) = backup(&node, &["now"]);
    assert_eq!(code, 0, "{text}");
    let (code, list) = backup(&node, &["list"]);
    assert_eq!(code, 0, "{list}");
    assert!(
        list.contains("full backup") && list.contains("diff backup"),
        "{list}"
    );
    let (code, json) = backup(&node, &["list", "--json"]);
    assert_eq!(code, 0, "{json}");
    let info: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(info[0]["backup"].as_array().unwrap().len(), 3, "{info}");
    assert_eq!(info[0]["cipher"], "aes-256-cbc", "{info}");
    let (code, text) = backup(&node, &["verify"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("backup repository verified"), "{text}");

    // Encrypted: every file is OpenSSL-salted ciphertext (pgBackRest's
    // format), and the repository does not open without the passphrase.
    let files = files_under(&repository);
    assert!(files.len() > 10, "{files:?}");
    for file in &files {
        let head = std::fs::read(file).unwrap();
        if file.ends_with("keepd-db.enc") {
            // db.enc's copy: keepd's envelope, sealed to the identity.
            assert!(String::from_utf8_lossy(&head).contains("keepd-sealed"));
            continue;
        }
        assert!(
            head.starts_with(b"Salted__"),
            "{} is not encrypted",
            file.display()
        );
    }
    let out = std::process::Command::new("pgbackrest")
        .arg(format!("--config={}", pgbackrest_conf(&node).display()))
        .args(["--stanza=keepd", "info"])
        .env_clear()
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!said.contains("full backup"), "{said}");
    // No secret in the rendered files.
    let conf = std::fs::read_to_string(pgbackrest_conf(&node)).unwrap();
    assert!(!conf.contains("cipher-pass"), "{conf}");
    let credentials = node.credentials();
    let passphrase = credentials.backup_passphrase.expect("sealed in db.enc");
    for file in [
        pgbackrest_conf(&node),
        node.data_dir().join("postgresql.conf"),
    ] {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(!text.contains(passphrase.expose()), "{}", file.display());
    }

    // The repository unwritable: archiving fails, and the report says so.
    let archive = repository.join("archive");
    set_dir_modes(&archive, 0o500);
    push(&client, &key, &["after"]).await;
    node.psql("superuser", "SELECT pg_switch_wal()").unwrap();
    let failing = wait_until(Duration::from_secs(30), || {
        let check = node.report_check("backup");
        (check["status"] == "fail").then_some(check)
    });
    set_dir_modes(&archive, 0o750);
    let check = failing.expect("a failing archive was not reported");
    assert!(
        check["value"]
            .as_str()
            .unwrap()
            .contains("WAL archiving is failing"),
        "{check}"
    );
}

/// `mode` on `dir` and every directory under it.
fn set_dir_modes(dir: &Path, mode: u32) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            set_dir_modes(&path, mode);
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn backups_of_an_external_server_are_its_clusters_job() {
    let node = TestNode::with(json!({
        "database": {"postgres": {
            "provider": "external",
            "external": {"host": "db", "admin_password_env": "PW", "sslmode": "disable"},
        }},
        "backup": {"repository": "/var/backups/keepd"},
    }));
    let out = node.command(&["run"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("backup.repository") && text.contains("Patroni"),
        "{text}"
    );
}

/// Ends the current WAL segment and waits until it is archived (an
/// attempt before the stanza existed, at the first start, may have failed;
/// the last word must be a success).
fn archive_a_segment(node: &TestNode, daemon: &common::Daemon) {
    let segment = node
        .psql("superuser", "SELECT pg_walfile_name(pg_switch_wal())")
        .unwrap();
    let archived = wait_until(Duration::from_secs(30), || {
        let row = node
            .psql(
                "superuser",
                &format!(
                    "SELECT last_archived_wal >= '{}' AND (last_failed_time IS NULL \
                     OR last_failed_time < last_archived_time) FROM pg_stat_archiver",
                    segment.trim()
                ),
            )
            .ok()?;
        (row.trim() == "t").then_some(())
    });
    assert!(
        archived.is_some(),
        "the WAL segment {} was not archived within 30 s:\n{}",
        segment.trim(),
        daemon.log()
    );
}

/// An account with vault `v` on `daemon`.
async fn account(daemon: &common::Daemon, email: &str) -> (SyncClient, keepd::client::VaultKey) {
    let mut client = SyncClient::new(daemon.addr());
    client.register(email, PASSWORD).await.unwrap();
    client.login(email, PASSWORD).await.unwrap();
    let key = client.create_vault("v", PASSWORD).await.unwrap();
    (client, key)
}

/// Waits for the schedule's first backup (taken right after the start).
fn first_backup(node: &TestNode, daemon: &common::Daemon) {
    let first = wait_until(Duration::from_secs(60), || {
        (node.report_check("backup")["status"] == "pass").then_some(())
    });
    assert!(first.is_some(), "{}", daemon.log());
}

async fn push(client: &SyncClient, key: &keepd::client::VaultKey, labels: &[&str]) {
    client
        .push("v", key, &common::labelled(labels), None)
        .await
        .unwrap();
}

async fn pulled(client: &SyncClient, key: &keepd::client::VaultKey) -> Vec<(i64, String)> {
    let page = client.pull("v", 0, 1000).await.unwrap();
    page.logs
        .iter()
        .map(|e| {
            let plain = key.decrypt_entry(&e.encrypted_data, &e.nonce).unwrap();
            (e.sequence, String::from_utf8(plain).unwrap())
        })
        .collect()
}

fn report_level(node: &TestNode) -> String {
    let out = node.command(&["report", "--json"]).output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    report["level"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_node_restores_to_a_moment_and_carries_on() {
    let (node, _dir, _repository) = backed_up_node();
    let mut daemon = node.start_healthy();
    let (client, key) = account(&daemon, "pitr@example.org").await;
    push(&client, &key, &["a1", "a2", "a3"]).await;
    // After the schedule's first backup (two at once are refused).
    first_backup(&node, &daemon);
    let (code, text) = backup(&node, &["now", "--full"]);
    assert_eq!(code, 0, "{text}");
    push(&client, &key, &["b1", "b2"]).await;
    let moment = node.restore_moment();
    push(&client, &key, &["c1", "c2"]).await;
    let level = report_level(&node);
    let token = client.token().unwrap().to_string();
    daemon.stop();

    let (code, text) = node.run(&["restore", "--to", &moment]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(&format!("restored to {moment}")), "{text}");

    let daemon = node.start_healthy();
    let mut again = SyncClient::new(daemon.addr());
    again.set_token(Some(token));
    let labels = ["a1", "a2", "a3", "b1", "b2"];
    let expected: Vec<(i64, String)> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i as i64 + 1, l.to_string()))
        .collect();
    assert_eq!(
        pulled(&again, &key).await,
        expected,
        "exactly what was acknowledged up to {moment}"
    );
    // Sequences go on from the restored point, gap-free.
    push(&again, &key, &["d1"]).await;
    assert_eq!(
        pulled(&again, &key).await.last().unwrap(),
        &(6, "d1".to_string())
    );
    let mut login = SyncClient::new(daemon.addr());
    login.login("pitr@example.org", PASSWORD).await.unwrap();

    // The audit trail names the restore and verifies; the report is back.
    let verified = wait_until(Duration::from_secs(20), || {
        let (code, text) = node.audit_verify();
        (code == 0 && text.contains("restored from a backup")).then_some(text)
    });
    let text = verified.unwrap_or_else(|| node.audit_verify().1);
    assert!(text.contains(&moment), "{text}");
    assert_eq!(report_level(&node), level);
}

/// Disaster recovery, end to end: the machine is gone; a fresh state
/// directory gets the identity back from two of three Shamir shares, and
/// `keepd restore --latest` rebuilds the node from the encrypted
/// repository alone (db.enc from the repository's sealed copy).
#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_machine_comes_back_from_shares_and_the_repository() {
    let (old, dir, repository) = backed_up_node();
    let mut daemon = old.start_healthy();
    let (client, key) = account(&daemon, "dr@example.org").await;
    push(&client, &key, &["x1", "x2"]).await;
    first_backup(&old, &daemon);
    push(&client, &key, &["x3"]).await;
    let shares = dir.path().join("shares");
    let out = old
        .command(&[
            "recovery",
            "split",
            "--shares",
            "3",
            "--threshold",
            "2",
            "--out",
            shares.to_str().unwrap(),
            "--shareholder",
            "ann",
            "--shareholder",
            "bob",
            "--shareholder",
            "cy",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    daemon.stop();
    drop(old);

    let new = TestNode::with(json!({"backup": {"repository": repository}}));
    let mut files: Vec<_> = std::fs::read_dir(&shares)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let out = new
        .command(&[
            "recovery",
            "combine",
            files[0].to_str().unwrap(),
            files[2].to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, text) = new.run(&["restore", "--latest"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("db.enc taken from the backup repository"),
        "{text}"
    );

    let daemon = new.start_healthy();
    let mut back = SyncClient::new(daemon.addr());
    back.login("dr@example.org", PASSWORD).await.unwrap();
    let labels: Vec<String> = pulled(&back, &key)
        .await
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    assert_eq!(labels, ["x1", "x2", "x3"]);
    let verified = wait_until(Duration::from_secs(20), || {
        let (code, text) = new.audit_verify();
        (code == 0 && text.contains("restored from a backup")).then_some(text)
    });
    assert!(verified.is_some(), "{:?}", new.audit_verify());
}

/// An S3-compatible store on loopback: moto's S3 server (PyPI, in its own
/// virtualenv from scripts/install-deps.sh) behind nginx for HTTPS, with a
/// certificate for `localhost` that the node is given as its CA.
struct S3Store {
    moto: std::process::Child,
    nginx: std::process::Child,
    moto_port: u16,
    port: u16,
    ca: PathBuf,
    _dir: tempfile::TempDir,
}

const MOTO: &str = "/opt/keepd-test/moto/bin/moto_server";

fn listening(port: u16, what: &str) {
    let up = wait_until(Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    assert!(up.is_some(), "{what} does not listen on {port}");
}

impl S3Store {
    fn start(bucket: &str) -> S3Store {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o644)).unwrap();
        let key = dir.path().join("server.key");
        std::fs::write(&key, cert.signing_key.serialize_pem()).unwrap();
        let moto_port = common::free_port();
        let moto = std::process::Command::new(MOTO)
            .args(["-H", "127.0.0.1", "-p", &moto_port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("moto starts");
        listening(moto_port, "moto");
        let port = common::free_port();
        let server = format!(
            "    listen 127.0.0.1:{port} ssl;\n\
             ssl_certificate {ca};\n    ssl_certificate_key {key};\n\
             client_max_body_size 0;\n    location / {{\n\
             proxy_pass http://127.0.0.1:{moto_port};\n      proxy_set_header Host $http_host;\n\
             proxy_request_buffering off;\n      proxy_http_version 1.1;\n    }}",
            ca = ca.display(),
            key = key.display(),
        );
        let nginx = common::start_nginx(dir.path(), port, &server);
        let store = S3Store {
            moto,
            nginx,
            moto_port,
            port,
            ca,
            _dir: dir,
        };
        let (status, _) = store.request("PUT", &format!("/{bucket}"));
        assert_eq!(status, 200, "bucket {bucket} created");
        store
    }

    /// One plain request to moto itself: (status, body).
    fn request(&self, method: &str, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.moto_port)).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n",
            self.moto_port
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let status = answer
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, answer)
    }
}

impl Drop for S3Store {
    fn drop(&mut self) {
        common::kill(self.nginx.id() as i32, common::Signal::SIGTERM);
        let _ = self.nginx.wait();
        let _ = self.moto.kill();
        let _ = self.moto.wait();
    }
}

/// The repository in an S3 bucket (over HTTPS, the endpoint verified
/// against the configured CA): the access key sealed in db.enc by
/// `keepd backup s3-credentials`, WAL archived and backups taken there,
/// verified, and a stopped node restored from it.
#[tokio::test(flavor = "multi_thread")]
async fn an_s3_bucket_holds_the_archive_and_a_node_restores_from_it() {
    if !(common::require_file(MOTO, "moto's S3 server") && common::require_nginx()) {
        return;
    }
    let store = S3Store::start("keepd-test");
    let node = TestNode::with(json!({"backup": {"s3": {
        "endpoint": format!("localhost:{}", store.port),
        "bucket": "keepd-test",
        "region": "us-east-1",
        "uri_style": "path",
        "ca_file": store.ca,
    }}}));
    // Without the access key keepd says how to give it, before Postgres starts.
    let mut refused = node.spawn();
    let status = refused.wait_exit(Duration::from_secs(30)).expect("exits");
    assert!(!status.success());
    assert!(
        refused.log().contains("keepd backup s3-credentials"),
        "{}",
        refused.log()
    );
    assert!(common::postgres_pids(&node.data_dir()).is_empty());

    let secret = "s3-secret-access-key-never-in-a-file";
    let mut child = node
        .command(&["backup", "s3-credentials", "--key-id", "keepd-test-key"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        writeln!(child.stdin.take().unwrap(), "{secret}").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut daemon = node.start_healthy();
    let (client, key) = account(&daemon, "s3@example.org").await;
    push(&client, &key, &["s1", "s2"]).await;
    first_backup(&node, &daemon);
    archive_a_segment(&node, &daemon);
    let (code, text) = backup(&node, &["verify"]);
    assert_eq!(code, 0, "{text}");
    let (code, list) = backup(&node, &["list", "--json"]);
    assert_eq!(code, 0, "{list}");
    assert!(list.contains("\"type\":\"full\""), "{list}");
    // The objects are in the bucket, under the configured path.
    let (status, objects) = store.request("GET", "/keepd-test?prefix=keepd/");
    assert_eq!(status, 200);
    assert!(objects.contains("keepd/archive/keepd/"), "{objects}");
    assert!(objects.contains("keepd/backup/keepd/"), "{objects}");
    // The secret key is sealed: in no file keepd wrote.
    for file in files_under(&node.state_dir()) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(secret),
            "{} holds the secret key",
            file.display()
        );
    }

    push(&client, &key, &["s3"]).await;
    daemon.stop();
    let (code, text) = node.run(&["restore", "--latest"]);
    assert_eq!(code, 0, "{text}");
    let daemon = node.start_healthy();
    let mut again = SyncClient::new(daemon.addr());
    again.set_token(client.token().map(str::to_string));
    let labels: Vec<String> = pulled(&again, &key)
        .await
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    assert_eq!(labels, ["s1", "s2", "s3"]);
}
