//! What goes wrong in production: Redis restarts, clients that stop reading,
//! and clients that send garbage. Each is answered as specified and the
//! process keeps serving everyone else.

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use common::crier::{test_config, Instance, WAIT};
use common::redis::RedisServer;
use common::sse;
use common::unique;
use common::ws::WsClient;
use http::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Acceptance 4: Redis killed and restarted on the same port.
#[tokio::test]
async fn redis_restart_is_survived_without_client_reconnects() {
    let mut redis = RedisServer::start().await;
    let crier = Instance::start(test_config(Some(redis.url()))).await;
    let channel = unique("public:restart");
    let mut ws = WsClient::connect(&crier.ws(&format!("/ws?channel={channel}"))).await;
    ws.recv_type("subscribed", WAIT).await;
    let mut events = sse::connect(&crier.sse_url(&[&channel]), &[])
        .await
        .into_events();
    assert_eq!(crier.metric("crier_redis_reconnects_total").await, 0.0);

    redis.stop().await;
    crier.wait_readyz(StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(crier.metric("crier_broker_up").await, 0.0);

    redis.restart().await;
    crier.wait_ready().await;
    assert_eq!(crier.metric("crier_redis_reconnects_total").await, 1.0);
    assert_eq!(redis.pubsub_numsub(&channel).await, 1, "resubscribed");

    redis.publish(&channel, r#"{"after":"restart"}"#).await;
    // What was published during the outage is gone (no history on this
    // channel): both clients are told so, then live messages resume.
    let gap = json!({"type": "gap", "channel": channel});
    assert_eq!(ws.recv_json(WAIT).await, gap);
    assert_eq!(
        ws.recv_type("message", WAIT).await["data"]["after"],
        "restart"
    );
    let e = events
        .next_message(WAIT)
        .await
        .expect("same stream, still open");
    assert_eq!((e.event.as_deref(), e.json()), (Some("gap"), gap));
    let e = events
        .next_message(WAIT)
        .await
        .expect("same stream, still open");
    assert_eq!(e.json()["data"]["after"], "restart");
    assert_eq!(crier.metric("crier_gaps_total").await, 1.0);
    assert_eq!(
        crier.metric("crier_connections{transport=\"ws\"}").await,
        1.0
    );
    assert_eq!(
        crier.metric("crier_connections{transport=\"sse\"}").await,
        1.0
    );
}

/// While Redis is down, a new subscription waits for it, then says so.
#[tokio::test]
async fn subscribing_while_redis_is_down_answers_unavailable() {
    let mut redis = RedisServer::start().await;
    let mut config = test_config(Some(redis.url()));
    config.redis.subscribe_timeout = std::time::Duration::from_millis(300);
    let crier = Instance::start(config).await;
    redis.stop().await;
    crier.wait_readyz(StatusCode::SERVICE_UNAVAILABLE).await;

    let mut ws = WsClient::connect(&crier.ws("/ws")).await;
    let reply = ws.subscribe(&unique("public:down"), 1).await;
    assert_eq!(reply["code"], "unavailable", "{reply}");
    let response = sse::connect(&crier.sse_url(&[&unique("public:down")]), &[]).await;
    assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE);

    redis.restart().await;
    crier.wait_ready().await;
    let channel = unique("public:back");
    assert_eq!(ws.subscribe(&channel, 2).await["type"], "subscribed");
    redis.publish(&channel, "1").await;
    assert_eq!(ws.recv_type("message", WAIT).await["data"], 1);
}

/// Acceptance 5: a client that stops reading is disconnected once its queue
/// is full; the others keep receiving everything; the metric counts it.
#[tokio::test]
async fn client_that_stops_reading_is_disconnected_and_others_get_everything() {
    let redis = RedisServer::start().await;
    let mut config = test_config(Some(redis.url()));
    config.limits.queue_size = 8;
    let crier = Instance::start(config).await;
    let channel = unique("public:slow");

    let mut stalled_ws = WsClient::connect(&crier.ws(&format!("/ws?channel={channel}"))).await;
    stalled_ws.recv_type("subscribed", WAIT).await;
    let stalled_sse = sse::connect(&crier.sse_url(&[&channel]), &[]).await;
    assert_eq!(stalled_sse.status, StatusCode::OK);
    let mut stalled_sse = stalled_sse.into_events();

    let mut reader = WsClient::connect(&crier.ws(&format!("/ws?channel={channel}"))).await;
    reader.recv_type("subscribed", WAIT).await;
    let (count_tx, count_rx) = tokio::sync::oneshot::channel::<u64>();
    let reading = tokio::spawn(async move {
        // Reads everything, checking order, until told how many were sent.
        let mut next = 0u64;
        let mut expected_total = None;
        let mut count_rx = count_rx;
        loop {
            if expected_total == Some(next) {
                return (next, reader);
            }
            tokio::select! {
                total = &mut count_rx, if expected_total.is_none() => {
                    expected_total = Some(total.expect("total"));
                }
                frame = reader.recv_type("message", WAIT) => {
                    assert_eq!(frame["data"]["n"], json!(next), "in order, none missing");
                    next += 1;
                }
            }
        }
    });

    // 64 KiB messages until both stalled clients have been cut off: socket
    // buffers fill first, then the 8-message queue.
    // Letters that do not compress, so that a compressing client's socket
    // fills as fast as a plain one's (CRIER_TEST_WS_DEFLATE=1).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let filler: String = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect();
    let mut sent = 0u64;
    while crier.metric("crier_slow_client_disconnects_total").await < 2.0 {
        assert!(sent < 4_000, "stalled clients were never disconnected");
        for _ in 0..20 {
            let payload = format!(r#"{{"n":{sent},"pad":"{filler}"}}"#);
            redis.publish(&channel, &payload).await;
            sent += 1;
        }
    }
    count_tx.send(sent).expect("reader alive");
    let (received, _reader) = reading.await.expect("reader");
    assert_eq!(received, sent);
    assert_eq!(
        crier.metric("crier_slow_client_disconnects_total").await,
        2.0
    );

    let (code, reason, _) = stalled_ws.expect_close(WAIT).await;
    assert_eq!(code, 1013, "{reason}");
    stalled_sse.expect_end(WAIT).await;
    crier
        .wait_metric("crier_connections{transport=\"sse\"}", 0.0)
        .await;
    crier
        .wait_metric("crier_connections{transport=\"ws\"}", 1.0)
        .await;
}

async fn expect_error(ws: &mut WsClient, code: &str, id: Option<Value>) -> Value {
    let reply = ws.recv_type("error", WAIT).await;
    assert_eq!(reply["code"], code, "{reply}");
    assert_eq!(reply.get("id").cloned(), id, "{reply}");
    assert!(reply["reason"].as_str().is_some_and(|r| !r.is_empty()));
    reply
}

/// Acceptance 6 (WebSocket): each bad input gets its answer, the connection
/// stays usable, and an oversized frame closes with 1009.
#[tokio::test]
async fn bad_websocket_input_is_answered_and_the_connection_survives() {
    let redis = RedisServer::start().await;
    let mut config = test_config(Some(redis.url()));
    config.limits.max_message_bytes = 1024;
    config.limits.max_subscriptions_per_connection = 2;
    let crier = Instance::start(config).await;
    let channel = unique("public:bystander");
    let mut bystander = WsClient::connect(&crier.ws(&format!("/ws?channel={channel}"))).await;
    bystander.recv_type("subscribed", WAIT).await;

    let mut ws = WsClient::connect(&crier.ws("/ws")).await;
    ws.recv_type("welcome", WAIT).await;
    ws.send_text("{not json").await;
    expect_error(&mut ws, "bad_request", None).await;
    ws.send_json(json!({"type": "shout", "id": 1})).await;
    let reply = expect_error(&mut ws, "bad_request", Some(json!(1))).await;
    assert!(reply["reason"]
        .as_str()
        .unwrap_or_default()
        .contains("shout"));
    ws.send_json(json!({"id": 2})).await;
    expect_error(&mut ws, "bad_request", Some(json!(2))).await;
    ws.send_json(json!({"type": "subscribe", "id": 3})).await;
    expect_error(&mut ws, "bad_request", Some(json!(3))).await;
    ws.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    expect_error(&mut ws, "bad_request", None).await;
    let long = format!("public:{}", "y".repeat(300));
    for (i, bad) in ["public:a b", "public:tab\there", long.as_str(), ""]
        .iter()
        .enumerate()
    {
        let id = 10 + i as u64;
        ws.send_json(json!({"type": "subscribe", "channel": bad, "id": id}))
            .await;
        expect_error(&mut ws, "bad_request", Some(json!(id))).await;
    }
    assert_eq!(
        ws.subscribe(&unique("public:one"), 20).await["type"],
        "subscribed"
    );
    assert_eq!(
        ws.subscribe(&unique("public:two"), 21).await["type"],
        "subscribed"
    );
    let reply = ws.subscribe(&unique("public:three"), 22).await;
    assert_eq!(reply["code"], "too_many_subscriptions", "{reply}");

    ws.send_json(json!({"type": "ping", "id": 30})).await;
    assert_eq!(ws.recv_json(WAIT).await, json!({"type": "pong", "id": 30}));

    ws.send_text(&format!(
        r#"{{"type":"ping","pad":"{}"}}"#,
        "z".repeat(2048)
    ))
    .await;
    let (code, _, frames) = ws.expect_close(WAIT).await;
    assert_eq!(code, 1009);
    assert_eq!(
        frames.last().map(|f| f["code"].clone()),
        Some(json!("too_large"))
    );

    redis.publish(&channel, r#"{"still":"serving"}"#).await;
    assert_eq!(
        bystander.recv_type("message", WAIT).await["data"]["still"],
        "serving"
    );
    let mut fresh = WsClient::connect(&crier.ws("/ws")).await;
    fresh.send_json(json!({"type": "ping", "id": 1})).await;
    assert_eq!(fresh.recv_type("pong", WAIT).await["id"], 1);
}

/// Acceptance 6 (HTTP): bad SSE requests and bad publications get a status
/// and a reason before anything opens.
#[tokio::test]
async fn bad_http_input_is_refused_with_a_reason() {
    let mut config = test_config(None);
    config.limits.max_subscriptions_per_connection = 2;
    config.publish.api_keys = vec!["a-publish-key-0123456789".into()];
    config.publish.max_body_bytes = 4096;
    let crier = Instance::start(config).await;

    let cases = [
        ("/sse", StatusCode::BAD_REQUEST, "bad_request"),
        (
            "/sse?channel=public:a%20b",
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "/sse?channel=public:a%0Ab",
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "/sse?channel=public:a&channel=public:b&channel=public:c",
            StatusCode::BAD_REQUEST,
            "too_many_subscriptions",
        ),
    ];
    for (path, status, code) in cases {
        let response = sse::connect(&crier.http(path), &[]).await;
        assert_eq!(response.status, status, "{path}");
        let body: Value = serde_json::from_str(&response.body_text().await).expect("json");
        assert_eq!(body["error"], code, "{path}");
    }
    let (status, _) = common::http_get(&crier.http("/ws")).await;
    assert_eq!(status, StatusCode::UPGRADE_REQUIRED, "plain GET /ws");

    let publish = crier.http("/api/publish");
    let json_ct = ("content-type", "application/json");
    let good_auth = ("authorization", "Bearer a-publish-key-0123456789");
    let body = r#"{"channel":"public:x","data":1}"#;
    let (status, _) = common::http_post(&publish, &[json_ct], body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no key");
    let (status, _) = common::http_post(
        &publish,
        &[
            json_ct,
            ("authorization", "Bearer a-publish-key-0123456780"),
        ],
        body,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "wrong key");
    let (status, text) = common::http_post(&publish, &[json_ct, good_auth], "{nope").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let (status, _) = common::http_post(
        &publish,
        &[json_ct, good_auth],
        r#"{"channel":"bad name","data":1}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let huge = format!(r#"{{"channel":"public:x","data":"{}"}}"#, "h".repeat(8192));
    let (status, _) = common::http_post(&publish, &[json_ct, good_auth], &huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _) = common::http_post(&publish, &[json_ct, good_auth], body).await;
    assert_eq!(status, StatusCode::OK, "a good request still works");
    assert_eq!(crier.metric("crier_api_publications_total").await, 1.0);
}

/// `limits.max_connections`: the next stream is refused with 503 and a
/// freed slot is usable again.
#[tokio::test]
async fn connection_limit_answers_503() {
    let mut config = test_config(None);
    config.limits.max_connections = 2;
    let crier = Instance::start(config).await;
    let channel = unique("public:full");
    let first = sse::connect(&crier.sse_url(&[&channel]), &[]).await;
    let mut second = WsClient::connect(&crier.ws("/ws")).await;
    second.recv_type("welcome", WAIT).await;
    assert_eq!(first.status, StatusCode::OK);

    let third = sse::connect(&crier.sse_url(&[&channel]), &[]).await;
    assert_eq!(third.status, StatusCode::SERVICE_UNAVAILABLE);
    match WsClient::try_connect(&crier.ws("/ws"), &[]).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE)
        }
        other => panic!("expected 503, got {:?}", other.map(|_| "a connection")),
    }

    assert_eq!(
        crier
            .metric("crier_connections_rejected_total{reason=\"max_connections\"}")
            .await,
        2.0
    );
    drop(first);
    crier
        .wait_metric("crier_connections{transport=\"sse\"}", 0.0)
        .await;
    let again = sse::connect(&crier.sse_url(&[&channel]), &[]).await;
    assert_eq!(again.status, StatusCode::OK);
    drop(second);
}

/// A WebSocket client that stops answering pings is closed with 1001.
///
/// Modelled with a raw socket that reads frames but never answers pings:
/// tungstenite clients always answer them.
#[tokio::test]
async fn websocket_client_that_never_pongs_is_closed_as_idle() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = test_config(None);
    config.ws.ping_interval = std::time::Duration::from_millis(100);
    config.ws.idle_timeout = std::time::Duration::from_millis(300);
    let crier = Instance::start(config).await;
    let mut raw = tokio::net::TcpStream::connect(&crier.addr)
        .await
        .expect("connect");
    let handshake = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        crier.addr
    );
    raw.write_all(handshake.as_bytes())
        .await
        .expect("handshake");
    let mut bytes = Vec::new();
    tokio::time::timeout(WAIT, raw.read_to_end(&mut bytes))
        .await
        .expect("the server closes the connection")
        .expect("read");
    let head_end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head")
        + 4;
    assert!(bytes.starts_with(b"HTTP/1.1 101"));
    // Server frames are unmasked; every frame here is shorter than 126 bytes.
    let mut frames = &bytes[head_end..];
    let mut opcodes = Vec::new();
    let mut close = None;
    while frames.len() >= 2 {
        let (opcode, len) = (frames[0] & 0x0f, usize::from(frames[1] & 0x7f));
        let payload = &frames[2..2 + len];
        opcodes.push(opcode);
        if opcode == 0x8 {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            close = Some((code, String::from_utf8_lossy(&payload[2..]).into_owned()));
        }
        frames = &frames[2 + len..];
    }
    assert!(opcodes.contains(&0x9), "pinged first: {opcodes:?}");
    assert_eq!(
        close,
        Some((1001, "idle timeout".to_string())),
        "{opcodes:?}"
    );
    crier
        .wait_metric("crier_connections{transport=\"ws\"}", 0.0)
        .await;
}

/// A connection that never completes its request head is dropped after the
/// handshake timeout, and does not hold up anyone else.
#[tokio::test]
async fn incomplete_request_head_is_dropped_after_the_handshake_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = test_config(None);
    config.ws.handshake_timeout = std::time::Duration::from_millis(300);
    let crier = Instance::start(config).await;
    let mut slowloris = tokio::net::TcpStream::connect(&crier.addr)
        .await
        .expect("connect");
    slowloris
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let (status, _) = common::http_get(&crier.http("/healthz")).await;
    assert_eq!(status, StatusCode::OK, "others are served meanwhile");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, slowloris.read_to_end(&mut rest)).await;
    let text = String::from_utf8_lossy(&rest);
    assert!(read.is_ok(), "connection closed by the server");
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "closed, at most with a 408: {text}"
    );
}

/// SSE streams carry comment heartbeats so proxies keep them open.
#[tokio::test]
async fn sse_streams_send_heartbeats() {
    let mut config = test_config(None);
    config.sse.heartbeat = std::time::Duration::from_millis(100);
    let crier = Instance::start(config).await;
    let mut events = sse::connect(&crier.sse_url(&[&unique("public:quiet")]), &[])
        .await
        .into_events();
    let retry = events.next_event(WAIT).await.expect("retry");
    assert_eq!(retry.retry, Some(3000));
    let beat = events.next_event(WAIT).await.expect("heartbeat");
    assert_eq!(beat.comments, vec!["heartbeat".to_string()]);
    assert!(!beat.has_data);
}
