//! What the browser tests share: express-session cookies made exactly as
//! express makes them, and a real headless Chromium.

use std::path::Path;
use std::process::Stdio;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::process::{Child, Command};

/// `encodeURIComponent`'s unreserved set.
const URI_COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// What express-session signs for session `id`: `s:` + id + `.` +
/// base64(HMAC-SHA256(secret, id)) without padding (cookie-signature).
pub fn express_signed(id: &str, secret: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("hmac");
    mac.update(id.as_bytes());
    let sig = base64::engine::general_purpose::STANDARD_NO_PAD.encode(mac.finalize().into_bytes());
    format!("s:{id}.{sig}")
}

/// The cookie value express-session sets: `encodeURIComponent` of
/// [`express_signed`].
pub fn express_cookie_value(id: &str, secret: &str) -> String {
    percent_encoding::utf8_percent_encode(&express_signed(id, secret), URI_COMPONENT).to_string()
}

/// Whether `program` is on the PATH.
pub fn installed(program: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A child process killed when the test lets go of it, pass or fail.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// Headless Chromium showing `url`, with a fresh profile in `profile`.
/// `--remote-debugging-port` keeps it running until killed; the network
/// flags keep it from calling out of this machine.
pub fn chromium(url: &str, profile: &Path) -> Killed {
    Killed(
        Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromium"),
    )
}

/// The page Chromium shows, driven over the DevTools protocol (Chromium was
/// started by [`chromium`], which asks for a debugging port): tests read
/// what a person would see on it.
pub struct DevTools {
    ws: super::ws::WsClient,
    next_id: u64,
}

impl DevTools {
    /// Attaches to the first page of the Chromium using `profile`: it writes
    /// its debugging port to `DevToolsActivePort` there once it listens.
    pub async fn attach(profile: &Path) -> DevTools {
        let port_file = profile.join("DevToolsActivePort");
        let deadline = tokio::time::Instant::now() + super::crier::WAIT;
        let url = loop {
            if let Some(url) = page_target(&port_file).await {
                break url;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "Chromium offered no page to debug within {:?}",
                super::crier::WAIT
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        DevTools {
            ws: super::ws::WsClient::connect(&url).await,
            next_id: 1,
        }
    }

    /// Evaluates `expression` in the page; its value (JSON), or panics
    /// with the exception the page threw.
    pub async fn eval(&mut self, expression: &str) -> serde_json::Value {
        match self.try_eval(expression).await {
            Ok(value) => value,
            Err(e) => panic!("{expression}: the page threw {e}"),
        }
    }

    /// Evaluates `expression` in the page: its value, or what it threw.
    pub async fn try_eval(&mut self, expression: &str) -> Result<serde_json::Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        self.ws
            .send_json(serde_json::json!({
                "id": id,
                "method": "Runtime.evaluate",
                "params": {"expression": expression, "returnByValue": true},
            }))
            .await;
        loop {
            let reply = self.ws.recv_json(super::crier::WAIT).await;
            if reply["id"] != id {
                continue; // an event, or an older answer
            }
            if let Some(e) = reply["result"].get("exceptionDetails") {
                return Err(e.to_string());
            }
            return Ok(reply["result"]["result"]["value"].clone());
        }
    }

    /// Polls `expression` until it is `true` (the page may still be
    /// loading: what it throws meanwhile counts as "not yet"), naming `what`
    /// on a timeout.
    pub async fn wait_for(&mut self, what: &str, expression: &str) {
        let deadline = tokio::time::Instant::now() + super::crier::WAIT;
        loop {
            let last = self.try_eval(expression).await;
            if last == Ok(serde_json::Value::Bool(true)) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let text = self.try_eval("document.body.innerText").await;
                panic!("timed out waiting for {what} (last: {last:?}); the page shows:\n{text:?}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// The DevTools WebSocket of the first page, once Chromium has written its
/// port to `DevToolsActivePort` and lists a page.
async fn page_target(port_file: &Path) -> Option<String> {
    let text = std::fs::read_to_string(port_file).ok()?;
    let port: u16 = text.lines().next()?.trim().parse().ok()?;
    let list = format!("http://127.0.0.1:{port}/json/list");
    let (_, body) = super::http_get(&list).await;
    let targets: serde_json::Value = serde_json::from_str(&body).ok()?;
    targets
        .as_array()?
        .iter()
        .find(|t| t["type"] == "page")
        .and_then(|t| t["webSocketDebuggerUrl"].as_str())
        .map(str::to_owned)
}
