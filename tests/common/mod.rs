//! Shared support for crier's integration tests: real Redis, real sockets,
//! real WebSocket and SSE clients, and polling with deadlines instead of sleeps.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod inflating;
pub mod panics;
pub mod pki;
pub mod redis;
pub mod sse;
pub mod ws;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

/// Bound on connecting and on waiting for response headers (and, for the
/// whole-body helpers, the body), so a wedged server fails the test instead of
/// hanging it.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// How often `eventually` re-checks its condition.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `f` every 20 ms until it returns true; panics naming `what` once
/// `timeout` has passed. Tests wait on observable state, never on a sleep.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        sleep(POLL_INTERVAL).await;
    }
}

/// GET `url` on a fresh connection; returns the status and the whole body.
pub async fn http_get(url: &str) -> (StatusCode, String) {
    let (response, conn) = send_request(Method::GET, url, &[], Bytes::new()).await;
    read_whole(url, response, conn).await
}

/// GET `url` with extra `headers` (e.g. an API key) on a fresh connection.
pub async fn http_get_with(url: &str, headers: &[(&str, &str)]) -> (StatusCode, String) {
    let (response, conn) = send_request(Method::GET, url, headers, Bytes::new()).await;
    read_whole(url, response, conn).await
}

/// POST `body` to `url` with extra `headers` (e.g. content type, auth) on a
/// fresh connection; returns the status and the whole body.
pub async fn http_post(url: &str, headers: &[(&str, &str)], body: &str) -> (StatusCode, String) {
    let (response, conn) = send_request(
        Method::POST,
        url,
        headers,
        Bytes::copy_from_slice(body.as_bytes()),
    )
    .await;
    read_whole(url, response, conn).await
}

/// `path` in the repository.
pub fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs `program args` from the repository root; panics with `hint` if the
/// program cannot run at all or fails.
pub fn check_runs(program: &str, args: &[&str], hint: &str) {
    let ok = std::process::Command::new(program)
        .args(args)
        .current_dir(repo("."))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "{hint}");
}

/// A name no other test (or earlier run) uses, so tests sharing a Redis or a
/// crier instance never hear each other: `unique("public:t")` gives e.g.
/// `public:t-1234-7-1f3a9c`.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{n}-{nanos:x}", std::process::id())
}

/// Owns the task driving one HTTP/1.1 connection. Dropping it aborts the task,
/// which closes the socket: that is how a test client "goes away".
pub(crate) struct ConnTask(JoinHandle<()>);

impl Drop for ConnTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends one request on a fresh HTTP/1.1 connection (no pooling, so each call
/// is one real client) and returns as soon as the response headers arrive.
pub(crate) async fn send_request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> (Response<Incoming>, ConnTask) {
    let uri: http::Uri = url
        .parse()
        .unwrap_or_else(|e| panic!("bad test URL {url:?}: {e}"));
    assert_eq!(
        uri.scheme_str(),
        Some("http"),
        "test URL must be http://: {url}"
    );
    let authority = uri
        .authority()
        .unwrap_or_else(|| panic!("test URL has no host: {url}"))
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());

    let mut builder = Request::builder()
        .method(method.clone())
        .uri(path)
        // hyper's low-level client does not add Host; HTTP/1.1 requires it.
        .header(http::header::HOST, authority.as_str());
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder
        .body(Full::new(body))
        .unwrap_or_else(|e| panic!("build {method} {url} request (bad header?): {e}"));

    let exchange = async {
        let stream = TcpStream::connect((authority.host(), port)).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        // Errors surface through the response body; nothing to do with them here.
        let task = ConnTask(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let response = sender
            .send_request(request)
            .await
            .map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>((response, task))
    };
    match timeout(HTTP_TIMEOUT, exchange).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => panic!("{method} {url} failed: {e}"),
        Err(_) => panic!("{method} {url}: no response headers within {HTTP_TIMEOUT:?}"),
    }
}

/// Reads the whole body (bounded by `HTTP_TIMEOUT`) as UTF-8 text.
pub(crate) async fn read_whole(
    url: &str,
    response: Response<Incoming>,
    conn: ConnTask,
) -> (StatusCode, String) {
    let status = response.status();
    let body = match timeout(HTTP_TIMEOUT, response.into_body().collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => panic!("reading the body from {url} (status {status}) failed: {e}"),
        Err(_) => panic!("body from {url} (status {status}) did not end within {HTTP_TIMEOUT:?}"),
    };
    drop(conn);
    let text = String::from_utf8(body.to_vec())
        .unwrap_or_else(|e| panic!("body from {url} (status {status}) is not UTF-8: {e}"));
    (status, text)
}

pub mod app;
pub mod browser;
pub mod cluster;
pub mod crier;
pub mod idp;
pub mod pusher;
