//! The session-webhook recipes of docs/authentication.md, run for real:
//! examples/integration/webhook_flask.py (Flask's signed-cookie session) and
//! examples/integration/webhook-express.mjs (express-session) are the apps,
//! started as they would be by a user; crier asks them who a cookie is.
//! The Flask one is driven by plain HTTP and SSE clients; the Express one by
//! its own page in a real headless Chromium, on another origin than crier.
//!
//! Needs python3 with `flask` (`pip install -r examples/integration/requirements.txt`),
//! node with `npm ci --prefix examples/integration` done, and `chromium`.
//! Without them these tests fail and say what to install.

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::browser::{chromium, installed, DevTools};
use common::crier::{rule, test_config, Instance, WAIT};
use common::sse;
use common::{check_runs, repo};
use crier::config::{Config, Subscribe, WebhookConfig};
use http::{Method, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

/// The apps' session cookie, forwarded by crier.
const COOKIE: &str = "_myapp_session";
/// For the publish API (the memory broker, no dev mode).
const API_KEY: &str = "k-webhook-recipes-5c1e9a";
/// How often open connections ask the app again: a logout ends them within it.
const RECHECK: Duration = Duration::from_millis(300);

/// crier asking the app at `webhook` about `_myapp_session`: each user hears
/// `user:<id>`, and the teams the app grants.
fn config(webhook: &str) -> Config {
    let mut config = test_config(None);
    config.channels = vec![
        rule("user:{user}", Subscribe::User),
        rule("team:*", Subscribe::Claim),
    ];
    config.auth.webhook = Some(WebhookConfig {
        url: webhook.into(),
        forward_cookies: vec![COOKIE.into()],
        recheck: RECHECK,
        ..WebhookConfig::default()
    });
    config.publish.api_keys = vec![API_KEY.into()];
    config
}

/// One of the example apps, as a child process killed when dropped.
struct RecipeApp {
    /// Killed on drop (`kill_on_drop`): this child only, by its PID.
    _child: Child,
    port: u16,
    /// What it printed after its "listening on" line.
    output: Arc<Mutex<Vec<String>>>,
}

impl RecipeApp {
    /// Runs `command` from the repository root on a port it picks (`PORT=0`)
    /// and waits for it to print `listening on PORT`.
    async fn start(command: &[&str], envs: &[(&str, &str)]) -> RecipeApp {
        let mut child = Command::new(command[0])
            .args(&command[1..])
            .current_dir(repo("."))
            .env("PORT", "0")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let port = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("read the app's output") {
                if let Some(port) = line.strip_prefix("listening on ") {
                    return port.trim().parse::<u16>().expect("a port number");
                }
            }
            panic!("{command:?} exited before listening")
        })
        .await
        .unwrap_or_else(|_| panic!("{command:?} did not listen within 30 s"));
        let output = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&output);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().expect("output").push(line);
            }
        });
        RecipeApp {
            _child: child,
            port,
            output,
        }
    }

    /// `http://127.0.0.1:PORT`: the app's origin.
    fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.origin())
    }

    fn output(&self) -> Vec<String> {
        self.output.lock().expect("output").clone()
    }
}

/// POSTs a form to the app; the status and the `name=value` of the session
/// cookie it set, if any.
async fn post_form(url: &str, cookie: Option<&str>, form: &str) -> (StatusCode, Option<String>) {
    let mut headers = vec![("content-type", "application/x-www-form-urlencoded")];
    if let Some(cookie) = cookie {
        headers.push(("cookie", cookie));
    }
    let (response, _conn) = common::send_request(
        Method::POST,
        url,
        &headers,
        Bytes::copy_from_slice(form.as_bytes()),
    )
    .await;
    let set = response
        .headers()
        .get_all(http::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .find(|c| c.starts_with(&format!("{COOKIE}=")))
        .map(str::to_owned);
    (response.status(), set)
}

// ---------------------------------------------------------------------------
// Flask

/// Flask's own signed-cookie session: a user logged in through the app's
/// login route hears their channel and their team; no cookie, a forged one,
/// another user's channel and a team not granted are refused; the app's
/// logout ends the open stream within `recheck`, and the copy of the cookie
/// crier held is refused from then on.
#[tokio::test]
async fn flask_recipe_logs_in_streams_and_logs_out() {
    check_runs(
        "python3",
        &["-c", "import flask"],
        "python3 with `flask` is needed: pip install -r examples/integration/requirements.txt",
    );
    let app = RecipeApp::start(&["python3", "examples/integration/webhook_flask.py"], &[]).await;
    let crier = Instance::start(config(&app.url("/crier/session"))).await;

    let (status, cookie) = post_form(&app.url("/login"), None, "user=alice").await;
    assert_eq!(status, StatusCode::OK);
    let cookie = cookie.expect("the login sets the session cookie");
    let headers = [("cookie", cookie.as_str())];

    // No session, and a session cookie the app did not sign: 401.
    let alice = crier.sse_url(&["user:alice"]);
    assert_eq!(
        sse::connect(&alice, &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    let forged = format!("{COOKIE}=eyJsb2dpbiI6Im5vcGUifQ.Zm9yZ2Vk.c2lnbmF0dXJl");
    assert_eq!(
        sse::connect(&alice, &[("cookie", &forged)]).await.status,
        StatusCode::UNAUTHORIZED
    );
    // Alice: not bob's channel, not a team the app did not grant her.
    for channel in ["user:bob", "team:blue"] {
        let refused = sse::connect(&crier.sse_url(&[channel]), &headers).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{channel}");
    }

    let response = sse::connect(&crier.sse_url(&["user:alice", "team:red"]), &headers).await;
    assert_eq!(response.status, StatusCode::OK);
    let mut events = response.into_events();
    for (channel, text) in [("user:alice", "hello alice"), ("team:red", "hello reds")] {
        let data = format!(r#"{{"text":"{text}"}}"#);
        assert_eq!(
            crier.publish_api(channel, &data, Some(API_KEY)).await,
            StatusCode::OK
        );
        let message = events.next_message(WAIT).await.expect("the stream is open");
        let message = message.json();
        assert_eq!(message["channel"], channel, "{message}");
        assert_eq!(message["data"]["text"], text, "{message}");
    }

    // The app's logout: crier's next check gets 401 and ends the stream.
    let (status, _) = post_form(&app.url("/logout"), Some(&cookie), "").await;
    assert_eq!(status, StatusCode::OK);
    let ended = events.expect_end(WAIT).await;
    assert!(
        ended.iter().any(|e| e.event.as_deref() == Some("expired")),
        "the stream says why it ends: {ended:?}"
    );
    assert_eq!(events.error(), None, "a clean end");
    // The cookie itself is still signed: the app refuses it because the
    // login is gone, and so does crier.
    let replayed = sse::connect(&alice, &headers).await;
    assert_eq!(replayed.status, StatusCode::UNAUTHORIZED);
    crier.shutdown().await;
}

// ---------------------------------------------------------------------------
// Express, in Chromium

/// What the page saw on its two connections: `{"sse": [...], "ws": [...]}`.
async fn seen(page: &mut DevTools) -> Value {
    let text = page
        .eval("JSON.stringify({ sse: demo.sse, ws: demo.ws })")
        .await;
    serde_json::from_str(text.as_str().expect("a string")).expect("JSON")
}

/// express-session: the app's page, on the app's origin, listens to crier on
/// another origin with `EventSource` (`withCredentials`) and `WebSocket`.
/// Before logging in both are refused; after its login both get what is
/// published to `user:alice`, and crier asked the app with the page's
/// origin; after its logout both end (`expired`, close 4001).
#[tokio::test]
async fn express_recipe_page_listens_cross_origin_in_chromium() {
    check_runs(
        "node",
        &["--version"],
        "node is needed to run examples/integration/webhook-express.mjs",
    );
    assert!(
        repo("examples/integration/node_modules/express-session/package.json").exists(),
        "express-session is not installed for the examples: npm ci --prefix examples/integration"
    );
    assert!(
        installed("chromium"),
        "chromium is needed to run the Express recipe's page (apt-get install chromium; bash .ci/run installs it)"
    );

    // crier's address first: the app's page points at it.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let crier_url = format!("http://{}", listener.local_addr().expect("addr"));
    let app = RecipeApp::start(
        &["node", "examples/integration/webhook-express.mjs"],
        &[("EVENTS_URL", &crier_url)],
    )
    .await;
    let mut config = config(&app.url("/crier/session"));
    config.allowed_origins = vec![app.origin()];
    let crier = Instance::start_on(config, listener).await;

    let profile = tempfile::tempdir().expect("profile");
    let _chromium = chromium(&app.url("/"), profile.path());
    let mut page = DevTools::attach(profile.path()).await;
    page.wait_for(
        "the app's page",
        "typeof listen === 'function' && typeof demo === 'object'",
    )
    .await;

    // Not logged in: no cookie, so crier sees an anonymous page. The
    // EventSource is refused (401) and the WebSocket's subscribe too.
    page.eval("listen('user:alice')").await;
    page.wait_for(
        "both refused",
        "demo.sse.some((e) => e.refused) && demo.ws.some((m) => m.type === 'error')",
    )
    .await;
    let anonymous = seen(&mut page).await;
    let error = anonymous["ws"]
        .as_array()
        .and_then(|ws| ws.iter().find(|m| m["type"] == "error"))
        .expect("an error frame");
    assert_eq!(error["code"], "unauthorized", "{anonymous}");
    assert_eq!(error["id"], 1, "{anonymous}");
    assert!(
        !anonymous["sse"]
            .as_array()
            .is_some_and(|sse| sse.iter().any(|e| e["open"] == true)),
        "{anonymous}"
    );
    assert_eq!(
        crier
            .metric("crier_webhook_calls_total{result=\"ok\"}")
            .await,
        0.0
    );

    // The page's own button: log in as alice, then listen to user:alice.
    page.eval("document.getElementById('login').click()").await;
    page.wait_for(
        "both connections open",
        "demo.sse.some((e) => e.open) \
         && demo.ws.some((m) => m.type === 'subscribed' && m.channel === 'user:alice')",
    )
    .await;
    assert_eq!(
        crier
            .publish_api("user:alice", r#"{"text":"hello alice"}"#, Some(API_KEY))
            .await,
        StatusCode::OK
    );
    page.wait_for(
        "the message on both",
        "demo.sse.some((m) => m.channel === 'user:alice' && m.data?.text === 'hello alice') \
         && demo.ws.some((m) => m.type === 'message' && m.channel === 'user:alice' \
                                && m.data?.text === 'hello alice')",
    )
    .await;
    // crier told the app which page the cookie came from.
    let asked = format!("crier asked: user=alice origin={}", app.origin());
    common::eventually("the app's log of crier's call", WAIT, || {
        let seen = app.output().contains(&asked);
        async move { seen }
    })
    .await;
    let output = app.output();
    assert!(
        output
            .iter()
            .filter(|l| l.starts_with("crier asked:"))
            .all(|l| *l == asked),
        "every call was about alice, from the page's origin: {output:?}"
    );

    // The page's logout button: within `recheck`, crier ends both.
    page.eval("document.getElementById('logout').click()").await;
    page.wait_for(
        "both ended",
        "demo.sse.some((e) => e.expired) && demo.ws.some((m) => m.closed === 4001)",
    )
    .await;
    let report = seen(&mut page).await;
    let closed = report["ws"]
        .as_array()
        .and_then(|ws| ws.iter().find(|m| m.get("closed").is_some()))
        .expect("a close");
    assert_eq!(closed["reason"], "expired", "{report}");
    crier.shutdown().await;
}

/// docs/authentication.md quotes each recipe's webhook route: every code
/// block it shows under **Flask** and **Express** must be in the file the
/// tests above run, verbatim.
#[test]
fn the_documented_recipes_are_the_tested_files() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/authentication.md")).expect("doc");
    for (heading, fence, file) in [
        (
            "**Flask**",
            "```python\n",
            "examples/integration/webhook_flask.py",
        ),
        (
            "**Express**",
            "```js\n",
            "examples/integration/webhook-express.mjs",
        ),
    ] {
        let source = std::fs::read_to_string(root.join(file)).expect("recipe");
        let after = &doc[doc
            .find(heading)
            .unwrap_or_else(|| panic!("{heading} in the doc"))..];
        let start = after.find(fence).expect("a code block") + fence.len();
        let block = &after[start..start + after[start..].find("```").expect("its end")];
        assert!(block.lines().count() >= 5, "{heading}: {block}");
        assert!(
            source.contains(block),
            "{heading}: the doc's block is not in {file} verbatim:\n{block}"
        );
    }
}
