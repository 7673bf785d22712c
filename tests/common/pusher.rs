//! The Pusher ecosystem's real, unmodified libraries for tests:
//! tests/pusher/driver.mjs runs pusher-js clients and the `pusher` server
//! SDK in one Node process, a JSON line per command and per thing seen;
//! and the crier configuration a Laravel app's migration guide gives.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crier::config::{Config, HistoryRule, PusherApp, Subscribe};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

use super::crier::{rule, test_config, WAIT};
use super::redis::RedisServer;
use super::repo;

pub const APP_ID: &str = "1001";
pub const KEY: &str = "app-key";
pub const SECRET: &str = "app-secret-of-16-bytes";

/// Rules as a Laravel app's migration guide has them: public `orders`,
/// signed `private-orders.*` and `presence-*`, history on `cache-*`.
pub fn pusher_config(redis: &RedisServer) -> Config {
    let mut config = test_config(Some(redis.url()));
    with_pusher(&mut config);
    config
}

/// Adds [`pusher_config`]'s rules (before the config's own), app and
/// short presence beats to `config`.
pub fn with_pusher(config: &mut Config) {
    let mut cache = rule("cache-*", Subscribe::Anyone);
    cache.history = Some(HistoryRule {
        size: 10,
        ttl: Duration::from_secs(600),
    });
    let rules = [
        rule("orders", Subscribe::Anyone),
        rule("private-orders.*", Subscribe::Claim),
        rule("presence-*", Subscribe::Claim),
        cache,
    ];
    config.channels.splice(0..0, rules);
    config.pusher.apps = vec![PusherApp {
        id: APP_ID.into(),
        key: KEY.into(),
        secret: SECRET.into(),
        client_events: true,
        namespace: String::new(),
        ..Default::default()
    }];
    config.presence.heartbeat = Duration::from_millis(300);
    config.presence.ttl = Duration::from_secs(1);
    if compressing() {
        // Every frame that shrinks goes compressed, not only large ones.
        config.ws.compression_min_bytes = 0;
    }
}

/// Whether this run's pusher-js clients compress (scripts/test's second
/// run of the Pusher suite sets `CRIER_TEST_PUSHER_WEBSOCKET=ws`).
pub fn compressing() -> bool {
    std::env::var("CRIER_TEST_PUSHER_WEBSOCKET").as_deref() == Ok("ws")
}

/// The same configuration as a file, for a crier child process.
pub fn pusher_toml(redis: &RedisServer) -> String {
    format!(
        r#"
[redis]
url = "{}"
linger = "200ms"
[[channels]]
pattern = "orders"
subscribe = "anyone"
[[channels]]
pattern = "private-orders.*"
subscribe = "claim"
[[channels]]
pattern = "presence-*"
subscribe = "claim"
[[pusher.apps]]
id = "{APP_ID}"
key = "{KEY}"
secret = "{SECRET}"
client_events = true
[presence]
heartbeat = "300ms"
ttl = "1s"
"#,
        redis.url()
    )
}

/// A crier child process (one a test can SIGKILL) serving [`pusher_toml`],
/// and the directory its configuration file is in (keep it while the
/// process runs).
pub async fn pusher_process(redis: &RedisServer) -> (super::crier::Process, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("crier.toml");
    std::fs::write(&file, pusher_toml(redis)).expect("write config");
    let process =
        super::crier::Process::start(&["--config", file.to_str().expect("path")], &[]).await;
    (process, dir)
}

/// tests/pusher/driver.mjs: pusher-js clients and the server SDK in one
/// Node process, a JSON line per command and per thing seen.
pub struct Driver {
    child: Child,
    stdin: ChildStdin,
    lines: Lines,
}

/// The JSON lines a child prints, collected as they come, to wait on.
pub struct Lines {
    seen: Arc<Mutex<Vec<Value>>>,
    notify: Arc<tokio::sync::Notify>,
}

impl Lines {
    /// Collects `stdout`'s lines (one that is not JSON as `{"raw": …}`).
    pub fn collect(stdout: tokio::process::ChildStdout) -> Lines {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let notify = Arc::new(tokio::sync::Notify::new());
        let (sink, wake) = (seen.clone(), notify.clone());
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let v: Value = serde_json::from_str(&line).unwrap_or(json!({"raw": line}));
                sink.lock().expect("lock").push(v);
                wake.notify_waiters();
            }
            // Said in what a failed wait prints: the child is gone (its
            // stderr, inherited, says why).
            sink.lock()
                .expect("lock")
                .push(json!({"type": "stdout_closed"}));
            wake.notify_waiters();
        });
        Lines { seen, notify }
    }

    /// The first line matching `f`, waiting for it.
    pub async fn wait(&self, f: impl Fn(&Value) -> bool) -> Value {
        self.wait_nth(f, 1).await
    }

    /// The `n`th line matching `f` (from 1), waiting for it.
    pub async fn wait_nth(&self, f: impl Fn(&Value) -> bool, n: usize) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.notify.notified();
            let nth = self
                .seen
                .lock()
                .expect("lock")
                .iter()
                .filter(|v| f(v))
                .nth(n - 1)
                .cloned();
            if let Some(v) = nth {
                return v;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let seen = self.seen.lock().expect("lock").clone();
                panic!("never saw what the test waits for; saw: {seen:#?}");
            }
        }
    }

    /// Every line so far.
    pub fn all(&self) -> Vec<Value> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Driver {
    pub async fn start() -> Driver {
        Self::start_as(APP_ID, KEY, SECRET).await
    }

    /// A driver for another app: its clients connect with `key`, its
    /// auth endpoint and SDK sign with `secret`, its SDK calls `id`.
    pub async fn start_as(id: &str, key: &str, secret: &str) -> Driver {
        Self::start_with(id, key, secret, false).await
    }

    /// A driver whose pusher-js clients speak through the `ws` library,
    /// which offers permessage-deflate (pusher-js's own Node WebSocket
    /// offers no extension).
    pub async fn start_over_ws() -> Driver {
        Self::start_with(APP_ID, KEY, SECRET, true).await
    }

    /// `over_ws`, or the whole suite's choice (`CRIER_TEST_PUSHER_WEBSOCKET=ws`,
    /// which scripts/test sets for a second run): clients that compress.
    async fn start_with(id: &str, key: &str, secret: &str, over_ws: bool) -> Driver {
        let over_ws = over_ws || compressing();
        assert!(
            repo("tests/pusher/node_modules/pusher-js/package.json").exists(),
            "run `npm ci --prefix tests/pusher` (node and npm needed)"
        );
        let mut child = Command::new("node")
            .arg(repo("tests/pusher/driver.mjs"))
            .envs([("APP_ID", id), ("APP_KEY", key), ("APP_SECRET", secret)])
            .env("PUSHER_WEBSOCKET", if over_ws { "ws" } else { "" })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs tests/pusher/driver.mjs");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let lines = Lines::collect(stdout);
        let driver = Driver {
            child,
            stdin,
            lines,
        };
        driver.wait(|v| v["type"] == "ready").await;
        driver
    }

    pub async fn send(&mut self, command: Value) {
        let line = format!("{command}\n");
        self.stdin
            .write_all(line.as_bytes())
            .await
            .expect("driver stdin");
    }

    /// The first line matching `f`, waiting for it.
    pub async fn wait(&self, f: impl Fn(&Value) -> bool) -> Value {
        self.lines.wait(f).await
    }

    /// The `n`th line matching `f` (from 1), waiting for it.
    pub async fn wait_nth(&self, f: impl Fn(&Value) -> bool, n: usize) -> Value {
        self.lines.wait_nth(f, n).await
    }

    /// How many lines seen so far match `f`.
    pub fn count(&self, f: impl Fn(&Value) -> bool) -> usize {
        self.lines.all().iter().filter(|v| f(v)).count()
    }

    pub async fn connect(&mut self, client: &str, port: u16, user: &str) -> String {
        self.send(json!({"op": "connect", "client": client, "port": port, "user": user}))
            .await;
        let state = self
            .wait(|v| v["client"] == client && v["state"] == "connected")
            .await;
        state["socket_id"].as_str().expect("socket id").to_owned()
    }

    /// Connects `client` as `user` and signs it in (`pusher.signin()`,
    /// through the app's user authentication endpoint), watching
    /// `watchlist`: its `signed_in` line.
    pub async fn sign_in(
        &mut self,
        client: &str,
        port: u16,
        user: &str,
        watchlist: &[&str],
    ) -> Value {
        self.send(
            json!({"op": "connect", "client": client, "port": port, "user": user,
            "signin": true, "watchlist": watchlist}),
        )
        .await;
        self.wait(|v| v["client"] == client && v["type"] == "signed_in")
            .await
    }

    /// `sendToUser` (`op` `send_to_user`) or `terminateUserConnections`
    /// (`terminate`) through the server SDK: its `sent` line.
    pub async fn user_api(&mut self, tag: &str, command: Value) -> Value {
        let mut command = command;
        command["tag"] = json!(tag);
        self.send(command).await;
        self.wait(|v| v["type"] == "sent" && v["tag"] == tag).await
    }

    pub async fn subscribe(&mut self, client: &str, channel: &str) -> Value {
        self.subscribe_binding(client, channel, &[]).await
    }

    /// [`Driver::subscribe`], with `events` bound by name: each is reported
    /// as a `bound` line with the metadata pusher-js passes (`user_id`).
    pub async fn subscribe_binding(
        &mut self,
        client: &str,
        channel: &str,
        events: &[&str],
    ) -> Value {
        let command =
            json!({"op": "subscribe", "client": client, "channel": channel, "bind": events});
        self.send(command).await;
        self.wait(|v| {
            v["client"] == client
                && v["channel"] == channel
                && (v["type"] == "subscribed" || v["type"] == "subscription_error")
        })
        .await
    }

    pub async fn trigger(&mut self, tag: &str, command: Value) -> Value {
        let mut command = command;
        command["op"] = json!("trigger");
        command["tag"] = json!(tag);
        self.send(command).await;
        self.wait(|v| v["type"] == "triggered" && v["tag"] == tag)
            .await
    }

    pub async fn get(&mut self, tag: &str, port: u16, path: &str, params: Value) -> Value {
        let command =
            json!({"op": "get", "tag": tag, "port": port, "path": path, "params": params});
        self.send(command).await;
        self.wait(|v| v["type"] == "got" && v["tag"] == tag).await
    }

    pub fn event(&self, client: &str, channel: &str, event: &str) -> impl Fn(&Value) -> bool {
        let (client, channel, event) = (client.to_owned(), channel.to_owned(), event.to_owned());
        move |v: &Value| {
            v["type"] == "event"
                && v["client"] == client
                && v["channel"] == channel
                && v["event"] == event
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

pub fn port(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

/// HMAC-SHA256 of `text` under `secret`, as hex: what an app's Pusher
/// auth endpoint and its server SDK sign with (`key:` + this is a channel
/// authorization).
pub fn hmac_hex(secret: &str, text: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("hmac");
    mac.update(text.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// tests/pusher/webhooks.mjs: a Pusher app's webhook endpoint, checking
/// every request with the unmodified `pusher` SDK; a JSON line each.
pub struct WebhookReceiver {
    child: Child,
    stdin: ChildStdin,
    pub lines: Lines,
    pub port: u16,
}

impl WebhookReceiver {
    /// Listens on a free port, answering `status`.
    pub async fn start(status: u16) -> WebhookReceiver {
        let mut child = Command::new("node")
            .arg(repo("tests/pusher/webhooks.mjs"))
            .envs([("APP_ID", APP_ID), ("KEY", KEY), ("SECRET", SECRET)])
            .env("STATUS", status.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs tests/pusher/webhooks.mjs");
        let lines = Lines::collect(child.stdout.take().expect("stdout"));
        let stdin = child.stdin.take().expect("stdin");
        let port = lines.wait(|v| v["port"].is_u64()).await["port"]
            .as_u64()
            .expect("port") as u16;
        WebhookReceiver {
            child,
            stdin,
            lines,
            port,
        }
    }

    /// Answers `status` from now on (503: the app is down).
    pub async fn answer(&mut self, status: u16) {
        self.stdin
            .write_all(format!("{status}\n").as_bytes())
            .await
            .expect("receiver stdin");
        self.lines.wait(|v| v["status"] == status).await;
    }

    /// `http://127.0.0.1:PORT/pusher`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/pusher", self.port)
    }

    /// Every event received and accepted (2xx) so far, in order, each
    /// checked: the request was valid under the app's secret and invalid
    /// under another.
    pub fn events(&self) -> Vec<Value> {
        let mut events = Vec::new();
        let answered = |v: &Value| {
            v["answered"]
                .as_u64()
                .is_some_and(|s| (200..300).contains(&s))
        };
        for line in self.lines.all().iter().filter(|v| answered(v)) {
            assert_eq!(line["valid"], true, "pusher.webhook().isValid(): {line}");
            assert_eq!(line["invalidWithWrongSecret"], true, "{line}");
            events.extend(line["events"].as_array().cloned().unwrap_or_default());
        }
        events
    }

    /// Stops it (the port is free again).
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
