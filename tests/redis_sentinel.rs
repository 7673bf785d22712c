//! crier behind Redis Sentinel: a real primary, a replica and three
//! `redis-server --sentinel` processes. crier asks the sentinels where the
//! primary is, follows a failover with nothing lost, and refuses a
//! `redis.url` that points at a replica or a sentinel.

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::crier::{test_config, Instance, Process, WAIT};
use common::redis::{RedisServer, Sentinel, MASTER_NAME};
use common::sse;
use common::unique;
use common::ws::WsClient;
use crier::config::{ChannelRule, HistoryRule, SentinelConfig, Subscribe};
use http::StatusCode;
use serde_json::Value;
use tokio::sync::watch;

const API_KEY: &str = "sentinel-test-publish-key-0123";

/// A primary, its replica, and three sentinels that know both.
async fn sentinel_setup() -> (RedisServer, RedisServer, Vec<Sentinel>) {
    let primary = RedisServer::start().await;
    let replica = RedisServer::start_replica(&primary).await;
    let mut sentinels = Vec::new();
    for _ in 0..3 {
        sentinels.push(Sentinel::start(&primary).await);
    }
    // A failover needs a sentinel that has found the replica and the
    // other sentinels (they announce themselves every 2 s).
    for sentinel in &sentinels {
        common::eventually(
            "sentinels know the replica and each other",
            Duration::from_secs(20),
            || async {
                let replicas: Vec<Value> = sentinel
                    .ask::<redis::Value>(&["replicas", MASTER_NAME])
                    .await
                    .map(|v| match v {
                        redis::Value::Array(items) => {
                            items.into_iter().map(|_| Value::Null).collect()
                        }
                        _ => Vec::new(),
                    })
                    .unwrap_or_default();
                let peers = match sentinel
                    .ask::<redis::Value>(&["sentinels", MASTER_NAME])
                    .await
                {
                    Ok(redis::Value::Array(items)) => items.len(),
                    _ => 0,
                };
                !replicas.is_empty() && peers == 2
            },
        )
        .await;
    }
    (primary, replica, sentinels)
}

fn history_rule() -> ChannelRule {
    ChannelRule {
        pattern: "hist:*".into(),
        subscribe: Subscribe::Anyone,
        history: Some(HistoryRule {
            size: 10_000,
            ttl: Duration::from_secs(3600),
        }),
        event_field: None,
        presence: false,
    }
}

/// An app publishing `count` messages through `crier_publish` at about
/// 200/s, to whichever server the sentinels name as the primary, retrying
/// each message until Redis takes it. Reports its progress.
fn publisher(
    sentinel_url: String,
    channel: String,
    count: u32,
) -> (tokio::task::JoinHandle<()>, watch::Receiver<u32>) {
    let (tx, rx) = watch::channel(0);
    let task = tokio::spawn(async move {
        let key = crier::testing::history::stream_key("", &channel);
        let mut conn;
        for n in 1..=count {
            loop {
                // A Sentinel-aware app: it asks where the primary is.
                conn = primary_connection(&sentinel_url).await;
                if let Some(c) = conn.as_mut() {
                    let stored: redis::RedisResult<Option<String>> = redis::cmd("FCALL")
                        .arg("crier_publish")
                        .arg(1)
                        .arg(&key)
                        .arg(format!(r#"{{"n":{n}}}"#))
                        .query_async(c)
                        .await;
                    if stored.is_ok() {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tx.send_replace(n);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    (task, rx)
}

async fn primary_connection(sentinel_url: &str) -> Option<redis::aio::MultiplexedConnection> {
    let sentinel = redis::Client::open(sentinel_url).ok()?;
    let mut s = sentinel.get_multiplexed_async_connection().await.ok()?;
    let (host, port): (String, u16) = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(MASTER_NAME)
        .query_async(&mut s)
        .await
        .ok()?;
    let client = redis::Client::open(format!("redis://{host}:{port}")).ok()?;
    client.get_multiplexed_async_connection().await.ok()
}

/// Message ids a client received, in order, and its `gap` notices.
#[derive(Default)]
struct Seen {
    ids: Vec<String>,
    gaps: usize,
}

/// Issue 10, acceptance 3: `SENTINEL FAILOVER` while an app publishes at
/// 200/s: `/readyz` comes back, every client gets every stored message
/// exactly once and in order, and the publish API works on the new primary.
#[tokio::test]
async fn a_sentinel_failover_loses_nothing() {
    let (primary, _replica, sentinels) = sentinel_setup().await;
    let mut config = test_config(None);
    config.redis.sentinel = Some(SentinelConfig {
        master: MASTER_NAME.into(),
        nodes: sentinels.iter().map(Sentinel::url).collect(),
        password: None,
    });
    config.redis.canary_interval = Duration::from_millis(200);
    config.redis.connect_timeout = Duration::from_secs(1);
    config.channels = vec![history_rule()];
    config.publish.api_keys = vec![API_KEY.into()];
    let crier = Instance::start(config).await;
    let channel = unique("hist:failover");

    let ws_seen = Arc::new(Mutex::new(Seen::default()));
    let mut ws = WsClient::connect(&crier.ws(&format!("/ws?channel={channel}"))).await;
    ws.recv_type("subscribed", WAIT).await;
    let sink = Arc::clone(&ws_seen);
    let ws_reader = tokio::spawn(async move {
        loop {
            let v = ws.recv_json(Duration::from_secs(60)).await;
            let mut seen = sink.lock().expect("lock");
            match v["type"].as_str() {
                Some("message") => seen.ids.push(v["id"].as_str().expect("id").to_string()),
                Some("gap") => seen.gaps += 1,
                _ => {}
            }
        }
    });
    let sse_seen = Arc::new(Mutex::new(Seen::default()));
    let mut events = sse::connect(&crier.sse_url(&[&channel]), &[])
        .await
        .into_events();
    let sink = Arc::clone(&sse_seen);
    let sse_reader = tokio::spawn(async move {
        while let Some(e) = events.next_message(Duration::from_secs(60)).await {
            let v = e.json();
            let mut seen = sink.lock().expect("lock");
            match v["type"].as_str() {
                Some("message") => seen.ids.push(v["id"].as_str().expect("id").to_string()),
                Some("gap") => seen.gaps += 1,
                _ => {}
            }
        }
    });

    let (publishing, mut progress) = publisher(sentinels[0].url(), channel.clone(), 600);
    progress.wait_for(|n| *n >= 100).await.expect("publishing");
    let old_port = primary.port();
    let failover_at = std::time::Instant::now();
    let answer: String = sentinels[0]
        .ask(&["failover", MASTER_NAME])
        .await
        .expect("SENTINEL FAILOVER");
    assert_eq!(answer, "OK");
    common::eventually("the sentinels name a new primary", WAIT, || async {
        sentinels[0]
            .primary_port()
            .await
            .is_some_and(|p| p != old_port)
    })
    .await;
    // crier follows: its pub/sub connection is on the new primary.
    let new_port = sentinels[0].primary_port().await.expect("primary");
    common::eventually("crier subscribed on the new primary", WAIT, || async {
        redis_cli(new_port, &["PUBSUB", "NUMSUB", &channel])
            .await
            .lines()
            .nth(1)
            .is_some_and(|n| n.trim() == "1")
    })
    .await;
    let moved_after = failover_at.elapsed();
    crier.wait_ready().await;
    publishing.await.expect("publisher");
    // The figures docs/operations.md quotes (run with --nocapture).
    eprintln!(
        "failover: crier on the new primary after {moved_after:?}; recovered {} messages, {} gaps",
        crier.metric("crier_recovered_messages_total").await,
        crier.metric("crier_gaps_total").await
    );

    // What the new primary holds is what every client must have seen.
    let new_primary = sentinels[0].primary_port().await.expect("primary");
    let stored_raw = redis_cli(
        new_primary,
        &[
            "XRANGE",
            &crier::testing::history::stream_key("", &channel),
            "-",
            "+",
        ],
    )
    .await;
    let stored: Vec<String> = stored_raw
        .lines()
        .filter(|l| l.contains('-') && l.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .map(str::to_string)
        .collect();
    // Writes the old primary took after the replica's promotion, before
    // the sentinels named the new one, are Redis's own split-brain loss;
    // the rest is there.
    assert!(stored.len() > 200, "stored: {}", stored.len());
    for (name, seen) in [("WebSocket", &ws_seen), ("SSE", &sse_seen)] {
        common::eventually(
            &format!("the {name} client has every stored message"),
            WAIT,
            || {
                let seen = Arc::clone(seen);
                let stored = stored.clone();
                async move {
                    let seen = seen.lock().expect("lock");
                    let have: HashSet<&String> = seen.ids.iter().collect();
                    stored.iter().all(|id| have.contains(id))
                }
            },
        )
        .await;
        let seen = seen.lock().expect("lock");
        let unique_ids: HashSet<&String> = seen.ids.iter().collect();
        assert_eq!(unique_ids.len(), seen.ids.len(), "{name}: a message twice");
        let kept: Vec<&String> = seen.ids.iter().filter(|id| stored.contains(id)).collect();
        assert_eq!(kept, stored.iter().collect::<Vec<_>>(), "{name}: in order");
        assert_eq!(seen.gaps, 0, "{name}: history covered the failover");
    }
    assert_eq!(
        crier
            .publish_api(&channel, r#"{"after":"failover"}"#, Some(API_KEY))
            .await,
        StatusCode::OK,
        "the publish API writes to the new primary"
    );
    ws_reader.abort();
    sse_reader.abort();
}

/// `redis-cli -p PORT args…` against any local server.
async fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = tokio::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .await
        .expect("redis-cli");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Issue 10, acceptance 3: `redis.url` at a replica or at a sentinel is a
/// clear error in the log and a steady 503, never a flapping `/readyz`.
#[tokio::test]
async fn a_url_at_a_replica_or_a_sentinel_is_refused_clearly() {
    let (_primary, replica, sentinels) = sentinel_setup().await;
    for (url, says) in [
        (replica.url(), "is a replica, not the primary"),
        (
            sentinels[0].url(),
            "is a Sentinel: configure [redis.sentinel]",
        ),
    ] {
        let crier = Process::start(&["--redis-url", &url, "--dev"], &[]).await;
        common::eventually(&format!("the log says `{says}`"), WAIT, || {
            let log = crier.log_text();
            async move { log.contains(says) }
        })
        .await;
        // Steady: every look for a while is 503.
        for _ in 0..10 {
            let (status, _) = common::http_get(&crier.http("/readyz")).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{url}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
