//! Issue 24: lifecycle events exact across the fleet, read from the Redis
//! stream as an app reads them. Real Redis, real crier instances (in
//! process, and a crier binary that is killed), real WebSocket clients.

#![allow(clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::crier::{test_config, Instance, Process};
use common::pusher::{Driver, WebhookReceiver};
use common::redis::RedisServer;
use common::ws::WsClient;
use crier::config::{Config, PusherWebhook};

const STREAM: &str = "crier:events";
const WAIT: Duration = Duration::from_secs(10);

/// How a churning client comes and goes.
#[derive(Clone, Copy)]
struct Visits {
    /// Stays up to this long.
    stay_ms: u64,
    /// Is away up to this long.
    away_ms: u64,
    /// Comes and goes for this long.
    for_: Duration,
}

/// A client (signed in as `user`, if any) that visits one of `channels`
/// after another at random (seeded), as `visits` says.
async fn visit(
    url: String,
    user: Option<String>,
    channels: Vec<String>,
    seed: u64,
    visits: Visits,
) {
    let deadline = tokio::time::Instant::now() + visits.for_;
    let mut x = (seed + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut next = move |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    };
    while tokio::time::Instant::now() < deadline {
        let bearer = user.as_deref().map(|u| format!("Bearer {}", token(u)));
        let headers: Vec<(&str, &str)> = bearer
            .as_deref()
            .map(|b| vec![("authorization", b)])
            .unwrap_or_default();
        let mut ws = WsClient::try_connect(&url, &headers)
            .await
            .expect("connect");
        let channel = &channels[next(channels.len() as u64) as usize];
        let reply = ws.subscribe(channel, 1).await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        tokio::time::sleep(Duration::from_millis(next(visits.stay_ms))).await;
        ws.close().await;
        drop(ws);
        tokio::time::sleep(Duration::from_millis(next(visits.away_ms))).await;
    }
}

/// A config with lifecycle events on, ends announced after `delay`, and
/// a quick presence beat (so a killed instance's share ends soon).
fn events_config(redis: &RedisServer, delay: Duration) -> Config {
    let mut config = test_config(Some(redis.url()));
    config.events.stream = Some(STREAM.into());
    config.events.delay = delay;
    config.presence.heartbeat = Duration::from_millis(300);
    config.presence.ttl = Duration::from_secs(1);
    config
}

/// One entry of the events stream: its fields.
type Event = BTreeMap<String, String>;

/// Every entry of the stream, oldest first.
async fn events(redis: &RedisServer) -> Vec<Event> {
    let entries: Vec<(String, Vec<String>)> = redis_cmd(redis, &["XRANGE", STREAM, "-", "+"]).await;
    entries
        .into_iter()
        .map(|(_, fields)| {
            fields
                .chunks_exact(2)
                .map(|pair| (pair[0].clone(), pair[1].clone()))
                .collect()
        })
        .collect()
}

/// One Redis command's answer.
async fn redis_cmd<T: redis::FromRedisValue>(redis: &RedisServer, args: &[&str]) -> T {
    let client = redis::Client::open(redis.url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await.expect("command")
}

/// Each channel's event names, in stream order.
fn by_channel(events: &[Event]) -> BTreeMap<String, Vec<String>> {
    let mut channels: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in events {
        if let Some(channel) = e.get("channel") {
            if e["name"].starts_with("channel_") {
                channels
                    .entry(channel.clone())
                    .or_default()
                    .push(e["name"].clone());
            }
        }
    }
    channels
}

/// Whether `names` alternate occupied, vacated, …, ending vacated.
fn alternates(names: &[String]) -> bool {
    !names.is_empty()
        && names.len() % 2 == 0
        && names.iter().enumerate().all(|(i, name)| {
            name == if i % 2 == 0 {
                "channel_occupied"
            } else {
                "channel_vacated"
            }
        })
}

/// Issue 24, acceptance 2 (channels): three instances, clients joining
/// and leaving channels at random on all of them, then everyone leaving:
/// each channel's events alternate occupied / vacated, from occupied to
/// vacated, never twice in a row, though three instances saw each
/// channel come and go; in the stream and in the webhook alike.
#[tokio::test]
async fn three_instances_announce_each_channel_occupied_and_vacated_once_per_change() {
    let redis = RedisServer::start().await;
    let receiver = CrierReceiver::start().await;
    let delay = Duration::from_millis(200);
    let mut instances = Vec::new();
    for _ in 0..3 {
        let mut config = events_config(&redis, delay);
        config.webhooks = vec![crier_webhook(
            &receiver.url,
            &["channel_occupied", "channel_vacated"],
            "public:room-*",
        )];
        instances.push(Instance::start(config).await);
    }
    let channels: Vec<String> = (0..20).map(|i| format!("public:room-{i}")).collect();
    // Stay up to half a second, away up to 4 s: a channel holds about one
    // client on average, so it empties and fills again often, sometimes
    // within the delay.
    let visits = Visits {
        stay_ms: 500,
        away_ms: 4000,
        for_: Duration::from_secs(30),
    };
    let mut tasks = Vec::new();
    for c in 0..200usize {
        let url = instances[c % 3].ws("/ws");
        let channels = channels.clone();
        tasks.push(tokio::spawn(visit(url, None, channels, c as u64, visits)));
    }
    for task in tasks {
        task.await.expect("client");
    }
    // Everyone left: every channel that was occupied ends vacated.
    common::eventually("every channel vacated", Duration::from_secs(20), || async {
        let seen = by_channel(&events(&redis).await);
        !seen.is_empty()
            && seen
                .values()
                .all(|names| names.last().is_some_and(|n| n == "channel_vacated"))
    })
    .await;
    let seen = by_channel(&events(&redis).await);
    for (channel, names) in &seen {
        assert!(alternates(names), "{channel}: {names:?}");
    }
    let changes: usize = seen.values().map(Vec::len).sum();
    assert!(
        changes > 10 * channels.len(),
        "channels emptied and filled again many times: {changes} events"
    );
    // The webhook, sent by whichever instance read each event, got the
    // same: each channel alternating, once per change.
    common::eventually("the webhook caught up", WAIT, || async {
        receiver.events().len() >= changes
    })
    .await;
    let mut hooked: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in receiver.events() {
        hooked
            .entry(e["channel"].as_str().unwrap_or_default().to_owned())
            .or_default()
            .push(e["name"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(hooked, seen, "the webhook saw what the stream holds");
    assert_eq!(
        seen.len(),
        channels.len(),
        "every channel was occupied: {seen:?}"
    );
}

/// Issue 24, acceptance 3: the only listener of a channel (and only
/// member of a presence room, and its user's only connection) is on an
/// instance that is SIGKILLed; another instance, still beating, removes
/// the dead one's share, and `channel_vacated`, `member_removed` and
/// `user_offline` arrive once each, within the presence TTL plus a beat
/// plus the delay.
#[tokio::test]
async fn a_killed_instance_s_channels_are_vacated_exactly_once() {
    let redis = RedisServer::start().await;
    let delay = Duration::from_millis(200);
    let survivor = Instance::start(events_config(&redis, delay)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("crier.toml");
    std::fs::write(
        &config,
        format!(
            "[redis]\nurl = \"{}\"\n[[channels]]\npattern = \"public:*\"\nsubscribe = \"anyone\"\n\
             [[channels]]\npattern = \"room:*\"\nsubscribe = \"anyone\"\npresence = true\n\
             [auth.jwt]\nalgorithms = [\"HS256\"]\nsecret = \"{JWT_SECRET}\"\n\
             [events]\nstream = \"{STREAM}\"\ndelay = \"200ms\"\n\
             [presence]\nheartbeat = \"300ms\"\nttl = \"1s\"\n",
            redis.url()
        ),
    )
    .expect("write config");
    let mut doomed = Process::start(&["--config", config.to_str().expect("path")], &[]).await;

    // A listener on the survivor keeps it beating; the doomed instance
    // holds the only listener of `public:lonely` and the only member of
    // `room:lonely`, user `solo`'s only connection.
    let mut keeper = WsClient::connect(&survivor.ws("/ws")).await;
    assert_eq!(
        keeper.subscribe("public:busy", 1).await["type"],
        "subscribed"
    );
    let bearer = format!("Bearer {}", token("solo"));
    let url = format!("ws://{}/ws", doomed.addr);
    let mut lonely = WsClient::try_connect(&url, &[("authorization", bearer.as_str())])
        .await
        .expect("connect");
    for (channel, id) in [("public:lonely", 1), ("room:lonely", 2)] {
        assert_eq!(lonely.subscribe(channel, id).await["type"], "subscribed");
    }
    let theirs = |all: Vec<Event>| -> Vec<String> {
        let mut names: Vec<String> = all
            .iter()
            .filter(|e| e.get("channel").is_none_or(|c| c != "public:busy"))
            .map(|e| {
                let who = e
                    .get("channel")
                    .or(e.get("user_id"))
                    .cloned()
                    .unwrap_or_default();
                format!("{} {who}", e["name"])
            })
            .collect();
        names.sort();
        names
    };
    common::eventually("the lonely listener's arrival", WAIT, || async {
        theirs(events(&redis).await).len() == 4
    })
    .await;
    assert_eq!(
        theirs(events(&redis).await),
        [
            "channel_occupied public:lonely",
            "channel_occupied room:lonely",
            "member_added room:lonely",
            "user_online solo",
        ]
    );

    doomed.child.start_kill().expect("SIGKILL");
    doomed.child.wait().await.expect("reaped");
    drop(lonely);
    // TTL 1 s + a beat 0.3 s + delay 0.2 s, with room for a slow machine.
    common::eventually("everything the dead instance held ended", WAIT, || async {
        theirs(events(&redis).await).len() >= 8
    })
    .await;
    // And only once: once the dead instance's share is gone from Redis
    // and no end waits, nothing is left to announce.
    common::eventually("the dead instance's share removed", WAIT, || async {
        let alive: u64 = redis_cmd(&redis, &["ZCARD", "{crier:events}:alive"]).await;
        let ending: u64 = redis_cmd(&redis, &["ZCARD", "{crier:events}:ending"]).await;
        alive == 1 && ending == 0
    })
    .await;
    assert_eq!(
        theirs(events(&redis).await),
        [
            "channel_occupied public:lonely",
            "channel_occupied room:lonely",
            "channel_vacated public:lonely",
            "channel_vacated room:lonely",
            "member_added room:lonely",
            "member_removed room:lonely",
            "user_offline solo",
            "user_online solo",
        ]
    );
    assert_eq!(
        by_channel(&events(&redis).await)["public:busy"],
        ["channel_occupied"],
        "the survivor's channel stays occupied"
    );
}

/// A stream without Redis, a stream name that is no key, a length of 0,
/// webhooks without a stream, a webhook URL that is not http(s), a short
/// secret or an unknown event stops the start, naming the field.
#[tokio::test]
async fn events_settings_that_cannot_work_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    common::crier::check_config_refuses(
        dir.path(),
        "[events]\nstream = \"crier:events\"\n",
        "events.stream: needs Redis",
    )
    .await;
    let redis = "[redis]\nurl = \"redis://127.0.0.1:1\"\n";
    common::crier::check_config_refuses(
        dir.path(),
        &format!("{redis}[events]\nstream = \"crier events\"\n"),
        "events.stream",
    )
    .await;
    common::crier::check_config_refuses(
        dir.path(),
        &format!("{redis}[events]\nstream = \"crier:events\"\nmax_len = 0\n"),
        "events.max_len",
    )
    .await;
    let hook = |body: &str| format!("[[webhooks]]\n{body}\n");
    let good = "url = \"https://app.example.com/hook\"\nsecret = \"a-secret-of-sixteen-plus\"";
    common::crier::check_config_refuses(
        dir.path(),
        &format!("{redis}{}", hook(good)),
        "events.stream: must be set for webhooks",
    )
    .await;
    let events = "[events]\nstream = \"crier:events\"\n";
    for (body, field) in [
        (
            "url = \"ftp://x\"\nsecret = \"a-secret-of-sixteen-plus\"",
            "webhooks[0].url",
        ),
        (
            "url = \"https://x.example\"\nsecret = \"short\"",
            "webhooks[0].secret",
        ),
        (
            &format!("{good}\nevents = [\"channel_opened\"]"),
            "webhooks[0].events",
        ),
    ] {
        let toml = format!("{redis}{events}{}", hook(body));
        common::crier::check_config_refuses(dir.path(), &toml, field).await;
    }
    let pusher =
        "[[pusher.apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"a-secret-of-sixteen-plus\"\n\
                  webhooks = [{ url = \"https://x.example\", event_types = [\"user_online\"] }]\n";
    common::crier::check_config_refuses(
        dir.path(),
        &format!("{redis}{events}{pusher}"),
        "pusher.apps[0].webhooks[0].event_types",
    )
    .await;
}

/// Issue 24, acceptance 1: a Pusher app's webhooks, checked by the
/// unmodified `pusher` Node SDK (`pusher.webhook({headers, rawBody})
/// .isValid()`) as the app's handler checks them: every request is valid
/// under the app's secret and invalid under another; a pusher-js client
/// subscribing and leaving produces channel_occupied, member_added, then
/// member_removed and channel_vacated, with the app's channel names.
#[tokio::test]
async fn pusher_webhooks_are_valid_for_the_pusher_sdk() {
    let redis = RedisServer::start().await;
    let receiver = WebhookReceiver::start(200).await;
    let mut config = common::pusher::pusher_config(&redis);
    config.events.stream = Some(STREAM.into());
    config.events.delay = Duration::from_millis(200);
    config.pusher.apps[0].webhooks = vec![PusherWebhook {
        url: receiver.url(),
        event_types: Vec::new(),
        filter: Default::default(),
        headers: Default::default(),
    }];
    let crier = Instance::start(config).await;
    let mut driver = Driver::start().await;
    let port = common::pusher::port(&crier.addr);
    driver.connect("a", port, "ada").await;
    driver.subscribe("a", "orders").await;
    driver.subscribe("a", "presence-room").await;
    let names = |receiver: &WebhookReceiver| -> Vec<String> {
        receiver
            .events()
            .iter()
            .map(|e| {
                format!(
                    "{} {} {}",
                    e["name"].as_str().unwrap_or("?"),
                    e["channel"].as_str().unwrap_or("?"),
                    e["user_id"].as_str().unwrap_or("-")
                )
            })
            .collect()
    };
    common::eventually("occupied and added", WAIT, || async {
        names(&receiver).len() >= 3
    })
    .await;
    let mut first = names(&receiver);
    first.sort();
    assert_eq!(
        first,
        [
            "channel_occupied orders -",
            "channel_occupied presence-room -",
            "member_added presence-room ada",
        ]
    );
    driver
        .send(serde_json::json!({"op": "disconnect", "client": "a"}))
        .await;
    common::eventually("vacated and removed", WAIT, || async {
        names(&receiver).len() >= 6
    })
    .await;
    let mut then = names(&receiver)[3..].to_vec();
    then.sort();
    assert_eq!(
        then,
        [
            "channel_vacated orders -",
            "channel_vacated presence-room -",
            "member_removed presence-room ada",
        ]
    );
    let calls = crier
        .metric("crier_event_webhook_calls_total{result=\"ok\"}")
        .await;
    assert!(calls >= 2.0, "{calls} calls");
}

/// Subscribes a Pusher-protocol client to `channel` (public) and returns
/// it; dropping it vacates the channel.
async fn pusher_listener(crier: &Instance, channel: &str) -> WsClient {
    let url = crier.ws(&format!("/app/{}?protocol=7", common::pusher::KEY));
    let mut ws = WsClient::connect(&url).await;
    assert_eq!(
        ws.recv_json(WAIT).await["event"],
        "pusher:connection_established"
    );
    ws.send_json(serde_json::json!({"event": "pusher:subscribe", "data": {"channel": channel}}))
        .await;
    let ok = ws.recv_json(WAIT).await;
    assert_eq!(
        ok["event"], "pusher_internal:subscription_succeeded",
        "{ok}"
    );
    ws
}

/// A crier whose Pusher app sends its webhooks to `url`, retrying for
/// `retry_for`.
async fn crier_with_webhook(redis: &RedisServer, url: &str, retry_for: Duration) -> Instance {
    let mut config = common::pusher::pusher_config(redis);
    let open = common::crier::rule("orders-*", crier::config::Subscribe::Anyone);
    config.channels.insert(0, open);
    config.events.stream = Some(STREAM.into());
    config.events.delay = Duration::from_millis(100);
    config.events.webhook_retry_for = retry_for;
    config.events.webhook_timeout = Duration::from_secs(5);
    config.pusher.apps[0].webhooks = vec![PusherWebhook {
        url: url.into(),
        event_types: vec!["channel_occupied".into(), "channel_vacated".into()],
        filter: Default::default(),
        headers: Default::default(),
    }];
    Instance::start(config).await
}

/// Issue 24, acceptance 4: the receiver is down for 20 s while channels
/// come and go; when it is back, every event arrives, in order, within
/// the retry bound. A receiver down for longer than the bound loses them
/// (counted), and they are still in the stream.
#[tokio::test]
async fn a_webhook_down_for_a_while_gets_every_event_when_it_returns() {
    let redis = RedisServer::start().await;
    // Down: the app behind it answers 503.
    let mut receiver = WebhookReceiver::start(503).await;
    let crier = crier_with_webhook(&redis, &receiver.url(), Duration::from_secs(120)).await;
    let down = tokio::time::Instant::now();
    for round in 0..3 {
        let channel = format!("orders-{round}");
        let ws = pusher_listener(&crier, &channel).await;
        drop(ws);
        common::eventually("the vacated event is in the stream", WAIT, || async {
            by_channel(&events(&redis).await)
                .get(&channel)
                .map(Vec::len)
                == Some(2)
        })
        .await;
    }
    common::eventually("calls refused while it is down", WAIT, || async {
        crier
            .metric("crier_event_webhook_calls_total{result=\"refused\"}")
            .await
            >= 1.0
    })
    .await;
    // The outage lasts 20 s.
    tokio::time::sleep_until(down + Duration::from_secs(20)).await;
    receiver.answer(200).await;
    // At least once: a call that timed out may arrive twice; each event
    // once, in order, is what the app sees after dropping repeats.
    let delivered = |receiver: &WebhookReceiver| {
        let mut names: Vec<String> = Vec::new();
        for e in receiver.events() {
            let name = format!(
                "{} {}",
                e["name"].as_str().unwrap_or("?"),
                e["channel"].as_str().unwrap_or("?")
            );
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while delivered(&receiver).len() < 6 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every event delivered within 30 s: {:?}; calls {} ok, {} refused, {} error",
            receiver.lines.all(),
            crier
                .metric("crier_event_webhook_calls_total{result=\"ok\"}")
                .await,
            crier
                .metric("crier_event_webhook_calls_total{result=\"refused\"}")
                .await,
            crier
                .metric("crier_event_webhook_calls_total{result=\"error\"}")
                .await,
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        delivered(&receiver),
        [
            "channel_occupied orders-0",
            "channel_vacated orders-0",
            "channel_occupied orders-1",
            "channel_vacated orders-1",
            "channel_occupied orders-2",
            "channel_vacated orders-2",
        ],
        "in order"
    );
    assert_eq!(
        crier
            .metric("crier_event_webhook_dropped_total{reason=\"expired\"}")
            .await,
        0.0
    );
    crier.shutdown().await;

    // Down for longer than the bound: dropped, counted, still in the stream.
    receiver.answer(503).await;
    let short = crier_with_webhook(&redis, &receiver.url(), Duration::from_secs(1)).await;
    let ws = pusher_listener(&short, "orders-late").await;
    drop(ws);
    common::eventually("the events given up", WAIT, || async {
        short
            .metric("crier_event_webhook_dropped_total{reason=\"expired\"}")
            .await
            >= 1.0
    })
    .await;
    assert_eq!(
        by_channel(&events(&redis).await)["orders-late"],
        ["channel_occupied", "channel_vacated"],
        "still in the stream"
    );
}

/// A channel with one listener for a moment; returns once the stream has
/// its vacated event.
async fn come_and_go(crier: &Instance, redis: &RedisServer, channel: &str) {
    let mut ws = WsClient::connect(&crier.ws("/ws")).await;
    assert_eq!(ws.subscribe(channel, 1).await["type"], "subscribed");
    ws.close().await;
    drop(ws);
    common::eventually("vacated", WAIT, || async {
        by_channel(&events(redis).await).get(channel).map(Vec::len) == Some(2)
    })
    .await;
}

/// Runs a recipe of docs/integration.md as worker `w1` of group `app`.
fn start_consumer(
    command: &[&str],
    redis: &RedisServer,
) -> (tokio::process::Child, common::pusher::Lines) {
    let mut child = tokio::process::Command::new(command[0])
        .args(&command[1..])
        .current_dir(common::repo("."))
        .envs([
            ("REDIS_URL", redis.url().as_str()),
            ("STREAM", STREAM),
            ("GROUP", "app"),
            ("CONSUMER", "w1"),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    let lines = common::pusher::Lines::collect(child.stdout.take().expect("stdout"));
    (child, lines)
}

/// Issue 24, acceptance 5: the documented consumer, restarted, sees each
/// event once: what happened before it first ran, then (after a restart)
/// only what happened while it was down.
async fn a_consumer_group_sees_each_event_once_across_a_restart(command: &[&str]) {
    let redis = RedisServer::start().await;
    let crier = Instance::start(events_config(&redis, Duration::from_millis(100))).await;
    come_and_go(&crier, &redis, "public:before").await;

    let names = |lines: &common::pusher::Lines| -> Vec<String> {
        lines
            .all()
            .iter()
            .filter_map(|e| {
                Some(format!(
                    "{} {}",
                    e["name"].as_str()?,
                    e["channel"].as_str()?
                ))
            })
            .collect()
    };
    let (mut reader, lines) = start_consumer(command, &redis);
    lines.wait(|e| e["name"] == "channel_vacated").await;
    // Handled and acknowledged: nothing pending for the group.
    common::eventually("acknowledged", WAIT, || async {
        let pending: Vec<redis::Value> = redis_cmd(&redis, &["XPENDING", STREAM, "app"]).await;
        pending.first() == Some(&redis::Value::Int(0))
    })
    .await;
    reader.kill().await.expect("stop the reader");
    assert_eq!(
        names(&lines),
        [
            "channel_occupied public:before",
            "channel_vacated public:before"
        ]
    );

    come_and_go(&crier, &redis, "public:while-down").await;
    let (_reader, lines) = start_consumer(command, &redis);
    lines.wait(|e| e["name"] == "channel_vacated").await;
    come_and_go(&crier, &redis, "public:after").await;
    lines
        .wait(|e| e["name"] == "channel_vacated" && e["channel"] == "public:after")
        .await;
    assert_eq!(
        names(&lines),
        [
            "channel_occupied public:while-down",
            "channel_vacated public:while-down",
            "channel_occupied public:after",
            "channel_vacated public:after",
        ],
        "each event once per group"
    );
}

#[tokio::test]
async fn the_python_consumer_sees_each_event_once_across_a_restart() {
    common::check_runs(
        "python3",
        &["-c", "import redis"],
        "python3 with the `redis` package is needed: pip install -r examples/integration/requirements.txt",
    );
    a_consumer_group_sees_each_event_once_across_a_restart(&[
        "python3",
        "examples/integration/events.py",
    ])
    .await;
}

#[tokio::test]
async fn the_node_consumer_sees_each_event_once_across_a_restart() {
    common::check_runs(
        "node",
        &["-e", "1"],
        "node is needed to run examples/integration/events.mjs",
    );
    a_consumer_group_sees_each_event_once_across_a_restart(&[
        "node",
        "examples/integration/events.mjs",
    ])
    .await;
}

const JWT_SECRET: &str = "a-jwt-secret-of-at-least-32-bytes!!";
const HOOK_SECRET: &str = "crier-webhook-secret-0123456789";

fn token(user: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": user, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("sign")
}

/// crier's own webhook to `url`, signed with [`HOOK_SECRET`], for
/// `events` (none: all) of `channels`.
fn crier_webhook(url: &str, events: &[&str], channels: &str) -> crier::config::EventWebhook {
    crier::config::EventWebhook {
        url: url.into(),
        secret: HOOK_SECRET.into(),
        events: events.iter().map(|e| e.to_string()).collect(),
        channels: channels.into(),
        headers: Default::default(),
    }
}

/// A webhook endpoint for crier's own webhooks: each request's
/// `X-Crier-Signature` checked against the body, its events collected.
struct CrierReceiver {
    url: String,
    events: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl CrierReceiver {
    async fn start() -> CrierReceiver {
        Self::serving(None).await
    }

    /// Over TLS, presenting a certificate for 127.0.0.1 signed by `ca`.
    async fn start_tls(ca: &common::pki::Ca) -> CrierReceiver {
        Self::serving(Some(ca.leaf(&["127.0.0.1"]).acceptor())).await
    }

    async fn serving(tls: Option<tokio_rustls::TlsAcceptor>) -> CrierReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}/events", listener.local_addr().expect("addr"));
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = events.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (sink, tls) = (sink.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(tls) => {
                            if let Ok(socket) = tls.accept(socket).await {
                                Self::answer(socket, sink).await;
                            }
                        }
                        None => Self::answer(socket, sink).await,
                    }
                });
            }
        });
        CrierReceiver { url, events }
    }

    /// Reads one request, checks its signature, keeps its events and
    /// answers 204.
    async fn answer<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        mut socket: S,
        sink: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let Ok(n) = socket.read(&mut chunk).await else {
                return;
            };
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() < end + 4 + length {
                continue;
            }
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).into_owned();
            let signature = head
                .lines()
                .find_map(|l| l.strip_prefix("x-crier-signature:"))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default();
            assert_eq!(
                signature,
                common::pusher::hmac_hex(HOOK_SECRET, &body),
                "signed: {body}"
            );
            let parsed: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
            assert!(parsed["time_ms"].is_u64(), "{parsed}");
            sink.lock()
                .expect("lock")
                .extend(parsed["events"].as_array().cloned().unwrap_or_default());
            let _ = socket
                .write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                .await;
            let _ = socket.shutdown().await;
            return;
        }
    }

    fn events(&self) -> Vec<serde_json::Value> {
        self.events.lock().expect("lock").clone()
    }
}

/// Issue 24, acceptance 2 (members and users): three instances, signed-in
/// users with several connections each joining and leaving presence rooms
/// at random, then everyone leaving: every (room, user) pairs
/// member_added / member_removed, every user pairs user_online /
/// user_offline, in the stream and in crier's own (signed) webhook alike.
#[tokio::test]
async fn members_and_users_pair_up_across_three_instances() {
    let redis = RedisServer::start().await;
    let receiver = CrierReceiver::start().await;
    let mut instances = Vec::new();
    for _ in 0..3 {
        let mut config = events_config(&redis, Duration::from_millis(200));
        let mut room = common::crier::rule("room:*", crier::config::Subscribe::Anyone);
        room.presence = true;
        config.channels.insert(0, room);
        config.auth.jwt = Some(crier::config::JwtConfig {
            algorithms: vec!["HS256".into()],
            secret: Some(JWT_SECRET.into()),
            ..Default::default()
        });
        config.webhooks = vec![crier_webhook(&receiver.url, &[], "room:*")];
        instances.push(Instance::start(config).await);
    }
    let rooms: Vec<String> = (0..4).map(|i| format!("room:{i}")).collect();
    let visits = Visits {
        stay_ms: 600,
        away_ms: 1500,
        for_: Duration::from_secs(10),
    };
    let mut tasks = Vec::new();
    for c in 0..30usize {
        let url = instances[c % 3].ws("/ws");
        let user = format!("u{}", c % 10);
        tasks.push(tokio::spawn(visit(
            url,
            Some(user),
            rooms.clone(),
            c as u64 + 7,
            visits,
        )));
    }
    for task in tasks {
        task.await.expect("client");
    }
    common::eventually("everyone gone", Duration::from_secs(20), || async {
        let all = events(&redis).await;
        let (mut open_members, mut open_users) = (0i64, 0i64);
        for e in &all {
            match e["name"].as_str() {
                "member_added" => open_members += 1,
                "member_removed" => open_members -= 1,
                "user_online" => open_users += 1,
                "user_offline" => open_users -= 1,
                _ => {}
            }
        }
        !all.is_empty() && open_members == 0 && open_users == 0
    })
    .await;
    let check = |events: Vec<Event>, source: &str| {
        let mut members: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut users: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for e in events {
            let name = e["name"].clone();
            let user = e.get("user_id").cloned().unwrap_or_default();
            match name.as_str() {
                "member_added" | "member_removed" => members
                    .entry(format!("{} {user}", e["channel"]))
                    .or_default()
                    .push(name),
                "user_online" | "user_offline" => users.entry(user).or_default().push(name),
                _ => {}
            }
        }
        for (who, names) in &members {
            let paired = names.len() % 2 == 0
                && names.iter().enumerate().all(|(i, n)| {
                    n == if i % 2 == 0 {
                        "member_added"
                    } else {
                        "member_removed"
                    }
                });
            assert!(paired, "{source}: {who}: {names:?}");
        }
        for (who, names) in &users {
            let paired = names.len() % 2 == 0
                && names.iter().enumerate().all(|(i, n)| {
                    n == if i % 2 == 0 {
                        "user_online"
                    } else {
                        "user_offline"
                    }
                });
            assert!(paired, "{source}: {who}: {names:?}");
        }
        (members.len(), users.len())
    };
    let (members, users) = check(events(&redis).await, "stream");
    assert_eq!(users, 10, "every user came online");
    assert!(members >= 20, "most (room, user) pairs met: {members}");
    // crier's own webhook got them too, each request signed (checked as it
    // arrived), and they pair up the same way.
    common::eventually("the webhook caught up", WAIT, || async {
        let stream: Vec<Event> = events(&redis).await;
        receiver.events().len() >= stream.len()
    })
    .await;
    let hooked: Vec<Event> = receiver
        .events()
        .into_iter()
        .map(|e| {
            e.as_object()
                .map(|o| {
                    o.iter()
                        .filter(|(k, _)| k.as_str() != "time_ms")
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect();
    check(hooked, "webhook");
}

/// Pusher's `client_event` and `cache_miss` webhooks, when the app's
/// webhook lists them: each client event (with its event name, data,
/// sender's socket id and, on a presence channel, user id) and each cache
/// miss, once, valid for the `pusher` SDK.
#[tokio::test]
async fn pusher_client_event_and_cache_miss_webhooks() {
    let redis = RedisServer::start().await;
    let receiver = WebhookReceiver::start(200).await;
    let mut config = common::pusher::pusher_config(&redis);
    config.events.stream = Some(STREAM.into());
    config.pusher.apps[0].webhooks = vec![PusherWebhook {
        url: receiver.url(),
        event_types: vec!["client_event".into(), "cache_miss".into()],
        filter: Default::default(),
        headers: Default::default(),
    }];
    let crier = Instance::start(config).await;
    let mut driver = Driver::start().await;
    let port = common::pusher::port(&crier.addr);
    let socket = driver.connect("a", port, "ada").await;
    driver.connect("b", port, "bob").await;
    driver.subscribe("a", "presence-room").await;
    driver.subscribe("b", "presence-room").await;
    driver.subscribe("b", "cache-prices").await;
    driver
        .send(serde_json::json!({"op": "client_event", "client": "a", "channel": "presence-room", "event": "client-typing", "data": {"n": 1}}))
        .await;
    common::eventually("both webhooks", WAIT, || async {
        receiver.events().len() >= 2
    })
    .await;
    let mut events = receiver.events();
    events.sort_by_key(|e| e["name"].as_str().unwrap_or_default().to_owned());
    assert_eq!(
        events,
        [
            serde_json::json!({"name": "cache_miss", "channel": "cache-prices"}),
            serde_json::json!({
                "name": "client_event",
                "channel": "presence-room",
                "event": "client-typing",
                "data": "{\"n\":1}",
                "socket_id": socket,
                "user_id": "ada",
            }),
        ],
        "only the listed events: no occupied, no member_added"
    );
    // In the stream, like every entry, with when it happened.
    let recorded = crate::events(&redis).await;
    for name in ["client_event", "cache_miss"] {
        let entry = recorded
            .iter()
            .find(|e| e["name"] == name)
            .expect("in the stream");
        assert!(entry["time_ms"].parse::<u64>().is_ok(), "{entry:?}");
    }
}

/// Webhooks over HTTPS trust `events.webhook_ca_file` (beside the
/// system's CAs); a receiver whose CA is not trusted gets nothing, and the
/// failed calls are counted as errors.
#[tokio::test]
async fn https_webhooks_trust_the_configured_ca() {
    let redis = RedisServer::start().await;
    let ca = common::pki::Ca::new("webhook test CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = common::pki::write(dir.path(), "ca.pem", &ca.pem());
    let receiver = CrierReceiver::start_tls(&ca).await;
    let config = |trusted: bool| {
        let mut config = events_config(&redis, Duration::from_millis(100));
        config.events.webhook_ca_file = trusted.then(|| ca_file.clone());
        config.webhooks = vec![crier_webhook(&receiver.url, &[], "*")];
        config
    };
    let untrusting = Instance::start(config(false)).await;
    come_and_go(&untrusting, &redis, "public:first").await;
    common::eventually("calls fail: unknown CA", WAIT, || async {
        untrusting
            .metric("crier_event_webhook_calls_total{result=\"error\"}")
            .await
            >= 1.0
    })
    .await;
    assert!(
        receiver.events().is_empty(),
        "nothing over an untrusted TLS"
    );
    untrusting.shutdown().await;

    let trusting = Instance::start(config(true)).await;
    come_and_go(&trusting, &redis, "public:second").await;
    common::eventually("delivered over HTTPS", WAIT, || async {
        receiver
            .events()
            .iter()
            .any(|e| e["name"] == "channel_vacated" && e["channel"] == "public:second")
    })
    .await;
}
