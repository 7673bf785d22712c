//! crier as a Redis ACL user restricted to its own keys, created with the
//! exact `ACL SETUSER` line docs/configuration.md gives: relay, history,
//! resume, the canary, the publish API, presence and the Pusher HTTP API's
//! channel listing all work, and Redis logs no denial (`ACL LOG` stays
//! empty).

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::crier::{test_config, Instance, WAIT};
use common::redis::RedisServer;
use common::sse;
use common::unique;
use common::ws::WsClient;
use crier::config::{ChannelRule, HistoryRule, Subscribe};
use http::StatusCode;

const PASSWORD: &str = "acl-test-password-0123";
const API_KEY: &str = "acl-test-publish-key-0123456789";
const PUSHER_SECRET: &str = "acl-test-pusher-secret-0123";

/// HMAC-SHA256 under the Pusher app's secret, as hex (what its server SDKs
/// sign with).
fn hmac_hex(text: &str) -> String {
    common::pusher::hmac_hex(PUSHER_SECRET, text)
}

/// The `ACL SETUSER crier …` line of docs/configuration.md, as words.
fn documented_acl_line() -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .expect("docs/configuration.md");
    let line = doc
        .lines()
        .find(|l| l.starts_with("ACL SETUSER crier "))
        .expect("docs/configuration.md gives an `ACL SETUSER crier` line");
    line.split_whitespace()
        .map(|w| {
            if w == ">CHANGE-ME" {
                format!(">{PASSWORD}")
            } else {
                w.to_string()
            }
        })
        .collect()
}

#[tokio::test]
async fn the_documented_acl_user_runs_everything_without_a_denial() {
    let redis = RedisServer::start().await;
    let words = documented_acl_line();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    assert_eq!(redis.cli(&words).await.trim(), "OK");

    let mut config = test_config(Some(redis.url()));
    config.redis.username = Some("crier".into());
    config.redis.password = Some(PASSWORD.into());
    config.redis.canary_interval = Duration::from_millis(200);
    config.publish.api_keys = vec![API_KEY.into()];
    let rule = |pattern: &str, history: bool| ChannelRule {
        pattern: pattern.into(),
        subscribe: Subscribe::Anyone,
        history: history.then_some(HistoryRule {
            size: 100,
            ttl: Duration::from_secs(3600),
        }),
        event_field: None,
        presence: false,
    };
    let mut presence = rule("presence-*", false);
    presence.subscribe = Subscribe::Claim;
    config.channels = vec![rule("hist:*", true), rule("public:*", false), presence];
    config.pusher.apps = vec![crier::config::PusherApp {
        id: "1".into(),
        key: "acl-key".into(),
        secret: PUSHER_SECRET.into(),
        client_events: false,
        namespace: String::new(),
        ..Default::default()
    }];
    // Ready means the canary went round: PUBLISH and SUBSCRIBE as `crier`.
    let crier = Instance::start(config).await;
    let clients = redis.cli(&["CLIENT", "LIST"]).await;
    assert!(
        clients.contains("user=crier"),
        "crier logs in as its user: {clients}"
    );

    let (plain, hist) = (unique("public:acl"), unique("hist:acl"));
    let mut ws = WsClient::connect(&crier.ws(&format!("/ws?channel={plain}&channel={hist}"))).await;
    ws.recv_type("subscribed", WAIT).await;
    ws.recv_type("subscribed", WAIT).await;
    let mut events = sse::connect(&crier.sse_url(&[&hist]), &[])
        .await
        .into_events();

    // An app (the default user) publishes both ways.
    redis.publish(&plain, r#"{"n":1}"#).await;
    assert_eq!(ws.recv_type("message", WAIT).await["data"]["n"], 1);
    redis
        .fcall_publish(&hist, r#"{"n":2}"#)
        .await
        .expect("history id");
    assert_eq!(ws.recv_type("message", WAIT).await["data"]["n"], 2);
    let first = events.next_message(WAIT).await.expect("stream open");
    let cursor = first.id.expect("cursor");
    drop(events);

    // The publish API: FCALL crier_publish as `crier`.
    assert_eq!(
        crier.publish_api(&hist, r#"{"n":3}"#, Some(API_KEY)).await,
        StatusCode::OK
    );
    assert_eq!(ws.recv_type("message", WAIT).await["data"]["n"], 3);
    // Resume: crier_position and crier_since as `crier`.
    let mut back = sse::connect(&crier.sse_url(&[&hist]), &[("last-event-id", &cursor)])
        .await
        .into_events();
    assert_eq!(
        back.next_message(WAIT).await.expect("open").json()["data"]["n"],
        3
    );

    // An app limited like crier passes the stream key as the key.
    let key = crier::testing::history::stream_key("", &hist);
    let id = redis
        .cli(&[
            "--user",
            "crier",
            "--pass",
            PASSWORD,
            "--no-auth-warning",
            "FCALL",
            "crier_publish",
            "1",
            &key,
            r#"{"n":4}"#,
        ])
        .await;
    assert!(id.trim().contains('-'), "a history id: {id}");
    assert_eq!(ws.recv_type("message", WAIT).await["data"]["n"], 4);

    // Presence (the crier_presence_* functions) and the Pusher channel
    // listing (PUBSUB CHANNELS), as `crier`.
    let mut pusher = WsClient::connect(&crier.ws("/app/acl-key?protocol=7")).await;
    let hello = pusher.recv_json(WAIT).await;
    let data: serde_json::Value =
        serde_json::from_str(hello["data"].as_str().expect("data")).expect("json");
    let socket = data["socket_id"].as_str().expect("socket id").to_owned();
    let channel = unique("presence-acl");
    let channel_data = r#"{"user_id":"u1"}"#;
    let auth = format!(
        "acl-key:{}",
        hmac_hex(&format!("{socket}:{channel}:{channel_data}"))
    );
    pusher
        .send_json(serde_json::json!({"event": "pusher:subscribe", "data": {
            "channel": channel, "auth": auth, "channel_data": channel_data}}))
        .await;
    let joined = pusher.recv_json(WAIT).await;
    assert_eq!(
        joined["event"], "pusher_internal:subscription_succeeded",
        "{joined}"
    );
    assert!(
        joined["data"]
            .as_str()
            .unwrap_or_default()
            .contains(r#""count":1"#),
        "{joined}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let query = format!("auth_key=acl-key&auth_timestamp={now}&auth_version=1.0");
    let signature = hmac_hex(&format!("GET\n/apps/1/channels\n{query}"));
    let url = crier.http(&format!(
        "/apps/1/channels?{query}&auth_signature={signature}"
    ));
    let (status, body) = common::http_get(&url).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains(&channel), "{body}");

    let denials = redis.cli(&["ACL", "LOG"]).await;
    assert_eq!(denials.trim(), "", "Redis denied crier something");
    assert_eq!(crier.readyz().await, StatusCode::OK);
}
