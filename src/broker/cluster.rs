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
//!
//! The hub's subscribes and unsubscribes run in a task beside the
//! supervisor ([`subscriber`]), taken together as they queue up, so that
//! a burst of them (a rolling restart's reconnecting clients) never holds
//! up the messages and the canaries' answers this task relays.
//!
//! This file is the Cluster's supervisor: its connection, subscriptions,
//! slot map and per-shard canaries. The relay to the hub (shared with the
//! one-node supervisor) is `broker::relay`; commands, `broker::command`.

use std::collections::HashMap;

use redis::cluster::ClusterClientBuilder;
use redis::{ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::{mpsc, watch};
use tokio_util::task::TaskTracker;

use super::command::Redis;
use super::supervision::{backoff, Canary, Supervision};
use super::{BrokerError, Control};
use crate::config::{Config, RedisConfig};
use crate::history;

/// What the canaries' task learns, for the supervisor.
enum Check {
    /// The slot map, read with the canaries.
    Map(SlotMap),
    /// The shard of `canary` took canary `seq` and reached `receivers`
    /// subscribers ([`Canary::published`]).
    Published {
        canary: String,
        seq: u64,
        receivers: i64,
    },
}

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

/// The command connection of one publication from outside a running crier
/// to a Redis Cluster: see [`super::publish_once`].
pub(super) async fn connect_once(config: &Config) -> Result<Redis, BrokerError> {
    let client = client(&config.redis, None)?;
    let conn = tokio::time::timeout(config.redis.connect_timeout, client.get_async_connection())
        .await
        .map_err(|_| BrokerError::Protocol("the redis cluster did not answer in time".into()))??;
    let redis = Redis::once(config);
    redis.use_cluster(conn);
    Ok(redis)
}

/// Starts the cluster supervisor.
pub(super) fn spawn(
    config: &RedisConfig,
    duty: Supervision,
    tasks: &TaskTracker,
) -> Result<(), BrokerError> {
    let (push_tx, pushes) = mpsc::unbounded_channel::<PushInfo>();
    let (checks_tx, checks) = mpsc::unbounded_channel::<Check>();
    let client = client(config, Some(push_tx))?;
    let supervisor = ClusterSupervisor {
        duty,
        client,
        pushes,
        checks_tx,
        checks,
        topology: None,
        settling: Vec::new(),
        settle_rounds: 0,
        repaired: HashMap::new(),
        canaries: HashMap::new(),
    };
    tasks.spawn(supervisor.run());
    Ok(())
}

/// The Cluster's supervisor: owns the cluster connection's subscriptions
/// and pushes (see the module documentation).
struct ClusterSupervisor {
    duty: Supervision,
    client: redis::cluster::ClusterClient,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
    /// Slot maps and canaries taken, from the canaries' task.
    checks_tx: mpsc::UnboundedSender<Check>,
    checks: mpsc::UnboundedReceiver<Check>,
    topology: Option<SlotMap>,
    /// Channels whose slot moved, subscribed again for `settle_rounds` more
    /// slot-map reads.
    settling: Vec<String>,
    settle_rounds: u8,
    /// When each canary's shard was last repaired (see `repair_shard`).
    repaired: HashMap<String, tokio::time::Instant>,
    /// One canary per primary, on a channel of one of its slots (named
    /// after the common one, see [`canary_for`]): a shard that does not
    /// deliver makes the instance not ready.
    canaries: HashMap<String, Canary>,
}

impl ClusterSupervisor {
    async fn run(mut self) {
        let mut failures = 0u32;
        let conn = loop {
            let attempt = tokio::time::timeout(
                self.duty.connect_timeout,
                self.client.get_async_connection(),
            );
            let result = tokio::select! {
                _ = self.duty.stop.cancelled() => return,
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
            let delay = backoff(failures, self.duty.reconnect_max);
            failures = failures.saturating_add(1);
            tokio::select! {
                _ = self.duty.stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        };
        self.duty.redis.use_cluster(conn.clone());
        // FUNCTION LOAD goes to every primary.
        if let Err(e) = self.duty.redis.check_library(&self.duty.metrics).await {
            tracing::error!(error = %e, "cannot load the crier function library on the cluster: no history until it is loaded");
        }
        let mut conn = conn;
        if let Some(map) = slot_map(&self.duty.redis).await {
            self.place_canaries(&map, &mut conn).await;
            self.topology = Some(map);
        }
        tracing::info!(shards = self.canaries.len(), "redis cluster connected");
        self.serve(conn).await;
        self.duty.health.set(false, &self.duty.metrics);
    }

    async fn serve(&mut self, mut conn: redis::cluster_async::ClusterConnection) {
        // Ends once `asks` is dropped, with this connection.
        let (asks, queue) = mpsc::unbounded_channel();
        tokio::spawn(subscriber(conn.clone(), queue));
        let mut tick = tokio::time::interval(self.duty.canary_interval / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.duty.stop.cancelled() => return,
                check = self.checks.recv() => match check {
                    Some(Check::Map(map)) => self.on_slot_map(map, &mut conn).await,
                    Some(Check::Published { canary, seq, receivers }) => {
                        self.on_canary_taken(&canary, seq, receivers, &conn);
                    }
                    None => {}
                },
                push = self.pushes.recv() => {
                    let Some(push) = push else { return };
                    self.on_push(push, &mut conn).await;
                }
                request = self.duty.control.recv() => {
                    let Some(request) = request else { return };
                    match request {
                        Control::Subscribe { channel, ready, start } => {
                            let key = self.duty.relay.key(&channel);
                            self.duty.relay.want(channel, ready.clone(), start);
                            let _ = asks.send(Ask::Subscribe { key, ready });
                        }
                        Control::Unsubscribe { channel } => {
                            self.duty.relay.forget(&channel);
                            let key = self.duty.relay.key(&channel);
                            let _ = asks.send(Ask::Unsubscribe { key });
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
                    if !overdue.is_empty() && self.duty.health.is_up() {
                        tracing::warn!(canaries = ?overdue, "a shard's canary is not back: not ready");
                        self.duty.health.set(false, &self.duty.metrics);
                    }
                    for canary in overdue {
                        self.repair_shard(&canary, &conn);
                    }
                    let mut publish = Vec::new();
                    for (name, canary) in &mut self.canaries {
                        if let Some(seq) = canary.next() {
                            publish.push((name.clone(), seq));
                        }
                    }
                    let redis = self.duty.redis.clone();
                    let checks = self.checks_tx.clone();
                    let metrics = self.duty.metrics.clone();
                    if !self.duty.redis.library_ok.load(std::sync::atomic::Ordering::Acquire) && self.duty.health.is_up() {
                        self.duty.health.set(false, &self.duty.metrics);
                    }
                    tokio::spawn(async move {
                        if let Some(map) = slot_map(&redis).await {
                            let _ = checks.send(Check::Map(map));
                        }
                        // Also repairs a library lost on the canary's shard,
                        // and finds another configuration's.
                        let _ = redis.check_library(&metrics).await;
                        for (canary, seq) in publish {
                            let mut cmd = redis::cmd("SPUBLISH");
                            cmd.arg(&canary).arg(seq.to_string());
                            if let Ok(receivers) = redis.query::<i64>(cmd).await {
                                let _ = checks.send(Check::Published { canary, seq, receivers });
                            }
                        }
                    });
                }
            }
        }
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
                    canary.answered(payload, &self.duty.metrics);
                    if self.canaries.values().all(|c| !c.overdue()) {
                        let library_ok = self
                            .duty
                            .redis
                            .library_ok
                            .load(std::sync::atomic::Ordering::Acquire);
                        self.duty.health.set(library_ok, &self.duty.metrics);
                    }
                    return;
                }
                self.duty.relay.message(&name, payload).await;
            }
            (PushKind::Disconnection, _) => {
                tracing::warn!("a redis cluster node connection was lost: recovering each channel once it is resubscribed");
                for channel in self.duty.relay.wanted() {
                    channel.pending = true;
                }
            }
            // The shard gave the channel's slot away (a failover, a
            // reshard) and dropped the subscription: subscribe again, on
            // the new owner, and recover once it is confirmed.
            (PushKind::SUnsubscribe, Some(name)) if self.duty.relay.by_key(&name).is_some() => {
                tracing::info!(channel = %name, "sharded subscription moved: subscribing on the new owner");
                if let Some(channel) = self.duty.relay.by_key(&name) {
                    channel.pending = true;
                }
                if let Err(e) = self.resubscribe(conn, &name).await {
                    tracing::warn!(channel = %name, error = %e, "cannot subscribe on the new owner");
                }
            }
            // A (re)subscription confirmed: recover what the lost node's
            // subscription missed. History channels wait for the sharded
            // one, where crier_publish publishes.
            (PushKind::SSubscribe, Some(name)) => self.recover(&name, true).await,
            (PushKind::Subscribe, Some(name)) => self.recover(&name, false).await,
            _ => {}
        }
    }

    async fn recover(&mut self, key: &str, sharded: bool) {
        let Some(channel) = self.duty.relay.by_key(key) else {
            return;
        };
        if !channel.pending || (channel.history && !sharded) {
            return;
        }
        channel.pending = false;
        self.duty.relay.recover_key(key).await;
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
            self.settling = self.duty.relay.keys();
            self.settling.retain(|key| moved(key));
            self.settle_rounds = SETTLE_ROUNDS;
            last_round = false;
            if primaries(&old) != primaries(&new) {
                // A primary added (or a replica promoted) gets the library
                // too: FUNCTION LOAD goes to every primary.
                let redis = self.duty.redis.clone();
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
            let Some(channel) = self.duty.relay.by_key(&key) else {
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
            .filter_map(|primary| canary_for(&self.duty.canary, map, primary))
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
                        .insert(name, Canary::new(self.duty.canary_interval));
                }
                Err(e) => tracing::warn!(canary = %name, error = %e, "cannot subscribe a canary"),
            }
        }
    }

    /// A shard took a canary: its clock starts now, and a canary that
    /// reached no subscriber means the shard dropped the subscriptions.
    fn on_canary_taken(
        &mut self,
        canary: &str,
        seq: u64,
        receivers: i64,
        conn: &redis::cluster_async::ClusterConnection,
    ) {
        let heard = self
            .canaries
            .get_mut(canary)
            .map(|c| c.published(seq, receivers));
        if heard == Some(false) {
            tracing::warn!(%canary, "a shard no longer holds this instance's subscriptions: subscribing its channels again");
            self.repair_shard(canary, conn);
        }
    }

    /// A shard's canary is not coming back, or its shard says it reached no
    /// subscriber: its node may have dropped its sharded subscriptions (a
    /// slot handed over, a subscription that reached the old owner just
    /// before it let go, a connection the node closed). Subscribe that
    /// shard's canary and channels again, and recover each channel once its
    /// subscription is confirmed (see `on_push`) — at most once per canary
    /// interval.
    ///
    /// The subscribes run beside this task, not in it: a shard holds
    /// thousands of channels (every user's own), and one round trip each
    /// in this task would hold up every message and canary behind them,
    /// which made canaries late again and the repair start over, for as
    /// long as the load lasted (a rolling restart on a Cluster).
    fn repair_shard(&mut self, canary: &str, conn: &redis::cluster_async::ClusterConnection) {
        let now = tokio::time::Instant::now();
        if self
            .repaired
            .get(canary)
            .is_some_and(|at| now.duration_since(*at) < self.duty.canary_interval)
        {
            return;
        }
        self.repaired.insert(canary.to_owned(), now);
        let Some(map) = &self.topology else { return };
        let shard = owner(map, history::slot(canary)).map(str::to_owned);
        let mut keys = self.duty.relay.keys();
        keys.retain(|key| owner(map, history::slot(key)).map(str::to_owned) == shard);
        for key in &keys {
            if let Some(channel) = self.duty.relay.by_key(key) {
                channel.pending = true;
            }
        }
        if !keys.is_empty() {
            tracing::info!(
                channels = keys.len(),
                "a shard's canary is late: subscribing its channels again and recovering"
            );
        }
        // One quick attempt each: a shard that is down is not waited for
        // (its channels stay pending); the next interval retries.
        let limit = self.duty.canary_interval.min(self.duty.connect_timeout);
        let mut conn = conn.clone();
        let canary = canary.to_owned();
        let stop = self.duty.stop.clone();
        tokio::spawn(async move {
            let mut once = async |key: &str| {
                matches!(
                    tokio::time::timeout(limit, conn.ssubscribe(key)).await,
                    Ok(Ok(()))
                )
            };
            if !once(&canary).await {
                return;
            }
            for key in keys {
                if stop.is_cancelled() {
                    return;
                }
                once(&key).await;
            }
        });
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
                    tokio::time::sleep(backoff(attempt.min(4), self.duty.reconnect_max)).await;
                }
            }
        }
    }
}

/// A subscribe or unsubscribe the hub asked for, by the channel's Redis
/// name.
enum Ask {
    Subscribe {
        key: String,
        /// Set once both subscriptions are confirmed.
        ready: watch::Sender<bool>,
    },
    Unsubscribe {
        key: String,
    },
}

/// Asks taken together at most.
const ASK_BATCH: usize = 512;

/// Runs the hub's subscribes and unsubscribes on `conn`, beside the
/// supervisor, in the order they were asked: whatever is queued goes out
/// together (the connection pipelines them, one round trip for the lot
/// rather than one each), a channel asked for more than once in a lot only
/// as its last ask, and the next lot once this one is answered.
///
/// Why beside: the supervisor also takes the canaries' answers. With each
/// channel's `SSUBSCRIBE` and `SUBSCRIBE` awaited in it, one after
/// another, the 19,000 clients a draining instance sends to another in a
/// rolling restart (a channel of their own each) put some 38,000 round
/// trips ahead of the canaries, so the instance turned not ready and
/// refused them, for as long as they kept coming back (issue 26's fleet).
async fn subscriber(
    conn: redis::cluster_async::ClusterConnection,
    mut asks: mpsc::UnboundedReceiver<Ask>,
) {
    let mut lot = Vec::with_capacity(ASK_BATCH);
    while asks.recv_many(&mut lot, ASK_BATCH).await > 0 {
        let mut last: HashMap<String, Ask> = HashMap::with_capacity(lot.len());
        for ask in lot.drain(..) {
            let key = match &ask {
                Ask::Subscribe { key, .. } | Ask::Unsubscribe { key } => key.clone(),
            };
            last.insert(key, ask);
        }
        let runs = last.into_values().map(|ask| {
            let mut conn = conn.clone();
            async move {
                match ask {
                    Ask::Subscribe { key, ready } => {
                        let sharded = conn.ssubscribe(&key).await;
                        let plain = conn.subscribe(&key).await;
                        match (sharded, plain) {
                            (Ok(()), Ok(())) => {
                                ready.send_replace(true);
                            }
                            (Err(e), _) | (_, Err(e)) => {
                                tracing::warn!(channel = %key, error = %e, "cluster subscribe failed");
                            }
                        }
                    }
                    Ask::Unsubscribe { key } => {
                        let _ = conn.sunsubscribe(&key).await;
                        let _ = conn.unsubscribe(&key).await;
                    }
                }
            }
        });
        futures_util::future::join_all(runs).await;
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
