//! The Redis broker: one pub/sub connection per instance, whatever the number
//! of clients, subscribed only to channels that local clients listen to.
//!
//! A supervisor task owns that connection. It applies the hub's subscribe and
//! unsubscribe requests in order, hands every message to the hub, and when the
//! connection is lost it marks the broker (and every channel) not ready,
//! reconnects with capped, jittered exponential backoff, resubscribes every
//! live channel and recovers what was published meanwhile: from the history
//! stream for channels that keep one, a `gap` notice for the others. A
//! canary published through Redis and received back backs readiness, so an
//! instance that is connected but not receiving is not ready either.
//! redis-rs buffers pub/sub messages unboundedly between its driver and this
//! task, so this task must never wait on anything but Redis.
//!
//! Publishing, history reads and the canary use a separate multiplexed
//! connection that reconnects by itself.
//!
//! Both go to the primary that [`Target`] finds (the configured node, or the
//! one the sentinels name), checked with `ROLE` at every connection. A
//! primary that stops being one — a `READONLY` answer, or `ROLE` saying
//! `slave` at a canary — ends the pub/sub connection: the supervisor then
//! finds the primary again, reconnects both connections to it, resubscribes
//! and recovers, exactly as after any other outage.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use rand::Rng;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink, PubSubStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::failure::{classify, RedisFailure};
use super::library::{self, Holder, Library};
use super::target::Target;
use super::{BrokerError, BrokerHealth, ChannelStart, Control, Fanout, Wiring};
use crate::config::Config;
use crate::history::{self, Recovery, StreamId};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::protocol::Publication;

/// Channels subscribed per SUBSCRIBE command when resubscribing in bulk.
const RESUBSCRIBE_BATCH: usize = 512;
/// First reconnect delay; doubles per failed attempt up to `reconnect_max`.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Most messages recovered per channel after an outage.
pub(super) const RECOVERY_LIMIT: usize = 10_000;

/// See the module documentation.
pub(crate) struct RedisBroker {
    pub(super) redis: Redis,
    pub(super) health: BrokerHealth,
}

/// The connection commands go over: to one primary (reconnecting by
/// itself), or to a Redis Cluster (routing each command by its key).
pub(super) enum Conn {
    Node(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Conn {
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self {
            Conn::Node(c) => cmd.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
    }
}

/// Commands over the multiplexed connection, shared by the broker and its
/// supervisor.
#[derive(Clone)]
pub(super) struct Redis {
    /// To the current primary; replaced when the supervisor finds another.
    /// `None` until the first one is found (Sentinel).
    conn: Arc<arc_swap::ArcSwapOption<Conn>>,
    /// Redis Cluster: no legacy keys to read (crier never ran there before).
    cluster: bool,
    /// Told when Redis answers as a replica would: the primary moved.
    demoted: Arc<tokio::sync::Notify>,
    settings: ConnectionManagerConfig,
    /// This deployment's function library (`broker::library`).
    library: Arc<Library>,
    /// Who held it at the last check: log lines and the metric change
    /// with it; a conflict refuses every `FCALL` (they would run another
    /// deployment's functions).
    holder: Arc<std::sync::Mutex<Option<Result<Holder, String>>>>,
    /// The library is usable (checked with every canary): an instance
    /// whose apps' `FCALL crier_publish` would fail, or would reach
    /// another deployment, is not ready.
    pub(super) library_ok: Arc<AtomicBool>,
    /// How long a configuration's last note counts it as running.
    stale: Duration,
    prefix: String,
    timeout: Duration,
    /// Load `library` when an `FCALL` finds the function missing.
    pub(super) load_when_missing: bool,
}

impl RedisBroker {
    pub(super) fn start(
        config: &Config,
        wiring: Wiring,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Result<Self, BrokerError> {
        let Wiring {
            hub,
            policy,
            control,
            health,
            metrics,
        } = wiring;
        let redis_config = &config.redis;
        let redis = Redis::new(config);
        let target = Target::of(redis_config)
            .ok_or_else(|| BrokerError::Protocol("no Redis configured".into()))?;
        let prefix = redis_config.channel_prefix.clone();
        health.set(false, &metrics);
        let canary = format!("{prefix}crier:canary:{:016x}", rand::rng().random::<u64>());
        let supervisor = Supervisor {
            target,
            config: redis_config.clone(),
            address: None,
            redis: redis.clone(),
            prefix,
            canary,
            canary_interval: redis_config.canary_interval,
            connect_timeout: redis_config.connect_timeout,
            reconnect_max: redis_config.reconnect_max,
            hub,
            policy,
            control,
            channels: HashMap::new(),
            health: health.clone(),
            metrics,
            stop,
        };
        tasks.spawn(supervisor.run());
        Ok(RedisBroker { redis, health })
    }

    /// `FCALL crier_publish 1 <channel> <payload>`: appended to the history
    /// when the channel keeps one, and published, in one atomic step.
    pub(crate) async fn publish(
        &self,
        channel: &str,
        payload: &[u8],
    ) -> Result<Option<StreamId>, BrokerError> {
        self.redis.publish(channel, payload).await
    }
}

/// One publication from outside a running crier (`crier publish`) to a
/// single Redis or a Sentinel-managed primary: see [`super::publish_once`].
pub(super) async fn publish_once(
    config: &Config,
    channel: &str,
    payload: &[u8],
) -> Result<Option<StreamId>, BrokerError> {
    let target = Target::of(&config.redis)
        .ok_or_else(|| BrokerError::Protocol("no Redis configured".into()))?;
    let primary = target
        .primary(&config.redis, config.redis.connect_timeout)
        .await
        .map_err(BrokerError::Protocol)?;
    let mut redis = Redis::new(config);
    redis.connect_to(primary.client)?;
    redis.load_when_missing = !config.channels.is_empty();
    redis.publish(channel, payload).await
}

impl Redis {
    /// A lazily connecting multiplexed connection and this configuration's
    /// function library.
    pub(super) fn new(config: &Config) -> Self {
        let redis_config = &config.redis;
        let cluster = redis_config.cluster.is_some();
        let library = Library::new(config, std::time::SystemTime::now());
        Redis {
            conn: Arc::default(),
            cluster,
            demoted: Arc::default(),
            settings: ConnectionManagerConfig::new()
                .set_connection_timeout(Some(redis_config.connect_timeout))
                .set_response_timeout(Some(redis_config.connect_timeout))
                .set_number_of_retries(2)
                .set_max_delay(redis_config.reconnect_max),
            library: Arc::new(library),
            holder: Arc::default(),
            library_ok: Arc::new(AtomicBool::new(true)),
            stale: (redis_config.canary_interval * 10).max(Duration::from_secs(30)),
            prefix: redis_config.channel_prefix.clone(),
            timeout: redis_config.connect_timeout,
            load_when_missing: true,
        }
    }

    /// From now on, commands go to `client`'s server (connecting lazily).
    fn connect_to(&self, client: redis::Client) -> Result<(), BrokerError> {
        let conn = ConnectionManager::new_lazy_with_config(client, self.settings.clone())?;
        self.conn.store(Some(Arc::new(Conn::Node(conn))));
        Ok(())
    }

    /// From now on, commands go through this cluster connection.
    pub(super) fn use_cluster(&self, conn: redis::cluster_async::ClusterConnection) {
        self.conn.store(Some(Arc::new(Conn::Cluster(conn))));
    }

    /// Through `crier_publish`; on a Redis without functions (< 7), a
    /// plain `PUBLISH` so live delivery still works (without history).
    pub(super) async fn publish(
        &self,
        channel: &str,
        payload: &[u8],
    ) -> Result<Option<StreamId>, BrokerError> {
        match self
            .fcall::<Option<String>>("crier_publish", &[self.stream_key(channel)], &[payload])
            .await
        {
            Ok(id) => Ok(id.and_then(|id| id.parse().ok())),
            Err(BrokerError::Redis(e)) if classify(&e) == RedisFailure::NoSuchCommand => {
                let mut cmd = redis::cmd("PUBLISH");
                cmd.arg(format!("{}{channel}", self.prefix)).arg(payload);
                self.query::<i64>(cmd).await.map(|_| None)
            }
            Err(e) => Err(e),
        }
    }

    /// `FCALL name 1 channel args...`, loading the library once if Redis
    /// lost it (a restart without persistence).
    pub(super) async fn fcall<T: redis::FromRedisValue>(
        &self,
        name: &str,
        keys: &[String],
        args: &[&[u8]],
    ) -> Result<T, BrokerError> {
        if let Some(Ok(Holder::Conflict(theirs))) = self.last_holder() {
            return Err(BrokerError::LibraryConflict {
                library: self.library.name.clone(),
                theirs: theirs.prefix,
            });
        }
        let name = self.library.function(name);
        let call = || {
            let mut cmd = redis::cmd("FCALL");
            cmd.arg(&name).arg(keys.len()).arg(keys);
            for a in args {
                cmd.arg(*a);
            }
            cmd
        };
        match self.query(call()).await {
            Err(BrokerError::Redis(e)) if classify(&e) == RedisFailure::NoSuchFunction => {
                if !self.load_when_missing {
                    return Err(BrokerError::NoLibrary);
                }
                self.load_library().await?;
                tracing::warn!(
                    "the crier function library was missing from Redis \
                     (FUNCTION FLUSH, or a restart without persistence): loaded it again"
                );
                self.query(call()).await
            }
            other => other,
        }
    }

    pub(super) async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: redis::Cmd,
    ) -> Result<T, BrokerError> {
        let Some(conn) = self.conn.load_full() else {
            return Err(BrokerError::Protocol("no Redis primary found yet".into()));
        };
        match tokio::time::timeout(self.timeout, conn.query(&cmd)).await {
            Ok(Err(e)) if classify(&e) == RedisFailure::ReadOnly => {
                self.demoted.notify_one();
                Err(e.into())
            }
            Ok(result) => Ok(result?),
            Err(_) => Err(BrokerError::Protocol("redis did not answer in time".into())),
        }
    }

    /// Whether the server still is the primary (`ROLE`); tells the
    /// supervisor when it is not.
    async fn check_role(&self) {
        let reply: Result<Vec<redis::Value>, _> = self.query(redis::cmd("ROLE")).await;
        if let Ok(reply) = reply {
            let master =
                matches!(reply.first(), Some(redis::Value::BulkString(b)) if b == b"master");
            if !master {
                self.demoted.notify_one();
            }
        }
    }

    pub(super) async fn load_library(&self) -> Result<(), BrokerError> {
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("LOAD")
            .arg("REPLACE")
            .arg(self.library.source().as_bytes());
        self.query::<String>(cmd).await.map(|_| ())
    }

    fn last_holder(&self) -> Option<Result<Holder, String>> {
        self.holder.lock().ok().and_then(|h| h.clone())
    }

    /// Whether this configuration's library is the one in Redis (or could
    /// not be checked): only then may crier load it on a new primary.
    pub(super) fn holds_library(&self) -> bool {
        matches!(
            self.last_holder(),
            None | Some(Ok(Holder::Own | Holder::Unchecked))
        )
    }

    /// Checks (and where this configuration should, loads) the library
    /// ([`library::reconcile`]), says what changed since the last check
    /// (log line, `crier_redis_library{state}`), and keeps
    /// [`Self::library_ok`]. Returns what it found.
    pub(super) async fn check_library(&self, metrics: &Metrics) -> Result<Holder, BrokerError> {
        let found = library::reconcile(self, &self.library, self.stale).await;
        let now = found
            .as_ref()
            .map(Clone::clone)
            .map_err(ToString::to_string);
        let before = self
            .holder
            .lock()
            .ok()
            .and_then(|mut h| h.replace(now.clone()));
        self.library_ok.store(
            matches!(now, Ok(Holder::Own | Holder::Newer(_) | Holder::Unchecked)),
            Ordering::Release,
        );
        for state in ["own", "newer", "conflict", "unchecked", "error"] {
            let on = match &now {
                Ok(h) => h.label() == state,
                Err(_) => state == "error",
            };
            metrics
                .redis_library
                .with_label_values(&[state])
                .set(i64::from(on));
        }
        if before.as_ref() != Some(&now) {
            self.say(before.as_ref(), &now);
        }
        found
    }

    /// One log line per change of who holds the library.
    fn say(&self, before: Option<&Result<Holder, String>>, now: &Result<Holder, String>) {
        let ours = self.library.meta();
        let name = &self.library.name;
        match now {
            Ok(Holder::Own) if before.is_none() => tracing::info!(
                library = %name,
                "function library loaded: apps publish with history through FCALL {} 1 <channel> <payload>",
                self.library.function("crier_publish"),
            ),
            Ok(Holder::Own) => tracing::info!(
                library = %name,
                rules = %ours.rules,
                "this configuration holds the function library again"
            ),
            Ok(Holder::Unchecked) => tracing::warn!(
                library = %name,
                "cannot read the function library (Redis < 7, or the ACL user lacks FUNCTION LIST                  and HGETALL): crier cannot tell whether another configuration holds it"
            ),
            Ok(Holder::Newer(theirs)) => tracing::warn!(
                library = %name,
                ours.rules = %ours.rules,
                ours.started = ours.started,
                theirs.rules = %theirs.rules,
                theirs.started = theirs.started,
                theirs.version = %theirs.version,
                "a newer configuration of this deployment holds the function library: its history                  rules apply until its instances are gone. Expected during a rollout; if it lasts,                  two deployments share channel_prefix {:?}: give each its own",
                ours.prefix,
            ),
            Ok(Holder::Conflict(theirs)) => tracing::error!(
                library = %name,
                "the function library {name} belongs to another deployment (channel_prefix {:?},                  crier {}), not to this one (channel_prefix {:?}): crier will not replace it;                  give one of the two another channel_prefix. Not ready, and publishing with                  history is refused",
                theirs.prefix,
                theirs.version,
                ours.prefix,
            ),
            Err(e) => tracing::error!(
                library = %name,
                error = %e,
                "the crier function library is missing from Redis and cannot be loaded: apps' \
                 FCALL crier_publish fails; not ready"
            ),
        }
    }

    /// Whether apps can `FCALL crier_publish`: the library is there, or was
    /// loaded again now. A Redis without functions at all (< 7) counts as
    /// fine: crier then runs without history, as it said at start.
    pub(super) async fn ensure_library(&self) -> Result<(), BrokerError> {
        match self
            .fcall::<String>("crier_position", &[self.stream_key("crier:check")], &[])
            .await
        {
            Err(BrokerError::Redis(e)) if classify(&e) == RedisFailure::NoSuchCommand => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// The prefix of crier's channels and keys in Redis.
    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `PUBLISH` (on a Cluster, `SPUBLISH` on the channel's shard): live
    /// only, never kept in history.
    pub(super) async fn publish_live(
        &self,
        channel: &str,
        payload: &[u8],
    ) -> Result<(), BrokerError> {
        let mut cmd = redis::cmd(if self.cluster { "SPUBLISH" } else { "PUBLISH" });
        cmd.arg(format!("{}{channel}", self.prefix)).arg(payload);
        self.query::<i64>(cmd).await.map(drop)
    }

    /// The channels crier instances subscribe to (`PUBSUB CHANNELS`, or
    /// `PUBSUB SHARDCHANNELS` on a Cluster), without the prefix and
    /// crier's own.
    pub(super) async fn occupied(&self) -> Result<Vec<String>, BrokerError> {
        let mut cmd = redis::cmd("PUBSUB");
        cmd.arg(if self.cluster {
            "SHARDCHANNELS"
        } else {
            "CHANNELS"
        })
        .arg(format!("{}*", glob_escape(&self.prefix)));
        let names: Vec<String> = self.query(cmd).await?;
        let mut names: Vec<String> = names
            .into_iter()
            .filter_map(|n| n.strip_prefix(self.prefix.as_str()).map(str::to_owned))
            .filter(|n| !n.starts_with("crier:"))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// `channel`'s history stream, declared as the function's key.
    fn stream_key(&self, channel: &str) -> String {
        history::stream_key(&self.prefix, channel)
    }

    /// The keys a history read declares: the stream, and where crier
    /// before 0.2 kept it (read so an upgrade loses nothing).
    fn history_keys(&self, channel: &str) -> Vec<String> {
        let mut keys = vec![self.stream_key(channel)];
        if !self.cluster {
            keys.push(history::legacy_stream_key(&self.prefix, channel));
        }
        keys
    }

    pub(super) async fn position(&self, channel: &str) -> Result<StreamId, BrokerError> {
        let id: String = self
            .fcall("crier_position", &self.history_keys(channel), &[])
            .await?;
        id.parse()
            .map_err(|_| BrokerError::Protocol(format!("bad stream id {id:?}")))
    }

    pub(super) async fn recover(
        &self,
        channel: &str,
        since: StreamId,
        limit: usize,
    ) -> Result<Recovery, BrokerError> {
        let since = since.to_string();
        let limit = limit.to_string();
        let (gap, entries): SinceReply = self
            .fcall(
                "crier_since",
                &self.history_keys(channel),
                &[since.as_bytes(), limit.as_bytes()],
            )
            .await?;
        let mut recovery = Recovery {
            gap: gap != 0,
            entries: Vec::with_capacity(entries.len()),
        };
        for (id, mut fields) in entries {
            let id = id
                .parse()
                .map_err(|_| BrokerError::Protocol(format!("bad stream id {id:?}")))?;
            // Fields are ["d", payload].
            let payload = if fields.len() >= 2 {
                fields.swap_remove(1)
            } else {
                Vec::new()
            };
            recovery.entries.push((id, payload));
        }
        Ok(recovery)
    }
}

/// `crier_since` answers `{gap, {{id, {"d", payload}}, ...}}`.
type SinceReply = (i64, Vec<(String, Vec<Vec<u8>>)>);

/// Why the serving loop ended.
enum Ended {
    Stopped,
    Lost(String),
}

/// What the supervisor knows of one channel.
struct Channel {
    /// Readiness signal shared with the hub's waiters.
    ready: watch::Sender<bool>,
    /// For history channels: the newest id dispatched (or the position at
    /// subscription), where recovery resumes after an outage.
    last: Option<StreamId>,
    history: bool,
}

struct Supervisor {
    target: Target,
    config: crate::config::RedisConfig,
    /// The primary's address (password redacted), once found.
    address: Option<String>,
    redis: Redis,
    prefix: String,
    canary: String,
    canary_interval: Duration,
    connect_timeout: Duration,
    reconnect_max: Duration,
    hub: Arc<dyn Fanout>,
    policy: Arc<Policy>,
    control: mpsc::UnboundedReceiver<Control>,
    /// Every channel the hub wants.
    channels: HashMap<String, Channel>,
    health: BrokerHealth,
    metrics: Metrics,
    stop: CancellationToken,
}

impl Supervisor {
    async fn run(mut self) {
        let mut failures: u32 = 0;
        let mut connected_before = false;
        loop {
            match self.connect().await {
                Ok((mut sink, stream)) => match self.resubscribe_all(&mut sink).await {
                    Ok(()) => {
                        self.load_library().await;
                        if connected_before {
                            self.metrics.redis_reconnects.inc();
                            tracing::info!(
                                channels = self.channels.len(),
                                "redis reconnected, recovering"
                            );
                            self.recover_all().await;
                        } else {
                            tracing::info!("redis pub/sub connected");
                        }
                        connected_before = true;
                        failures = 0;
                        self.set_ready(true);
                        let ended = self.serve(sink, stream).await;
                        self.set_ready(false);
                        match ended {
                            Ended::Stopped => return,
                            Ended::Lost(why) => {
                                tracing::warn!(error = %why, "redis pub/sub connection lost")
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "redis resubscribe failed"),
                },
                Err(e) => {
                    if failures == 0 || failures % 20 == 0 {
                        tracing::warn!(error = %e, redis = %self.target, attempt = failures + 1, "cannot connect to redis");
                    }
                }
            }
            if self.stop.is_cancelled() {
                return;
            }
            let delay = backoff(failures, self.reconnect_max);
            failures = failures.saturating_add(1);
            if !self.wait_offline(delay).await {
                return;
            }
        }
    }

    /// Checks the function library on the multiplexed connection, loading
    /// it where this configuration should ([`Redis::check_library`]). Right
    /// after an outage that connection may not have noticed it yet (its
    /// first command fails with a broken pipe and starts its reconnect), or
    /// Redis may still be loading its data: those are retried for up to
    /// `connect_timeout`. Only Redis answering that it has no `FUNCTION`
    /// command blames its version. Whatever fails here, `FCALL` loads the
    /// library again when Redis says a function is missing.
    async fn load_library(&self) {
        let deadline = Instant::now() + self.connect_timeout;
        let mut attempt = 0;
        loop {
            let e = match self.redis.check_library(&self.metrics).await {
                Ok(_) => return,
                Err(e) => e,
            };
            let transient = match &e {
                BrokerError::Redis(e) => match classify(e) {
                    RedisFailure::NoSuchCommand => {
                        tracing::error!(error = %e, "cannot load the crier function library (Redis >= 7 needed): no history");
                        return;
                    }
                    failure => failure == RedisFailure::Transient,
                },
                // No answer in time.
                BrokerError::Protocol(_) => true,
                BrokerError::NoLibrary | BrokerError::LibraryConflict { .. } => false,
            };
            if !transient || Instant::now() >= deadline {
                tracing::error!(error = %e, "cannot load the crier function library: no history until it is loaded");
                return;
            }
            let pause = backoff(attempt, self.connect_timeout / 4);
            attempt += 1;
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Finds the primary (asking the sentinels again, if any), points the
    /// command connection at it when it moved, and opens the pub/sub
    /// connection to it.
    async fn connect(&mut self) -> Result<(PubSubSink, PubSubStream), String> {
        let attempt = async {
            let primary = self
                .target
                .primary(&self.config, self.connect_timeout)
                .await?;
            let pubsub =
                tokio::time::timeout(self.connect_timeout, primary.client.get_async_pubsub())
                    .await
                    .map_err(|_| {
                        format!(
                            "{}: timed out after {:?}",
                            primary.address, self.connect_timeout
                        )
                    })?
                    .map_err(|e| {
                        format!("{}: {}", primary.address, crate::redis_client::describe(&e))
                    })?;
            Ok::<_, String>((primary, pubsub))
        };
        let (primary, pubsub) = tokio::select! {
            _ = self.stop.cancelled() => return Err("stopping".into()),
            r = attempt => r?,
        };
        if self.address.as_deref() != Some(primary.address.as_str()) {
            if let Some(old) = &self.address {
                tracing::info!(from = %old, to = %primary.address, "the redis primary moved");
            }
            self.redis
                .connect_to(primary.client)
                .map_err(|e| e.to_string())?;
            self.address = Some(primary.address);
        }
        // A demotion seen before this connection concerns the old primary.
        let _ = futures_util::FutureExt::now_or_never(self.redis.demoted.notified());
        Ok(pubsub.split())
    }

    async fn resubscribe_all(&mut self, sink: &mut PubSubSink) -> Result<(), String> {
        let mut names: Vec<String> = self.channels.keys().map(|c| self.key(c)).collect();
        names.push(self.canary.clone());
        for batch in names.chunks(RESUBSCRIBE_BATCH) {
            self.bounded(sink.subscribe(batch)).await?;
        }
        Ok(())
    }

    /// After an outage: what each channel missed, from its history, or a
    /// `gap` where there is none. Connections drop what they already have.
    async fn recover_all(&mut self) {
        let names: Vec<String> = self.channels.keys().cloned().collect();
        for name in names {
            self.relay(&name).recover().await;
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

    /// Relays messages, applies control requests and runs the canary until
    /// the connection is lost or the process stops.
    async fn serve(&mut self, mut sink: PubSubSink, mut stream: PubSubStream) -> Ended {
        let mut canary = Canary::new(self.canary_interval);
        let mut tick = tokio::time::interval(self.canary_interval / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return Ended::Stopped,
                _ = self.redis.demoted.notified() => {
                    return Ended::Lost("the server is no longer the primary (READONLY, or ROLE says so): finding the primary again".into());
                }
                msg = stream.next() => {
                    let Some(msg) = msg else {
                        return Ended::Lost("connection closed".into());
                    };
                    if msg.get_channel_name() == self.canary {
                        // A canary came back: this connection delivers (and
                        // the library was checked just before it was sent).
                        canary.answered(msg.get_payload_bytes(), &self.metrics);
                        self.health.set(self.redis.library_ok.load(Ordering::Acquire), &self.metrics);
                        continue;
                    }
                    let Some(channel) = msg.get_channel_name().strip_prefix(self.prefix.as_str()) else {
                        continue;
                    };
                    let channel = channel.to_owned();
                    let (id, payload) = history::split_marked(msg.get_payload_bytes());
                    self.relay(&channel).live(id, payload).await;
                }
                _ = tick.tick() => {
                    if canary.overdue() && self.health.is_up() {
                        tracing::warn!("canary not received back: connected but not receiving, not ready");
                        self.health.set(false, &self.metrics);
                    }
                    if !self.redis.library_ok.load(Ordering::Acquire) && self.health.is_up() {
                        self.health.set(false, &self.metrics);
                    }
                    // Still nothing after a few intervals: this connection is
                    // broken in a way Redis did not report. Start over; the
                    // reconnect recovers what was missed from history.
                    if canary.lost() {
                        return Ended::Lost("canary lost: connection not delivering".into());
                    }
                    if let Some(seq) = canary.next() {
                        let redis = self.redis.clone();
                        let metrics = self.metrics.clone();
                        let (target, config) = (self.target.clone(), self.config.clone());
                        let current = self.address.clone();
                        let timeout = self.connect_timeout;
                        let mut cmd = redis::cmd("PUBLISH");
                        cmd.arg(&self.canary).arg(seq.to_string());
                        // Never wait on it here: a stalled Redis must not
                        // stall the relay.
                        tokio::spawn(async move {
                            // Redis can lose the library (FUNCTION FLUSH) with
                            // nothing crier does failing: only apps' FCALLs
                            // would; another configuration may have loaded its
                            // own. Check (and reload) with every canary.
                            redis.check_role().await;
                            // The sentinels moved the primary (`+switch-master`)
                            // while the old one still answers as a primary.
                            if let Some(now) = target.sentinels_say(&config, timeout).await {
                                if Some(&now) != current.as_ref() {
                                    redis.demoted.notify_one();
                                }
                            }
                            let _ = redis.check_library(&metrics).await;
                            redis.query::<i64>(cmd).await
                        });
                    }
                }
                request = self.control.recv() => {
                    let Some(request) = request else { return Ended::Stopped };
                    let result = match request {
                        Control::Subscribe { channel, ready, start } => {
                            self.subscribe(&mut sink, &channel, ready, start).await
                        }
                        Control::Unsubscribe { channel } => {
                            self.channels.remove(&channel);
                            let key = self.key(&channel);
                            self.bounded(sink.unsubscribe(&key)).await
                        }
                    };
                    if let Err(e) = result {
                        return Ended::Lost(e);
                    }
                }
            }
        }
    }

    async fn subscribe(
        &mut self,
        sink: &mut PubSubSink,
        channel: &str,
        ready: watch::Sender<bool>,
        start: ChannelStart,
    ) -> Result<(), String> {
        let ChannelStart { history, position } = start;
        // Where outage recovery of this channel would start: what the
        // subscriber read (history channels).
        let last = position;
        let key = self.key(channel);
        let done = self.bounded(sink.subscribe(&key)).await;
        if done.is_ok() {
            ready.send_replace(true);
        }
        self.channels.insert(
            channel.to_owned(),
            Channel {
                ready,
                last,
                history,
            },
        );
        done
    }

    /// Sleeps `delay` while keeping track of what the hub wants.
    /// Returns false when the process stops.
    async fn wait_offline(&mut self, delay: Duration) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return false,
                _ = &mut sleep => return true,
                request = self.control.recv() => match request {
                    Some(Control::Subscribe { channel, ready, start }) => {
                        // Recovery resumes from the subscriber's position, or
                        // sends a gap where it had none.
                        self.channels.insert(channel, Channel { ready, last: start.position, history: start.history });
                    }
                    Some(Control::Unsubscribe { channel }) => {
                        self.channels.remove(&channel);
                    }
                    None => return false,
                },
            }
        }
    }

    async fn bounded<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.connect_timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("redis did not answer in time".into()),
        }
    }

    /// Channels are ready once (re)subscribed; the instance as a whole only
    /// once a canary has come back (see `serve`).
    fn set_ready(&self, up: bool) {
        if !up {
            self.health.set(false, &self.metrics);
        }
        for channel in self.channels.values() {
            channel.ready.send_replace(up);
        }
    }

    fn key(&self, channel: &str) -> String {
        format!("{}{channel}", self.prefix)
    }
}

/// What a channel missed while its subscription was lost.
/// `text` matching itself in a Redis glob pattern.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

pub(super) enum Missed {
    /// Lost for good: the client must resync.
    Gap,
    /// Recovered from history.
    Message(StreamId, Vec<u8>),
}

/// What `channel` missed after `last` (and before `before`, when given):
/// its history since then (with a gap first where Redis lost some), or a
/// gap for a channel without history or one whose history cannot be read.
pub(super) async fn missed(
    redis: &Redis,
    metrics: &Metrics,
    channel: &str,
    history: bool,
    last: Option<StreamId>,
    before: Option<StreamId>,
) -> Vec<Missed> {
    let (true, Some(since)) = (history, last) else {
        return vec![Missed::Gap];
    };
    match redis.recover(channel, since, RECOVERY_LIMIT).await {
        Ok(mut recovery) => {
            if let Some(before) = before {
                recovery.entries.retain(|(id, _)| *id < before);
            }
            let count = recovery.entries.len();
            metrics.recovered_messages.inc_by(count as u64);
            if count > 0 {
                tracing::info!(%channel, count, "recovered from history");
            }
            recovery
                .gap
                .then_some(Missed::Gap)
                .into_iter()
                .chain(
                    recovery
                        .entries
                        .into_iter()
                        .map(|(id, payload)| Missed::Message(id, payload)),
                )
                .collect()
        }
        Err(e) => {
            tracing::warn!(%channel, error = %e, "history recovery failed");
            vec![Missed::Gap]
        }
    }
}

/// Tells `channel`'s listeners that messages were lost.
pub(super) fn relay_gap(hub: &dyn Fanout, metrics: &Metrics, channel: &str) {
    metrics.gaps.inc();
    hub.dispatch(Publication::gap(channel));
}

/// Hands a publication to the hub, unless the channel's `last` relayed id
/// already covers it (a recovery and live pub/sub can both bring it).
pub(super) fn relay(
    hub: &dyn Fanout,
    policy: &Policy,
    last: Option<&mut Option<StreamId>>,
    channel: &str,
    id: Option<StreamId>,
    payload: &[u8],
) {
    if let (Some(id), Some(last)) = (id, last) {
        if last.is_some_and(|last| last >= id) {
            return;
        }
        *last = Some(id);
    }
    let event_field = policy.event_field_of(channel);
    hub.dispatch(Publication::message(channel, id, payload, event_field));
}

/// One channel's relay to the hub: where its messages go and what the
/// broker knows of it (the last id relayed, whether it keeps history; none
/// once the hub no longer wants it). Both supervisors relay through it.
pub(super) struct Relay<'a> {
    pub(super) hub: &'a dyn Fanout,
    pub(super) policy: &'a Policy,
    pub(super) redis: &'a Redis,
    pub(super) metrics: &'a Metrics,
    pub(super) state: Option<(&'a mut Option<StreamId>, bool)>,
    pub(super) channel: &'a str,
}

impl Relay<'_> {
    /// Relays one message, unless it was already relayed.
    fn one(&mut self, id: Option<StreamId>, payload: &[u8]) {
        let last = self.state.as_mut().map(|(last, _)| &mut **last);
        relay(self.hub, self.policy, last, self.channel, id, payload);
    }

    /// Relays what the channel missed, in order.
    pub(super) fn missed(&mut self, missed: Vec<Missed>) {
        for missed in missed {
            match missed {
                Missed::Gap => relay_gap(self.hub, self.metrics, self.channel),
                Missed::Message(id, payload) => self.one(Some(id), &payload),
            }
        }
    }

    /// Reads from history what the channel missed since the last message
    /// relayed, and relays it.
    pub(super) async fn recover(&mut self) {
        let (last, history) = match &self.state {
            Some((last, history)) => (**last, *history),
            None => return,
        };
        let missed = missed(self.redis, self.metrics, self.channel, history, last, None).await;
        self.missed(missed);
    }

    /// A message received live, relayed after what it skipped: when its id
    /// is not the one `crier_publish` wrote right after the last relayed,
    /// the subscription lapsed without crier noticing (a failover in
    /// progress, a node connection the client library re-established), and
    /// the messages in between are read from history and relayed first, in
    /// order. A read that fails is a gap: nothing is lost silently.
    pub(super) async fn live(mut self, id: Option<StreamId>, payload: &[u8]) {
        if let (Some((Some(last), true)), Some(id)) =
            (self.state.as_ref().map(|(l, h)| (**l, *h)), id)
        {
            if last.skips_to(id) {
                let skipped = missed(
                    self.redis,
                    self.metrics,
                    self.channel,
                    true,
                    Some(last),
                    Some(id),
                )
                .await;
                self.missed(skipped);
            }
        }
        self.one(id, payload);
    }
}

/// Publish → receive through Redis, every half interval; unanswered for
/// longer than the interval means "connected but not receiving".
pub(super) struct Canary {
    interval: Duration,
    seq: u64,
    /// The oldest canary not yet received back.
    waiting: Option<(u64, Instant)>,
}

impl Canary {
    pub(super) fn new(interval: Duration) -> Self {
        Self {
            interval,
            seq: 0,
            waiting: None,
        }
    }

    /// The next canary to send, unless one is still on its way.
    pub(super) fn next(&mut self) -> Option<u64> {
        if self.waiting.is_some() && !self.overdue() {
            return None;
        }
        self.seq += 1;
        if self.waiting.is_none() {
            self.waiting = Some((self.seq, Instant::now()));
        }
        Some(self.seq)
    }

    pub(super) fn lost(&self) -> bool {
        self.waiting
            .is_some_and(|(_, sent)| sent.elapsed() > self.interval * 3)
    }

    pub(super) fn overdue(&self) -> bool {
        self.waiting
            .is_some_and(|(_, sent)| sent.elapsed() > self.interval)
    }

    /// A canary came back: record the lag of the one awaited.
    pub(super) fn answered(&mut self, payload: &[u8], metrics: &Metrics) {
        let seq: Option<u64> = std::str::from_utf8(payload)
            .ok()
            .and_then(|s| s.parse().ok());
        if let (Some(seq), Some((waiting, sent))) = (seq, self.waiting) {
            if seq >= waiting {
                metrics.pubsub_lag.set(sent.elapsed().as_secs_f64());
                self.waiting = None;
            }
        }
    }
}

/// Full-jitter-ish exponential backoff: a random delay in `[d/2, d]` where
/// `d = min(BACKOFF_START * 2^failures, max)`, so instances that lost Redis
/// together do not reconnect in lockstep.
pub(super) fn backoff(failures: u32, max: Duration) -> Duration {
    let exp = BACKOFF_START.saturating_mul(1u32 << failures.min(16));
    let ceiling = exp.min(max).max(Duration::from_millis(1));
    let floor = ceiling / 2;
    rand::rng().random_range(floor..=ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_canary_waits_for_its_answer_then_turns_overdue() {
        let metrics = Metrics::new();
        let mut canary = Canary::new(Duration::from_millis(30));
        assert_eq!(canary.next(), Some(1));
        assert_eq!(canary.next(), None, "one on its way at a time");
        assert!(!canary.overdue() && !canary.lost());
        canary.answered(b"1", &metrics);
        assert_eq!(canary.next(), Some(2), "answered: the next one goes");
        // Unanswered past the interval: overdue (not ready), and a new one
        // goes out; past three intervals: lost (reconnect).
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(canary.overdue());
        assert_eq!(canary.next(), Some(3));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(canary.lost());
        // A late answer to an older canary than the one awaited counts too.
        canary.answered(b"2", &metrics);
        assert!(!canary.overdue() && !canary.lost());
        canary.answered(b"garbage", &metrics);
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let max = Duration::from_secs(5);
        for failures in 0..40 {
            let d = backoff(failures, max);
            let ceiling = (BACKOFF_START * 2u32.pow(failures.min(16))).min(max);
            assert!(d <= ceiling && d >= ceiling / 2, "{failures}: {d:?}");
        }
        let samples: std::collections::HashSet<_> = (0..20).map(|_| backoff(10, max)).collect();
        assert!(samples.len() > 1, "jittered");
    }
}
