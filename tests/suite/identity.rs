//! The identity key at rest, from outside: sealed under a passphrase (the
//! right one starts keepd, a wrong one exits 2 naming the setting and
//! writes nothing), moved into a systemd encrypted credential that keepd
//! reads from `$CREDENTIALS_DIRECTORY` as systemd hands it over, never a
//! plaintext copy beside either, and the report saying which holds.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::{Daemon, TestNode};

fn node_id_logged(daemon: &Daemon) -> String {
    daemon
        .wait_for_log("node identity loaded", Duration::from_secs(5))
        .and_then(|line| line["node_id"].as_str().map(str::to_string))
        .expect("the start names the node")
}

fn stop(mut daemon: Daemon) {
    daemon.signal(common::Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(30)).unwrap().success());
}

/// Runs `keepd run` to its end: the exit code and what it said.
fn run_to_exit(node: &TestNode) -> (i32, String) {
    let out = node.command(&["run"]).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_identity_sealed_under_a_passphrase_opens_only_with_it() {
    let node = TestNode::new();
    let secret = node
        .state_dir()
        .parent()
        .unwrap()
        .join("identity-passphrase");
    std::fs::write(&secret, "a long test passphrase\n").unwrap();
    node.set(
        "node.identity.passphrase_file",
        secret.display().to_string(),
    );
    let daemon = node.start_healthy();
    let id = node_id_logged(&daemon);
    let sealed = node.state_dir().join("identity.sealed");
    assert!(sealed.exists() && !node.state_dir().join("identity.key").exists());
    let text = std::fs::read_to_string(&sealed).unwrap();
    assert!(text.starts_with("keepd-identity-sealed: v1"), "{text}");
    assert!(!text.contains("seed:"), "nothing of the key in the clear");
    assert_eq!(node.report_check("identity.protection")["status"], "pass");
    stop(daemon);

    // A wrong passphrase: exit 2 naming the setting, nothing written.
    let before = std::fs::read(&sealed).unwrap();
    std::fs::write(&secret, "not the passphrase at all").unwrap();
    let (code, said) = run_to_exit(&node);
    assert_eq!(code, 2, "{said}");
    assert!(said.contains("node.identity.passphrase_file"), "{said}");
    assert_eq!(std::fs::read(&sealed).unwrap(), before);
    assert!(!node.state_dir().join("identity.key").exists());

    std::fs::write(&secret, "a long test passphrase").unwrap();
    let daemon = node.start_healthy();
    assert_eq!(node_id_logged(&daemon), id, "the same node");
    stop(daemon);
}

/// Decrypts the credential into a directory as systemd's
/// `LoadCredentialEncrypted=` does before the service starts.
fn as_systemd_hands_it(credential: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let out = std::process::Command::new("systemd-creds")
        .args(["decrypt", "--name=keepd-identity"])
        .arg(credential)
        .arg(dir.join("keepd-identity"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_identity_moved_into_a_systemd_credential_leaves_no_plaintext() {
    if !common::require_tool("systemd-creds", "systemd") {
        return;
    }
    let node = TestNode::new();
    let daemon = node.start_healthy();
    let id = node_id_logged(&daemon);
    assert_eq!(node.report_check("identity.protection")["status"], "warn");
    stop(daemon);

    // Asked to protect with nothing configured: a usage error.
    let out = node.command(&["identity", "protect"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let credential = node
        .state_dir()
        .parent()
        .unwrap()
        .join("keepd-identity.cred");
    node.set("node.identity.credential", credential.display().to_string());
    let out = node
        .command(&["identity", "protect", "--with-key", "host"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!node.state_dir().join("identity.key").exists());
    let sealed = std::fs::read(&credential).unwrap();
    assert!(!String::from_utf8_lossy(&sealed).contains("keepd-identity: v1"));

    // Started as systemd would start it.
    let handed = node.state_dir().parent().unwrap().join("credentials");
    as_systemd_hands_it(&credential, &handed);
    let mut cmd = node.command(&["run"]);
    cmd.env("CREDENTIALS_DIRECTORY", &handed);
    let daemon = Daemon::spawn_with(cmd, node.data_dir());
    assert!(
        daemon.wait_health(200, Duration::from_secs(30)),
        "{}",
        daemon.log()
    );
    assert_eq!(node_id_logged(&daemon), id, "the same node");
    // Outside systemd (the CLI), keepd decrypts it itself.
    let report = node.report_check("identity.protection");
    assert_eq!(report["status"], "pass", "{report}");
    stop(daemon);

    // A credential that does not decrypt: exit 2 naming it, no fallback.
    std::fs::write(&credential, b"not a credential").unwrap();
    let (code, said) = run_to_exit(&node);
    assert_eq!(code, 2, "{said}");
    assert!(said.contains("node.identity.credential"), "{said}");
    // A plaintext key beside a protected one is refused too.
    node.set("node.identity.credential", serde_json::Value::Null);
    node.set(
        "node.identity.passphrase_file",
        credential.display().to_string(),
    );
    std::fs::write(
        node.state_dir().join("identity.key"),
        "keepd-identity: v1\n",
    )
    .unwrap();
    let (code, said) = run_to_exit(&node);
    assert_eq!(code, 2, "{said}");
    assert!(said.contains("plaintext identity key"), "{said}");
}

/// `keepd keys status` lists every key a running node holds, with ages
/// and schedules that match what the node did.
#[test]
fn keys_status_lists_every_key_with_its_age_and_schedule() {
    // HTTPS: the API certificate is listed too (the internal CA only where
    // Postgres is reached over TCP).
    let node =
        TestNode::with_https(serde_json::json!({"credentials": {"rotation_interval": "48h"}}));
    let daemon = node.start_healthy();
    let out = node
        .command(&["keys", "status", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keys: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let key = |name: &str| {
        keys.iter()
            .find(|k| k["key"].as_str().is_some_and(|n| n.starts_with(name)))
            .unwrap_or_else(|| panic!("no {name} in {keys:?}"))
            .clone()
    };
    for name in [
        "identity",
        "cluster root",
        "token key",
        "email HMAC key",
        "OPAQUE setup",
        "field key v1",
        "login role v1 (active)",
        "superuser password",
        "API certificate",
    ] {
        key(name);
    }
    // Made moments ago, by this start.
    for name in ["identity", "cluster root", "login role v1"] {
        let age = key(name)["ageSeconds"].as_u64().unwrap();
        assert!(age < 600, "{name}: {age}");
    }
    let role = key("login role v1");
    assert_eq!(
        role["nextRotation"].as_u64().unwrap(),
        role["createdAt"].as_u64().unwrap() + 48 * 3600,
        "credentials.rotation_interval after it was made"
    );
    let root = key("cluster root")["version"].as_str().unwrap().to_string();
    assert!(
        root.starts_with("g1 ") && root.len() == 3 + 16,
        "the generation and the pinned fingerprint, shortened: {root}"
    );
    let text = node.command(&["keys", "status"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.starts_with("KEY"), "{text}");
    assert!(
        text.contains("every 2d (credentials.rotation_interval)"),
        "{text}"
    );
    let api = key("API certificate");
    assert!(api["nextRotation"].as_u64().unwrap() > api["createdAt"].as_u64().unwrap());
    // The same, as gauges for the KeepdKeyOlderThanPolicy alert.
    let wanted = r#"keepd_key_max_age_seconds{key="login role v1 (active)"} 172800"#;
    let scraped = common::wait_until(Duration::from_secs(10), || {
        let text = daemon.metrics();
        text.contains(wanted).then_some(text)
    });
    let text = scraped.unwrap_or_else(|| daemon.metrics());
    assert!(text.contains(wanted), "{text}");
    assert!(
        text.contains(&format!(
            r#"keepd_key_created_timestamp_seconds{{key="login role v1 (active)"}} {}"#,
            role["createdAt"]
        )),
        "{text}"
    );
    stop(daemon);
}
