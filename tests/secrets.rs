//! Acceptance 7 of authentication: no secret, token or cookie value appears
//! in any log line at any level, nor in `check-config`.

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::crier::{Process, WAIT};
use common::redis::RedisServer;
use common::sse;
use common::ws::WsClient;
use http::StatusCode;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;

const JWT_SECRET: &str = "jwt-secret-SECRET-0123456789abcdef0123";
const SESSION_SECRET: &str = "session-secret-SECRET-1";
const API_KEY: &str = "publish-key-SECRET-0123456789";
const WRONG_KEY: &str = "wrong-publish-key-SECRET-9876";
const SESSION_ID: &str = "sessionidSECRETabcdef0123456789";
const PUSHER_SECRET: &str = "pusher-secret-SECRET-0123";
const WEBHOOK_COOKIE: &str = "webhook-cookie-SECRET-4567";
const ANSWER_SECRET: &str = "webhook-answer-SECRET-89";
const NONSENSE_SECRET: &str = "webhook-nonsense-SECRET-10";

fn token(user: &str, exp: u64, secret: &str) -> String {
    let claims = json!({"sub": user, "exp": exp});
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

fn cookie_value(id: &str, secret: &str) -> String {
    common::browser::express_signed(id, secret)
}

fn encoded(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[tokio::test]
async fn no_secret_reaches_a_log_line_or_check_config() {
    let redis = RedisServer::start().await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let expires = humantime::format_rfc3339_millis(SystemTime::now() + Duration::from_secs(3600));
    let session = json!({"cookie": {"expires": expires.to_string()}, "passport": {"user": 42}});
    redis
        .cli(&["SET", &format!("sess:{SESSION_ID}"), &session.to_string()])
        .await;

    // The app behind [auth.webhook]: its answers carry secrets too.
    let app = common::app::App::start().await;
    app.login(
        WEBHOOK_COOKIE,
        json!({"user": "42", "info": {"note": ANSWER_SECRET}}),
    );
    app.login(
        "nonsense",
        json!({"user": "42", "channels": NONSENSE_SECRET}),
    );
    let app_url = app.url.clone();

    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("crier.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[channels]]
pattern = "user:{{user}}"
subscribe = "user"

[[channels]]
pattern = "private-*"
subscribe = "claim"

[[pusher.apps]]
id = "1"
key = "pusher-key"
secret = "{PUSHER_SECRET}"

[publish]
api_keys = ["{API_KEY}"]

[auth]
query_token = true

[auth.jwt]
algorithms = ["HS256"]
secret = "{JWT_SECRET}"

[auth.session]
secrets = ["{SESSION_SECRET}"]

[auth.webhook]
url = "{app_url}"
forward_cookies = ["{app_cookie}"]

[shutdown]
grace = "0s"
drain = "1s"
"#,
            app_cookie = common::app::COOKIE,
        ),
    )
    .expect("write config");
    let config = config.to_string_lossy().into_owned();
    let redis_url = redis.url();
    let args = [
        "--config",
        config.as_str(),
        "--redis-url",
        redis_url.as_str(),
    ];
    let mut crier = Process::start(&args, &[("RUST_LOG", "trace")]).await;

    let good = token("42", now + 600, JWT_SECRET);
    let refresh = token("42", now + 900, JWT_SECRET);
    let forged = token("42", now + 600, "not-the-secret-but-long-enough-000");
    let expired = token("42", now - 600, JWT_SECRET);
    let cookie = cookie_value(SESSION_ID, SESSION_SECRET);
    let forged_cookie = cookie_value(SESSION_ID, "guess");
    let sse_url = crier.http("/sse?channel=user:42");

    // Every credential path, accepted and refused.
    let bearer = |t: &str| format!("Bearer {t}");
    let ok = sse::connect(&sse_url, &[("authorization", &bearer(&good))]).await;
    assert_eq!(ok.status, StatusCode::OK);
    for bad in [&forged, &expired] {
        let r = sse::connect(&sse_url, &[("authorization", &bearer(bad))]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    let query = sse::connect(&format!("{sse_url}&token={good}"), &[]).await;
    assert_eq!(query.status, StatusCode::OK);
    let with_cookie = format!("connect.sid={}", encoded(&cookie));
    let c = sse::connect(&sse_url, &[("cookie", &with_cookie)]).await;
    assert_eq!(c.status, StatusCode::OK);
    let forged_header = format!("connect.sid={}", encoded(&forged_cookie));
    let c = sse::connect(&sse_url, &[("cookie", &forged_header)]).await;
    assert_eq!(c.status, StatusCode::UNAUTHORIZED);

    let mut ws = WsClient::connect(&format!("ws://{}/ws", crier.addr)).await;
    ws.send_json(json!({"type": "auth", "token": good, "id": 1}))
        .await;
    assert_eq!(ws.recv_type("authenticated", WAIT).await["user"], "42");
    ws.send_json(json!({"type": "auth", "token": refresh, "id": 2}))
        .await;
    ws.recv_type("authenticated", WAIT).await;
    ws.send_json(json!({"type": "auth", "token": forged, "id": 3}))
        .await;
    assert_eq!(ws.recv_type("error", WAIT).await["code"], "unauthorized");
    ws.send_text(&format!("{{\"type\":\"auth\",\"token\":\"{expired}\""))
        .await;
    ws.recv_type("error", WAIT).await;

    let publish = crier.http("/api/publish");
    let body = r#"{"channel":"user:42","data":1}"#;
    let (status, _) =
        common::http_post(&publish, &[("authorization", &bearer(API_KEY))], body).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) =
        common::http_post(&publish, &[("authorization", &bearer(WRONG_KEY))], body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Pusher: a signed subscription and a forged one, a signed HTTP API
    // request and one with a bad signature.
    let mut pusher = WsClient::connect(&format!("ws://{}/app/pusher-key", crier.addr)).await;
    let hello = pusher.recv_json(WAIT).await;
    let data: serde_json::Value =
        serde_json::from_str(hello["data"].as_str().expect("data")).expect("json");
    let socket = data["socket_id"].as_str().expect("socket id").to_owned();
    let signed = common::pusher::hmac_hex(PUSHER_SECRET, &format!("{socket}:private-a"));
    let forged_sig = common::pusher::hmac_hex("guess", &format!("{socket}:private-b"));
    for (channel, sig) in [("private-a", &signed), ("private-b", &forged_sig)] {
        let auth = format!("pusher-key:{sig}");
        pusher
            .send_json(
                json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth}}),
            )
            .await;
        let answer = pusher.recv_json(WAIT).await;
        assert_eq!(answer["channel"], channel, "{answer}");
    }
    let api_query = format!("auth_key=pusher-key&auth_timestamp={now}&auth_version=1.0");
    let api_sig = common::pusher::hmac_hex(
        PUSHER_SECRET,
        &format!("GET\n/apps/1/channels\n{api_query}"),
    );
    for (sig, expected) in [
        (&api_sig, StatusCode::OK),
        (&forged_sig, StatusCode::UNAUTHORIZED),
    ] {
        let url = crier.http(&format!(
            "/apps/1/channels?{api_query}&auth_signature={sig}"
        ));
        assert_eq!(common::http_get(&url).await.0, expected);
    }

    // The session webhook: a known cookie, an unknown one, and an answer
    // crier cannot use (its value must not reach the log either).
    for (session, expected) in [
        (WEBHOOK_COOKIE, StatusCode::OK),
        ("unknown-session", StatusCode::UNAUTHORIZED),
        ("nonsense", StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let header = format!("{}={session}", common::app::COOKIE);
        let r = sse::connect(&sse_url, &[("cookie", &header)]).await;
        assert_eq!(r.status, expected, "{session}");
    }

    drop((ok, query, ws, pusher));
    crier.sigterm().await;
    let status = tokio::time::timeout(WAIT, crier.child.wait())
        .await
        .expect("exits")
        .expect("wait");
    assert!(status.success());
    let log = crier.log.lock().expect("log").clone();

    let check = common::crier::crier_command()
        .args(["check-config"])
        .args(args)
        .env("RUST_LOG", "trace")
        .output()
        .await
        .expect("check-config");
    assert!(check.status.success());
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    assert!(
        log.contains("\"level\":\"DEBUG\"") || log.contains("\"level\":\"TRACE\""),
        "logging was on at a verbose level:\n{log}"
    );
    let signature = |jwt: &str| jwt.rsplit('.').next().expect("signature").to_string();
    let secrets = [
        JWT_SECRET.to_string(),
        SESSION_SECRET.to_string(),
        API_KEY.to_string(),
        WRONG_KEY.to_string(),
        SESSION_ID.to_string(),
        good.clone(),
        refresh.clone(),
        forged.clone(),
        expired.clone(),
        signature(&good),
        signature(&forged),
        cookie.clone(),
        encoded(&cookie),
        forged_cookie.clone(),
        PUSHER_SECRET.to_string(),
        WEBHOOK_COOKIE.to_string(),
        ANSWER_SECRET.to_string(),
        NONSENSE_SECRET.to_string(),
        signed.clone(),
        forged_sig.clone(),
        api_sig.clone(),
    ];
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "log holds a secret: {secret}\n{log}"
        );
        assert!(
            !printed.contains(secret.as_str()),
            "check-config prints a secret: {secret}\n{printed}"
        );
    }
    assert!(printed.contains("<redacted>"), "{printed}");
}
