//! The command line from a user's side: help, version, configuration errors.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::process::Output;

use common::{TestNode, keepd_bin};
use serde_json::{Value, json};

fn keepd(args: &[&str]) -> Output {
    std::process::Command::new(keepd_bin())
        .args(args)
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn version_and_help() {
    let out = keepd(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("keepd {}", env!("CARGO_PKG_VERSION"))
    );
    let out = keepd(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["run", "render", "--config"] {
        assert!(help.contains(word), "help lacks {word}: {help}");
    }
}

#[test]
fn unknown_subcommand_is_a_usage_error() {
    let out = keepd(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn missing_config_file_is_named() {
    let out = keepd(&[
        "render",
        "--config",
        "/nonexistent/keepd.yaml",
        "--out",
        "/tmp/x",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("/nonexistent/keepd.yaml"),
        "{}",
        stderr(&out)
    );
}

fn with_config(settings: &Value, args: &[&str]) -> Output {
    let node = TestNode::with(settings.clone());
    node.command(args).output().unwrap()
}

#[test]
fn bad_config_exits_2_naming_key_value_and_choices() {
    let cases = [
        (
            json!({"credentials": {"rotation_interval": "soon"}}),
            &["credentials.rotation_interval", "soon", "168h"][..],
        ),
        (
            json!({"database": {"postgres": {"provider": "podman"}}}),
            &["database.postgres.provider", "podman", "native"],
        ),
        (
            json!({"credentials": {"password_length": 8}}),
            &["credentials.password_length", "8", "at least 32"],
        ),
        (
            json!({"security": {"fallback_mod": "warn"}}),
            &["fallback_mod", "fallback_mode"],
        ),
    ];
    for (settings, expected) in cases {
        for args in [&["run"][..], &["render", "--out", "/tmp/keepd-never"]] {
            let out = with_config(&settings, args);
            assert_eq!(out.status.code(), Some(2), "{settings}");
            let msg = stderr(&out);
            assert_eq!(msg.lines().count(), 1, "one message: {msg}");
            for word in expected {
                assert!(
                    msg.contains(word),
                    "{settings}: message lacks {word}: {msg}"
                );
            }
        }
    }
    assert!(!std::path::Path::new("/tmp/keepd-never").exists());
}

#[test]
fn corrupted_identity_refuses_to_start_and_keeps_the_file() {
    let node = TestNode::new();
    std::fs::create_dir_all(node.state_dir()).unwrap();
    let key = node.state_dir().join("identity.key");
    std::fs::write(&key, "keepd-identity: v1\nalgorithm: ed25519\nseed: AAAA\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = node.command(&["run"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let msg = stderr(&out);
    assert!(
        msg.contains("corrupted") && msg.contains("identity.key"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read_to_string(&key).unwrap(),
        "keepd-identity: v1\nalgorithm: ed25519\nseed: AAAA\n"
    );
}

#[test]
fn foreign_identity_file_is_refused() {
    let node = TestNode::new();
    std::fs::create_dir_all(node.state_dir()).unwrap();
    let key = node.state_dir().join("identity.key");
    std::fs::write(&key, "-----BEGIN OPENSSH PRIVATE KEY-----\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = node.command(&["run"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is not a keepd identity key"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn render_writes_every_file_without_touching_state() {
    let node = TestNode::new();
    let out_dir = node.dir.path().join("out");
    let out = node
        .command(&["render", "--out", out_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let conf = std::fs::read_to_string(out_dir.join("postgresql.conf")).unwrap();
    assert!(conf.contains("listen_addresses = ''"));
    assert!(out_dir.join("initdb/04-hardening.sql").exists());
    assert!(!node.state_dir().exists(), "render created state");
}

#[test]
fn recovery_split_and_combine_through_the_cli() {
    let node = TestNode::new();
    let key = node.state_dir().join("identity.key");
    let (identity, _) = keepd::identity::NodeIdentity::load_or_create(&key).unwrap();
    let out_dir = node.dir.path().join("shares");
    let out = node
        .command(&[
            "recovery",
            "split",
            "--shares",
            "5",
            "--threshold",
            "3",
            "--out",
            out_dir.to_str().unwrap(),
            "--shareholder",
            "ann",
            "--shareholder",
            "bob",
            "--shareholder",
            "cy",
            "--shareholder",
            "dee",
            "--shareholder",
            "eve",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let mut shares: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    shares.sort();
    assert_eq!(shares.len(), 5);

    let bad = node
        .command(&[
            "recovery",
            "split",
            "--shares",
            "3",
            "--threshold",
            "4",
            "--out",
            "/tmp/x",
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("--threshold 4"), "{}", stderr(&bad));

    // The key is lost; three shares bring it back, two do not.
    std::fs::remove_file(&key).unwrap();
    let two = node
        .command(&[
            "recovery",
            "combine",
            shares[0].to_str().unwrap(),
            shares[4].to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(two.status.code(), Some(1));
    assert!(stderr(&two).contains("needs 3"), "{}", stderr(&two));
    assert!(!key.exists());
    let three = node
        .command(&[
            "recovery",
            "combine",
            shares[0].to_str().unwrap(),
            shares[2].to_str().unwrap(),
            shares[4].to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(three.status.success(), "{}", stderr(&three));
    let restored = keepd::identity::NodeIdentity::load(&key).unwrap();
    assert_eq!(restored.node_id(), identity.node_id());
    let again = node
        .command(&[
            "recovery",
            "combine",
            shares[1].to_str().unwrap(),
            shares[2].to_str().unwrap(),
            shares[3].to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("never overwrites"),
        "{}",
        stderr(&again)
    );
    // --out into a shared directory: the file is private, the directory
    // keeps its mode.
    let shared = tempfile::tempdir().unwrap();
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let out = shared.path().join("identity.key");
    let elsewhere = node
        .command(&[
            "recovery",
            "combine",
            "--out",
            out.to_str().unwrap(),
            shares[1].to_str().unwrap(),
            shares[2].to_str().unwrap(),
            shares[3].to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(elsewhere.status.success(), "{}", stderr(&elsewhere));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(
        mode(shared.path()),
        0o1777,
        "the directory was left as it was"
    );
    assert_eq!(mode(&out), 0o600);
}

#[test]
fn recovery_split_takes_its_defaults_from_the_configuration() {
    let node = TestNode::with(json!({"encryption_at_rest": {"recovery": {"shamir": {
        "total_shares": 4,
        "threshold": 2,
        "shareholder_ids": ["ann", "bob", "cy", "dee"],
    }}}}));
    let key = node.state_dir().join("identity.key");
    keepd::identity::NodeIdentity::load_or_create(&key).unwrap();
    let out_dir = node.dir.path().join("shares");
    let out = node
        .command(&["recovery", "split", "--out", out_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("wrote 4 shares") && stdout.contains("any 2 rebuild"),
        "{stdout}"
    );
    let names: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    for holder in ["ann", "bob", "cy", "dee"] {
        assert!(
            names.iter().any(|text| text.contains(holder)),
            "no share names {holder}"
        );
    }
    // A flag overrides its setting.
    let other = node.dir.path().join("other");
    let out = node
        .command(&[
            "recovery",
            "split",
            "--threshold",
            "3",
            "--out",
            other.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("any 3 rebuild"));
}

/// An invite's lifetime is bounded by the CLI itself: past a year it is a
/// usage error naming the maximum (not Postgres's "timestamp out of
/// range"), and nothing reaches the daemon, so a node that never ran says
/// so only for a lifetime within the bound.
#[test]
fn an_invite_ttl_past_a_year_is_a_usage_error() {
    let fresh = TestNode::new();
    for ttl in ["99999999999d", "366d", "53w"] {
        let out = fresh
            .command(&["account", "invite", "--ttl", ttl])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{ttl}: {}", stderr(&out));
        let said = stderr(&out);
        assert!(said.contains("at most 365d"), "{ttl}: {said}");
        assert!(!said.contains("out of range"), "{ttl}: {said}");
    }
    assert!(
        !fresh.state_dir().exists(),
        "the state directory was written"
    );
    let out = fresh
        .command(&["account", "invite", "--ttl", "365d"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(
        said.contains("has not run yet") || said.contains("does not appear to be running"),
        "{said}"
    );
}

/// Exit codes as documented: 2 for what a setting or argument got wrong,
/// 1 for what failed at run time, whatever psql itself would say.
#[test]
fn exit_codes_say_whose_mistake_it_was() {
    // A version this host does not have, on a fresh node: a setting.
    let node = TestNode::with(json!({"database": {"postgres": {"version": 99}}}));
    let out = node.command(&["run"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // A bin_dir without the server's tools: a setting.
    let empty = tempfile::tempdir().unwrap();
    let node =
        TestNode::with(json!({"database": {"postgres": {"native": {"bin_dir": empty.path()}}}}));
    let out = node.command(&["run"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    let node = TestNode::new();
    let daemon = node.start_healthy();
    let out = node
        .command(&["psql", "--role", "nosuch", "--", "-c", "SELECT 1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "an argument: {}", stderr(&out));
    drop(daemon);
    // No daemon: psql cannot connect (its own code would be 2).
    let out = node
        .command(&["psql", "--", "-c", "SELECT 1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // A stopped node's report measures nothing live: 1, whatever the level.
    node.set("security.minimum_level", "reduced");
    let out = node.command(&["report"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // No backup.repository: a setting; an unreadable moment: an argument.
    let out = node.command(&["backup", "list"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("backup.repository"),
        "{}",
        stderr(&out)
    );
    let out = node
        .command(&["restore", "--to", "yesterday-ish"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // A moment of the right shape that does not exist, with a repository
    // configured: refused by name before the data directory is touched.
    let repository = tempfile::tempdir().unwrap();
    node.set("backup.repository", repository.path().to_str().unwrap());
    let data_before = std::fs::read_dir(node.data_dir()).unwrap().count();
    let version = std::fs::read(node.data_dir().join("PG_VERSION")).unwrap();
    let out = node
        .command(&["restore", "--to", "2026-13-45 99:99:99+00"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is not a moment keepd can restore to"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_dir(node.data_dir()).unwrap().count(),
        data_before
    );
    assert_eq!(
        std::fs::read(node.data_dir().join("PG_VERSION")).unwrap(),
        version
    );
    assert_eq!(
        std::fs::read_dir(repository.path()).unwrap().count(),
        0,
        "nothing in the repository"
    );
    node.set("backup.repository", serde_json::Value::Null);
    let out = node
        .command(&["account", "delete", "a@b.example"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "no --yes: {}", stderr(&out));

    // A node that never ran: each command says so, exits 1 and writes
    // nothing (not even the state directory).
    let fresh = TestNode::new();
    for args in [
        &["report"][..],
        &["audit", "verify"],
        &["restore", "--latest"],
        &["backup", "now"],
        &["cluster", "status"],
        &["recovery", "split", "--out", "/nonexistent/shares"],
        &["rotate"],
        &["account", "list"],
        &["psql"],
    ] {
        let out = fresh.command(args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        let said = stderr(&out);
        assert!(
            said.contains("has not run yet") || said.contains("does not appear to be running"),
            "{args:?}: {said}"
        );
        assert!(
            !fresh.state_dir().exists(),
            "{args:?} wrote the state directory"
        );
    }
}
