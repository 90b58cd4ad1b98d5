//! Backups with pgBackRest on the native provider: WAL archived
//! continuously into an encrypted repository, backups taken, listed and
//! verified through `keepd backup`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{TestNode, wait_until};
use keepd::client::{LogEntry, SyncClient};

const PASSWORD: &str = "backup test password";

/// A node whose repository is in a directory Postgres's account can reach.
fn backed_up_node() -> (TestNode, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let repository = dir.path().join("repo");
    let node = TestNode::with_extra(&format!(
        "backup:\n  repository: {}\n",
        repository.display()
    ));
    (node, dir, repository)
}

/// `keepd backup ARGS`: (exit code, stdout + stderr).
fn backup(node: &TestNode, args: &[&str]) -> (i32, String) {
    let out = node
        .command(&[&["backup"], args].concat())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
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

    // Continuous archiving: a finished segment reaches the repository
    // (an attempt before the stanza existed, at the first start, may have
    // failed; the last word must be a success).
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
            .unwrap();
        (row.trim() == "t").then_some(())
    });
    assert!(
        archived.is_some(),
        "the WAL segment {segment} was not archived within 30 s"
    );

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
    assert_eq!(info[0]["backup"].as_array().unwrap().len(), 2, "{info}");
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
        assert!(
            head.starts_with(b"Salted__"),
            "{} is not encrypted",
            file.display()
        );
    }
    let out = std::process::Command::new("pgbackrest")
        .arg(format!(
            "--config={}",
            node.data_dir().join("pgbackrest.conf").display()
        ))
        .args(["--stanza=keepd", "info"])
        .env_clear()
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!said.contains("full backup"), "{said}");
    // No secret in the rendered files.
    let conf = std::fs::read_to_string(node.data_dir().join("pgbackrest.conf")).unwrap();
    assert!(!conf.contains("cipher-pass"), "{conf}");
    let credentials = node.credentials();
    let passphrase = credentials.backup_passphrase.expect("sealed in db.enc");
    for file in ["pgbackrest.conf", "postgresql.conf"] {
        let text = std::fs::read_to_string(node.data_dir().join(file)).unwrap();
        assert!(!text.contains(passphrase.expose()), "{file}");
    }
}

#[test]
fn backups_of_an_external_server_are_its_clusters_job() {
    let node = TestNode::with_extra(
        "database:\n  postgres:\n    provider: external\n    external:\n      host: db\n      \
         admin_password_env: PW\n      sslmode: disable\nbackup:\n  repository: /var/backups/keepd\n",
    );
    let out = node.command(&["run"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("backup.repository") && text.contains("Patroni"),
        "{text}"
    );
}
