//! The Pusher Channels protocol, spoken to the ecosystem's real, unmodified
//! libraries: pusher-js (in Node) as the client, the `pusher` server SDK
//! for triggers, channel authorization and the HTTP API, against crier
//! instances on a real Redis.
//!
//! Needs node and `npm ci --prefix tests/pusher` (done by `.ci/run`).

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use common::crier::{Instance, WAIT};
use common::pusher::{port, pusher_config, pusher_process, Driver, KEY, SECRET};
use common::redis::RedisServer;
use common::ws::WsClient;
use crier::config::{PusherApp, Subscribe};
use serde_json::{json, Value};

#[tokio::test]
async fn pusher_js_hears_sdk_triggers_and_redis_publishes() {
    let redis = RedisServer::start().await;
    let crier = Instance::start(pusher_config(&redis)).await;
    let port = port(&crier.addr);
    let mut d = Driver::start().await;
    d.connect("a", port, "u1").await;
    assert_eq!(d.subscribe("a", "orders").await["type"], "subscribed");

    let sent = d
        .trigger("sdk", json!({"port": port, "channels": ["orders"], "event": "order.created", "data": {"id": 5}}))
        .await;
    assert_eq!(sent["status"], 200, "{sent}");
    let got = d.wait(d.event("a", "orders", "order.created")).await;
    assert_eq!(got["data"], json!({"id": 5}));

    // An app publishing to Redis directly: plain PUBLISH and crier_publish.
    redis
        .publish("orders", r#"{"type":"order.shipped","id":6}"#)
        .await;
    let got = d.wait(d.event("a", "orders", "order.shipped")).await;
    assert_eq!(got["data"], json!({"type": "order.shipped", "id": 6}));
    redis
        .fcall_publish("orders", r#"{"type":"order.paid","id":7}"#)
        .await;
    let got = d.wait(d.event("a", "orders", "order.paid")).await;
    assert_eq!(got["data"]["id"], 7);
    crier.shutdown().await;
}

/// Issue 23, acceptance 1: pusher-js in Node, speaking through the `ws`
/// library (which offers permessage-deflate, as browsers do), negotiates
/// compression with crier and hears every event intact, small and large,
/// and its own messages (the subscribe, client events) compressed by `ws`
/// are understood.
#[tokio::test]
async fn pusher_js_over_ws_negotiates_compression_and_hears_every_event() {
    let redis = RedisServer::start().await;
    let crier = Instance::start(pusher_config(&redis)).await;
    let port = port(&crier.addr);
    let mut d = Driver::start_over_ws().await;
    d.connect("a", port, "u1").await;
    assert_eq!(d.subscribe("a", "orders").await["type"], "subscribed");
    assert_eq!(crier.metric("crier_ws_compressed_connections").await, 1.0);

    let lines: Vec<String> = (0..40)
        .map(|i| format!("line {i}: shipped parcel {i} to warehouse {}", i % 3))
        .collect();
    let large = json!({"type": "order.log", "id": 8, "lines": lines});
    redis.publish("orders", &large.to_string()).await;
    let got = d.wait(d.event("a", "orders", "order.log")).await;
    assert_eq!(got["data"], large);
    redis
        .publish("orders", r#"{"type":"order.shipped","id":9}"#)
        .await;
    let got = d.wait(d.event("a", "orders", "order.shipped")).await;
    assert_eq!(got["data"], json!({"type": "order.shipped", "id": 9}));
    assert!(crier.metric("crier_ws_compressed_frames_total").await >= 1.0);
    crier.shutdown().await;
}

#[tokio::test]
async fn private_channels_need_the_apps_signature_and_crier_rules_still_apply() {
    let redis = RedisServer::start().await;
    let crier = Instance::start(pusher_config(&redis)).await;
    let port = port(&crier.addr);
    let mut d = Driver::start().await;
    d.connect("a", port, "u1").await;

    // Signed by the app's auth endpoint (the SDK's authorizeChannel).
    assert_eq!(
        d.subscribe("a", "private-orders.1").await["type"],
        "subscribed"
    );
    // The endpoint answers with a forged signature.
    let forged = d.subscribe("a", "private-orders.forged").await;
    assert_eq!(forged["type"], "subscription_error", "{forged}");
    assert_eq!(forged["data"]["status"], 401);
    // Correctly signed, but no rule allows it: deny by default.
    let unruled = d.subscribe("a", "private-invoices.1").await;
    assert_eq!(unruled["type"], "subscription_error", "{unruled}");
    assert_eq!(unruled["data"]["status"], 403);
    // A public channel no rule allows.
    let public = d.subscribe("a", "secrets").await;
    assert_eq!(public["data"]["status"], 403, "{public}");

    // Events reach the admitted channel only.
    d.trigger(
        "t",
        json!({"port": port, "channels": ["private-orders.1"], "event": "paid", "data": "x"}),
    )
    .await;
    d.wait(d.event("a", "private-orders.1", "paid")).await;

    // Without any signature (a hand-written client).
    let mut raw = WsClient::connect(&format!("ws://{}/app/{KEY}?protocol=7", crier.addr)).await;
    let hello = raw.recv_json(WAIT).await;
    assert_eq!(hello["event"], "pusher:connection_established");
    raw.send_json(json!({"event": "pusher:subscribe", "data": {"channel": "private-orders.2"}}))
        .await;
    let refused = raw.recv_json(WAIT).await;
    assert_eq!(refused["event"], "pusher:subscription_error", "{refused}");
    let data: Value =
        serde_json::from_str(refused["data"].as_str().expect("string data")).expect("json");
    assert_eq!(data["status"], 401);

    // An unknown app key: pusher:error 4001, and the close says the same.
    let mut unknown = WsClient::connect(&format!("ws://{}/app/nope?protocol=7", crier.addr)).await;
    let (code, _, frames) = unknown.expect_close(WAIT).await;
    assert_eq!(code, 4001);
    assert_eq!(frames[0]["data"]["code"], 4001, "{frames:?}");
    crier.shutdown().await;
}

#[tokio::test]
async fn presence_is_right_across_instances_and_a_killed_one_is_forgotten() {
    let redis = RedisServer::start().await;
    let a = Instance::start(pusher_config(&redis)).await;
    let (mut b, _dir) = pusher_process(&redis).await;
    let (pa, pb) = (port(&a.addr), port(&b.addr));
    let room = "presence-room";
    let mut d = Driver::start().await;

    d.connect("c1", pa, "u1").await;
    let first = d.subscribe("c1", room).await;
    assert_eq!(first["members"], json!(["u1"]), "{first}");
    d.connect("c2", pb, "u2").await;
    let second = d.subscribe_binding("c2", room, &["client-typing"]).await;
    assert_eq!(second["members"], json!(["u1", "u2"]), "{second}");
    d.wait(|v| v["client"] == "c1" && v["type"] == "member_added" && v["user"] == "u2")
        .await;
    // u1 again, on the other instance: a member already.
    d.connect("c3", pb, "u1").await;
    let third = d.subscribe("c3", room).await;
    assert_eq!(third["members"], json!(["u1", "u2"]), "{third}");

    // A client event from c1 (on a) reaches c2 and c3 (on b), with who
    // sent it, and not c1.
    d.send(json!({"op": "client_event", "client": "c1", "channel": room, "event": "client-typing", "data": {"n": 1}}))
        .await;
    d.wait(d.event("c2", room, "client-typing")).await;
    d.wait(d.event("c3", room, "client-typing")).await;

    // c3 leaves: u1 is still there through c1.
    d.send(json!({"op": "disconnect", "client": "c3"})).await;
    // A marker published after everything above: once every client has it,
    // every presence event before it has arrived too.
    d.trigger(
        "marker",
        json!({"port": pa, "channels": [room], "event": "marker", "data": "{}"}),
    )
    .await;
    d.wait(d.event("c1", room, "marker")).await;
    d.wait(d.event("c2", room, "marker")).await;
    let added =
        |user: &'static str| move |v: &Value| v["type"] == "member_added" && v["user"] == user;
    assert_eq!(d.count(added("u2")), 1, "one member_added for u2, to c1");
    // u1 was there before anyone else; c3 joining as u1 again adds nobody.
    assert_eq!(
        d.count(added("u1")),
        0,
        "no member_added for a second connection"
    );
    assert_eq!(d.count(|v| v["type"] == "member_removed"), 0, "nobody left");
    assert_eq!(
        d.count(d.event("c1", room, "client-typing")),
        0,
        "not echoed"
    );
    let typing = d.wait(d.event("c2", room, "client-typing")).await;
    assert_eq!(typing["data"], json!({"n": 1}));
    // On a presence channel it says who sent it (pusher-js's metadata).
    let bound = d
        .wait(|v| v["type"] == "bound" && v["client"] == "c2" && v["event"] == "client-typing")
        .await;
    assert_eq!(bound["user_id"], "u1", "{bound}");

    let listed = d
        .get("users", pa, &format!("/channels/{room}/users"), json!({}))
        .await;
    assert_eq!(
        listed["body"]["users"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );

    // b is killed (c2 on it): u2 is removed within ttl + heartbeat.
    b.sigkill().await;
    let removed = d
        .wait(|v| v["client"] == "c1" && v["type"] == "member_removed" && v["user"] == "u2")
        .await;
    assert_eq!(removed["channel"], room);
    let listed = d
        .get("after", pa, &format!("/channels/{room}/users"), json!({}))
        .await;
    assert_eq!(listed["body"]["users"], json!([{"id": "u1"}]), "{listed}");
    drop(b);
    a.shutdown().await;
}

/// A raw Pusher connection (a hand-written client): its socket id.
async fn raw_pusher(addr: &str, key: &str) -> (WsClient, String) {
    let mut ws = WsClient::connect(&format!("ws://{addr}/app/{key}?protocol=7")).await;
    let hello = ws.recv_json(WAIT).await;
    assert_eq!(hello["event"], "pusher:connection_established", "{hello}");
    let data: Value = serde_json::from_str(hello["data"].as_str().expect("string")).expect("json");
    let socket = data["socket_id"].as_str().expect("socket_id").to_owned();
    (ws, socket)
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

/// A channel authorization as the app's endpoint makes it.
fn channel_auth(key: &str, secret: &str, socket: &str, channel: &str) -> String {
    let sig = common::pusher::hmac_hex(secret, &format!("{socket}:{channel}"));
    format!("{key}:{sig}")
}

#[tokio::test]
async fn client_events_are_refused_on_public_channels_when_disabled_and_over_the_rate() {
    let redis = RedisServer::start().await;
    let mut config = pusher_config(&redis);
    config.pusher.client_events_per_second = 3;
    config.pusher.apps.push(PusherApp {
        id: "1002".into(),
        key: "quiet-key".into(),
        secret: "quiet-secret-of-16-bytes".into(),
        client_events: false,
        namespace: "quiet:".into(),
        ..Default::default()
    });
    // The quiet app's channels are `quiet:…` among crier's.
    config.channels.push(common::crier::rule(
        "quiet:private-orders.*",
        Subscribe::Claim,
    ));
    let crier = Instance::start(config).await;

    let (mut ws, socket) = raw_pusher(&crier.addr, KEY).await;
    ws.send_json(json!({"event": "pusher:subscribe", "data": {"channel": "orders"}}))
        .await;
    next_event(&mut ws, "pusher_internal:subscription_succeeded").await;
    ws.send_json(json!({"event": "client-hi", "channel": "orders", "data": {}}))
        .await;
    let refused = next_event(&mut ws, "pusher:error").await;
    let message = refused["data"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("private and presence"), "{refused}");

    // Over the rate: the fourth event in a burst of five is refused, 4301.
    let channel = "private-orders.9";
    let auth = channel_auth(KEY, SECRET, &socket, channel);
    ws.send_json(json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth}}))
        .await;
    next_event(&mut ws, "pusher_internal:subscription_succeeded").await;
    for n in 0..5 {
        ws.send_json(json!({"event": "client-n", "channel": channel, "data": {"n": n}}))
            .await;
    }
    let limited = next_event(&mut ws, "pusher:error").await;
    assert_eq!(limited["data"]["code"], 4301, "{limited}");

    // An app whose client events are off.
    let (mut quiet, socket) = raw_pusher(&crier.addr, "quiet-key").await;
    let auth = channel_auth("quiet-key", "quiet-secret-of-16-bytes", &socket, channel);
    quiet
        .send_json(json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth}}))
        .await;
    next_event(&mut quiet, "pusher_internal:subscription_succeeded").await;
    quiet
        .send_json(json!({"event": "client-hi", "channel": channel, "data": {}}))
        .await;
    let refused = next_event(&mut quiet, "pusher:error").await;
    let message = refused["data"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("disabled"), "{refused}");
    crier.shutdown().await;
}

#[tokio::test]
async fn the_http_api_batches_excludes_the_sender_counts_users_and_checks_signatures() {
    let redis = RedisServer::start().await;
    let crier = Instance::start(pusher_config(&redis)).await;
    let port = port(&crier.addr);
    let lobby = "presence-lobby";
    let mut d = Driver::start().await;
    let sender = d.connect("a", port, "u1").await;
    d.connect("b", port, "u2").await;
    for client in ["a", "b"] {
        assert_eq!(d.subscribe(client, "orders").await["type"], "subscribed");
        assert_eq!(d.subscribe(client, lobby).await["type"], "subscribed");
    }

    // `socket_id`: everyone but the sender.
    let sent = d
        .trigger("excl", json!({"port": port, "channels": ["orders"], "event": "mine", "data": "1", "socket_id": sender}))
        .await;
    assert_eq!(sent["status"], 200, "{sent}");
    // A batch of two, then a marker: once `a` has the marker it would have
    // had `mine` too.
    let batch = json!([
        {"channel": "orders", "name": "b1", "data": "{\"n\":1}"},
        {"channel": lobby, "name": "b2", "data": "{\"n\":2}"},
    ]);
    let sent = d
        .trigger("batch", json!({"port": port, "batch": batch}))
        .await;
    assert_eq!(sent["status"], 200, "{sent}");
    d.wait(d.event("b", "orders", "mine")).await;
    assert_eq!(
        d.wait(d.event("a", "orders", "b1")).await["data"],
        json!({"n": 1})
    );
    assert_eq!(
        d.wait(d.event("b", lobby, "b2")).await["data"],
        json!({"n": 2})
    );
    d.trigger(
        "marker",
        json!({"port": port, "channels": ["orders"], "event": "marker", "data": "{}"}),
    )
    .await;
    d.wait(d.event("a", "orders", "marker")).await;
    assert_eq!(
        d.count(d.event("a", "orders", "mine")),
        0,
        "the sender is excluded"
    );

    // `info=user_count` on a trigger, and the channel listings.
    let sent = d
        .trigger("info", json!({"port": port, "channels": [lobby], "event": "x", "data": "{}", "info": "user_count"}))
        .await;
    assert_eq!(sent["body"]["channels"][lobby]["user_count"], 2, "{sent}");
    let listed = d
        .get(
            "presence",
            port,
            "/channels",
            json!({"filter_by_prefix": "presence-", "info": "user_count"}),
        )
        .await;
    assert_eq!(
        listed["body"],
        json!({"channels": {lobby: {"user_count": 2}}}),
        "{listed}"
    );
    let all = d.get("all", port, "/channels", json!({})).await;
    assert_eq!(
        all["body"],
        json!({"channels": {"orders": {}, lobby: {}}}),
        "{all}"
    );
    let one = d
        .get(
            "one",
            port,
            &format!("/channels/{lobby}"),
            json!({"info": "user_count"}),
        )
        .await;
    assert_eq!(
        one["body"],
        json!({"occupied": true, "user_count": 2}),
        "{one}"
    );
    let empty = d
        .get("empty", port, "/channels/nobody-here", json!({}))
        .await;
    assert_eq!(empty["body"], json!({"occupied": false}), "{empty}");

    // A wrong secret, and a clock ten minutes and more off either way: 401,
    // and nothing is published.
    for (tag, extra) in [
        ("secret", json!({"secret": "not-the-app-secret-at-all"})),
        ("past", json!({"clock_offset_ms": -700_000})),
        ("future", json!({"clock_offset_ms": 700_000})),
    ] {
        let mut command =
            json!({"port": port, "channels": ["orders"], "event": "forged", "data": "{}"});
        for (k, v) in extra.as_object().expect("object") {
            command[k] = v.clone();
        }
        let refused = d.trigger(tag, command).await;
        assert_eq!(refused["status"], 401, "{tag}: {refused}");
    }
    d.trigger(
        "marker2",
        json!({"port": port, "channels": ["orders"], "event": "marker2", "data": "{}"}),
    )
    .await;
    d.wait(d.event("a", "orders", "marker2")).await;
    assert_eq!(d.count(d.event("a", "orders", "forged")), 0);
    crier.shutdown().await;
}

#[tokio::test]
async fn cache_channels_send_their_last_event_or_a_cache_miss() {
    let redis = RedisServer::start().await;
    let crier = Instance::start(pusher_config(&redis)).await;
    redis
        .fcall_publish("cache-price", r#"{"type":"price","v":1}"#)
        .await;
    redis
        .fcall_publish("cache-price", r#"{"type":"price","v":2}"#)
        .await;
    let mut d = Driver::start().await;
    d.connect("a", port(&crier.addr), "u1").await;
    assert_eq!(d.subscribe("a", "cache-price").await["type"], "subscribed");
    let last = d.wait(d.event("a", "cache-price", "price")).await;
    assert_eq!(last["data"]["v"], 2, "{last}");
    assert_eq!(d.subscribe("a", "cache-empty").await["type"], "subscribed");
    d.wait(|v| v["type"] == "cache_miss" && v["channel"] == "cache-empty")
        .await;
    // Only the last one was sent.
    assert_eq!(d.count(d.event("a", "cache-price", "price")), 1);
    crier.shutdown().await;
}

/// A cache channel whose history keeps one message (the usual setting
/// for a cache) sends that message: that history has trimmed what came
/// before it, which is no loss to a client asking for the last event only.
/// (Redis trims whole nodes of 100 entries: after 101 messages the stream
/// holds the last one alone, and reports what came before it as gone.)
#[tokio::test]
async fn a_cache_channel_keeping_one_message_sends_it() {
    let redis = RedisServer::start().await;
    let mut config = pusher_config(&redis);
    config
        .channels
        .insert(0, common::crier::history_rule("cache-one", 1));
    let crier = Instance::start(config).await;
    for v in 1..=101 {
        let event = format!(r#"{{"type":"rate","v":{v}}}"#);
        redis.fcall_publish("cache-one", &event).await.expect("id");
    }
    let key = crier::testing::history::stream_key("", "cache-one");
    assert_eq!(
        redis.cli(&["XLEN", &key]).await.trim(),
        "1",
        "trimmed to one"
    );
    let (mut ws, _) = raw_pusher(&crier.addr, KEY).await;
    ws.send_json(json!({"event": "pusher:subscribe", "data": {"channel": "cache-one"}}))
        .await;
    let ok = next_event(&mut ws, "pusher_internal:subscription_succeeded").await;
    assert_eq!(ok["channel"], "cache-one", "{ok}");
    let next = ws.recv_json(WAIT).await;
    assert_eq!(
        next["event"], "rate",
        "the last event, not a cache miss: {next}"
    );
    let data: Value = serde_json::from_str(next["data"].as_str().expect("data")).expect("json");
    assert_eq!(data["v"], 101, "{next}");
    crier.shutdown().await;
}

/// Issue 22, acceptance 3: a `cache-` subscribe makes one position read
/// and one history read of its channel, whether it has a last event or
/// not (the transport used to read both again to find the last event) —
/// counted in what Redis executes (`MONITOR`).
#[tokio::test]
async fn a_cache_subscribe_reads_position_and_history_once() {
    let redis = RedisServer::start().await;
    let crier = Instance::start(pusher_config(&redis)).await;
    for v in 1..=2 {
        let event = format!(r#"{{"type":"rate","v":{v}}}"#);
        redis.fcall_publish("cache-rate", &event).await.expect("id");
    }
    let mut monitor = redis.monitor().await;
    let (mut ws, _) = raw_pusher(&crier.addr, KEY).await;
    for channel in ["cache-rate", "cache-none"] {
        ws.send_json(json!({"event": "pusher:subscribe", "data": {"channel": channel}}))
            .await;
    }
    let mut frames = Vec::new();
    let miss = loop {
        let frame = ws.recv_json(WAIT).await;
        if frame["event"] == "pusher:cache_miss" {
            break frame;
        }
        frames.push(frame);
    };
    assert_eq!(miss["channel"], "cache-none", "{miss}");
    let succeeded = |f: &&Value| f["event"] == "pusher_internal:subscription_succeeded";
    let channels: Vec<&Value> = frames
        .iter()
        .filter(succeeded)
        .map(|f| &f["channel"])
        .collect();
    assert_eq!(channels, ["cache-rate", "cache-none"], "{frames:?}");
    let rates: Vec<&Value> = frames.iter().filter(|f| f["event"] == "rate").collect();
    assert_eq!(rates.len(), 1, "the last event only: {frames:?}");
    let data: Value = serde_json::from_str(rates[0]["data"].as_str().expect("data")).expect("json");
    assert_eq!(data["v"], 2, "{frames:?}");

    let executed = monitor.until_now().await;
    for channel in ["cache-rate", "cache-none"] {
        let key = format!("\"{}\"", crier::testing::history::stream_key("", channel));
        let count = |function: &str| {
            let function = format!("\"{function}\"");
            executed
                .iter()
                .filter(|line| line.contains(&key) && line.contains(&function))
                .count()
        };
        assert_eq!(
            (count("crier_position"), count("crier_since")),
            (1, 1),
            "{channel}: crier_position and crier_since, once each: {executed:#?}"
        );
    }
    crier.shutdown().await;
}

#[tokio::test]
async fn a_draining_instance_tells_pusher_clients_to_reconnect_with_4200() {
    let redis = RedisServer::start().await;
    let crier = Instance::start(pusher_config(&redis)).await;
    let (mut ws, _) = raw_pusher(&crier.addr, KEY).await;
    let shutdown = tokio::spawn(crier.shutdown());
    let (code, _, frames) = ws.expect_close(WAIT).await;
    assert_eq!(code, 4200, "{frames:?}");
    assert!(
        frames
            .iter()
            .any(|f| f["event"] == "pusher:error" && f["data"]["code"] == 4200),
        "{frames:?}"
    );
    shutdown.await.expect("shutdown");
}

#[tokio::test]
async fn presence_works_on_the_memory_broker_too() {
    let mut config = pusher_config(&RedisServer::start().await);
    config.redis.url = None;
    let crier = Instance::start(config).await;
    let port = port(&crier.addr);
    let mut d = Driver::start().await;
    d.connect("a", port, "u1").await;
    d.connect("b", port, "u2").await;
    assert_eq!(
        d.subscribe("a", "presence-m").await["members"],
        json!(["u1"])
    );
    assert_eq!(
        d.subscribe("b", "presence-m").await["members"],
        json!(["u1", "u2"])
    );
    d.wait(|v| v["client"] == "a" && v["type"] == "member_added" && v["user"] == "u2")
        .await;
    d.send(json!({"op": "disconnect", "client": "b"})).await;
    d.wait(|v| v["client"] == "a" && v["type"] == "member_removed" && v["user"] == "u2")
        .await;
    crier.shutdown().await;
}

#[tokio::test]
async fn malformed_messages_get_a_clear_error_and_the_connection_stays_usable() {
    let redis = RedisServer::start().await;
    let crier = Instance::start(pusher_config(&redis)).await;
    let (mut ws, _) = raw_pusher(&crier.addr, KEY).await;
    for (bad, expected) in [
        ("not json", "not a Pusher message"),
        (r#"{"data":{}}"#, "not a Pusher message"),
        (
            r#"{"event":"pusher:subscribe","data":{"chanel":"orders"}}"#,
            "bad pusher:subscribe",
        ),
        (r#"{"event":"pusher:nonsense"}"#, "unsupported event"),
        (r#"{"event":"client-x","data":{}}"#, "needs a channel"),
    ] {
        ws.send_text(bad).await;
        let error = next_event(&mut ws, "pusher:error").await;
        let message = error["data"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(expected), "{bad} → {error}");
    }
    // Still usable: a subscription and an event.
    ws.send_json(json!({"event": "pusher:subscribe", "data": {"channel": "orders"}}))
        .await;
    next_event(&mut ws, "pusher_internal:subscription_succeeded").await;
    ws.send_json(json!({"event": "pusher:ping", "data": {}}))
        .await;
    next_event(&mut ws, "pusher:pong").await;
    redis.publish("orders", r#"{"type":"still","n":1}"#).await;
    let event = next_event(&mut ws, "still").await;
    assert_eq!(event["channel"], "orders");
    let data: Value = serde_json::from_str(event["data"].as_str().expect("string")).expect("json");
    assert_eq!(data["n"], 1);
    crier.shutdown().await;
}

/// Two apps (1001 without a namespace, 1002 in `app2:`) on two instances
/// of one Redis, with the same channel names: events, client events,
/// cache, members and channel listings of one never reach the other; and
/// crier's own channels are listed by neither.
#[tokio::test]
async fn two_apps_on_two_instances_see_nothing_of_each_other() {
    let (id2, key2, secret2) = ("1002", "other-key", "other-secret-of-16-bytes");
    let redis = RedisServer::start().await;
    let mut config = pusher_config(&redis);
    config.pusher.apps.push(PusherApp {
        id: id2.into(),
        key: key2.into(),
        secret: secret2.into(),
        client_events: true,
        namespace: "app2:".into(),
        ..Default::default()
    });
    let mut cache = common::crier::rule("app2:cache-*", Subscribe::Anyone);
    cache.history = config.channels[3].history;
    config.channels.extend([
        common::crier::rule("app2:private-orders.*", Subscribe::Claim),
        common::crier::rule("app2:presence-*", Subscribe::Claim),
        cache,
    ]);
    let x = Instance::start(config.clone()).await;
    let y = Instance::start(config).await;
    let (px, py) = (port(&x.addr), port(&y.addr));
    let mut one = Driver::start().await;
    let mut two = Driver::start_as(id2, key2, secret2).await;
    let (private, room, cached) = ("private-orders.1", "presence-room", "cache-news");

    // The same names in both apps, each signed by its own app; app 1's
    // clients on x and y, app 2's on y.
    one.connect("a", px, "u1").await;
    one.connect("b", py, "u1b").await;
    two.connect("c", py, "u2").await;
    for client in ["a", "b"] {
        assert_eq!(one.subscribe(client, private).await["type"], "subscribed");
    }
    assert_eq!(two.subscribe("c", private).await["type"], "subscribed");
    assert_eq!(one.subscribe("a", "orders").await["type"], "subscribed");
    assert_eq!(one.subscribe("a", room).await["members"], json!(["u1"]));
    let joined = two.subscribe("c", room).await;
    assert_eq!(
        joined["members"],
        json!(["u2"]),
        "app 1's u1 is not in app 2's room: {joined}"
    );

    // Events from each app's SDK, and a client event of app 1.
    let sent = two
        .trigger(
            "t2",
            json!({"port": py, "channels": [private, room], "event": "from-2", "data": "{}"}),
        )
        .await;
    assert_eq!(sent["status"], 200, "{sent}");
    one.send(json!({"op": "client_event", "client": "a", "channel": private, "event": "client-hi", "data": {"n": 1}}))
        .await;
    one.wait(one.event("b", private, "client-hi")).await;
    let sent = one
        .trigger("t1", json!({"port": px, "channels": [private, room, cached], "event": "from-1", "data": "{}"}))
        .await;
    assert_eq!(sent["status"], 200, "{sent}");
    one.wait(one.event("a", private, "from-1")).await;
    one.wait(one.event("a", room, "from-1")).await;
    two.wait(two.event("c", private, "from-2")).await;
    two.wait(two.event("c", room, "from-2")).await;
    // Markers published after everything above, on each app's channels:
    // once each client has its own, anything leaked would be there too.
    two.trigger(
        "m2",
        json!({"port": px, "channels": [private, room], "event": "marker", "data": "{}"}),
    )
    .await;
    one.trigger(
        "m1",
        json!({"port": py, "channels": [private, room], "event": "marker", "data": "{}"}),
    )
    .await;
    for client in ["a", "b"] {
        one.wait(one.event(client, private, "marker")).await;
    }
    one.wait(one.event("a", room, "marker")).await;
    two.wait(two.event("c", private, "marker")).await;
    two.wait(two.event("c", room, "marker")).await;
    let markers = |v: &Value| v["type"] == "event" && v["event"] == "marker";
    assert_eq!(one.count(markers), 3, "app 1 hears only its own markers");
    assert_eq!(two.count(markers), 2, "app 2 hears only its own markers");
    assert_eq!(
        one.count(|v| v["event"] == "from-2"),
        0,
        "app 2's from-2 reached app 1"
    );
    for event in ["from-1", "client-hi"] {
        assert_eq!(
            two.count(|v| v["event"] == event),
            0,
            "app 1's {event} reached app 2"
        );
    }
    assert_eq!(
        one.count(|v| v["type"] == "member_added"),
        0,
        "u2 is not app 1's"
    );
    assert_eq!(
        two.count(|v| v["type"] == "member_added"),
        0,
        "u1 is not app 2's"
    );

    // Cache: app 1's last event on `cache-news` is not app 2's.
    let (mut raw, _) = raw_pusher(&y.addr, key2).await;
    raw.send_json(json!({"event": "pusher:subscribe", "data": {"channel": cached}}))
        .await;
    next_event(&mut raw, "pusher_internal:subscription_succeeded").await;
    let miss = next_event(&mut raw, "pusher:cache_miss").await;
    assert_eq!(miss["channel"], cached, "{miss}");

    // Listings: each app's own channels, by their Pusher names; neither
    // lists crier's own `public:…` channel a /ws client holds.
    let mut native = WsClient::connect(&x.ws("/ws")).await;
    let native_channel = common::unique("public:native");
    assert_eq!(
        native.subscribe(&native_channel, 1).await["type"],
        "subscribed"
    );
    let listed = |v: &Value| {
        let mut names: Vec<String> = v["body"]["channels"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        names.sort();
        names
    };
    let mine = one.get("l1", px, "/channels", json!({})).await;
    assert_eq!(
        listed(&mine),
        ["orders", "presence-room", "private-orders.1"],
        "{mine}"
    );
    let theirs = two.get("l2", py, "/channels", json!({})).await;
    assert_eq!(
        listed(&theirs),
        ["cache-news", "presence-room", "private-orders.1"],
        "app 2's raw client holds its cache-news: {theirs}"
    );
    let users = two
        .get("u2", px, &format!("/channels/{room}/users"), json!({}))
        .await;
    assert_eq!(users["body"]["users"], json!([{"id": "u2"}]), "{users}");
    let users = one
        .get("u1", py, &format!("/channels/{room}/users"), json!({}))
        .await;
    assert_eq!(users["body"]["users"], json!([{"id": "u1"}]), "{users}");
    let info = two.get("o2", px, "/channels/orders", json!({})).await;
    assert_eq!(
        info["body"]["occupied"], false,
        "app 1's `orders` is not app 2's: {info}"
    );
    drop(native);
    x.shutdown().await;
    y.shutdown().await;
}

/// A presence channel authorization for `channel_data`, as the app's
/// endpoint makes it.
fn presence_auth(key: &str, secret: &str, socket: &str, channel: &str, data: &str) -> String {
    let sig = common::pusher::hmac_hex(secret, &format!("{socket}:{channel}:{data}"));
    format!("{key}:{sig}")
}

/// Joins `channel` on a raw connection with `channel_data`: the
/// `subscription_succeeded` or `subscription_error` frame.
async fn join_raw(addr: &str, channel: &str, data: &str) -> (WsClient, Value) {
    let (mut ws, socket) = raw_pusher(addr, KEY).await;
    let auth = presence_auth(KEY, SECRET, &socket, channel, data);
    ws.send_json(json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth, "channel_data": data}}))
        .await;
    loop {
        let v = ws.recv_json(WAIT).await;
        if v["event"] == "pusher_internal:subscription_succeeded"
            || v["event"] == "pusher:subscription_error"
        {
            return (ws, v);
        }
    }
}

/// Presence members are bounded: `user_info` up to 1,024 bytes of JSON
/// and ids that are non-empty strings (or numbers) of up to 128 bytes;
/// one more byte, or any other id, is refused with status 400 and joins
/// nobody. A member's info is one record whatever the protocol: crier's
/// own `/ws` join of the same user keeps the Pusher member's info.
#[tokio::test]
async fn presence_members_are_bounded_and_one_record_per_user() {
    let redis = RedisServer::start().await;
    let mut config = pusher_config(&redis);
    // `presence-*` also for crier's own signed-in clients.
    config.channels[2] = common::crier::rule("presence-*", Subscribe::Anyone);
    config.channels[2].presence = true;
    let secret = "a-jwt-secret-of-at-least-32-bytes!!";
    config.auth.jwt = Some(crier::config::JwtConfig {
        algorithms: vec!["HS256".into()],
        secret: Some(secret.into()),
        ..crier::config::JwtConfig::default()
    });
    let crier = Instance::start(config).await;
    let room = &common::unique("presence-bounds");
    let status = |v: &Value| -> Value {
        let data: Value =
            serde_json::from_str(v["data"].as_str().unwrap_or("{}")).unwrap_or_default();
        data["status"].clone()
    };

    // user_info: 1,024 bytes of JSON (`"` + 1,022 + `"`) joins; 1,025 does not.
    let info = |n: usize| format!("\"{}\"", "i".repeat(n - 2));
    let data = |id: &str, info: &str| format!(r#"{{"user_id":{id},"user_info":{info}}}"#);
    let (_at_cap, ok) = join_raw(&crier.addr, room, &data("\"cap\"", &info(1024))).await;
    assert_eq!(
        ok["event"], "pusher_internal:subscription_succeeded",
        "{ok}"
    );
    let (_over, refused) = join_raw(&crier.addr, room, &data("\"over\"", &info(1025))).await;
    assert_eq!(refused["event"], "pusher:subscription_error", "{refused}");
    assert_eq!(status(&refused), 400, "{refused}");
    // Ids: 128 bytes join, 129 do not; nor null, "", objects, booleans.
    let long = |n: usize| format!("\"{}\"", "u".repeat(n));
    let (_long_ok, ok) = join_raw(&crier.addr, room, &data(&long(128), "null")).await;
    assert_eq!(
        ok["event"], "pusher_internal:subscription_succeeded",
        "{ok}"
    );
    for id in [
        long(129),
        "null".into(),
        "\"\"".into(),
        "{}".into(),
        "true".into(),
    ] {
        let (_ws, refused) = join_raw(&crier.addr, room, &data(&id, "null")).await;
        assert_eq!(
            refused["event"], "pusher:subscription_error",
            "{id}: {refused}"
        );
        assert_eq!(status(&refused), 400, "{id}: {refused}");
    }
    let (_seven, ok) = join_raw(&crier.addr, room, &data("7", r#"{"name":"Seven"}"#)).await;
    assert_eq!(
        ok["event"], "pusher_internal:subscription_succeeded",
        "{ok}"
    );

    // The same user 7 through crier's own protocol, with no info: the
    // member stays one, with the Pusher info.
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "7", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign");
    let bearer = format!("Bearer {token}");
    let mut own = WsClient::try_connect(&crier.ws("/ws"), &[("authorization", &bearer)])
        .await
        .expect("connect");
    assert_eq!(own.subscribe(room, 1).await["type"], "subscribed");
    let (_late, seen) = join_raw(&crier.addr, room, &data("\"late\"", "null")).await;
    let presence: Value = serde_json::from_str(seen["data"].as_str().expect("data")).expect("json");
    assert_eq!(
        presence["presence"]["hash"]["7"],
        json!({"name": "Seven"}),
        "{presence}"
    );
    assert_eq!(
        presence["presence"]["count"], 4,
        "cap, 128 u's, 7, late: {presence}"
    );
    crier.shutdown().await;
}

/// `batch_events` is checked whole before anything is published: a
/// batch whose second event is bad (a reserved name) is refused (400,
/// naming it) and its first event reaches nobody.
#[tokio::test]
async fn a_batch_with_a_bad_event_publishes_nothing() {
    let redis = RedisServer::start().await;
    let crier = Instance::start(pusher_config(&redis)).await;
    let port = port(&crier.addr);
    let mut d = Driver::start().await;
    d.connect("a", port, "u1").await;
    assert_eq!(d.subscribe("a", "orders").await["type"], "subscribed");
    let batch = json!([
        {"channel": "orders", "name": "first", "data": "{}"},
        {"channel": "orders", "name": "pusher:second", "data": "{}"},
    ]);
    let sent = d
        .trigger("bad", json!({"port": port, "batch": batch}))
        .await;
    assert_eq!(sent["status"], 400, "{sent}");
    assert!(
        sent.to_string().contains("batch[1]"),
        "the answer names the bad event: {sent}"
    );
    d.trigger(
        "marker",
        json!({"port": port, "channels": ["orders"], "event": "marker", "data": "{}"}),
    )
    .await;
    d.wait(d.event("a", "orders", "marker")).await;
    assert_eq!(
        d.count(d.event("a", "orders", "first")),
        0,
        "nothing of the bad batch"
    );
    crier.shutdown().await;
}

/// Issue 25: `private-encrypted-` channels, end to end with the
/// unmodified libraries. The `pusher` SDK (with the app's master key)
/// encrypts what it triggers and its authorization hands each subscriber
/// the channel's key; crier checks the signature as for a private channel
/// and relays the ciphertext untouched, so pusher-js decrypts the event
/// on two instances. A client event there is refused, as Pusher refuses
/// it, and a subscription without a valid signature too.
#[tokio::test]
async fn encrypted_channels_are_relayed_end_to_end() {
    let redis = RedisServer::start().await;
    let mut instances = Vec::new();
    for _ in 0..2 {
        let mut config = pusher_config(&redis);
        let rule = common::crier::rule("private-encrypted-*", Subscribe::Claim);
        config.channels.insert(0, rule);
        instances.push(Instance::start(config).await);
    }
    let (pa, pb) = (port(&instances[0].addr), port(&instances[1].addr));
    let room = "private-encrypted-room";
    let mut d = Driver::start().await;
    d.connect("c1", pa, "u1").await;
    d.connect("c2", pb, "u2").await;
    for client in ["c1", "c2"] {
        let subscribed = d.subscribe(client, room).await;
        assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    }
    d.trigger(
        "secret",
        json!({"port": pa, "channels": [room], "event": "note", "data": {"text": "for your eyes only"}}),
    )
    .await;
    for client in ["c1", "c2"] {
        let seen = d.wait(d.event(client, room, "note")).await;
        assert_eq!(
            seen["data"],
            json!({"text": "for your eyes only"}),
            "{seen}"
        );
    }

    // What crier relayed is ciphertext: a socket that does not decrypt (a
    // raw Pusher-protocol client with a valid signature) gets the SDK's
    // nonce and ciphertext.
    let socket = {
        let url = instances[1].ws(&format!("/app/{KEY}?protocol=7"));
        let mut raw = WsClient::connect(&url).await;
        let hello = raw.recv_json(WAIT).await;
        let data: Value =
            serde_json::from_str(hello["data"].as_str().expect("data")).expect("json");
        let socket_id = data["socket_id"].as_str().expect("socket id").to_owned();
        let auth = format!(
            "{KEY}:{}",
            common::pusher::hmac_hex(SECRET, &format!("{socket_id}:{room}"))
        );
        raw.send_json(
            json!({"event": "pusher:subscribe", "data": {"channel": room, "auth": auth}}),
        )
        .await;
        let ok = raw.recv_json(WAIT).await;
        assert_eq!(
            ok["event"], "pusher_internal:subscription_succeeded",
            "{ok}"
        );
        raw
    };
    let mut raw = socket;
    d.trigger(
        "again",
        json!({"port": pb, "channels": [room], "event": "note", "data": {"text": "again"}}),
    )
    .await;
    let relayed = raw.recv_json(WAIT).await;
    assert_eq!(relayed["event"], "note", "{relayed}");
    let sealed: Value =
        serde_json::from_str(relayed["data"].as_str().expect("a string")).expect("json");
    assert!(
        sealed["nonce"].is_string() && sealed["ciphertext"].is_string(),
        "{sealed}"
    );
    assert!(
        !relayed.to_string().contains("again"),
        "no plaintext: {relayed}"
    );

    // A client event on an encrypted channel: refused.
    raw.send_json(json!({"event": "client-peek", "channel": room, "data": {}}))
        .await;
    let refused = raw.recv_json(WAIT).await;
    assert_eq!(refused["event"], "pusher:error", "{refused}");
    assert!(
        refused.to_string().contains("encrypted"),
        "says why: {refused}"
    );

    // Without a valid signature: refused as on a private channel.
    let url = instances[0].ws(&format!("/app/{KEY}?protocol=7"));
    let mut forger = WsClient::connect(&url).await;
    forger.recv_json(WAIT).await;
    forger
        .send_json(json!({"event": "pusher:subscribe", "data": {"channel": room, "auth": format!("{KEY}:{}", "0".repeat(64))}}))
        .await;
    let denied = forger.recv_json(WAIT).await;
    assert_eq!(denied["event"], "pusher:subscription_error", "{denied}");
}
