//! `GET /ws`: crier's WebSocket protocol, JSON text frames both ways.
//!
//! Framing only: client frames become [`Session`] calls, session
//! [`Event`]s become frames. One task per connection owns the socket and
//! closes it when the client falls behind (1013), goes silent (1001), sends
//! a frame over the limit (1009), floods commands (1008), when its
//! credential ends (4001) or when its turn in the drain comes (1012).
//! Malformed commands get an `error` reply and the connection stays usable.
//!
//! After the upgrade the socket leaves hyper ([`crate::link`]): frames are
//! read and written by [`rfc6455`] straight from and into the connection's
//! own buffers, and a wake-up writes every queued publication with one call.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use serde_json::Value;
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::app::{App, ConnInfo};
use crate::history::StreamId;
use crate::http::{rejected, Body, StreamQuery};
use crate::link::{Gone, Link};
use crate::metrics::Transport;
use crate::protocol::{event_filter, reply, Command, Encoding, Publication};
use crate::refusal::Refusal;
use crate::session::{admit, Admission, Event, Session, Verdict, Wire};
use crate::transport::rfc6455;
use crate::transport::websocket::{text_frame, upgrade, Close, Message, WebSocket};

/// Close codes crier sends (RFC 6455 section 7.4, and its own 4001).
mod code {
    use crate::transport::websocket::CloseCode;

    pub(super) const AWAY: CloseCode = CloseCode::GOING_AWAY;
    pub(super) const POLICY: CloseCode = CloseCode::POLICY;
    pub(super) const TOO_BIG: CloseCode = CloseCode::TOO_BIG;
    pub(super) const RESTART: CloseCode = CloseCode::RESTART;
    pub(super) const AGAIN: CloseCode = CloseCode::TRY_AGAIN;
    /// The credential ended (crier's own code).
    pub(super) const EXPIRED: CloseCode = CloseCode(4001);
}

/// Answers a `/ws` request: an error status, or 101 and a connection task.
pub(crate) async fn handle<B>(app: Arc<App>, req: Request<B>, info: ConnInfo) -> Response<Body>
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
    let task_app = Arc::clone(&app);
    upgrade(&app, req, info.slot, move |stream, early| {
        serve(task_app, stream, early, query, info.peer, admission)
    })
}

/// Serves one WebSocket connection until it closes. `early` holds what the
/// client sent right behind its handshake.
async fn serve(
    app: Arc<App>,
    stream: TcpStream,
    early: Vec<u8>,
    query: StreamQuery,
    peer: SocketAddr,
    admission: Admission,
) {
    let ws_config = &app.config.ws;
    let wire = Wire {
        transport: Transport::Ws,
        heartbeat: ws_config.ping_interval,
        idle_timeout: Some(ws_config.idle_timeout),
        replay_overhead: 0,
        replay_bytes: |p| rfc6455::frame_len(p.frame.len()),
        peer,
    };
    let link = Link::new(
        stream,
        ws_config.write_timeout,
        app.metrics.slow_client_disconnects.clone(),
    );
    let socket = WebSocket::new(link, app.config.limits.max_message_bytes, early);
    let session = Session::open(app, admission, wire);
    session.attach(socket.link.outlet(), frame);
    let span = session.span();
    let conn = Conn {
        session,
        socket,
        span,
    };
    conn.run(query).await;
}

struct Conn {
    session: Session,
    socket: WebSocket,
    /// The connection's span: rare paths run in it, the delivery path
    /// does not pay for entering it.
    span: tracing::Span,
}

impl Conn {
    async fn run(mut self, query: StreamQuery) {
        tracing::debug!(parent: &self.span, "websocket opened");
        if let Ok((code, reason)) = self.serve(query).await {
            tracing::debug!(parent: &self.span, code = code.0, reason, "closing websocket");
            self.socket.close(code, reason).await;
        }
        tracing::debug!(parent: &self.span, "websocket closed");
    }

    /// Returns the close frame to send, or `Gone` when the socket is already
    /// unusable.
    async fn serve(&mut self, query: StreamQuery) -> Result<Close, Gone> {
        self.send(reply::welcome(self.session.id())).await?;
        for channel in query.channels {
            let span = self.span.clone();
            let since = query.from_oldest.then(|| crate::http::OLDEST.to_owned());
            let subscribe = self.subscribe(channel, query.events.clone(), since, None);
            Box::pin(subscribe.instrument(span)).await?;
        }
        loop {
            tokio::select! {
                biased;
                event = self.session.next() => match event {
                    // Each frame is encoded once per publication, shared by
                    // every recipient (the bytes direct writes send too).
                    Event::Deliver(first) => self.socket.deliver(&mut self.session, first, frame).await?,
                    Event::Expiring { in_secs } => self.send(reply::expiring(in_secs)).await?,
                    Event::Expired => {
                        tracing::info!(parent: &self.span, "credential ended, closing");
                        return Ok((code::EXPIRED, "expired"));
                    }
                    Event::Reconnect { after_ms } => {
                        self.send(reply::reconnect(after_ms)).await?;
                        return Ok((code::RESTART, "server restarting, reconnect"));
                    }
                    Event::Slow => {
                        tracing::info!(parent: &self.span, "client too slow: queue full, closing");
                        return Ok((code::AGAIN, "too slow: queue full"));
                    }
                    Event::Flush => self.flush().await?,
                    Event::Heartbeat => self.socket.ping().await?,
                    Event::Idle => {
                        tracing::info!(parent: &self.span, "client silent for too long, closing");
                        return Ok((code::AWAY, "idle timeout"));
                    }
                },
                read = self.socket.read() => {
                    read?;
                    self.session.heard();
                    // Boxed: a command's path (a subscribe reads Redis) is
                    // deep and rare, and the connection's long-lived task
                    // should not reserve room for it between commands.
                    let span = self.span.clone();
                    if let Some(close) = Box::pin(self.frames().instrument(span)).await? {
                        return Ok(close);
                    }
                }
            }
        }
    }

    /// Handles every complete message the client sent; returns a close
    /// frame to send when the connection must end.
    async fn frames(&mut self) -> Result<Option<Close>, Gone> {
        loop {
            let text = match self.socket.next().await? {
                None => return Ok(None),
                Some(Message::TooLong { size, max }) => {
                    tracing::info!(size, max, "frame too large, closing");
                    let reason = format!("message of {size} bytes exceeds the limit of {max}");
                    self.refuse(&Refusal::TooLarge(reason), &None).await?;
                    return Ok(Some((code::TOO_BIG, "message too large")));
                }
                Some(Message::Broken(code, reason)) => {
                    tracing::info!(code = code.0, reason, "websocket protocol error, closing");
                    return Ok(Some((code, reason)));
                }
                Some(Message::Text(text)) => Some(text),
                Some(Message::Binary) => None,
            };
            match self.session.take_command() {
                Verdict::Go => {}
                Verdict::SlowDown => {
                    self.refuse(&Refusal::RateLimited, &None).await?;
                    continue;
                }
                Verdict::Close => {
                    tracing::info!("command rate exceeded persistently, closing");
                    return Ok(Some((code::POLICY, "rate limit exceeded")));
                }
            }
            match text {
                Some(text) => self.command(&text).await?,
                None => {
                    let refusal = Refusal::BadRequest("binary frames are not supported".into());
                    self.refuse(&refusal, &None).await?;
                }
            }
        }
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
            (Some("presence"), Some(channel)) => self.presence(&channel, &cmd.id).await,
            (Some("presence"), None) => self.refuse(&missing("channel"), &cmd.id).await,
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
        match self.session.authenticate(token).await {
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
        let since = match since.as_deref() {
            None => None,
            // From the oldest message still in the channel's history.
            Some(crate::http::OLDEST) => Some(StreamId::ZERO),
            Some(text) => match text.parse::<StreamId>() {
                Ok(since) => Some(since),
                Err(()) => {
                    let reason =
                        "bad `since`: expected a message id like 1700000000000-0, or \"oldest\"";
                    return self.refuse(&Refusal::BadRequest(reason.into()), &id).await;
                }
            },
        };
        // The replay, if any, comes out of the session before anything
        // else, and before the next command is read: that bounds what a
        // connection holds.
        let s = match self.session.subscribe(&channel, events, since, false).await {
            Ok(s) => s,
            Err(refusal) => return self.refuse(&refusal, &id).await,
        };
        // A signed-in client of a presence channel is one of its members.
        let user = self.session.user().map(str::to_owned);
        if let (true, Some(user)) = (self.app().policy.is_presence(&channel), user) {
            if let Err(refusal) = self.session.join(&channel, &user, "null").await {
                self.session.unsubscribe(&channel);
                return self.refuse(&refusal, &id).await;
            }
        }
        self.send(reply::subscribed(&channel, s.recovered, s.position, &id))
            .await
    }

    /// Answers a `presence` request: the members of a presence channel
    /// the client is subscribed to.
    async fn presence(&mut self, channel: &str, id: &Option<Value>) -> Result<(), Gone> {
        if !self.session.is_subscribed(channel) {
            let refusal = Refusal::BadRequest(format!("subscribe to `{channel}` first"));
            return self.refuse(&refusal, id).await;
        }
        if !self.app().policy.is_presence(channel) {
            let reason = format!("`{channel}` is not a presence channel");
            return self.refuse(&Refusal::BadRequest(reason), id).await;
        }
        let app = Arc::clone(self.app());
        match app.members(channel).await {
            Ok(members) => {
                self.send(reply::presence(channel, members.count, &members.listed, id))
                    .await
            }
            Err(refusal) => self.refuse(&refusal, id).await,
        }
    }

    fn app(&self) -> &Arc<App> {
        self.session.app()
    }

    async fn refuse(&mut self, refusal: &Refusal, id: &Option<Value>) -> Result<(), Gone> {
        self.send(reply::refused(refusal, id)).await
    }

    async fn send(&mut self, text: String) -> Result<(), Gone> {
        self.socket.send(text.as_bytes()).await
    }

    /// Writes what is buffered. A client whose queue overflowed still gets
    /// this write, then the close frame saying why (1013), unless it makes
    /// no progress for the write timeout.
    async fn flush(&mut self) -> Result<(), Gone> {
        self.socket.link.flush().await
    }
}

/// A publication as one text frame, for direct writes.
fn frame(p: &Publication) -> Bytes {
    p.on_wire(Encoding::WsFrame, |p| text_frame(p.frame.as_bytes()))
}
