//! `--api SECONDS`: the HTTP publish APIs' throughput, with no subscriber.
//! `--api-clients` keep-alive HTTP/1.1 clients (32 by default) each send
//! one request after another for SECONDS: first signed Pusher events
//! (`POST /apps/1/events`, what the Pusher server SDKs send), then crier's
//! own `POST /api/publish` with its API key, so both figures come from one
//! run. Each request is a realistic ~1 KB JSON event to one channel.
//!
//! A Pusher request is signed once per client and sent again and again
//! (its timestamp stays valid for 600 s): crier checks the signature, the
//! body's MD5 and the timestamp of every request all the same.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What one API sustained.
pub(crate) struct Figures {
    pub(crate) requests: u64,
    pub(crate) failed: u64,
    pub(crate) secs: f64,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `POST /apps/1/events` with `body`, signed as the Pusher SDKs sign it.
pub(crate) fn pusher_request(addr: &str, key: &str, secret: &str, body: &str) -> Vec<u8> {
    let path = "/apps/1/events";
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let body_md5 = hex(&Md5::digest(body.as_bytes()));
    let query =
        format!("auth_key={key}&auth_timestamp={timestamp}&auth_version=1.0&body_md5={body_md5}");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("hmac");
    mac.update(format!("POST\n{path}\n{query}").as_bytes());
    let signature = hex(&mac.finalize().into_bytes());
    format!(
        "POST {path}?{query}&auth_signature={signature} HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `POST /api/publish` with `body`, authorized by `api_key`.
pub(crate) fn publish_request(addr: &str, api_key: &str, body: &str) -> Vec<u8> {
    format!(
        "POST /api/publish HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {api_key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `clients` keep-alive connections sending `request` back to back for
/// `duration`: how many got a 200, and how many did not.
pub(crate) async fn hammer(
    addr: &str,
    request: impl Fn() -> Vec<u8>,
    clients: usize,
    duration: Duration,
) -> Figures {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let until = start + duration;
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (request, addr) = (request(), addr.to_owned());
        let (ok, failed) = (Arc::clone(&ok), Arc::clone(&failed));
        tasks.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(&addr).await.expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            let mut buf = Vec::with_capacity(4096);
            while Instant::now() < until {
                stream.write_all(&request).await.expect("write");
                match read_response(&mut stream, &mut buf).await {
                    Some(200) => ok.fetch_add(1, Ordering::Relaxed),
                    Some(_) => failed.fetch_add(1, Ordering::Relaxed),
                    None => panic!("the server closed a keep-alive connection"),
                };
            }
        }));
    }
    for task in tasks {
        task.await.expect("client");
    }
    Figures {
        requests: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        secs: start.elapsed().as_secs_f64(),
    }
}

/// Reads one HTTP/1.1 response (a `Content-Length` body): its status.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<u16> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status = head.get(9..12)?.parse().ok()?;
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                let n = stream.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Some(status);
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
