//! The command connection: one multiplexed connection to the primary (or
//! a cluster connection routing each command by its key) for everything
//! that is not pub/sub: publishing through `crier_publish`, positions and
//! history reads, the canary's `PUBLISH`, `ROLE`, and the glue that loads
//! and checks the deployment's function library (`broker::library`).
//!
//! It notices, and tells the supervisor through `demoted`, when Redis
//! answers as a replica would. It never touches the pub/sub connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::failure::{classify, RedisFailure};
use super::library::{self, Holder, Library};
use super::{BrokerError, BrokerHealth};
use crate::config::Config;
use crate::history::{self, Recovery, StreamId};
use crate::metrics::Metrics;

/// The Redis broker's handle, whatever the topology (one node, a
/// Sentinel-managed primary, a Cluster): its command connection and its
/// health. The supervisor task that owns the pub/sub side runs apart.
pub(crate) struct RedisBroker {
    pub(super) redis: Redis,
    pub(super) health: BrokerHealth,
}

impl RedisBroker {
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
    pub(super) demoted: Arc<tokio::sync::Notify>,
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
    load_when_missing: bool,
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

    /// The command connection of one publication from outside a running
    /// crier: it loads the library only when the configuration has channel
    /// rules (see [`super::publish_once`]).
    pub(super) fn once(config: &Config) -> Self {
        let mut redis = Redis::new(config);
        redis.load_when_missing = !config.channels.is_empty();
        redis
    }

    /// From now on, commands go to `client`'s server (connecting lazily).
    pub(super) fn connect_to(&self, client: redis::Client) -> Result<(), BrokerError> {
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
    pub(super) async fn check_role(&self) {
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
    /// [`Self::library_ok`]. Returns what it found. A check Redis did not
    /// answer (a timeout, a broken connection) changes nothing.
    pub(super) async fn check_library(&self, metrics: &Metrics) -> Result<Holder, BrokerError> {
        let found = library::reconcile(self, &self.library, self.stale).await;
        if let Err(BrokerError::Redis(e)) = &found {
            if classify(e) == RedisFailure::Transient {
                // No answer in time, or the connection broke: that says
                // nothing of the library, so what the last answer said
                // stands. (A busy Cluster during a rolling restart timed
                // this out and turned instances not ready, refusing their
                // clients; a Redis that is gone is the connection's
                // health to report, not the library's.)
                return found;
            }
        }
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
