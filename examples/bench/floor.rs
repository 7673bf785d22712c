//! `bench --floor`: the physical floor the benchmark measures crier
//! against, in the same run. The simplest server of the same clients that
//! can exist: it accepts `/sse` and `/ws` connections (no auth, no hub, no
//! queue), subscribes once to Redis, and writes each publication's bytes —
//! the same envelope crier sends, encoded once — to every socket of its
//! channel: the sockets are split between one writer task per core, each
//! handed the shared bytes. It answers the few endpoints the benchmark reads
//! (`/readyz`, and `/metrics` with RSS and the subscription count), so the
//! benchmark drives it exactly as it drives crier. Run as a child process
//! of the benchmark, so its CPU and memory are its own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Open streams by channel, for one writer.
type Listeners = Arc<Mutex<HashMap<String, Vec<Listener>>>>;

/// A publication as written: its channel, and its SSE and WebSocket bytes.
type Encoded = Arc<(String, Vec<u8>, Vec<u8>)>;

struct Listener {
    socket: Arc<TcpStream>,
    ws: bool,
}

/// Serves until killed; `redis_port` is where the benchmark publishes.
pub async fn serve(redis_port: u16) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    // The line the benchmark waits for, in crier's log shape.
    eprintln!("{{\"fields\":{{\"addr\":\"{addr}\"}}}}");
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut shards: Vec<Listeners> = Vec::new();
    let mut writers = Vec::new();
    for _ in 0..workers {
        let listeners: Listeners = Arc::default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Encoded>();
        let mine = Arc::clone(&listeners);
        tokio::spawn(async move {
            while let Some(encoded) = rx.recv().await {
                write_all_sockets(&mine, &encoded).await;
            }
        });
        shards.push(listeners);
        writers.push(tx);
    }
    let subscribed = Arc::new(AtomicU64::new(0));
    let client = redis::Client::open(format!("redis://127.0.0.1:{redis_port}")).expect("url");
    let mut pubsub = client.get_async_pubsub().await.expect("redis");
    pubsub.psubscribe("bench.*").await.expect("psubscribe");
    tokio::spawn(async move {
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            let channel = msg.get_channel_name().to_string();
            let payload = String::from_utf8_lossy(msg.get_payload_bytes()).into_owned();
            let encoded = encode(channel, &payload);
            for writer in &writers {
                let _ = writer.send(Arc::clone(&encoded));
            }
        }
    });
    let mut next = 0;
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            continue;
        };
        let _ = socket.set_nodelay(true);
        let listeners = Arc::clone(&shards[next % workers]);
        next += 1;
        let subscribed = Arc::clone(&subscribed);
        tokio::spawn(async move { accept(socket, listeners, subscribed).await });
    }
}

/// The envelope crier sends, as an SSE event and as a WebSocket frame.
fn encode(channel: String, payload: &str) -> Encoded {
    let envelope = format!("{{\"type\":\"message\",\"channel\":\"{channel}\",\"data\":{payload}}}");
    let sse = format!("data: {envelope}\n\n").into_bytes();
    let mut ws = vec![0x81u8];
    match envelope.len() {
        n if n < 126 => ws.push(n as u8),
        n if n <= 0xffff => {
            ws.push(126);
            ws.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            ws.push(127);
            ws.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    ws.extend_from_slice(envelope.as_bytes());
    Arc::new((channel, sse, ws))
}

/// One publication, to every socket of this writer's share of its channel,
/// in turn (waiting only on a socket whose buffer is full).
async fn write_all_sockets(listeners: &Listeners, encoded: &Encoded) {
    let (channel, sse, ws) = &**encoded;
    let sockets: Vec<(Arc<TcpStream>, bool)> = {
        let map = listeners.lock().expect("lock");
        map.get(channel.as_str())
            .map(|l| l.iter().map(|l| (Arc::clone(&l.socket), l.ws)).collect())
            .unwrap_or_default()
    };
    for (i, (socket, is_ws)) in sockets.into_iter().enumerate() {
        // Let this process's Redis reader run between slices of a big
        // fan-out, as any server would.
        if i % 256 == 255 {
            tokio::task::yield_now().await;
        }
        let mut bytes: &[u8] = if is_ws { ws } else { sse };
        while !bytes.is_empty() {
            match socket.try_write(bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if socket.writable().await.is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    }
}

async fn accept(mut socket: TcpStream, listeners: Listeners, subscribed: Arc<AtomicU64>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let target = head
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let channel = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("channel="))
        .map(str::to_string);
    let ws = path == "/ws";
    match (path, channel) {
        ("/readyz", _) => {
            let _ = socket.write_all(b"HTTP/1.0 200 OK\r\n\r\nready\n").await;
        }
        ("/metrics", _) => {
            let body = format!(
                "process_resident_memory_bytes {}\ncrier_subscriptions {}\ncrier_slow_client_disconnects_total 0\n",
                rss_bytes(),
                subscribed.load(Ordering::Relaxed)
            );
            let _ = socket
                .write_all(format!("HTTP/1.0 200 OK\r\n\r\n{body}").as_bytes())
                .await;
        }
        ("/sse" | "/ws", Some(channel)) => {
            let answer = if ws {
                let key = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("sec-websocket-key")
                            .then(|| value.trim().to_string())
                    })
                    .unwrap_or_default();
                let accept =
                    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
                let subscribed = br#"{"type":"subscribed"}"#;
                let mut out = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                )
                .into_bytes();
                out.extend_from_slice(&[0x81, subscribed.len() as u8]);
                out.extend_from_slice(subscribed);
                out
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
                    .to_vec()
            };
            if socket.write_all(&answer).await.is_err() {
                return;
            }
            listeners
                .lock()
                .expect("lock")
                .entry(channel)
                .or_default()
                .push(Listener {
                    socket: Arc::new(socket),
                    ws,
                });
            subscribed.fetch_add(1, Ordering::Relaxed);
            // Nothing reads the socket: the client never says anything the
            // floor must answer, and the socket stays open while the
            // benchmark runs.
        }
        _ => {
            let _ = socket.write_all(b"HTTP/1.0 404 Not Found\r\n\r\n").await;
        }
    }
}

/// This process's resident memory, from /proc.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}
