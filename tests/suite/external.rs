//! The external provider: two keepd nodes on one Postgres the test suite
//! starts itself (TLS with its own CA, a password-protected superuser).

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{TestNode, wait_until};
use keepd::client::{LogEntry, SyncClient};
use serde_json::{Value, json};

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

    let ca_file = common::server_tls(dir.path(), &data, own);
    std::fs::write(
        data.join("pg_hba.conf"),
        "hostssl all all 127.0.0.1/32 scram-sha-256\n",
    )
    .unwrap();
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
    external_node_with(server, common::unlimited_rates())
}

/// A node of `server`, merged with `overlay`.
fn external_node_with(server: &ExternalPostgres, overlay: Value) -> TestNode {
    // Field encryption on: a column one node seals, another must open.
    let node = TestNode::with(json!({
        "database": {"postgres": {
            "provider": "external",
            "external": {
                "host": "127.0.0.1",
                "port": server.port,
                "admin_password_file": server.password_file,
                "ca_file": server.ca_file,
            },
        }},
        "credentials": {"rotation_grace_period": "2s"},
        "encryption_at_rest": {
            "enabled": true,
            "method": "application",
            "application": {"encrypted_fields": [
                {"table": "sync_logs", "columns": ["encrypted_data"]},
            ]},
        },
    }));
    node.merge(overlay);
    node
}

/// `n` admitted nodes on `server`: the first founds the cluster, each
/// other waits until the founder admits it.
fn start_cluster(
    server: &ExternalPostgres,
    n: usize,
    overlay: Value,
) -> (Vec<TestNode>, Vec<common::Daemon>) {
    let nodes: Vec<TestNode> = (0..n)
        .map(|_| external_node_with(server, overlay.clone()))
        .collect();
    let mut daemons = vec![nodes[0].start_healthy()];
    for node in &nodes[1..] {
        let daemon = node.start();
        let pending = wait_until(Duration::from_secs(60), || {
            matches!(health_status(&daemon), Some((503, s)) if s == "pending").then_some(())
        });
        assert!(pending.is_some(), "{}", daemon.log());
        let id = identity(node).node_id().to_string();
        let (code, text) = cluster(&nodes[0], &["admit", &id]);
        assert_eq!(code, 0, "{text}");
        assert!(
            daemon.wait_health(200, Duration::from_secs(30)),
            "{}",
            daemon.log()
        );
        daemons.push(daemon);
    }
    (nodes, daemons)
}

/// A stream opened on one node and a session ended on another: the
/// stream ends within seconds with a final event naming why.
async fn stream_ends_across_nodes(
    end: impl AsyncFnOnce(&mut SyncClient, &TestNode, &str),
    reason: &str,
) {
    let server = start_external();
    let (nodes, daemons) = start_cluster(&server, 2, common::unlimited_rates());
    let email = format!("user-{}@example.org", common::uuid());
    let mut watcher = SyncClient::new(daemons[0].addr());
    watcher
        .register(&email, "correct horse battery")
        .await
        .unwrap();
    watcher
        .login(&email, "correct horse battery")
        .await
        .unwrap();
    watcher
        .create_vault("v", "correct horse battery")
        .await
        .unwrap();
    let mut stream = watcher.events("v", None).await.unwrap();
    assert_eq!(
        stream.next().await.unwrap().unwrap().sequence,
        0,
        "the head"
    );
    // The same session, used on the other node.
    let mut other = SyncClient::new(daemons[1].addr());
    other.set_token(watcher.token().map(str::to_string));
    let started = std::time::Instant::now();
    end(&mut other, &nodes[1], &email).await;
    let ended = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the stream ended within 10 s");
    assert!(matches!(ended, Ok(None)), "{ended:?}");
    assert_eq!(stream.end_reason(), Some(reason));
    eprintln!(
        "stream ended {:?} after the session ended ({reason})",
        started.elapsed()
    );
    // A new stream with the old token is refused.
    let again = watcher.events("v", None).await.err().expect("refused");
    assert_eq!(again.status(), Some(401), "{again}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_ends_when_its_session_logs_out_on_another_node() {
    stream_ends_across_nodes(
        async |client, _, _| client.logout().await.unwrap(),
        "logout",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_ends_when_the_password_changes_on_another_node() {
    stream_ends_across_nodes(
        async |client, _, email| {
            client
                .change_password(email, "correct horse battery", "another long password")
                .await
                .unwrap()
        },
        "password_changed",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_ends_when_its_account_is_disabled_on_another_node() {
    stream_ends_across_nodes(
        async |_, node, email| {
            let (code, text) = node.run(&["account", "disable", email]);
            assert_eq!(code, 0, "{text}");
        },
        "account_disabled",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_ends_when_its_account_is_deleted_on_another_node() {
    stream_ends_across_nodes(
        async |client, _, email| {
            client
                .delete_account(email, "correct horse battery")
                .await
                .unwrap()
        },
        "account_deleted",
    )
    .await;
}

/// Three nodes share one account's budget: its accepted requests over all
/// three stay within 25 % of `account_per_second`.
/// An OPAQUE login started on one node finishes on the other: the setup
/// comes from the cluster key, the state from the database.
#[tokio::test(flavor = "multi_thread")]
async fn an_opaque_login_started_on_one_node_finishes_on_another() {
    use keepd::client::opaque::Login;
    let server = start_external();
    let (_nodes, daemons) = start_cluster(&server, 2, common::unlimited_rates());
    let email = format!("user-{}@example.org", common::uuid());
    let password = "correct horse battery";
    SyncClient::new(daemons[0].addr())
        .register(&email, password)
        .await
        .unwrap();
    let post = async |addr, path: &str, body: Value| {
        let answer = SyncClient::new(addr)
            .send(
                hyper::Method::POST,
                path,
                &[],
                Some(body.to_string().into_bytes()),
            )
            .await
            .unwrap();
        (answer.status, answer.body)
    };
    let (login, request) = Login::start(password).unwrap();
    let (status, started) = post(
        daemons[1].addr(),
        "/auth/opaque/login/start",
        json!({"email": email, "credentialRequest": request}),
    )
    .await;
    assert_eq!(status, 200, "{started}");
    let finished = login
        .finish(password, &started["credentialResponse"])
        .unwrap()
        .expect("node 1 answered with node 0's record");
    let (status, answer) = post(
        daemons[0].addr(),
        "/auth/opaque/login/finish",
        json!({"email": email, "loginId": started["loginId"],
               "credentialFinalization": finished.finalization}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["token"].is_string());
}

/// 60 wrong logins at one instant, from 60 addresses, half to each of two
/// nodes: every node counts every attempt before checking it.
#[tokio::test(flavor = "multi_thread")]
async fn wrong_logins_at_once_across_two_nodes_cost_one_attempt_each() {
    let server = start_external();
    let mut overlay = common::unlimited_rates();
    overlay["api"]["trusted_proxies"] = json!(["127.0.0.1"]);
    overlay["api"]["rate_limits"]["login_failures_free"] = json!(5);
    let (_nodes, daemons) = start_cluster(&server, 2, overlay);
    let email = format!("user-{}@example.org", common::uuid());
    SyncClient::new(daemons[0].addr())
        .register(&email, "correct horse battery")
        .await
        .unwrap();
    let clients = (0..8)
        .map(|i| SyncClient::new(daemons[i % 2].addr()))
        .collect();
    let (checked, held) = common::wrong_logins_at_once(clients, &email, 60).await;
    assert!(checked <= 5 + 1, "{checked} of 60 guesses were checked");
    assert_eq!(checked + held, 60);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_accounts_rate_holds_across_three_nodes() {
    let server = start_external();
    let mut rates = common::unlimited_rates();
    common::config::merge(
        &mut rates,
        json!({"api": {"rate_limits": {"account_per_second": 30, "account_burst": 3}}}),
    );
    let (_nodes, daemons) = start_cluster(&server, 3, rates);
    // Each node has seen the other two beat.
    for daemon in &daemons {
        let seen = wait_until(Duration::from_secs(30), || {
            daemon
                .log()
                .lines()
                .rev()
                .find_map(|line| {
                    let event: serde_json::Value = serde_json::from_str(line).ok()?;
                    (event["message"] == "cluster: live nodes share the per-account rate budget")
                        .then(|| event["nodes"].as_u64())?
                })
                .filter(|n| *n == 3)
        });
        assert!(seen.is_some(), "{}", daemon.log());
    }
    let email = format!("user-{}@example.org", common::uuid());
    let mut first = SyncClient::new(daemons[0].addr());
    first
        .register(&email, "correct horse battery")
        .await
        .unwrap();
    first.login(&email, "correct horse battery").await.unwrap();
    let token = first.token().unwrap().to_string();
    // Eight workers per node for 6 s, as fast as answers come.
    let seconds = 6.0;
    let end = std::time::Instant::now() + Duration::from_secs_f64(seconds);
    let accepted = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for daemon in &daemons {
        for _ in 0..8 {
            let mut client = SyncClient::new(daemon.addr());
            client.set_token(Some(token.clone()));
            let (accepted, refused) = (accepted.clone(), refused.clone());
            workers.spawn(async move {
                while std::time::Instant::now() < end {
                    match client.account().await {
                        Ok(_) => accepted.fetch_add(1, Ordering::Relaxed),
                        Err(e) if e.status() == Some(429) => {
                            refused.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(e) => panic!("{e}"),
                    };
                }
            });
        }
    }
    while let Some(done) = workers.join_next().await {
        done.unwrap();
    }
    let accepted = accepted.load(Ordering::Relaxed) as f64;
    let rate = accepted / seconds;
    eprintln!(
        "one account over three nodes: {accepted} accepted in {seconds} s = {rate:.1}/s \
         (account_per_second 30), {} refused",
        refused.load(Ordering::Relaxed)
    );
    assert!((22.5..=37.5).contains(&rate), "{rate:.1}/s");
}

/// Rows of `sql` on the external server's keepd database, as its admin.
fn admin_rows(node: &TestNode, sql: &str) -> Vec<String> {
    node.psql("superuser", sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .lines()
        .map(str::to_string)
        .collect()
}

fn identity(node: &TestNode) -> keepd::identity::NodeIdentity {
    keepd::identity::NodeIdentity::load(&node.state_dir().join("identity.key")).unwrap()
}

/// `keepd cluster ARGS` on `node`: (exit code, stdout + stderr).
fn cluster(node: &TestNode, args: &[&str]) -> (i32, String) {
    node.run(&[&["cluster"], args].concat())
}

fn health_status(daemon: &common::Daemon) -> Option<(u16, String)> {
    let (code, body) = daemon.get("/health")?;
    Some((
        code,
        body["status"].as_str().unwrap_or_default().to_string(),
    ))
}

/// `writers` clients, spread over `daemons`, each pushing `batches` batches
/// of `per_batch` entries to `vault` with an Idempotency-Key; a push that
/// fails for want of its node is retried, the same request, on the next
/// node. Returns the labels stored, the failures seen on nodes other than
/// `dying` (which must be none) and how many pushes `dying` failed.
async fn push_load(
    daemons: &[std::net::SocketAddr],
    dying: Option<usize>,
    token: &str,
    key: &Arc<keepd::client::VaultKey>,
    vault: &str,
    (writers, batches, per_batch): (usize, usize, usize),
    done: Arc<AtomicUsize>,
) -> (Vec<String>, Vec<String>, usize) {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let done = done.clone();
        let daemons = daemons.to_vec();
        let token = token.to_string();
        let key = key.clone();
        let vault = vault.to_string();
        tasks.push(tokio::spawn(async move {
            let (mut sent, mut failures, mut lost) = (Vec::new(), Vec::new(), 0);
            for b in 0..batches {
                let labels: Vec<String> =
                    (0..per_batch).map(|e| format!("w{w}-b{b}-e{e}")).collect();
                let sealed =
                    SyncClient::seal_push(&vault, &key, &common::labelled(&labels)).unwrap();
                let idempotency = common::uuid();
                let mut node = w % daemons.len();
                let mut attempts = 0;
                loop {
                    let mut client = SyncClient::new(daemons[node]);
                    client.set_token(Some(token.clone()));
                    match client.push_sealed(&sealed, Some(&idempotency)).await {
                        Ok(_) => break,
                        Err(e) => {
                            if Some(node) == dying {
                                lost += 1;
                            } else {
                                failures.push(format!("node {node}: {e}"));
                            }
                            attempts += 1;
                            assert!(attempts < 20, "push never succeeded: {e}");
                            node = (node + 1) % daemons.len();
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                sent.extend(labels);
                done.fetch_add(1, Ordering::Relaxed);
            }
            (sent, failures, lost)
        }));
    }
    let (mut sent, mut failures, mut lost) = (Vec::new(), Vec::new(), 0);
    for task in tasks {
        let (s, f, l) = task.await.unwrap();
        sent.extend(s);
        failures.extend(f);
        lost += l;
    }
    (sent, failures, lost)
}

/// Three nodes started together on one external server: migrations and
/// grants run once, one node founds the cluster and the others wait, serving
/// nothing, until the operator admits them; keepd installs nothing there.
/// (What the formed cluster serves, a node killed under load and rotation
/// are the tests below, each on a cluster of its own.)
#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_form_one_cluster_over_one_external_server() {
    let server = start_external();
    let nodes = [
        external_node(&server),
        external_node(&server),
        external_node(&server),
    ];
    // Started together: migrations and grants run once, under a lock; the
    // first to find no member founds the cluster, the others wait.
    let daemons: Vec<common::Daemon> = std::thread::scope(|s| {
        let started: Vec<_> = nodes.iter().map(|n| s.spawn(|| n.start())).collect();
        started.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let states = wait_until(Duration::from_secs(60), || {
        let states: Vec<_> = daemons.iter().map(health_status).collect();
        let ok = states
            .iter()
            .filter(|s| matches!(s, Some((200, _))))
            .count();
        let waiting = states
            .iter()
            .filter(|s| matches!(s, Some((503, status)) if status == "pending"))
            .count();
        (ok == 1 && waiting == 2).then_some(states)
    });
    let logs = || {
        daemons
            .iter()
            .map(|d| d.log())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let states = states.unwrap_or_else(|| panic!("one member, two pending expected:\n{}", logs()));
    let founder = states
        .iter()
        .position(|s| matches!(s, Some((200, _))))
        .unwrap();
    let waiting: Vec<usize> = (0..3).filter(|&i| i != founder).collect();
    let ids: Vec<String> = nodes
        .iter()
        .map(|n| identity(n).node_id().to_string())
        .collect();

    // A waiting node serves nothing and says why.
    for &i in &waiting {
        let (code, body) = daemons[i].get("/health").unwrap();
        assert_eq!(code, 503);
        let reason = body["reason"].as_str().unwrap();
        assert!(reason.contains("keepd cluster admit"), "{reason}");
        let mut client = SyncClient::new(daemons[i].addr());
        match client.login("nobody@example.org", "a long password").await {
            Err(keepd::client::ClientError::Api {
                status: 503,
                code,
                retry_after: Some(_),
                ..
            }) => assert_eq!(code, "not_admitted"),
            other => panic!("a pending node answered {other:?}"),
        }
        // Nor can it admit anyone: it holds no key.
        let (code, text) = cluster(&nodes[i], &["admit", &ids[founder]]);
        assert_eq!(code, 1, "{text}");
        assert!(text.contains("not an admitted member"), "{text}");
    }
    // `pending` shows what the waiting nodes' keys are; the operator
    // compares, then admits.
    let (code, pending) = cluster(&nodes[founder], &["pending"]);
    assert_eq!(code, 0, "{pending}");
    for &i in &waiting {
        let fingerprint = keepd::identity::fingerprint(&identity(&nodes[i]).public_key());
        assert!(
            pending.contains(&format!("{}  {fingerprint}  pending since", ids[i])),
            "{pending}"
        );
    }
    assert!(!pending.contains(&ids[founder]), "{pending}");
    let (code, text) = cluster(&nodes[founder], &["admit", "0123456789abcdef"]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("no node 0123456789abcdef is waiting"),
        "{text}"
    );
    for &i in &waiting {
        let (code, text) = cluster(&nodes[founder], &["admit", &ids[i]]);
        assert_eq!(code, 0, "{text}");
    }
    for daemon in &daemons {
        assert!(
            daemon.wait_health(200, Duration::from_secs(20)),
            "{}",
            logs()
        );
    }
    let (code, status) = cluster(&nodes[waiting[0]], &["status"]);
    assert_eq!(code, 0, "{status}");
    for id in &ids {
        assert!(status.contains(id), "{status}");
    }
    assert_eq!(
        status.matches(&format!("by {}", ids[founder])).count(),
        3,
        "{status}"
    );

    // keepd rendered and installed nothing.
    for node in &nodes {
        assert!(!node.data_dir().exists(), "a data directory was created");
    }
    let a = &nodes[0];
    assert_eq!(
        admin_rows(a, "SELECT current_user"),
        vec!["postgres".to_string()],
        "keepd psql reaches the external server as its administrator"
    );
    // Every migration exactly once, though three nodes started together.
    let expected: Vec<String> = keepd::postgres::migrate::MIGRATIONS
        .iter()
        .map(|m| m.version.to_string())
        .collect();
    assert_eq!(
        admin_rows(
            a,
            "SELECT version FROM keepd.schema_migrations ORDER BY version"
        ),
        expected
    );
    let roles = |pattern: &str| {
        admin_rows(
            a,
            &format!("SELECT rolname FROM pg_roles WHERE rolname LIKE '{pattern}' ORDER BY 1"),
        )
    };
    for id in &ids {
        assert_eq!(
            roles(&format!("keepd_{id}_v%")),
            vec![format!("keepd_{id}_v1")]
        );
    }
}

/// One account (a user, `a long password`) registered through node 1 and
/// logged in through node 2: its token.
async fn account_across(addrs: &[std::net::SocketAddr]) -> String {
    let email = format!("cluster-{}@example.org", common::uuid());
    SyncClient::new(addrs[0])
        .register(&email, "a long password")
        .await
        .unwrap();
    let mut two = SyncClient::new(addrs[1]);
    two.login(&email, "a long password").await.unwrap();
    two.token().unwrap().to_string()
}

/// A client of `addr` with `token`.
fn client_with(addr: std::net::SocketAddr, token: &str) -> SyncClient {
    let mut client = SyncClient::new(addr);
    client.set_token(Some(token.to_string()));
    client
}

/// One account across three admitted nodes: registered through 1, logged
/// in through 2, its token used on 3 to push, pulled back through 1 (the
/// entries are sealed at rest by 3 and opened by 1); pushers to one vault
/// spread over the three nodes leave no gap.
#[tokio::test(flavor = "multi_thread")]
async fn one_account_is_served_by_every_node_of_a_cluster() {
    let server = start_external();
    let (nodes, daemons) = start_cluster(&server, 3, common::unlimited_rates());
    let a = &nodes[0];
    let addrs: Vec<_> = daemons.iter().map(|d| d.addr()).collect();
    let token = account_across(&addrs).await;
    let three = client_with(addrs[2], &token);
    let key = three.create_vault("v", "a long password").await.unwrap();
    let entry = LogEntry {
        data: b"from node 3".to_vec(),
        haex_timestamp: "t".into(),
    };
    let one = client_with(addrs[0], &token);
    // A watcher on node 1 hears of the push node 3 commits (LISTEN/NOTIFY
    // through the shared database).
    let mut events = one.events("v", Some(0)).await.unwrap();
    three.push("v", &key, &[entry], None).await.unwrap();
    let heard = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("node 1's stream hears node 3's push")
        .unwrap()
        .unwrap();
    assert_eq!(heard.sequence, 1);
    drop(events);
    let (sequences, labels) = common::pull_all(&one, &key, "v").await;
    assert_eq!(
        (sequences, labels),
        (vec![1], vec!["from node 3".to_string()])
    );
    let sealed = admin_rows(a, "SELECT encrypted_data LIKE 'kf1:%' FROM keepd.sync_logs");
    assert_eq!(sealed, vec!["t".to_string()], "the entry is sealed at rest");

    // Pushers to one vault spread over the three nodes: gap-free.
    let shared = Arc::new(
        three
            .create_vault("shared", "a long password")
            .await
            .unwrap(),
    );
    let (sent, failures, _) = push_load(
        &addrs,
        None,
        &token,
        &shared,
        "shared",
        (6, 8, 5),
        Arc::default(),
    )
    .await;
    assert!(failures.is_empty(), "{failures:?}");
    let (sequences, mut labels) = common::pull_all(&one, &shared, "shared").await;
    assert_eq!(sequences, (1..=240).collect::<Vec<i64>>());
    labels.sort();
    let mut expected = sent;
    expected.sort();
    assert_eq!(labels, expected);
}

/// kill -9 of one of three nodes under load: its clients retry elsewhere
/// with their Idempotency-Keys; nothing is lost or stored twice, and the
/// other nodes fail no request. Removed, the node loses its roles and its
/// sealed key: restarted, it waits to be admitted again.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_killed_under_load_loses_nothing_and_once_removed_waits_again() {
    let server = start_external();
    let (nodes, mut daemons) = start_cluster(&server, 3, common::unlimited_rates());
    let ids: Vec<String> = nodes
        .iter()
        .map(|n| identity(n).node_id().to_string())
        .collect();
    let roles = |pattern: &str| {
        admin_rows(
            &nodes[0],
            &format!("SELECT rolname FROM pg_roles WHERE rolname LIKE '{pattern}' ORDER BY 1"),
        )
    };
    let addrs: Vec<_> = daemons.iter().map(|d| d.addr()).collect();
    let token = account_across(&addrs).await;
    let three = client_with(addrs[2], &token);
    let one = client_with(addrs[0], &token);
    let hot = Arc::new(three.create_vault("hot", "a long password").await.unwrap());
    let done = Arc::new(AtomicUsize::new(0));
    let load = {
        let (addrs, token, hot, done) = (addrs.clone(), token.clone(), hot.clone(), done.clone());
        tokio::spawn(async move {
            push_load(&addrs, Some(2), &token, &hot, "hot", (6, 20, 5), done).await
        })
    };
    // A third of the way through.
    while done.load(Ordering::Relaxed) < 40 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    daemons[2].signal(nix::sys::signal::Signal::SIGKILL);
    let (sent, failures, retried) = load.await.unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(retried > 0, "node 3 was killed after the load ended");
    let (sequences, mut labels) = common::pull_all(&one, &hot, "hot").await;
    assert_eq!(sequences, (1..=600).collect::<Vec<i64>>());
    labels.sort();
    let mut expected = sent;
    expected.sort();
    assert_eq!(labels, expected, "entries lost or stored twice");

    // Removed, node 3 loses its roles and its sealed key: restarted, it
    // waits to be admitted again.
    let (code, text) = cluster(&nodes[0], &["remove", &ids[2]]);
    assert_eq!(code, 0, "{text}");
    assert!(roles(&format!("keepd_{}_v%", ids[2])).is_empty());
    let (code, text) = cluster(&nodes[0], &["remove", &ids[0]]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("cannot remove itself"), "{text}");
    daemons[2].wait_exit(Duration::from_secs(10));
    daemons[2] = nodes[2].start();
    let back = wait_until(Duration::from_secs(30), || {
        health_status(&daemons[2]).filter(|(code, status)| *code == 503 && status == "pending")
    });
    assert!(back.is_some(), "{}", daemons[2].log());
}

/// Rotating one node of a cluster touches only its roles; each node's
/// audit chain verifies with its own key.
#[tokio::test(flavor = "multi_thread")]
async fn rotating_one_node_touches_only_its_roles() {
    let server = start_external();
    let (nodes, daemons) = start_cluster(&server, 2, common::unlimited_rates());
    let a = &nodes[0];
    let ids: Vec<String> = nodes
        .iter()
        .map(|n| identity(n).node_id().to_string())
        .collect();
    let roles = |pattern: &str| {
        admin_rows(
            a,
            &format!("SELECT rolname FROM pg_roles WHERE rolname LIKE '{pattern}' ORDER BY 1"),
        )
    };
    let (ok, message) = a.rotate();
    assert!(ok, "{message}");
    let converged = wait_until(Duration::from_secs(30), || {
        (roles(&format!("keepd_{}_v%", ids[0])) == vec![format!("keepd_{}_v2", ids[0])])
            .then_some(())
    });
    assert!(converged.is_some(), "{:?}", roles("keepd_%"));
    assert_eq!(
        roles(&format!("keepd_{}_v%", ids[1])),
        vec![format!("keepd_{}_v1", ids[1])]
    );
    assert!(daemons[1].wait_health(200, Duration::from_secs(5)));

    // Each node's audit chain verifies with its own key.
    for node in &nodes[..2] {
        let verified = wait_until(Duration::from_secs(20), || {
            let (code, text) = node.audit_verify();
            (code == 0 && text.contains(", 0 entries not yet sealed")).then_some(text)
        });
        assert!(verified.is_some(), "{:?}", node.audit_verify());
    }
}

/// A database a single node used before clusters holds data made with that
/// node's keys: another node may not found the cluster for it.
#[tokio::test(flavor = "multi_thread")]
async fn only_the_node_that_used_the_database_founds_its_cluster() {
    let server = start_external();
    let (a, b) = (external_node(&server), external_node(&server));
    let mut daemon = a.start_healthy();
    daemon.stop();
    // Back to schema v9, as an older keepd left it.
    admin_rows(
        &a,
        "DROP TABLE keepd.cluster_members; DROP TABLE keepd.cluster_join_tokens; \
         DELETE FROM keepd.schema_migrations WHERE version IN (10, 22)",
    );
    std::fs::remove_file(a.state_dir().join("cluster.fingerprint")).unwrap();
    let id_a = identity(&a).node_id().to_string();
    let out = b.command(&["run"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("cannot found the cluster") && text.contains(&id_a),
        "{text}"
    );
    // The node whose data it is founds it; the other then waits.
    let _a = a.start_healthy();
    let b = b.start();
    let pending = wait_until(Duration::from_secs(30), || {
        health_status(&b).filter(|(code, status)| *code == 503 && status == "pending")
    });
    assert!(pending.is_some(), "{}", b.log());
}

/// The cluster key of a removed node, as the node itself could open it
/// from its row before the removal.
fn sealed_cluster_key(node: &TestNode) -> keepd::cluster::ClusterKey {
    let id = identity(node);
    let sealed = admin_rows(
        node,
        &format!(
            "SELECT encode(sealed_key, 'hex') FROM keepd.cluster_members WHERE node_id = '{}'",
            id.node_id()
        ),
    );
    let sealed = hex::decode(&sealed[0]).unwrap();
    let (_, plain) = keepd::secrets::seal::open(&id, &sealed).unwrap();
    keepd::cluster::ClusterKey::from_bytes(&plain).unwrap()
}

/// `keepd cluster rotate-key` under load on three nodes, one of them
/// removed first: no request fails, tokens from before work until they
/// expire, accounts from before log in (password and OPAQUE), sealed
/// fields move to a key of the new root and stay readable, every chain
/// verifies, and what the removed node can mint stops working once the
/// previous root's tokens have expired.
#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_key_rotates_under_load_and_a_removed_node_is_locked_out() {
    let server = start_external();
    let overlay = common::config::merged([
        common::unlimited_rates(),
        json!({"api": {"jwt_ttl": "60s"}}),
    ]);
    let (nodes, mut daemons) = start_cluster(&server, 3, overlay);
    let addrs: Vec<_> = daemons.iter().map(|d| d.addr()).collect();
    let password = "a long password";
    let opaque_email = format!("opaque-{}@example.org", common::uuid());
    let mut opaque = SyncClient::new(addrs[0]);
    opaque.register(&opaque_email, password).await.unwrap();
    opaque.login(&opaque_email, password).await.unwrap();
    let token = opaque.token().unwrap().to_string();
    let key = Arc::new(opaque.create_vault("v", password).await.unwrap());
    let before = common::labelled(&["before the rotation".to_string()]);
    opaque.push("v", &key, &before, None).await.unwrap();
    let password_email = format!("password-{}@example.org", common::uuid());
    SyncClient::new(addrs[1])
        .register_with_password(&password_email, password)
        .await
        .unwrap();

    // Node 3 leaves; what it knows mints a token for a day.
    let removed = sealed_cluster_key(&nodes[2]);
    daemons[2].stop();
    let removed_id = identity(&nodes[2]).node_id().to_string();
    let (code, text) = cluster(&nodes[0], &["remove", &removed_id]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("keepd cluster rotate-key"), "{text}");
    let minted =
        keepd::tokens::TokenIssuer::new(&removed, &removed_id, Duration::from_secs(86_400));
    minted.issue_under_current();
    let (user, session) = session_of(&token);
    let (forged, _) = minted.issue(user, session);
    assert!(
        client_with(addrs[0], &forged)
            .pull("v", 0, 10)
            .await
            .is_ok(),
        "its token works before"
    );
    let check = nodes[0].report_check("cluster.key");
    assert_eq!(check["status"], "warn", "{check}");
    assert!(
        check["value"].as_str().unwrap().contains(&removed_id),
        "{check}"
    );
    // As if the removed node still ran: it beats with the old generation,
    // and is neither counted nor waited for.
    admin_rows(
        &nodes[0],
        &format!(
            "INSERT INTO keepd.cluster_liveness (node_id, seen_at, key_generation) \
             VALUES ('{removed_id}', now() + interval '1 hour', 1) \
             ON CONFLICT (node_id) DO UPDATE SET seen_at = now() + interval '1 hour', \
             key_generation = 1"
        ),
    );

    // Load on the two that stay while the key rotates.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (addrs, token, key, stop) = (addrs.clone(), token.clone(), key.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failures) = (0usize, Vec::new());
            let mut round = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let client = client_with(addrs[round % 2], &token);
                let entries = common::labelled(&[format!("during {round}")]);
                match client.push("v", &key, &entries, None).await {
                    Ok(_) => ok += 1,
                    Err(e) => failures.push(format!("push via {}: {e}", round % 2)),
                }
                match client_with(addrs[(round + 1) % 2], &token)
                    .pull("v", 0, 1000)
                    .await
                {
                    Ok(_) => ok += 1,
                    Err(e) => failures.push(format!("pull via {}: {e}", (round + 1) % 2)),
                }
                round += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failures)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, text) = cluster(&nodes[1], &["rotate-key"]);
    let rotated = std::time::Instant::now();
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("generation 2") && text.contains("sealed to 2 member(s)"),
        "the removed node gets none: {text}"
    );
    let (code, text) = cluster(&nodes[0], &["rotate-key"]);
    assert_eq!(
        code, 1,
        "a second rotation before every node holds the first: {text}"
    );
    assert!(text.contains("not yet held by every live node"), "{text}");
    for daemon in &daemons[..2] {
        for event in [
            "cluster: adopted the rotated cluster key",
            "cluster: every live node holds the new cluster key; tokens are issued under it",
        ] {
            assert!(
                daemon
                    .wait_for_log(event, Duration::from_secs(30))
                    .is_some(),
                "{event}\n{}",
                daemon.log()
            );
        }
    }
    // Field values move to a version of the new root.
    let moved = wait_until(Duration::from_secs(60), || {
        let root = admin_rows(
            &nodes[0],
            "SELECT version FROM keepd.field_keys WHERE reason = 'root'",
        );
        let version = root.first()?;
        let behind = admin_rows(
            &nodes[0],
            &format!(
                "SELECT count(*) FROM keepd.sync_logs WHERE encrypted_data NOT LIKE 'kf1:{version}:%'"
            ),
        );
        (behind == vec!["0".to_string()]).then_some(())
    });
    assert!(moved.is_some(), "{}", daemons[0].log());
    stop.store(true, Ordering::Relaxed);
    let (ok, failures) = load.await.unwrap();
    assert!(ok > 20, "the load ran ({ok})");
    assert!(failures.is_empty(), "{failures:?}");

    // From before: the token, both accounts, the sealed entry.
    let (_, labels) = common::pull_all(&client_with(addrs[1], &token), &key, "v").await;
    assert_eq!(labels[0], "before the rotation");
    let mut again = SyncClient::new(addrs[1]);
    again.login(&opaque_email, password).await.unwrap();
    let mut by_password = SyncClient::new(addrs[0]);
    by_password
        .login_with_password(&password_email, password)
        .await
        .unwrap();
    for node in &nodes[..2] {
        let verified = wait_until(Duration::from_secs(20), || {
            let (code, text) = node.audit_verify();
            (code == 0 && text.contains(", 0 entries not yet sealed")).then_some(text)
        });
        assert!(verified.is_some(), "{:?}", node.audit_verify());
        let status = node.run(&["keys", "status", "--json"]).1;
        assert!(status.contains("\"g2 "), "{status}");
    }
    let check = nodes[0].report_check("cluster.key");
    assert_eq!(check["status"], "pass", "{check}");

    // What the removed node mints (here for a session that is live now):
    // refused once the previous root's tokens have expired (the rotation
    // plus api.jwt_ttl), while a login goes on working.
    let window = Duration::from_secs(60);
    tokio::time::sleep(window.saturating_sub(rotated.elapsed())).await;
    let mut refusal = None;
    for _ in 0..50 {
        let mut fresh = SyncClient::new(addrs[0]);
        fresh.login(&opaque_email, password).await.unwrap();
        let (user, session) = session_of(fresh.token().unwrap());
        let (forged, _) = minted.issue(user, session);
        match client_with(addrs[0], &forged).pull("v", 0, 1).await {
            Err(e) if e.status() == Some(401) => {
                refusal = Some(e.to_string());
                fresh.pull("v", 0, 1).await.unwrap();
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let refusal = refusal.expect("the removed node's token still works");
    assert!(refusal.contains("replaced"), "{refusal}");
}

/// The user and session a token names.
fn session_of(token: &str) -> (uuid::Uuid, uuid::Uuid) {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    let id = |name: &str| claims[name].as_str().unwrap().parse().unwrap();
    (id("sub"), id("sid"))
}

/// A node stopped across two rotations of the cluster key comes back on
/// the newest: its pin follows the line of rotations, its data and
/// accounts work, and a key that does not descend from its pin is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_missed_two_rotations_follows_on_its_return() {
    let server = start_external();
    let (nodes, mut daemons) = start_cluster(&server, 2, common::unlimited_rates());
    let email = format!("away-{}@example.org", common::uuid());
    let mut client = SyncClient::new(daemons[0].addr());
    client.register(&email, "a long password").await.unwrap();
    client.login(&email, "a long password").await.unwrap();
    daemons[1].stop();
    let mut newest = String::new();
    for generation in [2, 3] {
        // The stopped node counts as live for 15 s after its last beat.
        let rotated = wait_until(Duration::from_secs(40), || {
            let (code, text) = cluster(&nodes[0], &["rotate-key"]);
            (code == 0).then_some(text)
        });
        let text = rotated.expect("the rotation was accepted once node 2 was no longer live");
        assert!(text.contains(&format!("generation {generation}")), "{text}");
        newest = text
            .split("(fingerprint ")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .unwrap()
            .to_string();
        let adopted = wait_until(Duration::from_secs(20), || {
            nodes[0]
                .run(&["keys", "status", "--json"])
                .1
                .contains(&format!("\"g{generation} "))
                .then_some(())
        });
        assert!(adopted.is_some(), "{}", daemons[0].log());
        let pin = nodes[0].state_dir().join("cluster.fingerprint");
        let held = wait_until(Duration::from_secs(20), || {
            (std::fs::read_to_string(&pin).unwrap().trim() == newest).then_some(())
        });
        assert!(held.is_some(), "{}", daemons[0].log());
    }
    daemons[1] = nodes[1].start_healthy();
    let mut back = SyncClient::new(daemons[1].addr());
    back.login(&email, "a long password").await.unwrap();
    let pin = std::fs::read_to_string(nodes[1].state_dir().join("cluster.fingerprint")).unwrap();
    assert_eq!(pin.trim(), newest, "the pin followed");
    daemons[1].stop();

    // A pin the sealed key does not descend from: refused, naming both.
    std::fs::write(
        nodes[1].state_dir().join("cluster.fingerprint"),
        "00112233445566778899aabbccddeeff\n",
    )
    .unwrap();
    let (code, text) = nodes[1].run(&["run"]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("00112233445566778899aabbccddeeff") && text.contains(&newest),
        "{text}"
    );
}

/// `database.postgres.version` holds for an external server too: another
/// major is refused by name (exit 2), not used silently.
#[test]
fn an_external_server_of_another_major_is_refused_by_name() {
    let server = start_external();
    let node = external_node_with(&server, json!({"database": {"postgres": {"version": 16}}}));
    let (code, text) = node.run(&["run"]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("database.postgres.version asks for PostgreSQL 16")
            && text.contains("runs 15")
            && text.contains("database.postgres.external"),
        "{text}"
    );
}

/// Join tokens (`keepd cluster token`): a node given a valid token is
/// admitted by the members without an operator and serves; nodes given a
/// used-up, expired, revoked or forged token wait, each saying why; the
/// admission is audited with the token's id, and no token reaches a log.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_joins_by_token_and_bad_tokens_wait_saying_why() {
    let server = start_external();
    let founder = external_node(&server);
    let _founder_daemon = founder.start_healthy();
    let create = |args: &[&str]| {
        let (code, out) = cluster(&founder, &[&["token", "create"], args].concat());
        assert_eq!(code, 0, "{out}");
        out.lines().next().unwrap().trim().to_string()
    };
    let id_of = |token: &str| token.split('.').nth(1).unwrap().to_string();
    let good = create(&["--uses", "1"]);
    let expired = create(&["--ttl", "1s"]);
    let revoked = create(&[]);
    let (code, out) = cluster(&founder, &["token", "revoke", &id_of(&revoked)]);
    assert_eq!(code, 0, "{out}");
    // The id of a real token with a secret the cluster never issued.
    let forged = format!("keepd-join-1.{}.{}", id_of(&good), "A".repeat(43));
    std::thread::sleep(Duration::from_millis(1500));

    let with_token = |token: &str| {
        let node = external_node(&server);
        let file = node.dir.path().join("join-token");
        std::fs::write(&file, format!("{token}\n")).unwrap();
        node.merge(json!({"cluster": {"join_token_file": file}}));
        node
    };
    let joiner = with_token(&good);
    let joined = joiner.start();
    assert!(
        joined.wait_health(200, Duration::from_secs(60)),
        "admitted by its token without an operator:\n{}",
        joined.log()
    );

    let waiting: Vec<(TestNode, &str)> = vec![
        (with_token(&good), "used up"),
        (with_token(&expired), "expired at"),
        (with_token(&revoked), "revoked at"),
        (with_token(&forged), "forged"),
    ];
    let daemons: Vec<common::Daemon> = std::thread::scope(|s| {
        let started: Vec<_> = waiting.iter().map(|(n, _)| s.spawn(|| n.start())).collect();
        started.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((_, why), daemon) in waiting.iter().zip(&daemons) {
        let said = wait_until(Duration::from_secs(60), || {
            daemon
                .log()
                .lines()
                .any(|l| l.contains("not admitted by join token") && l.contains(why))
                .then_some(())
        });
        assert!(said.is_some(), "{why}:\n{}", daemon.log());
        assert!(
            matches!(health_status(daemon), Some((503, s)) if s == "pending"),
            "{why}: still waiting"
        );
    }

    let audited = admin_rows(
        &founder,
        "SELECT metadata->>'token' FROM keepd_audit.audit_log WHERE action = 'CLUSTER_JOIN'",
    );
    assert_eq!(audited, [id_of(&good)]);
    let (code, listed) = cluster(&founder, &["token", "list"]);
    assert_eq!(code, 0, "{listed}");
    for (token, state) in [
        (&good, "used up"),
        (&expired, "expired"),
        (&revoked, "revoked"),
    ] {
        assert!(
            listed
                .lines()
                .any(|l| l.starts_with(&id_of(token)) && l.contains(state)),
            "{state}:\n{listed}"
        );
    }
    // The secrets reach no log, nor the database.
    let secrets: Vec<String> = [&good, &expired, &revoked, &forged]
        .iter()
        .map(|t| t.rsplit('.').next().unwrap().to_string())
        .collect();
    let logs: Vec<String> = daemons
        .iter()
        .chain([&joined, &_founder_daemon])
        .map(|d| d.log())
        .collect();
    for secret in &secrets {
        for log in &logs {
            assert!(!log.contains(secret.as_str()), "a token in a log");
        }
    }
    let dump = admin_rows(
        &founder,
        "SELECT encode(verifier, 'base64') || coalesce(id, '') FROM keepd.cluster_join_tokens",
    )
    .join("\n");
    for secret in &secrets {
        assert!(!dump.contains(secret.as_str()));
    }
}

/// keepd's container as the rendered pod spec runs it (`keepd render
/// --target kubernetes`): UID 10001, a read-only root, every capability
/// dropped, no privilege escalation, state on a volume of its own, the
/// runtime directory and /tmp on tmpfs; the external provider against a
/// Postgres the test started; admitted by its join token, without an
/// operator. (No Kubernetes API server runs here: Docker runs the pod's
/// container with the same restrictions.)
#[tokio::test(flavor = "multi_thread")]
async fn keepd_runs_as_the_rendered_pod_and_admits_itself_by_token() {
    if !common::require_docker() {
        return;
    }
    let server = start_external();
    let founder = external_node(&server);
    let _founder = founder.start_healthy();
    let (code, out) = cluster(&founder, &["token", "create"]);
    assert_eq!(code, 0, "{out}");
    let token = out.lines().next().unwrap().trim().to_string();

    // What the pod spec mounts, readable by its user alone.
    const UID: u32 = 10001;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (etc, state) = (dir.path().join("etc"), dir.path().join("state"));
    for d in [&etc, &state] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::copy(&server.password_file, etc.join("password")).unwrap();
    std::fs::copy(&server.ca_file, etc.join("ca.crt")).unwrap();
    std::fs::write(etc.join("token"), format!("{token}\n")).unwrap();
    let port = common::free_port();
    std::fs::write(
        etc.join("keepd.yaml"),
        serde_norway::to_string(&json!({
            "node": {"state_dir": "/var/lib/keepd", "runtime_dir": "/run/keepd"},
            "log": {"format": "json"},
            "api": {"listen": format!("127.0.0.1:{port}"), "metrics_listen": ""},
            "database": {"postgres": {"provider": "external", "external": {
                "host": "127.0.0.1",
                "port": server.port,
                "admin_password_file": "/etc/keepd/password",
                "ca_file": "/etc/keepd/ca.crt",
            }}},
            "cluster": {"join_token_file": "/etc/keepd/token"},
        }))
        .unwrap(),
    )
    .unwrap();
    for path in [&etc, &state]
        .into_iter()
        .cloned()
        .chain(std::fs::read_dir(&etc).unwrap().map(|e| e.unwrap().path()))
    {
        nix::unistd::chown(&path, Some(UID.into()), Some(UID.into())).unwrap();
    }
    let name = format!("keepd-test-pod-{}", common::uuid());
    let mount = |from: &std::path::Path, to: &str, mode: &str| {
        format!("type=bind,source={},target={to}{mode}", from.display())
    };
    let run = Command::new("docker")
        .args(["run", "-d", "--name", &name, "--network", "host"])
        .args([
            "--user",
            &format!("{UID}:{UID}"),
            "--read-only",
            "--cap-drop",
            "ALL",
        ])
        .args(["--security-opt", "no-new-privileges"])
        .args([
            "--tmpfs",
            "/run/keepd:mode=0700,uid=10001,gid=10001",
            "--tmpfs",
            "/tmp",
        ])
        .args(["--mount", &mount(&etc, "/etc/keepd", ",readonly")])
        .args(["--mount", &mount(&state, "/var/lib/keepd", "")])
        .args([
            "--mount",
            &mount(
                std::path::Path::new(common::keepd_bin()),
                "/usr/bin/keepd",
                ",readonly",
            ),
        ])
        .args([
            "debian:bookworm-slim",
            "keepd",
            "--config",
            "/etc/keepd/keepd.yaml",
            "run",
        ])
        .output()
        .unwrap();
    struct Removed(String);
    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
        }
    }
    let _removed = Removed(name.clone());
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let logs = || {
        let out = Command::new("docker")
            .args(["logs", &name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let healthy = wait_until(Duration::from_secs(90), || {
        let (code, _) =
            common::http_get_raw(format!("127.0.0.1:{port}").parse().unwrap(), "/health")?;
        (code == 200).then_some(())
    });
    assert!(
        healthy.is_some(),
        "admitted by token and serving:\n{}",
        logs()
    );
    assert!(logs().contains("cluster: admitted"), "{}", logs());
    assert!(
        !logs().contains(token.rsplit('.').next().unwrap()),
        "the token in a log"
    );
    // As the pod spec says: its user, a read-only root, no capability.
    let inspect = Command::new("docker")
        .args([
            "inspect",
            "--format",
            "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}}",
            &name,
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&inspect.stdout).trim(),
        "10001:10001 true [ALL]"
    );
    let status = Command::new("docker")
        .args(["exec", &name, "cat", "/proc/1/status"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains("10001")),
        "{status}"
    );
    assert!(
        status.lines().any(|l| l == "CapEff:\t0000000000000000"),
        "{status}"
    );
    let audited = admin_rows(
        &founder,
        "SELECT metadata->>'token' FROM keepd_audit.audit_log WHERE action = 'CLUSTER_JOIN'",
    );
    assert_eq!(audited.len(), 1, "{audited:?}");
}
