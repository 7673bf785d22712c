//! Publications reach subscribers, as the envelope, over both transports and
//! both brokers; refused channels leak nothing; instances share one Redis.

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use common::crier::{test_config, Instance, WAIT};
use common::redis::RedisServer;
use common::sse;
use common::unique;
use common::ws::WsClient;
use futures_util::future::join_all;
use http::StatusCode;
use serde_json::{json, Value};

const API_KEY: &str = "test-api-key-0123456789";

/// One crier on either broker, and a way to publish that suits it.
struct Setup {
    redis: Option<RedisServer>,
    crier: Instance,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Memory,
    Redis,
}

impl Setup {
    async fn new(kind: Kind) -> Setup {
        let redis = match kind {
            Kind::Memory => None,
            Kind::Redis => Some(RedisServer::start().await),
        };
        let mut config = test_config(redis.as_ref().map(RedisServer::url));
        config.publish.api_keys = vec![API_KEY.into()];
        let crier = Instance::start(config).await;
        Setup { redis, crier }
    }

    /// Publishes a JSON payload the way an app would with this broker.
    async fn publish(&self, channel: &str, payload: &str) {
        match &self.redis {
            Some(redis) => {
                redis.publish(channel, payload).await;
            }
            None => {
                let status = self
                    .crier
                    .publish_api(channel, payload, Some(API_KEY))
                    .await;
                assert_eq!(status, StatusCode::OK);
            }
        }
    }
}

fn envelope(channel: &str, event: Option<&str>, data: Value) -> Value {
    let mut e = json!({"type": "message", "channel": channel, "data": data});
    if let Some(event) = event {
        e["event"] = json!(event);
    }
    e
}

/// Acceptance 1, literally: `redis-cli PUBLISH` reaches a WS and an SSE client.
#[tokio::test]
async fn redis_cli_publish_reaches_ws_and_sse_as_the_envelope() {
    let redis = RedisServer::start().await;
    let crier = Instance::start(test_config(Some(redis.url()))).await;
    let channel = unique("public:a");

    let mut ws = WsClient::connect(&crier.ws("/ws")).await;
    assert_eq!(ws.recv_type("welcome", WAIT).await["type"], "welcome");
    assert_eq!(
        ws.subscribe(&channel, 1).await,
        json!({"type": "subscribed", "channel": channel, "id": 1})
    );
    let response = sse::connect(&crier.sse_url(&[&channel]), &[]).await;
    assert_eq!(response.status, StatusCode::OK);
    let header = |name: &str| response.headers[name].to_str().expect("ascii").to_string();
    assert!(header("content-type").starts_with("text/event-stream"));
    assert_eq!(header("cache-control"), "no-cache");
    assert_eq!(header("x-accel-buffering"), "no");
    let mut events = response.into_events();
    let first = events.next_event(WAIT).await.expect("retry first");
    assert_eq!(first.retry, Some(3000));

    let receivers = redis
        .cli(&["PUBLISH", &channel, r#"{"type":"greet","n":1}"#])
        .await;
    assert_eq!(receivers.trim(), "1", "one crier instance subscribed");

    let expected = envelope(&channel, Some("greet"), json!({"type": "greet", "n": 1}));
    assert_eq!(ws.recv_json(WAIT).await, expected);
    let event = events.next_message(WAIT).await.expect("sse event");
    assert_eq!(event.event.as_deref(), Some("greet"));
    assert_eq!(event.json(), expected);
}

async fn payloads_without_type_have_no_event_name(kind: Kind) {
    let setup = Setup::new(kind).await;
    let channel = unique("public:plain");
    let mut events = sse::connect(&setup.crier.sse_url(&[&channel]), &[])
        .await
        .into_events();
    setup.publish(&channel, r#"[1, "two"]"#).await;
    setup.publish(&channel, r#""just a string""#).await;
    let e = events.next_message(WAIT).await.expect("event");
    assert_eq!(
        e.event, None,
        "no `event:` line: browsers see it as `message`"
    );
    assert_eq!(e.json(), envelope(&channel, None, json!([1, "two"])));
    let e = events.next_message(WAIT).await.expect("event");
    assert_eq!(e.json()["data"], "just a string");
}

#[tokio::test]
async fn payloads_without_type_have_no_event_name_memory() {
    payloads_without_type_have_no_event_name(Kind::Memory).await;
}

#[tokio::test]
async fn payloads_without_type_have_no_event_name_redis() {
    payloads_without_type_have_no_event_name(Kind::Redis).await;
}

/// Acceptance 2: 1,000 subscribers (half WS, half SSE) each get all 100
/// messages, in order.
async fn thousand_subscribers_get_every_message_in_order(kind: Kind) {
    rlimit::increase_nofile_limit(10_000).expect("raise the open-files limit");
    let setup = Setup::new(kind).await;
    let channel = unique("public:crowd");
    const CLIENTS: usize = 1000;
    const MESSAGES: u64 = 100;

    let ws_clients = join_all((0..CLIENTS / 2).map(|_| {
        let url = setup.crier.ws(&format!("/ws?channel={channel}"));
        async move {
            let mut ws = WsClient::connect(&url).await;
            ws.recv_type("subscribed", WAIT).await;
            ws
        }
    }))
    .await;
    let sse_clients = join_all((0..CLIENTS / 2).map(|_| {
        let url = setup.crier.sse_url(&[&channel]);
        async move {
            let response = sse::connect(&url, &[]).await;
            assert_eq!(response.status, StatusCode::OK);
            response.into_events()
        }
    }))
    .await;
    setup
        .crier
        .wait_metric("crier_subscriptions", CLIENTS as f64)
        .await;

    let readers: Vec<_> = ws_clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while seen.len() < MESSAGES as usize {
                    seen.push(ws.recv_type("message", WAIT).await["data"]["n"].as_u64());
                }
                seen
            })
        })
        .chain(sse_clients.into_iter().map(|mut events| {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while seen.len() < MESSAGES as usize {
                    let e = events.next_message(WAIT).await.expect("stream open");
                    seen.push(e.json()["data"]["n"].as_u64());
                }
                seen
            })
        }))
        .collect();

    for n in 0..MESSAGES {
        setup.publish(&channel, &format!(r#"{{"n":{n}}}"#)).await;
    }
    let expected: Vec<Option<u64>> = (0..MESSAGES).map(Some).collect();
    for (i, reader) in join_all(readers).await.into_iter().enumerate() {
        assert_eq!(reader.expect("reader"), expected, "client {i}");
    }
    let delivered = setup
        .crier
        .metric("crier_messages_delivered_total{transport=\"ws\"}")
        .await
        + setup
            .crier
            .metric("crier_messages_delivered_total{transport=\"sse\"}")
            .await;
    assert_eq!(delivered, (CLIENTS as u64 * MESSAGES) as f64);
    assert_eq!(
        setup.crier.metric("crier_messages_received_total").await,
        MESSAGES as f64,
        "each publication is received (and encoded) once"
    );
}

#[tokio::test]
async fn thousand_subscribers_get_every_message_in_order_memory() {
    thousand_subscribers_get_every_message_in_order(Kind::Memory).await;
}

#[tokio::test]
async fn thousand_subscribers_get_every_message_in_order_redis() {
    thousand_subscribers_get_every_message_in_order(Kind::Redis).await;
}

/// Acceptance 3: a channel no rule matches is refused, and nothing of it
/// reaches the client, not even a Redis subscription.
#[tokio::test]
async fn channel_without_rule_is_refused_and_nothing_leaks() {
    let redis = RedisServer::start().await;
    let crier = Instance::start(test_config(Some(redis.url()))).await;
    let private = unique("private:x");
    let public = unique("public:ok");

    let response = sse::connect(&crier.sse_url(&[&public, &private]), &[]).await;
    assert_eq!(response.status, StatusCode::FORBIDDEN);
    let body: Value = serde_json::from_str(&response.body_text().await).expect("json error");
    assert_eq!(body["error"], "forbidden");
    assert!(
        !body.to_string().contains(&private),
        "the refusal does not echo the channel"
    );

    let refused =
        common::ws::WsClient::try_connect(&crier.ws(&format!("/ws?channel={private}")), &[]).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), StatusCode::FORBIDDEN)
        }
        other => panic!("expected 403, got {:?}", other.map(|_| "a connection")),
    }

    let mut ws = WsClient::connect(&crier.ws("/ws")).await;
    assert_eq!(
        ws.subscribe(&private, 7).await,
        json!({"type": "error", "code": "forbidden", "reason": "forbidden", "id": 7})
    );
    ws.subscribe(&public, 8).await;

    assert_eq!(
        redis.pubsub_numsub(&private).await,
        0,
        "crier never subscribed it"
    );
    redis.publish(&private, r#"{"secret":true}"#).await;
    redis.publish(&public, r#"{"after":true}"#).await;
    // Same publisher, same order: had the private one leaked it would come first.
    assert_eq!(
        ws.recv_type("message", WAIT).await["channel"],
        json!(public)
    );
    assert_eq!(crier.metric("crier_subscriptions").await, 1.0);
    assert_eq!(
        crier
            .metric("crier_connections_rejected_total{reason=\"forbidden\"}")
            .await,
        2.0,
        "the SSE request and the WebSocket upgrade"
    );
}

/// Acceptance 10: two instances on one Redis both deliver one publication.
#[tokio::test]
async fn two_instances_on_one_redis_both_deliver() {
    let redis = RedisServer::start().await;
    let a = Instance::start(test_config(Some(redis.url()))).await;
    let b = Instance::start(test_config(Some(redis.url()))).await;
    let channel = unique("public:fleet");

    let mut on_a = WsClient::connect(&a.ws(&format!("/ws?channel={channel}"))).await;
    on_a.recv_type("subscribed", WAIT).await;
    let mut on_b = sse::connect(&b.sse_url(&[&channel]), &[])
        .await
        .into_events();

    assert_eq!(redis.publish(&channel, r#"{"type":"hello"}"#).await, 2);
    let expected = envelope(&channel, Some("hello"), json!({"type": "hello"}));
    assert_eq!(on_a.recv_type("message", WAIT).await, expected);
    assert_eq!(
        on_b.next_message(WAIT).await.expect("event").json(),
        expected
    );
}

/// SSE `events=` filter and WebSocket unsubscribe, on both brokers.
async fn filters_and_unsubscribe(kind: Kind) {
    let setup = Setup::new(kind).await;
    let channel = unique("public:filter");
    let url = format!("{}&events=keep", setup.crier.sse_url(&[&channel]));
    let mut filtered = sse::connect(&url, &[]).await.into_events();
    let mut ws = WsClient::connect(&setup.crier.ws("/ws")).await;
    ws.subscribe(&channel, 1).await;

    setup.publish(&channel, r#"{"type":"drop","n":1}"#).await;
    setup.publish(&channel, r#"{"type":"keep","n":2}"#).await;
    let e = filtered.next_message(WAIT).await.expect("event");
    assert_eq!(e.event.as_deref(), Some("keep"));
    assert_eq!(ws.recv_type("message", WAIT).await["data"]["n"], 1);
    assert_eq!(ws.recv_type("message", WAIT).await["data"]["n"], 2);

    ws.send_json(json!({"type": "unsubscribe", "channel": channel, "id": 2}))
        .await;
    assert_eq!(
        ws.recv_type("unsubscribed", WAIT).await,
        json!({"type": "unsubscribed", "channel": channel, "id": 2})
    );
    setup.publish(&channel, r#"{"type":"keep","n":3}"#).await;
    assert_eq!(
        filtered.next_message(WAIT).await.expect("event").json()["data"]["n"],
        3
    );
    ws.send_json(json!({"type": "ping", "id": "p"})).await;
    assert_eq!(
        ws.recv_json(WAIT).await,
        json!({"type": "pong", "id": "p"}),
        "nothing from the unsubscribed channel came before the pong"
    );
}

#[tokio::test]
async fn filters_and_unsubscribe_memory() {
    filters_and_unsubscribe(Kind::Memory).await;
}

#[tokio::test]
async fn filters_and_unsubscribe_redis() {
    filters_and_unsubscribe(Kind::Redis).await;
}

/// A Redis channel stays subscribed only while someone listens (after a
/// short linger), over one connection whatever the number of clients.
#[tokio::test]
async fn redis_subscription_follows_local_listeners() {
    let redis = RedisServer::start().await;
    let crier = Instance::start(test_config(Some(redis.url()))).await;
    let channel = unique("public:refcount");
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut ws = WsClient::connect(&crier.ws(&format!("/ws?channel={channel}"))).await;
        ws.recv_type("subscribed", WAIT).await;
        clients.push(ws);
    }
    assert_eq!(
        redis.pubsub_numsub(&channel).await,
        1,
        "one subscription per instance"
    );
    let clients_line = redis.cli(&["CLIENT", "LIST", "TYPE", "pubsub"]).await;
    assert_eq!(
        clients_line.lines().count(),
        1,
        "one pub/sub connection: {clients_line}"
    );
    drop(clients);
    common::eventually("redis unsubscribed after the linger", WAIT, || async {
        redis.pubsub_numsub(&channel).await == 0
    })
    .await;
    crier.wait_metric("crier_channels", 0.0).await;
}

/// Issue 9.12: the field naming the event type is configurable — the
/// operation-hub shape `{"event_type":…}` through the top-level
/// `event_field`, Laravel's `{"event":…,"data":…,"socket":null}` through a
/// rule's own — for the SSE `event:` name, the `events=` filter, and
/// replay from history.
#[tokio::test]
async fn event_field_names_the_sse_event_and_drives_the_filter() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("crier.toml");
    std::fs::write(
        &config,
        r#"
event_field = "/event_type"

[[channels]]
pattern = "laravel:*"
subscribe = "anyone"
event_field = "/event"
history = { size = 100, ttl = "10m" }

[[channels]]
pattern = "ops:*"
subscribe = "anyone"
"#,
    )
    .expect("write config");
    let config = config.to_string_lossy().into_owned();
    let crier =
        common::crier::Process::start(&["--config", &config, "--redis-url", &redis.url()], &[])
            .await;
    let sse_url = |channel: &str, events: Option<&str>| {
        let filter = events.map_or(String::new(), |e| format!("&events={e}"));
        crier.http(&format!("/sse?channel={channel}{filter}"))
    };

    // An operation hub.
    let ops = unique("ops:job");
    let mut all = sse::connect(&sse_url(&ops, None), &[]).await.into_events();
    let mut progress = sse::connect(&sse_url(&ops, Some("progress")), &[])
        .await
        .into_events();
    let started = json!({"event_type": "started", "operation_id": 7, "data": {}, "type": "noise"});
    let step = json!({"event_type": "progress", "operation_id": 7, "data": {"pct": 40}});
    redis.publish(&ops, &started.to_string()).await;
    redis.publish(&ops, &step.to_string()).await;
    let e = all.next_message(WAIT).await.expect("open");
    assert_eq!(
        (e.event.as_deref(), e.json()["data"].clone()),
        (Some("started"), started)
    );
    assert_eq!(e.json()["event"], "started", "the envelope agrees");
    let e = all.next_message(WAIT).await.expect("open");
    assert_eq!(e.event.as_deref(), Some("progress"));
    let e = progress.next_message(WAIT).await.expect("open");
    assert_eq!(
        (e.event.as_deref(), e.json()["data"].clone()),
        (Some("progress"), step),
        "the filter let only `progress` through"
    );

    // Laravel's Redis broadcaster, on a history channel: its rule's field.
    let orders = unique("laravel:orders");
    let mut shipped = sse::connect(&sse_url(&orders, Some("OrderShipped")), &[])
        .await
        .into_events();
    let mut every = sse::connect(&sse_url(&orders, None), &[])
        .await
        .into_events();
    let created =
        json!({"event": "OrderCreated", "data": {"id": 1}, "socket": null, "type": "OrderShipped"});
    let sent = json!({"event": "OrderShipped", "data": {"id": 1}, "socket": null});
    redis
        .fcall_publish(&orders, &created.to_string())
        .await
        .expect("history id");
    redis
        .fcall_publish(&orders, &sent.to_string())
        .await
        .expect("history id");
    let e = shipped.next_message(WAIT).await.expect("open");
    assert_eq!(
        (e.event.as_deref(), e.json()["data"].clone()),
        (Some("OrderShipped"), sent.clone())
    );
    let first = every.next_message(WAIT).await.expect("open");
    assert_eq!(first.event.as_deref(), Some("OrderCreated"));
    let cursor = first.id.expect("a history event carries its cursor");

    // Resumed after the first: the replay names the event the same way.
    let mut resumed = sse::connect(&sse_url(&orders, None), &[("last-event-id", &cursor)])
        .await
        .into_events();
    let e = resumed.next_message(WAIT).await.expect("open");
    assert_eq!(
        (e.event.as_deref(), e.json()["data"].clone()),
        (Some("OrderShipped"), sent)
    );
}

/// Issue 9.13: `crier_build_info{version}` is 1, with this build's version.
#[tokio::test]
async fn metrics_carry_build_info() {
    let crier = Instance::start(test_config(None)).await;
    let series = format!(
        "crier_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(crier.metric(&series).await, 1.0);
}
