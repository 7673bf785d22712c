//! `GET /sse?channel=a&channel=b[&events=x,y]`: Server-Sent Events.
//!
//! Framing only: the [`Session`] does admission, subscriptions, resume and
//! the credential watch; this file turns its [`Event`]s into SSE blocks.
//! Everything that can be refused is refused before the stream opens, with
//! a status code a browser's `EventSource` (and its developer tools) shows.
//! The response headers are sent only once every channel is subscribed, so
//! an open stream means nothing published from then on is missed.
//!
//! The body ends on the session's own signals (queue overflow, its turn in
//! the drain, the credential's end) rather than relying on hyper's graceful
//! shutdown, which would otherwise wait for an endless stream. Every stream
//! starts with a cursor (`id:`) and every history event carries one, so a
//! reconnecting `EventSource` resumes where it was, on any instance.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{self, Stream};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tracing::Instrument;

use crate::app::{App, ConnInfo};
use crate::history::Cursor;
use crate::http::{rejected, Body, StreamQuery};
use crate::metrics::Transport;
use crate::origin::add_cors;
use crate::protocol::{sse, Publication};
use crate::refusal::Refusal;
use crate::session::{admit, Event, Session, Wire};

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
        on_slow: info.kill.clone(),
        replay_overhead: cursor_bytes(&query.channels),
        peer: info.peer,
    };
    let mut session = Session::open(Arc::clone(&app), admission, wire);
    for channel in &query.channels {
        let since = cursor.as_ref().and_then(|c| c.0.get(channel).copied());
        let resuming = cursor.is_some();
        let events = query.events.clone();
        session.subscribe(channel, events, since, resuming).await?;
    }
    let span = session.span();
    span.in_scope(|| tracing::debug!(channels = ?query.channels, resumed = cursor.is_some(), "sse stream opened"));

    // The first block: the reconnect delay and the starting cursor, so even
    // a client that sees no message resumes right (and one whose channels
    // keep no history learns, on its return, that it missed something).
    let opening = format!(
        "retry: {}\nid: {}\n\n",
        app.config.sse.retry.as_millis(),
        session.tracker().cursor().encode()
    );
    let live = Live {
        session,
        pending: VecDeque::from([Bytes::from(opening)]),
        done: false,
    };
    let body = StreamBody::new(events(live)).boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    add_cors(headers, &origin);
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

/// A live stream; dropping it (client gone, stream ended) ends the session.
struct Live {
    session: Session,
    /// Chunks ready to send, in order.
    pending: VecDeque<Bytes>,
    /// No more events: end once `pending` is sent.
    done: bool,
}

impl Live {
    /// Queues a publication. A history message goes out as its shared
    /// event bytes plus this stream's own `id:` cursor line.
    fn emit(&mut self, p: &Publication) {
        if p.id.is_none() {
            self.pending.push_back(p.sse.clone());
            return;
        }
        self.pending.push_back(p.sse_open());
        let tracker = self.session.tracker();
        let line = if tracker.is_only(&p.channel) {
            p.single_cursor_line()
        } else {
            Bytes::from(format!("id: {}\n\n", tracker.cursor().encode()))
        };
        self.pending.push_back(line);
    }

    /// The next chunk to send, or `None` when the stream ends.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if let Some(chunk) = self.pending.pop_front() {
                return Some(chunk);
            }
            if self.done {
                return None;
            }
            match self.session.next().await {
                Event::Deliver(p) => self.emit(&p),
                Event::Expiring { in_secs } => self.pending.push_back(sse::expiring(in_secs)),
                Event::Expired => {
                    tracing::info!("credential ended, closing stream");
                    self.done = true;
                    self.pending.push_back(sse::EXPIRED);
                }
                Event::Reconnect { after_ms } => {
                    tracing::debug!(after_ms, "draining: client told to reconnect");
                    self.done = true;
                    self.pending.push_back(sse::retry(after_ms));
                }
                Event::Slow => {
                    tracing::info!("client too slow: queue full, ending stream");
                    return None;
                }
                // SSE clients never talk, so never idle: keep proxies from
                // timing the stream out.
                Event::Heartbeat | Event::Idle => {
                    self.pending.push_back(sse::HEARTBEAT);
                }
            }
        }
    }
}

type Chunk = Result<Frame<Bytes>, Infallible>;

fn events(live: Live) -> impl Stream<Item = Chunk> + Send {
    stream::unfold(live, |mut live| async move {
        let span = live.session.span();
        let chunk = live.next_chunk().instrument(span).await?;
        Some((Ok(Frame::data(chunk)), live))
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
