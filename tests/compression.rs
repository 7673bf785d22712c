//! Issue 23: permessage-deflate (RFC 7692) on crier's WebSocket endpoints,
//! seen from a client that speaks the wire itself: what is negotiated,
//! what arrives compressed and what not, what a compressed client message
//! does, and how every kind of bad compressed input is closed.

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use common::crier::{test_config, Instance, WAIT};
use crier::config::Compression;
use flate2::{Compress, Decompress, FlushCompress};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const API_KEY: &str = "test-api-key-0123456789";
const OFFER: &str = "permessage-deflate; client_max_window_bits";
const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

/// A WebSocket client written out by hand, so that it can send what no
/// library would (compressed frames of its choosing, reserved bits).
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The response's `Sec-WebSocket-Extensions`, if any.
    extensions: Option<String>,
    /// The client's inflater, as a browser keeps it: its window holds
    /// every compressed message before, unless the server said
    /// `server_no_context_takeover` (then it starts afresh each message).
    inflater: Decompress,
}

/// One frame from the server: its first byte and payload, and its text
/// (inflated if compressed).
struct Frame {
    b0: u8,
    payload: Vec<u8>,
    plain: Vec<u8>,
}

impl Frame {
    fn compressed(&self) -> bool {
        self.b0 & 0x40 != 0
    }

    /// The message's text.
    fn text(&self) -> String {
        String::from_utf8(self.plain.clone()).expect("UTF-8")
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.text()).expect("JSON")
    }

    /// A close frame's code and reason.
    fn close(&self) -> (u16, String) {
        assert_eq!(self.b0 & 0x0f, 0x8, "a close frame");
        let code = u16::from_be_bytes([self.payload[0], self.payload[1]]);
        (
            code,
            String::from_utf8_lossy(&self.payload[2..]).into_owned(),
        )
    }
}

impl Raw {
    async fn connect(addr: &str, path: &str, offer: Option<&str>) -> Raw {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let extensions = offer
            .map(|o| format!("Sec-WebSocket-Extensions: {o}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extensions}\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut raw = Raw {
            stream,
            buf: Vec::new(),
            extensions: None,
            inflater: Decompress::new(false),
        };
        let end = loop {
            if let Some(end) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            raw.fill().await;
        };
        let head = String::from_utf8(raw.buf[..end].to_vec()).expect("head");
        raw.buf.drain(..end + 4);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        raw.extensions = head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-extensions")
                .then(|| value.trim().to_owned())
        });
        raw
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 16384];
        let n = timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .expect("the server answers in time")
            .expect("read");
        assert!(n > 0, "the server closed the socket");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    async fn frame(&mut self) -> Frame {
        loop {
            if self.buf.len() >= 2 {
                let (len, head) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => (
                        usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
                        4,
                    ),
                    127 if self.buf.len() >= 10 => {
                        let mut n = [0u8; 8];
                        n.copy_from_slice(&self.buf[2..10]);
                        (u64::from_be_bytes(n) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (usize::from(n), 2),
                };
                if head > 0 && self.buf.len() >= head + len {
                    let (b0, payload) = (self.buf[0], self.buf[head..head + len].to_vec());
                    self.buf.drain(..head + len);
                    let plain = match b0 & 0x40 != 0 {
                        true => self.inflate(&payload),
                        false => payload.clone(),
                    };
                    return Frame { b0, payload, plain };
                }
            }
            self.fill().await;
        }
    }

    /// One compressed message, with the tail its sender left off.
    fn inflate(&mut self, data: &[u8]) -> Vec<u8> {
        let own = self
            .extensions
            .as_deref()
            .is_some_and(|e| e.contains("server_no_context_takeover"));
        if own {
            self.inflater.reset(false);
        }
        let message = [data, &TAIL[..]].concat();
        common::sse::inflate(&mut self.inflater, &message)
    }

    /// The next frame that is not a ping.
    async fn message(&mut self) -> Frame {
        loop {
            let frame = self.frame().await;
            if frame.b0 & 0x0f != 0x9 {
                return frame;
            }
        }
    }

    /// Sends one masked frame whose first byte is `b0`.
    async fn send(&mut self, b0: u8, payload: &[u8]) {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut frame = vec![b0];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await.expect("send");
    }

    async fn send_json(&mut self, v: Value, compressed: bool) {
        let text = v.to_string();
        match compressed {
            true => self.send(0xC1, &deflate(text.as_bytes())).await,
            false => self.send(0x81, text.as_bytes()).await,
        }
    }
}

/// A message compressed as a client compresses it: raw deflate, sync
/// flush, tail left off.
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(flate2::Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    c.compress_vec(data, &mut out, FlushCompress::Sync)
        .expect("compress");
    assert!(out.ends_with(&TAIL));
    out.truncate(out.len() - TAIL.len());
    out
}

/// A JSON event of about `size` bytes, as apps publish them.
fn event(n: usize, size: usize) -> String {
    let lines: Vec<String> = (0..size / 60)
        .map(|i| format!("step {i} of job {n}: compiled module_{i}.rs"))
        .collect();
    json!({"type": "log", "job": n, "lines": lines}).to_string()
}

async fn crier(compression: Compression) -> Instance {
    let mut config = test_config(None);
    config.publish.api_keys = vec![API_KEY.into()];
    config.limits.max_message_bytes = 4096;
    config.ws.compression = compression;
    Instance::start(config).await
}

async fn subscribed(raw: &mut Raw, compressed: bool) {
    assert_eq!(raw.message().await.json()["type"], "welcome");
    raw.send_json(
        json!({"type": "subscribe", "channel": "public:logs", "id": 1}),
        compressed,
    )
    .await;
    let reply = raw.message().await.json();
    assert_eq!(reply["type"], "subscribed", "{reply}");
}

#[tokio::test]
async fn a_client_that_offers_deflate_gets_each_large_event_compressed_and_intact() {
    let crier = crier(Compression::Auto).await;
    let mut raw = Raw::connect(&crier.addr, "/ws", Some(OFFER)).await;
    assert_eq!(
        raw.extensions.as_deref(),
        Some("permessage-deflate; client_no_context_takeover"),
        "crier may refer to earlier messages; the client may not"
    );
    // The client compresses its own messages too.
    subscribed(&mut raw, true).await;
    let (large, small) = (event(1, 1000), json!({"type": "tick"}).to_string());
    for data in [&large, &small] {
        let status = crier.publish_api("public:logs", data, Some(API_KEY)).await;
        assert_eq!(status, 200);
    }
    let first = raw.message().await;
    assert!(first.compressed(), "a 1 KB event is compressed");
    assert!(
        first.payload.len() * 2 < first.text().len(),
        "{} bytes for {}",
        first.payload.len(),
        first.text().len()
    );
    let envelope = first.json();
    assert_eq!(
        envelope["data"],
        serde_json::from_str::<Value>(&large).expect("json")
    );
    let second = raw.message().await;
    assert!(
        !second.compressed(),
        "under ws.compression_min_bytes: plain"
    );
    assert_eq!(second.json()["data"]["type"], "tick");
}

#[tokio::test]
async fn a_client_that_offers_nothing_or_a_server_with_compression_off_gets_plain_frames() {
    for (compression, offer) in [(Compression::Auto, None), (Compression::Off, Some(OFFER))] {
        let crier = crier(compression).await;
        let mut raw = Raw::connect(&crier.addr, "/ws", offer).await;
        assert_eq!(raw.extensions, None, "{compression:?}, {offer:?}");
        subscribed(&mut raw, false).await;
        let large = event(2, 1000);
        assert_eq!(
            crier
                .publish_api("public:logs", &large, Some(API_KEY))
                .await,
            200
        );
        let frame = raw.message().await;
        assert!(!frame.compressed());
        assert_eq!(frame.json()["data"]["job"], 2);
    }
}

#[tokio::test]
async fn the_pusher_protocol_compresses_too() {
    let redis = common::redis::RedisServer::start().await;
    let crier = Instance::start(common::pusher::pusher_config(&redis)).await;
    let path = format!("/app/{}?protocol=7", common::pusher::KEY);
    let mut raw = Raw::connect(&crier.addr, &path, Some(OFFER)).await;
    assert!(raw.extensions.is_some());
    let hello = raw.message().await.json();
    assert_eq!(hello["event"], "pusher:connection_established", "{hello}");
    raw.send_json(
        json!({"event": "pusher:subscribe", "data": {"channel": "orders"}}),
        true,
    )
    .await;
    let ok = raw.message().await.json();
    assert_eq!(
        ok["event"], "pusher_internal:subscription_succeeded",
        "{ok}"
    );
    let large = event(3, 1000);
    redis.publish("orders", &large).await;
    let frame = raw.message().await;
    assert!(frame.compressed());
    let received = frame.json();
    assert_eq!(received["channel"], "orders");
    let data: Value = serde_json::from_str(received["data"].as_str().expect("data")).expect("json");
    assert_eq!(data["job"], 3);
}

/// Every kind of bad compressed input closes the connection with its code
/// and a reason, and none is inflated past `limits.max_message_bytes`.
#[tokio::test]
async fn bad_compressed_input_is_closed_with_its_code() {
    let crier = crier(Compression::Auto).await;
    // A bomb: about 1 KB that inflates to 1 MiB, past the 4 KiB limit
    // (src/transport/deflate.rs shows it is inflated no further than that).
    let bomb = deflate(&vec![b' '; 1 << 20]);
    assert!(bomb.len() < 4096, "{}", bomb.len());
    // What is sent (with or without offering deflate, the frame's first
    // byte and payload), and the close it must get.
    type Case = (
        &'static str,
        Option<&'static str>,
        u8,
        Vec<u8>,
        u16,
        &'static str,
    );
    let cases: [Case; 4] = [
        ("a bomb", Some(OFFER), 0xC1, bomb, 1009, "message too large"),
        (
            "not deflate",
            Some(OFFER),
            0xC1,
            vec![0xff, 0xfe, 0xfd, 0x00, 0x13, 0x37],
            1007,
            "malformed compressed message",
        ),
        (
            "RSV1 without deflate",
            None,
            0xC1,
            deflate(b"{\"type\":\"ping\"}"),
            1002,
            "reserved bits set without an extension",
        ),
        (
            "RSV1 on a ping",
            Some(OFFER),
            0xC9,
            Vec::new(),
            1002,
            "RSV1 is only for the first frame of a data message",
        ),
    ];
    for (what, offer, b0, payload, code, reason) in cases {
        let mut raw = Raw::connect(&crier.addr, "/ws", offer).await;
        assert_eq!(raw.message().await.json()["type"], "welcome");
        raw.send(b0, &payload).await;
        let mut frame = raw.message().await;
        if code == 1009 {
            // crier's protocol says why before it closes.
            assert_eq!(frame.json()["code"], "too_large", "{what}");
            frame = raw.message().await;
        }
        assert_eq!(frame.close(), (code, reason.to_owned()), "{what}");
    }
    // The server still serves compressed clients.
    let mut fine = Raw::connect(&crier.addr, "/ws", Some(OFFER)).await;
    subscribed(&mut fine, true).await;
}

/// Acceptance 3's mechanism: one publication to several clients that
/// negotiated compression is compressed once, and each gets the same bytes.
#[tokio::test]
async fn a_publication_is_compressed_once_for_all_its_clients() {
    let crier = crier(Compression::Auto).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut raw = Raw::connect(&crier.addr, "/ws", Some(OFFER)).await;
        subscribed(&mut raw, false).await;
        clients.push(raw);
    }
    let plain = Raw::connect(&crier.addr, "/ws", None).await;
    assert_eq!(crier.metric("crier_ws_compressed_connections").await, 3.0);
    let large = event(4, 2000);
    assert_eq!(
        crier
            .publish_api("public:logs", &large, Some(API_KEY))
            .await,
        200
    );
    let mut payloads = Vec::new();
    for raw in &mut clients {
        let frame = raw.message().await;
        assert!(frame.compressed());
        assert_eq!(frame.json()["data"]["job"], 4);
        payloads.push(frame.payload);
    }
    assert!(payloads.windows(2).all(|w| w[0] == w[1]), "the same bytes");
    assert_eq!(crier.metric("crier_ws_compressed_frames_total").await, 1.0);
    let before = crier
        .metric("crier_ws_compression_bytes_total{stage=\"before\"}")
        .await;
    let after = crier
        .metric("crier_ws_compression_bytes_total{stage=\"after\"}")
        .await;
    assert!(after * 3.0 < before, "{after} of {before}");
    drop((clients, plain));
    common::eventually("the gauge follows the connections", WAIT, || async {
        crier.metric("crier_ws_compressed_connections").await == 0.0
    })
    .await;
}

/// An order record of about 1 KB, different each time, as a shop
/// publishes on a status change.
fn order(n: usize) -> String {
    const NAMES: [&str; 3] = ["Espresso beans 1kg", "Burr grinder", "Milk jug 600ml"];
    const STATUS: [&str; 4] = ["paid", "packed", "shipped", "delivered"];
    let items: Vec<Value> = (0..6)
        .map(|i| {
            json!({
                "sku": format!("SKU-{:04}", (n * 7 + i * 13) % 40),
                "name": NAMES[(n + i) % 3],
                "qty": 1 + (n + i) % 4,
                "unit_price": 5.0 + ((n * 31 + i * 17) % 200) as f64 / 4.0,
                "warehouse": format!("eu-west-{}", 1 + (n + i) % 3),
            })
        })
        .collect();
    json!({"type": "order.updated", "order": {
        "id": format!("ord_{:08x}", n.wrapping_mul(2654435761) % (1 << 32)),
        "status": STATUS[n % 4],
        "customer": {"name": "Ada", "email": "ada@example.com"},
        "items": items,
        "currency": "EUR",
    }})
    .to_string()
}

/// Publishes order `n` to `public:logs` and returns it.
async fn publish_order(crier: &Instance, n: usize) -> String {
    let data = order(n);
    assert_eq!(
        crier.publish_api("public:logs", &data, Some(API_KEY)).await,
        200
    );
    data
}

/// The next message of `raw`, checked against `data`: its bytes.
async fn expect_order(raw: &mut Raw, data: &str) -> Vec<u8> {
    let frame = raw.message().await;
    assert!(frame.compressed());
    let envelope = frame.json();
    assert_eq!(
        envelope["data"],
        serde_json::from_str::<Value>(data).expect("json"),
        "intact"
    );
    frame.payload
}

/// Acceptance 2's mechanism: a channel with several compressing listeners
/// keeps one compression context they share, so each event is compressed
/// once against the ones before; every listener (one that joins late, one
/// that also listens elsewhere, one that asked for
/// `server_no_context_takeover`) reads every event intact with its own
/// inflater, and the shared frames are far smaller than frames compressed
/// on their own.
#[tokio::test]
async fn listeners_of_a_busy_channel_share_one_compression_context() {
    let crier = crier(Compression::Auto).await;
    let mut a = Raw::connect(&crier.addr, "/ws", Some(OFFER)).await;
    let mut b = Raw::connect(&crier.addr, "/ws", Some(OFFER)).await;
    let own_offer = "permessage-deflate; server_no_context_takeover";
    let mut own = Raw::connect(&crier.addr, "/ws", Some(own_offer)).await;
    assert_eq!(
        own.extensions.as_deref(),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    );
    for raw in [&mut a, &mut b, &mut own] {
        subscribed(raw, false).await;
    }
    assert_eq!(crier.metric("crier_ws_compression_contexts").await, 1.0);

    let (mut shared, mut alone) = (0, 0);
    for n in 0..30 {
        let data = publish_order(&crier, n).await;
        let from_a = expect_order(&mut a, &data).await;
        assert_eq!(expect_order(&mut b, &data).await, from_a, "the same bytes");
        let from_own = expect_order(&mut own, &data).await;
        if n >= 10 {
            shared += from_a.len();
            alone += from_own.len();
        }
    }
    assert!(
        shared * 2 < alone,
        "shared context: {shared} B; each on its own: {alone} B"
    );

    // A late listener reads on its own until the context starts a new
    // epoch, then shares it; the others read on throughout.
    let mut late = Raw::connect(&crier.addr, "/ws", Some(OFFER)).await;
    subscribed(&mut late, false).await;
    let mut shared_later = false;
    for n in 30..60 {
        let data = publish_order(&crier, n).await;
        let from_a = expect_order(&mut a, &data).await;
        assert_eq!(expect_order(&mut b, &data).await, from_a);
        shared_later |= expect_order(&mut late, &data).await == from_a;
        expect_order(&mut own, &data).await;
    }
    assert!(shared_later, "the late listener joined the shared context");

    // A listener that also gets another channel's compressed events
    // leaves the context (their bytes entered its window) and reads on.
    a.send_json(
        json!({"type": "subscribe", "channel": "public:other", "id": 2}),
        false,
    )
    .await;
    assert_eq!(a.message().await.json()["type"], "subscribed");
    for n in 60..70 {
        let other = order(1000 + n);
        assert_eq!(
            crier
                .publish_api("public:other", &other, Some(API_KEY))
                .await,
            200
        );
        let data = publish_order(&crier, n).await;
        assert_eq!(
            a.message().await.json()["data"]["order"]["id"],
            serde_json::from_str::<Value>(&other).expect("json")["order"]["id"]
        );
        expect_order(&mut a, &data).await;
        expect_order(&mut b, &data).await;
        expect_order(&mut late, &data).await;
        expect_order(&mut own, &data).await;
    }
    drop((a, b, late, own));
    common::eventually("the context goes with its listeners", WAIT, || async {
        crier.metric("crier_ws_compression_contexts").await == 0.0
    })
    .await;
}

/// SSE: a stream whose request accepts `deflate` is one raw deflate stream
/// (`Content-Encoding: deflate`); every event arrives intact with its
/// cursor, the stream's own `id:` lines with several channels too, a
/// resume replays from the cursor, and a drain ends the stream cleanly.
#[tokio::test]
async fn an_sse_stream_that_accepts_deflate_is_compressed_and_resumes() {
    let mut config = test_config(None);
    config.publish.api_keys = vec![API_KEY.into()];
    config.sse.compression = Compression::Auto;
    config
        .channels
        .push(common::crier::history_rule("hist:*", 100));
    let crier = Instance::start(config).await;
    let accept = [("accept-encoding", "gzip, deflate")];

    // Without asking: plain, as before.
    let plain = common::sse::connect(&crier.sse_url(&["hist:a"]), &[]).await;
    assert_eq!(plain.headers.get("content-encoding"), None);
    drop(plain);

    let url = crier.sse_url(&["hist:a", "hist:b"]);
    let response = common::sse::connect(&url, &accept).await;
    assert_eq!(response.headers["content-encoding"], "deflate");
    let vary: Vec<_> = response.headers.get_all("vary").iter().collect();
    assert!(vary.iter().any(|v| *v == "accept-encoding"), "{vary:?}");
    let mut events = response.into_events();
    let opening = events.next_event(WAIT).await.expect("the opening block");
    assert!(opening.id.is_some(), "{opening:?}");
    let large = event(5, 2000);
    let small = json!({"type": "tick", "n": 1}).to_string();
    for (channel, data) in [("hist:a", &large), ("hist:b", &small), ("hist:a", &small)] {
        assert_eq!(crier.publish_api(channel, data, Some(API_KEY)).await, 200);
    }
    let first = events.next_message(WAIT).await.expect("an event");
    assert_eq!(first.json()["data"]["job"], 5);
    let second = events.next_message(WAIT).await.expect("an event");
    assert_eq!(second.json()["data"]["type"], "tick");
    let cursor = second.id.clone().expect("a cursor");
    drop(events);

    // Back with the cursor: the one event after it, compressed again.
    let headers = [
        ("accept-encoding", "deflate"),
        ("last-event-id", cursor.as_str()),
    ];
    let mut resumed = common::sse::connect(&url, &headers).await.into_events();
    let replayed = resumed.next_message(WAIT).await.expect("the replay");
    assert_eq!(replayed.json()["channel"], "hist:a");
    assert_eq!(replayed.json()["data"]["n"], 1);
    // A drain ends the stream with its notice, and the deflate stream ends
    // cleanly (a final block), not cut.
    crier.shutdown().await;
    let rest = resumed.expect_end(WAIT).await;
    assert!(rest.iter().any(|e| e.retry.is_some()), "{rest:?}");
    assert_eq!(resumed.error(), None);
}
