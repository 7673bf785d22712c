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
