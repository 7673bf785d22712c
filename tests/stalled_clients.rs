//! Clients that stop reading cost crier little memory: what they have not
//! been sent yet is the publications' bytes, shared with every other
//! client, not a copy each (issue 20). Measured on the real binary, as a
//! child process, so its resident memory is its own.

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::crier::{metric_value, Process};
use common::redis::RedisServer;
use common::{http_get, unique};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Connections that never read, half WebSocket and half SSE.
const STALLED: usize = 400;
/// Publications, and their size.
const PUBLICATIONS: usize = 3_000;
const SIZE: usize = 16 * 1024;
/// What the stalled clients may cost crier, all together, at the worst
/// moment: the publications once (3,000 × 16 KB as a WebSocket frame and
/// an SSE event: about 94 MiB if every one were held at once) plus a small
/// bound per client. A copy of what each client has not read (a batch of
/// 64 publications, 1 MiB) would be 400 MiB.
const BOUND_MIB: u64 = 200;

/// A `/proc/<pid>/status` field, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

/// A client socket with a small receive buffer (so the kernel on the
/// client's side absorbs little), which sends `request` and reads until
/// `until` has arrived, then never reads again.
async fn stalled(addr: &str, request: &str, until: &[u8]) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut stream = socket
        .connect(addr.parse().expect("addr"))
        .await
        .expect("connect");
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(until.len()).any(|w| w == until) {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("crier answers")
            .expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    stream
}

async fn metric(crier: &Process, series: &str) -> f64 {
    let (_, body) = http_get(&crier.http("/metrics")).await;
    metric_value(&body, series)
}

#[tokio::test]
async fn stalled_clients_share_the_publications_bytes() {
    // Redis must not cut crier's pub/sub connection while 48 MB go through.
    let redis =
        RedisServer::start_with_args(&["--client-output-buffer-limit", "pubsub 0 0 0"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("crier.toml");
    std::fs::write(
        &config,
        "[[channels]]\npattern = \"public:*\"\nsubscribe = \"anyone\"\n",
    )
    .expect("config");
    let crier = Process::start(
        &[
            "--config",
            config.to_str().expect("path"),
            "--redis-url",
            &redis.url(),
        ],
        &[],
    )
    .await;
    let pid = crier.child.id().expect("running");
    let ch = unique("public:stalled");

    let mut clients = Vec::with_capacity(STALLED);
    for n in 0..STALLED {
        let client = if n % 2 == 0 {
            let request = format!(
                "GET /ws?channel={ch} HTTP/1.1\r\nhost: crier\r\nconnection: upgrade\r\n\
                 upgrade: websocket\r\nsec-websocket-version: 13\r\n\
                 sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            );
            stalled(&crier.addr, &request, b"\"subscribed\"").await
        } else {
            let request = format!(
                "GET /sse?channel={ch} HTTP/1.1\r\nhost: crier\r\naccept: text/event-stream\r\n\r\n"
            );
            stalled(&crier.addr, &request, b"\r\n\r\n").await
        };
        clients.push(client);
    }
    let before = status_kib(pid, "VmRSS");

    let client = ::redis::Client::open(redis.url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let payload = format!(r#"{{"pad":"{}"}}"#, "x".repeat(SIZE - 10));
    for _ in 0..PUBLICATIONS / 100 {
        let mut pipe = ::redis::pipe();
        for _ in 0..100 {
            pipe.cmd("PUBLISH").arg(&ch).arg(&payload).ignore();
        }
        let () = pipe.query_async(&mut conn).await.expect("PUBLISH");
    }
    // Every stalled client falls behind by more than its queue and is cut.
    common::eventually(
        "every stalled client cut as slow",
        Duration::from_secs(30),
        || async { metric(&crier, "crier_slow_client_disconnects_total").await >= STALLED as f64 },
    )
    .await;
    let peak = status_kib(pid, "VmHWM");
    drop(clients);
    common::eventually(
        "every connection closed",
        Duration::from_secs(30),
        || async {
            let (_, body) = http_get(&crier.http("/metrics")).await;
            metric_value(&body, "crier_connections{transport=\"ws\"}")
                + metric_value(&body, "crier_connections{transport=\"sse\"}")
                == 0.0
        },
    )
    .await;
    let after = status_kib(pid, "VmRSS");
    let growth_mib = peak.saturating_sub(before) / 1024;
    eprintln!(
        "crier RSS: {} MiB before, {} MiB at the peak (+{growth_mib} MiB), {} MiB after the clients closed",
        before / 1024,
        peak / 1024,
        after / 1024
    );
    assert!(
        growth_mib < BOUND_MIB,
        "{STALLED} stalled clients and {PUBLICATIONS} × 16 KB grew crier's RSS by \
         {growth_mib} MiB (bound {BOUND_MIB} MiB)"
    );
}
