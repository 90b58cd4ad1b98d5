//! The response budget: bytes of response bodies keepd holds for clients
//! that have not read them, bounded per node, per client and per
//! connection (`api.max_response_bytes*`).
//!
//! A large answer is reserved before it is built (a pull reserves its
//! page before Postgres sends it) and the reservation travels with the
//! body until the body is dropped, which hyper does once it has handed
//! the last byte to the connection. A client that never reads (an HTTP/2
//! window of zero, a TCP window that never opens) keeps its reservation,
//! so what it can pin is its budget, never more: past a budget a request
//! waits briefly for bytes to be released, then is refused (503).
//!
//! The body is handed over in chunks copied out of the answer, so once it
//! is dropped nothing of it lingers beyond the last chunk in flight.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use tokio::sync::Notify;

use super::slots::{ConnState, ConnectionRef};

/// Bytes handed to the connection at a time.
const CHUNK: usize = 64 * 1024;

/// Which budget a reservation did not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    Node,
    Client,
    Connection,
}

impl Exhausted {
    pub fn setting(self) -> &'static str {
        match self {
            Exhausted::Node => "api.max_response_bytes",
            Exhausted::Client => "api.max_response_bytes_per_client",
            Exhausted::Connection => "api.max_response_bytes_per_connection",
        }
    }
}

#[derive(Default)]
struct Used {
    node: usize,
    clients: HashMap<IpAddr, usize>,
}

/// The node's response budget.
pub struct ResponseBudget {
    node: usize,
    client: usize,
    connection: usize,
    used: Mutex<Used>,
    released: Notify,
}

impl ResponseBudget {
    pub fn new(node: usize, client: usize, connection: usize) -> Arc<ResponseBudget> {
        Arc::new(ResponseBudget {
            node,
            client,
            connection,
            used: Mutex::new(Used::default()),
            released: Notify::new(),
        })
    }

    /// The largest reservation that can ever succeed.
    pub fn largest(&self) -> usize {
        self.node.min(self.client).min(self.connection)
    }

    /// Bytes reserved on this node now (the tests read it).
    #[cfg(test)]
    fn used(&self) -> usize {
        self.lock().node
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Used> {
        self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn try_reserve(&self, conn: &ConnState, client: IpAddr, bytes: usize) -> Result<(), Exhausted> {
        let mut used = self.lock();
        if conn.response_bytes.load(Ordering::Acquire) + bytes > self.connection {
            return Err(Exhausted::Connection);
        }
        let of_client = used.clients.get(&client).copied().unwrap_or(0);
        if of_client + bytes > self.client {
            return Err(Exhausted::Client);
        }
        if used.node + bytes > self.node {
            return Err(Exhausted::Node);
        }
        used.node += bytes;
        *used.clients.entry(client).or_insert(0) += bytes;
        conn.response_bytes.fetch_add(bytes, Ordering::AcqRel);
        Ok(())
    }

    fn release(&self, conn: &ConnState, client: IpAddr, bytes: usize) {
        if bytes == 0 {
            return;
        }
        {
            let mut used = self.lock();
            used.node -= bytes;
            if let Some(of_client) = used.clients.get_mut(&client) {
                *of_client -= bytes;
                if *of_client == 0 {
                    used.clients.remove(&client);
                }
            }
            conn.response_bytes.fetch_sub(bytes, Ordering::AcqRel);
        }
        self.released.notify_waiters();
    }

    /// Reserves `bytes` (at most the smallest budget) for an answer to
    /// `client` on `conn`, waiting up to `wait` for others to be released.
    pub async fn reserve(
        self: &Arc<Self>,
        conn: &ConnectionRef,
        client: IpAddr,
        bytes: usize,
        wait: Duration,
    ) -> Result<Reservation, Exhausted> {
        let bytes = bytes.min(self.largest());
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before the attempt, so a release in between wakes it.
            let released = self.released.notified();
            match self.try_reserve(&conn.state, client, bytes) {
                Ok(()) => {
                    return Ok(Reservation {
                        budget: self.clone(),
                        conn: conn.state.clone(),
                        client,
                        bytes,
                    });
                }
                Err(exhausted) => {
                    if tokio::time::timeout_at(deadline, released).await.is_err() {
                        return Err(exhausted);
                    }
                }
            }
        }
    }
}

/// Bytes reserved for one answer, released when dropped.
pub struct Reservation {
    budget: Arc<ResponseBudget>,
    conn: Arc<ConnState>,
    client: IpAddr,
    bytes: usize,
}

impl Reservation {
    /// Gives back what the answer turned out not to need.
    pub fn shrink_to(&mut self, bytes: usize) {
        if bytes < self.bytes {
            self.budget
                .release(&self.conn, self.client, self.bytes - bytes);
            self.bytes = bytes;
        }
    }

    /// `answer` as a response body that holds this reservation until the
    /// connection has taken all of it.
    pub fn body(mut self, answer: Vec<u8>) -> axum::body::Body {
        self.shrink_to(answer.len());
        axum::body::Body::new(Budgeted {
            answer,
            sent: 0,
            _reservation: self,
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.release(&self.conn, self.client, self.bytes);
    }
}

/// A body handed over in copied chunks, holding its reservation.
struct Budgeted {
    answer: Vec<u8>,
    sent: usize,
    _reservation: Reservation,
}

impl hyper::body::Body for Budgeted {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let start = self.sent;
        if start >= self.answer.len() {
            return Poll::Ready(None);
        }
        let end = (start + CHUNK).min(self.answer.len());
        self.sent = end;
        let chunk = Bytes::copy_from_slice(&self.answer[start..end]);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent >= self.answer.len()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact((self.answer.len() - self.sent) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::super::slots::Slots;
    use super::*;

    #[tokio::test]
    async fn reservations_hold_every_budget_and_wake_waiters() {
        let budget = ResponseBudget::new(100, 60, 40);
        let slots = Slots::new(10, 10);
        let (a, _) = slots.admit(None, false).unwrap();
        let (b, _) = slots.admit(None, false).unwrap();
        let (c, _) = slots.admit(None, false).unwrap();
        let (a, b, c) = (
            ConnectionRef::of(&a),
            ConnectionRef::of(&b),
            ConnectionRef::of(&c),
        );
        let one: IpAddr = "10.0.0.1".parse().unwrap();
        let two: IpAddr = "10.0.0.2".parse().unwrap();
        let no_wait = Duration::ZERO;
        let first = budget.reserve(&a, one, 40, no_wait).await.unwrap();
        assert_eq!(
            budget.reserve(&a, one, 1, no_wait).await.err(),
            Some(Exhausted::Connection)
        );
        let mut second = budget.reserve(&b, one, 20, no_wait).await.unwrap();
        assert_eq!(
            budget.reserve(&b, one, 1, no_wait).await.err(),
            Some(Exhausted::Client)
        );
        let _third = budget.reserve(&c, two, 40, no_wait).await.unwrap();
        assert_eq!(
            budget.reserve(&c, two, 1, no_wait).await.err(),
            Some(Exhausted::Connection)
        );
        assert_eq!(budget.used(), 100);
        second.shrink_to(5);
        assert_eq!(budget.used(), 85);
        // A waiter is woken by a release.
        let waiter = {
            let budget = budget.clone();
            let b = b.clone();
            tokio::spawn(async move { budget.reserve(&b, one, 30, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        let got = waiter.await.unwrap().unwrap();
        assert_eq!(budget.used(), 85 - 40 + 30);
        drop(got);
        assert_eq!(budget.used(), 45);
    }

    #[tokio::test]
    async fn a_body_keeps_its_reservation_until_dropped() {
        use http_body_util::BodyExt;
        let budget = ResponseBudget::new(1 << 20, 1 << 20, 1 << 20);
        let slots = Slots::new(10, 10);
        let (slot, _) = slots.admit(None, false).unwrap();
        let conn = ConnectionRef::of(&slot);
        let reservation = budget
            .reserve(&conn, "10.0.0.1".parse().unwrap(), 1 << 20, Duration::ZERO)
            .await
            .unwrap();
        let answer = vec![7u8; 200_000];
        let body = reservation.body(answer.clone());
        assert_eq!(budget.used(), 200_000, "shrunk to the answer");
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(collected.as_ref(), answer.as_slice());
        assert_eq!(budget.used(), 0, "released once the body is gone");
    }
}
