//! A real HA Postgres: etcd and two Patroni members (a primary and a
//! synchronous standby) on loopback, two keepd nodes on it through
//! `external.hosts`. The primary fails (its postmaster killed; then its
//! Patroni stopped) under a push load: Patroni promotes the standby, keepd
//! follows, the 503s end within seconds, and every acknowledged entry is
//! there afterwards, gap-free.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{TestNode, wait_until};
use keepd::client::{ClientError, SyncClient, VaultKey};
use serde_json::json;

const PATRONI: &str = "/opt/keepd-test/patroni/bin/patroni";
const ADMIN_PASSWORD: &str = "ha admin password";

/// A child process killed (SIGKILL) when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Member {
    name: String,
    pg_port: u16,
    api_port: u16,
    data_dir: PathBuf,
    config: PathBuf,
    patroni: Option<Process>,
}

struct HaCluster {
    dir: tempfile::TempDir,
    _etcd: Process,
    members: Vec<Member>,
    ca_file: PathBuf,
    password_file: PathBuf,
}

impl Drop for HaCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            member.patroni.take();
            // Patroni killed: stop the Postgres it left running.
            if let Some(pid) = common::postmaster_pid(&member.data_dir) {
                common::kill(pid, nix::sys::signal::Signal::SIGQUIT);
            }
        }
        let _ = &self.dir;
    }
}

fn nobody() -> nix::unistd::User {
    nix::unistd::User::from_name("nobody").unwrap().unwrap()
}

fn own(path: &Path) {
    let nobody = nobody();
    nix::unistd::chown(path, Some(nobody.uid), Some(nobody.gid)).unwrap();
}

fn start_etcd(dir: &Path) -> (Process, u16) {
    let (client, peer) = (common::free_port(), common::free_port());
    let child = Command::new("etcd")
        .args(["--name", "keepd-test"])
        .arg("--data-dir")
        .arg(dir.join("etcd"))
        .args([
            "--listen-client-urls",
            &format!("http://127.0.0.1:{client}"),
        ])
        .args([
            "--advertise-client-urls",
            &format!("http://127.0.0.1:{client}"),
        ])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args([
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
        ])
        .args([
            "--initial-cluster",
            &format!("keepd-test=http://127.0.0.1:{peer}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd (Debian's etcd-server; scripts/install-deps.sh installs it)");
    let up = wait_until(Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", client)).ok()
    });
    assert!(up.is_some(), "etcd did not start");
    (Process(child), client)
}

fn patroni_config(dir: &Path, member: &Member, etcd: u16, bin: &Path, tls: &Path) -> String {
    format!(
        "scope: keepd-ha
name: {name}
restapi:
  listen: 127.0.0.1:{api}
  connect_address: 127.0.0.1:{api}
etcd3:
  hosts: 127.0.0.1:{etcd}
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 1
    retry_timeout: 4
    primary_start_timeout: 0
    synchronous_mode: true
    postgresql:
      use_pg_rewind: true
      parameters:
        wal_level: replica
        hot_standby: 'on'
        wal_log_hints: 'on'
        max_wal_senders: 5
        max_replication_slots: 5
        ssl: 'on'
        ssl_cert_file: {tls}/server.crt
        ssl_key_file: {tls}/server.key
  initdb:
    - encoding: UTF8
    - no-locale
    - data-checksums
    - auth: scram-sha-256
postgresql:
  listen: 127.0.0.1:{pg}
  connect_address: 127.0.0.1:{pg}
  data_dir: {data}
  bin_dir: {bin}
  pgpass: {dir}/{name}.pgpass
  authentication:
    superuser:
      username: postgres
      password: {ADMIN_PASSWORD}
    replication:
      username: replicator
      password: replication password
    rewind:
      username: postgres
      password: {ADMIN_PASSWORD}
  parameters:
    unix_socket_directories: {dir}/{name}-sock
  pg_hba:
    - local all all scram-sha-256
    - hostssl all all 127.0.0.1/32 scram-sha-256
    - host all postgres 127.0.0.1/32 scram-sha-256
    - host replication replicator 127.0.0.1/32 scram-sha-256
",
        name = member.name,
        dir = dir.display(),
        api = member.api_port,
        pg = member.pg_port,
        data = member.data_dir.display(),
        bin = bin.display(),
        tls = tls.display(),
    )
}

fn spawn_patroni(member: &mut Member, dir: &Path) {
    let nobody = nobody();
    let log = std::fs::File::create(dir.join(format!("{}.out", member.name))).unwrap();
    let child = Command::new(PATRONI)
        .arg(&member.config)
        .env("HOME", dir)
        .uid(nobody.uid.as_raw())
        .gid(nobody.gid.as_raw())
        .current_dir(dir)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{PATRONI}: {e} (scripts/install-deps.sh installs Patroni there)")
        });
    member.patroni = Some(Process(child));
}

/// The member's role as its Patroni REST API says (`primary`, `replica`).
fn role(member: &Member) -> Option<String> {
    let (code, body) = common::http_get(
        format!("127.0.0.1:{}", member.api_port).parse().unwrap(),
        "/patroni",
    )?;
    (code == 200).then(|| body["role"].as_str().map(str::to_string))?
}

fn sync_standby(members: &[Member]) -> Option<usize> {
    let primary = members
        .iter()
        .position(|m| role(m).as_deref() == Some("primary"))?;
    let (code, body) = common::http_get(
        format!("127.0.0.1:{}", members[primary].api_port)
            .parse()
            .unwrap(),
        "/cluster",
    )?;
    if code != 200 {
        return None;
    }
    let sync = body["members"]
        .as_array()?
        .iter()
        .find(|m| m["role"] == "sync_standby" && m["state"] == "streaming")?;
    members
        .iter()
        .position(|m| sync["name"].as_str() == Some(m.name.as_str()))
}

fn start_cluster() -> HaCluster {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    own(dir.path());
    let (etcd, etcd_port) = start_etcd(dir.path());
    let bin = keepd::postgres::native::PgBinaries::locate(None, None)
        .unwrap()
        .dir;
    let tls = dir.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    own(&tls);
    let ca_file = common::server_tls(dir.path(), &tls, own);
    let password_file = dir.path().join("admin.password");
    std::fs::write(&password_file, format!("{ADMIN_PASSWORD}\n")).unwrap();
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    let mut members = Vec::new();
    for name in ["pg1", "pg2"] {
        let member = Member {
            name: name.into(),
            pg_port: common::free_port(),
            api_port: common::free_port(),
            data_dir: dir.path().join(name),
            config: dir.path().join(format!("{name}.yaml")),
            patroni: None,
        };
        let socket_dir = dir.path().join(format!("{name}-sock"));
        std::fs::create_dir(&socket_dir).unwrap();
        own(&socket_dir);
        std::fs::write(
            &member.config,
            patroni_config(dir.path(), &member, etcd_port, &bin, &tls),
        )
        .unwrap();
        own(&member.config);
        members.push(member);
    }
    // The first bootstraps and becomes primary; the second joins it.
    spawn_patroni(&mut members[0], dir.path());
    let primary = wait_until(Duration::from_secs(60), || {
        (role(&members[0]).as_deref() == Some("primary")).then_some(())
    });
    assert!(primary.is_some(), "{}", patroni_logs(dir.path()));
    spawn_patroni(&mut members[1], dir.path());
    let synced = wait_until(Duration::from_secs(60), || sync_standby(&members));
    assert_eq!(synced, Some(1), "{}", patroni_logs(dir.path()));
    HaCluster {
        dir,
        _etcd: etcd,
        members,
        ca_file,
        password_file,
    }
}

fn patroni_logs(dir: &Path) -> String {
    ["pg1", "pg2"]
        .iter()
        .map(|n| std::fs::read_to_string(dir.join(format!("{n}.out"))).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

fn keepd_node(cluster: &HaCluster) -> TestNode {
    let hosts: Vec<String> = cluster
        .members
        .iter()
        .map(|m| format!("127.0.0.1:{}", m.pg_port))
        .collect();
    let node = TestNode::with(common::unlimited_rates());
    node.merge(json!({"database": {"postgres": {
        "provider": "external",
        "external": {
            "hosts": hosts,
            "admin_password_file": cluster.password_file,
            "ca_file": cluster.ca_file,
        },
    }}}));
    node
}

/// What a push load saw.
#[derive(Default)]
struct Outcome {
    /// Labels of acknowledged entries.
    acknowledged: Vec<String>,
    /// Answers that were neither success nor 503 (nor a transport error
    /// from a node mid-switch): must be none.
    wrong: Vec<String>,
    /// The longest time between two acknowledged pushes.
    longest_gap: Duration,
    refused: usize,
}

/// Pushers alternating between the keepd nodes until `stop`, each push
/// retried with its Idempotency-Key until acknowledged.
async fn push_load(
    tag: &'static str,
    addrs: Vec<std::net::SocketAddr>,
    token: String,
    key: Arc<VaultKey>,
    stop: Arc<AtomicBool>,
) -> Outcome {
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (addrs, token, key, stop) = (addrs.clone(), token.clone(), key.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut outcome = Outcome::default();
            let mut last = Instant::now();
            let mut b = 0;
            while !stop.load(Ordering::Relaxed) {
                let labels: Vec<String> = (0..5).map(|e| format!("{tag}-w{w}-b{b}-e{e}")).collect();
                let sealed = SyncClient::seal_push("ha", &key, &common::labelled(&labels)).unwrap();
                let idempotency = common::uuid();
                let mut attempt = 0usize;
                loop {
                    let mut client = SyncClient::new(addrs[(w + attempt) % addrs.len()]);
                    client.set_token(Some(token.clone()));
                    match client.push_sealed(&sealed, Some(&idempotency)).await {
                        Ok(_) => break,
                        Err(ClientError::Api { status: 503, .. }) => outcome.refused += 1,
                        Err(ClientError::Transport { .. }) => {}
                        Err(e) => outcome.wrong.push(e.to_string()),
                    }
                    attempt += 1;
                    assert!(attempt < 600, "a push was never acknowledged");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                outcome.longest_gap = outcome.longest_gap.max(last.elapsed());
                last = Instant::now();
                outcome.acknowledged.extend(labels);
                b += 1;
            }
            outcome
        }));
    }
    let mut all = Outcome::default();
    for task in tasks {
        let o = task.await.unwrap();
        all.acknowledged.extend(o.acknowledged);
        all.wrong.extend(o.wrong);
        all.longest_gap = all.longest_gap.max(o.longest_gap);
        all.refused += o.refused;
    }
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn keepd_follows_a_patroni_failover_and_loses_nothing() {
    if !(common::require_tool("etcd", "Debian's etcd-server")
        && common::require_file(PATRONI, "Patroni (PyPI, in /opt/keepd-test/patroni)"))
    {
        return;
    }
    let mut cluster = start_cluster();
    let nodes = [keepd_node(&cluster), keepd_node(&cluster)];
    let first = nodes[0].start_healthy();
    let second = nodes[1].start();
    let id = keepd::identity::NodeIdentity::load(&nodes[1].state_dir().join("identity.key"))
        .unwrap()
        .node_id()
        .to_string();
    let admitted = wait_until(Duration::from_secs(30), || {
        let out = nodes[0]
            .command(&["cluster", "admit", &id])
            .output()
            .unwrap();
        out.status.success().then_some(())
    });
    assert!(admitted.is_some(), "{}", second.log());
    assert!(
        second.wait_health(200, Duration::from_secs(20)),
        "{}",
        second.log()
    );
    let addrs = vec![first.addr(), second.addr()];

    let email = format!("ha-{}@example.org", common::uuid());
    let mut client = SyncClient::new(addrs[0]);
    client.register(&email, "a long password").await.unwrap();
    client.login(&email, "a long password").await.unwrap();
    let key = Arc::new(client.create_vault("ha", "a long password").await.unwrap());
    let token = client.token().unwrap().to_string();

    let mut report = Vec::new();
    for (tag, case) in [("kill", "postmaster killed"), ("stop", "Patroni stopped")] {
        let primary = cluster
            .members
            .iter()
            .position(|m| role(m).as_deref() == Some("primary"))
            .expect("a primary");
        let stop = Arc::new(AtomicBool::new(false));
        let load = tokio::spawn(push_load(
            tag,
            addrs.clone(),
            token.clone(),
            key.clone(),
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let failed_at = Instant::now();
        let member = &mut cluster.members[primary];
        match case {
            "postmaster killed" => {
                let pid =
                    common::postmaster_pid(&member.data_dir).expect("the primary's postmaster");
                common::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
            _ => {
                let patroni = member.patroni.as_ref().unwrap().0.id();
                common::kill(patroni as i32, nix::sys::signal::Signal::SIGTERM);
            }
        }
        let other = 1 - primary;
        let promoted = wait_until(Duration::from_secs(60), || {
            (role(&cluster.members[other]).as_deref() == Some("primary")).then_some(())
        });
        assert!(promoted.is_some(), "{}", patroni_logs(cluster.dir.path()));
        let promoted_after = failed_at.elapsed();
        // Pushes go on after the switch, then stop.
        tokio::time::sleep(Duration::from_secs(4)).await;
        stop.store(true, Ordering::Relaxed);
        let outcome = load.await.unwrap();
        assert!(outcome.wrong.is_empty(), "{case}: {:?}", outcome.wrong);
        assert!(
            outcome.longest_gap < Duration::from_secs(20),
            "{case}: no push acknowledged for {:?}",
            outcome.longest_gap
        );
        report.push(format!(
            "{case}: standby promoted after {promoted_after:.1?}, longest gap between acknowledged \
             pushes {:.1?}, {} refusals (503), {} entries acknowledged",
            outcome.longest_gap,
            outcome.refused,
            outcome.acknowledged.len()
        ));

        // Every acknowledged entry is there, once, gap-free.
        let (sequences, labels) = common::pull_all(&client, &key, "ha").await;
        assert_eq!(sequences, (1..=sequences.len() as i64).collect::<Vec<_>>());
        for label in &outcome.acknowledged {
            assert_eq!(
                labels.iter().filter(|l| *l == label).count(),
                1,
                "{case}: {label} lost or stored twice"
            );
        }

        // The failed member rejoins as a standby for the next case.
        let member = &mut cluster.members[primary];
        if member.patroni.is_none() || case == "Patroni stopped" {
            member.patroni.take();
            spawn_patroni(member, cluster.dir.path());
        }
        let rejoined = wait_until(Duration::from_secs(90), || sync_standby(&cluster.members));
        assert_eq!(
            rejoined,
            Some(primary),
            "{}",
            patroni_logs(cluster.dir.path())
        );
    }
    for daemon in [&first, &second] {
        assert!(
            daemon.wait_health(200, Duration::from_secs(10)),
            "{}",
            daemon.log()
        );
    }
    eprintln!("measured:\n{}", report.join("\n"));
}
