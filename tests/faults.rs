//! Faults under load: nothing acknowledged is lost, nothing is half
//! applied, and keepd answers again by itself.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::TestNode;
use keepd::client::{ClientError, LogEntry, SyncClient};

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
) -> (Vec<String>, Vec<(u16, Option<u64>)>) {
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
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match client.push("v", &key, &entries, Some(&idempotency)).await {
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
    let node = TestNode::with_api_and_extra("  rate_limits:\n    auth_per_minute: 1000\n", "");
    let daemon = node.start();
    assert!(daemon.wait_health(200, Duration::from_secs(30)));
    let mut owner = SyncClient::new(daemon.addr());
    owner
        .register("faults@example.org", PASSWORD)
        .await
        .unwrap();
    owner.login("faults@example.org", PASSWORD).await.unwrap();
    let key = Arc::new(owner.create_vault("v", PASSWORD).await.unwrap());
    let token = owner.token().unwrap().to_string();

    let progress = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut client = SyncClient::new(daemon.addr());
        client.set_token(Some(token.clone()));
        tasks.push(tokio::spawn(writer(
            client,
            key.clone(),
            w,
            TOTAL / BATCH / WRITERS,
            progress.clone(),
        )));
    }
    // Kill the postmaster a tenth of the way through the load.
    let started = common::wait_until(Duration::from_secs(60), || {
        (progress.load(Ordering::Relaxed) >= TOTAL / BATCH / 10).then_some(())
    });
    assert!(started.is_some(), "the load did not start");
    let postmaster = daemon.postmaster_pid().expect("postgres runs");
    common::kill(postmaster, common::Signal::SIGKILL);
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

    let mut acknowledged = Vec::new();
    let mut failures = Vec::new();
    for task in tasks {
        let (ids, failed) = task.await.unwrap();
        acknowledged.extend(ids);
        failures.extend(failed);
    }
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

    // Every acknowledged entry is readable; sequences are exactly 1..N.
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
    assert_eq!(
        sequences,
        (1..=TOTAL as i64).collect::<Vec<_>>(),
        "gap-free, no duplicates, nothing half-applied"
    );
    let ids: HashSet<&String> = stored.iter().map(|(_, id)| id).collect();
    assert!(
        acknowledged.iter().all(|id| ids.contains(id)),
        "an acknowledged entry is missing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn keepd_killed_under_load_and_restarted_loses_nothing_and_replays_retries() {
    let node = TestNode::with_api_and_extra("  rate_limits:\n    auth_per_minute: 1000\n", "");
    // A fixed API port, so clients find keepd again after its restart.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let yaml = std::fs::read_to_string(&node.config).unwrap();
    std::fs::write(
        &node.config,
        yaml.replace("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}")),
    )
    .unwrap();
    let mut daemon = node.start();
    assert!(daemon.wait_health(200, Duration::from_secs(30)));
    let mut owner = SyncClient::new(daemon.addr());
    owner.register("kill9@example.org", PASSWORD).await.unwrap();
    owner.login("kill9@example.org", PASSWORD).await.unwrap();
    let key = Arc::new(owner.create_vault("v", PASSWORD).await.unwrap());
    let token = owner.token().unwrap().to_string();

    let progress = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut client = SyncClient::new(daemon.addr());
        client.set_token(Some(token.clone()));
        tasks.push(tokio::spawn(writer(
            client,
            key.clone(),
            w,
            TOTAL / BATCH / WRITERS,
            progress.clone(),
        )));
    }
    let started = common::wait_until(Duration::from_secs(60), || {
        (progress.load(Ordering::Relaxed) >= TOTAL / BATCH / 10).then_some(())
    });
    assert!(started.is_some(), "the load did not start");
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

    let mut acknowledged = Vec::new();
    for task in tasks {
        let (ids, _) = task.await.unwrap();
        acknowledged.extend(ids);
    }
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
    // Retries of pushes whose answer was lost replayed the first result:
    // nothing stored twice.
    assert_eq!(
        sequences,
        (1..=TOTAL as i64).collect::<Vec<_>>(),
        "gap-free, no duplicates"
    );
    let ids: HashSet<&String> = stored.iter().map(|(_, id)| id).collect();
    assert!(
        acknowledged.iter().all(|id| ids.contains(id)),
        "an acknowledged entry is missing"
    );
    let (code, text) = node.audit_verify();
    assert_eq!(code, 0, "{text}");
}
