//! WebSocket test client over tokio-tungstenite: JSON frames in and out, and
//! assertions on what a browser would see (frames, close code and reason).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Response;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Bound on the TCP connect plus the upgrade handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `subscribe` waits for its reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The path of a `ws://` or `wss://` URL.
fn request_path(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.find('/').map_or("/", |at| &rest[at..])
}

/// A connected WebSocket client.
pub struct WsClient {
    inner: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The 101 response, so tests can check upgrade headers.
    response: Response,
}

/// What the next data frame turned out to be.
enum Next {
    Json(Value),
    Close(u16, String),
    /// The connection ended without a close frame.
    Ended(String),
    TimedOut,
}

impl WsClient {
    /// Connects to `url` (`ws://127.0.0.1:PORT/ws...`); panics on failure.
    pub async fn connect(url: &str) -> WsClient {
        match Self::try_connect(url, &[]).await {
            Ok(client) => client,
            Err(Error::Http(response)) => panic!(
                "WebSocket upgrade to {url} refused with {}: {}",
                response.status(),
                response
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default()
            ),
            Err(e) => panic!("WebSocket connect to {url} failed: {e}"),
        }
    }

    /// Connects with extra request `headers` (cookies, `Authorization`,
    /// `Origin`...). A refused upgrade is `Err(Error::Http(response))`, whose
    /// status and body tests can assert on. A connect or handshake taking
    /// longer than 10 s is an `Error::Io` of kind `TimedOut`.
    ///
    /// With `CRIER_TEST_WS_DEFLATE=1` the connection negotiates
    /// permessage-deflate through [`super::inflating`], and an upgrade to
    /// crier's `/ws` that did not negotiate it panics.
    pub async fn try_connect(url: &str, headers: &[(&str, &str)]) -> Result<WsClient, Error> {
        let compressing = super::inflating::enabled();
        let target = match compressing {
            true => super::inflating::relay(url).await,
            false => url.to_string(),
        };
        let mut request = target.as_str().into_client_request()?;
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .unwrap_or_else(|e| panic!("bad header name {name:?}: {e}"));
            let value = HeaderValue::from_str(value)
                .unwrap_or_else(|e| panic!("bad value for header {name}: {e}"));
            request.headers_mut().append(name, value);
        }
        let (inner, response) = timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(request))
            .await
            .map_err(|_| {
                Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("WebSocket connect to {url} timed out after {CONNECT_TIMEOUT:?}"),
                ))
            })??;
        let crier_ws = request_path(url).starts_with("/ws");
        if compressing && crier_ws {
            let extensions = response.headers().get("sec-websocket-extensions");
            assert!(
                extensions.is_some_and(|e| e.as_bytes().starts_with(b"permessage-deflate")),
                "CRIER_TEST_WS_DEFLATE=1, but {url} did not negotiate permessage-deflate: {extensions:?}"
            );
        }
        Ok(WsClient { inner, response })
    }

    /// The server's 101 Switching Protocols response.
    pub fn response(&self) -> &Response {
        &self.response
    }

    /// Sends `v` as one Text frame.
    pub async fn send_json(&mut self, v: Value) {
        self.send_raw(Message::text(v.to_string())).await;
    }

    /// Sends `s` as one Text frame, as is (for malformed-input tests).
    pub async fn send_text(&mut self, s: &str) {
        self.send_raw(Message::text(s)).await;
    }

    /// Sends any frame (binary, ping, close...); panics if the socket fails.
    pub async fn send_raw(&mut self, msg: Message) {
        self.inner
            .send(msg)
            .await
            .unwrap_or_else(|e| panic!("sending a WebSocket frame failed: {e}"));
    }

    /// Starts a clean close from the client side (close frame without code).
    pub async fn close(&mut self) {
        // The peer may already be gone; that is not what tests assert here.
        let _ = self.inner.close(None).await;
    }

    /// The next Text frame, parsed as JSON. Ping/Pong frames are skipped;
    /// panics on timeout, on a close (showing code and reason), on the end of
    /// the connection, or on a frame that is not JSON text.
    pub async fn recv_json(&mut self, timeout: Duration) -> Value {
        match self.next_json(Instant::now() + timeout).await {
            Next::Json(v) => v,
            Next::Close(code, reason) => {
                panic!("expected a JSON frame, got close {code} {reason:?}")
            }
            Next::Ended(why) => panic!("expected a JSON frame, the connection ended: {why}"),
            Next::TimedOut => panic!("no JSON frame within {timeout:?}"),
        }
    }

    /// Skips frames until one whose `"type"` is `ty`, and returns it; panics on
    /// timeout (listing what was skipped), close or end of connection.
    pub async fn recv_type(&mut self, ty: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        let mut skipped = Vec::new();
        loop {
            match self.next_json(deadline).await {
                Next::Json(v) if v["type"] == ty => return v,
                Next::Json(v) => skipped.push(v),
                Next::Close(code, reason) => panic!(
                    "expected a {ty:?} frame, got close {code} {reason:?}; skipped: {skipped:?}"
                ),
                Next::Ended(why) => panic!(
                    "expected a {ty:?} frame, the connection ended ({why}); skipped: {skipped:?}"
                ),
                Next::TimedOut => {
                    panic!("no {ty:?} frame within {timeout:?}; skipped: {skipped:?}")
                }
            }
        }
    }

    /// Reads until the server closes: returns the close code (1005 for a close
    /// frame without one, 1006 if the connection ended without any close
    /// frame), the reason, and the JSON frames received before it. Panics if
    /// the connection is still open after `timeout`.
    pub async fn expect_close(&mut self, timeout: Duration) -> (u16, String, Vec<Value>) {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        loop {
            match self.next_json(deadline).await {
                Next::Json(v) => frames.push(v),
                Next::Close(code, reason) => {
                    // Send tungstenite's queued close reply, completing the
                    // closing handshake as a browser would; the peer may
                    // already have gone, which is fine.
                    let _ = timeout_at(deadline, self.inner.flush()).await;
                    return (code, reason, frames);
                }
                Next::Ended(_) => return (u16::from(CloseCode::Abnormal), String::new(), frames),
                Next::TimedOut => {
                    panic!("connection not closed within {timeout:?}; frames meanwhile: {frames:?}")
                }
            }
        }
    }

    /// Sends `{"type":"subscribe","channel":channel,"id":id}` and returns the
    /// reply carrying that `id` (`subscribed` or `error`), skipping `message`
    /// frames and anything else that arrives first. Panics after 5 s.
    pub async fn subscribe(&mut self, channel: &str, id: u64) -> Value {
        self.send_json(json!({"type": "subscribe", "channel": channel, "id": id}))
            .await;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut skipped = Vec::new();
        loop {
            match self.next_json(deadline).await {
                Next::Json(v) if v["type"] != "message" && v["id"].as_u64() == Some(id) => {
                    return v
                }
                Next::Json(v) => skipped.push(v),
                Next::Close(code, reason) => panic!(
                    "subscribe {channel:?} (id {id}): got close {code} {reason:?}; skipped: {skipped:?}"
                ),
                Next::Ended(why) => panic!(
                    "subscribe {channel:?} (id {id}): connection ended ({why}); skipped: {skipped:?}"
                ),
                Next::TimedOut => panic!(
                    "subscribe {channel:?} (id {id}): no reply within {REPLY_TIMEOUT:?}; skipped: {skipped:?}"
                ),
            }
        }
    }

    /// The underlying stream, for tests that drive frames themselves.
    pub fn into_inner(self) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
        self.inner
    }

    /// Next Text frame as JSON, or the close/end of the connection. Ping and
    /// Pong are skipped (tungstenite answers pings by itself); binary or
    /// non-JSON text is a protocol violation and panics.
    async fn next_json(&mut self, deadline: Instant) -> Next {
        loop {
            let item = match timeout_at(deadline, self.inner.next()).await {
                Ok(item) => item,
                Err(_) => return Next::TimedOut,
            };
            match item {
                Some(Ok(Message::Text(text))) => {
                    return match serde_json::from_str(text.as_str()) {
                        Ok(v) => Next::Json(v),
                        Err(e) => panic!("text frame is not JSON ({e}): {:?}", text.as_str()),
                    };
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Close(frame))) => {
                    return match frame {
                        Some(frame) => Next::Close(frame.code.into(), frame.reason.to_string()),
                        None => Next::Close(u16::from(CloseCode::Status), String::new()),
                    };
                }
                Some(Ok(Message::Binary(data))) => {
                    panic!("unexpected binary frame ({} bytes)", data.len())
                }
                Some(Ok(Message::Frame(_))) => continue,
                Some(Err(e)) => return Next::Ended(e.to_string()),
                None => return Next::Ended("stream ended".into()),
            }
        }
    }
}
