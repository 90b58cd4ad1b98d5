//! Long-lived answers (`GET /sync/events`) over HTTP/1.1 without hyper's
//! per-connection buffers.
//!
//! hyper holds about 20 KiB for every HTTP/1 connection for as long as it
//! is open: an 8 KiB read buffer it reserves again while an answer
//! streams, an 8 KiB buffer for the answer's head, its connection state
//! (neither buffer has a setting in hyper 1.x). For 10 000 event streams
//! that carry a few bytes a minute, that was 280 MiB. So the first request
//! of a connection is read here, into one small buffer freed at once; when
//! it asks for one of the paths the router names as streams
//! (`EdgeSettings::stream_paths`) and asks nothing more of HTTP (GET,
//! HTTP/1.1, no body, no upgrade, nothing sent after it, the whole head
//! in `HEAD_LIMIT` bytes), it goes through the router as any request
//! does and its answer is written here, with `connection: close`: one
//! request on such a connection. Every other connection goes to hyper with
//! the bytes read so far handed back first (`Prefixed`), so anything this
//! module would have to think about is hyper's to judge.
//!
//! What it does not know: what the stream says (the router answers), or
//! HTTP beyond writing one answer: no keep-alive, no request bodies, no
//! pipelining, no HTTP/1.0 or HTTP/2.

use std::io;
use std::pin::pin;
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, HttpBody};
use http_body_util::BodyExt;
use hyper::http::{
    self, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, Version, header,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Served;

/// The largest request head served here; a longer one goes to hyper.
pub(super) const HEAD_LIMIT: usize = 4096;
/// Headers a request served here may carry; more go to hyper (whose own
/// limit is 100).
const MAX_HEADERS: usize = 48;

/// A connection's first request, as far as this module cares.
pub(super) enum First {
    /// A request for a stream path, ready for the router.
    Stream(Box<Request<Body>>),
    /// Anything else: the bytes read so far, for hyper to read first.
    Other(Vec<u8>),
}

/// Reads the start of a connection until it is clear whether its first
/// request is a stream this module serves. The caller bounds the wait.
pub(super) async fn first_request<S>(io: &mut S, paths: &[&str]) -> io::Result<First>
where
    S: AsyncRead + Unpin,
{
    let mut head = Vec::with_capacity(HEAD_LIMIT);
    loop {
        // The capacity is never exceeded: read_buf fills what is spare.
        if io.read_buf(&mut head).await? == 0 {
            return Ok(First::Other(head));
        }
        match classify(&head, paths) {
            Class::Undecided if head.len() < HEAD_LIMIT => continue,
            Class::Stream(request) => return Ok(First::Stream(request)),
            Class::Undecided | Class::Other => return Ok(First::Other(head)),
        }
    }
}

enum Class {
    Undecided,
    Stream(Box<Request<Body>>),
    Other,
}

/// Whether `head` could be, so far, the request line of a GET of `path`
/// (the path itself or the path and a query).
fn asks_for(head: &[u8], path: &str) -> bool {
    let line = b"GET ".iter().chain(path.as_bytes());
    head.iter().zip(line).all(|(a, b)| a == b)
        && head
            .get(4 + path.len())
            .is_none_or(|&after| after == b' ' || after == b'?')
}

/// Whether `head` (the bytes read so far) is a whole request for one of
/// `paths` that this module may answer.
fn classify(head: &[u8], paths: &[&str]) -> Class {
    // Most connections are decided by their first bytes, with no parsing.
    if !paths.iter().any(|path| asks_for(head, path)) {
        return Class::Other;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(head) {
        // Bytes after the head would be a body or a pipelined request.
        Ok(httparse::Status::Complete(length)) if length == head.len() => {}
        Ok(httparse::Status::Partial) => return Class::Undecided,
        _ => return Class::Other,
    }
    if parsed.version != Some(1) {
        return Class::Other;
    }
    let Some(Ok(uri)) = parsed.path.map(str::parse::<Uri>) else {
        return Class::Other;
    };
    let mut request = Request::new(Body::empty());
    *request.method_mut() = Method::GET;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    for field in parsed.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(field.name.as_bytes()),
            HeaderValue::from_bytes(field.value),
        ) else {
            return Class::Other;
        };
        // A body, an expectation or a change of protocol: hyper's.
        if [
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
            header::EXPECT,
            header::UPGRADE,
        ]
        .contains(&name)
        {
            return Class::Other;
        }
        request.headers_mut().append(name, value);
    }
    Class::Stream(Box::new(request))
}

/// Answers `request` on `io` and closes the connection once the answer
/// ends, the client goes away or sends anything more, the connection has
/// moved no byte for `api.idle_timeout` (a write included: a client that
/// stops reading is let go), or the node stops (after the grace hyper's
/// connections get).
pub(super) async fn answer<S>(mut io: S, request: Request<Body>, served: Served<'_>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Served {
        peer,
        router,
        settings,
        handle,
        mut stop,
        ..
    } = served;
    let state = handle.connection.state.clone();
    let response = super::route(&router, peer, &handle, request).await;
    drop(handle);
    let (parts, body) = response.into_parts();
    let framing = Framing::of(&parts, &body);
    let within = settings.idle_timeout;
    if !send(&mut io, &head(&parts, framing), within).await {
        return;
    }
    drop(parts);
    let mut body = pin!(body);
    let mut closing: Option<Instant> = None;
    let mut byte = [0u8; 1];
    loop {
        let idle = settings
            .deadline(&state)
            .unwrap_or_else(|| Instant::now() + settings.idle_timeout);
        let wake = closing.map_or(idle, |grace_end| grace_end.min(idle));
        let bytes = tokio::select! {
            frame = body.frame() => match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => framing.frame(&data),
                    _ => continue,
                },
                // A body that fails is cut off: an unfinished chunked
                // answer tells the client it is incomplete.
                Some(Err(_)) => return,
                None => {
                    if framing == Framing::Chunked {
                        send(&mut io, b"0\r\n\r\n", within).await;
                    }
                    let _ = tokio::time::timeout(within, io.shutdown()).await;
                    return;
                }
            },
            // The client closed, failed, or sent more on a connection
            // whose answer said it closes.
            _ = io.read(&mut byte) => return,
            _ = tokio::time::sleep_until(wake.into()) => {
                let now = Instant::now();
                let idle = settings.deadline(&state);
                if closing.is_some_and(|grace_end| grace_end <= now)
                    || idle.is_some_and(|deadline| deadline <= now)
                {
                    return;
                }
                continue;
            }
            _ = state.evicted() => return,
            _ = stop.requested(), if closing.is_none() => {
                closing = Some(Instant::now() + settings.stop_grace());
                continue;
            }
        };
        if !send(&mut io, &bytes, within).await {
            return;
        }
    }
}

/// Writes `bytes` within `within`: a client that stops reading does not
/// hold its connection past `api.idle_timeout`.
async fn send<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8], within: Duration) -> bool {
    let written = tokio::time::timeout(within, async {
        io.write_all(bytes).await?;
        io.flush().await
    });
    matches!(written.await, Ok(Ok(())))
}

/// How the answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body may follow (204, 304).
    None,
    Length(u64),
    Chunked,
}

impl Framing {
    /// One piece of the body as it goes on the wire.
    fn frame(self, data: &[u8]) -> Vec<u8> {
        match self {
            Framing::Chunked => {
                let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
                chunk.extend_from_slice(data);
                chunk.extend_from_slice(b"\r\n");
                chunk
            }
            Framing::Length(_) | Framing::None => data.to_vec(),
        }
    }

    fn of(parts: &http::response::Parts, body: &Body) -> Framing {
        if parts.status == StatusCode::NO_CONTENT || parts.status == StatusCode::NOT_MODIFIED {
            return Framing::None;
        }
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        match declared.or(HttpBody::size_hint(body).exact()) {
            Some(length) => Framing::Length(length),
            None => Framing::Chunked,
        }
    }
}

/// The status line and headers; the connection's own headers (length,
/// framing, `connection`, `date`) are made here, not taken from the
/// answer.
fn head(parts: &http::response::Parts, framing: Framing) -> Vec<u8> {
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\n",
            parts.status.as_str(),
            parts.status.canonical_reason().unwrap_or("")
        )
        .as_bytes(),
    );
    let own = [
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::CONNECTION,
        header::DATE,
    ];
    for (name, value) in parts.headers.iter().filter(|(name, _)| !own.contains(name)) {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::None => {}
        Framing::Length(length) => {
            head.extend_from_slice(format!("content-length: {length}\r\n").as_bytes())
        }
        Framing::Chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    head.extend_from_slice(b"connection: close\r\n");
    head.extend_from_slice(
        format!(
            "date: {}\r\n\r\n",
            httpdate::fmt_http_date(SystemTime::now())
        )
        .as_bytes(),
    );
    head
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATHS: &[&str] = &["/sync/events"];

    fn class(head: &str) -> &'static str {
        match classify(head.as_bytes(), PATHS) {
            Class::Undecided => "undecided",
            Class::Stream(_) => "stream",
            Class::Other => "other",
        }
    }

    #[test]
    fn only_a_whole_plain_get_of_a_stream_path_is_served_here() {
        let ok =
            "GET /sync/events?vaultId=v HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\r\n";
        assert_eq!(class(ok), "stream");
        let Class::Stream(request) = classify(ok.as_bytes(), PATHS) else {
            unreachable!()
        };
        assert_eq!(request.uri(), "/sync/events?vaultId=v");
        assert_eq!(request.headers()["authorization"], "Bearer t");
        assert_eq!(class("GET /sync/events HTTP/1.1\r\n\r\n"), "stream");
        // Decided by the first bytes, before the head is whole.
        for other in [
            "GET /health HTTP/1.1\r\n",
            "POST /sync/events HTTP/1.1\r\n",
            "HEAD /sync/events HTTP/1.1\r\n",
            "GET /sync/eventsX HTTP/1.1\r\n",
            "GET /sync/events/x HTTP/1.1\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "\x16\x03\x01",
        ] {
            assert_eq!(class(other), "other", "{other:?}");
        }
        for partial in [
            "G",
            "GET /sync/ev",
            "GET /sync/events",
            "GET /sync/events?v=1 HTTP/1.1\r\nHost: x\r\n",
        ] {
            assert_eq!(class(partial), "undecided", "{partial:?}");
        }
        // Anything unusual is hyper's.
        for unusual in [
            "GET /sync/events HTTP/1.0\r\n\r\n",
            "GET /sync/events HTTP/1.1\r\nContent-Length: 1\r\n\r\nx",
            "GET /sync/events HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "GET /sync/events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /sync/events HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "GET /sync/events HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET /sync/events HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\n\r\n",
            "GET /sync/events HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET /sync/events HTTP/1.1\r\nX: \x01\r\n\r\n",
        ] {
            assert_eq!(class(unusual), "other", "{unusual:?}");
        }
        let many = format!(
            "GET /sync/events HTTP/1.1\r\n{}\r\n",
            "X-A: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(class(&many), "other");
    }

    #[tokio::test]
    async fn a_head_arriving_in_pieces_is_read_whole_and_a_long_one_goes_to_hyper() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let reading = tokio::spawn(async move { first_request(&mut server, PATHS).await });
        for piece in [
            "GET /sync/",
            "events?vaultId=v HTTP/1.1\r\n",
            "Host: x\r\n\r\n",
        ] {
            client.write_all(piece.as_bytes()).await.unwrap();
            tokio::task::yield_now().await;
        }
        assert!(matches!(reading.await.unwrap().unwrap(), First::Stream(_)));

        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let reading = tokio::spawn(async move { first_request(&mut server, PATHS).await });
        let long = format!(
            "GET /sync/events HTTP/1.1\r\nX-Long: {}\r\n\r\n",
            "a".repeat(HEAD_LIMIT)
        );
        client.write_all(long.as_bytes()).await.unwrap();
        let First::Other(read) = reading.await.unwrap().unwrap() else {
            panic!("a head past HEAD_LIMIT is hyper's")
        };
        assert_eq!(read.len(), HEAD_LIMIT);
        assert_eq!(read, long.as_bytes()[..HEAD_LIMIT]);

        // A client that closes early leaves hyper what it sent.
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET /sync/ev").await.unwrap();
        drop(client);
        let First::Other(read) = first_request(&mut server, PATHS).await.unwrap() else {
            panic!("an early close is hyper's")
        };
        assert_eq!(read, b"GET /sync/ev");
    }

    #[test]
    fn framing_follows_the_answer() {
        let parts = |status: u16| {
            let (parts, ()) = http::Response::builder()
                .status(status)
                .body(())
                .unwrap()
                .into_parts();
            parts
        };
        assert_eq!(Framing::of(&parts(204), &Body::empty()), Framing::None);
        assert_eq!(
            Framing::of(&parts(401), &Body::from("{}")),
            Framing::Length(2)
        );
        let streamed =
            Body::from_stream(futures_util::stream::empty::<Result<Vec<u8>, io::Error>>());
        assert_eq!(Framing::of(&parts(200), &streamed), Framing::Chunked);
    }
}
