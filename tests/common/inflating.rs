//! A compressing WebSocket client for the suites that use [`WsClient`]:
//! with `CRIER_TEST_WS_DEFLATE=1`, every `ws://` connection of a test goes
//! through an inflating relay that offers permessage-deflate to crier and
//! inflates what crier compressed, so the same tests prove the same
//! behaviour (slow clients, drain, heartbeats, history) with compression
//! negotiated.
//!
//! tungstenite has no permessage-deflate, so the relay does that part:
//! crier sees a client that offered `permessage-deflate;
//! client_max_window_bits` and accepts compressed frames; the test's
//! tungstenite sees every message uncompressed. The relay holds at most one
//! message and one read: when the test stops reading, the relay stops
//! reading too, and crier's socket fills as it would.
//!
//! [`WsClient`]: super::ws::WsClient

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the relay adds to the client's upgrade request, as Chromium offers.
const OFFER: &str = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits";
/// How long the relay waits for the test to connect to it.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a request or response head.
const MAX_HEAD: usize = 64 * 1024;

/// Whether this run's WebSocket clients compress (`CRIER_TEST_WS_DEFLATE=1`,
/// set by `scripts/test` for a second run of some suites).
pub fn enabled() -> bool {
    std::env::var("CRIER_TEST_WS_DEFLATE").as_deref() == Ok("1")
}

/// Starts a relay for one connection to `url` (`ws://host:port/path…`) and
/// returns the URL the test's client connects to instead. A `wss://` URL
/// is returned unchanged: its tests are about TLS, not compression.
pub async fn relay(url: &str) -> String {
    let Some(rest) = url.strip_prefix("ws://") else {
        return url.to_string();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("relay bind");
    let local = listener.local_addr().expect("relay address");
    let upstream = authority.to_string();
    tokio::spawn(async move {
        let Ok(Ok((client, _))) = tokio::time::timeout(ACCEPT_TIMEOUT, listener.accept()).await
        else {
            return;
        };
        // A refused connection is the test's to see: the relay closes the
        // client's socket and the client reports what it got.
        let Ok(server) = TcpStream::connect(&upstream).await else {
            return;
        };
        run(client, server, &upstream).await;
    });
    format!("ws://{local}{path}")
}

/// Relays one connection: the upgrade with the offer added, the client's
/// frames as they are, the server's frames inflated.
async fn run(mut client: TcpStream, mut server: TcpStream, upstream: &str) {
    let (request, early) = match read_head(&mut client).await {
        Some(head) => head,
        None => return,
    };
    if server
        .write_all(&offer_deflate(&request, upstream))
        .await
        .is_err()
        || server.write_all(&early).await.is_err()
    {
        return;
    }
    let Some((response, rest)) = read_head(&mut server).await else {
        return;
    };
    // The extension header stays in the response: tungstenite ignores it,
    // and `WsClient` asserts on it that crier accepted.
    let head = String::from_utf8_lossy(&response).to_ascii_lowercase();
    let deflated = head.contains("permessage-deflate");
    // Without `server_no_context_takeover`, crier may refer to earlier
    // messages: one inflater for the connection, as a browser keeps.
    let own = head.contains("server_no_context_takeover");
    if client.write_all(&response).await.is_err() {
        return;
    }
    if !head.starts_with("http/1.1 101") {
        // A refusal: its body goes through as it is.
        let _ = client.write_all(&rest).await;
        let _ = tokio::io::copy(&mut server, &mut client).await;
        return;
    }
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upward = async {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
    };
    let downward = async {
        let mut frames = Frames {
            buffer: rest,
            from: &mut server_read,
        };
        let mut message: Option<(u8, Vec<u8>)> = None;
        let mut inflater = flate2::Decompress::new(false);
        while let Some(frame) = frames.next().await {
            let out = match frame.opcode {
                // Control frames are never compressed: through as they are.
                op if op >= 8 => Some(encode(op, &frame.payload)),
                // The first frame of a compressed message (RSV1).
                op if op != 0 && frame.rsv1 && deflated => {
                    message = Some((op, frame.payload));
                    frame.fin.then(|| finish(&mut message, &mut inflater, own))
                }
                0 if message.is_some() => {
                    if let Some((_, data)) = message.as_mut() {
                        data.extend_from_slice(&frame.payload);
                    }
                    frame.fin.then(|| finish(&mut message, &mut inflater, own))
                }
                _ => Some(frame.raw),
            };
            if let Some(bytes) = out {
                if client_write.write_all(&bytes).await.is_err() {
                    break;
                }
            }
        }
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upward, downward);
}

/// The request head with the offer added (unless the client made its own)
/// and `Host` naming the server, so crier's same-origin check sees what
/// the client meant.
fn offer_deflate(head: &[u8], upstream: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::new();
    let mut offered = false;
    for line in text.split("\r\n").filter(|line| !line.is_empty()) {
        let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
        match name.as_str() {
            "host" => out.push_str(&format!("Host: {upstream}")),
            "sec-websocket-extensions" => {
                offered = true;
                out.push_str(line);
            }
            _ => out.push_str(line),
        }
        out.push_str("\r\n");
    }
    if !offered {
        out.push_str(OFFER);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// The compressed message gathered so far, inflated into one frame by the
/// connection's `inflater` (afresh if the server compresses each message
/// on its `own`).
fn finish(
    message: &mut Option<(u8, Vec<u8>)>,
    inflater: &mut flate2::Decompress,
    own: bool,
) -> Vec<u8> {
    let (opcode, mut data) = message.take().expect("a message in progress");
    data.extend_from_slice(&[0, 0, 0xff, 0xff]);
    if own {
        inflater.reset(false);
    }
    let plain = super::sse::inflate(inflater, &data);
    encode(opcode, &plain)
}

/// One unmasked frame, FIN set, as a server sends it.
fn encode(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => frame.push(n as u8),
        n if n <= 0xffff => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    frame
}

/// Reads up to the end of an HTTP head; returns the head and whatever came
/// after it. `None` if the peer went away first.
async fn read_head(stream: &mut TcpStream) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buffer.split_off(end + 4);
            return Some((buffer, rest));
        }
        if buffer.len() > MAX_HEAD {
            return None;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

/// One frame from the server.
struct Frame {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    payload: Vec<u8>,
    /// The frame's bytes as they came, for frames passed through.
    raw: Vec<u8>,
}

/// Frames read from the server, starting with bytes already read.
struct Frames<'a, R> {
    buffer: Vec<u8>,
    from: &'a mut R,
}

impl<R: AsyncRead + Unpin> Frames<'_, R> {
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self.parse() {
                return Some(frame);
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.from.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// A whole frame from the front of the buffer, if one is there.
    fn parse(&mut self) -> Option<Frame> {
        let b = &self.buffer;
        if b.len() < 2 {
            return None;
        }
        let (len, start) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (
                u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")) as usize,
                10,
            ),
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        assert_eq!(b[1] & 0x80, 0, "a server frame is never masked");
        if b.len() < start + len {
            return None;
        }
        let raw: Vec<u8> = self.buffer.drain(..start + len).collect();
        Some(Frame {
            fin: raw[0] & 0x80 != 0,
            rsv1: raw[0] & 0x40 != 0,
            opcode: raw[0] & 0x0f,
            payload: raw[start..].to_vec(),
            raw,
        })
    }
}
