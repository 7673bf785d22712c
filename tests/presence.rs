//! Presence in crier's own WebSocket protocol: a channel rule with
//! `presence = true`, signed-in subscribers as members, `join`/`leave`
//! across instances, the `presence` request and `GET /api/presence`,
//! against two crier instances on one real Redis.

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::crier::{test_config, Instance, WAIT};
use common::redis::RedisServer;
use common::ws::WsClient;
use common::{http_get_with, unique};
use crier::config::{ChannelRule, Config, JwtConfig, Subscribe};
use http::StatusCode;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const SECRET: &str = "a-jwt-secret-of-at-least-32-bytes!!";
const API_KEY: &str = "presence-api-key-0123456789";

fn config(redis: &RedisServer) -> Config {
    let mut config = test_config(Some(redis.url()));
    config.channels = vec![ChannelRule {
        pattern: "room:*".into(),
        subscribe: Subscribe::Anyone,
        history: None,
        event_field: None,
        presence: true,
    }];
    config.auth.jwt = Some(JwtConfig {
        algorithms: vec!["HS256".into()],
        secret: Some(SECRET.into()),
        ..JwtConfig::default()
    });
    config.publish.api_keys = vec![API_KEY.into()];
    config.presence.heartbeat = Duration::from_millis(300);
    config.presence.ttl = Duration::from_secs(1);
    config
}

fn token(user: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600;
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": user, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

/// A client signed in as `user` (or anonymous), subscribed to `channel`.
async fn member(crier: &Instance, user: Option<&str>, channel: &str) -> WsClient {
    let bearer = user.map(|u| format!("Bearer {}", token(u)));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| vec![("authorization", b)])
        .unwrap_or_default();
    let mut ws = WsClient::try_connect(&crier.ws("/ws"), &headers)
        .await
        .expect("connect");
    let subscribed = ws.subscribe(channel, 1).await;
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    ws
}

/// The next frame of type `ty` (skipping others).
async fn next_of(ws: &mut WsClient, ty: &str) -> Value {
    ws.recv_type(ty, WAIT).await
}

async fn members_of(ws: &mut WsClient, channel: &str) -> Value {
    ws.send_json(json!({"type": "presence", "channel": channel, "id": 9}))
        .await;
    next_of(ws, "presence").await
}

fn users(answer: &Value) -> Vec<String> {
    let mut users: Vec<String> = answer["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["user"].as_str().expect("user").to_owned())
        .collect();
    users.sort();
    users
}

#[tokio::test]
async fn members_join_and_leave_across_instances_and_the_api_agrees() {
    let redis = RedisServer::start().await;
    let a = Instance::start(config(&redis)).await;
    let b = Instance::start(config(&redis)).await;
    let room = unique("room:r");

    let mut alice = member(&a, Some("alice"), &room).await;
    let mut bob = member(&b, Some("bob"), &room).await;
    let join = next_of(&mut alice, "join").await;
    assert_eq!(join["channel"], room.as_str());
    assert_eq!(join["data"]["user_id"], "bob", "{join}");

    // An anonymous listener hears the channel but is nobody's member.
    let mut anonymous = member(&b, None, &room).await;
    let answer = members_of(&mut anonymous, &room).await;
    assert_eq!(answer["count"], 2, "{answer}");
    assert_eq!(users(&answer), ["alice", "bob"]);
    assert_eq!(answer["id"], 9);

    let url = format!("{}?channel={}", a.http("/api/presence"), room);
    let auth = format!("Bearer {API_KEY}");
    let (status, body) = http_get_with(&url, &[("authorization", &auth)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(answer["count"], 2);
    assert_eq!(users(&answer), ["alice", "bob"]);
    let (status, _) = http_get_with(&url, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the API needs its key");

    // Bob's second connection adds nobody; his last one leaving is a leave.
    let mut bob_again = member(&a, Some("bob"), &room).await;
    bob.close().await;
    bob_again.close().await;
    let leave = next_of(&mut alice, "leave").await;
    assert_eq!(leave["data"]["user_id"], "bob", "{leave}");
    let answer = members_of(&mut alice, &room).await;
    assert_eq!(users(&answer), ["alice"], "{answer}");
    // The anonymous listener hears the leave too.
    let leave = next_of(&mut anonymous, "leave").await;
    assert_eq!(leave["data"]["user_id"], "bob");

    // Not a presence channel, or not subscribed: a clear error.
    let mut other = member(&a, Some("carol"), &unique("room:x")).await;
    other
        .send_json(json!({"type": "presence", "channel": room, "id": 3}))
        .await;
    let refused = next_of(&mut other, "error").await;
    assert!(
        refused["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("subscribe"),
        "{refused}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn member_lists_are_bounded_and_counts_exact() {
    let redis = RedisServer::start().await;
    let mut config = config(&redis);
    config.presence.max_listed = 2;
    let crier = Instance::start(config).await;
    let room = unique("room:big");
    let mut clients = Vec::new();
    for user in ["u1", "u2", "u3", "u4"] {
        clients.push(member(&crier, Some(user), &room).await);
    }
    let answer = members_of(&mut clients[0], &room).await;
    assert_eq!(answer["count"], 4, "{answer}");
    assert_eq!(
        answer["members"].as_array().map(Vec::len),
        Some(2),
        "{answer}"
    );
    crier.shutdown().await;
}

#[tokio::test]
async fn members_come_back_after_redis_loses_them() {
    let mut redis = RedisServer::start().await;
    let crier = Instance::start(config(&redis)).await;
    let room = unique("room:restart");
    let _alice = member(&crier, Some("alice"), &room).await;
    let _bob = member(&crier, Some("bob"), &room).await;
    let url = format!("{}?channel={}", crier.http("/api/presence"), room);
    let auth = format!("Bearer {API_KEY}");
    let count = || async {
        let (status, body) = http_get_with(&url, &[("authorization", &auth)]).await;
        (status == StatusCode::OK)
            .then(|| serde_json::from_str::<Value>(&body).ok())
            .flatten()
            .map(|v| v["count"].clone())
    };
    assert_eq!(count().await, Some(json!(2)));

    // A restart without persistence: the presence keys are gone. The next
    // beat tells Redis again who this instance holds.
    redis.restart().await;
    common::eventually("the members are back in Redis", WAIT, || async {
        count().await == Some(json!(2))
    })
    .await;
    crier.shutdown().await;
}
