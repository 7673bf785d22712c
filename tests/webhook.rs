//! `[auth.webhook]`: crier asks the app who a session cookie is. The app is
//! a real local HTTP server (tests/common/app.rs); clients are real SSE and
//! WebSocket connections.

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::app::{App, COOKIE};
use common::crier::{rule, test_config, Instance, WAIT};
use common::sse;
use common::ws::WsClient;
use crier::config::{Config, Subscribe, WebhookConfig};
use http::StatusCode;
use serde_json::json;

fn config(app: &App) -> Config {
    let mut config = test_config(None);
    config.channels = vec![
        rule("user:{user}", Subscribe::User),
        rule("team:*", Subscribe::Claim),
        rule("public:*", Subscribe::Anyone),
    ];
    config.auth.webhook = Some(WebhookConfig {
        url: app.url.clone(),
        forward_cookies: vec![COOKIE.into()],
        recheck: Duration::from_millis(300),
        ..WebhookConfig::default()
    });
    config
}

fn cookie(session: &str) -> String {
    format!("other=1; {COOKIE}={session}")
}

#[tokio::test]
async fn a_cookie_the_app_knows_is_its_user_on_sse_and_websocket() {
    let app = App::start().await;
    app.login(
        "s-42",
        json!({"user": "42", "channels": ["team:red"], "info": {"org": "acme"}}),
    );
    let crier = Instance::start(config(&app)).await;

    // SSE, with the user's own channel and a team the answer grants.
    let url = crier.sse_url(&["user:42", "team:red"]);
    let response = sse::connect(&url, &[("cookie", &cookie("s-42"))]).await;
    assert_eq!(response.status, StatusCode::OK);
    // What the app was sent: the cookie, the client's address.
    let (headers, body) = app.last_call().expect("a call");
    assert_eq!(
        headers.get("cookie").and_then(|v| v.to_str().ok()),
        Some(format!("{COOKIE}=s-42").as_str()),
        "only the configured cookie is forwarded"
    );
    assert_eq!(body["ip"], "127.0.0.1");
    // Another user's channel and a team not granted: forbidden.
    for channel in ["user:43", "team:blue"] {
        let url = crier.sse_url(&[channel]);
        let refused = sse::connect(&url, &[("cookie", &cookie("s-42"))]).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{channel}");
    }

    // WebSocket, same cookie.
    let mut ws = WsClient::try_connect(&crier.ws("/ws"), &[("cookie", &cookie("s-42"))])
        .await
        .expect("connect");
    assert_eq!(ws.subscribe("user:42", 1).await["type"], "subscribed");
    assert_eq!(ws.subscribe("team:red", 2).await["type"], "subscribed");
    assert_eq!(ws.subscribe("team:blue", 3).await["code"], "forbidden");

    // A cookie the app does not know: 401 (SSE), refused (WS).
    let unknown = sse::connect(
        &crier.sse_url(&["public:a"]),
        &[("cookie", &cookie("nope"))],
    )
    .await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    let ws = WsClient::try_connect(&crier.ws("/ws"), &[("cookie", &cookie("nope"))]).await;
    assert!(ws.is_err(), "the WebSocket handshake is refused");
    crier.shutdown().await;
}

#[tokio::test]
async fn a_hundred_connections_with_one_cookie_are_one_call() {
    let app = App::start().await;
    app.login("s-7", json!({"user": 7}));
    let crier = Instance::start(config(&app)).await;
    let url = crier.sse_url(&["user:7"]);
    let connections: Vec<_> = (0..100)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { sse::connect(&url, &[("cookie", &cookie("s-7"))]).await })
        })
        .collect();
    let mut open = Vec::new();
    for c in connections {
        let response = c.await.expect("task");
        assert_eq!(response.status, StatusCode::OK);
        open.push(response);
    }
    assert_eq!(app.calls(), 1, "100 connections, one webhook call");
    crier.shutdown().await;
}

#[tokio::test]
async fn a_logout_in_the_app_closes_the_stream_within_recheck() {
    let app = App::start().await;
    app.login("s-1", json!({"user": "1"}));
    let crier = Instance::start(config(&app)).await;
    let mut events = sse::connect(&crier.sse_url(&["user:1"]), &[("cookie", &cookie("s-1"))])
        .await
        .into_events();
    let mut ws = WsClient::try_connect(&crier.ws("/ws"), &[("cookie", &cookie("s-1"))])
        .await
        .expect("connect");
    assert_eq!(ws.subscribe("user:1", 1).await["type"], "subscribed");

    app.logout("s-1");
    let ended = events.expect_end(WAIT).await;
    assert!(
        ended.iter().any(|e| e.event.as_deref() == Some("expired")),
        "the stream says why: {ended:?}"
    );
    let (code, reason, _) = ws.expect_close(WAIT).await;
    assert_eq!((code, reason.as_str()), (4001, "expired"));
    crier.shutdown().await;
}

#[tokio::test]
async fn an_expiry_from_the_app_drives_expiring_and_expired() {
    let app = App::start().await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    app.login("s-2", json!({"user": "2", "expires_at": now + 2}));
    let mut config = config(&app);
    config.auth.expiring_notice = Duration::from_secs(60);
    let crier = Instance::start(config).await;
    let mut events = sse::connect(&crier.sse_url(&["user:2"]), &[("cookie", &cookie("s-2"))])
        .await
        .into_events();
    let ended = events.expect_end(WAIT).await;
    let names: Vec<_> = ended.iter().filter_map(|e| e.event.clone()).collect();
    assert_eq!(names, ["expiring", "expired"], "{ended:?}");
    crier.shutdown().await;
}

#[tokio::test]
async fn when_the_app_is_down_crier_refuses_and_never_lets_anyone_in() {
    let app = App::start().await;
    app.login("s-3", json!({"user": "3"}));
    app.set_down(true);
    let crier = Instance::start(config(&app)).await;
    // Even a public channel: a client bringing a credential is not
    // demoted to anonymous.
    for channel in ["user:3", "public:a"] {
        let response =
            sse::connect(&crier.sse_url(&[channel]), &[("cookie", &cookie("s-3"))]).await;
        assert_eq!(
            response.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{channel}"
        );
    }
    assert!(
        crier
            .metric("crier_webhook_calls_total{result=\"error\"}")
            .await
            >= 2.0,
        "outages are not cached, and are counted"
    );
    assert!(
        crier
            .metric("crier_auth_failures_total{reason=\"webhook_unavailable\"}")
            .await
            >= 2.0,
        "counted as the webhook's outage"
    );
    assert_eq!(
        crier
            .metric("crier_auth_failures_total{reason=\"store_unavailable\"}")
            .await,
        0.0,
        "not as the session store's"
    );
    // Back up: the same cookie works at once (the outage was not cached).
    app.set_down(false);
    let response = sse::connect(&crier.sse_url(&["user:3"]), &[("cookie", &cookie("s-3"))]).await;
    assert_eq!(response.status, StatusCode::OK);
    // An app answering nonsense is an outage too.
    app.login("s-bad", json!({"no_user_here": true}));
    let response = sse::connect(
        &crier.sse_url(&["public:a"]),
        &[("cookie", &cookie("s-bad"))],
    )
    .await;
    assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE);
    crier.shutdown().await;
}

#[tokio::test]
async fn a_forwarded_authorization_header_goes_to_the_app_when_crier_verifies_no_tokens() {
    let app = App::start().await;
    app.login("unused", json!({"user": "x"}));
    let mut config = config(&app);
    if let Some(hook) = &mut config.auth.webhook {
        hook.forward_cookies = Vec::new();
        hook.forward_headers = vec!["Authorization".into()];
    }
    let crier = Instance::start(config).await;
    // The app knows no bearer token: 401, and it was asked with the header.
    let response = sse::connect(
        &crier.sse_url(&["public:a"]),
        &[("authorization", "Bearer app-token-1")],
    )
    .await;
    assert_eq!(response.status, StatusCode::UNAUTHORIZED);
    let (headers, _) = app.last_call().expect("a call");
    assert_eq!(
        headers.get("authorization").and_then(|v| v.to_str().ok()),
        Some("Bearer app-token-1")
    );
    assert!(
        headers.get("cookie").is_none(),
        "no cookie configured, none sent"
    );
    crier.shutdown().await;
}

#[tokio::test]
async fn check_config_names_a_bad_webhook_setting() {
    let dir = tempfile::tempdir().expect("dir");
    for (extra, field) in [
        ("url = \"ftp://app/session\"\nforward_cookies = [\"s\"]", "auth.webhook.url"),
        ("url = \"not a url\"\nforward_cookies = [\"s\"]", "auth.webhook.url"),
        (
            "url = \"https://app/session\"\nforward_cookies = [\"s\"]\nca_file = \"/nonexistent/ca.pem\"",
            "auth.webhook.ca_file",
        ),
        ("url = \"https://app/session\"", "auth.webhook.forward_cookies"),
        (
            "url = \"https://app/session\"\nforward_headers = [\"bad header\"]",
            "auth.webhook.forward_headers[0]",
        ),
    ] {
        common::crier::check_config_refuses(dir.path(), &format!("[auth.webhook]\n{extra}\n"), field).await;
    }
}

#[tokio::test]
async fn connections_sharing_a_cookie_share_its_rechecks() {
    let app = App::start().await;
    app.login("shared", json!({"user": "5"}));
    app.login("alone", json!({"user": "6"}));
    let crier = Instance::start(config(&app)).await;
    // A connection with a cookie of its own is the clock: it asks once per
    // tick. Twenty connections sharing one cookie must not ask twenty
    // times per tick.
    let _alone = sse::connect(&crier.sse_url(&["user:6"]), &[("cookie", &cookie("alone"))]).await;
    let mut shared = Vec::new();
    for _ in 0..20 {
        let response = sse::connect(
            &crier.sse_url(&["user:5"]),
            &[("cookie", &cookie("shared"))],
        )
        .await;
        assert_eq!(response.status, StatusCode::OK);
        shared.push(response);
    }
    common::eventually("ten rechecks of the lone connection", WAIT, || async {
        app.calls_for("alone") >= 10
    })
    .await;
    let (alone, together) = (app.calls_for("alone"), app.calls_for("shared"));
    assert!(
        together <= 2 * alone + 2,
        "20 connections with one cookie made {together} calls while one alone made {alone}"
    );
    crier.shutdown().await;
}
