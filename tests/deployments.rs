//! Several crier deployments on one Redis: each with its own
//! `channel_prefix`, history rules and function library
//! (`crier_publish_<name>`), started in either order, restarted, and two
//! that cannot share a library name; and one deployment whose instances
//! disagree for a while (a rolling change of its history rules).

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::crier::{test_config, Instance, Process, WAIT};
use common::redis::RedisServer;
use common::ws::WsClient;
use common::{eventually, http_get, unique};
use crier::config::{ChannelRule, Config, HistoryRule, Subscribe};
use http::StatusCode;
use serde_json::Value;
use tokio::task::JoinHandle;

const EVENTS: usize = 1000;

/// A deployment: `prefix`, `ops:*` open to anyone with history of `size`.
fn deployment(redis: &RedisServer, prefix: &str, size: u64) -> Config {
    let mut config = test_config(Some(redis.url()));
    config.redis.channel_prefix = prefix.into();
    config.channels = vec![ChannelRule {
        pattern: "ops:*".into(),
        subscribe: Subscribe::Anyone,
        history: Some(HistoryRule {
            size,
            ttl: Duration::from_secs(3600),
        }),
        event_field: None,
        presence: false,
    }];
    config.publish.api_keys = vec![api_key(prefix)];
    config.limits.queue_size = 4 * EVENTS;
    config
}

fn api_key(prefix: &str) -> String {
    format!("deployment-{}-key-0123456789", prefix.trim_end_matches(':'))
}

/// A WebSocket subscriber of `channel` that collects the `data` of every
/// message until it has `count` of them.
async fn listener(crier: &Instance, channel: &str, count: usize) -> JoinHandle<Vec<Value>> {
    let mut client = WsClient::connect(&crier.ws("/ws")).await;
    let reply = client.subscribe(channel, 1).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    tokio::spawn(async move {
        let mut got = Vec::with_capacity(count);
        while got.len() < count {
            let message = client.recv_type("message", WAIT).await;
            got.push(message["data"].clone());
        }
        got
    })
}

/// `EVENTS` through `POST /api/publish`, then `EVENTS` through `FCALL
/// <function>`, each `{"d": tag, "via": …, "n": i}`.
async fn publish_both_ways(
    redis: &RedisServer,
    crier: &Instance,
    prefix: &str,
    function: &str,
    channel: &str,
    tag: &str,
    events: usize,
) {
    let key = api_key(prefix);
    for n in 0..events {
        let data = format!(r#"{{"d":"{tag}","via":"api","n":{n}}}"#);
        let status = crier.publish_api(channel, &data, Some(&key)).await;
        assert_eq!(status, StatusCode::OK, "{tag}: POST /api/publish #{n}");
    }
    let client = ::redis::Client::open(redis.url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    for n in 0..events {
        let id: Option<String> = ::redis::cmd("FCALL")
            .arg(function)
            .arg(1)
            .arg(channel)
            .arg(format!(r#"{{"d":"{tag}","via":"fcall","n":{n}}}"#))
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{tag}: FCALL {function} #{n}: {e}"));
        assert!(id.is_some(), "{tag}: kept in history, so it has an id");
    }
}

/// Exactly this deployment's events, in order: the API ones, then the
/// `FCALL` ones.
fn assert_own(got: &[Value], tag: &str, events: usize) {
    assert_eq!(got.len(), 2 * events, "{tag}");
    for (i, data) in got.iter().enumerate() {
        let (via, n) = match i < events {
            true => ("api", i),
            false => ("fcall", i - events),
        };
        assert_eq!(data["d"], tag, "{tag} #{i} is another deployment's: {data}");
        assert_eq!(data["via"], via, "{tag} #{i}: {data}");
        assert_eq!(data["n"], n, "{tag} #{i}: {data}");
    }
}

async fn xlen(redis: &RedisServer, key: &str) -> usize {
    redis
        .cli(&["XLEN", key])
        .await
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("XLEN {key}: {e}"))
}

/// A keeps 5,000 messages of `ops:*` under `a:`, B 50 under `b:`; both
/// publish 1,000 events through the API and 1,000 through their
/// function to the same channel name. Each subscriber gets exactly its
/// own 2,000, each history is where and as long as its own rules say;
/// then the first one started restarts and both go on.
async fn two_deployments(a_first: bool) {
    let redis = RedisServer::start().await;
    let (a_config, b_config) = (deployment(&redis, "a:", 5000), deployment(&redis, "b:", 50));
    let (a, b) = match a_first {
        true => {
            let a = Instance::start(a_config.clone()).await;
            (a, Instance::start(b_config.clone()).await)
        }
        false => {
            let b = Instance::start(b_config.clone()).await;
            (Instance::start(a_config.clone()).await, b)
        }
    };
    let channel = unique("ops:deploy");
    let a_heard = listener(&a, &channel, 2 * EVENTS).await;
    let b_heard = listener(&b, &channel, 2 * EVENTS).await;
    publish_both_ways(&redis, &a, "a:", "crier_publish_a", &channel, "A", EVENTS).await;
    publish_both_ways(&redis, &b, "b:", "crier_publish_b", &channel, "B", EVENTS).await;
    assert_own(&a_heard.await.expect("A's listener"), "A", EVENTS);
    assert_own(&b_heard.await.expect("B's listener"), "B", EVENTS);

    let a_stream = format!("a:crier:s:{{a:{channel}}}");
    let b_stream = format!("b:crier:s:{{b:{channel}}}");
    assert_eq!(xlen(&redis, &a_stream).await, 2 * EVENTS, "A keeps 5,000");
    let b_kept = xlen(&redis, &b_stream).await;
    assert!(
        (50..500).contains(&b_kept),
        "B keeps about 50 (MAXLEN ~), not A's 5,000: {b_kept}"
    );
    let libraries = redis.cli(&["FUNCTION", "LIST"]).await;
    assert!(
        libraries.contains("crier_a") && libraries.contains("crier_b"),
        "one library per deployment: {libraries}"
    );

    // Restart the one started first: the other's library, rules and
    // subscribers are untouched, and it comes back with its own.
    let (first, first_config, other, other_prefix, other_tag) = match a_first {
        true => (a, a_config, b, "b:", "B"),
        false => (b, b_config, a, "a:", "A"),
    };
    first.shutdown().await;
    let first = Instance::start(first_config.clone()).await;
    let first_prefix = first_config.redis.channel_prefix.clone();
    let first_tag = if a_first { "A" } else { "B" };
    let function = |prefix: &str| format!("crier_publish_{}", prefix.trim_end_matches(':'));
    let again = unique("ops:again");
    let first_heard = listener(&first, &again, 2 * 100).await;
    let other_heard = listener(&other, &again, 2 * 100).await;
    publish_both_ways(
        &redis,
        &first,
        &first_prefix,
        &function(&first_prefix),
        &again,
        first_tag,
        100,
    )
    .await;
    publish_both_ways(
        &redis,
        &other,
        other_prefix,
        &function(other_prefix),
        &again,
        other_tag,
        100,
    )
    .await;
    assert_own(&first_heard.await.expect("listener"), first_tag, 100);
    assert_own(&other_heard.await.expect("listener"), other_tag, 100);
    assert_eq!(
        first.metric("crier_redis_library{state=\"own\"}").await,
        1.0
    );
    assert_eq!(
        other.metric("crier_redis_library{state=\"own\"}").await,
        1.0
    );
}

#[tokio::test]
async fn two_deployments_on_one_redis_keep_their_own_channels_and_history_a_first() {
    two_deployments(true).await;
}

#[tokio::test]
async fn two_deployments_on_one_redis_keep_their_own_channels_and_history_b_first() {
    two_deployments(false).await;
}

/// The prefixes `c:` and `c` meet in one library name, `crier_c`: the
/// second deployment never replaces the first's library; it says so
/// naming both prefixes, is not ready, counts it, and refuses to publish
/// with history (it would publish under the other's prefix). The first
/// goes on as if nothing happened.
#[tokio::test]
async fn a_library_name_held_by_another_deployment_is_a_loud_conflict() {
    let redis = RedisServer::start().await;
    let first = Instance::start(deployment(&redis, "c:", 100)).await;
    let channel = unique("ops:conflict");
    let heard = listener(&first, &channel, 2).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("crier.toml");
    let toml = format!(
        "[redis]\nurl = \"{}\"\nchannel_prefix = \"c\"\n[publish]\napi_keys = [\"{}\"]\n\
         [[channels]]\npattern = \"ops:*\"\nsubscribe = \"anyone\"\nhistory = {{ size = 10, ttl = \"1h\" }}\n",
        redis.url(),
        api_key("c"),
    );
    std::fs::write(&file, toml).expect("config");
    let second = Process::start(&["--config", file.to_str().expect("path")], &[]).await;
    let metrics = second.http("/metrics");
    eventually("the second deployment reports the conflict", WAIT, || {
        let metrics = metrics.clone();
        async move {
            let body = http_get(&metrics).await.1;
            common::crier::metric_value(&body, "crier_redis_library{state=\"conflict\"}") == 1.0
        }
    })
    .await;
    let (status, _) = http_get(&second.http("/readyz")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "not ready");
    let log = second.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("belongs to another deployment"))
        .unwrap_or_else(|| panic!("no conflict line in the log:\n{log}"));
    assert!(
        line.contains(r#"channel_prefix \"c:\""#) && line.contains(r#"channel_prefix \"c\""#),
        "the line names both prefixes: {line}"
    );
    let (status, body) = common::http_post(
        &second.http("/api/publish"),
        &[
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {}", api_key("c"))),
        ],
        &format!(r#"{{"channel":"{channel}","data":{{"d":"second"}}}}"#),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");

    // The first deployment: its library, its prefix, its subscribers.
    assert_eq!(first.readyz().await, StatusCode::OK);
    let key = api_key("c:");
    let status = first
        .publish_api(&channel, r#"{"d":"first","n":0}"#, Some(&key))
        .await;
    assert_eq!(status, StatusCode::OK);
    let id = redis
        .fcall_publish_as("crier_publish_c", &channel, r#"{"d":"first","n":1}"#)
        .await
        .expect("FCALL crier_publish_c");
    assert!(id.is_some());
    let got = heard.await.expect("listener");
    assert_eq!(got[0]["d"], "first");
    assert_eq!(got[1]["n"], 1);
    let code = redis
        .cli(&["FUNCTION", "LIST", "LIBRARYNAME", "crier_c", "WITHCODE"])
        .await;
    assert!(
        code.contains(r#""prefix":"c:""#),
        "still the first's: {code}"
    );
}

/// One deployment (`r:`) changes its history rules in a rollout: the
/// old instance runs while the new one starts, serves its subscribers
/// throughout, then stops. The new rules take the library as the new
/// instance starts (and the old instance, reconnecting with every
/// canary, never puts its rules back); a subscriber that moves from the
/// old instance to the new one with its cursor misses nothing.
#[tokio::test]
async fn a_rolling_change_of_history_rules_converges_without_loss() {
    let redis = RedisServer::start().await;
    let old_config = deployment(&redis, "r:", 100);
    let new_config = deployment(&redis, "r:", 3000);
    let old = Instance::start(old_config).await;
    let channel = unique("ops:rollout");

    let mut client = WsClient::connect(&old.ws("/ws")).await;
    let reply = client.subscribe(&channel, 1).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    const TOTAL: u64 = 600;
    let publisher = redis.paced_publisher_as(
        "crier_publish_r",
        vec![channel.clone()],
        TOTAL,
        Duration::from_millis(5),
    );
    let mut seen = Vec::new();
    let mut last_id = String::new();
    let take = |m: Value, seen: &mut Vec<u64>, last_id: &mut String| {
        seen.push(m["data"]["n"].as_u64().expect("n"));
        *last_id = m["id"].as_str().expect("id").to_owned();
    };
    while seen.len() < 100 {
        take(
            client.recv_type("message", WAIT).await,
            &mut seen,
            &mut last_id,
        );
    }
    let new = Instance::start(new_config).await;
    new.wait_metric("crier_redis_library{state=\"own\"}", 1.0)
        .await;
    old.wait_metric("crier_redis_library{state=\"newer\"}", 1.0)
        .await;
    assert_eq!(
        old.readyz().await,
        StatusCode::OK,
        "the old one still serves"
    );
    while seen.len() < 300 {
        take(
            client.recv_type("message", WAIT).await,
            &mut seen,
            &mut last_id,
        );
    }
    old.shutdown().await;
    // The client moves, as after a drain: to the new instance, with its cursor.
    let mut client = WsClient::connect(&new.ws("/ws")).await;
    client
        .send_json(
            serde_json::json!({"type": "subscribe", "channel": channel, "since": last_id, "id": 2}),
        )
        .await;
    publisher.await.expect("publisher");
    while seen.len() < TOTAL as usize {
        let m = client.recv_json(WAIT).await;
        match m["type"].as_str() {
            Some("message") => take(m, &mut seen, &mut last_id),
            Some("subscribed") => assert_eq!(m["recovered"], true, "{m}"),
            Some("gap") => panic!("a gap in the rollout after {} messages", seen.len()),
            _ => {}
        }
    }
    assert_eq!(
        seen,
        (0..TOTAL).collect::<Vec<_>>(),
        "every message, once, in order"
    );
    // The old rule (100) trimmed while it held the library; the new one
    // (3,000) trims nothing: more than the old rule could ever keep.
    let kept = xlen(&redis, &format!("r:crier:s:{{r:{channel}}}")).await;
    assert!(
        kept > 300,
        "the new rule keeps what followed the switch: {kept}"
    );
    let code = redis
        .cli(&["FUNCTION", "LIST", "LIBRARYNAME", "crier_r", "WITHCODE"])
        .await;
    assert!(code.contains(", 3000, "), "the new rules: {code}");
    assert_eq!(new.readyz().await, StatusCode::OK);
}
