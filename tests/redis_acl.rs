//! crier as a Redis ACL user restricted to its own keys, created with the
//! exact `ACL SETUSER` line docs/configuration.md gives: relay, history,
//! resume, the canary and the publish API all work, and Redis logs no
//! denial (`ACL LOG` stays empty).

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
    config.channels = vec![rule("hist:*", true), rule("public:*", false)];
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
    let key = crier::history::stream_key("", &hist);
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

    let denials = redis.cli(&["ACL", "LOG"]).await;
    assert_eq!(denials.trim(), "", "Redis denied crier something");
    assert_eq!(crier.readyz().await, StatusCode::OK);
}
