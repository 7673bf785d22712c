//! `GET /ws`: the WebSocket transport, JSON text frames both ways.
//!
//! One task per connection owns the socket. It reads commands, writes
//! replies and publications from the connection's queue, pings the client
//! and closes it when it falls behind (1013), goes silent (1001), sends a
//! frame over the limit (1009), floods commands (1008), when its credential
//! ends (4001) or when its turn in the drain comes (1012). Malformed
//! commands get an `error` reply and the connection stays usable.
//!
//! The session is generic over `Sink + Stream` of messages, so the protocol
//! logic does not depend on where the bytes come from.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use hyper_tungstenite::tungstenite::Message;
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::resume::{self, Budget, Tracker};
use super::{admit, Admission};
use crate::app::{Admitted, App, ConnInfo};
use crate::auth::{AuthEvent, Failure, Watch};
use crate::history::StreamId;
use crate::http::{Body, Refused, StreamQuery};
use crate::hub::{self, Inbox, Subscriptions};
use crate::metrics::Transport;
use crate::policy::Refusal;
use crate::protocol::{event_filter, reply, Command, ErrorCode, Filter};

/// Publications written per flush: enough to batch syscalls under load,
/// few enough that a burst does not delay reading the client.
const WRITE_BATCH: usize = 64;
/// How long a closing connection waits for the client's close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// Per-socket read buffer; grows on demand up to `max_message_bytes`.
const READ_BUFFER: usize = 4 * 1024;
/// Bytes buffered before tungstenite writes to the socket mid-batch.
const WRITE_BUFFER: usize = 16 * 1024;

/// Answers a `/ws` request: an error status, or 101 and a session task.
pub async fn handle<B>(app: Arc<App>, mut req: Request<B>, info: ConnInfo) -> Response<Body>
where
    B: Send + 'static,
{
    if !hyper_tungstenite::is_upgrade_request(&req) {
        return app.rejected(Refused::UpgradeRequired);
    }
    let query = match StreamQuery::parse(req.uri()) {
        Ok(query) => query,
        Err(reason) => return app.rejected(Refused::BadRequest(reason)),
    };
    let admission = match admit(
        &app,
        Transport::Ws,
        req.headers(),
        req.uri(),
        info.peer.ip(),
        &query.channels,
    )
    .await
    {
        Ok(a) => a,
        Err(refused) => return app.rejected(refused),
    };
    let max = app.config.limits.max_message_bytes;
    // tungstenite preallocates `read_buffer_size` per socket (128 KiB by
    // default): with clients sending only small commands, 4 KiB is plenty
    // and is most of the difference between 140 and 10 KiB per connection.
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let (response, upgrade) = match hyper_tungstenite::upgrade(&mut req, Some(config)) {
        Ok(pair) => pair,
        Err(e) => {
            return app.rejected(Refused::BadRequest(format!("bad WebSocket handshake: {e}")))
        }
    };
    // The connection's write-stall bound is WebSocket's from now on.
    info.stall.set(app.config.ws.write_timeout);
    let handshake = app.config.ws.handshake_timeout;
    let task_app = Arc::clone(&app);
    app.tasks.spawn(async move {
        match tokio::time::timeout(handshake, upgrade).await {
            Ok(Ok(ws)) => session(task_app, ws, query, info.peer, admission).await,
            Ok(Err(e)) => tracing::debug!(error = %e, "websocket upgrade failed"),
            Err(_) => tracing::debug!("websocket upgrade timed out"),
        }
    });
    response.map(|b| b.boxed_unsync())
}

/// Serves one WebSocket connection until it closes.
async fn session<S>(
    app: Arc<App>,
    ws: S,
    query: StreamQuery,
    peer: SocketAddr,
    admission: Admission,
) where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    let (outbox, inbox) = hub::queue(app.config.limits.queue_size, CancellationToken::new());
    let conn = outbox.id();
    let span = tracing::info_span!(
        "conn",
        conn.id = conn,
        client.addr = %peer,
        transport = "ws",
        // Recorded once known: now, or after an `auth` message.
        user = tracing::field::Empty,
    );
    if let Some(user) = &admission.principal.user {
        span.record("user", user.as_str());
    }
    let limits = &app.config.limits;
    let session = Session {
        subs: Subscriptions::new(Arc::clone(&app.hub), outbox),
        watch: Watch::new(Arc::clone(&app.auth), admission.principal),
        tracker: Tracker::default(),
        commands: TokenBucket::new(limits.commands_per_second, limits.command_burst),
        strikes: 0,
        app,
        ws,
        admitted: admission.admitted,
    };
    session.run(conn, inbox, query).instrument(span).await;
}

/// The connection is gone (or must be treated as gone): stop at once.
struct Gone;

struct Session<S> {
    app: Arc<App>,
    ws: S,
    subs: Subscriptions,
    watch: Watch,
    /// Per-channel position, for dedupe across resume and live.
    tracker: Tracker,
    commands: TokenBucket,
    /// Commands refused in a row for exceeding the rate.
    strikes: u32,
    admitted: Admitted,
}

/// Rate-limited commands in a row after which the connection is closed.
const MAX_STRIKES: u32 = 10;

/// A per-connection token bucket: `rate` per second, `burst` at once.
struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, burst: u32) -> Self {
        Self {
            tokens: f64::from(burst),
            rate: f64::from(rate),
            burst: f64::from(burst),
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl<S> Session<S>
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    async fn run(mut self, conn: u64, mut inbox: Inbox, query: StreamQuery) {
        tracing::debug!("websocket opened");
        let ended = self.serve(conn, &mut inbox, query).await;
        if let Ok((code, reason)) = ended {
            tracing::debug!(code = u16::from(code), reason, "closing websocket");
            let frame = CloseFrame {
                code,
                reason: reason.into(),
            };
            if self.write(Message::Close(Some(frame))).await.is_ok() {
                self.await_close_reply().await;
            }
        }
        tracing::debug!("websocket closed");
    }

    /// Lets the client complete the closing handshake before the socket is
    /// dropped. Dropping at once can reset the connection while the client
    /// still writes (a pong, a command), and a reset discards our close frame
    /// on its side: a browser would then report 1006 instead of our code.
    async fn await_close_reply(&mut self) {
        let wait = async {
            while let Some(Ok(message)) = self.ws.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_LINGER, wait).await;
    }

    /// Returns the close frame to send, or `Gone` when the socket is already
    /// unusable.
    async fn serve(
        &mut self,
        conn: u64,
        inbox: &mut Inbox,
        query: StreamQuery,
    ) -> Result<(CloseCode, &'static str), Gone> {
        self.write(Message::text(reply::welcome(conn))).await?;
        for channel in query.channels {
            self.subscribe(channel, query.events.clone(), None, None)
                .await?;
        }

        let app = Arc::clone(&self.app);
        let turn = app.lifecycle.my_turn();
        tokio::pin!(turn);
        let ws_config = &app.config.ws;
        let mut ping = tokio::time::interval_at(
            Instant::now() + ws_config.ping_interval,
            ws_config.ping_interval,
        );
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = inbox.slow.cancelled() => {
                    tracing::info!("client too slow: queue full, closing");
                    return Ok((CloseCode::Again, "too slow: queue full"));
                }
                event = self.watch.next() => match event {
                    AuthEvent::Expiring { in_secs } => {
                        self.write(Message::text(reply::expiring(in_secs))).await?;
                    }
                    AuthEvent::Expired => {
                        tracing::info!("credential ended, closing");
                        return Ok((CloseCode::Library(4001), "expired"));
                    }
                },
                after_ms = &mut turn => {
                    self.write(Message::text(reply::reconnect(after_ms))).await?;
                    return Ok((CloseCode::Restart, "server restarting, reconnect"));
                }
                publication = inbox.rx.recv() => {
                    let Some(first) = publication else { return Err(Gone) };
                    self.deliver(first, inbox).await?;
                }
                frame = self.ws.next() => {
                    last_heard = Instant::now();
                    match frame {
                        Some(Ok(Message::Text(_) | Message::Binary(_))) if !self.commands.take() => {
                            self.strikes += 1;
                            if self.strikes >= MAX_STRIKES {
                                tracing::info!("command rate exceeded persistently, closing");
                                return Ok((CloseCode::Policy, "rate limit exceeded"));
                            }
                            self.error(ErrorCode::RateLimited, "too many commands, slow down", &None).await?;
                        }
                        Some(Ok(Message::Text(text))) => {
                            self.strikes = 0;
                            self.command(text.as_str()).await?;
                        }
                        Some(Ok(Message::Binary(_))) => {
                            self.strikes = 0;
                            self.error(ErrorCode::BadRequest, "binary frames are not supported", &None).await?;
                        }
                        // tungstenite answers pings itself.
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                        Some(Ok(Message::Close(_))) => {
                            // tungstenite queued the echo of the client's
                            // close frame (RFC 6455 5.5.1): send it before
                            // the socket goes, or the client sees 1006.
                            let timeout = self.app.config.ws.write_timeout;
                            let _ = bounded(timeout, self.ws.flush()).await;
                            return Err(Gone);
                        }
                        None => return Err(Gone),
                        Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
                            tracing::info!(size, max_size, "frame too large, closing");
                            let reason = format!("message of {size} bytes exceeds the limit of {max_size}");
                            self.error(ErrorCode::TooLarge, &reason, &None).await?;
                            return Ok((CloseCode::Size, "message too large"));
                        }
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "websocket read failed");
                            return Err(Gone);
                        }
                    }
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() >= ws_config.idle_timeout {
                        tracing::info!("client silent for too long, closing");
                        return Ok((CloseCode::Away, "idle timeout"));
                    }
                    self.write(Message::Ping(Default::default())).await?;
                }
            }
        }
    }

    /// Writes `first` and whatever else is already queued, then flushes once.
    async fn deliver(
        &mut self,
        first: Arc<crate::protocol::Publication>,
        inbox: &mut Inbox,
    ) -> Result<(), Gone> {
        let timeout = self.app.config.ws.write_timeout;
        let ws = &mut self.ws;
        let mut written = 0u64;
        let tracker = &mut self.tracker;
        let batch = async {
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(p) = next.take() {
                taken += 1;
                if tracker.accept(&p) {
                    ws.feed(Message::Text(p.frame.clone())).await?;
                    written += 1;
                }
                if taken < WRITE_BATCH {
                    next = inbox.rx.try_recv().ok();
                }
            }
            ws.flush().await
        };
        let result = bounded(timeout, batch).await;
        self.app.metrics.delivered(Transport::Ws).inc_by(written);
        result
    }

    async fn command(&mut self, text: &str) -> Result<(), Gone> {
        let cmd: Command = match serde_json::from_str(text) {
            Ok(cmd) => cmd,
            Err(e) => {
                let reason = format!("not a JSON command: {e}");
                return self.error(ErrorCode::BadRequest, &reason, &None).await;
            }
        };
        match cmd.kind.as_deref() {
            Some("subscribe") => match cmd.channel {
                Some(channel) => match cmd.events.map(event_filter).transpose() {
                    Ok(events) => self.subscribe(channel, events, cmd.since, cmd.id).await,
                    Err(reason) => self.error(ErrorCode::BadRequest, &reason, &cmd.id).await,
                },
                None => {
                    self.error(ErrorCode::BadRequest, "missing channel", &cmd.id)
                        .await
                }
            },
            Some("unsubscribe") => match cmd.channel {
                Some(channel) => {
                    self.subs.remove(&channel);
                    self.tracker.forget(&channel);
                    self.write(Message::text(reply::unsubscribed(&channel, &cmd.id)))
                        .await
                }
                None => {
                    self.error(ErrorCode::BadRequest, "missing channel", &cmd.id)
                        .await
                }
            },
            Some("ping") => self.write(Message::text(reply::pong(&cmd.id))).await,
            Some("auth") => match cmd.token {
                Some(token) => self.authenticate(&token, &cmd.id).await,
                None => {
                    self.error(ErrorCode::BadRequest, "missing token", &cmd.id)
                        .await
                }
            },
            Some(other) => {
                let reason = format!("unknown message type `{other}`");
                self.error(ErrorCode::BadRequest, &reason, &cmd.id).await
            }
            None => {
                self.error(ErrorCode::BadRequest, "missing `type`", &cmd.id)
                    .await
            }
        }
    }

    /// `auth`: a first credential, or a fresh one before the old expires.
    /// A connection stays with one user: a token for another is refused.
    async fn authenticate(&mut self, token: &str, id: &Option<Value>) -> Result<(), Gone> {
        let verified = self.app.auth.verify_token(token).and_then(|p| {
            match (&self.watch.principal().user, &p.user) {
                (Some(current), Some(new)) if current != new => {
                    self.app.auth.count(Failure::UserMismatch);
                    Err(Failure::UserMismatch)
                }
                _ => Ok(p),
            }
        });
        match verified {
            Ok(principal) => {
                if let Some(user) = &principal.user {
                    if self.app.admit_user(&mut self.admitted, user).is_err() {
                        let limit = self.app.config.limits.max_connections_per_user;
                        let reason = format!("at most {limit} connections per user");
                        return self.error(ErrorCode::TooManyConnections, &reason, id).await;
                    }
                }
                let expires_in = principal.expires_at.map(|t| {
                    t.duration_since(std::time::SystemTime::now())
                        .map_or(0, |d| d.as_secs())
                });
                let user = principal.user.clone();
                if let Some(user) = &user {
                    tracing::Span::current().record("user", user.as_str());
                }
                self.watch.replace(principal);
                let text = reply::authenticated(user.as_deref(), expires_in, id);
                self.write(Message::text(text)).await?;
                self.recheck_subscriptions().await
            }
            Err(failure) => {
                self.error(ErrorCode::Unauthorized, failure.reason(), id)
                    .await
            }
        }
    }

    /// After a credential change, ends every subscription the new
    /// credential no longer grants (a refresh with fewer channels in its
    /// claim must not keep the old ones).
    async fn recheck_subscriptions(&mut self) -> Result<(), Gone> {
        let who = self.watch.principal();
        let revoked: Vec<String> = self
            .subs
            .channels()
            .iter()
            .filter(|c| self.app.policy.may_subscribe(c, who).is_err())
            .cloned()
            .collect();
        for channel in revoked {
            tracing::debug!(%channel, "subscription no longer granted, ended");
            self.subs.remove(&channel);
            self.tracker.forget(&channel);
            self.write(Message::text(reply::revoked(&channel, "forbidden")))
                .await?;
        }
        Ok(())
    }

    async fn subscribe(
        &mut self,
        channel: String,
        events: Option<Filter>,
        since: Option<String>,
        id: Option<Value>,
    ) -> Result<(), Gone> {
        let since = match since.as_deref().map(str::parse::<StreamId>) {
            None => None,
            Some(Ok(since)) => Some(since),
            Some(Err(())) => {
                let reason = "bad `since`: expected a message id like 1700000000000-0";
                return self.error(ErrorCode::BadRequest, reason, &id).await;
            }
        };
        match self
            .app
            .policy
            .may_subscribe(&channel, self.watch.principal())
        {
            Ok(()) => {}
            Err(Refusal::NeedsAuth) => {
                self.app.auth.count(Failure::Missing);
                let reason = Failure::Missing.reason();
                return self.error(ErrorCode::Unauthorized, reason, &id).await;
            }
            Err(Refusal::BadName(why)) => {
                let reason = format!("bad channel name: {why}");
                return self.error(ErrorCode::BadRequest, &reason, &id).await;
            }
            Err(Refusal::Forbidden) => {
                return self.error(ErrorCode::Forbidden, "forbidden", &id).await;
            }
        }
        let limit = self.app.config.limits.max_subscriptions_per_connection;
        if !self.subs.contains(&channel) && self.subs.len() >= limit {
            let reason = format!("at most {limit} channels per connection");
            return self
                .error(ErrorCode::TooManySubscriptions, &reason, &id)
                .await;
        }
        // One subscribe's replay is written before the next command is
        // read: that bounds what a connection holds.
        let mut budget = Budget::new(&self.app, 0);
        let opened = resume::open(
            &self.app,
            &mut self.subs,
            &mut self.tracker,
            &mut budget,
            &channel,
            events,
            since,
            false,
        )
        .await;
        let Ok(opened) = opened else {
            let reason = "the broker is unavailable, try again later";
            return self.error(ErrorCode::Unavailable, reason, &id).await;
        };
        let reply = reply::subscribed(&channel, opened.recovered, opened.position, &id);
        self.write(Message::text(reply)).await?;
        for p in opened.replay {
            if self.tracker.accept(&p) {
                self.write(Message::Text(p.frame.clone())).await?;
            }
        }
        Ok(())
    }

    async fn error(
        &mut self,
        code: ErrorCode,
        reason: &str,
        id: &Option<Value>,
    ) -> Result<(), Gone> {
        self.write(Message::text(reply::error(code, reason, id)))
            .await
    }

    async fn write(&mut self, message: Message) -> Result<(), Gone> {
        let timeout = self.app.config.ws.write_timeout;
        bounded(timeout, self.ws.send(message)).await
    }
}

async fn bounded<F>(limit: Duration, write: F) -> Result<(), Gone>
where
    F: std::future::Future<Output = Result<(), WsError>>,
{
    match tokio::time::timeout(limit, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "websocket write failed");
            Err(Gone)
        }
        Err(_) => {
            tracing::info!("websocket write timed out, dropping client");
            Err(Gone)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_bucket_allows_a_burst_then_refuses() {
        let mut bucket = TokenBucket::new(0, 3);
        assert!(bucket.take() && bucket.take() && bucket.take(), "the burst");
        assert!(!bucket.take(), "nothing refills at rate 0");
        assert!(!bucket.take());
    }

    #[tokio::test]
    async fn the_command_bucket_refills_at_its_rate() {
        let mut bucket = TokenBucket::new(1_000, 1);
        assert!(bucket.take());
        assert!(!bucket.take(), "burst spent");
        // 1,000 per second: one token back within a few milliseconds.
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(bucket.take(), "refilled");
    }
}
