//! The integration guide's examples, run for real. docs/integration.md shows
//! the files under examples/integration/ verbatim (checked here, so the two
//! cannot drift apart); the Python and Node publishers publish to a real
//! Redis read by a real crier; the browser snippets run in a real headless
//! Chromium against crier on another origin, through a TCP proxy the test
//! can cut, while Redis loses its pub/sub connections, an instance drains and
//! the user's session is logged out and back in.
//!
//! Needs python3 with `redis` (`pip install -r examples/integration/requirements.txt`),
//! node with `npm ci --prefix examples/integration` done, and `chromium`.
//! Without them these tests fail and say what to install.

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use std::convert::Infallible;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::crier::{test_config, Instance, WAIT};
use common::redis::RedisServer;
use common::ws::WsClient;
use common::{check_runs, repo, unique};
use crier::config::{ChannelRule, Config, HistoryRule, JwtConfig, SessionConfig, Subscribe};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// Files shown in docs/integration.md, each under a `<!-- file: PATH -->` marker.
const SHOWN: &[&str] = &[
    "examples/integration/publish.py",
    "examples/integration/publish.mjs",
    "examples/integration/publish.go",
    "examples/integration/publish.rb",
    "examples/integration/publish.php",
    "examples/integration/browser/sse.js",
    "examples/integration/browser/ws.js",
    "examples/integration/events.py",
    "examples/integration/events.mjs",
];

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// Every `<!-- MARKER -->` comment of `markdown` that is followed by a fenced
/// code block, with the block's code (its indentation removed): markers are
/// `file: PATH` (the block is that file), `run: NAME` (a shell command run
/// below) and `check-config` (a TOML configuration crier must accept).
fn marked_blocks(markdown: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut lines = markdown.lines();
    while let Some(line) = lines.next() {
        let Some(marker) = line
            .trim()
            .strip_prefix("<!--")
            .and_then(|rest| rest.strip_suffix("-->"))
        else {
            continue;
        };
        let marker = marker.trim().to_string();
        if !(marker.starts_with("file:") || marker.starts_with("run:") || marker == "check-config")
        {
            continue;
        }
        let fence = lines
            .by_ref()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default();
        assert!(
            fence.trim_start().starts_with("```"),
            "docs/integration.md: `<!-- {marker} -->` must be followed by a fenced code block, found {fence:?}"
        );
        let indent = fence.len() - fence.trim_start().len();
        let mut code = String::new();
        for l in lines.by_ref().take_while(|l| l.trim() != "```") {
            code.push_str(l.get(indent..).unwrap_or(l.trim_start()));
            code.push('\n');
        }
        blocks.push((marker, code));
    }
    blocks
}

fn guide_blocks() -> Vec<(String, String)> {
    marked_blocks(&read("docs/integration.md"))
}

/// The code of the block marked `<!-- MARKER -->`.
fn guide_block(marker: &str) -> String {
    guide_blocks()
        .into_iter()
        .find_map(|(m, code)| (m == marker).then_some(code))
        .unwrap_or_else(|| panic!("docs/integration.md has no block marked `<!-- {marker} -->`"))
}

#[test]
fn the_guide_shows_the_example_files_verbatim() {
    let blocks = guide_blocks();
    let shown: Vec<(&str, &String)> = blocks
        .iter()
        .filter_map(|(m, code)| Some((m.strip_prefix("file:")?.trim(), code)))
        .collect();
    for (path, code) in &shown {
        let file = read(path);
        if **code != file {
            let line = code
                .lines()
                .zip(file.lines())
                .position(|(a, b)| a != b)
                .map_or_else(
                    || "one is a prefix of the other".to_string(),
                    |n| format!("first difference at line {}", n + 1),
                );
            panic!("docs/integration.md shows {path} differently from the file ({line}): copy the file into the doc");
        }
    }
    for path in SHOWN {
        assert!(
            shown.iter().any(|(p, _)| p == path),
            "docs/integration.md does not show {path} under a `<!-- file: {path} -->` marker"
        );
    }
}

/// The guide's configuration snippets are configurations crier accepts.
#[test]
fn the_guide_configurations_pass_check_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let configs: Vec<String> = guide_blocks()
        .into_iter()
        .filter_map(|(m, code)| (m == "check-config").then_some(code))
        .collect();
    assert!(configs.len() >= 3, "the guide's TOML snippets are marked");
    for (n, toml) in configs.iter().enumerate() {
        let path = dir.path().join(format!("crier-{n}.toml"));
        std::fs::write(&path, toml).expect("write config");
        let mut check = std::process::Command::new(env!("CARGO_BIN_EXE_crier"));
        for key in common::crier::inherited_crier_vars() {
            check.env_remove(key);
        }
        let output = check
            .arg("check-config")
            .arg("--config")
            .arg(&path)
            .output()
            .expect("run crier check-config");
        assert!(
            output.status.success(),
            "crier check-config refused the guide's snippet:\n{toml}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

// ---------------------------------------------------------------------------
// Publishers: the docs' Python and Node scripts against Redis + crier.

/// A publisher script publishes a plain PUBLISH and a `crier_publish` on a
/// history channel, under crier's `channel_prefix`; a WebSocket client of
/// crier gets both, the second with the id the script printed.
async fn publisher_reaches_a_websocket_client(command: &[&str]) {
    let redis = RedisServer::start().await;
    let mut config = test_config(Some(redis.url()));
    config.redis.channel_prefix = "app1:".into();
    config.channels = vec![rule("orders:*", Subscribe::Anyone, true)];
    let crier = Instance::start(config).await;
    let channel = unique("orders:example");

    let mut client = WsClient::connect(&crier.ws("/ws")).await;
    let reply = client.subscribe(&channel, 1).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");

    let output = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(command[0])
            .args(&command[1..])
            .current_dir(repo("."))
            .env("REDIS_URL", redis.url())
            .env("CHANNEL", &channel)
            .env("CHANNEL_PREFIX", "app1:")
            .env("PUBLISH_FUNCTION", "crier_publish_app1")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{command:?} did not finish within 60 s"))
    .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{command:?} failed with {}:\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("PUBLISH reached 1 crier instance(s)"),
        "the plain PUBLISH went to crier's prefixed channel: {stdout}"
    );
    let printed_id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("crier_publish id: "))
        .unwrap_or_else(|| panic!("no id printed: {stdout}"))
        .trim()
        .to_string();

    let plain = client.recv_type("message", WAIT).await;
    assert_eq!(
        plain,
        json!({"type": "message", "channel": channel, "event": "order.created",
               "data": {"type": "order.created", "id": 1}}),
        "the plain PUBLISH: no id"
    );
    let kept = client.recv_type("message", WAIT).await;
    assert_eq!(kept["data"], json!({"type": "order.created", "id": 2}));
    assert_eq!(kept["event"], "order.created");
    assert_eq!(
        kept["id"].as_str(),
        Some(printed_id.as_str()),
        "crier_publish: the envelope carries the id the script printed"
    );
}

#[tokio::test]
async fn python_publisher_reaches_crier() {
    check_runs(
        "python3",
        &["-c", "import redis"],
        "python3 with the `redis` package is needed: pip install -r examples/integration/requirements.txt",
    );
    publisher_reaches_a_websocket_client(&["python3", "examples/integration/publish.py"]).await;
}

#[tokio::test]
async fn node_publisher_reaches_crier() {
    check_runs(
        "node",
        &["--version"],
        "node is needed to run examples/integration/publish.mjs",
    );
    assert!(
        repo("examples/integration/node_modules/ioredis/package.json").exists(),
        "ioredis is not installed for the examples: npm ci --prefix examples/integration"
    );
    publisher_reaches_a_websocket_client(&["node", "examples/integration/publish.mjs"]).await;
}

// ---------------------------------------------------------------------------
// The guide's shell commands: curl publish / consume / resume, crier publish.

/// A shell command of the guide, running with its stdout read line by line.
struct Shell {
    child: Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    seen: Vec<String>,
}

impl Shell {
    fn spawn(code: &str, env: &[(&str, String)]) -> Shell {
        let mut cmd = Command::new("sh");
        for key in common::crier::inherited_crier_vars() {
            cmd.env_remove(key);
        }
        cmd.arg("-c")
            .arg(code)
            .current_dir(repo("."))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("run sh");
        let stdout = child.stdout.take().expect("stdout");
        Shell {
            child,
            lines: tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout)),
            seen: Vec::new(),
        }
    }

    /// Reads lines until `done` holds for everything read so far.
    async fn read_until(&mut self, what: &str, done: impl Fn(&[String]) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done(&self.seen) {
            match tokio::time::timeout_at(deadline, self.lines.next_line()).await {
                Ok(Ok(Some(line))) => self.seen.push(line),
                other => panic!(
                    "waiting for {what}: {other:?}; output so far: {:?}",
                    self.seen
                ),
            }
        }
    }

    /// The envelopes of the `data:` lines read so far.
    fn messages(&self) -> Vec<Value> {
        self.seen
            .iter()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect()
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// `curl -N` consumes, `curl` and `crier publish` publish through the HTTP
/// API, and `curl` with `Last-Event-ID` resumes: the commands as the guide
/// shows them, against a real crier and Redis.
#[tokio::test]
async fn the_guide_curl_commands_publish_consume_and_resume() {
    check_runs(
        "curl",
        &["--version"],
        "curl is needed to run the guide's commands",
    );
    let api_key = "k-2f7c0d8e1a9b4c36";
    let redis = RedisServer::start().await;
    let mut config = test_config(Some(redis.url()));
    config.channels = vec![rule("orders:*", Subscribe::Anyone, true)];
    config.publish.api_keys = vec![api_key.into()];
    let crier = Instance::start(config).await;
    let bin = Path::new(env!("CARGO_BIN_EXE_crier"))
        .parent()
        .expect("bin dir")
        .display()
        .to_string();
    let env = vec![
        ("CRIER", crier.http("")),
        ("CRIER_API_KEY", api_key.to_string()),
        (
            "PATH",
            format!("{bin}:{}", std::env::var("PATH").unwrap_or_default()),
        ),
    ];
    let publish = || async {
        let mut sh = Command::new("sh");
        for key in common::crier::inherited_crier_vars() {
            sh.env_remove(key);
        }
        let output = sh
            .arg("-c")
            .arg(guide_block("run: publish-http"))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run sh");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        assert!(output.status.success(), "{stdout}\n{stderr}");
        let answer: Value = serde_json::from_str(&stdout).unwrap_or_default();
        assert!(
            answer["ok"] == true && answer["id"].is_string(),
            "curl: {stdout}"
        );
        assert!(
            stderr.contains("crier: published with history, id "),
            "crier publish: {stderr}"
        );
    };
    let two_events = |lines: &[String]| {
        lines.iter().filter(|l| l.starts_with("data: ")).count() >= 2
            && lines.last().is_some_and(|l| l.starts_with("id: "))
    };

    let mut consumer = Shell::spawn(&guide_block("run: consume-sse"), &env);
    consumer
        .read_until("the stream's first block", |l| {
            l.first().is_some_and(|l| l.starts_with("retry: "))
        })
        .await;
    publish().await;
    consumer.read_until("the two events", two_events).await;
    let first = consumer.messages();
    let events: Vec<&str> = consumer
        .seen
        .iter()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(events, ["order.paid", "order.shipped"]);
    assert_eq!(first[0]["data"], json!({"type": "order.paid", "id": 3}));
    let cursor = consumer
        .seen
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("id: "))
        .expect("a cursor")
        .to_string();
    drop(consumer);

    // Published while nobody listens; the resume gets exactly these.
    publish().await;
    let mut env = env.clone();
    env.push(("CURSOR", cursor));
    let mut resumed = Shell::spawn(&guide_block("run: resume-sse"), &env);
    resumed
        .read_until("the two missed events", two_events)
        .await;
    let missed = resumed.messages();
    assert_eq!(missed.len(), 2, "{:?}", resumed.seen);
    for m in &missed {
        assert!(
            !first.iter().any(|f| f["id"] == m["id"]),
            "only the events published after the cursor: {missed:?}"
        );
    }
}

fn rule(pattern: &str, subscribe: Subscribe, history: bool) -> ChannelRule {
    ChannelRule {
        pattern: pattern.into(),
        subscribe,
        history: history.then_some(HistoryRule {
            size: 1000,
            ttl: Duration::from_secs(3600),
        }),
        event_field: None,
        presence: false,
    }
}

// ---------------------------------------------------------------------------
// The express-session recipe (docs/authentication.md) with today's packages.

/// The recipe's code block in docs/authentication.md is the runnable
/// example, line for line (the example adds a login route and `listen`).
#[test]
fn the_session_recipe_is_the_runnable_example() {
    let guide = read("docs/authentication.md");
    let start = guide
        .find("The Node side (")
        .expect("the express-session recipe in docs/authentication.md");
    let block = guide[start..]
        .split("```js\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("its js block");
    let example = read("examples/integration/session-app.mjs");
    let mut rest = example.as_str();
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let at = rest.find(line).unwrap_or_else(|| {
            panic!("docs/authentication.md's recipe line {line:?} is not in examples/integration/session-app.mjs (in that order)")
        });
        rest = &rest[at + line.len()..];
    }
}

/// The recipe runs with the pinned connect-redis, node-redis, express and
/// passport: a user it logs in is recognised by crier from the cookie.
#[tokio::test]
async fn express_session_recipe_logs_in_a_user_crier_recognises() {
    check_runs(
        "node",
        &["--version"],
        "node is needed to run examples/integration/session-app.mjs",
    );
    assert!(
        repo("examples/integration/node_modules/connect-redis/package.json").exists(),
        "connect-redis is not installed for the examples: npm ci --prefix examples/integration"
    );
    let redis = RedisServer::start().await;
    let mut config = test_config(Some(redis.url()));
    config.channels = vec![rule("user:{user}", Subscribe::User, false)];
    config.auth.session = Some(SessionConfig {
        secrets: vec![SESSION_SECRET.into()],
        ..SessionConfig::default()
    });
    let crier = Instance::start(config).await;

    let mut app = Command::new("node")
        .arg("examples/integration/session-app.mjs")
        .current_dir(repo("."))
        .env("REDIS_URL", redis.url())
        .env("PORT", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("run node");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
        app.stdout.take().expect("stdout"),
    ));
    let port = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("read the app's output") {
            if let Some(port) = line.strip_prefix("listening on ") {
                return port.trim().to_string();
            }
        }
        panic!("the app exited before listening")
    })
    .await
    .expect("the app listens within 30 s");

    // The login, as it reaches the app through its TLS-ending proxy.
    let (response, _conn) = common::send_request(
        Method::GET,
        &format!("http://127.0.0.1:{port}/login"),
        &[("x-forwarded-proto", "https")],
        Bytes::new(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let set_cookie = response.headers()["set-cookie"]
        .to_str()
        .expect("ascii")
        .to_string();
    let cookie = set_cookie
        .split(';')
        .next()
        .filter(|c| c.starts_with("connect.sid="))
        .unwrap_or_else(|| panic!("no session cookie: {set_cookie}"));

    let user = crier.sse_url(&["user:42"]);
    let refused = common::sse::connect(&user, &[]).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let mut events = common::sse::connect(&user, &[("cookie", cookie)])
        .await
        .into_events();
    redis
        .publish("user:42", r#"{"type":"hello","to":42}"#)
        .await;
    let e = events.next_message(WAIT).await.expect("open");
    assert_eq!(e.json()["data"]["to"], 42);
    drop(app);
}

// ---------------------------------------------------------------------------
// Browser snippets in a real Chromium.

const SESSION_SECRET: &str = "keyboard cat";
const JWT_SECRET: &str = "integration-guide-test-secret-32-bytes!";
const USER: u64 = 42;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// The cookie value express-session sets for session `id`.
fn express_cookie_value(id: &str) -> String {
    common::browser::express_cookie_value(id, SESSION_SECRET)
}

/// What connect-redis stores for a passport login; ends in 30 minutes, which
/// is within `expiring_notice` (1 h), so crier warns at once.
fn session_json() -> String {
    let expires = SystemTime::now() + Duration::from_secs(1800);
    json!({
        "cookie": {"expires": humantime::format_rfc3339_millis(expires).to_string(),
                   "httpOnly": true, "path": "/"},
        "passport": {"user": USER}
    })
    .to_string()
}

/// The app's token endpoint: the first token ends within `expiring_notice`
/// (so crier asks for a refresh at once), later ones in 3 hours.
fn mint_token(n: u64) -> String {
    let exp = if n == 0 {
        now() + 1800
    } else {
        now() + 3 * 3600
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": USER.to_string(), "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("sign")
}

/// A TCP proxy in front of crier, standing for the network: it can cut every
/// connection and refuse new ones (an outage), and switch to another crier.
struct Proxy {
    port: u16,
    target: Arc<Mutex<String>>,
    down: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
}

impl Proxy {
    async fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let target = Arc::new(Mutex::new(target.to_string()));
        let down = Arc::new(AtomicBool::new(false));
        let (cut, _) = watch::channel(0u64);
        let proxy = Proxy {
            port,
            target: target.clone(),
            down: down.clone(),
            cut: cut.clone(),
        };
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut cut_rx = cut.subscribe();
                if down.load(Ordering::SeqCst) {
                    continue; // dropped: connection reset
                }
                let addr = target.lock().expect("target").clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&addr).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        proxy
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Cuts every connection and refuses new ones until `up`.
    fn down(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    fn up(&self) {
        self.down.store(false, Ordering::SeqCst);
    }

    fn switch_to(&self, addr: &str) {
        *self.target.lock().expect("target") = addr.to_string();
    }
}

/// The test page: the two snippets, loaded as files, pointed at crier on
/// another origin, reporting everything they see to /results.
fn page(crier: &str, channels: &[&str]) -> String {
    let config = json!({"crier": crier, "channels": channels});
    format!(
        r#"<!doctype html><html><body>
<script src="/sse.js"></script>
<script src="/ws.js"></script>
<script>
const config = {config};
const state = {{
  sse: {{ seen: {{}}, refetch: [], expiring: [], expired: 0, opens: 0, reconnecting: 0 }},
  ws: {{ seen: {{}}, refetch: [], frames: [], reconnecting: [], expired: 0 }},
  tokens: 0, errors: [], warnings: [],
}};
window.onerror = (message) => state.errors.push(String(message));
window.onunhandledrejection = (e) => state.errors.push(String(e.reason));
const warn = console.warn;
console.warn = (...args) => {{ state.warnings.push(args.map(String).join(" ")); warn(...args); }};
const record = (t) => (msg) => (t.seen[msg.channel] ||= []).push(msg.data.n);

window.crierSSE(config.crier + "/sse", config.channels, {{
  events: ["order.created", "notice"],
  message: record(state.sse),
  refetch: (channel) => state.sse.refetch.push(channel),
  expiring: (inSecs) => state.sse.expiring.push(inSecs),
  expired: () => state.sse.expired++,
  open: () => state.sse.opens++,
  reconnecting: () => state.sse.reconnecting++,
}});

window.crierWS(config.crier.replace(/^http/, "ws") + "/ws", config.channels, {{
  message: record(state.ws),
  refetch: (channel) => state.ws.refetch.push(channel),
  token: async () => {{
    state.tokens++;
    return (await (await fetch("/token")).json()).token;
  }},
  expired: () => state.ws.expired++,
  frame: (m) => {{
    if (m.type !== "message") state.ws.frames.push(
      {{ type: m.type, id: m.id, channel: m.channel, recovered: m.recovered, after_ms: m.after_ms }});
  }},
  reconnecting: (r) => state.ws.reconnecting.push(r),
}});

setInterval(() => fetch("/results", {{ method: "POST", body: JSON.stringify(state) }}), 100);
</script></body></html>"#
    )
}

/// Serves the page (setting the app's session cookie, as the app's login
/// would), the snippets, the app's token endpoint, and collects reports.
async fn page_server(
    listener: TcpListener,
    page: String,
    cookie: String,
) -> (watch::Receiver<Value>, Arc<AtomicU64>) {
    let (tx, rx) = watch::channel(Value::Null);
    let tx = Arc::new(tx);
    let tokens = Arc::new(AtomicU64::new(0));
    let files = Arc::new((
        page,
        read("examples/integration/browser/sse.js"),
        read("examples/integration/browser/ws.js"),
        cookie,
    ));
    let minted = tokens.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (tx, files, minted) = (tx.clone(), files.clone(), minted.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let (tx, files, minted) = (tx.clone(), files.clone(), minted.clone());
                    async move {
                        let (page, sse_js, ws_js, cookie) = &*files;
                        let path = req.uri().path().to_string();
                        let mut response = Response::builder();
                        let body = match (req.method().clone(), path.as_str()) {
                            (Method::POST, "/results") => {
                                let bytes = req.into_body().collect().await.map(|b| b.to_bytes());
                                if let Ok(v) = serde_json::from_slice(&bytes.unwrap_or_default()) {
                                    tx.send_replace(v);
                                }
                                String::new()
                            }
                            (_, "/") => {
                                response = response.header("content-type", "text/html").header(
                                    "set-cookie",
                                    format!("connect.sid={cookie}; Path=/; HttpOnly; SameSite=Lax"),
                                );
                                page.clone()
                            }
                            (_, "/sse.js") => {
                                response =
                                    response.header("content-type", "application/javascript");
                                sse_js.clone()
                            }
                            (_, "/ws.js") => {
                                response =
                                    response.header("content-type", "application/javascript");
                                ws_js.clone()
                            }
                            (_, "/token") => {
                                let n = minted.fetch_add(1, Ordering::SeqCst);
                                response = response.header("content-type", "application/json");
                                json!({"token": mint_token(n)}).to_string()
                            }
                            _ => {
                                response = response.status(StatusCode::NOT_FOUND);
                                String::new()
                            }
                        };
                        Ok::<_, Infallible>(
                            response
                                .body(Full::new(Bytes::from(body)))
                                .expect("response"),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (rx, tokens)
}

/// Waits until the page's report satisfies `done`; panics with the report.
async fn until(results: &mut watch::Receiver<Value>, what: &str, done: impl Fn(&Value) -> bool) {
    let reached = tokio::time::timeout(Duration::from_secs(30), results.wait_for(|v| done(v)))
        .await
        .is_ok();
    let report = results.borrow().clone();
    assert!(
        reached,
        "timed out waiting for: {what}\npage report: {report}"
    );
}

fn seen(report: &Value, transport: &str, channel: &str) -> Vec<u64> {
    report[transport]["seen"][channel]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

fn count(list: &Value, matches: impl Fn(&Value) -> bool) -> usize {
    list.as_array()
        .map_or(0, |a| a.iter().filter(|v| matches(v)).count())
}

fn refetched(report: &Value, transport: &str, channel: &str) -> usize {
    count(&report[transport]["refetch"], |c| c == channel)
}

fn frames(report: &Value, ty: &str) -> usize {
    count(&report["ws"]["frames"], |f| f["type"] == ty)
}

#[tokio::test]
async fn browser_snippets_resume_refetch_and_refresh_in_chromium() {
    let installed = std::process::Command::new("sh")
        .args(["-c", "command -v chromium"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        installed,
        "chromium is needed to run the browser snippets (apt-get install chromium; bash .ci/run installs it)"
    );

    let redis = RedisServer::start().await;
    let page_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let page_port = page_listener.local_addr().expect("addr").port();

    // crier on another origin than the page: the cookie only reaches it with
    // withCredentials, and only because the page's origin is allowed.
    let mut config: Config = test_config(Some(redis.url()));
    config.allowed_origins = vec![format!("http://127.0.0.1:{page_port}")];
    config.channels = vec![
        rule("hist:*", Subscribe::Anyone, true),
        rule("public:*", Subscribe::Anyone, false),
        rule("user:{user}", Subscribe::User, true),
    ];
    config.auth.session = Some(SessionConfig {
        secrets: vec![SESSION_SECRET.into()],
        recheck: Duration::from_millis(300),
        ..SessionConfig::default()
    });
    config.auth.jwt = Some(JwtConfig {
        secret: Some(JWT_SECRET.into()),
        ..JwtConfig::default()
    });
    config.auth.expiring_notice = Duration::from_secs(3600);
    config.sse.retry = Duration::from_millis(300);
    let a = Instance::start(config.clone()).await;
    let proxy = Proxy::start(&a.addr).await;

    let session_id = unique("sid").replace(':', "-");
    let session_key = format!("sess:{session_id}");
    redis.cli(&["SET", &session_key, &session_json()]).await;
    let (hist, public, user) = (
        unique("hist:orders"),
        unique("public:news"),
        format!("user:{USER}"),
    );
    let channels = [hist.as_str(), public.as_str(), user.as_str()];
    let (mut results, tokens) = page_server(
        page_listener,
        page(&proxy.url(), &channels),
        express_cookie_value(&session_id),
    )
    .await;

    let profile = tempfile::tempdir().expect("profile");
    let chromium =
        common::browser::chromium(&format!("http://127.0.0.1:{page_port}/"), profile.path());

    // Publishes n on the three channels: history ones through crier_publish,
    // the public one with a plain PUBLISH and no "type" (a plain `message`).
    let publish = |n: u64| {
        let (hist, public, user) = (hist.clone(), public.clone(), user.clone());
        let redis = &redis;
        async move {
            let order = format!(r#"{{"type":"order.created","n":{n}}}"#);
            assert!(redis.fcall_publish(&hist, &order).await.is_some());
            let notice = format!(r#"{{"type":"notice","n":{n}}}"#);
            assert!(redis.fcall_publish(&user, &notice).await.is_some());
            redis.publish(&public, &format!(r#"{{"n":{n}}}"#)).await;
        }
    };
    let all = |report: &Value, transport: &str, hist_n: &[u64], public_n: &[u64]| {
        seen(report, transport, &hist) == hist_n
            && seen(report, transport, &user) == hist_n
            && seen(report, transport, &public) == public_n
    };

    // 1. Both connect with the session cookie (user:42 needs it), and are
    //    warned that it expires; the WebSocket signs in with a token and
    //    refreshes it when warned.
    until(
        &mut results,
        "both connected, warned, token refreshed",
        |r| {
            r["sse"]["opens"].as_u64() >= Some(1)
                && frames(r, "subscribed") >= 3
                && !r["sse"]["expiring"].as_array().is_none_or(Vec::is_empty)
                && count(&r["ws"]["frames"], |f| {
                    f["type"] == "authenticated" && f["id"] == "auth refresh"
                }) >= 1
        },
    )
    .await;
    assert!(tokens.load(Ordering::SeqCst) >= 2, "login + refresh tokens");
    assert_eq!(
        a.metric("crier_auth_failures_total{reason=\"user_mismatch\"}")
            .await,
        0.0
    );

    // 2. Live delivery: named events and plain messages, on both.
    publish(1).await;
    until(&mut results, "n=1 everywhere", |r| {
        all(r, "sse", &[1], &[1]) && all(r, "ws", &[1], &[1])
    })
    .await;

    // 3. crier loses its Redis pub/sub connection: the channel without history
    //    gets a `gap` on the open connections, and the snippets refetch it.
    let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    assert_eq!(killed.trim(), "1", "crier's pub/sub connection");
    until(&mut results, "refetch after the Redis reconnect", |r| {
        refetched(r, "sse", &public) == 1 && refetched(r, "ws", &public) == 1
    })
    .await;

    // 4. The network drops while events are published: on reconnecting, the
    //    history channels are replayed (SSE: Last-Event-ID; WebSocket: since)
    //    and the other one is refetched.
    let reconnects = |r: &Value| r["ws"]["reconnecting"].as_array().map_or(0, Vec::len);
    proxy.down();
    until(&mut results, "the WebSocket noticed", |r| {
        reconnects(r) >= 1
    })
    .await;
    publish(2).await;
    proxy.up();
    until(&mut results, "n=2 replayed after the outage", |r| {
        all(r, "sse", &[1, 2], &[1])
            && all(r, "ws", &[1, 2], &[1])
            && refetched(r, "sse", &public) == 2
            && refetched(r, "ws", &public) == 2
    })
    .await;
    let report = results.borrow().clone();
    assert_eq!(
        count(&report["ws"]["frames"], |f| f["type"] == "subscribed"
            && f["recovered"] == true),
        2,
        "the WebSocket resumed both history channels with `since`: {report}"
    );
    assert_eq!(report["ws"]["reconnecting"][0]["code"], 1006);

    // 5. A deploy: instance A drains (reconnect + 1012 after `after_ms`), the
    //    proxy now leads to instance B, and everything resumes there.
    let b = Instance::start(config.clone()).await;
    proxy.switch_to(&b.addr);
    let before = reconnects(&results.borrow());
    let draining = tokio::spawn(a.shutdown());
    until(&mut results, "the WebSocket was asked to reconnect", |r| {
        reconnects(r) > before
    })
    .await;
    b.wait_metric("crier_subscriptions", 6.0).await;
    draining.await.expect("A stopped");
    let report = results.borrow().clone();
    let drained = &report["ws"]["reconnecting"][before];
    let asked = report["ws"]["frames"]
        .as_array()
        .and_then(|f| f.iter().rev().find(|f| f["type"] == "reconnect"))
        .map(|f| f["after_ms"].clone());
    assert_eq!(drained["code"], 1012, "{report}");
    assert_eq!(
        Some(drained["delay"].clone()),
        asked,
        "the WebSocket waited as long as the draining instance asked"
    );
    publish(3).await;
    until(&mut results, "n=3 through instance B", |r| {
        all(r, "sse", &[1, 2, 3], &[1, 3]) && all(r, "ws", &[1, 2, 3], &[1, 3])
    })
    .await;

    // 6. Logout: the SSE stream gets `expired` and ends; crier refuses the
    //    browser's reconnect (401), so the snippet reopens with a backoff and
    //    ?last_event_id=. Log back in: the stream resumes where it was. The
    //    WebSocket switched to its token and is not affected.
    redis.cli(&["DEL", &session_key]).await;
    until(&mut results, "SSE told expired, then refused", |r| {
        r["sse"]["expired"].as_u64() >= Some(1) && r["sse"]["reconnecting"].as_u64() >= Some(1)
    })
    .await;
    publish(4).await;
    redis.cli(&["SET", &session_key, &session_json()]).await;
    until(&mut results, "n=4 after logging back in", |r| {
        all(r, "sse", &[1, 2, 3, 4], &[1, 3])
            && all(r, "ws", &[1, 2, 3, 4], &[1, 3, 4])
            && refetched(r, "sse", &public) == 4
    })
    .await;

    let report = results.borrow().clone();
    assert_eq!(report["errors"], json!([]), "no script error: {report}");
    assert_eq!(report["warnings"], json!([]), "no crier error: {report}");
    assert_eq!(report["ws"]["expired"], 0, "{report}");
    drop((chromium, proxy, b));
}
