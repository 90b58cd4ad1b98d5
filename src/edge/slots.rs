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

use std::collections::{HashMap, VecDeque};
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

    fn request_started(&self) {
        self.any_request.store(true, Ordering::Release);
        self.open_requests.fetch_add(1, Ordering::AcqRel);
    }

    fn request_finished(&self) {
        self.touch();
        self.open_requests.fetch_sub(1, Ordering::AcqRel);
    }

    fn answering(&self) -> bool {
        self.open_requests.load(Ordering::Acquire) > 0
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
    /// Bumped each time the connection starts waiting again (a request
    /// finished), so older entries of `waiting` are known stale.
    generation: u64,
}

#[derive(Default)]
struct Table {
    next: u64,
    held: HashMap<u64, Held>,
    /// Connections counted against `max` (those carrying no stream).
    counted: usize,
    clients: HashMap<IpAddr, usize>,
    /// Connections still in their TLS handshake, in the order accepted:
    /// `(id, generation)`. These are closed first: a client that finished
    /// its handshake has shown it is not merely holding a socket.
    handshaking: VecDeque<(u64, u64)>,
    /// Connections in the order they started waiting (handshake done, or a
    /// request finished). An entry is current while its generation is the
    /// connection's and the connection answers nothing; stale entries are
    /// skipped, so choosing whom to close is amortised O(1) however many
    /// connections are open.
    waiting: VecDeque<(u64, u64)>,
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

    fn current(&self, (id, generation): (u64, u64)) -> bool {
        self.held
            .get(&id)
            .is_some_and(|held| held.generation == generation)
    }

    /// The counted connection to close for a newcomer, taken off its
    /// queue: the oldest still in its handshake, else the one that has
    /// waited longest without a request.
    fn longest_waiting(&mut self) -> Option<u64> {
        for queue in [&mut self.handshaking, &mut self.waiting] {
            while let Some(entry) = queue.pop_front() {
                let Some(held) = self.held.get(&entry.0) else {
                    continue;
                };
                // Answering now, or streaming: it is queued again when it
                // next waits.
                if held.generation == entry.1 && held.streams == 0 && !held.state.answering() {
                    return Some(entry.0);
                }
            }
        }
        None
    }

    /// `id` waits again (its handshake done, or a request finished): at
    /// the back of `waiting`.
    fn wait_again(&mut self, id: u64) {
        if let Some(held) = self.held.get_mut(&id) {
            held.generation += 1;
            let entry = (id, held.generation);
            self.waiting.push_back(entry);
        }
        // Stale entries are dropped now and then, so the queues stay
        // within a small multiple of the open connections.
        let limit = 2 * self.held.len() + 64;
        if self.waiting.len() > limit || self.handshaking.len() > limit {
            let waiting = std::mem::take(&mut self.waiting);
            self.waiting = waiting.into_iter().filter(|e| self.current(*e)).collect();
            let handshaking = std::mem::take(&mut self.handshaking);
            self.handshaking = handshaking
                .into_iter()
                .filter(|e| self.current(*e))
                .collect();
        }
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
    /// With `handshake`, the connection starts in its TLS handshake (and
    /// is among the first closed for newcomers until `handshake_done`).
    pub(crate) fn admit(
        self: &Arc<Self>,
        client: Option<IpAddr>,
        handshake: bool,
    ) -> Result<(Slot, bool), Refused> {
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
                generation: 0,
            },
        );
        if handshake {
            table.handshaking.push_back((id, 0));
        } else {
            table.waiting.push_back((id, 0));
        }
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

    /// The TLS handshake completed: the connection now waits for its first
    /// request, behind every connection still in its handshake.
    pub(crate) fn handshake_done(&self) {
        self.slots.table().wait_again(self.id);
    }

    /// A request begins on this connection: it is not closed for a
    /// newcomer while it answers.
    pub(crate) fn request_started(&self) {
        self.state.request_started();
    }

    /// A request ended: the connection waits again, at the back of the
    /// queue of those that may be closed for a newcomer.
    pub(crate) fn request_finished(&self) {
        self.state.request_finished();
        if !self.state.answering() {
            self.slots.table().wait_again(self.id);
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
        let (first, _) = slots.admit(ip("10.0.0.1"), false).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let (second, _) = slots.admit(ip("10.0.0.2"), false).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let (third, _) = slots.admit(ip("10.0.0.3"), false).unwrap();
        // The second answers a request: it is never the one closed.
        ConnectionRef::of(&second).request_started();
        let (_fourth, evicted) = slots.admit(ip("10.0.0.4"), false).unwrap();
        assert!(evicted);
        assert_eq!(slots.open(), (3, 3), "the first gave its place up");
        let (_fifth, evicted) = slots.admit(ip("10.0.0.5"), false).unwrap();
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
        let (a, _) = slots.admit(ip("10.0.0.1"), false).unwrap();
        let (b, _) = slots.admit(ip("10.0.0.2"), false).unwrap();
        let (a, b) = (ConnectionRef::of(&a), ConnectionRef::of(&b));
        a.request_started();
        b.request_started();
        assert_eq!(
            slots.admit(ip("10.0.0.3"), false).err(),
            Some(Refused::MaxConnections)
        );
        b.request_finished();
        assert!(
            slots.admit(ip("10.0.0.3"), false).is_ok(),
            "an idle one gives way"
        );
    }

    #[test]
    fn per_client_places_and_streams_outside_the_count() {
        let slots = Slots::new(2, 2);
        let (a, _) = slots.admit(ip("10.0.0.1"), false).unwrap();
        let (_b, _) = slots.admit(ip("10.0.0.1"), false).unwrap();
        assert_eq!(
            slots.admit(ip("10.0.0.1"), false).err(),
            Some(Refused::MaxPerClient)
        );
        assert!(
            slots.admit(None, false).is_ok(),
            "a trusted proxy is exempt per client"
        );
        // A connection carrying a stream leaves the count while it does.
        let slots = Slots::new(2, 4);
        let (s, _) = slots.admit(ip("10.0.0.1"), false).unwrap();
        ConnectionRef::of(&s).request_started();
        let mark = ConnectionRef::of(&s).stream();
        let (_x, evicted) = slots.admit(ip("10.0.0.2"), false).unwrap();
        let (_y, evicted2) = slots.admit(ip("10.0.0.3"), false).unwrap();
        assert!(!evicted && !evicted2, "two places besides the stream");
        assert_eq!(slots.open(), (3, 2));
        drop(mark);
        assert_eq!(slots.open(), (3, 3), "counted again once its stream ends");
        drop(a);
    }

    #[test]
    fn connections_in_their_handshake_are_closed_first() {
        let slots = Slots::new(2, 4);
        let (done, _) = slots.admit(ip("10.0.0.1"), true).unwrap();
        let (_pending, _) = slots.admit(ip("10.0.0.2"), true).unwrap();
        let done = ConnectionRef::of(&done);
        done.handshake_done();
        let (_third, evicted) = slots.admit(ip("10.0.0.3"), true).unwrap();
        assert!(evicted);
        assert!(
            slots.table().held.contains_key(&done.id),
            "the older one finished its handshake: the newer one went"
        );
    }

    #[test]
    fn a_connection_that_just_answered_waits_at_the_back() {
        let slots = Slots::new(2, 4);
        let (old, _) = slots.admit(ip("10.0.0.1"), false).unwrap();
        let (_new, _) = slots.admit(ip("10.0.0.2"), false).unwrap();
        // The older connection answers a request: it now waited least.
        let old = ConnectionRef::of(&old);
        old.request_started();
        old.request_finished();
        let (_third, evicted) = slots.admit(ip("10.0.0.3"), false).unwrap();
        assert!(evicted);
        let table = slots.table();
        assert!(
            table.held.contains_key(&old.id),
            "the keep-alive one stayed"
        );
    }

    #[test]
    fn the_queue_of_waiting_connections_stays_small() {
        let slots = Slots::new(10, 10);
        let (slot, _) = slots.admit(None, false).unwrap();
        let conn = ConnectionRef::of(&slot);
        for _ in 0..10_000 {
            conn.request_started();
            conn.request_finished();
        }
        assert!(slots.table().waiting.len() <= 2 + 64 + 1);
    }
}
