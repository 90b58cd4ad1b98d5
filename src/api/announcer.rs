//! Tells every node that pushes committed: the vaults' new last sequences
//! go to Postgres's channel (`store::logs::announce`), many pushes' in one
//! transaction.
//!
//! A push hands its event over once it has committed and answers without
//! waiting. One task sends what is pending, then what came meanwhile, so
//! under load many pushes share a transaction (its statements, its commit
//! record) instead of each running one of its own, and when idle an event
//! leaves at once. Only a vault's last sequence matters to its watchers
//! (`api::events`), so pending events are kept one per vault, the
//! highest: what waits is bounded by the vaults pushed to, not by the
//! pushes. An announcement that fails is logged and dropped: a lost event
//! costs a watcher a reconnect, never data.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::events::VaultEvent;
use super::store::logs;
use crate::postgres::pool::RoleAwarePool;

/// How long `close` waits for the last events to go out.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Where pushes leave their events. `close` sends what is pending and
/// waits for it (the daemon, before Postgres stops); dropped, it sends what
/// is pending as long as the runtime runs.
pub struct Announcer {
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct Shared {
    /// Each vault's highest unsent sequence.
    pending: Mutex<HashMap<Uuid, i64>>,
    wake: Notify,
    closed: AtomicBool,
}

impl Announcer {
    /// Starts the task that sends the events (inside a Tokio runtime).
    pub fn start(pool: RoleAwarePool) -> Announcer {
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(send(pool, shared.clone()));
        Announcer {
            shared,
            task: Mutex::new(Some(task)),
        }
    }

    /// Sends the events still pending and ends the task, waiting up to
    /// `CLOSE_WAIT` for a database that does not answer; events queued
    /// afterwards are not sent.
    pub async fn close(&self) {
        self.stop();
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut task) = task
            && tokio::time::timeout(CLOSE_WAIT, &mut task).await.is_err()
        {
            tracing::warn!("live events of committed pushes were not sent before stopping");
            task.abort();
        }
    }

    fn stop(&self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }

    /// Queues `event` of a committed push; never waits.
    pub fn announce(&self, event: VaultEvent) {
        let mut pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let last = pending.entry(event.vault).or_insert(event.sequence);
        *last = (*last).max(event.sequence);
        drop(pending);
        self.shared.wake.notify_one();
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn send(pool: RoleAwarePool, shared: Arc<Shared>) {
    loop {
        // A wake-up sent while a batch was going out is kept (Notify's
        // permit), so nothing queued meanwhile waits for the next push.
        shared.wake.notified().await;
        let batch: Vec<VaultEvent> = {
            let mut pending = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending
                .drain()
                .map(|(vault, sequence)| VaultEvent { vault, sequence })
                .collect()
        };
        if !batch.is_empty()
            && let Err(e) = logs::announce(&pool, &batch).await
        {
            tracing::warn!(error = %e, events = batch.len(), "pushes committed but their live events could not be sent");
        }
        if shared.closed.load(Ordering::Acquire)
            && shared
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
        {
            return;
        }
    }
}
