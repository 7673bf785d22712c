//! A client worker: one process of the fleet benchmark holding a share of
//! the SSE clients (`fleet --worker …`, started by the coordinator).
//!
//! Why separate processes: a process here may hold at most 20,000 file
//! descriptors (a hard limit the benchmark cannot raise), so 76,000
//! clients need several processes. Each worker binds its sockets to
//! [`SOURCES`] loopback addresses of its own (`127.W.0.1`…), a few
//! hundred to a thousand sockets each: no worker runs out of the ~28,000
//! ephemeral ports, and `bind` stays cheap. (With all of a worker's 15,000
//! sockets on one address, the workers spent most of both cores in system
//! time, and 76,000 clients took 52 s to connect instead of 15 s: Linux
//! searches the port range for a free port at every `bind`.)
//!
//! Each client speaks SSE as a browser's `EventSource` does: HTTP/1.1,
//! the chunked body decoded, `retry:` honoured, and on a reconnect the last
//! `id:` sent back as `Last-Event-ID`. It reconnects through this worker's
//! load balancer (see [`Balancer`]), which the coordinator tells which
//! instances are ready. Every client checks what it receives: the
//! broadcast and its own user-channel message once each, and its history
//! channel's sequence numbers each once and in order.
//!
//! The coordinator talks to the worker over stdin / stdout, one command
//! and one answer line each (`ok` or `ok {json}`); the worker exits when
//! its stdin closes, so it never outlives the coordinator.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

use super::hist::{self, Counts};
use super::now_micros;

/// What the coordinator tells a worker on its command line.
pub struct WorkerArgs {
    /// Global index of this worker's first client.
    pub first: usize,
    pub count: usize,
    /// The first instances' addresses: client `i` opens its first stream
    /// on instance `i % N`.
    pub instances: Vec<SocketAddr>,
    /// The worker's source addresses are this one's first three octets
    /// and 1…[`SOURCES`].
    pub source: Ipv4Addr,
    pub history_channels: usize,
    pub least_connections: bool,
}

impl WorkerArgs {
    /// The command line the coordinator passes (after `--worker`).
    pub fn to_args(&self) -> Vec<String> {
        let instances: Vec<String> = self.instances.iter().map(|a| a.to_string()).collect();
        vec![
            self.first.to_string(),
            self.count.to_string(),
            instances.join(","),
            self.source.to_string(),
            self.history_channels.to_string(),
            if self.least_connections {
                "leastconn"
            } else {
                "roundrobin"
            }
            .to_owned(),
        ]
    }

    pub fn parse(args: &[String]) -> Option<WorkerArgs> {
        let [first, count, instances, source, history, balance] = args else {
            return None;
        };
        Some(WorkerArgs {
            first: first.parse().ok()?,
            count: count.parse().ok()?,
            instances: instances
                .split(',')
                .map(|a| a.parse().ok())
                .collect::<Option<_>>()?,
            source: source.parse().ok()?,
            history_channels: history.parse().ok()?,
            least_connections: balance == "leastconn",
        })
    }
}

/// Source addresses per worker.
pub const SOURCES: usize = 16;

/// The address client `local` of a worker binds its sockets to.
fn source_of(base: Ipv4Addr, local: usize) -> IpAddr {
    let [a, b, c, _] = base.octets();
    IpAddr::V4(Ipv4Addr::new(a, b, c, 1 + (local % SOURCES) as u8))
}

/// The channels client `global` of a fleet of `instances` listens to: the
/// broadcast channel, its own user channel, and one of the shared history
/// channels (spread so that every instance has listeners on each).
pub fn channels(global: usize, instances: usize, history_channels: usize) -> [String; 3] {
    [
        "fleet.b".to_owned(),
        format!("fleet.u.{global}"),
        format!("fleet.h.{}", (global / instances) % history_channels),
    ]
}

/// What one client saw, read by the coordinator's `stats` and `check`.
#[derive(Default)]
struct Client {
    broadcasts: Cell<u32>,
    user_messages: Cell<u32>,
    /// First and last history sequence number seen (0: none yet).
    first: Cell<u64>,
    last: Cell<u64>,
    /// Sequence numbers jumped over (lost unless they come later, which
    /// counts as out of order).
    skipped: Cell<u64>,
    /// A number not above the last one: a duplicate or out of order.
    disorder: Cell<u64>,
    /// `gap` notices on the history channel: crier saying it lost some.
    history_gaps: Cell<u32>,
}

/// The worker's load balancer: what a round-robin or least-connections
/// balancer in front of the fleet does with a reconnecting client. It
/// routes only to instances the coordinator said are ready (an instance
/// told to shut down is taken out at once, as its `/readyz` turning 503
/// takes it out of a Service), and least-connections counts this worker's
/// own streams, as a proxy counts its own.
struct Balancer {
    addrs: HashMap<usize, SocketAddr>,
    ready: Vec<usize>,
    streams: HashMap<usize, u64>,
    next: usize,
    least: bool,
}

impl Balancer {
    fn pick(&mut self) -> Option<usize> {
        if self.ready.is_empty() {
            return None;
        }
        self.next = self.next.wrapping_add(1);
        let n = self.ready.len();
        let start = self.next % n;
        if !self.least {
            return Some(self.ready[start]);
        }
        // The fewest streams; ties broken round-robin.
        (0..n)
            .map(|k| self.ready[(start + k) % n])
            .min_by_key(|id| self.streams.get(id).copied().unwrap_or(0))
    }
    fn attach(&mut self, id: usize) {
        *self.streams.entry(id).or_default() += 1;
    }
    fn detach(&mut self, id: usize) {
        if let Some(n) = self.streams.get_mut(&id) {
            *n = n.saturating_sub(1);
        }
    }
}

/// Counters and histograms of the whole worker.
struct Stats {
    open: Cell<u64>,
    opened: Cell<u64>,
    /// Attempts answered with another status than 200 (503 at an
    /// instance's connection limit, for one).
    refused: Cell<u64>,
    /// Attempts that did not get a response head (refused connection,
    /// reset, timeout).
    failed: Cell<u64>,
    /// Both, by what went wrong (status and crier's reason, or the step
    /// that failed).
    failures: RefCell<HashMap<String, u64>>,
    /// Streams ended by a drain notice (`retry:` then end of stream).
    drained: Cell<u64>,
    /// Streams that ended otherwise.
    ended_otherwise: Cell<u64>,
    /// `gap` notices on the broadcast and user channels: expected after a
    /// reconnect, since those keep no history.
    other_gaps: Cell<u64>,
    history_messages: Cell<u64>,
    /// History messages published before the resumed stream that
    /// delivered them opened.
    replayed: Cell<u64>,
    broadcast_latency: Counts,
    user_latency: Counts,
    history_latency: Counts,
    /// When drained clients were told to go, and when they had a stream
    /// again, in seconds after their instance's drain started.
    told: Counts,
    reopened: Counts,
    /// From a stream's end to the next one's opening (the `retry:` delay
    /// included, as a browser waits it).
    downtime: Counts,
}

struct Ctx {
    args: WorkerArgs,
    clients: Vec<Client>,
    balancer: RefCell<Balancer>,
    /// Instance id → when its drain starts (µs since the epoch).
    drains: RefCell<HashMap<usize, u64>>,
    stats: Stats,
    /// First connections at once: a few dozen handshakes in flight per
    /// worker keep the instances' accept queues from overflowing.
    connecting: Semaphore,
}

thread_local! {
    /// One read buffer for every client of the worker: a client keeps only
    /// what it has not parsed yet, so 19,000 idle clients stay small.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; 64 * 1024]);
}

/// The worker process: runs until its stdin closes.
pub fn main(args: WorkerArgs) {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, serve(args));
}

async fn serve(args: WorkerArgs) {
    let n = args.instances.len();
    let addrs = args.instances.iter().copied().enumerate().collect();
    let ctx = Rc::new(Ctx {
        clients: (0..args.count).map(|_| Client::default()).collect(),
        balancer: RefCell::new(Balancer {
            addrs,
            ready: (0..n).collect(),
            streams: HashMap::new(),
            next: args.first,
            least: args.least_connections,
        }),
        drains: RefCell::new(HashMap::new()),
        stats: Stats {
            open: Cell::new(0),
            opened: Cell::new(0),
            refused: Cell::new(0),
            failed: Cell::new(0),
            failures: RefCell::new(HashMap::new()),
            drained: Cell::new(0),
            ended_otherwise: Cell::new(0),
            other_gaps: Cell::new(0),
            history_messages: Cell::new(0),
            replayed: Cell::new(0),
            broadcast_latency: Counts::new(hist::LOG_BUCKETS),
            user_latency: Counts::new(hist::LOG_BUCKETS),
            history_latency: Counts::new(hist::LOG_BUCKETS),
            told: Counts::new(hist::SECOND_BUCKETS),
            reopened: Counts::new(hist::SECOND_BUCKETS),
            downtime: Counts::new(hist::LOG_BUCKETS),
        },
        connecting: Semaphore::new(64),
        args,
    });
    // stdin is read by a thread of its own (tokio's stdin is not built
    // here); its end ends the worker.
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = lines.recv().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["connect"] => connect_all(&ctx).await,
            ["stats"] => stats(&ctx),
            ["up", id, addr] => {
                let (id, addr) = (id.parse().expect("id"), addr.parse().expect("addr"));
                let mut b = ctx.balancer.borrow_mut();
                b.addrs.insert(id, addr);
                b.ready.push(id);
                String::new()
            }
            ["down", id] => {
                let id: usize = id.parse().expect("id");
                ctx.balancer.borrow_mut().ready.retain(|r| *r != id);
                String::new()
            }
            ["drain", id, t0] => {
                let id = id.parse().expect("id");
                ctx.drains.borrow_mut().insert(id, t0.parse().expect("t0"));
                String::new()
            }
            ["check", finals @ ..] => {
                let finals: Vec<u64> = finals.iter().map(|f| f.parse().expect("seq")).collect();
                check(&ctx, &finals)
            }
            _ => panic!("worker: unknown command {line:?}"),
        };
        // One line per answer (stdout is line-buffered).
        println!("ok {answer}");
    }
}

/// Starts every client and answers once all have an open stream (or a
/// deadline passed).
async fn connect_all(ctx: &Rc<Ctx>) -> String {
    let started = Instant::now();
    for local in 0..ctx.args.count {
        tokio::task::spawn_local(client(Rc::clone(ctx), local));
    }
    let deadline = started + Duration::from_secs(300);
    while (ctx.stats.open.get() as usize) < ctx.args.count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    serde_json::json!({
        "open": ctx.stats.open.get(),
        "secs": started.elapsed().as_secs_f64(),
    })
    .to_string()
}

fn stats(ctx: &Ctx) -> String {
    let s = &ctx.stats;
    let clients = &ctx.clients;
    let count = |f: &dyn Fn(&Client) -> bool| clients.iter().filter(|c| f(c)).count();
    serde_json::json!({
        "open": s.open.get(),
        "opened": s.opened.get(),
        "refused": s.refused.get(),
        "failed": s.failed.get(),
        "failures": *s.failures.borrow(),
        "drained": s.drained.get(),
        "ended_otherwise": s.ended_otherwise.get(),
        "other_gaps": s.other_gaps.get(),
        "history_messages": s.history_messages.get(),
        "replayed": s.replayed.get(),
        "with_broadcast": count(&|c| c.broadcasts.get() > 0),
        "with_user": count(&|c| c.user_messages.get() > 0),
        "with_history": count(&|c| c.first.get() > 0),
        "broadcast_latency": s.broadcast_latency.to_vec(),
        "user_latency": s.user_latency.to_vec(),
        "history_latency": s.history_latency.to_vec(),
        "told": s.told.to_vec(),
        "reopened": s.reopened.to_vec(),
        "downtime": s.downtime.to_vec(),
    })
    .to_string()
}

/// Every client against what was published: `finals[k]` is the last
/// sequence number published on history channel `k`.
fn check(ctx: &Ctx, finals: &[u64]) -> String {
    let (mut lost, mut disorder, mut gaps, mut never) = (0u64, 0u64, 0u64, 0u64);
    let (mut extra_broadcasts, mut extra_user) = (0u64, 0u64);
    let n = ctx.args.instances.len();
    for (local, c) in ctx.clients.iter().enumerate() {
        let global = ctx.args.first + local;
        let k = (global / n) % ctx.args.history_channels;
        let last_published = finals.get(k).copied().unwrap_or(0);
        if c.first.get() == 0 {
            never += 1;
        } else {
            lost += c.skipped.get() + last_published.saturating_sub(c.last.get());
        }
        disorder += c.disorder.get();
        gaps += u64::from(c.history_gaps.get());
        extra_broadcasts += u64::from(c.broadcasts.get().saturating_sub(1));
        extra_user += u64::from(c.user_messages.get().saturating_sub(1));
    }
    serde_json::json!({
        "lost": lost,
        "disorder": disorder,
        "history_gaps": gaps,
        "never": never,
        "extra_broadcasts": extra_broadcasts,
        "extra_user": extra_user,
    })
    .to_string()
}

/// How a stream ended.
struct End {
    /// With a drain notice (`retry:` alone, then the end).
    drained: bool,
    /// The reconnect delay the stream asked for last.
    retry: Duration,
    /// When the end was read (µs since the epoch).
    at: u64,
}

/// One client, for as long as the worker runs: open a stream, read it to
/// its end, wait what it asked, open the next through the balancer.
async fn client(ctx: Rc<Ctx>, local: usize) {
    let global = ctx.args.first + local;
    let n = ctx.args.instances.len();
    let query: Vec<String> = channels(global, n, ctx.args.history_channels)
        .iter()
        .map(|c| format!("channel={c}"))
        .collect();
    let path = format!("/sse?{}", query.join("&"));
    let mut last_id: Option<String> = None;
    let mut first = true;
    let mut wait = Duration::ZERO;
    let mut refusals = 0u32;
    // When the last stream ended, and when its instance's drain started.
    let mut left: Option<(u64, Option<u64>)> = None;
    loop {
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let instance = if first {
            Some(global % n)
        } else {
            ctx.balancer.borrow_mut().pick()
        };
        let Some(instance) = instance else {
            wait = Duration::from_secs(1);
            continue;
        };
        let addr = ctx.balancer.borrow().addrs[&instance];
        ctx.balancer.borrow_mut().attach(instance);
        let permit = match first {
            true => Some(ctx.connecting.acquire().await.expect("semaphore")),
            false => None,
        };
        let source = source_of(ctx.args.source, local);
        let opened = open(addr, source, &path, last_id.as_deref()).await;
        drop(permit);
        let stream = match opened {
            Ok(stream) => stream,
            Err(failure) => {
                ctx.balancer.borrow_mut().detach(instance);
                let counter = match failure {
                    Failure::Status(..) => &ctx.stats.refused,
                    Failure::NoResponse(_) => &ctx.stats.failed,
                };
                counter.set(counter.get() + 1);
                *ctx.stats
                    .failures
                    .borrow_mut()
                    .entry(failure.to_string())
                    .or_default() += 1;
                // As docs/integration.md's `crierSSE` re-opens a refused
                // EventSource: 0.5–1 s, doubling per refusal in a row up
                // to 30 s, jittered in the upper half. (It also drops its
                // cursor after three refusals, to get past a 400; these
                // clients keep it, so that every resume is checked.)
                refusals += 1;
                let ceiling = (500u64 << refusals.min(6)).min(30_000);
                wait = Duration::from_millis(ceiling / 2 + rand::random_range(0..=ceiling / 2));
                continue;
            }
        };
        first = false;
        refusals = 0;
        let s = &ctx.stats;
        s.open.set(s.open.get() + 1);
        s.opened.set(s.opened.get() + 1);
        let now = now_micros();
        if let Some((ended, drain)) = left.take() {
            s.downtime.add(hist::log_bucket(now.saturating_sub(ended)));
            if let Some(t0) = drain {
                s.reopened.add(hist::second_bucket(now, t0));
            }
        }
        let resumed = last_id.is_some().then_some(now);
        let end = read_stream(&ctx, local, stream, &mut last_id, resumed).await;
        ctx.balancer.borrow_mut().detach(instance);
        s.open.set(s.open.get() - 1);
        let now = end.at;
        let drain = match end.drained {
            true => {
                s.drained.set(s.drained.get() + 1);
                let t0 = ctx.drains.borrow().get(&instance).copied();
                if let Some(t0) = t0 {
                    s.told.add(hist::second_bucket(now, t0));
                }
                t0
            }
            false => {
                s.ended_otherwise.set(s.ended_otherwise.get() + 1);
                None
            }
        };
        left = Some((now, drain));
        // The delay counts from the end, as a browser's does.
        let waited = Duration::from_micros(now_micros().saturating_sub(now));
        wait = end.retry.saturating_sub(waited);
    }
}

/// A stream whose response head (200) has been read, with what came after
/// the head.
struct Opened {
    stream: TcpStream,
    rest: Vec<u8>,
    chunked: bool,
}

/// Why a stream did not open.
enum Failure {
    /// A response other than 200: its status and crier's reason.
    Status(u16, String),
    /// No response: the step that failed.
    NoResponse(&'static str),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Status(status, reason) => write!(f, "{status} {reason}"),
            Failure::NoResponse(step) => write!(f, "no response: {step}"),
        }
    }
}

/// Connects from `source` and asks for the stream.
async fn open(
    addr: SocketAddr,
    source: IpAddr,
    path: &str,
    last_id: Option<&str>,
) -> Result<Opened, Failure> {
    let attempt = async {
        let socket = TcpSocket::new_v4().map_err(|_| Failure::NoResponse("socket"))?;
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(|_| Failure::NoResponse("bind"))?;
        let mut stream = socket
            .connect(addr)
            .await
            .map_err(|_| Failure::NoResponse("connect"))?;
        let resume = last_id
            .map(|id| format!("Last-Event-ID: {id}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{resume}\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|_| Failure::NoResponse("write"))?;
        let mut head = Vec::new();
        loop {
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
                let status: u16 = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
                if status != 200 {
                    // crier's refusals are small JSON bodies, sent with the
                    // head: their `error` is enough to tell them apart.
                    let body = String::from_utf8_lossy(&head[end + 4..]).into_owned();
                    let error = serde_json::from_str::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| {
                            Some(format!(
                                "{}: {}",
                                v["error"].as_str()?,
                                v["reason"].as_str().unwrap_or_default()
                            ))
                        })
                        .unwrap_or_default();
                    return Err(Failure::Status(status, error));
                }
                let chunked = text.contains("transfer-encoding: chunked");
                let rest = head.split_off(end + 4);
                return Ok(Opened {
                    stream,
                    rest,
                    chunked,
                });
            }
            if head.len() > 32 * 1024 {
                return Err(Failure::NoResponse("head too long"));
            }
            if read_some(&stream, &mut head).await == 0 {
                return Err(Failure::NoResponse("closed before a response"));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), attempt)
        .await
        .unwrap_or(Err(Failure::NoResponse("no response head within 30 s")))
}

/// Reads what is there into `into` through the shared scratch buffer:
/// the number of bytes (0 at the end or on an error).
async fn read_some(stream: &TcpStream, into: &mut Vec<u8>) -> usize {
    loop {
        if stream.readable().await.is_err() {
            return 0;
        }
        let read = SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            match stream.try_read(&mut scratch[..]) {
                Ok(n) => {
                    into.extend_from_slice(&scratch[..n]);
                    Some(n)
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                Err(_) => Some(0),
            }
        });
        if let Some(n) = read {
            return n;
        }
    }
}

/// Chunked transfer decoding, as far as the bytes go.
enum Chunk {
    Size,
    Data(usize),
    Crlf,
    End,
}

/// Reads one stream to its end, handling every complete event.
/// `resumed`: when the stream opened, if it resumed from a cursor.
async fn read_stream(
    ctx: &Ctx,
    local: usize,
    o: Opened,
    last_id: &mut Option<String>,
    resumed: Option<u64>,
) -> End {
    let Opened {
        stream,
        mut rest,
        chunked,
    } = o;
    let mut raw = std::mem::take(&mut rest);
    let mut text: Vec<u8> = Vec::new();
    let mut state = Chunk::Size;
    let mut end = End {
        drained: false,
        retry: Duration::from_secs(3),
        at: 0,
    };
    let mut blocks = 0usize;
    loop {
        // Decode the body's framing into SSE text.
        if chunked {
            let mut at = 0;
            loop {
                match state {
                    Chunk::Size => {
                        let Some(line) = raw[at..].windows(2).position(|w| w == b"\r\n") else {
                            break;
                        };
                        let size = std::str::from_utf8(&raw[at..at + line])
                            .ok()
                            .and_then(|s| {
                                usize::from_str_radix(s.split(';').next()?.trim(), 16).ok()
                            })
                            .unwrap_or(0);
                        at += line + 2;
                        state = if size == 0 {
                            Chunk::End
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(left) => {
                        let take = left.min(raw.len() - at);
                        if take == 0 {
                            break;
                        }
                        text.extend_from_slice(&raw[at..at + take]);
                        at += take;
                        state = if take == left {
                            Chunk::Crlf
                        } else {
                            Chunk::Data(left - take)
                        };
                    }
                    Chunk::Crlf => {
                        if raw.len() - at < 2 {
                            break;
                        }
                        at += 2;
                        state = Chunk::Size;
                    }
                    Chunk::End => break,
                }
            }
            raw.drain(..at);
        } else {
            text.append(&mut raw);
        }
        // Every complete event block.
        let mut start = 0;
        while let Some(len) = text[start..].windows(2).position(|w| w == b"\n\n") {
            handle_block(
                ctx,
                local,
                &text[start..start + len],
                blocks,
                &mut end,
                last_id,
                resumed,
            );
            blocks += 1;
            start += len + 2;
        }
        text.drain(..start);
        if matches!(state, Chunk::End) {
            end.at = now_micros();
            // crier closes the connection after the last chunk: wait for
            // that (within the reconnect delay) before closing, so the
            // closing handshake's TIME_WAIT stays on crier's side instead
            // of holding one of this worker's source ports for a minute.
            let wait = async {
                let mut sink = Vec::new();
                while read_some(&stream, &mut sink).await > 0 {
                    sink.clear();
                }
            };
            let _ = tokio::time::timeout(end.retry, wait).await;
            return end;
        }
        // An idle client keeps no large buffer.
        if raw.capacity() > 16 * 1024 && raw.is_empty() {
            raw = Vec::new();
        }
        if text.capacity() > 16 * 1024 && text.is_empty() {
            text = Vec::new();
        }
        if read_some(&stream, &mut raw).await == 0 {
            end.at = now_micros();
            return end;
        }
    }
}

/// One SSE event block: the fields crier sends (`retry`, `id`, `event`,
/// `data`) and comments.
fn handle_block(
    ctx: &Ctx,
    local: usize,
    block: &[u8],
    index: usize,
    end: &mut End,
    last_id: &mut Option<String>,
    resumed: Option<u64>,
) {
    let (mut retry, mut id, mut event, mut data) = (None, false, &b""[..], &b""[..]);
    for line in block.split(|&b| b == b'\n') {
        if let Some(v) = line.strip_prefix(b"retry: ") {
            retry = std::str::from_utf8(v).ok().and_then(|v| v.parse().ok());
        } else if let Some(v) = line.strip_prefix(b"id: ") {
            *last_id = Some(String::from_utf8_lossy(v).into_owned());
            id = true;
        } else if let Some(v) = line.strip_prefix(b"event: ") {
            event = v;
        } else if let Some(v) = line.strip_prefix(b"data: ") {
            data = v;
        }
    }
    if let Some(ms) = retry {
        end.retry = Duration::from_millis(ms);
        // The opening block carries `retry:` and the cursor; a `retry:`
        // alone later is the drain's "reconnect after this".
        if index > 0 && !id {
            end.drained = true;
        }
    }
    let client = &ctx.clients[local];
    let s = &ctx.stats;
    if event == b"gap" {
        if find(data, b"\"fleet.h.").is_some() {
            client.history_gaps.set(client.history_gaps.get() + 1);
        } else {
            s.other_gaps.set(s.other_gaps.get() + 1);
        }
        return;
    }
    if data.is_empty() {
        return;
    }
    let Some(kind) = find(data, b"\"k\":\"").and_then(|p| data.get(p + 5)) else {
        return;
    };
    let Some(sent) = number(data, b"\"t\":") else {
        return;
    };
    let latency = hist::log_bucket(now_micros().saturating_sub(sent));
    match kind {
        b'b' => {
            client.broadcasts.set(client.broadcasts.get() + 1);
            s.broadcast_latency.add(latency);
        }
        b'u' => {
            client.user_messages.set(client.user_messages.get() + 1);
            s.user_latency.add(latency);
        }
        b'h' => {
            let Some(seq) = number(data, b"\"s\":") else {
                return;
            };
            s.history_messages.set(s.history_messages.get() + 1);
            s.history_latency.add(latency);
            // Published before this resumed stream opened: it came from the
            // channel's history (or, for the few published during the
            // opening itself, from the queue filled while it subscribed).
            if resumed.is_some_and(|opened| sent < opened) {
                s.replayed.set(s.replayed.get() + 1);
            }
            let last = client.last.get();
            if client.first.get() == 0 {
                client.first.set(seq);
                client.last.set(seq);
            } else if seq == last + 1 {
                client.last.set(seq);
            } else if seq <= last {
                client.disorder.set(client.disorder.get() + 1);
            } else {
                client.skipped.set(client.skipped.get() + seq - last - 1);
                client.last.set(seq);
            }
        }
        _ => {}
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The digits after `key` (`"t":`), as a number.
fn number(data: &[u8], key: &[u8]) -> Option<u64> {
    let at = find(data, key)? + key.len();
    let digits = &data[at..];
    let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&digits[..len]).ok()?.parse().ok()
}
