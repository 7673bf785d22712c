//! crier's load benchmark: the figures in docs/performance.md come from here.
//!
//! It starts its own `redis-server` on a free loopback port and the real
//! release binary (`target/release/crier`, or `$BENCH_CRIER_BIN`), connects
//! `--clients` WebSocket or SSE clients spread over `--channels` channels,
//! measures crier's resident memory before and after (memory per
//! connection), publishes `--messages` messages per channel at `--rate`
//! per second per channel with `PUBLISH`, and reports deliveries per second,
//! end-to-end latency percentiles and crier's CPU time. Everything runs on
//! loopback, is bounded in count and time, and stops by itself.
//!
//! ```sh
//! cargo build --release && cargo run --release --example bench -- --clients 10000 --transport ws
//! ```
//!
//! The clients run in this process, on the same machine: on 2 cores they
//! compete with crier for CPU, so throughput figures are a floor.
//!
//! `--floor` serves the same clients with the simplest possible server
//! (`bench/floor.rs`: Redis in, the same bytes written to every socket,
//! nothing else) instead of crier, so crier can be reported as a ratio of
//! what this machine costs by itself, measured in the same session.

// A benchmark tool stops at the first thing it cannot do.
#![allow(clippy::expect_used, clippy::panic)]

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;

#[path = "bench/api.rs"]
mod api;
#[path = "bench/floor.rs"]
mod floor;
#[path = "bench/http.rs"]
mod http;
#[path = "bench/payload.rs"]
mod payload;

#[derive(Debug, Clone)]
struct Args {
    clients: usize,
    channels: usize,
    messages: usize,
    rate: u64,
    payload: usize,
    transport: Transport,
    memory: bool,
    history: bool,
    /// Serve the clients with the floor program instead of crier.
    floor: bool,
    /// WebSocket clients written out by hand that count the bytes they
    /// read: `Some(true)` offering permessage-deflate, `Some(false)` not.
    deflate: Option<bool>,
    /// `--deflate sampled`: the clients offer permessage-deflate, but only
    /// one in 100 inflates (and times) what arrives; the others count
    /// compressed frames as they come. The benchmark's clients share the
    /// cores with crier, and 10,000 inflating clients slow crier's writes
    /// (and change their batching); sampling shows crier's own cost.
    sampled: bool,
    /// `--events`: lifecycle events on, with crier's own webhook pointing at
    /// a receiver in this process that answers each call after 2 s (the
    /// port of that receiver).
    events: Option<u16>,
    /// `--churn`: listeners coming and going while the benchmark publishes
    /// (see [`churn`]), with `--events` or without, to compare.
    churn: bool,
    /// Payloads are realistic JSON events (`bench/payload.rs`), different
    /// each time, of about `payload` bytes, instead of a padded one.
    payload_json: Option<payload::Kind>,
    /// `--api SECONDS`: measure the HTTP publish APIs instead (`bench/api.rs`).
    api: Option<u64>,
    /// `--api-clients N`: keep-alive clients for `--api` (32).
    api_clients: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Transport {
    Ws,
    Sse,
    /// The Pusher protocol (`/app/{key}`), as pusher-js speaks it.
    Pusher,
}

fn parse_args() -> Args {
    let mut a = Args {
        clients: 1000,
        channels: 1,
        messages: 100,
        rate: 20,
        payload: 100,
        transport: Transport::Ws,
        memory: false,
        history: false,
        floor: false,
        deflate: None,
        sampled: false,
        events: None,
        churn: false,
        payload_json: None,
        api: None,
        api_clients: 32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--clients" => a.clients = value().parse().unwrap_or_else(|_| usage("--clients N")),
            "--channels" => a.channels = value().parse().unwrap_or_else(|_| usage("--channels N")),
            "--messages" => a.messages = value().parse().unwrap_or_else(|_| usage("--messages N")),
            "--rate" => a.rate = value().parse().unwrap_or_else(|_| usage("--rate N")),
            "--payload" => a.payload = value().parse().unwrap_or_else(|_| usage("--payload BYTES")),
            "--transport" => {
                a.transport = match value().as_str() {
                    "ws" => Transport::Ws,
                    "sse" => Transport::Sse,
                    "pusher" => Transport::Pusher,
                    _ => usage("--transport ws|sse|pusher"),
                }
            }
            "--memory" => a.memory = true,
            "--history" => a.history = true,
            "--floor" => a.floor = true,
            "--payload-json" => a.payload_json = a.payload_json.or(Some(payload::Kind::Mix)),
            "--events" => a.events = Some(0),
            "--churn" => a.churn = true,
            "--api" => a.api = Some(value().parse().unwrap_or_else(|_| usage("--api SECONDS"))),
            "--api-clients" => {
                a.api_clients = value().parse().unwrap_or_else(|_| usage("--api-clients N"))
            }
            "--json-kind" => {
                a.payload_json = Some(
                    payload::Kind::parse(&value())
                        .unwrap_or_else(|| usage("--json-kind mix|order|log|status")),
                )
            }
            "--deflate" => {
                a.deflate = match value().as_str() {
                    "on" => Some(true),
                    "off" => Some(false),
                    "sampled" => {
                        a.sampled = true;
                        Some(true)
                    }
                    _ => usage("--deflate on|off|sampled"),
                }
            }
            _ => usage(&format!("unknown flag {flag}")),
        }
    }
    if a.channels == 0 || a.clients == 0 || a.rate == 0 {
        usage("counts and rate must be > 0");
    }
    if a.floor && a.transport == Transport::Pusher {
        usage("--floor speaks crier's /ws and /sse only; compare pusher with --transport ws");
    }
    if a.floor && (a.history || a.memory) {
        usage("--floor serves plain PUBLISH from Redis: not with --history or --memory");
    }
    a
}

/// `--api`: both publish APIs, one after the other, on the same crier.
async fn api_bench(mut crier: Crier, redis: Option<Redis>, args: &Args, each: Duration) {
    let body = |n: usize| {
        let data = payload::event(
            payload::Kind::Mix,
            now_micros(),
            n,
            0,
            args.payload.max(1024),
        );
        (
            serde_json::json!({"name": "bench", "channels": ["bench.0"], "data": data}).to_string(),
            serde_json::json!({"channel": "bench.0", "data": serde_json::from_str::<serde_json::Value>(&data).unwrap_or_default()}).to_string(),
        )
    };
    let addr = crier.addr.clone();
    println!("## crier bench: HTTP publish APIs, no subscriber");
    println!(
        "clients={} (keep-alive) seconds={} payload≈{}B",
        args.api_clients,
        each.as_secs(),
        args.payload.max(1024)
    );
    println!("| API | requests/s | failed | crier CPU per request |");
    println!("|---|---|---|---|");
    for which in ["pusher", "publish"] {
        let cpu_before = crier.cpu_seconds();
        let counter = AtomicU64::new(0);
        let request = || {
            let (pusher, plain) = body(counter.fetch_add(1, Ordering::Relaxed) as usize);
            match which {
                "pusher" => api::pusher_request(&addr, "bench", "bench-secret-0123456789", &pusher),
                _ => api::publish_request(&addr, "bench-key-0123456789", &plain),
            }
        };
        let figures = api::hammer(&addr, request, args.api_clients, each).await;
        let cpu = crier.cpu_seconds() - cpu_before;
        let name = match which {
            "pusher" => "POST /apps/{id}/events (signed)",
            _ => "POST /api/publish",
        };
        println!(
            "| {name} | {:.0} | {} | {:.1} µs |",
            figures.requests as f64 / figures.secs,
            figures.failed,
            cpu * 1e6 / figures.requests.max(1) as f64
        );
    }
    let _ = crier.child.start_kill();
    let _ = crier.child.wait().await;
    if let Some(mut r) = redis {
        let _ = r.child.start_kill();
        let _ = r.child.wait().await;
    }
}

/// The kernel's memory for TCP sockets now, in bytes: the slab objects a
/// connected socket holds (its `TCP` sock, socket inode, file, dentry,
/// epoll entries) from `/proc/slabinfo`, and the buffer pages of
/// `/proc/net/sockstat`. System-wide: read it when nothing else moves.
/// `None` where slabinfo cannot be read (it needs root).
fn kernel_socket_bytes() -> Option<f64> {
    const SLABS: [&str; 6] = [
        "TCP",
        "sock_inode_cache",
        "filp",
        "dentry",
        "epitem",
        "eppoll_entry",
    ];
    let slabinfo = std::fs::read_to_string("/proc/slabinfo").ok()?;
    let mut bytes = 0.0;
    for line in slabinfo.lines() {
        let mut fields = line.split_whitespace();
        if fields.next().is_some_and(|name| SLABS.contains(&name)) {
            let active: f64 = fields.next()?.parse().ok()?;
            let _total = fields.next()?;
            let size: f64 = fields.next()?.parse().ok()?;
            bytes += active * size;
        }
    }
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let pages: f64 = sockstat
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "mem").nth(1))
        .and_then(|p| p.parse().ok())?;
    Some(bytes + pages * 4096.0)
}

fn usage(why: &str) -> ! {
    eprintln!(
        "bench: {why}\nusage: bench [--clients N] [--channels N] [--messages N] [--rate PER_SEC_PER_CHANNEL] \
         [--payload BYTES] [--payload-json] [--json-kind mix|order|log|status] [--transport ws|sse|pusher] [--deflate on|off|sampled] \
         [--history] [--memory] [--floor] [--events] [--churn]"
    );
    std::process::exit(2)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

/// Latencies in microseconds, bucketed by powers of 2^(1/4) to stay small.
struct Histogram {
    buckets: Vec<AtomicU64>,
}

impl Histogram {
    fn new() -> Self {
        Self {
            buckets: (0..160).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    fn bucket(us: u64) -> usize {
        (((us.max(1) as f64).log2() * 4.0) as usize).min(159)
    }
    fn record(&self, us: u64) {
        self.buckets[Self::bucket(us)].fetch_add(1, Ordering::Relaxed);
    }
    fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
    /// Upper bound of the bucket holding quantile `q`, in milliseconds.
    fn quantile_ms(&self, q: f64) -> f64 {
        let total = self.count();
        let target = ((total as f64) * q).ceil() as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= target.max(1) {
                return 2f64.powf((i + 1) as f64 / 4.0) / 1000.0;
            }
        }
        f64::NAN
    }
}

/// Pulls `"t":<micros>` out of a delivered frame without a JSON parse
/// (also `\"t\":`, inside a Pusher event's data string).
fn sent_at(frame: &[u8]) -> Option<u64> {
    let pos = frame.windows(4).position(|w| w == b"\"t\":").map(|p| p + 4);
    let pos = pos.or_else(|| frame.windows(4).position(|w| w == b"t\\\":").map(|p| p + 4))?;
    let digits: Vec<u8> = frame[pos..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

async fn start_redis() -> Redis {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server on PATH");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Redis {
        child,
        port,
        _dir: dir,
    }
}

struct Crier {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

async fn start_crier(redis: Option<u16>, args: &Args) -> Crier {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("crier.toml");
    let mut text = String::from("[[channels]]\npattern = \"bench.*\"\nsubscribe = \"anyone\"\n");
    if args.history {
        text.push_str("history = { size = 1000, ttl = \"1h\" }\n");
    }
    text.push_str("[publish]\napi_keys = [\"bench-key-0123456789\"]\n");
    text.push_str(
        "[[pusher.apps]]\nid = \"1\"\nkey = \"bench\"\nsecret = \"bench-secret-0123456789\"\n",
    );
    text.push_str(&format!(
        "[limits]\nmax_connections = {}\nqueue_size = 1024\n",
        args.clients + 100
    ));
    if let Some(port) = redis {
        text.push_str(&format!("[redis]\nurl = \"redis://127.0.0.1:{port}\"\n"));
    }
    if args.deflate.is_some() && args.transport == Transport::Sse {
        // Streams are compressed only for clients that ask (`--deflate on`).
        text.push_str("[sse]\ncompression = \"auto\"\n");
    }
    if let Some(port) = args.events {
        text.push_str(&format!(
            "[events]\nstream = \"bench:events\"\ndelay = \"1s\"\n\
             [[webhooks]]\nurl = \"http://127.0.0.1:{port}/events\"\n\
             secret = \"bench-webhook-secret-0123456789\"\n"
        ));
    }
    std::fs::write(&config, text).expect("write config");
    let bin = std::env::var("BENCH_CRIER_BIN").unwrap_or_else(|_| "target/release/crier".into());
    let mut command = Command::new(&bin);
    if args.floor {
        // This binary again, as the floor server (its own process: its own
        // CPU and memory figures).
        command = Command::new(std::env::current_exe().expect("own path"));
        command
            .arg("--serve-floor")
            .arg(redis.expect("a Redis").to_string());
    }
    // CRIER_* variables are configuration to crier: keep the bench's own.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CRIER_") {
            command.env_remove(key);
        }
    }
    if !args.floor {
        command.arg("--config").arg(&config).args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ]);
    }
    let mut child = command
        // `BENCH_RUST_LOG=info`: crier's default level, where each
        // connection's log context costs what it does in production.
        .env(
            "RUST_LOG",
            std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "warn,crier::server=info".into()),
        )
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {bin} ({e}); build it with cargo build --release"));
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let addr = loop {
        let line = lines
            .next_line()
            .await
            .expect("read")
            .expect("crier exited");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if let Some(addr) = v["fields"]["addr"].as_str() {
            break addr.to_string();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let crier = Crier {
        child,
        addr,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while crier.get("/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "crier not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    crier
}

impl Crier {
    /// User + system CPU seconds of the crier process, from /proc (the
    /// Prometheus process collector only reports whole seconds).
    fn cpu_seconds(&self) -> f64 {
        let Some(pid) = self.child.id() else {
            return f64::NAN;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return f64::NAN;
        };
        // Fields after the parenthesised command name; utime and stime are
        // the 14th and 15th fields of the whole line, in clock ticks (100/s).
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = fields[11..13]
            .iter()
            .filter_map(|f| f.parse::<f64>().ok())
            .sum();
        ticks / 100.0
    }

    /// A minimal HTTP/1.0 GET: status and body.
    async fn get(&self, path: &str) -> (u16, String) {
        http::get(&self.addr, path).await
    }

    async fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.get("/metrics").await;
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(f64::NAN)
    }
}

async fn ws_client(addr: String, channel: String, hist: Arc<Histogram>, received: Arc<AtomicU64>) {
    let url = format!("ws://{addr}/ws?channel={channel}");
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("ws connect");
    let mut subscribed = false;
    while let Some(Ok(msg)) = ws.next().await {
        if let tokio_tungstenite::tungstenite::Message::Text(text) = msg {
            if !subscribed {
                if text.as_str().contains("\"subscribed\"") {
                    subscribed = true;
                    received.fetch_add(0, Ordering::Relaxed);
                }
                continue;
            }
            if let Some(t) = sent_at(text.as_bytes()) {
                hist.record(now_micros().saturating_sub(t));
                received.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A Pusher protocol client: connects, subscribes, and times each event.
async fn pusher_client(
    addr: String,
    channel: String,
    hist: Arc<Histogram>,
    received: Arc<AtomicU64>,
) {
    let url = format!("ws://{addr}/app/bench?protocol=7&client=bench&version=1");
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("pusher connect");
    let subscribe = format!(r#"{{"event":"pusher:subscribe","data":{{"channel":"{channel}"}}}}"#);
    let mut subscribed = false;
    while let Some(Ok(msg)) = ws.next().await {
        let tokio_tungstenite::tungstenite::Message::Text(text) = msg else {
            continue;
        };
        if !subscribed {
            if text.as_str().contains("pusher:connection_established") {
                let message = tokio_tungstenite::tungstenite::Message::text(subscribe.clone());
                ws.send(message).await.expect("subscribe");
            } else if text.as_str().contains("subscription_succeeded") {
                subscribed = true;
            }
            continue;
        }
        if let Some(t) = sent_at(text.as_bytes()) {
            hist.record(now_micros().saturating_sub(t));
            received.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A WebSocket client written out by hand, for `--deflate`: it offers
/// permessage-deflate (tungstenite cannot), inflates what arrives
/// compressed (or, unless `inflate`, counts it without reading it), times
/// each event, and counts the bytes it read.
#[allow(clippy::too_many_arguments)]
async fn ws_raw_client(
    addr: String,
    path: String,
    subscribe: Option<String>,
    offer: bool,
    inflate: bool,
    hist: Arc<Histogram>,
    received: Arc<AtomicU64>,
    wire_bytes: Arc<AtomicU64>,
) {
    let mut s = TcpStream::connect(&addr).await.expect("ws connect");
    let extension = match offer {
        true => "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
        false => "",
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extension}\r\n"
    );
    s.write_all(request.as_bytes()).await.expect("ws request");
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let mut head_done = false;
    let mut subscribed = subscribe.is_none();
    let mut inflater = flate2::Decompress::new(false);
    let mut own = false;
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        if !head_done {
            let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&pending[..end]).to_lowercase();
            assert_eq!(
                head.contains("permessage-deflate"),
                offer,
                "negotiation: {head}"
            );
            // Without it, crier may refer to earlier messages: the
            // inflater keeps its window, as a browser's does.
            own = head.contains("server_no_context_takeover");
            pending.drain(..end + 4);
            head_done = true;
        }
        if subscribed {
            wire_bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        let mut start = 0;
        while let Some((b0, payload, len)) = raw_frame(&pending[start..]) {
            start += len;
            let text = match b0 & 0x40 != 0 {
                true if inflate || !subscribed => inflate_raw(&mut inflater, payload, own),
                true => {
                    // Sampled: a compressed event, counted unread.
                    received.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                false => payload.to_vec(),
            };
            if !subscribed {
                let text = String::from_utf8_lossy(&text);
                if text.contains("pusher:connection_established") {
                    let message = subscribe.as_deref().unwrap_or_default();
                    s.write_all(&masked_text(message.as_bytes()))
                        .await
                        .expect("subscribe");
                } else if text.contains("subscription_succeeded") || text.contains("\"subscribed\"")
                {
                    subscribed = true;
                }
                continue;
            }
            if let Some(t) = sent_at(&text) {
                hist.record(now_micros().saturating_sub(t));
                received.fetch_add(1, Ordering::Relaxed);
            }
        }
        pending.drain(..start);
    }
}

/// One complete server frame at the start of `buf`: its first byte, its
/// payload and its whole length.
fn raw_frame(buf: &[u8]) -> Option<(u8, &[u8], usize)> {
    let (len, head) = match *buf.get(1)? & 0x7f {
        126 => (
            usize::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?])),
            4,
        ),
        127 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(buf.get(2..10)?);
            (u64::from_be_bytes(n) as usize, 10)
        }
        n => (usize::from(n), 2),
    };
    let payload = buf.get(head..head + len)?;
    Some((buf[0], payload, head + len))
}

/// A compressed message's text. The inflater is the client's own, kept
/// across messages, or reset for each when crier compresses each on its
/// `own` (making one per message would cost the benchmark's clients, which
/// share the cores with crier, more than the inflating).
fn inflate_raw(d: &mut flate2::Decompress, payload: &[u8], own: bool) -> Vec<u8> {
    if own {
        d.reset(false);
    }
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(payload.len() * 8 + 64);
    let start = d.total_in();
    loop {
        let used = (d.total_in() - start) as usize;
        d.decompress_vec(&input[used..], &mut out, flate2::FlushDecompress::Sync)
            .expect("inflate");
        if (d.total_in() - start) as usize == input.len() && out.len() < out.capacity() {
            return out;
        }
        out.reserve(out.capacity());
    }
}

/// `text` as a masked client text frame.
fn masked_text(text: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81];
    if text.len() < 126 {
        frame.push(0x80 | text.len() as u8);
    } else {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(text.len() as u16).to_be_bytes());
    }
    frame.extend_from_slice(&mask);
    frame.extend(text.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// A webhook receiver that answers every call after 2 s, as a slow app
/// does, counting the calls; returns its port.
/// `--churn`: ten listeners a second come to a channel of their own
/// and go after 100 ms, so lifecycle events (occupied, then vacated) flow
/// while the benchmark publishes; until `stop`.
async fn churn(addr: String, stop: Arc<std::sync::atomic::AtomicBool>) {
    let mut n = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        let addr = addr.clone();
        tokio::spawn(async move {
            let Ok(mut s) = TcpStream::connect(&addr).await else {
                return;
            };
            let request = format!(
                "GET /ws?channel=bench.churn.{} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Version: 13\r\n\r\n",
                n % 50
            );
            let _ = s.write_all(request.as_bytes()).await;
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        });
    }
}

async fn slow_receiver(calls: Arc<AtomicU64>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the webhook receiver");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let calls = Arc::clone(&calls);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                // One request per connection (crier sends one per call).
                let _ = socket.read(&mut buf).await;
                calls.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(2)).await;
                let _ = socket
                    .write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    port
}

async fn sse_client(addr: String, channel: String, hist: Arc<Histogram>, received: Arc<AtomicU64>) {
    let mut s = TcpStream::connect(&addr).await.expect("sse connect");
    let req = format!(
        "GET /sse?channel={channel} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("sse request");
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        // Events end with a blank line; chunked framing lines never contain
        // "t":. One pass over what arrived, one shift of the rest: the
        // benchmark's clients share the cores with the server under test.
        let mut start = 0;
        while let Some(end) = pending[start..].windows(2).position(|w| w == b"\n\n") {
            if let Some(t) = sent_at(&pending[start..start + end]) {
                hist.record(now_micros().saturating_sub(t));
                received.fetch_add(1, Ordering::Relaxed);
            }
            start += end + 2;
        }
        pending.drain(..start);
    }
}

/// An SSE client for `--deflate on|off`: asks for `Accept-Encoding:
/// deflate` or not, reads the chunked body (inflating it when compressed),
/// times each event and counts the bytes it read.
async fn sse_counting_client(
    addr: String,
    channel: String,
    ask: bool,
    hist: Arc<Histogram>,
    received: Arc<AtomicU64>,
    wire_bytes: Arc<AtomicU64>,
) {
    let mut s = TcpStream::connect(&addr).await.expect("sse connect");
    let encoding = if ask {
        "Accept-Encoding: deflate\r\n"
    } else {
        ""
    };
    let req = format!(
        "GET /sse?channel={channel} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{encoding}\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("sse request");
    let mut buf = vec![0u8; 64 * 1024];
    let mut raw: Vec<u8> = Vec::new();
    let mut text: Vec<u8> = Vec::new();
    let mut inflater: Option<flate2::Decompress> = None;
    let mut head_done = false;
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        raw.extend_from_slice(&buf[..n]);
        if !head_done {
            let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&raw[..end]).to_lowercase();
            let compressed = head.contains("content-encoding: deflate");
            assert_eq!(compressed, ask, "compression: {head}");
            inflater = compressed.then(|| flate2::Decompress::new(false));
            raw.drain(..end + 4);
            head_done = true;
        } else {
            wire_bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        // Whole chunks: `size\r\n data \r\n`.
        let mut at = 0;
        while let Some(line) = raw[at..].windows(2).position(|w| w == b"\r\n") {
            let size = std::str::from_utf8(&raw[at..at + line])
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                .expect("a chunk size");
            let data = at + line + 2;
            if raw.len() < data + size + 2 {
                break;
            }
            let chunk = &raw[data..data + size];
            match &mut inflater {
                Some(d) => inflate_into(d, chunk, &mut text),
                None => text.extend_from_slice(chunk),
            }
            at = data + size + 2;
        }
        raw.drain(..at);
        let mut start = 0;
        while let Some(end) = text[start..].windows(2).position(|w| w == b"\n\n") {
            if let Some(t) = sent_at(&text[start..start + end]) {
                hist.record(now_micros().saturating_sub(t));
                received.fetch_add(1, Ordering::Relaxed);
            }
            start += end + 2;
        }
        text.drain(..start);
    }
}

/// Appends what `data`, the next piece of a raw deflate stream, inflates to.
fn inflate_into(d: &mut flate2::Decompress, data: &[u8], out: &mut Vec<u8>) {
    let mut input = data;
    loop {
        out.reserve(input.len() * 4 + 256);
        let before = d.total_in();
        d.decompress_vec(input, out, flate2::FlushDecompress::Sync)
            .expect("inflate");
        input = &input[(d.total_in() - before) as usize..];
        if input.is_empty() && out.len() < out.capacity() {
            return;
        }
    }
}

#[tokio::main]
async fn main() {
    let mut argv = std::env::args().skip(1);
    if argv.next().as_deref() == Some("--serve-floor") {
        let port = argv.next().and_then(|p| p.parse().ok());
        floor::serve(port.unwrap_or_else(|| usage("--serve-floor REDIS_PORT"))).await;
        return;
    }
    let mut args = parse_args();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let webhook_calls = Arc::new(AtomicU64::new(0));
    if args.events.is_some() {
        args.events = Some(slow_receiver(Arc::clone(&webhook_calls)).await);
    }
    let redis = if args.memory {
        None
    } else {
        Some(start_redis().await)
    };
    let crier = start_crier(redis.as_ref().map(|r| r.port), &args).await;
    if let Some(secs) = args.api {
        return api_bench(crier, redis, &args, Duration::from_secs(secs)).await;
    }
    let rss_idle = crier.metric("process_resident_memory_bytes").await;
    let kernel_idle = kernel_socket_bytes();

    let hist = Arc::new(Histogram::new());
    let received = Arc::new(AtomicU64::new(0));
    let wire_bytes = Arc::new(AtomicU64::new(0));
    let connecting = Arc::new(Semaphore::new(256));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let permit = Arc::clone(&connecting)
            .acquire_owned()
            .await
            .expect("semaphore");
        let (addr, hist, received) = (crier.addr.clone(), hist.clone(), received.clone());
        let channel = format!("bench.{}", i % args.channels);
        let transport = args.transport;
        let (deflate, wire_bytes) = (args.deflate, wire_bytes.clone());
        let inflate = !args.sampled || i % 100 == 0;
        tasks.push(tokio::spawn(async move {
            drop(permit);
            match (transport, deflate) {
                (Transport::Ws, Some(offer)) => {
                    let path = format!("/ws?channel={channel}");
                    ws_raw_client(addr, path, None, offer, inflate, hist, received, wire_bytes)
                        .await
                }
                (Transport::Pusher, Some(offer)) => {
                    let path = "/app/bench?protocol=7&client=bench&version=1".to_owned();
                    let subscribe = format!(
                        r#"{{"event":"pusher:subscribe","data":{{"channel":"{channel}"}}}}"#
                    );
                    let subscribe = Some(subscribe);
                    let (h, r, w) = (hist, received, wire_bytes);
                    ws_raw_client(addr, path, subscribe, offer, inflate, h, r, w).await
                }
                (Transport::Ws, None) => ws_client(addr, channel, hist, received).await,
                (Transport::Sse, None) => sse_client(addr, channel, hist, received).await,
                (Transport::Sse, Some(ask)) => {
                    sse_counting_client(addr, channel, ask, hist, received, wire_bytes).await
                }
                (Transport::Pusher, None) => pusher_client(addr, channel, hist, received).await,
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while crier.metric("crier_subscriptions").await < args.clients as f64 {
        assert!(Instant::now() < deadline, "clients did not all subscribe");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let rss_connected = crier.metric("process_resident_memory_bytes").await;
    let kernel_connected = kernel_socket_bytes();
    let cpu_before = crier.cpu_seconds();

    // Publish: every channel gets `messages`, `rate` per second each.
    let pad = "x".repeat(args.payload.saturating_sub(40));
    let stop_churn = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if args.churn {
        tokio::spawn(churn(crier.addr.clone(), Arc::clone(&stop_churn)));
    }
    let publish_start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let expected = (args.messages * args.clients) as u64;
    match &redis {
        Some(r) => {
            let client = redis::Client::open(format!("redis://127.0.0.1:{}", r.port)).expect("url");
            // A slow answer (Redis starved of CPU by the server under test)
            // shows as latency; only a lost connection stops the run.
            let config = redis::AsyncConnectionConfig::new()
                .set_response_timeout(Some(Duration::from_secs(10)));
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .expect("redis");
            let mut tick = tokio::time::interval(interval);
            for n in 0..args.messages {
                tick.tick().await;
                // One round trip per tick for every channel's message, so
                // the publisher keeps the offered rate however many
                // channels there are.
                let mut pipe = redis::pipe();
                for c in 0..args.channels {
                    let payload = match args.payload_json {
                        Some(kind) => payload::event(kind, now_micros(), n, c, args.payload),
                        None => format!(r#"{{"t":{},"n":{n},"pad":"{pad}"}}"#, now_micros()),
                    };
                    // With history: what apps call; without: a plain PUBLISH.
                    if args.history {
                        pipe.cmd("FCALL").arg("crier_publish").arg(1);
                    } else {
                        pipe.cmd("PUBLISH");
                    }
                    pipe.arg(format!("bench.{c}")).arg(payload);
                }
                let _: Vec<redis::Value> = pipe.query_async(&mut conn).await.expect("publish");
            }
        }
        None => usage("--memory publishing is not implemented; use Redis"),
    }
    let publish_secs = publish_start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total_secs = publish_start.elapsed().as_secs_f64();
    stop_churn.store(true, Ordering::Relaxed);
    let got = received.load(Ordering::Relaxed);
    let cpu = crier.cpu_seconds() - cpu_before;
    let rss_peak = crier.metric("process_resident_memory_bytes").await;
    let slow = crier.metric("crier_slow_client_disconnects_total").await;

    println!("## crier bench");
    println!(
        "server={} transport={:?} clients={} channels={} messages/channel={} rate/channel={}/s payload={}B{} history={}",
        if args.floor { "floor (crier's figures below are the floor program's)" } else { "crier" },
        args.transport, args.clients, args.channels, args.messages, args.rate, args.payload,
        args.payload_json.map(|k| format!(" (JSON: {k:?})")).unwrap_or_default(), args.history
    );
    println!("| figure | value |");
    println!("|---|---|");
    println!("| connect + subscribe all clients | {connect_secs:.2} s |");
    println!("| crier RSS idle | {:.1} MiB |", rss_idle / 1048576.0);
    println!(
        "| crier RSS with all clients | {:.1} MiB |",
        rss_connected / 1048576.0
    );
    println!(
        "| memory per connection | {:.1} KiB |",
        (rss_connected - rss_idle) / args.clients as f64 / 1024.0
    );
    if let (Some(idle), Some(connected)) = (kernel_idle, kernel_connected) {
        // Both ends of every connection are sockets of this machine: the
        // server's share is taken as half.
        let kernel = (connected - idle) / 2.0 / args.clients as f64 / 1024.0;
        let rss = (rss_connected - rss_idle) / args.clients as f64 / 1024.0;
        println!("| kernel socket memory per connection (half of both ends) | {kernel:.1} KiB |");
        println!(
            "| crier RSS + kernel per connection | {:.1} KiB |",
            rss + kernel
        );
    }
    println!(
        "| crier RSS after the run | {:.1} MiB |",
        rss_peak / 1048576.0
    );
    println!("| deliveries expected / received | {expected} / {got} |");
    if args.deflate.is_some() {
        let bytes = wire_bytes.load(Ordering::Relaxed) as f64;
        println!(
            "| bytes on the wire per delivery (deflate {}) | {:.0} |",
            if args.deflate == Some(true) {
                "on"
            } else {
                "off"
            },
            bytes / got.max(1) as f64
        );
    }
    println!("| slow-client disconnects | {slow} |");
    if args.events.is_some() {
        println!(
            "| webhook calls received (each answered after 2 s) | {} |",
            webhook_calls.load(Ordering::Relaxed)
        );
    }
    println!("| publish phase | {publish_secs:.2} s |");
    println!(
        "| deliveries per second (until last) | {:.0} |",
        got as f64 / total_secs
    );
    println!(
        "| crier CPU during delivery | {cpu:.2} s ({:.0} deliveries per CPU-second) |",
        got as f64 / cpu
    );
    println!(
        "| latency p50 / p99 / p99.9 (publish → client) | {:.2} / {:.2} / {:.2} ms |",
        hist.quantile_ms(0.5),
        hist.quantile_ms(0.99),
        hist.quantile_ms(0.999)
    );

    for t in tasks {
        t.abort();
    }
    let mut crier = crier;
    let _ = crier.child.start_kill();
    let _ = crier.child.wait().await;
    if let Some(mut r) = redis {
        let _ = r.child.start_kill();
        let _ = r.child.wait().await;
    }
    if got != expected {
        eprintln!("bench: {} deliveries missing", expected - got);
        std::process::exit(1);
    }
}
