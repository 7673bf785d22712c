//! crier on Redis Cluster (issue 10): real `redis-server --cluster-enabled`
//! processes joined with `redis-cli --cluster create`.

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use common::cluster::RedisCluster;

#[tokio::test]
async fn a_test_cluster_forms_with_three_shards() {
    let _one = common::cluster::ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start(3, 1).await;
    let mut primaries = std::collections::HashSet::new();
    for key in ["a", "b", "c", "d", "e", "f", "g", "h"] {
        primaries.insert(cluster.primary_of(key).await);
    }
    assert!(primaries.len() >= 2, "{primaries:?}");
}

use std::time::Duration;

use common::crier::{test_config, Instance, WAIT};
use common::sse;
use common::unique;
use common::ws::WsClient;
use crier::config::{ChannelRule, ClusterConfig, HistoryRule, Subscribe};

/// `hist:*` keeps history, `public:*` does not; crier on `cluster`.
fn cluster_config(cluster: &RedisCluster) -> crier::config::Config {
    let mut config = test_config(None);
    config.redis.cluster = Some(ClusterConfig {
        nodes: cluster.urls(),
    });
    config.redis.canary_interval = Duration::from_millis(300);
    let rule = |pattern: &str, history: bool| ChannelRule {
        pattern: pattern.into(),
        subscribe: Subscribe::Anyone,
        history: history.then_some(HistoryRule {
            size: 1000,
            ttl: Duration::from_secs(3600),
        }),
        event_field: None,
        presence: false,
    };
    config.channels = vec![rule("hist:*", true), rule("public:*", false)];
    config
}

/// One channel name with `prefix` per shard of the cluster.
async fn one_per_shard(cluster: &RedisCluster, prefix: &str) -> Vec<String> {
    let mut by_primary = std::collections::BTreeMap::new();
    while by_primary.len() < 3 {
        let name = unique(prefix);
        by_primary
            .entry(cluster.primary_of(&name).await)
            .or_insert(name);
    }
    by_primary.into_values().collect()
}

/// Issue 10, acceptance 4: with 3 primaries and 3 replicas and two crier
/// instances, `SPUBLISH`, `PUBLISH` and `FCALL crier_publish` on channels of
/// every shard reach SSE and WebSocket clients on both instances, and a
/// browser resumes with `Last-Event-ID` on the other instance.
#[tokio::test]
async fn every_shard_relays_and_resumes_across_instances() {
    let _one = common::cluster::ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start(3, 1).await;
    let a = Instance::start(cluster_config(&cluster)).await;
    let b = Instance::start(cluster_config(&cluster)).await;
    let hist = one_per_shard(&cluster, "hist:c").await;
    let plain = one_per_shard(&cluster, "public:c").await;
    let all: Vec<&str> = hist.iter().chain(&plain).map(String::as_str).collect();

    let query: Vec<String> = all.iter().map(|c| format!("channel={c}")).collect();
    let mut ws = Vec::new();
    let mut streams = Vec::new();
    for crier in [&a, &b] {
        let mut client = WsClient::connect(&crier.ws(&format!("/ws?{}", query.join("&")))).await;
        for _ in &all {
            client.recv_type("subscribed", WAIT).await;
        }
        ws.push(client);
        streams.push(sse::connect(&crier.sse_url(&all), &[]).await.into_events());
    }

    let mut sent = Vec::new();
    for (i, channel) in hist.iter().enumerate() {
        let key = crier::testing::history::stream_key("", channel);
        let id = cluster
            .app(&[
                "FCALL",
                "crier_publish",
                "1",
                &key,
                &format!(r#"{{"n":{i}}}"#),
            ])
            .await;
        assert!(id.trim().contains('-'), "crier_publish stored it: {id}");
        sent.push((channel.clone(), i));
        cluster
            .app(&[
                "FCALL",
                "crier_publish",
                "1",
                channel,
                &format!(r#"{{"n":{}}}"#, 10 + i),
            ])
            .await;
        sent.push((channel.clone(), 10 + i));
    }
    for (i, channel) in plain.iter().enumerate() {
        cluster
            .app(&["SPUBLISH", channel, &format!(r#"{{"n":{}}}"#, 20 + i)])
            .await;
        sent.push((channel.clone(), 20 + i));
        cluster
            .app(&["PUBLISH", channel, &format!(r#"{{"n":{}}}"#, 30 + i)])
            .await;
        sent.push((channel.clone(), 30 + i));
    }
    let mut expected: Vec<(String, u64)> =
        sent.iter().map(|(c, n)| (c.clone(), *n as u64)).collect();
    expected.sort();
    for client in &mut ws {
        let mut got = Vec::new();
        while got.len() < expected.len() {
            let m = client.recv_type("message", WAIT).await;
            got.push((
                m["channel"].as_str().expect("channel").to_string(),
                m["data"]["n"].as_u64().expect("n"),
            ));
        }
        got.sort();
        assert_eq!(got, expected, "WebSocket");
    }
    let mut cursor = None;
    for events in &mut streams {
        let mut got = Vec::new();
        while got.len() < expected.len() {
            let e = events.next_message(WAIT).await.expect("stream open");
            let v = e.json();
            got.push((
                v["channel"].as_str().expect("channel").to_string(),
                v["data"]["n"].as_u64().expect("n"),
            ));
            if e.id.is_some() {
                cursor = e.id.clone();
            }
        }
        got.sort();
        assert_eq!(got, expected, "SSE");
    }
    drop(streams);

    // Missed while away, on every shard; resumed on the other instance.
    let cursor = cursor.expect("history events carry a cursor");
    for (i, channel) in hist.iter().enumerate() {
        cluster
            .app(&[
                "FCALL",
                "crier_publish",
                "1",
                channel,
                &format!(r#"{{"n":{}}}"#, 40 + i),
            ])
            .await;
    }
    let mut back = sse::connect(
        &b.sse_url(&hist.iter().map(String::as_str).collect::<Vec<_>>()),
        &[("last-event-id", &cursor)],
    )
    .await
    .into_events();
    let mut missed = Vec::new();
    while missed.len() < hist.len() {
        let v = back.next_message(WAIT).await.expect("open").json();
        assert_eq!(v["type"], "message", "{v}");
        missed.push(v["data"]["n"].as_u64().expect("n"));
    }
    missed.sort_unstable();
    assert_eq!(missed, [40, 41, 42]);
}

/// Message ids a client received, in order, and its `gap` notices.
#[derive(Default)]
struct Seen {
    ids: Vec<String>,
    gaps: usize,
}

/// An app publishing `count` messages on `channel` with `crier_publish` at
/// about 200/s through a cluster client (which follows `MOVED`), retrying
/// each until the cluster takes it.
fn cluster_publisher(
    nodes: Vec<String>,
    channel: String,
    count: u32,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::watch::Receiver<u32>,
) {
    let (tx, rx) = tokio::sync::watch::channel(0);
    let task = tokio::spawn(async move {
        let client = redis::cluster::ClusterClient::new(nodes).expect("cluster client");
        let mut conn = client
            .get_async_connection()
            .await
            .expect("cluster connection");
        for n in 1..=count {
            loop {
                let stored: redis::RedisResult<Option<String>> = redis::cmd("FCALL")
                    .arg("crier_publish")
                    .arg(1)
                    .arg(&channel)
                    .arg(format!(r#"{{"n":{n}}}"#))
                    .query_async(&mut conn)
                    .await;
                if stored.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tx.send_replace(n);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    (task, rx)
}

/// A WebSocket client of `crier` subscribed to `channel`, recording every
/// `message` id and `gap` it receives until the returned task is aborted.
async fn recorded_client(
    crier: &Instance,
    channel: &str,
) -> (
    std::sync::Arc<std::sync::Mutex<Seen>>,
    tokio::task::JoinHandle<()>,
) {
    let mut ws = WsClient::connect(&crier.ws(&format!("/ws?channel={channel}"))).await;
    ws.recv_type("subscribed", WAIT).await;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
    let sink = std::sync::Arc::clone(&seen);
    let reader = tokio::spawn(async move {
        loop {
            let v = ws.recv_json(Duration::from_secs(120)).await;
            let mut seen = sink.lock().expect("lock");
            match v["type"].as_str() {
                Some("message") => seen.ids.push(v["id"].as_str().expect("id").to_string()),
                Some("gap") => seen.gaps += 1,
                _ => {}
            }
        }
    });
    (seen, reader)
}

/// The ids of `channel`'s history as the shard that owns it now holds it.
async fn stored_ids(cluster: &RedisCluster, channel: &str) -> Vec<String> {
    let key = crier::testing::history::stream_key("", channel);
    cluster
        .app(&["XRANGE", &key, "-", "+"])
        .await
        .lines()
        .map(str::trim)
        .filter(|l| l.contains('-') && l.starts_with(|c: char| c.is_ascii_digit()))
        .map(str::to_string)
        .collect()
}

/// The port of a replica of the primary on `primary_port`.
async fn replica_of(cluster: &RedisCluster, primary_port: u16) -> u16 {
    let nodes = cluster.cli(primary_port, &["CLUSTER", "NODES"]).await;
    let me = nodes
        .lines()
        .find(|l| l.contains("myself"))
        .and_then(|l| l.split_whitespace().next())
        .expect("own id")
        .to_string();
    nodes
        .lines()
        .find(|l| l.contains("slave") && l.contains(&me))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|addr| addr.split('@').next())
        .and_then(|addr| addr.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("a replica")
}

/// Issue 10, acceptance 5: `CLUSTER FAILOVER` on the replica of a channel's
/// shard while an app publishes at 200/s: every client receives every
/// stored message exactly once and in order, with no gap.
#[tokio::test]
async fn a_cluster_failover_loses_and_duplicates_nothing() {
    let _one = common::cluster::ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start(3, 1).await;
    let crier = Instance::start(cluster_config(&cluster)).await;
    let channel = unique("hist:failover");
    let (seen, reader) = recorded_client(&crier, &channel).await;

    let (publishing, mut progress) = cluster_publisher(cluster.urls(), channel.clone(), 600);
    progress.wait_for(|n| *n >= 100).await.expect("publishing");
    let primary = cluster.primary_of(&channel).await;
    let replica = replica_of(&cluster, primary).await;
    let failover_at = std::time::Instant::now();
    assert_eq!(
        cluster.cli(replica, &["CLUSTER", "FAILOVER"]).await.trim(),
        "OK"
    );
    common::eventually("the replica took over the shard", WAIT, || async {
        cluster.try_primary_of(&channel).await == Some(replica)
    })
    .await;
    publishing.await.expect("publisher");

    let stored = stored_ids(&cluster, &channel).await;
    assert!(
        stored.len() >= 600,
        "a graceful failover keeps every write: {}",
        stored.len()
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let missing: Vec<usize> = {
            let seen = seen.lock().expect("lock");
            stored
                .iter()
                .enumerate()
                .filter(|(_, id)| !seen.ids.contains(id))
                .map(|(i, _)| i)
                .collect()
        };
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client misses {} of {} stored messages, at {:?}…; crier: {} recovered, {} gaps",
            missing.len(),
            stored.len(),
            &missing[..missing.len().min(5)],
            crier.metric("crier_recovered_messages_total").await,
            crier.metric("crier_gaps_total").await,
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    {
        let seen = seen.lock().expect("lock");
        assert_eq!(seen.ids, stored, "exactly once, in order");
        assert_eq!(seen.gaps, 0);
    }
    // The figures docs/operations.md quotes (run with --nocapture).
    eprintln!(
        "cluster failover: all {} messages {:?} after CLUSTER FAILOVER; recovered {}, {} gaps, /readyz {}",
        stored.len(),
        failover_at.elapsed(),
        crier.metric("crier_recovered_messages_total").await,
        crier.metric("crier_gaps_total").await,
        crier.readyz().await
    );
    reader.abort();
}

/// Issue 10, acceptance 5: `SIGKILL` of a channel's primary while an app
/// publishes: after its replica is promoted, the client holds every message
/// of the promoted replica's stream exactly once and in order — or was told
/// `gap` for that channel. Never silent loss.
#[tokio::test]
async fn a_killed_primary_loses_nothing_silently() {
    let _one = common::cluster::ONE_AT_A_TIME.lock().await;
    let mut cluster = RedisCluster::start(3, 1).await;
    let crier = Instance::start(cluster_config(&cluster)).await;
    let channel = unique("hist:crash");
    let (seen, reader) = recorded_client(&crier, &channel).await;

    let (publishing, mut progress) = cluster_publisher(cluster.urls(), channel.clone(), 400);
    progress.wait_for(|n| *n >= 100).await.expect("publishing");
    let primary = cluster.primary_of(&channel).await;
    let replica = replica_of(&cluster, primary).await;
    cluster
        .nodes
        .iter_mut()
        .find(|n| n.port == primary)
        .expect("the primary")
        .kill();
    common::eventually(
        "the replica was promoted",
        std::time::Duration::from_secs(30),
        || async { cluster.primary_of(&channel).await == replica },
    )
    .await;
    publishing.await.expect("publisher");

    let stored = stored_ids(&cluster, &channel).await;
    common::eventually("every stored message, or a gap", WAIT, || {
        let seen = std::sync::Arc::clone(&seen);
        let stored = stored.clone();
        async move {
            let seen = seen.lock().expect("lock");
            seen.gaps > 0 || stored.iter().all(|id| seen.ids.contains(id))
        }
    })
    .await;
    let seen = seen.lock().expect("lock");
    let unique_ids: std::collections::HashSet<&String> = seen.ids.iter().collect();
    assert_eq!(unique_ids.len(), seen.ids.len(), "a message twice");
    if seen.gaps == 0 {
        let kept: Vec<&String> = seen.ids.iter().filter(|id| stored.contains(id)).collect();
        assert_eq!(kept, stored.iter().collect::<Vec<_>>(), "in order");
    }
    drop(seen);
    reader.abort();
}

/// Issue 10, acceptance 6: 10,000 distinct channels through one crier
/// instance relay correctly, over at most one connection per node.
#[tokio::test]
async fn ten_thousand_channels_over_one_connection_per_node() {
    let _one = common::cluster::ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start(3, 1).await;
    let mut config = cluster_config(&cluster);
    config.limits.max_subscriptions_per_connection = 10_000;
    config.limits.commands_per_second = 100_000;
    config.limits.command_burst = 100_000;
    let crier = Instance::start(config).await;
    let base = unique("public:many");
    let channels: Vec<String> = (0..10_000).map(|i| format!("{base}:{i}")).collect();
    let mut ws = WsClient::connect(&crier.ws("/ws")).await;
    ws.recv_type("welcome", WAIT).await;
    for (i, channel) in channels.iter().enumerate() {
        ws.send_json(serde_json::json!({"type": "subscribe", "channel": channel, "id": i}))
            .await;
    }
    for _ in &channels {
        let reply = ws.recv_json(std::time::Duration::from_secs(60)).await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
    }
    // Every hundredth channel, both ways of publishing.
    let sample: Vec<&String> = channels.iter().step_by(100).collect();
    for (i, channel) in sample.iter().enumerate() {
        let how = if i % 2 == 0 { "SPUBLISH" } else { "PUBLISH" };
        cluster
            .app(&[how, channel, &format!(r#"{{"n":{i}}}"#)])
            .await;
    }
    let mut got = std::collections::BTreeSet::new();
    while got.len() < sample.len() {
        let m = ws.recv_type("message", WAIT).await;
        got.insert(m["data"]["n"].as_u64().expect("n"));
    }
    assert_eq!(got.len(), sample.len());

    // Connections on each primary: crier's, and the one redis-cli uses to ask.
    let mut primaries = std::collections::BTreeSet::new();
    for channel in &sample {
        primaries.insert(cluster.primary_of(channel).await);
    }
    assert_eq!(primaries.len(), 3, "channels on every shard");
    for port in primaries {
        let clients = cluster.cli(port, &["CLIENT", "LIST"]).await;
        let crier_conns = clients
            .lines()
            .filter(|l| !l.contains("cmd=client|list"))
            .count();
        assert!(
            crier_conns <= 2,
            "at most one pub/sub and one command connection on {port}:\n{clients}"
        );
    }
}

/// `crier publish` on a cluster: through `crier_publish` on the channel's
/// shard, with history, heard by a subscriber.
#[tokio::test]
async fn crier_publish_reaches_subscribers_on_a_cluster() {
    let _one = common::cluster::ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start(3, 0).await;
    let crier = Instance::start(cluster_config(&cluster)).await;
    let channel = unique("hist:cli");
    let mut events = sse::connect(&crier.sse_url(&[&channel]), &[])
        .await
        .into_events();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("crier.toml");
    let nodes: Vec<String> = cluster.urls().iter().map(|u| format!("{u:?}")).collect();
    std::fs::write(
        &config,
        format!(
            "[redis.cluster]\nnodes = [{}]\n[[channels]]\npattern = \"hist:*\"\nsubscribe = \"anyone\"\nhistory = {{ size = 100, ttl = \"1h\" }}\n",
            nodes.join(", ")
        ),
    )
    .expect("config");
    let output = common::crier::crier_command()
        .args([
            "publish",
            "--config",
            &config.to_string_lossy(),
            &channel,
            r#"{"n":7}"#,
        ])
        .output()
        .await
        .expect("crier publish");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("with history"), "{stderr}");
    let e = events.next_message(WAIT).await.expect("open");
    assert_eq!(e.json()["data"]["n"], 7);
}

/// Issue 10: a canary per shard backs readiness: with one primary gone
/// (and no replica to take over), `/readyz` turns 503.
#[tokio::test]
async fn a_lost_shard_makes_crier_unready() {
    let _one = common::cluster::ONE_AT_A_TIME.lock().await;
    let mut cluster = RedisCluster::start(3, 0).await;
    let crier = Instance::start(cluster_config(&cluster)).await;
    assert_eq!(crier.readyz().await, http::StatusCode::OK);
    let port = cluster.nodes[2].port;
    cluster.nodes[2].kill();
    crier
        .wait_readyz(http::StatusCode::SERVICE_UNAVAILABLE)
        .await;
    assert_eq!(
        crier.metric("crier_broker_up").await,
        0.0,
        "shard on {port} lost"
    );
}

/// A node drops crier's connection (and so its sharded subscriptions) while
/// an app publishes: the shard's canary turns late, crier subscribes that
/// shard's channels again and recovers them from history — the client
/// still gets every message once, in order.
#[tokio::test]
async fn a_dropped_node_connection_is_repaired_from_history() {
    let _one = common::cluster::ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start(3, 0).await;
    let crier = Instance::start(cluster_config(&cluster)).await;
    let channel = unique("hist:dropped");
    let (seen, reader) = recorded_client(&crier, &channel).await;

    let (publishing, mut progress) = cluster_publisher(cluster.urls(), channel.clone(), 300);
    progress.wait_for(|n| *n >= 50).await.expect("publishing");
    let primary = cluster.primary_of(&channel).await;
    for kind in ["pubsub", "normal"] {
        cluster
            .cli(primary, &["CLIENT", "KILL", "TYPE", kind])
            .await;
    }
    publishing.await.expect("publisher");

    let stored = stored_ids(&cluster, &channel).await;
    assert_eq!(stored.len(), 300);
    common::eventually("the client has every stored message", WAIT, || {
        let seen = std::sync::Arc::clone(&seen);
        let stored = stored.clone();
        async move {
            let seen = seen.lock().expect("lock");
            stored.iter().all(|id| seen.ids.contains(id))
        }
    })
    .await;
    let seen = seen.lock().expect("lock");
    assert_eq!(seen.ids, stored, "exactly once, in order");
    drop(seen);
    reader.abort();
}

#[tokio::test]
async fn presence_and_pusher_events_work_on_every_shard() {
    use common::pusher::{port, Driver};
    let _one = common::cluster::ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start(3, 0).await;
    let config = || {
        let mut config = cluster_config(&cluster);
        common::pusher::with_pusher(&mut config);
        config
    };
    let a = Instance::start(config()).await;
    let b = Instance::start(config()).await;
    let (pa, pb) = (port(&a.addr), port(&b.addr));
    let rooms = one_per_shard(&cluster, "presence-shard").await;
    let mut d = Driver::start().await;
    d.connect("c1", pa, "u1").await;
    d.connect("c2", pb, "u2").await;
    for room in &rooms {
        assert_eq!(
            d.subscribe("c1", room).await["members"],
            serde_json::json!(["u1"])
        );
        let second = d.subscribe("c2", room).await;
        assert_eq!(
            second["members"],
            serde_json::json!(["u1", "u2"]),
            "{room}: {second}"
        );
        d.wait(|v| {
            v["client"] == "c1" && v["type"] == "member_added" && v["channel"] == room.as_str()
        })
        .await;
        // A client event crosses instances on this shard too.
        d.send(
            serde_json::json!({"op": "client_event", "client": "c2", "channel": room,
            "event": "client-hi", "data": {}}),
        )
        .await;
        d.wait(d.event("c1", room, "client-hi")).await;
        // The SDK's trigger, through crier_publish on the channel's shard.
        let sent = d
            .trigger(
                room,
                serde_json::json!({"port": pb, "channels": [room], "event": "e", "data": "{}"}),
            )
            .await;
        assert_eq!(sent["status"], 200, "{sent}");
        d.wait(d.event("c1", room, "e")).await;
    }
    let listed = d
        .get(
            "list",
            pa,
            "/channels",
            serde_json::json!({"filter_by_prefix": "presence-", "info": "user_count"}),
        )
        .await;
    for room in &rooms {
        assert_eq!(
            listed["body"]["channels"][room]["user_count"], 2,
            "{listed}"
        );
    }
    d.send(serde_json::json!({"op": "disconnect", "client": "c2"}))
        .await;
    for room in &rooms {
        d.wait(|v| {
            v["client"] == "c1" && v["type"] == "member_removed" && v["channel"] == room.as_str()
        })
        .await;
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// Issue 24 on a Redis Cluster: the lifecycle counts and the events
/// stream share one hash slot, so `crier_events` runs on one shard, and
/// two instances' listeners on channels of every shard give each channel
/// one occupied and one vacated.
#[tokio::test]
async fn lifecycle_events_are_exact_on_a_cluster() {
    let cluster = RedisCluster::start(3, 0).await;
    let mut instances = Vec::new();
    for _ in 0..2 {
        let mut config = cluster_config(&cluster);
        config.events.stream = Some("crier:events".into());
        config.events.delay = Duration::from_millis(100);
        config.presence.heartbeat = Duration::from_millis(300);
        config.presence.ttl = Duration::from_secs(1);
        instances.push(Instance::start(config).await);
    }
    let channels = one_per_shard(&cluster, "public:life").await;
    for channel in &channels {
        // Both instances hold a listener; both leave.
        let mut a = WsClient::connect(&instances[0].ws("/ws")).await;
        let mut b = WsClient::connect(&instances[1].ws("/ws")).await;
        for ws in [&mut a, &mut b] {
            assert_eq!(ws.subscribe(channel, 1).await["type"], "subscribed");
        }
        a.close().await;
        b.close().await;
    }
    let names = || async {
        let text = cluster.app(&["XRANGE", "crier:events", "-", "+"]).await;
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        channels
            .iter()
            .map(|c| {
                // Each entry is listed as: id, name, NAME, channel, CHANNEL, time_ms, T.
                let mut seen = Vec::new();
                for (i, line) in lines.iter().enumerate() {
                    if line == c && i >= 3 && lines[i - 1] == "channel" {
                        seen.push(lines[i - 2].clone());
                    }
                }
                seen
            })
            .collect::<Vec<_>>()
    };
    common::eventually("every channel vacated", WAIT, || async {
        names()
            .await
            .iter()
            .all(|seen| seen.last().is_some_and(|n| n == "channel_vacated"))
    })
    .await;
    for seen in names().await {
        assert_eq!(seen, ["channel_occupied", "channel_vacated"]);
    }
}
