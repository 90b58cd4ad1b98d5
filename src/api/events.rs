//! Live updates: `GET /sync/events` as Server-Sent Events. Once a push
//! has committed, keepd notifies Postgres's channel `keepd_events` with the
//! vault and its new last sequence (`store::logs::announce`, outside the
//! push's transaction); every node LISTENs (`listen`) and fans the
//! notification out to its streams, so a push on any node of a cluster
//! reaches every watcher. A stream carries `{vaultId, sequence}` and never
//! ciphertext: the client pulls what it has not seen.
//!
//! Why SSE and not a WebSocket: the updates go one way, SSE is plain HTTP
//! (it passes the edge, proxies and the per-route rate limits as every
//! other route, and `Authorization` works as everywhere), and browsers
//! resume it with `Last-Event-ID` by themselves.
//!
//! Bounds: streams per node, per account and per client
//! (`api.events`), outside the connection slots requests need (the
//! stream marks its connection, which then counts here only). The
//! fan-out is one `watch` channel per watched vault, holding the vault's
//! last sequence and nothing else: a notification wakes the streams of
//! its vault only (10 000 streams of other vaults cost it nothing), and
//! a consumer that does not read is never buffered for; when it reads, it
//! gets the latest sequence. A vault's channel goes when its last stream
//! does.
//!
//! A stream lives as long as its session and no longer: it ends, with a
//! final `end` event naming why, when the session's token expires, when
//! it has sent nothing for `api.events.max_idle`, and when its session
//! ends anywhere in the cluster. For the last, a trigger on
//! `keepd.sessions` (schema v13) notifies channel `keepd_sessions` with
//! the session and the reason its ending statement set; every node
//! LISTENs and ends that session's streams.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::response::sse::Event;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};
use uuid::Uuid;

use super::error::ApiError;
use crate::backoff::Backoff;
use crate::edge::StreamMark;
use crate::postgres::tls::Endpoint;
use crate::shutdown::Shutdown;

/// Postgres's channel for new entries.
pub const CHANNEL: &str = "keepd_events";
/// Postgres's channel for ended sessions (`id:reason`).
pub const SESSIONS_CHANNEL: &str = "keepd_sessions";

/// Why a stream ended, as its final `end` event says.
const REASONS: &[&str] = &[
    "logout",
    "password_changed",
    "account_disabled",
    "account_deleted",
    "session_expired",
    "session_ended",
];

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

/// A session that ended, from its notification: `id:reason`.
fn parse_session_end(payload: &str) -> Option<(Uuid, &'static str)> {
    let (session, reason) = payload.split_once(':')?;
    let reason = REASONS
        .iter()
        .find(|known| **known == reason)
        .copied()
        .unwrap_or("session_ended");
    Some((session.parse().ok()?, reason))
}

/// The caps' counts, and the sessions that have streams open.
#[derive(Default)]
struct Open {
    total: usize,
    accounts: HashMap<Uuid, usize>,
    clients: HashMap<IpAddr, usize>,
    /// Each session with open streams: how many, and where its end is told.
    sessions: HashMap<Uuid, (usize, watch::Sender<Option<&'static str>>)>,
}

fn give_back<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// The bounds of the node's streams (`api.events`).
#[derive(Debug, Clone, Copy)]
pub struct StreamCaps {
    pub max: usize,
    pub per_account: usize,
    pub per_client: usize,
    pub max_idle: Duration,
}

/// The node's streams: the fan-out and the counts the caps hold.
pub struct Events {
    /// Each watched vault's last sequence, by its row id.
    vaults: Mutex<HashMap<Uuid, watch::Sender<i64>>>,
    open: Mutex<Open>,
    caps: StreamCaps,
}

/// A stream's view of its vault's last sequence; the vault's channel goes
/// with its last follower.
pub struct Following {
    receiver: watch::Receiver<i64>,
    events: Arc<Events>,
    vault: Uuid,
}

impl Drop for Following {
    fn drop(&mut self) {
        let mut vaults = self.events.vaults();
        // Under the lock no follower is added meanwhile; this one is the
        // last if it is the only receiver left.
        if vaults
            .get(&self.vault)
            .is_some_and(|sender| sender.receiver_count() <= 1)
        {
            vaults.remove(&self.vault);
        }
    }
}

/// Who holds a stream: the caps it counts against and the session it
/// lives by.
#[derive(Debug, Clone, Copy)]
pub struct Holder {
    pub user: Uuid,
    pub session: Uuid,
    /// The client's key (its address grouped by `api.client_prefix_*`).
    pub client: IpAddr,
    /// When the session's token expires.
    pub expires: SystemTime,
}

/// A stream's place under the caps, given back when it ends.
pub struct Slot {
    events: Arc<Events>,
    holder: Holder,
    ended: watch::Receiver<Option<&'static str>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.events.lock();
        open.total -= 1;
        give_back(&mut open.accounts, &self.holder.user);
        give_back(&mut open.clients, &self.holder.client);
        if let Some((n, _)) = open.sessions.get_mut(&self.holder.session) {
            *n -= 1;
            if *n == 0 {
                open.sessions.remove(&self.holder.session);
            }
        }
    }
}

impl Events {
    pub fn new(caps: StreamCaps) -> Events {
        Events {
            vaults: Mutex::new(HashMap::new()),
            open: Mutex::new(Open::default()),
            caps,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn vaults(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, watch::Sender<i64>>> {
        self.vaults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows `vault`'s last sequence from now on (follow before reading
    /// the head, so that nothing in between is missed).
    pub fn follow(self: &Arc<Self>, vault: Uuid) -> Following {
        let receiver = self
            .vaults()
            .entry(vault)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        Following {
            receiver,
            events: self.clone(),
            vault,
        }
    }

    /// Vaults followed now (the tests read it).
    #[cfg(test)]
    fn followed(&self) -> usize {
        self.vaults().len()
    }

    /// Streams open now (what the caps count; the tests read it).
    #[cfg(test)]
    fn open(&self) -> usize {
        self.lock().total
    }

    fn publish(&self, payload: &str) {
        match VaultEvent::parse(payload) {
            // Only a vault someone follows has a channel; a sequence
            // older than the one it holds (notifications of two commits
            // crossing) changes nothing.
            Some(event) => {
                if let Some(sender) = self.vaults().get(&event.vault) {
                    sender.send_if_modified(|last| {
                        let newer = event.sequence > *last;
                        if newer {
                            *last = event.sequence;
                        }
                        newer
                    });
                }
            }
            None => warn!(
                payload,
                "events: a notification keepd did not send; ignored"
            ),
        }
    }

    /// Ends the streams of a session that ended (on any node).
    fn session_ended(&self, payload: &str) {
        let Some((session, reason)) = parse_session_end(payload) else {
            warn!(
                payload,
                "events: a session notification keepd did not send; ignored"
            );
            return;
        };
        if let Some((_, told)) = self.lock().sessions.get(&session) {
            told.send_replace(Some(reason));
        }
    }

    fn notified(&self, channel: &str, payload: &str) {
        if channel == SESSIONS_CHANNEL {
            self.session_ended(payload);
        } else {
            self.publish(payload);
        }
    }

    /// A place for one more stream of `holder`.
    pub fn subscribe(self: &Arc<Self>, holder: Holder) -> Result<Slot, ApiError> {
        let caps = self.caps;
        let mut open = self.lock();
        let mine = open.accounts.get(&holder.user).copied().unwrap_or(0);
        if mine >= caps.per_account {
            return Err(too_many(format!(
                "this account holds {mine} open streams; api.events.max_streams_per_account allows {}",
                caps.per_account
            )));
        }
        let client = open.clients.get(&holder.client).copied().unwrap_or(0);
        if client >= caps.per_client {
            return Err(too_many(format!(
                "this client holds {client} open streams; api.events.max_streams_per_client allows {}",
                caps.per_client
            )));
        }
        if open.total >= caps.max {
            return Err(too_many(format!(
                "this node holds {} open streams (api.events.max_streams)",
                caps.max
            )));
        }
        open.total += 1;
        *open.accounts.entry(holder.user).or_insert(0) += 1;
        *open.clients.entry(holder.client).or_insert(0) += 1;
        let (n, told) = open
            .sessions
            .entry(holder.session)
            .or_insert_with(|| (0, watch::channel(None).0));
        *n += 1;
        let ended = told.subscribe();
        drop(open);
        Ok(Slot {
            events: self.clone(),
            holder,
            ended,
        })
    }
}

fn too_many(message: String) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::TOO_MANY_REQUESTS,
        "too_many_streams",
        format!("{message}; close a stream first"),
    )
}

/// What a stream watches (the vault it follows, by the client's name for
/// it) and from where it resumes.
pub struct Watched {
    pub vault_id: String,
    /// The vault's last sequence when the stream opened.
    pub head: i64,
    /// The client's `Last-Event-ID`.
    pub seen: Option<i64>,
}

/// A stream of one vault's events: its head first when past `seen`, then
/// each new last sequence. It ends with an `end` event when its session
/// ends or expires, or when it has been idle for `api.events.max_idle`.
pub fn watch(
    following: Following,
    slot: Slot,
    watched: Watched,
    mark: Option<StreamMark>,
) -> impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>> + Send + 'static {
    struct Watch {
        following: Following,
        slot: Slot,
        _mark: Option<StreamMark>,
        vault_id: String,
        sent: i64,
        first: Option<i64>,
        expires: Instant,
        max_idle: Duration,
        last_event: Instant,
        done: bool,
    }
    let sent = watched.seen.unwrap_or(-1);
    let left = slot
        .holder
        .expires
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    let max_idle = slot.events.caps.max_idle;
    let state = Watch {
        following,
        _mark: mark,
        vault_id: watched.vault_id,
        sent: sent.max(watched.head),
        first: (watched.head > sent).then_some(watched.head),
        expires: Instant::now() + left,
        max_idle,
        last_event: Instant::now(),
        done: false,
        slot,
    };
    futures_util::stream::unfold(state, |mut watch| async move {
        if watch.done {
            return None;
        }
        if let Some(head) = watch.first.take() {
            return Some((Ok(event(&watch.vault_id, head)), watch));
        }
        let ended = loop {
            let idle_until = watch.last_event + watch.max_idle;
            tokio::select! {
                biased;
                changed = watch.slot.ended.changed() => {
                    let reason = *watch.slot.ended.borrow();
                    break match (changed, reason) {
                        (Ok(()), Some(reason)) => reason,
                        _ => "session_ended",
                    };
                }
                _ = tokio::time::sleep_until(watch.expires) => break "session_expired",
                _ = tokio::time::sleep_until(idle_until) => break "idle",
                changed = watch.following.receiver.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    let last = *watch.following.receiver.borrow_and_update();
                    if last > watch.sent {
                        watch.sent = last;
                        watch.last_event = Instant::now();
                        return Some((Ok(event(&watch.vault_id, last)), watch));
                    }
                }
            }
        };
        watch.done = true;
        Some((Ok(end(ended)), watch))
    })
}

/// One SSE event: the vault and its new last sequence, `id` the sequence.
pub fn event(vault_id: &str, sequence: i64) -> Event {
    Event::default()
        .event("sync")
        .id(sequence.to_string())
        .data(serde_json::json!({"vaultId": vault_id, "sequence": sequence}).to_string())
}

/// A stream's last event: why it ends.
fn end(reason: &str) -> Event {
    Event::default()
        .event("end")
        .data(serde_json::json!({ "reason": reason }).to_string())
}

/// LISTENs on `CHANNEL` and `SESSIONS_CHANNEL` as `endpoint` for as long
/// as keepd runs, feeding `events`; a lost connection is made again (a
/// second later, then less often), and the streams carry on meanwhile.
pub async fn listen(endpoint: Endpoint, events: Arc<Events>, mut stop: Shutdown) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        let sink = events.clone();
        let connected = endpoint
            .listen(&[CHANNEL, SESSIONS_CHANNEL], move |channel, payload| {
                sink.notified(channel, payload)
            })
            .await;
        match connected {
            Ok((_client, connection)) => {
                info!(
                    channel = CHANNEL,
                    "events: listening for new entries and ended sessions"
                );
                backoff.reset();
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
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = stop.requested() => return,
        }
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

    pub(super) fn caps(max: usize, per_account: usize, per_client: usize) -> StreamCaps {
        StreamCaps {
            max,
            per_account,
            per_client,
            max_idle: Duration::from_secs(3600),
        }
    }

    pub(super) fn holder(user: Uuid, client: &str) -> Holder {
        Holder {
            user,
            session: Uuid::new_v4(),
            client: client.parse().unwrap(),
            expires: SystemTime::now() + Duration::from_secs(3600),
        }
    }

    #[test]
    fn streams_are_capped_per_account_per_client_and_per_node() {
        let events = Arc::new(Events::new(caps(4, 2, 3)));
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let first = events.subscribe(holder(a, "10.0.0.1")).unwrap();
        let _second = events.subscribe(holder(a, "10.0.0.2")).unwrap();
        assert!(
            events.subscribe(holder(a, "10.0.0.3")).is_err(),
            "a third for one account"
        );
        let _third = events.subscribe(holder(b, "10.0.0.1")).unwrap();
        let _fourth = events.subscribe(holder(c, "10.0.0.1")).unwrap();
        assert!(
            events
                .subscribe(holder(Uuid::new_v4(), "10.0.0.1"))
                .is_err(),
            "a fourth for one client"
        );
        assert!(
            events
                .subscribe(holder(Uuid::new_v4(), "10.0.0.9"))
                .is_err(),
            "a fifth on the node"
        );
        assert_eq!(events.open(), 4);
        drop(first);
        assert_eq!(events.open(), 3);
        assert!(
            events.subscribe(holder(a, "10.0.0.1")).is_ok(),
            "a place given back"
        );
    }

    #[test]
    fn session_notifications_name_a_known_reason() {
        let id = Uuid::new_v4();
        assert_eq!(
            parse_session_end(&format!("{id}:logout")),
            Some((id, "logout"))
        );
        assert_eq!(
            parse_session_end(&format!("{id}:something")),
            Some((id, "session_ended"))
        );
        assert_eq!(parse_session_end("x:logout"), None);
    }
}

#[cfg(test)]
mod stream_tests {
    use futures_util::StreamExt;

    use super::*;

    use super::tests::{caps, holder};

    fn watched(head: i64, seen: Option<i64>) -> Watched {
        Watched {
            vault_id: "v".into(),
            head,
            seen,
        }
    }

    /// The stream's next event, within two seconds.
    async fn next_within<S>(stream: &mut S) -> Event
    where
        S: futures_util::Stream<Item = Result<Event, std::convert::Infallible>> + Unpin,
    {
        tokio::time::timeout(Duration::from_secs(2), stream.next())
            .await
            .expect("an event within 2 s")
            .expect("the stream goes on")
            .expect("infallible")
    }

    /// The text of an SSE event as the stream frames it.
    fn text(event: Event) -> String {
        format!("{event:?}")
    }

    /// A consumer that does not read is buffered nothing: when it reads,
    /// it gets the vault's latest sequence once; the vault's channel goes
    /// with its last stream.
    #[tokio::test]
    async fn a_stream_that_does_not_read_gets_the_latest_and_nothing_piles_up() {
        let events = Arc::new(Events::new(caps(10, 10, 10)));
        let vault = Uuid::new_v4();
        let slot = events
            .subscribe(holder(Uuid::new_v4(), "10.0.0.1"))
            .unwrap();
        let stream = watch(events.follow(vault), slot, watched(0, None), None);
        let mut stream = Box::pin(stream);
        // The head comes first.
        assert!(stream.next().await.is_some());
        for sequence in 1..=10_000 {
            events.publish(&VaultEvent { vault, sequence }.payload());
        }
        let latest = next_within(&mut stream).await;
        assert!(text(latest).contains("10000"));
        assert!(
            tokio::time::timeout(Duration::from_millis(100), stream.next())
                .await
                .is_err(),
            "one event for the ten thousand"
        );
        assert_eq!(events.followed(), 1);
        drop(stream);
        assert_eq!(events.open(), 0, "its place given back");
        assert_eq!(events.followed(), 0, "the vault's channel gone with it");
    }

    #[tokio::test]
    async fn a_stream_ends_with_its_session_and_when_idle() {
        let events = Arc::new(Events::new(caps(10, 10, 10)));
        let vault = Uuid::new_v4();
        let who = holder(Uuid::new_v4(), "10.0.0.1");
        let slot = events.subscribe(who).unwrap();
        let mut stream = Box::pin(watch(events.follow(vault), slot, watched(0, Some(0)), None));
        events.notified(
            SESSIONS_CHANNEL,
            &format!("{}:password_changed", Uuid::new_v4()),
        );
        events.notified(
            SESSIONS_CHANNEL,
            &format!("{}:password_changed", who.session),
        );
        let last = next_within(&mut stream).await;
        assert!(text(last).contains("password_changed"));
        assert!(stream.next().await.is_none());
        // Idle: nothing sent for max_idle.
        let events = Arc::new(Events::new(StreamCaps {
            max_idle: Duration::from_millis(100),
            ..caps(10, 10, 10)
        }));
        let slot = events
            .subscribe(holder(Uuid::new_v4(), "10.0.0.1"))
            .unwrap();
        let mut stream = Box::pin(watch(events.follow(vault), slot, watched(0, Some(0)), None));
        let last = next_within(&mut stream).await;
        assert!(text(last).contains("idle"));
        // Expiry: the token's end.
        let mut who = holder(Uuid::new_v4(), "10.0.0.1");
        who.expires = SystemTime::now() + Duration::from_millis(100);
        let slot = events.subscribe(who).unwrap();
        let mut stream = Box::pin(watch(events.follow(vault), slot, watched(0, Some(0)), None));
        let last = next_within(&mut stream).await;
        assert!(text(last).contains("session_expired"));
    }

    #[tokio::test]
    async fn only_the_watched_vault_and_only_newer_sequences_are_sent() {
        let events = Arc::new(Events::new(caps(10, 10, 10)));
        let (vault, other) = (Uuid::new_v4(), Uuid::new_v4());
        let slot = events
            .subscribe(holder(Uuid::new_v4(), "10.0.0.1"))
            .unwrap();
        // Resumed at 5 with the head at 5: no head event.
        let mut stream = Box::pin(watch(events.follow(vault), slot, watched(5, Some(5)), None));
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
