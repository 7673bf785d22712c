//! No message lost: history, cursors and resume across instances, gaps,
//! Redis outages and the canary — against real redis-server processes.

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::crier::{test_config, Instance, WAIT};
use common::redis::RedisServer;
use common::sse::{self, SseStream};
use common::unique;
use common::ws::WsClient;
use crier::config::{ChannelRule, Config, HistoryRule, Subscribe};
use http::StatusCode;
use serde_json::{json, Value};

/// `hist:*` keeps history, `trim:*` keeps only a little, `plain:*` none.
fn history_config(redis: Option<&RedisServer>) -> Config {
    let mut config = test_config(redis.map(RedisServer::url));
    let rule = |pattern: &str, size: Option<u64>| ChannelRule {
        pattern: pattern.into(),
        subscribe: Subscribe::Anyone,
        history: size.map(|size| HistoryRule {
            size,
            ttl: Duration::from_secs(3600),
        }),
        event_field: None,
        presence: false,
    };
    config.channels = vec![
        rule("hist:*", Some(1000)),
        rule("trim:*", Some(5)),
        rule("plain:*", None),
    ];
    config.publish.api_keys = vec![API_KEY.into()];
    config
}

const API_KEY: &str = "history-test-key-0123456789";

/// The next message event's payload `n` and its SSE id.
async fn next_n(events: &mut SseStream) -> (String, u64, Option<String>) {
    let e = events.next_message(WAIT).await.expect("stream open");
    let v = e.json();
    assert_eq!(v["type"], "message", "{v}");
    (
        v["channel"].as_str().expect("channel").to_string(),
        v["data"]["n"].as_u64().expect("n"),
        e.id,
    )
}

/// Acceptance 1: read 1–3 on instance A, disconnect, 4–8 are published,
/// reconnect to instance B with `Last-Event-ID`: exactly 4–8, then live 9+.
#[tokio::test]
async fn sse_resumes_on_another_instance_with_last_event_id() {
    let redis = RedisServer::start().await;
    let a = Instance::start(history_config(Some(&redis))).await;
    let b = Instance::start(history_config(Some(&redis))).await;
    let ch = unique("hist:orders");

    let mut on_a = sse::connect(&a.sse_url(&[&ch]), &[]).await.into_events();
    let opening = on_a.next_event(WAIT).await.expect("opening block");
    assert!(opening.id.is_some(), "the stream starts with a cursor");
    for n in 1..=3 {
        let id = redis.fcall_publish(&ch, &format!(r#"{{"n":{n}}}"#)).await;
        assert!(id.is_some(), "history channel: FCALL returns the id");
    }
    let mut last_id = None;
    for n in 1..=3 {
        let (_, got, id) = next_n(&mut on_a).await;
        assert_eq!(got, n);
        last_id = id;
    }
    drop(on_a);
    for n in 4..=8 {
        redis.fcall_publish(&ch, &format!(r#"{{"n":{n}}}"#)).await;
    }

    let last_id = last_id.expect("every history event carries an id");
    let mut on_b = sse::connect(&b.sse_url(&[&ch]), &[("last-event-id", &last_id)])
        .await
        .into_events();
    let mut seen = Vec::new();
    for _ in 4..=8 {
        seen.push(next_n(&mut on_b).await.1);
    }
    for n in 9..=10 {
        redis.fcall_publish(&ch, &format!(r#"{{"n":{n}}}"#)).await;
    }
    for _ in 9..=10 {
        seen.push(next_n(&mut on_b).await.1);
    }
    assert_eq!(
        seen,
        (4..=10).collect::<Vec<_>>(),
        "exactly the missed ones, then live"
    );
    assert!(b.metric("crier_recovered_messages_total").await >= 5.0);
}

/// Acceptance 2: two channels on one stream, interleaved publications.
#[tokio::test]
async fn sse_resumes_two_channels_on_one_stream() {
    let redis = RedisServer::start().await;
    let a = Instance::start(history_config(Some(&redis))).await;
    let b = Instance::start(history_config(Some(&redis))).await;
    let (x, y) = (unique("hist:x"), unique("hist:y"));
    let publish = |ch: &str, n: u64| {
        let (redis, ch) = (&redis, ch.to_string());
        async move {
            redis.fcall_publish(&ch, &format!(r#"{{"n":{n}}}"#)).await;
        }
    };

    let mut on_a = sse::connect(&a.sse_url(&[&x, &y]), &[]).await.into_events();
    publish(&x, 1).await;
    publish(&y, 1).await;
    publish(&x, 2).await;
    let mut last_id = None;
    for _ in 0..3 {
        last_id = next_n(&mut on_a).await.2;
    }
    drop(on_a);
    publish(&y, 2).await;
    publish(&x, 3).await;
    publish(&y, 3).await;
    publish(&x, 4).await;

    let last_id = last_id.expect("id");
    let mut on_b = sse::connect(&b.sse_url(&[&x, &y]), &[("last-event-id", &last_id)])
        .await
        .into_events();
    let mut per_channel: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for _ in 0..4 {
        let (ch, n, _) = next_n(&mut on_b).await;
        per_channel.entry(ch).or_default().push(n);
    }
    publish(&y, 4).await;
    publish(&x, 5).await;
    for _ in 0..2 {
        let (ch, n, _) = next_n(&mut on_b).await;
        per_channel.entry(ch).or_default().push(n);
    }
    assert_eq!(per_channel[&x], vec![3, 4, 5]);
    assert_eq!(per_channel[&y], vec![2, 3, 4]);
}

/// Acceptance 3: WebSocket `subscribe` with `since` recovers, on any instance.
#[tokio::test]
async fn websocket_subscribe_with_since_recovers() {
    let redis = RedisServer::start().await;
    let a = Instance::start(history_config(Some(&redis))).await;
    let b = Instance::start(history_config(Some(&redis))).await;
    let ch = unique("hist:ws");

    let mut on_a = WsClient::connect(&a.ws("/ws")).await;
    let reply = on_a.subscribe(&ch, 1).await;
    assert_eq!(reply["type"], "subscribed");
    assert!(reply["position"].as_str().is_some(), "{reply}");
    let mut last = Value::Null;
    for n in 1..=3 {
        redis.fcall_publish(&ch, &format!(r#"{{"n":{n}}}"#)).await;
        last = on_a.recv_type("message", WAIT).await;
        assert_eq!(last["data"]["n"], n);
    }
    drop(on_a);
    for n in 4..=8 {
        redis.fcall_publish(&ch, &format!(r#"{{"n":{n}}}"#)).await;
    }

    let mut on_b = WsClient::connect(&b.ws("/ws")).await;
    on_b.recv_type("welcome", WAIT).await;
    on_b.send_json(json!({"type": "subscribe", "channel": ch, "since": last["id"], "id": 2}))
        .await;
    let reply = on_b.recv_json(WAIT).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(reply["recovered"], true);
    let mut seen = Vec::new();
    for _ in 4..=8 {
        seen.push(on_b.recv_json(WAIT).await["data"]["n"].as_u64());
    }
    redis.fcall_publish(&ch, r#"{"n":9}"#).await;
    seen.push(on_b.recv_json(WAIT).await["data"]["n"].as_u64());
    assert_eq!(seen, (4..=9).map(Some).collect::<Vec<_>>());
}

/// The memory broker keeps the same history semantics in-process.
#[tokio::test]
async fn memory_broker_resumes_too() {
    let crier = Instance::start(history_config(None)).await;
    let ch = unique("hist:mem");
    let mut first = WsClient::connect(&crier.ws(&format!("/ws?channel={ch}"))).await;
    first.recv_type("subscribed", WAIT).await;
    let mut last = Value::Null;
    for n in 1..=3 {
        crier
            .publish_api(&ch, &format!(r#"{{"n":{n}}}"#), Some(API_KEY))
            .await;
        last = first.recv_type("message", WAIT).await;
    }
    drop(first);
    for n in 4..=5 {
        crier
            .publish_api(&ch, &format!(r#"{{"n":{n}}}"#), Some(API_KEY))
            .await;
    }
    let mut again = WsClient::connect(&crier.ws("/ws")).await;
    again.recv_type("welcome", WAIT).await;
    again
        .send_json(json!({"type": "subscribe", "channel": ch, "since": last["id"]}))
        .await;
    assert_eq!(again.recv_json(WAIT).await["recovered"], true);
    assert_eq!(again.recv_json(WAIT).await["data"]["n"], 4);
    assert_eq!(again.recv_json(WAIT).await["data"]["n"], 5);
}

/// Acceptance 4: a cursor older than the history, a channel without
/// history, and a garbage cursor.
#[tokio::test]
async fn gaps_and_bad_cursors() {
    let redis = RedisServer::start().await;
    let crier = Instance::start(history_config(Some(&redis))).await;

    // Trimmed: the client's position fell out of the history.
    let ch = unique("trim:t");
    let first = redis.fcall_publish(&ch, r#"{"n":1}"#).await.expect("id");
    for n in 2..=10 {
        redis.fcall_publish(&ch, &format!(r#"{{"n":{n}}}"#)).await;
    }
    redis
        .cli(&[
            "XTRIM",
            &crier::testing::history::stream_key("", &ch),
            "MAXLEN",
            "2",
        ])
        .await;
    let mut ws = WsClient::connect(&crier.ws("/ws")).await;
    ws.recv_type("welcome", WAIT).await;
    ws.send_json(json!({"type": "subscribe", "channel": ch, "since": first, "id": 1}))
        .await;
    let reply = ws.recv_json(WAIT).await;
    assert_eq!(
        (reply["type"].clone(), reply["recovered"].clone()),
        (json!("subscribed"), json!(false))
    );
    assert_eq!(
        ws.recv_json(WAIT).await,
        json!({"type": "gap", "channel": ch})
    );
    redis.fcall_publish(&ch, r#"{"n":11}"#).await;
    assert_eq!(ws.recv_json(WAIT).await["data"]["n"], 11, "then live");

    // No history rule: nothing can be recovered.
    let plain = unique("plain:p");
    ws.send_json(json!({"type": "subscribe", "channel": plain, "since": first, "id": 2}))
        .await;
    assert_eq!(ws.recv_json(WAIT).await["recovered"], false);
    assert_eq!(ws.recv_json(WAIT).await["type"], "gap");
    // SSE: even a stream with no history channel starts with a cursor, so
    // the browser's return is known, and answered with a gap.
    let mut first = sse::connect(&crier.sse_url(&[&plain]), &[])
        .await
        .into_events();
    let cursor = first
        .next_event(WAIT)
        .await
        .expect("opening")
        .id
        .expect("cursor");
    drop(first);
    let mut events = sse::connect(&crier.sse_url(&[&plain]), &[("last-event-id", &cursor)])
        .await
        .into_events();
    let gap = events.next_message(WAIT).await.expect("gap");
    assert_eq!(gap.event.as_deref(), Some("gap"));
    assert_eq!(gap.json(), json!({"type": "gap", "channel": plain}));

    // Garbage: refused, not a crash.
    let bad = sse::connect(&crier.sse_url(&[&ch]), &[("last-event-id", "garbage")]).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let body: Value = serde_json::from_str(&bad.body_text().await).expect("json");
    assert_eq!(body["error"], "bad_request");
    let bad = sse::connect(
        &format!("{}&last_event_id=c1.AAAA", crier.sse_url(&[&ch])),
        &[],
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    ws.send_json(json!({"type": "subscribe", "channel": ch, "since": "yesterday", "id": 3}))
        .await;
    let reply = ws.recv_type("error", WAIT).await;
    assert_eq!(
        (reply["code"].clone(), reply["id"].clone()),
        (json!("bad_request"), json!(3))
    );
    ws.send_json(json!({"type": "ping", "id": 4})).await;
    assert_eq!(ws.recv_type("pong", WAIT).await["id"], 4, "still serving");
}

/// Acceptance 5: the pub/sub connection is killed while a publisher keeps
/// calling `crier_publish` at 200/s: every client gets every message once.
#[tokio::test]
async fn pubsub_connection_killed_mid_stream_loses_nothing() {
    let redis = RedisServer::start().await;
    let crier = Instance::start(history_config(Some(&redis))).await;
    let ch = unique("hist:kill");
    const TOTAL: u64 = 400;

    let mut ws = WsClient::connect(&crier.ws(&format!("/ws?channel={ch}"))).await;
    ws.recv_type("subscribed", WAIT).await;
    let mut events = sse::connect(&crier.sse_url(&[&ch]), &[])
        .await
        .into_events();
    let ws_reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        while seen.len() < TOTAL as usize {
            seen.push(
                ws.recv_type("message", WAIT).await["data"]["n"]
                    .as_u64()
                    .expect("n"),
            );
        }
        seen
    });
    let sse_reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        while seen.len() < TOTAL as usize {
            seen.push(next_n(&mut events).await.1);
        }
        seen
    });

    let publisher = redis.paced_publisher(vec![ch], TOTAL, Duration::from_millis(5));
    for round in 1..=2 {
        // Kill mid-stream, once the relay has resumed since the last kill.
        common::eventually("messages flowing", WAIT, || async {
            crier.metric("crier_messages_received_total").await >= (round * 100) as f64
        })
        .await;
        let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
        assert_eq!(killed.trim(), "1", "crier's one pub/sub connection");
        crier
            .wait_metric("crier_redis_reconnects_total", round as f64)
            .await;
    }
    publisher.await.expect("publisher");
    let expected: Vec<u64> = (0..TOTAL).collect();
    assert_eq!(
        ws_reader.await.expect("ws"),
        expected,
        "WebSocket: each once, in order"
    );
    assert_eq!(
        sse_reader.await.expect("sse"),
        expected,
        "SSE: each once, in order"
    );
}

/// Acceptance 6: Redis paused → not ready within the canary interval, and
/// ready again after.
#[tokio::test]
async fn paused_redis_turns_readiness_off_and_back() {
    let redis = RedisServer::start().await;
    let mut config = history_config(Some(&redis));
    config.redis.canary_interval = Duration::from_millis(200);
    let crier = Instance::start(config).await;
    common::eventually("a canary came back", WAIT, || async {
        crier.metric("crier_pubsub_lag_seconds").await > 0.0
    })
    .await;

    let pid = redis.pid().to_string();
    let signal = |sig: &'static str| {
        let pid = pid.clone();
        async move {
            let status = tokio::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .await
                .expect("kill");
            assert!(status.success());
        }
    };
    signal("-STOP").await;
    crier.wait_readyz(StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(crier.metric("crier_broker_up").await, 0.0);
    signal("-CONT").await;
    crier.wait_ready().await;
}

/// Issue 9.5: after a Redis restart (no persistence: the function library
/// is gone) crier loads it again on a connection that is still
/// reconnecting, without blaming the Redis version in its log, and
/// history works: an app's `FCALL crier_publish` reaches a subscriber with
/// its id.
#[tokio::test]
async fn redis_restart_reloads_the_library_without_a_false_alarm() {
    let mut redis = RedisServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("crier.toml");
    std::fs::write(
        &config,
        "[[channels]]\npattern = \"hist:*\"\nsubscribe = \"anyone\"\nhistory = { size = 100, ttl = \"10m\" }\n[redis]\nreconnect_max = \"300ms\"\n",
    )
    .expect("write config");
    let config = config.to_string_lossy().into_owned();
    let crier =
        common::crier::Process::start(&["--config", &config, "--redis-url", &redis.url()], &[])
            .await;
    let metrics = crier.http("/metrics");
    let reconnects = |n: f64| {
        let metrics = metrics.clone();
        async move {
            common::crier::metric_value(
                &common::http_get(&metrics).await.1,
                "crier_redis_reconnects_total",
            ) == n
                && common::http_get(&metrics.replace("/metrics", "/readyz"))
                    .await
                    .0
                    == StatusCode::OK
        }
    };
    common::eventually("crier ready", WAIT, || reconnects(0.0)).await;
    let ch = unique("hist:restart");
    let mut ws = WsClient::connect(&format!("ws://{}/ws?channel={ch}", crier.addr)).await;
    ws.recv_type("subscribed", WAIT).await;

    for round in 1..=3 {
        redis.restart().await;
        common::eventually("reconnected and ready", WAIT, || {
            reconnects(f64::from(round))
        })
        .await;
        // The app publishes straight to Redis: the library must be there.
        let id = redis
            .fcall_publish(&ch, &format!(r#"{{"round":{round}}}"#))
            .await
            .expect("a history id: the channel keeps history");
        let message = loop {
            let m = ws.recv_json(WAIT).await;
            if m["type"] == "message" {
                break m;
            }
        };
        assert_eq!(
            (message["data"]["round"].clone(), message["id"].clone()),
            (json!(round), json!(id))
        );
    }
    let log = crier.log.lock().expect("log").clone();
    assert!(
        !log.contains("cannot load the crier function library"),
        "false alarm after a Redis restart:\n{log}"
    );
}

/// Upgrading from crier < 0.2, which kept history at `crier:h:<channel>`:
/// a client resuming across the upgrade still gets the messages stored
/// there, then the ones stored since, in order and once.
#[tokio::test]
async fn history_written_before_the_key_change_is_still_replayed() {
    let redis = RedisServer::start().await;
    let channel = unique("hist:upgrade");
    let legacy = crier::testing::history::legacy_stream_key("", &channel);
    // What crier < 0.2's crier_publish stored.
    let old_id = |n: u32| format!("{}-0", 1_000 + n);
    for n in 1..=3 {
        redis
            .cli(&["XADD", &legacy, &old_id(n), "d", &format!(r#"{{"n":{n}}}"#)])
            .await;
    }
    let crier = Instance::start(history_config(Some(&redis))).await;
    redis
        .fcall_publish(&channel, r#"{"n":4}"#)
        .await
        .expect("id");
    let cursor = {
        let mut c = crier::testing::history::Cursor::default();
        c.0.insert(channel.clone(), old_id(1).parse().expect("id"));
        c.encode()
    };
    let mut events = sse::connect(&crier.sse_url(&[&channel]), &[("last-event-id", &cursor)])
        .await
        .into_events();
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(next_n(&mut events).await.1);
    }
    assert_eq!(seen, [2, 3, 4]);
}

/// Issue 11, acceptance 4: a subscribe with a cursor reads the channel's
/// position once (the broker reuses what the subscriber read) and its
/// history once — seen in what Redis itself executes (`MONITOR`).
#[tokio::test]
async fn a_resuming_subscribe_reads_position_and_history_once() {
    let redis = RedisServer::start().await;
    let crier = Instance::start(history_config(Some(&redis))).await;
    let channel = unique("hist:once");
    let first = redis
        .fcall_publish(&channel, r#"{"n":1}"#)
        .await
        .expect("id");
    redis
        .fcall_publish(&channel, r#"{"n":2}"#)
        .await
        .expect("id");
    let key = crier::testing::history::stream_key("", &channel);

    let mut monitor = redis.monitor().await;

    let mut ws = WsClient::connect(&crier.ws("/ws")).await;
    ws.recv_type("welcome", WAIT).await;
    ws.send_json(json!({"type": "subscribe", "channel": channel, "since": first, "id": 1}))
        .await;
    assert_eq!(ws.recv_type("subscribed", WAIT).await["recovered"], true);
    assert_eq!(ws.recv_type("message", WAIT).await["data"]["n"], 2);
    // Every command executed until now, after the subscribe.
    let quoted = format!("\"{key}\"");
    let (mut position, mut since) = (0, 0);
    for line in monitor.until_now().await {
        if line.contains(&quoted) {
            position += usize::from(line.contains("\"crier_position\""));
            since += usize::from(line.contains("\"crier_since\""));
        }
    }
    assert_eq!(
        (position, since),
        (1, 1),
        "crier_position and crier_since, once each"
    );
}

/// A live message whose id skips one — the subscription lapsed without
/// crier noticing, as in a Redis Cluster failover — is relayed only after
/// what it skipped, read from history: the client gets both, in order, and
/// no gap. (Before, the skipped message was lost silently.)
#[tokio::test]
async fn a_message_the_subscription_skipped_is_recovered_in_order() {
    let redis = RedisServer::start().await;
    let crier = Instance::start(history_config(Some(&redis))).await;
    let channel = unique("hist:skip");
    let mut ws = WsClient::connect(&crier.ws("/ws")).await;
    ws.recv_type("welcome", WAIT).await;
    ws.send_json(json!({"type": "subscribe", "channel": channel, "id": 1}))
        .await;
    ws.recv_type("subscribed", WAIT).await;
    let first = redis
        .fcall_publish(&channel, r#"{"n":1}"#)
        .await
        .expect("id");
    let n = |v: Value| (v["type"].clone(), v["data"]["n"].clone());
    assert_eq!(n(ws.recv_json(WAIT).await), (json!("message"), json!(1)));

    // The next id, written to the history but never published: what a
    // lapsed subscription misses.
    let (ms, seq) = first.split_once('-').expect("an id");
    let missed = format!("{ms}-{}", seq.parse::<u64>().expect("seq") + 1);
    let key = crier::testing::history::stream_key("", &channel);
    redis.cli(&["XADD", &key, &missed, "d", r#"{"n":2}"#]).await;
    redis
        .fcall_publish(&channel, r#"{"n":3}"#)
        .await
        .expect("id");
    assert_eq!(
        n(ws.recv_json(WAIT).await),
        (json!("message"), json!(2)),
        "the skipped message first"
    );
    assert_eq!(n(ws.recv_json(WAIT).await), (json!("message"), json!(3)));
}

/// Issue 20: a resume on a Redis that refuses writes past `maxmemory`
/// (`noeviction`), its history full of 20 KB messages. The stream's first
/// bytes must be its HTTP head: the socket left hyper before hyper had
/// written the head, and the client got a chunk with no status line
/// (9 tries in 20). Read as raw bytes, as a proxy would.
#[tokio::test]
async fn a_resume_on_a_full_redis_starts_with_the_http_head_every_time() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let redis =
        RedisServer::start_with_args(&["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"])
            .await;
    let crier = Instance::start(history_config(Some(&redis))).await;
    let ch = unique("hist:m");
    let client = ::redis::Client::open(redis.url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let payload = format!(r#"{{"pad":"{}"}}"#, "x".repeat(20 * 1024));
    let mut refused = 0;
    for _ in 0..400 {
        let published: Result<Option<String>, _> = ::redis::cmd("FCALL")
            .arg("crier_publish")
            .arg(1)
            .arg(&ch)
            .arg(&payload)
            .query_async(&mut conn)
            .await;
        refused += usize::from(published.is_err());
    }
    assert!(refused > 0, "Redis filled up and refused writes (OOM)");

    let mut cursor = crier::testing::history::Cursor::default();
    cursor.0.insert(ch.clone(), "1-0".parse().expect("id"));
    let request = format!(
        "GET /sse?channel={ch}&last_event_id={} HTTP/1.1\r\nhost: crier\r\n\
         accept: text/event-stream\r\n\r\n",
        cursor.encode()
    );
    for attempt in 1..=20 {
        let mut socket = tokio::net::TcpStream::connect(&crier.addr)
            .await
            .expect("connect");
        socket.write_all(request.as_bytes()).await.expect("request");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.len() < 32 {
            let n = tokio::time::timeout(WAIT, socket.read(&mut buf))
                .await
                .expect("crier answers")
                .expect("read");
            assert!(n > 0, "try {attempt}: closed after {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
        let start = String::from_utf8_lossy(&got[..32]).into_owned();
        assert!(
            start.starts_with("HTTP/1.1 200 OK\r\n"),
            "try {attempt}: the stream starts with its head, not {start:?}"
        );
    }
}

/// `count` messages of about `size` bytes on `ch` with `crier_publish`,
/// pipelined on one connection, all kept in history.
async fn publish_big(redis: &RedisServer, ch: &str, from: usize, count: usize, size: usize) {
    let client = ::redis::Client::open(redis.url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let mut pipe = ::redis::pipe();
    for n in from..from + count {
        let payload = format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(size));
        pipe.cmd("FCALL")
            .arg("crier_publish")
            .arg(1)
            .arg(ch)
            .arg(payload);
    }
    let ids: Vec<Option<String>> = pipe.query_async(&mut conn).await.expect("FCALL");
    assert!(ids.iter().all(Option::is_some), "every one kept in history");
}

/// Issue 20: `max_replay_bytes` (4 MiB by default) is what a client
/// receives. Each message reaches a client in one encoding (its WebSocket
/// frame or its SSE event, never both), so a 2.8 MiB resume is replayed
/// whole on either transport; the budget still holds for a resume over it.
#[tokio::test]
async fn a_resume_within_max_replay_bytes_is_replayed_whole_on_ws_and_sse() {
    let redis = RedisServer::start().await;
    let crier = Instance::start(history_config(Some(&redis))).await;
    assert_eq!(
        crier::config::Config::default().limits.max_replay_bytes,
        4 << 20
    );
    let ch = unique("hist:budget");
    let since = redis
        .fcall_publish(&ch, r#"{"n":0}"#)
        .await
        .expect("history id");
    // 140 × 20 KB: about 2.8 MiB as frames, and as much again as SSE events.
    publish_big(&redis, &ch, 1, 140, 20 * 1024).await;

    let mut ws = WsClient::connect(&crier.ws("/ws")).await;
    ws.recv_type("welcome", WAIT).await;
    ws.send_json(json!({"type": "subscribe", "channel": ch, "since": since, "id": 1}))
        .await;
    let reply = ws.recv_json(WAIT).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(reply["recovered"], true, "the whole resume fits: {reply}");
    for n in 1..=140 {
        let got = ws.recv_json(WAIT).await;
        assert_eq!(
            (got["type"].as_str(), got["data"]["n"].as_u64()),
            (Some("message"), Some(n)),
            "replayed in order, no gap"
        );
    }

    let mut cursor = crier::testing::history::Cursor::default();
    cursor.0.insert(ch.clone(), since.parse().expect("id"));
    let mut sse = sse::connect(
        &crier.sse_url(&[&ch]),
        &[("last-event-id", &cursor.encode())],
    )
    .await
    .into_events();
    for n in 1..=140 {
        let got = sse.next_message(WAIT).await.expect("stream open").json();
        assert_eq!(
            (got["type"].as_str(), got["data"]["n"].as_u64()),
            (Some("message"), Some(n)),
            "replayed in order, no gap"
        );
    }

    // 80 more: 220 × 20 KB (4.3 MiB) no longer fits, and the client hears so.
    publish_big(&redis, &ch, 141, 80, 20 * 1024).await;
    ws.send_json(json!({"type": "unsubscribe", "channel": ch, "id": 2}))
        .await;
    ws.recv_type("unsubscribed", WAIT).await;
    ws.send_json(json!({"type": "subscribe", "channel": ch, "since": since, "id": 3}))
        .await;
    let reply = ws.recv_type("subscribed", WAIT).await;
    assert_eq!(reply["recovered"], false, "over the budget: {reply}");
    assert_eq!(ws.recv_json(WAIT).await["type"], "gap");
    let mut over = sse::connect(
        &crier.sse_url(&[&ch]),
        &[("last-event-id", &cursor.encode())],
    )
    .await
    .into_events();
    let first = over.next_message(WAIT).await.expect("stream open").json();
    assert_eq!(first["type"], "gap", "over the budget: {first}");
}

/// Issue 21.3: a late subscriber asks for an operation's history without
/// a hand-built cursor: `?since=oldest` on SSE, `"since":"oldest"` on
/// WebSocket (and `/ws?since=oldest` for query channels). Each gets every
/// message still in history, then live ones; on a channel that trimmed
/// its history, what is left and no `gap` (nothing it was owed is lost).
#[tokio::test]
async fn a_late_subscriber_starts_at_the_oldest_message_still_in_history() {
    let redis = RedisServer::start().await;
    let crier = Instance::start(history_config(Some(&redis))).await;
    let ch = unique("hist:late");
    for n in 1..=5 {
        redis.fcall_publish(&ch, &format!(r#"{{"n":{n}}}"#)).await;
    }

    let mut sse = sse::connect(&format!("{}&since=oldest", crier.sse_url(&[&ch])), &[])
        .await
        .into_events();
    let mut ws = WsClient::connect(&crier.ws("/ws")).await;
    ws.recv_type("welcome", WAIT).await;
    ws.send_json(json!({"type": "subscribe", "channel": ch, "since": "oldest", "id": 1}))
        .await;
    let reply = ws.recv_json(WAIT).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(reply["recovered"], true, "{reply}");
    let mut query_ws =
        WsClient::connect(&crier.ws(&format!("/ws?channel={ch}&since=oldest"))).await;
    query_ws.recv_type("subscribed", WAIT).await;
    redis.fcall_publish(&ch, r#"{"n":6}"#).await;
    let mut on_sse = Vec::new();
    let (mut on_ws, mut on_query_ws) = (Vec::new(), Vec::new());
    for _ in 1..=6 {
        on_sse.push(next_n(&mut sse).await.1);
        on_ws.push(
            ws.recv_type("message", WAIT).await["data"]["n"]
                .as_u64()
                .expect("n"),
        );
        on_query_ws.push(
            query_ws.recv_type("message", WAIT).await["data"]["n"]
                .as_u64()
                .expect("n"),
        );
    }
    let all: Vec<u64> = (1..=6).collect();
    assert_eq!(on_sse, all, "SSE: history, then live");
    assert_eq!(on_ws, all, "WebSocket: history, then live");
    assert_eq!(
        on_query_ws, all,
        "WebSocket query channel: history, then live"
    );

    // A channel whose history was trimmed: what is left, and no gap.
    let trimmed = unique("trim:late");
    for n in 1..=300 {
        redis
            .fcall_publish(&trimmed, &format!(r#"{{"n":{n}}}"#))
            .await;
    }
    let mut ws = WsClient::connect(&crier.ws("/ws")).await;
    ws.recv_type("welcome", WAIT).await;
    ws.send_json(json!({"type": "subscribe", "channel": trimmed, "since": "oldest", "id": 2}))
        .await;
    let reply = ws.recv_json(WAIT).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    redis.fcall_publish(&trimmed, r#"{"n":301}"#).await;
    let mut kept = Vec::new();
    loop {
        let m = ws.recv_json(WAIT).await;
        assert_ne!(m["type"], "gap", "oldest is no loss: {m}");
        let n = m["data"]["n"].as_u64().expect("n");
        kept.push(n);
        if n == 301 {
            break;
        }
    }
    assert!(
        kept.len() < 300 && kept.len() >= 5,
        "trimmed to about 5: {kept:?}"
    );
    assert!(
        kept.windows(2).all(|w| w[1] == w[0] + 1),
        "in order: {kept:?}"
    );

    // Anything else after `since=` is refused, naming the one value.
    let (status, body) = common::http_get(&format!("{}&since=0", crier.sse_url(&[&ch]))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("oldest"), "{body}");
}
