//! The Redis Cluster side of the Redis broker: sharded pub/sub.
//!
//! One cluster connection (RESP3, one multiplexed connection per node,
//! opened by redis-rs as it learns the topology) carries commands and every
//! subscription: each channel is `SSUBSCRIBE`d on the shard that owns its
//! slot (what `crier_publish` and apps' `SPUBLISH` reach) and `SUBSCRIBE`d
//! for apps' plain `PUBLISH`, which the cluster broadcasts. Messages arrive
//! as pushes, which this task relays to the hub without waiting on anyone.
//!
//! When a slot changes owner (a failover, a crash, a reshard) the old owner
//! drops its sharded subscriptions, and what is published meanwhile is gone
//! from pub/sub. crier reads the slot map (`CLUSTER SLOTS`) with every
//! canary; a channel whose slot moved is subscribed again on its new owner
//! and, once that is confirmed, recovered — from history since the last
//! message relayed, or with a `gap`. Recovering before the resubscription
//! would lose what comes in between.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use redis::cluster::ClusterClientBuilder;
use redis::{ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::redis::{backoff, Canary, Redis, RedisBroker, Relay};
use super::{BrokerError, BrokerHealth, ChannelStart, Control, Fanout, Wiring};
use crate::config::{Config, RedisConfig};
use crate::history::{self, StreamId};
use crate::metrics::Metrics;
use crate::policy::Policy;

/// Which primary serves each slot range: `(first, last, address)`, from
/// `CLUSTER SLOTS`.
type SlotMap = Vec<(u16, u16, String)>;

fn owner(map: &SlotMap, slot: u16) -> Option<&str> {
    map.iter()
        .find(|(first, last, _)| (*first..=*last).contains(&slot))
        .map(|(_, _, address)| address.as_str())
}

async fn slot_map(redis: &Redis) -> Option<SlotMap> {
    let mut cmd = redis::cmd("CLUSTER");
    cmd.arg("SLOTS");
    let reply: Vec<Value> = redis.query(cmd).await.ok()?;
    let mut map = SlotMap::new();
    for range in reply {
        let Value::Array(fields) = range else {
            continue;
        };
        let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(primary))) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            continue;
        };
        let host = primary.first().and_then(bytes).map(String::from_utf8_lossy);
        let port = match primary.get(1) {
            Some(Value::Int(port)) => Some(*port),
            _ => None,
        };
        if let (Some(host), Some(port), Ok(first), Ok(last)) =
            (host, port, u16::try_from(*first), u16::try_from(*last))
        {
            map.push((first, last, format!("{host}:{port}")));
        }
    }
    map.sort();
    Some(map)
}

/// Slot-map reads after a move during which moved channels are subscribed
/// again (see `on_slot_map`).
const SETTLE_ROUNDS: u8 = 3;

/// The primaries of a slot map.
fn primaries(map: &SlotMap) -> Vec<&str> {
    let mut all: Vec<&str> = map.iter().map(|(_, _, a)| a.as_str()).collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// What the supervisor knows of one channel.
struct Channel {
    /// Kept: the hub waits on it for the subscription to be confirmed.
    _ready: watch::Sender<bool>,
    /// For history channels: the newest id relayed, where recovery resumes.
    last: Option<StreamId>,
    history: bool,
    /// A node was lost since this channel last recovered.
    pending: bool,
}

/// A cluster client for `[redis.cluster]`, with `[redis]`'s credentials
/// and, for `rediss://` seeds, its TLS files; with `pushes`, RESP3 and the
/// sender that subscriptions deliver to.
fn client(
    config: &RedisConfig,
    pushes: Option<mpsc::UnboundedSender<PushInfo>>,
) -> Result<redis::cluster::ClusterClient, BrokerError> {
    let nodes = config
        .cluster
        .as_ref()
        .map(|c| c.nodes.clone())
        .unwrap_or_default();
    let tls = nodes.iter().any(|n| n.starts_with("rediss:"));
    let mut builder = ClusterClientBuilder::new(nodes)
        .connection_timeout(config.connect_timeout)
        .response_timeout(config.connect_timeout);
    if let Some(pushes) = pushes {
        builder = builder
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(pushes);
    }
    if let Some(user) = &config.username {
        builder = builder.username(user);
    }
    if let Some(password) = &config.password {
        builder = builder.password(password);
    }
    if tls {
        let certs =
            crate::redis_client::certificates(&config.tls).map_err(BrokerError::Protocol)?;
        builder = builder.certs(certs);
    }
    Ok(builder.build()?)
}

/// Starts a broker on the Redis Cluster of `config`.
pub(super) fn start(
    config: &Config,
    wiring: Wiring,
    tasks: &TaskTracker,
    stop: CancellationToken,
) -> Result<RedisBroker, BrokerError> {
    let redis = Redis::new(config);
    let health = wiring.health.clone();
    spawn(config, wiring, redis.clone(), tasks, stop)?;
    Ok(RedisBroker { redis, health })
}

/// One publication from outside a running crier (`crier publish`) to a
/// Redis Cluster: see [`super::publish_once`].
pub(super) async fn publish_once(
    config: &Config,
    channel: &str,
    payload: &[u8],
) -> Result<Option<StreamId>, BrokerError> {
    let client = client(&config.redis, None)?;
    let conn = tokio::time::timeout(config.redis.connect_timeout, client.get_async_connection())
        .await
        .map_err(|_| BrokerError::Protocol("the redis cluster did not answer in time".into()))??;
    let mut redis = Redis::new(config);
    redis.use_cluster(conn);
    redis.load_when_missing = !config.channels.is_empty();
    redis.publish(channel, payload).await
}

/// Starts the cluster supervisor for `redis`.
fn spawn(
    config: &Config,
    wiring: Wiring,
    redis: Redis,
    tasks: &TaskTracker,
    stop: CancellationToken,
) -> Result<(), BrokerError> {
    let redis_config = &config.redis;
    let (push_tx, pushes) = mpsc::unbounded_channel::<PushInfo>();
    let (maps_tx, maps) = mpsc::unbounded_channel::<SlotMap>();
    let client = client(redis_config, Some(push_tx))?;
    let prefix = redis_config.channel_prefix.clone();
    // Each shard's canary is this name with a hash tag that lands on it.
    let canary = format!("{prefix}crier:canary:{:016x}", rand::rng().random::<u64>());
    let Wiring {
        hub,
        policy,
        control,
        health,
        metrics,
    } = wiring;
    health.set(false, &metrics);
    let supervisor = Supervisor {
        client,
        redis,
        pushes,
        maps_tx,
        maps,
        topology: None,
        settling: Vec::new(),
        settle_rounds: 0,
        repaired: HashMap::new(),
        prefix,
        canary,
        canaries: HashMap::new(),
        canary_interval: redis_config.canary_interval,
        connect_timeout: redis_config.connect_timeout,
        reconnect_max: redis_config.reconnect_max,
        hub,
        policy,
        control,
        channels: HashMap::new(),
        health,
        metrics,
        stop,
    };
    tasks.spawn(supervisor.run());
    Ok(())
}

struct Supervisor {
    client: redis::cluster::ClusterClient,
    redis: Redis,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
    /// Slot maps read with the canaries, for this task to compare.
    maps_tx: mpsc::UnboundedSender<SlotMap>,
    maps: mpsc::UnboundedReceiver<SlotMap>,
    topology: Option<SlotMap>,
    /// Channels whose slot moved, subscribed again for `settle_rounds` more
    /// slot-map reads.
    settling: Vec<String>,
    settle_rounds: u8,
    /// When each canary's shard was last repaired (see `repair_shard`).
    repaired: HashMap<String, tokio::time::Instant>,
    prefix: String,
    /// The canaries' common name; see [`canary_for`].
    canary: String,
    /// One canary per primary, on a channel of one of its slots: a shard
    /// that does not deliver makes the instance not ready.
    canaries: HashMap<String, Canary>,
    canary_interval: Duration,
    connect_timeout: Duration,
    reconnect_max: Duration,
    hub: Arc<dyn Fanout>,
    policy: Arc<Policy>,
    control: mpsc::UnboundedReceiver<Control>,
    channels: HashMap<String, Channel>,
    health: BrokerHealth,
    metrics: Metrics,
    stop: CancellationToken,
}

impl Supervisor {
    async fn run(mut self) {
        let mut failures = 0u32;
        let conn = loop {
            let attempt =
                tokio::time::timeout(self.connect_timeout, self.client.get_async_connection());
            let result = tokio::select! {
                _ = self.stop.cancelled() => return,
                r = attempt => r,
            };
            match result {
                Ok(Ok(conn)) => break conn,
                Ok(Err(e)) if failures % 20 == 0 => {
                    tracing::warn!(error = %crate::redis_client::describe(&e), attempt = failures + 1, "cannot connect to the redis cluster")
                }
                Err(_) if failures % 20 == 0 => {
                    tracing::warn!(
                        attempt = failures + 1,
                        "cannot connect to the redis cluster: timed out"
                    )
                }
                _ => {}
            }
            let delay = backoff(failures, self.reconnect_max);
            failures = failures.saturating_add(1);
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        };
        self.redis.use_cluster(conn.clone());
        // FUNCTION LOAD goes to every primary.
        if let Err(e) = self.redis.check_library(&self.metrics).await {
            tracing::error!(error = %e, "cannot load the crier function library on the cluster: no history until it is loaded");
        }
        let mut conn = conn;
        if let Some(map) = slot_map(&self.redis).await {
            self.place_canaries(&map, &mut conn).await;
            self.topology = Some(map);
        }
        tracing::info!(shards = self.canaries.len(), "redis cluster connected");
        self.serve(conn).await;
        self.health.set(false, &self.metrics);
    }

    async fn serve(&mut self, mut conn: redis::cluster_async::ClusterConnection) {
        let mut tick = tokio::time::interval(self.canary_interval / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                map = self.maps.recv() => {
                    if let Some(map) = map {
                        self.on_slot_map(map, &mut conn).await;
                    }
                }
                push = self.pushes.recv() => {
                    let Some(push) = push else { return };
                    self.on_push(push, &mut conn).await;
                }
                request = self.control.recv() => {
                    let Some(request) = request else { return };
                    match request {
                        Control::Subscribe { channel, ready, start } => {
                            self.subscribe(&mut conn, channel, ready, start).await;
                        }
                        Control::Unsubscribe { channel } => {
                            self.channels.remove(&channel);
                            let key = self.key(&channel);
                            let _ = conn.sunsubscribe(&key).await;
                            let _ = conn.unsubscribe(&key).await;
                        }
                    }
                }
                _ = tick.tick() => {
                    let overdue: Vec<String> = self
                        .canaries
                        .iter()
                        .filter(|(_, c)| c.overdue())
                        .map(|(name, _)| name.clone())
                        .collect();
                    if !overdue.is_empty() && self.health.is_up() {
                        tracing::warn!(canaries = ?overdue, "a shard's canary is not back: not ready");
                        self.health.set(false, &self.metrics);
                    }
                    for canary in overdue {
                        self.repair_shard(&canary, &mut conn).await;
                    }
                    let mut publish = Vec::new();
                    for (name, canary) in &mut self.canaries {
                        if let Some(seq) = canary.next() {
                            let mut cmd = redis::cmd("SPUBLISH");
                            cmd.arg(name).arg(seq.to_string());
                            publish.push(cmd);
                        }
                    }
                    let redis = self.redis.clone();
                    let maps = self.maps_tx.clone();
                    let metrics = self.metrics.clone();
                    if !self.redis.library_ok.load(std::sync::atomic::Ordering::Acquire) && self.health.is_up() {
                        self.health.set(false, &self.metrics);
                    }
                    tokio::spawn(async move {
                        if let Some(map) = slot_map(&redis).await {
                            let _ = maps.send(map);
                        }
                        // Also repairs a library lost on the canary's shard,
                        // and finds another configuration's.
                        let _ = redis.check_library(&metrics).await;
                        for cmd in publish {
                            let _ = redis.query::<i64>(cmd).await;
                        }
                    });
                }
            }
        }
    }

    async fn subscribe(
        &mut self,
        conn: &mut redis::cluster_async::ClusterConnection,
        channel: String,
        ready: watch::Sender<bool>,
        start: ChannelStart,
    ) {
        let ChannelStart {
            history,
            position: last,
        } = start;
        let key = self.key(&channel);
        let sharded = conn.ssubscribe(&key).await;
        let plain = conn.subscribe(&key).await;
        match (sharded, plain) {
            (Ok(()), Ok(())) => {
                ready.send_replace(true);
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(%channel, error = %e, "cluster subscribe failed");
            }
        }
        self.channels.insert(
            channel,
            Channel {
                _ready: ready,
                last,
                history,
                pending: false,
            },
        );
    }

    async fn on_push(
        &mut self,
        push: PushInfo,
        conn: &mut redis::cluster_async::ClusterConnection,
    ) {
        let name = push
            .data
            .first()
            .and_then(bytes)
            .map(|b| String::from_utf8_lossy(b).into_owned());
        match (push.kind, name) {
            (PushKind::Message | PushKind::SMessage, Some(name)) => {
                let payload = push.data.get(1).and_then(bytes).unwrap_or_default();
                if let Some(canary) = self.canaries.get_mut(&name) {
                    canary.answered(payload, &self.metrics);
                    if self.canaries.values().all(|c| !c.overdue()) {
                        let library_ok = self
                            .redis
                            .library_ok
                            .load(std::sync::atomic::Ordering::Acquire);
                        self.health.set(library_ok, &self.metrics);
                    }
                    return;
                }
                let Some(channel) = name.strip_prefix(self.prefix.as_str()) else {
                    return;
                };
                let (id, payload) = history::split_marked(payload);
                let channel = channel.to_owned();
                self.relay(&channel).live(id, payload).await;
            }
            (PushKind::Disconnection, _) => {
                tracing::warn!("a redis cluster node connection was lost: recovering each channel once it is resubscribed");
                for channel in self.channels.values_mut() {
                    channel.pending = true;
                }
            }
            // A (re)subscription confirmed: recover what the lost node's
            // subscription missed. History channels wait for the sharded
            // one, where crier_publish publishes.
            // The shard gave the channel's slot away (a failover, a
            // reshard) and dropped the subscription: subscribe again, on
            // the new owner, and recover once it is confirmed.
            (PushKind::SUnsubscribe, Some(name)) if self.wants(&name) => {
                tracing::info!(channel = %name, "sharded subscription moved: subscribing on the new owner");
                if let Some(channel) = self.channel_mut(&name) {
                    channel.pending = true;
                }
                if let Err(e) = self.resubscribe(conn, &name).await {
                    tracing::warn!(channel = %name, error = %e, "cannot subscribe on the new owner");
                }
            }
            (PushKind::SSubscribe, Some(name)) => self.recover(&name, true).await,
            (PushKind::Subscribe, Some(name)) => self.recover(&name, false).await,
            _ => {}
        }
    }

    async fn recover(&mut self, key: &str, sharded: bool) {
        let Some(name) = key.strip_prefix(self.prefix.as_str()) else {
            return;
        };
        let Some(channel) = self.channels.get_mut(name) else {
            return;
        };
        if !channel.pending || (channel.history && !sharded) {
            return;
        }
        channel.pending = false;
        let name = name.to_owned();
        self.relay(&name).recover().await;
    }

    /// A slot map read with a canary: every channel (and the canary) whose
    /// slot changed owner is subscribed on the new owner, then recovered.
    async fn on_slot_map(
        &mut self,
        map: SlotMap,
        conn: &mut redis::cluster_async::ClusterConnection,
    ) {
        let Some(old) = self.topology.replace(map) else {
            return;
        };
        let Some(new) = self.topology.clone() else {
            return;
        };
        let last_round;
        if old != new {
            let moved = |key: &str| {
                let slot = history::slot(key);
                owner(&old, slot) != owner(&new, slot)
            };
            self.settling = self
                .channels
                .keys()
                .map(|name| self.key(name))
                .filter(|key| moved(key))
                .collect();
            self.settle_rounds = SETTLE_ROUNDS;
            last_round = false;
            if primaries(&old) != primaries(&new) {
                // A primary added (or a replica promoted) gets the library
                // too: FUNCTION LOAD goes to every primary.
                let redis = self.redis.clone();
                tokio::spawn(async move {
                    if !redis.holds_library() {
                        return;
                    }
                    if let Err(e) = redis.load_library().await {
                        tracing::warn!(error = %e, "cannot load the crier function library on the new primaries");
                    }
                });
            }
            if !self.settling.is_empty() {
                tracing::info!(
                    channels = self.settling.len(),
                    "cluster slots moved: subscribing on the new owners and recovering"
                );
            }
        } else if self.settle_rounds > 0 {
            self.settle_rounds -= 1;
            last_round = self.settle_rounds == 0;
        } else {
            return;
        }
        // The old owner drops its sharded subscriptions when it hands the
        // slot over, which may come after a first resubscription reached it:
        // subscribe (and recover) again for a few slot-map reads after a
        // move. Subscribing twice on one node is harmless.
        self.place_canaries(&new, conn).await;
        let first_round = self.settle_rounds == SETTLE_ROUNDS && !last_round;
        for key in self.settling.clone() {
            let Some(channel) = self.channel_mut(&key) else {
                continue;
            };
            // History channels recover exactly every round (from the last
            // relayed id); the others get a gap when the move is seen and
            // once more when settling ends, covering what fell in between.
            channel.pending = channel.history || first_round || last_round;
            match self.resubscribe(conn, &key).await {
                Ok(()) => self.recover(&key, true).await,
                Err(e) => {
                    tracing::warn!(channel = %key, error = %e, "cannot subscribe on the new owner")
                }
            }
        }
        if last_round {
            self.settling.clear();
        }
    }

    /// One canary per primary of `map`, subscribed on its shard; canaries of
    /// primaries that are gone are dropped, the others keep their state.
    async fn place_canaries(
        &mut self,
        map: &SlotMap,
        conn: &mut redis::cluster_async::ClusterConnection,
    ) {
        let wanted: Vec<String> = primaries(map)
            .iter()
            .filter_map(|primary| canary_for(&self.canary, map, primary))
            .collect();
        let gone: Vec<String> = self
            .canaries
            .keys()
            .filter(|name| !wanted.contains(name))
            .cloned()
            .collect();
        for name in gone {
            self.canaries.remove(&name);
            let _ = conn.sunsubscribe(&name).await;
        }
        for name in wanted {
            if self.canaries.contains_key(&name) {
                // Subscribed again on the slot's (maybe new) owner.
                let _ = self.resubscribe(conn, &name).await;
                continue;
            }
            match self.resubscribe(conn, &name).await {
                Ok(()) => {
                    self.canaries
                        .insert(name, Canary::new(self.canary_interval));
                }
                Err(e) => tracing::warn!(canary = %name, error = %e, "cannot subscribe a canary"),
            }
        }
    }

    /// A shard's canary is not coming back: its node may have dropped its
    /// sharded subscriptions (a slot handed over, a subscription that
    /// reached the old owner just before it let go). Subscribe that shard's
    /// channels and its canary again, and recover them — at most once per
    /// canary interval, and only when the shard answers.
    async fn repair_shard(
        &mut self,
        canary: &str,
        conn: &mut redis::cluster_async::ClusterConnection,
    ) {
        let now = tokio::time::Instant::now();
        if self
            .repaired
            .get(canary)
            .is_some_and(|at| now.duration_since(*at) < self.canary_interval)
        {
            return;
        }
        self.repaired.insert(canary.to_owned(), now);
        // One quick attempt each: a shard that is down is not waited for
        // here (the relay of the others goes on); the next interval retries.
        let limit = self.canary_interval.min(self.connect_timeout);
        let once = |conn: &mut redis::cluster_async::ClusterConnection, key: String| {
            let mut conn = conn.clone();
            async move {
                matches!(
                    tokio::time::timeout(limit, conn.ssubscribe(&key)).await,
                    Ok(Ok(()))
                )
            }
        };
        if !once(conn, canary.to_owned()).await {
            return;
        }
        let Some(map) = &self.topology else { return };
        let shard = owner(map, history::slot(canary)).map(str::to_owned);
        let keys: Vec<String> = self
            .channels
            .keys()
            .map(|name| self.key(name))
            .filter(|key| owner(map, history::slot(key)).map(str::to_owned) == shard)
            .collect();
        if !keys.is_empty() {
            tracing::info!(
                channels = keys.len(),
                "a shard's canary is late: subscribing its channels again and recovering"
            );
        }
        for key in keys {
            if let Some(channel) = self.channel_mut(&key) {
                channel.pending = true;
            }
            if once(conn, key.clone()).await {
                self.recover(&key, true).await;
            }
        }
    }

    /// Whether `key` (a Redis channel name) is one the hub still wants.
    fn wants(&self, key: &str) -> bool {
        key.strip_prefix(self.prefix.as_str())
            .is_some_and(|name| self.channels.contains_key(name))
    }

    fn channel_mut(&mut self, key: &str) -> Option<&mut Channel> {
        let name = key.strip_prefix(self.prefix.as_str())?;
        self.channels.get_mut(name)
    }

    /// `SSUBSCRIBE` again, retrying while the cluster settles (the slot map
    /// may still name the old owner for a moment).
    async fn resubscribe(
        &self,
        conn: &mut redis::cluster_async::ClusterConnection,
        key: &str,
    ) -> redis::RedisResult<()> {
        let mut attempt = 0u32;
        loop {
            match conn.ssubscribe(key).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt >= 20 => return Err(e),
                Err(_) => {
                    attempt += 1;
                    tokio::time::sleep(backoff(attempt.min(4), self.reconnect_max)).await;
                }
            }
        }
    }

    /// `channel`'s relay.
    fn relay<'a>(&'a mut self, channel: &'a str) -> Relay<'a> {
        Relay {
            hub: &*self.hub,
            policy: &self.policy,
            redis: &self.redis,
            metrics: &self.metrics,
            state: self
                .channels
                .get_mut(channel)
                .map(|c| (&mut c.last, c.history)),
            channel,
        }
    }

    fn key(&self, channel: &str) -> String {
        format!("{}{channel}", self.prefix)
    }
}

/// A canary channel on one of `primary`'s slots: `base` with the first
/// hash tag `{0}`, `{1}`, … that lands there.
fn canary_for(base: &str, map: &SlotMap, primary: &str) -> Option<String> {
    (0..100_000u32)
        .map(|k| format!("{base}{{{k}}}"))
        .find(|name| owner(map, history::slot(name)) == Some(primary))
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}
