//! The WebSocket driver: one connection loop for every wire protocol
//! spoken over WebSocket (crier's own `/ws`, Pusher's `/app/{key}`).
//!
//! The driver owns the upgrade, the socket taken out of hyper, the
//! connection's [`Session`] and its loop: publications written in batches
//! (or by the hub directly), control frames answered as RFC 6455 asks, the
//! command rate, the heartbeat and idle clocks, the drain, and the closing
//! handshake. A protocol is a [`Protocol`]: how a publication looks as a
//! frame, what to do with a text message, and what to tell a client that
//! is refused or must go. Adding one is one file (docs/architecture.md).

use std::borrow::Cow;
use std::future::{poll_fn, Future};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use std::net::SocketAddr;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper_tungstenite::tungstenite::handshake::derive_accept_key;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::app::App;
use crate::config::Compression;
use crate::fdlimit::Slot;
use crate::http::{full, rejected, Body};
pub use crate::link::Gone;
use crate::link::Link;
use crate::metrics::{Counted, Transport};
use crate::protocol::{ChainSpec, Deflate, Encoder, Encoding, Follower, Publication};
use crate::refusal::Refusal;
use crate::session::{Admission, Event, Session, Verdict, Wire};
use crate::stall::StallGuard;
use crate::transport::deflate;
pub use crate::transport::rfc6455::CloseCode;
use crate::transport::rfc6455::{self, Error, Frame, Reader};

/// Publications written per flush: enough to batch syscalls under load,
/// few enough that a burst does not delay reading the client.
const WRITE_BATCH: usize = 64;
/// How long a closing connection waits for the client's close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Answers a WebSocket handshake with 101 (accepting `extension`, if
/// any) and runs `serve` on the socket (with what the client sent right
/// behind its handshake, and its descriptor slot) once hyper lets it go;
/// or answers why not.
fn upgrade<B, F, Fut>(
    app: &Arc<App>,
    mut req: Request<B>,
    slot: Slot,
    extension: Option<&'static str>,
    serve: F,
) -> Response<Body>
where
    B: Send + 'static,
    F: FnOnce(TcpStream, Vec<u8>, Slot) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let accept = match accept_key(&req) {
        Ok(accept) => accept,
        Err(reason) => {
            let refusal = Refusal::BadRequest(format!("bad WebSocket handshake: {reason}"));
            return rejected(&app.metrics, &refusal);
        }
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let handshake = app.config.ws.handshake_timeout;
    app.process.tasks.spawn(async move {
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
                // The socket's descriptor slot goes where the socket goes.
                serve(stream, early, slot).await;
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
    if let Some(extension) = extension {
        headers.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static(extension),
        );
    }
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

/// What the client sent, as the driver reads it.
#[derive(Debug)]
enum Message {
    Text(String),
    Binary,
    /// A frame over the size limit: close with 1009 after saying so.
    TooLong {
        size: usize,
        max: usize,
    },
    /// A broken frame: close with this code and reason.
    Broken(CloseCode, &'static str),
}

/// A close to send: the code and the reason.
pub type Close = (CloseCode, Cow<'static, str>);

/// How a connection ends: the message to send first, if any, and the
/// close frame.
pub type Farewell = (Option<Vec<u8>>, Close);

/// A WebSocket connection: the socket's [`Link`] and the frame reader.
struct WebSocket {
    link: Link,
    reader: Reader,
}

impl WebSocket {
    /// The socket of an upgraded connection, and what its client sent
    /// right behind its handshake.
    /// `deflate`: the connection negotiated permessage-deflate, so a
    /// client message may come compressed.
    fn open(app: &App, stream: TcpStream, early: Vec<u8>, deflate: bool) -> Self {
        let link = Link::new(
            stream,
            app.config.ws.write_timeout,
            app.metrics.slow_client_disconnects.clone(),
        );
        let mut socket = Self::new(link, app.config.limits.max_message_bytes, early);
        socket.reader.deflate = deflate;
        socket
    }

    fn new(link: Link, max_message: usize, early: Vec<u8>) -> Self {
        let mut reader = Reader::new(max_message);
        reader.buf = early;
        Self { link, reader }
    }

    /// Reads what the socket has; `Gone` once the client has gone.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Gone>> {
        match ready!(self.link.socket.poll_read(cx, &mut self.reader.buf)) {
            Ok(n) if n > 0 => Poll::Ready(Ok(())),
            _ => Poll::Ready(Err(Gone)),
        }
    }

    /// The next complete message read, answering pings on the way (the
    /// pong is written with the next flush, and flushed here). A close
    /// from the client is echoed (RFC 6455 5.5.1), and ends the
    /// connection: `Gone`.
    async fn next(&mut self) -> Result<Option<Message>, Gone> {
        loop {
            let frame = match self.reader.next() {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(None),
                Err(Error::TooLong { size, max }) => {
                    return Ok(Some(Message::TooLong { size, max }))
                }
                Err(e) => {
                    let reason = match e {
                        Error::Protocol(reason) => reason,
                        Error::BadDeflate => "malformed compressed message",
                        _ => "text frame is not UTF-8",
                    };
                    return Ok(Some(Message::Broken(e.close_code(), reason)));
                }
            };
            match frame {
                Frame::Text(text) => return Ok(Some(Message::Text(text))),
                Frame::Binary => return Ok(Some(Message::Binary)),
                Frame::Ping(payload) => {
                    rfc6455::encode(self.link.out.own(), rfc6455::PONG, &payload);
                    self.link.flush().await?;
                }
                Frame::Pong => {}
                Frame::Close(code) => {
                    let payload = code.map(u16::to_be_bytes);
                    let payload: &[u8] = payload.as_ref().map_or(&[], |p| p);
                    rfc6455::encode(self.link.out.own(), rfc6455::CLOSE, payload);
                    let _ = self.link.flush().await;
                    return Err(Gone);
                }
            }
        }
    }

    /// Buffers `text` as a text frame.
    fn push(&mut self, text: &[u8]) {
        rfc6455::encode(self.link.out.own(), rfc6455::TEXT, text);
    }

    /// Writes `text` as a text frame, with whatever is buffered.
    async fn send(&mut self, text: &[u8]) -> Result<(), Gone> {
        self.push(text);
        self.link.flush().await
    }

    /// Buffers `first` and whatever else the session has ready (up to a
    /// batch), each as `encoder` makes it once per publication, for one
    /// write. The frames are queued by reference, not copied: a client
    /// that stops reading holds the bytes every recipient shares.
    fn batch(&mut self, session: &mut Session, first: Arc<Publication>, encoder: &Encoder) {
        self.link.out.push(encoder.encode(&first));
        for _ in 1..WRITE_BATCH {
            let Some(p) = session.try_next() else {
                break;
            };
            self.link.out.push(encoder.encode(&p));
        }
    }

    /// Sends the close frame, and lets the client complete the closing
    /// handshake before the socket is dropped. Dropping at once can reset
    /// the connection while the client still writes (a pong, a command),
    /// and a reset discards our close frame on its side: a browser would
    /// then report 1006 instead of our code.
    async fn close(&mut self, code: CloseCode, reason: &str) {
        rfc6455::encode_close(self.link.out.own(), code, reason);
        if self.link.flush().await.is_err() {
            return;
        }
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
}

/// A publication's text as one WebSocket text frame.
pub fn text_frame(text: &[u8]) -> bytes::Bytes {
    let mut frame = Vec::with_capacity(text.len() + 10);
    rfc6455::encode(&mut frame, rfc6455::TEXT, text);
    bytes::Bytes::from(frame)
}

/// A wire protocol spoken over WebSocket: what its frames look like, and
/// nothing else. The driver ([`serve`]) calls it; see the module
/// documentation.
pub trait Protocol: Send + 'static {
    /// For metrics and logs.
    const TRANSPORT: Transport;

    /// A publication as one frame of this protocol. Made once per
    /// publication and shared by every listener ([`Publication::on_wire`]):
    /// the hub writes these bytes to idle connections directly.
    fn frame(p: &Publication) -> Bytes;

    /// Where this protocol's compressed frames are kept on a publication
    /// (made once, shared by every connection that negotiated
    /// permessage-deflate); `None`: compressed for each connection.
    const DEFLATED: Option<Encoding> = None;

    /// The bytes a replayed publication costs on this wire: the replay
    /// budget counts them.
    fn replay_bytes(p: &Publication) -> usize {
        Self::frame(p).len()
    }

    /// The connection is open: greet the client, subscribe what the
    /// request named.
    fn open(&mut self, conn: &mut Conn) -> impl Future<Output = Result<(), Gone>> + Send;

    /// Handles one text message from the client (the driver has charged it
    /// to the command rate).
    fn message(
        &mut self,
        conn: &mut Conn,
        text: String,
    ) -> impl Future<Output = Result<(), Gone>> + Send;

    /// A refusal the connection survives (a message too fast, a binary
    /// frame), as the message telling the client.
    fn refusal(&self, refusal: &Refusal) -> Vec<u8>;

    /// The message telling the client its credential ends in `in_secs`,
    /// if the protocol has one.
    fn expiring(&self, in_secs: u64) -> Option<Vec<u8>>;

    /// The protocol's own keep-alive message; `None`: a ping frame.
    fn heartbeat(&self) -> Option<Vec<u8>>;

    /// How the connection ends for `end`: the message to send first, if
    /// any, and the close frame.
    fn ending(&self, end: &End) -> Farewell;
}

/// Why the driver ends a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The credential expired, or its session was logged out.
    Expired,
    /// This instance drains: reconnect (elsewhere) after `after_ms`.
    Reconnect {
        /// The delay to suggest.
        after_ms: u64,
    },
    /// The client fell behind: its queue overflowed.
    Slow,
    /// The client was silent for the idle timeout.
    Idle,
    /// A message over `limits.max_message_bytes`.
    TooLong {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A frame RFC 6455 does not allow: close with this code and reason.
    Broken(CloseCode, &'static str),
    /// The client kept sending faster than the command rate.
    Flooding,
    /// The app ended every connection of the user this one signed in as.
    Terminated,
    /// The connection had to sign in within a time and did not.
    NotSignedIn,
    /// The protocol refused what the client sent and ends the connection
    /// ([`Conn::end`]): a sign-in with a bad signature.
    Refused(Refusal),
}

/// An open WebSocket connection, as its protocol sees it: the session and
/// a way to send messages.
pub struct Conn {
    /// The connection's session: subscriptions, credential, queue.
    pub session: Session,
    socket: WebSocket,
    /// How publications become frames on this connection (compressed, if
    /// it negotiated permessage-deflate).
    encoder: Encoder,
    /// How the connection ends, once its protocol decided it must
    /// ([`Conn::end`]); boxed, as most connections never get one.
    ending: Option<Box<End>>,
    /// Held while the connection lasts: its descriptor slot, and its
    /// place in the count of compressed connections.
    _slot: Slot,
    _counted: Option<Counted>,
}

impl Conn {
    /// The connection of protocol `P` on an upgraded socket: its session
    /// opened, not yet greeted.
    fn open<P: Protocol>(
        app: Arc<App>,
        socket: WebSocket,
        peer: SocketAddr,
        admission: Admission,
        deflate: Option<(Deflate, deflate::Agreed)>,
        slot: Slot,
    ) -> Self {
        let ws = &app.config.ws;
        let wire = Wire {
            transport: P::TRANSPORT,
            heartbeat: ws.ping_interval,
            idle_timeout: Some(ws.idle_timeout),
            replay_overhead: 0,
            replay_bytes: P::replay_bytes,
            peer,
        };
        let counted = deflate
            .is_some()
            .then(|| Counted::new(&app.metrics.ws_compressed_connections));
        let encoder = match deflate {
            Some((settings, agreed)) => deflated_encoder::<P>(settings, agreed),
            None => Encoder::Plain(plain::<P>),
        };
        let session = Session::open(app, admission, wire);
        session.attach(socket.link.outlet(), encoder.clone());
        Self {
            session,
            socket,
            encoder,
            ending: None,
            _slot: slot,
            _counted: counted,
        }
    }

    /// Serves the connection with `protocol` until it closes.
    ///
    /// This future is the connection's task, and an idle connection's
    /// memory is mostly its size: an `async` block over `self` in place
    /// (an `async fn` keeps a second copy of its arguments), whose
    /// long-lived await ([`Conn::run`]) holds only small futures; the rare
    /// paths (a message, the close) box theirs.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn would keep a second copy of its arguments"
    )]
    fn serve<P: Protocol>(mut self, mut protocol: P) -> impl Future<Output = ()> + Send {
        async move {
            let compressed = self._counted.is_some();
            tracing::debug!(parent: &self.session.span(), compressed, "websocket opened");
            if let Ok(end) = self.run(&mut protocol).await {
                // Boxed: the close is once per connection, and its state
                // would otherwise be room every idle connection's task
                // reserves.
                Box::pin(self.close_as(&mut protocol, end)).await;
            }
            tracing::debug!(parent: &self.session.span(), "websocket closed");
        }
    }

    /// Ends the connection as `end` says: the protocol's last word, then
    /// the close handshake.
    async fn close_as<P: Protocol>(&mut self, protocol: &mut P, end: End) {
        let span = self.session.span();
        log_end(&span, &end);
        let (message, (code, reason)) = protocol.ending(&end);
        tracing::debug!(parent: &span, code = code.0, %reason, "closing websocket");
        finish(&mut self.socket, message, code, &reason).await;
    }

    /// The shared state the connection runs in.
    pub(crate) fn app(&self) -> &Arc<App> {
        self.session.app()
    }

    /// Ends the connection once the message being handled is done, as
    /// `end` says (the protocol's [`Protocol::ending`] for it).
    pub(crate) fn end(&mut self, end: End) {
        self.ending.get_or_insert_with(|| Box::new(end));
    }

    /// Writes `text` as a text frame, with whatever is buffered.
    pub async fn send(&mut self, text: &[u8]) -> Result<(), Gone> {
        self.socket.send(text).await
    }

    /// The connection's loop: returns how it ends, or `Gone` when the
    /// socket is already unusable.
    async fn run<P: Protocol>(&mut self, protocol: &mut P) -> Result<End, Gone> {
        let span = self.session.span();
        Box::pin(protocol.open(self).instrument(span)).await?;
        loop {
            // The next event, unless the client sent something first. What
            // an event writes is buffered, then flushed once below.
            let next = poll_fn(|cx| {
                if let Poll::Ready(event) = self.session.poll_next(cx) {
                    return Poll::Ready(Ok(Some(event)));
                }
                self.socket.poll_read(cx).map(|read| read.map(|()| None))
            });
            match next.await? {
                Some(event) => {
                    if let Some(end) = self.buffer(protocol, event) {
                        return Ok(end);
                    }
                    // At once when the socket takes it all; the wait for
                    // a full one is rare, and boxed (see `Link::flush_now`).
                    if let Some(at) = self.socket.link.flush_now(0)? {
                        Box::pin(self.socket.link.flush_from(at)).await?;
                    }
                }
                None => {
                    self.session.heard();
                    // Boxed: a message's path (a subscribe reads Redis) is
                    // deep and rare, and the connection's long-lived task
                    // should not reserve room for it between messages.
                    let span = self.session.span();
                    if let Some(end) = Box::pin(self.messages(protocol).instrument(span)).await? {
                        return Ok(end);
                    }
                }
            }
        }
    }

    /// Buffers what the session's `event` writes; returns how the
    /// connection ends when it must.
    fn buffer<P: Protocol>(&mut self, protocol: &P, event: Event) -> Option<End> {
        match event {
            // Each frame is encoded once per publication, shared by every
            // recipient (the bytes direct writes send too).
            Event::Deliver(first) => self.socket.batch(&mut self.session, first, &self.encoder),
            Event::Expiring { in_secs } => {
                if let Some(text) = protocol.expiring(in_secs) {
                    self.socket.push(&text);
                }
            }
            Event::Expired => return Some(End::Expired),
            Event::Reconnect { after_ms } => return Some(End::Reconnect { after_ms }),
            Event::Slow => return Some(End::Slow),
            // A client whose queue overflowed still gets this write, then
            // the close saying why, unless it makes no progress for the
            // write timeout.
            Event::Flush => {}
            Event::Heartbeat => match protocol.heartbeat() {
                Some(text) => self.socket.push(&text),
                None => rfc6455::encode(self.socket.link.out.own(), rfc6455::PING, b""),
            },
            Event::Idle => return Some(End::Idle),
            Event::Terminated => return Some(End::Terminated),
            Event::NotSignedIn => return Some(End::NotSignedIn),
        }
        None
    }

    /// Handles every complete message the client sent; returns how the
    /// connection ends when it must.
    async fn messages<P: Protocol>(&mut self, protocol: &mut P) -> Result<Option<End>, Gone> {
        loop {
            let text = match self.socket.next().await? {
                None => return Ok(None),
                Some(Message::TooLong { size, max }) => {
                    return Ok(Some(End::TooLong { size, max }))
                }
                Some(Message::Broken(code, reason)) => return Ok(Some(End::Broken(code, reason))),
                Some(Message::Text(text)) => Some(text),
                Some(Message::Binary) => None,
            };
            match self.session.take_command() {
                Verdict::Go => {}
                Verdict::SlowDown => {
                    self.send(&protocol.refusal(&Refusal::RateLimited)).await?;
                    continue;
                }
                Verdict::Close => return Ok(Some(End::Flooding)),
            }
            match text {
                Some(text) => protocol.message(self, text).await?,
                None => {
                    let refusal = Refusal::BadRequest("binary frames are not supported".into());
                    self.send(&protocol.refusal(&refusal)).await?;
                }
            }
            if let Some(end) = self.ending.take() {
                return Ok(Some(*end));
            }
        }
    }
}

/// Answers a WebSocket handshake with 101 and serves protocol `P` on the
/// socket, or, when `admitted` is a refusal, tells the client why (the
/// message and close frame the protocol chose) and closes. A client that
/// offers permessage-deflate gets it while `ws.compression` is `auto`.
pub(crate) fn handle<B, P>(
    app: &Arc<App>,
    req: Request<B>,
    info: crate::app::ConnInfo,
    admitted: Result<(Admission, P), Farewell>,
) -> Response<Body>
where
    B: Send + 'static,
    P: Protocol,
{
    let ws = &app.config.ws;
    let offers = req.headers().get_all(header::SEC_WEBSOCKET_EXTENSIONS);
    let agreed = match ws.compression {
        Compression::Auto => deflate::accepts(offers.iter()),
        Compression::Off => None,
    };
    let deflate = agreed.map(|agreed| {
        let settings = Deflate {
            level: ws.compression_level,
            min_bytes: ws.compression_min_bytes,
            metrics: app.metrics.clone(),
        };
        (settings, agreed)
    });
    let extension = agreed.map(deflate::Agreed::answer);
    let task_app = Arc::clone(app);
    upgrade(
        app,
        req,
        info.slot,
        extension,
        move |stream, early, slot| async move {
            let mut socket = WebSocket::open(&task_app, stream, early, deflate.is_some());
            match admitted {
                Ok((admission, protocol)) => {
                    let conn =
                        Conn::open::<P>(task_app, socket, info.peer, admission, deflate, slot);
                    // The connection's own task, which carries nothing of
                    // the upgrade's.
                    let tasks = conn.app().process.tasks.clone();
                    tasks.spawn(conn.serve(protocol));
                }
                Err((message, (code, reason))) => {
                    let _slot = slot;
                    tracing::info!(code = code.0, %reason, "websocket connection refused");
                    finish(&mut socket, message, code, &reason).await;
                }
            }
        },
    )
}

/// A publication as protocol `P`'s frame.
fn plain<P: Protocol>(p: &Publication) -> Bytes {
    P::frame(p)
}

/// How a connection of protocol `P` that `agreed` on compression encodes
/// publications: compressed on their own, and, when the client keeps its
/// window and the protocol keeps its compressed frames on publications,
/// chained where its channels have a context (see `deflate.rs`).
fn deflated_encoder<P: Protocol>(settings: Deflate, agreed: deflate::Agreed) -> Encoder {
    let follower = match (agreed, P::DEFLATED) {
        (deflate::Agreed::Chained, Some(slot)) => Some(Follower::new(ChainSpec {
            key: slot as u8,
            make: deflate::ChannelContext::make,
            plain: plain::<P>,
            deflate: settings.clone(),
            breaks: deflate::is_compressed,
        })),
        _ => None,
    };
    Encoder::deflated(deflated::<P>, settings, follower)
}

/// A publication as protocol `P`'s compressed frame: made once per
/// publication where the protocol keeps it (see [`Protocol::DEFLATED`]).
fn deflated<P: Protocol>(p: &Publication, settings: &Deflate) -> Bytes {
    match P::DEFLATED {
        Some(slot) => p.on_wire(slot, |p| deflate::frame(&P::frame(p), settings)),
        None => deflate::frame(&P::frame(p), settings),
    }
}

/// Sends `message`, if any, then the close frame.
async fn finish(socket: &mut WebSocket, message: Option<Vec<u8>>, code: CloseCode, reason: &str) {
    if let Some(message) = message {
        if socket.send(&message).await.is_err() {
            return;
        }
    }
    socket.close(code, reason).await;
}

/// Says, in the connection's span, why it ends (a drain needs no line).
fn log_end(span: &tracing::Span, end: &End) {
    let _in = span.enter();
    match end {
        End::Expired => tracing::info!("credential ended, closing"),
        End::Slow => tracing::info!("client too slow: queue full, closing"),
        End::Idle => tracing::info!("client silent for too long, closing"),
        End::TooLong { size, max } => tracing::info!(size, max, "message too large, closing"),
        End::Broken(code, reason) => {
            tracing::info!(code = code.0, reason, "websocket protocol error, closing");
        }
        End::Flooding => tracing::info!("command rate exceeded persistently, closing"),
        End::Terminated => tracing::info!("the app ended the user's connections, closing"),
        End::NotSignedIn => tracing::info!("not signed in in time, closing"),
        End::Refused(refusal) => tracing::info!(reason = %refusal.reason(), "refused, closing"),
        End::Reconnect { .. } => {}
    }
}
