//! A WebSocket connection after its handshake, for every protocol spoken
//! over WebSocket (crier's own `/ws`, Pusher's `/app/{key}`): the upgrade,
//! the socket taken out of hyper, control frames answered as RFC 6455
//! asks, and the closing handshake. The protocols see text messages.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper_tungstenite::tungstenite::handshake::derive_accept_key;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::app::App;
use crate::fdlimit::Slot;
use crate::http::{full, rejected, Body};
use crate::link::{Gone, Link};
use crate::protocol::Publication;
use crate::refusal::Refusal;
use crate::session::Session;
use crate::stall::StallGuard;
pub(crate) use crate::transport::rfc6455::CloseCode;
use crate::transport::rfc6455::{self, Error, Frame, Reader};

/// Publications written per flush: enough to batch syscalls under load,
/// few enough that a burst does not delay reading the client.
const WRITE_BATCH: usize = 64;
/// How long a closing connection waits for the client's close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Answers a WebSocket handshake with 101 and runs `serve` on the socket
/// (with what the client sent right behind its handshake) once hyper lets
/// it go; or answers why not.
pub(crate) fn upgrade<B, F, Fut>(
    app: &Arc<App>,
    mut req: Request<B>,
    slot: Slot,
    serve: F,
) -> Response<Body>
where
    B: Send + 'static,
    F: FnOnce(TcpStream, Vec<u8>) -> Fut + Send + 'static,
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
    app.tasks.spawn(async move {
        // The socket's descriptor slot goes where the socket goes.
        let _slot = slot;
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
                serve(stream, early).await;
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

/// What the client sent, for the protocol to handle.
#[derive(Debug)]
pub(crate) enum Message {
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

/// A close to send: the code and the reason, the same for every
/// WebSocket protocol.
pub(crate) type Close = (CloseCode, &'static str);

/// A WebSocket connection: the socket's [`Link`] and the frame reader.
pub(crate) struct WebSocket {
    pub(crate) link: Link,
    reader: Reader,
}

impl WebSocket {
    pub(crate) fn new(link: Link, max_message: usize, early: Vec<u8>) -> Self {
        let mut reader = Reader::new(max_message);
        reader.buf = early;
        Self { link, reader }
    }

    /// Reads what the socket has; `Gone` once the client has gone.
    pub(crate) async fn read(&mut self) -> Result<(), Gone> {
        match self.link.socket.read(&mut self.reader.buf).await {
            Ok(n) if n > 0 => Ok(()),
            _ => Err(Gone),
        }
    }

    /// The next complete message read, answering pings on the way (the
    /// pong is written with the next flush, and flushed here). A close
    /// from the client is echoed (RFC 6455 5.5.1), and ends the
    /// connection: `Gone`.
    pub(crate) async fn next(&mut self) -> Result<Option<Message>, Gone> {
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
    pub(crate) fn push(&mut self, text: &[u8]) {
        rfc6455::encode(self.link.out.own(), rfc6455::TEXT, text);
    }

    /// Writes `text` as a text frame, with whatever is buffered.
    pub(crate) async fn send(&mut self, text: &[u8]) -> Result<(), Gone> {
        self.push(text);
        self.link.flush().await
    }

    /// Writes `first` and whatever else the session has ready (up to a
    /// batch), each as `frame` encodes it once per publication, with one
    /// write. The frames are queued by reference, not copied: a client
    /// that stops reading holds the bytes every recipient shares.
    pub(crate) async fn deliver(
        &mut self,
        session: &mut Session,
        first: Arc<Publication>,
        frame: fn(&Publication) -> bytes::Bytes,
    ) -> Result<(), Gone> {
        self.link.out.push(frame(&first));
        for _ in 1..WRITE_BATCH {
            let Some(p) = session.try_next() else {
                break;
            };
            self.link.out.push(frame(&p));
        }
        self.link.flush().await
    }

    /// Sends a ping frame.
    pub(crate) async fn ping(&mut self) -> Result<(), Gone> {
        rfc6455::encode(self.link.out.own(), rfc6455::PING, b"");
        self.link.flush().await
    }

    /// Sends the close frame, and lets the client complete the closing
    /// handshake before the socket is dropped. Dropping at once can reset
    /// the connection while the client still writes (a pong, a command),
    /// and a reset discards our close frame on its side: a browser would
    /// then report 1006 instead of our code.
    pub(crate) async fn close(&mut self, code: CloseCode, reason: &str) {
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
pub(crate) fn text_frame(text: &[u8]) -> bytes::Bytes {
    let mut frame = Vec::with_capacity(text.len() + 10);
    rfc6455::encode(&mut frame, rfc6455::TEXT, text);
    bytes::Bytes::from(frame)
}
