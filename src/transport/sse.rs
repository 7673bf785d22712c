//! `GET /sse?channel=a&channel=b[&events=x,y]`: Server-Sent Events.
//!
//! Framing only: the [`Session`] does admission, subscriptions, resume and
//! the credential watch; this file turns its [`Event`]s into SSE blocks.
//! Everything that can be refused is refused before the stream opens, with
//! a status code a browser's `EventSource` (and its developer tools) shows.
//! The response headers are sent only once every channel is subscribed, so
//! an open stream means nothing published from then on is missed.
//!
//! hyper writes the response head; then the stream leaves hyper
//! ([`crate::link`]) and its task writes the body itself, one chunk per
//! wake-up (the bytes as they are for an HTTP/1.0 client). The body ends
//! on the session's own signals (queue overflow, its turn in the drain,
//! the credential's end). Every stream
//! starts with a cursor (`id:`) and every history event carries one, so a
//! reconnecting `EventSource` resumes where it was, on any instance.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;

use crate::app::{App, ConnInfo};
use crate::config::Compression;
use crate::fdlimit::Slot;
use crate::history::Cursor;
use crate::http::{rejected, Body, StreamQuery};
use crate::link::{Gone, HandoffBody, Link, Out};
use crate::metrics::Counted;
use crate::metrics::Transport;
use crate::origin::add_cors;
use crate::protocol::{Deflate, Encoder, Encoding, Publication};
use crate::refusal::Refusal;
use crate::session::Request as Subscription;
use crate::session::{admit, Event, Session, Start, Wire};
use crate::transport::deflate;

/// Answers a `/sse` request: an error status, or an endless event stream.
pub(crate) async fn handle<B>(app: Arc<App>, req: Request<B>, info: ConnInfo) -> Response<Body> {
    match open(Arc::clone(&app), req, info).await {
        Ok(r) => r,
        Err(refusal) => rejected(&app.metrics, &refusal),
    }
}

async fn open<B>(
    app: Arc<App>,
    req: Request<B>,
    info: ConnInfo,
) -> Result<Response<Body>, Refusal> {
    let query = StreamQuery::parse(req.uri()).map_err(Refusal::BadRequest)?;
    if query.channels.is_empty() {
        let reason = "give at least one channel: /sse?channel=NAME";
        return Err(Refusal::BadRequest(reason.into()));
    }
    let peer = info.peer.ip();
    let admission = admit(
        &app,
        Transport::Sse,
        req.headers(),
        req.uri(),
        peer,
        &query.channels,
    );
    let admission = admission.await?;
    let cursor = match last_event_id(&req) {
        None => None,
        Some(text) => Some(Cursor::decode(&text).map_err(|_| {
            Refusal::BadRequest("bad Last-Event-ID: not a cursor crier issued".into())
        })?),
    };
    let origin = admission.origin.clone();
    let wire = Wire {
        transport: Transport::Sse,
        heartbeat: app.config.sse.heartbeat,
        idle_timeout: None,
        replay_overhead: cursor_bytes(&query.channels),
        replay_bytes: |p| p.sse.len(),
        peer: info.peer,
    };
    let mut session = Session::open(Arc::clone(&app), admission, wire);
    for channel in &query.channels {
        let oldest = query.from_oldest;
        let start = match cursor.as_ref().map(|c| c.0.get(channel)) {
            Some(Some(since)) => Start::After(*since),
            Some(None) => Start::Returning { oldest },
            None if oldest => Start::Oldest,
            None => Start::Now,
        };
        let request = Subscription {
            events: query.events.clone(),
            start,
            ..Subscription::new(channel.as_str())
        };
        session.subscribe(request).await?;
    }
    let span = session.span();
    span.in_scope(|| tracing::debug!(channels = ?query.channels, resumed = cursor.is_some(), "sse stream opened"));

    let chunked = req.version() >= Version::HTTP_11;
    let sse = &app.config.sse;
    let deflate =
        (sse.compression == Compression::Auto && accepts_deflate(req.headers())).then(|| {
            Box::new(Compressing {
                deflate: Deflate {
                    level: app.config.ws.compression_level,
                    min_bytes: 0,
                    metrics: app.metrics.clone(),
                },
                // Counted while the stream lasts, however it ends.
                _counted: Counted::new(&app.metrics.sse_compressed_connections),
            })
        });
    let compressed = deflate.is_some();
    let live = Live {
        session,
        opened: false,
        chunked,
        done: false,
        deflate,
        // The socket's descriptor slot goes where the socket goes.
        _slot: info.slot.clone(),
    };
    // hyper writes the head, then the stream leaves hyper (see
    // `crate::link`): the body only signals that the head is out.
    let stall = app.config.sse.write_timeout;
    let slow = app.metrics.slow_client_disconnects.clone();
    let task_app = Arc::clone(&app);
    info.handoff.offer(Box::new(move |stream| {
        let link = Link::new(stream, stall, slow);
        task_app.process.tasks.spawn(live.run(link));
    }));
    let body = HandoffBody(Arc::clone(&info.handoff)).boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if compressed {
        headers.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static("deflate"),
        );
    }
    add_cors(headers, &origin);
    // What a cache between crier and the client must tell apart (a stream
    // is not cached, but a proxy may still key on it).
    if sse.compression == Compression::Auto {
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    Ok(response)
}

/// What each replayed event's cursor may cost: every channel's name and
/// id, base64-encoded.
fn cursor_bytes(channels: &[String]) -> usize {
    channels
        .iter()
        .map(|c| c.len() + 32)
        .sum::<usize>()
        .saturating_mul(4)
        / 3
        + 8
}

/// Events written per wake-up at most: enough to batch a burst into one
/// write, few enough that one stream does not hold a core for long.
const WRITE_BATCH: usize = 64;
/// Room left before a batch for its chunk-size line.
const CHUNK_HEAD: usize = 10;

/// A live stream; dropping it (client gone, stream ended) ends the session.
struct Live {
    session: Session,
    /// The first block is written: the reconnect delay and the starting
    /// cursor, so even a client that sees no message resumes right (and
    /// one whose channels keep no history learns, on its return, that it
    /// missed something).
    opened: bool,
    /// The head said `Transfer-Encoding: chunked` (an HTTP/1.1 request):
    /// each write is one chunk. (HTTP/1.0: the body ends with the
    /// connection.)
    chunked: bool,
    /// No more events: end once what is buffered is sent.
    done: bool,
    /// The stream is compressed (`Content-Encoding: deflate`): one raw
    /// deflate stream, each event's blocks made once per publication and
    /// shared, the stream's own bytes (its opening, `id:` lines with
    /// several channels, notices) as stored blocks.
    deflate: Option<Box<Compressing>>,
    /// Held while the stream lasts: its descriptor slot.
    _slot: Slot,
}

/// A compressed stream's settings, and its place in the count of
/// compressed streams.
struct Compressing {
    deflate: Deflate,
    _counted: Counted,
}

impl Live {
    /// Serves the stream on `link` until it ends, the client leaves or
    /// falls behind.
    ///
    /// The stream's task is this future, and an idle stream's memory is
    /// mostly its size: it is an `async` block over `self` and `link` in
    /// place (an `async fn` keeps a second copy of its arguments), every
    /// await inside is small, and rare paths box what they need.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn would keep a second copy of its arguments"
    )]
    fn run(mut self, mut link: Link) -> impl std::future::Future<Output = ()> + Send {
        async move {
            let encoder = match (&self.deflate, self.chunked) {
                (None, true) => Encoder::Plain(chunk),
                (None, false) => Encoder::Plain(plain),
                (Some(c), true) => Encoder::deflated(deflated_chunk, c.deflate.clone(), None),
                (Some(c), false) => Encoder::deflated(deflated, c.deflate.clone(), None),
            };
            self.session.attach(link.outlet(), encoder);
            loop {
                if self.opened {
                    // The session's next event, unless the client leaves.
                    // Nothing is buffered while it waits: the chunk's room
                    // is kept once there is something to put in it.
                    let next = poll_fn(|cx| {
                        if let Poll::Ready(event) = self.session.poll_next(cx) {
                            return Poll::Ready(Some(event));
                        }
                        link.socket.poll_closed(cx).map(|()| None)
                    });
                    let Some(event) = next.await else {
                        return;
                    };
                    self.open_chunk(&mut link.out);
                    if !self.batch(&mut link.out, event) {
                        return;
                    }
                } else {
                    self.open_chunk(&mut link.out);
                    self.opening(&mut link.out);
                }
                if self.done && self.deflate.is_some() {
                    link.out.extend_from_slice(&deflate::END);
                }
                let start = self.close_chunk(&mut link.out);
                if self.done && self.chunked {
                    link.out.extend_from_slice(b"0\r\n\r\n");
                }
                // A client that stopped reading is cut off as soon as its
                // queue overflows, or when the write stalls for too long.
                // Written at once when the socket takes it all; the wait
                // for a full socket is boxed, as it is rare and its future
                // is larger than all else this task holds.
                let written = match link.flush_now(start) {
                    Ok(None) => Ok(()),
                    Err(gone) => Err(gone),
                    Ok(Some(at)) => {
                        // `&mut`: the session is `Send`, not `Sync`.
                        let (session, link) = (&mut self.session, &mut link);
                        Box::pin(async move {
                            tokio::select! {
                                biased;
                                written = link.flush_from(at) => written,
                                () = session.slowed() => Err(Gone),
                            }
                        })
                        .await
                    }
                };
                if written.is_err() {
                    return;
                }
                if self.done {
                    link.finish();
                    return;
                }
            }
        }
    }

    /// Leaves room for the chunk-size line (a batch is framed in place,
    /// without moving it).
    fn open_chunk(&self, out: &mut Out) {
        if self.chunked {
            out.extend_from_slice(&[b' '; CHUNK_HEAD]);
        }
    }

    /// Frames the batch after [`Live::open_chunk`]'s room: the chunk-size
    /// line just before it, the chunk's end after it. Returns where the
    /// bytes to send start. An empty batch (only a direct write's rest to
    /// send) is no chunk at all: an empty chunk would end the body.
    fn close_chunk(&self, out: &mut Out) -> usize {
        if !self.chunked {
            return 0;
        }
        let len = out.len() - CHUNK_HEAD;
        if len == 0 {
            out.clear();
            return 0;
        }
        let head = format!("{len:x}\r\n");
        let at = CHUNK_HEAD - head.len();
        out.own()[at..CHUNK_HEAD].copy_from_slice(head.as_bytes());
        out.extend_from_slice(b"\r\n");
        at
    }

    /// The first block (see [`Live::opened`]).
    fn opening(&mut self, out: &mut Out) {
        let opening = format!(
            "retry: {}\nid: {}\n\n",
            self.session.app().config.sse.retry.as_millis(),
            self.session.tracker().cursor().encode()
        );
        self.own(out, opening.as_bytes());
        self.opened = true;
    }

    /// Appends the session's `event`, with every publication already
    /// queued behind it (up to a batch). `false`: the stream ends now,
    /// without a last word (the client is too slow).
    fn batch(&mut self, out: &mut Out, event: Event) -> bool {
        match event {
            Event::Deliver(p) => {
                self.emit(out, &p);
                for _ in 1..WRITE_BATCH {
                    let Some(p) = self.session.try_next() else {
                        break;
                    };
                    self.emit(out, &p);
                }
            }
            Event::Expiring { in_secs } => self.own(out, &notice::expiring(in_secs)),
            // An SSE stream never signs in: these end it as a credential.
            Event::Expired | Event::Terminated | Event::NotSignedIn => {
                tracing::info!(parent: &self.session.span(), "credential ended, closing stream");
                self.done = true;
                self.own(out, &notice::EXPIRED);
            }
            Event::Reconnect { after_ms } => {
                tracing::debug!(parent: &self.session.span(), after_ms, "draining: client told to reconnect");
                self.done = true;
                self.own(out, &notice::retry(after_ms));
            }
            Event::Slow => {
                tracing::info!(parent: &self.session.span(), "client too slow: queue full, ending stream");
                return false;
            }
            // SSE clients never talk, so never idle: keep proxies from
            // timing the stream out.
            Event::Heartbeat | Event::Idle => self.own(out, &notice::HEARTBEAT),
            Event::Flush => {}
        }
        true
    }

    /// Appends a publication. A history message goes out as its shared
    /// event bytes plus this stream's own `id:` cursor line. The shared
    /// bytes are queued by reference, not copied (see [`crate::link`]).
    fn emit(&self, out: &mut Out, p: &Publication) {
        let tracker = self.session.tracker();
        if let Some(d) = self.deflate.as_ref().map(|c| &c.deflate) {
            let level = d.level;
            match p.id {
                None => out.push(deflated(p, d)),
                Some(_) if tracker.is_only(&p.channel) => {
                    out.push(p.on_wire(Encoding::SseDeflatedSingle, |p| {
                        let mut event = p.sse_open().to_vec();
                        event.extend_from_slice(&p.single_cursor_line());
                        Bytes::from(deflate::blocks(&event, level))
                    }));
                }
                Some(_) => {
                    out.push(p.on_wire(Encoding::SseDeflatedOpen, |p| {
                        Bytes::from(deflate::blocks(&p.sse_open(), level))
                    }));
                    let line = format!("id: {}\n\n", tracker.cursor().encode());
                    self.own(out, line.as_bytes());
                }
            }
            return;
        }
        if p.id.is_none() {
            out.push(p.sse.clone());
            return;
        }
        out.push(p.sse_open());
        if tracker.is_only(&p.channel) {
            out.push(p.single_cursor_line());
        } else {
            out.extend_from_slice(format!("id: {}\n\n", tracker.cursor().encode()).as_bytes());
        }
    }

    /// Appends the stream's own bytes: as they are, or as stored deflate
    /// blocks in a compressed stream.
    fn own(&self, out: &mut Out, bytes: &[u8]) {
        match self.deflate {
            Some(_) => deflate::stored(out.own(), bytes),
            None => out.extend_from_slice(bytes),
        }
    }
}

/// Whether the request's `Accept-Encoding` takes `deflate` (not with
/// `q=0`).
fn accepts_deflate(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default();
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            name.eq_ignore_ascii_case("deflate") && !refused
        })
}

/// The cursor a reconnecting browser sends back: `Last-Event-ID`, or
/// `?last_event_id=` for clients that cannot set headers.
fn last_event_id<B>(req: &Request<B>) -> Option<String> {
    if let Some(value) = req.headers().get("last-event-id") {
        return Some(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    crate::http::query_param(req.uri(), "last_event_id")
}

/// A publication as one HTTP/1.1 chunk, for direct writes.
fn chunk(p: &Publication) -> Bytes {
    p.on_wire(Encoding::SseChunk, |p| {
        let mut chunk = Vec::with_capacity(p.sse.len() + 12);
        chunk.extend_from_slice(format!("{:x}\r\n", p.sse.len()).as_bytes());
        chunk.extend_from_slice(&p.sse);
        chunk.extend_from_slice(b"\r\n");
        Bytes::from(chunk)
    })
}

/// A publication on a stream without chunks (HTTP/1.0), for direct writes.
fn plain(p: &Publication) -> Bytes {
    p.sse.clone()
}

/// A publication as deflate blocks, for a compressed stream: made once
/// per publication, shared by every compressed stream.
fn deflated(p: &Publication, d: &Deflate) -> Bytes {
    p.on_wire(Encoding::SseDeflated, |p| {
        Bytes::from(deflate::blocks(&p.sse, d.level))
    })
}

/// [`deflated`] as one HTTP/1.1 chunk, for direct writes.
fn deflated_chunk(p: &Publication, d: &Deflate) -> Bytes {
    p.on_wire(Encoding::SseDeflatedChunk, |p| {
        let blocks = deflated(p, d);
        let mut chunk = Vec::with_capacity(blocks.len() + 12);
        chunk.extend_from_slice(format!("{:x}\r\n", blocks.len()).as_bytes());
        chunk.extend_from_slice(&blocks);
        chunk.extend_from_slice(b"\r\n");
        Bytes::from(chunk)
    })
}

/// The SSE blocks crier sends besides publications.
mod notice {
    use bytes::Bytes;

    /// A comment that keeps proxies from timing an idle stream out.
    pub(super) const HEARTBEAT: Bytes = Bytes::from_static(b": heartbeat\n\n");

    /// The credential ended: the stream closes after this.
    pub(super) const EXPIRED: Bytes =
        Bytes::from_static(b"event: expired\ndata: {\"type\":\"expired\"}\n\n");

    /// The credential ends in `in_secs`.
    pub(super) fn expiring(in_secs: u64) -> Bytes {
        Bytes::from(format!(
            "event: expiring\ndata: {{\"type\":\"expiring\",\"in_secs\":{in_secs}}}\n\n"
        ))
    }

    /// Reconnect after `ms` (sent when the instance drains, before the
    /// stream ends).
    pub(super) fn retry(ms: u64) -> Bytes {
        Bytes::from(format!("retry: {ms}\n\n"))
    }
}
