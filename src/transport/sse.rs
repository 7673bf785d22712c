//! `GET /sse?channel=a&channel=b[&events=x,y]`: Server-Sent Events.
//!
//! Everything that can be refused is refused before the stream opens, with a
//! status code a browser's `EventSource` (and its developer tools) shows. The
//! response headers are sent only once every channel is subscribed, so an
//! open stream means nothing published from then on is missed.
//!
//! The body watches the connection's own signals (queue overflow, its turn
//! in the drain) rather than relying on hyper's graceful shutdown, which
//! would otherwise wait for an endless stream.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{self, Stream};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::time::{Instant, Interval};
use tracing::Instrument;

use super::check_channels;
use crate::app::{Admitted, App, ConnInfo};
use crate::http::{Body, Refused, StreamQuery};
use crate::hub::{self, Inbox, Subscriptions};
use crate::metrics::Transport;

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
    let query = StreamQuery::parse(req.uri());
    if query.channels.is_empty() {
        return Err(Refused::BadRequest(
            "give at least one channel: /sse?channel=NAME".into(),
        ));
    }
    check_channels(&app, &query.channels)?;
    let admitted = app.admit(Transport::Sse).ok_or(Refused::AtCapacity)?;

    let (outbox, inbox) = hub::queue(app.config.limits.queue_size, info.kill.clone());
    let conn = outbox.id();
    let mut subs = Subscriptions::new(Arc::clone(&app.hub), outbox);
    for channel in &query.channels {
        subs.add(channel, query.events.clone())
            .await
            .map_err(|_| Refused::Unavailable)?;
    }
    let span =
        tracing::info_span!("conn", conn.id = conn, client.addr = %info.peer, transport = "sse");
    span.in_scope(|| tracing::debug!(channels = ?query.channels, "sse stream opened"));

    let heartbeat = app.config.sse.heartbeat;
    let retry = Bytes::from(format!("retry: {}\n\n", app.config.sse.retry.as_millis()));
    let state = Live {
        app,
        inbox,
        _subs: subs,
        _admitted: admitted,
        heartbeat: tokio::time::interval_at(Instant::now() + heartbeat, heartbeat),
        phase: Phase::Opening(retry),
        span,
    };
    let body = StreamBody::new(events(state)).boxed();
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

enum Phase {
    /// The first chunk (`retry:`) is still to be sent.
    Opening(Bytes),
    Live,
    /// The drain reached this stream: it has sent its last `retry:`.
    Done,
}

/// What a live stream owns; dropping it (client gone, stream ended)
/// unsubscribes and frees the connection slot.
struct Live {
    app: Arc<App>,
    inbox: Inbox,
    _subs: Subscriptions,
    _admitted: Admitted,
    heartbeat: Interval,
    phase: Phase,
    span: tracing::Span,
}

type Chunk = Result<Frame<Bytes>, Infallible>;

fn events(state: Live) -> impl Stream<Item = Chunk> + Send {
    let app = Arc::clone(&state.app);
    let turn = Box::pin(async move { app.lifecycle.my_turn().await });
    stream::unfold((state, turn), |(mut st, mut turn)| async move {
        let span = st.span.clone();
        let chunk = async {
            match std::mem::replace(&mut st.phase, Phase::Live) {
                Phase::Opening(retry) => return Some(retry),
                Phase::Done => return None,
                Phase::Live => {}
            }
            tokio::select! {
                biased;
                _ = st.inbox.slow.cancelled() => {
                    tracing::info!("client too slow: queue full, ending stream");
                    None
                }
                retry_ms = &mut turn => {
                    tracing::debug!(retry_ms, "draining: client told to reconnect");
                    st.phase = Phase::Done;
                    Some(Bytes::from(format!("retry: {retry_ms}\n\n")))
                }
                publication = st.inbox.rx.recv() => {
                    let publication = publication?;
                    st.app.metrics.delivered(Transport::Sse).inc();
                    Some(publication.sse.clone())
                }
                _ = st.heartbeat.tick() => Some(Bytes::from_static(b": heartbeat\n\n")),
            }
        }
        .instrument(span)
        .await?;
        Some((Ok(Frame::data(chunk)), (st, turn)))
    })
}
