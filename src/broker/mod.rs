//! Brokers carry publications from apps to every crier instance.
//!
//! Two implementations behind one enum: `redis` (production, any number of
//! instances) and `memory` (embedded, one process). Both take subscription
//! requests as [`Control`] messages and hand each publication to a
//! [`Fanout`] (the hub). A broker task never waits on a client: a fan-out
//! only pushes into bounded queues.
//!
//! The Redis side, by concern: `command` (the command connection),
//! `relay` (channels wanted, and the one path to the hub: live, recovered
//! or a gap), `supervision` (canary, backoff, what supervisors share), the
//! two supervisors `redis` (one node or a Sentinel-managed primary) and
//! `cluster`, `target` (finding the primary), `failure` (Redis errors by
//! kind), `library` (the function library) and `presence`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, HistoryRule};
use crate::history::{Recovery, StreamId};
use crate::metrics::Metrics;
use crate::policy::{Policy, Rule};
use crate::protocol::Publication;

use crate::redis_client as client;
mod cluster;
mod command;
pub(crate) mod events;
mod failure;
mod library;
mod memory;
pub(crate) mod presence;
mod redis;
mod relay;
mod supervision;
mod target;

use self::command::RedisBroker;
pub(crate) use self::presence::{Held, Members, Rosters};
use memory::MemoryBroker;

/// One publication from outside a running crier (`crier publish`): the
/// same function, so the same history, as apps and the HTTP API get.
///
/// Without channel rules it never loads the library: one built from no
/// rules would replace the service's and drop every history rule. It then
/// only calls the function, and says so when Redis lacks it.
pub(crate) async fn publish_once(
    config: &Config,
    channel: &str,
    payload: &[u8],
) -> Result<Option<StreamId>, BrokerError> {
    let redis = if config.redis.cluster.is_some() {
        cluster::connect_once(config).await?
    } else {
        self::redis::connect_once(config).await?
    };
    redis.publish(channel, payload).await
}

/// Where the configured Redis is, for logs (no password): the URL, or the
/// sentinels and the primary's name.
pub(crate) fn describe(config: &crate::config::RedisConfig) -> Option<String> {
    target::Target::of(config).map(|t| t.to_string())
}

/// Where a broker hands what it receives: the hub, which fans each
/// publication out to this instance's listeners. A trait so that the
/// broker, below the hub, needs nothing of it.
pub(crate) trait Fanout: Send + Sync {
    /// Delivers a message of `channel` to local listeners without waiting
    /// on any, decoded by the channel's rule as the hub keeps it; returns
    /// how many took it.
    fn publish(&self, channel: &str, id: Option<StreamId>, payload: &[u8]) -> usize;

    /// Delivers `publication` (a `gap` notice) to local listeners without
    /// waiting on any; returns how many took it.
    fn dispatch(&self, publication: Publication) -> usize;

    /// `channel`'s rule, as its first local listener resolved it, while it
    /// has one.
    fn rule(&self, channel: &str) -> Option<Arc<Rule>>;
}

/// The broker's commands, sent by the hub and handled in order.
#[derive(Debug)]
pub(crate) enum Control {
    /// Start receiving `channel`; set `ready` to true once subscribed (and
    /// back to false while the broker is disconnected).
    Subscribe {
        /// Channel name, without prefix.
        channel: String,
        /// Readiness of this channel at the broker.
        ready: watch::Sender<bool>,
        /// What the first subscriber already knows of the channel.
        start: ChannelStart,
    },
    /// Stop receiving `channel`.
    Unsubscribe {
        /// Channel name, without prefix.
        channel: String,
    },
}

/// What a subscriber learnt of a channel before subscribing — whether it
/// keeps history, and its newest id then — so that the broker, which needs
/// the same to recover the channel after an outage, does not ask again: a
/// subscribe reads the channel's rule and position once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ChannelStart {
    /// The channel's rule keeps history.
    pub(crate) history: bool,
    /// Its newest id when the subscriber looked (history channels).
    pub(crate) position: Option<StreamId>,
}

/// Opens, without connecting, a client for every configured Redis address
/// (`redis.url`, each `redis.cluster.nodes[i]`, each
/// `redis.sentinel.nodes[i]`), so that a URL crier cannot use or an
/// unreadable `[redis.tls]` file stops the start, naming the field, instead
/// of failing every reconnect. The broker opens its own clients when it
/// connects.
pub(crate) fn check(config: &crate::config::RedisConfig) -> Result<(), String> {
    if let Some(url) = &config.url {
        client::open("redis.url", url, config)?;
    }
    let nodes = |field: &str, nodes: &[String]| {
        nodes.iter().enumerate().try_for_each(|(i, node)| {
            client::open(&format!("{field}[{i}]"), node, config).map(drop)
        })
    };
    if let Some(cluster) = &config.cluster {
        nodes("redis.cluster.nodes", &cluster.nodes)?;
    }
    if let Some(sentinel) = &config.sentinel {
        nodes("redis.sentinel.nodes", &sentinel.nodes)?;
    }
    Ok(())
}

/// The broker (Redis) could not do what was asked: publish, read a
/// position or history, connect.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BrokerError {
    /// Redis refused or could not be reached.
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// Redis answered something crier did not expect.
    #[error("unexpected answer from redis: {0}")]
    Protocol(String),
    /// `crier publish` without channel rules found no `crier` function
    /// library in Redis, and will not load one built from no rules (it
    /// would replace the running service's history rules).
    #[error(
        "the crier function library is not loaded in this Redis: start crier (it loads the \
         library when it connects), or pass --config with the service's configuration"
    )]
    NoLibrary,
    /// Another deployment's library holds this deployment's function
    /// names (`broker::library`): calling them would publish with its
    /// prefix and rules.
    #[error(
        "the function library {library} belongs to another deployment (channel_prefix {theirs:?}): \
         give this deployment another channel_prefix"
    )]
    LibraryConflict { library: String, theirs: String },
}

/// Whether the broker currently delivers publications; backs `/readyz`.
#[derive(Debug, Clone, Default)]
pub(crate) struct BrokerHealth(Arc<AtomicBool>);

impl BrokerHealth {
    /// Connected and subscribed.
    pub(crate) fn is_up(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self, up: bool, metrics: &Metrics) {
        self.0.store(up, Ordering::Release);
        metrics.broker_up.set(i64::from(up));
    }
}

/// What a broker is connected to.
pub(crate) struct Wiring {
    hub: Arc<dyn Fanout>,
    policy: Arc<Policy>,
    control: mpsc::UnboundedReceiver<Control>,
    health: BrokerHealth,
    metrics: Metrics,
}

/// The configured broker.
pub(crate) enum Broker {
    /// In-process, one instance.
    Memory(MemoryBroker),
    /// Redis pub/sub.
    Redis(RedisBroker),
}

impl Broker {
    /// Starts the broker named by `config`, serving `hub`'s control requests
    /// until `stop` is cancelled.
    pub(crate) fn start(
        config: &Config,
        hub: Arc<dyn Fanout>,
        policy: Arc<Policy>,
        control: mpsc::UnboundedReceiver<Control>,
        metrics: Metrics,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Result<Self, BrokerError> {
        let health = BrokerHealth::default();
        let wiring = Wiring {
            hub,
            policy,
            control,
            health,
            metrics,
        };
        if !config.redis.is_configured() && config.redis.cluster.is_none() {
            return Ok(Broker::Memory(MemoryBroker::start(wiring, tasks, stop)));
        }
        // One command connection, whatever the topology; the supervisor
        // that owns the pub/sub side runs apart.
        let redis = command::Redis::new(config);
        let health = wiring.health.clone();
        let duty = supervision::Supervision::new(&config.redis, wiring, redis.clone(), stop);
        if config.redis.cluster.is_some() {
            cluster::spawn(&config.redis, duty, tasks)?;
        } else {
            self::redis::spawn(&config.redis, duty, tasks)?;
        }
        Ok(Broker::Redis(RedisBroker { redis, health }))
    }

    /// Publishes `payload` on `channel` (no prefix: the broker adds it),
    /// appending it to the channel's history when its rule keeps one.
    /// Returns the history id.
    pub(crate) async fn publish(
        &self,
        channel: &str,
        payload: &[u8],
    ) -> Result<Option<StreamId>, BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.publish(channel, payload)),
            Broker::Redis(b) => b.publish(channel, payload).await,
        }
    }

    /// Where a new listener of a history channel starts: the newest id, or
    /// just before now when the channel has no history yet.
    pub(crate) async fn position(
        &self,
        channel: &str,
        history: HistoryRule,
    ) -> Result<StreamId, BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.position(channel, history)),
            Broker::Redis(b) => b.redis.position(channel).await,
        }
    }

    /// What `channel`'s history holds after `since` (at most `limit`
    /// messages), and whether messages after `since` were lost.
    pub(crate) async fn recover(
        &self,
        channel: &str,
        history: HistoryRule,
        since: StreamId,
        limit: usize,
    ) -> Result<Recovery, BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.recover(channel, history, since, limit)),
            Broker::Redis(b) => b.redis.recover(channel, since, limit).await,
        }
    }

    /// Connected and delivering.
    pub(crate) fn health(&self) -> &BrokerHealth {
        match self {
            Broker::Memory(b) => &b.health,
            Broker::Redis(b) => &b.health,
        }
    }

    /// `memory` or `redis`, for logs.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Broker::Memory(_) => "memory",
            Broker::Redis(_) => "redis",
        }
    }
}
