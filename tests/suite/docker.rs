//! The docker provider on the real engine, with the offline test image
//! (scripts/build-test-image.sh). Without a Docker engine each test fails
//! in CI and says `SKIPPED` elsewhere (`common::require_docker`).

use crate::common;

use keepd::postgres::docker::DockerNames;

use std::process::Command;
use std::time::Duration;

use common::{Daemon, Signal, TestNode};
use keepd::client::{LogEntry, SyncClient};
use serde_json::{Value, json};

use common::{DOCKER_IMAGE as IMAGE, require_docker_image as engine_ready};
const PASSWORD: &str = "docker test password";

fn docker(args: &[&str]) -> (bool, String) {
    let out = Command::new("docker").args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text.trim().to_string())
}

fn inspect(name: &str) -> Option<Value> {
    let (ok, text) = docker(&["inspect", name]);
    if !ok {
        return None;
    }
    let mut all: Value = serde_json::from_str(&text).ok()?;
    Some(all[0].take())
}

/// Removes the node's container and volume whatever happens.
struct Cleanup(Option<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(id) = &self.0 {
            let names = DockerNames::for_node(id);
            for name in [&names.container, &names.one_off, &names.probe] {
                docker(&["rm", "-f", name]);
            }
            docker(&["volume", "rm", "-f", &names.volume]);
            docker(&["network", "rm", &names.network]);
        }
    }
}

fn docker_node() -> TestNode {
    docker_node_with(json!({}))
}

/// A node on the docker provider with the test image, merged with `overlay`.
fn docker_node_with(overlay: Value) -> TestNode {
    let node = TestNode::with(common::unlimited_rates());
    node.merge(json!({"database": {"postgres": {
        "provider": "docker",
        "max_connections": 100,
        "docker": {"image": IMAGE},
    }}}));
    node.merge(overlay);
    node
}

fn healthy(daemon: &Daemon) -> String {
    assert!(
        daemon.wait_health(200, Duration::from_secs(120)),
        "keepd (docker) did not become healthy:\n{}",
        daemon.log()
    );
    daemon.get("/health").unwrap().1["nodeId"]
        .as_str()
        .unwrap()
        .to_string()
}

fn stop(daemon: &mut Daemon) {
    daemon.signal(Signal::SIGTERM);
    let status = daemon
        .wait_exit(Duration::from_secs(60))
        .expect("keepd stops on SIGTERM");
    assert!(status.success(), "{status:?}\n{}", daemon.log());
}

fn entries(n: usize) -> Vec<LogEntry> {
    (0..n)
        .map(|i| LogEntry {
            data: format!("entry {i}").into_bytes(),
            haex_timestamp: format!("t{i:04}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn hardened_container_serves_recovers_and_keeps_data() {
    if !engine_ready() {
        return;
    }
    let unrelated = format!("unrelated-{}", common::uuid());
    let (created, text) = docker(&["create", "--name", &unrelated, IMAGE, "true"]);
    assert!(created, "{text}");
    let node = docker_node();
    let mut daemon = node.start();
    let mut cleanup = Cleanup(None);
    let node_id = healthy(&daemon);
    cleanup.0 = Some(node_id.clone());
    let resources = DockerNames::for_node(&node_id);
    let container = resources.container.clone();

    // The container as the engine reports it.
    let c = inspect(&container).expect("keepd's container exists");
    let host = &c["HostConfig"];
    let user = c["Config"]["User"].as_str().unwrap();
    assert!(
        !user.is_empty() && !user.starts_with("0:") && user != "root",
        "user {user}"
    );
    assert_eq!(host["NetworkMode"], "none");
    assert_eq!(host["CapDrop"], serde_json::json!(["ALL"]));
    assert!(host["CapAdd"].is_null() || host["CapAdd"] == serde_json::json!([]));
    assert_eq!(host["ReadonlyRootfs"], true);
    assert_eq!(host["Privileged"], false);
    assert!(
        host["SecurityOpt"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o == "no-new-privileges:true")
    );
    assert!(
        host["PortBindings"]
            .as_object()
            .is_none_or(|p| p.is_empty())
    );
    assert_eq!(host["RestartPolicy"]["Name"], "no");
    assert_eq!(host["PidsLimit"], 256);
    assert_eq!(host["Memory"], 1024 * 1024 * 1024);
    assert!(host["Tmpfs"]["/tmp"].is_string());
    assert_eq!(c["Config"]["Labels"]["io.keepd.node-id"], node_id.as_str());
    assert!(c["Config"]["Labels"]["io.keepd.config-hash"].is_string());
    assert!(
        c["NetworkSettings"]["Ports"]
            .as_object()
            .is_none_or(|p| p.is_empty())
    );
    // keepd records the same facts from the engine for its report.
    let facts = daemon
        .wait_for_log("docker: container as inspected", Duration::from_secs(5))
        .expect("facts logged");
    assert_eq!(facts["network_mode"], "none");
    assert_eq!(facts["readonly_rootfs"], true);
    assert_eq!(facts["published_ports"], 0);
    let container_check = node.report_check("docker.container");
    assert_eq!(container_check["status"], "pass", "{container_check}");
    // The image carries pgAudit: keepd found it, loads and configures it.
    for id in ["audit.pgaudit", "roles.superuser"] {
        let check = node.report_check(id);
        assert_eq!(check["status"], "pass", "{check}");
    }
    // From inside: no interface but loopback, and the root is read-only.
    let (_, interfaces) = docker(&["exec", &container, "cat", "/proc/net/dev"]);
    let names: Vec<&str> = interfaces
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(names, vec!["lo"], "{interfaces}");
    let (wrote, _) = docker(&["exec", &container, "sh", "-c", "echo x > /etc/keepd-probe"]);
    assert!(!wrote, "the root filesystem is writable");

    // Data written through the API.
    let email = format!("docker-{}@example.org", common::uuid());
    let mut client = SyncClient::new(daemon.addr());
    client.register(&email, PASSWORD).await.unwrap();
    client.login(&email, PASSWORD).await.unwrap();
    let key = client.create_vault("v", PASSWORD).await.unwrap();
    client.push("v", &key, &entries(5), None).await.unwrap();

    // The container dies: /health says so, then keepd brings it back.
    let (killed, text) = docker(&["kill", &container]);
    assert!(killed, "{text}");
    assert!(
        daemon.wait_health(503, Duration::from_secs(15)),
        "{}",
        daemon.log()
    );
    assert!(
        daemon.wait_health(200, Duration::from_secs(60)),
        "{}",
        daemon.log()
    );
    let metrics = daemon.metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("keepd_postgres_restarts_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );

    // SIGTERM: the container stops, the volume stays.
    stop(&mut daemon);
    let c = inspect(&container).unwrap();
    assert_eq!(c["State"]["Running"], false);
    assert!(docker(&["volume", "inspect", &resources.volume]).0);

    // Started again: the data written before is read back.
    let daemon = node.start();
    healthy(&daemon);
    let mut client = SyncClient::new(daemon.addr());
    client.login(&email, PASSWORD).await.unwrap();
    let pulled = client.pull("v", 0, 100).await.unwrap();
    assert_eq!(pulled.logs.len(), 5);
    assert_eq!(
        key.decrypt_entry(&pulled.logs[4].encrypted_data, &pulled.logs[4].nonce)
            .unwrap(),
        b"entry 4"
    );

    // A container keepd did not label was never touched.
    assert!(
        inspect(&unrelated).is_some(),
        "keepd touched an unrelated container"
    );
    docker(&["rm", "-f", &unrelated]);
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_adopts_config_change_recreates_foreign_name_is_refused() {
    if !engine_ready() {
        return;
    }
    let node = docker_node();
    let mut daemon = node.start();
    let mut cleanup = Cleanup(None);
    let node_id = healthy(&daemon);
    cleanup.0 = Some(node_id.clone());
    let container = DockerNames::for_node(&node_id).container;
    let first = inspect(&container).unwrap();

    // keepd killed: its container keeps running and is adopted.
    daemon.signal(Signal::SIGKILL);
    daemon.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(inspect(&container).unwrap()["State"]["Running"], true);
    let mut daemon = node.start();
    healthy(&daemon);
    assert!(
        daemon
            .wait_for_log(
                "docker: adopting the existing container",
                Duration::from_secs(5)
            )
            .is_some(),
        "{}",
        daemon.log()
    );
    assert_eq!(inspect(&container).unwrap()["Id"], first["Id"]);
    stop(&mut daemon);

    // A changed rendered configuration: the container is recreated.
    node.set("database.postgres.max_connections", 120);
    let mut daemon = node.start();
    healthy(&daemon);
    let recreated = inspect(&container).unwrap();
    assert_ne!(recreated["Id"], first["Id"]);
    assert_ne!(
        recreated["Config"]["Labels"]["io.keepd.config-hash"],
        first["Config"]["Labels"]["io.keepd.config-hash"]
    );
    stop(&mut daemon);

    // A container of the same name that keepd did not create: refused.
    docker(&["rm", "-f", &container]);
    let (created, text) = docker(&["create", "--name", &container, IMAGE, "true"]);
    assert!(created, "{text}");
    let mut refused = node.spawn();
    let status = refused
        .wait_exit(Duration::from_secs(60))
        .expect("keepd exits");
    assert_eq!(status.code(), Some(1), "{}", refused.log());
    assert!(
        refused.log().contains("keepd did not create it"),
        "{}",
        refused.log()
    );
    let foreign = inspect(&container).expect("the foreign container is left alone");
    assert!(foreign["Config"]["Labels"]["io.keepd.node-id"].is_null());
}

#[tokio::test(flavor = "multi_thread")]
async fn internal_network_mode_serves_over_tls_only() {
    if !engine_ready() {
        return;
    }
    // With backups: pgBackRest inside reaches the server over a socket on
    // the container's tmpfs, which the host never sees.
    let repo = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        repo.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let node = docker_node_with(json!({
        "network": {"use_unix_socket": false},
        "backup": {"repository": repo.path().join("repo")},
    }));
    let daemon = node.start();
    let mut cleanup = Cleanup(None);
    let node_id = healthy(&daemon);
    cleanup.0 = Some(node_id.clone());
    let DockerNames {
        container,
        network: network_name,
        ..
    } = DockerNames::for_node(&node_id);

    let network = inspect(&network_name).expect("keepd's internal network");
    assert_eq!(network["Internal"], true);
    assert_eq!(
        network["Options"]["com.docker.network.bridge.enable_ip_masquerade"],
        "false"
    );
    assert_eq!(network["Labels"]["io.keepd.node-id"], node_id.as_str());
    let c = inspect(&container).unwrap();
    assert_eq!(c["HostConfig"]["NetworkMode"], network_name.as_str());
    assert_eq!(c["HostConfig"]["CapDrop"], serde_json::json!(["ALL"]));
    assert_eq!(c["HostConfig"]["ReadonlyRootfs"], true);
    assert!(
        c["HostConfig"]["PortBindings"]
            .as_object()
            .is_none_or(|p| p.is_empty())
    );
    let address = c["NetworkSettings"]["Networks"][&network_name]["IPAddress"]
        .as_str()
        .unwrap()
        .to_string();

    // The API works through it.
    let mut client = SyncClient::new(daemon.addr());
    let email = format!("net-{}@example.org", common::uuid());
    client.register(&email, PASSWORD).await.unwrap();
    client.login(&email, PASSWORD).await.unwrap();
    client.create_vault("v", PASSWORD).await.unwrap();

    // From the host: without TLS refused; with keepd's certificate, TLS 1.3.
    let password = node.credentials().superuser.expose().to_string();
    let mut plain = tokio_postgres::Config::new();
    plain
        .host(&address)
        .port(5432)
        .user("keepd_superuser")
        .password(&password)
        .dbname("keepd")
        .connect_timeout(Duration::from_secs(5));
    let refused = plain
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("plain refused");
    assert_eq!(
        refused.code().map(|c| c.code()),
        Some("28000"),
        "{refused:?}"
    );
    let out = node
        .command(&[
            "psql",
            "--",
            "-XAtc",
            "SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "TLSv1.3");
    // The superuser over the internal network, client certificate only.
    let check = node.report_check("roles.superuser");
    assert_eq!(check["status"], "pass", "{check}");
    assert!(
        check["value"].as_str().unwrap().contains("samenet"),
        "{check}"
    );
}

#[test]
fn an_absent_image_that_cannot_be_pulled_names_the_setting() {
    if !engine_ready() {
        return;
    }
    let node = TestNode::with(json!({"database": {"postgres": {
        "provider": "docker",
        "docker": {"image": "keepd-absent-image:never"},
    }}}));
    let mut daemon = node.spawn();
    let status = daemon
        .wait_exit(Duration::from_secs(120))
        .expect("keepd exits");
    assert_eq!(status.code(), Some(1), "{}", daemon.log());
    let log = daemon.log();
    assert!(
        log.contains("keepd-absent-image:never")
            && log.contains("pulling it failed")
            && log.contains("database.postgres.docker.image"),
        "{log}"
    );
    assert!(log.contains("docker: image absent, pulling it"), "{log}");
}

/// Backups on the docker provider: WAL archived and backups taken by the
/// pgBackRest inside the container (the image carries it) into a
/// repository bind-mounted from the host; a stopped node restored to a
/// moment through a one-off container, then the server container's
/// replay; the audit trail names the restore.
#[tokio::test(flavor = "multi_thread")]
async fn backups_run_in_the_container_and_a_stopped_node_restores_to_a_moment() {
    if !engine_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let repository = dir.path().join("repo");
    let node = docker_node_with(json!({"backup": {"repository": repository}}));
    let mut daemon = node.start();
    let mut cleanup = Cleanup(None);
    cleanup.0 = Some(healthy(&daemon));
    let mut client = SyncClient::new(daemon.addr());
    client
        .register("dockerbackup@example.org", PASSWORD)
        .await
        .unwrap();
    client
        .login("dockerbackup@example.org", PASSWORD)
        .await
        .unwrap();
    let key = client.create_vault("v", PASSWORD).await.unwrap();
    client
        .push("v", &key, &common::labelled(&["a1", "a2"]), None)
        .await
        .unwrap();
    let first = common::wait_until(Duration::from_secs(90), || {
        (node.report_check("backup")["status"] == "pass").then_some(())
    });
    assert!(first.is_some(), "{}", daemon.log());
    let (code, list) = node.run(&["backup", "list", "--json"]);
    assert_eq!(code, 0, "{list}");
    assert!(list.contains("\"type\":\"full\""), "{list}");
    let (code, text) = node.run(&["backup", "verify"]);
    assert_eq!(code, 0, "{text}");
    // The archive is on the host, written by the container's user.
    assert!(repository.join("archive/keepd").is_dir());

    let moment = node.restore_moment();
    client
        .push("v", &key, &common::labelled(&["b1"]), None)
        .await
        .unwrap();
    let token = client.token().unwrap().to_string();
    stop(&mut daemon);

    let (code, text) = node.run(&["restore", "--to", &moment]);
    assert_eq!(code, 0, "{text}");
    let daemon = node.start();
    healthy(&daemon);
    let mut again = SyncClient::new(daemon.addr());
    again.set_token(Some(token));
    let page = again.pull("v", 0, 100).await.unwrap();
    let labels: Vec<String> = page
        .logs
        .iter()
        .map(|e| {
            String::from_utf8(key.decrypt_entry(&e.encrypted_data, &e.nonce).unwrap()).unwrap()
        })
        .collect();
    assert_eq!(
        labels,
        ["a1", "a2"],
        "exactly what was acknowledged up to {moment}"
    );
    let verified = common::wait_until(Duration::from_secs(20), || {
        let (code, text) = node.audit_verify();
        (code == 0 && text.contains("restored from a backup")).then_some(text)
    });
    assert!(verified.is_some(), "{}", node.audit_verify().1);
}
