//! Connection slots: which connections hold a place under
//! `api.max_connections` and `api.max_connections_per_client`, and which
//! one gives its place up when the node is full.
//!
//! A slow-connection attack fills a server by holding connections that
//! never finish a request. Here a connection that has no request open (a
//! handshake or headers still arriving, or an idle keep-alive) holds its
//! place only until a newer client needs it: at the cap, the one that has
//! waited longest without progress is closed and the newcomer takes its
//! place. Only when every counted connection is answering a request is a
//! new one refused. So an attacker can delay an ordinary client by the
//! time it takes to accept, never shut it out.
//!
//! Streams (long-lived responses such as `GET /sync/events`) have their
//! own caps in the API; a connection carrying one leaves the count here
//! while it does, so streams cannot starve requests of places.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// What a connection has been doing: its deadlines and whether it may be
/// closed for a newcomer.
pub(crate) struct ConnState {
    epoch: Instant,
    /// Milliseconds since `epoch` of the last byte read or written.
    last_io: AtomicU64,
    /// Milliseconds since `epoch` when the last request finished.
    last_answer: AtomicU64,
    open_requests: AtomicUsize,
    any_request: AtomicBool,
    /// Set when the connection was chosen to make room; it closes at once.
    evicted: Notify,
    /// Response bytes this connection holds reserved (`budget`).
    pub(crate) response_bytes: AtomicUsize,
}

impl ConnState {
    fn new() -> ConnState {
        ConnState {
            epoch: Instant::now(),
            last_io: AtomicU64::new(0),
            last_answer: AtomicU64::new(0),
            open_requests: AtomicUsize::new(0),
            any_request: AtomicBool::new(false),
            evicted: Notify::new(),
            response_bytes: AtomicUsize::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(crate) fn touch(&self) {
        self.last_io.store(self.now_ms(), Ordering::Relaxed);
    }

    pub(crate) fn request_started(&self) {
        self.any_request.store(true, Ordering::Release);
        self.open_requests.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn request_finished(&self) {
        let now = self.now_ms();
        self.last_io.store(now, Ordering::Relaxed);
        self.last_answer.store(now, Ordering::Relaxed);
        self.open_requests.fetch_sub(1, Ordering::AcqRel);
    }

    /// When the connection should be closed if nothing changes, or None
    /// while a request is being answered (`api.request_timeout` and
    /// `api.body_timeout` bound those).
    pub(crate) fn deadline(
        &self,
        header_timeout: Duration,
        idle_timeout: Duration,
    ) -> Option<Instant> {
        if self.open_requests.load(Ordering::Acquire) > 0 {
            return None;
        }
        if !self.any_request.load(Ordering::Acquire) {
            // Handshake and first headers count from the accept, however
            // slowly the bytes trickle in.
            return Some(self.epoch + header_timeout);
        }
        let last = Duration::from_millis(self.last_io.load(Ordering::Relaxed));
        Some(self.epoch + last + idle_timeout)
    }

    /// Since when the connection has waited without a request open: its
    /// accept (no request yet) or its last answer. None while it answers.
    fn waiting_since(&self) -> Option<Instant> {
        if self.open_requests.load(Ordering::Acquire) > 0 {
            return None;
        }
        if !self.any_request.load(Ordering::Acquire) {
            return Some(self.epoch);
        }
        let last = self.last_answer.load(Ordering::Relaxed);
        Some(self.epoch + Duration::from_millis(last))
    }

    /// Resolves once this connection was closed to make room.
    pub(crate) async fn evicted(&self) {
        self.evicted.notified().await
    }
}

/// Why a new connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every counted connection is answering a request.
    MaxConnections,
    /// This client holds `api.max_connections_per_client` already.
    MaxPerClient,
}

impl Refused {
    pub fn setting(self) -> &'static str {
        match self {
            Refused::MaxConnections => "max_connections",
            Refused::MaxPerClient => "max_connections_per_client",
        }
    }
}

struct Held {
    state: Arc<ConnState>,
    /// The client's key, or None for a trusted proxy (exempt per client).
    client: Option<IpAddr>,
    /// Streams this connection carries; while any, it is not counted.
    streams: usize,
}

#[derive(Default)]
struct Table {
    next: u64,
    held: HashMap<u64, Held>,
    /// Connections counted against `max` (those carrying no stream).
    counted: usize,
    clients: HashMap<IpAddr, usize>,
}

impl Table {
    fn release_client(&mut self, client: Option<IpAddr>) {
        if let Some(client) = client
            && let Some(open) = self.clients.get_mut(&client)
        {
            *open -= 1;
            if *open == 0 {
                self.clients.remove(&client);
            }
        }
    }

    /// Takes `id` out of the table, giving back its places.
    fn remove(&mut self, id: u64) -> Option<Held> {
        let held = self.held.remove(&id)?;
        if held.streams == 0 {
            self.counted -= 1;
        }
        self.release_client(held.client);
        Some(held)
    }

    /// The counted connection that has waited longest without a request.
    fn longest_waiting(&self) -> Option<u64> {
        self.held
            .iter()
            .filter(|(_, held)| held.streams == 0)
            .filter_map(|(id, held)| Some((held.state.waiting_since()?, *id)))
            .min()
            .map(|(_, id)| id)
    }
}

/// Every open connection of the public listener.
pub struct Slots {
    max: usize,
    max_per_client: usize,
    table: Mutex<Table>,
}

/// A connection's place, given back when the connection ends.
pub(crate) struct Slot {
    slots: Arc<Slots>,
    id: u64,
    pub(crate) state: Arc<ConnState>,
}

impl Slots {
    pub fn new(max: usize, max_per_client: usize) -> Arc<Slots> {
        Arc::new(Slots {
            max,
            max_per_client,
            table: Mutex::new(Table::default()),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a new connection of `client` (None: a trusted proxy),
    /// closing the longest-waiting connection when the node is full.
    /// Returns the slot and whether a connection was closed for it.
    pub(crate) fn admit(self: &Arc<Self>, client: Option<IpAddr>) -> Result<(Slot, bool), Refused> {
        let mut table = self.table();
        if let Some(client) = client
            && table.clients.get(&client).copied().unwrap_or(0) >= self.max_per_client
        {
            return Err(Refused::MaxPerClient);
        }
        let mut evicted = false;
        // More than one only after streams ended and their connections
        // were counted again.
        while table.counted >= self.max {
            let victim = table.longest_waiting().ok_or(Refused::MaxConnections)?;
            let held = table.remove(victim).expect("found in the table");
            held.state.evicted.notify_one();
            evicted = true;
        }
        let id = table.next;
        table.next += 1;
        let state = Arc::new(ConnState::new());
        table.held.insert(
            id,
            Held {
                state: state.clone(),
                client,
                streams: 0,
            },
        );
        table.counted += 1;
        if let Some(client) = client {
            *table.clients.entry(client).or_insert(0) += 1;
        }
        Ok((
            Slot {
                slots: self.clone(),
                id,
                state,
            },
            evicted,
        ))
    }

    /// Connections open now, and how many of them count against the cap.
    pub fn open(&self) -> (usize, usize) {
        let table = self.table();
        (table.held.len(), table.counted)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Gone already when it was evicted.
        self.slots.table().remove(self.id);
    }
}

/// A connection as a request sees it (a request extension): lets a
/// long-lived response move the connection out of the request slots.
#[derive(Clone)]
pub struct ConnectionRef {
    slots: Arc<Slots>,
    id: u64,
    pub(crate) state: Arc<ConnState>,
}

impl ConnectionRef {
    pub(crate) fn of(slot: &Slot) -> ConnectionRef {
        ConnectionRef {
            slots: slot.slots.clone(),
            id: slot.id,
            state: slot.state.clone(),
        }
    }

    /// Marks a stream on this connection until the guard is dropped: the
    /// connection then counts against the stream caps only.
    pub fn stream(&self) -> StreamMark {
        let mut table = self.slots.table();
        if let Some(held) = table.held.get_mut(&self.id) {
            held.streams += 1;
            if held.streams == 1 {
                table.counted -= 1;
            }
        }
        StreamMark(self.clone())
    }
}

/// A stream's mark on its connection.
pub struct StreamMark(ConnectionRef);

impl Drop for StreamMark {
    fn drop(&mut self) {
        let mut table = self.0.slots.table();
        if let Some(held) = table.held.get_mut(&self.0.id) {
            held.streams -= 1;
            if held.streams == 0 {
                table.counted += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn a_full_node_closes_the_longest_waiting_connection() {
        let slots = Slots::new(3, 2);
        let (first, _) = slots.admit(ip("10.0.0.1")).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let (second, _) = slots.admit(ip("10.0.0.2")).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let (third, _) = slots.admit(ip("10.0.0.3")).unwrap();
        // The second answers a request: it is never the one closed.
        second.state.request_started();
        let (_fourth, evicted) = slots.admit(ip("10.0.0.4")).unwrap();
        assert!(evicted);
        assert_eq!(slots.open(), (3, 3), "the first gave its place up");
        let (_fifth, evicted) = slots.admit(ip("10.0.0.5")).unwrap();
        assert!(evicted, "then the third");
        drop((first, third));
        assert_eq!(
            slots.open(),
            (3, 3),
            "evicted slots are not given back twice"
        );
    }

    #[test]
    fn when_every_connection_answers_a_newcomer_is_refused() {
        let slots = Slots::new(2, 2);
        let (a, _) = slots.admit(ip("10.0.0.1")).unwrap();
        let (b, _) = slots.admit(ip("10.0.0.2")).unwrap();
        a.state.request_started();
        b.state.request_started();
        assert_eq!(
            slots.admit(ip("10.0.0.3")).err(),
            Some(Refused::MaxConnections)
        );
        b.state.request_finished();
        assert!(slots.admit(ip("10.0.0.3")).is_ok(), "an idle one gives way");
    }

    #[test]
    fn per_client_places_and_streams_outside_the_count() {
        let slots = Slots::new(2, 2);
        let (a, _) = slots.admit(ip("10.0.0.1")).unwrap();
        let (_b, _) = slots.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(
            slots.admit(ip("10.0.0.1")).err(),
            Some(Refused::MaxPerClient)
        );
        assert!(
            slots.admit(None).is_ok(),
            "a trusted proxy is exempt per client"
        );
        // A connection carrying a stream leaves the count while it does.
        let slots = Slots::new(2, 4);
        let (s, _) = slots.admit(ip("10.0.0.1")).unwrap();
        s.state.request_started();
        let mark = ConnectionRef::of(&s).stream();
        let (_x, evicted) = slots.admit(ip("10.0.0.2")).unwrap();
        let (_y, evicted2) = slots.admit(ip("10.0.0.3")).unwrap();
        assert!(!evicted && !evicted2, "two places besides the stream");
        assert_eq!(slots.open(), (3, 2));
        drop(mark);
        assert_eq!(slots.open(), (3, 3), "counted again once its stream ends");
        drop(a);
    }
}
