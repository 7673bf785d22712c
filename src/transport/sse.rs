//! `GET /sse?channel=a&channel=b[&events=x,y]`: Server-Sent Events.
//!
//! Everything that can be refused is refused before the stream opens, with a
//! status code a browser's `EventSource` (and its developer tools) shows. The
//! response headers are sent only once every channel is subscribed, so an
//! open stream means nothing published from then on is missed.
//!
//! The body watches the connection's own signals (queue overflow, its turn
//! in the drain, the credential's end) rather than relying on hyper's
//! graceful shutdown, which would otherwise wait for an endless stream.
//! Every stream starts with a cursor (`id:`) and every history event
//! carries one, so a reconnecting `EventSource` resumes where it was, on
//! any instance.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{self, Stream};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::time::{Instant, Interval};
use tracing::Instrument;

use super::admit;
use super::resume::{self, Budget, Tracker};
use crate::app::{Admitted, App, ConnInfo};
use crate::auth::{AuthEvent, Watch};
use crate::history::Cursor;
use crate::http::{Body, Refused, StreamQuery};
use crate::hub::{self, Inbox, Subscriptions};
use crate::metrics::Transport;
use crate::origin::add_cors;
use crate::protocol::{Kind, Publication};

/// Answers a `/sse` request: an error status, or an endless event stream.
pub async fn handle<B>(app: Arc<App>, req: Request<B>, info: ConnInfo) -> Response<Body> {
    match open(Arc::clone(&app), req, info).await {
        Ok(r) => r,
        Err(refused) => app.rejected(refused),
    }
}

async fn open<B>(
    app: Arc<App>,
    req: Request<B>,
    info: ConnInfo,
) -> Result<Response<Body>, Refused> {
    let query = StreamQuery::parse(req.uri()).map_err(Refused::BadRequest)?;
    if query.channels.is_empty() {
        return Err(Refused::BadRequest(
            "give at least one channel: /sse?channel=NAME".into(),
        ));
    }
    let admission = admit(
        &app,
        Transport::Sse,
        req.headers(),
        req.uri(),
        info.peer.ip(),
        &query.channels,
    )
    .await?;

    let cursor = match last_event_id(&req) {
        None => None,
        Some(text) => Some(Cursor::decode(&text).map_err(|_| {
            Refused::BadRequest("bad Last-Event-ID: not a cursor crier issued".into())
        })?),
    };

    let (outbox, inbox) = hub::queue(app.config.limits.queue_size, info.kill.clone());
    let conn = outbox.id();
    let mut subs = Subscriptions::new(Arc::clone(&app.hub), outbox);
    let mut tracker = Tracker::default();
    // Each replayed event carries this stream's cursor: at most every
    // channel's name and id, base64-encoded.
    let cursor_bytes = query
        .channels
        .iter()
        .map(|c| c.len() + 32)
        .sum::<usize>()
        .saturating_mul(4)
        / 3
        + 8;
    let mut budget = Budget::new(&app, cursor_bytes);
    let mut replay = Vec::new();
    for channel in &query.channels {
        let since = cursor.as_ref().and_then(|c| c.0.get(channel).copied());
        let opened = resume::open(
            &app,
            &mut subs,
            &mut tracker,
            &mut budget,
            channel,
            query.events.clone(),
            since,
            cursor.is_some(),
        )
        .await
        .map_err(|_| Refused::Unavailable)?;
        replay.extend(opened.replay);
    }
    let span =
        tracing::info_span!("conn", conn.id = conn, client.addr = %info.peer, transport = "sse");
    span.in_scope(|| tracing::debug!(channels = ?query.channels, resumed = cursor.is_some(), "sse stream opened"));

    let heartbeat = app.config.sse.heartbeat;
    // The first block: the reconnect delay and the starting cursor, so even
    // a client that sees no message resumes right (and one whose channels
    // keep no history learns, on its return, that it missed something).
    let opening = format!(
        "retry: {}\nid: {}\n\n",
        app.config.sse.retry.as_millis(),
        tracker.cursor().encode()
    );
    let watch = Watch::new(Arc::clone(&app.auth), admission.principal);
    let mut state = Live {
        app,
        inbox,
        _subs: subs,
        _admitted: admission.admitted,
        watch,
        tracker,
        pending: VecDeque::from([Bytes::from(opening)]),
        replay_held: budget.release(),
        heartbeat: tokio::time::interval_at(Instant::now() + heartbeat, heartbeat),
        done: false,
        span,
    };
    for p in &replay {
        state.emit(p);
    }
    let body = StreamBody::new(events(state)).boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    add_cors(headers, &admission.origin);
    Ok(response)
}

/// CORS preflight for `/sse` (a plain `EventSource` needs none; a fetch-based
/// client sending `Authorization` or `Last-Event-ID` does).
pub fn preflight<B>(app: &App, req: &Request<B>) -> Response<Body> {
    let verdict = app.origins.check(req.headers());
    if verdict == crate::origin::Verdict::Refused {
        return app.rejected(Refused::Forbidden("origin not allowed"));
    }
    crate::origin::preflight(
        &verdict,
        "GET",
        "authorization, last-event-id, cache-control",
    )
}

/// What a live stream owns; dropping it (client gone, stream ended)
/// unsubscribes and frees the connection slot.
struct Live {
    app: Arc<App>,
    inbox: Inbox,
    _subs: Subscriptions,
    _admitted: Admitted,
    watch: Watch,
    tracker: Tracker,
    /// Chunks ready to send, in order.
    pending: VecDeque<Bytes>,
    /// This stream's share of the process's replay memory, given back once
    /// the replay has been handed to the connection.
    replay_held: Option<tokio::sync::OwnedSemaphorePermit>,
    heartbeat: Interval,
    /// No more events: end once `pending` is sent.
    done: bool,
    span: tracing::Span,
}

impl Live {
    /// Queues a publication unless this stream already delivered it. A
    /// history message goes out as its shared event bytes plus this
    /// stream's own `id:` cursor line.
    fn emit(&mut self, p: &Publication) {
        if !self.tracker.accept(p) {
            return;
        }
        if p.id.is_some() {
            self.pending.push_back(p.sse_open());
            let line = if self.tracker.is_only(&p.channel) {
                p.single_cursor_line()
            } else {
                Bytes::from(format!("id: {}\n\n", self.tracker.cursor().encode()))
            };
            self.pending.push_back(line);
        } else {
            self.pending.push_back(p.sse.clone());
        }
        if p.kind == Kind::Message {
            self.app.metrics.delivered(Transport::Sse).inc();
        }
    }
}

type Chunk = Result<Frame<Bytes>, Infallible>;

fn events(state: Live) -> impl Stream<Item = Chunk> + Send {
    let app = Arc::clone(&state.app);
    let turn = Box::pin(async move { app.lifecycle.my_turn().await });
    stream::unfold((state, turn), |(mut st, mut turn)| async move {
        let span = st.span.clone();
        let chunk = async {
            loop {
                if let Some(chunk) = st.pending.pop_front() {
                    return Some(chunk);
                }
                st.replay_held = None;
                if st.done {
                    return None;
                }
                tokio::select! {
                    biased;
                    _ = st.inbox.slow.cancelled() => {
                        tracing::info!("client too slow: queue full, ending stream");
                        return None;
                    }
                    retry_ms = &mut turn => {
                        tracing::debug!(retry_ms, "draining: client told to reconnect");
                        st.done = true;
                        st.pending.push_back(Bytes::from(format!("retry: {retry_ms}\n\n")));
                    }
                    event = st.watch.next() => match event {
                        AuthEvent::Expiring { in_secs } => st.pending.push_back(Bytes::from(format!(
                            "event: expiring\ndata: {{\"type\":\"expiring\",\"in_secs\":{in_secs}}}\n\n"
                        ))),
                        AuthEvent::Expired => {
                            tracing::info!("credential ended, closing stream");
                            st.done = true;
                            st.pending.push_back(Bytes::from_static(
                                b"event: expired\ndata: {\"type\":\"expired\"}\n\n",
                            ));
                        }
                    },
                    publication = st.inbox.rx.recv() => {
                        let publication = publication?;
                        st.emit(&publication);
                    }
                    _ = st.heartbeat.tick() => st.pending.push_back(Bytes::from_static(b": heartbeat\n\n")),
                }
            }
        }
        .instrument(span)
        .await?;
        Some((Ok(Frame::data(chunk)), (st, turn)))
    })
}

/// The cursor a reconnecting browser sends back: `Last-Event-ID`, or
/// `?last_event_id=` for clients that cannot set headers.
fn last_event_id<B>(req: &Request<B>) -> Option<String> {
    if let Some(value) = req.headers().get("last-event-id") {
        return Some(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let query = req.uri().query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "last_event_id")
        .map(|(_, v)| v.into_owned())
}
