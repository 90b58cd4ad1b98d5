//! Encryption at rest (`method: application`) through the API, key
//! rotation by hand and by the rule (age, uses) with background
//! re-encryption and retirement.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::TestNode;
use keepd::client::{DeviceKey, LogEntry, SyncClient, VaultKey};
use serde_json::{Value, json};

const PASSWORD: &str = "at rest password";

fn config(version: u32) -> Value {
    json!({"encryption_at_rest": {
        "enabled": true,
        "method": "application",
        "application": {
            "key_version": version,
            "encrypted_fields": [
                {"table": "sync_logs", "columns": ["encrypted_data", "haex_timestamp"]},
                {"table": "backups", "columns": ["ciphertext"]},
                {"table": "devices", "columns": ["device_name"]},
            ],
        },
    }})
}

fn set_version(node: &TestNode, version: u32) {
    node.set("encryption_at_rest.application.key_version", version);
}

fn count(node: &TestNode, sql: &str) -> i64 {
    node.psql("superuser", sql).unwrap().trim().parse().unwrap()
}

fn stop(mut daemon: common::Daemon) {
    daemon.signal(common::Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(30)).unwrap().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn columns_are_sealed_and_rotated_by_key_version() {
    let node = TestNode::with(config(1));
    let daemon = node.start();
    assert!(
        daemon.wait_health(200, Duration::from_secs(30)),
        "{}",
        daemon.log()
    );
    let mut client = SyncClient::new(daemon.addr());
    // On the password routes: this test takes the field key back to a
    // version that cannot open what v2 sealed, an OPAQUE record included.
    client
        .register_with_password("rest@example.org", PASSWORD)
        .await
        .unwrap();
    client
        .login_with_password("rest@example.org", PASSWORD)
        .await
        .unwrap();
    let key = client.create_vault("v", PASSWORD).await.unwrap();
    let entries: Vec<LogEntry> = (0..3)
        .map(|i| LogEntry {
            data: format!("entry {i}").into_bytes(),
            haex_timestamp: format!("ts-{i}"),
        })
        .collect();
    let pushed = client.push("v", &key, &entries, None).await.unwrap();
    assert_eq!(
        pushed.logs[2].haex_timestamp, "ts-2",
        "the response carries the plain value"
    );
    let device = DeviceKey::generate().unwrap();
    let device_id = client.register_device("laptop", &device).await.unwrap();
    let backup = client
        .store_backup(&device_id, &device, &key, b"the backup", "Internal")
        .await
        .unwrap();

    // Stored sealed, read back as sent.
    assert_eq!(
        count(
            &node,
            "SELECT count(*) FROM keepd.sync_logs WHERE encrypted_data LIKE 'kf1:1:%' AND haex_timestamp LIKE 'kf1:1:%'"
        ),
        3
    );
    assert_eq!(
        count(
            &node,
            "SELECT count(*) FROM keepd.devices WHERE device_name LIKE 'kf1:1:%'"
        ),
        1
    );
    assert_eq!(
        count(
            &node,
            "SELECT count(*) FROM keepd.backups WHERE substring(ciphertext FROM 1 FOR 3) = 'KF1'::bytea"
        ),
        1
    );
    let pulled = client.pull("v", 0, 10).await.unwrap();
    assert_eq!(pulled.logs[1].haex_timestamp, "ts-1");
    assert_eq!(
        key.decrypt_entry(&pulled.logs[1].encrypted_data, &pulled.logs[1].nonce)
            .unwrap(),
        b"entry 1"
    );
    assert_eq!(
        client.restore_backup(&backup, &key).await.unwrap(),
        b"the backup"
    );
    assert_eq!(
        client.devices().await.unwrap()["devices"][0]["deviceName"],
        "laptop"
    );
    let check = node.report_check("encryption_at_rest");
    assert_eq!(check["status"], "pass", "{check}");
    stop(daemon);

    // Rotation: v2, existing values re-encrypted in the background.
    set_version(&node, 2);
    let daemon = node.start();
    assert!(daemon.wait_health(200, Duration::from_secs(30)));
    let rotated = common::wait_until(Duration::from_secs(30), || {
        (count(&node, "SELECT count(*) FROM keepd.sync_logs WHERE encrypted_data LIKE 'kf1:2:%' AND haex_timestamp LIKE 'kf1:2:%'") == 3
            && count(&node, "SELECT count(*) FROM keepd.backups WHERE substring(ciphertext FROM 1 FOR 7) = 'KF1'::bytea || '\\x00000002'::bytea") == 1)
            .then_some(())
    });
    assert!(rotated.is_some(), "{}", daemon.log());
    let mut client = SyncClient::new(daemon.addr());
    client
        .login_with_password("rest@example.org", PASSWORD)
        .await
        .unwrap();
    let pulled = client.pull("v", 0, 10).await.unwrap();
    assert_eq!(
        key.decrypt_entry(&pulled.logs[0].encrypted_data, &pulled.logs[0].nonce)
            .unwrap(),
        b"entry 0"
    );
    assert_eq!(
        client.restore_backup(&backup, &key).await.unwrap(),
        b"the backup"
    );
    stop(daemon);

    // Back to key_version 1: the cluster keeps sealing under v2 (the
    // setting is a floor), and every value reads.
    set_version(&node, 1);
    let daemon = node.start();
    assert!(daemon.wait_health(200, Duration::from_secs(30)));
    let mut client = SyncClient::new(daemon.addr());
    client
        .login_with_password("rest@example.org", PASSWORD)
        .await
        .unwrap();
    let pulled = client.pull("v", 0, 10).await.unwrap();
    assert_eq!(pulled.logs.len(), 3);
    client.push("v", &key, &entries[..1], None).await.unwrap();
    assert_eq!(
        count(
            &node,
            "SELECT count(*) FROM keepd.sync_logs WHERE encrypted_data LIKE 'kf1:2:%'"
        ),
        4,
        "{}",
        daemon.log()
    );
    stop(daemon);
}

/// The versions the cluster has made, as (version, reason, retired).
fn versions(node: &TestNode) -> Vec<(u32, String, bool)> {
    node.psql(
        "superuser",
        "SELECT version || ' ' || reason || ' ' || (retired_at IS NOT NULL) \
         FROM keepd.field_keys ORDER BY version",
    )
    .unwrap()
    .lines()
    .map(|line| {
        let parts: Vec<&str> = line.split(' ').collect();
        (
            parts[0].parse().unwrap(),
            parts[1].into(),
            parts[2] == "true",
        )
    })
    .collect()
}

/// Pushes five entries a round and pulls them back, after `done` rounds.
async fn load(
    client: SyncClient,
    key: Arc<VaultKey>,
    stop: Arc<AtomicBool>,
    done: usize,
) -> (SyncClient, usize) {
    let mut rounds = done;
    while !stop.load(Ordering::Relaxed) {
        let entries: Vec<LogEntry> = (0..5)
            .map(|i| LogEntry {
                data: format!("round {rounds} entry {i}").into_bytes(),
                haex_timestamp: format!("ts-{rounds}-{i}"),
            })
            .collect();
        client.push("load", &key, &entries, None).await.unwrap();
        let pulled = client.pull("load", rounds as i64 * 5, 100).await.unwrap();
        assert_eq!(pulled.logs.len(), 5);
        assert_eq!(pulled.logs[4].haex_timestamp, format!("ts-{rounds}-4"));
        let data = key
            .decrypt_entry(&pulled.logs[4].encrypted_data, &pulled.logs[4].nonce)
            .unwrap();
        assert_eq!(data, format!("round {rounds} entry 4").into_bytes());
        rounds += 1;
        // Under api.rate_limits.account_per_second.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    (client, rounds)
}

/// Field keys rotate by themselves under load, by age and by uses: every
/// value stays readable, no request fails, an old version is retired once
/// no value uses it, and `keepd keys status` shows only the live ones.
#[tokio::test(flavor = "multi_thread")]
async fn field_keys_rotate_by_age_and_by_uses_under_load() {
    let mut settings = config(1);
    settings["encryption_at_rest"]["application"]["rotate_after"] = json!("3s");
    let node = TestNode::with(settings);
    let daemon = node.start_healthy();
    let mut client = SyncClient::new(daemon.addr());
    client.register("keys@example.org", PASSWORD).await.unwrap();
    client.login("keys@example.org", PASSWORD).await.unwrap();
    let key = Arc::new(client.create_vault("load", PASSWORD).await.unwrap());
    let stop_load = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(load(client, key.clone(), stop_load.clone(), 0));

    // By age: every 3 s a new version, old ones retired as values move.
    let aged = common::wait_until(Duration::from_secs(60), || {
        let v = versions(&node);
        (v.iter().filter(|(_, reason, _)| reason == "age").count() >= 2
            && v.iter().any(|(_, _, retired)| *retired))
        .then_some(v)
    });
    assert!(aged.is_some(), "{:?}\n{}", versions(&node), daemon.log());
    stop_load.store(true, Ordering::Relaxed);
    let (client, rounds) = running.await.unwrap();
    assert!(rounds > 5, "the load ran ({rounds} rounds)");
    let pulled = client.pull("load", 0, 5).await.unwrap();
    assert_eq!(
        key.decrypt_entry(&pulled.logs[0].encrypted_data, &pulled.logs[0].nonce)
            .unwrap(),
        b"round 0 entry 0"
    );
    // A retired version holds no value.
    for (version, _, retired) in versions(&node) {
        if retired {
            let sql = format!(
                "SELECT count(*) FROM keepd.sync_logs WHERE encrypted_data LIKE 'kf1:{version}:%'"
            );
            assert_eq!(count(&node, &sql), 0, "v{version} is retired");
        }
    }
    let status = node
        .command(&["keys", "status", "--json"])
        .output()
        .unwrap();
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    let field_keys: Vec<String> = status
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| {
            k["key"]
                .as_str()
                .filter(|n| n.starts_with("field key"))
                .map(str::to_string)
        })
        .collect();
    let live = versions(&node)
        .iter()
        .filter(|(_, _, retired)| !retired)
        .count();
    assert_eq!(field_keys.len(), live, "{field_keys:?}");
    assert!(
        field_keys.iter().any(|k| k.ends_with("(sealing)")),
        "{field_keys:?}"
    );
    let audited = count(
        &node,
        "SELECT count(*) FROM keepd_audit.audit_log WHERE action = 'FIELD_KEY_ROTATION'",
    );
    assert!(audited >= 2, "{audited} rotations audited");
    let made = versions(&node).len();
    stop(daemon);

    // By uses: a long life, but 30 seals per version.
    node.set("encryption_at_rest.application.rotate_after", "20s");
    node.set("encryption_at_rest.application.rotate_after_uses", 30);
    let daemon = node.start_healthy();
    let mut client = SyncClient::new(daemon.addr());
    client.login("keys@example.org", PASSWORD).await.unwrap();
    let stop_load = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(load(client, key.clone(), stop_load.clone(), rounds));
    let used = common::wait_until(Duration::from_secs(60), || {
        versions(&node)[made..]
            .iter()
            .any(|(_, reason, _)| reason == "uses")
            .then_some(())
    });
    stop_load.store(true, Ordering::Relaxed);
    running.await.unwrap();
    assert!(used.is_some(), "{:?}\n{}", versions(&node), daemon.log());
    let check = node.report_check("encryption_at_rest");
    assert_ne!(check["status"], "fail", "{check}");
    stop(daemon);
}

/// The device-name limit is the name's, not its sealed form's; turning
/// encryption on over long names finishes, and a value the server refuses
/// is reported exactly, in the log and by the report alike.
#[tokio::test(flavor = "multi_thread")]
async fn long_names_are_sealed_and_what_cannot_be_resealed_is_reported() {
    let node = TestNode::new();
    let daemon = node.start();
    assert!(daemon.wait_health(200, Duration::from_secs(30)));
    let mut client = SyncClient::new(daemon.addr());
    client
        .register("names@example.org", PASSWORD)
        .await
        .unwrap();
    client.login("names@example.org", PASSWORD).await.unwrap();
    let long = "d".repeat(190);
    for name in [long.as_str(), "short"] {
        client
            .register_device(name, &DeviceKey::generate().unwrap())
            .await
            .unwrap();
    }
    stop(daemon);

    // Encryption on over existing names: every one is sealed.
    node.merge(config(1));
    let daemon = node.start();
    let done = daemon.wait_for_log(
        "field re-encryption: column current",
        Duration::from_secs(30),
    );
    let sealed = || {
        count(
            &node,
            "SELECT count(*) FROM keepd.devices WHERE device_name LIKE 'kf1:%'",
        )
    };
    assert!(
        common::wait_until(Duration::from_secs(30), || (sealed() == 2).then_some(())).is_some(),
        "{}",
        daemon.log()
    );
    assert!(done.is_some(), "{}", daemon.log());
    // A 120-character name fits once sealed (it was a 500).
    let mut client = SyncClient::new(daemon.addr());
    client.login("names@example.org", PASSWORD).await.unwrap();
    let medium = "m".repeat(120);
    client
        .register_device(&medium, &DeviceKey::generate().unwrap())
        .await
        .unwrap();
    let names: Vec<String> = client.devices().await.unwrap()["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["deviceName"].as_str().unwrap().to_string())
        .collect();
    for name in [&long, &medium, &"short".to_string()] {
        assert!(names.contains(name), "{name} missing from {names:?}");
    }

    // A constraint the sealed long name cannot meet: re-encryption to v2
    // re-seals the others and reports the one it could not.
    node.psql(
        "superuser",
        "ALTER TABLE keepd.devices ADD CONSTRAINT test_short_values \
         CHECK (length(device_name) < 250) NOT VALID",
    )
    .unwrap();
    stop(daemon);
    set_version(&node, 2);
    let daemon = node.start();
    let warned = daemon
        .wait_for_log(
            "field re-encryption: column not current; these values stay as they are",
            Duration::from_secs(30),
        )
        .unwrap_or_else(|| panic!("{}", daemon.log()));
    assert_eq!(warned["column"], "devices.device_name", "{warned}");
    assert_eq!(warned["refused"], 1, "{warned}");
    assert_eq!(warned["rewritten"], 2, "{warned}");
    assert!(
        warned["first_refusal"]
            .as_str()
            .unwrap()
            .contains("test_short_values"),
        "{warned}"
    );
    let check = node.report_check("encryption_at_rest");
    assert_eq!(check["status"], "warn", "{check}");
    assert!(
        check["value"]
            .as_str()
            .unwrap()
            .contains("1 value(s) not yet under key v2"),
        "{check}"
    );
}

/// A node from before clusters existed derived its keys from its identity.
/// Upgraded, it founds the cluster inheriting them: its accounts log in,
/// its tokens verify and its sealed columns open, under a new cluster key.
#[tokio::test(flavor = "multi_thread")]
async fn a_single_node_becomes_the_first_member_without_losing_anything() {
    let node = TestNode::with(config(1));
    let daemon = node.start_healthy();
    stop(daemon);
    // As an older keepd ran: every key derived from the identity, which is
    // what the inherited keys are (a unit test pins them to the identity).
    let identity =
        keepd::identity::NodeIdentity::load(&node.state_dir().join("identity.key")).unwrap();
    let old_keys = keepd::cluster::ClusterKey::inheriting(&identity, 1).unwrap();
    let sealed =
        keepd::secrets::seal::seal_for(&identity.public_key(), &old_keys.to_bytes()).unwrap();
    let daemon = node.start();
    node.superuser()
        .await
        .execute(
            "UPDATE keepd.cluster_members SET sealed_key = $1",
            &[&sealed],
        )
        .await
        .unwrap();
    stop(daemon);
    // Not the key this node pinned: as if it had never held another.
    let pin = node.state_dir().join("cluster.fingerprint");
    std::fs::remove_file(&pin).unwrap();
    let daemon = node.start_healthy();
    let mut old = SyncClient::new(daemon.addr());
    // An older keepd had the password routes only.
    old.register_with_password("old@example.org", PASSWORD)
        .await
        .unwrap();
    old.login_with_password("old@example.org", PASSWORD)
        .await
        .unwrap();
    let key = old.create_vault("v", PASSWORD).await.unwrap();
    let entry = LogEntry {
        data: b"kept".to_vec(),
        haex_timestamp: "t1".into(),
    };
    old.push("v", &key, &[entry], None).await.unwrap();
    stop(daemon);
    // Back to schema v9: no cluster table.
    let daemon = node.start();
    node.superuser()
        .await
        .batch_execute(
            "DROP TABLE keepd.cluster_members; DELETE FROM keepd.schema_migrations WHERE version = 10",
        )
        .await
        .unwrap();
    stop(daemon);
    std::fs::remove_file(&pin).unwrap();

    let daemon = node.start_healthy();
    let (_, founded) = node.cluster_key().await;
    assert_eq!(
        founded.inherited_keys(),
        4,
        "tokens, email, audit ids, field v1"
    );
    // The old token, the old password, the old sealed entry.
    let mut again = SyncClient::new(daemon.addr());
    again.set_token(old.token().map(str::to_string));
    let page = again.pull("v", 0, 10).await.unwrap();
    assert_eq!(page.logs.len(), 1);
    let plain = key
        .decrypt_entry(&page.logs[0].encrypted_data, &page.logs[0].nonce)
        .unwrap();
    assert_eq!(plain, b"kept");
    let mut login = SyncClient::new(daemon.addr());
    login
        .login_with_password("old@example.org", PASSWORD)
        .await
        .unwrap();
    stop(daemon);
}

/// Whether a real dm-crypt volume can be made here: the kernel's
/// device-mapper, root, and the tools scripts/install-deps.sh installs.
fn can_make_a_dm_crypt_volume() -> bool {
    common::require(
        std::path::Path::new("/dev/mapper/control").exists(),
        "this kernel has no device-mapper (/dev/mapper/control is absent)",
        "run this test on a host or VM whose kernel has dm-crypt",
    ) && common::require(
        nix::unistd::geteuid().is_root(),
        "making a dm-crypt volume takes root",
        "run the test as root",
    ) && ["cryptsetup", "losetup", "mkfs.ext4", "mount"]
        .iter()
        .all(|tool| common::require_tool(tool, "cryptsetup-bin, mount, e2fsprogs"))
}

fn sh(script: &str) {
    let out = std::process::Command::new("sh")
        .args(["-ec", script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Unmounts, closes and detaches the test volume whatever happens.
struct CryptVolume {
    name: String,
    mount: std::path::PathBuf,
    loop_file: std::path::PathBuf,
}

impl Drop for CryptVolume {
    fn drop(&mut self) {
        let _ = std::process::Command::new("sh")
            .args([
                "-c",
                &format!(
                    "umount {m}; cryptsetup close {n}; losetup -j {f} -O NAME -n | xargs -r losetup -d",
                    m = self.mount.display(),
                    n = self.name,
                    f = self.loop_file.display()
                ),
            ])
            .status();
    }
}

/// A data directory on a real LUKS2 volume: the report reads the cipher and
/// key size from the kernel's table, and a weaker volume than
/// `encryption_at_rest.luks` asks for fails the check.
///
/// Ignored by default: it needs the kernel's device-mapper, which the
/// containers this project's machines and CI run in never have (their
/// /dev/mapper/control is absent). On a host or VM with dm-crypt, as root:
/// `cargo nextest run --test suite --run-ignored only at_rest::a_data_directory_on_dm_crypt`.
#[test]
#[ignore = "needs the kernel's device-mapper (dm-crypt), absent in this project's containers; \
            run with --run-ignored only on a host that has it"]
fn a_data_directory_on_dm_crypt_is_measured() {
    if !can_make_a_dm_crypt_volume() {
        return;
    }
    let node = TestNode::with(json!({"encryption_at_rest": {
        "enabled": true,
        "method": "luks",
        "luks": {"cipher": "aes-xts-plain64", "key_size": 512},
    }}));
    let name = format!("keepd-test-{}", common::uuid());
    let loop_file = node.dir.path().join("volume.img");
    let volume = CryptVolume {
        name: name.clone(),
        mount: node.state_dir(),
        loop_file: loop_file.clone(),
    };
    let key = node.dir.path().join("volume.key");
    std::fs::write(&key, common::uuid()).unwrap();
    sh(&format!(
        "truncate -s 96M {f}; dev=$(losetup -f --show {f}); \
         cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
           --cipher aes-xts-plain64 --key-size 512 --key-file {k} $dev; \
         cryptsetup open --key-file {k} $dev {name}; mkfs.ext4 -q /dev/mapper/{name}; \
         mkdir -p {m}; mount /dev/mapper/{name} {m}; chmod 700 {m}",
        f = loop_file.display(),
        k = key.display(),
        m = volume.mount.display(),
    ));
    let daemon = node.start_healthy();
    let check = node.report_check("encryption_at_rest");
    assert_eq!(check["status"], "pass", "{check}");
    let value = check["value"].as_str().unwrap();
    assert!(
        value.contains(&format!(
            "dm-crypt volume {name} (LUKS2, aes-xts-plain64 with a 512-bit key)"
        )),
        "{value}"
    );

    // Asking for more than the volume has fails, naming both (`keepd
    // report` reads the file; the running daemon keeps Postgres up).
    node.set("encryption_at_rest.luks.key_size", 1024);
    let check = node.report_check("encryption_at_rest");
    assert_eq!(check["status"], "fail", "{check}");
    assert!(
        check["value"]
            .as_str()
            .unwrap()
            .contains("at least a 1024-bit key"),
        "{check}"
    );
    drop(daemon);
    drop(volume);
}

/// Method luks on a directory that is not on dm-crypt: the check fails
/// naming the device (or why it is unknown), on any machine.
#[test]
fn method_luks_on_a_plain_directory_fails_naming_the_device() {
    let node = TestNode::with(json!({"encryption_at_rest": {"enabled": true, "method": "luks"}}));
    let daemon = node.start_healthy();
    let check = node.report_check("encryption_at_rest");
    assert_eq!(check["status"], "fail", "{check}");
    let value = check["value"].as_str().unwrap();
    assert!(
        value.contains("which is not dm-crypt") || value.contains("the volume is unknown"),
        "{value}"
    );
    assert!(
        check["recommendation"]
            .as_str()
            .unwrap()
            .contains("cryptsetup luksFormat"),
        "{check}"
    );
    drop(daemon);
}
