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
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper_tungstenite::tungstenite::handshake::derive_accept_key;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::app::{App, ConnInfo};
use crate::history::StreamId;
use crate::http::{full, rejected, Body, StreamQuery};
use crate::link::{Gone, Link};
use crate::metrics::Transport;
use crate::protocol::{event_filter, reply, Command, Encoding, Publication};
use crate::refusal::Refusal;
use crate::session::{admit, Admission, Event, Session, Verdict, Wire};
use crate::stall::StallGuard;
use crate::transport::rfc6455::{self, Error, Frame, Reader};

/// Publications written per flush: enough to batch syscalls under load,
/// few enough that a burst does not delay reading the client.
const WRITE_BATCH: usize = 64;
/// How long a closing connection waits for the client's close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Close codes crier sends (RFC 6455 section 7.4, and its own 4001).
mod code {
    pub(super) const AWAY: u16 = 1001;
    pub(super) const POLICY: u16 = 1008;
    pub(super) const TOO_BIG: u16 = 1009;
    pub(super) const RESTART: u16 = 1012;
    pub(super) const AGAIN: u16 = 1013;
    pub(super) const EXPIRED: u16 = 4001;
}

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
    let accept = match accept_key(&req) {
        Ok(accept) => accept,
        Err(reason) => {
            let refusal = Refusal::BadRequest(format!("bad WebSocket handshake: {reason}"));
            return rejected(&app.metrics, &refusal);
        }
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let handshake = app.config.ws.handshake_timeout;
    let task_app = Arc::clone(&app);
    app.tasks.spawn(async move {
        let upgraded = match tokio::time::timeout(handshake, upgrade).await {
            Ok(Ok(upgraded)) => upgraded,
            Ok(Err(e)) => return tracing::debug!(error = %e, "websocket upgrade failed"),
            Err(_) => return tracing::debug!("websocket upgrade timed out"),
        };
        // The socket leaves hyper: the connection is ours from here on.
        match upgraded.downcast::<TokioIo<StallGuard<TcpStream>>>() {
            Ok(parts) => {
                let stream = parts.io.into_inner().into_inner();
                // Copied out: the bytes hyper hands back share its whole
                // read buffer, which must not live as long as the socket.
                let early = parts.read_buf.to_vec();
                drop(parts.read_buf);
                serve(task_app, stream, early, query, info.peer, admission).await;
            }
            Err(_) => tracing::warn!("websocket upgrade: not a TCP connection"),
        }
    });
    let mut response = Response::new(full(""));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    response
}

/// The `Sec-WebSocket-Accept` answering the request's key.
fn accept_key<B>(req: &Request<B>) -> Result<HeaderValue, &'static str> {
    let headers = req.headers();
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err("Sec-WebSocket-Version must be 13");
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or("no Sec-WebSocket-Key")?;
    HeaderValue::from_str(&derive_accept_key(key.as_bytes())).map_err(|_| "bad Sec-WebSocket-Key")
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
        peer,
    };
    let link = Link::new(
        stream,
        ws_config.write_timeout,
        app.metrics.slow_client_disconnects.clone(),
    );
    let mut reader = Reader::new(app.config.limits.max_message_bytes);
    reader.buf = early;
    let session = Session::open(app, admission, wire);
    session.attach(link.outlet(), frame);
    let span = session.span();
    let conn = Conn {
        session,
        link,
        reader,
        span,
    };
    conn.run(query).await;
}

/// A close frame to send: code and reason.
type Close = (u16, &'static str);

struct Conn {
    session: Session,
    link: Link,
    reader: Reader,
    /// The connection's span: rare paths run in it, the delivery path
    /// does not pay for entering it.
    span: tracing::Span,
}

impl Conn {
    async fn run(mut self, query: StreamQuery) {
        tracing::debug!(parent: &self.span, "websocket opened");
        if let Ok((code, reason)) = self.serve(query).await {
            tracing::debug!(parent: &self.span, code, reason, "closing websocket");
            rfc6455::encode_close(&mut self.link.out, code, reason);
            if self.flush().await.is_ok() {
                self.await_close_reply().await;
            }
        }
        tracing::debug!(parent: &self.span, "websocket closed");
    }

    /// Lets the client complete the closing handshake before the socket is
    /// dropped. Dropping at once can reset the connection while the client
    /// still writes (a pong, a command), and a reset discards our close frame
    /// on its side: a browser would then report 1006 instead of our code.
    async fn await_close_reply(&mut self) {
        let wait = async {
            loop {
                match self.reader.next() {
                    Ok(Some(Frame::Close(_))) | Err(_) => return,
                    Ok(Some(_)) => continue,
                    Ok(None) => {}
                }
                match self.link.socket.read(&mut self.reader.buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_LINGER, wait).await;
    }

    /// Returns the close frame to send, or `Gone` when the socket is already
    /// unusable.
    async fn serve(&mut self, query: StreamQuery) -> Result<Close, Gone> {
        self.send(reply::welcome(self.session.id())).await?;
        for channel in query.channels {
            let span = self.span.clone();
            let subscribe = self.subscribe(channel, query.events.clone(), None, None);
            Box::pin(subscribe.instrument(span)).await?;
        }
        loop {
            tokio::select! {
                biased;
                event = self.session.next() => match event {
                    Event::Deliver(first) => self.deliver(first).await?,
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
                    Event::Heartbeat => {
                        rfc6455::encode(&mut self.link.out, rfc6455::PING, b"");
                        self.flush().await?;
                    }
                    Event::Idle => {
                        tracing::info!(parent: &self.span, "client silent for too long, closing");
                        return Ok((code::AWAY, "idle timeout"));
                    }
                },
                read = self.link.socket.read(&mut self.reader.buf) => {
                    if !matches!(read, Ok(n) if n > 0) {
                        return Err(Gone);
                    }
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

    /// Handles every complete frame the client sent; returns a close frame
    /// to send when the connection must end.
    async fn frames(&mut self) -> Result<Option<Close>, Gone> {
        loop {
            let frame = match self.reader.next() {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(None),
                Err(Error::TooLong { size, max }) => {
                    tracing::info!(size, max, "frame too large, closing");
                    let reason = format!("message of {size} bytes exceeds the limit of {max}");
                    self.refuse(&Refusal::TooLarge(reason), &None).await?;
                    return Ok(Some((code::TOO_BIG, "message too large")));
                }
                Err(e) => {
                    tracing::info!(error = ?e, "websocket protocol error, closing");
                    let reason = match e {
                        Error::Protocol(reason) => reason,
                        _ => "text frame is not UTF-8",
                    };
                    return Ok(Some((e.close_code(), reason)));
                }
            };
            let text = match frame {
                Frame::Text(text) => Some(text),
                Frame::Binary => None,
                Frame::Ping(payload) => {
                    rfc6455::encode(&mut self.link.out, rfc6455::PONG, &payload);
                    self.flush().await?;
                    continue;
                }
                Frame::Pong => continue,
                Frame::Close(code) => {
                    // Echo the client's close (RFC 6455 5.5.1) before the
                    // socket goes, or the client sees 1006.
                    let payload = code.map(u16::to_be_bytes);
                    let payload: &[u8] = payload.as_ref().map_or(&[], |p| p);
                    rfc6455::encode(&mut self.link.out, rfc6455::CLOSE, payload);
                    let _ = self.flush().await;
                    return Err(Gone);
                }
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

    /// Writes `first` and whatever else is ready, with one write.
    async fn deliver(&mut self, first: Arc<Publication>) -> Result<(), Gone> {
        // Each frame is encoded once per publication, shared by every
        // recipient (the same bytes direct writes send).
        self.link.out.extend_from_slice(&frame(&first));
        for _ in 1..WRITE_BATCH {
            let Some(p) = self.session.try_next() else {
                break;
            };
            self.link.out.extend_from_slice(&frame(&p));
        }
        self.flush().await
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
        rfc6455::encode(&mut self.link.out, rfc6455::TEXT, text.as_bytes());
        self.flush().await
    }

    /// Writes what is buffered. A client whose queue overflowed still gets
    /// this write, then the close frame saying why (1013), unless it makes
    /// no progress for the write timeout.
    async fn flush(&mut self) -> Result<(), Gone> {
        self.link.flush().await
    }
}

/// A publication as one text frame, for direct writes.
fn frame(p: &Publication) -> Bytes {
    p.on_wire(Encoding::WsFrame, |p| {
        let mut frame = Vec::with_capacity(p.frame.len() + 10);
        rfc6455::encode(&mut frame, rfc6455::TEXT, p.frame.as_bytes());
        Bytes::from(frame)
    })
}
