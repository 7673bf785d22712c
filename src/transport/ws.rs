//! `GET /ws`: crier's WebSocket protocol, JSON text frames both ways.
//!
//! Framing only: client frames become [`Session`] calls, session
//! [`Event`]s become frames. One task per connection owns the socket and
//! closes it when the client falls behind (1013), goes silent (1001), sends
//! a frame over the limit (1009), floods commands (1008), when its
//! credential ends (4001) or when its turn in the drain comes (1012).
//! Malformed commands get an `error` reply and the connection stays usable.
//!
//! The connection is generic over `Sink + Stream` of messages, so the
//! framing does not depend on where the bytes come from.

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
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::app::{App, ConnInfo};
use crate::history::StreamId;
use crate::http::{rejected, Body, StreamQuery};
use crate::metrics::Transport;
use crate::protocol::{event_filter, reply, Command, Publication};
use crate::refusal::Refusal;
use crate::session::{admit, Admission, Event, Session, Verdict, Wire};

/// Publications written per flush: enough to batch syscalls under load,
/// few enough that a burst does not delay reading the client.
const WRITE_BATCH: usize = 64;
/// How long a closing connection waits for the client's close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// Per-socket read buffer; grows on demand up to `max_message_bytes`.
const READ_BUFFER: usize = 4 * 1024;
/// Bytes buffered before tungstenite writes to the socket mid-batch.
const WRITE_BUFFER: usize = 16 * 1024;

/// Answers a `/ws` request: an error status, or 101 and a connection task.
pub(crate) async fn handle<B>(app: Arc<App>, mut req: Request<B>, info: ConnInfo) -> Response<Body>
where
    B: Send + 'static,
{
    if !hyper_tungstenite::is_upgrade_request(&req) {
        return rejected(&app.metrics, &Refusal::UpgradeRequired);
    }
    let query = match StreamQuery::parse(req.uri()) {
        Ok(query) => query,
        Err(reason) => return rejected(&app.metrics, &Refusal::BadRequest(reason)),
    };
    let peer = info.peer.ip();
    let admitted = admit(
        &app,
        Transport::Ws,
        req.headers(),
        req.uri(),
        peer,
        &query.channels,
    );
    let admission = match admitted.await {
        Ok(a) => a,
        Err(refusal) => return rejected(&app.metrics, &refusal),
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
            let refusal = Refusal::BadRequest(format!("bad WebSocket handshake: {e}"));
            return rejected(&app.metrics, &refusal);
        }
    };
    // The connection's write-stall bound is WebSocket's from now on.
    info.stall.set(app.config.ws.write_timeout);
    let handshake = app.config.ws.handshake_timeout;
    let task_app = Arc::clone(&app);
    app.tasks.spawn(async move {
        match tokio::time::timeout(handshake, upgrade).await {
            Ok(Ok(ws)) => serve(task_app, ws, query, info.peer, admission).await,
            Ok(Err(e)) => tracing::debug!(error = %e, "websocket upgrade failed"),
            Err(_) => tracing::debug!("websocket upgrade timed out"),
        }
    });
    response.map(|b| b.boxed_unsync())
}

/// Serves one WebSocket connection until it closes.
async fn serve<S>(app: Arc<App>, ws: S, query: StreamQuery, peer: SocketAddr, admission: Admission)
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    let ws_config = &app.config.ws;
    let wire = Wire {
        transport: Transport::Ws,
        heartbeat: ws_config.ping_interval,
        idle_timeout: Some(ws_config.idle_timeout),
        on_slow: CancellationToken::new(),
        replay_overhead: 0,
        peer,
    };
    let write_timeout = ws_config.write_timeout;
    let session = Session::open(app, admission, wire);
    let span = session.span();
    let conn = Conn {
        session,
        ws,
        write_timeout,
    };
    conn.run(query).instrument(span).await;
}

/// The connection is gone (or must be treated as gone): stop at once.
struct Gone;

struct Conn<S> {
    session: Session,
    ws: S,
    write_timeout: Duration,
}

impl<S> Conn<S>
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    async fn run(mut self, query: StreamQuery) {
        tracing::debug!("websocket opened");
        if let Ok((code, reason)) = self.serve(query).await {
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
    async fn serve(&mut self, query: StreamQuery) -> Result<(CloseCode, &'static str), Gone> {
        self.send(reply::welcome(self.session.id())).await?;
        for channel in query.channels {
            Box::pin(self.subscribe(channel, query.events.clone(), None, None)).await?;
        }
        loop {
            tokio::select! {
                biased;
                event = self.session.next() => match event {
                    Event::Deliver(first) => self.deliver(first).await?,
                    Event::Expiring { in_secs } => self.send(reply::expiring(in_secs)).await?,
                    Event::Expired => {
                        tracing::info!("credential ended, closing");
                        return Ok((CloseCode::Library(4001), "expired"));
                    }
                    Event::Reconnect { after_ms } => {
                        self.send(reply::reconnect(after_ms)).await?;
                        return Ok((CloseCode::Restart, "server restarting, reconnect"));
                    }
                    Event::Slow => {
                        tracing::info!("client too slow: queue full, closing");
                        return Ok((CloseCode::Again, "too slow: queue full"));
                    }
                    Event::Heartbeat => self.write(Message::Ping(Default::default())).await?,
                    Event::Idle => {
                        tracing::info!("client silent for too long, closing");
                        return Ok((CloseCode::Away, "idle timeout"));
                    }
                },
                frame = self.ws.next() => {
                    self.session.heard();
                    // Boxed: a command's path (a subscribe reads Redis) is
                    // deep and rare, and the connection's long-lived task
                    // should not reserve room for it between commands.
                    if let Some(close) = Box::pin(self.frame(frame)).await? {
                        return Ok(close);
                    }
                }
            }
        }
    }

    /// Handles one frame from the client; returns a close frame to send
    /// when the connection must end.
    async fn frame(
        &mut self,
        frame: Option<Result<Message, WsError>>,
    ) -> Result<Option<(CloseCode, &'static str)>, Gone> {
        match frame {
            Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                match self.session.take_command() {
                    Verdict::Go => {}
                    Verdict::SlowDown => {
                        self.refuse(&Refusal::RateLimited, &None).await?;
                        return Ok(None);
                    }
                    Verdict::Close => {
                        tracing::info!("command rate exceeded persistently, closing");
                        return Ok(Some((CloseCode::Policy, "rate limit exceeded")));
                    }
                }
                match message {
                    Message::Text(text) => self.command(text.as_str()).await?,
                    _ => {
                        let refusal = Refusal::BadRequest("binary frames are not supported".into());
                        self.refuse(&refusal, &None).await?;
                    }
                }
            }
            // tungstenite answers pings itself.
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Ok(Message::Close(_))) => {
                // tungstenite queued the echo of the client's close frame
                // (RFC 6455 5.5.1): send it before the socket goes, or the
                // client sees 1006.
                let _ = bounded(self.write_timeout, self.ws.flush()).await;
                return Err(Gone);
            }
            None => return Err(Gone),
            Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
                tracing::info!(size, max_size, "frame too large, closing");
                let reason = format!("message of {size} bytes exceeds the limit of {max_size}");
                self.refuse(&Refusal::TooLarge(reason), &None).await?;
                return Ok(Some((CloseCode::Size, "message too large")));
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "websocket read failed");
                return Err(Gone);
            }
        }
        Ok(None)
    }

    /// Writes `first` and whatever else is ready, then flushes once.
    async fn deliver(&mut self, first: Arc<Publication>) -> Result<(), Gone> {
        let Self { session, ws, .. } = self;
        let batch = async {
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(p) = next.take() {
                taken += 1;
                ws.feed(Message::Text(p.frame.clone())).await?;
                if taken < WRITE_BATCH {
                    next = session.try_next();
                }
            }
            ws.flush().await
        };
        bounded(self.write_timeout, batch).await
    }

    async fn command(&mut self, text: &str) -> Result<(), Gone> {
        let cmd: Command = match serde_json::from_str(text) {
            Ok(cmd) => cmd,
            Err(e) => {
                let refusal = Refusal::BadRequest(format!("not a JSON command: {e}"));
                return self.refuse(&refusal, &None).await;
            }
        };
        let missing = |what: &str| Refusal::BadRequest(format!("missing {what}"));
        match (cmd.kind.as_deref(), cmd.channel) {
            (Some("subscribe"), Some(channel)) => match cmd.events.map(event_filter).transpose() {
                Ok(events) => self.subscribe(channel, events, cmd.since, cmd.id).await,
                Err(reason) => self.refuse(&Refusal::BadRequest(reason), &cmd.id).await,
            },
            (Some("unsubscribe"), Some(channel)) => {
                self.session.unsubscribe(&channel);
                self.send(reply::unsubscribed(&channel, &cmd.id)).await
            }
            (Some("subscribe" | "unsubscribe"), None) => {
                self.refuse(&missing("channel"), &cmd.id).await
            }
            (Some("ping"), _) => self.send(reply::pong(&cmd.id)).await,
            (Some("auth"), _) => match cmd.token {
                Some(token) => self.authenticate(&token, &cmd.id).await,
                None => self.refuse(&missing("token"), &cmd.id).await,
            },
            (Some(other), _) => {
                let refusal = Refusal::BadRequest(format!("unknown message type `{other}`"));
                self.refuse(&refusal, &cmd.id).await
            }
            (None, _) => self.refuse(&missing("`type`"), &cmd.id).await,
        }
    }

    async fn authenticate(&mut self, token: &str, id: &Option<Value>) -> Result<(), Gone> {
        match self.session.authenticate(token) {
            Ok(done) => {
                let text = reply::authenticated(done.user.as_deref(), done.expires_in, id);
                self.send(text).await?;
                for channel in &done.revoked {
                    self.send(reply::revoked(channel, "forbidden")).await?;
                }
                Ok(())
            }
            Err(refusal) => self.refuse(&refusal, id).await,
        }
    }

    async fn subscribe(
        &mut self,
        channel: String,
        events: Option<crate::protocol::Filter>,
        since: Option<String>,
        id: Option<Value>,
    ) -> Result<(), Gone> {
        let since = match since.as_deref().map(str::parse::<StreamId>) {
            None => None,
            Some(Ok(since)) => Some(since),
            Some(Err(())) => {
                let reason = "bad `since`: expected a message id like 1700000000000-0";
                return self.refuse(&Refusal::BadRequest(reason.into()), &id).await;
            }
        };
        // The replay, if any, comes out of the session before anything
        // else, and before the next command is read: that bounds what a
        // connection holds.
        match self.session.subscribe(&channel, events, since, false).await {
            Ok(s) => {
                self.send(reply::subscribed(&channel, s.recovered, s.position, &id))
                    .await
            }
            Err(refusal) => self.refuse(&refusal, &id).await,
        }
    }

    async fn refuse(&mut self, refusal: &Refusal, id: &Option<Value>) -> Result<(), Gone> {
        self.send(reply::refused(refusal, id)).await
    }

    async fn send(&mut self, text: String) -> Result<(), Gone> {
        self.write(Message::text(text)).await
    }

    async fn write(&mut self, message: Message) -> Result<(), Gone> {
        bounded(self.write_timeout, self.ws.send(message)).await
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
