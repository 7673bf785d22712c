//! A minimal HTTP/1.0 GET, for the benchmarks' reads of crier's own
//! endpoints (`/readyz`, `/metrics`): no client library between the
//! benchmark and what it measures.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};

/// `GET path` from `addr`: the status (0 when nothing answered) and the
/// body.
pub async fn get(addr: impl ToSocketAddrs + std::fmt::Display, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    if s.write_all(req.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
