//! Live updates: `GET /sync/events` as Server-Sent Events. A push's
//! transaction notifies Postgres's channel `keepd_events` with the vault
//! and its new last sequence; every node LISTENs (`listen`) and fans the
//! notification out to its streams, so a push on any node of a cluster
//! reaches every watcher. A stream carries `{vaultId, sequence}` and never
//! ciphertext: the client pulls what it has not seen.
//!
//! Why SSE and not a WebSocket: the updates go one way, SSE is plain HTTP
//! (it passes the edge, proxies and the per-route rate limits as every
//! other route, and `Authorization` works as everywhere), and browsers
//! resume it with `Last-Event-ID` by themselves.
//!
//! Bounds: streams per node and per account (`api.events`); the fan-out
//! is one bounded broadcast buffer, and a stream that falls behind it (a
//! consumer that does not read) is ended, never buffered for: it
//! reconnects with `Last-Event-ID` and loses nothing, since the first
//! event of a stream is the vault's head when it is past that id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::sse::Event;
use tokio::sync::broadcast;
use tracing::{info, warn};
use uuid::Uuid;

use super::error::ApiError;
use crate::postgres::tls::Endpoint;
use crate::shutdown::Shutdown;

/// Postgres's channel for new entries.
pub const CHANNEL: &str = "keepd_events";
/// Notifications a stream may fall behind by before it is ended.
const BUFFER: usize = 1024;

/// A vault's new last sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaultEvent {
    /// The vault's row id (not the client's vaultId).
    pub vault: Uuid,
    pub sequence: i64,
}

impl VaultEvent {
    /// The payload a push notifies: `vault:sequence`.
    pub fn payload(&self) -> String {
        format!("{}:{}", self.vault, self.sequence)
    }

    fn parse(payload: &str) -> Option<VaultEvent> {
        let (vault, sequence) = payload.split_once(':')?;
        Some(VaultEvent {
            vault: vault.parse().ok()?,
            sequence: sequence.parse().ok()?,
        })
    }
}

/// The node's streams: the fan-out and the counts the caps hold.
pub struct Events {
    sender: broadcast::Sender<VaultEvent>,
    open: AtomicUsize,
    per_account: Mutex<HashMap<Uuid, usize>>,
    max: usize,
    max_per_account: usize,
}

/// A stream's place under the caps, given back when it ends.
pub struct Slot {
    events: Arc<Events>,
    user: Uuid,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.events.open.fetch_sub(1, Ordering::AcqRel);
        let mut accounts = self
            .events
            .per_account
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = accounts.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                accounts.remove(&self.user);
            }
        }
    }
}

impl Events {
    pub fn new(max: usize, max_per_account: usize) -> Events {
        Events {
            sender: broadcast::channel(BUFFER).0,
            open: AtomicUsize::new(0),
            per_account: Mutex::new(HashMap::new()),
            max,
            max_per_account,
        }
    }

    /// Streams open now (what the caps count; the tests read it).
    #[cfg(test)]
    fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    fn publish(&self, payload: &str) {
        match VaultEvent::parse(payload) {
            // No stream open: nobody to tell.
            Some(event) => drop(self.sender.send(event)),
            None => warn!(
                payload,
                "events: a notification keepd did not send; ignored"
            ),
        }
    }

    /// A place for one more stream of `user`, and its receiver (taken
    /// before the vault's head is read, so nothing in between is missed).
    pub fn subscribe(
        self: &Arc<Self>,
        user: Uuid,
    ) -> Result<(broadcast::Receiver<VaultEvent>, Slot), ApiError> {
        let mut accounts = self.per_account.lock().unwrap_or_else(|e| e.into_inner());
        let mine = accounts.get(&user).copied().unwrap_or(0);
        if mine >= self.max_per_account {
            return Err(too_many(format!(
                "this account holds {mine} open streams; api.events.max_streams_per_account allows {}",
                self.max_per_account
            )));
        }
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(too_many(format!(
                "this node holds {} open streams (api.events.max_streams)",
                self.max
            )));
        }
        *accounts.entry(user).or_insert(0) += 1;
        let slot = Slot {
            events: self.clone(),
            user,
        };
        Ok((self.sender.subscribe(), slot))
    }
}

fn too_many(message: String) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::TOO_MANY_REQUESTS,
        "too_many_streams",
        format!("{message}; close a stream first"),
    )
}

/// A stream of one vault's events: its head first when past `seen`, then
/// each new last sequence; it ends when it falls behind the fan-out.
pub fn watch(
    receiver: broadcast::Receiver<VaultEvent>,
    slot: Slot,
    vault: Uuid,
    vault_id: String,
    head: i64,
    seen: Option<i64>,
) -> impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>> + Send + 'static {
    struct Watch {
        receiver: broadcast::Receiver<VaultEvent>,
        _slot: Slot,
        vault: Uuid,
        vault_id: String,
        sent: i64,
        first: Option<i64>,
    }
    let sent = seen.unwrap_or(-1);
    let state = Watch {
        receiver,
        _slot: slot,
        vault,
        vault_id,
        sent: sent.max(head),
        first: (head > sent).then_some(head),
    };
    futures_util::stream::unfold(state, |mut watch| async move {
        if let Some(head) = watch.first.take() {
            return Some((Ok(event(&watch.vault_id, head)), watch));
        }
        loop {
            match watch.receiver.recv().await {
                Ok(e) if e.vault == watch.vault && e.sequence > watch.sent => {
                    watch.sent = e.sequence;
                    return Some((Ok(event(&watch.vault_id, e.sequence)), watch));
                }
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    })
}

/// One SSE event: the vault and its new last sequence, `id` the sequence.
pub fn event(vault_id: &str, sequence: i64) -> Event {
    Event::default()
        .event("sync")
        .id(sequence.to_string())
        .data(serde_json::json!({"vaultId": vault_id, "sequence": sequence}).to_string())
}

/// LISTENs on `CHANNEL` as `endpoint` for as long as keepd runs, feeding
/// `events`; a lost connection is made again (a second later, then less
/// often), and the streams carry on meanwhile.
pub async fn listen(endpoint: Endpoint, events: Arc<Events>, mut stop: Shutdown) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let sink = events.clone();
        let connected = endpoint
            .listen(CHANNEL, move |payload| sink.publish(payload))
            .await;
        match connected {
            Ok((_client, connection)) => {
                info!(channel = CHANNEL, "events: listening for new entries");
                backoff = Duration::from_secs(1);
                tokio::select! {
                    _ = connection => warn!("events: the listening connection ended; connecting again"),
                    _ = stop.requested() => return,
                }
            }
            Err(e) => {
                warn!(error = %crate::postgres::describe_error(&e), "events: cannot listen; trying again")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.requested() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_foreign_ones_are_refused() {
        let event = VaultEvent {
            vault: Uuid::new_v4(),
            sequence: 42,
        };
        assert_eq!(VaultEvent::parse(&event.payload()), Some(event));
        for foreign in ["", "x", "not-a-uuid:1", &format!("{}:x", Uuid::new_v4())] {
            assert_eq!(VaultEvent::parse(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn streams_are_capped_per_account_and_per_node() {
        let events = Arc::new(Events::new(3, 2));
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let first = events.subscribe(a).unwrap();
        let _second = events.subscribe(a).unwrap();
        assert!(events.subscribe(a).is_err(), "a third for one account");
        let _third = events.subscribe(b).unwrap();
        assert!(events.subscribe(b).is_err(), "a fourth on the node");
        assert_eq!(events.open(), 3);
        drop(first);
        assert_eq!(events.open(), 2);
        assert!(events.subscribe(a).is_ok(), "a place given back");
    }
}

#[cfg(test)]
mod stream_tests {
    use futures_util::StreamExt;

    use super::*;

    /// A consumer that does not read falls behind the bounded fan-out and
    /// its stream ends, rather than anything being buffered for it.
    #[tokio::test]
    async fn a_stream_that_falls_behind_is_ended_not_buffered() {
        let events = Arc::new(Events::new(10, 10));
        let vault = Uuid::new_v4();
        let (receiver, slot) = events.subscribe(Uuid::new_v4()).unwrap();
        let stream = watch(receiver, slot, vault, "v".into(), 0, None);
        let mut stream = Box::pin(stream);
        // The head comes first.
        assert!(stream.next().await.is_some());
        for sequence in 1..=(BUFFER as i64 + 10) {
            events.publish(&VaultEvent { vault, sequence }.payload());
        }
        assert!(stream.next().await.is_none(), "lagged: ended");
        assert_eq!(events.open(), 0, "its place given back");
    }

    #[tokio::test]
    async fn only_the_watched_vault_and_only_newer_sequences_are_sent() {
        let events = Arc::new(Events::new(10, 10));
        let (vault, other) = (Uuid::new_v4(), Uuid::new_v4());
        let (receiver, slot) = events.subscribe(Uuid::new_v4()).unwrap();
        // Resumed at 5 with the head at 5: no head event.
        let mut stream = Box::pin(watch(receiver, slot, vault, "v".into(), 5, Some(5)));
        for (v, sequence) in [(other, 9), (vault, 4), (vault, 5), (vault, 7)] {
            events.publish(&VaultEvent { vault: v, sequence }.payload());
        }
        let first = tokio::time::timeout(Duration::from_secs(1), stream.next())
            .await
            .unwrap();
        assert!(first.is_some());
        // Nothing else is pending: the rest were another vault's or older.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), stream.next())
                .await
                .is_err()
        );
    }
}
