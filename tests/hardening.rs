//! What an attacker or a careless client finds (issue 8): each probe that
//! once got through, against real Redis and real sockets, answered as the
//! docs promise.

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::crier::{test_config, Instance, WAIT};
use common::redis::RedisServer;
use common::sse;
use common::unique;
use common::ws::WsClient;
use crier::config::{ChannelRule, Config, HistoryRule, Subscribe};
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

const API_KEY: &str = "hardening-test-key-0123456789";

/// `hist:*` keeps history, `public:*` none; the publish API takes
/// [`API_KEY`].
fn config(redis: Option<&RedisServer>) -> Config {
    let mut config = test_config(redis.map(RedisServer::url));
    config.channels = vec![
        ChannelRule {
            pattern: "hist:*".into(),
            subscribe: Subscribe::Anyone,
            history: Some(HistoryRule {
                size: 1000,
                ttl: Duration::from_secs(3600),
            }),
            event_field: None,
            presence: false,
        },
        ChannelRule {
            pattern: "public:*".into(),
            subscribe: Subscribe::Anyone,
            history: None,
            event_field: None,
            presence: false,
        },
    ];
    config.publish.api_keys = vec![API_KEY.into()];
    config
}

/// A cursor as crier encodes it (`c1.` + base64url of `{channel: id}`).
fn cursor(channel: &str, id: &str) -> String {
    let json = json!({ channel: id }).to_string();
    format!(
        "c1.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// A WebSocket subscribed to `channel`, resuming after `since`, and the
/// `subscribed` reply.
async fn ws_resume(crier: &Instance, channel: &str, since: &str) -> (WsClient, Value) {
    let mut ws = WsClient::connect(&crier.ws("/ws")).await;
    ws.recv_type("welcome", WAIT).await;
    ws.send_json(json!({"type": "subscribe", "channel": channel, "since": since, "id": 1}))
        .await;
    let reply = ws.recv_type("subscribed", WAIT).await;
    (ws, reply)
}

/// An SSE request from a client with a tiny receive window that reads the
/// `200` response head and then nothing more. `extra` are header lines.
async fn stalled_sse(crier: &Instance, channel: &str, extra: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut stream = socket
        .connect(crier.addr.parse().expect("addr"))
        .await
        .expect("connect");
    let request = format!(
        "GET /sse?channel={channel} HTTP/1.1\r\nHost: {}\r\n{extra}\r\n",
        crier.addr
    );
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut head = [0u8; 256];
    let n = stream.read(&mut head).await.expect("response head");
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    stream
}

/// Point 6: the client closes with 1000; crier answers with a close frame
/// echoing the code (RFC 6455 5.5.1) before it drops the connection.
#[tokio::test]
async fn a_client_close_is_answered_with_a_close_frame() {
    let crier = Instance::start(config(None)).await;
    let mut ws = WsClient::connect(&crier.ws("/ws")).await;
    ws.recv_type("welcome", WAIT).await;
    let mut inner = ws.into_inner();
    inner
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        })))
        .await
        .expect("send close");
    let reply = tokio::time::timeout(WAIT, async {
        loop {
            match inner.next().await {
                Some(Ok(Message::Close(frame))) => return Ok(frame),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("ended without a close frame".into()),
            }
        }
    })
    .await
    .expect("an answer within the wait");
    let frame = reply.expect("a close frame, not a dropped connection");
    assert_eq!(frame.map(|f| u16::from(f.code)), Some(1000));
}

/// Point 8: a JSON payload with a bare CR between tokens reaches an SSE
/// client (parsing as EventSource does) with every member intact.
#[tokio::test]
async fn a_bare_carriage_return_cannot_cut_sse_data() {
    let crier = Instance::start(config(None)).await;
    let channel = unique("public:cr");
    let mut events = sse::connect(&crier.sse_url(&[&channel]), &[])
        .await
        .into_events();
    let payload = "{\"type\":\"x\",\r\"a\":1,\r\n\"b\":2}";
    assert_eq!(
        crier.publish_api(&channel, payload, Some(API_KEY)).await,
        StatusCode::OK
    );
    let event = events.next_message(WAIT).await.expect("stream open");
    assert_eq!(event.json()["data"], json!({"type": "x", "a": 1, "b": 2}));
}

/// Point 4 and acceptance 4: event filters are capped in count and length,
/// the query string and the request head in size; each limit holds at the
/// cap and refuses cap + 1 with a clear reason, and a WebSocket stays usable.
#[tokio::test]
async fn request_limits_hold_at_the_cap_and_refuse_one_more() {
    let crier = Instance::start(config(None)).await;
    let channel = unique("public:caps");
    let names =
        |n: usize, len: usize| -> Vec<String> { (0..n).map(|i| format!("{i:0len$}")).collect() };
    let sse_status = |events: Vec<String>| {
        let url = format!("{}&events={}", crier.sse_url(&[&channel]), events.join(","));
        async move {
            let response = sse::connect(&url, &[]).await;
            let status = response.status;
            let body = if status == StatusCode::OK {
                String::new()
            } else {
                response.body_text().await
            };
            (status, body)
        }
    };
    assert_eq!(sse_status(names(32, 128)).await.0, StatusCode::OK);
    let (status, body) = sse_status(names(33, 2)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("at most 32"), "{body}");
    let (status, body) = sse_status(names(1, 129)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("longer than 128 bytes"), "{body}");

    // The query string: 16 KiB.
    let base = crier.sse_url(&[&channel]);
    let pad = |n: usize| format!("{base}&x={}", "a".repeat(n));
    let query_len = |url: &str| url.split_once('?').map_or(0, |(_, q)| q.len());
    let fits = pad(16 * 1024 - query_len(&pad(0)));
    assert_eq!(query_len(&fits), 16 * 1024);
    assert_eq!(sse::connect(&fits, &[]).await.status, StatusCode::OK);
    let over = pad(16 * 1024 + 1 - query_len(&pad(0)));
    let response = sse::connect(&over, &[]).await;
    assert_eq!(response.status, StatusCode::BAD_REQUEST);
    assert!(response.body_text().await.contains("16384 bytes"));

    // The request head: 32 KiB, answered 431 by the HTTP layer.
    let big = "b".repeat(40 * 1024);
    let response = sse::connect(&crier.sse_url(&[&channel]), &[("x-big", &big)]).await;
    assert_eq!(response.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);

    // WebSocket: the same filter caps on `subscribe`.
    let mut ws = WsClient::connect(&crier.ws("/ws")).await;
    ws.recv_type("welcome", WAIT).await;
    for (events, id, expected) in [
        (names(33, 2), 1, "at most 32"),
        (names(1, 129), 2, "longer than 128 bytes"),
    ] {
        ws.send_json(json!({"type": "subscribe", "channel": channel, "events": events, "id": id}))
            .await;
        let reply = ws.recv_type("error", WAIT).await;
        assert_eq!(reply["code"], "bad_request", "{reply}");
        assert!(reply["reason"].as_str().expect("reason").contains(expected));
    }
    ws.send_json(
        json!({"type": "subscribe", "channel": channel, "events": names(32, 128), "id": 3}),
    )
    .await;
    assert_eq!(ws.recv_type("subscribed", WAIT).await["id"], 3);
}

/// Point 5: a cursor ahead of the channel's newest message is answered with
/// a gap (SSE and WebSocket), and live messages then arrive — never a
/// stream that silently drops everything "already delivered".
#[tokio::test]
async fn a_cursor_from_the_future_is_a_gap_not_silence() {
    let redis = RedisServer::start().await;
    let crier = Instance::start(config(Some(&redis))).await;
    let channel = unique("hist:future");
    redis
        .fcall_publish(&channel, r#"{"n":1}"#)
        .await
        .expect("id");
    let future = format!("{}-0", now_ms() + 3_600_000);

    let mut events = sse::connect(
        &crier.sse_url(&[&channel]),
        &[("last-event-id", &cursor(&channel, &future))],
    )
    .await
    .into_events();
    let gap = events.next_message(WAIT).await.expect("stream open");
    assert_eq!(gap.event.as_deref(), Some("gap"));

    let (mut ws, reply) = ws_resume(&crier, &channel, &future).await;
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_eq!(
        ws.recv_json(WAIT).await,
        json!({"type": "gap", "channel": channel})
    );

    redis
        .fcall_publish(&channel, r#"{"n":2}"#)
        .await
        .expect("id");
    assert_eq!(ws.recv_type("message", WAIT).await["data"]["n"], 2);
    let live = events.next_message(WAIT).await.expect("stream open");
    assert_eq!(live.json()["data"]["n"], 2, "live messages are not dropped");
}

/// Point 7 and acceptance 4: replay before live is capped per connection
/// (messages and bytes) and per process; what does not fit is a gap, and
/// what fits is replayed in full.
#[tokio::test]
async fn replay_is_capped_per_connection_and_per_process() {
    let redis = RedisServer::start().await;
    let mut capped = config(Some(&redis));
    capped.limits.max_replay_messages = 5;
    let crier = Instance::start(capped).await;
    let channel = unique("hist:cap");
    let first = redis
        .fcall_publish(&channel, r#"{"n":0}"#)
        .await
        .expect("id");
    let resume = |channel: String, since: String| {
        let url = crier.sse_url(&[&channel]);
        async move {
            let mut events = sse::connect(&url, &[("last-event-id", &cursor(&channel, &since))])
                .await
                .into_events();
            let mut seen = Vec::new();
            // Replay, then one live marker published by the caller.
            loop {
                let e = events.next_message(WAIT).await.expect("stream open");
                let v = e.json();
                if v["data"]["live"] == true {
                    return seen;
                }
                seen.push(match v["type"].as_str() {
                    Some("gap") => "gap".to_string(),
                    _ => v["data"]["n"].to_string(),
                });
            }
        }
    };
    let live = |channel: String| {
        let redis = &redis;
        async move {
            // Published once the stream is open (its subscription counted).
            redis.fcall_publish(&channel, r#"{"live":true}"#).await;
        }
    };
    for n in 1..=5 {
        redis
            .fcall_publish(&channel, &format!(r#"{{"n":{n}}}"#))
            .await;
    }
    // At the cap: all 5 missed messages.
    let (seen, ()) = tokio::join!(resume(channel.clone(), first.clone()), async {
        crier.wait_metric("crier_subscriptions", 1.0).await;
        live(channel.clone()).await
    });
    assert_eq!(seen, ["1", "2", "3", "4", "5"]);
    crier.wait_metric("crier_subscriptions", 0.0).await;
    // Cap + 1: a gap, and live messages after it.
    redis.fcall_publish(&channel, r#"{"n":6}"#).await;
    let (seen, ()) = tokio::join!(resume(channel.clone(), first.clone()), async {
        crier.wait_metric("crier_subscriptions", 1.0).await;
        live(channel.clone()).await
    });
    assert_eq!(seen, ["gap"]);
    drop(crier);

    // Bytes, per connection: one 10 KB message fits in 15 KB, two do not
    // (a client receives each message once, as its own wire protocol's
    // encoding: that is what the budget counts).
    let mut by_bytes = config(Some(&redis));
    by_bytes.limits.max_replay_bytes = 15_000;
    let crier = Instance::start(by_bytes).await;
    let channel = unique("hist:bytes");
    let first = redis
        .fcall_publish(&channel, r#"{"n":0}"#)
        .await
        .expect("id");
    let big = |n: u32| format!(r#"{{"n":{n},"pad":"{}"}}"#, "p".repeat(10_000));
    redis.fcall_publish(&channel, &big(1)).await;
    let (mut ws, reply) = ws_resume(&crier, &channel, &first).await;
    assert_eq!(reply["recovered"], true);
    assert_eq!(ws.recv_type("message", WAIT).await["data"]["n"], 1);
    redis.fcall_publish(&channel, &big(2)).await;
    ws.recv_type("message", WAIT).await;
    let (mut again, reply) = ws_resume(&crier, &channel, &first).await;
    assert_eq!(reply["recovered"], false);
    assert_eq!(again.recv_json(WAIT).await["type"], "gap");
    drop(crier);

    // Bytes, per process: the same single message does not fit in a
    // process-wide budget smaller than it.
    let mut by_process = config(Some(&redis));
    by_process.limits.max_replay_bytes_total = 8_000;
    let crier = Instance::start(by_process).await;
    let channel = unique("hist:process");
    let first = redis
        .fcall_publish(&channel, r#"{"n":0}"#)
        .await
        .expect("id");
    redis.fcall_publish(&channel, &big(1)).await;
    let (mut ws, reply) = ws_resume(&crier, &channel, &first).await;
    assert_eq!(reply["recovered"], false);
    assert_eq!(ws.recv_json(WAIT).await["type"], "gap");
}

/// Point 9: re-subscribing a channel while Redis is down answers
/// `unavailable` but keeps the subscription: after recovery the client
/// gets the gap and the live messages of that channel.
#[tokio::test]
async fn a_failed_resubscribe_keeps_the_subscription() {
    let mut redis = RedisServer::start().await;
    let mut cfg = config(Some(&redis));
    cfg.redis.subscribe_timeout = Duration::from_millis(300);
    let crier = Instance::start(cfg).await;
    let (keep, other) = (unique("public:keep"), unique("public:other"));
    let mut ws = WsClient::connect(&crier.ws("/ws")).await;
    ws.recv_type("welcome", WAIT).await;
    assert_eq!(ws.subscribe(&keep, 1).await["type"], "subscribed");
    assert_eq!(ws.subscribe(&other, 2).await["type"], "subscribed");

    redis.stop().await;
    crier.wait_readyz(StatusCode::SERVICE_UNAVAILABLE).await;
    let reply = ws.subscribe(&keep, 3).await;
    assert_eq!(reply["code"], "unavailable", "{reply}");

    redis.restart().await;
    crier.wait_ready().await;
    let mut gaps = Vec::new();
    while gaps.len() < 2 {
        let v = ws.recv_type("gap", WAIT).await;
        gaps.push(v["channel"].as_str().expect("channel").to_string());
    }
    gaps.sort();
    let mut expected = vec![keep.clone(), other.clone()];
    expected.sort();
    assert_eq!(gaps, expected, "both channels are told what they lost");
    redis.publish(&keep, r#"{"n":1}"#).await;
    let message = ws.recv_type("message", WAIT).await;
    assert_eq!(
        (message["channel"].clone(), message["data"]["n"].clone()),
        (json!(keep), json!(1))
    );
}

/// Point 10: `FUNCTION FLUSH` is repaired without any client doing
/// anything: apps' `FCALL crier_publish` works again, with no reconnect.
#[tokio::test]
async fn a_flushed_function_library_is_loaded_again() {
    let redis = RedisServer::start().await;
    let mut cfg = config(Some(&redis));
    cfg.redis.canary_interval = Duration::from_millis(200);
    let crier = Instance::start(cfg).await;
    let channel = unique("hist:flush");
    assert!(redis.fcall_publish(&channel, r#"{"n":1}"#).await.is_some());
    redis.cli(&["FUNCTION", "FLUSH"]).await;
    let url = redis.url();
    let channel_for_check = channel.clone();
    common::eventually("FCALL crier_publish works again", WAIT, || {
        let (url, channel) = (url.clone(), channel_for_check.clone());
        async move {
            let client = ::redis::Client::open(url).expect("url");
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                return false;
            };
            let answer: ::redis::RedisResult<Option<String>> = ::redis::cmd("FCALL")
                .arg("crier_publish")
                .arg(1)
                .arg(&channel)
                .arg(r#"{"n":2}"#)
                .query_async(&mut conn)
                .await;
            answer.is_ok()
        }
    })
    .await;
    assert_eq!(crier.metric("crier_redis_reconnects_total").await, 0.0);
    assert_eq!(crier.readyz().await, StatusCode::OK);
}

/// Point 10: while the library is missing and cannot be loaded, `/readyz`
/// says so; once it can be loaded again, the instance is ready.
#[tokio::test]
async fn readiness_reflects_a_library_that_cannot_be_loaded() {
    let redis = RedisServer::start().await;
    let mut cfg = config(Some(&redis));
    cfg.redis.canary_interval = Duration::from_millis(200);
    let crier = Instance::start(cfg).await;
    // crier connects as `default`; an admin takes FUNCTION away from it,
    // then flushes the library.
    redis
        .cli(&[
            "ACL",
            "SETUSER",
            "admin",
            "on",
            ">admin-pw",
            "+@all",
            "~*",
            "&*",
        ])
        .await;
    redis.cli(&["ACL", "SETUSER", "default", "-function"]).await;
    let admin = ["--user", "admin", "--pass", "admin-pw", "--no-auth-warning"];
    redis
        .cli(&[&admin[..], &["FUNCTION", "FLUSH"]].concat())
        .await;
    crier.wait_readyz(StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(crier.metric("crier_broker_up").await, 0.0);

    redis
        .cli(&[&admin[..], &["ACL", "SETUSER", "default", "+function"]].concat())
        .await;
    crier.wait_ready().await;
    let listed = redis
        .cli(&["FUNCTION", "LIST", "LIBRARYNAME", "crier"])
        .await;
    assert!(listed.contains("crier_publish"), "{listed}");
}

/// Point 11 and the SSE stall timeout: an SSE client that stops reading is
/// cut once a write makes no progress for `sse.write_timeout`, even though
/// its queue never fills.
#[tokio::test]
async fn an_sse_client_that_stops_reading_is_cut_on_a_quiet_channel() {
    let mut cfg = config(None);
    cfg.sse.write_timeout = Duration::from_millis(500);
    let crier = Instance::start(cfg).await;
    let channel = unique("public:stall");

    let stream = stalled_sse(&crier, &channel, "Accept: text/event-stream\r\n").await;
    crier
        .wait_metric("crier_connections{transport=\"sse\"}", 1.0)
        .await;

    // 100 messages of 200 KB: far more than the socket buffers hold, far
    // fewer than the queue (1024).
    let payload = format!(r#"{{"pad":"{}"}}"#, "p".repeat(200_000));
    for _ in 0..100 {
        assert_eq!(
            crier.publish_api(&channel, &payload, Some(API_KEY)).await,
            StatusCode::OK
        );
    }
    crier
        .wait_metric("crier_connections{transport=\"sse\"}", 0.0)
        .await;
    assert_eq!(
        crier.metric("crier_slow_client_disconnects_total").await,
        1.0
    );
    drop(stream);
}

/// The parsers a client controls, fed text no client should send: answers
/// are statuses and error frames, and crier keeps serving.
#[tokio::test]
async fn hostile_requests_get_answers_and_crier_keeps_serving() {
    let crier = Instance::start(config(None)).await;
    let channel = unique("public:fuzz");
    for query in [
        "channel=%FF%FE",
        "channel=&channel=",
        "events=%00",
        "channel=a&events=,,,,,",
        "%%%%",
        "channel=a&channel=a&channel=a",
    ] {
        let response = sse::connect(&crier.http(&format!("/sse?{query}")), &[]).await;
        assert!(
            matches!(response.status.as_u16(), 200 | 400 | 403),
            "{query}: {}",
            response.status
        );
    }
    for cursor in [
        "c1.",
        "c1.e30",
        "c1.eyJ4IjoiOTk5OTk5OTk5OTk5OTk5OTk5OTk5LTAifQ",
        "c1.%%%",
    ] {
        let response =
            sse::connect(&crier.sse_url(&[&channel]), &[("last-event-id", cursor)]).await;
        assert!(
            matches!(response.status.as_u16(), 200 | 400),
            "{cursor}: {}",
            response.status
        );
    }
    let mut ws = WsClient::connect(&crier.ws("/ws")).await;
    ws.recv_type("welcome", WAIT).await;
    for text in [
        r#"{"type":"subscribe","channel":"public:x","since":"99999999999999999999999-0"}"#,
        r#"{"type":"subscribe","channel":"public:x","since":"-1--1"}"#,
        r#"{"type":"auth","token":"a.b.c"}"#,
        r#"{"type":"auth","token":"eyJhbGciOiJIUzI1NiJ9.e30.x"}"#,
        r#"{"type":["subscribe"]}"#,
        r#"{"type":"subscribe","channel":"public:x","events":[1,2]}"#,
    ] {
        ws.send_text(text).await;
        let reply: Value = ws.recv_json(WAIT).await;
        assert!(
            matches!(reply["type"].as_str(), Some("error" | "subscribed" | "gap")),
            "{text}: {reply}"
        );
    }
    ws.send_json(json!({"type": "ping", "id": 1})).await;
    assert_eq!(ws.recv_type("pong", WAIT).await["id"], 1);
}

/// Point 7: a replay held for a client that does not read counts against
/// the process's replay budget (others get a `gap`) and is given back when
/// that client goes (the next resume gets everything).
#[tokio::test]
async fn replay_memory_held_by_a_stalled_client_is_released_when_it_goes() {
    let redis = RedisServer::start().await;
    let mut cfg = config(Some(&redis));
    cfg.limits.max_replay_bytes = 64 << 20;
    cfg.limits.max_replay_bytes_total = 15 << 20;
    let crier = Instance::start(cfg).await;
    let channel = unique("hist:held");
    let first = redis
        .fcall_publish(&channel, r#"{"n":0}"#)
        .await
        .expect("id");
    let pad = "p".repeat(100_000);
    for n in 1..=100 {
        redis
            .fcall_publish(&channel, &format!(r#"{{"n":{n},"pad":"{pad}"}}"#))
            .await;
    }
    let since = cursor(&channel, &first);

    // A: resumes (about 10 MB of replay), reads the head, then stops.
    let stalled = stalled_sse(&crier, &channel, &format!("Last-Event-ID: {since}\r\n")).await;

    // B: the same resume does not fit beside A's.
    let first_event = |since: String| {
        let url = crier.sse_url(&[&channel]);
        async move {
            let mut events = sse::connect(&url, &[("last-event-id", &since)])
                .await
                .into_events();
            let e = events.next_message(WAIT).await.expect("stream open");
            e.json()
        }
    };
    assert_eq!(first_event(since.clone()).await["type"], "gap");

    // A goes: its share comes back, and C gets the whole replay.
    drop(stalled);
    crier
        .wait_metric("crier_connections{transport=\"sse\"}", 0.0)
        .await;
    let v = first_event(since.clone()).await;
    assert_eq!(
        (v["type"].clone(), v["data"]["n"].clone()),
        (json!("message"), json!(1))
    );
}

/// Reads from `stream` into `buf` until `done(buf)` holds.
async fn read_until(
    stream: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    done: impl Fn(&[u8]) -> bool,
) {
    tokio::time::timeout(WAIT, async {
        while !done(buf) {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(buf));
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out; got {}", String::from_utf8_lossy(buf)));
}

/// Reads a response head; returns it, and what came after it.
async fn read_head(stream: &mut tokio::net::TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    read_until(stream, &mut buf, |b| b.windows(4).any(|w| w == b"\r\n\r\n")).await;
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    let rest = buf.split_off(end);
    (String::from_utf8_lossy(&buf).into_owned(), rest)
}

/// A chunked body decoded as far as it is complete; `None` on bad framing.
fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = body.windows(2).position(|w| w == b"\r\n") else {
            return Some(out);
        };
        let size = usize::from_str_radix(std::str::from_utf8(&body[..eol]).ok()?, 16).ok()?;
        if body.len() < eol + 2 + size + 2 {
            return Some(out);
        }
        let data = &body[eol + 2..eol + 2 + size];
        if &body[eol + 2 + size..eol + 4 + size] != b"\r\n" {
            return None;
        }
        out.extend_from_slice(data);
        body = &body[eol + 4 + size..];
    }
}

/// The `n` of every event in an SSE body, in order.
fn numbered(body: &str) -> Vec<u64> {
    body.split("\n\n")
        .filter_map(|block| block.strip_prefix("data: "))
        .map(|data| {
            serde_json::from_str::<Value>(data).expect("JSON")["data"]["n"]
                .as_u64()
                .expect("n")
        })
        .collect()
}

/// An SSE stream leaves hyper once its head is written, also when it is not
/// the connection's first request (a browser or a proxy reusing an idle
/// connection): the body stays well-formed chunks, with every event, whether
/// written by the stream's task or straight by the hub.
#[tokio::test]
async fn an_sse_request_on_a_reused_connection_streams_well_formed_chunks() {
    let crier = Instance::start(config(None)).await;
    let channel = unique("public:reuse");
    let mut stream = tokio::net::TcpStream::connect(&crier.addr)
        .await
        .expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: crier\r\n\r\n")
        .await
        .expect("first request");
    let mut buf = Vec::new();
    read_until(&mut stream, &mut buf, |b| b.ends_with(b"ok\n")).await;
    assert!(buf.starts_with(b"HTTP/1.1 200"));

    let request = format!("GET /sse?channel={channel} HTTP/1.1\r\nHost: crier\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("second request");
    let (head, mut buf) = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );

    for n in 0..20 {
        let payload = format!(r#"{{"n":{n}}}"#);
        assert_eq!(
            crier.publish_api(&channel, &payload, Some(API_KEY)).await,
            StatusCode::OK
        );
    }
    read_until(&mut stream, &mut buf, |b| {
        dechunk(b).is_some_and(|body| String::from_utf8_lossy(&body).contains(r#""n":19"#))
    })
    .await;
    let body = String::from_utf8(dechunk(&buf).expect("well-formed chunks")).expect("UTF-8");
    assert!(body.starts_with("retry: "), "{body}");
    let seen = numbered(&body);
    assert_eq!(
        seen,
        (0..20).collect::<Vec<_>>(),
        "every event, in order: {body}"
    );
}

/// crier's own WebSocket framing refuses what RFC 6455 calls a protocol
/// error with the close code the RFC names, and says why.
#[tokio::test]
async fn websocket_protocol_errors_close_with_their_code() {
    let crier = Instance::start(config(None)).await;
    let masked = |first: u8, payload: &[u8]| {
        let key = [1u8, 2, 3, 4];
        let mut frame = vec![first, 0x80 | payload.len() as u8];
        frame.extend_from_slice(&key);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        frame
    };
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "unmasked",
            vec![0x81, 0x02, b'h', b'i'],
            1002,
            "client frames must be masked",
        ),
        (
            "reserved bit",
            masked(0xC1, b"hi"),
            1002,
            "reserved bits set",
        ),
        ("not UTF-8", masked(0x81, &[0xff, 0xfe]), 1007, "not UTF-8"),
        (
            "unknown opcode",
            masked(0x83, b"hi"),
            1002,
            "unknown opcode",
        ),
    ];
    for (case, frame, code, reason) in cases {
        let mut stream = tokio::net::TcpStream::connect(&crier.addr)
            .await
            .expect("connect");
        let handshake = "GET /ws HTTP/1.1\r\nHost: crier\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        stream
            .write_all(handshake.as_bytes())
            .await
            .expect("handshake");
        let (text, mut frames) = read_head(&mut stream).await;
        assert!(text.starts_with("HTTP/1.1 101"), "{case}: {text}");
        // The RFC's own example key and answer.
        assert!(
            text.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "{case}: {text}"
        );
        stream.write_all(&frame).await.expect("frame");
        // Server frames: unmasked, short here. Skip to the close frame.
        let close = tokio::time::timeout(WAIT, async {
            loop {
                while frames.len() >= 2 && frames.len() >= 2 + (frames[1] & 0x7f) as usize {
                    let len = (frames[1] & 0x7f) as usize;
                    let frame: Vec<u8> = frames.drain(..2 + len).collect();
                    if frame[0] == 0x88 {
                        return frame;
                    }
                }
                let mut chunk = [0u8; 1024];
                let n = stream.read(&mut chunk).await.expect("read");
                assert!(n > 0, "{case}: closed without a close frame");
                frames.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{case}: no close frame"));
        assert_eq!(u16::from_be_bytes([close[2], close[3]]), code, "{case}");
        let said = String::from_utf8_lossy(&close[4..]).into_owned();
        assert!(said.contains(reason), "{case}: {said}");
    }
}

/// An HTTP/1.0 client gets the stream without chunks, its end marked by
/// the connection's: events written by the stream's task and straight by
/// the hub alike.
#[tokio::test]
async fn an_http_1_0_sse_client_gets_a_plain_stream() {
    let crier = Instance::start(config(None)).await;
    let channel = unique("public:old");
    let mut stream = tokio::net::TcpStream::connect(&crier.addr)
        .await
        .expect("connect");
    let request = format!("GET /sse?channel={channel} HTTP/1.0\r\nHost: crier\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut buf = Vec::new();
    read_until(&mut stream, &mut buf, |b| {
        String::from_utf8_lossy(b).contains("\n\n")
    })
    .await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("head");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{head}"
    );
    assert!(body.starts_with("retry: "), "no chunk framing: {body:?}");
    for n in 0..5 {
        let payload = format!(r#"{{"n":{n}}}"#);
        assert_eq!(
            crier.publish_api(&channel, &payload, Some(API_KEY)).await,
            StatusCode::OK
        );
    }
    read_until(&mut stream, &mut buf, |b| {
        String::from_utf8_lossy(b).contains(r#""n":4"#)
    })
    .await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let body = text.split_once("\r\n\r\n").expect("head").1;
    let seen = numbered(body);
    assert_eq!(seen, (0..5).collect::<Vec<_>>(), "{body}");
}
