//! Pusher's user features and subscription counts, spoken to the ecosystem's real, unmodified
//! libraries (pusher-js in Node, the `pusher` server SDK) and to raw
//! sockets for what a library never sends: user sign-in (`pusher:signin`),
//! the user's own channel (`sendToUser`), `terminateUserConnections`, apps
//! that require signing in, watchlists, and fleet-wide subscription
//! counts. Two instances share a real
//! Redis in every test: each feature is fleet-wide.
//!
//! Needs node and `npm ci --prefix tests/pusher` (done by `.ci/run`).

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::crier::{Instance, WAIT};
use common::pusher::{hmac_hex, port, pusher_config, pusher_process, Driver, KEY, SECRET};
use common::redis::RedisServer;
use common::ws::WsClient;
use serde_json::{json, Value};

/// Two instances of the Pusher test app on one Redis.
async fn two_instances(redis: &RedisServer) -> (Instance, Instance) {
    let a = Instance::start(pusher_config(redis)).await;
    let b = Instance::start(pusher_config(redis)).await;
    (a, b)
}

/// A raw Pusher connection: the socket and its socket id.
async fn raw(instance: &Instance) -> (WsClient, String) {
    let mut ws = WsClient::connect(&instance.ws(&format!("/app/{KEY}?protocol=7"))).await;
    let hello = ws.recv_json(WAIT).await;
    assert_eq!(hello["event"], "pusher:connection_established", "{hello}");
    let data: Value = serde_json::from_str(hello["data"].as_str().expect("data")).expect("json");
    let socket = data["socket_id"].as_str().expect("socket_id").to_owned();
    (ws, socket)
}

/// What the app's user authentication endpoint returns for `user_data`
/// on `socket` (the SDK's `authenticateUser`).
fn user_auth(socket: &str, user_data: &str) -> String {
    let sig = hmac_hex(SECRET, &format!("{socket}::user::{user_data}"));
    format!("{KEY}:{sig}")
}

/// Sends `pusher:signin` with `auth` and `user_data`.
async fn sign_in_raw(ws: &mut WsClient, auth: &str, user_data: &str) {
    let data = json!({"auth": auth, "user_data": user_data});
    ws.send_json(json!({"event": "pusher:signin", "data": data}))
        .await;
}

/// The next frame whose `event` is `event`, skipping others.
async fn next_event(ws: &mut WsClient, event: &str) -> Value {
    loop {
        let v = ws.recv_json(WAIT).await;
        if v["event"] == event {
            return v;
        }
    }
}

/// Issue 25, acceptance 1: `signin()` then `sendToUser()` reaches every
/// connection of the user, on both instances, and nobody else; only the
/// user may subscribe to their channel.
#[tokio::test]
async fn send_to_user_reaches_every_connection_of_the_user_and_no_other() {
    let redis = RedisServer::start().await;
    let (a, b) = two_instances(&redis).await;
    let (pa, pb) = (port(&a.addr), port(&b.addr));
    let mut d = Driver::start().await;
    let signed = d.sign_in("c1", pa, "u1", &[]).await;
    assert_eq!(signed["user_data"], json!({"id": "u1"}), "{signed}");
    d.sign_in("c2", pb, "u1", &[]).await;
    d.sign_in("c3", pb, "u2", &[]).await;
    // Connected as u1 in the app's eyes, but never signed in.
    d.connect("c4", pa, "u1").await;
    // pusher-js subscribes to `#server-to-user-{id}` itself once signed
    // in; the answer comes before anything sent to the user.
    let sent = d
        .user_api(
            "note",
            json!({"op": "send_to_user", "port": pa, "user": "u1", "event": "note", "data": {"n": 1}}),
        )
        .await;
    assert_eq!(sent["status"], 200, "{sent}");
    let heard = |client: &'static str, event: &'static str| {
        move |v: &Value| v["type"] == "user_event" && v["client"] == client && v["event"] == event
    };
    for client in ["c1", "c2"] {
        let got = d.wait(heard(client, "note")).await;
        assert_eq!(got["data"], json!({"n": 1}), "{got}");
    }
    // Sent to u2 after the note: once c3 has it, it would have had the
    // note too.
    d.user_api(
        "marker",
        json!({"op": "send_to_user", "port": pb, "user": "u2", "event": "marker", "data": {}}),
    )
    .await;
    d.wait(heard("c3", "marker")).await;
    assert_eq!(d.count(heard("c3", "note")), 0, "u2 heard u1's note");
    assert_eq!(
        d.count(|v| v["client"] == "c4" && v["type"] == "user_event"),
        0,
        "a connection that never signed in heard a user's events"
    );
    assert_eq!(d.count(heard("c1", "note")), 1, "once per connection");

    // A raw client signed in as u1: its own channel is answered, another
    // user's refused (403), whatever it signs.
    let (mut ws, socket) = raw(&b).await;
    let user_data = r#"{"id":"u1"}"#;
    sign_in_raw(&mut ws, &user_auth(&socket, user_data), user_data).await;
    let success = next_event(&mut ws, "pusher:signin_success").await;
    let data: Value = serde_json::from_str(success["data"].as_str().expect("data")).expect("json");
    assert_eq!(data["user_data"], user_data, "{success}");
    for (channel, answer) in [
        ("#server-to-user-u2", "pusher:subscription_error"),
        (
            "#server-to-user-u1",
            "pusher_internal:subscription_succeeded",
        ),
    ] {
        ws.send_json(
            json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": ""}}),
        )
        .await;
        let got = ws.recv_json(WAIT).await;
        assert_eq!(got["event"], answer, "{channel}: {got}");
        assert_eq!(got["channel"], channel, "{got}");
    }
    // An unknown user's channel is a channel name the API takes; a user
    // id that could not name one is refused.
    let bad = d
        .user_api(
            "bad",
            json!({"op": "send_to_user", "port": pa, "user": "a b", "event": "x", "data": {}}),
        )
        .await;
    assert_eq!(bad["status"], 400, "{bad}");
    a.shutdown().await;
    b.shutdown().await;
}

/// Issue 25, acceptance 1: a sign-in whose signature was forged, made for
/// another connection (reused), or for other user data is refused with
/// `pusher:error` 4009 and the close code 4009; so is user data crier
/// cannot use.
#[tokio::test]
async fn forged_or_reused_sign_ins_are_refused_with_4009() {
    let redis = RedisServer::start().await;
    let (a, b) = two_instances(&redis).await;
    let user_data = r#"{"id":"u1"}"#;
    let (mut first, socket) = raw(&a).await;
    let genuine = user_auth(&socket, user_data);
    sign_in_raw(&mut first, &genuine, user_data).await;
    next_event(&mut first, "pusher:signin_success").await;

    let forged = format!("{KEY}:{}", "0".repeat(64));
    let wrong_key = genuine.replacen(KEY, "other-key", 1);
    let cases: Vec<(&str, String, String)> = vec![
        ("reused", genuine.clone(), user_data.to_owned()),
        ("forged", forged, user_data.to_owned()),
        ("other data", genuine, r#"{"id":"admin"}"#.to_owned()),
        ("wrong key", wrong_key, user_data.to_owned()),
    ];
    for (case, auth, data) in cases {
        let (mut ws, _) = raw(&b).await;
        sign_in_raw(&mut ws, &auth, &data).await;
        let (code, reason, before) = ws.expect_close(WAIT).await;
        assert_eq!(code, 4009, "{case}: {reason}");
        let error = before
            .iter()
            .find(|v| v["event"] == "pusher:error")
            .unwrap_or_else(|| panic!("{case}: no pusher:error in {before:?}"));
        assert_eq!(error["data"]["code"], 4009, "{case}: {error}");
        assert!(
            error["data"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("invalid signature")),
            "{case}: says why: {error}"
        );
    }
    // Signed, but not user data crier can use.
    for (case, data) in [
        ("no id", r#"{"name":"u1"}"#),
        ("a number", r#"{"id":1}"#),
        ("a colon", r#"{"id":"a:b"}"#),
        ("not JSON", "u1"),
        ("a long watchlist", &*watchlist_of(101)),
    ] {
        let (mut ws, socket) = raw(&b).await;
        sign_in_raw(&mut ws, &user_auth(&socket, data), data).await;
        let (code, reason, before) = ws.expect_close(WAIT).await;
        assert_eq!(code, 4009, "{case}: {reason}");
        assert!(
            before.iter().any(|v| v["event"] == "pusher:error"),
            "{case}: {before:?}"
        );
    }
    // The first connection is untouched.
    first
        .send_json(json!({"event": "pusher:ping", "data": {}}))
        .await;
    next_event(&mut first, "pusher:pong").await;
    a.shutdown().await;
    b.shutdown().await;
}

fn watchlist_of(n: usize) -> String {
    let ids: Vec<String> = (0..n).map(|i| format!("w{i}")).collect();
    json!({"id": "u1", "watchlist": ids}).to_string()
}

/// Issue 25, acceptance 1: an app with `user_authentication_timeout`
/// closes a connection that never signs in with 4009, and keeps one that
/// did.
#[tokio::test]
async fn a_connection_that_never_signs_in_is_closed_when_the_app_requires_it() {
    let redis = RedisServer::start().await;
    let mut config = pusher_config(&redis);
    config.pusher.apps[0].user_authentication_timeout = Some(Duration::from_millis(500));
    let crier = Instance::start(config).await;

    let (mut signed, socket) = raw(&crier).await;
    let user_data = r#"{"id":"u1"}"#;
    sign_in_raw(&mut signed, &user_auth(&socket, user_data), user_data).await;
    next_event(&mut signed, "pusher:signin_success").await;

    // Opened after the first: closed after its own timeout.
    let (mut lazy, _) = raw(&crier).await;
    let (code, reason, before) = lazy.expect_close(WAIT).await;
    assert_eq!(code, 4009, "{reason}");
    let error = before
        .iter()
        .find(|v| v["event"] == "pusher:error")
        .expect("pusher:error before the close");
    assert_eq!(error["data"]["code"], 4009, "{error}");
    assert!(reason.contains("user_authentication_timeout"), "{reason}");

    // The signed-in one, older than the timeout, still answers.
    signed
        .send_json(json!({"event": "pusher:ping", "data": {}}))
        .await;
    next_event(&mut signed, "pusher:pong").await;

    // pusher-js, never signing in, is closed too and stays closed (4009
    // is a code pusher-js does not retry).
    let mut d = Driver::start().await;
    d.connect("idle", port(&crier.addr), "u2").await;
    let error = d
        .wait(|v| v["client"] == "idle" && v["type"] == "error")
        .await;
    assert_eq!(error["error"]["code"], 4009, "{error}");
    crier.shutdown().await;
}

/// Issue 25, acceptance 2: `terminateUserConnections()` closes every
/// connection of the user on both instances with 4009 and leaves other
/// users connected.
#[tokio::test]
async fn terminate_closes_the_users_connections_on_every_instance() {
    let redis = RedisServer::start().await;
    let (a, b) = two_instances(&redis).await;
    let (pa, pb) = (port(&a.addr), port(&b.addr));
    let mut d = Driver::start().await;
    d.sign_in("c1", pa, "u1", &[]).await;
    d.sign_in("c2", pb, "u1", &[]).await;
    d.sign_in("c3", pb, "u2", &[]).await;
    // pusher-js's own subscription to the user channel is answered before
    // the termination is sent (it would work without, as crier subscribes
    // at sign-in; this keeps the test about the close).
    let started = std::time::Instant::now();
    let sent = d
        .user_api("end", json!({"op": "terminate", "port": pa, "user": "u1"}))
        .await;
    assert_eq!(sent["status"], 200, "{sent}");
    for client in ["c1", "c2"] {
        let error = d
            .wait(|v| v["client"] == client && v["type"] == "error")
            .await;
        assert_eq!(error["error"]["code"], 4009, "{client}: {error}");
        d.wait(|v| v["client"] == client && v["state"] == "disconnected")
            .await;
    }
    eprintln!(
        "terminated on both instances {} ms after the request",
        started.elapsed().as_millis()
    );
    // u2 is still connected and hears what is sent to it.
    d.user_api(
        "still",
        json!({"op": "send_to_user", "port": pa, "user": "u2", "event": "still", "data": {}}),
    )
    .await;
    d.wait(|v| v["client"] == "c3" && v["type"] == "user_event" && v["event"] == "still")
        .await;
    assert_eq!(
        d.count(|v| v["client"] == "c3" && v["type"] == "error"),
        0,
        "u2 was closed"
    );

    // A raw client: `pusher:error` 4009, then the close with 4009; a
    // termination published on another channel ends nobody.
    let (mut ws, socket) = raw(&b).await;
    let user_data = r#"{"id":"u3"}"#;
    sign_in_raw(&mut ws, &user_auth(&socket, user_data), user_data).await;
    next_event(&mut ws, "pusher:signin_success").await;
    redis
        .publish(
            "orders",
            r#"{"$crier":{"event":"crier:terminate"},"data":{}}"#,
        )
        .await;
    d.user_api("end3", json!({"op": "terminate", "port": pb, "user": "u3"}))
        .await;
    let (code, reason, before) = ws.expect_close(WAIT).await;
    assert_eq!(code, 4009, "{reason}");
    assert!(
        before
            .iter()
            .any(|v| v["event"] == "pusher:error" && v["data"]["code"] == 4009),
        "{before:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// Issue 25, acceptance 3: a watchlist hears `online` when a watched user
/// signs in on the other instance (and at sign-in, for those online
/// already), `offline` after the linger once their last connection
/// closes, nothing when they come back within it, and `offline` when
/// their instance is SIGKILLed.
#[tokio::test]
async fn watchlists_follow_users_across_instances_and_a_killed_one() {
    let redis = RedisServer::start().await;
    let a = Instance::start(pusher_config(&redis)).await;
    let (mut b, _dir) = pusher_process(&redis).await;
    let (pa, pb) = (port(&a.addr), port(&b.addr));
    let mut d = Driver::start().await;
    let changes = |client: &'static str, name: &'static str, user: &'static str| {
        move |v: &Value| {
            v["client"] == client
                && v["type"] == "watchlist"
                && v["name"] == name
                && v["user_ids"]
                    .as_array()
                    .is_some_and(|ids| ids.contains(&json!(user)))
        }
    };

    // u3 is online before the watcher signs in: told at sign-in.
    d.sign_in("u3a", pb, "u3", &[]).await;
    d.sign_in("w", pa, "watcher", &["u2", "u3"]).await;
    d.wait(changes("w", "online", "u3")).await;
    assert_eq!(d.count(changes("w", "online", "u2")), 0, "u2 is not online");

    // u2 signs in on the other instance.
    d.sign_in("u2a", pb, "u2", &[]).await;
    d.wait(changes("w", "online", "u2")).await;
    // A second connection of u2 changes nothing; closing one of two
    // neither.
    d.sign_in("u2b", pa, "u2", &[]).await;
    d.send(json!({"op": "disconnect", "client": "u2b"})).await;
    // Its last connection closes: offline, after the linger.
    d.send(json!({"op": "disconnect", "client": "u2a"})).await;
    d.wait(changes("w", "offline", "u2")).await;

    // u3 reloads its page: its connection on b closes and a new one signs
    // in on a within the linger; the watcher sees nothing of it.
    d.send(json!({"op": "disconnect", "client": "u3a"})).await;
    d.sign_in("u3b", pa, "u3", &[]).await;

    // u2 on b again, then b is killed: offline once b's members expire.
    d.sign_in("u2c", pb, "u2", &[]).await;
    d.wait_nth(changes("w", "online", "u2"), 2).await;
    b.sigkill().await;
    d.wait_nth(changes("w", "offline", "u2"), 2).await;
    // u3 stayed online through its reload: its one `online` was the first.
    assert_eq!(d.count(changes("w", "offline", "u3")), 0, "u3 flickered");
    assert_eq!(d.count(changes("w", "online", "u3")), 1, "u3 flickered");
    assert_eq!(d.count(changes("w", "online", "u2")), 2);
    drop(b);
    a.shutdown().await;
}

/// Issue 25, acceptance 5: `pusher_internal:subscription_count` reports
/// the fleet-wide count on both instances after joins and leaves, and
/// `info=subscription_count` (a channel, the listing, a trigger) agrees.
#[tokio::test]
async fn subscription_counts_are_fleet_wide_and_the_api_agrees() {
    let redis = RedisServer::start().await;
    let config = || {
        let mut config = pusher_config(&redis);
        config.events.stream = Some("crier:events".into());
        config.pusher.apps[0].subscription_count = true;
        config
    };
    let (a, b) = (
        Instance::start(config()).await,
        Instance::start(config()).await,
    );
    let (pa, pb) = (port(&a.addr), port(&b.addr));
    let mut d = Driver::start().await;
    let counted = |client: &'static str, n: u64| {
        move |v: &Value| {
            v["type"] == "subscription_count" && v["client"] == client && v["count"] == n
        }
    };
    d.connect("c1", pa, "u1").await;
    d.subscribe("c1", "orders").await;
    d.wait(counted("c1", 1)).await;
    d.connect("c2", pb, "u2").await;
    d.subscribe("c2", "orders").await;
    d.connect("c3", pb, "u3").await;
    d.subscribe("c3", "orders").await;
    for client in ["c1", "c2", "c3"] {
        d.wait(counted(client, 3)).await;
    }
    let info = json!({"info": "subscription_count"});
    let one = d.get("one", pa, "/channels/orders", info.clone()).await;
    assert_eq!(one["body"]["subscription_count"], 3, "{one}");
    let all = d.get("all", pb, "/channels", info.clone()).await;
    assert_eq!(
        all["body"]["channels"]["orders"]["subscription_count"], 3,
        "{all}"
    );
    let sent = d
        .trigger(
            "t",
            json!({"port": pa, "channels": ["orders"], "event": "x", "data": {}, "info": "subscription_count"}),
        )
        .await;
    assert_eq!(
        sent["body"]["channels"]["orders"]["subscription_count"], 3,
        "{sent}"
    );

    // Two leave on b: a's subscriber hears 1.
    d.send(json!({"op": "unsubscribe", "client": "c2", "channel": "orders"}))
        .await;
    d.send(json!({"op": "disconnect", "client": "c3"})).await;
    // The second 1 c1 hears (the first was when it was alone).
    d.wait_nth(counted("c1", 1), 2).await;
    let one = d.get("after", pb, "/channels/orders", info).await;
    assert_eq!(one["body"]["subscription_count"], 1, "{one}");
    a.shutdown().await;
    b.shutdown().await;
}

/// `info=subscription_count` is refused (400) for an app without
/// `subscription_count`, as on Pusher; the setting without `events.stream`
/// is refused at start, naming the field.
#[tokio::test]
async fn subscription_counts_need_the_app_setting_and_an_events_stream() {
    let redis = RedisServer::start().await;
    let crier = Instance::start(pusher_config(&redis)).await;
    let mut d = Driver::start().await;
    let refused = d
        .get(
            "off",
            port(&crier.addr),
            "/channels/orders",
            json!({"info": "subscription_count"}),
        )
        .await;
    assert_eq!(refused["status"], 400, "{refused}");
    crier.shutdown().await;

    let mut config = pusher_config(&redis);
    config.pusher.apps[0].subscription_count = true;
    let error = config.validate().expect_err("refused");
    assert!(
        error
            .to_string()
            .contains("pusher.apps[0].subscription_count")
            && error.to_string().contains("events.stream"),
        "{error}"
    );
}
