//! Faults under load: nothing acknowledged is lost, nothing is half
//! applied, and keepd answers again by itself.

use crate::common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::TestNode;
use keepd::client::{ClientError, LogEntry, SyncClient};
use serde_json::json;

const PASSWORD: &str = "fault test password";
const WRITERS: usize = 8;
const TOTAL: usize = 10_000;
const BATCH: usize = 50;

/// Pushes `batches` batches, retrying each with its Idempotency-Key until
/// it is acknowledged; returns the acknowledged entry ids and the statuses
/// of the failures seen.
async fn writer(
    client: SyncClient,
    key: Arc<keepd::client::VaultKey>,
    w: usize,
    batches: usize,
    progress: Arc<AtomicUsize>,
) -> Outcome {
    let mut acknowledged = Vec::new();
    let mut failures = Vec::new();
    for b in 0..batches {
        let entries: Vec<LogEntry> = (0..BATCH)
            .map(|i| LogEntry {
                data: format!("w{w}-b{b}-e{i}").into_bytes(),
                haex_timestamp: format!("{w:02}-{b:04}-{i:02}"),
            })
            .collect();
        let idempotency = format!("w{w}-b{b}");
        // Encrypted once: every retry is the same request.
        let sealed = SyncClient::seal_push("v", &key, &entries).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match client.push_sealed(&sealed, Some(&idempotency)).await {
                Ok(done) => {
                    acknowledged.extend(done.logs.into_iter().map(|l| l.id));
                    progress.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(ClientError::Api {
                    status,
                    retry_after,
                    ..
                }) => {
                    failures.push((status, retry_after));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                // The connection itself broke (keepd's side is fine;
                // reconnect and retry).
                Err(ClientError::Transport { .. }) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("unexpected: {e}"),
            }
            assert!(
                Instant::now() < deadline,
                "batch {idempotency} never acknowledged"
            );
        }
    }
    (acknowledged, failures)
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_killed_under_load_loses_nothing_acknowledged() {
    let node = TestNode::with(common::unlimited_rates());
    let daemon = node.start();
    assert!(daemon.wait_health(200, Duration::from_secs(30)));
    postgres_death_under_load(&daemon, || {
        let postmaster = daemon.postmaster_pid().expect("postgres runs");
        common::kill(postmaster, common::Signal::SIGKILL);
    })
    .await;
}

/// The docker provider: the container killed (`docker kill`) under load.
#[tokio::test(flavor = "multi_thread")]
async fn container_killed_under_load_loses_nothing_acknowledged() {
    if !common::require_docker_image() {
        return;
    }
    let node = TestNode::with(common::unlimited_rates());
    node.merge(json!({"database": {"postgres": {
        "provider": "docker",
        "docker": {"image": common::DOCKER_IMAGE},
    }}}));
    let daemon = node.start();
    assert!(
        daemon.wait_health(200, Duration::from_secs(120)),
        "{}",
        daemon.log()
    );
    let node_id = daemon.get("/health").unwrap().1["nodeId"]
        .as_str()
        .unwrap()
        .to_string();
    let names = keepd::postgres::docker::DockerNames::for_node(&node_id);
    let container = names.container.clone();
    postgres_death_under_load(&daemon, || {
        let killed = std::process::Command::new("docker")
            .args(["kill", &container])
            .output()
            .unwrap();
        assert!(killed.status.success());
    })
    .await;
    drop(daemon);
    for args in [
        vec!["rm", "-f", container.as_str()],
        vec!["volume", "rm", "-f", names.volume.as_str()],
    ] {
        let _ = std::process::Command::new("docker").args(&args).output();
    }
}

/// 8 writers push 10 000 entries; `kill` strikes a tenth of the way in.
async fn postgres_death_under_load(daemon: &common::Daemon, kill: impl FnOnce()) {
    let load = Load::start(daemon, "faults@example.org").await;
    // Strike a tenth of the way through the load.
    load.wait_for_a_tenth();
    kill();
    let killed_at = Instant::now();
    assert!(
        daemon.wait_health(503, Duration::from_secs(5)),
        "{}",
        daemon.log()
    );
    assert!(
        daemon.wait_health(200, Duration::from_secs(15)),
        "{}",
        daemon.log()
    );
    let recovered_in = killed_at.elapsed();

    let (owner, progress) = (load.owner.another_connection(), load.progress.clone());
    let (acknowledged, failures) = load.finish().await;
    eprintln!(
        "{} entries acknowledged, {} failed attempts retried, API back in {recovered_in:?}",
        acknowledged.len(),
        failures.len()
    );
    assert_eq!(acknowledged.len(), TOTAL);
    assert!(
        progress.load(Ordering::Relaxed) == TOTAL / BATCH && !failures.is_empty(),
        "the kill landed outside the load"
    );
    for (status, retry_after) in &failures {
        assert_eq!(*status, 503, "a failure other than 503: {failures:?}");
        assert!(retry_after.is_some(), "a 503 without Retry-After");
    }

    assert_stored_exactly(&owner, &acknowledged).await;
}

/// What a writer ends with: acknowledged entry ids, failures seen.
type Outcome = (Vec<String>, Vec<(u16, Option<u64>)>);

/// 8 writers of one account pushing to one vault.
struct Load {
    owner: SyncClient,
    progress: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Outcome>>,
}

impl Load {
    async fn start(daemon: &common::Daemon, email: &str) -> Load {
        let mut owner = SyncClient::new(daemon.addr());
        owner.register(email, PASSWORD).await.unwrap();
        owner.login(email, PASSWORD).await.unwrap();
        let key = Arc::new(owner.create_vault("v", PASSWORD).await.unwrap());
        let progress = Arc::new(AtomicUsize::new(0));
        let tasks = (0..WRITERS)
            .map(|w| {
                let client = owner.another_connection();
                tokio::spawn(writer(
                    client,
                    key.clone(),
                    w,
                    TOTAL / BATCH / WRITERS,
                    progress.clone(),
                ))
            })
            .collect();
        Load {
            owner,
            progress,
            tasks,
        }
    }

    fn wait_for_a_tenth(&self) {
        let started = common::wait_until(Duration::from_secs(60), || {
            (self.progress.load(Ordering::Relaxed) >= TOTAL / BATCH / 10).then_some(())
        });
        assert!(started.is_some(), "the load did not start");
    }

    /// (acknowledged entry ids, failures seen) once every batch is in.
    async fn finish(self) -> Outcome {
        let mut acknowledged = Vec::new();
        let mut failures = Vec::new();
        for task in self.tasks {
            let (ids, failed) = task.await.unwrap();
            acknowledged.extend(ids);
            failures.extend(failed);
        }
        (acknowledged, failures)
    }
}

/// Every acknowledged entry is readable and sequences are exactly
/// 1..TOTAL: no gap, no duplicate, nothing half-applied.
async fn assert_stored_exactly(owner: &SyncClient, acknowledged: &[String]) {
    assert_eq!(acknowledged.len(), TOTAL);
    let mut stored = Vec::new();
    let mut after = 0;
    loop {
        let page = owner.pull("v", after, 1000).await.unwrap();
        stored.extend(page.logs.iter().map(|l| (l.sequence, l.id.clone())));
        after = stored.last().map_or(0, |(s, _)| *s);
        if !page.has_more {
            break;
        }
    }
    let sequences: Vec<i64> = stored.iter().map(|(s, _)| *s).collect();
    assert_eq!(sequences, (1..=TOTAL as i64).collect::<Vec<_>>());
    let ids: HashSet<&String> = stored.iter().map(|(_, id)| id).collect();
    assert!(
        acknowledged.iter().all(|id| ids.contains(id)),
        "an acknowledged entry is missing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn keepd_killed_under_load_and_restarted_loses_nothing_and_replays_retries() {
    let node = TestNode::with(common::unlimited_rates());
    // A fixed API port, so clients find keepd again after its restart.
    let port = common::free_port();
    node.set("api.listen", format!("127.0.0.1:{port}"));
    let mut daemon = node.start();
    assert!(daemon.wait_health(200, Duration::from_secs(30)));
    let load = Load::start(&daemon, "kill9@example.org").await;
    load.wait_for_a_tenth();
    daemon.signal(common::Signal::SIGKILL);
    daemon
        .wait_exit(Duration::from_secs(10))
        .expect("keepd died");
    // Postgres follows keepd (parent-death signal): no orphan.
    let orphans = common::wait_until(Duration::from_secs(10), || {
        common::postgres_pids(&node.data_dir())
            .is_empty()
            .then_some(())
    });
    assert!(orphans.is_some(), "Postgres outlived keepd");
    let daemon = node.start();
    assert!(
        daemon.wait_health(200, Duration::from_secs(30)),
        "{}",
        daemon.log()
    );

    let owner = load.owner.another_connection();
    // Retries of pushes whose answer was lost replayed the first result:
    // nothing stored twice.
    let (acknowledged, _) = load.finish().await;
    assert_stored_exactly(&owner, &acknowledged).await;
    let (code, text) = node.audit_verify();
    assert_eq!(code, 0, "{text}");
}

/// Unmounts the test's tmpfs whatever happens.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_refuses_writes_cleanly_and_resumes() {
    let node = TestNode::with(common::unlimited_rates());
    let state = node.state_dir();
    std::fs::create_dir_all(&state).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256m,mode=0700", "tmpfs"])
        .arg(&state)
        .output();
    let why = match mounted {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "cannot mount a small tmpfs here: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run mount: {e}")),
    };
    if let Some(why) = why {
        common::require(
            false,
            &why,
            "mounting takes root (or CAP_SYS_ADMIN), as CI runs the suite",
        );
        return;
    }
    let _unmount = Mounted(state.clone());
    let mut daemon = node.start();
    assert!(
        daemon.wait_health(200, Duration::from_secs(30)),
        "{}",
        daemon.log()
    );
    let mut client = SyncClient::new(daemon.addr());
    client.register("full@example.org", PASSWORD).await.unwrap();
    client.login("full@example.org", PASSWORD).await.unwrap();
    let key = client.create_vault("v", PASSWORD).await.unwrap();
    let batch = |tag: &str| -> Vec<LogEntry> {
        (0..BATCH)
            .map(|i| LogEntry {
                data: vec![b'x'; 2048],
                haex_timestamp: format!("{tag}-{i:03}"),
            })
            .collect()
    };
    let mut acknowledged = Vec::new();
    for b in 0..5 {
        let done = client
            .push("v", &key, &batch(&format!("pre{b}")), None)
            .await
            .unwrap();
        acknowledged.extend(done.logs.into_iter().map(|l| l.id));
    }

    // Fill the file system.
    let filler = state.join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 1 << 20];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
    }
    // Writes are refused with 503 (never a 500), until space returns.
    let mut refused = 0;
    for b in 0..20 {
        match client
            .push("v", &key, &batch(&format!("full{b}")), None)
            .await
        {
            Ok(done) => acknowledged.extend(done.logs.into_iter().map(|l| l.id)),
            Err(ClientError::Api {
                status,
                retry_after,
                ..
            }) => {
                assert_eq!(status, 503, "a full disk answered {status}");
                assert!(retry_after.is_some());
                refused += 1;
            }
            Err(ClientError::Transport { .. }) => refused += 1,
            Err(e) => panic!("{e}"),
        }
        if refused >= 3 {
            break;
        }
    }
    assert!(refused >= 3, "writes kept succeeding on a full disk");
    assert!(
        daemon.log().contains("No space left on device"),
        "keepd does not report the full disk:\n{}",
        daemon.log()
    );

    std::fs::remove_file(&filler).unwrap();
    assert!(
        daemon.wait_health(200, Duration::from_secs(60)),
        "{}",
        daemon.log()
    );
    let resumed = common::wait_until(Duration::from_secs(30), || {
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current()
                .block_on(client.push("v", &key, &batch("after"), None))
                .ok()
        })
    })
    .expect("writes resume when space returns");
    acknowledged.extend(resumed.logs.into_iter().map(|l| l.id));

    let pulled = client.pull("v", 0, 1000).await.unwrap();
    let sequences: Vec<i64> = pulled.logs.iter().map(|l| l.sequence).collect();
    assert_eq!(sequences, (1..=sequences.len() as i64).collect::<Vec<_>>());
    let ids: HashSet<&String> = pulled.logs.iter().map(|l| &l.id).collect();
    assert!(
        acknowledged.iter().all(|id| ids.contains(id)),
        "an acknowledged entry is missing"
    );
    daemon.signal(common::Signal::SIGTERM);
    let _ = daemon.wait_exit(Duration::from_secs(30));
}
