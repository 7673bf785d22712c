//! The real `crier` binary: SIGTERM drain, configuration errors and exit
//! codes, `check-config`, `--dev`, and `crier publish`.

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::crier::{Process, WAIT};
use common::redis::RedisServer;
use common::sse;
use common::unique;
use common::ws::WsClient;
use http::StatusCode;
use serde_json::json;

const CONFIG: &str = r#"
[[channels]]
pattern = "public:*"
subscribe = "anyone"

[[channels]]
pattern = "hist:*"
subscribe = "anyone"
history = { size = 100, ttl = "10m" }

[shutdown]
grace = "1s"
drain = "2s"
"#;

fn write_config(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("crier.toml");
    std::fs::write(&path, text).expect("write config");
    path.to_string_lossy().into_owned()
}

/// Acceptance 7: SIGTERM → not ready at once, still serving during the
/// grace, then `reconnect` + 1012 for WebSocket and `retry:` + end for SSE,
/// and exit 0 within grace + drain + 2 s.
#[tokio::test]
async fn sigterm_drains_clients_and_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(&dir, CONFIG);
    let key = "a-publish-key-0123456789";
    let mut crier = Process::start(
        &["--config", &config],
        &[("CRIER_PUBLISH__API_KEYS", &format!("[{key}]"))],
    )
    .await;
    let channel = unique("public:drain");
    let (status, _) = common::http_get(&crier.http("/readyz")).await;
    assert_eq!(status, StatusCode::OK);

    let mut ws = WsClient::connect(&format!("ws://{}/ws?channel={channel}", crier.addr)).await;
    ws.recv_type("subscribed", WAIT).await;
    let mut events = sse::connect(&crier.http(&format!("/sse?channel={channel}")), &[])
        .await
        .into_events();

    crier.sigterm().await;
    let readyz = crier.http("/readyz");
    common::eventually("/readyz 503 after SIGTERM", WAIT, || {
        let readyz = readyz.clone();
        async move { common::http_get(&readyz).await.0 == StatusCode::SERVICE_UNAVAILABLE }
    })
    .await;
    // Still serving during the grace period: a new HTTP connection is
    // accepted and existing streams still deliver, though /readyz says 503.
    let body = format!(r#"{{"channel":"{channel}","data":{{"during":"grace"}}}}"#);
    let (status, _) = common::http_post(
        &crier.http("/api/publish"),
        &[("authorization", &format!("Bearer {key}"))],
        &body,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        ws.recv_type("message", WAIT).await["data"]["during"],
        "grace"
    );
    let e = events.next_message(WAIT).await.expect("sse still open");
    assert_eq!(e.json()["data"]["during"], "grace");

    let (code, _, frames) = ws.expect_close(WAIT).await;
    assert_eq!(code, 1012);
    let reconnect = frames.last().expect("a frame before the close");
    assert_eq!(reconnect["type"], "reconnect");
    assert!(reconnect["after_ms"].as_u64().is_some(), "{reconnect}");

    let tail = events.expect_end(WAIT).await;
    let last = tail.last().expect("a last event before the end");
    assert!(last.retry.is_some(), "SSE ends with a retry: {last:?}");

    let status = tokio::time::timeout(Duration::from_secs(1 + 2 + 2), crier.child.wait())
        .await
        .expect("exited within grace + drain + 2s")
        .expect("wait");
    assert_eq!(status.code(), Some(0), "{}", crier.log.lock().expect("log"));
}

async fn run_crier(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = common::crier::crier_command();
    cmd.args(args).kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("crier exits")
        .expect("run crier");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Acceptance 8: bad configuration exits 64 naming the field.
#[tokio::test]
async fn bad_config_exits_64_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("[limits]\nqueue_sise = 5\n", "queue_sise"),
        ("[redis]\nurl = \"http://localhost:6379\"\n", "redis.url"),
        ("[redis]\nurl = \"not a url\"\n", "redis.url"),
        ("[shutdown]\ngrace = \"soon\"\n", "shutdown.grace"),
        ("listen = \"everywhere\"\n", "listen"),
        (
            "[[channels]]\npattern = \"a*b\"\nsubscribe = \"anyone\"\n",
            "channels[0]",
        ),
        (
            "[[channels]]\npattern = \"a\"\nsubscribe = \"everyone\"\n",
            "subscribe",
        ),
    ];
    for (text, field) in cases {
        let config = write_config(&dir, text);
        let (code, _, stderr) = run_crier(&["--config", &config], &[]).await;
        assert_eq!(code, Some(64), "{text}: {stderr}");
        assert!(stderr.contains(field), "{text}: {stderr}");
    }
    let (code, _, stderr) = run_crier(
        &["check-config"],
        &[("CRIER_SHUTDOWN__DRAIN", "10 fortnights")],
    )
    .await;
    assert_eq!(code, Some(64));
    assert!(stderr.contains("shutdown.drain"), "{stderr}");
    let (code, _, stderr) = run_crier(&["--config", "/nonexistent/crier.toml"], &[]).await;
    assert_eq!(code, Some(64));
    assert!(stderr.contains("/nonexistent/crier.toml"), "{stderr}");
}

/// Acceptance 8: `check-config` prints the effective config, secrets redacted.
#[tokio::test]
async fn check_config_prints_effective_config_without_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        &dir,
        "[redis]\nurl = \"redis://app:s3cret-pass@127.0.0.1:6379\"\n[publish]\napi_keys = [\"key-from-file-0123456789\"]\n",
    );
    let (code, stdout, _) = run_crier(
        &[
            "check-config",
            "--config",
            &config,
            "--listen",
            "127.0.0.1:9999",
        ],
        &[("CRIER_LIMITS__QUEUE_SIZE", "77")],
    )
    .await;
    assert_eq!(code, Some(0));
    assert!(!stdout.contains("s3cret-pass"), "{stdout}");
    assert!(!stdout.contains("key-from-file"), "{stdout}");
    assert!(stdout.contains("<redacted>"), "{stdout}");
    let shown: toml::Value = toml::from_str(&stdout).expect("prints TOML");
    assert_eq!(
        shown["listen"].as_str(),
        Some("127.0.0.1:9999"),
        "flag applied"
    );
    assert_eq!(
        shown["limits"]["queue_size"].as_integer(),
        Some(77),
        "env applied"
    );
}

/// Issue 9.3: without any `[[channels]]` rule every subscription is
/// refused; crier says so at start and `check-config` prints it too.
#[tokio::test]
async fn no_channel_rules_warns_at_start_and_in_check_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = write_config(&dir, "[shutdown]\ngrace = \"1s\"\n");
    let warning = "every subscription will be refused";

    let (code, stdout, stderr) = run_crier(&["check-config", "--config", &empty], &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("crier: warning: no [[channels]] rules: {warning}")),
        "{stderr}"
    );
    assert!(!stdout.contains(warning), "stdout stays TOML: {stdout}");

    let crier = Process::start(&["--config", &empty], &[]).await;
    let log = crier.log.clone();
    common::eventually("the start-up warning", WAIT, || {
        let log = log.clone();
        async move {
            log.lock().expect("log").lines().any(|line| {
                let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
                v["level"] == "WARN"
                    && v["fields"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains(warning))
            })
        }
    })
    .await;

    // With a rule, neither says anything (and with max_connections within
    // any open-file limit, see `a_hard_fd_limit_below_max_connections_is_a_warning`).
    let ruled = write_config(
        &dir,
        &format!("{CONFIG}\n[limits]\nmax_connections = 500\n"),
    );
    let (code, _, stderr) = run_crier(&["check-config", "--config", &ruled], &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

/// Acceptance 9: `crier --dev` serves the demo page, and a POSTed event
/// reaches an SSE client.
#[tokio::test]
async fn dev_mode_serves_demo_page_and_publishes_without_key() {
    let crier = Process::start(&["--dev"], &[]).await;
    let (status, page) = common::http_get(&crier.http("/")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("<html") && page.contains("/api/publish"),
        "demo page"
    );

    let channel = unique("anything:goes");
    let mut events = sse::connect(&crier.http(&format!("/sse?channel={channel}")), &[])
        .await
        .into_events();
    let body = json!({"channel": channel, "data": {"type": "greet", "text": "hi"}}).to_string();
    let (status, _) = common::http_post(
        &crier.http("/api/publish"),
        &[("content-type", "application/json")],
        &body,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let event = events.next_message(WAIT).await.expect("event");
    assert_eq!(event.event.as_deref(), Some("greet"));
    assert_eq!(event.json()["data"]["text"], "hi");
}

/// `crier publish` to Redis and through a running crier's API.
#[tokio::test]
async fn publish_command_reaches_subscribers() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(&dir, CONFIG);
    let key = "cli-publish-key-0123456789";
    let crier = Process::start(
        &["--config", &config, "--redis-url", &redis.url()],
        &[("CRIER_PUBLISH__API_KEYS", &format!("[{key}]"))],
    )
    .await;
    let channel = unique("public:cli");
    let mut ws = WsClient::connect(&format!("ws://{}/ws?channel={channel}", crier.addr)).await;
    ws.recv_type("subscribed", WAIT).await;

    let (code, _, stderr) = run_crier(
        &[
            "publish",
            &channel,
            r#"{"via":"redis"}"#,
            "--redis-url",
            &redis.url(),
        ],
        &[],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(ws.recv_type("message", WAIT).await["data"]["via"], "redis");

    let base = crier.http("");
    let (code, _, stderr) = run_crier(
        &["publish", &channel, "plain text", "--api", &base],
        &[("CRIER_API_KEY", key)],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(ws.recv_type("message", WAIT).await["data"], "plain text");

    // A history channel: the CLI goes through crier_publish too.
    let hist = unique("hist:cli");
    let mut hist_ws = WsClient::connect(&format!("ws://{}/ws?channel={hist}", crier.addr)).await;
    hist_ws.recv_type("subscribed", WAIT).await;
    let redis_url = redis.url();
    let args = [
        "publish",
        &hist,
        r#"{"n":1}"#,
        "--config",
        &config,
        "--redis-url",
        &redis_url,
    ];
    let (code, _, stderr) = run_crier(&args, &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let message = hist_ws.recv_type("message", WAIT).await;
    let id = message["id"].as_str().expect("history id in the envelope");
    assert!(stderr.contains(id), "the CLI prints the id: {stderr}");

    let (code, _, stderr) = run_crier(
        &[
            "publish",
            &channel,
            "x",
            "--api",
            &base,
            "--api-key",
            "wrong-key-0123456789",
        ],
        &[],
    )
    .await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("401"), "{stderr}");
}

/// The log lines of `crier` matching `pred`, parsed (JSON format).
fn log_lines(
    log: &std::sync::Mutex<String>,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    log.lock()
        .expect("log")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| pred(v))
        .collect()
}

fn message_is(v: &serde_json::Value, text: &str) -> bool {
    v["fields"]["message"] == text
}

/// Issue 9.9 (b, c): the start-up line names the Redis address (password
/// redacted), the number of channel rules and the auth modes; a Redis that
/// cannot be reached is named too.
#[tokio::test]
async fn startup_line_names_redis_rules_and_auth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        &dir,
        &format!(
            "{CONFIG}\n[auth.jwt]\nalgorithms = [\"HS256\"]\nsecret = \"a-jwt-secret-of-at-least-32-bytes!!\"\n"
        ),
    );
    // Nothing listens there: crier starts, then cannot connect.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("redis://app:pass-SECRET-42@127.0.0.1:{port}");
    let crier = Process::start(&["--config", &config, "--redis-url", &url], &[]).await;
    let log = crier.log.clone();
    common::eventually("a `cannot connect to redis` line", WAIT, || {
        let log = log.clone();
        async move { !log_lines(&log, |v| message_is(v, "cannot connect to redis")).is_empty() }
    })
    .await;
    let redacted = format!("redis://app:<redacted>@127.0.0.1:{port}");
    let start = log_lines(&log, |v| message_is(v, "crier listening"));
    let fields = &start.first().expect("a start-up line")["fields"];
    assert_eq!(fields["redis"], redacted.as_str(), "{fields}");
    assert_eq!(fields["channel_rules"], 2, "{fields}");
    assert_eq!(fields["auth"], "jwt", "{fields}");
    assert_eq!(fields["broker"], "redis", "{fields}");
    assert!(
        fields.get("demo").is_none(),
        "no demo outside dev: {fields}"
    );
    let refused = log_lines(&log, |v| message_is(v, "cannot connect to redis"));
    assert_eq!(
        refused[0]["fields"]["redis"],
        redacted.as_str(),
        "{refused:?}"
    );
    let all = log.lock().expect("log").clone();
    assert!(!all.contains("pass-SECRET-42"), "{all}");
}

/// Issue 9.9 (a, b): text logs written to a pipe carry no ANSI colour
/// codes; in dev mode the start-up line says where the demo page is.
#[tokio::test]
async fn text_logs_to_a_pipe_have_no_colour_and_name_the_demo_page() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = common::crier::crier_command()
        .args(["--dev", "--listen", "127.0.0.1:0", "--log-format", "text"])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn crier");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut seen = String::new();
    let line = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.expect("read log") {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("crier listening") {
                return line;
            }
        }
        panic!("crier exited before listening:\n{seen}")
    })
    .await
    .expect("a start-up line");
    assert!(!seen.contains('\u{1b}'), "ANSI escapes in a pipe: {seen:?}");
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .expect("addr= on the start-up line");
    assert!(
        line.contains(&format!("demo=\"http://{addr}/\"")),
        "demo URL: {line}"
    );
    assert!(
        line.contains("auth=\"none\"") || line.contains("auth=none"),
        "{line}"
    );
    // Prove the page is really there.
    let (status, page) = common::http_get(&format!("http://{addr}/")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("<html"));
}

/// Issue 9.9 (d): a WebSocket that signs in with an `auth` message logs
/// its user.
#[tokio::test]
async fn websocket_signed_in_with_auth_logs_its_user() {
    let secret = "a-jwt-secret-of-at-least-32-bytes!!";
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        &dir,
        &format!("{CONFIG}\n[auth.jwt]\nalgorithms = [\"HS256\"]\nsecret = \"{secret}\"\n"),
    );
    let crier = Process::start(&["--config", &config], &[("RUST_LOG", "crier=debug")]).await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "u-4242", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign");
    let mut ws = WsClient::connect(&format!("ws://{}/ws", crier.addr)).await;
    ws.send_json(json!({"type": "auth", "token": token, "id": 1}))
        .await;
    assert_eq!(ws.recv_type("authenticated", WAIT).await["user"], "u-4242");
    ws.close().await;
    let log = crier.log.clone();
    common::eventually("`websocket closed` with the user", WAIT, || {
        let log = log.clone();
        async move {
            log_lines(&log, |v| message_is(v, "websocket closed"))
                .iter()
                .any(|v| v["span"]["user"] == "u-4242")
        }
    })
    .await;
}

/// Issue 9.11: `crier publish --help` offers only what publishing uses;
/// serving flags before a command are refused; `crier --dev` still serves
/// (see `dev_mode_serves_demo_page_and_publishes_without_key`).
#[tokio::test]
async fn publish_help_offers_only_publishing_flags() {
    let (code, help, _) = run_crier(&["publish", "--help"], &[]).await;
    assert_eq!(code, Some(0));
    for flag in ["--api", "--api-key", "--config", "--redis-url"] {
        assert!(help.contains(flag), "{flag} missing: {help}");
    }
    for flag in ["--listen", "--dev", "--log-format"] {
        assert!(!help.contains(flag), "{flag} offered: {help}");
    }
    let (code, _, stderr) = run_crier(&["--dev", "publish", "c", "x"], &[]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("are for serving"), "{stderr}");
    // check-config still shows what serving flags would do.
    let (code, stdout, stderr) = run_crier(
        &["check-config", "--dev", "--listen", "127.0.0.1:9998"],
        &[],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let shown: toml::Value = toml::from_str(&stdout).expect("TOML");
    assert_eq!(shown["dev"].as_bool(), Some(true));
    assert_eq!(shown["listen"].as_str(), Some("127.0.0.1:9998"));
}

/// Issue 9.11: a missing or wrong API key says how to give one.
#[tokio::test]
async fn publish_without_a_key_says_how_to_give_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(&dir, CONFIG);
    let key = "cli-publish-key-0123456789";
    let crier = Process::start(
        &["--config", &config],
        &[("CRIER_PUBLISH__API_KEYS", &format!("[{key}]"))],
    )
    .await;
    let base = crier.http("");
    let (code, _, stderr) = run_crier(&["publish", "public:k", "x", "--api", &base], &[]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
    assert!(
        stderr.contains("--api-key KEY") && stderr.contains("CRIER_API_KEY"),
        "{stderr}"
    );
    let (code, _, stderr) = run_crier(
        &["publish", "public:k", "x", "--api", &base],
        &[("CRIER_API_KEY", "not-the-key-0123456789")],
    )
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("is not one of the server's publish.api_keys"),
        "{stderr}"
    );
}

/// Issue 9.11: `crier publish` without `--config` never replaces the
/// function library with one built from no rules; it says how to get one.
#[tokio::test]
async fn publish_without_config_never_loads_an_empty_library() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(&dir, CONFIG);
    let url = redis.url();
    let channel = unique("hist:lib");

    // A fresh Redis, no crier yet: no library, and none is loaded.
    let (code, _, stderr) = run_crier(&["publish", &channel, "{}", "--redis-url", &url], &[]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("start crier") && stderr.contains("--config"),
        "{stderr}"
    );
    let libraries = redis
        .cli(&["FUNCTION", "LIST", "LIBRARYNAME", "crier"])
        .await;
    assert_eq!(libraries.trim(), "", "nothing loaded: {libraries}");

    // With the service's configuration it loads the service's library...
    let (code, _, stderr) = run_crier(
        &[
            "publish",
            &channel,
            r#"{"n":1}"#,
            "--config",
            &config,
            "--redis-url",
            &url,
        ],
        &[],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("published with history"), "{stderr}");
    // ...which a later publish without configuration uses as it is.
    let (code, _, stderr) = run_crier(
        &["publish", &channel, r#"{"n":2}"#, "--redis-url", &url],
        &[],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("published with history"), "{stderr}");
}

/// Issue 9.13: `crier completions <shell>` prints a completion script
/// that knows the commands and flags, with no configuration needed.
#[tokio::test]
async fn completions_are_printed_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F _crier"),
        ("zsh", "#compdef crier"),
        ("fish", "complete -c crier"),
    ] {
        // A configuration error must not get in the way.
        let (code, script, stderr) = run_crier(
            &["completions", shell],
            &[("CRIER_LIMITS__QUEUE_SIZE", "lots")],
        )
        .await;
        assert_eq!(code, Some(0), "{shell}: {stderr}");
        assert!(script.contains(marker), "{shell}: {script}");
        for word in ["publish", "check-config", "redis-url"] {
            assert!(script.contains(word), "{shell} lacks {word}");
        }
    }
    let (code, _, stderr) = run_crier(&["completions", "cmd.exe"], &[]).await;
    assert_eq!(code, Some(2), "{stderr}");
}

/// Issue 9.13: in dev mode the first Ctrl-C says a second one exits now,
/// and the second does.
#[tokio::test]
async fn dev_mode_second_ctrl_c_exits_at_once() {
    let mut crier = Process::start(&["--dev"], &[]).await;
    let pid = crier.child.id().expect("running").to_string();
    let interrupt = || async {
        let status = tokio::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .await
            .expect("run kill");
        assert!(status.success());
    };
    interrupt().await;
    let log = crier.log.clone();
    common::eventually("the Ctrl-C hint", WAIT, || {
        let log = log.clone();
        async move {
            log.lock()
                .expect("log")
                .contains("press Ctrl-C again to exit now")
        }
    })
    .await;
    let started = std::time::Instant::now();
    interrupt().await;
    let status = tokio::time::timeout(WAIT, crier.child.wait())
        .await
        .expect("exits")
        .expect("wait");
    // The default grace alone is 5 s: exiting well before it is "at once".
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(status.success(), "{status:?}");
}

/// A TLS endpoint in front of `backend` (`127.0.0.1:PORT`), with a
/// certificate for `localhost` signed by a CA made here: returns its port
/// and the CA's PEM.
async fn tls_endpoint(backend: String) -> (u16, String) {
    let ca = common::pki::Ca::new("crier test CA");
    let acceptor = ca.leaf(&["localhost"]).acceptor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, backend) = (acceptor.clone(), backend.clone());
            tokio::spawn(async move {
                // A client that refuses the certificate ends here.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut upstream = tokio::net::TcpStream::connect(&backend)
                    .await
                    .expect("crier");
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    (port, ca.pem())
}

/// Issue 9.4: `crier publish --api https://…` trusts a CA given with
/// `--ca-file` or `SSL_CERT_FILE`, and refuses an unknown one.
#[tokio::test]
async fn publish_over_https_with_a_ca_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(&dir, CONFIG);
    let key = "https-publish-key-0123456789";
    let crier = Process::start(
        &["--config", &config],
        &[("CRIER_PUBLISH__API_KEYS", &format!("[{key}]"))],
    )
    .await;
    let (port, ca) = tls_endpoint(crier.addr.clone()).await;
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca).expect("write CA");
    let ca_file = ca_file.to_string_lossy().into_owned();
    let api = format!("https://localhost:{port}");
    let channel = unique("public:https");
    let mut ws = WsClient::connect(&format!("ws://{}/ws?channel={channel}", crier.addr)).await;
    ws.recv_type("subscribed", WAIT).await;
    let env = [("CRIER_API_KEY", key), ("SSL_CERT_FILE", "/nonexistent")];

    let (code, _, stderr) = run_crier(
        &[
            "publish",
            &channel,
            r#"{"via":"ca-file"}"#,
            "--api",
            &api,
            "--ca-file",
            &ca_file,
        ],
        &env,
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        ws.recv_type("message", WAIT).await["data"]["via"],
        "ca-file"
    );

    let (code, _, stderr) = run_crier(
        &[
            "publish",
            &channel,
            r#"{"via":"ssl-cert-file"}"#,
            "--api",
            &api,
        ],
        &[("CRIER_API_KEY", key), ("SSL_CERT_FILE", &ca_file)],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        ws.recv_type("message", WAIT).await["data"]["via"],
        "ssl-cert-file"
    );

    // Trusting only the system's roots: the test CA is unknown.
    let (code, _, stderr) = run_crier(
        &["publish", &channel, r#"{"via":"nothing"}"#, "--api", &api],
        &[("CRIER_API_KEY", key)],
    )
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    // (or, on a machine with no CA certificates at all, that there are none)
    assert!(
        stderr.contains("TLS with localhost") || stderr.contains("no trusted CA certificates"),
        "{stderr}"
    );
    assert!(
        stderr.to_lowercase().contains("certificate"),
        "says why: {stderr}"
    );
}

/// Issue 21.1: started with a soft open-file limit of 256 and a hard limit
/// of 20,000, crier raises its soft limit and holds 1,000 WebSockets.
#[tokio::test]
async fn soft_fd_limit_is_raised_to_hold_a_thousand_websockets() {
    // The test's own 1,000 client sockets.
    rlimit::increase_nofile_limit(4_000).expect("raise the test's open-file limit");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        &dir,
        &format!("{CONFIG}\n[limits]\nmax_connections = 5000\n"),
    );
    let crier = Process::start_command(
        common::crier::limited_crier_command(256, 20_000),
        &["--config", &config],
        &[],
    )
    .await;
    let raised = log_lines(&crier.log, |v| {
        message_is(v, "open-file limit raised to the hard limit")
    });
    assert_eq!(raised.len(), 1, "{}", crier.log_text());
    assert_eq!(raised[0]["fields"]["from"], 256);
    assert_eq!(raised[0]["fields"]["to"], 20_000);

    let channel = unique("public:fds");
    let url = format!("ws://{}/ws?channel={channel}", crier.addr);
    let mut clients = Vec::new();
    // In batches: a burst of 1,000 handshakes would only test the backlog.
    for _ in 0..10 {
        let batch = futures_util::future::join_all((0..100).map(|_| {
            let url = url.clone();
            async move {
                let mut ws = common::ws::WsClient::try_connect(&url, &[])
                    .await
                    .expect("connected");
                ws.recv_type("welcome", WAIT).await;
                ws
            }
        }))
        .await;
        clients.extend(batch);
    }
    assert_eq!(clients.len(), 1000);
    let (status, _) = common::http_get(&crier.http("/healthz")).await;
    assert_eq!(status, StatusCode::OK);
}

/// Issue 21.1: a hard open-file limit below `limits.max_connections` (plus
/// crier's own 64) is a warning, at start and in `check-config`.
#[tokio::test]
async fn a_hard_fd_limit_below_max_connections_is_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        &dir,
        &format!("{CONFIG}\n[limits]\nmax_connections = 5000\n"),
    );
    let warning = "the open-file limit (hard 1000) is below limits.max_connections (5000) \
                   plus 64 for crier itself: at most 936 connections";

    let out = common::crier::limited_crier_command(1000, 1000)
        .args(["check-config", "--config", &config])
        .output()
        .await
        .expect("check-config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("crier: warning: {warning}")),
        "{stderr}"
    );
    assert!(stderr.contains("at least 5064"), "{stderr}");

    let crier = Process::start_command(
        common::crier::limited_crier_command(1000, 1000),
        &["--config", &config],
        &[],
    )
    .await;
    let log = crier.log.clone();
    common::eventually("the start-up warning", WAIT, || {
        let log = log.clone();
        async move {
            !log_lines(&log, |v| {
                v["level"] == "WARN"
                    && v["fields"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains(warning))
            })
            .is_empty()
        }
    })
    .await;

    // A hard limit with room says nothing.
    let out = common::crier::limited_crier_command(1000, 6000)
        .args(["check-config", "--config", &config])
        .output()
        .await
        .expect("check-config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("open-file limit"), "{stderr}");
}

/// Issue 21.1: at its open-file limit (soft = hard = 128) and with 200
/// WebSockets trying to connect, crier refuses what it cannot hold, keeps
/// answering `/healthz`, and logs no flood of accept failures.
#[tokio::test]
async fn healthz_answers_at_the_fd_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(&dir, CONFIG);
    let crier = Process::start_command(
        common::crier::limited_crier_command(128, 128),
        &["--config", &config],
        &[],
    )
    .await;
    let channel = unique("public:full");
    let url = format!("ws://{}/ws?channel={channel}", crier.addr);
    let attempts = futures_util::future::join_all((0..200).map(|_| {
        let url = url.clone();
        async move {
            let mut ws = common::ws::WsClient::try_connect(&url, &[]).await.ok()?;
            ws.recv_type("welcome", WAIT).await;
            Some(ws)
        }
    }))
    .await;
    let open: Vec<_> = attempts.into_iter().flatten().collect();
    assert!(!open.is_empty(), "some connections are held");
    assert!(open.len() < 200, "not all fit: {}", open.len());

    // With every connection still open, the probe is answered.
    for _ in 0..3 {
        let (status, body) = common::http_get(&crier.http("/healthz")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // And a stream beyond the limit is told so.
    let refused = common::ws::WsClient::try_connect(&url, &[]).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
        other => panic!("expected 503, got {:?}", other.map(|_| "a connection")),
    }
    let failures = log_lines(&crier.log, |v| {
        v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("accept failed"))
    });
    assert!(failures.len() <= 2, "{failures:#?}");
    drop(open);
}

/// Issue 21.8: outside dev mode the first Ctrl-C says that a second one
/// exits at once, and the second does, long before the grace period ends.
#[tokio::test]
async fn second_ctrl_c_exits_at_once_outside_dev_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A grace period no test waits out: exiting at all means "at once".
    let config = write_config(
        &dir,
        "[[channels]]\npattern = \"public:*\"\nsubscribe = \"anyone\"\n\
         [shutdown]\ngrace = \"10m\"\ndrain = \"10m\"\n",
    );
    let mut crier = Process::start(&["--config", &config], &[]).await;
    let pid = crier.child.id().expect("running").to_string();
    let interrupt = || async {
        let status = tokio::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .await
            .expect("run kill");
        assert!(status.success());
    };
    interrupt().await;
    let log = crier.log.clone();
    common::eventually("the Ctrl-C hint", WAIT, || {
        let log = log.clone();
        async move {
            !log_lines(&log, |v| {
                message_is(v, "shutting down; press Ctrl-C again to exit now")
            })
            .is_empty()
        }
    })
    .await;
    interrupt().await;
    let status = tokio::time::timeout(WAIT, crier.child.wait())
        .await
        .expect("exits before the 10-minute grace period")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    assert!(
        crier
            .log_text()
            .contains("second signal: exiting without completing the drain"),
        "{}",
        crier.log_text()
    );
}

/// Issue 21.8: `crier completions --help` offers no configuration flags
/// (the script needs none); the commands that load configuration do.
#[tokio::test]
async fn completions_help_offers_no_configuration_flags() {
    let (code, help, stderr) = run_crier(&["completions", "--help"], &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(help.contains("<SHELL>"), "{help}");
    for flag in ["--config", "--redis-url"] {
        assert!(!help.contains(flag), "{flag} offered: {help}");
    }
    for command in ["check-config", "publish"] {
        let (_, help, _) = run_crier(&[command, "--help"], &[]).await;
        for flag in ["--config", "--redis-url"] {
            assert!(help.contains(flag), "{command} lacks {flag}: {help}");
        }
    }
}

/// Issue 21.8: `allowed_origins = ["*"]` is refused saying why and what
/// to write instead.
#[tokio::test]
async fn a_wildcard_origin_is_refused_with_the_reason_and_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(&dir, &format!("allowed_origins = [\"*\"]\n{CONFIG}"));
    let (code, _, stderr) = run_crier(&["check-config", "--config", &config], &[]).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("allowed_origins[0]: `*` would let any web site"),
        "{stderr}"
    );
    assert!(
        stderr.contains("browsers refuse `*` on requests with credentials"),
        "{stderr}"
    );
    assert!(stderr.contains("\"https://app.example.com\""), "{stderr}");
    assert!(stderr.contains("--dev"), "{stderr}");
}

/// Issue 21.8: history beyond what a resume replays is a warning, in
/// `check-config` and at start.
#[tokio::test]
async fn history_larger_than_the_replay_is_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        &dir,
        "[[channels]]\npattern = \"hist:*\"\nsubscribe = \"anyone\"\n\
         history = { size = 20000, ttl = \"10m\" }\n[limits]\nmax_connections = 500\n",
    );
    let warning = "channels[0].history.size = 20000 keeps more than can be replayed";
    let (code, _, stderr) = run_crier(&["check-config", "--config", &config], &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("crier: warning: {warning}")),
        "{stderr}"
    );
    assert!(
        stderr.contains("keep history.size at most 10000"),
        "{stderr}"
    );
    let crier = Process::start(&["--config", &config], &[]).await;
    let log = crier.log.clone();
    common::eventually("the start-up warning", WAIT, || {
        let log = log.clone();
        async move {
            !log_lines(&log, |v| {
                v["level"] == "WARN"
                    && v["fields"]["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with(warning))
            })
            .is_empty()
        }
    })
    .await;
}

/// Issue 21.5: a `CRIER_*` variable that is not a configuration key is
/// named, with the spelling meant when there is one; a list is shown in
/// list form, without echoing the (maybe secret) value.
#[tokio::test]
async fn unknown_crier_variables_are_named_with_the_fix() {
    for (var, value, says) in [
        (
            "CRIER_URL",
            "http://127.0.0.1:8080",
            "CRIER_URL is not a configuration key: crier reads every CRIER_* variable",
        ),
        (
            "CRIER_REDIS_URL",
            "redis://127.0.0.1:6379",
            "CRIER_REDIS_URL is not a configuration key; did you mean CRIER_REDIS__URL?",
        ),
        (
            "CRIER_AUTH__SESSION__SECRETS",
            "session-secret-hunter2",
            "CRIER_AUTH__SESSION__SECRETS must be a list, e.g. CRIER_AUTH__SESSION__SECRETS='[\"…\"]'",
        ),
    ] {
        for args in [&["check-config"][..], &["--listen", "127.0.0.1:0"][..]] {
            let (code, _, stderr) = run_crier(args, &[(var, value)]).await;
            assert_eq!(code, Some(64), "{var} {args:?}: {stderr}");
            assert!(stderr.contains(says), "{var} {args:?}: {stderr}");
            assert!(!stderr.contains("hunter2"), "{stderr}");
        }
    }
    // The variables crier itself defines are still fine.
    let (code, _, stderr) = run_crier(
        &["check-config"],
        &[
            ("CRIER_API_KEY", "k"),
            ("CRIER_REDIS__URL", "redis://r:6379"),
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
}
